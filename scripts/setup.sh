#!/usr/bin/env bash
# Set-up for a fresh Debian 12 machine, run as root; quick and harmless when already done.
#   scripts/setup.sh          the platform: gVisor (runsc), bubblewrap, .venv with Proctor
#   scripts/setup.sh --test   and what the tests need on top
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
packages=(runsc bubblewrap python3 python3-venv procps util-linux)
if [[ "${1:-}" == "--test" ]]; then
  extras="[test]"
  packages+=(postgresql chromium)
fi

missing=()
for pkg in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  echo "setup: installing Debian packages: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

python=$(command -v python3)
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "setup: Python 3.11 or newer is needed; $python is $("$python" --version)" >&2
  exit 1
fi
if [[ ! -x .venv/bin/python ]]; then
  echo "setup: creating .venv with $("$python" --version)"
  "$python" -m venv .venv
fi

stamp=".venv/.proctor-installed${extras}"
if [[ ! -f "$stamp" || pyproject.toml -nt "$stamp" ]]; then
  echo "setup: installing Proctor${extras} into .venv (the first time takes a few minutes)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".${extras}"
  touch "$stamp"
fi
