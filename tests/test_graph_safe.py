"""CUDA-graph-safe decode: with seq_lens on the device, loki_attention and decode_attention do no host
synchronisation in their GPU paths (output shapes come from host-known arguments only).

No GPU here, so the GPU paths run on `meta` tensors, which hold no data: any attempt to read a value
on the host (.item(), .cpu(), .tolist(), .to("cpu"), numpy, bool()) raises. The kernels are stubbed
(shapes only); their numerics on device-resident lengths are checked under the Triton interpreter
below, with the device-lengths path forced for CPU tensors."""
import itertools
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import needs  # noqa: E402
from vkern.ops import loki as L  # noqa: E402
from vkern.reference import loki as ref  # noqa: E402


def test_budget_check_from_two_lengths_equals_every_length():
    for T, forced in itertools.product(range(1, 14), range(0, 16)):
        for topk in list(range(1, 16)) + [0.05, 0.3, 0.5, 0.75, 0.9, 0.999, 1.0]:
            every = all(ref.resolve_budget(topk, n) >= min(n, forced) for n in range(1, T + 1))
            assert L.budget_fits_every_length(topk, T, forced) == every, (T, forced, topk)


def _meta_call(sparse, topk=5, num_sink=1, num_recent=2, gqa="per_head"):
    B, Hq, H, T, D = 2, 4, 2, 37, 16
    q = torch.empty(B, Hq, D, device="meta")
    k = torch.empty(B, H, T, D, device="meta", dtype=torch.float16)
    lens = torch.empty(B, device="meta", dtype=torch.int32)
    if sparse:
        return L._prepare_loki(q, k, k, lens, 8, topk, num_sink, num_recent, gqa, None, True)
    return L._prepare_attn(q, k, k, lens, None)


@pytest.mark.parametrize("topk", [5, 0.25])
@pytest.mark.parametrize("gqa", ["per_head", "shared"])
def test_triton_paths_do_not_read_device_values(monkeypatch, topk, gqa):
    seen = {}

    def loki_attention(q, k, v, lens, budgets, K, rank, num_sink, num_recent, shared, scale, kp=None):
        seen.update(lens=lens, budgets=budgets, K=K)
        NL = k.shape[1] if shared else q.shape[1]
        return torch.empty(q.shape, device=q.device), torch.empty(q.shape[0], NL, K, device=q.device,
                                                                  dtype=torch.int32)

    def decode_attention(q, k, v, lens, scale):
        seen.update(lens=lens)
        return torch.empty(q.shape, device=q.device)

    stub = SimpleNamespace(loki_attention=loki_attention, decode_attention=decode_attention)
    monkeypatch.setattr(L._ext, "triton_kernels", lambda name: stub)
    call = _meta_call(True, topk=topk, gqa=gqa, num_sink=1 if topk == 5 else 0, num_recent=2 if topk == 5 else 1)
    assert call.host_lens is None and call.budgets is None
    assert call.K == ref.resolve_budget(topk, 37)          # the width at seq_len = T: host-known
    out, idx = L._triton_loki(call)
    assert out.device.type == "meta" and tuple(idx.shape) == (2, 4, call.K) and idx.dtype == torch.int64
    assert seen["budgets"].device.type == "meta" and seen["lens"].dtype == torch.int64
    out = L._triton_dense(_meta_call(False))
    assert tuple(out.shape) == (2, 4, 16)


def test_cuda_paths_do_not_read_device_values(monkeypatch):
    calls = []
    fake_c = SimpleNamespace(loki_cuda_splits=lambda B, Hq, K: 2, loki_cuda=lambda *a: calls.append(a))
    monkeypatch.setattr(L._ext, "C", fake_c)

    class Guard:
        def __init__(self, dev):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "device", Guard)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: SimpleNamespace(cuda_stream=0))
    out, idx = L._cuda_attention(_meta_call(True), True)
    assert tuple(idx.shape) == (2, 4, 5) and out.device.type == "meta"
    assert tuple(L._cuda_attention(_meta_call(False), False).shape) == (2, 4, 16)
    assert len(calls) == 2


def test_device_lengths_refuse_a_budget_that_misses_the_forced_tokens_at_some_length():
    with pytest.raises(ValueError, match="every length"):
        _meta_call(True, topk=2, num_sink=2, num_recent=2)    # budget 2 < 4 forced once seq_len > 2
    assert _meta_call(True, topk=4, num_sink=2, num_recent=2).K == 4
    with pytest.raises(ValueError, match="every length"):
        _meta_call(True, topk=0.5, num_sink=1, num_recent=1)  # seq_len 2 keeps ceil(0.5 * 2) = 1 < 2 forced
    assert _meta_call(True, topk=0.5, num_sink=0, num_recent=1).K == 19
    # host lengths are checked value by value as before (the same budget fits these lengths)
    q = np.zeros((1, 1, 4), np.float32)
    k = np.zeros((1, 1, 9, 4), np.float32)
    L._prepare_loki(q, k, k, np.array([2]), 2, 2, 2, 2, "per_head", None, False)


@pytest.mark.parametrize("topk,num_sink", [(3, 1), (0.4, 0)])
@pytest.mark.parametrize("gqa", ["per_head", "shared"])
def test_device_length_path_matches_the_reference_under_the_interpreter(monkeypatch, rng, topk, num_sink, gqa):
    needs("triton", "loki_attention")
    monkeypatch.setattr(L, "device_lens", lambda x: x is not None and not isinstance(x, np.ndarray))
    B, Hq, H, T, D = 3, 4, 2, 23, 16
    q = rng.standard_normal((B, Hq, D)).astype(np.float32)
    k = rng.standard_normal((B, H, T, D)).astype(np.float32)
    v = rng.standard_normal((B, H, T, D)).astype(np.float32)
    lens = np.array([23, 7, 1])
    t = [torch.from_numpy(x) for x in (q, k, v)]
    out, idx = L.loki_attention(*t, rank=8, topk=topk, seq_lens=torch.from_numpy(lens), num_sink=num_sink, num_recent=1,
                                gqa=gqa, return_indices=True, backend="triton")
    ref_out, ref_idx = L.loki_attention(q, k, v, rank=8, topk=topk, seq_lens=lens, num_sink=num_sink, num_recent=1, gqa=gqa,
                                        return_indices=True, backend="reference")
    assert idx.shape[2] == ref.resolve_budget(topk, T) >= ref_idx.shape[2]
    np.testing.assert_array_equal(idx.numpy()[:, :, :ref_idx.shape[2]], ref_idx)
    assert (idx.numpy()[:, :, ref_idx.shape[2]:] == -1).all()
    np.testing.assert_allclose(out.numpy(), ref_out, rtol=1e-5, atol=1e-5)
    dense = L.decode_attention(*t, seq_lens=torch.from_numpy(lens), backend="triton")
    np.testing.assert_allclose(dense.numpy(), L.decode_attention(q, k, v, seq_lens=lens, backend="reference"),
                               rtol=1e-5, atol=1e-5)
    # lengths past [1, T] are not checked on the host (that would sync) but never read out of bounds
    bad = L.decode_attention(*t, seq_lens=torch.tensor([99, 0, 5]), backend="triton")
    np.testing.assert_allclose(bad.numpy(), L.decode_attention(q, k, v, seq_lens=np.array([23, 1, 5]),
                                                               backend="reference"), rtol=1e-5, atol=1e-5)


def test_gpu_checks_script_runs_on_tiny_shapes():
    """benchmarks/gpu_checks.py (run on GPU nodes by gpu_check.sh) on tiny shapes through the interpreter,
    so its code is exercised here; the CUDA-graph and multi-GPU parts need a GPU."""
    needs("triton", "loki_attention")
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "gpu_checks.py"), "--small"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    # 6 grid / big-offset checks, 4 MaxSim gradient checks, 1 training-step check (+ its BENCH lines),
    # 5 retrieval-memory checks (int8 MaxSim, MUVERA)
    assert proc.stdout.count("PASS") == 16 and "0 failed" in proc.stdout and proc.stdout.count("BENCH") == 2


def test_index_width_is_static_in_the_fake_op_without_host_lengths(rng):
    """torch.compile (and so CUDA-graph modes of it) sees a static index width when seq_lens is absent or
    on a GPU: the budget at seq_len = T; opcheck compares the fake shape with a real call."""
    import vkern._torch.maxsim  # noqa: F401
    from vkern._torch import loki as _torch_ops_loki

    q = torch.from_numpy(rng.standard_normal((2, 4, 8)).astype(np.float32))
    k = torch.from_numpy(rng.standard_normal((2, 2, 9, 8)).astype(np.float32))
    torch.library.opcheck(torch.ops.vkern.loki_attention_indices.default,
                          (q, k, k, None, 3, 4, 0.0, 1, 1, "per_head", 0.35, "auto"),
                          test_utils=("test_schema", "test_faketensor"))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        fq, fk = torch.empty(2, 4, 8, device="meta"), torch.empty(2, 2, 9, 8, device="meta")
        lens = torch.empty(2, dtype=torch.int64, device="meta")
        _, idx = _torch_ops_loki.loki_attention_indices_op(fq, fk, fk, lens, 3, 0, 0.5, 0, 1, "shared", 0.35, "auto")
    assert tuple(idx.shape) == (2, 4, 5)
