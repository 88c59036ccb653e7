//! `gpupool-worker`: the server side of `docs/worker-api.md`, the program every machine gpupool
//! rents runs.
//!
//! This crate holds the contract: credentials from the environment checked in constant time,
//! the health route, one job at a time (a second one is answered 429), the documented answers
//! and error bodies, and `X-Job-Id` de-duplication (an attempt sent again for a job already
//! answered gets the first answer instead of a second run; one sent while the job still runs
//! waits for it). What a job does is an [`Operations`] implementation, kept apart so the
//! contract is tested on its own.

pub mod media;
pub mod ops;
pub mod s3;
pub mod serverless;

use std::{
    collections::VecDeque,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use axum::{
    Json, Router,
    body::Bytes,
    extract::{Path, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde_json::{Map, Value, json};
use tokio::{net::TcpListener, sync::watch};
use tracing::{info, warn};

/// The largest job input accepted.
pub const MAX_INPUT_BYTES: usize = 1 << 20;
/// The operator reads at most this much of a 2xx answer (docs/worker-api.md).
pub const MAX_OUTPUT_BYTES: usize = 64 * 1024;
/// Finished jobs whose answer is kept for a re-sent attempt.
pub const REMEMBERED_JOBS: usize = 256;

/// The worker's settings, from the environment the provider gives the machine.
#[derive(Clone)]
pub struct Config {
    pub port: u16,
    /// The address to listen on: `GPUPOOL_WORKER_BIND`, `0.0.0.0` by default (a container's
    /// port is published by the provider); the simulator and the tests use `127.0.0.1`.
    pub bind: std::net::IpAddr,
    pub session_token: String,
    pub api_key: Option<String>,
    pub health_path: String,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("port", &self.port)
            .field("bind", &self.bind)
            .field("api_key", &self.api_key.as_ref().map(|_| "<set>"))
            .field("health_path", &self.health_path)
            .finish_non_exhaustive()
    }
}

impl Config {
    /// `GPUPOOL_WORKER_PORT` (default 8000), `GPUPOOL_SESSION_TOKEN` (required),
    /// `GPUPOOL_API_KEY` (optional), `GPUPOOL_WORKER_HEALTH_PATH` (default `/health`).
    pub fn from_env(get: impl Fn(&str) -> Option<String>) -> Result<Self, String> {
        let port = match get("GPUPOOL_WORKER_PORT") {
            None => 8000,
            Some(p) => p
                .parse()
                .map_err(|_| format!("GPUPOOL_WORKER_PORT is not a port number: {p:?}"))?,
        };
        let bind = match get("GPUPOOL_WORKER_BIND") {
            None => std::net::IpAddr::from([0, 0, 0, 0]),
            Some(b) => b
                .parse()
                .map_err(|_| format!("GPUPOOL_WORKER_BIND is not an IP address: {b:?}"))?,
        };
        let session_token = get("GPUPOOL_SESSION_TOKEN")
            .filter(|t| !t.is_empty())
            .ok_or("GPUPOOL_SESSION_TOKEN is not set: the worker refuses to run unprotected")?;
        let api_key = get("GPUPOOL_API_KEY").filter(|k| !k.is_empty());
        let health_path = get("GPUPOOL_WORKER_HEALTH_PATH").unwrap_or_else(|| "/health".into());
        if !health_path.starts_with('/') || health_path.starts_with("/video/") {
            return Err(format!(
                "GPUPOOL_WORKER_HEALTH_PATH must be a path outside /video/: {health_path:?}"
            ));
        }
        Ok(Self {
            port,
            bind,
            session_token,
            api_key,
            health_path,
        })
    }
}

/// Why an operation did not produce a result.
#[derive(Debug, Clone, PartialEq)]
pub enum OpError {
    /// No such operation: 404.
    Unknown,
    /// The input is wrong: 400, naming the field. Not retried.
    Invalid { field: String, message: String },
    /// The work failed (a download, ffmpeg, an upload): 500, retried by the operator.
    Failed(String),
}

/// What the worker can do.
#[async_trait::async_trait]
pub trait Operations: Send + Sync + 'static {
    /// The operation names served.
    fn names(&self) -> Vec<String>;
    /// What `GET /health` reports besides the contract's fields, and whether the worker can
    /// run a job now (its tools found, its GPU visible when required).
    async fn health(&self) -> (bool, Value);
    /// Runs `operation` on `input`. Dropping the future must stop the work.
    async fn run(
        &self,
        operation: &str,
        job_uid: &str,
        input: Map<String, Value>,
    ) -> Result<Value, OpError>;
}

/// A finished job's answer.
#[derive(Clone, Debug)]
struct Answer {
    status: u16,
    body: Value,
}

impl IntoResponse for Answer {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(self.body)).into_response()
    }
}

fn error(status: u16, message: impl Into<String>) -> Answer {
    Answer {
        status,
        body: json!({"error": message.into()}),
    }
}

#[derive(Default)]
struct Jobs {
    /// The job running now: its UID and where its answer will appear.
    running: Option<(String, watch::Receiver<Option<Answer>>)>,
    /// Answers kept for attempts sent again, oldest first.
    done: VecDeque<(String, Answer)>,
}

pub struct Worker {
    config: Config,
    ops: Arc<dyn Operations>,
    jobs: Mutex<Jobs>,
}

/// Equal in time independent of where the two differ (digests first, so lengths do not leak).
fn same_secret(presented: Option<&str>, expected: &str) -> bool {
    let digest = |s: &str| ring::digest::digest(&ring::digest::SHA256, s.as_bytes());
    let Some(p) = presented else { return false };
    let (a, b) = (digest(p), digest(expected));
    a.as_ref()
        .iter()
        .zip(b.as_ref())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

impl Worker {
    pub fn new(config: Config, ops: Arc<dyn Operations>) -> Arc<Self> {
        Arc::new(Self {
            config,
            ops,
            jobs: Mutex::default(),
        })
    }

    fn authorized(&self, headers: &HeaderMap) -> Result<(), Answer> {
        let header = |n: &str| headers.get(n).and_then(|v| v.to_str().ok());
        if !same_secret(header("x-session-token"), &self.config.session_token) {
            return Err(error(401, "missing or wrong X-Session-Token"));
        }
        if let Some(key) = &self.config.api_key
            && !same_secret(header("x-api-key"), key)
        {
            return Err(error(401, "missing or wrong X-API-Key"));
        }
        Ok(())
    }

    fn remember(&self, uid: &str, answer: &Answer) {
        let mut jobs = self.jobs.lock().expect("jobs lock");
        jobs.running = None;
        // Only final answers are kept: a 5xx is for the operator to retry, which runs again.
        if answer.status < 500 {
            jobs.done.retain(|(u, _)| u != uid);
            jobs.done.push_back((uid.to_string(), answer.clone()));
            while jobs.done.len() > REMEMBERED_JOBS {
                jobs.done.pop_front();
            }
        }
    }

    pub fn router(self: &Arc<Self>) -> Router {
        Router::new()
            .route(&self.config.health_path, get(health))
            .route("/video/{operation}", post(run_job))
            .fallback(|| async { error(404, "no such route; see docs/worker-api.md") })
            .layer(axum::extract::DefaultBodyLimit::max(MAX_INPUT_BYTES))
            .with_state(self.clone())
    }

    /// Binds `addr`; returns the bound address and the server.
    pub async fn serve(
        self: &Arc<Self>,
        addr: SocketAddr,
    ) -> std::io::Result<(
        SocketAddr,
        impl Future<Output = std::io::Result<()>> + use<>,
    )> {
        let listener = TcpListener::bind(addr).await?;
        let bound = listener.local_addr()?;
        let app = self.router();
        Ok((bound, async move { axum::serve(listener, app).await }))
    }
}

async fn health(State(w): State<Arc<Worker>>, headers: HeaderMap) -> Response {
    if let Err(e) = w.authorized(&headers) {
        return e.into_response();
    }
    let (ready, details) = w.ops.health().await;
    let busy = w.jobs.lock().expect("jobs lock").running.is_some();
    let body = json!({
        "ready": ready,
        "busy": busy,
        "operations": w.ops.names(),
        "details": details,
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

/// Clears `running` if the job's future is dropped (the request went away) before it answered.
struct RunningGuard<'a> {
    worker: &'a Worker,
    armed: bool,
}

impl Drop for RunningGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.worker.jobs.lock().expect("jobs lock").running = None;
        }
    }
}

async fn run_job(
    State(w): State<Arc<Worker>>,
    Path(operation): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Answer {
    if let Err(e) = w.authorized(&headers) {
        return e;
    }
    let Some(job_id) = headers.get("x-job-id").and_then(|v| v.to_str().ok()) else {
        return error(400, "X-Job-Id is required ({jobUid}-{attempt})");
    };
    let uid = match job_id.rsplit_once('-') {
        Some((uid, attempt)) if !uid.is_empty() && attempt.parse::<u32>().is_ok() => {
            uid.to_string()
        }
        _ => return error(400, "X-Job-Id must be {jobUid}-{attempt}"),
    };
    if !w.ops.names().contains(&operation) {
        return error(404, format!("no operation {operation:?} on this worker"));
    }
    let input = match serde_json::from_slice::<Value>(&body) {
        Ok(Value::Object(m)) => m,
        Ok(_) => return error(400, "the body must be a JSON object"),
        Err(e) => return error(400, format!("the body is not JSON: {e}")),
    };
    // Claim the worker, or find this job's earlier answer, or wait for its running attempt.
    let (tx, waiting) = {
        let mut jobs = w.jobs.lock().expect("jobs lock");
        if let Some((_, a)) = jobs.done.iter().find(|(u, _)| *u == uid) {
            info!(
                job_id,
                "attempt sent again for a finished job: the first answer"
            );
            return a.clone();
        }
        match &jobs.running {
            Some((running, rx)) if *running == uid => (None, Some(rx.clone())),
            Some(_) => return error(429, "busy with another job: one job at a time"),
            None => {
                let (tx, rx) = watch::channel(None);
                jobs.running = Some((uid.clone(), rx));
                (Some(tx), None)
            }
        }
    };
    if let Some(mut rx) = waiting {
        info!(
            job_id,
            "attempt sent again while the job runs: waiting for it"
        );
        return match rx.wait_for(Option::is_some).await {
            Ok(a) => a.clone().expect("some"),
            Err(_) => error(
                503,
                "the earlier attempt of this job was stopped; send it again",
            ),
        };
    }
    let tx = tx.expect("claimed");
    let mut guard = RunningGuard {
        worker: &w,
        armed: true,
    };
    info!(job_id, operation, "job started");
    let answer = match w.ops.run(&operation, &uid, input).await {
        Ok(out) => {
            let size = serde_json::to_vec(&out).map(|v| v.len()).unwrap_or(0);
            if size > MAX_OUTPUT_BYTES {
                warn!(job_id, size, "output over the contract's 64 KiB");
                error(
                    500,
                    format!("the output is {size} bytes, over the 64 KiB the operator reads"),
                )
            } else {
                Answer {
                    status: 200,
                    body: out,
                }
            }
        }
        Err(OpError::Unknown) => error(404, format!("no operation {operation:?} on this worker")),
        Err(OpError::Invalid { field, message }) => Answer {
            status: 400,
            body: json!({"error": format!("{field}: {message}"), "field": field}),
        },
        Err(OpError::Failed(message)) => error(500, message),
    };
    info!(job_id, status = answer.status, "job answered");
    guard.armed = false;
    w.remember(&uid, &answer);
    let _ = tx.send(Some(answer.clone()));
    answer
}

/// An environment of `pairs` for the `from_env` readers, in unit tests.
#[cfg(test)]
pub(crate) fn test_env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let map: std::collections::HashMap<String, String> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    move |k| map.get(k).cloned()
}
