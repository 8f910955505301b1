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
  switch (simd_active()) {
    case SimdLevel::generic: return taskvec_level_generic();
    case SimdLevel::avx512: return taskvec_level_avx512();
    case SimdLevel::avx512shape: return taskvec_level_avx512shape();
    default: return taskvec_level_avx2();
  }
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
    else lv.decode_axpy(comps[c], n, k0, len, 1.0f, out, out, 2);  // exact: a residual's base + offset
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
  // All components affine 4-bit with one group size (a multiple of 32): one fused pass
  // per chunk, the base read and out written once (chunks start at multiples of 32).
  bool q4 = !per_task && call.dtype == 0 && call.C >= 1 && call.C <= 8 && call.comps[0].group_size % 32 == 0;
  for (int64_t c = 0; c < call.C && q4; ++c)
    q4 = call.comps[c].scheme == 0 && call.comps[c].bits == 4 && call.comps[c].group_size == call.comps[0].group_size;
  // In place the written lines are read back soon by nobody, but the base lines are
  // already in cache: plain stores. A separate out: streaming stores (no read for ownership).
  const int stream_out = call.out != call.base && !call.keep_out;
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
        const char* src_row = row_ptr(call.base, call.dtype, call.base_stride, n, k0);
        {  // ask for the next chunk of the base now, so its loads overlap this chunk's decoding
          const int64_t nk = k0 + kChunk < K ? k0 + kChunk : 0, nn = k0 + kChunk < K ? n : n + 1;
          if (nn < n_end) {
            const char* next = row_ptr(call.base, call.dtype, call.base_stride, nn, nk);
            const int64_t bytes = std::min(kChunk, K - nk) * static_cast<int64_t>(elem_size(call.dtype));
            for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(next + off, 0, 0);
          }
        }
        float* out_row = reinterpret_cast<float*>(const_cast<char*>(row_ptr(call.out, call.dtype, call.out_stride, n, k0)));
        if (!per_task && call.dtype == 0) {
          // float32: read the base straight into the first decode, stream the last one to out.
          const float* src = reinterpret_cast<const float*>(src_row);
          if (call.C == 0) {
            std::memmove(out_row, src, static_cast<size_t>(len) * 4);
            continue;
          }
          if (q4) {
            lv.apply_q4(call.comps, call.C, n, k0, len, src, out_row, stream_out);
            continue;
          }
          for (int64_t c = 0; c < call.C; ++c) {
            const bool last = c + 1 == call.C;
            lv.decode_axpy(call.comps[c], n, k0, len, call.comps[c].coef, src, last ? out_row : acc, last);
            src = acc;
          }
          continue;
        }
        lv.load_row(src_row, call.dtype, len, acc);
        if (!per_task) {
          for (int64_t c = 0; c < call.C; ++c) lv.decode_axpy(call.comps[c], n, k0, len, call.comps[c].coef, acc, acc, 0);
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
        lv.store_row(acc, out_row, call.dtype, len);
      }
    }
    lv.store_fence();
  });
}

namespace {

// A task whose only component is a sign component: delta_linear uses the bit identity.
const TvComp* sign_only(const TvComp* comps, int64_t C, int64_t t) {
  const TvComp* found = nullptr;
  for (int64_t c = 0; c < C; ++c) {
    if (comps[c].task != t) continue;
    if (found != nullptr || comps[c].scheme != 1) return nullptr;
    found = &comps[c];
  }
  return found;
}

}  // namespace

void taskvec_delta_linear(const TvDeltaCall& call) {
  const TaskvecLevel& lv = level_now();
  const int64_t M = call.M, K = call.K, N = call.N, T = call.T;
  const int nthreads = num_threads();
  // Columns per chunk: the chunk of every row of x stays in L2 (<= 256 KiB), and a
  // few rows take the whole row at once (longer streams for the prefetcher).
  int64_t chunk = std::max<int64_t>(512, (int64_t(1) << 16) / std::max<int64_t>(M, 1)) / 32 * 32;
  chunk = std::min<int64_t>(chunk, (K + 7) / 8 * 8);
  const int64_t kDeltaChunk = chunk;
  const int64_t per_worker = 2 * kDeltaChunk + 2 * M + 16;  // + 16: workers' sums never share a cache line
  std::vector<float> scratch(static_cast<size_t>(nthreads) * per_worker);
  std::vector<int64_t> all_rows(static_cast<size_t>(M));
  for (int64_t m = 0; m < M; ++m) all_rows[m] = m;

  // Task mode: sum of x per scale group, per row, for the sign-only tasks.
  std::vector<const TvComp*> sign(static_cast<size_t>(T), nullptr);      // used by the chunked path
  std::vector<const TvComp*> sign_any(static_cast<size_t>(T), nullptr);  // used by the fused path
  std::vector<std::vector<float>> sum_x(static_cast<size_t>(T));
  if (!call.merged) {
    for (int64_t t = 0; t < T; ++t) {
      const int64_t r0 = call.group_start[t + 1], r1 = call.group_start[t + 2];
      sign_any[t] = r1 > r0 ? sign_only(call.comps, call.C, t) : nullptr;
      // (Measured: the bit identity also beats decode-then-FMA-dot at 8 rows per task.)
      sign[t] = sign_any[t];
      if (sign[t] == nullptr) continue;
      const int64_t G = sign[t]->n_groups, gs = sign[t]->group_size;
      std::vector<float>& sx = sum_x[t];
      sx.assign(static_cast<size_t>((r1 - r0) * G), 0.0f);
      for (int64_t i = r0; i < r1; ++i) {
        const float* xm = call.x + call.row_order[i] * K;
        for (int64_t g = 0; g < G; ++g) {
          double acc = 0.0;
          for (int64_t k = g * gs; k < std::min(K, (g + 1) * gs); ++k) acc += xm[k];
          sx[(i - r0) * G + g] = static_cast<float>(acc);
        }
      }
    }
  }

  // Tasks of one affine 4-bit component (group_size a multiple of 32, chunks start at
  // multiples of 32): x . delta straight from the codes, no decoded row.
  std::vector<const TvComp*> q4(static_cast<size_t>(T), nullptr);
  if (!call.merged && (kDeltaChunk % 32 == 0 || kDeltaChunk >= K)) {
    for (int64_t t = 0; t < T; ++t) {
      const TvComp* only = nullptr;
      int count = 0;
      for (int64_t c = 0; c < call.C; ++c)
        if (call.comps[c].task == t) { only = &call.comps[c]; ++count; }
      if (count == 1 && only->scheme == 0 && only->bits == 4 && only->group_size % 32 == 0) q4[t] = only;
    }
  }

  // Few rows, each with a sign task of one scale per row or tensor (BitDelta) or none:
  // one fused pass per base row (dot and bit sums together) while the base streams in.
  bool fused = !call.merged && M <= 8 && !call.base_done;
  std::vector<int64_t> row_task(static_cast<size_t>(M), -1);
  if (fused) {
    for (int64_t t = -1; t < T; ++t)
      for (int64_t i = call.group_start[t + 1]; i < call.group_start[t + 2]; ++i) row_task[call.row_order[i]] = t;
    for (int64_t m = 0; m < M && fused; ++m) {
      const int64_t t = row_task[m];
      fused = t < 0 || (sign_any[t] != nullptr && sign_any[t]->n_groups == 1);
    }
  }
  if (fused) {
    std::vector<float> row_sum_x(static_cast<size_t>(M), 0.0f);
    std::vector<float> row_coef(static_cast<size_t>(M), 0.0f);
    for (int64_t m = 0; m < M; ++m) {
      double acc = 0.0;
      for (int64_t k = 0; k < K; ++k) acc += call.x[m * K + k];
      row_sum_x[m] = static_cast<float>(acc);
      if (row_task[m] >= 0) row_coef[m] = sign_any[row_task[m]]->coef;
    }
    const int64_t rows = std::max<int64_t>(1, std::min<int64_t>(16, N / (8 * nthreads)));
    const int64_t ntasks = (N + rows - 1) / rows;
    parallel_for(ntasks, [&](int64_t task, int worker) {
      float* basebuf = scratch.data() + static_cast<size_t>(worker) * per_worker;
      float* dots = basebuf + kDeltaChunk;
      float* signs = dots + M;
      const uint8_t* code_rows[8];
      const int64_t n_end = std::min(N, (task + 1) * rows);
      for (int64_t n = task * rows; n < n_end; ++n) {
        for (int64_t m = 0; m < M; ++m) {
          const int64_t t = row_task[m];
          code_rows[m] = t < 0 ? nullptr : sign_any[t]->codes + n * sign_any[t]->row_bytes;
        }
        std::fill(dots, dots + 2 * M, 0.0f);
        for (int64_t k0 = 0; k0 < K; k0 += kDeltaChunk) {
          const int64_t len = std::min(kDeltaChunk, K - k0);
          const float* b;
          if (call.dtype == 0) {
            b = reinterpret_cast<const float*>(row_ptr(call.base, 0, call.base_stride, n, k0));
          } else {
            lv.load_row(row_ptr(call.base, call.dtype, call.base_stride, n, k0), call.dtype, len, basebuf);
            b = basebuf;
          }
          lv.dot_sign_rows(b, call.x, K, code_rows, M, k0, len, dots, signs);
        }
        for (int64_t m = 0; m < M; ++m) {
          float y = dots[m];
          const int64_t t = row_task[m];
          if (t >= 0) {
            const float s = sign_any[t]->scales[sign_any[t]->per_row ? n : 0];
            y += row_coef[m] * s * (2.0f * signs[m] - row_sum_x[m]);  // x . (+-s) = s (2 sum_bit x - sum x)
          }
          call.y[m * N + n] = y;
        }
      }
    });
    return;
  }

  // Few rows (a decode step), each with its own task (any scheme, bits and components) or
  // none: per output row, one pass over the base row for all rows of x together with each
  // row's codes (lv.fused_rows). A one-component affine 4-bit task (group_size % 32 == 0)
  // multiplies straight from the nibbles (x deinterleaved per block and its group sums taken
  // once per call); any other task's row n is decoded exactly into an L1 buffer first, once
  // per distinct task.
  if (!call.merged && !call.base_done && M >= 1 && M <= 8) {
    const int64_t blk = lv.fused_block;
    const int64_t KB = K / blk * blk;
    std::vector<int64_t> rt(static_cast<size_t>(M), -1);
    for (int64_t t = -1; t < T; ++t)
      for (int64_t i = call.group_start[t + 1]; i < call.group_start[t + 2]; ++i) rt[call.row_order[i]] = t;
    const TvComp* tasks[8] = {};
    int isq4[8] = {};
    float coef[8] = {};
    int slot[8];                 // decoded-values buffer of row m (-1: none)
    int64_t slot_task[8];
    int nslots = 0;
    std::vector<float> xs(static_cast<size_t>(std::max<int64_t>(1, M * KB)));
    std::vector<std::vector<float>> gsum(static_cast<size_t>(M));
    const float* xsp[8] = {};
    const float* gsp[8] = {};
    for (int64_t m = 0; m < M; ++m) {
      slot[m] = -1;
      const int64_t t = rt[m];
      if (t < 0) continue;
      for (int64_t c = 0; c < call.C; ++c)
        if (call.comps[c].task == t) { tasks[m] = &call.comps[c]; coef[m] = call.comps[c].coef; }
      if (tasks[m] == nullptr) continue;  // a task with no components: the base alone
      if (q4[t] != nullptr) {
        isq4[m] = 1;
        tasks[m] = q4[t];
        const float* xm = call.x + m * K;
        float* sm = xs.data() + m * KB;
        const int64_t half = blk / 2;
        for (int64_t k = 0; k < KB; k += blk)
          for (int64_t j = 0; j < half; ++j) {
            sm[k + j] = xm[k + 2 * j];
            sm[k + half + j] = xm[k + 2 * j + 1];
          }
        const TvComp& c = *q4[t];
        gsum[m].assign(static_cast<size_t>(c.n_groups), 0.0f);
        for (int64_t g = 0; g < c.n_groups; ++g) {
          double acc = 0.0;
          for (int64_t k = g * c.group_size; k < std::min(K, (g + 1) * c.group_size); ++k) acc += xm[k];
          gsum[m][g] = static_cast<float>(acc);
        }
        xsp[m] = sm;
        gsp[m] = gsum[m].data();
      } else {
        for (int i = 0; i < nslots && slot[m] < 0; ++i)
          if (slot_task[i] == t) slot[m] = i;
        if (slot[m] < 0) {
          slot_task[nslots] = t;
          slot[m] = nslots++;
        }
        // coef[m]: the task's coefficient (every component of a task carries it); task_values
        // gives the unscaled sum of its components, as the chunked path below uses them
      }
    }
    const int64_t rows = std::max<int64_t>(1, std::min<int64_t>(16, N / (8 * nthreads)));
    const int64_t ntasks = (N + rows - 1) / rows;
    const int64_t per = K + nslots * K + 16;
    std::vector<float> fscratch(static_cast<size_t>(nthreads) * per);
    parallel_for(ntasks, [&](int64_t task, int worker) {
      float* basebuf = fscratch.data() + static_cast<size_t>(worker) * per;
      float* valbuf = basebuf + K;
      const float* vals[8] = {};
      for (int64_t m = 0; m < M; ++m)
        if (slot[m] >= 0) vals[m] = valbuf + slot[m] * K;
      float outv[8];
      const int64_t n_end = std::min(N, (task + 1) * rows);
      constexpr int64_t kAhead = 2;
      for (int64_t n = task * rows; n < std::min(n_end, task * rows + kAhead); ++n) {  // the first rows' loads
        const char* nb = row_ptr(call.base, call.dtype, call.base_stride, n, 0);
        for (int64_t off = 0; off < K * static_cast<int64_t>(elem_size(call.dtype)); off += 64)
          __builtin_prefetch(nb + off, 0, 3);
      }
      for (int64_t n = task * rows; n < n_end; ++n) {
        if (n + kAhead < n_end) {  // ask for a later base row and code rows now: their loads overlap this work
          const char* nb = row_ptr(call.base, call.dtype, call.base_stride, n + kAhead, 0);
          const int64_t bytes = K * static_cast<int64_t>(elem_size(call.dtype));
          for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(nb + off, 0, 3);
          for (int64_t m = 0; m < M; ++m) {
            if (!isq4[m]) continue;
            const uint8_t* nc = tasks[m]->codes + (n + kAhead) * tasks[m]->row_bytes;
            for (int64_t off = 0; off < tasks[m]->row_bytes; off += 64) __builtin_prefetch(nc + off, 0, 3);
          }
        }
        const float* b;
        if (call.dtype == 0) {
          b = reinterpret_cast<const float*>(row_ptr(call.base, 0, call.base_stride, n, 0));
        } else {
          lv.load_row(row_ptr(call.base, call.dtype, call.base_stride, n, 0), call.dtype, K, basebuf);
          b = basebuf;
        }
        for (int i = 0; i < nslots; ++i) task_values(lv, call.comps, call.C, slot_task[i], n, 0, K, valbuf + i * K);
        lv.fused_rows(b, call.x, K, M, n, tasks, isq4, coef, xsp, gsp, vals, outv);
        for (int64_t m = 0; m < M; ++m) call.y[m * N + n] = outv[m];
      }
    });
    return;
  }

  const int64_t rows = std::max<int64_t>(1, std::min<int64_t>(16, N / (8 * nthreads)));
  const int64_t ntasks = (N + rows - 1) / rows;
  parallel_for(ntasks, [&](int64_t task, int worker) {
    float* basebuf = scratch.data() + static_cast<size_t>(worker) * per_worker;
    float* buf = basebuf + kDeltaChunk;
    float* sums = buf + kDeltaChunk;  // [M] x . base row (row order)
    float* dacc = sums + M;           // [M] x . delta (row_order order)
    const int64_t n_end = std::min(N, (task + 1) * rows);
    for (int64_t n = task * rows; n < n_end; ++n) {
      std::fill(sums, sums + 2 * M, 0.0f);
      if (call.base_done)
        for (int64_t m = 0; m < M; ++m) sums[m] = call.y[m * N + n];
      for (int64_t k0 = 0; k0 < K; k0 += kDeltaChunk) {
        const int64_t len = std::min(kDeltaChunk, K - k0);
        const float* b = nullptr;
        if (call.base_done) {
          if (call.merged) std::memset(buf, 0, static_cast<size_t>(len) * 4);
          b = buf;  // the deltas alone: y already holds x @ base^T
        } else if (call.dtype == 0) {
          b = reinterpret_cast<const float*>(row_ptr(call.base, 0, call.base_stride, n, k0));
        } else {
          lv.load_row(row_ptr(call.base, call.dtype, call.base_stride, n, k0), call.dtype, len, basebuf);
          b = basebuf;
        }
        if (call.merged) {
          const float* src = b;
          for (int64_t c = 0; c < call.C; ++c) {
            lv.decode_axpy(call.comps[c], n, k0, len, call.comps[c].coef, src, buf, 0);
            src = buf;
          }
          lv.dot_rows(src, call.x, K, all_rows.data(), M, k0, len, sums);
          continue;
        }
        if (!call.base_done) lv.dot_rows(b, call.x, K, all_rows.data(), M, k0, len, sums);
        for (int64_t t = 0; t < T; ++t) {
          const int64_t r0 = call.group_start[t + 1], r1 = call.group_start[t + 2];
          if (r1 == r0) continue;
          if (sign[t] != nullptr) {
            lv.sign_dot_rows(*sign[t], n, call.x, K, call.row_order + r0, r1 - r0, k0, len, dacc + r0);
          } else if (q4[t] != nullptr) {
            lv.q4_dot_rows(*q4[t], n, call.x, K, call.row_order + r0, r1 - r0, k0, len, dacc + r0);
          } else {
            task_values(lv, call.comps, call.C, t, n, k0, len, buf);
            lv.dot_rows(buf, call.x, K, call.row_order + r0, r1 - r0, k0, len, dacc + r0);
          }
        }
      }
      if (call.merged) {
        for (int64_t m = 0; m < M; ++m) call.y[m * N + n] = sums[m];
        continue;
      }
      for (int64_t i = call.group_start[0]; i < call.group_start[1]; ++i) {
        const int64_t m = call.row_order[i];
        call.y[m * N + n] = sums[m];
      }
      for (int64_t t = 0; t < T; ++t) {
        const int64_t r0 = call.group_start[t + 1], r1 = call.group_start[t + 2];
        if (r1 == r0) continue;
        float coef = 0.0f;
        for (int64_t c = 0; c < call.C; ++c)
          if (call.comps[c].task == t) coef = call.comps[c].coef;
        for (int64_t i = r0; i < r1; ++i) {
          float extra = dacc[i];
          if (sign[t] != nullptr) {
            const TvComp& c = *sign[t];
            const float* s = c.scales + (c.per_row ? n * c.n_groups : 0);
            const float* sx = sum_x[t].data() + (i - r0) * c.n_groups;
            float sub = 0.0f;
            for (int64_t g = 0; g < c.n_groups; ++g) sub += s[g] * sx[g];
            extra -= sub;
          }
          const int64_t m = call.row_order[i];
          call.y[m * N + n] = sums[m] + coef * extra;
        }
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
