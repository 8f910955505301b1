"""Empty sizes (issue 11, defects 5 and 6): empty in -> empty (or all-zero) out on every backend,
the same as the reference, for NumPy and torch inputs alike (an empty torch tensor's data_ptr()
is 0, which the bindings used to refuse); the sizes no op can take are refused by validation with
the same ValueError on every backend."""
import numpy as np
import pytest
from conftest import HAVE_CUDA, HAVE_TORCH, host, needs

import vkern
from vkern import taskvec

if HAVE_TORCH:
    import torch

BACKENDS = ("reference", "cpu", "triton", "cuda")


def _mk(backend, lib):
    """Array maker for (backend, lib): NumPy arrays, or torch tensors on the backend's device."""
    if lib == "numpy":
        if backend not in ("reference", "cpu"):
            pytest.skip(f"{backend} takes torch tensors")
        return lambda a: np.asarray(a)
    if not HAVE_TORCH:
        pytest.skip("needs torch")
    dev = "cuda" if backend == "cuda" or (backend == "triton" and HAVE_CUDA) else "cpu"
    return lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(dev)


def _z(*shape):
    return np.zeros(shape, np.float32)


def _r(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _off(*xs):
    return np.array(xs, np.int64)


# name -> (op for needs(), call(mk, backend) -> result)
CASES = {
    # defect 5: the issue's reproducers
    "maxsim-packed-T0": ("maxsim", lambda m, be: vkern.maxsim(m(_z(2, 4)), m(_z(0, 4)), doc_offsets=m(_off(0)),
                                                              backend=be)),
    "maxsim-packed-T0-N2": ("maxsim", lambda m, be: vkern.maxsim(m(_r(2, 4)), m(_z(0, 4)), doc_offsets=m(_off(0, 0, 0)),
                                                                 backend=be)),
    "maxsim-B0": ("maxsim", lambda m, be: vkern.maxsim(m(_z(0, 2, 4)), m(_r(5, 4)), doc_offsets=m(_off(0, 2, 5)),
                                                       backend=be)),
    "maxsim-B0-topk": ("maxsim", lambda m, be: vkern.maxsim(m(_z(0, 2, 4)), m(_r(5, 4)), doc_offsets=m(_off(0, 2, 5)),
                                                            topk=1, backend=be)),
    "maxsim-N0-topk": ("maxsim", lambda m, be: vkern.maxsim(m(_r(2, 4)), m(_z(0, 4)), doc_offsets=m(_off(0)), topk=3,
                                                            backend=be)),
    "maxsim-padded-N0": ("maxsim", lambda m, be: vkern.maxsim(m(_r(2, 4)), m(_z(0, 3, 4)), backend=be)),
    "maxsim-padded-B0": ("maxsim", lambda m, be: vkern.maxsim(m(_z(0, 2, 4)), m(_r(2, 3, 4)), backend=be)),
    "maxsim-Lq0": ("maxsim", lambda m, be: vkern.maxsim(m(_z(2, 0, 4)), m(_r(5, 4)), doc_offsets=m(_off(0, 0, 5)),
                                                        backend=be)),
    # defect 6: an empty list of documents takes the queries' kind
    "maxsim-list-empty": ("maxsim", lambda m, be: vkern.maxsim(m(_r(2, 4)), [], backend=be)),
    "maxsim-list-empty-batched": ("maxsim", lambda m, be: vkern.maxsim(m(_r(3, 2, 4)), [], backend=be)),
    "maxsim-list-B0": ("maxsim", lambda m, be: vkern.maxsim(m(_z(0, 2, 4)), [m(_r(3, 4))], backend=be)),
    # attention_colsum: B = 0 (defect 5), T = 0, Hq = 0, Tq = 0 (defect 6), seq_lens all 0
    "colsum-B0": ("attention_colsum", lambda m, be: vkern.vatp.attention_colsum(m(_z(0, 2, 3, 4)), m(_z(0, 1, 5, 4)),
                                                                                backend=be)),
    "colsum-T0": ("attention_colsum", lambda m, be: vkern.vatp.attention_colsum(m(_r(1, 2, 3, 4)), m(_z(1, 1, 0, 4)),
                                                                                causal=False, backend=be)),
    "colsum-T0-causal": ("attention_colsum", lambda m, be: vkern.vatp.attention_colsum(m(_r(1, 2, 3, 4)),
                                                                                       m(_z(1, 1, 0, 4)), backend=be)),
    "colsum-Hq0": ("attention_colsum", lambda m, be: vkern.vatp.attention_colsum(m(_z(1, 0, 3, 4)),
                                                                                 m(_r(1, 1, 5, 4)), backend=be)),
    "colsum-Tq0": ("attention_colsum", lambda m, be: vkern.vatp.attention_colsum(m(_z(1, 2, 0, 4)),
                                                                                 m(_r(1, 1, 5, 4)), backend=be)),
    "colsum-lens0": ("attention_colsum", lambda m, be: vkern.vatp.attention_colsum(
        m(_r(2, 2, 3, 4)), m(_r(2, 1, 5, 4)), seq_lens=m(_off(0, 0)), causal=False, backend=be)),
    "value_l1-T0": ("value_l1", lambda m, be: vkern.vatp.value_l1(m(_z(1, 2, 0, 4)), backend=be)),
    "value_l1-B0": ("value_l1", lambda m, be: vkern.vatp.value_l1(m(_z(0, 2, 3, 4)), backend=be)),
    "prune-B0": ("vatp_prune", lambda m, be: vkern.vatp_prune(m(_z(0, 2, 5, 4)), m(_z(0, 2, 5, 4)), m(_z(0, 2, 5)),
                                                              budget=2, num_sink=0, num_recent=0, backend=be)),
    "prune-T0": ("vatp_prune", lambda m, be: vkern.vatp_prune(m(_z(1, 2, 0, 4)), m(_z(1, 2, 0, 4)), m(_z(1, 2, 0)),
                                                              budget=2, num_sink=0, num_recent=0, backend=be)),
    "prune-H0-inplace": ("vatp_prune", lambda m, be: vkern.vatp_prune(
        m(_z(1, 0, 5, 4)), m(_z(1, 0, 5, 4)), m(_z(1, 0, 5)), budget=2, num_sink=0, num_recent=0, inplace=True,
        backend=be)),
    "loki-B0": ("loki_attention", lambda m, be: vkern.loki_attention(m(_z(0, 2, 4)), m(_z(0, 1, 5, 4)),
                                                                     m(_z(0, 1, 5, 4)), rank=2, topk=2, backend=be)),
    "decode-B0": ("decode_attention", lambda m, be: vkern.decode_attention(m(_z(0, 2, 4)), m(_z(0, 1, 5, 4)),
                                                                           m(_z(0, 1, 5, 4)), backend=be)),
}


def _qtv(bits, scheme, N=0, K=40, group_size=None):
    rng = np.random.default_rng(bits)
    return taskvec.quantize(rng.standard_normal((N, K)).astype(np.float32), bits=bits, scheme=scheme,
                            group_size=group_size)


FORMATS = [(1, "sign", None), (1, "sign", "row"), (2, "affine", None), (3, "affine", 32), (4, "affine", None),
           (4, "affine", "row"), (8, "affine", 64)]


def _to_kind(x, like):
    if isinstance(like, np.ndarray):
        return x
    return torch.from_numpy(np.ascontiguousarray(x)).to(like.device)


def _same(got, want):
    got = got if isinstance(got, tuple) else (got,)
    want = want if isinstance(want, tuple) else (want,)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert type(g) is type(w) or (HAVE_TORCH and isinstance(g, torch.Tensor) and isinstance(w, torch.Tensor))
        assert tuple(g.shape) == tuple(w.shape)
        np.testing.assert_allclose(host(g), host(w), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("lib", ["numpy", "torch"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
def test_empty_sizes_match_reference(name, backend, lib):
    op, call = CASES[name]
    mk = _mk(backend, lib)
    needs(backend, op)
    got = call(mk, backend)
    want = call(_mk("reference", lib), "reference")      # torch inputs: CPU tensors for the reference
    if lib == "torch":   # results come back as the input's kind, on its device
        for g in (got if isinstance(got, tuple) else (got,)):
            assert isinstance(g, torch.Tensor) and g.device.type == ("cuda" if backend == "cuda" else g.device.type)
    _same(got, want)


def test_issue_reproducer_torch_cpu():
    """maxsim(torch.zeros(2,4), torch.zeros(0,4), doc_offsets=torch.tensor([0]), backend="cpu") used to raise."""
    needs("cpu", "maxsim")
    got = vkern.maxsim(torch.zeros(2, 4), torch.zeros(0, 4), doc_offsets=torch.tensor([0]), backend="cpu")
    assert isinstance(got, torch.Tensor) and tuple(got.shape) == (0,)
    got = vkern.maxsim(torch.zeros(0, 2, 4), torch.zeros(3, 4), doc_offsets=torch.tensor([0, 3]), backend="cpu")
    assert tuple(got.shape) == (0, 1)
    got = vkern.vatp.attention_colsum(torch.zeros(0, 2, 3, 4), torch.zeros(0, 1, 5, 4), backend="cpu")
    assert tuple(got.shape) == (0, 1, 5)


def test_colsum_no_query_rows_is_all_zero():
    """Hq = 0 / Tq = 0 / T = 0 are empty sums: zeros of shape [B, H_kv, T] (not an error)."""
    for backend in ("reference", "cpu"):
        out = vkern.vatp.attention_colsum(_z(2, 0, 3, 4), _r(2, 2, 5, 4), backend=backend)
        assert out.shape == (2, 2, 5) and not out.any()
        out = vkern.vatp.attention_colsum(_r(1, 2, 3, 4), _z(1, 1, 0, 4), causal=False, backend=backend)
        assert out.shape == (1, 1, 0)


@pytest.mark.parametrize("bits,scheme,group_size", FORMATS)
def test_quantize_empty_tau(bits, scheme, group_size):
    """N_out = 0: quantize, to_dict round trip and dequantize give empty results, not NumPy errors."""
    q = _qtv(bits, scheme, N=0, group_size=group_size)
    assert q.shape == (0, 40)
    assert np.isfinite(np.asarray(q.scales)).all()
    d = taskvec.dequantize(q, backend="reference")
    assert d.shape == (0, 40) and d.dtype == np.float32
    same = taskvec.QTaskVector.from_dict(q.to_dict())
    assert taskvec.dequantize(same).shape == (0, 40)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bits,scheme,group_size", FORMATS)
def test_taskvec_ops_with_no_output_rows(backend, bits, scheme, group_size):
    """dequantize / apply_task_vectors / delta_linear with N_out = 0 (and M = 0) on every backend
    give the reference's empty results."""
    needs(backend, "apply_task_vectors")
    q = _qtv(bits, scheme, N=0, group_size=group_size)
    base = _z(0, 40)
    x = _r(3, 40)
    if backend in ("triton", "cuda"):
        dev = "cuda" if backend == "cuda" or HAVE_CUDA else "cpu"
        q = q.to(dev)
        base, x = (torch.from_numpy(a).to(dev) for a in (base, x))
    assert tuple(taskvec.dequantize(q, backend=backend).shape) == (0, 40)
    w = vkern.apply_task_vectors(base, [q], [0.5], backend=backend)
    assert tuple(w.shape) == (0, 40)
    w = vkern.apply_task_vectors(base, [q, q], [0.5, 0.3], method="ties", density=0.5, backend=backend)
    assert tuple(w.shape) == (0, 40)
    y = vkern.delta_linear(x, base, [q], [0.5], backend=backend)
    assert tuple(y.shape) == (3, 0)
    y = vkern.delta_linear(x[:0], base, [q], task_ids=_to_kind(np.zeros(0, np.int64), x), backend=backend)
    assert tuple(y.shape) == (0, 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unsupported_empty_sizes_same_error_everywhere(backend):
    """Attention over no key is undefined: Loki / decode refuse T = 0, Hq = 0 and seq_lens of 0 with
    the same ValueError on every backend (docs/contracts.md, common rules)."""
    needs(backend, "loki_attention")
    mk = _mk(backend, "torch") if backend in ("triton", "cuda") else np.asarray
    q, k = mk(_r(1, 2, 4)), mk(_r(1, 1, 5, 4))
    k0 = mk(_z(1, 1, 0, 4))
    with pytest.raises(ValueError, match="k_cache"):
        vkern.loki_attention(q, k0, k0, rank=2, topk=2, backend=backend)
    with pytest.raises(ValueError, match="k_cache"):
        vkern.decode_attention(q, k0, k0, backend=backend)
    with pytest.raises(ValueError, match="Hq"):
        vkern.loki_attention(mk(_z(1, 0, 4)), k, k, rank=2, topk=2, backend=backend)
    with pytest.raises(ValueError, match="seq_lens"):
        vkern.loki_attention(q, k, k, rank=2, topk=2, seq_lens=mk(_off(0)), backend=backend)
    with pytest.raises(ValueError, match="D"):
        vkern.maxsim(mk(_z(2, 0)), mk(_z(3, 0)), doc_offsets=mk(_off(0, 3)), backend=backend)
