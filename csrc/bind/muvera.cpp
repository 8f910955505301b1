// MUVERA encoder bindings.
#include "bind/common.h"
#include "cpu/threadpool.h"
#include "cpu/muvera.h"

using namespace vkern;
using namespace vkern::bind;

namespace {

void muvera_encode_cpu(uintptr_t x, int64_t D, uintptr_t offsets, int64_t N, int64_t R, int64_t k, int64_t d_proj,
                       uintptr_t simhash, uintptr_t ams_index, uintptr_t ams_sign, int average, int fill_empty,
                       int64_t raw_dim, uintptr_t final_index, uintptr_t final_sign, int64_t out_dim, uintptr_t out) {
  require(D >= 1 && N >= 0 && R >= 1 && k >= 0 && k <= 16 && d_proj >= 1, "muvera_encode: bad sizes");
  require(raw_dim == R * (int64_t(1) << k) * d_proj, "muvera_encode: raw_dim must be R * 2^k * d_proj");
  require(ams_index != 0 || d_proj == D, "muvera_encode: identity projection needs d_proj == D");
  require(final_index != 0 || out_dim == raw_dim, "muvera_encode: out_dim must equal raw_dim without a final sketch");
  require(N == 0 || (offsets != 0 && simhash != 0 && out != 0), "muvera_encode: null arrays");
  cpu::MuveraCall call{ptr<const float>(x), D, ptr<const int64_t>(offsets), N, R, k, d_proj, ptr<const float>(simhash),
                       ptr<const int64_t>(ams_index), ptr<const float>(ams_sign), average != 0, fill_empty != 0,
                       raw_dim, ptr<const int64_t>(final_index), ptr<const float>(final_sign), out_dim,
                       ptr<float>(out)};
  py::gil_scoped_release release;
  cpu::CallScope scope;  // pins the thread count and a pool for this call
  cpu::muvera_encode(call);
}

}  // namespace

VKERN_BIND(muvera) { m.def("muvera_encode_cpu", &muvera_encode_cpu); }
