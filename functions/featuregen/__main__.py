"""featuregen: TF-IDF features of a text corpus, preprocessed with pandas (FunctionBench feature_generation)."""

import os

# One invocation at a time per sandbox: no BLAS/OpenMP thread pools (they only contend for the
# node's cores and, under load, spin). Must be set before numpy is imported.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import time

import numpy as np
import pandas as pd
from sklearn.feature_extraction.text import TfidfVectorizer

INPUTS = os.environ.get("MEDES_INPUTS", "/opt/medes/inputs")


def main(args):
    path = args.get("dataset", os.path.join(args.get("input_dir", INPUTS), "reviews.csv"))
    max_features = args.get("max_features", 2000)
    top = args.get("top", 5)
    if not isinstance(path, str):
        return {"error": "dataset must be a path"}
    if not isinstance(max_features, int) or isinstance(max_features, bool) or not 1 <= max_features <= 1_000_000:
        return {"error": "max_features must be an integer in [1, 1000000]"}
    if not isinstance(top, int) or isinstance(top, bool) or not 0 <= top <= 100:
        return {"error": "top must be an integer in [0, 100]"}
    t0 = time.perf_counter()
    try:
        df = pd.read_csv(path)
    except (OSError, ValueError) as e:
        return {"error": f"cannot read {path}: {e}"}
    if "text" not in df.columns:
        return {"error": f"{path} has no 'text' column"}
    df = df.dropna(subset=["text"])
    df["clean"] = df["text"].astype(str).str.lower().str.replace(r"[^a-z ]+", " ", regex=True).str.strip()
    df["n_words"] = df["clean"].str.split().str.len()
    vec = TfidfVectorizer(max_features=max_features)
    x = vec.fit_transform(df["clean"])
    mean = np.asarray(x.mean(axis=0)).ravel()
    names = vec.get_feature_names_out()
    order = np.lexsort((names, -np.round(mean, 9)))[:top]
    return {
        "docs": int(x.shape[0]),
        "features": int(x.shape[1]),
        "nnz": int(x.nnz),
        "mean_words": round(float(df["n_words"].mean()), 4),
        "top_terms": [str(names[i]) for i in order],
        "elapsed_ms": round((time.perf_counter() - t0) * 1e3, 3),
    }
