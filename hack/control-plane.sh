#!/usr/bin/env bash
# A real local Kubernetes control plane (etcd + kube-apiserver) on free loopback ports.
#
#   hack/control-plane.sh start [DIR]   start it; write DIR/kubeconfig and DIR/env; wait until ready
#   hack/control-plane.sh stop  [DIR]   stop it by the pids recorded in DIR, remove its data
#   hack/control-plane.sh restart-apiserver [DIR]
#                                       SIGKILL kube-apiserver, start it again on the same port
#                                       and etcd, wait until ready (the fault tests use it)
#   hack/control-plane.sh stop-apiserver [DIR]
#                                       SIGKILL kube-apiserver only (etcd keeps its data)
#   hack/control-plane.sh start-apiserver [DIR]
#                                       start it again on the same port, wait until ready
#
# DIR defaults to $GPUPOOL_STATE/control-plane ($GPUPOOL_STATE defaults to ./.state).
# `source DIR/env` exports KUBECONFIG, GPUPOOL_BIN (kubectl, helm) and the pids.
# The binaries come from hack/testbins.sh (built once, cached outside the checkout).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ACTION=${1:-}
DIR=${2:-${GPUPOOL_STATE:-$PWD/.state}/control-plane}
READY_TIMEOUT=${CONTROL_PLANE_TIMEOUT:-120}

log() { echo "control-plane: $*" >&2; }

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

stop_pid() { # stop one recorded process: TERM, then KILL after 10 s
  local file=$1 pid
  [ -f "$file" ] || return 0
  pid=$(cat "$file")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$file"
}

make_certs() {
  local d=$1
  (
    cd "$d"
    openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 3650 -subj /CN=gpupool-test-ca
    openssl req -newkey rsa:2048 -nodes -keyout apiserver.key -out apiserver.csr -subj /CN=kube-apiserver
    printf 'subjectAltName=IP:127.0.0.1,DNS:localhost,IP:10.0.0.1,DNS:kubernetes.default.svc\nextendedKeyUsage=serverAuth\n' >srv.ext
    openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 -extfile srv.ext -out apiserver.crt
    openssl req -newkey rsa:2048 -nodes -keyout admin.key -out admin.csr -subj "/O=system:masters/CN=admin"
    printf 'extendedKeyUsage=clientAuth\n' >cli.ext
    openssl x509 -req -in admin.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 -extfile cli.ext -out admin.crt
    openssl genrsa -out sa.key 2048
    openssl rsa -in sa.key -pubout -out sa.pub
  ) >/dev/null 2>&1
}

start_apiserver() { # kube-apiserver on the ports recorded in DIR/ports
  local bin=$1 ep api
  read -r ep api <"$DIR/ports"
  "$bin/kube-apiserver" --etcd-servers="http://127.0.0.1:$ep" \
    --bind-address=127.0.0.1 --advertise-address=127.0.0.1 --secure-port="$api" \
    --tls-cert-file="$DIR/apiserver.crt" --tls-private-key-file="$DIR/apiserver.key" \
    --client-ca-file="$DIR/ca.crt" --cert-dir="$DIR/certs" \
    --service-account-issuer="https://127.0.0.1:$api" --service-account-key-file="$DIR/sa.pub" \
    --service-account-signing-key-file="$DIR/sa.key" --service-cluster-ip-range=10.0.0.0/24 \
    --authorization-mode=RBAC --disable-admission-plugins=ServiceAccount --allow-privileged=true \
    --endpoint-reconciler-type=none \
    >>"$DIR/apiserver.log" 2>&1 &
  echo $! >"$DIR/apiserver.pid"
}

wait_ready() { # until /readyz answers and the default namespace can be read
  local bin=$1 ep api
  read -r ep api <"$DIR/ports"
  for _ in $(seq $((READY_TIMEOUT * 2))); do
    if curl -sf --cacert "$DIR/ca.crt" --cert "$DIR/admin.crt" --key "$DIR/admin.key" \
      "https://127.0.0.1:$api/readyz" >/dev/null &&
      "$bin/kubectl" --kubeconfig="$DIR/kubeconfig" get namespace default >/dev/null 2>&1; then
      return 0
    fi
    kill -0 "$(cat "$DIR/apiserver.pid")" 2>/dev/null || break
    sleep 0.5
  done
  log "kube-apiserver did not become ready; its log ends with:"
  tail -40 "$DIR/apiserver.log" >&2
  return 1
}

kill_apiserver() {
  kill -9 "$(cat "$DIR/apiserver.pid")" 2>/dev/null || true
  while kill -0 "$(cat "$DIR/apiserver.pid")" 2>/dev/null; do sleep 0.1; done
}

restart_apiserver() { # $1: the verb for the log line
  local bin t0
  t0=$(date +%s.%N)
  bin=$("$HERE/testbins.sh" | tail -1)
  start_apiserver "$bin"
  wait_ready "$bin"
  log "kube-apiserver $1, ready in $(python3 -c "import time; print(f'{time.time() - $t0:.1f}')") s"
}

start() {
  local bin t0
  t0=$(date +%s.%N)
  bin=$("$HERE/testbins.sh" | tail -1)
  if [ -f "$DIR/apiserver.pid" ] && kill -0 "$(cat "$DIR/apiserver.pid")" 2>/dev/null; then
    log "already running (state in $DIR)"
    return 0
  fi
  rm -rf "$DIR"; mkdir -p "$DIR"
  make_certs "$DIR"

  local ep pp api
  ep=$(free_port); pp=$(free_port); api=$(free_port)
  "$bin/etcd" --name=gpupool --data-dir="$DIR/etcd" \
    --listen-client-urls="http://127.0.0.1:$ep" --advertise-client-urls="http://127.0.0.1:$ep" \
    --listen-peer-urls="http://127.0.0.1:$pp" --initial-advertise-peer-urls="http://127.0.0.1:$pp" \
    --initial-cluster="gpupool=http://127.0.0.1:$pp" --unsafe-no-fsync=true --log-level=warn \
    >"$DIR/etcd.log" 2>&1 &
  echo $! >"$DIR/etcd.pid"
  for _ in $(seq $((READY_TIMEOUT * 2))); do
    curl -sf "http://127.0.0.1:$ep/health" >/dev/null && break
    kill -0 "$(cat "$DIR/etcd.pid")" 2>/dev/null || { tail -30 "$DIR/etcd.log" >&2; return 1; }
    sleep 0.5
  done

  echo "$ep $api" >"$DIR/ports"
  start_apiserver "$bin"

  local k=$DIR/kubeconfig kubectl=$bin/kubectl
  "$kubectl" config --kubeconfig="$k" set-cluster local --server="https://127.0.0.1:$api" \
    --certificate-authority="$DIR/ca.crt" --embed-certs=true >/dev/null
  "$kubectl" config --kubeconfig="$k" set-credentials admin --client-certificate="$DIR/admin.crt" \
    --client-key="$DIR/admin.key" --embed-certs=true >/dev/null
  "$kubectl" config --kubeconfig="$k" set-context local --cluster=local --user=admin >/dev/null
  "$kubectl" config --kubeconfig="$k" use-context local >/dev/null

  if ! wait_ready "$bin"; then
    stop
    return 1
  fi

  cat >"$DIR/env" <<EOF
export KUBECONFIG=$k
export GPUPOOL_BIN=$bin
export PATH=$bin:\$PATH
export CONTROL_PLANE_API_PORT=$api
export CONTROL_PLANE_ETCD_PORT=$ep
EOF
  log "ready in $(python3 -c "import time; print(f'{time.time() - $t0:.1f}')") s: https://127.0.0.1:$api ($("$bin/kube-apiserver" --version), etcd on :$ep); state in $DIR"
}

stop() {
  stop_pid "$DIR/apiserver.pid"
  stop_pid "$DIR/etcd.pid"
  rm -rf "$DIR/etcd"
}

case "$ACTION" in
  start) start ;;
  stop) stop ;;
  restart-apiserver) kill_apiserver; restart_apiserver restarted ;;
  stop-apiserver) kill_apiserver ;;
  start-apiserver) restart_apiserver started ;;
  *) echo "usage: $0 start|stop|restart-apiserver|stop-apiserver|start-apiserver [DIR]" >&2; exit 2 ;;
esac
