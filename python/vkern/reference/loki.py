"""Loki reference (SPEC §2), in float64 on the host: the readable definition.

Offline, a PCA basis per KV head; at decode, approximate scores from the
first `rank` rotated dimensions choose the kept tokens (sinks and recent
always kept), and exact attention runs over those only.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np


def pca(keys: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """keys [N, H, D] -> (P [H, D, D], explained [H, D], mean [H, D]), float64.

    Columns of P[h] are the principal directions of head h's centred keys, by
    descending variance; each column's largest-magnitude entry is made
    positive so the basis is reproducible. explained[h, i] is the fraction of
    the total variance in the first i + 1 directions (1.0 throughout for a
    head with no variance).
    """
    x = np.asarray(keys, dtype=np.float64)
    N, H, D = x.shape
    mean = x.mean(axis=0)                                  # [H, D]
    P = np.empty((H, D, D))
    explained = np.empty((H, D))
    for h in range(H):
        c = x[:, h, :] - mean[h]
        cov = c.T @ c / max(N - 1, 1)
        w, v = np.linalg.eigh(cov)                         # ascending
        order = np.argsort(-w, kind="stable")
        w, v = np.clip(w[order], 0.0, None), v[:, order]
        flip = np.sign(v[np.argmax(np.abs(v), axis=0), np.arange(D)])
        v = v * np.where(flip == 0, 1.0, flip)
        P[h] = v
        total = w.sum()
        explained[h] = np.cumsum(w) / total if total > 0 else np.ones(D)
        explained[h, -1] = 1.0
    return P, explained, mean


def rotate(x: np.ndarray, P: np.ndarray) -> np.ndarray:
    """x [..., H, D] with H a multiple of H_kv = P.shape[0] -> float64 x[..., h, :] @ P[h // (H / H_kv)]."""
    x = np.asarray(x, dtype=np.float64)
    H, H_kv = x.shape[-2], P.shape[0]
    Pe = np.repeat(np.asarray(P, np.float64), H // H_kv, axis=0)   # [H, D, D]
    return np.einsum("...hd,hde->...he", x, Pe)


def resolve_budget(topk, seq_len: int) -> int:
    """Tokens kept for one sequence: topk (int) or ceil(topk * seq_len) (float), at most seq_len."""
    if isinstance(topk, (float, np.floating)):
        k = int(np.ceil(float(topk) * seq_len - 1e-9))
    else:
        k = int(topk)
    return max(0, min(k, seq_len))


def select(approx: np.ndarray, seq_len: int, budget: int, num_sink: int, num_recent: int) -> np.ndarray:
    """Kept positions (int64, ascending) of one sequence from approximate scores [>= seq_len].

    The first num_sink and last num_recent positions always; the rest of the
    budget to the highest scores, ties to the lower index, NaN last.
    """
    L = seq_len
    if budget >= L:
        return np.arange(L, dtype=np.int64)
    lo, hi = min(num_sink, L), max(min(num_sink, L), L - num_recent)
    forced = np.concatenate([np.arange(lo), np.arange(hi, L)]).astype(np.int64)
    rest = budget - len(forced)
    s = np.asarray(approx[lo:hi], dtype=np.float64)
    nan = np.isnan(s)
    order = np.lexsort((np.arange(len(s)), -np.where(nan, 0.0, s), nan))  # primary: NaN last
    chosen = order[:max(rest, 0)] + lo
    return np.sort(np.concatenate([forced, chosen]))


def attend(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float) -> np.ndarray:
    """Exact attention of one query row q [D] over rows k, v [n, D], float64."""
    with np.errstate(invalid="ignore", over="ignore"):   # non-finite scores: IEEE, as written
        s = (k @ q) * scale
        m = np.max(s)
        p = np.exp(s - m)
        return (p / p.sum()) @ v


def loki_attention(q, k_cache, v_cache, seq_lens, rank: int, topk, num_sink: int, num_recent: int,
                   gqa: str, scale: float, k_prefix=None):
    """q [B, Hq, D], k_cache/v_cache [B, H_kv, T, D], seq_lens int [B] (each in [1, T]).
    k_prefix: optional [B, H_kv, T, >= rank]; the approximate scores read it instead of k_cache.

    Returns (out float64 [B, Hq, D], kept int64 [B, Hq, K] ascending, -1 padded),
    K = the largest resolved budget over the batch.
    """
    q = np.asarray(q, dtype=np.float64)
    k_cache = np.asarray(k_cache, dtype=np.float64)
    v_cache = np.asarray(v_cache, dtype=np.float64)
    B, Hq, D = q.shape
    H_kv = k_cache.shape[1]
    G = Hq // H_kv
    budgets = [resolve_budget(topk, int(seq_lens[b])) for b in range(B)]
    K = max(budgets) if budgets else 0
    out = np.zeros((B, Hq, D))
    kept = np.full((B, Hq, K), -1, dtype=np.int64)
    for b in range(B):
        L = int(seq_lens[b])
        for kv in range(H_kv):
            keys, vals = k_cache[b, kv, :L], v_cache[b, kv, :L]
            heads = range(kv * G, (kv + 1) * G)
            pre = keys if k_prefix is None else np.asarray(k_prefix[b, kv, :L], dtype=np.float64)
            if gqa == "shared":
                # One score per group: the summed query's, (sum_h q_h)[:rank] . k[:rank]. It equals the
                # sum of the heads' scores for finite inputs and defines the non-finite case (an inf key
                # component meets the sign of the summed query, not +inf and -inf of two heads).
                total = pre[:, :rank] @ sum(q[b, h, :rank] for h in heads)
                approx = {h: total for h in heads}
            else:
                approx = {h: pre[:, :rank] @ q[b, h, :rank] for h in heads}   # [L] each
            for h in heads:
                idx = select(approx[h], L, budgets[b], num_sink, num_recent)
                kept[b, h, :len(idx)] = idx
                out[b, h] = attend(q[b, h], keys[idx], vals[idx], scale)
    return out, kept


def decode_attention(q, k_cache, v_cache, seq_lens, scale: float) -> np.ndarray:
    """Dense decode attention over the first seq_lens[b] tokens, float64 [B, Hq, D]."""
    q = np.asarray(q, dtype=np.float64)
    k_cache = np.asarray(k_cache, dtype=np.float64)
    v_cache = np.asarray(v_cache, dtype=np.float64)
    B, Hq, D = q.shape
    G = Hq // k_cache.shape[1]
    out = np.zeros((B, Hq, D))
    for b in range(B):
        L = int(seq_lens[b])
        for h in range(Hq):
            out[b, h] = attend(q[b, h], k_cache[b, h // G, :L], v_cache[b, h // G, :L], scale)
    return out
