// MaxSim on the CPU: the driver (maxsim.cpp) and the per-SIMD-level kernels
// (simd/maxsim_*.cpp). Nothing here knows about Python.
#pragma once
#include <cstdint>

namespace vkern {
namespace cpu {

enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

// One document scored against every query of a batch, by one thread.
struct MaxsimDocJob {
  const float* qt;            // packed queries [B][nblk_max][D][qblock], fp32, zero padded
  int64_t B, nblk_max, D;
  const int64_t* q_nblocks;   // [B] register blocks holding valid query tokens
  const void* doc;            // first token row; elements contiguous within a row
  int dtype;                  // DType of doc
  int64_t row_stride;         // elements between consecutive token rows
  int64_t len;                // tokens in this document, > 0
  float* scratch;             // thread-private, scratch_floats(D) floats
  float* maxbuf;              // thread-private [B][nblk_max * qblock]: running max per query token
  int32_t* nanbuf;            // same shape: nonzero where a NaN similarity was seen
  int32_t* argbuf;            // same shape, or nullptr: token index of each running max
  const uint8_t* mask;        // [len] or nullptr: 0 = token masked, its similarities count as exactly 0
};

// What one SIMD level offers. Each level lives in its own translation unit,
// compiled with its own -m flags.
struct MaxsimLevel {
  const char* name;
  int qblock;                              // query tokens per register tile
  int64_t (*scratch_floats)(int64_t D);
  void (*score_doc)(const MaxsimDocJob& job);
};

const MaxsimLevel& maxsim_level_generic();
const MaxsimLevel& maxsim_level_avx2();
const MaxsimLevel& maxsim_level_avx512();
const MaxsimLevel& maxsim_level_avx512shape();  // AVX-512 tiling on AVX2, for tests

// A whole call, as the bindings hand it over (pointers already validated).
struct MaxsimCall {
  const void* q;              // [B, Lq, D] with element strides below
  int q_dtype;
  int64_t B, Lq, D;
  int64_t q_stride_b, q_stride_i, q_stride_d;
  const int64_t* q_lengths;   // [B] or nullptr (all Lq valid); values in [0, Lq]
  const void* docs;           // base address of the document tokens
  int d_dtype;
  int64_t d_row_stride;       // elements between token rows (the element stride is 1)
  const int64_t* doc_starts;  // [N] element offset (from docs) of each document's first row
  const int64_t* doc_lens;    // [N] tokens per document (0 = empty: scores -inf)
  int64_t N;
  float* scores;              // [B, N] output, or nullptr when only top-k is wanted
  int64_t topk;               // 0 = no top-k
  float* topk_scores;         // [B, topk]
  int64_t* topk_idx;          // [B, topk]
  int32_t* argmax;            // [B, N, Lq] or nullptr: per (query, doc, query token) the document token
                              // (index within the document) of the max; lower index on ties; -1 for
                              // masked query tokens and empty documents
  const uint8_t* doc_mask;    // or nullptr. Zero-mask mode (PyLate's semantics): token t of document n is
  const int64_t* mask_starts; // doc_mask[mask_starts[n] + t]; a masked token's similarity is 0 (it still
                              // counts in the max); an argmax landing on one is reported as -1 (no gradient)
};

void maxsim(const MaxsimCall& call);

// Backward of the scores, from the forward's argmax: no similarity matrix.
//   grad_q[b, i]                 = sum_n grad[b, n] * d_n[argmax[b, n, i]]
//   grad_d[n][argmax[b, n, i]]  += grad[b, n] * q[b, i]
struct MaxsimBackwardCall {
  const void* q;              // as in MaxsimCall
  int q_dtype;
  int64_t B, Lq, D;
  int64_t q_stride_b, q_stride_i, q_stride_d;
  const void* docs;
  int d_dtype;
  int64_t d_row_stride;
  const int64_t* doc_starts;  // [N] element offsets of each document's first row in docs
  const int64_t* doc_lens;    // [N]
  int64_t N;
  const int32_t* argmax;      // [B, N, Lq] from the forward
  const float* grad;          // [B, N] contiguous
  float* grad_q;              // [B, Lq, D] contiguous, or nullptr; fully written
  void* grad_d;               // or nullptr; caller zeroes it; rows at grad_d_starts, stride D
  const int64_t* grad_d_starts;  // [N] element offsets of each document's first row in grad_d
  int grad_d_dtype;           // grad_d's dtype code: float32, or float16/bfloat16 accumulated in float32
                              // per document (a thread's scratch) and rounded once: no float32 copy
};

void maxsim_backward(const MaxsimBackwardCall& call);

// ---- int8 documents (simd/maxsim_int8_kernel.inc explains the arithmetic)

struct MaxsimI8DocJob {
  const uint32_t* qt;         // packed query codes [B][nblk_max][ceil(D/4)][qblock], 4 bytes (code + 64) a word
  int64_t B, nblk_max, D;
  const int64_t* q_nblocks;   // [B]
  const int8_t* doc;          // first token row
  int64_t row_stride;         // bytes between token rows
  int64_t len;                // tokens, > 0
  const float* scales;        // [len] per-token scales of this document
  unsigned char* scratch;     // thread-private, scratch_bytes(D) bytes, 4-byte aligned
  float* maxbuf;              // thread-private [B][nblk_max * qblock]: running max of scale * dot
};

struct MaxsimI8Level {
  const char* name;
  int qblock;
  int64_t (*scratch_bytes)(int64_t D);
  void (*score_doc)(const MaxsimI8DocJob& job);
};

const MaxsimI8Level& maxsim_i8_level_generic();
const MaxsimI8Level& maxsim_i8_level_avx2();
const MaxsimI8Level& maxsim_i8_level_avx512();       // AVX-512BW: vpmaddubsw + vpmaddwd
const MaxsimI8Level& maxsim_i8_level_avx512vnni();   // AVX-512 VNNI: vpdpbusd (chosen when the CPU has it)
const MaxsimI8Level& maxsim_i8_level_avx512shape();
// Name of the int8 kernel the next call would use; allow_vnni(false) makes the
// AVX-512 level use its BW path even where VNNI exists (so tests cover both).
const char* maxsim_int8_kernel_name();
void maxsim_int8_allow_vnni(bool allow);

struct MaxsimI8Call {
  const int8_t* q_codes;      // [B, Lq, D] contiguous, |code| <= 63
  const float* q_scales;      // [B, Lq]
  int64_t B, Lq, D;
  const int64_t* q_lengths;   // [B] or nullptr
  const int8_t* docs;         // base of the document codes
  int64_t d_row_stride;       // bytes between token rows
  const float* doc_scales;    // [rows] per-token scales, contiguous, row r's scale at doc_scales[r]
  const int64_t* doc_starts;  // [N] first row of each document (row index, not bytes)
  const int64_t* doc_lens;    // [N]
  int64_t N;
  float* scores;              // [B, N] or nullptr
  int64_t topk;
  float* topk_scores;
  int64_t* topk_idx;
};

void maxsim_int8(const MaxsimI8Call& call);

}  // namespace cpu
}  // namespace vkern
