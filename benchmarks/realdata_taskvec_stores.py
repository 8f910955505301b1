"""Quantized task-vector stores (`vkern taskvec compress`) for the three real MiniLM fine-tunes
that ``benchmarks/realdata_taskvec.py`` makes, and the accuracy of merging from them
(`vkern merge` with ``store:`` entries), in one run.

    python benchmarks/realdata_taskvec.py --threads 1          # first: fine-tunes + merge parameters (cached)
    python benchmarks/realdata_taskvec_stores.py --threads 1   # then this (uses that cache; no training)

For each store format the table gives the store file's bytes against the three float32 task
vectors (36 matrices each, 10.6 M numbers per task: what one would otherwise keep), and the
test accuracy of each task for the encoder merged from the store, by the recipe
``realdata_taskvec.py`` chose on the val split (task arithmetic ``base + lam * sum tau``; TIES
with its lambda and density), next to the same recipe merged from the float32 fine-tunes.
The accuracy is measured as that script measures it (its Evaluator: each task's fine-tuned
head on the merged encoder).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

STORES = [  # label, compress kwargs, merged accuracy measured (each costs two passes over the test sets; all are)
    ("8-bit, group 128", dict(bits=8, group="128"), True),
    ("4-bit, group 128", dict(bits=4, group="128"), True),
    ("3-bit, group 128", dict(bits=3, group="128"), True),
    ("2-bit, group 128", dict(bits=2, group="128"), True),
    ("2-bit, per row", dict(bits=2, group="row"), True),
    ("RTVQ 2-bit offsets + 3-bit shared base, per row", dict(bits=2, group="row", residual=True, base_bits=3), True),
    ("RTVQ 2-bit offsets + 2-bit shared base, per row", dict(bits=2, group="row", residual=True, base_bits=2), True),
    ("RTVQ 2-bit offsets + 3-bit shared base, group 128", dict(bits=2, group="128", residual=True, base_bits=3),
     True),
    ("budget 3 bits/element (TVQ allocation), group 128", dict(bits=2, group="128", budget=3.0), True),
]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache-dir", default="~/.cache/vkern")
    ap.add_argument("--json", help="also write the results as JSON")
    args = ap.parse_args(argv)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    import numpy as np
    import torch
    import yaml

    torch.set_num_threads(args.threads)
    import vkern
    from vkern import merge as vm
    from vkern import taskvec_store as ts
    from vkern.checkpoint import Checkpoint, save_file

    vkern.set_num_threads(args.threads)
    import realdata_taskvec as R
    import realdata_taskvec_data as D
    import realdata_taskvec_model as M

    R.np = np
    cache = Path(args.cache_dir).expanduser()
    choice_path = cache / "realdata_taskvec_merge.json"
    if not choice_path.exists():
        raise SystemExit(f"{choice_path} is missing: run python benchmarks/realdata_taskvec.py first")
    choice = json.loads(choice_path.read_text())["choice"]
    tasks = D.load_tasks()
    tokenizer, model = M.load_base()
    names = M.matrix_names(model)
    base = M.get_matrices(model, names)
    fts = {t.name: M.load_or_finetune(model, tokenizer, t, names, base, cache, False, print) for t in tasks}
    heads = {t: fts[t]["head"] for t in fts}
    test_eval = R.Evaluator(M, model, tokenizer, tasks, heads, "test")
    numel = sum(w.size for w in base.values())
    float32_bytes = 4 * numel * len(fts)

    work = Path(tempfile.mkdtemp(prefix="vkern_minilm_stores_"))
    save_file(base, str(work / "base.safetensors"))
    for t in fts:
        save_file({n: fts[t]["ft"][n] for n in names}, str(work / f"ft_{t}.safetensors"))
    finetuned = [f"{t}={work / f'ft_{t}.safetensors'}" for t in fts]

    def recipe(entries, method):
        p = {"lambda": choice["sum"]["lam"], "normalize": False} if method == "task_arithmetic" else \
            {"lambda": choice["ties"]["lam"]}
        for e in entries:
            e["parameters"] = {"weight": 1.0} if method == "task_arithmetic" else \
                {"weight": 1.0, "density": choice["ties"]["density"]}
        return {"merge_method": method, "base_model": str(work / "base.safetensors"), "models": entries,
                "parameters": p, "dtype": "float32"}

    def merged_accuracy(entries, method, tag):
        path = work / f"{tag}_{method}.yml"
        path.write_text(yaml.safe_dump(recipe([dict(e) for e in entries], method)))
        out = work / f"out_{tag}_{method}"
        vm.run(str(path), str(out), progress=False, overwrite=True)
        ck = Checkpoint(str(out))
        weights = {n: ck.read_f32(n) for n in names}
        return test_eval(weights)

    rows = []
    t0 = time.perf_counter()
    fp_entries = [{"model": str(work / f"ft_{t}.safetensors")} for t in fts]
    rows.append({"store": "float32 fine-tunes (no store)", "bytes": float32_bytes, "ratio": 1.0,
                 "acc": {m: merged_accuracy(fp_entries, m, "f32") for m in ("task_arithmetic", "ties")}})
    for label, kw, measure in STORES:
        spath = work / (label.split(",")[0].replace(" ", "_").replace("+", "") + f"_{len(rows)}.safetensors")
        summary = ts.compress(str(work / "base.safetensors"), finetuned, str(spath), progress=False, **kw)
        nbytes = os.path.getsize(spath)
        entries = [{"store": str(spath), "task": t} for t in summary["tasks"]]
        acc = {m: merged_accuracy(entries, m, f"s{len(rows)}") for m in ("task_arithmetic", "ties")} if measure \
            else None
        rows.append({"store": label, "bytes": nbytes, "ratio": nbytes / float32_bytes, "acc": acc})
        print(f"  {label}: {nbytes / 1e6:.2f} MB", file=sys.stderr, flush=True)
    base_acc = test_eval(base, heads={t: fts[t]["probe"] for t in fts})

    task_names = list(fts)
    print(f"# python benchmarks/realdata_taskvec_stores.py --threads {args.threads}   "
          f"({time.strftime('%Y-%m-%d')}, {time.perf_counter() - t0:.0f} s)")
    print(f"all-MiniLM-L6-v2, 3 local fine-tunes ({', '.join(task_names)}), 36 matrices, {numel / 1e6:.2f} M numbers "
          f"per task; float32 task vectors {float32_bytes / 1e6:.1f} MB")
    print(f"merge recipes (chosen on val by realdata_taskvec.py): task_arithmetic lambda {choice['sum']['lam']}; "
          f"ties lambda {choice['ties']['lam']}, density {choice['ties']['density']}")
    print(f"base (linear probe) accuracy: " + ", ".join(f"{t} {100 * base_acc[t]:.1f}" for t in task_names))
    hdr = f"{'store':<52}{'MB':>7}{'vs f32':>8}  " + "  ".join(f"TA {t[:5]:>5}" for t in task_names) + "  " + \
        "  ".join(f"TIES {t[:5]:>5}" for t in task_names)
    print(hdr)
    for r in rows:
        if r["acc"] is None:
            print(f"{r['store']:<52}{r['bytes'] / 1e6:>7.2f}{100 * r['ratio']:>7.1f}%  (accuracy not measured)")
            continue
        ta, ti = r["acc"]["task_arithmetic"], r["acc"]["ties"]
        print(f"{r['store']:<52}{r['bytes'] / 1e6:>7.2f}{100 * r['ratio']:>7.1f}%  "
              + "  ".join(f"{100 * ta[t]:>8.1f}" for t in task_names) + "  "
              + "  ".join(f"{100 * ti[t]:>10.1f}" for t in task_names))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "base": base_acc, "choice": choice,
                                               "float32_bytes": float32_bytes}, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
