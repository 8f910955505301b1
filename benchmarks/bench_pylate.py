"""Rerank 32 queries x 32 tokens against 1,000 docs of 64-300 tokens (padded to 300, masks), D=128:
vkern.integrations.pylate.colbert_scores vs pylate.scores.colbert_scores (torch), same run, 2 threads.

    python benchmarks/bench_pylate.py
"""
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


if __name__ == "__main__":
    main()
