"""Offline Triton compile gate (run by tests/test_gpu_compile.py in a subprocess WITHOUT
TRITON_INTERPRET, so the kernels are real JIT functions). No GPU needed: Triton's compiler
and its bundled ptxas build a cubin for GPUTarget("cuda", cc, 32).

The variants come from the launchers' own tile constants and helpers (kernels.<op>._pow2,
maxsim._launch_config, vatp._dot_mode logic, taskvec._BLOCK/_DOT) over the shapes a user can pass,
plus the JIT specialisations (pointers 16-divisible always; int args == 1 become constexpr 1, or int args
16-divisible: the JIT marks D = 128, T = 4096, ... so, and that changes vector widths, pipelining and
shared memory). Every kernel's TTIR is also scanned for pointer offsets computed in 32 bits.
Prints one JSON line per compile: {"kernel", "variant", "key", "cc", "dtype", "spec", "num_warps", "ok", "regs",
"spills", "allowed_spills", "smem", "i32_offsets", "error"}. Spills are allowed per variant only, up to the bytes
tests/_known_spills.py lists for it (kernel + arch + dtype + JIT spec + constexprs); any other spill fails.
"""
import contextlib
import io
import itertools
import json
import os
import re
import sys
from concurrent.futures import ProcessPoolExecutor


DT = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
FLOAT_ARGS = {"scale", "qscale"}
DIV16_ENV = os.environ.get("VKERN_GATE_DIV16", "0") == "1"   # every int argument 16-divisible (experiments)


def _variants():
    import torch

    from kernels import loki, maxsim, maxsim_grad, maxsim_int8, muvera, taskvec, vatp  # noqa: F401
    out = []  # (module, kernel name, {arg: type}, {constexpr: value, num_warps})

    def add(mod, name, types, consts):
        out.append((mod, name, types, consts))

    # ---- loki: D in the head dims a model can have, rank <= D, dtypes of q/k/v
    for dt in DT:
        t = DT[dt]
        for D in (64, 128, 256):
            DP = loki._pow2(max(D, 16))
            for hpl in (1, 2, 4, 8):
                for rank in (16, 32, D):
                    add("loki", "_approx_kernel", {"q_ptr": t, "k_ptr": t, "lens_ptr": "i64", "scores_ptr": "fp32"},
                        dict(HEADS_PER_LIST=hpl, G_PAD=loki._pow2(hpl), R_PAD=loki._pow2(max(rank, 16)),
                             BLOCK_T=loki._BLOCK_T))
                for dense, nsplit in ((True, 1), (False, 1), (False, 2), (False, loki._MAX_SPLITS)):
                    if dense and hpl > 1:
                        continue
                    add("loki", "_attend_kernel", {"q_ptr": t, "k_ptr": t, "v_ptr": t, "lens_ptr": "i64",
                                                   "budgets_ptr": "i64", "idx_ptr": "i32", "ws_ptr": "fp32",
                                                   "count_ptr": "i32", "out_ptr": "fp32"},
                        dict(HEADS_PER_LIST=hpl, DENSE=dense, NSPLIT=nsplit, D_PAD=DP, BLOCK_N=loki._BLOCK_N))
            add("loki", "_rotate_kernel", {"x_ptr": t, "p_ptr": "fp32", "out_ptr": "fp32"}, loki._rotate_tiles(D))
    add("loki", "_select_kernel", {"scores_ptr": "fp32", "lens_ptr": "i64", "budgets_ptr": "i64", "idx_ptr": "i32"},
        dict(BLOCK=loki._SELECT_BLOCK))
    # ---- vatp
    for dt in DT:
        t = DT[dt]
        upcast, prec = (False, "ieee") if dt == "float32" else (False, "tf32")
        for D in (64, 128, 256):
            for causal in (False, True):
                for k in ("_rowstats_kernel", "_colsum_kernel"):
                    types = {"q_ptr": t, "k_ptr": t, "lens_ptr": "i64", "stats_ptr": "fp32", "out_ptr": "fp32"}
                    add("vatp", k, types, dict(CAUSAL=causal, BLOCK_N=vatp._BLOCK_N, UPCAST=upcast, PRECISION=prec,
                                               **vatp._score_tiles(getattr(torch, dt), D,
                                                                   colsum=k == "_colsum_kernel")))
            BDc = min(vatp._pow2(D), 128)
            add("vatp", "_value_l1_kernel", {"v_ptr": t, "out_ptr": "fp32"}, dict(BLOCK_R=vatp._BLOCK_ROWS, BLOCK_D=BDc))
            add("vatp", "_gather_kernel", {"src_ptr": t, "dst_ptr": t, "idx_ptr": "i64"}, vatp._gather_tiles(D))
            add("vatp", "_compact_kernel", {"buf_ptr": t, "idx_ptr": "i64"}, dict(BLOCK_R=vatp._BLOCK_ROWS, BLOCK_D=BDc))
    add("vatp", "_select_kernel", {"scores_ptr": "fp32", "lens_ptr": "i64", "kept_ptr": "i64", "idx_ptr": "i64"},
        dict(BLOCK=1024))
    # ---- taskvec
    pools = {"codes": "u8", "scales": "fp32", "zeros": "u8", "meta": "i64", "coef": "fp32", "task_start": "i32",
             "task_coef": "fp32", "thr": "fp32", "cut": "i64", "ids": "i64"}
    for dt in DT:
        t = DT[dt]
        for method, trim in itertools.product((0, 1), (False, True)):
            add("taskvec", "_apply_kernel", dict(pools, base=t, out=t),
                dict(METHOD=method, TRIM=trim, BLOCK_N=taskvec._BLOCK[0], BLOCK_K=taskvec._BLOCK[1]))
        for merged in (False, True):
            add("taskvec", "_delta_kernel", dict(pools, x=t, base=t, y="fp32"),
                dict(MERGED=merged, BLOCK_M=taskvec._DOT[0], BLOCK_N=taskvec._DOT[1], BLOCK_K=taskvec._DOT[2]))
    add("taskvec", "_dequant_kernel", dict(pools, out="fp32"), dict(BLOCK_N=taskvec._BLOCK[0], BLOCK_K=taskvec._BLOCK[1]))
    # ---- maxsim: every config _launch_config returns over batch x Lq x D
    seen = set()
    for dt in DT:
        es = 4 if dt == "float32" else 2
        # whole-D configs (sm_80/sm_90) and the D-looped ones chosen under a 99 KB limit (sm_86/sm_89)
        for B, Lq, D, smem in itertools.product((1, 2, 8, 64), (1, 8, 32, 128, 512), (32, 64, 96, 128, 256, 768),
                                                (None, 99 * 1024)):
            cfg = maxsim._launch_config(B, Lq, D, es, smem)
            key = (dt, tuple(sorted(cfg.items())))
            if key in seen:
                continue
            seen.add(key)
            nw = cfg.pop("num_warps")
            t = DT[dt]
            add("maxsim", "_maxsim_kernel", {"queries_ptr": t, "query_lengths_ptr": "i32", "docs_ptr": t,
                                             "doc_offsets_ptr": "i64", "scores_ptr": "fp32"},
                dict(cfg, UPCAST_TO_FP32=False, INPUT_PRECISION="ieee" if dt == "float32" else "tf32",
                     NAN_BY_FLAG=False, num_warps=nw))
            # the argmax forward reuses maxsim's launch config (kernels/maxsim_grad.py), with and without a mask
            for has_mask in (False, True):
                add("maxsim_grad", "_maxsim_argmax_kernel",
                    {"queries_ptr": t, "query_lengths_ptr": "i32", "docs_ptr": t, "doc_starts_ptr": "i64",
                     "doc_lens_ptr": "i64", "mask_ptr": "u8", "scores_ptr": "fp32", "argmax_ptr": "i32"},
                    dict(cfg, UPCAST_TO_FP32=False, INPUT_PRECISION="ieee" if dt == "float32" else "tf32",
                         HAS_MASK=has_mask, num_warps=nw))
    # ---- maxsim backward: the D blocks its launcher picks
    for dt in DT:
        t = DT[dt]
        for D in (32, 64, 96, 128, 256, 768):
            bd = maxsim_grad._block_d(D)
            add("maxsim_grad", "_grad_q_kernel", {"grad_ptr": "fp32", "argmax_ptr": "i32", "docs_ptr": t,
                                                 "doc_starts_ptr": "i64", "grad_q_ptr": "fp32"},
                dict(BLOCK_N=maxsim_grad._BLOCK_N, BLOCK_D=bd))
            add("maxsim_grad", "_grad_d_kernel", {"grad_ptr": "fp32", "argmax_ptr": "i32", "queries_ptr": t,
                                                 "doc_starts_ptr": "i64", "grad_d_ptr": "fp32"},
                dict(DOCS_PER_PROGRAM=maxsim_grad._DOCS_PER_PROGRAM, BLOCK_I=maxsim_grad._BLOCK_I, BLOCK_D=bd))
    # ---- maxsim_int8: every config launch_config returns over batch x Lq x D
    seen8 = set()
    for B, Lq, D in itertools.product((1, 2, 8, 64), (1, 8, 32, 128, 512), (32, 64, 96, 128, 256, 384, 768)):
        cfg = maxsim_int8.launch_config(B, Lq, D)
        key = tuple(sorted(cfg.items()))
        if key in seen8:
            continue
        seen8.add(key)
        nw = cfg.pop("num_warps")
        add("maxsim_int8", "_maxsim_int8_kernel", {"q_codes_ptr": "i8", "q_scales_ptr": "fp32",
                                                   "query_lengths_ptr": "i32", "codes_ptr": "i8",
                                                   "doc_scales_ptr": "fp32", "doc_offsets_ptr": "i64",
                                                   "scores_ptr": "fp32"}, dict(cfg, num_warps=nw))
    # ---- muvera: the launcher's tiles over k (partitions 2^k) x projected dims x the flags
    seen_mv = set()
    for k, dp in itertools.product((0, 3, 5, 8, 16), (8, 16, 64, 128)):
        for ams in (False, True):
            sc = muvera.sketch_config(k, dp)
            if not ams:
                sc["BLOCK_DP"] = 16
            if ("sketch", ams, tuple(sorted(sc.items()))) in seen_mv:
                continue
            seen_mv.add(("sketch", ams, tuple(sorted(sc.items()))))
            add("muvera", "_sketch_kernel", {"x_ptr": "fp32", "simhash_ptr": "fp32",
                                             "ams_index_ptr": "i64" if ams else "fp32", "ams_sign_ptr": "fp32",
                                             "bits_ptr": "i32", "proj_ptr": "fp32" if ams else "i32"},
                dict(sc, HAS_AMS=ams))
        ac = muvera.accumulate_config(k, dp)
        if ("acc", tuple(sorted(ac.items()))) in seen_mv:
            continue
        seen_mv.add(("acc", tuple(sorted(ac.items()))))
        for average, fill, f64 in ((True, True, False), (False, False, False), (True, True, True),
                                   (True, False, True)):
            add("muvera", "_accumulate_kernel", {"bits_ptr": "i32", "src_ptr": "fp32", "offsets_ptr": "i64",
                                                 "out_ptr": "fp64" if f64 else "fp32"},
                dict(ac, AVERAGE=average, FILL=fill, OUT_F64=f64))
    add("muvera", "_final_kernel", {"raw_ptr": "fp64", "order_ptr": "i64", "starts_ptr": "i64", "sign_ptr": "fp32",
                                    "out_ptr": "fp32"}, dict(BLOCK_J=muvera._BLOCK_J))
    return out


from _known_spills import KNOWN_SPILLS  # noqa: E402  (per variant: kernel, arch, dtype, JIT spec, constexprs)


_DEF = re.compile(r"^\s*(%[\w.]+)(?::\d+)? = ([\w.\"]+)\s*(.*)$")
_USE = re.compile(r"%[\w.]+")
_LOC_FILE = re.compile(r'^#(loc\d*) = loc\("([^"]+)":(\d+):\d+\)')
_LOC_REF = re.compile(r"^#(loc\d*) = loc\((.*)\)$")
_PASS_THROUGH = ("tt.splat", "tt.broadcast", "tt.expand_dims", "tt.reshape", "tt.trans", "arith.addi", "arith.subi",
                 "arith.select", "arith.minsi", "arith.maxsi", "arith.remsi", "arith.divsi")


def i32_products(ttir):
    """Pointer offsets computed in 32 bits: a list of "file:line" for every tt.addptr whose offset is
    i32 and comes from an i32 arith.muli of two non-constant values (a program id times a size, a row
    index times D, ...). Such a product wraps once the tensor has 2**31 elements; the fix is to widen
    one factor with .to(tl.int64) first. Products with a constant (pid * BLOCK) are not counted: the
    product is then widened, or checked, where it meets the next runtime factor."""
    defs, locs, files = {}, {}, {}
    for line in ttir.splitlines():
        m = _LOC_FILE.match(line)
        if m:
            files[m.group(1)] = f"{os.path.basename(m.group(2))}:{m.group(3)}"
            continue
        m = _LOC_REF.match(line)
        if m:
            locs[m.group(1)] = re.findall(r"#(loc\d*)", m.group(2))
            continue
        m = _DEF.match(line)
        if m:
            name, opname, rest = m.groups()
            loc = re.search(r"\s*loc\(#(loc\d*)\)\s*$", rest)
            if loc:
                rest = rest[:loc.start()]
            body, _, typ = rest.rpartition(" : ")
            defs[name] = (opname.strip('"'), _USE.findall(body), typ.strip(), loc.group(1) if loc else None)

    def where(loc, depth=0):
        if loc is None or depth > 20:
            return "?"
        if loc in files:
            return files[loc]
        for ref in locs.get(loc, []):
            w = where(ref, depth + 1)
            if w != "?":
                return w
        return "?"

    def constant(v, depth=0):
        d = defs.get(v)
        if d is None or depth > 20:
            return False
        if d[0] == "arith.constant":
            return True
        return d[0] in ("tt.splat", "tt.broadcast", "tt.expand_dims") and constant(d[1][0], depth + 1)

    def bad_mul(v, seen):
        if v in seen:
            return None
        seen.add(v)
        d = defs.get(v)
        if d is None:
            return None
        opname, operands, typ, loc = d
        if "i32" not in typ.split("->")[-1]:
            return None
        if opname == "arith.muli" and not any(constant(o) for o in operands):
            return where(loc)
        if opname in _PASS_THROUGH or opname == "arith.muli":
            for o in operands:
                w = bad_mul(o, seen)
                if w:
                    return w
        return None

    found = []
    for name, (opname, operands, typ, loc) in defs.items():
        if opname == "tt.addptr" and len(operands) == 2 and typ.split(",")[-1].strip().endswith(("i32", "i32>")):
            w = bad_mul(operands[1], set())
            if w and w not in found:
                found.append(w)
    return found


DATA_ARGS = ("q_ptr", "x", "base", "src_ptr", "v_ptr", "buf_ptr", "queries_ptr", "x_ptr", "docs_ptr", "q_codes_ptr",
             "raw_ptr", "scores_ptr", "out")


def variant_key(cc, dtype, spec, consts) -> str:
    """One compiled variant, as KNOWN_SPILLS names it: "sm_90 fp32 div16 BLOCK_D=128 ... num_warps=8"."""
    return f"sm_{cc} {dtype} {spec} " + " ".join(f"{k}={v}" for k, v in sorted(consts.items()))


def allowed_spill(kernel, key) -> int:
    """Spill bytes the allow-list tolerates for this variant (0 unless it is listed)."""
    return KNOWN_SPILLS.get(kernel, {}).get("variants", {}).get(key, 0)


def _one(job):
    mod, name, types, consts, cc, spec = job
    ones, div16 = spec == "ones", spec == "div16" or DIV16_ENV
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    fn = getattr(importlib.import_module(f"kernels.{mod}"), name)
    consts = dict(consts)
    key_consts = dict(consts, num_warps=consts.get("num_warps", 4))
    num_warps = consts.pop("num_warps", 4)
    sig, cx, attrs = {}, {}, {}
    for i, a in enumerate(fn.arg_names):
        if a in consts:
            sig[a] = "constexpr"
            cx[a] = consts[a]
        elif a in types:
            sig[a] = "*" + types[a]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif a in FLOAT_ARGS:
            sig[a] = "fp32"
        elif ones:  # the JIT makes int args equal to 1 constexpr
            sig[a] = "constexpr"
            cx[a] = 1
        else:
            sig[a] = "i32"
            if div16:   # the JIT marks int arguments that are multiples of 16 (D = 128, T = 4096, strides)
                attrs[(i,)] = [["tt.divisibility", 16]]
    rec = dict(kernel=f"{mod}.{name}", variant=json.dumps({**consts, **{k: v for k, v in types.items()
                                                                      if k in ("q_ptr", "x", "base", "src_ptr",
                                                                               "v_ptr", "buf_ptr", "queries_ptr",
                                                                               "x_ptr", "docs_ptr")}, "spec": spec or "plain"}),
               cc=cc)
    dtype = next(types[a] for a in DATA_ARGS if a in types)
    rec.update(dtype=dtype, spec=spec or "plain", num_warps=num_warps,
               key=variant_key(cc, dtype, spec or "plain", key_consts))
    rec["allowed_spills"] = allowed_spill(rec["kernel"], rec["key"])
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            k = triton.compile(triton.compiler.ASTSource(fn, signature=sig, constexprs=cx, attrs=attrs),
                               target=GPUTarget("cuda", cc, 32), options=dict(num_warps=num_warps))
        log = buf.getvalue()
        regs = re.search(r"Used (\d+) registers", log)
        spills = [int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", log)]
        rec.update(ok=True, regs=int(regs.group(1)) if regs else -1, spills=max(spills or [0]),
                   smem=int(k.metadata.shared), i32_offsets=i32_products(k.asm["ttir"]))
    except Exception as exc:  # noqa: BLE001
        rec.update(ok=False, error=f"{type(exc).__name__}: {str(exc)[-600:]}")
    return rec


def run(ccs="90,80", cache_dir=None, stride=None, timeout=900):
    """Runs this gate in a subprocess (without TRITON_INTERPRET) and returns its records."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if cache_dir is not None:
        env["TRITON_CACHE_DIR"] = str(cache_dir)
    if stride is not None:
        env["VKERN_GATE_STRIDE"] = str(stride)
    env["PYTHONPATH"] = os.pathsep.join([str(root), str(root / "tests"), env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, str(root / "tests" / "_triton_gate.py"), ccs], cwd=root, env=env,
                          capture_output=True, text=True, timeout=timeout)
    recs = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not recs:
        raise RuntimeError(f"the Triton gate failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return recs


def _span(values):
    lo, hi = min(values), max(values)
    return f"{lo}" if lo == hi else f"{lo}-{hi}"


def family_table(recs, markdown=False):
    """Lines of a registers / spills / shared-memory table per kernel variant family (kernel x dtype)
    and target: ranges over the family's compiled variants; spills as "max (allowed max)"."""
    fams = {}
    for r in recs:
        if r.get("ok"):
            fams.setdefault((r["kernel"], r["dtype"], r["cc"]), []).append(r)
    head = ("kernel", "dtype", "sm", "variants", "regs", "spill B (allowed)", "smem B")
    rows = []
    for (kernel, dtype, cc), rs in sorted(fams.items(), key=lambda x: (x[0][0], x[0][1], -x[0][2])):
        spill, allowed = max(r["spills"] for r in rs), max(r["allowed_spills"] for r in rs)
        rows.append((kernel, dtype, str(cc), str(len(rs)), _span([r["regs"] for r in rs]),
                     f"{spill} ({allowed})" if allowed else str(spill), _span([r["smem"] for r in rs])))
    if markdown:
        return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]
    widths = [max(len(x[i]) for x in rows + [head]) for i in range(len(head))]
    return [" ".join(x[i].rjust(widths[i]) if i >= 2 else x[i].ljust(widths[i]) for i in range(len(head)))
            for x in [head] + rows]


def main():
    ccs = [int(c) for c in (sys.argv[1] if len(sys.argv) > 1 else "90,80").split(",")]
    # Sample to fit CI time: always the first variant of every (kernel, dtype) at every target, plain and
    # with the JIT's 16-divisible int specialisation, and with the ==1 one; then every STRIDE-th other
    # variant at the first target, alternately plain and 16-divisible (VKERN_GATE_STRIDE=1: all, both).
    stride = int(os.environ.get("VKERN_GATE_STRIDE", "6"))
    # VKERN_GATE_ONLY=maxsim_int8,muvera: only those kernel modules (to measure a new kernel's variants)
    only = set(filter(None, os.environ.get("VKERN_GATE_ONLY", "").split(",")))
    jobs, seen = [], set()
    for i, v in enumerate(_variants()):
        if only and v[0] not in only:
            continue
        fam = (v[0], v[1], tuple(sorted(set(v[2].values()))))
        if fam not in seen:
            seen.add(fam)
            jobs += [v + (cc, spec) for cc in ccs for spec in ("", "div16")] + [v + (ccs[0], "ones")]
        elif stride == 1:
            jobs += [v + (ccs[0], ""), v + (ccs[0], "div16")]
        elif i % stride in (0, stride // 2):
            jobs.append(v + (ccs[0], "" if i % stride == 0 else "div16"))
    with ProcessPoolExecutor(int(os.environ.get("VKERN_GATE_JOBS", "2"))) as ex:
        for rec in ex.map(_one, jobs, chunksize=4):
            print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    # before any kernel module is imported (the pool's forked workers inherit it); not at import, so a
    # test importing i32_products keeps its interpreter setting
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    main()
