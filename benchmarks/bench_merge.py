"""`vkern merge` against mergekit (its run_merge, what `mergekit-yaml` runs) and a plain torch
loop, on a locally built Llama-architecture checkpoint with 3 fine-tunes, in one run.

    python benchmarks/bench_merge.py                       # ~0.25B parameters, bfloat16, ties + task_arithmetic
    python benchmarks/bench_merge.py --preset 0.5b         # ~0.5B (needs ~8 GB free RAM for the torch loop)
    python benchmarks/bench_merge.py --methods ties --threads 2 --workdir /tmp/vkbench

The base has random weights under Llama tensor names plus a config.json (mergekit reads
the architecture from it); each fine-tune is base + 0.01-scale Gaussian noise on every
tensor. Recipes use `dtype: float32` (mergekit computes in float32, as vkern always does)
and `out_dtype: bfloat16`, so the outputs are comparable: the script checks that vkern's
tensors equal mergekit's within one bfloat16 rounding and says how many differ.

Each contender runs in its own process (so its peak RSS, VmHWM, is its own) after
the input files were read once (warm page cache for all). The torch loop is what one writes
by hand: `safetensors.torch.load_file` of all four models, mergekit's formulas per tensor
with torch ops, `save_file`.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

PRESETS = {  # hidden, intermediate, layers, heads, kv heads, vocab
    "tiny": (256, 704, 4, 8, 4, 8000),
    "0.25b": (1024, 2816, 16, 16, 4, 32000),
    "0.5b": (1536, 4096, 18, 16, 4, 32000),
}


def llama_shapes(hidden, inter, layers, heads, kv, vocab):
    hd = hidden // heads
    s = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
         "lm_head.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        s.update({p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (kv * hd, hidden),
                  p + "self_attn.v_proj.weight": (kv * hd, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
                  p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
                  p + "mlp.down_proj.weight": (hidden, inter), p + "input_layernorm.weight": (hidden,),
                  p + "post_attention_layernorm.weight": (hidden,)})
    return s


def build(workdir, preset, n_ft=3):
    import torch
    from safetensors.torch import save_file

    hidden, inter, layers, heads, kv, vocab = PRESETS[preset]
    shapes = llama_shapes(hidden, inter, layers, heads, kv, vocab)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
              "num_key_value_heads": kv, "vocab_size": vocab, "max_position_embeddings": 2048,
              "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
    g = torch.Generator().manual_seed(0)
    names = ["base"] + [f"ft{i}" for i in range(n_ft)]
    if all(os.path.exists(os.path.join(workdir, n, "model.safetensors")) for n in names):
        return sum(int(torch.tensor(s).prod()) for s in shapes.values())
    base = {k: (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) for k, s in shapes.items()}
    for name in names:
        d = os.path.join(workdir, name)
        os.makedirs(d, exist_ok=True)
        tensors = base if name == "base" else {
            k: (v.float() + 0.01 * torch.randn(v.shape, generator=g)).to(torch.bfloat16) for k, v in base.items()}
        save_file(tensors, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(config, f)
        del tensors
    return sum(int(v.numel()) for v in base.values())


def recipe(workdir, method):
    models = [{"model": os.path.join(workdir, f"ft{i}"), "parameters": {"weight": w, "density": d}}
              for i, (w, d) in enumerate([(0.5, 0.5), (0.3, 0.4), (0.4, 0.6)])]
    if method == "task_arithmetic":
        for m in models:
            m["parameters"].pop("density")
    return {"merge_method": method, "base_model": os.path.join(workdir, "base"), "models": models,
            "parameters": {"lambda": 0.9}, "dtype": "float32", "out_dtype": "bfloat16"}


# ------------------------------------------------------------------ contenders (child processes)

def run_vkern(rec, out):
    import yaml

    from vkern import merge

    path = out + ".yml"
    with open(path, "w") as f:
        yaml.safe_dump(rec, f)
    merge.run(path, out, progress=False, overwrite=True)


def run_mergekit(rec, out):
    os.environ["HF_HUB_OFFLINE"] = "1"
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    run_merge(MergeConfiguration.model_validate(rec), out,
              MergeOptions(copy_tokenizer=False, quiet=True, lazy_unpickle=False, low_cpu_memory=False))


def run_torch_loop(rec, out):
    import torch
    from safetensors.torch import load_file, save_file

    base = load_file(os.path.join(rec["base_model"], "model.safetensors"))
    fts = [load_file(os.path.join(m["model"], "model.safetensors")) for m in rec["models"]]
    ws = [m["parameters"]["weight"] for m in rec["models"]]
    ds = [m["parameters"].get("density", 1.0) for m in rec["models"]]
    lam = rec["parameters"]["lambda"]
    ties = rec["merge_method"] == "ties"
    merged = {}
    for name, b in base.items():
        b = b.float()
        deltas = []
        for ft, w, d in zip(fts, ws, ds):
            delta = ft[name].float() - b
            if ties and d < 1:
                k = max(1, int(d * delta.numel()))
                thr = delta.abs().flatten().kthvalue(delta.numel() - k + 1).values
                delta = torch.where(delta.abs() >= thr, delta, 0)
            deltas.append(w * delta)
        stack = torch.stack(deltas)
        if ties:
            sign = torch.where(stack.sum(0) >= 0, 1.0, -1.0)
            mask = stack.sign() == sign
            wt = torch.tensor(ws).reshape(-1, *([1] * b.dim()))
            div = (wt * mask).sum(0)
            div[div == 0] = 1
            mixed = (stack * mask).sum(0) / div
        else:
            mixed = stack.sum(0)
        merged[name] = (b + lam * mixed).to(torch.bfloat16)
    os.makedirs(out, exist_ok=True)
    save_file(merged, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})


CONTENDERS = {"vkern merge": run_vkern, "mergekit run_merge": run_mergekit, "torch loop (load all)": run_torch_loop}


def child(args):
    if args.child == "vkern merge":      # vkern's merge needs no torch: do not count its import in the RSS
        import vkern

        vkern.set_num_threads(args.threads)
    else:
        import torch

        torch.set_num_threads(args.threads)
    with open(args.child_recipe) as f:
        rec = json.load(f)
    t = time.perf_counter()
    CONTENDERS[args.child](rec, args.child_out)
    wall = time.perf_counter() - t
    print(json.dumps({"wall_s": wall, "maxrss_bytes": peak_rss()}))


def peak_rss() -> int:
    """This process's peak resident set (VmHWM: reset by exec, unlike getrusage's ru_maxrss, which
    Linux carries over from the parent that forked us)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def compare(out_a, out_b):
    """(max |a - b|, fraction of elements that differ) over every tensor of two outputs (bfloat16)."""
    import torch
    from safetensors import safe_open

    def tensors(d):
        files = [os.path.join(d, f) for f in sorted(os.listdir(d)) if f.endswith(".safetensors")]
        for fpath in files:
            with safe_open(fpath, "pt") as f:
                for k in f.keys():
                    yield k, fpath

    a_map, b_map = dict(tensors(out_a)), dict(tensors(out_b))
    assert set(a_map) == set(b_map), "different tensor names"
    worst, diff, total, ulp_ok = 0.0, 0, 0, True
    for k in a_map:
        with safe_open(a_map[k], "pt") as fa, safe_open(b_map[k], "pt") as fb:
            x, y = fa.get_tensor(k).float(), fb.get_tensor(k).float()
        d = (x - y).abs()
        worst = max(worst, float(d.max()))
        diff += int((d > 0).sum())
        total += d.numel()
        ulp_ok &= bool((d <= y.abs() * 2 ** -8 + 1e-30).all())
    return worst, diff / total, ulp_ok


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=list(PRESETS), default="0.25b")
    ap.add_argument("--methods", default="ties,task_arithmetic")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "vkern_bench_merge"))
    ap.add_argument("--skip", default="", help="comma-separated contenders to leave out (e.g. 'torch loop (load all)')")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--child-recipe", help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    work = os.path.join(args.workdir, args.preset)
    os.makedirs(work, exist_ok=True)
    t = time.perf_counter()
    n_params = build(work, args.preset)
    model_bytes = os.path.getsize(os.path.join(work, "base", "model.safetensors"))
    print(f"model: Llama architecture, {n_params / 1e6:.0f}M parameters, bfloat16, {model_bytes / 1e9:.2f} GB per "
          f"checkpoint, base + 3 fine-tunes (built in {time.perf_counter() - t:.0f} s); {args.threads} threads")
    for name in ["base", "ft0", "ft1", "ft2"]:          # warm the page cache for every contender alike
        with open(os.path.join(work, name, "model.safetensors"), "rb") as f:
            while f.read(1 << 24):
                pass
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    for method in args.methods.split(","):
        rec = recipe(work, method)
        rpath = os.path.join(work, f"{method}.json")
        with open(rpath, "w") as f:
            json.dump(rec, f)
        results = {}
        for name in CONTENDERS:
            if name in skip:
                continue
            out = os.path.join(work, f"out_{method}_{name.split()[0]}")
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", name, "--child-recipe", rpath,
                                   "--child-out", out, "--threads", str(args.threads)], capture_output=True, text=True)
            if proc.returncode != 0:
                results[name] = {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
                continue
            results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
            results[name]["out"] = out
        mk = results.get("mergekit run_merge", {})
        tl = results.get("torch loop (load all)", {})
        dens = ", densities 0.5/0.4/0.6)" if method == "ties" else ")"
        print(f"\n{method} (lambda 0.9, weights 0.5/0.3/0.4" + dens)
        print(f"{'contender':<24}{'wall s':>9}{'peak RSS GB':>13}{'input GB/s':>12}{'time vs mergekit':>18}"
              f"{'RSS vs mergekit':>17}{'time vs torch':>15}")
        for name, r in results.items():
            if "error" in r:
                print(f"{name:<24}  error: {r['error']}")
                continue
            row = (f"{name:<24}{r['wall_s']:>9.2f}{r['maxrss_bytes'] / 1e9:>13.2f}"
                   f"{4 * model_bytes / r['wall_s'] / 1e9:>12.2f}")
            row += f"{r['wall_s'] / mk['wall_s']:>17.2f}x" if "wall_s" in mk else f"{'-':>18}"
            row += f"{r['maxrss_bytes'] / mk['maxrss_bytes']:>16.2f}x" if "wall_s" in mk else f"{'-':>17}"
            row += f"{r['wall_s'] / tl['wall_s']:>14.2f}x" if "wall_s" in tl else f"{'-':>15}"
            print(row)
        if "out" in results.get("vkern merge", {}) and "out" in mk:
            worst, frac, ulp = compare(results["vkern merge"]["out"], mk["out"])
            note = "" if ulp or method != "ties" else (
                " (bfloat16 inputs make many |delta| equal at the TIES trim threshold: vkern keeps the lower "
                "indices, mergekit's argsort any)")
            print(f"vkern vs mergekit output: max |diff| {worst:.3g}, {100 * frac:.4f}% of elements differ, "
                  f"all within one bfloat16 rounding: {ulp}" + note)


if __name__ == "__main__":
    main()
