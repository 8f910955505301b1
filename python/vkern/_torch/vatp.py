"""torch.library custom ops for VATP (vkern::attention_colsum, vkern::value_l1,
vkern::vatp_prune and the in-place vkern::vatp_prune_), with fake
implementations for torch.compile. Registered with the others by vkern._torch."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..ops import vatp as _vatp
from ..reference import vatp as _ref


@torch.library.custom_op("vkern::attention_colsum", mutates_args=())
def attention_colsum_op(q: torch.Tensor, k: torch.Tensor, seq_lens: Optional[torch.Tensor], causal: bool,
                        scale: Optional[float], backend: str) -> torch.Tensor:
    return _vatp.attention_colsum_impl(q, k, causal=causal, seq_lens=seq_lens, scale=scale, backend=backend)


@attention_colsum_op.register_fake
def _(q, k, seq_lens, causal, scale, backend):
    return k.new_empty((k.shape[0], k.shape[1], k.shape[2]), dtype=torch.float32)


@torch.library.custom_op("vkern::value_l1", mutates_args=())
def value_l1_op(v: torch.Tensor, backend: str) -> torch.Tensor:
    return _vatp.value_l1_impl(v, backend=backend)


@value_l1_op.register_fake
def _(v, backend):
    return v.new_empty((v.shape[0], v.shape[1], v.shape[2]), dtype=torch.float32)


def _budget(budget_tokens: int, budget_frac: float):
    return float(budget_frac) if budget_tokens < 0 else int(budget_tokens)


def _fake_kmax(k, seq_lens, budget_tokens, budget_frac, num_sink, num_recent):
    # The output width is the largest resolved budget: it depends on host seq_lens' values; with no
    # seq_lens or seq_lens on a GPU (not read on the host) it is the budget at seq_len = T.
    if seq_lens is None or seq_lens.device.type != "cpu":
        T = k.shape[2]
        if isinstance(T, int):
            return _ref.resolve_budget(_budget(budget_tokens, budget_frac), T, num_sink, num_recent)
    return torch.library.get_ctx().new_dynamic_size()


@torch.library.custom_op("vkern::vatp_prune", mutates_args=())
def vatp_prune_op(k: torch.Tensor, v: torch.Tensor, scores: torch.Tensor, seq_lens: Optional[torch.Tensor],
                  budget_tokens: int, budget_frac: float, num_sink: int, num_recent: int,
                  backend: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    k2, v2, idx, lens = _vatp.vatp_prune_impl(k, v, scores, budget=_budget(budget_tokens, budget_frac),
                                              num_sink=num_sink, num_recent=num_recent, seq_lens=seq_lens,
                                              backend=backend)
    return k2, v2, idx, lens


@vatp_prune_op.register_fake
def _(k, v, scores, seq_lens, budget_tokens, budget_frac, num_sink, num_recent, backend):
    kmax = _fake_kmax(k, seq_lens, budget_tokens, budget_frac, num_sink, num_recent)
    B, H = k.shape[0], k.shape[1]
    return (k.new_empty((B, H, kmax, k.shape[3])), v.new_empty((B, H, kmax, v.shape[3])),
            k.new_empty((B, H, kmax), dtype=torch.int64), k.new_empty((B,), dtype=torch.int64))


@torch.library.custom_op("vkern::vatp_prune_", mutates_args=("k", "v"))
def vatp_prune_inplace_op(k: torch.Tensor, v: torch.Tensor, scores: torch.Tensor, seq_lens: Optional[torch.Tensor],
                          budget_tokens: int, budget_frac: float, num_sink: int, num_recent: int,
                          backend: str) -> Tuple[torch.Tensor, torch.Tensor]:
    _, _, idx, lens = _vatp.vatp_prune_impl(k, v, scores, budget=_budget(budget_tokens, budget_frac),
                                            num_sink=num_sink, num_recent=num_recent, seq_lens=seq_lens,
                                            inplace=True, backend=backend)
    return idx, lens


@vatp_prune_inplace_op.register_fake
def _(k, v, scores, seq_lens, budget_tokens, budget_frac, num_sink, num_recent, backend):
    kmax = _fake_kmax(k, seq_lens, budget_tokens, budget_frac, num_sink, num_recent)
    return k.new_empty((k.shape[0], k.shape[1], kmax), dtype=torch.int64), k.new_empty((k.shape[0],),
                                                                                        dtype=torch.int64)


@torch.library.custom_op("vkern::vatp_prune_out", mutates_args=("k_out", "v_out"))
def vatp_prune_out_op(k: torch.Tensor, v: torch.Tensor, scores: torch.Tensor, seq_lens: Optional[torch.Tensor],
                      budget_tokens: int, budget_frac: float, num_sink: int, num_recent: int, backend: str,
                      k_out: torch.Tensor, v_out: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    _, _, idx, lens = _vatp.vatp_prune_impl(k, v, scores, budget=_budget(budget_tokens, budget_frac),
                                            num_sink=num_sink, num_recent=num_recent, seq_lens=seq_lens,
                                            out=(k_out, v_out), backend=backend)
    return idx, lens


@vatp_prune_out_op.register_fake
def _(k, v, scores, seq_lens, budget_tokens, budget_frac, num_sink, num_recent, backend, k_out, v_out):
    kmax = _fake_kmax(k, seq_lens, budget_tokens, budget_frac, num_sink, num_recent)
    return k.new_empty((k.shape[0], k.shape[1], kmax), dtype=torch.int64), k.new_empty((k.shape[0],),
                                                                                        dtype=torch.int64)


def call_vatp_prune(k, v, scores, budget, num_sink, num_recent, seq_lens, inplace, backend, out=None):
    frac = isinstance(budget, float)
    bt, bf = (-1, float(budget)) if frac else (int(budget), 0.0)
    if out is not None and not inplace:
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            raise TypeError(f"out: expected a pair (k_out, v_out) of tensors, got {type(out).__name__}")
        idx, lens = vatp_prune_out_op(k, v, scores, seq_lens, bt, bf, int(num_sink), int(num_recent), backend,
                                      out[0], out[1])
        kmax = idx.shape[2]
        return out[0][:, :, :kmax], out[1][:, :, :kmax], idx, lens
    if out is not None:
        raise ValueError("out: cannot be combined with inplace=True (in place the results are views of k and v)")
    if not inplace:
        return vatp_prune_op(k, v, scores, seq_lens, bt, bf, int(num_sink), int(num_recent), backend)
    idx, lens = vatp_prune_inplace_op(k, v, scores, seq_lens, bt, bf, int(num_sink), int(num_recent), backend)
    kmax = idx.shape[2]
    return k[:, :, :kmax], v[:, :, :kmax], idx, lens
