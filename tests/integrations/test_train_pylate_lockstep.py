"""benchmarks/train_pylate_minilm.py's lockstep check on a tiny local encoder (no hub, no MiniLM)."""
import contextlib
import importlib.util
import pathlib

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("pylate.scores")
pl_losses = pytest.importorskip("pylate.losses")

from vkern.integrations import pylate as vp

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "train_pylate_minilm.py"
SKIP = [3, 5]          # token ids the "skiplist" drops from the documents


def _script():
    spec = importlib.util.spec_from_file_location("train_pylate_minilm", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class Tiny(torch.nn.Module):
    """Token embedding -> one transformer layer -> projection: a tiny stand-in for the ColBERT encoder."""

    def __init__(self, vocab=40, width=24, out=16):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, width)
        self.layer = torch.nn.TransformerEncoderLayer(width, 2, 32, dropout=0.0, batch_first=True)
        self.proj = torch.nn.Linear(width, out, bias=False)

    def forward(self, f):
        pad = f["attention_mask"] == 0
        return self.proj(self.layer(self.emb(f["input_ids"]), src_key_padding_mask=pad))


def _batch(g, B=4, Lq=6, Ld=11, vocab=40):
    def feats(L, lengths):
        ids = torch.randint(1, vocab, (B, L), generator=g)
        mask = (torch.arange(L)[None] < torch.tensor(lengths)[:, None]).long()
        ids[:, 1] = SKIP[0]                                     # every document has a skiplisted token
        return {"input_ids": ids * mask, "attention_mask": mask}
    return [feats(Lq, [Lq] * B), feats(Ld, [Ld, 7, 9, 4]), feats(Ld, [5, Ld, 8, 10])]


def _setup(seed=0):
    mod = _script()
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    enc = Tiny()
    feats = _batch(g)
    stub = mod.Stub(SKIP, do_query_expansion=True)
    loss_fn = pl_losses.Contrastive(stub)
    return mod, enc, feats, stub, loss_fn


@pytest.mark.parametrize("vkern_first", [False, True])
def test_lockstep_agrees_and_matches_plain_pylate(vkern_first):
    mod, enc, feats, stub, loss_fn = _setup()
    emb = [enc(f) for f in feats]
    r = mod.lockstep(loss_fn, feats, emb, vkern_first=vkern_first)
    assert not vp.is_patched()                                  # the patch is undone
    assert type(loss_fn.score_metric).__name__ == "ColBERTScores"   # the loss's scorer is put back
    assert r["loss_abs_diff"] < 1e-5 and r["grad_rel_diff"] < 1e-5
    assert r["scores_abs_diff"] < 1e-5 and r["scores_grad_rel_diff"] < 1e-5
    for k in ("pylate_loss_ms", "vkern_loss_ms", "pylate_scores_ms", "vkern_scores_ms"):
        assert r[k] > 0
    # PyLate's side is plain PyLate: the same loss and gradients as Contrastive on the whole graph
    stub.outputs = {id(f): e for f, e in zip(feats, emb)}
    want = loss_fn(feats)
    torch.testing.assert_close(r["pylate_loss"], want.detach(), rtol=0, atol=0)
    want_grads = torch.autograd.grad(want, emb, retain_graph=True)
    for got, w in zip(r["pylate_loss_grads"], want_grads):
        torch.testing.assert_close(got, w, rtol=0, atol=0)
    # pushing the leaves' gradients through the encoder equals loss.backward() on the whole graph
    torch.autograd.backward(emb, r["pylate_loss_grads"])
    through = [p.grad.clone() for p in enc.parameters()]
    enc.zero_grad()
    emb2 = [enc(f) for f in feats]
    stub.outputs = {id(f): e for f, e in zip(feats, emb2)}
    loss_fn(feats).backward()
    for a, p in zip(through, enc.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-6, atol=1e-7)
    # the skiplist mattered: the skiplisted document tokens got no gradient on either side
    for side in ("pylate", "vkern"):
        gpos = r[f"{side}_loss_grads"][1]
        assert gpos[:, 1].abs().max().item() == 0.0
        assert gpos.abs().max().item() > 0


def test_lockstep_reports_a_wrong_scorer():
    """The check can fail: a 'vkern' side whose ColBERTScores is off by 1% is reported as different."""
    import pylate.scores as ps
    mod, enc, feats, stub, loss_fn = _setup(1)
    emb = [enc(f) for f in feats]
    cls = ps.ColBERTScores
    orig = cls.__dict__["__call__"]

    @contextlib.contextmanager
    def wrong():
        cls.__call__ = lambda self, *a, **kw: 1.01 * orig(self, *a, **kw)
        try:
            yield
        finally:
            cls.__call__ = orig

    r = mod.lockstep(loss_fn, feats, emb, vkern_context=wrong)
    assert cls.__dict__["__call__"] is orig
    assert r["scores_abs_diff"] > 1e-3 and r["scores_grad_rel_diff"] > 5e-3
    assert r["loss_abs_diff"] > 1e-5 and r["grad_rel_diff"] > 1e-3
    with pytest.raises(TypeError, match="Stub"):
        mod.lockstep(pl_losses.Contrastive(enc), feats, emb)


def test_compare_rankings_counts_and_explains_near_ties():
    mod = _script()
    want = [[{"id": "a", "score": 3.0}, {"id": "b", "score": 2.0}, {"id": "c", "score": 1.0}],
            [{"id": "a", "score": 2.0000001}, {"id": "b", "score": 2.0}, {"id": "c", "score": 1.0}],
            [{"id": "a", "score": 3.0}, {"id": "b", "score": 2.0}, {"id": "c", "score": 1.0}]]
    got = [want[0],
           [{"id": "b", "score": 2.0000002}, {"id": "a", "score": 2.0000001}, {"id": "c", "score": 1.0}],
           [{"id": "c", "score": 3.5}, {"id": "a", "score": 3.0}, {"id": "b", "score": 2.0}]]
    exact = [{"a": 3.0, "b": 2.0, "c": 1.0}, {"a": 2.0, "b": 2.00000015, "c": 1.0}, {"a": 3.0, "b": 2.0, "c": 1.0}]
    r = mod.compare_rankings(want, got, exact)
    assert r["identical_rankings"] == 1 and r["identical_up_to_ties"] == 2
    assert [d["query"] for d in r["differences"]] == [1, 2]
    d1, d2 = r["differences"]
    assert d1["positions"] == 2 and d1["rank"] == 0 and d1["pylate_order"] == ["a", "b"]
    assert d1["max_pylate_gap"] < 1e-6 and d1["float64_order"] == ["b", "a"]
    assert d2["max_pylate_gap"] == 2.0 and d2["positions"] == 3
    assert r["float64_agrees_with_vkern"] == 1 and r["float64_agrees_with_pylate"] == 1
    assert abs(r["max_abs_score_diff"] - 2.5) < 1e-12
    with pytest.raises(ValueError, match="query 0"):
        mod.compare_rankings([want[0]], [want[0][:2] + [{"id": "z", "score": 0.0}]])
