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
    names = {name for r in report["results"] for name in r["timings"]}
    assert {"vkern reference", "vkern cpu f32", "numpy flat GEMM + reduceat"} <= names
    for r in report["results"]:
        for name, t in r["timings"].items():
            assert "error" not in t, (name, t)
