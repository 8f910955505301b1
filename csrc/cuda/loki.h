// Loki decode attention (SPEC section 2), CUDA: raw device pointers, sizes,
// strides and a stream; nothing here knows about Python or torch.
#pragma once
#include <cstdint>
#include <cuda_runtime_api.h>

namespace vkern {
namespace cuda {
namespace loki {

// One decode step in at most three launches, each covering the whole batch
// and every head:
//   approximate scores  (sparse only) scores[B, NL, T] from the first `rank`
//                       dims, NL = H_kv (shared: the group's queries summed) or Hq
//   selection           (sparse only) idx[B, NL, K] int32: sinks, the best
//                       `budget - forced` middle positions (ties to the lower
//                       position, NaN last), recent; ascending, -1 padded
//   gather-attention    split over the kept tokens into `nsplit` parts; the last
//                       part of a head to finish merges the partials (counter)
// q: float32 [B, Hq, D] contiguous. k, v: [B, H_kv, T, D] in `kv_dtype` (0 f32,
// 1 f16, 2 bf16), element strides (sb, sh, st), unit last stride. lens,
// budgets: int64 [B] (budgets == nullptr: dense decode over every valid token).
// ws: float32 [B * Hq * nsplit * (D + 2)], count: int32 [B * Hq] zeroed.
// out: float32 [B, Hq, D]. Requires 1 <= D <= 256. Asynchronous on `stream`.
struct Args {
  const float* q;
  int64_t B, Hq, H_kv, T, D;
  const void* k;
  const void* v;
  int kv_dtype;
  int64_t k_sb, k_sh, k_st, v_sb, v_sh, v_st;
  const void* kp;  // optional key prefix [B, H_kv, T, >= rank] for the approximate pass (nullptr: k)
  int64_t kp_sb, kp_sh, kp_st;
  const int64_t* lens;
  const int64_t* budgets;
  int64_t rank, num_sink, num_recent;
  bool shared;
  float scale;
  float* scores;
  int32_t* idx;
  int64_t K;
  int nsplit;
  float* ws;
  int32_t* count;
  float* out;
};

cudaError_t attention(const Args& a, cudaStream_t stream);

// Number of splits over the kept tokens that fills the GPU for this shape.
int splits_for(int64_t B, int64_t Hq, int64_t K);

// out[r, h, :] = x[r, h, :] @ P[h / (H / H_kv)], x [rows, H, D] (element
// strides x_sr, x_sh, unit last) in `dtype`, P float32 [H_kv, D, D], out float32.
cudaError_t rotate(const void* x, int dtype, int64_t rows, int64_t H, int64_t D, int64_t x_sr, int64_t x_sh,
                   const float* P, int64_t H_kv, float* out, cudaStream_t stream);

}  // namespace loki
}  // namespace cuda
}  // namespace vkern
