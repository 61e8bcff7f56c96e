#!/usr/bin/env python3
"""Generates the ten functions' inputs deterministically from a seed.

Nothing is downloaded: every input (an image, a short MJPG/AVI video, text corpora, a labelled
dataset and an LSTM text model in ONNX format) is synthesised here with numpy, Pillow, OpenCV and
the `onnx` package, from `--seed` (default 20221). Idempotent: if DIR already holds a stamp for the
same generator version and seed, and every file it lists is present with the recorded size, it
returns at once.

    python3 setup_inputs.py --out /opt/medes/inputs [--seed 20221] [--force]

Layout of DIR (read-only for the functions):
    image.png         512x512 RGB picture (gradients, shapes, noise)          imagepro
    video.avi         80 frames 320x240 @ 20 fps, MJPG                        videopro
    corpus.txt        ~300k words of Zipf-distributed text                    mapreduce
    reviews.csv       3000 labelled documents: id,text,label (4 topics)       featuregen, modeltrain
    rnn.onnx          embedding + LSTM(256) + dense + softmax, 4 classes      modelserve
    rnn_vocab.json    the model's character vocabulary and class names        modelserve
    inputs.json       stamp: generator version, seed, file sizes and sha256
"""

import argparse
import csv
import hashlib
import json
import os
import shutil
import sys
import tempfile

VERSION = 2
DEFAULT_SEED = 20221
TOPICS = ["sports", "finance", "science", "travel"]
# The model's alphabet: id 0 is padding/unknown.
ALPHABET = " abcdefghijklmnopqrstuvwxyz0123456789.,;:!?'-"


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _words(rng, n, min_syll=1, max_syll=3):
    """n distinct pronounceable pseudo-words."""
    cons = "bcdfghjklmnprstvwz"
    vow = "aeiou"
    out, seen = [], set()
    while len(out) < n:
        k = int(rng.integers(min_syll, max_syll + 1))
        w = "".join(cons[rng.integers(len(cons))] + vow[rng.integers(len(vow))] for _ in range(k))
        if rng.random() < 0.3:
            w += cons[rng.integers(len(cons))]
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


def _zipf_probs(n, s=1.07):
    import numpy as np

    p = 1.0 / np.arange(1, n + 1) ** s
    return p / p.sum()


def gen_image(rng, path):
    import numpy as np
    from PIL import Image, ImageDraw

    h = w = 512
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    r = 127 + 127 * np.sin(x / 37.0)
    g = 127 + 127 * np.cos(y / 23.0)
    b = 255 * (x + y) / (w + h)
    img = np.stack([r, g, b], axis=-1)
    img += rng.normal(0, 12, size=img.shape)
    im = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")
    d = ImageDraw.Draw(im)
    for _ in range(40):
        x0, y0 = (int(v) for v in rng.integers(0, 480, size=2))
        x1, y1 = x0 + int(rng.integers(8, 120)), y0 + int(rng.integers(8, 120))
        col = tuple(int(v) for v in rng.integers(0, 256, size=3))
        if rng.random() < 0.5:
            d.ellipse([x0, y0, x1, y1], fill=col)
        else:
            d.rectangle([x0, y0, x1, y1], outline=col, width=3)
    im.save(path, format="PNG")


def gen_video(rng, path):
    import cv2
    import numpy as np

    w, h, n, fps = 320, 240, 80, 20.0
    # OpenCV picks the writer from the extension; write to a temp name ending in .avi.
    vw = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"MJPG"), fps, (w, h))
    if not vw.isOpened():
        raise RuntimeError("opencv cannot open an MJPG/AVI writer")
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base_noise = rng.normal(0, 8, size=(h, w, 3)).astype(np.float32)
    balls = rng.uniform(0, 1, size=(5, 4))
    for i in range(n):
        t = i / n
        frame = np.empty((h, w, 3), np.float32)
        frame[..., 0] = 128 + 100 * np.sin((x + 8 * i) / 29.0)
        frame[..., 1] = 128 + 100 * np.cos((y - 5 * i) / 17.0)
        frame[..., 2] = 255 * t
        frame += base_noise
        frame = np.clip(frame, 0, 255).astype(np.uint8)
        for bx, by, vx, vy in balls:
            cx = int((bx + vx * t) * w) % w
            cy = int((by + vy * t) * h) % h
            cv2.circle(frame, (cx, cy), 18, (255, 255, 255), -1)
        cv2.putText(frame, f"frame {i:03d}", (10, 30), cv2.FONT_HERSHEY_SIMPLEX, 0.8, (0, 0, 0), 2)
        vw.write(frame)
    vw.release()


def gen_corpus(rng, path, n_words=300_000):
    vocab = _words(rng, 5000)
    idx = rng.choice(len(vocab), size=n_words, p=_zipf_probs(len(vocab)))
    with open(path, "w", encoding="utf-8") as f:
        line = []
        for k, i in enumerate(idx):
            line.append(vocab[i])
            if len(line) >= 12 or k == n_words - 1:
                s = " ".join(line)
                f.write(s[0].upper() + s[1:] + ".\n")
                line = []


def gen_reviews(rng, path, n_docs=3000):
    common = _words(rng, 3000)
    topic_words = {t: _words(rng, 80, 2, 4) for t in TOPICS}
    pc = _zipf_probs(len(common))
    pt = _zipf_probs(80, 0.8)
    with open(path, "w", newline="", encoding="utf-8") as f:
        wr = csv.writer(f)
        wr.writerow(["id", "text", "label"])
        for i in range(n_docs):
            label = TOPICS[int(rng.integers(len(TOPICS)))]
            # 8% of documents talk about another topic than their label (label noise).
            topic = TOPICS[int(rng.integers(len(TOPICS)))] if rng.random() < 0.08 else label
            n = int(rng.integers(20, 61))
            words = []
            for _ in range(n):
                if rng.random() < 0.06:
                    words.append(topic_words[topic][rng.choice(80, p=pt)])
                else:
                    words.append(common[rng.choice(len(common), p=pc)])
                if rng.random() < 0.05:
                    words[-1] = words[-1].upper() + "!"
            wr.writerow([i, " ".join(words), label])


def gen_model(rng, path, vocab_path):
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    v, d, hdim, c = len(ALPHABET) + 1, 64, 256, len(TOPICS)
    emb = rng.normal(0, 0.5, size=(v, d)).astype(np.float32)
    wx = rng.normal(0, 1 / np.sqrt(d), size=(1, 4 * hdim, d)).astype(np.float32)
    wr = rng.normal(0, 1 / np.sqrt(hdim), size=(1, 4 * hdim, hdim)).astype(np.float32)
    bias = np.zeros((1, 8 * hdim), np.float32)
    wo = rng.normal(0, 1 / np.sqrt(hdim), size=(hdim, c)).astype(np.float32)
    bo = rng.normal(0, 0.1, size=(c,)).astype(np.float32)
    inits = [
        numpy_helper.from_array(emb, "emb"),
        numpy_helper.from_array(wx, "W"),
        numpy_helper.from_array(wr, "R"),
        numpy_helper.from_array(bias, "B"),
        numpy_helper.from_array(wo, "Wo"),
        numpy_helper.from_array(bo, "Bo"),
        numpy_helper.from_array(np.array([1, hdim], np.int64), "shape_bh"),
    ]
    nodes = [
        # ids: [seq, 1] int64 -> x: [seq, 1, d]
        helper.make_node("Gather", ["emb", "ids"], ["x"], axis=0),
        helper.make_node("LSTM", ["x", "W", "R", "B"], ["Y", "Y_h", "Y_c"], hidden_size=hdim),
        helper.make_node("Reshape", ["Y_h", "shape_bh"], ["h"]),
        helper.make_node("MatMul", ["h", "Wo"], ["logits0"]),
        helper.make_node("Add", ["logits0", "Bo"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "medes_char_lstm",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["seq", 1])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [1, c])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    model.producer_name = "medes-setup-inputs"
    onnx.checker.check_model(model)
    onnx.save(model, path)
    with open(vocab_path, "w") as f:
        json.dump({"alphabet": ALPHABET, "classes": TOPICS, "hidden": hdim, "embed": d}, f, indent=1)


FILES = ["image.png", "video.avi", "corpus.txt", "reviews.csv", "rnn.onnx", "rnn_vocab.json"]


def up_to_date(out, seed):
    try:
        with open(os.path.join(out, "inputs.json")) as f:
            stamp = json.load(f)
    except (OSError, ValueError):
        return False
    if stamp.get("version") != VERSION or stamp.get("seed") != seed:
        return False
    for name in FILES:
        meta = stamp.get("files", {}).get(name)
        p = os.path.join(out, name)
        if not meta or not os.path.isfile(p) or os.path.getsize(p) != meta["size"]:
            return False
    return True


def generate(out, seed):
    import numpy as np

    os.makedirs(out, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".inputs-", dir=out)
    try:
        # One independent stream per input, so changing one generator never changes the others.
        ss = np.random.SeedSequence(seed)
        streams = dict(zip(["image", "video", "corpus", "reviews", "model"], ss.spawn(5)))
        rng = lambda k: np.random.default_rng(streams[k])  # noqa: E731
        gen_image(rng("image"), os.path.join(tmp, "image.png"))
        gen_video(rng("video"), os.path.join(tmp, "video.avi"))
        gen_corpus(rng("corpus"), os.path.join(tmp, "corpus.txt"))
        gen_reviews(rng("reviews"), os.path.join(tmp, "reviews.csv"))
        gen_model(rng("model"), os.path.join(tmp, "rnn.onnx"), os.path.join(tmp, "rnn_vocab.json"))
        files = {}
        for name in FILES:
            p = os.path.join(tmp, name)
            files[name] = {"size": os.path.getsize(p), "sha256": _sha256(p)}
            os.replace(p, os.path.join(out, name))
        stamp = {"version": VERSION, "seed": seed, "files": files}
        with open(os.path.join(tmp, "inputs.json"), "w") as f:
            json.dump(stamp, f, indent=1, sort_keys=True)
        os.replace(os.path.join(tmp, "inputs.json"), os.path.join(out, "inputs.json"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return stamp


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("MEDES_INPUTS", "/opt/medes/inputs"))
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED)
    ap.add_argument("--force", action="store_true", help="regenerate even if up to date")
    a = ap.parse_args(argv)
    if not a.force and up_to_date(a.out, a.seed):
        print(f"setup_inputs: {a.out} up to date (seed {a.seed})")
        return 0
    stamp = generate(a.out, a.seed)
    total = sum(m["size"] for m in stamp["files"].values())
    print(f"setup_inputs: wrote {len(stamp['files'])} files ({total / 1e6:.1f} MB) to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
