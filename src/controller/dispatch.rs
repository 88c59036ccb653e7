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
    time::{Duration, Instant},
};

use kube::{Api, ResourceExt, api::DeleteParams};
use serde_json::Value;
use tracing::{debug, info, warn};

use crate::{
    crd::{ConditionType, GpuInstance, GpuPool, InstancePhase, JobPhase, VideoJob},
    metrics::JobLabels,
    provider::Credentials,
    worker::{Dispatch, WorkerError},
};

use super::{
    Context, Error, Result, idle,
    status::{apply_status, cost, money, offer_price, parse_money, seconds_between, set_condition},
};

/// How long a finished attempt keeps trying to record its outcome while the API server is
/// unavailable, before leaving it to the reconcilers (which send the job again).
const OUTCOME_PATIENCE: Duration = Duration::from_secs(300);

/// One attempt to start: the instance's session token, the attempt number (1-based), and
/// when the job was found bound (for the dispatch-overhead metric; `None` after a restart).
pub struct Attempt {
    pub token: Credentials,
    pub number: i32,
    pub bound_at: Option<Instant>,
}

/// A job attempt in flight on this replica.
#[derive(Clone, Debug)]
struct Flight {
    instance: String,
    attempt: i32,
}

/// The attempts in flight, by job UID.
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

    /// Starts sending `attempt` of `job` to `instance` unless it is already in flight.
    pub fn start(
        &self,
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
        {
            let mut running = self.lock();
            if running.get(&uid).is_some_and(|f| f.attempt == attempt) {
                return;
            }
            running.insert(
                uid.clone(),
                Flight {
                    instance: instance.name_any(),
                    attempt,
                },
            );
        }
        let job = job.clone();
        let instance = instance.clone();
        let pool = pool.clone();
        tokio::spawn(async move {
            let outcome = send(&ctx, &job, &instance, &pool, &token, attempt, bound_at).await;
            // The outcome exists only in this task: while the API server is unreachable it is
            // kept and written again, rather than left for a reconcile that would send the
            // job a second time.
            let give_up = Instant::now() + OUTCOME_PATIENCE;
            let mut wait = Duration::from_millis(250);
            loop {
                match finish(&ctx, &job, &instance, &pool, attempt, outcome.clone()).await {
                    Ok(()) => break,
                    Err(e) if e.is_unavailable() && Instant::now() + wait < give_up => {
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
            ctx.dispatcher.lock().remove(&uid);
        });
    }
}

async fn send(
    ctx: &Context,
    job: &VideoJob,
    instance: &GpuInstance,
    pool: &GpuPool,
    token: &Credentials,
    attempt: i32,
    bound_at: Option<Instant>,
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
    if let Some(bound) = bound_at {
        ctx.metrics
            .dispatch_overhead_seconds
            .observe(bound.elapsed().as_secs_f64());
    }
    let started = Instant::now();
    let result = worker.dispatch(&request).await;
    ctx.metrics
        .job_run_seconds
        .observe(started.elapsed().as_secs_f64());
    debug!(job = %job.name_any(), ok = result.is_ok(), "worker answered");
    result
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
    let ns = job.namespace().unwrap_or_default();
    let jobs: Api<VideoJob> = Api::namespaced(ctx.client.clone(), &ns);
    let instances: Api<GpuInstance> = Api::namespaced(ctx.client.clone(), &ns);
    let broken = matches!(&outcome, Err(e) if e.instance_looks_broken());
    let price = instance
        .status
        .as_ref()
        .and_then(offer_price)
        .unwrap_or_default();

    // A failed attempt that will be retried frees (or replaces) its instance first, so the
    // pool never sees the job Pending while the instance still claims it (which it would
    // take for a binding to complete). Any other outcome is recorded on the job first.
    let retrying =
        matches!(&outcome, Err(e) if e.is_retryable() && attempt <= job.spec.max_retries);
    if retrying {
        release(ctx, &instances, instance, &job.name_any(), pool, broken).await?;
    }

    // 1. The job, written from the copy the attempt started with (nothing else writes a
    // Running job), retried on conflicts with fresh reads.
    let mut known = Some(job.clone());
    for _ in 0..10 {
        let current = match known.take() {
            Some(j) => j,
            None => match jobs.get_opt(&job.name_any()).await? {
                Some(j) => j,
                None => break,
            },
        };
        if current.uid() != job.uid() {
            break;
        }
        let mut s = current.status.clone().unwrap_or_default();
        if s.attempts != attempt || s.phase != Some(JobPhase::Running) {
            break; // a newer attempt or a finished job: this outcome is stale
        }
        let now = ctx.now();
        let run_secs = s
            .started_at
            .as_ref()
            .map(|t| seconds_between(t.0, now))
            .unwrap_or(0.0);
        let share = money(parse_money(s.cost.as_deref()) + cost(price, run_secs));
        let (event_reason, warning, note) = match &outcome {
            Ok(output) => {
                s.phase = Some(JobPhase::Succeeded);
                s.output = Some(output.clone());
                s.error = None;
                s.finished_at = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(
                    now,
                ));
                s.cost = Some(share);
                set_condition(
                    &mut s.conditions,
                    ConditionType::Complete,
                    true,
                    "WorkerSucceeded",
                    "the worker answered 2xx",
                    current.metadata.generation,
                    now,
                );
                (
                    "Succeeded",
                    false,
                    format!("finished on {} in {run_secs:.2} s", instance.name_any()),
                )
            }
            Err(e) if e.is_retryable() && attempt <= current.spec.max_retries => {
                s.requeue();
                s.error = Some(format!("attempt {attempt} on {}: {e}", instance.name_any()));
                s.cost = Some(share);
                set_condition(
                    &mut s.conditions,
                    ConditionType::Scheduled,
                    false,
                    "Retrying",
                    &format!("attempt {attempt} failed: {}", e.label()),
                    current.metadata.generation,
                    now,
                );
                (
                    "Retrying",
                    true,
                    format!(
                        "attempt {attempt} on {} failed ({e}); retrying",
                        instance.name_any()
                    ),
                )
            }
            Err(e) => {
                s.phase = Some(JobPhase::Failed);
                s.error = Some(e.to_string());
                s.finished_at = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(
                    now,
                ));
                s.cost = Some(share);
                let reason = if e.is_retryable() {
                    "RetriesExhausted"
                } else {
                    e.label()
                };
                set_condition(
                    &mut s.conditions,
                    ConditionType::Complete,
                    false,
                    reason,
                    &e.to_string(),
                    current.metadata.generation,
                    now,
                );
                (
                    "Failed",
                    true,
                    format!("failed on {}: {e}", instance.name_any()),
                )
            }
        };
        match apply_status(&jobs, &current, &s).await {
            Ok(updated) => {
                let outcome_label = match s.phase {
                    Some(JobPhase::Succeeded) => Some("Succeeded"),
                    Some(JobPhase::Failed) => Some("Failed"),
                    _ => None,
                };
                if let Some(o) = outcome_label {
                    ctx.metrics
                        .jobs
                        .get_or_create(&JobLabels {
                            namespace: ns.clone(),
                            pool: pool.name_any(),
                            outcome: o.into(),
                        })
                        .inc();
                }
                ctx.event(&updated, warning, event_reason, note).await;
                break;
            }
            Err(e) if e.is_conflict() => continue,
            Err(Error::Kube(kube::Error::Api(s))) if s.code == 404 => break,
            Err(e) => return Err(e),
        }
    }

    // 2. The instance: freed for the next job, or replaced if it looks broken.
    if !retrying {
        release(ctx, &instances, instance, &job.name_any(), pool, broken).await?;
    }
    Ok(())
}

/// Frees `instance` from `job` (idle from now, deadline set) or, when `broken`, deletes it
/// so its machine is destroyed and the pool rents another.
pub async fn release(
    ctx: &Arc<Context>,
    api: &Api<GpuInstance>,
    instance: &GpuInstance,
    job: &str,
    pool: &GpuPool,
    broken: bool,
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
        if broken {
            info!(instance = %current.name_any(), "instance looks broken; replacing it");
            ctx.event(
                &current,
                true,
                "WorkerUnreachable",
                format!(
                    "lost the connection to the worker during job {job}; replacing the machine"
                ),
            )
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
        let now = ctx.now();
        s.current_job = None;
        s.jobs_completed += 1;
        s.last_job_finished_at = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(
            now,
        ));
        if s.phase == Some(InstancePhase::Ready) {
            s.idle_since = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(
                now,
            ));
            s.idle_deadline = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(
                idle::deadline(now, pool.spec.idle_timeout_seconds),
            ));
        }
        match apply_status(api, &current, &s).await {
            Ok(freed) => {
                // The deadline's timer starts here, not when the instance's own reconcile
                // next runs (which may be waiting on the provider).
                if let Some(deadline) = freed.status.as_ref().and_then(|s| s.idle_deadline.as_ref())
                {
                    super::instance::arm_deadline(ctx, &freed, deadline.0);
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
