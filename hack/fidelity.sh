#!/usr/bin/env bash
# Fidelity of the provider simulator: builds gpupool-sim, prepares (or reuses) the venv with
# the official Python clients (hack/pyclients.sh) and the official Node ones
# (hack/nodeclients.sh), then runs tests/fidelity with pytest: the unchanged `vastai` CLI,
# `runpod` SDK and RunPod MCP server against the simulator, and the simulator's JSON
# validated against the providers' OpenAPI documents in ../shared/api-specs.
# Extra arguments go to pytest (e.g. -k runpod). Exits non-zero when anything fails.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
echo "fidelity: building gpupool-sim" >&2
cargo build --locked -p gpupool-sim --bin gpupool-sim >&2
export GPUPOOL_SIM_BIN=$CARGO_TARGET_DIR/debug/gpupool-sim

VENV=$(hack/pyclients.sh | tail -n 1)
export GPUPOOL_RUNPOD_MCP=${GPUPOOL_RUNPOD_MCP:-$(hack/nodeclients.sh | tail -n 1)}
export GPUPOOL_API_SPECS=${GPUPOOL_API_SPECS:-$PWD/../shared/api-specs}
if [ ! -d "$GPUPOOL_API_SPECS" ]; then
  echo "fidelity: API documents not found at $GPUPOOL_API_SPECS" >&2
  exit 1
fi

# Keep the checkout clean of __pycache__ directories.
export PYTHONDONTWRITEBYTECODE=1
echo "fidelity: running tests/fidelity with $VENV" >&2
exec "$VENV/bin/python" -m pytest -p no:cacheprovider -q tests/fidelity "$@"
