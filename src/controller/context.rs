//! [`Context`]: the only door from a reconciler to the world (Kubernetes, providers, workers,
//! clock, events, metrics). Reconcilers never build clients or read the clock themselves.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use jiff::Timestamp;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::{
    Client, Resource,
    runtime::{
        events::{Event, EventType, Recorder, Reporter},
        reflector::{ObjectRef, Store},
    },
};
use tracing::debug;

use crate::{
    clock::Clock,
    crd::{GpuInstance, GpuPool, MANAGER, VideoJob},
    metrics::{EventLabels, Metrics},
};

use super::{dispatch::Dispatcher, providers::Providers, written::Written};

/// Settings of the controllers, from the operator's flags.
#[derive(Clone, Debug)]
pub struct ControllerConfig {
    /// Watch only this namespace; all namespaces when `None`.
    pub namespace: Option<String>,
    /// Identifies this cluster in provider labels, so two clusters sharing an account never
    /// destroy each other's machines.
    pub cluster_id: String,
    /// How often the orphan sweep runs.
    pub sweep_interval: Duration,
    /// How old an unlabelled-by-us machine must be before the sweep destroys it (covers creates
    /// whose GpuInstance status is not written yet).
    pub orphan_grace: Duration,
    /// How often a Provisioning instance is polled.
    pub provision_poll: Duration,
    /// How often a Ready instance is checked at the provider (liveness, cost).
    pub liveness_interval: Duration,
    /// How long a provider is skipped after it reports no capacity or fails.
    pub provider_backoff: Duration,
    /// Largest job output stored in status.
    pub max_output_bytes: usize,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        Self {
            namespace: None,
            cluster_id: "local".into(),
            sweep_interval: Duration::from_secs(60),
            orphan_grace: Duration::from_secs(120),
            provision_poll: Duration::from_secs(2),
            liveness_interval: Duration::from_secs(60),
            provider_backoff: Duration::from_secs(180),
            max_output_bytes: 64 * 1024,
        }
    }
}

/// A provider entry skipped until `until` after failures.
#[derive(Clone, Debug, PartialEq)]
pub struct ProviderBackoff {
    pub until: Timestamp,
    pub failures: u32,
    pub message: String,
    /// True when the entry is misconfigured (missing Secret, bad key) rather than out of capacity.
    pub unavailable: bool,
}

/// The caches of the three kinds, filled by the controllers' watches.
#[derive(Clone)]
pub struct Stores {
    pub pools: Store<GpuPool>,
    pub instances: Store<GpuInstance>,
    pub jobs: Store<VideoJob>,
}

pub struct Context {
    pub client: Client,
    pub config: ControllerConfig,
    pub clock: Arc<dyn Clock>,
    pub metrics: Arc<Metrics>,
    pub providers: Providers,
    pub dispatcher: Dispatcher,
    /// What this process wrote last, for the scheduler's read-your-writes (`written.rs`).
    pub written_instances: Written<GpuInstance>,
    pub written_jobs: Written<VideoJob>,
    recorder: Recorder,
    stores: OnceLock<Stores>,
    backoff: Mutex<HashMap<(String, String, String), ProviderBackoff>>,
    endpoint_sync: Mutex<HashMap<(String, String, String), std::time::Instant>>,
    failures: Mutex<HashMap<String, u32>>,
    /// Session tokens by GpuInstance UID, so a dispatch does not read the Secret each time.
    tokens: Mutex<HashMap<String, crate::provider::Credentials>>,
    /// When each instance (by UID) was last asked of its provider while Ready.
    liveness: Mutex<HashMap<String, std::time::Instant>>,
    /// Idle-deadline timers armed, by instance UID.
    deadlines: Mutex<HashMap<String, Timestamp>>,
    /// When each pool's status was last written, by namespace/name.
    pool_status_written: Mutex<HashMap<String, std::time::Instant>>,
    /// Instances (by UID) whose final cost was counted in `spend_total`, and when.
    spend_counted: Mutex<HashMap<String, std::time::Instant>>,
    ready: AtomicBool,
    standby: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Context {
    pub fn new(
        client: Client,
        config: ControllerConfig,
        clock: Arc<dyn Clock>,
        metrics: Arc<Metrics>,
        providers: Providers,
        instance: Option<String>,
    ) -> Self {
        let reporter = Reporter {
            controller: MANAGER.into(),
            instance,
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            config,
            clock,
            metrics,
            providers,
            dispatcher: Dispatcher::default(),
            written_instances: Written::default(),
            written_jobs: Written::default(),
            stores: OnceLock::new(),
            backoff: Mutex::default(),
            endpoint_sync: Mutex::default(),
            failures: Mutex::default(),
            tokens: Mutex::default(),
            liveness: Mutex::default(),
            deadlines: Mutex::default(),
            pool_status_written: Mutex::default(),
            spend_counted: Mutex::default(),
            ready: AtomicBool::new(false),
            standby: AtomicBool::new(false),
        }
    }

    pub fn now(&self) -> Timestamp {
        self.clock.now()
    }

    pub(super) fn set_stores(
        &self,
        pools: Store<GpuPool>,
        instances: Store<GpuInstance>,
        jobs: Store<VideoJob>,
    ) {
        let _ = self.stores.set(Stores {
            pools,
            instances,
            jobs,
        });
    }

    /// The caches. Only called from reconcilers, which run after [`super::run`] set them.
    pub fn stores(&self) -> &Stores {
        self.stores
            .get()
            .expect("stores are set before any reconcile runs")
    }

    pub(super) async fn wait_until_synced(&self) {
        let s = self.stores().clone();
        let _ = s.pools.wait_until_ready().await;
        let _ = s.instances.wait_until_ready().await;
        let _ = s.jobs.wait_until_ready().await;
    }

    pub(super) fn set_ready(&self) {
        self.ready.store(true, Ordering::SeqCst);
    }

    /// True once every cache has its first full list, or while standing by for leadership.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst) || self.standby.load(Ordering::SeqCst)
    }

    /// Marks this replica as waiting for the leader Lease (ready, not reconciling).
    pub fn set_standby(&self, standby: bool) {
        self.standby.store(standby, Ordering::SeqCst);
        self.metrics.leader.set(i64::from(!standby));
    }

    pub fn pool(&self, namespace: &str, name: &str) -> Option<Arc<GpuPool>> {
        self.stores()
            .pools
            .get(&ObjectRef::new(name).within(namespace))
    }

    pub fn instance(&self, namespace: &str, name: &str) -> Option<Arc<GpuInstance>> {
        self.stores()
            .instances
            .get(&ObjectRef::new(name).within(namespace))
    }

    pub fn job(&self, namespace: &str, name: &str) -> Option<Arc<VideoJob>> {
        self.stores()
            .jobs
            .get(&ObjectRef::new(name).within(namespace))
    }

    /// Counts consecutive reconcile failures of one object, for the error policy's back-off.
    pub fn note_failure(&self, key: &str) -> u32 {
        let mut f = lock(&self.failures);
        let n = f.entry(key.to_string()).or_default();
        *n += 1;
        *n
    }

    pub fn clear_failures(&self, key: &str) {
        lock(&self.failures).remove(key);
    }

    /// Skips provider `provider` of pool `ns/pool` for a while: the configured back-off,
    /// doubling per failure in a row up to 8 times it.
    pub fn back_off_provider(
        &self,
        ns: &str,
        pool: &str,
        provider: &str,
        message: String,
        unavailable: bool,
    ) {
        self.record_backoff(ns, pool, provider, message, unavailable, true);
    }

    /// Marks provider `provider` of pool `ns/pool` unusable as configured (a Secret or key
    /// missing): skipped for one base back-off period, then checked again. Unlike a failure
    /// at the provider the period does not grow, so a fixed Secret is picked up within one
    /// period. True when the message is new (worth an event).
    pub fn provider_misconfigured(
        &self,
        ns: &str,
        pool: &str,
        provider: &str,
        message: String,
    ) -> bool {
        self.record_backoff(ns, pool, provider, message, true, false)
    }

    /// Records one more failure of a provider; true when its message or state changed.
    fn record_backoff(
        &self,
        ns: &str,
        pool: &str,
        provider: &str,
        message: String,
        unavailable: bool,
        grow: bool,
    ) -> bool {
        let now = self.now();
        let mut b = lock(&self.backoff);
        let entry = b
            .entry((ns.into(), pool.into(), provider.into()))
            .or_insert(ProviderBackoff {
                until: now,
                failures: 0,
                message: String::new(),
                unavailable,
            });
        let changed = entry.message != message || entry.unavailable != unavailable;
        entry.failures += 1;
        let factor = if grow {
            1u32 << (entry.failures - 1).min(3)
        } else {
            1
        };
        let secs = self.config.provider_backoff.as_secs_f64() * f64::from(factor);
        entry.until = now
            .saturating_add(jiff::SignedDuration::from_secs_f64(secs))
            .unwrap_or(now);
        entry.message = message;
        entry.unavailable = unavailable;
        changed
    }

    /// Forgets a provider's failures after it worked.
    pub fn provider_succeeded(&self, ns: &str, pool: &str, provider: &str) {
        lock(&self.backoff).remove(&(ns.into(), pool.into(), provider.into()));
    }

    /// The back-off of a provider, if it is still in force.
    pub fn provider_backoff(
        &self,
        ns: &str,
        pool: &str,
        provider: &str,
    ) -> Option<ProviderBackoff> {
        let now = self.now();
        lock(&self.backoff)
            .get(&(ns.into(), pool.into(), provider.into()))
            .filter(|b| b.until > now)
            .cloned()
    }

    /// Whether the settings of a serverless entry are due for comparison (and marks them done).
    pub fn endpoint_sync_due(&self, pool: &GpuPool, entry: &str, every: Duration) -> bool {
        use kube::ResourceExt;
        let key = (
            pool.namespace().unwrap_or_default(),
            pool.name_any(),
            entry.to_string(),
        );
        let mut m = lock(&self.endpoint_sync);
        match m.get(&key) {
            Some(at) if at.elapsed() < every => false,
            _ => {
                m.insert(key, std::time::Instant::now());
                true
            }
        }
    }

    /// Makes the next reconcile compare the entry's settings again.
    pub fn endpoint_sync_failed(&self, pool: &GpuPool, entry: &str) {
        use kube::ResourceExt;
        lock(&self.endpoint_sync).remove(&(
            pool.namespace().unwrap_or_default(),
            pool.name_any(),
            entry.to_string(),
        ));
    }

    /// Whether the Ready instance with this UID is due a liveness check (none in the last
    /// `liveness_interval`); if so, the check is counted as done now. A reconcile caused by a
    /// job being bound or freed therefore never waits for the provider.
    pub fn liveness_due(&self, instance_uid: &str) -> bool {
        let now = std::time::Instant::now();
        let mut checked = lock(&self.liveness);
        match checked.get(instance_uid) {
            Some(at) if now.duration_since(*at) < self.config.liveness_interval => false,
            _ => {
                checked.insert(instance_uid.to_string(), now);
                true
            }
        }
    }

    /// Records a timer for this instance's idle deadline; false if one is armed for it.
    pub fn arm_deadline(&self, instance_uid: &str, deadline: Timestamp) -> bool {
        lock(&self.deadlines).insert(instance_uid.to_string(), deadline) != Some(deadline)
    }

    pub fn disarm_deadline(&self, instance_uid: &str, deadline: Timestamp) {
        let mut d = lock(&self.deadlines);
        if d.get(instance_uid) == Some(&deadline) {
            d.remove(instance_uid);
        }
    }

    /// `None` when the pool's status may be written now (and counts it as written), else how
    /// long until it may: a write of counts alone waits `interval` after the previous write.
    pub fn pool_status_wait(
        &self,
        pool: &GpuPool,
        counts_only: bool,
        interval: Duration,
    ) -> Option<Duration> {
        use kube::ResourceExt;
        let key = format!(
            "{}/{}",
            pool.namespace().unwrap_or_default(),
            pool.name_any()
        );
        let now = std::time::Instant::now();
        let mut written = lock(&self.pool_status_written);
        if counts_only
            && let Some(at) = written.get(&key)
            && now.duration_since(*at) < interval
        {
            return Some(interval - now.duration_since(*at));
        }
        written.insert(key, now);
        None
    }

    /// The session token of the instance with this UID, if this process has seen it.
    pub fn cached_token(&self, instance_uid: &str) -> Option<crate::provider::Credentials> {
        lock(&self.tokens).get(instance_uid).cloned()
    }

    pub fn remember_token(&self, instance_uid: &str, token: &crate::provider::Credentials) {
        lock(&self.tokens).insert(instance_uid.to_string(), token.clone());
    }

    /// True the first time it is asked for `instance_uid` (within 10 minutes): the finalizer
    /// can run twice for one instance (a reconcile queued by its own status write runs
    /// before the finalizer's removal reaches the cache), and the final cost and the
    /// Destroyed event must be counted once.
    pub fn first_final_accounting(&self, instance_uid: &str) -> bool {
        const KEEP: Duration = Duration::from_secs(600);
        let mut counted = lock(&self.spend_counted);
        counted.retain(|_, at| at.elapsed() < KEEP);
        counted
            .insert(instance_uid.to_string(), std::time::Instant::now())
            .is_none()
    }

    /// Drops what this process remembers of an instance that is going away.
    pub fn forget_instance(&self, instance_uid: &str) {
        lock(&self.tokens).remove(instance_uid);
        lock(&self.liveness).remove(instance_uid);
    }

    /// Publishes an event about `obj` in the background, as client-go's recorder does: an
    /// event is never on the path of a job, and failing to publish never fails a reconcile.
    pub async fn event<K>(&self, obj: &K, warning: bool, reason: &str, note: String)
    where
        K: Resource<DynamicType = ()>,
    {
        self.metrics
            .events
            .get_or_create(&EventLabels {
                reason: reason.into(),
            })
            .inc();
        let reference = ObjectReference {
            api_version: Some(K::api_version(&()).into_owned()),
            kind: Some(K::kind(&()).into_owned()),
            name: obj.meta().name.clone(),
            namespace: obj.meta().namespace.clone(),
            uid: obj.meta().uid.clone(),
            resource_version: None,
            field_path: None,
        };
        let event = Event {
            type_: if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: reason.into(),
            note: Some(note.chars().take(1000).collect()),
            action: reason.into(),
            secondary: None,
        };
        let recorder = self.recorder.clone();
        let reason = reason.to_string();
        tokio::spawn(async move {
            if let Err(e) = recorder.publish(&event, &reference).await {
                debug!(error = %e, reason, "event not published");
            }
        });
    }
}
