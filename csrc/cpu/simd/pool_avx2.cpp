// avx2 build of the token-pooling dot blocks.
#define VKERN_LEVEL avx2
#include "cpu/simd/pool_kernel.inc"
