// AVX2 + FMA build of the MUVERA inner loops (compiled with -mavx2 -mfma -mf16c).
#define VKERN_LEVEL avx2
#include "cpu/simd/muvera_kernel.inc"
