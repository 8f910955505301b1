// Portable build of the MUVERA inner loops (baseline ISA).
#define VKERN_LEVEL generic
#include "cpu/simd/muvera_kernel.inc"
