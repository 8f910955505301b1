"""`vkern taskvec compress` stores and merging from them: round-trip error bounds per bit
width, RTVQ sharing, the budgeted bit allocation, refusing another base, and
merge-from-store equal to merging the dequantised task vectors."""
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
from vkern import taskvec  # noqa: E402
from vkern import taskvec_store as ts  # noqa: E402
from vkern.checkpoint import Checkpoint  # noqa: E402

SHAPES = {"embed.weight": (50, 40), "layers.0.q.weight": (40, 40), "layers.0.up.weight": (70, 40),
          "layers.0.norm.weight": (40,), "layers.1.conv.weight": (6, 4, 5), "head.weight": (50, 40)}


def write(path, tensors):
    os.makedirs(path, exist_ok=True)
    safetensors_numpy.save_file(tensors, os.path.join(path, "model.safetensors"))
    (open(os.path.join(path, "config.json"), "w")).write("{}")
    return str(path)


@pytest.fixture
def family(tmp_path):
    rng = np.random.default_rng(11)
    base = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    write(tmp_path / "base", base)
    fts = []
    for i in range(3):
        scale = np.float32(0.02 * (i + 1))
        ft = {k: v + scale * rng.laplace(size=v.shape).astype(np.float32) for k, v in base.items()}
        write(tmp_path / f"ft{i}", ft)
        fts.append(ft)
    return tmp_path, base, fts


def compress(tmp, out="s.safetensors", n=3, **kw):
    kw.setdefault("progress", False)
    return ts.compress(str(tmp / "base"), [f"t{i}={tmp / f'ft{i}'}" for i in range(n)], str(tmp / out), **kw)


def taus_of(base, ft, name):
    return (ft[name] - base[name]).reshape(ts.view_shape(base[name].shape))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", ["128", "32", "row", "tensor"])
def test_roundtrip_error_bound_per_bit_width(family, bits, group):
    tmp, base, fts = family
    s = compress(tmp, bits=bits, group=group)
    store = ts.Store(str(tmp / "s.safetensors"))
    assert store.tasks == ["t0", "t1", "t2"]
    for name in base:
        for i, task in enumerate(store.tasks):
            q = store.qtv(name, task)
            assert q.bits == bits
            tau = taus_of(base, fts[i], name)
            deq = taskvec.dequantize(q, backend="reference")
            # |tau - deq| <= step / 2 of the element's group (+ float32 rounding of tau)
            N, K = tau.shape
            gs = q.group_size
            step = np.asarray(q.scales)[np.minimum(np.arange(N), q.scales.shape[0] - 1)][:, np.arange(K) // gs]
            assert np.all(np.abs(tau - deq) <= step / 2 * (1 + 1e-5) + 1e-7), (name, task)
            # the grid: (2**bits - 1) steps span at least the range
            rng_ = np.maximum(tau.max(), 0) - np.minimum(tau.min(), 0)
            if group == "tensor":
                assert float(q.scales[0, 0]) * (2 ** bits - 1) >= rng_ * (1 - 1e-6)
    assert s["bytes"] < s["float32_bytes"] * (bits + 1.5) / 32 + 4096


def test_error_falls_with_bits(family):
    tmp, base, fts = family
    errs = []
    for bits in (2, 3, 4, 8):
        compress(tmp, out=f"s{bits}.safetensors", bits=bits)
        store = ts.Store(str(tmp / f"s{bits}.safetensors"))
        t = taus_of(base, fts[0], "layers.0.up.weight")
        errs.append(float(np.abs(taskvec.dequantize(store.qtv("layers.0.up.weight", "t0"), backend="cpu") - t).mean()))
    assert errs == sorted(errs, reverse=True) and errs[-1] < errs[0] / 20


def test_metadata_names_format_and_base(family):
    tmp, base, _ = family
    compress(tmp, bits=4)
    from safetensors import safe_open

    with safe_open(str(tmp / "s.safetensors"), "np") as f:       # a plain safetensors file
        meta = f.metadata()
        keys = set(f.keys())
    assert meta["format"] == "vkern.taskvec-store/1"
    assert meta["base_fingerprint"] == Checkpoint(str(tmp / "base")).fingerprint()
    assert json.loads(meta["tasks"]) == ["t0", "t1", "t2"]
    assert {"head.weight/t1/codes", "head.weight/t1/scales", "head.weight/t1/zero_points"} <= keys


def test_rtvq_shares_one_base_and_is_smaller(family):
    tmp, base, fts = family
    plain = compress(tmp, out="p.safetensors", bits=2, group="tensor")
    res = compress(tmp, out="r.safetensors", bits=2, group="tensor", residual=True, base_bits=3)
    store = ts.Store(str(tmp / "r.safetensors"))
    name = "layers.0.up.weight"
    q0, q1 = store.qtv(name, "t0"), store.qtv(name, "t1")
    assert q0.base is q1.base and q0.base.bits == 3 and q0.bits == 2
    # B3O2 over 3 tasks: 2 + 3/3 = 3 code bits per element per task, against 2 plain
    assert res["bytes"] < 1.6 * plain["bytes"]
    # and the residual code is the more accurate (the offsets are small)
    e_res = e_plain = 0.0
    pstore = ts.Store(str(tmp / "p.safetensors"))
    for i, task in enumerate(store.tasks):
        t = taus_of(base, fts[i], name)
        e_res += float(np.square(taskvec.dequantize(store.qtv(name, task), backend="cpu") - t).sum())
        e_plain += float(np.square(taskvec.dequantize(pstore.qtv(name, task), backend="cpu") - t).sum())
    assert e_res < e_plain


def test_budget_allocation_rule_and_budget(tmp_path):
    """Tensors whose task vectors span ranges 1x..30x apart: the large-range ones get the bits."""
    tmp = tmp_path
    rng = np.random.default_rng(5)
    base = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    write(tmp / "base", base)
    fts = []
    for i in range(3):
        fts.append({k: v + np.float32(0.01 * 30 ** (j / 5)) * rng.laplace(size=v.shape).astype(np.float32)
                    for j, (k, v) in enumerate(base.items())})
        write(tmp / f"ft{i}", fts[-1])
    s = compress(tmp, bits=4, budget=3.0, group="tensor")
    sizes = {n: int(np.prod(sh)) for n, sh in SHAPES.items()}
    used = sum(s["bits"][n] * sizes[n] for n in sizes) / sum(sizes.values())
    assert used <= 3.0 + 1e-9
    assert len(set(s["bits"].values())) > 1                     # not one width for all
    # the greedy rule against brute force over every assignment within the budget (6 tensors, 4^6)
    import itertools

    names = list(SHAPES)
    w = [sum(ts.group_error_weight(taus_of(base, ft, n), "tensor", None) for ft in fts) for n in names]
    got = ts.allocate_bits(w, [sizes[n] for n in names], 3.0)
    assert got == [s["bits"][n] for n in names]

    def err(assign):
        return sum(wi / (2 ** b - 1) ** 2 for wi, b in zip(w, assign))

    best = min(err(a) for a in itertools.product((2, 3, 4, 8), repeat=len(names))
               if sum(b * sizes[n] for b, n in zip(a, names)) <= 3.0 * sum(sizes.values()))
    assert err(got) <= 1.25 * best          # greedy is near the optimum of the same error model
    assert err(got) < err([3] * len(names)) or got == [3] * len(names)   # beats the uniform 3 bits
    # the model predicts the measured squared error
    store = ts.Store(str(tmp / "s.safetensors"))
    n = "layers.0.up.weight"
    meas = sum(float(np.square(taskvec.dequantize(store.qtv(n, t), backend="cpu") - taus_of(base, fts[i], n)).sum())
               for i, t in enumerate(store.tasks))
    pred = w[names.index(n)] / (2 ** s["bits"][n] - 1) ** 2
    assert 0.3 * pred < meas < 3 * pred


def test_compress_errors_before_writing(family, tmp_path):
    tmp, base, fts = family
    bad = dict(fts[0])
    del bad["head.weight"]
    write(tmp / "bad", bad)
    with pytest.raises(ts.StoreError, match=r"tensor 'head.weight' of --base is missing from --finetuned bad"):
        ts.compress(str(tmp / "base"), [str(tmp / "bad")], str(tmp / "x.safetensors"), progress=False)
    with pytest.raises(ts.StoreError, match=r"--group: expected 32, 64, 128"):
        compress(tmp, out="x.safetensors", group="100")
    with pytest.raises(ts.StoreError, match="given twice"):
        ts.compress(str(tmp / "base"), [f"a={tmp / 'ft0'}", f"a={tmp / 'ft1'}"], str(tmp / "x.safetensors"),
                    progress=False)
    assert not (tmp / "x.safetensors").exists()


# ------------------------------------------------------------------ merging from stores

def _recipe(tmp, method, entries, params=None, name="r.yml"):
    r = {"merge_method": method, "base_model": str(tmp / "base"), "models": entries, "dtype": "float32"}
    if params:
        r["parameters"] = params
    p = tmp / name
    p.write_text(yaml.safe_dump(r))
    return str(p)


def _dequantised_checkpoints(tmp, base, store):
    """ft_t = base + dequantize(tau_t), written as float32 checkpoints (the 'materialised' route)."""
    for task in store.tasks:
        deq = {n: taskvec.dequantize(store.qtv(n, task), backend="cpu").reshape(base[n].shape) for n in base}
        write(tmp / f"deq_{task}", {n: base[n] + deq[n] for n in base})


def _out(tmp, d):
    ck = Checkpoint(str(tmp / d))
    return {n: ck.read_f32(n) for n in ck.tensors}


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("method,params", [("task_arithmetic", {"lambda": 0.7}),
                                           ("task_arithmetic", {"normalize": True}),
                                           ("ties", {"lambda": 1.2}),
                                           ("negmerge", {"lambda": 0.6})])
def test_merge_from_store_equals_merge_from_dequantised(family, residual, method, params):
    tmp, base, fts = family
    compress(tmp, bits=3, group="32", residual=residual)
    store = ts.Store(str(tmp / "s.safetensors"))
    _dequantised_checkpoints(tmp, base, store)
    ws = [0.5, -0.2, 0.8] if method == "task_arithmetic" else [0.5, 0.3, 0.8]
    from_store = _recipe(tmp, method, [{"store": str(tmp / "s.safetensors"), "task": t, "parameters": {"weight": w}}
                                       for t, w in zip(store.tasks, ws)], params, "a.yml")
    from_deq = _recipe(tmp, method, [{"model": str(tmp / f"deq_{t}"), "parameters": {"weight": w}}
                                     for t, w in zip(store.tasks, ws)], params, "b.yml")
    vm.run(from_store, str(tmp / "o_store"), progress=False)
    vm.run(from_deq, str(tmp / "o_deq"), progress=False)
    a, b = _out(tmp, "o_store"), _out(tmp, "o_deq")
    for n in base:
        np.testing.assert_allclose(a[n], b[n], rtol=1e-5, atol=2e-6 * float(np.abs(base[n]).max()), err_msg=n)


def test_cabs_from_store_equals_definition_on_dequantised(family):
    """CABS from codes (through apply_task_vectors) against its definition on the exact dequantised
    vectors: per group of m flat elements, n largest |tau| among positions no earlier task kept."""
    tmp, base, fts = family
    compress(tmp, bits=3, group="32")
    store = ts.Store(str(tmp / "s.safetensors"))
    ws, n_keep, m = [0.5, 0.3, 0.8], 2, 5
    r = _recipe(tmp, "cabs", [{"store": str(tmp / "s.safetensors"), "task": t, "parameters": {"weight": w}}
                              for t, w in zip(store.tasks, ws)], {"lambda": 0.9, "n": n_keep, "m": m})
    vm.run(r, str(tmp / "o"), progress=False)
    got = _out(tmp, "o")
    for n in base:
        L = base[n].size
        taken = np.zeros(L, bool)
        want = base[n].astype(np.float64).reshape(-1)
        for t, w in zip(store.tasks, ws):
            d = taskvec.dequantize(store.qtv(n, t), backend="cpu").astype(np.float64).reshape(-1)
            keep = np.zeros(L, bool)
            for g in range(0, L, m):
                free = sorted((j for j in range(g, min(L, g + m)) if not taken[j]), key=lambda j: (-abs(d[j]), j))
                keep[free[:n_keep]] = True
            taken |= keep
            want = want + 0.9 * w * np.where(keep, d, 0.0)
        np.testing.assert_allclose(got[n].reshape(-1), want, rtol=1e-5, atol=1e-5, err_msg=n)


def test_ties_density_from_store_equals_definition_on_dequantised(family):
    """With density the trim sees quantised values, which tie often: compare with a float64
    statement of TIES on the exact dequantised vectors (k = int(density * n), ties to the lower index)."""
    tmp, base, fts = family
    compress(tmp, bits=4, group="128")
    store = ts.Store(str(tmp / "s.safetensors"))
    ws = [0.5, 0.3, 0.8]
    r = _recipe(tmp, "ties", [{"store": str(tmp / "s.safetensors"), "task": t,
                               "parameters": {"weight": w, "density": 0.4}} for t, w in zip(store.tasks, ws)])
    vm.run(r, str(tmp / "o"), progress=False)
    got = _out(tmp, "o")
    for n in base:
        deltas = []
        for t, w in zip(store.tasks, ws):
            d = taskvec.dequantize(store.qtv(n, t), backend="cpu").astype(np.float64).reshape(-1)
            k = int(0.4 * d.size)
            keep = np.zeros(d.size, bool)
            keep[np.argsort(-np.abs(d), kind="stable")[:k]] = True
            deltas.append(w * np.where(keep, d, 0.0))
        elected = np.where(sum(deltas) >= 0, 1.0, -1.0)
        agree = [np.sign(d) == elected for d in deltas]
        mixed = sum(np.where(a, d, 0) for a, d in zip(agree, deltas))
        div = sum(np.where(a, w, 0) for a, w in zip(agree, ws))
        want = base[n].astype(np.float64).reshape(-1) + mixed / np.where(div == 0, 1, div)
        np.testing.assert_allclose(got[n].reshape(-1), want, rtol=1e-5, atol=1e-5, err_msg=n)


def test_refuses_store_made_against_another_base(family):
    tmp, base, fts = family
    compress(tmp, bits=4)
    other = {k: v + np.float32(1e-3) for k, v in base.items()}
    write(tmp / "other_base", other)
    r = {"merge_method": "task_arithmetic", "base_model": str(tmp / "other_base"),
         "models": [{"store": str(tmp / "s.safetensors"), "task": "t0", "parameters": {"weight": 1.0}}]}
    p = tmp / "r.yml"
    p.write_text(yaml.safe_dump(r))
    with pytest.raises(vm.RecipeError, match="made against another base"):
        vm.run(str(p), str(tmp / "o"), progress=False)
    assert not (tmp / "o").exists()


@pytest.mark.parametrize("entry,match", [
    ({"task": "nope"}, r"task: expected one of \['t0', 't1', 't2'\]"),
    ({"task": "t0", "method": "dare_ties"}, r"stores merge with task_arithmetic, ties, negmerge, cabs, not dare_ties"),
])
def test_store_recipe_errors(family, entry, match):
    tmp, _, _ = family
    compress(tmp, bits=4)
    method = entry.pop("method", "ties")
    r = _recipe(tmp, method, [{"store": str(tmp / "s.safetensors"), **entry, "parameters": {"weight": 1.0}}])
    with pytest.raises(vm.RecipeError, match=match):
        vm.run(r, str(tmp / "o"), progress=False)


def test_store_merge_does_not_materialise_float32_task_vectors(tmp_path):
    """4 tasks at 4 bits over 16 tensors of 256 KiB (float32): the traced peak of a store merge
    stays under 4 float32 tensors (base, result, codes, I/O), where dequantising the 4 task
    vectors would add 4 more (and a float merge of checkpoints holds 5+)."""
    rng = np.random.default_rng(0)
    base = {f"l{i}.weight": rng.standard_normal((256, 256)).astype(np.float32) for i in range(16)}
    write(tmp_path / "base", base)
    for i in range(4):
        write(tmp_path / f"ft{i}", {k: v + 0.01 * rng.standard_normal(v.shape).astype(np.float32)
                                    for k, v in base.items()})
    ts.compress(str(tmp_path / "base"), [f"t{i}={tmp_path / f'ft{i}'}" for i in range(4)],
                str(tmp_path / "s.safetensors"), bits=4, progress=False)
    r = _recipe(tmp_path, "task_arithmetic", [{"store": str(tmp_path / "s.safetensors"), "task": f"t{i}",
                                               "parameters": {"weight": 0.25}} for i in range(4)])
    tracemalloc.start()
    try:
        vm.run(r, str(tmp_path / "o"), progress=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * 256 * 256 * 4, peak


def test_cli_compress_then_merge(family):
    tmp, base, fts = family
    out = subprocess.run([sys.executable, "-m", "vkern", "taskvec", "compress", "--base", str(tmp / "base"),
                          "--finetuned", str(tmp / "ft0"), str(tmp / "ft1"), "--bits", "2", "--residual",
                          "--group", "64", str(tmp / "cli.safetensors")], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "2 task(s)" in out.stderr and "% of float32 task vectors" in out.stderr and "B/s" in out.stderr
    store = ts.Store(str(tmp / "cli.safetensors"))
    assert store.tasks == ["ft0", "ft1"] and store.qtv("head.weight", "ft1").base.bits == 3
    bad = subprocess.run([sys.executable, "-m", "vkern", "taskvec", "compress", "--base", str(tmp / "nope"),
                          "--finetuned", str(tmp / "ft0"), str(tmp / "x.safetensors")], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and "no such file or directory" in bad.stderr
