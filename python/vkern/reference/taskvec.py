"""Quantized task vectors, NumPy reference (SPEC §4): the quantizer, bit packing,
dequantization, task arithmetic / TIES merging and the delta linear layer.

Everything is plain NumPy; merges and products are evaluated in float64.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np


# ------------------------------------------------------------------ packing

def pack_codes(q: np.ndarray, bits: int) -> np.ndarray:
    """uint codes [N, K] (each < 2**bits) -> uint8 [N, ceil(K*bits/8)], each row a
    little-endian bit stream (element k at bits [k*bits, (k+1)*bits))."""
    N, K = q.shape
    planes = ((q[:, :, None].astype(np.uint8) >> np.arange(bits, dtype=np.uint8)) & 1).reshape(N, K * bits)
    return np.packbits(planes, axis=1, bitorder="little")


def unpack_codes(codes: np.ndarray, bits: int, K: int) -> np.ndarray:
    """Inverse of pack_codes: uint8 [N, row_bytes] -> int16 codes [N, K]."""
    N = codes.shape[0]
    if bits == 8:
        return codes[:, :K].astype(np.int16)
    if bits in (1, 2, 4):
        per = 8 // bits
        shifts = (np.arange(per, dtype=np.uint8) * bits)
        q = (codes[:, :, None] >> shifts) & ((1 << bits) - 1)
        return q.reshape(N, codes.shape[1] * per)[:, :K].astype(np.int16)   # N may be 0
    planes = np.unpackbits(codes, axis=1, bitorder="little")[:, :K * bits].reshape(N, K, bits)
    return (planes.astype(np.int16) << np.arange(bits, dtype=np.int16)).sum(axis=2, dtype=np.int16)


# ---------------------------------------------------------------- quantizer

def _groups(tau: np.ndarray, granularity: str, g: Optional[int]) -> Tuple[np.ndarray, int]:
    """tau [N, K] -> (zero-padded view [S, G, gs], gs): S=1 for a tensor, N otherwise."""
    N, K = tau.shape
    if granularity == "tensor":
        return tau.reshape(1, 1, N * K), K
    if granularity == "row":
        return tau.reshape(N, 1, K), K
    G = -(-K // g)
    padded = np.zeros((N, G * g), dtype=tau.dtype)
    padded[:, :K] = tau
    return padded.reshape(N, G, g), g


def _expand(per_group: np.ndarray, N: int, K: int, gs: int) -> np.ndarray:
    """[S, G] -> [N, K]: each element's group value."""
    cols = np.arange(K) // gs
    rows = per_group if per_group.shape[0] == N else np.broadcast_to(per_group, (N, per_group.shape[1]))
    return rows[:, cols]


def quantize(tau: np.ndarray, bits: int, granularity: str, g: Optional[int], scheme: str):
    """float32 tau [N, K] (finite) -> (codes uint8, scales float32 [S, G], zero_points uint8 or None, group_size)."""
    N, K = tau.shape
    grouped, gs = _groups(tau, granularity, g)
    if scheme == "sign":
        counts = np.full(grouped.shape[1], gs, dtype=np.float64)
        if granularity == "group" and K % gs:
            counts[-1] = K % gs
        if granularity == "tensor":
            counts[:] = max(N * K, 1)                                   # an empty tensor: scale 0
        scales = (np.abs(grouped.astype(np.float64)).sum(axis=2) / counts).astype(np.float32)
        q = (tau >= 0).astype(np.uint8)
        return pack_codes(q, 1), scales, None, gs
    levels = (1 << bits) - 1
    lo = grouped.min(axis=2, initial=0.0).astype(np.float64)      # the grid always holds 0 (and an
    hi = grouped.max(axis=2, initial=0.0).astype(np.float64)      # empty tensor gets step 0)
    exact = (hi - lo) / levels
    step = exact.astype(np.float32)
    low = step.astype(np.float64) < exact                         # round the step up so the grid spans [lo, hi]
    step[low] = np.nextafter(step[low], np.float32(np.inf))
    step64 = step.astype(np.float64)
    safe = np.where(step64 > 0, step64, 1.0)
    zero = np.clip(np.rint(-lo / safe), 0, levels)
    zero[step64 == 0] = 0
    s_el = _expand(safe, N, K, gs)
    z_el = _expand(zero, N, K, gs)
    q = np.clip(np.rint(tau.astype(np.float64) / s_el) + z_el, 0, levels)
    q[_expand(step64 == 0, N, K, gs)] = 0
    return pack_codes(q.astype(np.uint8), bits), step, zero.astype(np.uint8), gs


# -------------------------------------------------------------- dequantizer

def dequantize(qtv) -> np.ndarray:
    """float32 [N, K]: affine (code - zero) * scale; sign +-scale; residual base + offset."""
    N, K = qtv.shape
    codes = np.asarray(qtv.codes)
    q = unpack_codes(codes, qtv.bits, K)
    scales = _expand(np.asarray(qtv.scales), N, K, qtv.group_size)
    if qtv.scheme == "sign":
        out = np.where(q != 0, scales, -scales).astype(np.float32)
    else:
        zeros = _expand(np.asarray(qtv.zero_points).astype(np.int16), N, K, qtv.group_size)
        out = (q - zeros).astype(np.float32) * scales
    if qtv.base is not None:
        out = dequantize(qtv.base) + out
    return out


# ------------------------------------------------------------------ merging

def trim_keep(values: np.ndarray, density: float) -> np.ndarray:
    """TIES trim: bool mask keeping the k = int(density * numel) entries of largest
    |value|, ties to the lower flat index."""
    flat = np.abs(values.reshape(-1))
    k = int(density * flat.size)
    order = np.argsort(-flat, kind="stable")
    keep = np.zeros(flat.size, dtype=bool)
    keep[order[:k]] = True
    return keep.reshape(values.shape)


def trim_threshold(absvals: np.ndarray, k: int) -> Tuple[float, int]:
    """(threshold, cut) such that flat entry i is kept iff |v_i| > threshold, or
    |v_i| == threshold and i <= cut: the same set as trim_keep, found in O(n)."""
    flat = absvals.reshape(-1)
    n = flat.size
    if k <= 0:
        return float("inf"), -1
    if k >= n:
        return -1.0, -1
    thr = np.partition(flat, n - k)[n - k]           # the k-th largest
    greater = int(np.count_nonzero(flat > thr))
    ties = np.flatnonzero(flat == thr)
    return float(thr), int(ties[k - greater - 1])


def apply_task_vectors(base: np.ndarray, qtvs: Sequence, coeffs: Sequence[float], method: str = "sum",
                       density: Optional[float] = None) -> np.ndarray:
    """float64 W = base + merge of coeffs[t] * dequant(qtv_t) (caller casts to base's dtype).

    sum: sum_t c_t tau_t. ties (mergekit): w_t = c_t tau_t; sign = + where sum_t w_t >= 0;
    task t agrees where sign(w_t) equals it (zeros never agree); merged =
    sum of agreeing w_t / sum of agreeing c_t (0 -> 1). density trims each tau_t first.
    """
    W = np.asarray(base, dtype=np.float64)
    taus: List[np.ndarray] = []
    for q in qtvs:
        tau = dequantize(q)
        if density is not None:
            tau = np.where(trim_keep(tau, density), tau, np.float32(0))
        taus.append(tau.astype(np.float64))
    c = np.asarray(coeffs, dtype=np.float64)
    if not taus:
        return W.copy()
    if method == "sum":
        return W + sum(c[t] * taus[t] for t in range(len(taus)))
    w = np.stack([c[t] * taus[t] for t in range(len(taus))])          # [T, N, K]
    positive = w.sum(axis=0) >= 0
    agree = np.where(positive, w > 0, w < 0)
    num = np.where(agree, w, 0.0).sum(axis=0)
    den = np.where(agree, c[:, None, None], 0.0).sum(axis=0)
    den[den == 0] = 1.0
    return W + num / den


def delta_linear(x: np.ndarray, base: np.ndarray, qtvs: Sequence, coeffs: Optional[Sequence[float]],
                 task_ids: Optional[np.ndarray]) -> np.ndarray:
    """float64 y [M, N] = x @ base^T + sum_t c_t x @ dequant(qtv_t)^T; with task_ids,
    row m adds only task task_ids[m] (times its coefficient, 1 by default; -1 = none)."""
    x64 = np.asarray(x, dtype=np.float64)
    y = x64 @ np.asarray(base, dtype=np.float64).T
    T = len(qtvs)
    c = np.ones(T) if coeffs is None else np.asarray(coeffs, dtype=np.float64)
    for t, q in enumerate(qtvs):
        rows = slice(None) if task_ids is None else np.flatnonzero(np.asarray(task_ids) == t)
        if task_ids is not None and len(rows) == 0:
            continue
        y[rows] += c[t] * (x64[rows] @ dequantize(q).astype(np.float64).T)
    return y
