import os

os.environ["TRITON_INTERPRET"] = "1"  # before the kernel module is imported

import importlib.util
import pathlib

import numpy as np
import pytest
import torch

_path = pathlib.Path(__file__).resolve().parents[1] / "kernels" / "maxsim.py"
_spec = importlib.util.spec_from_file_location("_maxsim_triton_scratch", _path)
km = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(km)

DOC_LENS = [0, 1, 63, 64, 65, 130, 0]


def ref_scores(q, qlens, docs, offs, dtype=np.float64):
    """q [B, Lq, D], docs [T, D] numpy; score in `dtype` arithmetic."""
    q = np.asarray(q, dtype)
    docs = np.asarray(docs, dtype)
    B, N = q.shape[0], len(offs) - 1
    out = np.zeros((B, N), np.float64)
    for b in range(B):
        for n in range(N):
            d = docs[offs[n]:offs[n + 1]]
            if len(d) == 0:
                out[b, n] = -np.inf
                continue
            sims = q[b, : qlens[b]] @ d.T
            out[b, n] = np.sum(np.max(sims, axis=1), dtype=dtype) if qlens[b] else 0.0
    return out


def ref_bf16(q, qlens, docs, offs):
    """Reference run in bf16 arithmetic (torch CPU, the only bf16 numpy-ish path)."""
    q = torch.as_tensor(q).bfloat16()
    docs = torch.as_tensor(docs).bfloat16()
    B, N = q.shape[0], len(offs) - 1
    out = np.zeros((B, N), np.float64)
    for b in range(B):
        for n in range(N):
            d = docs[offs[n]:offs[n + 1]]
            if len(d) == 0:
                out[b, n] = -np.inf
                continue
            sims = q[b, : qlens[b]] @ d.T
            out[b, n] = sims.max(dim=1).values.sum().float().item() if qlens[b] else 0.0
    return out


def make(B, Lq, D, doc_lens, seed=0, scale=1.0):
    g = np.random.default_rng(seed)
    q = (g.standard_normal((B, Lq, D)) * scale / np.sqrt(D)).astype(np.float32)
    offs = np.concatenate([[0], np.cumsum(doc_lens)]).astype(np.int64)
    docs = g.standard_normal((int(offs[-1]), D)).astype(np.float32)
    qlens = np.array([Lq, 0, max(1, Lq // 2)][:B], np.int32) if B <= 3 else g.integers(0, Lq + 1, B).astype(np.int32)
    # Padded query tokens hold garbage: they must add nothing.
    for b in range(B):
        q[b, qlens[b]:] = 1e4
    return q, qlens, docs, offs


def run(q, qlens, docs, offs, dtype):
    tq = torch.from_numpy(q).to(dtype).contiguous()
    td = torch.from_numpy(docs).to(dtype).contiguous()
    out = km.maxsim_scores(tq, torch.from_numpy(qlens), td, torch.from_numpy(offs))
    assert out.dtype == torch.float32 and out.shape == (q.shape[0], len(offs) - 1)
    return out.double().numpy()


def assert_same_inf(got, want):
    assert np.array_equal(np.isneginf(got), np.isneginf(want))
    assert np.array_equal(np.isnan(got), np.isnan(want))


def check_fp32(q, qlens, docs, offs):
    got = run(q, qlens, docs, offs, torch.float32)
    want = ref_scores(q, qlens, docs, offs)
    assert_same_inf(got, want)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def check_lowp(q, qlens, docs, offs, dtype):
    got = run(q, qlens, docs, offs, dtype)
    q_r = torch.from_numpy(q).to(dtype).double().numpy()
    d_r = torch.from_numpy(docs).to(dtype).double().numpy()
    truth_rounded = ref_scores(q_r, qlens, d_r, offs)  # float64 on the dtype's inputs
    truth_orig = ref_scores(q, qlens, docs, offs)  # float64 on the fp32 originals
    assert_same_inf(got, truth_rounded)
    fin = np.isfinite(truth_rounded)
    # 1) vs the reference run in that dtype's arithmetic
    if dtype == torch.float16:
        lowp = ref_scores(q_r, qlens, d_r, offs, dtype=np.float16)
    else:
        lowp = ref_bf16(q_r, qlens, d_r, offs)
    err = np.abs(got[fin] - truth_rounded[fin])
    ref_err = np.abs(lowp[fin] - truth_rounded[fin])
    assert np.all(err <= 2 * ref_err + 1e-3), (err.max(), ref_err.max())
    # 2) vs float64 of the originals, against the reference on rounded inputs
    err = np.abs(got[fin] - truth_orig[fin])
    ref_err = np.abs(truth_rounded[fin] - truth_orig[fin])
    assert np.all(err <= 2 * ref_err + 1e-3), (err.max(), ref_err.max())


@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("Lq", [1, 5, 32])
@pytest.mark.parametrize("D", [3, 64, 96, 128])
def test_fp32_grid(B, Lq, D):
    check_fp32(*make(B, Lq, D, DOC_LENS, seed=B * 1000 + Lq * 10 + D))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,Lq,D", [(1, 32, 128), (3, 5, 96), (3, 1, 3), (3, 32, 64)])
def test_lowp(dtype, B, Lq, D):
    check_lowp(*make(B, Lq, D, DOC_LENS, seed=Lq + D), dtype)


@pytest.mark.parametrize("B,Lq,D,lens", [
    (2, 130, 16, [3, 0, 70]),     # Lq > 128: query tiles loop
    (2, 7, 300, [1, 65, 0]),      # D > 256: feature chunks loop
    (1, 3, 768, [2, 64]),         # ColPali width
    (5, 5, 32, [4, 0, 66]),       # several queries stacked per program
    (20, 1, 8, [1, 2, 0, 5]),     # several query groups
])
def test_loops_and_packing(B, Lq, D, lens):
    check_fp32(*make(B, Lq, D, lens, seed=B + Lq + D))


def test_long_doc_fp16():
    check_lowp(*make(2, 8, 64, [700, 1], seed=3), torch.float16)


def test_all_negative():
    q, qlens, docs, offs = make(3, 5, 64, [1, 65, 0, 3], seed=7)
    q = np.abs(q)
    docs = -np.abs(docs)
    q[:, :, :] = np.where(np.arange(5)[None, :, None] < qlens[:, None, None], q, 1e4)
    want = ref_scores(q, qlens, docs, offs)
    assert np.all(want[[0, 2]][:, [0, 1, 3]] < 0)
    check_fp32(q, qlens, docs, offs)


@pytest.mark.parametrize("nan_by_flag", [None, False])
def test_nan_doc_token(monkeypatch, nan_by_flag):
    monkeypatch.setattr(km, "_NAN_BY_FLAG", nan_by_flag)  # False: the GPU reduce path
    q, qlens, docs, offs = make(3, 5, 16, [4, 70, 3, 0], seed=11)
    docs[offs[1] + 66, 2] = np.nan  # in doc 1's second tile
    q[:, 4:] = np.where(np.arange(5)[None, 4:, None] >= qlens[:, None, None], np.nan, q[:, 4:])
    got = run(q, qlens, docs, offs, torch.float32)
    want = ref_scores(q, qlens, docs, offs)
    assert np.isnan(want[0, 1]) and not np.isnan(want[1, 1])  # query 1 has length 0
    assert_same_inf(got, want)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    assert got[1, 1] == 0.0 and np.all(np.isneginf(got[:, 3]))


def test_empty_corner_cases():
    # all documents empty, and a zero-length query axis: no launch, exact answers
    offs = torch.tensor([0, 0, 0])
    out = km.maxsim_scores(torch.ones(2, 3, 4), torch.tensor([3, 0], dtype=torch.int32),
                           torch.ones(0, 4), offs)
    assert out.shape == (2, 2) and torch.all(torch.isneginf(out))
    out = km.maxsim_scores(torch.ones(2, 0, 4), torch.tensor([0, 0], dtype=torch.int32),
                           torch.ones(3, 4), torch.tensor([0, 3, 3]))
    assert out.tolist() == [[0.0, float("-inf")]] * 2
