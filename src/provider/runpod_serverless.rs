//! RunPod Serverless client ([`RunpodServerlessClient`]): queue jobs on an existing endpoint,
//! poll and cancel them, read the endpoint's health (`providers.md` §2.8), and keep three of
//! its settings in line with the pool: through REST v2 (`GET`/`PATCH /serverless/{id}`,
//! §2.10) by default, or through the deprecated GraphQL API (`myself { endpoints }` and
//! `saveEndpoint`, §2.9) when the entry's `api` is `GraphQL`.
//!
//! Decisions:
//! * `/run` is not idempotent: only a refusal (429, no connection) is retried; after an
//!   ambiguous failure the caller decides (the job may be queued);
//! * `/cancel` of a job that is gone (404) or already final is success;
//! * REST v2's `PATCH` is partial: the body is `{"workers": {min, max, idleTimeout}}` and
//!   nothing else, so no other setting can be reset. RunPod refuses an idle timeout (422) on
//!   an endpoint that scales by `REQUEST_COUNT` and leaves it out of the endpoint it returns:
//!   both become a Permanent error saying so;
//! * `saveEndpoint` is a full replace (omitted fields reset to defaults), so a GraphQL update
//!   first reads the endpoint and sends back every field it read, changing only
//!   `idleTimeout`, `workersMin` and `workersMax`. A field RunPod adds later and this client
//!   does not read would be reset: [`PRESERVED_FIELDS`] lists what is kept.

use async_trait::async_trait;
use reqwest::{Method, StatusCode};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use tracing::warn;
use url::Url;

use super::{
    Credentials, EndpointHealth, EndpointSettings, ProviderError, ProviderResult, ServerlessJob,
    ServerlessProvider, ServerlessStatus,
    http::{
        ApiClient, Call, DEFAULT_RUNPOD_GRAPHQL_BASE_URL, DEFAULT_RUNPOD_REST_V2_BASE_URL,
        DEFAULT_RUNPOD_SERVERLESS_BASE_URL, HttpConfig, Idempotency, RawResponse, Redactor,
        join_segments, lenient, parse_base_url, status_error,
    },
    runpod::{graphql, graphql_url},
    runpod_v2::{Verb, rest_error},
};
use crate::crd::{RunpodApi, RunpodServerlessProvider};

/// Longest job error kept from the endpoint, in characters (as for a worker's message).
const ERROR_CHARS: usize = 1000;

/// Endpoint fields read and written back by an update, as the official clients name them
/// (runpod-python `saveEndpoint`/`myself { endpoints }`, runpodctl `UpdateEndpointModels`).
const PRESERVED_FIELDS: &[&str] = &[
    "name",
    "templateId",
    "gpuIds",
    "gpuCount",
    "instanceIds",
    "idleTimeout",
    "locations",
    "networkVolumeId",
    "scalerType",
    "scalerValue",
    "workersMin",
    "workersMax",
    "flashBootType",
    "executionTimeoutMs",
    "allowedCudaVersions",
    "minCudaVersion",
    "type",
    "modelReferences",
];

/// Selection of one endpoint: the preserved fields, with `networkVolumeIds` as the input
/// shape `[{networkVolumeId}]`.
const ENDPOINT_SELECTION: &str = "id name templateId gpuIds gpuCount instanceIds idleTimeout \
    locations networkVolumeId networkVolumeIds { networkVolumeId } scalerType scalerValue \
    workersMin workersMax flashBootType executionTimeoutMs allowedCudaVersions minCudaVersion \
    type modelReferences";

/// Where and how to reach RunPod Serverless.
#[derive(Clone, Debug)]
pub struct RunpodServerlessOptions {
    /// Jobs API base, as runpod-python's `RUNPOD_ENDPOINT_BASE_URL`.
    pub base_url: String,
    /// REST v2 base, `/v2` included, for endpoint settings of entries whose `api` is `RestV2`
    /// (see [`super::runpod_v2::RunpodV2Options`]).
    pub rest_base_url: String,
    /// GraphQL host for endpoint settings of entries whose `api` is `GraphQL` (see
    /// [`super::runpod::RunpodOptions`]).
    pub graphql_base_url: String,
    pub http: HttpConfig,
}

impl Default for RunpodServerlessOptions {
    fn default() -> Self {
        Self {
            base_url: DEFAULT_RUNPOD_SERVERLESS_BASE_URL.into(),
            rest_base_url: DEFAULT_RUNPOD_REST_V2_BASE_URL.into(),
            graphql_base_url: DEFAULT_RUNPOD_GRAPHQL_BASE_URL.into(),
            http: HttpConfig::runpod_serverless(),
        }
    }
}

/// Where an entry's endpoint settings are read and changed.
#[derive(Debug)]
enum SettingsApi {
    /// `{base}/serverless/{id}` of REST v2.
    RestV2(Url),
    /// The GraphQL URL.
    GraphQL(Url),
}

/// One `runpodServerless` provider entry of a pool.
#[derive(Debug)]
pub struct RunpodServerlessClient {
    api: ApiClient,
    base: Url,
    settings_api: SettingsApi,
    endpoint_id: String,
}

impl RunpodServerlessClient {
    pub fn new(
        entry: &RunpodServerlessProvider,
        credentials: Credentials,
        options: RunpodServerlessOptions,
    ) -> ProviderResult<Self> {
        let id = entry.endpoint_id.trim();
        if id.is_empty() || !id.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err(ProviderError::Permanent(format!(
                "invalid RunPod endpoint id {:?}",
                entry.endpoint_id
            )));
        }
        let settings_api = match entry.api {
            RunpodApi::RestV2 => {
                let base = parse_base_url("RunPod REST v2", &options.rest_base_url)?;
                SettingsApi::RestV2(join_segments(&base, &["serverless", id])?)
            }
            RunpodApi::GraphQL => SettingsApi::GraphQL(graphql_url(&options.graphql_base_url)?),
        };
        Ok(Self {
            api: ApiClient::new("runpod-serverless", credentials, options.http)?,
            base: parse_base_url("RunPod Serverless", &options.base_url)?,
            settings_api,
            endpoint_id: id.to_string(),
        })
    }

    fn url(&self, segments: &[&str]) -> ProviderResult<Url> {
        let mut all = vec![self.endpoint_id.as_str()];
        all.extend_from_slice(segments);
        join_segments(&self.base, &all)
    }

    /// `GET /serverless/{id}`: the endpoint's workers and scaling.
    async fn rest_endpoint(&self, url: &Url) -> ProviderResult<RestEndpointDto> {
        const OP: &str = "runpod.get_endpoint";
        let call = Call {
            op: OP,
            method: Method::GET,
            url: url.clone(),
            body: None,
            idempotency: Idempotency::Idempotent,
        };
        self.api
            .execute(&call, |raw, r| {
                if raw.is_success() {
                    raw.json(OP, r)
                } else {
                    Err(rest_error(OP, raw, r, Verb::Read))
                }
            })
            .await
    }

    /// `PATCH /serverless/{id}` with the three settings and nothing else.
    async fn rest_update(&self, url: &Url, settings: &EndpointSettings) -> ProviderResult<()> {
        const OP: &str = "runpod.update_endpoint";
        let body = patch_body(settings);
        let call = Call {
            op: OP,
            method: Method::PATCH,
            url: url.clone(),
            body: Some(&body),
            // The same partial update twice is the same update.
            idempotency: Idempotency::Idempotent,
        };
        let refused = self
            .api
            .execute(&call, |raw, r| {
                if raw.is_success() {
                    return Ok(None);
                }
                if raw.status == StatusCode::UNPROCESSABLE_ENTITY {
                    // Told apart below, after a look at how the endpoint scales.
                    return Ok(Some(rest_error(OP, raw, r, Verb::Update)));
                }
                Err(rest_error(OP, raw, r, Verb::Update))
            })
            .await?;
        let Some(refused) = refused else {
            return Ok(());
        };
        match self.rest_endpoint(url).await {
            Ok(endpoint) if endpoint.refuses_idle_timeout() => {
                Err(request_count_error(&self.endpoint_id))
            }
            _ => Err(refused),
        }
    }

    /// The endpoint as RunPod stores it, with the preserved fields.
    async fn read_endpoint(&self, graphql_url: &Url) -> ProviderResult<Map<String, Value>> {
        let query =
            format!("query Endpoints {{ myself {{ endpoints {{ {ENDPOINT_SELECTION} }} }} }}");
        let data: MyselfEndpointsData = graphql(
            &self.api,
            graphql_url,
            "runpod.endpoints",
            &query,
            json!({}),
            Idempotency::Idempotent,
            &[],
        )
        .await?;
        let endpoints = data.myself.map(|m| m.endpoints).ok_or_else(|| {
            ProviderError::Transient("runpod.endpoints: no account in the response".into())
        })?;
        endpoints
            .into_iter()
            .find(|e| e.get("id").and_then(Value::as_str) == Some(self.endpoint_id.as_str()))
            .ok_or_else(|| ProviderError::NotFound(format!("runpod endpoint {}", self.endpoint_id)))
    }
}

#[async_trait]
impl ServerlessProvider for RunpodServerlessClient {
    async fn submit(&self, input: &Value) -> ProviderResult<String> {
        let body = json!({"input": input});
        let call = Call {
            op: "runpod.run",
            method: Method::POST,
            url: self.url(&["run"])?,
            body: Some(&body),
            idempotency: Idempotency::NotIdempotent,
        };
        self.api
            .execute(&call, |raw, r| {
                if !raw.is_success() {
                    return Err(serverless_error("runpod.run", raw, r));
                }
                let job: JobDto = raw.json("runpod.run", r)?;
                // 2xx without an id: the job may be queued; the caller decides.
                job.id.filter(|id| !id.is_empty()).ok_or_else(|| {
                    ProviderError::Transient(format!(
                        "runpod.run: no job id in {}",
                        r.excerpt(&raw.body)
                    ))
                })
            })
            .await
    }

    async fn status(&self, job_id: &str) -> ProviderResult<ServerlessJob> {
        let call = Call {
            op: "runpod.status",
            method: Method::GET,
            url: self.url(&["status", job_id])?,
            body: None,
            idempotency: Idempotency::Idempotent,
        };
        self.api
            .execute(&call, |raw, r| classify_status(raw, r, job_id))
            .await
    }

    async fn cancel(&self, job_id: &str) -> ProviderResult<()> {
        let call = Call {
            op: "runpod.cancel",
            method: Method::POST,
            url: self.url(&["cancel", job_id])?,
            body: None,
            // Cancelling twice is harmless.
            idempotency: Idempotency::Idempotent,
        };
        self.api.execute(&call, classify_cancel).await
    }

    async fn health(&self) -> ProviderResult<EndpointHealth> {
        let call = Call {
            op: "runpod.health",
            method: Method::GET,
            url: self.url(&["health"])?,
            body: None,
            idempotency: Idempotency::Idempotent,
        };
        let dto: HealthDto = self
            .api
            .execute(&call, |raw, r| {
                if raw.is_success() {
                    raw.json("runpod.health", r)
                } else {
                    Err(serverless_error("runpod.health", raw, r))
                }
            })
            .await?;
        Ok(dto.into())
    }

    async fn settings(&self) -> ProviderResult<EndpointSettings> {
        match &self.settings_api {
            SettingsApi::RestV2(url) => self.rest_endpoint(url).await?.settings(&self.endpoint_id),
            SettingsApi::GraphQL(url) => settings_of(&self.read_endpoint(url).await?),
        }
    }

    async fn update_settings(&self, settings: &EndpointSettings) -> ProviderResult<()> {
        const MUTATION: &str = "mutation SaveEndpoint($input: EndpointInput!) { \
            saveEndpoint(input: $input) { id idleTimeout workersMin workersMax } }";
        let graphql_url = match &self.settings_api {
            SettingsApi::RestV2(url) => return self.rest_update(url, settings).await,
            SettingsApi::GraphQL(url) => url,
        };
        let current = self.read_endpoint(graphql_url).await?;
        if settings_of(&current).ok().as_ref() == Some(settings) {
            return Ok(());
        }
        let input = save_input(&self.endpoint_id, &current, settings);
        let data: SaveEndpointData = graphql(
            &self.api,
            graphql_url,
            "runpod.save_endpoint",
            MUTATION,
            json!({"input": input}),
            // A full replace with the same values is safe to repeat.
            Idempotency::Idempotent,
            &[],
        )
        .await?;
        if data.save_endpoint.is_none() {
            return Err(ProviderError::Transient(
                "runpod.save_endpoint: empty response".into(),
            ));
        }
        Ok(())
    }
}

/// The `saveEndpoint` input: every preserved field read (nulls left out), the three settings
/// replaced, and the id that makes it an update.
fn save_input(
    endpoint_id: &str,
    current: &Map<String, Value>,
    settings: &EndpointSettings,
) -> Map<String, Value> {
    let mut input = Map::new();
    input.insert("id".into(), json!(endpoint_id));
    for field in PRESERVED_FIELDS {
        if let Some(v) = current.get(*field).filter(|v| !v.is_null()) {
            input.insert((*field).to_string(), v.clone());
        }
    }
    // `networkVolumeIds` is read as [{networkVolumeId}], the shape saveEndpoint takes; an
    // empty list would clear nothing, so it is sent only when it carries ids.
    if let Some(Value::Array(ids)) = current.get("networkVolumeIds")
        && !ids.is_empty()
    {
        let ids: Vec<Value> = ids
            .iter()
            .filter_map(|v| v.get("networkVolumeId").filter(|id| id.is_string()))
            .map(|id| json!({"networkVolumeId": id}))
            .collect();
        input.insert("networkVolumeIds".into(), Value::Array(ids));
    }
    input.insert("idleTimeout".into(), json!(settings.idle_timeout_seconds));
    input.insert("workersMin".into(), json!(settings.workers_min));
    input.insert("workersMax".into(), json!(settings.workers_max));
    input
}

/// The REST v2 `UpdateEndpointRequest` the operator sends: the workers block only.
fn patch_body(settings: &EndpointSettings) -> Value {
    json!({"workers": {
        "min": settings.workers_min,
        "max": settings.workers_max,
        "idleTimeout": settings.idle_timeout_seconds,
    }})
}

/// Why an endpoint scaling by request count cannot have its settings kept.
fn request_count_error(endpoint_id: &str) -> ProviderError {
    ProviderError::Permanent(format!(
        "runpod endpoint {endpoint_id} is queue-based and scales by REQUEST_COUNT, which takes \
         no idle timeout \
         (RunPod refuses one with HTTP 422): switch its scaling to QUEUE_DELAY, or set \
         manageEndpointSettings: false on this provider entry"
    ))
}

fn settings_of(endpoint: &Map<String, Value>) -> ProviderResult<EndpointSettings> {
    let int = |field: &str| {
        endpoint
            .get(field)
            .and_then(Value::as_u64)
            .and_then(|v| u32::try_from(v).ok())
            .ok_or_else(|| {
                ProviderError::Transient(format!("runpod.endpoints: endpoint without {field}"))
            })
    };
    Ok(EndpointSettings {
        idle_timeout_seconds: int("idleTimeout")?,
        workers_min: int("workersMin")?,
        workers_max: int("workersMax")?,
    })
}

fn serverless_error(op: &str, raw: &RawResponse, redactor: &Redactor) -> ProviderError {
    status_error(op, raw, redactor)
}

/// `GET /status/{id}`: the job, or NotFound once its results expired.
fn classify_status(
    raw: &RawResponse,
    redactor: &Redactor,
    job_id: &str,
) -> ProviderResult<ServerlessJob> {
    const OP: &str = "runpod.status";
    if !raw.is_success() {
        return Err(serverless_error(OP, raw, redactor));
    }
    let dto: JobDto = raw.json(OP, redactor)?;
    let status = match dto.status.as_deref().map(str::trim) {
        Some(s) => parse_status(s).unwrap_or_else(|| {
            // A state this client does not know: keep polling, the job's timeout bounds it.
            warn!(
                status = s,
                "unknown RunPod job status, treated as in progress"
            );
            ServerlessStatus::InProgress
        }),
        None => {
            return Err(ProviderError::Transient(format!(
                "{OP}: no status in {}",
                redactor.excerpt(&raw.body)
            )));
        }
    };
    // The endpoint's text ends up in the job's status, conditions and events: bounded.
    let error = match dto.error {
        None => None,
        Some(Value::String(s)) => Some(redactor.message(&s, ERROR_CHARS)),
        Some(other) => Some(redactor.message(&other.to_string(), ERROR_CHARS)),
    };
    Ok(ServerlessJob {
        id: dto
            .id
            .filter(|id| !id.is_empty())
            .unwrap_or_else(|| job_id.to_string()),
        status,
        output: dto.output,
        error,
        delay_time_ms: dto.delay_time,
        execution_time_ms: dto.execution_time,
    })
}

fn parse_status(s: &str) -> Option<ServerlessStatus> {
    Some(match s.to_ascii_uppercase().as_str() {
        "IN_QUEUE" => ServerlessStatus::InQueue,
        // The docs say RUNNING, the API answers IN_PROGRESS (runpod/docs#511).
        "IN_PROGRESS" | "RUNNING" => ServerlessStatus::InProgress,
        "COMPLETED" => ServerlessStatus::Completed,
        "FAILED" => ServerlessStatus::Failed,
        "CANCELLED" | "CANCELED" => ServerlessStatus::Cancelled,
        "TIMED_OUT" => ServerlessStatus::TimedOut,
        _ => return None,
    })
}

/// `POST /cancel/{id}`: done, gone (404/410) or already final are all Ok.
fn classify_cancel(raw: &RawResponse, redactor: &Redactor) -> ProviderResult<()> {
    const OP: &str = "runpod.cancel";
    if raw.is_success() || matches!(raw.status, StatusCode::NOT_FOUND | StatusCode::GONE) {
        return Ok(());
    }
    if matches!(raw.status, StatusCode::BAD_REQUEST | StatusCode::CONFLICT) {
        let text = String::from_utf8_lossy(&raw.body).to_ascii_uppercase();
        let already_final = text.contains("ALREADY")
            || ["COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"]
                .iter()
                .any(|s| text.contains(s));
        if already_final {
            return Ok(());
        }
    }
    Err(serverless_error(OP, raw, redactor))
}

// ---- wire DTOs (private) ----

#[derive(Deserialize, Debug, Default)]
#[serde(default, rename_all = "camelCase")]
struct JobDto {
    #[serde(deserialize_with = "lenient::opt_string")]
    id: Option<String>,
    #[serde(deserialize_with = "lenient::opt_string")]
    status: Option<String>,
    #[serde(deserialize_with = "lenient::opt_value")]
    output: Option<Value>,
    #[serde(deserialize_with = "lenient::opt_value")]
    error: Option<Value>,
    #[serde(deserialize_with = "lenient::opt_u64")]
    delay_time: Option<u64>,
    #[serde(deserialize_with = "lenient::opt_u64")]
    execution_time: Option<u64>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(default)]
struct HealthDto {
    #[serde(deserialize_with = "lenient::opt_obj")]
    jobs: Option<HealthJobsDto>,
    #[serde(deserialize_with = "lenient::opt_obj")]
    workers: Option<HealthWorkersDto>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(default, rename_all = "camelCase")]
struct HealthJobsDto {
    #[serde(deserialize_with = "lenient::opt_u64")]
    completed: Option<u64>,
    #[serde(deserialize_with = "lenient::opt_u64")]
    failed: Option<u64>,
    #[serde(deserialize_with = "lenient::opt_u64")]
    in_progress: Option<u64>,
    #[serde(deserialize_with = "lenient::opt_u64")]
    in_queue: Option<u64>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(default)]
struct HealthWorkersDto {
    #[serde(deserialize_with = "lenient::opt_u64")]
    idle: Option<u64>,
    #[serde(deserialize_with = "lenient::opt_u64")]
    running: Option<u64>,
}

impl From<HealthDto> for EndpointHealth {
    fn from(dto: HealthDto) -> Self {
        let jobs = dto.jobs.unwrap_or_default();
        let workers = dto.workers.unwrap_or_default();
        Self {
            jobs_in_queue: jobs.in_queue.unwrap_or(0),
            jobs_in_progress: jobs.in_progress.unwrap_or(0),
            jobs_completed: jobs.completed.unwrap_or(0),
            jobs_failed: jobs.failed.unwrap_or(0),
            workers_idle: workers.idle.unwrap_or(0),
            workers_running: workers.running.unwrap_or(0),
        }
    }
}

/// REST v2 `Endpoint`: what the settings need of it.
#[derive(Deserialize, Debug, Default)]
#[serde(default)]
struct RestEndpointDto {
    /// QUEUE or LOAD_BALANCER.
    #[serde(rename = "type", deserialize_with = "lenient::opt_string")]
    kind: Option<String>,
    #[serde(deserialize_with = "lenient::opt_obj")]
    workers: Option<RestWorkersDto>,
    #[serde(deserialize_with = "lenient::opt_obj")]
    scaling: Option<RestScalingDto>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(default, rename_all = "camelCase")]
struct RestWorkersDto {
    #[serde(deserialize_with = "lenient::opt_u64")]
    min: Option<u64>,
    #[serde(deserialize_with = "lenient::opt_u64")]
    max: Option<u64>,
    #[serde(deserialize_with = "lenient::opt_u64")]
    idle_timeout: Option<u64>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(default)]
struct RestScalingDto {
    #[serde(rename = "type", deserialize_with = "lenient::opt_string")]
    kind: Option<String>,
}

impl RestEndpointDto {
    /// A queue-based endpoint scaling by request count: RunPod takes no idle timeout there
    /// (load-balancing endpoints scale by request count and keep theirs).
    fn refuses_idle_timeout(&self) -> bool {
        let by_requests = self
            .scaling
            .as_ref()
            .and_then(|s| s.kind.as_deref())
            .is_some_and(|k| k.trim().eq_ignore_ascii_case("REQUEST_COUNT"));
        let load_balanced = self
            .kind
            .as_deref()
            .is_some_and(|k| k.trim().eq_ignore_ascii_case("LOAD_BALANCER"));
        by_requests && !load_balanced
    }

    fn settings(&self, endpoint_id: &str) -> ProviderResult<EndpointSettings> {
        const OP: &str = "runpod.get_endpoint";
        let workers = self.workers.as_ref();
        let int = |v: Option<u64>, field: &str| {
            v.and_then(|v| u32::try_from(v).ok()).ok_or_else(|| {
                ProviderError::Transient(format!("{OP}: endpoint without workers.{field}"))
            })
        };
        let idle = workers.and_then(|w| w.idle_timeout);
        if idle.is_none() && self.refuses_idle_timeout() {
            return Err(request_count_error(endpoint_id));
        }
        Ok(EndpointSettings {
            idle_timeout_seconds: int(idle, "idleTimeout")?,
            workers_min: int(workers.and_then(|w| w.min), "min")?,
            workers_max: int(workers.and_then(|w| w.max), "max")?,
        })
    }
}

#[derive(Deserialize, Debug, Default)]
#[serde(default)]
struct MyselfEndpointsData {
    #[serde(deserialize_with = "lenient::opt_obj")]
    myself: Option<MyselfEndpoints>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(default)]
struct MyselfEndpoints {
    /// Kept as raw objects: every field read is written back on update.
    #[serde(deserialize_with = "lenient::vec_skip_bad")]
    endpoints: Vec<Map<String, Value>>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(default, rename_all = "camelCase")]
struct SaveEndpointData {
    #[serde(deserialize_with = "lenient::opt_value")]
    save_endpoint: Option<Value>,
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::provider::runpod::classify_graphql;

    macro_rules! fixture {
        ($dir:literal, $name:literal) => {
            include_str!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/fixtures/providers/",
                $dir,
                "/",
                $name
            ))
        };
    }

    fn raw(status: u16, body: &str) -> RawResponse {
        RawResponse {
            status: StatusCode::from_u16(status).expect("status"),
            retry_after: None,
            body: Bytes::copy_from_slice(body.as_bytes()),
        }
    }

    #[test]
    fn published_job_payloads_map() {
        let r = Redactor::default();
        let run: JobDto =
            serde_json::from_str(fixture!("runpod_serverless", "run.200.json")).expect("run");
        assert_eq!(
            run.id.as_deref(),
            Some("eaebd6e7-6a92-4bb8-a911-f996ac5ea99d")
        );
        assert_eq!(
            run.status.as_deref().and_then(parse_status),
            Some(ServerlessStatus::InQueue)
        );

        let job = classify_status(
            &raw(
                200,
                fixture!("runpod_serverless", "status.completed.200.json"),
            ),
            &r,
            "x",
        )
        .expect("job");
        assert_eq!(job.id, "60902e6c-08a1-426e-9cb9-9eaec90f5e2b-u1");
        assert_eq!(job.status, ServerlessStatus::Completed);
        assert_eq!(job.delay_time_ms, Some(31618));
        assert_eq!(job.execution_time_ms, Some(1437));
        assert_eq!(
            job.output
                .as_ref()
                .and_then(|o| o["output_tokens"].as_u64()),
            Some(16)
        );
        assert_eq!(job.error, None);

        let sync = classify_status(
            &raw(200, fixture!("runpod_serverless", "runsync.200.json")),
            &r,
            "x",
        )
        .expect("sync");
        assert_eq!(
            sync.output.as_ref().and_then(|o| o[0]["seed"].as_u64()),
            Some(46578)
        );

        let cancelled = classify_status(
            &raw(200, fixture!("runpod_serverless", "cancel.200.json")),
            &r,
            "x",
        )
        .expect("cancel");
        assert_eq!(cancelled.status, ServerlessStatus::Cancelled);
        assert_eq!(
            classify_cancel(
                &raw(200, fixture!("runpod_serverless", "cancel.200.json")),
                &r
            ),
            Ok(())
        );
        let retried = classify_status(
            &raw(200, fixture!("runpod_serverless", "retry.200.json")),
            &r,
            "x",
        )
        .expect("retry");
        assert_eq!(retried.status, ServerlessStatus::InQueue);

        let health: HealthDto =
            serde_json::from_str(fixture!("runpod_serverless", "health.200.json")).expect("health");
        assert_eq!(
            EndpointHealth::from(health),
            EndpointHealth {
                jobs_in_queue: 2,
                jobs_in_progress: 0,
                jobs_completed: 1,
                jobs_failed: 5,
                workers_idle: 0,
                workers_running: 0
            }
        );
    }

    #[test]
    fn statuses() {
        for (s, want) in [
            ("IN_QUEUE", ServerlessStatus::InQueue),
            ("IN_PROGRESS", ServerlessStatus::InProgress),
            ("RUNNING", ServerlessStatus::InProgress),
            ("COMPLETED", ServerlessStatus::Completed),
            ("FAILED", ServerlessStatus::Failed),
            ("CANCELLED", ServerlessStatus::Cancelled),
            ("TIMED_OUT", ServerlessStatus::TimedOut),
        ] {
            assert_eq!(parse_status(s), Some(want), "{s}");
        }
        assert_eq!(parse_status("WHATEVER"), None);
        let r = Redactor::default();
        let failed = classify_status(
            &raw(
                200,
                r#"{"id":"j","status":"FAILED","error":{"msg":"boom"}}"#,
            ),
            &r,
            "j",
        )
        .expect("failed");
        assert_eq!(failed.error.as_deref(), Some(r#"{"msg":"boom"}"#));
        // A traceback of megabytes, quoting the key, is kept short and redacted.
        let key = Credentials::new("rp-SECRET-key");
        let r = Redactor::new([&key]);
        let body = json!({"id": "j", "status": "FAILED",
                          "error": format!("rp-SECRET-key\n{}", "x".repeat(1 << 20))});
        let failed = classify_status(&raw(200, &body.to_string()), &r, "j").expect("failed");
        let error = failed.error.expect("error");
        assert!(error.starts_with("<redacted> xxx"), "{error:.40}");
        assert_eq!(error.chars().count(), ERROR_CHARS);
        assert_eq!(
            classify_status(&raw(404, ""), &r, "j").map_err(|e| e.label()),
            Err("NotFound")
        );
        assert_eq!(
            classify_status(&raw(200, r#"{"id":"j"}"#), &r, "j").map_err(|e| e.label()),
            Err("Transient")
        );
        // An empty id is no id: the job keeps the one it was asked about.
        assert_eq!(
            classify_status(&raw(200, r#"{"id":"","status":"FAILED"}"#), &r, "j").map(|j| j.id),
            Ok("j".to_string())
        );
    }

    #[test]
    fn cancel_of_gone_or_final_jobs_is_ok() {
        let r = Redactor::default();
        assert_eq!(classify_cancel(&raw(404, "job not found"), &r), Ok(()));
        assert_eq!(
            classify_cancel(&raw(400, r#"{"error":"job is already COMPLETED"}"#), &r),
            Ok(())
        );
        assert_eq!(
            classify_cancel(&raw(400, r#"{"error":"bad id"}"#), &r).map_err(|e| e.label()),
            Err("Permanent")
        );
        assert_eq!(
            classify_cancel(&raw(401, ""), &r).map_err(|e| e.label()),
            Err("Unauthorized")
        );
    }

    #[test]
    fn published_endpoint_list_round_trips_into_save_input() {
        let data: MyselfEndpointsData = classify_graphql(
            "t",
            &raw(200, fixture!("runpod", "myself_endpoints.200.json")),
            &Redactor::default(),
        )
        .expect("data");
        let endpoint = data.myself.expect("myself").endpoints.remove(0);
        assert_eq!(
            settings_of(&endpoint),
            Ok(EndpointSettings {
                idle_timeout_seconds: 5,
                workers_min: 0,
                workers_max: 5
            })
        );
        let input = save_input(
            "i02xupws21hp6i",
            &endpoint,
            &EndpointSettings {
                idle_timeout_seconds: 300,
                workers_min: 1,
                workers_max: 4,
            },
        );
        assert_eq!(
            Value::Object(input),
            json!({
                "id": "i02xupws21hp6i", "name": "My Endpoint", "gpuIds": "AMPERE_16",
                "idleTimeout": 300, "locations": "US", "scalerType": "QUEUE_DELAY", "scalerValue": 4,
                "templateId": "YOUR_TEMPLATE_ID", "workersMax": 4, "workersMin": 1
            })
        );
        for f in [
            "save_endpoint.create.200.json",
            "save_endpoint.update.200.json",
        ] {
            let body = match f {
                "save_endpoint.create.200.json" => {
                    fixture!("runpod", "save_endpoint.create.200.json")
                }
                _ => fixture!("runpod", "save_endpoint.update.200.json"),
            };
            let saved: SaveEndpointData =
                classify_graphql("t", &raw(200, body), &Redactor::default()).expect(f);
            assert_eq!(
                saved
                    .save_endpoint
                    .and_then(|v| v["id"].as_str().map(str::to_string))
                    .as_deref(),
                Some("i02xupws21hp6i")
            );
        }
    }

    #[test]
    fn published_rest_v2_endpoints_give_the_settings() {
        use crate::provider::runpod_v2::tests::example;
        let path = "/paths/~1v2~1serverless~1{id}";
        let get: RestEndpointDto = serde_json::from_value(example(
            &format!("{path}/get/responses/200/content/application~1json"),
            "endpoint",
        ))
        .expect("get");
        // A load-balancing endpoint scaling by request count keeps its idle timeout.
        assert!(!get.refuses_idle_timeout());
        assert_eq!(
            get.settings("4m7x2k9q"),
            Ok(EndpointSettings {
                idle_timeout_seconds: 5,
                workers_min: 0,
                workers_max: 5
            })
        );
        let patched: RestEndpointDto = serde_json::from_value(example(
            &format!("{path}/patch/responses/200/content/application~1json"),
            "endpoint",
        ))
        .expect("patch");
        assert_eq!(
            patched.settings("4m7x2k9q").map(|s| s.idle_timeout_seconds),
            Ok(10)
        );
        // The published request changes the workers (and the scaling, which we never send).
        let request = example(
            &format!("{path}/patch/requestBody/content/application~1json"),
            "scaleEndpoint",
        );
        let ours = patch_body(&EndpointSettings {
            idle_timeout_seconds: 10,
            workers_min: 1,
            workers_max: 10,
        });
        assert_eq!(ours["workers"], request["workers"]);
        assert_eq!(ours.as_object().map(|o| o.len()), Some(1));

        // Queue-based by request count: no idle timeout in the answer, and a clear error.
        let queue: RestEndpointDto = serde_json::from_value(json!({
            "type": "QUEUE", "workers": {"min": 0, "max": 3},
            "scaling": {"type": "REQUEST_COUNT", "requestCount": 4}
        }))
        .expect("queue");
        assert!(queue.refuses_idle_timeout());
        let e = queue.settings("ep1").expect_err("request count");
        assert_eq!(e.label(), "Permanent");
        assert!(e.to_string().contains("REQUEST_COUNT"), "{e}");
        assert!(e.to_string().contains("manageEndpointSettings"), "{e}");
        let odd: RestEndpointDto =
            serde_json::from_value(json!({"workers": {"min": 0}})).expect("odd");
        assert_eq!(odd.settings("ep1").map_err(|e| e.label()), Err("Transient"));
    }
}
