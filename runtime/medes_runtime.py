"""medes' Python action runtime (OpenWhisk action semantics, stdlib only).

Runs as PID 1 of a medes sandbox. The agent hands over a listening Unix stream socket as fd 3
(``MEDES_LISTEN_FD``); one request per connection: the agent writes one JSON object and shuts down
its write side, the runtime answers with one JSON object on one line and closes the connection.

Operations (field ``op``):
  ping                     -> {"ok": true, "pid": ...}
  init   {main}            -> {"ok", "error", "logs", "init_ms"}
  run    {value, env}      -> {"result", "error", "logs", "main_ms"}
  reseed {seed}            -> {"ok": true}   (after a CRIU restore: fresh randomness per copy)

Output of the action (fds 1 and 2, so C extensions and child processes too) goes through pipes
read by two threads; each line is time-stamped. At the end of an init or run a marker is written to
both pipes and the request waits until both readers have passed it, so every line printed before
``main`` returned belongs to that activation.
"""

import json
import os
import socket
import sys
import threading
import time
import traceback
import warnings

ACTION_DIR = "/action"
LISTEN_FD = int(os.environ.pop("MEDES_LISTEN_FD", "3"))
MAX_REQUEST = 64 * 1024 * 1024
LOG_CAP = 10 * 1024 * 1024  # OpenWhisk's default log limit (10 MB)

# Forking a process that has threads (ours: log readers, connection handlers) is what
# multiprocessing does on Linux; the warning would land in every activation's logs.
warnings.filterwarnings("ignore", message=r".*use of fork\(\) may lead to deadlocks.*")


class LogCapture:
    """Time-stamped lines from fds 1 and 2, with per-request end markers."""

    def __init__(self):
        self.lock = threading.Lock()
        self.lines = []  # (ms, "stdout"|"stderr", text)
        self.base = 0  # absolute index of lines[0]
        self.active = 0  # requests currently collecting
        self.pending = {}  # marker bytes -> [event, streams seen]
        self.counter = 0
        self.bytes = 0  # text bytes held in lines
        self.truncated = False
        for fd, name in ((1, "stdout"), (2, "stderr")):
            r, w = os.pipe()
            os.dup2(w, fd)
            os.close(w)
            threading.Thread(target=self._reader, args=(r, name), daemon=True,
                             name="medes-" + name).start()
        sys.stdout = open(1, "w", buffering=1, encoding="utf-8", errors="backslashreplace",
                          closefd=False)
        sys.stderr = open(2, "w", buffering=1, encoding="utf-8", errors="backslashreplace",
                          closefd=False)

    def _reader(self, fd, name):
        buf = b""
        while True:
            try:
                chunk = os.read(fd, 65536)
            except InterruptedError:
                continue
            if not chunk:
                return
            buf += chunk
            while True:
                nl = buf.find(b"\n")
                if nl < 0:
                    break
                line, buf = buf[:nl], buf[nl + 1:]
                self._line(line, name)

    def _line(self, line, name):
        marker = None
        z = line.find(b"\x00MEDES-END-")
        if z >= 0:
            marker, line = line[z:], line[:z]
        now = time.time_ns() // 1_000_000
        with self.lock:
            # Output while no request runs belongs to no activation; past the cap it is dropped.
            if (line or marker is None) and self.active:
                if self.bytes < LOG_CAP:
                    self.bytes += len(line)
                    self.lines.append((now, name, line.decode("utf-8", "backslashreplace")))
                else:
                    self.truncated = True
            if marker is not None:
                entry = self.pending.get(marker)
                if entry is not None:
                    entry[1] += 1
                    if entry[1] == 2:
                        entry[0].set()

    def begin(self):
        with self.lock:
            self.active += 1
            return self.base + len(self.lines)

    def end(self, start):
        """Flushes, waits for both readers to pass this request's marker, returns its lines."""
        for f in (sys.stdout, sys.stderr):
            try:
                f.flush()
            except Exception:
                pass
        with self.lock:
            self.counter += 1
            marker = b"\x00MEDES-END-%d" % self.counter
            ev = threading.Event()
            self.pending[marker] = [ev, 0]
        os.write(1, marker + b"\n")
        os.write(2, marker + b"\n")
        ev.wait(5.0)
        with self.lock:
            del self.pending[marker]
            out = [list(x) for x in self.lines[max(0, start - self.base):]]
            if self.truncated:
                out.append([time.time_ns() // 1_000_000, "stderr",
                            "Logs were truncated because the total bytes size exceeds the limit "
                            "of %d bytes." % LOG_CAP])
            self.active -= 1
            if self.active == 0:
                self.base += len(self.lines)
                self.lines = []
                self.bytes = 0
                self.truncated = False
        return out


class Runtime:
    def __init__(self):
        self.logs = LogCapture()
        self.main = None
        self.init_lock = threading.Lock()

    def ping(self, _req):
        return {"ok": True, "pid": os.getpid()}

    def init(self, req):
        start = self.logs.begin()
        t0 = time.perf_counter()
        error = None
        with self.init_lock:
            if self.main is not None:
                error = "Cannot initialize the action more than once."
            else:
                try:
                    self.main = load_action(req.get("main") or "main")
                except Exception as e:  # noqa: BLE001 - any failure of user code
                    traceback.print_exc()
                    error = "Initialization has failed due to: " + exc_line(e)
        init_ms = (time.perf_counter() - t0) * 1000.0
        return {"ok": error is None, "error": error, "logs": self.logs.end(start),
                "init_ms": init_ms}

    def run(self, req):
        main = self.main
        if main is None:
            return {"result": None, "error": "The action was not initialized.", "logs": [],
                    "main_ms": 0.0}
        for k, v in (req.get("env") or {}).items():
            os.environ[k] = str(v)
        args = req.get("value")
        if not isinstance(args, dict):
            args = {}
        start = self.logs.begin()
        result, error = None, None
        t0 = time.perf_counter()
        try:
            out = main(args)
        except BaseException as e:  # noqa: BLE001 - SystemExit too: the sandbox must survive
            main_ms = (time.perf_counter() - t0) * 1000.0
            traceback.print_exc()
            error = "An error has occurred: " + exc_line(e)
        else:
            main_ms = (time.perf_counter() - t0) * 1000.0
            if isinstance(out, dict):
                try:
                    json.dumps(out)
                    result = out
                except (TypeError, ValueError) as e:
                    error = "The action did not return a dictionary: " + str(e)
            else:
                error = "The action did not return a dictionary."
        return {"result": result, "error": error, "logs": self.logs.end(start),
                "main_ms": main_ms}

    def reseed(self, req):
        seed = bytes.fromhex(req.get("seed") or "") + os.urandom(32)
        import random
        random.seed(seed)
        np = sys.modules.get("numpy")
        if np is not None:
            try:
                np.random.seed(int.from_bytes(seed[:4], "little") ^ int.from_bytes(os.urandom(4), "little"))
            except Exception:
                pass
        ssl = sys.modules.get("ssl")
        if ssl is not None:
            try:
                ssl.RAND_add(seed, float(len(seed)))
            except Exception:
                pass
        tf = sys.modules.get("tempfile")
        if tf is not None:
            tf._name_sequence = None
        return {"ok": True}


def exc_line(e):
    return traceback.format_exception_only(type(e), e)[-1].strip()


def load_action(entry):
    """Loads /action/__main__.py (or the only .py file) as module ``main__``; returns the entry."""
    import importlib.util

    path = os.path.join(ACTION_DIR, "__main__.py")
    if not os.path.exists(path):
        cands = sorted(f for f in os.listdir(ACTION_DIR) if f.endswith(".py"))
        if len(cands) != 1:
            raise FileNotFoundError("no __main__.py in the action")
        path = os.path.join(ACTION_DIR, cands[0])
    if ACTION_DIR not in sys.path:
        sys.path.insert(0, ACTION_DIR)
    # OpenWhisk convention: a zip may carry its dependencies in ./virtualenv.
    venv = os.path.join(ACTION_DIR, "virtualenv")
    if os.path.isdir(venv):
        import glob
        import site
        for sp in glob.glob(os.path.join(venv, "lib", "python3*", "site-packages")):
            site.addsitedir(sp)
    spec = importlib.util.spec_from_file_location("main__", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["main__"] = mod
    spec.loader.exec_module(mod)
    fn = getattr(mod, entry, None)
    if not callable(fn):
        raise NameError("the action has no function named %r" % entry)
    return fn


def recv_all(conn):
    chunks, n = [], 0
    while True:
        b = conn.recv(1 << 16)
        if not b:
            return b"".join(chunks)
        n += len(b)
        if n > MAX_REQUEST:
            raise ValueError("request too large")
        chunks.append(b)


OPEN_CONNS = set()
OPEN_LOCK = threading.Lock()


def _forget_conns_in_child():
    """A child forked during a request (e.g. a multiprocessing pool created in init) must not
    keep the agent's connection open: the agent would wait for EOF, and CRIU would find a
    socket whose peer is gone. The fd numbers stay taken (pointed at /dev/null) so stale socket
    objects cannot close an unrelated fd later."""
    if not OPEN_CONNS:
        return
    null = os.open(os.devnull, os.O_RDWR)
    for fd in list(OPEN_CONNS):
        try:
            os.dup2(null, fd)
        except OSError:
            pass
    os.close(null)
    OPEN_CONNS.clear()


os.register_at_fork(after_in_child=_forget_conns_in_child)


def serve_conn(rt, conn):
    fd = conn.fileno()
    with OPEN_LOCK:
        OPEN_CONNS.add(fd)
    try:
        with conn:
            try:
                req = json.loads(recv_all(conn))
                op = req.get("op")
                handler = {"ping": rt.ping, "init": rt.init, "run": rt.run,
                           "reseed": rt.reseed}.get(op)
                if handler is None:
                    reply = {"protocol_error": "unknown op %r" % (op,)}
                else:
                    reply = handler(req)
            except Exception as e:  # noqa: BLE001
                reply = {"protocol_error": exc_line(e)}
            conn.sendall(json.dumps(reply, separators=(",", ":")).encode() + b"\n")
            with OPEN_LOCK:
                OPEN_CONNS.discard(fd)
    except OSError:
        with OPEN_LOCK:
            OPEN_CONNS.discard(fd)


def main():
    try:
        os.chdir(ACTION_DIR)
    except OSError:
        pass
    rt = Runtime()
    listener = socket.socket(fileno=LISTEN_FD)
    while True:
        try:
            conn, _ = listener.accept()
        except InterruptedError:
            continue
        except OSError:
            time.sleep(0.01)
            continue
        threading.Thread(target=serve_conn, args=(rt, conn), daemon=True).start()


if __name__ == "__main__":
    main()
