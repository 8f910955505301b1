// AVX-512 build of the MaxSim micro-kernel (compiled with -mavx512f/bw/vl/dq).
#define VKERN_LEVEL avx512
#include "cpu/simd/maxsim_kernel.inc"
