"""Command line: ``python -m vkern info`` and ``python -m vkern bench``."""
from __future__ import annotations

import argparse
import json
import os
import sys

# The ops `bench --ops` takes (the keys of vkern.bench.WORKLOADS; a test keeps the two equal).
BENCH_OPS = ("maxsim", "loki", "vatp", "taskvec", "retrieval")


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
                         help=f"comma-separated ops to run, from: {', '.join(BENCH_OPS)} (default: all)")
    p_bench.add_argument("--repeat", type=int, default=None, help="timed repetitions per contender")
    args = parser.parse_args(argv)

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
