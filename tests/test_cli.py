"""The command line a newcomer runs: `python -m vkern info` and `python -m vkern bench`."""
import json
import subprocess
import sys


def run(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "vkern", *args], capture_output=True, text=True, timeout=timeout)


def test_info_reports_build_and_backends():
    out = run("info", "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["extension"] == "loaded"
    assert info["simd_level"] in info["simd_supported"]
    assert set(info["backends"]["maxsim"]) == {"reference", "cpu", "cuda", "triton"}
    assert info["backends"]["maxsim"]["reference"] == "ok"
    assert info["backends"]["maxsim"]["cpu"] == "ok"


def test_bench_quick_writes_ratios(tmp_path):
    path = tmp_path / "bench.json"
    out = run("bench", "--quick", "--repeat", "2", "--json", str(path))
    assert out.returncode == 0, out.stderr
    assert "x best peer" in out.stdout and "% copy BW" in out.stdout
    report = json.loads(path.read_text())
    assert report["machine"]["copy_bytes_per_s"] > 0 and report["machine"]["gemm_flops"] > 0
    assert report["machine"]["gather_read_bytes_per_s"] > 0 and "gathered-row reads" in out.stdout
    names = {name for r in report["results"] for name in r["timings"]}
    assert {"vkern reference", "vkern cpu f32", "numpy flat GEMM + reduceat"} <= names
    for r in report["results"]:
        for name, t in r["timings"].items():
            assert "error" not in t, (name, t)


def test_gather_limit_reads_exactly_the_listed_rows():
    """The bench's gathered-row read limit touches every listed row, whole, and nothing else:
    its checksum equals NumPy's sum over the same rows (any thread count, prefetch distance)."""
    import numpy as np

    import vkern
    from vkern import _ext

    rng = np.random.default_rng(0)
    buf = rng.integers(0, 2**40, size=(3001, 64), dtype=np.uint64)  # 3001 rows of 512 B
    idx = np.sort(rng.choice(3001, size=377, replace=False)).astype(np.int32)
    want = int(buf[idx].sum(dtype=np.uint64))
    before = vkern.get_num_threads()
    try:
        for threads in (1, 2, 3):
            vkern.set_num_threads(threads)
            for ahead in (0, 1, 8):
                assert _ext.C.read_rows(buf.ctypes.data, 512, idx.ctypes.data, len(idx), ahead) == want
        assert _ext.C.read_rows(buf.ctypes.data, 512, idx.ctypes.data, 0, 8) == 0
    finally:
        vkern.set_num_threads(before)


def test_ops_help_lists_every_op_and_matches_the_bench():
    from vkern.__main__ import BENCH_OPS
    from vkern.bench import WORKLOADS

    assert tuple(WORKLOADS) == BENCH_OPS
    out = run("bench", "--help", timeout=60)
    assert out.returncode == 0, out.stderr
    help_text = " ".join(out.stdout.split())  # argparse wraps lines
    for name in BENCH_OPS:
        assert name in help_text.split("--ops OPS", 1)[1], help_text
    bad = run("bench", "--ops", "maxsim,nosuchop", timeout=60)
    assert bad.returncode == 2 and "nosuchop" in bad.stderr and "taskvec" in bad.stderr, bad.stderr


def test_usage_names_the_console_script_or_the_module():
    import os
    import shutil

    out = run("--help", timeout=60)
    assert out.returncode == 0 and out.stdout.startswith("usage: python -m vkern "), out.stdout
    script = shutil.which("vkern") or os.path.join(os.path.dirname(sys.executable), "vkern")
    if not os.path.exists(script):
        import pytest

        pytest.skip("the vkern console script is not installed next to this Python")
    out = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.startswith("usage: vkern "), out.stdout
