//! The worker that runs inside every simulated machine: the HTTP contract the operator
//! dispatches video jobs to (DESIGN.md §3 "Dispatch").
//!
//! `GET` on any path but `/video/...` is the health check (503 until the boot delay has
//! passed); `POST /video/{operation}` runs a job: it checks `X-API-Key` and
//! `X-Session-Token` against the instance's `GPUPOOL_API_KEY` / `GPUPOOL_SESSION_TOKEN` env,
//! counts one execution per `X-Job-Id`, waits the operation time and answers a result derived
//! from the input. The `simulate` object of the input drives test hooks (see [`JobPlan`]).
//! The plan and the result are shared with the serverless workers.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use axum::{
    Extension, Router,
    body::Bytes,
    extract::State,
    http::{HeaderMap, Method, StatusCode, Uri},
    middleware,
    response::Response,
};
use serde_json::{Map, Value, json};

use super::{
    config::Timing,
    http::{self, Family, OpSlot},
    instances, process,
    state::{Provider, Sim},
    util,
};

/// What a worker server knows about its instance.
#[derive(Clone)]
pub struct WorkerCtx {
    pub sim: Arc<Sim>,
    pub provider: Provider,
    pub instance_id: String,
    pub started: Instant,
    pub boot: Duration,
    pub api_key: Option<String>,
    pub session_token: Option<String>,
    /// The real worker process behind this port (`worker_process`), if any.
    pub backend: Option<process::Backend>,
}

/// The worker's routes (everything goes through one handler: health is "any other GET").
pub fn router(ctx: WorkerCtx) -> Router {
    let sim = ctx.sim.clone();
    Router::new()
        .fallback(handle)
        .with_state(ctx)
        .layer(middleware::from_fn_with_state(sim, http::record_calls))
}

/// How a job will go, decided from its input's `simulate` object and the timing config.
#[derive(Clone, Debug, PartialEq)]
pub struct JobPlan {
    pub seconds: f64,
    /// Answer this status and error instead of a result.
    pub fail: Option<(u16, String)>,
    pub non_json: bool,
    pub output_bytes: Option<u64>,
    pub die: bool,
}

impl JobPlan {
    /// Reads `input.simulate`; unknown or mistyped hooks are ignored.
    pub fn from_input(
        input: &Map<String, Value>,
        op: &str,
        times: &[&std::collections::BTreeMap<String, f64>],
        default: f64,
    ) -> Self {
        let sim = input.get("simulate").and_then(Value::as_object);
        let get = |k: &str| sim.and_then(|s| s.get(k));
        let seconds = get("seconds")
            .and_then(Value::as_f64)
            .or_else(|| times.iter().find_map(|t| t.get(op).copied()))
            .unwrap_or(default);
        let fail = get("status").and_then(Value::as_u64).map(|s| {
            let msg = get("error")
                .and_then(Value::as_str)
                .unwrap_or("simulated failure")
                .to_string();
            (s.clamp(100, 599) as u16, msg)
        });
        Self {
            seconds,
            fail,
            non_json: get("nonJson").and_then(Value::as_bool).unwrap_or(false),
            output_bytes: get("outputBytes").and_then(Value::as_u64),
            die: get("die").and_then(Value::as_bool).unwrap_or(false),
        }
    }

    /// The plan of a worker job under the simulator's timing.
    pub fn for_worker(input: &Map<String, Value>, op: &str, timing: &Timing) -> Self {
        Self::from_input(
            input,
            op,
            &[&timing.operations],
            timing.default_operation_seconds,
        )
    }
}

/// Upper bound of `outputBytes` padding, so a typo cannot exhaust memory.
const MAX_PADDING: u64 = 64 * 1024 * 1024;

/// FNV-1a, for a short digest of the input that a test can recompute.
fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The answer of a successful job: derived from the input, padded to `outputBytes`.
pub fn job_result(
    op: &str,
    job_id: &str,
    instance_id: &str,
    input: &Map<String, Value>,
    plan: &JobPlan,
) -> Value {
    let mut clean = input.clone();
    clean.remove("simulate");
    let canonical = serde_json::to_vec(&Value::Object(clean.clone())).unwrap_or_default();
    let mut result = json!({
        "output": format!("sim://{instance_id}/{job_id}/{op}.out"),
        "inputKeys": clean.keys().cloned().collect::<Vec<_>>(),
        "inputDigest": format!("{:016x}", fnv1a(&canonical)),
        "seconds": plan.seconds,
        "input": Value::Object(clean),
    });
    let mut answer = json!({
        "operation": op,
        "jobId": job_id,
        "instanceId": instance_id,
        "result": result.clone(),
    });
    if let Some(want) = plan.output_bytes {
        let have = serde_json::to_vec(&answer).map(|v| v.len()).unwrap_or(0) as u64;
        // `"padding":""` itself adds 14 bytes.
        let pad = want.saturating_sub(have + 14).min(MAX_PADDING) as usize;
        if let Some(obj) = result.as_object_mut() {
            obj.insert("padding".into(), Value::String("x".repeat(pad)));
        }
        answer["result"] = result;
    }
    answer
}

fn error(status: StatusCode, msg: &str) -> Response {
    util::json(status, &json!({"error": msg}))
}

/// The worker's one handler: `/video/{operation}` runs a job, any other GET is the health
/// check. Whether the worker has booted is decided on arrival, before any fault delay.
async fn handle(
    State(ctx): State<WorkerCtx>,
    Extension(slot): Extension<OpSlot>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    slot.set_instance(ctx.instance_id.clone());
    let booted = ctx.started.elapsed() >= ctx.boot;
    let Some(op) = uri.path().strip_prefix("/video/") else {
        if let Some(b) = &ctx.backend {
            slot.set("worker.health");
            if let Err(r) = health_faults(&ctx).await {
                return r;
            }
            return process::forward_other(&ctx, b, method, &uri, &headers, body).await;
        }
        return health(&ctx, &slot, &method, booted).await;
    };
    match video(&ctx, &slot, &method, op, &headers, &body, booted).await {
        Ok(r) | Err(r) => r,
    }
}

/// The health check: 200 once booted, 503 before (after the health faults).
async fn health(ctx: &WorkerCtx, slot: &OpSlot, method: &Method, booted: bool) -> Response {
    if method != Method::GET {
        slot.set("worker.other");
        return error(StatusCode::NOT_FOUND, "not found");
    }
    slot.set("worker.health");
    if let Err(r) = health_faults(ctx).await {
        return r;
    }
    if booted {
        util::json(StatusCode::OK, &json!({"status": "ok"}))
    } else {
        util::json(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({"status": "starting"}),
        )
    }
}

/// The faults of a health check (delays first, then injected statuses).
async fn health_faults(ctx: &WorkerCtx) -> Result<(), Response> {
    let op = "worker.health";
    http::delay_faults(&ctx.sim, op, Family::Worker).await?;
    http::status_faults(&ctx.sim, op, Family::Worker)
}

/// `POST /video/{op}`: the request checked (path, method, faults, boot, credentials, job
/// id, body, in this order), its execution counted, then the job run.
async fn video(
    ctx: &WorkerCtx,
    slot: &OpSlot,
    method: &Method,
    op: &str,
    headers: &HeaderMap,
    body: &Bytes,
    booted: bool,
) -> Result<Response, Response> {
    slot.set("worker.video");
    if op.is_empty() || op.contains('/') {
        return Err(error(
            StatusCode::NOT_FOUND,
            "unknown path: use /video/{operation}",
        ));
    }
    if method != Method::POST {
        return Err(error(
            StatusCode::METHOD_NOT_ALLOWED,
            "use POST /video/{operation}",
        ));
    }
    http::delay_faults(&ctx.sim, "worker.video", Family::Worker).await?;
    http::status_faults(&ctx.sim, "worker.video", Family::Worker)?;
    if !booted {
        return Err(error(StatusCode::SERVICE_UNAVAILABLE, "worker is starting"));
    }
    let job_id = job_credentials(ctx, headers)?;
    let input = match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => m,
        _ => {
            return Err(error(
                StatusCode::BAD_REQUEST,
                "the body must be a JSON object",
            ));
        }
    };
    let plan = plan_execution(ctx, &input, op, &job_id);
    if let Some(b) = &ctx.backend {
        // A real worker runs the job; of the hooks only `die` applies (as a real SIGKILL).
        let die_after = plan.die.then_some(plan.seconds / 2.0);
        return Ok(process::forward_job(ctx, b, op, headers, input, die_after).await);
    }
    Ok(execute(ctx, op, &job_id, &input, &plan).await)
}

/// Checks `X-API-Key` and `X-Session-Token` (when the instance has them); the `X-Job-Id`.
fn job_credentials(ctx: &WorkerCtx, headers: &HeaderMap) -> Result<String, Response> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(want) = &ctx.api_key
        && header("x-api-key") != Some(want.as_str())
    {
        return Err(error(
            StatusCode::UNAUTHORIZED,
            "missing or wrong X-API-Key",
        ));
    }
    if let Some(want) = &ctx.session_token
        && header("x-session-token") != Some(want.as_str())
    {
        return Err(error(
            StatusCode::UNAUTHORIZED,
            "missing or wrong X-Session-Token",
        ));
    }
    header("x-job-id")
        .filter(|j| !j.is_empty())
        .map(str::to_string)
        .ok_or_else(|| error(StatusCode::BAD_REQUEST, "missing X-Job-Id header"))
}

/// Counts the execution and decides how the job goes (dying on demand, or by the fault).
fn plan_execution(ctx: &WorkerCtx, input: &Map<String, Value>, op: &str, job_id: &str) -> JobPlan {
    let mut st = ctx.sim.lock();
    let st = &mut *st;
    let mut plan = JobPlan::for_worker(input, op, &st.timing);
    st.count_execution(job_id, &ctx.instance_id);
    let mut die_on_demand = false;
    if let Some(i) = st.instance_mut(ctx.provider, &ctx.instance_id) {
        i.executions += 1;
        die_on_demand = std::mem::take(&mut i.die_on_next_job);
    }
    let die_fault = st.faults.die_mid_job.fire(&mut st.rng);
    plan.die |= die_on_demand || die_fault;
    plan
}

/// Runs a planned job: waits its time and answers the planned failure, the non-JSON
/// answer or the result. A dying job never answers.
async fn execute(
    ctx: &WorkerCtx,
    op: &str,
    job_id: &str,
    input: &Map<String, Value>,
    plan: &JobPlan,
) -> Response {
    if plan.die {
        // Half-way through, the machine goes away: this very connection is dropped with the
        // worker, so the killing runs in its own task and this handler never answers.
        tokio::time::sleep(util::secs(plan.seconds / 2.0)).await;
        let (sim, provider, id) = (ctx.sim.clone(), ctx.provider, ctx.instance_id.clone());
        tokio::spawn(async move {
            let task = instances::die(&sim, provider, &id, "died mid-job");
            instances::reap(task).await;
        });
        std::future::pending::<()>().await;
    }
    tokio::time::sleep(util::secs(plan.seconds)).await;
    if let Some((status, msg)) = &plan.fail {
        return error(util::status(*status), msg);
    }
    if plan.non_json {
        return util::bytes_response(
            StatusCode::OK,
            "text/html",
            b"<html><body>simulated non-JSON answer</body></html>".to_vec(),
        );
    }
    util::json(
        StatusCode::OK,
        &job_result(op, job_id, &ctx.instance_id, input, plan),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn plan_reads_simulate_hooks_and_operation_times() {
        let timing = Timing {
            operations: [("transcode".to_string(), 3.0)].into(),
            default_operation_seconds: 1.0,
            ..Timing::default()
        };
        let p = JobPlan::for_worker(&input(json!({"a": 1})), "transcode", &timing);
        assert_eq!(p.seconds, 3.0);
        assert_eq!(p.fail, None);
        let p = JobPlan::for_worker(&input(json!({"a": 1})), "other", &timing);
        assert_eq!(p.seconds, 1.0);
        let p = JobPlan::for_worker(
            &input(
                json!({"simulate": {"status": 422, "error": "bad video", "seconds": 0.5, "die": true}}),
            ),
            "transcode",
            &timing,
        );
        assert_eq!(p.seconds, 0.5);
        assert_eq!(p.fail, Some((422, "bad video".into())));
        assert!(p.die);
    }

    #[test]
    fn result_is_padded_to_about_output_bytes() {
        let plan = JobPlan {
            seconds: 0.0,
            fail: None,
            non_json: false,
            output_bytes: Some(10_000),
            die: false,
        };
        let r = job_result("t", "j", "i", &input(json!({"url": "x"})), &plan);
        let len = serde_json::to_vec(&r).unwrap().len();
        assert!((9_900..=10_100).contains(&len), "{len}");
        assert_eq!(r["result"]["inputKeys"], json!(["url"]));
    }
}
