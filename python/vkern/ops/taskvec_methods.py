"""The merge methods that work on dense float task vectors: DARE, NegMerge, CABS, and the
aTLAS-style per-block coefficient lookup.

One implementation, used by both callers:

* ``vkern.apply_task_vectors(method="dare" | "negmerge" | "cabs")`` (``ops/taskvec.py``): the
  task vectors are dequantized (the cpu backend in C++, float32; the reference backend in
  NumPy, float64) and handed to these functions whole;
* ``vkern merge`` (``merge.py``): checkpoints are streamed in blocks of ``BLOCK`` flat
  elements, and each block of every delta is handed to these functions (CABS blocks hold
  whole groups of m; NegMerge is element-wise; DARE's stream is drawn per block of ``BLOCK``).

Every function takes deltas in flat (row-major) order and works in their dtype.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

BLOCK = 1 << 18   # flat elements per DARE random stream (and per streamed block of vkern merge)


def dare_keep(seed: Sequence[int], task: int, start: int, end: int, keep: float) -> np.ndarray:
    """DARE's keep mask of flat elements [start, end) of task vector `task`: element i is kept
    when ``u_i < keep`` (``keep = 1 - p``), with ``u_i`` the (i mod BLOCK)-th float32 uniform of
    ``np.random.default_rng((*seed, task, i // BLOCK)).random``. Any [start, end) of a tensor
    draws the same values as the whole, so streamed blocks and whole tensors agree."""
    out = np.empty(end - start, dtype=bool)
    k = np.float32(keep)
    for c in range(start // BLOCK, (end - 1) // BLOCK + 1 if end > start else 0):
        lo, hi = max(start, c * BLOCK), min(end, (c + 1) * BLOCK)
        rng = np.random.default_rng((*(int(v) for v in seed), int(task), c))
        skip = lo - c * BLOCK                 # draws before lo, discarded in pieces of at most hi - lo
        while skip > 0:
            skip -= rng.random(min(skip, hi - lo), dtype=np.float32).size
        out[lo - start:hi - start] = rng.random(hi - lo, dtype=np.float32) < k
    return out


def dare(deltas: Sequence[np.ndarray], coeffs: Sequence[float], p: float, seed: Sequence[int],
         start: int = 0) -> np.ndarray:
    """DARE (Yu et al., 2024) then task arithmetic: ``sum_t c_t * (m_t * delta_t) / (1 - p)``,
    ``m_t = dare_keep(seed, t, ...)`` (each element dropped with probability p)."""
    acc = np.zeros_like(deltas[0])
    scale = 1.0 / (1.0 - p)
    for t, d in enumerate(deltas):
        kept = np.where(dare_keep(seed, t, start, start + d.size, 1.0 - p).reshape(d.shape), d, 0)
        acc += kept * acc.dtype.type(coeffs[t] * scale)
    return acc


def negmerge(deltas: Sequence[np.ndarray], coeffs: Sequence[float]) -> np.ndarray:
    """NegMerge (Kim et al., ICML 2025): the task vectors are fine-tunes on one forget task;
    where every delta has the same non-zero sign, ``-sum_t c_t delta_t``; 0 elsewhere (the
    value to add to the base: unlearning subtracts)."""
    pos = np.ones(deltas[0].shape, dtype=bool)
    neg = np.ones(deltas[0].shape, dtype=bool)
    acc = np.zeros_like(deltas[0])
    for t, d in enumerate(deltas):
        pos &= d > 0
        neg &= d < 0
        acc += d * acc.dtype.type(coeffs[t])
    acc[~(pos | neg)] = 0
    np.negative(acc, out=acc)
    return acc


def nm_select(mag: np.ndarray, taken: np.ndarray, n: int, m: int) -> np.ndarray:
    """Per group of m consecutive flat elements, the n largest `mag` among those not `taken`
    (ties to the lower index; fewer when fewer are free). Returns the keep mask."""
    L = mag.size
    G = -(-L // m)
    pad = G * m - L
    score = np.where(taken, -1.0, mag.astype(np.float64))
    if pad:
        score = np.concatenate([score, np.full(pad, -1.0)])
    order = np.argsort(-score.reshape(G, m), axis=1, kind="stable")[:, :n]
    keep = np.zeros((G, m), dtype=bool)
    np.put_along_axis(keep, order, True, axis=1)
    return keep.reshape(-1)[:L] & ~taken


def cabs(deltas: Sequence[np.ndarray], coeffs: Sequence[float], n: int, m: int) -> np.ndarray:
    """CABS (Yang et al., ICML 2025): in list order, each delta keeps, in every group of m
    consecutive flat elements, its n largest magnitudes among the positions no earlier task
    kept (n:m balanced, conflict-aware: the masks never overlap); ``sum_t c_t * kept delta_t``.
    Groups start at flat element 0 of what is passed (a streamed block must hold whole groups)."""
    taken = np.zeros(deltas[0].size, dtype=bool)
    acc = np.zeros_like(deltas[0])
    for t, d in enumerate(deltas):
        keep = nm_select(np.abs(d.reshape(-1)), taken, n, m)
        taken |= keep
        acc += np.where(keep.reshape(d.shape), d, 0) * acc.dtype.type(coeffs[t])
    return acc


def block_coeffs(mapping: Mapping[str, Any], block: Any, T: int, name: str = "coeffs") -> Any:
    """aTLAS-style coefficients: `mapping` gives T coefficients per parameter block. The entry
    for `block` is its exact key, else the first key (in mapping order) that occurs in `block`
    as a substring, else the key ``"*"``. A missing entry is a ValueError naming `name`."""
    if not isinstance(block, str):
        raise TypeError(f"block: coeffs is a mapping (one entry per parameter block), so block must name "
                        f"this weight's block (a string), got {type(block).__name__}")
    bad = [k for k in mapping if not isinstance(k, str)]
    if bad:
        raise TypeError(f"{name}: mapping keys must be block names (strings), got {bad[0]!r}")
    if block in mapping:
        return mapping[block]
    for key in mapping:
        if key != "*" and key and key in block:
            return mapping[key]
    if "*" in mapping:
        return mapping["*"]
    raise ValueError(f"{name}: no entry for block {block!r} (keys: {list(mapping)[:8]}; "
                     "add the block, a substring of it, or '*')")
