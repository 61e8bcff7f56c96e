#!/usr/bin/env bash
# Installs everything a fresh Debian 12 machine lacks to build, run and test medes.
# Idempotent: a second run checks and returns in a few seconds.
#   - CRIU 4.1 (+ crit/pycriu) from Debian 13, pinned low (Debian 12's CRIU 3.17 fails on this kernel)
#   - system tools the sandboxes need (iproute2, nftables for outbound NAT, util-linux)
#   - redis-server (tests of the registry's Redis backend start their own servers)
#   - a Python venv with the runtime's and the functions' packages (MEDES_VENV, default /opt/medes/venv)
set -euo pipefail
[ "$(id -u)" = 0 ] || { echo "setup.sh must run as root" >&2; exit 1; }
export DEBIAN_FRONTEND=noninteractive
VENV=${MEDES_VENV:-/opt/medes/venv}
here=$(cd "$(dirname "$0")/.." && pwd)

need_apt=()
criu_ok() { command -v criu >/dev/null && criu --version 2>/dev/null | grep -Eq 'Version: 4\.' && command -v crit >/dev/null; }
if ! criu_ok; then
  uri=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  [ -n "$uri" ] || uri=http://deb.debian.org/debian
  echo "deb $uri trixie main" > /etc/apt/sources.list.d/trixie.list
  printf 'Package: *\nPin: release n=trixie\nPin-Priority: 100\n' > /etc/apt/preferences.d/trixie-low
  apt-get update -qq
  apt-get install -y -qq -t trixie criu python3-pycriu nftables >/dev/null
fi
# python3-pycriu brings trixie's python3 (3.13); its venv and pip wheel must come from trixie too.
if ! /usr/bin/python3 -c 'import ensurepip, venv' 2>/dev/null || ! dpkg -s python3-venv >/dev/null 2>&1 \
   || [ "$(dpkg-query -W -f='${Version}' python3-pip-whl 2>/dev/null | cut -d. -f1)" -lt 24 ] 2>/dev/null; then
  apt-get update -qq
  apt-get install -y -qq -t trixie python3-venv python3-pip-whl python3-dev >/dev/null
fi
# nftables comes from trixie with CRIU (CRIU pulls trixie's libnftables1)
command -v nft >/dev/null || apt-get install -y -qq -t trixie nftables >/dev/null
# redis-server: the registry's Redis backend is tested against a real server (issue 7)
for pkg in iproute2 util-linux procps redis-server; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need_apt+=("$pkg")
done
if [ ${#need_apt[@]} -gt 0 ]; then
  apt-get update -qq
  apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

# Python venv for the runtime and the ten functions, built on Debian's python3 (readable by the
# unprivileged sandbox user, unlike a pyenv under /root). Debian's python3 is 3.13 after CRIU.
reqs="$here/functions/requirements.txt"
stamp="$VENV/.medes-requirements"
if [ ! -x "$VENV/bin/python3" ]; then
  mkdir -p "$(dirname "$VENV")"
  /usr/bin/python3 -m venv "$VENV"
fi
if [ -f "$reqs" ] && ! cmp -s "$reqs" "$stamp"; then
  "$VENV/bin/pip" install -q --disable-pip-version-check -r "$reqs"
  cp "$reqs" "$stamp"
fi
chmod -R a+rX "$VENV"

# Generated function inputs (deterministic from a seed; nothing downloaded at run time).
if [ -x "$here/functions/setup_inputs.py" ] || [ -f "$here/functions/setup_inputs.py" ]; then
  "$VENV/bin/python3" "$here/functions/setup_inputs.py" --out "${MEDES_INPUTS:-/opt/medes/inputs}"
  chmod -R a+rX "${MEDES_INPUTS:-/opt/medes/inputs}"
fi
criu check >/dev/null 2>&1 || { echo "warning: criu check failed" >&2; }
echo "setup: ok (criu $(criu --version | awk '/Version/{print $2}'), venv $VENV)"
