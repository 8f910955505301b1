"""torch modules over vkern ops: many fine-tunes served by one base in one batch.

:class:`DeltaLinear` stands in for ``nn.Linear``: it keeps the shared base weight and N
quantized task vectors (:class:`vkern.taskvec.QTaskVector`, e.g. from a store written by
``vkern taskvec compress``) and computes, for each row of the batch, ``x @ (W + tau_t)^T + b``
with ``t`` that row's task, through :func:`vkern.delta_linear` (no dense delta is built;
task -1 is the base alone). This is BitDelta's / 1bit-Merging's multi-tenant serving.

:func:`patch_linear_layers` swaps a model's ``nn.Linear`` layers for DeltaLinear (every one
the store has task vectors for), and :func:`tenants` says which task each batch element
uses for the forward passes inside it::

    from vkern.taskvec_store import Store
    from vkern.integrations.torch import patch_linear_layers, tenants

    store = Store("tasks.safetensors")
    patch_linear_layers(model, store)                     # model: a transformers model of the store's base
    with tenants(model, [0, 2, -1, 1]):                   # batch element b uses task ids[b] (store.tasks order)
        logits = model(input_ids).logits

Layers no task vector touches (no entry in the store, all task vectors exactly zero, or named
in ``base_only``) stay plain ``nn.Linear``: a tied lm_head costs exactly its dense matmul.
A decode step (up to 8 rows) is one kernel pass per layer that reads each base row once for all
rows, with each row's codes; a prefill (8+ rows per tenant) builds each tenant's merged weight
once and runs one GEMM per tenant on its block of rows.

Inference only: the forward runs without autograd (a tensor that requires grad is refused).
Imports without torch; torch is needed to build the modules.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, List, Optional, Sequence

import numpy as np


try:
    import torch as _torch_mod
except ImportError:  # pragma: no cover - torch is optional for vkern
    _torch_mod = None


def _torch():
    if _torch_mod is None:
        raise ImportError("vkern.integrations.torch needs torch (pip install 'vkern[torch]')")
    return _torch_mod


_Module = _torch_mod.nn.Module if _torch_mod is not None else object


class DeltaLinear(_Module):
    """``nn.Linear`` with a shared base weight ``[out, in]`` and T quantized task vectors.

    Args:
        weight: the base weight (a tensor or ``nn.Parameter``; kept, not copied).
        qtvs: T :class:`vkern.taskvec.QTaskVector` of shape ``[out, in]``.
        bias: optional ``[out]`` (shared by all tasks).
        task_names: optional names of the T tasks (for repr).
        backend: the :func:`vkern.delta_linear` backend ("auto", "cpu", "cuda", "triton", "reference").

    ``forward(x)``: ``x [..., in]``; the task of each leading row is ``self.task_ids``
    (set by :func:`tenants`: one id per batch element, broadcast over the other leading
    dims), or the base alone when it is None. Output ``[..., out]`` in x's dtype.
    """

    def __init__(self, weight, qtvs: Sequence[Any], bias=None, task_names: Optional[Sequence[str]] = None,
                 backend: str = "auto"):
        torch = _torch()
        super().__init__()
        w = weight.detach() if isinstance(weight, torch.Tensor) else torch.as_tensor(weight)
        if w.dim() != 2:
            raise ValueError(f"weight: expected [out_features, in_features], got {tuple(w.shape)}")
        self.out_features, self.in_features = int(w.shape[0]), int(w.shape[1])
        self.register_buffer("weight", w, persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach(), persistent=False)
        from ..taskvec import QTaskVector

        for t, q in enumerate(qtvs):
            if not isinstance(q, QTaskVector):
                raise TypeError(f"qtvs[{t}]: expected a QTaskVector, got {type(q).__name__}")
            if tuple(q.shape) != (self.out_features, self.in_features):
                raise ValueError(f"qtvs[{t}]: expected shape {(self.out_features, self.in_features)} "
                                 f"(from weight), got {tuple(q.shape)}")
        self.qtvs: List[Any] = list(qtvs)
        self.task_names = list(task_names) if task_names is not None else [str(i) for i in range(len(qtvs))]
        self.task_ids = None
        self.backend = backend
        self._plan = None
        self._groups = None
        self._make_plan()

    def _make_plan(self) -> None:
        """CPU weights on the cpu kernel: checks and layout once (vkern.ops.taskvec.DeltaPlan), so a
        forward pays only the kernel, not delta_linear's per-call argument checks."""
        from ..ops import taskvec as ops

        self._plan = None
        self._groups = None
        if self.qtvs and self.weight.device.type == "cpu" and ops.delta_backend(self.weight, self.qtvs,
                                                                                self.backend) == "cpu":
            self._plan = ops.DeltaPlan(self.weight, self.qtvs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, tasks={len(self.qtvs)}")

    def _apply(self, fn, *args, **kwargs):   # .to(device) moves the task vectors too
        out = super()._apply(fn, *args, **kwargs)
        dev = self.weight.device
        if self.qtvs and str(dev) != "cpu":
            from ..taskvec import to_device

            self.qtvs = to_device(self.qtvs, dev)
        self._make_plan()
        return out

    def forward(self, x):
        import vkern

        torch = _torch()
        if x.requires_grad and torch.is_grad_enabled():
            raise ValueError("DeltaLinear: inference only (x requires grad; wrap the call in torch.no_grad())")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        w = self.weight if self.weight.dtype == x.dtype else self.weight.to(x.dtype)
        if not self.qtvs:  # task-less: exactly nn.Linear's product, whatever the tenants
            b = None if self.bias is None else self.bias.to(x.dtype)
            return torch.nn.functional.linear(x, w, b)
        if self.task_ids is None:
            y = x2 @ w.T
        else:
            ids = self.task_ids.to(x.device)
            if ids.shape[0] == 0 or x2.shape[0] % ids.shape[0]:
                raise ValueError(f"task_ids: {ids.shape[0]} ids for an input of shape {tuple(x.shape)} "
                                 "(give one id per batch element)")
            rows_per = x2.shape[0] // ids.shape[0]
            plan = self._plan
            if (plan is not None and x.dtype == self.weight.dtype == torch.float32 and x2.device.type == "cpu"
                    and plan.base.dtype == torch.float32):
                # one row grouping per (task ids, rows per id): a decode loop inside one
                # tenants() block sorts the ids once per layer, not once per step
                ids_np = ids.numpy()
                cached = self._groups
                if cached is None or cached[1] != rows_per or not np.array_equal(cached[0], ids_np):
                    cached = self._groups = (ids_np.copy(), rows_per, plan.groups(np.repeat(ids_np, rows_per)))
                y = plan.run(x2.contiguous(), cached[2])
            elif self._plan is not None and x.dtype == self.weight.dtype:
                y = self._plan(x2, np.repeat(ids.numpy(), rows_per))
            else:
                y = vkern.delta_linear(x2, w, self.qtvs, task_ids=ids.repeat_interleave(rows_per),
                                       backend=self.backend)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, self.out_features)


def _store_qtvs(store, name: str, tasks: Sequence[str]):
    return [store.qtv(name, t) for t in tasks]


def _all_zero(qtvs) -> bool:
    """Whether every one of these task vectors dequantizes to exactly zero (a layer no fine-tune
    moved, e.g. a tied or frozen lm_head): cheap tests first, then the values."""
    from .. import taskvec

    for q in qtvs:
        if not any(np.any(np.asarray(s)) for s in _scale_arrays(q)):
            continue
        if np.any(taskvec.dequantize(q, backend="cpu")):
            return False
    return True


def _scale_arrays(q):
    """The scales of q and of its residual base, as arrays (all zero: a zero task vector)."""
    out = []
    for part in (q, getattr(q, "base", None)):
        if part is None:
            continue
        sc = getattr(part, "scales", None)
        if sc is None:
            return [np.ones(1)]  # unknown layout: decide by the values
        out.append(sc.cpu().numpy() if hasattr(sc, "cpu") else sc)
    return out


def patch_linear_layers(model, store, *, tasks: Optional[Sequence[str]] = None,
                        include: Optional[Sequence[str]] = None, base_only: Optional[Sequence[str]] = None,
                        backend: str = "auto") -> List[str]:
    """Replaces every ``nn.Linear`` of `model` whose ``<module name>.weight`` has task vectors in
    `store` (a :class:`vkern.taskvec_store.Store`, or a mapping ``{weight name: [QTaskVector]}``)
    by a :class:`DeltaLinear` sharing the Linear's weight and bias. `tasks` picks and orders the
    store's tasks (default: all, in store order); `include` keeps only module names containing
    one of these substrings; `backend` goes to every DeltaLinear. Returns the names of the replaced
    modules.

    Task-less layers stay plain ``nn.Linear`` (exactly a dense matmul, whatever the tenants): a
    layer the store has no task vectors for (e.g. SmolLM2's lm_head, tied to the embeddings), a
    layer whose task vectors are all exactly zero (no fine-tune moved it), and every module name
    containing one of the `base_only` substrings."""
    torch = _torch()
    if base_only is not None and (isinstance(base_only, str) or
                                  not all(isinstance(b, str) for b in base_only)):
        raise TypeError(f"base_only: expected a sequence of module-name substrings, got {base_only!r}")
    cls = DeltaLinear
    is_store = hasattr(store, "qtv") and hasattr(store, "tasks")
    if is_store:
        tasks = list(store.tasks if tasks is None else tasks)
        bad = [t for t in tasks if t not in store.tasks]
        if bad:
            raise ValueError(f"tasks: {bad} not in the store (its tasks: {store.tasks})")
    replaced = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, torch.nn.Linear):
            continue
        if include is not None and not any(s in name for s in include):
            continue
        if base_only is not None and any(s in name for s in base_only):
            continue
        key = f"{name}.weight"
        if is_store:
            if key not in store.layout:
                continue
            if tuple(store.layout[key]["shape"]) != tuple(module.weight.shape):
                raise ValueError(f"{key}: shape {tuple(module.weight.shape)} in the model, "
                                 f"{tuple(store.layout[key]['shape'])} in the store")
            qtvs = _store_qtvs(store, key, tasks)
            names = tasks
        else:
            if key not in store:
                continue
            qtvs = list(store[key])
            names = None
        if _all_zero(qtvs):
            continue
        new = cls(module.weight, qtvs, module.bias, names, backend=backend)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
        replaced.append(name)
    return replaced


@contextlib.contextmanager
def tenants(model, task_ids) -> Iterator[None]:
    """Inside the block, batch element b of every forward uses task ``task_ids[b]`` in every
    DeltaLinear of `model` (-1: the base alone)."""
    torch = _torch()
    cls = DeltaLinear
    ids = torch.as_tensor(np.asarray(task_ids) if not isinstance(task_ids, torch.Tensor) else task_ids,
                          dtype=torch.int64).reshape(-1)
    mods = [m for m in model.modules() if isinstance(m, cls)]
    if not mods:
        raise ValueError("tenants: the model has no DeltaLinear (call patch_linear_layers first)")
    T = len(mods[0].qtvs)
    if ids.numel() and (int(ids.min()) < -1 or int(ids.max()) >= T):
        raise ValueError(f"task_ids: every id must be in [-1, {T}) (-1 = base only), got {ids.tolist()}")
    before = [m.task_ids for m in mods]
    for m in mods:
        m.task_ids = ids
    try:
        with torch.no_grad():
            yield
    finally:
        for m, b in zip(mods, before):
            m.task_ids = b
