"""Bench data for one ColBERT training step's scoring (forward + backward of ColBERTScores):
vkern's differentiable MaxSim against PyLate's torch path (einsum over [Q, Qd, Lq, Ld] per document
group, mask multiply, max, sum; autograd through it), and the NumPy reference. Peak extra memory of
each is measured in a fresh process (resident-set growth), as the VATP colsum bench does; the row names
give vkern's peak as a fraction of PyLate's, whole (the measure) and beyond the gradients both return."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import List

import vkern
from vkern.bench import Contender, Workload


def make_batch(Q: int, Lq: int, N: int, Ld: int, D: int, seed: int = 0):
    """queries (Q, Lq, D), documents (Q, N, Ld, D), documents_mask (Q, N, Ld): lengths Ld/2..Ld and
    ~5% of the tokens inside skipped (PyLate's Contrastive masks punctuation: not a prefix)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(Q, Lq, D, generator=g), dim=-1)
    d = torch.nn.functional.normalize(torch.randn(Q, N, Ld, D, generator=g), dim=-1)
    lengths = torch.randint(Ld // 2, Ld + 1, (Q, N), generator=g)
    dm = (torch.arange(Ld)[None, None] < lengths[..., None]) & (torch.rand(Q, N, Ld, generator=g) > 0.05)
    return q, d, dm.float()


def torch_colbert_scores(q, d, dm):
    """PyLate's formulation (used where PyLate is not installed): per document group j, einsum to
    [Q, Qd, Lq, Ld], multiply by the mask, max over document tokens, sum over query tokens."""
    import torch

    groups = []
    for j in range(d.shape[1]):
        sim = torch.einsum("ash,bth->abst", q, d[:, j]) * dm[:, j][None, :, None, :]
        groups.append(sim.max(dim=-1).values.sum(dim=-1))
    return torch.stack(groups, dim=2).reshape(q.shape[0], -1)


def scorer(which: str):
    """(q, d, dm) -> scores [Q, Qd*N] for "vkern", "pylate" (PyLate's torch backend, or its
    formulation if PyLate is not installed) or "reference" (vkern.maxsim's NumPy backend)."""
    if which == "vkern":
        from vkern.integrations.pylate import ColBERTScores
        s = ColBERTScores()
        return lambda q, d, dm: s(q, d, None, dm)
    if which == "pylate":
        try:
            from pylate.scores import ColBERTScores as PL
        except Exception:
            return torch_colbert_scores
        s = PL()
        return lambda q, d, dm: s(q, d, None, dm, backend="torch")
    if which == "reference":
        import torch

        def ref(q, d, dm):       # exact masking on packed unmasked tokens (PyLate's 0s differ only in value)
            Qd, N, Ld, D = d.shape
            flat, m = d.reshape(Qd * N, Ld, D), dm.reshape(Qd * N, Ld).bool()
            offsets = torch.zeros(Qd * N + 1, dtype=torch.int64)
            torch.cumsum(m.sum(1), 0, out=offsets[1:])
            return vkern.maxsim(q, flat[m], doc_offsets=offsets, backend="reference")
        return ref
    raise ValueError(which)


def train_step(score, q, d, dm):
    """Forward + backward of an in-batch contrastive loss on the scores (query i's positive at i*N)."""
    import torch

    q = q.detach().requires_grad_(True)
    d = d.detach().requires_grad_(True)
    s = score(q, d, dm)
    labels = torch.arange(q.shape[0]) * d.shape[1]
    loss = torch.nn.functional.cross_entropy(s, labels)
    gq, gd = torch.autograd.grad(loss, [q, d])
    return loss, gq, gd


_PEAK_SCRIPT = r"""
import json, sys, torch, vkern
which, Q, Lq, N, Ld, D, threads = sys.argv[1], *map(int, sys.argv[2:8])
torch.set_num_threads(threads); vkern.set_num_threads(threads)
from vkern.bench_maxsim_train import make_batch, scorer, train_step

def status_kb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])

q, d, dm = make_batch(Q, Lq, N, Ld, D)
score = scorer(which)
train_step(score, q[:2, :4], d[:2, :2, :16], dm[:2, :2, :16])        # load every module first
open("/proc/self/clear_refs", "w").write("5")                       # peak (VmHWM) := current RSS
base = status_kb("VmRSS")
out = train_step(score, q, d, dm)
print(json.dumps({"extra_mb": (status_kb("VmHWM") - base) / 1024.0}))
"""


def peak_extra_mb(which: str, Q: int, Lq: int, N: int, Ld: int, D: int, threads: int) -> float:
    """Peak resident-memory growth (MB) of one training step's scoring (forward + backward), fresh process.
    The outputs (the gradients, 4 bytes per input element) are part of it for every contender."""
    out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, which, str(Q), str(Lq), str(N), str(Ld), str(D),
                          str(threads)], capture_output=True, text=True, timeout=900,
                         env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-500:])
    return float(json.loads(out.stdout.strip().splitlines()[-1])["extra_mb"])


def peaks_interleaved(Q: int, Lq: int, N: int, Ld: int, D: int, threads: int, rounds: int = 1) -> dict:
    """{"vkern": [MB...], "pylate": [MB...]}: peak_extra_mb of each, alternating vkern / PyLate for
    `rounds` rounds (a fresh process every time), so machine drift hits both alike."""
    out = {"vkern": [], "pylate": []}
    for _ in range(rounds):
        for which in ("vkern", "pylate"):
            out[which].append(peak_extra_mb(which, Q, Lq, N, Ld, D, threads))
    return out


def gradient_mb(Q: int, Lq: int, N: int, Ld: int, D: int) -> float:
    """MB of the float32 gradients every contender returns (queries + documents): part of both peaks."""
    return 4.0 * (Q * Lq * D + Q * N * Ld * D) / 2**20


def memory_summary(vkern_mb: float, pylate_mb: float, grads_mb: float, short: bool = False) -> str:
    """Both figures, labelled: the whole peak (the measure), and the peak beyond the gradients."""
    beyond_v, beyond_p = vkern_mb - grads_mb, pylate_mb - grads_mb
    tail = (f"1/{beyond_p / beyond_v:.0f}" if beyond_v > 0 else "~0")
    if short:    # a bench-table row name
        return (f"peak +{vkern_mb:.0f} MB: 1/{pylate_mb / vkern_mb:.1f} of PyLate's, {tail} beyond the "
                f"{grads_mb:.0f} MB of gradients")
    return (f"peak +{vkern_mb:.0f} MB = 1/{pylate_mb / vkern_mb:.1f} of PyLate's +{pylate_mb:.0f} MB; beyond the "
            f"{grads_mb:.0f} MB of gradients both return: +{beyond_v:.1f} vs +{beyond_p:.0f} MB = {tail}")


def train_workloads(quick: bool, threads: int) -> List[Workload]:
    try:
        import torch
        torch.set_num_threads(threads)
    except Exception:  # pragma: no cover - torch is optional
        return []
    if not vkern.available_backends("maxsim")["cpu"][0]:
        return []
    Q, Lq, N, Ld, D = (8, 32, 8, 256, 128) if quick else (16, 32, 16, 512, 128)
    q, d, dm = make_batch(Q, Lq, N, Ld, D)
    tokens = float(dm.sum())
    # forward: 2*Q*Lq*D per scored token per query; backward: two scatters of 2*D per (query token, doc)
    flops = 2.0 * Q * Lq * D * tokens + 4.0 * Q * Lq * D * Q * N
    w = Workload("maxsim", f"training step (fwd+bwd of ColBERTScores) {Q} queries x {Lq} tok, {N} docs/query "
                 f"x {Ld} tok (masked), D={D}", bytes=float(q.nbytes + 2 * d.nbytes), flops=flops)
    try:
        peaks = peaks_interleaved(Q, Lq, N, Ld, D, threads)
        mem = {"pylate": f"peak +{peaks['pylate'][0]:.0f} MB",
               "vkern": memory_summary(peaks["vkern"][0], peaks["pylate"][0], gradient_mb(Q, Lq, N, Ld, D), short=True)}
    except Exception as exc:  # pragma: no cover
        mem = {w: f"peak ? ({type(exc).__name__})" for w in ("vkern", "pylate")}
    try:
        import pylate.scores  # noqa: F401
        peer = "PyLate torch"
    except Exception:
        peer = "torch einsum (PyLate's formulation)"
    ref = scorer("reference")
    w.contenders.append(Contender("vkern reference fwd+bwd", lambda: train_step(ref, q, d, dm), "reference",
                                  note="NumPy float64, exact masks"))
    vk, pl = scorer("vkern"), scorer("pylate")
    w.contenders.append(Contender(f"{peer} fwd+bwd ({mem['pylate']})", lambda: train_step(pl, q, d, dm), "peer",
                                  note="[Q, Qd, Lq, Ld] per group, autograd"))
    w.contenders.append(Contender(f"vkern cpu fwd+bwd ({mem['vkern']})", lambda: train_step(vk, q, d, dm), "vkern",
                                  note="argmax forward, scatter backward"))
    return [w]
