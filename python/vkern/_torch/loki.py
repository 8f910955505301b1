"""torch.library custom ops for Loki (vkern::loki_attention, vkern::loki_attention_indices,
vkern::decode_attention, vkern::loki_rotate) with fake implementations; registered with the others by vkern._torch."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..ops import loki as _loki


def _topk_value(topk_count: int, topk_frac: float):
    return topk_frac if topk_count <= 0 else topk_count


@torch.library.custom_op("vkern::loki_attention", mutates_args=())
def loki_attention_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      seq_lens: Optional[torch.Tensor], rank: int, topk_count: int, topk_frac: float,
                      num_sink: int, num_recent: int, gqa: str, scale: float, backend: str,
                      k_prefix: Optional[torch.Tensor] = None) -> torch.Tensor:
    return _loki.loki_attention_impl(q, k_cache, v_cache, rank=rank, topk=_topk_value(topk_count, topk_frac),
                                     seq_lens=seq_lens, num_sink=num_sink, num_recent=num_recent, gqa=gqa,
                                     scale=scale, k_prefix=k_prefix, backend=backend)


@loki_attention_op.register_fake
def _(q, k_cache, v_cache, seq_lens, rank, topk_count, topk_frac, num_sink, num_recent, gqa, scale, backend,
      k_prefix=None):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@torch.library.custom_op("vkern::loki_attention_indices", mutates_args=())
def loki_attention_indices_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              seq_lens: Optional[torch.Tensor], rank: int, topk_count: int, topk_frac: float,
                              num_sink: int, num_recent: int, gqa: str, scale: float,
                              backend: str, k_prefix: Optional[torch.Tensor] = None
                              ) -> Tuple[torch.Tensor, torch.Tensor]:
    out, idx = _loki.loki_attention_impl(q, k_cache, v_cache, rank=rank, topk=_topk_value(topk_count, topk_frac),
                                         seq_lens=seq_lens, num_sink=num_sink, num_recent=num_recent, gqa=gqa,
                                         scale=scale, return_indices=True, k_prefix=k_prefix, backend=backend)
    return out, idx


@loki_attention_indices_op.register_fake
def _(q, k_cache, v_cache, seq_lens, rank, topk_count, topk_frac, num_sink, num_recent, gqa, scale, backend,
      k_prefix=None):
    # The index width is the largest resolved budget: it depends on host seq_lens' values; with no
    # seq_lens or seq_lens on a GPU (not read on the host) it is the budget at seq_len = T.
    if seq_lens is None or seq_lens.device.type != "cpu":
        K = _loki.ref.resolve_budget(_topk_value(topk_count, topk_frac), int(k_cache.shape[2]))
    else:
        K = torch.library.get_ctx().new_dynamic_size()
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    return out, q.new_empty((q.shape[0], q.shape[1], K), dtype=torch.int64)


@torch.library.custom_op("vkern::decode_attention", mutates_args=())
def decode_attention_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        seq_lens: Optional[torch.Tensor], scale: float, backend: str) -> torch.Tensor:
    return _loki.decode_attention_impl(q, k_cache, v_cache, seq_lens=seq_lens, scale=scale, backend=backend)


@decode_attention_op.register_fake
def _(q, k_cache, v_cache, seq_lens, scale, backend):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@torch.library.custom_op("vkern::loki_rotate", mutates_args=())
def loki_rotate_op(x: torch.Tensor, P: torch.Tensor, backend: str) -> torch.Tensor:
    return _loki.rotate_impl(x, P, backend=backend)


@loki_rotate_op.register_fake
def _(x, P, backend):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _scale(q, scale):
    return float(scale) if scale is not None else q.shape[-1] ** -0.5


def call_loki_attention(q, k_cache, v_cache, seq_lens, rank, topk, num_sink, num_recent, gqa, scale,
                        return_indices, backend, k_prefix=None):
    is_frac = isinstance(topk, float)
    args = (q, k_cache, v_cache, seq_lens, int(rank), 0 if is_frac else int(topk), float(topk) if is_frac else 0.0,
            int(num_sink), int(num_recent), gqa, _scale(q, scale), backend, k_prefix)
    if return_indices:
        return loki_attention_indices_op(*args)
    return loki_attention_op(*args)


def call_decode_attention(q, k_cache, v_cache, seq_lens, scale, backend):
    return decode_attention_op(q, k_cache, v_cache, seq_lens, _scale(q, scale), backend)
