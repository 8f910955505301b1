"""vkern.loki: low-rank-key sparse attention (Loki, NeurIPS 2024), SPEC §2.

Offline, ``pca_basis`` finds per KV head an orthonormal basis of the keys
(principal directions first). Keys are rotated once, as they enter the cache,
and queries at each decode step, with ``rotate``; since the basis is
orthonormal, exact scores are unchanged, while the first ``rank`` rotated
dimensions carry most of the key variance and give cheap approximate scores.
``vkern.loki_attention`` then attends over the tokens those scores select.

    >>> import numpy as np, vkern
    >>> rng = np.random.default_rng(0)
    >>> keys = rng.standard_normal((256, 2, 8)) * [8, 4, 2, 1, .1, .1, .1, .1]   # [N, H_kv, D]
    >>> basis = vkern.loki.pca_basis(keys)
    >>> basis.P.shape, basis.explained.shape
    ((2, 8, 8), (2, 8))
    >>> vkern.loki.rank_for_variance(basis, 0.9)
    2
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Union

import numpy as np

from . import _arrays as A
from ._backend import BACKENDS
from .ops.loki import decode_attention, loki_attention, rotate_impl
from .reference import loki as _ref

__all__ = ["LokiBasis", "pca_basis", "rank_for_variance", "rotate", "key_prefix", "loki_attention",
           "decode_attention"]


@dataclass
class LokiBasis:
    """Per-KV-head PCA basis of the keys.

    Attributes:
        P: [H_kv, D, D] float64, orthonormal; column i of P[h] is head h's i-th
           principal direction (descending variance). Same array kind and device
           as the calibration keys.
        explained: [H_kv, D] float64 NumPy array, cumulative explained-variance ratio
           (explained[h, r - 1] = share of head h's variance in the first r directions; ends at 1).
        mean: [H_kv, D] float64, the keys' mean (PCA centres on it; attention does not need it).
    """
    P: Any
    explained: np.ndarray
    mean: Any

    @property
    def num_kv_heads(self) -> int:
        return int(self.P.shape[0])

    @property
    def head_dim(self) -> int:
        return int(self.P.shape[1])


def pca_basis(keys, *, backend: str = "auto") -> LokiBasis:
    """PCA basis per KV head from calibration keys, computed in float64.

    Args:
        keys: [N, H_kv, D] post-RoPE keys (float16/bfloat16/float32/float64), N >= 1;
            NumPy or torch (a torch tensor is decomposed on its own device by torch.linalg).
        backend: accepted for symmetry with the other ops; the decomposition is a
            float64 eigendecomposition of the D x D covariance, the same for every backend.

    Returns:
        LokiBasis with P [H_kv, D, D], explained [H_kv, D] and mean [H_kv, D]. Each column's
        largest-magnitude entry is positive, so the basis is reproducible. A head whose keys
        have no variance gets explained = 1 throughout.
    """
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {('auto',) + BACKENDS}, got {backend!r}")
    kn, _ = A.to_native(keys, "keys")
    name = A.dtype_name(kn)
    if name not in ("float16", "bfloat16", "float32", "float64"):
        raise TypeError(f"keys: expected a float array, got {name}")
    if kn.ndim != 3:
        raise ValueError(f"keys: expected shape [N, H_kv, D], got {tuple(kn.shape)}")
    N, H, D = (int(s) for s in kn.shape)
    if N < 1 or H < 1 or D < 1:
        raise ValueError(f"keys: expected N >= 1, H_kv >= 1 and D >= 1, got {tuple(kn.shape)}")
    if isinstance(kn, np.ndarray):
        P, explained, mean = _ref.pca(kn)
        return LokiBasis(P, explained, mean)
    torch = A.torch_module()
    x = kn.detach().to(torch.float64)
    mean = x.mean(dim=0)                                          # [H, D]
    c = (x - mean).permute(1, 0, 2)                               # [H, N, D]
    cov = c.transpose(1, 2) @ c / max(N - 1, 1)
    w, v = torch.linalg.eigh(cov)                                 # ascending
    w, v = w.flip(-1).clamp_min(0.0), v.flip(-1)
    # np.argsort(-w, stable) and flip agree except among exactly equal eigenvalues.
    pivot = v.abs().argmax(dim=1, keepdim=True)                   # [H, 1, D]
    sign = torch.sign(torch.gather(v, 1, pivot))
    v = v * torch.where(sign == 0, torch.ones_like(sign), sign)
    total = w.sum(dim=1, keepdim=True)
    cum = torch.cumsum(w, dim=1) / torch.where(total > 0, total, torch.ones_like(total))
    cum = torch.where(total > 0, cum, torch.ones_like(cum))
    cum[:, -1] = 1.0
    return LokiBasis(v, cum.cpu().numpy(), mean)


def rank_for_variance(basis: LokiBasis, frac: float) -> int:
    """Smallest rank r such that every KV head keeps at least ``frac`` of its key
    variance in its first r directions (the maximum over heads), 1 <= r <= D.

    >>> import numpy as np
    >>> b = LokiBasis(np.eye(4)[None], np.array([[0.5, 0.8, 0.95, 1.0]]), np.zeros((1, 4)))
    >>> rank_for_variance(b, 0.9)
    3
    """
    if isinstance(frac, bool) or not isinstance(frac, (int, float, np.integer, np.floating)):
        raise TypeError(f"frac: expected a float in (0, 1], got {type(frac).__name__}")
    frac = float(frac)
    if not (0.0 < frac <= 1.0) or math.isnan(frac):
        raise ValueError(f"frac: expected a float in (0, 1], got {frac}")
    ex = np.asarray(basis.explained, np.float64)
    if ex.ndim != 2:
        raise ValueError(f"basis.explained: expected shape [H_kv, D], got {ex.shape}")
    need = [int(np.argmax(row >= frac - 1e-12)) + 1 if np.any(row >= frac - 1e-12) else ex.shape[1] for row in ex]
    return max(need)


def rotate(x, basis: Union[LokiBasis, Any], *, backend: str = "auto"):
    """x [..., H, D] rotated into the basis: out[..., h, :] = x[..., h, :] @ P[h // (H / H_kv)].

    H is H_kv (keys) or a multiple of it (query heads of a GQA group share their
    KV head's basis). ``basis`` is a LokiBasis or its P array [H_kv, D, D]. Products
    are accumulated in float32 (float64 on the reference backend); the result has
    x's dtype, kind and device. q . k is unchanged up to rounding: P is orthonormal.
    """
    P = basis.P if isinstance(basis, LokiBasis) else basis
    return rotate_impl(x, P, backend=backend)


def key_prefix(k_cache, rank: int):
    """A separate, contiguous copy of the first ``rank`` dimensions of rotated keys.

    ``k_cache [..., D]`` -> ``[..., rank]`` (same dtype, kind and device). Pass it as
    ``loki_attention(..., k_prefix=...)``: the approximate pass then streams only
    these ``rank`` columns. Inside full key rows it cannot: once a row's first cache
    lines are read, the CPU's hardware prefetchers fetch the rest of the row too, so
    the approximate pass costs nearly a full read of K. A serving loop keeps the
    prefix next to the cache and writes ``k_rot[..., :rank]`` into both when tokens
    are appended (memory: rank/D of the key cache).

    >>> import numpy as np
    >>> k = np.arange(24, dtype=np.float32).reshape(1, 1, 3, 8)
    >>> key_prefix(k, 2)[0, 0].tolist()
    [[0.0, 1.0], [8.0, 9.0], [16.0, 17.0]]
    """
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)):
        raise TypeError(f"rank: expected an int, got {type(rank).__name__}")
    D = int(k_cache.shape[-1])
    if not 1 <= int(rank) <= D:
        raise ValueError(f"rank: expected 1 <= rank <= D={D}, got {int(rank)}")
    part = k_cache[..., : int(rank)]
    return np.ascontiguousarray(part) if isinstance(part, np.ndarray) else part.contiguous()
