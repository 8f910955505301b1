"""One mid-sized call of every CPU op, for the concurrency, fork and lifecycle tests.

Each entry builds its inputs once (seeded) and returns a zero-argument callable that
runs the op on the cpu backend and returns its results as a list of NumPy arrays."""
import numpy as np

import vkern
from vkern import taskvec


def _arrays(x):
    if isinstance(x, (tuple, list)):
        return [np.asarray(a).copy() for a in x]
    return [np.asarray(x).copy()]


def make_ops(scale=1):
    """name -> callable. scale multiplies the work per call (1 = a few ms)."""
    rng = np.random.default_rng(7)
    ops = {}

    q = rng.standard_normal((8, 32, 64)).astype(np.float32)
    n_docs = 64 * scale
    lens = rng.integers(20, 120, n_docs)
    offs = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    d = rng.standard_normal((int(offs[-1]), 64)).astype(np.float32)
    ops["maxsim"] = lambda: _arrays(vkern.maxsim(q, d, doc_offsets=offs, backend="cpu"))
    ops["maxsim_topk"] = lambda: _arrays(vkern.maxsim(q, d, doc_offsets=offs, topk=5, backend="cpu"))
    from vkern.ops import maxsim_grad
    ops["maxsim_argmax"] = lambda: _arrays(maxsim_grad.maxsim_argmax_impl(q, d, doc_offsets=offs, backend="cpu"))
    g_scores = rng.standard_normal((8, n_docs)).astype(np.float32)
    arg = maxsim_grad.maxsim_argmax_impl(q, d, doc_offsets=offs, backend="cpu")[1]
    ops["maxsim_backward"] = lambda: _arrays(maxsim_grad.maxsim_backward_impl(g_scores, arg, q, d, doc_offsets=offs,
                                                                              backend="cpu"))
    qd = vkern.quantize_docs(d, doc_offsets=offs)
    ops["maxsim_int8"] = lambda: _arrays(vkern.maxsim(q, qd, topk=5, backend="cpu"))
    ops["maxsim_doc_ids"] = lambda: _arrays(vkern.maxsim(q, d, doc_offsets=offs, doc_ids=np.arange(0, n_docs, 3),
                                                         backend="cpu"))
    dn = d / np.linalg.norm(d, axis=1, keepdims=True)
    ops["pool_tokens_ward"] = lambda: _arrays(vkern.pool_tokens(dn, doc_offsets=offs, backend="cpu"))
    ops["pool_tokens_kmeans"] = lambda: _arrays(vkern.pool_tokens(dn, doc_offsets=offs, method="kmeans",
                                                                  backend="cpu"))
    seg = np.repeat(np.arange(len(d) // 3 + 1), 3)[:len(d)]
    ops["segment_mean"] = lambda: _arrays(vkern.segment_mean(d, seg, backend="cpu"))
    mcfg = vkern.muvera.MuveraConfig(dim=64, num_repetitions=4, num_simhash_projections=3, projection_dim=8)
    ops["muvera_encode"] = lambda: _arrays(vkern.muvera.encode_documents(d, mcfg, doc_offsets=offs, backend="cpu"))

    T = 512 * scale
    lq = rng.standard_normal((2, 8, 64)).astype(np.float32)
    lk = rng.standard_normal((2, 4, T, 64)).astype(np.float32)
    lv = rng.standard_normal((2, 4, T, 64)).astype(np.float32)
    ops["loki_attention"] = lambda: _arrays(vkern.loki_attention(lq, lk, lv, rank=16, topk=T // 8, backend="cpu"))
    ops["decode_attention"] = lambda: _arrays(vkern.decode_attention(lq, lk, lv, backend="cpu"))
    basis = vkern.loki.pca_basis(lk[0].transpose(1, 0, 2), backend="reference")
    ops["rotate"] = lambda: _arrays(vkern.loki.rotate(lk[0].transpose(1, 0, 2), basis, backend="cpu"))

    vq = rng.standard_normal((1, 4, 64 * scale, 64)).astype(np.float32)
    vk = rng.standard_normal((1, 4, 256 * scale, 64)).astype(np.float32)
    vv = rng.standard_normal((1, 4, 256 * scale, 64)).astype(np.float32)
    ops["attention_colsum"] = lambda: _arrays(vkern.vatp.attention_colsum(vq, vk, causal=False, backend="cpu"))
    ops["value_l1"] = lambda: _arrays(vkern.vatp.value_l1(vv, backend="cpu"))
    s = rng.standard_normal((1, 4, 256 * scale)).astype(np.float32)
    ops["vatp_prune"] = lambda: _arrays(vkern.vatp_prune(vk, vv, s, budget=64, num_sink=2, num_recent=8,
                                                         backend="cpu"))

    base = rng.standard_normal((64 * scale, 512)).astype(np.float32)
    qtvs = [taskvec.quantize(rng.standard_normal(base.shape).astype(np.float32) * 0.01, bits=4) for _ in range(3)]
    ops["apply_task_vectors"] = lambda: _arrays(vkern.apply_task_vectors(base, qtvs, [0.3, 0.3, 0.3], backend="cpu"))
    ops["ties"] = lambda: _arrays(vkern.apply_task_vectors(base, qtvs, [0.3, 0.3, 0.3], method="ties", density=0.2,
                                                           backend="cpu"))
    x = rng.standard_normal((16, 512)).astype(np.float32)
    ops["delta_linear"] = lambda: _arrays(vkern.delta_linear(x, base, qtvs, [0.3, 0.3, 0.3], backend="cpu"))
    ops["dequantize"] = lambda: _arrays(vkern.taskvec.dequantize(qtvs[0], backend="cpu"))
    return ops
