"""Triton Loki kernels (SPEC §2) and their launchers: rotate, sparse and dense decode.

One decode step is three launches, each for the whole batch and every head:
  1. ``_approx_kernel``: approximate scores from the first ``rank`` dims of each
     key row; a program owns one selection list (a query head, or with
     gqa="shared" a KV group whose queries are summed first) and a block of rows.
  2. ``_select_kernel``: one program per list finds the k-th best key by a
     bitwise binary search on order-preserving integer keys, then emits the kept
     positions in ascending order (prefix sums), ties to the lower position,
     NaN last; sinks and recent tokens are written around them.
  3. ``_attend_kernel``: exact attention over the kept rows only, split over
     the kept tokens (flash-decoding); each split leaves a partial (max, sum,
     acc) and the last split of a head to finish (an atomic counter) merges them,
     so no fourth launch is needed. Dense decode is this kernel alone.

The package wrapper validates everything; this module trusts what it is given
(k/v last-dim stride 1, q contiguous, per-sequence budgets already resolved).
"""
from __future__ import annotations

import torch

from ._common import device_guard, flat_grid, order_key, tl, triton

__all__ = ["rotate", "loki_attention", "decode_attention"]

_BLOCK_T = 64        # rows per approximate-score program
_SELECT_BLOCK = 256  # positions per step of the selection scans
_BLOCK_N = 32        # kept rows per step of the attention programs
_MAX_SPLITS = 32


def _pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


if triton is not None:

    @triton.jit
    def _approx_kernel(q_ptr, k_ptr, lens_ptr, scores_ptr, T, NL, G, RANK, D,
                       k_sb, k_sh, k_st,
                       HEADS_PER_LIST: tl.constexpr, G_PAD: tl.constexpr, R_PAD: tl.constexpr,
                       BLOCK_T: tl.constexpr):
        t_tiles = tl.cdiv(T, BLOCK_T)   # one grid axis: (list, block of rows), see _approx_grid
        pid = tl.program_id(0) // t_tiles
        b = pid // NL
        lst = pid % NL
        head0 = lst * HEADS_PER_LIST
        kv = head0 // G
        L = tl.load(lens_ptr + b)
        t = (tl.program_id(0) % t_tiles) * BLOCK_T + tl.arange(0, BLOCK_T)
        d = tl.arange(0, R_PAD)
        g = tl.arange(0, G_PAD)
        Hq = NL * HEADS_PER_LIST
        qmask = (g[:, None] < HEADS_PER_LIST) & (d[None, :] < RANK)
        qt = tl.load(q_ptr + (b * Hq + head0 + g[:, None]).to(tl.int64) * D + d[None, :], mask=qmask, other=0.0)
        qs = tl.sum(qt.to(tl.float32), axis=0)                      # summed over the list's heads
        rmask = t < L
        kp = k_ptr + b.to(tl.int64) * k_sb + kv.to(tl.int64) * k_sh + t[:, None].to(tl.int64) * k_st + d[None, :]
        kt = tl.load(kp, mask=rmask[:, None] & (d[None, :] < RANK), other=0.0).to(tl.float32)
        s = tl.sum(kt * qs[None, :], axis=1)
        tl.store(scores_ptr + (b * NL + lst).to(tl.int64) * T + t, s, mask=rmask)

    @triton.jit
    def _select_kernel(scores_ptr, lens_ptr, budgets_ptr, idx_ptr, T, NL, K, NUM_SINK, NUM_RECENT,
                       BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        b = pid // NL
        L = tl.load(lens_ptr + b).to(tl.int64)
        budget = tl.minimum(tl.load(budgets_ptr + b).to(tl.int64), L)
        row = scores_ptr + pid.to(tl.int64) * T
        out = idx_ptr + pid.to(tl.int64) * K
        offs = tl.arange(0, BLOCK)
        keep_all = budget >= L
        lo = tl.where(keep_all, L, tl.minimum(NUM_SINK, L))
        hi = tl.where(keep_all, L, tl.maximum(lo, L - NUM_RECENT))
        need = tl.where(keep_all, 0, budget - lo - (L - hi))
        # sinks (or every position when all are kept) and the -1 padding; the slots in
        # between belong to the selected and recent tokens below (no two stores share a slot)
        for c0 in range(0, K, BLOCK):   # int32 loop; the scans below walk int64 bounds (own names)
            p = c0 + offs
            val = tl.where(p < lo, p, -1)
            tl.store(out + p, val.to(tl.int32), mask=(p < K) & ((p < lo) | (p >= budget)))
        # threshold: the largest key t with count(key >= t) >= need
        t = tl.zeros((), dtype=tl.int64)
        step = tl.full((), 2147483648, tl.int64)                   # 2**31, then down to 1, in int64
        for _ in range(32):
            cand = t | step
            cnt = tl.zeros((), dtype=tl.int64)
            for c1 in range(lo, hi, BLOCK):
                p = c1 + offs
                key = order_key(tl.load(row + p, mask=p < hi, other=0.0))
                cnt += tl.sum(((key >= cand) & (p < hi)).to(tl.int64), axis=0)
            t = tl.where(cnt >= need, cand, t)
            step = step >> 1
        gt = tl.zeros((), dtype=tl.int64)
        for c2 in range(lo, hi, BLOCK):
            p = c2 + offs
            key = order_key(tl.load(row + p, mask=p < hi, other=0.0))
            gt += tl.sum(((key > t) & (p < hi)).to(tl.int64), axis=0)
        # positions equal to t to take (need == 0 drives t to 2**32 - 1, above every key: none)
        ties = need - gt
        written = tl.zeros((), dtype=tl.int64)
        eq_seen = tl.zeros((), dtype=tl.int64)
        for c3 in range(lo, hi, BLOCK):
            p = c3 + offs
            ok = p < hi
            key = order_key(tl.load(row + p, mask=ok, other=0.0))
            eq = (key == t) & ok
            eq_rank = eq_seen + tl.cumsum(eq.to(tl.int64), axis=0) - 1
            take = ((key > t) & ok) | (eq & (eq_rank < ties))
            slot = lo + written + tl.cumsum(take.to(tl.int64), axis=0) - 1
            tl.store(out + slot, p.to(tl.int32), mask=take)
            written += tl.sum(take.to(tl.int64), axis=0)
            eq_seen += tl.sum(eq.to(tl.int64), axis=0)
        # recent tokens after the selected ones
        base = lo + need
        for c4 in range(hi, L, BLOCK):
            p = c4 + offs
            tl.store(out + base + (p - hi), p.to(tl.int32), mask=p < L)

    @triton.jit
    def _attend_kernel(q_ptr, k_ptr, v_ptr, lens_ptr, budgets_ptr, idx_ptr, ws_ptr, count_ptr, out_ptr,
                       Hq, G, NL, K, D, scale, chunk,
                       k_sb, k_sh, k_st, v_sb, v_sh, v_st,
                       HEADS_PER_LIST: tl.constexpr, DENSE: tl.constexpr, NSPLIT: tl.constexpr,
                       D_PAD: tl.constexpr, BLOCK_N: tl.constexpr):
        bh = tl.program_id(0)
        split = tl.program_id(1)
        b = bh // Hq
        h = bh % Hq
        kv = h // G
        L = tl.load(lens_ptr + b).to(tl.int64)
        if DENSE:
            n = L
        else:
            n = tl.minimum(tl.load(budgets_ptr + b).to(tl.int64), L)
        d = tl.arange(0, D_PAD)
        dmask = d < D
        q = tl.load(q_ptr + bh.to(tl.int64) * D + d, mask=dmask, other=0.0).to(tl.float32)
        kbase = k_ptr + b.to(tl.int64) * k_sb + kv.to(tl.int64) * k_sh
        vbase = v_ptr + b.to(tl.int64) * v_sb + kv.to(tl.int64) * v_sh
        lst = b * NL + h // HEADS_PER_LIST
        start = split * chunk
        stop = tl.minimum(start + chunk, n)
        m = tl.full((), float("-inf"), tl.float32)
        denom = tl.zeros((), dtype=tl.float32)
        acc = tl.zeros((D_PAD,), dtype=tl.float32)
        for c in range(start, stop, BLOCK_N):
            i = c + tl.arange(0, BLOCK_N)
            ok = i < stop
            if DENSE:
                rows = i
            else:
                rows = tl.load(idx_ptr + lst.to(tl.int64) * K + i, mask=ok, other=0).to(tl.int64)
            kt = tl.load(kbase + rows[:, None] * k_st + d[None, :], mask=ok[:, None] & dmask[None, :], other=0.0)
            s = tl.sum(kt.to(tl.float32) * q[None, :], axis=1) * scale
            s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=0))
            alpha = tl.exp(m - m_new)
            p = tl.exp(s - m_new)
            p = tl.where(ok, p, 0.0)
            vt = tl.load(vbase + rows[:, None] * v_st + d[None, :], mask=ok[:, None] & dmask[None, :], other=0.0)
            acc = acc * alpha + tl.sum(p[:, None] * vt.to(tl.float32), axis=0)
            denom = denom * alpha + tl.sum(p, axis=0)
            m = m_new
        if NSPLIT == 1:
            tl.store(out_ptr + bh.to(tl.int64) * D + d, acc / denom, mask=dmask)
        else:
            wrow = ws_ptr + (bh.to(tl.int64) * NSPLIT + split) * (D_PAD + 2)
            tl.store(wrow + d, acc)
            tl.store(wrow + D_PAD, m)
            tl.store(wrow + D_PAD + 1, denom)
            # The last split of this head to finish merges every split's partial.
            done = tl.atomic_add(count_ptr + bh, 1)
            if done == NSPLIT - 1:
                sp = tl.arange(0, NSPLIT)
                base = ws_ptr + (bh.to(tl.int64) * NSPLIT + sp) * (D_PAD + 2)
                ms = tl.load(base + D_PAD, volatile=True)
                ls = tl.load(base + D_PAD + 1, volatile=True)
                mt = tl.max(ms, axis=0)
                w = tl.where(ms == float("-inf"), 0.0, tl.exp(ms - mt))
                accs = tl.load(base[:, None] + d[None, :], volatile=True)
                total = tl.sum(accs * w[:, None], axis=0)
                lt = tl.sum(ls * w, axis=0)
                tl.store(out_ptr + bh.to(tl.int64) * D + d, total / lt, mask=dmask)

    @triton.jit
    def _rotate_kernel(x_ptr, p_ptr, out_ptr, H, G, D, x_sr, x_sh, D_PAD: tl.constexpr, D_CHUNK: tl.constexpr):
        pid = tl.program_id(0)
        r = pid // H
        h = pid % H
        e = tl.arange(0, D_PAD)
        x_row = x_ptr + r.to(tl.int64) * x_sr + h.to(tl.int64) * x_sh
        p_mat = p_ptr + (h // G).to(tl.int64) * D * D
        out = tl.zeros((D_PAD,), dtype=tl.float32)
        # D_CHUNK rows of P at a time: a whole D x D float32 tile spills at D = 256
        for d0 in range(0, D, D_CHUNK):
            d = d0 + tl.arange(0, D_CHUNK)
            x = tl.load(x_row + d, mask=d < D, other=0.0).to(tl.float32)
            pm = (d[:, None] < D) & (e[None, :] < D)
            P = tl.load(p_mat + d[:, None].to(tl.int64) * D + e[None, :], mask=pm, other=0.0)
            out += tl.sum(x[:, None] * P, axis=0)
        tl.store(out_ptr + pid.to(tl.int64) * D + e, out, mask=e < D)


_device_ctx = device_guard


def rotate(x: torch.Tensor, P: torch.Tensor, row_stride: int, head_stride: int, rows: int) -> torch.Tensor:
    """x seen as [rows, H, D] (unit last stride) times P float32 [H_kv, D, D]; float32 [rows, H, D]."""
    H, D = int(x.shape[-2]), int(x.shape[-1])
    H_kv = int(P.shape[0])
    out = torch.empty((rows, H, D), dtype=torch.float32, device=x.device)
    if rows == 0:
        return out
    with _device_ctx(x):
        _rotate_kernel[flat_grid("loki.rotate", rows, H)](x, P, out, H, H // H_kv, D, row_stride, head_stride,
                                                           **_rotate_tiles(D))
    return out


def _rotate_tiles(D: int) -> dict:
    """D_PAD and the rows of P per step: 16 rows of P at a time need <= 70 registers on sm_80/sm_90
    up to D = 256 and never spill (the whole D x D float32 tile spilled 2.4-4.2 KB at D = 256; 32 rows
    still spilled at D = 128 on sm_90 for 16-bit x)."""
    d_pad = _pow2(max(D, 16))
    return dict(D_PAD=d_pad, D_CHUNK=16)


def _approx_grid(B: int, NL: int, T: int) -> tuple:
    return flat_grid("loki_attention", B * NL, triton.cdiv(T, _BLOCK_T))


def _attend_grid(B: int, Hq: int, nsplit: int) -> tuple:
    """(head, split): nsplit <= _MAX_SPLITS sits on y, the head count on x."""
    return flat_grid("loki_attention", B * Hq) + (nsplit,)


def _splits(K: int, B: int, Hq: int) -> int:
    # Enough programs to fill a GPU at small batch, each with a few blocks of rows.
    want = max(1, min(_MAX_SPLITS, 256 // max(1, B * Hq), triton.cdiv(K, 4 * _BLOCK_N)))
    return _pow2(want) if want > 1 else 1


def _attend(q, k, v, lens, budgets, idx, heads_per_list, K, scale, dense):
    B, Hq, D = (int(s) for s in q.shape)
    H_kv = int(k.shape[1])
    G = Hq // H_kv
    nsplit = _splits(K, B, Hq)
    chunk = triton.cdiv(triton.cdiv(K, nsplit), _BLOCK_N) * _BLOCK_N
    D_PAD = _pow2(max(D, 16))
    out = torch.empty((B, Hq, D), dtype=torch.float32, device=q.device)
    ws = torch.empty((B * Hq * nsplit * (D_PAD + 2),) if nsplit > 1 else (1,), dtype=torch.float32, device=q.device)
    count = torch.zeros((B * Hq,), dtype=torch.int32, device=q.device)
    ks, vs = k.stride(), v.stride()
    with device_guard(q):
        _attend_kernel[_attend_grid(B, Hq, nsplit)](
            q, k, v, lens, budgets if budgets is not None else lens, idx if idx is not None else lens, ws, count,
            out, Hq, G, Hq // heads_per_list, K, D, float(scale), chunk, ks[0], ks[1], ks[2], vs[0], vs[1], vs[2],
            HEADS_PER_LIST=heads_per_list, DENSE=dense, NSPLIT=nsplit, D_PAD=D_PAD, BLOCK_N=_BLOCK_N)
    return out


def loki_attention(q, k, v, lens, budgets, K: int, rank: int, num_sink: int, num_recent: int, shared: bool,
                   scale: float, kp=None):
    """q [B, Hq, D] contiguous; k, v [B, H_kv, T, D] with unit last stride; lens, budgets int64 [B]
    (budgets already resolved, each >= the forced tokens); kp: optional [B, H_kv, T, >= rank] key
    prefix with unit last stride, read by the approximate pass instead of k. Returns (out float32 [B, Hq, D],
    kept int32 [B, NL, K]) with NL = H_kv (shared) or Hq (per_head), ascending, -1 padded."""
    B, Hq, D = (int(s) for s in q.shape)
    H_kv, T = int(k.shape[1]), int(k.shape[2])
    G = Hq // H_kv
    hpl = G if shared else 1
    NL = Hq // hpl
    scores = torch.empty((B, NL, T), dtype=torch.float32, device=q.device)
    idx = torch.empty((B, NL, K), dtype=torch.int32, device=q.device)
    ka = k if kp is None else kp
    ks = ka.stride()
    approx_grid = _approx_grid(B, NL, T)
    select_grid = flat_grid("loki_attention", B * NL)
    _attend_grid(B, Hq, _MAX_SPLITS)   # checked before the first launch
    with _device_ctx(q):
        _approx_kernel[approx_grid](
            q, ka, lens, scores, T, NL, G, rank, D, ks[0], ks[1], ks[2],
            HEADS_PER_LIST=hpl, G_PAD=_pow2(hpl), R_PAD=_pow2(max(rank, 16)), BLOCK_T=_BLOCK_T)
        _select_kernel[select_grid](scores, lens, budgets, idx, T, NL, K, num_sink, num_recent, BLOCK=_SELECT_BLOCK)
        out = _attend(q, k, v, lens, budgets, idx, hpl, K, scale, dense=False)
    return out, idx


def decode_attention(q, k, v, lens, scale: float):
    """Dense decode: q [B, Hq, D] contiguous, k/v [B, H_kv, T, D] unit last stride -> float32 [B, Hq, D]."""
    T = int(k.shape[2])
    with _device_ctx(q):
        return _attend(q, k, v, lens, None, None, 1, T, scale, dense=True)
