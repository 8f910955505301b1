"""backend="auto" picks the cpu backend for CPU data and the GPU backends (cuda, triton) only for GPU
tensors, also where TRITON_INTERPRET=1 (which conftest sets without a GPU) lets the Triton kernels
run on CPU tensors; naming backend="triton" still runs them there."""
from types import SimpleNamespace

import numpy as np
import pytest

import vkern
from vkern._backend import OPS, Backend, Op


def _toy():
    o = Op("toy")
    for name in ("cuda", "triton", "cpu", "reference"):
        o.register(Backend(name, lambda call: None, lambda call, name=name: name))
    return o


def test_auto_picks_gpu_backends_for_gpu_data_only():
    o = _toy()
    assert o.pick("auto", SimpleNamespace(device="cpu")).name == "cpu"
    assert o.pick("auto", SimpleNamespace(device="cuda")).name == "cuda"
    o.backends.pop("cuda")
    assert o.pick("auto", SimpleNamespace(device="cuda")).name == "triton"
    assert o.pick("triton", SimpleNamespace(device="cpu")).name == "triton"   # named: still runs
    o.backends.pop("cpu")
    assert o.pick("auto", SimpleNamespace(device="cpu")).name == "reference"
    o.backends.pop("reference")
    with pytest.raises(vkern.BackendUnavailable, match="GPU tensors only") as e:
        o.pick("auto", SimpleNamespace(device="cpu"))
    assert "no backend can run this call" in str(e.value)


def _cpu_torch_calls(torch):
    rng = np.random.default_rng(0)
    t = lambda *shape: torch.from_numpy(rng.standard_normal(shape).astype(np.float32))  # noqa: E731
    q, k = t(2, 4, 8), t(2, 2, 16, 8)
    tau = rng.standard_normal((8, 32)).astype(np.float32)
    qtv = vkern.taskvec.quantize(tau, bits=4)
    yield "maxsim", lambda b: vkern.maxsim(t(3, 8), t(10, 8), doc_offsets=torch.tensor([0, 4, 10]), backend=b)
    yield "loki_attention", lambda b: vkern.loki_attention(q, k, k, rank=4, topk=4, backend=b)
    yield "decode_attention", lambda b: vkern.decode_attention(q, k, k, backend=b)
    yield "attention_colsum", lambda b: vkern.vatp.attention_colsum(t(2, 4, 3, 8), k, backend=b)
    yield "value_l1", lambda b: vkern.vatp.value_l1(k, backend=b)
    yield "vatp_prune", lambda b: vkern.vatp_prune(k, k, t(2, 2, 16), budget=4, num_sink=1, num_recent=1, backend=b)
    yield "apply_task_vectors", lambda b: vkern.apply_task_vectors(t(8, 32), [qtv], [0.5], backend=b)
    yield "delta_linear", lambda b: vkern.delta_linear(t(3, 32), t(8, 32), [qtv], [0.5], backend=b)


def test_auto_runs_cpu_torch_tensors_on_the_cpu_backend_under_the_interpreter(monkeypatch):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("checks the interpreter setting of a machine without a GPU")
    from vkern import _ext

    if _ext.C is None:
        pytest.skip("the cpu backend is not built")
    ran = []
    for name, o in OPS.items():
        for b in ("cuda", "triton"):
            if b in o.backends:
                def refuse(call, b=b, name=name):
                    ran.append((name, b))
                    raise AssertionError(f"{name}: backend='auto' ran {b} on CPU tensors")
                monkeypatch.setattr(o.backends[b], "run", refuse)
    triton_ok = _ext.triton_reason() is None
    for name, call in _cpu_torch_calls(torch):
        call("auto")   # must not reach a GPU backend
        if triton_ok and "triton" in OPS[name].backends:   # ... which can run the call when named
            with pytest.raises(AssertionError, match="ran triton"):
                call("triton")
    assert all(b == "triton" for _, b in ran)
