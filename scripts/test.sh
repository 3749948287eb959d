#!/usr/bin/env bash
# The whole test suite: set up everything it needs, type-check, then run it. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
# the type checker first ([tool.mypy] in pyproject.toml: strict on proctor/ and cluster/runtimes/);
# an error in it fails the run before any test
.venv/bin/python -m mypy
exec .venv/bin/python -m pytest "$@"
