// MaxSim (ColBERT late interaction) and row top-k, CUDA.
//
// maxsim_scores: one launch for the whole batch, flash-style. A thread block
// owns one document and a group of whole queries; it walks the group's query
// tokens in row tiles, keeps the tile resident in shared memory (in D chunks
// when D is large), streams the document through shared memory in tiles of 64
// tokens, and keeps a running max per query token on chip. Nothing of the
// [Lq, Ld] similarity matrix reaches global memory. Two kernels share that
// structure:
//   - maxsim_wmma_kernel: float16/bfloat16 with D % 8 == 0 and 16-byte aligned
//     inputs on sm_80+: tensor cores (WMMA 16x16x16), float32 accumulators.
//   - maxsim_simt_kernel: everything else (float32 always): a register-tiled
//     float32 FMA GEMM; any D, any alignment.
// Either way products and sums are float32, maxima propagate NaN like np.max,
// and per-query sums run in row order (deterministic, no atomics).
//
// topk_rows: one block per row; a 4-pass 8-bit radix select finds the k-th best
// key, one ordered pass collects the k winners, a bitonic network sorts them.

#include "maxsim.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <climits>
#include <cstdint>
#include <cstdlib>

namespace vkern {
namespace cuda {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float neg_inf() { return __uint_as_float(0xff800000u); }

__device__ __forceinline__ bool is_nan(float v) {
    // Bit test rather than v != v or isnan, so no fast-math flag can fold it away.
    return (__float_as_uint(v) & 0x7fffffffu) > 0x7f800000u;
}

// max that propagates NaN as numpy's np.max does (fmaxf would drop it).
__device__ __forceinline__ float nan_max(float m, float v) { return (v > m || is_nan(v)) ? v : m; }

// ---------------------------------------------------------------------------
// Element loads, converted to float32.

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

__device__ __forceinline__ float half_bits_to_float(unsigned bits) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(bits & 0xffffu)));
}
__device__ __forceinline__ float bf16_bits_to_float(unsigned bits) {
    return __uint_as_float((bits & 0xffffu) << 16);  // bf16 is the top half of a float32
}

// One 16-byte vector: 4 floats or 8 half/bfloat16 values, as float32.
template <typename T>
struct Vec16 {
    static constexpr int kElems = 16 / static_cast<int>(sizeof(T));
};

__device__ __forceinline__ void unpack16(uint4 raw, float (&out)[4], const float*) {
    out[0] = __uint_as_float(raw.x);
    out[1] = __uint_as_float(raw.y);
    out[2] = __uint_as_float(raw.z);
    out[3] = __uint_as_float(raw.w);
}
__device__ __forceinline__ void unpack16(uint4 raw, float (&out)[8], const __half*) {
    const unsigned w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        out[2 * i] = half_bits_to_float(w[i]);
        out[2 * i + 1] = half_bits_to_float(w[i] >> 16);
    }
}
__device__ __forceinline__ void unpack16(uint4 raw, float (&out)[8], const __nv_bfloat16*) {
    const unsigned w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        out[2 * i] = bf16_bits_to_float(w[i]);
        out[2 * i + 1] = bf16_bits_to_float(w[i] >> 16);
    }
}

// Copies a [rows_total x cols_total] tile into shared memory (row stride `ld`
// elements, 16-byte aligned rows) from a row-major source of row stride `D`,
// 16-byte vectors at a time. Rows >= rows_valid and columns >= cols_valid are
// zeros, so padding never feeds garbage (or NaN) into the products. The
// caller guarantees 16-byte aligned source rows and cols_valid a multiple of
// the vector width. Store(dst_elem_ptr, raw) writes one vector. Each thread
// issues BATCH loads before storing any, to keep several requests in flight.
template <int BATCH, typename T, typename Dst, typename Store>
__device__ __forceinline__ void load_tile_vec(Dst* __restrict__ dst, int ld, int rows_total, int cols_total,
                                              const T* __restrict__ src, int64_t D, int rows_valid,
                                              int cols_valid, Store store) {
    constexpr int E = Vec16<T>::kElems;
    const int vecs_per_row = cols_total / E;
    const int total = rows_total * vecs_per_row;
    const int nthreads = static_cast<int>(blockDim.x);
    for (int base = threadIdx.x; base < total; base += BATCH * nthreads) {
        uint4 raw[BATCH];
#pragma unroll
        for (int u = 0; u < BATCH; ++u) {
            const int idx = base + u * nthreads;
            const int r = idx / vecs_per_row;
            const int c = (idx - r * vecs_per_row) * E;
            raw[u] = make_uint4(0u, 0u, 0u, 0u);
            if (idx < total && r < rows_valid && c < cols_valid)
                raw[u] = __ldg(reinterpret_cast<const uint4*>(src + r * D + c));
        }
#pragma unroll
        for (int u = 0; u < BATCH; ++u) {
            const int idx = base + u * nthreads;
            const int r = idx / vecs_per_row;
            const int c = (idx - r * vecs_per_row) * E;
            if (idx < total) store(dst + r * ld + c, raw[u]);
        }
    }
}

// The same tile as float32 (row stride ld, a multiple of 4); VEC as above,
// else element by element for any D and alignment.
template <typename T, bool VEC>
__device__ __forceinline__ void load_tile(float* __restrict__ dst, int ld, int rows_total,
                                          int cols_total, const T* __restrict__ src, int64_t D,
                                          int rows_valid, int cols_valid) {
    if constexpr (VEC) {
        // Batch of 1: this kernel is compute-bound and more registers would spill.
        load_tile_vec<1>(dst, ld, rows_total, cols_total, src, D, rows_valid, cols_valid, [](float* out, uint4 raw) {
            constexpr int E = Vec16<T>::kElems;
            float v[E];
            unpack16(raw, v, static_cast<const T*>(nullptr));
#pragma unroll
            for (int e = 0; e < E; e += 4)
                reinterpret_cast<float4*>(out)[e / 4] = make_float4(v[e], v[e + 1], v[e + 2], v[e + 3]);
        });
    } else {
        const int total = rows_total * cols_total;
        for (int idx = threadIdx.x; idx < total; idx += blockDim.x) {
            const int r = idx / cols_total;
            const int c = idx - r * cols_total;
            float v = 0.0f;
            if (r < rows_valid && c < cols_valid) v = to_float(src[r * D + c]);
            dst[r * ld + c] = v;
        }
    }
}

// ---------------------------------------------------------------------------
// MaxSim: what both kernels share.

constexpr int kBN = 64;        // document tokens per tile
constexpr int kBK = 32;        // D chunks are multiples of this
constexpr int kMaxGroup = 64;  // most queries per block

struct MaxSimParams {
    const void* queries;
    const void* docs;
    const int32_t* query_lengths;
    const int64_t* doc_offsets;
    float* scores;
    int64_t B, Lq, D, N;
    int64_t groups;  // ceil(B / group): query groups per document
    int group;       // queries per block
    int dc;          // D chunk resident in shared memory, a multiple of kBK
    int nchunks;     // ceil(D / dc) >= 1
};

__device__ __forceinline__ int64_t query_len(const MaxSimParams& p, int64_t b) {
    if (p.query_lengths == nullptr) return p.Lq;
    const int64_t len = p.query_lengths[b];
    return len < 0 ? 0 : (len > p.Lq ? p.Lq : len);
}

// Work items are (document n, query group); item = n * groups + group, so the
// blocks of one document are adjacent and its tokens come from HBM once and
// from L2 for the other groups. A block walks items blockIdx.x, + gridDim.x, ...
// The walk is tracked incrementally: 64-bit division is a slow subroutine that
// also costs registers (spills) when it sits inside the loop.
struct ItemWalk {
    int64_t n, grp, step_n, step_grp;
};

__device__ __forceinline__ ItemWalk item_walk_begin(const MaxSimParams& p) {
    const unsigned groups = static_cast<unsigned>(p.groups);  // < 2^31, checked by the host
    ItemWalk it;
    it.n = blockIdx.x / groups;
    it.grp = blockIdx.x % groups;
    it.step_n = gridDim.x / groups;
    it.step_grp = gridDim.x % groups;
    return it;
}

__device__ __forceinline__ void item_walk_next(const MaxSimParams& p, ItemWalk& it) {
    it.n += it.step_n;
    it.grp += it.step_grp;
    if (it.grp >= p.groups) {
        it.grp -= p.groups;
        ++it.n;
    }
}

// One unit of work: document n against queries [b0, b1). The group's query
// tokens are rows [b0 * Lq, b1 * Lq) of the queries viewed as [B * Lq, D].
struct WorkItem {
    int64_t n, b0, b1, doc_begin, doc_end;
};

__device__ __forceinline__ WorkItem work_item(const MaxSimParams& p, const ItemWalk& it) {
    WorkItem w;
    w.n = it.n;
    w.b0 = it.grp * p.group;
    w.b1 = w.b0 + p.group < p.B ? w.b0 + p.group : p.B;
    w.doc_begin = p.doc_offsets[w.n];
    w.doc_end = p.doc_offsets[w.n + 1];
    return w;
}

// Does row tile [r0, r0 + rows) hold an unmasked token? bfirst is the query of
// row r0. Every thread computes the same answer, so it can steer barriers.
__device__ __forceinline__ bool tile_has_valid_row(const MaxSimParams& p, int64_t bfirst, int64_t r0, int rows) {
    for (int64_t b = bfirst; b * p.Lq < r0 + rows; ++b) {
        const int64_t len = query_len(p, b);
        if (len > 0 && b * p.Lq + len > r0) return true;
    }
    return false;
}

// Adds, per query, the maxima of its unmasked rows in this tile to qacc, in
// row order (deterministic). Call after a barrier that publishes rowmax.
__device__ __forceinline__ void add_tile_row_sums(const MaxSimParams& p, const float* rowmax, float* qacc,
                                                  int64_t b0, int64_t bfirst, int64_t r0, int rows) {
    for (int64_t b = bfirst + threadIdx.x; b * p.Lq < r0 + rows; b += blockDim.x) {
        const int64_t len = query_len(p, b);
        const int64_t lo = b * p.Lq > r0 ? b * p.Lq : r0;
        const int64_t hi = b * p.Lq + len < r0 + rows ? b * p.Lq + len : r0 + rows;
        if (hi > lo) {
            float s = 0.0f;
            for (int64_t r = lo; r < hi; ++r) s += rowmax[r - r0];
            qacc[b - b0] += s;
        }
    }
}

// ---------------------------------------------------------------------------
// SIMT kernel (every dtype, any D and alignment): a register-tiled float32
// GEMM per (row tile, document tile), each thread owning kTM x kTN outputs.

constexpr int kDsStride = kBK + 4;      // padded row: conflict-free float4 reads and writes
constexpr int kTM = 4;                  // query rows per thread
constexpr int kTN = 4;                  // document columns per thread (strided by 16)
constexpr int kColThreads = kBN / kTN;  // 16: one half-warp shares its rows

template <int BM>
__host__ __device__ constexpr size_t simt_smem_bytes(int dc, int group) {
    return (static_cast<size_t>(BM) * (dc + 4) + static_cast<size_t>(kBN) * kDsStride + BM + group) * sizeof(float);
}

// Register cap 128 (4 warps x 4 blocks or 8 warps x 2 per SM): lower caps spill.
template <typename T, int BM, bool VEC>
__global__ void __launch_bounds__(BM / kTM * kColThreads, 512 / (BM / kTM * kColThreads))
    maxsim_simt_kernel(const MaxSimParams p) {
    static_assert(BM % kTM == 0 && (BM / kTM) * kColThreads % 32 == 0, "whole warps");
    extern __shared__ float4 smem_f4[];
    const int qs_stride = p.dc + 4;
    float* const Qs = reinterpret_cast<float*>(smem_f4);  // [BM][dc + 4]
    float* const Ds = Qs + BM * qs_stride;                // [kBN][kDsStride]
    float* const rowmax = Ds + kBN * kDsStride;           // [BM]
    float* const qacc = rowmax + BM;                      // [group]

    const int tid = static_cast<int>(threadIdx.x);
    const int tx = tid % kColThreads;  // column group: lanes 0-15 / 16-31 of a warp
    const int ty = tid / kColThreads;  // row group
    const T* const queries = static_cast<const T*>(p.queries);
    const T* const docs = static_cast<const T*>(p.docs);
    const int64_t Lq = p.Lq;
    const int64_t D = p.D;
    const int nchunks = p.nchunks;

    for (ItemWalk it = item_walk_begin(p); it.n < p.N; item_walk_next(p, it)) {
        const WorkItem w = work_item(p, it);
        if (w.doc_end <= w.doc_begin) {  // block-uniform: an empty document scores -inf
            for (int64_t b = w.b0 + tid; b < w.b1; b += blockDim.x) p.scores[b * p.N + w.n] = neg_inf();
            continue;
        }
        // Each qacc entry is zeroed here and read at the end by the same thread;
        // the summing threads in between are ordered by the tiles' barriers.
        for (int g = tid; g < w.b1 - w.b0; g += blockDim.x) qacc[g] = 0.0f;

        const int64_t row_end = w.b1 * Lq;
        int64_t bfirst = w.b0;  // the query of row r0, tracked without 64-bit division
        for (int64_t r0 = w.b0 * Lq; r0 < row_end; r0 += BM) {
            while ((bfirst + 1) * Lq <= r0) ++bfirst;
            const int rows = static_cast<int>(row_end - r0 < BM ? row_end - r0 : BM);
            if (!tile_has_valid_row(p, bfirst, r0, rows)) continue;

            const T* const qtile = queries + r0 * D;
            // With one chunk the query tile stays resident for the whole document.
            // Safe to overwrite: every read of Qs by the previous tile precedes the
            // barrier before its row sums.
            if (nchunks == 1) load_tile<T, VEC>(Qs, qs_stride, BM, p.dc, qtile, D, rows, static_cast<int>(D));

            float m[kTM];
#pragma unroll
            for (int r = 0; r < kTM; ++r) m[r] = neg_inf();

            for (int64_t t0 = w.doc_begin; t0 < w.doc_end; t0 += kBN) {
                const int cols = static_cast<int>(w.doc_end - t0 < kBN ? w.doc_end - t0 : kBN);
                const T* const dtile = docs + t0 * D;
                float acc[kTM][kTN];
#pragma unroll
                for (int r = 0; r < kTM; ++r)
#pragma unroll
                    for (int c = 0; c < kTN; ++c) acc[r][c] = 0.0f;

                for (int chunk = 0; chunk < nchunks; ++chunk) {
                    const int64_t k0 = static_cast<int64_t>(chunk) * p.dc;
                    const int klen = static_cast<int>(D - k0 < p.dc ? D - k0 : p.dc);
                    if (nchunks > 1) {
                        __syncthreads();  // all reads of the previous chunk are done
                        load_tile<T, VEC>(Qs, qs_stride, BM, p.dc, qtile + k0, D, rows, klen);
                    }
                    for (int kk = 0; kk < klen; kk += kBK) {
                        __syncthreads();  // all reads of the previous Ds tile are done
                        const int kw = klen - kk < kBK ? klen - kk : kBK;
                        load_tile<T, VEC>(Ds, kDsStride, kBN, kBK, dtile + k0 + kk, D, cols, kw);
                        __syncthreads();  // Ds (and Qs) visible to all
                        const float* qrow = Qs + ty * kTM * qs_stride + kk;
                        const float* dcol = Ds + tx * kDsStride;
#pragma unroll
                        for (int k = 0; k < kBK; k += 4) {
                            float4 a[kTM], d[kTN];
#pragma unroll
                            for (int r = 0; r < kTM; ++r)
                                a[r] = *reinterpret_cast<const float4*>(qrow + r * qs_stride + k);
#pragma unroll
                            for (int c = 0; c < kTN; ++c)
                                d[c] = *reinterpret_cast<const float4*>(dcol + c * kColThreads * kDsStride + k);
#pragma unroll
                            for (int r = 0; r < kTM; ++r)
#pragma unroll
                                for (int c = 0; c < kTN; ++c) {
                                    float s = acc[r][c];
                                    s = fmaf(a[r].x, d[c].x, s);
                                    s = fmaf(a[r].y, d[c].y, s);
                                    s = fmaf(a[r].z, d[c].z, s);
                                    s = fmaf(a[r].w, d[c].w, s);
                                    acc[r][c] = s;
                                }
                        }
                    }
                }
                // Only real document tokens enter the max.
#pragma unroll
                for (int c = 0; c < kTN; ++c) {
                    if (tx + c * kColThreads < cols) {
#pragma unroll
                        for (int r = 0; r < kTM; ++r) m[r] = nan_max(m[r], acc[r][c]);
                    }
                }
            }

            // Row max across the 16 column threads (one half-warp).
#pragma unroll
            for (int r = 0; r < kTM; ++r) {
#pragma unroll
                for (int off = kColThreads / 2; off > 0; off >>= 1)
                    m[r] = nan_max(m[r], __shfl_xor_sync(kFullMask, m[r], off));
            }
            if (tx == 0) {
#pragma unroll
                for (int r = 0; r < kTM; ++r) rowmax[ty * kTM + r] = m[r];
            }
            __syncthreads();  // rowmax visible; all reads of Qs/Ds of this tile done
            add_tile_row_sums(p, rowmax, qacc, w.b0, bfirst, r0, rows);
        }
        __syncthreads();  // row sums visible
        for (int g = tid; g < w.b1 - w.b0; g += blockDim.x) p.scores[(w.b0 + g) * p.N + w.n] = qacc[g];
    }
}

// ---------------------------------------------------------------------------
// Tensor-core kernel (float16 / bfloat16, D a multiple of 8, 16-byte aligned
// inputs, sm_80+): WMMA 16x16x16 with float32 accumulators. 4 warps; a row tile
// of 32 query tokens against 64 document tokens, each warp one 16 x 32 block.
// The accumulators go through shared memory (their register layout is opaque)
// where each thread folds 16 of its row's columns into a running max.

constexpr int kWBM = 32;              // query rows per tile
constexpr int kWThreads = 128;        // 4 warps: 2 along rows x 2 along columns
constexpr int kWDcMax = 128;          // D chunk: keeps shared memory near 35 KB
constexpr int kSsStride = kBN + 4;    // float row of the score tile; multiple of 4 as WMMA asks
constexpr int kWPad = 8;              // 16 bytes: rows stay 16-byte aligned, ldmatrix conflict-free

template <typename T>
__host__ __device__ constexpr size_t wmma_smem_bytes(int dc, int group) {
    return static_cast<size_t>(kWBM + kBN) * (dc + kWPad) * sizeof(T) +
           (static_cast<size_t>(kWBM) * kSsStride + kWBM + group) * sizeof(float);
}

// The same tile of 16-bit values, unchanged (for the tensor cores).
template <typename T>
__device__ __forceinline__ void load_tile_raw16(T* __restrict__ dst, int ld, int rows_total, int cols_total,
                                                const T* __restrict__ src, int64_t D, int rows_valid,
                                                int cols_valid) {
    static_assert(sizeof(T) == 2, "16-bit types");
    // Batches of 4: the tensor-core kernel mostly waits on memory.
    load_tile_vec<4>(dst, ld, rows_total, cols_total, src, D, rows_valid, cols_valid,
                     [](T* out, uint4 raw) { *reinterpret_cast<uint4*>(out) = raw; });
}

// 6 blocks per SM (register cap 80, no spills): latency hiding for a kernel
// that mostly waits on memory.
template <typename T>
__global__ void __launch_bounds__(kWThreads, 6) maxsim_wmma_kernel(const MaxSimParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
    // Never launched below sm_80 (the host picks the SIMT kernel there).
#else
    using namespace nvcuda;
    extern __shared__ __align__(128) float4 wsmem_f4[];  // WMMA pointers need 32-byte alignment
    const int ld = p.dc + kWPad;
    T* const Qs = reinterpret_cast<T*>(wsmem_f4);             // [kWBM][ld]
    T* const Ds = Qs + kWBM * ld;                             // [kBN][ld]
    float* const Ss = reinterpret_cast<float*>(Ds + kBN * ld);  // [kWBM][kSsStride]
    float* const rowmax = Ss + kWBM * kSsStride;              // [kWBM]
    float* const qacc = rowmax + kWBM;                        // [group]

    const int tid = static_cast<int>(threadIdx.x);
    const int warp = tid / 32;
    const int wm = warp & 1;        // rows 16 * wm .. + 16 of the tile
    const int wn = warp >> 1;       // columns 32 * wn .. + 32
    const int my_row = tid >> 2;    // the row this thread folds into its running max
    const int my_col = tid & 3;     // and its columns my_col + 4 i (conflict-free reads)
    const T* const queries = static_cast<const T*>(p.queries);
    const T* const docs = static_cast<const T*>(p.docs);
    const int64_t Lq = p.Lq;
    const int64_t D = p.D;
    const int nchunks = p.nchunks;

    for (ItemWalk it = item_walk_begin(p); it.n < p.N; item_walk_next(p, it)) {
        const WorkItem w = work_item(p, it);
        if (w.doc_end <= w.doc_begin) {
            for (int64_t b = w.b0 + tid; b < w.b1; b += blockDim.x) p.scores[b * p.N + w.n] = neg_inf();
            continue;
        }
        for (int g = tid; g < w.b1 - w.b0; g += blockDim.x) qacc[g] = 0.0f;

        const int64_t row_end = w.b1 * Lq;
        int64_t bfirst = w.b0;
        for (int64_t r0 = w.b0 * Lq; r0 < row_end; r0 += kWBM) {
            while ((bfirst + 1) * Lq <= r0) ++bfirst;
            const int rows = static_cast<int>(row_end - r0 < kWBM ? row_end - r0 : kWBM);
            if (!tile_has_valid_row(p, bfirst, r0, rows)) continue;

            const T* const qtile = queries + r0 * D;
            if (nchunks == 1) load_tile_raw16(Qs, ld, kWBM, p.dc, qtile, D, rows, static_cast<int>(D));
            float m = neg_inf();

            for (int64_t t0 = w.doc_begin; t0 < w.doc_end; t0 += kBN) {
                const int cols = static_cast<int>(w.doc_end - t0 < kBN ? w.doc_end - t0 : kBN);
                const T* const dtile = docs + t0 * D;
                wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2];
                wmma::fill_fragment(acc[0], 0.0f);
                wmma::fill_fragment(acc[1], 0.0f);

                for (int chunk = 0; chunk < nchunks; ++chunk) {
                    const int64_t k0 = static_cast<int64_t>(chunk) * p.dc;
                    const int klen = static_cast<int>(D - k0 < p.dc ? D - k0 : p.dc);
                    if (nchunks > 1) {
                        __syncthreads();  // all reads of the previous Q chunk are done
                        load_tile_raw16(Qs, ld, kWBM, p.dc, qtile + k0, D, rows, klen);
                    }
                    // No barrier needed before overwriting Ds: the MMAs that read it
                    // finished before the barrier that published Ss (or the one above).
                    load_tile_raw16(Ds, ld, kBN, p.dc, dtile + k0, D, cols, klen);
                    // Ds (and Qs) visible to all; all reads of Ss by the running max done.
                    __syncthreads();
                    // Columns from klen up to the next multiple of 16 are zeros.
                    for (int k = 0; k < klen; k += 16) {
                        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
                        wmma::load_matrix_sync(a, Qs + wm * 16 * ld + k, ld);
#pragma unroll
                        for (int f = 0; f < 2; ++f) {
                            // Ds holds document tokens as rows: B = Ds^T is column-major.
                            wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> bfrag;
                            wmma::load_matrix_sync(bfrag, Ds + (wn * 32 + f * 16) * ld + k, ld);
                            wmma::mma_sync(acc[f], a, bfrag, acc[f]);
                        }
                    }
                }
#pragma unroll
                for (int f = 0; f < 2; ++f)
                    wmma::store_matrix_sync(Ss + wm * 16 * kSsStride + wn * 32 + f * 16, acc[f], kSsStride,
                                            wmma::mem_row_major);
                __syncthreads();  // Ss visible
#pragma unroll
                for (int i = 0; i < kBN / 4; ++i) {
                    const int col = my_col + 4 * i;
                    if (col < cols) m = nan_max(m, Ss[my_row * kSsStride + col]);  // real tokens only
                }
            }

            // Row max across the 4 threads of a row (adjacent lanes).
            m = nan_max(m, __shfl_xor_sync(kFullMask, m, 1));
            m = nan_max(m, __shfl_xor_sync(kFullMask, m, 2));
            if (my_col == 0) rowmax[my_row] = m;
            __syncthreads();  // rowmax visible; all reads of Qs/Ds/Ss of this tile done
            add_tile_row_sums(p, rowmax, qacc, w.b0, bfirst, r0, rows);
        }
        __syncthreads();
        for (int g = tid; g < w.b1 - w.b0; g += blockDim.x) p.scores[(w.b0 + g) * p.N + w.n] = qacc[g];
    }
#endif
}

// Lq == 0 or D == 0: every similarity is empty or 0, so a non-empty document
// scores 0 and an empty one -inf.
__global__ void maxsim_trivial_kernel(const int64_t* __restrict__ doc_offsets, int64_t B, int64_t N,
                                      float* __restrict__ scores) {
    const int64_t total = B * N;
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
         i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
        const int64_t n = i % N;
        scores[i] = doc_offsets[n + 1] > doc_offsets[n] ? 0.0f : neg_inf();
    }
}

// ---------------------------------------------------------------------------
// MaxSim host side: configuration and dispatch.

// Picks how many queries share a block: the fraction of the row tiles that
// holds real rows, highest wins, fewer queries on a tie.
double pick_group(int64_t B, int64_t Lq, int bm, int* group) {
    double best = -1.0;
    *group = 1;
    const int64_t gmax = B < kMaxGroup ? B : kMaxGroup;
    for (int64_t g = 1; g <= gmax; ++g) {
        const int64_t rows = g * Lq;
        const int64_t tiles = (rows + bm - 1) / bm;
        const double eff = static_cast<double>(rows) / static_cast<double>(tiles * bm);
        if (eff > best + 1e-9) {
            best = eff;
            *group = static_cast<int>(g);
        }
    }
    return best;
}

// The resident D chunk: as large as the budget allows, then balanced so the
// last chunk is not mostly padding.
int pick_chunk(int64_t D, int dc_max) {
    const int64_t padded = (D + kBK - 1) / kBK * kBK;
    const int64_t chunks = (padded + dc_max - 1) / dc_max;
    const int64_t per = (D + chunks - 1) / chunks;
    return static_cast<int>((per + kBK - 1) / kBK * kBK);
}

template <typename Kernel>
cudaError_t launch_items(Kernel kernel, MaxSimParams p, int group, int dc, int threads, size_t smem,
                         cudaStream_t stream) {
    p.group = group;
    p.groups = (p.B + group - 1) / group;
    if (p.groups >= INT_MAX || p.N > INT64_MAX / p.groups) return cudaErrorInvalidValue;  // items walked in 32 bits
    p.dc = dc;
    p.nchunks = static_cast<int>((p.D + dc - 1) / dc);
    // Under the 48 KB default dynamic shared memory limit by construction:
    // no opt-in, and several blocks fit on an SM.
    const int64_t items = p.N * p.groups;
    const unsigned grid = static_cast<unsigned>(items < INT_MAX ? items : INT_MAX);
    kernel<<<grid, threads, smem, stream>>>(p);
    return cudaGetLastError();
}

template <typename T, int BM, bool VEC>
cudaError_t launch_simt(const MaxSimParams& p, int group, cudaStream_t stream) {
    const int dc = pick_chunk(p.D, BM >= 64 ? 128 : 256);  // query tile near 32 KB
    return launch_items(maxsim_simt_kernel<T, BM, VEC>, p, group, dc, BM / kTM * kColThreads,
                        simt_smem_bytes<BM>(dc, group), stream);
}

template <typename T>
cudaError_t launch_wmma(const MaxSimParams& p, cudaStream_t stream) {
    int group = 1;
    pick_group(p.B, p.Lq, kWBM, &group);
    const int dc = pick_chunk(p.D, kWDcMax);
    return launch_items(maxsim_wmma_kernel<T>, p, group, dc, kWThreads, wmma_smem_bytes<T>(dc, group), stream);
}

// VKERN_MAXSIM_TENSOR_CORES=0 forces the SIMT kernel for float16/bfloat16 (to
// compare the two, or to rule the tensor-core path out when debugging).
bool tensor_cores_allowed() {
    const char* env = std::getenv("VKERN_MAXSIM_TENSOR_CORES");
    if (env != nullptr && env[0] == '0') return false;
    int dev = 0, major = 0;
    if (cudaGetDevice(&dev) != cudaSuccess) return false;
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) return false;
    return major >= 8;
}

template <typename T>
cudaError_t dispatch_maxsim(const MaxSimParams& p, cudaStream_t stream) {
    constexpr int E = Vec16<T>::kElems;
    const bool vec = p.D % E == 0 && reinterpret_cast<uintptr_t>(p.queries) % 16 == 0 &&
                     reinterpret_cast<uintptr_t>(p.docs) % 16 == 0;
    if constexpr (sizeof(T) == 2) {
        if (vec && tensor_cores_allowed()) return launch_wmma<T>(p, stream);
    }
    int g64 = 1, g32 = 1;
    const double eff64 = pick_group(p.B, p.Lq, 64, &g64);
    const double eff32 = pick_group(p.B, p.Lq, 32, &g32);
    // The 64-row tile reuses each document tile twice as often; take it unless
    // it pads more.
    if (eff64 + 1e-9 >= eff32) {
        return vec ? launch_simt<T, 64, true>(p, g64, stream) : launch_simt<T, 64, false>(p, g64, stream);
    }
    return vec ? launch_simt<T, 32, true>(p, g32, stream) : launch_simt<T, 32, false>(p, g32, stream);
}

// ---------------------------------------------------------------------------
// Row top-k.

constexpr int kTopkThreads = 1024;
constexpr int kTopkSmemK = 2048;  // k up to this sorts in shared memory; larger k sorts in place in the output

// Unsigned key, larger = better: IEEE order, -0 == +0, NaN below -inf.
__device__ __forceinline__ uint32_t order_key(float v) {
    uint32_t u = __float_as_uint(v);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0u;  // NaN (-inf maps to 0x007fffff)
    if (u == 0x80000000u) u = 0u;
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Orders two (score, index) pairs: a before b when a is better.
__device__ __forceinline__ bool ranks_before(float sa, int64_t ia, float sb, int64_t ib) {
    const uint32_t ka = order_key(sa), kb = order_key(sb);
    return ka > kb || (ka == kb && ia < ib);
}

// Bitonic sort, best first, of n pairs by the whole block. Every comparator puts
// the better pair at its lower position, so the virtual padding up to a power of
// two (worst pairs, at the end) never moves and its comparators can be skipped.
__device__ __forceinline__ void bitonic_sort(float* s, int64_t* idx, int64_t n) {
    int64_t pow2 = 1;
    while (pow2 < n) pow2 <<= 1;
    const int64_t pairs = pow2 / 2;
    for (int64_t size = 2; size <= pow2; size <<= 1) {
        const int64_t half = size / 2;
        for (int64_t stride = half; stride > 0; stride >>= 1) {
            for (int64_t t = threadIdx.x; t < pairs; t += blockDim.x) {
                // Sizes and strides are powers of two: insert a 0 bit at `stride`.
                const int64_t i = ((t & ~(stride - 1)) << 1) | (t & (stride - 1));
                // First step of a merge compares mirror positions, then half-cleaners.
                const int64_t j = stride == half ? i ^ (size - 1) : i | stride;
                if (j < n) {
                    const float si = s[i], sj = s[j];
                    const int64_t ii = idx[i], ij = idx[j];
                    if (ranks_before(sj, ij, si, ii)) {
                        s[i] = sj;
                        s[j] = si;
                        idx[i] = ij;
                        idx[j] = ii;
                    }
                }
            }
            __syncthreads();
        }
    }
}

__global__ void __launch_bounds__(kTopkThreads, 1)
    topk_kernel(const float* scores, int64_t B, int64_t N, int64_t k, float* out_scores, int64_t* out_idx) {
    __shared__ unsigned hist[256];
    __shared__ unsigned warp_counts[kTopkThreads / 32];
    __shared__ unsigned gt_found;
    __shared__ unsigned sel_digit, sel_need;
    __shared__ float buf_s[kTopkSmemK];
    __shared__ int64_t buf_i[kTopkSmemK];

    const int tid = static_cast<int>(threadIdx.x);
    const int lane = tid % 32, warp = tid / 32;
    const int nwarps = static_cast<int>(blockDim.x) / 32;
    const bool in_smem = k <= kTopkSmemK;

    for (int64_t row = blockIdx.x; row < B; row += gridDim.x) {
        const float* const s = scores + row * N;

        // Radix select, most significant byte first: after the 4 passes `prefix`
        // is the k-th best key and `need` (>= 1) how many pairs with exactly that
        // key enter the top k; the k - need others have larger keys.
        uint32_t prefix = 0, mask = 0;
        uint32_t need = static_cast<uint32_t>(k);
        for (int shift = 24; shift >= 0; shift -= 8) {
            for (int i = tid; i < 256; i += blockDim.x) hist[i] = 0;
            __syncthreads();
            for (int64_t base = 0; base < N; base += blockDim.x) {  // warp-uniform loop
                const int64_t i = base + tid;
                const uint32_t key = i < N ? order_key(s[i]) : 0u;
                const bool hit = i < N && (key & mask) == prefix;
                const unsigned bin = hit ? (key >> shift) & 0xffu : 256u;
                // One atomic per distinct bin per warp: scores often share their top bits.
                const unsigned peers = __match_any_sync(kFullMask, bin);
                if (hit && lane == __ffs(peers) - 1) atomicAdd(&hist[bin], static_cast<unsigned>(__popc(peers)));
            }
            __syncthreads();
            if (tid == 0) {
                uint32_t above = 0;
                int d = 255;
                for (; d > 0; --d) {
                    if (above + hist[d] >= need) break;
                    above += hist[d];
                }
                sel_digit = static_cast<unsigned>(d);
                sel_need = need - above;
            }
            __syncthreads();  // sel_* visible
            // No barrier after these reads: sel_* is rewritten two barriers into
            // the next pass, and hist was last read (by thread 0) before this one.
            prefix |= sel_digit << shift;
            mask |= 0xffu << shift;
            need = sel_need;
        }
        const uint32_t threshold = prefix;
        const uint32_t n_gt = static_cast<uint32_t>(k) - need;

        // Collect: larger keys in any order at [0, n_gt); the first `need` pairs
        // equal to the threshold, in index order, at [n_gt, k).
        float* const dst_s = in_smem ? buf_s : out_scores + row * k;
        int64_t* const dst_i = in_smem ? buf_i : out_idx + row * k;
        if (tid == 0) gt_found = 0;
        __syncthreads();
        uint32_t eq_seen = 0;
        for (int64_t base = 0; base < N; base += blockDim.x) {
            const int64_t i = base + tid;
            float v = 0.0f;
            bool gt = false, eq = false;
            if (i < N) {
                v = s[i];
                const uint32_t key = order_key(v);
                gt = key > threshold;
                eq = key == threshold;
            }
            if (gt) {
                const unsigned pos = atomicAdd(&gt_found, 1u);
                if (pos < n_gt) {
                    dst_s[pos] = v;
                    dst_i[pos] = i;
                }
            }
            const unsigned ballot = __ballot_sync(kFullMask, eq);
            if (lane == 0) warp_counts[warp] = static_cast<unsigned>(__popc(ballot));
            __syncthreads();
            uint32_t before = 0, total = 0;
            for (int w = 0; w < nwarps; ++w) {
                const unsigned c = warp_counts[w];
                before += w < warp ? c : 0u;
                total += c;
            }
            if (eq) {
                const uint32_t rank = eq_seen + before + static_cast<uint32_t>(__popc(ballot & ((1u << lane) - 1u)));
                if (rank < need) {
                    dst_s[n_gt + rank] = v;
                    dst_i[n_gt + rank] = i;
                }
            }
            eq_seen += total;
            // gt_found is final: this chunk's atomics precede the barrier above.
            const bool done = eq_seen >= need && gt_found >= n_gt;
            // A barrier too: warp_counts and gt_found change only after it.
            if (__syncthreads_and(done)) break;
        }

        // The loop's last barrier published the collected pairs.
        bitonic_sort(dst_s, dst_i, k);  // ends with a barrier

        if (in_smem) {
            // buf_* is next written after the next row's radix-select barriers.
            for (int64_t i = tid; i < k; i += blockDim.x) {
                out_scores[row * k + i] = buf_s[i];
                out_idx[row * k + i] = buf_i[i];
            }
        }
    }
}

}  // namespace

// ---------------------------------------------------------------------------
// Host entry points.

cudaError_t maxsim_scores(const void* queries, const void* docs, DType dtype, int64_t B, int64_t Lq,
                          int64_t D, const int32_t* query_lengths, const int64_t* doc_offsets,
                          int64_t N, float* scores, cudaStream_t stream) {
    if (B < 0 || Lq < 0 || D < 0 || N < 0) return cudaErrorInvalidValue;
    if (B == 0 || N == 0) return cudaSuccess;
    if (scores == nullptr || doc_offsets == nullptr) return cudaErrorInvalidValue;
    if (Lq == 0 || D == 0) {
        const int64_t total = B * N;
        const int64_t blocks = (total + 255) / 256;
        maxsim_trivial_kernel<<<static_cast<unsigned>(blocks < 65535 ? blocks : 65535), 256, 0, stream>>>(
            doc_offsets, B, N, scores);
        return cudaGetLastError();
    }
    // docs may be null when T == 0 (an empty tensor): only empty documents then, never read.
    if (queries == nullptr) return cudaErrorInvalidValue;

    MaxSimParams p{};
    p.queries = queries;
    p.docs = docs;
    p.query_lengths = query_lengths;
    p.doc_offsets = doc_offsets;
    p.scores = scores;
    p.B = B;
    p.Lq = Lq;
    p.D = D;
    p.N = N;
    switch (dtype) {
        case DType::f32: return dispatch_maxsim<float>(p, stream);
        case DType::f16: return dispatch_maxsim<__half>(p, stream);
        case DType::bf16: return dispatch_maxsim<__nv_bfloat16>(p, stream);
    }
    return cudaErrorInvalidValue;
}

cudaError_t topk_rows(const float* scores, int64_t B, int64_t N, int64_t k, float* out_scores,
                      int64_t* out_idx, cudaStream_t stream) {
    if (B < 0 || N < 1 || k < 1 || k > N || N > static_cast<int64_t>(UINT32_MAX)) return cudaErrorInvalidValue;
    if (B == 0) return cudaSuccess;
    if (scores == nullptr || out_scores == nullptr || out_idx == nullptr) return cudaErrorInvalidValue;
    const unsigned grid = static_cast<unsigned>(B < INT_MAX ? B : INT_MAX);
    topk_kernel<<<grid, kTopkThreads, 0, stream>>>(scores, B, N, k, out_scores, out_idx);
    return cudaGetLastError();
}

int compiled_arch_list(int* out, int cap) {
#ifdef __CUDA_ARCH_LIST__
    const int archs[] = {__CUDA_ARCH_LIST__};
    int written = 0;
    for (int a : archs) {
        if (out == nullptr || written >= cap) break;
        out[written++] = a;
    }
    return written;
#else
    (void)out;
    (void)cap;
    return 0;
#endif
}

}  // namespace cuda
}  // namespace vkern
