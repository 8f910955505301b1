// Machine limits for the bench (not an op): the read rate of gathered rows, the
// access pattern of Loki's exact pass and of KV-cache compaction, which a plain
// stream copy does not show. Python times the calls (vkern.bench).
#include <cstring>

#include "bind/common.h"
#include "cpu/threadpool.h"

using namespace vkern;
using namespace vkern::bind;

namespace {

// Reads rows idx[0..n) (row_bytes each, base + idx[i] * row_bytes), split into
// contiguous chunks over the thread pool; each row's lines are requested
// `ahead` rows before use. Returns a checksum so nothing is optimised away.
uint64_t read_rows(uintptr_t base, int64_t row_bytes, uintptr_t idx, int64_t n, int64_t ahead) {
  require(base && idx && row_bytes >= 8 && row_bytes % 8 == 0 && n >= 0 && ahead >= 0, "read_rows: bad arguments");
  const char* b = ptr<const char>(base);
  const int32_t* ix = ptr<const int32_t>(idx);
  py::gil_scoped_release release;
  cpu::CallScope scope;  // pins the thread count and a pool for this call
  const int threads = cpu::num_threads();
  std::vector<uint64_t> sums(static_cast<size_t>(threads) * 8, 0);
  cpu::parallel_for(threads, [&](int64_t t, int) {
    const int64_t i0 = n * t / threads, i1 = n * (t + 1) / threads;
    uint64_t acc[4] = {0, 0, 0, 0};
    for (int64_t i = i0; i < i1; ++i) {
      if (ahead && i + ahead < i1) {
        const char* p = b + static_cast<int64_t>(ix[i + ahead]) * row_bytes;
        for (int64_t o = 0; o < row_bytes; o += 64) __builtin_prefetch(p + o, 0, 3);
      }
      const char* r = b + static_cast<int64_t>(ix[i]) * row_bytes;
      for (int64_t o = 0; o + 32 <= row_bytes; o += 32) {
        uint64_t w[4];
        std::memcpy(w, r + o, 32);
        acc[0] += w[0];
        acc[1] += w[1];
        acc[2] += w[2];
        acc[3] += w[3];
      }
    }
    sums[t * 8] = acc[0] + acc[1] + acc[2] + acc[3];
  });
  uint64_t total = 0;
  for (int t = 0; t < threads; ++t) total += sums[t * 8];
  return total;
}

}  // namespace

VKERN_BIND(membench) { m.def("read_rows", &read_rows); }
