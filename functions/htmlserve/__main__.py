"""htmlserve: render an HTML table from a chameleon template (FunctionBench chameleon)."""

import hashlib
import json
import random
import time

from chameleon import PageTemplate

TEMPLATE = PageTemplate(
    """<!DOCTYPE html>
<html>
<head><title>${title}</title></head>
<body>
<h1>${title}</h1>
<table border="1">
  <tr><th tal:repeat="c columns">${c}</th></tr>
  <tr tal:repeat="row rows"><td tal:repeat="cell row">${cell}</td></tr>
</table>
<p>${len(rows)} rows; meta: ${meta}</p>
</body>
</html>"""
)


def main(args):
    rows = args.get("rows", 200)
    cols = args.get("cols", 10)
    seed = args.get("seed", 7)
    title = args.get("title", "medes htmlserve")
    for name, v, hi in (("rows", rows, 100_000), ("cols", cols, 100)):
        if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= hi:
            return {"error": f"{name} must be an integer in [1, {hi}]"}
    if not isinstance(seed, int) or isinstance(seed, bool):
        return {"error": "seed must be an integer"}
    if not isinstance(title, str) or len(title) > 200:
        return {"error": "title must be a string of at most 200 characters"}
    t0 = time.perf_counter()
    rng = random.Random(seed)
    columns = [f"col{j}" for j in range(cols)]
    data = [[f"{rng.random():.6f}" if j % 2 else rng.choice(["<a&b>", "x", "y", "z"]) + str(i) for j in range(cols)] for i in range(rows)]
    meta = json.dumps({"rows": rows, "cols": cols, "seed": seed}, sort_keys=True)
    html = TEMPLATE(title=title, columns=columns, rows=data, meta=meta)
    body = html.encode("utf-8")
    return {
        "bytes": len(body),
        "digest": hashlib.sha256(body).hexdigest(),
        "escaped": "&lt;a&amp;b&gt;" in html,
        "elapsed_ms": round((time.perf_counter() - t0) * 1e3, 3),
    }
