"""Quantized task-vector stores: ``vkern taskvec compress`` writes one, recipes merge from it.

A store is one safetensors file holding, for every float tensor of a base checkpoint
and every fine-tune ("task"), the quantized task vector ``tau = finetuned - base``
as a :class:`vkern.taskvec.QTaskVector` (layout: ``vkern.taskvec``), viewed as a matrix
``[shape[0], prod(shape[1:])]`` (1-D tensors as ``[1, n]``). Keys::

    {tensor}/{task}/codes        uint8 [N, ceil(K * bits / 8)]
    {tensor}/{task}/scales       float32 [S, G]
    {tensor}/{task}/zero_points  uint8 [S, G]          (affine codes)
    {tensor}/__base__/...        the shared RTVQ base vector of that tensor (--residual)

``__metadata__`` (strings): ``format = "vkern.taskvec-store/1"``, ``base_fingerprint``
(``vkern.checkpoint.fingerprint`` of the base: merging refuses a store made against
another base), ``tasks`` (JSON list), ``tensors`` (JSON: per tensor its shape, view,
bits, granularity, group size, and base bits when residual).

Bit allocation under a budget (``--budget BITS``, average code bits per element):
every tensor starts at 2 bits; the uniform quantizer's error of a group of n elements
with range r at b bits is ``n * (r / (2**b - 1))**2 / 12`` (step squared over 12: the
classical high-resolution model of uniform quantization, Bennett 1948); the allocator
repeatedly raises (2 -> 3 -> 4 -> 8) the tensor whose next step removes the most squared
error per extra byte, while the budget allows (greedy marginal-return allocation, as in
Shoham & Gersho 1988). TVQ (Kim et al., ICCV 2025) allocates bits by quantization
sensitivity under a memory budget too, but its code is not public and its exact rule is
not reproduced here: this is vkern's rule.
"""
from __future__ import annotations

import json
import os
import re
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .checkpoint import (FLOAT_DTYPES, Checkpoint, CheckpointError, ShardedWriter, read_bytes, read_header,
                         writing)
from .taskvec import AFFINE_BITS, QTaskVector

FORMAT = "vkern.taskvec-store/1"
BASE_KEY = "__base__"
_TASK_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")


class StoreError(ValueError):
    """A store that cannot be written or used (names the store and the problem)."""


def view_shape(shape: Sequence[int]) -> Tuple[int, int]:
    shape = tuple(int(s) for s in shape)
    if len(shape) == 0:
        return (1, 1)
    if len(shape) == 1:
        return (1, shape[0])
    k = 1
    for s in shape[1:]:
        k *= s
    return (shape[0], k)


def _layout(view: Tuple[int, int], bits: int, granularity: str, group_size: Optional[int]):
    """(codes shape, scales/zero_points shape) of a QTaskVector of this format."""
    N, K = view
    gs = group_size if granularity == "group" else K
    S = 1 if granularity == "tensor" else N
    return (N, (K * bits + 7) // 8), (S, -(-K // gs))


def _parse_group(text: Any) -> Tuple[str, Optional[int], Any]:
    """'128' -> ("group", 128, 128); 'row'; 'tensor' -> (granularity, size, quantize's group_size)."""
    t = str(text).strip().lower()
    if t == "tensor":
        return "tensor", None, None
    if t == "row":
        return "row", None, "row"
    if t in ("32", "64", "128"):
        return "group", int(t), int(t)
    raise StoreError(f"--group: expected 32, 64, 128, 'row' or 'tensor', got {text!r}")


# ------------------------------------------------------------------ reading

class Store:
    """A store file opened for merging: headers now, codes one tensor at a time."""

    def __init__(self, path: str):
        self.path = str(path)
        try:
            self.entries, meta = read_header(self.path)
        except (CheckpointError, OSError) as exc:
            raise StoreError(f"{self.path}: {exc}") from None
        if meta.get("format") != FORMAT:
            raise StoreError(f"{self.path}: not a vkern task-vector store (format {meta.get('format')!r}, "
                             f"expected {FORMAT!r})")
        try:
            self.tasks: List[str] = json.loads(meta["tasks"])
            self.layout: Dict[str, Dict[str, Any]] = json.loads(meta["tensors"])
            self.base_fingerprint = meta["base_fingerprint"]
        except (KeyError, json.JSONDecodeError) as exc:
            raise StoreError(f"{self.path}: malformed store metadata ({exc})") from None
        self.base_path = meta.get("base", "")
        self._base_cache: Tuple[Optional[str], Optional[QTaskVector]] = (None, None)

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())

    def check_base(self, base: Optional[Checkpoint], label: str) -> None:
        if base is None:
            raise StoreError(f"{label}: merging from a store needs base_model")
        fp = base.fingerprint()
        if fp != self.base_fingerprint:
            raise StoreError(f"{label}: the store was made against another base ({self.base_path or 'unknown'}, "
                             f"{self.base_fingerprint}), not base_model {base.path} ({fp})")

    def check_tensor(self, name: str, shape: Tuple[int, ...], label: str) -> None:
        lay = self.layout.get(name)
        if lay is None:
            raise StoreError(f"tensor {name!r} of base_model is missing from {label}")
        if tuple(lay["shape"]) != tuple(shape):
            raise StoreError(f"tensor {name!r}: shape {lay['shape']} in {label}, {list(shape)} in base_model")

    def view_shape(self, name: str) -> Tuple[int, int]:
        return tuple(self.layout[name]["view"])

    def tensor_bytes(self, name: str, task: str) -> int:
        return sum(e.nbytes for k, e in self.entries.items() if k.startswith(f"{name}/{task}/"))

    def _part(self, name: str, who: str, bits: int, scheme: str, base: Optional[QTaskVector] = None):
        lay = self.layout[name]
        view = tuple(lay["view"])
        prefix = f"{name}/{who}/"

        def arr(field, dtype):
            e = self.entries.get(prefix + field)
            if e is None:
                return None
            return read_bytes(e).view(dtype).reshape(e.shape)

        gs = lay["group_size"] if lay["granularity"] == "group" else view[1]
        return QTaskVector(scheme, bits, view, lay["granularity"], gs, arr("codes", np.uint8),
                           arr("scales", np.float32), arr("zero_points", np.uint8), base)

    def qtv(self, name: str, task: str) -> QTaskVector:
        """Task `task`'s vector of tensor `name` (residual ones share one base object per tensor)."""
        lay = self.layout[name]
        base = None
        if lay.get("base_bits"):
            cached_name, cached = self._base_cache
            if cached_name != name:
                cached = self._part(name, BASE_KEY, lay["base_bits"], "affine")
                self._base_cache = (name, cached)
            base = cached
        return self._part(name, task, lay["bits"], "affine", base)


# ------------------------------------------------------------------ bit allocation

def group_error_weight(tau: np.ndarray, granularity: str, group_size: Optional[int]) -> float:
    """sum over groups of n_g * range_g**2 / 12, range over [min(tau, 0), max(tau, 0)] as the quantizer's
    grid; the squared error at b bits is this over (2**b - 1)**2."""
    N, K = tau.shape
    if granularity == "tensor":
        lo, hi = min(float(tau.min()), 0.0), max(float(tau.max()), 0.0)
        return tau.size * (hi - lo) ** 2 / 12.0
    g = K if granularity == "row" else group_size
    G = -(-K // g)
    total = 0.0
    for j in range(G):
        blk = tau[:, j * g:(j + 1) * g]
        lo = np.minimum(blk.min(axis=1), 0.0).astype(np.float64)
        hi = np.maximum(blk.max(axis=1), 0.0).astype(np.float64)
        total += float(np.sum(blk.shape[1] * (hi - lo) ** 2)) / 12.0
    return total


def allocate_bits(weights: Sequence[float], sizes: Sequence[int], budget_bits: float,
                  choices: Sequence[int] = AFFINE_BITS) -> List[int]:
    """Greedy allocation (module docstring): bits per tensor from `choices`, average code bits per
    element (weighted by `sizes`) at most `budget_bits`; error of tensor i at b bits is
    ``weights[i] / (2**b - 1)**2``."""
    choices = sorted(choices)
    if not (choices[0] <= budget_bits <= choices[-1]):
        raise StoreError(f"--budget: expected average bits in [{choices[0]}, {choices[-1]}], got {budget_bits}")
    level = [0] * len(sizes)
    limit = budget_bits * sum(sizes)
    used = choices[0] * sum(sizes)

    def err(i, lv):
        return weights[i] / float((1 << choices[lv]) - 1) ** 2

    while True:
        best, best_gain = None, 0.0
        for i, n in enumerate(sizes):
            lv = level[i]
            if lv + 1 >= len(choices) or n == 0:
                continue
            extra = (choices[lv + 1] - choices[lv]) * n
            if used + extra > limit + 1e-9:
                continue
            gain = (err(i, lv) - err(i, lv + 1)) / extra
            if best is None or gain > best_gain:
                best, best_gain = i, gain
        if best is None:
            break
        used += (choices[level[best] + 1] - choices[level[best]]) * sizes[best]
        level[best] += 1
    return [choices[lv] for lv in level]


# ------------------------------------------------------------------ writing

def _task_names(specs: Sequence[str]) -> List[Tuple[str, str]]:
    out = []
    for spec in specs:
        if "=" in spec and not os.path.exists(spec):
            name, path = spec.split("=", 1)
        else:
            path = spec
            name = os.path.basename(os.path.normpath(path))
            if name.endswith(".safetensors"):
                name = name[: -len(".safetensors")]
        if not _TASK_RE.match(name) or name == BASE_KEY:
            raise StoreError(f"--finetuned {spec}: task name {name!r} must be letters, digits, '_', '.', '-' "
                             "(give NAME=PATH)")
        out.append((name, path))
    names = [n for n, _ in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise StoreError(f"--finetuned: task name(s) {dup} given twice (name them NAME=PATH)")
    return out


def compress(base_path: str, finetuned: Sequence[str], out: str, *, bits: int = 4, group: Any = "128",
             residual: bool = False, base_bits: Optional[int] = None, budget: Optional[float] = None,
             progress: bool = True) -> Dict[str, Any]:
    """Writes a store of every fine-tune's task vector against `base_path` (see module docstring).
    Everything is validated before the file is created. Returns a summary dict."""
    from . import taskvec

    if bits not in AFFINE_BITS:
        raise StoreError(f"--bits: expected one of {AFFINE_BITS}, got {bits}")
    granularity, gsize, qgroup = _parse_group(group)
    if residual:
        base_bits = min(8, bits + 1) if base_bits is None else base_bits
        if base_bits not in AFFINE_BITS:
            raise StoreError(f"--base-bits: expected one of {AFFINE_BITS}, got {base_bits}")
        if budget is not None:
            raise StoreError("--budget: bit allocation is for plain stores (not with --residual)")
    elif base_bits is not None:
        raise StoreError("--base-bits: only with --residual")
    if not finetuned:
        raise StoreError("--finetuned: give at least one fine-tuned checkpoint")
    tasks = _task_names(finetuned)
    try:
        base = Checkpoint(base_path, "--base")
        fts = [Checkpoint(p, f"--finetuned {n}") for n, p in tasks]
    except CheckpointError as exc:
        raise StoreError(str(exc)) from None
    names = [n for n, t in base.tensors.items() if t.dtype in FLOAT_DTYPES and t.numel > 0]
    for (task, _), ck in zip(tasks, fts):
        for n in names:
            other = ck.tensors.get(n)
            if other is None:
                raise StoreError(f"tensor {n!r} of --base is missing from --finetuned {task} ({ck.path})")
            if other.shape != base.tensors[n].shape:
                raise StoreError(f"tensor {n!r}: shape {list(other.shape)} in --finetuned {task}, "
                                 f"{list(base.tensors[n].shape)} in --base")
    if os.path.isdir(out):
        raise StoreError(f"OUT {out}: is a directory (give the store's file name, e.g. tasks.safetensors)")

    def taus_of(n):
        b = base.read_f32(n)
        views = []
        for ck in fts:
            t = ck.read_f32(n)
            t -= b
            views.append(t.reshape(view_shape(base.tensors[n].shape)))
        return views

    per_tensor_bits = {n: bits for n in names}
    if budget is not None:
        weights, sizes = [], []
        for n in names:
            weights.append(sum(group_error_weight(t, granularity, gsize) for t in taus_of(n)))
            sizes.append(base.tensors[n].numel)
        per_tensor_bits = dict(zip(names, allocate_bits(weights, sizes, float(budget))))

    plan, layout = [], {}
    for n in names:
        view = view_shape(base.tensors[n].shape)
        b = per_tensor_bits[n]
        layout[n] = {"shape": list(base.tensors[n].shape), "view": list(view), "bits": b,
                     "granularity": granularity, "group_size": gsize or view[1],
                     "base_bits": base_bits if residual else None}
        parts = ([(BASE_KEY, base_bits)] if residual else []) + [(task, b) for task, _ in tasks]
        for who, pb in parts:
            codes, sz = _layout(view, pb, granularity, gsize)
            plan += [(f"{n}/{who}/codes", "U8", codes), (f"{n}/{who}/scales", "F32", sz),
                     (f"{n}/{who}/zero_points", "U8", sz)]
    meta = {"format": FORMAT, "base_fingerprint": base.fingerprint(), "base": os.path.abspath(base.path),
            "tasks": json.dumps([t for t, _ in tasks]), "tensors": json.dumps(layout, separators=(",", ":"))}
    outdir, fname = os.path.split(os.path.abspath(out))
    os.makedirs(outdir, exist_ok=True)
    writer = ShardedWriter(outdir, plan, 1 << 62, metadata=meta, single_name=fname)
    float_bytes = 0
    with writing(writer, base.nbytes + sum(ck.nbytes for ck in fts), "vkern taskvec compress", progress) as tick:
        for n in names:
            taus = taus_of(n)
            float_bytes += 4 * sum(t.size for t in taus)
            if residual:
                qs = taskvec.quantize_residual(taus, base_bits=base_bits, offset_bits=per_tensor_bits[n],
                                               group_size=qgroup)
                parts = [(BASE_KEY, qs[0].base)] + [(task, q) for (task, _), q in zip(tasks, qs)]
            else:
                parts = [(task, taskvec.quantize(t, bits=per_tensor_bits[n], group_size=qgroup))
                         for (task, _), t in zip(tasks, taus)]
            for who, q in parts:
                writer.write(f"{n}/{who}/codes", q.codes)
                writer.write(f"{n}/{who}/scales", q.scales)
                writer.write(f"{n}/{who}/zero_points", q.zero_points)
            tick(base.tensors[n].nbytes * (1 + len(fts)))
            del taus, parts
    return {"tasks": [t for t, _ in tasks], "tensors": len(names), "bytes": writer.total_bytes,
            "float32_bytes": float_bytes, "bits": per_tensor_bits}


def main(args) -> int:
    if args.tv_cmd != "compress":
        return 2
    try:
        s = compress(args.base, args.finetuned, args.out, bits=args.bits, group=args.group, residual=args.residual,
                     base_bits=args.base_bits, budget=args.budget, progress=not args.no_progress)
    except (StoreError, CheckpointError) as exc:
        print(f"vkern taskvec compress: error: {exc}", file=sys.stderr)
        return 2
    avg = sum(s["bits"].values()) / max(1, len(s["bits"]))
    print(f"vkern taskvec compress: {len(s['tasks'])} task(s) x {s['tensors']} tensors -> {args.out}: "
          f"{s['bytes'] / 1e6:.2f} MB ({100.0 * s['bytes'] / max(1, s['float32_bytes']):.1f}% of float32 task "
          f"vectors; mean bits per tensor {avg:.2f})", file=sys.stderr)
    return 0
