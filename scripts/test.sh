#!/usr/bin/env bash
# Runs every test of the project: setup (idempotent), formatting and lint gates, the Rust test suite
# (including the privileged sandbox/CRIU tests: run as root), and the Python function tests.
#   MEDES_SKIP_LINT=1  skips fmt/clippy (for quick local runs)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
"$here/scripts/setup.sh"
if [ "${MEDES_SKIP_LINT:-0}" != 1 ]; then
  echo "== cargo fmt --check"
  cargo fmt --all -- --check
  echo "== cargo clippy -D warnings"
  cargo clippy --workspace --all-targets --quiet -- -D warnings
fi
echo "== python function tests"
if [ -f functions/test_functions.py ]; then
  /opt/medes/venv/bin/python3 functions/test_functions.py
fi
echo "== cargo tests"
# Privileged tests spawn real sandboxes: two test threads keep a 2-core machine responsive.
if command -v cargo-nextest >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast --test-threads 2
else
  cargo test --workspace --no-fail-fast -- --test-threads 2
fi
echo "== all tests passed"
