// The AVX-512 vector width compiled for AVX2 (test level, never chosen automatically).
#define VKERN_LEVEL avx512shape
#define VKERN_AVX512_SHAPE 1
#include "cpu/simd/pool_kernel.inc"
