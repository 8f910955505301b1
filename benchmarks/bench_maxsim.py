"""MaxSim benchmarks (pytest-benchmark): vkern backends beside the NumPy
formulations and maxsim-cpu, on ColBERT-shaped data.

    pytest benchmarks/bench_maxsim.py            # all, ratios printed at the end
    pytest benchmarks/bench_maxsim.py -k batch   # the 16-query batch only

Workload (the issue's): a 32 x 128 float32 query against 1,000 documents of
uniformly 64-300 tokens (packed, ~180k tokens, ~92 MB), and 16 such queries.
"""
import os

import numpy as np
import pytest

import vkern
from vkern.bench_maxsim import colbert_like, numpy_flat_gemm

N_DOCS = int(os.environ.get("VKERN_BENCH_DOCS", "1000"))
QUERIES, DOCS, OFFSETS = colbert_like(N_DOCS, 16)
T, D = DOCS.shape
DOCS_LIST = [DOCS[OFFSETS[i]:OFFSETS[i + 1]] for i in range(N_DOCS)]

try:
    import torch
except Exception:  # pragma: no cover
    torch = None


def _info(benchmark, kind, B):
    benchmark.extra_info.update(kind=kind, bytes=DOCS.nbytes, flops=2.0 * B * 32 * D * T)


@pytest.fixture(autouse=True)
def _limits(machine_limits):
    return machine_limits


def _queries(B):
    return QUERIES[0] if B == 1 else QUERIES[:B]


@pytest.mark.parametrize("B", [1, 16], ids=["one", "batch"])
def test_reference(benchmark, B):
    benchmark.group = f"maxsim B={B}"
    _info(benchmark, "reference", B)
    benchmark.pedantic(vkern.maxsim, args=(_queries(B), DOCS), kwargs=dict(doc_offsets=OFFSETS, backend="reference"),
                       rounds=2, iterations=1)


@pytest.mark.parametrize("B", [1, 16], ids=["one", "batch"])
def test_numpy_flat_gemm(benchmark, B):
    benchmark.group = f"maxsim B={B}"
    _info(benchmark, "peer", B)
    q = QUERIES[:B]
    benchmark(lambda: [numpy_flat_gemm(q[b], DOCS, OFFSETS) for b in range(B)])


@pytest.mark.parametrize("B", [1, 16], ids=["one", "batch"])
def test_maxsim_cpu_peer(benchmark, B):
    maxsim_cpu = pytest.importorskip("maxsim_cpu")
    benchmark.group = f"maxsim B={B}"
    _info(benchmark, "peer", B)
    q = QUERIES[:B]
    benchmark(lambda: [maxsim_cpu.maxsim_scores_variable(q[b], DOCS_LIST) for b in range(B)])


@pytest.mark.parametrize("B", [1, 16], ids=["one", "batch"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_vkern_cpu(benchmark, B, dtype):
    if not vkern.available_backends("maxsim")["cpu"][0]:
        pytest.skip("cpu backend unavailable")
    benchmark.group = f"maxsim B={B}"
    _info(benchmark, "vkern", B)
    if dtype == "bfloat16":
        if torch is None:
            pytest.skip("bf16 inputs need torch")
        q, d, o = torch.from_numpy(np.ascontiguousarray(_queries(B))), torch.from_numpy(DOCS).bfloat16(), \
            torch.from_numpy(OFFSETS)
    else:
        q, d, o = _queries(B), DOCS.astype(dtype), OFFSETS
    benchmark.extra_info["bytes"] = DOCS.nbytes // (1 if dtype == "float32" else 2)
    benchmark(vkern.maxsim, q, d, doc_offsets=o, backend="cpu")


@pytest.mark.parametrize("B", [1, 16], ids=["one", "batch"])
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_vkern_gpu(benchmark, B, backend, dtype):
    if torch is None or not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if not vkern.available_backends("maxsim")[backend][0]:
        pytest.skip(f"{backend} backend unavailable")
    benchmark.group = f"maxsim GPU B={B}"
    _info(benchmark, "vkern", B)
    q = torch.from_numpy(np.ascontiguousarray(_queries(B))).cuda().to(getattr(torch, dtype))
    d = torch.from_numpy(DOCS).cuda().to(getattr(torch, dtype))
    o = torch.from_numpy(OFFSETS).cuda()

    def fn():
        vkern.maxsim(q, d, doc_offsets=o, backend=backend)
        torch.cuda.synchronize()

    benchmark(fn)


@pytest.mark.parametrize("B", [1, 16], ids=["one", "batch"])
def test_torch_gpu_flat(benchmark, B):
    if torch is None or not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    benchmark.group = f"maxsim GPU B={B}"
    _info(benchmark, "peer", B)
    q = torch.from_numpy(np.ascontiguousarray(QUERIES[:B])).cuda()
    d = torch.from_numpy(DOCS).cuda()
    lens = torch.from_numpy(np.diff(OFFSETS)).cuda()

    def fn():
        sims = torch.einsum("bqd,td->bqt", q, d).reshape(-1, T)
        torch.segment_reduce(sims.T, "max", lengths=lens, axis=0).reshape(-1, B, 32).sum(-1)
        torch.cuda.synchronize()

    benchmark(fn)
