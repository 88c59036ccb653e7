#!/usr/bin/env bash
# Build (once) or reuse the control-plane binaries the tests and the demo run:
# kube-apiserver and kubectl (from k8s.io/kubernetes), etcd, helm.
# They live in a machine-local cache keyed by version, outside the checkout,
# so a second run costs a few seconds. Prints the bin directory on stdout's last line.
# Needs Go and the Go module proxy. See docs/control-plane.md.
set -euo pipefail

K8S=${K8S_VERSION:-1.36.3}
ETCD=${ETCD_VERSION:-3.6.16}
HELM=${HELM_VERSION:-3.22.0}
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

# Serialise concurrent callers (make test and make demo at once) on one lock.
exec 9>"$CACHE/.lock"
flock 9

{ [ -x "$BIN/kube-apiserver" ] && [ -x "$BIN/kubectl" ]; } || build_kube
[ -x "$BIN/etcd" ] || build_etcd
[ -x "$BIN/helm" ] || build_helm

"$BIN/kube-apiserver" --version >&2
"$BIN/etcd" --version 2>&1 | sed -n 1p >&2
"$BIN/helm" version --short >&2
"$BIN/kubectl" version --client 2>&1 | sed -n 1p >&2
echo "$BIN"
