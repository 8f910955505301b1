"""MUVERA fixed-dimensional encodings (FDE), reference in NumPy (docs/ops/retrieval_memory.md).

For repetition r (of R): k SimHash projections g_1..g_k (Gaussian, [D, k]) give each token the
bit string b = [<x, g_1> > 0, ..., <x, g_k> > 0] (projection 1 = most significant bit); the token
falls in partition p = the integer whose Gray code is b (p = b ^ b>>1 ^ b>>2 ^ ...), one of 2^k.
Each token is projected to d_proj dims: identity (d_proj = D), or an AMS sketch (each input
coordinate added, with a random sign, to one random output coordinate). Block (r, p) of a
query's FDE is the SUM of its projected tokens in p; of a document's, their AVERAGE, and with
fill_empty_partitions an empty block takes the projected token whose bit string is nearest in
Hamming distance to p's Gray code (ties to the lower token). Blocks are laid out [r][p][d_proj];
an optional final count sketch maps the R * 2^k * d_proj values to final_projection_dim.

<FDE(q), FDE(d)> approximates R * MaxSim(q, d) (identity projection).
"""
from __future__ import annotations

import numpy as np


_POPCOUNT = np.array([bin(i).count("1") for i in range(1 << 16)], np.int64)


def gray_decode(b: np.ndarray, k: int) -> np.ndarray:
    """The integers whose Gray codes are b (prefix XOR of the bits, MSB first)."""
    p = b.copy()
    shift = 1
    while shift < k:
        p ^= p >> shift
        shift <<= 1
    return p


def partitions(x: np.ndarray, simhash: np.ndarray):
    """x [T, D] float32, simhash [D, k] -> (bit strings int64 [T], partition ids int64 [T])."""
    k = simhash.shape[1]
    bits = (x.astype(np.float64) @ simhash.astype(np.float64)) > 0   # float64: signs agree across backends
    b = (bits.astype(np.int64) << np.arange(k - 1, -1, -1, dtype=np.int64)).sum(1) if k else np.zeros(len(x), np.int64)
    return b, gray_decode(b, k)


def project(x: np.ndarray, ams_index, ams_sign, d_proj: int) -> np.ndarray:
    """x [T, D] -> [T, d_proj]: identity when ams_index is None, else the AMS sketch."""
    if ams_index is None:
        return x.astype(np.float32, copy=False)
    out = np.zeros((x.shape[0], d_proj), np.float32)
    for i in range(x.shape[1]):
        out[:, ams_index[i]] += ams_sign[i] * x[:, i]
    return out


def encode(x: np.ndarray, offsets: np.ndarray, mats: dict, average: bool, fill_empty: bool) -> np.ndarray:
    """Packed tokens x [T, D] float32 with offsets [N+1] -> FDEs float32 [N, F]."""
    R, k, dp = mats["R"], mats["k"], mats["d_proj"]
    P = 1 << k
    N = len(offsets) - 1
    x = np.asarray(x, np.float32)
    doc = np.repeat(np.arange(N), np.diff(offsets))
    out = np.zeros((N, R, P, dp), np.float64)
    for r in range(R):
        b, part = partitions(x, mats["simhash"][r])
        proj = project(x, None if mats["ams_index"] is None else mats["ams_index"][r],
                       None if mats["ams_sign"] is None else mats["ams_sign"][r], dp).astype(np.float64)
        flat = doc * P + part
        block = np.zeros((N * P, dp))
        np.add.at(block, flat, proj)
        count = np.bincount(flat, minlength=N * P).astype(np.float64)
        if average:
            block /= np.maximum(count, 1)[:, None]
        if fill_empty:
            gray = np.arange(P) ^ (np.arange(P) >> 1)
            for n in range(N):
                lo, hi = offsets[n], offsets[n + 1]
                empty = np.nonzero(count[n * P:(n + 1) * P] == 0)[0]
                if hi == lo or not len(empty):
                    continue
                ham = _POPCOUNT[(b[lo:hi, None] ^ gray[None, empty]) & 0xFFFF]   # k <= 16
                block[n * P + empty] = proj[lo + np.argmin(ham, axis=0)]
        out[:, r] = block.reshape(N, P, dp)
    fde = out.reshape(N, R * P * dp)
    if mats["final_index"] is not None:
        final = np.zeros((N, mats["final_dim"]))
        for i in range(fde.shape[1]):
            final[:, mats["final_index"][i]] += mats["final_sign"][i] * fde[:, i]
        fde = final
    return fde.astype(np.float32)
