// MUVERA encoder, CUDA: three passes, each sum in one order (the cpu backend's), no atomics.
//   muvera_sketch_kernel      one thread per (token, repetition): k float64 SimHash dots (D in
//                             order) -> bit string; with an AMS sketch the projected token, 8
//                             output coordinates at a time in registers (inputs in order).
//   muvera_accumulate_kernel  one block per (cloud, repetition, 256 block elements): each thread
//                             owns one (partition, coordinate) and walks the cloud's tokens in
//                             order (float64 sum, count), then AVERAGE and the empty-partition fill.
//   muvera_final_kernel       one thread per (cloud, output): the count sketch, float64, inputs
//                             in index order (a host-built inverse index).
#include "muvera.h"

#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

namespace vkern {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxK = 16;
constexpr int kProjRegs = 8;   // AMS output coordinates per pass, in registers
constexpr int64_t kMaxBlocks = 1 << 20;

__device__ __forceinline__ int64_t gray_decode(int64_t b) {
    int64_t p = b ^ (b >> 1);
    p ^= p >> 2;
    p ^= p >> 4;
    return p ^ (p >> 8);
}

__global__ void __launch_bounds__(kThreads) muvera_sketch_kernel(const MuveraDevCall c) {
    const int64_t total = c.T * c.R;
    const int64_t RK = c.R * c.k;
    for (int64_t item = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; item < total;
         item += static_cast<int64_t>(gridDim.x) * blockDim.x) {
        const int64_t t = item / c.R, r = item - t * c.R;  // adjacent threads: one token, its repetitions
        const float* __restrict__ xt = c.x + t * c.D;
        double dots[kMaxK];
#pragma unroll
        for (int j = 0; j < kMaxK; ++j) dots[j] = 0.0;
        for (int64_t d = 0; d < c.D; ++d) {
            const double xv = static_cast<double>(__ldg(xt + d));
            const float* __restrict__ g = c.simhash_t + d * RK + r * c.k;
#pragma unroll
            for (int j = 0; j < kMaxK; ++j)  // float32 x float32 is exact in float64: fused or not, the cpu's sums
                if (j < c.k) dots[j] += xv * static_cast<double>(__ldg(g + j));
        }
        int32_t b = 0;
#pragma unroll
        for (int j = 0; j < kMaxK; ++j)
            if (j < c.k) b = (b << 1) | (dots[j] > 0.0 ? 1 : 0);
        c.bits[item] = b;
        if (c.ams_index == nullptr) continue;
        const int64_t* __restrict__ idx = c.ams_index + r * c.D;
        const float* __restrict__ sg = c.ams_sign + r * c.D;
        float* __restrict__ pr = c.proj + item * c.d_proj;
        for (int64_t c0 = 0; c0 < c.d_proj; c0 += kProjRegs) {
            float acc[kProjRegs];
#pragma unroll
            for (int u = 0; u < kProjRegs; ++u) acc[u] = 0.0f;
            for (int64_t d = 0; d < c.D; ++d) {
                const int64_t target = __ldg(idx + d) - c0;
                const float v = __ldg(sg + d) * __ldg(xt + d);  // exact: the sign is +-1
#pragma unroll
                for (int u = 0; u < kProjRegs; ++u) acc[u] += target == u ? v : 0.0f;  // + 0.0 changes nothing
            }
#pragma unroll
            for (int u = 0; u < kProjRegs; ++u)
                if (c0 + u < c.d_proj) pr[c0 + u] = acc[u];
        }
    }
}

__global__ void __launch_bounds__(kThreads) muvera_accumulate_kernel(const MuveraDevCall c, int64_t nchunks) {
    const int64_t P = int64_t(1) << c.k;
    const int64_t elems = P * c.d_proj;
    const int64_t items = c.N * c.R * nchunks;
    // token t, repetition r, coordinate q of the projected tokens
    const bool ams = c.ams_index != nullptr;
    const float* const src = ams ? c.proj : c.x;
    const int64_t tok_stride = ams ? c.R * c.d_proj : c.D;
    for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
        const int64_t chunk = item % nchunks, nr = item / nchunks;
        const int64_t r = nr % c.R, n = nr / c.R;
        const int64_t e = chunk * kThreads + threadIdx.x;
        if (e >= elems) continue;  // no barriers in this kernel
        const int64_t p = e / c.d_proj, q = e - p * c.d_proj;
        const int64_t lo = c.offsets[n], hi = c.offsets[n + 1];
        const float* const col = src + (ams ? r * c.d_proj : 0) + q;
        double acc = 0.0;
        int64_t count = 0;
        for (int64_t t = lo; t < hi; ++t) {
            if (gray_decode(__ldg(c.bits + t * c.R + r)) == p) {
                acc += static_cast<double>(__ldg(col + t * tok_stride));
                ++count;
            }
        }
        if (c.average && count > 1) acc /= static_cast<double>(count);
        if (c.fill_empty && count == 0 && hi > lo) {
            const int32_t gray = static_cast<int32_t>(p ^ (p >> 1));
            int64_t best = lo;
            int best_d = 64;
            for (int64_t t = lo; t < hi; ++t) {
                const int dist = __popc(static_cast<unsigned>(__ldg(c.bits + t * c.R + r) ^ gray));
                if (dist < best_d) {  // strictly: ties keep the lower token
                    best_d = dist;
                    best = t;
                }
            }
            acc = static_cast<double>(__ldg(col + best * tok_stride));
        }
        const int64_t at = r * elems + e;
        if (c.raw != nullptr)
            c.raw[n * c.raw_dim + at] = acc;
        else
            c.out[n * c.out_dim + at] = static_cast<float>(acc);
    }
}

__global__ void __launch_bounds__(kThreads) muvera_final_kernel(const MuveraDevCall c) {
    const int64_t total = c.N * c.out_dim;
    for (int64_t item = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; item < total;
         item += static_cast<int64_t>(gridDim.x) * blockDim.x) {
        const int64_t n = item / c.out_dim, j = item - n * c.out_dim;
        const double* const row = c.raw + n * c.raw_dim;
        double acc = 0.0;
        for (int64_t s = __ldg(c.final_starts + j), end = __ldg(c.final_starts + j + 1); s < end; ++s) {
            const int64_t i = __ldg(c.final_order + s);
            acc += static_cast<double>(__ldg(c.final_sign + i)) * row[i];  // exact product: sign +-1
        }
        c.out[item] = static_cast<float>(acc);
    }
}

unsigned blocks_for(int64_t work, int64_t per_block) {
    const int64_t b = (work + per_block - 1) / per_block;
    return static_cast<unsigned>(b < kMaxBlocks ? (b > 0 ? b : 1) : kMaxBlocks);
}

}  // namespace

cudaError_t muvera_encode(const MuveraDevCall& c, cudaStream_t stream) {
    if (c.D < 1 || c.T < 0 || c.N < 0 || c.R < 1 || c.k < 0 || c.k > kMaxK || c.d_proj < 1)
        return cudaErrorInvalidValue;
    if (c.raw_dim != c.R * (int64_t(1) << c.k) * c.d_proj) return cudaErrorInvalidValue;
    if (c.ams_index == nullptr && c.d_proj != c.D) return cudaErrorInvalidValue;
    if ((c.final_order == nullptr) != (c.raw == nullptr)) return cudaErrorInvalidValue;
    if (c.final_order == nullptr && c.out_dim != c.raw_dim) return cudaErrorInvalidValue;
    if (c.N == 0) return cudaSuccess;
    if (c.offsets == nullptr || c.simhash_t == nullptr || c.bits == nullptr || c.out == nullptr)
        return cudaErrorInvalidValue;
    if (c.ams_index != nullptr && (c.ams_sign == nullptr || c.proj == nullptr)) return cudaErrorInvalidValue;
    if (c.final_order != nullptr && (c.final_starts == nullptr || c.final_sign == nullptr)) return cudaErrorInvalidValue;
    if (c.T > 0) {
        if (c.x == nullptr) return cudaErrorInvalidValue;
        muvera_sketch_kernel<<<blocks_for(c.T * c.R, kThreads), kThreads, 0, stream>>>(c);
    }
    const int64_t elems = (int64_t(1) << c.k) * c.d_proj;
    const int64_t nchunks = (elems + kThreads - 1) / kThreads;
    if (c.R > INT64_MAX / c.N / nchunks) return cudaErrorInvalidValue;
    muvera_accumulate_kernel<<<blocks_for(c.N * c.R * nchunks, 1), kThreads, 0, stream>>>(c, nchunks);
    if (c.final_order != nullptr)
        muvera_final_kernel<<<blocks_for(c.N * c.out_dim, kThreads), kThreads, 0, stream>>>(c);
    return cudaGetLastError();
}

}  // namespace cuda
}  // namespace vkern
