// Value-aware KV pruning (VATP) on the CPU: the drivers (vatp.cpp) and the
// per-SIMD-level kernels (simd/vatp_*.cpp). Nothing here knows about Python.
#pragma once
#include <cstdint>

namespace vkern {
namespace cpu {
namespace vatp {

// dtype codes shared with the Python side: 0 float32, 1 float16, 2 bfloat16.
constexpr int kF32 = 0, kF16 = 1, kBF16 = 2;

// One strip of query rows (one register block, `qblock` lanes) of one query
// head against the keys [0, n_keys) of its KV head, by one thread.
struct ColsumStrip {
  const float* qt;            // packed rows [D][qblock], fp32, pre-scaled by scale * log2(e); 0 in unused lanes
  int64_t D;
  const int32_t* limit;       // [qblock] last key each lane sees (inclusive); -1 = lane adds nothing
  int64_t n_keys;             // 1 + max(limit) >= 1
  const void* k;              // key row 0; elements contiguous within a row
  int k_dtype;
  int64_t k_row_stride;       // elements between key rows
  float* s;                   // scratch [n_keys][qblock]
  float* kbuf;                // scratch, colsum_scratch_floats(D) floats (widened key rows)
  double* colsum;             // [n_keys] += sum over lanes of softmax probabilities
};

// What one SIMD level offers. Each level lives in its own translation unit,
// compiled with its own -m flags.
struct VatpLevel {
  const char* name;
  int qblock;                                       // query rows per strip
  int64_t (*colsum_scratch_floats)(int64_t D);
  void (*colsum_strip)(const ColsumStrip& job);
  // out[r] = sum over d of |row r| for n rows (unit element stride, row stride in elements).
  void (*l1_rows)(const void* v, int dtype, int64_t row_stride, int64_t n, int64_t D, float* out);
  // Copies rows src + idx[r] * src_stride -> dst + r * dst_stride (bytes), r ascending, row_bytes each.
  // Safe in place when idx[r] >= r and no row overlaps another. `stream`: non-temporal stores.
  void (*copy_rows)(char* dst, int64_t dst_stride, const char* src, int64_t src_stride, const int64_t* idx,
                    int64_t n, int64_t row_bytes, bool stream);
};

const VatpLevel& level_generic();
const VatpLevel& level_avx2();
const VatpLevel& level_avx512();
const VatpLevel& level_avx512shape();  // the AVX-512 tiling built for AVX2, for tests

struct ColsumCall {
  const void* q;              // [B, Hq, Tq, D], element strides below
  int q_dtype;
  int64_t B, Hq, Tq, D;
  int64_t q_sb, q_sh, q_si, q_sd;
  const void* k;              // [B, H_kv, T, D], unit element stride along D
  int k_dtype;
  int64_t H_kv, T;
  int64_t k_sb, k_sh, k_st;
  const int64_t* seq_lens;    // [B], values in [0, T]
  bool causal;
  float scale;
  float* out;                 // [B, H_kv, T] contiguous
};

struct L1Call {
  const void* v;              // [B, H, T, D], element strides below
  int dtype;
  int64_t B, H, T, D;
  int64_t sb, sh, st, sd;
  float* out;                 // [B, H, T] contiguous
};

// A cache tensor [B, H, T, D] as the pruner sees it.
struct Cache {
  char* data;
  int dtype;
  int64_t D;
  int64_t sb, sh, st, sd;     // element strides
};

struct PruneCall {
  Cache k, v;                 // inputs (written when in place)
  Cache k_out, v_out;         // outputs [B, H, kmax, D], any strides (ignored in place)
  int64_t B, H, T;
  const void* scores;         // [B, H, T], element strides below
  int s_dtype;
  int64_t s_sb, s_sh, s_st;
  const int64_t* seq_lens;    // [B], values in [0, T]
  const int64_t* kept_lens;   // [B], values in [0, seq_lens[b]]
  int64_t num_sink, num_recent, kmax;
  int64_t* kept_idx;          // [B, H, kmax] contiguous, -1 padded
  bool inplace;
  bool fresh_out;             // k_out/v_out were just allocated for this call (never touched yet)
};

void attention_colsum(const ColsumCall& call);
void value_l1(const L1Call& call);
void prune(const PruneCall& call);

}  // namespace vatp
}  // namespace cpu
}  // namespace vkern
