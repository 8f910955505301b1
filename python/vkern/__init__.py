"""vkern: fast vector kernels: MaxSim late interaction, Loki sparse attention,
VATP KV-cache pruning and quantized task vectors.

Every op takes NumPy arrays or torch tensors (CPU or CUDA; other DLPack
arrays too) and returns the same kind. Each has a NumPy reference, a C++ CPU
kernel, a CUDA kernel and a Triton kernel, picked by ``backend=``.
"""
from __future__ import annotations

from ._backend import BackendUnavailable, available_backends
from . import _ext
from .ops.maxsim import maxsim
from .ops.maxsim_int8 import QuantizedDocs, quantize_docs
from .ops.pool import pool_tokens, segment_mean
from .ops.loki import decode_attention, loki_attention
from .ops.taskvec import apply_task_vectors, delta_linear
from .ops.vatp import vatp_prune
from . import loki, muvera, taskvec, vatp

__version__ = "0.1.0"

__all__ = ["maxsim", "quantize_docs", "QuantizedDocs", "muvera", "pool_tokens", "segment_mean", "loki_attention", "decode_attention", "loki", "vatp_prune", "vatp", "apply_task_vectors",
           "delta_linear", "taskvec", "BackendUnavailable", "available_backends", "set_num_threads",
           "get_num_threads", "set_simd_level", "info", "__version__"]


def set_num_threads(n: int) -> None:
    """Threads used by the CPU kernels (default: VKERN_NUM_THREADS, OMP_NUM_THREADS or all cores)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"set_num_threads: n must be an int >= 1, got {n!r}")
    if _ext.C is not None:
        _ext.C.set_num_threads(n)


def get_num_threads() -> int:
    return int(_ext.C.num_threads()) if _ext.C is not None else 1


def set_simd_level(name: str = "auto") -> None:
    """Force the CPU kernels' SIMD level: "auto", "generic", "avx2" or "avx512" (VKERN_SIMD at start-up)."""
    if _ext.C is None:
        raise BackendUnavailable(_ext.C_ERROR)
    try:
        _ext.C.set_simd_level(name)
    except ValueError as exc:
        raise ValueError(f"set_simd_level: {exc}") from None


def info() -> dict:
    """What was built and what can run here (also ``python -m vkern info``)."""
    from ._info import collect

    return collect()


def _register_torch_ops() -> None:
    import sys

    if "torch" in sys.modules:
        try:
            from . import _torch  # noqa: F401
        except Exception:  # pragma: no cover - an old torch without custom_op
            pass


_register_torch_ops()
