#!/usr/bin/env python3
"""Runs the ten actions in-process and checks their results against manifest.toml (stdlib only).

    /opt/medes/venv/bin/python3 functions/test_functions.py [--inputs DIR] [NAME...]

For each function: import its __main__.py (module-level imports and set-up run, as in a sandbox),
call main() with the manifest's default params and check expect_keys and the exact expected values,
call it again (a warm call must give the same deterministic values), and call it with bad_params,
which must return {"error": ...}. The inputs come from DIR (default $MEDES_INPUTS or
/opt/medes/inputs); if DIR has no inputs, they are generated into a temporary directory first.
Prints one line per check and "N passed, N failed"; exits non-zero on any failure.
"""

import argparse
import importlib.util
import math
import os
import sys
import tempfile
import tomllib

HERE = os.path.dirname(os.path.abspath(__file__))
VOLATILE = {"elapsed_ms", "now"}


def same(want, got):
    """Deep equality with a relative tolerance of 1e-6 on floats."""
    if isinstance(want, bool) or isinstance(got, bool):
        return want is got
    if isinstance(want, (int, float)) and isinstance(got, (int, float)):
        return math.isclose(want, got, rel_tol=1e-6, abs_tol=1e-9)
    if isinstance(want, dict) and isinstance(got, dict):
        return want.keys() == got.keys() and all(same(want[k], got[k]) for k in want)
    if isinstance(want, list) and isinstance(got, list):
        return len(want) == len(got) and all(same(a, b) for a, b in zip(want, got))
    return want == got


def check_result(spec, result):
    """Returns a list of problems (empty when the result passes the manifest's check)."""
    if not isinstance(result, dict):
        return [f"result is {type(result).__name__}, not a dict"]
    if "error" in result:
        return [f"returned error: {result['error']}"]
    problems = [f"missing key {k!r}" for k in spec.get("expect_keys", []) if k not in result]
    for k, want in spec.get("expect", {}).items():
        if not same(want, result.get(k)):
            problems.append(f"{k}: expected {want!r}, got {result.get(k)!r}")
    return problems


def load(name, spec):
    path = os.path.join(HERE, spec.get("file", name), "__main__.py")
    mspec = importlib.util.spec_from_file_location(f"medes_action_{name}", path)
    mod = importlib.util.module_from_spec(mspec)
    mspec.loader.exec_module(mod)
    return mod


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--inputs", default=os.environ.get("MEDES_INPUTS", "/opt/medes/inputs"))
    ap.add_argument("names", nargs="*")
    a = ap.parse_args(argv)
    with open(os.path.join(HERE, "manifest.toml"), "rb") as f:
        manifest = tomllib.load(f)["functions"]
    names = a.names or list(manifest)
    unknown = [n for n in names if n not in manifest]
    if unknown:
        print(f"unknown functions: {unknown}", file=sys.stderr)
        return 2
    inputs = a.inputs
    if not os.path.isfile(os.path.join(inputs, "inputs.json")):
        sys.path.insert(0, HERE)
        import setup_inputs

        inputs = os.path.join(tempfile.mkdtemp(prefix="medes-inputs-"), "inputs")
        setup_inputs.main(["--out", inputs])
    # The actions read MEDES_INPUTS at import time.
    os.environ["MEDES_INPUTS"] = inputs
    passed = failed = 0

    def report(ok, what, detail=""):
        nonlocal passed, failed
        passed, failed = passed + ok, failed + (not ok)
        print(f"{'ok  ' if ok else 'FAIL'} {what}{': ' + detail if detail else ''}", flush=True)

    for name in names:
        spec = manifest[name]
        try:
            mod = load(name, spec)
        except Exception as e:  # noqa: BLE001 - any import failure is a test failure
            report(False, f"{name} import", repr(e))
            continue
        params = dict(spec.get("params", {}))
        first = mod.main(dict(params))
        problems = check_result(spec, first)
        report(not problems, f"{name} default input", "; ".join(problems))
        second = mod.main(dict(params))
        stable = isinstance(first, dict) and isinstance(second, dict)
        stable = stable and all(same(v, second.get(k)) for k, v in first.items() if k not in VOLATILE)
        report(stable, f"{name} warm call gives the same result")
        if "bad_params" in spec:
            bad = mod.main(dict(spec["bad_params"]))
            ok = isinstance(bad, dict) and isinstance(bad.get("error"), str)
            report(ok, f"{name} bad params rejected", "" if ok else repr(bad))
        missing = mod.main({"input_dir": "/nonexistent-medes-inputs"}) if name in NEEDS_INPUTS else None
        if missing is not None:
            ok = isinstance(missing, dict) and isinstance(missing.get("error"), str)
            report(ok, f"{name} missing input reported", "" if ok else repr(missing))
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


NEEDS_INPUTS = {"imagepro", "videopro", "mapreduce", "featuregen", "modelserve", "modeltrain"}

if __name__ == "__main__":
    sys.exit(main())
