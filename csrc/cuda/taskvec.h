// Quantized task-vector CUDA kernels (SPEC section 4): raw device pointers,
// sizes and a stream; nothing here knows about Python or torch.
//
// A task vector is one or two components (an RTVQ residual: shared base, then
// its offset), listed in task order. Codes of row n are a little-endian bit
// stream of row_bytes bytes: element k in bits [k*bits, (k+1)*bits).
#pragma once
#include <cstdint>
#include <cuda_runtime_api.h>

namespace vkern {
namespace cuda {

constexpr int kMaxComps = 32;  // components per call (passed by value as kernel parameters)

struct TvCompDev {
  const uint8_t* codes;     // [N, row_bytes] (device)
  const float* scales;      // [S, n_groups] (device), S = N if per_row else 1
  const uint8_t* zeros;     // like scales (affine) or nullptr (sign)
  int64_t row_bytes, n_groups, group_size, task;
  float coef;               // coefficient when components are summed directly
  int scheme;               // 0 affine: (code - zero) * scale; 1 sign: code ? +scale : -scale
  int bits;
  int per_row;
};

// out = base + merge (0 sum: sum of comps' coef * value; 1 ties, per element, with
// task_coef) in float32, stored in dtype (0 f32, 1 f16, 2 bf16); base/out contiguous
// [N, K] (device), out may equal base. thr/cut (host arrays of T, or nullptr): TIES trim.
// comps / task_coef / thr / cut are host arrays; they travel as kernel parameters.
cudaError_t taskvec_apply(const void* base, int dtype, int64_t N, int64_t K, void* out, const TvCompDev* comps,
                          int64_t C, int64_t T, int method, const float* task_coef, const float* thr,
                          const int64_t* cut, cudaStream_t stream);

// y [M, N] float32 = x [M, K] float32 @ (base [N, K] + delta)^T. task_ids (device int64 [M])
// nullptr: every component with its coef; else row m adds the components of task
// task_ids[m] (coef of those components), -1 = none.
cudaError_t taskvec_delta_linear(const float* x, int64_t M, int64_t K, const void* base, int dtype, int64_t N,
                                 const TvCompDev* comps, int64_t C, const int64_t* task_ids, float* y,
                                 cudaStream_t stream);

// out [N, K] float32 = sum of the components' values (coef ignored).
cudaError_t taskvec_dequantize(const TvCompDev* comps, int64_t C, int64_t N, int64_t K, float* out,
                               cudaStream_t stream);

}  // namespace cuda
}  // namespace vkern
