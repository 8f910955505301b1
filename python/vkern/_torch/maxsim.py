"""torch.library custom ops for MaxSim (vkern::maxsim, vkern::maxsim_topk) with fake
implementations, so the op works under torch.compile. Registered with the others by vkern._torch."""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from ..ops import maxsim as _maxsim
from ..ops import maxsim_grad as _maxsim_grad


@torch.library.custom_op("vkern::maxsim", mutates_args=())
def maxsim_op(queries: torch.Tensor, docs: torch.Tensor, doc_offsets: Optional[torch.Tensor],
              doc_lengths: Optional[torch.Tensor], query_lengths: Optional[torch.Tensor],
              backend: str) -> torch.Tensor:
    return _maxsim.maxsim_impl(queries, docs, doc_offsets=doc_offsets, doc_lengths=doc_lengths,
                               query_lengths=query_lengths, backend=backend)


@maxsim_op.register_fake
def _(queries, docs, doc_offsets, doc_lengths, query_lengths, backend):
    N = doc_offsets.shape[0] - 1 if doc_offsets is not None else docs.shape[0]
    shape: List = [N] if queries.dim() == 2 else [queries.shape[0], N]
    return queries.new_empty(shape, dtype=torch.float32)


@torch.library.custom_op("vkern::maxsim_topk", mutates_args=())
def maxsim_topk_op(queries: torch.Tensor, docs: torch.Tensor, doc_offsets: Optional[torch.Tensor],
                   doc_lengths: Optional[torch.Tensor], query_lengths: Optional[torch.Tensor], k: int,
                   backend: str) -> Tuple[torch.Tensor, torch.Tensor]:
    vals, idx = _maxsim.maxsim_impl(queries, docs, doc_offsets=doc_offsets, doc_lengths=doc_lengths,
                                    query_lengths=query_lengths, topk=k, backend=backend)
    return vals, idx


@maxsim_topk_op.register_fake
def _(queries, docs, doc_offsets, doc_lengths, query_lengths, k, backend):
    N = doc_offsets.shape[0] - 1 if doc_offsets is not None else docs.shape[0]
    kk = torch.sym_min(k, N)
    shape: List = [kk] if queries.dim() == 2 else [queries.shape[0], kk]
    return (queries.new_empty(shape, dtype=torch.float32), queries.new_empty(shape, dtype=torch.int64))


# ------------------------------------------------------------ autograd
# vkern::maxsim_argmax returns the scores and the argmax document token per (query, doc, query
# token); its registered backward is vkern::maxsim_backward, a scatter from that argmax (no
# [B, N, Lq, Ld] tensor). vkern.maxsim takes this path whenever an input requires grad.

@torch.library.custom_op("vkern::maxsim_argmax", mutates_args=())
def maxsim_argmax_op(queries: torch.Tensor, docs: torch.Tensor, doc_offsets: Optional[torch.Tensor],
                     doc_lengths: Optional[torch.Tensor], query_lengths: Optional[torch.Tensor],
                     backend: str, doc_mask: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    scores, arg = _maxsim_grad.maxsim_argmax_impl(queries, docs, doc_offsets=doc_offsets, doc_lengths=doc_lengths,
                                                  query_lengths=query_lengths, backend=backend, doc_mask=doc_mask)
    return scores, arg


def _num_docs(docs, doc_offsets):
    return doc_offsets.shape[0] - 1 if doc_offsets is not None else docs.shape[0]


@maxsim_argmax_op.register_fake
def _(queries, docs, doc_offsets, doc_lengths, query_lengths, backend, doc_mask=None):
    N = _num_docs(docs, doc_offsets)
    B = 1 if queries.dim() == 2 else queries.shape[0]
    shape: List = [N] if queries.dim() == 2 else [B, N]
    return (queries.new_empty(shape, dtype=torch.float32),
            queries.new_empty([B, N, queries.shape[-2]], dtype=torch.int32))


@torch.library.custom_op("vkern::maxsim_backward", mutates_args=())
def maxsim_backward_op(grad: torch.Tensor, argmax: torch.Tensor, queries: torch.Tensor, docs: torch.Tensor,
                       doc_offsets: Optional[torch.Tensor], doc_lengths: Optional[torch.Tensor],
                       query_lengths: Optional[torch.Tensor], backend: str, need_queries: bool,
                       need_docs: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    gq, gd = _maxsim_grad.maxsim_backward_impl(grad, argmax, queries, docs, doc_offsets=doc_offsets,
                                               doc_lengths=doc_lengths, query_lengths=query_lengths,
                                               backend=backend, need_queries=need_queries, need_docs=need_docs,
                                               docs_grad_in_dtype=True)
    # custom ops return tensors: an unneeded gradient is an empty one (dropped by the caller)
    gq = gq.to(queries.dtype) if gq is not None else queries.new_empty([0])
    gd = gd.to(docs.dtype) if gd is not None else docs.new_empty([0])
    return gq, gd


@maxsim_backward_op.register_fake
def _(grad, argmax, queries, docs, doc_offsets, doc_lengths, query_lengths, backend, need_queries, need_docs):
    return (queries.new_empty(queries.shape) if need_queries else queries.new_empty([0]),
            docs.new_empty(docs.shape) if need_docs else docs.new_empty([0]))


def _argmax_setup(ctx, inputs, output):
    queries, docs, doc_offsets, doc_lengths, query_lengths, backend = inputs[:6]
    ctx.save_for_backward(queries, docs, doc_offsets, doc_lengths, query_lengths, output[1])
    ctx.backend = backend


def _argmax_backward(ctx, grad_scores, grad_argmax):
    queries, docs, doc_offsets, doc_lengths, query_lengths, arg = ctx.saved_tensors
    need_q, need_d = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_q or need_d):
        return None, None, None, None, None, None, None
    gq, gd = maxsim_backward_op(grad_scores, arg, queries, docs, doc_offsets, doc_lengths, query_lengths,
                                ctx.backend, need_q, need_d)
    return (gq if need_q else None), (gd if need_d else None), None, None, None, None, None


torch.library.register_autograd("vkern::maxsim_argmax", _argmax_backward, setup_context=_argmax_setup)


# vkern::maxsim called directly (torch.ops.vkern.maxsim) keeps no argmax: its backward recomputes it
# (one more forward pass). vkern.maxsim itself goes through vkern::maxsim_argmax instead.
def _maxsim_setup(ctx, inputs, output):
    queries, docs, doc_offsets, doc_lengths, query_lengths, backend = inputs
    ctx.save_for_backward(queries, docs, doc_offsets, doc_lengths, query_lengths)
    ctx.backend = backend


def _maxsim_backward(ctx, grad_scores):
    queries, docs, doc_offsets, doc_lengths, query_lengths = ctx.saved_tensors
    need_q, need_d = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_q or need_d):
        return None, None, None, None, None, None
    _, arg = maxsim_argmax_op(queries.detach(), docs.detach(), doc_offsets, doc_lengths, query_lengths, ctx.backend)
    gq, gd = maxsim_backward_op(grad_scores, arg, queries, docs, doc_offsets, doc_lengths, query_lengths,
                                ctx.backend, need_q, need_d)
    return (gq if need_q else None), (gd if need_d else None), None, None, None, None


torch.library.register_autograd("vkern::maxsim", _maxsim_backward, setup_context=_maxsim_setup)


def needs_grad(queries, docs) -> bool:
    return torch.is_grad_enabled() and (queries.requires_grad or docs.requires_grad)


def call_maxsim(queries, docs, doc_offsets, doc_lengths, query_lengths, topk, backend):
    if topk is None:
        if needs_grad(queries, docs):
            return maxsim_argmax_op(queries, docs, doc_offsets, doc_lengths, query_lengths, backend)[0]
        return maxsim_op(queries, docs, doc_offsets, doc_lengths, query_lengths, backend)
    return maxsim_topk_op(queries, docs, doc_offsets, doc_lengths, query_lengths, int(topk), backend)

