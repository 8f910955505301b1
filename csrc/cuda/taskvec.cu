// Quantized task-vector CUDA kernels. Components travel by value in the kernel
// parameters (at most kMaxComps), so a launch needs no host->device copy of
// metadata. Values are formed with explicit round-to-nearest intrinsics so the
// compiler cannot fuse them into FMAs: a dequantized value is the same float32
// here as in the NumPy reference, which the TIES trim thresholds rely on.
#include "cuda/taskvec.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace vkern {
namespace cuda {
namespace {

struct Params {
  TvCompDev comps[kMaxComps];
  int task_start[kMaxComps + 1];  // components of task t: [task_start[t], task_start[t+1])
  float task_coef[kMaxComps];
  float thr[kMaxComps];
  long long cut[kMaxComps];
  int C, T, method, trim;
};

__device__ __forceinline__ float load_f(const void* p, int dtype, int64_t i) {
  if (dtype == 0) return static_cast<const float*>(p)[i];
  if (dtype == 1) return __half2float(static_cast<const __half*>(p)[i]);
  return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
}

__device__ __forceinline__ void store_f(void* p, int dtype, int64_t i, float v) {
  if (dtype == 0) static_cast<float*>(p)[i] = v;
  else if (dtype == 1) static_cast<__half*>(p)[i] = __float2half_rn(v);
  else static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v);
}

__device__ __forceinline__ float value_at(const TvCompDev& c, int64_t n, int64_t k) {
  const int64_t bitpos = k * c.bits;
  const uint8_t* row = c.codes + n * c.row_bytes;
  const int sh = static_cast<int>(bitpos & 7);
  unsigned v = row[bitpos >> 3];
  if (sh + c.bits > 8) v |= static_cast<unsigned>(row[(bitpos >> 3) + 1]) << 8;
  const unsigned code = (v >> sh) & ((1u << c.bits) - 1u);
  const int64_t sidx = (c.per_row ? n * c.n_groups : 0) + k / c.group_size;
  const float s = c.scales[sidx];
  if (c.scheme == 1) return code ? s : -s;
  return __fmul_rn(static_cast<float>(static_cast<int>(code) - static_cast<int>(c.zeros[sidx])), s);
}

__device__ __forceinline__ float task_value(const Params& p, int t, int64_t n, int64_t k, int64_t K) {
  float v = 0.0f;
  for (int c = p.task_start[t]; c < p.task_start[t + 1]; ++c) v = __fadd_rn(v, value_at(p.comps[c], n, k));
  if (p.trim) {
    const float a = fabsf(v);
    if (!(a > p.thr[t] || (a == p.thr[t] && n * K + k <= p.cut[t]))) v = 0.0f;
  }
  return v;
}

__global__ void apply_kernel(const void* base, int dtype, int64_t N, int64_t K, void* out, const Params p) {
  const int64_t total = N * K;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = i / K, k = i - n * K;
    float acc = load_f(base, dtype, i);
    if (p.method == 0 && !p.trim) {
      for (int c = 0; c < p.C; ++c) acc = fmaf(p.comps[c].coef, value_at(p.comps[c], n, k), acc);
    } else if (p.method == 0) {
      for (int t = 0; t < p.T; ++t) acc = fmaf(p.task_coef[t], task_value(p, t, n, k, K), acc);
    } else {
      float total_w = 0.0f;
      for (int t = 0; t < p.T; ++t) total_w += p.task_coef[t] * task_value(p, t, n, k, K);
      const bool positive = total_w >= 0.0f;
      float num = 0.0f, den = 0.0f;
      for (int t = 0; t < p.T; ++t) {
        const float w = p.task_coef[t] * task_value(p, t, n, k, K);
        if (positive ? (w > 0.0f) : (w < 0.0f)) {
          num += w;
          den += p.task_coef[t];
        }
      }
      acc += num / (den == 0.0f ? 1.0f : den);
    }
    store_f(out, dtype, i, acc);
  }
}

__global__ void dequant_kernel(int64_t N, int64_t K, float* out, const Params p) {
  const int64_t total = N * K;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = i / K, k = i - n * K;
    float v = 0.0f;
    for (int c = 0; c < p.C; ++c) v = __fadd_rn(v, value_at(p.comps[c], n, k));
    out[i] = v;
  }
}

constexpr int kRowsPerWarp = 8;

// One warp per (output column n, block of 8 rows of x): lanes stride over K,
// each forming base[n, k] plus the delta of every row's task on the fly, then
// a warp reduction. No dense delta exists anywhere.
__global__ void delta_kernel(const float* x, int64_t M, int64_t K, const void* base, int dtype, int64_t N,
                             const int64_t* task_ids, float* y, const Params p) {
  const int lane = threadIdx.x & 31;
  const int64_t warp = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) >> 5;
  const int64_t mblocks = (M + kRowsPerWarp - 1) / kRowsPerWarp;
  if (warp >= N * mblocks) return;
  const int64_t n = warp / mblocks, m0 = (warp % mblocks) * kRowsPerWarp;
  int tid[kRowsPerWarp];
  float part[kRowsPerWarp];
  for (int r = 0; r < kRowsPerWarp; ++r) {
    part[r] = 0.0f;
    tid[r] = (m0 + r < M && task_ids != nullptr) ? static_cast<int>(task_ids[m0 + r]) : -1;
  }
  for (int64_t k = lane; k < K; k += 32) {
    float w = load_f(base, dtype, n * K + k);
    if (task_ids == nullptr) {
      for (int c = 0; c < p.C; ++c) w = fmaf(p.comps[c].coef, value_at(p.comps[c], n, k), w);
    }
    for (int r = 0; r < kRowsPerWarp; ++r) {
      if (m0 + r >= M) break;
      float wr = w;
      if (tid[r] >= 0) {
        const int t = tid[r];
        for (int c = p.task_start[t]; c < p.task_start[t + 1]; ++c)
          wr = fmaf(p.comps[c].coef, value_at(p.comps[c], n, k), wr);
      }
      part[r] = fmaf(x[(m0 + r) * K + k], wr, part[r]);
    }
  }
  for (int r = 0; r < kRowsPerWarp; ++r) {
    float v = part[r];
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
    if (lane == 0 && m0 + r < M) y[(m0 + r) * N + n] = v;
  }
}

cudaError_t make_params(const TvCompDev* comps, int64_t C, int64_t T, Params* p) {
  if (C < 0 || C > kMaxComps || T < 0 || T > kMaxComps) return cudaErrorInvalidValue;
  p->C = static_cast<int>(C);
  p->T = static_cast<int>(T);
  p->method = 0;
  p->trim = 0;
  for (int64_t t = 0; t <= T; ++t) {  // components come in task order
    int before = 0;
    for (int64_t c = 0; c < C; ++c) before += comps[c].task < t;
    p->task_start[t] = before;
  }
  for (int64_t i = 0; i < C; ++i) p->comps[i] = comps[i];
  return cudaSuccess;
}

unsigned blocks_for(int64_t total, int threads) {
  const int64_t b = (total + threads - 1) / threads;
  return static_cast<unsigned>(b < 65535 ? (b < 1 ? 1 : b) : 65535);
}

}  // namespace

cudaError_t taskvec_apply(const void* base, int dtype, int64_t N, int64_t K, void* out, const TvCompDev* comps,
                          int64_t C, int64_t T, int method, const float* task_coef, const float* thr,
                          const int64_t* cut, cudaStream_t stream) {
  Params p;
  cudaError_t err = make_params(comps, C, T, &p);
  if (err != cudaSuccess) return err;
  p.method = method;
  p.trim = thr != nullptr;
  for (int64_t t = 0; t < T; ++t) {
    p.task_coef[t] = task_coef[t];
    p.thr[t] = thr ? thr[t] : 0.0f;
    p.cut[t] = cut ? cut[t] : -1;
  }
  if (N * K == 0) return cudaSuccess;
  apply_kernel<<<blocks_for(N * K, 256), 256, 0, stream>>>(base, dtype, N, K, out, p);
  return cudaGetLastError();
}

cudaError_t taskvec_delta_linear(const float* x, int64_t M, int64_t K, const void* base, int dtype, int64_t N,
                                 const TvCompDev* comps, int64_t C, const int64_t* task_ids, float* y,
                                 cudaStream_t stream) {
  int64_t T = 0;
  for (int64_t c = 0; c < C; ++c) T = comps[c].task + 1 > T ? comps[c].task + 1 : T;
  Params p;
  cudaError_t err = make_params(comps, C, T, &p);
  if (err != cudaSuccess) return err;
  if (M * N == 0) return cudaSuccess;
  const int64_t warps = N * ((M + kRowsPerWarp - 1) / kRowsPerWarp);
  const int64_t blocks = (warps * 32 + 255) / 256;
  if (blocks > 0x7fffffff) return cudaErrorInvalidValue;
  delta_kernel<<<static_cast<unsigned>(blocks), 256, 0, stream>>>(x, M, K, base, dtype, N, task_ids, y, p);
  return cudaGetLastError();
}

cudaError_t taskvec_dequantize(const TvCompDev* comps, int64_t C, int64_t N, int64_t K, float* out,
                               cudaStream_t stream) {
  Params p;
  cudaError_t err = make_params(comps, C, 1, &p);
  if (err != cudaSuccess) return err;
  if (N * K == 0) return cudaSuccess;
  dequant_kernel<<<blocks_for(N * K, 256), 256, 0, stream>>>(N, K, out, p);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace vkern
