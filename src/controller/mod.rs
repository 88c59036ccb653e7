//! The reconcilers and the pure decisions they rest on.
//!
//! `pool` schedules (binds pending jobs to idle instances, creates instances, sends jobs to
//! serverless endpoints); `instance` rents, watches and destroys machines and applies the
//! idle rule; `job` dispatches to workers and endpoints and finishes jobs; `sweep` destroys
//! machines that carry this cluster's label and have no GpuInstance. `scheduling` and
//! `idle` hold the decisions as pure functions. Every side effect goes through [`Context`].

pub mod context;
pub mod dispatch;
pub mod idle;
pub mod instance;
pub mod job;
pub mod pool;
pub mod providers;
pub mod scheduling;
pub mod status;
pub mod sweep;

use std::{sync::Arc, time::Duration};

use futures::{StreamExt, future::join_all};
use kube::{
    Api,
    runtime::{Controller, controller::Action, reflector::ObjectRef, watcher},
};
use tracing::{info, warn};

pub use context::Context;

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
    #[error("{0}")]
    Config(String),
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
            Error::Config(_) => "Config",
            Error::TeardownPending(_) => "TeardownPending",
        }
    }

    /// A write refused because the object changed since it was read: just look again.
    pub fn is_conflict(&self) -> bool {
        matches!(self, Error::Kube(kube::Error::Api(s)) if s.code == 409)
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Back-off of the error policy: quick for conflicts, growing for the rest up to a minute.
fn error_requeue(error: &Error, ctx: &Context, key: &str) -> Action {
    if error.is_conflict() {
        return Action::requeue(Duration::from_millis(200));
    }
    let failures = ctx.note_failure(key);
    let secs = (1u64 << failures.min(6)).min(60);
    Action::requeue(Duration::from_secs(secs))
}

/// Runs the three controllers and the orphan sweep until shutdown.
pub async fn run(ctx: Arc<Context>) {
    let client = ctx.client.clone();
    let ns = ctx.config.namespace.clone();
    let api = |ns: &Option<String>| -> (Api<GpuPool>, Api<GpuInstance>, Api<VideoJob>) {
        match ns {
            Some(n) => (
                Api::namespaced(client.clone(), n),
                Api::namespaced(client.clone(), n),
                Api::namespaced(client.clone(), n),
            ),
            None => (
                Api::all(client.clone()),
                Api::all(client.clone()),
                Api::all(client.clone()),
            ),
        }
    };
    let (pools, instances, jobs) = api(&ns);
    let wc = watcher::Config::default().any_semantic();

    let pool_ctrl = Controller::new(pools.clone(), wc.clone())
        .watches(jobs.clone(), wc.clone(), |job: VideoJob| {
            job.metadata
                .namespace
                .clone()
                .map(|ns| ObjectRef::new(&job.spec.pool).within(&ns))
        })
        .watches(instances.clone(), wc.clone(), |gi: GpuInstance| {
            gi.metadata
                .namespace
                .clone()
                .map(|ns| ObjectRef::new(&gi.spec.pool).within(&ns))
        })
        .shutdown_on_signal();
    let instance_ctrl = Controller::new(instances.clone(), wc.clone())
        .watches(jobs.clone(), wc.clone(), |job: VideoJob| {
            let ns = job.metadata.namespace.clone()?;
            let inst = job.status.as_ref()?.instance.clone()?;
            Some(ObjectRef::new(&inst).within(&ns))
        })
        .shutdown_on_signal();
    let job_ctrl = Controller::new(jobs.clone(), wc.clone()).shutdown_on_signal();

    ctx.set_stores(pool_ctrl.store(), instance_ctrl.store(), job_ctrl.store());

    let pool_run = pool_ctrl
        .run(pool::reconcile, pool::error_policy, ctx.clone())
        .for_each(|r| async move { log_outcome("GpuPool", r) });
    let inst_run = instance_ctrl
        .run(instance::reconcile, instance::error_policy, ctx.clone())
        .for_each(|r| async move { log_outcome("GpuInstance", r) });
    let job_run = job_ctrl
        .run(job::reconcile, job::error_policy, ctx.clone())
        .for_each(|r| async move { log_outcome("VideoJob", r) });
    let ready = {
        let ctx = ctx.clone();
        async move {
            ctx.wait_until_synced().await;
            info!("caches synced; ready");
            ctx.set_ready();
        }
    };
    let sweep = sweep::run(ctx.clone());
    info!(cluster_id = %ctx.config.cluster_id, "gpupool controllers starting");
    futures::future::select(
        Box::pin(join_all([
            Box::pin(pool_run) as std::pin::Pin<Box<dyn Future<Output = ()> + Send>>,
            Box::pin(inst_run),
            Box::pin(job_run),
            Box::pin(ready),
        ])),
        Box::pin(sweep),
    )
    .await;
    info!("controllers stopped");
}

fn log_outcome<K, E: std::fmt::Display>(kind: &str, r: Result<(ObjectRef<K>, Action), E>)
where
    K: kube::Resource,
{
    if let Err(e) = r {
        warn!(kind, error = %e, "reconcile failed");
    }
}
