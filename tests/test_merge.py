"""`vkern merge`: recipes over tiny locally written safetensors checkpoints, against a
float64 NumPy statement of each method's definition; errors before anything is written;
peak memory a few tensors, not the model."""
import json
import os
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest
import yaml

safetensors_numpy = pytest.importorskip("safetensors.numpy")

from vkern import merge as vm  # noqa: E402
from vkern.checkpoint import Checkpoint, ShardedWriter, decode_f32, encode_f32  # noqa: E402

SHAPES = {"model.embed.weight": (40, 24), "model.layers.0.attn.q.weight": (24, 24),
          "model.layers.0.mlp.up.weight": (37, 24), "model.layers.0.norm.weight": (24,),
          "model.layers.1.conv.weight": (4, 3, 5), "lm_head.weight": (40, 24)}


def write_ckpt(path, tensors, shards=1, config=True):
    os.makedirs(path, exist_ok=True)
    names = list(tensors)
    if shards == 1:
        safetensors_numpy.save_file(tensors, os.path.join(path, "model.safetensors"))
    else:
        weight_map = {}
        for s in range(shards):
            part = names[s::shards]
            fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            safetensors_numpy.save_file({n: tensors[n] for n in part}, os.path.join(path, fname))
            weight_map.update({n: fname for n in part})
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f)
    if config:
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump({"model_type": "tiny"}, f)
        with open(os.path.join(path, "tokenizer.json"), "w") as f:
            json.dump({"version": "1.0"}, f)
    return path


@pytest.fixture
def family(tmp_path):
    """A base and three fine-tunes (f32; ft1 sharded in 2 files); some deltas exactly zero."""
    rng = np.random.default_rng(7)
    base = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    write_ckpt(str(tmp_path / "base"), base)
    fts = []
    for i in range(3):
        ft = {}
        for k, v in base.items():
            d = (rng.laplace(size=v.shape) * 0.05).astype(np.float32)
            d[rng.random(v.shape) < 0.1] = 0            # untouched weights
            ft[k] = v + d
        write_ckpt(str(tmp_path / f"ft{i}"), ft, shards=2 if i == 1 else 1)
        fts.append(ft)
    return tmp_path, base, fts


def recipe(tmp_path, method, models, parameters=None, dtype=None, base="base", name="r.yml"):
    r = {"merge_method": method, "models": models}
    if base:
        r["base_model"] = str(tmp_path / base)
    if parameters:
        r["parameters"] = parameters
    if dtype:
        r["dtype"] = dtype
    p = tmp_path / name
    p.write_text(yaml.safe_dump(r))
    return str(p)


def load_out(outdir):
    ck = Checkpoint(str(outdir))
    return {n: ck.read_f32(n) for n in ck.tensors}, ck


# ------------------------------------------------------------------ oracle (float64, plain)

def oracle(method, base, fts, weights, densities, lam=1.0, normalize=None, rescale=None):
    out = {}
    for name, b in base.items():
        b = b.astype(np.float64)
        xs = [ft[name].astype(np.float64) for ft in fts]
        if method == "linear":
            norm = True if normalize is None else normalize
            s = sum(w * x for w, x in zip(weights, xs))
            out[name] = s / sum(weights) if norm else s
            continue
        deltas = []
        for x, w, dens in zip(xs, weights, densities):
            d = (x.astype(np.float32) - b.astype(np.float32)).astype(np.float64)
            if method == "ties" and dens < 1:
                k = max(1, int(dens * d.size))
                order = np.argsort(-np.abs(d.reshape(-1)), kind="stable")
                mask = np.zeros(d.size, bool)
                mask[order[:k]] = True
                d = np.where(mask.reshape(d.shape), d, 0.0)
            deltas.append(w * d)
        if method == "task_arithmetic":
            norm = False if normalize is None else normalize
            mixed = sum(deltas)
            if norm:
                mixed = mixed / sum(weights)
        else:  # ties
            norm = True if normalize is None else normalize
            elected = np.where(sum(deltas) >= 0, 1.0, -1.0)
            agree = [np.sign(d) == elected for d in deltas]
            mixed = sum(np.where(a, d, 0.0) for a, d in zip(agree, deltas))
            if norm:
                div = sum(np.where(a, w, 0.0) for a, w in zip(agree, weights))
                mixed = mixed / np.where(div == 0, 1.0, div)
        out[name] = b + lam * mixed
    return out


def assert_close(got, want, rtol=2e-5):
    assert set(got) == set(want)
    for n in want:
        scale = float(np.abs(want[n]).max())
        np.testing.assert_allclose(got[n].reshape(want[n].shape), want[n], rtol=rtol, atol=rtol * scale, err_msg=n)


# ------------------------------------------------------------------ results

@pytest.mark.parametrize("normalize", [None, True])
def test_task_arithmetic_equals_definition(family, normalize):
    tmp, base, fts = family
    ws = [0.5, -0.3, 1.2]
    params = {"lambda": 0.8}
    if normalize is not None:
        params["normalize"] = normalize
    r = recipe(tmp, "task_arithmetic", [{"model": str(tmp / "base")}] +
               [{"model": str(tmp / f"ft{i}"), "parameters": {"weight": w}} for i, w in enumerate(ws)], params)
    vm.run(r, str(tmp / "out"), progress=False)
    got, _ = load_out(tmp / "out")
    assert_close(got, oracle("task_arithmetic", base, fts, ws, [1] * 3, lam=0.8, normalize=normalize))


@pytest.mark.parametrize("densities", [(1.0, 1.0, 1.0), (0.3, 0.5, 0.9), (0.001, 0.2, 0.0)])
def test_ties_equals_definition(family, densities):
    tmp, base, fts = family
    ws = [0.6, 0.3, 0.8]
    r = recipe(tmp, "ties", [{"model": str(tmp / f"ft{i}"), "parameters": {"weight": w, "density": d}}
                             for i, (w, d) in enumerate(zip(ws, densities))], {"lambda": 1.3})
    vm.run(r, str(tmp / "out"), progress=False)
    got, _ = load_out(tmp / "out")
    want = oracle("ties", base, fts, ws, [d if d > 0 else 0 for d in densities], lam=1.3)
    if 0.0 in densities:   # density 0: that task contributes nothing (oracle: zero delta)
        i = densities.index(0.0)
        want = oracle("ties", base, [ft for j, ft in enumerate(fts) if j != i],
                      [w for j, w in enumerate(ws) if j != i], [d for j, d in enumerate(densities) if j != i],
                      lam=1.3)
    assert_close(got, want)


def test_linear_equals_definition_base_included(family):
    tmp, base, fts = family
    r = recipe(tmp, "linear", [{"model": str(tmp / "base"), "parameters": {"weight": 0.2}},
                               {"model": str(tmp / "ft0"), "parameters": {"weight": 0.5}},
                               {"model": str(tmp / "ft2"), "parameters": {"weight": 0.3}}], base=None)
    vm.run(r, str(tmp / "out"), progress=False)
    got, _ = load_out(tmp / "out")
    assert_close(got, oracle("linear", base, [base, fts[0], fts[2]], [0.2, 0.5, 0.3], None))


def test_conditional_weights_per_block(family):
    """mergekit's {filter, value} lists: one coefficient per parameter block per task (aTLAS-style)."""
    tmp, base, fts = family
    w0 = [{"filter": "mlp", "value": 0.9}, {"filter": "attn", "value": -0.4}, {"value": 0.1}]
    r = recipe(tmp, "task_arithmetic", [{"model": str(tmp / "ft0"), "parameters": {"weight": w0}},
                                        {"model": str(tmp / "ft1"), "parameters": {"weight": 0.5}}])
    vm.run(r, str(tmp / "out"), progress=False)
    got, _ = load_out(tmp / "out")
    for name in base:
        w = 0.9 if "mlp" in name else (-0.4 if "attn" in name else 0.1)
        want = oracle("task_arithmetic", {name: base[name]}, [{name: fts[0][name]}, {name: fts[1][name]}],
                      [w, 0.5], [1, 1])
        assert_close({name: got[name]}, want)


def test_dare_statistics_and_seed(family):
    tmp, base, fts = family
    models = [{"model": str(tmp / f"ft{i}"), "parameters": {"weight": 1.0, "density": 0.4}} for i in range(1)]
    r = recipe(tmp, "dare_linear", models)
    vm.run(r, str(tmp / "a"), progress=False, seed=1)
    vm.run(r, str(tmp / "b"), progress=False, seed=1)
    vm.run(r, str(tmp / "c"), progress=False, seed=2)
    a, _ = load_out(tmp / "a")
    b, _ = load_out(tmp / "b")
    c, _ = load_out(tmp / "c")
    name = "model.layers.0.mlp.up.weight"
    np.testing.assert_array_equal(a[name], b[name])           # same seed, same masks
    assert not np.array_equal(a[name], c[name])
    counts = [0, 0]
    for n in base:
        delta = fts[0][n] - base[n]
        got = a[n].reshape(delta.shape) - base[n]
        kept = got != 0
        nonzero = delta != 0
        assert not np.any(kept & ~nonzero)                     # only real deltas survive
        counts[0] += kept.sum()
        counts[1] += nonzero.sum()
        # mergekit's rescale: the L1 norm of the delta is kept
        np.testing.assert_allclose(np.abs(got).sum(), np.abs(delta).sum(), rtol=1e-4)
        # kept entries are the original delta times one common factor
        factor = np.abs(delta).sum() / np.abs(delta[kept]).sum()
        np.testing.assert_allclose(got, factor * np.where(kept, delta, 0), rtol=0,
                                   atol=1e-6 * np.abs(base[n]).max())
    assert abs(counts[0] / counts[1] - 0.4) < 0.04, counts   # ~density of the real deltas (n ~ 3,900)


def test_dare_ties_elects_over_dropped_deltas(family):
    tmp, base, fts = family
    r = recipe(tmp, "dare_ties", [{"model": str(tmp / f"ft{i}"), "parameters": {"weight": 0.5, "density": 1.0}}
                                  for i in range(3)])
    vm.run(r, str(tmp / "out"), progress=False)
    got, _ = load_out(tmp / "out")
    # density 1 drops nothing: dare_ties is then ties without trim, normalize off
    assert_close(got, oracle("ties", base, fts, [0.5] * 3, [1] * 3, normalize=False))


def test_bf16_in_bf16_out_and_output_layout(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(0)
    base = {k: torch.randn(s, generator=g).to(torch.bfloat16) for k, s in SHAPES.items()}
    ft = {k: (v.float() + 0.05 * torch.randn(v.shape, generator=g)).to(torch.bfloat16) for k, v in base.items()}
    for name, t in (("base", base), ("ft", ft)):
        os.makedirs(tmp_path / name)
        save_file(t, str(tmp_path / name / "model.safetensors"))
    (tmp_path / "base" / "config.json").write_text("{}")
    (tmp_path / "base" / "tokenizer_config.json").write_text("{}")
    r = recipe(tmp_path, "task_arithmetic", [{"model": str(tmp_path / "ft"), "parameters": {"weight": 0.7}}],
               {"lambda": 1.0})
    vm.run(r, str(tmp_path / "out"), progress=False, max_shard_size="2KB")
    files = sorted(os.listdir(tmp_path / "out"))
    assert "model.safetensors.index.json" in files and "config.json" in files and "tokenizer_config.json" in files
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) >= 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    got = {}
    for s in shards:                                       # the real safetensors reads every shard
        got.update(load_file(str(tmp_path / "out" / s)))
    assert set(index["weight_map"]) == set(base) == set(got)
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in got.values())
    for k in base:
        want = (base[k].float() + 0.7 * (ft[k].float() - base[k].float())).to(torch.bfloat16)
        assert got[k].dtype == torch.bfloat16
        # float32 math rounded once to bf16 (RNE, as torch); allow 1 ulp for f32 rounding of the sum
        diff = (got[k].float() - want.float()).abs()
        ulp = want.float().abs() * 2 ** -7
        assert bool((diff <= ulp + 1e-30).all()), k


def test_encode_bf16_matches_torch_rounding():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.standard_normal(10000).astype(np.float32) * 10.0 ** rng.integers(-30, 30, 10000),
                        np.array([0.0, -0.0, np.inf, -np.inf, 1.00390625, 1.01171875], np.float32)])
    got = encode_f32(x, "BF16").view(np.uint16)
    want = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(decode_f32(got.view(np.uint8), "BF16"),
                                  torch.from_numpy(want.view(np.int16)).view(torch.bfloat16).float().numpy())


def test_float16_dtype_output(family):
    tmp, base, fts = family
    r = recipe(tmp, "task_arithmetic", [{"model": str(tmp / "ft0"), "parameters": {"weight": 1.0}}], dtype="float16")
    vm.run(r, str(tmp / "out"), progress=False)
    _, ck = load_out(tmp / "out")
    for n in base:
        assert ck.tensors[n].dtype == "F16"
        np.testing.assert_array_equal(ck.read(n), fts[0][n].astype(np.float16))


def test_non_float_tensors_copied_from_base(tmp_path):
    base = {"w": np.ones((4, 4), np.float32), "pos": np.arange(7, dtype=np.int64)}
    ft = {"w": np.full((4, 4), 3, np.float32), "pos": np.arange(7, dtype=np.int64) * 2}
    write_ckpt(str(tmp_path / "base"), base)
    write_ckpt(str(tmp_path / "ft"), ft)
    r = recipe(tmp_path, "task_arithmetic", [{"model": str(tmp_path / "ft"), "parameters": {"weight": 0.5}}])
    vm.run(r, str(tmp_path / "out"), progress=False)
    out = safetensors_numpy.load_file(str(tmp_path / "out" / "model.safetensors"))
    np.testing.assert_array_equal(out["pos"], base["pos"])
    np.testing.assert_array_equal(out["w"], np.full((4, 4), 2, np.float32))


# ------------------------------------------------------------------ errors, before anything is written

def _expect_error(tmp, r, match):
    out = tmp / "out_err"
    with pytest.raises(vm.RecipeError, match=match):
        vm.run(r, str(out), progress=False)
    assert not out.exists()


def test_missing_tensor_in_one_model(family):
    tmp, base, fts = family
    bad = dict(fts[2])
    del bad["model.layers.0.norm.weight"]
    write_ckpt(str(tmp / "bad"), bad)
    r = recipe(tmp, "ties", [{"model": str(tmp / "ft0"), "parameters": {"weight": 1.0}},
                             {"model": str(tmp / "bad"), "parameters": {"weight": 1.0}}])
    _expect_error(tmp, r, r"tensor 'model.layers.0.norm.weight' of base_model is missing from models\[1\]")


def test_shape_mismatch(family):
    tmp, base, fts = family
    bad = dict(fts[2])
    bad["lm_head.weight"] = np.zeros((41, 24), np.float32)
    write_ckpt(str(tmp / "bad"), bad)
    r = recipe(tmp, "task_arithmetic", [{"model": str(tmp / "bad"), "parameters": {"weight": 1.0}}])
    _expect_error(tmp, r, r"tensor 'lm_head.weight': shape \[41, 24\] in models\[0\].*\[40, 24\] in base_model")


@pytest.mark.parametrize("change,match", [
    ({"merge_method": "slerp"}, r"merge_method: expected one of \['linear', 'task_arithmetic', 'ties'"),
    ({"parameters": {"lambda": 1.0, "gamma": 0.1}}, r"parameters: unknown parameter\(s\) \['gamma'\] for ties"),
    ({"models": [{"model": "FT0", "parameters": {"weight": 1, "epsilon": 0.1}}]},
     r"models\[0\].parameters: unknown parameter\(s\) \['epsilon'\] for ties"),
    ({"models": [{"model": "FT0", "parameters": {"density": 0.5}}]}, r"models\[0\].*weight is required for ties"),
    ({"models": [{"model": "FT0", "parameters": {"weight": [0.1, 0.5]}}]}, r"layer gradients"),
    ({"models": [{"model": "FT0", "parameters": {"weight": 1, "density": 1.5}}]}, r"density must be in \[0, 1\]"),
    ({"slices": []}, r"unknown key\(s\) \['slices'\]"),
    ({"dtype": "int8"}, r"dtype: expected one of"),
    ({"base_model": None}, r"base_model: required for ties"),
    ({"models": [{"model": "NOPE", "parameters": {"weight": 1}}]}, r"models\[0\] .*nope: no such file"),
    ({"parameters": {"normalize": 3}}, r"parameters.normalize: expected true or false"),
])
def test_recipe_errors(family, change, match):
    tmp, _, _ = family
    r = {"merge_method": "ties", "base_model": str(tmp / "base"),
         "models": [{"model": "FT0", "parameters": {"weight": 1.0, "density": 0.5}}]}
    r.update(change)
    for m in r["models"]:
        m["model"] = m["model"].replace("FT0", str(tmp / "ft0")).replace("NOPE", str(tmp / "nope"))
    if r.get("base_model") is None:
        r.pop("base_model")
    p = tmp / "bad.yml"
    p.write_text(yaml.safe_dump(r))
    _expect_error(tmp, str(p), match)


def test_refuses_to_overwrite(family):
    tmp, _, _ = family
    r = recipe(tmp, "task_arithmetic", [{"model": str(tmp / "ft0"), "parameters": {"weight": 1.0}}])
    vm.run(r, str(tmp / "out"), progress=False)
    with pytest.raises(vm.RecipeError, match="already holds model.safetensors"):
        vm.run(r, str(tmp / "out"), progress=False)
    vm.run(r, str(tmp / "out"), progress=False, overwrite=True)


def test_cli_merge_progress_and_error_exit(family):
    tmp, base, fts = family
    r = recipe(tmp, "task_arithmetic", [{"model": str(tmp / "ft0"), "parameters": {"weight": 1.0}}])
    out = subprocess.run([sys.executable, "-m", "vkern", "merge", r, str(tmp / "cli")], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "B/s" in out.stderr and "wrote 6 tensors" in out.stderr        # tqdm with bytes/s, on stderr
    got, _ = load_out(tmp / "cli")
    assert_close(got, {k: v.astype(np.float64) for k, v in fts[0].items()})
    bad = recipe(tmp, "nosuch", [{"model": str(tmp / "ft0")}], name="bad.yml")
    out = subprocess.run([sys.executable, "-m", "vkern", "merge", bad, str(tmp / "cli2")], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and "merge_method: expected one of" in out.stderr
    assert not (tmp / "cli2").exists()


# ------------------------------------------------------------------ memory

@pytest.mark.parametrize("method,bound", [("ties", 2.5), ("task_arithmetic", 1.0), ("dare_ties", 1.0)])
def test_peak_memory_is_blocks_not_tensors(tmp_path, monkeypatch, method, bound):
    """32 tensors of 256 KiB per model, 3 fine-tunes (32 MiB read in all), streamed in blocks of
    2048 elements: the traced peak stays under `bound` tensors: TIES holds one float32 |delta|
    buffer of a tensor while it finds the trim threshold; task arithmetic and DARE only blocks
    (plus the headers and plan: ~0.4 tensor here), never a whole tensor.
    Loading the models would take 128 tensors."""
    monkeypatch.setattr(vm, "BLOCK", 2048)
    rng = np.random.default_rng(0)
    shapes = {f"layers.{i}.weight": (256, 256) for i in range(32)}
    base = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    write_ckpt(str(tmp_path / "base"), base)
    fts = []
    for i in range(3):
        fts.append({k: v + np.float32(0.01 * (i + 1)) * rng.standard_normal(v.shape).astype(np.float32)
                    for k, v in base.items()})
        write_ckpt(str(tmp_path / f"ft{i}"), fts[-1])
    tensor_bytes = 256 * 256 * 4
    r = recipe(tmp_path, method, [{"model": str(tmp_path / f"ft{i}"), "parameters": {"weight": 0.3, "density": 0.5}}
                                  for i in range(3)])
    vm.run(r, str(tmp_path / "warm"), progress=False)       # first run imports what it needs (traced too)
    tracemalloc.start()
    try:
        vm.run(r, str(tmp_path / "out"), progress=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < bound * tensor_bytes, (peak / tensor_bytes, bound)
    got, _ = load_out(tmp_path / "out")
    if method != "dare_ties":   # blocked and whole-tensor merges agree
        assert_close(got, oracle(method, base, fts, [0.3] * 3, [0.5] * 3))


def test_writer_plan_order_is_enforced(tmp_path):
    w = ShardedWriter(str(tmp_path), [("a", "F32", (2,)), ("b", "F32", (3,))], 1 << 20)
    with pytest.raises(RuntimeError, match="expected tensor 'a' next"):
        w.write("b", np.zeros(3, np.float32))


def test_readme_merge_snippet_runs():
    """The README's model-merging Python block runs as written."""
    import pathlib
    import re

    text = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split("## Model merging: `vkern merge`", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1
    exec(compile(blocks[0], "README.md[model merging]", "exec"), {})


# ------------------------------------------------------------------ NegMerge, CABS (brute force definitions)

def test_negmerge_equals_definition(family):
    tmp, base, fts = family
    ws = [1.0, 2.0, 1.0]
    r = recipe(tmp, "negmerge", [{"model": str(tmp / "ft0")}, {"model": str(tmp / "ft1"), "parameters": {"weight": 2.0}},
                                 {"model": str(tmp / "ft2")}], {"lambda": 0.7})
    vm.run(r, str(tmp / "out"), progress=False)
    got, _ = load_out(tmp / "out")
    for name, b in base.items():
        flat_b = b.astype(np.float64).reshape(-1)
        deltas = [(ft[name] - b).astype(np.float64).reshape(-1) for ft in fts]
        want = flat_b.copy()
        for j in range(flat_b.size):          # element by element, as the paper states it
            signs = {np.sign(d[j]) for d in deltas}
            if signs in ({1.0}, {-1.0}):
                want[j] = flat_b[j] - 0.7 * sum(w * d[j] for w, d in zip(ws, deltas)) / sum(ws)
        np.testing.assert_allclose(got[name].reshape(-1), want, rtol=1e-5, atol=1e-6, err_msg=name)
    assert any(np.any(got[n].reshape(-1) != base[n].reshape(-1)) for n in base)


@pytest.mark.parametrize("n_keep,m", [(2, 8), (1, 4), (3, 5)])
def test_cabs_equals_definition(family, monkeypatch, n_keep, m):
    tmp, base, fts = family
    monkeypatch.setattr(vm, "BLOCK", 64)      # many blocks: groups must not straddle them
    ws = [0.5, 0.8, 0.3]
    r = recipe(tmp, "cabs", [{"model": str(tmp / f"ft{i}"), "parameters": {"weight": w}} for i, w in enumerate(ws)],
               {"lambda": 1.1, "n": n_keep, "m": m})
    vm.run(r, str(tmp / "out"), progress=False)
    got, _ = load_out(tmp / "out")
    for name, b in base.items():
        flat_b = b.astype(np.float64).reshape(-1)
        deltas = [(ft[name] - b).astype(np.float32).astype(np.float64).reshape(-1) for ft in fts]
        taken = np.zeros(flat_b.size, bool)
        masks = []
        for d in deltas:                      # sequential, group by group
            keep = np.zeros(flat_b.size, bool)
            for g in range(0, flat_b.size, m):
                free = [j for j in range(g, min(g + m, flat_b.size)) if not taken[j]]
                free.sort(key=lambda j: (-abs(d[j]), j))
                keep[free[:n_keep]] = True
            taken |= keep
            masks.append(keep)
        assert not np.any(sum(mk.astype(int) for mk in masks) > 1)     # never overlapping
        want = flat_b + 1.1 * sum(w * np.where(mk, d, 0) for w, mk, d in zip(ws, masks, deltas))
        np.testing.assert_allclose(got[name].reshape(-1), want, rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("params,match", [({"n": 2}, r"parameters.m: required for cabs"),
                                          ({"n": 5, "m": 4}, r"cabs needs 1 <= n <= m"),
                                          ({"n": 1.5, "m": 4}, r"parameters.n: required for cabs")])
def test_cabs_parameter_errors(family, params, match):
    tmp, _, _ = family
    r = recipe(tmp, "cabs", [{"model": str(tmp / "ft0"), "parameters": {"weight": 1.0}}], params)
    _expect_error(tmp, r, match)
