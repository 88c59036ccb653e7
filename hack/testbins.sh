#!/usr/bin/env bash
# Build (once) or reuse the control-plane binaries the tests and the demo run:
# kube-apiserver and kubectl (from k8s.io/kubernetes), etcd, helm.
# With --test-tools, also what only the tests need, linked into the same bin directory:
#   promtool      (Prometheus, for `promtool test rules` on the chart's alerts)
#   actionlint    (the GitHub Actions workflows)
#   argocd-health (hack/argocd-health: Argo CD's Lua sandbox for the health checks)
#   crds/         (the real Argo CD, Flux and Prometheus Operator CRDs, from their Go modules)
# Everything lives in a machine-local cache keyed by version, outside the checkout,
# so a second run costs a few seconds. Prints the bin directory on stdout's last line.
# Needs Go and the Go module proxy. See docs/control-plane.md.
set -euo pipefail
TEST_TOOLS=false
[ "${1:-}" != --test-tools ] || TEST_TOOLS=true
REPO=$(cd "$(dirname "$0")/.." && pwd)

K8S=${K8S_VERSION:-1.36.3}
ETCD=${ETCD_VERSION:-3.6.16}
HELM=${HELM_VERSION:-3.21.4}
# Test tools. Prometheus tags its Go module v0.MMM.P for release M.MM.P (0.316.0 is 3.16.0).
PROMETHEUS=${PROMETHEUS_VERSION:-0.316.0}
ACTIONLINT=${ACTIONLINT_VERSION:-1.7.12}
# CRDs only (nothing of these is built): Argo CD 3.5.7 (the newest that Go 1.26 accepts);
# Flux 2.9's controllers; Prometheus Operator.
ARGOCD=${ARGOCD_VERSION:-3.5.7}
FLUX_SOURCE=${FLUX_SOURCE_CONTROLLER_VERSION:-1.9.6}
FLUX_HELM=${FLUX_HELM_CONTROLLER_VERSION:-1.6.0}
PROM_OPERATOR=${PROMETHEUS_OPERATOR_VERSION:-0.85.0}
CACHE=${GPUPOOL_TESTBINS:-$HOME/.cache/gpupool-testbins}
BIN=$CACHE/bin-k8s$K8S-etcd$ETCD-helm$HELM
mkdir -p "$BIN"

export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-modcacherw
export GOMODCACHE=$CACHE/gomod GOCACHE=$CACHE/gocache
MINOR=$(echo "$K8S" | cut -d. -f2)

log() { echo "testbins: $*" >&2; }

build_kube() {
  local work=$CACHE/src/k8s-$K8S
  mkdir -p "$work"; cd "$work"
  [ -f go.mod ] || go mod init local/gpupool-k8s-testbins >&2
  local gomod
  gomod=$(cd / && go mod download -json "k8s.io/kubernetes@v$K8S" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
  # k8s.io/kubernetes requires its staging repos at v0.0.0 and replaces them with local
  # paths; a consumer module maps each to the published v0.MINOR.PATCH instead.
  local m
  for m in $(grep -E '^\s*k8s\.io/[A-Za-z0-9._-]+ v0\.0\.0(\s|$)' "$gomod" | awk '{print $1}'); do
    go mod edit -replace="$m=$m@v0.${K8S#1.}"
  done
  local gd; gd=$(sed -n 's/^godebug //p' "$gomod")
  [ -z "$gd" ] || go mod edit -godebug="$gd"
  go get -tool "k8s.io/kubernetes/cmd/kube-apiserver@v$K8S" >&2
  go get -tool "k8s.io/kubernetes/cmd/kubectl@v$K8S" >&2
  local ver="-X k8s.io/component-base/version.gitVersion=v$K8S -X k8s.io/component-base/version.gitMajor=1"
  ver+=" -X k8s.io/component-base/version.gitMinor=$MINOR -X k8s.io/component-base/version.gitTreeState=clean"
  ver+=" -X k8s.io/component-base/version.buildDate=1970-01-01T00:00:00Z"
  ver+=" -X k8s.io/client-go/pkg/version.gitVersion=v$K8S -X k8s.io/client-go/pkg/version.gitMajor=1"
  ver+=" -X k8s.io/client-go/pkg/version.gitMinor=$MINOR"
  local cmd
  for cmd in kube-apiserver kubectl; do
    if [ ! -x "$BIN/$cmd" ]; then
      log "building $cmd v$K8S (cold: 10-25 min on 2 cores)"
      go build -trimpath -pgo=off -tags=selinux,notest -ldflags "-s -w $ver" \
        -o "$BIN/$cmd.tmp" "k8s.io/kubernetes/cmd/$cmd" >&2
      mv "$BIN/$cmd.tmp" "$BIN/$cmd"
    fi
  done
}

build_etcd() {
  local work=$CACHE/src/etcd-$ETCD
  mkdir -p "$work"; cd "$work"
  [ -f go.mod ] || go mod init local/gpupool-etcd >&2
  go get -tool "go.etcd.io/etcd/server/v3@v$ETCD" >&2
  log "building etcd v$ETCD"
  go build -trimpath -ldflags "-s -w" -o "$BIN/etcd.tmp" go.etcd.io/etcd/server/v3 >&2
  mv "$BIN/etcd.tmp" "$BIN/etcd"
}

build_helm() {
  log "building helm v$HELM"
  local tmp; tmp=$(mktemp -d)
  GOBIN=$tmp go install -trimpath \
    -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=v$HELM" \
    "helm.sh/helm/v3/cmd/helm@v$HELM" >&2
  mv "$tmp/helm" "$BIN/helm"; rmdir "$tmp"
}

# A Go program installed by `go install PKG@VERSION` into $CACHE/tools/NAME-VERSION/.
tool_dir() { echo "$CACHE/tools/$1-$2"; }

build_promtool() {
  local minor=${PROMETHEUS#*.}; minor=${minor%%.*}
  local release=$((minor / 100)).$((minor % 100)).${PROMETHEUS##*.}
  local dir; dir=$(tool_dir promtool "$PROMETHEUS")
  [ -x "$dir/promtool" ] && return
  log "building promtool $release (module v$PROMETHEUS)"
  mkdir -p "$dir"
  # remove_all_sd: no service-discovery plugins (promtool's rule checks and tests need none).
  GOBIN=$dir.tmp go install -trimpath -tags remove_all_sd \
    -ldflags "-s -w -X github.com/prometheus/common/version.Version=$release" \
    "github.com/prometheus/prometheus/cmd/promtool@v$PROMETHEUS" >&2
  mv "$dir.tmp/promtool" "$dir/promtool"; rmdir "$dir.tmp"
}

build_actionlint() {
  local dir; dir=$(tool_dir actionlint "$ACTIONLINT")
  [ -x "$dir/actionlint" ] && return
  log "building actionlint v$ACTIONLINT"
  mkdir -p "$dir"
  GOBIN=$dir.tmp go install -trimpath -ldflags "-s -w" \
    "github.com/rhysd/actionlint/cmd/actionlint@v$ACTIONLINT" >&2
  mv "$dir.tmp/actionlint" "$dir/actionlint"; rmdir "$dir.tmp"
}

# The project's own runner (hack/argocd-health), keyed by a hash of its source and go.sum.
build_argocd_health() {
  local src=$REPO/hack/argocd-health key
  key=$(cat "$src/go.mod" "$src/go.sum" "$src"/*.go | sha256sum | cut -c1-12)
  local dir; dir=$(tool_dir argocd-health "$key")
  [ -x "$dir/argocd-health" ] && { echo "$dir"; return; }
  log "building argocd-health ($key)"
  mkdir -p "$dir"
  (cd "$src" && go build -trimpath -ldflags "-s -w" -o "$dir/argocd-health.tmp" .) >&2
  mv "$dir/argocd-health.tmp" "$dir/argocd-health"
  echo "$dir"
}

# The CRD manifests, copied out of the projects' Go modules (downloaded, not built).
fetch_crds() {
  local dir=$CACHE/crds/argocd$ARGOCD-source$FLUX_SOURCE-helm$FLUX_HELM-promop$PROM_OPERATOR
  if [ ! -f "$dir/.done" ]; then
    log "fetching CRDs: Argo CD v$ARGOCD, Flux source-controller v$FLUX_SOURCE and helm-controller v$FLUX_HELM, Prometheus Operator v$PROM_OPERATOR"
    mkdir -p "$dir"
    local m
    m=$(moddir "github.com/argoproj/argo-cd/v3@v$ARGOCD")
    cp "$m/manifests/crds/application-crd.yaml" "$dir/argocd-application.yaml"
    cp "$m/manifests/crds/appproject-crd.yaml" "$dir/argocd-appproject.yaml"
    m=$(moddir "github.com/fluxcd/source-controller@v$FLUX_SOURCE")
    cp "$m/config/crd/bases/source.toolkit.fluxcd.io_gitrepositories.yaml" "$dir/flux-gitrepositories.yaml"
    m=$(moddir "github.com/fluxcd/helm-controller@v$FLUX_HELM")
    cp "$m/config/crd/bases/helm.toolkit.fluxcd.io_helmreleases.yaml" "$dir/flux-helmreleases.yaml"
    m=$(moddir "github.com/prometheus-operator/prometheus-operator@v$PROM_OPERATOR")
    cp "$m/example/prometheus-operator-crd/monitoring.coreos.com_servicemonitors.yaml" "$dir/prometheus-operator-servicemonitors.yaml"
    cp "$m/example/prometheus-operator-crd/monitoring.coreos.com_prometheusrules.yaml" "$dir/prometheus-operator-prometheusrules.yaml"
    chmod 0644 "$dir"/*.yaml
    touch "$dir/.done"
  fi
  echo "$dir"
}

moddir() {
  (cd / && go mod download -json "$1") | sed -n 's/.*"Dir": "\(.*\)".*/\1/p'
}

# Serialise concurrent callers (make test and make demo at once) on one lock.
exec 9>"$CACHE/.lock"
flock 9

{ [ -x "$BIN/kube-apiserver" ] && [ -x "$BIN/kubectl" ]; } || build_kube
[ -x "$BIN/etcd" ] || build_etcd
[ -x "$BIN/helm" ] || build_helm

if $TEST_TOOLS; then
  build_promtool
  build_actionlint
  health=$(build_argocd_health)
  crds=$(fetch_crds)
  ln -sfn "$(tool_dir promtool "$PROMETHEUS")/promtool" "$BIN/promtool"
  ln -sfn "$(tool_dir actionlint "$ACTIONLINT")/actionlint" "$BIN/actionlint"
  ln -sfn "$health/argocd-health" "$BIN/argocd-health"
  ln -sfn "$crds" "$BIN/crds"
  "$BIN/promtool" --version 2>&1 | sed -n 1p >&2
  echo "actionlint $("$BIN/actionlint" -version 2>&1 | sed -n 1p)" >&2
  echo "argocd-health: $("$BIN/argocd-health" -version)" >&2
  echo "crds: $(basename "$crds")" >&2
fi

"$BIN/kube-apiserver" --version >&2
"$BIN/etcd" --version 2>&1 | sed -n 1p >&2
"$BIN/helm" version --short >&2
"$BIN/kubectl" version --client 2>&1 | sed -n 1p >&2
echo "$BIN"
