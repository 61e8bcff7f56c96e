"""modelserve: serve a character-level LSTM text classifier with onnxruntime (FunctionBench rnn_serving).

The model (embedding + LSTM(256) + dense + softmax) is built by setup_inputs.py with the `onnx`
package and loaded once, when the action is loaded; each invocation only runs inference.
"""

import os

# One invocation at a time per sandbox: no BLAS/OpenMP thread pools (they only contend for the
# node's cores and, under load, spin). Must be set before numpy is imported.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
# onnxruntime >= 1.2x otherwise keeps a SQLite telemetry cache (~/.cache/Microsoft/DeveloperTools)
# open with POSIX locks held, which makes the warm sandbox impossible to checkpoint with CRIU.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

import json
import time

import numpy as np
import onnxruntime as ort

INPUTS = os.environ.get("MEDES_INPUTS", "/opt/medes/inputs")
_MODELS = {}


def _load(input_dir):
    m = _MODELS.get(input_dir)
    if m is None:
        with open(os.path.join(input_dir, "rnn_vocab.json")) as f:
            vocab = json.load(f)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        sess = ort.InferenceSession(os.path.join(input_dir, "rnn.onnx"), opts, providers=["CPUExecutionProvider"])
        index = {c: i + 1 for i, c in enumerate(vocab["alphabet"])}
        m = _MODELS[input_dir] = (sess, index, vocab["classes"])
    return m


try:
    _load(INPUTS)
except (OSError, ValueError, ort.capi.onnxruntime_pybind11_state.Fail):
    pass  # reported per request, with the path, by main()


def main(args):
    text = args.get("text", "the quick brown fox jumps over the lazy dog, then serves a model!")
    input_dir = args.get("input_dir", INPUTS)
    if not isinstance(text, str) or not 1 <= len(text) <= 10_000:
        return {"error": "text must be a string of 1 to 10000 characters"}
    if not isinstance(input_dir, str):
        return {"error": "input_dir must be a path"}
    try:
        sess, index, classes = _load(input_dir)
    except (OSError, ValueError, ort.capi.onnxruntime_pybind11_state.Fail) as e:
        return {"error": f"cannot load model from {input_dir}: {e}"}
    t0 = time.perf_counter()
    ids = np.array([[index.get(c, 0)] for c in text.lower()], dtype=np.int64)
    (probs,) = sess.run(["probs"], {"ids": ids})
    p = probs[0].astype(np.float64)
    k = int(np.argmax(p))
    return {
        "label": classes[k],
        "probs": {c: round(float(v), 4) for c, v in zip(classes, p)},
        "chars": len(text),
        "elapsed_ms": round((time.perf_counter() - t0) * 1e3, 3),
    }
