#include "cpu/dispatch.h"

#include <atomic>
#include <cstdlib>
#include <stdexcept>

namespace vkern {
namespace cpu {
namespace {

bool cpu_has(SimdLevel level) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  switch (level) {
    case SimdLevel::generic:
      return true;
    case SimdLevel::avx2:
    case SimdLevel::avx512shape:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
             __builtin_cpu_supports("f16c");
    case SimdLevel::avx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("f16c");
  }
  return false;
#else
  return level == SimdLevel::generic;
#endif
}

SimdLevel parse(const std::string& name) {
  if (name == "generic" || name == "scalar") return SimdLevel::generic;
  if (name == "avx2") return SimdLevel::avx2;
  if (name == "avx512") return SimdLevel::avx512;
  if (name == "avx512shape") return SimdLevel::avx512shape;
  throw std::invalid_argument("unknown SIMD level '" + name +
                              "' (expected auto, generic, avx2, avx512 or avx512shape)");
}

SimdLevel initial_level() {
  const char* env = std::getenv("VKERN_SIMD");
  if (env && *env && std::string(env) != "auto") {
    try {
      const SimdLevel level = parse(env);
      if (simd_supported(level)) return level;
    } catch (const std::invalid_argument&) {
    }
    // An impossible request falls back to the best level; `vkern info` shows it.
  }
  return simd_best();
}

std::atomic<int>& active_slot() {
  static std::atomic<int> slot{static_cast<int>(initial_level())};
  return slot;
}

}  // namespace

const char* simd_name(SimdLevel level) {
  switch (level) {
    case SimdLevel::generic: return "generic";
    case SimdLevel::avx2: return "avx2";
    case SimdLevel::avx512: return "avx512";
    case SimdLevel::avx512shape: return "avx512shape";
  }
  return "?";
}

bool simd_supported(SimdLevel level) { return cpu_has(level); }

SimdLevel simd_best() {
  if (cpu_has(SimdLevel::avx512)) return SimdLevel::avx512;
  if (cpu_has(SimdLevel::avx2)) return SimdLevel::avx2;
  return SimdLevel::generic;
}

SimdLevel simd_active() { return static_cast<SimdLevel>(active_slot().load()); }

void simd_force(const std::string& name) {
  if (name.empty() || name == "auto") {
    active_slot().store(static_cast<int>(simd_best()));
    return;
  }
  const SimdLevel level = parse(name);
  if (!simd_supported(level))
    throw std::invalid_argument(std::string("this CPU cannot run SIMD level '") + name + "'");
  active_slot().store(static_cast<int>(level));
}

std::vector<std::string> simd_supported_names() {
  std::vector<std::string> out;
  for (SimdLevel l : {SimdLevel::generic, SimdLevel::avx2, SimdLevel::avx512, SimdLevel::avx512shape})
    if (cpu_has(l)) out.emplace_back(simd_name(l));
  return out;
}

}  // namespace cpu
}  // namespace vkern
