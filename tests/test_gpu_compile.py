"""Offline GPU compile gate: every Triton kernel compiled for sm_90 and sm_80 by Triton's own
compiler and bundled ptxas (no GPU needed). Runs tests/_triton_gate.py in a subprocess without
TRITON_INTERPRET (conftest sets it for the interpreter tests). Fails on any compile error and on
spills in kernels the gate declares spill-free; prints a regs/spills/smem table."""
import json
import re
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_triton_kernels_compile_for_sm90_sm80(tmp_path):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "_triton_gate.py"), "90,80"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    recs = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert proc.returncode == 0 and recs, proc.stderr[-3000:]
    print(f"\n{'kernel':28s} {'cc':>3s} {'regs':>5s} {'spill':>6s} {'smem':>7s}  variant")
    for r in recs:
        if r["ok"]:
            print(f"{r['kernel']:28s} {r['cc']:3d} {r['regs']:5d} {r['spills']:6d} {r['smem']:7d}  {r['variant']}")
        else:
            print(f"{r['kernel']:28s} {r['cc']:3d} FAILED  {r['variant']}")
    kernels = {r["kernel"] for r in recs}
    # every @triton.jit kernel in kernels/*.py, counted from the sources so a new kernel is covered
    # (launchable kernels are named *_kernel; the other @triton.jit functions are device helpers)
    declared = {f"{p.stem}.{m}" for p in (ROOT / "kernels").glob("*.py")
                for m in re.findall(r"@triton\.jit\s+def (\w+_kernel)\(", p.read_text())}
    assert kernels == declared, sorted(declared ^ kernels)
    bad = [f"{r['kernel']} sm_{r['cc']} {r['variant']}: {r['error']}" for r in recs if not r["ok"]]
    assert not bad, "compile errors:\n" + "\n".join(bad[:10])
    spill = [f"{r['kernel']} sm_{r['cc']} {r['variant']}: {r['spills']} B" for r in recs
             if r["spill_free"] and r["spills"] > 0]
    assert not spill, "spills in spill-free kernels:\n" + "\n".join(spill)
