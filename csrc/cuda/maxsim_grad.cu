// Differentiable MaxSim, CUDA (see maxsim_grad.h for the contract).
//
// argmax_kernel: one thread block per (document, query). It walks the query's tokens in tiles
// of kRows, streams the document through shared memory in tiles of kCols tokens (D in chunks of
// kChunk, converted to float32 on the way in), and each thread keeps a running (max, argmax) for
// its 4 x 4 register tile; at the end of the document the 16 threads sharing a row combine theirs
// by warp shuffles (the larger max; on equal maxima the lower index). A float32 FMA (SIMT) GEMM,
// any D, any alignment: the argmax forward runs once per training step, beside a backward that
// is itself memory-bound, so tensor cores would buy little here.
//
// grad_q_kernel: one block per query row (b, i); threads over D; the block stages 128 documents'
// (row, weight) pairs in shared memory, then every thread adds its columns of those rows in
// document order. grad_d_kernel: one block per document; threads over D; the block walks the
// (query, query token) pairs in order and each thread read-modify-writes its own column of the
// argmax row. A row hit twice is updated twice by the same thread, in program order, so neither
// needs atomics and both are bit-reproducible.

#include "maxsim_grad.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

namespace vkern {
namespace cuda {
namespace {

constexpr int kThreads = 128;   // every kernel here
constexpr int kRows = 32;       // query tokens per tile (argmax)
constexpr int kCols = 64;       // document tokens per tile
constexpr int kChunk = 32;      // D per shared-memory chunk
constexpr int kStage = 128;     // documents / query tokens staged per step (backward)

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

__device__ __forceinline__ bool is_nan(float v) { return (__float_as_uint(v) & 0x7fffffffu) > 0x7f800000u; }

// (v, j) beats (m, a): a larger value, a NaN over a number, or the same value (both NaN
// included) at a lower index. Sentinel index INT_MAX: nothing seen yet.
__device__ __forceinline__ bool beats(float v, int j, float m, int a) {
    const bool vn = is_nan(v), mn = is_nan(m);
    if (vn != mn) return vn;
    if (vn || v == m) return j < a;
    return v > m;
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 4) argmax_kernel(const T* __restrict__ queries, const T* __restrict__ docs,
                                                          int64_t B, int64_t Lq, int64_t D,
                                                          const int32_t* __restrict__ query_lengths,
                                                          const int64_t* __restrict__ doc_starts,
                                                          const int64_t* __restrict__ doc_lens,
                                                          const uint8_t* __restrict__ doc_mask, int64_t N,
                                                          float* __restrict__ scores, int32_t* __restrict__ argmax) {
    __shared__ float q_tile[kRows][kChunk + 1];
    __shared__ float d_tile[kCols][kChunk + 1];
    __shared__ float row_max[kRows];
    const int64_t block = blockIdx.x;
    const int64_t n = block / B;   // the queries of one document are adjacent blocks: it stays in L2
    const int64_t b = block - n * B;
    const int64_t start = doc_starts[n];
    const int64_t len = doc_lens[n];
    int64_t qlen = query_lengths == nullptr ? Lq : static_cast<int64_t>(query_lengths[b]);
    qlen = qlen < 0 ? 0 : (qlen > Lq ? Lq : qlen);
    const int tid = static_cast<int>(threadIdx.x);
    const int tx = tid % 16, ty = tid / 16;   // 16 threads share a row group: lanes [16k, 16k + 16) of a warp
    if (len == 0) {
        if (tid == 0) scores[b * N + n] = __uint_as_float(0xff800000u);   // -inf
        return;
    }
    const T* q_base = queries + b * Lq * D;
    const T* d_base = docs + start * D;
    float total = 0.0f;
    for (int64_t r0 = 0; r0 < qlen; r0 += kRows) {
        float best[4];
        int best_at[4];
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            best[r] = __uint_as_float(0xff800000u);
            best_at[r] = INT_MAX;
        }
        for (int64_t c0 = 0; c0 < len; c0 += kCols) {
            float acc[4][4] = {};
            for (int64_t k0 = 0; k0 < D; k0 += kChunk) {
                for (int e = tid; e < kRows * kChunk; e += kThreads) {
                    const int r = e / kChunk, k = e % kChunk;
                    const bool ok = r0 + r < qlen && k0 + k < D;
                    q_tile[r][k] = ok ? to_f32(q_base[(r0 + r) * D + k0 + k]) : 0.0f;
                }
                for (int e = tid; e < kCols * kChunk; e += kThreads) {
                    const int c = e / kChunk, k = e % kChunk;
                    const bool ok = c0 + c < len && k0 + k < D;
                    d_tile[c][k] = ok ? to_f32(d_base[(c0 + c) * D + k0 + k]) : 0.0f;
                }
                __syncthreads();
#pragma unroll 8
                for (int k = 0; k < kChunk; ++k) {
                    float qv[4], dv[4];
#pragma unroll
                    for (int r = 0; r < 4; ++r) qv[r] = q_tile[ty * 4 + r][k];
#pragma unroll
                    for (int c = 0; c < 4; ++c) dv[c] = d_tile[tx + 16 * c][k];
#pragma unroll
                    for (int r = 0; r < 4; ++r)
#pragma unroll
                        for (int c = 0; c < 4; ++c) acc[r][c] = fmaf(qv[r], dv[c], acc[r][c]);
                }
                __syncthreads();
            }
            // this thread's columns, in increasing order: a strictly better value moves the argmax
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                const int64_t j = c0 + tx + 16 * c;
                const bool in_doc = j < len;
                const bool kept = !in_doc || doc_mask == nullptr || doc_mask[start + j] != 0;
#pragma unroll
                for (int r = 0; r < 4; ++r) {
                    const float v = kept ? acc[r][c] : 0.0f;
                    const bool better = in_doc && (is_nan(v) ? !is_nan(best[r]) : v > best[r]);
                    best[r] = better ? v : best[r];
                    best_at[r] = better ? static_cast<int>(j) : best_at[r];
                }
            }
        }
        // combine the 16 threads of each row (lanes differing in the low 4 bits)
#pragma unroll
        for (int r = 0; r < 4; ++r) {
#pragma unroll
            for (int off = 8; off >= 1; off >>= 1) {
                const float v = __shfl_xor_sync(0xffffffffu, best[r], off);
                const int j = __shfl_xor_sync(0xffffffffu, best_at[r], off);
                if (beats(v, j, best[r], best_at[r])) {
                    best[r] = v;
                    best_at[r] = j;
                }
            }
        }
        if (tx == 0) {
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                const int64_t i = r0 + ty * 4 + r;
                // every value -inf: np.argmax's answer is the first token
                int a = best_at[r] == INT_MAX ? 0 : best_at[r];
                if (i < qlen) {
                    if (doc_mask != nullptr && doc_mask[start + a] == 0) a = -1;
                    argmax[(b * N + n) * Lq + i] = a;
                }
                row_max[ty * 4 + r] = i < qlen ? best[r] : 0.0f;
            }
        }
        __syncthreads();
        if (tid == 0)
            for (int r = 0; r < kRows; ++r) total += row_max[r];   // token order: deterministic
        __syncthreads();
    }
    if (tid == 0) scores[b * N + n] = total;
}

// grad_q[b, i, :] = sum_n grad[b, n] * docs[start_n + argmax[b, n, i], :]
template <typename T>
__global__ void __launch_bounds__(kThreads) grad_q_kernel(const float* __restrict__ grad,
                                                          const int32_t* __restrict__ argmax,
                                                          const T* __restrict__ docs, int64_t Lq, int64_t D,
                                                          const int64_t* __restrict__ doc_starts, int64_t N,
                                                          float* __restrict__ grad_q) {
    __shared__ int64_t rows[kStage];
    __shared__ float weights[kStage];
    const int64_t row = blockIdx.x;   // b * Lq + i
    const int64_t b = row / Lq, i = row - b * Lq;
    const int tid = static_cast<int>(threadIdx.x);
    for (int64_t d0 = 0; d0 < D; d0 += kThreads) {
        const int64_t d = d0 + tid;
        float acc = 0.0f;
        for (int64_t n0 = 0; n0 < N; n0 += kStage) {
            __syncthreads();
            const int64_t n = n0 + tid;
            if (n < N) {
                const int a = argmax[(b * N + n) * Lq + i];
                rows[tid] = a >= 0 ? doc_starts[n] + a : -1;
                weights[tid] = grad[b * N + n];
            }
            __syncthreads();
            const int count = N - n0 < kStage ? static_cast<int>(N - n0) : kStage;
            if (d < D)
                for (int k = 0; k < count; ++k)
                    if (rows[k] >= 0) acc = fmaf(weights[k], to_f32(docs[rows[k] * D + d]), acc);
        }
        if (d < D) grad_q[row * D + d] = acc;
    }
}

// grad_d[start_n + argmax[b, n, i], :] += grad[b, n] * queries[b, i, :], one block per document
template <typename T>
__global__ void __launch_bounds__(kThreads) grad_d_kernel(const float* __restrict__ grad,
                                                          const int32_t* __restrict__ argmax,
                                                          const T* __restrict__ queries, int64_t B, int64_t Lq,
                                                          int64_t D, const int64_t* __restrict__ doc_starts,
                                                          int64_t N, float* __restrict__ grad_d) {
    __shared__ int32_t hits[kStage];
    const int64_t n = blockIdx.x;
    const int64_t start = doc_starts[n];
    const int tid = static_cast<int>(threadIdx.x);
    for (int64_t b = 0; b < B; ++b) {
        const float w = grad[b * N + n];
        for (int64_t i0 = 0; i0 < Lq; i0 += kStage) {
            __syncthreads();
            if (i0 + tid < Lq) hits[tid] = argmax[(b * N + n) * Lq + i0 + tid];
            __syncthreads();
            const int count = Lq - i0 < kStage ? static_cast<int>(Lq - i0) : kStage;
            for (int k = 0; k < count; ++k) {
                const int a = hits[k];
                if (a < 0) continue;
                const T* q_row = queries + (b * Lq + i0 + k) * D;
                float* g_row = grad_d + (start + a) * D;
                for (int64_t d = tid; d < D; d += kThreads) g_row[d] = fmaf(w, to_f32(q_row[d]), g_row[d]);
            }
        }
    }
}

template <typename T>
cudaError_t launch_argmax(const void* queries, const void* docs, int64_t B, int64_t Lq, int64_t D,
                          const int32_t* query_lengths, const int64_t* doc_starts, const int64_t* doc_lens,
                          const uint8_t* doc_mask, int64_t N, float* scores, int32_t* argmax, cudaStream_t stream) {
    argmax_kernel<T><<<static_cast<unsigned>(B * N), kThreads, 0, stream>>>(
        static_cast<const T*>(queries), static_cast<const T*>(docs), B, Lq, D, query_lengths, doc_starts, doc_lens,
        doc_mask, N, scores, argmax);
    return cudaGetLastError();
}

template <typename T>
cudaError_t launch_grad_q(const float* grad, const int32_t* argmax, const void* docs, int64_t B, int64_t Lq,
                          int64_t D, const int64_t* doc_starts, int64_t N, float* grad_q, cudaStream_t stream) {
    grad_q_kernel<T><<<static_cast<unsigned>(B * Lq), kThreads, 0, stream>>>(
        grad, argmax, static_cast<const T*>(docs), Lq, D, doc_starts, N, grad_q);
    return cudaGetLastError();
}

template <typename T>
cudaError_t launch_grad_d(const float* grad, const int32_t* argmax, const void* queries, int64_t B, int64_t Lq,
                          int64_t D, const int64_t* doc_starts, int64_t N, float* grad_d, cudaStream_t stream) {
    grad_d_kernel<T><<<static_cast<unsigned>(N), kThreads, 0, stream>>>(
        grad, argmax, static_cast<const T*>(queries), B, Lq, D, doc_starts, N, grad_d);
    return cudaGetLastError();
}

constexpr int64_t kGridMax = 2147483647;

}  // namespace

cudaError_t maxsim_argmax(const void* queries, const void* docs, DType dtype, int64_t B, int64_t Lq, int64_t D,
                          const int32_t* query_lengths, const int64_t* doc_starts, const int64_t* doc_lens,
                          const uint8_t* doc_mask, int64_t N, float* scores, int32_t* argmax,
                          cudaStream_t stream) {
    if (B < 0 || Lq < 0 || D < 1 || N < 0) return cudaErrorInvalidValue;
    if (B == 0 || N == 0) return cudaSuccess;
    if (B * N > kGridMax || doc_starts == nullptr || doc_lens == nullptr || scores == nullptr ||
        (Lq > 0 && (queries == nullptr || argmax == nullptr)))
        return cudaErrorInvalidValue;
    switch (dtype) {
        case DType::f32:
            return launch_argmax<float>(queries, docs, B, Lq, D, query_lengths, doc_starts, doc_lens, doc_mask, N,
                                        scores, argmax, stream);
        case DType::f16:
            return launch_argmax<__half>(queries, docs, B, Lq, D, query_lengths, doc_starts, doc_lens, doc_mask, N,
                                         scores, argmax, stream);
        case DType::bf16:
            return launch_argmax<__nv_bfloat16>(queries, docs, B, Lq, D, query_lengths, doc_starts, doc_lens,
                                                doc_mask, N, scores, argmax, stream);
    }
    return cudaErrorInvalidValue;
}

cudaError_t maxsim_backward(const float* grad, const int32_t* argmax, const void* queries, DType q_dtype,
                            const void* docs, DType d_dtype, int64_t B, int64_t Lq, int64_t D,
                            const int64_t* doc_starts, int64_t N, float* grad_q, float* grad_d,
                            cudaStream_t stream) {
    if (B < 0 || Lq < 0 || D < 1 || N < 0) return cudaErrorInvalidValue;
    if (B == 0 || Lq == 0 || N == 0) return cudaSuccess;   // grad_q stays as the caller zeroed it
    if (B * Lq > kGridMax || grad == nullptr || argmax == nullptr || doc_starts == nullptr)
        return cudaErrorInvalidValue;
    cudaError_t err = cudaSuccess;
    if (grad_q != nullptr) {
        if (docs == nullptr) return cudaErrorInvalidValue;
        switch (d_dtype) {
            case DType::f32: err = launch_grad_q<float>(grad, argmax, docs, B, Lq, D, doc_starts, N, grad_q, stream); break;
            case DType::f16: err = launch_grad_q<__half>(grad, argmax, docs, B, Lq, D, doc_starts, N, grad_q, stream); break;
            case DType::bf16:
                err = launch_grad_q<__nv_bfloat16>(grad, argmax, docs, B, Lq, D, doc_starts, N, grad_q, stream);
                break;
            default: return cudaErrorInvalidValue;
        }
        if (err != cudaSuccess) return err;
    }
    if (grad_d != nullptr) {
        if (queries == nullptr) return cudaErrorInvalidValue;
        switch (q_dtype) {
            case DType::f32: err = launch_grad_d<float>(grad, argmax, queries, B, Lq, D, doc_starts, N, grad_d, stream); break;
            case DType::f16: err = launch_grad_d<__half>(grad, argmax, queries, B, Lq, D, doc_starts, N, grad_d, stream); break;
            case DType::bf16:
                err = launch_grad_d<__nv_bfloat16>(grad, argmax, queries, B, Lq, D, doc_starts, N, grad_d, stream);
                break;
            default: return cudaErrorInvalidValue;
        }
    }
    return err;
}

}  // namespace cuda
}  // namespace vkern
