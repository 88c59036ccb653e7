#!/usr/bin/env bash
# Install (once) or reuse the *official* Node clients that the simulator's fidelity tests
# run unchanged: RunPod's MCP server (`@runpod/mcp-server`, which speaks REST v2). The
# version is pinned and spelled in the directory name, so changing the pin makes a new
# directory and never mutates a cached one. It lives in the machine-local cache next to the
# Python clients (hack/pyclients.sh), outside the checkout.
# Prints the install directory as the last line of stdout; everything else goes to stderr.
# The server's entry point is $DIR/node_modules/.bin/runpod-mcp.
set -euo pipefail

MCP=${RUNPOD_MCP_VERSION:-4.0.0}
CACHE=${GPUPOOL_TESTBINS:-$HOME/.cache/gpupool-testbins}
DIR=$CACHE/node-runpod-mcp$MCP
NPM=${NPM:-npm}

log() { echo "nodeclients: $*" >&2; }

if ! command -v node >/dev/null || ! command -v "$NPM" >/dev/null; then
  log "node and npm are required (the MCP server needs Node >= 20)"
  exit 1
fi
major=$(node -p 'process.versions.node.split(".")[0]')
if [ "$major" -lt 20 ]; then
  log "@runpod/mcp-server $MCP needs Node >= 20, this machine has $(node --version)"
  exit 1
fi

# The stamp is written last, so an interrupted install is redone rather than trusted.
if [ ! -f "$DIR/.complete" ]; then
  log "installing @runpod/mcp-server@$MCP into $DIR"
  rm -rf "$DIR"
  mkdir -p "$DIR"
  # A private package.json keeps npm from walking up into some other project.
  echo '{"name": "gpupool-testbins-node", "private": true}' >"$DIR/package.json"
  "$NPM" install --prefix "$DIR" --no-audit --no-fund --ignore-scripts --loglevel=error \
    --save-exact "@runpod/mcp-server@$MCP" >&2
  test -x "$DIR/node_modules/.bin/runpod-mcp"
  touch "$DIR/.complete"
fi
echo "$DIR"
