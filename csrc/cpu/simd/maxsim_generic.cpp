// Portable build of the MaxSim micro-kernel (baseline ISA: SSE2 on x86-64, NEON on arm64).
#define VKERN_LEVEL generic
#include "cpu/simd/maxsim_kernel.inc"
