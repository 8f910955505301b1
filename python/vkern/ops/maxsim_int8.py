"""int8 documents for MaxSim: ``vkern.quantize_docs`` and the int8 path of ``vkern.maxsim``.

Contract: docs/ops/retrieval_memory.md. A document store quantised once to int8 codes with one
float32 scale per token is 4x smaller than float32 (plus 4 bytes a token), and the CPU kernel
scores it in place with integer dot products (no dequantised copy).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from .. import _arrays as A
from .. import _ext
from .._backend import Backend, cpu_reason, cuda_reason, host_reason, op, triton_reason
from ..reference import maxsim as ref_f32
from ..reference import maxsim_int8 as ref

_OP = op("maxsim_int8")


@dataclass(frozen=True)
class QuantizedDocs:
    """Packed int8 documents: ``codes`` int8 [T, D], ``scales`` float32 [T] (token j is
    ``codes[j] * scales[j]``), ``doc_offsets`` int64 [N+1]. Pass it to ``vkern.maxsim`` as docs."""
    codes: Any
    scales: Any
    doc_offsets: Any

    @property
    def num_docs(self) -> int:
        return int(self.doc_offsets.shape[0]) - 1

    @property
    def dim(self) -> int:
        return int(self.codes.shape[1])

    @property
    def nbytes(self) -> int:
        """Bytes of codes + scales + offsets."""
        return sum(int(a.numel() * a.element_size()) if A.is_torch(a) else int(a.nbytes)
                   for a in (self.codes, self.scales, self.doc_offsets))

    def dequantize(self):
        """float32 [T, D] (same kind as the codes)."""
        if A.is_torch(self.codes):
            return self.codes.float() * self.scales[:, None]
        return self.codes.astype(np.float32) * self.scales[:, None]


def _host(x: Any) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    if x.device.type != "cpu":
        raise ValueError(f"mixed devices: the queries are on the host, an int8 MaxSim input is on {x.device}; "
                         "put every array on one device")
    return x.detach().numpy()


def _finite_or_raise(x: np.ndarray, name: str) -> None:
    if x.size and not np.isfinite(x).all():
        raise ValueError(f"{name}: contains NaN or inf, which int8 codes with a finite scale cannot represent")


def quantize_docs(docs, *, doc_offsets=None, doc_lengths=None) -> QuantizedDocs:
    """Quantise documents to int8, one symmetric scale per token (scale = max|d_j| / 127).

    Args:
        docs: packed [T, D] with ``doc_offsets`` [N+1], padded [N, Ld, D] with optional
            ``doc_lengths`` [N], or a list of [L_i, D] arrays; float32, float16 or bfloat16, finite.

    Returns:
        QuantizedDocs (codes int8 [T, D], scales float32 [T], doc_offsets int64 [N+1]), packed,
        of the same array kind and device as ``docs`` (CUDA tensors are quantised on their device,
        to the same codes). Padding rows are dropped.

    Example:
        >>> import numpy as np, vkern
        >>> qd = vkern.quantize_docs(np.array([[1.0, -0.5], [0.0, 0.0]], np.float32), doc_offsets=np.array([0, 2]))
        >>> qd.codes.tolist(), qd.scales.tolist()
        ([[127, -64], [0, 0]], [0.007874015718698502, 0.0])
    """
    from .maxsim import _pack_list

    like = docs[0] if isinstance(docs, (list, tuple)) and docs else docs
    if isinstance(docs, (list, tuple)):
        if doc_offsets is not None or doc_lengths is not None:
            raise ValueError("doc_offsets/doc_lengths: not accepted with a list of documents")
        d, doc_offsets = _pack_list(docs, None, like if docs else np.zeros((0, 1), np.float32))
    else:
        d, _ = A.to_native(docs, "docs")
        if not A.is_float(d):
            raise A.float_dtype_error("docs", d)
    on_device = A.is_torch(d) and d.device.type != "cpu"

    def small(a, name):   # a small index array on the host (one tiny copy for device docs)
        a = A.to_native(a, name)[0]
        if on_device and A.is_torch(a):
            A.same_place({"docs": d, name: a})
            return a.detach().cpu().numpy()
        return _host(a)

    if d.ndim == 3:
        if doc_offsets is not None:
            raise ValueError("doc_offsets: only valid with packed docs [T, D]; padded docs use doc_lengths")
        N, Ld, D = (int(s) for s in d.shape)
        lens = A.padded_lengths(doc_lengths, d)
        off = np.zeros(N + 1, np.int64)
        np.cumsum(lens, out=off[1:])
        mask = np.arange(Ld)[None, :] < lens[:, None]
        if on_device:
            x = d[A.torch_module().from_numpy(mask).to(d.device)].float()
        else:
            x = A.to_numpy(d, np.float32)[mask]
    elif d.ndim == 2:
        if doc_lengths is not None:
            raise ValueError("doc_lengths: only valid with padded docs [N, Ld, D]; packed docs use doc_offsets")
        if doc_offsets is None:
            raise ValueError("doc_offsets: required with packed docs [T, D]")
        off = _check_offsets(small(doc_offsets, "doc_offsets") if on_device else doc_offsets, int(d.shape[0]))
        x = d.float() if on_device else A.to_numpy(d, np.float32)
    else:
        raise ValueError(f"docs: expected shape [T, D], [N, Ld, D] or a list of [L, D], got {tuple(d.shape)}")
    if on_device:
        # the same codes and scales as the host path (the reference's formula on the device)
        torch = A.torch_module()
        if x.numel() and not bool(torch.isfinite(x).all()):
            raise ValueError("docs: contains NaN or inf, which int8 codes with a finite scale cannot represent")
        codes, scales = quantize_rows_torch(x, ref.DOC_LEVELS)
        return QuantizedDocs(codes.contiguous(), scales.contiguous(), torch.from_numpy(off).to(d.device))
    _finite_or_raise(x, "docs")
    codes, scales = ref.quantize_rows(x, ref.DOC_LEVELS)
    if A.is_torch(like):
        torch = A.torch_module()
        return QuantizedDocs(torch.from_numpy(codes), torch.from_numpy(scales), torch.from_numpy(off))
    return QuantizedDocs(codes, scales, off)


def _check_offsets(doc_offsets, T: int) -> np.ndarray:
    offsets, _ = A.to_native(doc_offsets, "doc_offsets")
    if not A.is_integer(offsets):
        raise TypeError(f"doc_offsets: expected an integer array, got {A.dtype_name(offsets)}")
    off = _host(offsets).astype(np.int64, copy=False)
    if off.ndim != 1 or off.shape[0] < 1:
        raise ValueError(f"doc_offsets: expected shape (N+1,), got {tuple(off.shape)}")
    if off[0] != 0 or off[-1] != T or np.any(np.diff(off) < 0):
        raise ValueError(f"doc_offsets: must start at 0, be non-decreasing and end at T={T}; "
                         f"got first={int(off[0])}, last={int(off[-1])}")
    return np.ascontiguousarray(off)


@dataclass
class Int8Call:
    # NumPy arrays for host queries; torch tensors on the device for device queries (then only the
    # small q_lengths / offsets are host copies)
    q_codes: Any                # int8 [B, Lq, D], contiguous
    q_scales: Any               # float32 [B, Lq]
    q_lengths: np.ndarray       # int64 [B] (host)
    single: bool
    codes: Any                  # int8 [T, D] (rows may be strided)
    scales: Any                 # float32 [T] contiguous
    offsets: np.ndarray         # int64 [N+1] (host)
    topk: Optional[int]
    device: str
    like: Any                   # the queries: results follow their kind
    lib: str = "numpy"          # "torch" when the queries are torch tensors

    @property
    def N(self) -> int:
        return int(self.offsets.shape[0]) - 1

    def __repr__(self) -> str:
        return (f"queries {tuple(self.q_codes.shape)} (quantised), int8 docs {tuple(self.codes.shape)}, N={self.N}, "
                f"topk={self.topk}, {self.lib} on {self.device}")


def is_int8_docs(docs) -> bool:
    if isinstance(docs, QuantizedDocs):
        return True
    if isinstance(docs, (list, tuple)) or not (isinstance(docs, np.ndarray) or A.is_torch(docs)):
        return False
    return A.dtype_name(docs) == "int8"


def _prepare(queries, docs, doc_offsets, doc_lengths, doc_scales, query_lengths, topk) -> Int8Call:
    if isinstance(docs, QuantizedDocs):
        if doc_offsets is not None or doc_scales is not None:
            raise ValueError("doc_offsets/doc_scales: already held by the QuantizedDocs passed as docs")
        codes, doc_scales, doc_offsets = docs.codes, docs.scales, docs.doc_offsets
    else:
        codes = docs
        if doc_scales is None:
            raise ValueError("doc_scales: required with int8 docs (one float32 scale per token; "
                             "vkern.quantize_docs makes both)")
    if doc_lengths is not None:
        raise ValueError("doc_lengths: int8 docs are packed [T, D] with doc_offsets")
    q, _ = A.to_native(queries, "queries")
    if not A.is_float(q):
        raise A.float_dtype_error("queries", q)
    if q.ndim not in (2, 3):
        raise ValueError(f"queries: expected shape [Lq, D] or [B, Lq, D], got {tuple(q.shape)}")
    device = A.device_of(q)
    single = q.ndim == 2
    if single and query_lengths is not None:
        raise ValueError("query_lengths: only valid with batched queries [B, Lq, D]")
    if device != "cpu":
        return _prepare_device(q, single, codes, doc_scales, doc_offsets, query_lengths, topk, device)
    codes = _host(A.to_native(codes, "docs")[0])
    if codes.ndim != 2:
        raise ValueError(f"docs: int8 docs must be packed [T, D], got shape {codes.shape}")
    T, D = (int(s) for s in codes.shape)
    _check_dim(int(q.shape[-1]), D)
    scales = _host(A.to_native(doc_scales, "doc_scales")[0])
    if scales.dtype != np.float32:
        raise TypeError(f"doc_scales: expected float32, got {scales.dtype}")
    if scales.shape != (T,):
        raise ValueError(f"doc_scales: expected shape ({T},) (one per token row), got {scales.shape}")
    _finite_or_raise(scales, "doc_scales")
    if doc_offsets is None:
        raise ValueError("doc_offsets: required with packed int8 docs [T, D]")
    off = _check_offsets(doc_offsets, T)
    qh = A.to_numpy(q, np.float32)
    if single:
        qh = qh[None]
    B, Lq = int(qh.shape[0]), int(qh.shape[1])
    if query_lengths is not None:
        ql = _host(A.to_native(query_lengths, "query_lengths")[0])
        if ql.dtype.kind not in "iu":
            raise TypeError(f"query_lengths: expected an integer array, got {ql.dtype}")
        ql = _check_query_lengths(ql, B, Lq)
    else:
        ql = np.full(B, Lq, np.int64)
    valid = np.arange(Lq)[None, :] < ql[:, None]
    _finite_or_raise(qh[valid], "queries")
    from .maxsim import _topk_arg

    topk = _topk_arg(topk)
    q_codes, q_scales = ref.quantize_rows(np.where(valid[:, :, None], qh, 0), ref.QUERY_LEVELS)
    return Int8Call(np.ascontiguousarray(q_codes), np.ascontiguousarray(q_scales), ql, single, codes,
                    np.ascontiguousarray(scales), off, topk, device, q, "torch" if A.is_torch(q) else "numpy")


def _check_dim(qdim: int, D: int) -> None:
    if qdim != D:
        raise ValueError(f"docs: expected last dim D={qdim} (from queries), got {D}")
    if D > 131072:
        raise ValueError(f"docs: int8 MaxSim needs D <= 131072 (int32 accumulation), got {D}")


def _check_query_lengths(ql: np.ndarray, B: int, Lq: int) -> np.ndarray:
    if ql.shape != (B,):
        raise ValueError(f"query_lengths: expected shape ({B},) (one per query), got {ql.shape}")
    if np.any(ql < 0) or np.any(ql > Lq):
        raise ValueError(f"query_lengths: every length must be in [0, Lq={Lq}]")
    return ql.astype(np.int64)


def quantize_rows_torch(x, levels: int):
    """quantize_rows of the reference for a torch tensor, on its device: the same float32 scale and
    the same codes (float64 division, round half to even), so every backend scores the same codes."""
    torch = A.torch_module()
    x = x.float()
    amax = x.abs().amax(dim=-1) if x.shape[-1] else torch.zeros(x.shape[:-1], device=x.device)
    scales = amax / torch.tensor(levels, dtype=torch.float32, device=x.device)
    safe = torch.where(scales > 0, scales, torch.ones_like(scales)).double()
    codes = torch.round(x.double() / safe[..., None]).clamp_(-levels, levels).to(torch.int8)
    return codes, scales


def _prepare_device(q, single, codes, doc_scales, doc_offsets, query_lengths, topk, device) -> Int8Call:
    """The checks of the host path on device tensors (small index arrays are copied to the host to be
    checked; the finiteness checks run on the device), then the queries quantised on the device."""
    torch = A.torch_module()
    from .maxsim import _host_ints, _topk_arg

    codes = A.to_native(codes, "docs")[0]
    scales = A.to_native(doc_scales, "doc_scales")[0]
    if doc_offsets is None:
        raise ValueError("doc_offsets: required with packed int8 docs [T, D]")
    offsets = A.to_native(doc_offsets, "doc_offsets")[0]
    arrays = {"queries": q, "docs": codes, "doc_scales": scales, "doc_offsets": offsets}
    if query_lengths is not None:
        arrays["query_lengths"] = A.to_native(query_lengths, "query_lengths")[0]
    A.same_place(arrays)
    if A.dtype_name(codes) != "int8":
        raise TypeError(f"docs: expected int8 codes, got {A.dtype_name(codes)}")
    if codes.ndim != 2:
        raise ValueError(f"docs: int8 docs must be packed [T, D], got shape {tuple(codes.shape)}")
    T, D = (int(s) for s in codes.shape)
    _check_dim(int(q.shape[-1]), D)
    if scales.dtype != torch.float32:
        raise TypeError(f"doc_scales: expected float32, got {A.dtype_name(scales)}")
    if tuple(scales.shape) != (T,):
        raise ValueError(f"doc_scales: expected shape ({T},) (one per token row), got {tuple(scales.shape)}")
    if T and not bool(torch.isfinite(scales).all()):
        raise ValueError("doc_scales: contains NaN or inf, which int8 codes with a finite scale cannot represent")
    if not A.is_integer(offsets):
        raise TypeError(f"doc_offsets: expected an integer array, got {A.dtype_name(offsets)}")
    off = _check_offsets(_host_ints(offsets), T)
    qd = q[None] if single else q
    B, Lq = int(qd.shape[0]), int(qd.shape[1])
    if query_lengths is not None:
        ql_native = arrays["query_lengths"]
        if not A.is_integer(ql_native):
            raise TypeError(f"query_lengths: expected an integer array, got {A.dtype_name(ql_native)}")
        ql = _check_query_lengths(_host_ints(ql_native), B, Lq)
    else:
        ql = np.full(B, Lq, np.int64)
    valid = torch.arange(Lq, device=q.device)[None, :] < torch.from_numpy(ql).to(q.device)[:, None]
    qf = torch.where(valid[:, :, None], qd.float(), 0.0)
    if qf.numel() and not bool(torch.isfinite(qf).all()):
        raise ValueError("queries: contains NaN or inf, which int8 codes with a finite scale cannot represent")
    topk = _topk_arg(topk)
    q_codes, q_scales = quantize_rows_torch(qf, ref.QUERY_LEVELS)
    if D > 1 and codes.stride(1) != 1 or T > 1 and codes.stride(0) < D:
        codes = codes.contiguous()   # the kernels read rows with unit column stride (as the cpu path)
    return Int8Call(q_codes.contiguous(), q_scales.contiguous(), ql, single, codes, scales.contiguous(),
                    off, topk, device, q, "torch")


def _reference_run(call: Int8Call):
    scores = ref.maxsim_int8_scores(call.q_codes, call.q_scales, call.q_lengths, call.codes, call.scales,
                                    call.offsets)
    if call.topk is None:
        return scores, None, None
    vals, idx = ref_f32.topk(scores, call.topk)
    return None, vals, idx


def _cpu_run(call: Int8Call):
    codes = call.codes
    if codes.shape[1] > 1 and codes.strides[1] != 1 or codes.strides[0] < 0:
        codes = np.ascontiguousarray(codes)
    row_stride = int(codes.strides[0]) if codes.shape[0] > 1 else int(codes.shape[1])
    row_stride = max(row_stride, int(codes.shape[1]))
    starts = np.ascontiguousarray(call.offsets[:-1])
    lens = np.ascontiguousarray(np.diff(call.offsets))
    B, Lq, D = call.q_codes.shape
    N = call.N
    scores = vals = idx = None
    k = 0
    if call.topk is None:
        scores = np.empty((B, N), np.float32)
    else:
        k = min(call.topk, N)
        vals = np.empty((B, k), np.float32)
        idx = np.empty((B, k), np.int64)
        if k == 0:
            return None, vals, idx
    _ext.C.maxsim_int8_cpu(
        call.q_codes.ctypes.data, call.q_scales.ctypes.data, B, Lq, D, call.q_lengths.ctypes.data,
        codes.ctypes.data if codes.size else 0, row_stride, call.scales.ctypes.data if N else 0,
        starts.ctypes.data, lens.ctypes.data, N, 0 if scores is None else scores.ctypes.data, k,
        0 if vals is None else vals.ctypes.data, 0 if idx is None else idx.ctypes.data)
    return scores, vals, idx


def _device_inputs(call: Int8Call):
    """(q_codes, q_scales, q_lengths int32, codes, scales, offsets int64) as torch tensors on the
    queries' device (host NumPy arrays, under the Triton interpreter, are wrapped without a copy)."""
    torch = A.torch_module()
    dev = call.like.device

    def t(x):
        if A.is_torch(x):
            return x
        if any(st < 0 for st in x.strides):   # torch cannot wrap negative strides (the cpu path copies too)
            x = np.ascontiguousarray(x)
        return torch.from_numpy(x)

    codes = t(call.codes)
    if codes.dim() == 2 and codes.shape[1] > 1 and codes.stride(1) != 1:
        codes = codes.contiguous()
    qlens = torch.from_numpy(call.q_lengths.astype(np.int32)).to(dev)
    offsets = torch.from_numpy(call.offsets).to(dev)
    return t(call.q_codes), t(call.q_scales), qlens, codes, t(call.scales), offsets


def _finish(call: Int8Call, scores, topk_fn):
    if call.topk is None:
        return scores, None, None
    k = min(call.topk, call.N)
    torch = A.torch_module()
    B = int(scores.shape[0])
    if k == 0:
        return None, scores.new_empty((B, 0)), torch.empty((B, 0), dtype=torch.int64, device=scores.device)
    vals, idx = topk_fn(scores, k)
    return None, vals, idx


def _triton_run(call: Int8Call):
    from .maxsim import _topk_torch

    kernels = _ext.triton_kernels("maxsim_int8")
    scores = kernels.maxsim_int8_scores(*_device_inputs(call))
    return _finish(call, scores, _topk_torch)


def _cuda_run(call: Int8Call):
    torch = A.torch_module()
    q_codes, q_scales, qlens, codes, scales, offsets = _device_inputs(call)
    B, Lq, D = (int(s) for s in q_codes.shape)
    N = call.N
    row_stride = int(codes.stride(0)) if codes.shape[0] > 1 else D
    scores = torch.empty((B, N), dtype=torch.float32, device=q_codes.device)
    with torch.cuda.device(q_codes.device):
        stream = torch.cuda.current_stream().cuda_stream
        _ext.C.maxsim_int8_cuda(q_codes.data_ptr(), q_scales.data_ptr(), B, Lq, D, qlens.data_ptr(),
                                codes.data_ptr(), row_stride, scales.data_ptr(), offsets.data_ptr(), N,
                                scores.data_ptr(), stream)

        def topk_fn(s, k):
            vals = torch.empty((B, k), dtype=torch.float32, device=s.device)
            idx = torch.empty((B, k), dtype=torch.int64, device=s.device)
            _ext.C.topk_cuda(s.data_ptr(), B, N, k, vals.data_ptr(), idx.data_ptr(), stream)
            return vals, idx

        return _finish(call, scores, topk_fn)


def _cuda_why_not(call: Int8Call):
    r = cuda_reason(call)
    if r is None and not hasattr(_ext.C, "maxsim_int8_cuda"):
        return "this build has no maxsim_int8_cuda"
    return r


_OP.register(Backend("reference", host_reason, _reference_run))
_OP.register(Backend("cpu", cpu_reason, _cpu_run))
_OP.register(Backend("triton", triton_reason, _triton_run))
_OP.register(Backend("cuda", _cuda_why_not, _cuda_run))


def kernel_name() -> str:
    """The int8 CPU kernel the next call uses (e.g. 'i8_avx512vnni'), or '' without the extension."""
    return str(_ext.C.maxsim_int8_kernel()) if _ext.C is not None else ""


def maxsim_int8_impl(queries, docs, *, doc_offsets=None, doc_lengths=None, doc_scales=None, query_lengths=None,
                     topk=None, backend: str = "auto"):
    call = _prepare(queries, docs, doc_offsets, doc_lengths, doc_scales, query_lengths, topk)
    scores, vals, idx = _OP.pick(backend, call).run(call)
    if call.topk is None:
        return _as_kind(scores[0] if call.single else scores, call.like)
    if call.single:
        vals, idx = vals[0], idx[0]
    return _as_kind(vals, call.like), _as_kind(idx, call.like)


def _as_kind(x, like):
    """A result (NumPy from the host backends, torch from the device ones) as the queries' kind."""
    if A.is_torch(x):
        return x if A.is_torch(like) else x.cpu().numpy()
    return A.as_kind(x, like)
