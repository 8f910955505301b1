"""Smoke test of an installed vkern wheel (run by tools/build_wheel.sh in a fresh venv holding only
NumPy): the extension loads, each op runs on the reference and cpu backends and the two agree, and
the extension links no CUDA or torch library."""
import subprocess
import sys

import numpy as np

import vkern
from vkern import _ext, taskvec

assert "torch" not in sys.modules, "the wheel must not need torch"
assert _ext.C is not None, f"vkern._C did not load: {_ext.C_ERROR}"
libs = subprocess.run(["ldd", _ext.C.__file__], capture_output=True, text=True, check=True).stdout
bad = [line.strip() for line in libs.splitlines() if any(s in line for s in ("cuda", "torch", "nvrtc", "cublas"))]
assert not bad, f"vkern._C links {bad}"

rng = np.random.default_rng(0)
f32 = np.float32


def both(fn):
    a, b = fn("reference"), fn("cpu")
    for x, y in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
        np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=1e-4, atol=1e-4)


q, docs = rng.standard_normal((8, 32), dtype=f32), rng.standard_normal((300, 32), dtype=f32)
both(lambda be: vkern.maxsim(q, docs, doc_offsets=np.array([0, 100, 100, 300]), topk=2, backend=be))
ql, k, v = (rng.standard_normal(s, dtype=f32) for s in ((1, 4, 32), (1, 2, 256, 32), (1, 2, 256, 32)))
both(lambda be: vkern.loki_attention(ql, k, v, rank=8, topk=64, num_sink=2, num_recent=4, backend=be))
both(lambda be: vkern.decode_attention(ql, k, v, backend=be))
basis = vkern.loki.pca_basis(rng.standard_normal((128, 2, 32), dtype=f32))
both(lambda be: vkern.loki.rotate(ql, basis, backend=be))
qv = rng.standard_normal((1, 4, 16, 32), dtype=f32)
both(lambda be: vkern.vatp.attention_colsum(qv, k, backend=be))
both(lambda be: vkern.vatp.value_l1(v, backend=be))
s = rng.random((1, 2, 256), dtype=f32)
both(lambda be: vkern.vatp_prune(k, v, s, budget=100, backend=be))
base = rng.standard_normal((64, 256), dtype=f32)
qt = [taskvec.quantize(0.01 * rng.standard_normal((64, 256), dtype=f32), bits=b, group_size=64) for b in (4, 8)]
both(lambda be: vkern.apply_task_vectors(base, qt, [0.5, 0.5], backend=be))
x = rng.standard_normal((3, 256), dtype=f32)
both(lambda be: vkern.delta_linear(x, base, qt, backend=be))
print(f"wheel smoke test ok: vkern {vkern.__version__}, SIMD {vkern.info().get('simd_level')}, "
      f"extension {_ext.C.__file__}")
