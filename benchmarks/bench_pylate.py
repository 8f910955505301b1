"""Rerank 32 queries x 32 tokens against 1,000 docs of 64-300 tokens (padded to 300, masks), D=128:
vkern.integrations.pylate.colbert_scores vs pylate.scores.colbert_scores (torch), same run, 2 threads.

Training step: forward + backward of ColBERTScores (in-batch contrastive cross-entropy on the scores),
16 queries x 32 tokens, 16 documents per query of 512 tokens (masked: lengths 256-512, ~5% skipped
inside, as PyLate's Contrastive masks punctuation), D=128: vkern vs PyLate's torch path and the NumPy
reference, same run; peak extra memory of each in a fresh process.

    python benchmarks/bench_pylate.py            # both
    python benchmarks/bench_pylate.py train      # the training step only
"""
import statistics
import sys
import time

import torch

import pylate.scores as ps
from vkern.integrations import pylate as vp


def best(fn, reps=3):
    fn()
    t = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        t.append(time.perf_counter() - t0)
    return min(t)


def main():
    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    Q, Lq, N, Ld, D = 32, 32, 1000, 300, 128
    q = torch.nn.functional.normalize(torch.randn(Q, Lq, D, generator=g), dim=-1)
    lengths = torch.randint(64, Ld + 1, (N,), generator=g)
    dm = (torch.arange(Ld)[None] < lengths[:, None]).float()
    d = torch.nn.functional.normalize(torch.randn(N, Ld, D, generator=g), dim=-1) * dm[:, :, None]
    qm = torch.ones(Q, Lq)
    want = ps.colbert_scores(q, d, qm, dm, backend="torch")
    got = vp.colbert_scores(q, d, qm, dm)
    err = (got - want).abs().max().item()
    t_pl = best(lambda: ps.colbert_scores(q, d, qm, dm, backend="torch"))
    t_vk = best(lambda: vp.colbert_scores(q, d, qm, dm))
    t_ex = best(lambda: vp.colbert_scores(q, d, qm, dm, exact=True))
    flops = 2.0 * Q * Lq * int(lengths.sum()) * D
    print(f"rerank {Q}x{Lq} vs {N} docs (64-300 tok, padded {Ld}), D={D}, 2 threads; max |diff| vs PyLate {err:.2e}")
    print(f"pylate torch        {t_pl*1e3:9.1f} ms")
    print(f"vkern (PyLate sem.) {t_vk*1e3:9.1f} ms   {t_pl/t_vk:5.2f}x PyLate   {flops/t_vk/1e9:6.1f} GFLOP/s useful")
    print(f"vkern exact=True    {t_ex*1e3:9.1f} ms   {t_pl/t_ex:5.2f}x PyLate")


def train(Q=16, Lq=32, N=16, Ld=512, D=128, threads=2, rounds=3):
    import vkern
    from vkern.bench_maxsim_train import gradient_mb, make_batch, memory_summary, peaks_interleaved, scorer, train_step

    torch.set_num_threads(threads)
    vkern.set_num_threads(threads)
    q, d, dm = make_batch(Q, Lq, N, Ld, D)
    fns = {w: scorer(w) for w in ("pylate", "vkern", "reference")}
    res = {w: train_step(f, q, d, dm) for w, f in fns.items()}
    for w in ("vkern", "reference"):
        dl = abs(res[w][0].item() - res["pylate"][0].item())
        dg = max((a - b).abs().max().item() for a, b in zip(res[w][1:], res["pylate"][1:]))
        print(f"{w:9s} vs PyLate: |loss diff| {dl:.2e}, max |grad diff| {dg:.2e}")
    runs = {w: [] for w in fns}            # interleaved: one run of each contender per round, medians
    for r in range(3):
        for w, f in fns.items():
            if w == "reference" and r == 2:
                continue
            t0 = time.perf_counter()
            train_step(f, q, d, dm)
            runs[w].append(time.perf_counter() - t0)
    t = {w: statistics.median(v) for w, v in runs.items()}
    # peak extra memory: a fresh process per measurement, vkern and PyLate alternating, median of `rounds`
    peaks = peaks_interleaved(Q, Lq, N, Ld, D, threads, rounds)
    mem = {w: statistics.median(v) for w, v in peaks.items()}
    grads_mb = gradient_mb(Q, Lq, N, Ld, D)
    print(f"training step (fwd+bwd of ColBERTScores): {Q} queries x {Lq} tok, {N} docs/query x {Ld} tok (masked), "
          f"D={D}, {threads} threads")
    print(f"pylate torch        {t['pylate']*1e3:9.1f} ms   peak +{mem['pylate']:.0f} MB")
    print(f"vkern reference     {t['reference']*1e3:9.1f} ms")
    print(f"vkern cpu           {t['vkern']*1e3:9.1f} ms   peak +{mem['vkern']:.0f} MB   "
          f"{t['pylate']/t['vkern']:5.2f}x PyLate, {t['reference']/t['vkern']:5.2f}x reference")
    print(f"memory (median of {rounds} fresh processes each, interleaved): {memory_summary(mem['vkern'], mem['pylate'], grads_mb)}")
    print("  every run (MB): " + "; ".join(f"{w} " + ", ".join(f"{x:.1f}" for x in v) for w, v in peaks.items()))


if __name__ == "__main__":
    if "train" not in sys.argv[1:]:
        main()
    train()
