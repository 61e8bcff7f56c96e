"""vanilla: simple arithmetic and time (FunctionBench float_operation)."""

import math
import time


def main(args):
    n = args.get("n", 100000)
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 10_000_000:
        return {"error": "n must be an integer in [1, 10000000]"}
    t0 = time.perf_counter()
    acc = 0.0
    for i in range(1, n + 1):
        x = float(i)
        acc += math.sin(x) * math.cos(x) + math.sqrt(x) / (1.0 + math.log(x))
    elapsed = time.perf_counter() - t0
    return {"n": n, "value": round(acc, 6), "now": time.time(), "elapsed_ms": round(elapsed * 1e3, 3)}
