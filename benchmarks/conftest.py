"""pytest-benchmark glue: after the usual table, print each group's times as
ratios to its reference and to its best peer, plus the machine's copy
bandwidth and BLAS GEMM rate measured in the same session.

A benchmark declares its role with ``benchmark.extra_info["kind"]`` =
"reference" | "peer" | "vkern", and its work with ``extra_info["bytes"]`` /
``extra_info["flops"]``.
"""
import os

if os.environ.get("VKERN_BENCH_TRITON_INTERPRET"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from vkern.bench import copy_bandwidth, gemm_flops  # noqa: E402

THREADS = int(os.environ.get("VKERN_BENCH_THREADS", "2"))
_limits = {}


def _limit_threads(n: int) -> None:
    """Every benchmark file runs vkern, torch and the BLAS with the same n threads."""
    import vkern

    vkern.set_num_threads(n)
    try:
        import torch

        torch.set_num_threads(n)
    except Exception:  # pragma: no cover - torch is optional
        pass
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(n)
    except Exception:  # pragma: no cover
        pass


_limit_threads(THREADS)


@pytest.fixture(scope="session")
def machine_limits():
    if not _limits:
        _limits["copy_bytes_per_s"] = copy_bandwidth(THREADS)
        _limits["gemm_flops"] = gemm_flops(THREADS)
    return _limits


def pytest_terminal_summary(terminalreporter, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    groups = {}
    for bench in session.benchmarks:
        groups.setdefault(bench.group or "", []).append(bench)
    tr = terminalreporter
    tr.write_sep("=", f"vkern ratios (median times, {THREADS} threads, one session)")
    if _limits:
        tr.write_line(f"machine limits measured in this session: copy {_limits['copy_bytes_per_s'] / 1e9:.1f} GB/s, "
                      f"BLAS sgemm {_limits['gemm_flops'] / 1e9:.0f} GFLOP/s")
    for group, benches in groups.items():
        med = {b.name: b.stats.median for b in benches if b.stats}
        kind = {b.name: b.extra_info.get("kind", "vkern") for b in benches}
        ref = next((med[n] for n in med if kind[n] == "reference"), None)
        peers = {n: med[n] for n in med if kind[n] == "peer"}
        best = min(peers, key=peers.get) if peers else None
        tr.write_line(f"[{group}]  best peer: {best}")
        for b in sorted(benches, key=lambda b: med.get(b.name, 0)):
            if b.name not in med:
                continue
            s = med[b.name]
            parts = [f"{s * 1e3:9.2f} ms"]
            if ref:
                parts.append(f"x ref {ref / s:7.1f}")
            if best:
                parts.append(f"x best peer {peers[best] / s:5.2f}")
            if _limits and b.extra_info.get("bytes"):
                parts.append(f"{100 * b.extra_info['bytes'] / s / _limits['copy_bytes_per_s']:4.0f}% copy BW")
            if _limits and b.extra_info.get("flops"):
                parts.append(f"{100 * b.extra_info['flops'] / s / _limits['gemm_flops']:4.0f}% GEMM")
            tr.write_line(f"  {b.name:<48} " + "  ".join(parts))
