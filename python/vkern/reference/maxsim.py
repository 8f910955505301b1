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


def maxsim_argmax(queries: np.ndarray, query_lengths: np.ndarray, docs: np.ndarray,
                  doc_offsets: np.ndarray):
    """Scores as ``maxsim_scores`` plus, per (query b, document n, query token i), the token of
    document n (index within it) holding the max: int32 ``[B, N, Lq]``, the lower index on ties,
    -1 for masked query tokens and empty documents. The backward of MaxSim needs only this."""
    q = np.asarray(queries, dtype=np.float64)
    d = np.asarray(docs, dtype=np.float64)
    B, Lq, D = q.shape
    offsets = np.asarray(doc_offsets, dtype=np.int64)
    N = len(offsets) - 1
    valid = np.arange(Lq)[None, :] < np.asarray(query_lengths)[:, None]   # [B, Lq]
    scores = np.full((B, N), -np.inf)
    arg = np.full((B, N, Lq), -1, dtype=np.int32)
    q_rows = q.reshape(B * Lq, D)
    for n in range(N):
        lo, hi = offsets[n], offsets[n + 1]
        if hi == lo:
            continue
        sims = (q_rows @ d[lo:hi].T).reshape(B, Lq, hi - lo)
        best = sims.max(axis=2)                                   # NaN propagates, as np.max does
        scores[:, n] = np.where(valid, best, 0.0).sum(axis=1)
        arg[:, n, :] = np.where(valid, np.argmax(sims, axis=2), -1)  # first maximum: the lower index
    return scores.astype(np.float32), arg


def maxsim_backward(grad: np.ndarray, argmax: np.ndarray, queries: np.ndarray, docs: np.ndarray,
                    doc_offsets: np.ndarray):
    """Gradients of sum(grad * scores) from the forward's argmax, in float64 (returned float32):
    grad_q[b, i] = sum_n grad[b, n] * d_n[argmax[b, n, i]], and grad_d gets grad[b, n] * q[b, i]
    added at row argmax[b, n, i] of document n. -> (grad_q [B, Lq, D], grad_d [T, D])."""
    g = np.asarray(grad, dtype=np.float64)
    q = np.asarray(queries, dtype=np.float64)
    d = np.asarray(docs, dtype=np.float64)
    offsets = np.asarray(doc_offsets, dtype=np.int64)
    arg = np.asarray(argmax, dtype=np.int64)
    B, N, Lq = arg.shape
    grad_q = np.zeros(q.shape)
    grad_d = np.zeros(d.shape)
    for b in range(B):
        nn, ii = np.nonzero(arg[b] >= 0)                          # the (document, query token) pairs that count
        rows = offsets[nn] + arg[b, nn, ii]
        w = g[b, nn][:, None]
        np.add.at(grad_q[b], ii, w * d[rows])
        np.add.at(grad_d, rows, w * q[b, ii])
    return grad_q.astype(np.float32), grad_d.astype(np.float32)
