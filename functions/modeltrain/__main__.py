"""modeltrain: train a TF-IDF + logistic regression text classifier, report accuracy (FunctionBench model_training)."""

import os

# One invocation at a time per sandbox: no BLAS/OpenMP thread pools (they only contend for the
# node's cores and, under load, spin). Must be set before numpy is imported.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import csv
import time

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

INPUTS = os.environ.get("MEDES_INPUTS", "/opt/medes/inputs")


def main(args):
    path = args.get("dataset", os.path.join(args.get("input_dir", INPUTS), "reviews.csv"))
    test_size = args.get("test_size", 0.25)
    seed = args.get("seed", 0)
    max_iter = args.get("max_iter", 200)
    if not isinstance(path, str):
        return {"error": "dataset must be a path"}
    if not isinstance(test_size, (int, float)) or isinstance(test_size, bool) or not 0.05 <= test_size <= 0.95:
        return {"error": "test_size must be a number in [0.05, 0.95]"}
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        return {"error": "seed must be a non-negative integer"}
    if not isinstance(max_iter, int) or isinstance(max_iter, bool) or not 1 <= max_iter <= 10_000:
        return {"error": "max_iter must be an integer in [1, 10000]"}
    t0 = time.perf_counter()
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = [(r["text"], r["label"]) for r in csv.DictReader(f)]
    except (OSError, KeyError, UnicodeDecodeError, csv.Error) as e:
        return {"error": f"cannot read {path}: {e}"}
    labels = sorted({y for _, y in rows})
    if len(rows) < 20 or len(labels) < 2:
        return {"error": f"{path} needs at least 20 rows and 2 labels"}
    texts = [t for t, _ in rows]
    y = np.array([labels.index(lab) for _, lab in rows])
    xtr, xte, ytr, yte = train_test_split(texts, y, test_size=test_size, random_state=seed, stratify=y)
    vec = TfidfVectorizer(sublinear_tf=True, ngram_range=(1, 2), min_df=2)
    clf = LogisticRegression(max_iter=max_iter)
    clf.fit(vec.fit_transform(xtr), ytr)
    acc = float((clf.predict(vec.transform(xte)) == yte).mean())
    return {
        "train": len(xtr),
        "test": len(xte),
        "classes": labels,
        "features": len(vec.vocabulary_),
        "accuracy": round(acc, 4),
        "elapsed_ms": round((time.perf_counter() - t0) * 1e3, 3),
    }
