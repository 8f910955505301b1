// Differentiable MaxSim, CUDA bindings (the forward with argmax and the backward; the cpu ones
// are in bind/maxsim.cpp beside the cpu forward they share a kernel with).
#include "bind/common.h"
#ifdef VKERN_WITH_CUDA
#include "cuda/maxsim_grad.h"
#endif

using namespace vkern;
using namespace vkern::bind;

#ifdef VKERN_WITH_CUDA
namespace {

void maxsim_argmax_cuda(uintptr_t q, uintptr_t docs, int dtype, int64_t B, int64_t Lq, int64_t D,
                        uintptr_t q_lengths, uintptr_t doc_starts, uintptr_t doc_lens, uintptr_t doc_mask, int64_t N,
                        uintptr_t scores, uintptr_t argmax, uintptr_t stream) {
  check_dtype(dtype, "docs");
  require(B >= 0 && Lq >= 0 && D >= 1 && N >= 0, "maxsim argmax: sizes must be non-negative and D >= 1");
  require((scores != 0 && doc_starts != 0 && doc_lens != 0) || B * N == 0, "maxsim argmax: null scores or extents");
  py::gil_scoped_release release;
  cuda_check(cuda::maxsim_argmax(ptr<const void>(q), ptr<const void>(docs), static_cast<cuda::DType>(dtype), B, Lq,
                                 D, ptr<const int32_t>(q_lengths), ptr<const int64_t>(doc_starts),
                                 ptr<const int64_t>(doc_lens), ptr<const uint8_t>(doc_mask), N, ptr<float>(scores),
                                 ptr<int32_t>(argmax), stream_of(stream)),
             "vkern maxsim argmax CUDA kernel");
}

void maxsim_backward_cuda(uintptr_t grad, uintptr_t argmax, uintptr_t q, int q_dtype, uintptr_t docs, int d_dtype,
                          int64_t B, int64_t Lq, int64_t D, uintptr_t doc_starts, int64_t N, uintptr_t grad_q,
                          uintptr_t grad_d, uintptr_t stream) {
  check_dtype(q_dtype, "queries");
  check_dtype(d_dtype, "docs");
  require(B >= 0 && Lq >= 0 && D >= 1 && N >= 0, "maxsim backward: sizes must be non-negative and D >= 1");
  require(B * N * Lq == 0 || (argmax != 0 && grad != 0 && doc_starts != 0), "maxsim backward: null argmax or grad");
  py::gil_scoped_release release;
  cuda_check(cuda::maxsim_backward(ptr<const float>(grad), ptr<const int32_t>(argmax), ptr<const void>(q),
                                   static_cast<cuda::DType>(q_dtype), ptr<const void>(docs),
                                   static_cast<cuda::DType>(d_dtype), B, Lq, D, ptr<const int64_t>(doc_starts), N,
                                   ptr<float>(grad_q), ptr<float>(grad_d), stream_of(stream)),
             "vkern maxsim backward CUDA kernel");
}

}  // namespace
#endif

VKERN_BIND(maxsim_grad) {
#ifdef VKERN_WITH_CUDA
  m.def("maxsim_argmax_cuda", &maxsim_argmax_cuda);
  m.def("maxsim_backward_cuda", &maxsim_backward_cuda);
#else
  (void)m;
#endif
}
