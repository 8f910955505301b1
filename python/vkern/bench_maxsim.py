"""MaxSim workloads for ``python -m vkern bench --ops maxsim`` (and benchmarks/bench_maxsim.py).

One 32 x 128 query, then a batch of 16, against ColBERT-shaped documents (64..300 normalised
tokens each, packed): vkern's cpu kernel in f32 (plain and top-10), with bf16 and f16 documents,
beside the NumPy reference, the best plain NumPy formulation (one GEMM + a segmented max) and
maxsim-cpu; with a CUDA device also the cuda and triton kernels against a torch GEMM +
segment_reduce on the GPU.
"""
from __future__ import annotations

from typing import List

import numpy as np

import vkern
from vkern import _ext
from vkern.bench import Contender, Workload


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


def maxsim_workloads(size: str, threads: int) -> List[Workload]:
    from vkern.bench import BF16_HINT, bfloat16_of, missing, optional_torch

    n_docs = {"tiny": 20, "quick": 300, "full": 1000}[size]
    queries, docs, offsets = colbert_like(n_docs, 16)
    q1 = queries[0]
    T, D = docs.shape
    Lq = q1.shape[0]
    out = []
    docs_list = [docs[offsets[i]:offsets[i + 1]] for i in range(n_docs)]
    torch = optional_torch(threads)
    try:
        import maxsim_cpu
    except Exception:
        maxsim_cpu = None

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
        if maxsim_cpu is None:
            w.contenders.append(missing("maxsim-cpu", "peer", "not installed: pip install maxsim-cpu"))
        elif B == 1:
            w.contenders.append(Contender("maxsim-cpu", lambda: maxsim_cpu.maxsim_scores_variable(q1, docs_list),
                                          "peer", note="maxsim_scores_variable"))
        else:
            w.contenders.append(Contender("maxsim-cpu", lambda: [maxsim_cpu.maxsim_scores_variable(
                qb[b], docs_list) for b in range(B)], "peer", note="per query"))
        if _ext.cpu_reason() is None:
            w.contenders.append(Contender("vkern cpu f32", lambda qarg=qarg: vkern.maxsim(
                qarg, docs, doc_offsets=offsets, backend="cpu"), "vkern"))
            w.contenders.append(Contender("vkern cpu f32 top-10", lambda qarg=qarg: vkern.maxsim(
                qarg, docs, doc_offsets=offsets, topk=10, backend="cpu"), "vkern"))
            docs_bf16 = bfloat16_of(docs, torch)
            if docs_bf16 is None:
                w.contenders.append(missing("vkern cpu bf16 docs", "vkern", BF16_HINT))
            else:
                # torch in, torch out; ml_dtypes' bfloat16 is a NumPy dtype, so NumPy inputs stay NumPy.
                tq = torch.from_numpy(qarg) if torch is not None else qarg
                toff = torch.from_numpy(offsets) if torch is not None else offsets
                w.contenders.append(Contender("vkern cpu bf16 docs", lambda tq=tq, toff=toff, d=docs_bf16: vkern.maxsim(
                    tq, d, doc_offsets=toff, backend="cpu"), "vkern",
                    note="half the bytes" + ("" if torch is not None else " (ml_dtypes bfloat16)")))
            docs16 = docs.astype(np.float16)
            w.contenders.append(Contender("vkern cpu f16 docs", lambda qarg=qarg: vkern.maxsim(
                qarg, docs16, doc_offsets=offsets, backend="cpu"), "vkern", note="half the bytes"))
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
    from vkern.bench_maxsim_train import train_workloads   # training step: forward + backward of the scoring
    out.extend(train_workloads(size != "full", threads))
    return out
