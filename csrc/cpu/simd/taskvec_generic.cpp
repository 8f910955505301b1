// Portable build of the task-vector kernels (baseline ISA).
#define VKERN_LEVEL generic
#include "cpu/simd/taskvec_kernel.inc"
