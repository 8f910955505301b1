// Run-time choice of the SIMD level. VKERN_SIMD (generic|avx2|avx512|avx512shape) forces a
// level, so the tests can run every path the CPU supports on one machine.
#pragma once
#include <string>
#include <vector>

namespace vkern {
namespace cpu {

// avx512shape = the AVX-512 blocking compiled for AVX2: selectable for tests
// on machines without AVX-512, never picked automatically.
enum class SimdLevel : int { generic = 0, avx2 = 1, avx512 = 2, avx512shape = 3 };

const char* simd_name(SimdLevel level);
bool simd_supported(SimdLevel level);   // can this CPU run it
SimdLevel simd_best();                  // the best the CPU supports
SimdLevel simd_active();                // best, or the forced level
// Forces a level ("" or "auto" = best). Throws std::invalid_argument for an
// unknown name or a level this CPU cannot run.
void simd_force(const std::string& name);
std::vector<std::string> simd_supported_names();

}  // namespace cpu
}  // namespace vkern
