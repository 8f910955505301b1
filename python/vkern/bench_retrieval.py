"""Retrieval-memory workloads for ``python -m vkern bench --ops retrieval`` (int8 MaxSim rows
live in the maxsim workloads, beside the f32 kernel).

- pool_tokens Ward, pool factor 2, over random normalised documents of 64-300 tokens x 128:
  vkern cpu beside SciPy's linkage + fcluster on PyLate's dissimilarities (the recipe PyLate
  runs, written with NumPy means), PyLate's own ``pool_embeddings_hierarchical`` when
  ``pylate.models`` imports, and vkern's NumPy reference. k-means pooling beside it.
- Candidate rescoring: 1,000 candidates (~180k tokens) of a float16 ``np.memmap`` store of ~1M
  tokens (200k with --quick), one 32x128 query: ``maxsim(..., doc_ids=)`` reading the candidates
  in place, beside scoring the whole store and beside NumPy gathering the candidates' rows from
  the memmap then a flat GEMM. The file was just written, so it sits in the page cache: this
  measures the in-memory access pattern, not a disk.
- MUVERA document encoding (R=20, k=5, AMS 16 -> 10,240 dims) of the same documents: vkern cpu
  beside vkern's NumPy reference and fastembed's ``Muvera`` post-processor (same R, k, d_proj
  and size; each draws its own random matrices, so the vectors differ).
"""
from __future__ import annotations

from typing import List

import numpy as np

import vkern
from vkern import _ext
from vkern.bench import Contender, Workload, missing
from vkern.bench_maxsim import colbert_like


def scipy_ward_recipe(docs: np.ndarray, offsets: np.ndarray, pool_factor: int = 2, protected: int = 1):
    """PyLate's token pooling written with SciPy, each step in its fastest plain form, so that a
    ratio against it measures the clustering and not Python overhead: per document the float32
    dissimilarities 1 - x x^T (one BLAS call, on one BLAS thread: for matrices this small more
    threads only add hand-off and spin time), condensed by ``squareform`` (C), ``linkage(ward)``,
    ``fcluster(maxclust)``, and the cluster means by one sort + ``np.add.reduceat``. Returns the
    pooled documents (protected rows first, then the means in SciPy's cluster order)."""
    from scipy.cluster import hierarchy
    from scipy.spatial.distance import squareform

    try:
        from threadpoolctl import threadpool_limits

        ctx = threadpool_limits(1)
    except Exception:  # pragma: no cover - threadpoolctl comes with scipy's usual installs
        import contextlib

        ctx = contextlib.nullcontext()
    out = []
    with ctx:
        for n in range(len(offsets) - 1):
            d = docs[offsets[n]:offsets[n + 1]]
            rest = d[protected:]
            m = len(rest)
            k = max(m // pool_factor, 1)
            if k >= m:
                out.append(d)
                continue
            condensed = squareform(1.0 - rest @ rest.T, checks=False)
            lab = hierarchy.fcluster(hierarchy.linkage(condensed, method="ward"), k, criterion="maxclust") - 1
            order = np.argsort(lab, kind="stable")
            counts = np.bincount(lab)
            starts = np.zeros(len(counts), np.int64)
            np.cumsum(counts[:-1], out=starts[1:])
            means = np.add.reduceat(rest[order], starts, axis=0) / counts[:, None].astype(np.float32)
            out.append(np.concatenate([d[:protected], means]))
    return out


def retrieval_workloads(size: str, threads: int) -> List[Workload]:
    quick = size != "full"      # "tiny" and "quick" share the quick sizes
    n_docs = 40 if quick else 200
    _, docs, offsets = colbert_like(n_docs, 1)
    T, D = docs.shape
    out = []
    w = Workload("retrieval", f"pool_tokens ward, pool factor 2, {n_docs} docs ({T} tokens x {D})",
                 bytes=docs.nbytes, flops=float(np.sum(np.diff(offsets).astype(np.float64) ** 2) * D * 2))
    w.contenders.append(Contender("vkern reference ward", lambda: vkern.pool_tokens(
        docs, doc_offsets=offsets, backend="reference"), "reference", note="NumPy, O(m^3) per doc"))
    try:
        import scipy  # noqa: F401

        w.contenders.append(Contender("scipy linkage+fcluster (PyLate's recipe)",
                                      lambda: scipy_ward_recipe(docs, offsets), "peer"))
    except Exception:
        w.contenders.append(missing("scipy linkage+fcluster (PyLate's recipe)", "peer",
                                    "scipy not installed: pip install scipy"))
    try:
        import torch
        from pylate.models.colbert import ColBERT

        tdocs = [torch.from_numpy(docs[offsets[n]:offsets[n + 1]]) for n in range(n_docs)]
        w.contenders.append(Contender("pylate pool_embeddings_hierarchical", lambda: ColBERT.pool_embeddings_hierarchical(
            None, tdocs, pool_factor=2, protected_tokens=1), "peer"))
    except Exception:
        pass
    if _ext.cpu_reason() is None:
        w.contenders.append(Contender("vkern cpu ward", lambda: vkern.pool_tokens(docs, doc_offsets=offsets), "vkern"))
        w.contenders.append(Contender("vkern cpu kmeans", lambda: vkern.pool_tokens(
            docs, doc_offsets=offsets, method="kmeans"), "vkern", note="exactly m/2 clusters"))
    out.append(w)

    out.append(rescoring_workload(quick))

    cfg = vkern.muvera.MuveraConfig(dim=D)
    w = Workload("retrieval", f"muvera encode_documents R=20 k=5 AMS 16 ({cfg.fde_dim} dims), {n_docs} docs",
                 bytes=docs.nbytes, flops=2.0 * T * D * cfg.num_repetitions * cfg.num_simhash_projections)
    w.contenders.append(Contender("vkern reference", lambda: vkern.muvera.encode_documents(
        docs, cfg, doc_offsets=offsets, backend="reference"), "reference", note="NumPy"))
    try:
        from fastembed.postprocess import Muvera

        theirs = Muvera(D, k_sim=cfg.num_simhash_projections, dim_proj=cfg.projection_dim,
                        r_reps=cfg.num_repetitions, random_seed=cfg.seed)
        w.contenders.append(Contender("fastembed Muvera.process_document", lambda: [theirs.process_document(
            docs[offsets[n]:offsets[n + 1]]) for n in range(n_docs)], "peer",
            note="same R, k, d_proj, FDE size; its own random draws (vectors differ, see tests/integrations/test_fastembed.py)"))
    except Exception:
        w.contenders.append(missing("fastembed Muvera.process_document", "peer",
                                    "fastembed not installed: pip install fastembed (no torch; built offline from the dim)"))
    if _ext.cpu_reason() is None:
        w.contenders.append(Contender("vkern cpu", lambda: vkern.muvera.encode_documents(
            docs, cfg, doc_offsets=offsets, backend="cpu"), "vkern"))
    out.append(w)
    return out


def rescoring_workload(quick: bool) -> Workload:
    import tempfile

    rng = np.random.default_rng(1)
    n_docs = 1100 if quick else 5500                     # ~182 tokens each
    lengths = rng.integers(64, 301, n_docs)
    offsets = np.zeros(n_docs + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    T, D = int(offsets[-1]), 128
    tmp = tempfile.NamedTemporaryFile(prefix="vkern_store_", suffix=".f16")
    store = np.memmap(tmp.name, dtype=np.float16, mode="w+", shape=(T, D))
    for lo in range(0, T, 1 << 16):
        hi = min(T, lo + (1 << 16))
        block = rng.standard_normal((hi - lo, D), dtype=np.float32)
        store[lo:hi] = block / np.linalg.norm(block, axis=1, keepdims=True)
    store.flush()
    ro = np.memmap(tmp.name, dtype=np.float16, mode="r", shape=(T, D))
    q = rng.standard_normal((32, D), dtype=np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    cand = np.sort(rng.choice(n_docs, 1000, replace=False))
    cand_tokens = int(np.diff(offsets)[cand].sum())

    def numpy_gather():
        rows = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in cand])
        sub = ro[rows].astype(np.float32)
        sub_off = np.zeros(len(cand) + 1, np.int64)
        np.cumsum(np.diff(offsets)[cand], out=sub_off[1:])
        return np.maximum.reduceat(q @ sub.T, sub_off[:-1], axis=1).sum(0)

    w = Workload("retrieval", f"rescore 1000 candidates ({cand_tokens} tokens) of a {T}-token float16 memmap store",
                 bytes=cand_tokens * D * 2.0, flops=2.0 * 32 * D * cand_tokens)
    w.contenders.append(Contender("vkern reference doc_ids", lambda: vkern.maxsim(
        q, ro, doc_offsets=offsets, doc_ids=cand, backend="reference"), "reference", note="gathers"))
    w.contenders.append(Contender("numpy gather rows + flat GEMM", numpy_gather, "peer"))
    if _ext.cpu_reason() is None:
        w.contenders.append(Contender("vkern cpu doc_ids (in place)", lambda: vkern.maxsim(
            q, ro, doc_offsets=offsets, doc_ids=cand, backend="cpu"), "vkern"))
        w.contenders.append(Contender("vkern cpu whole store", lambda: vkern.maxsim(
            q, ro, doc_offsets=offsets, topk=10, backend="cpu"), "vkern", note=f"{T} tokens: not a subset"))
    w._keep = (tmp, store, ro)   # the file lives as long as the workload
    return w
