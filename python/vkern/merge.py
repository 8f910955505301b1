"""``vkern merge RECIPE.yml OUTDIR``: merge safetensors checkpoints from a mergekit-style recipe.

The recipe subset (keys mergekit reads the same way)::

    merge_method: ties            # linear, task_arithmetic, ties, dare_ties, dare_linear, negmerge, cabs
    base_model: path/to/base      # a directory or .safetensors file (required except for linear)
    models:
      - model: path/to/base       # listing the base is allowed (it is not a task)
      - model: path/to/finetune
        parameters: {weight: 0.5, density: 0.4}
      - store: path/to/store.safetensors   # vkern extension: a task from a quantized store
        task: math
        parameters: {weight: 0.5}
    parameters: {lambda: 1.0, normalize: true}
    dtype: bfloat16               # output dtype (vkern always computes in float32)

A parameter value is a number, or mergekit's conditional form, a list of
``{filter: SUBSTRING, value: x}`` (the first entry whose filter occurs in the
tensor's name wins; no filter, or ``"*"``, matches all): one coefficient per
parameter block per task, as aTLAS learns them. Layer gradients (a list of
numbers) are not supported and are refused.

Everything is checked before anything is written: the recipe's keys, every
method and parameter name, every checkpoint's headers, that every tensor of the
base exists in every model with the same shape, and that every store was made
against this base. Then each tensor is streamed in blocks of ``BLOCK`` elements: the
block of every input is read (``os.preadv``, no memory map), merged and written to the
output shard at once. Only a TIES trim holds a whole tensor: one float32 buffer of
``|delta|`` per task in turn, partitioned in place to find the threshold (a first pass).

Definitions (per tensor, float32; ``delta_t = x_t - base``), as mergekit 0.1.5's
``GeneralizedTaskArithmeticMerge`` and ``linear`` compute them:

* ``linear``: ``sum_t w_t x_t / sum_t w_t`` (normalize: true, the default) or ``sum_t w_t x_t``.
* ``task_arithmetic``: ``base + lambda * sum_t w_t delta_t`` (``/ sum_t w_t`` with normalize;
  a divisor below 1e-8 in magnitude counts as 1).
* ``ties``: each delta trimmed to its ``k = max(1, int(density * numel))`` largest
  magnitudes (density < 1), times w_t; elected sign + where ``sum_t w_t delta_t >= 0``;
  task t kept where ``sign(w_t delta_t)`` equals it (a zero never does);
  ``base + lambda * sum(kept) / sum(kept w_t)`` (a 0 divisor counts as 1; normalize on).
* ``dare_ties`` / ``dare_linear``: each delta keeps each element with probability
  ``density`` (seeded: ``--seed``), then (rescale: true, the default) is scaled to keep
  its L1 norm (mergekit's rescale, not DARE's ``1/density``); dare_ties then elects as
  ties; normalize off by default.

Two methods mergekit does not have (vkern's own recipe names):

* ``negmerge`` (NegMerge, unlearning): the models are several fine-tunes on one forget task;
  ``base - lambda * mean_w(delta_t)`` on the elements whose sign is the same and non-zero in
  every delta, ``base`` elsewhere (``weight`` optional, default 1).
* ``cabs`` (CABS): global ``n`` and ``m``; in recipe order, each delta keeps the n largest
  magnitudes of every m consecutive elements (flat order) among the positions no earlier
  task kept, so the masks never overlap; ``base + lambda * sum_t w_t * kept delta_t``.

Where vkern differs from mergekit: computation is float32 whatever ``dtype`` says
(mergekit computes in ``dtype``, e.g. bfloat16); ties at the trim threshold go to the
lower flat index (mergekit's ``argsort`` leaves them unspecified); ``int8_mask`` is
accepted and changes nothing (the mask is never stored).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from .ops import taskvec_methods as MM
from .checkpoint import (DTYPE_NAMES, FLOAT_DTYPES, Checkpoint, CheckpointError, ShardedWriter, encode_f32, parse_size,
                         read_f32_range, writing)

# method -> (consensus, sparsification, default normalize, default rescale)
GTA_METHODS = {
    "task_arithmetic": (None, None, False, False),
    "ties": ("sum", "magnitude", True, False),
    "dare_ties": ("sum", "random", False, True),
    "dare_linear": (None, "random", False, True),
}
METHODS = ("linear",) + tuple(GTA_METHODS) + ("negmerge", "cabs")
STORE_METHODS = ("task_arithmetic", "ties", "negmerge", "cabs")   # what apply_task_vectors merges from codes
MODEL_PARAMS = {"linear": ("weight",), **{m: ("weight", "density") for m in GTA_METHODS},
                "negmerge": ("weight",), "cabs": ("weight",)}
GLOBAL_PARAMS = {"linear": ("normalize", "weight"),
                 **{m: ("lambda", "normalize", "rescale", "int8_mask", "weight", "density") for m in GTA_METHODS},
                 "negmerge": ("lambda", "weight"), "cabs": ("lambda", "weight", "n", "m")}
RECIPE_KEYS = ("merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source")
# files next to the base's weights that the output model needs (config and tokenizer)
COPY_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "added_tokens.json", "vocab.txt", "vocab.json", "merges.txt",
              "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "chat_template.jinja",
              "chat_template.json", "preprocessor_config.json")


class RecipeError(ValueError):
    """A recipe (or a checkpoint it names) that cannot be merged; raised before anything is written."""


# ------------------------------------------------------------------ recipe

Setting = Any  # a float, or a list of {"filter": str|None, "value": float}


def _check_setting(value: Any, where: str) -> Setting:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        out = []
        for i, cond in enumerate(value):
            extra = set(cond) - {"filter", "value"}
            if extra or "value" not in cond:
                raise RecipeError(f"{where}[{i}]: a conditional value needs keys filter (optional) and value, "
                                  f"got {sorted(cond)}")
            f = cond.get("filter")
            if f is not None and not isinstance(f, str):
                raise RecipeError(f"{where}[{i}].filter: expected a string, got {f!r}")
            v = _check_setting(cond["value"], f"{where}[{i}].value")
            if isinstance(v, list):
                raise RecipeError(f"{where}[{i}].value: nested conditions are not supported")
            out.append({"filter": f, "value": v})
        return out
    if isinstance(value, list):
        raise RecipeError(f"{where}: layer gradients (a list of numbers) are not supported by vkern merge; "
                          "give a number or a list of {filter, value}")
    raise RecipeError(f"{where}: expected a number or a list of {{filter, value}}, got {value!r}")


def evaluate(setting: Setting, tensor_name: str) -> Optional[float]:
    """The value of a parameter for one tensor (mergekit's filter rule: first substring match)."""
    if not isinstance(setting, list):
        return setting
    for cond in setting:
        if cond["filter"] in (None, "*") or cond["filter"] in tensor_name:
            return cond["value"]
    return None


@dataclass
class Source:
    """One input of the merge besides the base: a checkpoint or a task of a quantized store."""
    label: str
    params: Dict[str, Setting]
    ckpt: Optional[Checkpoint] = None
    store: Any = None               # vkern.taskvec_store.Store
    task: Optional[str] = None


@dataclass
class MergePlan:
    method: str
    base: Optional[Checkpoint]
    sources: List[Source]
    globals: Dict[str, Setting]
    out_dtype: Optional[str]                       # safetensors dtype or None (each tensor keeps the base's)
    tensors: List[Tuple[str, str, Tuple[int, ...], bool]] = field(default_factory=list)  # name, dtype, shape, merged

    @property
    def reference(self) -> Checkpoint:
        return self.base if self.base is not None else self.sources[0].ckpt

    def param(self, src: Source, name: str, tensor: str) -> Optional[float]:
        if name in src.params:
            v = evaluate(src.params[name], tensor)
            if v is not None:
                return v
        if name in self.globals:
            return evaluate(self.globals[name], tensor)
        return None

    def global_param(self, name: str, tensor: str, default: Any) -> Any:
        v = evaluate(self.globals[name], tensor) if name in self.globals else None
        return default if v is None else v

    @property
    def input_bytes(self) -> int:
        n = self.base.nbytes if self.base is not None else 0
        for s in self.sources:
            n += s.ckpt.nbytes if s.ckpt is not None else s.store.nbytes
        return n


def _resolve(path: Any, recipe_dir: str, where: str) -> str:
    if not isinstance(path, str) or not path:
        raise RecipeError(f"{where}: expected a path (string), got {path!r}")
    if os.path.exists(path) or os.path.isabs(path):
        return path
    alt = os.path.join(recipe_dir, path)
    return alt if os.path.exists(alt) else path


def load_recipe(path: str) -> Dict[str, Any]:
    try:
        import yaml
    except ImportError:
        raise RecipeError("vkern merge reads YAML recipes with pyyaml: pip install 'vkern[merge]' "
                          "(or pip install pyyaml)") from None

    try:
        with open(path) as f:
            recipe = yaml.safe_load(f)
    except OSError as exc:
        raise RecipeError(f"recipe {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"recipe {path}: not valid YAML ({exc})") from None
    if not isinstance(recipe, dict):
        raise RecipeError(f"recipe {path}: expected a mapping with merge_method, models, ...")
    return recipe


def plan_merge(recipe: Dict[str, Any], recipe_dir: str = ".") -> MergePlan:
    """Validates a recipe and every checkpoint it names (headers only); nothing is read or written."""
    unknown = sorted(set(recipe) - set(RECIPE_KEYS))
    if unknown:
        raise RecipeError(f"recipe: unknown key(s) {unknown}; vkern merge reads {list(RECIPE_KEYS)} "
                          "(slices, modules and tokenizer options are not supported)")
    method = recipe.get("merge_method")
    if method not in METHODS:
        raise RecipeError(f"merge_method: expected one of {list(METHODS)}, got {method!r}")
    tok = recipe.get("tokenizer_source")
    if tok not in (None, "base"):
        raise RecipeError(f"tokenizer_source: only 'base' (the default: the base's tokenizer files are copied) "
                          f"is supported, got {tok!r}")
    dtype = recipe.get("out_dtype") or recipe.get("dtype")
    if dtype is not None and dtype not in DTYPE_NAMES:
        raise RecipeError(f"dtype: expected one of {list(DTYPE_NAMES)}, got {dtype!r}")
    gparams = recipe.get("parameters") or {}
    if not isinstance(gparams, dict):
        raise RecipeError(f"parameters: expected a mapping, got {gparams!r}")
    bad = sorted(set(gparams) - set(GLOBAL_PARAMS[method]))
    if bad:
        raise RecipeError(f"parameters: unknown parameter(s) {bad} for {method}; "
                          f"allowed: {list(GLOBAL_PARAMS[method])}")
    globals_ = {k: _check_setting(v, f"parameters.{k}") for k, v in gparams.items()}

    base = None
    base_path = recipe.get("base_model")
    if base_path is not None:
        try:
            base = Checkpoint(_resolve(base_path, recipe_dir, "base_model"), "base_model")
        except CheckpointError as exc:
            raise RecipeError(str(exc)) from None
    elif method != "linear":
        raise RecipeError(f"base_model: required for {method}")
    models = recipe.get("models")
    if not isinstance(models, list) or not models:
        raise RecipeError("models: expected a non-empty list of {model: PATH, parameters: {...}}")
    sources: List[Source] = []
    stores: Dict[str, Any] = {}
    for i, entry in enumerate(models):
        where = f"models[{i}]"
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, dict):
            raise RecipeError(f"{where}: expected a mapping with model (or store + task), got {entry!r}")
        extra = sorted(set(entry) - {"model", "store", "task", "parameters"})
        if extra:
            raise RecipeError(f"{where}: unknown key(s) {extra}")
        params = entry.get("parameters") or {}
        if not isinstance(params, dict):
            raise RecipeError(f"{where}.parameters: expected a mapping, got {params!r}")
        badp = sorted(set(params) - set(MODEL_PARAMS[method]))
        if badp:
            raise RecipeError(f"{where}.parameters: unknown parameter(s) {badp} for {method}; "
                              f"allowed: {list(MODEL_PARAMS[method])}")
        params = {k: _check_setting(v, f"{where}.parameters.{k}") for k, v in params.items()}
        if "store" in entry:
            if "model" in entry:
                raise RecipeError(f"{where}: give either model or store, not both")
            if method not in STORE_METHODS:
                raise RecipeError(f"{where}: quantized stores merge with {', '.join(STORE_METHODS)}, not {method}")
            from .taskvec_store import Store, StoreError

            spath = _resolve(entry["store"], recipe_dir, f"{where}.store")
            try:
                store = stores.get(spath) or Store(spath)
            except (StoreError, CheckpointError) as exc:
                raise RecipeError(f"{where}.store: {exc}") from None
            stores[spath] = store
            task = entry.get("task")
            if task is None and len(store.tasks) == 1:
                task = store.tasks[0]
            if task not in store.tasks:
                raise RecipeError(f"{where}.task: expected one of {store.tasks} (the store's tasks), got {task!r}")
            sources.append(Source(f"{where} ({spath}:{task})", params, store=store, task=task))
            continue
        if "task" in entry:
            raise RecipeError(f"{where}.task: only for store entries")
        mpath = _resolve(entry.get("model"), recipe_dir, f"{where}.model")
        if base is not None and os.path.realpath(mpath) == os.path.realpath(base.path):
            if method != "linear":
                continue    # the base listed among the models (mergekit recipes do this): not a task
            sources.append(Source(f"{where} ({mpath})", params, ckpt=base))
            continue
        try:
            ck = Checkpoint(mpath, where)
        except CheckpointError as exc:
            raise RecipeError(str(exc)) from None
        sources.append(Source(f"{where} ({mpath})", params, ckpt=ck))
    if not sources:
        raise RecipeError("models: no model besides the base to merge")
    plan = MergePlan(method, base, sources, globals_, DTYPE_NAMES.get(dtype) if dtype else None)
    from .taskvec_store import StoreError

    try:
        _check_tensors(plan)
    except StoreError as exc:
        raise RecipeError(str(exc)) from None
    _check_params(plan)
    return plan


def _check_tensors(plan: MergePlan) -> None:
    ref = plan.reference
    ref_name = "base_model" if plan.base is not None else plan.sources[0].label
    for name, info in ref.tensors.items():
        is_float = info.dtype in FLOAT_DTYPES and info.numel > 0
        for src in plan.sources:
            if src.ckpt is not None:
                other = src.ckpt.tensors.get(name)
                if other is None:
                    raise RecipeError(f"tensor {name!r} of {ref_name} is missing from {src.label}")
                if other.shape != info.shape:
                    raise RecipeError(f"tensor {name!r}: shape {list(other.shape)} in {src.label}, "
                                      f"{list(info.shape)} in {ref_name}")
                if (info.dtype in FLOAT_DTYPES) != (other.dtype in FLOAT_DTYPES):
                    raise RecipeError(f"tensor {name!r}: dtype {other.dtype} in {src.label}, "
                                      f"{info.dtype} in {ref_name}")
            elif is_float:
                src.store.check_tensor(name, info.shape, src.label)
        out_dtype = plan.out_dtype if (is_float and plan.out_dtype) else info.dtype
        plan.tensors.append((name, out_dtype, info.shape, is_float))
    for src in plan.sources:
        if src.store is not None:
            src.store.check_base(plan.base, src.label)
        elif src.ckpt is not None:
            extra = sorted(set(src.ckpt.tensors) - set(ref.tensors))
            if extra:
                print(f"vkern merge: note: {len(extra)} tensor(s) of {src.label} are not in {ref_name} and are "
                      f"left out (first: {extra[0]!r})", file=sys.stderr)


def _check_params(plan: MergePlan) -> None:
    """Every parameter resolves to a valid number for every merged tensor (mergekit's rules)."""
    names = [t[0] for t in plan.tensors if t[3]]
    for src in plan.sources:
        for tensor in names:
            w = plan.param(src, "weight", tensor)
            if w is None and plan.method != "negmerge":   # negmerge: weight 1 by default (a plain mean)
                raise RecipeError(f"{src.label}: parameter weight is required for {plan.method} "
                                  f"(no value for tensor {tensor!r})")
            if plan.method in GTA_METHODS:
                d = plan.param(src, "density", tensor)
                d = 1.0 if d is None else d
                if not (0.0 <= d <= 1.0):
                    raise RecipeError(f"{src.label}: density must be in [0, 1], got {d} (tensor {tensor!r})")
    if plan.method == "cabs":
        for key in ("n", "m"):
            v = plan.globals.get(key)
            if isinstance(v, bool) or not isinstance(v, float) or v != int(v):
                raise RecipeError(f"parameters.{key}: required for cabs (keep n of every m), an integer; got {v!r}")
        n_keep, m_group = int(plan.globals["n"]), int(plan.globals["m"])
        if not (1 <= n_keep <= m_group <= 4096):
            raise RecipeError(f"parameters: cabs needs 1 <= n <= m <= 4096, got n={n_keep}, m={m_group}")
    for key in ("normalize", "rescale", "int8_mask"):
        for tensor in names[:1] + names[-1:]:
            v = plan.global_param(key, tensor, False)
            if not isinstance(v, bool):
                raise RecipeError(f"parameters.{key}: expected true or false, got {v!r}")
    stores = [s for s in plan.sources if s.store is not None]
    if stores:
        if len(stores) != len(plan.sources):
            raise RecipeError("models: mix of stores and fine-tuned checkpoints; give one kind "
                              "(compress the checkpoints with `vkern taskvec compress`)")
        for tensor in names:
            dens = {plan.param(s, "density", tensor) or 1.0 for s in plan.sources}
            if len(dens) > 1:
                raise RecipeError(f"stores: every task needs the same density (got {sorted(dens)} for tensor "
                                  f"{tensor!r}); the fused quantized TIES takes one density per call")
            if plan.method == "ties" and not plan.global_param("normalize", tensor, True):
                raise RecipeError("parameters.normalize: false is not supported for ties over stores")


# ------------------------------------------------------------------ merge math

BLOCK = MM.BLOCK   # elements per streamed block (1 MiB of float32): inputs are read block by block


def _blocks(n: int):
    for s in range(0, n, BLOCK):
        yield s, min(n, s + BLOCK)


@dataclass
class _Trim:
    """A task's TIES trim of one tensor: keep |delta| > thr, and the first `ties` (flat order)
    entries with |delta| == thr; everything when thr is None, nothing when thr is inf."""
    thr: Optional[float]
    ties: int = 0

    def mask(self, mag: np.ndarray) -> Optional[np.ndarray]:
        if self.thr is None:
            return None
        keep = mag > self.thr
        if self.ties > 0:
            at = np.flatnonzero(mag == self.thr)[: self.ties]
            keep[at] = True
            self.ties -= len(at)
        return keep


def _magnitude_trim(n: int, density: float, delta_block) -> _Trim:
    """k = max(1, int(density * n)) largest |delta| (mergekit's count), ties to the lower flat index.
    One float32 buffer of |delta| (filled block by block) is partitioned in place."""
    if density >= 1.0 or n == 0:
        return _Trim(None)
    if density <= 0.0:
        return _Trim(float("inf"))
    k = max(1, int(density * n))
    mag = np.empty(n, dtype=np.float32)
    for s, e in _blocks(n):
        np.abs(delta_block(s, e), out=mag[s:e])
    mag.partition(n - k)
    kth = float(mag[n - k])
    greater = int(np.count_nonzero(mag[n - k + 1:] > kth))   # after the partition all > kth sit past n-k
    return _Trim(kth, k - greater)


def _dare_mask(seed: int, tensor: int, task: int, s: int, e: int, density: float) -> np.ndarray:
    """DARE's keep mask of elements [s, e): Bernoulli(density), the stream of
    vkern.apply_task_vectors(method="dare") with seed (seed, tensor), so a second pass draws the same mask."""
    return MM.dare_keep((seed, tensor), task, s, e, density)


def merge_streamed(plan: MergePlan, name: str, index: int, emit: Callable[[np.ndarray], None], seed: int,
                   tick: Callable[[int], None]) -> None:
    """Merges one tensor block by block from the checkpoints and hands each merged float32
    block (flat order) to `emit`. Memory: a few blocks per input, plus one float32 buffer of the
    tensor while a TIES trim threshold is found."""

    T = len(plan.sources)
    ref = plan.reference.tensors[name]
    n = ref.numel
    infos = [s.ckpt.tensors[name] for s in plan.sources]
    w = [float(plan.param(s, "weight", name) if plan.param(s, "weight", name) is not None else 1.0)
         for s in plan.sources]
    base_info = plan.base.tensors[name] if plan.base is not None else None

    def base_block(s, e):
        return read_f32_range(base_info, s, e)

    if plan.method == "linear":
        normalize = plan.global_param("normalize", name, True)
        for s, e in _blocks(n):
            acc = np.zeros(e - s, dtype=np.float32)
            for i in range(T):
                x = read_f32_range(infos[i], s, e)
                x *= np.float32(w[i])
                acc += x
                tick(infos[i].nbytes * (e - s) // max(1, n))
            if normalize:
                acc /= np.float32(sum(w))
            emit(acc)
        return
    if plan.method == "negmerge":
        _negmerge(plan, name, n, infos, w, base_block, emit, tick)
        return
    if plan.method == "cabs":
        _cabs(plan, name, n, infos, w, base_block, emit, tick)
        return
    consensus, sparsify, norm_default, rescale_default = GTA_METHODS[plan.method]
    normalize = plan.global_param("normalize", name, norm_default)
    rescale = plan.global_param("rescale", name, rescale_default)
    lam = float(plan.global_param("lambda", name, 1.0))
    dens = [plan.param(s, "density", name) for s in plan.sources]
    dens = [1.0 if d is None else float(d) for d in dens]

    def delta_block(i, s, e):
        d = read_f32_range(infos[i], s, e)
        d -= base_block(s, e)
        return d

    trims = [_Trim(None)] * T
    factors = [1.0] * T
    dare = [sparsify == "random" and d < 1.0 for d in dens]
    for i in range(T):
        if sparsify == "magnitude":
            trims[i] = _magnitude_trim(n, dens[i], lambda s, e, i=i: delta_block(i, s, e))
        elif dare[i] and rescale:
            before = after = 0.0
            for s, e in _blocks(n):
                d = np.abs(delta_block(i, s, e))
                before += float(d.sum(dtype=np.float64))
                after += float(d[_dare_mask(seed, index, i, s, e, dens[i])].sum(dtype=np.float64))
            if before >= 1e-7 and after >= 1e-7:       # mergekit's L1 rescale (its eps guard)
                factors[i] = before / after
    divisor_all = sum(w)
    for s, e in _blocks(n):
        b = base_block(s, e)
        deltas = []
        for i in range(T):
            d = read_f32_range(infos[i], s, e)
            tick(infos[i].nbytes * (e - s) // max(1, n))
            d -= b
            keep = trims[i].mask(np.abs(d))
            if keep is not None:
                d[~keep] = 0
            if dare[i]:
                d[~_dare_mask(seed, index, i, s, e, dens[i])] = 0
                if factors[i] != 1.0:
                    d *= np.float32(factors[i])
            d *= np.float32(w[i])
            deltas.append(d)
        acc = np.zeros(e - s, dtype=np.float32)
        if consensus is None:
            for d in deltas:
                acc += d
            if normalize and abs(divisor_all) >= 1e-8:
                acc /= np.float32(divisor_all)
        else:
            total = np.zeros(e - s, dtype=np.float32)
            for d in deltas:
                total += d
            positive = total >= 0
            div = np.zeros(e - s, dtype=np.float32) if normalize else None
            for i, d in enumerate(deltas):
                agree = np.where(positive, d > 0, d < 0)
                acc += np.where(agree, d, np.float32(0))
                if div is not None:
                    div += np.where(agree, np.float32(w[i]), np.float32(0))
            if div is not None:
                div[div == 0] = 1
                acc /= div
        if lam != 1.0:
            acc *= np.float32(lam)
        acc += b
        emit(acc)


def _read_deltas(infos, s, e, b, n, tick) -> List[np.ndarray]:
    out = []
    for info in infos:
        d = read_f32_range(info, s, e)
        tick(info.nbytes * (e - s) // max(1, n))
        d -= b
        out.append(d)
    return out


def _negmerge(plan, name, n, infos, w, base_block, emit, tick) -> None:
    """NegMerge, block by block through vkern.apply_task_vectors' definition (ops/taskvec_methods.negmerge):
    ``base - lambda * mean_w(delta)`` where every delta has the same non-zero sign."""
    lam = float(plan.global_param("lambda", name, 1.0))
    wsum = sum(w) if sum(w) != 0 else 1.0
    coeffs = [lam * wi / wsum for wi in w]
    for s, e in _blocks(n):
        b = base_block(s, e)
        acc = MM.negmerge(_read_deltas(infos, s, e, b, n, tick), coeffs)
        acc += b
        emit(acc)


def _cabs(plan, name, n, infos, w, base_block, emit, tick) -> None:
    """CABS, block by block (blocks hold whole groups of m) through ops/taskvec_methods.cabs:
    ``base + lambda * sum_t w_t * kept delta_t``, tasks in recipe order."""
    lam = float(plan.global_param("lambda", name, 1.0))
    n_keep, m = int(plan.globals["n"]), int(plan.globals["m"])
    step = max(m, (BLOCK // m) * m)                  # blocks hold whole groups
    coeffs = [lam * wi for wi in w]
    for s in range(0, n, step):
        e = min(n, s + step)
        b = base_block(s, e)
        acc = MM.cabs(_read_deltas(infos, s, e, b, n, tick), coeffs, n_keep, m)
        acc += b
        emit(acc)


def merge_from_stores(plan: MergePlan, name: str, base: np.ndarray) -> np.ndarray:
    """The fused quantized merge of one tensor from the stores' codes (flat float32)."""
    w = [plan.param(s, "weight", name) for s in plan.sources]
    w = [1.0 if v is None else float(v) for v in w]
    lam = float(plan.global_param("lambda", name, 1.0))
    if plan.method in ("negmerge", "cabs"):
        from .ops.taskvec import apply_task_vectors

        base2 = base.reshape(plan.sources[0].store.view_shape(name))
        qtvs = [s.store.qtv(name, s.task) for s in plan.sources]
        if plan.method == "negmerge":
            wsum = sum(w) if sum(w) != 0 else 1.0
            return apply_task_vectors(base2, qtvs, [lam * wi / wsum for wi in w], method="negmerge").reshape(-1)
        return apply_task_vectors(base2, qtvs, [lam * wi for wi in w], method="cabs", n=int(plan.globals["n"]),
                                  m=int(plan.globals["m"])).reshape(-1)
    consensus, sparsify, norm_default, _ = GTA_METHODS[plan.method]
    density = plan.param(plan.sources[0], "density", name)
    density = 1.0 if density is None else float(density)
    normalize = plan.global_param("normalize", name, norm_default)
    return _merge_from_stores(plan, name, base, w, density, lam, normalize)


def _merge_from_stores(plan: MergePlan, name: str, base: np.ndarray, w: List[float], density: float, lam: float,
                       normalize: bool) -> np.ndarray:
    """The fused quantized merge (vkern.apply_task_vectors) straight from the stores' codes."""
    from .ops.taskvec import apply_task_vectors

    base2 = base.reshape(plan.sources[0].store.view_shape(name))
    qtvs = [s.store.qtv(name, s.task) for s in plan.sources]
    dens = None if density >= 1.0 else density
    if plan.method == "task_arithmetic":
        divisor = sum(w) if normalize and abs(sum(w)) >= 1e-8 else 1.0
        coeffs = [lam * wi / divisor for wi in w]
        return apply_task_vectors(base2, qtvs, coeffs, method="sum", density=dens).reshape(-1)
    out = apply_task_vectors(base2, qtvs, w, method="ties", density=dens).reshape(-1)
    if lam != 1.0:
        out -= base
        out *= np.float32(lam)
        out += base
    return out


# ------------------------------------------------------------------ execution

def execute(plan: MergePlan, outdir: str, *, max_shard_size: str = "5GB", progress: bool = True, seed: int = 0,
            overwrite: bool = False) -> Dict[str, Any]:
    """Streams the merge into `outdir` (created). Returns a summary dict."""
    shard_bytes = parse_size(max_shard_size)
    if os.path.exists(outdir):
        if not os.path.isdir(outdir):
            raise RecipeError(f"OUTDIR {outdir}: exists and is not a directory")
        existing = [f for f in os.listdir(outdir) if f.endswith(".safetensors") or f == "model.safetensors.index.json"]
        if existing and not overwrite:
            raise RecipeError(f"OUTDIR {outdir}: already holds {existing[0]} (pass --overwrite to replace)")
        for f in existing:
            os.remove(os.path.join(outdir, f))
    os.makedirs(outdir, exist_ok=True)
    writer = ShardedWriter(outdir, [(n, d, s) for n, d, s, _ in plan.tensors], shard_bytes,
                           metadata={"format": "pt", "merged_by": "vkern", "merge_method": plan.method})
    ref = plan.reference
    with writing(writer, plan.input_bytes, "vkern merge", progress) as bar_tick:
        for index, (name, out_dtype, shape, merged) in enumerate(plan.tensors):
            info = ref.tensors[name]
            if not merged:
                writer.write(name, ref.read_raw(name))
                bar_tick(info.nbytes)
                continue
            if plan.sources[0].store is not None:
                base = plan.reference.read_f32(name).reshape(-1)
                bar_tick(info.nbytes + sum(sr.store.tensor_bytes(name, sr.task) for sr in plan.sources))
                writer.write(name, encode_f32(merge_from_stores(plan, name, base), out_dtype))
                del base
                continue
            if plan.base is not None:
                bar_tick(info.nbytes)
            merge_streamed(plan, name, index, lambda block: writer.write_part(name, encode_f32(block, out_dtype)),
                           seed, bar_tick)
    copied = []
    if ref.dir:
        for fname in COPY_FILES:
            src = os.path.join(ref.dir, fname)
            if os.path.isfile(src) and os.path.abspath(os.path.dirname(src)) != os.path.abspath(outdir):
                shutil.copyfile(src, os.path.join(outdir, fname))
                copied.append(fname)
    return {"tensors": len(plan.tensors), "shards": writer.n_shards, "bytes": writer.total_bytes, "copied": copied}


def run(recipe_path: str, outdir: str, *, max_shard_size: str = "5GB", progress: bool = True, seed: int = 0,
        overwrite: bool = False) -> Dict[str, Any]:
    """`vkern merge`: validate the recipe and all inputs, then stream the merge into `outdir`."""
    recipe = load_recipe(recipe_path)
    plan = plan_merge(recipe, os.path.dirname(os.path.abspath(recipe_path)))
    parse_size(max_shard_size)
    summary = execute(plan, outdir, max_shard_size=max_shard_size, progress=progress, seed=seed, overwrite=overwrite)
    import yaml

    with open(os.path.join(outdir, "vkern_merge.yml"), "w") as f:
        yaml.safe_dump(recipe, f, sort_keys=False)
    return summary


def main(args) -> int:
    try:
        s = run(args.recipe, args.outdir, max_shard_size=args.max_shard_size, progress=not args.no_progress,
                seed=args.seed, overwrite=args.overwrite)
    except (RecipeError, CheckpointError) as exc:
        print(f"vkern merge: error: {exc}", file=sys.stderr)
        return 2
    print(f"vkern merge: wrote {s['tensors']} tensors ({s['bytes'] / 1e6:.1f} MB) in {s['shards']} shard(s) to "
          f"{args.outdir}" + (f"; copied {', '.join(s['copied'])}" if s["copied"] else ""), file=sys.stderr)
    return 0
