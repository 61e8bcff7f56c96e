"""mapreduce: word count over a text with a pool of worker processes (FunctionBench mapreduce).

The pool is created once, when the action is loaded, and reused by every invocation, so a warm
(or checkpointed and restored) sandbox holds the parent and its workers. The workers run
`collections.Counter`, a stdlib callable, so nothing of this module needs to be pickled by name
(the runtime may load it under any module name).
"""

import collections
import hashlib
import multiprocessing
import os
import re
import time

INPUTS = os.environ.get("MEDES_INPUTS", "/opt/medes/inputs")
WORKERS = 2
_WORD = re.compile(r"[a-z']+")
_POOL = None


def _pool():
    global _POOL
    if _POOL is None:
        _POOL = multiprocessing.get_context("fork").Pool(WORKERS)
    return _POOL


_pool()


def main(args):
    path = args.get("text", os.path.join(args.get("input_dir", INPUTS), "corpus.txt"))
    chunks = args.get("chunks", 8)
    top = args.get("top", 5)
    if not isinstance(path, str):
        return {"error": "text must be a path"}
    if not isinstance(chunks, int) or isinstance(chunks, bool) or not 1 <= chunks <= 256:
        return {"error": "chunks must be an integer in [1, 256]"}
    if not isinstance(top, int) or isinstance(top, bool) or not 0 <= top <= 100:
        return {"error": "top must be an integer in [0, 100]"}
    t0 = time.perf_counter()
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except (OSError, UnicodeDecodeError) as e:
        return {"error": f"cannot read {path}: {e}"}
    step = max(1, -(-len(lines) // chunks))
    # Split: tokenize each chunk; map: count in the workers; reduce: merge the counters.
    parts = [_WORD.findall("".join(lines[i : i + step]).lower()) for i in range(0, len(lines), step)]
    partial = _pool().map(collections.Counter, parts, chunksize=1)
    total = collections.Counter()
    for c in partial:
        total.update(c)
    h = hashlib.sha256()
    for word, n in sorted(total.items()):
        h.update(f"{word}\t{n}\n".encode())
    return {
        "words": sum(total.values()),
        "unique": len(total),
        "top": [[w, n] for w, n in sorted(total.items(), key=lambda kv: (-kv[1], kv[0]))[:top]],
        "digest": h.hexdigest(),
        "workers": WORKERS,
        "chunks": len(parts),
        "elapsed_ms": round((time.perf_counter() - t0) * 1e3, 3),
    }
