#!/usr/bin/env bash
# Produce real CRIU dumps of warmed Python "functions" for medes-dedup measurements.
#
# usage: scripts/make-dumps.sh OUT_DIR [N_PER_FUNCTION] [--no-aslr] [FUNCTIONS...]
#
# Each sandbox is `unshare -pf setsid python3 -c CODE` (PID 1 of its own PID namespace and a
# session leader, stdio on /dev/null, no terminal), cold-started independently, warmed with one
# invocation, then dumped with `criu dump` into OUT_DIR/<function>-<i>/ (the process is killed by
# the dump). With --no-aslr the runtime is started under `setarch -R` and PYTHONHASHSEED=0
# (like-for-like with the paper). Inputs are deterministic (seeded), like functions/. Needs root
# and CRIU. Put OUT_DIR on tmpfs (/dev/shm).
set -euo pipefail

OUT=${1:?usage: make-dumps.sh OUT_DIR [N] [--no-aslr] [FUNCTIONS...]}
N=${2:-3}
shift || true
shift || true
ASLR=on
if [[ ${1:-} == --no-aslr ]]; then
    ASLR=off
    shift
fi
PY=${MEDES_PYTHON:-/opt/medes/venv/bin/python3}
FUNCS=("$@")
if [[ ${#FUNCS[@]} -eq 0 ]]; then
    FUNCS=(json numpy pillow sklearn)
fi

code_for() {
    case "$1" in
    json) echo 'import json
d = {"k%d" % i: [i, str(i), {"x": i * 1.5}] for i in range(2000)}
s = json.dumps(d); json.loads(s)' ;;
    numpy) echo 'import numpy as np
a = np.random.default_rng(0).random((256, 256)); b = a @ a.T; np.linalg.svd(b[:64, :64])' ;;
    pillow) echo 'import numpy as np
from PIL import Image, ImageFilter
img = Image.fromarray((np.random.default_rng(0).random((256, 256, 3)) * 255).astype("uint8"))
img = img.filter(ImageFilter.BLUR).resize((128, 128)).rotate(30)' ;;
    sklearn) echo 'import pandas as pd
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
docs = ["doc %d about topic %d and words %s" % (i, i % 7, "w" * (i % 13)) for i in range(400)]
df = pd.DataFrame({"text": docs, "y": [i % 2 for i in range(400)]})
X = TfidfVectorizer().fit_transform(df.text)
LogisticRegression(max_iter=50).fit(X, df.y)' ;;
    *) echo "unknown function $1" >&2; exit 2 ;;
    esac
}

mkdir -p "$OUT"
for f in "${FUNCS[@]}"; do
    body=$(code_for "$f")
    for ((i = 0; i < N; i++)); do
        dir="$OUT/$f-$i"
        rm -rf "$dir"
        mkdir -p "$dir"
        ready="$OUT/.ready-$f-$i"
        rm -f "$ready"
        script="$body
open(\"$ready\", \"w\").close()
import time
while True:
    time.sleep(3600)"
        if [[ $ASLR == off ]]; then
            PYTHONHASHSEED=0 unshare -pf setsid setarch -R "$PY" -c "$script" </dev/null >/dev/null 2>&1 &
        else
            unshare -pf setsid "$PY" -c "$script" </dev/null >/dev/null 2>&1 &
        fi
        launcher=$!
        for ((t = 0; t < 300; t++)); do
            [[ -e $ready ]] && break
            sleep 0.05
        done
        [[ -e $ready ]] || { echo "sandbox $f-$i did not get ready" >&2; kill "$launcher"; exit 1; }
        rm -f "$ready"
        pid=$(pgrep -P "$launcher" | head -1)
        timeout -s KILL 60 criu dump -t "$pid" -D "$dir" -o dump.log -v1
        wait "$launcher" 2>/dev/null || true
        echo "$dir: $(du -sh "$dir"/pages-*.img | awk '{print $1}' | paste -sd+)"
    done
done
