// AVX2 + FMA + F16C build of the MaxSim micro-kernel (compiled with -mavx2 -mfma -mf16c).
#define VKERN_LEVEL avx2
#include "cpu/simd/maxsim_kernel.inc"
