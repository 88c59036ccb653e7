//! RunPod Serverless (providers.md §2.8): endpoints with a queue and workers that cold-start,
//! run jobs, stay warm for the endpoint's own `idleTimeout`, then stop; billed per
//! worker-second. Served under `/v2/{endpointId}/...`.
//!
//! Each endpoint has a driver task that reconciles it (start workers for the queue, hand
//! jobs to idle workers, stop workers idle too long) whenever something changes or a
//! deadline passes. Jobs run the same `simulate` hooks as the instance workers.

use std::{collections::VecDeque, sync::Arc, time::Duration};

use axum::{
    Extension, Router,
    body::Bytes,
    extract::{Path, RawQuery, State},
    http::{HeaderMap, StatusCode},
    response::Response,
    routing::{get, post},
};
use jiff::Timestamp;
use serde_json::{Map, Value, json};
use tokio::{
    sync::{Notify, watch},
    time::Instant,
};

mod queue;

use super::{
    config::EndpointSpec,
    http::{self, AuthMode, Family, OpSlot},
    serve,
    state::{Sim, State as SimState},
    util,
    worker::{JobPlan, job_result},
};

/// Job states as the API spells them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobStatus {
    InQueue,
    InProgress,
    Completed,
    Failed,
    Cancelled,
    TimedOut,
}

impl JobStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InQueue => "IN_QUEUE",
            Self::InProgress => "IN_PROGRESS",
            Self::Completed => "COMPLETED",
            Self::Failed => "FAILED",
            Self::Cancelled => "CANCELLED",
            Self::TimedOut => "TIMED_OUT",
        }
    }

    pub fn is_final(self) -> bool {
        !matches!(self, Self::InQueue | Self::InProgress)
    }
}

/// A serverless worker's state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WorkerState {
    Initializing,
    Idle,
    Busy(String),
    Stopped,
}

#[derive(Debug)]
pub struct ServerlessWorker {
    pub id: String,
    pub state: WorkerState,
    pub started_at: Timestamp,
    pub ready_at: Instant,
    pub idle_since: Instant,
    pub stopped_at: Option<Timestamp>,
    pub died: bool,
    /// The task holding this worker's real process (`worker_process`); aborting it kills it.
    pub process: Option<tokio::task::JoinHandle<()>>,
    /// Heartbeats received from the worker process, and whether one reported it unhealthy.
    pub pings: u64,
    pub unhealthy: bool,
}

impl ServerlessWorker {
    pub fn cost(&self, price_per_hour: f64, now: Timestamp) -> f64 {
        util::cost(
            price_per_hour,
            util::seconds_between(self.started_at, self.stopped_at.unwrap_or(now)),
        )
    }
}

/// An endpoint: its settings, workers and queue.
#[derive(Debug)]
pub struct Endpoint {
    pub spec: EndpointSpec,
    pub created_at: Timestamp,
    pub version: u32,
    pub workers: Vec<ServerlessWorker>,
    pub next_worker: u64,
    pub queue: VecDeque<String>,
    pub notify: Arc<Notify>,
    pub completed: u64,
    pub failed: u64,
    pub retried: u64,
    /// Settings only REST v2 knows (`flashboot`, CUDA constraints, container config...),
    /// kept as v2 spells them; GraphQL's full replace leaves them alone.
    pub v2: Map<String, Value>,
}

impl Endpoint {
    pub fn cost(&self, now: Timestamp) -> f64 {
        self.workers
            .iter()
            .fold(0.0, |sum, w| sum + w.cost(self.spec.price_per_hour, now))
    }

    fn active(&self) -> usize {
        self.workers
            .iter()
            .filter(|w| w.state != WorkerState::Stopped)
            .count()
    }
}

/// A job at an endpoint.
#[derive(Debug)]
pub struct Job {
    pub id: String,
    pub endpoint_id: String,
    pub input: Value,
    pub status: JobStatus,
    pub submitted_at: Timestamp,
    submitted: Instant,
    started: Option<Instant>,
    finished: Option<Instant>,
    pub started_at: Option<Timestamp>,
    pub finished_at: Option<Timestamp>,
    pub output: Option<Value>,
    pub error: Option<String>,
    pub worker_id: Option<String>,
    pub execution_timeout_ms: u64,
    pub retries: u32,
    stream_delivered: bool,
    cancel: Option<watch::Sender<bool>>,
}

impl Job {
    fn ms(from: Instant, to: Instant) -> u64 {
        to.saturating_duration_since(from).as_millis() as u64
    }

    /// The `/status` body.
    pub fn status_json(&self) -> Value {
        let now = Instant::now();
        let delay = Self::ms(
            self.submitted,
            self.started.or(self.finished).unwrap_or(now),
        );
        let exec = self
            .started
            .map(|s| Self::ms(s, self.finished.unwrap_or(now)))
            .unwrap_or(0);
        let mut v = json!({"id": self.id, "status": self.status.as_str(), "delayTime": delay, "executionTime": exec});
        if let Some(obj) = v.as_object_mut() {
            if let Some(w) = &self.worker_id {
                obj.insert("workerId".into(), json!(w));
            }
            if let Some(o) = &self.output {
                obj.insert("output".into(), o.clone());
            }
            if let Some(e) = &self.error {
                obj.insert("error".into(), json!(e));
            }
            if self.retries > 0 {
                obj.insert("retries".into(), json!(self.retries));
            }
        }
        v
    }

    fn finish(&mut self, status: JobStatus) {
        self.status = status;
        self.finished = Some(Instant::now());
        self.finished_at = Some(util::now_ms());
    }
}

/// Registers an endpoint and starts its driver.
pub fn install(sim: &Arc<Sim>, spec: EndpointSpec) {
    let notify = Arc::new(Notify::new());
    let epoch = {
        let mut st = sim.lock();
        st.endpoints.push(Endpoint {
            spec: spec.clone(),
            created_at: util::now_ms(),
            version: 1,
            workers: Vec::new(),
            next_worker: 1,
            queue: VecDeque::new(),
            notify: notify.clone(),
            completed: 0,
            failed: 0,
            retried: 0,
            v2: Map::new(),
        });
        st.epoch
    };
    tokio::spawn(driver(sim.clone(), spec.id, notify, epoch));
}

async fn driver(sim: Arc<Sim>, endpoint_id: String, notify: Arc<Notify>, epoch: u64) {
    let mut stop = sim.shutdown.subscribe();
    loop {
        let wake = {
            let mut st = sim.lock();
            if st.epoch != epoch {
                return;
            }
            let Some(idx) = st.endpoints.iter().position(|e| e.spec.id == endpoint_id) else {
                return;
            };
            reconcile(&sim, &mut st, idx)
        };
        let far = Instant::now() + Duration::from_secs(3600);
        tokio::select! {
            _ = notify.notified() => {}
            _ = tokio::time::sleep_until(wake.unwrap_or(far)) => {}
            _ = serve::wait_true(&mut stop) => return,
        }
    }
}

/// An endpoint's scaling settings, read once per reconcile pass.
struct Scaling {
    cold: Duration,
    idle_timeout: Duration,
    min: usize,
    max: usize,
}

impl Scaling {
    /// The scaling settings of `s`.
    fn of(s: &EndpointSpec) -> Self {
        Self {
            cold: util::secs(s.cold_start_seconds),
            idle_timeout: Duration::from_secs(u64::from(s.idle_timeout)),
            min: s.workers_min as usize,
            max: s.workers_max as usize,
        }
    }
}

/// One pass over an endpoint; returns when it next needs attention without being notified.
fn reconcile(sim: &Arc<Sim>, st: &mut SimState, idx: usize) -> Option<Instant> {
    let now = Instant::now();
    let now_ts = util::now_ms();
    let scaling = Scaling::of(&st.endpoints[idx].spec);
    let real = sim.initial.worker_process.as_ref();
    if real.is_none() {
        // Real workers become idle by asking for a job (queue.rs), not after a set time.
        for w in &mut st.endpoints[idx].workers {
            if w.state == WorkerState::Initializing && now >= w.ready_at {
                w.state = WorkerState::Idle;
                w.idle_since = now;
            }
        }
        dispatch_queue(sim, st, idx, now, now_ts);
    }
    let ep = &mut st.endpoints[idx];
    scale_up(ep, &scaling, now, now_ts);
    let active = scale_down(ep, &scaling, now, now_ts);
    if let Some(spec) = real {
        queue::reap(ep);
        for i in 0..ep.workers.len() {
            if ep.workers[i].state != WorkerState::Stopped && ep.workers[i].process.is_none() {
                let task = queue::spawn(sim, spec, ep, &ep.workers[i]);
                if task.is_none() {
                    ep.workers[i].state = WorkerState::Stopped;
                    ep.workers[i].stopped_at = Some(now_ts);
                    ep.workers[i].died = true;
                }
                ep.workers[i].process = task;
            }
        }
    }
    next_wake(ep, &scaling, active)
}

/// Hands queued jobs to idle workers, in queue order, while there are both.
fn dispatch_queue(sim: &Arc<Sim>, st: &mut SimState, idx: usize, now: Instant, now_ts: Timestamp) {
    loop {
        let ep = &mut st.endpoints[idx];
        let Some(widx) = ep.workers.iter().position(|w| w.state == WorkerState::Idle) else {
            break;
        };
        let Some(job_id) = ep.queue.pop_front() else {
            break;
        };
        let worker_id = ep.workers[widx].id.clone();
        let endpoint_id = ep.spec.id.clone();
        let times = ep.spec.operations.clone();
        let Some((input, timeout_ms, cancel)) = claim_job(st, &job_id, &worker_id, now, now_ts)
        else {
            continue;
        };
        st.endpoints[idx].workers[widx].state = WorkerState::Busy(job_id.clone());
        let op = input
            .get("operation")
            .and_then(Value::as_str)
            .unwrap_or("default")
            .to_string();
        let input = input.as_object().cloned().unwrap_or_default();
        let mut plan = JobPlan::from_input(
            &input,
            &op,
            &[&times, &st.timing.operations],
            st.timing.default_operation_seconds,
        );
        plan.die |= st.faults.die_mid_job.fire(&mut st.rng);
        st.count_execution(&job_id, &worker_id);
        sim.notify_jobs();
        let run = JobRun {
            endpoint_id,
            job_id,
            worker_id,
            op,
            input,
            plan,
            timeout_ms,
        };
        tokio::spawn(run_job(sim.clone(), run, cancel));
    }
}

/// Marks queued job `job_id` in progress on `worker_id`; its input, execution timeout and
/// cancel signal, or `None` when it is no longer queued.
fn claim_job(
    st: &mut SimState,
    job_id: &str,
    worker_id: &str,
    now: Instant,
    now_ts: Timestamp,
) -> Option<(Value, u64, watch::Receiver<bool>)> {
    let job = st
        .jobs
        .iter_mut()
        .find(|j| j.id == job_id && j.status == JobStatus::InQueue)?;
    job.status = JobStatus::InProgress;
    job.started = Some(now);
    job.started_at = Some(now_ts);
    job.worker_id = Some(worker_id.to_string());
    let (tx, rx) = watch::channel(false);
    job.cancel = Some(tx);
    Some((job.input.clone(), job.execution_timeout_ms, rx))
}

/// Starts workers for the queue (beyond those ready or about to be), and up to the
/// minimum, never past the maximum.
fn scale_up(ep: &mut Endpoint, scaling: &Scaling, now: Instant, now_ts: Timestamp) {
    let waiting = ep.queue.len();
    let ready_soon = ep
        .workers
        .iter()
        .filter(|w| matches!(w.state, WorkerState::Idle | WorkerState::Initializing))
        .count();
    let mut to_start = waiting.saturating_sub(ready_soon);
    to_start = to_start.max(scaling.min.saturating_sub(ep.active()));
    to_start = to_start.min(scaling.max.saturating_sub(ep.active()));
    for _ in 0..to_start {
        let id = format!("{}-w{}", ep.spec.id, ep.next_worker);
        ep.next_worker += 1;
        ep.workers.push(ServerlessWorker {
            id,
            state: WorkerState::Initializing,
            started_at: now_ts,
            ready_at: now + scaling.cold,
            idle_since: now,
            stopped_at: None,
            died: false,
            process: None,
            pings: 0,
            unhealthy: false,
        });
    }
}

/// Stops workers idle past the timeout (keeping the minimum), or above a lowered maximum;
/// returns how many are left active.
fn scale_down(ep: &mut Endpoint, scaling: &Scaling, now: Instant, now_ts: Timestamp) -> usize {
    let mut active = ep.active();
    for w in &mut ep.workers {
        let idle_expired =
            w.state == WorkerState::Idle && now >= w.idle_since + scaling.idle_timeout;
        let surplus = matches!(w.state, WorkerState::Idle | WorkerState::Initializing)
            && active > scaling.max;
        if (idle_expired && active > scaling.min) || surplus {
            w.state = WorkerState::Stopped;
            w.stopped_at = Some(now_ts);
            active -= 1;
        }
    }
    active
}

/// The next deadline: a worker becoming ready, or an idle one timing out.
fn next_wake(ep: &Endpoint, scaling: &Scaling, active: usize) -> Option<Instant> {
    let mut wake: Option<Instant> = None;
    let mut consider = |t: Instant| wake = Some(wake.map_or(t, |w| w.min(t)));
    for w in &ep.workers {
        match w.state {
            WorkerState::Initializing => consider(w.ready_at),
            WorkerState::Idle if active > scaling.min => {
                consider(w.idle_since + scaling.idle_timeout)
            }
            _ => {}
        }
    }
    wake
}

/// Sleeps; true when cancelled (or the job vanished) first.
async fn cancellable(d: Duration, cancel: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => *cancel.borrow(),
        _ = cancel.changed() => true,
    }
}

/// A job handed to a serverless worker: what it runs and how it will go.
struct JobRun {
    endpoint_id: String,
    job_id: String,
    worker_id: String,
    op: String,
    input: Map<String, Value>,
    plan: JobPlan,
    timeout_ms: u64,
}

/// Runs a job on its worker: waits the planned time (half of it when the worker dies),
/// then frees or loses the worker and records the job's outcome unless it was cancelled.
async fn run_job(sim: Arc<Sim>, run: JobRun, mut cancel: watch::Receiver<bool>) {
    let timeout = Duration::from_millis(run.timeout_ms.max(1));
    let work = util::secs(run.plan.seconds);
    let died = run.plan.die;
    let wait = if died { work / 2 } else { work.min(timeout) };
    let cancelled = cancellable(wait, &mut cancel).await;
    let mut st = sim.lock();
    let st = &mut *st;
    let Some(ep) = st
        .endpoints
        .iter_mut()
        .find(|e| e.spec.id == run.endpoint_id)
    else {
        return;
    };
    let notify = ep.notify.clone();
    if let Some(w) = ep.workers.iter_mut().find(|w| w.id == run.worker_id) {
        release_worker(w, &run.job_id, died && !cancelled);
    }
    let mut outcome = None;
    if let Some(job) = st.jobs.iter_mut().find(|j| j.id == run.job_id)
        && !cancelled
        && job.status == JobStatus::InProgress
    {
        conclude(job, &run, work > timeout);
        outcome = Some(job.status);
    }
    if let Some(ep) = st
        .endpoints
        .iter_mut()
        .find(|e| e.spec.id == run.endpoint_id)
    {
        match outcome {
            Some(JobStatus::Completed) => ep.completed += 1,
            Some(JobStatus::Failed | JobStatus::TimedOut) => ep.failed += 1,
            _ => {}
        }
    }
    notify.notify_one();
    sim.notify_jobs();
}

/// After a job: the worker died with it, or goes back to idle if still on that job.
fn release_worker(w: &mut ServerlessWorker, job_id: &str, died: bool) {
    if died {
        w.state = WorkerState::Stopped;
        w.stopped_at = Some(util::now_ms());
        w.died = true;
    } else if w.state == WorkerState::Busy(job_id.to_string()) {
        w.state = WorkerState::Idle;
        w.idle_since = Instant::now();
    }
}

/// Finishes a job that ran to its end: failed with its worker, timed out, failed as
/// planned, or completed with its output.
fn conclude(job: &mut Job, run: &JobRun, timed_out: bool) {
    job.cancel = None;
    if run.plan.die {
        job.error = Some("worker exited unexpectedly (simulated)".into());
        job.finish(JobStatus::Failed);
    } else if timed_out {
        job.error = Some(format!("job timed out after {} ms", run.timeout_ms));
        job.finish(JobStatus::TimedOut);
    } else if let Some((_, msg)) = &run.plan.fail {
        job.error = Some(msg.clone());
        job.finish(JobStatus::Failed);
    } else if run.plan.non_json {
        job.output = Some(json!("<html><body>simulated non-JSON answer</body></html>"));
        job.finish(JobStatus::Completed);
    } else {
        job.output = Some(job_result(
            &run.op,
            &run.job_id,
            &run.worker_id,
            &run.input,
            &run.plan,
        ));
        job.finish(JobStatus::Completed);
    }
}

pub fn routes() -> Router<Arc<Sim>> {
    Router::new()
        .route("/v2/{endpoint}/run", post(run))
        .route("/v2/{endpoint}/runsync", post(runsync))
        .route("/v2/{endpoint}/status/{job}", get(status).post(status))
        .route("/v2/{endpoint}/status-sync/{job}", get(status).post(status))
        .route("/v2/{endpoint}/stream/{job}", get(stream))
        .route("/v2/{endpoint}/cancel/{job}", post(cancel))
        .route("/v2/{endpoint}/retry/{job}", post(retry))
        .route("/v2/{endpoint}/health", get(health))
        .route("/v2/{endpoint}/purge-queue", post(purge))
        .merge(queue::routes())
}

fn not_found(what: &str, id: &str) -> Response {
    util::json(
        StatusCode::NOT_FOUND,
        &json!({"error": format!("{what} {id} not found")}),
    )
}

async fn gate(
    sim: &Sim,
    slot: &OpSlot,
    op: &str,
    headers: &HeaderMap,
    raw: Option<&str>,
    endpoint: &str,
) -> Result<(), Response> {
    let q = util::query_pairs(raw);
    let key = http::provided_key(headers, &q);
    http::gate(
        sim,
        slot,
        op,
        Family::Serverless,
        key.as_deref(),
        AuthMode::Required,
    )
    .await?;
    if sim.lock().endpoints.iter().any(|e| e.spec.id == endpoint) {
        Ok(())
    } else {
        Err(not_found("endpoint", endpoint))
    }
}

/// Queues a job; returns its id.
fn submit(sim: &Sim, endpoint: &str, body: &Bytes, sync: bool) -> Result<String, Response> {
    let bad = |msg: &str| util::json(StatusCode::BAD_REQUEST, &json!({"error": msg}));
    let body: Map<String, Value> = match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => m,
        _ => return Err(bad("the body must be a JSON object")),
    };
    let Some(input) = body.get("input").filter(|v| !v.is_null()).cloned() else {
        return Err(bad("missing 'input'"));
    };
    let mut st = sim.lock();
    let st = &mut *st;
    let Some(ep) = st.endpoints.iter_mut().find(|e| e.spec.id == endpoint) else {
        return Err(not_found("endpoint", endpoint));
    };
    let timeout = body
        .get("policy")
        .and_then(|p| p.get("executionTimeout"))
        .and_then(Value::as_u64)
        .unwrap_or(ep.spec.execution_timeout_ms);
    let uuid = util::uuid(&mut st.rng);
    let id = if sync { format!("sync-{uuid}") } else { uuid };
    ep.queue.push_back(id.clone());
    ep.notify.notify_one();
    st.jobs.push(Job {
        id: id.clone(),
        endpoint_id: endpoint.to_string(),
        input,
        status: JobStatus::InQueue,
        submitted_at: util::now_ms(),
        submitted: Instant::now(),
        started: None,
        finished: None,
        started_at: None,
        finished_at: None,
        output: None,
        error: None,
        worker_id: None,
        execution_timeout_ms: timeout,
        retries: 0,
        stream_delivered: false,
        cancel: None,
    });
    Ok(id)
}

async fn run(
    State(sim): State<Arc<Sim>>,
    Extension(slot): Extension<OpSlot>,
    Path(endpoint): Path<String>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(r) = gate(
        &sim,
        &slot,
        "serverless.run",
        &headers,
        raw.as_deref(),
        &endpoint,
    )
    .await
    {
        return r;
    }
    match submit(&sim, &endpoint, &body, false) {
        Ok(id) => {
            slot.set_instance(id.clone());
            sim.notify_jobs();
            util::json(StatusCode::OK, &json!({"id": id, "status": "IN_QUEUE"}))
        }
        Err(r) => r,
    }
}

async fn runsync(
    State(sim): State<Arc<Sim>>,
    Extension(slot): Extension<OpSlot>,
    Path(endpoint): Path<String>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(r) = gate(
        &sim,
        &slot,
        "serverless.runsync",
        &headers,
        raw.as_deref(),
        &endpoint,
    )
    .await
    {
        return r;
    }
    let q = util::query_pairs(raw.as_deref());
    let wait_ms = util::query_get(&q, "wait")
        .and_then(|w| w.parse::<u64>().ok())
        .unwrap_or(90_000)
        .clamp(1_000, 300_000);
    let mut changes = sim.jobs_changed.subscribe();
    let id = match submit(&sim, &endpoint, &body, true) {
        Ok(id) => id,
        Err(r) => return r,
    };
    slot.set_instance(id.clone());
    let deadline = Instant::now() + Duration::from_millis(wait_ms);
    loop {
        let snapshot = {
            let st = sim.lock();
            st.jobs
                .iter()
                .find(|j| j.id == id)
                .map(|j| (j.status, j.status_json()))
        };
        let Some((status, body)) = snapshot else {
            return not_found("job", &id);
        };
        if status.is_final() {
            return util::json(StatusCode::OK, &body);
        }
        tokio::select! {
            _ = changes.changed() => {}
            _ = tokio::time::sleep_until(deadline) => {
                return util::json(StatusCode::OK, &json!({"id": id, "status": status.as_str()}));
            }
        }
    }
}

/// Looks a job of this endpoint up and maps it with `f`.
fn with_job<T>(
    sim: &Sim,
    endpoint: &str,
    job: &str,
    f: impl FnOnce(&mut SimState, usize) -> T,
) -> Result<T, Response> {
    let mut st = sim.lock();
    match st
        .jobs
        .iter()
        .position(|j| j.id == job && j.endpoint_id == endpoint)
    {
        Some(idx) => Ok(f(&mut st, idx)),
        None => Err(not_found("job", job)),
    }
}

async fn status(
    State(sim): State<Arc<Sim>>,
    Extension(slot): Extension<OpSlot>,
    Path((endpoint, job)): Path<(String, String)>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = gate(
        &sim,
        &slot,
        "serverless.status",
        &headers,
        raw.as_deref(),
        &endpoint,
    )
    .await
    {
        return r;
    }
    slot.set_instance(job.clone());
    match with_job(&sim, &endpoint, &job, |st, i| st.jobs[i].status_json()) {
        Ok(v) => util::json(StatusCode::OK, &v),
        Err(r) => r,
    }
}

async fn stream(
    State(sim): State<Arc<Sim>>,
    Extension(slot): Extension<OpSlot>,
    Path((endpoint, job)): Path<(String, String)>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = gate(
        &sim,
        &slot,
        "serverless.stream",
        &headers,
        raw.as_deref(),
        &endpoint,
    )
    .await
    {
        return r;
    }
    slot.set_instance(job.clone());
    // The whole output arrives as one chunk, once, when the job is done: the official
    // client loops until the status is final and the chunk list is empty.
    let res = with_job(&sim, &endpoint, &job, |st, i| {
        let j = &mut st.jobs[i];
        let mut chunks = Vec::new();
        if j.status.is_final() && !j.stream_delivered {
            j.stream_delivered = true;
            if let Some(o) = &j.output {
                chunks.push(json!({"output": o}));
            }
        }
        json!({"status": j.status.as_str(), "stream": chunks})
    });
    match res {
        Ok(v) => util::json(StatusCode::OK, &v),
        Err(r) => r,
    }
}

async fn cancel(
    State(sim): State<Arc<Sim>>,
    Extension(slot): Extension<OpSlot>,
    Path((endpoint, job)): Path<(String, String)>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = gate(
        &sim,
        &slot,
        "serverless.cancel",
        &headers,
        raw.as_deref(),
        &endpoint,
    )
    .await
    {
        return r;
    }
    slot.set_instance(job.clone());
    let res = with_job(&sim, &endpoint, &job, |st, i| {
        let j = &mut st.jobs[i];
        match j.status {
            JobStatus::InQueue => {
                j.finish(JobStatus::Cancelled);
                if let Some(ep) = st.endpoints.iter_mut().find(|e| e.spec.id == endpoint) {
                    ep.queue.retain(|q| *q != job);
                }
            }
            JobStatus::InProgress => {
                j.finish(JobStatus::Cancelled);
                if let Some(tx) = j.cancel.take() {
                    let _ = tx.send(true);
                }
            }
            _ => {}
        }
        let status = st.jobs[i].status;
        json!({"id": job, "status": status.as_str()})
    });
    sim.notify_jobs();
    match res {
        Ok(v) => util::json(StatusCode::OK, &v),
        Err(r) => r,
    }
}

async fn retry(
    State(sim): State<Arc<Sim>>,
    Extension(slot): Extension<OpSlot>,
    Path((endpoint, job)): Path<(String, String)>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = gate(
        &sim,
        &slot,
        "serverless.retry",
        &headers,
        raw.as_deref(),
        &endpoint,
    )
    .await
    {
        return r;
    }
    slot.set_instance(job.clone());
    let res = with_job(&sim, &endpoint, &job, |st, i| {
        let j = &mut st.jobs[i];
        if !matches!(j.status, JobStatus::Failed | JobStatus::TimedOut) {
            return Err(util::json(
                StatusCode::BAD_REQUEST,
                &json!({"error": "only FAILED or TIMED_OUT jobs can be retried"}),
            ));
        }
        j.status = JobStatus::InQueue;
        j.retries += 1;
        j.submitted = Instant::now();
        j.started = None;
        j.finished = None;
        j.started_at = None;
        j.finished_at = None;
        j.output = None;
        j.error = None;
        j.worker_id = None;
        if let Some(ep) = st.endpoints.iter_mut().find(|e| e.spec.id == endpoint) {
            ep.queue.push_back(job.clone());
            ep.retried += 1;
            ep.notify.notify_one();
        }
        Ok(json!({"id": job, "status": "IN_QUEUE"}))
    });
    match res {
        Ok(Ok(v)) => util::json(StatusCode::OK, &v),
        Ok(Err(r)) | Err(r) => r,
    }
}

async fn health(
    State(sim): State<Arc<Sim>>,
    Extension(slot): Extension<OpSlot>,
    Path(endpoint): Path<String>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = gate(
        &sim,
        &slot,
        "serverless.health",
        &headers,
        raw.as_deref(),
        &endpoint,
    )
    .await
    {
        return r;
    }
    let st = sim.lock();
    let Some(ep) = st.endpoints.iter().find(|e| e.spec.id == endpoint) else {
        return not_found("endpoint", &endpoint);
    };
    let count_jobs = |s: JobStatus| {
        st.jobs
            .iter()
            .filter(|j| j.endpoint_id == endpoint && j.status == s)
            .count()
    };
    let count_workers =
        |f: &dyn Fn(&WorkerState) -> bool| ep.workers.iter().filter(|w| f(&w.state)).count();
    let idle = count_workers(&|s| *s == WorkerState::Idle);
    let running = count_workers(&|s| matches!(s, WorkerState::Busy(_)));
    let init = count_workers(&|s| *s == WorkerState::Initializing);
    util::json(
        StatusCode::OK,
        &json!({
            "jobs": {
                "completed": ep.completed,
                "failed": ep.failed,
                "inProgress": count_jobs(JobStatus::InProgress),
                "inQueue": count_jobs(JobStatus::InQueue),
                "retried": ep.retried,
            },
            "workers": {
                "idle": idle,
                "running": running,
                "initializing": init,
                "ready": idle,
                "throttled": 0,
                "unhealthy": 0,
            },
        }),
    )
}

async fn purge(
    State(sim): State<Arc<Sim>>,
    Extension(slot): Extension<OpSlot>,
    Path(endpoint): Path<String>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = gate(
        &sim,
        &slot,
        "serverless.purgeQueue",
        &headers,
        raw.as_deref(),
        &endpoint,
    )
    .await
    {
        return r;
    }
    let removed = {
        let mut st = sim.lock();
        let st = &mut *st;
        let queued: Vec<String> = st
            .endpoints
            .iter_mut()
            .find(|e| e.spec.id == endpoint)
            .map(|e| e.queue.drain(..).collect())
            .unwrap_or_default();
        for j in st.jobs.iter_mut().filter(|j| queued.contains(&j.id)) {
            j.finish(JobStatus::Cancelled);
        }
        queued.len()
    };
    sim.notify_jobs();
    util::json(
        StatusCode::OK,
        &json!({"removed": removed, "status": "completed"}),
    )
}

/// The GraphQL `Endpoint` object.
pub fn graphql_endpoint(ep: &Endpoint) -> Value {
    let s = &ep.spec;
    let pods: Vec<Value> = ep
        .workers
        .iter()
        .filter(|w| w.state != WorkerState::Stopped)
        .map(|w| json!({"id": w.id, "desiredStatus": "RUNNING"}))
        .collect();
    json!({
        "__typename": "Endpoint",
        "id": s.id,
        "name": s.name,
        "gpuIds": s.gpu_ids,
        "gpuCount": s.gpu_count,
        "idleTimeout": s.idle_timeout,
        "locations": "",
        "networkVolumeId": "",
        "networkVolume": null,
        "scalerType": s.scaler_type,
        "scalerValue": s.scaler_value,
        "templateId": s.template_id,
        "type": "QB",
        "userId": "user_sim",
        "version": ep.version,
        "workersMax": s.workers_max,
        "workersMin": s.workers_min,
        "workersStandby": 0,
        "env": [],
        "createdAt": util::rfc3339(ep.created_at),
        "allowedCudaVersions": "",
        "flashBootType": "OFF",
        "executionTimeoutMs": s.execution_timeout_ms,
        "aiKey": null,
        "pods": pods,
    })
}

fn int_field(input: &Map<String, Value>, key: &str, default: u64) -> Result<u64, String> {
    match input.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => v
            .as_u64()
            .ok_or_else(|| format!("{key} must be a non-negative integer")),
    }
}

/// `saveEndpoint`: create, or fully replace an existing endpoint's settings (omitted fields
/// return to their defaults). Simulator knobs (cold start, price, operation times) are kept.
pub fn save_endpoint(sim: &Arc<Sim>, input: &Map<String, Value>) -> Result<Value, String> {
    let spec = endpoint_settings(input)?;
    let id = input
        .get("id")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty());
    match id {
        Some(id) => replace_endpoint(sim, id, spec),
        None => create_endpoint(sim, spec),
    }
}

/// The settings a `saveEndpoint` input gives, checked in RunPod's order (no id yet).
fn endpoint_settings(input: &Map<String, Value>) -> Result<EndpointSpec, String> {
    let name = input
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    if name.chars().count() < 3 {
        return Err("Endpoint name must be at least 3 characters long.".into());
    }
    let defaults = EndpointSpec::default();
    let text = |k: &str, d: &str| {
        input
            .get(k)
            .and_then(Value::as_str)
            .unwrap_or(d)
            .to_string()
    };
    let workers_min = int_field(input, "workersMin", 0)? as u32;
    let workers_max = int_field(input, "workersMax", 3)? as u32;
    if workers_min > workers_max {
        return Err("workersMin cannot be greater than workersMax".into());
    }
    Ok(EndpointSpec {
        name,
        workers_min,
        workers_max,
        idle_timeout: int_field(input, "idleTimeout", 5)? as u32,
        gpu_ids: text("gpuIds", &defaults.gpu_ids),
        gpu_count: int_field(input, "gpuCount", 1)? as u32,
        template_id: text("templateId", ""),
        scaler_type: text("scalerType", "QUEUE_DELAY"),
        scaler_value: int_field(input, "scalerValue", 4)? as u32,
        execution_timeout_ms: int_field(input, "executionTimeoutMs", 600_000)?,
        ..defaults
    })
}

/// Replaces endpoint `id`'s settings with `spec`, keeping its simulator knobs.
fn replace_endpoint(sim: &Sim, id: &str, mut spec: EndpointSpec) -> Result<Value, String> {
    let mut st = sim.lock();
    let Some(ep) = st.endpoints.iter_mut().find(|e| e.spec.id == id) else {
        return Err(format!("Endpoint {id} not found."));
    };
    spec.id = id.to_string();
    spec.cold_start_seconds = ep.spec.cold_start_seconds;
    spec.price_per_hour = ep.spec.price_per_hour;
    spec.operations = ep.spec.operations.clone();
    ep.spec = spec;
    ep.version += 1;
    ep.notify.notify_one();
    Ok(graphql_endpoint(ep))
}

/// Installs a new endpoint with `spec` under a fresh id.
fn create_endpoint(sim: &Arc<Sim>, mut spec: EndpointSpec) -> Result<Value, String> {
    spec.id = util::alnum_id(&mut sim.lock().rng, 14);
    install(sim, spec.clone());
    let st = sim.lock();
    st.endpoints
        .iter()
        .find(|e| e.spec.id == spec.id)
        .map(graphql_endpoint)
        .ok_or_else(|| "endpoint vanished".to_string())
}

/// `deleteEndpoint(id)`: only with no workers allowed (min and max 0), as on RunPod.
pub fn delete_endpoint(sim: &Sim, id: &str) -> Result<(), String> {
    let mut st = sim.lock();
    let Some(idx) = st.endpoints.iter().position(|e| e.spec.id == id) else {
        return Err(format!("Endpoint {id} not found."));
    };
    let ep = &st.endpoints[idx];
    if ep.spec.workers_min != 0 || ep.spec.workers_max != 0 {
        return Err("Set workersMin and workersMax to 0 before deleting the endpoint.".into());
    }
    let ep = st.endpoints.remove(idx);
    ep.notify.notify_one();
    Ok(())
}

/// Admin view of an endpoint.
pub fn admin_endpoint(ep: &Endpoint, now: Timestamp) -> Value {
    let workers: Vec<Value> = ep
        .workers
        .iter()
        .map(|w| {
            let state = match &w.state {
                WorkerState::Initializing => "initializing".to_string(),
                WorkerState::Idle => "idle".to_string(),
                WorkerState::Busy(j) => format!("busy:{j}"),
                WorkerState::Stopped if w.died => "died".to_string(),
                WorkerState::Stopped => "stopped".to_string(),
            };
            json!({
                "id": w.id,
                "state": state,
                "started_at": util::rfc3339(w.started_at),
                "stopped_at": w.stopped_at.map(util::rfc3339),
                "billed_seconds": util::seconds_between(w.started_at, w.stopped_at.unwrap_or(now)),
                "cost": w.cost(ep.spec.price_per_hour, now),
                "pings": w.pings,
                "unhealthy": w.unhealthy,
            })
        })
        .collect();
    json!({
        "id": ep.spec.id,
        "name": ep.spec.name,
        "workers_min": ep.spec.workers_min,
        "workers_max": ep.spec.workers_max,
        "idle_timeout": ep.spec.idle_timeout,
        "price_per_hour": ep.spec.price_per_hour,
        "cold_start_seconds": ep.spec.cold_start_seconds,
        "queue": ep.queue.len(),
        "active_workers": ep.active(),
        "workers": workers,
        "cost": ep.cost(now),
    })
}

/// Admin view of a job.
pub fn admin_job(j: &Job) -> Value {
    json!({
        "id": j.id,
        "endpoint_id": j.endpoint_id,
        "status": j.status.as_str(),
        "worker_id": j.worker_id,
        "submitted_at": util::rfc3339(j.submitted_at),
        "started_at": j.started_at.map(util::rfc3339),
        "finished_at": j.finished_at.map(util::rfc3339),
        "retries": j.retries,
        "error": j.error,
    })
}
