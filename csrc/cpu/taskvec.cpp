// Task-vector drivers: split rows across threads and walk each row in chunks
// of columns that stay in L1, calling the SIMD level's decode / dot kernels.
//
// apply: every chunk of the base is read once, all T task vectors' codes for
// that chunk are decoded into it (float32), and it is written once: one pass
// over the base, whatever T is.
// delta_linear: per output row n, the chunk base[n] + c_t * dequant(tau_t)[n]
// exists only in a thread's L1 buffer and is dotted with the rows of x that
// use task t; no dense delta is ever materialised.
#include "cpu/taskvec.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu/dispatch.h"
#include "cpu/threadpool.h"

namespace vkern {
namespace cpu {
namespace {

constexpr int64_t kChunk = 1024;  // columns per chunk (a multiple of 8)

const TaskvecLevel& level_now() {
  return simd_active() == SimdLevel::generic ? taskvec_level_generic() : taskvec_level_avx2();
}

size_t elem_size(int dtype) { return dtype == 0 ? 4 : 2; }

const char* row_ptr(const void* base, int dtype, int64_t stride, int64_t n, int64_t k0) {
  return static_cast<const char*>(base) + (n * stride + k0) * static_cast<int64_t>(elem_size(dtype));
}

// Rows per parallel task: enough work to amortise the hand-out, enough tasks to balance.
int64_t rows_per_task(int64_t N, int64_t K) {
  const int64_t by_work = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(K, 1));
  const int64_t by_balance = std::max<int64_t>(1, N / (8 * std::max(1, num_threads())));
  return std::max<int64_t>(1, std::min(by_work, by_balance));
}

// Task values of one chunk: sum of the task's components (exact dequantized values).
void task_values(const TaskvecLevel& lv, const TvComp* comps, int64_t C, int64_t t, int64_t n, int64_t k0,
                 int64_t len, float* out) {
  bool first = true;
  for (int64_t c = 0; c < C; ++c) {
    if (comps[c].task != t) continue;
    if (first) lv.decode(comps[c], n, k0, len, out);
    else lv.decode_axpy(comps[c], n, k0, len, 1.0f, out);
    first = false;
  }
  if (first) std::memset(out, 0, static_cast<size_t>(len) * 4);
}

}  // namespace

void taskvec_apply(const TvApplyCall& call) {
  const TaskvecLevel& lv = level_now();
  const int64_t N = call.N, K = call.K, T = call.T;
  const bool per_task = call.method == 1 || call.thr != nullptr;
  const int nthreads = num_threads();
  const int64_t bufs = 1 + (per_task ? T : 0);
  std::vector<float> scratch(static_cast<size_t>(nthreads) * bufs * kChunk);
  const int64_t rows = rows_per_task(N, K);
  const int64_t ntasks = (N + rows - 1) / rows;
  parallel_for(ntasks, [&](int64_t task, int worker) {
    float* acc = scratch.data() + static_cast<size_t>(worker) * bufs * kChunk;
    std::vector<const float*> vals(static_cast<size_t>(T));
    for (int64_t t = 0; t < T; ++t) vals[t] = acc + (1 + t) * kChunk;
    const int64_t n_end = std::min(N, (task + 1) * rows);
    for (int64_t n = task * rows; n < n_end; ++n) {
      for (int64_t k0 = 0; k0 < K; k0 += kChunk) {
        const int64_t len = std::min(kChunk, K - k0);
        lv.load_row(row_ptr(call.base, call.dtype, call.base_stride, n, k0), call.dtype, len, acc);
        if (!per_task) {
          for (int64_t c = 0; c < call.C; ++c) lv.decode_axpy(call.comps[c], n, k0, len, call.comps[c].coef, acc);
        } else {
          for (int64_t t = 0; t < T; ++t) {
            float* v = acc + (1 + t) * kChunk;
            task_values(lv, call.comps, call.C, t, n, k0, len, v);
            if (call.thr != nullptr) lv.trim(v, len, call.thr[t], call.cut[t], n * K + k0);
          }
          if (call.method == 1) {
            lv.ties(vals.data(), call.task_coef, T, len, acc);
          } else {
            for (int64_t t = 0; t < T; ++t) {
              const float c = call.task_coef[t], *v = vals[t];
              for (int64_t i = 0; i < len; ++i) acc[i] += c * v[i];
            }
          }
        }
        lv.store_row(acc, const_cast<char*>(row_ptr(call.out, call.dtype, call.out_stride, n, k0)), call.dtype, len);
      }
    }
  });
}

void taskvec_delta_linear(const TvDeltaCall& call) {
  const TaskvecLevel& lv = level_now();
  const int64_t M = call.M, K = call.K, N = call.N, T = call.T;
  const int nthreads = num_threads();
  constexpr int64_t kDeltaChunk = 512;  // x chunk of 64 rows = 128 KiB, stays in L2
  std::vector<float> scratch(static_cast<size_t>(nthreads) * (2 * kDeltaChunk + M));
  std::vector<int64_t> all_rows(static_cast<size_t>(M));
  for (int64_t m = 0; m < M; ++m) all_rows[m] = m;
  const int64_t rows = std::max<int64_t>(1, std::min<int64_t>(16, N / (8 * nthreads)));
  const int64_t ntasks = (N + rows - 1) / rows;
  parallel_for(ntasks, [&](int64_t task, int worker) {
    float* basebuf = scratch.data() + static_cast<size_t>(worker) * (2 * kDeltaChunk + M);
    float* buf = basebuf + kDeltaChunk;
    float* sums = buf + kDeltaChunk;  // [M], in row_order order (task mode) or row order (merged)
    const int64_t n_end = std::min(N, (task + 1) * rows);
    for (int64_t n = task * rows; n < n_end; ++n) {
      std::fill(sums, sums + M, 0.0f);
      for (int64_t k0 = 0; k0 < K; k0 += kDeltaChunk) {
        const int64_t len = std::min(kDeltaChunk, K - k0);
        const float* b;
        if (call.dtype == 0) {
          b = reinterpret_cast<const float*>(row_ptr(call.base, 0, call.base_stride, n, k0));
        } else {
          lv.load_row(row_ptr(call.base, call.dtype, call.base_stride, n, k0), call.dtype, len, basebuf);
          b = basebuf;
        }
        if (call.merged) {
          std::memcpy(buf, b, static_cast<size_t>(len) * 4);
          for (int64_t c = 0; c < call.C; ++c) lv.decode_axpy(call.comps[c], n, k0, len, call.comps[c].coef, buf);
          lv.dot_rows(buf, call.x, K, all_rows.data(), M, k0, len, sums);
          continue;
        }
        const int64_t* gs = call.group_start;
        if (gs[1] > gs[0]) lv.dot_rows(b, call.x, K, call.row_order + gs[0], gs[1] - gs[0], k0, len, sums + gs[0]);
        for (int64_t t = 0; t < T; ++t) {
          const int64_t r0 = gs[t + 1], r1 = gs[t + 2];
          if (r1 == r0) continue;
          std::memcpy(buf, b, static_cast<size_t>(len) * 4);
          for (int64_t c = 0; c < call.C; ++c)
            if (call.comps[c].task == t) lv.decode_axpy(call.comps[c], n, k0, len, call.comps[c].coef, buf);
          lv.dot_rows(buf, call.x, K, call.row_order + r0, r1 - r0, k0, len, sums + r0);
        }
      }
      for (int64_t i = 0; i < M; ++i) {
        const int64_t m = call.merged ? i : call.row_order[i];
        call.y[m * N + n] = sums[i];
      }
    }
  });
}

void taskvec_dequantize(const TvComp* comps, int64_t C, int64_t N, int64_t K, float* out) {
  const TaskvecLevel& lv = level_now();
  const int64_t rows = rows_per_task(N, K);
  const int64_t ntasks = (N + rows - 1) / rows;
  parallel_for(ntasks, [&](int64_t task, int) {
    const int64_t n_end = std::min(N, (task + 1) * rows);
    for (int64_t n = task * rows; n < n_end; ++n)
      for (int64_t k0 = 0; k0 < K; k0 += kChunk)
        task_values(lv, comps, C, comps[0].task, n, k0, std::min(kChunk, K - k0), out + n * K + k0);
  });
}

}  // namespace cpu
}  // namespace vkern
