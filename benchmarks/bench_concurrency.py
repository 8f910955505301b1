"""Two Python threads, one long call each, against the same two calls one after the other
(issue 11: calls from many threads run side by side). Also the per-call overhead of a tiny
call, which the per-call thread scope must not raise.

    python benchmarks/bench_concurrency.py [--threads-per-call 1] [--repeats 5]
"""
import argparse
import threading
import time

import numpy as np

import vkern


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads-per-call", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    vkern.set_num_threads(a.threads_per_call)
    rng = np.random.default_rng(11)
    q = rng.standard_normal((16, 32, 128)).astype(np.float32)
    d = rng.standard_normal((60000, 128)).astype(np.float32)
    offs = np.arange(0, 60001, 100)

    def call():
        return vkern.maxsim(q, d, doc_offsets=offs, backend="cpu")

    want = call()
    serial, both = [], []
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        call()
        call()
        serial.append(time.perf_counter() - t0)
        out = [None, None]
        ts = [threading.Thread(target=lambda i=i: out.__setitem__(i, call())) for i in range(2)]
        t0 = time.perf_counter()
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        both.append(time.perf_counter() - t0)
        assert all(np.array_equal(o, want) for o in out), "results differ from a serial call"
    s, b = min(serial), min(both)
    print(f"vkern {vkern.__version__}, set_num_threads({a.threads_per_call}), maxsim 16x32 queries x 600 docs x 100 "
          f"tokens, D=128, best of {a.repeats}")
    print(f"  two calls, one after the other : {s * 1e3:8.1f} ms")
    print(f"  two calls, two threads at once : {b * 1e3:8.1f} ms")
    print(f"  ratio (threads / serial)       : {b / s:8.2f}x   (1.0 = no overlap, 0.5 = perfect on 2 cores)")
    print("  results bit-identical to a serial call: yes")

    tq = rng.standard_normal((1, 2, 16)).astype(np.float32)
    tk = rng.standard_normal((1, 2, 24, 16)).astype(np.float32)
    n = 20000
    t0 = time.perf_counter()
    for _ in range(n):
        vkern.decode_attention(tq, tk, tk, backend="cpu")
    print(f"  tiny decode_attention call     : {(time.perf_counter() - t0) / n * 1e6:8.1f} us/call")


if __name__ == "__main__":
    main()
