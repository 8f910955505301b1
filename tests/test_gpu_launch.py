"""GPU launch hygiene, checked without a GPU: every Triton launch runs under its tensors' device
guard, and the grids the launchers compute stay inside CUDA's limits for any shape."""
import ast
from pathlib import Path

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


@pytest.mark.parametrize("module", ["loki", "maxsim", "taskvec", "vatp"])
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
