#!/usr/bin/env bash
# The gpupool demo: the whole story with simulated providers.
#   DEMO_CLUSTER=local   (default) start a local kube-apiserver + etcd, run there, stop it after
#   DEMO_CLUSTER=current use the current kube context, in a namespace of its own removed afterwards
#   DEMO_IDLE_SECONDS    idle timeout used by the demo pool (default 20; the product default is 300)
#   DEMO_KEEP=1          leave the local control plane running (prints how to reach it)
#   DEMO_WORKER=real     (default) every simulated machine and serverless worker runs the
#                        reference worker (gpupool-worker) on a video made with ffmpeg;
#                        DEMO_WORKER=standin uses the simulator's built-in stand-in instead
# Every process it starts is stopped by its pid on exit.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
cd "$ROOT"
MODE=${DEMO_CLUSTER:-local}
WORKER=${DEMO_WORKER:-real}
IDLE=${DEMO_IDLE_SECONDS:-20}
STATE=${GPUPOOL_STATE:-$ROOT/.state}/demo-run
NS=gpupool-demo
PIDS=()
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  if [ "$MODE" = current ]; then
    kubectl delete namespace "$NS" --wait=false >/dev/null 2>&1 || true
  elif [ "${DEMO_KEEP:-}" != 1 ]; then
    "$HERE/control-plane.sh" stop "$STATE/control-plane" || true
  fi
}
trap cleanup EXIT
mkdir -p "$STATE"

say "Building gpupool, the provider simulator and the reference worker"
cargo build --locked -p gpupool --bin gpupool -p gpupool-sim --bin gpupool-sim -p gpupool-worker 2>&1 | tail -1
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/debug
case "$WORKER" in
  real) "$HERE/ffmpeg.sh" >/dev/null; ffmpeg -hide_banner -version | head -1 ;;
  standin) ;;
  *) echo "demo: DEMO_WORKER must be real or standin, not $WORKER" >&2; exit 2 ;;
esac

case "$MODE" in
  local)
    say "Starting a local control plane (kube-apiserver + etcd on loopback)"
    "$HERE/control-plane.sh" start "$STATE/control-plane"
    # shellcheck disable=SC1091
    source "$STATE/control-plane/env"
    ;;
  current)
    NS=gpupool-demo-$(date +%s)
    say "Using the current context $(kubectl config current-context), namespace $NS (removed afterwards)"
    ;;
  *) echo "demo: DEMO_CLUSTER must be local or current, not $MODE" >&2; exit 2 ;;
esac

say "Starting the provider simulator (Vast.ai, RunPod and RunPod Serverless on loopback)"
rm -f "$STATE/sim.port"
SIM_ARGS=()
if [ "$WORKER" = real ]; then
  # Every machine (and serverless worker) gets gpupool-worker as a real process; it may fetch
  # from loopback, where the simulator's presigned-URL storage stand-in is.
  rm -rf "$STATE/workers"
  cat >"$STATE/sim.yaml" <<YAML
worker_process:
  command: $BIN/gpupool-worker
  env: {GPUPOOL_WORKER_ALLOW_PRIVATE_URLS: "true"}
  log_dir: $STATE/workers
YAML
  SIM_ARGS=(--config "$STATE/sim.yaml")
fi
"$BIN/gpupool-sim" "${SIM_ARGS[@]}" --port-file "$STATE/sim.port" >"$STATE/sim.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do [ -s "$STATE/sim.port" ] && break; sleep 0.1; done
SIM="http://127.0.0.1:$(cat "$STATE/sim.port")"
echo "simulator at $SIM (workers: $WORKER)"
MEDIA=https://media.example.com/
UPLOADS=https://uploads.example.com/
if [ "$WORKER" = real ]; then
  say "Making a 10 s test video with ffmpeg and storing it where the jobs' URLs point"
  ffmpeg -hide_banner -loglevel error -y -f lavfi -i testsrc2=duration=10:size=640x360:rate=25 \
    -f lavfi -i sine=frequency=330:duration=10 -c:v libx264 -pix_fmt yuv420p -c:a aac -shortest \
    "$STATE/input.mp4"
  for n in 42 43 44 1001; do
    curl -sSf -X PUT --data-binary "@$STATE/input.mp4" -H 'Content-Type: video/mp4' \
      "$SIM/storage/in/$n.mp4" >/dev/null
  done
  echo "input: $(stat -c %s "$STATE/input.mp4") bytes, 640x360 H.264 + AAC, stored as $SIM/storage/in/{42,43,44,1001}.mp4"
  MEDIA=$SIM/storage/
  UPLOADS=$SIM/storage/
fi

say "Installing the CRDs and applying deploy/examples/ in namespace $NS"
kubectl apply --server-side --field-manager=gpupool-demo -f crds/ >/dev/null
kubectl wait --for=condition=Established --timeout=60s \
  crd/gpupools.gpupool.dev crd/gpuinstances.gpupool.dev crd/videojobs.gpupool.dev >/dev/null
kubectl create namespace "$NS" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
# The examples' media URLs point at the simulator's storage (with DEMO_WORKER=real).
for f in deploy/examples/*.yaml; do
  sed -e "s|https://media.example.com/|$MEDIA|g" -e "s|https://uploads.example.com/|$UPLOADS|g" "$f"
  echo "---"
done | kubectl apply -n "$NS" -f -
echo "The demo shortens the pool's idleTimeoutSeconds from 300 to $IDLE so it ends in a minute:"
kubectl patch gp default -n "$NS" --type merge -p "{\"spec\":{\"idleTimeoutSeconds\":$IDLE}}"

say "Starting the operator (the gpupool binary, as in the Helm chart) against the simulator"
HTTP_PORT=$(free_port)
"$BIN/gpupool" --namespace "$NS" --cluster-id gpupool-demo --http-addr "127.0.0.1:$HTTP_PORT" \
  --vast-url "$SIM" --runpod-api-url "$SIM" --runpod-rest-url "$SIM/v2" \
  --runpod-serverless-url "$SIM/v2" \
  --runpod-proxy-template "$SIM/proxy/{podId}-{port}" --provision-poll-ms 500 \
  --sweep-interval-seconds 10 >"$STATE/operator.log" 2>&1 &
PIDS+=($!)

say "Starting the HTTP gateway (gpupool gateway) and calling it as a VPS app would"
GW_KEY=$(openssl rand -hex 16)
kubectl create secret generic gpupool-gateway-keys -n "$NS" --from-literal=vps-app="$GW_KEY" \
  --dry-run=client -o yaml | kubectl apply -f - >/dev/null
GW_PORT=$(free_port)
"$BIN/gpupool" gateway --namespace "$NS" --http-addr "127.0.0.1:$GW_PORT" >"$STATE/gateway.log" 2>&1 &
PIDS+=($!)
GW="http://127.0.0.1:$GW_PORT"
for _ in $(seq 100); do curl -sf "$GW/readyz" >/dev/null 2>&1 && break; sleep 0.2; done
echo "POST $GW/video/caption (synchronous, X-API-Key, Idempotency-Key: order-1001):"
curl -sS --max-time 120 -X POST "$GW/video/caption" -H "X-API-Key: $GW_KEY" \
  -H 'Idempotency-Key: order-1001' -H 'Content-Type: application/json' \
  -d "{\"videoUrl\": \"${MEDIA}in/1001.mp4\", \"uploadUrl\": \"${UPLOADS}out/1001-captioned.mp4\",
       \"cues\": [{\"start\": 1, \"end\": 5, \"text\": \"Hello from the VPS app\"}]}" \
  -w '\n  -> HTTP %{http_code}\n'
echo "GET $GW/pool/stats:"
curl -sS "$GW/pool/stats" -H "X-API-Key: $GW_KEY"; echo

say "Jobs and instances until every job is done and every machine is destroyed"
echo "(caption-42 and transcode-43 go to RunPod Serverless, first in the pool's order;"
echo " thumbnails-44 is pinned to Vast.ai and reuses the pre-warmed instance.)"
start=$(date +%s)
while true; do
  sleep 3
  now=$(( $(date +%s) - start ))
  printf '\n--- t=%ss ---\n' "$now"
  kubectl get vj,gi -n "$NS" 2>/dev/null || true
  jobs_left=$(kubectl get vj -n "$NS" -o jsonpath='{range .items[*]}{.status.phase}{"\n"}{end}' | grep -cvE '^(Succeeded|Failed)$' || true)
  machines=$(kubectl get gi -n "$NS" -o name | wc -l)
  if [ "$jobs_left" -eq 0 ] && [ "$machines" -eq 0 ]; then break; fi
  if [ "$now" -gt $(( IDLE * 6 + 120 )) ]; then
    echo "demo: still not done after ${now}s; the operator log ends with:" >&2
    tail -20 "$STATE/operator.log" >&2
    exit 1
  fi
done

say "Results"
kubectl get vj -n "$NS" -o custom-columns='JOB:.metadata.name,PHASE:.status.phase,PROVIDER:.status.provider,ATTEMPTS:.status.attempts,ERROR:.status.error'
if [ "$WORKER" = real ]; then
  say "What the workers produced (stored at $SIM/storage/out/, probed with ffprobe)"
  curl -sf "$SIM/admin/storage" | python3 -c '
import json, subprocess, sys, urllib.request
sim = sys.argv[1]
for o in json.load(sys.stdin)["objects"]:
    if not o["key"].startswith("out/"):
        continue
    data = urllib.request.urlopen(sim + "/storage/" + o["key"]).read()
    probe = json.loads(subprocess.run(
        ["ffprobe", "-v", "error", "-print_format", "json", "-show_format", "-show_streams", "-"],
        input=data, capture_output=True).stdout or b"{}")
    v = next((s for s in probe.get("streams", []) if s.get("codec_type") == "video"), {})
    dur = probe.get("format", {}).get("duration")
    shown = ("%.2f s" % float(dur)) if dur and v.get("codec_name") not in ("mjpeg", "png", "webp") else "image"
    print("  %-26s %8d bytes  %-6s %4sx%-4s %s" % (o["key"], o["bytes"], v.get("codec_name", "?"),
          v.get("width", "?"), v.get("height", "?"), shown))' "$SIM"
  echo "  (worker logs: $STATE/workers/)"
else
  kubectl get vj -n "$NS" -o custom-columns='JOB:.metadata.name,OUTPUT:.status.output.result.output'
fi
say "Events: what the operator did"
kubectl get events -n "$NS" --sort-by=.metadata.creationTimestamp \
  -o custom-columns='OBJECT:.involvedObject.name,REASON:.reason,MESSAGE:.message' 2>/dev/null | tail -25

say "The simulator's bill next to the operator's accounting"
curl -sf "$SIM/admin/bill" | python3 -c '
import json, sys
b = json.load(sys.stdin)
for i in b["instances"]:
    print("  machine %-6s %10s  %7.1f s x %s USD/h = %.6f USD  alive=%s"
          % (i["provider"], i["id"], i["billed_seconds"], i["price_per_hour"], i["cost"], i["alive"]))
for e in b["endpoints"]:
    print("  serverless %s: %.1f worker-s = %.6f USD" % (e["id"], e["worker_seconds"], e["cost"]))
print("  simulator bill for machines: %.6f USD" % (b["by_provider"]["vast"] + b["by_provider"]["runpod"]))'
curl -sf "http://127.0.0.1:$HTTP_PORT/metrics" | awk '/^gpupool_spend_dollars_total/ {s+=$2} END {printf "  operator accounting (gpupool_spend_dollars_total): %.6f USD\n", s}'
echo "  (serverless time is billed by the endpoint itself; the operator accounts for the machines it rents)"

if [ "$MODE" = local ] && [ "${DEMO_KEEP:-}" = 1 ]; then
  echo; echo "Control plane left running: source $STATE/control-plane/env; stop it with hack/control-plane.sh stop $STATE/control-plane"
fi
