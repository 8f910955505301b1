"""Differentiable MaxSim: the argmax every backend keeps, and gradients against float64 torch
(einsum over the padded similarities, the formulation PyLate trains with) and the reference."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import vkern
from vkern import _ext
from vkern.ops import maxsim_grad as G

from conftest import HAVE_CUDA, needs

BACKENDS = ["reference", "cpu", "triton", "cuda"]


def _dev(backend):
    return "cuda" if backend == "cuda" or (backend == "triton" and HAVE_CUDA) else "cpu"


def torch_truth(q, docs_list, qlens=None):
    """float64 MaxSim over a list of [L, D] docs, by plain differentiable torch ops."""
    B, Lq, _ = q.shape
    cols = []
    for d in docs_list:
        if d.shape[0] == 0:
            cols.append(torch.full((B,), float("-inf"), dtype=torch.float64))
            continue
        per_token = torch.einsum("bid,jd->bij", q, d).amax(dim=2)
        if qlens is not None:
            per_token = torch.where(torch.arange(Lq)[None] < qlens[:, None], per_token, 0.0)
        cols.append(per_token.sum(1))
    return torch.stack(cols, 1)


def grads(fn, *xs):
    xs = [x.detach().clone().requires_grad_(True) for x in xs]
    out = fn(*xs)
    w = torch.linspace(-1.0, 2.0, out.numel(), dtype=torch.float64).reshape(out.shape).to(out.device)
    w = torch.where(torch.isinf(out), 0.0, w)          # an empty document has no gradient to give
    loss = (torch.where(torch.isinf(out), 0.0, out).double() * w).sum()
    return out, torch.autograd.grad(loss, xs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("Lq,lengths", [(1, [1, 5]), (7, [40, 0, 13, 1]), (33, [100, 3, 57])])
def test_packed_grads_match_float64_torch(backend, Lq, lengths):
    needs(backend, "maxsim")
    g = torch.Generator().manual_seed(Lq)
    B, D = 3, 24
    q = torch.randn(B, Lq, D, generator=g)
    d = torch.randn(sum(lengths), D, generator=g)
    off = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]))
    qlens = torch.tensor([Lq, max(Lq - 3, 0), 1])
    dev = _dev(backend)
    got, (gq, gd) = grads(lambda a, b: vkern.maxsim(a, b, doc_offsets=off.to(dev), query_lengths=qlens.to(dev),
                                                    backend=backend), q.to(dev), d.to(dev))
    docs64 = lambda dd: [dd[off[n]:off[n + 1]] for n in range(len(lengths))]
    want, (wq, wd) = grads(lambda a, b: torch_truth(a, docs64(b), qlens), q.double(), d.double())
    torch.testing.assert_close(got.cpu().double(), want, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(gq.cpu().double(), wq, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(gd.cpu().double(), wd, rtol=1e-5, atol=1e-4)
    assert gq.dtype == q.dtype and gd.dtype == d.dtype
    assert bool((gq.cpu()[2, 1:] == 0).all())         # masked query tokens get no gradient


@pytest.mark.parametrize("backend", BACKENDS)
def test_padded_and_list_layouts_same_grads(backend):
    needs(backend, "maxsim")
    g = torch.Generator().manual_seed(7)
    dev = _dev(backend)
    q = torch.randn(2, 9, 16, generator=g).to(dev)
    pad = torch.randn(4, 30, 16, generator=g).to(dev)
    lens = torch.tensor([30, 0, 11, 29])
    _, (pq, pd) = grads(lambda a, b: vkern.maxsim(a, b, doc_lengths=lens.to(dev), backend=backend), q, pad)
    assert bool((pd[2, 11:] == 0).all()) and bool((pd[1] == 0).all())   # padding rows and empty doc: 0
    items = [pad[n, :int(lens[n])].clone() for n in range(4)]
    xs = [q.clone().requires_grad_(True)] + [t.requires_grad_(True) for t in items]
    out = vkern.maxsim(xs[0], xs[1:], backend=backend)
    w = torch.linspace(-1.0, 2.0, out.numel(), device=dev).reshape(out.shape)
    w[:, 1] = 0
    gs = torch.autograd.grad((torch.where(torch.isinf(out), 0.0, out) * w).sum(), xs)
    torch.testing.assert_close(gs[0], pq, rtol=1e-5, atol=1e-5)
    for n in range(4):
        torch.testing.assert_close(gs[1 + n], pd[n, :int(lens[n])], rtol=1e-5, atol=1e-5)
    # one query [Lq, D]: scores [N], gradients of its shape
    (sq,) = torch.autograd.grad(vkern.maxsim(xs[0][0], pad, doc_lengths=lens.to(dev), backend=backend)[[0, 2, 3]].sum(),
                                [xs[0]])
    assert sq.shape == xs[0].shape and bool((sq[1] == 0).all())


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_ties_go_to_the_lower_token(backend):
    needs(backend, "maxsim")
    # doc tokens 1, 3 and 40 equal: the max of every query token is a 3-way tie
    d = torch.randn(50, 8, generator=torch.Generator().manual_seed(2)) * 0.01
    row = torch.ones(8)
    d[1] = d[3] = d[40] = row
    q = torch.ones(1, 20, 8)       # 20 tokens: spans register blocks of every SIMD level
    off = torch.tensor([0, 50])
    dev = _dev(backend)
    _, arg = G.maxsim_argmax_impl(q.to(dev), d.to(dev), doc_offsets=off.to(dev), backend=backend)
    assert bool((arg.cpu() == 1).all())
    dd = d.to(dev).requires_grad_(True)
    (gd,) = torch.autograd.grad(vkern.maxsim(q.to(dev), dd, doc_offsets=off.to(dev), backend=backend).sum(), [dd])
    assert torch.allclose(gd[1].cpu(), 20 * row) and bool((gd[3] == 0).all()) and bool((gd[40] == 0).all())


@pytest.mark.parametrize("level", ["generic", "avx2", "avx512shape", "avx512"])
def test_cpu_argmax_every_simd_level(level):
    if level not in _ext.C.simd_supported():
        pytest.skip(f"{level} not supported on this CPU")
    rng = np.random.default_rng(3)
    q = rng.standard_normal((3, 37, 40)).astype(np.float32)
    lengths = [1, 0, 5, 48, 49, 200, 13]           # around the kernel's chunk and tile sizes
    d = rng.standard_normal((sum(lengths), 40)).astype(np.float32)
    off = np.concatenate([[0], np.cumsum(lengths)])
    qlens = np.array([37, 17, 0])
    want_s, want_a = G.maxsim_argmax_impl(q, d, doc_offsets=off, query_lengths=qlens, backend="reference")
    try:
        vkern.set_simd_level(level)
        s, a = G.maxsim_argmax_impl(q, d, doc_offsets=off, query_lengths=qlens, backend="cpu")
        plain = vkern.maxsim(q, d, doc_offsets=off, query_lengths=qlens, backend="cpu")
    finally:
        vkern.set_simd_level("auto")
    np.testing.assert_array_equal(a, want_a)
    np.testing.assert_array_equal(s, plain)       # asking for the argmax does not change the scores
    np.testing.assert_allclose(s, want_s, rtol=1e-5, atol=1e-4)
    assert a.dtype == np.int32 and a.shape == (3, 7, 37)
    assert (a[:, 1] == -1).all() and (a[1, :, 17:] == -1).all() and (a[2] == -1).all()


def test_cpu_backward_numpy_matches_reference():
    rng = np.random.default_rng(4)
    q = rng.standard_normal((2, 6, 12)).astype(np.float32)
    d = rng.standard_normal((3, 20, 12)).astype(np.float16)       # half docs, float32 queries
    lens = np.array([20, 4, 0])
    g = rng.standard_normal((2, 3)).astype(np.float32)
    out = {}
    for be in ("reference", "cpu"):
        _, a = G.maxsim_argmax_impl(q, d, doc_lengths=lens, backend=be)
        out[be] = G.maxsim_backward_impl(g, a, q, d, doc_lengths=lens, backend=be)
    for x, y in zip(out["cpu"], out["reference"]):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)
    assert out["cpu"][1].shape == d.shape and not out["cpu"][1][1, 4:].any()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_grads(dtype):
    g = torch.Generator().manual_seed(5)
    dt = getattr(torch, dtype)
    q = torch.randn(2, 8, 32, generator=g).to(dt)
    d = torch.randn(5, 40, 32, generator=g).to(dt)
    _, (gq, gd) = grads(lambda a, b: vkern.maxsim(a, b, backend="cpu"), q, d)
    assert gq.dtype == dt and gd.dtype == dt
    # float64 on the same rounded inputs: the only error is the float32 sums and the output rounding
    _, (wq, wd) = grads(lambda a, b: torch_truth(a, list(b)), q.double(), d.double())
    tol = {"float16": 2e-3, "bfloat16": 1.6e-2}[dtype]
    torch.testing.assert_close(gq.double(), wq, rtol=tol, atol=tol)
    torch.testing.assert_close(gd.double(), wd, rtol=tol, atol=tol)


@pytest.mark.filterwarnings("ignore:Input #:UserWarning")
def test_gradcheck_through_reference_and_cpu():
    # MaxSim is piecewise linear: central differences are exact away from argmax switches, so
    # float32 gradcheck with a small eps checks the analytic gradients of both backends.
    g = torch.Generator().manual_seed(6)
    q = (torch.randn(2, 3, 5, generator=g)).requires_grad_(True)
    d = (torch.randn(9, 5, generator=g)).requires_grad_(True)
    off = torch.tensor([0, 4, 4, 9])
    for be in ("reference", "cpu"):
        fn = lambda a, b: vkern.maxsim(a, b, doc_offsets=off, backend=be)[:, [0, 2]]
        assert torch.autograd.gradcheck(fn, (q, d), eps=1e-3, atol=2e-2, rtol=1e-2, fast_mode=False)


def test_autograd_keeps_the_argmax_not_the_similarities():
    # 4 queries x 32 tokens x 64 docs x 2048 tokens: [B, N, Lq, Ld] would be 64 MiB of float32;
    # autograd keeps the inputs (views, no copies) and the int32 argmax [B, N, Lq] (32 KiB).
    g = torch.Generator().manual_seed(8)
    q = torch.randn(4, 32, 16, generator=g, requires_grad=True)
    d = torch.randn(64, 2048, 16, generator=g, requires_grad=True)
    s = vkern.maxsim(q, d, backend="cpu")
    saved = [t for t in s.grad_fn.saved_tensors if t is not None]
    extra = [t for t in saved if t.data_ptr() not in (q.data_ptr(), d.data_ptr())]
    assert [tuple(t.shape) for t in extra] == [(4, 64, 32)] and extra[0].dtype == torch.int32
    gq, gd = torch.autograd.grad(s.sum(), [q, d])
    assert gq.shape == q.shape and gd.shape == d.shape
    # each (query, query token, doc) sends its gradient to exactly one token row of that doc
    assert 0 < int((gd.abs().sum(-1) > 0).sum()) <= 4 * 32 * 64


def test_opcheck_with_autograd_registration():
    g = torch.Generator().manual_seed(9)
    q = torch.randn(2, 5, 8, generator=g, requires_grad=True)
    d = torch.randn(14, 8, generator=g, requires_grad=True)
    off = torch.tensor([0, 6, 6, 14])
    qlens = torch.tensor([5, 3])
    torch.library.opcheck(torch.ops.vkern.maxsim_argmax.default, (q, d, off, None, qlens, "cpu"))
    torch.library.opcheck(torch.ops.vkern.maxsim.default, (q, d, off, None, qlens, "cpu"))
    _, arg = torch.ops.vkern.maxsim_argmax(q.detach(), d.detach(), off, None, qlens, "cpu")
    torch.library.opcheck(torch.ops.vkern.maxsim_backward.default,
                          (torch.randn(2, 3), arg, q.detach(), d.detach(), off, None, qlens, "cpu", True, True))
    # the op called directly (no kept argmax) gives the same gradients as vkern.maxsim
    s1 = torch.ops.vkern.maxsim(q, d, off, None, qlens, "cpu")
    a = torch.autograd.grad(s1[:, [0, 2]].sum(), [q, d])
    s2 = vkern.maxsim(q, d, doc_offsets=off, query_lengths=qlens, backend="cpu")
    b = torch.autograd.grad(s2[:, [0, 2]].sum(), [q, d])
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)


def test_torch_compile_of_a_contrastive_loss():
    g = torch.Generator().manual_seed(10)
    q = torch.randn(4, 6, 16, generator=g, requires_grad=True)
    d = torch.randn(4, 12, 16, generator=g, requires_grad=True)

    def loss_fn(q, d):
        s = vkern.maxsim(q, d, backend="cpu")                  # [4, 4]: query i's positive is doc i
        return torch.nn.functional.cross_entropy(s, torch.arange(4))

    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)
    l1 = compiled(q, d)
    g1 = torch.autograd.grad(l1, [q, d])
    l2 = loss_fn(q, d)
    g2 = torch.autograd.grad(l2, [q, d])
    torch.testing.assert_close(l1, l2)
    for x, y in zip(g1, g2):
        torch.testing.assert_close(x, y)


def test_no_grad_and_topk_paths_unchanged():
    q = torch.randn(2, 4, 8, requires_grad=True)
    d = torch.randn(5, 6, 8)
    with torch.no_grad():
        s = vkern.maxsim(q, d)
    assert s.grad_fn is None
    assert vkern.maxsim(q, d).grad_fn is not None
    vals, idx = vkern.maxsim(q, d, topk=2)
    assert vals.shape == (2, 2) and idx.dtype == torch.int64


def test_bad_grad_shape_raises():
    q = np.ones((2, 3, 4), np.float32)
    d = np.ones((5, 4), np.float32)
    off = np.array([0, 2, 5])
    _, a = G.maxsim_argmax_impl(q, d, doc_offsets=off, backend="reference")
    with pytest.raises(ValueError, match="grad"):
        G.maxsim_backward_impl(np.ones((2, 3), np.float32), a, q, d, doc_offsets=off, backend="reference")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_zero_mask_mode_is_pylates_mask_multiply(backend, dtype):
    """doc_mask (internal, used by the PyLate integration): a masked token's similarity is 0 and
    passes no gradient -- the same numbers and gradients as multiplying the mask in (float64 torch)."""
    needs(backend, "maxsim")
    g = torch.Generator().manual_seed(13)
    dev = _dev(backend)
    dt = getattr(torch, dtype)
    q = torch.randn(3, 10, 16, generator=g).to(dt)
    d = torch.randn(5, 60, 16, generator=g).to(dt)
    m = torch.rand(5, 60, generator=g) > 0.4
    m[1] = False                                          # fully masked: scores 0 within its span
    lens = torch.tensor([60, 7, 0, 33, 59])
    fn = lambda a, b: torch.ops.vkern.maxsim_argmax(a, b, None, lens.to(dev), None, backend, m.to(dev))[0]
    got, (gq, gd) = grads(fn, q.to(dev), d.to(dev))

    def want_fn(a, b):
        sim = torch.einsum("bid,njd->bnij", a, b * m[:, :, None])
        sim = sim.masked_fill(~(torch.arange(60)[None] < lens[:, None])[None, :, None, :], float("-inf"))
        return sim.amax(-1).sum(-1)
    want, (wq, wd) = grads(want_fn, q.double(), d.double())
    tol = 1e-4 if dtype == "float32" else 2e-3
    torch.testing.assert_close(got.cpu().double(), want, rtol=tol, atol=tol)
    torch.testing.assert_close(gq.cpu().double(), wq, rtol=tol, atol=tol)
    torch.testing.assert_close(gd.cpu().double(), wd, rtol=tol, atol=tol)
    assert bool((gd.cpu()[~m] == 0).all())
    _, arg = G.maxsim_argmax_impl(q.to(dev), d.to(dev), doc_lengths=lens.to(dev), backend=backend, doc_mask=m.to(dev))
    rows = arg.cpu().long()
    hit = rows >= 0
    assert bool(m[torch.arange(5)[None, :, None].expand_as(rows)[hit], rows[hit]].all())


@pytest.mark.parametrize("level", ["generic", "avx2", "avx512shape"])
def test_zero_mask_every_simd_level(level):
    if level not in _ext.C.simd_supported():
        pytest.skip(f"{level} not supported on this CPU")
    rng = np.random.default_rng(14)
    q = rng.standard_normal((2, 19, 24)).astype(np.float32)
    d = rng.standard_normal((4, 70, 24)).astype(np.float32)
    m = rng.random((4, 70)) > 0.5
    want_s, want_a = G.maxsim_argmax_impl(q, d, backend="reference", doc_mask=m)
    try:
        vkern.set_simd_level(level)
        s, a = G.maxsim_argmax_impl(q, d, backend="cpu", doc_mask=m)
    finally:
        vkern.set_simd_level("auto")
    np.testing.assert_allclose(s, want_s, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(a, want_a)
    np.testing.assert_allclose(s, vkern.maxsim(q, d * m[:, :, None], backend="cpu"), rtol=1e-6, atol=1e-5)


def test_zero_mask_bad_inputs():
    q = np.ones((2, 3, 4), np.float32)
    d = np.ones((5, 6, 4), np.float32)
    with pytest.raises(ValueError, match="doc_mask"):
        G.maxsim_argmax_impl(q, d, doc_mask=np.ones((5, 5), bool))
    with pytest.raises(TypeError, match="doc_mask"):
        G.maxsim_argmax_impl(q, d, doc_mask=np.ones((5, 6), np.float32))


def _readme_block(heading):
    import pathlib
    import re
    text = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split(heading + "\n", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_gradients_example_runs():
    ns = {}
    exec(_readme_block("### Gradients"), ns)
    assert ns["q"].grad.shape == (4, 32, 128) and ns["d"].grad.shape == (8, 300, 128)
    assert bool((ns["d"].grad[4, 1:] == 0).all())        # past doc_lengths: no gradient


# ---- the fused GPU kernels (kernels/maxsim_grad.py under the Triton interpreter here; on a GPU the
# same tests run them for real, and the CUDA ones: csrc/cuda/maxsim_grad.cu)

def _grid_values(rng, shape):
    """Multiples of 1/2 in [-1, 1]: every product and sum is exact in float32, float16 and bfloat16,
    so the argmax must equal the float64 reference's exactly, and exact ties are common."""
    return (rng.integers(-2, 3, size=shape) / 2.0).astype(np.float32)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("layout", ["packed", "padded"])
@pytest.mark.parametrize("masked", [False, True])
def test_fused_kernels_match_reference(backend, dtype, layout, masked):
    needs(backend, "maxsim")
    rng = np.random.default_rng(21)
    dev = _dev(backend)
    dt = getattr(torch, dtype)
    B, Lq, D = 3, 19, 40                                  # D = 40: the float32 Triton tiles loop over D
    lengths = [70, 0, 5, 1, 130, 64]                      # across and exactly at the 64-token tiles
    q = _grid_values(rng, (B, Lq, D))
    qlens = np.array([19, 7, 0])
    if layout == "packed":
        docs = _grid_values(rng, (sum(lengths), D))
        kw = dict(doc_offsets=np.concatenate([[0], np.cumsum(lengths)]))
        mask = rng.random(sum(lengths)) > 0.3 if masked else None
    else:
        docs = _grid_values(rng, (len(lengths), 130, D))
        kw = dict(doc_lengths=np.array(lengths))
        mask = rng.random((len(lengths), 130)) > 0.3 if masked else None
    doc4 = docs[76:206] if layout == "packed" else docs[4]
    doc4[65:] = doc4[:65]                             # its second 64-token tile repeats the first: ties
    s_ref, a_ref = G.maxsim_argmax_impl(q, docs, query_lengths=qlens, backend="reference", doc_mask=mask, **kw)
    sims = q[0] @ doc4.T
    assert ((sims == sims.max(1, keepdims=True)).sum(1) > 1).all()

    t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(dev)
    tkw = {k: t(v) for k, v in kw.items()}
    qt, dt_ = t(q).to(dt), t(docs).to(dt)
    s, a = G.maxsim_argmax_impl(qt, dt_, query_lengths=t(qlens), backend=backend,
                                doc_mask=None if mask is None else t(mask), **tkw)
    np.testing.assert_array_equal(a.cpu().numpy(), a_ref)
    np.testing.assert_allclose(s.cpu().numpy(), s_ref, rtol=1e-6, atol=1e-6)
    if mask is None:   # the argmax forward's scores are the plain forward's
        plain = vkern.maxsim(qt, dt_, query_lengths=t(qlens), backend=backend, **tkw)
        np.testing.assert_allclose(s.cpu().numpy(), plain.cpu().numpy(), rtol=1e-6, atol=1e-6)

    g = rng.standard_normal((B, len(lengths))).astype(np.float32)
    gq_ref, gd_ref = G.maxsim_backward_impl(g, a_ref, q, docs, query_lengths=qlens, backend="reference", **kw)
    gq, gd = G.maxsim_backward_impl(t(g), a, qt, dt_, query_lengths=t(qlens), backend=backend, **tkw)
    assert gq.dtype == torch.float32 and gd.shape == dt_.shape
    np.testing.assert_allclose(gq.cpu().numpy(), gq_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gd.cpu().numpy(), gd_ref, rtol=1e-5, atol=1e-5)
    if layout == "padded":
        assert not gd.cpu().numpy()[2, 5:].any() and not gd.cpu().numpy()[1].any()


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_fused_kernels_long_queries_and_many_hits_per_row(backend):
    """Lq past one query tile (Triton: 64 rows for float32 D <= 32; CUDA: 32), every query token of
    every query on the same few rows (the scatter adds many contributions to one row), a NaN token
    (np.argmax: the first NaN wins), and mixed dtypes in the backward (float32 queries, float16 docs)."""
    needs(backend, "maxsim")
    rng = np.random.default_rng(22)
    dev = _dev(backend)
    q = np.abs(_grid_values(rng, (2, 150, 16))) + 0.25
    docs = np.full((3, 40, 16), -0.5, np.float32)
    docs[0, 7] = docs[0, 30] = 1.0                        # a tie: row 7 gets everything
    docs[1, 12] = 1.0
    docs[2, 3, 5] = np.nan
    docs[2, 9, 0] = np.nan
    s_ref, a_ref = G.maxsim_argmax_impl(q, docs, backend="reference")
    assert (a_ref[:, 0] == 7).all() and (a_ref[:, 1] == 12).all() and (a_ref[:, 2] == 3).all()
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(dev)
    s, a = G.maxsim_argmax_impl(t(q), t(docs), backend=backend)
    np.testing.assert_array_equal(a.cpu().numpy(), a_ref)
    np.testing.assert_allclose(s.cpu().numpy(), s_ref, rtol=1e-6)       # NaN where the reference has NaN
    g = np.array([[1.0, -2.0, 0.0], [0.5, 3.0, 0.0]], np.float32)   # no gradient through the NaN document
    d16 = docs.copy()
    d16[2] = 0.0
    gq_ref, gd_ref = G.maxsim_backward_impl(g, a_ref, q, d16.astype(np.float16), backend="reference")
    gq, gd = G.maxsim_backward_impl(t(g), a, t(q), t(d16).half(), backend=backend)
    np.testing.assert_allclose(gq.cpu().numpy(), gq_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gd.cpu().numpy(), gd_ref, rtol=1e-5, atol=1e-5)
    assert gd.cpu()[0, 7].abs().sum() > 0 and gd.cpu()[0, 30].abs().sum() == 0


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_fused_bf16_grads_through_autograd(backend):
    needs(backend, "maxsim")
    g = torch.Generator().manual_seed(23)
    dev = _dev(backend)
    q = torch.randn(2, 8, 32, generator=g).to(torch.bfloat16).to(dev)
    d = torch.randn(5, 40, 32, generator=g).to(torch.bfloat16).to(dev)
    _, (gq, gd) = grads(lambda a, b: vkern.maxsim(a, b, backend=backend), q, d)
    assert gq.dtype == torch.bfloat16 and gd.dtype == torch.bfloat16
    _, (wq, wd) = grads(lambda a, b: torch_truth(a, list(b)), q.cpu().double(), d.cpu().double())
    torch.testing.assert_close(gq.cpu().double(), wq, rtol=1.6e-2, atol=1.6e-2)
    torch.testing.assert_close(gd.cpu().double(), wd, rtol=1.6e-2, atol=1.6e-2)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_cpu_half_docs_gradient_written_in_its_dtype(dtype):
    """The cpu backward writes a float16/bfloat16 document gradient directly (float32 sums per document,
    rounded once): no float32 buffer of the documents' size. Each document here has one token and the
    query one token, so every gradient row is the query row rounded once: bit-equal to torch's cast,
    over normal, subnormal, overflowing and round-half-even values."""
    rng = np.random.default_rng(24)
    D = 2048
    vals = (rng.standard_normal(D) * np.exp2(rng.integers(-30, 20, D))).astype(np.float32)
    vals[:8] = [65504, 65519.99, 65520, 7e4, 2.0**-24, 2.0**-25, 3 * 2.0**-25, 6.1e-5]
    vals[8:16] = -vals[:8]
    vals[16] = np.float32(1 + 2.0**-8)           # a tie for bfloat16: rounds to even (1.0)
    dt = getattr(torch, dtype)
    q = torch.from_numpy(vals).reshape(1, 1, D)
    d = torch.ones(3, 1, D, dtype=dt, requires_grad=True)
    (gd,) = torch.autograd.grad(vkern.maxsim(q, d, backend="cpu").sum(), [d])
    assert gd.dtype == dt
    want = q[0, 0].to(dt).view(torch.int16)
    for n in range(3):
        assert torch.equal(gd[n, 0].view(torch.int16), want)
    _, arg = G.maxsim_argmax_impl(q, d.detach(), backend="cpu")
    _, raw = G.maxsim_backward_impl(torch.ones(1, 3), arg, q, d.detach(), backend="cpu", docs_grad_in_dtype=True)
    assert raw.dtype == dt                         # straight from the kernel, not a cast of a float32 buffer
