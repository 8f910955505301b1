// Portable build of the int8 MaxSim micro-kernel (baseline ISA).
#define VKERN_LEVEL generic
#include "cpu/simd/maxsim_int8_kernel.inc"
