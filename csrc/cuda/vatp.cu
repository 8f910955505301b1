// VATP CUDA kernels (SPEC section 3).
//
// attention_colsum, two passes, flash-style (never the Tq x T matrix):
//   rowstats_kernel: one block per (query head, 32 query rows) streams the
//     visible keys in tiles of 32 and keeps each row's online softmax max and
//     sum (row_stats, float32 [B, Hq, Tq, 2]).
//   colsum_kernel: one block per (KV head, 32 keys) streams the rows of every
//     query head of the group that can see those keys, recomputes the scores,
//     normalises them with row_stats and sums the columns (double per thread,
//     a fixed-order reduction at the end: deterministic, no atomics).
//   Score tiles are 32 x 32, D staged through shared memory in chunks of 64;
//   each of 256 threads owns one row and 4 keys of the tile.
// value_l1: one warp per row.
// vatp_prune:
//   select_kernel: one block per (batch, KV head): a 4-pass 8-bit radix select
//     finds the free budget's threshold key, then one ordered pass with block
//     prefix sums emits the kept positions ascending (equal keys: lower index).
//   gather_kernel (out of place): a warp per kept row, 16-byte units when aligned.
//   compact_kernel (in place): a block per (head, 128-byte column slice) walks
//     the kept rows in ascending blocks of 32, loading a block, syncing, then
//     storing it: a destination never passes its source, so no later source
//     is overwritten before it is read.
#include "vatp.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace vkern {
namespace cuda {
namespace {

constexpr unsigned kFull = 0xffffffffu;
constexpr int kTile = 32;     // query rows and keys per score tile
constexpr int kDChunk = 64;   // head dims staged in shared memory at a time
constexpr int kThreads = 256; // 32 rows x 8 threads, each thread 4 keys: c, c + 8, c + 16, c + 24
constexpr float kLog2e = 1.4426950408889634f;
constexpr int64_t kMaxGridX = 0x7fffffff;  // CUDA's grid x limit

__device__ __forceinline__ float neg_inf() { return __uint_as_float(0xff800000u); }
__device__ __forceinline__ bool is_nan(float v) { return (__float_as_uint(v) & 0x7fffffffu) > 0x7f800000u; }

__host__ __device__ __forceinline__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
__host__ __device__ __forceinline__ int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }

// This thread's 4 scores (row threadIdx.x / 8, keys c + 8j) of a 32 x 32 tile:
// q rows [rows_valid, D] and k rows [keys_valid, D], both row-major.
template <typename T>
__device__ void tile_scores(const T* q_rows, int rows_valid, const T* k_rows, int keys_valid, int64_t D, float qscale,
                            float (*qs)[kDChunk + 1], float (*ks)[kDChunk + 1], float out[4]) {
  const int t = threadIdx.x, r = t / 8, c = t % 8;
#pragma unroll
  for (int j = 0; j < 4; ++j) out[j] = 0.f;
  for (int64_t d0 = 0; d0 < D; d0 += kDChunk) {
    for (int e = t; e < kTile * kDChunk; e += kThreads) {
      const int rr = e / kDChunk, dd = e % kDChunk;
      const int64_t d = d0 + dd;
      qs[rr][dd] = (rr < rows_valid && d < D) ? to_f(q_rows[rr * D + d]) : 0.f;
      ks[rr][dd] = (rr < keys_valid && d < D) ? to_f(k_rows[rr * D + d]) : 0.f;
    }
    __syncthreads();
#pragma unroll 8
    for (int dd = 0; dd < kDChunk; ++dd) {
      const float qv = qs[r][dd];
#pragma unroll
      for (int j = 0; j < 4; ++j) out[j] = fmaf(qv, ks[c + 8 * j][dd], out[j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int j = 0; j < 4; ++j) out[j] *= qscale;
}

template <typename T>
__global__ void rowstats_kernel(const T* q, const T* k, const int64_t* lens, float* stats, int64_t Hq, int64_t Tq,
                                int64_t T_, int64_t D, int64_t G, float qscale, bool causal) {
  __shared__ float qs[kTile][kDChunk + 1];
  __shared__ float ks[kTile][kDChunk + 1];
  const int64_t tiles = (Tq + kTile - 1) / kTile;  // one grid axis: (query head, row tile)
  const int64_t bhq = blockIdx.x / tiles, b = bhq / Hq, H = Hq / G, h = (bhq % Hq) / G;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x % tiles) * kTile;
  const int t = threadIdx.x, r = t / 8, c = t % 8;
  const int64_t row = m0 + r, pos = T_ - Tq + row, L = lens[b];
  const int64_t hi = causal ? imin(L, T_ - Tq + m0 + kTile) : L;   // keys [0, hi) can be visible
  const int rows_valid = static_cast<int>(imin(kTile, Tq - m0));
  const T* q_rows = q + (bhq * Tq + m0) * D;
  const T* k_head = k + (b * H + h) * T_ * D;
  float m = neg_inf(), l = 0.f;
  for (int64_t n0 = 0; n0 < hi; n0 += kTile) {
    float s[4];
    tile_scores(q_rows, rows_valid, k_head + n0 * D, static_cast<int>(imin(kTile, hi - n0)), D, qscale, qs,
                ks, s);
    float tmax = neg_inf();
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t key = n0 + c + 8 * j;
      const bool vis = key < hi && row < Tq && (!causal || key <= pos);
      if (!vis) s[j] = neg_inf();
      tmax = fmaxf(tmax, s[j]);
    }
    for (int off = 4; off > 0; off >>= 1) tmax = fmaxf(tmax, __shfl_xor_sync(kFull, tmax, off));
    const float m_new = fmaxf(m, tmax);
    const float shift = m_new == neg_inf() ? 0.f : m_new;
    float part = 0.f;
#pragma unroll
    for (int j = 0; j < 4; ++j) part += exp2f(s[j] - shift);   // NaN propagates into the sum
    for (int off = 4; off > 0; off >>= 1) part += __shfl_xor_sync(kFull, part, off);
    l = l * exp2f(m - shift) + part;
    m = m_new;
  }
  if (causal && pos >= L) l = 0.f;   // a padding query row adds nothing
  if (c == 0 && row < Tq) {
    stats[(bhq * Tq + row) * 2] = m;
    stats[(bhq * Tq + row) * 2 + 1] = l;
  }
}

template <typename T>
__global__ void colsum_kernel(const T* q, const T* k, const int64_t* lens, const float* stats, float* out, int64_t Hq,
                              int64_t H, int64_t Tq, int64_t T_, int64_t D, int64_t G, float qscale, bool causal) {
  __shared__ float qs[kTile][kDChunk + 1];
  __shared__ float ks[kTile][kDChunk + 1];
  __shared__ double acc_s[kTile][kTile + 1];
  const int64_t tiles = (T_ + kTile - 1) / kTile;   // one grid axis: (KV head, key tile)
  const int64_t bh = blockIdx.x / tiles, b = bh / H, h = bh % H;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x % tiles) * kTile;
  const int t = threadIdx.x, r = t / 8, c = t % 8;
  const int64_t L = lens[b];
  double acc[4] = {0.0, 0.0, 0.0, 0.0};
  if (n0 < L) {
    const int keys_valid = static_cast<int>(imin(kTile, L - n0));
    const int64_t first = causal ? imax(0, n0 - (T_ - Tq)) : 0;   // first row that can see key n0
    const int64_t start = (first / kTile) * kTile;
    for (int64_t g = 0; g < G; ++g) {
      const int64_t hq = h * G + g;
      for (int64_t m0 = start; m0 < Tq; m0 += kTile) {
        const int64_t row = m0 + r, pos = T_ - Tq + row;
        float s[4];
        tile_scores(q + ((b * Hq + hq) * Tq + m0) * D, static_cast<int>(imin(kTile, Tq - m0)),
                    k + (bh * T_ + n0) * D, keys_valid, D, qscale, qs, ks, s);
        float m = 0.f, l = 0.f;
        if (row < Tq) {
          m = stats[((b * Hq + hq) * Tq + row) * 2];
          l = stats[((b * Hq + hq) * Tq + row) * 2 + 1];
        }
        // A row that sees keys but whose max is not finite (a NaN or +inf score, or all -inf) gets
        // NaN on every key it sees (docs/contracts.md): inv = NaN does it, per row.
        const bool sees = row < Tq && L > 0 && (!causal || (pos >= 0 && pos < L));
        const bool ok = sees && l > 0.f && isfinite(m);
        const float inv = ok ? 1.f / l : __uint_as_float(0x7fc00000u);
        const float shift = ok ? m : 0.f;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int64_t key = n0 + c + 8 * j;
          if (sees && key < L && (!causal || key <= pos)) acc[j] += static_cast<double>(exp2f(s[j] - shift) * inv);
        }
      }
    }
  }
#pragma unroll
  for (int j = 0; j < 4; ++j) acc_s[r][c + 8 * j] = acc[j];
  __syncthreads();
  if (t < kTile) {
    double sum = 0.0;
    for (int rr = 0; rr < kTile; ++rr) sum += acc_s[rr][t];
    const int64_t key = n0 + t;
    if (key < T_) out[bh * T_ + key] = static_cast<float>(sum);
  }
}

template <typename T>
__global__ void l1_kernel(const T* v, int64_t rows, int64_t D, float* out) {
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (warp >= rows) return;   // whole warps leave together
  float s = 0.f;
  for (int64_t d = lane; d < D; d += 32) s += fabsf(to_f(v[warp * D + d]));
  for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(kFull, s, off);
  if (lane == 0) out[warp] = s;
}

// Order-preserving key of a float score: NaN lowest (0), -0.0 == +0.0.
__device__ __forceinline__ uint32_t order_key(float x) {
  if (is_nan(x)) return 0u;
  if (x == 0.f) x = 0.f;
  const uint32_t u = __float_as_uint(x);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Exclusive block-wide prefix sum of one int per thread (kThreads threads);
// *total gets the block's sum. Every thread must call it.
__device__ int block_scan(int v, int* total, int* warp_sums) {
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  int x = v;
  for (int off = 1; off < 32; off <<= 1) {
    const int y = __shfl_up_sync(kFull, x, off);
    if (lane >= off) x += y;
  }
  if (lane == 31) warp_sums[w] = x;
  __syncthreads();
  if (w == 0) {
    int s = lane < kThreads / 32 ? warp_sums[lane] : 0;
    for (int off = 1; off < 32; off <<= 1) {
      const int y = __shfl_up_sync(kFull, s, off);
      if (lane >= off) s += y;
    }
    if (lane < kThreads / 32) warp_sums[lane] = s;
  }
  __syncthreads();
  const int before = w > 0 ? warp_sums[w - 1] : 0;
  *total = warp_sums[kThreads / 32 - 1];
  __syncthreads();   // warp_sums is reused by the next call
  return before + x - v;
}

__global__ void select_kernel(const float* scores, const int64_t* lens, const int64_t* kept, int64_t H, int64_t T_,
                              int64_t kmax, int64_t num_sink, int64_t num_recent, int64_t* idx) {
  __shared__ unsigned hist[256];
  __shared__ uint32_t s_prefix;
  __shared__ long long s_remaining;
  __shared__ int warp_sums[kThreads / 32];
  const int64_t bh = blockIdx.x, b = bh / H;
  const int t = threadIdx.x;
  const int64_t L = lens[b], n = kept[b];
  const int64_t sink_end = imin(num_sink, L), recent_start = imax(sink_end, L - num_recent);
  const int64_t mid = recent_start - sink_end, n_free = n - sink_end - (L - recent_start);
  const float* row = scores + bh * T_;
  const bool keep_all = n_free >= mid, keep_none = n_free <= 0;
  uint32_t thr = 0;
  long long take_equal = 0;
  if (!keep_all && !keep_none) {
    uint32_t prefix = 0, pmask = 0;
    long long remaining = n_free;
    for (int shift = 24; shift >= 0; shift -= 8) {
      for (int i = t; i < 256; i += kThreads) hist[i] = 0u;
      __syncthreads();
      for (int64_t i = t; i < mid; i += kThreads) {
        const uint32_t key = order_key(row[sink_end + i]);
        if ((key & pmask) == prefix) atomicAdd(&hist[(key >> shift) & 255u], 1u);
      }
      __syncthreads();
      if (t == 0) {
        int bucket = 255;
        long long rem = remaining;
        for (; bucket > 0; --bucket) {
          if (static_cast<long long>(hist[bucket]) >= rem) break;
          rem -= hist[bucket];
        }
        s_prefix = prefix | (static_cast<uint32_t>(bucket) << shift);
        s_remaining = rem;
      }
      __syncthreads();
      prefix = s_prefix;
      remaining = s_remaining;
      pmask |= 255u << shift;
      __syncthreads();
    }
    thr = prefix;
    take_equal = remaining;
  }
  int64_t* out = idx + bh * kmax;
  long long written = 0, equal_seen = 0;
  for (int64_t base = 0; base < L; base += kThreads) {
    const int64_t tt = base + t;
    bool keep = false, eq = false;
    if (tt < L) {
      if (tt < sink_end || tt >= recent_start || keep_all) {
        keep = true;
      } else if (!keep_none) {
        const uint32_t key = order_key(row[tt]);
        keep = key > thr;
        eq = key == thr;
      }
    }
    int eq_total = 0, keep_total = 0;
    const int eq_before = block_scan(eq ? 1 : 0, &eq_total, warp_sums);
    if (eq && equal_seen + eq_before < take_equal) keep = true;
    const int keep_before = block_scan(keep ? 1 : 0, &keep_total, warp_sums);
    if (keep) out[written + keep_before] = tt;
    written += keep_total;
    equal_seen += eq_total;
  }
  for (int64_t r = n + t; r < kmax; r += kThreads) out[r] = -1;
}

template <typename U>
__global__ void gather_kernel(const char* src, char* dst, const int64_t* idx, int64_t T_, int64_t kmax,
                              int64_t row_units) {
  const int64_t tiles = (kmax + kThreads / 32 - 1) / (kThreads / 32);  // one grid axis: (head, row block)
  const int64_t bh = blockIdx.x / tiles;
  const int64_t r = static_cast<int64_t>(blockIdx.x % tiles) * (kThreads / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (r >= kmax) return;
  const int64_t s = idx[bh * kmax + r];
  U* d = reinterpret_cast<U*>(dst) + (bh * kmax + r) * row_units;
  if (s < 0) {
    for (int64_t u = lane; u < row_units; u += 32) d[u] = U{};
  } else {
    const U* from = reinterpret_cast<const U*>(src) + (bh * T_ + s) * row_units;
    for (int64_t u = lane; u < row_units; u += 32) d[u] = from[u];
  }
}

constexpr int kCompactLanes = 8;                          // units per row per block
constexpr int kCompactRows = kThreads / kCompactLanes;    // rows per step

template <typename U>
__global__ void compact_kernel(char* buf, const int64_t* idx, int64_t T_, int64_t kmax, int64_t row_units) {
  const int64_t bh = blockIdx.x;
  const int64_t col = static_cast<int64_t>(blockIdx.y) * kCompactLanes + threadIdx.x % kCompactLanes;
  const int rsub = threadIdx.x / kCompactLanes;
  U* base = reinterpret_cast<U*>(buf) + bh * T_ * row_units;
  for (int64_t r0 = 0; r0 < kmax; r0 += kCompactRows) {
    const int64_t r = r0 + rsub;
    const bool mine = r < kmax && col < row_units;
    U val{};
    if (mine) {
      const int64_t s = idx[bh * kmax + r];
      if (s >= 0) val = base[s * row_units + col];
    }
    __syncthreads();   // this step's sources are all read before any of its rows is written
    if (mine) base[r * row_units + col] = val;
    __syncthreads();
  }
}

template <typename T>
cudaError_t launch_colsum(const void* q, const void* k, int64_t B, int64_t Hq, int64_t Tq, int64_t D, int64_t H,
                          int64_t T_, const int64_t* lens, bool causal, float scale, float* stats, float* out,
                          cudaStream_t stream) {
  const float qscale = scale * kLog2e;
  const int64_t row_tiles = (Tq + kTile - 1) / kTile, key_tiles = (T_ + kTile - 1) / kTile;
  if (B * Hq * row_tiles > kMaxGridX || B * H * key_tiles > kMaxGridX) return cudaErrorInvalidValue;
  if (Tq > 0) {
    rowstats_kernel<T><<<static_cast<unsigned>(B * Hq * row_tiles), kThreads, 0, stream>>>(static_cast<const T*>(q), static_cast<const T*>(k), lens, stats, Hq, Tq, T_, D,
                                   Hq / H, qscale, causal);
  }
  colsum_kernel<T><<<static_cast<unsigned>(B * H * key_tiles), kThreads, 0, stream>>>(
      static_cast<const T*>(q), static_cast<const T*>(k), lens, stats, out, Hq, H, Tq, T_, D, Hq / H, qscale, causal);
  return cudaGetLastError();
}

bool aligned(const void* p, int64_t bytes) { return (reinterpret_cast<uintptr_t>(p) % bytes) == 0; }

// The grid of move_rows, or {0, 0} when it exceeds CUDA's limits (checked before any launch of the call).
dim3 move_grid(const char* src, const char* dst, int64_t row_bytes, int64_t BH, int64_t kmax, bool inplace) {
  const bool wide = row_bytes % 16 == 0 && aligned(src, 16) && (inplace || aligned(dst, 16));
  const bool word = row_bytes % 4 == 0 && aligned(src, 4) && (inplace || aligned(dst, 4));
  const int64_t units = row_bytes / (wide ? 16 : (word ? 4 : 2));
  const int64_t col_blocks = (units + kCompactLanes - 1) / kCompactLanes;
  const int64_t row_blocks = (kmax + kThreads / 32 - 1) / (kThreads / 32);
  if (inplace) {   // column slices sit on y: D-sized, not token-sized
    if (BH > kMaxGridX || col_blocks > 65535) return dim3(0, 0);
    return dim3(static_cast<unsigned>(BH), static_cast<unsigned>(col_blocks));
  }
  if (BH * row_blocks > kMaxGridX) return dim3(0, 0);
  return dim3(static_cast<unsigned>(BH * row_blocks));
}

cudaError_t move_rows(char* src, char* dst, int64_t row_bytes, const int64_t* idx, int64_t BH, int64_t T_,
                      int64_t kmax, bool inplace, cudaStream_t stream) {
  if (row_bytes == 0) return cudaSuccess;
  const bool wide = row_bytes % 16 == 0 && aligned(src, 16) && (inplace || aligned(dst, 16));
  const bool word = row_bytes % 4 == 0 && aligned(src, 4) && (inplace || aligned(dst, 4));
  const int64_t unit = wide ? 16 : (word ? 4 : 2);
  if (row_bytes % unit) return cudaErrorInvalidValue;   // rows are whole 2-byte elements
  const int64_t units = row_bytes / unit;
  const dim3 grid = move_grid(src, dst, row_bytes, BH, kmax, inplace);
  if (grid.x == 0) return cudaErrorInvalidValue;
  if (inplace) {
    if (wide) compact_kernel<uint4><<<grid, kThreads, 0, stream>>>(src, idx, T_, kmax, units);
    else if (word) compact_kernel<uint32_t><<<grid, kThreads, 0, stream>>>(src, idx, T_, kmax, units);
    else compact_kernel<uint16_t><<<grid, kThreads, 0, stream>>>(src, idx, T_, kmax, units);
  } else {
    if (wide) gather_kernel<uint4><<<grid, kThreads, 0, stream>>>(src, dst, idx, T_, kmax, units);
    else if (word) gather_kernel<uint32_t><<<grid, kThreads, 0, stream>>>(src, dst, idx, T_, kmax, units);
    else gather_kernel<uint16_t><<<grid, kThreads, 0, stream>>>(src, dst, idx, T_, kmax, units);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t vatp_colsum(const void* q, const void* k, VatpDType dtype, int64_t B, int64_t Hq, int64_t Tq, int64_t D,
                        int64_t H_kv, int64_t T, const int64_t* seq_lens, bool causal, float scale, float* row_stats,
                        float* out, cudaStream_t stream) {
  if (B < 0 || Hq < 0 || Tq < 0 || T < 0 || D < 1 || H_kv < 1 || Hq % H_kv) return cudaErrorInvalidValue;
  if (B == 0 || T == 0) return cudaSuccess;  // empty output
  if (!seq_lens || !out) return cudaErrorInvalidValue;
  // No query row at all (an empty q may have a null address): every column sum is 0.
  if (Hq == 0 || Tq == 0) return cudaMemsetAsync(out, 0, static_cast<size_t>(B * H_kv * T) * sizeof(float), stream);
  if (!q || !k || !row_stats) return cudaErrorInvalidValue;
  switch (dtype) {
    case VatpDType::f32:
      return launch_colsum<float>(q, k, B, Hq, Tq, D, H_kv, T, seq_lens, causal, scale, row_stats, out, stream);
    case VatpDType::f16:
      return launch_colsum<__half>(q, k, B, Hq, Tq, D, H_kv, T, seq_lens, causal, scale, row_stats, out, stream);
    case VatpDType::bf16:
      return launch_colsum<__nv_bfloat16>(q, k, B, Hq, Tq, D, H_kv, T, seq_lens, causal, scale, row_stats, out,
                                          stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t vatp_value_l1(const void* v, VatpDType dtype, int64_t rows, int64_t D, float* out, cudaStream_t stream) {
  if (rows < 0 || D < 0) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  if (!out || (D > 0 && !v)) return cudaErrorInvalidValue;
  const int64_t blocks = (rows * 32 + kThreads - 1) / kThreads;
  if (blocks > 0x7fffffff) return cudaErrorInvalidValue;
  switch (dtype) {
    case VatpDType::f32:
      l1_kernel<float><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(static_cast<const float*>(v), rows, D,
                                                                               out);
      break;
    case VatpDType::f16:
      l1_kernel<__half><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(static_cast<const __half*>(v), rows,
                                                                                D, out);
      break;
    case VatpDType::bf16:
      l1_kernel<__nv_bfloat16><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
          static_cast<const __nv_bfloat16*>(v), rows, D, out);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t vatp_prune(char* k, char* v, int64_t k_row_bytes, int64_t v_row_bytes, char* k_out, char* v_out,
                       int64_t B, int64_t H, int64_t T, const float* scores, const int64_t* seq_lens,
                       const int64_t* kept_lens, int64_t num_sink, int64_t num_recent, int64_t kmax,
                       int64_t* kept_idx, bool inplace, cudaStream_t stream) {
  if (B < 0 || H < 0 || T < 0 || kmax < 0 || num_sink < 0 || num_recent < 0 || k_row_bytes < 0 || v_row_bytes < 0)
    return cudaErrorInvalidValue;
  const int64_t BH = B * H;
  if (BH == 0 || kmax == 0) return cudaSuccess;
  if (!scores || !seq_lens || !kept_lens || !kept_idx || BH > 0x7fffffff) return cudaErrorInvalidValue;
  if ((k_row_bytes && !k) || (v_row_bytes && !v)) return cudaErrorInvalidValue;
  if (!inplace && ((k_row_bytes && !k_out) || (v_row_bytes && !v_out))) return cudaErrorInvalidValue;
  // the row movers' grids, checked before select_kernel runs (an error leaves nothing half done)
  if ((k_row_bytes && move_grid(k, k_out, k_row_bytes, BH, kmax, inplace).x == 0) ||
      (v_row_bytes && move_grid(v, v_out, v_row_bytes, BH, kmax, inplace).x == 0))
    return cudaErrorInvalidValue;
  select_kernel<<<static_cast<unsigned>(BH), kThreads, 0, stream>>>(scores, seq_lens, kept_lens, H, T, kmax, num_sink,
                                                                     num_recent, kept_idx);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  err = move_rows(k, k_out, k_row_bytes, kept_idx, BH, T, kmax, inplace, stream);
  if (err != cudaSuccess) return err;
  return move_rows(v, v_out, v_row_bytes, kept_idx, BH, T, kmax, inplace, stream);
}

}  // namespace cuda
}  // namespace vkern
