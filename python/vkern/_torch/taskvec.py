"""torch.library custom ops for the task-vector ops (vkern::apply_task_vectors,
vkern::delta_linear, vkern::taskvec_dequantize), with fake implementations.

A list of QTaskVector crosses the op boundary flattened into components:
tensor lists (codes, scales, zero points; an empty tensor for sign codes) and an
int list ``meta`` of 8 ints per component: scheme (0 affine, 1 sign), bits,
granularity (0 tensor, 1 row, 2 group), group_size, role (0 task, 1 shared
RTVQ base, 2 RTVQ offset), index of its base component (-1 if none), N, K.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..ops import taskvec as _ops
from ..taskvec import QTaskVector

_GRAN = ("tensor", "row", "group")
_META = 8


def _t(a) -> torch.Tensor:
    return a if isinstance(a, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(a))


def flatten(qtvs: Sequence[QTaskVector]) -> Tuple[List[torch.Tensor], List[torch.Tensor], List[torch.Tensor], List[int]]:
    codes: List[torch.Tensor] = []
    scales: List[torch.Tensor] = []
    zeros: List[torch.Tensor] = []
    meta: List[int] = []
    base_index = {}

    def add(q: QTaskVector, role: int, base_ref: int) -> int:
        codes.append(_t(q.codes))
        scales.append(_t(q.scales))
        zeros.append(_t(q.zero_points) if q.zero_points is not None else codes[-1].new_empty((0,)))
        meta.extend([0 if q.scheme == "affine" else 1, q.bits, _GRAN.index(q.granularity), q.group_size, role,
                     base_ref, q.N, q.K])
        return len(codes) - 1

    for q in qtvs:
        if q.base is not None:
            if id(q.base) not in base_index:
                base_index[id(q.base)] = add(q.base, 1, -1)
            add(q, 2, base_index[id(q.base)])
        else:
            add(q, 0, -1)
    return codes, scales, zeros, meta


def unflatten(codes, scales, zeros, meta) -> List[QTaskVector]:
    built: List[Optional[QTaskVector]] = []
    tasks: List[QTaskVector] = []
    for i in range(len(codes)):
        scheme, bits, gran, gs, role, base_ref, N, K = meta[i * _META:(i + 1) * _META]
        q = QTaskVector("affine" if scheme == 0 else "sign", bits, (N, K), _GRAN[gran], gs, codes[i], scales[i],
                        zeros[i] if scheme == 0 else None, built[base_ref] if role == 2 else None)
        built.append(q)
        if role != 1:
            tasks.append(q)
    return tasks


@torch.library.custom_op("vkern::apply_task_vectors", mutates_args=())
def apply_task_vectors_op(base: torch.Tensor, codes: List[torch.Tensor], scales: List[torch.Tensor],
                          zeros: List[torch.Tensor], meta: List[int], coeffs: torch.Tensor, method: str,
                          density: Optional[float], backend: str) -> torch.Tensor:
    return _ops.apply_task_vectors_impl(base, unflatten(codes, scales, zeros, meta), coeffs, method=method,
                                        density=density, backend=backend)


@apply_task_vectors_op.register_fake
def _(base, codes, scales, zeros, meta, coeffs, method, density, backend):
    return torch.empty_like(base)


@torch.library.custom_op("vkern::delta_linear", mutates_args=())
def delta_linear_op(x: torch.Tensor, base: torch.Tensor, codes: List[torch.Tensor], scales: List[torch.Tensor],
                    zeros: List[torch.Tensor], meta: List[int], coeffs: Optional[torch.Tensor],
                    task_ids: Optional[torch.Tensor], backend: str) -> torch.Tensor:
    return _ops.delta_linear_impl(x, base, unflatten(codes, scales, zeros, meta), coeffs, task_ids=task_ids,
                                  backend=backend)


@delta_linear_op.register_fake
def _(x, base, codes, scales, zeros, meta, coeffs, task_ids, backend):
    shape = [base.shape[0]] if x.dim() == 1 else [x.shape[0], base.shape[0]]
    return x.new_empty(shape)


@torch.library.custom_op("vkern::taskvec_dequantize", mutates_args=())
def dequantize_op(codes: List[torch.Tensor], scales: List[torch.Tensor], zeros: List[torch.Tensor],
                  meta: List[int], backend: str) -> torch.Tensor:
    return _ops.dequantize_impl(unflatten(codes, scales, zeros, meta)[0], backend=backend)


@dequantize_op.register_fake
def _(codes, scales, zeros, meta, backend):
    N, K = meta[-2], meta[-1]
    return codes[0].new_empty((N, K), dtype=torch.float32)


def _coeffs(coeffs) -> torch.Tensor:
    """Coefficients as a float64 CPU tensor (a list of floats would become symbolic under torch.compile)."""
    if isinstance(coeffs, torch.Tensor):
        return coeffs.detach().to("cpu", torch.float64).reshape(-1)
    return torch.tensor(np.asarray(coeffs, dtype=np.float64).reshape(-1))


def call_apply_task_vectors(base, qtvs, coeffs, method, density, out, backend):
    codes, scales, zeros, meta = flatten(qtvs)
    res = apply_task_vectors_op(base, codes, scales, zeros, meta, _coeffs(coeffs), method,
                                None if density is None else float(density), backend)
    if out is not None:
        out.copy_(res)
        return out
    return res


def call_delta_linear(x, base, qtvs, coeffs, task_ids, backend):
    codes, scales, zeros, meta = flatten(qtvs)
    return delta_linear_op(x, base, codes, scales, zeros, meta, None if coeffs is None else _coeffs(coeffs),
                           task_ids, backend)


def call_dequantize(qtv, backend):
    codes, scales, zeros, meta = flatten([qtv])
    return dequantize_op(codes, scales, zeros, meta, backend)


def opcheck_samples(base: torch.Tensor, qtvs: Sequence[QTaskVector], x: torch.Tensor):
    """(op, args) pairs for torch.library.opcheck, used by the tests."""
    codes, scales, zeros, meta = flatten(qtvs)
    T = len(qtvs)
    ids = torch.arange(x.shape[0]) % (T + 1) - 1
    c = torch.full((T,), 0.5, dtype=torch.float64)
    return [
        (apply_task_vectors_op, (base, codes, scales, zeros, meta, c, "sum", None, "auto")),
        (apply_task_vectors_op, (base, codes, scales, zeros, meta, c, "ties", 0.5, "auto")),
        (delta_linear_op, (x, base, codes, scales, zeros, meta, c, None, "auto")),
        (delta_linear_op, (x, base, codes, scales, zeros, meta, None, ids, "auto")),
        (dequantize_op, (*flatten(qtvs[-1:]), "auto")),
    ]
