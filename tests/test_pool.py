"""vkern.pool_tokens / vkern.segment_mean: Ward against SciPy directly (PyLate's recipe) and
against PyLate's own pool_embeddings_hierarchical when it imports; k-means determinism and
cpu == reference; segment means; bad inputs."""
import numpy as np
import pytest

hierarchy = pytest.importorskip("scipy.cluster.hierarchy", reason="pip install scipy (vkern[test])")

import vkern
from vkern.reference import pool as ref
from conftest import HAVE_TORCH
from conftest import needs as shared_needs

if HAVE_TORCH:
    import torch


def needs(name):
    shared_needs(name, "pool_tokens")


def normalised(rng, lengths, D):
    off = np.zeros(len(lengths) + 1, np.int64)
    off[1:] = np.cumsum(lengths)
    x = rng.standard_normal((int(off[-1]), D)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, off


def scipy_pool(doc, pool_factor, protected):
    """PyLate's recipe written out with SciPy: 1 - cosine, condensed, Ward, maxclust, means."""
    p = min(protected, len(doc))
    rest = doc[p:]
    m = len(rest)
    k = max(m // pool_factor, 1)
    if k >= m:
        return doc
    dist = 1.0 - (rest @ rest.T).astype(np.float64)
    labels = hierarchy.fcluster(hierarchy.linkage(dist[np.triu_indices(m, 1)], method="ward"), k,
                                criterion="maxclust")
    means = np.stack([rest[labels == c].astype(np.float64).mean(0) for c in np.unique(labels)])
    return np.concatenate([doc[:p], means.astype(np.float32)])


def same_rows(a, b, tol=1e-5):
    """Equal as multisets of rows (SciPy numbers clusters in its own order)."""
    if a.shape != b.shape:
        return False
    if len(a) == 0:
        return True
    a = a[np.lexsort(np.round(a, 4).T[::-1])]
    b = b[np.lexsort(np.round(b, 4).T[::-1])]
    return np.abs(a - b).max() <= tol


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("pool_factor,protected", [(2, 1), (3, 0), (1, 1), (4, 3)])
def test_ward_matches_scipy(backend, pool_factor, protected, rng):
    needs(backend)
    lengths = [0, 1, 2, 3, 5, 17, 40, 64, 2, 9]
    x, off = normalised(rng, lengths, 24)
    pooled, new_off = vkern.pool_tokens(x, doc_offsets=off, pool_factor=pool_factor, protected_tokens=protected,
                                        backend=backend)
    assert pooled.dtype == np.float32 and new_off.dtype == np.int64
    for n in range(len(lengths)):
        want = scipy_pool(x[off[n]:off[n + 1]], pool_factor, protected)
        got = pooled[new_off[n]:new_off[n + 1]]
        assert same_rows(got, want), n
        p = min(protected, lengths[n])
        np.testing.assert_array_equal(got[:p], x[off[n]:off[n] + p])   # protected rows untouched, first


@pytest.mark.parametrize("D", [50, 384])
def test_ward_matches_scipy_at_tile_edges(D, rng):
    """Documents whose token counts sit on either side of the Gram panel and tile edges (8, 16
    and 32 columns; one- and two-vector tiles), D with and without a ragged tail, pool factors
    2 and 3: the same rows as SciPy."""
    needs("cpu")
    lengths = [7, 8, 9, 10, 16, 17, 18, 24, 25, 26, 32, 33, 34, 41, 48, 49, 50, 57, 64, 65, 66, 98, 129, 198]
    x, off = normalised(rng, lengths, D)
    for pf in (2, 3):
        pooled, new_off = vkern.pool_tokens(x, doc_offsets=off, pool_factor=pf, backend="cpu")
        for n in range(len(lengths)):
            assert same_rows(pooled[new_off[n]:new_off[n + 1]], scipy_pool(x[off[n]:off[n + 1]], pf, 1)), (pf, n)


@pytest.mark.parametrize("level", ["generic", "avx2", "avx512", "avx512shape"])
def test_ward_every_simd_level(level, rng):
    """Each SIMD level the CPU can run (avx512 on real AVX-512 hardware; avx512shape, its
    blocking compiled for AVX2, where AVX2 runs): SciPy's clusters, and the same pooled rows
    bit for bit as the automatic level. Lengths around the panel edges (16- and 32-column
    panels, the first one partial) and long enough for several compactions of the chain's
    matrix (half the slots dead, then a quarter, ...)."""
    needs("cpu")
    from vkern import _ext
    if level not in _ext.C.simd_supported():
        pytest.skip(f"{level} not supported on this CPU")
    lengths = [2, 3, 9, 16, 17, 31, 32, 33, 47, 48, 49, 64, 65, 97, 130, 257, 300]
    x, off = normalised(rng, lengths, 40)
    auto = vkern.pool_tokens(x, doc_offsets=off, pool_factor=2)
    try:
        vkern.set_simd_level(level)
        got = {pf: vkern.pool_tokens(x, doc_offsets=off, pool_factor=pf) for pf in (2, 3)}
    finally:
        vkern.set_simd_level("auto")
    np.testing.assert_array_equal(got[2][1], auto[1])
    assert got[2][0].tobytes() == auto[0].tobytes()
    for pf in (2, 3):
        pooled, new_off = got[pf]
        for n in range(len(lengths)):
            assert same_rows(pooled[new_off[n]:new_off[n + 1]], scipy_pool(x[off[n]:off[n + 1]], pf, 1)), (pf, n)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_in_any_document_raises(backend, value, rng):
    """The cpu kernel checks each document as it takes it up: a NaN or inf in a later document,
    or in one with nothing to pool (returned as it is otherwise), still raises."""
    needs(backend)
    x, off = normalised(rng, [30, 2, 40, 25], 16)
    for row in (off[2] + 1, 31, off[3] + 24):           # third document; the short second; the last row
        bad = x.copy()
        bad[row, 5] = value
        for method in ("ward", "kmeans"):
            with pytest.raises(ValueError, match="docs: contains NaN or inf"):
                vkern.pool_tokens(bad, doc_offsets=off, method=method, backend=backend)
    vkern.pool_tokens(x, doc_offsets=off, backend=backend)     # and the clean one runs


def test_cpu_equals_reference_exactly_and_cluster_order(rng):
    needs("cpu")
    x, off = normalised(rng, list(rng.integers(1, 90, 40)), 40)
    for method in ("ward", "kmeans"):
        for pf in (2, 3):
            r = vkern.pool_tokens(x, doc_offsets=off, pool_factor=pf, method=method, seed=7, backend="reference")
            c = vkern.pool_tokens(x, doc_offsets=off, pool_factor=pf, method=method, seed=7, backend="cpu")
            np.testing.assert_array_equal(r[1], c[1])
            np.testing.assert_allclose(r[0], c[0], rtol=0, atol=1e-6)


def test_negative_dissimilarities_pool_alike_on_every_backend():
    # Vectors that are not unit-norm make 1 - <x_i, x_j> negative. SciPy refuses such a tree
    # (fcluster: negative distances); vkern keeps the sign of each square so that the cpu
    # kernel's nearest-neighbour chain and the reference's closest-pair search build one tree.
    # Before that fix these documents (found by tests/test_fuzz.py) pooled differently.
    needs("cpu")
    for seed, n, D in [(14, 6, 8), (6, 7, 3), (26, 9, 6), (3, 40, 16)]:
        x = np.random.default_rng(seed).standard_normal((n, D)).astype(np.float32)
        off = np.array([0, n])
        assert (1.0 - x @ x.T)[np.triu_indices(n, 1)].min() < -1.0
        for pf in (2, 3):
            r = vkern.pool_tokens(x, doc_offsets=off, pool_factor=pf, protected_tokens=0, backend="reference")
            c = vkern.pool_tokens(x, doc_offsets=off, pool_factor=pf, protected_tokens=0, backend="cpu")
            assert r[1].tolist() == c[1].tolist() == [0, max(n // pf, 1)]
            np.testing.assert_allclose(c[0], r[0], rtol=0, atol=1e-6)
    # A near-duplicate pair of unit vectors: its dissimilarity rounds below 0, where PyLate's
    # recipe stops (SciPy: negative distances). vkern pools it as SciPy pools the same matrix with
    # that entry raised to 0 (the pair is the closest either way).
    u = np.random.default_rng(5).standard_normal((24, 32)).astype(np.float32)
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    u[13] = u[4] * np.float32(1.0000001)
    dist = 1.0 - (u @ u.T).astype(np.float64)
    cond = dist[np.triu_indices(24, 1)]
    assert cond.min() < 0
    with pytest.raises(ValueError, match="negative distances"):
        hierarchy.fcluster(hierarchy.linkage(cond, method="ward"), 8, criterion="maxclust")
    labels = hierarchy.fcluster(hierarchy.linkage(np.maximum(cond, 0), method="ward"), 8, criterion="maxclust")
    want = np.stack([u[labels == c].astype(np.float64).mean(0) for c in np.unique(labels)]).astype(np.float32)
    for backend in ("reference", "cpu"):
        pooled, o = vkern.pool_tokens(u, doc_offsets=np.array([0, 24]), pool_factor=3, protected_tokens=0,
                                      backend=backend)
        assert o.tolist() == [0, 8]
        assert same_rows(pooled, want)


def test_ties_give_fewer_clusters_like_scipy():
    # 6 tokens in 2 groups of identical vectors: all within-group distances tie at 0, so
    # maxclust=3 can only form the 2 groups (SciPy does the same).
    a, b = np.eye(2, 4, dtype=np.float32)
    doc = np.stack([a, a, a, b, b, b])
    for backend in ("reference", "cpu"):
        needs(backend)
        pooled, off = vkern.pool_tokens(doc, doc_offsets=np.array([0, 6]), pool_factor=2, protected_tokens=0,
                                        backend=backend)
        assert off.tolist() == [0, 2]
        np.testing.assert_array_equal(pooled, np.stack([a, b]))          # ordered by first token
    assert same_rows(scipy_pool(doc, 2, 0), np.stack([a, b]))


def test_layouts_and_torch(rng):
    lengths = [7, 3, 12]
    x, off = normalised(rng, lengths, 16)
    want, want_off = vkern.pool_tokens(x, doc_offsets=off)
    padded = np.zeros((3, 12, 16), np.float32)
    for n in range(3):
        padded[n, :lengths[n]] = x[off[n]:off[n + 1]]
    got, got_off = vkern.pool_tokens(padded, doc_lengths=np.array(lengths))
    np.testing.assert_array_equal(got, want)
    got, got_off = vkern.pool_tokens([x[off[n]:off[n + 1]] for n in range(3)])
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got_off, want_off)
    if HAVE_TORCH:
        t, t_off = vkern.pool_tokens(torch.from_numpy(x), doc_offsets=torch.from_numpy(off))
        assert isinstance(t, torch.Tensor)
        np.testing.assert_array_equal(t.numpy(), want)


def test_against_pylate_pool_embeddings_hierarchical(rng):
    pytest.importorskip("sentence_transformers", reason="pylate.models needs sentence-transformers (see .ci/run)")
    colbert = pytest.importorskip("pylate.models.colbert")
    x, off = normalised(rng, list(rng.integers(1, 120, 10)), 64)
    docs = [torch.from_numpy(x[off[n]:off[n + 1]]) for n in range(10)]
    for pf, prot in ((2, 1), (3, 0)):
        theirs = colbert.ColBERT.pool_embeddings_hierarchical(None, docs, pool_factor=pf, protected_tokens=prot)
        ours, ours_off = vkern.pool_tokens(docs, pool_factor=pf, protected_tokens=prot)
        for n in range(10):
            assert same_rows(ours.numpy()[ours_off[n]:ours_off[n + 1]], theirs[n].numpy()), (pf, prot, n)


def test_kmeans_fixed_count_deterministic_and_clusters_found(rng):
    needs("cpu")
    # 8 well-separated groups per document, 10 noisy copies each: k = 80 // 10 = 8 must find them
    centres = rng.standard_normal((8, 32)).astype(np.float32) * 5
    docs = []
    for _ in range(5):
        pts = np.repeat(centres, 10, axis=0) + 0.01 * rng.standard_normal((80, 32)).astype(np.float32)
        docs.append(pts[rng.permutation(80)])
    x = np.concatenate(docs)
    off = np.arange(6) * 80
    out = {}
    for seed in (0, 1):
        for threads in (1, 2):
            vkern.set_num_threads(threads)
            out[seed, threads] = vkern.pool_tokens(x, doc_offsets=off, pool_factor=10, protected_tokens=0,
                                                   method="kmeans", seed=seed)
    vkern.set_num_threads(2)
    for seed in (0, 1):
        np.testing.assert_array_equal(out[seed, 1][0], out[seed, 2][0])
    pooled, new_off = out[0, 1]
    assert new_off.tolist() == [0, 8, 16, 24, 32, 40]
    for n in range(5):
        got = pooled[new_off[n]:new_off[n + 1]]
        # k-means++ seeding + Lloyd's find every group: one pooled row at each true centre
        d = np.linalg.norm(got[:, None] - centres[None], axis=2)
        assert (d.min(axis=0) < 0.05).all(), n
    # kmeans always makes exactly k clusters, even on duplicates
    dup = np.ones((20, 4), np.float32)
    p, o = vkern.pool_tokens(dup, doc_offsets=np.array([0, 20]), pool_factor=4, protected_tokens=0, method="kmeans")
    assert o.tolist() == [0, 5]


def test_pooling_keeps_maxsim_close(rng):
    """On clustered documents pooling barely moves MaxSim scores (the point of pooling)."""
    centres = rng.standard_normal((30, 64)).astype(np.float32)
    lengths = rng.integers(40, 80, 30)
    rows = []
    for n, L in enumerate(lengths):
        pick = rng.integers(0, 30, L // 2)
        pts = np.repeat(centres[pick], 2, axis=0) + 0.05 * rng.standard_normal((2 * len(pick), 64))
        rows.append(pts.astype(np.float32))
    x = np.concatenate(rows)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    off = np.zeros(31, np.int64)
    off[1:] = np.cumsum([len(r) for r in rows])
    q = x[rng.integers(0, len(x), 16)][None] + 0.1 * rng.standard_normal((1, 16, 64)).astype(np.float32)
    full = vkern.maxsim(q, x, doc_offsets=off)
    pooled, new_off = vkern.pool_tokens(x, doc_offsets=off, pool_factor=2)
    assert pooled.shape[0] <= 0.55 * x.shape[0]
    approx = vkern.maxsim(q, pooled, doc_offsets=new_off)
    assert np.corrcoef(full.ravel(), approx.ravel())[0, 1] > 0.99


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_segment_mean(backend, rng):
    shared_needs(backend, "segment_mean")
    x = rng.standard_normal((50, 7)).astype(np.float32)
    ids = rng.integers(0, 9, 50)
    got = vkern.segment_mean(x, ids, num_segments=11, backend=backend)
    for s in range(11):
        want = x[ids == s].astype(np.float64).mean(0) if (ids == s).any() else np.zeros(7)
        np.testing.assert_allclose(got[s], want, rtol=1e-6, atol=1e-6)
    assert vkern.segment_mean(x, ids, backend=backend).shape == (int(ids.max()) + 1, 7)


def test_bad_inputs():
    x = np.ones((4, 3), np.float32)
    off = np.array([0, 4])
    with pytest.raises(ValueError, match="pool_factor: expected >= 1"):
        vkern.pool_tokens(x, doc_offsets=off, pool_factor=0)
    with pytest.raises(TypeError, match="pool_factor: expected an int"):
        vkern.pool_tokens(x, doc_offsets=off, pool_factor=1.5)
    with pytest.raises(ValueError, match="protected_tokens: expected >= 0"):
        vkern.pool_tokens(x, doc_offsets=off, protected_tokens=-1)
    with pytest.raises(ValueError, match="method: expected 'ward' or 'kmeans'"):
        vkern.pool_tokens(x, doc_offsets=off, method="average")
    with pytest.raises(ValueError, match="doc_offsets: must be 1-D, start at 0"):
        vkern.pool_tokens(x, doc_offsets=np.array([0, 5]))
    with pytest.raises(ValueError, match="doc_offsets: required"):
        vkern.pool_tokens(x)
    with pytest.raises(TypeError, match="docs: expected float32"):
        vkern.pool_tokens(x.astype(np.float64), doc_offsets=off)
    bad = x.copy()
    bad[1, 1] = np.nan
    with pytest.raises(ValueError, match="docs: contains NaN"):
        vkern.pool_tokens(bad, doc_offsets=off)
    with pytest.raises(ValueError, match=r"segment_ids: every id must be in \[0, 2\)"):
        vkern.segment_mean(x, np.array([0, 1, 2, 0]), num_segments=2)
    with pytest.raises(ValueError, match=r"segment_ids: expected shape \(4,\)"):
        vkern.segment_mean(x, np.array([0, 1]))
    with pytest.raises(TypeError, match="segment_ids: expected an integer"):
        vkern.segment_mean(x, np.zeros(4))


def test_big_endian_inputs(rng):
    x, off = normalised(rng, [9, 14], 8)
    want = vkern.pool_tokens(x, doc_offsets=off)
    got = vkern.pool_tokens(x.astype(">f4"), doc_offsets=off.astype(">i8"))
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(vkern.segment_mean(x.astype(">f4"), np.arange(23) % 3),
                                  vkern.segment_mean(x, np.arange(23) % 3))
