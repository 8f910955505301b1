"""vkern.integrations.transformers against the real transformers (and kvpress when installed).

Tiny Llama models built locally from a config (random weights, 2 layers, GQA): no hub access.
"""
import math
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers", reason="transformers not installed (see .ci/run)")

from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402

import vkern  # noqa: E402
import vkern.integrations.transformers as vt  # noqa: E402

NEW = 20


@pytest.fixture(autouse=True, scope="module")
def cpu_kernels():
    """The C++ kernels, pinned (they are what "auto" picks for CPU tensors): a missing build then fails
    here instead of running every decode step on the NumPy reference."""
    before = os.environ.get("VKERN_BACKEND")
    os.environ["VKERN_BACKEND"] = "cpu"
    yield
    if before is None:
        del os.environ["VKERN_BACKEND"]
    else:
        os.environ["VKERN_BACKEND"] = before


def tiny_llama(seed=0, **over):
    torch.manual_seed(seed)
    kw = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256)
    kw.update(over)
    model = LlamaForCausalLM(LlamaConfig(**kw)).eval()
    model.generation_config.pad_token_id = 0
    model.set_attn_implementation("sdpa")
    return model


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 96, (2, 14), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0                                   # left padding, as generate makes it
    ids[1, :5] = 0
    return ids, mask


def gen(model, ids, mask, cache, impl="sdpa", new=NEW):
    if impl in vt._IMPLS:
        vt.enable(model, impl)
    else:
        model.set_attn_implementation(impl)
    try:
        with torch.inference_mode():
            return model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=new,
                                  do_sample=False, output_logits=True, return_dict_in_generate=True)
    finally:
        model.set_attn_implementation("sdpa")


def assert_same(ref, got, atol=2e-5):
    assert torch.equal(ref.sequences, got.sequences)
    assert len(ref.logits) == len(got.logits) == NEW
    for a, b in zip(ref.logits, got.logits):
        torch.testing.assert_close(b, a, atol=atol, rtol=1e-5)


@pytest.fixture(scope="module")
def dense(model, batch):
    return gen(model, *batch, DynamicCache(), "sdpa")


# --------------------------------------------------------------------------- 1. the cache

def test_imports_without_transformers():
    import subprocess
    import sys

    code = ("import sys; sys.modules['transformers'] = None\n"
            "import vkern.integrations.transformers as vt\n"
            "assert vt.IMPL_DENSE == 'vkern'\n"
            "try:\n    vt.VkernCache\nexcept ImportError as e:\n    print('ImportError', e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "ImportError" in r.stdout and "pip install" in r.stdout


def test_cache_with_sdpa_equals_dynamic_cache(model, batch, dense):
    cache = vt.VkernCache(model)
    got = gen(model, *batch, cache, "sdpa")
    assert_same(dense, got, atol=0)                     # same layout, same sdpa calls: bit-identical
    L = batch[0].shape[1] + NEW - 1                      # the last generated token is never fed back
    assert cache.get_seq_length() == L
    for layer in cache.layers:
        assert layer.keys.shape[2] > L                   # preallocated beyond the tokens held
        assert layer.lens == [L, L]


def test_cache_writes_in_place_and_grows_amortised(model, batch, dense):
    cache = vt.VkernCache(model, reserve=3)
    ptrs, caps = [], []
    orig = type(cache.layers[0]).update

    def spy(self, k, v, kw=None):
        out = orig(self, k, v, kw)
        if self is cache.layers[0]:
            ptrs.append(self.keys.data_ptr())
            caps.append(self.keys.shape[2])
        return out

    type(cache.layers[0]).update = spy
    try:
        got = gen(model, *batch, cache, "sdpa")
    finally:
        type(cache.layers[0]).update = orig
    assert_same(dense, got, atol=0)
    # A new buffer only when capacity ran out; the capacity grows geometrically (a few moves, not one per step).
    moves = sum(1 for a, b in zip(ptrs, ptrs[1:]) if a != b)
    assert moves == sum(1 for a, b in zip(caps, caps[1:]) if a != b)
    assert 1 <= moves <= 4 < len(ptrs)
    assert all(b >= math.floor(a * 1.5) for a, b in zip(caps, caps[1:]) if a != b)


def test_vkern_dense_equals_sdpa_and_eager(model, batch, dense):
    calls = []
    orig = vkern.ops.loki.decode_attention

    def counting(*a, **k):
        calls.append(a[0].shape)
        return orig(*a, **k)

    vkern.ops.loki.decode_attention = counting
    try:
        cache = vt.VkernCache(model)
        got = gen(model, *batch, cache, "vkern")
    finally:
        vkern.ops.loki.decode_attention = orig
    assert_same(dense, got)
    assert len(calls) == (NEW - 1) * 2                  # every decode step of both layers
    eager = gen(model, *batch, DynamicCache(), "eager")
    assert torch.equal(eager.sequences, got.sequences)
    layer = cache.layers[0]
    assert layer.lens == [batch[1][0].sum().item() + NEW - 1, batch[1][1].sum().item() + NEW - 1]
    assert cache.get_seq_length() == batch[0].shape[1] + NEW - 1   # positions, padding included


def test_vkern_attention_with_a_dynamic_cache(model, batch, dense):
    got = gen(model, *batch, DynamicCache(), "vkern")
    assert_same(dense, got)


def test_stock_attention_on_a_compacted_cache_is_refused(model, batch):
    cache = vt.VkernCache(model)
    ids, mask = batch
    vt.enable(model, "vkern")
    with torch.inference_mode():
        model(ids, attention_mask=mask, past_key_values=cache)      # rows compacted (left padding)
        model.set_attn_implementation("sdpa")
        nxt = torch.ones((2, 1), dtype=torch.long)
        m2 = torch.cat([mask, torch.ones_like(nxt)], 1)
        model(nxt, attention_mask=m2, past_key_values=cache)        # served by sdpa: wrong layout
        with pytest.raises(RuntimeError, match="vkern"):
            model(nxt, attention_mask=torch.cat([m2, torch.ones_like(nxt)], 1), past_key_values=cache)


# --------------------------------------------------------------------------- 3. Loki

@pytest.fixture(scope="module")
def bases(model):
    g = torch.Generator().manual_seed(7)
    return vt.calibrate_loki(model, torch.randint(1, 96, (1, 300), generator=g))


def test_calibrate_loki_bases_are_pca_of_post_rope_keys(model, bases):
    assert bases.P.shape == (2, 2, 16, 16)
    eye = torch.eye(16)
    for layer in range(2):
        for h in range(2):
            torch.testing.assert_close(bases.P[layer, h].T @ bases.P[layer, h], eye, atol=1e-5, rtol=0)
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(1, 96, (1, 300), generator=g)
    c = DynamicCache()
    with torch.inference_mode():
        model(ids, past_key_values=c)
    k = c.layers[1].keys[0].permute(1, 0, 2)            # [N, H, D]
    want = vkern.loki.pca_basis(k.double())
    torch.testing.assert_close(bases.P[1].double(), torch.as_tensor(want.P), atol=1e-4, rtol=0)


@pytest.mark.parametrize("gqa", ["shared", "per_head"])
def test_loki_full_rank_all_tokens_equals_dense(model, batch, dense, bases, gqa):
    cache = vt.VkernCache(model, loki=bases, rank=16, topk=1.0, num_sink=0, num_recent=0, gqa=gqa)
    got = gen(model, *batch, cache, "vkern_loki")
    assert_same(dense, got, atol=1e-4)
    assert cache.layers[0].rotated and cache.layers[0].kpre.shape[-1] == 16


def test_loki_cache_holds_rotated_keys_and_their_prefix(model, batch, dense, bases):
    """Keys are rotated as they enter the cache (prefill once, then every decode step's new key,
    written in place): the buffers equal DynamicCache's keys times each layer's basis, with the
    left padding removed, and the prefix buffer is their first `rank` columns. V is not rotated."""
    ref_cache = DynamicCache()
    ref = gen(model, *batch, ref_cache, "sdpa")
    cache = vt.VkernCache(model, loki=bases, rank=8, topk=1.0, num_sink=0, num_recent=0)
    got = gen(model, *batch, cache, "vkern_loki")
    assert torch.equal(ref.sequences, got.sequences)
    pads = (batch[1] == 0).sum(dim=1).tolist()
    for i, (layer, rl) in enumerate(zip(cache.layers, ref_cache.layers)):
        L = rl.keys.shape[2]
        assert layer.lens == [L - p for p in pads]
        for b, p in enumerate(pads):
            want_k = rl.keys[b, :, p:].double() @ bases.P[i].double()      # [H_kv, L - p, D] @ [H_kv, D, D]
            torch.testing.assert_close(layer.keys[b, :, :L - p].double(), want_k, atol=2e-5, rtol=1e-5)
            torch.testing.assert_close(layer.kpre[b, :, :L - p], layer.keys[b, :, :L - p, :8], atol=0, rtol=0)
            torch.testing.assert_close(layer.values[b, :, :L - p], rl.values[b, :, p:], atol=2e-5, rtol=1e-5)


def test_loki_key_prefix_matches_full_rows_and_rank_only_steers_selection(model, batch, dense, bases):
    a = gen(model, *batch, vt.VkernCache(model, loki=bases, rank=8, topk=12, num_sink=2, num_recent=4), "vkern_loki")
    b = gen(model, *batch, vt.VkernCache(model, loki=bases, rank=8, topk=12, num_sink=2, num_recent=4,
                                         key_prefix=False), "vkern_loki")
    assert torch.equal(a.sequences, b.sequences)
    for x, y in zip(a.logits, b.logits):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
    # 12 of up to 33 tokens: the decode steps really attend to a subset (logits move off dense);
    # the first token comes from the exact prefill.
    assert torch.equal(a.sequences[:, :15], dense.sequences[:, :15])
    assert max(float((x - y).abs().max()) for x, y in zip(a.logits[1:], dense.logits[1:])) > 1e-3
    # With every token kept, the rank only steers a selection that keeps everything: dense.
    c = gen(model, *batch, vt.VkernCache(model, loki=bases, rank=2, topk=1.0, num_sink=1, num_recent=1),
            "vkern_loki")
    assert_same(dense, c, atol=1e-4)


def test_loki_bases_save_load_and_refuse_another_model(model, bases, tmp_path):
    p = tmp_path / "bases.safetensors"
    bases.save(p)
    back = vt.load_loki_bases(p, model)
    assert torch.equal(back.P, bases.P) and back.name == bases.name and back.config_hash == bases.config_hash
    other = tiny_llama(seed=5)                           # same architecture, other weights
    with pytest.raises(ValueError, match="bases"):
        vt.load_loki_bases(p, other)
    with pytest.raises(ValueError, match="bases"):
        vt.VkernCache(other, loki=bases)
    bigger = tiny_llama(num_hidden_layers=3)
    with pytest.raises(ValueError, match="bases"):
        vt.VkernCache(bigger, loki=bases)


def test_loki_bad_arguments(model, bases):
    with pytest.raises(ValueError, match="rank"):
        vt.VkernCache(model, loki=bases, rank=17)
    with pytest.raises(ValueError, match="topk"):
        vt.VkernCache(model, loki=bases, rank=4, topk=3, num_sink=2, num_recent=2)
    with pytest.raises(ValueError, match="gqa"):
        vt.VkernCache(model, loki=bases, rank=4, gqa="grouped")
    with pytest.raises(TypeError, match="loki"):
        vt.VkernCache(model, loki=bases.P)
    with pytest.raises(ValueError, match="past_key_values"):
        gen(model, *batch_of(2), DynamicCache(), "vkern_loki")


def batch_of(n):
    return torch.randint(1, 96, (1, n)), torch.ones((1, n), dtype=torch.long)


# --------------------------------------------------------------------------- 4. VATP

def test_vatp_budget_equal_to_length_equals_dense(model, batch, dense):
    ids, mask = batch
    cache = vt.VkernCache(model, collect_vatp=True)
    vt.enable(model, "vkern")
    try:
        with torch.inference_mode():
            out = vt.vatp_generate(model, ids, mask, budget=1.0, num_sink=0, num_recent=0, cache=cache,
                                   max_new_tokens=NEW, do_sample=False)
    finally:
        model.set_attn_implementation("sdpa")
    assert torch.equal(out, dense.sequences)


def _colsum_brute(model, ids):
    """Eager attention maps of the prefill: per layer, attention each key receives, summed over
    queries and the query heads of its KV group; and the values."""
    model.set_attn_implementation("eager")
    c = DynamicCache()
    with torch.inference_mode():
        o = model(ids, past_key_values=c, output_attentions=True)
    model.set_attn_implementation("sdpa")
    out = []
    for layer, att in zip(c.layers, o.attentions):           # att [B, Hq, T, T]
        B, Hq, T, _ = att.shape
        H = layer.keys.shape[1]
        cs = att.float().sum(2).view(B, H, Hq // H, T).sum(2)
        out.append(cs * layer.values.abs().sum(-1))
    return out


def test_vatp_pruning_keeps_top_scores_and_positions_match_brute_force(model):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 96, (1, 40), generator=g)
    budget, sinks, recent = 16, 2, 4
    cache = vt.VkernCache(model, collect_vatp=True)
    vt.enable(model, "vkern")
    with torch.inference_mode():
        model(ids[:, :-1], past_key_values=cache)
    before = cache.nbytes()
    vt.vatp_prune_cache(cache, budget=budget, num_sink=sinks, num_recent=recent, reserve=8)
    assert cache.get_seq_length() == 39
    assert cache.nbytes() < before * 0.5                  # new, smaller buffers: the memory really went
    scores = _colsum_brute(model, ids[:, :-1])
    for layer, sc in zip(cache.layers, scores):
        kept = layer.kept_idx[0]                          # [H, budget]
        for h in range(kept.shape[0]):
            s = sc[0, h].clone()
            s[:sinks] = float("inf")
            s[-recent:] = float("inf")
            want = torch.sort(torch.topk(s, budget).indices).values
            assert torch.equal(kept[h], want)
    # Decode on the pruned cache == dense attention over the full cache masked to the kept tokens
    # (per KV head) plus every new token: positions and masks after pruning are right.
    vt.enable(model, "vkern")
    with torch.inference_mode():
        got = model.generate(ids, past_key_values=cache, max_new_tokens=6, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
    keep = [layer.kept_idx[0] for layer in cache.layers]
    model.set_attn_implementation("sdpa")
    ref = _masked_generate(model, ids, keep, got.sequences)
    for a, b in zip(got.logits, ref):
        torch.testing.assert_close(a[0], b, atol=1e-4, rtol=1e-4)


def _masked_generate(model, ids, keep, seq):
    """Logits of each generated token of ``seq`` by full-cache attention with pruned-away prefill
    tokens masked out per KV head (the brute force the pruned cache must reproduce)."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import repeat_kv

    P = ids.shape[1] - 1

    def masked(module, q, k, v, mask, scaling=None, dropout=0.0, **kw):
        T = k.shape[2]
        H = k.shape[1]
        g = q.shape[1] // H
        allow = torch.zeros((H, T), dtype=torch.bool)
        allow[:, P:] = True
        for h in range(H):
            allow[h, keep[module.layer_idx][h]] = True
        if q.shape[2] > 1:                                  # prefill: plain causal
            o = torch.nn.functional.scaled_dot_product_attention(q, repeat_kv(k, g), repeat_kv(v, g),
                                                                 is_causal=True, scale=scaling)
        else:
            m = allow.repeat_interleave(g, 0)[None, :, None, :]
            o = torch.nn.functional.scaled_dot_product_attention(q, repeat_kv(k, g), repeat_kv(v, g),
                                                                 attn_mask=m, scale=scaling)
        return o.transpose(1, 2).contiguous(), None

    AttentionInterface.register("vkern_test_masked", masked)
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionMaskInterface.register("vkern_test_masked", sdpa_mask)
    model.set_attn_implementation("vkern_test_masked")
    out = []
    try:
        c = DynamicCache()
        with torch.inference_mode():
            model(ids[:, :P], past_key_values=c)
            for t in range(P, seq.shape[1] - 1):
                lg = model(seq[:, t:t + 1], past_key_values=c, position_ids=torch.tensor([[t]])).logits
                out.append(lg[0, -1])
    finally:
        model.set_attn_implementation("sdpa")
    return out


def test_vatp_bad_arguments(model, batch):
    cache = vt.VkernCache(model, collect_vatp=True)
    with pytest.raises(ValueError, match="budget"):
        vt.vatp_prune_cache(cache, budget=5, num_sink=4, num_recent=2)
    with pytest.raises(ValueError, match="cache"):
        vt.vatp_prune_cache(cache, budget=8, num_sink=2, num_recent=2)     # nothing prefilled yet
    with pytest.raises(TypeError, match="cache"):
        vt.vatp_prune_cache(DynamicCache(), budget=8)
    with pytest.raises(ValueError, match="budget"):
        vt.vatp_prune_cache(cache, budget=1.5)
    plain = vt.VkernCache(model)
    vt.enable(model, "vkern")
    with torch.inference_mode():
        model(batch[0], attention_mask=batch[1], past_key_values=plain)
    model.set_attn_implementation("sdpa")
    with pytest.raises(ValueError, match="collect_vatp"):
        vt.vatp_prune_cache(plain, budget=8, num_sink=2, num_recent=2)
    with pytest.raises(ValueError, match="model"):
        vt.vatp_generate(model, *batch, budget=8)           # sdpa cannot read a pruned cache


def test_vatp_press_in_kvpress(model):
    kvpress = pytest.importorskip("kvpress", reason="kvpress not installed (see .ci/run)")
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(1, 96, (1, 32), generator=g)
    press = vt.VATPPress(compression_ratio=0.5)
    assert isinstance(press, kvpress.ScorerPress)
    scores = _colsum_brute(model, ids)
    c = DynamicCache()
    with torch.inference_mode(), press(model):
        model(ids, past_key_values=c)
    full = DynamicCache()
    with torch.inference_mode():
        model(ids, past_key_values=full)
    for layer, ref, sc in zip(c.layers, full.layers, scores):
        assert layer.keys.shape[2] == 16                  # kvpress kept 1 - 0.5 of 32 tokens
        idx = sc.topk(16, dim=-1).indices                  # VATP's own ranking, from eager attention maps
        want = ref.keys.gather(2, idx[..., None].expand(-1, -1, -1, ref.keys.shape[-1]))
        torch.testing.assert_close(layer.keys, want)


def _word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.WordLevel({f"w{i}": i for i in range(96)}, unk_token="w95"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="w95", pad_token="w95", bos_token="w94",
                                   eos_token="w93")


def test_vatp_press_in_the_kvpress_pipeline_matches_vatp_generate():
    """kvpress's own pipeline with VATPPress (kvpress prunes, decodes with explicit positions)
    answers as vatp_prune_cache + generate on a VkernCache does with the same budget and no
    protected tokens: the same tokens kept, the same positions."""
    pytest.importorskip("kvpress", reason="kvpress not installed (see .ci/run)")
    from transformers import pipeline

    tok = _word_tokenizer()
    model = tiny_llama(seed=11, initializer_range=0.3)    # larger weights: a greedy answer that varies
    g = torch.Generator().manual_seed(9)
    words = [f"w{int(i)}" for i in torch.randint(0, 93, (41,), generator=g)]
    context, question = " ".join(words[:35]), " ".join(words[35:])
    model.generation_config.eos_token_id = 93
    model.generation_config.pad_token_id = 95            # generate would mask a pad id found in the input
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tok, device="cpu")
    with torch.inference_mode():
        answer = pipe(context, question=question, press=vt.VATPPress(compression_ratio=0.5),
                      max_new_tokens=8)["answer"]
    ctx = tok.encode("w94" + context, return_tensors="pt", add_special_tokens=False)    # the pipeline's context
    q = tok.encode(question, return_tensors="pt", add_special_tokens=False)
    cache = vt.VkernCache(model, collect_vatp=True)
    vt.enable(model, "vkern")
    try:
        with torch.inference_mode():
            model(ctx, past_key_values=cache)
            vt.vatp_prune_cache(cache, budget=int(ctx.shape[1] * 0.5), num_sink=0, num_recent=0)
            out = model.generate(torch.cat([ctx, q], 1), past_key_values=cache, max_new_tokens=8, do_sample=False)
    finally:
        model.set_attn_implementation("sdpa")
    ours = tok.decode(out[0, ctx.shape[1] + q.shape[1]:], skip_special_tokens=True)
    assert len(answer.split()) >= 2
    assert ours == answer


# --------------------------------------------------------------------------- 5. what is refused

def test_sliding_window_models_are_refused_by_the_vkern_attention():
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    m = MistralForCausalLM(MistralConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, sliding_window=8)).eval()
    with pytest.raises(ValueError, match="sliding"):
        vt.enable(m, "vkern")
    with pytest.raises(ValueError, match="sliding"):
        vt.VkernCache(m)
    vt.register()
    m.set_attn_implementation("vkern")                     # switched by hand: refused at the first call
    with pytest.raises(ValueError, match="sliding"), torch.inference_mode():
        m(torch.randint(1, 96, (1, 12)))


def test_models_bypassing_the_attention_interface_are_refused():
    from transformers import BloomConfig, BloomForCausalLM

    m = BloomForCausalLM(BloomConfig(vocab_size=96, hidden_size=64, n_layer=2, n_head=4)).eval()
    with pytest.raises(ValueError, match="AttentionInterface"):
        vt.enable(m, "vkern")
    with pytest.raises(ValueError, match="impl"):
        vt.enable(m, "flash")


# --------------------------------------------------------------------------- docs

def test_readme_snippet_runs(tmp_path, capsys):
    import pathlib
    import re

    text = (pathlib.Path(__file__).resolve().parents[2] / "README.md").read_text()
    sec = text.split("## transformers: Loki and VATP inside `model.generate`", 1)[1]
    code = re.search(r"```python\n(.*?)```", sec, re.S).group(1)
    torch.manual_seed(0)
    exec(compile(code, "README.md[transformers]", "exec"), {})
    seen = capsys.readouterr().out.split()[0]
    assert int(seen) == 40 + 8 - 1                        # positions seen, not the pruned length
