"""linalg: solve, multiply and decompose dense matrices with numpy (FunctionBench linpack/matmul)."""

import os

# One invocation at a time per sandbox: no BLAS/OpenMP thread pools (they only contend for the
# node's cores and, under load, spin). Must be set before numpy is imported.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import time

import numpy as np


def main(args):
    n = args.get("n", 300)
    seed = args.get("seed", 42)
    if not isinstance(n, int) or isinstance(n, bool) or not 2 <= n <= 3000:
        return {"error": "n must be an integer in [2, 3000]"}
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        return {"error": "seed must be a non-negative integer"}
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n, n)) + n * np.eye(n)  # diagonally dominant: well conditioned
    b = rng.standard_normal(n)
    x = np.linalg.solve(a, b)
    residual = float(np.linalg.norm(a @ x - b) / np.linalg.norm(b))
    c = a @ a.T
    q, r = np.linalg.qr(a)
    qr_err = float(np.linalg.norm(q @ r - a) / np.linalg.norm(a))
    eig = np.linalg.eigvalsh(c)
    elapsed = time.perf_counter() - t0
    return {
        "n": n,
        "residual_ok": residual < 1e-9,
        "qr_ok": qr_err < 1e-9,
        "cond": round(float(eig[-1] / eig[0]), 3),
        "trace": round(float(np.trace(c)), 3),
        "elapsed_ms": round(elapsed * 1e3, 3),
    }
