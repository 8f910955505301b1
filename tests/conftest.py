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
