"""Array adapters: NumPy, torch (CPU and CUDA) and other DLPack producers.

The ops work on "native" arrays, a NumPy ndarray or a torch Tensor, and hand
results back as the caller's kind, on the caller's device.
"""
from __future__ import annotations

import sys
from typing import Any

import numpy as np

FLOAT_DTYPES = ("float32", "float16", "bfloat16")
DTYPE_CODE = {"float32": 0, "float16": 1, "bfloat16": 2}


def torch_module():
    """torch if it is already imported or importable, else None (never raises)."""
    mod = sys.modules.get("torch")
    if mod is not None:
        return mod
    try:
        import torch  # noqa: F401
    except Exception:  # pragma: no cover - torch is optional
        return None
    return sys.modules["torch"]


def is_torch(x: Any) -> bool:
    mod = sys.modules.get("torch")
    return mod is not None and isinstance(x, mod.Tensor)


def to_native(x: Any, name: str, writes: bool = False):
    """Returns (array, origin): array is an ndarray or a torch Tensor; origin
    remembers how to hand a result back ('numpy', 'torch' or a DLPack module).

    A NumPy array in non-native byte order (e.g. ``x.astype('>f4')`` on a
    little-endian machine) is converted to native order with one copy, since the
    kernels read raw machine words. An array the op writes into (`writes=True`:
    ``inplace``/``out=`` buffers) cannot be converted without losing the writes,
    so there it is refused with a TypeError."""
    if isinstance(x, np.ndarray):
        if not x.dtype.isnative:
            if writes:
                raise TypeError(f"{name}: expected native byte order for an array written in place, got dtype "
                                f"{x.dtype.str!r}; convert it first, e.g. x.astype(x.dtype.newbyteorder('='))")
            x = x.astype(x.dtype.newbyteorder("="))
        return x, "numpy"
    if is_torch(x):
        return x, "torch"
    if hasattr(x, "__dlpack__"):
        torch = torch_module()
        if torch is not None:
            return torch.from_dlpack(x), type(x).__module__.split(".")[0]
        return np.from_dlpack(x), "numpy"
    if isinstance(x, (list, tuple)) or np.isscalar(x):
        return to_native(np.asarray(x), name, writes)
    raise TypeError(f"{name}: expected a NumPy array, a torch tensor or a DLPack array, got {type(x).__name__}")


def from_native(result: Any, origin: str):
    """Hands a native result back as the caller's array kind."""
    if origin in ("numpy", "torch"):
        return result
    mod = sys.modules.get(origin)
    if mod is not None and hasattr(mod, "from_dlpack"):
        return mod.from_dlpack(result)
    return result


_NAMES: dict = {}  # dtype object -> "float32" etc. (numpy's dtype.name is slow to compute)


def dtype_name(a: Any) -> str:
    dt = a.dtype
    name = _NAMES.get(dt)
    if name is None:
        name = _NAMES[dt] = dt.name if isinstance(a, np.ndarray) else str(dt).replace("torch.", "")
    return name


def device_of(a: Any) -> str:
    if isinstance(a, np.ndarray):
        return "cpu"
    return a.device.type


def same_place(arrays: dict) -> str:
    """Checks that the named arrays share one device and one library; returns the library
    ("numpy" or "torch")."""
    devices = {k: device_of(v) for k, v in arrays.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"mixed devices: {devices}; put every array on one device")
    gpus = {k: str(v.device) for k, v in arrays.items() if not isinstance(v, np.ndarray) and v.device.type != "cpu"}
    if len(set(gpus.values())) > 1:   # cuda:0 and cuda:1: one kernel cannot read both
        raise ValueError(f"mixed devices: {gpus}; put every array on one device")
    libs = {k: ("numpy" if isinstance(v, np.ndarray) else "torch") for k, v in arrays.items()}
    if len(set(libs.values())) > 1:
        raise TypeError(f"mixed array kinds: {libs}; pass all NumPy arrays or all torch tensors")
    return next(iter(libs.values()))


def host_ints(x: Any) -> np.ndarray:
    """Small index array as host int64 (one tiny device->host copy for CUDA inputs)."""
    if isinstance(x, np.ndarray):
        return x.astype(np.int64, copy=False)
    return x.detach().to("cpu").numpy().astype(np.int64, copy=False)


def padded_lengths(doc_lengths: Any, docs: Any, what: str = "docs") -> np.ndarray:
    """Host int64 [N] lengths for padded docs [N, Ld, D] (Ld each where doc_lengths is None),
    checked as every op checks them: same library and device as the docs, an integer dtype,
    shape (N,), every length in [0, Ld]."""
    N, Ld = int(docs.shape[0]), int(docs.shape[1])
    if doc_lengths is None:
        return np.full(N, Ld, np.int64)
    ln = to_native(doc_lengths, "doc_lengths")[0]
    same_place({what: docs, "doc_lengths": ln})
    if not is_integer(ln):
        raise TypeError(f"doc_lengths: expected an integer array, got {dtype_name(ln)}")
    if tuple(ln.shape) != (N,):
        raise ValueError(f"doc_lengths: expected shape ({N},) (one per document), got {tuple(ln.shape)}")
    lens = host_ints(ln)
    if N and (lens.min() < 0 or lens.max() > Ld):
        raise ValueError(f"doc_lengths: every length must be in [0, Ld={Ld}], "
                         f"got min={int(lens.min())}, max={int(lens.max())}")
    return lens


def is_float(a: Any) -> bool:
    return dtype_name(a) in FLOAT_DTYPES


def is_integer(a: Any) -> bool:
    if isinstance(a, np.ndarray):
        return a.dtype.kind in "iu"
    return (not a.dtype.is_floating_point) and (not a.dtype.is_complex) and a.dtype != sys.modules["torch"].bool


def elem_strides(a: Any) -> tuple:
    if isinstance(a, np.ndarray):
        return tuple(s // a.itemsize for s in a.strides)
    return tuple(a.stride())


def data_ptr(a: Any) -> int:
    if isinstance(a, np.ndarray):
        return a.__array_interface__["data"][0]
    return a.data_ptr()


def rows_contiguous(a: Any) -> bool:
    """Last axis has unit stride and the strides are multiples of the element
    size (what the CPU kernel needs)."""
    if isinstance(a, np.ndarray):
        if any(s % a.itemsize for s in a.strides) or any(s < 0 for s in a.strides):
            return False
    if a.ndim == 0:
        return True
    return a.shape[-1] <= 1 or elem_strides(a)[-1] == 1


def contiguous(a: Any):
    if isinstance(a, np.ndarray):
        return np.ascontiguousarray(a)
    return a.contiguous()


def to_numpy(a: Any, float_dtype=None) -> np.ndarray:
    """Host NumPy copy/view of a CPU array; bfloat16 becomes float32 (exactly)."""
    if isinstance(a, np.ndarray):
        out = a
    else:
        if a.device.type != "cpu":
            raise ValueError("expected a CPU array")
        t = a.detach()
        if str(t.dtype) == "torch.bfloat16":
            t = t.float()
        out = t.numpy()
    if float_dtype is not None:
        out = out.astype(float_dtype, copy=False)
    return out


def all_finite(x: np.ndarray) -> bool:
    """True if no element of the float array x is NaN or +-inf, without an x-sized temporary in
    the usual case: a sum that is finite proves every term finite (any inf or NaN term makes it
    inf or NaN); only a sum that overflowed or hit one is checked element by element."""
    with np.errstate(over="ignore", invalid="ignore"):
        if np.isfinite(x.sum()):
            return True
    return bool(np.isfinite(x).all())


def empty_like_kind(shape, dtype: str, like: Any):
    """Uninitialised array of the same kind and device as `like`."""
    if isinstance(like, np.ndarray):
        return np.empty(shape, dtype=dtype)
    torch = sys.modules["torch"]
    return torch.empty(shape, dtype=getattr(torch, dtype), device=like.device)


def as_kind(x: np.ndarray, like: Any):
    """A NumPy result moved to `like`'s kind and device."""
    if isinstance(like, np.ndarray):
        return x
    torch = sys.modules["torch"]
    return torch.from_numpy(np.ascontiguousarray(x)).to(like.device)


def float_dtype_error(name: str, x: Any) -> TypeError:
    """The TypeError every op raises for a float array it does not take (float64 above all:
    NumPy's default, and what a Python list becomes). vkern never casts behind the caller's
    back (a float64 -> float32 copy would double the memory traffic the kernels avoid), so the
    message names the fix."""
    fix = f"{name}.float()" if is_torch(x) else f"{name}.astype(np.float32)"
    return TypeError(f"{name}: expected float32, float16 or bfloat16, got {dtype_name(x)}; "
                     f"vkern does not cast behind your back: pass {fix} "
                     f"(NumPy: .astype(np.float32), torch: .float())")
