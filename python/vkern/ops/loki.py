"""vkern.loki_attention, vkern.decode_attention and vkern.loki.rotate (SPEC §2).

The wrappers validate every input before any kernel runs, resolve the
per-sequence budgets, pick a backend and hand results back as the caller's
array kind (out in q's dtype, indices int64).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, List, Optional

import numpy as np

from .. import _arrays as A
from .. import _ext
from .._backend import Backend, cpu_reason, cuda_reason, host_reason, op, triton_reason
from ..reference import loki as ref

_LOKI = op("loki_attention")
_DENSE = op("decode_attention")
_ROTATE = op("loki_rotate")

GQA_MODES = ("per_head", "shared")


@dataclass
class AttnCall:
    q: Any                      # native [B, Hq, D]
    k: Any                      # native [B, H_kv, T, D]
    v: Any                      # native [B, H_kv, T, D]
    seq_lens: Any               # native int [B] or None
    host_lens: Optional[np.ndarray]  # int64 [B], each in [1, T]; None when seq_lens lives on a GPU (never read)
    scale: float
    device: str
    lib: str
    origin: str
    # loki only (dense decode: rank = D, every token kept)
    rank: int = 0
    topk: Any = None            # int or float, as given
    budgets: Optional[np.ndarray] = None   # int64 [B]: tokens kept per sequence (None: resolved on the device)
    K: int = 0                  # largest budget (width of the index output)
    num_sink: int = 0
    num_recent: int = 0
    gqa: str = "per_head"
    return_indices: bool = False
    kp: Any = None              # native [B, H_kv, T, >= rank] key prefix, or None (read k's rows)

    @property
    def dims(self):
        B, Hq, D = (int(s) for s in self.q.shape)
        return B, Hq, int(self.k.shape[1]), int(self.k.shape[2]), D

    def __repr__(self) -> str:
        B, Hq, H_kv, T, D = self.dims
        extra = (f", rank={self.rank}, topk={self.topk}, gqa={self.gqa}, sinks={self.num_sink}, "
                 f"recent={self.num_recent}" if self.rank else "")
        return (f"q [{B}, {Hq}, {D}] {A.dtype_name(self.q)}, cache [{B}, {H_kv}, {T}, {D}] "
                f"{A.dtype_name(self.k)}{extra}, {self.lib} on {self.device}")


# ----------------------------------------------------------------- validation

def _check_float(x: Any, name: str) -> None:
    if not A.is_float(x):
        raise A.float_dtype_error(name, x)


F32_MAX = float(np.finfo(np.float32).max)


def _int_arg(x: Any, name: str, lo: int, hi: Optional[int] = None, what: str = "") -> int:
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)):
        raise TypeError(f"{name}: expected an int, got {type(x).__name__}")
    x = int(x)
    if x < lo or (hi is not None and x > hi) or x >= 2**63:
        rng = f"in [{lo}, 2**63)" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{name}: expected {rng}{what}, got {x}")
    return x


def device_lens(x: Any) -> bool:
    """Whether seq_lens lives on a GPU. Its values are then never read on the host (no sync: a decode
    step can be captured in a CUDA graph); budgets are resolved on the device."""
    return x is not None and not isinstance(x, np.ndarray) and x.device.type != "cpu"


def budget_fits_every_length(topk, T: int, forced: int) -> bool:
    """resolve_budget(topk, L) >= min(L, forced) for every L in [1, T], from two lengths: for L below
    `forced` the slack budget(L) - L never grows with L (budgets grow by at most 1 per token), and from
    `forced` on budget(L) never shrinks, so the worst cases are L = forced - 1 and L = forced."""
    return all(ref.resolve_budget(topk, L) >= min(L, forced) for L in {min(T, forced - 1), min(T, forced)} if L >= 1)


def _host_ints(x: Any) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x.astype(np.int64, copy=False)
    return x.detach().to("cpu").numpy().astype(np.int64, copy=False)


def _prepare_attn(q, k_cache, v_cache, seq_lens, scale) -> AttnCall:
    qn, origin = A.to_native(q, "q")
    kn, _ = A.to_native(k_cache, "k_cache")
    vn, _ = A.to_native(v_cache, "v_cache")
    _check_float(qn, "q")
    _check_float(kn, "k_cache")
    _check_float(vn, "v_cache")
    if qn.ndim != 3:
        raise ValueError(f"q: expected shape [B, Hq, D], got {tuple(qn.shape)}")
    if kn.ndim != 4:
        raise ValueError(f"k_cache: expected shape [B, H_kv, T, D], got {tuple(kn.shape)}")
    if tuple(vn.shape) != tuple(kn.shape):
        raise ValueError(f"v_cache: expected the shape of k_cache {tuple(kn.shape)}, got {tuple(vn.shape)}")
    if A.dtype_name(vn) != A.dtype_name(kn):
        raise TypeError(f"v_cache: expected the dtype of k_cache ({A.dtype_name(kn)}), got {A.dtype_name(vn)}")
    B, Hq, D = (int(s) for s in qn.shape)
    Bk, H_kv, T, Dk = (int(s) for s in kn.shape)
    if Bk != B:
        raise ValueError(f"k_cache: expected batch B={B} (from q), got {Bk}")
    if Dk != D:
        raise ValueError(f"k_cache: expected head dim D={D} (from q), got {Dk}")
    if D < 1 or H_kv < 1 or Hq < 1:
        raise ValueError(f"q/k_cache: need D >= 1, Hq >= 1 and H_kv >= 1, got D={D}, Hq={Hq}, H_kv={H_kv}")
    if Hq % H_kv:
        raise ValueError(f"q: the number of query heads Hq={Hq} must be a multiple of H_kv={H_kv} "
                         f"(k_cache.shape[1])")
    if T < 1:
        raise ValueError(f"k_cache: expected T >= 1 cached positions, got T={T}")
    arrays = {"q": qn, "k_cache": kn, "v_cache": vn}
    lens = None
    if seq_lens is not None:
        lens, _ = A.to_native(seq_lens, "seq_lens")
        if not A.is_integer(lens):
            raise TypeError(f"seq_lens: expected an integer array, got {A.dtype_name(lens)}")
        if lens.ndim != 1 or int(lens.shape[0]) != B:
            raise ValueError(f"seq_lens: expected shape ({B},) (one per sequence), got {tuple(lens.shape)}")
        arrays["seq_lens"] = lens
    lib = A.same_place(arrays)
    if device_lens(lens):
        host = None   # not range-checked on the host (a sync); the GPU paths clamp it to [1, T]
    else:
        host = _host_ints(lens) if lens is not None else np.full(B, T, dtype=np.int64)
    if host is not None and B and (np.any(host < 1) or np.any(host > T)):
        raise ValueError(f"seq_lens: every length must be in [1, T={T}], got min={int(host.min())}, "
                         f"max={int(host.max())}")
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    else:
        if isinstance(scale, bool) or not isinstance(scale, (int, float, np.integer, np.floating)):
            raise TypeError(f"scale: expected a float or None, got {type(scale).__name__}")
        scale = float(scale)
        if not (math.isfinite(scale) and 0 < scale <= F32_MAX):
            raise ValueError(f"scale: expected a float in (0, {F32_MAX:.6g}] (finite in float32), got {scale}")
    return AttnCall(qn, kn, vn, lens, None if host is None else np.ascontiguousarray(host), scale, A.device_of(qn),
                    lib, origin)


def _prepare_loki(q, k_cache, v_cache, seq_lens, rank, topk, num_sink, num_recent, gqa, scale,
                  return_indices, k_prefix=None) -> AttnCall:
    call = _prepare_attn(q, k_cache, v_cache, seq_lens, scale)
    B, _, H_kv, T, D = call.dims
    call.rank = _int_arg(rank, "rank", 1, D, f" (1 <= rank <= D={D})")
    if k_prefix is not None:
        kp, _ = A.to_native(k_prefix, "k_prefix")
        _check_float(kp, "k_prefix")
        if kp.ndim != 4 or tuple(int(s) for s in kp.shape[:3]) != (B, H_kv, T) or int(kp.shape[3]) < call.rank:
            raise ValueError(f"k_prefix: expected shape [B, H_kv, T, >= rank] = [{B}, {H_kv}, {T}, >= {call.rank}], "
                             f"got {tuple(kp.shape)}")
        if A.dtype_name(kp) != A.dtype_name(call.k):
            raise TypeError(f"k_prefix: expected the dtype of k_cache ({A.dtype_name(call.k)}), "
                            f"got {A.dtype_name(kp)}")
        A.same_place({"q": call.q, "k_prefix": kp})
        call.kp = kp
    if isinstance(topk, bool) or not isinstance(topk, (int, np.integer, float, np.floating)):
        raise TypeError(f"topk: expected an int (tokens) or a float (fraction of seq_len), got {type(topk).__name__}")
    if isinstance(topk, (float, np.floating)):
        if not (0.0 < float(topk) <= 1.0):
            raise ValueError(f"topk: a fraction of seq_len must be in (0, 1], got {float(topk)}")
        topk = float(topk)
    else:
        topk = _int_arg(topk, "topk", 1)
    call.topk = topk
    call.num_sink = _int_arg(num_sink, "num_sink", 0)
    call.num_recent = _int_arg(num_recent, "num_recent", 0)
    if gqa not in GQA_MODES:
        raise ValueError(f"gqa: expected one of {GQA_MODES}, got {gqa!r}")
    call.gqa = gqa
    call.return_indices = bool(return_indices)
    if call.host_lens is None:
        # seq_lens on a GPU: the output width and the checks use host-known arguments only
        forced = call.num_sink + call.num_recent
        if not budget_fits_every_length(topk, T, forced):
            raise ValueError(f"topk: the budget {topk!r} is smaller than num_sink + num_recent = {call.num_sink} + "
                             f"{call.num_recent} for some seq_len in [1, T={T}]; with seq_lens on the GPU (not read "
                             f"on the host) the budget must hold the sinks and recent tokens at every length")
        call.budgets = None
        call.K = ref.resolve_budget(topk, T) if B else 0
        return call
    budgets = np.array([ref.resolve_budget(topk, int(L)) for L in call.host_lens], dtype=np.int64)
    forced = np.minimum(call.host_lens, call.num_sink + call.num_recent)
    bad = np.nonzero(budgets < forced)[0]
    if len(bad):
        b = int(bad[0])
        raise ValueError(f"topk: the budget k={int(budgets[b])} of sequence {b} (seq_len={int(call.host_lens[b])}) "
                         f"is smaller than num_sink + num_recent = {call.num_sink} + {call.num_recent}; "
                         f"sinks and recent tokens must fit in the budget")
    call.budgets = budgets
    call.K = int(budgets.max()) if B else 0
    return call


# ------------------------------------------------------------------ helpers

def _result(x64: np.ndarray, like: Any):
    """float64 host result -> q's kind, device and dtype."""
    if isinstance(like, np.ndarray):
        return x64.astype(like.dtype)
    torch = A.torch_module()
    return torch.from_numpy(np.ascontiguousarray(x64, dtype=np.float32)).to(device=like.device, dtype=like.dtype)


_host_reason = host_reason


# ----------------------------------------------------------------- reference

def _loki_reference(call: AttnCall):
    kp = None if call.kp is None else A.to_numpy(call.kp)
    out, kept = ref.loki_attention(A.to_numpy(call.q), A.to_numpy(call.k), A.to_numpy(call.v), call.host_lens,
                                   call.rank, call.topk, call.num_sink, call.num_recent, call.gqa, call.scale,
                                   k_prefix=kp)
    return _result(out, call.q), A.as_kind(kept, call.q)


def _dense_reference(call: AttnCall):
    out = ref.decode_attention(A.to_numpy(call.q), A.to_numpy(call.k), A.to_numpy(call.v), call.host_lens,
                               call.scale)
    return _result(out, call.q)


_LOKI.register(Backend("reference", _host_reason, _loki_reference))
_DENSE.register(Backend("reference", _host_reason, _dense_reference))


# ----------------------------------------------------------------------- cpu

_cpu_reason = cpu_reason


def _kernel_view(a: Any):
    """a itself when the CPU kernel can read it (unit last stride, non-negative
    element strides), else one contiguous copy."""
    if isinstance(a, np.ndarray):
        if any(s < 0 or s % a.itemsize for s in a.strides) or not A.rows_contiguous(a):
            return np.ascontiguousarray(a)
        return a
    return a if A.rows_contiguous(a) else a.contiguous()


def _f32_result(out32: np.ndarray, like: Any):
    """float32 host result -> like's kind, device and dtype (no copy for float32)."""
    if isinstance(like, np.ndarray):
        return out32 if like.dtype == np.float32 else out32.astype(like.dtype)
    torch = A.torch_module()
    t = torch.from_numpy(out32)
    return t if like.dtype == torch.float32 else t.to(like.dtype)


def _cpu_attention(call: AttnCall, sparse: bool):
    B, Hq, H_kv, T, D = call.dims
    q, k, v = _kernel_view(call.q), _kernel_view(call.k), _kernel_view(call.v)
    qs, ks, vs = A.elem_strides(q), A.elem_strides(k), A.elem_strides(v)
    kp = _kernel_view(call.kp) if sparse and call.kp is not None else None
    kps = A.elem_strides(kp) if kp is not None else (0, 0, 0, 1)
    out = np.empty((B, Hq, D), np.float32)
    idx = np.empty((B, Hq, call.K), np.int64) if sparse and call.return_indices else None
    budgets = np.ascontiguousarray(call.budgets, dtype=np.int64) if sparse else None
    if B:
        _ext.C.loki_cpu(
            A.data_ptr(q), A.DTYPE_CODE[A.dtype_name(q)], B, Hq, H_kv, T, D, qs[0], qs[1], qs[2],
            A.data_ptr(k), A.data_ptr(v), A.DTYPE_CODE[A.dtype_name(k)], ks[0], ks[1], ks[2], vs[0], vs[1], vs[2],
            0 if kp is None else A.data_ptr(kp), kps[0], kps[1], kps[2], call.host_lens.ctypes.data, 0 if budgets is None else budgets.ctypes.data,
            call.rank if sparse else D, call.num_sink, call.num_recent, call.gqa == "shared", call.scale,
            out.ctypes.data, 0 if idx is None else idx.ctypes.data, call.K if idx is not None else 0)
    res = _f32_result(out, call.q)
    if not sparse:
        return res
    return res, (A.as_kind(idx, call.q) if idx is not None else None)


_LOKI.register(Backend("cpu", _cpu_reason, lambda call: _cpu_attention(call, True)))
_DENSE.register(Backend("cpu", _cpu_reason, lambda call: _cpu_attention(call, False)))


# ------------------------------------------------------------- triton / cuda

_triton_reason = triton_reason


def _cuda_reason(call) -> Optional[str]:
    reason = cuda_reason(call)
    if reason is not None:
        return reason
    if not hasattr(_ext.C, "loki_cuda"):
        return "vkern was built without the Loki CUDA kernels"
    if isinstance(call, AttnCall) and int(call.q.shape[-1]) > 256:
        return f"head dim D={int(call.q.shape[-1])} > 256 (the CUDA kernels keep D/32 values per lane)"
    return None


def _unit_last(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _device_budgets(topk, lens):
    """resolve_budget(topk, L) for every length, computed where lens lives (same float64 steps)."""
    torch = A.torch_module()
    if isinstance(topk, float):
        k = torch.ceil(lens.to(torch.float64) * topk - 1e-9).to(torch.int64)
    else:
        k = torch.full_like(lens, int(topk))
    return torch.minimum(k, lens).clamp_(min=0)


def _gpu_inputs(call: AttnCall, sparse: bool):
    """q contiguous, caches (and the key prefix of a sparse call, or None) with unit last
    stride, int64 lengths/budgets on the device. No host round trip (CUDA-graph safe): the
    lengths and budgets are made on the device from seq_lens (or T) and topk."""
    torch = A.torch_module()
    dev = call.q.device
    T = int(call.k.shape[2])
    q = call.q.contiguous()
    k, v = _unit_last(call.k), _unit_last(call.v)
    kp = _unit_last(call.kp) if sparse and call.kp is not None else None
    if call.seq_lens is not None:
        lens = call.seq_lens.to(device=dev, dtype=torch.int64)
        if call.host_lens is None:   # not range-checked on the host: never read past the cache
            lens = lens.clamp(1, T)
        lens = lens.contiguous()
    else:
        lens = torch.full((int(call.q.shape[0]),), T, dtype=torch.int64, device=dev)
    budgets = _device_budgets(call.topk, lens) if sparse else None
    return q, k, v, lens, budgets, kp


def _expand_idx(call: AttnCall, idx32):
    """Kernel lists [B, NL, K] int32 -> [B, Hq, K] int64."""
    Hq, H_kv = call.dims[1], call.dims[2]
    idx = idx32.to(A.torch_module().int64)
    return idx.repeat_interleave(Hq // H_kv, dim=1) if call.gqa == "shared" else idx


def _triton_loki(call: AttnCall):
    kernels = _ext.triton_kernels("loki")
    q, k, v, lens, budgets, kp = _gpu_inputs(call, True)
    out, idx = kernels.loki_attention(q, k, v, lens, budgets, call.K, call.rank, call.num_sink, call.num_recent,
                                      call.gqa == "shared", call.scale, kp=kp)
    return out.to(call.q.dtype), (_expand_idx(call, idx) if call.return_indices else None)


def _triton_dense(call: AttnCall):
    kernels = _ext.triton_kernels("loki")
    q, k, v, lens, _, _ = _gpu_inputs(call, False)
    return kernels.decode_attention(q, k, v, lens, call.scale).to(call.q.dtype)


def _cuda_attention(call: AttnCall, sparse: bool):
    torch = A.torch_module()
    q, k, v, lens, budgets, kp = _gpu_inputs(call, sparse)
    q = q.float().contiguous()  # [B, Hq, D]: tiny; the kernels read float32 queries
    B, Hq, H_kv, T, D = call.dims
    shared = sparse and call.gqa == "shared"
    NL = H_kv if shared else Hq
    K = call.K if sparse else T
    out = torch.empty((B, Hq, D), dtype=torch.float32, device=q.device)
    idx = torch.empty((B, NL, K), dtype=torch.int32, device=q.device) if sparse else None
    scores = torch.empty((B, NL, T), dtype=torch.float32, device=q.device) if sparse else None
    nsplit = _ext.C.loki_cuda_splits(B, Hq, K)
    ws = torch.empty((B * Hq * nsplit * (D + 2),), dtype=torch.float32, device=q.device)
    count = torch.zeros((B * Hq,), dtype=torch.int32, device=q.device)
    ks, vs = k.stride(), v.stride()
    kps = kp.stride() if kp is not None else (0, 0, 0, 1)
    with torch.cuda.device(q.device):
        stream = torch.cuda.current_stream().cuda_stream
        _ext.C.loki_cuda(q.data_ptr(), 0, B, Hq, H_kv, T, D,
                         k.data_ptr(), v.data_ptr(), A.DTYPE_CODE[A.dtype_name(k)], ks[0], ks[1], ks[2],
                         vs[0], vs[1], vs[2], 0 if kp is None else kp.data_ptr(), kps[0], kps[1], kps[2],
                         lens.data_ptr(), 0 if budgets is None else budgets.data_ptr(),
                         call.rank if sparse else D, call.num_sink, call.num_recent, shared, call.scale,
                         0 if scores is None else scores.data_ptr(), 0 if idx is None else idx.data_ptr(), K,
                         nsplit, ws.data_ptr(), count.data_ptr(), out.data_ptr(), stream)
    res = out.to(call.q.dtype)
    if not sparse:
        return res
    return res, (_expand_idx(call, idx) if call.return_indices else None)


_LOKI.register(Backend("triton", _triton_reason, _triton_loki))
_DENSE.register(Backend("triton", _triton_reason, _triton_dense))
_LOKI.register(Backend("cuda", _cuda_reason, lambda call: _cuda_attention(call, True)))
_DENSE.register(Backend("cuda", _cuda_reason, lambda call: _cuda_attention(call, False)))


# ------------------------------------------------------------------- rotate

@dataclass
class RotateCall:
    x: Any                      # native [..., H, D]
    P: Any                      # native [H_kv, D, D] (float64 from pca_basis, or any float)
    device: str
    lib: str
    origin: str

    def __repr__(self) -> str:
        return (f"x {tuple(self.x.shape)} {A.dtype_name(self.x)}, P {tuple(self.P.shape)}, "
                f"{self.lib} on {self.device}")


def _prepare_rotate(x, P) -> RotateCall:
    xn, origin = A.to_native(x, "x")
    Pn, _ = A.to_native(P, "basis.P")
    _check_float(xn, "x")
    if A.dtype_name(Pn) not in ("float64", "float32", "float16", "bfloat16"):
        raise TypeError(f"basis.P: expected a float array, got {A.dtype_name(Pn)}")
    if Pn.ndim != 3 or int(Pn.shape[1]) != int(Pn.shape[2]):
        raise ValueError(f"basis.P: expected shape [H_kv, D, D], got {tuple(Pn.shape)}")
    H_kv, D = int(Pn.shape[0]), int(Pn.shape[1])
    if xn.ndim < 2:
        raise ValueError(f"x: expected shape [..., H, D], got {tuple(xn.shape)}")
    H, Dx = int(xn.shape[-2]), int(xn.shape[-1])
    if Dx != D:
        raise ValueError(f"x: expected last dim D={D} (from basis.P), got {Dx}")
    if H < 1 or H % H_kv:
        raise ValueError(f"x: the head axis H={H} (x.shape[-2]) must be a positive multiple of H_kv={H_kv}")
    libs = {"numpy" if isinstance(a, np.ndarray) else "torch" for a in (xn, Pn)}
    if len(libs) > 1:
        raise TypeError("x/basis.P: mixed array kinds; pass both as NumPy arrays or both as torch tensors")
    if A.device_of(xn) != A.device_of(Pn):
        raise ValueError(f"mixed devices: x on {A.device_of(xn)}, basis.P on {A.device_of(Pn)}")
    return RotateCall(xn, Pn, A.device_of(xn), "numpy" if isinstance(xn, np.ndarray) else "torch", origin)


def _rotate_reference(call: RotateCall):
    P = A.to_numpy(call.P) if not isinstance(call.P, np.ndarray) else call.P
    return _result(ref.rotate(A.to_numpy(call.x), np.asarray(P, np.float64)), call.x)


_ROTATE.register(Backend("reference", _host_reason, _rotate_reference))


def _rows_view(x: Any):
    """(x, rows, row_stride, head_stride): x [..., H, D] seen as rows of [H, D], without a
    copy where the leading dims collapse into one stride; else one contiguous copy."""
    x = _kernel_view(x)
    shape, st = [int(s) for s in x.shape], A.elem_strides(x)
    lead = [(n, s) for n, s in zip(shape[:-2], st[:-2]) if n != 1]
    rows = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
    if any(lead[i][1] != lead[i + 1][1] * lead[i + 1][0] for i in range(len(lead) - 1)):
        x = A.contiguous(x)
        st = A.elem_strides(x)
        return x, rows, (st[-3] if len(shape) > 2 else 0), st[-2]
    return x, rows, (lead[-1][1] if lead else 0), st[-2]


def _rotate_cpu(call: RotateCall):
    x, rows, sr, sh = _rows_view(call.x)
    H, D = int(x.shape[-2]), int(x.shape[-1])
    P = call.P
    P32 = np.ascontiguousarray(P if isinstance(P, np.ndarray) else A.to_numpy(P), dtype=np.float32)
    out = np.empty(tuple(int(s) for s in x.shape), np.float32)
    _ext.C.loki_rotate_cpu(A.data_ptr(x), A.DTYPE_CODE[A.dtype_name(x)], rows, H, D, sr, sh, P32.ctypes.data,
                           int(P32.shape[0]), out.ctypes.data)
    return _f32_result(out, call.x)


_ROTATE.register(Backend("cpu", _cpu_reason, _rotate_cpu))


def _rotate_gpu_inputs(call: RotateCall):
    torch = A.torch_module()
    x, rows, sr, sh = _rows_view(call.x)
    P = call.P.to(device=x.device, dtype=torch.float32).contiguous()
    return x, rows, sr, sh, P


def _rotate_triton(call: RotateCall):
    x, rows, sr, sh, P = _rotate_gpu_inputs(call)
    out = _ext.triton_kernels("loki").rotate(x, P, sr, sh, rows)
    return out.reshape(tuple(call.x.shape)).to(call.x.dtype)


def _rotate_cuda(call: RotateCall):
    torch = A.torch_module()
    x, rows, sr, sh, P = _rotate_gpu_inputs(call)
    H, D = int(x.shape[-2]), int(x.shape[-1])
    out = torch.empty(tuple(x.shape), dtype=torch.float32, device=x.device)
    with torch.cuda.device(x.device):
        _ext.C.loki_rotate_cuda(x.data_ptr(), A.DTYPE_CODE[A.dtype_name(x)], rows, H, D, sr, sh, P.data_ptr(),
                                int(P.shape[0]), out.data_ptr(), torch.cuda.current_stream().cuda_stream)
    return out.to(call.x.dtype)


_ROTATE.register(Backend("triton", _triton_reason, _rotate_triton))
_ROTATE.register(Backend("cuda", _cuda_reason, _rotate_cuda))


# --------------------------------------------------------------------- API

def loki_attention_impl(q, k_cache, v_cache, *, rank, topk, seq_lens=None, num_sink=0, num_recent=0,
                        gqa="per_head", scale=None, return_indices=False, k_prefix=None, backend="auto"):
    call = _prepare_loki(q, k_cache, v_cache, seq_lens, rank, topk, num_sink, num_recent, gqa, scale,
                         return_indices, k_prefix)
    out, idx = _LOKI.pick(backend, call).run(call)
    if call.return_indices:
        return A.from_native(out, call.origin), A.from_native(idx, call.origin)
    return A.from_native(out, call.origin)


def decode_attention_impl(q, k_cache, v_cache, *, seq_lens=None, scale=None, backend="auto"):
    call = _prepare_attn(q, k_cache, v_cache, seq_lens, scale)
    return A.from_native(_DENSE.pick(backend, call).run(call), call.origin)


def rotate_impl(x, P, *, backend="auto"):
    call = _prepare_rotate(x, P)
    return A.from_native(_ROTATE.pick(backend, call).run(call), call.origin)


def loki_attention(q, k_cache, v_cache, *, rank: int, topk, seq_lens=None, num_sink: int = 0,
                   num_recent: int = 0, gqa: str = "per_head", scale: Optional[float] = None,
                   return_indices: bool = False, k_prefix=None, backend: str = "auto"):
    """One Loki decode step: sparse attention over the tokens that low-rank keys select.

    Approximate scores q[:rank] . k[:rank] (q and the keys already rotated by
    ``vkern.loki.rotate``) pick, per sequence, ``topk`` tokens: the first
    ``num_sink`` and last ``num_recent`` valid tokens always, the rest of the
    budget by highest approximate score (ties to the lower index, NaN last).
    Exact attention (full D, float32 softmax, ``scale`` default 1/sqrt(D)) then
    runs over the kept tokens only.

    Args:
        q: [B, Hq, D] rotated queries (float32/float16/bfloat16).
        k_cache: [B, H_kv, T, D] rotated keys; v_cache: [B, H_kv, T, D] values,
            same dtype as k_cache. Hq % H_kv == 0; query head h reads KV head h // (Hq / H_kv).
        rank: dimensions used for the approximate scores, 1 <= rank <= D.
        topk: tokens kept per sequence: an int >= 1, or a float in (0, 1] taken as
            ceil(topk * seq_len). Never more than seq_len; must hold the sinks and recent tokens.
        seq_lens: int [B], valid tokens per sequence, each in [1, T] (default T).
        gqa: "per_head" (each query head selects its own tokens, as Loki) or "shared"
            (a KV group selects once from the sum of its heads' approximate scores, as SparQ,
            computed as the summed query's score (sum_h q_h)[:rank] . k[:rank] on every backend,
            which also fixes the non-finite case; docs/contracts.md, section 2).
        return_indices: also return the kept positions [B, Hq, K] (int64, ascending,
            -1 padded), K = the largest budget over the batch.
        k_prefix: optional [B, H_kv, T, R] (R >= rank, k_cache's dtype and device):
            a separate copy of the first R rotated key dimensions, e.g. written
            next to k_cache when tokens are appended (``vkern.loki.key_prefix``).
            When given, the approximate scores read it instead of k_cache, so that
            pass moves only T * rank elements per head instead of pulling whole key
            rows through the cache (costs R/D of the key cache in memory). Its first
            ``rank`` columns are taken to equal k_cache's.
        backend: "auto", "cpu", "cuda", "triton" or "reference" (VKERN_BACKEND overrides "auto").

    Returns:
        out [B, Hq, D] in q's dtype and kind (and the indices with ``return_indices``).
        With rank = D and topk >= seq_len this is dense attention.

    CUDA graphs: with ``seq_lens`` a GPU tensor the cuda and triton paths do no host
    synchronisation (budgets are resolved on the device), so a decode step can be
    captured in a ``torch.cuda.CUDAGraph`` and replayed with new lengths written into
    the same tensor. Host values are then: rank, topk, num_sink, num_recent, gqa,
    scale and the shapes. Since the lengths are not read on the host, the index width
    K is the budget at seq_len = T (extra slots -1), the budget is checked to hold the
    sinks and recent tokens at every seq_len in [1, T], and lengths outside [1, T] are
    not reported but clamped into it on the device (never read out of bounds).

    Raises:
        ValueError/TypeError naming the argument for bad shapes, dtypes, rank > D,
        Hq not a multiple of H_kv, seq_lens outside [1, T], a budget smaller than
        num_sink + num_recent, or an unknown gqa mode.

    Example:
        >>> import numpy as np, vkern
        >>> q = np.ones((1, 2, 4), np.float32)
        >>> k = np.zeros((1, 1, 3, 4), np.float32); k[0, 0, 1] = 1.0
        >>> v = np.arange(12, dtype=np.float32).reshape(1, 1, 3, 4)
        >>> out, idx = vkern.loki_attention(q, k, v, rank=2, topk=1, return_indices=True)
        >>> out[0, 0].tolist(), idx[0, 0].tolist()
        ([4.0, 5.0, 6.0, 7.0], [1])
    """
    if A.is_torch(q):
        from .._torch import loki as _torch_ops

        if A.torch_module().compiler.is_compiling():
            return _torch_ops.call_loki_attention(q, k_cache, v_cache, seq_lens, rank, topk, num_sink,
                                                  num_recent, gqa, scale, return_indices, backend, k_prefix)
    return loki_attention_impl(q, k_cache, v_cache, rank=rank, topk=topk, seq_lens=seq_lens, num_sink=num_sink,
                               num_recent=num_recent, gqa=gqa, scale=scale, return_indices=return_indices,
                               k_prefix=k_prefix, backend=backend)


def decode_attention(q, k_cache, v_cache, *, seq_lens=None, scale: Optional[float] = None,
                     backend: str = "auto"):
    """Dense decode attention: every query head over all seq_lens[b] cached tokens.

    Same layout as ``loki_attention``: q [B, Hq, D], k_cache/v_cache [B, H_kv, T, D]
    (GQA: query head h reads KV head h // (Hq / H_kv)), seq_lens int [B] in [1, T].
    Scores, softmax and accumulation in float32; ``scale`` defaults to 1/sqrt(D).
    Returns out [B, Hq, D] in q's dtype and kind. With ``seq_lens`` on the GPU no host
    synchronisation happens (CUDA-graph capturable); lengths are then clamped to [1, T]
    on the device instead of checked (see ``loki_attention``).

    Example:
        >>> import numpy as np, vkern
        >>> q = np.zeros((1, 1, 2), np.float32)
        >>> v = np.array([[[[1.0, 0.0], [3.0, 2.0]]]], np.float32)
        >>> vkern.decode_attention(q, np.zeros_like(v), v)[0, 0].tolist()
        [2.0, 1.0]
    """
    if A.is_torch(q):
        from .._torch import loki as _torch_ops

        if A.torch_module().compiler.is_compiling():
            return _torch_ops.call_decode_attention(q, k_cache, v_cache, seq_lens, scale, backend)
    return decode_attention_impl(q, k_cache, v_cache, seq_lens=seq_lens, scale=scale, backend=backend)


__all__: List[str] = ["loki_attention", "decode_attention", "rotate_impl"]
