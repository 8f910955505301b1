// MUVERA encoder bindings.
#include "bind/common.h"
#include "cpu/threadpool.h"
#include "cpu/muvera.h"
#ifdef VKERN_WITH_CUDA
#include "cuda/muvera.h"
#endif

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

#ifdef VKERN_WITH_CUDA
void muvera_encode_cuda(uintptr_t x, int64_t D, int64_t T, uintptr_t offsets, int64_t N, int64_t R, int64_t k,
                        int64_t d_proj, uintptr_t simhash, uintptr_t ams_index, uintptr_t ams_sign, int average,
                        int fill_empty, int64_t raw_dim, uintptr_t final_order, uintptr_t final_starts,
                        uintptr_t final_sign, int64_t final_max_len, int64_t out_dim, uintptr_t bits, uintptr_t proj,
                        uintptr_t raw, uintptr_t out, uintptr_t stream) {
  require(D >= 1 && T >= 0 && N >= 0 && R >= 1 && k >= 0 && k <= 16 && d_proj >= 1, "muvera_encode: bad sizes");
  require(raw_dim == R * (int64_t(1) << k) * d_proj, "muvera_encode: raw_dim must be R * 2^k * d_proj");
  require(ams_index != 0 || d_proj == D, "muvera_encode: identity projection needs d_proj == D");
  require(final_order != 0 || out_dim == raw_dim, "muvera_encode: out_dim must equal raw_dim without a final sketch");
  require((final_order != 0) == (raw != 0), "muvera_encode: a final sketch needs the float64 scratch, and only it");
  require(N == 0 || (offsets != 0 && simhash != 0 && bits != 0 && out != 0), "muvera_encode: null arrays");
  require(ams_index == 0 || (ams_sign != 0 && proj != 0), "muvera_encode: null AMS arrays");
  (void)final_max_len;  // the Triton kernel's loop bound; this kernel walks each output's list itself
  cuda::MuveraDevCall call{ptr<const float>(x), D, T, ptr<const int64_t>(offsets), N, R, k, d_proj,
                           ptr<const float>(simhash), ptr<const int64_t>(ams_index), ptr<const float>(ams_sign),
                           average != 0, fill_empty != 0, raw_dim, ptr<const int64_t>(final_order),
                           ptr<const int64_t>(final_starts), ptr<const float>(final_sign), out_dim,
                           ptr<int32_t>(bits), ptr<float>(proj), ptr<double>(raw), ptr<float>(out)};
  py::gil_scoped_release release;
  cuda_check(cuda::muvera_encode(call, stream_of(stream)), "vkern muvera_encode CUDA kernel");
}
#endif

}  // namespace

VKERN_BIND(muvera) {
  m.def("muvera_encode_cpu", &muvera_encode_cpu);
#ifdef VKERN_WITH_CUDA
  m.def("muvera_encode_cuda", &muvera_encode_cuda);
#endif
}
