//! Prometheus metrics, all prefixed `gpupool_`, served on `/metrics`.
//!
//! Gauges describing the pool (instances by phase, spend) are set by the pool reconciler from
//! its caches; counters and histograms are updated where the event happens.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::Mutex,
};

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
pub struct JobPhaseLabels {
    pub namespace: String,
    pub pool: String,
    pub phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IdleInstanceLabels {
    pub namespace: String,
    pub pool: String,
    /// The GpuInstance's name (not `instance`, which Prometheus gives the scraped target).
    pub gpuinstance: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProviderEntryLabels {
    pub namespace: String,
    pub pool: String,
    pub provider: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProviderStateLabels {
    pub namespace: String,
    pub pool: String,
    pub provider: String,
    pub state: String,
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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KubeRequestLabels {
    pub verb: String,
    pub resource: String,
}

impl KubeRequestLabels {
    /// Names a Kubernetes API request the way the API server's audit log does: the verb
    /// (get, list, watch, create, update, patch, delete, deletecollection) and the resource
    /// with its subresource (`videojobs/status`), from the method, path and query alone.
    pub fn of(method: &str, path: &str, query: Option<&str>) -> Self {
        let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
        // /api/v1/... or /apis/group/version/...; then [namespaces/ns/] resource [/name [/sub]]
        let rest: &[&str] = match parts.first() {
            Some(&"api") if parts.len() >= 2 => &parts[2..],
            Some(&"apis") if parts.len() >= 3 => &parts[3..],
            _ => &[],
        };
        let rest = match rest {
            ["namespaces", _ns, more @ ..] if !more.is_empty() => more,
            other => other,
        };
        let (resource, named) = match rest {
            [] => (path.to_string(), false),
            [r] => (r.to_string(), false),
            [r, _name] => (r.to_string(), true),
            [r, _name, sub, ..] => (format!("{r}/{sub}"), true),
        };
        let watch =
            query.is_some_and(|q| q.split('&').any(|kv| kv == "watch=true" || kv == "watch=1"));
        let verb = match method {
            "GET" if watch => "watch",
            "GET" if named => "get",
            "GET" => "list",
            "POST" => "create",
            "PUT" => "update",
            "PATCH" => "patch",
            "DELETE" if named => "delete",
            "DELETE" => "deletecollection",
            other => {
                return Self {
                    verb: other.to_ascii_lowercase(),
                    resource,
                };
            }
        };
        Self {
            verb: verb.into(),
            resource,
        }
    }
}

fn seconds_histogram(start: f64, factor: f64, count: u16) -> Histogram {
    Histogram::new(exponential_buckets(start, factor, count))
}

/// Registers `metric` as `gpupool_<name>` and remembers the name.
fn register(
    registry: &mut Registry,
    names: &mut Vec<String>,
    name: &str,
    help: &str,
    metric: impl prometheus_client::registry::Metric,
) {
    registry.register(name, help, metric);
    names.push(format!("gpupool_{name}"));
}

/// Every metric the operator exports.
pub struct Metrics {
    registry: Registry,
    /// Every metric's name as exported (prefixed, without the `_total`/`_bucket` suffixes).
    names: Vec<String>,
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
    pub preemptions: Family<ProviderEntryLabels, Counter>,
    pub events: Family<EventLabels, Counter>,
    pub kube_requests: Family<KubeRequestLabels, Counter>,
    pub leader: Gauge,
    pub max_hourly_spend: Family<PoolLabels, FloatGauge>,
    pub jobs_by_phase: Family<JobPhaseLabels, Gauge>,
    pub idle_instances: Family<PoolLabels, Gauge>,
    idle_deadlines: Family<IdleInstanceLabels, FloatGauge>,
    pub provider_state: Family<ProviderStateLabels, Gauge>,
    provider_backoff_until: Family<ProviderEntryLabels, FloatGauge>,
    teardown_failing_set: Mutex<std::collections::HashSet<String>>,
    /// The idle instances each pool last reported, so that a busy or destroyed instance's
    /// deadline series is removed rather than left behind.
    idle_deadline_set: Mutex<HashMap<(String, String), HashSet<String>>>,
}

type FloatGauge = Gauge<f64, std::sync::atomic::AtomicU64>;

/// What a pool's reconcile knows of it, for the pool's gauges.
pub struct PoolGauges<'a> {
    pub namespace: &'a str,
    pub pool: &'a str,
    /// Each provider entry, in the pool's order: its name, state (one of [`PROVIDER_STATES`])
    /// and, while it is not available, when it is tried again (Unix seconds).
    pub entries: Vec<(String, &'static str, Option<f64>)>,
    /// GpuInstances by (provider entry, phase).
    pub instances: &'a BTreeMap<(String, String), i64>,
    /// VideoJobs by phase.
    pub jobs: &'a BTreeMap<String, i64>,
    /// The idle instances and their deadlines (Unix seconds).
    pub idle: &'a [(String, f64)],
    pub spend_per_hour: f64,
    pub max_hourly_spend: Option<f64>,
}

const INSTANCE_PHASES: [&str; 5] = ["Pending", "Provisioning", "Ready", "Terminating", "Failed"];
const JOB_PHASES: [&str; 5] = ["Pending", "Scheduled", "Running", "Succeeded", "Failed"];

/// The states a pool's provider entry can be in, as `gpupool_provider_state` reports them.
pub const PROVIDER_STATES: [&str; 3] = ["Available", "BackingOff", "Unavailable"];

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
        let mut names = Vec::new();
        let m = Self::unregistered();
        // The groups register in this order, the order `names()` and `/metrics` keep.
        m.register_pool_usage(&mut registry, &mut names);
        m.register_job_timings(&mut registry, &mut names);
        m.register_calls_and_failures(&mut registry, &mut names);
        m.register_process(&mut registry, &mut names);
        m.register_pool_state(&mut registry, &mut names);
        Self {
            registry,
            names,
            ..m
        }
    }

    /// Every metric with no series, in an empty registry that [`Self::new`] replaces.
    fn unregistered() -> Self {
        Self {
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
            preemptions: Family::default(),
            events: Family::default(),
            kube_requests: Family::default(),
            leader: Gauge::default(),
            max_hourly_spend: Family::default(),
            jobs_by_phase: Family::default(),
            idle_instances: Family::default(),
            idle_deadlines: Family::default(),
            provider_state: Family::default(),
            provider_backoff_until: Family::default(),
            teardown_failing_set: Mutex::default(),
            idle_deadline_set: Mutex::default(),
            registry: Registry::default(),
            names: Vec::new(),
        }
    }

    /// Registers what a pool runs and spends: instances by phase, spend, pending jobs.
    fn register_pool_usage(&self, registry: &mut Registry, names: &mut Vec<String>) {
        register(
            registry,
            names,
            "instances",
            "GpuInstances by pool, provider and phase",
            self.instances.clone(),
        );
        register(
            registry,
            names,
            "spend_dollars_per_hour",
            "USD per hour over a pool's billing instances",
            self.spend_per_hour.clone(),
        );
        register(
            registry,
            names,
            "spend_dollars",
            "USD billed for destroyed instances, as accounted by the operator",
            self.spend_total.clone(),
        );
        register(
            registry,
            names,
            "pending_jobs",
            "VideoJobs waiting for an instance",
            self.pending_jobs.clone(),
        );
    }

    /// Registers finished jobs and the latency histograms: wait, run, dispatch overhead, teardown
    /// lateness.
    fn register_job_timings(&self, registry: &mut Registry, names: &mut Vec<String>) {
        register(
            registry,
            names,
            "jobs",
            "Finished VideoJobs by outcome",
            self.jobs.clone(),
        );
        register(
            registry,
            names,
            "job_wait_seconds",
            "From VideoJob creation to dispatch",
            self.job_wait_seconds.clone(),
        );
        register(
            registry,
            names,
            "job_run_seconds",
            "From dispatch to the worker's answer",
            self.job_run_seconds.clone(),
        );
        register(
            registry,
            names,
            "dispatch_overhead_seconds",
            "Operator time from a job's binding to the worker request on a warm instance",
            self.dispatch_overhead_seconds.clone(),
        );
        register(
            registry,
            names,
            "idle_teardown_lateness_seconds",
            "Time from an instance's idle deadline to its deletion",
            self.idle_teardown_lateness_seconds.clone(),
        );
    }

    /// Registers provider calls and their latency, failed reconciles, failing teardowns, orphans.
    fn register_calls_and_failures(&self, registry: &mut Registry, names: &mut Vec<String>) {
        register(
            registry,
            names,
            "provider_calls",
            "Provider API calls by provider entry, operation and outcome",
            self.provider_calls.clone(),
        );
        register(
            registry,
            names,
            "provider_call_seconds",
            "Provider API call latency",
            self.provider_call_seconds.clone(),
        );
        register(
            registry,
            names,
            "reconcile_errors",
            "Failed reconciles by kind and error class",
            self.reconcile_errors.clone(),
        );
        register(
            registry,
            names,
            "teardown_failing",
            "Instances whose teardown keeps failing (they may still bill)",
            self.teardown_failing.clone(),
        );
        register(
            registry,
            names,
            "orphans_destroyed",
            "Provider machines with this cluster's label and no GpuInstance, destroyed by the sweep",
            self.orphans_destroyed.clone(),
        );
        register(
            registry,
            names,
            "preemptions",
            "Interruptible machines the provider took back, by pool and provider entry",
            self.preemptions.clone(),
        );
    }

    /// Registers this process: events emitted, Kubernetes API requests, leadership.
    fn register_process(&self, registry: &mut Registry, names: &mut Vec<String>) {
        register(
            registry,
            names,
            "events",
            "Kubernetes events emitted, by reason",
            self.events.clone(),
        );
        register(
            registry,
            names,
            "kube_requests",
            "Requests this process sent to the Kubernetes API server, by verb and resource",
            self.kube_requests.clone(),
        );
        register(
            registry,
            names,
            "leader",
            "1 while this replica reconciles (holds the Lease, or runs without leader election), 0 on standby",
            self.leader.clone(),
        );
    }

    /// Registers the rest of a pool's gauges: spend limit, jobs by phase, idle instances and their
    /// deadlines, provider entry states.
    fn register_pool_state(&self, registry: &mut Registry, names: &mut Vec<String>) {
        register(
            registry,
            names,
            "max_hourly_spend_dollars",
            "A pool's spec.maxHourlySpend in USD per hour (absent when unlimited)",
            self.max_hourly_spend.clone(),
        );
        register(
            registry,
            names,
            "jobs_by_phase",
            "A pool's VideoJobs by phase, finished ones until their TTL removes them",
            self.jobs_by_phase.clone(),
        );
        register(
            registry,
            names,
            "idle_instances",
            "Ready GpuInstances with no job: billing while they wait for their idle deadline",
            self.idle_instances.clone(),
        );
        register(
            registry,
            names,
            "instance_idle_deadline_timestamp_seconds",
            "When an idle GpuInstance is due for teardown (Unix seconds); present only while it is idle",
            self.idle_deadlines.clone(),
        );
        register(
            registry,
            names,
            "provider_state",
            "1 for the state each provider entry of a pool is in (Available, BackingOff, Unavailable), 0 for the others",
            self.provider_state.clone(),
        );
        register(
            registry,
            names,
            "provider_backoff_until_timestamp_seconds",
            "When a backing-off or unavailable provider entry is tried again (Unix seconds)",
            self.provider_backoff_until.clone(),
        );
    }

    /// The name of every metric (as `# TYPE` gives it: a counter without `_total`, a
    /// histogram without `_bucket`), whether or not it has a series yet.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Sets every gauge of one pool: instances by entry and phase, jobs by phase, pending
    /// jobs, spend and its limit, idle deadlines, provider entry states.
    pub fn publish_pool(&self, g: &PoolGauges<'_>) {
        let pool = PoolLabels {
            namespace: g.namespace.to_string(),
            pool: g.pool.to_string(),
        };
        for (entry, state, until) in &g.entries {
            for phase in INSTANCE_PHASES {
                let n = g
                    .instances
                    .get(&(entry.clone(), phase.to_string()))
                    .copied()
                    .unwrap_or(0);
                self.instances
                    .get_or_create(&InstanceLabels {
                        namespace: pool.namespace.clone(),
                        pool: pool.pool.clone(),
                        provider: entry.clone(),
                        phase: phase.into(),
                    })
                    .set(n);
            }
            let labels = ProviderEntryLabels {
                namespace: pool.namespace.clone(),
                pool: pool.pool.clone(),
                provider: entry.clone(),
            };
            self.set_provider_state(&labels, state, *until);
        }
        for phase in JOB_PHASES {
            self.jobs_by_phase
                .get_or_create(&JobPhaseLabels {
                    namespace: pool.namespace.clone(),
                    pool: pool.pool.clone(),
                    phase: phase.into(),
                })
                .set(g.jobs.get(phase).copied().unwrap_or(0));
        }
        self.pending_jobs
            .get_or_create(&pool)
            .set(g.jobs.get("Pending").copied().unwrap_or(0));
        self.spend_per_hour
            .get_or_create(&pool)
            .set(g.spend_per_hour);
        match g.max_hourly_spend {
            Some(limit) => {
                self.max_hourly_spend.get_or_create(&pool).set(limit);
            }
            None => {
                self.max_hourly_spend.remove(&pool);
            }
        }
        self.set_idle_deadlines(g.namespace, g.pool, g.idle);
    }

    /// Records the idle instances of a pool with their deadlines (Unix seconds), removing the
    /// series of those that are no longer idle.
    pub fn set_idle_deadlines(&self, namespace: &str, pool: &str, idle: &[(String, f64)]) {
        let mut sets = self
            .idle_deadline_set
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let key = (namespace.to_string(), pool.to_string());
        let labels = |instance: &str| IdleInstanceLabels {
            namespace: namespace.to_string(),
            pool: pool.to_string(),
            gpuinstance: instance.to_string(),
        };
        let now: HashSet<String> = idle.iter().map(|(i, _)| i.clone()).collect();
        if let Some(before) = sets.get(&key) {
            for gone in before.difference(&now) {
                self.idle_deadlines.remove(&labels(gone));
            }
        }
        for (instance, deadline) in idle {
            self.idle_deadlines
                .get_or_create(&labels(instance))
                .set(*deadline);
        }
        self.idle_instances
            .get_or_create(&PoolLabels {
                namespace: namespace.to_string(),
                pool: pool.to_string(),
            })
            .set(idle.len() as i64);
        if now.is_empty() {
            sets.remove(&key);
        } else {
            sets.insert(key, now);
        }
    }

    /// Records the state of one provider entry of a pool and, when it backs off, until when.
    pub fn set_provider_state(
        &self,
        entry: &ProviderEntryLabels,
        state: &str,
        backoff_until: Option<f64>,
    ) {
        for s in PROVIDER_STATES {
            self.provider_state
                .get_or_create(&ProviderStateLabels {
                    namespace: entry.namespace.clone(),
                    pool: entry.pool.clone(),
                    provider: entry.provider.clone(),
                    state: s.into(),
                })
                .set(i64::from(s == state));
        }
        match backoff_until {
            Some(t) => {
                self.provider_backoff_until.get_or_create(entry).set(t);
            }
            None => {
                self.provider_backoff_until.remove(entry);
            }
        }
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

#[cfg(test)]
mod tests {
    use super::{KubeRequestLabels, Metrics, ProviderEntryLabels};

    fn lines_with(m: &Metrics, name: &str) -> Vec<String> {
        m.render()
            .lines()
            .filter(|l| l.starts_with(name))
            .map(String::from)
            .collect()
    }

    #[test]
    fn idle_deadlines_follow_the_idle_set_and_leave_no_stale_series() {
        let m = Metrics::new();
        let d = "gpupool_instance_idle_deadline_timestamp_seconds{";
        m.set_idle_deadlines("media", "p", &[("a".into(), 100.0), ("b".into(), 200.5)]);
        m.set_idle_deadlines("media", "q", &[("c".into(), 300.0)]);
        assert_eq!(lines_with(&m, d).len(), 3, "{}", m.render());
        assert!(
            m.render()
                .contains(r#"gpupool_idle_instances{namespace="media",pool="p"} 2"#),
            "{}",
            m.render()
        );
        // a took a job, b is gone, d became idle: only d is left in p; q untouched.
        m.set_idle_deadlines("media", "p", &[("d".into(), 400.0)]);
        let left = lines_with(&m, d);
        assert_eq!(left.len(), 2, "{left:?}");
        assert!(
            left.iter()
                .any(|l| l.contains(r#"gpuinstance="d""#) && l.ends_with(" 400.0"))
        );
        assert!(left.iter().any(|l| l.contains(r#"gpuinstance="c""#)));
        m.set_idle_deadlines("media", "p", &[]);
        m.set_idle_deadlines("media", "q", &[]);
        assert!(lines_with(&m, d).is_empty());
        assert!(
            m.render()
                .contains(r#"gpupool_idle_instances{namespace="media",pool="q"} 0"#)
        );
    }

    #[test]
    fn provider_state_is_one_hot_and_backoff_only_while_backing_off() {
        let m = Metrics::new();
        let entry = ProviderEntryLabels {
            namespace: "media".into(),
            pool: "p".into(),
            provider: "vast".into(),
        };
        m.set_provider_state(&entry, "BackingOff", Some(1234.5));
        let states = lines_with(&m, "gpupool_provider_state{");
        assert_eq!(states.len(), 3, "{states:?}");
        for l in &states {
            let on = l.contains(r#"state="BackingOff""#);
            assert!(l.ends_with(if on { " 1" } else { " 0" }), "{l}");
        }
        let until = lines_with(&m, "gpupool_provider_backoff_until_timestamp_seconds{");
        assert!(
            until.len() == 1 && until[0].ends_with(" 1234.5"),
            "{until:?}"
        );
        m.set_provider_state(&entry, "Available", None);
        assert!(lines_with(&m, "gpupool_provider_backoff_until_timestamp_seconds{").is_empty());
        assert!(
            lines_with(&m, "gpupool_provider_state{")
                .iter()
                .all(|l| l.contains(r#"state="Available""#) == l.ends_with(" 1"))
        );
    }

    #[test]
    fn every_registered_metric_is_named() {
        let m = Metrics::new();
        for name in [
            "gpupool_leader",
            "gpupool_jobs",
            "gpupool_instance_idle_deadline_timestamp_seconds",
            "gpupool_provider_state",
            "gpupool_max_hourly_spend_dollars",
        ] {
            assert!(m.names().iter().any(|n| n == name), "{name}");
        }
        let mut names = m.names().to_vec();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), m.names().len(), "a name registered twice");
    }

    #[test]
    fn names_keep_their_registration_order() {
        let expected = [
            "instances",
            "spend_dollars_per_hour",
            "spend_dollars",
            "pending_jobs",
            "jobs",
            "job_wait_seconds",
            "job_run_seconds",
            "dispatch_overhead_seconds",
            "idle_teardown_lateness_seconds",
            "provider_calls",
            "provider_call_seconds",
            "reconcile_errors",
            "teardown_failing",
            "orphans_destroyed",
            "preemptions",
            "events",
            "kube_requests",
            "leader",
            "max_hourly_spend_dollars",
            "jobs_by_phase",
            "idle_instances",
            "instance_idle_deadline_timestamp_seconds",
            "provider_state",
            "provider_backoff_until_timestamp_seconds",
        ]
        .map(|n| format!("gpupool_{n}"));
        assert_eq!(Metrics::new().names(), expected);
    }

    fn of(method: &str, path: &str, query: Option<&str>) -> (String, String) {
        let l = KubeRequestLabels::of(method, path, query);
        (l.verb, l.resource)
    }

    #[test]
    fn kube_requests_are_named_like_the_audit_log() {
        let p = "/apis/gpupool.dev/v1alpha1/namespaces/demo/videojobs";
        assert_eq!(of("GET", p, None), ("list".into(), "videojobs".into()));
        assert_eq!(
            of(
                "GET",
                p,
                Some("resourceVersion=5&watch=true&timeoutSeconds=290")
            ),
            ("watch".into(), "videojobs".into())
        );
        assert_eq!(of("POST", p, None), ("create".into(), "videojobs".into()));
        assert_eq!(
            of(
                "PATCH",
                &format!("{p}/job-1/status"),
                Some("fieldManager=gpupool")
            ),
            ("patch".into(), "videojobs/status".into())
        );
        assert_eq!(
            of("DELETE", &format!("{p}/job-1"), None),
            ("delete".into(), "videojobs".into())
        );
        assert_eq!(
            of("GET", "/api/v1/namespaces/kube-system", None),
            ("get".into(), "namespaces".into())
        );
        assert_eq!(
            of("GET", "/api/v1/namespaces/demo/secrets/vast", None),
            ("get".into(), "secrets".into())
        );
        assert_eq!(
            of(
                "PUT",
                "/apis/coordination.k8s.io/v1/namespaces/gp/leases/gpupool",
                None
            ),
            ("update".into(), "leases".into())
        );
        assert_eq!(
            of(
                "GET",
                "/apis/gpupool.dev/v1alpha1/gpuinstances",
                Some("watch=1")
            ),
            ("watch".into(), "gpuinstances".into())
        );
        assert_eq!(
            of("GET", "/version", None),
            ("list".into(), "/version".into())
        );
    }
}
