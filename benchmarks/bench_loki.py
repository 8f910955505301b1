"""Loki decode-step benchmarks (pytest-benchmark): vkern loki_attention and
decode_attention beside torch SDPA and the NumPy reference, one session.

    pytest benchmarks/bench_loki.py                 # all; ratios printed at the end
    pytest benchmarks/bench_loki.py -k bfloat16     # the bf16 cache only
    VKERN_BENCH_LOKI_T=8192 pytest benchmarks/bench_loki.py   # a shorter cache

Workload (the issue's): B = 1, Hq = 32, H_kv = 8, D = 128, T = 32,768, rank = 32,
topk = T/8. ``extra_info["bytes"]`` is what each contender must read (dense:
all of K and V; Loki: the key rank-prefixes plus the kept rows, per_head
counting the union over a group), so "% copy BW" is bytes moved per second
against the copy bandwidth measured in the same session. In each group the
peer is torch SDPA, so "x best peer" is the speedup over it.
"""
import os

import numpy as np
import pytest

import vkern
from vkern.bench_loki import B, D, HKV, RANK, decode_data, loki_bytes

torch = pytest.importorskip("torch")

T = int(os.environ.get("VKERN_BENCH_LOKI_T", "32768"))
TOPK = T // 8

_Q, _K, _V = decode_data(T)
_DATA = {}


def data(dtype):
    if dtype not in _DATA:
        q, k, v = (torch.from_numpy(a) for a in (_Q, _K, _V))
        if dtype == "bfloat16":
            q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
        _DATA[dtype] = (q, k, v)
    return _DATA[dtype]


def elem(dtype):
    return 4 if dtype == "float32" else 2


def dense_bytes(dtype):
    return 2 * B * HKV * T * D * elem(dtype)


@pytest.fixture(autouse=True)
def _limits(machine_limits):
    return machine_limits


DTYPES = ["float32", "bfloat16"]


@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_sdpa(benchmark, dtype):
    benchmark.group = f"loki decode {dtype}"
    benchmark.extra_info.update(kind="peer", bytes=dense_bytes(dtype))
    q, k, v = data(dtype)
    benchmark.pedantic(torch.nn.functional.scaled_dot_product_attention, args=(q[:, :, None], k, v),
                       kwargs=dict(enable_gqa=True), rounds=5, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_loki_shared(benchmark, dtype):
    benchmark.group = f"loki decode {dtype}"
    benchmark.extra_info.update(kind="reference")
    benchmark.pedantic(vkern.loki_attention, args=data(dtype), kwargs=dict(rank=RANK, topk=TOPK, gqa="shared",
                                                                          backend="reference"),
                       rounds=1, iterations=1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_vkern_decode_attention(benchmark, dtype):
    if not vkern.available_backends("decode_attention")["cpu"][0]:
        pytest.skip("cpu backend unavailable")
    benchmark.group = f"loki decode {dtype}"
    benchmark.extra_info.update(kind="vkern", bytes=dense_bytes(dtype))
    benchmark(vkern.decode_attention, *data(dtype), backend="cpu")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gqa", ["shared", "per_head"])
@pytest.mark.parametrize("prefix", [False, True], ids=["k_rows", "k_prefix"])
def test_vkern_loki(benchmark, dtype, gqa, prefix):
    if not vkern.available_backends("loki_attention")["cpu"][0]:
        pytest.skip("cpu backend unavailable")
    benchmark.group = f"loki decode {dtype}"
    args = data(dtype)
    kw = dict(rank=RANK, topk=TOPK, gqa=gqa, backend="cpu")
    if prefix:  # the approximate pass reads a separate contiguous copy of the first RANK key dims
        kw["k_prefix"] = vkern.loki.key_prefix(args[1], RANK)
    _, idx = vkern.loki_attention(*args, return_indices=True, **kw)
    benchmark.extra_info.update(kind="vkern", bytes=loki_bytes(np.asarray(idx), T, elem(dtype), gqa))
    benchmark(vkern.loki_attention, *args, **kw)
