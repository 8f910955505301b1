// Portable float16 / bfloat16 <-> float32, for the scalar paths. Functions are
// `static inline` on purpose: each SIMD-level translation unit gets its own
// copy, compiled with its own flags, so the linker never merges them.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

namespace vkern {
namespace cpu {

static inline float bf16_to_float(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

static inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, bits;
  if (exp == 0x1f) {  // inf / NaN
    bits = sign | 0x7f800000u | (man << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112u) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal half: normalise
    int e = -1;
    do {
      ++e;
      man <<= 1;
    } while ((man & 0x400u) == 0);
    bits = sign | ((112u - e) << 23) | ((man & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// float32 -> bfloat16, round to nearest even (as torch's .bfloat16()); NaN stays a (quiet) NaN.
static inline uint16_t float_to_bf16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);
  return static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

// float32 -> float16, round to nearest even (as NumPy's astype(float16)): overflow to inf,
// subnormal halves below 2^-14, NaN stays a (quiet) NaN.
static inline uint16_t float_to_half(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u) return static_cast<uint16_t>(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u : 0u));
  if (ax >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);   // >= 65520 rounds to inf
  if (ax >= 0x38800000u) {                                                 // a normal half
    uint32_t m = ax - 0x38000000u;                                         // exponent bias 127 -> 15
    m += 0xfffu + ((m >> 13) & 1u);
    return static_cast<uint16_t>(sign | (m >> 13));
  }
  float a;
  std::memcpy(&a, &ax, 4);
  // |f| < 2^-14: a multiple of 2^-24 (exact scaling), rounded to nearest even by the FPU
  return static_cast<uint16_t>(sign | static_cast<uint32_t>(std::nearbyint(a * 16777216.0f)));
}

}  // namespace cpu
}  // namespace vkern
