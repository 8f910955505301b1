"""Import layout (issue 13, docs STYLE "one direction of imports"): no module of the vkern package
imports, at module level, a module that imports it back (directly or through others), and
`import vkern` works without torch. Imports inside functions (lazy, e.g. an op's torch.compile
path) are not module-level edges."""
import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "python" / "vkern"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(mod: str, is_pkg: bool, node: ast.ImportFrom) -> list:
    if node.level == 0:
        base = node.module or ""
    else:
        pkg = mod.split(".") if is_pkg else mod.split(".")[:-1]
        pkg = pkg[: len(pkg) - (node.level - 1)]
        base = ".".join(pkg + ([node.module] if node.module else []))
    out = [base]
    out += [f"{base}.{a.name}" for a in node.names]   # `from . import x` may name a submodule
    return out


def module_graph() -> dict:
    files = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph = {}
    for mod, path in files.items():
        tree = ast.parse(path.read_text())
        deps = set()
        for node in tree.body:       # module level only (not inside functions or classes)
            if isinstance(node, ast.If):      # e.g. TYPE_CHECKING blocks are not run-time imports
                continue
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                deps.update(_resolve(mod, path.name == "__init__.py", node))
        # Importing a.b imports the package a first; a module's own ancestor packages are already
        # being imported when it runs, so they are not edges.
        ancestors = {".".join(mod.split(".")[:i]) for i in range(1, mod.count(".") + 1)}
        own = set()
        for d in deps:
            parts = d.split(".")
            for i in range(1, len(parts) + 1):
                name = ".".join(parts[:i])
                if name in files and name != mod and name not in ancestors:
                    own.add(name)
        graph[mod] = own
    return graph


def test_no_module_level_import_cycles():
    graph = module_graph()
    assert "vkern._torch" in graph and "vkern.ops.maxsim" in graph

    def reaches(start, goal, seen):
        for n in graph.get(start, ()):
            if n == goal:
                return True
            if n not in seen:
                seen.add(n)
                if reaches(n, goal, seen):
                    return True
        return False

    cycles = [(a, b) for a, deps in graph.items() for b in deps if reaches(b, a, set())]
    assert not cycles, f"module-level import cycles: {cycles}"


def test_no_old_torch_op_modules():
    assert not list(PKG.glob("_torch_ops*.py")), "the torch custom ops live in vkern/_torch/<op>.py"
    for op in ("maxsim", "loki", "vatp", "taskvec"):
        assert (PKG / "_torch" / f"{op}.py").exists()
        assert (PKG / "ops" / f"{op}.py").exists()


def test_import_without_torch():
    code = "import sys; sys.modules['torch'] = None; import vkern; assert 'vkern._torch' not in sys.modules"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
