"""CUDA compile gate, no GPU needed: every kernel in csrc/cuda/*.cu is compiled to a cubin for sm_80
and sm_90 with `nvcc -Xptxas -v` (device code only, the build's flags), and ptxas's report must show
no spills, static shared memory within the 48 KiB that needs no opt-in (no launcher makes one), and
registers x threads per block within an SM's 65,536 registers for the block size the launcher uses.
Prints a regs / spills / smem table. Skips only when nvcc is absent."""
import re
import shutil
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CUDA = ROOT / "csrc" / "cuda"
ARCHS = (80, 90)
REGS_PER_SM = 65536
STATIC_SMEM_MAX = 48 * 1024
MAX_THREADS = 1024

_ENTRY = re.compile(r"Compiling entry function '(\w+)' for 'sm_(\d+)'")
_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def _compile(src: Path, arch: int, out: Path) -> str:
    cmd = ["nvcc", "-cubin", f"-arch=sm_{arch}", "-O3", "--expt-relaxed-constexpr", "-std=c++17", "-Xptxas", "-v",
           f"-I{CUDA}", f"-I{CUDA.parent}", "-o", str(out / f"{src.stem}_sm{arch}.cubin"), str(src)]
    # Without the sanitizer preload (tools/sanitize.sh sets LD_PRELOAD=libasan): nvcc is not built for it and
    # crashes with it (a segfault), and nothing of vkern runs in nvcc.
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stderr[-3000:]}"
    return proc.stderr + proc.stdout


def parse_ptxas(log: str):
    """[{entry, arch, regs, smem, stack, spills}] from an `-Xptxas -v` log."""
    out, cur = [], None
    for line in log.splitlines():
        m = _ENTRY.search(line)
        if m:
            cur = dict(entry=m.group(1), arch=int(m.group(2)), regs=0, smem=0, stack=0, spills=0)
            out.append(cur)
            continue
        if cur is None:
            continue
        m = _SPILL.search(line)
        if m:
            cur["stack"], cur["spills"] = int(m.group(1)), max(int(m.group(2)), int(m.group(3)))
            continue
        m = _USED.search(line)
        if m:
            cur["regs"], cur["smem"] = int(m.group(1)), int(m.group(2) or 0)
    return out


def _split_args(s: str):
    """Top-level comma-separated arguments of s (brackets nest)."""
    depth, cur, args = 0, "", []
    for ch in s:
        if ch in "([{<" and not (ch == "<" and cur.endswith("<")):
            depth += ch != "<" or bool(re.search(r"\w$", cur))
        elif ch in ")]}>" and depth:
            depth -= 1 if ch != ">" or not cur.endswith("-") else 0
        if ch == "," and depth == 0:
            args.append(cur.strip())
            cur = ""
        else:
            cur += ch
    args.append(cur.strip())
    return args


def block_sizes(src: str):
    """{kernel name: largest threads per block of its launches} read from the launch sites; a size the
    source does not pin down to a constant counts as the hardware maximum (1,024)."""
    consts = {m.group(1): m.group(2) for m in re.finditer(r"\b(?:constexpr|const)\s+int\s+(\w+)\s*=\s*([^;]+);", src)}
    sizes = {}
    for m in re.finditer(r"(\w+)(?:<[^<>]*>)?<<<(.*?)>>>", src, re.S):
        args = _split_args(m.group(2))
        expr = args[1] if len(args) > 1 else ""
        for _ in range(4):   # substitute named constants (they may refer to each other)
            expr = re.sub(r"\b[A-Za-z_]\w*\b", lambda t: f"({consts[t.group(0)]})" if t.group(0) in consts else
                          t.group(0), expr)
        try:
            n = int(eval(expr, {"__builtins__": {}}, {})) if re.fullmatch(r"[\d\s()+*/-]+", expr) else MAX_THREADS
        except Exception:  # noqa: BLE001
            n = MAX_THREADS
        sizes[m.group(1)] = max(sizes.get(m.group(1), 0), n)
    return sizes


def bounded_kernels(src: str):
    """Names of the kernels declared with __launch_bounds__ (ptxas then keeps their registers within
    the declared block size itself)."""
    names = set()
    for m in re.finditer(r"__launch_bounds__\(", src):
        i, depth = m.end(), 1
        while depth:
            depth += {"(": 1, ")": -1}.get(src[i], 0)
            i += 1
        name = re.match(r"\s*(?:\w+\s+)*?(\w+)\s*\(", src[i:])
        if name:
            names.add(name.group(1))
    return names


def _short(mangled: str, names):
    hits = [n for n in names if re.search(rf"\d{n}(?:I|E|P|v)", mangled) or f"{len(n)}{n}" in mangled]
    return max(hits, key=len) if hits else None


def test_parse_ptxas_reads_spills():
    log = ("ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_90'\n"
           "ptxas info    : Function properties for _Z3fooPf\n"
           "    16 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers, 4144 bytes smem, 400 bytes cmem[0]\n")
    assert parse_ptxas(log) == [dict(entry="_Z3fooPf", arch=90, regs=255, smem=4144, stack=16, spills=12)]
    assert block_sizes("constexpr int kW = 4;\nfoo_kernel<<<grid, 32 * kW, 0, s>>>(x);\n"
                       "bar_kernel<<<blocks_for(n, 256), 256, 0, s>>>(y);\nbaz_kernel<<<g, threads>>>(z);") == \
        {"foo_kernel": 128, "bar_kernel": 256, "baz_kernel": MAX_THREADS}
    assert bounded_kernels("__global__ void __launch_bounds__(B / 2 * (C), 512 / (B * C)) simt_kernel(P p) {}\n"
                           "__global__ void plain_kernel(P p) {}") == {"simt_kernel"}


def test_cuda_kernels_compile_without_spills_for_sm80_sm90(tmp_path_factory):
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is not on PATH")
    out = tmp_path_factory.mktemp("cubin")
    sources = sorted(CUDA.glob("*.cu"))
    assert sources
    jobs = [(src, arch) for src in sources for arch in ARCHS]
    with ThreadPoolExecutor(2) as ex:
        logs = list(ex.map(lambda j: (j[0], _compile(j[0], j[1], out)), jobs))
    rows, bad = [], []
    for src, log in logs:
        text = src.read_text()
        sizes = block_sizes(text)
        bounded = bounded_kernels(text)
        for r in parse_ptxas(log):
            name = _short(r["entry"], set(sizes) | bounded) or r["entry"]
            threads = sizes.get(name, MAX_THREADS)
            rows.append((src.name, name, r, threads))
            where = f"{src.name} {name} sm_{r['arch']} ({r['entry']})"
            if r["spills"]:
                bad.append(f"{where}: {r['spills']} bytes spilled")
            if r["smem"] > STATIC_SMEM_MAX:
                bad.append(f"{where}: {r['smem']} bytes static shared memory > 48 KiB (needs an opt-in)")
            if name not in bounded and r["regs"] * threads > REGS_PER_SM:
                bad.append(f"{where}: {r['regs']} registers x {threads} threads > {REGS_PER_SM}")
    print(f"\n{'file':10s} {'kernel':24s} {'sm':>3s} {'regs':>5s} {'spill':>6s} {'smem':>7s} {'block':>6s}")
    for f, name, r, threads in rows:
        print(f"{f:10s} {name[:24]:24s} {r['arch']:3d} {r['regs']:5d} {r['spills']:6d} {r['smem']:7d} {threads:6d}")
    assert {r[2]["arch"] for r in rows} == set(ARCHS)
    assert {f for f, *_ in rows} == {s.name for s in sources}, "a .cu file compiled no kernel"
    assert not bad, "\n".join(bad)
