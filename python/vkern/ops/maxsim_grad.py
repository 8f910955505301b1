"""MaxSim's forward with argmax and its backward (the pieces ``vkern.maxsim`` trains through).

The forward keeps, per (query b, document n, query token i), only the index of the document
token that holds the max (int32 ``[B, N, Lq]``, index within the document, -1 for masked query
tokens and empty documents; the lower index on ties). The backward scatters from it:

    grad_q[b, i]                += g[b, n] * d_n[argmax[b, n, i]]
    grad_d_n[argmax[b, n, i]]   += g[b, n] * q[b, i]

so its memory is the argmax (O(B * N * Lq)) and the gradients themselves, never the
``[B, N, Lq, Ld]`` similarities. Backends: ``reference`` (NumPy, float64), ``cpu`` (the C++
kernel records the argmax inside its register tiles; the backward is a C++ scatter). On CUDA
tensors (``triton`` / ``cuda``) both steps run as chunked torch ops on the device (bounded
memory, no fused kernel yet).
"""
from __future__ import annotations

import numpy as np

from .. import _arrays as A
from .. import _ext
from . import maxsim as M

_CHUNK = 1 << 24      # similarity / gathered-row elements per chunk on the torch path


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


def _doc_groups(off: np.ndarray, B: int, Lq: int):
    """Ranges [start, stop) of documents whose padded similarities fit in one chunk."""
    N = len(off) - 1
    lens = np.diff(off)
    start = 0
    while start < N:
        stop, width = start, 0
        while stop < N:
            w = max(width, int(lens[stop]))
            if stop > start and B * Lq * (stop - start + 1) * max(w, 1) > _CHUNK:
                break
            width, stop = w, stop + 1
        yield start, stop, width
        start = stop


def _argmax_torch(call, mask=None):
    """Chunked torch ops on the tensors' device: float32 similarities of a group of documents,
    padded to the group's longest, max and the first index reaching it."""
    torch = A.torch_module()
    if mask is not None:
        zcall, pmask = _zero_masked(call, mask)
        scores, arg = _argmax_torch(zcall)
        return scores, _drop_masked_argmax(arg, pmask, _host_packed(zcall)[1])
    docs, off = _host_packed(call)
    q = call.q
    B, Lq, D = (int(s) for s in q.shape)
    dev = q.device
    qf = q.float().reshape(B * Lq, D)
    valid_q = torch.arange(Lq, device=dev)[None, :] < torch.from_numpy(call.host_q_lengths).to(dev)[:, None]
    scores = torch.full((B, call.N), float("-inf"), dtype=torch.float32, device=dev)
    arg = torch.full((B, call.N, Lq), -1, dtype=torch.int32, device=dev)
    for start, stop, width in _doc_groups(off, B, Lq):
        if width == 0:
            continue
        lo = int(off[start])
        lens = torch.from_numpy(np.diff(off[start:stop + 1])).to(dev)
        pos = torch.arange(width, device=dev)
        idx = torch.from_numpy(off[start:stop] - lo).to(dev)[:, None] + pos[None, :]   # [n, width]
        ok = pos[None, :] < lens[:, None]
        sims = qf @ docs[lo:int(off[stop])].float().T                                  # [B*Lq, tokens]
        sims = sims[:, idx.clamp(max=max(int(off[stop]) - lo - 1, 0))]
        sims = sims.masked_fill(~ok[None], float("-inf")).reshape(B, Lq, stop - start, width)
        best = sims.amax(dim=3)                                                        # [B, Lq, n]
        first = torch.where(sims == best[..., None], pos, width).amin(dim=3)           # lower index on ties
        nonempty = lens > 0
        s = torch.where(valid_q[:, :, None], best, torch.zeros_like(best)).sum(dim=1)
        scores[:, start:stop] = torch.where(nonempty[None], s, scores[:, start:stop])
        a = torch.where(valid_q[:, :, None] & nonempty[None, None], first, -1).to(torch.int32)
        arg[:, start:stop] = a.permute(0, 2, 1)
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
    run = {"reference": _argmax_reference, "cpu": _argmax_cpu}.get(name, _argmax_torch)
    scores, arg = run(call, doc_mask)
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


def _backward_cpu(call, g, arg, need_q, need_d):
    q, docs, starts, lens, row_stride = M._cpu_inputs(call)
    B, Lq, D = (int(s) for s in q.shape)
    qs = A.elem_strides(q)
    g = A.contiguous(g)
    arg = A.contiguous(arg)
    gq = A.empty_like_kind((B, Lq, D), "float32", call.q) if need_q else None
    gd = gd_starts = None
    if need_d:
        shape = tuple(int(s) for s in call.docs.shape)
        # zero-filled fresh pages (calloc): rows no argmax reaches (padding) are never touched
        if isinstance(call.q, np.ndarray):
            gd = np.zeros(shape, dtype=np.float32)
        else:
            gd = A.torch_module().zeros(shape, dtype=A.torch_module().float32, device=call.q.device)
        if call.packed:
            gd_starts = np.ascontiguousarray(call.host_offsets[:-1] * D, dtype=np.int64)
        else:
            gd_starts = np.arange(call.N, dtype=np.int64) * (int(shape[1]) * D)
    _ext.C.maxsim_backward_cpu(
        A.data_ptr(q), A.DTYPE_CODE[A.dtype_name(q)], B, Lq, D, qs[0], qs[1], qs[2],
        A.data_ptr(docs), A.DTYPE_CODE[A.dtype_name(docs)], int(row_stride), starts.ctypes.data, lens.ctypes.data,
        call.N, A.data_ptr(arg), A.data_ptr(g), 0 if gq is None else A.data_ptr(gq),
        0 if gd is None else A.data_ptr(gd), 0 if gd_starts is None else gd_starts.ctypes.data)
    return gq, gd


def _backward_torch(call, g, arg, need_q, need_d):
    """Chunked gathers and index_add_ on the device: memory bounded by the chunk."""
    torch = A.torch_module()
    docs, off = _host_packed(call)
    q = call.q
    B, Lq, D = (int(s) for s in q.shape)
    dev = q.device
    gq = torch.zeros((B, Lq, D), dtype=torch.float32, device=dev) if need_q else None
    gd = torch.zeros((int(docs.shape[0]), D), dtype=torch.float32, device=dev) if need_d else None
    qf = q.float()
    docs_f = docs if docs.dtype == torch.float32 else None
    starts = torch.from_numpy(off[:-1]).to(dev)
    per = max(1, _CHUNK // max(1, B * Lq * D))
    for s0 in range(0, call.N, per):
        s1 = min(call.N, s0 + per)
        a = arg[:, s0:s1].long()                                  # [B, n, Lq]
        ok = a >= 0
        rows = torch.where(ok, starts[s0:s1][None, :, None] + a, 0)
        w = torch.where(ok, g[:, s0:s1, None].float(), 0.0)       # [B, n, Lq]
        if need_q:
            src = (docs_f if docs_f is not None else docs)[rows.reshape(-1)].float().reshape(B, s1 - s0, Lq, D)
            gq += (w[..., None] * src).sum(dim=1)
        if need_d:
            contrib = (w[..., None] * qf[:, None, :, :]).reshape(-1, D)
            gd.index_add_(0, rows.reshape(-1), contrib)
    return gq, (None if gd is None else _unpack_grad(call, gd, off))


def maxsim_backward_impl(grad, argmax, queries, docs, *, doc_offsets=None, doc_lengths=None,
                         query_lengths=None, backend: str = "auto", need_queries: bool = True,
                         need_docs: bool = True):
    """Gradients of ``sum(grad * scores)`` for queries and docs (None where not needed), float32 in
    the inputs' layouts (queries [Lq, D] / [B, Lq, D]; docs [T, D] or [N, Ld, D])."""
    call = M._prepare(queries, docs, doc_offsets, doc_lengths, query_lengths, None)
    name = M._OP.pick(backend, call).name
    g = grad[None] if call.single else grad
    if tuple(g.shape) != (int(call.q.shape[0]), call.N):
        raise ValueError(f"grad: expected shape {(int(call.q.shape[0]), call.N)}, got {tuple(g.shape)}")
    run = {"reference": _backward_reference, "cpu": _backward_cpu}.get(name, _backward_torch)
    if isinstance(g, np.ndarray):
        g = np.ascontiguousarray(g, dtype=np.float32)
    else:
        g = g.float().contiguous()
    gq, gd = run(call, g, argmax, need_queries, need_docs)
    if gq is not None and call.single:
        gq = gq[0]
    return (gq if need_queries else None), (gd if need_docs else None)
