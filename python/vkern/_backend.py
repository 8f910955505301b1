"""Backend registry: each op lists its backends in priority order; each
backend says why it cannot run a given call, so an impossible request can
list every reason (the xformers pattern)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

BACKENDS = ("cuda", "triton", "cpu", "reference")
GPU_BACKENDS = ("cuda", "triton")


class BackendUnavailable(RuntimeError):
    """The requested backend (or every backend, for "auto") cannot run this call."""


@dataclass
class Backend:
    name: str
    # why_not(call) -> None if the backend can run the call, else a reason
    why_not: Callable[[Any], Optional[str]]
    run: Callable[[Any], Any]


@dataclass
class Op:
    name: str
    backends: Dict[str, Backend] = field(default_factory=dict)

    def register(self, backend: Backend) -> None:
        self.backends[backend.name] = backend

    def reasons(self, call: Any) -> Dict[str, Optional[str]]:
        out: Dict[str, Optional[str]] = {}
        for name in BACKENDS:
            b = self.backends.get(name)
            out[name] = "not implemented for this op" if b is None else b.why_not(call)
        return out

    def pick(self, backend: str, call: Any) -> Backend:
        requested = backend
        if backend == "auto":
            backend = os.environ.get("VKERN_BACKEND", "auto") or "auto"
        if backend != "auto" and backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {('auto',) + BACKENDS}, got {backend!r}")
        if backend != "auto":
            b = self.backends.get(backend)
            reason = "not implemented for this op" if b is None else b.why_not(call)
            if reason is None:
                return b
            raise BackendUnavailable(self._message(f"backend {backend!r}" + (
                " (from VKERN_BACKEND)" if requested == "auto" else "") + " cannot run this call", call))
        for name in BACKENDS:
            b = self.backends.get(name)
            if b is not None and auto_skips(name, call) is None and b.why_not(call) is None:
                return b
        raise BackendUnavailable(self._message("no backend can run this call", call, auto=True))

    def _message(self, head: str, call: Any, auto: bool = False) -> str:
        lines = [f"vkern.{self.name}: {head} ({call!r}):"]
        for name, reason in self.reasons(call).items():
            if auto and reason is None:
                reason = auto_skips(name, call)
            lines.append(f"  {name}: {'available' if reason is None else reason}")
        return "\n".join(lines)


def auto_skips(name: str, call: Any) -> Optional[str]:
    """Why backend="auto" passes over a backend that could run the call, or None. The GPU backends
    are picked for GPU data only: CPU data (NumPy, CPU torch) goes to cpu / reference even where
    TRITON_INTERPRET=1 lets the Triton kernels run on it (the interpreter is a test tool, orders of
    magnitude slower); backend="triton" still runs them there."""
    if name in GPU_BACKENDS and getattr(call, "device", None) == "cpu":
        return "backend='auto' picks it for GPU tensors only (the data is on the CPU; name it to run it there)"
    return None


OPS: Dict[str, Op] = {}


def op(name: str) -> Op:
    return OPS.setdefault(name, Op(name))


def available_backends(op_name: str, call: Any = None) -> Dict[str, tuple]:
    """{backend: (usable, reason)} for an op, for a given call or in general."""
    o = OPS[op_name]
    if call is None:
        from . import _ext

        out = {}
        for name in BACKENDS:
            reason = _ext.general_reason(name)
            if name not in o.backends:
                reason = "not implemented for this op"
            out[name] = (reason is None, reason or "")
        return out
    return {k: (v is None, v or "") for k, v in o.reasons(call).items()}


def order(names: List[str]) -> List[str]:
    return [n for n in BACKENDS if n in names]


# ------------------------------------------- why a backend can't run a call
# The device/array-kind checks every op shares; an op adds its own limits.

def host_reason(call: Any) -> Optional[str]:
    if call.device != "cpu":
        return f"runs on host memory only (inputs are on {call.device}; no hidden device->host copies)"
    return None


def cpu_reason(call: Any) -> Optional[str]:
    from . import _ext

    if _ext.C is None:
        return _ext.C_ERROR
    if call.device != "cpu":
        return f"runs on the CPU only (inputs are on {call.device})"
    return None


def triton_reason(call: Any) -> Optional[str]:
    from . import _ext

    reason = _ext.triton_reason()
    if reason is not None:
        return reason
    if call.lib != "torch":
        return "takes torch tensors (got NumPy arrays)"
    if call.device == "cpu" and not _ext.triton_interpret():
        return "CPU tensors need TRITON_INTERPRET=1"
    if call.device not in ("cpu", "cuda"):
        return f"unsupported device {call.device}"
    return None


def cuda_reason(call: Any) -> Optional[str]:
    from . import _ext

    reason = _ext.cuda_reason()
    if reason is not None:
        return reason
    if call.lib != "torch" or call.device != "cuda":
        return f"takes CUDA tensors (got {call.lib} on {call.device})"
    return None
