// Portable build of the Loki inner loops (baseline ISA: SSE2 on x86-64, NEON on arm64).
#define VKERN_LEVEL generic
#include "cpu/simd/loki_kernel.inc"
