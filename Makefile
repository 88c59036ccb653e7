# gpupool developer entry points. The two that matter: `make demo` and `make test`.
# Slow builds live outside the checkout so every clone on this machine reuses them.
export CARGO_TARGET_DIR ?= $(HOME)/.cache/gpupool-target
export GPUPOOL_TESTBINS ?= $(HOME)/.cache/gpupool-testbins

.PHONY: ffmpeg s3server test unit fidelity e2e chaos demo crds testbins testtools lint bench bench-policy bench-cluster control-plane-up control-plane-down

## Run every test: unit and integration tests, the simulator's fidelity with the official
## provider clients, then the end-to-end tests on a fresh local control plane.
test: unit fidelity e2e

## Unit tests, the CRD drift check, the provider clients against the simulator; no cluster.
## Every crate of the workspace (a plain `cargo test` in the root tests the operator's only).
unit: ffmpeg s3server
	cargo test --locked --workspace

## ffmpeg and ffprobe for the reference worker's tests (Debian's package when missing).
ffmpeg:
	hack/ffmpeg.sh >/dev/null

## The S3-compatible server (s3s-fs from crates.io) the worker's S3 test uploads to (cached).
s3server:
	hack/s3server.sh >/dev/null

## The official vastai CLI and runpod SDK (pinned, installed in a cached venv) against the
## simulator, and the simulator's JSON against the providers' published OpenAPI documents.
fidelity:
	hack/fidelity.sh

## End-to-end tests against a real kube-apiserver + etcd started (and stopped) for the run.
e2e: testbins testtools ffmpeg
	cargo build --locked -p gpupool --bin gpupool -p gpupool-worker
	hack/with-control-plane.sh cargo test --locked -p gpupool-e2e --features e2e --test e2e -- --test-threads=8

## The full chaos run (300 jobs, 10 SIGKILLs, provider faults; the short one is in `make test`).
chaos: testbins
	cargo build --locked -p gpupool --bin gpupool
	hack/with-control-plane.sh env GPUPOOL_CHAOS=full cargo test --locked -p gpupool-e2e --features e2e --test e2e chaos -- --nocapture

## The demo on a local control plane (or DEMO_CLUSTER=current for the current kube context).
demo: testbins ffmpeg
	hack/demo.sh

## Regenerate crds/ and the chart's copy from the Rust types.
crds:
	cargo run --locked --bin crdgen

## Build or reuse kube-apiserver, kubectl, etcd and helm (cached by version).
testbins:
	hack/testbins.sh >/dev/null

## And what only the tests need: promtool, actionlint, the Argo CD health runner, the
## Argo CD, Flux and Prometheus Operator CRDs (cached by version).
testtools:
	hack/testbins.sh --test-tools >/dev/null

## Every benchmark, one table each (docs/benchmarks.md keeps the figures): the policy
## simulation (simulated time), then the cluster benchmarks on a fresh local control plane
## (real operator, simulated providers). BENCH="dispatch warm" picks cluster benchmarks;
## BENCH_FLAGS="--profile dev" skips the release build.
bench: bench-policy bench-cluster

bench-policy:
	cargo bench --locked -p gpupool-bench --bench policy $(BENCH_FLAGS)

# The operator binary in the profile the benchmark is built in (release unless BENCH_FLAGS
# names another).
bench-cluster: testbins
	cargo build --locked -p gpupool --bin gpupool $(or $(BENCH_FLAGS),--release)
	hack/with-control-plane.sh cargo bench --locked -p gpupool-e2e --features e2e --bench cluster $(BENCH_FLAGS) -- $(BENCH)

lint:
	cargo fmt --all -- --check
	cargo clippy --locked --workspace --all-targets --features gpupool-e2e/e2e -- -D warnings

## A control plane that stays up for manual work: `source .state/control-plane/env`.
control-plane-up: testbins
	hack/control-plane.sh start

control-plane-down:
	hack/control-plane.sh stop
