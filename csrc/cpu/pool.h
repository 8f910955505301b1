// Token pooling on the CPU (Ward / k-means per document) and segment means.
// pool.cpp is the driver; simd/pool_<level>.cpp hold the dot-product blocks.
#pragma once
#include <cstdint>

namespace vkern {
namespace cpu {

// out[i * ldo + j] = <a_i, b_j> in float32 (rows have unit element stride).
struct PoolLevel {
  const char* name;
  void (*dots)(const float* a, int64_t na, int64_t lda, const float* b, int64_t nb, int64_t ldb, int64_t D,
               float* out, int64_t ldo);
};

const PoolLevel& pool_level_generic();
const PoolLevel& pool_level_avx2();
const PoolLevel& pool_level_avx512();
const PoolLevel& pool_level_avx512shape();

enum PoolMethod : int { kWard = 0, kKmeans = 1 };

struct PoolCall {
  const float* x;             // token rows, float32, unit element stride
  int64_t D, row_stride;      // row_stride in elements
  const int64_t* doc_starts;  // [N] first row of each document
  const int64_t* doc_lens;    // [N]
  int64_t N;
  int64_t pool_factor;        // >= 1
  int64_t protected_tokens;   // >= 0
  int method;                 // PoolMethod
  uint64_t seed;              // k-means
  const int64_t* out_starts;  // [N] first output row of each document (room for the upper bound)
  float* out;                 // output rows, contiguous [*, D]
  int64_t* out_lens;          // [N] rows written per document
};

void pool_tokens(const PoolCall& call);

// out[s] = mean of the rows x[t] with ids[t] == s (float64 sums), zero where none; ids in [0, S).
void segment_mean(const float* x, int64_t T, int64_t D, int64_t row_stride, const int64_t* ids, int64_t S,
                  float* out);

}  // namespace cpu
}  // namespace vkern
