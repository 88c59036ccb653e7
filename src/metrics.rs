//! Prometheus metrics, all prefixed `gpupool_`, served on `/metrics`.
//!
//! Gauges describing the pool (instances by phase, spend) are set by the pool reconciler from
//! its caches; counters and histograms are updated where the event happens.

use std::sync::Mutex;

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InstanceLabels {
    pub namespace: String,
    pub pool: String,
    pub provider: String,
    pub phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabels {
    pub namespace: String,
    pub pool: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JobLabels {
    pub namespace: String,
    pub pool: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProviderCallLabels {
    pub provider: String,
    pub operation: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReconcileLabels {
    pub kind: String,
    pub error: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabels {
    pub reason: String,
}

fn seconds_histogram(start: f64, factor: f64, count: u16) -> Histogram {
    Histogram::new(exponential_buckets(start, factor, count))
}

/// Every metric the operator exports.
pub struct Metrics {
    registry: Registry,
    pub instances: Family<InstanceLabels, Gauge>,
    pub spend_per_hour: Family<PoolLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    pub spend_total: Family<PoolLabels, Counter<f64, std::sync::atomic::AtomicU64>>,
    pub pending_jobs: Family<PoolLabels, Gauge>,
    pub jobs: Family<JobLabels, Counter>,
    pub job_wait_seconds: Histogram,
    pub job_run_seconds: Histogram,
    pub dispatch_overhead_seconds: Histogram,
    pub idle_teardown_lateness_seconds: Histogram,
    pub provider_calls: Family<ProviderCallLabels, Counter>,
    pub provider_call_seconds: Family<ProviderCallLabels, Histogram>,
    pub reconcile_errors: Family<ReconcileLabels, Counter>,
    pub teardown_failing: Gauge,
    pub orphans_destroyed: Counter,
    pub events: Family<EventLabels, Counter>,
    teardown_failing_set: Mutex<std::collections::HashSet<String>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("gpupool");
        let m = Self {
            instances: Family::default(),
            spend_per_hour: Family::default(),
            spend_total: Family::default(),
            pending_jobs: Family::default(),
            jobs: Family::default(),
            job_wait_seconds: seconds_histogram(0.01, 2.0, 18),
            job_run_seconds: seconds_histogram(0.05, 2.0, 18),
            dispatch_overhead_seconds: seconds_histogram(0.001, 2.0, 14),
            idle_teardown_lateness_seconds: seconds_histogram(0.001, 2.0, 16),
            provider_calls: Family::default(),
            provider_call_seconds: Family::new_with_constructor(|| {
                seconds_histogram(0.005, 2.0, 14)
            }),
            reconcile_errors: Family::default(),
            teardown_failing: Gauge::default(),
            orphans_destroyed: Counter::default(),
            events: Family::default(),
            teardown_failing_set: Mutex::default(),
            registry: Registry::default(),
        };
        registry.register(
            "instances",
            "GpuInstances by pool, provider and phase",
            m.instances.clone(),
        );
        registry.register(
            "spend_dollars_per_hour",
            "USD per hour over a pool's billing instances",
            m.spend_per_hour.clone(),
        );
        registry.register(
            "spend_dollars",
            "USD billed for destroyed instances, as accounted by the operator",
            m.spend_total.clone(),
        );
        registry.register(
            "pending_jobs",
            "VideoJobs waiting for an instance",
            m.pending_jobs.clone(),
        );
        registry.register("jobs", "Finished VideoJobs by outcome", m.jobs.clone());
        registry.register(
            "job_wait_seconds",
            "From VideoJob creation to dispatch",
            m.job_wait_seconds.clone(),
        );
        registry.register(
            "job_run_seconds",
            "From dispatch to the worker's answer",
            m.job_run_seconds.clone(),
        );
        registry.register(
            "dispatch_overhead_seconds",
            "Operator time from a job's binding to the worker request on a warm instance",
            m.dispatch_overhead_seconds.clone(),
        );
        registry.register(
            "idle_teardown_lateness_seconds",
            "Time from an instance's idle deadline to its deletion",
            m.idle_teardown_lateness_seconds.clone(),
        );
        registry.register(
            "provider_calls",
            "Provider API calls by provider entry, operation and outcome",
            m.provider_calls.clone(),
        );
        registry.register(
            "provider_call_seconds",
            "Provider API call latency",
            m.provider_call_seconds.clone(),
        );
        registry.register(
            "reconcile_errors",
            "Failed reconciles by kind and error class",
            m.reconcile_errors.clone(),
        );
        registry.register(
            "teardown_failing",
            "Instances whose teardown keeps failing (they may still bill)",
            m.teardown_failing.clone(),
        );
        registry.register("orphans_destroyed", "Provider machines with this cluster's label and no GpuInstance, destroyed by the sweep", m.orphans_destroyed.clone());
        registry.register(
            "events",
            "Kubernetes events emitted, by reason",
            m.events.clone(),
        );
        Self { registry, ..m }
    }

    /// Records whether the teardown of `instance` is failing now.
    pub fn set_teardown_failing(&self, instance: &str, failing: bool) {
        let mut set = self
            .teardown_failing_set
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if failing {
            set.insert(instance.to_string());
        } else {
            set.remove(instance);
        }
        self.teardown_failing.set(set.len() as i64);
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
