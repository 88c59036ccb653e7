//! RunPod Serverless mode (`gpupool-worker serverless`): the worker side of RunPod's job
//! queue, as the official `runpod` Python SDK (1.12.0) speaks it, with the same operations
//! as the HTTP mode. docs/worker.md "Serverless mode" lists what it sends and why.
//!
//! - take: `GET $RUNPOD_WEBHOOK_GET_JOB&job_in_progress=0` (one job at a time), which the
//!   queue holds open until a job comes; 204 or 400 is no job, 429 waits 5 s;
//! - progress: `POST $RUNPOD_WEBHOOK_POST_OUTPUT&isStream=false` with
//!   `{"status": "IN_PROGRESS", "output": ...}` when the job starts;
//! - result: the same URL with `{"output": ...}` or `{"error": "..."}`, retried on 5xx
//!   (3 attempts, 2 s then 3 s apart), as the SDK does;
//! - stop: `GET` on the take URL with `/job-take/` made `/job-stop/` while a job runs;
//!   `{"jobsToStop": [id]}` stops it (its ffmpeg killed) and no result is posted;
//! - ping: `GET $RUNPOD_WEBHOOK_PING?job_id=<running>&runpod_version=...` every
//!   `RUNPOD_PING_INTERVAL` ms (10,000 by default).
//!
//! In every URL `$RUNPOD_POD_ID` is the worker id; `$ID` is the worker id in the take URL and
//! the job id in the result URL. The API key (`RUNPOD_AI_API_KEY`) is sent as the raw
//! `Authorization` value and never logged.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use serde_json::{Map, Value, json};
use tracing::{info, warn};

use crate::{OpError, Operations};

/// The version reported in pings, after the SDK's `runpod_version`.
const VERSION: &str = concat!("gpupool-worker/", env!("CARGO_PKG_VERSION"));

/// What RunPod gives a serverless worker in its environment.
#[derive(Clone)]
pub struct QueueConfig {
    pub worker_id: String,
    take_url: String,
    done_url: String,
    stop_url: Option<String>,
    ping_url: Option<String>,
    api_key: String,
    pub ping_interval: Duration,
}

impl std::fmt::Debug for QueueConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueConfig")
            .field("worker_id", &self.worker_id)
            .field("take_url", &self.take_url)
            .field("ping_interval", &self.ping_interval)
            .finish_non_exhaustive()
    }
}

/// `url` with `param` appended after `?` or `&`.
fn with_param(url: &str, param: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}{param}")
}

impl QueueConfig {
    /// `RUNPOD_WEBHOOK_GET_JOB` and `RUNPOD_WEBHOOK_POST_OUTPUT` (required),
    /// `RUNPOD_AI_API_KEY` (required), `RUNPOD_POD_ID` (the worker id), and optionally
    /// `RUNPOD_WEBHOOK_PING` and `RUNPOD_PING_INTERVAL` (milliseconds).
    pub fn from_env(get: impl Fn(&str) -> Option<String>) -> Result<Self, String> {
        let need = |k: &str| {
            get(k)
                .filter(|v| !v.is_empty())
                .ok_or_else(|| format!("{k} is not set: serverless mode needs RunPod's queue"))
        };
        let worker_id = get("RUNPOD_POD_ID")
            .filter(|v| !v.is_empty())
            .ok_or("RUNPOD_POD_ID is not set: serverless mode needs the worker id")?;
        let pod = |t: String| t.replace("$RUNPOD_POD_ID", &worker_id);
        let take_url = pod(need("RUNPOD_WEBHOOK_GET_JOB")?).replace("$ID", &worker_id);
        for (name, url) in [("RUNPOD_WEBHOOK_GET_JOB", &take_url)] {
            if !url.starts_with("http://") && !url.starts_with("https://") {
                return Err(format!("{name} is not an http(s) URL"));
            }
        }
        let done_url = pod(need("RUNPOD_WEBHOOK_POST_OUTPUT")?);
        let ping_url = get("RUNPOD_WEBHOOK_PING")
            .filter(|v| !v.is_empty())
            .map(pod);
        let ping_ms = match get("RUNPOD_PING_INTERVAL") {
            None => 10_000,
            Some(v) => v
                .parse::<u64>()
                .map_err(|_| format!("RUNPOD_PING_INTERVAL is not milliseconds: {v:?}"))?
                .max(100),
        };
        let stop_url = take_url
            .contains("/job-take/")
            .then(|| take_url.replace("/job-take/", "/job-stop/"));
        Ok(Self {
            take_url,
            done_url,
            stop_url,
            ping_url,
            api_key: need("RUNPOD_AI_API_KEY")?,
            worker_id,
            ping_interval: Duration::from_millis(ping_ms),
        })
    }

    fn done_url(&self, job_id: &str) -> String {
        with_param(&self.done_url.replace("$ID", job_id), "isStream=false")
    }
}

/// What one take returned.
#[derive(Debug, PartialEq)]
enum Take {
    Jobs(Vec<(String, Value)>),
    Nothing,
    Throttled,
}

/// The queue client: one HTTP client, the configuration, and the job running now (for pings).
pub struct Queue {
    cfg: QueueConfig,
    http: reqwest::Client,
    running: Mutex<Option<String>>,
}

impl Queue {
    pub fn new(cfg: QueueConfig) -> Result<Arc<Self>, String> {
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| format!("HTTP client: {e}"))?;
        Ok(Arc::new(Self {
            cfg,
            http,
            running: Mutex::new(None),
        }))
    }

    fn running(&self) -> Option<String> {
        self.running.lock().expect("running lock").clone()
    }

    fn set_running(&self, id: Option<&str>) {
        *self.running.lock().expect("running lock") = id.map(str::to_string);
    }

    /// One long poll for a job (90 s at most, as the SDK).
    async fn take(&self) -> Result<Take, String> {
        let url = with_param(&self.cfg.take_url, "job_in_progress=0");
        let res = self
            .http
            .get(url)
            .header("authorization", &self.cfg.api_key)
            .timeout(Duration::from_secs(90))
            .send()
            .await
            .map_err(|e| format!("job take: {}", e.without_url()))?;
        match res.status().as_u16() {
            204 | 400 => return Ok(Take::Nothing),
            429 => return Ok(Take::Throttled),
            s if !(200..300).contains(&s) => return Err(format!("job take answered {s}")),
            _ => {}
        }
        let json_body = res
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|t| t.starts_with("application/json"));
        let body = res
            .bytes()
            .await
            .map_err(|e| format!("job take: {}", e.without_url()))?;
        if !json_body || body.is_empty() {
            return Ok(Take::Nothing);
        }
        let parsed: Value = match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(_) => return Ok(Take::Nothing),
        };
        let one = |v: &Value| -> Result<(String, Value), String> {
            let id = v
                .get("id")
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty());
            match (id, v.get("input")) {
                (Some(id), Some(input)) => Ok((id.to_string(), input.clone())),
                _ => Err("the queue sent a job without id or input".into()),
            }
        };
        match &parsed {
            Value::Array(list) => Ok(Take::Jobs(list.iter().map(one).collect::<Result<_, _>>()?)),
            v => Ok(Take::Jobs(vec![one(v)?])),
        }
    }

    /// Posts a result or progress body for `job_id`: 3 attempts, retried on 5xx only.
    async fn post(&self, job_id: &str, body: &Value) {
        let url = self.cfg.done_url(job_id);
        let text = serde_json::to_vec(body).unwrap_or_default();
        for (attempt, wait) in [(1, 2), (2, 3), (3, 0)] {
            let sent = self
                .http
                .post(&url)
                // The SDK's headers: JSON text under a form content type.
                .header("content-type", "application/x-www-form-urlencoded")
                .header("charset", "utf-8")
                .header("authorization", &self.cfg.api_key)
                .header("x-request-id", job_id)
                .timeout(Duration::from_secs(60))
                .body(text.clone())
                .send()
                .await;
            match sent {
                Ok(r) if r.status().is_server_error() && attempt < 3 => {
                    warn!(
                        job_id,
                        status = r.status().as_u16(),
                        "result post failed; retrying"
                    );
                    tokio::time::sleep(Duration::from_secs(wait)).await;
                }
                Ok(r) if !r.status().is_success() => {
                    warn!(job_id, status = r.status().as_u16(), "result post refused");
                    return;
                }
                Ok(_) => return,
                Err(e) => {
                    warn!(job_id, error = %e.without_url(), "result post failed");
                    return;
                }
            }
        }
    }

    /// Whether the queue asks to stop `job_id` (one long poll of the stop URL).
    async fn stop_requested(&self, job_id: &str) -> bool {
        let Some(url) = &self.cfg.stop_url else {
            return false;
        };
        let res = self
            .http
            .get(url)
            .header("authorization", &self.cfg.api_key)
            .timeout(Duration::from_secs(90))
            .send()
            .await;
        let Ok(res) = res else { return false };
        if res.status().as_u16() != 200 {
            return false;
        }
        res.json::<Value>().await.ok().is_some_and(|v| {
            v["jobsToStop"]
                .as_array()
                .is_some_and(|ids| ids.iter().any(|i| i == job_id))
        })
    }

    /// Polls the stop URL until it names `job_id` (at most once a second).
    async fn until_stopped(&self, job_id: &str) {
        if self.cfg.stop_url.is_none() {
            return std::future::pending().await;
        }
        loop {
            let started = tokio::time::Instant::now();
            if self.stop_requested(job_id).await {
                return;
            }
            tokio::time::sleep_until(started + Duration::from_secs(1)).await;
        }
    }

    /// One heartbeat; `status` and `reason` report an unhealthy worker.
    async fn ping(&self, unhealthy: Option<&str>) {
        let Some(url) = &self.cfg.ping_url else {
            return;
        };
        let mut query: Vec<(&str, String)> = Vec::new();
        if let Some(id) = self.running() {
            query.push(("job_id", id));
        }
        if let Some(reason) = unhealthy {
            query.push(("status", "unhealthy".into()));
            query.push(("check", "ffmpeg".into()));
            query.push(("reason", reason.chars().take(256).collect()));
        }
        query.push(("runpod_version", VERSION.into()));
        let Ok(mut url) = reqwest::Url::parse(url) else {
            return;
        };
        url.query_pairs_mut().extend_pairs(&query);
        let sent = self
            .http
            .get(url)
            .header("authorization", &self.cfg.api_key)
            .timeout(self.cfg.ping_interval * 2)
            .send()
            .await;
        if let Err(e) = sent {
            warn!(error = %e.without_url(), "ping failed");
        }
    }
}

/// The body posted for a finished operation.
pub fn result_body(outcome: Result<Value, OpError>, operation: &str) -> Value {
    match outcome {
        Ok(output) => json!({"output": output}),
        Err(OpError::Invalid { field, message }) => json!({"error": format!("{field}: {message}")}),
        Err(OpError::Failed(m)) => json!({"error": m}),
        Err(OpError::Unknown) => {
            json!({"error": format!("no operation {operation:?} on this worker")})
        }
    }
}

/// Runs one job: progress first, then the operation (stopped when the queue says so), then
/// the result.
async fn run_one(q: &Queue, ops: &dyn Operations, id: &str, input: Value) {
    q.set_running(Some(id));
    let mut input = match input {
        Value::Object(m) => m,
        _ => Map::new(),
    };
    let operation = match input.remove("operation") {
        Some(Value::String(op)) => op,
        _ => {
            q.post(
                id,
                &json!({"error": "input.operation: a string naming the operation is required"}),
            )
            .await;
            q.set_running(None);
            return;
        }
    };
    info!(job_id = id, operation, "job started");
    q.post(
        id,
        &json!({"status": "IN_PROGRESS", "output": {"operation": operation, "stage": "started"}}),
    )
    .await;
    let outcome = tokio::select! {
        r = ops.run(&operation, id, input) => Some(r),
        () = q.until_stopped(id) => None,
    };
    match outcome {
        Some(r) => {
            let body = result_body(r, &operation);
            info!(
                job_id = id,
                failed = body.get("error").is_some(),
                "job finished"
            );
            q.post(id, &body).await;
        }
        None => info!(job_id = id, "job stopped by the queue; no result posted"),
    }
    q.set_running(None);
}

/// The serverless loop: checks the tools, pings, and takes and runs one job at a time until
/// `shutdown` resolves (SIGTERM: the running job finishes and its result is posted first).
pub async fn run(
    q: Arc<Queue>,
    ops: Arc<dyn Operations>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), String> {
    let (ready, details) = ops.health().await;
    if !ready {
        let reason = details.to_string();
        q.ping(Some(&reason)).await;
        return Err(format!("not ready: {reason}"));
    }
    let pinger = {
        let q = q.clone();
        tokio::spawn(async move {
            loop {
                q.ping(None).await;
                tokio::time::sleep(q.cfg.ping_interval).await;
            }
        })
    };
    info!(worker_id = %q.cfg.worker_id, "serverless worker taking jobs");
    tokio::pin!(shutdown);
    loop {
        let took = tokio::select! {
            () = &mut shutdown => break,
            t = q.take() => t,
        };
        match took {
            Ok(Take::Jobs(jobs)) => {
                for (id, input) in jobs {
                    run_one(&q, ops.as_ref(), &id, input).await;
                }
            }
            // The queue holds a take open until a job comes; a quick empty answer is retried
            // after a short pause rather than at once (the SDK retries at once).
            Ok(Take::Nothing) => tokio::time::sleep(Duration::from_millis(200)).await,
            Ok(Take::Throttled) => tokio::time::sleep(Duration::from_secs(5)).await,
            Err(e) => {
                warn!(error = %e, "job take failed");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
    pinger.abort();
    info!("serverless worker stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_env as env;

    #[test]
    fn placeholders_are_replaced_as_the_sdk_does_and_both_pod_id_forms_work() {
        let cfg = QueueConfig::from_env(env(&[
            ("RUNPOD_POD_ID", "w1"),
            ("RUNPOD_AI_API_KEY", "k"),
            (
                "RUNPOD_WEBHOOK_GET_JOB",
                "https://q/v2/ep/job-take/$RUNPOD_POD_ID?gpu=A",
            ),
            (
                "RUNPOD_WEBHOOK_POST_OUTPUT",
                "https://q/v2/ep/job-done/$RUNPOD_POD_ID/$ID?gpu=A",
            ),
            (
                "RUNPOD_WEBHOOK_PING",
                "https://q/v2/ep/ping/$RUNPOD_POD_ID?gpu=A",
            ),
        ]))
        .unwrap();
        assert_eq!(cfg.take_url, "https://q/v2/ep/job-take/w1?gpu=A");
        assert_eq!(
            cfg.stop_url.as_deref(),
            Some("https://q/v2/ep/job-stop/w1?gpu=A")
        );
        assert_eq!(
            cfg.done_url("j9"),
            "https://q/v2/ep/job-done/w1/j9?gpu=A&isStream=false"
        );
        assert_eq!(
            cfg.ping_url.as_deref(),
            Some("https://q/v2/ep/ping/w1?gpu=A")
        );
        assert_eq!(cfg.ping_interval, Duration::from_secs(10));
        let sdk_form = QueueConfig::from_env(env(&[
            ("RUNPOD_POD_ID", "w2"),
            ("RUNPOD_AI_API_KEY", "sekrit-key"),
            ("RUNPOD_WEBHOOK_GET_JOB", "http://q/job-take/$ID"),
            (
                "RUNPOD_WEBHOOK_POST_OUTPUT",
                "http://q/job-done/$RUNPOD_POD_ID/$ID",
            ),
            ("RUNPOD_PING_INTERVAL", "500"),
        ]))
        .unwrap();
        assert_eq!(sdk_form.take_url, "http://q/job-take/w2");
        assert_eq!(
            sdk_form.done_url("j"),
            "http://q/job-done/w2/j?isStream=false"
        );
        assert_eq!(sdk_form.ping_interval, Duration::from_millis(500));
        assert!(!format!("{sdk_form:?}").contains("sekrit"));
    }

    #[test]
    fn missing_settings_are_named() {
        let err = QueueConfig::from_env(env(&[("RUNPOD_POD_ID", "w")])).unwrap_err();
        assert!(err.contains("RUNPOD_WEBHOOK_GET_JOB"), "{err}");
        let err = QueueConfig::from_env(env(&[
            ("RUNPOD_POD_ID", "w"),
            ("RUNPOD_WEBHOOK_GET_JOB", "http://q/job-take/$ID"),
            ("RUNPOD_WEBHOOK_POST_OUTPUT", "http://q/job-done/$ID"),
        ]))
        .unwrap_err();
        assert!(err.contains("RUNPOD_AI_API_KEY"), "{err}");
        let err = QueueConfig::from_env(env(&[("RUNPOD_AI_API_KEY", "k")])).unwrap_err();
        assert!(err.contains("RUNPOD_POD_ID"), "{err}");
    }

    #[test]
    fn outcomes_become_the_bodies_a_handler_would_post() {
        assert_eq!(
            result_body(Ok(json!({"a": 1})), "probe"),
            json!({"output": {"a": 1}})
        );
        assert_eq!(
            result_body(
                Err(OpError::Invalid {
                    field: "videoUrl".into(),
                    message: "must be http(s)".into()
                }),
                "probe"
            ),
            json!({"error": "videoUrl: must be http(s)"})
        );
        assert_eq!(
            result_body(Err(OpError::Unknown), "x"),
            json!({"error": "no operation \"x\" on this worker"})
        );
    }
}
