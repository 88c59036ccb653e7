//! [`Context`]: the only door from a reconciler to the world (Kubernetes, providers, workers,
//! clock, events, metrics). Reconcilers never build clients or read the clock themselves.

use std::{
    sync::{
        Arc,
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
        reflector::{self, ObjectRef, Store, store::Writer},
    },
};
use tracing::debug;

use crate::{
    clock::Clock,
    crd::{GpuInstance, GpuPool, MANAGER, VideoJob},
    metrics::{EventLabels, Metrics},
};

use super::{
    deadlines::{Claims, Deadlines},
    dispatch::Dispatcher,
    providers::Providers,
    registry::{EntryKey, ObjectKey, PoolKey, Registry, Throttle},
    session::SessionTokens,
    written::Written,
};

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

/// Why a provider entry is backed off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cause {
    /// Out of capacity, or it refused this request: others may do better meanwhile.
    Refused,
    /// It cannot be used as configured (credentials refused, a Secret missing): shown as
    /// unavailable until it works again.
    Unusable,
}

/// `Warning` when `warning`, else `Normal`.
pub fn warning_if(warning: bool) -> EventType {
    if warning {
        EventType::Warning
    } else {
        EventType::Normal
    }
}

/// Whether a provider's back-off grows with its failures in a row.
enum Growth {
    Doubling,
    Fixed,
}

/// The caches of the three kinds, filled by the controllers' watches.
#[derive(Clone)]
pub struct Stores {
    pub pools: Store<GpuPool>,
    pub instances: Store<GpuInstance>,
    pub jobs: Store<VideoJob>,
}

/// The writing ends of the caches, for the watches that fill them ([`super::run`]).
pub struct Writers {
    pub pools: Writer<GpuPool>,
    pub instances: Writer<GpuInstance>,
    pub jobs: Writer<VideoJob>,
}

/// Three empty caches: the Context reads them, the watches fill them.
pub fn caches() -> (Stores, Writers) {
    let (pools, pool_writer) = reflector::store();
    let (instances, instance_writer) = reflector::store();
    let (jobs, job_writer) = reflector::store();
    let stores = Stores {
        pools,
        instances,
        jobs,
    };
    let writers = Writers {
        pools: pool_writer,
        instances: instance_writer,
        jobs: job_writer,
    };
    (stores, writers)
}

pub struct Context {
    pub client: Client,
    pub config: ControllerConfig,
    pub clock: Arc<dyn Clock>,
    pub metrics: Arc<Metrics>,
    pub providers: Providers,
    /// Job attempts in flight on this replica (`dispatch.rs`).
    pub dispatcher: Dispatcher,
    /// Instances' session tokens (`session.rs`).
    pub sessions: SessionTokens,
    /// Idle-deadline timers armed (`deadlines.rs`).
    pub deadlines: Deadlines,
    /// Claims begun and machines destroyed ahead of their finalizer (`deadlines.rs`).
    pub claims: Claims,
    /// What this process wrote last, for the scheduler's read-your-writes (`written.rs`).
    pub written_instances: Written<GpuInstance>,
    pub written_jobs: Written<VideoJob>,
    recorder: Recorder,
    stores: Stores,
    /// Provider entries skipped after failures.
    backoff: Registry<EntryKey, ProviderBackoff>,
    /// When each serverless entry's settings were last compared with the endpoint's.
    endpoint_sync: Throttle<EntryKey>,
    /// Consecutive reconcile failures of each object, for the error policy's back-off.
    failures: Registry<ObjectKey, u32>,
    /// When each Ready instance (by UID) was last asked of its provider.
    liveness: Throttle<String>,
    /// When each pool's status was last written.
    pool_status_written: Throttle<PoolKey>,
    /// Instances (by UID) whose final cost was counted in `spend_total`, and when.
    spend_counted: Throttle<String>,
    /// Warnings given once per pool and text (a deprecated API named).
    warned: Registry<(PoolKey, String), ()>,
    ready: AtomicBool,
    standby: AtomicBool,
}

impl Context {
    pub fn new(
        client: Client,
        config: ControllerConfig,
        clock: Arc<dyn Clock>,
        metrics: Arc<Metrics>,
        providers: Providers,
        instance: Option<String>,
        stores: Stores,
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
            sessions: SessionTokens::default(),
            deadlines: Deadlines::default(),
            claims: Claims::default(),
            written_instances: Written::default(),
            written_jobs: Written::default(),
            stores,
            backoff: Registry::default(),
            endpoint_sync: Throttle::default(),
            failures: Registry::default(),
            liveness: Throttle::default(),
            pool_status_written: Throttle::default(),
            spend_counted: Throttle::default(),
            warned: Registry::default(),
            ready: AtomicBool::new(false),
            standby: AtomicBool::new(false),
        }
    }

    pub fn now(&self) -> Timestamp {
        self.clock.now()
    }

    /// The caches the watches fill.
    pub fn stores(&self) -> &Stores {
        &self.stores
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

    /// Counts one more reconcile failure in a row of `obj`.
    pub fn note_failure(&self, obj: ObjectKey) -> u32 {
        let mut f = self.failures.lock();
        let n = f.entry(obj).or_default();
        *n += 1;
        *n
    }

    pub fn clear_failures(&self, obj: &ObjectKey) {
        self.failures.remove(obj);
    }

    /// Skips provider entry `entry` for a while: the configured back-off, doubling per
    /// failure in a row up to 8 times it.
    pub fn back_off_provider(&self, entry: EntryKey, message: String, cause: Cause) {
        self.record_backoff(entry, message, cause == Cause::Unusable, Growth::Doubling);
    }

    /// Marks provider entry `entry` unusable as configured (a Secret or key missing): skipped
    /// for one base back-off period, then checked again. Unlike a failure at the provider the
    /// period does not grow, so a fixed Secret is picked up within one period. True when the
    /// message is new (worth an event).
    pub fn provider_misconfigured(&self, entry: EntryKey, message: String) -> bool {
        self.record_backoff(entry, message, true, Growth::Fixed)
    }

    /// Records one more failure of a provider; true when its message or state changed.
    fn record_backoff(
        &self,
        key: EntryKey,
        message: String,
        unavailable: bool,
        growth: Growth,
    ) -> bool {
        let now = self.now();
        let mut b = self.backoff.lock();
        let entry = b.entry(key).or_insert(ProviderBackoff {
            until: now,
            failures: 0,
            message: String::new(),
            unavailable,
        });
        let changed = entry.message != message || entry.unavailable != unavailable;
        entry.failures += 1;
        let factor = match growth {
            Growth::Doubling => 1u32 << (entry.failures - 1).min(3),
            Growth::Fixed => 1,
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
    pub fn provider_succeeded(&self, entry: &EntryKey) {
        self.backoff.remove(entry);
    }

    /// The back-off of a provider entry, if it is still in force.
    pub fn provider_backoff(&self, entry: &EntryKey) -> Option<ProviderBackoff> {
        let now = self.now();
        self.backoff.get(entry).filter(|b| b.until > now)
    }

    /// Whether the settings of a serverless entry are due for comparison (and marks them done).
    pub fn endpoint_sync_due(&self, entry: EntryKey, every: Duration) -> bool {
        self.endpoint_sync.due(entry, every, self.now())
    }

    /// Makes the next reconcile compare the entry's settings again.
    pub fn endpoint_sync_failed(&self, entry: &EntryKey) {
        self.endpoint_sync.remove(entry);
    }

    /// Whether the Ready instance with this UID is due a liveness check (none in the last
    /// `liveness_interval`); if so, the check is counted as done now. A reconcile caused by a
    /// job being bound or freed therefore never waits for the provider.
    pub fn liveness_due(&self, instance_uid: &str) -> bool {
        self.liveness.due(
            instance_uid.into(),
            self.config.liveness_interval,
            self.now(),
        )
    }

    /// `None` when the pool's status may be written now (and counts it as written), else how
    /// long until it may: a write of counts alone waits `interval` after the previous write.
    pub fn pool_status_wait(
        &self,
        pool: &GpuPool,
        counts_only: bool,
        interval: Duration,
    ) -> Option<Duration> {
        let key = PoolKey::of(pool);
        if counts_only {
            self.pool_status_written.wait(key, interval, self.now())
        } else {
            self.pool_status_written.insert(key, self.now());
            None
        }
    }

    /// True the first time it is asked for `instance_uid` (within 10 minutes): the finalizer
    /// can run twice for one instance (a reconcile queued by its own status write runs
    /// before the finalizer's removal reaches the cache), and the final cost and the
    /// Destroyed event must be counted once.
    pub fn first_final_accounting(&self, instance_uid: &str) -> bool {
        self.spend_counted
            .first_within(instance_uid.into(), Duration::from_secs(600), self.now())
    }

    /// Drops what this process remembers of an instance that is going away.
    pub fn forget_instance(&self, instance_uid: &str) {
        self.sessions.forget(instance_uid);
        self.claims.forget(instance_uid);
        self.liveness.remove(&instance_uid.to_string());
    }

    /// True the first time this process is asked about `what` for `pool`: a warning worth
    /// one event, not one per reconcile.
    pub fn first_warning(&self, pool: &PoolKey, what: &str) -> bool {
        self.warned
            .insert((pool.clone(), what.to_string()), ())
            .is_none()
    }

    /// Drops what this process remembers of a pool that is gone.
    pub fn forget_pool(&self, pool: &PoolKey) {
        self.warned.forget(|(p, _)| p == pool);
        self.backoff.forget(|k| &k.pool == pool);
        self.endpoint_sync.forget(|k| &k.pool == pool);
        self.pool_status_written.remove(pool);
    }

    /// Drops what this process remembers of any deleted object.
    pub fn forget_object(&self, obj: &ObjectKey) {
        self.failures.remove(obj);
    }

    /// How many entries the registries hold, for tests and the memory benchmark.
    pub fn remembered(&self) -> usize {
        self.backoff.len()
            + self.endpoint_sync.len()
            + self.failures.len()
            + self.liveness.len()
            + self.pool_status_written.len()
            + self.spend_counted.len()
            + self.warned.len()
            + self.sessions.len()
            + self.deadlines.len()
    }

    /// Publishes an event about `obj` in the background, as client-go's recorder does: an
    /// event is never on the path of a job, and failing to publish never fails a reconcile.
    pub async fn event<K>(&self, obj: &K, type_: EventType, reason: &str, note: String)
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
            type_,
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
