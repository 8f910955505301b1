"""Odd scalar arguments (issue 11, defect 8): a finite scale that overflows float32 and integer
counts beyond int64 are refused with a ValueError naming the argument, before any kernel."""
import numpy as np
import pytest

import vkern

BACKENDS = ("reference", "cpu")


@pytest.fixture
def attn(rng):
    q = rng.standard_normal((1, 2, 8)).astype(np.float32)
    k = rng.standard_normal((1, 2, 16, 8)).astype(np.float32)
    return q, k, k.copy()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [1e39, 3.5e38, -1e300])
def test_scale_beyond_float32(attn, backend, scale):
    q, k, v = attn
    with pytest.raises(ValueError, match="scale"):
        vkern.loki_attention(q, k, v, rank=4, topk=4, scale=scale, backend=backend)
    with pytest.raises(ValueError, match="scale"):
        vkern.decode_attention(q, k, v, scale=scale, backend=backend)
    with pytest.raises(ValueError, match="scale"):
        vkern.vatp.attention_colsum(q[:, :, None], k, scale=scale, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("big", [2**63, 2**64 + 5, 10**30])
def test_counts_beyond_int64(attn, backend, big):
    q, k, v = attn
    s = np.ones((1, 2, 16), np.float32)
    for name in ("num_sink", "num_recent"):
        with pytest.raises(ValueError, match=name):
            vkern.loki_attention(q, k, v, rank=4, topk=4, backend=backend, **{name: big})
        with pytest.raises(ValueError, match=name):
            vkern.vatp_prune(k, v, s, budget=8, backend=backend, **{"num_sink": 0, "num_recent": 0, name: big})
    with pytest.raises(ValueError, match="topk"):
        vkern.loki_attention(q, k, v, rank=4, topk=big, backend=backend)


def test_largest_float32_scale_is_accepted(attn):
    q, k, v = attn
    out = vkern.decode_attention(q, k, v, scale=float(np.finfo(np.float32).max), backend="reference")
    assert out.shape == q.shape
