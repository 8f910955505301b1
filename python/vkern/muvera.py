"""vkern.muvera: MUVERA fixed-dimensional encodings and FDE candidates + exact MaxSim rescoring.

    cfg = vkern.muvera.MuveraConfig(dim=128, num_repetitions=20, num_simhash_projections=5,
                                    projection_dim=16)
    doc_fdes = vkern.muvera.encode_documents(docs, cfg, doc_offsets=offsets)   # [N, cfg.fde_dim]
    scores, ids = vkern.muvera.search(q, docs, doc_offsets=offsets, doc_fdes=doc_fdes, config=cfg,
                                      k=10, candidates=100)

Contract: docs/ops/retrieval_memory.md; definition: vkern/reference/muvera.py.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np

from . import _arrays as A
from . import _ext
from ._backend import Backend, cpu_reason, host_reason, op
from .ops.maxsim import maxsim
from .ops.maxsim_int8 import QuantizedDocs
from .ops.pool import packed_docs
from .reference import muvera as ref

__all__ = ["MuveraConfig", "encode_queries", "encode_documents", "fde_scores", "search"]

_OP = op("muvera_encode")


@dataclass(frozen=True)
class MuveraConfig:
    """One FDE configuration, shared by an index and its queries (serialise it with the index).

    dim: token dimension D. num_repetitions: R. num_simhash_projections: k (2^k partitions,
    k <= 16). projection_dim: None = identity (D per block), or the AMS-sketch dimension.
    fill_empty_partitions: documents only (queries are never filled). final_projection_dim:
    None, or the size of a final count sketch. seed: every random matrix derives from it.
    FDE size: ``fde_dim`` = R * 2^k * (projection_dim or D), or final_projection_dim.
    """
    dim: int
    num_repetitions: int = 20
    num_simhash_projections: int = 5
    projection_dim: Optional[int] = 16
    fill_empty_partitions: bool = True
    final_projection_dim: Optional[int] = None
    seed: int = 42

    def __post_init__(self):
        for name, lo in (("dim", 1), ("num_repetitions", 1), ("num_simhash_projections", 0), ("seed", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise TypeError(f"{name}: expected an int, got {type(v).__name__}")
            if v < lo:
                raise ValueError(f"{name}: expected >= {lo}, got {v}")
        if self.num_simhash_projections > 16:
            raise ValueError(f"num_simhash_projections: expected <= 16, got {self.num_simhash_projections}")
        for name in ("projection_dim", "final_projection_dim"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1):
                raise ValueError(f"{name}: expected None or an int >= 1, got {v!r}")
        if not isinstance(self.fill_empty_partitions, bool):
            raise TypeError("fill_empty_partitions: expected a bool")

    @property
    def block_dim(self) -> int:
        return self.projection_dim if self.projection_dim is not None else self.dim

    @property
    def fde_dim(self) -> int:
        if self.final_projection_dim is not None:
            return self.final_projection_dim
        return self.num_repetitions * (1 << self.num_simhash_projections) * self.block_dim

    def to_dict(self) -> dict:
        return {"format": "vkern.muvera/1", **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "MuveraConfig":
        d = dict(d)
        fmt = d.pop("format", "vkern.muvera/1")
        if fmt != "vkern.muvera/1":
            raise ValueError(f"config: unknown format {fmt!r} (expected 'vkern.muvera/1')")
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"config: unknown keys {sorted(unknown)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "MuveraConfig":
        return cls.from_dict(json.loads(text))

    def matrices(self) -> dict:
        """The random matrices, derived from the seed alone (NumPy PCG64 streams [seed, r, kind])."""
        return _matrices(self)


_MATS: dict = {}


def _matrices(cfg: MuveraConfig) -> dict:
    m = _MATS.get(cfg)
    if m is not None:
        return m
    R, k, D = cfg.num_repetitions, cfg.num_simhash_projections, cfg.dim
    simhash = np.stack([np.random.default_rng([cfg.seed, r, 0]).standard_normal((D, k)).astype(np.float32)
                        for r in range(R)])
    ams_index = ams_sign = final_index = final_sign = None
    if cfg.projection_dim is not None:
        gens = [np.random.default_rng([cfg.seed, r, 1]) for r in range(R)]
        ams_index = np.stack([g.integers(0, cfg.projection_dim, D) for g in gens]).astype(np.int64)
        ams_sign = np.stack([g.choice(np.array([-1.0, 1.0], np.float32), D) for g in gens]).astype(np.float32)
    if cfg.final_projection_dim is not None:
        g = np.random.default_rng([cfg.seed, 0, 2])
        F = R * (1 << k) * cfg.block_dim
        final_index = g.integers(0, cfg.final_projection_dim, F).astype(np.int64)
        final_sign = g.choice(np.array([-1.0, 1.0], np.float32), F).astype(np.float32)
    m = {"R": R, "k": k, "d_proj": cfg.block_dim, "simhash": simhash, "ams_index": ams_index,
         "ams_sign": ams_sign, "final_index": final_index, "final_sign": final_sign,
         "final_dim": cfg.final_projection_dim}
    if len(_MATS) > 16:
        _MATS.clear()
    _MATS[cfg] = m
    return m


@dataclass
class EncodeCall:
    x: np.ndarray
    offsets: np.ndarray
    cfg: MuveraConfig
    average: bool
    fill_empty: bool
    device: str = "cpu"

    def __repr__(self) -> str:
        return f"{len(self.offsets) - 1} sets, {self.x.shape} tokens, fde_dim={self.cfg.fde_dim}"


def _encode_reference(call: EncodeCall):
    return ref.encode(call.x, call.offsets, _matrices(call.cfg), call.average, call.fill_empty)


def _encode_cpu(call: EncodeCall):
    m = _matrices(call.cfg)
    x = np.ascontiguousarray(call.x)
    N = len(call.offsets) - 1
    cfg = call.cfg
    raw = cfg.num_repetitions * (1 << cfg.num_simhash_projections) * cfg.block_dim
    out = np.empty((N, cfg.fde_dim), np.float32)
    simhash = m.get("simhash_t")
    if simhash is None:  # [R, D, k] -> [D, R * k]
        simhash = m["simhash_t"] = np.ascontiguousarray(m["simhash"].transpose(1, 0, 2).reshape(cfg.dim, -1))
    ams_index = None if m["ams_index"] is None else np.ascontiguousarray(m["ams_index"])
    ams_sign = None if m["ams_sign"] is None else np.ascontiguousarray(m["ams_sign"])
    fi = None if m["final_index"] is None else np.ascontiguousarray(m["final_index"])
    fs = None if m["final_sign"] is None else np.ascontiguousarray(m["final_sign"])
    offsets = np.ascontiguousarray(call.offsets)
    if N:
        _ext.C.muvera_encode_cpu(
            x.ctypes.data if x.size else 0, cfg.dim, offsets.ctypes.data, N, cfg.num_repetitions,
            cfg.num_simhash_projections, cfg.block_dim, simhash.ctypes.data,
            0 if ams_index is None else ams_index.ctypes.data, 0 if ams_sign is None else ams_sign.ctypes.data,
            int(call.average), int(call.fill_empty), raw, 0 if fi is None else fi.ctypes.data,
            0 if fs is None else fs.ctypes.data, cfg.fde_dim, out.ctypes.data)
    return out


def _cpu_encode_reason(call):
    r = cpu_reason(call)
    if r is None and not hasattr(_ext.C, "muvera_encode_cpu"):
        return "this build has no muvera_encode_cpu"
    return r


_OP.register(Backend("reference", host_reason, _encode_reference))
_OP.register(Backend("cpu", _cpu_encode_reason, _encode_cpu))


def _check_config(config) -> MuveraConfig:
    if not isinstance(config, MuveraConfig):
        raise TypeError(f"config: expected a vkern.muvera.MuveraConfig, got {type(config).__name__}")
    return config


def _encode(sets, config, doc_offsets, doc_lengths, average, fill_empty, backend, what):
    cfg = _check_config(config)
    x, off, like = packed_docs(sets, doc_offsets, doc_lengths, what)
    if x.shape[1] != cfg.dim:
        raise ValueError(f"{what}: token dim {x.shape[1]} does not match config.dim={cfg.dim}")
    if x.size and not np.isfinite(x).all():
        raise ValueError(f"{what}: contains NaN or inf")
    call = EncodeCall(x, off, cfg, average, fill_empty)
    out = _OP.pick(backend, call).run(call)
    return A.torch_module().from_numpy(out) if A.is_torch(like) else out


def encode_documents(docs, config: MuveraConfig, *, doc_offsets=None, doc_lengths=None, backend: str = "auto"):
    """Document FDEs (AVERAGE per partition; empty partitions filled if the config says so).

    docs: packed [T, D] with ``doc_offsets``, padded [N, Ld, D] with ``doc_lengths``, or a list.
    Returns float32 [N, config.fde_dim]; an empty document encodes to zeros.

    Example:
        >>> import numpy as np, vkern
        >>> cfg = vkern.muvera.MuveraConfig(dim=4, num_repetitions=2, num_simhash_projections=2, projection_dim=None)
        >>> vkern.muvera.encode_documents(np.eye(3, 4, dtype=np.float32), cfg, doc_offsets=np.array([0, 3])).shape
        (1, 32)
    """
    cfg = _check_config(config)
    return _encode(docs, cfg, doc_offsets, doc_lengths, True, cfg.fill_empty_partitions, backend, "docs")


def encode_queries(queries, config: MuveraConfig, *, query_lengths=None, backend: str = "auto"):
    """Query FDEs (SUM per partition, never filled). queries: [Lq, D] -> [F]; [B, Lq, D] (with
    optional ``query_lengths``) or a list of [L_i, D] -> [B, F]."""
    cfg = _check_config(config)
    q, _ = A.to_native(queries, "queries") if not isinstance(queries, (list, tuple)) else (queries, None)
    if not isinstance(q, (list, tuple)) and q.ndim == 2:
        if query_lengths is not None:
            raise ValueError("query_lengths: only valid with batched queries [B, Lq, D]")
        off = np.array([0, q.shape[0]], np.int64)
        return _encode(q, cfg, off, None, False, False, backend, "queries")[0]
    return _encode(q, cfg, None, query_lengths, False, False, backend, "queries")


def fde_scores(query_fdes, doc_fdes, config: Optional[MuveraConfig] = None):
    """float32 [B, N] (or [N]) FDE dot products, checked against the config's fde_dim if given."""
    qf = np.asarray(A.to_numpy(A.to_native(query_fdes, "query_fdes")[0]), np.float32)
    df = np.asarray(A.to_numpy(A.to_native(doc_fdes, "doc_fdes")[0]), np.float32)
    F = config.fde_dim if config is not None else df.shape[-1]
    if df.ndim != 2 or df.shape[1] != F:
        raise ValueError(f"doc_fdes: expected shape [N, {F}] (config.fde_dim), got {df.shape}; "
                         "were they encoded with another MuveraConfig?")
    if qf.shape[-1] != F:
        raise ValueError(f"query_fdes: expected last dim {F} (config.fde_dim), got {qf.shape[-1]}")
    return qf @ df.T


def search(queries, docs, *, doc_fdes, config: MuveraConfig, doc_offsets=None, k: int = 10,
           candidates: int = 100, backend: str = "auto"):
    """Top-k documents by exact MaxSim among the top ``candidates`` by FDE dot product.

    queries: [Lq, D] or [B, Lq, D]. docs: packed [T, D] with ``doc_offsets`` (float32, float16,
    bfloat16), a list, or ``QuantizedDocs``; the CPU kernel reads only the candidates' rows, in
    place (an ``np.memmap`` store stays on disk but for those). ``doc_fdes``
    [N, config.fde_dim] from ``encode_documents`` with the same config.
    Returns (scores float32 [k] / [B, k], doc ids int64), best first, exact MaxSim scores.
    """
    cfg = _check_config(config)
    for name, v in (("k", k), ("candidates", candidates)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
    if candidates < k:
        raise ValueError(f"candidates: must be >= k={k}, got {candidates}")
    if isinstance(docs, (list, tuple)):
        docs, doc_offsets, _ = packed_docs(docs, None, None, "docs")
    if isinstance(docs, QuantizedDocs):
        N = docs.num_docs
    elif doc_offsets is None:
        raise ValueError("doc_offsets: required with packed docs [T, D] (or pass docs as a list)")
    else:
        N = int(A.to_native(doc_offsets, "doc_offsets")[0].shape[0]) - 1   # the rest is checked by maxsim
    q = A.to_numpy(A.to_native(queries, "queries")[0], np.float32)
    single = q.ndim == 2
    qb = q[None] if single else q
    qf = encode_queries(qb, cfg, backend=backend)
    s = fde_scores(qf, doc_fdes, cfg)
    if s.shape[1] != N:
        raise ValueError(f"doc_fdes: {s.shape[1]} rows but docs hold {N} documents")
    c = min(candidates, N)
    # top candidates per query by FDE score, then exact MaxSim over those rows only (in place)
    cand = np.argpartition(-s, c - 1, axis=1)[:, :c] if c < N else np.broadcast_to(np.arange(N), (len(qb), N))
    cand = np.sort(cand, axis=1)
    out_s, out_i = maxsim(qb, docs, doc_offsets=doc_offsets, doc_ids=np.ascontiguousarray(cand), topk=min(k, N),
                          backend=backend)
    return (out_s[0], out_i[0]) if single else (out_s, out_i)
