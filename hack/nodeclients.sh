#!/usr/bin/env bash
# Install (once) or reuse the Node packages the tests run:
#   hack/nodeclients.sh           the *official* RunPod MCP server (`@runpod/mcp-server`, which
#                                 speaks REST v2), run unchanged by the simulator's fidelity tests;
#                                 its entry point is $DIR/node_modules/.bin/runpod-mcp.
#   hack/nodeclients.sh --axios   axios, the HTTP client of the VPS app the gateway's e2e tests
#                                 play (crates/gpupool-e2e/tests/gateway/vps-client.mjs); it is
#                                 $DIR/node_modules/axios (put $DIR/node_modules on NODE_PATH).
# Each version is pinned and spelled in its directory name, so changing a pin makes a new
# directory and never mutates a cached one. They live in the machine-local cache next to the
# Python clients (hack/pyclients.sh), outside the checkout.
# Prints the install directory as the last line of stdout; everything else goes to stderr.
set -euo pipefail

MCP=${RUNPOD_MCP_VERSION:-4.0.0}
AXIOS=${AXIOS_VERSION:-1.21.1}
CACHE=${GPUPOOL_TESTBINS:-$HOME/.cache/gpupool-testbins}
NPM=${NPM:-npm}

log() { echo "nodeclients: $*" >&2; }

case "${1:-}" in
  "") PKG=@runpod/mcp-server VERSION=$MCP DIR=$CACHE/node-runpod-mcp$MCP CHECK=node_modules/.bin/runpod-mcp ;;
  --axios) PKG=axios VERSION=$AXIOS DIR=$CACHE/node-axios$AXIOS CHECK=node_modules/axios/package.json ;;
  *) log "usage: $0 [--axios]"; exit 2 ;;
esac

if ! command -v node >/dev/null || ! command -v "$NPM" >/dev/null; then
  log "node and npm are required (the MCP server needs Node >= 20)"
  exit 1
fi
major=$(node -p 'process.versions.node.split(".")[0]')
if [ "$major" -lt 20 ]; then
  log "$PKG $VERSION is run with Node >= 20, this machine has $(node --version)"
  exit 1
fi

# The stamp is written last, so an interrupted install is redone rather than trusted.
if [ ! -f "$DIR/.complete" ]; then
  log "installing $PKG@$VERSION into $DIR"
  rm -rf "$DIR"
  mkdir -p "$DIR"
  # A private package.json keeps npm from walking up into some other project.
  echo '{"name": "gpupool-testbins-node", "private": true}' >"$DIR/package.json"
  "$NPM" install --prefix "$DIR" --no-audit --no-fund --ignore-scripts --loglevel=error \
    --save-exact "$PKG@$VERSION" >&2
  test -e "$DIR/$CHECK"
  touch "$DIR/.complete"
fi
echo "$DIR"
