#!/usr/bin/env bash
# Create (once) or reuse the Python virtualenv holding the *official* provider clients that
# the simulator's fidelity tests run unchanged: the `vastai` CLI and the `runpod` SDK, plus
# pytest and an OpenAPI schema validator. Versions are pinned and spelled in the venv's
# directory name, so changing a pin makes a new venv and never mutates a cached one.
# The venv lives in the machine-local cache next to the control-plane binaries.
# Prints the venv path as the last line of stdout; everything else goes to stderr.
#
# vastai pins cryptography==49.0.0 while runpod needs cryptography>=50, so one environment
# cannot hold both. The CLI gets its own venv nested inside the main one ($VENV/vastai-cli)
# and a symlink $VENV/bin/vastai: the tests run it as a subprocess, as a user would, so it
# never needs to share an interpreter with the runpod SDK.
set -euo pipefail

VASTAI=${VASTAI_VERSION:-1.9.1}
RUNPOD=${RUNPOD_VERSION:-1.12.0}
PYTEST=${PYTEST_VERSION:-9.2.0}
OASV=${OPENAPI_SCHEMA_VALIDATOR_VERSION:-0.9.0}
PYYAML=${PYYAML_VERSION:-6.0.4}
CACHE=${GPUPOOL_TESTBINS:-$HOME/.cache/gpupool-testbins}
VENV=$CACHE/venv-vastai$VASTAI-runpod$RUNPOD-pytest$PYTEST-oasv$OASV
PYTHON=${PYTHON:-python3}

log() { echo "pyclients: $*" >&2; }

# The stamp is written last, so an interrupted install is redone rather than trusted.
if [ ! -f "$VENV/.complete" ]; then
  log "creating $VENV"
  rm -rf "$VENV"
  mkdir -p "$CACHE"
  "$PYTHON" -m venv "$VENV" >&2
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
    "runpod==$RUNPOD" "pytest==$PYTEST" \
    "openapi-schema-validator==$OASV" "PyYAML==$PYYAML" >&2
  "$PYTHON" -m venv "$VENV/vastai-cli" >&2
  "$VENV/vastai-cli/bin/python" -m pip install --quiet --disable-pip-version-check \
    "vastai==$VASTAI" >&2
  ln -sf ../vastai-cli/bin/vastai "$VENV/bin/vastai"
  touch "$VENV/.complete"
fi
echo "$VENV"
