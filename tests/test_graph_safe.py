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


def _fake_cuda_device(monkeypatch):
    """torch.cuda.device as a no-op context and a stream with handle 0: the CUDA wrappers run on meta tensors."""
    class Guard:
        def __init__(self, dev):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "device", Guard)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: SimpleNamespace(cuda_stream=0))


def test_cuda_paths_do_not_read_device_values(monkeypatch):
    calls = []
    fake_c = SimpleNamespace(loki_cuda_splits=lambda B, Hq, K: 2, loki_cuda=lambda *a: calls.append(a))
    monkeypatch.setattr(L._ext, "C", fake_c)

    _fake_cuda_device(monkeypatch)
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
    so its code is exercised here (the graph steps eagerly against the reference); the capture and
    multi-GPU parts need a GPU."""
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
    # 9 graph / grid / big-offset checks, 4 MaxSim gradient checks, 1 training-step check (+ its BENCH lines),
    # 5 retrieval-memory checks (int8 MaxSim, MUVERA)
    assert proc.stdout.count("PASS") == 19 and "0 failed" in proc.stdout and proc.stdout.count("BENCH") == 2


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


# ---- vatp_prune (and attention_colsum, the step before it) with seq_lens on the device

from vkern.ops import vatp as V  # noqa: E402
from vkern.reference import vatp as vref  # noqa: E402


class _Launches:
    """Stands in for a @triton.jit kernel: records kernel[grid](*args, **constexprs) and runs nothing."""

    def __init__(self, log, name):
        self.log, self.name = log, name

    def __getitem__(self, grid):
        return lambda *args, **kw: self.log.append((self.name, grid, args, kw))


def _meta_prune(monkeypatch, budget, mode, B=2, H=3, T=37, Dk=16, Dv=8):
    # meta tensors have no addresses (data_ptr 0): give each a distinct fake one so the overlap checks of
    # inplace / out= pass; they read metadata only, never values
    monkeypatch.setattr(V.A, "data_ptr", lambda x: id(x) << 24)
    k = torch.empty(B, H, T, Dk, device="meta", dtype=torch.float16)
    v = torch.empty(B, H, T, Dv, device="meta", dtype=torch.float16)
    scores = torch.empty(B, H, T, device="meta", dtype=torch.bfloat16)
    lens = torch.empty(B, device="meta", dtype=torch.int32)
    out = None
    if mode == "out":
        out = (torch.empty(B, H, T, Dk, device="meta", dtype=torch.float16),
               torch.empty(B, H, T, Dv, device="meta", dtype=torch.float16))
    return V._prepare_prune(k, v, scores, budget, 1, 2, lens, mode == "inplace", out)


@pytest.mark.parametrize("budget", [5, 0.3])
@pytest.mark.parametrize("mode", ["plain", "inplace", "out"])
def test_vatp_prune_triton_path_does_not_read_device_values(monkeypatch, budget, mode):
    """The wrapper and the real Triton launcher (kernels stubbed) on meta tensors: any host read raises."""
    needs("triton", "vatp_prune")
    kernels = V._ext.triton_kernels("vatp")
    log = []
    for name in ("_select_kernel", "_gather_kernel", "_compact_kernel"):
        monkeypatch.setattr(kernels, name, _Launches(log, name))
    call = _meta_prune(monkeypatch, budget, mode)
    assert call.host_lens is None and call.kept_lens is None
    assert call.kmax == vref.resolve_budget(budget, 37, 1, 2)   # the width at seq_len = T: host-known
    k_kept, v_kept, idx, kept = V._prune_triton(call)
    assert tuple(k_kept.shape) == (2, 3, call.kmax, 16) and tuple(v_kept.shape) == (2, 3, call.kmax, 8)
    assert tuple(idx.shape) == (2, 3, call.kmax) and idx.dtype == torch.int64
    assert kept.device.type == "meta" and kept.dtype == torch.int64 and tuple(kept.shape) == (2,)
    assert [e[0] for e in log] == ["_select_kernel"] + (["_compact_kernel"] * 2 if mode == "inplace" else
                                                         ["_gather_kernel"] * 2)
    select_args = log[0][2]
    assert all(a.device.type == "meta" for a in select_args[:4])   # scores, lengths, kept counts, indices
    assert select_args[1].dtype == select_args[2].dtype == torch.int64


@pytest.mark.parametrize("mode", ["plain", "inplace", "out"])
def test_vatp_prune_cuda_path_does_not_read_device_values(monkeypatch, mode):
    calls = []
    monkeypatch.setattr(V._ext, "C", SimpleNamespace(vatp_prune_cuda=lambda *a: calls.append(a),
                                                     vatp_colsum_cuda=lambda *a: calls.append(a)))

    _fake_cuda_device(monkeypatch)
    call = _meta_prune(monkeypatch, 0.5, mode)
    k_kept, v_kept, idx, kept = V._prune_cuda(call)
    assert tuple(k_kept.shape) == (2, 3, 18, 16) and tuple(idx.shape) == (2, 3, 18) and kept.device.type == "meta"
    assert len(calls) == 1 and calls[0][14] == 18   # kmax, from the budget at seq_len = T
    lens = torch.empty(2, device="meta", dtype=torch.int64)
    q, k = torch.empty(2, 6, 4, 16, device="meta"), torch.empty(2, 3, 37, 16, device="meta")
    assert tuple(V._colsum_cuda(V._prepare_colsum(q, k, True, lens, None)).shape) == (2, 3, 37)
    assert len(calls) == 2


def test_vatp_colsum_triton_path_does_not_read_device_values(monkeypatch):
    needs("triton", "attention_colsum")
    kernels = V._ext.triton_kernels("vatp")
    log = []
    for name in ("_rowstats_kernel", "_colsum_kernel"):
        monkeypatch.setattr(kernels, name, _Launches(log, name))
    lens = torch.empty(2, device="meta", dtype=torch.int32)
    q, k = torch.empty(2, 6, 4, 16, device="meta"), torch.empty(2, 3, 37, 16, device="meta")
    call = V._prepare_colsum(q, k, True, lens, None)
    assert call.host_lens is None
    assert tuple(V._colsum_triton(call).shape) == (2, 3, 37)
    assert [e[0] for e in log] == ["_rowstats_kernel", "_colsum_kernel"]
    assert log[0][2][2].device.type == "meta" and log[0][2][2].dtype == torch.int64


def test_device_kept_lengths_equal_the_reference_budget_at_every_length():
    lens = torch.arange(0, 40)
    for budget, ns, nr in itertools.product((1, 3, 7, 39, 10**6, 0.01, 0.3, 0.5, 0.77, 0.999, 1.0), (0, 2, 5),
                                            (0, 1, 9)):
        if isinstance(budget, int) and budget < max(1, ns + nr):
            continue
        want = [vref.resolve_budget(budget, int(L), ns, nr) for L in lens]
        assert V._device_kept(budget, lens, 39, ns, nr).tolist() == want, (budget, ns, nr)
    assert V._device_kept(2**62, lens, 39, 2**62, 2**62).tolist() == lens.tolist()   # no int64 overflow


def _device_lens_here(monkeypatch):
    """The device for the numeric checks: a GPU when there is one (the real path); else CPU tensors,
    with the device-lengths path forced (Triton interpreter)."""
    if torch.cuda.is_available():
        return "cuda"
    monkeypatch.setattr(V, "device_lens", lambda x: x is not None and not isinstance(x, np.ndarray))
    return "cpu"


@pytest.mark.parametrize("budget,num_sink,num_recent,mode", [(6, 2, 3, "plain"), (0.4, 1, 2, "inplace"),
                                                             (0.05, 0, 1, "out")])
def test_vatp_device_length_path_matches_the_reference_under_the_interpreter(monkeypatch, rng, budget, num_sink,
                                                                              num_recent, mode):
    needs("triton", "vatp_prune")
    dev = _device_lens_here(monkeypatch)
    B, H, T, Dk, Dv = 4, 2, 29, 16, 8
    k = rng.standard_normal((B, H, T, Dk)).astype(np.float32)
    v = rng.standard_normal((B, H, T, Dv)).astype(np.float32)
    scores = rng.standard_normal((B, H, T)).astype(np.float32)
    lens = np.array([29, 11, 0, 3])
    kmax = vref.resolve_budget(budget, T, num_sink, num_recent)
    want = V.vatp_prune(k, v, scores, budget=budget, num_sink=num_sink, num_recent=num_recent, seq_lens=lens,
                        backend="reference")
    tk, tv, ts = (torch.from_numpy(x.copy()).to(dev) for x in (k, v, scores))
    out = None
    if mode == "out":
        out = (torch.full((B, H, kmax + 2, Dk), 7.0, device=dev), torch.full((B, H, kmax + 2, Dv), 7.0, device=dev))
    got = V.vatp_prune(tk, tv, ts, budget=budget, num_sink=num_sink, num_recent=num_recent,
                       seq_lens=torch.from_numpy(lens).to(dev), inplace=mode == "inplace", out=out, backend="triton")
    got = [x.cpu().numpy() for x in got]
    w = want[2].shape[2]
    assert got[2].shape == (B, H, kmax) and kmax >= w
    np.testing.assert_array_equal(got[3], want[3])                       # kept_lens, resolved on the device
    np.testing.assert_array_equal(got[2][:, :, :w], want[2])
    assert (got[2][:, :, w:] == -1).all()
    for g, r, D in ((got[0], want[0], Dk), (got[1], want[1], Dv)):
        assert g.shape == (B, H, kmax, D)
        np.testing.assert_array_equal(g[:, :, :w], r)
        assert (g[:, :, w:] == 0).all()                                  # padded rows are zero
    if mode == "out":
        assert (out[0][:, :, kmax:].cpu().numpy() == 7.0).all()        # rows past kmax untouched


def test_vatp_device_lengths_out_of_range_are_clamped_not_read_out_of_bounds(monkeypatch, rng):
    needs("triton", "vatp_prune")
    dev = _device_lens_here(monkeypatch)
    B, H, T, D = 3, 1, 17, 4
    k = rng.standard_normal((B, H, T, D)).astype(np.float32)
    scores = rng.standard_normal((B, H, T)).astype(np.float32)
    tk, ts = torch.from_numpy(k).to(dev), torch.from_numpy(scores).to(dev)
    got = V.vatp_prune(tk, tk, ts, budget=0.5, num_sink=1, num_recent=1, seq_lens=torch.tensor([99, -4, 5]).to(dev),
                       backend="triton")
    want = V.vatp_prune(k, k, scores, budget=0.5, num_sink=1, num_recent=1, seq_lens=np.array([17, 0, 5]),
                        backend="reference")
    np.testing.assert_array_equal(got[3].cpu().numpy(), want[3])
    np.testing.assert_array_equal(got[2].cpu().numpy()[:, :, :want[2].shape[2]], want[2])
    colsum = V.attention_colsum(torch.from_numpy(k[:, :, :2].copy()).to(dev), tk,
                                seq_lens=torch.tensor([99, -4, 5]).to(dev), backend="triton")
    np.testing.assert_allclose(colsum.cpu().numpy(), V.attention_colsum(k[:, :, :2].copy(), k,
                                                                        seq_lens=np.array([17, 0, 5]),
                                                                        backend="reference"), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("causal", [True, False])
def test_vatp_colsum_device_length_path_matches_the_reference(monkeypatch, rng, causal):
    needs("triton", "attention_colsum")
    dev = _device_lens_here(monkeypatch)
    q = rng.standard_normal((3, 4, 5, 16)).astype(np.float32)
    k = rng.standard_normal((3, 2, 21, 16)).astype(np.float32)
    lens = np.array([21, 6, 0])
    got = V.attention_colsum(torch.from_numpy(q).to(dev), torch.from_numpy(k).to(dev), causal=causal,
                             seq_lens=torch.from_numpy(lens).to(dev), backend="triton")
    want = V.attention_colsum(q, k, causal=causal, seq_lens=lens, backend="reference")
    np.testing.assert_allclose(got.cpu().numpy(), want, rtol=1e-5, atol=1e-6)


def test_vatp_prune_width_is_static_in_the_fake_op_without_host_lengths():
    import vkern._torch.maxsim  # noqa: F401
    from vkern._torch import vatp as _torch_ops_vatp
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        k = torch.empty(2, 3, 37, 16, device="meta")
        s = torch.empty(2, 3, 37, device="meta")
        lens = torch.empty(2, dtype=torch.int64, device="meta")
        for budget in (5, 0.3):
            for inplace in (False, True):
                res = _torch_ops_vatp.call_vatp_prune(k, k, s, budget, 1, 2, lens, inplace, "auto")
                assert tuple(res[2].shape) == (2, 3, vref.resolve_budget(budget, 37, 1, 2)), (budget, inplace)
