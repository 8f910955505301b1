// Portable build of the VATP kernels (baseline ISA).
#define VKERN_LEVEL generic
#include "cpu/simd/vatp_kernel.inc"
