//! The VideoJob reconciler: starts attempts on the instance the pool bound the job to, runs
//! serverless jobs through run/status (cancelling them when the job is deleted), and deletes
//! finished jobs after `ttlSecondsAfterFinished`.
//!
//! Jobs are placed by the pool reconciler (`pool.rs`); this one never chooses an instance.
//! Sending a job to a worker is the dispatch service's (`dispatch.rs`).

use std::{sync::Arc, time::Duration};

use jiff::Timestamp;
use kube::runtime::events::EventType;
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, Patch, PatchParams},
    runtime::controller::Action,
};
use serde_json::{Value, json};
use tracing::instrument;

use crate::{
    crd::{
        ConditionType, GpuInstance, GpuPool, InstancePhase, JOB_FINALIZER, JobPhase, VideoJob,
        VideoJobStatus,
    },
    provider::{ProviderError, ServerlessJob, ServerlessStatus},
};

use super::{
    Context, Error, Result,
    context::{Cause, warning_if},
    dispatch::{self, count_outcome, observe_wait},
    registry::PoolKey,
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

/// What the reconcile does next with a job that is not being deleted; [`plan`] decides it
/// from the job and its cached pool, without a client.
#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    /// Finished: delete it once its TTL has passed.
    Finished,
    /// Its pool does not exist: a condition and an event, then look again later.
    PoolMissing,
    /// New, of a live pool: the pool's first scheduling pass places it (no write here).
    LeaveToPool,
    /// New, of a pool being deleted: record it as Pending and waiting.
    MarkPending,
    /// Pending: the pool places it.
    Wait,
    /// Bound to an instance: start (or resume) the attempt there.
    OnInstance(String),
    /// Bound to a serverless entry: submit, or poll the remote job.
    Serverless(String),
    /// Scheduled or Running but bound to nothing: back to Pending.
    Unbind,
}

pub fn plan(job: &VideoJob, pool: Option<&GpuPool>) -> Step {
    let status = job.status.as_ref();
    let phase = status.and_then(|s| s.phase);
    if phase.is_some_and(JobPhase::is_finished) {
        return Step::Finished;
    }
    let Some(pool) = pool else {
        return Step::PoolMissing;
    };
    match phase {
        None if pool.metadata.deletion_timestamp.is_none() => Step::LeaveToPool,
        None => Step::MarkPending,
        Some(JobPhase::Scheduled | JobPhase::Running) => {
            let s = status.cloned().unwrap_or_default();
            match (s.instance, s.provider) {
                (Some(instance), _) => Step::OnInstance(instance),
                (None, Some(provider)) => Step::Serverless(provider),
                (None, None) => Step::Unbind,
            }
        }
        Some(_) => Step::Wait,
    }
}

async fn apply(job: Arc<VideoJob>, ctx: &Arc<Context>, api: &Api<VideoJob>) -> Result<Action> {
    let ns = job.namespace().unwrap_or_default();
    let pool = ctx.pool(&ns, &job.spec.pool);
    match (plan(&job, pool.as_deref()), pool) {
        (Step::Finished, _) => finished(&job, ctx, api).await,
        (Step::LeaveToPool | Step::Wait, _) => Ok(Action::await_change()),
        (Step::MarkPending, _) => {
            let mut s = status_of(&job);
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
        (Step::OnInstance(instance), Some(pool)) => {
            run_on_instance(job, &instance, &pool, ctx, api).await
        }
        (Step::Serverless(provider), Some(pool)) => {
            run_serverless(job, &provider, &pool, ctx, api).await
        }
        (Step::Unbind, _) => unbind(&job, ctx, api, "the job was bound to nothing").await,
        // `plan` gives PoolMissing whenever there is no pool.
        (Step::PoolMissing | Step::OnInstance(_) | Step::Serverless(_), _) => {
            pool_missing(&job, ctx, api).await
        }
    }
}

/// The job names a pool that does not exist: Pending, with a condition and an event once.
async fn pool_missing(job: &VideoJob, ctx: &Context, api: &Api<VideoJob>) -> Result<Action> {
    let ns = job.namespace().unwrap_or_default();
    let mut s = status_of(job);
    let first = s.phase.is_none();
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
    ) || first
    {
        let job = apply_status(api, job, &s).await?;
        ctx.event(&job, EventType::Warning, "PoolNotFound", msg)
            .await;
    }
    Ok(Action::requeue(Duration::from_secs(30)))
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
    pool: &GpuPool,
    ctx: &Arc<Context>,
    api: &Api<VideoJob>,
) -> Result<Action> {
    let ns = job.namespace().unwrap_or_default();
    let status = status_of(&job);
    let running = status.phase == Some(JobPhase::Running);
    if running
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
    let preempted = inst_status
        .conditions
        .iter()
        .any(|c| c.type_ == ConditionType::Ready.as_str() && c.reason == "Preempted");
    if !usable && running && preempted {
        // Its provider took the machine back: not the job's fault.
        let why = format!("instance {instance_name} was preempted during the attempt");
        let mut s = status_of(&job);
        let reason = s.preempt(why.clone(), job.metadata.generation, ctx.now());
        return write_lost(&job, ctx, api, s, reason, &why).await;
    }
    if !usable && running {
        // The attempt was under way when the instance went: count it as a lost attempt.
        let why = format!("instance {instance_name} went away during the attempt");
        return lost_attempt(&job, ctx, api, &why).await;
    }
    if !usable {
        let why = format!("instance {instance_name} is no longer available");
        return unbind(&job, ctx, api, &why).await;
    }
    let token = ctx
        .sessions
        .existing(&ctx.client, &instance)
        .await?
        .ok_or_else(|| {
            Error::BadReference(format!("instance {instance_name} has no session token"))
        })?;
    if !running {
        return dispatch::start_attempt(ctx, api, &job, &instance, pool, token).await;
    }
    // Running without a task here: the operator restarted mid-attempt. Send it again with
    // the same X-Job-Id so the worker can tell.
    let attempt = dispatch::Attempt {
        token,
        number: status.attempts,
        bound_at: None,
    };
    dispatch::start(ctx.clone(), &job, &instance, pool, attempt);
    Ok(Action::await_change())
}

/// What a lost attempt makes of a job at `now`: retried while attempts remain, else
/// failed. The event reason comes with it.
pub fn lose_attempt(job: &VideoJob, why: &str, now: Timestamp) -> (VideoJobStatus, &'static str) {
    let mut s = status_of(job);
    let generation = job.metadata.generation;
    if s.may_retry(job.spec.max_retries) {
        s.retry(why.to_string(), "Retrying", why, generation, now);
        (s, "Retrying")
    } else {
        s.fail("RetriesExhausted", why.to_string(), generation, now);
        (s, "Failed")
    }
}

/// An attempt was lost with its instance or its endpoint: retry while attempts remain, else
/// fail.
async fn lost_attempt(
    job: &VideoJob,
    ctx: &Context,
    api: &Api<VideoJob>,
    why: &str,
) -> Result<Action> {
    let (s, reason) = lose_attempt(job, why, ctx.now());
    write_lost(job, ctx, api, s, reason, why).await
}

/// Writes the status a lost attempt left (`s`), counts the job if that finished it, and
/// says why in a Warning event with `reason`.
async fn write_lost(
    job: &VideoJob,
    ctx: &Context,
    api: &Api<VideoJob>,
    s: VideoJobStatus,
    reason: &str,
    why: &str,
) -> Result<Action> {
    let job = apply_status(api, job, &s).await?;
    if let Some(outcome) = s.outcome() {
        count_outcome(ctx, &job, outcome);
    }
    ctx.event(&job, EventType::Warning, reason, why.to_string())
        .await;
    Ok(Action::await_change())
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
    pool: &GpuPool,
    ctx: &Arc<Context>,
    api: &Api<VideoJob>,
) -> Result<Action> {
    let entry = PoolKey::of(pool).entry(provider_name);
    let endpoint = match ctx.providers.serverless(pool, provider_name).await {
        Ok(p) => p,
        Err(Error::BadReference(msg)) => {
            ctx.back_off_provider(entry, msg.clone(), Cause::Unusable);
            return unbind(&job, ctx, api, &msg).await;
        }
        Err(e) => return Err(e),
    };
    let Some(remote_id) = status_of(&job).remote_job_id else {
        return submit(job, provider_name, endpoint.as_ref(), &entry, ctx, api).await;
    };
    let now = ctx.now();
    let elapsed = status_of(&job)
        .started_at
        .as_ref()
        .map_or(0.0, |t| seconds_between(t.0, now));
    if elapsed > job.spec.timeout_seconds as f64 {
        let _ = endpoint.cancel(&remote_id).await;
        let why = format!("no result within {} s", job.spec.timeout_seconds);
        return serverless_attempt_failed(&job, ctx, api, &why).await;
    }
    let remote = match endpoint.status(&remote_id).await {
        Ok(r) => r,
        Err(ProviderError::NotFound(_)) => {
            let why = format!("{provider_name} no longer knows job {remote_id}");
            return serverless_attempt_failed(&job, ctx, api, &why).await;
        }
        Err(e) => return Err(e.into()),
    };
    let max_output = ctx.config.max_output_bytes;
    match serverless_outcome(&job, remote, provider_name, max_output, ctx.now()) {
        Serverless::Waiting => Ok(Action::requeue(poll_interval(elapsed))),
        Serverless::AttemptFailed(why) => serverless_attempt_failed(&job, ctx, api, &why).await,
        Serverless::Finished(s) => {
            let job = apply_status(api, &job, &s).await?;
            let outcome = s.outcome().unwrap_or("Failed");
            count_outcome(ctx, &job, outcome);
            let note = format!("finished at {provider_name} in {elapsed:.1} s");
            ctx.event(&job, warning_if(outcome == "Failed"), outcome, note)
                .await;
            set_finalizer(&job, api, false).await?;
            Ok(Action::await_change())
        }
    }
}

/// Sends a serverless job to its endpoint. The finalizer goes on first so a deletion can
/// cancel the remote job.
async fn submit(
    job: Arc<VideoJob>,
    provider_name: &str,
    endpoint: &dyn crate::provider::ServerlessProvider,
    entry: &crate::controller::registry::EntryKey,
    ctx: &Context,
    api: &Api<VideoJob>,
) -> Result<Action> {
    let job = set_finalizer(&job, api, true).await?;
    // The cache can be behind this reconciler's own last write (the previous pass recorded a
    // submission a moment ago): read the job from the API server before submitting, so that
    // a stale copy never sends the same attempt twice (found with real serverless workers).
    let fresh = api.get(&job.name_any()).await?;
    if fresh.resource_version() != job.resource_version()
        || status_of(&fresh).remote_job_id.is_some()
    {
        return Ok(Action::requeue(Duration::from_millis(100)));
    }
    let mut input = job.spec.input.clone();
    input.insert(
        "operation".into(),
        Value::String(job.spec.operation.clone()),
    );
    let id = match endpoint.submit(&Value::Object(input)).await {
        Ok(id) => id,
        Err(e) if e.is_transient() => return Err(e.into()),
        Err(e) => {
            let cause = match e {
                ProviderError::Unauthorized(_) => Cause::Unusable,
                _ => Cause::Refused,
            };
            ctx.back_off_provider(entry.clone(), e.to_string(), cause);
            let job = set_finalizer(&job, api, false).await?;
            let why = format!("{provider_name} refused the job: {e}");
            return unbind(&job, ctx, api, &why).await;
        }
    };
    ctx.provider_succeeded(entry);
    let now = ctx.now();
    let mut s = status_of(&job);
    let message = format!("queued at {provider_name} as {id}");
    s.start_attempt(
        None,
        provider_name,
        "Submitted",
        &message,
        job.metadata.generation,
        now,
    );
    s.remote_job_id = Some(id);
    if s.attempts == 1 {
        observe_wait(ctx, &job, now);
    }
    apply_status(api, &job, &s).await?;
    Ok(Action::requeue(poll_interval(0.0)))
}

/// What the endpoint's answer about a serverless job makes of it.
#[derive(Debug, PartialEq)]
pub enum Serverless {
    /// Queued or in progress: ask again later.
    Waiting,
    /// The attempt is lost (failed, timed out or cancelled there): retry or fail.
    AttemptFailed(String),
    /// Finished: the status to write (Succeeded, or Failed when the output is too large).
    Finished(Box<VideoJobStatus>),
}

pub fn serverless_outcome(
    job: &VideoJob,
    remote: ServerlessJob,
    provider_name: &str,
    max_output_bytes: usize,
    now: Timestamp,
) -> Serverless {
    let generation = job.metadata.generation;
    match remote.status {
        ServerlessStatus::InQueue | ServerlessStatus::InProgress => Serverless::Waiting,
        ServerlessStatus::Completed => {
            let output = remote.output.unwrap_or(Value::Null);
            let size = serde_json::to_vec(&output).map_or(usize::MAX, |v| v.len());
            let mut s = status_of(job);
            if size > max_output_bytes {
                let error =
                    format!("output of {size} bytes exceeds the {max_output_bytes}-byte limit");
                s.fail("OutputTooLarge", error, generation, now);
            } else {
                let message = format!("completed at {provider_name}");
                s.succeed(output, "EndpointCompleted", &message, generation, now);
            }
            Serverless::Finished(Box::new(s))
        }
        ServerlessStatus::Failed | ServerlessStatus::TimedOut | ServerlessStatus::Cancelled => {
            let detail = remote.error.map(|e| format!(": {e}")).unwrap_or_default();
            Serverless::AttemptFailed(format!(
                "{provider_name} reported {:?}{detail}",
                remote.status
            ))
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
            EventType::Normal,
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

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::{Serverless, Step, lose_attempt, plan, serverless_outcome};
    use crate::{
        controller::fixtures::{at, job, pool},
        crd::JobPhase,
        provider::{ServerlessJob, ServerlessStatus},
    };

    #[test]
    fn the_plan_follows_the_phase_and_the_binding() {
        let p = pool();
        assert_eq!(plan(&job("j", json!(null)), Some(&p)), Step::LeaveToPool);
        assert_eq!(plan(&job("j", json!(null)), None), Step::PoolMissing);
        let mut deleting = pool();
        deleting.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(at(0)));
        assert_eq!(
            plan(&job("j", json!(null)), Some(&deleting)),
            Step::MarkPending
        );
        assert_eq!(
            plan(&job("j", json!({"phase": "Pending"})), Some(&p)),
            Step::Wait
        );
        let on = job(
            "j",
            json!({"phase": "Scheduled", "instance": "gi", "provider": "vast"}),
        );
        assert_eq!(plan(&on, Some(&p)), Step::OnInstance("gi".into()));
        assert_eq!(plan(&on, None), Step::PoolMissing);
        let sls = job("j", json!({"phase": "Running", "provider": "rp"}));
        assert_eq!(plan(&sls, Some(&p)), Step::Serverless("rp".into()));
        assert_eq!(
            plan(&job("j", json!({"phase": "Running"})), Some(&p)),
            Step::Unbind
        );
        for done in ["Succeeded", "Failed"] {
            assert_eq!(
                plan(&job("j", json!({"phase": done})), None),
                Step::Finished
            );
        }
    }

    #[test]
    fn a_lost_attempt_is_retried_until_max_retries_then_fails() {
        // maxRetries 2: three attempts in all.
        let j = job(
            "j",
            json!({"phase": "Running", "instance": "gi", "attempts": 2}),
        );
        let (s, reason) = lose_attempt(&j, "gone", at(5));
        assert_eq!((s.phase, reason), (Some(JobPhase::Pending), "Retrying"));
        assert_eq!(s.instance, None);
        let j = job(
            "j",
            json!({"phase": "Running", "instance": "gi", "attempts": 3}),
        );
        let (s, reason) = lose_attempt(&j, "gone", at(5));
        assert_eq!((s.phase, reason), (Some(JobPhase::Failed), "Failed"));
        assert_eq!(s.error.as_deref(), Some("gone"));
    }

    fn remote(status: ServerlessStatus, output: Option<serde_json::Value>) -> ServerlessJob {
        ServerlessJob {
            id: "r-1".into(),
            status,
            output,
            error: Some("oom".into()),
            delay_time_ms: None,
            execution_time_ms: None,
        }
    }

    #[test]
    fn the_endpoints_answer_finishes_waits_or_loses_the_attempt() {
        let j = job(
            "j",
            json!({"phase": "Running", "provider": "rp", "remoteJobId": "r-1", "attempts": 1}),
        );
        let out = Some(json!({"caption": "a cat"}));
        assert_eq!(
            serverless_outcome(
                &j,
                remote(ServerlessStatus::InProgress, None),
                "rp",
                100,
                at(1)
            ),
            Serverless::Waiting
        );
        let Serverless::Finished(s) = serverless_outcome(
            &j,
            remote(ServerlessStatus::Completed, out.clone()),
            "rp",
            100,
            at(1),
        ) else {
            panic!("completed is finished")
        };
        assert_eq!(
            (s.phase, s.output.clone()),
            (Some(JobPhase::Succeeded), out.clone())
        );
        let Serverless::Finished(s) = serverless_outcome(
            &j,
            remote(ServerlessStatus::Completed, out),
            "rp",
            10,
            at(1),
        ) else {
            panic!("completed is finished")
        };
        assert_eq!(s.phase, Some(JobPhase::Failed));
        assert!(s.error.unwrap().contains("exceeds the 10-byte limit"));
        assert_eq!(
            serverless_outcome(&j, remote(ServerlessStatus::Failed, None), "rp", 100, at(1)),
            Serverless::AttemptFailed("rp reported Failed: oom".into())
        );
    }
}
