// Token pooling bindings.
#include "bind/common.h"
#include "cpu/threadpool.h"
#include "cpu/pool.h"

using namespace vkern;
using namespace vkern::bind;

namespace {

// False if a document holds a NaN or an inf (then nothing in out is meaningful).
bool pool_tokens_cpu(uintptr_t x, int64_t D, int64_t row_stride, uintptr_t doc_starts, uintptr_t doc_lens, int64_t N,
                     int64_t pool_factor, int64_t protected_tokens, int method, uint64_t seed, uintptr_t out_starts,
                     uintptr_t out, uintptr_t out_lens) {
  require(D >= 1 && N >= 0 && row_stride >= D, "pool_tokens: bad sizes");
  require(pool_factor >= 1 && protected_tokens >= 0, "pool_tokens: pool_factor >= 1, protected_tokens >= 0");
  require(method == cpu::kWard || method == cpu::kKmeans, "pool_tokens: method code must be 0 (ward) or 1 (kmeans)");
  require(N == 0 || (doc_starts && doc_lens && out_starts && out_lens), "pool_tokens: null arrays");
  cpu::PoolCall call{ptr<const float>(x), D, row_stride, ptr<const int64_t>(doc_starts), ptr<const int64_t>(doc_lens),
                     N, pool_factor, protected_tokens, method, seed, ptr<const int64_t>(out_starts), ptr<float>(out),
                     ptr<int64_t>(out_lens)};
  py::gil_scoped_release release;
  cpu::CallScope scope;  // pins the thread count and a pool for this call
  return cpu::pool_tokens(call);
}

void segment_mean_cpu(uintptr_t x, int64_t T, int64_t D, int64_t row_stride, uintptr_t ids, int64_t S,
                      uintptr_t out) {
  require(T >= 0 && D >= 1 && S >= 0 && row_stride >= D, "segment_mean: bad sizes");
  py::gil_scoped_release release;
  cpu::CallScope scope;  // pins the thread count and a pool for this call
  cpu::segment_mean(ptr<const float>(x), T, D, row_stride, ptr<const int64_t>(ids), S, ptr<float>(out));
}

}  // namespace

VKERN_BIND(pool) {
  m.def("pool_tokens_cpu", &pool_tokens_cpu);
  m.def("segment_mean_cpu", &segment_mean_cpu);
}
