"""`python -m vkern bench` is complete without torch (issue 13): every table has its measured vkern
rows (NumPy inputs; bfloat16 through ml_dtypes), every table a measured peer (so "x best peer" is
filled), and every peer that needs torch is a row naming the install command. Runs the bench in a
subprocess where `import torch` fails, at the --tiny sizes."""
import json
import re
import subprocess
import sys

import pytest

HIDE_TORCH = (
    "import sys; sys.modules['torch'] = None\n"     # `import torch` now raises ImportError
    "from vkern.__main__ import main\n"
    "sys.exit(main(sys.argv[1:], prog='vkern'))\n"
)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    out = subprocess.run([sys.executable, "-c", HIDE_TORCH, "bench", "--tiny", "--json", str(path)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout, json.loads(path.read_text())


def test_torch_really_hidden(bench):
    stdout, report = bench
    names = {n for r in report["results"] for n in r["timings"]}
    assert not any(n.startswith("torch ") and "median_s" in r["timings"][n]
                   for r in report["results"] for n in r["timings"]), "a torch row was measured"
    assert "torch SDPA enable_gqa" in names


def test_every_table_has_vkern_rows_and_a_measured_peer(bench):
    _, report = bench
    ops = {r["op"] for r in report["results"]}
    assert ops == {"maxsim", "loki", "vatp", "taskvec", "retrieval"}     # generate is opt-in (--ops generate)
    for r in report["results"]:
        t = r["timings"]
        if r["op"] == "generate":   # a real model in transformers: every row names the missing torch
            assert t and all("missing" in v and "torch not installed" in v["missing"] for v in t.values()), t
            continue
        assert not [n for n, v in t.items() if "error" in v], (r["workload"], t)
        measured = {n: v for n, v in t.items() if "median_s" in v}
        assert any(v["kind"] == "vkern" for v in measured.values()), r["workload"]
        if r["workload"].startswith("muvera"):   # fastembed is optional: measured, or a row saying why not
            fe = [v for n, v in t.items() if n.startswith("fastembed")]
            assert fe and all(v["kind"] == "peer" and ("median_s" in v or "missing" in v) for v in fe), r["workload"]
        else:
            assert any(v["kind"] == "peer" for v in measured.values()), r["workload"]


def test_vatp_colsum_and_bf16_rows_are_measured_or_say_what_is_missing(bench):
    _, report = bench
    try:
        import ml_dtypes  # noqa: F401
        have_bf16 = True
    except ImportError:
        have_bf16 = False
    wl = {r["workload"]: r["timings"] for r in report["results"]}
    colsum = [t for w, t in wl.items() if w.startswith("attention_colsum")]
    assert colsum and any(n.startswith("vkern cpu") and "median_s" in v for n, v in colsum[0].items())
    prune = [t for w, t in wl.items() if w.startswith("vatp_prune")]
    assert len(prune) == 2 and all("vkern cpu in place" in t for t in prune[:1])
    bf16_tables = [w for w in wl if "bfloat16" in w]
    assert len(bf16_tables) == 4                       # Loki dense/shared/per_head, VATP prune
    bf16_rows = [v for r in report["results"] for n, v in r["timings"].items() if "bf16" in n]
    assert len(bf16_rows) == 2                         # MaxSim 1 and 16 queries
    for w in bf16_tables:
        vk = [v for n, v in wl[w].items() if v["kind"] == "vkern"]
        for v in vk + bf16_rows:
            if have_bf16:
                assert "median_s" in v, (w, v)
            else:
                assert "pip install ml_dtypes" in v["missing"], (w, v)


def test_missing_peers_name_the_install_command(bench):
    stdout, report = bench
    for r in report["results"]:
        for n, v in r["timings"].items():
            if n.startswith("torch ") and v["kind"] == "peer":
                assert v["missing"] == "torch not installed: pip install torch==2.13.0", (n, v)
    assert "not measured: torch not installed: pip install torch==2.13.0" in stdout


def test_no_silent_dash_in_the_tables(bench):
    stdout, _ = bench
    rows = [line for line in stdout.splitlines() if line.startswith("| ") and "contender" not in line]
    assert rows
    for line in rows:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert "-" not in cells, line
        assert not re.fullmatch(r"-+", cells[0]), line


def test_plot_draws_every_workload(bench, tmp_path):
    pytest.importorskip("matplotlib")
    from vkern.bench import _panel_data, plot

    _, report = bench
    path = tmp_path / "bench.png"
    plot(report, str(path))
    assert path.stat().st_size > 10_000
    for r in report["results"]:
        rows, base_name, _ = _panel_data(r, report["machine"])
        if r["op"] == "generate":        # nothing measurable without torch: every bar is a reason
            assert base_name is None and all(x is None and "torch" in label for _, _, x, label in rows)
            continue
        assert base_name is not None and len(rows) == len(r["timings"])
        # bar length = speed-up against the best peer (1.0 for that peer itself), linear
        assert dict((n, x) for n, _, x, _ in rows)[base_name] == pytest.approx(1.0)
        assert all(x is None or x > 0 for _, _, x, _ in rows)


def test_generate_rows_name_the_missing_torch(tmp_path):
    """`--ops generate` (opt-in: a real model in transformers) without torch: one table whose every
    row says torch is not installed, and the run still succeeds."""
    path = tmp_path / "gen.json"
    out = subprocess.run([sys.executable, "-c", HIDE_TORCH, "bench", "--tiny", "--ops", "generate", "--json",
                          str(path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    (r,) = json.loads(path.read_text())["results"]
    assert r["op"] == "generate" and len(r["timings"]) == 5
    assert all("torch not installed" in v.get("missing", "") for v in r["timings"].values()), r["timings"]
    assert "not measured: torch not installed" in out.stdout
