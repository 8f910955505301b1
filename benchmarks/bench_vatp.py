"""VATP benchmarks (pytest-benchmark): vkern beside the NumPy reference and the
torch formulations, ratios and % of the machine's copy bandwidth printed at
the end (benchmarks/conftest.py).

    pytest benchmarks/bench_vatp.py                 # all
    pytest benchmarks/bench_vatp.py -k prune        # pruning only
    VKERN_BENCH_VATP_T=8192 pytest ...              # a smaller cache

Workloads (the issue's): vatp_prune with B=1, H_kv=8, T=32768, D=128, keep
50%, scores given, float32 and bfloat16 caches; attention_colsum with
Tq=T=4096, Hq=32, H_kv=8, D=128, causal (plus its peak extra memory beside
eager torch's, each measured in a fresh process).
"""
import os

import numpy as np
import pytest

import vkern
from conftest import THREADS  # vkern, torch and the BLAS are limited to it there
from vkern.bench_vatp import eager_colsum, make_cache, peak_extra_mb, torch_prune

torch = pytest.importorskip("torch")

B, H, D = 1, 8, 128
T = int(os.environ.get("VKERN_BENCH_VATP_T", "32768"))
N_KEEP = T // 2
TC = int(os.environ.get("VKERN_BENCH_VATP_TC", "4096"))   # colsum Tq = T
HQ = 32
K, V, SCORES = make_cache(B, H, T, D)
CPU_OK = vkern.available_backends("vatp_prune")["cpu"][0]


@pytest.fixture(autouse=True)
def _limits(machine_limits):
    return machine_limits


def _cache(dtype):
    dt = getattr(torch, dtype)
    return torch.from_numpy(K).to(dt), torch.from_numpy(V).to(dt), torch.from_numpy(SCORES)


def _prune_info(benchmark, kind, dtype):
    benchmark.group = f"vatp_prune T={T} keep 50% {dtype}"
    es = 4 if dtype == "float32" else 2
    benchmark.extra_info.update(kind=kind, bytes=2.0 * 2 * B * H * N_KEEP * D * es)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_prune_reference(benchmark, dtype):
    _prune_info(benchmark, "reference", dtype)
    k, v, s = (K, V, SCORES) if dtype == "float32" else _cache(dtype)
    benchmark.pedantic(vkern.vatp_prune, args=(k, v, s), kwargs=dict(budget=N_KEEP, backend="reference"),
                       rounds=2, iterations=1)


def _bufs(k):
    return torch.empty((B, H, N_KEEP, D), dtype=k.dtype), torch.empty((B, H, N_KEEP, D), dtype=k.dtype)


@pytest.mark.parametrize("reuse", [False, True], ids=["fresh", "out"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_prune_torch_topk_sort_gather(benchmark, dtype, reuse):
    _prune_info(benchmark, "peer", dtype)
    k, v, s = _cache(dtype)
    benchmark(torch_prune, k, v, s, N_KEEP, out=_bufs(k) if reuse else None)


@pytest.mark.skipif(not CPU_OK, reason="cpu backend unavailable")
@pytest.mark.parametrize("mode", ["out_of_place_fresh", "inplace", "out"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_prune_vkern_cpu(benchmark, dtype, mode):
    """fresh: new outputs per call (first-touch page faults inside the call); out: caller-provided
    buffers reused across calls; inplace: compaction inside K and V."""
    _prune_info(benchmark, "vkern", dtype)
    k, v, s = _cache(dtype)
    if mode == "inplace":   # re-pruning the same buffer with the same scores repeats the same moves
        k, v = k.clone(), v.clone()
    benchmark(vkern.vatp_prune, k, v, s, budget=N_KEEP, inplace=mode == "inplace",
              out=_bufs(k) if mode == "out" else None, backend="cpu")


def _colsum_inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, HQ, TC, D, generator=g), torch.randn(1, H, TC, D, generator=g)


def _colsum_info(benchmark, kind):
    benchmark.group = f"attention_colsum Tq=T={TC} causal"
    benchmark.extra_info.update(kind=kind, flops=2.0 * HQ * D * TC * TC / 2)   # QK^T over the causal half, once


@pytest.mark.skipif(not CPU_OK, reason="cpu backend unavailable")
def test_colsum_vkern_cpu(benchmark):
    _colsum_info(benchmark, "vkern")
    q, k = _colsum_inputs()
    benchmark.extra_info["peak_extra_mb"] = peak_extra_mb("vkern", TC, TC, HQ, H, D, THREADS)
    want = eager_colsum(q[:, :, -256:], k[:, :, :TC])   # spot check on the last rows: same numbers
    got = vkern.vatp.attention_colsum(q[:, :, -256:], k, backend="cpu")
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-4, atol=1e-4)
    benchmark.pedantic(vkern.vatp.attention_colsum, args=(q, k), kwargs=dict(backend="cpu"), rounds=3, iterations=1)
    print(f"\nattention_colsum peak extra RSS: vkern {benchmark.extra_info['peak_extra_mb']:.0f} MB")


def test_colsum_torch_eager(benchmark):
    _colsum_info(benchmark, "peer")
    q, k = _colsum_inputs()
    benchmark.extra_info["peak_extra_mb"] = peak_extra_mb("torch", TC, TC, HQ, H, D, THREADS)
    benchmark.pedantic(eager_colsum, args=(q, k), rounds=2, iterations=1)
    print(f"\nattention_colsum peak extra RSS: eager torch {benchmark.extra_info['peak_extra_mb']:.0f} MB")
