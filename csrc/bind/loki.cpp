// Loki bindings (SPEC section 2): decode attention (sparse and dense) and rotate.
#include "bind/common.h"
#include "cpu/loki.h"
#ifdef VKERN_WITH_CUDA
#include "cuda/loki.h"
#endif

using namespace vkern;
using namespace vkern::bind;

namespace {

// Dense decode when budgets == 0.
void loki_cpu(uintptr_t q, int q_dtype, int64_t B, int64_t Hq, int64_t H_kv, int64_t T, int64_t D, int64_t q_sb,
              int64_t q_sh, int64_t q_sd, uintptr_t k, uintptr_t v, int kv_dtype, int64_t k_sb, int64_t k_sh,
              int64_t k_st, int64_t v_sb, int64_t v_sh, int64_t v_st, uintptr_t kp, int64_t kp_sb, int64_t kp_sh,
              int64_t kp_st, uintptr_t seq_lens, uintptr_t budgets, int64_t rank, int64_t num_sink,
              int64_t num_recent, bool shared, double scale, uintptr_t out, uintptr_t idx, int64_t K) {
  check_dtype(q_dtype, "q");
  check_dtype(kv_dtype, "k_cache");
  require(B >= 0 && Hq >= 1 && H_kv >= 1 && T >= 1 && D >= 1 && Hq % H_kv == 0, "loki: bad sizes");
  require(budgets == 0 || (rank >= 1 && rank <= D), "loki: rank must be in [1, D]");
  require(num_sink >= 0 && num_recent >= 0 && K >= 0, "loki: negative counts");
  require(B == 0 || (q && k && v && seq_lens && out), "loki: null pointer");
  require(idx == 0 || K >= 1 || B == 0, "loki: index output without width");
  const int64_t* lens = ptr<const int64_t>(seq_lens);
  for (int64_t b = 0; b < B; ++b) require(lens[b] >= 1 && lens[b] <= T, "loki: seq_lens must be in [1, T]");
  cpu::LokiCall call{ptr<const void>(q), q_dtype, B, Hq, H_kv, T, D, q_sb, q_sh, q_sd,
                     ptr<const void>(k), ptr<const void>(v), kv_dtype, k_sb, k_sh, k_st, v_sb, v_sh, v_st,
                     ptr<const void>(kp), kp_sb, kp_sh, kp_st, lens, ptr<const int64_t>(budgets), rank,
                     num_sink, num_recent, shared, static_cast<float>(scale), ptr<float>(out), ptr<int64_t>(idx), K};
  py::gil_scoped_release release;
  cpu::CallScope scope;  // pins the thread count and a pool for this call
  cpu::loki_attention(call);
}

void loki_rotate_cpu(uintptr_t x, int dtype, int64_t rows, int64_t H, int64_t D, int64_t x_sr, int64_t x_sh,
                     uintptr_t P, int64_t H_kv, uintptr_t out) {
  check_dtype(dtype, "x");
  require(rows >= 0 && H >= 1 && D >= 1 && H_kv >= 1 && H % H_kv == 0, "loki_rotate: bad sizes");
  require(rows == 0 || (x && P && out), "loki_rotate: null pointer");
  cpu::RotateCall call{ptr<const void>(x), dtype, rows, H, D, x_sr, x_sh, ptr<const float>(P), H_kv, ptr<float>(out)};
  py::gil_scoped_release release;
  cpu::CallScope scope;  // pins the thread count and a pool for this call
  if (rows > 0) cpu::loki_rotate(call);
}

#ifdef VKERN_WITH_CUDA
// q float32 [B, Hq, D] contiguous on the device; budgets == 0: dense decode.
void loki_cuda(uintptr_t q, int q_dtype, int64_t B, int64_t Hq, int64_t H_kv, int64_t T, int64_t D, uintptr_t k,
               uintptr_t v, int kv_dtype, int64_t k_sb, int64_t k_sh, int64_t k_st, int64_t v_sb, int64_t v_sh,
               int64_t v_st, uintptr_t kp, int64_t kp_sb, int64_t kp_sh, int64_t kp_st, uintptr_t lens,
               uintptr_t budgets, int64_t rank, int64_t num_sink, int64_t num_recent,
               bool shared, double scale, uintptr_t scores, uintptr_t idx, int64_t K, int nsplit, uintptr_t ws,
               uintptr_t count, uintptr_t out, uintptr_t stream) {
  require(q_dtype == 0, "loki_cuda: q must be float32");
  check_dtype(kv_dtype, "k_cache");
  require(B >= 0 && Hq >= 1 && H_kv >= 1 && Hq % H_kv == 0 && T >= 1 && D >= 1 && D <= 256 && K >= 1 && nsplit >= 1,
          "loki_cuda: bad sizes (D must be <= 256)");
  require(budgets == 0 || (rank >= 1 && rank <= D && scores && idx), "loki_cuda: bad sparse arguments");
  cuda::loki::Args a{ptr<const float>(q), B, Hq, H_kv, T, D, ptr<const void>(k), ptr<const void>(v), kv_dtype,
                     k_sb, k_sh, k_st, v_sb, v_sh, v_st, ptr<const void>(kp), kp_sb, kp_sh, kp_st,
                     ptr<const int64_t>(lens), ptr<const int64_t>(budgets),
                     rank, num_sink, num_recent, shared, static_cast<float>(scale), ptr<float>(scores),
                     ptr<int32_t>(idx), K, nsplit, ptr<float>(ws), ptr<int32_t>(count), ptr<float>(out)};
  py::gil_scoped_release release;
  cpu::CallScope scope;  // pins the thread count and a pool for this call
  cuda_check(cuda::loki::attention(a, stream_of(stream)), "vkern loki CUDA kernels");
}

void loki_rotate_cuda(uintptr_t x, int dtype, int64_t rows, int64_t H, int64_t D, int64_t x_sr, int64_t x_sh,
                      uintptr_t P, int64_t H_kv, uintptr_t out, uintptr_t stream) {
  check_dtype(dtype, "x");
  require(rows >= 0 && H >= 1 && D >= 1 && H_kv >= 1 && H % H_kv == 0, "loki_rotate_cuda: bad sizes");
  py::gil_scoped_release release;
  cpu::CallScope scope;  // pins the thread count and a pool for this call
  cuda_check(cuda::loki::rotate(ptr<const void>(x), dtype, rows, H, D, x_sr, x_sh, ptr<const float>(P), H_kv,
                                ptr<float>(out), stream_of(stream)),
             "vkern loki rotate CUDA kernel");
}
#endif

}  // namespace

VKERN_BIND(loki) {
  m.def("loki_cpu", &loki_cpu);
  m.def("loki_rotate_cpu", &loki_rotate_cpu);
#ifdef VKERN_WITH_CUDA
  m.def("loki_cuda", &loki_cuda);
  m.def("loki_cuda_splits", [](int64_t B, int64_t Hq, int64_t K) { return cuda::loki::splits_for(B, Hq, K); });
  m.def("loki_rotate_cuda", &loki_rotate_cuda);
#endif
}
