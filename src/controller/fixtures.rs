//! Objects for the plans' unit tests, built the way the API server would return them.

use jiff::Timestamp;
use serde_json::{Value, json};

use crate::crd::{GpuInstance, GpuPool, VideoJob};

/// A fixed instant plus `secs`.
pub fn at(secs: i64) -> Timestamp {
    Timestamp::from_second(1_800_000_000 + secs).unwrap()
}

/// `at(secs)` as the API writes it.
pub fn time(secs: i64) -> String {
    at(secs).to_string()
}

/// Pool `media/default`: idle timeout 300 s, provision timeout 600 s, one Vast.ai entry.
pub fn pool() -> GpuPool {
    serde_json::from_value(json!({
        "apiVersion": "gpupool.dev/v1alpha1", "kind": "GpuPool",
        "metadata": {"name": "default", "namespace": "media", "uid": "pool-uid"},
        "spec": {
            "idleTimeoutSeconds": 300, "provisionTimeoutSeconds": 600,
            "providers": [
                {"name": "vast", "vast": {"gpuNames": ["RTX 3060"], "maxPricePerHour": "0.25",
                 "credentialsSecretRef": {"name": "vast", "key": "apiKey"}}},
            ],
            "worker": {"image": "w:1", "port": 8000},
        },
    }))
    .unwrap()
}

/// Instance `name` of the pool with this `status`.
pub fn instance(name: &str, status: Value) -> GpuInstance {
    serde_json::from_value(json!({
        "apiVersion": "gpupool.dev/v1alpha1", "kind": "GpuInstance",
        "metadata": {"name": name, "namespace": "media", "uid": format!("{name}-uid"),
                     "resourceVersion": "7", "generation": 1},
        "spec": {"pool": "default", "provider": "vast"},
        "status": status,
    }))
    .unwrap()
}

/// Job `name` of the pool with this `status` (`null`: none yet), two retries allowed.
pub fn job(name: &str, status: Value) -> VideoJob {
    serde_json::from_value(json!({
        "apiVersion": "gpupool.dev/v1alpha1", "kind": "VideoJob",
        "metadata": {"name": name, "namespace": "media", "uid": format!("{name}-uid"),
                     "resourceVersion": "9", "generation": 1},
        "spec": {"pool": "default", "operation": "caption", "input": {"url": "u"},
                 "maxRetries": 2, "timeoutSeconds": 600},
        "status": status,
    }))
    .unwrap()
}
