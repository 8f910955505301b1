"""MUVERA encodings on the device backends (Triton under TRITON_INTERPRET=1 on CPU tensors here; CUDA
where a GPU is present): the cpu backend's vectors for the same config, bit for bit (the device
kernels sum in the cpu's order), through every layout, chunking, and the checks before any kernel."""
import numpy as np
import pytest

import vkern
from conftest import HAVE_CUDA, HAVE_TORCH
from conftest import needs as shared_needs

if HAVE_TORCH:
    import torch

mv = vkern.muvera
BACKENDS = ["triton", "cuda"]


def needs(name):
    shared_needs(name, "muvera_encode")


def dev(backend):
    return "cuda" if backend == "cuda" or HAVE_CUDA else "cpu"


def t(backend, a):
    return torch.from_numpy(np.ascontiguousarray(a)).to(dev(backend))


def packed(rng, lengths, D):
    off = np.zeros(len(lengths) + 1, np.int64)
    off[1:] = np.cumsum(lengths)
    return rng.standard_normal((int(off[-1]), D)).astype(np.float32), off


CONFIGS = [   # identity / AMS, fill or not, final sketch, k = 0, several partition and dim tiles
    dict(dim=8, num_repetitions=3, num_simhash_projections=3, projection_dim=None),
    dict(dim=12, num_repetitions=2, num_simhash_projections=4, projection_dim=5, fill_empty_partitions=False),
    dict(dim=12, num_repetitions=2, num_simhash_projections=2, projection_dim=None, final_projection_dim=7),
    dict(dim=16, num_repetitions=2, num_simhash_projections=6, projection_dim=70, final_projection_dim=50, seed=3),
    dict(dim=6, num_repetitions=1, num_simhash_projections=0, projection_dim=3),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("conf", CONFIGS)
def test_same_vectors_as_cpu(backend, conf, rng):
    needs(backend)
    cfg = mv.MuveraConfig(**conf)
    x, off = packed(rng, [5, 0, 1, 17, 3], cfg.dim)
    want = mv.encode_documents(x, cfg, doc_offsets=off, backend="cpu")
    got = mv.encode_documents(t(backend, x), cfg, doc_offsets=t(backend, off), backend=backend)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float32 and got.device.type == dev(backend)
    assert got.shape == (5, cfg.fde_dim)
    np.testing.assert_array_equal(got.cpu().numpy(), want)
    assert not got[1].any()                                   # an empty document encodes to zeros
    q = rng.standard_normal((3, 9, cfg.dim)).astype(np.float32)
    qlens = np.array([9, 0, 4])
    np.testing.assert_array_equal(
        mv.encode_queries(t(backend, q), cfg, query_lengths=t(backend, qlens), backend=backend).cpu().numpy(),
        mv.encode_queries(q, cfg, query_lengths=qlens, backend="cpu"))
    np.testing.assert_array_equal(mv.encode_queries(t(backend, q[0]), cfg, backend=backend).cpu().numpy(),
                                  mv.encode_queries(q[0], cfg, backend="cpu"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_layouts_dtypes_and_chunking(backend, rng, monkeypatch):
    needs(backend)
    cfg = mv.MuveraConfig(dim=10, num_repetitions=2, num_simhash_projections=3, projection_dim=4,
                          final_projection_dim=40)
    lengths = [4, 0, 9, 1, 6]
    x, off = packed(rng, lengths, 10)
    want = mv.encode_documents(x, cfg, doc_offsets=off, backend="cpu")
    padded = np.full((5, 9, 10), np.nan, np.float32)          # padding is never read
    for n, L in enumerate(lengths):
        padded[n, :L] = x[off[n]:off[n + 1]]
    np.testing.assert_array_equal(mv.encode_documents(t(backend, padded), cfg, doc_lengths=t(backend, lengths),
                                                      backend=backend).cpu().numpy(), want)
    parts = [t(backend, x[off[n]:off[n + 1]]) for n in range(5)]
    np.testing.assert_array_equal(mv.encode_documents(parts, cfg, backend=backend).cpu().numpy(), want)
    # bfloat16 tokens: encoded as their float32 values, as the cpu backend does
    xb = torch.from_numpy(x).bfloat16()
    np.testing.assert_array_equal(
        mv.encode_documents(xb.to(dev(backend)), cfg, doc_offsets=t(backend, off), backend=backend).cpu().numpy(),
        mv.encode_documents(xb.float().numpy(), cfg, doc_offsets=off, backend="cpu"))
    # scratch too small for the call: chunks of whole sets, the same vectors
    monkeypatch.setattr(mv, "GPU_SCRATCH_BYTES", 64)
    np.testing.assert_array_equal(mv.encode_documents(t(backend, x), cfg, doc_offsets=t(backend, off),
                                                      backend=backend).cpu().numpy(), want)


def test_device_packing_matches_the_host_packing(rng):
    """The device-tensor packing (used for CUDA inputs) gives the host packing's tokens and offsets,
    and its errors, on any torch tensors."""
    if not HAVE_TORCH:
        pytest.skip("needs torch")
    from vkern.muvera import _device_packed
    from vkern.ops.pool import packed_docs

    x, off = packed(rng, [3, 0, 4], 5)
    padded = np.zeros((3, 4, 5), np.float32)
    for n in range(3):
        padded[n, :off[n + 1] - off[n]] = x[off[n]:off[n + 1]]
    cases = [((torch.from_numpy(x), torch.from_numpy(off), None), (x, off, None)),
             ((torch.from_numpy(padded), None, torch.tensor([3, 0, 4])), (padded, None, np.array([3, 0, 4]))),
             (([torch.from_numpy(x[:3]), torch.from_numpy(x[3:])], None, None), ([x[:3], x[3:]], None, None))]
    for dev_args, host_args in cases:
        dx, doff = _device_packed(*dev_args, "docs")
        hx, hoff, _ = packed_docs(*host_args, "docs")
        np.testing.assert_array_equal(dx.numpy(), hx)
        np.testing.assert_array_equal(doff, hoff)
    bad = [((torch.from_numpy(x), torch.tensor([0, 2, 1, 7]), None), ValueError, "doc_offsets"),
           ((torch.from_numpy(x), None, None), ValueError, "doc_offsets"),
           ((torch.from_numpy(x), torch.tensor([0, 7.0]), None), TypeError, "doc_offsets"),
           ((torch.from_numpy(x).double(), torch.from_numpy(off), None), TypeError, "docs"),
           ((torch.from_numpy(padded), None, torch.tensor([3, 0, 5])), ValueError, "doc_lengths"),
           ((torch.from_numpy(padded), torch.from_numpy(off), None), ValueError, "doc_offsets"),
           (([torch.from_numpy(x[:3]), torch.from_numpy(x[3:, :4])], None, None), ValueError, r"docs\[1\]"),
           ((torch.from_numpy(x), np.array(off), None), TypeError, "mixed")]
    for args, exc, name in bad:
        with pytest.raises(exc, match=name):
            _device_packed(*args, "docs")


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs_raise_before_any_kernel(backend, rng, monkeypatch):
    needs(backend)

    def boom(call):
        raise AssertionError("a kernel ran")

    monkeypatch.setattr(mv._OP.backends[backend], "run", boom)
    cfg = mv.MuveraConfig(dim=8, num_repetitions=2, num_simhash_projections=2)
    x, off = packed(rng, [3, 4], 8)
    xn = x.copy()
    xn[2, 1] = np.inf
    with pytest.raises(ValueError, match="docs"):
        mv.encode_documents(t(backend, xn), cfg, doc_offsets=t(backend, off), backend=backend)
    with pytest.raises(ValueError, match="config.dim"):
        mv.encode_documents(t(backend, x[:, :6]), cfg, doc_offsets=t(backend, off), backend=backend)
    with pytest.raises(ValueError, match="doc_offsets"):
        mv.encode_documents(t(backend, x), cfg, doc_offsets=t(backend, [0, 3, 6]), backend=backend)
    with pytest.raises(TypeError, match="config"):
        mv.encode_documents(t(backend, x), cfg.to_dict(), doc_offsets=t(backend, off), backend=backend)
    with pytest.raises(ValueError, match="lengths"):
        mv.encode_queries(t(backend, x[None]), cfg, query_lengths=t(backend, [9]), backend=backend)
