"""The Python blocks of docs/ops/retrieval_memory.md run as written, and the docstring
examples of the ops it describes pass."""
import doctest
import re
from pathlib import Path

import pytest

PAGE = Path(__file__).resolve().parent.parent / "docs" / "ops" / "retrieval_memory.md"


def blocks():
    if not PAGE.exists():
        return []
    return re.findall(r"```python\n(.*?)```", PAGE.read_text(), flags=re.S)


@pytest.mark.parametrize("i", range(len(blocks())) if blocks() else [pytest.param(0, marks=pytest.mark.skip)])
def test_page_blocks_run(i):
    exec(compile(blocks()[i], f"{PAGE.name}[{i}]", "exec"), {})


def test_docstring_examples():
    import vkern.muvera
    import vkern.ops.maxsim_int8
    import vkern.ops.pool

    for mod in (vkern.ops.maxsim_int8, vkern.ops.pool, vkern.muvera):
        result = doctest.testmod(mod, raise_on_error=False)
        assert result.failed == 0 and result.attempted > 0, mod.__name__
