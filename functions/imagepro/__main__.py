"""imagepro: flip, rotate, resize and filter an image with Pillow, return a digest (FunctionBench image_processing)."""

import os

# One invocation at a time per sandbox: no BLAS/OpenMP thread pools (they only contend for the
# node's cores and, under load, spin). Must be set before numpy is imported.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import hashlib
import time

import numpy as np
from PIL import Image, ImageFilter, ImageOps

INPUTS = os.environ.get("MEDES_INPUTS", "/opt/medes/inputs")


def main(args):
    path = args.get("image", os.path.join(args.get("input_dir", INPUTS), "image.png"))
    size = args.get("size", 256)
    if not isinstance(path, str):
        return {"error": "image must be a path"}
    if not isinstance(size, int) or isinstance(size, bool) or not 8 <= size <= 4096:
        return {"error": "size must be an integer in [8, 4096]"}
    t0 = time.perf_counter()
    try:
        with Image.open(path) as im:
            im.load()
    except (OSError, ValueError) as e:
        return {"error": f"cannot read image {path}: {e}"}
    im = im.convert("RGB")
    digests = hashlib.sha256()
    steps = [
        ImageOps.mirror(im),
        ImageOps.flip(im),
        im.rotate(90, expand=True),
        im.rotate(30, resample=Image.Resampling.BILINEAR),
        im.resize((size, size), Image.Resampling.BICUBIC),
        im.filter(ImageFilter.GaussianBlur(2)),
        im.filter(ImageFilter.FIND_EDGES),
        ImageOps.grayscale(im),
    ]
    for out in steps:
        digests.update(out.tobytes())
    thumb = np.asarray(steps[4], dtype=np.float64)
    # Write the resized image to /tmp as FunctionBench does (inputs are read-only).
    out_path = os.path.join("/tmp", f"imagepro-{os.getpid()}.png")
    steps[4].save(out_path)
    out_bytes = os.path.getsize(out_path)
    os.unlink(out_path)
    return {
        "width": im.width,
        "height": im.height,
        "ops": len(steps),
        "digest": digests.hexdigest(),
        "mean": round(float(thumb.mean()), 4),
        "out_bytes": out_bytes,
        "elapsed_ms": round((time.perf_counter() - t0) * 1e3, 3),
    }
