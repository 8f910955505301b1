// Differentiable MaxSim, CUDA: the forward that keeps the argmax and the backward scatter.
// Raw device pointers, sizes and a stream; nothing here knows about Python or torch.
#pragma once
#include <cstdint>
#include <cuda_runtime_api.h>

#include "cuda/maxsim.h"  // DType

namespace vkern {
namespace cuda {

// Document n is rows [doc_starts[n], doc_starts[n] + doc_lens[n]) of docs [rows, D] (row-major,
// contiguous): packed documents and padded [N, Ld, D] ones (starts n * Ld) are both read in place.
//
// scores[b, n] as maxsim_scores gives them, and argmax[b, n, i] = the index within document n of
// the token holding the max for query token i (the lower index on exact ties, the first NaN if
// any), for i < query_lengths[b] and non-empty documents; other entries are left untouched (the
// caller fills argmax with -1 first). doc_mask (uint8 [rows], nullptr = none): a masked token's
// similarity is exactly 0 (it still takes part in the max) and an argmax on it is written -1.
//   queries [B, Lq, D] and docs of one dtype; query_lengths int32 [B] (clamped into 0..Lq);
//   doc_starts, doc_lens int64 [N]. Products and sums in float32; the per-query sums run in
//   token order (deterministic). Asynchronous on `stream`; returns the launch error.
cudaError_t maxsim_argmax(const void* queries, const void* docs, DType dtype, int64_t B, int64_t Lq, int64_t D,
                          const int32_t* query_lengths, const int64_t* doc_starts, const int64_t* doc_lens,
                          const uint8_t* doc_mask, int64_t N, float* scores, int32_t* argmax,
                          cudaStream_t stream);

// Gradients of sum(grad * scores) from the argmax (entries < 0 pass nothing), float32:
//   grad_q [B, Lq, D] (nullptr: not wanted) = sum_n grad[b, n] * docs[doc_starts[n] + argmax[b, n, i]]
//   grad_d [rows, D]  (nullptr: not wanted, else zeroed by the caller):
//       row doc_starts[n] + argmax[b, n, i] += grad[b, n] * queries[b, i]
// queries and docs may have different dtypes. No atomics: one thread block owns one query row
// (grad_q) or one document's rows (grad_d) and adds in a fixed order, so results are
// bit-reproducible. grad float32 [B, N], argmax int32 [B, N, Lq]. Asynchronous on `stream`.
cudaError_t maxsim_backward(const float* grad, const int32_t* argmax, const void* queries, DType q_dtype,
                            const void* docs, DType d_dtype, int64_t B, int64_t Lq, int64_t D,
                            const int64_t* doc_starts, int64_t N, float* grad_q, float* grad_d,
                            cudaStream_t stream);

}  // namespace cuda
}  // namespace vkern
