"""vkern.loki / loki_attention / decode_attention: every backend against
float64 brute force and the NumPy reference, over SPEC §2 and its common rules."""
import numpy as np
import pytest

import vkern
from vkern.reference import loki as ref

from conftest import HAVE_CUDA, HAVE_TORCH, host
from conftest import needs as shared_needs
from conftest import to_kind as kind

if HAVE_TORCH:
    import torch

BACKENDS = ["reference", "cpu", "triton", "cuda"]


def needs(name, op="loki_attention"):
    shared_needs(name, op)


def brute_attention(q, k, v, idx_lists, scale):
    """Independent float64 attention of q [D] over the listed rows."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    s = k[idx_lists] @ q * scale
    p = np.exp(s - s.max())
    return p @ v[idx_lists] / p.sum()


def numpy_topk_positions(scores, need):
    """Independent top-k: highest first, ties to the lower index (stable sort of -score)."""
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    return np.sort(order[:need])


def make(rng, B, Hq, H_kv, T, D, dtype=np.float32):
    q = rng.standard_normal((B, Hq, D)).astype(dtype)
    k = rng.standard_normal((B, H_kv, T, D)).astype(dtype)
    v = rng.standard_normal((B, H_kv, T, D)).astype(dtype)
    return q, k, v


def close(got, want, rtol=1e-5, atol=1e-5):
    np.testing.assert_allclose(host(got), want, rtol=rtol, atol=atol)


# Small for the Triton interpreter; odd sizes for the tails.
SHAPES = [  # B, Hq, H_kv, T, D
    (1, 1, 1, 1, 1),
    (2, 4, 2, 37, 24),
    (3, 6, 3, 70, 20),
]


# ------------------------------------------------------------ rotate / PCA

def test_pca_basis_is_orthonormal_sorted_and_explains_variance(rng):
    scales = np.array([5.0, 3.0, 1.0, 0.5, 0.1, 0.05])
    keys = rng.standard_normal((500, 3, 6)) * scales + rng.standard_normal((3, 6))
    basis = vkern.loki.pca_basis(keys.astype(np.float32))
    P, ex = basis.P, basis.explained
    assert P.shape == (3, 6, 6) and P.dtype == np.float64 and ex.shape == (3, 6)
    np.testing.assert_allclose(np.einsum("hdi,hdj->hij", P, P), np.broadcast_to(np.eye(6), (3, 6, 6)), atol=1e-12)
    assert np.all(np.diff(ex, axis=1) >= -1e-15) and np.allclose(ex[:, -1], 1.0)
    # variance along each direction is descending and matches explained
    c = keys.astype(np.float32).astype(np.float64) - keys.astype(np.float32).mean(0)
    var = np.einsum("nhd,hde->nhe", c, P).var(axis=0, ddof=1)
    assert np.all(np.diff(var, axis=1) <= 1e-9)
    np.testing.assert_allclose(np.cumsum(var, 1) / var.sum(1, keepdims=True), ex, atol=1e-9)
    assert vkern.loki.rank_for_variance(basis, 0.5) == 1
    assert vkern.loki.rank_for_variance(basis, 1.0) == 6
    r = vkern.loki.rank_for_variance(basis, 0.99)
    assert np.all(ex[:, r - 1] >= 0.99) and np.any(ex[:, r - 2] < 0.99)


@pytest.mark.skipif(not HAVE_TORCH, reason="needs torch")
def test_pca_basis_torch_matches_numpy(rng):
    keys = rng.standard_normal((200, 2, 8)) * np.arange(8, 0, -1)
    a = vkern.loki.pca_basis(keys)
    b = vkern.loki.pca_basis(torch.from_numpy(keys))
    assert isinstance(b.P, torch.Tensor)
    np.testing.assert_allclose(b.P.numpy(), a.P, atol=1e-9)
    np.testing.assert_allclose(b.explained, a.explained, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rotate_matches_matmul_and_keeps_dot_products(backend, rng):
    needs(backend, "loki_rotate")
    H_kv, G, D = 2, 3, 20
    basis = vkern.loki.pca_basis(rng.standard_normal((100, H_kv, D)) * np.linspace(4, 0.2, D))
    q = rng.standard_normal((4, H_kv * G, D)).astype(np.float32)
    k = rng.standard_normal((5, 7, H_kv, D)).astype(np.float32)
    P = basis.P if backend in ("reference", "cpu") else torch.from_numpy(basis.P).to(kind(backend, q).device)
    qr = host(vkern.loki.rotate(kind(backend, q), P, backend=backend))
    kr = host(vkern.loki.rotate(kind(backend, k), P, backend=backend))
    want_q = np.einsum("bhd,hde->bhe", q.astype(np.float64), np.repeat(basis.P, G, axis=0))
    close(qr, want_q, atol=1e-5)
    close(kr, np.einsum("sthd,hde->sthe", k.astype(np.float64), basis.P), atol=1e-5)
    # q . k unchanged for every (query head, key) pair of a group
    for h in range(H_kv * G):
        want = q[:, h] @ k[:, :, h // G].reshape(-1, D).T
        got = qr[:, h] @ kr[:, :, h // G].reshape(-1, D).T
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ["cpu"])
def test_rotate_strided_and_half_inputs(backend, rng):
    needs(backend, "loki_rotate")
    D = 16
    P = vkern.loki.pca_basis(rng.standard_normal((64, 2, D))).P
    big = rng.standard_normal((6, 2, 4, 2 * D)).astype(np.float32)
    x = big[::2, :, ::2, ::2]                     # [3, 2, 2, D], no unit stride anywhere
    want = ref.rotate(x, P)
    close(vkern.loki.rotate(x, P, backend=backend), want, atol=1e-5)
    xt = np.asfortranarray(big[:, 0, :2, :D])     # [6, 2, D] Fortran-ordered
    close(vkern.loki.rotate(xt, P, backend=backend), ref.rotate(xt, P), atol=1e-5)
    x16 = x.astype(np.float16)
    got = vkern.loki.rotate(x16, P, backend=backend)
    assert got.dtype == np.float16
    close(got, ref.rotate(x16, P), atol=2e-2, rtol=1e-2)


# ------------------------------------------------------------- attention

# The Triton interpreter runs one program at a time in Python: it gets the smaller shapes.
BACKEND_SHAPES = [(b, *shape) for b in BACKENDS for shape in (SHAPES[:2] if b == "triton" else SHAPES)]


@pytest.mark.parametrize("backend,B,Hq,H_kv,T,D", BACKEND_SHAPES)
@pytest.mark.parametrize("gqa", ["per_head", "shared"])
def test_full_rank_full_budget_is_dense_attention(backend, B, Hq, H_kv, T, D, gqa, rng):
    needs(backend)
    q, k, v = make(rng, B, Hq, H_kv, T, D)
    lens = np.array([T, max(1, T // 2), max(1, T - 5)][:B])
    scale = 1.0 / np.sqrt(D)
    G = Hq // H_kv
    want = np.stack([np.stack([brute_attention(q[b, h], k[b, h // G], v[b, h // G], np.arange(lens[b]), scale)
                               for h in range(Hq)]) for b in range(B)])
    out, idx = vkern.loki_attention(kind(backend, q), kind(backend, k), kind(backend, v), rank=D, topk=T,
                                    seq_lens=kind(backend, lens), gqa=gqa, return_indices=True, backend=backend)
    close(out, want)
    idx = host(idx)
    assert idx.shape == (B, Hq, T) and idx.dtype == np.int64
    for b in range(B):
        assert np.all(idx[b, :, :lens[b]] == np.arange(lens[b])) and np.all(idx[b, :, lens[b]:] == -1)
    dense = vkern.decode_attention(kind(backend, q), kind(backend, k), kind(backend, v),
                                   seq_lens=kind(backend, lens), backend=backend)
    close(dense, want)
    frac = vkern.loki_attention(kind(backend, q), kind(backend, k), kind(backend, v), rank=D, topk=1.0,
                                seq_lens=kind(backend, lens), gqa=gqa, backend=backend)
    close(frac, want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gqa", ["per_head", "shared"])
def test_matches_reference_and_brute_force(backend, gqa, rng):
    needs(backend)
    B, Hq, H_kv, T, D, rank = 3, 6, 2, 53, 24, 7
    q, k, v = make(rng, B, Hq, H_kv, T, D)
    lens = np.array([53, 20, 17])
    kw = dict(rank=rank, topk=0.3, num_sink=2, num_recent=3, gqa=gqa, return_indices=True)
    want_out, want_idx = vkern.loki_attention(q, k, v, seq_lens=lens, backend="reference", **kw)
    out, idx = vkern.loki_attention(kind(backend, q), kind(backend, k), kind(backend, v),
                                    seq_lens=kind(backend, lens), backend=backend, **kw)
    idx = host(idx)
    np.testing.assert_array_equal(idx, want_idx)
    close(out, want_out)
    # brute force on the selected rows, and an independent selection
    G = Hq // H_kv
    for b in range(B):
        L = lens[b]
        budget = int(np.ceil(0.3 * L))
        for h in range(Hq):
            kept = idx[b, h][idx[b, h] >= 0]
            assert len(kept) == budget
            heads = range((h // G) * G, (h // G + 1) * G) if gqa == "shared" else [h]
            approx = sum(k[b, h // G, :L, :rank].astype(np.float64) @ q[b, g, :rank].astype(np.float64)
                         for g in heads)
            mid = numpy_topk_positions(approx[2:L - 3], budget - 5) + 2
            np.testing.assert_array_equal(kept, np.concatenate([[0, 1], mid, np.arange(L - 3, L)]))
            np.testing.assert_allclose(host(out)[b, h], brute_attention(q[b, h], k[b, h // G], v[b, h // G], kept,
                                                                        1 / np.sqrt(D)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_selection_ties_go_to_the_lower_index(backend, rng):
    needs(backend)
    B, Hq, H_kv, T, D = 1, 2, 1, 40, 8
    q = np.zeros((B, Hq, D), np.float32)
    q[:, :, 0] = 1.0
    k = np.zeros((B, H_kv, T, D), np.float32)
    k[0, 0, :, 0] = rng.integers(0, 4, T)  # scores 0..3: many exact ties
    k[0, 0, :, 1:] = rng.standard_normal((T, D - 1))  # outside the rank: must not matter
    v = rng.standard_normal((B, H_kv, T, D)).astype(np.float32)
    for topk in (1, 5, 13, 27):
        _, idx = vkern.loki_attention(kind(backend, q), kind(backend, k), kind(backend, v), rank=1, topk=topk,
                                      return_indices=True, backend=backend)
        want = numpy_topk_positions(k[0, 0, :, 0], topk)
        for h in range(Hq):
            np.testing.assert_array_equal(host(idx)[0, h], want)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # inf - inf in the exact softmax
def test_long_selection_with_ties_and_nan(backend, rng):
    """Long lists (the CPU kernel pre-filters them with a sampled threshold)."""
    needs(backend)
    T, D = 9000, 4
    q = np.zeros((1, 3, D), np.float32)
    q[0, :, 0] = [1.0, -1.0, 0.5]
    k = np.zeros((1, 1, T, D), np.float32)
    k[0, 0, :, 0] = rng.integers(-20, 20, T)   # heavy ties
    k[0, 0, rng.integers(0, T, 50), 0] = np.nan
    k[0, 0, rng.integers(0, T, 20), 0] = np.inf
    k[0, 0, rng.integers(0, T, 20), 0] = -np.inf
    k[0, 0, :, 1:] = rng.standard_normal((T, D - 1))
    v = rng.standard_normal((1, 1, T, D)).astype(np.float32)
    # the CPU selection's compaction pass is per SIMD level: run each one this CPU has
    levels = [lv for lv in ("generic", "avx2", "avx512shape") if lv in vkern.info().get("simd_supported", [])]
    try:
        for level in levels if backend == "cpu" else ["auto"]:
            vkern.set_simd_level(level)
            for topk in (8, 9, 37, 900, 4500, 8999):
                _, idx = vkern.loki_attention(q, k, v, rank=1, topk=topk, num_sink=3, num_recent=5,
                                              return_indices=True, backend=backend)
                for h in range(3):  # h = 1 turns the zeros into -0.0: equal to +0.0, ties to the lower index
                    mid = k[0, 0, 3:T - 5, 0].astype(np.float64) * q[0, h, 0]
                    nan = np.isnan(mid)
                    order = np.lexsort((np.arange(len(mid)), -np.where(nan, 0.0, mid), nan))  # NaN last
                    want = np.concatenate([np.arange(3), np.sort(order[:topk - 8]) + 3, np.arange(T - 5, T)])
                    np.testing.assert_array_equal(idx[0, h], want, err_msg=f"{level} topk={topk} head {h}")
    finally:
        vkern.set_simd_level("auto")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gqa", ["per_head", "shared"])
def test_sinks_and_recent_always_kept_and_no_index_past_seq_len(backend, gqa, rng):
    needs(backend)
    B, Hq, H_kv, T, D = 2, 4, 2, 60, 16
    q, k, v = make(rng, B, Hq, H_kv, T, D)
    # make the sinks and recent tokens score lowest, so only forcing keeps them
    k[:, :, :, :4] = np.abs(k[:, :, :, :4])
    q[:, :, :4] = np.abs(q[:, :, :4])
    k[:, :, :3, :4] *= -1
    lens = np.array([60, 25])
    for b, L in enumerate(lens):
        k[b, :, L - 4:L, :4] *= -1
    k[1, :, 25:] = np.nan  # past seq_len: must never be read
    v[1, :, 25:] = np.nan
    out, idx = vkern.loki_attention(kind(backend, q), kind(backend, k), kind(backend, v), rank=4, topk=10,
                                    seq_lens=kind(backend, lens), num_sink=3, num_recent=4, gqa=gqa,
                                    return_indices=True, backend=backend)
    idx = host(idx)
    assert np.all(np.isfinite(host(out)))
    for b, L in enumerate(lens):
        for h in range(Hq):
            kept = idx[b, h]
            assert np.all(kept < L) and np.all(kept >= 0) and np.all(np.diff(kept) > 0)
            assert {0, 1, 2} <= set(kept) and set(range(L - 4, L)) <= set(kept)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gqa_equals_repeated_kv(backend, rng):
    needs(backend)
    B, Hq, H_kv, T, D = 2, 4, 2, 31, 12
    q, k, v = make(rng, B, Hq, H_kv, T, D)
    G = Hq // H_kv
    lens = np.array([31, 17])
    kw = dict(rank=5, topk=9, num_sink=1, num_recent=2, gqa="per_head", return_indices=True, backend=backend)
    a, ia = vkern.loki_attention(kind(backend, q), kind(backend, k), kind(backend, v),
                                 seq_lens=kind(backend, lens), **kw)
    kr, vr = np.repeat(k, G, axis=1), np.repeat(v, G, axis=1)
    b, ib = vkern.loki_attention(kind(backend, q), kind(backend, kr), kind(backend, vr),
                                 seq_lens=kind(backend, lens), **kw)
    close(a, host(b), atol=1e-6)
    np.testing.assert_array_equal(host(ia), host(ib))
    d1 = vkern.decode_attention(kind(backend, q), kind(backend, k), kind(backend, v), seq_lens=kind(backend, lens),
                                backend=backend)
    d2 = vkern.decode_attention(kind(backend, q), kind(backend, kr), kind(backend, vr),
                                seq_lens=kind(backend, lens), backend=backend)
    close(d1, host(d2), atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gqa", ["per_head", "shared"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_k_prefix_gives_the_same_step(backend, gqa, dtype, rng):
    """A separate key-prefix array (contiguous, wider than rank, or a strided view
    into a bigger buffer) changes where the approximate pass reads, not the result."""
    needs(backend)
    if dtype == "bfloat16" and backend == "triton" and not HAVE_CUDA:
        pytest.skip("the Triton interpreter has no bfloat16")
    if dtype == "bfloat16" and not HAVE_TORCH:
        pytest.skip("bfloat16 needs torch")
    B, Hq, H_kv, T, D = 2, 6, 3, 83, 24
    q, k, v = make(rng, B, Hq, H_kv, T, D)
    lens = np.array([83, 40])
    kw = dict(rank=7, topk=0.3, num_sink=2, num_recent=3, gqa=gqa, return_indices=True, backend=backend)
    qq, kk, vv = (kind(backend, a, dtype) for a in (q, k, v))
    ll = kind(backend, lens, dtype)
    want, want_idx = vkern.loki_attention(qq, kk, vv, seq_lens=ll, **kw)
    kf = host(kk)  # the cache values as stored (bf16-rounded for bf16)
    wide = np.zeros((B, H_kv, T, 16), np.float32)
    wide[..., :10] = kf[..., :10]
    padded = np.zeros((B, H_kv, T, 32), np.float32)
    padded[..., 3:3 + 7] = kf[..., :7]
    for pre in (kf[..., :7], wide, padded[..., 3:10]):
        if backend in ("reference", "cpu") and dtype == "float32":
            kp = pre  # NumPy: a strided view stays strided
        else:
            kp = kind(backend, np.ascontiguousarray(pre), dtype)
            if pre.base is padded:
                kp = kind(backend, padded, dtype)[..., 3:10]
        got, got_idx = vkern.loki_attention(qq, kk, vv, seq_lens=ll, k_prefix=kp, **kw)
        np.testing.assert_array_equal(host(got_idx), host(want_idx))
        close(got, host(want), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_k_prefix_is_what_the_approximate_pass_reads(backend, rng):
    """A prefix that differs from k's own columns must steer the selection (so the
    kernels really read it), exactly as the reference does with the same prefix."""
    needs(backend)
    B, Hq, H_kv, T, D = 1, 4, 2, 64, 16
    q, k, v = make(rng, B, Hq, H_kv, T, D)
    kp = np.zeros((B, H_kv, T, 4), np.float32)
    qsum = q[..., :4].reshape(B, H_kv, Hq // H_kv, 4).sum(axis=2)      # the group's summed query prefix
    kp[:, :, 40:48] = np.sign(qsum)[:, :, None, :] * 10  # rows 40..47 score highest by the prefix
    kw = dict(rank=4, topk=8, gqa="shared", return_indices=True)
    _, idx = vkern.loki_attention(kind(backend, q), kind(backend, k), kind(backend, v), k_prefix=kind(backend, kp),
                                  backend=backend, **kw)
    out, want_idx = vkern.loki_attention(q, k, v, k_prefix=kp, backend="reference", **kw)
    np.testing.assert_array_equal(host(idx), want_idx)
    assert np.all(host(idx) == np.arange(40, 48))
    _, plain = vkern.loki_attention(q, k, v, backend="reference", **kw)
    assert not np.array_equal(plain, want_idx)


def test_key_prefix_helper(rng):
    k = rng.standard_normal((2, 3, 5, 8)).astype(np.float32)
    kp = vkern.loki.key_prefix(k, 3)
    assert kp.flags.c_contiguous and kp.shape == (2, 3, 5, 3)
    np.testing.assert_array_equal(kp, k[..., :3])
    with pytest.raises(ValueError, match="rank"):
        vkern.loki.key_prefix(k, 9)
    with pytest.raises(TypeError, match="rank"):
        vkern.loki.key_prefix(k, 2.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_shared_selection_is_one_set_per_group(backend, rng):
    needs(backend)
    q, k, v = make(rng, 1, 8, 2, 50, 16)
    _, idx = vkern.loki_attention(kind(backend, q), kind(backend, k), kind(backend, v), rank=4, topk=12,
                                  gqa="shared", return_indices=True, backend=backend)
    idx = host(idx)
    for g in range(2):
        for h in range(4 * g, 4 * g + 4):
            np.testing.assert_array_equal(idx[0, h], idx[0, 4 * g])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_error_within_twice_reference(backend, dtype, rng):
    needs(backend)
    if dtype == "bfloat16" and not HAVE_TORCH:
        pytest.skip("bfloat16 needs torch")
    B, Hq, H_kv, T, D = 2, 4, 2, 45, 32
    q, k, v = make(rng, B, Hq, H_kv, T, D)
    tq, tk, tv = (torch.from_numpy(a).to(getattr(torch, dtype)) for a in (q, k, v))
    rq, rk, rv = (t.float().numpy() for t in (tq, tk, tv))  # the inputs as rounded to dtype
    lens = np.array([45, 30])
    kw = dict(rank=8, topk=15, num_sink=1, num_recent=2, gqa="per_head")
    want, want_idx = ref.loki_attention(rq, rk, rv, lens, scale=1 / np.sqrt(D), **kw)
    ref_in_dtype = torch.from_numpy(want).to(getattr(torch, dtype)).double().numpy()
    ref_err = np.abs(ref_in_dtype - want).max()
    out, idx = vkern.loki_attention(kind(backend, rq, dtype), kind(backend, rk, dtype), kind(backend, rv, dtype),
                                    seq_lens=kind(backend, lens, dtype), return_indices=True, backend=backend, **kw)
    assert str(out.dtype).endswith(dtype)
    np.testing.assert_array_equal(host(idx), want_idx)
    assert np.abs(host(out).astype(np.float64) - want).max() <= 2 * ref_err + 1e-7
    dense = vkern.decode_attention(kind(backend, rq, dtype), kind(backend, rk, dtype), kind(backend, rv, dtype),
                                   seq_lens=kind(backend, lens, dtype), backend=backend)
    want_dense = ref.decode_attention(rq, rk, rv, lens, 1 / np.sqrt(D))
    dense_ref_err = np.abs(torch.from_numpy(want_dense).to(getattr(torch, dtype)).double().numpy() - want_dense).max()
    assert np.abs(host(dense).astype(np.float64) - want_dense).max() <= 2 * dense_ref_err + 1e-7


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_strided_inputs(backend, rng):
    needs(backend)
    B, Hq, H_kv, T, D = 2, 4, 2, 33, 16
    q, k, v = make(rng, B, Hq, H_kv, T, D)
    want, want_idx = vkern.loki_attention(q, k, v, rank=5, topk=11, num_sink=1, gqa="shared", return_indices=True,
                                          backend="reference")
    # token-major caches [B, T, H_kv, D] seen as [B, H_kv, T, D]; D sliced from a wider array; Fortran q
    kt = np.ascontiguousarray(k.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
    vw = np.zeros((B, H_kv, T, D + 5), np.float32)
    vw[..., 2:D + 2] = v
    vs = vw[..., 2:D + 2]
    qf = np.asfortranarray(q)
    if backend == "triton":
        args = [torch.from_numpy(a) for a in (qf, kt, vs)]
        args = [a.cuda() for a in args] if HAVE_CUDA else args
    else:
        args = [qf, kt, vs]
    out, idx = vkern.loki_attention(*args, rank=5, topk=11, num_sink=1, gqa="shared", return_indices=True,
                                    backend=backend)
    close(out, want)
    np.testing.assert_array_equal(host(idx), want_idx)
    close(vkern.decode_attention(*args, backend=backend), ref.decode_attention(q, k, v, [T] * B, 1 / np.sqrt(D)))


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_nan_approximate_score_ranks_last(backend, rng):
    needs(backend)
    q, k, v = make(rng, 1, 2, 1, 20, 8)
    k[0, 0, 5, :2] = np.nan   # NaN approximate score for token 5
    _, idx = vkern.loki_attention(kind(backend, q), kind(backend, k), kind(backend, v), rank=2, topk=19,
                                  return_indices=True, backend=backend)
    for h in range(2):
        np.testing.assert_array_equal(host(idx)[0, h], np.delete(np.arange(20), 5))


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_non_finite_row_reaches_only_the_heads_that_keep_it(backend, rng):
    needs(backend)
    q, k, v = make(rng, 1, 2, 1, 16, 8)
    q[0, 0, 0], q[0, 1, 0] = 1.0, -1.0
    k[0, 0, :, 0] = 0.0
    k[0, 0, 3, 0] = 5.0                  # head 0 ranks token 3 first, head 1 last
    v[0, 0, 3] = np.inf
    kw = dict(rank=1, topk=4, gqa="per_head", return_indices=True)
    want, want_idx = vkern.loki_attention(q, k, v, backend="reference", **kw)
    out, idx = vkern.loki_attention(kind(backend, q), kind(backend, k), kind(backend, v), backend=backend, **kw)
    out = host(out)
    np.testing.assert_array_equal(host(idx), want_idx)
    assert 3 in want_idx[0, 0] and 3 not in want_idx[0, 1]
    assert not np.all(np.isfinite(out[0, 0])) and np.all(np.isfinite(out[0, 1]))
    np.testing.assert_array_equal(np.isfinite(out), np.isfinite(want))
    close(out[0, 1], want[0, 1])


@pytest.mark.parametrize("level", ["generic", "avx2", "avx512shape"])
def test_every_simd_level(level, rng):
    needs("cpu")
    if level not in vkern.info().get("simd_supported", []):
        pytest.skip(f"CPU cannot run {level}")
    B, Hq, H_kv, T, D = 2, 4, 2, 77, 37  # D and rank not multiples of any vector width
    q, k, v = make(rng, B, Hq, H_kv, T, D)
    lens = np.array([77, 40])
    try:
        vkern.set_simd_level(level)
        for gqa in ("per_head", "shared"):
            for dt in ("float32", "float16"):
                kw = dict(rank=19, topk=0.4, num_sink=2, num_recent=3, gqa=gqa, seq_lens=lens, return_indices=True)
                qq, kk, vv = (a.astype(dt) for a in (q, k, v))
                want, want_idx = vkern.loki_attention(qq, kk, vv, backend="reference", **kw)
                out, idx = vkern.loki_attention(qq, kk, vv, backend="cpu", **kw)
                np.testing.assert_array_equal(idx, want_idx)
                close(out.astype(np.float32), want.astype(np.float32), atol=2e-3 if dt == "float16" else 1e-5)
        close(vkern.decode_attention(q, k, v, seq_lens=lens, backend="cpu"), ref.decode_attention(q, k, v, lens,
                                                                                                  1 / np.sqrt(D)))
        P = vkern.loki.pca_basis(k[0].transpose(1, 0, 2)).P
        close(vkern.loki.rotate(q, P, backend="cpu"), ref.rotate(q, P), atol=1e-5)
    finally:
        vkern.set_simd_level("auto")


@pytest.mark.parametrize("level", ["generic", "avx2", "avx512shape"])
def test_bfloat16_caches_every_simd_level(level, rng):
    # D and some ranks multiples of 16: the avx2 level reads bfloat16 rows without a widened copy.
    needs("cpu")
    if not HAVE_TORCH:
        pytest.skip("bfloat16 needs torch")
    if level not in vkern.info().get("simd_supported", []):
        pytest.skip(f"CPU cannot run {level}")
    B, Hq, H_kv, T, D = 2, 6, 2, 77, 48
    q, k, v = make(rng, B, Hq, H_kv, T, D)
    v[0, 0, 72, 0] = np.inf  # first row of the short last block of a dense walk over 77 rows
    tq, tk, tv = (torch.from_numpy(a).bfloat16() for a in (q, k, v))
    rq, rk, rv = (t.float().numpy() for t in (tq, tk, tv))  # the inputs as rounded to bfloat16
    lens = np.array([77, 37])

    def check(got, want):
        got = got.float().numpy().astype(np.float64)
        np.testing.assert_array_equal(np.isposinf(got), np.isposinf(want))
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
        fin = np.isfinite(want)
        rounding = np.abs(torch.from_numpy(want[fin]).bfloat16().double().numpy() - want[fin]).max()
        assert np.abs(got[fin] - want[fin]).max() <= 2 * rounding + 1e-7

    try:
        vkern.set_simd_level(level)
        for gqa in ("per_head", "shared"):
            for rank in (16, 32, 19):
                kw = dict(rank=rank, topk=0.35, num_sink=2, num_recent=3, gqa=gqa, seq_lens=lens,
                          return_indices=True)
                want, want_idx = vkern.loki_attention(rq, rk, rv, backend="reference", **kw)
                out, idx = vkern.loki_attention(tq, tk, tv, backend="cpu", **{**kw, "seq_lens": torch.from_numpy(lens)})
                np.testing.assert_array_equal(idx.numpy(), want_idx)
                check(out, want)
        want = ref.decode_attention(rq, rk, rv, lens, 1 / np.sqrt(D))
        assert np.isposinf(want[0, :3, 0]).all()  # the inf row reaches every head of KV head 0
        check(vkern.decode_attention(tq, tk, tv, seq_lens=torch.from_numpy(lens), backend="cpu"), want)
    finally:
        vkern.set_simd_level("auto")


def test_thread_count_does_not_change_results(rng):
    needs("cpu")
    q, k, v = make(rng, 3, 8, 4, 200, 32)
    kw = dict(rank=8, topk=40, num_sink=2, num_recent=4, return_indices=True, backend="cpu")
    n0 = vkern.get_num_threads()
    try:
        vkern.set_num_threads(1)
        a, ia = vkern.loki_attention(q, k, v, **kw)
        vkern.set_num_threads(3)
        b, ib = vkern.loki_attention(q, k, v, **kw)
    finally:
        vkern.set_num_threads(n0)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ia, ib)


def test_inputs_are_not_modified_and_return_forms(rng):
    q, k, v = make(rng, 1, 2, 1, 12, 8)
    copies = [a.copy() for a in (q, k, v)]
    for backend in ("reference", "cpu"):
        if not vkern.available_backends("loki_attention")[backend][0]:
            continue
        out = vkern.loki_attention(q, k, v, rank=3, topk=4, backend=backend)
        assert isinstance(out, np.ndarray) and out.shape == (1, 2, 8) and out.dtype == np.float32
    for a, c in zip((q, k, v), copies):
        np.testing.assert_array_equal(a, c)


@pytest.mark.skipif(not HAVE_TORCH, reason="needs torch")
def test_torch_in_torch_out(rng):
    q, k, v = make(rng, 1, 2, 1, 12, 8)
    out, idx = vkern.loki_attention(torch.from_numpy(q).bfloat16(), torch.from_numpy(k).bfloat16(),
                                    torch.from_numpy(v).bfloat16(), rank=3, topk=4, return_indices=True)
    assert out.dtype == torch.bfloat16 and idx.dtype == torch.int64 and tuple(idx.shape) == (1, 2, 4)


# ----------------------------------------------------------- bad inputs

def test_bad_inputs_raise_before_any_kernel(rng):
    q, k, v = make(rng, 2, 4, 2, 10, 8)
    ok = dict(rank=4, topk=5)
    cases = [
        (ValueError, "rank", dict(rank=9, topk=5)),
        (ValueError, "rank", dict(rank=0, topk=5)),
        (TypeError, "rank", dict(rank=2.0, topk=5)),
        (ValueError, "topk", dict(rank=4, topk=0)),
        (ValueError, "topk", dict(rank=4, topk=1.5)),
        (ValueError, "topk", dict(rank=4, topk=0.0)),
        (TypeError, "topk", dict(rank=4, topk="5")),
        (TypeError, "topk", dict(rank=4, topk=True)),
        (ValueError, "topk", dict(rank=4, topk=3, num_sink=2, num_recent=2)),
        (ValueError, "topk", dict(rank=4, topk=0.2, num_sink=2, num_recent=1)),
        (ValueError, "num_sink", dict(rank=4, topk=5, num_sink=-1)),
        (ValueError, "num_recent", dict(rank=4, topk=5, num_recent=-2)),
        (ValueError, "gqa", dict(rank=4, topk=5, gqa="grouped")),
        (ValueError, "seq_lens", dict(ok, seq_lens=np.array([11, 3]))),
        (ValueError, "seq_lens", dict(ok, seq_lens=np.array([0, 3]))),
        (ValueError, "seq_lens", dict(ok, seq_lens=np.array([3]))),
        (TypeError, "seq_lens", dict(ok, seq_lens=np.array([3.0, 3.0]))),
        (ValueError, "scale", dict(ok, scale=-1.0)),
        (ValueError, "scale", dict(ok, scale=float("nan"))),
        (ValueError, "backend", dict(ok, backend="gpu")),
    ]
    for exc, word, kw in cases:
        with pytest.raises(exc, match=word):
            vkern.loki_attention(q, k, v, **kw)
    # a budget that holds sinks + recent is fine, also when seq_len is shorter than both
    vkern.loki_attention(q, k, v, rank=4, topk=4, num_sink=2, num_recent=2, backend="reference")
    vkern.loki_attention(q, k, v, rank=4, topk=2, num_sink=2, num_recent=2, seq_lens=np.array([2, 1]),
                         backend="reference")
    with pytest.raises(ValueError, match="multiple of H_kv"):
        vkern.loki_attention(q[:, :3], k, v, **ok)
    with pytest.raises(ValueError, match="head dim D=7"):
        vkern.loki_attention(q[..., :7], k, v, **ok)
    with pytest.raises(ValueError, match="v_cache"):
        vkern.loki_attention(q, k, v[:, :, :5], **ok)
    with pytest.raises(ValueError, match="k_cache"):
        vkern.loki_attention(q, k[:1], v[:1], **ok)
    with pytest.raises(ValueError, match="q"):
        vkern.loki_attention(q[0], k, v, **ok)
    with pytest.raises(TypeError, match="k_cache"):
        vkern.loki_attention(q, k.astype(np.int32), v, **ok)
    with pytest.raises(TypeError, match="v_cache"):
        vkern.loki_attention(q, k, v.astype(np.float16), **ok)
    with pytest.raises(TypeError, match="q"):
        vkern.loki_attention(q.astype(np.float64), k, v, **ok)
    with pytest.raises(ValueError, match="seq_lens"):
        vkern.decode_attention(q, k, v, seq_lens=np.array([11, 3]))
    with pytest.raises(ValueError, match="multiple of H_kv"):
        vkern.decode_attention(q[:, :3], k, v)
    P = vkern.loki.pca_basis(rng.standard_normal((20, 2, 8))).P
    with pytest.raises(ValueError, match="multiple of H_kv"):
        vkern.loki.rotate(q[:, :3], P)
    with pytest.raises(ValueError, match="D=8"):
        vkern.loki.rotate(q[..., :6], P)
    with pytest.raises(ValueError, match="keys"):
        vkern.loki.pca_basis(rng.standard_normal((20, 8)))
    with pytest.raises(ValueError, match="frac"):
        vkern.loki.rank_for_variance(vkern.loki.pca_basis(rng.standard_normal((20, 2, 8))), 1.5)
    kp = np.ascontiguousarray(k[..., :4])
    for exc, bad in [(ValueError, kp[..., :3]), (ValueError, kp[:, :1]), (ValueError, kp[..., :5, :]),
                     (ValueError, kp[0]), (TypeError, kp.astype(np.float16)), (TypeError, kp.astype(np.int32))]:
        with pytest.raises(exc, match="k_prefix"):
            vkern.loki_attention(q, k, v, rank=4, topk=5, k_prefix=bad)


@pytest.mark.skipif(not HAVE_TORCH, reason="needs torch")
def test_mixed_devices_and_kinds_raise(rng):
    q, k, v = make(rng, 1, 2, 1, 6, 4)
    with pytest.raises(TypeError, match="mixed array kinds"):
        vkern.loki_attention(torch.from_numpy(q), k, v, rank=2, topk=2)
    with pytest.raises(ValueError, match="mixed devices"):
        vkern.loki_attention(torch.from_numpy(q), torch.from_numpy(k).to("meta"), torch.from_numpy(v), rank=2,
                             topk=2)


def test_backend_unavailable_lists_every_reason(rng):
    q, k, v = make(rng, 1, 2, 1, 6, 4)
    with pytest.raises(vkern.BackendUnavailable) as info:
        vkern.loki_attention(q, k, v, rank=2, topk=2, backend="cuda")
    for name in BACKENDS:
        assert f"  {name}:" in str(info.value)


# ---------------------------------------------------------------- torch

@pytest.mark.skipif(not HAVE_TORCH, reason="needs torch")
def test_torch_custom_ops_opcheck(rng):
    import vkern._torch  # noqa: F401

    q, k, v = (torch.from_numpy(a) for a in make(rng, 2, 4, 2, 9, 8))
    lens = torch.tensor([9, 5])
    # schema, autograd registration and the fake implementations (aot_dispatch_dynamic takes
    # ~50 s here; torch.compile is exercised by the next test).
    fast = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.vkern.loki_attention.default,
                          (q, k, v, lens, 3, 4, 0.0, 1, 1, "per_head", 0.35, "auto"), test_utils=fast)
    torch.library.opcheck(torch.ops.vkern.loki_attention.default,
                          (q, k, v, None, 3, 0, 0.5, 0, 0, "shared", 0.35, "auto"), test_utils=fast)
    torch.library.opcheck(torch.ops.vkern.loki_attention_indices.default,
                          (q, k, v, lens, 3, 4, 0.0, 1, 1, "per_head", 0.35, "auto"), test_utils=fast)
    torch.library.opcheck(torch.ops.vkern.loki_attention_indices.default,
                          (q, k, v, lens, 3, 4, 0.0, 1, 1, "shared", 0.35, "auto", k[..., :3].contiguous()),
                          test_utils=fast)
    torch.library.opcheck(torch.ops.vkern.decode_attention.default, (q, k, v, lens, 0.35, "auto"), test_utils=fast)
    P = torch.from_numpy(vkern.loki.pca_basis(rng.standard_normal((20, 2, 8))).P).float()
    torch.library.opcheck(torch.ops.vkern.loki_rotate.default, (q, P, "auto"), test_utils=fast)


@pytest.mark.skipif(not HAVE_TORCH, reason="needs torch")
def test_torch_compile_uses_custom_op(rng):
    q, k, v = (torch.from_numpy(a) for a in make(rng, 1, 4, 2, 16, 8))

    @torch.compile(backend="eager", fullgraph=True)
    def step(q, k, v):
        return vkern.loki_attention(q, k, v, rank=4, topk=6, num_sink=1, gqa="shared") + \
            vkern.decode_attention(q, k, v)

    want = host(vkern.loki_attention(q, k, v, rank=4, topk=6, num_sink=1, gqa="shared")) + \
        host(vkern.decode_attention(q, k, v))
    close(step(q, k, v), want)


def test_docstring_examples_run():
    import doctest

    import vkern.loki
    import vkern.ops.loki

    for mod in (vkern.loki, vkern.ops.loki):
        res = doctest.testmod(mod)
        assert res.failed == 0 and res.attempted > 0
