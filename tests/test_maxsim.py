"""vkern.maxsim: every backend against a float64 brute force and the NumPy
reference, over the edge cases of SPEC §1 and its common rules."""
import os
import subprocess
import sys

import numpy as np
import pytest

import vkern
from vkern.reference import maxsim as ref

from conftest import HAVE_CUDA, HAVE_TORCH, host, to_kind
from conftest import needs as shared_needs

if HAVE_TORCH:
    import torch

BACKENDS = ["reference", "cpu", "triton", "cuda"]


def backend_ok(name):
    ok, reason = vkern.available_backends("maxsim")[name]
    return ok, reason


def needs(name):
    shared_needs(name, "maxsim")


def brute(q, docs_list, qlens=None):
    """Independent float64 MaxSim: q [B, Lq, D], docs_list of [L, D]."""
    q = np.asarray(q, np.float64)
    B, Lq, _ = q.shape
    qlens = [Lq] * B if qlens is None else qlens
    out = np.empty((B, len(docs_list)))
    for b in range(B):
        for n, d in enumerate(docs_list):
            d = np.asarray(d, np.float64)
            if len(d) == 0:
                out[b, n] = -np.inf
            else:
                out[b, n] = np.sum(np.max(q[b, :qlens[b]] @ d.T, axis=1))
    return out


def packed(rng, lengths, D, scale=1.0):
    off = np.zeros(len(lengths) + 1, np.int64)
    off[1:] = np.cumsum(lengths)
    docs = (rng.standard_normal((int(off[-1]), D)) * scale).astype(np.float32)
    return docs, off


def split(docs, off):
    return [docs[off[i]:off[i + 1]] for i in range(len(off) - 1)]


def assert_f32_close(got, want):
    got, want = host(got), np.asarray(want)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


# ------------------------------------------------------------------ shapes

SHAPES = [  # (B, Lq, D, doc lengths)
    (1, 1, 1, [1]),
    (1, 5, 3, [1, 2, 7]),
    (1, 32, 128, [64, 1, 63, 65, 130, 0, 17]),
    (3, 33, 96, [5, 0, 64, 31, 1]),
    (2, 7, 130, [13, 29, 3]),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,Lq,D,lengths", SHAPES)
def test_matches_float64(backend, B, Lq, D, lengths, rng):
    needs(backend)
    docs, off = packed(rng, lengths, D)
    q = rng.standard_normal((B, Lq, D)).astype(np.float32)
    qlens = np.array([Lq, 0, max(Lq - 3, 1)][:B], np.int64)
    want = brute(q, split(docs, off), list(qlens))
    got = vkern.maxsim(to_kind(backend, q), to_kind(backend, docs), doc_offsets=to_kind(backend, off),
                       query_lengths=to_kind(backend, qlens), backend=backend)
    assert tuple(got.shape) == (B, len(lengths))
    assert_f32_close(got, want)
    np.testing.assert_allclose(ref.maxsim_scores(q, qlens, docs, off), want, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_query_and_layouts_agree(backend, rng):
    needs(backend)
    D, lengths = 24, [3, 0, 9, 1, 16]
    docs, off = packed(rng, lengths, D)
    q = rng.standard_normal((6, D)).astype(np.float32)
    want = brute(q[None], split(docs, off))[0]
    k = lambda a: to_kind(backend, a)  # noqa: E731
    got_packed = vkern.maxsim(k(q), k(docs), doc_offsets=k(off), backend=backend)
    assert tuple(got_packed.shape) == (len(lengths),)
    assert_f32_close(got_packed, want)
    # padded, with NaN garbage in the padding that must never be read
    Ld = max(lengths)
    padded = np.full((len(lengths), Ld, D), np.nan, np.float32)
    for i, d in enumerate(split(docs, off)):
        padded[i, :len(d)] = d
    got_padded = vkern.maxsim(k(q), k(padded), doc_lengths=k(np.array(lengths)), backend=backend)
    assert_f32_close(got_padded, want)
    got_list = vkern.maxsim(k(q), [k(d) for d in split(docs, off)], backend=backend)
    assert_f32_close(got_list, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_documents_and_no_documents(backend, rng):
    needs(backend)
    D = 8
    q = rng.standard_normal((2, 3, D)).astype(np.float32)
    docs = np.zeros((0, D), np.float32)
    k = lambda a: to_kind(backend, a)  # noqa: E731
    got = host(vkern.maxsim(k(q), k(docs), doc_offsets=k(np.array([0, 0, 0])), backend=backend))
    assert got.shape == (2, 2) and np.all(got == -np.inf)
    got = host(vkern.maxsim(k(q), k(docs), doc_offsets=k(np.array([0])), backend=backend))
    assert got.shape == (2, 0)
    # a query of length 0 scores 0 on a non-empty document, and -inf on an empty one
    d1 = rng.standard_normal((4, D)).astype(np.float32)
    got = host(vkern.maxsim(k(q), k(d1), doc_offsets=k(np.array([0, 4, 4])), query_lengths=k(np.array([0, 3])),
                            backend=backend))
    assert got[0, 0] == 0.0 and got[0, 1] == -np.inf and got[1, 1] == -np.inf


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_query_tokens_add_nothing(backend, rng):
    needs(backend)
    D = 16
    docs, off = packed(rng, [5, 9], D)
    q = rng.standard_normal((2, 4, D)).astype(np.float32)
    q_garbage = q.copy()
    q_garbage[0, 2:] = np.nan
    q_garbage[1, 1:] = 1e30
    qlens = np.array([2, 1])
    k = lambda a: to_kind(backend, a)  # noqa: E731
    got = vkern.maxsim(k(q_garbage), k(docs), doc_offsets=k(off), query_lengths=k(qlens), backend=backend)
    assert_f32_close(got, brute(q, split(docs, off), [2, 1]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_negative_similarities_are_not_clamped(backend, rng):
    needs(backend)
    D = 32
    q = np.abs(rng.standard_normal((5, D))).astype(np.float32)
    docs = -np.abs(rng.standard_normal((20, D))).astype(np.float32)
    off = np.array([0, 7, 20])
    got = host(vkern.maxsim(to_kind(backend, q), to_kind(backend, docs), doc_offsets=to_kind(backend, off),
                            backend=backend))
    assert np.all(got < 0)
    assert_f32_close(got, brute(q[None], split(docs, off))[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_a_document_poisons_only_that_document(backend, rng):
    needs(backend)
    D = 16
    docs, off = packed(rng, [4, 6, 3], D)
    docs[off[1] + 2, 5] = np.nan
    q = rng.standard_normal((3, D)).astype(np.float32)
    got = host(vkern.maxsim(to_kind(backend, q), to_kind(backend, docs), doc_offsets=to_kind(backend, off),
                            backend=backend))
    want = brute(q[None], split(docs, off))[0]
    assert np.isnan(got[1])
    np.testing.assert_allclose(got[[0, 2]], want[[0, 2]], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_best_first_ties_to_lower_index(backend, rng):
    needs(backend)
    D = 8
    base = rng.standard_normal((3, D)).astype(np.float32)
    other = rng.standard_normal((2, D)).astype(np.float32)
    # documents 1, 3 and 4 are identical: equal scores must come out 1, 3, 4
    docs_list = [other[:1], base, other[1:], base, base, np.zeros((0, D), np.float32)]
    docs = np.concatenate(docs_list)
    off = np.zeros(len(docs_list) + 1, np.int64)
    off[1:] = np.cumsum([len(d) for d in docs_list])
    q = base[:2] * 3.0  # best matches are the copies of base
    k = lambda a: to_kind(backend, a)  # noqa: E731
    vals, idx = vkern.maxsim(k(q), k(docs), doc_offsets=k(off), topk=4, backend=backend)
    scores = brute(q[None], docs_list)[0]
    assert host(idx).tolist()[:3] == [1, 3, 4]
    assert host(idx).dtype == np.int64
    want_vals, want_idx = ref.topk(scores[None].astype(np.float32), 4)
    assert host(idx).tolist() == want_idx[0].tolist()
    assert_f32_close(vals, want_vals[0])
    # k > N returns N, the empty document last
    vals, idx = vkern.maxsim(k(q), k(docs), doc_offsets=k(off), topk=100, backend=backend)
    assert tuple(idx.shape) == (6,) and host(idx)[-1] == 5 and host(vals)[-1] == -np.inf


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_batched_matches_reference(backend, rng):
    needs(backend)
    D = 16
    docs, off = packed(rng, rng.integers(1, 20, 40), D)
    q = rng.standard_normal((3, 5, D)).astype(np.float32)
    qlens = np.array([5, 2, 4])
    k = lambda a: to_kind(backend, a)  # noqa: E731
    vals, idx = vkern.maxsim(k(q), k(docs), doc_offsets=k(off), query_lengths=k(qlens), topk=7, backend=backend)
    want_vals, want_idx = ref.topk(brute(q, split(docs, off), list(qlens)).astype(np.float32), 7)
    assert host(idx).tolist() == want_idx.tolist()
    assert_f32_close(vals, want_vals)


def test_topk_nan_ranks_last(rng):
    scores = np.array([[1.0, np.nan, 3.0, -np.inf, 3.0]], np.float32)
    vals, idx = ref.topk(scores, 5)
    assert idx.tolist() == [[2, 4, 0, 3, 1]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_and_fortran_inputs(backend, rng):
    needs(backend)
    D = 20
    wide = rng.standard_normal((60, 2 * D)).astype(np.float32)
    docs = wide[::2, 3:3 + D]  # row stride 80 elements, column slice
    off = np.array([0, 4, 4, 19, 30])
    qF = np.asfortranarray(rng.standard_normal((6, D)).astype(np.float32))
    want = brute(np.ascontiguousarray(qF)[None], split(np.ascontiguousarray(docs), off))[0]
    if backend in ("reference", "cpu"):
        got = vkern.maxsim(qF, docs, doc_offsets=off, backend=backend)
        assert_f32_close(got, want)
        got = vkern.maxsim(qF, np.asfortranarray(docs), doc_offsets=off, backend=backend)
        assert_f32_close(got, want)
        got = vkern.maxsim(qF[::-1][::-1], docs[::-1][::-1], doc_offsets=off, backend=backend)
        assert_f32_close(got, want)
    tq = to_kind(backend, np.ascontiguousarray(qF.T)).T  # a transposed torch view
    tw = to_kind(backend, wide)
    got = vkern.maxsim(tq, tw[::2, 3:3 + D], doc_offsets=to_kind(backend, off), backend=backend)
    assert_f32_close(got, want)
    padded = np.moveaxis(rng.standard_normal((D, 3, 5)).astype(np.float32), 0, -1)  # non-contiguous [N, Ld, D]
    got = vkern.maxsim(to_kind(backend, qF) if backend not in ("reference", "cpu") else qF,
                       to_kind(backend, padded) if backend not in ("reference", "cpu") else padded,
                       doc_lengths=to_kind(backend, np.array([5, 2, 0])), backend=backend)
    assert_f32_close(got, brute(np.ascontiguousarray(qF)[None], [padded[0], padded[1, :2], padded[2, :0]])[0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_error_within_twice_reference(backend, dtype, rng):
    needs(backend)
    if not HAVE_TORCH:
        pytest.skip("needs torch for bfloat16/float16 tensors")
    D = 64
    docs, off = packed(rng, [1, 40, 77, 3, 64], D)
    docs /= np.linalg.norm(docs, axis=1, keepdims=True)
    q = rng.standard_normal((2, 16, D)).astype(np.float32)
    q /= np.linalg.norm(q, axis=2, keepdims=True)
    exact = brute(q, split(docs, off))
    tq = torch.from_numpy(q).to(getattr(torch, dtype))
    td = torch.from_numpy(docs).to(getattr(torch, dtype))
    # the reference run in that dtype: rounded inputs, float32 accumulation
    q_r, d_r = tq.float().numpy(), td.float().numpy()
    ref_err = np.abs(ref.maxsim_scores(q_r.astype(np.float32), np.array([16, 16]), d_r, off) - exact).max()
    if backend in ("reference", "cpu") and dtype == "float16":
        got = vkern.maxsim(q.astype(np.float16), docs.astype(np.float16), doc_offsets=off, backend=backend)
        assert isinstance(got, np.ndarray)
        assert np.abs(host(got) - exact).max() <= 2 * ref_err + 1e-5
    dev = "cuda" if backend == "cuda" or (backend == "triton" and HAVE_CUDA) else "cpu"
    got = vkern.maxsim(tq.to(dev), td.to(dev), doc_offsets=torch.from_numpy(off).to(dev), backend=backend)
    assert got.dtype == torch.float32 and got.device.type == dev
    assert np.abs(host(got) - exact).max() <= 2 * ref_err + 1e-5


def test_cpu_mixed_precision_queries_fp32_docs_bf16(rng):
    needs("cpu")
    if not HAVE_TORCH:
        pytest.skip("needs torch")
    D = 32
    docs, off = packed(rng, [10, 20, 5], D)
    q = rng.standard_normal((4, D)).astype(np.float32)
    td = torch.from_numpy(docs).bfloat16()
    want = brute(q[None], split(td.float().numpy(), off))[0]
    got = vkern.maxsim(torch.from_numpy(q), td, doc_offsets=torch.from_numpy(off), backend="cpu")
    assert_f32_close(got, want)


# --------------------------------------------------------- CPU specifics

@pytest.mark.parametrize("level", ["generic", "avx2", "avx512", "avx512shape"])
def test_every_simd_level(level, rng):
    needs("cpu")
    from vkern import _ext

    if level not in _ext.C.simd_supported():
        pytest.skip(f"this CPU cannot run {level}")
    lengths = [1, 2, 3, 4, 5, 6, 7, 11, 12, 13, 25, 47, 48, 49, 100, 0]
    docs, off = packed(rng, lengths, 67)
    q = rng.standard_normal((2, 35, 67)).astype(np.float32)
    qlens = np.array([35, 17])
    want = brute(q, split(docs, off), [35, 17])
    try:
        vkern.set_simd_level(level)
        got = vkern.maxsim(q, docs, doc_offsets=off, query_lengths=qlens, backend="cpu")
        got16 = vkern.maxsim(q, docs.astype(np.float16), doc_offsets=off, query_lengths=qlens, backend="cpu")
    finally:
        vkern.set_simd_level("auto")
    assert_f32_close(got, want)
    want16 = brute(q, split(docs.astype(np.float16).astype(np.float32), off), [35, 17])
    assert_f32_close(got16, want16)


def test_thread_count_does_not_change_results(rng):
    needs("cpu")
    docs, off = packed(rng, rng.integers(0, 200, 300), 32)
    q = rng.standard_normal((3, 9, 32)).astype(np.float32)
    before = vkern.get_num_threads()
    try:
        vkern.set_num_threads(1)
        one = vkern.maxsim(q, docs, doc_offsets=off, backend="cpu")
        v1, i1 = vkern.maxsim(q, docs, doc_offsets=off, topk=10, backend="cpu")
        vkern.set_num_threads(3)
        three = vkern.maxsim(q, docs, doc_offsets=off, backend="cpu")
        v3, i3 = vkern.maxsim(q, docs, doc_offsets=off, topk=10, backend="cpu")
    finally:
        vkern.set_num_threads(before)
    assert np.array_equal(one, three) and np.array_equal(i1, i3) and np.array_equal(v1, v3)
    with pytest.raises(ValueError):
        vkern.set_num_threads(0)


def test_inputs_are_not_modified(rng):
    docs, off = packed(rng, [3, 5], 8)
    q = rng.standard_normal((2, 4, 8)).astype(np.float32)
    copies = [a.copy() for a in (q, docs, off)]
    for backend in ("reference", "cpu"):
        if backend_ok(backend)[0]:
            vkern.maxsim(q, docs, doc_offsets=off, topk=1, backend=backend)
    for a, c in zip((q, docs, off), copies):
        assert np.array_equal(a, c)


def test_array_kind_follows_queries(rng):
    docs, off = packed(rng, [3, 5], 8)
    q = rng.standard_normal((4, 8)).astype(np.float32)
    assert isinstance(vkern.maxsim(q, docs, doc_offsets=off), np.ndarray)
    if HAVE_TORCH:
        out = vkern.maxsim(torch.from_numpy(q), torch.from_numpy(docs), doc_offsets=torch.from_numpy(off))
        assert isinstance(out, torch.Tensor) and out.dtype == torch.float32


# ----------------------------------------------------------- bad inputs

def test_bad_inputs_raise_before_any_kernel(rng):
    docs, off = packed(rng, [3, 5], 8)
    q = rng.standard_normal((4, 8)).astype(np.float32)
    cases = [
        (ValueError, "doc_offsets", dict(doc_offsets=np.array([1, 3, 8]))),
        (ValueError, "doc_offsets", dict(doc_offsets=np.array([0, 5, 3, 8]))),
        (ValueError, "doc_offsets", dict(doc_offsets=np.array([0, 3, 7]))),
        (TypeError, "doc_offsets", dict(doc_offsets=np.array([0.0, 3.0, 8.0]))),
        (ValueError, "doc_offsets", dict(doc_offsets=np.zeros((2, 2), np.int64))),
        (ValueError, "doc_offsets", dict()),
        (ValueError, "doc_lengths", dict(doc_offsets=off, doc_lengths=np.array([3, 5]))),
        (ValueError, "query_lengths", dict(doc_offsets=off, query_lengths=np.array([2]))),
        (ValueError, "topk", dict(doc_offsets=off, topk=0)),
        (ValueError, "topk", dict(doc_offsets=off, topk=-3)),
        (TypeError, "topk", dict(doc_offsets=off, topk=2.5)),
        (ValueError, "backend", dict(doc_offsets=off, backend="gpu")),
    ]
    for exc, word, kw in cases:
        with pytest.raises(exc, match=word):
            vkern.maxsim(q, docs, **kw)
    with pytest.raises(ValueError, match="D=8"):
        vkern.maxsim(q, docs[:, :7], doc_offsets=off)
    with pytest.raises(ValueError, match="queries"):
        vkern.maxsim(q[None, None], docs, doc_offsets=off)
    with pytest.raises(ValueError, match="docs"):
        vkern.maxsim(q, docs[None, None], doc_offsets=off)
    with pytest.raises(TypeError, match="queries"):
        vkern.maxsim(q.astype(np.int32), docs, doc_offsets=off)
    with pytest.raises(TypeError, match="docs"):
        vkern.maxsim(q, docs.astype(np.int64), doc_offsets=off)
    with pytest.raises(TypeError, match="queries"):
        vkern.maxsim(q.astype(np.float64), docs, doc_offsets=off)
    with pytest.raises(ValueError, match="query_lengths"):
        vkern.maxsim(q[None], docs, doc_offsets=off, query_lengths=np.array([5]))
    padded = rng.standard_normal((2, 4, 8)).astype(np.float32)
    with pytest.raises(ValueError, match="doc_lengths"):
        vkern.maxsim(q, padded, doc_lengths=np.array([1, 5]))
    with pytest.raises(ValueError, match="doc_offsets"):
        vkern.maxsim(q, padded, doc_offsets=off)
    with pytest.raises(ValueError, match=r"docs\[1\]"):
        vkern.maxsim(q, [docs[:2], docs[:2, :5]])


@pytest.mark.skipif(not HAVE_TORCH, reason="needs torch")
def test_mixed_devices_and_kinds_raise(rng):
    docs, off = packed(rng, [3, 5], 8)
    q = torch.randn(4, 8)
    with pytest.raises(ValueError, match="mixed devices"):
        vkern.maxsim(q, torch.from_numpy(docs).to("meta"), doc_offsets=torch.from_numpy(off))
    with pytest.raises(TypeError, match="mixed array kinds"):
        vkern.maxsim(q, docs, doc_offsets=off)


def test_backend_unavailable_lists_every_reason(rng, monkeypatch):
    docs, off = packed(rng, [3], 8)
    q = rng.standard_normal((2, 8)).astype(np.float32)
    with pytest.raises(vkern.BackendUnavailable) as info:
        vkern.maxsim(q, docs, doc_offsets=off, backend="cuda")
    msg = str(info.value)
    assert "backend 'cuda' cannot run this call" in msg.splitlines()[0]
    for name in BACKENDS:
        assert f"  {name}:" in msg
    monkeypatch.setenv("VKERN_BACKEND", "cuda")
    with pytest.raises(vkern.BackendUnavailable, match="VKERN_BACKEND"):
        vkern.maxsim(q, docs, doc_offsets=off)
    monkeypatch.setenv("VKERN_BACKEND", "reference")
    assert_f32_close(vkern.maxsim(q, docs, doc_offsets=off), brute(q[None], [docs])[0])


def test_reference_fallback_without_extension(tmp_path):
    code = (
        "import sys; sys.modules['vkern._C'] = None\n"
        "import numpy as np, vkern\n"
        "print(vkern.info()['extension'])\n"
        "q = np.eye(2, 4, dtype=np.float32); d = np.eye(3, 4, dtype=np.float32)\n"
        "print(vkern.maxsim(q, d, doc_offsets=np.array([0, 1, 3])).tolist())\n"
        "print(vkern.available_backends('maxsim')['cpu'])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "VKERN_BACKEND"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert "failed to load" in lines[0]
    assert lines[1] == "[1.0, 1.0]"
    assert "False" in lines[2]


# ---------------------------------------------------------------- torch

@pytest.mark.skipif(not HAVE_TORCH, reason="needs torch")
def test_torch_custom_op_opcheck(rng):
    needs("cpu")
    import vkern._torch  # noqa: F401

    docs, off = packed(rng, [3, 0, 5], 8)
    q = torch.randn(2, 4, 8)
    args = (q, torch.from_numpy(docs), torch.from_numpy(off), None, torch.tensor([4, 2]), "auto")
    torch.library.opcheck(torch.ops.vkern.maxsim.default, args)
    torch.library.opcheck(torch.ops.vkern.maxsim_topk.default, args[:5] + (2, "auto"))
    got = torch.ops.vkern.maxsim(*args)
    assert_f32_close(got, brute(q.numpy(), split(docs, off), [4, 2]))


@pytest.mark.skipif(not HAVE_TORCH, reason="needs torch")
def test_torch_compile_uses_custom_op(rng):
    needs("cpu")
    docs, off = packed(rng, [3, 7, 5], 16)
    q = torch.randn(4, 16)
    td, to = torch.from_numpy(docs), torch.from_numpy(off)

    def fn(q, d, o):
        return vkern.maxsim(q * 2.0, d, doc_offsets=o) + 1.0

    compiled = torch.compile(fn, backend="eager", fullgraph=True)
    assert torch.allclose(compiled(q, td, to), fn(q, td, to))


@pytest.mark.skipif(not HAVE_TORCH, reason="needs torch")
def test_triton_gpu_nan_path_under_interpreter(rng, monkeypatch):
    """The interpreter normally takes the isnan-flag path; force the
    NaN-propagating reduce that GPUs compile, so it is checked here too."""
    needs("triton")
    from vkern import _ext

    kernels = _ext.triton_kernels("maxsim")
    monkeypatch.setattr(kernels, "_NAN_BY_FLAG", False)
    D = 16
    docs, off = packed(rng, [3, 5, 2], D)
    docs[off[1] + 4, 0] = np.nan
    q = rng.standard_normal((2, D)).astype(np.float32)
    got = host(vkern.maxsim(to_kind("triton", q), to_kind("triton", docs), doc_offsets=to_kind("triton", off),
                            backend="triton"))
    want = brute(q[None], split(docs, off))[0]
    assert np.isnan(got[1]) and not np.isnan(got[[0, 2]]).any()
    np.testing.assert_allclose(got[[0, 2]], want[[0, 2]], rtol=1e-5, atol=1e-4)


class _DLPackOnly:
    """An array from some other library: only the DLPack protocol."""

    def __init__(self, arr):
        self._arr = arr
        self.shape = arr.shape

    def __dlpack__(self, **kwargs):
        return self._arr.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._arr.__dlpack_device__()


@pytest.mark.skipif(not HAVE_TORCH, reason="DLPack inputs are read through torch")
def test_other_dlpack_producers_are_accepted(rng):
    docs, off = packed(rng, [3, 4], 8)
    q = rng.standard_normal((2, 8)).astype(np.float32)
    got = vkern.maxsim(_DLPackOnly(q), _DLPackOnly(docs), doc_offsets=_DLPackOnly(off))
    assert_f32_close(np.from_dlpack(got), brute(q[None], split(docs, off))[0])


@pytest.mark.parametrize("level", ["generic", "avx2"])
def test_float16_special_values_every_path(level, rng):
    """Subnormal, largest, signed-zero and infinite halves widen exactly,
    on the portable converter (generic) and on F16C (avx2)."""
    needs("cpu")
    from vkern import _ext

    if level not in _ext.C.simd_supported():
        pytest.skip(f"this CPU cannot run {level}")
    D = 11
    docs = rng.standard_normal((7, D)).astype(np.float16)
    docs[0] = rng.uniform(-6e-5, 6e-5, D).astype(np.float16)  # all subnormal halves
    docs[0, :2] = [6e-8, -3e-6]
    docs[1] = 0.0
    docs[1, 0] = -0.0
    docs[3, 4] = 65504.0
    docs[2, 3] = np.inf
    docs[5, 7] = -np.inf
    off = np.array([0, 2, 4, 7])
    q = rng.standard_normal((3, D)).astype(np.float32) * 1e3  # makes the subnormal doc count
    want = brute(q[None], split(docs.astype(np.float32), off))[0]
    assert abs(want[0]) > 1e-2
    try:
        vkern.set_simd_level(level)
        got = vkern.maxsim(q, docs, doc_offsets=off, backend="cpu")
    finally:
        vkern.set_simd_level("auto")
    np.testing.assert_allclose(got, want.astype(np.float32), rtol=1e-5, atol=1e-4)


def test_docstring_example_runs():
    import doctest

    import vkern.ops.maxsim as mod

    result = doctest.testmod(mod, extraglobs={"vkern": vkern})
    assert result.attempted >= 3 and result.failed == 0
