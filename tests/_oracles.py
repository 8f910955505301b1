"""Test oracles written out independently of vkern.reference (shared by the op tests)."""
import numpy as np


def softmax_colsum(q, k, seq_lens, causal, scale):
    """attention_colsum by its definition, float64, with the full row of logits: for every query row,
    exp(s - s.max()) / sum over the keys that row sees, summed per key (and over the query heads of a
    GQA group). Causal row i sits at position T - Tq + i and sees keys 0 .. min(pos, L - 1); rows at or
    past L add nothing. Non-finite logits give what NumPy gives (NaN rows where the max is not finite)."""
    q = np.asarray(q, np.float64)
    k = np.asarray(k, np.float64)
    B, Hq, Tq, D = q.shape
    H, T = k.shape[1], k.shape[2]
    G = Hq // H
    out = np.zeros((B, H, T))
    with np.errstate(all="ignore"):
        for b in range(B):
            L = int(seq_lens[b])
            for hq in range(Hq):
                for i in range(Tq):
                    pos = T - Tq + i
                    n = (pos + 1 if 0 <= pos < L else 0) if causal else L
                    if n <= 0:
                        continue
                    s = (q[b, hq, i] @ k[b, hq // G, :n].T) * scale
                    e = np.exp(s - s.max())
                    out[b, hq // G, :n] += e / e.sum()
    return out
