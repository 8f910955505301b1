"""Differential fuzzing (issue 11): every public op and mode (since 2026-12-04 also token pooling,
segment means, int8 documents, candidate rescoring with doc_ids, MUVERA encodings and MaxSim
gradients), cpu backend against the NumPy reference, on generated inputs (every dtype, NumPy and torch, contiguous / Fortran / strided /
transposed / negative-stride / big-endian layouts, NaN / inf / -0, empty and size-1 dims), plus
an invalid-input fuzz that requires the documented exception type (ValueError / TypeError).

Deterministic: hypothesis runs derandomized with no example database. VKERN_FUZZ_EXAMPLES sets
the examples per op (default sized for CI); VKERN_FUZZ_RECORD=path records per-op counts
(examples, mismatches, crashes) there as JSON instead of failing at the first mismatch
(tools/fuzz_report.py runs that and prints the table).

Agreement means: same shapes, dtypes and kinds; NaN and +-inf at the same places; finite values
within float32 accumulation error (or one rounding of a half-precision output); selections (top-k,
kept tokens) equal, except where the reference's own scores tie within that error.
"""
from __future__ import annotations

import json
import math
import os
import traceback
from collections import defaultdict

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import vkern  # noqa: E402
from vkern import _ext, taskvec  # noqa: E402

try:
    import torch
except Exception:  # pragma: no cover
    torch = None

pytestmark = [pytest.mark.skipif(_ext.C is None, reason="cpu backend unavailable"),
              pytest.mark.filterwarnings("ignore::RuntimeWarning")]   # NumPy's inf - inf notes: on purpose

EXAMPLES = int(os.environ.get("VKERN_FUZZ_EXAMPLES", "200"))   # ~30 s for the file on 2 cores
RECORD = os.environ.get("VKERN_FUZZ_RECORD")
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None, print_blob=True,
                suppress_health_check=list(HealthCheck))

STATS: dict = defaultdict(lambda: {"examples": 0, "nonfinite": 0, "refused": 0, "mismatches": 0,
                                   "mismatches_finite": 0, "crashes": 0, "first_failure": None})


@pytest.fixture(scope="module", autouse=True)
def _write_record():
    yield
    if RECORD:
        with open(RECORD, "w") as f:
            json.dump(dict(STATS), f, indent=1, default=str)


class Mismatch(AssertionError):
    pass


class Case:
    """What one example did, for the counts."""

    def __init__(self):
        self.nonfinite = False
        self.refused = False
        self.refusal = None


def run(op: str, check, data) -> None:
    """One example of `op`: check(data, case) raises Mismatch on disagreement."""
    case = Case()
    rec = STATS[op]
    rec["examples"] += 1
    try:
        check(data, case)
    except Exception as exc:  # noqa: BLE001 - counted, then re-raised unless recording
        kind = "mismatches" if isinstance(exc, AssertionError) else "crashes"
        rec[kind] += 1
        if kind == "mismatches" and not case.nonfinite:
            rec["mismatches_finite"] += 1
        if len(rec.setdefault("all", [])) < 20:
            rec["all"].append(f"{type(exc).__name__}: {exc}"[:500])
        if rec["first_failure"] is None:
            rec["first_failure"] = "".join(traceback.format_exception_only(type(exc), exc))[:2000]
        if not RECORD:
            raise
    finally:
        rec["nonfinite"] += case.nonfinite
        rec["refused"] += case.refused
        if case.refusal and len(rec.setdefault("refusals", [])) < 5:
            rec["refusals"].append(case.refusal)


# ------------------------------------------------------------------ inputs

SPECIALS = [np.nan, np.inf, -np.inf, -0.0]
HALF = {"float16", "bfloat16"}


def draw_values(data, shape, case: Case, *, specials=True, label="x", lo=None) -> np.ndarray:
    """float32 values of `shape`: normal, small integers (exact ties) or a mix, with a few specials."""
    seed = data.draw(st.integers(0, 2**32 - 1), label=f"{label}.seed")
    rng = np.random.default_rng(seed)
    kind = data.draw(st.sampled_from(["normal", "ints", "mixed"]), label=f"{label}.values")
    if kind == "normal":
        a = rng.standard_normal(shape)
    elif kind == "ints":
        a = rng.integers(-3, 4, shape).astype(np.float64)
    else:
        a = np.where(rng.random(shape) < 0.5, rng.standard_normal(shape), rng.integers(-2, 3, shape))
    a = np.asarray(a, np.float32).reshape(shape)
    if specials and a.size and data.draw(st.integers(0, 4), label=f"{label}.specials?") == 0:
        for _ in range(data.draw(st.integers(1, 3), label=f"{label}.n_specials")):
            pos = data.draw(st.integers(0, a.size - 1), label=f"{label}.pos")
            a.reshape(-1)[pos] = data.draw(st.sampled_from(SPECIALS), label=f"{label}.special")
    if not np.isfinite(a).all():
        case.nonfinite = True
    return a


class Spec:
    """A logical array plus how to hand it to an op: dtype, kind (numpy / torch) and layout.
    make() builds a fresh object each time (ops that write need one per backend)."""

    def __init__(self, values: np.ndarray, dtype: str, kind: str, layout: str, axis: int):
        self.values, self.dtype, self.kind, self.layout, self.axis = values, dtype, kind, layout, axis

    def make(self):
        a = self.values
        if self.kind == "numpy":
            a = a.astype(self.dtype)
            nd = a.ndim
            if self.layout == "fortran":
                return np.asfortranarray(a)
            if self.layout == "transposed":
                return np.ascontiguousarray(a.transpose()).transpose()
            if self.layout == "strided" and nd:
                big_shape = list(a.shape)
                big_shape[self.axis % nd] *= 2
                big = np.full(big_shape, 7.0, a.dtype)
                sl = [slice(None)] * nd
                sl[self.axis % nd] = slice(None, None, 2)
                big[tuple(sl)] = a
                return big[tuple(sl)]
            if self.layout == "negative" and nd:
                sl = [slice(None)] * nd
                sl[self.axis % nd] = slice(None, None, -1)
                return np.ascontiguousarray(a[tuple(sl)])[tuple(sl)]
            if self.layout == "bigendian":
                return a.astype(a.dtype.newbyteorder(">" if np.little_endian else "<"))
            return np.ascontiguousarray(a)
        t = torch.from_numpy(np.ascontiguousarray(a)).to(getattr(torch, self.dtype))
        nd = t.ndim
        if self.layout == "transposed" and nd >= 2:
            return t.transpose(0, nd - 1).contiguous().transpose(0, nd - 1)
        if self.layout == "strided" and nd:
            ax = self.axis % nd
            big_shape = list(t.shape)
            big_shape[ax] *= 2
            big = torch.full(big_shape, 7.0, dtype=t.dtype)
            idx = [slice(None)] * nd
            idx[ax] = slice(None, None, 2)
            big[tuple(idx)] = t
            return big[tuple(idx)]
        return t


def draw_spec(data, values, *, kind=None, dtype=None, label="x", layouts=True) -> Spec:
    if kind is None:
        kind = data.draw(st.sampled_from(["numpy", "torch"] if torch is not None else ["numpy"]), label=f"{label}.kind")
    if dtype is None:
        dtypes = ["float32", "float16"] + (["bfloat16"] if kind == "torch" else [])
        dtype = data.draw(st.sampled_from(dtypes), label=f"{label}.dtype")
    if kind == "numpy":
        options = ["c", "fortran", "transposed", "strided", "negative", "bigendian"]
    else:
        options = ["c", "transposed", "strided"]
    layout = data.draw(st.sampled_from(options), label=f"{label}.layout") if layouts else "c"
    axis = data.draw(st.integers(0, 3), label=f"{label}.axis")
    return Spec(values, dtype, kind, layout, axis)


def ints_like(x, kind):
    """An index array of `kind`."""
    x = np.asarray(x, np.int64)
    return torch.from_numpy(x) if kind == "torch" else x


def host(x) -> np.ndarray:
    if torch is not None and isinstance(x, torch.Tensor):
        return x.detach().float().numpy() if x.is_floating_point() else x.detach().numpy()
    return np.asarray(x)


def out_tol(x) -> float:
    name = str(getattr(x, "dtype", "float32"))
    return 1.6e-2 if "bfloat16" in name else 2e-3 if "float16" in name else 0.0


def agree(got, want, *, scale=None, what="result", rtol=1e-4) -> None:
    """Same kind, shape and dtype; NaN/inf at the same places; finite values close. `scale`: the
    magnitude the error is relative to (e.g. |x| @ |w| for a product), default |want|."""
    if type(got) is not type(want):
        raise Mismatch(f"{what}: kind {type(got).__name__} vs reference {type(want).__name__}")
    if tuple(got.shape) != tuple(want.shape):
        raise Mismatch(f"{what}: shape {tuple(got.shape)} vs reference {tuple(want.shape)}")
    if str(got.dtype) != str(want.dtype):
        raise Mismatch(f"{what}: dtype {got.dtype} vs reference {want.dtype}")
    g, w = host(got).astype(np.float64), host(want).astype(np.float64)
    tol = max(rtol, out_tol(want))
    gn, wn = np.isnan(g), np.isnan(w)
    if not np.array_equal(gn, wn):
        raise Mismatch(f"{what}: NaN at {np.argwhere(gn != wn)[:5].tolist()} differs (got {g[gn != wn][:5]}, "
                       f"reference {w[gn != wn][:5]})")
    gi, wi = np.isinf(g), np.isinf(w)
    if not (np.array_equal(gi, wi) and np.array_equal(g[gi], w[wi])):
        bad = (gi != wi) | (gi & (g != w))
        raise Mismatch(f"{what}: inf at {np.argwhere(bad)[:5].tolist()} differs (got {g[bad][:5]}, "
                       f"reference {w[bad][:5]})")
    fin = np.isfinite(w)
    s = np.abs(w) if scale is None else np.broadcast_to(np.asarray(host(scale), np.float64), w.shape)
    s = np.where(np.isfinite(s), s, 0.0)
    err = np.abs(g - w)
    lim = tol * (1.0 + s) + 1e-6
    if np.any(err[fin] > lim[fin]):
        i = np.argmax(np.where(fin, err - lim, -np.inf))
        raise Mismatch(f"{what}: {g.reshape(-1)[i]} vs reference {w.reshape(-1)[i]} at flat {i} (tol {lim.reshape(-1)[i]:.3g})")


def same_refusal(call_ref, call_cpu, case: Case):
    """Both backends run, or both refuse with the same documented exception type."""
    try:
        want = call_ref()
    except (ValueError, TypeError) as exc:
        case.refused = True
        case.refusal = f"{type(exc).__name__}: {exc}"[:300]
        try:
            call_cpu()
        except type(exc):
            return None, None
        except (ValueError, TypeError) as exc2:
            raise Mismatch(f"reference raised {type(exc).__name__}({exc}), cpu {type(exc2).__name__}({exc2})")
        raise Mismatch(f"reference raised {type(exc).__name__}({exc}), cpu ran")
    try:
        got = call_cpu()
    except (ValueError, TypeError) as exc:
        raise Mismatch(f"cpu raised {type(exc).__name__}({exc}), the reference ran")
    return got, want


def tie_equivalent(scores, a, b, rtol=1e-4) -> bool:
    """Selections a and b (index sets over `scores`, float64) differ only among scores that tie
    within rtol: every swapped-in index scores like a swapped-out one."""
    a, b = set(int(i) for i in np.asarray(a) if i >= 0), set(int(i) for i in np.asarray(b) if i >= 0)
    if a == b:
        return True
    if len(a) != len(b):
        return False
    only_a = np.array([scores[i] for i in a - b])
    only_b = np.array([scores[i] for i in b - a])
    both = np.concatenate([only_a, only_b])
    if np.isnan(both).any():
        return False
    span = np.max(both) - np.min(both) if np.isfinite(both).all() else np.inf
    return bool(span <= rtol * (1.0 + np.max(np.abs(both))))


def agree_topk(got, want, full, what, cand=None) -> None:
    """(scores, indices) top-k results: scores agree, indices agree except among reference scores
    that tie. full(): the reference's scores without top-k, [rows, N] (or [rows, K] over the
    candidates `cand`, whose entries are the ids the indices name)."""
    agree(got[0], want[0], what=f"top-k {what}")
    gi, wi = host(got[1]), host(want[1])
    if gi.shape != wi.shape or str(got[1].dtype) != str(want[1].dtype):
        raise Mismatch(f"top-k {what} indices: {gi.shape} {got[1].dtype} vs {wi.shape} {want[1].dtype}")
    full = host(full()).astype(np.float64)
    if not full.size:
        return
    full = full.reshape(-1, full.shape[-1])
    if cand is not None:
        cand = np.broadcast_to(cand, (full.shape[0], cand.shape[-1]))
    for r, (a, b) in enumerate(zip(gi.reshape(-1, gi.shape[-1]), wi.reshape(-1, wi.shape[-1]))):
        if np.array_equal(a, b):
            continue
        if cand is None:
            if tie_equivalent(full[r], a, b):
                continue
        else:   # by original id (a repeated candidate id: the same score)
            score_of = {int(c): full[r][j] for j, c in enumerate(cand[r])}
            sa = np.sort([score_of[int(i)] for i in a if i >= 0])
            sb = np.sort([score_of[int(i)] for i in b if i >= 0])
            if sa.shape == sb.shape and np.allclose(sa, sb, rtol=1e-4, atol=1e-6, equal_nan=True):
                continue
        raise Mismatch(f"top-k {what} indices row {r}: {a} vs reference {b} (scores {full[r]}"
                       + ("" if cand is None else f", candidates {cand[r]}") + ")")


# ------------------------------------------------------------------ maxsim

def check_maxsim(data, case):
    D = data.draw(st.integers(1, 12), label="D")
    batched = data.draw(st.booleans(), label="batched")
    B = data.draw(st.integers(0, 3), label="B") if batched else 1
    Lq = data.draw(st.integers(0, 6), label="Lq")
    mode = data.draw(st.sampled_from(["packed", "padded", "list"]), label="mode")
    N = data.draw(st.integers(0, 5), label="N")
    lens = [data.draw(st.integers(0, 7), label="len") for _ in range(N)]
    kind = data.draw(st.sampled_from(["numpy", "torch"] if torch is not None else ["numpy"]), label="kind")
    qv = draw_values(data, (B, Lq, D) if batched else (Lq, D), case, label="q")
    qs = draw_spec(data, qv, kind=kind, label="q")
    kw = {}
    if mode == "packed":
        T = sum(lens)
        ds = draw_spec(data, draw_values(data, (T, D), case, label="d"), kind=kind, label="d")
        docs = ds.make
        kw["doc_offsets"] = lambda: ints_like(np.concatenate([[0], np.cumsum(lens)]).astype(np.int64), kind)
    elif mode == "padded":
        Ld = data.draw(st.integers(0, 7), label="Ld")
        ds = draw_spec(data, draw_values(data, (N, Ld, D), case, label="d"), kind=kind, label="d")
        docs = ds.make
        if data.draw(st.booleans(), label="doc_lengths?"):
            dl = [min(x, Ld) for x in lens]
            kw["doc_lengths"] = lambda: ints_like(dl, kind)
    else:
        dspecs = [draw_spec(data, draw_values(data, (n, D), case, label="d"), kind=kind, label="d") for n in lens]
        docs = lambda: [s.make() for s in dspecs]  # noqa: E731  (one kind; dtypes may differ: promoted)
    if batched and data.draw(st.booleans(), label="query_lengths?"):
        ql = [data.draw(st.integers(0, Lq), label="ql") for _ in range(B)]
        kw["query_lengths"] = lambda: ints_like(ql, kind)
    topk = data.draw(st.one_of(st.none(), st.integers(1, N + 2)), label="topk")

    def call(backend):
        return vkern.maxsim(qs.make(), docs(), topk=topk, backend=backend, **{k: f() for k, f in kw.items()})

    got, want = same_refusal(lambda: call("reference"), lambda: call("cpu"), case)
    if want is None:
        return
    if topk is None:
        agree(got, want, what="scores")
        return
    agree_topk(got, want, lambda: vkern.maxsim(qs.make(), docs(), backend="reference", **{k: f() for k, f in kw.items()}),
               "scores")


# ------------------------------------------------------------------ loki

def _attn_inputs(data, case, with_v=True):
    B = data.draw(st.integers(0, 2), label="B")
    H_kv = data.draw(st.integers(1, 2), label="H_kv")
    G = data.draw(st.integers(1, 3), label="G")
    T = data.draw(st.integers(1, 24), label="T")
    D = data.draw(st.integers(1, 12), label="D")
    kind = data.draw(st.sampled_from(["numpy", "torch"] if torch is not None else ["numpy"]), label="kind")
    qs = draw_spec(data, draw_values(data, (B, H_kv * G, D), case, label="q"), kind=kind, label="q")
    kvdt = data.draw(st.sampled_from(["float32", "float16"] + (["bfloat16"] if kind == "torch" else [])),
                     label="kv.dtype")
    ks = draw_spec(data, draw_values(data, (B, H_kv, T, D), case, label="k"), kind=kind, dtype=kvdt, label="k")
    vs = draw_spec(data, draw_values(data, (B, H_kv, T, D), case, label="v"), kind=kind, dtype=kvdt, label="v")
    lens = None
    if data.draw(st.booleans(), label="seq_lens?"):
        lens = [data.draw(st.integers(1, T), label="len") for _ in range(B)]
    scale = data.draw(st.one_of(st.none(), st.floats(2.0**-10, 2, width=32)), label="scale")   # > 0 (documented)
    return B, H_kv, G, T, D, kind, qs, ks, vs, lens, scale


def check_loki(data, case):
    B, H_kv, G, T, D, kind, qs, ks, vs, lens, scale = _attn_inputs(data, case)
    rank = data.draw(st.integers(1, D), label="rank")
    topk = data.draw(st.one_of(st.integers(1, T + 2), st.floats(0.05, 1.0)), label="topk")
    num_sink = data.draw(st.integers(0, 3), label="num_sink")
    num_recent = data.draw(st.integers(0, 3), label="num_recent")
    gqa = data.draw(st.sampled_from(["per_head", "shared"]), label="gqa")
    prefix = data.draw(st.booleans(), label="k_prefix?")
    R = data.draw(st.integers(rank, D), label="R")

    def call(backend):
        k = ks.make()
        kw = dict(rank=rank, topk=topk, num_sink=num_sink, num_recent=num_recent, gqa=gqa, scale=scale,
                  return_indices=True, backend=backend)
        if lens is not None:
            kw["seq_lens"] = ints_like(lens, kind)
        if prefix:
            kw["k_prefix"] = vkern.loki.key_prefix(k, R)
        return vkern.loki_attention(qs.make(), k, vs.make(), **kw)

    got, want = same_refusal(lambda: call("reference"), lambda: call("cpu"), case)
    if want is None:
        return
    gi, wi = host(got[1]), host(want[1])
    if gi.shape != wi.shape:
        raise Mismatch(f"indices shape {gi.shape} vs reference {wi.shape}")
    q64, k64 = host(qs.make()).astype(np.float64), host(ks.make()).astype(np.float64)
    tied = np.zeros(gi.shape[:2], bool)
    with np.errstate(all="ignore"):
        for b in range(gi.shape[0]):
            for h in range(gi.shape[1]):
                if np.array_equal(gi[b, h], wi[b, h]):
                    continue
                kv = h // G
                qh = q64[b, kv * G:(kv + 1) * G, :rank].sum(0) if gqa == "shared" else q64[b, h, :rank]
                approx = k64[b, kv, :, :rank] @ qh
                if not tie_equivalent(approx, gi[b, h], wi[b, h]):
                    raise Mismatch(f"kept tokens (b={b}, h={h}): {gi[b, h]} vs reference {wi[b, h]}")
                tied[b, h] = True
    go, wo = got[0], want[0]
    if tied.any():   # a tie resolved the other way attends over other tokens: compare the rest
        go, wo = host(go)[~tied], host(wo)[~tied]
        agree(np.asarray(go, np.float32), np.asarray(wo, np.float32), what="out (untied heads)", rtol=1e-3)
    else:
        agree(go, wo, what="out", rtol=1e-3 if not math.isclose(abs(scale or 0), 0) else 1e-3)


def check_decode(data, case):
    B, H_kv, G, T, D, kind, qs, ks, vs, lens, scale = _attn_inputs(data, case)

    def call(backend):
        kw = {} if lens is None else {"seq_lens": ints_like(lens, kind)}
        return vkern.decode_attention(qs.make(), ks.make(), vs.make(), scale=scale, backend=backend, **kw)

    got, want = same_refusal(lambda: call("reference"), lambda: call("cpu"), case)
    if want is not None:
        agree(got, want, what="out", rtol=1e-3)


def check_rotate(data, case):
    H_kv = data.draw(st.integers(1, 2), label="H_kv")
    G = data.draw(st.integers(1, 3), label="G")
    D = data.draw(st.integers(1, 12), label="D")
    lead = tuple(data.draw(st.lists(st.integers(0, 3), max_size=2), label="lead"))
    xs = draw_spec(data, draw_values(data, lead + (H_kv * G, D), case, label="x"), label="x")
    P = draw_values(data, (H_kv, D, D), case, label="P", specials=False)
    if xs.kind == "torch":        # x and P of one kind (documented)
        P = torch.from_numpy(P)

    def call(backend):
        return vkern.loki.rotate(xs.make(), P, backend=backend)

    got, want = same_refusal(lambda: call("reference"), lambda: call("cpu"), case)
    if want is not None:
        scale = np.einsum("...hd,hde->...he", np.abs(host(xs.make()).astype(np.float64)),
                          np.repeat(np.abs(host(P)).astype(np.float64), G, axis=0)) if host(xs.make()).size else None
        agree(got, want, what="rotated", scale=scale)


# ------------------------------------------------------------------ vatp

def check_colsum(data, case):
    B = data.draw(st.integers(0, 2), label="B")
    H_kv = data.draw(st.integers(1, 2), label="H_kv")
    G = data.draw(st.integers(0, 3), label="G")
    T = data.draw(st.integers(0, 20), label="T")
    Tq = data.draw(st.integers(0, T + 2), label="Tq")
    D = data.draw(st.integers(1, 12), label="D")
    kind = data.draw(st.sampled_from(["numpy", "torch"] if torch is not None else ["numpy"]), label="kind")
    qs = draw_spec(data, draw_values(data, (B, H_kv * G, Tq, D), case, label="q"), kind=kind, label="q")
    ks = draw_spec(data, draw_values(data, (B, H_kv, T, D), case, label="k"), kind=kind, label="k")
    causal = data.draw(st.booleans(), label="causal")
    lens = [data.draw(st.integers(0, T), label="len") for _ in range(B)] if data.draw(st.booleans()) else None
    scale = data.draw(st.one_of(st.none(), st.floats(-2, 2, width=32)), label="scale")

    def call(backend):
        kw = {} if lens is None else {"seq_lens": ints_like(lens, kind)}
        return vkern.vatp.attention_colsum(qs.make(), ks.make(), causal=causal, scale=scale, backend=backend, **kw)

    got, want = same_refusal(lambda: call("reference"), lambda: call("cpu"), case)
    if want is not None:
        agree(got, want, what="colsum", rtol=2e-4)


def check_value_l1(data, case):
    shape = tuple(data.draw(st.integers(0, 4), label="dim") for _ in range(3)) + (data.draw(st.integers(0, 40)),)
    vs = draw_spec(data, draw_values(data, shape, case, label="v"), label="v")
    got, want = same_refusal(lambda: vkern.vatp.value_l1(vs.make(), backend="reference"),
                             lambda: vkern.vatp.value_l1(vs.make(), backend="cpu"), case)
    if want is not None:
        agree(got, want, what="value_l1")


def check_prune(data, case):
    B = data.draw(st.integers(0, 2), label="B")
    H = data.draw(st.integers(0, 2), label="H")
    T = data.draw(st.integers(0, 30), label="T")
    Dk = data.draw(st.integers(1, 9), label="Dk")
    Dv = data.draw(st.integers(1, 9), label="Dv")
    kind = data.draw(st.sampled_from(["numpy", "torch"] if torch is not None else ["numpy"]), label="kind")
    ks = draw_spec(data, draw_values(data, (B, H, T, Dk), case, label="k"), kind=kind, label="k")
    vs = draw_spec(data, draw_values(data, (B, H, T, Dv), case, label="v"), kind=kind, label="v")
    sdt = data.draw(st.sampled_from(["float32", "float16"] + (["bfloat16"] if kind == "torch" else [])), label="s.dt")
    ss = draw_spec(data, draw_values(data, (B, H, T), case, label="s"), kind=kind, dtype=sdt, label="s")
    num_sink = data.draw(st.integers(0, 4), label="num_sink")
    num_recent = data.draw(st.integers(0, 4), label="num_recent")
    budget = data.draw(st.one_of(st.integers(max(1, num_sink + num_recent), max(1, num_sink + num_recent + T)),
                                 st.floats(0.01, 1.0)), label="budget")
    lens = [data.draw(st.integers(0, T), label="len") for _ in range(B)] if data.draw(st.booleans()) else None
    mode = data.draw(st.sampled_from(["fresh", "inplace", "out"]), label="mode")
    if mode == "inplace":   # in place writes its inputs: contiguous buffers of native order
        for s in (ks, vs):
            s.layout = "c" if s.layout in ("bigendian", "negative") else s.layout
    extra = data.draw(st.integers(0, 3), label="out.extra")

    def call(backend):
        k, v = ks.make(), vs.make()
        kw = {} if lens is None else {"seq_lens": ints_like(lens, kind)}
        if mode == "inplace":
            kw["inplace"] = True
        if mode == "out":
            kmax = T + extra
            if kind == "numpy":
                kw["out"] = (np.full((B, H, kmax, Dk), 5, k.dtype.newbyteorder("=")),
                             np.full((B, H, kmax, Dv), 5, v.dtype.newbyteorder("=")))
            else:
                kw["out"] = (torch.full((B, H, kmax, Dk), 5, dtype=k.dtype), torch.full((B, H, kmax, Dv), 5,
                                                                                       dtype=v.dtype))
        return vkern.vatp_prune(k, v, ss.make(), budget=budget, num_sink=num_sink, num_recent=num_recent,
                                backend=backend, **kw)

    got, want = same_refusal(lambda: call("reference"), lambda: call("cpu"), case)
    if want is None:
        return
    for name, g, w in zip(("k_kept", "v_kept", "kept_idx", "kept_lens"), got, want):
        if type(g) is not type(w) or tuple(g.shape) != tuple(w.shape) or str(g.dtype) != str(w.dtype):
            raise Mismatch(f"{name}: {type(g).__name__} {tuple(g.shape)} {g.dtype} vs reference "
                           f"{type(w).__name__} {tuple(w.shape)} {w.dtype}")
        gh, wh = host(g), host(w)
        if not np.array_equal(gh, wh, equal_nan=True) or not np.array_equal(np.signbit(gh), np.signbit(wh)):
            raise Mismatch(f"{name}: differs (selection and copies are exact): {gh.tolist()} vs {wh.tolist()}")


# ------------------------------------------------------------------ task vectors

FORMATS = [(1, "sign", None), (1, "sign", "row"), (1, "sign", 32), (2, "affine", None), (3, "affine", 32),
           (4, "affine", "row"), (4, "affine", 64), (8, "affine", None), (8, "affine", 128)]


def draw_qtvs(data, case, N, K, n_max=3):
    n = data.draw(st.integers(0, n_max), label="n_tasks")
    out = []
    for i in range(n):
        tau = draw_values(data, (N, K), case, label=f"tau{i}", specials=False)
        if data.draw(st.booleans(), label="residual?") and i == 0 and n >= 2:
            taus = [tau] + [draw_values(data, (N, K), case, label="tau_r", specials=False) for _ in range(n - 1)]
            bb = data.draw(st.sampled_from([2, 3, 4, 8]), label="base_bits")
            ob = data.draw(st.sampled_from([1, 2, 3, 4]), label="offset_bits")
            gs = data.draw(st.sampled_from([None, "row", 32]), label="res.gs")
            return taskvec.quantize_residual(taus, base_bits=bb, offset_bits=ob, group_size=gs)
        bits, scheme, gs = data.draw(st.sampled_from(FORMATS), label="format")
        out.append(taskvec.quantize(tau, bits=bits, scheme=scheme, group_size=gs))
    return out


def _torch_qtvs(qtvs, kind):
    return taskvec.to_device(qtvs, "cpu") if kind == "torch" else qtvs


def check_apply(data, case):
    N = data.draw(st.integers(0, 6), label="N")
    K = data.draw(st.integers(1, 150), label="K")
    kind = data.draw(st.sampled_from(["numpy", "torch"] if torch is not None else ["numpy"]), label="kind")
    bs = draw_spec(data, draw_values(data, (N, K), case, label="base"), kind=kind, label="base")
    qtvs = draw_qtvs(data, case, N, K)
    coeffs = [data.draw(st.floats(-2, 2, width=32), label="coef") for _ in qtvs]
    method = data.draw(st.sampled_from(["sum", "ties"]), label="method")
    density = data.draw(st.one_of(st.none(), st.floats(0.0, 1.0)), label="density") if method == "ties" else None
    mode = data.draw(st.sampled_from(["fresh", "inplace", "out"]), label="mode")
    if mode == "inplace" and bs.layout in ("bigendian", "negative"):
        bs.layout = "c"

    def call(backend):
        base = bs.make()
        kw = {}
        if mode == "inplace":
            kw["out"] = base
        elif mode == "out":
            kw["out"] = np.empty(base.shape, base.dtype.newbyteorder("=")) if kind == "numpy" else torch.empty(base.shape,
                                                                                             dtype=base.dtype)
        return vkern.apply_task_vectors(base, _torch_qtvs(qtvs, kind), coeffs, method=method, density=density,
                                        backend=backend, **kw)

    got, want = same_refusal(lambda: call("reference"), lambda: call("cpu"), case)
    if want is None:
        return
    deq = sum((abs(c) * np.abs(taskvec.dequantize(q, backend="reference").astype(np.float64))
               for c, q in zip(coeffs, qtvs)), np.zeros((N, K)))
    scale = np.abs(host(bs.make()).astype(np.float64)) + deq
    if method == "ties" and qtvs:
        want = _ties_either_sign(got, want, bs, qtvs, coeffs, density)
    agree(got, want, what="merged", scale=scale)


def _ties_either_sign(got, want, bs, qtvs, coeffs, density):
    """TIES elects a sign from sum_t c_t tau_t: where that sum is within float32 rounding of 0 the
    election is a tie (float32 and float64 may elect differently, and the merge jumps). There, the
    merge with either sign is right; elsewhere the reference's. Returns the reference to compare with."""
    from vkern.reference import taskvec as ref

    taus = []
    for q in qtvs:
        t = ref.dequantize(q)
        if density is not None:
            t = np.where(ref.trim_keep(t, density), t, np.float32(0))
        taus.append(t.astype(np.float64))
    w = np.stack([c * t for c, t in zip(coeffs, taus)])
    c = np.asarray(coeffs, np.float64)[:, None, None]
    near = np.abs(w.sum(0)) <= 1e-5 * np.abs(w).sum(0)
    if not near.any():
        return want
    base = host(bs.make()).astype(np.float64)
    g = host(got).astype(np.float64)
    best = host(want).astype(np.float64)
    for positive in (True, False):
        agree_t = (w > 0) if positive else (w < 0)
        den = np.where(agree_t, c, 0.0).sum(0)
        alt = base + np.where(agree_t, w, 0.0).sum(0) / np.where(den == 0, 1.0, den)
        use = near & (np.abs(g - alt) < np.abs(g - best))
        best = np.where(use, alt, best)
    return _cast_like(best, want)


def _cast_like(x64, like):
    if isinstance(like, np.ndarray):
        return x64.astype(like.dtype)
    return torch.from_numpy(x64).to(like.dtype)


def check_delta_linear(data, case):
    N = data.draw(st.integers(0, 6), label="N")
    K = data.draw(st.integers(1, 150), label="K")
    M = data.draw(st.integers(0, 5), label="M")
    kind = data.draw(st.sampled_from(["numpy", "torch"] if torch is not None else ["numpy"]), label="kind")
    xs = draw_spec(data, draw_values(data, (M, K), case, label="x"), kind=kind, label="x")
    bs = draw_spec(data, draw_values(data, (N, K), case, label="base"), kind=kind, label="base")
    qtvs = draw_qtvs(data, case, N, K)
    by_id = bool(qtvs) and data.draw(st.booleans(), label="task_ids?")
    if by_id:
        ids = [data.draw(st.integers(-1, len(qtvs) - 1), label="id") for _ in range(M)]
        coeffs = None
    else:
        coeffs = [data.draw(st.floats(-2, 2, width=32), label="coef") for _ in qtvs]

    def call(backend):
        kw = {"task_ids": ints_like(ids, kind)} if by_id else {}
        return vkern.delta_linear(xs.make(), bs.make(), _torch_qtvs(qtvs, kind), coeffs, backend=backend, **kw)

    got, want = same_refusal(lambda: call("reference"), lambda: call("cpu"), case)
    if want is None:
        return
    W = np.abs(host(bs.make()).astype(np.float64))
    for q, c in zip(qtvs, coeffs if coeffs is not None else [1.0] * len(qtvs)):
        W = W + abs(c) * np.abs(taskvec.dequantize(q, backend="reference").astype(np.float64))
    x = np.abs(host(xs.make()).astype(np.float64))
    with np.errstate(all="ignore"):
        scale = x @ W.T if M and N else None
    agree(got, want, what="y", scale=scale)


def check_dequantize(data, case):
    N = data.draw(st.integers(0, 6), label="N")
    K = data.draw(st.integers(1, 150), label="K")
    qtvs = draw_qtvs(data, case, N, K, n_max=2) or [taskvec.quantize(np.zeros((N, K), np.float32), bits=4)]
    kind = data.draw(st.sampled_from(["numpy", "torch"] if torch is not None else ["numpy"]), label="kind")
    for q in _torch_qtvs(qtvs, kind):
        got, want = same_refusal(lambda: taskvec.dequantize(q, backend="reference"),
                                 lambda: taskvec.dequantize(q, backend="cpu"), case)
        if want is not None:
            agree(got, want, what="dequantized")


def check_quantize(data, case):
    """Host-only (every backend runs the NumPy quantizer): the documented error bound, exact zeros and
    the storage round trip instead of a differential check."""
    N = data.draw(st.integers(0, 6), label="N")
    K = data.draw(st.integers(1, 150), label="K")
    tau = draw_values(data, (N, K), case, label="tau", specials=False)
    spec = draw_spec(data, tau, label="tau")
    bits, scheme, gs = data.draw(st.sampled_from(FORMATS), label="format")
    q = taskvec.quantize(spec.make(), bits=bits, scheme=scheme, group_size=gs, backend="cpu")
    t = host(spec.make()).astype(np.float64)
    d = taskvec.dequantize(q, backend="cpu").astype(np.float64)
    if d.shape != t.shape:
        raise Mismatch(f"dequantized shape {d.shape} vs {t.shape}")
    same = taskvec.dequantize(taskvec.QTaskVector.from_dict(q.to_dict()))
    if not np.array_equal(same, d.astype(np.float32)):
        raise Mismatch("to_dict / from_dict round trip changed the values")
    if scheme == "affine" and t.size:
        steps = np.asarray(q.scales, np.float64)
        G = steps.shape[1]
        cols = np.arange(K) // q.group_size if G > 1 else np.zeros(K, int)
        step = steps[:, cols] if steps.shape[0] == N else np.broadcast_to(steps[:, cols], (N, K))
        if np.any(np.abs(t - d) > step / 2 * (1 + 1e-5) + 1e-30):
            raise Mismatch("affine error above step/2")
        if np.any(d[t == 0] != 0):
            raise Mismatch("an exact zero did not stay zero")


# ------------------------------------------------------------------ smaller indexes (issue 15) and gradients (issue 14)

def _draw_docs(data, case, kind, D, N, label="d", layouts=True):
    """(docs factory, kwargs factory, lens): packed, padded or list documents of N token sets."""
    lens = [data.draw(st.integers(0, 9), label=f"{label}.len") for _ in range(N)]
    mode = data.draw(st.sampled_from(["packed", "padded", "list"]), label=f"{label}.mode")
    if mode == "packed":
        ds = draw_spec(data, draw_values(data, (sum(lens), D), case, label=label), kind=kind, label=label,
                       layouts=layouts)
        off = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        return ds.make, lambda: {"doc_offsets": ints_like(off, kind)}, lens
    if mode == "padded":
        Ld = max(lens, default=0) + data.draw(st.integers(0, 2), label=f"{label}.pad")
        ds = draw_spec(data, draw_values(data, (N, Ld, D), case, label=label), kind=kind, label=label,
                       layouts=layouts)
        if data.draw(st.booleans(), label=f"{label}.lengths?"):
            return ds.make, lambda: {"doc_lengths": ints_like(lens, kind)}, lens
        return ds.make, dict, [Ld] * N
    specs = [draw_spec(data, draw_values(data, (n, D), case, label=label), kind=kind, label=label,
                       layouts=layouts) for n in lens]
    return (lambda: [sp.make() for sp in specs]), dict, lens


def _kind(data):
    return data.draw(st.sampled_from(["numpy", "torch"] if torch is not None else ["numpy"]), label="kind")


def _doc_list(d, kw):
    """The documents as host float32 arrays, one per document (what the op sees)."""
    if isinstance(d, list):
        return [host(x).astype(np.float32) for x in d]
    x = host(d).astype(np.float32)
    if "doc_offsets" in kw:
        off = host(kw["doc_offsets"])
        return [x[off[i]:off[i + 1]] for i in range(len(off) - 1)]
    lens = host(kw["doc_lengths"]) if "doc_lengths" in kw else [x.shape[1]] * x.shape[0]
    return [x[i, :n] for i, n in enumerate(lens)]


def _ward_has_ties(docs, protected):
    """True if some document's Ward distances (1 - x x^T over its unprotected tokens) repeat."""
    for x in docs:
        y = x[min(protected, len(x)):].astype(np.float64)
        if len(y) < 3:
            continue
        dist = (1.0 - y @ y.T)[np.triu_indices(len(y), 1)]
        if not np.isfinite(dist).all():
            continue   # refused anyway
        dist = np.sort(dist)
        if np.any(np.diff(dist) <= 1e-6 * (1.0 + np.abs(dist[1:]))):
            return True
    return False


def check_pool(data, case):
    kind = _kind(data)
    D, N = data.draw(st.integers(1, 8), label="D"), data.draw(st.integers(0, 4), label="N")
    docs, kw, _ = _draw_docs(data, case, kind, D, N)
    args = dict(pool_factor=data.draw(st.integers(1, 4), label="pool_factor"),
                protected_tokens=data.draw(st.integers(0, 2), label="protected_tokens"),
                method=data.draw(st.sampled_from(["ward", "kmeans"]), label="method"),
                seed=data.draw(st.integers(0, 3), label="seed"))
    got, want = same_refusal(lambda: vkern.pool_tokens(docs(), backend="reference", **args, **kw()),
                             lambda: vkern.pool_tokens(docs(), backend="cpu", **args, **kw()), case)
    if want is None:
        return
    if args["method"] == "ward" and _ward_has_ties(_doc_list(docs(), kw()), args["protected_tokens"]):
        # Exact distance ties: the merge order among equal distances is not part of the contract
        # (SciPy's own recipe can form fewer clusters there), so check only what must hold anyway:
        # one pooled document per document, none longer than its cluster budget, none empty
        # that was not empty, protected tokens kept as they were.
        lens = [len(x) for x in _doc_list(docs(), kw())]
        for name, res in (("cpu", got), ("reference", want)):
            n_out = np.diff(host(res[1]))
            p, f = args["protected_tokens"], args["pool_factor"]
            bound = [n if max((n - min(p, n)) // f, 1) >= n - min(p, n) else min(p, n) + max((n - min(p, n)) // f, 1)
                     for n in lens]
            if len(n_out) != len(lens) or np.any(n_out > bound) or np.any((n_out == 0) != (np.asarray(lens) == 0)):
                raise Mismatch(f"{name}: pooled lengths {n_out.tolist()} for documents of {lens} tokens ({args})")
        return
    if not np.array_equal(host(got[1]), host(want[1])):
        raise Mismatch(f"pooled doc_offsets {host(got[1]).tolist()} vs reference {host(want[1]).tolist()} ({args})")
    agree(got[0], want[0], what=f"pooled tokens ({args['method']})")


def check_segment_mean(data, case):
    kind = _kind(data)
    T, D = data.draw(st.integers(0, 12), label="T"), data.draw(st.integers(1, 8), label="D")
    xs = draw_spec(data, draw_values(data, (T, D), case), kind=kind)
    S = data.draw(st.integers(1, 5), label="S")
    ids = np.asarray([data.draw(st.integers(0, S - 1), label="id") for _ in range(T)], np.int64)
    given_s = data.draw(st.booleans(), label="num_segments?")

    def call(backend):
        return vkern.segment_mean(xs.make(), ints_like(ids, kind), num_segments=S if given_s else None,
                                  backend=backend)

    got, want = same_refusal(lambda: call("reference"), lambda: call("cpu"), case)
    if want is not None:
        agree(got, want, what="segment means")


def _draw_queries(data, case, kind, D):
    batched = data.draw(st.booleans(), label="batched")
    B, Lq = (data.draw(st.integers(0, 3), label="B") if batched else 1), data.draw(st.integers(0, 5), label="Lq")
    qs = draw_spec(data, draw_values(data, (B, Lq, D) if batched else (Lq, D), case, label="q"), kind=kind,
                   label="q")
    kw = {}
    if batched and data.draw(st.booleans(), label="query_lengths?"):
        ql = [data.draw(st.integers(0, Lq), label="ql") for _ in range(B)]
        kw["query_lengths"] = ints_like(ql, kind)
    return qs, kw, B, batched


def check_maxsim_int8(data, case):
    # quantize_docs then the int8 path of maxsim: cpu vs reference (queries quantised per call).
    kind = _kind(data)
    D, N = data.draw(st.integers(1, 12), label="D"), data.draw(st.integers(0, 5), label="N")
    qs, qkw, B, batched = _draw_queries(data, case, kind, D)
    docs, kw, _ = _draw_docs(data, case, kind, D, N)
    try:
        qd = vkern.quantize_docs(docs(), **kw())
    except (ValueError, TypeError) as exc:   # non-finite docs: refused before any kernel, by contract
        case.refused, case.refusal = True, f"{type(exc).__name__}: {exc}"[:300]
        return
    topk = data.draw(st.one_of(st.none(), st.integers(1, N + 2)), label="topk")

    def call(backend, k=topk):
        return vkern.maxsim(qs.make(), qd, topk=k, backend=backend, **qkw)

    got, want = same_refusal(lambda: call("reference"), lambda: call("cpu"), case)
    if want is None:
        return
    if topk is None:
        agree(got, want, what="int8 scores")
        return
    agree_topk(got, want, lambda: call("reference", None), "int8 scores")


def check_maxsim_subset(data, case):
    # doc_ids: one candidate list for every query, or one per query, over packed / padded / int8 docs.
    kind = _kind(data)
    D, N = data.draw(st.integers(1, 12), label="D"), data.draw(st.integers(1, 5), label="N")
    qs, qkw, B, batched = _draw_queries(data, case, kind, D)
    docs, kw, _ = _draw_docs(data, case, kind, D, N)
    per_query = batched and data.draw(st.booleans(), label="per_query?")
    K = data.draw(st.integers(0, N + 1), label="K")
    ids = np.asarray([[data.draw(st.integers(0, N - 1), label="id") for _ in range(K)]
                      for _ in range(B if per_query else 1)], np.int64)
    ids = ids if per_query else ids[0]
    topk = data.draw(st.one_of(st.none(), st.integers(1, K + 1)), label="topk")
    d = docs()
    if isinstance(d, list):   # doc_ids works on a store: pack the list first
        return
    extra = kw()

    def call(backend, k=topk):
        return vkern.maxsim(qs.make(), d, doc_ids=ints_like(ids, kind), topk=k, backend=backend, **qkw, **extra)

    got, want = same_refusal(lambda: call("reference"), lambda: call("cpu"), case)
    if want is None:
        return
    if topk is None:
        agree(got, want, what="candidate scores")
        return
    agree_topk(got, want, lambda: call("reference", None), "candidate scores", cand=ids)


def check_muvera(data, case):
    from vkern import muvera

    kind = _kind(data)
    D = data.draw(st.integers(1, 8), label="D")
    cfg = muvera.MuveraConfig(
        dim=D, num_repetitions=data.draw(st.integers(1, 3), label="R"),
        num_simhash_projections=data.draw(st.integers(0, 3), label="k"),
        projection_dim=data.draw(st.one_of(st.none(), st.integers(1, 4)), label="projection_dim"),
        fill_empty_partitions=data.draw(st.booleans(), label="fill"),
        final_projection_dim=data.draw(st.one_of(st.none(), st.integers(1, 16)), label="final"),
        seed=data.draw(st.integers(0, 5), label="seed"))
    if data.draw(st.booleans(), label="documents?"):
        docs, kw, _ = _draw_docs(data, case, kind, D, data.draw(st.integers(0, 4), label="N"))

        def call(backend):
            return muvera.encode_documents(docs(), cfg, backend=backend, **kw())
    else:
        qs, qkw, _, _ = _draw_queries(data, case, kind, D)

        def call(backend):
            return muvera.encode_queries(qs.make(), cfg, backend=backend, **qkw)

    got, want = same_refusal(lambda: call("reference"), lambda: call("cpu"), case)
    if want is not None:
        agree(got, want, what="FDE")


def check_maxsim_grad(data, case):
    # torch autograd through vkern.maxsim: the cpu kernels' gradients against the reference's.
    if torch is None:
        return
    D, N = data.draw(st.integers(1, 8), label="D"), data.draw(st.integers(0, 4), label="N")
    qs, qkw, B, batched = _draw_queries(data, case, "torch", D)
    docs, kw, _ = _draw_docs(data, case, "torch", D, N, layouts=False)
    w_seed = data.draw(st.integers(0, 2**16), label="w.seed")

    def call(backend):
        q = qs.make().detach().requires_grad_(True)
        d = docs()
        d = [x.detach().requires_grad_(True) for x in d] if isinstance(d, list) else d.detach().requires_grad_(True)
        s = vkern.maxsim(q, d, backend=backend, **qkw, **kw())
        w = torch.from_numpy(np.random.default_rng(w_seed).standard_normal(tuple(s.shape)).astype(np.float32))
        # -inf scores (empty documents) carry no gradient; keep them out of the loss
        (torch.where(torch.isfinite(s), s, torch.zeros_like(s)).float() * w).sum().backward()
        dg = [x.grad for x in d] if isinstance(d, list) else [d.grad]
        return s.detach(), q.grad, dg

    got, want = same_refusal(lambda: call("reference"), lambda: call("cpu"), case)
    if want is None:
        return
    agree(got[0], want[0], what="scores")
    if want[0].numel() and not torch.isfinite(want[0]).all():
        return   # NaN scores: gradients are not defined (argmax of NaN similarities); scores agreed above
    for name, g, r in [("queries.grad", got[1], want[1])] + [(f"docs.grad[{i}]", a, b)
                                                               for i, (a, b) in enumerate(zip(got[2], want[2]))]:
        if (g is None) != (r is None):
            raise Mismatch(f"{name}: {'None' if g is None else 'a tensor'} vs reference "
                           f"{'None' if r is None else 'a tensor'}")
        if g is not None:
            agree(g, r, what=name, rtol=1e-3)


OPS = {
    "maxsim": check_maxsim,
    "loki_attention": check_loki,
    "decode_attention": check_decode,
    "loki.rotate": check_rotate,
    "vatp.attention_colsum": check_colsum,
    "vatp.value_l1": check_value_l1,
    "vatp_prune": check_prune,
    "apply_task_vectors": check_apply,
    "delta_linear": check_delta_linear,
    "taskvec.dequantize": check_dequantize,
    "taskvec.quantize": check_quantize,
    "pool_tokens": check_pool,
    "segment_mean": check_segment_mean,
    "maxsim int8 docs": check_maxsim_int8,
    "maxsim doc_ids": check_maxsim_subset,
    "muvera": check_muvera,
    "maxsim gradients": check_maxsim_grad,
}


@pytest.mark.parametrize("op", list(OPS))
def test_fuzz_cpu_vs_reference(op):
    @FUZZ
    @given(st.data())
    def fuzz(data):
        run(op, OPS[op], data)

    fuzz()


# ------------------------------------------------------------------ invalid inputs

def _f32(*shape):
    return np.random.default_rng(len(shape) * 7 + sum(shape)).standard_normal(shape).astype(np.float32)


_Q4 = None


def _qtv():
    global _Q4
    if _Q4 is None:
        _Q4 = taskvec.quantize(_f32(6, 40), bits=4, group_size=32)
    return _Q4


# op -> (valid arguments, call(args, backend), {array arg: allowed ndims}, {int arg: allowed range})
INVALID = {
    "maxsim": (lambda: {"queries": _f32(3, 8), "docs": _f32(10, 8), "doc_offsets": np.array([0, 4, 10]), "topk": 2},
               lambda a, be: vkern.maxsim(a["queries"], a["docs"], doc_offsets=a["doc_offsets"], topk=a["topk"],
                                          backend=be),
               {"queries": (2, 3), "docs": (2,), "doc_offsets": (1,)}, {"topk": (1, None)}),
    "loki_attention": (lambda: {"q": _f32(1, 4, 8), "k_cache": _f32(1, 2, 12, 8), "v_cache": _f32(1, 2, 12, 8),
                                "rank": 4, "topk": 6, "num_sink": 1, "num_recent": 2},
                       lambda a, be: vkern.loki_attention(a["q"], a["k_cache"], a["v_cache"], rank=a["rank"],
                                                          topk=a["topk"], num_sink=a["num_sink"],
                                                          num_recent=a["num_recent"], backend=be),
                       {"q": (3,), "k_cache": (4,), "v_cache": (4,)},
                       {"rank": (1, 8), "topk": (3, None), "num_sink": (0, None), "num_recent": (0, None)}),
    "decode_attention": (lambda: {"q": _f32(2, 4, 8), "k_cache": _f32(2, 2, 12, 8), "v_cache": _f32(2, 2, 12, 8),
                                  "seq_lens": np.array([12, 5])},
                         lambda a, be: vkern.decode_attention(a["q"], a["k_cache"], a["v_cache"],
                                                              seq_lens=a["seq_lens"], backend=be),
                         {"q": (3,), "k_cache": (4,), "v_cache": (4,), "seq_lens": (1,)}, {}),
    "vatp.attention_colsum": (lambda: {"q": _f32(1, 4, 3, 8), "k": _f32(1, 2, 12, 8), "seq_lens": np.array([9])},
                              lambda a, be: vkern.vatp.attention_colsum(a["q"], a["k"], seq_lens=a["seq_lens"],
                                                                        backend=be),
                              {"q": (4,), "k": (4,), "seq_lens": (1,)}, {}),
    "vatp.value_l1": (lambda: {"v": _f32(1, 2, 12, 8)}, lambda a, be: vkern.vatp.value_l1(a["v"], backend=be),
                      {"v": (4,)}, {}),
    "vatp_prune": (lambda: {"k": _f32(1, 2, 12, 8), "v": _f32(1, 2, 12, 4), "scores": _f32(1, 2, 12), "budget": 6,
                            "num_sink": 1, "num_recent": 2},
                   lambda a, be: vkern.vatp_prune(a["k"], a["v"], a["scores"], budget=a["budget"],
                                                  num_sink=a["num_sink"], num_recent=a["num_recent"], backend=be),
                   {"k": (4,), "v": (4,), "scores": (3,)},
                   {"budget": (3, None), "num_sink": (0, None), "num_recent": (0, None)}),
    "apply_task_vectors": (lambda: {"base": _f32(6, 40), "qtvs": [_qtv()], "coeffs": [0.5]},
                           lambda a, be: vkern.apply_task_vectors(a["base"], a["qtvs"], a["coeffs"], backend=be),
                           {"base": (2,)}, {}),
    "delta_linear": (lambda: {"x": _f32(3, 40), "base": _f32(6, 40), "qtvs": [_qtv()], "coeffs": [0.5]},
                     lambda a, be: vkern.delta_linear(a["x"], a["base"], a["qtvs"], a["coeffs"], backend=be),
                     {"x": (2,), "base": (2,)}, {}),
    "loki.rotate": (lambda: {"x": _f32(3, 4, 8), "P": _f32(2, 8, 8)},
                    lambda a, be: vkern.loki.rotate(a["x"], a["P"], backend=be), {"x": (2, 3, 4, 5), "P": (3,)}, {}),
    "pool_tokens": (lambda: {"docs": _f32(10, 8), "doc_offsets": np.array([0, 4, 10]), "pool_factor": 2,
                             "protected_tokens": 1},
                    lambda a, be: vkern.pool_tokens(a["docs"], doc_offsets=a["doc_offsets"], pool_factor=a["pool_factor"],
                                                    protected_tokens=a["protected_tokens"], backend=be),
                    {"docs": (2,), "doc_offsets": (1,)}, {"pool_factor": (1, None), "protected_tokens": (0, None)}),
    "segment_mean": (lambda: {"docs": _f32(10, 8), "segment_ids": np.array([0, 0, 1, 2, 2, 2, 3, 3, 3, 3])},
                     lambda a, be: vkern.segment_mean(a["docs"], a["segment_ids"], backend=be),
                     {"docs": (2,), "segment_ids": (1,)}, {}),
}
UNBOUNDED_INTS = {"pool_factor", "protected_tokens"}   # any large value is valid (one cluster / all kept)

FLOAT_ARGS = {"queries", "docs", "q", "k_cache", "v_cache", "k", "v", "scores", "base", "x", "P"}


def _mutate(data, op, args, no_dim=False):
    """One change that makes the call invalid; returns a label."""
    _, _, ndims, ints = INVALID[op]
    choices = ["dtype", "rank", "not-an-array", "backend"] + (["int"] if ints else [])
    if len(ndims) > 1 and not no_dim:     # a size that must pair with another array's (once: two could pair up)
        choices.append("dim")
    if any(a in ("qtvs",) for a in args):
        choices += ["coeffs", "qtvs"]
    arrays = sorted(a for a in ndims if isinstance(args.get(a), np.ndarray) and args[a].ndim >= 1)
    if not arrays:                        # a first mutation took them all
        choices = [c for c in choices if c in ("backend", "int")] or ["backend"]
    what = data.draw(st.sampled_from(choices), label="mutation")
    if what == "dtype":
        name = data.draw(st.sampled_from([a for a in arrays if a != "P"] or arrays), label="arg")   # P: float64 ok
        x = args[name]
        bad = (["float64", "int32", "bool", "complex64", "uint8"] if name in FLOAT_ARGS
               else ["float32", "float64", "bool"])
        args[name] = x.astype(data.draw(st.sampled_from(bad), label="dtype"))
        return f"{name}.dtype"
    if what == "rank":
        name = data.draw(st.sampled_from(arrays), label="arg")
        nd = data.draw(st.sampled_from([n for n in range(6) if n not in ndims[name]]), label="ndim")
        x = args[name]
        flat = x.reshape(-1)
        args[name] = flat[0] if nd == 0 else flat.reshape((1,) * (nd - 1) + (-1,)) if flat.size else \
            flat.reshape((1,) * (nd - 1) + (0,))
        return f"{name}.ndim={nd}"
    if what == "not-an-array":
        name = data.draw(st.sampled_from(arrays), label="arg")
        values = [None, "x", 3, 2.5, {"a": 1}, object()]
        if name == "seq_lens" or (name == "doc_offsets" and op == "pool_tokens"):
            values = values[1:]               # None: the default (pool_tokens: padded docs take none)
        args[name] = data.draw(st.sampled_from(values), label="value")
        return f"{name}=not an array"
    if what == "backend":
        args["__backend__"] = data.draw(st.sampled_from(["gpu", "", "numpy", "cpu ", 3]), label="backend")
        return "backend"
    if what == "dim":
        name = data.draw(st.sampled_from([a for a in arrays if (args[a].ndim >= 2 and op not in ("pool_tokens", "segment_mean"))
                                          or a in ("doc_offsets", "seq_lens", "segment_ids")]), label="arg")
        x = args[name]
        ax = data.draw(st.integers(0, x.ndim - 1), label="axis")
        if name == "segment_ids":          # one id too many or too few: not one per row
            args[name] = np.concatenate([x, x[:1]]) if data.draw(st.booleans(), label="longer") else x[1:]
            return f"{name}.shape"
        if name in ("doc_offsets", "seq_lens"):
            bad = x.copy()
            bad[data.draw(st.integers(0, len(x) - 1), label="i")] = data.draw(st.sampled_from([-1, 10**6]), label="v")
            args[name] = bad
            return f"{name} value"
        # a size that breaks a pairing: the last (D / K) dim, or an axis of a paired array
        grow = data.draw(st.integers(1, 3), label="grow")
        pad = [(0, 0)] * x.ndim
        ax = x.ndim - 1 if name in ("queries", "docs", "x", "base", "q", "k_cache", "k", "P") or ax == 0 and \
            name in ("v", "scores", "v_cache") else ax
        if name in ("v", "v_cache", "scores") and ax == x.ndim - 1 and name != "v_cache":
            ax = 0                            # v's own D may differ from k's; its batch may not
        if name == "k" and op == "vatp_prune":
            ax = 0
        pad[ax] = (0, grow)
        args[name] = np.pad(x, pad)
        return f"{name}.shape[{ax}]+{grow}"
    if what == "int":
        name = data.draw(st.sampled_from(sorted(ints)), label="arg")
        lo, hi = ints[name]
        bad = [lo - 1, -(2**70), 2**70, True, 1.5, "3", None] + ([hi + 1] if hi is not None else [])
        if name in ("topk", "budget"):
            bad = [v for v in bad if not isinstance(v, float) and v != 2**70]   # a float: a fraction; a big int:
            # more than seq_len, which is taken whole
            bad += [0.0, -0.5, 1.5, float("nan")]
        if name == "topk" and op == "maxsim":
            bad = [0, -1, True, 1.5, "3", 2**70 * -1]
        if name == "topk" and op == "loki_attention":
            bad = [0, -1, True, "3", 0.0, -0.5, 1.5, float("nan"), 2]   # 2 < num_sink + num_recent
        if name == "rank":
            bad = [0, -1, 9, True, 1.5, "3", None]
        if name in UNBOUNDED_INTS:
            bad = [v for v in bad if v != 2**70]
        args[name] = data.draw(st.sampled_from(bad), label="value")
        return f"{name}={args[name]!r}"
    if what == "coeffs":
        args["coeffs"] = data.draw(st.sampled_from([[0.5, 0.5], [], "a", [float("nan")], [None], 0.5]), label="c")
        return "coeffs"
    args["qtvs"] = data.draw(st.sampled_from([[None], ["q"], [np.zeros((6, 40), np.float32)], None,
                                              [taskvec.quantize(_f32(6, 39), bits=4)],
                                              [taskvec.quantize(_f32(5, 40), bits=2)]]), label="q")
    return "qtvs"


def check_invalid(op, data, case):
    valid, call, _, _ = INVALID[op]
    args = valid()
    label = _mutate(data, op, args)
    if data.draw(st.booleans(), label="second mutation?"):   # two faults at once: still refused
        label += " + " + _mutate(data, op, args, no_dim=True)
    bad_backend = args.pop("__backend__", None)
    results = {}
    for backend in ("reference", "cpu"):
        try:
            call(args, backend if bad_backend is None else bad_backend)
        except (ValueError, TypeError) as exc:
            results[backend] = type(exc)
            continue
        except Exception as exc:  # noqa: BLE001
            raise RuntimeError(f"{label}: {backend} raised {type(exc).__name__}: {exc} (documented: "
                               f"ValueError / TypeError)") from exc
        raise Mismatch(f"{label}: {backend} accepted an invalid call")
    if results["reference"] is not results["cpu"]:
        raise Mismatch(f"{label}: reference raised {results['reference'].__name__}, cpu {results['cpu'].__name__}")


@pytest.mark.parametrize("op", list(INVALID))
def test_fuzz_invalid_inputs(op):
    @FUZZ
    @given(st.data())
    def fuzz(data):
        run(f"invalid {op}", lambda d, case: check_invalid(op, d, case), data)

    fuzz()


# ------------------------------------------------------------------ regressions the fuzz found

def test_regression_ties_residual_exact_zero():
    """apply_task_vectors(method="ties") on RTVQ residuals: an element whose base + offset is exactly
    0 in float32 (as dequantize defines it) must stay 0 (a zero never agrees). The cpu kernel folded
    the 4-bit offset's zero point into an FMA, left a 6e-8 residue there, counted it as agreeing and
    halved the merged value (fuzz: 12 of 1,095 apply_task_vectors examples at 1,000 per op)."""
    base = np.random.default_rng(0).standard_normal((1, 32)).astype(np.float32)
    t0 = np.random.default_rng(0).standard_normal((1, 32)).astype(np.float32)
    t1 = np.random.default_rng(0).integers(-3, 4, (1, 32)).astype(np.float32)
    qs = taskvec.quantize_residual([t0, t1], base_bits=2, offset_bits=4)
    deq = [taskvec.dequantize(q, backend="reference") for q in qs]
    assert (deq[0] == 0).any() or (deq[1] == 0).any()        # the case: exact zeros of a residual
    for q, d in zip(qs, deq):
        np.testing.assert_array_equal(taskvec.dequantize(q, backend="cpu"), d)
    want = vkern.apply_task_vectors(base, qs, [1.0, 1.0], method="ties", backend="reference")
    got = vkern.apply_task_vectors(base, qs, [1.0, 1.0], method="ties", backend="cpu")
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
