#!/usr/bin/env bash
# The gpupool demo.
#   DEMO_CLUSTER=local   (default) start a local kube-apiserver + etcd, run there, stop it after
#   DEMO_CLUSTER=current use the current kube context, in a namespace of its own removed afterwards
#   DEMO_KEEP=1          leave the local control plane running (prints how to reach it)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
cd "$ROOT"
MODE=${DEMO_CLUSTER:-local}
NS=gpupool-demo
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

case "$MODE" in
  local)
    DIR=${GPUPOOL_STATE:-$ROOT/.state}/demo
    [ "${DEMO_KEEP:-}" = 1 ] || trap '"$HERE/control-plane.sh" stop "$DIR"' EXIT
    say "Starting a local control plane (kube-apiserver + etcd on loopback)"
    "$HERE/control-plane.sh" start "$DIR"
    # shellcheck disable=SC1091
    source "$DIR/env"
    ;;
  current)
    command -v kubectl >/dev/null || { echo "demo: kubectl not found" >&2; exit 1; }
    NS=gpupool-demo-$(date +%s)
    say "Using the current context $(kubectl config current-context), namespace $NS (removed afterwards)"
    trap 'kubectl delete namespace "$NS" --wait=false >/dev/null 2>&1 || true' EXIT
    ;;
  *) echo "demo: DEMO_CLUSTER must be local or current, not $MODE" >&2; exit 2 ;;
esac

say "Installing the CRDs (GpuPool, GpuInstance, VideoJob)"
kubectl apply --server-side --field-manager=gpupool-demo -f crds/
kubectl wait --for=condition=Established --timeout=60s \
  crd/gpupools.gpupool.dev crd/gpuinstances.gpupool.dev crd/videojobs.gpupool.dev

say "Applying deploy/examples/ in namespace $NS"
kubectl create namespace "$NS" --dry-run=client -o yaml | kubectl apply -f -
kubectl apply -n "$NS" -f deploy/examples/

say "kubectl get gp,gi,vj"
kubectl get gp,gi,vj -n "$NS"

say "A bad manifest is refused by the API server, naming the field"
kubectl apply -n "$NS" -f tests/fixtures/invalid/gp-two-kinds-in-one-entry.yaml 2>&1 | sed 's/^/  /' || true

cat <<TXT

The API is installed and validated by the real API server. The controller that rents
machines, dispatches these jobs and tears idle machines down arrives with the controller
issue; until then the jobs above stay without a phase.
TXT
if [ "$MODE" = local ] && [ "${DEMO_KEEP:-}" = 1 ]; then
  echo "Control plane left running: source $DIR/env; stop it with hack/control-plane.sh stop $DIR"
fi
