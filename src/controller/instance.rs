//! The GpuInstance reconciler: rents the machine, waits until it is Ready, watches it while
//! it works, destroys it at its idle deadline, and holds the object until the provider
//! confirms the machine is gone.
//!
//! Order of events that makes create idempotent across crashes: the GpuInstance and its
//! finalizer exist first (the pool creates them so); `provisioningStartedAt` is written
//! before the provider is called; the provider machine carries the label
//! `gpupool-{clusterId}-{uid}`, looked up before every create, so a machine created by a
//! call whose answer was lost is adopted, not duplicated.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use jiff::Timestamp;
use k8s_openapi::{
    api::core::v1::Secret,
    apimachinery::pkg::apis::meta::v1::{MicroTime, OwnerReference},
};
use kube::{
    Api, Resource, ResourceExt,
    api::{DeleteParams, PostParams, Preconditions},
    runtime::{
        controller::Action,
        finalizer::{Event as Finalizer, finalizer},
    },
};
use rand::RngCore;
use rust_decimal::Decimal;
use tracing::{info, instrument, warn};

use crate::{
    crd::{
        ConditionType, GpuInstance, GpuInstanceStatus, GpuPool, INSTANCE_FINALIZER, InstancePhase,
        JobPhase, OfferInfo,
    },
    provider::{
        CreateRequest, Credentials, ENV_API_KEY, ENV_SESSION_TOKEN, ENV_WORKER_PORT,
        InstanceProvider, ProviderError, RemoteInstance, RemoteState, instance_label,
        quota::teardown_lane,
    },
};

use super::{
    Context, Error, Result, from_finalizer,
    idle::{self, IdleDecision, IdleInstance},
    settle,
    status::{
        apply_status, cost, money, offer_price, remove_condition, seconds_between, set_condition,
    },
};

/// Offers tried per provisioning attempt before the provider counts as out of capacity.
const OFFERS_TRIED: usize = 3;
/// Key of the session token in its Secret.
pub const SESSION_TOKEN_KEY: &str = "token";

/// Name of the Secret holding an instance's session token.
pub fn session_secret_name(gi: &GpuInstance) -> String {
    format!("gpupool-session-{}", gi.uid().unwrap_or_default())
}

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

async fn apply(gi: Arc<GpuInstance>, ctx: &Arc<Context>, api: &Api<GpuInstance>) -> Result<Action> {
    let Some(pool) = pool_of(ctx, &gi) else {
        return report_blocked(
            &gi,
            ctx,
            api,
            "PoolNotFound",
            format!("GpuPool {} not found", gi.spec.pool),
        )
        .await;
    };
    let phase = gi.status.as_ref().and_then(|s| s.phase).unwrap_or_default();
    match phase {
        InstancePhase::Pending => provision(gi, &pool, ctx, api).await,
        InstancePhase::Provisioning => await_ready(gi, &pool, ctx, api).await,
        InstancePhase::Ready => ready(gi, &pool, ctx, api).await,
        InstancePhase::Failed | InstancePhase::Terminating => {
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
        ctx.event(gi, true, reason, message).await;
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
    status.phase = Some(InstancePhase::Failed);
    status.message = Some(message.clone());
    set_condition(
        &mut status.conditions,
        ConditionType::Ready,
        false,
        reason,
        &message,
        gi.metadata.generation,
        ctx.now(),
    );
    let gi = apply_status(api, gi, &status).await?;
    ctx.event(&gi, true, reason, message).await;
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

/// The instance's session token if its Secret exists (remembered after the first read).
pub(super) async fn existing_session_token(
    gi: &GpuInstance,
    ctx: &Context,
) -> Result<Option<Credentials>> {
    let uid = gi.uid().unwrap_or_default();
    if let Some(token) = ctx.cached_token(&uid) {
        return Ok(Some(token));
    }
    let ns = gi.namespace().unwrap_or_default();
    let name = session_secret_name(gi);
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let Some(s) = secrets.get_opt(&name).await? else {
        return Ok(None);
    };
    let token = s
        .data
        .as_ref()
        .and_then(|d| d.get(SESSION_TOKEN_KEY))
        .and_then(|b| String::from_utf8(b.0.clone()).ok())
        .filter(|t| !t.is_empty())
        .ok_or_else(|| Error::BadReference(format!("Secret {ns}/{name} has no session token")))?;
    let token = Credentials::new(token);
    ctx.remember_token(&uid, &token);
    Ok(Some(token))
}

/// The per-instance session token, kept in a Secret owned by the GpuInstance (created once).
async fn session_token(gi: &GpuInstance, ctx: &Context) -> Result<Credentials> {
    if let Some(token) = existing_session_token(gi, ctx).await? {
        return Ok(token);
    }
    let ns = gi.namespace().unwrap_or_default();
    let name = session_secret_name(gi);
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let owner = OwnerReference {
        api_version: GpuInstance::api_version(&()).into_owned(),
        kind: GpuInstance::kind(&()).into_owned(),
        name: gi.name_any(),
        uid: gi.uid().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(false),
    };
    let secret: Secret = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {
            "name": name,
            "labels": {"app.kubernetes.io/managed-by": "gpupool", "gpupool.dev/instance": gi.name_any()},
        },
        "type": "Opaque",
        "stringData": {SESSION_TOKEN_KEY: token},
    }))?;
    let mut secret = secret;
    secret.metadata.owner_references = Some(vec![owner]);
    match secrets.create(&PostParams::default(), &secret).await {
        Ok(_) => {
            let token = Credentials::new(token);
            ctx.remember_token(&gi.uid().unwrap_or_default(), &token);
            Ok(token)
        }
        // Created by a reconcile that did not finish: read it back next time.
        Err(kube::Error::Api(s)) if s.code == 409 => Err(Error::Kube(kube::Error::Api(s))),
        Err(e) => Err(e.into()),
    }
}

/// The request that rents this instance's machine.
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
    let mut env: BTreeMap<String, String> = worker
        .env
        .iter()
        .map(|e| (e.name.clone(), e.value.clone()))
        .collect();
    env.insert(ENV_SESSION_TOKEN.into(), token.expose().to_string());
    env.insert(ENV_WORKER_PORT.into(), worker.port.to_string());
    if let Some(r) = &worker.api_key_secret_ref {
        let key = ctx
            .providers
            .secret(&gi.namespace().unwrap_or_default(), r)
            .await?;
        env.insert(ENV_API_KEY.into(), key.expose().to_string());
    }
    Ok(CreateRequest {
        label: instance_label(&ctx.config.cluster_id, &gi.uid().unwrap_or_default()),
        image: worker.image.clone(),
        env,
        port: u16::try_from(worker.port).unwrap_or(8000),
        disk_gb: u32::try_from(worker.container_disk_gb).unwrap_or(10),
    })
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
            .map(money),
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
    let ns = gi.namespace().unwrap_or_default();
    let pool_name = pool.name_any();
    let provider = match provider_of(&gi, pool, ctx).await {
        Ok(p) => p,
        Err(Error::BadReference(msg)) => {
            ctx.back_off_provider(&ns, &pool_name, &gi.spec.provider, msg.clone(), true);
            return fail(&gi, ctx, api, "ProviderUnavailable", msg).await;
        }
        Err(Error::Provider(e)) => {
            let msg = e.to_string();
            ctx.back_off_provider(&ns, &pool_name, &gi.spec.provider, msg.clone(), true);
            return fail(&gi, ctx, api, "ProviderUnavailable", msg).await;
        }
        Err(e) => return Err(e),
    };
    let token = session_token(&gi, ctx).await?;
    let request = match create_request(&gi, pool, ctx, &token).await {
        Ok(r) => r,
        Err(Error::BadReference(msg)) => {
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
        ctx.event(&gi, false, "Adopted", note).await;
        return Ok(Action::requeue(ctx.config.provision_poll));
    }

    let offers = match provider.offers().await {
        Ok(o) => o,
        Err(e) => return provider_failed(&gi, pool, ctx, api, e).await,
    };
    if offers.is_empty() {
        return provider_failed(
            &gi,
            pool,
            ctx,
            api,
            ProviderError::InsufficientCapacity("no offer matches the pool's limits".into()),
        )
        .await;
    }
    let mut last = None;
    for offer in offers.iter().take(OFFERS_TRIED) {
        match provider.create(offer, &request).await {
            Ok(remote) => {
                ctx.provider_succeeded(&ns, &pool_name, &gi.spec.provider);
                let note = format!(
                    "rented {} ({}, {} USD/h) from {}",
                    remote.id, offer.gpu_name, offer.price_per_hour, gi.spec.provider
                );
                let gi = record_created(gi, ctx, api, remote, Some(offer)).await?;
                ctx.event(&gi, false, "Provisioning", note).await;
                return Ok(Action::requeue(ctx.config.provision_poll));
            }
            Err(ProviderError::InsufficientCapacity(m)) => {
                last = Some(ProviderError::InsufficientCapacity(m))
            }
            Err(e) => return provider_failed(&gi, pool, ctx, api, e).await,
        }
    }
    provider_failed(
        &gi,
        pool,
        ctx,
        api,
        last.unwrap_or_else(|| ProviderError::InsufficientCapacity("every offer was taken".into())),
    )
    .await
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
    let ns = gi.namespace().unwrap_or_default();
    if error.is_transient() {
        return Err(error.into());
    }
    let (reason, unavailable) = match &error {
        ProviderError::InsufficientCapacity(_) => ("InsufficientCapacity", false),
        ProviderError::Unauthorized(_) => ("ProviderUnauthorized", true),
        _ => ("ProviderRefused", false),
    };
    ctx.back_off_provider(
        &ns,
        &pool.name_any(),
        &gi.spec.provider,
        error.to_string(),
        unavailable,
    );
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

fn price_of(status: &GpuInstanceStatus) -> Decimal {
    offer_price(status).unwrap_or_default()
}

async fn await_ready(
    gi: Arc<GpuInstance>,
    pool: &GpuPool,
    ctx: &Arc<Context>,
    api: &Api<GpuInstance>,
) -> Result<Action> {
    let now = ctx.now();
    let status = status_of(&gi);
    let started = status
        .provisioning_started_at
        .as_ref()
        .map(|t| t.0)
        .unwrap_or(now);
    if seconds_between(started, now) > pool.spec.provision_timeout_seconds as f64 {
        return fail(
            &gi,
            ctx,
            api,
            "ProvisionTimeout",
            format!(
                "not Ready within {} s; replacing it",
                pool.spec.provision_timeout_seconds
            ),
        )
        .await;
    }
    let Some(id) = status.provider_instance_id.clone() else {
        let mut s = status.clone();
        s.phase = Some(InstancePhase::Pending);
        apply_status(api, &gi, &s).await?;
        return Ok(Action::requeue(Duration::ZERO));
    };
    let provider = provider_of(&gi, pool, ctx).await?;
    let remote = match provider.get(&id).await {
        Ok(r) => r,
        Err(ProviderError::NotFound(_)) => {
            return fail(
                &gi,
                ctx,
                api,
                "MachineLost",
                format!("machine {id} disappeared while starting"),
            )
            .await;
        }
        Err(e) => return Err(e.into()),
    };
    match (&remote.state, &remote.endpoint) {
        (RemoteState::Running, Some(endpoint)) => {
            let worker = ctx.providers.worker(pool).await?;
            let token = session_token(&gi, ctx).await?;
            let health_path = pool
                .spec
                .worker
                .as_ref()
                .map(|w| w.health_path.clone())
                .unwrap_or_else(|| "/health".into());
            match worker.health(endpoint, &health_path, &token).await {
                Ok(()) => {
                    // Ready from now, not from when this reconcile began: the provider call
                    // above may have waited long for the client-side quota, and an idle
                    // deadline counted from before it would already be past.
                    let now = ctx.now();
                    let mut s = status.clone();
                    s.phase = Some(InstancePhase::Ready);
                    s.endpoint = Some(endpoint.clone());
                    s.ready_at = ts(now);
                    // Bill from the provider's own creation time when it reports one.
                    if let Some(t) = remote.started_at.filter(|t| *t <= now) {
                        s.provisioning_started_at = ts(t);
                    }
                    let started = s
                        .provisioning_started_at
                        .as_ref()
                        .map(|t| t.0)
                        .unwrap_or(started);
                    s.idle_since = ts(now);
                    s.idle_deadline = ts(idle::deadline(now, pool.spec.idle_timeout_seconds));
                    if remote.price_per_hour.is_some() {
                        s.offer = Some(offer_info(&remote, None));
                    }
                    s.accrued_cost = Some(money(cost(price_of(&s), seconds_between(started, now))));
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
                    let gi = apply_status(api, &gi, &s).await?;
                    if let Some(deadline) = s.idle_deadline.as_ref() {
                        arm_deadline(ctx, &gi, deadline.0);
                    }
                    ctx.event(
                        &gi,
                        false,
                        "Ready",
                        format!(
                            "machine {id} ready in {:.1} s",
                            seconds_between(started, now)
                        ),
                    )
                    .await;
                    Ok(Action::requeue(Duration::from_secs(
                        pool.spec.idle_timeout_seconds.max(1) as u64,
                    )))
                }
                Err(e) => {
                    tracing::debug!(error = %e, "worker not healthy yet");
                    Ok(Action::requeue(ctx.config.provision_poll))
                }
            }
        }
        (RemoteState::Starting, _) | (RemoteState::Running, None) => {
            Ok(Action::requeue(ctx.config.provision_poll))
        }
        (RemoteState::Stopped(m), _) => {
            fail(
                &gi,
                ctx,
                api,
                "MachineStopped",
                format!("machine {id} stopped while starting: {m}"),
            )
            .await
        }
        (RemoteState::Terminated, _) => {
            fail(
                &gi,
                ctx,
                api,
                "MachineLost",
                format!("machine {id} was terminated while starting"),
            )
            .await
        }
    }
}

/// The pool's idle instances (Ready, no job, not being deleted), for the `minIdle` rule.
fn pool_idle(ctx: &Context, ns: &str, pool: &str) -> Vec<IdleInstance> {
    ctx.stores()
        .instances
        .state()
        .into_iter()
        .filter(|i| {
            i.namespace().as_deref() == Some(ns)
                && i.spec.pool == pool
                && i.metadata.deletion_timestamp.is_none()
        })
        .filter_map(|i| {
            let s = i.status.as_ref()?;
            (s.phase == Some(InstancePhase::Ready) && s.current_job.is_none()).then(|| {
                IdleInstance {
                    name: i.name_any(),
                    idle_since: s
                        .idle_since
                        .as_ref()
                        .map(|t| t.0)
                        .unwrap_or_else(|| Timestamp::UNIX_EPOCH),
                }
            })
        })
        .collect()
}

async fn ready(
    gi: Arc<GpuInstance>,
    pool: &GpuPool,
    ctx: &Arc<Context>,
    api: &Api<GpuInstance>,
) -> Result<Action> {
    let ns = gi.namespace().unwrap_or_default();
    let now = ctx.now();
    let status = status_of(&gi);

    if let Some(job_name) = &status.current_job {
        let job = ctx.job(&ns, job_name);
        let still_bound = job.as_ref().is_some_and(|j| {
            let phase = j.status.as_ref().and_then(|s| s.phase).unwrap_or_default();
            let on_me = j.status.as_ref().and_then(|s| s.instance.as_deref())
                == Some(gi.name_any().as_str());
            !phase.is_finished() && (on_me || phase == JobPhase::Pending)
        });
        if !still_bound && !ctx.dispatcher.is_running_on(&gi.name_any()) {
            // The job finished, was deleted, or moved: free the instance (the dispatcher
            // normally does this; this is the safety net after a crash).
            let finished = job
                .as_ref()
                .and_then(|j| j.status.as_ref()?.finished_at.as_ref().map(|t| t.0))
                .filter(|t| *t <= now)
                .unwrap_or(now);
            let mut s = status.clone();
            s.current_job = None;
            s.idle_since = ts(finished);
            s.idle_deadline = ts(idle::deadline(finished, pool.spec.idle_timeout_seconds));
            apply_status(api, &gi, &s).await?;
            return Ok(Action::requeue(Duration::ZERO));
        }
        return Ok(Action::requeue(ctx.config.liveness_interval));
    }

    let idle_since = status
        .idle_since
        .as_ref()
        .or(status.ready_at.as_ref())
        .map(|t| t.0)
        .unwrap_or(now);
    let me = IdleInstance {
        name: gi.name_any(),
        idle_since,
    };
    let deadline = idle::deadline(idle_since, pool.spec.idle_timeout_seconds);
    match idle::decide(
        now,
        &me,
        pool.spec.idle_timeout_seconds,
        &pool_idle(ctx, &ns, &gi.spec.pool),
        pool.spec.min_idle.max(0) as usize,
    ) {
        IdleDecision::WaitFor(wait) => {
            if status.idle_deadline.as_ref().map(|t| t.0) != Some(deadline) {
                // The pool's idle timeout changed: show the new deadline.
                let mut s = status.clone();
                s.idle_deadline = ts(deadline);
                apply_status(api, &gi, &s).await?;
            }
            arm_deadline(ctx, &gi, deadline);
            if wait > ctx.config.liveness_interval {
                if ctx.liveness_due(&gi.uid().unwrap_or_default()) {
                    check_alive(&gi, pool, ctx, api).await?;
                }
                return Ok(Action::requeue(wait.min(ctx.config.liveness_interval)));
            }
            Ok(Action::requeue(wait))
        }
        IdleDecision::KeepWarm => {
            if ctx.liveness_due(&gi.uid().unwrap_or_default()) {
                check_alive(&gi, pool, ctx, api).await?;
            }
            Ok(Action::requeue(ctx.config.liveness_interval))
        }
        IdleDecision::Teardown => delete_idle(&gi, pool, ctx, api, idle_since, deadline).await,
    }
}

/// Deletes an idle instance whose deadline has come. The delete carries the resourceVersion
/// the decision was made on, so a job's claim that got there first wins (409).
async fn delete_idle(
    gi: &GpuInstance,
    pool: &GpuPool,
    ctx: &Context,
    api: &Api<GpuInstance>,
    idle_since: Timestamp,
    deadline: Timestamp,
) -> Result<Action> {
    let now = ctx.now();
    let dp = DeleteParams {
        preconditions: Some(Preconditions {
            resource_version: gi.resource_version(),
            uid: gi.uid(),
        }),
        ..DeleteParams::default()
    };
    match api.delete(&gi.name_any(), &dp).await {
        Ok(_) => {
            let late = seconds_between(deadline, now).max(0.0);
            ctx.metrics.idle_teardown_lateness_seconds.observe(late);
            info!(
                instance = %gi.name_any(),
                lateness_s = late,
                "idle deadline reached; deleting the instance"
            );
            ctx.event(
                gi,
                false,
                "IdleTimeout",
                format!(
                    "idle since {idle_since} ({} s); destroying the machine",
                    pool.spec.idle_timeout_seconds
                ),
            )
            .await;
            Ok(Action::await_change())
        }
        // A job claimed it first (or it changed): that write wins.
        Err(kube::Error::Api(s)) if s.code == 409 || s.code == 404 => {
            Ok(Action::requeue(Duration::ZERO))
        }
        Err(e) => Err(e.into()),
    }
}

/// Makes sure an idle instance is torn down at its deadline even when its reconcile is busy
/// then (a provider call waiting for the client-side quota, a provider that hangs): a timer
/// of its own fires at the deadline and decides from the cache, as the reconcile would.
/// Whichever of the two deletes first wins; the other gets 404 or 409.
pub(super) fn arm_deadline(ctx: &Arc<Context>, gi: &GpuInstance, deadline: Timestamp) {
    let uid = gi.uid().unwrap_or_default();
    if !ctx.arm_deadline(&uid, deadline) {
        return;
    }
    let ctx = Arc::clone(ctx);
    let (ns, name) = (gi.namespace().unwrap_or_default(), gi.name_any());
    tokio::spawn(async move {
        let wait = ctx.now().duration_until(deadline).unsigned_abs();
        if ctx.now() < deadline {
            tokio::time::sleep(wait).await;
        }
        ctx.disarm_deadline(&uid, deadline);
        let Some(gi) = ctx
            .instance(&ns, &name)
            .filter(|i| i.uid().as_deref() == Some(&uid))
        else {
            return;
        };
        let Some(pool) = pool_of(&ctx, &gi) else {
            return;
        };
        let status = status_of(&gi);
        if gi.metadata.deletion_timestamp.is_some()
            || status.phase != Some(InstancePhase::Ready)
            || status.current_job.is_some()
        {
            return;
        }
        let idle_since = status
            .idle_since
            .as_ref()
            .or(status.ready_at.as_ref())
            .map(|t| t.0)
            .unwrap_or_else(|| ctx.now());
        let me = IdleInstance {
            name: name.clone(),
            idle_since,
        };
        let decision = idle::decide(
            ctx.now(),
            &me,
            pool.spec.idle_timeout_seconds,
            &pool_idle(&ctx, &ns, &gi.spec.pool),
            pool.spec.min_idle.max(0) as usize,
        );
        if decision == IdleDecision::Teardown {
            let api: Api<GpuInstance> = Api::namespaced(ctx.client.clone(), &ns);
            let deadline = idle::deadline(idle_since, pool.spec.idle_timeout_seconds);
            if let Err(e) = delete_idle(&gi, &pool, &ctx, &api, idle_since, deadline).await {
                warn!(instance = %name, error = %e, "idle teardown failed; the reconcile retries");
            }
        }
    });
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
        fail(gi, ctx, api, "MachineLost", message).await?;
        return Ok(());
    }
    let started = status
        .provisioning_started_at
        .as_ref()
        .map(|t| t.0)
        .unwrap_or_else(|| ctx.now());
    let accrued = money(cost(price_of(&status), seconds_between(started, ctx.now())));
    if status.accrued_cost.as_deref() != Some(accrued.as_str()) {
        let mut s = status;
        s.accrued_cost = Some(accrued);
        apply_status(api, gi, &s).await?;
    }
    Ok(())
}

/// The finalizer: destroy the machine, confirm it is gone, then let the object go.
async fn cleanup(gi: Arc<GpuInstance>, ctx: &Context, api: &Api<GpuInstance>) -> Result<Action> {
    let ns = gi.namespace().unwrap_or_default();
    let status = status_of(&gi);
    let started = status.provisioning_started_at.as_ref().map(|t| t.0);
    let never_rented = started.is_none() && status.provider_instance_id.is_none();
    let key = format!("{ns}/{}", gi.name_any());

    let provider = match pool_of(ctx, &gi) {
        Some(pool) => provider_of(&gi, &pool, ctx).await,
        None => Err(Error::BadReference(format!(
            "GpuPool {} not found: cannot reach the provider",
            gi.spec.pool
        ))),
    };
    let provider = match provider {
        Ok(p) => p,
        Err(_) if never_rented => {
            delete_session_secret(&gi, ctx).await;
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

    let ids: Vec<String> = match (&status.provider_instance_id, started) {
        (Some(id), _) => vec![id.clone()],
        (None, Some(_)) => {
            let label = instance_label(&ctx.config.cluster_id, &gi.uid().unwrap_or_default());
            match provider.find_by_label(&label).await {
                Ok(found) => found.into_iter().map(|r| r.id).collect(),
                Err(e) => return teardown_failing(&gi, ctx, api, &key, e.into()).await,
            }
        }
        (None, None) => vec![],
    };
    let mut destroyed_at = ctx.now();
    for id in &ids {
        if let Err(e) = provider.delete(id).await {
            return teardown_failing(&gi, ctx, api, &key, e.into()).await;
        }
        destroyed_at = ctx.now();
        match provider.get(id).await {
            Err(ProviderError::NotFound(_)) => {}
            Ok(r) if r.state == RemoteState::Terminated => {}
            Ok(_) => {
                return teardown_failing(
                    &gi,
                    ctx,
                    api,
                    &key,
                    Error::TeardownPending(format!("machine {id}")),
                )
                .await;
            }
            Err(e) => return teardown_failing(&gi, ctx, api, &key, e.into()).await,
        }
    }

    let final_cost = started.map(|s| cost(price_of(&status), seconds_between(s, destroyed_at)));
    let first = ctx.first_final_accounting(&gi.uid().unwrap_or_default());
    let mut s = status_of(&gi);
    // A second run (see `first_final_accounting`) keeps the cost the first one wrote: its
    // own clock reading is later than the destroy.
    if let (Some(c), true) = (final_cost, first) {
        s.accrued_cost = Some(money(c));
        let labels = crate::metrics::PoolLabels {
            namespace: ns.clone(),
            pool: gi.spec.pool.clone(),
        };
        ctx.metrics
            .spend_total
            .get_or_create(&labels)
            .inc_by(c.try_into().unwrap_or(0.0));
    }
    s.message = Some(if ids.is_empty() {
        "no machine was rented".into()
    } else {
        format!("machine {} destroyed", ids.join(", "))
    });
    remove_condition(&mut s.conditions, ConditionType::TeardownFailing);
    // Best effort: the watch's final event then carries the final cost.
    let _ = apply_status(api, &gi, &s).await;
    delete_session_secret(&gi, ctx).await;
    ctx.metrics.set_teardown_failing(&key, false);
    if !ids.is_empty() && first {
        ctx.event(
            &*gi,
            false,
            "Destroyed",
            format!(
                "machine {} destroyed; accrued {} USD",
                ids.join(", "),
                final_cost.map(money).unwrap_or_else(|| "0".into())
            ),
        )
        .await;
    }
    Ok(Action::await_change())
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
        ctx.event(gi, true, "TeardownFailing", message).await;
    }
    Err(error)
}

async fn delete_session_secret(gi: &GpuInstance, ctx: &Context) {
    ctx.forget_instance(&gi.uid().unwrap_or_default());
    let secrets: Api<Secret> =
        Api::namespaced(ctx.client.clone(), &gi.namespace().unwrap_or_default());
    if let Err(e) = secrets
        .delete(&session_secret_name(gi), &DeleteParams::default())
        .await
        && !matches!(&e, kube::Error::Api(s) if s.code == 404)
    {
        tracing::debug!(error = %e, "session secret not deleted; owner-reference GC will");
    }
}
