// AVX2 + FMA + F16C build of the VATP kernels.
#define VKERN_LEVEL avx2
#include "cpu/simd/vatp_kernel.inc"
