"""Task-vector benchmarks (pytest-benchmark): vkern backends beside the NumPy
reference and the torch formulations, on the issue's workloads.

    pytest benchmarks/bench_taskvec.py             # all, ratios printed at the end
    pytest benchmarks/bench_taskvec.py -k apply    # apply_task_vectors only
    VKERN_BENCH_SIZE=2048 pytest ...               # a smaller base

apply_task_vectors: base 4096 x 4096 float32, T = 4 task vectors, 4-bit, group 128;
"% copy BW" counts base read + codes/scales/zeros read + result written.
delta_linear: x of 1, 8, 64 rows, T = 8 one-bit deltas, row m uses task m % 8.
"""
import os

import numpy as np
import pytest

import vkern
from vkern.bench_taskvec import apply_bytes, apply_data, delta_data, torch_apply_4bit, torch_delta_sign

SIZE = int(os.environ.get("VKERN_BENCH_SIZE", "4096"))
BASE, QTVS, COEFFS = apply_data(SIZE, SIZE)
DBASE, DQ = delta_data(SIZE, SIZE)
ROWS = {M: np.random.default_rng(M).standard_normal((M, SIZE), dtype=np.float32) for M in (1, 8, 64)}

try:
    import torch
except Exception:  # pragma: no cover
    torch = None


@pytest.fixture(autouse=True)
def _limits(machine_limits):
    return machine_limits


def _apply_info(benchmark, kind):
    benchmark.group = f"apply_task_vectors {SIZE}x{SIZE} T=4 4-bit g128"
    benchmark.extra_info.update(kind=kind, bytes=apply_bytes(BASE, QTVS))


def test_apply_reference(benchmark):
    _apply_info(benchmark, "reference")
    benchmark.pedantic(vkern.apply_task_vectors, args=(BASE, QTVS, COEFFS), kwargs=dict(backend="reference"),
                       rounds=1, iterations=1)


def test_apply_torch_dequantize_then_add(benchmark):
    if torch is None:
        pytest.skip("needs torch")
    _apply_info(benchmark, "peer")
    benchmark.pedantic(torch_apply_4bit(torch, BASE, QTVS, COEFFS), rounds=3, iterations=1)


def test_apply_numpy_copy(benchmark):
    """The floor: copying the base once (what a perfect one-pass merge costs, minus the codes)."""
    _apply_info(benchmark, "peer")
    out = np.empty_like(BASE)
    benchmark.extra_info["bytes"] = 2 * BASE.nbytes
    benchmark(np.copyto, out, BASE)


@pytest.mark.parametrize("mode", ["out", "inplace"])
def test_apply_vkern_cpu(benchmark, mode):
    if not vkern.available_backends("apply_task_vectors")["cpu"][0]:
        pytest.skip("cpu backend unavailable")
    _apply_info(benchmark, "vkern")
    out = np.empty_like(BASE) if mode == "out" else BASE.copy()
    base = BASE if mode == "out" else out
    benchmark(vkern.apply_task_vectors, base, QTVS, COEFFS, out=out, backend="cpu")


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_apply_vkern_gpu(benchmark, backend):
    if torch is None or not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if not vkern.available_backends("apply_task_vectors")[backend][0]:
        pytest.skip(f"{backend} backend unavailable")
    from vkern.taskvec import to_device

    benchmark.group = f"apply_task_vectors GPU {SIZE}x{SIZE}"
    benchmark.extra_info.update(kind="vkern", bytes=apply_bytes(BASE, QTVS))
    tb, tq = torch.from_numpy(BASE).cuda(), to_device(QTVS, "cuda")
    out = torch.empty_like(tb)

    def fn():
        vkern.apply_task_vectors(tb, tq, COEFFS, out=out, backend=backend)
        torch.cuda.synchronize()

    benchmark(fn)


def _delta_info(benchmark, kind, M):
    benchmark.group = f"delta_linear M={M} T=8 one-bit"
    benchmark.extra_info.update(kind=kind, bytes=DBASE.nbytes, flops=2.0 * M * SIZE * SIZE)


def _ids(M):
    return (np.arange(M) % len(DQ)).astype(np.int64)


@pytest.mark.parametrize("M", [1, 8, 64])
def test_delta_reference(benchmark, M):
    _delta_info(benchmark, "reference", M)
    benchmark.pedantic(vkern.delta_linear, args=(ROWS[M], DBASE, DQ), kwargs=dict(task_ids=_ids(M),
                       backend="reference"), rounds=1, iterations=1)


@pytest.mark.parametrize("M", [1, 8, 64])
def test_delta_torch_unpack_matmul(benchmark, M):
    if torch is None:
        pytest.skip("needs torch")
    _delta_info(benchmark, "peer", M)
    benchmark.pedantic(torch_delta_sign(torch, ROWS[M], DBASE, DQ, _ids(M)), rounds=2, iterations=1)


@pytest.mark.parametrize("M", [1, 8, 64])
def test_delta_torch_base_only(benchmark, M):
    """x @ base^T without any delta: the floor delta_linear is measured against (bar: 1.5x for 1-8 rows)."""
    if torch is None:
        pytest.skip("needs torch")
    _delta_info(benchmark, "peer", M)
    tx, tb = torch.from_numpy(ROWS[M]), torch.from_numpy(DBASE)
    benchmark(lambda: tx @ tb.T)


@pytest.mark.parametrize("M", [1, 8, 64])
def test_delta_vkern_cpu(benchmark, M):
    if not vkern.available_backends("delta_linear")["cpu"][0]:
        pytest.skip("cpu backend unavailable")
    _delta_info(benchmark, "vkern", M)
    benchmark(vkern.delta_linear, ROWS[M], DBASE, DQ, task_ids=_ids(M), backend="cpu")
