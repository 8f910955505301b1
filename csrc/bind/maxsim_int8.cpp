// int8-document MaxSim bindings.
#include "bind/common.h"
#include "cpu/threadpool.h"
#include "cpu/maxsim.h"
#ifdef VKERN_WITH_CUDA
#include "cuda/maxsim_int8.h"
#endif

using namespace vkern;
using namespace vkern::bind;

namespace {

void maxsim_int8_cpu(uintptr_t q_codes, uintptr_t q_scales, int64_t B, int64_t Lq, int64_t D, uintptr_t q_lengths,
                     uintptr_t docs, int64_t d_row_stride, uintptr_t doc_scales, uintptr_t doc_starts,
                     uintptr_t doc_lens, int64_t N, uintptr_t scores, int64_t topk, uintptr_t topk_scores,
                     uintptr_t topk_idx) {
  require(B >= 0 && Lq >= 0 && D >= 1 && N >= 0, "maxsim_int8: sizes must be non-negative and D >= 1");
  // |sum of D products of (63 + 64) * 128| must fit int32 exactly.
  require(D <= 131072, "maxsim_int8: D must be <= 131072");
  require(d_row_stride >= D, "maxsim_int8: row stride must be >= D");
  require(q_codes != 0 || B * Lq == 0, "maxsim_int8: null queries");
  require(N == 0 || (doc_starts != 0 && doc_lens != 0 && doc_scales != 0), "maxsim_int8: null document arrays");
  require(scores != 0 || topk > 0, "maxsim_int8: no output");
  require(topk == 0 || (topk_scores != 0 && topk_idx != 0), "maxsim_int8: null top-k output");
  cpu::MaxsimI8Call call{ptr<const int8_t>(q_codes), ptr<const float>(q_scales), B, Lq, D,
                         ptr<const int64_t>(q_lengths), ptr<const int8_t>(docs), d_row_stride,
                         ptr<const float>(doc_scales), ptr<const int64_t>(doc_starts),
                         ptr<const int64_t>(doc_lens), N, ptr<float>(scores), topk, ptr<float>(topk_scores),
                         ptr<int64_t>(topk_idx)};
  py::gil_scoped_release release;
  cpu::CallScope scope;  // pins the thread count and a pool for this call
  cpu::maxsim_int8(call);
}

#ifdef VKERN_WITH_CUDA
void maxsim_int8_cuda(uintptr_t q_codes, uintptr_t q_scales, int64_t B, int64_t Lq, int64_t D, uintptr_t q_lengths,
                      uintptr_t docs, int64_t d_row_stride, uintptr_t doc_scales, uintptr_t doc_offsets, int64_t N,
                      uintptr_t scores, uintptr_t stream) {
  require(B >= 0 && Lq >= 0 && D >= 1 && N >= 0, "maxsim_int8: sizes must be non-negative and D >= 1");
  require(D <= 131072, "maxsim_int8: D must be <= 131072");
  require(d_row_stride >= D, "maxsim_int8: row stride must be >= D");
  require(B * N == 0 || (scores != 0 && doc_offsets != 0 && q_lengths != 0), "maxsim_int8: null arrays");
  py::gil_scoped_release release;
  cuda_check(cuda::maxsim_int8_scores(ptr<const int8_t>(q_codes), ptr<const float>(q_scales), B, Lq, D,
                                      ptr<const int32_t>(q_lengths), ptr<const int8_t>(docs), d_row_stride,
                                      ptr<const float>(doc_scales), ptr<const int64_t>(doc_offsets), N,
                                      ptr<float>(scores), stream_of(stream)),
             "vkern maxsim_int8 CUDA kernel");
}
#endif

}  // namespace

VKERN_BIND(maxsim_int8) {
#ifdef VKERN_WITH_CUDA
  m.def("maxsim_int8_cuda", &maxsim_int8_cuda);
#endif
  m.def("maxsim_int8_cpu", &maxsim_int8_cpu);
  m.def("maxsim_int8_kernel", [] { return std::string(cpu::maxsim_int8_kernel_name()); });
  m.def("maxsim_int8_allow_vnni", &cpu::maxsim_int8_allow_vnni, py::arg("allow"));
}
