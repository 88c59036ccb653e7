//! Client side of the worker HTTP API (`docs/worker-api.md`): the health probe and job
//! dispatch to the worker container on a rented machine, with the outcome as a typed
//! [`WorkerError`] the controller branches on.
//!
//! What it owns: URLs, headers (`X-API-Key`, `X-Session-Token`, `X-Job-Id`), per-attempt
//! timeouts, bounded reading of bodies (a worker cannot make the operator buffer more than
//! [`WorkerClientConfig::max_output_bytes`]), and keeping the API key and session token out
//! of every error and log line. What it does not do: retry, or choose another instance; the
//! controller decides that from the error ([`WorkerError::is_retryable`],
//! [`WorkerError::instance_looks_broken`]).

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use reqwest::{
    Method, StatusCode,
    header::{self, HeaderMap, HeaderName, HeaderValue},
};
use serde_json::Value;
use tokio::time::Instant;
use tracing::{Instrument, debug, debug_span};
use url::Url;

use crate::provider::{
    Credentials,
    http::{Redactor, build_reqwest, describe_transport_error},
};

/// Header carrying the pool's worker API key.
pub const HEADER_API_KEY: &str = "x-api-key";
/// Header carrying the per-instance session token.
pub const HEADER_SESSION_TOKEN: &str = "x-session-token";
/// Header carrying `{jobUid}-{attempt}`, for de-duplication by the worker.
pub const HEADER_JOB_ID: &str = "x-job-id";

/// Longest worker error message kept, in characters.
const MESSAGE_CHARS: usize = 1000;

/// Limits and timeouts of the worker client.
#[derive(Clone, Debug, PartialEq)]
pub struct WorkerClientConfig {
    /// Time to establish the TCP (and TLS) connection.
    pub connect_timeout: Duration,
    /// Whole-request time of a health probe.
    pub health_timeout: Duration,
    /// Largest job output accepted; a longer one is [`WorkerError::OutputTooLarge`].
    pub max_output_bytes: usize,
    /// How much of an error body is read for its message; the rest is ignored.
    pub max_error_body_bytes: usize,
    pub user_agent: String,
}

impl Default for WorkerClientConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            health_timeout: Duration::from_secs(5),
            max_output_bytes: 64 * 1024,
            max_error_body_bytes: 4 * 1024,
            user_agent: concat!("gpupool/", env!("CARGO_PKG_VERSION")).to_string(),
        }
    }
}

/// Every way a call to a worker can fail.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum WorkerError {
    /// 2xx, but the body is not JSON: a worker bug. Not retried.
    #[error("worker answered HTTP {status} with a body that is not JSON: {detail}")]
    InvalidOutput { status: u16, detail: String },
    /// 401/403: wrong API key or session token. Not the job's fault; fix the configuration.
    #[error("worker refused the credentials (HTTP {status})")]
    Unauthorized { status: u16 },
    /// Other 4xx: the worker says the input is wrong. Fail the job, no retry.
    #[error("worker rejected the job (HTTP {status}): {message}")]
    Rejected { status: u16, message: String },
    /// 5xx (and 408/429, "try again"): retry.
    #[error("worker failed (HTTP {status}): {message}")]
    ServerError { status: u16, message: String },
    /// No complete answer within the attempt's timeout: retry.
    #[error("worker did not answer within {}s", .0.as_secs_f64())]
    Timeout(Duration),
    /// Refused, reset, unreachable: retry on another instance; this one looks broken.
    #[error("cannot reach the worker: {0}")]
    Connection(String),
    /// The output is longer than the limit (it was not read further). Not retried.
    #[error("worker output is larger than the {limit}-byte limit")]
    OutputTooLarge { limit: usize },
    /// The endpoint or operation cannot make a URL: a configuration or controller bug.
    #[error("invalid worker request: {0}")]
    InvalidRequest(String),
}

impl WorkerError {
    /// Whether the same job may succeed on a new attempt.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Self::ServerError { .. } | Self::Timeout(_) | Self::Connection(_)
        )
    }

    /// Whether the instance itself seems unusable (retry elsewhere, replace it).
    pub fn instance_looks_broken(&self) -> bool {
        matches!(self, Self::Connection(_))
    }

    /// Short, stable name for metrics and conditions.
    pub fn label(&self) -> &'static str {
        match self {
            Self::InvalidOutput { .. } => "InvalidOutput",
            Self::Unauthorized { .. } => "Unauthorized",
            Self::Rejected { .. } => "Rejected",
            Self::ServerError { .. } => "ServerError",
            Self::Timeout(_) => "Timeout",
            Self::Connection(_) => "Connection",
            Self::OutputTooLarge { .. } => "OutputTooLarge",
            Self::InvalidRequest(_) => "InvalidRequest",
        }
    }
}

/// One attempt of one job.
#[derive(Debug, Clone, Copy)]
pub struct Dispatch<'a> {
    /// Worker base URL, e.g. `http://203.0.113.9:41234` (from the provider).
    pub endpoint: &'a str,
    /// The VideoJob's operation: `POST {endpoint}/video/{operation}`.
    pub operation: &'a str,
    /// The job input, sent as the JSON body.
    pub input: &'a Value,
    pub job_uid: &'a str,
    /// 0 for the first attempt; `X-Job-Id` is `{job_uid}-{attempt}`.
    pub attempt: u32,
    pub session_token: &'a Credentials,
    /// Whole-attempt timeout: connect, send, wait and read the output.
    pub timeout: Duration,
}

/// Talks to workers. One per operator (per pool when pools have different API keys).
#[derive(Debug, Clone)]
pub struct WorkerClient {
    http: reqwest::Client,
    api_key: Option<Credentials>,
    config: WorkerClientConfig,
}

impl WorkerClient {
    /// `api_key`: the pool's worker API key, sent as `X-API-Key` when set.
    pub fn new(
        api_key: Option<Credentials>,
        config: WorkerClientConfig,
    ) -> Result<Self, WorkerError> {
        if let Some(key) = &api_key
            && HeaderValue::from_str(key.expose()).is_err()
        {
            return Err(WorkerError::InvalidRequest(
                "the worker API key is not a valid header value".into(),
            ));
        }
        let http = build_reqwest(config.connect_timeout, &config.user_agent)
            .map_err(WorkerError::InvalidRequest)?;
        Ok(Self {
            http,
            api_key,
            config,
        })
    }

    /// `GET {endpoint}{health_path}`: `Ok` on 2xx. Sends the same credentials as a dispatch,
    /// so a worker may protect its health path too.
    pub async fn health(
        &self,
        endpoint: &str,
        health_path: &str,
        session_token: &Credentials,
    ) -> Result<(), WorkerError> {
        let url = health_url(endpoint, health_path)?;
        let redactor = self.redactor(session_token);
        let timeout = self.config.health_timeout;
        let span = debug_span!("worker_health", host = url.host_str().unwrap_or_default());
        async {
            let request = self
                .http
                .request(Method::GET, url)
                .headers(self.headers(session_token, None)?)
                .timeout(timeout);
            let mut response = request
                .send()
                .await
                .map_err(|e| transport_error(&e, timeout, &redactor))?;
            let status = response.status();
            if status.is_success() {
                return Ok(());
            }
            let body = read_error_body(&mut response, self.config.max_error_body_bytes, &redactor)
                .await
                .map_err(|e| transport_error(&e, timeout, &redactor))?;
            Err(status_failure(status, &body, &redactor))
        }
        .instrument(span)
        .await
    }

    /// `POST {endpoint}/video/{operation}` with the input as body: the worker's JSON output.
    pub async fn dispatch(&self, job: &Dispatch<'_>) -> Result<Value, WorkerError> {
        let url = dispatch_url(job.endpoint, job.operation)?;
        let redactor = self.redactor(job.session_token);
        let job_id = format!("{}-{}", job.job_uid, job.attempt);
        let body = serde_json::to_vec(job.input)
            .map_err(|e| WorkerError::InvalidRequest(format!("cannot encode the input: {e}")))?;
        let span = debug_span!(
            "worker_dispatch",
            host = url.host_str().unwrap_or_default(),
            operation = job.operation,
            job_id = %job_id,
        );
        async {
            let started = Instant::now();
            let request = self
                .http
                .request(Method::POST, url)
                .headers(self.headers(job.session_token, Some(&job_id))?)
                .header(header::CONTENT_TYPE, "application/json")
                .timeout(job.timeout)
                .body(Bytes::from(body));
            let mut response = request
                .send()
                .await
                .map_err(|e| transport_error(&e, job.timeout, &redactor))?;
            let status = response.status();
            debug!(
                status = status.as_u16(),
                elapsed_ms = started.elapsed().as_millis() as u64,
                "worker answered"
            );
            if !status.is_success() {
                let body =
                    read_error_body(&mut response, self.config.max_error_body_bytes, &redactor)
                        .await
                        .map_err(|e| transport_error(&e, job.timeout, &redactor))?;
                return Err(status_failure(status, &body, &redactor));
            }
            let limit = self.config.max_output_bytes;
            if response
                .content_length()
                .is_some_and(|len| len > limit as u64)
            {
                return Err(WorkerError::OutputTooLarge { limit });
            }
            let (body, truncated) = read_prefix(&mut response, limit)
                .await
                .map_err(|e| transport_error(&e, job.timeout, &redactor))?;
            if truncated {
                return Err(WorkerError::OutputTooLarge { limit });
            }
            serde_json::from_slice::<Value>(&body).map_err(|e| WorkerError::InvalidOutput {
                status: status.as_u16(),
                detail: if body.iter().all(u8::is_ascii_whitespace) {
                    "empty body".into()
                } else {
                    format!(
                        "{}; body: {}",
                        redactor.redact(&e.to_string()),
                        redactor.excerpt(&body)
                    )
                },
            })
        }
        .instrument(span)
        .await
    }

    fn redactor(&self, session_token: &Credentials) -> Redactor {
        Redactor::new(self.api_key.iter().chain([session_token]))
    }

    fn headers(
        &self,
        session_token: &Credentials,
        job_id: Option<&str>,
    ) -> Result<HeaderMap, WorkerError> {
        let secret = |value: &str, what: &str| {
            let mut v = HeaderValue::from_str(value).map_err(|_| {
                WorkerError::InvalidRequest(format!("the {what} is not a valid header value"))
            })?;
            v.set_sensitive(true);
            Ok::<_, WorkerError>(v)
        };
        let mut headers = HeaderMap::new();
        headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
        if let Some(key) = &self.api_key {
            headers.insert(
                HeaderName::from_static(HEADER_API_KEY),
                secret(key.expose(), "worker API key")?,
            );
        }
        headers.insert(
            HeaderName::from_static(HEADER_SESSION_TOKEN),
            secret(session_token.expose(), "session token")?,
        );
        if let Some(job_id) = job_id {
            let v = HeaderValue::from_str(job_id).map_err(|_| {
                WorkerError::InvalidRequest("the job id is not a valid header value".into())
            })?;
            headers.insert(HeaderName::from_static(HEADER_JOB_ID), v);
        }
        Ok(headers)
    }
}

/// The worker base URL, checked: http(s), a host, no credentials, query or fragment.
fn base_url(endpoint: &str) -> Result<Url, WorkerError> {
    let url = Url::parse(endpoint.trim())
        .map_err(|e| WorkerError::InvalidRequest(format!("invalid worker endpoint: {e}")))?;
    if !matches!(url.scheme(), "http" | "https")
        || url.host_str().is_none()
        || !url.username().is_empty()
        || url.password().is_some()
        || url.query().is_some()
        || url.fragment().is_some()
    {
        return Err(WorkerError::InvalidRequest(
            "worker endpoint must be a plain http(s) URL".into(),
        ));
    }
    Ok(url)
}

fn with_segments<'a>(
    mut url: Url,
    segments: impl IntoIterator<Item = &'a str>,
) -> Result<Url, WorkerError> {
    url.path_segments_mut()
        .map_err(|_| WorkerError::InvalidRequest("worker endpoint cannot take a path".into()))?
        .pop_if_empty()
        .extend(segments);
    Ok(url)
}

/// `{endpoint}/video/{operation}`, the operation percent-encoded as one path segment.
pub fn dispatch_url(endpoint: &str, operation: &str) -> Result<Url, WorkerError> {
    if operation.is_empty() || operation == "." || operation == ".." {
        return Err(WorkerError::InvalidRequest(format!(
            "invalid operation {operation:?}"
        )));
    }
    with_segments(base_url(endpoint)?, ["video", operation])
}

/// `{endpoint}{health_path}`; the path must start with `/`.
pub fn health_url(endpoint: &str, health_path: &str) -> Result<Url, WorkerError> {
    let rest = health_path.strip_prefix('/').ok_or_else(|| {
        WorkerError::InvalidRequest(format!("health path {health_path:?} must start with /"))
    })?;
    if rest.split('/').any(|s| s == "." || s == "..") {
        return Err(WorkerError::InvalidRequest(format!(
            "invalid health path {health_path:?}"
        )));
    }
    with_segments(base_url(endpoint)?, rest.split('/'))
}

/// The meaning of a non-2xx answer.
fn status_failure(status: StatusCode, body: &[u8], redactor: &Redactor) -> WorkerError {
    let code = status.as_u16();
    match status {
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
            WorkerError::Unauthorized { status: code }
        }
        // "Busy" and "too slow" are not the input's fault.
        StatusCode::REQUEST_TIMEOUT | StatusCode::TOO_MANY_REQUESTS => WorkerError::ServerError {
            status: code,
            message: error_message(body, redactor),
        },
        s if s.is_client_error() => WorkerError::Rejected {
            status: code,
            message: error_message(body, redactor),
        },
        // 5xx, and stray 1xx/3xx (redirects are not followed): the worker misbehaved.
        _ => WorkerError::ServerError {
            status: code,
            message: error_message(body, redactor),
        },
    }
}

/// The worker's `error` (or `message`) field, else a quote of the body; redacted, bounded.
fn error_message(body: &[u8], redactor: &Redactor) -> String {
    let field = serde_json::from_slice::<Value>(body).ok().and_then(|v| {
        ["error", "message", "detail"]
            .iter()
            .find_map(|k| match v.get(*k)? {
                Value::String(s) => Some(s.clone()),
                Value::Null => None,
                other => Some(other.to_string()),
            })
    });
    match field {
        Some(text) => redactor.message(&text, MESSAGE_CHARS),
        None => redactor.excerpt(body),
    }
}

fn transport_error(e: &reqwest::Error, timeout: Duration, redactor: &Redactor) -> WorkerError {
    if e.is_timeout() {
        WorkerError::Timeout(timeout)
    } else {
        WorkerError::Connection(redactor.redact(&describe_transport_error(e, timeout)))
    }
}

/// The first `cap` bytes of an error body. When the cap cuts a secret the worker echoed, the
/// cut part goes too: redaction could not recognise half a secret.
async fn read_error_body(
    response: &mut reqwest::Response,
    cap: usize,
    redactor: &Redactor,
) -> Result<Bytes, reqwest::Error> {
    let (body, truncated) = read_prefix(response, cap).await?;
    Ok(if truncated {
        body.slice(..redactor.uncut_len(&body))
    } else {
        body
    })
}

/// Reads at most `cap` bytes; `true` when the body was longer (the rest is not read).
async fn read_prefix(
    response: &mut reqwest::Response,
    cap: usize,
) -> Result<(Bytes, bool), reqwest::Error> {
    let mut buf = BytesMut::new();
    while let Some(chunk) = response.chunk().await? {
        let room = cap - buf.len();
        if chunk.len() > room {
            buf.extend_from_slice(&chunk[..room]);
            return Ok((buf.freeze(), true));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok((buf.freeze(), false))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = dispatch_url("http://203.0.113.9:41234", "transcode").expect("url");
        assert_eq!(u.as_str(), "http://203.0.113.9:41234/video/transcode");
        let u = dispatch_url("https://abc-8000.proxy.runpod.net/", "a/b").expect("url");
        assert_eq!(u.as_str(), "https://abc-8000.proxy.runpod.net/video/a%2Fb");
        assert!(dispatch_url("http://h", "..").is_err());
        assert!(dispatch_url("ftp://h", "x").is_err());
        assert!(dispatch_url("http://u:p@h", "x").is_err());
        let u = health_url("http://h:1", "/health").expect("url");
        assert_eq!(u.as_str(), "http://h:1/health");
        let u = health_url("http://h:1/base", "/ready/now").expect("url");
        assert_eq!(u.as_str(), "http://h:1/base/ready/now");
        assert!(health_url("http://h", "health").is_err());
        assert!(health_url("http://h", "/../x").is_err());
    }

    #[test]
    fn statuses_and_messages() {
        let key = Credentials::new("tok-SECRET");
        let r = Redactor::new([&key]);
        let e = status_failure(
            StatusCode::UNPROCESSABLE_ENTITY,
            br#"{"error":"bad codec tok-SECRET"}"#,
            &r,
        );
        assert_eq!(
            e,
            WorkerError::Rejected {
                status: 422,
                message: "bad codec <redacted>".into()
            }
        );
        assert!(!e.is_retryable());
        assert_eq!(
            status_failure(StatusCode::FORBIDDEN, b"", &r).label(),
            "Unauthorized"
        );
        let e = status_failure(StatusCode::BAD_GATEWAY, b"upstream down", &r);
        assert!(e.is_retryable() && !e.instance_looks_broken());
        assert_eq!(
            status_failure(StatusCode::TOO_MANY_REQUESTS, b"", &r).label(),
            "ServerError"
        );
        assert!(WorkerError::Connection("refused".into()).instance_looks_broken());
    }
}
