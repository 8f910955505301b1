"""GPU checks that the CPU-only CI cannot make (run by benchmarks/gpu_check.sh on a GPU node):

1. CUDA-graph capture and replay of a decode step (decode_attention, loki_attention) and of a VATP
   scoring + pruning step (attention_colsum, value_l1, vatp_prune into a pool), seq_lens on the GPU,
   replayed with new lengths, against eager calls.
2. > 2**31-element tensors (int64 offsets): value_l1, vatp_prune, decode_attention on a cache of
   2**24 + 64 tokens x 128 dims (bf16, 4.3 GB each), against torch on the rows past 2**31 elements.
3. Grids past 65,535 on the old y axes: attention_colsum with T/32 and loki approx with T/64 above
   65,535, delta_linear with N/32 above 65,535, against torch.
4. With two or more GPUs: every op on cuda:1 while cuda:0 is current, against the same op on cuda:0.

Prints one PASS/FAIL line per check with its max error; exits 1 on any failure.
`--small` runs the same code on tiny shapes (CPU, TRITON_INTERPRET=1), so the script itself is tested
without a GPU: the graph steps run eagerly there against the reference backend (no capture), and the
multi-GPU part skips.
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

import vkern

FAILED = []


def check(name, fn):
    start = time.time()
    try:
        err, tol = fn()
        ok = bool(err <= tol)
        msg = f"max err {err:.3g} (tol {tol:.3g})"
    except Exception as exc:  # noqa: BLE001 - report and go on
        ok, msg = False, f"{type(exc).__name__}: {str(exc)[:300]}"
    print(f"{'PASS' if ok else 'FAIL'} {name:58s} {msg}  [{time.time() - start:.1f} s]", flush=True)
    if not ok:
        FAILED.append(name)


def dense_ref(q, k, v, lens, scale):
    """float32 torch decode attention, one sequence at a time."""
    B, Hq, D = q.shape
    G = Hq // k.shape[1]
    out = torch.empty(B, Hq, D, dtype=torch.float32, device=q.device)
    for b in range(B):
        n = int(lens[b])
        kk = k[b, :, :n].float().repeat_interleave(G, 0)
        vv = v[b, :, :n].float().repeat_interleave(G, 0)
        p = torch.softmax(torch.einsum("hd,htd->ht", q[b].float(), kk) * scale, -1)
        out[b] = torch.einsum("ht,htd->hd", p, vv)
    return out


def graph_steps(dev, small):
    """{name: (step(backend) -> tuple of tensors, the seq_lens tensor it reads, lengths to replay with)}:
    a dense and a Loki decode step, and a VATP scoring + pruning step (attention_colsum of the last Tq
    queries, non-causal so every sequence gets scores, value_l1, vatp_prune into a preallocated pool),
    each with seq_lens on the device."""
    B, Hq, H, T, D, Tq = (4, 4, 2, 64, 16, 8) if small else (4, 32, 8, 4096, 128, 64)
    dt = torch.float32 if small else torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(B, Hq, D, device=dev, dtype=dt, generator=g)
    k = torch.randn(B, H, T, D, device=dev, dtype=dt, generator=g)
    v = torch.randn(B, H, T, D, device=dev, dtype=dt, generator=g)
    q_last = torch.randn(B, Hq, Tq, D, device=dev, dtype=dt, generator=g)
    lens = torch.tensor([T, T // 4, 17, 3 * T // 4], device=dev)
    replays = ([T, T // 4, 17, 3 * T // 4], [1, T, T // 2, 13 if small else 77])
    rank, topk, budget = (8, 12, 24) if small else (32, 256, 1024)
    pool = (torch.empty(B, H, budget + 8, D, device=dev, dtype=dt), torch.empty(B, H, budget + 8, D, device=dev,
                                                                              dtype=dt))

    def vatp_step(backend):
        att = vkern.vatp.attention_colsum(q_last, k, causal=False, seq_lens=lens, backend=backend)
        scores = att * vkern.vatp.value_l1(v, backend=backend)
        return vkern.vatp_prune(k, v, scores, budget=budget, num_sink=4, num_recent=8, seq_lens=lens, out=pool,
                                backend=backend)

    return {
        "decode_attention": (lambda b: (vkern.decode_attention(q, k, v, seq_lens=lens, backend=b),), lens, replays),
        "loki_attention": (lambda b: vkern.loki_attention(q, k, v, rank=rank, topk=topk, seq_lens=lens, num_sink=4,
                                                          num_recent=8, return_indices=True, backend=b), lens, replays),
        "vatp colsum + value_l1 + prune": (vatp_step, lens, replays),
    }


def _max_diff(got, want):
    return max((a.double() - b.double()).abs().max().item() if a.numel() else 0.0 for a, b in zip(got, want))


def graph_checks(dev, backends, small):
    """On a GPU: capture each step in a CUDA graph, replay it with new lengths, compare with eager calls
    (exactly). With --small (CPU): the same steps and lengths, eager against the reference backend."""
    for name, (step, lens, replays) in graph_steps(dev, small).items():
        for backend in backends:
            def run(step=step, lens=lens, replays=replays, backend=backend):
                errs = []
                if small:
                    for new in replays:
                        lens.copy_(torch.tensor(new))
                        errs.append(_max_diff([x.clone() for x in step(backend)], step("reference")))
                    return max(errs), 1e-4
                s = torch.cuda.Stream()
                s.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(s):
                    for _ in range(2):      # warm-up (Triton compiles) outside the capture
                        step(backend)
                torch.cuda.current_stream().wait_stream(s)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    out = step(backend)
                for new in replays:
                    lens.copy_(torch.tensor(new, device=dev))
                    graph.replay()
                    torch.cuda.synchronize()
                    replayed = [x.clone() for x in out]
                    errs.append(_max_diff(replayed, step(backend)))
                return max(errs), 0.0     # replay must equal eager exactly
            what = "eager == reference (CPU)" if small else "replay == eager"
            check(f"cuda graph step: {name} [{backend}] {what}", run)


def big_offset_checks(dev, backends, small):
    T = 300 if small else 2**24 + 64          # 2**24 + 64 tokens x 128 = 2**31 + 8192 elements
    D = 128
    dt = torch.float32 if small else torch.bfloat16
    v = torch.empty(1, 1, T, D, device=dev, dtype=dt)
    v.normal_()
    tail = slice(T - 64, T)
    for backend in backends:
        def l1(backend=backend):
            got = vkern.vatp.value_l1(v, backend=backend)
            want = v[0, 0, tail].float().abs().sum(-1)
            return (got[0, 0, tail] - want).abs().max().item() / want.abs().max().item(), 1e-5
        check(f"> 2**31 elements: value_l1 [{backend}] (last rows)", l1)

        def prune(backend=backend):
            scores = torch.zeros(1, 1, T, device=dev)
            scores[0, 0, T - 200] = 1.0          # one middle token past 2**31 elements, plus the recent ones
            kk, vv, idx, _ = vkern.vatp_prune(v, v, scores, budget=40, num_sink=4, num_recent=32, backend=backend)
            # 4 sinks, 32 recent, 4 free slots: the scored token, then the lowest-index zero scores (ties)
            want_idx = list(range(7)) + [T - 200] + list(range(T - 32, T))
            got_idx = idx[0, 0].tolist()
            rows = v[0, 0, idx[0, 0].clamp(min=0)]
            err = (kk[0, 0].float() - rows.float()).abs().max().item()
            return err + (0.0 if got_idx == want_idx else 1.0), 0.0
        check(f"> 2**31 elements: vatp_prune gather [{backend}]", prune)

        def decode(backend=backend):
            q = torch.randn(1, 1, D, device=dev, dtype=dt)
            lens = torch.tensor([T], device=dev)
            got = vkern.decode_attention(q, v, v, seq_lens=lens, backend=backend).float()
            want = dense_ref(q, v, v, [T], D ** -0.5)
            return (got - want).abs().max().item(), 2e-2
        check(f"> 2**31 elements: decode_attention [{backend}]", decode)
    del v


def big_grid_checks(dev, backends, small):
    D = 16
    for backend in backends:
        T = 200 if small else 65535 * 32 + 33
        q = torch.randn(1, 1, 1, D, device=dev)
        k = torch.randn(1, 1, T, D, device=dev)

        def colsum(backend=backend, q=q, k=k):
            got = vkern.vatp.attention_colsum(q, k, causal=False, backend=backend)
            want = torch.softmax((q[0, 0] @ k[0, 0].T) * D ** -0.5, -1)[0]
            return (got[0, 0] - want).abs().max().item(), 1e-6
        check(f"grid: attention_colsum T/32 > 65535 [{backend}]", colsum)

        T2 = 300 if small else 65535 * 64 + 65
        kq = torch.randn(1, 1, T2, D, device=dev)
        qq = torch.randn(1, 1, D, device=dev)

        def loki(backend=backend, kq=kq, qq=qq, T2=T2):
            out, idx = vkern.loki_attention(qq, kq, kq, rank=D, topk=8, return_indices=True, backend=backend)
            s = (kq[0, 0] @ qq[0, 0])
            want = torch.topk(s, 8).indices.sort().values
            return float((idx[0, 0].sort().values != want).sum().item()), 0.0
        check(f"grid: loki approx T/64 > 65535 [{backend}]", loki)

        N = 100 if small else 65535 * 32 + 7
        base = torch.randn(N, D, device=dev)
        tau = np.random.default_rng(0).standard_normal((N, D)).astype(np.float32)
        qtv = vkern.taskvec.quantize(tau, bits=4)
        x = torch.randn(3, D, device=dev)

        def delta(backend=backend, base=base, qtv=qtv, x=x):
            qd = qtv.to(dev)
            got = vkern.delta_linear(x, base, [qd], [0.5], backend=backend)
            w = base + 0.5 * torch.from_numpy(vkern.taskvec.dequantize(qtv)).to(dev)
            want = x @ w.T
            return (got - want).abs().max().item() / want.abs().max().item(), 1e-4
        check(f"grid: delta_linear N/32 > 65535 [{backend}]", delta)


def multi_gpu_checks(backends):
    if torch.cuda.device_count() < 2:
        print("SKIP multi-GPU guard checks: one GPU visible")
        return
    torch.cuda.set_device(0)
    rng = np.random.default_rng(0)
    arrs = dict(q=rng.standard_normal((2, 8, 64)), k=rng.standard_normal((2, 2, 300, 64)),
                docs=rng.standard_normal((500, 64)), qm=rng.standard_normal((3, 16, 64)))
    for backend in backends:
        def on(i, backend=backend):
            t = {n: torch.from_numpy(a.astype(np.float32)).to(f"cuda:{i}") for n, a in arrs.items()}
            lens = torch.tensor([300, 100], device=f"cuda:{i}")
            return [vkern.decode_attention(t["q"], t["k"], t["k"], seq_lens=lens, backend=backend),
                    vkern.loki_attention(t["q"], t["k"], t["k"], rank=16, topk=32, seq_lens=lens, backend=backend),
                    vkern.vatp.attention_colsum(t["q"][:, :, None], t["k"], backend=backend),
                    vkern.maxsim(t["qm"], t["docs"], doc_offsets=torch.tensor([0, 100, 500], device=f"cuda:{i}"),
                                 backend=backend)]

        def compare(on=on):
            a, b = on(0), on(1)
            assert all(y.device == torch.device("cuda", 1) for y in b)
            return max((x.float() - y.float().to("cuda:0")).abs().max().item() for x, y in zip(a, b)), 1e-5
        check(f"multi-GPU: tensors on cuda:1, cuda:0 current [{backend}]", compare)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true", help="tiny shapes (CPU interpreter smoke test)")
    args = ap.parse_args()
    if args.small:
        dev, backends = "cpu", ["triton"]
    else:
        dev, backends = "cuda", ["cuda", "triton"]
        multi_gpu_checks(backends)
    graph_checks(dev, backends, args.small)
    big_grid_checks(dev, backends, args.small)
    big_offset_checks(dev, backends, args.small)
    print(f"{len(FAILED)} failed" + (": " + ", ".join(FAILED) if FAILED else ""))
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
