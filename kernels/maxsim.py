"""Triton MaxSim kernel (ColBERT late interaction) and its launcher.

score[b, n] = sum over i < query_lengths[b] of max over j in doc n of <q[b, i], d_j>

Flash-style: one program owns a tile of query tokens (one query, or several
short queries stacked along the M dimension of the dot) and streams its
document's tokens through it BLOCK_T at a time, keeping a running max per query
token, so the [Lq, T] similarity matrix never reaches global memory. Documents
are packed ([T, D] plus offsets), so variable lengths cost no padding. One
launch scores the whole batch: every query group against every document.

The package wrapper validates shapes, dtypes, devices and offsets and makes the
inputs contiguous; this module trusts what it is given.
"""

from __future__ import annotations

import functools
import os

import torch

from ._common import IMPORT_ERROR as _IMPORT_ERROR
from ._common import device_guard, tl, triton

__all__ = ["maxsim_scores", "is_available"]

# Query tokens per tile. Longer queries loop over tiles of this size (each tile
# re-streams the document), so any Lq works without atomics.
_MAX_BLOCK_Q = 128
# Per element size (2: fp16/bf16, 4: fp32): feature dims up to `single_d` are
# held in one tile, larger D (768, 1024) is looped over in `d_chunk` pieces.
# The dot has at most max_elems // BLOCK_D rows (max_rows_looped when D is
# looped), never more than _MAX_BLOCK_Q. fp32 takes the exact IEEE (CUDA-core)
# dot, whose operands live in registers, hence its small tiles. Chosen without a
# GPU at hand to time them; what ptxas reports for them (tests/test_gpu_compile.py
# prints the table): some configs spill a few bytes (4-92 B in fp32 configs with
# 64-128 rows, 4-260 B in 16-bit D = 256 configs with 64 rows at sm_80), so the
# gate allow-lists those variants (tests/_known_spills.py). Shared memory: the document tile is
# buffered _STAGES times by Triton's pipeliner, so 16-bit D in (128, 256] with 64
# rows needs 128.5 KB (131,584 B measured with the JIT's 16-divisible sizes): fine
# on sm_80 (163 KB) and sm_90 (227 KB), too much for sm_86/sm_89 (99 KB). The
# launcher therefore checks _smem_bytes against the device's limit and loops over
# D instead (d_chunk pieces: a quarter of the tile) where the whole-D tile does not fit.
_TILES = {
    2: dict(single_d=256, d_chunk=64, max_elems=128 * 128, max_rows_looped=64),
    4: dict(single_d=32, d_chunk=32, max_elems=64 * 32, max_rows_looped=64),
}
_STAGES = 3   # Triton's default num_stages: buffers of the streamed document tile
# Document tokens per streamed tile.
_BLOCK_T = 64
# tl.dot needs every block dimension >= 16 on GPUs.
_MIN_DOT = 16
# NaN-propagating row max: None = a max.NaN reduce on GPUs (one instruction per
# step) and an isnan flag under the interpreter (fast there); tests may force
# either path with True/False.
_NAN_BY_FLAG = None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def is_available() -> tuple[bool, str]:
    """Whether this kernel can run here: (True, "") or (False, reason).

    Needs triton plus either a CUDA device or ``TRITON_INTERPRET=1`` (the CPU
    interpreter, slow, for tests).
    """
    if triton is None:
        return False, _IMPORT_ERROR
    if _interpreting():
        return True, ""
    if torch.cuda.is_available():
        return True, ""
    return False, "no CUDA device (set TRITON_INTERPRET=1 to run the Triton interpreter on CPU)"


if triton is not None:

    @triton.jit
    def _max_propagate_nan(a, b):
        # tl.max skips NaN (maxnum); the float64 NumPy reference propagates it.
        return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)

    # The tile arithmetic every MaxSim kernel shares (this one, maxsim_grad's argmax forward and
    # maxsim_int8): inlined by Triton, so each kernel compiles as if it were written out in it.
    @triton.jit
    def query_tile(q_rows, row_ok, dims, D, UPCAST_TO_FP32: tl.constexpr):
        """The whole-D query tile [rows, BLOCK_D] at row pointers q_rows (rows not row_ok, and
        dims past D, are 0)."""
        tile = tl.load(q_rows[:, None] + dims[None, :], mask=row_ok[:, None] & (dims[None, :] < D), other=0)
        if UPCAST_TO_FP32:
            tile = tile.to(tl.float32)
        return tile

    @triton.jit
    def dot_tile(acc, q_tile, q_rows, row_ok, d_rows, col_ok, dims, D, BLOCK_D: tl.constexpr,
                 SINGLE_D_BLOCK: tl.constexpr, UPCAST_TO_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr):
        """acc + Q D^T for one tile of document rows (row pointers d_rows, col_ok the real ones; the
        accumulator's dtype is the dot's: float32, or int32 for int8 codes). SINGLE_D_BLOCK: Q is
        q_tile (from query_tile); otherwise D is looped in BLOCK_D chunks, Q's chunks read from q_rows."""
        if SINGLE_D_BLOCK:
            d_tile = tl.load(d_rows[:, None] + dims[None, :], mask=col_ok[:, None] & (dims[None, :] < D), other=0)
            if UPCAST_TO_FP32:
                d_tile = d_tile.to(tl.float32)
            acc = tl.dot(q_tile, tl.trans(d_tile), acc, input_precision=INPUT_PRECISION, out_dtype=acc.dtype)
        else:
            for d_start in range(0, D, BLOCK_D):
                d_idx = d_start + dims
                d_ok = d_idx < D
                q_chunk = tl.load(q_rows[:, None] + d_idx[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0)
                d_chunk = tl.load(d_rows[:, None] + d_idx[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0)
                if UPCAST_TO_FP32:
                    q_chunk = q_chunk.to(tl.float32)
                    d_chunk = d_chunk.to(tl.float32)
                acc = tl.dot(q_chunk, tl.trans(d_chunk), acc, input_precision=INPUT_PRECISION, out_dtype=acc.dtype)
        return acc

    @triton.jit
    def _maxsim_kernel(
        queries_ptr,  # [B, Lq, D]
        query_lengths_ptr,  # int32 [B]
        docs_ptr,  # [T, D]
        doc_offsets_ptr,  # int64 [N + 1]
        scores_ptr,  # float32 [B, N]
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
        NAN_BY_FLAG: tl.constexpr,
    ):
        BLOCK_M: tl.constexpr = QUERIES_PER_PROGRAM * BLOCK_Q
        # Programs that share a document are adjacent, so the document stays in
        # L2 while every query group reads it.
        pid = tl.program_id(0)
        doc = pid // NUM_QUERY_GROUPS
        group = pid % NUM_QUERY_GROUPS

        doc_start = tl.load(doc_offsets_ptr + doc)
        doc_end = tl.load(doc_offsets_ptr + doc + 1)

        # Row m of the tile is token (m % BLOCK_Q) of query (m // BLOCK_Q).
        rows = tl.arange(0, BLOCK_M)
        query = group * QUERIES_PER_PROGRAM + rows // BLOCK_Q
        token_in_tile = rows % BLOCK_Q
        query_ok = query < B
        query_len = tl.load(query_lengths_ptr + query, mask=query_ok, other=0)
        query_len = tl.minimum(tl.maximum(query_len, 0), Lq)
        query_row_base = queries_ptr + query.to(tl.int64) * Lq * D
        query_end = tl.max(query_len, axis=0)

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
            for t_start in range(doc_start, doc_end, BLOCK_T):
                cols = t_start + doc_tokens
                col_ok = cols < doc_end
                d_rows = docs_ptr + cols.to(tl.int64) * D
                sims = dot_tile(tl.zeros([BLOCK_M, BLOCK_T], dtype=tl.float32), q_tile, q_rows, row_ok, d_rows,
                                col_ok, dims, D, BLOCK_D, SINGLE_D_BLOCK, UPCAST_TO_FP32, INPUT_PRECISION)
                # Tokens past the document end take no part in the max (not 0).
                sims = tl.where(col_ok[None, :], sims, float("-inf"))
                if NAN_BY_FLAG:
                    # Same result; the interpreter runs a custom-combine reduce
                    # one element at a time in Python, tl.max in NumPy.
                    tile_nan = tl.max((sims != sims).to(tl.int32), axis=1) > 0
                    tile_max = tl.where(tile_nan, float("nan"), tl.max(sims, axis=1))
                else:
                    tile_max = tl.reduce(sims, 1, _max_propagate_nan)
                running_max = tl.maximum(running_max, tile_max, propagate_nan=tl.PropagateNan.ALL)
            # Padded query tokens add nothing (their rows are where'd away, so
            # even a NaN/inf product in them cannot leak into the score).
            row_sums += tl.where(row_ok, running_max, 0.0)

        scores = tl.sum(tl.reshape(row_sums, (QUERIES_PER_PROGRAM, BLOCK_Q)), axis=1)
        # An empty document ranks last, whatever the query length.
        scores = tl.where(doc_end > doc_start, scores, float("-inf"))
        out_query = group * QUERIES_PER_PROGRAM + tl.arange(0, QUERIES_PER_PROGRAM)
        tl.store(scores_ptr + out_query.to(tl.int64) * N + doc, scores, mask=out_query < B)


def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def _smem_bytes(config: dict, elem_size: int) -> int:
    """Upper bound on a config's shared memory: the query tile plus _STAGES document tiles (the
    compile gate checks it against what Triton reports for every config it compiles)."""
    rows = config["QUERIES_PER_PROGRAM"] * config["BLOCK_Q"]
    return elem_size * config["BLOCK_D"] * (rows + _STAGES * config["BLOCK_T"]) + 512  # + reduction scratch


def _launch_config(batch: int, query_len: int, dim: int, elem_size: int, max_smem=None) -> dict:
    """Block sizes for a [batch, query_len, dim] query batch of elem_size-byte floats. max_smem: the
    device's shared memory per block (bytes; None: no limit): a whole-D tile that would not fit is
    replaced by the D-looped tiles."""
    config = _config(batch, query_len, dim, elem_size, single_ok=True)
    if max_smem is not None and config["SINGLE_D_BLOCK"] and _smem_bytes(config, elem_size) > max_smem:
        config = _config(batch, query_len, dim, elem_size, single_ok=False)
    return config


def _config(batch: int, query_len: int, dim: int, elem_size: int, single_ok: bool) -> dict:
    tiles = _TILES[elem_size]
    if dim <= tiles["single_d"] and single_ok:
        block_d, single_d = max(_next_pow2(dim), _MIN_DOT), True
        max_rows = min(_MAX_BLOCK_Q, max(_MIN_DOT, tiles["max_elems"] // block_d))
    else:
        block_d, single_d = tiles["d_chunk"], False
        max_rows = tiles["max_rows_looped"]
    block_q = min(_next_pow2(query_len), max_rows)
    # Stack short queries so the dot has at least 16 rows (and up to max_rows):
    # each document is then read once per query group, not once per query.
    per_program = max(1, min(_next_pow2(batch), max_rows // block_q))
    while per_program * block_q < _MIN_DOT:  # only when the batch is tiny: pad rows
        block_q *= 2
    block_m = per_program * block_q
    if elem_size == 4:
        num_warps = 8 if block_m >= 32 else 4
    else:
        num_warps = 8 if block_m * block_d >= 64 * 64 else 4
    return dict(
        QUERIES_PER_PROGRAM=per_program,
        BLOCK_Q=block_q,
        BLOCK_T=_BLOCK_T,
        BLOCK_D=block_d,
        SINGLE_D_BLOCK=single_d,
        num_warps=num_warps,
    )


@functools.lru_cache(maxsize=None)
def _device_smem(index: int) -> int:
    """Shared memory per block a kernel may use on CUDA device `index` (the opt-in maximum, the limit
    Triton checks at launch)."""
    return int(triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"])


def maxsim_scores(queries, query_lengths, docs, doc_offsets) -> torch.Tensor:
    """MaxSim scores of every query against every packed document, in one launch.

    queries: [B, Lq, D] contiguous float32/float16/bfloat16 tensor.
    query_lengths: int32 [B], same device; tokens at or past a query's length
        are masked and add nothing (a length of 0 scores 0 on non-empty docs).
    docs: [T, D] contiguous, same dtype. doc_offsets: int64 [N + 1], starting
        at 0, non-decreasing, ending at T (validated by the caller).
    Returns float32 [B, N]; an empty document scores -inf. Products are
    accumulated in fp32 (exact IEEE fp32 dot for float32 inputs, no TF32); a
    NaN in a valid token makes the score NaN.

    >>> q = torch.ones(1, 2, 4); d = torch.ones(3, 4)
    >>> maxsim_scores(q, torch.tensor([2], dtype=torch.int32), d, torch.tensor([0, 3, 3]))
    tensor([[8., -inf]])
    """
    batch, query_len, dim = queries.shape
    num_docs = doc_offsets.shape[0] - 1
    device = queries.device
    if batch == 0 or num_docs == 0 or docs.shape[0] == 0 or query_len == 0 or dim == 0:
        # Nothing to stream (and no valid pointer to give the kernel): every
        # similarity is 0 or there is none; no launch, no host sync.
        empty = doc_offsets[1:] == doc_offsets[:-1]
        scores = torch.where(empty, float("-inf"), 0.0).to(device=device, dtype=torch.float32)
        return scores.expand(batch, num_docs).contiguous()

    max_smem = None if device.type != "cuda" else _device_smem(device.index if device.index is not None
                                                                   else torch.cuda.current_device())
    config = _launch_config(batch, query_len, dim, queries.element_size(), max_smem)
    num_groups = triton.cdiv(batch, config["QUERIES_PER_PROGRAM"])
    num_programs = num_docs * num_groups
    if num_programs >= 2**31:
        raise ValueError(f"maxsim: {num_docs} documents x {num_groups} query groups exceed one launch grid")

    # The interpreter computes bf16 tl.dot wrongly; fp32 operands are exact there.
    upcast = queries.dtype == torch.bfloat16 and _interpreting()
    # Plain fp32 tl.dot would use TF32 (10-bit mantissa) on tensor cores.
    precision = "ieee" if queries.dtype == torch.float32 or upcast else "tf32"

    scores = torch.empty((batch, num_docs), dtype=torch.float32, device=device)
    with device_guard(queries):
        _maxsim_kernel[(num_programs,)](
            queries, query_lengths, docs, doc_offsets, scores,
            batch, num_docs, query_len, dim, num_groups,
            UPCAST_TO_FP32=upcast,
            INPUT_PRECISION=precision,
            NAN_BY_FLAG=_interpreting() if _NAN_BY_FLAG is None else _NAN_BY_FLAG,
            **config,
        )
    return scores

