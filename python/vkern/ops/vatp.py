"""Value-aware KV pruning (VATP), SPEC §3: attention column sums, value L1
norms, and per-(batch, KV head) pruning with real compaction of K and V.

The wrappers validate every input before any kernel runs, pick a backend and
hand results back as the caller's array kind. The CPU, CUDA and Triton
kernels live in csrc/cpu/vatp.cpp, csrc/cuda/vatp.cu and kernels/vatp.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np

from .. import _arrays as A
from .. import _ext
from .._backend import Backend, cpu_reason, cuda_reason, host_reason, op, triton_reason
from ..reference import vatp as ref

_COLSUM = op("attention_colsum")
_VNORM = op("value_l1")
_PRUNE = op("vatp_prune")


# ----------------------------------------------------------------- validation

def _check_float(x: Any, name: str) -> None:
    if not A.is_float(x):
        raise A.float_dtype_error(name, x)


def _check_rank4(x: Any, name: str, layout: str) -> None:
    if x.ndim != 4:
        raise ValueError(f"{name}: expected shape {layout}, got {tuple(x.shape)}")


_same_place = A.same_place


def _host_ints(x: Any) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x.astype(np.int64, copy=False)
    return x.detach().to("cpu").numpy().astype(np.int64, copy=False)


def device_lens(x: Any) -> bool:
    """Whether seq_lens lives on a GPU. Its values are then never read on the host (no sync: a decode
    step can be captured in a CUDA graph); the GPU paths clamp them to [0, T] and resolve the budgets
    on the device."""
    return x is not None and not isinstance(x, np.ndarray) and x.device.type != "cpu"


def _seq_lens(seq_lens: Any, B: int, T: int, arrays: dict):
    """Validated (native seq_lens or None, host int64 [B], or None when seq_lens is on a GPU)."""
    if seq_lens is None:
        return None, np.full(B, T, dtype=np.int64)
    sl, _ = A.to_native(seq_lens, "seq_lens")
    if not A.is_integer(sl):
        raise TypeError(f"seq_lens: expected an integer array, got {A.dtype_name(sl)}")
    if sl.ndim != 1 or sl.shape[0] != B:
        raise ValueError(f"seq_lens: expected shape ({B},) (one per sequence), got {tuple(sl.shape)}")
    arrays["seq_lens"] = sl
    _same_place(arrays)
    if device_lens(sl):
        return sl, None   # not range-checked on the host (a sync); clamped to [0, T] on the device
    host = np.ascontiguousarray(_host_ints(sl))
    if B and (host.min() < 0 or host.max() > T):
        raise ValueError(f"seq_lens: every length must be in [0, T={T}], got min={int(host.min())}, "
                         f"max={int(host.max())}")
    return sl, host


def _nonneg_int(x: Any, name: str) -> int:
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)):
        raise TypeError(f"{name}: expected an int, got {type(x).__name__}")
    if not 0 <= x < 2**63:
        raise ValueError(f"{name}: expected an int >= 0" + (", got " if x < 0 else " and < 2**63, got ") + f"{int(x)}")
    return int(x)


# ------------------------------------------------------------ call records

@dataclass
class ColsumCall:
    q: Any                  # native [B, Hq, Tq, D]
    k: Any                  # native [B, H_kv, T, D]
    seq_lens: Any           # native int [B] or None
    host_lens: Optional[np.ndarray]   # int64 [B]; None when seq_lens lives on a GPU (never read on the host)
    causal: bool
    scale: float
    device: str
    lib: str
    origin: str

    def __repr__(self) -> str:
        return (f"q {tuple(self.q.shape)} {A.dtype_name(self.q)}, k {tuple(self.k.shape)} {A.dtype_name(self.k)}, "
                f"causal={self.causal}, {self.lib} on {self.device}")


@dataclass
class VnormCall:
    v: Any
    device: str
    lib: str
    origin: str

    def __repr__(self) -> str:
        return f"v {tuple(self.v.shape)} {A.dtype_name(self.v)}, {self.lib} on {self.device}"


@dataclass
class PruneCall:
    k: Any                  # native [B, H_kv, T, Dk]
    v: Any                  # native [B, H_kv, T, Dv]
    scores: Any             # native float [B, H_kv, T]
    seq_lens: Any           # native int [B] or None
    host_lens: Optional[np.ndarray]   # int64 [B] valid tokens; None when seq_lens lives on a GPU
    kept_lens: Optional[np.ndarray]   # int64 [B] resolved budget per sequence; None with host_lens
    kmax: int               # output width: the largest kept_lens, or the budget at seq_len = T (device lengths)
    budget: Union[int, float]   # as validated (the GPU paths resolve kept_lens from it on the device)
    num_sink: int
    num_recent: int
    inplace: bool
    device: str
    lib: str
    origin: str
    out: Optional[tuple] = None   # (k_dst, v_dst): the caller's out= buffers cut to [B, H_kv, kmax, D]

    def __repr__(self) -> str:
        return (f"k {tuple(self.k.shape)} {A.dtype_name(self.k)}, v {tuple(self.v.shape)} {A.dtype_name(self.v)}, "
                f"scores {A.dtype_name(self.scores)}, keep {self.kmax}, inplace={self.inplace}, "
                f"out={'given' if self.out is not None else None}, {self.lib} on {self.device}")


def _prepare_colsum(q, k, causal, seq_lens, scale) -> ColsumCall:
    qn, origin = A.to_native(q, "q")
    kn, _ = A.to_native(k, "k")
    _check_float(qn, "q")
    _check_float(kn, "k")
    _check_rank4(qn, "q", "[B, Hq, Tq, D]")
    _check_rank4(kn, "k", "[B, H_kv, T, D]")
    B, Hq, Tq, D = (int(s) for s in qn.shape)
    H_kv, T = int(kn.shape[1]), int(kn.shape[2])
    if D < 1:
        raise ValueError(f"q: expected a head dim D >= 1, got shape {tuple(qn.shape)}")
    if int(kn.shape[0]) != B:
        raise ValueError(f"k: expected batch B={B} (from q), got {int(kn.shape[0])}")
    if int(kn.shape[3]) != D:
        raise ValueError(f"k: expected head dim D={D} (from q), got {int(kn.shape[3])}")
    if H_kv < 1 or Hq % H_kv:
        raise ValueError(f"q: query heads Hq={Hq} must be a multiple of the KV heads H_kv={H_kv} (from k)")
    if not isinstance(causal, (bool, np.bool_)):
        raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    elif isinstance(scale, bool) or not isinstance(scale, (int, float, np.floating, np.integer)):
        raise TypeError(f"scale: expected a float or None, got {type(scale).__name__}")
    elif not abs(float(scale)) <= float(np.finfo(np.float32).max):
        raise ValueError(f"scale: expected a finite float (|scale| <= "
                         f"{float(np.finfo(np.float32).max):.6g}, finite in float32), got {scale}")
    arrays = {"q": qn, "k": kn}
    lib = _same_place(arrays)
    sl, host = _seq_lens(seq_lens, B, T, arrays)
    return ColsumCall(qn, kn, sl, host, bool(causal), float(scale), A.device_of(qn), lib, origin)


def _prepare_vnorm(v) -> VnormCall:
    vn, origin = A.to_native(v, "v")
    _check_float(vn, "v")
    _check_rank4(vn, "v", "[B, H_kv, T, D]")
    return VnormCall(vn, A.device_of(vn), "numpy" if isinstance(vn, np.ndarray) else "torch", origin)


def _size(x) -> int:
    return int(x.size) if isinstance(x, np.ndarray) else int(x.numel())


def _extent(x) -> tuple:
    """(first byte, one past the last byte) that x's elements touch (negative strides included)."""
    base = A.data_ptr(x)
    item = x.itemsize if isinstance(x, np.ndarray) else x.element_size()
    strides = x.strides if isinstance(x, np.ndarray) else tuple(s * item for s in x.stride())
    lo = base + sum(min(0, (int(n) - 1) * int(s)) for n, s in zip(x.shape, strides))
    hi = base + sum(max(0, (int(n) - 1) * int(s)) for n, s in zip(x.shape, strides)) + item
    return lo, hi


def _overlap(a, b) -> bool:
    """Whether a and b may share memory (exact for NumPy, conservative for interleaved torch views)."""
    if not (_size(a) and _size(b)):
        return False
    (a0, a1), (b0, b1) = _extent(a), _extent(b)
    return a0 < b1 and b0 < a1 and _really_overlap(a, b)


def _no_self_overlap(x, name: str, what: str = "inplace=True") -> None:
    """In-place compaction (and an out= buffer) needs every element at its own address."""
    if not _size(x):
        return
    dims = sorted((abs(int(s)), int(n)) for n, s in zip(x.shape, A.elem_strides(x)) if int(n) > 1)
    reach = 1
    for stride, n in dims:
        if stride < reach:
            raise ValueError(f"{name}: {what} needs a layout where no two elements share memory "
                             f"(got strides {A.elem_strides(x)} for shape {tuple(x.shape)})")
        reach = stride * n


def _prepare_out(out, kn, vn, sn, kmax: int, inplace: bool) -> tuple:
    """Validated out=(k_out, v_out): native arrays [B, H_kv, >= kmax, D] of the caches' dtypes, writeable,
    on the caches' device, overlapping neither each other nor k, v, scores. Returns their [:, :, :kmax] views."""
    if inplace:
        raise ValueError("out: cannot be combined with inplace=True (in place the results are views of k and v)")
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise TypeError(f"out: expected a pair (k_out, v_out) of arrays, got {type(out).__name__}"
                        + (f" of length {len(out)}" if isinstance(out, (tuple, list)) else ""))
    dsts = []
    for i, (buf, src, name) in enumerate(zip(out, (kn, vn), ("k", "v"))):
        label = f"out[{i}]"
        if not (isinstance(buf, np.ndarray) or A.is_torch(buf) or hasattr(buf, "__dlpack__")):
            raise TypeError(f"{label}: expected an array for {name}_out, got {type(buf).__name__}")
        bn, _ = A.to_native(buf, label, writes=True)
        if A.dtype_name(bn) != A.dtype_name(src):
            raise TypeError(f"{label}: expected dtype {A.dtype_name(src)} (that of {name}), got {A.dtype_name(bn)}")
        B, H, D = int(src.shape[0]), int(src.shape[1]), int(src.shape[3])
        shape = tuple(int(x) for x in bn.shape)
        if bn.ndim != 4 or shape[0] != B or shape[1] != H or shape[3] != D or shape[2] < kmax:
            raise ValueError(f"{label}: expected shape [B, H_kv, >= {kmax}, D] = ({B}, {H}, >= {kmax}, {D}) "
                             f"for {name}, got {shape}")
        if isinstance(bn, np.ndarray) and not bn.flags.writeable:
            raise ValueError(f"{label}: expected a writeable array, got a read-only one")
        dsts.append(bn[:, :, :kmax])
    _same_place({"k": kn, "out[0]": dsts[0], "out[1]": dsts[1]})
    for i, d in enumerate(dsts):
        _no_self_overlap(d, f"out[{i}]", "out=")
        for other, oname in ((kn, "k"), (vn, "v"), (sn, "scores")):
            if _overlap(d, other):
                raise ValueError(f"out[{i}]: expected memory separate from {oname}, got an overlapping buffer")
    if _overlap(dsts[0], dsts[1]):
        raise ValueError("out[0], out[1]: expected separate buffers for k_out and v_out, got overlapping ones")
    return dsts[0], dsts[1]


def _prepare_prune(k, v, scores, budget, num_sink, num_recent, seq_lens, inplace, out=None) -> PruneCall:
    kn, origin = A.to_native(k, "k", writes=inplace)
    vn, _ = A.to_native(v, "v", writes=inplace)
    sn, _ = A.to_native(scores, "scores")
    _check_float(kn, "k")
    _check_float(vn, "v")
    _check_float(sn, "scores")
    _check_rank4(kn, "k", "[B, H_kv, T, D]")
    _check_rank4(vn, "v", "[B, H_kv, T, D]")
    B, H, T = (int(s) for s in kn.shape[:3])
    if tuple(int(s) for s in vn.shape[:3]) != (B, H, T):
        raise ValueError(f"v: expected leading dims [B, H_kv, T] = {(B, H, T)} (from k), got {tuple(vn.shape)}")
    if sn.ndim != 3 or tuple(int(s) for s in sn.shape) != (B, H, T):
        raise ValueError(f"scores: expected shape [B, H_kv, T] = {(B, H, T)} (the cache's), got {tuple(sn.shape)}")
    num_sink = _nonneg_int(num_sink, "num_sink")
    num_recent = _nonneg_int(num_recent, "num_recent")
    if not isinstance(inplace, (bool, np.bool_)):
        raise TypeError(f"inplace: expected a bool, got {type(inplace).__name__}")
    if isinstance(budget, bool) or not isinstance(budget, (int, float, np.integer, np.floating)):
        raise TypeError(f"budget: expected an int (tokens) or a float (fraction of seq_len), "
                        f"got {type(budget).__name__}")
    if isinstance(budget, (float, np.floating)):
        budget = float(budget)
        if not (0.0 < budget <= 1.0):
            raise ValueError(f"budget: a float budget is a fraction of seq_len in (0, 1], got {budget}")
    else:
        budget = int(budget)
        if budget < max(1, num_sink + num_recent):
            raise ValueError(f"budget: expected >= num_sink + num_recent = {num_sink + num_recent} "
                             f"(and >= 1) tokens, got {budget}")
    arrays = {"k": kn, "v": vn, "scores": sn}
    lib = _same_place(arrays)
    sl, host = _seq_lens(seq_lens, B, T, arrays)
    if inplace:
        for x, name in ((kn, "k"), (vn, "v")):
            if isinstance(x, np.ndarray) and not x.flags.writeable:
                raise ValueError(f"{name}: inplace=True needs a writeable array")
            _no_self_overlap(x, name)
        if _size(kn) and _size(vn):
            (k0, k1), (v0, v1) = _extent(kn), _extent(vn)
            if A.data_ptr(kn) == A.data_ptr(vn) or (k0 < v1 and v0 < k1 and _really_overlap(kn, vn)):
                raise ValueError("k, v: inplace=True needs k and v in separate memory (they overlap)")
    if host is None:
        # seq_lens on a GPU: the output width comes from host-known arguments only; the budget
        # never shrinks as seq_len grows, so the budget at seq_len = T bounds every sequence's
        kept = None
        kmax = ref.resolve_budget(budget, T, num_sink, num_recent) if B else 0
    else:
        kept = np.array([ref.resolve_budget(budget, int(L), num_sink, num_recent) for L in host], dtype=np.int64)
        kmax = int(kept.max()) if B else 0
    dst = None if out is None else _prepare_out(out, kn, vn, sn, kmax, bool(inplace))
    return PruneCall(kn, vn, sn, sl, host, kept, kmax, budget, num_sink, num_recent, bool(inplace),
                     A.device_of(kn), lib, origin, dst)


def _really_overlap(a, b) -> bool:
    if isinstance(a, np.ndarray):
        return bool(np.shares_memory(a, b, max_work=10**6)) if a.size * b.size < 10**12 else True
    return True  # interleaved torch views: refuse rather than risk a wrong answer


# ------------------------------------------------------ reference backends

_host_only = host_reason


def _colsum_reference(call: ColsumCall):
    out = ref.attention_colsum(A.to_numpy(call.q), A.to_numpy(call.k), call.host_lens, call.causal, call.scale)
    return A.as_kind(out, call.q)


def _vnorm_reference(call: VnormCall):
    return A.as_kind(ref.value_l1(A.to_numpy(call.v)), call.v)


def _into_out(call: PruneCall, k_kept, v_kept, kept_idx):
    """Out-of-place results copied into the caller's out= buffers (backends without a direct path)."""
    if call.out is None:
        return k_kept, v_kept, kept_idx
    for dst, src in zip(call.out, (k_kept, v_kept)):
        if isinstance(dst, np.ndarray):
            dst[...] = src
        else:
            dst.copy_(src)
    return call.out[0], call.out[1], kept_idx


def _prune_reference(call: PruneCall):
    return _prune_reference_rows(call) + (A.as_kind(call.kept_lens, call.k),)


def _prune_reference_rows(call: PruneCall):
    idx = ref.prune_indices(A.to_numpy(call.scores, np.float32), call.host_lens, call.kept_lens,
                            call.num_sink, call.num_recent)
    kept_idx = A.as_kind(idx, call.k)
    if isinstance(call.k, np.ndarray):
        if not call.inplace:
            return _into_out(call, ref.gather_kept(call.k, idx), ref.gather_kept(call.v, idx), kept_idx)
        for x in (call.k, call.v):
            x[:, :, :call.kmax] = ref.gather_kept(x, idx)   # gather_kept copies first: safe in place
        return call.k[:, :, :call.kmax], call.v[:, :, :call.kmax], kept_idx
    torch = A.torch_module()
    outs = []
    for x in (call.k, call.v):
        g = torch.zeros((x.shape[0], x.shape[1], call.kmax, x.shape[3]), dtype=x.dtype, device=x.device)
        for b in range(idx.shape[0]):
            n = int(call.kept_lens[b])
            g[b, :, :n] = torch.gather(x[b], 1, torch.from_numpy(idx[b, :, :n]).to(x.device)[:, :, None].expand(
                -1, -1, x.shape[3]))
        if call.inplace:
            x[:, :, :call.kmax] = g
            g = x[:, :, :call.kmax]
        outs.append(g)
    return _into_out(call, outs[0], outs[1], kept_idx)


_COLSUM.register(Backend("reference", _host_only, _colsum_reference))
_VNORM.register(Backend("reference", _host_only, _vnorm_reference))
_PRUNE.register(Backend("reference", _host_only, _prune_reference))


# ------------------------------------------------------------- CPU backend

_cpu_why_not = cpu_reason


def _strided_ok(x) -> bool:
    """Element strides the C++ kernels can take as they are (numpy strides may be negative or not
    a multiple of the item size)."""
    if isinstance(x, np.ndarray):
        return not any(s < 0 or s % x.itemsize for s in x.strides)
    return True


def _kernel_view(x):
    return x if _strided_ok(x) else A.contiguous(x)


def _code(x) -> int:
    return A.DTYPE_CODE[A.dtype_name(x)]


def _colsum_cpu(call: ColsumCall):
    q = _kernel_view(call.q)
    k = call.k if (_strided_ok(call.k) and A.rows_contiguous(call.k)) else A.contiguous(call.k)
    B, Hq, Tq, D = (int(s) for s in q.shape)
    H_kv, T = int(k.shape[1]), int(k.shape[2])
    out = A.empty_like_kind((B, H_kv, T), "float32", call.q)
    lens = call.host_lens
    _ext.C.vatp_colsum_cpu(A.data_ptr(q), _code(q), B, Hq, Tq, D, list(A.elem_strides(q)), A.data_ptr(k), _code(k),
                           H_kv, T, list(A.elem_strides(k)), lens.ctypes.data, call.causal, call.scale,
                           A.data_ptr(out))
    return out


def _vnorm_cpu(call: VnormCall):
    v = _kernel_view(call.v)
    B, H, T, D = (int(s) for s in v.shape)
    out = A.empty_like_kind((B, H, T), "float32", call.v)
    _ext.C.vatp_value_l1_cpu(A.data_ptr(v), _code(v), B, H, T, D, list(A.elem_strides(v)), A.data_ptr(out))
    return out


def _prune_cpu_why_not(call: PruneCall) -> Optional[str]:
    reason = _cpu_why_not(call)
    if reason is None and call.inplace and not (_strided_ok(call.k) and _strided_ok(call.v)):
        return "in place needs non-negative strides that are whole elements"
    if reason is None and call.out is not None and not all(_strided_ok(x) for x in call.out):
        return "out= needs non-negative strides that are whole elements"
    return reason


def _prune_cpu(call: PruneCall):
    k = call.k if call.inplace else _kernel_view(call.k)
    v = call.v if call.inplace else _kernel_view(call.v)
    scores = _kernel_view(call.scores)
    B, H, T, Dk = (int(s) for s in k.shape)
    Dv = int(v.shape[3])
    kmax = call.kmax
    idx = A.empty_like_kind((B, H, kmax), "int64", call.k)
    if call.inplace:
        k_out = v_out = None
    elif call.out is not None:
        k_out, v_out = call.out
    else:
        k_out = A.empty_like_kind((B, H, kmax, Dk), A.dtype_name(k), call.k)
        v_out = A.empty_like_kind((B, H, kmax, Dv), A.dtype_name(v), call.k)

    def ptr_strides(x):
        return (0, [0, 0, 0, 0]) if x is None else (A.data_ptr(x), list(A.elem_strides(x)))

    (ko, kos), (vo, vos) = ptr_strides(k_out), ptr_strides(v_out)
    _ext.C.vatp_prune_cpu(A.data_ptr(k), _code(k), Dk, list(A.elem_strides(k)), A.data_ptr(v), _code(v), Dv,
                          list(A.elem_strides(v)), ko, kos, vo, vos, B, H, T, A.data_ptr(scores), _code(scores),
                          list(A.elem_strides(scores)), call.host_lens.ctypes.data, call.kept_lens.ctypes.data,
                          call.num_sink, call.num_recent, kmax, A.data_ptr(idx), call.inplace,
                          call.out is None and not call.inplace)
    kept_lens = A.as_kind(call.kept_lens, call.k)
    if call.inplace:
        return k[:, :, :kmax], v[:, :, :kmax], idx, kept_lens
    return k_out, v_out, idx, kept_lens


_COLSUM.register(Backend("cpu", _cpu_why_not, _colsum_cpu))
_VNORM.register(Backend("cpu", _cpu_why_not, _vnorm_cpu))
_PRUNE.register(Backend("cpu", _prune_cpu_why_not, _prune_cpu))


# --------------------------------------------------------------------- API

def attention_colsum_impl(q, k, *, causal=True, seq_lens=None, scale=None, backend="auto"):
    call = _prepare_colsum(q, k, causal, seq_lens, scale)
    return A.from_native(_COLSUM.pick(backend, call).run(call), call.origin)


def value_l1_impl(v, *, backend="auto"):
    call = _prepare_vnorm(v)
    return A.from_native(_VNORM.pick(backend, call).run(call), call.origin)


def vatp_prune_impl(k, v, scores, *, budget, num_sink=4, num_recent=32, seq_lens=None, inplace=False, out=None,
                    backend="auto"):
    call = _prepare_prune(k, v, scores, budget, num_sink, num_recent, seq_lens, inplace, out)
    return tuple(A.from_native(x, call.origin) for x in _PRUNE.pick(backend, call).run(call))


def _compiling(x) -> bool:
    torch = A.torch_module() if A.is_torch(x) else None
    return torch is not None and torch.compiler.is_compiling()


def attention_colsum(q, k, *, causal: bool = True, seq_lens=None, scale: Optional[float] = None,
                     backend: str = "auto"):
    """Accumulated softmax attention each key receives, summed over query rows
    and over the query heads of its GQA group.

    out[b, h, j] = sum over query heads hq of group h, over query rows i, of
    softmax_j(scale * q[b, hq, i] . k[b, h, :])  -- float32, computed flash-style
    (two passes over the keys), never materialising the Tq x T matrix.

    Args:
        q: [B, Hq, Tq, D]; Hq a multiple of H_kv (query head hq reads KV head hq // (Hq // H_kv)).
        k: [B, H_kv, T, D].
        causal: query row i sits at position T - Tq + i and sees keys 0 .. T - Tq + i;
            rows at positions >= seq_lens[b] are padding and add nothing.
            Non-causal: every query row sees every valid key.
        seq_lens: int [B] valid keys per sequence (default T); keys at or past it get 0.
            On a GPU it is not read on the host (CUDA-graph safe; outside [0, T] it is clamped).
        scale: logit scale, default 1 / sqrt(D).
        backend: "auto", "cpu", "cuda", "triton" or "reference".

    Returns:
        float32 [B, H_kv, T]. A query row that sees no key adds nothing (no NaN).
        Non-finite logits follow float64 NumPy's exp(s - max) / sum over the keys a
        row sees: a row whose largest visible logit is NaN, +inf, or -inf (all -inf)
        puts NaN on every key it sees; otherwise -inf logits get 0
        (docs/contracts.md, section 3). Same array kind and device as q.

    Example:
        >>> import numpy as np, vkern
        >>> q = np.zeros((1, 1, 2, 4), np.float32); k = np.zeros((1, 1, 2, 4), np.float32)
        >>> vkern.vatp.attention_colsum(q, k).tolist()   # row 0 sees key 0; row 1 splits 1/2, 1/2
        [[[1.5, 0.5]]]
    """
    if _compiling(q):
        from .._torch import vatp as T_ops

        return T_ops.attention_colsum_op(q, k, seq_lens, bool(causal), scale, backend)
    return attention_colsum_impl(q, k, causal=causal, seq_lens=seq_lens, scale=scale, backend=backend)


def value_l1(v, *, backend: str = "auto"):
    """L1 norm of every value vector: v [B, H_kv, T, D] -> float32 [B, H_kv, T].

    Example:
        >>> import numpy as np, vkern
        >>> vkern.vatp.value_l1(np.array([[[[1.0, -2.0]]]], np.float32)).tolist()
        [[[3.0]]]
    """
    if _compiling(v):
        from .._torch import vatp as T_ops

        return T_ops.value_l1_op(v, backend)
    return value_l1_impl(v, backend=backend)


def vatp_prune(k, v, scores, *, budget: Union[int, float], num_sink: int = 4, num_recent: int = 32,
               seq_lens=None, inplace: bool = False, out=None, backend: str = "auto"):
    """Keep the most important tokens of a KV cache per (batch, KV head) and compact K and V.

    Per (b, h): exactly n_b tokens are kept, n_b = the budget resolved for
    sequence b (an int budget: min(budget, seq_len); a float: floor(budget *
    seq_len), at least the protected count, at most seq_len). The first
    ``num_sink`` and last ``num_recent`` valid tokens are always kept; the rest
    go to the highest ``scores`` (NaN lowest, ties to the lower index).
    Kept tokens stay in positional order.

    Args:
        k, v: [B, H_kv, T, D] caches (float32/float16/bfloat16; v's D may differ from k's).
        scores: [B, H_kv, T] importance (any float dtype; compared as float32),
            usually attention_colsum(q, k) * value_l1(v).
        budget: int tokens (>= num_sink + num_recent) or float fraction of seq_len in (0, 1].
        seq_lens: int [B] valid tokens per sequence (default T).
        inplace: compact k and v inside their own buffers (kept rows move forward,
            in order) and return views of them; rows past a sequence's kept_lens
            up to Kmax are zeroed, as in the out-of-place result.
        out: optional pair (k_out, v_out) of caller-provided buffers [B, H_kv, >= Kmax, D]
            with the dtypes of k and v (e.g. a preallocated pool, reused across calls);
            the result is written to their first Kmax rows and k_kept / v_kept are
            views of them. Not with inplace=True; must not overlap k, v, scores or
            each other.

    Returns:
        (k_kept [B, H_kv, Kmax, D], v_kept [B, H_kv, Kmax, D], kept_idx int64
        [B, H_kv, Kmax] ascending, padded with -1, kept_lens int64 [B]),
        Kmax = max kept_lens. Padded K/V rows are zero.

    CUDA graphs: with CUDA tensors and ``seq_lens`` on the GPU (or None) the cuda and
    triton paths do no host synchronisation (kept_lens is resolved on the device and
    returned there), so the call can be captured in a ``torch.cuda.CUDAGraph``. Host
    values are then budget, num_sink, num_recent, inplace, the shapes and the out=
    buffers; Kmax is the budget at seq_len = T, and lengths outside [0, T] are not
    reported but clamped into it on the device (docs/ops/vatp.md, "CUDA graphs").

    Example:
        >>> import numpy as np, vkern
        >>> k = np.arange(6, dtype=np.float32).reshape(1, 1, 6, 1); s = np.array([[[0, 5, 1, 9, 2, 0]]], np.float32)
        >>> vkern.vatp_prune(k, k, s, budget=3, num_sink=1, num_recent=1)[2].tolist()
        [[[0, 3, 5]]]
    """
    if _compiling(k):
        from .._torch import vatp as T_ops

        return T_ops.call_vatp_prune(k, v, scores, budget, num_sink, num_recent, seq_lens, inplace, backend, out)
    return vatp_prune_impl(k, v, scores, budget=budget, num_sink=num_sink, num_recent=num_recent,
                           seq_lens=seq_lens, inplace=inplace, out=out, backend=backend)


# ----------------------------------------------------- Triton and CUDA

_triton_why_not = triton_reason


def _gpu_lens(call):
    """int64 [B] lengths on the data's own device (cuda:1, ..., not the current one that call.device
    "cuda" names), made there from seq_lens (or T): no host round trip, so CUDA-graph safe. Lengths
    that were not range-checked on the host (seq_lens on a GPU) are clamped to [0, T]."""
    torch = A.torch_module()
    x = _tensor_of(call)
    T = int(call.k.shape[2])
    if call.seq_lens is None:
        return torch.full((int(x.shape[0]),), T, dtype=torch.int64, device=x.device)
    lens = call.seq_lens.to(device=x.device, dtype=torch.int64)
    if call.host_lens is None:
        lens = lens.clamp(0, T)
    return lens.contiguous()


def _device_kept(budget, lens, T: int, num_sink: int, num_recent: int):
    """ref.resolve_budget(budget, L, num_sink, num_recent) for every length L <= T, computed where lens
    lives (the same float64 steps: floor(budget * L), raised to the protected count, capped at L)."""
    torch = A.torch_module()
    if isinstance(budget, float):
        n = torch.floor(lens.to(torch.float64) * budget).to(torch.int64)
        n = torch.maximum(n, lens.clamp(max=min(num_sink + num_recent, T)))
    else:
        n = torch.full_like(lens, min(int(budget), T))
    return torch.minimum(n, lens)


def _tensor_of(call):
    return call.q if isinstance(call, ColsumCall) else call.k


def _same_dtype(a, b):
    torch = A.torch_module()
    dt = torch.promote_types(a.dtype, b.dtype)
    return a.to(dt).contiguous(), b.to(dt).contiguous()


def _colsum_triton(call: ColsumCall):
    q, k = _same_dtype(call.q, call.k)
    return _ext.triton_kernels("vatp").attention_colsum(q, k, _gpu_lens(call), call.causal, call.scale)


def _vnorm_triton(call: VnormCall):
    return _ext.triton_kernels("vatp").value_l1(call.v.contiguous())


def _prune_gpu_why_not(call: PruneCall, base) -> Optional[str]:
    reason = base(call)
    if reason is None and call.inplace and not (call.k.is_contiguous() and call.v.is_contiguous()):
        return "in place needs contiguous k and v"
    return reason


def _prune_gpu_inputs(call: PruneCall):
    torch = A.torch_module()
    k = call.k if call.inplace else call.k.contiguous()
    v = call.v if call.inplace else call.v.contiguous()
    scores = call.scores.to(torch.float32).contiguous()
    lens = _gpu_lens(call)
    return k, v, scores, lens, _device_kept(call.budget, lens, int(call.k.shape[2]), call.num_sink, call.num_recent)


def _direct_out(call: PruneCall):
    """The out= buffers when a GPU kernel can write them as they are (contiguous [B, H, kmax, D]), else None."""
    if call.out is not None and all(x.is_contiguous() for x in call.out):
        return call.out
    return None


def _prune_triton(call: PruneCall):
    k, v, scores, lens, kept = _prune_gpu_inputs(call)
    direct = _direct_out(call)
    res = _ext.triton_kernels("vatp").prune(k, v, scores, lens, kept, call.num_sink, call.num_recent, call.kmax,
                                            call.inplace, out_bufs=direct)
    return (res if direct is not None else _into_out(call, *res)) + (kept,)


_COLSUM.register(Backend("triton", _triton_why_not, _colsum_triton))
_VNORM.register(Backend("triton", _triton_why_not, _vnorm_triton))
_PRUNE.register(Backend("triton", lambda c: _prune_gpu_why_not(c, _triton_why_not), _prune_triton))


_cuda_why_not = cuda_reason


def _stream(x):
    torch = A.torch_module()
    return torch.cuda.current_stream(x.device).cuda_stream


def _colsum_cuda(call: ColsumCall):
    torch = A.torch_module()
    q, k = _same_dtype(call.q, call.k)
    B, Hq, Tq, D = (int(s) for s in q.shape)
    H, T = int(k.shape[1]), int(k.shape[2])
    out = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    stats = torch.empty((B, Hq, max(Tq, 1), 2), dtype=torch.float32, device=q.device)
    lens = _gpu_lens(call)
    with torch.cuda.device(q.device):
        _ext.C.vatp_colsum_cuda(q.data_ptr(), k.data_ptr(), _code(q), B, Hq, Tq, D, H, T, lens.data_ptr(),
                                call.causal, call.scale, stats.data_ptr(), out.data_ptr(), _stream(q))
    return out


def _vnorm_cuda(call: VnormCall):
    torch = A.torch_module()
    v = call.v.contiguous()
    B, H, T, D = (int(s) for s in v.shape)
    out = torch.empty((B, H, T), dtype=torch.float32, device=v.device)
    with torch.cuda.device(v.device):
        _ext.C.vatp_value_l1_cuda(v.data_ptr(), _code(v), B * H * T, D, out.data_ptr(), _stream(v))
    return out


def _prune_cuda(call: PruneCall):
    torch = A.torch_module()
    k, v, scores, lens, kept = _prune_gpu_inputs(call)
    B, H, T, Dk = (int(s) for s in k.shape)
    Dv = int(v.shape[3])
    kmax = call.kmax
    idx = torch.empty((B, H, kmax), dtype=torch.int64, device=k.device)
    direct = _direct_out(call)
    if call.inplace:
        k_out, v_out = k, v
    elif direct is not None:
        k_out, v_out = direct
    else:
        k_out = torch.empty((B, H, kmax, Dk), dtype=k.dtype, device=k.device)
        v_out = torch.empty((B, H, kmax, Dv), dtype=v.dtype, device=v.device)
    with torch.cuda.device(k.device):
        _ext.C.vatp_prune_cuda(k.data_ptr(), v.data_ptr(), Dk * k.element_size(), Dv * v.element_size(),
                               0 if call.inplace else k_out.data_ptr(), 0 if call.inplace else v_out.data_ptr(),
                               B, H, T, scores.data_ptr(), lens.data_ptr(), kept.data_ptr(), call.num_sink,
                               call.num_recent, kmax, idx.data_ptr(), call.inplace, _stream(k))
    if call.inplace:
        return k[:, :, :kmax], v[:, :, :kmax], idx, kept
    if direct is not None:
        return k_out, v_out, idx, kept
    return _into_out(call, k_out, v_out, idx) + (kept,)


_COLSUM.register(Backend("cuda", _cuda_why_not, _colsum_cuda))
_VNORM.register(Backend("cuda", _cuda_why_not, _vnorm_cuda))
_PRUNE.register(Backend("cuda", lambda c: _prune_gpu_why_not(c, _cuda_why_not), _prune_cuda))
