"""VATP workloads for ``python -m vkern bench --ops vatp`` (and helpers shared
with benchmarks/bench_vatp.py).

- vatp_prune, B=1, H_kv=8, T=32768, D=128, keep 50%, scores given, float32 and
  bfloat16 caches: vkern in place, out of place into freshly allocated
  outputs (pays the first-touch page faults of 2 x 16-32 MB inside the call)
  and out of place into caller-provided buffers reused across calls (out=),
  beside the torch formulation kvpress/H2O use (topk + sort + gather of K and
  V, fresh and into reused buffers via gather(out=)) and the NumPy reference.
  bytes = what the compaction must move (kept rows of K and V, read and
  written) for every contender, so "% copy BW" compares it with a plain large
  copy measured in the same run.
- attention_colsum, Tq=T=4096, Hq=32, H_kv=8, D=128, causal: vkern beside
  eager torch (softmax(QK^T) then the column sum). Peak extra memory of each
  is measured in a fresh subprocess (ru_maxrss growth) and shown as a note.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import List

import numpy as np

import vkern
from vkern.bench import Contender, Workload


def make_cache(B: int, H: int, T: int, D: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((B, H, T, D), dtype=np.float32)
    v = rng.standard_normal((B, H, T, D), dtype=np.float32)
    scores = rng.random((B, H, T), dtype=np.float32)
    return k, v, scores


def torch_prune(k, v, scores, n_keep: int, out=None):
    """The HF-level formulation (kvpress, H2O, SnapKV): per-head top-k of the
    scores, sorted back into positional order, then a gather of K and V
    (into out=(k_out, v_out) when given)."""
    import torch

    idx = scores.topk(n_keep, dim=-1).indices.sort(dim=-1).values
    e = idx[..., None].expand(-1, -1, -1, k.shape[-1])
    if out is not None:
        return torch.gather(k, 2, e, out=out[0]), torch.gather(v, 2, e, out=out[1]), idx
    return torch.gather(k, 2, e), torch.gather(v, 2, e), idx


def eager_colsum(q, k, causal: bool = True):
    """Eager torch: the full [B, Hq, Tq, T] attention matrix, softmax, column sum, GQA group sum."""
    import torch

    B, Hq, Tq, D = q.shape
    H, T = k.shape[1], k.shape[2]
    kk = k.repeat_interleave(Hq // H, dim=1)
    a = torch.matmul(q, kk.transpose(-1, -2)) * (1.0 / D ** 0.5)
    if causal:
        mask = torch.ones(Tq, T, dtype=torch.bool).triu(T - Tq + 1)
        a = a.masked_fill(mask, float("-inf"))
    return a.softmax(-1).sum(-2).view(B, H, Hq // H, T).sum(2)


def numpy_prune(k, v, scores, n_keep: int):
    """Peer: the same formulation in plain NumPy: argpartition for the top n_keep scores per
    head, sort back into positional order, then take_along_axis of K and V."""
    idx = np.argpartition(-scores, n_keep - 1, axis=-1)[..., :n_keep]
    idx.sort(axis=-1)
    e = idx[..., None]
    return np.take_along_axis(k, e, axis=2), np.take_along_axis(v, e, axis=2), idx


def numpy_colsum(q, k, causal: bool = True):
    """Peer: eager NumPy, one query head at a time (so that it holds one Tq x T matrix, not Hq of them):
    scores, causal mask, softmax, column sum, summed over the GQA group."""
    B, Hq, Tq, D = q.shape
    H, T = k.shape[1], k.shape[2]
    G = Hq // H
    out = np.zeros((B, H, T), np.float32)
    mask = np.triu(np.ones((Tq, T), bool), T - Tq + 1) if causal else None
    for b in range(B):
        for h in range(Hq):
            a = q[b, h] @ k[b, h // G].T
            a *= np.float32(1.0 / np.sqrt(D))
            if mask is not None:
                a[mask] = -np.inf
            a -= a.max(axis=-1, keepdims=True)
            np.exp(a, out=a)
            a /= a.sum(axis=-1, keepdims=True)
            out[b, h // G] += a.sum(axis=0)
    return out


_PEAK_SCRIPT = r"""
import json, sys, numpy as np, vkern
which, Tq, T, Hq, H, D, threads = sys.argv[1], *map(int, sys.argv[2:8])
vkern.set_num_threads(threads)

def status_kb(field):   # this process's own counters (ru_maxrss would carry the parent's peak across exec)
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])

rng = np.random.default_rng(0)
q = rng.standard_normal((1, Hq, Tq, D), dtype=np.float32); k = rng.standard_normal((1, H, T, D), dtype=np.float32)
if which == "torch":
    import torch
    from vkern.bench_vatp import eager_colsum
    torch.set_num_threads(threads)
    q, k = torch.from_numpy(q), torch.from_numpy(k)
    eager_colsum(q[:, :, :64], k[:, :, :64])
vkern.vatp.attention_colsum(q[:, :, :64], k[:, :, :64], backend="cpu")   # load everything first
open("/proc/self/clear_refs", "w").write("5")   # reset the peak (VmHWM) to the current RSS
base = status_kb("VmRSS")
out = eager_colsum(q, k) if which == "torch" else vkern.vatp.attention_colsum(q, k, backend="cpu")
print(json.dumps({"extra_mb": (status_kb("VmHWM") - base) / 1024.0}))
"""


def peak_extra_mb(which: str, Tq: int, T: int, Hq: int, H: int, D: int, threads: int) -> float:
    """Peak resident-memory growth (MB) of one attention_colsum call ("vkern", NumPy inputs) or
    the eager torch formulation ("torch"), each in a fresh process."""
    out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, which, str(Tq), str(T), str(Hq), str(H), str(D),
                          str(threads)], capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-500:])
    return float(json.loads(out.stdout.strip().splitlines()[-1])["extra_mb"])


def vatp_workloads(size: str, threads: int) -> List[Workload]:
    from vkern.bench import BF16_HINT, TORCH_HINT, bfloat16_of, missing, optional_torch

    torch = optional_torch(threads)
    out: List[Workload] = []
    cpu_ok = vkern.available_backends("vatp_prune")["cpu"][0]

    # ---- pruning
    B, H, T, D = 1, 8, {"tiny": 512, "quick": 8192, "full": 32768}[size], 128
    n = T // 2
    k, v, scores = make_cache(B, H, T, D)
    for dtype in ("float32", "bfloat16"):
        if dtype == "float32":
            tk, tv = (torch.from_numpy(k), torch.from_numpy(v)) if torch is not None else (k, v)
            nk, nv = k, v                           # the NumPy peer's arrays
        else:
            tk, tv = bfloat16_of(k, torch), bfloat16_of(v, torch)
            nk, nv = bfloat16_of(k), bfloat16_of(v)  # ml_dtypes arrays, or None
        ts = torch.from_numpy(scores) if torch is not None else scores
        es = 4 if dtype == "float32" else 2
        moved = 2.0 * 2 * B * H * n * D * es           # K and V kept rows, read + written
        how = " (ml_dtypes)" if dtype == "bfloat16" and torch is None else ""
        # flops: one comparison per score (the selection); the work is the bytes.
        w = Workload("vatp", f"vatp_prune B={B} H_kv={H} T={T} D={D} keep 50% {dtype}{how}, scores given",
                     bytes=moved, flops=float(B * H * T))
        out.append(w)
        if tk is None:
            w.contenders += [missing("vkern cpu in place / out of place / out=", "vkern", BF16_HINT),
                             missing("numpy argpartition + sort + take", "peer", BF16_HINT)]
            continue
        w.contenders.append(Contender("vkern reference", lambda tk=tk, tv=tv: vkern.vatp_prune(
            tk, tv, ts, budget=n, num_sink=4, num_recent=32, backend="reference"), "reference",
            note="NumPy lexsort + fancy indexing"))
        if torch is not None:
            w.contenders.append(Contender("torch topk + sort + gather", lambda tk=tk, tv=tv: torch_prune(
                tk, tv, ts, n), "peer", note="kvpress / H2O formulation"))
            tbuf = (torch.empty((B, H, n, D), dtype=tk.dtype), torch.empty((B, H, n, D), dtype=tk.dtype))
            w.contenders.append(Contender("torch topk+sort+gather(out=)", lambda tk=tk, tv=tv, tbuf=tbuf: torch_prune(
                tk, tv, ts, n, out=tbuf), "peer", note="the same into reused buffers"))
        else:
            w.contenders.append(missing("torch topk + sort + gather", "peer", TORCH_HINT))
        if nk is not None:
            w.contenders.append(Contender("numpy argpartition + sort + take", lambda nk=nk, nv=nv: numpy_prune(
                nk, nv, scores, n), "peer", note="the same formulation in NumPy"))
        else:
            w.contenders.append(missing("numpy argpartition + sort + take", "peer", "bfloat16 NumPy arrays need "
                                        "ml_dtypes: pip install ml_dtypes"))
        if cpu_ok:
            bk, bv = (tk.clone(), tv.clone()) if torch is not None else (tk.copy(), tv.copy())
            # Re-pruning the same buffer with the same scores makes the same moves: a fair repeat.
            w.contenders.append(Contender("vkern cpu in place", lambda bk=bk, bv=bv: vkern.vatp_prune(
                bk, bv, ts, budget=n, num_sink=4, num_recent=32, inplace=True, backend="cpu"), "vkern",
                note="compacts K and V in their own buffers"))
            w.contenders.append(Contender("vkern cpu out of place (fresh)", lambda tk=tk, tv=tv: vkern.vatp_prune(
                tk, tv, ts, budget=n, num_sink=4, num_recent=32, backend="cpu"), "vkern",
                note="new outputs each call: first-touch page faults inside the call"))
            if torch is not None:
                vbuf = (torch.empty((B, H, n, D), dtype=tk.dtype), torch.empty((B, H, n, D), dtype=tk.dtype))
            else:
                vbuf = (np.empty((B, H, n, D), dtype=tk.dtype), np.empty((B, H, n, D), dtype=tk.dtype))
            w.contenders.append(Contender("vkern cpu out= (reused buffers)", lambda tk=tk, tv=tv, vbuf=vbuf:
                                          vkern.vatp_prune(tk, tv, ts, budget=n, num_sink=4, num_recent=32,
                                                           out=vbuf, backend="cpu"), "vkern",
                                          note="caller-provided outputs, e.g. a preallocated pool"))

    # ---- attention column sums
    Tq = Tc = {"tiny": 128, "quick": 1024, "full": 4096}[size]
    Hq, Hk = 32, 8
    rng = np.random.default_rng(1)
    q = rng.standard_normal((1, Hq, Tq, D), dtype=np.float32)
    kk = rng.standard_normal((1, Hk, Tc, D), dtype=np.float32)
    flops = 2.0 * Hq * D * Tq * Tc / 2               # the least work: QK^T over the causal half, once
    w = Workload("vatp", f"attention_colsum Tq=T={Tc} Hq={Hq} H_kv={Hk} D={D} causal float32",
                 bytes=float(q.nbytes + kk.nbytes + 4 * Hk * Tc), flops=flops)
    # Peak extra memory, each in a fresh process; shown in the contender names (the table has no notes).
    mem = {}
    for which in ("vkern", "torch") if torch is not None else ("vkern",):
        try:
            mem[which] = f"peak +{peak_extra_mb(which, Tq, Tc, Hq, Hk, D, threads):.0f} MB"
        except Exception as exc:  # pragma: no cover
            mem[which] = f"peak ? ({type(exc).__name__})"
    tq, tk = (torch.from_numpy(q), torch.from_numpy(kk)) if torch is not None else (q, kk)
    if cpu_ok:
        w.contenders.append(Contender(f"vkern cpu ({mem['vkern']})", lambda: vkern.vatp.attention_colsum(
            tq, tk, backend="cpu"), "vkern", note="flash-style strips, never Tq x T"))
    if torch is not None:
        w.contenders.append(Contender(f"torch eager ({mem['torch']})", lambda: eager_colsum(tq, tk), "peer",
                                      note="softmax(QK^T).sum: materialises [Hq, Tq, T]"))
    else:
        w.contenders.append(missing("torch eager", "peer", TORCH_HINT))
    w.contenders.append(Contender("numpy eager, one head at a time", lambda: numpy_colsum(q, kk), "peer",
                                  note="holds one Tq x T matrix"))
    if size != "full":
        w.contenders.append(Contender("vkern reference", lambda: vkern.vatp.attention_colsum(
            tq, tk, backend="reference"), "reference", note="NumPy float64"))
    out.append(w)
    return out
