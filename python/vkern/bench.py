"""``python -m vkern bench``: every backend of every op beside the NumPy
reference and the installed peers, on built-in synthetic data, measured in
one run, with the machine's own limits (copy bandwidth, BLAS GEMM) measured
in that same run.

Each op contributes workloads (``vkern/bench_<op>.py``); a workload is a list
of contenders timed round-robin, so that a drift in machine load hits all of
them alike.
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import numpy as np

import vkern
from vkern import _ext


@dataclass
class Contender:
    name: str
    fn: Optional[Callable[[], object]]
    kind: str                   # "vkern", "reference", "peer" or "limit" (only the memory traffic, no work)
    sync: Optional[Callable[[], None]] = None   # for GPU work
    note: str = ""
    missing: str = ""           # why this row cannot be measured here and how to get it (then fn is None)


# What a row says when the library it needs is not installed (a row, never a silent omission).
TORCH_HINT = "torch not installed: pip install torch==2.13.0"
BF16_HINT = "needs torch or ml_dtypes for bfloat16 arrays: pip install ml_dtypes"


def missing(name: str, kind: str, why: str) -> Contender:
    """A row for a contender that cannot run here: named, with the reason and the install command."""
    return Contender(name, None, kind, missing=why)


def optional_torch(threads: int):
    """torch with `threads` intra-op threads, or None when it is not installed."""
    try:
        import torch
    except Exception:
        return None
    torch.set_num_threads(threads)
    return torch


def bfloat16_of(x: np.ndarray, torch=None):
    """x as a bfloat16 array: a torch tensor when torch is there, else a NumPy array of
    ml_dtypes' bfloat16 (every vkern op takes both); None when neither is installed."""
    if torch is not None:
        return torch.from_numpy(np.ascontiguousarray(x)).bfloat16()
    try:
        import ml_dtypes
    except Exception:
        return None
    return x.astype(ml_dtypes.bfloat16)


@dataclass
class Workload:
    op: str
    name: str
    bytes: float                # bytes a kernel must move at least
    flops: float
    contenders: List[Contender] = field(default_factory=list)
    baseline: str = ""          # a contender every other one is also compared with (a ratio line each)


def _progress(msg: str) -> None:
    sys.stderr.write("\r\033[K" + msg if sys.stderr.isatty() else msg + "\n")
    sys.stderr.flush()


# ----------------------------------------------------------- machine limits

def copy_bandwidth(threads: int, mbytes: int = 256, repeat: int = 5) -> float:
    """Bytes/s (read + write) of a large array copy split over `threads` threads."""
    n = mbytes * 2**20 // 4
    src = np.ones(n, np.float32)
    dst = np.empty_like(src)
    bounds = np.linspace(0, n, threads + 1).astype(np.int64)

    def part(i):
        np.copyto(dst[bounds[i]:bounds[i + 1]], src[bounds[i]:bounds[i + 1]])

    best = float("inf")
    for _ in range(repeat):
        ts = [threading.Thread(target=part, args=(i,)) for i in range(threads)]
        t0 = time.perf_counter()
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        best = min(best, time.perf_counter() - t0)
    return 2 * src.nbytes / best


def gather_bandwidth(mbytes: int = 256, row_bytes: int = 512, keep_one_in: int = 8, repeat: int = 5,
                     seed: int = 0) -> Optional[float]:
    """Bytes/s read from rows gathered in ascending order, 1 in `keep_one_in` at random, with
    vkern's threads and software prefetch: the access pattern of Loki's exact pass (kept K/V
    rows of 512 B = 128 float32) and of cache compaction. No write, no arithmetic: a floor for
    kernels that gather. None without the compiled extension."""
    if not hasattr(_ext.C, "read_rows"):
        return None
    rows = mbytes * 2**20 // row_bytes
    buf = np.ones(rows * row_bytes // 8, np.uint64)
    rng = np.random.default_rng(seed)
    idx = np.flatnonzero(rng.random(rows) < 1.0 / keep_one_in).astype(np.int32)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        _ext.C.read_rows(buf.ctypes.data, row_bytes, idx.ctypes.data, len(idx), 8)
        best = min(best, time.perf_counter() - t0)
    return len(idx) * row_bytes / best


def gemm_flops(threads: int, n: int = 2048, repeat: int = 4) -> float:
    """float32 GEMM throughput of the installed BLAS with `threads` threads."""
    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    try:
        from threadpoolctl import threadpool_limits
    except Exception:  # pragma: no cover
        threadpool_limits = None
    ctx = threadpool_limits(threads) if threadpool_limits else contextlib.nullcontext()
    with ctx:
        a @ a
        best = float("inf")
        for _ in range(repeat):
            t0 = time.perf_counter()
            a @ a
            best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


# op -> "module:function" imported on first use (each op keeps its bench data and
# contenders in python/vkern/bench_<op>.py; this module is the harness).
WORKLOADS = {
    "maxsim": "vkern.bench_maxsim:maxsim_workloads",
    "loki": "vkern.bench_loki:loki_workloads",
    "vatp": "vkern.bench_vatp:vatp_workloads",
    "taskvec": "vkern.bench_taskvec:taskvec_workloads",
    "retrieval": "vkern.bench_retrieval:retrieval_workloads",
    "generate": "vkern.bench_generate:generate_workloads",
}


# Ops only run when named in --ops (not in "all"): generate loads a real model into transformers.
OPT_IN = ("generate",)


def workloads_for(op_name: str) -> Callable[[bool, int], List[Workload]]:
    fn = WORKLOADS[op_name]
    if isinstance(fn, str):
        import importlib

        module, name = fn.split(":")
        fn = getattr(importlib.import_module(module), name)
    return fn


# ------------------------------------------------------------------ timing

def time_workload(w: Workload, repeat: int, budget_s: float) -> Dict[str, dict]:
    """Round-robin timing; slow contenders (> budget/repeat) get fewer runs."""
    res = {c.name: [] for c in w.contenders}
    errors = {}
    for c in w.contenders:  # warm-up (and correctness of the call itself)
        if c.missing:
            continue
        try:
            t0 = time.perf_counter()
            c.fn()
            if c.sync:
                c.sync()
            res[c.name].append(time.perf_counter() - t0)
        except Exception as exc:
            errors[c.name] = f"{type(exc).__name__}: {exc}"
    for r in range(repeat):
        for c in w.contenders:
            if c.missing or c.name in errors or sum(res[c.name]) > budget_s:  # slow ones: fewer runs
                continue
            # BLAS and OpenMP pools spin for a while after a call; let them go
            # idle so that they do not steal the cores from the next contender.
            time.sleep(0.03)
            t0 = time.perf_counter()
            c.fn()
            if c.sync:
                c.sync()
            res[c.name].append(time.perf_counter() - t0)
    out = {}
    for c in w.contenders:
        if c.missing:
            out[c.name] = {"missing": c.missing, "kind": c.kind}
            continue
        if c.name in errors:
            out[c.name] = {"error": errors[c.name], "kind": c.kind}
            continue
        ts = sorted(res[c.name][1:] or res[c.name])  # drop the warm-up when we can
        out[c.name] = {"kind": c.kind, "min_s": ts[0], "median_s": ts[len(ts) // 2], "runs": len(ts),
                       "note": c.note}
    return out


def run(args) -> int:
    threads = max(1, args.threads)
    vkern.set_num_threads(threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    size = "tiny" if getattr(args, "tiny", False) else "quick" if args.quick else "full"
    repeat = args.repeat or {"tiny": 2, "quick": 5, "full": 15}[size]
    budget = {"tiny": 0.5, "quick": 3.0, "full": 10.0}[size]
    limit_mb = {"tiny": 16, "quick": 128, "full": 256}[size]
    gemm_n = {"tiny": 256, "quick": 1024, "full": 2048}[size]
    ops = [o.strip() for o in (args.ops or "all").split(",") if o.strip()]
    if ops == ["all"]:
        ops = [o for o in WORKLOADS if o not in OPT_IN]
    if "generate" in ops and "torch" not in sys.modules:
        # Before torch starts OpenMP: its spinning workers and vkern's threads fought over the cores
        # between the ops of a decode step (see vkern/bench_generate.py).
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    info = vkern.info()
    _progress(f"[limits] copy bandwidth and BLAS GEMM with {threads} threads ...")
    bw = copy_bandwidth(threads, limit_mb)
    gemm = gemm_flops(threads, gemm_n)
    gather = gather_bandwidth(limit_mb)
    report = {"machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                          "threads": threads, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""), "copy_bytes_per_s": bw, "gemm_flops": gemm,
                          "gather_read_bytes_per_s": gather,
                          "simd_level": info.get("simd_level"), "cuda_devices": info.get("cuda_devices")},
              "vkern": info.get("vkern"), "size": size, "results": []}
    for op_name in ops:
        if op_name not in WORKLOADS:
            print(f"unknown op {op_name!r}; known: {', '.join(WORKLOADS)}", file=sys.stderr)
            return 2
        for w in workloads_for(op_name)(size, threads):
            _progress(f"[{op_name}] {w.name}: {', '.join(c.name for c in w.contenders)}")
            timings = time_workload(w, repeat, budget)
            report["results"].append({"op": w.op, "workload": w.name, "bytes": w.bytes, "flops": w.flops,
                                      "timings": timings, **({"baseline": w.baseline} if w.baseline else {})})
    # The limits again at the end: on a shared machine keep the better reading.
    _progress("[limits] measuring again ...")
    m = report["machine"]
    m["copy_bytes_per_s"] = max(m["copy_bytes_per_s"], copy_bandwidth(threads, limit_mb))
    m["gemm_flops"] = max(m["gemm_flops"], gemm_flops(threads, gemm_n))
    if m.get("gather_read_bytes_per_s"):
        m["gather_read_bytes_per_s"] = max(m["gather_read_bytes_per_s"], gather_bandwidth(limit_mb) or 0.0)
    _progress("done")
    text = render(report)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    if args.plot:
        plot(report, args.plot)
    return 0


def render(report: dict) -> str:
    m = report["machine"]
    lines = [f"vkern {report['vkern']} bench: {m['processor']}, {m['threads']} threads, SIMD {m['simd_level']}; "
             f"limits measured in this run (best of start and end): copy {m['copy_bytes_per_s'] / 1e9:.1f} GB/s, "
             f"BLAS sgemm {m['gemm_flops'] / 1e9:.0f} GFLOP/s"
             + (f", gathered-row reads {m['gather_read_bytes_per_s'] / 1e9:.1f} GB/s "
                f"({100 * m['gather_read_bytes_per_s'] / m['copy_bytes_per_s']:.0f}% of copy: random 512 B rows, "
                f"1 in 8, ascending)" if m.get("gather_read_bytes_per_s") else "")
             + (f"; OMP_WAIT_POLICY={m['omp_wait_policy']}" if m.get("omp_wait_policy") else ""), ""]
    for r in report["results"]:
        t = r["timings"]
        ok = {k: v for k, v in t.items() if "median_s" in v}
        ref = next((v["median_s"] for v in ok.values() if v["kind"] == "reference"), None)
        peers = {k: v["median_s"] for k, v in ok.items() if v["kind"] == "peer"}
        best_peer = min(peers, key=peers.get) if peers else None
        # Which limit binds here: the workload's flops per byte against this machine's balance.
        balance = m["gemm_flops"] / m["copy_bytes_per_s"]
        intensity = r["flops"] / r["bytes"]
        bound = "compute" if intensity > balance else "memory"
        lines.append(f"## {r['op']}: {r['workload']}  ({intensity:.0f} flop/byte vs machine balance "
                     f"{balance:.0f}: {bound}-bound)")
        lines.append(f"| {'contender':<34} | {'median ms':>9} | {'min ms':>8} | {'x ref':>6} | {'x best peer':>11} "
                     f"| {'GB/s':>6} | {'% copy BW':>9} | {'GFLOP/s':>7} | {'% GEMM':>6} |")
        lines.append("|" + "|".join("-" * n for n in (36, 11, 10, 8, 13, 8, 11, 9, 8)) + "|")
        for name, v in t.items():
            if "missing" in v:
                lines.append(f"| {name:<34} | not measured: {v['missing']}")
                continue
            if "error" in v:
                lines.append(f"| {name:<34} | error: {v['error'][:80]}")
                continue
            s = v["median_s"]
            gbs = r["bytes"] / s / 1e9
            gf = r["flops"] / s / 1e9
            x_ref = f"{ref / s:.1f}" if ref else "no ref"
            x_peer = f"{peers[best_peer] / s:.2f}" if best_peer else "no peer"
            lines.append(f"| {name:<34} | {s * 1e3:>9.2f} | {v['min_s'] * 1e3:>8.2f} | {x_ref:>6} | {x_peer:>11} "
                         f"| {gbs:>6.1f} | {100 * gbs * 1e9 / m['copy_bytes_per_s']:>8.0f}% "
                         f"| {gf:>7.1f} | {100 * gf * 1e9 / m['gemm_flops']:>5.0f}% |")
        if ref is None:
            lines.append("x ref: the NumPy reference is not timed at this size (float64: minutes per call)")
        if best_peer:
            lines.append(f"best peer: {best_peer}")
        else:
            absent = [f"{k} ({v['missing']})" for k, v in t.items() if v["kind"] == "peer" and "missing" in v]
            lines.append("best peer: none measured in this run" + (f"; not installed: {'; '.join(absent)}"
                                                                     if absent else ""))
        base = ok.get("vkern cpu f32")
        for name, v in ok.items():
            if base and "int8" in name:
                lines.append(f"{name} vs vkern cpu f32: {base['median_s'] / v['median_s']:.2f}x")
        named = ok.get(r.get("baseline", ""))
        for name, v in ok.items():
            if named and name != r["baseline"]:
                lines.append(f"{name} vs {r['baseline']}: {named['median_s'] / v['median_s']:.2f}x")
        lines.append("")
    return "\n".join(lines)


KIND_COLOURS = {"vkern": "#1f77b4", "peer": "#ff7f0e", "reference": "#7f7f7f", "limit": "#2ca02c"}
KIND_LABELS = {"vkern": "vkern", "peer": "peer library / plain formulation", "reference": "vkern NumPy reference",
               "limit": "memory traffic alone (no math)"}


def _panel_data(r: dict, m: dict):
    """Rows of one workload's panel: (name, kind, speed-up or None, label), and the baseline's name.
    The speed-up is against the best measured peer (else the reference); the label adds the share
    of the machine limit that binds this workload (copy bandwidth or BLAS GEMM)."""
    t = r["timings"]
    ok = {k: v for k, v in t.items() if "median_s" in v}
    peers = {k: v["median_s"] for k, v in ok.items() if v["kind"] == "peer"}
    ref = {k: v["median_s"] for k, v in ok.items() if v["kind"] == "reference"}
    base_name = min(peers, key=peers.get) if peers else (next(iter(ref)) if ref else None)
    base = (peers or ref).get(base_name) if base_name else None
    compute = r["flops"] / r["bytes"] > m["gemm_flops"] / m["copy_bytes_per_s"]
    rows = []
    for name, v in t.items():
        if "median_s" not in v:
            why = v.get("missing") or ("error: " + v.get("error", "?"))
            rows.append((name, v["kind"], None, why))
            continue
        s = v["median_s"]
        share = (r["flops"] / s / m["gemm_flops"]) if compute else (r["bytes"] / s / m["copy_bytes_per_s"])
        x = base / s if base else None
        label = (f"{x:.2f}x" if x is not None and x < 10 else f"{x:.0f}x" if x is not None else "") + \
            f"  {_ms(s)} ms, {100 * share:.0f}% {'GEMM' if compute else 'copy BW'}"
        rows.append((name, v["kind"], x, label))
    return rows, base_name, ("peer" if peers else "reference")


def _ms(s: float) -> str:
    ms = 1e3 * s
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}"


def plot(report: dict, path: str) -> None:
    """One panel per workload: bars of speed-up against the best peer measured in the run
    (linear axis, 1 = that peer, marked), numbers on every bar (speed-up, median time, % of the
    machine limit that binds), colours by kind with a legend, rows that could not run listed
    with the reason."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except Exception as exc:
        print(f"--plot needs matplotlib (pip install 'vkern[plot]'): {exc}", file=sys.stderr)
        return
    import textwrap

    m = report["machine"]
    results = report["results"]
    panels = [(r, *_panel_data(r, m)) for r in results]
    ncols = 2 if len(panels) > 3 else 1
    nrows = -(-len(panels) // ncols)
    heights = []
    for i in range(nrows):
        group = panels[i * ncols:(i + 1) * ncols]
        heights.append(max(len(p[1]) for p in group) * 0.32 + 1.3)
    fig, axes = plt.subplots(nrows, ncols, figsize=(9.5 * ncols, sum(heights) + 1.0), squeeze=False,
                             gridspec_kw={"height_ratios": heights}, layout="constrained")
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for i, (ax, (r, rows, base_name, base_kind)) in enumerate(zip(axes.flat, panels)):
        slots = max(len(p[1]) for p in panels[(i // ncols) * ncols:(i // ncols + 1) * ncols])
        ys = list(range(len(rows)))
        xs = [x if x is not None else 0.0 for _, _, x, _ in rows]
        xmax = max(xs + [1.0])
        ax.barh(ys, xs, color=[KIND_COLOURS[k] for _, k, _, _ in rows], height=0.7)
        ax.set_xlim(0, xmax * 1.45)      # room for the numbers right of the longest bar
        ax.axvline(1.0, color="black", lw=0.8, ls="--")
        for y, (name, kind, x, label) in zip(ys, rows):
            if x is None:
                ax.text(xmax * 0.01, y, textwrap.shorten(label, 70), va="center", fontsize=7, color="#b00000")
            else:
                ax.text(x + xmax * 0.01, y, label, va="center", fontsize=7)
        ax.set_yticks(ys)
        ax.set_yticklabels([textwrap.shorten(n, 38) for n, _, _, _ in rows], fontsize=7.5)
        ax.set_ylim(slots - 0.5, -0.5)   # the same bar thickness in every panel of a row, top to bottom
        ax.tick_params(axis="x", labelsize=7)
        ax.set_xlabel(f"speed-up vs {base_kind} '{textwrap.shorten(base_name or '?', 40)}' (= 1, dashed); "
                      "longer is faster", fontsize=7.5)
        ax.set_title("\n".join(textwrap.wrap(f"{r['op']}: {r['workload']}", 90)), fontsize=8, loc="left")
        ax.spines[["top", "right"]].set_visible(False)
    title = (f"vkern {report.get('vkern')} bench: {m['processor']}, {m['threads']} threads, limits measured in the "
             f"run: copy {m['copy_bytes_per_s'] / 1e9:.1f} GB/s, sgemm {m['gemm_flops'] / 1e9:.0f} GFLOP/s. "
             "Bar label: speed-up, median time, % of the limit that binds the workload")
    handles = [Patch(color=c, label=KIND_LABELS[k]) for k, c in KIND_COLOURS.items()]
    fig.legend(handles=handles, loc="outside upper center", ncol=4, fontsize=8, frameon=False,
               title="\n".join(textwrap.wrap(title, 150)), title_fontsize=9)
    fig.savefig(path, dpi=100)
    plt.close(fig)
