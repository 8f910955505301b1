"""Loads the compiled extension and the Triton kernels, remembering why either
is unavailable; nothing here raises at import."""
from __future__ import annotations

import importlib
import os
from functools import lru_cache
from typing import Optional

try:
    from . import _C  # type: ignore[attr-defined]

    C = _C
    C_ERROR: Optional[str] = None
except Exception as exc:  # missing, or built for another platform/ABI
    C = None
    C_ERROR = f"compiled extension vkern._C failed to load ({type(exc).__name__}: {exc})"


def cpu_reason() -> Optional[str]:
    return C_ERROR


def cuda_built() -> bool:
    return C is not None and bool(getattr(C, "cuda_built", False))


@lru_cache(maxsize=None)
def cuda_device_count() -> int:
    if C is None or not cuda_built():
        return 0
    return int(C.cuda_device_count())


def cuda_reason() -> Optional[str]:
    if C is None:
        return C_ERROR
    if not cuda_built():
        return "vkern was built without CUDA kernels (no nvcc at build time, or VKERN_CUDA=OFF)"
    if cuda_device_count() == 0:
        return "no CUDA device visible"
    return None


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


@lru_cache(maxsize=None)
def triton_kernels(name: str):
    """The Triton kernel module vkern.kernels.<name>, or raises ImportError."""
    return importlib.import_module(f"vkern.kernels.{name}")


@lru_cache(maxsize=None)
def triton_reason() -> Optional[str]:
    try:
        import triton  # noqa: F401
    except Exception as exc:
        return f"triton is not importable ({type(exc).__name__}: {exc})"
    try:
        import torch  # noqa: F401
    except Exception:
        return "torch is not importable (Triton kernels take torch tensors)"
    if not triton_interpret():
        import torch

        if not torch.cuda.is_available():
            return "no CUDA device for Triton (set TRITON_INTERPRET=1 to run it on the CPU)"
    return None


def general_reason(backend: str) -> Optional[str]:
    if backend == "reference":
        return None
    if backend == "cpu":
        return cpu_reason()
    if backend == "cuda":
        return cuda_reason()
    if backend == "triton":
        return triton_reason()
    return "unknown backend"
