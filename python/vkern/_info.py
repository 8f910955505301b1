"""Build and run-time information (``python -m vkern info``)."""
from __future__ import annotations

import os
import platform
import sys

from . import _ext
from ._backend import BACKENDS, OPS


def collect() -> dict:
    out = {
        "vkern": __import__("vkern").__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "numpy": __import__("numpy").__version__,
        "extension": "loaded" if _ext.C is not None else _ext.C_ERROR,
    }
    if _ext.C is not None:
        b = dict(_ext.C.build_info())
        out["compiler"] = b["compiler"]
        out["simd_compiled"] = b["simd_compiled"]
        out["simd_supported"] = list(_ext.C.simd_supported())
        out["simd_level"] = _ext.C.simd_level()
        out["threads"] = _ext.C.num_threads()
        out["cuda_built"] = bool(b["cuda"])
        out["cuda_archs"] = b["cuda_archs"] or "-"
        out["cuda_devices"] = _ext.cuda_device_count()
    for mod in ("torch", "triton"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception as exc:
            out[mod] = f"not importable ({type(exc).__name__})"
    out["TRITON_INTERPRET"] = os.environ.get("TRITON_INTERPRET", "")
    out["VKERN_BACKEND"] = os.environ.get("VKERN_BACKEND", "")
    out["backends"] = {}
    for op_name, op in OPS.items():
        row = {}
        for name in BACKENDS:
            reason = "not implemented" if name not in op.backends else _ext.general_reason(name)
            row[name] = "ok" if reason is None else reason
        out["backends"][op_name] = row
    return out


def render(info: dict) -> str:
    lines = []
    for k, v in info.items():
        if k == "backends":
            continue
        lines.append(f"{k:>16}: {', '.join(v) if isinstance(v, list) else v}")
    lines.append("        backends:")
    for op_name, row in info["backends"].items():
        for name, status in row.items():
            lines.append(f"  {op_name:>14} {name:<9} {status}")
    return "\n".join(lines)
