// The Loki inner loops with 16-float vectors built with AVX2 flags: a test level,
// never chosen automatically. No AVX-512 build of this op ships (avx512 CPUs run avx2).
#define VKERN_LEVEL avx512shape
#define VKERN_AVX512_SHAPE 1
#include "cpu/simd/loki_kernel.inc"
