"""Run the differential fuzz suite (tests/test_fuzz.py) with N examples per op and print a table
per op: examples, how many had NaN/inf/-0 in their inputs, how many both backends refused (the
same documented error), mismatches (of them on finite inputs) and crashes.

    python tools/fuzz_report.py --examples 1000            # a long local run
    python tools/fuzz_report.py --examples 1000 --json out.json

Counts come from the suite itself (VKERN_FUZZ_RECORD): in that mode a mismatch or crash is
counted and the run goes on instead of stopping at the first. The suite runs in a child process,
so a crash that kills the interpreter (a segfault) is reported too. Exit status 1 when any
mismatch or crash was counted.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=1000, help="examples per op (default 1000)")
    ap.add_argument("-k", default=None, help="pytest -k expression to pick ops")
    ap.add_argument("--json", default=None, help="also save the counts here")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        record = os.path.join(tmp, "fuzz.json")
        env = dict(os.environ, VKERN_FUZZ_EXAMPLES=str(args.examples), VKERN_FUZZ_RECORD=record)
        cmd = [sys.executable, "-m", "pytest", str(ROOT / "tests" / "test_fuzz.py"), "-q", "-p", "no:cacheprovider",
               "-W", "ignore::RuntimeWarning"] + (["-k", args.k] if args.k else [])
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if not os.path.exists(record):
            print(proc.stdout[-4000:], proc.stderr[-4000:], sep="\n")
            print(f"the fuzz run died (exit status {proc.returncode}) before writing its counts: a crash")
            return 1
        stats = json.load(open(record))
    print(f"vkern fuzz: cpu backend vs the NumPy reference, {args.examples} examples per op requested, "
          f"{wall:.0f} s")
    head = ("op", "examples", "non-finite in", "both refused", "mismatches", "on finite in", "crashes")
    rows = [(op, s["examples"], s["nonfinite"], s["refused"], s["mismatches"], s["mismatches_finite"], s["crashes"])
            for op, s in stats.items()]
    total = ("total",) + tuple(sum(r[i] for r in rows) for i in range(1, len(head)))
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, total)]
    line = lambda r: "| " + " | ".join(str(x).ljust(w) if i == 0 else str(x).rjust(w)  # noqa: E731
                                      for i, (x, w) in enumerate(zip(r, widths))) + " |"
    print(line(head))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows + [total]:
        print(line(r))
    for op, s in stats.items():
        if s.get("first_failure"):
            print(f"\n{op}: first failure: {s['first_failure'].strip()}")
    if args.json:
        Path(args.json).write_text(json.dumps({"examples_per_op": args.examples, "wall_s": wall, "ops": stats},
                                              indent=1))
    bad = total[4] + total[6]
    if proc.returncode not in (0, 1) or bad:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
