"""Token pooling: ``vkern.pool_tokens`` (Ward, as PyLate; or k-means) and ``vkern.segment_mean``.

Contract: docs/ops/retrieval_memory.md; definitions: vkern/reference/pool.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from .. import _arrays as A
from .. import _ext
from .._backend import Backend, cpu_reason, host_reason, op
from ..reference import pool as ref

_POOL = op("pool_tokens")
_SEGMENT = op("segment_mean")
METHODS = {"ward": 0, "kmeans": 1}


def _host_float32(x, name: str) -> np.ndarray:
    if not A.is_float(x):
        raise A.float_dtype_error(name, x)
    if not isinstance(x, np.ndarray) and x.device.type != "cpu":
        raise ValueError(f"{name}: token pooling runs on host memory only (got a tensor on {x.device})")
    return A.to_numpy(x, np.float32)


def _int_arg(v, name: str, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{name}: expected an int, got {type(v).__name__}")
    if v < lo:
        raise ValueError(f"{name}: expected >= {lo}, got {int(v)}")
    return int(v)


def packed_docs(docs, doc_offsets, doc_lengths, what: str = "docs"):
    """(host float32 [T, D], int64 offsets [N+1], like) from packed / padded / list documents."""
    if isinstance(docs, (list, tuple)):
        if doc_offsets is not None or doc_lengths is not None:
            raise ValueError("doc_offsets/doc_lengths: not accepted with a list of documents")
        if not docs:
            raise ValueError(f"{what}: an empty list has no embedding dim; pass a [0, D] array with doc_offsets [0]")
        parts = [_host_float32(A.to_native(d, f"{what}[{i}]")[0], f"{what}[{i}]") for i, d in enumerate(docs)]
        for i, d in enumerate(parts):
            if d.ndim != 2 or d.shape[1] != parts[0].shape[1]:
                raise ValueError(f"{what}[{i}]: expected shape [L, D={parts[0].shape[1]}], got {d.shape}")
        off = np.zeros(len(parts) + 1, np.int64)
        np.cumsum([len(d) for d in parts], out=off[1:])
        return np.concatenate(parts, axis=0), off, docs[0]
    d, _ = A.to_native(docs, what)
    x = _host_float32(d, what)
    if x.ndim == 3:
        if doc_offsets is not None:
            raise ValueError("doc_offsets: only valid with packed docs [T, D]; padded docs use doc_lengths")
        N, Ld, _ = x.shape
        lens = A.padded_lengths(doc_lengths, d, what)
        off = np.zeros(N + 1, np.int64)
        np.cumsum(lens, out=off[1:])
        return x[np.arange(Ld)[None, :] < lens[:, None]], off, d
    if x.ndim != 2:
        raise ValueError(f"{what}: expected shape [T, D], [N, Ld, D] or a list of [L, D], got {tuple(x.shape)}")
    if doc_lengths is not None:
        raise ValueError("doc_lengths: only valid with padded docs [N, Ld, D]; packed docs use doc_offsets")
    if doc_offsets is None:
        raise ValueError(f"doc_offsets: required with packed {what} [T, D]")
    o, _ = A.to_native(doc_offsets, "doc_offsets")
    if not A.is_integer(o):
        raise TypeError(f"doc_offsets: expected an integer array, got {A.dtype_name(o)}")
    off = A.to_numpy(o).astype(np.int64)
    T = x.shape[0]
    if off.ndim != 1 or off.shape[0] < 1 or off[0] != 0 or off[-1] != T or np.any(np.diff(off) < 0):
        raise ValueError(f"doc_offsets: must be 1-D, start at 0, be non-decreasing and end at T={T}")
    return x, off, d


@dataclass
class PoolCall:
    x: np.ndarray               # float32 [T, D]
    offsets: np.ndarray         # int64 [N+1]
    pool_factor: int
    protected_tokens: int
    method: str
    seed: int
    device: str = "cpu"

    def __repr__(self) -> str:
        return (f"{self.offsets.shape[0] - 1} docs, {self.x.shape} tokens, method={self.method}, "
                f"pool_factor={self.pool_factor}")


_NONFINITE = "docs: contains NaN or inf (clustering needs finite vectors)"


def _pool_reference(call: PoolCall):
    if call.x.size and not A.all_finite(call.x):
        raise ValueError(_NONFINITE)
    return ref.pool_tokens(call.x, call.offsets, call.pool_factor, call.protected_tokens, call.method, call.seed)


def _pool_cpu(call: PoolCall):
    x = call.x
    if x.shape[0] and (x.strides[1] != 4 or x.strides[0] % 4 or x.strides[0] < 0):
        x = np.ascontiguousarray(x)
    T, D = x.shape
    lens = np.diff(call.offsets)
    p = np.minimum(lens, call.protected_tokens)
    m = lens - p
    k = np.maximum(m // call.pool_factor, 1)
    bound = np.where(k >= m, lens, p + k)                 # rows each document may write
    out_starts = np.zeros(len(lens) + 1, np.int64)
    np.cumsum(bound, out=out_starts[1:])
    out = np.empty((int(out_starts[-1]), D), np.float32)
    out_lens = np.zeros(len(lens), np.int64)
    N = len(lens)
    starts = np.ascontiguousarray(call.offsets[:-1])
    lens = np.ascontiguousarray(lens)
    # The kernel checks each document for NaN / inf before clustering it (no separate serial pass
    # over all the tokens here) and reports one; no rows are returned then.
    finite = _ext.C.pool_tokens_cpu(x.ctypes.data if T else 0, D, int(x.strides[0] // 4) if T > 1 else D,
                                    starts.ctypes.data, lens.ctypes.data, N, call.pool_factor, call.protected_tokens,
                                    METHODS[call.method], call.seed % (1 << 64), out_starts.ctypes.data,
                                    out.ctypes.data if out.size else 0, out_lens.ctypes.data)
    if not finite:
        raise ValueError(_NONFINITE)
    new_off = np.zeros(N + 1, np.int64)
    np.cumsum(out_lens, out=new_off[1:])
    return out[:int(new_off[-1])], new_off            # the kernel packed the rows (ties: fewer clusters)


_POOL.register(Backend("reference", host_reason, _pool_reference))
_POOL.register(Backend("cpu", cpu_reason, _pool_cpu))


def pool_tokens(docs, *, doc_offsets=None, doc_lengths=None, pool_factor: int = 2, protected_tokens: int = 1,
                method: str = "ward", seed: int = 0, backend: str = "auto"):
    """Pool each document's token vectors into cluster means (PyLate's token pooling, or k-means).

    Per document of n tokens the first ``min(protected_tokens, n)`` are kept; the other m are
    grouped into at most ``max(m // pool_factor, 1)`` clusters and replaced by the cluster means
    (not re-normalised), clusters ordered by their first token. A document with nothing to pool
    (that number >= m) is returned unchanged.

    Args:
        docs: packed [T, D] with ``doc_offsets`` [N+1], padded [N, Ld, D] with optional
            ``doc_lengths``, or a list of [L_i, D]; float32, float16 or bfloat16, host memory.
        pool_factor: int >= 1. protected_tokens: int >= 0.
        method: "ward" -- the clusters of ``scipy.cluster.hierarchy.linkage(1 - x x^T condensed,
            "ward")`` + ``fcluster(maxclust=k)``, as PyLate's ``pool_embeddings_hierarchical``
            (identical except at exact distance ties, where fewer than k clusters can form, as in
            SciPy); "kmeans" -- exactly k clusters, Lloyd's iterations from a seeded draw.
        seed: k-means only; the same seed gives the same clusters on every backend and thread count.

    Returns:
        (pooled float32 [T', D], new doc_offsets int64 [N+1]), the array kind of ``docs``.

    Example:
        >>> import numpy as np, vkern
        >>> x = np.array([[1, 0], [0, 1], [0, 1], [1, 0], [1, 0]], np.float32)
        >>> pooled, off = vkern.pool_tokens(x, doc_offsets=np.array([0, 5]), pool_factor=2)
        >>> pooled.tolist(), off.tolist()
        ([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]], [0, 3])
    """
    if method not in METHODS:
        raise ValueError(f"method: expected 'ward' or 'kmeans', got {method!r}")
    pool_factor = _int_arg(pool_factor, "pool_factor", 1)
    protected_tokens = _int_arg(protected_tokens, "protected_tokens", 0)
    seed = _int_arg(seed, "seed", 0)
    x, off, like = packed_docs(docs, doc_offsets, doc_lengths)
    call = PoolCall(x, off, pool_factor, protected_tokens, method, seed)
    pooled, new_off = _POOL.pick(backend, call).run(call)
    if A.is_torch(like):
        torch = A.torch_module()
        return torch.from_numpy(pooled), torch.from_numpy(new_off)
    return pooled, new_off


@dataclass
class SegmentCall:
    x: np.ndarray
    ids: np.ndarray
    S: int
    device: str = "cpu"

    def __repr__(self) -> str:
        return f"{self.x.shape} rows into {self.S} segments"


def _segment_reference(call: SegmentCall):
    return ref.segment_mean(call.x, call.ids, call.S)


def _segment_cpu(call: SegmentCall):
    x = np.ascontiguousarray(call.x)
    T, D = x.shape
    out = np.empty((call.S, D), np.float32)
    ids = np.ascontiguousarray(call.ids)
    if call.S:
        _ext.C.segment_mean_cpu(x.ctypes.data if T else 0, T, D, D, ids.ctypes.data if T else 0, call.S,
                                out.ctypes.data)
    return out


_SEGMENT.register(Backend("reference", host_reason, _segment_reference))
_SEGMENT.register(Backend("cpu", cpu_reason, _segment_cpu))


def segment_mean(docs, segment_ids, *, num_segments: Optional[int] = None, backend: str = "auto"):
    """Mean of the rows of ``docs`` [T, D] sharing a segment id (whole-word pooling, given spans).

    Args:
        segment_ids: int [T] in [0, S); S = ``num_segments`` or max id + 1.

    Returns:
        float32 [S, D] (float64 sums); a segment with no rows is a zero row. Same kind as ``docs``.

    Example:
        >>> import numpy as np, vkern
        >>> vkern.segment_mean(np.array([[1, 2], [3, 4], [5, 6]], np.float32), np.array([0, 0, 1])).tolist()
        [[2.0, 3.0], [5.0, 6.0]]
    """
    d, _ = A.to_native(docs, "docs")
    x = _host_float32(d, "docs")
    if x.ndim != 2:
        raise ValueError(f"docs: expected shape [T, D], got {tuple(x.shape)}")
    s, _ = A.to_native(segment_ids, "segment_ids")
    if not A.is_integer(s):
        raise TypeError(f"segment_ids: expected an integer array, got {A.dtype_name(s)}")
    ids = A.to_numpy(s).astype(np.int64)
    if ids.shape != (x.shape[0],):
        raise ValueError(f"segment_ids: expected shape ({x.shape[0]},) (one per row), got {ids.shape}")
    if num_segments is not None:
        S = _int_arg(num_segments, "num_segments", 0)
    else:
        S = int(ids.max()) + 1 if ids.size else 0
    if ids.size and (ids.min() < 0 or ids.max() >= S):
        raise ValueError(f"segment_ids: every id must be in [0, {S}), got min={int(ids.min())}, max={int(ids.max())}")
    call = SegmentCall(x, ids, S)
    out = _SEGMENT.pick(backend, call).run(call)
    if A.is_torch(d):
        return A.torch_module().from_numpy(out)
    return out
