"""GPU checks that the CPU-only CI cannot make (run by benchmarks/gpu_check.sh on a GPU node):

1. CUDA-graph capture and replay of a decode step (decode_attention, loki_attention) and of a VATP
   scoring + pruning step (attention_colsum, value_l1, vatp_prune into a pool), seq_lens on the GPU,
   replayed with new lengths, against eager calls.
2. > 2**31-element tensors (int64 offsets): value_l1, vatp_prune, decode_attention on a cache of
   2**24 + 64 tokens x 128 dims (bf16, 4.3 GB each), against torch on the rows past 2**31 elements.
3. Grids past 65,535 on the old y axes: attention_colsum with T/32 and loki approx with T/64 above
   65,535, delta_linear with N/32 above 65,535, against torch.
4. With two or more GPUs: every op on cuda:1 while cuda:0 is current, against the same op on cuda:0.
5. MaxSim's backward kernels (kernels/maxsim_grad.py, csrc/cuda/maxsim_grad.cu): argmax and gradients
   against the NumPy reference (packed / padded + mask, float32 / bfloat16; inputs on a 1/2 grid, so the
   argmax must match exactly), the CUDA backward bit-reproducible; then the GPU shape of the
   training-step benchmark (forward + backward of ColBERTScores, 16 queries x 32 tokens, 16 docs per
   query x 512 tokens, D = 128): vkern (cuda, triton) vs PyLate's torch path, median time and
   torch.cuda.max_memory_allocated above the inputs, in one run (a BENCH line each).
6. Retrieval memory (docs/ops/retrieval_memory.md): int8 MaxSim on the device (QuantizedDocs) against the
   reference's int8 definition, plus a timing line against the float32 MaxSim of the same backend; MUVERA
   encodings on the device against the cpu backend (bit for bit) and a torch implementation, plus a
   timing line against that torch implementation.

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


def _grid(rng, shape):
    return (rng.integers(-2, 3, size=shape) / 2.0).astype(np.float32)


def maxsim_grad_checks(dev, backends, small):
    from vkern.ops import maxsim_grad as G

    rng = np.random.default_rng(0)
    B, Lq, N, Ld, D = (2, 5, 4, 40, 16) if small else (16, 32, 64, 512, 128)
    q = _grid(rng, (B, Lq, D))
    qlens = rng.integers(0, Lq + 1, size=B)
    qlens[0] = Lq
    lengths = rng.integers(0, Ld + 1, size=N)
    lengths[0] = Ld
    padded = _grid(rng, (N, Ld, D))
    mask = rng.random((N, Ld)) > 0.05
    keep = np.arange(Ld)[None] < lengths[:, None]
    packed, offsets = padded[keep], np.concatenate([[0], np.cumsum(lengths)])
    g = rng.standard_normal((B, N)).astype(np.float32)
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(dev)
    for layout, docs, kw, m in (("packed", packed, dict(doc_offsets=offsets), None),
                                ("padded+mask", padded, dict(doc_lengths=lengths), mask)):
        s_ref, a_ref = G.maxsim_argmax_impl(q, docs, query_lengths=qlens, backend="reference", doc_mask=m, **kw)
        gq_ref, gd_ref = G.maxsim_backward_impl(g, a_ref, q, docs, query_lengths=qlens, backend="reference", **kw)
        tkw = {k: t(v) for k, v in kw.items()}
        for backend in backends:
            for dtype in (torch.float32, torch.bfloat16):
                def run(backend=backend, dtype=dtype, docs=docs, kw=tkw, m=m, s_ref=s_ref, a_ref=a_ref,
                        gq_ref=gq_ref, gd_ref=gd_ref):
                    qt, dt = t(q).to(dtype), t(docs).to(dtype)
                    s, a = G.maxsim_argmax_impl(qt, dt, query_lengths=t(qlens), backend=backend,
                                                doc_mask=None if m is None else t(m), **kw)
                    gq, gd = G.maxsim_backward_impl(t(g), a, qt, dt, query_lengths=t(qlens), backend=backend, **kw)
                    wrong = int((a.cpu().numpy() != a_ref).sum())
                    err = max(float(np.nanmax(np.abs(s.cpu().numpy() - s_ref) / (1 + np.abs(s_ref)))),
                              float(np.abs(gq.cpu().numpy() - gq_ref).max()), float(np.abs(gd.cpu().numpy() - gd_ref).max()))
                    if backend == "cuda":      # no atomics: bit-reproducible
                        gq2, gd2 = G.maxsim_backward_impl(t(g), a, qt, dt, query_lengths=t(qlens), backend=backend, **kw)
                        wrong += int((gq2 != gq).sum()) + int((gd2 != gd).sum())
                    return err + wrong, 1e-4
                check(f"maxsim grad [{backend}] {layout} {str(dtype)[6:]} vs reference", run)


def maxsim_train_bench(dev, backends, small):
    """The training-step benchmark's GPU shape: vkern (each backend) vs PyLate's torch path."""
    import os

    from vkern.bench_maxsim_train import make_batch, scorer, train_step

    Q, Lq, N, Ld, D = (2, 4, 2, 16, 16) if small else (16, 32, 16, 512, 128)
    q, d, dm = (x.to(dev) for x in make_batch(Q, Lq, N, Ld, D))
    labels_dev = dev

    def step(score):
        qq, dd = q.detach().requires_grad_(True), d.detach().requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(score(qq, dd, dm), torch.arange(Q, device=labels_dev) * N)
        return (loss,) + tuple(torch.autograd.grad(loss, [qq, dd]))

    def measure(score, reps=1 if small else 5):
        out = step(score)                                    # warm-up (Triton compiles)
        times = []
        for _ in range(reps):
            if dev == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            step(score)
            if dev == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        peak = float("nan")
        if dev == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step(score)
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        return out, float(np.median(times)), peak

    old = os.environ.get("VKERN_BACKEND")
    res = {}
    try:
        res["pylate"] = measure(scorer("pylate"))
        for backend in backends:
            os.environ["VKERN_BACKEND"] = backend
            res[backend] = measure(scorer("vkern"))
    finally:
        os.environ.pop("VKERN_BACKEND", None) if old is None else os.environ.__setitem__("VKERN_BACKEND", old)
    grads_mb = 4 * (q.numel() + d.numel()) / 2**20
    (pl_out, pl_t, pl_mem) = res["pylate"]
    try:
        import pylate.scores  # noqa: F401
        peer = "PyLate torch"
    except Exception:  # the GPU node may not have it: the same einsum formulation
        peer = "torch einsum (PyLate's formulation, PyLate not installed)"
    print(f"BENCH training step (fwd+bwd ColBERTScores) {Q}x{Lq} queries, {N} docs/query x {Ld} tok, D={D} on {dev}: "
          f"{peer} {pl_t * 1e3:.2f} ms, peak +{pl_mem:.1f} MB (gradients {grads_mb:.1f} MB of it)")
    for backend in backends:
        out, t_, mem = res[backend]
        print(f"BENCH   vkern {backend}: {t_ * 1e3:.2f} ms ({pl_t / t_:.2f}x PyLate), peak +{mem:.1f} MB "
              f"(1/{pl_mem / mem:.1f} of PyLate's; beyond the gradients +{mem - grads_mb:.1f} vs "
              f"+{pl_mem - grads_mb:.1f} MB)")
        check(f"training step [{backend}] loss and grads == PyLate's torch path",
              lambda out=out: (max(float((a.detach().float() - b.detach().float()).abs().max()) for a, b in zip(out, pl_out)),
                                1e-4))


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


def _timed(fn, reps):
    """Median seconds of fn() over reps runs (after one warm-up), synchronising the device."""
    fn()
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    times = []
    for _ in range(reps):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


_POP16 = None


def torch_fde(x, offsets, cfg, average, fill):
    """The MUVERA encoding written with torch ops on x's device (the peer for the timing line): float64
    SimHash dots, Gray-decoded partitions, the AMS sketch as a dense matmul, index_add_ block sums,
    fill from the Hamming-nearest token (a scatter_reduce amin), then the count sketch."""
    global _POP16
    dev = x.device
    m = cfg.matrices()
    R, k, dp = m["R"], m["k"], m["d_proj"]
    P = 1 << k
    off = torch.as_tensor(offsets, device=dev)
    N, T = int(off.numel()) - 1, int(x.shape[0])
    lens = off[1:] - off[:-1]
    doc = torch.repeat_interleave(torch.arange(N, device=dev), lens)
    xf = x.float()
    dots = torch.einsum("td,rdk->rtk", xf.double(), torch.from_numpy(m["simhash"]).to(dev).double())
    b = ((dots > 0).long() << torch.arange(k - 1, -1, -1, device=dev)).sum(-1)          # [R, T]
    part = b.clone()
    for sh in (1, 2, 4, 8):
        part ^= part >> sh
    if m["ams_index"] is not None:
        M = torch.zeros(R, cfg.dim, dp, device=dev)
        M.scatter_(2, torch.from_numpy(m["ams_index"]).to(dev)[:, :, None],
                   torch.from_numpy(m["ams_sign"]).to(dev)[:, :, None])
        proj = torch.einsum("td,rdp->rtp", xf, M)
    else:
        proj = xf[None].expand(R, T, dp)
    flat = doc[None] * P + part                                                            # [R, T]
    blocks = torch.zeros(R, N * P, dp, dtype=torch.float64, device=dev)
    counts = torch.zeros(R, N * P, dtype=torch.float64, device=dev)
    for r in range(R):
        blocks[r].index_add_(0, flat[r], proj[r].double())
        counts[r].index_add_(0, flat[r], torch.ones(T, dtype=torch.float64, device=dev))
    if average:
        blocks /= counts.clamp(min=1)[:, :, None]
    if fill and T:
        if _POP16 is None or _POP16.device != dev:
            _POP16 = torch.tensor([bin(i).count("1") for i in range(1 << 16)], device=dev)
        gray = torch.arange(P, device=dev) ^ (torch.arange(P, device=dev) >> 1)
        for r in range(R):
            key = _POP16[b[r][:, None] ^ gray[None, :]] * (T + 1) + torch.arange(T, device=dev)[:, None]   # [T, P]
            best = torch.full((N, P), (T + 1) * 64, dtype=torch.long, device=dev)
            best.scatter_reduce_(0, doc[:, None].expand(T, P), key, "amin")
            empty = (counts[r].view(N, P) == 0) & (lens > 0)[:, None]
            src = proj[r][(best % (T + 1)).clamp(max=max(T - 1, 0))].double()             # [N, P, dp]
            blocks[r] = torch.where(empty.view(-1)[:, None], src.view(N * P, dp), blocks[r])
    fde = blocks.view(R, N, P, dp).permute(1, 0, 2, 3).reshape(N, R * P * dp)
    if m["final_index"] is not None:
        out = torch.zeros(N, m["final_dim"], dtype=torch.float64, device=dev)
        out.index_add_(1, torch.from_numpy(m["final_index"]).to(dev),
                       fde * torch.from_numpy(m["final_sign"]).to(dev).double())
        fde = out
    return fde.float()


def retrieval_checks(dev, backends, small):
    rng = np.random.default_rng(0)
    n_docs = 20 if small else 1000
    lengths = rng.integers(64, 301, n_docs) if not small else rng.integers(1, 40, n_docs)
    lengths[3] = 0                                                    # an empty document
    off = np.zeros(n_docs + 1, np.int64)
    np.cumsum(lengths, out=off[1:])
    D = 32 if small else 128
    docs = rng.standard_normal((int(off[-1]), D)).astype(np.float32)
    docs /= np.linalg.norm(docs, axis=1, keepdims=True) + 1e-12
    q = rng.standard_normal((32, D)).astype(np.float32)
    qd = vkern.quantize_docs(docs, doc_offsets=off)
    want = vkern.maxsim(q, qd, backend="reference")                  # the int8 definition
    want_s, want_i = vkern.maxsim(q, qd, topk=10, backend="reference")
    td = vkern.QuantizedDocs(*(torch.from_numpy(a).to(dev) for a in (qd.codes, qd.scales, qd.doc_offsets)))
    tq = torch.from_numpy(q).to(dev)
    tdocs, toff = torch.from_numpy(docs).to(dev), torch.from_numpy(off).to(dev)
    reps = 10   # timing lines on a GPU only: interpreter times (--small) would measure nothing
    for backend in backends:
        def int8(backend=backend):
            got = vkern.maxsim(tq, td, backend=backend).cpu().numpy()
            ok = np.isfinite(want)
            err = float(np.max(np.abs(got[ok] - want[ok]) / np.maximum(np.abs(want[ok]), 1e-6)))
            s, i = vkern.maxsim(tq, td, topk=10, backend=backend)
            err += 0.0 if np.array_equal(i.cpu().numpy(), want_i) else 1.0
            return err + (0.0 if np.array_equal(np.isneginf(got), np.isneginf(want)) else 1.0), 1e-5
        check(f"int8 maxsim [{backend}] == reference int8 definition", int8)
        if small:
            continue
        try:
            t8 = _timed(lambda b=backend: vkern.maxsim(tq, td, backend=b), reps)
            t32 = _timed(lambda b=backend: vkern.maxsim(tq, tdocs, doc_offsets=toff, backend=b), reps)
            print(f"TIME int8 maxsim [{backend}] 32x{D} query, {n_docs} docs: {t8 * 1e3:.3f} ms, float32 maxsim "
                  f"[{backend}] {t32 * 1e3:.3f} ms: int8 is {t32 / t8:.2f}x float32", flush=True)
        except Exception as exc:  # noqa: BLE001 - the check above reports failures
            print(f"TIME int8 maxsim [{backend}]: not measured ({type(exc).__name__}: {str(exc)[:200]})")

    mv = vkern.muvera
    configs = [mv.MuveraConfig(dim=D), mv.MuveraConfig(dim=D, num_repetitions=4, num_simhash_projections=3,
                                                       projection_dim=None, final_projection_dim=1024)]
    if small:
        configs = [mv.MuveraConfig(dim=D, num_repetitions=3, num_simhash_projections=3, projection_dim=8),
                   mv.MuveraConfig(dim=D, num_repetitions=2, num_simhash_projections=2, projection_dim=None,
                                   final_projection_dim=40)]
    for cfg in configs:
        want_fde = mv.encode_documents(docs, cfg, doc_offsets=off, backend="cpu")
        name = f"R={cfg.num_repetitions} k={cfg.num_simhash_projections} proj={cfg.projection_dim} " \
               f"final={cfg.final_projection_dim}"

        def peer(cfg=cfg):
            got = torch_fde(tdocs, off, cfg, True, cfg.fill_empty_partitions).cpu().numpy()
            return float(np.max(np.abs(got - want_fde))), 1e-5
        check(f"FDE torch implementation == cpu backend ({name})", peer)
        for backend in backends:
            def enc(backend=backend, cfg=cfg):
                got = mv.encode_documents(tdocs, cfg, doc_offsets=toff, backend=backend).cpu().numpy()
                return float(np.max(np.abs(got - want_fde))), 0.0      # the cpu's order of sums: bit for bit
            check(f"FDE encode_documents [{backend}] == cpu backend ({name})", enc)
            if small:
                continue
            try:
                tk = _timed(lambda b=backend, c=cfg: mv.encode_documents(tdocs, c, doc_offsets=toff, backend=b), reps)
                tt = _timed(lambda c=cfg: torch_fde(tdocs, off, c, True, c.fill_empty_partitions), reps)
                print(f"TIME FDE encode [{backend}] {int(off[-1])} tokens ({name}): {tk * 1e3:.3f} ms, torch "
                      f"implementation {tt * 1e3:.3f} ms: {tt / tk:.2f}x", flush=True)
            except Exception as exc:  # noqa: BLE001
                print(f"TIME FDE encode [{backend}]: not measured ({type(exc).__name__}: {str(exc)[:200]})")


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
    maxsim_grad_checks(dev, backends, args.small)
    maxsim_train_bench(dev, backends, args.small)
    retrieval_checks(dev, backends, args.small)    # last: the newest checks, so a timeout costs only them
    print(f"{len(FAILED)} failed" + (": " + ", ".join(FAILED) if FAILED else ""))
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
