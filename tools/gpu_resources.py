"""Registers / spills / shared memory per GPU kernel variant family, sm_90 and sm_80, as Markdown: the
Triton kernels through the offline compile gate (tests/_triton_gate.py: Triton's compiler and bundled
ptxas, no GPU needed) and the CUDA kernels through `nvcc -cubin -Xptxas -v` (as tests/test_cuda_compile.py).

    python tools/gpu_resources.py                 # the CI sample of Triton variants (VKERN_GATE_STRIDE=6) per target
    python tools/gpu_resources.py --stride 1      # every variant (slow: ~1,000 compiles)
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def cuda_table(out_dir: Path):
    """Markdown lines for every CUDA kernel (file, kernel, sm): regs, spills, static smem, block size."""
    import shutil
    from concurrent.futures import ThreadPoolExecutor

    import test_cuda_compile as cc

    if shutil.which("nvcc") is None:
        return ["(nvcc is not on PATH: no CUDA table)"]
    jobs = [(src, arch) for src in sorted(cc.CUDA.glob("*.cu")) for arch in cc.ARCHS]
    with ThreadPoolExecutor(2) as ex:
        logs = list(ex.map(lambda j: (j[0], cc._compile(j[0], j[1], out_dir)), jobs))
    fams = {}
    for src, log in logs:
        text = src.read_text()
        sizes = cc.block_sizes(text)
        names = set(sizes) | cc.bounded_kernels(text)
        for r in cc.parse_ptxas(log):
            name = cc._short(r["entry"], names) or r["entry"]
            fams.setdefault((src.name, name, r["arch"]), []).append((r, sizes.get(name, cc.MAX_THREADS)))
    lines = ["| file | kernel | sm | instantiations | regs | spill B | static smem B | threads/block |",
             "|---|---|---|---|---|---|---|---|"]
    for (f, name, arch), rs in sorted(fams.items(), key=lambda x: (x[0][0], x[0][1], -x[0][2])):
        regs = sorted({r["regs"] for r, _ in rs})
        smem = sorted({r["smem"] for r, _ in rs})
        span = lambda v: f"{v[0]}" if len(v) == 1 else f"{v[0]}-{v[-1]}"  # noqa: E731
        lines.append(f"| {f} | {name} | {arch} | {len(rs)} | {span(regs)} | {max(r['spills'] for r, _ in rs)} | "
                     f"{span(smem)} | {max(t for _, t in rs)} |")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stride", type=int, default=None, help="VKERN_GATE_STRIDE for the Triton sample (1: all)")
    ap.add_argument("--no-cuda", action="store_true", help="skip the nvcc part")
    args = ap.parse_args(argv)
    from _triton_gate import family_table, run

    with tempfile.TemporaryDirectory() as tmp:
        # the gate samples every STRIDE-th variant at its first target: run it once with each target first
        recs = [r for first, other in ((90, 80), (80, 90))
                for r in run(f"{first},{other}", cache_dir=Path(tmp) / f"cache{first}", stride=args.stride,
                             timeout=3600) if r["cc"] == first]
        n = len(recs)
        print(f"### Triton kernels ({n} compiles, offline: Triton's compiler + bundled ptxas, no GPU)\n")
        print("Ranges over the variants compiled per family (dtype x constexprs x JIT specialisations);")
        print("spills as measured (allow-listed maximum, tests/_known_spills.py).\n")
        print("\n".join(family_table(recs, markdown=True)))
        if not args.no_cuda:
            print("\n### CUDA kernels (offline: nvcc -cubin -Xptxas -v, no GPU)\n")
            print("\n".join(cuda_table(Path(tmp))))
    bad = [r for r in recs if not r.get("ok")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
