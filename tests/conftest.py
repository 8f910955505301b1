"""Shared test setup.

Triton kernels run on the CPU through the interpreter, which reads
TRITON_INTERPRET when a kernel is decorated: it must be set before any
vkern Triton module is imported, so it is set here, first, unless a CUDA
device is present (then the Triton kernels run for real).
"""
import os

try:
    import torch

    HAVE_TORCH = True
    HAVE_CUDA = torch.cuda.is_available()
except Exception:  # torch is optional for vkern users; the tests that need it skip
    HAVE_TORCH = False
    HAVE_CUDA = False

if not HAVE_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


# ---- helpers the op test files share (import them: `from conftest import needs, host, to_kind`)

def needs(name, op):
    """Skip unless backend `name` of `op` can run here (and torch is there for triton/cuda)."""
    import vkern

    ok, reason = vkern.available_backends(op)[name]
    if not ok:
        pytest.skip(f"{name}: {reason}")
    if name in ("triton", "cuda") and not HAVE_TORCH:
        pytest.skip("needs torch")


def to_kind(backend, a, dtype=None):
    """An array for `backend`: NumPy for reference/cpu (float32/float16), torch otherwise and
    for bfloat16, on the GPU for cuda (and triton when a GPU is there); None stays None."""
    if a is None:
        return None
    a = np.asarray(a)
    if backend in ("reference", "cpu") and dtype in (None, "float32", "float16"):
        return a.astype(dtype) if dtype and a.dtype.kind == "f" else a
    t = torch.from_numpy(np.ascontiguousarray(a))
    if dtype is not None and t.is_floating_point():
        t = t.to(getattr(torch, dtype))
    if backend == "cuda" or (backend == "triton" and HAVE_CUDA):
        t = t.cuda()
    return t


def host(x):
    """A result as NumPy on the host (float tensors as float32)."""
    if HAVE_TORCH and isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy() if x.is_floating_point() else x.cpu().numpy()
    return np.asarray(x)
