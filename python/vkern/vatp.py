"""vkern.vatp: value-aware KV-cache pruning (VATP, SPEC §3).

importance(token j, KV head h) = accumulated attention on j x ||v_j||_1::

    import vkern
    scores = vkern.vatp.attention_colsum(q, k) * vkern.vatp.value_l1(v)   # [B, H_kv, T] float32
    k2, v2, kept_idx, kept_lens = vkern.vatp_prune(k, v, scores, budget=0.5)
"""
from __future__ import annotations

from .ops.vatp import attention_colsum, value_l1, vatp_prune

__all__ = ["attention_colsum", "value_l1", "vatp_prune"]
