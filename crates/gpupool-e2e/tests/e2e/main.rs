//! End-to-end tests against a real kube-apiserver and etcd, with real kubectl.
//! Run by `make test`; see crates/gpupool-e2e/tests/e2e/support.rs for what they expect of the environment.

mod api;
mod behaviour;
mod chaos;
mod chart;
mod faults;
mod gateway;
mod gitops;
mod lifecycle;
mod monitoring;
mod nodeclient;
mod operator;
mod realworker;
mod replicas;
mod support;
mod validation;
mod worker_secrets;
