"""vkern.integrations.pylate against the real pylate.scores."""
import pytest

torch = pytest.importorskip("torch")
pylate_scores = pytest.importorskip("pylate.scores")
pylate_rank = pytest.importorskip("pylate.rank")

import vkern
from vkern.integrations import pylate as vp

Q_EX = [[[1.], [0.], [0.], [0.]], [[0.], [2.], [0.], [0.]], [[0.], [0.], [3.], [0.]]]
QMASK_EX = [[1., 1., 1., 1.], [1., 1., 1., 1.], [1., 1., 0., 1.]]


def test_docstring_example_colbert_scores():
    q = torch.tensor(Q_EX)
    d = torch.tensor([[[10.], [0.], [1.]], [[0.], [100.], [10.]], [[1.], [0.], [1000.]]])
    dm = torch.tensor([[1., 1., 1.], [1., 0., 1.], [1., 1., 1.]])
    qm = torch.tensor(QMASK_EX)
    want = pylate_scores.colbert_scores(q, d, qm, dm, backend="torch")
    got = vp.colbert_scores(q, d, qm, dm)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got, torch.tensor([[10., 10., 1000.], [20., 20., 2000.], [0., 0., 0.]]))


def test_docstring_example_kd_and_pairwise():
    q = torch.tensor(Q_EX)
    d = torch.tensor([[[[10.], [0.], [1.]], [[20.], [0.], [1.]], [[30.], [0.], [1.]]],
                      [[[0.], [100.], [1.]], [[0.], [200.], [1.]], [[0.], [300.], [1.]]],
                      [[[1.], [0.], [1000.]], [[1.], [0.], [2000.]], [[10.], [0.], [3000.]]]])
    dm = torch.ones(3, 3, 3)
    dm[0, 0, 0] = 0
    qm = torch.tensor(QMASK_EX)
    torch.testing.assert_close(vp.colbert_kd_scores(q, d, qm, dm),
                               pylate_scores.colbert_kd_scores(q, d, qm, dm, backend="torch"))
    dp = torch.tensor([[[10.], [0.], [1.]], [[0.], [100.], [1.]], [[1.], [0.], [1000.]]])
    torch.testing.assert_close(vp.colbert_scores_pairwise(q, dp),
                               pylate_scores.colbert_scores_pairwise(q, dp, backend="torch"))


@pytest.mark.parametrize("mask_kind", ["random", "prefix_zero_padded", "prefix_nonzero_padded", "none"])
def test_random_masked_matches_pylate(mask_kind):
    g = torch.Generator().manual_seed(hash(mask_kind) % 1000)
    q = torch.randn(5, 9, 24, generator=g)
    d = torch.randn(7, 31, 24, generator=g)
    qm = (torch.rand(5, 9, generator=g) > 0.3).float()
    if mask_kind == "random":
        dm = (torch.rand(7, 31, generator=g) > 0.5).float()
        dm[3] = 0                                     # a fully masked document scores 0
    elif mask_kind == "none":
        dm = None
    else:
        lengths = torch.tensor([31, 1, 5, 30, 17, 2, 9])
        dm = (torch.arange(31)[None] < lengths[:, None]).float()
        if mask_kind == "prefix_zero_padded":
            d = d * dm[:, :, None]
    want = pylate_scores.colbert_scores(q, d, qm, dm, backend="torch")
    torch.testing.assert_close(vp.colbert_scores(q, d, qm, dm), want, rtol=1e-5, atol=1e-4)
    # NumPy and bool-mask inputs give the same numbers
    got_np = vp.colbert_scores(q.numpy(), d.numpy(), qm.bool(), None if dm is None else dm.bool())
    torch.testing.assert_close(got_np, want, rtol=1e-5, atol=1e-4)


def test_colbertscores_query_major_matches_pylate():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(3, 6, 16, generator=g)
    d = torch.randn(3, 2, 11, 16, generator=g)
    dm = (torch.rand(3, 2, 11, generator=g) > 0.2).float()
    qm = torch.ones(3, 6)
    want = pylate_scores.ColBERTScores()(q, d, qm, dm, backend="torch")
    got = vp.ColBERTScores()(q, d, qm, dm)
    assert got.shape == (3, 6)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_exact_matches_vkern_maxsim_and_disagrees_with_default():
    g = torch.Generator().manual_seed(4)
    q = torch.randn(4, 7, 16, generator=g)
    d = torch.randn(6, 13, 16, generator=g)
    dm = torch.rand(6, 13, generator=g) > 0.5
    dm[:, 0] = True
    docs = [d[i][dm[i]] for i in range(6)]
    want = vkern.maxsim(q, docs)
    torch.testing.assert_close(vp.colbert_scores(q, d, documents_mask=dm, exact=True), want, rtol=1e-5, atol=1e-4)
    # the documented example: a negative similarity beside a masked token
    args = ([[[1.0]]], [[[-2.0], [5.0]]])
    assert vp.colbert_scores(*args, documents_mask=[[1, 0]]).item() == 0.0
    assert vp.colbert_scores(*args, documents_mask=[[1, 0]], exact=True).item() == -2.0
    assert pylate_scores.colbert_scores(torch.tensor(args[0]), torch.tensor(args[1]),
                                        documents_mask=torch.tensor([[1., 0.]]), backend="torch").item() == 0.0


def test_grad_mode_falls_back_and_matches():
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 4, 8, generator=g, requires_grad=True)
    d = torch.randn(3, 6, 8, generator=g)
    dm = (torch.rand(3, 6, generator=g) > 0.4).float()
    got = vp.colbert_scores(q, d, documents_mask=dm)
    want = pylate_scores.colbert_scores(q, d, documents_mask=dm, backend="torch")
    torch.testing.assert_close(got, want)
    (ga,) = torch.autograd.grad(got.sum(), q)
    (gb,) = torch.autograd.grad(want.sum(), q)
    torch.testing.assert_close(ga, gb)


def test_patch_rerank_same_ranking_and_restores():
    g = torch.Generator().manual_seed(6)
    qs = [torch.randn(8, 16, generator=g) for _ in range(3)]
    docs = [[torch.randn(int(n), 16, generator=g) for n in torch.randint(3, 20, (10,), generator=g)] for _ in range(3)]
    ids = [[str(i) for i in range(10)] for _ in range(3)]
    orig = pylate_scores.colbert_scores
    want = pylate_rank.rerank(ids, qs, docs)
    with vp.patch():
        assert pylate_scores.colbert_scores is vp.colbert_scores
        import pylate.rank.rank as rr
        assert rr.colbert_scores is vp.colbert_scores
        got = pylate_rank.rerank(ids, qs, docs)
    assert pylate_scores.colbert_scores is orig
    assert not vp.is_patched()
    assert [[r["id"] for r in x] for x in got] == [[r["id"] for r in x] for x in want]
    for a, b in zip(got, want):
        for ra, rb in zip(a, b):
            assert ra["score"] == pytest.approx(rb["score"], rel=1e-5, abs=1e-4)
    vp.patch().start()
    try:
        assert pylate_scores.colbert_scores is vp.colbert_scores
    finally:
        vp.unpatch()
    assert pylate_scores.colbert_scores is orig


def test_bad_inputs():
    q = torch.randn(2, 4, 8)
    d = torch.randn(3, 5, 8)
    with pytest.raises(ValueError, match="documents_mask"):
        vp.colbert_scores(q, d, documents_mask=torch.ones(3, 4))
    with pytest.raises(ValueError, match="queries_mask"):
        vp.colbert_scores(q, d, queries_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="documents_mask"):
        vp.colbert_scores(q, d, documents_mask=torch.full((3, 5), 0.5))
    with pytest.raises(ValueError, match="documents_embeddings"):
        vp.colbert_scores(q, torch.randn(3, 5, 7))
    with pytest.raises(TypeError, match="queries_embeddings"):
        vp.colbert_scores("abc", d)
    with pytest.raises(ValueError, match="documents_embeddings"):
        vp.colbert_kd_scores(q, torch.randn(3, 2, 5, 8))
