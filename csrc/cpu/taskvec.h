// Quantized task vectors on the CPU (SPEC section 4): the drivers (taskvec.cpp)
// and the per-SIMD-level kernels (simd/taskvec_*.cpp). Nothing here knows about Python.
//
// A task vector reaches the kernels as one or two components (an RTVQ residual
// is its shared base plus its own offset). Codes of row n are a little-endian
// bit stream of row_bytes bytes: element k in bits [k*bits, (k+1)*bits).
#pragma once
#include <cstdint>

namespace vkern {
namespace cpu {

struct TvComp {
  int scheme;                // 0 = affine: (code - zero) * scale; 1 = sign: code ? +scale : -scale
  int bits;                  // 1 (sign), 2, 3, 4, 8 (affine)
  const uint8_t* codes;      // [N, row_bytes]
  int64_t row_bytes;         // ceil(K * bits / 8)
  const float* scales;       // [S, n_groups], S = N if per_row else 1
  const uint8_t* zeros;      // like scales (affine), nullptr (sign)
  int per_row;
  int64_t n_groups;          // ceil(K / group_size)
  int64_t group_size;        // elements per group along K (>= 1)
  int64_t task;              // task this component belongs to
  float coef;                // coefficient used when summing components directly
};

// What one SIMD level offers (each level is its own translation unit).
struct TaskvecLevel {
  const char* name;
  // out[0:len] = dequantized values of row n, columns [k0, k0+len) (exact float32:
  // (code - zero) * scale, or +-scale). k0 is a multiple of 8.
  void (*decode)(const TvComp& c, int64_t n, int64_t k0, int64_t len, float* out);
  // dst[0:len] = src[0:len] + coef * dequantized values (src may be dst); stream 1:
  // dst is a final output, written with streaming stores (call store_fence after);
  // stream 2: each value exact before the add (no folded zero point), so that with coef 1
  // the sum is rounded once, as the reference adds a residual's base and offset.
  void (*decode_axpy)(const TvComp& c, int64_t n, int64_t k0, int64_t len, float coef, const float* src,
                      float* dst, int stream);
  // dst[0:len] = src[0:len] + sum_c comps[c].coef * dequant_c (C <= 8 components, all
  // affine 4-bit with one group_size that is a multiple of 32; k0 a multiple of 32).
  // Sums need not be exact (zero points folded per group). stream: as decode_axpy.
  void (*apply_q4)(const TvComp* comps, int64_t C, int64_t n, int64_t k0, int64_t len, const float* src,
                   float* dst, int stream);
  void (*store_fence)();
  void (*load_row)(const void* src, int dtype, int64_t len, float* out);     // widen to float32
  void (*store_row)(const float* src, void* dst, int dtype, int64_t len);    // round to nearest even
  // sums[i] += dot(buf[0:len], x[rows[i] * x_stride + k0 : +len]) for i < nrows
  void (*dot_rows)(const float* buf, const float* x, int64_t x_stride, const int64_t* rows, int64_t nrows,
                   int64_t k0, int64_t len, float* sums);
  // Sign components (BitDelta identity): acc[i] += sum over the chunk's segments of
  // 2 * scale * (sum of x[rows[i], k] with sign bit 1); the caller subtracts scale * sum(x) per group.
  void (*sign_dot_rows)(const TvComp& c, int64_t n, const float* x, int64_t x_stride, const int64_t* rows,
                        int64_t nrows, int64_t k0, int64_t len, float* acc);
  // Rows 0..nrows-1 of x at once (nrows small): dots[i] += x_i . b[0:len] and, where
  // code_rows[i] (sign bit stream of row n) is not null, signs[i] += sum of x_i[k] with bit k set.
  void (*dot_sign_rows)(const float* b, const float* x, int64_t x_stride, const uint8_t* const* code_rows,
                        int64_t nrows, int64_t k0, int64_t len, float* dots, float* signs);
  // TIES on one chunk: vals[t][i] (trimmed task values), coef[t]; acc[i] += merged value.
  void (*ties)(const float* const* vals, const float* coef, int64_t T, int64_t len, float* acc);
  // TIES trim of one chunk: zero v[i] unless |v| > thr or (|v| == thr and flat0 + i <= cut).
  void (*trim)(float* v, int64_t len, float thr, int64_t cut, int64_t flat0);
  // sums[i] += x[rows[i], k0:k0+len] . dequant(c)[n, k0:k0+len], c affine 4-bit with
  // group_size % 32 == 0, k0 % 32 == 0: straight from the codes (no decoded buffer).
  void (*q4_dot_rows)(const TvComp& c, int64_t n, const float* x, int64_t x_stride, const int64_t* rows,
                      int64_t nrows, int64_t k0, int64_t len, float* sums);
  // x . dequant(c)[n, 0:K] for one row x and one affine 4-bit component c (group_size % 32 == 0),
  // straight from the codes: xs is x with each block of 16 columns deinterleaved (the 8 even
  // columns, then the 8 odd ones: the order of the low and high nibbles of 8 code bytes) for the
  // first K / 16 * 16 columns; gsum[g] the sum of x over group g. Per group
  // s * (x . q - z * gsum): the zero point folded, as q4_dot_rows.
  float (*q4_dot_split)(const TvComp& c, int64_t n, const float* xs, const float* x, const float* gsum,
                        int64_t K);
  // Decode step, M <= 8 rows of x [M, K] (contiguous), one pass over output row n for all of
  // them: out[m] = x_m . b[0:K] + coef_m * (x_m . dequant(tasks[m])[n, 0:K]), b the base row
  // (float32). tasks[m] is row m's component (null: the base alone); q4[m] != 0 when it is one
  // affine 4-bit component with group_size % 32 == 0, read straight from the nibbles with
  // xs[m] (x_m deinterleaved per block of kFusedBlock columns: the even columns, then the odd
  // ones) and gsum[m] (x_m's sum per group); otherwise vals[m] holds row n of the task's
  // exact dequantized values (K floats, filled by the caller). Each base element is loaded
  // once for all rows, each code byte once.
  void (*fused_rows)(const float* b, const float* x, int64_t K, int64_t M, int64_t n, const TvComp* const* tasks,
                     const int* q4, const float* coef, const float* const* xs, const float* const* gsum,
                     const float* const* vals, float* out);
  int fused_block;  // the xs deinterleave block of fused_rows at this level (2 x its vector width)
};

const TaskvecLevel& taskvec_level_generic();
const TaskvecLevel& taskvec_level_avx2();
const TaskvecLevel& taskvec_level_avx512();
const TaskvecLevel& taskvec_level_avx512shape();

struct TvApplyCall {
  const void* base;          // [N, K], rows base_stride elements apart, unit element stride
  int dtype;                 // 0 f32, 1 f16, 2 bf16 (base and out)
  int64_t N, K, base_stride;
  void* out;                 // [N, K] (may be base itself)
  int64_t out_stride;
  const TvComp* comps;       // C components
  int64_t C, T;
  int method;                // 0 sum, 1 ties
  const float* task_coef;    // [T]
  const float* thr;          // [T] trim thresholds, or nullptr (no trim)
  const int64_t* cut;        // [T]
  int keep_out = 0;          // 1: out is read again right away (a GEMM's weight): plain stores, no streaming
};
void taskvec_apply(const TvApplyCall& call);

struct TvDeltaCall {
  const float* x;            // [M, K] float32, contiguous
  int64_t M, K;
  const void* base;          // [N, K]
  int dtype;
  int64_t N, base_stride;
  const TvComp* comps;
  int64_t C, T;
  int merged;                // 1: every row gets every component (with its coef)
  const int64_t* row_order;  // task mode: rows sorted by task id
  const int64_t* group_start;  // task mode: [T + 2]; rows of task t (-1..T-1) are
                               // row_order[group_start[t + 1] : group_start[t + 2]]
  float* y;                  // [M, N] float32
  int base_done;             // 1: y already holds x @ base^T (from a BLAS); add the deltas only
};
void taskvec_delta_linear(const TvDeltaCall& call);

// out [N, K] float32 = sum of the components' dequantized values (coef ignored: 1).
void taskvec_dequantize(const TvComp* comps, int64_t C, int64_t N, int64_t K, float* out);

}  // namespace cpu
}  // namespace vkern
