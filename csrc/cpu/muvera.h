// MUVERA fixed-dimensional encodings on the CPU (definition: python/vkern/reference/muvera.py).
#pragma once
#include <cstdint>

namespace vkern {
namespace cpu {

struct MuveraCall {
  const float* x;             // packed tokens [T, D], contiguous
  int64_t D;
  const int64_t* offsets;     // [N+1]
  int64_t N;
  int64_t R, k, d_proj;
  const float* simhash_t;     // [D][R * k]: column r * k + j is projection j of repetition r
  const int64_t* ams_index;   // [R][D] or nullptr (identity, d_proj == D)
  const float* ams_sign;      // [R][D]
  bool average, fill_empty;
  int64_t raw_dim;            // R * 2^k * d_proj
  const int64_t* final_index; // [raw_dim] or nullptr
  const float* final_sign;
  int64_t out_dim;            // raw_dim, or the final count-sketch size
  float* out;                 // [N, out_dim]
};

void muvera_encode(const MuveraCall& call);

// The inner loops, one translation unit per SIMD level (simd/muvera_<level>.cpp).
struct MuveraLevel {
  const char* name;
  // dots[t * C + c] ~= sum over q of x[t * D + q] * g[q * C + c] in float32 (any order, fused or
  // not: the caller only trusts a dot's sign where it is certain, see muvera.cpp), for t < L4 (L
  // rounded up to 4: rows L..L4-1 of dots are scratch) and c < C (C % 8 == 0). xbuf: 4 * D floats.
  void (*simhash_dots)(const float* x, int64_t L, int64_t D, const float* g, int64_t C, float* dots, float* xbuf);
  // out[t] = sum over q of x[t * D + q]^2 in float64, in any order.
  void (*token_norms)(const float* x, int64_t L, int64_t D, double* out);
  // xT[q * Lp + t] = x[t * D + q] for t < L (Lp >= L; columns L..Lp-1 are left as they are).
  void (*transpose)(const float* x, int64_t L, int64_t D, int64_t Lp, float* xT);
  // AMS sketch of Lp tokens (Lp % 8 == 0) held transposed, xT[q * Lp + t]: for each output j < dp,
  // projT[j * Lp + t] = 0.0f + sign[order[s]] * xT[order[s] * Lp + t] summed over s in
  // [starts[j], starts[j + 1]) in order (order lists the inputs of output j in increasing q, so
  // the float32 sums are the reference's scatter-adds; sign * x is exact, sign being +-1), so
  // every level gives the same bits.
  void (*ams_project)(const float* xT, int64_t Lp, const int32_t* order, const int32_t* starts,
                      const float* sign, int64_t dp, float* projT);
};

const MuveraLevel& muvera_level_generic();
const MuveraLevel& muvera_level_avx2();

}  // namespace cpu
}  // namespace vkern
