// Loki decode attention, CUDA (see loki.h for the contract).
//
// approx_kernel: one thread per key row, reading only the row's first `rank`
//   elements against the list's (summed) query prefix held in shared memory.
//   Rows on grid.x; the selection lists (B * NL, data-sized) are walked by a
//   loop over grid.y, which is capped at 65,535.
// select_kernel: one block per selection list. An 8-bit radix select over
//   order-preserving keys (4 histogram passes in shared memory) finds the k-th
//   best key; one ordered pass with block-wide prefix sums then writes the kept
//   positions ascending, the first `ties` positions equal to it included. No sort.
// attend_kernel: one block per (head, split); each warp walks kept rows (lanes
//   across D), online softmax in float32; warps merge in shared memory, splits
//   merge in the last block to finish (threadfence + atomic counter).
#include "loki.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace vkern {
namespace cuda {
namespace loki {
namespace {

constexpr int kSelectThreads = 1024;
constexpr int kAttendWarps = 4;
constexpr int kMaxDPerLane = 8;  // D <= 256
constexpr int64_t kMaxGridX = 0x7fffffff;  // CUDA's grid limits
constexpr int64_t kMaxGridYZ = 65535;

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }

__device__ __forceinline__ uint32_t sort_key(float f) {
  if (f != f) return 0u;
  if (f == 0.0f) f = 0.0f;
  const uint32_t b = __float_as_uint(f);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

template <typename T>
__global__ void approx_kernel(const float* __restrict__ q, const T* __restrict__ k, const int64_t* __restrict__ lens,
                              float* __restrict__ scores, int64_t T_len, int64_t Hq, int64_t G, int64_t NL,
                              int64_t n_lists, int64_t heads_per_list, int64_t D, int64_t rank, int64_t sb,
                              int64_t sh, int64_t st) {
  extern __shared__ float qs[];
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  for (int64_t list = blockIdx.y; list < n_lists; list += gridDim.y) {
    const int64_t b = list / NL, l = list % NL;
    const int64_t head0 = l * heads_per_list, kv = head0 / G;
    for (int64_t d = threadIdx.x; d < rank; d += blockDim.x) {
      float s = 0.0f;
      for (int64_t g = 0; g < heads_per_list; ++g) s += q[(b * Hq + head0 + g) * D + d];
      qs[d] = s;
    }
    __syncthreads();
    if (t < lens[b]) {
      const T* row = k + b * sb + kv * sh + t * st;
      float acc = 0.0f;
      for (int64_t d = 0; d < rank; ++d) acc = fmaf(qs[d], to_f(row[d]), acc);
      scores[list * T_len + t] = acc;
    }
    __syncthreads();  // every thread has read qs before the next list overwrites it
  }
}

// Exclusive prefix sum of v over the block; *total gets the block sum.
__device__ __forceinline__ int block_scan(int v, int* total, int* warp_sums) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  int x = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int y = __shfl_up_sync(0xffffffffu, x, o);
    if (lane >= o) x += y;
  }
  if (lane == 31) warp_sums[warp] = x;
  __syncthreads();
  if (warp == 0) {
    int w = lane < nwarps ? warp_sums[lane] : 0;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int y = __shfl_up_sync(0xffffffffu, w, o);
      if (lane >= o) w += y;
    }
    if (lane < nwarps) warp_sums[lane] = w;  // inclusive
  }
  __syncthreads();
  const int before = warp > 0 ? warp_sums[warp - 1] : 0;
  *total = warp_sums[nwarps - 1];
  __syncthreads();
  return before + x - v;
}

__global__ void select_kernel(const float* __restrict__ scores, const int64_t* __restrict__ lens,
                              const int64_t* __restrict__ budgets, int32_t* __restrict__ idx, int64_t T_len,
                              int64_t NL, int64_t K, int64_t num_sink, int64_t num_recent) {
  __shared__ unsigned hist[256];
  __shared__ uint32_t s_prefix;
  __shared__ long long s_remaining;
  __shared__ int warp_sums[32];
  const int64_t list = blockIdx.x, b = list / NL;
  const int64_t L = lens[b];
  const int64_t budget = budgets[b] < L ? budgets[b] : L;
  const bool keep_all = budget >= L;
  const int64_t lo = keep_all ? L : (num_sink < L ? num_sink : L);
  const int64_t hi = keep_all ? L : (L - num_recent > lo ? L - num_recent : lo);
  const int64_t need = keep_all ? 0 : budget - lo - (L - hi);
  const float* row = scores + list * T_len;
  int32_t* out = idx + list * K;
  for (int64_t p = threadIdx.x; p < K; p += blockDim.x) out[p] = p < lo ? static_cast<int32_t>(p) : -1;
  __syncthreads();  // the padding is written before the recent and selected slots overwrite it
  if (keep_all) return;
  for (int64_t p = hi + threadIdx.x; p < L; p += blockDim.x) out[lo + need + (p - hi)] = static_cast<int32_t>(p);
  if (need <= 0) return;

  uint32_t prefix = 0, mask = 0;
  long long remaining = need;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0;
    __syncthreads();
    for (int64_t p = lo + threadIdx.x; p < hi; p += blockDim.x) {
      const uint32_t key = sort_key(row[p]);
      if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 255u], 1u);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      int bin = 255;
      for (; bin > 0; --bin) {
        if (static_cast<long long>(hist[bin]) >= remaining) break;
        remaining -= hist[bin];
      }
      s_prefix = prefix | (static_cast<uint32_t>(bin) << shift);
      s_remaining = remaining;
    }
    __syncthreads();
    prefix = s_prefix;
    remaining = s_remaining;
    mask |= 255u << shift;
    __syncthreads();
  }
  const uint32_t t = prefix;
  const long long ties = remaining;
  long long written = 0, eq_seen = 0;
  for (int64_t base = lo; base < hi; base += blockDim.x) {
    const int64_t p = base + threadIdx.x;
    const bool ok = p < hi;
    const uint32_t key = ok ? sort_key(row[p]) : 0u;
    const int eq = ok && key == t;
    int eq_total, take_total;
    const int eq_rank = block_scan(eq, &eq_total, warp_sums);
    const int take = (ok && key > t) || (eq && eq_seen + eq_rank < ties);
    const int slot = block_scan(take, &take_total, warp_sums);
    if (take) out[lo + written + slot] = static_cast<int32_t>(p);
    written += take_total;
    eq_seen += eq_total;
  }
}

template <typename T>
__global__ void attend_kernel(const float* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                              const int64_t* __restrict__ lens, const int64_t* __restrict__ budgets,
                              const int32_t* __restrict__ idx, float* __restrict__ ws, int32_t* __restrict__ count,
                              float* __restrict__ out, int64_t Hq, int64_t G, int64_t heads_per_list, int64_t K,
                              int64_t D, float scale, int64_t chunk, int nsplit, int64_t k_sb, int64_t k_sh,
                              int64_t k_st, int64_t v_sb, int64_t v_sh, int64_t v_st) {
  __shared__ float s_m[kAttendWarps], s_l[kAttendWarps];
  __shared__ float s_acc[kAttendWarps][32 * kMaxDPerLane];
  __shared__ bool s_last;
  const int64_t bh = blockIdx.x;
  const int split = blockIdx.y;
  const int64_t b = bh / Hq, h = bh % Hq, kv = h / G;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t L = lens[b];
  const int64_t n = budgets ? (budgets[b] < L ? budgets[b] : L) : L;
  const int32_t* list = budgets ? idx + (b * (Hq / heads_per_list) + h / heads_per_list) * K : nullptr;
  float qr[kMaxDPerLane], acc[kMaxDPerLane];
#pragma unroll
  for (int j = 0; j < kMaxDPerLane; ++j) {
    const int64_t d = lane + 32 * j;
    qr[j] = d < D ? q[bh * D + d] : 0.0f;
    acc[j] = 0.0f;
  }
  float m = -INFINITY, l = 0.0f;
  const int64_t start = split * chunk;
  const int64_t stop = start + chunk < n ? start + chunk : n;
  const T* kbase = k + b * k_sb + kv * k_sh;
  const T* vbase = v + b * v_sb + kv * v_sh;
  for (int64_t i = start + warp; i < stop; i += kAttendWarps) {
    const int64_t r = list ? list[i] : i;
    const T* krow = kbase + r * k_st;
    float s = 0.0f;
#pragma unroll
    for (int j = 0; j < kMaxDPerLane; ++j) {
      const int64_t d = lane + 32 * j;
      if (d < D) s = fmaf(qr[j], to_f(krow[d]), s);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    s *= scale;
    const float m_new = fmaxf(m, s);
    const float alpha = m == -INFINITY ? 0.0f : __expf(m - m_new);
    const float p = __expf(s - m_new);
    const T* vrow = vbase + r * v_st;
#pragma unroll
    for (int j = 0; j < kMaxDPerLane; ++j) {
      const int64_t d = lane + 32 * j;
      if (d < D) acc[j] = acc[j] * alpha + p * to_f(vrow[d]);
    }
    l = l * alpha + p;
    m = m_new;
  }
  // merge the warps
  if (lane == 0) {
    s_m[warp] = m;
    s_l[warp] = l;
  }
#pragma unroll
  for (int j = 0; j < kMaxDPerLane; ++j) s_acc[warp][lane + 32 * j] = acc[j];
  __syncthreads();
  float* part = ws + (bh * nsplit + split) * (D + 2);
  if (warp == 0) {
    float mt = -INFINITY;
    for (int w = 0; w < kAttendWarps; ++w) mt = fmaxf(mt, s_m[w]);
    float lt = 0.0f, tot[kMaxDPerLane];
#pragma unroll
    for (int j = 0; j < kMaxDPerLane; ++j) tot[j] = 0.0f;
    for (int w = 0; w < kAttendWarps; ++w) {
      const float f = s_m[w] == -INFINITY ? 0.0f : __expf(s_m[w] - mt);
      lt += f * s_l[w];
#pragma unroll
      for (int j = 0; j < kMaxDPerLane; ++j) tot[j] += f * s_acc[w][lane + 32 * j];
    }
    if (nsplit == 1) {
#pragma unroll
      for (int j = 0; j < kMaxDPerLane; ++j)
        if (lane + 32 * j < D) out[bh * D + lane + 32 * j] = tot[j] / lt;
    } else {
#pragma unroll
      for (int j = 0; j < kMaxDPerLane; ++j)
        if (lane + 32 * j < D) part[lane + 32 * j] = tot[j];
      if (lane == 0) {
        part[D] = mt;
        part[D + 1] = lt;
      }
      __threadfence();
    }
  }
  if (nsplit == 1) return;
  __syncthreads();
  if (threadIdx.x == 0) s_last = atomicAdd(count + bh, 1) == nsplit - 1;
  __syncthreads();
  if (!s_last || warp != 0) return;
  __threadfence();
  const volatile float* all = ws + bh * nsplit * (D + 2);
  float mt = -INFINITY;
  for (int sp = 0; sp < nsplit; ++sp) mt = fmaxf(mt, all[sp * (D + 2) + D]);
  float lt = 0.0f, tot[kMaxDPerLane];
#pragma unroll
  for (int j = 0; j < kMaxDPerLane; ++j) tot[j] = 0.0f;
  for (int sp = 0; sp < nsplit; ++sp) {
    const float ms = all[sp * (D + 2) + D];
    const float f = ms == -INFINITY ? 0.0f : __expf(ms - mt);
    lt += f * all[sp * (D + 2) + D + 1];
#pragma unroll
    for (int j = 0; j < kMaxDPerLane; ++j)
      if (lane + 32 * j < D) tot[j] += f * all[sp * (D + 2) + lane + 32 * j];
  }
#pragma unroll
  for (int j = 0; j < kMaxDPerLane; ++j)
    if (lane + 32 * j < D) out[bh * D + lane + 32 * j] = tot[j] / lt;
}

template <typename T>
__global__ void rotate_kernel(const T* __restrict__ x, const float* __restrict__ P, float* __restrict__ out,
                              int64_t H, int64_t G, int64_t D, int64_t x_sr, int64_t x_sh) {
  extern __shared__ float xs[];
  const int64_t item = blockIdx.x, r = item / H, h = item % H;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) xs[d] = to_f(x[r * x_sr + h * x_sh + d]);
  __syncthreads();
  const float* Ph = P + (h / G) * D * D;
  for (int64_t e = threadIdx.x; e < D; e += blockDim.x) {
    float acc = 0.0f;
    for (int64_t d = 0; d < D; ++d) acc = fmaf(xs[d], Ph[d * D + e], acc);
    out[item * D + e] = acc;
  }
}

template <typename T>
cudaError_t launch(const Args& a, cudaStream_t stream) {
  const int64_t G = a.Hq / a.H_kv;
  const int64_t hpl = a.shared ? G : 1;
  const int64_t NL = a.Hq / hpl;
  const T* k = static_cast<const T*>(a.k);
  const T* v = static_cast<const T*>(a.v);
  if (a.budgets) {
    const int threads = 256;
    const int64_t lists = a.B * NL;
    dim3 grid(static_cast<unsigned>((a.T + threads - 1) / threads),
              static_cast<unsigned>(lists < kMaxGridYZ ? lists : kMaxGridYZ));
    const bool pre = a.kp != nullptr;
    const T* ka = pre ? static_cast<const T*>(a.kp) : k;
    approx_kernel<T><<<grid, threads, a.rank * sizeof(float), stream>>>(
        a.q, ka, a.lens, a.scores, a.T, a.Hq, G, NL, lists, hpl, a.D, a.rank, pre ? a.kp_sb : a.k_sb,
        pre ? a.kp_sh : a.k_sh, pre ? a.kp_st : a.k_st);
    select_kernel<<<static_cast<unsigned>(a.B * NL), kSelectThreads, 0, stream>>>(
        a.scores, a.lens, a.budgets, a.idx, a.T, NL, a.K, a.num_sink, a.num_recent);
  }
  const int64_t chunk = (a.K + a.nsplit - 1) / a.nsplit;
  dim3 grid(static_cast<unsigned>(a.B * a.Hq), static_cast<unsigned>(a.nsplit));
  attend_kernel<T><<<grid, 32 * kAttendWarps, 0, stream>>>(a.q, k, v, a.lens, a.budgets, a.idx, a.ws, a.count, a.out,
                                                           a.Hq, G, hpl, a.K, a.D, a.scale, chunk, a.nsplit, a.k_sb,
                                                           a.k_sh, a.k_st, a.v_sb, a.v_sh, a.v_st);
  return cudaGetLastError();
}

}  // namespace

int splits_for(int64_t B, int64_t Hq, int64_t K) {
  const int64_t heads = B * Hq > 0 ? B * Hq : 1;
  int64_t s = 264 / heads;                 // about two blocks per SM on a 132-SM GPU
  const int64_t by_work = (K + 127) / 128;  // at least 128 kept rows per split
  if (s > by_work) s = by_work;
  if (s > 64) s = 64;
  return s < 1 ? 1 : static_cast<int>(s);
}

cudaError_t attention(const Args& a, cudaStream_t stream) {
  if (a.B == 0) return cudaSuccess;
  if (a.D < 1 || a.D > 32 * kMaxDPerLane || a.H_kv < 1 || a.Hq % a.H_kv || a.nsplit < 1 || !a.q || !a.k || !a.v ||
      !a.lens || !a.out || !a.ws || !a.count || (a.budgets && (!a.scores || !a.idx || a.rank < 1 || a.rank > a.D)))
    return cudaErrorInvalidValue;
  // Every grid of the call is checked before the first launch: x carries heads (B * Hq >= B * NL) and
  // row blocks, y only the splits (<= 64) or a capped count that the approximate kernel loops over.
  if (a.B * a.Hq > kMaxGridX || (a.T + 255) / 256 > kMaxGridX || a.nsplit > kMaxGridYZ) return cudaErrorInvalidValue;
  switch (a.kv_dtype) {
    case 0: return launch<float>(a, stream);
    case 1: return launch<__half>(a, stream);
    case 2: return launch<__nv_bfloat16>(a, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t rotate(const void* x, int dtype, int64_t rows, int64_t H, int64_t D, int64_t x_sr, int64_t x_sh,
                   const float* P, int64_t H_kv, float* out, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  if (D < 1 || H_kv < 1 || H % H_kv || !x || !P || !out || rows * H > kMaxGridX) return cudaErrorInvalidValue;
  const unsigned blocks = static_cast<unsigned>(rows * H);
  const int threads = D < 256 ? static_cast<int>((D + 31) / 32 * 32) : 256;
  const size_t shm = D * sizeof(float);
  const int64_t G = H / H_kv;
  switch (dtype) {
    case 0:
      rotate_kernel<float><<<blocks, threads, shm, stream>>>(static_cast<const float*>(x), P, out, H, G, D, x_sr, x_sh);
      break;
    case 1:
      rotate_kernel<__half><<<blocks, threads, shm, stream>>>(static_cast<const __half*>(x), P, out, H, G, D, x_sr,
                                                              x_sh);
      break;
    case 2:
      rotate_kernel<__nv_bfloat16><<<blocks, threads, shm, stream>>>(static_cast<const __nv_bfloat16*>(x), P, out, H,
                                                                     G, D, x_sr, x_sh);
      break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace loki
}  // namespace cuda
}  // namespace vkern
