// avx512 build of the token-pooling dot blocks.
#define VKERN_LEVEL avx512
#include "cpu/simd/pool_kernel.inc"
