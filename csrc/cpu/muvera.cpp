// MUVERA encoder: one point cloud per task. Per repetition, each token's k
// SimHash signs (float64 dots, so every backend agrees on the signs) give its
// partition (Gray-decoded), its projection is added (float64) into that block;
// then averaging, filling empty blocks from the Hamming-nearest token, and the
// optional final count sketch, in the reference's order of operations.
#include "cpu/muvera.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu/threadpool.h"

namespace vkern {
namespace cpu {

void muvera_encode(const MuveraCall& c) {
  const int threads = num_threads();
  const int64_t P = int64_t(1) << c.k, dp = c.d_proj, D = c.D;
  struct Scratch {
    std::vector<double> block, final_out;
    std::vector<int64_t> count, bits, part;
    std::vector<float> proj;
    std::vector<double> dots;
  };
  std::vector<Scratch> scratch(threads);
  parallel_for(c.N, [&](int64_t n, int worker) {
    Scratch& s = scratch[worker];
    const int64_t lo = c.offsets[n], L = c.offsets[n + 1] - lo;
    const float* x = c.x + lo * D;
    s.block.assign(static_cast<size_t>(c.raw_dim), 0.0);
    s.count.resize(static_cast<size_t>(P));
    s.bits.resize(static_cast<size_t>(L));
    s.part.resize(static_cast<size_t>(L));
    s.proj.resize(static_cast<size_t>(L * dp));
    // All SimHash dots of the cloud at once: [L][R*k], simhash_t is [D][R*k] (contiguous rows
    // so the inner loop vectorises).
    const int64_t RK = c.R * c.k;
    s.dots.assign(static_cast<size_t>(L * RK), 0.0);
    for (int64_t t = 0; t < L; ++t) {
      double* acc = s.dots.data() + t * RK;
      const float* xt = x + t * D;
      for (int64_t q = 0; q < D; ++q) {
        const double xv = xt[q];
        const float* g = c.simhash_t + q * RK;
        for (int64_t j = 0; j < RK; ++j) acc[j] += xv * g[j];
      }
    }
    for (int64_t r = 0; r < c.R; ++r) {
      double* blk = s.block.data() + r * P * dp;
      std::fill(s.count.begin(), s.count.end(), 0);
      for (int64_t t = 0; t < L; ++t) {
        const float* xt = x + t * D;
        const double* dt = s.dots.data() + t * RK + r * c.k;
        int64_t b = 0;
        for (int64_t j = 0; j < c.k; ++j) b = (b << 1) | (dt[j] > 0 ? 1 : 0);
        int64_t p = b;
        for (int64_t sh = 1; sh < c.k; sh <<= 1) p ^= p >> sh;
        s.bits[t] = b;
        s.part[t] = p;
        float* pr = s.proj.data() + t * dp;
        if (c.ams_index) {
          std::fill(pr, pr + dp, 0.0f);
          const int64_t* idx = c.ams_index + r * D;
          const float* sg = c.ams_sign + r * D;
          for (int64_t q = 0; q < D; ++q) pr[idx[q]] += sg[q] * xt[q];
        } else {
          std::memcpy(pr, xt, sizeof(float) * D);
        }
        double* dst = blk + p * dp;
        for (int64_t q = 0; q < dp; ++q) dst[q] += static_cast<double>(pr[q]);
        ++s.count[p];
      }
      if (c.average)
        for (int64_t p = 0; p < P; ++p)
          if (s.count[p] > 1)
            for (int64_t q = 0; q < dp; ++q) blk[p * dp + q] /= static_cast<double>(s.count[p]);
      if (c.fill_empty && L > 0)
        for (int64_t p = 0; p < P; ++p) {
          if (s.count[p] != 0) continue;
          const int64_t gray = p ^ (p >> 1);
          int64_t best = 0, best_d = 64;
          for (int64_t t = 0; t < L; ++t) {
            const int64_t d = __builtin_popcountll(static_cast<unsigned long long>(s.bits[t] ^ gray));
            if (d < best_d) {
              best_d = d;
              best = t;
            }
          }
          for (int64_t q = 0; q < dp; ++q) blk[p * dp + q] = s.proj[best * dp + q];
        }
    }
    float* out = c.out + n * c.out_dim;
    if (c.final_index) {
      s.final_out.assign(static_cast<size_t>(c.out_dim), 0.0);
      for (int64_t i = 0; i < c.raw_dim; ++i) s.final_out[c.final_index[i]] += c.final_sign[i] * s.block[i];
      for (int64_t i = 0; i < c.out_dim; ++i) out[i] = static_cast<float>(s.final_out[i]);
    } else {
      for (int64_t i = 0; i < c.raw_dim; ++i) out[i] = static_cast<float>(s.block[i]);
    }
  });
}

}  // namespace cpu
}  // namespace vkern
