"""vkern.muvera against fastembed's MUVERA post-processor (fastembed.postprocess.Muvera), the real
library, constructed offline from a dimension (no model download).

The two define the same FDE only where their random draws play no part: one partition
(k = 0) and no projection (d_proj = D), where a document's FDE is R copies of its mean token
and a query's R copies of its token sum. There the vectors must agree. Elsewhere their random
matrices and conventions differ (fastembed: its own numpy draws, binary partition ids, a dense
+-1 projection scaled by 1/sqrt(d_proj), an empty partition filled with the first token of the
nearest occupied one; vkern: seeded SimHash + AMS sketch, Gray-code partitions, filled from the
nearest token), so the default configuration is compared on the statistic both approximate:
FDE dot products that rank documents like exact MaxSim.

"""
import numpy as np
import pytest

fastembed_post = pytest.importorskip("fastembed.postprocess", reason="pip install fastembed (see .ci/run)")

import vkern


def normalised(rng, lengths, D):
    off = np.zeros(len(lengths) + 1, np.int64)
    off[1:] = np.cumsum(lengths)
    x = rng.standard_normal((int(off[-1]), D)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, off


def test_one_partition_identity_projection_same_vectors():
    rng = np.random.default_rng(0)
    D, R = 32, 3
    docs, off = normalised(rng, [5, 1, 17, 40], D)
    q = rng.standard_normal((7, D)).astype(np.float32)
    theirs = fastembed_post.Muvera(D, k_sim=0, dim_proj=D, r_reps=R, random_seed=0)
    cfg = vkern.muvera.MuveraConfig(dim=D, num_repetitions=R, num_simhash_projections=0, projection_dim=None)
    assert theirs.embedding_size == cfg.fde_dim == R * D
    ours = vkern.muvera.encode_documents(docs, cfg, doc_offsets=off)
    for n in range(len(off) - 1):
        np.testing.assert_allclose(ours[n], theirs.process_document(docs[off[n]:off[n + 1]]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(vkern.muvera.encode_queries(q, cfg), theirs.process_query(q), rtol=1e-5, atol=1e-5)


def test_default_configuration_same_size_and_both_rank_like_maxsim():
    rng = np.random.default_rng(1)
    D = 64
    docs, off = normalised(rng, rng.integers(20, 60, 60), D)
    # queries made of noisy copies of some document's tokens, so MaxSim has a spread to rank by
    queries = [docs[off[n]:off[n] + 8] + 0.3 * rng.standard_normal((8, D)).astype(np.float32) for n in range(0, 60, 6)]
    theirs = fastembed_post.Muvera(D, k_sim=5, dim_proj=16, r_reps=20, random_seed=42)
    cfg = vkern.muvera.MuveraConfig(dim=D, num_repetitions=20, num_simhash_projections=5, projection_dim=16)
    assert theirs.embedding_size == cfg.fde_dim == 10240
    ours_d = vkern.muvera.encode_documents(docs, cfg, doc_offsets=off)
    theirs_d = np.stack([theirs.process_document(docs[off[n]:off[n + 1]]) for n in range(len(off) - 1)])
    rank_ours, rank_theirs, r_ours, r_theirs = [], [], [], []
    for i, q in enumerate(queries):
        exact = vkern.maxsim(q, docs, doc_offsets=off)
        src = 6 * i
        assert int(np.argmax(exact)) == src                       # the query's source document
        so = ours_d @ vkern.muvera.encode_queries(q, cfg)
        st = theirs_d @ theirs.process_query(q)
        rank_ours.append(int((so > so[src]).sum()))
        rank_theirs.append(int((st > st[src]).sum()))
        r_ours.append(np.corrcoef(so, exact)[0, 1])
        r_theirs.append(np.corrcoef(st, exact)[0, 1])
    # both sketches find the source document near the top of 60 and correlate with MaxSim alike
    assert np.median(rank_ours) <= 5 and np.median(rank_theirs) <= 5, (rank_ours, rank_theirs)
    assert min(np.mean(r_ours), np.mean(r_theirs)) > 0.15
    assert abs(np.mean(r_ours) - np.mean(r_theirs)) < 0.15
