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
from ._backend import Backend, cpu_reason, cuda_reason, host_reason, op, triton_reason
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
    x: object                   # float32 [T, D]: NumPy for host inputs, a contiguous torch tensor on the device
    offsets: np.ndarray         # int64 [N+1] (host)
    cfg: MuveraConfig
    average: bool
    fill_empty: bool
    device: str = "cpu"
    lib: str = "numpy"          # "torch" when the inputs are torch tensors

    def __repr__(self) -> str:
        return (f"{len(self.offsets) - 1} sets, {tuple(self.x.shape)} tokens, fde_dim={self.cfg.fde_dim}, "
                f"{self.lib} on {self.device}")


def _simhash_t(cfg: MuveraConfig) -> np.ndarray:
    m = _matrices(cfg)
    simhash = m.get("simhash_t")
    if simhash is None:  # [R, D, k] -> [D, R * k]
        simhash = m["simhash_t"] = np.ascontiguousarray(m["simhash"].transpose(1, 0, 2).reshape(cfg.dim, -1))
    return simhash


def _encode_reference(call: EncodeCall):
    return ref.encode(call.x, call.offsets, _matrices(call.cfg), call.average, call.fill_empty)


def _encode_cpu(call: EncodeCall):
    m = _matrices(call.cfg)
    x = np.ascontiguousarray(call.x)
    N = len(call.offsets) - 1
    cfg = call.cfg
    raw = cfg.num_repetitions * (1 << cfg.num_simhash_projections) * cfg.block_dim
    out = np.empty((N, cfg.fde_dim), np.float32)
    simhash = _simhash_t(cfg)
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


# ---------------------------------------------------------------- device backends (Triton, CUDA)

# Scratch a device call may hold at once (bit strings, AMS projections, the float64 blocks before a
# final sketch); larger calls run in chunks of whole sets.
GPU_SCRATCH_BYTES = 1 << 30
_DEVICE_MATS: dict = {}


def _device_matrices(cfg: MuveraConfig, device) -> dict:
    """The config's matrices (the very arrays the cpu backend reads, built on the host from the
    seed) copied once to `device`, plus the final sketch's inverse index: for output j, the
    inputs i with final_index[i] == j in increasing i (the cpu's summation order)."""
    key = (cfg, str(device))
    d = _DEVICE_MATS.get(key)
    if d is not None:
        return d
    torch = A.torch_module()
    m = _matrices(cfg)

    def dev(a):
        return None if a is None else torch.from_numpy(np.ascontiguousarray(a)).to(device)

    d = {"simhash_t": dev(_simhash_t(cfg)), "ams_index": dev(m["ams_index"]), "ams_sign": dev(m["ams_sign"]),
         "final_order": None, "final_starts": None, "final_sign": None, "final_max_len": 0}
    if m["final_index"] is not None:
        fi = m["final_index"]
        counts = np.bincount(fi, minlength=cfg.fde_dim)
        starts = np.zeros(cfg.fde_dim + 1, np.int64)
        np.cumsum(counts, out=starts[1:])
        d.update(final_order=dev(np.argsort(fi, kind="stable").astype(np.int64)), final_starts=dev(starts),
                 final_sign=dev(m["final_sign"]), final_max_len=int(counts.max()) if counts.size else 0)
    if len(_DEVICE_MATS) > 16:
        _DEVICE_MATS.clear()
    _DEVICE_MATS[key] = d
    return d


def _encode_device(call: EncodeCall, run_chunk):
    """Chunks the sets so the scratch stays within GPU_SCRATCH_BYTES; run_chunk(x, offsets, mats, out)
    encodes one chunk (x its tokens, offsets from 0 on the device) into out (its rows of the result)."""
    torch = A.torch_module()
    cfg = call.cfg
    x = call.x if A.is_torch(call.x) else torch.from_numpy(np.ascontiguousarray(call.x))
    off = call.offsets
    N = len(off) - 1
    out = torch.empty((N, cfg.fde_dim), dtype=torch.float32, device=x.device)
    if N == 0:
        return out
    mats = _device_matrices(cfg, x.device)
    R, P = cfg.num_repetitions, 1 << cfg.num_simhash_projections
    per_token = 4 * R + (4 * R * cfg.block_dim if cfg.projection_dim is not None else 0)
    per_set = 8 * R * P * cfg.block_dim if cfg.final_projection_dim is not None else 0
    cost = off * per_token + np.arange(N + 1, dtype=np.int64) * per_set
    n0 = 0
    while n0 < N:
        n1 = int(np.searchsorted(cost, cost[n0] + GPU_SCRATCH_BYTES, side="right")) - 1
        n1 = min(N, max(n1, n0 + 1))
        lo, hi = int(off[n0]), int(off[n1])
        run_chunk(x[lo:hi], torch.from_numpy(off[n0:n1 + 1] - lo).to(x.device), mats, out[n0:n1])
        n0 = n1
    return out


def _encode_triton(call: EncodeCall):
    kernels = _ext.triton_kernels("muvera")
    cfg = call.cfg

    def run(x, offsets, mats, out):
        kernels.encode_chunk(x, offsets, mats, cfg.num_repetitions, cfg.num_simhash_projections, cfg.block_dim,
                             call.average, call.fill_empty, out)

    return _encode_device(call, run)


def _encode_cuda(call: EncodeCall):
    torch = A.torch_module()
    cfg = call.cfg
    R, k, dp = cfg.num_repetitions, cfg.num_simhash_projections, cfg.block_dim
    raw_dim = R * (1 << k) * dp

    def run(x, offsets, mats, out):
        T, N = int(x.shape[0]), int(offsets.shape[0]) - 1
        dev = x.device
        bits = torch.empty((max(T, 1), R), dtype=torch.int32, device=dev)
        proj = (torch.empty((max(T, 1), R, dp), dtype=torch.float32, device=dev)
                if mats["ams_index"] is not None else None)
        raw = torch.empty((N, raw_dim), dtype=torch.float64, device=dev) if mats["final_order"] is not None else None

        def p(t):
            return 0 if t is None else t.data_ptr()

        with torch.cuda.device(dev):
            _ext.C.muvera_encode_cuda(
                p(x), cfg.dim, T, p(offsets), N, R, k, dp, p(mats["simhash_t"]), p(mats["ams_index"]),
                p(mats["ams_sign"]), int(call.average), int(call.fill_empty), raw_dim, p(mats["final_order"]),
                p(mats["final_starts"]), p(mats["final_sign"]), int(mats["final_max_len"]), cfg.fde_dim,
                p(bits), p(proj), p(raw), p(out), torch.cuda.current_stream().cuda_stream)

    return _encode_device(call, run)


def _cuda_encode_reason(call):
    r = cuda_reason(call)
    if r is None and not hasattr(_ext.C, "muvera_encode_cuda"):
        return "this build has no muvera_encode_cuda"
    return r


_OP.register(Backend("reference", host_reason, _encode_reference))
_OP.register(Backend("cpu", _cpu_encode_reason, _encode_cpu))
_OP.register(Backend("triton", triton_reason, _encode_triton))
_OP.register(Backend("cuda", _cuda_encode_reason, _encode_cuda))


def _check_config(config) -> MuveraConfig:
    if not isinstance(config, MuveraConfig):
        raise TypeError(f"config: expected a vkern.muvera.MuveraConfig, got {type(config).__name__}")
    return config


def _encode(sets, config, doc_offsets, doc_lengths, average, fill_empty, backend, what):
    cfg = _check_config(config)
    if _on_device(sets):
        x, off = _device_packed(sets, doc_offsets, doc_lengths, what)
        like = x
    else:
        x, off, like = packed_docs(sets, doc_offsets, doc_lengths, what)
    if x.shape[1] != cfg.dim:
        raise ValueError(f"{what}: token dim {x.shape[1]} does not match config.dim={cfg.dim}")
    if A.is_torch(x):
        if x.numel() and not bool(A.torch_module().isfinite(x).all()):
            raise ValueError(f"{what}: contains NaN or inf")
    elif x.size and not A.all_finite(x):
        raise ValueError(f"{what}: contains NaN or inf")
    call = EncodeCall(x, off, cfg, average, fill_empty, A.device_of(like) if A.is_torch(like) else "cpu",
                      "torch" if A.is_torch(like) else "numpy")
    out = _OP.pick(backend, call).run(call)
    if A.is_torch(out):
        return out if A.is_torch(like) else out.cpu().numpy()
    return A.torch_module().from_numpy(out) if A.is_torch(like) else out


def _on_device(sets) -> bool:
    first = sets[0] if isinstance(sets, (list, tuple)) and sets else sets
    return A.is_torch(first) and first.device.type != "cpu"


def _device_packed(sets, doc_offsets, doc_lengths, what: str):
    """(float32 [T, D] contiguous on the device, host int64 offsets [N+1]) from device tensors, with
    the checks and messages of ops.pool.packed_docs (the small index arrays are read on the host)."""
    torch = A.torch_module()
    from .ops.maxsim import _host_ints

    def floats(t, name):
        t = A.to_native(t, name)[0]
        if not A.is_float(t):
            raise A.float_dtype_error(name, t)
        return t

    if isinstance(sets, (list, tuple)):
        if doc_offsets is not None or doc_lengths is not None:
            raise ValueError("doc_offsets/doc_lengths: not accepted with a list of documents")
        parts = [floats(d, f"{what}[{i}]") for i, d in enumerate(sets)]
        A.same_place({f"{what}[{i}]": d for i, d in enumerate(parts)})
        for i, d in enumerate(parts):
            if d.ndim != 2 or d.shape[1] != parts[0].shape[1]:
                raise ValueError(f"{what}[{i}]: expected shape [L, D={parts[0].shape[1]}], got {tuple(d.shape)}")
        off = np.zeros(len(parts) + 1, np.int64)
        np.cumsum([int(d.shape[0]) for d in parts], out=off[1:])
        return torch.cat([d.float() for d in parts]).contiguous(), off
    d = floats(sets, what)
    if d.ndim == 3:
        if doc_offsets is not None:
            raise ValueError("doc_offsets: only valid with packed docs [T, D]; padded docs use doc_lengths")
        N, Ld = int(d.shape[0]), int(d.shape[1])
        lens = A.padded_lengths(doc_lengths, d, what)
        off = np.zeros(N + 1, np.int64)
        np.cumsum(lens, out=off[1:])
        mask = torch.from_numpy(np.arange(Ld)[None, :] < lens[:, None]).to(d.device)
        return d[mask].float().contiguous(), off
    if d.ndim != 2:
        raise ValueError(f"{what}: expected shape [T, D], [N, Ld, D] or a list of [L, D], got {tuple(d.shape)}")
    if doc_lengths is not None:
        raise ValueError("doc_lengths: only valid with padded docs [N, Ld, D]; packed docs use doc_offsets")
    if doc_offsets is None:
        raise ValueError(f"doc_offsets: required with packed {what} [T, D]")
    o = A.to_native(doc_offsets, "doc_offsets")[0]
    A.same_place({what: d, "doc_offsets": o})
    if not A.is_integer(o):
        raise TypeError(f"doc_offsets: expected an integer array, got {A.dtype_name(o)}")
    off = _host_ints(o)
    T = int(d.shape[0])
    if off.ndim != 1 or off.shape[0] < 1 or off[0] != 0 or off[-1] != T or np.any(np.diff(off) < 0):
        raise ValueError(f"doc_offsets: must be 1-D, start at 0, be non-decreasing and end at T={T}")
    return d.float().contiguous(), np.ascontiguousarray(off)


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
        if A.is_torch(q):
            off = A.torch_module().from_numpy(off).to(q.device)
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
