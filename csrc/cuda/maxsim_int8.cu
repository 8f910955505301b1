// int8-document MaxSim, CUDA: int8 tensor cores (WMMA 16x16x16, int32 accumulators, sm_72+).
//
// The structure of maxsim.cu's tensor-core kernel: a block of 4 warps owns one document and a group
// of whole queries; it walks the group's query tokens in tiles of 32 rows, keeps the tile's int8
// codes in shared memory (in D chunks of at most 256 bytes), streams the document's codes through
// shared memory 64 tokens at a time, and keeps a running max per query token on chip. The documents
// are read where they lie (any row stride): no dequantised copy. After the integer dot, the
// document token's scale is applied in float32 before the max, the query token's scale to the max,
// and the rows are summed per query in row order (deterministic, no atomics).
//
// Shared-memory tiles are "k-sliced": byte column c of row r lives at [c / 16][r][c % 16], so every
// WMMA fragment starts on a 256-byte boundary with a leading dimension of 16 bytes, as WMMA requires
// of 8-bit operands, whatever D is. Columns past D and rows past the valid ones are zeros.

#include "maxsim_int8.h"

#include <cuda_runtime.h>
#include <mma.h>

#include <climits>
#include <cstdint>

namespace vkern {
namespace cuda {
namespace {

constexpr unsigned kFull = 0xffffffffu;
constexpr int kBM = 32;        // query rows per tile
constexpr int kBN = 64;        // document tokens per tile
constexpr int kThreads = 128;  // 4 warps: 2 along rows x 2 along columns, each a 16 x 32 block
constexpr int kSlice = 16;     // bytes of one WMMA k step
constexpr int kDcMax = 256;    // D chunk resident in shared memory (bytes)
constexpr int kSs = kBN + 4;   // int row of the dot tile (a multiple of 4, as WMMA asks)
constexpr int kMaxGroup = 64;  // most queries per block

__device__ __forceinline__ float neg_inf() { return __uint_as_float(0xff800000u); }

struct Int8Params {
    const int8_t* q;
    const float* qs;
    const int32_t* qlen;
    const int8_t* d;
    const float* ds;
    const int64_t* off;
    float* scores;
    int64_t B, Lq, D, N, row_stride;
    int64_t groups;  // ceil(B / group)
    int group;       // queries per block
    int dc;          // D chunk, a multiple of 16
    int nchunks;
};

__device__ __forceinline__ int64_t query_len(const Int8Params& p, int64_t b) {
    const int64_t len = p.qlen[b];
    return len < 0 ? 0 : (len > p.Lq ? p.Lq : len);
}

// [rows_total x dc] bytes of a row-major source (row stride `stride`) into the k-sliced layout,
// zeros outside [rows_valid x cols_valid]. VEC: 16-byte loads (16-byte aligned rows, cols_valid a
// multiple of 16); else byte by byte (any D, stride and alignment).
template <bool VEC>
__device__ __forceinline__ void load_sliced(int8_t* __restrict__ dst, int rows_total, int dc,
                                            const int8_t* __restrict__ src, int64_t stride, int rows_valid,
                                            int cols_valid) {
    const int nthreads = static_cast<int>(blockDim.x);
    if constexpr (VEC) {
        const int per_row = dc / kSlice;
        const int total = rows_total * per_row;
        for (int idx = threadIdx.x; idx < total; idx += nthreads) {
            const int r = idx / per_row;
            const int s = idx - r * per_row;
            uint4 v = make_uint4(0u, 0u, 0u, 0u);
            if (r < rows_valid && s * kSlice < cols_valid)
                v = __ldg(reinterpret_cast<const uint4*>(src + static_cast<int64_t>(r) * stride + s * kSlice));
            *reinterpret_cast<uint4*>(dst + (s * rows_total + r) * kSlice) = v;
        }
    } else {
        const int total = rows_total * dc;
        for (int idx = threadIdx.x; idx < total; idx += nthreads) {
            const int r = idx / dc;
            const int c = idx - r * dc;
            int8_t v = 0;
            if (r < rows_valid && c < cols_valid) v = src[static_cast<int64_t>(r) * stride + c];
            dst[((c / kSlice) * rows_total + r) * kSlice + (c % kSlice)] = v;
        }
    }
}

// Does row tile [r0, r0 + rows) hold an unmasked token? bfirst is the query of row r0. Every
// thread computes the same answer, so it can steer barriers.
__device__ __forceinline__ bool tile_has_valid_row(const Int8Params& p, int64_t bfirst, int64_t r0, int rows) {
    for (int64_t b = bfirst; b * p.Lq < r0 + rows; ++b) {
        const int64_t len = query_len(p, b);
        if (len > 0 && b * p.Lq + len > r0) return true;
    }
    return false;
}

template <bool VEC>
__global__ void __launch_bounds__(kThreads, 4) maxsim_int8_kernel(const Int8Params p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 720
    // never launched below sm_72 (the host checks)
#else
    using namespace nvcuda;
    extern __shared__ __align__(128) unsigned char smem_i8[];
    int8_t* const Qs = reinterpret_cast<int8_t*>(smem_i8);            // [dc / 16][kBM][16]
    int8_t* const Ds = Qs + kBM * p.dc;                                // [dc / 16][kBN][16]
    int* const Ss = reinterpret_cast<int*>(Ds + kBN * p.dc);           // [kBM][kSs]
    float* const rowmax = reinterpret_cast<float*>(Ss + kBM * kSs);    // [kBM]
    float* const qacc = rowmax + kBM;                                  // [group]

    const int tid = static_cast<int>(threadIdx.x);
    const int warp = tid / 32;
    const int wm = warp & 1;       // rows 16 * wm .. + 16 of the tile
    const int wn = warp >> 1;      // columns 32 * wn .. + 32
    const int my_row = tid >> 2;   // the row this thread folds into its running max
    const int my_col = tid & 3;    // and its columns my_col + 4 i (conflict-free reads)
    const int64_t Lq = p.Lq, D = p.D;

    // Items (document n, query group) = n * groups + group: the blocks of one document are adjacent
    // (its codes come from HBM once, from L2 for the other groups). Walked incrementally: no 64-bit
    // division in the loop.
    const unsigned groups32 = static_cast<unsigned>(p.groups);
    int64_t n = blockIdx.x / groups32, grp = blockIdx.x % groups32;
    const int64_t step_n = gridDim.x / groups32, step_grp = gridDim.x % groups32;
    for (; n < p.N; n += step_n, grp += step_grp) {
        if (grp >= p.groups) {
            grp -= p.groups;
            ++n;
            if (n >= p.N) break;
        }
        const int64_t b0 = grp * p.group;
        const int64_t b1 = b0 + p.group < p.B ? b0 + p.group : p.B;
        const int64_t lo = p.off[n], hi = p.off[n + 1];
        if (hi <= lo) {  // block-uniform: an empty document scores -inf
            for (int64_t b = b0 + tid; b < b1; b += blockDim.x) p.scores[b * p.N + n] = neg_inf();
            continue;
        }
        // zeroed here, added to only after a tile's barriers, stored by this thread after the last one
        for (int g = tid; g < b1 - b0; g += blockDim.x) qacc[g] = 0.0f;

        const int64_t row_end = b1 * Lq;
        int64_t bfirst = b0;  // the query of row r0
        for (int64_t r0 = b0 * Lq; r0 < row_end; r0 += kBM) {
            while ((bfirst + 1) * Lq <= r0) ++bfirst;
            const int rows = static_cast<int>(row_end - r0 < kBM ? row_end - r0 : kBM);
            if (!tile_has_valid_row(p, bfirst, r0, rows)) continue;
            const int8_t* const qtile = p.q + r0 * D;
            // one chunk: the query tile stays resident for the whole document (every read of Qs by
            // the previous tile precedes the barrier before its row sums)
            if (p.nchunks == 1) load_sliced<VEC>(Qs, kBM, p.dc, qtile, D, rows, static_cast<int>(D));
            float m = neg_inf();

            for (int64_t t0 = lo; t0 < hi; t0 += kBN) {
                const int cols = static_cast<int>(hi - t0 < kBN ? hi - t0 : kBN);
                const int8_t* const dtile = p.d + t0 * p.row_stride;
                wmma::fragment<wmma::accumulator, 16, 16, 16, int> acc[2];
                wmma::fill_fragment(acc[0], 0);
                wmma::fill_fragment(acc[1], 0);
                for (int chunk = 0; chunk < p.nchunks; ++chunk) {
                    const int64_t k0 = static_cast<int64_t>(chunk) * p.dc;
                    const int klen = static_cast<int>(D - k0 < p.dc ? D - k0 : p.dc);
                    if (p.nchunks > 1) {
                        __syncthreads();  // every MMA read of the previous chunk is done
                        load_sliced<VEC>(Qs, kBM, p.dc, qtile + k0, D, rows, klen);
                    }
                    // one chunk: the MMAs that read Ds finished before the barrier that published Ss
                    load_sliced<VEC>(Ds, kBN, p.dc, dtile + k0, p.row_stride, cols, klen);
                    __syncthreads();  // Ds (and Qs) visible; every read of Ss by the running max done
                    for (int k = 0; k < klen; k += kSlice) {
                        const int s = k / kSlice;
                        wmma::fragment<wmma::matrix_a, 16, 16, 16, signed char, wmma::row_major> a;
                        wmma::load_matrix_sync(a, Qs + (s * kBM + wm * 16) * kSlice, kSlice);
#pragma unroll
                        for (int f = 0; f < 2; ++f) {
                            // Ds holds document tokens as rows: B = Ds^T is column-major
                            wmma::fragment<wmma::matrix_b, 16, 16, 16, signed char, wmma::col_major> bf;
                            wmma::load_matrix_sync(bf, Ds + (s * kBN + wn * 32 + f * 16) * kSlice, kSlice);
                            wmma::mma_sync(acc[f], a, bf, acc[f]);
                        }
                    }
                }
#pragma unroll
                for (int f = 0; f < 2; ++f)
                    wmma::store_matrix_sync(Ss + wm * 16 * kSs + wn * 32 + f * 16, acc[f], kSs, wmma::mem_row_major);
                __syncthreads();  // Ss visible
#pragma unroll
                for (int i = 0; i < kBN / 4; ++i) {
                    const int col = my_col + 4 * i;
                    // real tokens only; the scales are finite (checked by the wrapper): no NaN
                    if (col < cols) m = fmaxf(m, static_cast<float>(Ss[my_row * kSs + col]) * __ldg(p.ds + t0 + col));
                }
            }
            // row max across the 4 threads of a row (adjacent lanes)
            m = fmaxf(m, __shfl_xor_sync(kFull, m, 1));
            m = fmaxf(m, __shfl_xor_sync(kFull, m, 2));
            if (my_col == 0) rowmax[my_row] = m;
            __syncthreads();  // rowmax visible; every read of Qs/Ds/Ss of this tile done
            // per query, its unmasked rows of this tile, in row order, times their query scales
            for (int64_t b = bfirst + tid; b * Lq < r0 + rows; b += blockDim.x) {
                const int64_t len = query_len(p, b);
                const int64_t rlo = b * Lq > r0 ? b * Lq : r0;
                const int64_t rhi = b * Lq + len < r0 + rows ? b * Lq + len : r0 + rows;
                if (rhi > rlo) {
                    float s = 0.0f;
                    for (int64_t r = rlo; r < rhi; ++r) s += p.qs[r] * rowmax[r - r0];
                    qacc[b - b0] += s;
                }
            }
        }
        __syncthreads();  // row sums visible
        for (int g = tid; g < b1 - b0; g += blockDim.x) p.scores[(b0 + g) * p.N + n] = qacc[g];
    }
#endif
}

// How many queries share a block: the highest fraction of real rows in the row tiles, fewer
// queries on a tie.
int pick_group(int64_t B, int64_t Lq) {
    double best = -1.0;
    int group = 1;
    const int64_t gmax = B < kMaxGroup ? B : kMaxGroup;
    for (int64_t g = 1; g <= gmax; ++g) {
        const int64_t rows = g * Lq;
        const int64_t tiles = (rows + kBM - 1) / kBM;
        const double eff = tiles ? static_cast<double>(rows) / static_cast<double>(tiles * kBM) : 1.0;
        if (eff > best + 1e-9) {
            best = eff;
            group = static_cast<int>(g);
        }
    }
    return group;
}

size_t smem_bytes(int dc, int group) {
    return static_cast<size_t>(kBM + kBN) * dc + (static_cast<size_t>(kBM) * kSs) * sizeof(int) +
           (static_cast<size_t>(kBM) + group) * sizeof(float);
}

}  // namespace

cudaError_t maxsim_int8_scores(const int8_t* q_codes, const float* q_scales, int64_t B, int64_t Lq, int64_t D,
                               const int32_t* query_lengths, const int8_t* codes, int64_t row_stride,
                               const float* doc_scales, const int64_t* doc_offsets, int64_t N, float* scores,
                               cudaStream_t stream) {
    if (B < 0 || Lq < 0 || D < 1 || N < 0 || D > 131072 || row_stride < D) return cudaErrorInvalidValue;
    if (B == 0 || N == 0) return cudaSuccess;
    if (scores == nullptr || doc_offsets == nullptr || query_lengths == nullptr) return cudaErrorInvalidValue;
    if (Lq > 0 && (q_codes == nullptr || q_scales == nullptr)) return cudaErrorInvalidValue;
    int dev = 0, major = 0, minor = 0;
    cudaError_t err = cudaGetDevice(&dev);
    if (err != cudaSuccess) return err;
    if ((err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev)) != cudaSuccess) return err;
    if ((err = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev)) != cudaSuccess) return err;
    if (major * 10 + minor < 72) return cudaErrorInvalidDeviceFunction;  // no int8 tensor cores

    Int8Params p{};
    p.q = q_codes;
    p.qs = q_scales;
    p.qlen = query_lengths;
    p.d = codes;  // may be null when T == 0: only empty documents then, never read
    p.ds = doc_scales;
    p.off = doc_offsets;
    p.scores = scores;
    p.B = B;
    p.Lq = Lq;
    p.D = D;
    p.N = N;
    p.row_stride = row_stride;
    p.group = pick_group(B, Lq);
    p.groups = (B + p.group - 1) / p.group;
    if (p.groups >= INT_MAX || N > INT64_MAX / p.groups) return cudaErrorInvalidValue;
    // the resident chunk: as large as the budget allows, then balanced so the last is not mostly padding
    const int64_t padded = (D + kSlice - 1) / kSlice * kSlice;
    const int64_t chunks = (padded + kDcMax - 1) / kDcMax;
    const int64_t per = (D + chunks - 1) / chunks;
    p.dc = static_cast<int>((per + kSlice - 1) / kSlice * kSlice);
    p.nchunks = static_cast<int>((D + p.dc - 1) / p.dc);
    const size_t smem = smem_bytes(p.dc, p.group);  // < 48 KB by construction: no opt-in
    const int64_t items = N * p.groups;
    const unsigned grid = static_cast<unsigned>(items < INT_MAX ? items : INT_MAX);
    const bool vec = D % 16 == 0 && row_stride % 16 == 0 && reinterpret_cast<uintptr_t>(q_codes) % 16 == 0 &&
                     reinterpret_cast<uintptr_t>(codes) % 16 == 0;
    if (vec)
        maxsim_int8_kernel<true><<<grid, kThreads, smem, stream>>>(p);
    else
        maxsim_int8_kernel<false><<<grid, kThreads, smem, stream>>>(p);
    return cudaGetLastError();
}

}  // namespace cuda
}  // namespace vkern
