//! The gateway's HTTP API (docs/gateway.md; the OpenAPI document is `openapi.json`, served at
//! `/openapi.json`). Every refusal is a JSON body `{"error": {"code", "message", "field"?}}`
//! with the status the document gives it.

use std::{collections::HashMap, net::SocketAddr, sync::Arc, time::Duration};

use axum::{
    Router,
    body::Body,
    extract::{MatchedPath, Path, Query, Request, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use jiff::Timestamp;
use kube::{ResourceExt, api::DeleteParams};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tracing::{info, warn};

use super::{
    CLIENT_LABEL, GatewayState,
    auth::{self, ANONYMOUS, ClientKey},
    callback,
    stats::pool_stats,
    submit::{self, Submission, Waited, finished_status, is_finished, view},
};
use crate::crd::{JobPhase, VideoJob, pool::MAX_TIMEOUT_SECONDS};

/// The OpenAPI 3.1 document of this API.
pub const OPENAPI: &str = include_str!("openapi.json");
/// Seconds a client is told to wait after a 503 for lack of capacity.
const NO_CAPACITY_RETRY_AFTER: u64 = 30;
/// Longest Idempotency-Key accepted.
const MAX_IDEMPOTENCY_KEY: usize = 255;
/// Largest page of `GET /jobs`.
const MAX_PAGE: usize = 500;

/// A refusal: status, a stable code, a message for people, and the field at fault.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
    pub field: Option<&'static str>,
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: u16, code: &'static str, message: &str) -> Self {
        Self {
            status,
            code,
            message: message.to_string(),
            field: None,
            retry_after: None,
        }
    }

    pub fn field(mut self, field: &'static str) -> Self {
        self.field = Some(field);
        self
    }

    pub fn retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    /// An API server failure: 503, since the request may succeed when it answers again.
    pub fn kube(e: kube::Error) -> Self {
        warn!(error = %e, "the API server refused or failed a gateway request");
        Self::new(
            503,
            "ApiServerUnavailable",
            "the Kubernetes API server did not complete the request; retry",
        )
        .retry_after(5)
    }

    fn bad(field: &'static str, message: &str) -> Self {
        Self::new(400, "InvalidRequest", message).field(field)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut error = json!({"code": self.code, "message": self.message});
        if let Some(f) = self.field {
            error["field"] = json!(f);
        }
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut res = (status, axum::Json(json!({"error": error}))).into_response();
        if let Some(s) = self.retry_after {
            res.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        if self.status == 401 {
            res.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"gpupool\""),
            );
        }
        res
    }
}

type ApiResult = Result<Response, ApiError>;

/// The calling client, from its key (or `anonymous` without auth).
fn authenticate(state: &GatewayState, headers: &HeaderMap) -> Result<ClientKey, ApiError> {
    if state.config.insecure_no_auth {
        return Ok(state
            .keys
            .client(ANONYMOUS)
            .unwrap_or_else(ClientKey::anonymous));
    }
    let Some(key) = auth::presented_key(headers) else {
        return Err(ApiError::new(
            401,
            "Unauthorized",
            "an API key is required: send X-API-Key or Authorization: Bearer",
        ));
    };
    state
        .keys
        .authenticate(key)
        .ok_or_else(|| ApiError::new(401, "Unauthorized", "the API key is not valid"))
}

/// Authenticates and takes a token of the client's rate limit.
fn admit(state: &GatewayState, headers: &HeaderMap) -> Result<ClientKey, ApiError> {
    let client = authenticate(state, headers)?;
    state.limits.take(&client.name).map_err(|wait| {
        ApiError::new(
            429,
            "RateLimited",
            &format!(
                "more than {} requests per second from this client",
                state.config.rate_per_client
            ),
        )
        .retry_after(wait)
    })?;
    Ok(client)
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
}

/// A parameter from the query, else from a header.
fn param<'a>(
    query: &'a HashMap<String, String>,
    headers: &'a HeaderMap,
    name: &str,
    header_name: &str,
) -> Option<&'a str> {
    query
        .get(name)
        .map(String::as_str)
        .or_else(|| header_str(headers, header_name))
}

fn int_param<T: std::str::FromStr + PartialOrd + std::fmt::Display + Copy>(
    value: Option<&str>,
    field: &'static str,
    min: T,
    max: T,
) -> Result<Option<T>, ApiError> {
    let Some(v) = value else { return Ok(None) };
    match v.parse::<T>() {
        Ok(n) if n >= min && n <= max => Ok(Some(n)),
        _ => Err(ApiError::bad(
            field,
            &format!("{field} must be an integer from {min} to {max}"),
        )),
    }
}

/// The `Prefer` header's preferences (RFC 7240): `respond-async`, `wait=N`.
fn prefer(headers: &HeaderMap) -> (bool, Option<u64>) {
    let mut async_ = false;
    let mut wait = None;
    for v in headers.get_all("prefer") {
        for p in v.to_str().unwrap_or_default().split(',') {
            let p = p.trim();
            if p.eq_ignore_ascii_case("respond-async") {
                async_ = true;
            } else if let Some(w) = p.strip_prefix("wait=") {
                wait = w.trim().parse().ok();
            }
        }
    }
    (async_, wait)
}

fn operation_is_valid(op: &str) -> bool {
    let b = op.as_bytes();
    let ok = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    !b.is_empty()
        && b.len() <= 63
        && ok(&b[0])
        && ok(&b[b.len() - 1])
        && b.iter().all(|c| ok(c) || *c == b'-')
}

/// Reads the body up to the limit: 413 past it, 400 unless it is a JSON object.
async fn json_object(
    state: &GatewayState,
    headers: &HeaderMap,
    body: Body,
) -> Result<serde_json::Map<String, Value>, ApiError> {
    let limit = state.config.max_body_bytes;
    let too_large = || {
        ApiError::new(
            413,
            "BodyTooLarge",
            &format!("the request body is larger than {limit} bytes"),
        )
        .field("body")
    };
    let declared = header_str(headers, "content-length").and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(too_large());
    }
    let bytes = axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| too_large())?;
    if bytes.is_empty() {
        return Ok(serde_json::Map::new());
    }
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(ApiError::bad(
            "body",
            "the body must be a JSON object (it becomes the job's input)",
        )),
        Err(e) => Err(ApiError::bad(
            "body",
            &format!("the body is not valid JSON: {e}"),
        )),
    }
}

fn with_job_headers(mut res: Response, job: &VideoJob, status: u16, replayed: bool) -> Response {
    *res.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    let h = res.headers_mut();
    let name = job.name_any();
    if let Ok(v) = HeaderValue::from_str(&format!("/jobs/{name}")) {
        h.insert(header::LOCATION, v);
    }
    if let Ok(v) = HeaderValue::from_str(&name) {
        h.insert("x-gpupool-job", v);
    }
    if replayed {
        h.insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    res
}

/// `POST /video/{operation}`.
async fn submit_video(
    State(state): State<Arc<GatewayState>>,
    Path(operation): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    let client = admit(&state, &headers)?;
    if !operation_is_valid(&operation) {
        return Err(ApiError::bad(
            "operation",
            "the operation must be lower-case letters, digits and dashes, at most 63 characters",
        ));
    }
    let input = json_object(&state, &headers, body).await?;
    let pool = param(&query, &headers, "pool", "x-gpupool-pool")
        .unwrap_or(&state.config.default_pool)
        .to_string();
    let timeout_seconds = int_param(
        param(&query, &headers, "timeout", "x-gpupool-timeout"),
        "timeout",
        1i64,
        MAX_TIMEOUT_SECONDS,
    )?;
    let max_retries = int_param(
        param(&query, &headers, "retries", "x-gpupool-retries"),
        "retries",
        0i32,
        10,
    )?;
    let (respond_async, prefer_wait) = prefer(&headers);
    let wait = int_param(
        query.get("wait").map(String::as_str),
        "wait",
        0u64,
        state.config.max_wait_seconds,
    )?
    .or(prefer_wait.map(|w| w.min(state.config.max_wait_seconds)))
    .unwrap_or(state.config.max_wait_seconds);
    let idempotency_key = match header_str(&headers, "idempotency-key") {
        None => None,
        Some(k)
            if !k.is_empty()
                && k.len() <= MAX_IDEMPOTENCY_KEY
                && k.bytes().all(|c| c.is_ascii_graphic()) =>
        {
            Some(k.to_string())
        }
        Some(_) => {
            return Err(ApiError::bad(
                "Idempotency-Key",
                "the Idempotency-Key must be 1 to 255 printable ASCII characters",
            ));
        }
    };
    let callback_url = match param(&query, &headers, "callbackUrl", "x-callback-url") {
        None => None,
        Some(raw) => {
            callback::check_url(raw, state.config.callback_allow_private)
                .map_err(|e| ApiError::bad("callbackUrl", &format!("callbackUrl {e}")))?;
            if client.callback_secret.is_none() {
                return Err(ApiError::bad(
                    "callbackUrl",
                    "this client has no callback secret (entry <client>.callback-secret in the \
                     keys Secret), so its callbacks could not be signed",
                ));
            }
            Some(raw.to_string())
        }
    };
    if !state.is_synced() {
        return Err(ApiError::new(503, "NotReady", "the gateway is starting").retry_after(2));
    }
    if state.pool(&pool).is_none() {
        return Err(ApiError::new(
            404,
            "PoolNotFound",
            &format!(
                "no GpuPool named {pool} in namespace {}",
                state.config.namespace
            ),
        )
        .field("pool"));
    }
    let sub = Submission {
        client: client.name.clone(),
        operation,
        input,
        pool,
        timeout_seconds,
        max_retries,
        callback_url,
        idempotency_key,
    };
    // A retry of a running job adds nothing in flight: only new jobs count against the limit.
    let known = sub.job_name().and_then(|n| state.job(&n)).is_some();
    let _slot = if known {
        None
    } else {
        Some(state.limits_in_flight(&client.name)?)
    };
    let (job, replayed) = submit::create_or_attach(&state, &sub).await?;
    drop(_slot);
    if respond_async || wait == 0 {
        let status = if is_finished(&job) {
            finished_status(&job)
        } else {
            202
        };
        let res = axum::Json(view(&job)).into_response();
        return Ok(with_job_headers(res, &job, status, replayed));
    }
    let started = std::time::Instant::now();
    let waited = submit::wait(
        &state,
        job,
        Duration::from_secs(wait),
        Duration::from_secs(state.config.capacity_wait_seconds),
        true,
    )
    .await;
    state
        .metrics
        .wait_seconds
        .observe(started.elapsed().as_secs_f64());
    Ok(answer(waited, replayed))
}

/// The answer to a synchronous request once its wait is over.
fn answer(waited: Waited, replayed: bool) -> Response {
    match waited {
        Waited::Finished(job) => {
            let status = finished_status(&job);
            let body = if status == 200 {
                job.status
                    .as_ref()
                    .and_then(|s| s.output.clone())
                    .unwrap_or(Value::Null)
            } else {
                let v = view(&job);
                let (code, message) = if status == 504 {
                    (
                        "JobTimedOut",
                        "the job's last attempt did not finish within its timeout",
                    )
                } else {
                    ("JobFailed", "the job failed")
                };
                json!({"error": {"code": code, "message": message,
                                 "reason": v.get("reason"), "detail": v.get("error")},
                       "job": v})
            };
            with_job_headers(axum::Json(body).into_response(), &job, status, replayed)
        }
        Waited::StillRunning(job) => {
            with_job_headers(axum::Json(view(&job)).into_response(), &job, 202, replayed)
        }
        Waited::NoCapacity(job, reason) => {
            let err = ApiError::new(
                503,
                "NoCapacity",
                &format!(
                    "no GPU could be had for this job ({reason}); it was withdrawn before it ran"
                ),
            )
            .retry_after(NO_CAPACITY_RETRY_AFTER);
            let mut res = err.into_response();
            if let Ok(v) = HeaderValue::from_str(&job.name_any()) {
                res.headers_mut().insert("x-gpupool-job", v);
            }
            res
        }
        Waited::Gone(job) => {
            let err = ApiError::new(
                409,
                "JobCancelled",
                "the job was deleted before it finished",
            );
            let mut res = err.into_response();
            if let Ok(v) = HeaderValue::from_str(&job.name_any()) {
                res.headers_mut().insert("x-gpupool-job", v);
            }
            res
        }
    }
}

/// The caller's job `name`, from the cache or (just created) from the API server.
async fn own_job(state: &GatewayState, client: &str, name: &str) -> Result<VideoJob, ApiError> {
    let job = match state.job(name) {
        Some(j) => (*j).clone(),
        None => state
            .jobs()
            .get_opt(name)
            .await
            .map_err(ApiError::kube)?
            .ok_or_else(not_found)?,
    };
    if job.labels().get(CLIENT_LABEL).map(String::as_str) != Some(client) {
        // Another client's job, or not a gateway job: as if it did not exist.
        return Err(not_found());
    }
    Ok(job)
}

fn not_found() -> ApiError {
    ApiError::new(404, "JobNotFound", "no such job for this client").field("name")
}

/// `GET /jobs/{name}`.
async fn get_job(
    State(state): State<Arc<GatewayState>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> ApiResult {
    let client = admit(&state, &headers)?;
    let job = own_job(&state, &client.name, &name).await?;
    Ok(axum::Json(view(&job)).into_response())
}

/// `DELETE /jobs/{name}`: cancels (the operator's finalizer stops the remote work).
async fn delete_job(
    State(state): State<Arc<GatewayState>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> ApiResult {
    let client = admit(&state, &headers)?;
    let job = own_job(&state, &client.name, &name).await?;
    let dp = DeleteParams {
        preconditions: Some(kube::api::Preconditions {
            uid: job.uid(),
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    match state.jobs().delete(&name, &dp).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => return Err(not_found()),
        Err(e) => return Err(ApiError::kube(e)),
    }
    info!(client = %client.name, job = %name, "job deleted on request");
    let mut v = view(&job);
    if !is_finished(&job) {
        v["phase"] = json!("Cancelled");
    }
    Ok((StatusCode::ACCEPTED, axum::Json(v)).into_response())
}

/// `GET /jobs?phase=&limit=&after=`: the caller's jobs, oldest first, paged.
async fn list_jobs(
    State(state): State<Arc<GatewayState>>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> ApiResult {
    let client = admit(&state, &headers)?;
    let phase = match query.get("phase").map(String::as_str) {
        None | Some("") => None,
        Some(p) => Some(
            ["Pending", "Scheduled", "Running", "Succeeded", "Failed"]
                .into_iter()
                .find(|x| *x == p)
                .ok_or_else(|| {
                    ApiError::bad(
                        "phase",
                        "phase must be Pending, Scheduled, Running, Succeeded or Failed",
                    )
                })?,
        ),
    };
    let limit = int_param(
        query.get("limit").map(String::as_str),
        "limit",
        1usize,
        MAX_PAGE,
    )?
    .unwrap_or(100);
    let after = match query.get("after").map(String::as_str) {
        None | Some("") => None,
        Some(c) => Some(
            decode_cursor(c).ok_or_else(|| ApiError::bad("after", "not a cursor from this API"))?,
        ),
    };
    let mut jobs: Vec<(String, String, Arc<VideoJob>)> = state
        .caches
        .jobs
        .state()
        .into_iter()
        .filter(|j| j.labels().get(CLIENT_LABEL) == Some(&client.name))
        .filter(|j| {
            phase.is_none_or(|p| {
                let ph = j
                    .status
                    .as_ref()
                    .and_then(|s| s.phase)
                    .unwrap_or(JobPhase::Pending);
                format!("{ph:?}") == p
            })
        })
        .map(|j| {
            let ts = j
                .metadata
                .creation_timestamp
                .as_ref()
                .map(|t| t.0.to_string())
                .unwrap_or_default();
            (ts, j.name_any(), j)
        })
        .filter(|(ts, name, _)| {
            after
                .as_ref()
                .is_none_or(|(ats, an)| (ts, name) > (ats, an))
        })
        .collect();
    jobs.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
    let more = jobs.len() > limit;
    jobs.truncate(limit);
    let next = if more {
        jobs.last().map(|(ts, name, _)| encode_cursor(ts, name))
    } else {
        None
    };
    let items: Vec<Value> = jobs.iter().map(|(_, _, j)| view(j)).collect();
    Ok(axum::Json(json!({"items": items, "next": next})).into_response())
}

/// Cursors are the hex of `<creationTimestamp>\n<name>`: opaque to clients, stable across
/// replicas.
fn encode_cursor(ts: &str, name: &str) -> String {
    auth::hex(format!("{ts}\n{name}").as_bytes())
}

fn decode_cursor(c: &str) -> Option<(String, String)> {
    if !c.len().is_multiple_of(2) || c.len() > 512 {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..c.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(c.get(i..i + 2)?, 16).ok())
        .collect();
    let s = String::from_utf8(bytes?).ok()?;
    let (ts, name) = s.split_once('\n')?;
    Some((ts.to_string(), name.to_string()))
}

/// `GET /pool/stats[?pool=]`.
async fn stats(
    State(state): State<Arc<GatewayState>>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> ApiResult {
    admit(&state, &headers)?;
    let pool = query
        .get("pool")
        .map(String::as_str)
        .filter(|p| !p.is_empty());
    if let Some(p) = pool
        && state.pool(p).is_none()
    {
        return Err(
            ApiError::new(404, "PoolNotFound", &format!("no GpuPool named {p}")).field("pool"),
        );
    }
    let body = pool_stats(
        &state.caches.instances.state(),
        &state.caches.pools.state(),
        pool,
        Timestamp::now(),
    );
    Ok(axum::Json(body).into_response())
}

async fn readyz(State(state): State<Arc<GatewayState>>) -> Response {
    match state.not_ready() {
        None => (StatusCode::OK, "ok").into_response(),
        Some(why) => (StatusCode::SERVICE_UNAVAILABLE, why).into_response(),
    }
}

async fn metrics(State(state): State<Arc<GatewayState>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

async fn not_found_route() -> ApiError {
    ApiError::new(404, "NotFound", "no such route; see /openapi.json")
}

/// Counts every answer by route pattern and status.
async fn count(State(state): State<Arc<GatewayState>>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let res = next.run(req).await;
    state
        .metrics
        .requests
        .get_or_create(&super::metrics::RequestLabels {
            route,
            code: res.status().as_u16().to_string(),
        })
        .inc();
    res
}

pub fn router(state: Arc<GatewayState>) -> Router {
    Router::new()
        .route("/video/{operation}", post(submit_video))
        .route("/jobs", get(list_jobs))
        .route("/jobs/{name}", get(get_job).delete(delete_job))
        .route("/pool/stats", get(stats))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
        .fallback(not_found_route)
        // The body limit is enforced by `json_object`, with a JSON 413.
        .layer(axum::extract::DefaultBodyLimit::disable())
        .layer(middleware::from_fn_with_state(state.clone(), count))
        .with_state(state)
}

/// Binds the address and returns the bound address and the server future.
pub async fn serve(
    state: Arc<GatewayState>,
) -> std::io::Result<(SocketAddr, impl Future<Output = std::io::Result<()>>)> {
    let listener = TcpListener::bind(state.config.http_addr).await?;
    let bound = listener.local_addr()?;
    let mut draining = state.draining.subscribe();
    let app = router(state);
    let stop = async move {
        let _ = draining.wait_for(|d| *d).await;
    };
    Ok((bound, async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(stop)
            .await
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operation_names_follow_the_crd_pattern() {
        for ok in ["caption", "a", "transcode-h264", "x1"] {
            assert!(operation_is_valid(ok), "{ok}");
        }
        for bad in ["", "Caption", "-a", "a-", "a_b", "a.b", &"a".repeat(64)] {
            assert!(!operation_is_valid(bad), "{bad}");
        }
    }

    #[test]
    fn prefer_reads_respond_async_and_wait() {
        let mut h = HeaderMap::new();
        assert_eq!(prefer(&h), (false, None));
        h.insert("prefer", "respond-async, wait=30".parse().unwrap());
        assert_eq!(prefer(&h), (true, Some(30)));
    }

    #[test]
    fn cursors_round_trip_and_garbage_is_refused() {
        let c = encode_cursor("2026-12-01T00:00:00Z", "gw-abc");
        assert_eq!(
            decode_cursor(&c),
            Some(("2026-12-01T00:00:00Z".into(), "gw-abc".into()))
        );
        for bad in ["zz", "abc", "00"] {
            assert_eq!(decode_cursor(bad), None, "{bad}");
        }
    }

    #[test]
    fn integer_parameters_are_bounded_and_named() {
        assert_eq!(int_param(Some("5"), "timeout", 1i64, 10).unwrap(), Some(5));
        assert_eq!(int_param::<i64>(None, "timeout", 1, 10).unwrap(), None);
        for bad in ["0", "11", "x", "-1", "1.5"] {
            let e = int_param(Some(bad), "timeout", 1i64, 10).unwrap_err();
            assert_eq!((e.status, e.field), (400, Some("timeout")), "{bad}");
        }
    }

    #[test]
    fn the_openapi_document_names_every_route() {
        let doc: Value = serde_json::from_str(OPENAPI).unwrap();
        for path in [
            "/video/{operation}",
            "/jobs",
            "/jobs/{name}",
            "/pool/stats",
            "/healthz",
            "/readyz",
            "/metrics",
            "/openapi.json",
        ] {
            assert!(
                doc["paths"].get(path).is_some(),
                "{path} missing from openapi.json"
            );
        }
    }
}
