"""``vkern.maxsim(..., doc_ids=candidates)``: score a candidate subset of a document store.

The CPU kernel reads each candidate's rows where they lie (the store may be an ``np.memmap`` of
float32/float16/int8 rows: only the candidates' pages are touched), so the time follows the
candidates' tokens, not the store's. Other backends gather the candidates' rows first (one
copy of the candidates only) and score those. Contract: docs/ops/retrieval_memory.md.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from .. import _arrays as A
from .. import _ext
from .._backend import BackendUnavailable, cpu_reason


def _check_ids(doc_ids, N: int, B: int):
    ids, _ = A.to_native(doc_ids, "doc_ids")
    if not A.is_integer(ids):
        raise TypeError(f"doc_ids: expected an integer array, got {A.dtype_name(ids)}")
    ids = A.to_numpy(ids).astype(np.int64)
    if ids.ndim not in (1, 2) or (ids.ndim == 2 and ids.shape[0] != B):
        raise ValueError(f"doc_ids: expected shape [K] (one list for every query) or [B={B}, K], got {ids.shape}")
    if ids.size and (ids.min() < 0 or ids.max() >= N):
        raise ValueError(f"doc_ids: every id must be in [0, N={N}), got min={int(ids.min())}, max={int(ids.max())}")
    return ids


def _finish(scores, topk, ids_row):
    """scores [K] of one query (float32) -> scores, or (vals, original ids) best first."""
    if topk is None:
        return scores
    from ..reference.maxsim import topk as ref_topk

    vals, pos = ref_topk(scores[None], topk)
    return vals[0], ids_row[pos[0]]


def _subset_rows(docs, off, ids_row):
    lens = np.diff(off)[ids_row]
    rows = np.concatenate([np.arange(off[i], off[i + 1]) for i in ids_row]) if len(ids_row) else np.zeros(0, np.int64)
    sub_off = np.zeros(len(ids_row) + 1, np.int64)
    np.cumsum(lens, out=sub_off[1:])
    return rows, sub_off


def maxsim_subset_impl(queries, docs, *, doc_ids, doc_offsets=None, doc_lengths=None, doc_scales=None,
                       query_lengths=None, topk=None, backend="auto"):
    from . import maxsim as M
    from . import maxsim_int8 as M8

    int8 = doc_scales is not None or M8.is_int8_docs(docs)
    if int8:
        call = M8._prepare(queries, docs, doc_offsets, doc_lengths, doc_scales, query_lengths, topk)
        B, N, off = call.q_codes.shape[0], call.N, call.offsets
        single, like = call.single, call.like
    else:
        call = M._prepare(queries, docs, doc_offsets, doc_lengths, query_lengths, topk)
        B, N = int(call.q.shape[0]), call.N
        single, like = call.single, call.q
    ids = _check_ids(doc_ids, N, B)
    per_query = ids.ndim == 2
    reason = cpu_reason(call)
    if backend == "cpu" and reason is not None:
        raise BackendUnavailable(f"vkern.maxsim: backend 'cpu' cannot run this call ({call!r}): {reason}")
    use_cpu = backend in ("auto", "cpu") and reason is None   # in place; other backends gather
    results = []
    for g, ids_row in enumerate(list(ids) if per_query else [ids]):
        b_sel = slice(g, g + 1) if per_query else slice(0, B)
        K = len(ids_row)
        if int8:
            sub = dataclasses.replace(call, q_codes=call.q_codes[b_sel], q_scales=call.q_scales[b_sel],
                                      q_lengths=call.q_lengths[b_sel], topk=None)
            if use_cpu:
                scores = _int8_cpu_subset(sub, ids_row)
            else:
                rows, sub_off = _subset_rows(call.codes, off, ids_row)
                sub = dataclasses.replace(sub, codes=call.codes[rows], scales=call.scales[rows], offsets=sub_off)
                scores = M8._OP.pick(backend, sub).run(sub)[0]
        else:
            q_sel = call.q[b_sel]
            ql_sel = call.host_q_lengths[b_sel]
            if use_cpu:
                scores = _f32_cpu_subset(M, dataclasses.replace(call, q=q_sel, host_q_lengths=ql_sel, topk=None),
                                         ids_row)
            else:
                packed_docs, offsets = M._packed_offsets(call)
                host_off = M._host_ints(offsets)
                rows, sub_off = _subset_rows(None, host_off, ids_row)
                if isinstance(packed_docs, np.ndarray):
                    sub_docs = packed_docs[rows]
                else:
                    torch = A.torch_module()
                    sub_docs = packed_docs[torch.from_numpy(rows).to(packed_docs.device)]
                    sub_off = torch.from_numpy(sub_off).to(packed_docs.device)
                scores = M.maxsim_impl(q_sel, sub_docs, doc_offsets=sub_off,
                                       query_lengths=None if call.q_lengths is None else call.q_lengths[b_sel],
                                       backend=backend)
            scores = scores.detach().cpu().numpy() if A.is_torch(scores) else scores
        scores = np.asarray(scores, np.float32).reshape(-1, K)
        results.append(scores)
    scores = np.concatenate(results, axis=0)                                 # [B, K]
    id_rows = ids if per_query else np.broadcast_to(ids, (B, len(ids)))
    if topk is None:
        out = scores[0] if single else scores
        return A.as_kind(out, like)
    pairs = [_finish(scores[b], topk, id_rows[b]) for b in range(B)]
    vals = np.stack([p[0] for p in pairs])
    idx = np.stack([p[1] for p in pairs])
    if single:
        vals, idx = vals[0], idx[0]
    return A.as_kind(vals, like), A.as_kind(idx, like)


def _f32_cpu_subset(M, call, ids_row):
    """The f32/f16/bf16 CPU kernel over the candidates' rows in place: [B, K]."""
    q, docs, starts, lens, row_stride = M._cpu_inputs(call)
    starts = np.ascontiguousarray(starts[ids_row])
    lens = np.ascontiguousarray(lens[ids_row])
    B, Lq, D = (int(s) for s in q.shape)
    qs = A.elem_strides(q)
    K = len(ids_row)
    scores = np.empty((B, K), np.float32)
    if K and B:
        qlens = np.ascontiguousarray(call.host_q_lengths)
        _ext.C.maxsim_cpu(A.data_ptr(q), A.DTYPE_CODE[A.dtype_name(q)], B, Lq, D, qs[0], qs[1], qs[2],
                          qlens.ctypes.data, A.data_ptr(docs), A.DTYPE_CODE[A.dtype_name(docs)], int(row_stride),
                          starts.ctypes.data, lens.ctypes.data, K, scores.ctypes.data, 0, 0, 0, 0, 0, 0)
    return scores


def _int8_cpu_subset(call, ids_row):
    codes = call.codes
    if codes.shape[1] > 1 and codes.strides[1] != 1 or codes.strides[0] < 0:
        codes = np.ascontiguousarray(codes)
    row_stride = max(int(codes.strides[0]) if codes.shape[0] > 1 else int(codes.shape[1]), int(codes.shape[1]))
    starts = np.ascontiguousarray(call.offsets[:-1][ids_row])
    lens = np.ascontiguousarray(np.diff(call.offsets)[ids_row])
    B, Lq, D = call.q_codes.shape
    K = len(ids_row)
    scores = np.empty((B, K), np.float32)
    if K and B:
        _ext.C.maxsim_int8_cpu(call.q_codes.ctypes.data, call.q_scales.ctypes.data, B, Lq, D,
                               call.q_lengths.ctypes.data, codes.ctypes.data if codes.size else 0, row_stride,
                               call.scales.ctypes.data, starts.ctypes.data, lens.ctypes.data, K,
                               scores.ctypes.data, 0, 0, 0)
    return scores
