// MaxSim bindings (SPEC section 1).
#include "bind/common.h"
#include "cpu/maxsim.h"
#ifdef VKERN_WITH_CUDA
#include "cuda/maxsim.h"
#endif

using namespace vkern;
using namespace vkern::bind;

namespace {

void maxsim_cpu(uintptr_t q, int q_dtype, int64_t B, int64_t Lq, int64_t D, int64_t q_sb, int64_t q_si,
                int64_t q_sd, uintptr_t q_lengths, uintptr_t docs, int d_dtype, int64_t d_row_stride,
                uintptr_t doc_starts, uintptr_t doc_lens, int64_t N, uintptr_t scores, int64_t topk,
                uintptr_t topk_scores, uintptr_t topk_idx, uintptr_t argmax, uintptr_t doc_mask,
                uintptr_t mask_starts) {
  check_dtype(q_dtype, "queries");
  check_dtype(d_dtype, "docs");
  require(B >= 0 && Lq >= 0 && D >= 1 && N >= 0, "maxsim: sizes must be non-negative and D >= 1");
  require(q != 0 || B * Lq == 0, "maxsim: null queries");
  require(N == 0 || (doc_starts != 0 && doc_lens != 0), "maxsim: null document offsets");
  // Empty outputs may have a null address (an empty torch tensor's data_ptr() is 0).
  require(scores != 0 || topk > 0 || B * N == 0, "maxsim: no output");
  require(topk == 0 || B == 0 || (topk_scores != 0 && topk_idx != 0), "maxsim: null top-k output");
  require(doc_mask == 0 || N == 0 || mask_starts != 0, "maxsim: null mask offsets");
  if (B == 0) return;  // nothing to write
  cpu::MaxsimCall call{ptr<const void>(q), q_dtype, B, Lq, D, q_sb, q_si, q_sd,
                       ptr<const int64_t>(q_lengths), ptr<const void>(docs), d_dtype, d_row_stride,
                       ptr<const int64_t>(doc_starts), ptr<const int64_t>(doc_lens), N,
                       ptr<float>(scores), topk, ptr<float>(topk_scores), ptr<int64_t>(topk_idx),
                       ptr<int32_t>(argmax), ptr<const uint8_t>(doc_mask), ptr<const int64_t>(mask_starts)};
  py::gil_scoped_release release;
  cpu::CallScope scope;  // pins the thread count and a pool for this call
  cpu::maxsim(call);
}

void maxsim_backward_cpu(uintptr_t q, int q_dtype, int64_t B, int64_t Lq, int64_t D, int64_t q_sb, int64_t q_si,
                         int64_t q_sd, uintptr_t docs, int d_dtype, int64_t d_row_stride, uintptr_t doc_starts,
                         uintptr_t doc_lens, int64_t N, uintptr_t argmax, uintptr_t grad, uintptr_t grad_q,
                         uintptr_t grad_d, uintptr_t grad_d_starts, int grad_d_dtype) {
  check_dtype(q_dtype, "queries");
  check_dtype(d_dtype, "docs");
  check_dtype(grad_d_dtype, "grad_d");
  require(B >= 0 && Lq >= 0 && D >= 1 && N >= 0, "maxsim backward: sizes must be non-negative and D >= 1");
  require(B * N * Lq == 0 || (argmax != 0 && grad != 0), "maxsim backward: null argmax or grad");
  require(N == 0 || (doc_starts != 0 && doc_lens != 0), "maxsim backward: null document offsets");
  require(grad_d == 0 || N == 0 || grad_d_starts != 0, "maxsim backward: null grad_d offsets");
  require(grad_q == 0 || q != 0 || B * Lq == 0, "maxsim backward: null queries");
  cpu::MaxsimBackwardCall call{ptr<const void>(q), q_dtype, B, Lq, D, q_sb, q_si, q_sd,
                               ptr<const void>(docs), d_dtype, d_row_stride, ptr<const int64_t>(doc_starts),
                               ptr<const int64_t>(doc_lens), N, ptr<const int32_t>(argmax),
                               ptr<const float>(grad), ptr<float>(grad_q), ptr<void>(grad_d),
                               ptr<const int64_t>(grad_d_starts), grad_d_dtype};
  py::gil_scoped_release release;
  cpu::CallScope scope;  // one thread count and pool for both passes
  cpu::maxsim_backward(call);
}

#ifdef VKERN_WITH_CUDA
void maxsim_cuda(uintptr_t q, uintptr_t docs, int dtype, int64_t B, int64_t Lq, int64_t D,
                 uintptr_t q_lengths, uintptr_t doc_offsets, int64_t N, uintptr_t scores, uintptr_t stream) {
  check_dtype(dtype, "docs");
  require(B >= 0 && Lq >= 0 && D >= 1 && N >= 0, "maxsim: sizes must be non-negative and D >= 1");
  require(scores != 0 || B * N == 0, "maxsim: null scores");
  py::gil_scoped_release release;
  cpu::CallScope scope;  // pins the thread count and a pool for this call
  cuda_check(cuda::maxsim_scores(ptr<const void>(q), ptr<const void>(docs), static_cast<cuda::DType>(dtype), B,
                                 Lq, D, ptr<const int32_t>(q_lengths), ptr<const int64_t>(doc_offsets), N,
                                 ptr<float>(scores), stream_of(stream)),
             "vkern maxsim CUDA kernel");
}

void topk_cuda(uintptr_t scores, int64_t B, int64_t N, int64_t k, uintptr_t out_scores, uintptr_t out_idx,
               uintptr_t stream) {
  require(k >= 1 && k <= N, "topk: need 1 <= k <= N");
  py::gil_scoped_release release;
  cpu::CallScope scope;  // pins the thread count and a pool for this call
  cuda_check(cuda::topk_rows(ptr<const float>(scores), B, N, k, ptr<float>(out_scores), ptr<int64_t>(out_idx),
                             stream_of(stream)),
             "vkern top-k CUDA kernel");
}
#endif

}  // namespace

VKERN_BIND(maxsim) {
  m.def("maxsim_cpu", &maxsim_cpu);
  m.def("maxsim_backward_cpu", &maxsim_backward_cpu);
#ifdef VKERN_WITH_CUDA
  m.def("maxsim_cuda", &maxsim_cuda);
  m.def("topk_cuda", &topk_cuda);
#endif
}
