// Loki decode attention driver: one task per (sequence, KV head), spread over
// the thread pool. A task
//   1. widens its query heads to float32 (and, for gqa="shared", sums them:
//      the group's summed approximate score is (sum of q)[:rank] . k[:rank]);
//   2. streams the rank-prefix of every candidate key row once for all heads
//      of the group (approximate scores);
//   3. selects the budget per head (or per group) with a radix select (after a
//      sampled pre-filter): the k-th best key is found from histograms, one
//      ordered pass then emits the kept positions already ascending (ties to
//      the lower index, NaN last), so nothing is sorted;
//   4. gathers only the kept K rows (exact scores), takes a float32 softmax,
//      and gathers only the kept V rows.
// Dense decode (budgets == nullptr) is steps 1 and 4 over every row.
// Scratch lives in per-worker buffers that grow to the largest call seen, so
// a steady stream of decode steps allocates nothing.
#include "cpu/loki.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <vector>

#include "cpu/dispatch.h"
#include "cpu/half.h"
#include "cpu/threadpool.h"

namespace vkern {
namespace cpu {
namespace {

constexpr int64_t kHeadChunk = 8;  // heads sharing one walk over the kept rows
constexpr int64_t kInlineBytes = 256 * 1024;  // K + V bytes below which one call runs on one thread

const LokiLevel& level_for(SimdLevel l) {
  switch (l) {
    case SimdLevel::avx512:  // no AVX-512 build of this op: its loops are bound by memory
    case SimdLevel::avx2: return loki_level_avx2();
    case SimdLevel::avx512shape: return loki_level_avx512shape();
    default: return loki_level_generic();
  }
}

float load_scalar(const void* p, int dtype, int64_t i) {
  if (dtype == 0) return static_cast<const float*>(p)[i];
  const uint16_t h = static_cast<const uint16_t*>(p)[i];
  return dtype == 2 ? bf16_to_float(h) : half_to_float(h);
}

struct Scratch {
  std::vector<float> q, qs, approx, s, acc, wbuf;
  std::vector<uint32_t> keys, work;
  std::vector<int32_t> cand, lists;
  std::vector<int64_t> list_len;
};

template <typename V>
inline void grow(V& v, size_t n) {
  if (v.size() < n) v.resize(n);
}

// Radix select over work[0, m): on return prefix is the remaining-th best key
// and remaining counts the positions equal to it still wanted (work is reused).
void radix_select(uint32_t* work, int64_t m, int64_t& remaining, uint32_t& prefix) {
  uint32_t hist[2048];
  int64_t nw = m;
  uint32_t high_mask = 0;
  const int shifts[3] = {21, 10, 0};
  const uint32_t widths[3] = {2047u, 2047u, 1023u};
  for (int d = 0; d < 3; ++d) {
    const int sh = shifts[d];
    const uint32_t wm = widths[d];
    std::memset(hist, 0, sizeof hist);
    int64_t kept = 0;
    for (int64_t c = 0; c < nw; ++c) {  // keys still matching the prefix, counted and compacted in place
      const uint32_t key = work[c];
      const uint32_t match = (key & high_mask) == prefix;
      hist[(key >> sh) & wm] += match;
      work[kept] = key;
      kept += match;
    }
    nw = kept;
    uint32_t b = wm;
    for (;; --b) {
      if (hist[b] >= remaining) break;
      remaining -= hist[b];
    }
    prefix |= b << sh;
    high_mask |= wm << sh;
  }
}

// The `need` best of scores[0, n) (highest first, ties to the lower position,
// NaN last), written ascending as base + position into out.
//
// Keys: order_key. For long lists a strided sample first sets a threshold a
// little below the need-th best; one vectorized pass keeps the positions (and
// keys) that reach it, nearly always a superset of the answer (else all are
// kept). A radix select over the kept keys finds the need-th best key t from
// histograms of 11, 11 and 10 bits; one ordered pass then emits every key above
// t and the first positions equal to t, so the output is ascending without a sort.
void select_top(const float* scores, int64_t n, int64_t need, int32_t base, int32_t* out, Scratch& sc,
                const LokiLevel& lv) {
  if (need <= 0) return;
  if (need >= n) {
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<int32_t>(base + i);
    return;
  }
  grow(sc.keys, n + 16);
  grow(sc.cand, n + 16);
  grow(sc.work, n + 16);
  int32_t* cand = sc.cand.data();
  uint32_t* keys = sc.keys.data();

  int64_t m = 0;
  constexpr int64_t kSample = 1024;
  const int64_t rank_in_sample = need * kSample / n + need * kSample / n / 4 + 16;
  if (n >= 4 * kSample && rank_in_sample < kSample) {
    uint32_t sample[kSample];
    for (int64_t s = 0; s < kSample; ++s) sample[s] = order_key(scores[s * n / kSample]);
    std::nth_element(sample, sample + rank_in_sample, sample + kSample, std::greater<uint32_t>());
    m = lv.keys_at_least(scores, n, sample[rank_in_sample], cand, keys);
  }
  if (m < need) m = lv.keys_at_least(scores, n, 0u, cand, keys);  // every position

  // The need-th best key t among the kept ones, and how many positions equal to
  // t are still wanted after every key above it.
  uint32_t* work = sc.work.data();
  std::memcpy(work, keys, m * sizeof(uint32_t));
  int64_t remaining = need;
  uint32_t prefix = 0;
  if (m <= 1024) {  // short lists: a partition beats three passes over 2048-bin histograms
    std::nth_element(work, work + (need - 1), work + m, std::greater<uint32_t>());
    prefix = work[need - 1];
    for (int64_t c = 0; c < m; ++c) remaining -= keys[c] > prefix;
  } else {
    radix_select(work, m, remaining, prefix);
  }
  // prefix is now the need-th best key; emit everything above it and the first
  // `remaining` positions equal to it, in position order.
  const uint32_t t = prefix;
  int64_t w = 0;
  for (int64_t c = 0; c < m; ++c) {
    const uint32_t key = keys[c];
    if (key > t || (key == t && remaining > 0)) {
      if (key == t) --remaining;
      out[w++] = base + cand[c];
    }
  }
}

// Kept list of one head: sinks, the selected middle (approx holds the scores of
// positions [lo, hi), lo = sinks, hi = L - recent), recent; returns its length.
int64_t build_list(const float* approx, int64_t L, int64_t budget, int64_t ns, int64_t nr, int32_t* out,
                   Scratch& sc, const LokiLevel& lv) {
  if (budget >= L) {
    for (int64_t i = 0; i < L; ++i) out[i] = static_cast<int32_t>(i);
    return L;
  }
  const int64_t lo = std::min(ns, L), hi = std::max(lo, L - nr);
  int64_t w = 0;
  for (int64_t i = 0; i < lo; ++i) out[w++] = static_cast<int32_t>(i);
  const int64_t rest = budget - lo - (L - hi);
  select_top(approx, hi - lo, rest, static_cast<int32_t>(lo), out + w, sc, lv);
  w += std::max<int64_t>(0, std::min(rest, hi - lo));
  for (int64_t i = hi; i < L; ++i) out[w++] = static_cast<int32_t>(i);
  return w;
}

void run_task(const LokiCall& c, const LokiLevel& lv, int64_t b, int64_t kv, Scratch& sc) {
  const int64_t D = c.D, G = c.Hq / c.H_kv, L = c.seq_lens[b];
  const bool dense = c.budgets == nullptr;
  const int64_t budget = dense ? L : std::min(c.budgets[b], L);
  const bool keep_all = budget >= L;
  const char* kbase = static_cast<const char*>(c.k);
  const char* vbase = static_cast<const char*>(c.v);
  const int64_t esz = c.kv_dtype == 0 ? 4 : 2;
  const void* K = kbase + (b * c.k_sb + kv * c.k_sh) * esz;
  const void* V = vbase + (b * c.v_sb + kv * c.v_sh) * esz;

  grow(sc.q, G * D);
  grow(sc.wbuf, 16 * D + 64);  // a block of up to 16 widened rows
  for (int64_t g = 0; g < G; ++g) {
    const int64_t base = b * c.q_sb + (kv * G + g) * c.q_sh;
    if (c.q_dtype == 0 && c.q_sd == 1)
      std::memcpy(&sc.q[g * D], static_cast<const float*>(c.q) + base, D * sizeof(float));
    else
      for (int64_t d = 0; d < D; ++d) sc.q[g * D + d] = load_scalar(c.q, c.q_dtype, base + d * c.q_sd);
  }

  // Kept lists: one per head (per_head) or one for the group (shared / keep all).
  const bool one_list = keep_all || c.shared;
  const int64_t n_lists = one_list ? 1 : G;
  grow(sc.lists, n_lists * budget);
  grow(sc.list_len, n_lists);
  if (keep_all) {
    sc.list_len[0] = L;
  } else {
    const int64_t ns = c.num_sink, nr = c.num_recent, r = c.rank;
    const int64_t lo = std::min(ns, L), hi = std::max(lo, L - nr), M = hi - lo;
    const int64_t rest = budget - lo - (L - hi);
    // The approximate pass reads the separate prefix array when there is one:
    // in k's own rows the hardware prefetchers pull whole rows, not the prefix.
    const bool pre = c.kp != nullptr;
    const int64_t a_st = pre ? c.kp_st : c.k_st;
    const char* kmid = pre ? static_cast<const char*>(c.kp) + (b * c.kp_sb + kv * c.kp_sh + lo * c.kp_st) * esz
                           : static_cast<const char*>(K) + lo * c.k_st * esz;
    if (c.shared) {
      grow(sc.qs, r);
      for (int64_t d = 0; d < r; ++d) {
        float s = 0.0f;
        for (int64_t g = 0; g < G; ++g) s += sc.q[g * D + d];
        sc.qs[d] = s;
      }
      grow(sc.approx, M);
      if (rest > 0 && rest < M) lv.approx_scores(sc.qs.data(), 1, r, kmid, c.kv_dtype, a_st, M, sc.approx.data(), M,
                                                 sc.wbuf.data());
      sc.list_len[0] = build_list(sc.approx.data(), L, budget, ns, nr, sc.lists.data(), sc, lv);
    } else {
      for (int64_t g0 = 0; g0 < G; g0 += kHeadChunk) {
        const int64_t gc = std::min(kHeadChunk, G - g0);
        grow(sc.qs, gc * r);
        for (int64_t g = 0; g < gc; ++g) std::memcpy(&sc.qs[g * r], &sc.q[(g0 + g) * D], r * sizeof(float));
        grow(sc.approx, gc * M);
        if (rest > 0 && rest < M) lv.approx_scores(sc.qs.data(), gc, r, kmid, c.kv_dtype, a_st, M, sc.approx.data(),
                                                   M, sc.wbuf.data());
        for (int64_t g = 0; g < gc; ++g)
          sc.list_len[g0 + g] = build_list(sc.approx.data() + g * M, L, budget, ns, nr,
                                           sc.lists.data() + (g0 + g) * budget, sc, lv);
      }
    }
  }

  // Exact attention. Shared / keep-all: heads in chunks of up to kHeadChunk share one
  // walk over the kept rows. per_head: one head at a time over its own list (measured
  // faster than one walk over the union of a group's lists with every head computed on
  // every union row: the union keeps ~40% of rows, each kept by ~1.2 heads).
  const int64_t chunk = one_list ? kHeadChunk : 1;
  for (int64_t g0 = 0; g0 < G; g0 += chunk) {
    const int64_t gc = std::min(chunk, G - g0);
    const int32_t* rows = nullptr;
    int64_t n;
    if (keep_all) {
      n = L;  // rows == nullptr: row i is position i
    } else if (one_list) {
      rows = sc.lists.data();
      n = sc.list_len[0];
    } else {
      rows = sc.lists.data() + g0 * budget;
      n = sc.list_len[g0];
    }
    grow(sc.s, gc * n);
    grow(sc.acc, gc * D);
    float* s = sc.s.data();
    lv.exact_scores(&sc.q[g0 * D], gc, D, c.scale, K, c.kv_dtype, c.k_st, rows, n, s, sc.wbuf.data());
    float sums[kHeadChunk];
    for (int64_t g = 0; g < gc; ++g) sums[g] = lv.exp_sum(s + g * n, n, lv.max_of(s + g * n, n));
    std::fill(sc.acc.begin(), sc.acc.begin() + gc * D, 0.0f);
    lv.accumulate(s, gc, D, V, c.kv_dtype, c.v_st, rows, n, sc.acc.data(), sc.wbuf.data());
    for (int64_t g = 0; g < gc; ++g) {
      float* o = c.out + (b * c.Hq + kv * G + g0 + g) * D;
      const float inv = 1.0f / sums[g];
      for (int64_t d = 0; d < D; ++d) o[d] = sc.acc[g * D + d] * inv;
    }
  }

  if (c.idx) {
    for (int64_t g = 0; g < G; ++g) {
      int64_t* dst = c.idx + (b * c.Hq + kv * G + g) * c.K;
      const int64_t li = one_list ? 0 : g;
      const int64_t len = sc.list_len[li];
      for (int64_t i = 0; i < c.K; ++i) {
        if (i >= len) dst[i] = -1;
        else dst[i] = keep_all ? i : sc.lists[li * budget + i];
      }
    }
  }
}

}  // namespace

void loki_attention(const LokiCall& c) {
  if (c.B == 0 || c.Hq == 0) return;
  const LokiLevel& lv = level_for(simd_active());
  // Scratch belongs to the thread that runs the task (pool workers and calling
  // threads alike), so concurrent calls share nothing and need no lock.
  const auto task = [&](int64_t t, int) {
    static thread_local Scratch scratch;
    run_task(c, lv, t / c.H_kv, t % c.H_kv, scratch);
  };
  // A small cache (a short sequence's decode step inside a model: microseconds of
  // work) runs on the calling thread: waking a worker for it cost more than the
  // work, and on a loaded machine a woken worker can wait milliseconds for a CPU.
  const int64_t esz = c.kv_dtype == 0 ? 4 : 2;
  if (c.B * c.H_kv * c.T * c.D * esz * 2 < kInlineBytes) {
    for (int64_t t = 0; t < c.B * c.H_kv; ++t) task(t, 0);
    return;
  }
  parallel_for(c.B * c.H_kv, task);
}

void loki_rotate(const RotateCall& c) {
  const LokiLevel& lv = level_for(simd_active());
  const int64_t D = c.D, G = c.H / c.H_kv, n_items = c.rows * c.H;
  const int threads = num_threads();
  const int64_t n_tasks = std::max<int64_t>(1, std::min<int64_t>(n_items, int64_t(threads) * 8));
  parallel_for(n_tasks, [&](int64_t task, int) {
    std::vector<float> x(D);
    const int64_t i0 = n_items * task / n_tasks, i1 = n_items * (task + 1) / n_tasks;
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t r = it / c.H, h = it % c.H;
      const int64_t base = r * c.x_sr + h * c.x_sh;
      for (int64_t d = 0; d < D; ++d) x[d] = load_scalar(c.x, c.dtype, base + d);
      lv.rotate_row(x.data(), c.P + (h / G) * D * D, D, c.out + it * D);
    }
  });
}

}  // namespace cpu
}  // namespace vkern
