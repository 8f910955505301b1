"""vkern.muvera: encodings against a plain reimplementation of the paper's definition written
here, cpu == reference, determinism by seed, the FDE dot product tracking MaxSim on clustered
data, search recall against exact MaxSim, config round trips and bad inputs."""
import json

import numpy as np
import pytest

import vkern
from vkern import muvera as mv
from conftest import needs as shared_needs


def needs(name):
    shared_needs(name, "muvera_encode")


def clustered(rng, n_docs, D=32, n_topics=12, noise=0.3):
    """Documents and queries drawn around shared topic centres (so MaxSim has structure)."""
    centres = rng.standard_normal((n_topics, D))
    lengths = rng.integers(5, 40, n_docs)
    rows = []
    for L in lengths:
        topics = rng.choice(n_topics, 3, replace=False)
        rows.append(centres[rng.choice(topics, L)] + noise * rng.standard_normal((L, D)))
    x = np.concatenate(rows).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    off = np.zeros(n_docs + 1, np.int64)
    off[1:] = np.cumsum(lengths)
    return x, off, centres


def paper_fde(tokens, cfg, is_query):
    """Straight from the definition, one token and one block at a time (Python loops)."""
    m = cfg.matrices()
    k, dp, P = cfg.num_simhash_projections, cfg.block_dim, 1 << cfg.num_simhash_projections
    blocks = np.zeros((cfg.num_repetitions, P, dp))
    for r in range(cfg.num_repetitions):
        members = [[] for _ in range(P)]
        bitstrings = []
        projected = []
        for t in tokens:
            bits = [int(np.dot(t.astype(np.float64), m["simhash"][r][:, j].astype(np.float64)) > 0) for j in range(k)]
            # partition: the integer whose Gray code is the bit string (MSB first)
            p, prev = 0, 0
            for bit in bits:
                prev ^= bit
                p = (p << 1) | prev
            if cfg.projection_dim is None:
                v = t.astype(np.float64)
            else:
                v = np.zeros(dp, np.float32)
                for i in range(len(t)):
                    v[m["ams_index"][r][i]] += m["ams_sign"][r][i] * t[i]
                v = v.astype(np.float64)
            members[p].append(v)
            bitstrings.append(int("".join(map(str, bits)) or "0", 2))
            projected.append(v)
        for p in range(P):
            if members[p]:
                blocks[r, p] = np.sum(members[p], 0) if is_query else np.mean(members[p], 0)
            elif not is_query and cfg.fill_empty_partitions and len(tokens):
                gray = p ^ (p >> 1)
                ham = [bin(b ^ gray).count("1") for b in bitstrings]
                blocks[r, p] = projected[int(np.argmin(ham))]
    fde = blocks.ravel()
    if cfg.final_projection_dim is not None:
        out = np.zeros(cfg.final_projection_dim)
        for i, v in enumerate(fde):
            out[m["final_index"][i]] += m["final_sign"][i] * v
        fde = out
    return fde


CONFIGS = [
    dict(num_repetitions=3, num_simhash_projections=3, projection_dim=None),
    dict(num_repetitions=2, num_simhash_projections=4, projection_dim=8, fill_empty_partitions=False),
    dict(num_repetitions=2, num_simhash_projections=2, projection_dim=5, final_projection_dim=37),
    dict(num_repetitions=1, num_simhash_projections=0, projection_dim=None),
]


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("conf", CONFIGS)
def test_matches_paper_definition(backend, conf, rng):
    needs(backend)
    x, off, _ = clustered(rng, 5, D=12)
    off[2] = off[1]                                   # an empty document
    cfg = mv.MuveraConfig(dim=12, seed=3, **conf)
    docs = mv.encode_documents(x, cfg, doc_offsets=off, backend=backend)
    assert docs.shape == (5, cfg.fde_dim) and docs.dtype == np.float32
    for n in range(5):
        np.testing.assert_allclose(docs[n], paper_fde(x[off[n]:off[n + 1]], cfg, False), rtol=1e-5, atol=1e-6)
    q = x[:9]
    np.testing.assert_allclose(mv.encode_queries(q, cfg, backend=backend), paper_fde(q, cfg, True),
                               rtol=1e-5, atol=1e-6)


def test_cpu_equals_reference_and_layouts(rng):
    needs("cpu")
    x, off, _ = clustered(rng, 40, D=32)
    cfg = mv.MuveraConfig(dim=32, num_repetitions=4, num_simhash_projections=4, projection_dim=8)
    r = mv.encode_documents(x, cfg, doc_offsets=off, backend="reference")
    c = mv.encode_documents(x, cfg, doc_offsets=off, backend="cpu")
    np.testing.assert_allclose(c, r, rtol=1e-6, atol=1e-7)
    lst = mv.encode_documents([x[off[n]:off[n + 1]] for n in range(40)], cfg)
    np.testing.assert_array_equal(lst, c)
    qb = np.stack([x[:10], x[10:20]])
    np.testing.assert_allclose(mv.encode_queries(qb, cfg, query_lengths=np.array([10, 4])),
                               np.stack([mv.encode_queries(x[:10], cfg), mv.encode_queries(x[10:14], cfg)]),
                               rtol=1e-6, atol=1e-6)


def test_determinism_by_seed_and_config_round_trip(rng):
    x, off, _ = clustered(rng, 6, D=16)
    cfg = mv.MuveraConfig(dim=16, num_repetitions=3, num_simhash_projections=3, projection_dim=4,
                          final_projection_dim=50, seed=11)
    again = mv.MuveraConfig.from_json(cfg.to_json())
    assert again == cfg and json.loads(cfg.to_json())["format"] == "vkern.muvera/1"
    assert mv.MuveraConfig.from_dict(cfg.to_dict()) == cfg
    a = mv.encode_documents(x, cfg, doc_offsets=off)
    b = mv.encode_documents(x, again, doc_offsets=off)
    np.testing.assert_array_equal(a, b)
    other = mv.encode_documents(x, mv.MuveraConfig(**{**cfg.__dict__, "seed": 12}), doc_offsets=off)
    assert not np.allclose(a, other)


def test_fde_dot_tracks_maxsim(rng):
    """Identity projection, no fill: <FDE(q), FDE(d)> / R ~ MaxSim(q, d); correlation over pairs."""
    x, off, centres = clustered(rng, 150, D=32, noise=0.25)
    cfg = mv.MuveraConfig(dim=32, num_repetitions=20, num_simhash_projections=4, projection_dim=None)
    docs = mv.encode_documents(x, cfg, doc_offsets=off)
    q = np.stack([x[off[n]:off[n] + 4] for n in range(0, 150, 15)])      # 10 queries of 4 tokens
    q = q + 0.1 * rng.standard_normal(q.shape).astype(np.float32)
    exact = vkern.maxsim(q, x, doc_offsets=off)
    approx = mv.fde_scores(mv.encode_queries(q, cfg), docs, cfg) / cfg.num_repetitions
    corr = [np.corrcoef(exact[b], approx[b])[0, 1] for b in range(len(q))]
    assert np.mean(corr) > 0.85, corr


def test_search_recall_against_exact(rng):
    x, off, _ = clustered(rng, 300, D=32, noise=0.3)
    cfg = mv.MuveraConfig(dim=32, num_repetitions=10, num_simhash_projections=4, projection_dim=16)
    fdes = mv.encode_documents(x, cfg, doc_offsets=off)
    q = np.stack([x[off[n]:off[n] + 6] for n in range(0, 300, 30)])
    q = q + 0.1 * rng.standard_normal(q.shape).astype(np.float32)
    ev, ei = vkern.maxsim(q, x, doc_offsets=off, topk=10)
    s, i = mv.search(q, x, doc_offsets=off, doc_fdes=fdes, config=cfg, k=10, candidates=100)
    recall = np.mean([len(set(i[b]) & set(ei[b])) / 10 for b in range(len(q))])
    assert recall >= 0.8, recall
    # the returned scores are exact MaxSim of the returned ids
    full = vkern.maxsim(q, x, doc_offsets=off)
    np.testing.assert_allclose(s, np.take_along_axis(full, i, 1), rtol=1e-6)
    # int8 documents rescored in place give nearly the same ids
    qd = vkern.quantize_docs(x, doc_offsets=off)
    s8, i8 = mv.search(q, qd, doc_fdes=fdes, config=cfg, k=10, candidates=100)
    assert np.mean([len(set(i8[b]) & set(i[b])) / 10 for b in range(len(q))]) >= 0.9
    # every candidate -> the exact top-10
    s_all, i_all = mv.search(q[0], x, doc_offsets=off, doc_fdes=fdes, config=cfg, k=10, candidates=300)
    np.testing.assert_array_equal(i_all, ei[0])


def test_bad_inputs(rng):
    x, off, _ = clustered(rng, 4, D=8)
    cfg = mv.MuveraConfig(dim=8, num_repetitions=2, num_simhash_projections=2, projection_dim=4)
    fdes = mv.encode_documents(x, cfg, doc_offsets=off)
    other = mv.MuveraConfig(dim=8, num_repetitions=3, num_simhash_projections=2, projection_dim=4)
    with pytest.raises(ValueError, match="doc_fdes: expected shape"):
        mv.search(x[:3], x, doc_offsets=off, doc_fdes=fdes, config=other)
    with pytest.raises(ValueError, match="docs: token dim 8 does not match config.dim=9"):
        mv.encode_documents(x, mv.MuveraConfig(dim=9), doc_offsets=off)
    with pytest.raises(TypeError, match="config: expected a vkern.muvera.MuveraConfig"):
        mv.encode_documents(x, {"dim": 8}, doc_offsets=off)
    with pytest.raises(ValueError, match="num_repetitions: expected >= 1"):
        mv.MuveraConfig(dim=8, num_repetitions=0)
    with pytest.raises(ValueError, match="num_simhash_projections: expected <= 16"):
        mv.MuveraConfig(dim=8, num_simhash_projections=17)
    with pytest.raises(ValueError, match="projection_dim: expected None or an int >= 1"):
        mv.MuveraConfig(dim=8, projection_dim=0)
    with pytest.raises(ValueError, match="config: unknown keys"):
        mv.MuveraConfig.from_dict({"dim": 8, "reps": 3})
    with pytest.raises(ValueError, match="candidates: must be >= k"):
        mv.search(x[:3], x, doc_offsets=off, doc_fdes=fdes, config=cfg, k=5, candidates=2)
    with pytest.raises(ValueError, match="doc_offsets: must be 1-D"):
        mv.encode_documents(x, cfg, doc_offsets=np.array([0, 2, 1, len(x)]))
    bad = x.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="docs: contains NaN"):
        mv.encode_documents(bad, cfg, doc_offsets=off)


def _simd_levels():
    return [lv for lv in ("generic", "avx2", "avx512") if lv in vkern.info().get("simd_supported", [])]


def near_zero_tokens(rng, cfg, n, rel=1e-9):
    """n tokens, token i built so that its exact dot with SimHash column i % (R * k) is
    +-rel * |x| |g| (random sign): far outside float64 rounding (~D * 1e-16 * |x| |g|), well
    inside float32 rounding (~1e-7 * |x| |g|), so a float32 dot would get that sign wrong about
    half the time. Returns the tokens and, per token, (r, j, the exact sign)."""
    import math
    D, k = cfg.dim, cfg.num_simhash_projections
    sim = cfg.matrices()["simhash"]
    xs, cols = [], []
    for i in range(n):
        r, j = divmod(i % (cfg.num_repetitions * k), k)
        g = sim[r][:, j].astype(np.float64)
        v = rng.standard_normal(D)
        v[0] = 0.0
        h = g.copy()
        h[0] = 0.0
        x = (v - (v @ h) / (h @ h) * h).astype(np.float32)   # x[0] = 0, the rest nearly orthogonal to g
        target = (1 if rng.random() < 0.5 else -1) * rel * np.linalg.norm(x) * np.linalg.norm(g)
        rest = math.fsum(float(x[q]) * float(g[q]) for q in range(1, D))   # products exact in float64
        x[0] = np.float32((target - rest) / g[0])   # tiny, so finely rounded: the dot lands on target
        exact = math.fsum(float(x[q]) * float(g[q]) for q in range(D))
        assert abs(exact - target) < 1e-3 * abs(target)
        xs.append(x)
        cols.append((r, j, exact > 0))
    return np.stack(xs), cols


@pytest.mark.parametrize("projection_dim", [None, 8])
def test_signs_certain_near_zero_dots(projection_dim, rng):
    """The cpu encoder computes the SimHash dots in float32 and trusts a sign only outside a
    proven error bound, recomputing the rest in float64 (csrc/cpu/muvera.cpp): on tokens whose
    dots sit between float32 and float64 rounding, its partitions (and so its vectors) must still
    be the float64 ones, the reference's, at every SIMD level."""
    needs("cpu")
    cfg = mv.MuveraConfig(dim=48, num_repetitions=3, num_simhash_projections=4, projection_dim=projection_dim,
                          fill_empty_partitions=False, seed=5)
    x, cols = near_zero_tokens(rng, cfg, 240)
    sim = cfg.matrices()["simhash"]
    # the hazard is real: float32 dots get many of these signs wrong ...
    f32 = np.array([(x[i] @ sim[r][:, j]) > 0 for i, (r, j, _) in enumerate(cols)])
    want = np.array([s for _, _, s in cols])
    assert np.mean(f32 != want) > 0.1
    # ... the reference's float64 dots get them right
    for r in range(cfg.num_repetitions):
        b, _ = mv.ref.partitions(x, sim[r])
        for i, (rr, j, s) in enumerate(cols):
            if rr == r:
                assert bool((b[i] >> (cfg.num_simhash_projections - 1 - j)) & 1) == s
    # one token per set: any wrong bit moves the token to another block
    off = np.arange(len(x) + 1, dtype=np.int64)
    ref_fde = mv.encode_documents(x, cfg, doc_offsets=off, backend="reference")
    try:
        for level in _simd_levels():
            vkern.set_simd_level(level)
            got = mv.encode_documents(x, cfg, doc_offsets=off, backend="cpu")
            np.testing.assert_array_equal(got, ref_fde, err_msg=level)
    finally:
        vkern.set_simd_level("auto")


def test_simd_levels_bit_identical(rng):
    """Every SIMD level of the cpu encoder gives the same bits (AMS sums in the same order, the
    same certified signs), on tails of every size (tokens per set not a multiple of 4 or 8,
    SimHash columns not a multiple of 8) and with fill_empty_partitions and a final sketch."""
    needs("cpu")
    lengths = rng.integers(0, 90, 30)
    off = np.zeros(31, np.int64)
    off[1:] = np.cumsum(lengths)
    for conf in (dict(dim=37, num_repetitions=5, num_simhash_projections=5, projection_dim=11),
                 dict(dim=40, num_repetitions=3, num_simhash_projections=3, projection_dim=None),
                 dict(dim=16, num_repetitions=7, num_simhash_projections=2, projection_dim=6, final_projection_dim=50)):
        cfg = mv.MuveraConfig(**conf)
        x = rng.standard_normal((int(off[-1]), cfg.dim)).astype(np.float32)
        ref_fde = mv.encode_documents(x, cfg, doc_offsets=off, backend="reference")
        outs = {}
        try:
            for level in _simd_levels():
                vkern.set_simd_level(level)
                outs[level] = mv.encode_documents(x, cfg, doc_offsets=off, backend="cpu")
        finally:
            vkern.set_simd_level("auto")
        for level, o in outs.items():
            np.testing.assert_array_equal(o, outs["generic"], err_msg=f"{level} {conf}")
            np.testing.assert_allclose(o, ref_fde, rtol=1e-6, atol=1e-7, err_msg=f"{level} {conf}")
