//! The VideoJob reconciler: starts attempts on the instance the pool bound the job to, runs
//! serverless jobs through run/status (cancelling them when the job is deleted), and deletes
//! finished jobs after `ttlSecondsAfterFinished`.
//!
//! Jobs are placed by the pool reconciler (`pool.rs`); this one never chooses an instance.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime as Time;
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, Patch, PatchParams},
    runtime::controller::Action,
};
use serde_json::{Value, json};
use tracing::instrument;

use crate::{
    crd::{
        ConditionType, GpuInstance, InstancePhase, JOB_FINALIZER, JobPhase, VideoJob,
        VideoJobStatus,
    },
    metrics::JobLabels,
    provider::{ProviderError, ServerlessStatus},
};

use super::{
    Context, Error, Result,
    instance::existing_session_token,
    settle,
    status::{apply_status, seconds_between, set_condition},
};

#[instrument(skip_all, fields(ns = job.namespace().unwrap_or_default(), name = job.name_any()))]
pub async fn reconcile(job: Arc<VideoJob>, ctx: Arc<Context>) -> Result<Action> {
    let ns = job.namespace().unwrap_or_default();
    let api: Api<VideoJob> = Api::namespaced(ctx.client.clone(), &ns);
    let result = if job.metadata.deletion_timestamp.is_some() {
        cleanup(&job, &ctx, &api).await
    } else {
        apply(job.clone(), &ctx, &api).await
    };
    settle(job.as_ref(), &ctx, result)
}

fn status_of(job: &VideoJob) -> VideoJobStatus {
    job.status.clone().unwrap_or_default()
}

async fn apply(job: Arc<VideoJob>, ctx: &Arc<Context>, api: &Api<VideoJob>) -> Result<Action> {
    let ns = job.namespace().unwrap_or_default();
    let status = status_of(&job);
    let phase = status.phase;
    if phase.is_some_and(JobPhase::is_finished) {
        return finished(&job, ctx, api).await;
    }
    let Some(pool) = ctx.pool(&ns, &job.spec.pool) else {
        let mut s = status.clone();
        s.phase = Some(JobPhase::Pending);
        let msg = format!("GpuPool {} not found in {ns}", job.spec.pool);
        if set_condition(
            &mut s.conditions,
            ConditionType::Scheduled,
            false,
            "PoolNotFound",
            &msg,
            job.metadata.generation,
            ctx.now(),
        ) || phase.is_none()
        {
            let job = apply_status(api, &job, &s).await?;
            ctx.event(&job, true, "PoolNotFound", msg).await;
        }
        return Ok(Action::requeue(Duration::from_secs(30)));
    };
    match phase {
        // A new job of a live pool is the pool's to place: its first scheduling pass starts
        // it on a warm instance or writes why it waits, so no write is spent here first.
        None if pool.metadata.deletion_timestamp.is_none() => Ok(Action::await_change()),
        None => {
            let mut s = status.clone();
            s.phase = Some(JobPhase::Pending);
            s.observed_generation = job.metadata.generation;
            set_condition(
                &mut s.conditions,
                ConditionType::Scheduled,
                false,
                "Waiting",
                "waiting for an instance",
                job.metadata.generation,
                ctx.now(),
            );
            apply_status(api, &job, &s).await?;
            Ok(Action::await_change())
        }
        Some(JobPhase::Pending) => Ok(Action::await_change()),
        Some(JobPhase::Scheduled) | Some(JobPhase::Running) => {
            if let Some(instance) = status.instance.clone() {
                run_on_instance(job, &instance, &pool, ctx, api).await
            } else if let Some(provider) = status.provider.clone() {
                run_serverless(job, &provider, &pool, ctx, api).await
            } else {
                unbind(&job, ctx, api, "the job was bound to nothing").await
            }
        }
        Some(_) => Ok(Action::await_change()),
    }
}

/// Puts a job back to Pending so the pool places it again (no attempt is used up).
async fn unbind(job: &VideoJob, ctx: &Context, api: &Api<VideoJob>, why: &str) -> Result<Action> {
    let mut s = status_of(job);
    s.requeue();
    set_condition(
        &mut s.conditions,
        ConditionType::Scheduled,
        false,
        "Rescheduling",
        why,
        job.metadata.generation,
        ctx.now(),
    );
    apply_status(api, job, &s).await?;
    Ok(Action::await_change())
}

async fn run_on_instance(
    job: Arc<VideoJob>,
    instance_name: &str,
    pool: &crate::crd::GpuPool,
    ctx: &Arc<Context>,
    api: &Api<VideoJob>,
) -> Result<Action> {
    let ns = job.namespace().unwrap_or_default();
    let status = status_of(&job);
    if status.phase == Some(JobPhase::Running)
        && ctx
            .dispatcher
            .is_running(&job.uid().unwrap_or_default(), status.attempts)
    {
        return Ok(Action::await_change());
    }
    // Read the instance fresh: the cache may not show the binding yet.
    let instances: Api<GpuInstance> = Api::namespaced(ctx.client.clone(), &ns);
    let Some(instance) = instances.get_opt(instance_name).await? else {
        return unbind(&job, ctx, api, &format!("instance {instance_name} is gone")).await;
    };
    let inst_status = instance.status.clone().unwrap_or_default();
    let usable = instance.metadata.deletion_timestamp.is_none()
        && inst_status.phase == Some(InstancePhase::Ready)
        && inst_status.current_job.as_deref() == Some(job.name_any().as_str());
    if !usable {
        if status.phase == Some(JobPhase::Running) {
            // The attempt was under way when the instance went: count it as a lost attempt.
            return lost_attempt(
                &job,
                ctx,
                api,
                &format!("instance {instance_name} went away during the attempt"),
            )
            .await;
        }
        return unbind(
            &job,
            ctx,
            api,
            &format!("instance {instance_name} is no longer available"),
        )
        .await;
    }
    let token = existing_session_token(&instance, ctx)
        .await?
        .ok_or_else(|| {
            Error::BadReference(format!("instance {instance_name} has no session token"))
        })?;

    if status.phase == Some(JobPhase::Scheduled) {
        return start_attempt(ctx, api, &job, &instance, pool, token).await;
    }
    // Running without a task here: the operator restarted mid-attempt. Send it again with
    // the same X-Job-Id so the worker can tell.
    let attempt = super::dispatch::Attempt {
        token,
        number: status.attempts,
        bound_at: None,
    };
    ctx.dispatcher
        .start(ctx.clone(), &job, &instance, pool, attempt);
    Ok(Action::await_change())
}

/// Records the next attempt of `job` on `instance` (the instance already names the job) as
/// Running, then starts sending it. The pool reconciler calls this right after its claim, so
/// a job on a warm instance starts without waiting for its own watch event.
pub(super) async fn start_attempt(
    ctx: &Arc<Context>,
    api: &Api<VideoJob>,
    job: &VideoJob,
    instance: &GpuInstance,
    pool: &crate::crd::GpuPool,
    token: crate::provider::Credentials,
) -> Result<Action> {
    let bound_at = Instant::now();
    let now = ctx.now();
    let instance_name = instance.name_any();
    let mut s = status_of(job);
    if s.phase != Some(JobPhase::Scheduled) {
        s.scheduled_at = Some(Time(now));
    }
    s.phase = Some(JobPhase::Running);
    s.observed_generation = job.metadata.generation;
    s.instance = Some(instance_name.clone());
    s.provider = Some(instance.spec.provider.clone());
    s.remote_job_id = None;
    s.attempts += 1;
    s.started_at = Some(Time(now));
    set_condition(
        &mut s.conditions,
        ConditionType::Scheduled,
        true,
        "Dispatched",
        &format!("sent to {instance_name}"),
        job.metadata.generation,
        now,
    );
    if s.attempts == 1 {
        observe_wait(ctx, job, now);
    }
    let number = s.attempts;
    let replaced = job.resource_version();
    let job = apply_status(api, job, &s).await?;
    ctx.written_jobs.wrote(replaced, job.clone());
    let attempt = super::dispatch::Attempt {
        token,
        number,
        bound_at: Some(bound_at),
    };
    ctx.dispatcher
        .start(ctx.clone(), &job, instance, pool, attempt);
    Ok(Action::await_change())
}

/// Records how long a job waited, from its creation to its first attempt.
fn observe_wait(ctx: &Context, job: &VideoJob, now: jiff::Timestamp) {
    let wait = job
        .metadata
        .creation_timestamp
        .as_ref()
        .map(|t| seconds_between(t.0, now))
        .unwrap_or(0.0);
    ctx.metrics.job_wait_seconds.observe(wait.max(0.0));
}

/// An attempt was lost with its instance: retry while attempts remain, else fail.
async fn lost_attempt(
    job: &VideoJob,
    ctx: &Context,
    api: &Api<VideoJob>,
    why: &str,
) -> Result<Action> {
    let mut s = status_of(job);
    let now = ctx.now();
    if s.attempts <= job.spec.max_retries {
        s.requeue();
        s.error = Some(why.to_string());
        set_condition(
            &mut s.conditions,
            ConditionType::Scheduled,
            false,
            "Retrying",
            why,
            job.metadata.generation,
            now,
        );
        let job = apply_status(api, job, &s).await?;
        ctx.event(&job, true, "Retrying", why.to_string()).await;
    } else {
        s.phase = Some(JobPhase::Failed);
        s.error = Some(why.to_string());
        s.finished_at = Some(Time(now));
        set_condition(
            &mut s.conditions,
            ConditionType::Complete,
            false,
            "RetriesExhausted",
            why,
            job.metadata.generation,
            now,
        );
        let job = apply_status(api, job, &s).await?;
        count_outcome(ctx, &job, "Failed");
        ctx.event(&job, true, "Failed", why.to_string()).await;
    }
    Ok(Action::await_change())
}

fn count_outcome(ctx: &Context, job: &VideoJob, outcome: &str) {
    ctx.metrics
        .jobs
        .get_or_create(&JobLabels {
            namespace: job.namespace().unwrap_or_default(),
            pool: job.spec.pool.clone(),
            outcome: outcome.into(),
        })
        .inc();
}

async fn set_finalizer(job: &VideoJob, api: &Api<VideoJob>, present: bool) -> Result<VideoJob> {
    let mut finalizers: Vec<String> = job.finalizers().to_vec();
    let has = finalizers.iter().any(|f| f == JOB_FINALIZER);
    if has == present {
        return Ok(job.clone());
    }
    if present {
        finalizers.push(JOB_FINALIZER.into());
    } else {
        finalizers.retain(|f| f != JOB_FINALIZER);
    }
    let patch =
        json!({"metadata": {"finalizers": finalizers, "resourceVersion": job.resource_version()}});
    Ok(api
        .patch(
            &job.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await?)
}

/// Poll interval for a serverless job: grows with its age, 1 s to 15 s.
fn poll_interval(elapsed_secs: f64) -> Duration {
    Duration::from_secs_f64((elapsed_secs / 4.0).clamp(1.0, 15.0))
}

async fn run_serverless(
    job: Arc<VideoJob>,
    provider_name: &str,
    pool: &crate::crd::GpuPool,
    ctx: &Arc<Context>,
    api: &Api<VideoJob>,
) -> Result<Action> {
    let ns = job.namespace().unwrap_or_default();
    let endpoint = match ctx.providers.serverless(pool, provider_name).await {
        Ok(p) => p,
        Err(Error::BadReference(msg)) => {
            ctx.back_off_provider(&ns, &pool.name_any(), provider_name, msg.clone(), true);
            return unbind(&job, ctx, api, &msg).await;
        }
        Err(e) => return Err(e),
    };
    let status = status_of(&job);
    let now = ctx.now();
    let Some(remote_id) = status.remote_job_id.clone() else {
        // Submit. The finalizer goes on first so a deletion can cancel the remote job.
        let job = set_finalizer(&job, api, true).await?;
        let mut input = job.spec.input.clone();
        input.insert(
            "operation".into(),
            Value::String(job.spec.operation.clone()),
        );
        let id = match endpoint.submit(&Value::Object(input)).await {
            Ok(id) => id,
            Err(e) if e.is_transient() => return Err(e.into()),
            Err(e) => {
                ctx.back_off_provider(
                    &ns,
                    &pool.name_any(),
                    provider_name,
                    e.to_string(),
                    matches!(e, ProviderError::Unauthorized(_)),
                );
                let job = set_finalizer(&job, api, false).await?;
                return unbind(
                    &job,
                    ctx,
                    api,
                    &format!("{provider_name} refused the job: {e}"),
                )
                .await;
            }
        };
        ctx.provider_succeeded(&ns, &pool.name_any(), provider_name);
        let mut s = status.clone();
        s.phase = Some(JobPhase::Running);
        s.remote_job_id = Some(id.clone());
        s.attempts += 1;
        s.started_at = Some(Time(now));
        set_condition(
            &mut s.conditions,
            ConditionType::Scheduled,
            true,
            "Submitted",
            &format!("queued at {provider_name} as {id}"),
            job.metadata.generation,
            now,
        );
        if s.attempts == 1 {
            observe_wait(ctx, &job, now);
        }
        apply_status(api, &job, &s).await?;
        return Ok(Action::requeue(poll_interval(0.0)));
    };

    let elapsed = status
        .started_at
        .as_ref()
        .map(|t| seconds_between(t.0, now))
        .unwrap_or(0.0);
    if elapsed > job.spec.timeout_seconds as f64 {
        let _ = endpoint.cancel(&remote_id).await;
        return serverless_attempt_failed(
            &job,
            ctx,
            api,
            &format!("no result within {} s", job.spec.timeout_seconds),
        )
        .await;
    }
    let remote = match endpoint.status(&remote_id).await {
        Ok(r) => r,
        Err(ProviderError::NotFound(_)) => {
            return serverless_attempt_failed(
                &job,
                ctx,
                api,
                &format!("{provider_name} no longer knows job {remote_id}"),
            )
            .await;
        }
        Err(e) => return Err(e.into()),
    };
    match remote.status {
        ServerlessStatus::InQueue | ServerlessStatus::InProgress => {
            Ok(Action::requeue(poll_interval(elapsed)))
        }
        ServerlessStatus::Completed => {
            let output = remote.output.unwrap_or(Value::Null);
            let size = serde_json::to_vec(&output)
                .map(|v| v.len())
                .unwrap_or(usize::MAX);
            let mut s = status.clone();
            s.finished_at = Some(Time(now));
            if size > ctx.config.max_output_bytes {
                s.phase = Some(JobPhase::Failed);
                s.error = Some(format!(
                    "output of {size} bytes exceeds the {}-byte limit",
                    ctx.config.max_output_bytes
                ));
                set_condition(
                    &mut s.conditions,
                    ConditionType::Complete,
                    false,
                    "OutputTooLarge",
                    s.error.as_deref().unwrap_or_default(),
                    job.metadata.generation,
                    now,
                );
            } else {
                s.phase = Some(JobPhase::Succeeded);
                s.output = Some(output);
                s.error = None;
                set_condition(
                    &mut s.conditions,
                    ConditionType::Complete,
                    true,
                    "EndpointCompleted",
                    &format!("completed at {provider_name}"),
                    job.metadata.generation,
                    now,
                );
            }
            let outcome = if s.phase == Some(JobPhase::Succeeded) {
                "Succeeded"
            } else {
                "Failed"
            };
            let job = apply_status(api, &job, &s).await?;
            count_outcome(ctx, &job, outcome);
            ctx.event(
                &job,
                outcome == "Failed",
                outcome,
                format!("finished at {provider_name} in {elapsed:.1} s"),
            )
            .await;
            set_finalizer(&job, api, false).await?;
            Ok(Action::await_change())
        }
        ServerlessStatus::Failed | ServerlessStatus::TimedOut | ServerlessStatus::Cancelled => {
            let why = format!(
                "{provider_name} reported {:?}{}",
                remote.status,
                remote.error.map(|e| format!(": {e}")).unwrap_or_default()
            );
            serverless_attempt_failed(&job, ctx, api, &why).await
        }
    }
}

async fn serverless_attempt_failed(
    job: &VideoJob,
    ctx: &Context,
    api: &Api<VideoJob>,
    why: &str,
) -> Result<Action> {
    let job = set_finalizer(job, api, false).await?;
    lost_attempt(&job, ctx, api, why).await
}

/// Deleting a job: cancel its serverless run if one may be in progress, then let it go.
async fn cleanup(job: &VideoJob, ctx: &Context, api: &Api<VideoJob>) -> Result<Action> {
    if !job.finalizers().iter().any(|f| f == JOB_FINALIZER) {
        return Ok(Action::await_change());
    }
    let status = status_of(job);
    let ns = job.namespace().unwrap_or_default();
    if let (Some(remote), Some(provider), false) = (
        status.remote_job_id.as_ref(),
        status.provider.as_ref(),
        status.phase.is_some_and(JobPhase::is_finished),
    ) && let Some(pool) = ctx.pool(&ns, &job.spec.pool)
    {
        let endpoint = ctx.providers.serverless(&pool, provider).await?;
        endpoint.cancel(remote).await?;
        ctx.event(
            job,
            false,
            "Cancelled",
            format!("cancelled {remote} at {provider}"),
        )
        .await;
    }
    set_finalizer(job, api, false).await?;
    Ok(Action::await_change())
}

/// A finished job: delete it once its TTL has passed.
async fn finished(job: &VideoJob, ctx: &Context, api: &Api<VideoJob>) -> Result<Action> {
    let Some(ttl) = job.spec.ttl_seconds_after_finished else {
        return Ok(Action::await_change());
    };
    let Some(done) = job
        .status
        .as_ref()
        .and_then(|s| s.finished_at.as_ref())
        .map(|t| t.0)
    else {
        return Ok(Action::await_change());
    };
    let due = super::idle::deadline(done, ttl);
    let now = ctx.now();
    if now < due {
        return Ok(Action::requeue(now.duration_until(due).unsigned_abs()));
    }
    match api
        .delete(&job.name_any(), &DeleteParams::background())
        .await
    {
        Ok(_) => Ok(Action::await_change()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(Action::await_change()),
        Err(e) => Err(e.into()),
    }
}
