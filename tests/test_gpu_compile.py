"""Offline GPU compile gate: every Triton kernel compiled for sm_90 and sm_80 by Triton's own
compiler and bundled ptxas (no GPU needed). Runs tests/_triton_gate.py in a subprocess without
TRITON_INTERPRET (conftest sets it for the interpreter tests). Fails on any compile error and on
any spill beyond the per-variant allow-list (tests/_known_spills.py); prints a regs/spills/smem table
per variant and per variant family (`python tools/gpu_resources.py` prints it as Markdown)."""
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_triton_kernels_compile_for_sm90_sm80(tmp_path):
    pytest.importorskip("triton")
    from _triton_gate import KNOWN_SPILLS, family_table, run

    recs = run("90,80", cache_dir=tmp_path / "cache")
    print(f"\n{'kernel':28s} {'cc':>3s} {'regs':>5s} {'spill':>6s} {'allow':>6s} {'smem':>7s} {'i32off':>6s}  variant")
    for r in recs:
        if r["ok"]:
            print(f"{r['kernel']:28s} {r['cc']:3d} {r['regs']:5d} {r['spills']:6d} {r['allowed_spills']:6d} "
                  f"{r['smem']:7d} {len(r['i32_offsets']):6d}  {r['key']}")
        else:
            print(f"{r['kernel']:28s} {r['cc']:3d} FAILED  {r['key']}")
    print("\nper variant family (offline compile, Triton's ptxas; ranges over the variants compiled):")
    print("\n".join(family_table(recs)))
    kernels = {r["kernel"] for r in recs}
    # every @triton.jit kernel in kernels/*.py, counted from the sources so a new kernel is covered
    # (launchable kernels are named *_kernel; the other @triton.jit functions are device helpers)
    declared = {f"{p.stem}.{m}" for p in (ROOT / "kernels").glob("*.py")
                for m in re.findall(r"@triton\.jit\s+def (\w+_kernel)\(", p.read_text())}
    assert kernels == declared, sorted(declared ^ kernels)
    bad = [f"{r['kernel']} sm_{r['cc']} {r['variant']}: {r['error']}" for r in recs if not r["ok"]]
    assert not bad, "compile errors:\n" + "\n".join(bad[:10])
    # spills are allowed per variant (kernel + arch + dtype + JIT spec + constexprs, tests/_known_spills.py), up to
    # the bytes listed: a new spill anywhere, or a larger one in a listed variant, fails
    spill = [f"{r['kernel']} {r['key']}: {r['spills']} B (allowed {r['allowed_spills']})" for r in recs
             if r["spills"] > r["allowed_spills"]]
    assert not spill, "spills beyond tests/_known_spills.py:\n" + "\n".join(spill)
    assert set(KNOWN_SPILLS) <= declared, sorted(set(KNOWN_SPILLS) - declared)   # no entry for a gone kernel
    shrink = [f"{r['kernel']} {r['key']}: {r['spills']} B < allowed {r['allowed_spills']}" for r in recs
              if r["spills"] < r["allowed_spills"]]
    if shrink:
        print("allow-list entries larger than this compile needs (shrink them):\n" + "\n".join(shrink))
    # maxsim's launcher (and the argmax forward's, which reuses it) picks its tiles by this shared-memory bound (so they fit sm_86/sm_89's 99 KB):
    # it must hold for every config compiled
    from vkern.kernels import maxsim

    over = []
    for r in recs:
        if r["kernel"] in ("maxsim._maxsim_kernel", "maxsim_grad._maxsim_argmax_kernel") and r["ok"]:
            v = json.loads(r["variant"])
            bound = maxsim._smem_bytes(v, 4 if v["queries_ptr"] == "fp32" else 2)
            if r["smem"] > bound:
                over.append(f"sm_{r['cc']} {r['variant']}: {r['smem']} B > bound {bound} B")
    assert not over, "maxsim shared memory above maxsim._smem_bytes:\n" + "\n".join(over)
    # 32-bit pointer offsets (a product of two runtime values, e.g. program id x T x D, in i32) wrap
    # once a tensor has 2**31 elements: every kernel widens such products to int64
    narrow = sorted({f"{r['kernel']}: {w}" for r in recs if r["ok"] for w in r["i32_offsets"]})
    assert not narrow, "pointer offsets computed in int32:\n" + "\n".join(narrow)


# The value_l1 kernel as it was (rows = program_id * BLOCK_R + arange, then rows * D in int32), cut down
# to the lines the check reads: the check must find the product, and not flag products with a constant.
_NARROW_TTIR = """
#loc5 = loc("/x/kernels/vatp.py":159:33)
#loc40 = loc("x"(#loc5))
    %rows = arith.constant 32 : i32 loc(#loc3)
    %rows_0 = tt.get_program_id x : i32 loc(#loc3)
    %rows_1 = arith.muli %rows_0, %rows : i32 loc(#loc3)
    %rows_2 = tt.make_range {end = 32 : i32, start = 0 : i32} : tensor<32xi32> loc(#loc3)
    %rows_3 = tt.splat %rows_1 : i32 -> tensor<32xi32> loc(#loc3)
    %rows_4 = arith.addi %rows_3, %rows_2 : tensor<32xi32> loc(#loc3)
    %x_17 = tt.expand_dims %rows_4 {axis = 1 : i32} : tensor<32xi32> -> tensor<32x1xi32> loc(#loc40)
    %x_18 = tt.splat %D : i32 -> tensor<32x1xi32> loc(#loc40)
    %x_19 = arith.muli %x_17, %x_18 : tensor<32x1xi32> loc(#loc40)
    %x_20 = tt.splat %v_ptr : !tt.ptr<f16> -> tensor<32x1x!tt.ptr<f16>> loc(#loc40)
    %x_21 = tt.addptr %x_20, %x_19 : tensor<32x1x!tt.ptr<f16>>, tensor<32x1xi32> loc(#loc40)
    %ok = tt.addptr %x_20, %x_17 : tensor<32x1x!tt.ptr<f16>>, tensor<32x1xi32> loc(#loc40)
"""


def test_i32_offset_check_finds_a_narrow_product():
    from _triton_gate import i32_products

    assert i32_products(_NARROW_TTIR) == ["vatp.py:159"]
    widened = _NARROW_TTIR.replace("%x_21 = tt.addptr %x_20, %x_19", "%x_21 = tt.addptr %x_20, %x_17")
    assert i32_products(widened) == []
