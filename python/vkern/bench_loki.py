"""Loki workloads for ``python -m vkern bench --ops loki`` (and benchmarks/bench_loki.py).

The issue's decode step: B = 1, Hq = 32, H_kv = 8, D = 128, T = 32,768 cached
tokens, rank = 32, topk = T/8, float32 and bfloat16 caches. Contenders:
torch ``scaled_dot_product_attention(enable_gqa=True)`` (the peer), vkern's
dense ``decode_attention``, vkern ``loki_attention`` with gqa="shared" and
"per_head" (each with k's own rows and with a separate rank-prefix copy of
the keys, ``k_prefix``), and the NumPy reference.

Each workload's ``bytes`` is what its own op must read at least: dense decode
all of K and V; Loki the rank-prefix of every key row plus the kept K and V
rows (per_head: the union over a group's heads, counted on this data), so the
"% copy BW" column is the bytes moved per second against the copy bandwidth
measured in the same run. The SDPA and dense rows of a Loki workload are
there for the speed ratios; their GB/s column counts Loki's bytes.
"""
from __future__ import annotations

from typing import List

import numpy as np

import vkern
from vkern import _arrays as A
from vkern import _ext
from vkern.bench import Contender, Workload

B, HQ, HKV, D, RANK = 1, 32, 8, 128, 32


def decode_data(T: int, seed: int = 0):
    """Random (already rotated) q [1, 32, 128] and float32 caches [1, 8, T, 128]."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, HQ, D), dtype=np.float32)
    k = rng.standard_normal((B, HKV, T, D), dtype=np.float32)
    v = rng.standard_normal((B, HKV, T, D), dtype=np.float32)
    return q, k, v


def loki_bytes(idx: np.ndarray, T: int, elem: int, gqa: str) -> float:
    """Rank-prefix of every key row + the kept K and V rows, each counted once per KV group."""
    G = HQ // HKV
    rows = 0
    for b in range(idx.shape[0]):
        for kv in range(HKV):
            heads = idx[b, kv * G:(kv + 1) * G] if gqa == "per_head" else idx[b, kv * G:kv * G + 1]
            rows += len(np.unique(heads[heads >= 0]))
    return float(B * HKV * T * RANK * elem + 2 * rows * D * elem)


def memory_floor(k, v, kp, idx: np.ndarray, gqa: str):
    """A callable that only reads Loki's bytes, with no arithmetic: every row of the key
    prefix kp [B, H_kv, T, RANK] in order, then the kept K and V rows (each once per KV
    group), gathered in ascending order with vkern's threads and prefetch. Its time shows
    what this step's memory traffic alone costs on this machine (a kernel that schedules
    its reads better can still beat it). None without the compiled extension.
    k, v, kp: contiguous NumPy arrays or CPU torch tensors."""
    if not hasattr(_ext.C, "read_rows"):
        return None
    G = HQ // HKV
    T, Dk = int(k.shape[2]), int(k.shape[3])
    rows = []
    for b in range(idx.shape[0]):
        for kv in range(HKV):
            heads = idx[b, kv * G:(kv + 1) * G] if gqa == "per_head" else idx[b, kv * G:kv * G + 1]
            rows.append((b * HKV + kv) * T + np.unique(heads[heads >= 0]))
    kept = np.ascontiguousarray(np.concatenate(rows), dtype=np.int32)
    pre_rows = np.arange(int(np.prod(kp.shape[:3])), dtype=np.int32)
    elem = k.itemsize if isinstance(k, np.ndarray) else k.element_size()
    row_k, row_p = Dk * elem, int(kp.shape[3]) * elem
    pk, pv, pp = A.data_ptr(k), A.data_ptr(v), A.data_ptr(kp)

    def read(keep=(k, v, kp)):  # keep the arrays alive with the closure
        _ext.C.read_rows(pp, row_p, pre_rows.ctypes.data, len(pre_rows), 0)
        _ext.C.read_rows(pk, row_k, kept.ctypes.data, len(kept), 8)
        _ext.C.read_rows(pv, row_k, kept.ctypes.data, len(kept), 8)

    return read


def numpy_decode(q, k, v):
    """Peer: dense GQA decode attention in plain NumPy float32 (matmul, softmax, matmul)."""
    Bq, Hq, Dq = q.shape
    H = k.shape[1]
    qg = q.reshape(Bq, H, Hq // H, Dq)
    s = np.matmul(qg, k.transpose(0, 1, 3, 2)) * np.float32(1.0 / np.sqrt(Dq))
    s -= s.max(axis=-1, keepdims=True)
    np.exp(s, out=s)
    s /= s.sum(axis=-1, keepdims=True)
    return np.matmul(s, v).reshape(Bq, Hq, -1)


def loki_workloads(size: str, threads: int) -> List[Workload]:
    from vkern.bench import TORCH_HINT, bfloat16_of, missing, optional_torch

    T = {"tiny": 512, "quick": 8192, "full": 32768}[size]
    topk = T // 8
    q, k, v = decode_data(T)
    torch = optional_torch(threads)
    have_cpu = _ext.cpu_reason() is None
    out: List[Workload] = []
    for dtype in ("float32", "bfloat16"):
        if dtype == "float32":
            args = tuple(torch.from_numpy(a) for a in (q, k, v)) if torch is not None else (q, k, v)
            how = ""
        else:
            args = tuple(bfloat16_of(a, torch) for a in (q, k, v))
            how = "" if torch is not None else " (ml_dtypes)"
        elem = 4 if dtype == "float32" else 2
        shape = f"B={B} Hq={HQ} H_kv={HKV} D={D} T={T} {dtype}{how}"
        if args[0] is None:   # bfloat16 without torch and ml_dtypes: say so instead of a silent gap
            w = Workload("loki", f"decode step, {shape}", bytes=float(2 * B * HKV * T * D * elem),
                         flops=4.0 * B * HQ * T * D)
            from vkern.bench import BF16_HINT

            w.contenders += [missing("vkern cpu decode_attention", "vkern", BF16_HINT),
                             missing("vkern cpu loki shared / per_head", "vkern", BF16_HINT)]
            out.append(w)
            continue
        peers = []
        if torch is not None:
            sq = args[0][:, :, None]           # [B, Hq, 1, D]

            def sdpa(sq=sq, tk=args[1], tv=args[2]):
                return torch.nn.functional.scaled_dot_product_attention(sq, tk, tv, enable_gqa=True)

            peers.append(Contender("torch SDPA enable_gqa", sdpa, "peer"))
        else:
            peers.append(missing("torch SDPA enable_gqa", "peer", TORCH_HINT))
        # NumPy has no bfloat16 matmul: its bf16 peer reads a float32 copy of the same (rounded) cache.
        nargs = tuple(A.to_numpy(a, np.float32) for a in args)
        peers.append(Contender("numpy matmul + softmax + matmul", lambda a=nargs: numpy_decode(*a), "peer",
                               note="dense, float32" + (" copy of the bf16 cache" if dtype == "bfloat16" else "")))
        dense = []
        if have_cpu:
            dense.append(Contender("vkern cpu decode_attention", lambda a=args: vkern.decode_attention(
                *a, backend="cpu"), "vkern"))

        w = Workload("loki", f"dense decode step, {shape}", bytes=float(2 * B * HKV * T * D * elem),
                     flops=4.0 * B * HQ * T * D)
        w.contenders += peers + dense
        w.contenders.append(Contender("vkern reference decode_attention", lambda a=args: vkern.decode_attention(
            *a, backend="reference"), "reference", note="NumPy, float64"))
        out.append(w)

        kp = vkern.loki.key_prefix(args[1], RANK)  # kept next to the cache by a serving loop (+25% of K here)
        for gqa in ("shared", "per_head"):
            kw = dict(rank=RANK, topk=topk, gqa=gqa)
            _, idx = vkern.loki_attention(*args, return_indices=True, backend="cpu" if have_cpu else "reference",
                                          **kw)
            idx = np.asarray(idx)
            nbytes = loki_bytes(idx, T, elem, gqa)
            w = Workload("loki", f"loki gqa={gqa} rank={RANK} topk=T/8, {shape} "
                         f"({nbytes / 1e6:.0f} MB moved vs {2 * B * HKV * T * D * elem / 1e6:.0f} MB dense)",
                         bytes=nbytes, flops=2.0 * B * HQ * T * RANK + 4.0 * B * HQ * topk * D)
            w.contenders += peers + dense
            floor = memory_floor(args[1], args[2], kp, idx, gqa) if have_cpu else None
            if floor is not None:
                w.contenders.append(Contender("read these bytes only (no math)", floor, "limit",
                                              note="prefix streamed + kept K/V rows gathered, no arithmetic"))
            if have_cpu:
                w.contenders.append(Contender(f"vkern cpu loki {gqa}", lambda a=args, kw=kw: vkern.loki_attention(
                    *a, backend="cpu", **kw), "vkern"))
                w.contenders.append(Contender(f"vkern cpu loki {gqa} +k_prefix", lambda a=args, kw=kw, kp=kp:
                                              vkern.loki_attention(*a, backend="cpu", k_prefix=kp, **kw), "vkern",
                                              note="approximate pass reads a separate [.., T, rank] key prefix"))
            w.contenders.append(Contender(f"vkern reference loki {gqa}", lambda a=args, kw=kw: vkern.loki_attention(
                *a, backend="reference", **kw), "reference", note="NumPy, float64"))
            out.append(w)
        if torch is not None and torch.cuda.is_available():
            out += _gpu_workloads(torch, q, k, v, dtype, topk, shape)
    return out


def _gpu_workloads(torch, q, k, v, dtype: str, topk: int, shape: str, device: str = "cuda") -> List[Workload]:
    """The same steps on the GPU: vkern's CUDA and Triton kernels against torch SDPA on the
    GPU (their own workloads, so the CPU rows keep their CPU peer)."""
    T = k.shape[2]
    dt = getattr(torch, dtype)
    tq, tk, tv = (torch.from_numpy(a).to(device, dt) for a in (q, k, v))
    kp = vkern.loki.key_prefix(tk, RANK)
    sync = torch.cuda.synchronize if device == "cuda" else None
    elem = 4 if dtype == "float32" else 2
    sdpa = Contender("torch cuda SDPA enable_gqa", lambda: torch.nn.functional.scaled_dot_product_attention(
        tq[:, :, None], tk, tv, enable_gqa=True), "peer", sync=sync)
    backends = [b for b in ("cuda", "triton") if vkern.available_backends("loki_attention")[b][0]]
    out: List[Workload] = []
    w = Workload("loki", f"dense decode step [GPU], {shape}", bytes=float(2 * B * HKV * T * D * elem),
                 flops=4.0 * B * HQ * T * D)
    w.contenders.append(sdpa)
    for b in backends:
        w.contenders.append(Contender(f"vkern {b} decode_attention", lambda b=b: vkern.decode_attention(
            tq, tk, tv, backend=b), "vkern", sync=sync))
    out.append(w)
    for gqa in ("shared", "per_head") if backends else ():
        kw = dict(rank=RANK, topk=topk, gqa=gqa)
        _, idx = vkern.loki_attention(tq, tk, tv, return_indices=True, backend=backends[0], **kw)
        nbytes = loki_bytes(idx.cpu().numpy(), T, elem, gqa)
        w = Workload("loki", f"loki gqa={gqa} rank={RANK} topk=T/8 [GPU], {shape}", bytes=nbytes,
                     flops=2.0 * B * HQ * T * RANK + 4.0 * B * HQ * topk * D)
        w.contenders.append(sdpa)
        for b in backends:
            w.contenders.append(Contender(f"vkern {b} loki {gqa}", lambda b=b, kw=kw: vkern.loki_attention(
                tq, tk, tv, backend=b, **kw), "vkern", sync=sync))
            w.contenders.append(Contender(f"vkern {b} loki {gqa} +k_prefix", lambda b=b, kw=kw: vkern.loki_attention(
                tq, tk, tv, backend=b, k_prefix=kp, **kw), "vkern", sync=sync))
        out.append(w)
    return out
