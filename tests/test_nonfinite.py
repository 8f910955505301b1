"""Non-finite inputs follow one rule on every backend (issue 11, defects 4 and 7).

attention_colsum: each query row's probabilities are what float64 NumPy's exp(s - max) / sum gives
over the keys that row sees (docs/contracts.md, section 3); the oracle (tests/_oracles.py) is written
out independently of vkern.reference.
"""
import numpy as np
import pytest
from _oracles import softmax_colsum
from conftest import host, needs, to_kind

import vkern
from vkern.reference import vatp as ref_vatp

BACKENDS = ("reference", "cpu", "triton", "cuda")


def _colsum(backend, q, k, lens, causal, scale):
    got = vkern.vatp.attention_colsum(to_kind(backend, q), to_kind(backend, k), causal=causal,
                                      seq_lens=to_kind(backend, np.asarray(lens, np.int64)), scale=scale,
                                      backend=backend)
    return host(got)


def _cases():
    """(name, q, k, seq_lens, causal): one non-finite pattern each."""
    rng = np.random.default_rng(7)
    q = rng.standard_normal((2, 4, 6, 8)).astype(np.float32)
    k = rng.standard_normal((2, 2, 9, 8)).astype(np.float32)
    out = []

    def add(name, causal=True, lens=(9, 7), **edit):
        qq, kk = q.copy(), k.copy()
        for where, val in edit.get("k", []):
            kk[where] = val
        for where, val in edit.get("q", []):
            qq[where] = val
        out.append(pytest.param(qq, kk, np.array(lens), causal, id=f"{name}-{'causal' if causal else 'full'}"))

    for causal in (True, False):
        add("issue-k-inf", causal, k=[((Ellipsis, 0, 0), np.inf)])          # the issue's reproducer
        add("k-neg-inf", causal, k=[((0, 1, 4, 2), -np.inf)])
        add("k-nan", causal, k=[((1, 0, 2, 5), np.nan)])
        add("q-inf", causal, q=[((0, 2, 5, 1), np.inf)])
        add("q-neg-inf-row", causal, q=[((1, 3, 4, slice(None)), -np.inf)])
        add("q-nan", causal, q=[((0, 0, 3, 0), np.nan)])
        add("key-all-minus-inf", causal, k=[((0, 0, slice(None), slice(None)), 0.0), ((0, 0, slice(None), 0), -np.inf)],
            q=[((0, slice(0, 2), slice(None), 0), 1.0)])
        add("inf-times-zero", causal, k=[((0, 1, 3, 6), np.inf)], q=[((0, 2, slice(None), 6), 0.0)])
        add("masked-garbage", causal, lens=(5, 3), k=[((0, slice(None), slice(5, None)), np.nan),
                                                    ((1, slice(None), slice(3, None)), np.inf)])
        add("mixed", causal, lens=(8, 9), k=[((0, 0, 1, 0), np.inf), ((1, 1, 7, 3), -np.inf), ((1, 0, 0, 0), np.nan)],
            q=[((0, 3, 2, 2), -np.inf)])
    return out


CASES = _cases()


@pytest.mark.parametrize("q,k,lens,causal", CASES)
def test_colsum_reference_is_numpy_softmax(q, k, lens, causal):
    want = softmax_colsum(q, k, lens, causal, 0.5)
    got = ref_vatp.attention_colsum(q, k, lens, causal, 0.5)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7, equal_nan=True)
    assert np.array_equal(np.isnan(got), np.isnan(want))


@pytest.mark.parametrize("backend", BACKENDS[1:])
@pytest.mark.parametrize("q,k,lens,causal", CASES)
def test_colsum_backends_follow_numpy_softmax(backend, q, k, lens, causal):
    needs(backend, "attention_colsum")
    want = softmax_colsum(q, k, lens, causal, 0.5)
    got = _colsum(backend, q, k, lens, causal, 0.5)
    assert np.array_equal(np.isnan(got), np.isnan(want)), (np.isnan(got).astype(int), np.isnan(want).astype(int))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, equal_nan=True)


def test_colsum_issue_example_is_nan_where_numpy_is():
    """k[..., 0, 0] = inf: rows whose largest logit is +inf (or NaN) put NaN on every key they see."""
    rng = np.random.default_rng(3)
    q = rng.standard_normal((1, 1, 3, 4)).astype(np.float32)
    k = rng.standard_normal((1, 1, 3, 4)).astype(np.float32)
    q[..., 0] = np.abs(q[..., 0]) + 0.5          # every row's logit on key 0 is +inf
    k[..., 0, 0] = np.inf
    for backend in ("reference", "cpu"):
        got = host(vkern.vatp.attention_colsum(q, k, backend=backend))
        assert np.isnan(got).all(), (backend, got)
    q[..., 0] = -q[..., 0]                        # now -inf on key 0: it gets exactly 0, the rest is finite
    for backend in ("reference", "cpu"):                                     # (causal row 0 sees only key 0:
        assert np.isnan(host(vkern.vatp.attention_colsum(q, k, backend=backend))[0, 0, 0])   # all -inf, NaN)
        got = host(vkern.vatp.attention_colsum(q, k, causal=False, backend=backend))
        assert got[0, 0, 0] == 0 and np.isfinite(got).all(), (backend, got)
        np.testing.assert_allclose(got.sum(), 3.0, rtol=1e-5)


@pytest.mark.parametrize("level", ["generic", "avx2", "avx512", "avx512shape"])
def test_colsum_nonfinite_every_simd_level(level):
    needs("cpu", "attention_colsum")
    from vkern import _ext

    if level != "avx512shape" and level not in _ext.C.simd_supported():
        pytest.skip(f"{level} not supported here")
    rng = np.random.default_rng(11)
    # Tq and T past one register block (32 rows for AVX-512) so that lanes mix good and NaN rows.
    q = rng.standard_normal((1, 2, 40, 16)).astype(np.float32)
    k = rng.standard_normal((1, 1, 70, 16)).astype(np.float32)
    k[0, 0, 35, 3] = np.inf
    k[0, 0, 50, 0] = -np.inf
    q[0, 1, 7, 2] = np.nan
    want = {c: softmax_colsum(q, k, [70], c, 0.25) for c in (True, False)}
    try:
        vkern.set_simd_level(level)
        got = {c: vkern.vatp.attention_colsum(q, k, causal=c, scale=0.25, backend="cpu") for c in (True, False)}
    finally:
        vkern.set_simd_level("auto")
    for c in (True, False):
        assert np.array_equal(np.isnan(got[c]), np.isnan(want[c]))
        np.testing.assert_allclose(got[c], want[c], rtol=1e-5, atol=1e-5, equal_nan=True)


# ------------------------------------------------ Loki gqa="shared" (defect 7)

def _shared_case():
    """Two query heads share KV head 0; key 5 has +inf in a rank dim where the heads' components
    are +2 and -1: per-head scores +inf and -inf (their sum NaN: ranked last), the summed query's
    component is +1 (score +inf: ranked first)."""
    rng = np.random.default_rng(5)
    q = rng.standard_normal((1, 2, 8)).astype(np.float32)
    k = rng.standard_normal((1, 1, 24, 8)).astype(np.float32)
    v = rng.standard_normal((1, 1, 24, 8)).astype(np.float32)
    q[0, 0, 1], q[0, 1, 1] = 2.0, -1.0
    k[0, 0, 5, 1] = np.inf
    k[0, 0, 9, 2] = np.nan             # a NaN score: ranked last everywhere
    return q, k, v


@pytest.mark.parametrize("backend", BACKENDS)
def test_loki_shared_scores_the_summed_query(backend):
    needs(backend, "loki_attention")
    q, k, v = _shared_case()
    out, idx = vkern.loki_attention(to_kind(backend, q), to_kind(backend, k), to_kind(backend, v), rank=4, topk=6,
                                    gqa="shared", return_indices=True, backend=backend)
    idx = host(idx)
    assert 5 in idx[0, 0] and 5 in idx[0, 1]          # +inf summed-query score: kept
    assert 9 not in idx[0, 0]                          # NaN: last
    approx = k[0, 0, :, :4].astype(np.float64) @ (q[0, 0, :4] + q[0, 1, :4]).astype(np.float64)
    with np.errstate(invalid="ignore"):
        order = np.lexsort((np.arange(24), -np.where(np.isnan(approx), 0, approx), np.isnan(approx)))
    np.testing.assert_array_equal(idx[0, 0], np.sort(order[:6]))
    np.testing.assert_array_equal(idx[0, 1], idx[0, 0])
    want_out, want_idx = vkern.loki_attention(q, k, v, rank=4, topk=6, gqa="shared", return_indices=True,
                                              backend="reference")
    np.testing.assert_array_equal(idx, host(want_idx))
    np.testing.assert_allclose(host(out), host(want_out), rtol=1e-5, atol=1e-5, equal_nan=True)


# ------------------------------------------------ delta_linear with inf in x (found by tests/test_fuzz.py)

@pytest.mark.parametrize("bits,scheme", [(1, "sign"), (4, "affine")])
@pytest.mark.parametrize("mode", ["coeffs", "task_ids"])
def test_delta_linear_nonfinite_x_follows_the_definition(bits, scheme, mode):
    """x[0] = inf, base column 1, delta column < 0: the definition x @ base^T + c x @ deq^T is
    inf + (-inf) = NaN (float64 NumPy); the cpu kernel's merged weight (inf) and sign identity
    (2 sum_bit x - sum x) used to differ. The fuzz's first counterexample, kept here."""
    from vkern import taskvec

    K = 40
    x = np.ones((3, K), np.float32)
    x[0, 0] = np.inf
    x[2, 5] = np.nan
    base = np.ones((2, K), np.float32)
    tau = np.full((2, K), 0.5, np.float32)
    tau[:, 0] = -0.25
    q = taskvec.quantize(tau, bits=bits, scheme=scheme)
    coeffs, ids = ([0.5], None) if mode == "coeffs" else (None, np.array([0, -1, 0]))
    with np.errstate(all="ignore"):
        deq = taskvec.dequantize(q).astype(np.float64)
        x64 = x.astype(np.float64)
        want = x64 @ base.T.astype(np.float64)
        for m in range(3):
            if ids is None or ids[m] == 0:
                want[m] += (0.5 if ids is None else 1.0) * (x64[m] @ deq.T)
    for backend in ("reference", "cpu"):
        got = vkern.delta_linear(x, base, [q], coeffs, task_ids=ids, backend=backend)
        assert np.array_equal(np.isnan(got), np.isnan(want)), (backend, got, want)
        np.testing.assert_allclose(got, want.astype(np.float32), rtol=1e-5, equal_nan=True)
