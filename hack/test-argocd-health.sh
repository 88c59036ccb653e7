#!/usr/bin/env bash
# Runs the Argo CD health checks (deploy/gitops/argocd-cm-patch.yaml and the same scripts in
# deploy/gitops/health/*.lua) on the sample objects of tests/fixtures/argocd-health/cases.json,
# in Argo CD's Lua sandbox: hack/argocd-health, built and cached by hack/testbins.sh.
# Exit 0: every case passed; 1: a case failed.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$(hack/testbins.sh --test-tools | tail -1)
exec "$bin/argocd-health" -configmap deploy/gitops/argocd-cm-patch.yaml \
  -scripts deploy/gitops/health -cases tests/fixtures/argocd-health/cases.json
