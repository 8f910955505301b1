// MaxSim driver: packs the queries, splits the documents across threads by
// token count, runs the SIMD level's per-document kernel, and either writes
// all scores or keeps a per-thread top-k heap (no [B, N] buffer needed).
#include "cpu/maxsim.h"

#include <algorithm>
#include <atomic>
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


// The part of a call both document formats share: documents split into
// contiguous ranges of roughly equal token counts (plus a small per-document
// cost), several per thread for dynamic balancing; per document, score_doc
// fills the worker's running maxima and doc_score(n, b, worker) turns them into
// query b's score; then all scores are written or kept in per-thread top-k
// heaps and merged. Scratch is sized by num_threads(), read once here.
struct Outputs {
  int64_t B, N;
  const int64_t* doc_lens;
  float* scores;
  int64_t topk;
  float* topk_scores;
  int64_t* topk_idx;
};

template <class ScoreDoc, class DocScore>
void run_documents(const Outputs& o, int threads, const ScoreDoc& score_doc, const DocScore& doc_score) {
  const int64_t B = o.B, N = o.N;
  std::vector<int64_t> cost_prefix(N + 1, 0);
  for (int64_t n = 0; n < N; ++n) cost_prefix[n + 1] = cost_prefix[n] + o.doc_lens[n] + 8;
  const int64_t n_tasks = std::max<int64_t>(1, std::min<int64_t>(N, int64_t(threads) * 8));
  std::vector<int64_t> task_start(n_tasks + 1);
  for (int64_t t = 0; t <= n_tasks; ++t) {
    const int64_t target = cost_prefix[N] * t / n_tasks;
    task_start[t] = std::lower_bound(cost_prefix.begin(), cost_prefix.end(), target) - cost_prefix.begin();
  }
  task_start[n_tasks] = N;

  std::vector<std::vector<TopK>> heaps(threads);
  if (o.topk > 0)
    for (auto& h : heaps) h.resize(B);
  const float neg_inf = -std::numeric_limits<float>::infinity();

  parallel_for(n_tasks, [&](int64_t task, int worker) {
    for (int64_t n = task_start[task]; n < task_start[task + 1]; ++n) {
      const int64_t len = o.doc_lens[n];
      if (len > 0) score_doc(n, worker);
      for (int64_t b = 0; b < B; ++b) {
        const float score = len > 0 ? doc_score(n, b, worker) : neg_inf;  // an empty document ranks last
        if (o.scores) o.scores[b * N + n] = score;
        if (o.topk > 0) heaps[worker][b].offer({score, n}, o.topk);
      }
    }
  });

  if (o.topk <= 0) return;
  std::vector<Entry> merged;
  for (int64_t b = 0; b < B; ++b) {
    merged.clear();
    for (auto& h : heaps) merged.insert(merged.end(), h[b].heap.begin(), h[b].heap.end());
    const int64_t k = std::min<int64_t>(o.topk, static_cast<int64_t>(merged.size()));
    std::partial_sort(merged.begin(), merged.begin() + k, merged.end(), ranks_before);
    for (int64_t r = 0; r < o.topk; ++r) {
      const bool have = r < k;
      o.topk_scores[b * o.topk + r] = have ? merged[r].score : neg_inf;
      o.topk_idx[b * o.topk + r] = have ? merged[r].idx : -1;
    }
  }
}

std::atomic<bool>& vnni_allowed() {
  static std::atomic<bool> allowed{true};
  return allowed;
}

const MaxsimI8Level& i8_level_for(SimdLevel l) {
  switch (l) {
    case SimdLevel::avx512: {
#if defined(__x86_64__) || defined(__i386__)
      __builtin_cpu_init();
      if (vnni_allowed().load() && __builtin_cpu_supports("avx512vnni")) return maxsim_i8_level_avx512vnni();
#endif
      return maxsim_i8_level_avx512();
    }
    case SimdLevel::avx2: return maxsim_i8_level_avx2();
    case SimdLevel::avx512shape: return maxsim_i8_level_avx512shape();
    default: return maxsim_i8_level_generic();
  }
}

}  // namespace

void maxsim(const MaxsimCall& c) {
  const MaxsimLevel& lv = level_for(simd_active());
  const int64_t QB = lv.qblock, B = c.B, D = c.D;
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

  const int threads = num_threads();
  struct Scratch {
    std::vector<float> conv, maxbuf;
    std::vector<int32_t> nanbuf, argbuf;
  };
  std::vector<Scratch> scratch(threads);
  for (auto& s : scratch) {
    s.conv.resize(static_cast<size_t>(lv.scratch_floats(D)));
    s.maxbuf.resize(static_cast<size_t>(std::max<int64_t>(1, B * nblk_max * QB)));
    s.nanbuf.resize(s.maxbuf.size());
    if (c.argmax) s.argbuf.resize(s.maxbuf.size());
  }
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const size_t elem = c.d_dtype == kF32 ? 4 : 2;
  // argmax [B, N, Lq]: -1 wherever no document token is chosen (empty documents,
  // query tokens past query_lengths, masked tokens); the rest written per document.
  if (c.argmax) std::fill(c.argmax, c.argmax + B * c.N * c.Lq, int32_t(-1));
  const Outputs out{B, c.N, c.doc_lens, c.scores, c.topk, c.topk_scores, c.topk_idx};
  run_documents(
      out, threads,
      [&](int64_t n, int worker) {
        Scratch& s = scratch[worker];
        MaxsimDocJob job{qt.data(), B, nblk_max, D, nblocks.data(),
                         static_cast<const char*>(c.docs) + c.doc_starts[n] * elem, c.d_dtype,
                         c.d_row_stride, c.doc_lens[n], s.conv.data(), s.maxbuf.data(), s.nanbuf.data(),
                         c.argmax ? s.argbuf.data() : nullptr,
                         c.doc_mask ? c.doc_mask + c.mask_starts[n] : nullptr};
        lv.score_doc(job);
      },
      [&](int64_t n, int64_t b, int worker) {
        const Scratch& s = scratch[worker];
        const float* mx = s.maxbuf.data() + b * nblk_max * QB;
        const int32_t* ns = s.nanbuf.data() + b * nblk_max * QB;
        double sum = 0.0;
        for (int64_t i = 0; i < qlen[b]; ++i) sum += ns[i] ? nan : mx[i];
        if (c.argmax) {
          int32_t* dst = c.argmax + (b * c.N + n) * c.Lq;
          const int32_t* ab = s.argbuf.data() + b * nblk_max * QB;
          const uint8_t* mask = c.doc_mask ? c.doc_mask + c.mask_starts[n] : nullptr;
          for (int64_t i = 0; i < qlen[b]; ++i) dst[i] = (ab[i] >= 0 && mask && !mask[ab[i]]) ? -1 : ab[i];
        }
        return static_cast<float>(sum);
      });
}

const char* maxsim_int8_kernel_name() { return i8_level_for(simd_active()).name; }
void maxsim_int8_allow_vnni(bool allow) { vnni_allowed().store(allow); }

void maxsim_int8(const MaxsimI8Call& c) {
  const MaxsimI8Level& lv = i8_level_for(simd_active());
  const int64_t QB = lv.qblock, B = c.B, D = c.D, D4 = (D + 3) / 4;
  const int64_t nblk_max = (c.Lq + QB - 1) / QB;

  // Query codes -> [B][nblk][D4][QB] words of four (code + 64) bytes, zero padded.
  std::vector<uint32_t> qt(static_cast<size_t>(std::max<int64_t>(1, B * nblk_max * D4 * QB)), 0u);
  std::vector<int64_t> qlen(B), nblocks(B);
  for (int64_t b = 0; b < B; ++b) {
    qlen[b] = c.q_lengths ? c.q_lengths[b] : c.Lq;
    nblocks[b] = (qlen[b] + QB - 1) / QB;
    for (int64_t i = 0; i < qlen[b]; ++i) {
      uint32_t* dst = qt.data() + ((b * nblk_max + i / QB) * D4) * QB + (i % QB);
      const int8_t* src = c.q_codes + (b * c.Lq + i) * D;
      for (int64_t k = 0; k < D; ++k)
        dst[(k / 4) * QB] |= static_cast<uint32_t>(static_cast<uint8_t>(src[k] + 64)) << (8 * (k % 4));
    }
  }

  const int threads = num_threads();
  struct Scratch {
    std::vector<int32_t> rows;  // int32 for alignment; used as bytes
    std::vector<float> maxbuf;
  };
  std::vector<Scratch> scratch(threads);
  for (auto& s : scratch) {
    s.rows.resize(static_cast<size_t>((lv.scratch_bytes(D) + 3) / 4));
    s.maxbuf.resize(static_cast<size_t>(std::max<int64_t>(1, B * nblk_max * QB)));
  }
  const Outputs out{B, c.N, c.doc_lens, c.scores, c.topk, c.topk_scores, c.topk_idx};
  run_documents(
      out, threads,
      [&](int64_t n, int worker) {
        Scratch& s = scratch[worker];
        const int64_t row = c.doc_starts[n];
        MaxsimI8DocJob job{qt.data(), B, nblk_max, D, nblocks.data(), c.docs + row * c.d_row_stride,
                           c.d_row_stride, c.doc_lens[n], c.doc_scales + row,
                           reinterpret_cast<unsigned char*>(s.rows.data()), s.maxbuf.data()};
        lv.score_doc(job);
      },
      [&](int64_t, int64_t b, int worker) {
        const float* mx = scratch[worker].maxbuf.data() + b * nblk_max * QB;
        const float* qs = c.q_scales + b * c.Lq;
        double sum = 0.0;
        for (int64_t i = 0; i < qlen[b]; ++i) sum += static_cast<double>(qs[i]) * mx[i];
        return static_cast<float>(sum);
      });
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
      const bool narrow = c.grad_d_dtype != kF32;
      std::vector<float> scratch;   // narrow output: this document's rows in float32
      for (int64_t n = n0; n < n1; ++n) {
        const int64_t len = c.doc_lens[n];
        if (len <= 0) continue;
        float* gd;
        if (narrow) {
          scratch.assign(static_cast<size_t>(len * D), 0.0f);
          gd = scratch.data();
        } else {
          gd = static_cast<float*>(c.grad_d) + c.grad_d_starts[n];
        }
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
        if (narrow) {
          uint16_t* dst = static_cast<uint16_t*>(c.grad_d) + c.grad_d_starts[n];
          if (c.grad_d_dtype == kBF16)
            for (int64_t e = 0; e < len * D; ++e) dst[e] = float_to_bf16(gd[e]);
          else
            for (int64_t e = 0; e < len * D; ++e) dst[e] = float_to_half(gd[e]);
        }
      }
    });
  }
}

}  // namespace cpu
}  // namespace vkern
