// The AVX-512 tiling (16-float vectors, 32-row strips) built with AVX2 flags: a
// test level, never chosen automatically.
#define VKERN_LEVEL avx512shape
#define VKERN_AVX512_SHAPE 1
#include "cpu/simd/vatp_kernel.inc"
