"""Triton kernels for quantized task vectors (SPEC §4): dequantize,
apply_task_vectors (sum / ties, optional trim) and delta_linear.

Every task vector is one or two components (an RTVQ residual is its shared
base plus its offset). The launcher gathers the components' codes, scales and
zero points into three flat pools plus an int64 table of offsets and formats,
so one kernel launch reads any mix of formats: each program decodes its tile
of every component straight from the bit streams (element k of a row lives in
bits [k*bits, (k+1)*bits), LSB first), so no dense task vector is ever written.
The pools cost one device copy of the codes per call (codes are 1/4 to 1/32 of
the base's bytes).

The package wrapper validates everything; this module trusts its inputs.
"""
from __future__ import annotations

import os
from typing import List, Sequence

import torch

from ._common import IMPORT_ERROR as _IMPORT_ERROR
from ._common import device_guard, flat_grid, tl, triton

__all__ = ["Pools", "pools", "dequantize", "apply", "delta_linear", "is_available"]

_META = 9  # codes_off, scales_off, zeros_off, scheme, bits, row_bytes, scale_row_stride, group_size, task


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def is_available():
    if triton is None:
        return False, _IMPORT_ERROR
    if _interpreting() or torch.cuda.is_available():
        return True, ""
    return False, "no CUDA device (set TRITON_INTERPRET=1 to run the Triton interpreter on CPU)"


class Pools:
    """Flat device pools of the components of a list of task vectors."""

    def __init__(self, codes, scales, zeros, meta, coef, task_start, C, T):
        self.codes, self.scales, self.zeros, self.meta, self.coef = codes, scales, zeros, meta, coef
        self.task_start, self.C, self.T = task_start, C, T


def pools(qtvs: Sequence, coeffs: Sequence[float], device, share_bases: bool) -> Pools:
    """Components of qtvs (residual: base, then offset) in task order; with
    share_bases a base shared by several residuals is one component whose
    coefficient is the sum of theirs (plain sums only)."""
    codes: List[torch.Tensor] = []
    scales: List[torch.Tensor] = []
    zeros: List[torch.Tensor] = []
    rows: List[List[int]] = []
    coef: List[float] = []
    task_start = [0]
    offs = [0, 0, 0]
    seen = {}

    def t_of(a):
        return a if isinstance(a, torch.Tensor) else torch.from_numpy(a)

    def add(q, task, c):
        cd, sc = t_of(q.codes).reshape(-1), t_of(q.scales).reshape(-1)
        zp = t_of(q.zero_points).reshape(-1) if q.zero_points is not None else None
        rows.append([offs[0], offs[1], offs[2], 0 if q.scheme == "affine" else 1, q.bits, q.row_bytes,
                     q.n_groups if q.per_row else 0, q.group_size, task])
        coef.append(c)
        codes.append(cd)
        scales.append(sc)
        offs[0] += cd.numel()
        offs[1] += sc.numel()
        if zp is not None:
            zeros.append(zp)
            offs[2] += zp.numel()

    for t, q in enumerate(qtvs):
        c = float(coeffs[t])
        if q.base is not None:
            if share_bases and id(q.base) in seen:
                coef[seen[id(q.base)]] += c
            else:
                seen[id(q.base)] = len(rows)
                add(q.base, t, c)
        add(q, t, c)
        task_start.append(len(rows))
    dev = torch.device(device)
    cat = lambda xs, dt: (torch.cat([x.to(dev) for x in xs]) if xs else torch.zeros(1, dtype=dt, device=dev))  # noqa: E731
    return Pools(cat(codes, torch.uint8), cat(scales, torch.float32), cat(zeros, torch.uint8),
                 torch.tensor(rows if rows else [[0] * _META], dtype=torch.int64, device=dev).reshape(-1),
                 torch.tensor(coef if coef else [0.0], dtype=torch.float32, device=dev),
                 torch.tensor(task_start, dtype=torch.int32, device=dev), len(rows), len(qtvs))


if triton is not None:

    @triton.jit
    def _decode(codes, scales, zeros, meta, c, rows, cols, mask):
        """float32 tile of component c at rows[:, None], cols[None, :] (exact: (code - zero) * scale)."""
        codes_off = tl.load(meta + c * 9 + 0)
        scales_off = tl.load(meta + c * 9 + 1)
        zeros_off = tl.load(meta + c * 9 + 2)
        scheme = tl.load(meta + c * 9 + 3)
        bits = tl.load(meta + c * 9 + 4)
        row_bytes = tl.load(meta + c * 9 + 5)
        srow = tl.load(meta + c * 9 + 6)
        gsize = tl.load(meta + c * 9 + 7)
        r = rows[:, None].to(tl.int64)
        k = cols[None, :].to(tl.int64)
        bitpos = k * bits
        byte = codes_off + r * row_bytes + bitpos // 8
        sh = (bitpos % 8).to(tl.int32)
        lo = tl.load(codes + byte, mask=mask, other=0).to(tl.int32)
        hi = tl.load(codes + byte + 1, mask=mask & (sh + bits > 8), other=0).to(tl.int32)
        code = ((lo | (hi << 8)) >> sh) & ((1 << bits.to(tl.int32)) - 1)
        sidx = r * srow + k // gsize
        s = tl.load(scales + scales_off + sidx, mask=mask, other=0.0)
        affine_el = (sidx * 0 + scheme) == 0    # a tensor, so the mask stays a tensor of bools
        z = tl.load(zeros + zeros_off + sidx, mask=mask & affine_el, other=0).to(tl.int32)
        affine = (code - z).to(tl.float32) * s
        sign = tl.where(code != 0, s, -s)
        return tl.where(scheme == 0, affine, sign)

    @triton.jit
    def _task_value(codes, scales, zeros, meta, task_start, t, rows, cols, mask, thr, cut, flat, TRIM: tl.constexpr):
        c0 = tl.load(task_start + t)
        c1 = tl.load(task_start + t + 1)
        v = tl.zeros(mask.shape, dtype=tl.float32)
        for c in range(c0, c1):
            v = v + _decode(codes, scales, zeros, meta, c, rows, cols, mask)
        if TRIM:
            th = tl.load(thr + t)
            ct = tl.load(cut + t)
            a = tl.abs(v)
            v = tl.where((a > th) | ((a == th) & (flat <= ct)), v, 0.0)
        return v

    @triton.jit
    def _apply_kernel(base, out, N, K, codes, scales, zeros, meta, coef, task_start, task_coef, thr, cut, C, T,
                      METHOD: tl.constexpr, TRIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        k_tiles = tl.cdiv(K, BLOCK_K)   # one grid axis: (row tile, column tile), see _tile_grid
        pid_n = tl.program_id(0) // k_tiles
        pid_k = tl.program_id(0) % k_tiles
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        mask = (rows[:, None] < N) & (cols[None, :] < K)
        flat = rows[:, None].to(tl.int64) * K + cols[None, :]
        acc = tl.load(base + flat, mask=mask, other=0.0).to(tl.float32)
        if METHOD == 0:
            if TRIM:
                for t in range(0, T):
                    v = _task_value(codes, scales, zeros, meta, task_start, t, rows, cols, mask, thr, cut, flat, TRIM)
                    acc += tl.load(task_coef + t) * v
            else:
                for c in range(0, C):
                    acc += tl.load(coef + c) * _decode(codes, scales, zeros, meta, c, rows, cols, mask)
        else:
            # TIES: elect the sign from the weighted sum, then average the agreeing weights.
            total = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
            for t in range(0, T):
                v = _task_value(codes, scales, zeros, meta, task_start, t, rows, cols, mask, thr, cut, flat, TRIM)
                total += tl.load(task_coef + t) * v
            positive = total >= 0.0
            num = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
            den = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
            for t in range(0, T):
                v = _task_value(codes, scales, zeros, meta, task_start, t, rows, cols, mask, thr, cut, flat, TRIM)
                ct = tl.load(task_coef + t)
                w = ct * v
                agree = tl.where(positive, w > 0.0, w < 0.0)
                num += tl.where(agree, w, 0.0)
                den += tl.where(agree, ct, 0.0)
            acc += num / tl.where(den == 0.0, 1.0, den)
        tl.store(out + flat, acc.to(out.dtype.element_ty), mask=mask)

    @triton.jit
    def _dequant_kernel(out, N, K, codes, scales, zeros, meta, C, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        k_tiles = tl.cdiv(K, BLOCK_K)
        rows = (tl.program_id(0) // k_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = (tl.program_id(0) % k_tiles) * BLOCK_K + tl.arange(0, BLOCK_K)
        mask = (rows[:, None] < N) & (cols[None, :] < K)
        v = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for c in range(0, C):
            v = v + _decode(codes, scales, zeros, meta, c, rows, cols, mask)
        tl.store(out + rows[:, None].to(tl.int64) * K + cols[None, :], v, mask=mask)

    @triton.jit
    def _delta_kernel(x, base, y, M, N, K, codes, scales, zeros, meta, coef, task_start, task_coef, ids, C, T,
                      MERGED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        n_tiles = tl.cdiv(N, BLOCK_N)   # one grid axis: (row tile of x, output column tile)
        rm = (tl.program_id(0) // n_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = (tl.program_id(0) % n_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rm < M
        if MERGED:
            tid = tl.zeros((BLOCK_M,), dtype=tl.int64)
        else:
            tid = tl.load(ids + rm, mask=row_ok, other=-1)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            xm = row_ok[:, None] & (rk[None, :] < K)
            xt = tl.load(x + rm[:, None].to(tl.int64) * K + rk[None, :], mask=xm, other=0.0).to(tl.float32)
            wmask = (rn[:, None] < N) & (rk[None, :] < K)
            w = tl.load(base + rn[:, None].to(tl.int64) * K + rk[None, :], mask=wmask, other=0.0).to(tl.float32)
            if MERGED:
                for c in range(0, C):
                    w += tl.load(coef + c) * _decode(codes, scales, zeros, meta, c, rn, rk, wmask)
                acc += tl.dot(xt, tl.trans(w), input_precision="ieee")
            else:
                acc += tl.dot(xt, tl.trans(w), input_precision="ieee")
                for t in range(0, T):
                    if tl.sum((tid == t).to(tl.int32)) > 0:
                        c0 = tl.load(task_start + t)
                        c1 = tl.load(task_start + t + 1)
                        d = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
                        for c in range(c0, c1):
                            d += _decode(codes, scales, zeros, meta, c, rn, rk, wmask)
                        xs = tl.where((tid == t)[:, None], xt, 0.0) * tl.load(task_coef + t)
                        acc += tl.dot(xs, tl.trans(d), input_precision="ieee")
        tl.store(y + rm[:, None].to(tl.int64) * N + rn[None, :], acc, mask=row_ok[:, None] & (rn[None, :] < N))


_BLOCK = (16, 64)        # rows x columns per program for the elementwise kernels
_DOT = (16, 32, 32)      # M x N x K tile of delta_linear (tl.dot needs >= 16)


def _tile_grid(what: str, N: int, K: int) -> tuple:
    """Grid of the elementwise kernels over an [N, K] matrix: (row tile, column tile) on one axis."""
    return flat_grid(what, triton.cdiv(N, _BLOCK[0]), triton.cdiv(K, _BLOCK[1]))


def _delta_grid(M: int, N: int) -> tuple:
    return flat_grid("delta_linear", triton.cdiv(M, _DOT[0]), triton.cdiv(N, _DOT[1]))


def dequantize(p: Pools, N: int, K: int) -> torch.Tensor:
    out = torch.empty((N, K), dtype=torch.float32, device=p.codes.device)
    if N and K:
        grid = _tile_grid("dequantize", N, K)
        with device_guard(out):
            _dequant_kernel[grid](out, N, K, p.codes, p.scales, p.zeros, p.meta, p.C,
                                  BLOCK_N=_BLOCK[0], BLOCK_K=_BLOCK[1])
    return out


def apply(base: torch.Tensor, out: torch.Tensor, p: Pools, task_coef: torch.Tensor, method: int,
          thr=None, cut=None) -> torch.Tensor:
    """out = merge of base (contiguous [N, K]) and the pooled task vectors; out may be base."""
    N, K = base.shape
    if N and K:
        trim = thr is not None
        dummy_f = task_coef if not trim else thr
        dummy_i = p.meta if not trim else cut
        grid = _tile_grid("apply_task_vectors", N, K)
        with device_guard(base):
            _apply_kernel[grid](base, out, N, K, p.codes, p.scales, p.zeros, p.meta, p.coef, p.task_start,
                                task_coef, dummy_f, dummy_i, p.C, p.T, METHOD=method, TRIM=trim,
                                BLOCK_N=_BLOCK[0], BLOCK_K=_BLOCK[1])
    return out


def delta_linear(x: torch.Tensor, base: torch.Tensor, p: Pools, task_coef: torch.Tensor, ids) -> torch.Tensor:
    """y float32 [M, N] from contiguous x [M, K], base [N, K]; ids int64 [M] or None (merged)."""
    M, K = x.shape
    N = base.shape[0]
    y = torch.empty((M, N), dtype=torch.float32, device=x.device)
    if M and N:
        grid = _delta_grid(M, N)
        with device_guard(x):
            _delta_kernel[grid](x, base, y, M, N, K, p.codes, p.scales, p.zeros, p.meta, p.coef, p.task_start,
                                task_coef, ids if ids is not None else p.meta, p.C, p.T, MERGED=ids is None,
                                BLOCK_M=_DOT[0], BLOCK_N=_DOT[1], BLOCK_K=_DOT[2])
    elif M:
        y.zero_()
    return y
