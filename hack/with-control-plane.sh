#!/usr/bin/env bash
# Run a command against a fresh local control plane, stopping it afterwards whatever happens.
#   hack/with-control-plane.sh CMD [ARGS...]
# The command sees KUBECONFIG, GPUPOOL_BIN and PATH with kubectl and helm first.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
DIR=${GPUPOOL_STATE:-$PWD/.state}/control-plane-$$
trap '"$HERE/control-plane.sh" stop "$DIR"; rm -rf "$DIR"' EXIT
"$HERE/control-plane.sh" start "$DIR"
# shellcheck disable=SC1091
source "$DIR/env"
"$@"
