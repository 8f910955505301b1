"""Command line: ``python -m vkern info`` and ``python -m vkern bench``."""
from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vkern", description="vkern: fast vector kernels")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_info = sub.add_parser("info", help="what was built and what can run here")
    p_info.add_argument("--json", action="store_true", help="print JSON")
    p_bench = sub.add_parser("bench", help="time every backend, the NumPy reference and installed peers")
    p_bench.add_argument("--quick", action="store_true", help="smaller workloads, finishes in under a minute")
    p_bench.add_argument("--json", metavar="PATH", help="save the results as JSON")
    p_bench.add_argument("--plot", metavar="PATH", help="write a PNG bar chart (needs matplotlib)")
    p_bench.add_argument("--threads", type=int, default=2, help="CPU threads for every contender (default 2)")
    p_bench.add_argument("--ops", default="all", help="comma-separated ops to run (default: all)")
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
