"""delta_linear's decode-step kernel (1..8 rows, one pass over each base row and the rows' codes,
every scheme and bit width, at every SIMD level) and DeltaPlan's prefill grouping, against the
float64 definition (vkern.reference.taskvec.delta_linear)."""
import numpy as np
import pytest

import vkern
from vkern import _ext
from vkern import taskvec as tv
from vkern.reference import taskvec as ref

LEVELS = ["generic", "avx2", "avx512", "avx512shape"]
FORMATS = [("affine", b, g) for b in (2, 3, 4, 8) for g in (32, 64, "row", None)] + \
          [("sign", 1, None), ("sign", 1, 32)]


def _level(level):
    if level not in _ext.C.simd_supported():
        pytest.skip(f"this CPU cannot run {level}")
    vkern.set_simd_level(level)


def _tasks(rng, N, K, fmts):
    qs = [tv.quantize((0.05 * rng.laplace(size=(N, K))).astype(np.float32), bits=b, group_size=g, scheme=s)
          for s, b, g in fmts]
    qs += tv.quantize_residual([(0.05 * rng.standard_normal((N, K))).astype(np.float32) for _ in range(2)],
                               group_size=32)
    return qs


def _check(got, want, x, base, qs):
    scale = np.abs(x).astype(np.float64) @ (np.abs(base) + sum(np.abs(tv.dequantize(q)) for q in qs)).T + 1e-6
    assert np.all(np.abs(np.asarray(got, dtype=np.float64) - want) <= 2e-5 * scale)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("N,K", [(13, 203), (7, 64), (5, 37), (9, 1030)])
def test_fused_rows_every_format_and_row_count(rng, level, N, K):
    """1..9 rows of x, each with a task of another format (2/3/4/8-bit affine at several group
    sizes, sign codes, an RTVQ residual) or -1, in random order (so one call mixes the nibble path,
    the decoded-values path and base-only rows), with and without per-task coefficients; 9 rows
    take the BLAS path, the rest the fused pass."""
    _level(level)
    try:
        base = rng.standard_normal((N, K)).astype(np.float32)
        qs = _tasks(rng, N, K, FORMATS)
        T = len(qs)
        for M in range(1, 10):
            x = rng.standard_normal((M, K)).astype(np.float32)
            for trial in range(3):
                ids = rng.integers(-1, T, M)
                if trial == 1:
                    ids[:] = ids[0]          # every row the same task (one decoded buffer shared)
                coeffs = rng.uniform(0.3, 1.5, T) if trial == 2 else None
                want = ref.delta_linear(x, base, qs, coeffs, ids)
                kw = {} if coeffs is None else {"coeffs": coeffs}
                got = vkern.delta_linear(x, base, qs, task_ids=ids, backend="cpu", **kw)
                _check(got, want, x, base, qs)
    finally:
        vkern.set_simd_level("auto")


@pytest.mark.parametrize("level", ["avx2", "avx512", "avx512shape"])
def test_fused_levels_agree_with_generic(rng, level):
    """Every vector level gives the generic level's result within float32 rounding on the
    SmolLM2 serving shape (4 rows, 4 tenants, 4-bit group 128, K = 576 and 1536)."""
    for N, K in ((64, 576), (32, 1536)):
        base = rng.standard_normal((N, K)).astype(np.float32)
        qs = [tv.quantize((0.01 * rng.standard_normal((N, K))).astype(np.float32), bits=4, group_size=128)
              for _ in range(4)]
        x = rng.standard_normal((4, K)).astype(np.float32)
        ids = np.array([2, 0, 3, 1])
        want = ref.delta_linear(x, base, qs, None, ids)
        try:
            _level(level)
            got = vkern.delta_linear(x, base, qs, task_ids=ids, backend="cpu")
        finally:
            vkern.set_simd_level("auto")
        _check(got, want, x, base, qs)


@pytest.mark.parametrize("rows_per", [[8, 9, 0, 12], [16, 16, 16, 16], [3, 20, 0, 9], [0, 0, 30, 0]])
def test_plan_prefill_groups_any_order(rng, rows_per):
    """DeltaPlan (what DeltaLinear runs) on many rows per tenant: rows of mixed tenants in any order
    (contiguous blocks and shuffled), a tenant with no rows, base-only rows; against the definition."""
    from vkern.ops.taskvec import DeltaPlan
    torch = pytest.importorskip("torch")

    N, K = 48, 160
    base = rng.standard_normal((N, K)).astype(np.float32)
    qs = [tv.quantize((0.05 * rng.standard_normal((N, K))).astype(np.float32), bits=b, group_size=32)
          for b in (4, 2, 8, 4)]
    plan = DeltaPlan(torch.from_numpy(base), qs)
    blocks = np.concatenate([np.full(n, t) for t, n in enumerate(rows_per)] + [np.full(5, -1)])
    for ids in (blocks, rng.permutation(blocks)):
        x = rng.standard_normal((len(ids), K)).astype(np.float32)
        want = ref.delta_linear(x, base, qs, None, ids)
        got = plan.run(torch.from_numpy(x), plan.groups(ids)).numpy()
        _check(got, want, x, base, qs)
        _check(plan(torch.from_numpy(x), ids).numpy(), want, x, base, qs)   # the unmerged path
