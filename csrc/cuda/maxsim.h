// MaxSim (ColBERT late interaction) CUDA kernels: raw device pointers, sizes
// and a stream; nothing here knows about Python or torch.
#pragma once
#include <cstdint>
#include <cuda_runtime_api.h>

namespace vkern {
namespace cuda {

enum class DType : int { f32 = 0, f16 = 1, bf16 = 2 };

// score[b, n] = sum over i < query_lengths[b] of max over doc tokens j in
// [doc_offsets[n], doc_offsets[n+1]) of <queries[b, i], docs[j]>, with every
// product and sum in float32 whatever the input dtype.
//   queries        [B, Lq, D] contiguous, row-major (device)
//   docs           [T, D]     contiguous, row-major, same dtype (device)
//   query_lengths  int32 [B], each in 0..Lq (device); nullptr = all Lq valid.
//                  Values outside 0..Lq are clamped into it (never read out of bounds).
//   doc_offsets    int64 [N+1] (device), validated by the caller: starts at 0,
//                  non-decreasing, ends at T.
//   scores         float32 [B, N] output (device).
// An empty document scores -inf (even for a length-0 query); a length-0 query
// scores 0 on a non-empty document; NaN in a participating token makes the
// affected maxima (and so the score) NaN. Runs asynchronously on `stream`;
// returns cudaErrorInvalidValue for bad sizes / null pointers, else the launch
// error (cudaGetLastError after the launch). Never synchronizes.
cudaError_t maxsim_scores(const void* queries, const void* docs, DType dtype, int64_t B, int64_t Lq,
                          int64_t D, const int32_t* query_lengths, const int64_t* doc_offsets,
                          int64_t N, float* scores, cudaStream_t stream);

// Top-k of each row of scores [B, N] (device, float32): out_scores [B, k] and
// out_idx int64 [B, k] (device), best first; ties go to the lower index; NaN
// ranks below -inf (last), NaNs among themselves by index. -0.0 equals +0.0.
// Requires 1 <= k <= N and N < 2^32 (else cudaErrorInvalidValue). The outputs
// must not overlap `scores`. One thread block per row; asynchronous on `stream`.
cudaError_t topk_rows(const float* scores, int64_t B, int64_t N, int64_t k, float* out_scores,
                      int64_t* out_idx, cudaStream_t stream);

// Writes the virtual architectures this file was compiled for (nvcc's
// __CUDA_ARCH_LIST__ style: 800 = compute_80, 900 = compute_90), at most `cap`
// of them, into `out`; returns how many were written (0 if unknown).
int compiled_arch_list(int* out, int cap);

}  // namespace cuda
}  // namespace vkern
