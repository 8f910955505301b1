"""``vkern merge RECIPE.yml OUTDIR``: merge safetensors checkpoints from a mergekit-style recipe.

The recipe subset (keys mergekit reads the same way)::

    merge_method: ties            # linear, task_arithmetic, ties, dare_ties, dare_linear
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
against this base. Then tensors are streamed one at a time: each input tensor is
read once into a buffer, merged, written to the output shard and dropped.

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

from .checkpoint import (DTYPE_NAMES, FLOAT_DTYPES, Checkpoint, CheckpointError, ShardedWriter, decode_f32,
                         encode_f32, parse_size)

# method -> (consensus, sparsification, default normalize, default rescale)
GTA_METHODS = {
    "task_arithmetic": (None, None, False, False),
    "ties": ("sum", "magnitude", True, False),
    "dare_ties": ("sum", "random", False, True),
    "dare_linear": (None, "random", False, True),
}
METHODS = ("linear",) + tuple(GTA_METHODS)
MODEL_PARAMS = {"linear": ("weight",), **{m: ("weight", "density") for m in GTA_METHODS}}
GLOBAL_PARAMS = {"linear": ("normalize", "weight"),
                 **{m: ("lambda", "normalize", "rescale", "int8_mask", "weight", "density") for m in GTA_METHODS}}
RECIPE_KEYS = ("merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source")
# files next to the base's weights that the output model needs (config and tokenizer)
COPY_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "added_tokens.json", "vocab.txt", "vocab.json", "merges.txt",
              "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "chat_template.jinja",
              "chat_template.json", "preprocessor_config.json")
CHUNK = 1 << 16   # elements per cache-resident block of the streamed merge


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
    import yaml

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
            if method not in ("task_arithmetic", "ties"):
                raise RecipeError(f"{where}: quantized stores merge with task_arithmetic or ties, not {method}")
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
            if w is None:
                raise RecipeError(f"{src.label}: parameter weight is required for {plan.method} "
                                  f"(no value for tensor {tensor!r})")
            if plan.method != "linear":
                d = plan.param(src, "density", tensor)
                d = 1.0 if d is None else d
                if not (0.0 <= d <= 1.0):
                    raise RecipeError(f"{src.label}: density must be in [0, 1], got {d} (tensor {tensor!r})")
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

def _trim_magnitude(delta: np.ndarray, density: float) -> None:
    """In place: zero all but the k = max(1, int(density * n)) largest |delta| (ties: lower index)."""
    n = delta.size
    if density >= 1.0 or n == 0:
        return
    if density <= 0.0:
        delta[:] = 0
        return
    k = max(1, int(density * n))
    mag = np.abs(delta)
    mag.partition(n - k)
    kth = mag[n - k]                               # the k-th largest magnitude
    np.abs(delta, out=mag)                         # (partitioned in place: one buffer, not two)
    keep = mag > kth
    need = k - int(np.count_nonzero(keep))
    if need > 0:
        ties = np.flatnonzero(mag == kth)[:need]
        keep[ties] = True
    delta[~keep] = 0


def _drop_random(delta: np.ndarray, density: float, rescale: bool, rng: np.random.Generator) -> None:
    """In place: DARE drop (keep with probability density), then L1 rescale (mergekit's)."""
    if density >= 1.0:
        return
    keep = rng.random(delta.size, dtype=np.float32) < np.float32(density)
    before = float(np.abs(delta).sum(dtype=np.float64)) if rescale else 0.0
    delta[~keep] = 0
    if rescale:
        after = float(np.abs(delta).sum(dtype=np.float64))
        if before >= 1e-7 and after >= 1e-7:
            delta *= np.float32(before / after)


def merge_tensor(plan: MergePlan, name: str, base: Optional[np.ndarray], read: Callable[[int], np.ndarray],
                 rng: np.random.Generator) -> np.ndarray:
    """One merged tensor (flat float32). `read(i)` returns source i's tensor as a fresh flat float32 array."""
    T = len(plan.sources)
    w = [float(plan.param(s, "weight", name)) for s in plan.sources]
    if plan.method == "linear":
        acc = None
        for i in range(T):
            x = read(i)
            if acc is None:
                acc = np.zeros_like(x)
            for s in range(0, x.size, CHUNK):
                acc[s:s + CHUNK] += np.float32(w[i]) * x[s:s + CHUNK]
        if plan.global_param("normalize", name, True):
            acc /= np.float32(sum(w))
        return acc
    consensus, sparsify, norm_default, rescale_default = GTA_METHODS[plan.method]
    normalize = plan.global_param("normalize", name, norm_default)
    rescale = plan.global_param("rescale", name, rescale_default)
    lam = float(plan.global_param("lambda", name, 1.0))
    dens = [plan.param(s, "density", name) for s in plan.sources]
    dens = [1.0 if d is None else float(d) for d in dens]
    if plan.sources[0].store is not None:
        return _merge_from_stores(plan, name, base, w, dens[0], lam, normalize)
    n = base.size
    if consensus is None and sparsify is None:
        # task arithmetic: one streamed pass per model, in cache-sized blocks
        acc = np.zeros(n, dtype=np.float32)
        for i in range(T):
            x = read(i)
            wi = np.float32(w[i])
            for s in range(0, n, CHUNK):
                e = s + CHUNK
                d = x[s:e]
                d -= base[s:e]
                d *= wi
                acc[s:e] += d
            del x
        divisor = sum(w)
        if normalize and abs(divisor) >= 1e-8:
            acc /= np.float32(divisor)
    else:
        deltas = []
        for i in range(T):
            d = read(i)
            d -= base
            if sparsify == "magnitude":
                _trim_magnitude(d, dens[i])
            elif sparsify == "random":
                _drop_random(d, dens[i], rescale, rng)
            d *= np.float32(w[i])
            deltas.append(d)
        acc = np.zeros(n, dtype=np.float32)
        if consensus is None:
            for d in deltas:
                acc += d
            divisor = sum(w)
            if normalize and abs(divisor) >= 1e-8:
                acc /= np.float32(divisor)
        else:
            div = np.zeros(n, dtype=np.float32) if normalize else None
            for s in range(0, n, CHUNK):
                e = s + CHUNK
                total = np.zeros(min(e, n) - s, dtype=np.float32)
                for d in deltas:
                    total += d[s:e]
                positive = total >= 0
                out = acc[s:e]
                for i, d in enumerate(deltas):
                    blk = d[s:e]
                    agree = np.where(positive, blk > 0, blk < 0)
                    out += np.where(agree, blk, np.float32(0))
                    if div is not None:
                        div[s:e] += np.where(agree, np.float32(w[i]), np.float32(0))
            if div is not None:
                div[div == 0] = 1
                acc /= div
        del deltas
    if lam != 1.0:
        acc *= np.float32(lam)
    acc += base
    return acc


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

def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="vkern merge", file=sys.stderr,
                dynamic_ncols=True)


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
    bar = _progress(plan.input_bytes, progress)
    rng = np.random.default_rng(seed)
    ref = plan.reference
    try:
        for name, out_dtype, shape, merged in plan.tensors:
            info = ref.tensors[name]
            if not merged:
                writer.write(name, ref.read_raw(name))
                if bar is not None:
                    bar.update(info.nbytes)
                continue
            sources = plan.sources

            def read(i: int) -> np.ndarray:
                src_info = sources[i].ckpt.tensors[name]
                raw = sources[i].ckpt.read_raw(name)
                if bar is not None:
                    bar.update(src_info.nbytes)
                return decode_f32(raw, src_info.dtype)  # F32: the fresh read buffer itself (writable)

            base = decode_f32(ref.read_raw(name), info.dtype) if plan.base is not None else None
            if bar is not None:
                bar.update(info.nbytes if plan.base is not None else 0)
            result = merge_tensor(plan, name, base, read, rng)
            if sources[0].store is not None and bar is not None:
                bar.update(sum(s.store.tensor_bytes(name, s.task) for s in sources))
            writer.write(name, encode_f32(result, out_dtype))
            del result, base
        writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        if bar is not None:
            bar.close()
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
    with open(os.path.join(outdir, "vkern_merge.yml"), "w") as f:
        import yaml

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
