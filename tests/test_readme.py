"""Every ```python block of README.md and docs/ runs as written (issue 13).

A block whose first line is ``# needs: cuda`` is skipped without a CUDA device; ``# needs: <module>``
(e.g. torch, ml_dtypes) is skipped where that module cannot be imported (.ci/run installs them all).
Each block runs in a fresh namespace, as if pasted into its own script."""
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "docs" / "ops").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
NEEDS = re.compile(r"#\s*needs:\s*([\w, ]+)")


def _blocks():
    out = []
    for page in PAGES:
        if not page.exists():
            continue
        text = page.read_text()
        for i, m in enumerate(BLOCK.finditer(text)):
            line = text.count("\n", 0, m.start()) + 1
            out.append(pytest.param(m.group(1), id=f"{page.relative_to(ROOT)}:{line}"))
    return out


BLOCKS = _blocks()


def test_pages_have_blocks():
    # The README and every op page carry at least one runnable example.
    ids = [p.id for p in BLOCKS]
    for name in ("README.md", "docs/ops/maxsim.md", "docs/ops/loki.md", "docs/ops/vatp.md", "docs/ops/taskvec.md"):
        assert any(i.startswith(name + ":") for i in ids), f"{name} has no ```python block"


def _skip_unless_available(code: str) -> None:
    first = code.lstrip().splitlines()[0] if code.strip() else ""
    m = NEEDS.match(first)
    if not m:
        return
    for need in (n.strip() for n in m.group(1).split(",") if n.strip()):
        if need == "cuda":
            torch = pytest.importorskip("torch")
            if not torch.cuda.is_available():
                pytest.skip("needs a CUDA device")
        else:
            try:
                importlib.import_module(need)
            except ImportError:
                pytest.skip(f"needs {need} (pip install {need})")


@pytest.mark.parametrize("code", BLOCKS)
def test_block_runs(code, request):
    _skip_unless_available(code)
    exec(compile(code, request.node.callspec.id, "exec"), {"__name__": "__main__"})
