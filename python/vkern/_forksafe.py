"""Fork safety of the BLAS calls vkern makes itself (delta_linear's base product: NumPy's
``np.matmul`` or ``torch.mm``).

A process that forks while another of its threads is inside an OpenBLAS GEMM can hang: OpenBLAS's
own fork handler (``blas_thread_shutdown_``) waits for its worker threads, which that GEMM holds,
or the child inherits a BLAS lock that no thread will ever release. vkern's C++ thread pool is
fork-safe by itself (csrc/cpu/threadpool.cpp); this gate covers the BLAS calls: every one runs
inside ``blas_call()``, and ``os.register_at_fork(before=...)`` waits until none is in flight and
holds new ones off until the fork is done, in the parent and the child alike. A fork therefore
never happens in the middle of a vkern BLAS call. (BLAS calls a program makes itself, outside
vkern, are its own to keep away from fork.)
"""
from __future__ import annotations

import contextlib
import os
import threading

__all__ = ["blas_call"]


class _Gate:
    def __init__(self):
        self._reset()

    def _reset(self):
        self.cv = threading.Condition(threading.Lock())
        self.busy = 0          # BLAS calls in flight
        self.forking = False   # a fork is waiting or under way: new calls wait

    @contextlib.contextmanager
    def call(self):
        with self.cv:
            while self.forking:
                self.cv.wait()
            self.busy += 1
        try:
            yield
        finally:
            with self.cv:
                self.busy -= 1
                if self.busy == 0:
                    self.cv.notify_all()

    def before_fork(self):
        self.cv.acquire()              # held across fork(): no call can start
        self.forking = True
        while self.busy:               # wait() lets the calls in flight finish (and releases the GIL)
            self.cv.wait()

    def after_fork_parent(self):
        self.forking = False
        self.cv.notify_all()
        self.cv.release()

    def after_fork_child(self):
        self._reset()                  # only the forking thread exists in the child


_GATE = _Gate()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_GATE.before_fork, after_in_parent=_GATE.after_fork_parent,
                        after_in_child=_GATE.after_fork_child)


def blas_call():
    """Context for one BLAS call vkern makes: a fork waits until it is done."""
    return _GATE.call()
