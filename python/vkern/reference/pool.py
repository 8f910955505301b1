"""Token pooling reference: the definitions, plain NumPy (docs/ops/retrieval_memory.md).

Per document of n tokens: the first ``p = min(protected_tokens, n)`` tokens are kept as they are;
the other m = n - p are grouped into at most k = max(m // pool_factor, 1) clusters and replaced by
the cluster means (not re-normalised). If k >= m the document is returned unchanged. Output rows:
the protected tokens, then one mean per cluster, clusters ordered by their lowest token index.

ward: PyLate's recipe. Dissimilarity 1 - <x_i, x_j> (the cosine distance of normalised vectors),
the dot products in float32 and the rest in float64, merged by Ward's rule in its Lance-Williams
form on those dissimilarities (what ``scipy.cluster.hierarchy.linkage(condensed, "ward")`` does),
with one extension: a negative dissimilarity (vectors not of unit norm, or rounding between
near-duplicate tokens; SciPy refuses those, so PyLate's pooling raises) enters the rule as its
square with its sign, which keeps the rule reducible and the tree the same for every merge order,
then cut like ``fcluster(Z, k, criterion="maxclust")``: the smallest merge height r such that the
merges of height <= r leave at most k clusters (fewer when merge heights tie at the cut).

kmeans: exactly k clusters (CRISP-style), squared Euclidean distance, Lloyd's iterations from a
k-means++ seeding driven by a counter-based generator of (seed, document index); a cluster left
empty takes the token farthest from its centre. Deterministic given the seed.
"""
from __future__ import annotations

import numpy as np

KMEANS_ITERS = 10


def num_clusters(m: int, pool_factor: int) -> int:
    return max(m // pool_factor, 1)


# ------------------------------------------------------------------ Ward

def ward_dissimilarity(x: np.ndarray) -> np.ndarray:
    """[m, D] float -> [m, m] float64: 1 - <x_i, x_j>, the dots in float32."""
    x = np.asarray(x, np.float32)
    return 1.0 - (x @ x.T).astype(np.float64)


def ward_merges(d: np.ndarray):
    """Ward agglomeration of a full dissimilarity matrix [m, m] (the generic algorithm: merge the
    closest active pair, update by Lance-Williams). Returns a list of (a, b, height) with a, b the
    smallest token index of each merged cluster, in merge order."""
    m = d.shape[0]
    d = d.astype(np.float64)
    d = d * np.abs(d)                # the squares, a negative dissimilarity keeping its sign
    np.fill_diagonal(d, np.inf)
    size = np.ones(m)
    rep = np.arange(m)               # smallest token index in each active cluster
    active = np.ones(m, bool)
    merges = []
    for _ in range(m - 1):
        masked = np.where(active[:, None] & active[None, :], d, np.inf)
        flat = int(np.argmin(masked))
        i, j = divmod(flat, m)
        h = d[i, j]
        merges.append((int(min(rep[i], rep[j])), int(max(rep[i], rep[j])), float(h)))
        ni, nj = size[i], size[j]
        nk = size
        # Ward's update on the squares: d(k, i+j)^2 = ((ni+nk) d(k,i)^2 + (nj+nk) d(k,j)^2 - nk d(i,j)^2)
        # / (ni+nj+nk), a negative result kept (SciPy takes its square root: NaN; never with
        # dissimilarities >= 0 from unit vectors in practice). With signed squares and no clamp the
        # rule stays reducible even where a dissimilarity is negative, so any merge order (this
        # generic one, SciPy's NN-chain, the cpu kernel's) gives the same tree; heights are kept as
        # squares (same order).
        new = ((ni + nk) * d[i] + (nj + nk) * d[j] - nk * h) / (ni + nj + nk)
        keep = min(i, j)
        gone = max(i, j)
        d[keep] = new
        d[:, keep] = new
        d[keep, keep] = np.inf
        active[gone] = False
        size[keep] = ni + nj
        rep[keep] = min(rep[i], rep[j])
    return merges


def maxclust_labels(m: int, merges, k: int) -> np.ndarray:
    """fcluster(maxclust=k) on the merges: the smallest height r among the merge heights such that
    the merges of height <= r leave at most k clusters. Labels 0.. by lowest token index."""
    if k >= m:
        return np.arange(m)
    heights = np.sort([h for _, _, h in merges])
    r = heights[m - k - 1]
    parent = np.arange(m)

    def find(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    # Union in height order (stable): the dendrogram scipy builds from the sorted linkage.
    for a, b, h in sorted(merges, key=lambda t: t[2]):
        if h <= r:
            ra, rb = find(a), find(b)
            parent[max(ra, rb)] = min(ra, rb)
    roots = np.array([find(a) for a in range(m)])
    _, labels = np.unique(roots, return_inverse=True)   # roots are lowest indices: sorted = by first token
    return labels


# ---------------------------------------------------------------- k-means

_M64 = (1 << 64) - 1


def splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def kmeans_init(x: np.ndarray, k: int, seed: int, doc: int) -> np.ndarray:
    """k token indices by k-means++ seeding: the first is splitmix64(base) % m, each next one
    drawn with probability proportional to its weight, the squared distance to the nearest chosen
    token (|x_i|^2 - 2 <x_i, x_j> + |x_j|^2, the dot in float32, the rest in float64, clamped at
    0; chosen tokens weigh 0): u = (splitmix64(base + i) >> 11) / 2^53 times the total weight,
    the first index whose running sum exceeds u (at most m - 1); if every weight is 0, the lowest
    unchosen index. base = seed * 0x100000001B3 + doc * 0xD1B54A32D192ED03 (mod 2^64)."""
    x = np.asarray(x, np.float32)
    m = x.shape[0]
    xx = (x.astype(np.float64) ** 2).sum(1)
    base = (seed * 0x100000001B3 + doc * 0xD1B54A32D192ED03) & _M64
    taken = np.zeros(m, bool)

    def weights(j):
        taken[j] = True
        v = xx - 2.0 * (x @ x[j]).astype(np.float64) + xx[j]
        return np.where((v < 0) | taken, 0.0, v)

    chosen = [splitmix64(base) % m]
    w = weights(chosen[0])
    for i in range(1, k):
        cs = np.cumsum(w)
        if cs[-1] > 0:
            u = (splitmix64((base + i) & _M64) >> 11) * 2.0 ** -53 * cs[-1]
            j = min(int(np.searchsorted(cs, u, side="right")), m - 1)
        else:
            j = int(np.argmin(taken))
        chosen.append(j)
        w = np.minimum(w, weights(j))
    return np.array(chosen, np.int64)


def kmeans_labels(x: np.ndarray, k: int, seed: int, doc: int) -> np.ndarray:
    """Lloyd's k-means, at most KMEANS_ITERS assignment rounds (stops when nothing moves): labels
    [m] in [0, k), every cluster non-empty. Centres are float32; the squared distance is
    |x|^2 - 2 <x, c> + |c|^2 with the dot in float32 and the rest in float64; ties to the lower
    cluster; an empty cluster takes the token farthest from its centre among clusters of 2+."""
    x = np.asarray(x, np.float32)
    m = x.shape[0]
    c = x[kmeans_init(x, k, seed, doc)].copy()
    xx = (x.astype(np.float64) ** 2).sum(1)
    prev = None
    for _ in range(KMEANS_ITERS):
        cc = (c.astype(np.float64) ** 2).sum(1)
        d2 = xx[:, None] - 2.0 * (x @ c.T).astype(np.float64) + cc[None, :]
        labels = np.argmin(d2, axis=1)
        counts = np.bincount(labels, minlength=k)
        for e in np.nonzero(counts == 0)[0]:
            far = np.where(counts[labels] > 1, d2[np.arange(m), labels], -np.inf)
            t = int(np.argmax(far))
            counts[labels[t]] -= 1
            labels[t] = e
            counts[e] = 1
        if prev is not None and np.array_equal(labels, prev):
            break
        prev = labels
        sums = np.zeros((k, x.shape[1]))
        np.add.at(sums, labels, x.astype(np.float64))
        c = (sums / counts[:, None]).astype(np.float32)
    return labels


# ----------------------------------------------------------- pool_tokens

def pool_doc(x: np.ndarray, pool_factor: int, protected_tokens: int, method: str, seed: int, doc: int):
    """One document [n, D] -> pooled [n', D] float32."""
    x = np.asarray(x, np.float32)
    n = x.shape[0]
    p = min(protected_tokens, n)
    rest = x[p:]
    m = rest.shape[0]
    k = num_clusters(m, pool_factor)
    if k >= m:
        return x.copy()
    if method == "ward":
        labels = maxclust_labels(m, ward_merges(ward_dissimilarity(rest)), k)
    else:
        labels = kmeans_labels(rest, k, seed, doc)
        # order clusters by their lowest token index
        first = np.full(k, m)
        np.minimum.at(first, labels, np.arange(m))
        labels = np.argsort(np.argsort(first, kind="stable"), kind="stable")[labels]
    return np.concatenate([x[:p], segment_mean(rest, labels)], axis=0)


def pool_tokens(docs: np.ndarray, doc_offsets: np.ndarray, pool_factor: int, protected_tokens: int,
                method: str, seed: int):
    """Packed docs [T, D] + offsets [N+1] -> (pooled [T', D] float32, new offsets int64 [N+1])."""
    out, lens = [], []
    for n in range(len(doc_offsets) - 1):
        pooled = pool_doc(docs[doc_offsets[n]:doc_offsets[n + 1]], pool_factor, protected_tokens, method, seed, n)
        out.append(pooled)
        lens.append(pooled.shape[0])
    offsets = np.zeros(len(lens) + 1, np.int64)
    np.cumsum(lens, out=offsets[1:])
    D = docs.shape[1]
    return (np.concatenate(out, axis=0) if out else np.zeros((0, D), np.float32)), offsets


def segment_mean(x: np.ndarray, segment_ids: np.ndarray, num_segments: int | None = None) -> np.ndarray:
    """x [T, D], segment_ids int [T] in [0, S) -> float32 [S, D] means (float64 sums); an id with
    no rows gives a zero row."""
    x = np.asarray(x, np.float64)
    ids = np.asarray(segment_ids, np.int64)
    S = (int(ids.max()) + 1 if ids.size else 0) if num_segments is None else int(num_segments)
    sums = np.zeros((S, x.shape[1]))
    np.add.at(sums, ids, x)
    counts = np.bincount(ids, minlength=S).astype(np.float64)
    return (sums / np.maximum(counts, 1)[:, None]).astype(np.float32)
