// AVX-512 build of the VATP kernels (the same source is tested as avx512shape on AVX2 machines).
#define VKERN_LEVEL avx512
#include "cpu/simd/vatp_kernel.inc"
