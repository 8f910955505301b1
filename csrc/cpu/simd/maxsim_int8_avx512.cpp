// AVX-512 builds of the int8 MaxSim micro-kernel (compiled with -mavx512f/bw/vl/dq):
// vpmaddubsw + vpmaddwd, and a second copy with AVX-512 VNNI (vpdpbusd) enabled
// for these functions only; the driver picks the VNNI copy when cpuid reports it.
#define VKERN_LEVEL avx512
#include "cpu/simd/maxsim_int8_kernel.inc"
#undef VKERN_LEVEL

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC target("avx512vnni")
#define VKERN_VNNI 1
#define VKERN_LEVEL avx512vnni
#include "cpu/simd/maxsim_int8_kernel.inc"
#pragma GCC pop_options
#else
#pragma clang attribute push(__attribute__((target("avx512vnni"))), apply_to = function)
#define VKERN_VNNI 1
#define VKERN_LEVEL avx512vnni
#include "cpu/simd/maxsim_int8_kernel.inc"
#pragma clang attribute pop
#endif
