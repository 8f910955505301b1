// Token pooling on the CPU (Ward / k-means per document) and segment means.
// pool.cpp is the driver; simd/pool_<level>.cpp hold the dot-product blocks.
#pragma once
#include <cstdint>

namespace vkern {
namespace cpu {

// Row stride (elements) of the Ward matrices: m rounded up to a multiple of this.
constexpr int64_t kWardPad = 32;

struct PoolLevel {
  const char* name;
  // out[i * ldo + j] = <a_i, b_j> in float32 (rows have unit element stride).
  void (*dots)(const float* a, int64_t na, int64_t lda, const float* b, int64_t nb, int64_t ldb, int64_t D,
               float* out, int64_t ldo);
  // d [m, ldd] float64 = s|s| with s = 1 - <x_i, x_j> (dots in float32; the signed square has
  // the order of s), +inf on the diagonal and in columns >= m. Scratch: pack [kWardPad * D]
  // floats, and d[-kWardPad, 0) (the tiles of columns below 0 land there).
  void (*ward_dist)(const float* x, int64_t m, int64_t ld, int64_t D, float* pack, double* d, int64_t ldd);
  // Ward merges of d (overwritten) by the nearest-neighbour chain: merge_a/b = lowest token of
  // each side, merge_h = height as its signed square (the order fcluster needs), m-1 of each in
  // merge order. size / pen [ldd]: 1 / 0 below m, 0 / +inf after (overwritten); spare
  // [(ldd / 2)^2] doubles (the compacted matrices), work [4 m + ldd], chain, rep [m] scratch.
  void (*ward_chain)(double* d, int64_t m, int64_t ldd, double* spare, double* size, double* pen, int64_t* work,
                     int64_t* chain, int64_t* rep, int64_t* merge_a, int64_t* merge_b, double* merge_h);
  // out [nc, D] = float32 of the float64 mean of the rows i with labels[i] == g (every g in
  // [0, nc) has one; each sum in row order); sums [nc + m + D], counts [nc] scratch.
  void (*cluster_means)(const float* x, int64_t m, int64_t ld, int64_t D, const int64_t* labels, int64_t nc,
                        double* sums, int64_t* counts, float* out);
  // True if none of the n rows (stride ld) x D floats is NaN or +-inf.
  bool (*finite_rows)(const float* x, int64_t n, int64_t ld, int64_t D);
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
  float* out;                 // output rows, contiguous [*, D]; packed on return (document n's rows
                              // start at the sum of out_lens before n)
  int64_t* out_lens;          // [N] rows written per document
};

// Returns false (out and out_lens then unspecified) if some document holds a NaN or an inf:
// each document is checked before it is clustered, and none with one is.
bool pool_tokens(const PoolCall& call);

// out[s] = mean of the rows x[t] with ids[t] == s (float64 sums), zero where none; ids in [0, S).
void segment_mean(const float* x, int64_t T, int64_t D, int64_t row_stride, const int64_t* ids, int64_t S,
                  float* out);

}  // namespace cpu
}  // namespace vkern
