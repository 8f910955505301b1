"""Retrieval-memory workloads for ``python -m vkern bench --ops retrieval`` (int8 MaxSim rows
live in the maxsim workloads, beside the f32 kernel).

- pool_tokens Ward, pool factor 2, over random normalised documents of 64-300 tokens x 128:
  vkern cpu beside SciPy's linkage + fcluster on PyLate's dissimilarities (the recipe PyLate
  runs, written with NumPy means), PyLate's own ``pool_embeddings_hierarchical`` when
  ``pylate.models`` imports, and vkern's NumPy reference. k-means pooling beside it.
- MUVERA document encoding (R=20, k=5, AMS 16 -> 10,240 dims) of the same documents: vkern cpu
  beside vkern's NumPy reference (no fastembed here, so no peer row).
"""
from __future__ import annotations

from typing import List

import numpy as np

import vkern
from vkern import _ext
from vkern.bench import Contender, Workload, colbert_like


def scipy_ward_recipe(docs: np.ndarray, offsets: np.ndarray, pool_factor: int = 2, protected: int = 1):
    from scipy.cluster import hierarchy

    out = []
    for n in range(len(offsets) - 1):
        d = docs[offsets[n]:offsets[n + 1]]
        rest = d[protected:]
        m = len(rest)
        k = max(m // pool_factor, 1)
        if k >= m:
            out.append(d)
            continue
        dist = 1.0 - rest @ rest.T
        lab = hierarchy.fcluster(hierarchy.linkage(dist[np.triu_indices(m, 1)], method="ward"), k,
                                 criterion="maxclust") - 1
        sums = np.zeros((lab.max() + 1, d.shape[1]))
        np.add.at(sums, lab, rest)
        out.append(np.concatenate([d[:protected], sums / np.bincount(lab)[:, None]]))
    return out


def retrieval_workloads(quick: bool, threads: int) -> List[Workload]:
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
        pass
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

    cfg = vkern.muvera.MuveraConfig(dim=D)
    w = Workload("retrieval", f"muvera encode_documents R=20 k=5 AMS 16 ({cfg.fde_dim} dims), {n_docs} docs",
                 bytes=docs.nbytes, flops=2.0 * T * D * cfg.num_repetitions * cfg.num_simhash_projections)
    w.contenders.append(Contender("vkern reference", lambda: vkern.muvera.encode_documents(
        docs, cfg, doc_offsets=offsets, backend="reference"), "reference", note="NumPy"))
    if _ext.cpu_reason() is None:
        w.contenders.append(Contender("vkern cpu", lambda: vkern.muvera.encode_documents(
            docs, cfg, doc_offsets=offsets, backend="cpu"), "vkern"))
    out.append(w)
    return out
