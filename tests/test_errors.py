"""What a newcomer sees on the two most common mistakes: asking for a backend that cannot run
the call, and passing float64 (NumPy's default, what a Python list becomes)."""
import re

import numpy as np
import pytest

import vkern
from vkern import taskvec


def test_unavailable_backend_message_says_cannot():
    q = np.zeros((4, 8), np.float32)
    d = np.zeros((10, 8), np.float32)
    with pytest.raises(vkern.BackendUnavailable) as e:
        vkern.maxsim(q, d, doc_offsets=np.array([0, 10]), backend="cuda")  # NumPy arrays: never cuda
    msg = str(e.value)
    assert "backend 'cuda' cannot run this call" in msg
    assert not re.search(r"(?<!not )\bcan run this call", msg)
    for name in ("cuda", "triton", "cpu", "reference"):  # every backend with its reason
        assert re.search(rf"^  {name}: ", msg, re.M), msg


def test_no_backend_message_says_cannot(monkeypatch):
    from vkern._backend import Backend, Op

    o = Op("toy")
    o.register(Backend("reference", lambda call: "never", lambda call: None))
    with pytest.raises(vkern.BackendUnavailable, match="no backend can run this call"):
        o.pick("auto", "call")


rng = np.random.default_rng(0)
f64 = lambda *shape: rng.standard_normal(shape)  # noqa: E731  float64, as NumPy makes them
f32 = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731


def _float64_calls():
    B, Hq, Hkv, T, D = 1, 2, 1, 16, 8
    k, v = f32(B, Hkv, T, D), f32(B, Hkv, T, D)
    yield "queries", lambda: vkern.maxsim(f64(4, D), f32(10, D), doc_offsets=np.array([0, 10]))
    yield "docs", lambda: vkern.maxsim(f32(4, D), f64(10, D), doc_offsets=np.array([0, 10]))
    yield "q", lambda: vkern.loki_attention(f64(B, Hq, D), k, v, rank=4, topk=4)
    yield "k_cache", lambda: vkern.decode_attention(f32(B, Hq, D), f64(B, Hkv, T, D), v)
    yield "q", lambda: vkern.vatp.attention_colsum(f64(B, Hq, 4, D), k)
    yield "v", lambda: vkern.vatp.value_l1(f64(B, Hkv, T, D))
    yield "k", lambda: vkern.vatp_prune(f64(B, Hkv, T, D), v, f32(B, Hkv, T), budget=8)
    yield "base", lambda: vkern.apply_task_vectors(f64(8, 32), [taskvec.quantize(f32(8, 32), bits=4)], [1.0])
    yield "x", lambda: vkern.delta_linear(f64(2, 32), f32(8, 32), [taskvec.quantize(f32(8, 32), bits=4)])
    yield "tau", lambda: taskvec.quantize(f64(8, 32), bits=4)
    yield "list input", lambda: vkern.maxsim([[0.5] * D] * 4, f32(10, D), doc_offsets=np.array([0, 10]))


@pytest.mark.parametrize("name,call", list(_float64_calls()), ids=[n for n, _ in _float64_calls()])
def test_float64_refused_with_the_fix(name, call):
    with pytest.raises(TypeError) as e:
        call()
    msg = str(e.value)
    assert "float64" in msg and ".astype(np.float32)" in msg and ".float()" in msg, msg
    if name != "list input":
        assert msg.startswith(f"{name}: "), msg  # names the argument
    else:
        assert msg.startswith("queries: "), msg


def test_float64_torch_names_float():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match=r"queries\.float\(\)"):
        vkern.maxsim(torch.zeros(4, 8, dtype=torch.float64), torch.zeros(10, 8), doc_offsets=torch.tensor([0, 10]))


def test_the_named_fix_works():
    q, d = f64(4, 8), f64(10, 8)
    got = vkern.maxsim(q.astype(np.float32), d.astype(np.float32), doc_offsets=np.array([0, 10]))
    want = (q @ d.T).max(axis=1).sum()
    np.testing.assert_allclose(got, [want], rtol=1e-4)


def _padded_ops():
    """Every op that takes padded docs [N, Ld, D] with doc_lengths [N]: name -> call(docs, lengths)."""
    from vkern import muvera

    q = f32(4, 8)
    cfg = muvera.MuveraConfig(dim=8, num_repetitions=2, num_simhash_projections=2, seed=1)
    return {
        "maxsim": lambda d, ln: vkern.maxsim(q, d, doc_lengths=ln, backend="cpu"),
        "pool_tokens": lambda d, ln: vkern.pool_tokens(d, doc_lengths=ln, pool_factor=2),
        "quantize_docs": lambda d, ln: vkern.quantize_docs(d, doc_lengths=ln),
        "muvera.encode_documents": lambda d, ln: muvera.encode_documents(d, cfg, doc_lengths=ln),
    }


@pytest.mark.parametrize("bad, exc, pattern", [
    (np.array([2.0, 3.0, 1.0]), TypeError, r"^doc_lengths: expected an integer array, got float64$"),
    (np.array([2, 3]), ValueError, r"^doc_lengths: expected shape \(3,\) \(one per document\), got \(2,\)$"),
    (np.array([[2, 3, 1]]), ValueError, r"^doc_lengths: expected shape \(3,\) \(one per document\), got \(1, 3\)$"),
    (np.array([2, 6, 1]), ValueError, r"^doc_lengths: every length must be in \[0, Ld=5\], got min=1, max=6$"),
    (np.array([2, -1, 1]), ValueError, r"^doc_lengths: every length must be in \[0, Ld=5\], got min=-1, max=2$"),
])
@pytest.mark.parametrize("op", sorted(_padded_ops()))
def test_padded_doc_lengths_checked_alike(op, bad, exc, pattern):
    # One check (vkern._arrays.padded_lengths) for every op: same type, same message, before any kernel.
    docs = f32(3, 5, 8)
    with pytest.raises(exc, match=pattern):
        _padded_ops()[op](docs, bad)


@pytest.mark.parametrize("op", sorted(_padded_ops()))
def test_padded_doc_lengths_of_another_kind_refused(op):
    torch = pytest.importorskip("torch")
    docs = f32(3, 5, 8)
    with pytest.raises(TypeError, match="mixed array kinds"):
        _padded_ops()[op](docs, torch.tensor([2, 3, 1]))


@pytest.mark.parametrize("op", sorted(_padded_ops()))
def test_padded_doc_lengths_accepted_alike(op):
    # The good cases the check must let through: int32 and int64, zero and full lengths.
    docs = f32(3, 5, 8)
    for ln in (np.array([0, 5, 2], np.int32), np.array([5, 5, 5], np.int64), None):
        _padded_ops()[op](docs, ln)
