"""A sample OpenWhisk Python action: greets, counts its warm invocations, logs a line."""
import os
import time

_started = time.time()
_calls = 0


def main(args):
    global _calls
    _calls += 1
    name = args.get("name", "stranger")
    print(f"hello called for {name} (call {_calls} in this sandbox)")
    return {
        "greeting": f"Hello, {name}!",
        "calls_in_this_sandbox": _calls,
        "sandbox_age_s": round(time.time() - _started, 3),
        "pid": os.getpid(),
    }
