// int8-document MaxSim, CUDA (definition: python/vkern/reference/maxsim_int8.py): raw device
// pointers, sizes and a stream; nothing here knows about Python or torch.
#pragma once
#include <cstdint>
#include <cuda_runtime_api.h>

namespace vkern {
namespace cuda {

// score[b, n] = sum over i < query_lengths[b] of q_scales[b, i] * max over doc tokens j in
// [doc_offsets[n], doc_offsets[n+1]) of (doc_scales[j] * <q_codes[b, i], codes[j]>)
//   q_codes        int8 [B, Lq, D] contiguous (device)
//   q_scales       float32 [B, Lq] (device)
//   query_lengths  int32 [B] (device), clamped into 0..Lq
//   codes          int8 [T, D], row j at codes + j * row_stride (row_stride >= D) (device)
//   doc_scales     float32 [T] (device); doc_offsets int64 [N+1] (device), validated by the caller
//   scores         float32 [B, N] output (device)
// Integer dots are exact (int32; D <= 131072 with |q| <= 127, |c| <= 127), then scaled in float32.
// An empty document scores -inf; a length-0 query scores 0 on a non-empty document. Requires
// sm_72+ (int8 tensor cores); asynchronous on `stream`; returns cudaErrorInvalidValue for bad
// sizes / null pointers, else the launch error. Never synchronizes.
cudaError_t maxsim_int8_scores(const int8_t* q_codes, const float* q_scales, int64_t B, int64_t Lq, int64_t D,
                               const int32_t* query_lengths, const int8_t* codes, int64_t row_stride,
                               const float* doc_scales, const int64_t* doc_offsets, int64_t N, float* scores,
                               cudaStream_t stream);

}  // namespace cuda
}  // namespace vkern
