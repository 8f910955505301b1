// AVX2 + FMA + F16C build of the Loki inner loops (compiled with -mavx2 -mfma -mf16c).
#define VKERN_LEVEL avx2
#include "cpu/simd/loki_kernel.inc"
