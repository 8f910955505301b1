// AVX2 + FMA + F16C build of the task-vector kernels (compiled with -mavx2 -mfma -mf16c).
#define VKERN_LEVEL avx2
#include "cpu/simd/taskvec_kernel.inc"
