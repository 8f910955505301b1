"""``python -m vkern bench``: every backend of every op beside the NumPy
reference and the installed peers, on built-in synthetic data, measured in
one run, with the machine's own limits (copy bandwidth, BLAS GEMM) measured
in that same run.

Each op contributes workloads (see ``maxsim_workloads``); a workload is a list
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
    fn: Callable[[], object]
    kind: str                   # "vkern", "reference", "peer" or "limit" (only the memory traffic, no work)
    sync: Optional[Callable[[], None]] = None   # for GPU work
    note: str = ""


@dataclass
class Workload:
    op: str
    name: str
    bytes: float                # bytes a kernel must move at least
    flops: float
    contenders: List[Contender] = field(default_factory=list)


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


# ------------------------------------------------------------- MaxSim data

def colbert_like(n_docs: int, n_queries: int, seed: int = 0, D: int = 128, Lq: int = 32):
    """Normalised token vectors: n_docs documents of 64..300 tokens, packed."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(64, 301, n_docs)
    offsets = np.zeros(n_docs + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    docs = rng.standard_normal((int(offsets[-1]), D), dtype=np.float32)
    docs /= np.linalg.norm(docs, axis=1, keepdims=True)
    queries = rng.standard_normal((n_queries, Lq, D), dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=2, keepdims=True)
    return queries, docs, offsets


def numpy_flat_gemm(q: np.ndarray, docs: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """The best plain NumPy formulation: one GEMM over all tokens, then a
    segmented max (documents must be non-empty)."""
    sims = q @ docs.T                                   # [Lq, T]
    return np.maximum.reduceat(sims, offsets[:-1], axis=1).sum(axis=0)


def maxsim_workloads(quick: bool, threads: int) -> List[Workload]:
    n_docs = 300 if quick else 1000
    queries, docs, offsets = colbert_like(n_docs, 16)
    q1 = queries[0]
    T, D = docs.shape
    Lq = q1.shape[0]
    out = []
    docs_list = [docs[offsets[i]:offsets[i + 1]] for i in range(n_docs)]
    torch = None
    try:
        import torch  # noqa: F401
        torch.set_num_threads(threads)
    except Exception:
        torch = None

    for B in (1, 16):
        qb = queries[:B]
        w = Workload("maxsim", f"{B} x {Lq}x{D} query vs {n_docs} docs ({T} tokens, {docs.nbytes / 1e6:.0f} MB)",
                     bytes=docs.nbytes, flops=2.0 * B * Lq * D * T)
        qarg = q1 if B == 1 else qb
        w.contenders.append(Contender("vkern reference", lambda qarg=qarg: vkern.maxsim(
            qarg, docs, doc_offsets=offsets, backend="reference"), "reference", note="NumPy, float64"))
        if B == 1:
            w.contenders.append(Contender("numpy flat GEMM + reduceat", lambda: numpy_flat_gemm(q1, docs, offsets),
                                          "peer"))
        else:
            w.contenders.append(Contender("numpy flat GEMM + reduceat", lambda: [
                numpy_flat_gemm(qb[b], docs, offsets) for b in range(B)], "peer", note="per query"))
        try:
            import maxsim_cpu

            if B == 1:
                w.contenders.append(Contender("maxsim-cpu", lambda: maxsim_cpu.maxsim_scores_variable(q1, docs_list),
                                              "peer", note="maxsim_scores_variable"))
            else:
                w.contenders.append(Contender("maxsim-cpu", lambda: [maxsim_cpu.maxsim_scores_variable(
                    qb[b], docs_list) for b in range(B)], "peer", note="per query"))
        except Exception:
            pass
        if _ext.cpu_reason() is None:
            w.contenders.append(Contender("vkern cpu f32", lambda qarg=qarg: vkern.maxsim(
                qarg, docs, doc_offsets=offsets, backend="cpu"), "vkern"))
            w.contenders.append(Contender("vkern cpu f32 top-10", lambda qarg=qarg: vkern.maxsim(
                qarg, docs, doc_offsets=offsets, topk=10, backend="cpu"), "vkern"))
            if torch is not None:
                tq = torch.from_numpy(qarg)
                tdocs_bf16 = torch.from_numpy(docs).bfloat16()
                toff = torch.from_numpy(offsets)
                w.contenders.append(Contender("vkern cpu bf16 docs", lambda tq=tq: vkern.maxsim(
                    tq, tdocs_bf16, doc_offsets=toff, backend="cpu"), "vkern", note="half the bytes"))
            qdocs = vkern.quantize_docs(docs, doc_offsets=offsets)   # once, like building an index
            w.contenders.append(Contender("vkern cpu int8 docs", lambda qarg=qarg: vkern.maxsim(
                qarg, qdocs, backend="cpu"), "vkern",
                note=f"{vkern.ops.maxsim_int8.kernel_name()}, a quarter of the bytes"))
            if "vnni" in vkern.ops.maxsim_int8.kernel_name():
                def int8_no_vnni(qarg=qarg):
                    _ext.C.maxsim_int8_allow_vnni(False)
                    try:
                        return vkern.maxsim(qarg, qdocs, backend="cpu")
                    finally:
                        _ext.C.maxsim_int8_allow_vnni(True)

                w.contenders.append(Contender("vkern cpu int8 docs, no VNNI", int8_no_vnni, "vkern",
                                              note="vpmaddubsw + vpmaddwd"))
            w.contenders.append(Contender("vkern reference int8 docs", lambda qarg=qarg: vkern.maxsim(
                qarg, qdocs, backend="reference"), "vkern", note="NumPy, exact integer dots"))
            docs16 = docs.astype(np.float16)
            w.contenders.append(Contender("vkern cpu f16 docs", lambda qarg=qarg: vkern.maxsim(
                qarg, docs16, doc_offsets=offsets, backend="cpu"), "vkern", note="half the bytes"))
        if torch is not None and torch.cuda.is_available():
            dev = "cuda"
            tq = torch.from_numpy(qarg).to(dev)
            tdocs = torch.from_numpy(docs).to(dev)
            toff = torch.from_numpy(offsets).to(dev)
            tdocs16 = tdocs.half()
            tq16 = tq.half()
            sync = torch.cuda.synchronize
            for backend in ("cuda", "triton"):
                if vkern.available_backends("maxsim")[backend][0]:
                    w.contenders.append(Contender(f"vkern {backend} f32", lambda b=backend, tq=tq: vkern.maxsim(
                        tq, tdocs, doc_offsets=toff, backend=b), "vkern", sync=sync))
                    w.contenders.append(Contender(f"vkern {backend} f16", lambda b=backend, tq16=tq16: vkern.maxsim(
                        tq16, tdocs16, doc_offsets=toff, backend=b), "vkern", sync=sync))
            lens = toff[1:] - toff[:-1]

            def torch_flat(tq=tq):
                sims = torch.einsum("...qd,td->...qt", tq, tdocs)
                m = torch.segment_reduce(sims.reshape(-1, T).T, "max", lengths=lens, axis=0)  # [N, B*Lq]
                return m.reshape(m.shape[0], -1, Lq).sum(-1)

            w.contenders.append(Contender("torch cuda flat GEMM + segment_reduce", torch_flat, "peer", sync=sync))
            # flash-maxsim is not a contender until it is called for real (a row must measure something).
        out.append(w)
    return out


# op -> workloads function, or "module:function" imported on first use (each
# op keeps its bench data in python/vkern/bench_<op>.py).
WORKLOADS = {
    "maxsim": maxsim_workloads,
    "loki": "vkern.bench_loki:loki_workloads",
    "vatp": "vkern.bench_vatp:vatp_workloads",
    "taskvec": "vkern.bench_taskvec:taskvec_workloads",
    "retrieval": "vkern.bench_retrieval:retrieval_workloads",
}


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
            if c.name in errors or sum(res[c.name]) > budget_s:  # slow ones: fewer runs
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
    repeat = args.repeat or (5 if args.quick else 15)
    budget = 3.0 if args.quick else 10.0
    ops = [o.strip() for o in (args.ops or "all").split(",") if o.strip()]
    if ops == ["all"]:
        ops = list(WORKLOADS)
    info = vkern.info()
    _progress(f"[limits] copy bandwidth and BLAS GEMM with {threads} threads ...")
    bw = copy_bandwidth(threads, 128 if args.quick else 256)
    gemm = gemm_flops(threads, 1024 if args.quick else 2048)
    gather = gather_bandwidth(128 if args.quick else 256)
    report = {"machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                          "threads": threads, "copy_bytes_per_s": bw, "gemm_flops": gemm,
                          "gather_read_bytes_per_s": gather,
                          "simd_level": info.get("simd_level"), "cuda_devices": info.get("cuda_devices")},
              "vkern": info.get("vkern"), "results": []}
    for op_name in ops:
        if op_name not in WORKLOADS:
            print(f"unknown op {op_name!r}; known: {', '.join(WORKLOADS)}", file=sys.stderr)
            return 2
        for w in workloads_for(op_name)(args.quick, threads):
            _progress(f"[{op_name}] {w.name}: {', '.join(c.name for c in w.contenders)}")
            timings = time_workload(w, repeat, budget)
            report["results"].append({"op": w.op, "workload": w.name, "bytes": w.bytes, "flops": w.flops,
                                      "timings": timings})
    # The limits again at the end: on a shared machine keep the better reading.
    _progress("[limits] measuring again ...")
    m = report["machine"]
    m["copy_bytes_per_s"] = max(m["copy_bytes_per_s"], copy_bandwidth(threads, 128 if args.quick else 256))
    m["gemm_flops"] = max(m["gemm_flops"], gemm_flops(threads, 1024 if args.quick else 2048))
    if m.get("gather_read_bytes_per_s"):
        m["gather_read_bytes_per_s"] = max(m["gather_read_bytes_per_s"],
                                           gather_bandwidth(128 if args.quick else 256) or 0.0)
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
                f"1 in 8, ascending)" if m.get("gather_read_bytes_per_s") else ""), ""]
    for r in report["results"]:
        t = r["timings"]
        ok = {k: v for k, v in t.items() if "error" not in v}
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
            if "error" in v:
                lines.append(f"| {name:<34} | error: {v['error'][:80]}")
                continue
            s = v["median_s"]
            gbs = r["bytes"] / s / 1e9
            gf = r["flops"] / s / 1e9
            x_ref = f"{ref / s:.1f}" if ref else "-"
            x_peer = f"{peers[best_peer] / s:.2f}" if best_peer else "-"
            lines.append(f"| {name:<34} | {s * 1e3:>9.2f} | {v['min_s'] * 1e3:>8.2f} | {x_ref:>6} | {x_peer:>11} "
                         f"| {gbs:>6.1f} | {100 * gbs * 1e9 / m['copy_bytes_per_s']:>8.0f}% "
                         f"| {gf:>7.1f} | {100 * gf * 1e9 / m['gemm_flops']:>5.0f}% |")
        if best_peer:
            lines.append(f"best peer: {best_peer}")
        base = ok.get("vkern cpu f32")
        for name, v in ok.items():
            if base and "int8" in name:
                lines.append(f"{name} vs vkern cpu f32: {base['median_s'] / v['median_s']:.2f}x")
        lines.append("")
    return "\n".join(lines)


def plot(report: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:
        print(f"--plot needs matplotlib (pip install 'vkern[plot]'): {exc}", file=sys.stderr)
        return
    results = report["results"]
    fig, axes = plt.subplots(len(results), 1, figsize=(9, 2.2 + 0.45 * max(len(r["timings"]) for r in results)
                                                        * len(results)), squeeze=False)
    for ax, r in zip(axes[:, 0], results):
        items = [(k, v["median_s"] * 1e3, v["kind"]) for k, v in r["timings"].items() if "error" not in v]
        items.sort(key=lambda x: x[1])
        colors = {"vkern": "tab:blue", "peer": "tab:orange", "reference": "tab:gray", "limit": "tab:green"}
        ax.barh([i[0] for i in items], [i[1] for i in items], color=[colors[i[2]] for i in items])
        ax.set_xscale("log")
        ax.set_xlim(left=min(i[1] for i in items) / 2)
        ax.set_xlabel("median ms (log)")
        ax.set_title(f"{r['op']}: {r['workload']}", fontsize=9)
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
