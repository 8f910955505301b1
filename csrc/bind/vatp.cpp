// VATP bindings (SPEC section 3). The Python wrapper has validated shapes,
// dtypes and values; these checks guard what the kernels trust.
#include <algorithm>

#include "bind/common.h"
#include "cpu/vatp.h"
#ifdef VKERN_WITH_CUDA
#include "cuda/vatp.h"
#endif

using namespace vkern;
using namespace vkern::bind;

namespace {

using Strides4 = std::vector<int64_t>;

void need4(const Strides4& s, const char* name) {
  require(s.size() == 4, std::string(name) + ": expected 4 strides");
}

void colsum_cpu(uintptr_t q, int q_dtype, int64_t B, int64_t Hq, int64_t Tq, int64_t D, Strides4 qs, uintptr_t k,
                int k_dtype, int64_t H_kv, int64_t T, Strides4 ks, uintptr_t seq_lens, bool causal, double scale,
                uintptr_t out) {
  check_dtype(q_dtype, "q");
  check_dtype(k_dtype, "k");
  need4(qs, "q");
  need4(ks, "k");
  require(B >= 0 && Tq >= 0 && T >= 0 && D >= 1 && H_kv >= 1 && Hq >= H_kv && Hq % H_kv == 0,
          "attention_colsum: bad sizes");
  require(ks[3] == 1 || D == 1, "attention_colsum: k needs a unit stride along D");
  require(seq_lens != 0 && out != 0, "attention_colsum: null seq_lens or output");
  const int64_t* lens = ptr<const int64_t>(seq_lens);
  for (int64_t b = 0; b < B; ++b) require(lens[b] >= 0 && lens[b] <= T, "attention_colsum: seq_lens out of [0, T]");
  cpu::vatp::ColsumCall call{ptr<const void>(q), q_dtype, B, Hq, Tq, D, qs[0], qs[1], qs[2], qs[3],
                             ptr<const void>(k), k_dtype, H_kv, T, ks[0], ks[1], ks[2], lens, causal,
                             static_cast<float>(scale), ptr<float>(out)};
  py::gil_scoped_release release;
  cpu::CallScope scope;  // pins the thread count and a pool for this call
  cpu::vatp::attention_colsum(call);
}

void value_l1_cpu(uintptr_t v, int dtype, int64_t B, int64_t H, int64_t T, int64_t D, Strides4 vs, uintptr_t out) {
  check_dtype(dtype, "v");
  need4(vs, "v");
  require(B >= 0 && H >= 0 && T >= 0 && D >= 0, "value_l1: bad sizes");
  require(out != 0 || B * H * T == 0, "value_l1: null output");
  cpu::vatp::L1Call call{ptr<const void>(v), dtype, B, H, T, D, vs[0], vs[1], vs[2], vs[3], ptr<float>(out)};
  py::gil_scoped_release release;
  cpu::CallScope scope;  // pins the thread count and a pool for this call
  cpu::vatp::value_l1(call);
}

cpu::vatp::Cache cache(uintptr_t data, int dtype, int64_t D, const Strides4& s, const char* name) {
  check_dtype(dtype, name);
  need4(s, name);
  return cpu::vatp::Cache{ptr<char>(data), dtype, D, s[0], s[1], s[2], s[3]};
}

void prune_cpu(uintptr_t k, int k_dtype, int64_t Dk, Strides4 ks, uintptr_t v, int v_dtype, int64_t Dv, Strides4 vs,
               uintptr_t k_out, Strides4 kos, uintptr_t v_out, Strides4 vos, int64_t B, int64_t H, int64_t T,
               uintptr_t scores, int s_dtype, std::vector<int64_t> ss, uintptr_t seq_lens, uintptr_t kept_lens,
               int64_t num_sink, int64_t num_recent, int64_t kmax, uintptr_t kept_idx, bool inplace,
               bool fresh_out) {
  check_dtype(s_dtype, "scores");
  require(ss.size() == 3, "scores: expected 3 strides");
  require(B >= 0 && H >= 0 && T >= 0 && Dk >= 0 && Dv >= 0 && num_sink >= 0 && num_recent >= 0 && kmax >= 0,
          "vatp_prune: bad sizes");
  require(seq_lens != 0 && kept_lens != 0, "vatp_prune: null seq_lens / kept_lens");
  const int64_t* lens = ptr<const int64_t>(seq_lens);
  const int64_t* kept = ptr<const int64_t>(kept_lens);
  for (int64_t b = 0; b < B; ++b) {
    require(lens[b] >= 0 && lens[b] <= T, "vatp_prune: seq_lens out of [0, T]");
    const int64_t prot = std::min(lens[b], num_sink + num_recent);
    require(kept[b] >= prot && kept[b] <= lens[b] && kept[b] <= kmax,
            "vatp_prune: kept_lens must lie in [min(seq_len, num_sink + num_recent), seq_len] and <= kmax");
  }
  require(kept_idx != 0 || B * H * kmax == 0, "vatp_prune: null kept_idx");
  require(inplace || ((k_out != 0 || Dk == 0) && (v_out != 0 || Dv == 0)) || B * H * kmax == 0,
          "vatp_prune: null outputs");
  cpu::vatp::PruneCall call{cache(k, k_dtype, Dk, ks, "k"),
                            cache(v, v_dtype, Dv, vs, "v"),
                            inplace ? cpu::vatp::Cache{} : cache(k_out, k_dtype, Dk, kos, "k_out"),
                            inplace ? cpu::vatp::Cache{} : cache(v_out, v_dtype, Dv, vos, "v_out"),
                            B, H, T, ptr<const void>(scores), s_dtype, ss[0], ss[1], ss[2], lens, kept,
                            num_sink, num_recent, kmax, ptr<int64_t>(kept_idx), inplace, fresh_out && !inplace};
  py::gil_scoped_release release;
  cpu::CallScope scope;  // pins the thread count and a pool for this call
  cpu::vatp::prune(call);
}

#ifdef VKERN_WITH_CUDA
void colsum_cuda(uintptr_t q, uintptr_t k, int dtype, int64_t B, int64_t Hq, int64_t Tq, int64_t D, int64_t H_kv,
                 int64_t T, uintptr_t seq_lens, bool causal, double scale, uintptr_t row_stats, uintptr_t out,
                 uintptr_t stream) {
  check_dtype(dtype, "q/k");
  require(B >= 0 && Tq >= 0 && T >= 0 && D >= 1 && H_kv >= 1 && Hq % H_kv == 0, "attention_colsum: bad sizes");
  py::gil_scoped_release release;
  cpu::CallScope scope;  // pins the thread count and a pool for this call
  cuda_check(cuda::vatp_colsum(ptr<const void>(q), ptr<const void>(k), static_cast<cuda::VatpDType>(dtype), B, Hq,
                               Tq, D, H_kv, T, ptr<const int64_t>(seq_lens), causal, static_cast<float>(scale),
                               ptr<float>(row_stats), ptr<float>(out), stream_of(stream)),
             "vkern attention_colsum CUDA kernel");
}

void value_l1_cuda(uintptr_t v, int dtype, int64_t rows, int64_t D, uintptr_t out, uintptr_t stream) {
  check_dtype(dtype, "v");
  require(rows >= 0 && D >= 0, "value_l1: bad sizes");
  py::gil_scoped_release release;
  cpu::CallScope scope;  // pins the thread count and a pool for this call
  cuda_check(cuda::vatp_value_l1(ptr<const void>(v), static_cast<cuda::VatpDType>(dtype), rows, D, ptr<float>(out),
                                 stream_of(stream)),
             "vkern value_l1 CUDA kernel");
}

void prune_cuda(uintptr_t k, uintptr_t v, int64_t k_row_bytes, int64_t v_row_bytes, uintptr_t k_out, uintptr_t v_out,
                int64_t B, int64_t H, int64_t T, uintptr_t scores, uintptr_t seq_lens, uintptr_t kept_lens,
                int64_t num_sink, int64_t num_recent, int64_t kmax, uintptr_t kept_idx, bool inplace,
                uintptr_t stream) {
  require(B >= 0 && H >= 0 && T >= 0 && kmax >= 0 && num_sink >= 0 && num_recent >= 0, "vatp_prune: bad sizes");
  py::gil_scoped_release release;
  cpu::CallScope scope;  // pins the thread count and a pool for this call
  cuda_check(cuda::vatp_prune(ptr<char>(k), ptr<char>(v), k_row_bytes, v_row_bytes, ptr<char>(k_out),
                              ptr<char>(v_out), B, H, T, ptr<const float>(scores), ptr<const int64_t>(seq_lens),
                              ptr<const int64_t>(kept_lens), num_sink, num_recent, kmax, ptr<int64_t>(kept_idx),
                              inplace, stream_of(stream)),
             "vkern vatp_prune CUDA kernel");
}
#endif

}  // namespace

VKERN_BIND(vatp) {
  m.def("vatp_colsum_cpu", &colsum_cpu);
  m.def("vatp_value_l1_cpu", &value_l1_cpu);
  m.def("vatp_prune_cpu", &prune_cpu);
#ifdef VKERN_WITH_CUDA
  m.def("vatp_colsum_cuda", &colsum_cuda);
  m.def("vatp_value_l1_cuda", &value_l1_cuda);
  m.def("vatp_prune_cuda", &prune_cuda);
#endif
}
