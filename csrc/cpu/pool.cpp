// Token pooling driver: one document per task. Ward by the nearest-neighbour
// chain (O(m^2) per document on a full dissimilarity matrix, Lance-Williams
// updates; both in simd/pool_kernel.inc), cut like scipy's fcluster(maxclust);
// k-means by Lloyd's iterations from a seeded draw. The definitions are python/vkern/reference/pool.py.
#include "cpu/pool.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu/dispatch.h"
#include "cpu/threadpool.h"

namespace vkern {
namespace cpu {
namespace {

const PoolLevel& level_for(SimdLevel l) {
  switch (l) {
    case SimdLevel::avx512: return pool_level_avx512();
    case SimdLevel::avx2: return pool_level_avx2();
    case SimdLevel::avx512shape: return pool_level_avx512shape();
    default: return pool_level_generic();
  }
}

struct Scratch {
  std::vector<float> dots;
  std::vector<double> dist, dist2, xx, cc;
  std::vector<float> centres;
  std::vector<int64_t> labels, prev, counts, chain, rep, parent;
  std::vector<double> size, sums;
  std::vector<int64_t> perm;
  std::vector<float> pack;
  std::vector<int64_t> merge_a, merge_b;
  std::vector<double> heights, cut, pen;
  std::vector<int64_t> live;
};

int64_t find(std::vector<int64_t>& parent, int64_t a) {
  while (parent[a] != a) {
    parent[a] = parent[parent[a]];
    a = parent[a];
  }
  return a;
}

// Labels 0.. of at most k Ward clusters of the m rows x (stride ld), in order of lowest token.
void ward_labels(const PoolLevel& lv, const float* x, int64_t m, int64_t ld, int64_t D, int64_t k, Scratch& s) {
  const int64_t ldd = (m + kWardPad - 1) / kWardPad * kWardPad;
  s.pack.resize(static_cast<size_t>(kWardPad * D));
  s.dist.resize(static_cast<size_t>(kWardPad + m * ldd));   // d[-kWardPad, 0): ward_dist's scratch
  double* const d = s.dist.data() + kWardPad;
  lv.ward_dist(x, m, ld, D, s.pack.data(), d, ldd);
  s.size.assign(static_cast<size_t>(ldd), 0.0);
  std::fill(s.size.begin(), s.size.begin() + m, 1.0);
  s.pen.assign(static_cast<size_t>(ldd), std::numeric_limits<double>::infinity());
  std::fill(s.pen.begin(), s.pen.begin() + m, 0.0);
  s.live.resize(static_cast<size_t>(4 * m + ldd));
  s.dist2.resize(static_cast<size_t>((ldd / 2) * (ldd / 2)));
  s.chain.resize(static_cast<size_t>(m));
  s.rep.resize(static_cast<size_t>(m));
  s.merge_a.resize(static_cast<size_t>(m - 1));
  s.merge_b.resize(static_cast<size_t>(m - 1));
  s.heights.resize(static_cast<size_t>(m - 1));
  lv.ward_chain(d, m, ldd, s.dist2.data(), s.size.data(), s.pen.data(), s.live.data(), s.chain.data(), s.rep.data(),
                s.merge_a.data(), s.merge_b.data(), s.heights.data());
  // fcluster(maxclust=k): the (m-k)-th smallest height (squared: same order) is the cut; every merge at
  // or below it joins.
  s.cut.assign(s.heights.begin(), s.heights.end());
  std::nth_element(s.cut.begin(), s.cut.begin() + (m - k - 1), s.cut.end());
  const double r = s.cut[m - k - 1];
  s.parent.resize(static_cast<size_t>(m));
  for (int64_t i = 0; i < m; ++i) s.parent[i] = i;
  for (int64_t i = 0; i + 1 < m; ++i) {
    if (!(s.heights[i] <= r)) continue;
    const int64_t ra = find(s.parent, s.merge_a[i]), rb = find(s.parent, s.merge_b[i]);
    s.parent[std::max(ra, rb)] = std::min(ra, rb);
  }
  s.labels.assign(static_cast<size_t>(m), -1);
  std::vector<int64_t>& root_label = s.prev;
  root_label.assign(static_cast<size_t>(m), -1);
  int64_t next = 0;
  for (int64_t i = 0; i < m; ++i) {
    const int64_t root = find(s.parent, i);
    if (root_label[root] < 0) root_label[root] = next++;
    s.labels[i] = root_label[root];
  }
}

uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

constexpr int kKmeansIters = 10;

// Exactly k k-means clusters (labels in order of lowest token), as reference/pool.py:kmeans_labels.
void kmeans_labels(const PoolLevel& lv, const float* x, int64_t m, int64_t ld, int64_t D, int64_t k, uint64_t seed,
                   int64_t doc, Scratch& s) {
  // k-means++ seeding, as reference/pool.py:kmeans_init. Squared distances |x_i|^2 - 2 <x_i, x_j>
  // + |x_j|^2 with the dot in float32 (the SIMD dot blocks), clamped at 0; chosen tokens weigh 0.
  const uint64_t base = seed * 0x100000001B3ull + static_cast<uint64_t>(doc) * 0xD1B54A32D192ED03ull;
  s.perm.resize(static_cast<size_t>(k));
  s.xx.resize(static_cast<size_t>(m));
  for (int64_t i = 0; i < m; ++i) {
    double t = 0;
    for (int64_t q = 0; q < D; ++q) t += static_cast<double>(x[i * ld + q]) * x[i * ld + q];
    s.xx[i] = t;
  }
  std::vector<double>& w = s.dist;     // weight: squared distance to the nearest chosen token
  w.resize(static_cast<size_t>(std::max(m, m * k)));
  std::vector<double>& cs = s.cc;
  cs.resize(static_cast<size_t>(m));
  std::vector<int64_t>& taken = s.counts;
  taken.assign(static_cast<size_t>(m), 0);
  s.dots.resize(static_cast<size_t>(std::max(m, m * k)));
  auto take = [&](int64_t j, bool first) {
    lv.dots(x, m, ld, x + j * ld, 1, ld, D, s.dots.data(), 1);
    taken[j] = 1;
    for (int64_t i = 0; i < m; ++i) {
      double v = s.xx[i] - 2.0 * static_cast<double>(s.dots[i]) + s.xx[j];
      if (v < 0 || taken[i]) v = 0;
      w[i] = first ? v : std::min(w[i], v);
    }
  };
  s.perm[0] = static_cast<int64_t>(splitmix64(base) % static_cast<uint64_t>(m));
  take(s.perm[0], true);
  for (int64_t c = 1; c < k; ++c) {
    double run = 0;
    for (int64_t i = 0; i < m; ++i) cs[i] = run += w[i];
    int64_t j;
    if (run > 0) {
      const double u = static_cast<double>(splitmix64(base + static_cast<uint64_t>(c)) >> 11) * 0x1.0p-53 * run;
      j = std::upper_bound(cs.begin(), cs.begin() + m, u) - cs.begin();
      if (j > m - 1) j = m - 1;
    } else {
      j = std::find(taken.begin(), taken.end(), 0) - taken.begin();
    }
    s.perm[c] = j;
    take(j, false);
  }
  s.centres.resize(static_cast<size_t>(k * D));
  for (int64_t c = 0; c < k; ++c) std::memcpy(&s.centres[c * D], x + s.perm[c] * ld, sizeof(float) * D);
  s.dots.resize(static_cast<size_t>(m * k));
  s.dist.resize(static_cast<size_t>(m * k));
  s.cc.resize(static_cast<size_t>(k));
  s.labels.assign(static_cast<size_t>(m), 0);
  s.prev.assign(static_cast<size_t>(m), -1);
  s.counts.resize(static_cast<size_t>(k));
  s.sums.resize(static_cast<size_t>(k * D));
  for (int it = 0; it < kKmeansIters; ++it) {
    for (int64_t c = 0; c < k; ++c) {
      double t = 0;
      for (int64_t q = 0; q < D; ++q) t += static_cast<double>(s.centres[c * D + q]) * s.centres[c * D + q];
      s.cc[c] = t;
    }
    lv.dots(x, m, ld, s.centres.data(), k, D, D, s.dots.data(), k);
    std::fill(s.counts.begin(), s.counts.end(), 0);
    for (int64_t i = 0; i < m; ++i) {
      int64_t best = 0;
      double bd = std::numeric_limits<double>::infinity();
      for (int64_t c = 0; c < k; ++c) {
        const double v = s.xx[i] - 2.0 * static_cast<double>(s.dots[i * k + c]) + s.cc[c];
        s.dist[i * k + c] = v;
        if (v < bd) {
          bd = v;
          best = c;
        }
      }
      s.labels[i] = best;
      ++s.counts[best];
    }
    for (int64_t e = 0; e < k; ++e) {  // an empty cluster takes the farthest token of a shared cluster
      if (s.counts[e] != 0) continue;
      int64_t t = -1;
      double far = -std::numeric_limits<double>::infinity();
      for (int64_t i = 0; i < m; ++i)
        if (s.counts[s.labels[i]] > 1 && s.dist[i * k + s.labels[i]] > far) {
          far = s.dist[i * k + s.labels[i]];
          t = i;
        }
      --s.counts[s.labels[t]];
      s.labels[t] = e;
      s.counts[e] = 1;
    }
    if (s.labels == s.prev) break;
    s.prev = s.labels;
    std::fill(s.sums.begin(), s.sums.end(), 0.0);
    for (int64_t i = 0; i < m; ++i)
      for (int64_t q = 0; q < D; ++q) s.sums[s.labels[i] * D + q] += x[i * ld + q];
    for (int64_t c = 0; c < k; ++c)
      for (int64_t q = 0; q < D; ++q) s.centres[c * D + q] = static_cast<float>(s.sums[c * D + q] / s.counts[c]);
  }
  // relabel by lowest token index
  std::vector<int64_t>& order = s.prev;
  order.assign(static_cast<size_t>(k), -1);
  int64_t next = 0;
  for (int64_t i = 0; i < m; ++i) {
    if (order[s.labels[i]] < 0) order[s.labels[i]] = next++;
    s.labels[i] = order[s.labels[i]];
  }
}

}  // namespace

bool pool_tokens(const PoolCall& c) {
  const PoolLevel& lv = level_for(simd_active());
  const int threads = num_threads();
  std::vector<Scratch> scratch(threads);
  const int64_t D = c.D;
  std::vector<char> bad(static_cast<size_t>(threads), 0);
  parallel_for(c.N, [&](int64_t n, int worker) {
    Scratch& s = scratch[worker];
    const float* doc = c.x + c.doc_starts[n] * c.row_stride;
    float* out = c.out + c.out_starts[n] * D;
    const int64_t len = c.doc_lens[n];
    // The finiteness check runs here, on rows about to be read anyway, rather than as a
    // separate serial pass over all the tokens before the call.
    if (bad[worker] || !lv.finite_rows(doc, len, c.row_stride, D)) {
      bad[worker] = 1;
      c.out_lens[n] = 0;
      return;
    }
    const int64_t p = std::min(c.protected_tokens, len), m = len - p;
    const int64_t k = std::max<int64_t>(m / c.pool_factor, 1);
    if (k >= m) {  // nothing to pool: the document as it is
      for (int64_t i = 0; i < len; ++i) std::memcpy(out + i * D, doc + i * c.row_stride, sizeof(float) * D);
      c.out_lens[n] = len;
      return;
    }
    for (int64_t i = 0; i < p; ++i) std::memcpy(out + i * D, doc + i * c.row_stride, sizeof(float) * D);
    const float* rest = doc + p * c.row_stride;
    if (c.method == kWard)
      ward_labels(lv, rest, m, c.row_stride, D, k, s);
    else
      kmeans_labels(lv, rest, m, c.row_stride, D, k, c.seed, n, s);
    int64_t nc = 0;
    for (int64_t i = 0; i < m; ++i) nc = std::max(nc, s.labels[i] + 1);
    s.sums.resize(static_cast<size_t>(nc + m + D));
    s.counts.resize(static_cast<size_t>(nc));
    lv.cluster_means(rest, m, c.row_stride, D, s.labels.data(), nc, s.sums.data(), s.counts.data(), out + p * D);
    c.out_lens[n] = p + nc;
  });
  for (char b : bad)
    if (b) return false;
  // Where ties left a document fewer clusters than its room, move the later rows up so the
  // output is packed (only the rows after the first such document move).
  int64_t dst = 0;
  for (int64_t n = 0; n < c.N; ++n) {
    const int64_t src = c.out_starts[n], len = c.out_lens[n];
    if (dst != src && len > 0) std::memmove(c.out + dst * D, c.out + src * D, sizeof(float) * len * D);
    dst += len;
  }
  return true;
}

void segment_mean(const float* x, int64_t T, int64_t D, int64_t row_stride, const int64_t* ids, int64_t S,
                  float* out) {
  // Segments split across threads by id range; each thread scans all rows once.
  const int threads = num_threads();
  const int64_t n_tasks = std::max<int64_t>(1, std::min<int64_t>(S, threads));
  parallel_for(n_tasks, [&](int64_t task, int) {
    const int64_t lo = S * task / n_tasks, hi = S * (task + 1) / n_tasks;
    std::vector<double> sums(static_cast<size_t>((hi - lo) * D), 0.0);
    std::vector<int64_t> counts(static_cast<size_t>(hi - lo), 0);
    for (int64_t t = 0; t < T; ++t) {
      const int64_t id = ids[t];
      if (id < lo || id >= hi) continue;
      double* dst = &sums[(id - lo) * D];
      const float* src = x + t * row_stride;
      for (int64_t q = 0; q < D; ++q) dst[q] += src[q];
      ++counts[id - lo];
    }
    for (int64_t g = lo; g < hi; ++g) {
      const double cnt = counts[g - lo] > 0 ? static_cast<double>(counts[g - lo]) : 1.0;
      for (int64_t q = 0; q < D; ++q) out[g * D + q] = static_cast<float>(sums[(g - lo) * D + q] / cnt);
    }
  });
}

}  // namespace cpu
}  // namespace vkern
