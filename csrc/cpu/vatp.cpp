// VATP drivers: split the work across the thread pool and hand strips/rows to
// the SIMD level's kernels (simd/vatp_kernel.inc).
//
// attention_colsum: one task per (strip of query rows, query head); each
//   worker owns one strip buffer (T x qblock floats) and one double
//   accumulator [B, H_kv, T]; extra memory is O(threads * B * H_kv * T).
// prune: per (batch, KV head) a radix select of the free budget (no sort: one
//   histogram pass over all keys, later passes only over the chosen bucket;
//   the kept set is emitted by one branch-free ascending scan), then the kept
//   rows are moved with forward copies (runs of consecutive rows at once,
//   kept rows prefetched ahead). With at least 2 (batch, KV head) pairs per
//   thread, one task selects and moves one pair (K and V), so selection
//   overlaps the other threads' copies; otherwise all pairs are selected
//   first and the moves are split finer (chunks of rows out of place, K and
//   V apart in place). In place, destinations never pass sources. Outputs
//   (fresh or out=) may have any strides.
#include "cpu/vatp.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif
#include <cstdlib>

#include "cpu/dispatch.h"
#include "cpu/half.h"
#include "cpu/threadpool.h"

namespace vkern {
namespace cpu {
namespace vatp {
namespace {

const VatpLevel& level_for(SimdLevel l) {
  switch (l) {
    case SimdLevel::avx512: return level_avx512();
    case SimdLevel::avx2: return level_avx2();
    case SimdLevel::avx512shape: return level_avx512shape();
    default: return level_generic();
  }
}

inline int64_t elem_size(int dtype) { return dtype == kF32 ? 4 : 2; }

inline float load_scalar(const void* p, int dtype, int64_t i) {
  if (dtype == kF32) return static_cast<const float*>(p)[i];
  const uint16_t h = static_cast<const uint16_t*>(p)[i];
  return dtype == kBF16 ? bf16_to_float(h) : half_to_float(h);
}

// Order-preserving uint32 key of a float score: higher score, higher key;
// NaN lowest (0, below -inf); -0.0 and +0.0 equal. Branch-free, so that the
// loops over a row of scores vectorise.
inline uint32_t key_of_bits(uint32_t u) {
  u = u == 0x80000000u ? 0u : u;                                    // -0.0 -> +0.0
  const uint32_t key = u ^ ((u & 0x80000000u) ? 0xffffffffu : 0x80000000u);
  return (u & 0x7fffffffu) > 0x7f800000u ? 0u : key;                // NaN -> 0
}

inline uint32_t sort_key(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return key_of_bits(u);
}

// Per-worker scratch of the selection.
struct SelectScratch {
  std::vector<uint32_t> keys;   // [mid] keys of the unprotected tokens
  std::vector<uint32_t> cand;   // candidates left after each radix pass
  std::vector<int64_t> pos;     // [mid + 1] kept positions when idx has no slack for the branch-free emission
  std::vector<uint32_t> hist;   // 4 interleaved 2048-bucket histograms
};

constexpr int kDigitBits[3] = {11, 11, 10};
constexpr int kDigitShift[3] = {21, 10, 0};

// The bucket of a 2048-bucket histogram (summed over `copies` interleaved
// copies) that holds the `remaining`-th largest key; `remaining` becomes the
// rank inside that bucket and *count its size.
inline int64_t top_bucket(const uint32_t* hist, int copies, int64_t buckets, int64_t* remaining, int64_t* count) {
  for (int64_t b = buckets - 1; b >= 0; --b) {
    int64_t c = 0;
    for (int k = 0; k < copies; ++k) c += hist[k * 2048 + b];
    if (c >= *remaining || b == 0) {
      *count = c;
      return b;
    }
    *remaining -= c;
  }
  return 0;
}

// The k-th largest key of keys[0, n) (1 <= k <= n): a radix select over
// 11/11/10-bit digits. The first pass histograms every key (4 interleaved
// histograms, so runs of equal digits do not serialise on one counter); each
// later pass works only on the keys of the chosen bucket, copied out by the
// pass before. *take_equal = how many keys equal to it belong to the top k,
// *n_equal = how many keys equal it.
uint32_t radix_select(const uint32_t* keys, int64_t n, int64_t k, int64_t* take_equal, int64_t* n_equal,
                      SelectScratch& sc) {
  uint32_t* hist = sc.hist.data();
  std::fill(hist, hist + 4 * 2048, 0u);
  {
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
      ++hist[0 * 2048 + (keys[i] >> 21)];
      ++hist[1 * 2048 + (keys[i + 1] >> 21)];
      ++hist[2 * 2048 + (keys[i + 2] >> 21)];
      ++hist[3 * 2048 + (keys[i + 3] >> 21)];
    }
    for (; i < n; ++i) ++hist[keys[i] >> 21];
  }
  int64_t remaining = k, count = 0;
  uint32_t prefix = static_cast<uint32_t>(top_bucket(hist, 4, 2048, &remaining, &count)) << 21;
  // Candidates: the keys of that bucket (branch-free compaction).
  uint32_t* cand = sc.cand.data();
  int64_t nc = 0;
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t key = keys[i];
    cand[nc] = key;
    nc += (key >> 21) == (prefix >> 21);
  }
  for (int pass = 1; pass < 3; ++pass) {
    const int shift = kDigitShift[pass];
    const uint32_t bmask = (1u << kDigitBits[pass]) - 1u;
    std::fill(hist, hist + (bmask + 1), 0u);
    for (int64_t i = 0; i < nc; ++i) ++hist[(cand[i] >> shift) & bmask];
    const uint32_t bucket = static_cast<uint32_t>(top_bucket(hist, 1, bmask + 1, &remaining, &count));
    prefix |= bucket << shift;
    if (pass == 2) break;
    int64_t m = 0;
    for (int64_t i = 0; i < nc; ++i) {
      const uint32_t key = cand[i];
      cand[m] = key;
      m += ((key >> shift) & bmask) == bucket;
    }
    nc = m;
  }
  *take_equal = remaining;
  *n_equal = count;
  return prefix;
}

// Keys of `count` scores (element stride st) into keys[0, count).
void make_keys(const void* scores, int dtype, int64_t st, int64_t count, uint32_t* keys) {
  if (dtype == kF32 && st == 1) {
    const uint32_t* u = static_cast<const uint32_t*>(scores);
    for (int64_t i = 0; i < count; ++i) keys[i] = key_of_bits(u[i]);
  } else if (dtype == kF32) {
    const uint32_t* u = static_cast<const uint32_t*>(scores);
    for (int64_t i = 0; i < count; ++i) keys[i] = key_of_bits(u[i * st]);
  } else if (dtype == kBF16) {
    const uint16_t* h = static_cast<const uint16_t*>(scores);
    for (int64_t i = 0; i < count; ++i) keys[i] = key_of_bits(uint32_t(h[i * st]) << 16);
  } else {
    const uint16_t* h = static_cast<const uint16_t*>(scores);
    for (int64_t i = 0; i < count; ++i) keys[i] = sort_key(half_to_float(h[i * st]));
  }
}

// Kept positions of one (batch, KV head), ascending, into idx[0, n); idx
// has room for cap >= n entries.
void select_row(const void* scores, int dtype, int64_t st, int64_t L, int64_t n, int64_t num_sink,
                int64_t num_recent, int64_t* idx, int64_t cap, SelectScratch& sc) {
  const int64_t sink_end = std::min(num_sink, L);
  const int64_t recent_start = std::max(sink_end, L - num_recent);
  const int64_t mid = recent_start - sink_end;
  const int64_t n_free = n - sink_end - (L - recent_start);
  int64_t out = 0;
  for (int64_t t = 0; t < sink_end; ++t) idx[out++] = t;
  if (n_free >= mid) {
    for (int64_t t = sink_end; t < recent_start; ++t) idx[out++] = t;
  } else if (n_free > 0) {
    if (static_cast<int64_t>(sc.keys.size()) < mid) {
      sc.keys.resize(static_cast<size_t>(mid));
      sc.cand.resize(static_cast<size_t>(mid));
      sc.pos.resize(static_cast<size_t>(mid + 1));
    }
    if (sc.hist.empty()) sc.hist.resize(4 * 2048);
    const int64_t es = elem_size(dtype);
    make_keys(static_cast<const char*>(scores) + sink_end * st * es, dtype, st, mid, sc.keys.data());
    int64_t take_equal = 0, n_thr = 0;
    const uint32_t thr = radix_select(sc.keys.data(), mid, n_free, &take_equal, &n_thr, sc);
    // Emit ascending, branch-free: every position is written, the count
    // advances only for kept ones. The last write lands one past the kept
    // ones: straight into idx when that slot is still ours. Keys equal to
    // the threshold are taken lowest index first: when only some of them
    // are, the ones after the take_equal-th (at `cut`) are left out.
    const uint32_t* keys = sc.keys.data();
    int64_t cut = mid;
    if (take_equal < n_thr) {
      int64_t seen = 0;
      for (cut = 0; cut < mid; ++cut)
        if (keys[cut] == thr && ++seen == take_equal) break;
      ++cut;
    }
    const bool direct = out + n_free < cap;
    int64_t* pos = direct ? idx + out : sc.pos.data();
    int64_t m = 0;
    for (int64_t i = 0; i < cut; ++i) {
      pos[m] = sink_end + i;
      m += keys[i] >= thr;
    }
    for (int64_t i = cut; i < mid; ++i) {
      pos[m] = sink_end + i;
      m += keys[i] > thr;
    }
    if (!direct) std::memcpy(idx + out, pos, static_cast<size_t>(m) * sizeof(int64_t));
    out += m;
  }
  for (int64_t t = recent_start; t < L; ++t) idx[out++] = t;
}

// Zeroes rows [r0, r1) of the (b, h) slice starting at base.
void zero_rows(char* base, const Cache& c, int64_t r0, int64_t r1) {
  const int64_t es = elem_size(c.dtype);
  for (int64_t r = r0; r < r1; ++r) {
    if (c.sd == 1) {
      std::memset(base + r * c.st * es, 0, static_cast<size_t>(c.D * es));
    } else {
      for (int64_t k = 0; k < c.D; ++k) std::memset(base + (r * c.st + k * c.sd) * es, 0, es);
    }
  }
}

// Rows [r0, r1) of one (b, h) of an out-of-place result: kept rows copied, the rest zeroed.
void fill_rows(const VatpLevel& lv, const Cache& src, const Cache& dst, int64_t b, int64_t h, const int64_t* idx,
               int64_t n, int64_t r0, int64_t r1, bool stream) {
  const int64_t es = elem_size(src.dtype), D = src.D;
  const char* s = src.data + (b * src.sb + h * src.sh) * es;
  char* d = dst.data + (b * dst.sb + h * dst.sh) * es;
  const int64_t rc = std::min(r1, n);
  if (r0 < rc) {
    if ((src.sd == 1 && dst.sd == 1) || D == 1) {
      lv.copy_rows(d + r0 * dst.st * es, dst.st * es, s, src.st * es, idx + r0, rc - r0, D * es, stream);
    } else {
      for (int64_t r = r0; r < rc; ++r)
        for (int64_t k = 0; k < D; ++k)
          std::memcpy(d + (r * dst.st + k * dst.sd) * es, s + (idx[r] * src.st + k * src.sd) * es, es);
    }
  }
  zero_rows(d, dst, std::max(r0, n), r1);
}

// In place: kept rows of one (b, h) move forward in ascending order, then rows [n, kmax) are zeroed.
void compact_rows(const VatpLevel& lv, const Cache& c, int64_t b, int64_t h, const int64_t* idx, int64_t n,
                  int64_t kmax, bool stream) {
  const int64_t es = elem_size(c.dtype), D = c.D;
  char* base = c.data + (b * c.sb + h * c.sh) * es;
  if (c.sd == 1 || D == 1) {
    lv.copy_rows(base, c.st * es, base, c.st * es, idx, n, D * es, stream);
  } else {
    // Writing element (r, k) destroys only the original (r, k), whose reader
    // r' (idx[r'] = r, so r' <= r) has already run.
    for (int64_t r = 0; r < n; ++r)
      if (idx[r] != r)
        for (int64_t k = 0; k < D; ++k)
          std::memcpy(base + (r * c.st + k * c.sd) * es, base + (idx[r] * c.st + k * c.sd) * es, es);
  }
  zero_rows(base, c, n, kmax);
}

// A fresh output buffer is first touched by the copy: on Linux, ask for
// transparent huge pages so that 2 MB pages fault in instead of 4 KB ones
// (measured here: a fresh 64 MB fill goes from ~42 to ~13 ms, the cost of
// the same fill into memory already mapped). Only whole 2 MB pages inside
// the buffer are advised; the call changes nothing but the page size.
void advise_huge(void* data, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const uintptr_t huge = uintptr_t(1) << 21;
  if (bytes < int64_t(8 * huge)) return;
  const uintptr_t lo = (reinterpret_cast<uintptr_t>(data) + huge - 1) & ~(huge - 1);
  const uintptr_t hi = (reinterpret_cast<uintptr_t>(data) + static_cast<uintptr_t>(bytes)) & ~(huge - 1);
  if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#else
  (void)data;
  (void)bytes;
#endif
}

int stream_mode() {  // VKERN_VATP_STREAM=0/1 forces non-temporal stores off/on (for measurements)
  static const int mode = [] {
    const char* e = std::getenv("VKERN_VATP_STREAM");
    return e ? std::atoi(e) : -1;
  }();
  return mode;
}

}  // namespace

void attention_colsum(const ColsumCall& c) {
  const VatpLevel& lv = level_for(simd_active());
  const int64_t QB = lv.qblock, D = c.D, T = c.T, H = c.H_kv, G = c.Hq / c.H_kv;
  const int64_t n_out = c.B * H * T;
  std::fill(c.out, c.out + n_out, 0.0f);
  const int64_t strips = (c.Tq + QB - 1) / QB;
  const int64_t n_tasks = strips * c.B * c.Hq;
  if (n_tasks == 0 || T == 0) return;
  const int threads = num_threads();
  struct Scratch {
    std::vector<float> qt, s, kbuf;
    std::vector<int32_t> limit;
    std::vector<double> acc;
  };
  std::vector<Scratch> scratch(threads);
  const float qscale = c.scale * 1.4426950408889634f;  // softmax via exp2
  const int64_t k_es = elem_size(c.k_dtype);

  // Largest strips first (causal strips grow with the row index), then heads.
  parallel_for(n_tasks, [&](int64_t task, int worker) {
    const int64_t strip = strips - 1 - task / (c.B * c.Hq);
    const int64_t bh = task % (c.B * c.Hq);
    const int64_t b = bh / c.Hq, hq = bh % c.Hq, h = hq / G;
    const int64_t L = c.seq_lens[b];
    Scratch& sc = scratch[worker];
    if (sc.limit.empty()) {
      sc.qt.resize(static_cast<size_t>(D * QB));
      sc.limit.resize(static_cast<size_t>(QB));
      sc.kbuf.resize(static_cast<size_t>(lv.colsum_scratch_floats(D)));
      sc.acc.assign(static_cast<size_t>(n_out), 0.0);
    }
    int32_t max_lim = -1;
    for (int64_t r = 0; r < QB; ++r) {
      const int64_t i = strip * QB + r;
      int64_t lim = -1;
      if (i < c.Tq) {
        const int64_t pos = T - c.Tq + i;
        lim = c.causal ? (pos < L ? pos : -1) : L - 1;
        if (lim < -1) lim = -1;
      }
      sc.limit[r] = static_cast<int32_t>(lim);
      max_lim = std::max(max_lim, sc.limit[r]);
    }
    if (max_lim < 0) return;
    for (int64_t r = 0; r < QB; ++r) {
      const int64_t base = b * c.q_sb + hq * c.q_sh + (strip * QB + r) * c.q_si;
      for (int64_t d = 0; d < D; ++d)
        sc.qt[d * QB + r] = sc.limit[r] >= 0 ? load_scalar(c.q, c.q_dtype, base + d * c.q_sd) * qscale : 0.0f;
    }
    const int64_t n_keys = int64_t(max_lim) + 1;
    if (static_cast<int64_t>(sc.s.size()) < n_keys * QB) sc.s.resize(static_cast<size_t>(T * QB));
    ColsumStrip job{sc.qt.data(), D, sc.limit.data(), n_keys,
                    static_cast<const char*>(c.k) + (b * c.k_sb + h * c.k_sh) * k_es, c.k_dtype, c.k_st,
                    sc.s.data(), sc.kbuf.data(), sc.acc.data() + (b * H + h) * T};
    lv.colsum_strip(job);
  });

  // Reduce the workers' accumulators, in parallel over slices of the output.
  const int64_t slice = 4096;
  parallel_for((n_out + slice - 1) / slice, [&](int64_t task, int) {
    const int64_t lo = task * slice, hi = std::min(n_out, lo + slice);
    for (int64_t i = lo; i < hi; ++i) {
      double s = 0.0;
      for (const Scratch& sc : scratch)
        if (!sc.acc.empty()) s += sc.acc[i];
      c.out[i] = static_cast<float>(s);
    }
  });
}

void value_l1(const L1Call& c) {
  const VatpLevel& lv = level_for(simd_active());
  const int64_t rows_per_task = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, c.D));
  const int64_t per_head = (c.T + rows_per_task - 1) / rows_per_task;
  parallel_for(c.B * c.H * per_head, [&](int64_t task, int) {
    const int64_t bh = task / per_head, t0 = (task % per_head) * rows_per_task;
    const int64_t b = bh / c.H, h = bh % c.H, t1 = std::min(c.T, t0 + rows_per_task);
    const int64_t base = b * c.sb + h * c.sh;
    float* out = c.out + bh * c.T;
    if (c.sd == 1 || c.D == 1) {
      lv.l1_rows(static_cast<const char*>(c.v) + (base + t0 * c.st) * elem_size(c.dtype), c.dtype, c.st, t1 - t0,
                 c.D, out + t0);
    } else {
      for (int64_t t = t0; t < t1; ++t) {
        float s = 0.0f;
        for (int64_t d = 0; d < c.D; ++d) s += std::fabs(load_scalar(c.v, c.dtype, base + t * c.st + d * c.sd));
        out[t] = s;
      }
    }
  });
}

void prune(const PruneCall& c) {
  const VatpLevel& lv = level_for(simd_active());
  const int64_t BH = c.B * c.H;
  if (BH == 0 || c.kmax == 0) return;

  // Non-temporal stores once the moved bytes clearly exceed the caches.
  double moved = 0.0;
  for (int64_t b = 0; b < c.B; ++b)
    moved += double(c.kept_lens[b]) * c.H * double(c.k.D * elem_size(c.k.dtype) + c.v.D * elem_size(c.v.dtype));
  bool stream = moved > 32.0 * (1 << 20);
  if (stream_mode() >= 0) stream = stream_mode() == 1;

  auto select = [&](int64_t bh) {
    // Scratch lives with the (persistent) pool thread, so that repeated calls
    // do not map and fault fresh pages; very long rows give it back.
    static thread_local SelectScratch sc;
    const int64_t b = bh / c.H, h = bh % c.H, n = c.kept_lens[b];
    int64_t* idx = c.kept_idx + bh * c.kmax;
    const int64_t es = elem_size(c.s_dtype);
    const void* s = static_cast<const char*>(c.scores) + (b * c.s_sb + h * c.s_sh) * es;
    select_row(s, c.s_dtype, c.s_st, c.seq_lens[b], n, c.num_sink, c.num_recent, idx, c.kmax, sc);
    std::fill(idx + n, idx + c.kmax, int64_t(-1));
    if (sc.keys.size() > (size_t(1) << 22)) sc = SelectScratch();
  };

  const bool per_head = BH >= 2 * num_threads();
  if (!c.inplace && c.fresh_out)
    for (const Cache* out : {&c.k_out, &c.v_out})
      if (out->sb == c.H * out->sh && out->sh == c.kmax * out->st && out->st == out->D && out->sd == 1)
        advise_huge(out->data, c.B * out->sb * elem_size(out->dtype));
  if (per_head) {
    // One task per (batch, KV head): select, then move its K and V rows.
    // While one thread selects, the others copy.
    parallel_for(BH, [&](int64_t bh, int) {
      select(bh);
      const int64_t b = bh / c.H, h = bh % c.H;
      const int64_t* idx = c.kept_idx + bh * c.kmax;
      if (c.inplace) {
        for (const Cache* x : {&c.k, &c.v}) compact_rows(lv, *x, b, h, idx, c.kept_lens[b], c.kmax, stream);
      } else {
        fill_rows(lv, c.k, c.k_out, b, h, idx, c.kept_lens[b], 0, c.kmax, stream);
        fill_rows(lv, c.v, c.v_out, b, h, idx, c.kept_lens[b], 0, c.kmax, stream);
      }
    });
    return;
  }
  parallel_for(BH, [&](int64_t bh, int) { select(bh); });
  if (c.inplace) {
    parallel_for(BH * 2, [&](int64_t task, int) {
      const int64_t bh = task / 2, b = bh / c.H, h = bh % c.H;
      compact_rows(lv, task % 2 ? c.v : c.k, b, h, c.kept_idx + bh * c.kmax, c.kept_lens[b], c.kmax, stream);
    });
    return;
  }
  const int64_t chunk = 1024;
  const int64_t chunks = (c.kmax + chunk - 1) / chunk;
  parallel_for(BH * chunks * 2, [&](int64_t task, int) {
    const int64_t which = task % 2, rest = task / 2;
    const int64_t bh = rest / chunks, r0 = (rest % chunks) * chunk, r1 = std::min(c.kmax, r0 + chunk);
    const int64_t b = bh / c.H, h = bh % c.H;
    fill_rows(lv, which ? c.v : c.k, which ? c.v_out : c.k_out, b, h, c.kept_idx + bh * c.kmax, c.kept_lens[b], r0,
              r1, stream);
  });
}

}  // namespace vatp
}  // namespace cpu
}  // namespace vkern
