#!/usr/bin/env bash
# The main job on the embedded default: set up, bring up the local platform (Ray, its
# dashboard and the control plane), run the examples through it in gVisor sandboxes, and
# print their results tables, where their Parquet is, and the URLs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/proctor up
.venv/bin/proctor image build examples/ctf-local/image.yaml   # once; then cached by the recipe's content
.venv/bin/proctor submit examples/arithmetic.yaml examples/agentic-files.yaml examples/ctf-local/ctf.yaml --wait "$@"
# an Inspect task (50 samples, a bash call each in a gVisor sandbox, scripted with mockllm), sharded by the platform
.venv/bin/proctor submit examples/inspect/bash_task.py@square --model mockllm/model -T samples=50 --shard-size 10 --wait
echo
echo "The platform is still up: .venv/bin/proctor submit SPEC --wait to run more, .venv/bin/proctor down to stop it."
