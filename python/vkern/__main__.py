"""Command line: ``python -m vkern info|bench|merge|taskvec``."""
from __future__ import annotations

import argparse
import json
import os
import sys

# The ops `bench --ops` takes (the keys of vkern.bench.WORKLOADS; a test keeps the two equal).
BENCH_OPS = ("maxsim", "loki", "vatp", "taskvec", "retrieval", "generate")


def _ops_arg(text: str) -> str:
    ops = [o.strip() for o in text.split(",") if o.strip()]
    if ops == ["all"]:
        return "all"
    bad = [o for o in ops if o not in BENCH_OPS]
    if bad or not ops:
        raise argparse.ArgumentTypeError(
            f"unknown op(s) {', '.join(bad) or repr(text)}; choose from all, {', '.join(BENCH_OPS)}")
    return ",".join(ops)


def _prog() -> str:
    """`vkern` when run as the console script, `python -m vkern` when run as a module."""
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if not name or name in ("__main__.py", "-c", "-m") or name.startswith("python"):
        return "python -m vkern"
    return name


def main(argv=None, prog=None) -> int:
    parser = argparse.ArgumentParser(prog=prog or _prog(), description="vkern: fast vector kernels")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_info = sub.add_parser("info", help="what was built and what can run here")
    p_info.add_argument("--json", action="store_true", help="print JSON")
    p_bench = sub.add_parser("bench", help="time every backend, the NumPy reference and installed peers")
    p_bench.add_argument("--quick", action="store_true", help="smaller workloads, finishes in about a minute")
    p_bench.add_argument("--tiny", action="store_true",
                         help="the smallest workloads (seconds): checks that every row runs, measures nothing useful")
    p_bench.add_argument("--json", metavar="PATH", help="save the results as JSON")
    p_bench.add_argument("--plot", metavar="PATH", help="write a PNG bar chart (needs matplotlib)")
    p_bench.add_argument("--threads", type=int, default=2, help="CPU threads for every contender (default 2)")
    p_bench.add_argument("--ops", default="all", type=_ops_arg, metavar="OPS",
                         help=f"comma-separated ops to run, from: {', '.join(BENCH_OPS)} (default: all but the opt-in generate)")
    p_bench.add_argument("--repeat", type=int, default=None, help="timed repetitions per contender")
    p_merge = sub.add_parser("merge", help="merge safetensors checkpoints from a mergekit-style YAML recipe")
    p_merge.add_argument("recipe", metavar="RECIPE.yml")
    p_merge.add_argument("outdir", metavar="OUTDIR")
    p_merge.add_argument("--max-shard-size", default="5GB", help="largest output shard (default 5GB)")
    p_merge.add_argument("--seed", type=int, default=0, help="seed of the DARE drop masks (default 0)")
    p_merge.add_argument("--overwrite", action="store_true", help="replace safetensors already in OUTDIR")
    p_merge.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p_tv = sub.add_parser("taskvec", help="quantized task-vector stores")
    tv_sub = p_tv.add_subparsers(dest="tv_cmd", required=True)
    p_comp = tv_sub.add_parser("compress", help="quantize fine-tunes against a base into one store file")
    p_comp.add_argument("--base", required=True, help="base checkpoint (directory or .safetensors)")
    p_comp.add_argument("--finetuned", required=True, nargs="+", metavar="F",
                        help="fine-tuned checkpoints; NAME=PATH names the task (default: the directory name)")
    p_comp.add_argument("--bits", type=int, choices=(2, 3, 4, 8), default=4,
                        help="bits per element (the offsets' bits with --residual; default 4)")
    p_comp.add_argument("--group", default="128", help="group size along each row: 32, 64, 128 (default), "
                        "'row' or 'tensor' (one scale per tensor, as TVQ)")
    p_comp.add_argument("--residual", action="store_true",
                        help="RTVQ: one shared base vector (--base-bits) plus a --bits offset per fine-tune")
    p_comp.add_argument("--base-bits", type=int, choices=(2, 3, 4, 8), default=None,
                        help="bits of the shared RTVQ base vector (default: --bits + 1)")
    p_comp.add_argument("--budget", type=float, default=None, metavar="BITS",
                        help="TVQ bit allocation: average bits per element over all tensors (2..8); "
                             "overrides --bits per tensor")
    p_comp.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p_comp.add_argument("out", metavar="OUT", nargs="?", help="the store file to write (.safetensors)")
    args = parser.parse_args(argv)
    if args.cmd == "taskvec" and args.out is None:
        # `--finetuned A B OUT`: nargs="+" took OUT too; the last value is the store
        if len(args.finetuned) < 2:
            p_comp.error("the following arguments are required: OUT")
        args.out = args.finetuned.pop()

    if args.cmd == "merge":
        from vkern.merge import main as merge_main

        return merge_main(args)
    if args.cmd == "taskvec":
        from vkern.taskvec_store import main as store_main

        return store_main(args)

    if args.cmd == "info":
        import vkern
        from vkern._info import render

        info = vkern.info()
        print(json.dumps(info, indent=2) if args.json else render(info))
        return 0
    from vkern.bench import run

    return run(args)


if __name__ == "__main__":
    sys.exit(main())
