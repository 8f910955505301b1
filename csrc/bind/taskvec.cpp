// Task-vector bindings (SPEC section 4). Components arrive as an int64 table
// [C, 10] (scheme, bits, codes, row_bytes, scales, zeros, per_row, n_groups,
// group_size, task) plus float64 coefficients [C]; the checks below are what the
// kernels trust.
#include <string>
#include <vector>

#include "bind/common.h"
#include "cpu/taskvec.h"
#ifdef VKERN_WITH_CUDA
#include "cuda/taskvec.h"
#endif

using namespace vkern;
using namespace vkern::bind;

namespace {

constexpr int kCompFields = 10;

std::vector<cpu::TvComp> comps_from(uintptr_t table, uintptr_t coefs, int64_t C, int64_t N, int64_t K, int64_t T) {
  require(C >= 0 && (C == 0 || (table != 0 && coefs != 0)), "taskvec: bad component table");
  const int64_t* f = ptr<const int64_t>(table);
  const double* cf = ptr<const double>(coefs);
  std::vector<cpu::TvComp> out(static_cast<size_t>(C));
  for (int64_t c = 0; c < C; ++c) {
    const int64_t* r = f + c * kCompFields;
    cpu::TvComp& t = out[c];
    t.scheme = static_cast<int>(r[0]);
    t.bits = static_cast<int>(r[1]);
    t.codes = ptr<const uint8_t>(static_cast<uintptr_t>(r[2]));
    t.row_bytes = r[3];
    t.scales = ptr<const float>(static_cast<uintptr_t>(r[4]));
    t.zeros = ptr<const uint8_t>(static_cast<uintptr_t>(r[5]));
    t.per_row = static_cast<int>(r[6]);
    t.n_groups = r[7];
    t.group_size = r[8];
    t.task = r[9];
    t.coef = static_cast<float>(cf[c]);
    const std::string at = "taskvec component " + std::to_string(c) + ": ";
    require(t.scheme == 0 || t.scheme == 1, at + "scheme must be 0 (affine) or 1 (sign)");
    require(t.scheme == 1 ? t.bits == 1 : (t.bits == 2 || t.bits == 3 || t.bits == 4 || t.bits == 8),
            at + "unsupported bits");
    require(t.row_bytes == (K * t.bits + 7) / 8, at + "row_bytes must be ceil(K*bits/8)");
    require(t.group_size >= 1 && t.n_groups == (K + t.group_size - 1) / t.group_size,
            at + "n_groups must be ceil(K/group_size)");
    require(t.codes != nullptr || N == 0, at + "null codes");
    require(t.scales != nullptr, at + "null scales");
    require(t.scheme == 1 || t.zeros != nullptr, at + "null zero points");
    require(t.task >= 0 && t.task < T, at + "task out of range");
  }
  return out;
}

void apply_cpu(uintptr_t base, int dtype, int64_t N, int64_t K, int64_t base_stride, uintptr_t out,
               int64_t out_stride, uintptr_t table, uintptr_t coefs, int64_t C, int64_t T, int method,
               uintptr_t task_coef, uintptr_t thr, uintptr_t cut, int keep_out) {
  check_dtype(dtype, "base");
  require(N >= 0 && K >= 1 && base_stride >= K && out_stride >= K, "apply_task_vectors: bad sizes/strides");
  require(N == 0 || (base != 0 && out != 0), "apply_task_vectors: null base/out");
  require(method == 0 || method == 1, "apply_task_vectors: method must be 0 (sum) or 1 (ties)");
  require(T == 0 || task_coef != 0, "apply_task_vectors: null task coefficients");
  require((thr == 0) == (cut == 0), "apply_task_vectors: thresholds and cuts go together");
  std::vector<cpu::TvComp> comps = comps_from(table, coefs, C, N, K, T);
  cpu::TvApplyCall call{ptr<const void>(base), dtype, N, K, base_stride, ptr<void>(out), out_stride,
                        comps.data(), C, T, method, ptr<const float>(task_coef), ptr<const float>(thr),
                        ptr<const int64_t>(cut), keep_out != 0};
  py::gil_scoped_release release;
  cpu::CallScope scope;  // pins the thread count and a pool for this call
  cpu::taskvec_apply(call);
}

void delta_linear_cpu(uintptr_t x, int64_t M, int64_t K, uintptr_t base, int dtype, int64_t N, int64_t base_stride,
                      uintptr_t table, uintptr_t coefs, int64_t C, int64_t T, int merged, uintptr_t row_order,
                      uintptr_t group_start, uintptr_t y, int base_done) {
  check_dtype(dtype, "base");
  require(M >= 0 && N >= 0 && K >= 1 && base_stride >= K, "delta_linear: bad sizes/strides");
  require((M == 0 || x != 0) && (N == 0 || base != 0) && (M * N == 0 || y != 0), "delta_linear: null array");
  require(merged || (row_order != 0 && group_start != 0), "delta_linear: task mode needs row_order/group_start");
  if (!merged) {
    const int64_t* gs = ptr<const int64_t>(group_start);
    const int64_t* order = ptr<const int64_t>(row_order);
    require(gs[0] == 0 && gs[T + 1] == M, "delta_linear: group_start must run from 0 to M");
    for (int64_t t = 0; t <= T; ++t) require(gs[t] <= gs[t + 1], "delta_linear: group_start must not decrease");
    for (int64_t i = 0; i < M; ++i) require(order[i] >= 0 && order[i] < M, "delta_linear: row_order out of range");
  }
  std::vector<cpu::TvComp> comps = comps_from(table, coefs, C, N, K, T);
  cpu::TvDeltaCall call{ptr<const float>(x), M, K, ptr<const void>(base), dtype, N, base_stride, comps.data(), C, T,
                        merged, ptr<const int64_t>(row_order), ptr<const int64_t>(group_start), ptr<float>(y),
                        base_done};
  py::gil_scoped_release release;
  cpu::CallScope scope;  // pins the thread count and a pool for this call
  cpu::taskvec_delta_linear(call);
}

void dequantize_cpu(uintptr_t table, uintptr_t coefs, int64_t C, int64_t N, int64_t K, uintptr_t out) {
  require(C == 1 || C == 2, "dequantize: one or two components");
  require(N >= 0 && K >= 1 && (N == 0 || out != 0), "dequantize: bad sizes or null output");
  std::vector<cpu::TvComp> comps = comps_from(table, coefs, C, N, K, 1);
  py::gil_scoped_release release;
  cpu::CallScope scope;  // pins the thread count and a pool for this call
  cpu::taskvec_dequantize(comps.data(), C, N, K, ptr<float>(out));
}

#ifdef VKERN_WITH_CUDA
std::vector<cuda::TvCompDev> dev_comps(uintptr_t table, uintptr_t coefs, int64_t C, int64_t N, int64_t K,
                                       int64_t T) {
  std::vector<cpu::TvComp> host = comps_from(table, coefs, C, N, K, T);
  require(C <= cuda::kMaxComps, "taskvec CUDA: at most " + std::to_string(cuda::kMaxComps) + " components");
  std::vector<cuda::TvCompDev> out(host.size());
  for (size_t i = 0; i < host.size(); ++i) {
    const cpu::TvComp& h = host[i];
    out[i] = cuda::TvCompDev{h.codes, h.scales, h.zeros, h.row_bytes, h.n_groups, h.group_size, h.task,
                             h.coef, h.scheme, h.bits, h.per_row};
  }
  return out;
}

void apply_cuda(uintptr_t base, int dtype, int64_t N, int64_t K, uintptr_t out, uintptr_t table, uintptr_t coefs,
                int64_t C, int64_t T, int method, std::vector<float> task_coef, std::vector<float> thr,
                std::vector<int64_t> cut, uintptr_t stream) {
  check_dtype(dtype, "base");
  require(N >= 0 && K >= 1, "apply_task_vectors: bad sizes");
  require(T <= cuda::kMaxComps && static_cast<int64_t>(task_coef.size()) == T, "apply_task_vectors: bad T");
  require(thr.empty() || (static_cast<int64_t>(thr.size()) == T && static_cast<int64_t>(cut.size()) == T),
          "apply_task_vectors: bad trim arrays");
  std::vector<cuda::TvCompDev> comps = dev_comps(table, coefs, C, N, K, T);
  py::gil_scoped_release release;
  cpu::CallScope scope;  // pins the thread count and a pool for this call
  cuda_check(cuda::taskvec_apply(ptr<const void>(base), dtype, N, K, ptr<void>(out), comps.data(), C, T, method,
                                 task_coef.data(), thr.empty() ? nullptr : thr.data(), cut.data(), stream_of(stream)),
             "vkern apply_task_vectors CUDA kernel");
}

void delta_linear_cuda(uintptr_t x, int64_t M, int64_t K, uintptr_t base, int dtype, int64_t N, uintptr_t table,
                       uintptr_t coefs, int64_t C, int64_t T, uintptr_t task_ids, uintptr_t y, uintptr_t stream) {
  check_dtype(dtype, "base");
  require(M >= 0 && N >= 0 && K >= 1, "delta_linear: bad sizes");
  std::vector<cuda::TvCompDev> comps = dev_comps(table, coefs, C, N, K, T);
  py::gil_scoped_release release;
  cpu::CallScope scope;  // pins the thread count and a pool for this call
  cuda_check(cuda::taskvec_delta_linear(ptr<const float>(x), M, K, ptr<const void>(base), dtype, N, comps.data(), C,
                                        ptr<const int64_t>(task_ids), ptr<float>(y), stream_of(stream)),
             "vkern delta_linear CUDA kernel");
}

void dequantize_cuda(uintptr_t table, uintptr_t coefs, int64_t C, int64_t N, int64_t K, uintptr_t out,
                     uintptr_t stream) {
  require(C == 1 || C == 2, "dequantize: one or two components");
  std::vector<cuda::TvCompDev> comps = dev_comps(table, coefs, C, N, K, 1);
  py::gil_scoped_release release;
  cpu::CallScope scope;  // pins the thread count and a pool for this call
  cuda_check(cuda::taskvec_dequantize(comps.data(), C, N, K, ptr<float>(out), stream_of(stream)),
             "vkern dequantize CUDA kernel");
}
#endif

}  // namespace

VKERN_BIND(taskvec) {
  m.def("taskvec_apply_cpu", &apply_cpu);
  m.def("taskvec_delta_linear_cpu", &delta_linear_cpu);
  m.def("taskvec_dequantize_cpu", &dequantize_cpu);
#ifdef VKERN_WITH_CUDA
  m.def("taskvec_apply_cuda", &apply_cuda);
  m.def("taskvec_delta_linear_cuda", &delta_linear_cuda);
  m.def("taskvec_dequantize_cuda", &dequantize_cuda);
#endif
}
