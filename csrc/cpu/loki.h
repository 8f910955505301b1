// Loki decode attention (SPEC section 2) on the CPU: the driver (loki.cpp:
// selection, softmax bookkeeping, threads) and the per-SIMD-level inner loops
// (simd/loki_<level>.cpp). Nothing here knows about Python.
#pragma once
#include <cstdint>
#include <cstring>

namespace vkern {
namespace cpu {

// Order-preserving key of a score: larger float -> larger key, -0 == +0, NaN -> 0 (last).
inline uint32_t order_key(float f) {
  if (f != f) return 0u;
  f += 0.0f;
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b ^ (static_cast<uint32_t>(static_cast<int32_t>(b) >> 31) | 0x80000000u);
}

// Inner loops of one SIMD level. Caches hold float32 (dtype 0), float16 (1) or
// bfloat16 (2) rows whose elements are contiguous; rows are `row_stride`
// elements apart. `wbuf` is thread-private scratch of at least 16 * D floats.
struct LokiLevel {
  const char* name;
  // scores[g * sstride + j] = qs[g, :rank] . k_row(j)[:rank] for j < n,
  // g < G; reads only the first `rank` elements of each row.
  void (*approx_scores)(const float* qs, int64_t G, int64_t rank, const void* k, int dtype, int64_t row_stride,
                        int64_t n, float* scores, int64_t sstride, float* wbuf);
  // s[g * n + i] = scale * q[g, :] . k_row(rows[i]) for g < G, i < n;
  // rows == nullptr means row i. Prefetches far-apart gathered rows ahead.
  void (*exact_scores)(const float* q, int64_t G, int64_t D, float scale, const void* k, int dtype,
                       int64_t row_stride, const int32_t* rows, int64_t n, float* s, float* wbuf);
  // acc[g, :] += p[g * n + i] * v_row(rows[i]).
  void (*accumulate)(const float* p, int64_t G, int64_t D, const void* v, int dtype, int64_t row_stride,
                     const int32_t* rows, int64_t n, float* acc, float* wbuf);
  // Largest of s[0, n) (NaN is skipped; it reaches the output through exp).
  float (*max_of)(const float* s, int64_t n);
  // s[i] = exp(s[i] - m) in place; returns the sum.
  float (*exp_sum)(float* s, int64_t n, float m);
  // The positions i < n with order_key(scores[i]) >= thr, ascending, into cand,
  // and their keys into keys; returns how many. Both have room for n + 16.
  int64_t (*keys_at_least)(const float* scores, int64_t n, uint32_t thr, int32_t* cand, uint32_t* keys);
  // out[e] = sum_d x[d] * P[d * D + e]  (one row times a D x D matrix)
  void (*rotate_row)(const float* x, const float* P, int64_t D, float* out);
};

const LokiLevel& loki_level_generic();
const LokiLevel& loki_level_avx2();
const LokiLevel& loki_level_avx512shape();  // AVX-512 vector width on AVX2, for tests

// One decode step, as the bindings hand it over (pointers already validated).
struct LokiCall {
  const void* q;                // [B, Hq, D], element strides below
  int q_dtype;
  int64_t B, Hq, H_kv, T, D;
  int64_t q_sb, q_sh, q_sd;
  const void* k;                // [B, H_kv, T, D]; the last dim has unit stride
  const void* v;
  int kv_dtype;
  int64_t k_sb, k_sh, k_st;
  int64_t v_sb, v_sh, v_st;
  // Optional [B, H_kv, T, >= rank] copy of the key prefix (same dtype, unit last
  // stride) for the approximate pass; nullptr: that pass reads k's rows.
  const void* kp;
  int64_t kp_sb, kp_sh, kp_st;
  const int64_t* seq_lens;      // [B], each in [1, T]
  const int64_t* budgets;       // [B] tokens kept (nullptr: dense, every token)
  int64_t rank;                 // 1..D
  int64_t num_sink, num_recent;
  bool shared;                  // gqa == "shared"
  float scale;
  float* out;                   // [B, Hq, D] float32, contiguous
  int64_t* idx;                 // [B, Hq, K] int64 or nullptr
  int64_t K;
};

void loki_attention(const LokiCall& call);

// x [rows, H, D] (element strides x_sr, x_sh; unit last stride) times
// P [H_kv, D, D] float32 contiguous, head h using P[h / (H / H_kv)];
// out [rows, H, D] float32 contiguous.
struct RotateCall {
  const void* x;
  int dtype;
  int64_t rows, H, D, x_sr, x_sh;
  const float* P;
  int64_t H_kv;
  float* out;
};

void loki_rotate(const RotateCall& call);

}  // namespace cpu
}  // namespace vkern
