"""vkern.apply_task_vectors / vkern.delta_linear / vkern.taskvec.dequantize (SPEC §4).

The wrappers validate every input before any kernel runs, pick a backend and
hand results back as the base's (apply) or x's (delta_linear) array kind.
Kernels see a task vector as one or two *components* (a residual is its shared
base plus its offset), described by a flat table (see ``_components``).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .. import _arrays as A
from .. import _ext
from .._backend import Backend, cpu_reason, cuda_reason, host_reason, op, triton_reason
from .._forksafe import blas_call
from ..reference import taskvec as ref
from ..taskvec import QTaskVector, _validate
from . import taskvec_methods as MM

_APPLY = op("apply_task_vectors")
_DELTA = op("delta_linear")
_DEQ = op("dequantize")

METHODS = ("sum", "ties", "dare", "negmerge", "cabs")
KERNEL_METHODS = ("sum", "ties")      # fused one-pass kernels on every backend
DENSE_METHODS = ("dare", "negmerge", "cabs")   # cpu and reference: dequantize, then taskvec_methods


@dataclass
class ApplyCall:
    base: Any                   # native [N, K]
    qtvs: List[QTaskVector]
    coeffs: np.ndarray          # float64 [T]
    method: str
    density: Optional[float]
    out: Any                    # native [N, K] or None
    device: str
    lib: str
    origin: str
    p: Optional[float] = None           # dare: drop rate
    seed: Tuple[int, ...] = (0,)        # dare: random stream
    nm: Optional[Tuple[int, int]] = None  # cabs: keep n of every m

    def __repr__(self) -> str:
        fmts = ", ".join(f"{q.scheme}{q.bits}{'+res' if q.base is not None else ''}" for q in self.qtvs)
        return (f"base {tuple(self.base.shape)} {A.dtype_name(self.base)}, T={len(self.qtvs)} [{fmts}], "
                f"method={self.method}, density={self.density}, {self.lib} on {self.device}")


@dataclass
class DeltaCall:
    x: Any                      # native [M, K]
    single: bool                # x came as [K]
    base: Any                   # native [N, K]
    qtvs: List[QTaskVector]
    coeffs: np.ndarray          # float64 [T] (ones when not given)
    task_ids: Optional[np.ndarray]  # host int64 [M] or None
    task_ids_native: Any
    device: str
    lib: str
    origin: str

    def __repr__(self) -> str:
        return (f"x {tuple(self.x.shape)} {A.dtype_name(self.x)}, base {tuple(self.base.shape)} "
                f"{A.dtype_name(self.base)}, T={len(self.qtvs)}, task_ids={'yes' if self.task_ids is not None else 'no'}, "
                f"{self.lib} on {self.device}")


@dataclass
class DeqCall:
    qtv: QTaskVector
    device: str
    lib: str

    def __repr__(self) -> str:
        return f"{self.qtv!r}"


# --------------------------------------------------------------- validation

def _check_float(x: Any, name: str) -> None:
    if not A.is_float(x):
        raise A.float_dtype_error(name, x)


def _qtv_device(q: QTaskVector) -> str:
    devs = set()
    for part in (q, q.base):
        if part is None:
            continue
        for a in (part.codes, part.scales, part.zero_points):
            if a is not None:
                devs.add("cpu" if isinstance(a, np.ndarray) else str(a.device))
    if len(devs) > 1:
        return "mixed " + "/".join(sorted(devs))
    return devs.pop()


def _device_str(a: Any) -> str:
    return "cpu" if isinstance(a, np.ndarray) else str(a.device)


def _check_qtvs(qtvs: Any, shape: tuple, device: str, shape_from: str) -> List[QTaskVector]:
    if isinstance(qtvs, QTaskVector) or not isinstance(qtvs, (list, tuple)):
        raise TypeError(f"qtvs: expected a list of QTaskVector, got {type(qtvs).__name__}")
    out = []
    for t, q in enumerate(qtvs):
        if not isinstance(q, QTaskVector):
            raise TypeError(f"qtvs[{t}]: expected a QTaskVector, got {type(q).__name__}")
        _validate(q, f"qtvs[{t}]")
        if q.base is not None:
            _validate(q.base, f"qtvs[{t}].base")
        if tuple(q.shape) != tuple(shape):
            raise ValueError(f"qtvs[{t}]: expected shape {tuple(shape)} (from {shape_from}), got {tuple(q.shape)}")
        qdev = _qtv_device(q)
        if qdev.split(":")[0] != device.split(":")[0] or (device != "cpu" and qdev != device):
            raise ValueError(f"qtvs[{t}]: arrays on {qdev}, expected {device} (where {shape_from} is); "
                             f"move them with qtv.to(...) (no hidden host<->device copies)")
        out.append(q)
    return out


def _check_coeffs(coeffs: Any, T: int, name: str = "coeffs") -> np.ndarray:
    if coeffs is None:
        raise TypeError(f"{name}: expected a sequence of {T} numbers, got None")
    if A.is_torch(coeffs):
        coeffs = coeffs.detach().cpu().numpy()
    try:
        c = np.asarray(coeffs, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected a sequence of {T} numbers, got {type(coeffs).__name__}") from None
    if c.ndim != 1 or c.shape[0] != T:
        raise ValueError(f"{name}: expected length T={T} (one per task vector), got shape {tuple(c.shape)}")
    if not np.all(np.isfinite(c)):
        raise ValueError(f"{name}: every coefficient must be finite, got {c.tolist()}")
    return c


def _check_seed(seed: Any) -> Tuple[int, ...]:
    vals = seed if isinstance(seed, (list, tuple)) else (seed,)
    if not vals or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0 for v in vals):
        raise TypeError(f"seed: expected a non-negative int (or a tuple of them), got {seed!r}")
    return tuple(int(v) for v in vals)


def _check_int(v: Any, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{name}: expected an int, got {type(v).__name__}")
    return int(v)


def _prepare_apply(base, qtvs, coeffs, method, density, out, p=None, seed=None, n=None, m=None,
                   block=None) -> ApplyCall:
    b, origin = A.to_native(base, "base")
    _check_float(b, "base")
    if b.ndim != 2:
        raise ValueError(f"base: expected shape [N_out, K_in], got {tuple(b.shape)}")
    device = _device_str(b)
    qs = _check_qtvs(qtvs, tuple(int(s) for s in b.shape), device, "base")
    if isinstance(coeffs, Mapping):
        c = _check_coeffs(MM.block_coeffs(coeffs, block, len(qs)), len(qs), f"coeffs[{block!r}]")
    elif block is not None:
        raise TypeError(f"block: only with coeffs given as a mapping {{block name: T coefficients}} (aTLAS), "
                        f"got coeffs of type {type(coeffs).__name__}")
    else:
        c = _check_coeffs(coeffs, len(qs))
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    if density is not None:
        if method not in KERNEL_METHODS:
            raise ValueError(f"density: the TIES trim goes with method 'sum' or 'ties', not {method!r}")
        if isinstance(density, bool) or not isinstance(density, (int, float, np.floating, np.integer)):
            raise TypeError(f"density: expected a float in [0, 1] or None, got {type(density).__name__}")
        density = float(density)
        if not (0.0 <= density <= 1.0):
            raise ValueError(f"density: expected a float in [0, 1], got {density}")
    if method == "dare":
        if p is None:
            raise TypeError("p: method 'dare' needs the drop rate p (a float in [0, 1))")
        if isinstance(p, bool) or not isinstance(p, (int, float, np.floating, np.integer)):
            raise TypeError(f"p: expected a float in [0, 1), got {type(p).__name__}")
        p = float(p)
        if not (0.0 <= p < 1.0):
            raise ValueError(f"p: expected a drop rate in [0, 1), got {p}")
        seed = _check_seed(0 if seed is None else seed)
    else:
        if p is not None:
            raise ValueError(f"p: the drop rate goes with method 'dare', not {method!r}")
        if seed is not None:
            raise ValueError(f"seed: goes with method 'dare', not {method!r}")
        seed = (0,)
    nm = None
    if method == "cabs":
        if n is None or m is None:
            raise TypeError("n, m: method 'cabs' needs n and m (keep n of every m consecutive elements)")
        n, m = _check_int(n, "n"), _check_int(m, "m")
        if m < 1:
            raise ValueError(f"m: expected m >= 1, got {m}")
        if not (1 <= n <= m):
            raise ValueError(f"n: expected 1 <= n <= m={m}, got {n}")
        nm = (n, m)
    elif n is not None or m is not None:
        raise ValueError(f"n, m: go with method 'cabs', not {method!r}")
    o = None
    if out is not None:
        o, _ = A.to_native(out, "out", writes=True)
        if type(o) is not type(b):
            raise TypeError(f"out: expected the same array kind as base ({type(b).__name__}), got {type(o).__name__}")
        if tuple(o.shape) != tuple(b.shape):
            raise ValueError(f"out: expected shape {tuple(b.shape)} (from base), got {tuple(o.shape)}")
        if A.dtype_name(o) != A.dtype_name(b):
            raise TypeError(f"out: expected dtype {A.dtype_name(b)} (from base), got {A.dtype_name(o)}")
        if _device_str(o) != device:
            raise ValueError(f"out: expected device {device} (from base), got {_device_str(o)}")
        if isinstance(o, np.ndarray) and not o.flags.writeable:
            raise ValueError("out: array is read-only")
    lib = "numpy" if isinstance(b, np.ndarray) else "torch"
    return ApplyCall(b, qs, c, method, density, o, A.device_of(b), lib, origin, p, seed, nm)


def _check_task_id_range(ids: np.ndarray, T: int) -> None:
    """delta_linear's task ids (int64 [M]): each in [-1, T) (-1 = base only)."""
    if ids.size and (ids.min() < -1 or ids.max() >= T):
        raise ValueError(f"task_ids: every id must be in [-1, T={T}) (-1 = base only), "
                         f"got min={int(ids.min())}, max={int(ids.max())}")


def _prepare_delta(x, base, qtvs, coeffs, task_ids) -> DeltaCall:
    xx, origin = A.to_native(x, "x")
    _check_float(xx, "x")
    if xx.ndim not in (1, 2):
        raise ValueError(f"x: expected shape [K_in] or [M, K_in], got {tuple(xx.shape)}")
    single = xx.ndim == 1
    if single:
        xx = xx[None]
    b, _ = A.to_native(base, "base")
    _check_float(b, "base")
    if b.ndim != 2:
        raise ValueError(f"base: expected shape [N_out, K_in], got {tuple(b.shape)}")
    if int(xx.shape[1]) != int(b.shape[1]):
        raise ValueError(f"x: expected last dim K_in={int(b.shape[1])} (from base), got {int(xx.shape[1])}")
    if type(xx) is not type(b):
        raise TypeError(f"mixed array kinds: x is {type(xx).__name__}, base is {type(b).__name__}")
    device = _device_str(b)
    if _device_str(xx) != device:
        raise ValueError(f"mixed devices: x on {_device_str(xx)}, base on {device}")
    qs = _check_qtvs(qtvs, tuple(int(s) for s in b.shape), device, "base")
    T = len(qs)
    c = np.ones(T) if coeffs is None else _check_coeffs(coeffs, T)
    ids = ids_native = None
    if task_ids is not None:
        ids_native, _ = A.to_native(task_ids, "task_ids")
        if not A.is_integer(ids_native):
            raise TypeError(f"task_ids: expected an integer array, got {A.dtype_name(ids_native)}")
        M = int(xx.shape[0])
        if ids_native.ndim != 1 or int(ids_native.shape[0]) != M:
            raise ValueError(f"task_ids: expected shape ({M},) (one per row of x), got {tuple(ids_native.shape)}")
        if _device_str(ids_native) != device:
            raise ValueError(f"mixed devices: task_ids on {_device_str(ids_native)}, base on {device}")
        ids = (ids_native if isinstance(ids_native, np.ndarray) else ids_native.detach().cpu().numpy()).astype(np.int64)
        _check_task_id_range(ids, T)
    lib = "numpy" if isinstance(b, np.ndarray) else "torch"
    return DeltaCall(xx, single, b, qs, c, ids, ids_native, A.device_of(b), lib, origin)


# --------------------------------------------------------------- reference

_host_only = host_reason


def _host_qtv(q: QTaskVector) -> QTaskVector:
    """NumPy views of a CPU QTaskVector's fields (torch CPU tensors share memory)."""
    if all(a is None or isinstance(a, np.ndarray) for a in (q.codes, q.scales, q.zero_points)) and \
            (q.base is None or isinstance(q.base.codes, np.ndarray)):
        return q
    from ..taskvec import to_device

    return to_device([q], "numpy")[0]


def _cast_result(res64: np.ndarray, like: Any):
    """A float64 host result rounded once to like's dtype, as like's kind."""
    name = A.dtype_name(like)
    if isinstance(like, np.ndarray):
        return res64.astype(name)
    torch = A.torch_module()
    return torch.from_numpy(res64).to(getattr(torch, name))


def _write_out(call: ApplyCall, result):
    if call.out is None:
        return result
    if isinstance(call.out, np.ndarray):
        np.copyto(call.out, result)
    else:
        call.out.copy_(result)
    return call.out


def _dense_merge(call: ApplyCall, base: np.ndarray, taus: List[np.ndarray]) -> np.ndarray:
    """base + the method's merge of the dense task vectors (DENSE_METHODS), in base's dtype."""
    if not taus:
        return base.copy()
    if call.method == "dare":
        delta = MM.dare(taus, call.coeffs, call.p, call.seed)
    elif call.method == "negmerge":
        delta = MM.negmerge(taus, call.coeffs)
    else:
        delta = MM.cabs(taus, call.coeffs, *call.nm)
    delta += base
    return delta


def _apply_reference(call: ApplyCall):
    if call.method in DENSE_METHODS:
        taus = [ref.dequantize(_host_qtv(q)).astype(np.float64) for q in call.qtvs]
        res = _dense_merge(call, A.to_numpy(call.base).astype(np.float64), taus)
        return _write_out(call, _cast_result(res, call.base))
    res = ref.apply_task_vectors(A.to_numpy(call.base), [_host_qtv(q) for q in call.qtvs], call.coeffs,
                                 call.method, call.density)
    return _write_out(call, _cast_result(res, call.base))


def _delta_reference(call: DeltaCall):
    res = ref.delta_linear(A.to_numpy(call.x), A.to_numpy(call.base), [_host_qtv(q) for q in call.qtvs],
                           call.coeffs, call.task_ids)
    return _cast_result(res, call.x)


def _deq_reference(call: DeqCall):
    res = ref.dequantize(_host_qtv(call.qtv))
    return res if call.lib == "numpy" else A.torch_module().from_numpy(res)


_APPLY.register(Backend("reference", _host_only, _apply_reference))
_DELTA.register(Backend("reference", _host_only, _delta_reference))
_DEQ.register(Backend("reference", _host_only, _deq_reference))


# ------------------------------------------------------------ component table

def _comp_row(q: QTaskVector, task: int) -> List[int]:
    return [0 if q.scheme == "affine" else 1, q.bits, A.data_ptr(q.codes), q.row_bytes, A.data_ptr(q.scales),
            0 if q.zero_points is None else A.data_ptr(q.zero_points), int(q.per_row), q.n_groups, q.group_size,
            task]


def _components(qtvs: Sequence[QTaskVector], coeffs: np.ndarray, share_bases: bool):
    """(table int64 [C, 10], coefficients float64 [C]) describing every component of
    every task vector; a residual adds its base then its offset. With share_bases
    (plain sums), a base shared by several residuals becomes one component whose
    coefficient is the sum of theirs: it is decoded once per chunk, not once per task."""
    rows: List[List[int]] = []
    coefs: List[float] = []
    seen = {}
    for t, q in enumerate(qtvs):
        if q.base is not None:
            if share_bases and id(q.base) in seen:
                coefs[seen[id(q.base)]] += float(coeffs[t])
            else:
                seen[id(q.base)] = len(rows)
                rows.append(_comp_row(q.base, t))
                coefs.append(float(coeffs[t]))
        rows.append(_comp_row(q, t))
        coefs.append(float(coeffs[t]))
    table = np.array(rows, dtype=np.int64).reshape(-1, 10)
    return np.ascontiguousarray(table), np.array(coefs, dtype=np.float64)


def _contiguous_qtv(q: QTaskVector) -> QTaskVector:
    """Fields C-contiguous (they normally are); one copy otherwise."""
    def ok(a):
        return a is None or (a.flags.c_contiguous if isinstance(a, np.ndarray) else a.is_contiguous())

    if all(ok(a) for a in (q.codes, q.scales, q.zero_points)) and (q.base is None or q.base is _contiguous_qtv(q.base)):
        return q
    c = A.contiguous
    return QTaskVector(q.scheme, q.bits, q.shape, q.granularity, q.group_size, c(q.codes), c(q.scales),
                       None if q.zero_points is None else c(q.zero_points),
                       None if q.base is None else _contiguous_qtv(q.base))


def _rows_ok(a: Any) -> bool:
    """What the CPU kernels read directly: unit element stride, row stride >= K."""
    if not A.rows_contiguous(a):
        return False
    N, K = int(a.shape[0]), int(a.shape[1])
    return N <= 1 or A.elem_strides(a)[0] >= K


def _row_stride(a: Any) -> int:
    return int(A.elem_strides(a)[0]) if int(a.shape[0]) > 1 else int(a.shape[1])


def _same_view(a: Any, b: Any) -> bool:
    return A.data_ptr(a) == A.data_ptr(b) and A.elem_strides(a) == A.elem_strides(b)


def _may_overlap(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray):
        return bool(np.may_share_memory(a, b))
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _thresholds(qtvs, density: float, deq_fn):
    """Per-task (threshold, cut) of the TIES trim, from each task's exact dequantized values."""
    thr = np.empty(len(qtvs), dtype=np.float32)
    cut = np.empty(len(qtvs), dtype=np.int64)
    for t, q in enumerate(qtvs):
        vals = deq_fn(q)
        k = int(density * vals.size)
        th, ct = ref.trim_threshold(np.abs(vals), k)
        thr[t], cut[t] = np.float32(th) if np.isfinite(th) else np.float32(np.inf), ct
    return thr, cut


# ---------------------------------------------------------------------- cpu

_cpu_why_not = cpu_reason


def _cpu_deq_host(q: QTaskVector) -> np.ndarray:
    N, K = q.shape
    out = np.empty((N, K), dtype=np.float32)
    table, coefs = _components([q], np.ones(1), False)
    if N:
        _ext.C.taskvec_dequantize_cpu(table.ctypes.data, coefs.ctypes.data, len(table), N, K, out.ctypes.data)
    return out


def _deq_cpu(call: DeqCall):
    res = _cpu_deq_host(_contiguous_qtv(call.qtv))
    return res if call.lib == "numpy" else A.torch_module().from_numpy(res)


def _apply_cpu(call: ApplyCall):
    if call.method in DENSE_METHODS:
        taus = [_cpu_deq_host(_contiguous_qtv(q)) for q in call.qtvs]
        res = _dense_merge(call, np.asarray(A.to_numpy(call.base), dtype=np.float32), taus)
        return _write_out(call, _cast_result(res, call.base))
    base = call.base if _rows_ok(call.base) else A.contiguous(call.base)
    qtvs = [_contiguous_qtv(q) for q in call.qtvs]
    N, K = (int(s) for s in base.shape)
    T = len(qtvs)
    out = call.out
    direct = out is not None and _rows_ok(out) and (_same_view(out, base) or not _may_overlap(out, base))
    target = out if direct else A.empty_like_kind((N, K), A.dtype_name(base), base)
    per_task = call.method == "ties" or call.density is not None
    table, coefs = _components(qtvs, call.coeffs, share_bases=not per_task)
    task_coef = call.coeffs.astype(np.float32)
    thr = cut = None
    if call.density is not None:
        thr, cut = _thresholds(qtvs, call.density, _cpu_deq_host)
    if N:
        _ext.C.taskvec_apply_cpu(A.data_ptr(base), A.DTYPE_CODE[A.dtype_name(base)], N, K, _row_stride(base),
                                 A.data_ptr(target), _row_stride(target), table.ctypes.data, coefs.ctypes.data,
                                 len(table), T, 1 if call.method == "ties" else 0, task_coef.ctypes.data,
                                 0 if thr is None else thr.ctypes.data, 0 if cut is None else cut.ctypes.data, 0)
    if out is None or direct:
        return target
    return _write_out(call, target)


def _task_groups(ids: np.ndarray, T: int):
    order = np.argsort(ids, kind="stable").astype(np.int64)
    counts = np.bincount(ids + 1, minlength=T + 1)
    starts = np.zeros(T + 2, dtype=np.int64)
    np.cumsum(counts, out=starts[1:])
    return np.ascontiguousarray(order), starts


_BLAS_ROWS = 8  # above this many rows of x, delta_linear's base product goes to the BLAS
_MERGE_ROWS = 8  # DeltaPlan.run: every tenant with at least this many rows gets its own merged GEMM
_SCRATCH = threading.local()  # DeltaPlan.run's merged weight, one per thread


def _is_q4(q: QTaskVector) -> bool:
    """One affine 4-bit component whose groups are whole blocks of 32 columns: the kernel's
    decode path multiplies these straight from the packed nibbles."""
    return q.scheme == "affine" and q.bits == 4 and not q.is_residual and q.group_size % 32 == 0


def _base_by_blas(M: int, base, qtvs: Sequence[QTaskVector], merged: bool) -> bool:
    """Whether x @ base^T goes to the BLAS (then the kernel adds the deltas only). Many rows of
    float32: always (a GEMM). Up to 8 rows: never (see below)."""
    if A.dtype_name(base) != "float32":
        return False
    if M > _BLAS_ROWS:
        return True
    # 1..8 rows with task ids: the kernel's fused decode-step pass reads each base row once for
    # all rows together with each row's codes (every scheme and bit width), faster than a BLAS
    # call plus a second pass over the codes (and no hand-over between two thread pools)
    return False


def _delta_cpu_core(x32, base, qtvs, table, coefs, coeffs64, ids, torch, out_name: str):
    """y = x32 @ base^T + the deltas (task mode when ids is not None) on the cpu kernel."""
    M, K = (int(s) for s in x32.shape)
    N = int(base.shape[0])
    T = len(qtvs)
    y = A.empty_like_kind((M, N), "float32", base)
    merged = ids is None
    order = starts = None
    if not merged:
        order, starts = _task_groups(ids, T)
    base_done = _base_by_blas(M, base, qtvs, merged)
    if base_done and M and N:
        with blas_call():
            if torch is None:
                np.matmul(x32, base.T, out=y)
            else:
                torch.mm(x32, base.T, out=y)
    if M and N:
        _ext.C.taskvec_delta_linear_cpu(A.data_ptr(x32), M, K, A.data_ptr(base), A.DTYPE_CODE[A.dtype_name(base)], N,
                                        _row_stride(base), table.ctypes.data, coefs.ctypes.data, len(table), T,
                                        int(merged), 0 if merged else order.ctypes.data,
                                        0 if merged else starts.ctypes.data, A.data_ptr(y), int(base_done))
        _nonfinite_rows_by_definition(qtvs, coeffs64, ids, x32, base, y)
    elif M:
        y[...] = 0
    if out_name == "float32":
        return y
    return y.astype(out_name) if torch is None else y.to(getattr(torch, out_name))


def _delta_cpu(call: DeltaCall):
    torch = A.torch_module() if call.lib == "torch" else None
    x = call.x
    if torch is None:
        x32 = np.ascontiguousarray(x, dtype=np.float32)
    else:
        x32 = x.detach().to(torch.float32).contiguous()
    base = call.base if _rows_ok(call.base) else A.contiguous(call.base)
    qtvs = [_contiguous_qtv(q) for q in call.qtvs]
    table, coefs = _components(qtvs, call.coeffs, share_bases=call.task_ids is None)
    return _delta_cpu_core(x32, base, qtvs, table, coefs, call.coeffs, call.task_ids, torch, A.dtype_name(call.x))


class DeltaPlan:
    """One base weight and its T task vectors, checked and laid out once, for many
    multi-tenant ``delta_linear`` calls (what DeltaLinear runs per forward): each call skips
    the argument checks and the component table, and goes straight to the cpu kernel.

    ``plan(x, task_ids)``: x ``[M, K]`` torch CPU tensor or NumPy array (any float dtype),
    task_ids int ``[M]`` (NumPy or torch; -1 = base only). Same result as
    ``vkern.delta_linear(x, base, qtvs, task_ids=task_ids, backend="cpu")``.
    """

    def __init__(self, base, qtvs: Sequence[QTaskVector]):
        b, _ = A.to_native(base, "base")
        _check_float(b, "base")
        if b.ndim != 2:
            raise ValueError(f"base: expected shape [N_out, K_in], got {tuple(b.shape)}")
        if _device_str(b) != "cpu":
            raise ValueError(f"base: DeltaPlan runs the cpu kernel, got a tensor on {_device_str(b)}")
        self.base = b if _rows_ok(b) else A.contiguous(b)
        self.qtvs = [_contiguous_qtv(q) for q in _check_qtvs(qtvs, tuple(int(s) for s in b.shape), "cpu", "base")]
        self.T = len(self.qtvs)
        self.coeffs = np.ones(self.T)
        self.table, self.coefs = _components(self.qtvs, self.coeffs, share_bases=False)
        self.K = int(b.shape[1])
        self._task_tables = None

    def groups(self, task_ids):
        """The checked row grouping of task_ids (NumPy or torch int [M]) for :meth:`run`: a
        caller whose ids repeat (DeltaLinear inside one ``tenants`` block) computes it once."""
        ids = task_ids.numpy() if A.is_torch(task_ids) else np.asarray(task_ids)
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if ids.ndim != 1:
            raise ValueError(f"task_ids: expected shape (M,), got {tuple(ids.shape)}")
        _check_task_id_range(ids, self.T)
        order, starts = _task_groups(ids, self.T)
        return ids, order, starts

    def run(self, x, grouping):
        """``plan(x, ids)`` with ``grouping = plan.groups(ids)``: x a float32 contiguous torch CPU
        tensor ``[M, K]`` (what DeltaLinear passes); no other checks. Returns float32 ``[M, N]``."""
        torch = A.torch_module()
        ids, order, starts = grouping
        M = int(x.shape[0])
        if int(ids.shape[0]) != M:
            raise ValueError(f"task_ids: expected shape ({M},) (one per row of x), got {tuple(ids.shape)}")
        base = self.base
        N = int(base.shape[0])
        y = torch.empty((M, N), dtype=torch.float32)
        if not (M and N):
            return y.zero_()
        counts = np.diff(starts)
        if M > _BLAS_ROWS and int(counts[1:][counts[1:] > 0].min(initial=_MERGE_ROWS)) >= _MERGE_ROWS:
            return self._run_merged(x, ids, order, starts, y)
        base_done = _base_by_blas(M, base, self.qtvs, False)
        if base_done:
            with blas_call():
                torch.mm(x, base.T, out=y)
        _ext.C.taskvec_delta_linear_cpu(x.data_ptr(), M, self.K, base.data_ptr(), 0, N, _row_stride(base),
                                        self.table.ctypes.data, self.coefs.ctypes.data, len(self.table), self.T,
                                        0, order.ctypes.data, starts.ctypes.data, y.data_ptr(), int(base_done))
        if not np.isfinite(x.numpy()).all():
            _nonfinite_rows_by_definition(self.qtvs, self.coeffs, ids, x, base, y)
        return y

    def _run_merged(self, x, ids, order, starts, y):
        """Many rows per tenant (a prefill): each tenant's weight base + tau_t is built once in a
        per-thread scratch (the apply kernel, one pass over the base and the codes) and its rows
        are one BLAS GEMM, as a dense fine-tune's would be; rows of task -1 use the base."""
        torch = A.torch_module()
        base = self.base
        N, K = (int(s) for s in base.shape)
        used = [t for t in range(self.T) if starts[t + 2] > starts[t + 1]]
        scratch = getattr(_SCRATCH, "w", None)
        if scratch is None or scratch.numel() < len(used) * N * K:
            scratch = _SCRATCH.w = torch.empty(len(used) * N * K, dtype=torch.float32)
        if self._task_tables is None:
            self._task_tables = [_components([q], np.ones(1), False) for q in self.qtvs]
        one = np.ones(1, dtype=np.float32)
        weights = {-1: base}
        for j, t in enumerate(used):  # the applies back to back, then the GEMMs: one hand-over between
            w = scratch[j * N * K:(j + 1) * N * K].view(N, K)  # vkern's threads and the BLAS's, not 2 per tenant
            table, coefs = self._task_tables[t]
            _ext.C.taskvec_apply_cpu(base.data_ptr(), 0, N, K, _row_stride(base), w.data_ptr(), K,
                                     table.ctypes.data, coefs.ctypes.data, len(table), 1, 0, one.ctypes.data, 0, 0,
                                     1)
            weights[t] = w
        for t in range(-1, self.T):
            r0, r1 = int(starts[t + 1]), int(starts[t + 2])
            if r1 == r0:
                continue
            wt = weights[t]
            a, b = int(order[r0]), int(order[r1 - 1]) + 1
            with blas_call():
                if b - a == r1 - r0:  # the tenant's rows are one block of x (order is ascending within a task)
                    torch.mm(x[a:b], wt.T, out=y[a:b])
                else:
                    rows = torch.from_numpy(order[r0:r1])
                    y.index_copy_(0, rows, torch.mm(x.index_select(0, rows), wt.T))
        if not np.isfinite(x.numpy()).all():
            _nonfinite_rows_by_definition(self.qtvs, self.coeffs, ids, x, base, y)
        return y

    def __call__(self, x, task_ids):
        torch = A.torch_module() if A.is_torch(x) else None
        if x.ndim != 2 or int(x.shape[1]) != self.K:
            raise ValueError(f"x: expected shape [M, {self.K}], got {tuple(x.shape)}")
        if torch is not None:
            x32 = x.detach().to(torch.float32).contiguous()
            ids = task_ids.numpy() if A.is_torch(task_ids) else np.asarray(task_ids)
        else:
            x32 = np.ascontiguousarray(x, dtype=np.float32)
            ids = np.asarray(task_ids)
        ids = ids.astype(np.int64, copy=False)
        M = int(x32.shape[0])
        if ids.shape != (M,):
            raise ValueError(f"task_ids: expected shape ({M},) (one per row of x), got {tuple(ids.shape)}")
        _check_task_id_range(ids, self.T)
        base = self.base
        if type(x32) is not type(base):
            raise TypeError(f"x: expected the array kind of base ({type(base).__name__}), got {type(x).__name__}")
        return _delta_cpu_core(x32, base, self.qtvs, self.table, self.coefs, self.coeffs, ids, torch,
                               A.dtype_name(x))


def _nonfinite_rows_by_definition(qtvs, coeffs64, task_ids, x32, base, y) -> None:
    """Rows of x holding a NaN or inf, recomputed by the definition x @ base^T + sum_t c_t x @ dequant_t^T.
    The kernel's fused identities (one merged weight row for a coefficient sum; x . (2b - 1) = 2 x.b - sum x
    for sign deltas) are exact for finite x only: with inf in x they can give inf where the definition
    gives inf - inf = NaN, or the reverse. Finite x (every real call) costs one isfinite pass over x."""
    if isinstance(x32, np.ndarray):
        bad = np.flatnonzero(~np.isfinite(x32).all(axis=1))
    else:
        bad = A.torch_module().nonzero(~A.torch_module().isfinite(x32).all(dim=1)).reshape(-1).numpy()
    if not bad.size:
        return
    ids = None if task_ids is None else np.asarray(task_ids)[bad]
    fixed = ref.delta_linear(A.to_numpy(x32)[bad], A.to_numpy(base), [_host_qtv(q) for q in qtvs], coeffs64,
                             ids).astype(np.float32)
    y[bad] = fixed if isinstance(y, np.ndarray) else A.torch_module().from_numpy(fixed)


_APPLY.register(Backend("cpu", _cpu_why_not, _apply_cpu))
_DELTA.register(Backend("cpu", _cpu_why_not, _delta_cpu))
_DEQ.register(Backend("cpu", _cpu_why_not, _deq_cpu))


# ------------------------------------------------------------ triton / cuda

def _torch_thresholds(qtvs, density: float, deq_fn):
    """Per-task (threshold, cut) of the TIES trim, on the device (one small sync per task)."""
    torch = A.torch_module()
    thr, cut = [], []
    for q in qtvs:
        flat = deq_fn(q).abs().reshape(-1)
        n = flat.numel()
        k = int(density * n)
        if k <= 0:
            thr.append(float("inf")), cut.append(-1)
        elif k >= n:
            thr.append(-1.0), cut.append(-1)
        else:
            th = torch.kthvalue(flat, n - k + 1).values
            greater = int((flat > th).sum())
            ties = torch.nonzero(flat == th).reshape(-1)
            thr.append(float(th)), cut.append(int(ties[k - greater - 1]))
    dev = qtvs[0].codes.device if A.is_torch(qtvs[0].codes) else "cpu"
    return (torch.tensor(thr, dtype=torch.float32, device=dev), torch.tensor(cut, dtype=torch.int64, device=dev))


def _gpu_out(call: ApplyCall, base):
    out = call.out
    if out is not None and out.is_contiguous() and (_same_view(out, base) or not _may_overlap(out, base)):
        return out, True
    return A.torch_module().empty_like(base, memory_format=A.torch_module().contiguous_format), False


def _kernel_methods_only(reason_fn):
    def why_not(call) -> Optional[str]:
        if isinstance(call, ApplyCall) and call.method not in KERNEL_METHODS:
            return f"method {call.method!r} runs on the cpu and reference backends only (no GPU kernel yet)"
        return reason_fn(call)
    return why_not


_triton_why_not = _kernel_methods_only(triton_reason)


def _triton_deq_why_not(call: DeqCall) -> Optional[str]:
    reason = _ext.triton_reason()
    if reason is not None:
        return reason
    if call.device == "cpu" and not _ext.triton_interpret():
        return "CPU tensors need TRITON_INTERPRET=1"
    return None


def _deq_triton(call: DeqCall):
    k = _ext.triton_kernels("taskvec")
    q = call.qtv
    dev = "cpu" if call.lib == "numpy" else q.codes.device
    out = k.dequantize(k.pools([q], [1.0], dev, False), q.N, q.K)
    return out.numpy() if call.lib == "numpy" else out


def _apply_triton(call: ApplyCall):
    torch = A.torch_module()
    k = _ext.triton_kernels("taskvec")
    base = call.base.contiguous()
    dev = base.device
    per_task = call.method == "ties" or call.density is not None
    p = k.pools(call.qtvs, call.coeffs, dev, share_bases=not per_task)
    task_coef = torch.tensor(call.coeffs, dtype=torch.float32, device=dev).reshape(-1)
    thr = cut = None
    if call.density is not None and call.qtvs:
        thr, cut = _torch_thresholds(call.qtvs, call.density,
                                     lambda q: k.dequantize(k.pools([q], [1.0], dev, False), q.N, q.K))
    target, direct = _gpu_out(call, base)
    k.apply(base, target, p, task_coef, 1 if call.method == "ties" else 0, thr, cut)
    return target if call.out is None or direct else _write_out(call, target)


def _delta_triton(call: DeltaCall):
    torch = A.torch_module()
    k = _ext.triton_kernels("taskvec")
    x, base = call.x.contiguous(), call.base.contiguous()
    p = k.pools(call.qtvs, call.coeffs, base.device, share_bases=call.task_ids is None)
    task_coef = torch.tensor(call.coeffs, dtype=torch.float32, device=base.device).reshape(-1)
    ids = None if call.task_ids is None else call.task_ids_native.to(torch.int64).contiguous()
    y = k.delta_linear(x, base, p, task_coef, ids)
    return y if A.dtype_name(call.x) == "float32" else y.to(call.x.dtype)


_APPLY.register(Backend("triton", _triton_why_not, _apply_triton))
_DELTA.register(Backend("triton", _triton_why_not, _delta_triton))
_DEQ.register(Backend("triton", _triton_deq_why_not, _deq_triton))


def _cuda_why_not(call) -> Optional[str]:
    reason = _kernel_methods_only(cuda_reason)(call)
    if reason is not None:
        return reason
    qtvs = call.qtvs if hasattr(call, "qtvs") else [call.qtv]
    n = sum(2 if q.base is not None else 1 for q in qtvs)
    if n > 32 or len(qtvs) > 32:
        return f"at most 32 components per call (got {n} from {len(qtvs)} task vectors)"
    return None


def _deq_cuda_tensor(q: QTaskVector):
    torch = A.torch_module()
    q = _contiguous_qtv(q)
    out = torch.empty((q.N, q.K), dtype=torch.float32, device=q.codes.device)
    table, coefs = _components([q], np.ones(1), False)
    with torch.cuda.device(q.codes.device):
        _ext.C.taskvec_dequantize_cuda(table.ctypes.data, coefs.ctypes.data, len(table), q.N, q.K, out.data_ptr(),
                                       torch.cuda.current_stream().cuda_stream)
    return out


def _deq_cuda(call: DeqCall):
    return _deq_cuda_tensor(call.qtv)


def _apply_cuda(call: ApplyCall):
    torch = A.torch_module()
    base = call.base.contiguous()
    qtvs = [_contiguous_qtv(q) for q in call.qtvs]
    N, K = (int(s) for s in base.shape)
    per_task = call.method == "ties" or call.density is not None
    table, coefs = _components(qtvs, call.coeffs, share_bases=not per_task)
    thr, cut = [], []
    if call.density is not None and qtvs:
        t_thr, t_cut = _torch_thresholds(qtvs, call.density, _deq_cuda_tensor)
        thr, cut = t_thr.cpu().tolist(), t_cut.cpu().tolist()
    target, direct = _gpu_out(call, base)
    with torch.cuda.device(base.device):
        _ext.C.taskvec_apply_cuda(base.data_ptr(), A.DTYPE_CODE[A.dtype_name(base)], N, K, target.data_ptr(),
                                  table.ctypes.data, coefs.ctypes.data, len(table), len(qtvs),
                                  1 if call.method == "ties" else 0, [float(c) for c in call.coeffs], thr, cut,
                                  torch.cuda.current_stream().cuda_stream)
    return target if call.out is None or direct else _write_out(call, target)


def _delta_cuda(call: DeltaCall):
    torch = A.torch_module()
    x = call.x.detach().to(torch.float32).contiguous()
    base = call.base.contiguous()
    qtvs = [_contiguous_qtv(q) for q in call.qtvs]
    M, K = (int(s) for s in x.shape)
    N = int(base.shape[0])
    table, coefs = _components(qtvs, call.coeffs, share_bases=call.task_ids is None)
    ids = None if call.task_ids is None else call.task_ids_native.to(torch.int64).contiguous()
    y = torch.empty((M, N), dtype=torch.float32, device=base.device)
    with torch.cuda.device(base.device):
        _ext.C.taskvec_delta_linear_cuda(x.data_ptr(), M, K, base.data_ptr(), A.DTYPE_CODE[A.dtype_name(base)], N,
                                         table.ctypes.data, coefs.ctypes.data, len(table), len(qtvs),
                                         0 if ids is None else ids.data_ptr(), y.data_ptr(),
                                         torch.cuda.current_stream().cuda_stream)
    return y if A.dtype_name(call.x) == "float32" else y.to(call.x.dtype)


_APPLY.register(Backend("cuda", _cuda_why_not, _apply_cuda))
_DELTA.register(Backend("cuda", _cuda_why_not, _delta_cuda))
_DEQ.register(Backend("cuda", _cuda_why_not, _deq_cuda))


# --------------------------------------------------------------------- API

def dequantize_impl(qtv: QTaskVector, *, backend: str = "auto"):
    if not isinstance(qtv, QTaskVector):
        raise TypeError(f"qtv: expected a QTaskVector, got {type(qtv).__name__}")
    _validate(qtv, "qtv")
    if qtv.base is not None:
        _validate(qtv.base, "qtv.base")
    dev = _qtv_device(qtv)
    if dev.startswith("mixed"):
        raise ValueError(f"qtv: arrays on several devices ({dev}); move them with qtv.to(...)")
    lib = "numpy" if isinstance(qtv.codes, np.ndarray) else "torch"
    call = DeqCall(qtv, dev.split(":")[0], lib)
    return _DEQ.pick(backend, call).run(call)


def apply_task_vectors_impl(base, qtvs, coeffs, *, method="sum", density=None, out=None, backend="auto", p=None,
                            seed=None, n=None, m=None, block=None):
    call = _prepare_apply(base, qtvs, coeffs, method, density, out, p, seed, n, m, block)
    return A.from_native(_APPLY.pick(backend, call).run(call), call.origin)


def delta_backend(base, qtvs, backend: str = "auto") -> str:
    """The backend name delta_linear(x, base, qtvs, task_ids=..., backend=backend) would run on."""
    b, _ = A.to_native(base, "base")
    x = A.empty_like_kind((1, int(b.shape[1])), "float32", b)
    ids = np.zeros(1, np.int64) if isinstance(b, np.ndarray) else A.torch_module().zeros(1, dtype=A.torch_module().int64,
                                                                             device=b.device)
    call = _prepare_delta(x, b, qtvs, None, ids if qtvs else None)
    return _DELTA.pick(backend, call).name


def delta_linear_impl(x, base, qtvs, coeffs=None, *, task_ids=None, backend="auto"):
    call = _prepare_delta(x, base, qtvs, coeffs, task_ids)
    y = _DELTA.pick(backend, call).run(call)
    return A.from_native(y[0] if call.single else y, call.origin)


def apply_task_vectors(base, qtvs: Sequence[QTaskVector], coeffs, *, method: str = "sum",
                       density: Optional[float] = None, out=None, backend: str = "auto", p: Optional[float] = None,
                       seed=None, n: Optional[int] = None, m: Optional[int] = None, block: Optional[str] = None):
    """Merges T quantized task vectors into a base weight in one pass over memory.

    ``W = base + sum_t coeffs[t] * dequantize(qtvs[t])`` (``method="sum"``, task arithmetic),
    accumulated in float32 and returned in base's dtype and array kind.

    ``method="ties"`` (mergekit's ``ties``, weights before election): per element,
    ``w_t = coeffs[t] * tau_t``; the elected sign is + where ``sum_t w_t >= 0``; task t
    agrees where ``sign(w_t)`` equals it (a zero never agrees); ``W = base + (sum of
    agreeing w_t) / (sum of agreeing coeffs[t])`` (a sum of 0 counts as 1).

    ``density`` (sum or ties) first trims each tau_t to its ``k = int(density * numel)``
    entries of largest magnitude (exact count, ties to the lower flat index).

    Three more methods (cpu and reference backends; they dequantize each task vector once,
    so they are not one-pass; Triton and CUDA raise BackendUnavailable for them):

    * ``"dare"`` (DARE): each element of tau_t is dropped with probability ``p`` and the
      rest scaled by ``1 / (1 - p)``; ``W = base + sum_t coeffs[t] * dare(tau_t)``. The drop
      is deterministic given ``seed`` (an int or tuple of ints; default 0): flat element i of
      task t is kept when ``u < 1 - p`` for the float32 uniform that
      ``np.random.default_rng((*seed, t, i // 2**18)).random`` draws for it.
    * ``"negmerge"`` (NegMerge, unlearning): the T task vectors are fine-tunes on one forget
      task; ``W = base - sum_t coeffs[t] * tau_t`` where every tau_t has the same non-zero
      sign, ``W = base`` elsewhere (coeffs ``lambda / T`` give ``base - lambda * mean``).
    * ``"cabs"`` (CABS): in list order, tau_t keeps, in every group of ``m`` consecutive
      flat elements, its ``n`` largest magnitudes among positions no earlier task kept
      (ties to the lower index), so the masks never overlap; ``W = base + sum_t coeffs[t] *
      kept tau_t``.

    aTLAS-style per-block coefficients: ``coeffs`` may be a mapping ``{block: T numbers}``
    with ``block=`` naming this weight's parameter block (e.g. its tensor name); the entry
    is the exact key, else the first key that is a substring of ``block``, else ``"*"``.

    Args:
        base: [N_out, K_in] float32 / float16 / bfloat16 (NumPy or torch, CPU or CUDA).
        qtvs: list of T QTaskVector of shape [N_out, K_in], formats may differ, on base's device.
        coeffs: T numbers, or a mapping {block: T numbers} with ``block``.
        out: optional array like base to write into (``out=base`` updates in place).
        backend: "auto", "cpu", "cuda", "triton" or "reference".

    Example:
        >>> import numpy as np, vkern
        >>> from vkern import taskvec
        >>> base = np.zeros((2, 4), np.float32)
        >>> tau = np.array([[0, 1, 2, 3], [-3, -2, -1, 0]], np.float32)
        >>> q = taskvec.quantize(tau, bits=8)
        >>> bool(np.abs(vkern.apply_task_vectors(base, [q], [0.5]) - 0.5 * tau).max() < 0.01)
        True
    """
    torch = A.torch_module() if A.is_torch(base) else None
    if torch is not None and torch.compiler.is_compiling():
        if method not in KERNEL_METHODS or isinstance(coeffs, Mapping) or block is not None:
            raise TypeError(f"method: under torch.compile apply_task_vectors runs {KERNEL_METHODS} with a "
                            f"sequence of coeffs; call it outside the compiled region for {method!r} or a mapping")
        from .._torch.taskvec import call_apply_task_vectors

        return call_apply_task_vectors(base, qtvs, coeffs, method, density, out, backend)
    return apply_task_vectors_impl(base, qtvs, coeffs, method=method, density=density, out=out, backend=backend,
                                   p=p, seed=seed, n=n, m=m, block=block)


def delta_linear(x, base, qtvs: Sequence[QTaskVector], coeffs=None, *, task_ids=None, backend: str = "auto"):
    """``y = x @ base^T + sum_t coeffs[t] * x @ dequantize(qtvs[t])^T`` without a dense delta.

    With ``task_ids [M]`` row m of x adds only task ``task_ids[m]`` (times ``coeffs[t]``
    if coeffs is given, else 1); ``-1`` means the base alone (multi-tenant serving).
    Without either, every task is added with coefficient 1.

    Args:
        x: [M, K_in] or [K_in], float32 / float16 / bfloat16.
        base: [N_out, K_in] float, same array kind and device as x.
        qtvs: T QTaskVector of shape [N_out, K_in] on base's device.

    Returns:
        y [M, N_out] (or [N_out]) in x's dtype, accumulated in float32. A row of x holding
        NaN or inf follows the formula above term by term, as float64 NumPy evaluates it
        (so inf * w + c * inf * w' can be inf - inf = NaN); the cpu backend computes such
        rows by that definition (docs/contracts.md, section 4).

    Example:
        >>> import numpy as np, vkern
        >>> from vkern import taskvec
        >>> base = np.eye(3, 4, dtype=np.float32)
        >>> q = taskvec.quantize(np.ones((3, 4), np.float32), bits=1, scheme="sign")
        >>> vkern.delta_linear(np.ones((2, 4), np.float32), base, [q], task_ids=np.array([0, -1])).tolist()
        [[5.0, 5.0, 5.0], [1.0, 1.0, 1.0]]
    """
    torch = A.torch_module() if A.is_torch(x) else None
    if torch is not None and torch.compiler.is_compiling():
        from .._torch.taskvec import call_delta_linear

        return call_delta_linear(x, base, qtvs, coeffs, task_ids, backend)
    return delta_linear_impl(x, base, qtvs, coeffs, task_ids=task_ids, backend=backend)
