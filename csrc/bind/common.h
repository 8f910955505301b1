// Shared by the binding files (csrc/bind/*.cpp), the only files that see
// Python. Every kernel entry takes raw addresses (ints) plus sizes and strides
// from the Python wrappers, which own the arrays and keep them alive; the
// binding checks what the kernel will trust and releases the GIL around it.
//
// Each op's binding file registers itself with VKERN_BIND(name) { ... }, so
// adding an op touches no shared file.
#pragma once
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "cpu/threadpool.h"

#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#ifdef VKERN_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace vkern::bind {

namespace py = pybind11;

template <typename T>
inline T* ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

inline void require(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument(what);
}

// dtype codes shared with the Python side (vkern._arrays): 0 f32, 1 f16, 2 bf16.
inline void check_dtype(int dtype, const char* name) {
  require(dtype == 0 || dtype == 1 || dtype == 2,
          std::string(name) + ": dtype code must be 0 (float32), 1 (float16) or 2 (bfloat16)");
}

#ifdef VKERN_WITH_CUDA
inline void cuda_check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}
inline cudaStream_t stream_of(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }
#endif

using Binder = void (*)(py::module_&);

inline std::vector<std::pair<const char*, Binder>>& registry() {
  static std::vector<std::pair<const char*, Binder>> r;
  return r;
}

struct Register {
  Register(const char* name, Binder fn) { registry().emplace_back(name, fn); }
};

}  // namespace vkern::bind

#define VKERN_BIND_CAT2(a, b) a##b
#define VKERN_BIND_CAT(a, b) VKERN_BIND_CAT2(a, b)
// VKERN_BIND(maxsim) { m.def(...); }  -- defines and registers a binder.
#define VKERN_BIND(name)                                                                        \
  static void VKERN_BIND_CAT(vkern_bind_, name)(::pybind11::module_ & m);                       \
  static ::vkern::bind::Register VKERN_BIND_CAT(vkern_bind_reg_, name)(#name,                   \
                                                                       &VKERN_BIND_CAT(vkern_bind_, name)); \
  static void VKERN_BIND_CAT(vkern_bind_, name)(::pybind11::module_ & m)
