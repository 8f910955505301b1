"""apply_task_vectors(method="dare" | "negmerge" | "cabs") and aTLAS-style per-block coefficients,
each against a brute-force NumPy statement of its paper's definition (loops over elements and groups,
written independently of vkern.ops.taskvec_methods)."""
import numpy as np
import pytest

import vkern
from vkern import taskvec as tv
from vkern._backend import BackendUnavailable
from vkern.reference import taskvec as ref

from conftest import HAVE_TORCH

BACKENDS = ["cpu", "reference"]
STREAM = 1 << 18   # the documented DARE stream block


def _qtvs(rng, shape, T, bits=8):
    taus = [rng.standard_normal(shape).astype(np.float32) for _ in range(T)]
    qs = [tv.quantize(t, bits=bits) for t in taus]
    return qs, [ref.dequantize(q).astype(np.float64) for q in qs]


def _tol(backend):
    return dict(rtol=1e-5, atol=1e-5) if backend == "cpu" else dict(rtol=1e-6, atol=1e-6)   # float32 result


# ---------------------------------------------------------------- DARE

def _dare_brute(base, taus, coeffs, p, seed):
    W = base.astype(np.float64).copy()
    n = base.size
    for t, tau in enumerate(taus):
        u = np.concatenate([np.random.default_rng((seed, t, c)).random(min(STREAM, n - c * STREAM), dtype=np.float32)
                            for c in range(-(-n // STREAM))])
        keep = (u < np.float32(1 - p)).reshape(base.shape)      # Bernoulli(1 - p): dropped with rate p
        W += coeffs[t] * np.where(keep, tau, 0.0) / (1 - p)     # rescale by 1 / (1 - p)
    return W


@pytest.mark.parametrize("backend", BACKENDS)
def test_dare_matches_brute_force(rng, backend):
    shape = (520, 512)                     # 266240 elements: two random-stream blocks
    base = rng.standard_normal(shape).astype(np.float32)
    qs, taus = _qtvs(rng, shape, 3)
    coeffs, p = [0.5, -0.3, 0.8], 0.7
    got = vkern.apply_task_vectors(base, qs, coeffs, method="dare", p=p, seed=11, backend=backend)
    np.testing.assert_allclose(got, _dare_brute(base, taus, coeffs, p, 11), **_tol(backend))


def test_dare_deterministic_statistics_and_p0(rng):
    shape = (256, 256)
    base = np.zeros(shape, np.float32)
    qs, taus = _qtvs(rng, shape, 2)
    run = lambda s, p=0.6: vkern.apply_task_vectors(base, qs[:1], [1.0], method="dare", p=p, seed=s, backend="cpu")
    a, b, c = run(3), run(3), run(4)
    assert np.array_equal(a, b)                            # deterministic given the seed
    assert not np.array_equal(a, c)
    kept = np.count_nonzero(a) / a.size                    # taus have no exact zeros
    sd = np.sqrt(0.4 * 0.6 / a.size)
    assert abs(kept - 0.4) < 5 * sd
    nz = a != 0
    np.testing.assert_allclose(a[nz], taus[0][nz] / 0.4, rtol=1e-5)   # survivors rescaled by 1/(1-p)
    # the expectation is preserved: the mean over seeds of dare(tau) approaches tau
    mean = np.mean([run(s) for s in range(40)], axis=0)
    err = np.abs(mean - taus[0]).mean() / np.abs(taus[0]).mean()
    assert err < 0.25
    # p = 0 keeps everything: task arithmetic
    np.testing.assert_allclose(run(3, p=0.0), vkern.apply_task_vectors(base, qs[:1], [1.0], backend="cpu"),
                               rtol=1e-6, atol=1e-6)
    # tasks draw independent masks
    two = vkern.apply_task_vectors(base, qs, [1.0, 0.0], method="dare", p=0.6, seed=3, backend="cpu")
    np.testing.assert_array_equal(two, a)
    other = vkern.apply_task_vectors(base, qs, [0.0, 1.0], method="dare", p=0.6, seed=3, backend="cpu")
    assert (np.count_nonzero((a != 0) & (other != 0)) / a.size) == pytest.approx(0.16, abs=0.02)


def test_dare_stream_is_the_same_for_any_block_split():
    from vkern.ops import taskvec_methods as MM

    whole = MM.dare_keep((5, 1), 2, 0, 3 * STREAM + 17, 0.3)
    parts = np.concatenate([MM.dare_keep((5, 1), 2, s, min(3 * STREAM + 17, s + 100003), 0.3)
                            for s in range(0, 3 * STREAM + 17, 100003)])
    assert np.array_equal(whole, parts)
    assert abs(whole.mean() - 0.3) < 0.005


# ------------------------------------------------------------ NegMerge

def _negmerge_brute(base, taus, coeffs):
    W = base.astype(np.float64).copy()
    for i in np.ndindex(base.shape):
        signs = {int(np.sign(t[i])) for t in taus}
        if len(signs) == 1 and 0 not in signs:           # same non-zero sign in every forget-task vector
            W[i] -= sum(c * t[i] for c, t in zip(coeffs, taus))
    return W


@pytest.mark.parametrize("backend", BACKENDS)
def test_negmerge_matches_brute_force(rng, backend):
    shape = (12, 40)
    base = rng.standard_normal(shape).astype(np.float32)
    taus = [rng.standard_normal(shape).astype(np.float32) for _ in range(3)]
    taus[1][0, :5] = 0                                     # exact zeros never agree
    qs = [tv.quantize(t, bits=8) for t in taus]
    d = [ref.dequantize(q).astype(np.float64) for q in qs]
    coeffs = [0.4, 0.4, 0.4]
    got = vkern.apply_task_vectors(base, qs, coeffs, method="negmerge", backend=backend)
    want = _negmerge_brute(base, d, coeffs)
    np.testing.assert_allclose(got, want, **_tol(backend))
    assert np.array_equal(got[0, :5], base[0, :5])
    agree = np.mean([len({int(np.sign(t[i])) for t in d}) == 1 for i in np.ndindex(shape)])
    assert 0.1 < agree < 0.5                                # both branches are exercised


# ----------------------------------------------------------------- CABS

def _cabs_brute(base, taus, coeffs, n, m):
    flat = [t.reshape(-1) for t in taus]
    L = base.size
    taken = np.zeros(L, dtype=bool)
    masks = []
    for t in flat:
        mask = np.zeros(L, dtype=bool)
        for g in range(0, L, m):
            free = [i for i in range(g, min(L, g + m)) if not taken[i]]
            free.sort(key=lambda i: (-abs(t[i]), i))       # largest magnitude first, lower index on ties
            for i in free[:n]:
                mask[i] = True
        taken |= mask
        masks.append(mask)
    W = base.astype(np.float64).reshape(-1).copy()
    for c, t, mk in zip(coeffs, flat, masks):
        W += c * np.where(mk, t, 0.0)
    return W.reshape(base.shape), masks


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,m,shape", [(2, 8, (6, 40)), (1, 4, (5, 9)), (3, 5, (7, 13))])
def test_cabs_matches_brute_force(rng, backend, n, m, shape):
    base = rng.standard_normal(shape).astype(np.float32)
    qs, taus = _qtvs(rng, shape, 3)
    taus_q = taus
    coeffs = [0.7, 0.5, -0.2]
    got = vkern.apply_task_vectors(base, qs, coeffs, method="cabs", n=n, m=m, backend=backend)
    want, masks = _cabs_brute(base, taus_q, coeffs, n, m)
    np.testing.assert_allclose(got, want, **_tol(backend))
    total = np.sum(masks, axis=0)
    assert total.max() <= 1                                 # pruned task vectors never overlap
    L = base.size
    for mk in masks:                                        # n:m balanced: at most n per group of m
        per = np.add.reduceat(mk.astype(int), np.arange(0, L, m))
        assert per.max() <= n
    if 3 * n <= m:                                          # room for all: exactly n per full group
        full = L // m
        assert (np.add.reduceat(masks[2].astype(int), np.arange(0, L, m))[:full] == n).all()


# ---------------------------------------------------------------- aTLAS

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method,kw", [("sum", {}), ("ties", {"density": 0.5}), ("cabs", {"n": 1, "m": 2})])
def test_per_block_coefficients(rng, backend, method, kw):
    shape = (8, 16)
    base = rng.standard_normal(shape).astype(np.float32)
    qs, _ = _qtvs(rng, shape, 2)
    table = {"model.layers.0.mlp.up_proj.weight": [0.1, 0.9], "q_proj": [0.5, 0.2], "layers.1": [1.5, -1.0],
             "*": [0.3, 0.3]}
    cases = {"model.layers.0.mlp.up_proj.weight": [0.1, 0.9],      # exact key
             "model.layers.0.self_attn.q_proj.weight": [0.5, 0.2],  # first substring key
             "model.layers.1.self_attn.q_proj.weight": [0.5, 0.2],  # mapping order decides
             "model.layers.1.mlp.down_proj.weight": [1.5, -1.0],
             "model.norm.weight": [0.3, 0.3]}                       # "*"
    for blockname, coeffs in cases.items():
        got = vkern.apply_task_vectors(base, qs, table, block=blockname, method=method, backend=backend, **kw)
        want = vkern.apply_task_vectors(base, qs, coeffs, method=method, backend=backend, **kw)
        np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="coeffs: no entry for block 'lm_head'"):
        vkern.apply_task_vectors(base, qs, {"q_proj": [1, 1]}, block="lm_head", backend=backend)


# ------------------------------------------------------------- plumbing

@pytest.mark.skipif(not HAVE_TORCH, reason="needs torch")
@pytest.mark.parametrize("method,kw", [("dare", {"p": 0.5, "seed": (1, 2)}), ("negmerge", {}),
                                       ("cabs", {"n": 2, "m": 4})])
def test_torch_tensors_and_out(rng, method, kw):
    import torch

    shape = (16, 32)
    base = rng.standard_normal(shape).astype(np.float32)
    qs, _ = _qtvs(rng, shape, 2)
    want = vkern.apply_task_vectors(base, qs, [0.5, 0.5], method=method, backend="reference", **kw)
    tb = torch.from_numpy(base.copy()).to(torch.bfloat16)
    got = vkern.apply_task_vectors(tb, tv.to_device(qs, "cpu"), [0.5, 0.5], method=method, backend="cpu", **kw)
    assert got.dtype == torch.bfloat16
    np.testing.assert_allclose(got.float().numpy(), torch.from_numpy(want).to(torch.bfloat16).float().numpy(),
                               rtol=0.02, atol=0.02)
    out = np.empty_like(base)
    r = vkern.apply_task_vectors(base, qs, [0.5, 0.5], method=method, out=out, backend="cpu", **kw)
    assert r is out
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


def test_bad_arguments(rng):
    shape = (4, 8)
    base = np.zeros(shape, np.float32)
    qs, _ = _qtvs(rng, shape, 2)
    c = [1.0, 1.0]
    cases = [
        (dict(method="dare"), TypeError, "^p: "),
        (dict(method="dare", p=1.0), ValueError, "^p: "),
        (dict(method="dare", p="0.5"), TypeError, "^p: "),
        (dict(method="dare", p=0.5, seed=-1), TypeError, "^seed: "),
        (dict(method="dare", p=0.5, seed=1.5), TypeError, "^seed: "),
        (dict(method="dare", p=0.5, density=0.5), ValueError, "^density: "),
        (dict(method="sum", p=0.5), ValueError, "^p: "),
        (dict(method="ties", seed=1), ValueError, "^seed: "),
        (dict(method="cabs"), TypeError, "^n, m: "),
        (dict(method="cabs", n=3, m=2), ValueError, "^n: "),
        (dict(method="cabs", n=1, m=0), ValueError, "^m: "),
        (dict(method="cabs", n=1.0, m=2), TypeError, "^n: "),
        (dict(method="negmerge", n=1), ValueError, "^n, m: "),
        (dict(method="bogus"), ValueError, "^method: "),
        (dict(block="q_proj"), TypeError, "^block: "),
    ]
    for kw, exc, pat in cases:
        with pytest.raises(exc, match=pat):
            vkern.apply_task_vectors(base, qs, c, **kw)
    with pytest.raises(TypeError, match="^block: "):
        vkern.apply_task_vectors(base, qs, {"*": c})
    with pytest.raises(ValueError, match=r"^coeffs\['x'\]: expected length T=2"):
        vkern.apply_task_vectors(base, qs, {"*": [1.0]}, block="x")
    with pytest.raises(TypeError, match="^coeffs: mapping keys"):
        vkern.apply_task_vectors(base, qs, {0: c}, block="x")


@pytest.mark.skipif(not HAVE_TORCH, reason="needs torch")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_backends_name_the_limitation(rng, backend):
    import torch

    qs, _ = _qtvs(rng, (4, 8), 1)
    with pytest.raises(BackendUnavailable, match="runs on the cpu and reference backends only"):
        vkern.apply_task_vectors(torch.zeros(4, 8), tv.to_device(qs, "cpu"), [1.0], method="cabs", n=1, m=2,
                                 backend=backend)


# ------------------------------------------- delta_linear: 4-bit tenants straight from the codes

@pytest.mark.parametrize("level", ["generic", "avx2", "avx512", "avx512shape"])
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 9])
def test_delta_linear_q4_tenants_and_plan(rng, level, M):
    """One affine 4-bit task per row (the serving case: x . delta from the codes, the base by the
    BLAS for 2..8 rows) against the float64 definition, on both SIMD levels, K with a short group;
    DeltaPlan (what DeltaLinear runs) gives the same result as delta_linear."""
    from vkern.ops.taskvec import DeltaPlan

    try:
        vkern.set_simd_level(level)
    except ValueError as exc:
        pytest.skip(str(exc))
    try:
        N, K = 37, 203
        base = rng.standard_normal((N, K)).astype(np.float32)
        qs = [tv.quantize(0.1 * rng.standard_normal((N, K)).astype(np.float32), bits=4, group_size=g)
              for g in (32, 64, 128, 32)]
        qs.append(tv.quantize(0.1 * rng.standard_normal((N, K)).astype(np.float32), bits=2, group_size=32))
        x = rng.standard_normal((M, K)).astype(np.float32)
        ids = rng.integers(-1, len(qs), M)
        want = ref.delta_linear(x, base, qs, None, ids)
        got = vkern.delta_linear(x, base, qs, task_ids=ids, backend="cpu")
        scale = np.abs(x).sum(axis=1, keepdims=True) * (np.abs(base).max() + 0.2)
        assert np.all(np.abs(got - want) <= 1e-5 * scale)
        plan = DeltaPlan(base, qs)
        np.testing.assert_array_equal(plan(x, ids), got)
        with pytest.raises(ValueError, match=r"^task_ids: every id must be in \[-1, T=5\)"):
            plan(x, np.full(M, 5))
        with pytest.raises(ValueError, match=r"^x: expected shape"):
            plan(x[:, :7], ids)
    finally:
        vkern.set_simd_level("auto")
