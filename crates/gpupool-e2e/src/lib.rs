//! No library: this crate holds gpupool's tests that need the operator and the provider
//! simulator together (`tests/providers_sim.rs`) or a real control plane (`tests/e2e/`, run by
//! `make test` with the `e2e` feature), and the cluster benchmarks (`benches/cluster.rs`).
//! Apart from the operator's crate, so that the product has no test-only feature and
//! `cargo build -p gpupool` compiles nothing of the simulator.
