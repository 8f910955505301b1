// AVX-512 build of the task-vector kernels (-mavx512f/bw/vl/dq -mfma -mf16c): the fused
// decode-step pass runs 16-wide; the rest is the AVX2 code compiled for this target.
#define VKERN_LEVEL avx512
#include "cpu/simd/taskvec_kernel.inc"
