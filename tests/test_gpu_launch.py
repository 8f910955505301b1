"""GPU launch hygiene, checked without a GPU: every Triton launch runs under its tensors' device
guard, and the grids the launchers compute stay inside CUDA's limits for any shape."""
import ast
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
GUARDS = {"device_guard", "_device_ctx"}


def _launches(tree):
    """(kernel name, line, enclosing with-guards) for every `name[grid](...)` call."""
    out = []

    def visit(node, guards):
        if isinstance(node, ast.With):
            names = set()
            for item in node.items:
                call = item.context_expr
                if isinstance(call, ast.Call):
                    f = call.func
                    names.add(f.id if isinstance(f, ast.Name) else getattr(f, "attr", ""))
            guards = guards | names
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript)
                and isinstance(node.func.value, ast.Name) and node.func.value.id.endswith("_kernel")):
            out.append((node.func.value.id, node.lineno, guards))
        for child in ast.iter_child_nodes(node):
            visit(child, guards)

    visit(tree, frozenset())
    return out


@pytest.mark.parametrize("module", ["loki", "maxsim", "maxsim_int8", "muvera", "taskvec", "vatp"])
def test_every_triton_launch_is_device_guarded(module):
    src = (ROOT / "kernels" / f"{module}.py").read_text()
    launches = _launches(ast.parse(src))
    assert launches, f"no launches found in kernels/{module}.py"
    unguarded = [f"kernels/{module}.py:{line} {name}" for name, line, guards in launches if not guards & GUARDS]
    assert not unguarded, "Triton launches outside a device guard:\n" + "\n".join(unguarded)


def test_device_guard_selects_the_tensors_gpu(monkeypatch):
    torch = pytest.importorskip("torch")
    pytest.importorskip("triton")
    from vkern.kernels import _common

    entered = []

    class Guard:
        def __init__(self, dev):
            self.dev = dev

        def __enter__(self):
            entered.append(self.dev)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "device", Guard)

    class FakeCuda:
        device = torch.device("cuda", 3)

    with _common.device_guard(FakeCuda()):
        pass
    assert entered == [torch.device("cuda", 3)]
    with _common.device_guard(torch.zeros(1)):   # CPU (interpreter): no device switch
        pass
    assert entered == [torch.device("cuda", 3)]


def test_tensors_on_two_gpus_are_refused_before_any_kernel():
    torch = pytest.importorskip("torch")
    from vkern import _arrays as A

    class OnGpu:   # only .device is read: no GPU needed
        def __init__(self, i):
            self.device = torch.device("cuda", i)

    with pytest.raises(ValueError, match="mixed devices"):
        A.same_place({"q": OnGpu(0), "k_cache": OnGpu(1)})
    assert A.same_place({"q": OnGpu(1), "k_cache": OnGpu(1)}) == "torch"


def _within_limits(grid):
    from vkern.kernels._common import GRID_X_MAX, GRID_YZ_MAX

    assert 1 <= len(grid) <= 3 and all(isinstance(g, int) and g >= 0 for g in grid), grid
    return grid[0] <= GRID_X_MAX and all(g <= GRID_YZ_MAX for g in grid[1:])


# Shapes past every old y-axis limit: T, Tq = 2**22 + 1 (row/key tiles > 65,535), kmax = 2**22 + 3,
# N_out and K_in = 2**23 + 5, a decode cache of 2**26 tokens; and ordinary ones.
HUGE = [(1, 1, 1, 1, 1), (2, 32, 8, 17, 1000), (1, 8, 8, 2**22 + 1, 2**22 + 1), (4, 32, 8, 1, 2**26)]


@pytest.mark.parametrize("B,Hq,H,Tq,T", HUGE)
def test_vatp_grids_stay_inside_cuda_limits(B, Hq, H, Tq, T):
    pytest.importorskip("triton")
    from vkern.kernels import vatp

    rowstats, colsum = vatp._colsum_grids(B, Hq, H, Tq, T)
    assert _within_limits(rowstats) and _within_limits(colsum)
    assert rowstats[0] == B * Hq * -(-Tq // vatp._BLOCK_M) and colsum[0] == B * H * -(-T // vatp._BLOCK_N)
    kmax = min(T, 2**22 + 3)
    for grid in vatp._prune_grids(B, H, kmax, 128, 256):
        assert _within_limits(grid)
    assert vatp._prune_grids(B, H, kmax, 128, 256)[3][0] == B * H * -(-kmax // vatp._BLOCK_ROWS)


@pytest.mark.parametrize("M,N,K", [(1, 1, 1), (7, 4096, 11008), (2**21 + 1, 4096, 64), (17, 2**23 + 5, 64), (3, 64, 2**23 + 5)])
def test_taskvec_grids_stay_inside_cuda_limits(M, N, K):
    pytest.importorskip("triton")
    from vkern.kernels import taskvec

    grid = taskvec._tile_grid("apply_task_vectors", N, K)
    assert _within_limits(grid) and grid[0] == -(-N // taskvec._BLOCK[0]) * -(-K // taskvec._BLOCK[1])
    grid = taskvec._delta_grid(M, N)
    assert _within_limits(grid) and grid[0] == -(-M // taskvec._DOT[0]) * -(-N // taskvec._DOT[1])


@pytest.mark.parametrize("B,Hq,H,Tq,T", HUGE)
def test_loki_grids_stay_inside_cuda_limits(B, Hq, H, Tq, T):
    pytest.importorskip("triton")
    from vkern.kernels import loki

    for NL in (H, Hq):
        grid = loki._approx_grid(B, NL, T)
        assert _within_limits(grid) and grid[0] == B * NL * -(-T // loki._BLOCK_T)
    assert _within_limits(loki._attend_grid(B, Hq, loki._MAX_SPLITS))


def test_a_grid_too_big_for_one_launch_is_a_value_error():
    pytest.importorskip("triton")
    from vkern.kernels import loki, taskvec, vatp

    with pytest.raises(ValueError, match="attention_colsum"):
        vatp._colsum_grids(2**16, 64, 8, 2**20, 2**20)
    with pytest.raises(ValueError, match="delta_linear"):
        taskvec._delta_grid(2**30, 2**30)
    with pytest.raises(ValueError, match="loki_attention"):
        loki._approx_grid(2**12, 64, 2**26)


# The D-chunked score and rotate paths (float32 VATP at D > 64, the rotate everywhere) against the
# reference under the interpreter, with D not a multiple of the chunk (masked tail chunk).
@pytest.mark.parametrize("D,causal", [(130, True), (96, False)])
def test_vatp_float32_chunked_scores_match_the_reference(rng, D, causal):
    torch = pytest.importorskip("torch")
    from conftest import needs

    import vkern

    needs("triton", "attention_colsum")
    from vkern.kernels import vatp

    assert vatp._score_tiles(torch.float32, D)["D_CHUNK"] < vatp._score_tiles(torch.float32, D)["BLOCK_D"]
    q = rng.standard_normal((1, 4, 5, D)).astype(np.float32)
    k = rng.standard_normal((1, 2, 40, D)).astype(np.float32)
    lens = np.array([37])
    got = vkern.vatp.attention_colsum(torch.from_numpy(q), torch.from_numpy(k), causal=causal,
                                      seq_lens=torch.from_numpy(lens), backend="triton")
    want = vkern.vatp.attention_colsum(q, k, causal=causal, seq_lens=lens, backend="reference")
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("D", [40, 200])
def test_rotate_in_row_chunks_matches_the_reference(rng, D):
    torch = pytest.importorskip("torch")
    from conftest import needs

    import vkern

    needs("triton", "loki_rotate")
    P = np.linalg.qr(rng.standard_normal((2, D, D)))[0].astype(np.float32)
    x = rng.standard_normal((3, 4, D)).astype(np.float32)
    got = vkern.ops.loki.rotate_impl(torch.from_numpy(x), torch.from_numpy(P), backend="triton")
    want = vkern.ops.loki.rotate_impl(x, P, backend="reference")
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)


def test_maxsim_configs_fit_the_devices_shared_memory():
    pytest.importorskip("triton")
    from vkern.kernels import maxsim

    sm86, sm90 = 99 * 1024, 227 * 1024
    # the case the issue measured: 16-bit D = 256 with 64 rows needs 128.5 KB as a whole-D tile
    big = maxsim._launch_config(64, 32, 256, 2)
    assert big["SINGLE_D_BLOCK"] and maxsim._smem_bytes(big, 2) == 131584
    assert maxsim._launch_config(64, 32, 256, 2, sm90) == big
    small = maxsim._launch_config(64, 32, 256, 2, sm86)
    assert not small["SINGLE_D_BLOCK"] and maxsim._smem_bytes(small, 2) <= sm86
    for es in (2, 4):
        for B in (1, 3, 8, 64, 1000):
            for Lq in (1, 7, 32, 300):
                for D in (16, 64, 100, 128, 200, 256, 768, 1024):
                    for limit in (sm86, sm90, 64 * 1024):
                        cfg = maxsim._launch_config(B, Lq, D, es, limit)
                        assert maxsim._smem_bytes(cfg, es) <= limit, (B, Lq, D, es, limit, cfg)
                        if maxsim._smem_bytes(maxsim._launch_config(B, Lq, D, es), es) <= limit:
                            assert cfg == maxsim._launch_config(B, Lq, D, es)   # no change where it fits
