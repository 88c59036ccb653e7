//! Sending a job to a worker and recording the answer, in a task of its own so a reconcile
//! never blocks for the length of a job.
//!
//! The job's status says an attempt is Running before its task starts; the task writes the
//! outcome to the job first, then frees the instance. After a crash, a Running job without a
//! task is sent again with the same `X-Job-Id`, so a worker can recognise the repeat; an
//! instance whose job is finished is freed by the instance reconciler.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use jiff::Timestamp;
use kube::runtime::events::EventType;
use kube::{Api, ResourceExt, api::DeleteParams, runtime::controller::Action};
use serde_json::Value;
use tracing::{debug, info, warn};

use crate::{
    crd::{GpuInstance, GpuPool, JobPhase, Money, TIMED_OUT_REASON, VideoJob, VideoJobStatus},
    metrics::JobLabels,
    provider::Credentials,
    worker::{Dispatch, WorkerError},
};

use super::{
    Context, Error, Result, deadlines, preemption,
    status::{apply_status, offer_price, seconds_between},
};

/// How long a finished attempt keeps trying to record its outcome while the API server is
/// unavailable, before leaving it to the reconcilers (which send the job again).
const OUTCOME_PATIENCE: Duration = Duration::from_secs(300);

/// One attempt to start: the instance's session token, the attempt number (1-based), and
/// when the job was found bound (for the dispatch-overhead metric; `None` after a restart).
pub struct Attempt {
    pub token: Credentials,
    pub number: i32,
    pub bound_at: Option<Timestamp>,
}

/// A job attempt in flight on this replica.
#[derive(Clone, Debug)]
struct Flight {
    instance: String,
    attempt: i32,
}

/// The attempts in flight on this replica, by job UID (a registry: it holds no Context).
#[derive(Default)]
pub struct Dispatcher {
    running: Mutex<HashMap<String, Flight>>,
}

impl Dispatcher {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Flight>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether attempt `attempt` of job `uid` is being sent from this replica.
    pub fn is_running(&self, uid: &str, attempt: i32) -> bool {
        self.lock().get(uid).is_some_and(|f| f.attempt == attempt)
    }

    /// Whether some job is being sent to `instance` from this replica.
    pub fn is_running_on(&self, instance: &str) -> bool {
        self.lock().values().any(|f| f.instance == instance)
    }

    /// Marks attempt `attempt` of job `uid` in flight on `instance`; false if it already is.
    fn take_off(&self, uid: &str, instance: &str, attempt: i32) -> bool {
        let mut running = self.lock();
        if running.get(uid).is_some_and(|f| f.attempt == attempt) {
            return false;
        }
        let flight = Flight {
            instance: instance.to_string(),
            attempt,
        };
        running.insert(uid.to_string(), flight);
        true
    }

    fn land(&self, uid: &str) {
        self.lock().remove(uid);
    }

    /// Attempts in flight now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Records the next attempt of `job` on `instance` (the instance already names the job) as
/// Running, then starts sending it. The pool reconciler calls this right after its claim, so
/// a job on a warm instance starts without waiting for its own watch event; the job
/// reconciler calls it for a job it finds Scheduled.
pub async fn start_attempt(
    ctx: &Arc<Context>,
    api: &Api<VideoJob>,
    job: &VideoJob,
    instance: &GpuInstance,
    pool: &GpuPool,
    token: Credentials,
) -> Result<Action> {
    let now = ctx.now();
    let instance_name = instance.name_any();
    let mut s = job.status.clone().unwrap_or_default();
    s.start_attempt(
        Some(&instance_name),
        &instance.spec.provider,
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
    let attempt = Attempt {
        token,
        number,
        bound_at: Some(now),
    };
    start(ctx.clone(), &job, instance, pool, attempt);
    Ok(Action::await_change())
}

/// Records how long a job waited, from its creation to its first attempt.
pub fn observe_wait(ctx: &Context, job: &VideoJob, now: Timestamp) {
    let wait = job
        .metadata
        .creation_timestamp
        .as_ref()
        .map(|t| seconds_between(t.0, now))
        .unwrap_or(0.0);
    ctx.metrics.job_wait_seconds.observe(wait.max(0.0));
}

/// Starts sending `attempt` of `job` to `instance` in a task of its own, unless it is in
/// flight already.
pub fn start(
    ctx: Arc<Context>,
    job: &VideoJob,
    instance: &GpuInstance,
    pool: &GpuPool,
    attempt: Attempt,
) {
    let Attempt {
        token,
        number: attempt,
        bound_at,
    } = attempt;
    let uid = job.uid().unwrap_or_default();
    if !ctx.dispatcher.take_off(&uid, &instance.name_any(), attempt) {
        return;
    }
    let (job, instance, pool) = (job.clone(), instance.clone(), pool.clone());
    tokio::spawn(async move {
        let outcome = send(&ctx, &job, &instance, &pool, &token, attempt, bound_at).await;
        // The outcome exists only in this task: while the API server is unreachable it is
        // kept and written again, rather than left for a reconcile that would send the job a
        // second time.
        let give_up = ctx.now() + OUTCOME_PATIENCE;
        let mut wait = Duration::from_millis(250);
        loop {
            match finish(&ctx, &job, &instance, &pool, attempt, outcome.clone()).await {
                Ok(()) => break,
                Err(e) if e.is_unavailable() && ctx.now() + wait < give_up => {
                    debug!(job = %job.name_any(), error = %e, "the API server is unavailable; keeping the outcome");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(5));
                }
                Err(e) => {
                    warn!(job = %job.name_any(), error = %e, "could not record the job's outcome; the reconcilers will");
                    break;
                }
            }
        }
        ctx.dispatcher.land(&uid);
    });
}

async fn send(
    ctx: &Context,
    job: &VideoJob,
    instance: &GpuInstance,
    pool: &GpuPool,
    token: &Credentials,
    attempt: i32,
    bound_at: Option<Timestamp>,
) -> Result<Value, WorkerError> {
    let endpoint = instance
        .status
        .as_ref()
        .and_then(|s| s.endpoint.clone())
        .ok_or_else(|| WorkerError::Connection("the instance has no endpoint".into()))?;
    let worker = ctx
        .providers
        .worker(pool)
        .await
        .map_err(|e| WorkerError::InvalidRequest(e.to_string()))?;
    let input = Value::Object(job.spec.input.clone());
    let uid = job.uid().unwrap_or_default();
    let request = Dispatch {
        endpoint: &endpoint,
        operation: &job.spec.operation,
        input: &input,
        job_uid: &uid,
        attempt: u32::try_from(attempt.saturating_sub(1)).unwrap_or(0),
        session_token: token,
        timeout: Duration::from_secs(job.spec.timeout_seconds.max(1) as u64),
    };
    let started = ctx.now();
    if let Some(bound) = bound_at {
        let overhead = seconds_between(bound, started).max(0.0);
        ctx.metrics.dispatch_overhead_seconds.observe(overhead);
    }
    let result = worker.dispatch(&request).await;
    let ran = seconds_between(started, ctx.now()).max(0.0);
    ctx.metrics.job_run_seconds.observe(ran);
    debug!(job = %job.name_any(), ok = result.is_ok(), "worker answered");
    result
}

/// What one attempt's outcome makes of its job: the status to write, and what to say.
#[derive(Debug, PartialEq)]
pub struct Recorded {
    pub status: VideoJobStatus,
    /// Event type, reason and note.
    pub event: (EventType, &'static str, String),
}

/// Decides how the outcome of attempt `attempt` on `instance` is recorded on `job` at `now`,
/// the instance billing `price` per hour; `None` when the outcome is stale (the job moved on
/// to another attempt or finished). Pure: the caller writes the result.
pub fn record(
    job: &VideoJob,
    attempt: i32,
    instance: &str,
    price: Money,
    outcome: &Result<Value, WorkerError>,
    preempted: bool,
    now: Timestamp,
) -> Option<Recorded> {
    let mut s = job.status.clone().unwrap_or_default();
    if s.attempts != attempt || s.phase != Some(JobPhase::Running) {
        return None;
    }
    let generation = job.metadata.generation;
    let run_secs = s
        .started_at
        .as_ref()
        .map(|t| seconds_between(t.0, now))
        .unwrap_or(0.0);
    s.cost = Some(s.cost.unwrap_or_default() + Money::for_seconds(price, run_secs));
    let event = match outcome {
        // The provider took the machine back: not the job's fault, no retry spent.
        Err(e) if preempted => {
            let why = format!("attempt {attempt} on {instance} lost to a preemption ({e})");
            let reason = s.preempt(why.clone(), generation, now);
            (EventType::Warning, reason, why)
        }
        Ok(output) => {
            s.succeed(
                output.clone(),
                "WorkerSucceeded",
                "the worker answered 2xx",
                generation,
                now,
            );
            let note = format!("finished on {instance} in {run_secs:.2} s");
            (EventType::Normal, "Succeeded", note)
        }
        Err(e) if e.is_retryable() && s.may_retry(job.spec.max_retries) => {
            let message = format!("attempt {attempt} failed: {}", e.label());
            s.retry(
                format!("attempt {attempt} on {instance}: {e}"),
                "Retrying",
                &message,
                generation,
                now,
            );
            let note = format!("attempt {attempt} on {instance} failed ({e}); retrying");
            (EventType::Warning, "Retrying", note)
        }
        Err(e) => {
            // A last attempt that ran out of time says so (the gateway answers it 504);
            // any other retryable failure used up the retries.
            let reason = match e {
                WorkerError::Timeout(_) => TIMED_OUT_REASON,
                _ if e.is_retryable() => "RetriesExhausted",
                _ => e.label(),
            };
            s.fail(reason, e.to_string(), generation, now);
            (
                EventType::Warning,
                "Failed",
                format!("failed on {instance}: {e}"),
            )
        }
    };
    Some(Recorded { status: s, event })
}

/// Records the outcome of one attempt on the job, then frees (or replaces) the instance.
async fn finish(
    ctx: &Arc<Context>,
    job: &VideoJob,
    instance: &GpuInstance,
    pool: &GpuPool,
    attempt: i32,
    outcome: Result<Value, WorkerError>,
) -> Result<()> {
    let instances: Api<GpuInstance> =
        Api::namespaced(ctx.client.clone(), &job.namespace().unwrap_or_default());
    let broken = matches!(&outcome, Err(e) if e.instance_looks_broken());
    // A dropped connection to an interruptible machine: ask its provider whether it took
    // the machine back before blaming the job.
    let preempted = broken && preemption::check(ctx, pool, instance).await;
    let how = match (broken, preempted) {
        (_, true) => {
            let why = format!(
                "{} took back the interruptible machine",
                instance.spec.provider
            );
            preemption::count(ctx, instance);
            Release::Replace("Preempted", why)
        }
        (true, false) => {
            let note = format!(
                "lost the connection to the worker during job {}; replacing the machine",
                job.name_any()
            );
            Release::Replace("WorkerUnreachable", note)
        }
        (false, false) => Release::Free,
    };
    // A failed attempt that will be retried frees (or replaces) its instance first, so the
    // pool never sees the job Pending while the instance still claims it (which it would
    // take for a binding to complete). Any other outcome is recorded on the job first.
    // The job as the attempt started: its `attempts` is this attempt.
    let may_retry = job
        .status
        .as_ref()
        .is_some_and(|s| s.may_retry(job.spec.max_retries));
    let retrying = preempted || matches!(&outcome, Err(e) if e.is_retryable() && may_retry);
    if retrying {
        release(
            ctx,
            &instances,
            instance,
            &job.name_any(),
            pool,
            how.clone(),
        )
        .await?;
    }
    record_on_job(ctx, job, instance, attempt, &outcome, preempted).await?;
    if !retrying {
        release(ctx, &instances, instance, &job.name_any(), pool, how).await?;
    }
    Ok(())
}

/// What becomes of an instance when its job is done with it.
#[derive(Clone, Debug, PartialEq)]
pub enum Release {
    /// Idle from now, for the next job.
    Free,
    /// Deleted (its machine destroyed; the pool rents another), with the event's reason and
    /// note.
    Replace(&'static str, String),
}

/// Writes the outcome on the job, from the copy the attempt started with (nothing else
/// writes a Running job), retried on conflicts with fresh reads.
async fn record_on_job(
    ctx: &Context,
    job: &VideoJob,
    instance: &GpuInstance,
    attempt: i32,
    outcome: &Result<Value, WorkerError>,
    preempted: bool,
) -> Result<()> {
    let jobs: Api<VideoJob> =
        Api::namespaced(ctx.client.clone(), &job.namespace().unwrap_or_default());
    let price = instance
        .status
        .as_ref()
        .and_then(offer_price)
        .unwrap_or_default();
    let mut known = Some(job.clone());
    for _ in 0..10 {
        let current = match known.take() {
            Some(j) => j,
            None => match jobs.get_opt(&job.name_any()).await? {
                Some(j) => j,
                None => return Ok(()),
            },
        };
        if current.uid() != job.uid() {
            return Ok(());
        }
        let Some(recorded) = record(
            &current,
            attempt,
            &instance.name_any(),
            price,
            outcome,
            preempted,
            ctx.now(),
        ) else {
            return Ok(()); // a newer attempt or a finished job: this outcome is stale
        };
        match apply_status(&jobs, &current, &recorded.status).await {
            Ok(updated) => {
                if let Some(o) = recorded.status.outcome() {
                    count_outcome(ctx, &updated, o);
                }
                let (kind, reason, note) = recorded.event;
                ctx.event(&updated, kind, reason, note).await;
                return Ok(());
            }
            Err(e) if e.is_conflict() => continue,
            Err(Error::Kube(kube::Error::Api(s))) if s.code == 404 => return Ok(()),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Counts a finished job in `gpupool_jobs_total`.
pub fn count_outcome(ctx: &Context, job: &VideoJob, outcome: &str) {
    ctx.metrics
        .jobs
        .get_or_create(&JobLabels {
            namespace: job.namespace().unwrap_or_default(),
            pool: job.spec.pool.clone(),
            outcome: outcome.into(),
        })
        .inc();
}

/// Frees `instance` from `job` (idle from now, deadline set) or replaces it (deleted, so its
/// machine is destroyed and the pool rents another), as `how` says.
pub async fn release(
    ctx: &Arc<Context>,
    api: &Api<GpuInstance>,
    instance: &GpuInstance,
    job: &str,
    pool: &GpuPool,
    how: Release,
) -> Result<()> {
    // From the copy the attempt started with first (its claim is the last write unless a
    // liveness check came between), then fresh reads on conflicts.
    let mut known = Some(instance.clone());
    for _ in 0..10 {
        let current = match known.take() {
            Some(i) => i,
            None => match api.get_opt(&instance.name_any()).await? {
                Some(i) => i,
                None => return Ok(()),
            },
        };
        let mut s = current.status.clone().unwrap_or_default();
        if s.current_job.as_deref() != Some(job) {
            return Ok(());
        }
        if let Release::Replace(reason, note) = &how {
            info!(instance = %current.name_any(), reason, "replacing the instance");
            ctx.event(&current, EventType::Warning, reason, note.clone())
                .await;
            match api
                .delete(&current.name_any(), &DeleteParams::default())
                .await
            {
                Ok(_) => return Ok(()),
                Err(kube::Error::Api(s)) if s.code == 404 => return Ok(()),
                Err(e) => return Err(Error::Kube(e)),
            }
        }
        s.free(ctx.now(), pool.spec.idle_timeout_seconds);
        match apply_status(api, &current, &s).await {
            Ok(freed) => {
                // The deadline's timer starts here, not when the instance's own reconcile
                // next runs (which may be waiting on the provider).
                if let Some(deadline) = freed.status.as_ref().and_then(|s| s.idle_deadline.as_ref())
                {
                    deadlines::arm(ctx, &freed, deadline.0);
                }
                return Ok(());
            }
            Err(e) if e.is_conflict() => continue,
            Err(Error::Kube(kube::Error::Api(s))) if s.code == 404 => return Ok(()),
            Err(e) => return Err(e),
        }
    }
    Err(Error::ConflictsExhausted(format!(
        "could not free instance {} after 10 conflicts",
        instance.name_any()
    )))
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use std::time::Duration;

    use super::record;
    use crate::{
        controller::fixtures::{at, job, time},
        crd::{JobPhase, Money},
        worker::WorkerError,
    };
    use kube::runtime::events::EventType;

    fn running(attempts: i32) -> crate::crd::VideoJob {
        job(
            "j",
            json!({"phase": "Running", "instance": "gi", "provider": "vast", "attempts": attempts,
                   "startedAt": time(0), "cost": "0.01"}),
        )
    }

    fn price() -> Money {
        "0.36".parse().unwrap()
    }

    #[test]
    fn a_success_is_recorded_with_the_jobs_share_of_the_bill() {
        let r = record(
            &running(1),
            1,
            "gi",
            price(),
            &Ok(json!({"ok": 1})),
            false,
            at(100),
        )
        .unwrap();
        assert_eq!(r.status.phase, Some(JobPhase::Succeeded));
        // 0.01 from an earlier attempt plus 100 s at 0.36 USD/h.
        assert_eq!(r.status.cost, Some("0.02".parse().unwrap()));
        assert_eq!((r.event.0, r.event.1), (EventType::Normal, "Succeeded"));
    }

    #[test]
    fn a_retryable_failure_requeues_until_the_retries_are_used_then_fails() {
        let err = Err(WorkerError::Connection("reset".into()));
        let r = record(&running(2), 2, "gi", price(), &err, false, at(10)).unwrap();
        assert_eq!(
            (r.status.phase, r.event.1),
            (Some(JobPhase::Pending), "Retrying")
        );
        assert_eq!(r.status.instance, None);
        let r = record(&running(3), 3, "gi", price(), &err, false, at(10)).unwrap();
        assert_eq!(
            (r.status.phase, r.event.1),
            (Some(JobPhase::Failed), "Failed")
        );
        assert_eq!(r.status.conditions[0].reason, "RetriesExhausted");
    }

    #[test]
    fn a_last_attempt_that_timed_out_fails_the_job_as_timed_out() {
        let err = Err(WorkerError::Timeout(Duration::from_secs(5)));
        let r = record(&running(2), 2, "gi", price(), &err, false, at(10)).unwrap();
        assert_eq!(r.status.phase, Some(JobPhase::Pending));
        let r = record(&running(3), 3, "gi", price(), &err, false, at(10)).unwrap();
        assert_eq!(r.status.phase, Some(JobPhase::Failed));
        assert_eq!(r.status.finish_reason(), Some("TimedOut"));
    }

    #[test]
    fn a_stale_outcome_changes_nothing() {
        assert_eq!(
            record(&running(2), 1, "gi", price(), &Ok(json!(1)), false, at(1)),
            None
        );
        let done = job("j", json!({"phase": "Succeeded", "attempts": 1}));
        assert_eq!(
            record(&done, 1, "gi", price(), &Ok(json!(1)), false, at(1)),
            None
        );
    }

    #[test]
    fn an_attempt_lost_to_a_preemption_spends_no_retry() {
        let err = Err(WorkerError::Connection("reset".into()));
        // The last allowed attempt: a worker failure would fail the job...
        let r = record(&running(3), 3, "gi", price(), &err, false, at(10)).unwrap();
        assert_eq!(r.status.phase, Some(JobPhase::Failed));
        // ...a preemption puts it back in the queue, counted apart.
        let r = record(&running(3), 3, "gi", price(), &err, true, at(10)).unwrap();
        assert_eq!(
            (r.status.phase, r.event.1),
            (Some(JobPhase::Pending), "Preempted")
        );
        assert_eq!((r.status.attempts, r.status.preemptions), (3, 1));
        assert!(r.status.may_retry(2), "the next attempt is allowed");
        assert_eq!(
            r.status.cost,
            Some("0.011".parse().unwrap()),
            "the lost attempt's share is billed"
        );
    }
}
