"""int8 documents: vkern.quantize_docs and vkern.maxsim on QuantizedDocs, every CPU kernel
against an independent implementation of the definition (exact integer dots), and the
quantisation error against float32 MaxSim within its analytic bound."""
import numpy as np
import pytest

import vkern
from vkern import _ext
from conftest import HAVE_TORCH
from conftest import needs as shared_needs

if HAVE_TORCH:
    import torch


def needs(name):
    shared_needs(name, "maxsim_int8")


def packed(rng, lengths, D):
    off = np.zeros(len(lengths) + 1, np.int64)
    off[1:] = np.cumsum(lengths)
    return rng.standard_normal((int(off[-1]), D)).astype(np.float32), off


def quantize(x, levels):
    """Independent per-row symmetric quantiser (the definition in docs/ops/retrieval_memory.md)."""
    x = np.asarray(x, np.float64)
    out_c = np.zeros(x.shape, np.int64)
    out_s = np.zeros(x.shape[:-1])
    for idx in np.ndindex(*x.shape[:-1]):
        s = np.float32(np.float32(np.abs(x[idx]).max()) / np.float32(levels)) if x.shape[-1] else 0.0
        out_s[idx] = s
        if s > 0:
            out_c[idx] = np.clip(np.rint(x[idx] / np.float64(s)), -levels, levels)
    return out_c, out_s


def brute_int8(q, codes, scales, off, qlens=None):
    """score = sum_i qs_i * max_j s_j <qc_i, c_j>, integer dots by Python ints."""
    qc, qs = quantize(q, 63)
    B, Lq, _ = q.shape
    qlens = [Lq] * B if qlens is None else qlens
    out = np.full((B, len(off) - 1), -np.inf)
    c = codes.astype(np.int64)
    for b in range(B):
        for n in range(len(off) - 1):
            lo, hi = off[n], off[n + 1]
            if hi == lo:
                continue
            dots = qc[b, :qlens[b]] @ c[lo:hi].T          # int64, exact
            out[b, n] = np.sum(qs[b, :qlens[b]] * np.max(dots * scales[lo:hi][None, :], axis=1))
    return out


def assert_close_to(got, want):
    got = np.asarray(got)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6)


# ------------------------------------------------------------- quantize_docs

def test_quantize_docs_definition_and_layouts(rng):
    lengths = [3, 0, 5, 1]
    docs, off = packed(rng, lengths, 9)
    docs[2] = 0.0                                                  # a zero row: scale 0, codes 0
    qd = vkern.quantize_docs(docs, doc_offsets=off)
    want_c, want_s = quantize(docs, 127)
    assert qd.codes.dtype == np.int8 and qd.scales.dtype == np.float32 and qd.doc_offsets.dtype == np.int64
    np.testing.assert_array_equal(qd.codes, want_c)
    np.testing.assert_array_equal(qd.scales, want_s.astype(np.float32))
    np.testing.assert_array_equal(qd.doc_offsets, off)
    assert qd.scales[2] == 0 and not qd.codes[2].any()
    assert np.abs(qd.codes).max() == 127
    # each element within half a step of the original
    assert np.all(np.abs(qd.dequantize() - docs) <= qd.scales[:, None] * 0.5 * (1 + 1e-6))
    # padded and list layouts give the same packed result
    Ld = max(lengths)
    padded = rng.standard_normal((4, Ld, 9)).astype(np.float32)    # garbage in the padding
    for n in range(4):
        padded[n, :lengths[n]] = docs[off[n]:off[n + 1]]
    for other in (vkern.quantize_docs(padded, doc_lengths=np.array(lengths)),
                  vkern.quantize_docs([docs[off[n]:off[n + 1]] for n in range(4)])):
        np.testing.assert_array_equal(other.codes, qd.codes)
        np.testing.assert_array_equal(other.scales, qd.scales)
        np.testing.assert_array_equal(other.doc_offsets, qd.doc_offsets)
    assert qd.num_docs == 4 and qd.dim == 9
    assert qd.nbytes == docs.size + 4 * docs.shape[0] + 8 * 5


def test_quantized_store_is_4x_smaller(rng):
    docs, off = packed(rng, [300] * 20, 128)
    qd = vkern.quantize_docs(docs, doc_offsets=off)
    assert qd.codes.nbytes * 4 == docs.nbytes
    assert qd.nbytes < docs.nbytes / 3.8


def test_quantize_docs_torch_in_torch_out(rng):
    if not HAVE_TORCH:
        pytest.skip("needs torch")
    docs, off = packed(rng, [4, 2], 8)
    qd = vkern.quantize_docs(torch.from_numpy(docs).bfloat16(), doc_offsets=torch.from_numpy(off))
    assert isinstance(qd.codes, torch.Tensor) and qd.codes.dtype == torch.int8
    want = vkern.quantize_docs(torch.from_numpy(docs).bfloat16().float().numpy(), doc_offsets=off)
    np.testing.assert_array_equal(qd.codes.numpy(), want.codes)
    q = rng.standard_normal((3, 8)).astype(np.float32)
    got = vkern.maxsim(torch.from_numpy(q), qd)
    assert isinstance(got, torch.Tensor)
    np.testing.assert_allclose(got.numpy(), vkern.maxsim(q, want), rtol=1e-6)


# ------------------------------------------------------------ int8 MaxSim

SHAPES = [  # (B, Lq, D, doc lengths)
    (1, 1, 1, [1]),
    (1, 5, 3, [1, 2, 7]),
    (1, 32, 128, [64, 1, 63, 65, 130, 0, 17]),
    (3, 33, 97, [5, 0, 64, 31, 1, 8, 9]),
    (2, 7, 130, [13, 29, 3]),
]


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("B,Lq,D,lengths", SHAPES)
def test_matches_definition(backend, B, Lq, D, lengths, rng):
    needs(backend)
    docs, off = packed(rng, lengths, D)
    q = rng.standard_normal((B, Lq, D)).astype(np.float32)
    qd = vkern.quantize_docs(docs, doc_offsets=off)
    want = brute_int8(q, qd.codes, qd.scales.astype(np.float64), off)
    assert_close_to(vkern.maxsim(q, qd, backend=backend), want)
    # the raw-array form, and a single query
    got = vkern.maxsim(q[0], qd.codes, doc_offsets=off, doc_scales=qd.scales, backend=backend)
    assert_close_to(got, want[0])
    vals, idx = vkern.maxsim(q, qd, topk=3, backend=backend)
    ref_vals, ref_idx = vkern.maxsim(q, qd, topk=3, backend="reference")
    np.testing.assert_array_equal(idx, ref_idx)


KERNELS = [("generic", True), ("avx2", True), ("avx512", True), ("avx512", False), ("avx512shape", True)]


@pytest.mark.parametrize("level,vnni", KERNELS, ids=[f"{lv}-{'vnni' if v else 'novnni'}" for lv, v in KERNELS])
def test_every_cpu_kernel(level, vnni, rng):
    needs("cpu")
    if level not in _ext.C.simd_supported():
        pytest.skip(f"this CPU cannot run {level}")
    lengths = [1, 2, 3, 4, 5, 6, 7, 8, 9, 15, 16, 17, 63, 64, 65, 100, 0]
    docs, off = packed(rng, lengths, 67)
    docs[5] *= 1e-30                       # tiny scales
    q = rng.standard_normal((2, 35, 67)).astype(np.float32)
    q[0, 3] = 0.0                          # a zero query token: scale 0
    qd = vkern.quantize_docs(docs, doc_offsets=off)
    codes = qd.codes.copy()
    codes[7, :5] = -128                    # int8 extremes the quantiser never writes still cannot saturate
    codes[8, :] = 127
    qlens = np.array([35, 17])
    want = brute_int8(q, codes, qd.scales.astype(np.float64), off, [35, 17])
    try:
        vkern.set_simd_level(level)
        _ext.C.maxsim_int8_allow_vnni(vnni)
        name = vkern.ops.maxsim_int8.kernel_name()
        got = vkern.maxsim(q, codes, doc_offsets=off, doc_scales=qd.scales, query_lengths=qlens, backend="cpu")
    finally:
        vkern.set_simd_level("auto")
        _ext.C.maxsim_int8_allow_vnni(True)
    assert name.startswith("i8_" + level)
    assert vnni or "vnni" not in name       # allow_vnni(False) really selects the AVX-512BW path
    assert_close_to(got, want)


def test_strided_codes_and_threads(rng):
    needs("cpu")
    docs, off = packed(rng, [40, 3, 77, 1, 200], 64)
    qd = vkern.quantize_docs(docs, doc_offsets=off)
    wide = np.zeros((docs.shape[0], 80), np.int8)
    wide[:, 5:69] = qd.codes
    q = rng.standard_normal((4, 20, 64)).astype(np.float32)
    want = vkern.maxsim(q, qd, backend="reference")
    got = vkern.maxsim(q, wide[:, 5:69], doc_offsets=off, doc_scales=qd.scales, backend="cpu")
    assert_close_to(got, want)
    n = vkern.get_num_threads()
    try:
        for t in (1, 3):
            vkern.set_num_threads(t)
            np.testing.assert_array_equal(vkern.maxsim(q, qd, backend="cpu"), got)
    finally:
        vkern.set_num_threads(n)


def test_empty_docs_and_masked_queries(rng):
    needs("cpu")
    docs, off = packed(rng, [0, 4, 0], 16)
    qd = vkern.quantize_docs(docs, doc_offsets=off)
    q = rng.standard_normal((2, 5, 16)).astype(np.float32)
    q[1, 2:] = np.nan                                     # masked tokens are never read
    for backend in ("reference", "cpu"):
        s = vkern.maxsim(q, qd, query_lengths=np.array([5, 2]), backend=backend)
        assert np.isneginf(s[:, [0, 2]]).all() and np.isfinite(s[:, 1]).all()
        s0 = vkern.maxsim(q, qd, query_lengths=np.array([0, 2]), backend=backend)
        assert s0[0, 1] == 0.0
        vals, idx = vkern.maxsim(q, qd, query_lengths=np.array([5, 2]), topk=5, backend=backend)
        assert idx.shape == (2, 3) and (idx[:, 0] == 1).all()


def test_error_vs_float32_within_bound(rng):
    """|int8 - f32| <= sum_i max_j (|q_i - q^_i| |d_j| + |q^_i| |d_j - d^_j|), and small in practice."""
    needs("cpu")
    D = 128
    docs, off = packed(rng, list(rng.integers(20, 120, 60)), D)
    docs /= np.linalg.norm(docs, axis=1, keepdims=True)
    q = rng.standard_normal((3, 32, D)).astype(np.float32)
    q /= np.linalg.norm(q, axis=2, keepdims=True)
    qd = vkern.quantize_docs(docs, doc_offsets=off)
    got = vkern.maxsim(q, qd, backend="cpu")
    f32 = vkern.maxsim(q, docs, doc_offsets=off, backend="cpu")
    qc, qs = quantize(q, 63)
    q_hat = qc * qs[..., None]
    eq = np.linalg.norm(q - q_hat, axis=2)                              # [B, Lq]
    ed = np.linalg.norm(docs - qd.dequantize(), axis=1)                 # [T]
    nd = np.linalg.norm(docs, axis=1)
    nqh = np.linalg.norm(q_hat, axis=2)
    for n in range(len(off) - 1):
        sl = slice(off[n], off[n + 1])
        bound = (eq[:, :, None] * nd[None, None, sl] + nqh[:, :, None] * ed[None, None, sl]).max(axis=2).sum(1)
        assert np.all(np.abs(got[:, n] - f32[:, n]) <= bound * (1 + 1e-5) + 1e-5)
    rel = np.abs(got - f32) / np.abs(f32)
    assert rel.mean() < 5e-3
    assert (np.argsort(-got, axis=1)[:, :1] == np.argsort(-f32, axis=1)[:, :1]).mean() >= 2 / 3


# ----------------------------------------------------------------- errors

def test_bad_inputs_raise_before_any_kernel(rng):
    docs, off = packed(rng, [3, 2], 8)
    qd = vkern.quantize_docs(docs, doc_offsets=off)
    q = rng.standard_normal((4, 8)).astype(np.float32)
    with pytest.raises(ValueError, match="doc_scales: required"):
        vkern.maxsim(q, qd.codes, doc_offsets=off)
    with pytest.raises(ValueError, match=r"doc_scales: expected shape \(5,\)"):
        vkern.maxsim(q, qd.codes, doc_offsets=off, doc_scales=qd.scales[:4])
    with pytest.raises(TypeError, match="doc_scales: expected float32"):
        vkern.maxsim(q, qd.codes, doc_offsets=off, doc_scales=qd.scales.astype(np.float64))
    with pytest.raises(ValueError, match="doc_scales: contains NaN"):
        vkern.maxsim(q, qd.codes, doc_offsets=off, doc_scales=np.full(5, np.nan, np.float32))
    with pytest.raises(ValueError, match="doc_offsets: must start at 0"):
        vkern.maxsim(q, qd.codes, doc_offsets=np.array([0, 3, 6]), doc_scales=qd.scales)
    with pytest.raises(ValueError, match="doc_offsets: required"):
        vkern.maxsim(q, qd.codes, doc_scales=qd.scales)
    with pytest.raises(ValueError, match="doc_offsets/doc_scales: already held"):
        vkern.maxsim(q, qd, doc_offsets=off)
    with pytest.raises(ValueError, match="docs: expected last dim D=7"):
        vkern.maxsim(q[:, :7].copy(), qd)
    with pytest.raises(ValueError, match="docs: int8 docs must be packed"):
        vkern.maxsim(q, qd.codes[None], doc_offsets=off, doc_scales=qd.scales)
    bad_q = q.copy()
    bad_q[1, 1] = np.inf
    with pytest.raises(ValueError, match="queries: contains NaN or inf"):
        vkern.maxsim(bad_q, qd)
    with pytest.raises(TypeError, match="queries: expected float32"):
        vkern.maxsim(q.astype(np.float64), qd)
    with pytest.raises(ValueError, match="topk: expected k >= 1"):
        vkern.maxsim(q, qd, topk=0)
    with pytest.raises(vkern.BackendUnavailable):
        vkern.maxsim(q, qd, backend="triton")
    bad = docs.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="docs: contains NaN or inf"):
        vkern.quantize_docs(bad, doc_offsets=off)
    with pytest.raises(ValueError, match="doc_offsets: required"):
        vkern.quantize_docs(docs)
    with pytest.raises(ValueError, match="doc_offsets: must start at 0"):
        vkern.quantize_docs(docs, doc_offsets=np.array([0, 9]))
    with pytest.raises(TypeError, match="docs: expected float32"):
        vkern.quantize_docs(docs.astype(np.float64), doc_offsets=off)


def test_big_endian_inputs(rng):
    docs, off = packed(rng, [5, 7], 16)
    qd = vkern.quantize_docs(docs, doc_offsets=off)
    q = rng.standard_normal((3, 16)).astype(np.float32)
    want = vkern.maxsim(q, qd)
    be = vkern.maxsim(q.astype(">f4"), qd.codes, doc_offsets=off.astype(">i8"), doc_scales=qd.scales.astype(">f4"))
    np.testing.assert_array_equal(be, want)
    np.testing.assert_array_equal(vkern.quantize_docs(docs.astype(">f4"), doc_offsets=off).codes, qd.codes)
