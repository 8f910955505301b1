"""torch.library custom ops for MaxSim (vkern::maxsim, vkern::maxsim_topk) with fake
implementations, so the op works under torch.compile. Registered with the others by vkern._torch."""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from ..ops import maxsim as _maxsim


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


def call_maxsim(queries, docs, doc_offsets, doc_lengths, query_lengths, topk, backend):
    if topk is None:
        return maxsim_op(queries, docs, doc_offsets, doc_lengths, query_lengths, backend)
    return maxsim_topk_op(queries, docs, doc_offsets, doc_lengths, query_lengths, int(topk), backend)

