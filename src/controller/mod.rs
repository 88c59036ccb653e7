//! The reconcilers and the pure decisions they rest on.
//!
//! `pool` schedules (binds pending jobs to idle instances, creates instances, sends jobs to
//! serverless endpoints); `instance` rents, watches and destroys machines and applies the
//! idle rule; `job` dispatches to workers and endpoints and finishes jobs; `sweep` destroys
//! machines that carry this cluster's label and have no GpuInstance. `scheduling` and
//! `idle` hold the decisions as pure functions. Every side effect goes through [`Context`].

pub mod context;
pub mod deadlines;
pub mod dispatch;
mod fanout;
#[cfg(test)]
mod fixtures;
pub mod idle;
pub mod instance;
pub mod job;
pub mod pool;
pub mod preemption;
pub mod providers;
pub mod registry;
pub mod scheduling;
pub mod session;
pub mod status;
pub mod sweep;
pub mod written;

use std::{sync::Arc, time::Duration};

use futures::{FutureExt, StreamExt, TryFuture, future::join_all};
use k8s_openapi::NamespaceResourceScope;
use kube::{
    Api, Resource, ResourceExt,
    runtime::{
        Controller,
        controller::{self, Action},
        reflector::ObjectRef,
    },
};
use tracing::{info, warn};

pub use context::Context;
use fanout::{Seen, channel_stream, watch_and_fan_out};

use crate::{
    crd::{GpuInstance, GpuPool, VideoJob},
    provider::ProviderError,
    worker::WorkerError,
};

/// What a reconcile can fail with. The error policy requeues with back-off; permanent
/// problems become conditions and events inside the reconcilers instead.
#[derive(thiserror::Error, Debug)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error(transparent)]
    Provider(#[from] ProviderError),
    #[error(transparent)]
    Worker(#[from] WorkerError),
    /// A reference the user must fix: a Secret or key that is missing, empty or not text, a
    /// provider entry that does not exist or is of the wrong kind, a pool without a worker,
    /// an instance without its session token. Reconcilers turn it into a condition and an
    /// event; the message names the object, never a secret.
    #[error("{0}")]
    BadReference(String),
    /// The finalizer helper could not add or remove a finalizer, or the object had no name.
    #[error("finalizer: {0}")]
    Finalizer(String),
    #[error("encoding an object: {0}")]
    Serialize(#[from] serde_json::Error),
    /// A write that kept conflicting with concurrent writers.
    #[error("{0}")]
    ConflictsExhausted(String),
    #[error("teardown of {0} is not confirmed yet")]
    TeardownPending(String),
}

impl Error {
    /// Short, stable name for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Error::Kube(kube::Error::Api(s)) if s.code == 409 => "Conflict",
            Error::Kube(_) => "Kube",
            Error::Provider(e) => e.label(),
            Error::Worker(e) => e.label(),
            Error::BadReference(_) => "BadReference",
            Error::Finalizer(_) => "Finalizer",
            Error::Serialize(_) => "Serialize",
            Error::ConflictsExhausted(_) => "ConflictsExhausted",
            Error::TeardownPending(_) => "TeardownPending",
        }
    }

    /// A write refused because the object changed since it was read: just look again.
    pub fn is_conflict(&self) -> bool {
        matches!(self, Error::Kube(kube::Error::Api(s)) if s.code == 409)
    }

    /// The API server could not be reached or answered that it is unavailable: the same
    /// request may well succeed a moment later.
    pub fn is_unavailable(&self) -> bool {
        match self {
            Error::Kube(kube::Error::Api(s)) => s.code >= 500 || s.code == 429,
            Error::Kube(
                kube::Error::Service(_)
                | kube::Error::HyperError(_)
                | kube::Error::HttpError(_)
                | kube::Error::ReadEvents(_),
            ) => true,
            _ => false,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Back-off after `failures` failures in a row: quick for a conflict (another writer won; look
/// again), otherwise 2 s doubling up to a minute.
pub fn backoff(error: &Error, failures: u32) -> Duration {
    if error.is_conflict() {
        return Duration::from_millis(200);
    }
    Duration::from_secs((1u64 << failures.clamp(1, 6)).min(60))
}

/// The error policy of every controller: the failure counted by kind and class, logged
/// unless it is a conflict, and the object requeued with a back-off that grows with the
/// failures in a row.
pub fn error_policy<K: Resource<DynamicType = ()>>(
    obj: Arc<K>,
    error: &Error,
    ctx: Arc<Context>,
) -> Action {
    let kind = K::kind(&());
    let key = registry::ObjectKey::of(obj.as_ref());
    ctx.metrics
        .reconcile_errors
        .get_or_create(&crate::metrics::ReconcileLabels {
            kind: kind.to_string(),
            error: error.label().into(),
        })
        .inc();
    if error.is_conflict() {
        return Action::requeue(backoff(error, 0));
    }
    warn!(object = %key, error = %error, "{kind} reconcile failed");
    let failures = ctx.note_failure(key);
    Action::requeue(backoff(error, failures))
}

/// Every reconcile's outcome on its way out: a success forgets the object's failures, so
/// the next error starts the back-off from the beginning again.
pub fn settle<K: Resource<DynamicType = ()>>(
    obj: &K,
    ctx: &Context,
    result: Result<Action>,
) -> Result<Action> {
    if result.is_ok() {
        ctx.clear_failures(&registry::ObjectKey::of(obj));
    }
    result
}

/// The finalizer helper's outcome as a reconcile's: the reconciler's own error as it is,
/// the helper's failures to patch the finalizer as API errors.
pub fn from_finalizer(
    result: Result<Action, kube::runtime::finalizer::Error<Error>>,
) -> Result<Action> {
    use kube::runtime::finalizer::Error as F;
    match result {
        Ok(action) => Ok(action),
        Err(F::ApplyFailed(e) | F::CleanupFailed(e)) => Err(e),
        Err(F::AddFinalizer(e) | F::RemoveFinalizer(e)) => Err(Error::Kube(e)),
        Err(e) => Err(Error::Finalizer(e.to_string())),
    }
}

/// Job reconciles at once, at most. Unbounded (kube-runtime's default), a restart with
/// 10,000 jobs stored started all 10,000 reconciles at once. Dispatch runs in tasks of its
/// own, outside this bound. Instance reconciles stay unbounded: one that waits for the
/// provider quota (a provisioning poll) would hold a slot that a teardown needs, and a
/// bound of 64 made destroys wait up to 97 s behind 200 starting machines at 5 requests/s.
const JOB_RECONCILE_CONCURRENCY: u16 = 64;

/// Runs the three controllers and the orphan sweep until shutdown.
pub async fn run(ctx: Arc<Context>, writers: context::Writers) {
    let seen = ctx.clone();
    let (pool_store, mut pool_rx, pool_watch) =
        watch_and_fan_out(api::<GpuPool>(&ctx), writers.pools, 1, move |how, pool| {
            if how == Seen::Deleted {
                seen.forget_object(&registry::ObjectKey::of(pool));
                seen.forget_pool(&registry::PoolKey::of(pool));
            }
        });
    let seen = ctx.clone();
    let (inst_store, mut inst_rx, inst_watch) =
        watch_and_fan_out(api(&ctx), writers.instances, 2, move |how, gi| {
            seen.written_instances.observed(gi);
            if how == Seen::Deleted {
                seen.forget_object(&registry::ObjectKey::of(gi));
                seen.forget_instance(&gi.uid().unwrap_or_default());
            }
        });
    let seen = ctx.clone();
    let (job_store, mut job_rx, job_watch) =
        watch_and_fan_out(api(&ctx), writers.jobs, 3, move |how, job| {
            seen.written_jobs.observed(job);
            if how == Seen::Deleted {
                seen.forget_object(&registry::ObjectKey::of(job));
            }
        });
    let pool_ctrl = Controller::for_shared_stream(channel_stream(pool_rx.remove(0)), pool_store)
        .watches_shared_stream(channel_stream(job_rx.remove(0)), pool_of_job)
        .watches_shared_stream(channel_stream(inst_rx.remove(0)), pool_of_instance)
        .shutdown_on_signal();
    let instance_ctrl =
        Controller::for_shared_stream(channel_stream(inst_rx.remove(0)), inst_store)
            .watches_shared_stream(channel_stream(job_rx.remove(0)), instance_of_job)
            .shutdown_on_signal();
    let job_ctrl = Controller::for_shared_stream(channel_stream(job_rx.remove(0)), job_store)
        .with_config(
            kube::runtime::controller::Config::default().concurrency(JOB_RECONCILE_CONCURRENCY),
        )
        .shutdown_on_signal();

    // No reconcile may run before every cache is filled: a pool that saw its jobs but not
    // yet its instances would rent machines it already has.
    let synced = {
        let ctx = ctx.clone();
        async move {
            ctx.wait_until_synced().await;
            info!("caches synced; ready");
            ctx.set_ready();
        }
        .boxed()
        .shared()
    };
    info!(cluster_id = %ctx.config.cluster_id, "gpupool controllers starting");
    let controllers = join_all([
        run_controller(pool_ctrl, pool::reconcile, ctx.clone(), synced.clone()).boxed(),
        run_controller(
            instance_ctrl,
            instance::reconcile,
            ctx.clone(),
            synced.clone(),
        )
        .boxed(),
        run_controller(job_ctrl, job::reconcile, ctx.clone(), synced.clone()).boxed(),
        synced.boxed(),
    ]);
    let watches = join_all([
        pool_watch.boxed(),
        inst_watch.boxed(),
        job_watch.boxed(),
        sweep::run(ctx.clone()).boxed(),
    ]);
    // The controllers end on SIGTERM/SIGINT; the watches and the sweep never end by themselves.
    futures::future::select(controllers, watches).await;
    info!("controllers stopped");
}

/// A job's changes wake its pool.
fn pool_of_job(job: Arc<VideoJob>) -> Option<ObjectRef<GpuPool>> {
    let ns = job.metadata.namespace.as_deref()?;
    Some(ObjectRef::new(&job.spec.pool).within(ns))
}

/// An instance's changes wake its pool.
fn pool_of_instance(gi: Arc<GpuInstance>) -> Option<ObjectRef<GpuPool>> {
    let ns = gi.metadata.namespace.as_deref()?;
    Some(ObjectRef::new(&gi.spec.pool).within(ns))
}

/// A job's changes wake the instance it is bound to, if any.
fn instance_of_job(job: Arc<VideoJob>) -> Option<ObjectRef<GpuInstance>> {
    let ns = job.metadata.namespace.as_deref()?;
    let inst = job.status.as_ref()?.instance.as_deref()?;
    Some(ObjectRef::new(inst).within(ns))
}

/// The namespace the operator watches (`config.namespace`), or every namespace.
fn api<K>(ctx: &Context) -> Api<K>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>,
{
    match &ctx.config.namespace {
        Some(n) => Api::namespaced(ctx.client.clone(), n),
        None => Api::all(ctx.client.clone()),
    }
}

/// One controller: no reconcile before `synced` (every cache holds its first list), then
/// `reconcile` with the shared error policy until shutdown, each outcome logged.
async fn run_controller<K, F>(
    controller: Controller<K>,
    reconcile: impl FnMut(Arc<K>, Arc<Context>) -> F,
    ctx: Arc<Context>,
    synced: impl Future<Output = ()>,
) where
    K: Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
    F: TryFuture<Ok = Action, Error = Error> + Send + 'static,
{
    synced.await;
    let kind = K::kind(&());
    controller
        .run(reconcile, error_policy, ctx)
        .for_each(|r| {
            log_outcome(&kind, r);
            futures::future::ready(())
        })
        .await
}

/// A reconcile that will simply be retried: a write that lost to another writer (409), or a
/// trigger for an object that is gone from the cache (expected after deletes).
fn is_expected<Q>(e: &controller::Error<Error, Q>) -> bool {
    match e {
        controller::Error::ReconcilerFailed(err, _) => err.is_conflict(),
        controller::Error::ObjectNotFound(_) => true,
        _ => false,
    }
}

fn log_outcome<K, Q>(kind: &str, r: Result<(ObjectRef<K>, Action), controller::Error<Error, Q>>)
where
    K: Resource,
    Q: std::error::Error,
{
    if let Err(e) = r {
        // Conflicts are retried at once and deleted objects are expected; neither is news.
        if is_expected(&e) {
            tracing::debug!(kind, error = %e, "reconcile will be retried");
        } else {
            warn!(kind, error = %e, "reconcile failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{sync::Arc, time::Duration};

    use kube::{
        api::ObjectMeta,
        runtime::{
            controller::{self, Action},
            reflector::ObjectRef,
            watcher,
        },
    };

    use super::{
        Context, Error, backoff,
        context::ControllerConfig,
        error_policy, instance_of_job, is_expected, pool_of_instance, pool_of_job,
        providers::{ProviderFactory, Providers},
        settle,
    };
    use crate::{
        clock::SystemClock,
        crd::{GpuInstance, GpuInstanceSpec, GpuPool, ProviderSpec, VideoJob},
        metrics::Metrics,
        provider::{Credentials, InstanceProvider, ProviderError, ServerlessProvider},
        worker::WorkerClientConfig,
    };

    struct NoProviders;

    impl ProviderFactory for NoProviders {
        fn instance(
            &self,
            _: &GpuPool,
            _: &ProviderSpec,
            _: Credentials,
        ) -> Result<Arc<dyn InstanceProvider>, ProviderError> {
            Err(ProviderError::Permanent(
                "no providers in unit tests".into(),
            ))
        }
        fn serverless(
            &self,
            _: &ProviderSpec,
            _: Credentials,
        ) -> Result<Arc<dyn ServerlessProvider>, ProviderError> {
            Err(ProviderError::Permanent(
                "no providers in unit tests".into(),
            ))
        }
    }

    /// A Context whose API server refuses every request: enough for what never calls it.
    fn offline_context() -> Arc<Context> {
        let refuse = tower::service_fn(|_: http::Request<kube::client::Body>| async {
            Err::<http::Response<kube::client::Body>, _>(std::io::Error::other(
                "no API server in unit tests",
            ))
        });
        let client = kube::Client::new(refuse, "default");
        let providers = Providers::new(
            client.clone(),
            Box::new(NoProviders),
            WorkerClientConfig::default(),
        );
        Arc::new(Context::new(
            client,
            ControllerConfig::default(),
            Arc::new(SystemClock),
            Arc::new(Metrics::new()),
            providers,
            None,
            super::context::caches().0,
        ))
    }

    fn instance(name: &str) -> Arc<GpuInstance> {
        Arc::new(GpuInstance {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("media".into()),
                ..Default::default()
            },
            spec: GpuInstanceSpec {
                pool: "p".into(),
                provider: "vast".into(),
                capacity_type: Default::default(),
            },
            status: None,
        })
    }

    fn transient() -> Error {
        Error::Provider(ProviderError::Transient("503".into()))
    }

    #[test]
    fn backoff_doubles_to_a_minute_and_conflicts_retry_at_once() {
        let secs: Vec<u64> = (1..=8)
            .map(|n| backoff(&transient(), n).as_secs())
            .collect();
        assert_eq!(secs, [2, 4, 8, 16, 32, 60, 60, 60]);
        let conflict = Error::Kube(kube::Error::Api(
            kube::core::Status::failure("conflict", "Conflict")
                .with_code(409)
                .boxed(),
        ));
        assert_eq!(backoff(&conflict, 5), Duration::from_millis(200));
    }

    #[tokio::test]
    async fn a_successful_reconcile_restarts_the_back_off() {
        let ctx = offline_context();
        let gi = instance("gi-1");
        let other = instance("gi-2");
        for want in [2, 4, 8] {
            let action = error_policy(gi.clone(), &transient(), ctx.clone());
            assert_eq!(action, Action::requeue(Duration::from_secs(want)));
        }
        // Another object's failures are its own.
        assert_eq!(
            error_policy(other.clone(), &transient(), ctx.clone()),
            Action::requeue(Duration::from_secs(2))
        );
        // A failed reconcile passes its error through and keeps the count...
        assert!(settle(gi.as_ref(), &ctx, Err(transient())).is_err());
        assert_eq!(
            error_policy(gi.clone(), &transient(), ctx.clone()),
            Action::requeue(Duration::from_secs(16))
        );
        // ...a successful one forgets it (the GpuInstance reconcile used to skip this, so an
        // instance's back-off only grew).
        let ok = settle(gi.as_ref(), &ctx, Ok(Action::await_change())).unwrap();
        assert_eq!(ok, Action::await_change());
        assert_eq!(
            error_policy(gi.clone(), &transient(), ctx.clone()),
            Action::requeue(Duration::from_secs(2))
        );
        assert_eq!(
            error_policy(other, &transient(), ctx.clone()),
            Action::requeue(Duration::from_secs(4))
        );
        let errors = ctx.metrics.render();
        assert!(
            errors.contains(
                r#"gpupool_reconcile_errors_total{kind="GpuInstance",error="Transient"} 7"#
            ),
            "{errors}"
        );
    }

    fn conflict() -> Error {
        Error::Kube(kube::Error::Api(
            kube::core::Status::failure("the object has been modified", "Conflict")
                .with_code(409)
                .boxed(),
        ))
    }

    #[test]
    fn conflicts_and_vanished_objects_are_expected_outcomes_other_failures_are_not() {
        type E = controller::Error<Error, watcher::Error>;
        let obj = || Box::new(ObjectRef::<GpuPool>::new("p").within("media").erase());
        assert!(is_expected(&E::ReconcilerFailed(conflict(), obj())));
        assert!(is_expected(&E::ObjectNotFound(obj())));
        assert!(!is_expected(&E::ReconcilerFailed(transient(), obj())));
        // Classified by variant, not by text: a provider's message that says "Conflict" is
        // no Kubernetes write conflict, and a 404 is not an object missing from the cache.
        let provider = Error::Provider(ProviderError::Transient("409 Conflict".into()));
        assert!(!is_expected(&E::ReconcilerFailed(provider, obj())));
        let gone = Error::Kube(kube::Error::Api(
            kube::core::Status::failure("not found in local store", "NotFound")
                .with_code(404)
                .boxed(),
        ));
        assert!(!is_expected(&E::ReconcilerFailed(gone, obj())));
        assert!(!is_expected(&E::QueueError(
            watcher::Error::NoResourceVersion
        )));
    }

    #[test]
    fn a_job_wakes_its_pool_and_its_instance_an_instance_its_pool() {
        let job = |status: serde_json::Value| -> Arc<VideoJob> {
            Arc::new(
                serde_json::from_value(serde_json::json!({
                    "apiVersion": "gpupool.dev/v1alpha1", "kind": "VideoJob",
                    "metadata": {"name": "j", "namespace": "media"},
                    "spec": {"pool": "p", "operation": "caption", "input": {}},
                    "status": status,
                }))
                .unwrap(),
            )
        };
        let bound = job(serde_json::json!({"instance": "gi-1"}));
        assert_eq!(
            pool_of_job(bound.clone()),
            Some(ObjectRef::new("p").within("media"))
        );
        assert_eq!(
            instance_of_job(bound),
            Some(ObjectRef::new("gi-1").within("media"))
        );
        assert_eq!(instance_of_job(job(serde_json::json!({}))), None);
        assert_eq!(
            pool_of_instance(instance("gi-1")),
            Some(ObjectRef::new("p").within("media"))
        );
    }

    #[tokio::test]
    async fn what_the_context_remembers_goes_with_the_deleted_object() {
        use super::{
            context::Cause,
            registry::{ObjectKey, PoolKey},
        };
        let ctx = offline_context();
        let pool = PoolKey::new("media", "p");
        let other = PoolKey::new("media", "q");
        ctx.back_off_provider(pool.entry("vast"), "no capacity".into(), Cause::Refused);
        ctx.back_off_provider(other.entry("vast"), "no capacity".into(), Cause::Refused);
        assert!(ctx.provider_backoff(&pool.entry("vast")).is_some());
        assert!(ctx.endpoint_sync_due(pool.entry("rp"), Duration::from_secs(60)));
        assert!(ctx.liveness_due("gi-1-uid"));
        let gi = instance("gi-1");
        error_policy(gi.clone(), &transient(), ctx.clone());
        assert_eq!(ctx.remembered(), 5);

        ctx.forget_pool(&pool);
        assert!(ctx.provider_backoff(&pool.entry("vast")).is_none());
        assert!(
            ctx.provider_backoff(&other.entry("vast")).is_some(),
            "other pools keep theirs"
        );
        ctx.forget_instance("gi-1-uid");
        ctx.forget_object(&ObjectKey::of(gi.as_ref()));
        assert_eq!(ctx.remembered(), 1);
    }
}
