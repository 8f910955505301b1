"""VATP (SPEC §3): attention column sums, value L1 norms and pruning with
compaction, every backend against the float64 NumPy reference / brute force."""
import numpy as np
import pytest
from _oracles import softmax_colsum

import vkern
from vkern import _ext
from vkern.reference import vatp as ref

try:
    import torch
except Exception:  # pragma: no cover
    torch = None

HAVE_CUDA = torch is not None and torch.cuda.is_available()


def _usable(backend):
    if backend == "reference":
        return True
    if backend == "cpu":
        return _ext.C is not None
    if backend == "triton":
        return torch is not None and _ext.triton_reason() is None
    if backend == "cuda":
        return HAVE_CUDA and _ext.cuda_reason() is None
    return False


BACKENDS = [pytest.param(b, marks=pytest.mark.skipif(not _usable(b), reason=f"{b} backend unavailable"))
            for b in ("reference", "cpu", "triton", "cuda")]
DEVICE = {"reference": "cpu", "cpu": "cpu", "triton": "cuda" if HAVE_CUDA else "cpu", "cuda": "cuda"}


def _as(x, backend, dtype="float32", as_torch=None):
    """Input for a backend: NumPy for reference/cpu (torch for bfloat16 or when asked), torch elsewhere."""
    if as_torch is None:
        as_torch = backend not in ("reference", "cpu") or dtype == "bfloat16"
    if not as_torch:
        return x.astype(dtype)
    t = torch.from_numpy(np.array(x)).to(getattr(torch, dtype))   # a copy: in-place tests must not touch x
    return t.to(DEVICE[backend])


def _np(x):
    if isinstance(x, np.ndarray):
        return x
    return x.detach().float().cpu().numpy() if x.is_floating_point() else x.detach().cpu().numpy()


# --------------------------------------------------------------- colsum

COLSUM_CASES = [  # B, Hq, H_kv, Tq, T, D, causal, seq_lens
    (1, 1, 1, 5, 5, 4, True, None),
    (2, 4, 2, 20, 50, 8, True, [50, 30]),
    (1, 6, 2, 37, 37, 33, True, None),
    (2, 4, 4, 9, 70, 16, False, [0, 70]),
    (1, 2, 1, 40, 23, 16, True, None),          # Tq > T: early rows see nothing
    (2, 2, 2, 17, 17, 128, False, [17, 5]),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", COLSUM_CASES)
def test_colsum_matches_brute_force(backend, case, rng):
    B, Hq, H, Tq, T, D, causal, sl = case
    if backend == "triton" and D > 64:
        pytest.skip("interpreter: keep Triton shapes tiny")
    q = rng.standard_normal((B, Hq, Tq, D)).astype(np.float32)
    k = rng.standard_normal((B, H, T, D)).astype(np.float32)
    lens = np.array(sl if sl is not None else [T] * B, dtype=np.int64)
    want = softmax_colsum(q, k, lens, causal, 1 / np.sqrt(D))
    got = vkern.vatp.attention_colsum(_as(q, backend), _as(k, backend), causal=causal,
                                      seq_lens=None if sl is None else _as(lens, backend, "int64")
                                      if backend not in ("reference", "cpu") else lens, backend=backend)
    got = _np(got)
    assert got.dtype == np.float32 and got.shape == (B, H, T)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # Every query row that sees a key spreads exactly one unit of probability.
    assert np.isfinite(got).all()
    for b in range(B):
        assert np.all(got[b, :, lens[b]:] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_colsum_low_precision(backend, dtype, rng):
    if dtype == "bfloat16" and torch is None:
        pytest.skip("needs torch")
    q = rng.standard_normal((1, 4, 24, 16)).astype(np.float32)
    k = rng.standard_normal((1, 2, 40, 16)).astype(np.float32)
    qd, kd = _as(q, backend, dtype), _as(k, backend, dtype)
    qr, kr = _np(qd).astype(np.float64), _np(kd).astype(np.float64)   # the values the kernel sees
    want = softmax_colsum(qr, kr, [40], True, 0.25)
    got = _np(vkern.vatp.attention_colsum(qd, kd, scale=0.25, backend=backend))
    # float32 accumulation of exactly representable inputs: as tight as float32.
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_colsum_all_masked_rows_nan_free(backend, rng):
    q = rng.standard_normal((3, 2, 8, 16)).astype(np.float32)
    k = rng.standard_normal((3, 1, 8, 16)).astype(np.float32)
    lens = np.array([0, 3, 8])
    for causal in (True, False):
        sl = lens if backend in ("reference", "cpu") else _as(lens, backend, "int64")
        got = _np(vkern.vatp.attention_colsum(_as(q, backend), _as(k, backend), causal=causal, seq_lens=sl,
                                              backend=backend))
        assert np.isfinite(got).all()
        assert np.all(got[0] == 0)                   # empty sequence
        assert np.all(got[1, :, 3:] == 0)
        # causal: rows at positions 0..2 of sequence 1 are valid (3 rows x 2 heads), the rest padding
        total = 2 * (3 if causal else 8)
        assert abs(got[1].sum() - total) < 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_colsum_nan_follows_reference(backend, rng):
    q = rng.standard_normal((1, 2, 12, 16)).astype(np.float32)
    k = rng.standard_normal((1, 1, 12, 16)).astype(np.float32)
    q[0, 0, 5, 3] = np.nan        # one row of head 0: the keys it sees (0..5) become NaN, the others stay finite
    want = ref.attention_colsum(q, k, np.array([12]), True, 0.25)
    got = _np(vkern.vatp.attention_colsum(_as(q, backend), _as(k, backend), scale=0.25, backend=backend))
    assert np.isnan(got[0, 0, :6]).all() and np.isfinite(got[0, 0, 6:]).all()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, equal_nan=True)


@pytest.mark.skipif(_ext.C is None, reason="cpu backend unavailable")
@pytest.mark.parametrize("level", ["generic", "avx2", "avx512shape"])
def test_colsum_every_simd_level(level, rng):
    if level not in _ext.C.simd_supported() and level != "avx512shape":
        pytest.skip(f"{level} not supported here")
    q = rng.standard_normal((1, 4, 45, 24)).astype(np.float32)
    k = rng.standard_normal((1, 2, 60, 24)).astype(np.float32)
    want = softmax_colsum(q, k, [60], True, 0.2)
    kc, vc, sc = _prune_inputs(rng, T=300, Dk=40, Dv=24, ties=False)
    v16 = vc.astype(np.float16)
    try:
        vkern.set_simd_level(level)
        got = vkern.vatp.attention_colsum(q, k, scale=0.2, backend="cpu")
        got16 = vkern.vatp.attention_colsum(q.astype(np.float16), k.astype(np.float16), scale=0.2, backend="cpu")
        l1 = vkern.vatp.value_l1(v16, backend="cpu")
        pruned = vkern.vatp_prune(kc, vc, sc, budget=0.4, num_sink=3, num_recent=5, backend="cpu")
        kc2, vc2 = kc.copy(), vc.copy()
        pruned_ip = vkern.vatp_prune(kc2, vc2, sc, budget=0.4, num_sink=3, num_recent=5, inplace=True, backend="cpu")
    except ValueError:
        pytest.skip(f"{level} not runnable here")
    finally:
        vkern.set_simd_level("auto")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    want16 = softmax_colsum(q.astype(np.float16), k.astype(np.float16), [60], True, 0.2)
    np.testing.assert_allclose(got16, want16, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(l1, np.abs(v16.astype(np.float64)).sum(-1), rtol=1e-5)
    _check_prune(pruned, kc, vc, sc, [300, 300], 0.4, 3, 5)
    _check_prune(pruned_ip, kc, vc, sc, [300, 300], 0.4, 3, 5)


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=pytest.mark.skipif(
    _ext.C is None, reason="no cpu"))])
def test_colsum_strided_inputs(backend, rng):
    q = rng.standard_normal((1, 3, 20, 2, 16)).astype(np.float32)[:, :, :, 1]      # non-contiguous
    k = np.asfortranarray(rng.standard_normal((1, 3, 30, 16)).astype(np.float32))  # Fortran order
    want = softmax_colsum(q, k, [30], True, 0.25)
    np.testing.assert_allclose(vkern.vatp.attention_colsum(q, k, scale=0.25, backend=backend), want,
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(vkern.vatp.attention_colsum(q[:, :, ::-1], k[:, :, ::-1], causal=False,
                                                           scale=0.25, backend=backend),
                               softmax_colsum(q[:, :, ::-1], k[:, :, ::-1], [30], False, 0.25), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------- value_l1

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_value_l1(backend, dtype, rng):
    if dtype == "bfloat16" and torch is None:
        pytest.skip("needs torch")
    v = rng.standard_normal((2, 3, 19, 37)).astype(np.float32)
    vd = _as(v, backend, dtype)
    want = np.abs(_np(vd).astype(np.float64)).sum(-1)
    got = _np(vkern.vatp.value_l1(vd, backend=backend))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    if backend in ("reference", "cpu"):  # strided
        vt = np.asfortranarray(v)[:, ::-1]
        np.testing.assert_allclose(vkern.vatp.value_l1(vt, backend=backend), np.abs(vt.astype(np.float64)).sum(-1),
                                   rtol=1e-5)


# ----------------------------------------------------------------- prune

def _prune_inputs(rng, B=2, H=3, T=100, Dk=16, Dv=8, ties=True):
    k = rng.standard_normal((B, H, T, Dk)).astype(np.float32)
    v = rng.standard_normal((B, H, T, Dv)).astype(np.float32)
    if ties:
        s = rng.integers(0, 4, (B, H, T)).astype(np.float32)   # many ties
    else:
        s = rng.random((B, H, T)).astype(np.float32)
    return k, v, s


def _check_prune(out, k, v, scores, lens, budget, num_sink, num_recent):
    k_kept, v_kept, idx, kept_lens = (_np(x) for x in out)
    B, H, T = scores.shape
    want_lens = np.array([ref.resolve_budget(budget, int(L), num_sink, num_recent) for L in lens])
    np.testing.assert_array_equal(kept_lens, want_lens)
    kmax = int(want_lens.max())
    assert idx.dtype == np.int64 and idx.shape == (B, H, kmax)
    want_idx = ref.prune_indices(scores, lens, want_lens, num_sink, num_recent)
    np.testing.assert_array_equal(idx, want_idx)
    for b in range(B):
        n, L = int(want_lens[b]), int(lens[b])
        for h in range(H):
            sel = idx[b, h, :n]
            assert np.all(np.diff(sel) > 0) and np.all(idx[b, h, n:] == -1)
            assert set(range(min(num_sink, L))) <= set(sel.tolist())
            assert set(range(max(0, L - num_recent), L)) <= set(sel.tolist())
            np.testing.assert_array_equal(k_kept[b, h, :n], k[b, h, sel])
            np.testing.assert_array_equal(v_kept[b, h, :n], v[b, h, sel])
            assert np.all(k_kept[b, h, n:] == 0) and np.all(v_kept[b, h, n:] == 0)
    return idx


PRUNE_CASES = [  # budget, num_sink, num_recent, seq_lens
    (40, 4, 8, None),
    (0.5, 4, 8, [100, 60]),
    (36, 4, 32, [30, 100]),         # budget = num_sink + num_recent; a sequence shorter than it
    (100, 4, 32, None),             # budget = seq_len: identity
    (12, 4, 8, [100, 0]),           # budget = protected only; an empty sequence
    (0.25, 0, 0, [100, 7]),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", PRUNE_CASES)
@pytest.mark.parametrize("inplace", [False, True])
def test_prune_matches_reference(backend, case, inplace, rng):
    budget, ns, nr, sl = case
    k, v, s = _prune_inputs(rng, H=1 if backend == "triton" else 3)   # the interpreter is slow
    lens = np.array(sl if sl is not None else [100, 100])
    kin, vin, sin = _as(k, backend), _as(v, backend), _as(s, backend)
    slin = None if sl is None else (lens if isinstance(kin, np.ndarray) else _as(lens, backend, "int64"))
    out = vkern.vatp_prune(kin, vin, sin, budget=budget, num_sink=ns, num_recent=nr, seq_lens=slin,
                           inplace=inplace, backend=backend)
    idx = _check_prune(out, k, v, s, lens, budget, ns, nr)
    if inplace:   # views of the caller's buffers, compacted at the front
        assert _np(out[0]).shape[2] == idx.shape[2]
        if isinstance(kin, np.ndarray):
            assert np.shares_memory(out[0], kin) and np.shares_memory(out[1], vin)
        else:
            assert out[0].data_ptr() == kin.data_ptr() and out[1].data_ptr() == vin.data_ptr()
        np.testing.assert_array_equal(_np(kin)[:, :, :idx.shape[2]], _np(out[0]))
    else:         # inputs untouched
        np.testing.assert_array_equal(_np(kin), k)
        np.testing.assert_array_equal(_np(vin), v)
    if budget == 100 and sl is None:
        np.testing.assert_array_equal(_np(out[2]), np.broadcast_to(np.arange(100), s.shape))
        np.testing.assert_array_equal(_np(out[0]), k)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_prune_low_precision_caches(backend, dtype, rng):
    if dtype == "bfloat16" and torch is None:
        pytest.skip("needs torch")
    k, v, s = _prune_inputs(rng, H=1 if backend == "triton" else 3, ties=False)
    kd, vd = _as(k, backend, dtype), _as(v, backend, dtype)
    for inplace in (False, True):
        kin = kd.copy() if isinstance(kd, np.ndarray) else kd.clone()
        vin = vd.copy() if isinstance(vd, np.ndarray) else vd.clone()
        out = vkern.vatp_prune(kin, vin, _as(s, backend, as_torch=not isinstance(kd, np.ndarray)), budget=50, num_sink=2, num_recent=5, inplace=inplace,
                               backend=backend)
        assert A_dtype(out[0]) == dtype
        _check_prune(out, _np(kd), _np(vd), s, [100, 100], 50, 2, 5)


def A_dtype(x):
    return x.dtype.name if isinstance(x, np.ndarray) else str(x.dtype).replace("torch.", "")


@pytest.mark.parametrize("backend", BACKENDS)
def test_prune_ties_nan_and_signed_zero(backend):
    T = 12
    s = np.array([[[0, 1, 1, np.nan, 1, -0.0, 0.0, 1, np.nan, -np.inf, 2, 0]]], np.float32)
    k = np.arange(T, dtype=np.float32).reshape(1, 1, T, 1)
    out = vkern.vatp_prune(_as(k, backend), _as(k, backend), _as(s, backend), budget=6, num_sink=1,
                           num_recent=1, backend=backend)
    # free budget 4 over positions 1..10: 2 (pos 10), then the 1s at 1, 2, 4 (lower index first)
    np.testing.assert_array_equal(_np(out[2])[0, 0], [0, 1, 2, 4, 10, 11])
    out = vkern.vatp_prune(_as(k, backend), _as(k, backend), _as(s, backend), budget=9, num_sink=1,
                           num_recent=1, backend=backend)
    # then 0-valued positions 5 (-0.0), 6: -0.0 ties +0.0; -inf before NaN
    np.testing.assert_array_equal(_np(out[2])[0, 0], [0, 1, 2, 4, 5, 6, 7, 10, 11])
    out = vkern.vatp_prune(_as(k, backend), _as(k, backend), _as(s, backend), budget=11, num_sink=1,
                           num_recent=1, backend=backend)
    np.testing.assert_array_equal(_np(out[2])[0, 0], [0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11])


@pytest.mark.parametrize("backend", BACKENDS)
def test_prune_protected_never_evicted(backend, rng):
    k, v, s = _prune_inputs(rng, ties=False)
    s[:, :, :4] = -np.inf        # sinks and recent window score lowest
    s[:, :, -8:] = np.nan
    out = vkern.vatp_prune(_as(k, backend), _as(v, backend), _as(s, backend), budget=20, num_sink=4, num_recent=8,
                           backend=backend)
    idx = _np(out[2])
    assert np.all(idx[:, :, :4] == np.arange(4)) and np.all(idx[:, :, -8:] == np.arange(92, 100))


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=pytest.mark.skipif(
    _ext.C is None, reason="no cpu"))])
def test_prune_strided_inputs(backend, rng):
    k, v, s = _prune_inputs(rng)
    kf = np.asfortranarray(k)                       # D is not the unit-stride axis
    vs = np.stack([v, -v], axis=-1).reshape(v.shape[:3] + (-1,))[..., ::2]   # sliced along D
    ss = np.ascontiguousarray(np.swapaxes(s, 1, 2)).swapaxes(1, 2)
    out = vkern.vatp_prune(kf, vs, ss, budget=30, num_sink=2, num_recent=3, backend=backend)
    _check_prune(out, k, v, s, [100, 100], 30, 2, 3)
    kf2, vs2 = kf.copy(order="F"), np.stack([v, -v], axis=-1).reshape(v.shape[:3] + (-1,))[..., ::2]
    out = vkern.vatp_prune(kf2, vs2, ss, budget=30, num_sink=2, num_recent=3, inplace=True, backend=backend)
    _check_prune(out, k, v, s, [100, 100], 30, 2, 3)


@pytest.mark.skipif(torch is None or _ext.C is None, reason="needs torch and the cpu backend")
def test_prune_inplace_strided_torch(rng):
    k, v, s = _prune_inputs(rng)
    kt = torch.from_numpy(k).transpose(2, 3).contiguous().transpose(2, 3)   # [B, H, T, D] with D-stride T
    vt = torch.from_numpy(np.stack([v, -v], 2).reshape(v.shape[0], -1, *v.shape[2:]))[:, ::2]  # sliced heads
    out = vkern.vatp_prune(kt, vt, torch.from_numpy(s), budget=0.3, num_sink=2, num_recent=3, inplace=True,
                           backend="cpu")
    _check_prune(out, k, v, s, [100, 100], 0.3, 2, 3)
    assert out[0].data_ptr() == kt.data_ptr()


@pytest.mark.skipif(_ext.C is None, reason="cpu backend unavailable")
def test_prune_large_rows_cpu_equals_reference(rng):
    """Big enough to take the streaming-copy path (> 32 MB moved)."""
    k = rng.standard_normal((1, 2, 40000, 128)).astype(np.float32)
    v = rng.standard_normal((1, 2, 40000, 128)).astype(np.float32)
    s = rng.random((1, 2, 40000)).astype(np.float32)
    a = vkern.vatp_prune(k, v, s, budget=0.9, backend="cpu")
    b = vkern.vatp_prune(k, v, s, budget=0.9, backend="reference")
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    k2, v2 = k.copy(), v.copy()
    c = vkern.vatp_prune(k2, v2, s, budget=0.9, inplace=True, backend="cpu")
    for x, y in zip(c, b):
        np.testing.assert_array_equal(x, y)


# ------------------------------------------------- out= and the selection

def _fresh_buf(x, rows, fill=7.0):
    """A caller-provided buffer like x ([B, H, rows, D]) pre-filled, so untouched rows can be checked."""
    if isinstance(x, np.ndarray):
        return np.full(x.shape[:2] + (rows,) + x.shape[3:], fill, dtype=x.dtype)
    return torch.full(tuple(x.shape[:2]) + (rows,) + tuple(x.shape[3:]), fill, dtype=x.dtype, device=x.device)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("extra_rows", [0, 5])
def test_prune_out_equals_out_of_place(backend, dtype, extra_rows, rng):
    if dtype == "bfloat16" and torch is None:
        pytest.skip("needs torch")
    k, v, s = _prune_inputs(rng, H=1 if backend == "triton" else 3)
    lens = np.array([100, 60])
    kin, vin = _as(k, backend, dtype), _as(v, backend, dtype)
    sin = _as(s, backend, as_torch=not isinstance(kin, np.ndarray))
    slin = lens if isinstance(kin, np.ndarray) else _as(lens, backend, "int64", as_torch=True)
    want = vkern.vatp_prune(kin, vin, sin, budget=0.5, num_sink=2, num_recent=5, seq_lens=slin, backend=backend)
    kmax = int(_np(want[3]).max())
    ko, vo = _fresh_buf(kin, kmax + extra_rows), _fresh_buf(vin, kmax + extra_rows)
    got = vkern.vatp_prune(kin, vin, sin, budget=0.5, num_sink=2, num_recent=5, seq_lens=slin, out=(ko, vo),
                           backend=backend)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(_np(a), _np(b))
    _check_prune(got, _np(kin), _np(vin), s, lens, 0.5, 2, 5)
    if isinstance(ko, np.ndarray):     # views of the caller's buffers
        assert np.shares_memory(got[0], ko) and np.shares_memory(got[1], vo)
    else:
        assert got[0].data_ptr() == ko.data_ptr() and got[1].data_ptr() == vo.data_ptr()
    np.testing.assert_array_equal(_np(ko)[:, :, :kmax], _np(got[0]))
    assert np.all(_np(ko)[:, :, kmax:] == 7) and np.all(_np(vo)[:, :, kmax:] == 7)   # rows past kmax untouched
    np.testing.assert_array_equal(_np(kin), _np(_as(k, backend, dtype)))             # inputs untouched


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=pytest.mark.skipif(
    _ext.C is None, reason="no cpu"))])
def test_prune_out_strided_buffers(backend, rng):
    """out= buffers that are views with odd strides: sliced along D, heads interleaved, rows reversed."""
    k, v, s = _prune_inputs(rng)
    want = vkern.vatp_prune(k, v, s, budget=30, num_sink=2, num_recent=3, backend="reference")
    kbig = np.zeros((2, 3, 40, 32), np.float32)
    vbig = np.zeros((2, 6, 30, 8), np.float32)
    ko = kbig[:, :, :, ::2]                          # D stride 2
    vo = vbig[:, ::2]                                # heads interleaved
    got = vkern.vatp_prune(k, v, s, budget=30, num_sink=2, num_recent=3, out=(ko, vo), backend=backend)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
    assert np.all(kbig[:, :, :, 1::2] == 0) and np.all(vbig[:, 1::2] == 0)   # the gaps stay untouched
    # negative strides: NumPy views the CPU kernel cannot take (auto falls back, cpu says why)
    vr = np.zeros((2, 3, 30, 8), np.float32)[:, :, ::-1]
    got = vkern.vatp_prune(k, v, s, budget=30, num_sink=2, num_recent=3, out=(np.zeros_like(ko), vr))
    np.testing.assert_array_equal(got[1], want[1])
    if backend == "cpu":
        with pytest.raises(vkern.BackendUnavailable, match="out= needs non-negative strides"):
            vkern.vatp_prune(k, v, s, budget=30, num_sink=2, num_recent=3, out=(np.zeros_like(ko), vr),
                             backend="cpu")


@pytest.mark.skipif(_ext.C is None, reason="cpu backend unavailable")
@pytest.mark.parametrize("level", ["generic", "avx2", "avx512shape"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_prune_every_simd_level_and_mode(level, dtype, rng):
    """Selection + row moves at every SIMD level: out of place == in place == out= == reference, for
    long rows with many ties (the radix select's later passes and the tie cut), seq_lens, and
    both schedules (one task per head when B*H >= 2 threads, else select then move)."""
    if dtype == "bfloat16" and torch is None:
        pytest.skip("needs torch")
    if level not in _ext.C.simd_supported() and level != "avx512shape":
        pytest.skip(f"{level} not supported here")
    T = 3000
    for B, H, D in ((2, 3, 24), (1, 1, 40)):
        k, v, s = _prune_inputs(rng, B=B, H=H, T=T, Dk=D, Dv=8, ties=False)
        s = np.round(s * 50).astype(np.float32) - 20.0      # ~50 distinct values around 0, +-0.0 included
        s[..., ::7] = -0.0
        s[..., 5::97] = np.nan
        lens = np.array([T, 1234][:B])
        kin, vin = _as(k, "cpu", dtype), _as(v, "cpu", dtype)
        if not isinstance(kin, np.ndarray):
            s, lens = torch.from_numpy(s), torch.from_numpy(lens)
        copy = (lambda x: x.copy()) if isinstance(kin, np.ndarray) else (lambda x: x.clone())
        try:
            vkern.set_simd_level(level)
            res = {}
            for threads in (1, 2):
                vkern.set_num_threads(threads)
                res[f"oop{threads}"] = vkern.vatp_prune(kin, vin, s, budget=0.37, num_sink=3, num_recent=9,
                                                        seq_lens=lens, backend="cpu")
                kmax = int(_np(res[f"oop{threads}"][3]).max())
                bufs = (_fresh_buf(kin, kmax + 2), _fresh_buf(vin, kmax))
                res[f"out{threads}"] = vkern.vatp_prune(kin, vin, s, budget=0.37, num_sink=3, num_recent=9,
                                                        seq_lens=lens, out=bufs, backend="cpu")
                kc, vc = copy(kin), copy(vin)
                res[f"inplace{threads}"] = vkern.vatp_prune(kc, vc, s, budget=0.37, num_sink=3, num_recent=9,
                                                            seq_lens=lens, inplace=True, backend="cpu")
        except ValueError:
            pytest.skip(f"{level} not runnable here")
        finally:
            vkern.set_simd_level("auto")
            vkern.set_num_threads(2)
        want = vkern.vatp_prune(kin, vin, s, budget=0.37, num_sink=3, num_recent=9, seq_lens=lens,
                                backend="reference")
        _check_prune(want, _np(kin), _np(vin), _np(s), _np(lens), 0.37, 3, 9)
        for name, got in res.items():
            for a, b in zip(got, want):
                np.testing.assert_array_equal(_np(a), _np(b), err_msg=name)


@pytest.mark.skipif(_ext.C is None, reason="cpu backend unavailable")
@pytest.mark.parametrize("sdtype", ["float32", "float16", "bfloat16"])
def test_prune_selection_edge_cases_cpu(sdtype, rng):
    """Ties at the threshold cut in the middle of a run of equal scores, all scores equal, -inf/+inf,
    huge and tiny magnitudes, strided scores in every dtype, against the reference selection."""
    if sdtype == "bfloat16" and torch is None:
        pytest.skip("needs torch")
    T = 2048
    cases = [np.full(T, 3.0), np.zeros(T), rng.standard_normal(T) * 1e30,
             np.where(rng.random(T) < 0.5, np.inf, -np.inf), rng.standard_normal(T) * 1e-30,
             np.repeat(rng.integers(0, 3, T // 64), 64).astype(np.float64)]
    s = np.stack(cases)[None].astype(np.float32)                 # [1, 6, T]
    k = rng.standard_normal((1, 6, T, 8)).astype(np.float32)
    with np.errstate(over="ignore"):                             # 1e30 -> inf in float16, on purpose
        sd = _as(s, "cpu", sdtype, as_torch=sdtype == "bfloat16")
    if sdtype == "bfloat16":
        k = torch.from_numpy(k)
    s_exact = _np(sd).astype(np.float32)                         # what the kernel compares
    for budget in (37, 1000, 2047):
        got = vkern.vatp_prune(k, k, sd, budget=budget, num_sink=1, num_recent=4, backend="cpu")
        _check_prune(got, _np(k), _np(k), s_exact, [T], budget, 1, 4)
    k = _np(k)
    ss = np.ascontiguousarray(np.stack([s, s], -1))[..., 0]      # strided scores
    got = vkern.vatp_prune(k, k, ss, budget=600, num_sink=0, num_recent=0, backend="cpu")
    _check_prune(got, k, k, s, [T], 600, 0, 0)


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=pytest.mark.skipif(
    _ext.C is None, reason="no cpu"))])
def test_prune_empty_head_dim(backend, rng):
    """D = 0 caches (nothing to move) still select, in place and into out= too."""
    k = np.zeros((1, 2, 10, 0), np.float32)
    s = rng.random((1, 2, 10)).astype(np.float32)
    want = ref.prune_indices(s, np.array([10]), np.array([5]), 1, 1)
    for kw in (dict(inplace=True), dict(out=(np.zeros((1, 2, 5, 0), np.float32), np.zeros((1, 2, 6, 0), np.float32)))):
        got = vkern.vatp_prune(k.copy(), k.copy(), s, budget=5, num_sink=1, num_recent=1, backend=backend, **kw)
        np.testing.assert_array_equal(got[2], want)
        assert got[0].shape == (1, 2, 5, 0)


def test_prune_bad_out(rng):
    k, v, s = _prune_inputs(rng)
    prune = vkern.vatp_prune
    ko, vo = np.zeros((2, 3, 40, 16), np.float32), np.zeros((2, 3, 40, 8), np.float32)
    with pytest.raises(TypeError, match=r"out: expected a pair \(k_out, v_out\).*length 1"):
        prune(k, v, s, budget=40, out=(ko,))
    with pytest.raises(TypeError, match="out: expected a pair"):
        prune(k, v, s, budget=40, out=ko)
    with pytest.raises(TypeError, match=r"out\[1\]: expected an array for v_out, got str"):
        prune(k, v, s, budget=40, out=(ko, "buffer"))
    with pytest.raises(TypeError, match=r"out\[0\]: expected dtype float32 \(that of k\), got float16"):
        prune(k, v, s, budget=40, out=(ko.astype(np.float16), vo))
    with pytest.raises(ValueError, match=r"out\[0\]: expected shape \[B, H_kv, >= 40, D\] = "
                                         r"\(2, 3, >= 40, 16\) for k, got \(2, 3, 39, 16\)"):
        prune(k, v, s, budget=40, out=(ko[:, :, :39], vo))
    with pytest.raises(ValueError, match=r"out\[1\]: expected shape .* got \(2, 3, 40, 16\)"):
        prune(k, v, s, budget=40, out=(ko, ko.copy()))
    with pytest.raises(ValueError, match=r"out\[1\]: expected shape"):
        prune(k, v, s, budget=40, out=(ko, vo[None]))
    ro = vo.copy()
    ro.flags.writeable = False
    with pytest.raises(ValueError, match=r"out\[1\]: expected a writeable array"):
        prune(k, v, s, budget=40, out=(ko, ro))
    with pytest.raises(ValueError, match=r"out\[0\]: out= needs a layout where no two elements share memory"):
        prune(k, v, s, budget=40, out=(np.lib.stride_tricks.as_strided(ko, ko.shape, (0,) + ko.strides[1:]), vo))
    with pytest.raises(ValueError, match=r"out\[0\]: expected memory separate from k"):
        prune(k, v, s, budget=40, out=(k, vo))
    with pytest.raises(ValueError, match=r"out\[1\]: expected memory separate from v"):
        prune(k, v, s, budget=40, out=(ko, v[:, :, 10:]))
    both = np.zeros((2, 3, 40, 16), np.float32)
    with pytest.raises(ValueError, match=r"out\[0\], out\[1\]: expected separate buffers"):
        prune(k, v, s, budget=40, out=(both, both[..., 4:12]))
    with pytest.raises(ValueError, match="out: cannot be combined with inplace=True"):
        prune(k.copy(), v.copy(), s, budget=40, inplace=True, out=(ko, vo))
    if torch is not None:
        with pytest.raises(TypeError, match="mixed array kinds"):
            prune(k, v, s, budget=40, out=(torch.from_numpy(ko), vo))
    np.testing.assert_array_equal(ko, 0)   # nothing ran


# ---------------------------------------------------------- bad inputs

def test_bad_inputs(rng):
    k, v, s = _prune_inputs(rng)
    prune = vkern.vatp_prune
    with pytest.raises(ValueError, match="budget: expected >= num_sink \\+ num_recent = 36"):
        prune(k, v, s, budget=35)
    with pytest.raises(ValueError, match="budget: a float budget is a fraction"):
        prune(k, v, s, budget=1.5)
    with pytest.raises(ValueError, match="budget: a float budget"):
        prune(k, v, s, budget=0.0)
    with pytest.raises(TypeError, match="budget: expected an int"):
        prune(k, v, s, budget=True)
    with pytest.raises(ValueError, match=r"scores: expected shape \[B, H_kv, T\] = \(2, 3, 100\).*\(2, 3, 99\)"):
        prune(k, v, s[:, :, :99], budget=40)
    with pytest.raises(ValueError, match=r"v: expected leading dims"):
        prune(k, v[:, :2], s, budget=40)
    with pytest.raises(ValueError, match=r"seq_lens: every length must be in \[0, T=100\].*max=101"):
        prune(k, v, s, budget=40, seq_lens=np.array([101, 5]))
    with pytest.raises(ValueError, match=r"seq_lens: expected shape \(2,\)"):
        prune(k, v, s, budget=40, seq_lens=np.array([5]))
    with pytest.raises(TypeError, match="seq_lens: expected an integer array"):
        prune(k, v, s, budget=40, seq_lens=np.array([5.0, 5.0]))
    with pytest.raises(ValueError, match="num_sink: expected an int >= 0, got -1"):
        prune(k, v, s, budget=40, num_sink=-1)
    with pytest.raises(TypeError, match="k: expected float32, float16 or bfloat16, got int32"):
        prune(k.astype(np.int32), v, s, budget=40)
    with pytest.raises(ValueError, match=r"k: expected shape \[B, H_kv, T, D\]"):
        prune(k[0], v, s, budget=40)
    with pytest.raises(ValueError, match="k, v: inplace=True needs k and v in separate memory"):
        prune(k, k, s, budget=40, inplace=True)
    ro = k.copy()
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="k: inplace=True needs a writeable array"):
        prune(ro, v, s, budget=40, inplace=True)
    with pytest.raises(ValueError, match="k: inplace=True needs a layout where no two elements share memory"):
        prune(np.lib.stride_tricks.as_strided(k, k.shape, (0,) + k.strides[1:]), v, s, budget=40, inplace=True)
    with pytest.raises(ValueError, match="backend: expected one of"):
        prune(k, v, s, budget=40, backend="gpu")

    q = rng.standard_normal((2, 4, 10, 16)).astype(np.float32)
    kk = rng.standard_normal((2, 3, 10, 16)).astype(np.float32)
    colsum = vkern.vatp.attention_colsum
    with pytest.raises(ValueError, match="q: query heads Hq=4 must be a multiple of the KV heads H_kv=3"):
        colsum(q, kk)
    with pytest.raises(ValueError, match="k: expected head dim D=16 \\(from q\\), got 8"):
        colsum(q, kk[:, :2, :, :8])
    with pytest.raises(ValueError, match="k: expected batch B=2"):
        colsum(q, kk[:1, :2])
    with pytest.raises(ValueError, match=r"seq_lens: every length must be in \[0, T=10\]"):
        colsum(q, kk[:, :2], seq_lens=np.array([11, 1]))
    with pytest.raises(ValueError, match=r"q: expected shape \[B, Hq, Tq, D\]"):
        colsum(q[0], kk)
    with pytest.raises(ValueError, match="q: expected a head dim D >= 1"):
        colsum(q[..., :0], kk[:, :2, :, :0])
    with pytest.raises(TypeError, match="causal: expected a bool"):
        colsum(q, kk[:, :2], causal="yes")
    with pytest.raises(ValueError, match="scale: expected a finite float"):
        colsum(q, kk[:, :2], scale=float("nan"))
    with pytest.raises(TypeError, match="v: expected float32"):
        vkern.vatp.value_l1(np.ones((1, 1, 2, 2), np.int64))
    with pytest.raises(ValueError, match=r"v: expected shape \[B, H_kv, T, D\]"):
        vkern.vatp.value_l1(np.ones((2, 2), np.float32))


def test_backend_unavailable_lists_reasons(rng):
    k, v, s = _prune_inputs(rng)
    if _usable("cuda"):
        pytest.skip("CUDA present")
    with pytest.raises(vkern.BackendUnavailable, match="cuda:"):
        vkern.vatp_prune(k, v, s, budget=40, backend="cuda")


# ------------------------------------------------------------------ torch

@pytest.mark.skipif(torch is None, reason="needs torch")
def test_torch_custom_ops_opcheck(rng):
    from vkern import _torch  # noqa: F401

    be = "cpu" if _ext.C is not None else "reference"   # the C++ kernels when built (what "auto" picks here)
    q = torch.randn(2, 4, 6, 8)
    k = torch.randn(2, 2, 10, 8)
    v = torch.randn(2, 2, 10, 4)
    s = torch.rand(2, 2, 10)
    sl = torch.tensor([10, 7])
    ops = torch.ops.vkern
    torch.library.opcheck(ops.attention_colsum.default, (q, k, None, True, None, be))
    torch.library.opcheck(ops.attention_colsum.default, (q, k, sl, False, 0.3, be))
    torch.library.opcheck(ops.value_l1.default, (v, be))
    torch.library.opcheck(ops.vatp_prune.default, (k, v, s, None, 6, 0.0, 2, 2, be))
    torch.library.opcheck(ops.vatp_prune.default, (k, v, s, sl, -1, 0.5, 1, 2, be))
    torch.library.opcheck(ops.vatp_prune_.default, (k.clone(), v.clone(), s, sl, -1, 0.5, 1, 2, be))
    torch.library.opcheck(ops.vatp_prune_.default, (k.clone(), v.clone(), s, None, 5, 0.0, 1, 2, be))
    torch.library.opcheck(ops.vatp_prune_out.default, (k, v, s, sl, -1, 0.5, 1, 2, be, torch.zeros(2, 2, 6, 8),
                                                       torch.zeros(2, 2, 5, 4)))
    torch.library.opcheck(ops.vatp_prune_out.default, (k, v, s, None, 5, 0.0, 1, 2, be, torch.zeros(2, 2, 5, 8),
                                                       torch.zeros(2, 2, 5, 4)))


@pytest.mark.skipif(torch is None, reason="needs torch")
def test_torch_compile_out(rng):
    """vatp_prune(out=...) under torch.compile goes through vkern::vatp_prune_out and writes the buffers."""
    k, v, s = (torch.from_numpy(x) for x in _prune_inputs(rng, ties=False))
    ko, vo = torch.zeros(2, 3, 40, 16), torch.zeros(2, 3, 40, 8)

    def f(k, v, s, ko, vo):
        return vkern.vatp_prune(k, v, s, budget=40, num_sink=2, num_recent=3, out=(ko, vo), backend="cpu"
                                if _ext.C is not None else "reference")

    got = torch.compile(f, backend="eager", fullgraph=True)(k, v, s, ko, vo)
    want = vkern.vatp_prune(k, v, s, budget=40, num_sink=2, num_recent=3, backend="reference")
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    np.testing.assert_array_equal(ko.numpy(), want[0].numpy())


@pytest.mark.skipif(torch is None, reason="needs torch")
def test_scores_pipeline_torch(rng):
    """colsum x value_l1 -> prune, all torch, and results as torch on the input device."""
    q = torch.randn(1, 4, 16, 8)
    k = torch.randn(1, 2, 16, 8)
    v = torch.randn(1, 2, 16, 8)
    scores = vkern.vatp.attention_colsum(q, k) * vkern.vatp.value_l1(v)
    k2, v2, idx, lens = vkern.vatp_prune(k, v, scores, budget=8, num_sink=1, num_recent=2)
    assert all(isinstance(x, torch.Tensor) for x in (k2, v2, idx, lens))
    assert idx.dtype == torch.int64 and lens.tolist() == [8]
    want = ref.prune_indices(scores.numpy(), np.array([16]), np.array([8]), 1, 2)
    np.testing.assert_array_equal(idx.numpy(), want)
