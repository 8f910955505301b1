// The int8 kernel has no separate AVX-512 tiling to emulate: the test level
// avx512shape runs the AVX2 build (so every level name has an int8 kernel).
#define VKERN_LEVEL avx512shape
#include "cpu/simd/maxsim_int8_kernel.inc"
