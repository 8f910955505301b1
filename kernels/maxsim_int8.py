"""Triton int8-document MaxSim kernel and its launcher (definition: vkern/reference/maxsim_int8.py).

score[b, n] = sum over i < query_lengths[b] of q_scales[b, i] * max over j in doc n of
              (doc_scales[j] * <q_codes[b, i], codes[j]>)

The structure of kernels/maxsim.py (one program: one document x a tile of query tokens, the
document streamed through it BLOCK_T tokens at a time, a running max per query token), with int8
operands: tl.dot of int8 tiles accumulates exact int32 (tensor-core int8 MMA on sm_80/sm_90),
the document token's scale is applied to the int32 dots in float32 before the max and the query
token's scale to the max. The documents are read where they lie (int8 rows of any row stride): no
dequantised copy. The wrapper (vkern/ops/maxsim_int8.py) quantises the queries, validates
everything and makes what this kernel trusts: q_codes contiguous, codes with unit column stride.
"""

from __future__ import annotations

import torch

from ._common import IMPORT_ERROR as _IMPORT_ERROR
from ._common import device_guard, flat_grid, tl, triton

__all__ = ["maxsim_int8_scores", "launch_config"]

# Query rows per tile at most; longer queries loop over tiles (each re-streams the document).
_MAX_BLOCK_Q = 128
# D held in one tile up to this (int8: 256 B a row); larger D is looped in _D_CHUNK pieces.
_SINGLE_D = 256
_D_CHUNK = 64
# Query rows x feature bytes of the whole-D tile at most, and rows when D is looped. Sized by what
# ptxas reports (tests/test_gpu_compile.py): where D is not a multiple of 16 the tiles are loaded
# byte by byte through 64-bit pointer tensors, and 64 x 128 tiles then spilled 112-600 B (sm_80/90);
# 64 x 64 ones do not.
_MAX_ELEMS = 64 * 64
_MAX_ROWS_LOOPED = 32
_BLOCK_T = 64
# int8 MMA: k = 32 per instruction (m16n8k32 on sm_80, wgmma k = 32 on sm_90), M and N >= 16.
_MIN_K = 32
_MIN_MN = 16


def is_available() -> tuple[bool, str]:
    if triton is None:
        return False, _IMPORT_ERROR
    return True, ""


if triton is not None:
    from .maxsim import dot_tile, query_tile   # the shared tile arithmetic

    @triton.jit
    def _maxsim_int8_kernel(
        q_codes_ptr,  # int8 [B, Lq, D] contiguous
        q_scales_ptr,  # float32 [B, Lq]
        query_lengths_ptr,  # int32 [B]
        codes_ptr,  # int8 [T, D], rows doc_row_stride apart
        doc_scales_ptr,  # float32 [T]
        doc_offsets_ptr,  # int64 [N + 1]
        scores_ptr,  # float32 [B, N]
        B,
        N,
        Lq,
        D,
        doc_row_stride,
        NUM_QUERY_GROUPS,
        QUERIES_PER_PROGRAM: tl.constexpr,
        BLOCK_Q: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_D: tl.constexpr,
        SINGLE_D_BLOCK: tl.constexpr,
    ):
        BLOCK_M: tl.constexpr = QUERIES_PER_PROGRAM * BLOCK_Q
        pid = tl.program_id(0).to(tl.int64)
        doc = pid // NUM_QUERY_GROUPS    # programs of one document are adjacent: it stays in L2
        group = pid % NUM_QUERY_GROUPS
        doc_start = tl.load(doc_offsets_ptr + doc)
        doc_end = tl.load(doc_offsets_ptr + doc + 1)

        rows = tl.arange(0, BLOCK_M)     # row m: token (m % BLOCK_Q) of query (m // BLOCK_Q)
        query = group * QUERIES_PER_PROGRAM + rows // BLOCK_Q
        token_in_tile = rows % BLOCK_Q
        query_ok = query < B
        query_len = tl.load(query_lengths_ptr + query, mask=query_ok, other=0)
        query_len = tl.minimum(tl.maximum(query_len, 0), Lq)
        query_end = tl.max(query_len, axis=0)

        dims = tl.arange(0, BLOCK_D)
        doc_tokens = tl.arange(0, BLOCK_T)
        row_sums = tl.zeros([BLOCK_M], dtype=tl.float32)
        for q_start in range(0, query_end, BLOCK_Q):
            token = q_start + token_in_tile
            row_ok = query_ok & (token < query_len)
            q_index = query * Lq + token                     # int64 (query is)
            q_rows = q_codes_ptr + q_index * D
            q_scale = tl.load(q_scales_ptr + q_index, mask=row_ok, other=0.0)
            if SINGLE_D_BLOCK:
                q_tile = query_tile(q_rows, row_ok, dims, D, False)
            else:
                q_tile = 0   # unused: dot_tile reads the query's D chunks itself
            running_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
            for t_start in range(doc_start, doc_end, BLOCK_T):
                cols = t_start + doc_tokens                  # int64 (doc_start is)
                col_ok = cols < doc_end
                d_rows = codes_ptr + cols * doc_row_stride
                dots = dot_tile(tl.zeros([BLOCK_M, BLOCK_T], dtype=tl.int32), q_tile, q_rows, row_ok, d_rows, col_ok,
                                dims, D, BLOCK_D, SINGLE_D_BLOCK, False, None)
                d_scale = tl.load(doc_scales_ptr + cols, mask=col_ok, other=0.0)
                sims = dots.to(tl.float32) * d_scale[None, :]
                # tokens past the document end take no part in the max (not 0); scales and codes are
                # finite (checked by the wrapper), so no NaN can arise
                sims = tl.where(col_ok[None, :], sims, float("-inf"))
                running_max = tl.maximum(running_max, tl.max(sims, axis=1))
            row_sums += tl.where(row_ok, running_max, 0.0) * q_scale   # masked rows: 0 * 0

        scores = tl.sum(tl.reshape(row_sums, (QUERIES_PER_PROGRAM, BLOCK_Q)), axis=1)
        scores = tl.where(doc_end > doc_start, scores, float("-inf"))   # an empty document ranks last
        out_query = group * QUERIES_PER_PROGRAM + tl.arange(0, QUERIES_PER_PROGRAM)
        tl.store(scores_ptr + out_query * N + doc, scores, mask=out_query < B)


def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def launch_config(batch: int, query_len: int, dim: int) -> dict:
    """Block sizes for a [batch, query_len, dim] batch of int8 query codes."""
    if dim <= _SINGLE_D:
        block_d, single = max(_next_pow2(dim), _MIN_K), True
        max_rows = min(_MAX_BLOCK_Q, max(_MIN_MN, _MAX_ELEMS // block_d))
    else:
        block_d, single = _D_CHUNK, False
        max_rows = _MAX_ROWS_LOOPED
    block_q = min(_next_pow2(query_len), max_rows)
    # short queries are stacked so the dot has >= 16 rows: the document is read once per group
    per_program = max(1, min(_next_pow2(batch), max_rows // block_q))
    while per_program * block_q < _MIN_MN:
        block_q *= 2
    block_m = per_program * block_q
    return dict(QUERIES_PER_PROGRAM=per_program, BLOCK_Q=block_q, BLOCK_T=_BLOCK_T, BLOCK_D=block_d,
                # D-looped tiles with 4 warps spilled 120-216 B (sm_90, D not a multiple of 16); 8 do not
                SINGLE_D_BLOCK=single, num_warps=8 if block_m >= 64 or not single else 4)


def maxsim_int8_scores(q_codes, q_scales, query_lengths, codes, doc_scales, doc_offsets) -> torch.Tensor:
    """int8 MaxSim of every query against every packed int8 document, in one launch.

    q_codes: int8 [B, Lq, D] contiguous; q_scales: float32 [B, Lq]; query_lengths: int32 [B].
    codes: int8 [T, D] with unit column stride (any row stride >= D); doc_scales: float32 [T];
    doc_offsets: int64 [N + 1] (validated by the caller). All on one device.
    Returns float32 [B, N]; an empty document scores -inf, a length-0 query 0 elsewhere.

    >>> q = torch.ones(1, 2, 4, dtype=torch.int8); d = torch.full((3, 4), 2, dtype=torch.int8)
    >>> maxsim_int8_scores(q, torch.full((1, 2), 0.5), torch.tensor([2], dtype=torch.int32), d,
    ...                    torch.full((3,), 0.25), torch.tensor([0, 3, 3]))
    tensor([[2., -inf]])
    """
    batch, query_len, dim = (int(s) for s in q_codes.shape)
    num_docs = int(doc_offsets.shape[0]) - 1
    device = q_codes.device
    if batch == 0 or num_docs == 0 or codes.shape[0] == 0 or query_len == 0:
        # nothing to stream: a non-empty document scores 0, an empty one -inf; no launch
        empty = doc_offsets[1:] == doc_offsets[:-1]
        scores = torch.where(empty, float("-inf"), 0.0).to(device=device, dtype=torch.float32)
        return scores.expand(batch, num_docs).contiguous()
    config = launch_config(batch, query_len, dim)
    num_groups = triton.cdiv(batch, config["QUERIES_PER_PROGRAM"])
    grid = flat_grid("maxsim (int8)", num_docs, num_groups)
    row_stride = int(codes.stride(0)) if codes.shape[0] > 1 else dim
    scores = torch.empty((batch, num_docs), dtype=torch.float32, device=device)
    with device_guard(q_codes):
        _maxsim_int8_kernel[grid](
            q_codes, q_scales, query_lengths, codes, doc_scales, doc_offsets, scores,
            batch, num_docs, query_len, dim, row_stride, num_groups, **config)
    return scores
