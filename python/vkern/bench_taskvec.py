"""Bench data and contenders for the task-vector ops (``python -m vkern bench --ops taskvec``).

Workloads (issue 3):
* apply_task_vectors: base 4096 x 4096 float32, T = 4 task vectors, 4-bit affine,
  group 128; effective bandwidth = (base read + codes/scales/zeros read + result
  written) / time, beside the machine's copy bandwidth, the NumPy reference and
  torch (dequantize each, then add).
* delta_linear: x of 1, 8 and 64 rows, the same base, T = 8 one-bit (BitDelta)
  deltas, row m uses task m % 8; beside torch (unpack each delta, dense matmul per
  task) and a plain x @ base^T (the deltas' floor: they should be nearly free).
"""
from __future__ import annotations

from typing import List

import numpy as np

import vkern
from vkern import _ext
from vkern.bench import Contender, Workload
from vkern.taskvec import QTaskVector


def random_qtv(rng, N: int, K: int, bits: int, group_size, scheme: str = "affine") -> QTaskVector:
    """A QTaskVector with random codes (quantizing 16M random values would only cost time)."""
    rb = (K * bits + 7) // 8
    codes = rng.integers(0, 256, size=(N, rb), dtype=np.uint8)
    if (K * bits) % 8:
        codes[:, -1] &= (1 << ((K * bits) % 8)) - 1
    if group_size is None:
        gran, gs, S, G = "tensor", K, 1, 1
    else:
        gran, gs, S, G = "group", group_size, N, -(-K // group_size)
    scales = (rng.random((S, G), dtype=np.float32) * 1e-3 + 1e-4).astype(np.float32)
    zeros = None if scheme == "sign" else rng.integers(0, 1 << bits, size=(S, G), dtype=np.uint8)
    return QTaskVector(scheme, bits, (N, K), gran, gs, codes, scales, zeros)


def apply_data(N: int = 4096, K: int = 4096, T: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((N, K), dtype=np.float32)
    qtvs = [random_qtv(rng, N, K, 4, 128) for _ in range(T)]
    coeffs = [0.3, 0.3, 0.2, 0.2][:T] + [0.1] * max(0, T - 4)
    return base, qtvs, coeffs


def delta_data(N: int = 4096, K: int = 4096, T: int = 8, seed: int = 1):
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((N, K), dtype=np.float32)
    qtvs = [random_qtv(rng, N, K, 1, None, scheme="sign") for _ in range(T)]
    return base, qtvs


def apply_bytes(base: np.ndarray, qtvs) -> float:
    return 2.0 * base.nbytes + sum(q.nbytes for q in qtvs)


# ------------------------------------------------------------- torch peers

def torch_apply_4bit(torch, base, qtvs, coeffs):
    """Peer: dequantize each 4-bit grouped task vector with torch ops, then add."""
    tb = torch.from_numpy(base)
    parts = []
    for q in qtvs:
        N, K = q.shape
        parts.append((torch.from_numpy(q.codes), torch.from_numpy(q.scales), torch.from_numpy(q.zero_points),
                      q.group_size))

    def run():
        w = tb.clone()
        for (codes, scales, zeros, g), c in zip(parts, coeffs):
            q = torch.stack((codes & 15, codes >> 4), dim=-1).reshape(codes.shape[0], -1)[:, :w.shape[1]]
            G = scales.shape[1]
            deq = (q.reshape(q.shape[0], G, g).float() - zeros.unsqueeze(-1).float()) * scales.unsqueeze(-1)
            w.add_(deq.reshape(w.shape), alpha=float(c))
        return w

    return run


def torch_delta_sign(torch, x, base, qtvs, ids):
    """Peer: per task, unpack its sign bits to a dense +-scale matrix, add the base, dense matmul."""
    tx, tb = torch.from_numpy(x), torch.from_numpy(base)
    codes = [torch.from_numpy(q.codes) for q in qtvs]
    scales = [float(q.scales[0, 0]) for q in qtvs]
    shifts = torch.arange(8, dtype=torch.uint8)
    tids = torch.from_numpy(ids)

    def run():
        y = torch.empty((tx.shape[0], tb.shape[0]))
        for t in torch.unique(tids).tolist():
            rows = (tids == t).nonzero().reshape(-1)
            if t < 0:
                y[rows] = tx[rows] @ tb.T
                continue
            bits = ((codes[t].unsqueeze(-1) >> shifts) & 1).reshape(codes[t].shape[0], -1)[:, :tb.shape[1]]
            w = tb + (bits.float() * 2 - 1) * scales[t]
            y[rows] = tx[rows] @ w.T
        return y

    return run


def numpy_apply_4bit(base, qtvs, coeffs):
    """Peer: the same in plain NumPy float32: unpack each task's nibbles, dequantize per group, add."""
    def run():
        w = base.copy()
        for q, c in zip(qtvs, coeffs):
            N, K = q.shape
            codes = q.codes
            nib = np.stack((codes & 15, codes >> 4), axis=-1).reshape(N, -1)[:, :K]
            G = q.scales.shape[1]
            deq = (nib.reshape(N, G, q.group_size).astype(np.float32) - q.zero_points[..., None]) * q.scales[..., None]
            w += np.float32(c) * deq.reshape(N, K)
        return w

    return run


# -------------------------------------------------------------- workloads

def taskvec_workloads(size: str, threads: int) -> List[Workload]:
    from vkern.bench import TORCH_HINT, missing, optional_torch

    torch = optional_torch(threads)
    N = K = {"tiny": 256, "quick": 2048, "full": 4096}[size]
    out: List[Workload] = []

    base, qtvs, coeffs = apply_data(N, K)
    w = Workload("taskvec", f"apply_task_vectors base {N}x{K} f32, T=4, 4-bit g128 (bytes: base in + out + codes)",
                 bytes=apply_bytes(base, qtvs), flops=2.0 * len(qtvs) * N * K)
    w.contenders.append(Contender("vkern reference", lambda: vkern.apply_task_vectors(
        base, qtvs, coeffs, backend="reference"), "reference", note="NumPy, float64"))
    if torch is not None:
        w.contenders.append(Contender("torch dequantize each, then add", torch_apply_4bit(torch, base, qtvs, coeffs),
                                      "peer"))
    else:
        w.contenders.append(missing("torch dequantize each, then add", "peer", TORCH_HINT))
    w.contenders.append(Contender("numpy dequantize each, then add", numpy_apply_4bit(base, qtvs, coeffs), "peer",
                                  note="float32"))
    if _ext.cpu_reason() is None:
        out_buf = np.empty_like(base)
        w.contenders.append(Contender("vkern cpu (out= buffer)", lambda: vkern.apply_task_vectors(
            base, qtvs, coeffs, out=out_buf, backend="cpu"), "vkern"))
        w.contenders.append(Contender("vkern cpu (new array)", lambda: vkern.apply_task_vectors(
            base, qtvs, coeffs, backend="cpu"), "vkern", note="includes first-touch of the result"))
        inplace = base.copy()
        w.contenders.append(Contender("vkern cpu (out=base, in place)", lambda: vkern.apply_task_vectors(
            inplace, qtvs, coeffs, out=inplace, backend="cpu"), "vkern", note="a copy of base, updated each run"))
    _gpu_apply(w, torch, base, qtvs, coeffs)
    out.append(w)

    dbase, dq = delta_data(N, K)
    rng = np.random.default_rng(2)
    for M in (1, 8, 64):
        x = rng.standard_normal((M, K), dtype=np.float32)
        ids = (np.arange(M) % len(dq)).astype(np.int64)
        used = sorted(set(ids.tolist()))
        w = Workload("taskvec", f"delta_linear x {M}x{K}, base {N}x{K} f32, T=8 one-bit deltas, task_ids",
                     bytes=dbase.nbytes + sum(dq[t].nbytes for t in used) + x.nbytes + 4.0 * M * N,
                     flops=2.0 * M * N * K)
        w.contenders.append(Contender("vkern reference", lambda x=x, ids=ids: vkern.delta_linear(
            x, dbase, dq, task_ids=ids, backend="reference"), "reference", note="NumPy, float64"))
        if torch is not None:
            tx, tb = torch.from_numpy(x), torch.from_numpy(dbase)
            w.contenders.append(Contender("torch x @ base^T (no deltas: the bar)", lambda tx=tx, tb=tb: tx @ tb.T,
                                          "peer", note="floor, not a delta_linear"))
            w.contenders.append(Contender("torch unpack + dense matmul per task",
                                          torch_delta_sign(torch, x, dbase, dq, ids), "peer"))
        else:
            w.contenders.append(missing("torch unpack + dense matmul per task", "peer", TORCH_HINT))
        w.contenders.append(Contender("numpy x @ base^T (no deltas: the bar)", lambda x=x: x @ dbase.T, "peer",
                                      note="floor, not a delta_linear"))
        if _ext.cpu_reason() is None:
            w.contenders.append(Contender("vkern cpu", lambda x=x, ids=ids: vkern.delta_linear(
                x, dbase, dq, task_ids=ids, backend="cpu"), "vkern"))
        _gpu_delta(w, torch, x, dbase, dq, ids)
        out.append(w)
    return out


def _gpu_apply(w, torch, base, qtvs, coeffs):
    if torch is None or not torch.cuda.is_available():
        return
    from vkern.taskvec import to_device

    tb = torch.from_numpy(base).cuda()
    tq = to_device(qtvs, "cuda")
    outb = torch.empty_like(tb)
    for backend in ("cuda", "triton"):
        if vkern.available_backends("apply_task_vectors")[backend][0]:
            w.contenders.append(Contender(f"vkern {backend}", lambda b=backend: vkern.apply_task_vectors(
                tb, tq, coeffs, out=outb, backend=b), "vkern", sync=torch.cuda.synchronize))


def _gpu_delta(w, torch, x, base, qtvs, ids):
    if torch is None or not torch.cuda.is_available():
        return
    from vkern.taskvec import to_device

    tx, tb = torch.from_numpy(x).cuda(), torch.from_numpy(base).cuda()
    tids = torch.from_numpy(ids).cuda()
    tq = to_device(qtvs, "cuda")
    for backend in ("cuda", "triton"):
        if vkern.available_backends("delta_linear")[backend][0]:
            w.contenders.append(Contender(f"vkern {backend}", lambda b=backend: vkern.delta_linear(
                tx, tb, tq, task_ids=tids, backend=b), "vkern", sync=torch.cuda.synchronize))
    w.contenders.append(Contender("torch cuda x @ base^T", lambda: tx @ tb.T, "peer",
                                  sync=torch.cuda.synchronize))
