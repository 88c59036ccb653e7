//! The worker side of the serverless queue, for endpoints whose workers are real processes
//! (`worker_process`): each worker is `gpupool-worker serverless`, started when the endpoint
//! scales up and killed when it scales down, with the environment RunPod gives a worker. It
//! speaks the routes the official `runpod` SDK's worker calls:
//!
//! | route | what |
//! |---|---|
//! | `GET /v2/{ep}/job-take/{worker}` | the next job `{id, input}`; held open up to [`LONG_POLL`], then 204 |
//! | `POST /v2/{ep}/job-done/{worker}/{job}` | `{"status": "IN_PROGRESS", "output"}` is progress; `{"output"}` completes, `{"error"}` fails |
//! | `GET /v2/{ep}/job-stop/{worker}` | `{"jobsToStop": [job]}` when the worker's job was cancelled; held open, then 204 |
//! | `GET /v2/{ep}/ping/{worker}` | the heartbeat (`job_id`, `runpod_version`), counted |
//!
//! Every route wants the worker key in `Authorization` (the raw key, as the SDK sends it).
//! A worker that asks for a job is idle: a job it held (cancelled, or dropped without a
//! result) no longer holds it. A job still running past its execution timeout is `TIMED_OUT`
//! and its worker is stopped.

use std::{process::Stdio, sync::Arc, time::Duration};

use axum::{
    Router,
    body::Bytes,
    extract::{Path, RawQuery, State},
    http::{HeaderMap, StatusCode},
    response::Response,
    routing::{get, post},
};
use serde_json::{Value, json};
use tokio::time::Instant;
use tracing::{info, warn};

use super::{Endpoint, JobStatus, ServerlessWorker, WorkerState};
use crate::{
    config::WorkerProcessSpec,
    http,
    state::{Sim, State as SimState},
    util,
};

/// How long a take or stop poll is held open before it answers 204.
pub const LONG_POLL: Duration = Duration::from_secs(2);

pub fn routes() -> Router<Arc<Sim>> {
    Router::new()
        .route("/v2/{endpoint}/job-take/{worker}", get(take))
        .route("/v2/{endpoint}/job-stop/{worker}", get(stop))
        .route("/v2/{endpoint}/job-done/{worker}/{job}", post(done))
        .route("/v2/{endpoint}/ping/{worker}", get(ping))
}

/// Starts the worker process of `w` (when the simulator runs real workers).
pub fn spawn(
    sim: &Arc<Sim>,
    spec: &WorkerProcessSpec,
    ep: &Endpoint,
    w: &ServerlessWorker,
) -> Option<tokio::task::JoinHandle<()>> {
    let base = sim.base_url.get()?;
    let q = format!("?gpu={}", ep.spec.gpu_ids.replace(' ', "+"));
    let v2 = format!("{base}/v2/{}", ep.spec.id);
    let mut cmd = tokio::process::Command::new(&spec.command);
    cmd.arg("serverless")
        .envs(&spec.env)
        .env("RUNPOD_POD_ID", &w.id)
        .env("RUNPOD_ENDPOINT_ID", &ep.spec.id)
        .env(
            "RUNPOD_WEBHOOK_GET_JOB",
            format!("{v2}/job-take/$RUNPOD_POD_ID{q}"),
        )
        .env(
            "RUNPOD_WEBHOOK_POST_OUTPUT",
            format!("{v2}/job-done/$RUNPOD_POD_ID/$ID{q}"),
        )
        .env(
            "RUNPOD_WEBHOOK_PING",
            format!("{v2}/ping/$RUNPOD_POD_ID{q}"),
        )
        .env("RUNPOD_PING_INTERVAL", "1000")
        .env("RUNPOD_AI_API_KEY", &sim.queue_key)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    if let Err(e) = crate::process::log_output(&mut cmd, spec, &format!("serverless-{}", w.id)) {
        warn!(error = %e, "cannot open the serverless worker's log; it goes to stderr");
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            warn!(error = %e, command = %spec.command, "cannot start a serverless worker process");
            return None;
        }
    };
    info!(worker = %w.id, pid = child.id().unwrap_or(0), "serverless worker process started");
    let (sim, ep_id, wid) = (sim.clone(), ep.spec.id.clone(), w.id.clone());
    Some(tokio::spawn(async move {
        let status = child.wait().await;
        warn!(worker = %wid, status = ?status.ok(), "serverless worker process exited");
        exited(&sim, &ep_id, &wid);
    }))
}

/// A worker process that ended on its own: the worker died, with its job.
fn exited(sim: &Sim, ep_id: &str, wid: &str) {
    let mut st = sim.lock();
    let st = &mut *st;
    let Some(ep) = st.endpoints.iter_mut().find(|e| e.spec.id == ep_id) else {
        return;
    };
    let Some(w) = ep.workers.iter_mut().find(|w| w.id == wid) else {
        return;
    };
    let held = match &w.state {
        WorkerState::Busy(j) => Some(j.clone()),
        _ => None,
    };
    if w.state != WorkerState::Stopped {
        w.state = WorkerState::Stopped;
        w.stopped_at = Some(util::now_ms());
        w.died = true;
        w.process = None;
    }
    if let Some(j) = held.and_then(|id| st.jobs.iter_mut().find(|j| j.id == id))
        && j.status == JobStatus::InProgress
    {
        j.error = Some("worker exited unexpectedly".into());
        j.finish(JobStatus::Failed);
        ep.failed += 1;
    }
    ep.notify.notify_one();
    sim.notify_jobs();
}

/// Kills the processes of stopped workers (scaled down, timed out, dead).
pub fn reap(ep: &mut Endpoint) {
    for w in &mut ep.workers {
        if w.state == WorkerState::Stopped
            && let Some(task) = w.process.take()
        {
            task.abort();
        }
    }
}

/// Checks the worker key and finds the worker; the error answers otherwise.
fn authorized(sim: &Sim, headers: &HeaderMap) -> Result<(), Response> {
    if http::provided_key(headers, &[]).as_deref() == Some(sim.queue_key.as_str()) {
        Ok(())
    } else {
        Err(util::json(
            StatusCode::UNAUTHORIZED,
            &json!({"error": "wrong or missing worker key"}),
        ))
    }
}

/// Runs `f` on the worker `wid` of endpoint `ep_id` and the simulator state.
fn with_worker<T>(
    sim: &Sim,
    ep_id: &str,
    wid: &str,
    f: impl FnOnce(&mut SimState, usize, usize) -> T,
) -> Result<T, Response> {
    let mut st = sim.lock();
    let Some(e) = st.endpoints.iter().position(|e| e.spec.id == ep_id) else {
        return Err(super::not_found("endpoint", ep_id));
    };
    let Some(w) = st.endpoints[e]
        .workers
        .iter()
        .position(|w| w.id == wid && w.state != WorkerState::Stopped)
    else {
        return Err(util::json(
            StatusCode::BAD_REQUEST,
            &json!({"error": format!("no running worker {wid}")}),
        ));
    };
    Ok(f(&mut st, e, w))
}

/// The worker asks for work: it is idle now, and gets the next queued job if there is one.
fn try_take(st: &mut SimState, e: usize, w: usize) -> Option<(String, Value, u64)> {
    let now = Instant::now();
    let worker = &mut st.endpoints[e].workers[w];
    let dropped = match &worker.state {
        WorkerState::Busy(j) => Some(j.clone()),
        _ => None,
    };
    if worker.state != WorkerState::Idle {
        worker.state = WorkerState::Idle;
        worker.idle_since = now;
    }
    let wid = worker.id.clone();
    if let Some(j) = dropped.and_then(|id| st.jobs.iter_mut().find(|j| j.id == id))
        && j.status == JobStatus::InProgress
    {
        j.error = Some("the worker took another job without reporting this one".into());
        j.finish(JobStatus::Failed);
        st.endpoints[e].failed += 1;
    }
    while let Some(job_id) = st.endpoints[e].queue.pop_front() {
        let Some((input, timeout_ms, _cancel)) =
            super::claim_job(st, &job_id, &wid, now, util::now_ms())
        else {
            continue;
        };
        st.endpoints[e].workers[w].state = WorkerState::Busy(job_id.clone());
        st.count_execution(&job_id, &wid);
        return Some((job_id, input, timeout_ms));
    }
    None
}

/// Asks `attempt` for an answer, again after every change of the jobs, until it has one or
/// [`LONG_POLL`] has passed (then 204): how the queue holds a worker's poll open.
async fn long_poll(sim: &Sim, mut attempt: impl FnMut() -> Option<Response>) -> Response {
    let deadline = Instant::now() + LONG_POLL;
    let mut changed = sim.jobs_changed.subscribe();
    loop {
        changed.mark_unchanged();
        if let Some(r) = attempt() {
            return r;
        }
        let wait = deadline.saturating_duration_since(Instant::now());
        if wait.is_zero() || tokio::time::timeout(wait, changed.changed()).await.is_err() {
            return util::bytes_response(StatusCode::NO_CONTENT, "application/json", Vec::new());
        }
    }
}

async fn take(
    State(sim): State<Arc<Sim>>,
    Path((ep_id, wid)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = authorized(&sim, &headers) {
        return r;
    }
    long_poll(&sim, || {
        let took = match with_worker(&sim, &ep_id, &wid, |st, e, w| {
            let t = try_take(st, e, w);
            st.endpoints[e].notify.notify_one();
            t
        }) {
            Ok(t) => t?,
            Err(r) => return Some(r),
        };
        let (id, input, timeout_ms) = took;
        sim.notify_jobs();
        tokio::spawn(time_limit(
            sim.clone(),
            ep_id.clone(),
            wid.clone(),
            id.clone(),
            timeout_ms,
        ));
        Some(util::json(
            StatusCode::OK,
            &json!({"id": id, "input": input}),
        ))
    })
    .await
}

/// Ends a job still running on its worker after its execution timeout, stopping the worker.
async fn time_limit(sim: Arc<Sim>, ep_id: String, wid: String, job_id: String, timeout_ms: u64) {
    tokio::time::sleep(Duration::from_millis(timeout_ms.max(1))).await;
    {
        let mut st = sim.lock();
        let st = &mut *st;
        let Some(ep) = st.endpoints.iter_mut().find(|e| e.spec.id == ep_id) else {
            return;
        };
        let Some(job) = st.jobs.iter_mut().find(|j| {
            j.id == job_id
                && j.status == JobStatus::InProgress
                && j.worker_id.as_deref() == Some(wid.as_str())
        }) else {
            return;
        };
        job.error = Some(format!("job timed out after {timeout_ms} ms"));
        job.finish(JobStatus::TimedOut);
        ep.failed += 1;
        if let Some(w) = ep.workers.iter_mut().find(|w| w.id == wid) {
            w.state = WorkerState::Stopped;
            w.stopped_at = Some(util::now_ms());
        }
        reap(ep);
        ep.notify.notify_one();
    }
    sim.notify_jobs();
}

async fn done(
    State(sim): State<Arc<Sim>>,
    Path((ep_id, wid, job_id)): Path<(String, String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(r) = authorized(&sim, &headers) {
        return r;
    }
    // The SDK sends JSON text under a form content type: the body is read as JSON whatever
    // the header says.
    let Ok(Value::Object(body)) = serde_json::from_slice::<Value>(&body) else {
        return util::json(
            StatusCode::BAD_REQUEST,
            &json!({"error": "the body must be a JSON object"}),
        );
    };
    let res = with_worker(&sim, &ep_id, &wid, |st, e, w| {
        let Some(job) = st.jobs.iter_mut().find(|j| j.id == job_id) else {
            return Err(super::not_found("job", &job_id));
        };
        if job.worker_id.as_deref() != Some(wid.as_str()) {
            return Err(util::json(
                StatusCode::BAD_REQUEST,
                &json!({"error": "the job is not this worker's"}),
            ));
        }
        if job.status != JobStatus::InProgress {
            // Cancelled or timed out meanwhile: the late result is dropped.
            return Ok(());
        }
        if body.get("status").and_then(Value::as_str) == Some("IN_PROGRESS") {
            job.output = body.get("output").cloned();
            return Ok(());
        }
        job.cancel = None;
        let failed = match body.get("error").filter(|v| !v.is_null()) {
            Some(err) => {
                job.error = Some(err.as_str().map_or_else(|| err.to_string(), str::to_string));
                job.output = None;
                job.finish(JobStatus::Failed);
                true
            }
            None => {
                job.output = Some(body.get("output").cloned().unwrap_or(Value::Null));
                job.finish(JobStatus::Completed);
                false
            }
        };
        let ep = &mut st.endpoints[e];
        if failed {
            ep.failed += 1
        } else {
            ep.completed += 1
        }
        let worker = &mut ep.workers[w];
        if body.get("stopPod").and_then(Value::as_bool) == Some(true) {
            worker.state = WorkerState::Stopped;
            worker.stopped_at = Some(util::now_ms());
            reap(ep);
        } else if worker.state == WorkerState::Busy(job_id.clone()) {
            worker.state = WorkerState::Idle;
            worker.idle_since = Instant::now();
        }
        ep.notify.notify_one();
        Ok(())
    });
    sim.notify_jobs();
    match res {
        Ok(Ok(())) => util::json(StatusCode::OK, &json!({})),
        Ok(Err(r)) | Err(r) => r,
    }
}

/// The cancelled job a worker still holds, if any.
fn to_stop(st: &SimState, e: usize, w: usize) -> Option<String> {
    let WorkerState::Busy(j) = &st.endpoints[e].workers[w].state else {
        return None;
    };
    st.jobs
        .iter()
        .find(|job| job.id == *j)
        .is_none_or(|job| job.status == JobStatus::Cancelled)
        .then(|| j.clone())
}

async fn stop(
    State(sim): State<Arc<Sim>>,
    Path((ep_id, wid)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = authorized(&sim, &headers) {
        return r;
    }
    long_poll(&sim, || {
        match with_worker(&sim, &ep_id, &wid, |st, e, w| to_stop(st, e, w)) {
            Ok(Some(j)) => Some(util::json(StatusCode::OK, &json!({"jobsToStop": [j]}))),
            Ok(None) => None,
            Err(r) => Some(r),
        }
    })
    .await
}

async fn ping(
    State(sim): State<Arc<Sim>>,
    Path((ep_id, wid)): Path<(String, String)>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = authorized(&sim, &headers) {
        return r;
    }
    let q = util::query_pairs(raw.as_deref());
    let unhealthy = q.iter().any(|(k, v)| k == "status" && v == "unhealthy");
    let res = with_worker(&sim, &ep_id, &wid, |st, e, w| {
        let worker = &mut st.endpoints[e].workers[w];
        worker.pings += 1;
        worker.unhealthy |= unhealthy;
    });
    match res {
        Ok(()) => util::json(StatusCode::OK, &json!({})),
        Err(r) => r,
    }
}
