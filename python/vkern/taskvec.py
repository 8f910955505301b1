"""vkern.taskvec: quantized task vectors (SPEC §4): TVQ / RTVQ affine codes and
BitDelta-style sign bits.

A task vector is ``tau = W_finetuned - W_base`` of one weight matrix ``[N_out, K_in]``.

Storage layout of a :class:`QTaskVector` (what the kernels read):

* ``codes``: uint8 ``[N_out, ceil(K_in * bits / 8)]``. Row n is a little-endian bit
  stream: element k's code sits in bits ``[k*bits, (k+1)*bits)`` of the row, least
  significant bit first (so 1-bit codes put element k in bit ``k % 8`` of byte
  ``k // 8``; 4-bit codes put an even k in the low nibble). 3-bit codes are dense
  (8 codes in 3 bytes). Bits past ``K_in`` in the last byte are zero.
* ``scales``: float32 ``[S, G]``; ``zero_points``: uint8 ``[S, G]`` (affine only).
  ``S`` is 1 for one scale per tensor, else ``N_out``; ``G = ceil(K_in / group_size)``
  groups along K_in (the last group may be short: any K_in works).
  ``granularity`` is "tensor" (S=1, G=1), "row" (S=N_out, G=1) or "group".
* affine: ``dequant = (code - zero_point) * scale`` in float32. ``scale`` is the
  step of the grid (TVQ stores the inverse step ``1/scale``); the grid spans
  ``[min(tau, 0), max(tau, 0)]`` of its group, so an exact 0 is code ``zero_point``
  and comes back as exactly 0, and ``|tau - dequant| <= scale / 2``.
* sign (bits=1): bit 1 where ``tau >= 0`` (0 maps to +1, as BitDelta);
  ``dequant = +scale`` or ``-scale``, ``scale = mean |tau|`` of its tensor/row/group.
* residual (RTVQ): ``base`` is a shared affine QTaskVector, and this one holds the
  offset; ``dequant = dequant(base) + dequant(offset)`` (float32 add).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np

from . import _arrays as A

AFFINE_BITS = (2, 3, 4, 8)
SIGN_BITS = (1,)
GROUP_SIZES = (32, 64, 128)
GRANULARITIES = ("tensor", "row", "group")

__all__ = ["QTaskVector", "quantize", "quantize_residual", "dequantize", "storage_bytes",
           "AFFINE_BITS", "GROUP_SIZES"]


def _host(a: Any) -> np.ndarray:
    """A NumPy view (CPU) or copy (other devices) of a QTaskVector field."""
    if isinstance(a, np.ndarray):
        return a
    return a.detach().cpu().numpy()


@dataclass(eq=False)
class QTaskVector:
    """One quantized task vector of a ``[N_out, K_in]`` weight matrix (layout: module docstring).

    Fields are NumPy arrays (or torch tensors after :meth:`to`). Build one with
    :func:`quantize` / :func:`quantize_residual`; store it with :meth:`to_dict` and
    load it with :meth:`from_dict` (bit-exact).
    """
    scheme: str                      # "affine" or "sign"
    bits: int
    shape: tuple                     # (N_out, K_in)
    granularity: str                 # "tensor", "row" or "group"
    group_size: int                  # elements per group along K_in (K_in for tensor/row)
    codes: Any                       # uint8 [N_out, ceil(K_in*bits/8)]
    scales: Any                      # float32 [S, G]
    zero_points: Any = None          # uint8 [S, G] (affine) or None (sign)
    base: Optional["QTaskVector"] = None  # RTVQ: the shared base; this object is the offset

    def __post_init__(self) -> None:
        self.shape = tuple(int(s) for s in self.shape)
        self.bits = int(self.bits)
        self.group_size = int(self.group_size)
        _validate(self, "qtv")

    # ------------------------------------------------------------ properties
    @property
    def N(self) -> int:
        return self.shape[0]

    @property
    def K(self) -> int:
        return self.shape[1]

    @property
    def n_groups(self) -> int:
        return int(self.scales.shape[1])

    @property
    def per_row(self) -> bool:
        return self.granularity != "tensor"

    @property
    def row_bytes(self) -> int:
        return (self.K * self.bits + 7) // 8

    @property
    def is_residual(self) -> bool:
        return self.base is not None

    @property
    def device(self) -> str:
        return A.device_of(self.codes)

    @property
    def nbytes(self) -> int:
        """Bytes of this vector's own codes + scales + zero points (a residual's base not included)."""
        n = int(self.codes.nbytes if isinstance(self.codes, np.ndarray) else self.codes.numel())
        n += 4 * int(np.prod(self.scales.shape))
        if self.zero_points is not None:
            n += int(np.prod(self.zero_points.shape))
        return n

    def __repr__(self) -> str:
        g = self.granularity if self.granularity != "group" else f"group {self.group_size}"
        head = f"QTaskVector({self.scheme} {self.bits}-bit, {g}, shape={self.shape}, {self.device}"
        if self.base is not None:
            head += f", residual over {self.base.scheme} {self.base.bits}-bit base"
        return head + ")"

    # --------------------------------------------------------------- storage
    def to_dict(self) -> Dict[str, Any]:
        """Plain NumPy arrays and Python scalars (``np.savez(**d)`` works); a residual's
        base is stored under keys prefixed ``"base."``."""
        d: Dict[str, Any] = {
            "format": "vkern.taskvec/1",
            "scheme": self.scheme,
            "bits": int(self.bits),
            "shape": np.asarray(self.shape, dtype=np.int64),
            "granularity": self.granularity,
            "group_size": int(self.group_size),
            "codes": np.array(_host(self.codes), dtype=np.uint8, copy=True),
            "scales": np.array(_host(self.scales), dtype=np.float32, copy=True),
        }
        if self.zero_points is not None:
            d["zero_points"] = np.array(_host(self.zero_points), dtype=np.uint8, copy=True)
        if self.base is not None:
            for k, v in self.base.to_dict().items():
                d["base." + k] = v
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "QTaskVector":
        """Inverse of :meth:`to_dict` (also accepts an ``np.load``-ed ``.npz``)."""
        def scalar(key, kind):
            if key not in d:
                raise ValueError(f"from_dict: missing key {key!r}")
            v = d[key]
            v = v.item() if isinstance(v, np.ndarray) else v
            return kind(v)

        fmt = scalar("format", str)
        if fmt != "vkern.taskvec/1":
            raise ValueError(f"from_dict: format: expected 'vkern.taskvec/1', got {fmt!r}")
        base = None
        base_keys = {k[5:]: v for k, v in d.items() if k.startswith("base.")}
        if base_keys:
            base = cls.from_dict(base_keys)
        zp = d.get("zero_points")
        return cls(scheme=scalar("scheme", str), bits=scalar("bits", int),
                   shape=tuple(int(s) for s in np.asarray(d["shape"]).tolist()),
                   granularity=scalar("granularity", str), group_size=scalar("group_size", int),
                   codes=np.array(d["codes"], dtype=np.uint8, copy=True),
                   scales=np.array(d["scales"], dtype=np.float32, copy=True),
                   zero_points=None if zp is None else np.array(zp, dtype=np.uint8, copy=True),
                   base=base)

    def to(self, device: Any) -> "QTaskVector":
        """The same vector with torch tensors on ``device`` ("cpu", "cuda", a torch.device);
        ``device="numpy"`` gives NumPy arrays back. A residual's base moves too (once per call:
        share the moved base yourself with :func:`to_device` for a list)."""
        return to_device([self], device)[0]


def to_device(qtvs: Sequence[QTaskVector], device: Any) -> List[QTaskVector]:
    """Moves a list of task vectors, keeping one shared copy of each shared RTVQ base."""
    moved: Dict[int, QTaskVector] = {}

    def conv(a):
        if a is None:
            return None
        if device == "numpy":
            return np.ascontiguousarray(_host(a))
        torch = A.torch_module()
        if torch is None:
            raise ValueError("QTaskVector.to: torch is not importable")
        t = a if A.is_torch(a) else torch.from_numpy(np.ascontiguousarray(a))
        return t.to(device).contiguous()

    def one(q: QTaskVector) -> QTaskVector:
        if id(q) in moved:
            return moved[id(q)]
        out = QTaskVector(q.scheme, q.bits, q.shape, q.granularity, q.group_size, conv(q.codes), conv(q.scales),
                          conv(q.zero_points), None if q.base is None else one(q.base))
        moved[id(q)] = out
        return out

    return [one(q) for q in qtvs]


def storage_bytes(qtvs: Sequence[QTaskVector]) -> int:
    """Bytes to store a list of task vectors, counting each shared RTVQ base once."""
    seen = set()
    total = 0
    for q in qtvs:
        for part in (q, q.base):
            if part is not None and id(part) not in seen:
                seen.add(id(part))
                total += part.nbytes
    return total


# ------------------------------------------------------------------ checks

def _validate(q: QTaskVector, name: str) -> None:
    if q.scheme not in ("affine", "sign"):
        raise ValueError(f"{name}.scheme: expected 'affine' or 'sign', got {q.scheme!r}")
    allowed = AFFINE_BITS if q.scheme == "affine" else SIGN_BITS
    if q.bits not in allowed:
        raise ValueError(f"{name}.bits: expected one of {allowed} for scheme {q.scheme!r}, got {q.bits}")
    if len(q.shape) != 2 or q.shape[0] < 0 or q.shape[1] < 1:
        raise ValueError(f"{name}.shape: expected (N_out >= 0, K_in >= 1), got {q.shape}")
    N, K = q.shape
    if q.granularity not in GRANULARITIES:
        raise ValueError(f"{name}.granularity: expected one of {GRANULARITIES}, got {q.granularity!r}")
    if q.granularity == "group":
        if q.group_size < 1:
            raise ValueError(f"{name}.group_size: expected >= 1, got {q.group_size}")
    elif q.group_size != K:
        raise ValueError(f"{name}.group_size: expected K_in={K} for granularity {q.granularity!r}, "
                         f"got {q.group_size}")
    S = 1 if q.granularity == "tensor" else N
    G = -(-K // q.group_size)
    rb = (K * q.bits + 7) // 8
    for field_name, arr, dt, shape in (("codes", q.codes, "uint8", (N, rb)), ("scales", q.scales, "float32", (S, G)),
                                       ("zero_points", q.zero_points, "uint8", (S, G))):
        if arr is None:
            if field_name == "zero_points" and q.scheme == "affine":
                raise ValueError(f"{name}.zero_points: required for scheme 'affine'")
            continue
        if field_name == "zero_points" and q.scheme == "sign":
            raise ValueError(f"{name}.zero_points: must be None for scheme 'sign'")
        if not (isinstance(arr, np.ndarray) or A.is_torch(arr)):
            raise TypeError(f"{name}.{field_name}: expected a NumPy array or torch tensor, got {type(arr).__name__}")
        if A.dtype_name(arr) != dt:
            raise TypeError(f"{name}.{field_name}: expected dtype {dt}, got {A.dtype_name(arr)}")
        if tuple(int(s) for s in arr.shape) != shape:
            raise ValueError(f"{name}.{field_name}: expected shape {shape}, got {tuple(arr.shape)}")
    if q.base is not None:
        if q.base.base is not None:
            raise ValueError(f"{name}.base: a residual base cannot itself be residual")
        if q.base.shape != q.shape:
            raise ValueError(f"{name}.base: expected shape {q.shape}, got {q.base.shape}")


def _tau_host(tau: Any, name: str) -> np.ndarray:
    t, _ = A.to_native(tau, name)
    if not A.is_float(t):
        raise A.float_dtype_error(name, t)
    if t.ndim != 2:
        raise ValueError(f"{name}: expected shape [N_out, K_in], got {tuple(t.shape)}")
    if int(t.shape[1]) < 1:
        raise ValueError(f"{name}: K_in must be >= 1, got shape {tuple(t.shape)}")
    if not isinstance(t, np.ndarray) and t.device.type != "cpu":
        raise ValueError(f"{name}: quantization runs on the host; got a tensor on {t.device} "
                         "(move it with .cpu() first)")
    h = A.to_numpy(t).astype(np.float32, copy=False)
    if not np.all(np.isfinite(h)):
        raise ValueError(f"{name}: contains NaN or infinity ({int(np.sum(~np.isfinite(h)))} entries)")
    return h


def _check_group(group_size: Any, scheme: str):
    if group_size is None or group_size == "tensor":
        return "tensor", None
    if group_size == "row":
        return "row", None
    if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)):
        raise TypeError(f"group_size: expected None, 'row' or one of {GROUP_SIZES}, got {group_size!r}")
    if int(group_size) not in GROUP_SIZES:
        raise ValueError(f"group_size: expected None, 'row' or one of {GROUP_SIZES}, got {int(group_size)}")
    return "group", int(group_size)


def _check_backend(backend: str) -> None:
    import os

    from ._backend import BACKENDS, BackendUnavailable

    if backend == "auto":
        backend = os.environ.get("VKERN_BACKEND", "auto") or "auto"
        if backend not in ("auto", "reference", "cpu"):
            backend = "auto"  # quantization runs on the host whatever the kernels' backend
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {('auto',) + BACKENDS}, got {backend!r}")
    if backend in ("cuda", "triton"):
        raise BackendUnavailable(f"vkern.taskvec.quantize: backend {backend!r} cannot run this call:\n"
                                 "  reference: available\n  cpu: available (runs the NumPy quantizer)\n"
                                 f"  {backend}: quantization runs on the host only (SPEC §4)")


# ------------------------------------------------------------------- API

def quantize(tau: Any, *, bits: int, group_size: Union[int, str, None] = None, scheme: str = "affine",
             backend: str = "auto") -> QTaskVector:
    """Quantizes one task vector ``tau [N_out, K_in]`` (float32/float16/bfloat16, finite).

    Args:
        bits: 2, 3, 4 or 8 for ``scheme="affine"``; 1 for ``scheme="sign"``.
        group_size: None (one scale per tensor, as TVQ), ``"row"`` (one per output row)
            or 32 / 64 / 128 (per group along K_in; a last short group is fine).
        scheme: "affine" (min-max, round to nearest, integer zero point) or "sign"
            (BitDelta: sign bit, scale = mean |tau|).
        backend: "auto", "reference" or "cpu" (both run the NumPy quantizer; quantization
            never runs on a GPU backend).

    Returns:
        A :class:`QTaskVector` with NumPy fields. ``|tau - dequantize(q)| <= scale/2``
        (affine); exact zeros stay exactly zero (affine).

    Example:
        >>> import numpy as np
        >>> from vkern import taskvec
        >>> tau = np.array([[0.0, 0.5, -1.0, 1.0]], np.float32)
        >>> q = taskvec.quantize(tau, bits=8)
        >>> bool(np.all(np.abs(taskvec.dequantize(q) - tau) <= q.scales[0, 0] / 2))
        True
    """
    if scheme not in ("affine", "sign"):
        raise ValueError(f"scheme: expected 'affine' or 'sign', got {scheme!r}")
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)):
        raise TypeError(f"bits: expected an int, got {type(bits).__name__}")
    allowed = AFFINE_BITS if scheme == "affine" else SIGN_BITS
    if int(bits) not in allowed:
        raise ValueError(f"bits: expected one of {allowed} for scheme {scheme!r}, got {int(bits)}")
    granularity, g = _check_group(group_size, scheme)
    _check_backend(backend)
    h = _tau_host(tau, "tau")
    from .reference import taskvec as ref

    codes, scales, zeros, gs = ref.quantize(h, int(bits), granularity, g, scheme)
    return QTaskVector(scheme, int(bits), h.shape, granularity, gs, codes, scales, zeros)


def quantize_residual(taus: Sequence[Any], *, base_bits: int = 3, offset_bits: int = 2,
                      group_size: Union[int, str, None] = None, backend: str = "auto") -> List[QTaskVector]:
    """RTVQ: one shared base (the mean of the taus, affine ``base_bits``) plus, per task,
    an offset ``tau_t - dequantize(base)`` quantized to ``offset_bits`` (affine 2/3/4/8, or
    1 = sign bit with mean-|offset| scale, i.e. two-mask BitDelta).

    Returns T residual QTaskVectors sharing one base object (``storage_bytes`` counts it once);
    ``dequantize(q_t) = dequantize(base) + dequantize(offset_t)``.

    Example:
        >>> import numpy as np
        >>> from vkern import taskvec
        >>> rng = np.random.default_rng(0)
        >>> taus = [rng.standard_normal((4, 64)).astype(np.float32) for _ in range(3)]
        >>> qs = taskvec.quantize_residual(taus, base_bits=3, offset_bits=2, group_size=32)
        >>> qs[0].base is qs[2].base
        True
    """
    if isinstance(taus, (np.ndarray,)) or A.is_torch(taus):
        if taus.ndim != 3:
            raise ValueError(f"taus: expected a list of [N_out, K_in] or an array [T, N_out, K_in], "
                             f"got shape {tuple(taus.shape)}")
        taus = [taus[i] for i in range(int(taus.shape[0]))]
    if not isinstance(taus, (list, tuple)) or len(taus) == 0:
        raise ValueError("taus: expected a non-empty list of task vectors [N_out, K_in]")
    for name, b, allowed in (("base_bits", base_bits, AFFINE_BITS), ("offset_bits", offset_bits, AFFINE_BITS + (1,))):
        if isinstance(b, bool) or not isinstance(b, (int, np.integer)):
            raise TypeError(f"{name}: expected an int, got {type(b).__name__}")
        if int(b) not in allowed:
            raise ValueError(f"{name}: expected one of {allowed}, got {int(b)}")
    granularity, g = _check_group(group_size, "affine")
    _check_backend(backend)
    hs = [_tau_host(t, f"taus[{i}]") for i, t in enumerate(taus)]
    for i, h in enumerate(hs):
        if h.shape != hs[0].shape:
            raise ValueError(f"taus[{i}]: expected shape {hs[0].shape} (from taus[0]), got {h.shape}")
    from .reference import taskvec as ref

    mean = np.mean(np.stack([h.astype(np.float64) for h in hs]), axis=0).astype(np.float32)
    c, s, z, gs = ref.quantize(mean, int(base_bits), granularity, g, "affine")
    base = QTaskVector("affine", int(base_bits), mean.shape, granularity, gs, c, s, z)
    deq_base = ref.dequantize(base)
    off_scheme = "sign" if int(offset_bits) == 1 else "affine"
    out = []
    for h in hs:
        c, s, z, gs = ref.quantize(h - deq_base, int(offset_bits), granularity, g, off_scheme)
        out.append(QTaskVector(off_scheme, int(offset_bits), h.shape, granularity, gs, c, s, z, base=base))
    return out


def dequantize(qtv: QTaskVector, *, backend: str = "auto"):
    """float32 ``[N_out, K_in]`` of a QTaskVector: NumPy for NumPy fields, a torch tensor on
    the fields' device otherwise. Backends: reference, cpu, triton, cuda."""
    from .ops.taskvec import dequantize_impl

    if isinstance(qtv, QTaskVector) and A.is_torch(qtv.codes):
        torch = A.torch_module()
        if torch.compiler.is_compiling():
            from ._torch.taskvec import call_dequantize

            return call_dequantize(qtv, backend)
    return dequantize_impl(qtv, backend=backend)
