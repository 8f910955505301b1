// AVX2 build of the int8 MaxSim micro-kernel (vpmaddubsw + vpmaddwd, 16 query tokens a tile).
#define VKERN_LEVEL avx2
#include "cpu/simd/maxsim_int8_kernel.inc"
