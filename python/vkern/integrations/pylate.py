"""PyLate drop-in: ColBERT scoring through ``vkern.maxsim``.

Same signatures, accepted inputs (list / NumPy / torch) and outputs
(``[Q, N]`` float32 torch tensor on the queries' device) as
``pylate.scores``. Two masking semantics:

* default (``exact=False``): PyLate's numbers. PyLate multiplies the masks
  into the similarity tensor, so a masked similarity counts as 0: a document
  with at least one masked token has a per-query-token max of at least 0, a
  fully masked document scores 0, and a masked query token adds 0.
* ``exact=True``: vkern's own semantics; masked tokens take no part in the max
  (an empty document scores ``-inf``), masked query tokens add nothing.

They disagree when the unmasked similarities are negative::

    q = [[[1.0]]]; d = [[[-2.0], [5.0]]]; dmask = [[1, 0]]
    colbert_scores(q, d, documents_mask=dmask)             -> [[0.]]   (PyLate)
    colbert_scores(q, d, documents_mask=dmask, exact=True) -> [[-2.]]

Training: every function here is differentiable (queries and documents) through
``vkern.maxsim``'s own backward: the forward keeps the argmax document token per
(query, document, query token) and the backward scatters from it, so no
``[Q, N, Lq, Ld]`` tensor exists in either pass. The gradients equal PyLate's
(einsum, mask multiply, max, sum) within float32 tolerance: masked document
tokens get none (PyLate multiplies them by a 0 mask), and where the max is a
masked token's 0 nothing flows either. Exact ties between document tokens send
the gradient to the lower token index (torch's ``max`` picks one of them too,
without promising which).

``patch()`` routes ``pylate.scores.colbert_scores`` / ``colbert_kd_scores`` /
``colbert_scores_pairwise`` (and the names ``pylate.rank.rank``,
``pylate.scores.colbert`` and ``pylate.losses.distillation`` imported) and
``pylate.scores.ColBERTScores.__call__`` (the default ``score_metric`` of
``pylate.losses.Contrastive`` / ``CachedContrastive``, existing instances
included) through this module; as a context manager it restores PyLate's
functions on exit, ``patch().start()`` / ``unpatch()`` is the global switch.
"""
from __future__ import annotations

import importlib
import sys
from typing import Any, Optional

__all__ = ["colbert_scores", "colbert_scores_pairwise", "colbert_kd_scores", "ColBERTScores",
           "patch", "unpatch", "is_patched"]


def _torch():
    import torch
    return torch


def _as_tensor(x: Any, name: str, device=None):
    """list / NumPy / torch -> torch tensor (a ragged list of [L, H] is zero-padded, as PyLate's pad does)."""
    torch = _torch()
    import numpy as np
    if isinstance(x, torch.Tensor):
        t = x
    elif isinstance(x, np.ndarray):
        t = torch.from_numpy(x)
    elif isinstance(x, (list, tuple)):
        if len(x) == 0:
            raise ValueError(f"{name}: empty list")
        items = [_as_tensor(v, f"{name}[{i}]") for i, v in enumerate(x)]
        shapes = {tuple(v.shape) for v in items}
        if len(shapes) == 1:
            t = torch.stack(items)
        elif all(v.ndim == 2 for v in items) and len({v.shape[1] for v in items}) == 1:
            t = torch.nn.utils.rnn.pad_sequence(items, batch_first=True)
        else:
            raise ValueError(f"{name}: list items have incompatible shapes {sorted(shapes)}")
    elif isinstance(x, (int, float)):
        t = torch.tensor(x)
    else:
        raise TypeError(f"{name}: expected a list, NumPy array or torch tensor, got {type(x).__name__}")
    if device is not None:
        t = t.to(device)
    return t


def _as_embeddings(x: Any, name: str, ndim: int, device=None):
    torch = _torch()
    t = _as_tensor(x, name, device)
    if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        if t.dtype == torch.bool or t.is_complex():
            raise TypeError(f"{name}: expected a float tensor, got {t.dtype}")
        t = t.to(torch.float32)     # float64 / integer embeddings: scored in float32
    if t.ndim != ndim:
        raise ValueError(f"{name}: expected {ndim} dims, got shape {tuple(t.shape)}")
    return t


def _as_mask(m: Any, name: str, shape, device):
    """A 0/1 mask (bool, integer or float holding only 0 and 1) -> bool tensor of ``shape``."""
    if m is None:
        return None
    torch = _torch()
    t = _as_tensor(m, name, device)
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.dtype == torch.bool:
        return t
    if t.is_complex():
        raise TypeError(f"{name}: expected a bool, integer or 0/1 float mask, got {t.dtype}")
    if not bool(((t == 0) | (t == 1)).all()):
        raise ValueError(f"{name}: mask values must be 0 or 1")
    return t != 0


def _needs_grad(*ts) -> bool:
    torch = _torch()
    return torch.is_grad_enabled() and any(t.requires_grad for t in ts)


def _compact_queries(q, qm):
    """Move each query's unmasked tokens to the front -> (queries, query_lengths)."""
    torch = _torch()
    if qm is None or bool(qm.all()):
        return q, None
    order = torch.argsort((~qm).to(torch.int8), dim=1, stable=True)
    q2 = torch.gather(q, 1, order[:, :, None].expand(-1, -1, q.shape[2]))
    return q2, qm.sum(1)


def _is_prefix(dm):
    lengths = dm.sum(1)
    torch = _torch()
    pos = torch.arange(dm.shape[1], device=dm.device)[None, :]
    return bool((dm == (pos < lengths[:, None])).all()), lengths


def _scores(q, d, qm, dm, exact: bool):
    """q [Q, Lq, H], d [N, Ld, H] (torch), bool masks or None -> [Q, N] float32."""
    torch = _torch()
    import vkern
    N, Ld, H = d.shape
    if q.shape[0] == 0 or N == 0:
        return torch.zeros(q.shape[0], N, dtype=torch.float32, device=q.device)
    q2, qlen = _compact_queries(q, qm)
    if q2.dtype != d.dtype:
        dt = torch.promote_types(q2.dtype, d.dtype)
        q2, d = q2.to(dt), d.to(dt)
    kw = {} if qlen is None else {"query_lengths": qlen}
    if dm is None or bool(dm.all()):
        return vkern.maxsim(q2, d, **kw)
    prefix, lengths = _is_prefix(dm)
    if exact:
        if prefix:
            return vkern.maxsim(q2, d, doc_lengths=lengths, **kw)
        offsets = torch.zeros(N + 1, dtype=torch.int64, device=d.device)
        torch.cumsum(lengths, 0, out=offsets[1:])
        return vkern.maxsim(q2, d[dm], doc_offsets=offsets, **kw)
    # PyLate's semantics: a document with a masked token also "has" a 0 similarity.
    # When the mask is a prefix and the first padding row is already zero (zero-padded
    # batches), including that row gives exactly that 0 without copying the documents.
    if prefix and not _needs_grad(d):
        short = lengths < Ld
        rows = d[torch.nonzero(short).flatten(), lengths[short]]
        if not bool(rows.any()):
            return vkern.maxsim(q2, d, doc_lengths=torch.clamp(lengths + 1, max=Ld), **kw)
    # Otherwise vkern's zero-mask mode reads the padded documents in place: a masked token's
    # similarities are exactly 0 (and pass no gradient), as PyLate's mask multiply makes them.
    # Each document is scored up to its last unmasked token, plus one masked token where it has one.
    pos = torch.arange(Ld, device=d.device)
    last = torch.where(dm, pos[None, :], -1).amax(1) + 1
    masked_inside = last > lengths
    span = torch.where(~dm.all(1) & ~masked_inside, last + 1, last)
    from vkern._torch import maxsim as _torch_maxsim
    return _torch_maxsim.maxsim_argmax_op(q2, d, None, span, qlen, "auto", dm)[0]


def colbert_scores(queries_embeddings, documents_embeddings, queries_mask=None, documents_mask=None,
                   backend: Optional[str] = None, *, exact: bool = False):
    """ColBERT scores of every query against every document, ``pylate.scores.colbert_scores``-compatible.

    queries ``[Q, Lq, H]``, documents ``[N, Ld, H]`` (list / NumPy / torch), masks ``[Q, Lq]`` and
    ``[N, Ld]`` (bool, integer or 0/1 float). Returns float32 ``[Q, N]`` on the queries' device.
    ``backend`` is accepted for signature compatibility and ignored (vkern picks its backend).
    See the module docstring for ``exact``.
    """
    q = _as_embeddings(queries_embeddings, "queries_embeddings", 3)
    d = _as_embeddings(documents_embeddings, "documents_embeddings", 3, q.device)
    if d.shape[2] != q.shape[2]:
        raise ValueError(f"documents_embeddings: expected embedding size H={q.shape[2]} "
                         f"(from queries_embeddings), got {d.shape[2]}")
    qm = _as_mask(queries_mask, "queries_mask", q.shape[:2], q.device)
    dm = _as_mask(documents_mask, "documents_mask", d.shape[:2], q.device)
    return _scores(q, d, qm, dm, exact)


def colbert_kd_scores(queries_embeddings, documents_embeddings, queries_mask=None, documents_mask=None,
                      backend: Optional[str] = None, *, exact: bool = False):
    """Each query against its own candidates: queries ``[Q, Lq, H]``, documents ``[Q, N, Ld, H]`` -> ``[Q, N]``."""
    torch = _torch()
    q = _as_embeddings(queries_embeddings, "queries_embeddings", 3)
    d = _as_embeddings(documents_embeddings, "documents_embeddings", 4, q.device)
    if d.shape[0] != q.shape[0]:
        raise ValueError(f"documents_embeddings: expected {q.shape[0]} candidate groups (one per query), got {d.shape[0]}")
    if d.shape[3] != q.shape[2]:
        raise ValueError(f"documents_embeddings: expected embedding size H={q.shape[2]} "
                         f"(from queries_embeddings), got {d.shape[3]}")
    qm = _as_mask(queries_mask, "queries_mask", q.shape[:2], q.device)
    dm = _as_mask(documents_mask, "documents_mask", d.shape[:3], q.device)
    rows = [_scores(q[i:i + 1], d[i], None if qm is None else qm[i:i + 1],
                    None if dm is None else dm[i], exact) for i in range(q.shape[0])]
    if not rows:
        return torch.zeros(0, d.shape[1], dtype=torch.float32, device=q.device)
    return torch.cat(rows, 0)


def colbert_scores_pairwise(queries_embeddings, documents_embeddings, backend: Optional[str] = None):
    """Score of query i against document i: ``[B, Lq, H]`` x ``[B, Ld, H]`` (or lists of ``[L, H]``) -> ``[B]``."""
    torch = _torch()
    if len(queries_embeddings) != len(documents_embeddings):
        raise ValueError(f"documents_embeddings: expected {len(queries_embeddings)} documents "
                         f"(one per query), got {len(documents_embeddings)}")
    out = []
    for i, (qi, di) in enumerate(zip(queries_embeddings, documents_embeddings)):
        q = _as_embeddings(qi, f"queries_embeddings[{i}]", 2)
        d = _as_embeddings(di, f"documents_embeddings[{i}]", 2, q.device)
        if d.shape[1] != q.shape[1]:
            raise ValueError(f"documents_embeddings[{i}]: expected embedding size H={q.shape[1]}, got {d.shape[1]}")
        out.append(_scores(q[None], d[None], None, None, True)[0, 0])
    return torch.stack(out) if out else torch.zeros(0)


class ColBERTScores:
    """``pylate.scores.ColBERTScores``-compatible: queries ``(Q, Qt, H)``, documents ``(Qd, N, Dt, H)``
    -> ``(Q, Qd*N)``, query-major (``scores[i, j*N + k]``: query i vs group j's k-th document)."""

    def __init__(self, exact: bool = False):
        self.exact = exact

    def __call__(self, queries_embeddings, documents_embeddings, queries_mask=None, documents_mask=None,
                 backend: Optional[str] = None):
        q = _as_embeddings(queries_embeddings, "queries_embeddings", 3)
        d = _as_embeddings(documents_embeddings, "documents_embeddings", 4, q.device)
        Qd, N, Dt, H = d.shape
        if documents_mask is not None:
            documents_mask = _as_mask(documents_mask, "documents_mask", (Qd, N, Dt), q.device).reshape(Qd * N, Dt)
        return colbert_scores(q, d.reshape(Qd * N, Dt, H), queries_mask, documents_mask, exact=self.exact)


def _colbert_scores_call(self, queries_embeddings, documents_embeddings, queries_mask=None, documents_mask=None,
                         backend: Optional[str] = None):
    return ColBERTScores()(queries_embeddings, documents_embeddings, queries_mask, documents_mask)


# ------------------------------------------------------------------- patching

_NAMES = {"colbert_scores": colbert_scores, "colbert_kd_scores": colbert_kd_scores,
          "colbert_scores_pairwise": colbert_scores_pairwise}
# Modules that bind these names at import (``from ..scores import colbert_scores``).
_MODULES = ("pylate.scores.colbert", "pylate.scores", "pylate.rank.rank", "pylate.losses.distillation")
_saved: list = []   # (module, name, original) while patched


def is_patched() -> bool:
    return bool(_saved)


def _start():
    if _saved:
        return
    importlib.import_module("pylate.scores")
    importlib.import_module("pylate.rank.rank")
    for modname in _MODULES:
        mod = sys.modules.get(modname)
        if mod is None:
            try:    # the losses pull sentence-transformers; patch them only where they import
                mod = importlib.import_module(modname)
            except ImportError:
                continue
        for name, fn in _NAMES.items():
            if hasattr(mod, name):
                _saved.append((mod, name, getattr(mod, name)))
                setattr(mod, name, fn)
    cls = getattr(sys.modules["pylate.scores"], "ColBERTScores", None)
    if cls is not None:    # the losses' default score_metric: one vkern call for all document groups
        _saved.append((cls, "__call__", cls.__dict__["__call__"]))
        cls.__call__ = _colbert_scores_call


def unpatch() -> None:
    """Restore PyLate's own scoring functions."""
    while _saved:
        mod, name, orig = _saved.pop()
        setattr(mod, name, orig)


class patch:
    """Route PyLate's scoring through vkern: ``with patch(): ...`` or ``patch().start()`` (undo: ``unpatch()``)."""

    def start(self) -> "patch":
        _start()
        return self

    stop = staticmethod(unpatch)

    def __enter__(self) -> "patch":
        self._owner = not is_patched()
        _start()
        return self

    def __exit__(self, *exc) -> None:
        if self._owner:
            unpatch()
