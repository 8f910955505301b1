"""Value-aware KV pruning (VATP) reference (SPEC §3), in float64 on the host.

importance(token j, KV head h) = accumulated attention on j x ||v_j||_1.

Conventions (shared by every backend):

- Query row i of ``q [B, Hq, Tq, D]`` sits at position ``T - Tq + i`` (the
  last Tq positions of the cache). Causal: it sees keys ``0 .. T - Tq + i``.
  In causal mode a query row at a position ``>= seq_lens[b]`` is padding and
  adds nothing; in non-causal mode every query row counts.
- Keys at positions ``>= seq_lens[b]`` receive nothing (their column sum is 0).
- A query row that sees no key at all adds nothing (no NaN).
- Non-finite logits: each query row's probabilities are what float64 NumPy's
  ``exp(s - s.max()) / sum(exp(s - s.max()))`` over its visible keys gives. If
  the row's largest visible logit is not finite (any NaN logit, any +inf
  logit, or every visible logit -inf), every key that row sees receives NaN;
  otherwise -inf logits get exactly 0. Keys the row does not see get nothing
  from it, whatever they hold.
- Query head ``hq`` reads KV head ``hq // (Hq // H_kv)``; a KV head's column
  sum adds up the rows of all query heads of its group.
"""
from __future__ import annotations

import numpy as np


def attention_colsum(q: np.ndarray, k: np.ndarray, seq_lens: np.ndarray, causal: bool, scale: float,
                     row_block: int = 512) -> np.ndarray:
    """q [B, Hq, Tq, D], k [B, H_kv, T, D], seq_lens int [B] -> float32 [B, H_kv, T]."""
    q = np.asarray(q, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    B, Hq, Tq, D = q.shape
    H_kv, T = k.shape[1], k.shape[2]
    group = Hq // H_kv
    out = np.zeros((B, H_kv, T), dtype=np.float64)
    if T == 0:                                                           # no key: nothing to receive
        return out.astype(np.float32)
    keys = np.arange(T)
    for b in range(B):
        L = int(seq_lens[b])
        for hq in range(Hq):
            h = hq // group
            for r0 in range(0, Tq, row_block):
                r1 = min(Tq, r0 + row_block)
                pos = T - Tq + np.arange(r0, r1)                        # positions of these query rows
                visible = keys[None, :] < L                              # [rows, T]
                if causal:
                    visible = visible & (keys[None, :] <= pos[:, None]) & (pos[:, None] < L)
                with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
                    s = (q[b, hq, r0:r1] @ k[b, h].T) * scale           # [rows, T]
                    s = np.where(visible, s, -np.inf)
                    # The softmax of each row over its visible keys, exactly as exp(s - max) / sum:
                    # a NaN logit, a +inf logit or all logits -inf make the row NaN on every key it sees.
                    m = s.max(axis=1, keepdims=True)
                    e = np.where(visible, np.exp(s - m), 0.0)
                    p = np.where(visible, e / e.sum(axis=1, keepdims=True), 0.0)
                out[b, h] += p.sum(axis=0)
    return out.astype(np.float32)


def value_l1(v: np.ndarray) -> np.ndarray:
    """v [B, H_kv, T, D] -> float32 [B, H_kv, T]: sum over D of |v|."""
    return np.abs(np.asarray(v, dtype=np.float64)).sum(axis=-1).astype(np.float32)


def resolve_budget(budget, L: int, num_sink: int, num_recent: int) -> int:
    """Tokens kept for a sequence of L valid tokens.

    int budget: min(budget, L). float budget (a fraction of L): floor(budget * L),
    raised to the protected count (sinks + recent window, capped at L) so that
    protected tokens are never evicted, and capped at L.
    """
    if isinstance(budget, float):
        n = int(np.floor(budget * L))
        return min(L, max(n, min(L, num_sink + num_recent)))
    return min(L, int(budget))


def select(scores: np.ndarray, L: int, n: int, num_sink: int, num_recent: int) -> np.ndarray:
    """Kept positions (ascending) of one (batch, KV head) row of scores [T].

    The first num_sink and last num_recent of the L valid tokens always; the
    remaining n - |protected| by highest score, NaN lowest, ties to the lower
    index.
    """
    s = np.asarray(scores[:L], dtype=np.float64)
    protected = np.zeros(L, dtype=bool)
    protected[:min(num_sink, L)] = True
    protected[max(0, L - num_recent):] = True
    n_free = n - int(protected.sum())
    rest = np.nonzero(~protected)[0]
    if n_free > 0:
        rs = s[rest]
        nan = np.isnan(rs)
        # lexsort: last key is primary: non-NaN first, then descending score, then lower index.
        order = np.lexsort((rest, -np.where(nan, 0.0, rs), nan))
        chosen = rest[order[:n_free]]
    else:
        chosen = rest[:0]
    return np.sort(np.concatenate([np.nonzero(protected)[0], chosen]))


def prune_indices(scores: np.ndarray, seq_lens: np.ndarray, kept_lens: np.ndarray, num_sink: int,
                  num_recent: int) -> np.ndarray:
    """scores [B, H_kv, T], kept_lens [B] (see resolve_budget) -> kept_idx int64 [B, H_kv, Kmax], padded with -1."""
    B, H, T = scores.shape
    kmax = int(kept_lens.max()) if B else 0
    idx = np.full((B, H, kmax), -1, dtype=np.int64)
    for b in range(B):
        for h in range(H):
            n = int(kept_lens[b])
            idx[b, h, :n] = select(scores[b, h], int(seq_lens[b]), n, num_sink, num_recent)
    return idx


def gather_kept(x: np.ndarray, kept_idx: np.ndarray) -> np.ndarray:
    """x [B, H, T, D] -> [B, H, Kmax, D]: the kept rows in order, zero rows where kept_idx is -1."""
    B, H, K = kept_idx.shape
    out = np.zeros((B, H, K) + x.shape[3:], dtype=x.dtype)
    for b in range(B):
        for h in range(H):
            sel = kept_idx[b, h]
            n = int((sel >= 0).sum())
            out[b, h, :n] = x[b, h, sel[:n]]
    return out
