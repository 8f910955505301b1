// Run-time choice of the SIMD level. VKERN_SIMD (generic|avx2|avx512) forces a
// level, so the tests can run every path the CPU supports on one machine.
#pragma once
#include <string>
#include <vector>

namespace vkern {
namespace cpu {

enum class SimdLevel : int { generic = 0, avx2 = 1, avx512 = 2 };

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
