// MUVERA encoder: one point cloud per task. Per repetition, each token's k SimHash signs (the
// signs of the float64 dots, q in order, so every backend agrees on them) give its partition
// (Gray-decoded), its projection is added (float64) into that block; then averaging, filling
// empty blocks from the Hamming-nearest token, and the optional final count sketch, in the
// reference's order of operations.
//
// Speed without changing a bit:
// - SimHash: per cloud, all R * k dots at once as one float32 GEMM [L, D] x [D, R*k] (SIMD level:
//   register tiles of 4 tokens x 24 columns), whose sign is used only where it is certain to be
//   the float64 dot's sign (see kbound below); the rest (0.036% of the dots on the MiniLM
//   vectors of benchmarks/realdata_retrieval.py) are computed in float64, q in order.
// - AMS sketch: on the cloud held transposed, 8 tokens per SIMD vector; for each output
//   coordinate its input coordinates in increasing order (a per-call inverse of the AMS index),
//   so each float32 sum is the reference's scatter-add.
// - fill_empty_partitions: the Hamming search runs over the distinct bit strings of the cloud
//   (each with its first token), not over every token: the same choice, ties to the lower token.
#include "cpu/muvera.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <vector>

#include "cpu/dispatch.h"
#include "cpu/threadpool.h"

namespace vkern {
namespace cpu {
namespace {

// gamma_n = n u / (1 - n u): |computed - exact| <= gamma_n * sum |x_q g_q| for any n-term float
// dot product with unit roundoff u, in any order, fused or not (Higham, Accuracy and Stability
// of Numerical Algorithms, 3.1). Infinite when n u >= 1/2 (then no float32 sign is trusted).
double gamma(int64_t n, double u) { return n * u >= 0.5 ? INFINITY : n * u / (1.0 - n * u); }

inline int popcount16(int64_t v) {  // bit strings have k <= 16 bits
  uint32_t x = static_cast<uint32_t>(v);
  x = x - ((x >> 1) & 0x55555555u);
  x = (x & 0x33333333u) + ((x >> 2) & 0x33333333u);
  x = (x + (x >> 4)) & 0x0F0F0F0Fu;
  return static_cast<int>((x * 0x01010101u) >> 24);
}

}  // namespace

void muvera_encode(const MuveraCall& c) {
  const MuveraLevel& lv = simd_active() == SimdLevel::generic ? muvera_level_generic() : muvera_level_avx2();
  const int threads = num_threads();
  const int64_t P = int64_t(1) << c.k, dp = c.d_proj, D = c.D;
  const int64_t RK = c.R * c.k, C = (RK + 7) / 8 * 8;
  // SimHash matrix, columns padded to a multiple of 8 with zeros (their dots are unused), and the
  // float64 norm of each column.
  std::vector<float> g(static_cast<size_t>(D * C), 0.0f);
  std::vector<double> gnorm(static_cast<size_t>(C), 0.0);
  double gmax = 0.0;
  for (int64_t q = 0; q < D; ++q)
    for (int64_t j = 0; j < RK; ++j) {
      const float v = c.simhash_t[q * RK + j];
      g[q * C + j] = v;
      gnorm[j] += static_cast<double>(v) * v;
      gmax = std::max(gmax, static_cast<double>(std::fabs(v)));
    }
  for (double& v : gnorm) v = std::sqrt(v);
  // Certified signs. Let e be the exact dot of token x and column g (real arithmetic), S = sum |x_q g_q|
  // <= |x|_2 |g|_2. The float32 dot d32 is within gamma_D(2^-24) S + (2D + 2) 2^-126 (1 + max|g|)
  // of e (the second term covers underflow, even with flush-to-zero or denormals-are-zero:
  // each rounding below 2^-126, each flushed input), the float64 dot d64 within
  // gamma_D(2^-53) S (its products are exact). So where |d32| > (gamma32 + gamma64) |x| |g| + that
  // term (and d32 is finite, so nothing overflowed), |e| > |d64 - e|: d64, e and d32 share a sign.
  // The norms are float64 sums of D terms (relative error below 1e-9 wherever the bound is finite,
  // D < 2^23): the 1e-6 slack covers them.
  const double kbound = (gamma(D + 1, 0x1p-24) + gamma(D + 1, 0x1p-53)) * (1.0 + 1e-6);
  const double abound = static_cast<double>(2 * D + 2) * 0x1p-126 * (1.0 + gmax);
  // AMS inverse index per repetition: inputs of output j, increasing q, at order[starts[j]..starts[j+1]).
  std::vector<int32_t> order, starts;
  if (c.ams_index) {
    order.resize(static_cast<size_t>(c.R * D));
    starts.assign(static_cast<size_t>(c.R * (dp + 1)), 0);
    for (int64_t r = 0; r < c.R; ++r) {
      const int64_t* idx = c.ams_index + r * D;
      int32_t* st = starts.data() + r * (dp + 1);
      for (int64_t q = 0; q < D; ++q) ++st[idx[q] + 1];
      for (int64_t j = 0; j < dp; ++j) st[j + 1] += st[j];
      std::vector<int32_t> fill(st, st + dp);
      for (int64_t q = 0; q < D; ++q) order[r * D + fill[idx[q]]++] = static_cast<int32_t>(q);
    }
  }
  struct Scratch {
    std::vector<double> block, final_out, tnorm;
    std::vector<int64_t> count, bits, part;
    std::vector<int32_t> first, distinct;
    std::vector<float> dots, xbuf, xT, projT;
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
    if (RK > 0 && L > 0) {
      s.dots.resize(static_cast<size_t>((L + 3) / 4 * 4 * C));
      s.xbuf.resize(static_cast<size_t>(4 * D));
      lv.simhash_dots(x, L, D, g.data(), C, s.dots.data(), s.xbuf.data());
      s.tnorm.resize(static_cast<size_t>(L));
      lv.token_norms(x, L, D, s.tnorm.data());
      for (int64_t t = 0; t < L; ++t) s.tnorm[t] = std::sqrt(s.tnorm[t]) * kbound;
    }
    // Is the float64 dot of token t and SimHash column col positive? (see kbound above)
    auto positive = [&](int64_t t, int64_t col) {
      const float d = s.dots[t * C + col];
      const float a = std::fabs(d);
      if (a > s.tnorm[t] * gnorm[col] + abound && a <= FLT_MAX) return d > 0;
      const float* xt = x + t * D;
      double acc = 0.0;
      for (int64_t q = 0; q < D; ++q) acc += static_cast<double>(xt[q]) * static_cast<double>(c.simhash_t[q * RK + col]);
      return acc > 0;
    };
    const int64_t Lp = (L + 7) / 8 * 8;
    if (c.ams_index && L > 0) {  // the cloud transposed, zero-padded to Lp tokens
      s.xT.resize(static_cast<size_t>(D * Lp));
      s.projT.resize(static_cast<size_t>(dp * Lp));
      for (int64_t q = 0; q < D; ++q)
        for (int64_t t = L; t < Lp; ++t) s.xT[q * Lp + t] = 0.0f;
      lv.transpose(x, L, D, Lp, s.xT.data());
    }
    for (int64_t r = 0; r < c.R; ++r) {
      double* blk = s.block.data() + r * P * dp;
      std::fill(s.count.begin(), s.count.end(), 0);
      if (c.ams_index && L > 0)
        lv.ams_project(s.xT.data(), Lp, order.data() + r * D, starts.data() + r * (dp + 1), c.ams_sign + r * D, dp,
                       s.projT.data());
      for (int64_t t = 0; t < L; ++t) {
        int64_t b = 0;
        for (int64_t j = 0; j < c.k; ++j) b = (b << 1) | (positive(t, r * c.k + j) ? 1 : 0);
        int64_t p = b;
        for (int64_t sh = 1; sh < c.k; sh <<= 1) p ^= p >> sh;
        s.bits[t] = b;
        s.part[t] = p;
        double* dst = blk + p * dp;
        if (c.ams_index) {
          const float* pr = s.projT.data() + t;
          for (int64_t q = 0; q < dp; ++q) dst[q] += static_cast<double>(pr[q * Lp]);
        } else {
          const float* xt = x + t * D;
          for (int64_t q = 0; q < dp; ++q) dst[q] += static_cast<double>(xt[q]);
        }
        ++s.count[p];
      }
      if (c.average)
        for (int64_t p = 0; p < P; ++p)
          if (s.count[p] > 1)
            for (int64_t q = 0; q < dp; ++q) blk[p * dp + q] /= static_cast<double>(s.count[p]);
      if (c.fill_empty && L > 0 && std::find(s.count.begin(), s.count.end(), 0) != s.count.end()) {
        // the distinct bit strings, each with its first token, in order of that token
        s.first.assign(static_cast<size_t>(P), -1);
        s.distinct.clear();
        for (int64_t t = 0; t < L; ++t)
          if (s.first[s.bits[t]] < 0) {
            s.first[s.bits[t]] = static_cast<int32_t>(t);
            s.distinct.push_back(static_cast<int32_t>(s.bits[t]));
          }
        for (int64_t p = 0; p < P; ++p) {
          if (s.count[p] != 0) continue;
          const int64_t gray = p ^ (p >> 1);
          int64_t best = 0;
          int best_d = 64;
          for (const int32_t v : s.distinct) {  // strictly better only: ties keep the lower token
            const int d = popcount16(v ^ gray);
            if (d < best_d) {
              best_d = d;
              best = s.first[v];
            }
          }
          if (c.ams_index)
            for (int64_t q = 0; q < dp; ++q) blk[p * dp + q] = s.projT[q * Lp + best];
          else
            for (int64_t q = 0; q < dp; ++q) blk[p * dp + q] = x[best * D + q];
        }
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
