#!/usr/bin/env python3
"""Checkpoints and restores a warm action with CRIU and checks it still answers (root only).

    /opt/medes/venv/bin/python3 functions/criu_check.py [--inputs DIR] [NAME...]   (default: mapreduce)

For each action: start a host process in its own PID namespace (`unshare --pid --fork` +
`setsid`, no terminal, stdio on /dev/null) that imports the action and calls main() once (for
mapreduce this creates the worker pool), then serves requests through files in a scratch
directory; `criu dump` it (the tree is killed), `criu restore -d` it, send another request and
compare the deterministic fields with the first result. Prints `N passed, N failed`.
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib

HERE = os.path.dirname(os.path.abspath(__file__))
VOLATILE = {"elapsed_ms", "now"}

SERVER = r"""
import importlib.util, json, os, sys, time
name, path, params, work = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
spec = importlib.util.spec_from_file_location("medes_action_" + name, path)
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
n = 0
while True:
    req = os.path.join(work, f"req{n}")
    if os.path.exists(req):
        res = mod.main(dict(params))
        tmp = os.path.join(work, f".resp{n}")
        with open(tmp, "w") as f:
            json.dump({"result": res, "pid": os.getpid(), "children": len(os.listdir(f"/proc/{os.getpid()}/task"))}, f)
        os.rename(tmp, os.path.join(work, f"resp{n}"))
        n += 1
    time.sleep(0.02)
"""


def request(work, n, timeout=60):
    open(os.path.join(work, f"req{n}"), "w").close()
    resp = os.path.join(work, f"resp{n}")
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(resp):
            with open(resp) as f:
                return json.load(f)
        time.sleep(0.02)
    raise TimeoutError(f"no response {n} within {timeout} s")


def ns_init_pid(unshare_pid):
    """The PID (host view) of unshare's child, the namespace's init."""
    for _ in range(200):
        try:
            with open(f"/proc/{unshare_pid}/task/{unshare_pid}/children") as f:
                kids = f.read().split()
            if kids:
                return int(kids[0])
        except OSError:
            pass
        time.sleep(0.01)
    raise RuntimeError("namespace init not found")


def descendants(pid):
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/task/{p}/children") as f:
                kids = [int(k) for k in f.read().split()]
        except OSError:
            kids = []
        out += kids
        todo += kids
    return out


def check(name, spec, inputs, criu):
    work = tempfile.mkdtemp(prefix=f"medes-criu-{name}-")
    images = os.path.join(work, "images")
    os.mkdir(images)
    path = os.path.join(HERE, spec.get("file", name), "__main__.py")
    env = dict(os.environ, MEDES_INPUTS=inputs)
    devnull = subprocess.DEVNULL
    cmd = ["unshare", "--pid", "--fork", "setsid", sys.executable, "-c", SERVER, name, path,
           json.dumps(spec.get("params", {})), work]
    launcher = subprocess.Popen(cmd, stdin=devnull, stdout=devnull, stderr=devnull, env=env)
    restored = None
    try:
        init = ns_init_pid(launcher.pid)
        first = request(work, 0)
        procs_before = 1 + len(descendants(init))
        t0 = time.time()
        dump = subprocess.run([criu, "dump", "-t", str(init), "-D", images, "-o", "dump.log"],
                              capture_output=True, text=True, timeout=120)
        dump_ms = (time.time() - t0) * 1e3
        if dump.returncode != 0:
            return False, f"criu dump failed: {tail(images, 'dump.log')}"
        launcher.wait(timeout=10)
        pages = sum(os.path.getsize(os.path.join(images, f)) for f in os.listdir(images) if f.startswith("pages-"))
        t0 = time.time()
        rest = subprocess.run([criu, "restore", "-d", "-D", images, "-o", "restore.log", "--pidfile",
                               os.path.join(work, "restored.pid")], capture_output=True, text=True, timeout=120)
        restore_ms = (time.time() - t0) * 1e3
        if rest.returncode != 0:
            return False, f"criu restore failed: {tail(images, 'restore.log')}"
        with open(os.path.join(work, "restored.pid")) as f:
            restored = int(f.read().strip())
        second = request(work, 1)
        procs_after = 1 + len(descendants(restored))
        a = {k: v for k, v in first["result"].items() if k not in VOLATILE}
        b = {k: v for k, v in second["result"].items() if k not in VOLATILE}
        if "error" in b or a != b:
            return False, f"restored result differs: {b} vs {a}"
        if procs_after != procs_before:
            return False, f"process count changed: {procs_before} -> {procs_after}"
        return True, (f"{procs_before} processes, page images {pages / 1e6:.1f} MB, "
                      f"dump {dump_ms:.0f} ms, restore {restore_ms:.0f} ms")
    finally:
        for pid in [restored] if restored else []:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        if launcher.poll() is None:
            launcher.kill()
        launcher.wait()
        shutil.rmtree(work, ignore_errors=True)


def tail(images, log):
    try:
        with open(os.path.join(images, log)) as f:
            return " | ".join(l.strip() for l in f.readlines()[-5:])
    except OSError:
        return "(no log)"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--inputs", default=os.environ.get("MEDES_INPUTS", "/opt/medes/inputs"))
    ap.add_argument("--criu", default="criu")
    ap.add_argument("names", nargs="*")
    a = ap.parse_args(argv)
    with open(os.path.join(HERE, "manifest.toml"), "rb") as f:
        manifest = tomllib.load(f)["functions"]
    passed = failed = 0
    for name in a.names or ["mapreduce"]:
        ok, detail = check(name, manifest[name], a.inputs, a.criu)
        passed, failed = passed + ok, failed + (not ok)
        print(f"{'ok  ' if ok else 'FAIL'} {name} survives checkpoint/restore: {detail}", flush=True)
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
