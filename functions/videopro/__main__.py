"""videopro: read a video's frames with OpenCV, grayscale and resize them, write a clip (FunctionBench video_processing)."""

import os

# One invocation at a time per sandbox: no BLAS/OpenMP thread pools (they only contend for the
# node's cores and, under load, spin). Must be set before numpy is imported.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import hashlib
import time

import cv2
import numpy as np

cv2.setNumThreads(1)

INPUTS = os.environ.get("MEDES_INPUTS", "/opt/medes/inputs")


def main(args):
    path = args.get("video", os.path.join(args.get("input_dir", INPUTS), "video.avi"))
    scale = args.get("scale", 0.5)
    max_frames = args.get("max_frames", 1000)
    if not isinstance(path, str):
        return {"error": "video must be a path"}
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not 0.05 <= scale <= 2:
        return {"error": "scale must be a number in [0.05, 2]"}
    if not isinstance(max_frames, int) or isinstance(max_frames, bool) or max_frames < 1:
        return {"error": "max_frames must be a positive integer"}
    if not os.path.isfile(path):
        return {"error": f"no such video: {path}"}
    t0 = time.perf_counter()
    cap = cv2.VideoCapture(path)
    if not cap.isOpened():
        return {"error": f"cannot open video {path}"}
    fps = cap.get(cv2.CAP_PROP_FPS) or 20.0
    out_path = os.path.join("/tmp", f"videopro-{os.getpid()}.avi")
    writer = None
    frames, means, h = 0, [], hashlib.sha256()
    try:
        while frames < max_frames:
            ok, frame = cap.read()
            if not ok:
                break
            gray = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
            small = cv2.resize(gray, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
            edges = cv2.Canny(small, 100, 200)
            if writer is None:
                size = (small.shape[1], small.shape[0])
                writer = cv2.VideoWriter(out_path, cv2.VideoWriter_fourcc(*"MJPG"), fps, size, False)
                if not writer.isOpened():
                    return {"error": "cannot open an MJPG writer"}
            writer.write(small)
            means.append(float(small.mean()))
            h.update(edges.tobytes())
            frames += 1
    finally:
        cap.release()
        if writer is not None:
            writer.release()
    if frames == 0:
        return {"error": f"no frames decoded from {path}"}
    out_bytes = os.path.getsize(out_path) if os.path.exists(out_path) else 0
    if os.path.exists(out_path):
        os.unlink(out_path)
    return {
        "frames": frames,
        "fps": round(float(fps), 3),
        "mean_gray": round(float(np.mean(means)), 3),
        "edges_digest": h.hexdigest(),
        "out_bytes": out_bytes,
        "elapsed_ms": round((time.perf_counter() - t0) * 1e3, 3),
    }
