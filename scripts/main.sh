#!/usr/bin/env bash
# The main job on the embedded default: set up, then run the examples in gVisor sandboxes
# and print their results tables and where their Parquet files are.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/proctor run examples/arithmetic.yaml examples/agentic-files.yaml "$@"
