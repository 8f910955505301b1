// VATP CUDA kernels (SPEC section 3): raw device pointers, sizes and a
// stream; nothing here knows about Python or torch. Every function runs
// asynchronously on `stream`, never synchronizes, and returns
// cudaErrorInvalidValue for bad sizes / null pointers, else the launch error.
#pragma once
#include <cstdint>
#include <cuda_runtime_api.h>

namespace vkern {
namespace cuda {

enum class VatpDType : int { f32 = 0, f16 = 1, bf16 = 2 };

// out[b, h, j] = sum over the query heads hq of group h (hq / (Hq / H_kv) == h)
// and query rows i of softmax_j(scale * q[b, hq, i] . k[b, h, :]), float32.
// q [B, Hq, Tq, D] and k [B, H_kv, T, D] contiguous, same dtype; seq_lens
// int64 [B] in [0, T] (device). Row i sits at position T - Tq + i; causal rows
// see keys <= their position and rows at positions >= seq_len add nothing;
// keys >= seq_len get 0. Two passes: row_stats float32 [B, Hq, Tq, 2]
// (device scratch: max and sum of each row) and then column sums, one thread
// block per (KV head, 32 keys): no Tq x T matrix, no atomics.
cudaError_t vatp_colsum(const void* q, const void* k, VatpDType dtype, int64_t B, int64_t Hq, int64_t Tq, int64_t D,
                        int64_t H_kv, int64_t T, const int64_t* seq_lens, bool causal, float scale, float* row_stats,
                        float* out, cudaStream_t stream);

// out[r] = sum over d of |v[r, d]| for rows [rows, D] contiguous; float32 out.
cudaError_t vatp_value_l1(const void* v, VatpDType dtype, int64_t rows, int64_t D, float* out, cudaStream_t stream);

// Per (b, h): kept_idx[b, h, :kept_lens[b]] = the num_sink first and num_recent
// last of the seq_lens[b] valid tokens plus the highest scores (float32
// [B, H, T]; NaN lowest; ties to the lower index), ascending; -1 padded to
// kmax. Then rows of k and v ([B, H, T, row_bytes] contiguous) are copied to
// k_out / v_out ([B, H, kmax, row_bytes]) or, with `inplace`, moved forward
// inside k and v; rows past kept_lens[b] are zeroed either way. seq_lens and
// kept_lens are int64 [B] on the device, validated by the caller.
cudaError_t vatp_prune(char* k, char* v, int64_t k_row_bytes, int64_t v_row_bytes, char* k_out, char* v_out,
                       int64_t B, int64_t H, int64_t T, const float* scores, const int64_t* seq_lens,
                       const int64_t* kept_lens, int64_t num_sink, int64_t num_recent, int64_t kmax,
                       int64_t* kept_idx, bool inplace, cudaStream_t stream);

}  // namespace cuda
}  // namespace vkern
