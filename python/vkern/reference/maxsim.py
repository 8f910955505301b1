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
    B, Lq, D = q.shape
    offsets = np.asarray(doc_offsets, dtype=np.int64)
    N = len(offsets) - 1
    valid = np.arange(Lq)[None, :] < np.asarray(query_lengths)[:, None]  # [B, Lq]
    out = np.full((B, N), -np.inf)                                       # empty documents stay -inf
    q_rows = q.reshape(B * Lq, D)
    # Documents in groups of about 2**22 similarity entries, so memory stays bounded.
    per_group = max(1, (1 << 22) // max(1, B * Lq))
    start = 0
    while start < N:
        stop = int(np.searchsorted(offsets, offsets[start] + per_group, side="right")) - 1
        stop = min(N, max(stop, start + 1))
        lo = offsets[start]
        starts = offsets[start:stop] - lo
        nonempty = np.nonzero(offsets[start + 1:stop + 1] > offsets[start:stop])[0]
        if len(nonempty):
            sims = q_rows @ d[lo:offsets[stop]].T                             # [B*Lq, tokens]
            best = np.maximum.reduceat(sims, starts[nonempty], axis=1)      # max per document (NaN propagates)
            best = best.reshape(B, Lq, len(nonempty))
            out[:, start + nonempty] = np.where(valid[:, :, None], best, 0.0).sum(axis=1)
        start = stop
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
