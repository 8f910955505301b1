// MUVERA fixed-dimensional encodings, CUDA (definition: python/vkern/reference/muvera.py; the same
// order of operations as csrc/cpu/muvera.cpp): raw device pointers, sizes and a stream.
#pragma once
#include <cstdint>
#include <cuda_runtime_api.h>

namespace vkern {
namespace cuda {

struct MuveraDevCall {
  const float* x;              // float32 [T, D] contiguous (device)
  int64_t D, T;
  const int64_t* offsets;      // int64 [N+1] (device), validated by the caller
  int64_t N, R, k, d_proj;     // k <= 16
  const float* simhash_t;      // float32 [D][R * k] (device): column r * k + j is projection j of repetition r
  const int64_t* ams_index;    // int64 [R][D] (device), or nullptr: identity (d_proj == D)
  const float* ams_sign;       // float32 [R][D] (device)
  bool average, fill_empty;
  int64_t raw_dim;             // R * 2^k * d_proj
  const int64_t* final_order;  // int64 [raw_dim] (device): inputs sorted by (output, input), or nullptr
  const int64_t* final_starts; // int64 [out_dim + 1] (device): output j sums final_order[starts[j]:starts[j+1]]
  const float* final_sign;     // float32 [raw_dim] (device)
  int64_t out_dim;             // raw_dim, or the final count-sketch size
  int32_t* bits;               // scratch int32 [T, R] (device)
  float* proj;                 // scratch float32 [T, R, d_proj] (device), with ams_index
  double* raw;                 // scratch float64 [N, raw_dim] (device), with final_order
  float* out;                  // float32 [N, out_dim] output (device)
};

// The FDEs of N point clouds: per token and repetition the k SimHash signs (float64 dots summed
// over D in order) and the AMS projection (float32, each output summed over the inputs in order);
// per (cloud, repetition, block element) the projected tokens of its partition summed in float64
// in token order, averaged, empty partitions filled from the Hamming-nearest token; then the
// optional count sketch (float64, inputs in index order). No atomics. Asynchronous on `stream`;
// cudaErrorInvalidValue for bad sizes / null pointers, else the launch error.
cudaError_t muvera_encode(const MuveraDevCall& call, cudaStream_t stream);

}  // namespace cuda
}  // namespace vkern
