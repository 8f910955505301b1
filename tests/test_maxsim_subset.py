"""vkern.maxsim(..., doc_ids=...): a candidate subset scored like the full call restricted to it,
f32 / f16 / int8 docs, one list or one per query, top-k in original ids, an np.memmap store."""
import numpy as np
import pytest

import vkern
from conftest import HAVE_TORCH

if HAVE_TORCH:
    import torch


def store(rng, n_docs, D, dtype=np.float32):
    lengths = rng.integers(0, 40, n_docs)
    off = np.zeros(n_docs + 1, np.int64)
    off[1:] = np.cumsum(lengths)
    return rng.standard_normal((int(off[-1]), D)).astype(dtype), off


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("kind", ["float32", "float16", "int8"])
def test_subset_equals_full_restricted(backend, kind, rng):
    docs, off = store(rng, 60, 24, np.float32)
    q = rng.standard_normal((3, 9, 24)).astype(np.float32)
    qlens = np.array([9, 4, 1])
    if kind == "int8":
        d = vkern.quantize_docs(docs, doc_offsets=off)
        kw = {}
    else:
        d = docs.astype(kind)
        kw = {"doc_offsets": off}
    full = vkern.maxsim(q, d, query_lengths=qlens, backend=backend, **kw)
    ids = np.array([5, 0, 59, 17, 17, 33])
    got = vkern.maxsim(q, d, query_lengths=qlens, doc_ids=ids, backend=backend, **kw)
    np.testing.assert_array_equal(got, full[:, ids])
    per = np.array([[1, 2, 3], [40, 41, 42], [59, 0, 7]])
    got = vkern.maxsim(q, d, query_lengths=qlens, doc_ids=per, backend=backend, **kw)
    np.testing.assert_array_equal(got, np.take_along_axis(full, per, 1))
    vals, idx = vkern.maxsim(q, d, query_lengths=qlens, doc_ids=ids, topk=3, backend=backend, **kw)
    for b in range(3):
        order = sorted(range(len(ids)), key=lambda j: (-full[b, ids[j]], j))[:3]
        np.testing.assert_array_equal(idx[b], ids[order])              # original ids, best first
        np.testing.assert_array_equal(vals[b], full[b, ids[order]])
    one = vkern.maxsim(q[0], d, doc_ids=ids, backend=backend, **kw)
    np.testing.assert_array_equal(one, vkern.maxsim(q[0], d, backend=backend, **kw)[ids])


def test_memmap_store(tmp_path, rng):
    docs, off = store(rng, 2000, 32, np.float16)
    path = tmp_path / "store.f16"
    mm = np.memmap(path, dtype=np.float16, mode="w+", shape=docs.shape)
    mm[:] = docs
    mm.flush()
    ro = np.memmap(path, dtype=np.float16, mode="r", shape=docs.shape)
    q = rng.standard_normal((8, 32)).astype(np.float32)
    cand = rng.choice(2000, 100, replace=False)
    got = vkern.maxsim(q, ro, doc_offsets=off, doc_ids=cand, backend="cpu")
    np.testing.assert_array_equal(got, vkern.maxsim(q, docs, doc_offsets=off, backend="cpu")[cand])


def test_torch_and_bad_ids(rng):
    docs, off = store(rng, 10, 8)
    q = rng.standard_normal((4, 8)).astype(np.float32)
    with pytest.raises(ValueError, match=r"doc_ids: every id must be in \[0, N=10\)"):
        vkern.maxsim(q, docs, doc_offsets=off, doc_ids=np.array([3, 10]))
    with pytest.raises(ValueError, match=r"doc_ids: every id must be in"):
        vkern.maxsim(q, docs, doc_offsets=off, doc_ids=np.array([-1]))
    with pytest.raises(TypeError, match="doc_ids: expected an integer array"):
        vkern.maxsim(q, docs, doc_offsets=off, doc_ids=np.array([1.0]))
    with pytest.raises(ValueError, match=r"doc_ids: expected shape \[K\]"):
        vkern.maxsim(q[None].repeat(2, 0), docs, doc_offsets=off, doc_ids=np.zeros((3, 2), np.int64))
    if HAVE_TORCH:
        got = vkern.maxsim(torch.from_numpy(q), torch.from_numpy(docs), doc_offsets=torch.from_numpy(off),
                           doc_ids=torch.tensor([2, 4]))
        assert isinstance(got, torch.Tensor)
        np.testing.assert_array_equal(got.numpy(), vkern.maxsim(q, docs, doc_offsets=off)[[2, 4]])


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("kind", ["float32", "int8"])
def test_subset_gpu_backends(backend, kind, rng):
    """doc_ids on the GPU backends (they gather the candidates' rows, then run their kernel): the
    same scores as their own full call restricted to the candidates, torch results on the
    queries' device, top-k in original ids."""
    from conftest import host, needs, to_kind

    needs(backend, "maxsim")
    docs, off = store(rng, 50, 24)
    q = to_kind(backend, rng.standard_normal((3, 9, 24)).astype(np.float32))
    t_docs, t_off = to_kind(backend, docs), to_kind(backend, off)
    if kind == "int8":
        d, kw = vkern.quantize_docs(t_docs, doc_offsets=t_off), {}
    else:
        d, kw = t_docs, {"doc_offsets": t_off}
    full = host(vkern.maxsim(q, d, backend=backend, **kw))
    ids = np.array([5, 0, 49, 17, 17, 33])
    for id_arg in (ids, to_kind(backend, ids)):
        got = vkern.maxsim(q, d, doc_ids=id_arg, backend=backend, **kw)
        assert isinstance(got, torch.Tensor) and got.device == q.device
        np.testing.assert_array_equal(host(got), full[:, ids])
    per = np.array([[1, 2, 3], [40, 41, 42], [49, 0, 7]])
    # one query per launch: a different tile shape, so a float32 sum may differ in its last bit
    np.testing.assert_allclose(host(vkern.maxsim(q, d, doc_ids=per, backend=backend, **kw)),
                               np.take_along_axis(full, per, 1), rtol=1e-6, atol=1e-6)
    vals, idx = vkern.maxsim(q, d, doc_ids=ids, topk=2, backend=backend, **kw)
    for b in range(3):
        order = sorted(range(len(ids)), key=lambda j: (-full[b, ids[j]], j))[:2]
        np.testing.assert_array_equal(host(idx)[b], ids[order])
        np.testing.assert_array_equal(host(vals)[b], full[b, ids[order]])
