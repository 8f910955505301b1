// generic build of the token-pooling dot blocks.
#define VKERN_LEVEL generic
#include "cpu/simd/pool_kernel.inc"
