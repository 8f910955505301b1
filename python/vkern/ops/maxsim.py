"""vkern.maxsim: late-interaction (ColBERT) scoring, SPEC §1.

The wrapper validates every input before any kernel runs, normalises the
three document layouts, picks a backend and hands results back as the
caller's array kind.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from .. import _arrays as A
from .. import _ext
from .._backend import Backend, cpu_reason, cuda_reason, host_reason, op, triton_reason
from ..reference import maxsim as ref

_OP = op("maxsim")


@dataclass
class MaxsimCall:
    q: Any                      # native [B, Lq, D]
    single: bool                # queries came as [Lq, D]
    q_lengths: Any              # native int [B] or None
    docs: Any                   # native [T, D] (packed) or [N, Ld, D] (padded)
    packed: bool
    doc_offsets: Any            # native int [N+1] (packed)
    doc_lengths: Any            # native int [N] or None (padded)
    N: int
    topk: Optional[int]
    device: str
    lib: str                    # "numpy" or "torch"
    origin: str = "numpy"       # how to hand results back (see _arrays.from_native)
    # Host int64 copies of the small index arrays, made once while validating:
    host_offsets: Optional[np.ndarray] = None    # [N+1] (packed)
    host_doc_lengths: Optional[np.ndarray] = None  # [N] (padded; Ld where not given)
    host_q_lengths: Optional[np.ndarray] = None  # [B] (Lq where not given)

    def __repr__(self) -> str:
        layout = f"packed docs {tuple(self.docs.shape)}" if self.packed else f"padded docs {tuple(self.docs.shape)}"
        return (f"queries {tuple(self.q.shape)} {A.dtype_name(self.q)}, {layout} {A.dtype_name(self.docs)}, "
                f"N={self.N}, topk={self.topk}, {self.lib} on {self.device}")


# ----------------------------------------------------------------- validation

def _check_float(x: Any, name: str) -> None:
    if not A.is_float(x):
        raise A.float_dtype_error(name, x)


def _check_index(x: Any, name: str, length: int, length_desc: str) -> None:
    if not A.is_integer(x):
        raise TypeError(f"{name}: expected an integer array, got {A.dtype_name(x)}")
    if x.ndim != 1 or x.shape[0] != length:
        raise ValueError(f"{name}: expected shape ({length},) ({length_desc}), got {tuple(x.shape)}")


_host_ints = A.host_ints   # small index arrays as host int64 (ops.maxsim_int8 and muvera import it from here)


def _pack_list(docs: Sequence[Any], D: Optional[int], like: Any):
    """(packed docs [T, D], offsets [N+1]); an empty list gives empty docs of `like`'s (the
    queries') kind, dtype and device, so that it scores as N = 0 on every backend."""
    natives = [A.to_native(d, f"docs[{i}]")[0] for i, d in enumerate(docs)]
    for i, d in enumerate(natives):
        _check_float(d, f"docs[{i}]")
        if d.ndim != 2:
            raise ValueError(f"docs[{i}]: expected shape [L, D], got {tuple(d.shape)}")
        if D is not None and d.shape[1] != D:
            raise ValueError(f"docs[{i}]: expected last dim D={D} (from queries), got {d.shape[1]}")
    lengths = [int(d.shape[0]) for d in natives]
    offsets = np.zeros(len(natives) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if not natives:
        return A.empty_like_kind((0, D or 1), A.dtype_name(like), like), A.as_kind(offsets, like)
    kinds = {type(d) for d in natives}
    if len(kinds) > 1:
        raise TypeError("docs: list mixes NumPy arrays and torch tensors")
    if isinstance(natives[0], np.ndarray):
        dt = np.result_type(*natives)
        return np.concatenate([d.astype(dt, copy=False) for d in natives], axis=0), offsets
    torch = A.torch_module()
    devices = {d.device for d in natives}
    if len(devices) > 1:
        raise ValueError(f"docs: list mixes devices {sorted(map(str, devices))}")
    dt = natives[0].dtype
    for d in natives:
        dt = torch.promote_types(dt, d.dtype)
    packed = torch.cat([d.to(dt) for d in natives], dim=0)
    return packed, torch.from_numpy(offsets).to(packed.device)


def _prepare(queries, docs, doc_offsets, doc_lengths, query_lengths, topk) -> MaxsimCall:
    q, origin = A.to_native(queries, "queries")
    _check_float(q, "queries")
    if q.ndim not in (2, 3):
        raise ValueError(f"queries: expected shape [Lq, D] or [B, Lq, D], got {tuple(q.shape)}")
    single = q.ndim == 2
    D = int(q.shape[-1])
    if D < 1:
        raise ValueError("queries: the embedding dim D must be >= 1")
    if single:
        if query_lengths is not None:
            raise ValueError("query_lengths: only valid with batched queries [B, Lq, D]")
        q = q[None]
    B, Lq = int(q.shape[0]), int(q.shape[1])

    if isinstance(docs, (list, tuple)):
        if doc_offsets is not None or doc_lengths is not None:
            raise ValueError("doc_offsets/doc_lengths: not accepted with a list of documents")
        d, doc_offsets = _pack_list(docs, D, q)
    else:
        d, _ = A.to_native(docs, "docs")
        _check_float(d, "docs")
    if d.ndim == 2:
        if doc_offsets is None:
            raise ValueError("doc_offsets: required with packed docs [T, D] (or pass docs as [N, Ld, D] or a list)")
        if doc_lengths is not None:
            raise ValueError("doc_lengths: only valid with padded docs [N, Ld, D]; packed docs use doc_offsets")
        packed = True
    elif d.ndim == 3:
        if doc_offsets is not None:
            raise ValueError("doc_offsets: only valid with packed docs [T, D]; padded docs use doc_lengths")
        packed = False
    else:
        raise ValueError(f"docs: expected shape [T, D], [N, Ld, D] or a list of [L, D], got {tuple(d.shape)}")
    if int(d.shape[-1]) != D:
        raise ValueError(f"docs: expected last dim D={D} (from queries), got {int(d.shape[-1])}")

    device = A.device_of(q)
    arrays = {"queries": q, "docs": d}
    offsets = lengths = qlens = None
    if packed:
        offsets, _ = A.to_native(doc_offsets, "doc_offsets")
        if not A.is_integer(offsets):
            raise TypeError(f"doc_offsets: expected an integer array, got {A.dtype_name(offsets)}")
        if offsets.ndim != 1 or offsets.shape[0] < 1:
            raise ValueError(f"doc_offsets: expected shape (N+1,), got {tuple(offsets.shape)}")
        arrays["doc_offsets"] = offsets
        N = int(offsets.shape[0]) - 1
    else:
        N = int(d.shape[0])
        if doc_lengths is not None:
            lengths, _ = A.to_native(doc_lengths, "doc_lengths")
            _check_index(lengths, "doc_lengths", N, "one per document")
            arrays["doc_lengths"] = lengths
    if query_lengths is not None:
        qlens, _ = A.to_native(query_lengths, "query_lengths")
        _check_index(qlens, "query_lengths", B, "one per query")
        arrays["query_lengths"] = qlens
    lib = A.same_place(arrays)

    # Value checks on the small index arrays, before any kernel runs.
    off = ln = None
    if packed:
        off = _host_ints(offsets)
        T = int(d.shape[0])
        if off[0] != 0 or off[-1] != T or np.any(np.diff(off) < 0):
            raise ValueError(f"doc_offsets: must start at 0, be non-decreasing and end at T={T}; "
                             f"got first={int(off[0])}, last={int(off[-1])}, "
                             f"decreasing steps={int(np.sum(np.diff(off) < 0))}")
    else:
        ln = A.padded_lengths(lengths, d)
    ql = _host_ints(qlens) if qlens is not None else np.full(B, Lq, dtype=np.int64)
    if np.any(ql < 0) or np.any(ql > Lq):
        raise ValueError(f"query_lengths: every length must be in [0, Lq={Lq}], got min={int(ql.min())}, max={int(ql.max())}")

    topk = _topk_arg(topk)
    return MaxsimCall(q, single, qlens, d, packed, offsets, lengths, N, topk, device, lib, origin,
                      host_offsets=off, host_doc_lengths=ln, host_q_lengths=np.ascontiguousarray(ql))


# ------------------------------------------------------------------ helpers

def _doc_extents(call: MaxsimCall):
    """Host int64 (starts, lens, row_stride) describing each document's rows,
    in elements from the docs base pointer: no copy of the documents."""
    strides = A.elem_strides(call.docs)
    if call.packed:
        off = call.host_offsets
        return off[:-1] * strides[0], np.diff(off), strides[0]
    return np.arange(call.N, dtype=np.int64) * strides[0], call.host_doc_lengths, strides[1]


def _packed_offsets(call: MaxsimCall):
    """(docs [T, D], doc_offsets int64 [N+1]) as a packed, contiguous pair of
    the call's kind; padded docs are compacted (one copy)."""
    if call.packed:
        return A.contiguous(call.docs), call.doc_offsets
    N, Ld, D = (int(s) for s in call.docs.shape)
    lens = call.host_doc_lengths
    offsets = np.zeros(N + 1, dtype=np.int64)
    np.cumsum(lens, out=offsets[1:])
    mask = np.arange(Ld)[None, :] < lens[:, None]
    if isinstance(call.docs, np.ndarray):
        return np.ascontiguousarray(call.docs[mask]), offsets
    torch = A.torch_module()
    m = torch.from_numpy(mask).to(call.docs.device)
    return call.docs[m].contiguous(), torch.from_numpy(offsets).to(call.docs.device)


def _topk_torch(scores, k: int):
    """Best k per row, ties to the lower index, NaN last (stable sort)."""
    torch = A.torch_module()
    key = torch.where(torch.isnan(scores), torch.full_like(scores, -float("inf")), scores)
    nan_last = torch.isnan(scores)
    # Sort by NaN-ness first (stable), then stable descending by score.
    order = torch.argsort(key, dim=1, descending=True, stable=True)
    order = torch.gather(order, 1, torch.argsort(torch.gather(nan_last, 1, order).to(torch.int8), dim=1, stable=True))
    idx = order[:, :k].contiguous()
    return torch.gather(scores, 1, idx), idx


# ----------------------------------------------------------------- backends

_reference_why_not = host_reason


def _reference_run(call: MaxsimCall):
    docs, offsets = _packed_offsets(call)
    host_offsets = call.host_offsets if call.packed else _host_ints(offsets)  # padded: built by _packed_offsets
    scores = ref.maxsim_scores(A.to_numpy(call.q), call.host_q_lengths, A.to_numpy(docs), host_offsets)
    if call.topk is None:
        return A.as_kind(scores, call.q), None, None
    vals, idx = ref.topk(scores, call.topk)
    return None, A.as_kind(vals, call.q), A.as_kind(idx, call.q)


_cpu_why_not = cpu_reason


def _topk_arg(topk):
    """topk as a Python int >= 1, or None; TypeError/ValueError naming it otherwise."""
    if topk is None:
        return None
    if isinstance(topk, bool) or not isinstance(topk, (int, np.integer)):
        raise TypeError(f"topk: expected an int or None, got {type(topk).__name__}")
    if topk < 1:
        raise ValueError(f"topk: expected k >= 1, got {int(topk)}")
    return int(topk)


def _cpu_inputs(call: MaxsimCall):
    """What the cpu kernels read: (q, docs, starts, lens, row_stride). Queries keep their strides unless
    one is negative or not a whole element (then one contiguous copy); documents get contiguous rows;
    starts/lens are contiguous int64 element offsets and token counts per document."""
    q = call.q
    if isinstance(q, np.ndarray) and any(s < 0 or s % q.itemsize for s in q.strides):
        q = np.ascontiguousarray(q)
    docs = call.docs if A.rows_contiguous(call.docs) else A.contiguous(call.docs)
    starts, lens, row_stride = _doc_extents(dataclasses.replace(call, docs=docs))
    return (q, docs, np.ascontiguousarray(starts, dtype=np.int64), np.ascontiguousarray(lens, dtype=np.int64),
            row_stride)


def _cpu_run(call: MaxsimCall):
    q, docs, starts, lens, row_stride = _cpu_inputs(call)
    qlens = call.host_q_lengths
    B, Lq, D = (int(s) for s in q.shape)
    qs = A.elem_strides(q)
    scores = vals = idx = None
    k = 0
    if call.topk is None:
        scores = A.empty_like_kind((B, call.N), "float32", call.q)
    else:
        k = min(call.topk, call.N)
        vals = A.empty_like_kind((B, k), "float32", call.q)
        idx = A.empty_like_kind((B, k), "int64", call.q)
    if k == 0 and call.topk is not None:  # N == 0: nothing to rank
        return None, vals, idx
    _ext.C.maxsim_cpu(
        A.data_ptr(q), A.DTYPE_CODE[A.dtype_name(q)], B, Lq, D, qs[0], qs[1], qs[2], qlens.ctypes.data,
        A.data_ptr(docs), A.DTYPE_CODE[A.dtype_name(docs)], int(row_stride), starts.ctypes.data, lens.ctypes.data,
        call.N, 0 if scores is None else A.data_ptr(scores), k,
        0 if vals is None else A.data_ptr(vals), 0 if idx is None else A.data_ptr(idx), 0, 0, 0)
    return scores, vals, idx


def _gpu_inputs(call: MaxsimCall):
    """Contiguous packed torch inputs for the Triton and CUDA kernels; queries
    are cast to the documents' dtype (tiny) so one kernel dtype serves both."""
    torch = A.torch_module()
    docs, offsets = _packed_offsets(call)
    offsets = offsets.to(torch.int64).contiguous()
    q = call.q.to(docs.dtype).contiguous()
    B, Lq = int(q.shape[0]), int(q.shape[1])
    if call.q_lengths is None:
        qlens = torch.full((B,), Lq, dtype=torch.int32, device=q.device)
    else:
        qlens = call.q_lengths.to(torch.int32).contiguous()
    return q, qlens, docs, offsets


def _finish_gpu(call: MaxsimCall, scores, topk_fn):
    if call.topk is None:
        return scores, None, None
    k = min(call.topk, call.N)
    if k == 0:
        torch = A.torch_module()
        B = int(scores.shape[0])
        return None, scores.new_empty((B, 0)), torch.empty((B, 0), dtype=torch.int64, device=scores.device)
    vals, idx = topk_fn(scores, k)
    return None, vals, idx


_triton_why_not = triton_reason  # bf16 included: under the interpreter the kernel widens bf16 tiles itself


def _triton_run(call: MaxsimCall):
    kernels = _ext.triton_kernels("maxsim")
    q, qlens, docs, offsets = _gpu_inputs(call)
    scores = kernels.maxsim_scores(q, qlens, docs, offsets)
    return _finish_gpu(call, scores, _topk_torch)


_cuda_why_not = cuda_reason


def _cuda_run(call: MaxsimCall):
    torch = A.torch_module()
    q, qlens, docs, offsets = _gpu_inputs(call)
    B, Lq, D = (int(s) for s in q.shape)
    scores = torch.empty((B, call.N), dtype=torch.float32, device=q.device)
    with torch.cuda.device(q.device):
        stream = torch.cuda.current_stream().cuda_stream
        _ext.C.maxsim_cuda(q.data_ptr(), docs.data_ptr(), A.DTYPE_CODE[A.dtype_name(docs)], B, Lq, D,
                           qlens.data_ptr(), offsets.data_ptr(), call.N, scores.data_ptr(), stream)

        def topk_fn(s, k):
            vals = torch.empty((B, k), dtype=torch.float32, device=s.device)
            idx = torch.empty((B, k), dtype=torch.int64, device=s.device)
            _ext.C.topk_cuda(s.data_ptr(), B, call.N, k, vals.data_ptr(), idx.data_ptr(), stream)
            return vals, idx

        return _finish_gpu(call, scores, topk_fn)


_OP.register(Backend("reference", _reference_why_not, _reference_run))
_OP.register(Backend("cpu", _cpu_why_not, _cpu_run))
_OP.register(Backend("triton", _triton_why_not, _triton_run))
_OP.register(Backend("cuda", _cuda_why_not, _cuda_run))


# --------------------------------------------------------------------- API

def maxsim_impl(queries, docs, *, doc_offsets=None, doc_lengths=None, query_lengths=None, topk=None,
                backend: str = "auto"):
    call = _prepare(queries, docs, doc_offsets, doc_lengths, query_lengths, topk)
    scores, vals, idx = _OP.pick(backend, call).run(call)
    if call.topk is None:
        out = scores[0] if call.single else scores
        return A.from_native(out, call.origin)
    if call.single:
        vals, idx = vals[0], idx[0]
    return A.from_native(vals, call.origin), A.from_native(idx, call.origin)


def maxsim(queries, docs, *, doc_offsets=None, doc_lengths=None, query_lengths=None,
           topk: Optional[int] = None, backend: str = "auto", doc_scales=None, doc_ids=None):
    """MaxSim (ColBERT late-interaction) scores of queries against documents.

    score(q, d) = sum over unmasked query tokens i of max over tokens j of d of <q_i, d_j>,
    accumulated in float32 (inputs may be float32, float16 or bfloat16).

    Args:
        queries: [Lq, D] (one query) or [B, Lq, D] (a batch).
        docs: packed [T, D] with ``doc_offsets`` [N+1]; padded [N, Ld, D] with optional
            ``doc_lengths`` [N]; or a list of [L_i, D] arrays.
        query_lengths: [B] valid tokens per query; tokens past it add nothing.
        topk: if given, return only the k best documents per query.
        backend: "auto", "cpu", "cuda", "triton" or "reference" (VKERN_BACKEND overrides "auto").
        doc_scales: with int8 docs [T, D] only: float32 [T], one scale per token. Docs may also be a
            ``vkern.QuantizedDocs`` (from ``vkern.quantize_docs``); both are scored in place with
            integer dot products (queries quantised per call; docs/ops/retrieval_memory.md).
        doc_ids: score only these documents: int [K] for every query, or [B, K] per query. Scores
            are [K] / [B, K] in that order; top-k indices are the original document ids. The CPU
            kernel reads the candidates' rows in place (e.g. from an ``np.memmap`` store).

    Returns:
        float32 scores [N] (or [B, N]); with ``topk=k``: ``(scores, indices)`` of shape [k]
        (or [B, k]), best first, ties to the lower index, NaN last; k > N returns N.
        An empty document scores -inf. Masked document tokens never take part. Results are
        the same array kind (NumPy / torch) and device as ``queries``.

    Gradients: with torch inputs that require grad (and no ``topk``), the scores are
    differentiable for queries and documents (packed, padded or a list). The forward keeps only
    the argmax document token per (query, document, query token); the backward scatters from it
    (memory O(B * N * Lq), never the [B, N, Lq, Ld] similarities). On ties the gradient goes to
    the lower token index; masked tokens and empty documents get zero gradient.

    Example:
        >>> import numpy as np, vkern
        >>> q = np.eye(2, 4, dtype=np.float32)              # 2 query tokens, D = 4
        >>> d = np.eye(3, 4, dtype=np.float32)              # 3 document tokens
        >>> vkern.maxsim(q, d, doc_offsets=np.array([0, 1, 3])).tolist()
        [1.0, 1.0]
    """
    from . import maxsim_int8

    if doc_ids is not None:
        from .maxsim_subset import maxsim_subset_impl

        return maxsim_subset_impl(queries, docs, doc_ids=doc_ids, doc_offsets=doc_offsets, doc_lengths=doc_lengths,
                                  doc_scales=doc_scales, query_lengths=query_lengths, topk=topk, backend=backend)
    if doc_scales is not None or maxsim_int8.is_int8_docs(docs):
        return maxsim_int8.maxsim_int8_impl(queries, docs, doc_offsets=doc_offsets, doc_lengths=doc_lengths,
                                            doc_scales=doc_scales, query_lengths=query_lengths, topk=topk,
                                            backend=backend)
    torch = A.torch_module() if A.is_torch(queries) else None
    if torch is not None:
        from .._torch import maxsim as _torch_ops  # registers the vkern:: ops on first use of torch inputs

        if isinstance(docs, (list, tuple)) and topk is None and torch.is_grad_enabled() and (
                queries.requires_grad or any(A.is_torch(d) and d.requires_grad for d in docs)):
            docs, doc_offsets = _pack_list(docs, int(queries.shape[-1]), queries)   # torch.cat: grads flow to each item
        if not isinstance(docs, (list, tuple)) and (
                torch.compiler.is_compiling() or (topk is None and A.is_torch(docs) and _torch_ops.needs_grad(queries, docs))):
            return _torch_ops.call_maxsim(queries, docs, doc_offsets, doc_lengths, query_lengths, topk, backend)
    return maxsim_impl(queries, docs, doc_offsets=doc_offsets, doc_lengths=doc_lengths,
                       query_lengths=query_lengths, topk=topk, backend=backend)
