// The AVX-512 vector width (16 floats) compiled for AVX2 (test level, never chosen
// automatically): the avx512 level's blocking, testable on a machine without AVX-512.
#define VKERN_LEVEL avx512shape
#define VKERN_AVX512_SHAPE 1
#include "cpu/simd/taskvec_kernel.inc"
