"""Triton kernels for differentiable MaxSim: the forward that keeps the argmax, and the backward.

Forward (``maxsim_argmax``): the scores of ``maxsim.maxsim_scores`` plus, per (query b, document
n, query token i), the index within document n of the token holding the max (int32 [B, N, Lq];
the lower index on exact ties, the first NaN if any; -1 for masked query tokens and empty
documents). Same tiling as ``maxsim._maxsim_kernel`` (its launch config is reused): a program
owns a query group and one document, streams the document through its query tile BLOCK_T tokens
at a time, and keeps a running (max, argmax) per query token; no [Lq, Ld] similarity reaches
global memory. Documents are rows of one contiguous [rows, D] buffer, document n being rows
[doc_starts[n], doc_starts[n] + doc_lens[n]): packed docs and padded [N, Ld, D] docs (starts
n * Ld) are both read in place. An optional uint8 token mask (indexed like the rows) gives
PyLate's zero-mask semantics: a masked token's similarity is exactly 0 (it still takes part in
the max) and an argmax on a masked token is reported as -1 (it passes no gradient).

Backward (``maxsim_backward``), from the argmax alone, float32 accumulation:
    grad_q[b, i]                     = sum_n g[b, n] * d[start_n + arg[b, n, i]]
    grad_d[start_n + arg[b, n, i]]  += g[b, n] * q[b, i]
grad_q: one program per (query row, D block) sums over the documents in a fixed order
(deterministic, no atomics). grad_d: float32 atomics (tl.atomic_add) into a zeroed buffer; each
program adds one query's tile of query rows to the argmax rows of a few documents. Atomics here
because a document row can receive several contributions (query tokens and queries sharing an
argmax) and Triton gives no ordering guarantee between a program's store and its next load of
the same address in a pipelined loop, which a deterministic read-modify-write loop would need.
The cost is the last bits of grad_d may differ between runs (float32 addition order); work and
memory are O(B * N * Lq * D) and O(argmax + gradients), never O(B * N * Lq * Ld).
The CUDA backend (csrc/cuda/maxsim_grad.cu) does the same without atomics.

The package wrapper validates everything; this module trusts what it is given.
"""

from __future__ import annotations

import torch

from ._common import device_guard, flat_grid, tl, triton
from . import maxsim as _fwd

__all__ = ["maxsim_argmax", "maxsim_backward"]

_BLOCK_N = 32          # documents per step of the grad_q gather
_BLOCK_I = 16          # query rows per grad_d program
_DOCS_PER_PROGRAM = 4  # documents per grad_d program (the query tile is loaded once for them)
_MAX_BLOCK_D = 128     # D per backward program (larger D: more programs)


def _pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def _block_d(dim: int) -> int:
    return min(max(_pow2(dim), 16), _MAX_BLOCK_D)


if triton is not None:
    from .maxsim import dot_tile, query_tile   # the shared tile arithmetic

    @triton.jit
    def _maxsim_argmax_kernel(
        queries_ptr,  # [B, Lq, D]
        query_lengths_ptr,  # int32 [B]
        docs_ptr,  # [rows, D]
        doc_starts_ptr,  # int64 [N]: first row of each document
        doc_lens_ptr,  # int64 [N]
        mask_ptr,  # uint8 [rows] (HAS_MASK) or any pointer
        scores_ptr,  # float32 [B, N]
        argmax_ptr,  # int32 [B, N, Lq], prefilled with -1
        B,
        N,
        Lq,
        D,
        NUM_QUERY_GROUPS,
        QUERIES_PER_PROGRAM: tl.constexpr,
        BLOCK_Q: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_D: tl.constexpr,
        SINGLE_D_BLOCK: tl.constexpr,
        UPCAST_TO_FP32: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
        HAS_MASK: tl.constexpr,
    ):
        BLOCK_M: tl.constexpr = QUERIES_PER_PROGRAM * BLOCK_Q
        pid = tl.program_id(0).to(tl.int64)
        doc = pid // NUM_QUERY_GROUPS
        group = pid % NUM_QUERY_GROUPS
        doc_start = tl.load(doc_starts_ptr + doc)
        doc_len = tl.load(doc_lens_ptr + doc)
        doc_end = doc_start + doc_len

        rows = tl.arange(0, BLOCK_M)
        query = group * QUERIES_PER_PROGRAM + rows // BLOCK_Q
        token_in_tile = rows % BLOCK_Q
        query_ok = query < B
        query_len = tl.load(query_lengths_ptr + query, mask=query_ok, other=0)
        query_len = tl.minimum(tl.maximum(query_len, 0), Lq)
        query_row_base = queries_ptr + query * Lq * D
        query_end = tl.max(query_len, axis=0)
        arg_base = argmax_ptr + (query * N + doc) * Lq

        dims = tl.arange(0, BLOCK_D)
        doc_tokens = tl.arange(0, BLOCK_T)
        row_sums = tl.zeros([BLOCK_M], dtype=tl.float32)

        for q_start in range(0, query_end, BLOCK_Q):
            token = q_start + token_in_tile
            row_ok = query_ok & (token < query_len)
            q_rows = query_row_base + token.to(tl.int64) * D
            if SINGLE_D_BLOCK:
                q_tile = query_tile(q_rows, row_ok, dims, D, UPCAST_TO_FP32)
            else:
                q_tile = 0   # unused: dot_tile reads the query's D chunks itself

            running_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
            running_arg = tl.zeros([BLOCK_M], dtype=tl.int32)
            for t_start in range(doc_start, doc_end, BLOCK_T):
                cols = t_start + doc_tokens
                col_ok = cols < doc_end
                d_rows = docs_ptr + cols * D
                sims = dot_tile(tl.zeros([BLOCK_M, BLOCK_T], dtype=tl.float32), q_tile, q_rows, row_ok, d_rows,
                                col_ok, dims, D, BLOCK_D, SINGLE_D_BLOCK, UPCAST_TO_FP32, INPUT_PRECISION)
                if HAS_MASK:
                    keep = tl.load(mask_ptr + cols, mask=col_ok, other=0)
                    sims = tl.where(keep[None, :] != 0, sims, 0.0)
                sims = tl.where(col_ok[None, :], sims, float("-inf"))
                # max and its first index, NaN-propagating as np.max / np.argmax (the first NaN wins)
                is_nan = sims != sims
                tile_nan = tl.max(is_nan.to(tl.int32), axis=1) > 0
                tile_max = tl.where(tile_nan, float("nan"), tl.max(sims, axis=1))
                hit = (sims == tile_max[:, None]) | (is_nan & tile_nan[:, None])
                local = (cols - doc_start).to(tl.int32)
                tile_arg = tl.min(tl.where(hit, local[None, :], 2147483647), axis=1)
                # strictly better only: an equal max in a later tile keeps the lower index
                better = (tile_max > running_max) | (tile_nan & (running_max == running_max))
                running_max = tl.where(better, tile_max, running_max)
                running_arg = tl.where(better, tile_arg, running_arg)
            row_sums += tl.where(row_ok, running_max, 0.0)
            arg = tl.where(row_ok & (doc_len > 0), running_arg, -1)
            if HAS_MASK:
                on_kept = tl.load(mask_ptr + doc_start + tl.maximum(arg, 0).to(tl.int64), mask=arg >= 0, other=1)
                arg = tl.where(on_kept != 0, arg, -1)
            tl.store(arg_base + token, arg, mask=query_ok & (token < Lq))

        scores = tl.sum(tl.reshape(row_sums, (QUERIES_PER_PROGRAM, BLOCK_Q)), axis=1)
        scores = tl.where(doc_len > 0, scores, float("-inf"))
        out_query = group * QUERIES_PER_PROGRAM + tl.arange(0, QUERIES_PER_PROGRAM)
        tl.store(scores_ptr + out_query * N + doc, scores, mask=out_query < B)

    @triton.jit
    def _grad_q_kernel(
        grad_ptr,  # float32 [B, N]
        argmax_ptr,  # int32 [B, N, Lq]
        docs_ptr,  # [rows, D]
        doc_starts_ptr,  # int64 [N]
        grad_q_ptr,  # float32 [B, Lq, D]
        N,
        Lq,
        D,
        NUM_D_BLOCKS,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)
        row = pid // NUM_D_BLOCKS          # b * Lq + i
        dims = (pid % NUM_D_BLOCKS) * BLOCK_D + tl.arange(0, BLOCK_D)
        d_ok = dims < D
        b = row // Lq
        i = row % Lq
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
            n_ok = n < N
            a = tl.load(argmax_ptr + (b * N + n) * Lq + i, mask=n_ok, other=-1)
            ok = a >= 0
            g = tl.load(grad_ptr + b * N + n, mask=ok, other=0.0)
            start = tl.load(doc_starts_ptr + n, mask=ok, other=0)
            src = docs_ptr + (start + a) * D
            tile = tl.load(src[:, None] + dims[None, :], mask=ok[:, None] & d_ok[None, :], other=0.0)
            acc += tl.sum(tile.to(tl.float32) * g[:, None], axis=0)
        tl.store(grad_q_ptr + row * D + dims, acc, mask=d_ok)

    @triton.jit
    def _grad_d_kernel(
        grad_ptr,  # float32 [B, N]
        argmax_ptr,  # int32 [B, N, Lq]
        queries_ptr,  # [B, Lq, D]
        doc_starts_ptr,  # int64 [N]
        grad_d_ptr,  # float32 [rows, D], zeroed
        N,
        Lq,
        D,
        NUM_DOC_BLOCKS,
        NUM_I_BLOCKS,
        NUM_D_BLOCKS,
        DOCS_PER_PROGRAM: tl.constexpr,
        BLOCK_I: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)
        d_blk = pid % NUM_D_BLOCKS
        rest = pid // NUM_D_BLOCKS
        i_blk = rest % NUM_I_BLOCKS
        rest = rest // NUM_I_BLOCKS
        doc_blk = rest % NUM_DOC_BLOCKS
        b = rest // NUM_DOC_BLOCKS
        tok = i_blk * BLOCK_I + tl.arange(0, BLOCK_I)
        tok_ok = tok < Lq
        dims = d_blk * BLOCK_D + tl.arange(0, BLOCK_D)
        d_ok = dims < D
        q = tl.load(queries_ptr + (b * Lq + tok)[:, None] * D + dims[None, :],
                    mask=tok_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        for k in range(DOCS_PER_PROGRAM):
            n = doc_blk * DOCS_PER_PROGRAM + k + tl.zeros([BLOCK_I], dtype=tl.int64)   # per row: masks stay tensors
            n_ok = tok_ok & (n < N)
            a = tl.load(argmax_ptr + (b * N + n) * Lq + tok, mask=n_ok, other=-1)
            ok = a >= 0
            g = tl.load(grad_ptr + b * N + n, mask=ok, other=0.0)
            start = tl.load(doc_starts_ptr + n, mask=ok, other=0)
            dst = grad_d_ptr + (start + a) * D
            tl.atomic_add(dst[:, None] + dims[None, :], q * g[:, None], mask=ok[:, None] & d_ok[None, :],
                          sem="relaxed")


def maxsim_argmax(queries, query_lengths, docs, doc_starts, doc_lens, doc_mask=None):
    """(scores float32 [B, N], argmax int32 [B, N, Lq]) in one launch.

    queries [B, Lq, D] contiguous, docs [rows, D] contiguous of the same dtype (float32/16, bf16),
    query_lengths int32 [B], doc_starts / doc_lens int64 [N] (document n = rows
    [doc_starts[n], doc_starts[n] + doc_lens[n])), doc_mask None or uint8 [rows] (0 = masked:
    similarity exactly 0, argmax on it reported as -1). All on one device, validated by the caller.
    """
    batch, query_len, dim = queries.shape
    num_docs = int(doc_starts.shape[0])
    device = queries.device
    arg = torch.full((batch, num_docs, query_len), -1, dtype=torch.int32, device=device)
    scores = torch.empty((batch, num_docs), dtype=torch.float32, device=device)
    if batch == 0 or num_docs == 0:
        return scores, arg
    if docs.shape[0] == 0 or query_len == 0:
        # no row to read (and maybe no valid pointer): sums over nothing are 0, empty docs -inf
        scores.copy_(torch.where(doc_lens == 0, float("-inf"), 0.0).to(torch.float32).expand(batch, num_docs))
        return scores, arg
    max_smem = None if device.type != "cuda" else _fwd._device_smem(
        device.index if device.index is not None else torch.cuda.current_device())
    config = _fwd._launch_config(batch, query_len, dim, queries.element_size(), max_smem)
    num_groups = triton.cdiv(batch, config["QUERIES_PER_PROGRAM"])
    grid = flat_grid("maxsim argmax", num_docs, num_groups)
    upcast = queries.dtype == torch.bfloat16 and _fwd._interpreting()
    precision = "ieee" if queries.dtype == torch.float32 or upcast else "tf32"
    with device_guard(queries):
        _maxsim_argmax_kernel[grid](
            queries, query_lengths, docs, doc_starts, doc_lens, doc_mask if doc_mask is not None else arg,
            scores, arg, batch, num_docs, query_len, dim, num_groups,
            UPCAST_TO_FP32=upcast, INPUT_PRECISION=precision, HAS_MASK=doc_mask is not None, **config)
    return scores, arg


def maxsim_backward(grad, argmax, queries, docs, doc_starts, need_queries=True, need_docs=True):
    """(grad_q float32 [B, Lq, D] or None, grad_d float32 [rows, D] or None) from the argmax.

    grad float32 [B, N] contiguous, argmax int32 [B, N, Lq] contiguous (-1: no gradient), queries
    [B, Lq, D] and docs [rows, D] contiguous (any float dtype each), doc_starts int64 [N]. Rows of
    docs no argmax points at get 0 in grad_d."""
    batch, query_len, dim = queries.shape
    num_docs = int(doc_starts.shape[0])
    device = queries.device
    gq = torch.zeros((batch, query_len, dim), dtype=torch.float32, device=device) if need_queries else None
    gd = torch.zeros((int(docs.shape[0]), dim), dtype=torch.float32, device=device) if need_docs else None
    if batch * query_len * num_docs == 0 or docs.shape[0] == 0:
        return gq, gd
    block_d = _block_d(dim)
    num_d = triton.cdiv(dim, block_d)
    with device_guard(queries):
        if need_queries:
            _grad_q_kernel[flat_grid("maxsim backward (queries)", batch * query_len, num_d)](
                grad, argmax, docs, doc_starts, gq, num_docs, query_len, dim, num_d,
                BLOCK_N=_BLOCK_N, BLOCK_D=block_d)
        if need_docs:
            num_i = triton.cdiv(query_len, _BLOCK_I)
            num_doc_blocks = triton.cdiv(num_docs, _DOCS_PER_PROGRAM)
            _grad_d_kernel[flat_grid("maxsim backward (docs)", batch, num_doc_blocks, num_i, num_d)](
                grad, argmax, queries, doc_starts, gd, num_docs, query_len, dim, num_doc_blocks, num_i, num_d,
                DOCS_PER_PROGRAM=_DOCS_PER_PROGRAM, BLOCK_I=_BLOCK_I, BLOCK_D=block_d)
    return gq, gd
