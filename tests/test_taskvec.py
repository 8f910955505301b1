"""vkern.taskvec / apply_task_vectors / delta_linear: every backend against the
NumPy reference and independent float64 brute forces, over every format, bit
width, group size, tail K, dtype and method of SPEC §4, plus its invariants and
bad inputs."""
import io

import numpy as np
import pytest

import vkern
from vkern import taskvec as tv
from vkern.reference import taskvec as ref

from conftest import HAVE_CUDA, HAVE_TORCH
from conftest import needs as shared_needs

if HAVE_TORCH:
    import torch

BACKENDS = ["reference", "cpu", "triton", "cuda"]
FORMATS = [("affine", b, g) for b in (2, 3, 4, 8) for g in (None, "row", 32, 64, 128)] + \
          [("sign", 1, g) for g in (None, "row", 32, 64, 128)]
FORMAT_IDS = [f"{s[0]}{b}-{g}" for s, b, g in FORMATS]
EPS = {"float32": 2.0 ** -23, "float16": 2.0 ** -10, "bfloat16": 2.0 ** -7}


def needs(name, op="apply_task_vectors"):
    shared_needs(name, op)


def device_for(backend):
    return "cuda" if backend == "cuda" or (backend == "triton" and HAVE_CUDA) else "cpu"


def to_kind(backend, a, dtype="float32"):
    """NumPy for reference/cpu (float32/float16), torch otherwise (and for bfloat16)."""
    a = np.asarray(a)
    if backend in ("reference", "cpu") and dtype in ("float32", "float16") and a.dtype.kind == "f":
        return a.astype(dtype)
    if backend in ("reference", "cpu") and a.dtype.kind != "f":
        return a
    t = torch.from_numpy(np.ascontiguousarray(a))
    if t.is_floating_point():
        t = t.to(getattr(torch, dtype))
    return t.to(device_for(backend))


def qkind(backend, qtvs):
    return tv.to_device(qtvs, device_for(backend)) if backend in ("triton", "cuda") else qtvs


def host(x):
    if HAVE_TORCH and isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy().astype(np.float64)
    return np.asarray(x, dtype=np.float64)


def make_tau(rng, N, K, zeros=0.2, scale=0.02):
    tau = (rng.laplace(size=(N, K)) * scale).astype(np.float32)
    tau[rng.random((N, K)) < zeros] = 0.0
    return tau


def q_of(tau, fmt):
    scheme, bits, g = fmt
    return tv.quantize(tau, bits=bits, group_size=g, scheme=scheme)


def expand(per_group, N, K, gs):
    return ref._expand(np.asarray(per_group), N, K, gs)


# ------------------------------------------------------------- quantizer

@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("K", [1, 7, 33, 130, 257])
def test_quantize_bounds_zeros_and_round_trip(rng, fmt, K):
    N = 5
    tau = make_tau(rng, N, K)
    tau[0, 0] = 0.0
    q = q_of(tau, fmt)
    d = tv.dequantize(q, backend="reference")
    assert d.dtype == np.float32 and d.shape == (N, K)
    if fmt[0] == "affine":
        step = expand(q.scales, N, K, q.group_size)
        assert np.all(np.abs(d.astype(np.float64) - tau) <= step * (0.5 + 1e-6))
        assert np.all(d[tau == 0] == 0)                          # exact zeros stay zero
        assert q.zero_points.max() <= (1 << fmt[1]) - 1
    else:
        s = expand(q.scales, N, K, q.group_size)
        assert np.array_equal(d, np.where(tau >= 0, s, -s))          # 0 maps to +scale
    # bits past K in each row's last byte are zero
    tail = K * fmt[1] % 8
    if tail:
        assert np.all(q.codes[:, -1] >> tail == 0)
    # bit-exact round trip, also through an .npz file
    q2 = tv.QTaskVector.from_dict(q.to_dict())
    buf = io.BytesIO()
    np.savez(buf, **q.to_dict())
    buf.seek(0)
    q3 = tv.QTaskVector.from_dict(dict(np.load(buf)))
    for other in (q2, q3):
        for name in ("codes", "scales", "zero_points"):
            a, b = getattr(q, name), getattr(other, name)
            assert (a is None and b is None) or (a.dtype == b.dtype and np.array_equal(a.view(np.uint8), b.view(np.uint8)))
        assert (other.scheme, other.bits, other.shape, other.granularity, other.group_size) == \
               (q.scheme, q.bits, q.shape, q.granularity, q.group_size)


def test_bit_layout_brute(rng):
    """Element k of row n at bits [k*b, (k+1)*b) of the row, LSB first; checked bit by bit."""
    for bits in (1, 2, 3, 4, 8):
        codes = rng.integers(0, 1 << bits, size=(3, 13))
        packed = ref.pack_codes(codes, bits)
        assert packed.shape == (3, (13 * bits + 7) // 8)
        for n in range(3):
            for k in range(13):
                v = sum(((int(packed[n, (k * bits + i) // 8]) >> ((k * bits + i) % 8)) & 1) << i for i in range(bits))
                assert v == codes[n, k]
        assert np.array_equal(ref.unpack_codes(packed, bits, 13), codes)


@pytest.mark.parametrize("g", [None, "row", 32])
def test_sign_scale_is_mean_abs(rng, g):
    N, K = 4, 70
    tau = make_tau(rng, N, K)
    q = tv.quantize(tau, bits=1, scheme="sign", group_size=g)
    gs = {None: N * K, "row": K, 32: 32}[g]
    for n in range(N):
        for k0 in range(0, K, 32 if g == 32 else K):
            blk = tau if g is None else tau[n:n + 1, k0:k0 + gs]
            want = np.mean(np.abs(blk.astype(np.float64)))
            got = q.scales[0, 0] if g is None else q.scales[n, k0 // gs]
            assert got == pytest.approx(want, rel=1e-6)
    d = tv.dequantize(q)
    assert np.all(np.where(tau >= 0, d > 0, d < 0) | (d == 0))   # 0 maps to +scale


def test_affine_8bit_brute(rng):
    """Independent min-max quantizer in float64 for one group: same codes."""
    x = make_tau(rng, 1, 32)
    q = tv.quantize(x, bits=8, group_size=32)
    lo, hi = min(x.min(), 0.0), max(x.max(), 0.0)
    step = float(q.scales[0, 0])
    assert step >= (hi - lo) / 255 and step == pytest.approx((hi - lo) / 255, rel=1e-6)
    z = int(np.clip(np.rint(-lo / step), 0, 255))
    assert q.zero_points[0, 0] == z
    codes = np.clip(np.rint(x.astype(np.float64) / step) + z, 0, 255)
    assert np.array_equal(ref.unpack_codes(q.codes, 8, 32), codes.astype(np.int16))


def test_all_zero_tau(rng):
    for fmt in FORMATS:
        q = q_of(np.zeros((3, 40), np.float32), fmt)
        assert np.all(tv.dequantize(q) == 0)


# ------------------------------------------------------------ dequantize

@pytest.mark.parametrize("backend", BACKENDS)
def test_dequantize_backends_bit_exact(rng, backend):
    needs(backend, "dequantize")
    N, K = 3, 45 if backend in ("triton",) else 261
    taus = [make_tau(rng, N, K) for _ in range(3)]
    qs = [q_of(taus[i % 3], f) for i, f in enumerate(FORMATS)]
    qs += tv.quantize_residual(taus, base_bits=3, offset_bits=2, group_size=32)
    qs += tv.quantize_residual(taus, base_bits=4, offset_bits=1)
    for q in qkind(backend, qs):
        got = tv.dequantize(q, backend=backend)
        want = tv.dequantize(tv.to_device([q], "numpy")[0], backend="reference")
        assert np.array_equal(host(got), want), q


# ----------------------------------------------------------------- apply

def tol_check(got, want64, scale64, dtype):
    """float32: within 1e-5 of the magnitudes summed; f16/bf16: error vs float64 at most 2x
    the reference's own (its float64 result rounded to the dtype)."""
    got = host(got)
    if dtype == "float32":
        assert np.all(np.abs(got - want64) <= 1e-5 * scale64 + 1e-30), np.max(np.abs(got - want64) / scale64)
    else:
        import torch as _t  # noqa: F401 (bf16 rounding through torch)
        ref_err = np.abs(host(torch.from_numpy(want64).to(getattr(torch, dtype))) - want64).max()
        err = np.abs(got - want64).max()
        assert err <= 2 * ref_err + 1e-6 * scale64.max(), (err, ref_err)


def apply_scale(base, qs, coeffs):
    s = np.abs(host(base))
    for q, c in zip(qs, coeffs):
        s = s + abs(c) * np.abs(tv.dequantize(tv.to_device([q], "numpy")[0]).astype(np.float64))
    return s + 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["sum", "ties"])
@pytest.mark.parametrize("density", [None, 0.3])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_apply_mixed_formats(rng, backend, method, density, dtype):
    needs(backend)
    if backend == "triton" and dtype == "bfloat16" and not HAVE_CUDA:
        pytest.skip("the Triton interpreter rounds bfloat16 stores by truncation")
    small = backend == "triton"
    N, K = (3, 37) if small else (6, 300)
    base = rng.standard_normal((N, K)).astype(np.float32)
    # (every format on its own: test_apply_each_format_cpu; here a mix of them in one call)
    fmts = FORMATS[::4] if small else FORMATS[::2] + FORMATS[1::6]
    qs = [q_of(make_tau(rng, N, K), f) for f in fmts]
    qs += tv.quantize_residual([make_tau(rng, N, K) for _ in range(3)], group_size=64)
    # ties divides by the sum of agreeing coefficients: keep them positive (mergekit weights)
    coeffs = rng.uniform(-0.5, 1.0, len(qs)) if method == "sum" else rng.uniform(0.2, 1.0, len(qs))
    b = to_kind(backend, base, dtype)
    got = vkern.apply_task_vectors(b, qkind(backend, qs), coeffs, method=method, density=density, backend=backend)
    assert type(got) is type(b) and str(got.dtype).replace("torch.", "") == dtype and tuple(got.shape) == (N, K)
    want = ref.apply_task_vectors(host(b), qs, coeffs, method, density)
    tol_check(got, want, apply_scale(host(b), qs, coeffs if method == "sum" else np.ones(len(qs))), dtype)


@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("K", [5, 64, 129])
def test_apply_each_format_cpu(rng, fmt, K):
    needs("cpu")
    N = 4
    base = rng.standard_normal((N, K)).astype(np.float32)
    qs = [q_of(make_tau(rng, N, K), fmt) for _ in range(2)]
    for method, density in (("sum", None), ("ties", 0.5)):
        got = vkern.apply_task_vectors(base, qs, [0.7, -0.4], method=method, density=density, backend="cpu")
        want = ref.apply_task_vectors(base, qs, [0.7, -0.4], method, density)
        tol_check(got, want, apply_scale(base, qs, [0.7, -0.4]), "float32")


@pytest.mark.parametrize("level", ["generic", "avx2"])
def test_apply_simd_levels(rng, level):
    needs("cpu")
    try:
        vkern.set_simd_level(level)
    except ValueError as exc:
        pytest.skip(str(exc))
    try:
        N, K = 5, 203
        base = rng.standard_normal((N, K)).astype(np.float16)
        qs = [q_of(make_tau(rng, N, K), f) for f in FORMATS]
        c = rng.uniform(-1, 1, len(qs))
        for method, density in (("sum", None), ("ties", 0.4), ("sum", 0.2)):
            got = vkern.apply_task_vectors(base, qs, c, method=method, density=density, backend="cpu")
            want = ref.apply_task_vectors(base, qs, c, method, density)
            tol_check(got, want, apply_scale(base, qs, c), "float16")
        x = rng.standard_normal((5, K)).astype(np.float32)
        ids = np.array([0, -1, 20, 21, 3])
        got = vkern.delta_linear(x, base.astype(np.float32), qs, task_ids=ids, backend="cpu")
        want = ref.delta_linear(x, base.astype(np.float32), qs, None, ids)
        assert np.allclose(got, want, rtol=1e-5, atol=1e-4)
        for q in qs:
            assert np.array_equal(tv.dequantize(q, backend="cpu"), tv.dequantize(q, backend="reference"))
    finally:
        vkern.set_simd_level("auto")


def ties_brute(base, taus, c):
    """mergekit ties with weights before election, element by element in float64."""
    out = np.array(base, dtype=np.float64)
    N, K = out.shape
    for n in range(N):
        for k in range(K):
            w = [c[t] * float(taus[t][n, k]) for t in range(len(taus))]
            positive = sum(w) >= 0
            agree = [t for t in range(len(taus)) if (w[t] > 0 if positive else w[t] < 0)]
            den = sum(c[t] for t in agree)
            out[n, k] += sum(w[t] for t in agree) / (den if den != 0 else 1.0)
    return out


def test_ties_reference_matches_brute(rng):
    N, K = 3, 17
    base = rng.standard_normal((N, K)).astype(np.float32)
    qs = [q_of(make_tau(rng, N, K, zeros=0.3), f) for f in (("affine", 4, None), ("sign", 1, None), ("affine", 2, 32))]
    c = [0.9, -0.3, 0.5]
    taus = [tv.dequantize(q) for q in qs]
    assert np.allclose(ref.apply_task_vectors(base, qs, c, "ties"), ties_brute(base, taus, c), rtol=0, atol=1e-12)
    # opposite coefficients that cancel: sum 0 -> elected +, zeros never agree, 0-sum divisor -> 1
    q = qs[0]
    got = ref.apply_task_vectors(base, [q, q], [1.0, -1.0], "ties")
    assert np.allclose(got, ties_brute(base, [taus[0]] * 2, [1.0, -1.0]), atol=1e-12)


def test_trim_exact_count_ties_lower_index(rng):
    v = np.array([[1.0, -2.0, 2.0, 0.5, -2.0, 2.0]], np.float32)
    keep = ref.trim_keep(v, 0.5)                                   # k = 3 of 6
    assert keep.tolist() == [[False, True, True, False, True, False]]
    for density in (0.0, 0.1, 0.34, 0.5, 0.99, 1.0):
        a = np.abs(rng.integers(-3, 4, 200)).astype(np.float32)
        k = int(density * a.size)
        thr, cut = ref.trim_threshold(a, k)
        mask = (a > thr) | ((a == thr) & (np.arange(a.size) <= cut))
        assert mask.sum() == k and np.array_equal(mask, ref.trim_keep(a, density))
        order = np.lexsort((np.arange(a.size), -a))[:k]
        assert np.array_equal(np.sort(order), np.flatnonzero(mask))


@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda"])
def test_trim_count_through_kernels(rng, backend):
    needs(backend)
    N, K = (3, 40) if backend == "triton" else (16, 250)
    # per-tensor 2-bit codes: few distinct magnitudes, so the tie rule decides most of the set
    q = tv.quantize(make_tau(rng, N, K), bits=2)
    d = tv.dequantize(q)
    for density in (0.1, 0.37, 0.9):
        zero = to_kind(backend, np.zeros((N, K), np.float32))
        got = host(vkern.apply_task_vectors(zero, qkind(backend, [q]), [1.0], density=density, backend=backend))
        keep = ref.trim_keep(d, density)
        assert np.array_equal(got, np.where(keep, d, 0).astype(np.float64))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_zero_coeffs_return_base_exactly(rng, backend, dtype):
    needs(backend)
    N, K = 4, 50
    base = to_kind(backend, rng.standard_normal((N, K)).astype(np.float32), dtype)
    qs = [q_of(make_tau(rng, N, K), f) for f in FORMATS[::3]]
    for method in ("sum", "ties"):
        got = vkern.apply_task_vectors(base, qkind(backend, qs), np.zeros(len(qs)), method=method, backend=backend)
        assert np.array_equal(host(got), host(base))


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton", "cuda"])
def test_one_8bit_task_reconstructs_finetune(rng, backend):
    needs(backend)
    N, K = 5, 140
    w0 = rng.standard_normal((N, K)).astype(np.float32)
    tau = make_tau(rng, N, K)
    for g in (None, 32, 128):
        q = tv.quantize(tau, bits=8, group_size=g)
        got = host(vkern.apply_task_vectors(to_kind(backend, w0), qkind(backend, [q]), [1.0], backend=backend))
        step = expand(q.scales, N, K, q.group_size)
        ft = w0.astype(np.float64) + tau
        assert np.all(np.abs(got - ft) <= step / 2 + 4 * EPS["float32"] * np.abs(ft))


@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda"])
def test_all_at_once_equals_one_by_one(rng, backend):
    needs(backend)
    N, K = 4, 96
    base = rng.standard_normal((N, K)).astype(np.float32)
    qs = [q_of(make_tau(rng, N, K), f) for f in (("affine", 4, 32), ("sign", 1, "row"), ("affine", 3, None))]
    c = [0.3, 0.5, -0.2]
    at_once = host(vkern.apply_task_vectors(to_kind(backend, base), qkind(backend, qs), c, backend=backend))
    w = to_kind(backend, base)
    for q, ct in zip(qkind(backend, qs), c):
        w = vkern.apply_task_vectors(w, [q], [ct], backend=backend)
    assert np.allclose(at_once, host(w), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_out_in_place_and_layouts(rng, backend):
    needs(backend)
    N, K = 6, 70
    base = rng.standard_normal((N, K)).astype(np.float32)
    qs = [q_of(make_tau(rng, N, K), ("affine", 4, 32)), q_of(make_tau(rng, N, K), ("sign", 1, None))]
    want = vkern.apply_task_vectors(base, qs, [0.5, 0.5], backend="reference")
    w = base.copy()
    res = vkern.apply_task_vectors(w, qs, [0.5, 0.5], out=w, backend=backend)
    assert res is w and np.allclose(w, want, rtol=1e-6, atol=1e-7)
    f = np.asfortranarray(base)
    assert np.allclose(vkern.apply_task_vectors(f, qs, [0.5, 0.5], backend=backend), want, rtol=1e-6, atol=1e-7)
    big = np.zeros((N, 2 * K), np.float32)
    big[:, ::2] = base
    assert np.allclose(vkern.apply_task_vectors(big[:, ::2], qs, [0.5, 0.5], backend=backend), want, rtol=1e-6, atol=1e-7)
    out = np.zeros((N, 2 * K), np.float32)
    vkern.apply_task_vectors(base, qs, [0.5, 0.5], out=out[:, :K], backend=backend)
    assert np.allclose(out[:, :K], want, rtol=1e-6, atol=1e-7) and np.all(out[:, K:] == 0)
    assert np.array_equal(base, f)                                   # inputs untouched


def test_empty_task_list_and_empty_rows(rng):
    needs("cpu")
    base = rng.standard_normal((3, 9)).astype(np.float32)
    for backend in ("reference", "cpu"):
        assert np.array_equal(vkern.apply_task_vectors(base, [], [], backend=backend), base)
        e = np.zeros((0, 9), np.float32)
        q = tv.quantize(e, bits=4) if False else tv.quantize(np.zeros((1, 9), np.float32), bits=4)
        assert vkern.apply_task_vectors(e, [], [], backend=backend).shape == (0, 9)
        assert q.shape == (1, 9)


# ------------------------------------------------------------ delta_linear

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_delta_linear_equals_dense(rng, backend, dtype):
    needs(backend, "delta_linear")
    if backend == "triton" and dtype == "bfloat16" and not HAVE_CUDA:
        pytest.skip("bfloat16 tl.dot is broken in the Triton interpreter")
    small = backend == "triton"
    N, K, M = (5, 40, 3) if small else (9, 203, 7)
    base = rng.standard_normal((N, K)).astype(np.float32) * 0.1
    fmts = [("sign", 1, None), ("sign", 1, "row"), ("sign", 1, 32), ("affine", 4, 128), ("affine", 3, 64),
            ("affine", 2, None), ("affine", 8, "row")]
    qs = [q_of(make_tau(rng, N, K), f) for f in fmts]
    qs += tv.quantize_residual([make_tau(rng, N, K) for _ in range(2)], group_size=32)
    coeffs = rng.uniform(0.2, 1.0, len(qs))
    x = rng.standard_normal((M, K)).astype(np.float32)
    xb, bb = to_kind(backend, x, dtype), to_kind(backend, base, dtype)
    T = len(qs)
    ids = rng.integers(-1, T, M)
    ids[:2] = [-1, 0]
    for kw in (dict(coeffs=coeffs), dict(task_ids=to_kind(backend, ids)), dict(coeffs=coeffs, task_ids=to_kind(backend, ids)),
               dict()):
        got = vkern.delta_linear(xb, bb, qkind(backend, qs), backend=backend, **kw)
        assert type(got) is type(xb) and tuple(got.shape) == (M, N)
        c = kw.get("coeffs")
        want = ref.delta_linear(host(xb), host(bb), qs, c, None if "task_ids" not in kw else ids)
        scale = np.abs(host(xb)) @ (np.abs(host(bb)) + sum(np.abs(tv.dequantize(q)) for q in qs)).T + 1e-6
        if dtype == "float32":
            assert np.all(np.abs(host(got) - want) <= 1e-5 * scale)
        else:
            tol_check(got, want, scale, dtype)
    # the definition: x @ apply_task_vectors(...)^T, row by row for task ids
    ab = vkern.apply_task_vectors(base, qs, coeffs, backend="reference").astype(np.float64)
    got = host(vkern.delta_linear(to_kind(backend, x), to_kind(backend, base), qkind(backend, qs), coeffs,
                                  backend=backend))
    assert np.allclose(got, x.astype(np.float64) @ ab.T, rtol=1e-4, atol=1e-4)
    for m in range(M):
        t = ids[m]
        wt = base if t < 0 else vkern.apply_task_vectors(base, [qs[t]], [1.0], backend="reference")
        one = host(vkern.delta_linear(to_kind(backend, x[m]), to_kind(backend, base), qkind(backend, qs),
                                      task_ids=to_kind(backend, ids[m:m + 1]), backend=backend))
        assert one.shape == (1, N) or one.shape == (N,)
        assert np.allclose(one.reshape(-1), x[m].astype(np.float64) @ wt.astype(np.float64).T, rtol=1e-4, atol=1e-4)


def test_delta_linear_single_row_and_many_rows(rng):
    needs("cpu")
    N, K = 33, 129
    base = rng.standard_normal((N, K)).astype(np.float32)
    qs = [q_of(make_tau(rng, N, K), ("sign", 1, None)) for _ in range(3)]
    x = rng.standard_normal((70, K)).astype(np.float32)
    ids = rng.integers(-1, 3, 70)
    got = vkern.delta_linear(x, base, qs, task_ids=ids, backend="cpu")
    want = ref.delta_linear(x, base, qs, None, ids)
    assert np.allclose(got, want, rtol=1e-5, atol=1e-4)
    # many rows: float32 takes the BLAS for x @ base^T plus the delta kernel, float16 the full kernel
    mixed = qs[:2] + [q_of(make_tau(rng, N, K), ("affine", 4, 32))]
    for b in (base, base.astype(np.float16)):
        for kw in (dict(coeffs=[0.5, -1.0, 2.0]), dict(task_ids=ids)):
            got = vkern.delta_linear(x, b, mixed, backend="cpu", **kw)
            want = ref.delta_linear(x, b.astype(np.float32), mixed, kw.get("coeffs"), kw.get("task_ids"))
            assert np.allclose(got, want, rtol=1e-5, atol=1e-4)
    y1 = vkern.delta_linear(x[0], base, qs, backend="cpu")
    assert y1.shape == (N,) and np.allclose(y1, ref.delta_linear(x[:1], base, qs, None, None)[0], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("M", [1, 3, 5, 8])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_delta_linear_fused_bitdelta_path(rng, M, dtype):
    """Few rows, sign tasks with one scale per tensor/row (the fused dot + bit-sum pass)."""
    needs("cpu")
    N, K = 37, 301
    base = (rng.standard_normal((N, K)) * 0.1).astype(dtype)
    qs = [q_of(make_tau(rng, N, K), ("sign", 1, g)) for g in (None, "row", None)]
    x = rng.standard_normal((M, K)).astype(np.float32)
    ids = np.array([-1, 0, 1, 2, 1, 0, 2, -1][:M])
    c = [0.5, 1.5, -1.0]
    want = ref.delta_linear(x, base.astype(np.float32), qs, c, ids)
    scale = np.abs(x) @ (np.abs(base.astype(np.float64)) + sum(np.abs(tv.dequantize(q)) for q in qs)).T
    try:
        for level in ("generic", "auto"):
            vkern.set_simd_level(level)
            got = vkern.delta_linear(x, base, qs, c, task_ids=ids, backend="cpu")
            assert np.all(np.abs(got - want) <= 1e-5 * scale), level
    finally:
        vkern.set_simd_level("auto")


@pytest.mark.parametrize("M", [1, 2, 4, 8])
@pytest.mark.parametrize("K", [64, 301, 576])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_delta_linear_q4_decode_path(rng, M, K, dtype):
    """Few rows, every task affine 4-bit with groups of whole 32-column blocks (the decode path:
    base row and each tenant's nibbles in one pass, x deinterleaved per 16 columns): every SIMD
    level against the reference, K with and without a 16-column tail, numpy and torch."""
    needs("cpu")
    N = 45
    base = (rng.standard_normal((N, K)) * 0.1).astype(np.float32)
    gs = [g for g in (32, 64, 128) if g <= K] + ["row" if K % 32 == 0 else 32, None if K % 32 == 0 else 64]
    qs = [q_of(make_tau(rng, N, K, zeros=0.0), ("affine", 4, g)) for g in gs]
    x = rng.standard_normal((M, K)).astype(np.float32)
    ids = np.minimum(np.array([0, -1, 1, 2, 3, 4, 2, 0][:M]), len(qs) - 1)
    c = rng.uniform(-1.5, 1.5, len(qs))
    bb = to_kind("cpu", base, dtype)
    xk = x if isinstance(bb, np.ndarray) else torch.from_numpy(x)
    want = ref.delta_linear(x, host(bb).astype(np.float32), qs, c, ids)
    scale = np.abs(x) @ (np.abs(host(bb).astype(np.float64)) + sum(np.abs(tv.dequantize(q)) for q in qs)).T
    levels = [lv for lv in ("generic", "avx2") if lv in vkern.info().get("simd_supported", [])]
    try:
        for level in levels + ["auto"]:
            vkern.set_simd_level(level)
            for kw in (dict(coeffs=c, task_ids=ids), dict(task_ids=ids)):
                got = host(vkern.delta_linear(xk, bb, qs, backend="cpu", **kw))
                w = want if "coeffs" in kw else ref.delta_linear(x, host(bb).astype(np.float32), qs, None, ids)
                if dtype == "float32":  # a 16-bit base widens exactly; its output is rounded to 16 bits
                    assert np.all(np.abs(got - w) <= 1e-5 * scale), (level, list(kw))
                else:
                    tol_check(got, w, scale, dtype)
    finally:
        vkern.set_simd_level("auto")


# ------------------------------------------------------------------- RTVQ

def test_rtvq_shared_base_storage_and_accuracy(rng):
    N, K, T = 16, 256, 4
    shared = make_tau(rng, N, K, zeros=0.0)
    taus = [shared + 0.3 * make_tau(rng, N, K, zeros=0.0) for _ in range(T)]
    qs = tv.quantize_residual(taus, base_bits=3, offset_bits=2, group_size=128)
    assert all(q.base is qs[0].base for q in qs)
    assert tv.storage_bytes(qs) == qs[0].base.nbytes + sum(q.nbytes for q in qs)
    per_task_2bit = [tv.quantize(t, bits=2, group_size=128) for t in taus]
    per_task_3bit = [tv.quantize(t, bits=3, group_size=128) for t in taus]
    assert tv.storage_bytes(qs) < tv.storage_bytes(per_task_3bit)      # 2 + 3/T bits per entry < 3
    for q, t in zip(qs, taus):
        d = tv.dequantize(q)
        assert np.array_equal(d, tv.dequantize(q.base) + tv.dequantize(tv.QTaskVector(
            q.scheme, q.bits, q.shape, q.granularity, q.group_size, q.codes, q.scales, q.zero_points)))
    err_rtvq = np.mean([np.linalg.norm(tv.dequantize(q) - t) / np.linalg.norm(t) for q, t in zip(qs, taus)])
    err_2bit = np.mean([np.linalg.norm(tv.dequantize(q) - t) / np.linalg.norm(t) for q, t in zip(per_task_2bit, taus)])
    assert err_rtvq < err_2bit
    rt = tv.QTaskVector.from_dict(qs[1].to_dict())
    assert rt.base is not None and np.array_equal(tv.dequantize(rt), tv.dequantize(qs[1]))


# -------------------------------------------------------------- bad input

def test_bad_inputs(rng):
    N, K = 4, 40
    base = rng.standard_normal((N, K)).astype(np.float32)
    q = tv.quantize(make_tau(rng, N, K), bits=4, group_size=32)
    other = tv.quantize(make_tau(rng, N, K + 1), bits=4)
    with pytest.raises(ValueError, match=r"qtvs\[1\]: expected shape \(4, 40\).*got \(4, 41\)"):
        vkern.apply_task_vectors(base, [q, other], [1, 1])
    with pytest.raises(ValueError, match=r"qtvs\[1\]: expected shape"):
        vkern.delta_linear(base[:1], base, [q, other])
    with pytest.raises(ValueError, match=r"bits: expected one of \(2, 3, 4, 8\).*got 5"):
        tv.quantize(base, bits=5)
    with pytest.raises(ValueError, match=r"bits: expected one of \(1,\).*got 2"):
        tv.quantize(base, bits=2, scheme="sign")
    bad = tv.quantize(base, bits=4)
    bad.bits = 5
    with pytest.raises(ValueError, match=r"qtvs\[0\]\.bits: expected one of"):
        vkern.apply_task_vectors(base, [bad], [1.0])
    with pytest.raises(ValueError, match=r"coeffs: expected length T=1.*got shape \(2,\)"):
        vkern.apply_task_vectors(base, [q], [1.0, 2.0])
    with pytest.raises(ValueError, match=r"coeffs: expected length T=1"):
        vkern.delta_linear(base[:2], base, [q], [1.0, 2.0])
    with pytest.raises(ValueError, match=r"task_ids: every id must be in \[-1, T=1\).*max=1"):
        vkern.delta_linear(base[:2], base, [q], task_ids=np.array([0, 1]))
    with pytest.raises(ValueError, match=r"task_ids: every id must be in \[-1, T=1\).*min=-2"):
        vkern.delta_linear(base[:2], base, [q], task_ids=np.array([-2, 0]))
    with pytest.raises(ValueError, match=r"task_ids: expected shape \(2,\)"):
        vkern.delta_linear(base[:2], base, [q], task_ids=np.array([0]))
    with pytest.raises(TypeError, match=r"task_ids: expected an integer array, got float64"):
        vkern.delta_linear(base[:2], base, [q], task_ids=np.array([0.0, 0.0]))
    with pytest.raises(ValueError, match=r"x: expected last dim K_in=40"):
        vkern.delta_linear(base[:, :5], base, [q])
    with pytest.raises(ValueError, match=r"method: expected one of"):
        vkern.apply_task_vectors(base, [q], [1.0], method="dare_linear")
    with pytest.raises(ValueError, match=r"density: expected a float in \[0, 1\], got 1.5"):
        vkern.apply_task_vectors(base, [q], [1.0], density=1.5)
    with pytest.raises(TypeError, match=r"base: expected float32, float16 or bfloat16, got int32"):
        vkern.apply_task_vectors(base.astype(np.int32), [q], [1.0])
    with pytest.raises(ValueError, match=r"base: expected shape \[N_out, K_in\]"):
        vkern.apply_task_vectors(base[0], [q], [1.0])
    with pytest.raises(TypeError, match=r"qtvs: expected a list of QTaskVector"):
        vkern.apply_task_vectors(base, q, [1.0])
    with pytest.raises(TypeError, match=r"qtvs\[0\]: expected a QTaskVector"):
        vkern.apply_task_vectors(base, [base], [1.0])
    with pytest.raises(ValueError, match=r"coeffs: every coefficient must be finite"):
        vkern.apply_task_vectors(base, [q], [np.nan])
    with pytest.raises(ValueError, match=r"out: expected shape \(4, 40\)"):
        vkern.apply_task_vectors(base, [q], [1.0], out=base[:2])
    with pytest.raises(TypeError, match=r"out: expected dtype float32"):
        vkern.apply_task_vectors(base, [q], [1.0], out=base.astype(np.float16))
    with pytest.raises(ValueError, match=r"group_size: expected None, 'row' or one of \(32, 64, 128\), got 48"):
        tv.quantize(base, bits=4, group_size=48)
    with pytest.raises(ValueError, match=r"scheme: expected 'affine' or 'sign'"):
        tv.quantize(base, bits=4, scheme="nf4")
    with pytest.raises(ValueError, match=r"tau: contains NaN or infinity"):
        tv.quantize(np.full((2, 3), np.nan, np.float32), bits=4)
    with pytest.raises(ValueError, match=r"tau: expected shape \[N_out, K_in\]"):
        tv.quantize(base[0], bits=4)
    with pytest.raises(ValueError, match=r"taus\[1\]: expected shape"):
        tv.quantize_residual([base, base[:, :3]])
    with pytest.raises(ValueError, match=r"offset_bits: expected one of"):
        tv.quantize_residual([base], offset_bits=5)
    with pytest.raises(vkern.BackendUnavailable, match=r"quantization runs on the host only"):
        tv.quantize(base, bits=4, backend="cuda")
    with pytest.raises(ValueError, match=r"from_dict: missing key 'bits'"):
        d = q.to_dict()
        del d["bits"]
        tv.QTaskVector.from_dict(d)
    with pytest.raises(ValueError, match=r"qtv.codes: expected shape"):
        d = q.to_dict()
        d["codes"] = d["codes"][:, :-1]
        tv.QTaskVector.from_dict(d)
    with pytest.raises(ValueError, match=r"backend: expected one of"):
        vkern.apply_task_vectors(base, [q], [1.0], backend="gpu")


def test_backend_unavailable_lists_reasons(rng):
    base = rng.standard_normal((2, 8)).astype(np.float32)
    q = tv.quantize(base, bits=4)
    if vkern.available_backends("apply_task_vectors")["cuda"][0]:
        pytest.skip("CUDA present")
    with pytest.raises(vkern.BackendUnavailable) as exc:
        vkern.apply_task_vectors(base, [q], [1.0], backend="cuda")
    msg = str(exc.value)
    for name in ("cuda", "triton", "cpu", "reference"):
        assert f"  {name}:" in msg


@pytest.mark.skipif(not HAVE_TORCH, reason="needs torch")
def test_device_mismatch_is_reported(rng):
    if not HAVE_CUDA:
        pytest.skip("needs a CUDA device")
    base = torch.randn(4, 40, device="cuda")
    q = tv.quantize(np.ones((4, 40), np.float32), bits=4)
    with pytest.raises(ValueError, match=r"qtvs\[0\]: arrays on cpu, expected cuda"):
        vkern.apply_task_vectors(base, [q], [1.0])


# ------------------------------------------------------------------ torch

@pytest.mark.skipif(not HAVE_TORCH, reason="needs torch")
def test_torch_custom_ops_opcheck(rng):
    needs("cpu")
    from vkern._torch import taskvec as _torch_ops

    N, K = 4, 40
    base = torch.randn(N, K)
    qs = [tv.quantize(make_tau(rng, N, K), bits=4, group_size=32), tv.quantize(make_tau(rng, N, K), bits=1, scheme="sign")]
    qs += tv.quantize_residual([make_tau(rng, N, K) for _ in range(2)])
    x = torch.randn(3, K)
    for args in _torch_ops.opcheck_samples(base, qs, x):
        torch.library.opcheck(*args)


@pytest.mark.skipif(not HAVE_TORCH, reason="needs torch")
def test_torch_compile(rng):
    needs("cpu")
    N, K = 4, 40
    base = torch.randn(N, K)
    qs = [tv.quantize(make_tau(rng, N, K), bits=4, group_size=32), tv.quantize(make_tau(rng, N, K), bits=1, scheme="sign")]
    x = torch.randn(3, K)
    ids = torch.tensor([0, -1, 1])

    def f(x, base):
        w = vkern.apply_task_vectors(base, qs, [0.5, 0.25])
        return vkern.delta_linear(x, base, qs, task_ids=ids) + x @ w.T

    eager = f(x, base)
    compiled = torch.compile(f, backend="eager", fullgraph=True)(x, base)
    assert torch.allclose(eager, compiled, rtol=1e-5, atol=1e-5)


def test_docstring_examples():
    import doctest

    from vkern.ops import taskvec as ops_taskvec

    for mod in (tv, ops_taskvec):
        res = doctest.testmod(mod)
        assert res.failed == 0 and res.attempted > 0
