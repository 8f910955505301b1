"""Hugging Face transformers integration: a vkern KV cache, dense / Loki decode attention
inside ``model.generate``, and VATP pruning of the cache between prefill and decode.

Imports without transformers (and without torch); the classes that subclass transformers'
own (``VkernCache``, ``VkernLayer``, ``VATPPress``) are built on first access.

Pieces (see the README section "transformers" for a runnable snippet):

* ``VkernCache(model=None, *, loki=None, rank=..., topk=..., num_sink=..., num_recent=...,
  gqa=..., collect_vatp=False, reserve=128)``: a transformers ``Cache`` of ``VkernLayer``\\ s.
  K and V live in preallocated ``[B, H_kv, capacity, D]`` buffers that grow by 1.5x when full
  (amortised) and are written in place; ``get_seq_length()`` is the number of positions seen
  (what ``generate`` continues ``cache_position`` from), also after pruning, while
  ``get_mask_sizes`` describes the keys ``update`` returns.
  With any attention implementation (eager, sdpa, ...) the cache behaves as ``DynamicCache``
  (left padding included). With the vkern attention functions below, each sequence's valid
  tokens are moved to the front of its row once (left padding removed, ``seq_lens`` per row),
  which is the layout the vkern ops read; from then on (and after Loki rotation or VATP
  pruning) only the vkern functions can read the cache, and a step served by another
  implementation raises ``RuntimeError`` at the next update instead of giving wrong tokens.
* ``attn_implementation="vkern"``: exact attention for prefill (transformers' own sdpa code),
  ``vkern.decode_attention`` for every decode step. ``enable(model, "vkern")`` registers and
  switches; ``register()`` only registers (then ``from_pretrained(..., attn_implementation="vkern")``).
* ``attn_implementation="vkern_loki"`` with ``VkernCache(model, loki=calibrate_loki(model, ids), rank=32,
  topk=0.25, num_sink=4, num_recent=16, gqa="shared")``: keys are rotated into the per-layer PCA
  basis as they enter the cache (and their first ``rank`` dims copied into a prefix buffer), every
  decode step runs ``vkern.loki_attention``.
* ``vatp_prune_cache(cache, budget=..., num_sink=4, num_recent=32)`` after a prefill through a
  ``VkernCache(collect_vatp=True)``: scores = ``vkern.vatp.attention_colsum`` over the prefill's
  queries (gathered during prefill; no attention maps) x ``vkern.vatp.value_l1``, compaction by
  ``vkern.vatp_prune`` into new, smaller buffers (the old ones are freed).
  ``vatp_generate(model, input_ids, ...)`` does prefill, pruning and ``generate`` in one call.
* ``VATPPress(compression_ratio)``: the same scores as a kvpress ``ScorerPress`` (needs kvpress).

Refused with a clear error: sliding-window / chunked layers under the vkern attention functions,
models whose attention does not go through transformers' attention interface (``enable``),
Loki bases calibrated on another model, ``rank`` > head_dim, a VATP budget below
``num_sink + num_recent``.
"""
from __future__ import annotations

import hashlib
import json
import math
import threading
from dataclasses import dataclass
from typing import Any, List, Optional, Union

__all__ = ["IMPL_DENSE", "IMPL_LOKI", "register", "enable", "VkernCache", "VkernLayer", "LokiBases",
           "calibrate_loki", "load_loki_bases", "vatp_prune_cache", "vatp_generate", "VATPPress",
           "cache_nbytes", "model_fingerprint"]

IMPL_DENSE = "vkern"
IMPL_LOKI = "vkern_loki"
_IMPLS = (IMPL_DENSE, IMPL_LOKI)
_FORMAT = "vkern-loki-bases-1"
GQA_MODES = ("shared", "per_head")

_tls = threading.local()   # the layer whose update() ran last (read by the attention functions)


def _require_transformers():
    try:
        import transformers  # noqa: F401
    except ImportError as e:  # pragma: no cover - exercised only without transformers
        raise ImportError("vkern.integrations.transformers needs transformers: pip install 'transformers>=5.2,<5.3'"
                          ) from e
    import torch

    return torch


# --------------------------------------------------------------------------- model identity

def _text_config(config):
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def _head_dim(cfg) -> int:
    hd = getattr(cfg, "head_dim", None)
    return int(hd) if hd else int(cfg.hidden_size // cfg.num_attention_heads)


def model_fingerprint(model) -> tuple:
    """(name, config hash) of a model: the hash covers the attention geometry, RoPE settings
    and the bytes of the first layer's key projection, so bases calibrated on another model
    (or another checkpoint of the same architecture) are refused."""
    torch = _require_transformers()
    cfg = _text_config(model.config)
    keys = ("model_type", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "hidden_size",
            "vocab_size", "rope_theta", "rope_scaling", "rope_parameters", "partial_rotary_factor")
    desc = {k: getattr(cfg, k, None) for k in keys}
    desc["head_dim"] = _head_dim(cfg)
    h = hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode())
    kproj = None
    for name, p in model.named_parameters():
        if name.endswith("k_proj.weight"):
            kproj = p
            break
    if kproj is not None:
        h.update(kproj.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    name = getattr(model.config, "_name_or_path", "") or getattr(model.config, "name_or_path", "") or \
        str(getattr(cfg, "model_type", "model"))
    return str(name), h.hexdigest()


# --------------------------------------------------------------------------- registration

def _attention_fn(impl: str):
    def fn(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        return _attend(impl, module, query, key, value, attention_mask, dropout, scaling, kwargs)

    fn.__name__ = f"{impl}_attention_forward"
    return fn


def register() -> None:
    """Registers ``"vkern"`` and ``"vkern_loki"`` with transformers' AttentionInterface (and sdpa's
    mask function for both). Idempotent."""
    _require_transformers()
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    for impl in _IMPLS:
        if impl not in ALL_ATTENTION_FUNCTIONS.valid_keys():
            AttentionInterface.register(impl, _attention_fn(impl))
        if impl not in ALL_MASK_ATTENTION_FUNCTIONS.valid_keys():
            AttentionMaskInterface.register(impl, sdpa_mask)


def _sliding_layers(model) -> list:
    cfg = _text_config(model.config)
    types = getattr(cfg, "layer_types", None)
    if types:
        return [i for i, t in enumerate(types) if t in ("sliding_attention", "chunked_attention")]
    window = getattr(cfg, "sliding_window", None) or getattr(cfg, "attention_chunk_size", None)
    if window is not None and getattr(cfg, "use_sliding_window", True):
        return list(range(int(cfg.num_hidden_layers)))
    return []


def enable(model, impl: str = IMPL_DENSE):
    """Registers the vkern attention functions and switches ``model`` to ``impl``
    (``"vkern"`` or ``"vkern_loki"``); returns the model.

    Raises ValueError (naming ``model``) when the model's attention does not go through
    transformers' attention interface, or when it has sliding-window / chunked layers."""
    if impl not in _IMPLS:
        raise ValueError(f"impl: expected one of {_IMPLS}, got {impl!r}")
    _require_transformers()
    if not getattr(type(model), "_supports_attention_backend", False):
        raise ValueError(f"model: {type(model).__name__} does not route its attention through transformers' "
                         f"AttentionInterface (_supports_attention_backend is False), so attn_implementation="
                         f"{impl!r} would never run; use its own attention with VkernCache, or another model")
    sliding = _sliding_layers(model)
    if sliding:
        raise ValueError(f"model: layers {sliding[:8]}{'...' if len(sliding) > 8 else ''} use sliding-window or "
                         f"chunked attention, which the vkern attention functions do not implement "
                         f"(they would attend to the whole cache); keep the model's own attention")
    register()
    model.set_attn_implementation(impl)
    return model


# --------------------------------------------------------------------------- Loki bases

@dataclass
class LokiBases:
    """Per-layer PCA bases of post-RoPE keys (``calibrate_loki``).

    P: float32 tensor [L, H_kv, D, D] (columns = principal directions, descending variance);
    explained: float64 [L, H_kv, D] cumulative explained-variance ratio; name / config_hash:
    the model they were calibrated on (``model_fingerprint``)."""
    P: Any
    explained: Any
    name: str
    config_hash: str
    num_tokens: int = 0

    @property
    def num_layers(self) -> int:
        return int(self.P.shape[0])

    @property
    def head_dim(self) -> int:
        return int(self.P.shape[-1])

    def rank_for_variance(self, frac: float) -> int:
        """Smallest rank keeping ``frac`` of the key variance in every layer and head."""
        import numpy as np

        from ..loki import LokiBasis, rank_for_variance

        ex = np.asarray(self.explained, np.float64)
        return max(rank_for_variance(LokiBasis(None, ex[i], None), frac) for i in range(ex.shape[0]))

    def check(self, model) -> None:
        """Raises ValueError (naming ``bases``) unless these bases were calibrated on ``model``."""
        name, h = model_fingerprint(model)
        if h != self.config_hash:
            raise ValueError(f"bases: calibrated on {self.name!r} (config hash {self.config_hash[:12]}...), but the "
                             f"model is {name!r} (config hash {h[:12]}...); recalibrate with "
                             f"calibrate_loki(model, ids)")

    def save(self, path) -> None:
        """Safetensors file with P, explained and the model's name and config hash as metadata."""
        torch = _require_transformers()
        from safetensors.torch import save_file

        save_file({"P": self.P.detach().to("cpu", torch.float32).contiguous(),
                   "explained": torch.as_tensor(self.explained, dtype=torch.float64).contiguous()},
                  str(path), metadata={"format": _FORMAT, "name": self.name, "config_hash": self.config_hash,
                                       "num_tokens": str(self.num_tokens)})


def load_loki_bases(path, model) -> LokiBases:
    """Loads bases saved by ``LokiBases.save``; ValueError (naming ``bases``) when they were
    calibrated on another model than ``model``, ``path`` when the file is not such a file."""
    _require_transformers()
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != _FORMAT:
            raise ValueError(f"path: {path} is not a vkern Loki bases file (format {meta.get('format')!r})")
        P, explained = f.get_tensor("P"), f.get_tensor("explained")
    bases = LokiBases(P, explained.numpy(), meta.get("name", ""), meta.get("config_hash", ""),
                      int(meta.get("num_tokens", "0")))
    bases.check(model)
    return bases


def calibrate_loki(model, input_ids, attention_mask=None) -> LokiBases:
    """Per-layer PCA bases of the post-RoPE keys the model produces on ``input_ids``.

    input_ids: [N] or [B, N] token ids (calibration text; a few thousand tokens is plenty);
    attention_mask: optional [B, N] (padding excluded). One forward pass with a DynamicCache;
    the cached keys of each layer go to ``vkern.loki.pca_basis`` (float64)."""
    torch = _require_transformers()
    from transformers import DynamicCache

    from ..loki import pca_basis

    ids = torch.as_tensor(input_ids)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.shape[1] < 2 or ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"input_ids: expected integer token ids [N] or [B, N] with N >= 2, "
                         f"got {tuple(ids.shape)} {ids.dtype}")
    dev = next(model.parameters()).device
    ids = ids.to(dev)
    cache = DynamicCache()
    with torch.inference_mode():
        model(ids, attention_mask=attention_mask, past_key_values=cache, use_cache=True)
    valid = None if attention_mask is None else torch.as_tensor(attention_mask).to(dev).bool()
    Ps, exs = [], []
    for layer in cache.layers:
        k = layer.keys                                          # [B, H, N, D], post-RoPE
        flat = k.permute(0, 2, 1, 3)                            # [B, N, H, D]
        flat = flat[valid] if valid is not None else flat.reshape(-1, k.shape[1], k.shape[3])
        b = pca_basis(flat.float())
        Ps.append(torch.as_tensor(b.P).float().cpu())
        exs.append(torch.as_tensor(b.explained))
    name, h = model_fingerprint(model)
    return LokiBases(torch.stack(Ps), torch.stack(exs).numpy(), name, h, int(ids.numel()))


# --------------------------------------------------------------------------- helpers

def _int(x, name: str, lo: int) -> int:
    if isinstance(x, bool) or not isinstance(x, int) and not (hasattr(x, "__index__") and not isinstance(x, float)):
        raise TypeError(f"{name}: expected an int, got {type(x).__name__}")
    x = int(x)
    if x < lo:
        raise ValueError(f"{name}: expected an int >= {lo}, got {x}")
    return x


def _frac_or_int(x, name: str):
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"{name}: expected an int (tokens) or a float (fraction of the length), got {type(x).__name__}")
    if isinstance(x, float):
        if not 0.0 < x <= 1.0:
            raise ValueError(f"{name}: a fraction must be in (0, 1], got {x}")
        return x
    return _int(x, name, 1)


def cache_nbytes(cache, *, allocated: bool = True) -> int:
    """Bytes of a cache's K/V tensors, measured from the tensors: every buffer's full
    allocation (``allocated=True``) or only the rows holding valid tokens."""
    total = 0
    for layer in cache.layers:
        if hasattr(layer, "nbytes"):
            total += layer.nbytes(allocated=allocated)
        elif getattr(layer, "keys", None) is not None and layer.keys.numel():
            total += layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
    return total


# --------------------------------------------------------------------------- the attention functions

def _prefill_exact(module, query, key, value, mask, dropout, scaling, kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)


def _valid_columns(mask, B: int, Tk: int):
    """Per row, the number of leading invalid columns of a [B, 1, Tq, Tk] mask's last query
    row (left padding), or None when every column is valid; ValueError for other patterns."""
    torch = _require_transformers()
    if mask is None:
        return None
    last = mask[:, 0, -1, :] if mask.dtype == torch.bool else mask[:, 0, -1, :] == 0
    if last.shape[0] != B:
        last = last.expand(B, -1)
    if bool(last.all()):
        return None
    pads = (~last).int().cumprod(dim=1).sum(dim=1)             # leading False count per row
    ok = last.int().sum(dim=1) == (last.shape[1] - pads)
    if not bool(ok.all()):
        raise ValueError("attention_mask: the vkern attention functions support left padding only "
                         "(padding tokens before each sequence, as generate makes them)")
    return [int(p) for p in pads.tolist()]


def _attend(impl, module, query, key, value, mask, dropout, scaling, kwargs):
    torch = _require_transformers()
    if kwargs.get("sliding_window") is not None or getattr(module, "sliding_window", None) is not None:
        raise ValueError(f"attn_implementation={impl!r}: layer {getattr(module, 'layer_idx', '?')} uses a sliding "
                         f"window, which the vkern attention functions do not implement; use the model's own attention")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    layer = getattr(_tls, "layer", None)
    _tls.layer = None
    if layer is not None and layer.returned is not key:
        layer = None                                            # not the tensors our cache just handed out
    B, Hq, Tq, D = query.shape
    if layer is None:
        if impl == IMPL_LOKI and Tq == 1:
            raise ValueError("past_key_values: attn_implementation='vkern_loki' needs a VkernCache(model, loki=...) "
                             "(the keys must be rotated into the Loki basis as they enter the cache)")
        # Another cache (DynamicCache, StaticCache...): exact attention, through vkern when unmasked.
        if Tq == 1 and (mask is None or bool(mask.all() if mask.dtype == torch.bool else (mask == 0).all())) \
                and key.shape[-2] >= 1:
            from ..ops.loki import decode_attention

            out = decode_attention(query[:, :, 0], key, value, scale=float(scaling))
            return out[:, None], None
        return _prefill_exact(module, query, key, value, mask, dropout, scaling, kwargs)
    layer.pending = False
    if impl == IMPL_LOKI and layer.loki is None:
        raise ValueError("past_key_values: attn_implementation='vkern_loki' needs a VkernCache(model, loki=bases)")
    if layer.aligned:
        pads = _valid_columns(mask, B, layer.columns) if (mask is not None and layer.columns == mask.shape[-1]) \
            else None
        first = layer.columns == Tq                             # the whole cache came in this call
        if Tq > 1 and first:
            out = _prefill_exact(module, query, key, value, mask, dropout, scaling, kwargs)
            layer.settle(pads)                                  # compact rows (left padding), rotate (Loki)
            if layer.collect_vatp:
                layer.add_colsum(query, pads, scaling)
            return out
        layer.settle(pads)
        if Tq > 1 and layer.aligned and layer.loki is None:
            return _prefill_exact(module, query, key, value, mask, dropout, scaling, kwargs)
    if Tq > 1:
        out = layer.exact_compact(query, scaling)
        if layer.collect_vatp:
            layer.add_colsum(query, None, scaling)
        return out, None
    k, v, lens = layer.views()
    q = layer.rotate_query(query)[:, :, 0] if layer.rotated else query[:, :, 0]
    if impl == IMPL_LOKI:
        from ..ops.loki import loki_attention

        out = loki_attention(q, k, v, rank=layer.rank, topk=layer.topk_for(lens), seq_lens=lens,
                             num_sink=layer.num_sink, num_recent=layer.num_recent, gqa=layer.gqa,
                             scale=float(scaling), k_prefix=layer.prefix_view())
    else:
        from ..ops.loki import decode_attention

        out = decode_attention(q, k, v, seq_lens=lens, scale=float(scaling))
    if out.dtype != query.dtype:
        out = out.to(query.dtype)
    return out[:, None], None


# --------------------------------------------------------------------------- cache classes

def _build_classes():
    torch = _require_transformers()
    from transformers.cache_utils import Cache, CacheLayerMixin

    class VkernLayer(CacheLayerMixin):
        """One layer of a VkernCache: K/V in preallocated [B, H_kv, capacity, D] buffers.

        ``columns``: positions seen (= get_seq_length). ``lens``: per row, valid tokens
        held (rows are front-aligned once a vkern attention function has seen the cache,
        or after pruning; before that, row layout = column layout, as DynamicCache)."""

        is_sliding = False
        is_compileable = False

        def __init__(self, *, reserve: int = 128, P=None, loki: Optional[dict] = None, collect_vatp=False):
            super().__init__()
            self.reserve = reserve
            self.loki = loki
            self.P_cpu = P
            self.collect_vatp = collect_vatp
            self.columns = 0
            self.lens: List[int] = []
            self.aligned = True        # row layout == column layout (no compaction yet)
            self.rotated = False       # buffer keys are in the Loki basis
            self.pending = False       # update() ran, no vkern attention function has read it yet
            self.returned = None
            self.colsum = None
            self.kept_idx = None
            self.kpre = None
            self._lens_t = None
            self.keys = self.values = None

        # -- transformers' layer interface
        def lazy_initialization(self, key_states, value_states):
            self.dtype, self.device = key_states.dtype, key_states.device
            B, H, n, D = key_states.shape
            self.max_batch_size, self.num_heads = B, H
            cap = n + self.reserve
            self.keys = key_states.new_zeros((B, H, cap, D))
            self.values = value_states.new_zeros((B, H, cap, value_states.shape[-1]))
            self.lens = [0] * B
            if self.loki is not None:
                if self.P_cpu.shape[0] != H or self.P_cpu.shape[-1] != D:
                    raise ValueError(f"bases: layer bases [H_kv, D, D] = {tuple(self.P_cpu.shape)} do not match the "
                                     f"model's keys (H_kv={H}, D={D})")
                self.P = self.P_cpu.to(device=self.device, dtype=torch.float32).contiguous()
                self._Pq = None
                if self.loki["key_prefix"]:
                    self.kpre = key_states.new_zeros((B, H, cap, self.loki["rank"]))
            self.is_initialized = True

        def update(self, key_states, value_states, cache_kwargs=None):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            if self.pending and self.needs_vkern:
                raise RuntimeError("past_key_values: this VkernCache holds compacted, rotated or pruned keys, which "
                                   "only attn_implementation='vkern' / 'vkern_loki' can read, but the last step of "
                                   "this layer was served by another attention function (call "
                                   "vkern.integrations.transformers.enable(model, ...))")
            B, H, n, D = key_states.shape
            if B != self.keys.shape[0] or H != self.keys.shape[1] or D != self.keys.shape[3]:
                raise ValueError(f"key_states: expected [B={self.keys.shape[0]}, H_kv={self.keys.shape[1]}, n, "
                                 f"D={self.keys.shape[3]}], got {tuple(key_states.shape)}")
            first = self.columns == 0
            self._grow(max(self.lens) + n)
            k_in = self.rotate_keys(key_states) if self.rotated else key_states
            if len(set(self.lens)) == 1:
                L = self.lens[0]
                self.keys[:, :, L:L + n].copy_(k_in)
                self.values[:, :, L:L + n].copy_(value_states)
                if self.kpre is not None and self.rotated:
                    self.kpre[:, :, L:L + n].copy_(k_in[..., :self.kpre.shape[-1]])
            else:
                for b, L in enumerate(self.lens):
                    self.keys[b, :, L:L + n].copy_(k_in[b])
                    self.values[b, :, L:L + n].copy_(value_states[b])
                    if self.kpre is not None and self.rotated:
                        self.kpre[b, :, L:L + n].copy_(k_in[b, ..., :self.kpre.shape[-1]])
            self.lens = [L + n for L in self.lens]
            self._lens_t = None
            self.columns += n
            T = max(self.lens)
            if first and self.loki is not None:
                out = (key_states, value_states)                 # rotated by settle(), after prefill attention
            else:
                out = (self.keys[:, :, :T], self.values[:, :, :T])
            self.pending = True
            self.returned = out[0]
            _tls.layer = self
            return out

        def get_mask_sizes(self, cache_position):
            return (max(self.lens) if self.lens else 0) + cache_position.shape[0], 0

        def get_seq_length(self) -> int:
            return self.columns

        def get_max_cache_shape(self) -> int:
            return -1

        def reset(self):
            self.__init__(reserve=self.reserve, P=self.P_cpu, loki=self.loki, collect_vatp=self.collect_vatp)

        def crop(self, max_length: int):
            if max_length < 0:
                max_length = self.columns - abs(max_length)
            if self.columns <= max_length:
                return
            if not self.aligned:
                raise ValueError("max_length: a compacted or pruned VkernCache cannot be cropped (its rows no "
                                 "longer map to positions)")
            self.columns = max_length
            self.lens = [max_length] * len(self.lens)
            self._lens_t = None

        def _select_rows(self, idx):
            self.keys, self.values = self.keys[idx], self.values[idx]
            if self.kpre is not None:
                self.kpre = self.kpre[idx]
            if self.colsum is not None:
                self.colsum = self.colsum[idx]
            self.lens = [self.lens[int(i)] for i in idx.tolist()]
            self._lens_t = None

        def reorder_cache(self, beam_idx):
            if self.is_initialized:
                self._select_rows(beam_idx.to(self.keys.device))

        def batch_select_indices(self, indices):
            if self.is_initialized:
                idx = torch.as_tensor(indices, device=self.keys.device)
                if idx.dtype == torch.bool:
                    idx = idx.nonzero().flatten()
                self._select_rows(idx)

        def batch_repeat_interleave(self, repeats: int):
            if self.is_initialized:
                self._select_rows(torch.arange(len(self.lens), device=self.keys.device).repeat_interleave(repeats))

        def offload(self):
            raise NotImplementedError("VkernCache does not offload")

        # -- vkern side
        def rotate_keys(self, x):
            """x [B, H_kv, n, D] (post-RoPE keys) into this layer's Loki basis, in the cache's dtype:
            one batched float32 matmul (x[b, h] @ P[h]); a decode step's one new key is too small
            for a threaded kernel call to pay off."""
            xf = x if x.dtype == torch.float32 else x.float()
            out = torch.matmul(xf, self.P)
            return out if out.dtype == self.dtype else out.to(self.dtype)

        def rotate_query(self, q):
            """q [B, Hq, Tq, D] into the basis (query head h uses its KV head's P[h // G]); float32."""
            Hq = q.shape[1]
            if self._Pq is None or self._Pq.shape[0] != Hq:
                self._Pq = self.P.repeat_interleave(Hq // self.P.shape[0], dim=0).contiguous()
            return torch.matmul(q if q.dtype == torch.float32 else q.float(), self._Pq)

        @property
        def needs_vkern(self) -> bool:
            return (not self.aligned) or self.rotated

        def nbytes(self, allocated: bool = True) -> int:
            if not self.is_initialized:
                return 0
            bufs = [self.keys, self.values] + ([self.kpre] if self.kpre is not None else [])
            if allocated:
                return sum(t.numel() * t.element_size() for t in bufs)
            used = sum(self.lens)
            return sum(used * t.shape[1] * t.shape[3] * t.element_size() for t in bufs)

        def _grow(self, need: int):
            cap = self.keys.shape[2]
            if need <= cap:
                return
            new = max(need + self.reserve, int(cap * 1.5))
            for name in ("keys", "values", "kpre"):
                t = getattr(self, name)
                if t is None:
                    continue
                n = t.new_zeros((t.shape[0], t.shape[1], new, t.shape[3]))
                n[:, :, :cap].copy_(t)
                setattr(self, name, n)

        def views(self):
            T = max(self.lens)
            if self._lens_t is None:
                self._lens_t = torch.tensor(self.lens, dtype=torch.int64, device=self.keys.device)
            return self.keys[:, :, :T], self.values[:, :, :T], self._lens_t

        def prefix_view(self):
            return None if self.kpre is None else self.kpre[:, :, :max(self.lens)]

        def topk_for(self, lens):
            topk, forced = self.loki["topk"], self.num_sink + self.num_recent
            if isinstance(topk, float):
                shortest = min(self.lens)
                if math.ceil(topk * shortest) < min(shortest, forced):
                    return max(forced, math.ceil(topk * max(self.lens)))   # sinks + recent must fit
            return topk

        @property
        def rank(self):
            return self.loki["rank"]

        @property
        def num_sink(self):
            return self.loki["num_sink"]

        @property
        def num_recent(self):
            return self.loki["num_recent"]

        @property
        def gqa(self):
            return self.loki["gqa"]

        def settle(self, pads):
            """Once: move each row's valid tokens to the front (left padding ``pads``) and
            rotate the keys into the Loki basis."""
            if pads is not None and any(pads):
                for b, p in enumerate(pads):
                    if p:
                        L = self.lens[b]
                        for t in (self.keys, self.values):
                            t[b, :, :L - p] = t[b, :, p:L].clone()
                            t[b, :, L - p:L].zero_()
                        self.lens[b] = L - p
                self._lens_t = None
                self.aligned = False
            if self.loki is not None and not self.rotated:
                from ..loki import rotate

                T = max(self.lens)
                k = self.keys[:, :, :T]
                k.copy_(rotate(k.transpose(1, 2), self.P).transpose(1, 2))
                if self.kpre is not None:
                    self.kpre[:, :, :T].copy_(k[..., :self.kpre.shape[-1]])
                self.rotated = True

        def exact_compact(self, query, scaling):
            """Exact attention of Tq new queries (the last Tq tokens of each row) over the
            front-aligned rows: [B, Tq, Hq, D]."""
            B, Hq, Tq, D = query.shape
            q = query
            if self.rotated:
                from ..loki import rotate

                q = rotate(query.transpose(1, 2), self.P).transpose(1, 2)
            g = Hq // self.keys.shape[1]
            out = query.new_empty((B, Tq, Hq, self.values.shape[-1]))
            for b, L in enumerate(self.lens):
                k = self.keys[b, :, :L].repeat_interleave(g, dim=0)
                v = self.values[b, :, :L].repeat_interleave(g, dim=0)
                m = torch.arange(L, device=q.device)[None, :] <= torch.arange(L - Tq, L, device=q.device)[:, None]
                o = torch.nn.functional.scaled_dot_product_attention(q[b], k, v, attn_mask=m, scale=scaling)
                out[b] = o.transpose(0, 1)
            return out

        def add_colsum(self, query, pads, scaling):
            """Accumulates VATP's attention column sums of these prefill queries (rows front-aligned)."""
            from ..vatp import attention_colsum

            B, Hq, Tq, D = query.shape
            q = query
            if pads is not None and any(pads):
                q = torch.zeros_like(query)
                for b, p in enumerate(pads):
                    q[b, :, :Tq - p] = query[b, :, p:]
            if self.rotated:
                from ..loki import rotate

                q = rotate(q.transpose(1, 2), self.P).transpose(1, 2)
            k, _, lens = self.views()
            cs = attention_colsum(q.contiguous(), k, causal=True, seq_lens=lens, scale=float(scaling))
            if self.colsum is not None:
                cs[:, :, :self.colsum.shape[2]] += self.colsum
            self.colsum = cs

        def prune(self, budget, num_sink, num_recent, reserve):
            from ..vatp import value_l1, vatp_prune

            if self.colsum is None:
                raise ValueError("cache: no VATP scores were gathered for this layer; prefill with "
                                 "VkernCache(collect_vatp=True) and attn_implementation='vkern' or 'vkern_loki'")
            k, v, lens = self.views()
            scores = self.colsum[:, :, :k.shape[2]] * value_l1(v)
            B, H = k.shape[:2]
            n = [min(int(budget), L) if isinstance(budget, int) else
                 min(L, max(int(math.floor(budget * L)), min(L, num_sink + num_recent))) for L in self.lens]
            cap = max(n) + reserve
            k_out = k.new_zeros((B, H, cap, k.shape[3]))
            v_out = v.new_zeros((B, H, cap, v.shape[3]))
            _, _, self.kept_idx, kept = vatp_prune(k, v, scores, budget=budget, num_sink=num_sink,
                                                   num_recent=num_recent, seq_lens=lens, out=(k_out, v_out))
            self.keys, self.values = k_out, v_out
            n = [int(x) for x in kept.tolist()]   # kept_idx [B, H_kv, n]: rows of the front-aligned cache
            if self.kpre is not None:
                self.kpre = k_out[..., :self.kpre.shape[-1]].clone()
            self.lens = n
            self._lens_t = None
            self.aligned = False
            self.colsum = None
            self.pending = False

    class VkernCache(Cache):
        """A transformers Cache of VkernLayers (see the module docstring).

        Args:
            model: the model it serves (needed with ``loki`` to check the bases; gives the layer count).
            loki: LokiBases from ``calibrate_loki`` / ``load_loki_bases`` (keys are stored rotated).
            rank: Loki approximate-score rank (1..head_dim, default head_dim // 4).
            topk: tokens kept per decode step (int, or fraction of the length; default 0.25).
            num_sink, num_recent: always-kept first / last tokens (default 4 and 16).
            gqa: "shared" (one selection per KV group) or "per_head".
            key_prefix: keep a separate copy of the first ``rank`` rotated key dims (default True).
            collect_vatp: gather VATP's attention column sums during prefill (for vatp_prune_cache).
            reserve: free rows allocated beyond each need (growth is max(need + reserve, 1.5x)).
        """

        def __init__(self, model=None, *, loki: Optional[LokiBases] = None, rank: Optional[int] = None,
                     topk: Union[int, float] = 0.25, num_sink: int = 4, num_recent: int = 16,
                     gqa: str = "shared", key_prefix: bool = True, collect_vatp: bool = False,
                     reserve: int = 128):
            reserve = _int(reserve, "reserve", 0)
            if model is not None and _sliding_layers(model):
                raise ValueError("model: VkernCache does not implement sliding-window / chunked layers "
                                 f"(layers {_sliding_layers(model)[:8]}); use DynamicCache(config=model.config)")
            opts = None
            if loki is not None:
                if not isinstance(loki, LokiBases):
                    raise TypeError(f"loki: expected LokiBases (calibrate_loki / load_loki_bases), "
                                    f"got {type(loki).__name__}")
                if model is None:
                    raise ValueError("model: VkernCache(loki=...) needs the model, to check the bases belong to it")
                loki.check(model)
                D = loki.head_dim
                rank = D // 4 if rank is None else rank
                rank = _int(rank, "rank", 1)
                if rank > D:
                    raise ValueError(f"rank: expected 1 <= rank <= head_dim={D}, got {rank}")
                topk = _frac_or_int(topk, "topk")
                num_sink, num_recent = _int(num_sink, "num_sink", 0), _int(num_recent, "num_recent", 0)
                if isinstance(topk, int) and topk < num_sink + num_recent:
                    raise ValueError(f"topk: {topk} tokens cannot hold num_sink + num_recent = "
                                     f"{num_sink} + {num_recent}")
                if gqa not in GQA_MODES:
                    raise ValueError(f"gqa: expected one of {GQA_MODES}, got {gqa!r}")
                opts = dict(rank=rank, topk=topk, num_sink=num_sink, num_recent=num_recent, gqa=gqa,
                            key_prefix=bool(key_prefix))
            elif rank is not None:
                raise ValueError("rank: only meaningful with loki=bases")
            self.loki = loki
            self.options = opts
            if model is not None:
                n_layers = int(_text_config(model.config).num_hidden_layers)
                if loki is not None and loki.num_layers != n_layers:
                    raise ValueError(f"bases: {loki.num_layers} layers, the model has {n_layers}")
                layers = [VkernLayer(reserve=reserve, collect_vatp=collect_vatp,
                                     P=None if loki is None else loki.P[i], loki=opts) for i in range(n_layers)]
                super().__init__(layers=layers)
            else:
                import functools

                super().__init__(layer_class_to_replicate=functools.partial(
                    VkernLayer, reserve=reserve, collect_vatp=collect_vatp))

        def nbytes(self, allocated: bool = True) -> int:
            return cache_nbytes(self, allocated=allocated)

    return VkernLayer, VkernCache


def _build_press():
    _require_transformers()
    try:
        from kvpress import ScorerPress
        from kvpress.utils import get_prerope_query_states
    except ImportError as e:
        raise ImportError("VATPPress needs kvpress: pip install --no-deps kvpress (it pins transformers<5.3)") from e
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    @dataclass
    class VATPPress(ScorerPress):
        """kvpress ScorerPress with VATP scores: attention each key receives from the prefill's
        queries (``vkern.vatp.attention_colsum``, no attention maps) x the L1 norm of its value
        (``vkern.vatp.value_l1``). kvpress keeps the top (1 - compression_ratio) and gathers."""

        compression_ratio: float = 0.0

        def score(self, module, hidden_states, keys, values, attentions, kwargs):
            from ..vatp import attention_colsum, value_l1

            q = get_prerope_query_states(module, hidden_states)
            cos, sin = kwargs["position_embeddings"]
            q, _ = apply_rotary_pos_emb(q, q, cos, sin)
            scale = float(getattr(module, "scaling", q.shape[-1] ** -0.5))
            cs = attention_colsum(q.contiguous(), keys.contiguous(), causal=True, scale=scale)
            return cs * value_l1(values.contiguous())

    return VATPPress


_classes: dict = {}


def __getattr__(name):
    if name in ("VkernLayer", "VkernCache"):
        if "VkernCache" not in _classes:
            _classes["VkernLayer"], _classes["VkernCache"] = _build_classes()
        return _classes[name]
    if name == "VATPPress":
        if name not in _classes:
            _classes[name] = _build_press()
        return _classes[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------------- VATP

def vatp_prune_cache(cache, *, budget: Union[int, float], num_sink: int = 4, num_recent: int = 32,
                     reserve: Optional[int] = None):
    """Prunes every layer of a prefilled ``VkernCache(collect_vatp=True)`` to ``budget`` tokens
    per (sequence, KV head) by VATP scores, compacting into new buffers (the old are freed).

    budget: int tokens (>= num_sink + num_recent) or float fraction of each sequence's length.
    reserve: free rows kept after the budget for the tokens to come (default: the cache's).
    Positions are untouched: ``cache.get_seq_length()`` still counts every token seen.
    Returns the cache."""
    VkernCache = __getattr__("VkernCache")
    if not isinstance(cache, VkernCache):
        raise TypeError(f"cache: expected a VkernCache, got {type(cache).__name__}")
    budget = _frac_or_int(budget, "budget")
    num_sink, num_recent = _int(num_sink, "num_sink", 0), _int(num_recent, "num_recent", 0)
    if isinstance(budget, int) and budget < num_sink + num_recent:
        raise ValueError(f"budget: {budget} tokens cannot hold num_sink + num_recent = {num_sink} + {num_recent}")
    if not cache.layers or not all(layer.is_initialized for layer in cache.layers):
        raise ValueError("cache: run the prefill through the cache before pruning it")
    for layer in cache.layers:
        r = layer.reserve if reserve is None else _int(reserve, "reserve", 0)
        layer.prune(budget, num_sink, num_recent, r)
    return cache


def vatp_generate(model, input_ids, attention_mask=None, *, budget: Union[int, float], num_sink: int = 4,
                  num_recent: int = 32, cache=None, **generate_kwargs):
    """Prefill (all tokens but the last), VATP-prune the cache, then ``model.generate``.

    The model must use ``attn_implementation="vkern"`` or ``"vkern_loki"`` (``enable``);
    ``cache`` defaults to ``VkernCache(model, collect_vatp=True)``. Returns generate's output
    (the cache is ``generate_kwargs``' or the one made here; pass ``cache`` to keep a handle)."""
    torch = _require_transformers()
    if model.config._attn_implementation not in _IMPLS:
        raise ValueError(f"model: attn_implementation is {model.config._attn_implementation!r}; a pruned cache "
                         f"needs 'vkern' or 'vkern_loki' (vkern.integrations.transformers.enable(model))")
    if input_ids.shape[-1] < 2:
        raise ValueError("input_ids: need at least 2 tokens (prefill all but the last)")
    if cache is None:
        cache = __getattr__("VkernCache")(model, collect_vatp=True)
    elif not all(getattr(layer, "collect_vatp", False) for layer in cache.layers):
        raise ValueError("cache: create it with VkernCache(..., collect_vatp=True)")
    kw = {} if attention_mask is None else {"attention_mask": attention_mask[:, :-1]}
    if attention_mask is not None:
        pos = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, :-1]
        kw["position_ids"] = pos
    with torch.inference_mode():
        model(input_ids[:, :-1], past_key_values=cache, use_cache=True, **kw)
        vatp_prune_cache(cache, budget=budget, num_sink=num_sink, num_recent=num_recent)
        return model.generate(input_ids, attention_mask=attention_mask, past_key_values=cache, **generate_kwargs)
