"""Triton VATP kernels (SPEC §3) and their launchers.

- attention_colsum, flash-style in two passes, never the Tq x T matrix:
  1. ``_rowstats_kernel``: one program per (query head, block of query rows)
     streams the visible keys and keeps the online softmax max and sum of each
     row (float32 [B, Hq, Tq, 2] in global memory: O(B Hq Tq)).
  2. ``_colsum_kernel``: one program per (KV head, block of keys) streams the
     query rows of every query head of its GQA group that can see those keys,
     recomputes the scores, normalises them with the row statistics and sums
     the columns in registers: no atomics, each output written once.
- value_l1: one program per block of rows.
- vatp_prune:
  1. ``_select_kernel``: one program per (batch, KV head) finds the free
     budget's threshold score by a 32-step bitwise search on order-preserving
     integer keys (counting, no sort), then emits the kept positions in
     ascending order with a running prefix sum (ties: lower index first).
  2. ``_gather_kernel`` (out of place): programs over (head, block of kept
     rows) copy rows; ``_compact_kernel`` (in place): one program per (head,
     block of D columns) walks the kept rows in ascending blocks, loading a
     block before storing it (destinations never pass sources, so earlier
     blocks cannot clobber later sources).

The package wrapper validates everything and makes inputs contiguous; this
module trusts what it is given.
"""
from __future__ import annotations

import os

import torch

from ._common import IMPORT_ERROR as _IMPORT_ERROR
from ._common import device_guard, flat_grid, order_key, tl, triton

__all__ = ["attention_colsum", "value_l1", "prune", "is_available"]

_LOG2E = 1.4426950408889634
_BLOCK_M = 32     # query rows per tile
_BLOCK_N = 32     # keys per tile
_BLOCK_ROWS = 32  # rows per tile for value_l1 and the copies
_BLOCK_SEL = 128 if os.environ.get("TRITON_INTERPRET") == "1" else 1024


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def is_available() -> tuple[bool, str]:
    if triton is None:
        return False, _IMPORT_ERROR
    if _interpreting() or torch.cuda.is_available():
        return True, ""
    return False, "no CUDA device (set TRITON_INTERPRET=1 to run the Triton interpreter on CPU)"


def _pow2(n: int, lo: int = 16) -> int:
    p = lo
    while p < n:
        p *= 2
    return p


if triton is not None:

    @triton.jit
    def _scores(q, k_ptrs, kmask, qscale, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
        kt = tl.load(k_ptrs, mask=kmask, other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
        return tl.dot(q, tl.trans(kt), input_precision=PRECISION) * qscale

    @triton.jit
    def _scores_chunked(q_rows, q_ok, k_rows, k_ok, D, qscale, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        D_CHUNK: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
        # D in chunks: no whole-D tile lives in registers (the float32 IEEE dot keeps its operands there)
        s = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for d0 in range(0, D, D_CHUNK):
            dims = d0 + tl.arange(0, D_CHUNK)
            qt = tl.load(q_rows[:, None] + dims[None, :], mask=q_ok[:, None] & (dims < D)[None, :], other=0.0)
            kt = tl.load(k_rows[:, None] + dims[None, :], mask=k_ok[:, None] & (dims < D)[None, :], other=0.0)
            if UPCAST:
                qt = qt.to(tl.float32)
                kt = kt.to(tl.float32)
            s = tl.dot(qt, tl.trans(kt), s, input_precision=PRECISION)
        return s * qscale

    @triton.jit
    def _rowstats_kernel(q_ptr, k_ptr, lens_ptr, stats_ptr, Hq, Tq, T, D, G, qscale,
                         CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_D: tl.constexpr, D_CHUNK: tl.constexpr, UPCAST: tl.constexpr,
                         PRECISION: tl.constexpr):
        n_tiles = tl.cdiv(Tq, BLOCK_M)   # one grid axis: (query head, row tile), see _colsum_grids
        tile = tl.program_id(0) % n_tiles
        bhq = (tl.program_id(0) // n_tiles).to(tl.int64)  # int64 offsets: a cache may hold >= 2**31 elements
        b = bhq // Hq
        h = (bhq % Hq) // G
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        dims = tl.arange(0, BLOCK_D)
        L = tl.load(lens_ptr + b).to(tl.int32)
        pos = T - Tq + rows
        q_rows = q_ptr + (bhq * Tq + rows) * D
        if D_CHUNK == BLOCK_D:   # the whole q tile stays in registers
            q = tl.load(q_rows[:, None] + dims[None, :], mask=(rows < Tq)[:, None] & (dims < D)[None, :], other=0.0)
            if UPCAST:
                q = q.to(tl.float32)
        if CAUSAL:
            hi = tl.minimum(L, T - Tq + (tile + 1) * BLOCK_M)  # last row's position + 1
        else:
            hi = L
        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        s_sum = tl.zeros([BLOCK_M], tl.float32)
        k_base = k_ptr + (b * (Hq // G) + h) * T * D
        for n0 in range(0, hi, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            k_rows = k_base + cols.to(tl.int64) * D
            if D_CHUNK == BLOCK_D:
                s = _scores(q, k_rows[:, None] + dims[None, :], (cols < L)[:, None] & (dims < D)[None, :],
                            qscale, UPCAST, PRECISION)
            else:
                s = _scores_chunked(q_rows, rows < Tq, k_rows, cols < L, D, qscale, BLOCK_M, BLOCK_N, D_CHUNK,
                                    UPCAST, PRECISION)
            visible = (cols < L)[None, :] & (rows < Tq)[:, None]
            if CAUSAL:
                visible = visible & (cols[None, :] <= pos[:, None])
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            s_sum = s_sum * tl.exp2(m - shift) + tl.sum(tl.exp2(s - shift[:, None]), axis=1)
            m = m_new
        if CAUSAL:  # query rows past the sequence are padding
            s_sum = tl.where(pos < L, s_sum, 0.0)
        out = stats_ptr + (bhq * Tq + rows) * 2
        tl.store(out, m, mask=rows < Tq)
        tl.store(out + 1, s_sum, mask=rows < Tq)

    @triton.jit
    def _colsum_kernel(q_ptr, k_ptr, lens_ptr, stats_ptr, out_ptr, Hq, H, Tq, T, D, G, qscale,
                       CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_D: tl.constexpr, D_CHUNK: tl.constexpr, UPCAST: tl.constexpr,
                       PRECISION: tl.constexpr):
        n_tiles = tl.cdiv(T, BLOCK_N)
        tile = tl.program_id(0) % n_tiles
        bh = (tl.program_id(0) // n_tiles).to(tl.int64)
        b = bh // H
        h = bh % H
        cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        dims = tl.arange(0, BLOCK_D)
        L = tl.load(lens_ptr + b).to(tl.int32)
        kmask = (cols < L)[:, None] & (dims < D)[None, :]
        k_rows = k_ptr + (bh * T + cols) * D
        k_ptrs = k_rows[:, None] + dims[None, :]
        acc = tl.zeros([BLOCK_N], tl.float32)
        if CAUSAL:  # rows before the first that sees this key block add nothing
            first = tl.maximum(tile * BLOCK_N - (T - Tq), 0)
            start = (first // BLOCK_M) * BLOCK_M
        else:
            start = 0
        for g in range(0, G):
            hq = h * G + g
            for m0 in range(start, Tq, BLOCK_M):
                rows = m0 + tl.arange(0, BLOCK_M)
                pos = T - Tq + rows
                q_rows = q_ptr + ((b * Hq + hq) * Tq + rows) * D
                if D_CHUNK == BLOCK_D:
                    q = tl.load(q_rows[:, None] + dims[None, :], mask=(rows < Tq)[:, None] & (dims < D)[None, :],
                                other=0.0)
                    if UPCAST:
                        q = q.to(tl.float32)
                st = stats_ptr + ((b * Hq + hq) * Tq + rows) * 2
                m = tl.load(st, mask=rows < Tq, other=0.0)
                s_sum = tl.load(st + 1, mask=rows < Tq, other=0.0)
                # A row that sees keys but whose max is not finite (a NaN or +inf score, or all -inf)
                # gets NaN on every key it sees (docs/contracts.md): inv = NaN does it, per row.
                sees = (rows < Tq) & (L > 0)
                if CAUSAL:
                    sees = sees & (pos >= 0) & (pos < L)
                ok = sees & (s_sum > 0.0) & (m - m == 0.0)   # m - m is NaN for +-inf and NaN
                inv = tl.where(ok, 1.0 / tl.where(ok, s_sum, 1.0), float("nan"))
                shift = tl.where(ok, m, 0.0)
                if D_CHUNK == BLOCK_D:
                    s = _scores(q, k_ptrs, kmask, qscale, UPCAST, PRECISION)
                else:
                    s = _scores_chunked(q_rows, rows < Tq, k_rows, cols < L, D, qscale, BLOCK_M, BLOCK_N, D_CHUNK,
                                        UPCAST, PRECISION)
                visible = sees[:, None] & (cols < L)[None, :]
                if CAUSAL:
                    visible = visible & (cols[None, :] <= pos[:, None])
                p = tl.where(visible, tl.exp2(s - shift[:, None]) * inv[:, None], 0.0)
                acc += tl.sum(p, axis=0)
        tl.store(out_ptr + bh * T + cols, acc, mask=cols < T)

    @triton.jit
    def _value_l1_kernel(v_ptr, out_ptr, rows_total, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        acc = tl.zeros([BLOCK_R], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dims = d0 + tl.arange(0, BLOCK_D)
            x = tl.load(v_ptr + rows[:, None] * D + dims[None, :],
                        mask=(rows < rows_total)[:, None] & (dims < D)[None, :], other=0.0)
            acc += tl.sum(tl.abs(x.to(tl.float32)), axis=1)
        tl.store(out_ptr + rows, acc, mask=rows < rows_total)

    @triton.jit
    def _select_kernel(scores_ptr, lens_ptr, kept_ptr, idx_ptr, H, T, kmax, num_sink, num_recent,
                       BLOCK: tl.constexpr):
        bh = tl.program_id(0).to(tl.int64)
        b = bh // H
        L = tl.load(lens_ptr + b)
        n = tl.load(kept_ptr + b)
        sink_end = tl.minimum(L, num_sink)
        recent_start = tl.maximum(sink_end, L - num_recent)
        mid = recent_start - sink_end
        n_free = n - sink_end - (L - recent_start)
        row = scores_ptr + bh * T
        # Largest thr with count(key >= thr) >= n_free, one bit at a time.
        thr = tl.zeros([], tl.int64)
        for i in range(0, 32):
            cand = thr | (tl.full([], 1, tl.int64) << (31 - i))
            cnt = tl.zeros([], tl.int64)
            for t0 in range(0, mid, BLOCK):
                offs = t0 + tl.arange(0, BLOCK)
                x = tl.load(row + sink_end + offs, mask=offs < mid, other=0.0)
                cnt += tl.sum(((order_key(x) >= cand) & (offs < mid)).to(tl.int64), axis=0)
            thr = tl.where(cnt >= n_free, cand, thr)
        thr = tl.where(n_free >= mid, -1, thr)                  # the whole middle is kept
        thr = tl.where(n_free <= 0, 4294967296, thr)            # nothing from the middle
        gt = tl.zeros([], tl.int64)
        for t0 in range(0, mid, BLOCK):
            offs = t0 + tl.arange(0, BLOCK)
            x = tl.load(row + sink_end + offs, mask=offs < mid, other=0.0)
            gt += tl.sum(((order_key(x) > thr) & (offs < mid)).to(tl.int64), axis=0)
        take_equal = n_free - gt
        out = idx_ptr + bh * kmax
        written = tl.zeros([], tl.int64)
        equal_seen = tl.zeros([], tl.int64)
        for t0 in range(0, L, BLOCK):
            t = t0 + tl.arange(0, BLOCK)
            x = tl.load(row + t, mask=t < L, other=0.0)
            key = order_key(x)
            in_mid = (t >= sink_end) & (t < recent_start)
            eq = in_mid & (key == thr)
            eq_rank = equal_seen + tl.cumsum(eq.to(tl.int64), axis=0) - 1
            keep = (t < L) & ((t < sink_end) | (t >= recent_start) | (in_mid & (key > thr))
                              | (eq & (eq_rank < take_equal)))
            slot = written + tl.cumsum(keep.to(tl.int64), axis=0) - 1
            tl.store(out + slot, t.to(tl.int64), mask=keep)
            written += tl.sum(keep.to(tl.int64), axis=0)
            equal_seen += tl.sum(eq.to(tl.int64), axis=0)
        for r0 in range(0, kmax, BLOCK):
            r = r0 + tl.arange(0, BLOCK)
            tl.store(out + r, tl.full([BLOCK], -1, tl.int64), mask=(r >= n) & (r < kmax))

    @triton.jit
    def _gather_kernel(src_ptr, dst_ptr, idx_ptr, T, kmax, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        n_tiles = tl.cdiv(kmax, BLOCK_R)
        bh = (tl.program_id(0) // n_tiles).to(tl.int64)
        rows = (tl.program_id(0) % n_tiles) * BLOCK_R + tl.arange(0, BLOCK_R)
        src_row = tl.load(idx_ptr + bh * kmax + rows, mask=rows < kmax, other=-1)
        for d0 in range(0, D, BLOCK_D):
            dims = d0 + tl.arange(0, BLOCK_D)
            x = tl.load(src_ptr + (bh * T + src_row)[:, None] * D + dims[None, :],
                        mask=(src_row >= 0)[:, None] & (dims < D)[None, :], other=0.0)
            tl.store(dst_ptr + (bh * kmax + rows)[:, None] * D + dims[None, :], x,
                     mask=(rows < kmax)[:, None] & (dims < D)[None, :])

    @triton.jit
    def _compact_kernel(buf_ptr, idx_ptr, T, kmax, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        n_tiles = tl.cdiv(D, BLOCK_D)
        bh = (tl.program_id(0) // n_tiles).to(tl.int64)
        dims = (tl.program_id(0) % n_tiles) * BLOCK_D + tl.arange(0, BLOCK_D)
        base = buf_ptr + bh * T * D
        for r0 in range(0, kmax, BLOCK_R):
            rows = (r0 + tl.arange(0, BLOCK_R)).to(tl.int64)
            src_row = tl.load(idx_ptr + bh * kmax + rows, mask=rows < kmax, other=-1)
            x = tl.load(base + src_row[:, None] * D + dims[None, :],
                        mask=(src_row >= 0)[:, None] & (dims < D)[None, :], other=0.0)
            tl.debug_barrier()  # every thread has read this block's sources before any writes
            tl.store(base + rows[:, None] * D + dims[None, :], x, mask=(rows < kmax)[:, None] & (dims < D)[None, :])
            tl.debug_barrier()


def _score_tiles(dtype, D: int, colsum: bool = False) -> dict:
    """BLOCK_M (query rows per tile), BLOCK_D (padded D), D_CHUNK (feature dims per dot step) and
    num_warps of the row-stats (colsum=False) and colsum kernels. 16-bit inputs hold the whole padded D
    in one tile. float32 takes the IEEE dot, whose operands live in registers: whole-D float32 tiles
    spilled 0.4-12 KB from D = 128 on (ptxas, sm_80/sm_90), so there D is walked in chunks of 64 over
    8 warps, and the colsum kernel, which also keeps its key tile and column sums live, takes 16 query
    rows per step: no spills at D = 128 or 256, with or without the JIT's 16-divisible sizes."""
    block_d = _pow2(D)
    if dtype == torch.float32 and block_d > 64:
        return dict(BLOCK_M=16 if colsum else _BLOCK_M, BLOCK_D=block_d, D_CHUNK=64, num_warps=8)
    return dict(BLOCK_M=_BLOCK_M, BLOCK_D=block_d, D_CHUNK=block_d, num_warps=4)


def _gather_tiles(D: int) -> dict:
    """Tiles of the out-of-place gather: 32 kept rows x up to 128 columns. Its per-element int64 source and
    destination addresses (no vector loads when D is not known to be 16-divisible) took 255 registers and
    spilled 32 B on sm_80 at 4 warps and 128 columns; 8 warps halve the tile per thread (166 registers)."""
    block_d = min(_pow2(D), 128)
    return dict(BLOCK_R=_BLOCK_ROWS, BLOCK_D=block_d, num_warps=8 if block_d == 128 else 4)


def _dot_mode(dtype):
    """(upcast tiles to float32, tl.dot input precision)."""
    if dtype == torch.float32:
        return False, "ieee"
    # bf16/f16 dots are broken or slow in the interpreter: widen there, native on GPUs.
    return _interpreting(), "ieee" if _interpreting() else "tf32"


def _colsum_grids(B: int, Hq: int, H: int, Tq: int, T: int):
    """(row-stats grid, colsum grid): (query head, row tile) and (KV head, key tile) on one axis."""
    return (flat_grid("attention_colsum", B * Hq, triton.cdiv(Tq, _BLOCK_M)),
            flat_grid("attention_colsum", B * H, triton.cdiv(T, _BLOCK_N)))


def _prune_grids(B: int, H: int, kmax: int, Dk: int, Dv: int):
    """(select, compact k, compact v, gather) grids of vatp_prune, checked before the first launch."""
    col_tiles = [triton.cdiv(D, min(_pow2(D), 128)) for D in (Dk, Dv)]
    return (flat_grid("vatp_prune", B * H), flat_grid("vatp_prune", B * H, col_tiles[0]),
            flat_grid("vatp_prune", B * H, col_tiles[1]),
            flat_grid("vatp_prune", B * H, triton.cdiv(kmax, _BLOCK_ROWS)))


def attention_colsum(q: torch.Tensor, k: torch.Tensor, seq_lens: torch.Tensor, causal: bool,
                     scale: float) -> torch.Tensor:
    """q [B, Hq, Tq, D], k [B, H, T, D] contiguous, same dtype; seq_lens int64 [B] -> float32 [B, H, T]."""
    B, Hq, Tq, D = q.shape
    H, T = k.shape[1], k.shape[2]
    out = torch.zeros((B, H, T), dtype=torch.float32, device=q.device)
    if B * H * T == 0 or Hq * Tq == 0:   # nothing to see, or nobody looking: zeros
        return out
    rowstats_grid, colsum_grid = _colsum_grids(B, Hq, H, Tq, T)
    stats = torch.empty((B, Hq, Tq, 2), dtype=torch.float32, device=q.device)
    upcast, precision = _dot_mode(q.dtype)
    row_tiles, col_tiles = _score_tiles(q.dtype, D), _score_tiles(q.dtype, D, colsum=True)
    qscale = float(scale) * _LOG2E
    with device_guard(q):
        _rowstats_kernel[rowstats_grid](
            q, k, seq_lens, stats, Hq, Tq, T, D, Hq // H, qscale, CAUSAL=bool(causal),
            BLOCK_N=_BLOCK_N, UPCAST=upcast, PRECISION=precision, **row_tiles)
        _colsum_kernel[colsum_grid](
            q, k, seq_lens, stats, out, Hq, H, Tq, T, D, Hq // H, qscale, CAUSAL=bool(causal),
            BLOCK_N=_BLOCK_N, UPCAST=upcast, PRECISION=precision, **col_tiles)
    return out


def value_l1(v: torch.Tensor) -> torch.Tensor:
    """v [B, H, T, D] contiguous -> float32 [B, H, T]."""
    B, H, T, D = v.shape
    out = torch.empty((B, H, T), dtype=torch.float32, device=v.device)
    rows = B * H * T
    if rows == 0:
        return out
    if D == 0:
        return out.zero_()
    with device_guard(v):
        _value_l1_kernel[flat_grid("value_l1", triton.cdiv(rows, _BLOCK_ROWS))](
            v, out, rows, D, BLOCK_R=_BLOCK_ROWS, BLOCK_D=min(_pow2(D), 128))
    return out


def prune(k: torch.Tensor, v: torch.Tensor, scores: torch.Tensor, seq_lens: torch.Tensor, kept_lens: torch.Tensor,
          num_sink: int, num_recent: int, kmax: int, inplace: bool, out_bufs=None):
    """k [B, H, T, Dk], v [B, H, T, Dv] contiguous; scores float32 [B, H, T] contiguous; seq_lens,
    kept_lens int64 [B] -> (k_kept, v_kept, kept_idx) as SPEC §3 (views of k and v when inplace).
    out_bufs: optional contiguous (k_out, v_out) [B, H, kmax, D] written instead of fresh tensors."""
    B, H, T = scores.shape
    idx = torch.empty((B, H, kmax), dtype=torch.int64, device=k.device)
    if B * H == 0 or kmax == 0:
        if inplace:
            return k[:, :, :kmax], v[:, :, :kmax], idx
        if out_bufs is not None:
            return out_bufs[0], out_bufs[1], idx
        return k.new_zeros((B, H, kmax, k.shape[3])), v.new_zeros((B, H, kmax, v.shape[3])), idx
    grids = _prune_grids(B, H, kmax, k.shape[3], v.shape[3])
    with device_guard(k):
        _select_kernel[grids[0]](scores, seq_lens, kept_lens, idx, H, T, kmax, num_sink, num_recent,
                                 BLOCK=_BLOCK_SEL)
        outs = []
        for i, x in enumerate((k, v)):
            D = x.shape[3]
            BD = min(_pow2(D), 128)
            if inplace:
                if D:
                    _compact_kernel[grids[1 + i]](x, idx, T, kmax, D, BLOCK_R=_BLOCK_ROWS, BLOCK_D=BD)
                outs.append(x[:, :, :kmax])
            else:
                y = torch.empty((B, H, kmax, D), dtype=x.dtype, device=x.device) if out_bufs is None else out_bufs[i]
                if D:
                    _gather_kernel[grids[3]](x, y, idx, T, kmax, D, **_gather_tiles(D))
                outs.append(y)
    return outs[0], outs[1], idx
