// MaxSim driver: packs the queries, splits the documents across threads by
// token count, runs the SIMD level's per-document kernel, and either writes
// all scores or keeps a per-thread top-k heap (no [B, N] buffer needed).
#include "cpu/maxsim.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu/dispatch.h"
#include "cpu/half.h"
#include "cpu/threadpool.h"

namespace vkern {
namespace cpu {
namespace {

const MaxsimLevel& level_for(SimdLevel l) {
  switch (l) {
    case SimdLevel::avx512: return maxsim_level_avx512();
    case SimdLevel::avx2: return maxsim_level_avx2();
    case SimdLevel::avx512shape: return maxsim_level_avx512shape();
    default: return maxsim_level_generic();
  }
}

float load_scalar(const void* p, int dtype, int64_t i) {
  if (dtype == kF32) return static_cast<const float*>(p)[i];
  const uint16_t h = static_cast<const uint16_t*>(p)[i];
  return dtype == kBF16 ? bf16_to_float(h) : half_to_float(h);
}

struct Entry {
  float score;
  int64_t idx;
};

// Strict "a ranks before b": higher score first, NaN after everything
// (below -inf), ties to the lower index.
inline bool ranks_before(const Entry& a, const Entry& b) {
  const bool an = std::isnan(a.score), bn = std::isnan(b.score);
  if (an != bn) return bn;
  if (!an && a.score != b.score) return a.score > b.score;
  return a.idx < b.idx;
}

// Bounded heap of the k best entries; the front is the worst kept.
struct TopK {
  std::vector<Entry> heap;
  void offer(const Entry& e, int64_t k) {
    if (static_cast<int64_t>(heap.size()) < k) {
      heap.push_back(e);
      std::push_heap(heap.begin(), heap.end(), ranks_before);
    } else if (ranks_before(e, heap.front())) {
      std::pop_heap(heap.begin(), heap.end(), ranks_before);
      heap.back() = e;
      std::push_heap(heap.begin(), heap.end(), ranks_before);
    }
  }
};

}  // namespace

void maxsim(const MaxsimCall& c) {
  const MaxsimLevel& lv = level_for(simd_active());
  const int64_t QB = lv.qblock, B = c.B, D = c.D, N = c.N;
  const int64_t nblk_max = (c.Lq + QB - 1) / QB;

  // Queries -> [B][nblk][D][QB] fp32, zero padded (padded tokens are never summed).
  std::vector<float> qt(static_cast<size_t>(std::max<int64_t>(1, B * nblk_max * D * QB)), 0.0f);
  std::vector<int64_t> qlen(B), nblocks(B);
  for (int64_t b = 0; b < B; ++b) {
    qlen[b] = c.q_lengths ? c.q_lengths[b] : c.Lq;
    nblocks[b] = (qlen[b] + QB - 1) / QB;
    for (int64_t i = 0; i < qlen[b]; ++i) {
      float* dst = qt.data() + ((b * nblk_max + i / QB) * D) * QB + (i % QB);
      const int64_t base = b * c.q_stride_b + i * c.q_stride_i;
      for (int64_t k = 0; k < D; ++k) dst[k * QB] = load_scalar(c.q, c.q_dtype, base + k * c.q_stride_d);
    }
  }

  // Split documents into contiguous ranges of roughly equal token counts (plus
  // a small per-document cost), several per thread for dynamic balancing.
  const int threads = num_threads();
  std::vector<int64_t> cost_prefix(N + 1, 0);
  for (int64_t n = 0; n < N; ++n) cost_prefix[n + 1] = cost_prefix[n] + c.doc_lens[n] + 8;
  const int64_t n_tasks = std::max<int64_t>(1, std::min<int64_t>(N, int64_t(threads) * 8));
  std::vector<int64_t> task_start(n_tasks + 1);
  for (int64_t t = 0; t <= n_tasks; ++t) {
    const int64_t target = cost_prefix[N] * t / n_tasks;
    task_start[t] = std::lower_bound(cost_prefix.begin(), cost_prefix.end(), target) - cost_prefix.begin();
  }
  task_start[n_tasks] = N;

  struct Scratch {
    std::vector<float> conv, maxbuf;
    std::vector<int32_t> nanbuf, argbuf;
    std::vector<TopK> heaps;
  };
  std::vector<Scratch> scratch(threads);
  for (auto& s : scratch) {
    s.conv.resize(static_cast<size_t>(lv.scratch_floats(D)));
    s.maxbuf.resize(static_cast<size_t>(std::max<int64_t>(1, B * nblk_max * QB)));
    s.nanbuf.resize(s.maxbuf.size());
    if (c.argmax) s.argbuf.resize(s.maxbuf.size());
    if (c.topk > 0) s.heaps.resize(B);
  }
  const float neg_inf = -std::numeric_limits<float>::infinity();
  const float nan = std::numeric_limits<float>::quiet_NaN();

  parallel_for(n_tasks, [&](int64_t task, int worker) {
    Scratch& s = scratch[worker];
    MaxsimDocJob job{qt.data(), B, nblk_max, D, nblocks.data(), nullptr, c.d_dtype,
                     c.d_row_stride, 0, s.conv.data(), s.maxbuf.data(), s.nanbuf.data(),
                     c.argmax ? s.argbuf.data() : nullptr, nullptr};
    const size_t elem = c.d_dtype == kF32 ? 4 : 2;
    for (int64_t n = task_start[task]; n < task_start[task + 1]; ++n) {
      const int64_t len = c.doc_lens[n];
      if (len > 0) {
        job.doc = static_cast<const char*>(c.docs) + c.doc_starts[n] * elem;
        job.len = len;
        job.mask = c.doc_mask ? c.doc_mask + c.mask_starts[n] : nullptr;
        lv.score_doc(job);
      }
      for (int64_t b = 0; b < B; ++b) {
        float score = neg_inf;  // an empty document ranks last
        if (len > 0) {
          const float* mx = s.maxbuf.data() + b * nblk_max * QB;
          const int32_t* ns = s.nanbuf.data() + b * nblk_max * QB;
          double sum = 0.0;
          for (int64_t i = 0; i < qlen[b]; ++i) sum += ns[i] ? nan : mx[i];
          score = static_cast<float>(sum);
        }
        if (c.scores) c.scores[b * N + n] = score;
        if (c.argmax) {
          int32_t* out = c.argmax + (b * N + n) * c.Lq;
          const int32_t* ab = s.argbuf.data() + b * nblk_max * QB;
          const int64_t valid = len > 0 ? qlen[b] : 0;
          for (int64_t i = 0; i < valid; ++i) out[i] = ab[i];
          if (job.mask)
            for (int64_t i = 0; i < valid; ++i)
              if (out[i] >= 0 && !job.mask[out[i]]) out[i] = -1;
          for (int64_t i = valid; i < c.Lq; ++i) out[i] = -1;
        }
        if (c.topk > 0) s.heaps[b].offer({score, n}, c.topk);
      }
    }
  });

  if (c.topk <= 0) return;
  std::vector<Entry> merged;
  for (int64_t b = 0; b < B; ++b) {
    merged.clear();
    for (auto& s : scratch) merged.insert(merged.end(), s.heaps[b].heap.begin(), s.heaps[b].heap.end());
    const int64_t k = std::min<int64_t>(c.topk, static_cast<int64_t>(merged.size()));
    std::partial_sort(merged.begin(), merged.begin() + k, merged.end(), ranks_before);
    for (int64_t r = 0; r < c.topk; ++r) {
      const bool have = r < k;
      c.topk_scores[b * c.topk + r] = have ? merged[r].score : neg_inf;
      c.topk_idx[b * c.topk + r] = have ? merged[r].idx : -1;
    }
  }
}

void maxsim_backward(const MaxsimBackwardCall& c) {
  const int64_t B = c.B, Lq = c.Lq, D = c.D, N = c.N;
  // Queries widened once to fp32 [B, Lq, D] (small): the grad_d pass reads them per (doc, token).
  std::vector<float> qf;
  if (c.grad_d) {
    qf.resize(static_cast<size_t>(std::max<int64_t>(1, B * Lq * D)));
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i = 0; i < Lq; ++i)
        for (int64_t k = 0; k < D; ++k)
          qf[(b * Lq + i) * D + k] = load_scalar(c.q, c.q_dtype, b * c.q_stride_b + i * c.q_stride_i + k * c.q_stride_d);
  }
  const size_t elem = c.d_dtype == kF32 ? 4 : 2;
  if (c.grad_q) {
    // One task per query: each owns its grad_q rows (no races).
    parallel_for(B, [&](int64_t b, int) {
      float* gq = c.grad_q + b * Lq * D;
      std::fill(gq, gq + Lq * D, 0.0f);
      std::vector<float> row(static_cast<size_t>(D));
      for (int64_t n = 0; n < N; ++n) {
        const float g = c.grad[b * N + n];
        const int32_t* arg = c.argmax + (b * N + n) * Lq;
        const char* doc = static_cast<const char*>(c.docs) + c.doc_starts[n] * elem;
        for (int64_t i = 0; i < Lq; ++i) {
          if (arg[i] < 0) continue;
          const int64_t base = int64_t(arg[i]) * c.d_row_stride;
          float* out = gq + i * D;
          if (c.d_dtype == kF32) {
            const float* r = reinterpret_cast<const float*>(doc) + base;
            for (int64_t k = 0; k < D; ++k) out[k] += g * r[k];
          } else {
            for (int64_t k = 0; k < D; ++k) row[k] = load_scalar(doc, c.d_dtype, base + k);
            for (int64_t k = 0; k < D; ++k) out[k] += g * row[k];
          }
        }
      }
    });
  }
  if (c.grad_d) {
    // Documents in contiguous ranges: each task owns its documents' grad rows.
    const int64_t n_tasks = std::max<int64_t>(1, std::min<int64_t>(N, int64_t(num_threads()) * 8));
    parallel_for(n_tasks, [&](int64_t t, int) {
      const int64_t n0 = N * t / n_tasks, n1 = N * (t + 1) / n_tasks;
      for (int64_t n = n0; n < n1; ++n) {
        if (c.doc_lens[n] <= 0) continue;
        float* gd = c.grad_d + c.grad_d_starts[n];
        for (int64_t b = 0; b < B; ++b) {
          const float g = c.grad[b * N + n];
          const int32_t* arg = c.argmax + (b * N + n) * Lq;
          for (int64_t i = 0; i < Lq; ++i) {
            if (arg[i] < 0) continue;
            float* out = gd + int64_t(arg[i]) * D;
            const float* qi = qf.data() + (b * Lq + i) * D;
            for (int64_t k = 0; k < D; ++k) out[k] += g * qi[k];
          }
        }
      }
    });
  }
}

}  // namespace cpu
}  // namespace vkern
