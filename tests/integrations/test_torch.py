"""vkern.integrations.torch: DeltaLinear serving several fine-tunes of one base in one batch,
against each (quantized) fine-tune run separately as a plain transformers model."""
import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from vkern import taskvec  # noqa: E402
from vkern import taskvec_store as ts  # noqa: E402
from vkern.integrations.torch import DeltaLinear, patch_linear_layers, tenants  # noqa: E402

from _tiny_llama import save_family  # noqa: E402


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("tenants")
    base, fts = save_family(root, vocab_size=80, noise=lambda i: 0.01 * (i + 1), linear_only=True)
    return root, base, fts


def _separately(base, store, task):
    """The quantized fine-tune as its own dense model: W + dequantize(tau_task) in every linear."""
    m = copy.deepcopy(base)
    with torch.no_grad():
        for name, mod in m.named_modules():
            if isinstance(mod, torch.nn.Linear) and f"{name}.weight" in store.layout:
                deq = taskvec.dequantize(store.qtv(f"{name}.weight", task), backend="cpu")
                mod.weight.add_(torch.from_numpy(deq))
    return m


@pytest.mark.parametrize("residual,bits", [(False, 8), (True, 2), (False, 4)])
def test_one_batch_of_tenants_equals_each_finetune_separately(family, residual, bits):
    """9 tokens per row (a prefill: each tenant's own merged GEMM), 3 per row (the base GEMM plus
    each tenant's pass over its codes) and 1 per row (a decode step: 4-bit codes multiply straight
    from the nibbles in one pass with the base), each logit against the fine-tune run alone."""
    root, base, fts = family
    path = str(root / f"store_{residual}_{bits}.safetensors")
    ts.compress(str(root / "base"), [f"t{i}={root / f'ft{i}'}" for i in range(3)], path,
                bits=bits, group="32", residual=residual, progress=False)
    store = ts.Store(path)
    served = copy.deepcopy(base)
    # backend="cpu" (what "auto" picks for CPU tensors), named so that a missing build fails here
    replaced = patch_linear_layers(served, store, backend="cpu")
    assert len(replaced) == 2 * 7 + 1 and "lm_head" in replaced             # q k v o gate up down x 2, lm_head
    assert isinstance(served.model.layers[0].self_attn.q_proj, DeltaLinear)
    ids = torch.randint(0, 80, (4, 9), generator=torch.Generator().manual_seed(1))
    tenant = [2, 0, -1, 1]
    with tenants(served, tenant):
        got = served(ids).logits
    with torch.no_grad():
        for b, t in enumerate(tenant):
            ref_model = base if t < 0 else _separately(base, store, f"t{t}")
            want = ref_model(ids[b:b + 1]).logits[0]
            torch.testing.assert_close(got[b], want, rtol=1e-4, atol=1e-4)
            if t >= 0 and bits == 8:     # 8-bit codes: close to the real fine-tune too
                real = fts[t](ids[b:b + 1]).logits[0]
                assert float((want - real).norm() / (real - base(ids[b:b + 1]).logits[0]).norm()) < 0.05
    for tokens in (3, 1):
        with tenants(served, tenant):
            got = served(ids[:, :tokens]).logits
        with torch.no_grad():
            for b, t in enumerate(tenant):
                ref_model = base if t < 0 else _separately(base, store, f"t{t}")
                torch.testing.assert_close(got[b], ref_model(ids[b:b + 1, :tokens]).logits[0], rtol=1e-4, atol=1e-4)
    # outside the block: the base
    with torch.no_grad():
        torch.testing.assert_close(served(ids).logits, base(ids).logits, rtol=1e-5, atol=1e-5)


def test_bad_inputs(family):
    root, base, fts = family
    path = str(root / "s.safetensors")
    ts.compress(str(root / "base"), [f"a={root / 'ft0'}"], path, bits=4, progress=False)
    store = ts.Store(path)
    served = copy.deepcopy(base)
    with pytest.raises(ValueError, match="tenants: the model has no DeltaLinear"):
        with tenants(served, [0]):
            pass
    patch_linear_layers(served, store)
    with pytest.raises(ValueError, match=r"task_ids: every id must be in \[-1, 1\)"):
        with tenants(served, [0, 1]):
            pass
    with pytest.raises(ValueError, match=r"tasks: \['nope'\] not in the store"):
        patch_linear_layers(copy.deepcopy(base), store, tasks=["nope"])
    with pytest.raises(ValueError, match="task_ids: 3 ids for an input"):
        with tenants(served, [0, 0, 0]):
            served(torch.zeros(2, 5, dtype=torch.long))
    q = store.qtv("lm_head.weight", "a")
    with pytest.raises(ValueError, match=r"qtvs\[0\]: expected shape \(3, 64\)"):
        DeltaLinear(torch.zeros(3, 64), [q])
    with pytest.raises(TypeError, match="base_only: expected a sequence of module-name substrings"):
        patch_linear_layers(copy.deepcopy(base), store, base_only="lm_head")


def test_task_less_layers_stay_plain(family):
    """A layer no fine-tune moved (all task vectors exactly zero: a tied or frozen lm_head) and a
    layer named in base_only stay plain nn.Linear, so they cost exactly a dense matmul; the served
    logits still equal each fine-tune run separately; a DeltaLinear with no task vectors is
    F.linear bit for bit, whatever the tenants."""
    root, base, fts = family
    path = str(root / "s_tl.safetensors")
    ts.compress(str(root / "base"), [f"t{i}={root / f'ft{i}'}" for i in range(3)], path, bits=4, group="32",
                progress=False)
    store = ts.Store(path)
    layer = "model.layers.0.mlp.up_proj.weight"
    mapping = {k: [store.qtv(k, f"t{i}") for i in range(3)] for k in store.layout
               if k.endswith("_proj.weight") or k == "lm_head.weight"}
    n_out, n_in = store.layout["lm_head.weight"]["shape"]
    zero = taskvec.quantize(np.zeros((n_out, n_in), dtype=np.float32), bits=4, group_size=32)
    mapping["lm_head.weight"] = [zero] * 3                               # no fine-tune moved lm_head
    served = copy.deepcopy(base)
    replaced = patch_linear_layers(served, mapping, base_only=["layers.1.self_attn.o_proj"], backend="cpu")
    assert "lm_head" not in replaced and "model.layers.1.self_attn.o_proj" not in replaced
    assert type(served.lm_head) is torch.nn.Linear
    assert type(served.model.layers[1].self_attn.o_proj) is torch.nn.Linear
    assert isinstance(served.get_submodule(layer[:-len(".weight")]), DeltaLinear)
    assert len(replaced) == 2 * 7 - 1
    ids = torch.randint(0, 80, (3, 5), generator=torch.Generator().manual_seed(3))
    tenant = [1, -1, 0]
    with tenants(served, tenant):
        got = served(ids).logits
    with torch.no_grad():
        for b, t in enumerate(tenant):
            ref_model = copy.deepcopy(base)
            if t >= 0:
                for k, qs in mapping.items():
                    name = k[:-len(".weight")]
                    if name in replaced:
                        ref_model.get_submodule(name).weight.add_(
                            torch.from_numpy(taskvec.dequantize(qs[t], backend="cpu")))
            torch.testing.assert_close(got[b], ref_model(ids[b:b + 1]).logits[0], rtol=1e-4, atol=1e-4)
    lin = base.model.layers[0].mlp.up_proj
    plain = DeltaLinear(lin.weight, [], lin.bias)
    plain.task_ids = torch.tensor([0, 1])
    x = torch.randn(2, 3, lin.in_features)
    with torch.no_grad():
        assert torch.equal(plain(x), torch.nn.functional.linear(x, lin.weight, lin.bias))
