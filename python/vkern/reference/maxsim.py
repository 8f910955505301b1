"""MaxSim reference (SPEC §1), in float64 on the host.

score[b, n] = sum over i < query_lengths[b] of max over tokens j of doc n of <q[b, i], d_j>
"""
from __future__ import annotations

import numpy as np


def maxsim_scores(queries: np.ndarray, query_lengths: np.ndarray, docs: np.ndarray,
                  doc_offsets: np.ndarray) -> np.ndarray:
    """queries [B, Lq, D], query_lengths [B], docs [T, D], doc_offsets [N+1] -> float32 [B, N].

    An empty document scores -inf; NaN propagates as np.max does; masked query
    tokens (i >= query_lengths[b]) add nothing, whatever their values.
    """
    q = np.asarray(queries, dtype=np.float64)
    d = np.asarray(docs, dtype=np.float64)
    B, Lq, _ = q.shape
    N = len(doc_offsets) - 1
    valid = np.arange(Lq)[None, :] < np.asarray(query_lengths)[:, None]  # [B, Lq]
    out = np.empty((B, N), dtype=np.float64)
    for n in range(N):
        seg = d[doc_offsets[n]:doc_offsets[n + 1]]
        if len(seg) == 0:
            out[:, n] = -np.inf
            continue
        best = (q @ seg.T).max(axis=2)  # [B, Lq]
        out[:, n] = np.where(valid, best, 0.0).sum(axis=1)
    return out.astype(np.float32)


def topk(scores: np.ndarray, k: int):
    """Best k per row of scores [B, N]: higher first, NaN last, ties to the lower index.
    Returns (values [B, min(k, N)], indices int64 [B, min(k, N)])."""
    B, N = scores.shape
    k = min(k, N)
    idx = np.empty((B, k), dtype=np.int64)
    for b in range(B):
        s = scores[b].astype(np.float64)
        nan = np.isnan(s)
        # lexsort: last key is primary. NaN last, then by descending score, then by index.
        order = np.lexsort((np.arange(N), -np.where(nan, 0.0, s), nan))
        idx[b] = order[:k]
    return np.take_along_axis(scores, idx, axis=1), idx
