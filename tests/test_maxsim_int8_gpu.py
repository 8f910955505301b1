"""int8-document MaxSim on the device backends (Triton under TRITON_INTERPRET=1 on CPU tensors here;
CUDA where a GPU is present), against the reference's int8 definition and the cpu backend."""
import numpy as np
import pytest

import vkern
from conftest import HAVE_CUDA, HAVE_TORCH
from conftest import needs as shared_needs

if HAVE_TORCH:
    import torch

BACKENDS = ["triton", "cuda"]


def needs(name):
    shared_needs("cuda" if name == "cuda" else name, "maxsim_int8")


def dev(backend):
    return "cuda" if backend == "cuda" or HAVE_CUDA else "cpu"


def packed(rng, lengths, D):
    off = np.zeros(len(lengths) + 1, np.int64)
    off[1:] = np.cumsum(lengths)
    return rng.standard_normal((int(off[-1]), D)).astype(np.float32), off


def on(backend, qd):
    d = dev(backend)
    return vkern.QuantizedDocs(*(torch.from_numpy(np.ascontiguousarray(a)).to(d)
                                 for a in (qd.codes, qd.scales, qd.doc_offsets)))


def host(x):
    return x.detach().cpu().numpy()


SHAPES = [  # (B, Lq, D, doc lengths): one token, odd D, lengths off every block, empty docs, D > 256
    (1, 1, 1, [1]),
    (1, 5, 3, [1, 2, 7]),
    (1, 32, 128, [64, 1, 63, 65, 130, 0, 17]),
    (3, 33, 97, [5, 0, 64, 31, 1, 8, 9]),
    (2, 7, 300, [13, 29, 3]),
    (9, 3, 32, [2, 70, 0, 5]),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,Lq,D,lengths", SHAPES)
def test_matches_reference_int8_definition(backend, B, Lq, D, lengths, rng):
    needs(backend)
    docs, off = packed(rng, lengths, D)
    q = rng.standard_normal((B, Lq, D)).astype(np.float32)
    qd = vkern.quantize_docs(docs, doc_offsets=off)
    want = vkern.maxsim(q, qd, backend="reference")
    qt = torch.from_numpy(q).to(dev(backend))
    got = vkern.maxsim(qt, on(backend, qd), backend=backend)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float32 and got.device == qt.device
    np.testing.assert_allclose(host(got), want, rtol=2e-6, atol=2e-6)
    assert np.array_equal(np.isneginf(host(got)), np.array([n == 0 for n in lengths])[None].repeat(B, 0))
    # a single query, the raw-array form
    q0 = qt[0]
    t = on(backend, qd)
    got0 = vkern.maxsim(q0, t.codes, doc_offsets=t.doc_offsets, doc_scales=t.scales, backend=backend)
    np.testing.assert_allclose(host(got0), want[0], rtol=2e-6, atol=2e-6)
    # top-k: the reference's order (ties to the lower index)
    vals, idx = vkern.maxsim(qt, t, topk=3, backend=backend)
    rv, ri = vkern.maxsim(q, qd, topk=3, backend="reference")
    np.testing.assert_array_equal(host(idx), ri)
    np.testing.assert_allclose(host(vals), rv, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_query_lengths_strided_codes_and_quantisation_error(backend, rng):
    needs(backend)
    docs, off = packed(rng, [40, 0, 7, 66, 1], 64)
    docs /= np.linalg.norm(docs, axis=1, keepdims=True)
    q = rng.standard_normal((4, 20, 64)).astype(np.float32)
    q[2, 12:] = np.nan                               # past its length: never read
    qlens = np.array([20, 0, 12, 5])
    qd = vkern.quantize_docs(docs, doc_offsets=off)
    want = vkern.maxsim(q, qd, query_lengths=qlens, backend="cpu")
    d = dev(backend)
    wide = torch.zeros((docs.shape[0], 96), dtype=torch.int8)
    wide[:, :64] = torch.from_numpy(qd.codes)
    strided = wide.to(d)[:, :64]                      # rows 96 bytes apart: scored in place
    assert strided.stride() == (96, 1)
    got = vkern.maxsim(torch.from_numpy(q).to(d), strided, doc_offsets=torch.from_numpy(off).to(d),
                       doc_scales=torch.from_numpy(qd.scales).to(d), query_lengths=torch.from_numpy(qlens).to(d),
                       backend=backend)
    np.testing.assert_allclose(host(got), want, rtol=2e-6, atol=2e-6)
    assert np.all(host(got)[1][[0, 2, 3, 4]] == 0)    # a length-0 query scores 0 on non-empty docs
    # within the int8 quantisation error of float32 MaxSim (relative, normalised data)
    q2 = np.where(np.isnan(q), 0, q).astype(np.float32)
    f32 = vkern.maxsim(q2, docs, doc_offsets=off, query_lengths=qlens, backend="cpu")
    g = host(got)
    ok = np.isfinite(f32) & (f32 != 0)
    assert np.max(np.abs(g[ok] - f32[ok]) / np.abs(f32[ok])) < 0.03


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_device_inputs_raise_before_any_kernel(backend, rng, monkeypatch):
    needs(backend)
    from vkern.ops import maxsim_int8

    def boom(call):
        raise AssertionError("a kernel ran")

    monkeypatch.setattr(maxsim_int8._OP.backends[backend], "run", boom)
    docs, off = packed(rng, [3, 4], 8)
    qd = on(backend, vkern.quantize_docs(docs, doc_offsets=off))
    q = torch.from_numpy(rng.standard_normal((2, 8)).astype(np.float32)).to(dev(backend))
    with pytest.raises(ValueError, match="doc_scales"):
        vkern.maxsim(q, qd.codes, doc_offsets=qd.doc_offsets, backend=backend)
    with pytest.raises(TypeError, match="doc_scales"):
        vkern.maxsim(q, qd.codes, doc_offsets=qd.doc_offsets, doc_scales=qd.scales.double(), backend=backend)
    with pytest.raises(ValueError, match="doc_scales"):
        vkern.maxsim(q, qd.codes, doc_offsets=qd.doc_offsets, doc_scales=qd.scales[:3], backend=backend)
    bad = qd.scales.clone()
    bad[1] = float("inf")
    with pytest.raises(ValueError, match="doc_scales"):
        vkern.maxsim(q, qd.codes, doc_offsets=qd.doc_offsets, doc_scales=bad, backend=backend)
    with pytest.raises(ValueError, match="doc_offsets"):
        vkern.maxsim(q, qd.codes, doc_offsets=qd.doc_offsets.flip(0), doc_scales=qd.scales, backend=backend)
    with pytest.raises(ValueError, match="docs"):
        vkern.maxsim(q[:, :4], qd, backend=backend)
    qn = q.clone()
    qn[0, 0] = float("nan")
    with pytest.raises(ValueError, match="queries"):
        vkern.maxsim(qn, qd, backend=backend)
    with pytest.raises(ValueError, match="query_lengths"):
        vkern.maxsim(q[None], qd, query_lengths=torch.tensor([3], device=q.device), backend=backend)
    with pytest.raises(ValueError, match="topk"):
        vkern.maxsim(q, qd, topk=0, backend=backend)
    if q.device.type == "cuda":   # mixed places: a host array with device queries
        with pytest.raises((ValueError, TypeError), match="mixed"):
            vkern.maxsim(q, qd.codes, doc_offsets=off, doc_scales=qd.scales, backend=backend)


def test_device_quantiser_equals_the_reference(rng):
    if not HAVE_TORCH:
        pytest.skip("needs torch")
    from vkern.ops.maxsim_int8 import quantize_rows_torch
    from vkern.reference import maxsim_int8 as ref

    x = rng.standard_normal((50, 33)).astype(np.float32)
    x[3] = 0
    x[7, :5] = 63 * np.float32(0.5) / 63        # values on a rounding half
    for levels in (63, 127):
        c, s = quantize_rows_torch(torch.from_numpy(x), levels)
        rc, rs = ref.quantize_rows(x, levels)
        np.testing.assert_array_equal(c.numpy(), rc)
        np.testing.assert_array_equal(s.numpy(), rs)


def test_launch_configs_cover_every_shape():
    pytest.importorskip("triton")
    from vkern.kernels import maxsim_int8 as k

    for B in (1, 2, 8, 64):
        for Lq in (1, 8, 32, 128, 512):
            for D in (1, 32, 64, 128, 256, 300, 768):
                c = k.launch_config(B, Lq, D)
                rows = c["QUERIES_PER_PROGRAM"] * c["BLOCK_Q"]
                assert rows >= 16 and c["BLOCK_D"] >= 32 and c["BLOCK_T"] >= 16
                assert c["SINGLE_D_BLOCK"] == (D <= 256)
                assert c["BLOCK_D"] >= D or not c["SINGLE_D_BLOCK"]


def test_quantize_docs_on_the_device_equals_the_host(rng):
    if not HAVE_CUDA:
        pytest.skip("needs a CUDA device")
    docs, off = packed(rng, [3, 0, 5], 16)
    want = vkern.quantize_docs(docs, doc_offsets=off)
    got = vkern.quantize_docs(torch.from_numpy(docs).cuda(), doc_offsets=torch.from_numpy(off).cuda())
    assert got.codes.device.type == "cuda" and got.doc_offsets.device.type == "cuda"
    np.testing.assert_array_equal(got.codes.cpu().numpy(), want.codes)
    np.testing.assert_array_equal(got.scales.cpu().numpy(), want.scales)
    np.testing.assert_array_equal(got.doc_offsets.cpu().numpy(), off)
    padded = np.zeros((3, 5, 16), np.float32)
    for n in range(3):
        padded[n, :off[n + 1] - off[n]] = docs[off[n]:off[n + 1]]
    got_p = vkern.quantize_docs(torch.from_numpy(padded).cuda(), doc_lengths=torch.tensor([3, 0, 5]).cuda())
    np.testing.assert_array_equal(got_p.codes.cpu().numpy(), want.codes)
