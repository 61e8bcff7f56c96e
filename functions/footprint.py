#!/usr/bin/env python3
"""Measures each action's memory outside the platform: a fresh python process imports the action,
runs main() once with the manifest's default params, then reports Rss and Pss (from
/proc/PID/smaps_rollup) of itself plus its child processes (mapreduce's pool workers).

    /opt/medes/venv/bin/python3 functions/footprint.py [--inputs DIR] [NAME...]

Prints a table next to the paper's Table 2 numbers; `--json` prints JSON instead.
"""

import argparse
import json
import os
import subprocess
import sys
import tomllib

HERE = os.path.dirname(os.path.abspath(__file__))

CHILD = r"""
import importlib.util, json, os, sys
name, path, params = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
spec = importlib.util.spec_from_file_location("medes_action_" + name, path)
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
res = mod.main(params)
def rollup(pid):
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if parts[0] in ("Rss:", "Pss:", "Private_Dirty:", "Anonymous:"):
                out[parts[0][:-1]] = int(parts[1]) * 1024
    return out
pids = [os.getpid()]
try:
    with open(f"/proc/{os.getpid()}/task/{os.getpid()}/children") as f:
        pids += [int(p) for p in f.read().split()]
except OSError:
    pass
tot = {}
for p in pids:
    for k, v in rollup(p).items():
        tot[k] = tot.get(k, 0) + v
print(json.dumps({"processes": len(pids), "ok": "error" not in res, **tot}))
"""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--inputs", default=os.environ.get("MEDES_INPUTS", "/opt/medes/inputs"))
    ap.add_argument("--json", action="store_true")
    ap.add_argument("names", nargs="*")
    a = ap.parse_args(argv)
    with open(os.path.join(HERE, "manifest.toml"), "rb") as f:
        manifest = tomllib.load(f)["functions"]
    rows = []
    for name in a.names or list(manifest):
        spec = manifest[name]
        path = os.path.join(HERE, spec.get("file", name), "__main__.py")
        env = dict(os.environ, MEDES_INPUTS=a.inputs)
        out = subprocess.run(
            [sys.executable, "-c", CHILD, name, path, json.dumps(spec.get("params", {}))],
            env=env, capture_output=True, text=True, check=False,
        )
        if out.returncode != 0:
            rows.append({"name": name, "error": out.stderr.strip().splitlines()[-1:]})
            continue
        m = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append({"name": name, "paper_mb": spec.get("paper_mb"), **m})
    if a.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'function':<11} {'procs':>5} {'RSS MB':>8} {'PSS MB':>8} {'anon MB':>8} {'paper MB':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r['name']:<11} error: {r['error']}")
            continue
        print(f"{r['name']:<11} {r['processes']:>5} {r['Rss'] / 1e6:>8.1f} {r['Pss'] / 1e6:>8.1f} "
              f"{r.get('Anonymous', 0) / 1e6:>8.1f} {r['paper_mb']:>8}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
