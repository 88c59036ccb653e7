#!/usr/bin/env bash
# Tests the Argo CD health checks (deploy/gitops/health/*.lua) with a local Lua interpreter.
# Exit 0: passed; 1: a check failed; 3: no Lua interpreter (install one: apt-get install lua5.4).
set -euo pipefail
cd "$(dirname "$0")/.."
for lua in lua5.4 lua5.3 lua5.1 lua luajit; do
  if command -v "$lua" >/dev/null 2>&1; then
    exec "$lua" hack/argocd-health-test.lua deploy/gitops/health
  fi
done
echo "no Lua interpreter found (lua5.4, lua5.3, lua5.1, lua, luajit)" >&2
exit 3
