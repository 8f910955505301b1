"""int8-document MaxSim reference: the definition, in exact integer and float64 arithmetic.

Documents: per-token symmetric scale s_j = max|d_j| / 127, codes c_j = round(d_j / s_j) in
[-127, 127] (a zero row has scale 0 and codes 0).
Queries are quantised per call the same way, to 7 bits: scale max|q_i| / 63, codes in [-63, 63]
(so that the CPU kernel's unsigned x signed byte products can never saturate; see
csrc/cpu/simd/maxsim_int8_kernel.inc).

score[b, n] = sum over valid i of qs[b, i] * max over tokens j of doc n of (s_j * <qc[b, i], c_j>)
"""
from __future__ import annotations

import numpy as np

DOC_LEVELS = 127
QUERY_LEVELS = 63


def quantize_rows(x: np.ndarray, levels: int):
    """x float [..., D] -> (codes int8 [..., D], scales float32 [...]): symmetric, one scale per row,
    round half to even."""
    x = np.asarray(x, dtype=np.float32)
    amax = np.max(np.abs(x), axis=-1) if x.shape[-1] else np.zeros(x.shape[:-1], np.float32)
    scales = (amax / np.float32(levels)).astype(np.float32)
    safe = np.where(scales > 0, scales, np.float32(1)).astype(np.float64)
    codes = np.rint(x.astype(np.float64) / safe[..., None])
    codes = np.clip(codes, -levels, levels).astype(np.int8)
    return codes, scales


def maxsim_int8_scores(q_codes: np.ndarray, q_scales: np.ndarray, query_lengths: np.ndarray,
                       codes: np.ndarray, scales: np.ndarray, doc_offsets: np.ndarray) -> np.ndarray:
    """q_codes int8 [B, Lq, D], q_scales [B, Lq], query_lengths [B], codes int8 [T, D], scales [T],
    doc_offsets [N+1] -> float32 [B, N]. Empty documents score -inf."""
    B, Lq, D = q_codes.shape
    offsets = np.asarray(doc_offsets, dtype=np.int64)
    N = len(offsets) - 1
    qc = q_codes.reshape(B * Lq, D).astype(np.float64)       # small integers: float64 products are exact
    qs = np.asarray(q_scales, np.float64).reshape(B, Lq)
    valid = np.arange(Lq)[None, :] < np.asarray(query_lengths)[:, None]
    out = np.full((B, N), -np.inf)
    per_group = max(1, (1 << 22) // max(1, B * Lq))
    start = 0
    while start < N:
        stop = int(np.searchsorted(offsets, offsets[start] + per_group, side="right")) - 1
        stop = min(N, max(stop, start + 1))
        lo, hi = offsets[start], offsets[stop]
        starts = offsets[start:stop] - lo
        nonempty = np.nonzero(offsets[start + 1:stop + 1] > offsets[start:stop])[0]
        if len(nonempty):
            dots = qc @ codes[lo:hi].astype(np.float64).T                     # exact integers
            sims = dots * np.asarray(scales[lo:hi], np.float64)[None, :]
            best = np.maximum.reduceat(sims, starts[nonempty], axis=1).reshape(B, Lq, len(nonempty))
            out[:, start + nonempty] = np.where(valid[:, :, None], qs[:, :, None] * best, 0.0).sum(axis=1)
        start = stop
    return out.astype(np.float32)
