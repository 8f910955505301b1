// The AVX-512 tiling (16-float vectors, 12-token tiles) built with AVX2 flags:
// a test level, never chosen automatically, that runs the AVX-512 build's
// blocking logic on CPUs without AVX-512.
#define VKERN_LEVEL avx512shape
#define VKERN_AVX512_SHAPE 1
#include "cpu/simd/maxsim_kernel.inc"
