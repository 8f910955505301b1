// The only file that sees Python. Every kernel entry takes raw addresses
// (ints) plus sizes and strides from the Python wrappers, which own the
// arrays and keep them alive; here we check what the kernels will trust and
// release the GIL around the kernel.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "cpu/dispatch.h"
#include "cpu/maxsim.h"
#include "cpu/threadpool.h"
#ifdef VKERN_WITH_CUDA
#include <cuda_runtime_api.h>

#include "cuda/maxsim.h"
#endif

namespace py = pybind11;
using namespace vkern;

namespace {

template <typename T>
T* ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

void require(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument(what);
}

void check_dtype(int dtype, const char* name) {
  require(dtype == cpu::kF32 || dtype == cpu::kF16 || dtype == cpu::kBF16,
          std::string(name) + ": dtype code must be 0 (float32), 1 (float16) or 2 (bfloat16)");
}

void maxsim_cpu(uintptr_t q, int q_dtype, int64_t B, int64_t Lq, int64_t D, int64_t q_sb, int64_t q_si,
                int64_t q_sd, uintptr_t q_lengths, uintptr_t docs, int d_dtype, int64_t d_row_stride,
                uintptr_t doc_starts, uintptr_t doc_lens, int64_t N, uintptr_t scores, int64_t topk,
                uintptr_t topk_scores, uintptr_t topk_idx) {
  check_dtype(q_dtype, "queries");
  check_dtype(d_dtype, "docs");
  require(B >= 0 && Lq >= 0 && D >= 1 && N >= 0, "maxsim: sizes must be non-negative and D >= 1");
  require(q != 0 || B * Lq == 0, "maxsim: null queries");
  require(N == 0 || (doc_starts != 0 && doc_lens != 0), "maxsim: null document offsets");
  require(scores != 0 || topk > 0, "maxsim: no output");
  require(topk == 0 || (topk_scores != 0 && topk_idx != 0), "maxsim: null top-k output");
  cpu::MaxsimCall call{ptr<const void>(q), q_dtype, B, Lq, D, q_sb, q_si, q_sd,
                       ptr<const int64_t>(q_lengths), ptr<const void>(docs), d_dtype, d_row_stride,
                       ptr<const int64_t>(doc_starts), ptr<const int64_t>(doc_lens), N,
                       ptr<float>(scores), topk, ptr<float>(topk_scores), ptr<int64_t>(topk_idx)};
  py::gil_scoped_release release;
  cpu::maxsim(call);
}

#ifdef VKERN_WITH_CUDA
void cuda_check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

void maxsim_cuda(uintptr_t q, uintptr_t docs, int dtype, int64_t B, int64_t Lq, int64_t D,
                 uintptr_t q_lengths, uintptr_t doc_offsets, int64_t N, uintptr_t scores, uintptr_t stream) {
  check_dtype(dtype, "docs");
  require(B >= 0 && Lq >= 0 && D >= 1 && N >= 0, "maxsim: sizes must be non-negative and D >= 1");
  require(scores != 0 || B * N == 0, "maxsim: null scores");
  py::gil_scoped_release release;
  cuda_check(cuda::maxsim_scores(ptr<const void>(q), ptr<const void>(docs), static_cast<cuda::DType>(dtype), B,
                                 Lq, D, ptr<const int32_t>(q_lengths), ptr<const int64_t>(doc_offsets), N,
                                 ptr<float>(scores), reinterpret_cast<cudaStream_t>(stream)),
             "vkern maxsim CUDA kernel");
}

void topk_cuda(uintptr_t scores, int64_t B, int64_t N, int64_t k, uintptr_t out_scores, uintptr_t out_idx,
               uintptr_t stream) {
  require(k >= 1 && k <= N, "topk: need 1 <= k <= N");
  py::gil_scoped_release release;
  cuda_check(cuda::topk_rows(ptr<const float>(scores), B, N, k, ptr<float>(out_scores), ptr<int64_t>(out_idx),
                             reinterpret_cast<cudaStream_t>(stream)),
             "vkern top-k CUDA kernel");
}
#endif

int cuda_device_count() {
#ifdef VKERN_WITH_CUDA
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no device" error
    return 0;
  }
  return n;
#else
  return 0;
#endif
}

py::dict build_info() {
  py::dict d;
  d["version"] = VKERN_VERSION;
#if defined(__clang__)
  d["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  d["compiler"] = std::string("gcc ") + __VERSION__;
#else
  d["compiler"] = "unknown";
#endif
#ifdef VKERN_WITH_CUDA
  d["cuda"] = true;
  d["cuda_archs"] = VKERN_CUDA_ARCHS;
  int runtime = 0;
  cudaRuntimeGetVersion(&runtime);
  d["cuda_runtime"] = runtime;
#else
  d["cuda"] = false;
  d["cuda_archs"] = "";
#endif
  d["simd_compiled"] = std::vector<std::string>{"generic", "avx2", "avx512", "avx512shape"};
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "vkern compiled kernels (CPU, and CUDA when built with it)";
  m.def("build_info", &build_info);
  m.def("simd_supported", &cpu::simd_supported_names, "SIMD levels this CPU can run");
  m.def("simd_level", [] { return std::string(cpu::simd_name(cpu::simd_active())); });
  m.def("set_simd_level", &cpu::simd_force, py::arg("name"));
  m.def("num_threads", &cpu::num_threads);
  m.def("set_num_threads", [](int n) {
    require(n >= 1, "set_num_threads: n must be >= 1, got " + std::to_string(n));
    cpu::set_num_threads(n);
  });
  m.def("cuda_device_count", &cuda_device_count);
  m.def("maxsim_cpu", &maxsim_cpu);
#ifdef VKERN_WITH_CUDA
  m.def("maxsim_cuda", &maxsim_cuda);
  m.def("topk_cuda", &topk_cuda);
#endif
}
