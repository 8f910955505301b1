// The extension module: build information and the CPU runtime's settings.
// Each op's Python-facing entries live in csrc/bind/<op>.cpp and register
// themselves (VKERN_BIND), so adding an op touches no shared file.
#include "bind/common.h"
#include "cpu/dispatch.h"
#include "cpu/threadpool.h"

namespace py = pybind11;
using namespace vkern;
using vkern::bind::require;

namespace {

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
  m.attr("cuda_built") = py::bool_(
#ifdef VKERN_WITH_CUDA
      true
#else
      false
#endif
  );
  py::list ops;
  for (auto& [name, bind] : bind::registry()) {
    bind(m);
    ops.append(name);
  }
  m.attr("ops") = ops;
}
