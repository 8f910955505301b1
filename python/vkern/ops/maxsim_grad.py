"""MaxSim's forward with argmax and its backward (the pieces ``vkern.maxsim`` trains through).

The forward keeps, per (query b, document n, query token i), only the index of the document
token that holds the max (int32 ``[B, N, Lq]``, index within the document, -1 for masked query
tokens and empty documents; the lower index on ties). The backward scatters from it:

    grad_q[b, i]                += g[b, n] * d_n[argmax[b, n, i]]
    grad_d_n[argmax[b, n, i]]   += g[b, n] * q[b, i]

so its memory is the argmax (O(B * N * Lq)) and the gradients themselves, never the
``[B, N, Lq, Ld]`` similarities. Backends: ``reference`` (NumPy, float64), ``cpu`` (the C++
kernel records the argmax inside its register tiles; the backward is a C++ scatter), ``triton``
(kernels/maxsim_grad.py: grad_d by float32 atomics) and ``cuda`` (csrc/cuda/maxsim_grad.cu: no
atomics, bit-reproducible); the GPU kernels read padded documents and the zero mask in place.
"""
from __future__ import annotations

import numpy as np

from .. import _arrays as A
from .. import _ext
from . import maxsim as M

def _host_packed(call: M.MaxsimCall):
    """(docs [T, D], host offsets [N+1]) packed; padded docs compacted (one copy)."""
    docs, offsets = M._packed_offsets(call)
    return docs, (call.host_offsets if call.packed else M._host_ints(offsets))


# ------------------------------------------------------------------ forward

def _zero_masked(call, mask):
    """The call with masked document tokens replaced by zero rows (one copy; the fallback backends'
    way to the zero-mask mode), and the mask packed like the documents [T]."""
    import dataclasses
    keep = mask.reshape(tuple(call.docs.shape[:-1]) + (1,))
    docs = call.docs * (keep.astype(call.docs.dtype) if isinstance(keep, np.ndarray) else keep.to(call.docs.dtype))
    zcall = dataclasses.replace(call, docs=docs)
    if call.packed:
        return zcall, mask
    flat, _ = M._packed_offsets(dataclasses.replace(call, docs=mask[..., None]))
    return zcall, flat[:, 0]


def _drop_masked_argmax(arg, packed_mask, off):
    """argmax entries that landed on a masked token -> -1 (a masked similarity passes no gradient)."""
    T = int(packed_mask.shape[0])
    if T == 0:
        return arg
    if isinstance(arg, np.ndarray):
        rows = np.minimum(off[:-1][None, :, None] + np.maximum(arg, 0), T - 1)
        arg[(arg >= 0) & ~packed_mask[rows].astype(bool)] = -1
        return arg
    torch = A.torch_module()
    starts = torch.from_numpy(off[:-1]).to(arg.device)
    rows = (starts[None, :, None] + arg.clamp(min=0).long()).clamp(max=T - 1)
    return torch.where((arg >= 0) & packed_mask.bool()[rows], arg, torch.full_like(arg, -1))


def _argmax_reference(call, mask=None):
    if mask is not None:
        zcall, pmask = _zero_masked(call, mask)
        scores, arg = _argmax_reference(zcall)
        return scores, _drop_masked_argmax(arg, A.to_numpy(pmask) if isinstance(arg, np.ndarray) else pmask,
                                           _host_packed(zcall)[1])
    docs, off = _host_packed(call)
    scores, arg = M.ref.maxsim_argmax(A.to_numpy(call.q), call.host_q_lengths, A.to_numpy(docs), off)
    return A.as_kind(scores, call.q), A.as_kind(arg, call.q)


def _argmax_cpu(call, mask=None):
    q, docs, starts, lens, row_stride = M._cpu_inputs(call)
    B, Lq, D = (int(s) for s in q.shape)
    qs = A.elem_strides(q)
    scores = A.empty_like_kind((B, call.N), "float32", call.q)
    arg = A.empty_like_kind((B, call.N, Lq), "int32", call.q)
    mask_starts = None
    if mask is not None:
        mask = np.ascontiguousarray(A.to_numpy(mask), dtype=np.uint8) if isinstance(mask, np.ndarray) else \
            mask.to(A.torch_module().uint8).contiguous()
        mask_starts = np.ascontiguousarray(call.host_offsets[:-1] if call.packed else
                                           np.arange(call.N, dtype=np.int64) * int(call.docs.shape[1]), dtype=np.int64)
    _ext.C.maxsim_cpu(
        A.data_ptr(q), A.DTYPE_CODE[A.dtype_name(q)], B, Lq, D, qs[0], qs[1], qs[2], call.host_q_lengths.ctypes.data,
        A.data_ptr(docs), A.DTYPE_CODE[A.dtype_name(docs)], int(row_stride), starts.ctypes.data, lens.ctypes.data,
        call.N, A.data_ptr(scores), 0, 0, 0, A.data_ptr(arg), 0 if mask is None else A.data_ptr(mask),
        0 if mask_starts is None else mask_starts.ctypes.data)
    return scores, arg


def _gpu_extents(call):
    """(docs as contiguous rows [rows, D], doc_starts int64 [N], doc_lens int64 [N]) on the device:
    packed docs as they are, padded [N, Ld, D] docs in place (document n = rows n * Ld ...)."""
    torch = A.torch_module()
    docs = call.docs.contiguous()
    D = int(docs.shape[-1])
    if call.packed:
        starts, lens = call.host_offsets[:-1], np.diff(call.host_offsets)
    else:
        starts = np.arange(call.N, dtype=np.int64) * int(docs.shape[1])
        lens = call.host_doc_lengths
    dev = docs.device
    to_dev = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)).to(dev)
    return docs.reshape(-1, D), to_dev(starts), to_dev(lens)


def _argmax_gpu(call, mask, backend):
    """The fused kernels (kernels/maxsim_grad.py, csrc/cuda/maxsim_grad.cu): one launch for scores
    and argmax, padded documents and the zero mask read in place."""
    torch = A.torch_module()
    rows, starts, lens = _gpu_extents(call)
    q = call.q.to(rows.dtype).contiguous()     # one kernel dtype, as the scores-only GPU forward
    B, Lq, D = (int(s) for s in q.shape)
    qlens = torch.from_numpy(call.host_q_lengths.astype(np.int32)).to(q.device)
    m = None if mask is None else mask.to(torch.uint8).contiguous().reshape(-1)
    if backend == "triton":
        return _ext.triton_kernels("maxsim_grad").maxsim_argmax(q, qlens, rows, starts, lens, m)
    scores = torch.empty((B, call.N), dtype=torch.float32, device=q.device)
    arg = torch.full((B, call.N, Lq), -1, dtype=torch.int32, device=q.device)
    with torch.cuda.device(q.device):
        _ext.C.maxsim_argmax_cuda(q.data_ptr(), rows.data_ptr(), A.DTYPE_CODE[A.dtype_name(rows)], B, Lq, D,
                                  qlens.data_ptr(), starts.data_ptr(), lens.data_ptr(),
                                  0 if m is None else m.data_ptr(), call.N, scores.data_ptr(), arg.data_ptr(),
                                  torch.cuda.current_stream().cuda_stream)
    return scores, arg


def maxsim_argmax_impl(queries, docs, *, doc_offsets=None, doc_lengths=None, query_lengths=None,
                       backend: str = "auto", doc_mask=None):
    """(scores as ``vkern.maxsim`` gives them, argmax int32 ``[B, N, Lq]``; B = 1 for one query).

    ``doc_mask`` (internal, for PyLate's semantics): bool/uint8 with the docs' token shape ([T] packed,
    [N, Ld] padded); a masked token's similarities count as exactly 0 (it still takes part in the max,
    as PyLate's mask multiply makes it) and an argmax on it is reported as -1 (no gradient)."""
    call = M._prepare(queries, docs, doc_offsets, doc_lengths, query_lengths, None)
    if doc_mask is not None:
        doc_mask, _ = A.to_native(doc_mask, "doc_mask")
        want = tuple(int(s) for s in call.docs.shape[:-1])
        if tuple(doc_mask.shape) != want:
            raise ValueError(f"doc_mask: expected shape {want} (the documents' tokens), got {tuple(doc_mask.shape)}")
        if A.is_float(doc_mask):
            raise TypeError(f"doc_mask: expected a bool or integer mask, got {A.dtype_name(doc_mask)}")
        A.same_place({"docs": call.docs, "doc_mask": doc_mask})
    name = M._OP.pick(backend, call).name
    if name in ("triton", "cuda"):
        scores, arg = _argmax_gpu(call, doc_mask, name)
    else:
        scores, arg = {"reference": _argmax_reference, "cpu": _argmax_cpu}[name](call, doc_mask)
    return (scores[0] if call.single else scores), arg


# ----------------------------------------------------------------- backward

def _backward_reference(call, g, arg, need_q, need_d):
    docs, off = _host_packed(call)
    gq, gd = M.ref.maxsim_backward(A.to_numpy(g), A.to_numpy(arg), A.to_numpy(call.q), A.to_numpy(docs), off)
    return A.as_kind(gq, call.q), _unpack_grad(call, A.as_kind(gd, call.q), off)


def _unpack_grad(call, gd_packed, off):
    """A packed [T, D] gradient back into the call's layout (padded docs: zero rows past each length)."""
    if call.packed:
        return gd_packed
    N, Ld, D = (int(s) for s in call.docs.shape)
    mask = np.arange(Ld)[None, :] < call.host_doc_lengths[:, None]
    if isinstance(gd_packed, np.ndarray):
        out = np.zeros((N, Ld, D), dtype=gd_packed.dtype)
        out[mask] = gd_packed
        return out
    torch = A.torch_module()
    out = gd_packed.new_zeros((N, Ld, D))
    out[torch.from_numpy(mask).to(out.device)] = gd_packed
    return out


def _backward_cpu(call, g, arg, need_q, need_d, narrow=False):
    q, docs, starts, lens, row_stride = M._cpu_inputs(call)
    B, Lq, D = (int(s) for s in q.shape)
    qs = A.elem_strides(q)
    g = A.contiguous(g)
    arg = A.contiguous(arg)
    gq = A.empty_like_kind((B, Lq, D), "float32", call.q) if need_q else None
    gd = gd_starts = None
    if need_d:
        shape = tuple(int(s) for s in call.docs.shape)
        # zero-filled fresh pages (calloc): rows no argmax reaches (padding) are never touched. With
        # `narrow` a float16/bfloat16 gradient is written in that dtype directly (float32 sums per
        # document in a thread's scratch): no float32 buffer of the documents' size, no cast copy.
        gd_dtype = A.dtype_name(call.docs) if narrow else "float32"
        if isinstance(call.q, np.ndarray):
            gd = np.zeros(shape, dtype=np.float16 if gd_dtype == "float16" else np.float32)
            gd_dtype = A.dtype_name(gd)
        else:
            gd = A.torch_module().zeros(shape, dtype=getattr(A.torch_module(), gd_dtype), device=call.q.device)
        if call.packed:
            gd_starts = np.ascontiguousarray(call.host_offsets[:-1] * D, dtype=np.int64)
        else:
            gd_starts = np.arange(call.N, dtype=np.int64) * (int(shape[1]) * D)
    _ext.C.maxsim_backward_cpu(
        A.data_ptr(q), A.DTYPE_CODE[A.dtype_name(q)], B, Lq, D, qs[0], qs[1], qs[2],
        A.data_ptr(docs), A.DTYPE_CODE[A.dtype_name(docs)], int(row_stride), starts.ctypes.data, lens.ctypes.data,
        call.N, A.data_ptr(arg), A.data_ptr(g), 0 if gq is None else A.data_ptr(gq),
        0 if gd is None else A.data_ptr(gd), 0 if gd_starts is None else gd_starts.ctypes.data,
        A.DTYPE_CODE[gd_dtype] if gd is not None else 0)
    return gq, gd


def _backward_gpu(call, g, arg, need_q, need_d, backend):
    """The fused backward: grad_q gathered per query row, grad_d scattered into a float32 buffer of
    the documents' shape (padded rows no argmax reaches stay 0)."""
    torch = A.torch_module()
    rows, starts, _ = _gpu_extents(call)
    q = call.q.contiguous()
    B, Lq, D = (int(s) for s in q.shape)
    arg = arg.to(torch.int32).contiguous()
    if backend == "triton":
        gq, gd = _ext.triton_kernels("maxsim_grad").maxsim_backward(g, arg, q, rows, starts, need_q, need_d)
    else:
        gq = torch.zeros((B, Lq, D), dtype=torch.float32, device=q.device) if need_q else None
        gd = torch.zeros(tuple(rows.shape), dtype=torch.float32, device=q.device) if need_d else None
        with torch.cuda.device(q.device):
            _ext.C.maxsim_backward_cuda(g.data_ptr(), arg.data_ptr(), q.data_ptr(), A.DTYPE_CODE[A.dtype_name(q)],
                                        rows.data_ptr(), A.DTYPE_CODE[A.dtype_name(rows)], B, Lq, D,
                                        starts.data_ptr(), call.N, 0 if gq is None else gq.data_ptr(),
                                        0 if gd is None else gd.data_ptr(), torch.cuda.current_stream().cuda_stream)
    return gq, (None if gd is None else gd.reshape(tuple(call.docs.shape)))


def maxsim_backward_impl(grad, argmax, queries, docs, *, doc_offsets=None, doc_lengths=None,
                         query_lengths=None, backend: str = "auto", need_queries: bool = True,
                         need_docs: bool = True, docs_grad_in_dtype: bool = False):
    """Gradients of ``sum(grad * scores)`` for queries and docs (None where not needed), float32 in
    the inputs' layouts (queries [Lq, D] / [B, Lq, D]; docs [T, D] or [N, Ld, D]). With
    ``docs_grad_in_dtype`` the cpu backend returns a float16/bfloat16 docs gradient in that dtype
    (accumulated in float32, rounded once, as a cast would), without a float32 buffer of its size."""
    call = M._prepare(queries, docs, doc_offsets, doc_lengths, query_lengths, None)
    name = M._OP.pick(backend, call).name
    g = grad[None] if call.single else grad
    if tuple(g.shape) != (int(call.q.shape[0]), call.N):
        raise ValueError(f"grad: expected shape {(int(call.q.shape[0]), call.N)}, got {tuple(g.shape)}")
    if isinstance(g, np.ndarray):
        g = np.ascontiguousarray(g, dtype=np.float32)
    else:
        g = g.float().contiguous()
    if name in ("triton", "cuda"):
        gq, gd = _backward_gpu(call, g, argmax, need_queries, need_docs, name)
    else:
        if name == "cpu":
            gq, gd = _backward_cpu(call, g, argmax, need_queries, need_docs, narrow=docs_grad_in_dtype)
        else:
            gq, gd = _backward_reference(call, g, argmax, need_queries, need_docs)
    if gq is not None and call.single:
        gq = gq[0]
    return (gq if need_queries else None), (gd if need_docs else None)
