"""Shared by the Triton kernel modules (vkern.kernels.*): the optional triton
import, the device guard every launcher takes, and the order-preserving float key the
selection kernels rank by."""
import contextlib

try:
    import triton
    import triton.language as tl

    IMPORT_ERROR = ""
except Exception as exc:  # pragma: no cover - the wrappers check availability first
    triton = None
    tl = None
    IMPORT_ERROR = f"triton is not importable: {exc!r}"

__all__ = ["triton", "tl", "IMPORT_ERROR", "order_key", "device_guard", "flat_grid", "GRID_X_MAX", "GRID_YZ_MAX"]

GRID_X_MAX = 2**31 - 1   # CUDA's grid limits (compute capability >= 3.0)
GRID_YZ_MAX = 65535


def flat_grid(what: str, *counts: int) -> tuple:
    """A one-axis grid of prod(counts) programs (each kernel splits its program id back into the
    counts, last fastest), so no data-sized count ever sits on the y or z axis (at most 65,535).
    More programs than the x axis holds (2**31 - 1) raise ValueError naming `what`, before any launch."""
    n = 1
    for c in counts:
        n *= int(c)
    if n > GRID_X_MAX:
        raise ValueError(f"{what}: {' x '.join(str(int(c)) for c in counts)} = {n} programs exceed one launch "
                         f"grid ({GRID_X_MAX}); split the call")
    return (n,)


def device_guard(t):
    """A context that makes t's GPU the current device (and so its current stream the one Triton
    launches on), as torch's own ops do; a no-op for CPU tensors (the interpreter). Without it a
    tensor on a GPU other than the current one is launched on the wrong device."""
    if t.device.type == "cuda":
        import torch

        return torch.cuda.device(t.device)
    return contextlib.nullcontext()

if triton is not None:

    @triton.jit
    def order_key(x):
        # float32 -> int64 key in [0, 2**32): a larger float gets a larger key,
        # -0.0 == +0.0, NaN -> 0 (ranks last).
        bits = tl.where(x == 0.0, 0.0, x).to(tl.int32, bitcast=True).to(tl.int64)
        key = tl.where(bits < 0, -bits - 1, bits + 2147483648)
        return tl.where(x != x, 0, key)
