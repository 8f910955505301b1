"""Non-native byte order (issue 11, defect 3): a big-endian NumPy array is converted to
native order once before any kernel reads it (the kernels read raw machine words), so every
backend gives the reference's answer; a big-endian buffer the op would write into
(``inplace=True``, ``out=``) is refused with a TypeError instead of being silently copied."""
import numpy as np
import pytest

import vkern
from vkern import taskvec

BACKENDS = ("reference", "cpu")


def swapped(a, code):
    """The same values in non-native byte order (code like 'f4' or 'f2')."""
    other = ">" if np.little_endian else "<"
    out = np.asarray(a).astype(other + code)
    assert not out.dtype.isnative
    return out


def close(a, b, tol=1e-4):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=tol, atol=tol)


@pytest.mark.parametrize("code", ["f4", "f2"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_maxsim_big_endian(rng, code, backend):
    q = rng.standard_normal((3, 8)).astype(np.float32)
    d = rng.standard_normal((6, 8)).astype(np.float32)
    want = vkern.maxsim(q.astype(code), d.astype(code), doc_offsets=[0, 3, 6], backend="reference")
    got = vkern.maxsim(swapped(q, code), swapped(d, code), doc_offsets=swapped([0, 3, 6], "i8"), backend=backend)
    assert np.all(np.isfinite(got))
    close(got, want)
    lst = vkern.maxsim(swapped(q, code), [swapped(d[:3], code), swapped(d[3:], code)], backend=backend)
    close(lst, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_loki_and_decode_big_endian(rng, backend):
    q = rng.standard_normal((1, 4, 16)).astype(np.float32)
    k = rng.standard_normal((1, 2, 40, 16)).astype(np.float32)
    v = rng.standard_normal((1, 2, 40, 16)).astype(np.float32)
    want = vkern.loki_attention(q, k, v, rank=4, topk=10, backend="reference")
    got = vkern.loki_attention(swapped(q, "f4"), swapped(k, "f4"), swapped(v, "f4"), rank=4, topk=10,
                               seq_lens=swapped([40], "i8"), backend=backend)
    close(got, want)
    close(vkern.decode_attention(swapped(q, "f4"), swapped(k, "f4"), swapped(v, "f4"), backend=backend),
          vkern.decode_attention(q, k, v, backend="reference"))
    basis = vkern.loki.pca_basis(k[0].transpose(1, 0, 2), backend="reference")
    close(vkern.loki.rotate(swapped(q, "f4"), basis, backend=backend), vkern.loki.rotate(q, basis, backend="reference"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_vatp_big_endian(rng, backend):
    q = rng.standard_normal((1, 2, 5, 8)).astype(np.float32)
    k = rng.standard_normal((1, 2, 12, 8)).astype(np.float32)
    v = rng.standard_normal((1, 2, 12, 8)).astype(np.float32)
    close(vkern.vatp.attention_colsum(swapped(q, "f4"), swapped(k, "f4"), backend=backend),
          vkern.vatp.attention_colsum(q, k, backend="reference"))
    close(vkern.vatp.value_l1(swapped(v, "f2"), backend=backend), vkern.vatp.value_l1(v.astype("f2"), backend="reference"))
    s = rng.standard_normal((1, 2, 12)).astype(np.float32)
    want = vkern.vatp_prune(k, v, s, budget=6, num_sink=1, num_recent=2, backend="reference")
    got = vkern.vatp_prune(swapped(k, "f4"), swapped(v, "f4"), swapped(s, "f4"), budget=6, num_sink=1, num_recent=2,
                           backend=backend)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    with pytest.raises(TypeError, match="k: expected native byte order"):
        vkern.vatp_prune(swapped(k, "f4"), v.copy(), s, budget=6, num_sink=1, num_recent=2, inplace=True,
                         backend=backend)
    with pytest.raises(TypeError, match=r"out\[0\]: expected native byte order"):
        vkern.vatp_prune(k, v, s, budget=6, num_sink=1, num_recent=2, backend=backend,
                         out=(swapped(np.zeros((1, 2, 6, 8)), "f4"), np.zeros((1, 2, 6, 8), np.float32)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_taskvec_big_endian(rng, backend):
    base = rng.standard_normal((6, 64)).astype(np.float32)
    taus = [rng.standard_normal((6, 64)).astype(np.float32) * 0.1 for _ in range(2)]
    qs = [taskvec.quantize(swapped(t, "f4"), bits=4) for t in taus]
    q_native = [taskvec.quantize(t, bits=4) for t in taus]
    for a, b in zip(qs, q_native):
        np.testing.assert_array_equal(a.codes, b.codes)
    want = vkern.apply_task_vectors(base, q_native, [0.5, 0.3], backend="reference")
    close(vkern.apply_task_vectors(swapped(base, "f4"), qs, swapped([0.5, 0.3], "f8"), backend=backend), want)
    with pytest.raises(TypeError, match="out: expected native byte order"):
        vkern.apply_task_vectors(base, qs, [0.5, 0.3], out=swapped(base, "f4"), backend=backend)
    x = rng.standard_normal((3, 64)).astype(np.float32)
    close(vkern.delta_linear(swapped(x, "f4"), swapped(base, "f4"), qs, [0.5, 0.3], backend=backend),
          vkern.delta_linear(x, base, q_native, [0.5, 0.3], backend="reference"))
