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

}  // namespace cpu
}  // namespace vkern
