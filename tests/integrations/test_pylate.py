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


def _grads(fn, *xs):
    xs = [x.detach().clone().requires_grad_(True) for x in xs]
    out = fn(*xs)
    w = torch.linspace(-1.0, 2.0, out.numel()).reshape(out.shape)
    return out, torch.autograd.grad((out * w).sum(), xs)


@pytest.mark.parametrize("mask_kind", ["random", "prefix", "none"])
@pytest.mark.parametrize("exact", [False, True])
def test_grads_match_pylate_torch(mask_kind, exact):
    g = torch.Generator().manual_seed(5 + hash(mask_kind) % 100)
    q = torch.randn(3, 7, 16, generator=g)
    d = torch.randn(5, 23, 16, generator=g)
    qm = (torch.rand(3, 7, generator=g) > 0.3).float()
    if mask_kind == "random":
        dm = (torch.rand(5, 23, generator=g) > 0.4).float()
        dm[2] = 0
    elif mask_kind == "prefix":
        dm = (torch.arange(23)[None] < torch.tensor([23, 1, 9, 22, 4])[:, None]).float()
    else:
        dm = None
    got, (gq, gd) = _grads(lambda a, b: vp.colbert_scores(a, b, qm, dm, exact=exact), q, d)
    if exact:     # vkern's semantics: the same as float64 torch with -inf at masked similarities
        def want_fn(a, b):
            sim = torch.einsum("ash,bth->abst", a, b)
            if dm is not None:
                sim = sim.masked_fill(~dm.bool()[None, :, None, :], float("-inf"))
            best = sim.max(-1).values.masked_fill(~qm.bool()[:, None, :], 0.0)
            return best.sum(-1)
        keep = slice(None) if dm is None else dm.bool().any(1)
        want, (wq, wd) = _grads(lambda a, b: want_fn(a, b)[:, keep] if dm is not None else want_fn(a, b),
                                q.double(), d.double())
        out, (gq, gd) = _grads(lambda a, b: vp.colbert_scores(a, b, qm, dm, exact=True)[:, keep], q, d)
        torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-4)
    else:
        want, (wq, wd) = _grads(lambda a, b: pylate_scores.colbert_scores(a, b, qm, dm, backend="torch"),
                                q.double(), d.double())
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(gq.double(), wq, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(gd.double(), wd, rtol=1e-5, atol=1e-4)
    if dm is not None:
        assert bool((gd[~dm.bool()] == 0).all())        # masked document tokens get no gradient


def test_no_torch_fallback_when_training():
    # the gradient path is vkern's own op: its backward node, not einsum's
    q = torch.randn(2, 4, 8, requires_grad=True)
    d = torch.randn(3, 6, 8, requires_grad=True)
    s = vp.colbert_scores(q, d)
    assert "vkern_maxsim_argmax" in type(s.grad_fn).__name__


def test_colbertscores_and_kd_grads_match_pylate():
    g = torch.Generator().manual_seed(11)
    q = torch.randn(4, 8, 16, generator=g)
    d = torch.randn(4, 3, 19, 16, generator=g)
    dm = (torch.rand(4, 3, 19, generator=g) > 0.25).float()
    got, ga = _grads(lambda a, b: vp.ColBERTScores()(a, b, None, dm), q, d)
    want, gb = _grads(lambda a, b: pylate_scores.ColBERTScores()(a, b, None, dm, backend="torch"), q, d)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-4)
    got, ga = _grads(lambda a, b: vp.colbert_kd_scores(a, b, None, dm), q, d)
    want, gb = _grads(lambda a, b: pylate_scores.colbert_kd_scores(a, b, None, dm, backend="torch"), q, d)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-4)


class _TinyEncoder(torch.nn.Module):
    """Stands in for a ColBERT model inside PyLate's real Contrastive loss: token embeddings
    from an embedding table (what the loss reads: model(features)["token_embeddings"])."""

    skiplist = [3, 4]
    do_query_expansion = False

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(50, 16)

    def forward(self, features):
        return {"token_embeddings": self.emb(features["input_ids"])}


def test_patch_routes_pylate_contrastive_loss_same_loss_and_grads():
    losses = pytest.importorskip("pylate.losses")     # imports sentence-transformers
    g = torch.Generator().manual_seed(12)

    def feats(B, L):
        ids = torch.randint(0, 50, (B, L), generator=g)
        lens = torch.randint(2, L + 1, (B,), generator=g)
        return {"input_ids": ids, "attention_mask": (torch.arange(L)[None] < lens[:, None]).long()}

    batch = [feats(6, 8), feats(6, 21), feats(6, 21)]     # query, positive, negative (docs padded alike)
    torch.manual_seed(0)
    model = _TinyEncoder()
    loss_fn = losses.Contrastive(model)
    want = loss_fn(batch)
    want_g = torch.autograd.grad(want, model.emb.weight)[0]
    with vp.patch():
        got = loss_fn(batch)                    # the instance built before patching is routed too
        got_g = torch.autograd.grad(got, model.emb.weight)[0]
        s = loss_fn.score_metric(torch.randn(2, 3, 16, requires_grad=True), torch.randn(2, 2, 5, 16))
        assert "vkern_maxsim_argmax" in type(s.grad_fn).__name__
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_g, want_g, rtol=1e-5, atol=1e-5)
    assert "__call__" in pylate_scores.ColBERTScores.__dict__
    s = loss_fn.score_metric(torch.randn(2, 3, 16, requires_grad=True), torch.randn(2, 2, 5, 16))
    assert "vkern" not in type(s.grad_fn).__name__         # restored on exit


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


def test_readme_training_with_pylate_example_runs():
    import pathlib
    import re
    text = (pathlib.Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = re.search(r"```python\n(.*?)```", text.split("## Training with PyLate\n", 1)[1], re.S).group(1)
    ns = {}
    exec(block, ns)
    assert ns["q"].grad is not None and bool((ns["d"].grad[..., 200:, :] == 0).all())
    want = pylate_scores.ColBERTScores()(ns["q"], ns["d"], documents_mask=ns["mask"], backend="torch")
    torch.testing.assert_close(ns["scores"], want, rtol=1e-5, atol=1e-4)
