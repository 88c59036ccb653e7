//! The GpuInstance reconciler: rents the machine, waits until it is Ready, watches it while
//! it works, destroys it at its idle deadline, and holds the object until the provider
//! confirms the machine is gone.
//!
//! Order of events that makes create idempotent across crashes: the GpuInstance and its
//! finalizer exist first (the pool creates them so); `provisioningStartedAt` is written
//! before the provider is called; the provider machine carries the label
//! `gpupool-{clusterId}-{uid}`, looked up before every create, so a machine created by a
//! call whose answer was lost is adopted, not duplicated.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::Duration,
};

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::runtime::events::EventType;
use kube::{
    Api, ResourceExt,
    api::DeleteParams,
    runtime::{
        controller::Action,
        finalizer::{Event as Finalizer, finalizer},
    },
};
use tracing::{info, instrument};

use crate::{
    crd::{
        ConditionType, GpuInstance, GpuInstanceStatus, GpuPool, INSTANCE_FINALIZER, InstancePhase,
        JobPhase, Money, OfferInfo, VideoJob, WorkerSpec,
    },
    provider::{
        CreateRequest, Credentials, ENV_API_KEY, ENV_SESSION_TOKEN, ENV_WORKER_HEALTH_PATH,
        ENV_WORKER_PORT, InstanceProvider, Offer, ProviderError, RemoteInstance, RemoteState,
        instance_label, quota::teardown_lane,
    },
};

use super::{
    Context, Error, Result,
    context::Cause,
    deadlines, from_finalizer,
    idle::IdleDecision,
    preemption,
    registry::PoolKey,
    settle,
    status::{apply_status, offer_price, remove_condition, seconds_between, set_condition},
};

/// Offers tried per provisioning attempt before the provider counts as out of capacity.
const OFFERS_TRIED: usize = 3;
#[instrument(skip_all, fields(ns = gi.namespace().unwrap_or_default(), name = gi.name_any()))]
pub async fn reconcile(gi: Arc<GpuInstance>, ctx: Arc<Context>) -> Result<Action> {
    let ns = gi.namespace().unwrap_or_default();
    let api: Api<GpuInstance> = Api::namespaced(ctx.client.clone(), &ns);
    let result = finalizer(&api, INSTANCE_FINALIZER, gi.clone(), |event| async {
        match event {
            Finalizer::Apply(gi) => apply(gi, &ctx, &api).await,
            // Destroying a machine stops a bill: its provider calls go before any other.
            Finalizer::Cleanup(gi) => teardown_lane(cleanup(gi, &ctx, &api)).await,
        }
    })
    .await;
    settle(gi.as_ref(), &ctx, from_finalizer(result))
}

fn status_of(gi: &GpuInstance) -> GpuInstanceStatus {
    gi.status.clone().unwrap_or_default()
}

fn ts(t: Timestamp) -> Option<MicroTime> {
    Some(MicroTime(t))
}

/// What the instance needs of its pool; missing pool or entry is reported, not fatal.
fn pool_of(ctx: &Context, gi: &GpuInstance) -> Option<Arc<GpuPool>> {
    ctx.pool(&gi.namespace().unwrap_or_default(), &gi.spec.pool)
}

/// What the reconcile does next with an instance, decided from what the caches show and the
/// time; [`plan`] makes it without a client, so each rule is unit-tested.
#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    /// Pending: rent a machine (or adopt one made for it).
    Provision,
    /// Provisioning for longer than the pool allows: fail it, the pool replaces it.
    ProvisionTimedOut,
    /// Provisioning but no machine id recorded: back to Pending to look for it.
    BackToPending,
    /// Provisioning: ask the provider about machine `id`, then the worker.
    Poll { id: String },
    /// Ready, and the job it names has finished, gone or moved: free it, idle from `at`.
    FreeStaleJob { at: Timestamp },
    /// Ready and working: look again at the next liveness check.
    Busy,
    /// Ready and idle: apply the idle rule (the pool's other idle instances are needed, so
    /// the decision itself is [`deadlines::decide`]).
    Idle,
    /// Failed or Terminating: delete the object (its finalizer destroys the machine).
    Delete,
}

/// The next step for `gi` of `pool` at `now`: `job` is the cached job it names, and
/// `dispatching` whether this replica is sending a job to it right now.
pub fn plan(
    gi: &GpuInstance,
    pool: &GpuPool,
    job: Option<&VideoJob>,
    dispatching: bool,
    now: Timestamp,
) -> Step {
    let status = status_of(gi);
    match status.phase.unwrap_or_default() {
        InstancePhase::Pending => Step::Provision,
        InstancePhase::Provisioning => {
            let started = status.provisioning_started_at.as_ref().map_or(now, |t| t.0);
            if seconds_between(started, now) > pool.spec.provision_timeout_seconds as f64 {
                Step::ProvisionTimedOut
            } else if let Some(id) = status.provider_instance_id {
                Step::Poll { id }
            } else {
                Step::BackToPending
            }
        }
        InstancePhase::Ready => match &status.current_job {
            None => Step::Idle,
            Some(_) if dispatching || still_bound(gi, job) => Step::Busy,
            // The job finished, was deleted, or moved: free the instance (the dispatcher
            // normally does this; this is the safety net after a crash).
            Some(_) => Step::FreeStaleJob {
                at: job
                    .and_then(|j| j.status.as_ref()?.finished_at.as_ref().map(|t| t.0))
                    .filter(|t| *t <= now)
                    .unwrap_or(now),
            },
        },
        InstancePhase::Failed | InstancePhase::Terminating => Step::Delete,
    }
}

/// Whether `job` (the one the instance names) still holds the instance: unfinished, and
/// either on it or still Pending (a binding under way).
fn still_bound(gi: &GpuInstance, job: Option<&VideoJob>) -> bool {
    job.is_some_and(|j| {
        let phase = j.status.as_ref().and_then(|s| s.phase).unwrap_or_default();
        let on_me =
            j.status.as_ref().and_then(|s| s.instance.as_deref()) == Some(gi.name_any().as_str());
        !phase.is_finished() && (on_me || phase == JobPhase::Pending)
    })
}

async fn apply(gi: Arc<GpuInstance>, ctx: &Arc<Context>, api: &Api<GpuInstance>) -> Result<Action> {
    let ns = gi.namespace().unwrap_or_default();
    let Some(pool) = pool_of(ctx, &gi) else {
        let message = format!("GpuPool {} not found", gi.spec.pool);
        return report_blocked(&gi, ctx, api, "PoolNotFound", message).await;
    };
    let job = status_of(&gi)
        .current_job
        .and_then(|name| ctx.job(&ns, &name));
    let dispatching = ctx.dispatcher.is_running_on(&gi.name_any());
    match plan(&gi, &pool, job.as_deref(), dispatching, ctx.now()) {
        Step::Provision => provision(gi, &pool, ctx, api).await,
        Step::ProvisionTimedOut => {
            let message = format!(
                "not Ready within {} s; replacing it",
                pool.spec.provision_timeout_seconds
            );
            fail(&gi, ctx, api, "ProvisionTimeout", message).await
        }
        Step::BackToPending => {
            let mut s = status_of(&gi);
            s.phase = Some(InstancePhase::Pending);
            apply_status(api, &gi, &s).await?;
            Ok(Action::requeue(Duration::ZERO))
        }
        Step::Poll { id } => poll(gi, &id, &pool, ctx, api).await,
        Step::FreeStaleJob { at } => {
            let mut s = status_of(&gi);
            s.current_job = None;
            s.idle_from(at, pool.spec.idle_timeout_seconds);
            apply_status(api, &gi, &s).await?;
            Ok(Action::requeue(Duration::ZERO))
        }
        Step::Busy => {
            // A busy interruptible machine is checked too: its job must not wait for a
            // machine the provider took back.
            if preemption::interruptible(&gi) && ctx.liveness_due(&gi.uid().unwrap_or_default()) {
                check_alive(&gi, &pool, ctx, api).await?;
            }
            Ok(Action::requeue(ctx.config.liveness_interval))
        }
        Step::Idle => idle(gi, &pool, ctx, api).await,
        Step::Delete => {
            delete_self(&gi, ctx).await?;
            Ok(Action::await_change())
        }
    }
}

/// Records why the instance cannot proceed (condition + event, once) and looks again later.
async fn report_blocked(
    gi: &GpuInstance,
    ctx: &Context,
    api: &Api<GpuInstance>,
    reason: &str,
    message: String,
) -> Result<Action> {
    let mut status = status_of(gi);
    if set_condition(
        &mut status.conditions,
        ConditionType::Ready,
        false,
        reason,
        &message,
        gi.metadata.generation,
        ctx.now(),
    ) {
        status.message = Some(message.clone());
        apply_status(api, gi, &status).await?;
        ctx.event(gi, EventType::Warning, reason, message).await;
    }
    Ok(Action::requeue(Duration::from_secs(30)))
}

/// Marks the instance Failed, says why, and deletes it (the finalizer destroys any machine).
async fn fail(
    gi: &GpuInstance,
    ctx: &Context,
    api: &Api<GpuInstance>,
    reason: &str,
    message: String,
) -> Result<Action> {
    let mut status = status_of(gi);
    status.fail(reason, message.clone(), gi.metadata.generation, ctx.now());
    let gi = apply_status(api, gi, &status).await?;
    ctx.event(&gi, EventType::Warning, reason, message).await;
    delete_self(&gi, ctx).await?;
    Ok(Action::await_change())
}

async fn delete_self(gi: &GpuInstance, ctx: &Context) -> Result<()> {
    let api: Api<GpuInstance> =
        Api::namespaced(ctx.client.clone(), &gi.namespace().unwrap_or_default());
    match api.delete(&gi.name_any(), &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// The instance's provider client, or the reason it cannot be built.
async fn provider_of(
    gi: &GpuInstance,
    pool: &GpuPool,
    ctx: &Context,
) -> Result<Arc<dyn InstanceProvider>> {
    ctx.providers.instance(pool, &gi.spec.provider).await
}

/// The request that rents this instance's machine. The Secrets it needs (the worker API key,
/// each `worker.env` `valueFrom`) are read from the pool's namespace now; their values go
/// only into the request.
async fn create_request(
    gi: &GpuInstance,
    pool: &GpuPool,
    ctx: &Context,
    token: &Credentials,
) -> Result<CreateRequest> {
    let worker = pool
        .spec
        .worker
        .as_ref()
        .ok_or_else(|| Error::BadReference("the pool has no worker section".into()))?;
    let ns = gi.namespace().unwrap_or_default();
    let from_secrets = ctx.providers.worker_env_secrets(&ns, worker).await?;
    let api_key = match &worker.api_key_secret_ref {
        Some(r) => Some(ctx.providers.secret(&ns, r).await?),
        None => None,
    };
    let (env, secret_env) = worker_env(worker, &from_secrets, token, api_key.as_ref());
    Ok(CreateRequest {
        label: instance_label(&ctx.config.cluster_id, &gi.uid().unwrap_or_default()),
        image: worker.image.clone(),
        env,
        secret_env,
        port: u16::try_from(worker.port).unwrap_or(8000),
        disk_gb: u32::try_from(worker.container_disk_gb).unwrap_or(10),
    })
}

/// The worker container's environment, and the names in it whose values came from Secrets
/// (`valueFrom`; the session token and API key are known secrets anyway). The pool's
/// `worker.env` comes first, a `valueFrom` entry with its value from `from_secrets`; then the
/// operator's own variables, which replace an entry of the same name (`GPUPOOL_API_KEY` only
/// when the pool has an API key).
pub fn worker_env(
    worker: &WorkerSpec,
    from_secrets: &BTreeMap<String, Credentials>,
    token: &Credentials,
    api_key: Option<&Credentials>,
) -> (BTreeMap<String, String>, BTreeSet<String>) {
    let mut env = BTreeMap::new();
    let mut secret_env = BTreeSet::new();
    for e in &worker.env {
        match (e.secret_key_ref(), from_secrets.get(&e.name)) {
            (None, _) => {
                secret_env.remove(&e.name);
                env.insert(e.name.clone(), e.value.clone());
            }
            (Some(_), Some(value)) => {
                secret_env.insert(e.name.clone());
                env.insert(e.name.clone(), value.expose().to_string());
            }
            // Not read: the caller refuses to rent rather than start a worker without it.
            (Some(_), None) => {}
        }
    }
    let own = [
        (ENV_SESSION_TOKEN, Some(token.expose().to_string())),
        (ENV_API_KEY, api_key.map(|k| k.expose().to_string())),
        (ENV_WORKER_PORT, Some(worker.port.to_string())),
        (ENV_WORKER_HEALTH_PATH, Some(worker.health_path.clone())),
    ];
    for (name, value) in own {
        if let Some(v) = value {
            secret_env.remove(name);
            env.insert(name.to_string(), v);
        }
    }
    (env, secret_env)
}

fn offer_info(remote: &RemoteInstance, offer: Option<&crate::provider::Offer>) -> OfferInfo {
    OfferInfo {
        offer_id: offer.map(|o| o.id.clone()),
        gpu_name: remote
            .gpu_name
            .clone()
            .or_else(|| offer.map(|o| o.gpu_name.clone())),
        num_gpus: remote
            .num_gpus
            .or(offer.map(|o| o.num_gpus))
            .and_then(|n| i32::try_from(n).ok()),
        price_per_hour: remote
            .price_per_hour
            .or(offer.map(|o| o.price_per_hour))
            .map(Money::new),
        region: remote
            .region
            .clone()
            .or_else(|| offer.and_then(|o| o.region.clone())),
    }
}

async fn provision(
    gi: Arc<GpuInstance>,
    pool: &GpuPool,
    ctx: &Context,
    api: &Api<GpuInstance>,
) -> Result<Action> {
    let entry = PoolKey::of(pool).entry(&gi.spec.provider);
    let provider = match provider_of(&gi, pool, ctx).await {
        Ok(p) => p,
        Err(Error::BadReference(msg)) => {
            ctx.back_off_provider(entry.clone(), msg.clone(), Cause::Unusable);
            return fail(&gi, ctx, api, "ProviderUnavailable", msg).await;
        }
        Err(Error::Provider(e)) => {
            let msg = e.to_string();
            ctx.back_off_provider(entry.clone(), msg.clone(), Cause::Unusable);
            return fail(&gi, ctx, api, "ProviderUnavailable", msg).await;
        }
        Err(e) => return Err(e),
    };
    let token = ctx.sessions.ensure(&ctx.client, &gi).await?;
    let request = match create_request(&gi, pool, ctx, &token).await {
        Ok(r) => r,
        // A Secret the worker needs went missing after the pool checked it: nothing is
        // rented, and the entry is skipped until the Secret is back (as the pool's check
        // would have done).
        Err(Error::BadReference(msg)) => {
            ctx.provider_misconfigured(entry.clone(), msg.clone());
            return fail(&gi, ctx, api, "ProviderUnavailable", msg).await;
        }
        Err(e) => return Err(e),
    };

    // Record the intent before the call that spends money.
    let mut gi = gi;
    if gi
        .status
        .as_ref()
        .and_then(|s| s.provisioning_started_at.as_ref())
        .is_none()
    {
        let mut status = status_of(&gi);
        status.phase = Some(InstancePhase::Pending);
        status.provisioning_started_at = ts(ctx.now());
        status.message = Some(format!("renting a machine from {}", gi.spec.provider));
        gi = Arc::new(apply_status(api, &gi, &status).await?);
    }

    // Adopt a machine created earlier for this instance (a crash, or a create whose answer
    // was an error although the machine was made).
    if let Some(found) = provider.find_by_label(&request.label).await? {
        info!(id = %found.id, "adopting the machine found with this instance's label");
        let note = format!(
            "adopted machine {} found with this instance's label",
            found.id
        );
        let gi = record_created(gi, ctx, api, found, None).await?;
        ctx.event(&gi, EventType::Normal, "Adopted", note).await;
        return Ok(Action::requeue(ctx.config.provision_poll));
    }

    match rent(&gi, provider.as_ref(), &request).await {
        Ok((remote, offer)) => {
            ctx.provider_succeeded(&entry);
            let note = format!(
                "rented {} ({}, {} USD/h) from {}",
                remote.id, offer.gpu_name, offer.price_per_hour, gi.spec.provider
            );
            let gi = record_created(gi, ctx, api, remote, Some(&offer)).await?;
            ctx.event(&gi, EventType::Normal, "Provisioning", note)
                .await;
            Ok(Action::requeue(ctx.config.provision_poll))
        }
        Err(e) => provider_failed(&gi, pool, ctx, api, e).await,
    }
}

/// Tries the provider's best offers in turn: the machine made and the offer it came from,
/// or why none could be rented (out of capacity when every offer tried was taken).
async fn rent(
    gi: &GpuInstance,
    provider: &dyn InstanceProvider,
    request: &CreateRequest,
) -> Result<(RemoteInstance, Offer), ProviderError> {
    let offers = provider.offers().await?;
    if offers.is_empty() {
        let why = "no offer matches the pool's limits";
        return Err(ProviderError::InsufficientCapacity(why.into()));
    }
    let mut last = None;
    for offer in offers.into_iter().take(OFFERS_TRIED) {
        match provider.create(&offer, request).await {
            Ok(remote) => return Ok((remote, offer)),
            Err(e @ ProviderError::InsufficientCapacity(_)) => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    tracing::debug!(instance = %gi.name_any(), "every offer tried was taken");
    Err(last.unwrap_or_else(|| ProviderError::InsufficientCapacity("every offer was taken".into())))
}

/// A provider call failed while renting: transient errors are retried (the label lookup
/// adopts anything created meanwhile); the rest back the provider off and fail the instance
/// so the pool can try the next provider.
async fn provider_failed(
    gi: &GpuInstance,
    pool: &GpuPool,
    ctx: &Context,
    api: &Api<GpuInstance>,
    error: ProviderError,
) -> Result<Action> {
    if error.is_transient() {
        return Err(error.into());
    }
    let (reason, cause) = match &error {
        ProviderError::InsufficientCapacity(_) => ("InsufficientCapacity", Cause::Refused),
        ProviderError::Unauthorized(_) => ("ProviderUnauthorized", Cause::Unusable),
        _ => ("ProviderRefused", Cause::Refused),
    };
    let entry = PoolKey::of(pool).entry(&gi.spec.provider);
    ctx.back_off_provider(entry, error.to_string(), cause);
    fail(
        gi,
        ctx,
        api,
        reason,
        format!("{}: {error}", gi.spec.provider),
    )
    .await
}

async fn record_created(
    gi: Arc<GpuInstance>,
    ctx: &Context,
    api: &Api<GpuInstance>,
    remote: RemoteInstance,
    offer: Option<&crate::provider::Offer>,
) -> Result<GpuInstance> {
    let mut status = status_of(&gi);
    status.phase = Some(InstancePhase::Provisioning);
    status.provider_instance_id = Some(remote.id.clone());
    let info = offer_info(&remote, offer);
    // An adopted machine keeps the offer recorded before, if any.
    if offer.is_some() || status.offer.is_none() {
        status.offer = Some(info);
    }
    status.endpoint = remote.endpoint.clone();
    status.message = Some(format!("machine {} is starting", remote.id));
    set_condition(
        &mut status.conditions,
        ConditionType::Ready,
        false,
        "Provisioning",
        "waiting for the machine and its worker",
        gi.metadata.generation,
        ctx.now(),
    );
    apply_status(api, &gi, &status).await
}

fn price_of(status: &GpuInstanceStatus) -> Money {
    offer_price(status).unwrap_or_default()
}

/// A Provisioning instance: asks the provider about machine `id`, then its worker.
async fn poll(
    gi: Arc<GpuInstance>,
    id: &str,
    pool: &GpuPool,
    ctx: &Arc<Context>,
    api: &Api<GpuInstance>,
) -> Result<Action> {
    let provider = provider_of(&gi, pool, ctx).await?;
    let remote = match provider.get(id).await {
        Ok(r) => r,
        Err(ProviderError::NotFound(_)) => {
            let message = format!("machine {id} disappeared while starting");
            return fail(&gi, ctx, api, "MachineLost", message).await;
        }
        Err(e) => return Err(e.into()),
    };
    match (&remote.state, &remote.endpoint) {
        (RemoteState::Running, Some(endpoint)) => {
            check_worker(gi, &remote, endpoint, pool, ctx, api).await
        }
        (RemoteState::Starting, _) | (RemoteState::Running, None) => {
            Ok(Action::requeue(ctx.config.provision_poll))
        }
        (RemoteState::Stopped(m), _) => {
            let message = format!("machine {id} stopped while starting: {m}");
            fail(&gi, ctx, api, "MachineStopped", message).await
        }
        (RemoteState::Terminated, _) => {
            let message = format!("machine {id} was terminated while starting");
            fail(&gi, ctx, api, "MachineLost", message).await
        }
    }
}

/// The machine runs: once its worker answers the health path the instance is Ready.
async fn check_worker(
    gi: Arc<GpuInstance>,
    remote: &RemoteInstance,
    endpoint: &str,
    pool: &GpuPool,
    ctx: &Arc<Context>,
    api: &Api<GpuInstance>,
) -> Result<Action> {
    let worker = ctx.providers.worker(pool).await?;
    let token = ctx.sessions.ensure(&ctx.client, &gi).await?;
    let health_path = pool
        .spec
        .worker
        .as_ref()
        .map_or("/health", |w| w.health_path.as_str());
    if let Err(e) = worker.health(endpoint, health_path, &token).await {
        tracing::debug!(error = %e, "worker not healthy yet");
        return Ok(Action::requeue(ctx.config.provision_poll));
    }
    // Ready from now, not from when this reconcile began: the provider call above may have
    // waited long for the client-side quota, and an idle deadline counted from before it
    // would already be past.
    let now = ctx.now();
    let s = ready_status(&gi, remote, endpoint, pool.spec.idle_timeout_seconds, now);
    let gi = apply_status(api, &gi, &s).await?;
    if let Some(deadline) = s.idle_deadline.as_ref() {
        deadlines::arm(ctx, &gi, deadline.0);
    }
    let started = s.provisioning_started_at.as_ref().map_or(now, |t| t.0);
    let note = format!(
        "machine {} ready in {:.1} s",
        remote.id,
        seconds_between(started, now)
    );
    ctx.event(&gi, EventType::Normal, "Ready", note).await;
    Ok(Action::requeue(Duration::from_secs(
        pool.spec.idle_timeout_seconds.max(1) as u64,
    )))
}

/// The status of an instance whose worker answered at `now`: Ready at `endpoint`, idle from
/// now, billed from the provider's creation time when it reports one.
pub fn ready_status(
    gi: &GpuInstance,
    remote: &RemoteInstance,
    endpoint: &str,
    idle_timeout_seconds: i64,
    now: Timestamp,
) -> GpuInstanceStatus {
    let mut s = status_of(gi);
    s.phase = Some(InstancePhase::Ready);
    s.endpoint = Some(endpoint.to_string());
    s.ready_at = ts(now);
    if let Some(t) = remote.started_at.filter(|t| *t <= now) {
        s.provisioning_started_at = ts(t);
    }
    let started = s.provisioning_started_at.as_ref().map_or(now, |t| t.0);
    s.idle_from(now, idle_timeout_seconds);
    if remote.price_per_hour.is_some() {
        s.offer = Some(offer_info(remote, None));
    }
    s.accrued_cost = Some(Money::for_seconds(
        price_of(&s),
        seconds_between(started, now),
    ));
    s.message = Some(format!("ready at {endpoint}"));
    set_condition(
        &mut s.conditions,
        ConditionType::Ready,
        true,
        "WorkerHealthy",
        "the worker answers its health path",
        gi.metadata.generation,
        now,
    );
    s
}

/// A Ready instance with no job: waits for its idle deadline (checking now and then that
/// the machine still runs), keeps it for `minIdle`, or deletes it.
async fn idle(
    gi: Arc<GpuInstance>,
    pool: &GpuPool,
    ctx: &Arc<Context>,
    api: &Api<GpuInstance>,
) -> Result<Action> {
    let status = status_of(&gi);
    let (decision, idle_since, deadline) = deadlines::decide(ctx, &gi, pool, ctx.now());
    let liveness = ctx.config.liveness_interval;
    match decision {
        IdleDecision::WaitFor(wait) => {
            if status.idle_deadline.as_ref().map(|t| t.0) != Some(deadline) {
                // The pool's idle timeout changed: show the new deadline.
                let mut s = status.clone();
                s.idle_deadline = ts(deadline);
                apply_status(api, &gi, &s).await?;
            }
            deadlines::arm(ctx, &gi, deadline);
            if wait > liveness && ctx.liveness_due(&gi.uid().unwrap_or_default()) {
                check_alive(&gi, pool, ctx, api).await?;
            }
            Ok(Action::requeue(wait.min(liveness)))
        }
        IdleDecision::KeepWarm => {
            if ctx.liveness_due(&gi.uid().unwrap_or_default()) {
                check_alive(&gi, pool, ctx, api).await?;
            }
            Ok(Action::requeue(liveness))
        }
        IdleDecision::Teardown => {
            let deleted = deadlines::delete_idle(&gi, pool, ctx, api, idle_since, deadline).await?;
            Ok(if deleted {
                Action::await_change()
            } else {
                // It changed (a claim won, most often): the watch brings the new state. Not at
                // once: with a cache behind (a watch reconnecting after an outage) every pass
                // would meet the same 409.
                Action::requeue(Duration::from_millis(250))
            })
        }
    }
}

/// Asks the provider whether a Ready machine still runs; a lost one is failed and replaced.
/// Also refreshes the accrued cost.
async fn check_alive(
    gi: &GpuInstance,
    pool: &GpuPool,
    ctx: &Context,
    api: &Api<GpuInstance>,
) -> Result<()> {
    let status = status_of(gi);
    let Some(id) = status.provider_instance_id.clone() else {
        return Ok(());
    };
    let provider = provider_of(gi, pool, ctx).await?;
    let gone = match provider.get(&id).await {
        Ok(r) => match r.state {
            RemoteState::Running | RemoteState::Starting => None,
            RemoteState::Stopped(m) => Some(format!("machine {id} stopped: {m}")),
            RemoteState::Terminated => Some(format!("machine {id} was terminated")),
        },
        Err(ProviderError::NotFound(_)) => Some(format!("machine {id} disappeared")),
        Err(e) => return Err(e.into()),
    };
    if let Some(message) = gone {
        if preemption::interruptible(gi) {
            return preempted(gi, ctx, api, message).await;
        }
        fail(gi, ctx, api, "MachineLost", message).await?;
        return Ok(());
    }
    let now = ctx.now();
    let started = status.provisioning_started_at.as_ref().map_or(now, |t| t.0);
    let accrued = Money::for_seconds(price_of(&status), seconds_between(started, now));
    if status.accrued_cost != Some(accrued) {
        let mut s = status;
        s.accrued_cost = Some(accrued);
        apply_status(api, gi, &s).await?;
    }
    Ok(())
}

/// The provider took this interruptible machine back: its job (if any) goes back to the
/// queue without spending a retry, then the instance fails and is deleted.
async fn preempted(
    gi: &GpuInstance,
    ctx: &Context,
    api: &Api<GpuInstance>,
    message: String,
) -> Result<()> {
    let why = format!("{} took back interruptible {message}", gi.spec.provider);
    if let Some(job) = status_of(gi).current_job {
        let ns = gi.namespace().unwrap_or_default();
        preemption::requeue_job(ctx, &ns, &job, &gi.name_any(), &why).await?;
    }
    preemption::count(ctx, gi);
    fail(gi, ctx, api, "Preempted", why).await?;
    Ok(())
}

/// Which machines the finalizer must destroy.
#[derive(Clone, Debug, PartialEq)]
pub enum Targets {
    /// Nothing was ever asked of the provider: nothing to destroy.
    NeverRented,
    /// The machine the provider named.
    Known(String),
    /// A create was asked for but its answer not recorded: whatever carries the label.
    ByLabel,
}

/// What the finalizer destroys, from the instance's status.
pub fn targets(status: &GpuInstanceStatus) -> Targets {
    match (
        &status.provider_instance_id,
        &status.provisioning_started_at,
    ) {
        (Some(id), _) => Targets::Known(id.clone()),
        (None, Some(_)) => Targets::ByLabel,
        (None, None) => Targets::NeverRented,
    }
}

/// The finalizer: destroy the machine, confirm it is gone, then let the object go.
async fn cleanup(gi: Arc<GpuInstance>, ctx: &Context, api: &Api<GpuInstance>) -> Result<Action> {
    let key = format!("{}/{}", gi.namespace().unwrap_or_default(), gi.name_any());
    let status = status_of(&gi);
    let targets = targets(&status);
    let provider = match pool_of(ctx, &gi) {
        Some(pool) => provider_of(&gi, &pool, ctx).await,
        None => Err(Error::BadReference(format!(
            "GpuPool {} not found: cannot reach the provider",
            gi.spec.pool
        ))),
    };
    let provider = match provider {
        Ok(p) => p,
        Err(_) if targets == Targets::NeverRented => {
            ctx.forget_instance(&gi.uid().unwrap_or_default());
            ctx.sessions.delete(&ctx.client, &gi).await;
            return Ok(Action::await_change());
        }
        Err(e) => return teardown_failing(&gi, ctx, api, &key, e).await,
    };
    let mut gi = gi;
    if status.phase != Some(InstancePhase::Terminating) {
        let mut s = status.clone();
        s.phase = Some(InstancePhase::Terminating);
        s.message = Some("destroying the machine".into());
        gi = Arc::new(apply_status(api, &gi, &s).await?);
    }
    let destroyed = match destroy(&gi, targets, provider.as_ref(), ctx).await {
        Ok(d) => d,
        Err(e) => return teardown_failing(&gi, ctx, api, &key, e).await,
    };
    account_final(&gi, &status, destroyed, ctx, api).await;
    ctx.forget_instance(&gi.uid().unwrap_or_default());
    ctx.sessions.delete(&ctx.client, &gi).await;
    ctx.metrics.set_teardown_failing(&key, false);
    Ok(Action::await_change())
}

/// The machines destroyed, and when the last destroy was confirmed.
struct Destroyed {
    ids: Vec<String>,
    at: Timestamp,
}

/// Destroys every target and confirms each is gone (the provider reports it terminated or
/// no longer knows it).
async fn destroy(
    gi: &GpuInstance,
    targets: Targets,
    provider: &dyn InstanceProvider,
    ctx: &Context,
) -> Result<Destroyed> {
    let ids: Vec<String> = match targets {
        Targets::Known(id) => vec![id],
        Targets::ByLabel => {
            let label = instance_label(&ctx.config.cluster_id, &gi.uid().unwrap_or_default());
            provider
                .find_by_label(&label)
                .await?
                .into_iter()
                .map(|r| r.id)
                .collect()
        }
        Targets::NeverRented => vec![],
    };
    let mut at = ctx.now();
    for id in &ids {
        provider.delete(id).await?;
        at = ctx.now();
        match provider.get(id).await {
            Err(ProviderError::NotFound(_)) => {}
            Ok(r) if r.state == RemoteState::Terminated => {}
            Ok(_) => return Err(Error::TeardownPending(format!("machine {id}"))),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(Destroyed { ids, at })
}

/// After the destroy: the final cost on the status and in `gpupool_spend_dollars_total`, and
/// the Destroyed event, counted once per instance.
async fn account_final(
    gi: &GpuInstance,
    status: &GpuInstanceStatus,
    destroyed: Destroyed,
    ctx: &Context,
    api: &Api<GpuInstance>,
) {
    let started = status.provisioning_started_at.as_ref().map(|t| t.0);
    // Destroyed at its deadline ahead of this finalizer (deadlines.rs): billed until then.
    let end = ctx
        .claims
        .destroyed_at(&gi.uid().unwrap_or_default())
        .unwrap_or(destroyed.at);
    let final_cost = started.map(|s| Money::for_seconds(price_of(status), seconds_between(s, end)));
    let first = ctx.first_final_accounting(&gi.uid().unwrap_or_default());
    let mut s = status_of(gi);
    // A second run (see `first_final_accounting`) keeps the cost the first one wrote: its
    // own clock reading is later than the destroy.
    if let (Some(c), true) = (final_cost, first) {
        s.accrued_cost = Some(c);
        let labels = crate::metrics::PoolLabels {
            namespace: gi.namespace().unwrap_or_default(),
            pool: gi.spec.pool.clone(),
        };
        ctx.metrics
            .spend_total
            .get_or_create(&labels)
            .inc_by(c.amount().try_into().unwrap_or(0.0));
    }
    let ids = destroyed.ids.join(", ");
    s.message = Some(if ids.is_empty() {
        "no machine was rented".into()
    } else {
        format!("machine {ids} destroyed")
    });
    remove_condition(&mut s.conditions, ConditionType::TeardownFailing);
    // Best effort: the watch's final event then carries the final cost.
    let _ = apply_status(api, gi, &s).await;
    if !ids.is_empty() && first {
        let cost = final_cost.unwrap_or_default();
        let note = format!("machine {ids} destroyed; accrued {cost} USD");
        ctx.event(gi, EventType::Normal, "Destroyed", note).await;
    }
}

/// A teardown step failed: keep the finalizer, say so (condition, event, metric), retry.
async fn teardown_failing(
    gi: &GpuInstance,
    ctx: &Context,
    api: &Api<GpuInstance>,
    key: &str,
    error: Error,
) -> Result<Action> {
    ctx.metrics.set_teardown_failing(key, true);
    let mut s = status_of(gi);
    let message = format!("cannot confirm the machine is destroyed: {error}");
    if set_condition(
        &mut s.conditions,
        ConditionType::TeardownFailing,
        true,
        error.label(),
        &message,
        gi.metadata.generation,
        ctx.now(),
    ) {
        let _ = apply_status(api, gi, &s).await;
        ctx.event(gi, EventType::Warning, "TeardownFailing", message)
            .await;
    }
    Err(error)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use std::collections::BTreeMap;

    use super::{Step, Targets, plan, ready_status, targets, worker_env};
    use crate::{
        controller::fixtures::{at, instance, job, pool, time},
        crd::{InstancePhase, Money, WorkerSpec},
        provider::{Credentials, RemoteInstance, RemoteState},
    };

    #[test]
    fn the_worker_env_is_the_pools_with_secrets_resolved_then_the_operators_own() {
        let worker: WorkerSpec = serde_json::from_value(json!({
            "image": "w:1", "port": 9000, "healthPath": "/ready",
            "env": [
                {"name": "LOG_LEVEL", "value": "info"},
                {"name": "S3_SECRET_KEY", "valueFrom": {"secretKeyRef": {"name": "s3", "key": "secret"}}},
                // The operator's own names replace the pool's entries, literal or from a Secret.
                {"name": "GPUPOOL_WORKER_PORT", "value": "1"},
                {"name": "GPUPOOL_SESSION_TOKEN", "valueFrom": {"secretKeyRef": {"name": "s3", "key": "t"}}},
            ],
        }))
        .unwrap();
        let from_secrets: BTreeMap<String, Credentials> = [
            ("S3_SECRET_KEY".to_string(), Credentials::new("s3-secret-1")),
            (
                "GPUPOOL_SESSION_TOKEN".to_string(),
                Credentials::new("user"),
            ),
        ]
        .into();
        let token = Credentials::new("tok");
        let key = Credentials::new("key");
        let (env, secret_env) = worker_env(&worker, &from_secrets, &token, Some(&key));
        let expected: BTreeMap<String, String> = [
            ("LOG_LEVEL", "info"),
            ("S3_SECRET_KEY", "s3-secret-1"),
            ("GPUPOOL_SESSION_TOKEN", "tok"),
            ("GPUPOOL_API_KEY", "key"),
            ("GPUPOOL_WORKER_PORT", "9000"),
            ("GPUPOOL_WORKER_HEALTH_PATH", "/ready"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(env, expected);
        assert_eq!(secret_env, ["S3_SECRET_KEY".to_string()].into());

        // Without an API key: no GPUPOOL_API_KEY; the default health path is passed on too.
        let worker: WorkerSpec = serde_json::from_value(json!({"image": "w:1"})).unwrap();
        let (env, secret_env) = worker_env(&worker, &BTreeMap::new(), &token, None);
        let names: Vec<&str> = env.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            [
                "GPUPOOL_SESSION_TOKEN",
                "GPUPOOL_WORKER_HEALTH_PATH",
                "GPUPOOL_WORKER_PORT"
            ]
        );
        assert_eq!(env["GPUPOOL_WORKER_HEALTH_PATH"], "/health");
        assert_eq!(env["GPUPOOL_WORKER_PORT"], "8000");
        assert!(secret_env.is_empty());
    }

    #[test]
    fn pending_provisions_and_failed_or_terminating_deletes() {
        let p = pool();
        let gi = instance("gi", json!({}));
        assert_eq!(plan(&gi, &p, None, false, at(0)), Step::Provision);
        for phase in ["Failed", "Terminating"] {
            let gi = instance("gi", json!({"phase": phase}));
            assert_eq!(plan(&gi, &p, None, false, at(0)), Step::Delete, "{phase}");
        }
    }

    #[test]
    fn provisioning_polls_its_machine_until_the_timeout() {
        let p = pool();
        let gi = instance(
            "gi",
            json!({"phase": "Provisioning", "provisioningStartedAt": time(0), "providerInstanceId": "m-1"}),
        );
        let poll = Step::Poll { id: "m-1".into() };
        assert_eq!(plan(&gi, &p, None, false, at(600)), poll);
        assert_eq!(plan(&gi, &p, None, false, at(601)), Step::ProvisionTimedOut);
        let no_id = instance(
            "gi",
            json!({"phase": "Provisioning", "provisioningStartedAt": time(0)}),
        );
        assert_eq!(plan(&no_id, &p, None, false, at(1)), Step::BackToPending);
    }

    #[test]
    fn a_ready_instance_is_idle_busy_or_freed_from_a_stale_job() {
        let p = pool();
        let idle = instance("gi", json!({"phase": "Ready", "readyAt": time(0)}));
        assert_eq!(plan(&idle, &p, None, false, at(10)), Step::Idle);

        let busy = instance("gi", json!({"phase": "Ready", "currentJob": "j"}));
        let running = job(
            "j",
            json!({"phase": "Running", "instance": "gi", "attempts": 1}),
        );
        assert_eq!(plan(&busy, &p, Some(&running), false, at(10)), Step::Busy);
        // Still being bound: the job is Pending and the instance already names it.
        let binding = job("j", json!({"phase": "Pending"}));
        assert_eq!(plan(&busy, &p, Some(&binding), false, at(10)), Step::Busy);
        // Moved to another instance, deleted, or finished: freed...
        let moved = job(
            "j",
            json!({"phase": "Running", "instance": "other", "attempts": 2}),
        );
        assert_eq!(
            plan(&busy, &p, Some(&moved), false, at(10)),
            Step::FreeStaleJob { at: at(10) }
        );
        assert_eq!(
            plan(&busy, &p, None, false, at(10)),
            Step::FreeStaleJob { at: at(10) }
        );
        // ...idle from when the job finished, never from the future...
        let done = job(
            "j",
            json!({"phase": "Succeeded", "instance": "gi", "finishedAt": time(4)}),
        );
        assert_eq!(
            plan(&busy, &p, Some(&done), false, at(10)),
            Step::FreeStaleJob { at: at(4) }
        );
        let skewed = job(
            "j",
            json!({"phase": "Failed", "instance": "gi", "finishedAt": time(99)}),
        );
        assert_eq!(
            plan(&busy, &p, Some(&skewed), false, at(10)),
            Step::FreeStaleJob { at: at(10) }
        );
        // ...unless this replica is still sending a job to it.
        assert_eq!(plan(&busy, &p, Some(&done), true, at(10)), Step::Busy);
    }

    #[test]
    fn the_finalizer_destroys_the_known_machine_or_looks_it_up_by_label() {
        let status = |v| instance("gi", v).status.unwrap();
        assert_eq!(targets(&status(json!({}))), Targets::NeverRented);
        assert_eq!(
            targets(&status(json!({"provisioningStartedAt": time(0)}))),
            Targets::ByLabel,
            "a create was asked for; its answer may have been lost"
        );
        assert_eq!(
            targets(&status(
                json!({"provisioningStartedAt": time(0), "providerInstanceId": "m-1"})
            )),
            Targets::Known("m-1".into())
        );
    }

    #[test]
    fn ready_status_bills_from_the_providers_start_and_starts_the_idle_clock() {
        let gi = instance(
            "gi",
            json!({"phase": "Provisioning", "provisioningStartedAt": time(0), "providerInstanceId": "m-1",
                   "offer": {"gpuName": "RTX 3060", "pricePerHour": "0.36"}}),
        );
        let mut remote = RemoteInstance {
            id: "m-1".into(),
            label: None,
            state: RemoteState::Running,
            endpoint: Some("http://10.0.0.1:8000".into()),
            gpu_name: None,
            num_gpus: None,
            price_per_hour: None,
            region: None,
            started_at: Some(at(-60)),
        };
        let s = ready_status(&gi, &remote, "http://10.0.0.1:8000", 300, at(40));
        assert_eq!(s.phase, Some(InstancePhase::Ready));
        assert_eq!(
            s.provisioning_started_at.as_ref().map(|t| t.0),
            Some(at(-60))
        );
        assert_eq!(s.idle_deadline.as_ref().map(|t| t.0), Some(at(340)));
        // 100 s at 0.36 USD/h.
        assert_eq!(s.accrued_cost, Some("0.01".parse::<Money>().unwrap()));
        assert_eq!(
            s.offer.as_ref().and_then(|o| o.gpu_name.as_deref()),
            Some("RTX 3060")
        );
        assert_eq!(s.conditions[0].reason, "WorkerHealthy");
        // A start time in the future (clock skew) is not believed; a price the provider
        // reports replaces the offer's.
        remote.started_at = Some(at(100));
        remote.price_per_hour = Some("0.72".parse().unwrap());
        let s = ready_status(&gi, &remote, "http://10.0.0.1:8000", 300, at(40));
        assert_eq!(s.provisioning_started_at.as_ref().map(|t| t.0), Some(at(0)));
        assert_eq!(s.accrued_cost, Some("0.008".parse::<Money>().unwrap()));
    }
}
