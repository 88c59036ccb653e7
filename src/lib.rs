//! gpupool: a Kubernetes operator that rents GPU machines on Vast.ai and RunPod only while
//! there is video work for them, and destroys each one 300 s after its last job.
//!
//! The library holds everything; the binaries under `src/bin/` are thin.

pub mod clock;
pub mod config;
pub mod controller;
pub mod crd;
pub mod gateway;
pub mod http;
pub mod leader;
pub mod metrics;
pub mod provider;
pub mod telemetry;
pub mod worker;
