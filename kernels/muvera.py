"""Triton MUVERA encoder (FDE) kernels and their launcher (definition: vkern/reference/muvera.py).

Three passes, in the cpu backend's order of operations (csrc/cpu/muvera.cpp), so the vectors are
the cpu backend's:
1. _sketch_kernel, one program per (token tile, repetition): the k SimHash dots of each token in
   float64, summed over the D coordinates in order (the cpu loop's order: the signs, and so the
   partitions, are the cpu's), the token's bit string, and with an AMS sketch its projection in
   float32, each output coordinate summed over the input coordinates in order (bit-identical).
2. _accumulate_kernel, one program per (set, repetition, partition tile, dim tile): walks the set's
   tokens in order adding each projected token to its partition's block in float64 (the cpu's
   order: the same sums), then AVERAGE, and fill_empty_partitions from the Hamming-nearest token
   (ties to the lower token). Writes float32, or float64 when a final sketch follows.
3. _final_kernel, one program per (set, tile of output coordinates): the count sketch, each output
   the float64 sum of its signed inputs in index order (through a host-built inverse index).
No atomics: every sum has one order, the cpu's, so the results are deterministic.
The wrapper (vkern/muvera.py) validates everything, builds the matrices from the config's seed on
the host (the same arrays the cpu backend uses) and bounds the scratch by chunking the sets.
"""

from __future__ import annotations

import torch

from ._common import device_guard, flat_grid, tl, triton

__all__ = ["encode_chunk"]

_BLOCK_T = 32          # tokens per sketch program
_BLOCK_P = 32          # partitions per accumulate program
_MAX_BLOCK_DP = 64     # projected dims per program
_BLOCK_J = 128         # final-sketch outputs per program


if triton is not None:

    @triton.jit
    def _popcount16(x):
        # bits set in a non-negative int32 below 2**16 (SWAR; no popc under the interpreter)
        x = x - ((x >> 1) & 0x5555)
        x = (x & 0x3333) + ((x >> 2) & 0x3333)
        x = (x + (x >> 4)) & 0x0F0F
        return (x & 0xFF) + (x >> 8)

    @triton.jit
    def _gray_decode(b):
        # the integer whose Gray code is b (prefix XOR, k <= 16 bits)
        p = b ^ (b >> 1)
        p = p ^ (p >> 2)
        p = p ^ (p >> 4)
        return p ^ (p >> 8)

    @triton.jit
    def _sketch_kernel(
        x_ptr,  # float32 [T, D] contiguous
        simhash_ptr,  # float32 [D, R * K]: column r * K + j is projection j of repetition r
        ams_index_ptr,  # int64 [R, D] (HAS_AMS)
        ams_sign_ptr,  # float32 [R, D] (HAS_AMS)
        bits_ptr,  # int32 [T, R] out
        proj_ptr,  # float32 [T, R, DP] out (HAS_AMS)
        T,
        D,
        R,
        K,
        RK,
        DP,
        NUM_DCHUNKS,
        HAS_AMS: tl.constexpr,
        BLOCK_T: tl.constexpr,
        KP: tl.constexpr,
        BLOCK_DP: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)
        dchunk = pid % NUM_DCHUNKS
        rest = pid // NUM_DCHUNKS
        r = rest % R
        tile = rest // R
        rows = tile * BLOCK_T + tl.arange(0, BLOCK_T)
        row_ok = rows < T
        j = tl.arange(0, KP)
        j_ok = j < K
        cols = dchunk * BLOCK_DP + tl.arange(0, BLOCK_DP)
        dots = tl.zeros([BLOCK_T, KP], dtype=tl.float64)
        proj = tl.zeros([BLOCK_T, BLOCK_DP], dtype=tl.float32)
        g_ptrs = simhash_ptr + r * K + j          # row d of simhash_t: RK = R * K apart
        for d in range(0, D):
            xd = tl.load(x_ptr + rows * D + d, mask=row_ok, other=0.0)
            g = tl.load(g_ptrs, mask=j_ok, other=0.0)
            g_ptrs += RK
            # float32 x float32 is exact in float64: any fusing gives the cpu's sums
            dots += xd.to(tl.float64)[:, None] * g.to(tl.float64)[None, :]
            if HAS_AMS:
                target = tl.load(ams_index_ptr + r * D + d)
                sign = tl.load(ams_sign_ptr + r * D + d)
                # sign * x is exact (sign = +-1); non-targets add +0.0, which changes nothing
                proj += tl.where(cols[None, :] == target, (sign * xd)[:, None], 0.0)
        bits = tl.sum(tl.where((dots > 0) & j_ok[None, :], 1 << (K - 1 - j)[None, :], 0), axis=1)
        tl.store(bits_ptr + rows * R + r, bits, mask=row_ok & ((rows * 0 + dchunk) == 0))   # once per token
        if HAS_AMS:
            tl.store(proj_ptr + (rows * R + r)[:, None] * DP + cols[None, :], proj,
                     mask=row_ok[:, None] & (cols[None, :] < DP))

    @triton.jit
    def _accumulate_kernel(
        bits_ptr,  # int32 [T, R]
        src_ptr,  # float32: token t, repetition r, dim c at t * tok_stride + r * rep_stride + c
        offsets_ptr,  # int64 [N + 1]
        out_ptr,  # float32 or float64 [N, out_stride]
        R,
        K,
        DP,
        tok_stride,
        rep_stride,
        out_stride,
        NUM_PCHUNKS,
        NUM_DCHUNKS,
        AVERAGE: tl.constexpr,
        FILL: tl.constexpr,
        OUT_F64: tl.constexpr,
        BLOCK_P: tl.constexpr,
        BLOCK_DP: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)
        dchunk = pid % NUM_DCHUNKS
        rest = pid // NUM_DCHUNKS
        pchunk = rest % NUM_PCHUNKS
        rest = rest // NUM_PCHUNKS
        r = rest % R
        n = rest // R
        lo = tl.load(offsets_ptr + n)
        hi = tl.load(offsets_ptr + n + 1)
        P = 1 << K
        p = pchunk * BLOCK_P + tl.arange(0, BLOCK_P)
        p_ok = p < P
        c = dchunk * BLOCK_DP + tl.arange(0, BLOCK_DP)
        c_ok = c < DP
        acc = tl.zeros([BLOCK_P, BLOCK_DP], dtype=tl.float64)
        count = tl.zeros([BLOCK_P], dtype=tl.int32)
        for t in range(lo, hi):
            part = _gray_decode(tl.load(bits_ptr + t * R + r))
            v = tl.load(src_ptr + t * tok_stride + r * rep_stride + c, mask=c_ok, other=0.0)
            hit = p == part
            acc += tl.where(hit[:, None], v.to(tl.float64)[None, :], 0.0)
            count += hit.to(tl.int32)
        if AVERAGE:
            acc = tl.where(count[:, None] > 1, acc / tl.maximum(count, 1).to(tl.float64)[:, None], acc)
        if FILL:
            empty = (count == 0) & p_ok
            if (hi > lo) & (tl.sum(empty.to(tl.int32), axis=0) > 0):
                gray = (p ^ (p >> 1)).to(tl.int32)
                best_d = tl.full([BLOCK_P], 64, dtype=tl.int32)
                best_t = tl.zeros([BLOCK_P], dtype=tl.int64) + lo
                for t in range(lo, hi):
                    dist = _popcount16(tl.load(bits_ptr + t * R + r) ^ gray)
                    better = dist < best_d            # strictly: ties keep the lower token
                    best_d = tl.where(better, dist, best_d)
                    best_t = tl.where(better, t, best_t)
                v = tl.load(src_ptr + best_t[:, None] * tok_stride + r * rep_stride + c[None, :],
                            mask=empty[:, None] & c_ok[None, :], other=0.0)
                acc = tl.where(empty[:, None], v.to(tl.float64), acc)
        dst = out_ptr + n * out_stride + r * P * DP + p[:, None] * DP + c[None, :]
        mask = p_ok[:, None] & c_ok[None, :]
        if OUT_F64:
            tl.store(dst, acc, mask=mask)
        else:
            tl.store(dst, acc.to(tl.float32), mask=mask)

    @triton.jit
    def _final_kernel(
        raw_ptr,  # float64 [N, RAW]
        order_ptr,  # int64 [RAW]: input indices sorted by (output index, input index)
        starts_ptr,  # int64 [F + 1]: output j sums order[starts[j]:starts[j+1]]
        sign_ptr,  # float32 [RAW]
        out_ptr,  # float32 [N, out_stride]
        RAW,
        F,
        out_stride,
        MAX_LEN,
        NUM_JCHUNKS,
        BLOCK_J: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)
        jchunk = pid % NUM_JCHUNKS
        n = pid // NUM_JCHUNKS
        j = jchunk * BLOCK_J + tl.arange(0, BLOCK_J)
        j_ok = j < F
        s0 = tl.load(starts_ptr + j, mask=j_ok, other=0)
        s1 = tl.load(starts_ptr + j + 1, mask=j_ok, other=0)
        acc = tl.zeros([BLOCK_J], dtype=tl.float64)
        for s in range(0, MAX_LEN):
            i = s0 + s
            ok = j_ok & (i < s1)
            src = tl.load(order_ptr + i, mask=ok, other=0)
            v = tl.load(raw_ptr + n * RAW + src, mask=ok, other=0.0)
            sign = tl.load(sign_ptr + src, mask=ok, other=0.0)
            acc += tl.where(ok, sign.to(tl.float64) * v, 0.0)
        tl.store(out_ptr + n * out_stride + j, acc.to(tl.float32), mask=j_ok)


def _pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def sketch_config(k: int, d_proj: int) -> dict:
    return dict(BLOCK_T=_BLOCK_T, KP=max(_pow2(k), 2), BLOCK_DP=min(_pow2(d_proj), _MAX_BLOCK_DP))


def accumulate_config(k: int, d_proj: int) -> dict:
    return dict(BLOCK_P=min(1 << k, _BLOCK_P), BLOCK_DP=min(_pow2(d_proj), _MAX_BLOCK_DP))


def encode_chunk(x, offsets, mats: dict, R: int, k: int, d_proj: int, average: bool, fill: bool, out) -> None:
    """FDEs of the sets of one chunk into out (float32 [N, F] rows, contiguous).

    x: float32 [T, D] contiguous; offsets: int64 [N + 1] (starting at 0, ending at T, validated);
    mats: the config's matrices as tensors on x's device: simhash_t float32 [D, R * k],
    ams_index int64 [R, D] and ams_sign float32 [R, D] (or None: identity, d_proj == D),
    final_order / final_starts int64 and final_sign float32 with final_max_len (or None).
    """
    T, D = (int(s) for s in x.shape)
    N = int(offsets.shape[0]) - 1
    if N == 0:
        return
    dev = x.device
    P = 1 << k
    raw_dim = R * P * d_proj
    has_ams = mats["ams_index"] is not None
    final = mats["final_order"] is not None
    with device_guard(x):
        bits = torch.empty((max(T, 1), R), dtype=torch.int32, device=dev)
        proj = torch.empty((max(T, 1), R, d_proj), dtype=torch.float32, device=dev) if has_ams else None
        if T:
            sc = sketch_config(k, d_proj)
            ndc = triton.cdiv(d_proj, sc["BLOCK_DP"]) if has_ams else 1
            if not has_ams:
                sc["BLOCK_DP"] = 16   # no projection to compute: the smallest tile
            grid = flat_grid("muvera sketch", triton.cdiv(T, sc["BLOCK_T"]), R, ndc)
            _sketch_kernel[grid](x, mats["simhash_t"], mats["ams_index"] if has_ams else x,
                                 mats["ams_sign"] if has_ams else x, bits, proj if has_ams else bits,
                                 T, D, R, k, R * k, d_proj, ndc, HAS_AMS=has_ams, **sc)
        if has_ams:
            src, tok_stride, rep_stride = proj, R * d_proj, d_proj
        else:
            src, tok_stride, rep_stride = x, D, 0
        target = torch.empty((N, raw_dim), dtype=torch.float64, device=dev) if final else out
        ac = accumulate_config(k, d_proj)
        npc, ndc = triton.cdiv(P, ac["BLOCK_P"]), triton.cdiv(d_proj, ac["BLOCK_DP"])
        grid = flat_grid("muvera accumulate", N, R, npc, ndc)
        _accumulate_kernel[grid](bits, src, offsets, target, R, k, d_proj, tok_stride, rep_stride,
                                 int(target.stride(0)), npc, ndc, AVERAGE=average, FILL=fill, OUT_F64=final, **ac)
        if final:
            F = int(out.shape[1])
            nj = triton.cdiv(F, _BLOCK_J)
            grid = flat_grid("muvera final sketch", N, nj)
            _final_kernel[grid](target, mats["final_order"], mats["final_starts"], mats["final_sign"], out,
                                raw_dim, F, int(out.stride(0)), int(mats["final_max_len"]), nj, BLOCK_J=_BLOCK_J)
