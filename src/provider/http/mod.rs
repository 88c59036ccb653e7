//! Shared HTTP plumbing of the provider clients: one `reqwest` client per provider entry with
//! connect and per-request timeouts, a client-side quota with priority lanes for teardown
//! ([`super::quota`]), bounded retries with exponential back-off and jitter (`backon`), the
//! mapping of HTTP outcomes to
//! [`ProviderError`], and the redaction that keeps API keys out of every message.
//!
//! What it must not do:
//! * retry a call that is not idempotent after an ambiguous failure (a timeout, a 5xx, a reset
//!   after the request was sent): the machine may exist, so the caller adopts it by label
//!   instead. A refusal (429) or a connection that was never established is safe to retry;
//! * put the API key anywhere but the `Authorization` header: never in a URL, a span, a log
//!   line or an error message (bodies quoted in errors are redacted and shortened).
//!
//! The vendor modules decide what a status means for each call (a 404 is "gone" for a get,
//! "no capacity" for a Vast create, success for a delete) through the `classify` closure they
//! pass to [`ApiClient::execute`]; [`status_error`] is the default mapping.

use std::{
    fmt,
    num::NonZeroU32,
    sync::{Arc, Once},
    time::Duration,
};

use backon::{ExponentialBuilder, Retryable};
use bytes::{Bytes, BytesMut};
use reqwest::{
    Method, StatusCode,
    header::{self, HeaderMap, HeaderValue},
};
use serde::de::DeserializeOwned;
use tokio::time::Instant;
use tracing::{Instrument, debug, debug_span};
use url::Url;

use super::{
    Credentials, ProviderError, ProviderResult,
    quota::{Lane, PriorityQuota},
};

/// Vast.ai API host; paths are `/api/v0/...` and `/api/v1/instances/`.
pub const DEFAULT_VAST_BASE_URL: &str = "https://console.vast.ai";
/// RunPod GraphQL host; the client posts to `{base}/graphql`.
pub const DEFAULT_RUNPOD_GRAPHQL_BASE_URL: &str = "https://api.runpod.io";
/// RunPod Serverless base; the client calls `{base}/{endpointId}/run` and friends.
pub const DEFAULT_RUNPOD_SERVERLESS_BASE_URL: &str = "https://api.runpod.ai/v2";
/// RunPod's HTTPS proxy in front of `/http` pod ports; `{podId}` and `{port}` are replaced.
pub const DEFAULT_RUNPOD_PROXY_TEMPLATE: &str = "https://{podId}-{port}.proxy.runpod.net";

/// Longest excerpt of a response body quoted in an error message, in characters.
const EXCERPT_CHARS: usize = 200;
/// How much of a body is scanned (and redacted) to build an excerpt.
const EXCERPT_SCAN_BYTES: usize = 4096;

/// How a failed call is repeated.
#[derive(Clone, Debug, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included; 1 disables retries.
    pub max_attempts: u32,
    /// First back-off delay; each next one is twice as long, up to `max_delay`.
    pub min_delay: Duration,
    pub max_delay: Duration,
    /// Budget for the whole call (attempts and waits): no wait starts that would end after it.
    /// A call therefore ends within `max_total` plus one `request_timeout` (the attempt that
    /// started last), plus any wait for the client-side quota.
    pub max_total: Duration,
    /// Adds a random part (up to one more delay) so that clients do not retry in lockstep.
    pub jitter: bool,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 4,
            min_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(8),
            max_total: Duration::from_secs(30),
            jitter: true,
        }
    }
}

impl RetryPolicy {
    /// One attempt, no retry.
    pub fn none() -> Self {
        Self {
            max_attempts: 1,
            ..Self::default()
        }
    }
}

/// Client-side request quota: `burst` requests at once, one more every `replenish_every`.
#[derive(Clone, Debug, PartialEq)]
pub struct RateLimit {
    pub replenish_every: Duration,
    pub burst: NonZeroU32,
}

/// Transport settings of one provider client.
#[derive(Clone, Debug, PartialEq)]
pub struct HttpConfig {
    /// Time to establish a TCP (and TLS) connection.
    pub connect_timeout: Duration,
    /// Time for one whole attempt: sending, waiting and reading the body.
    pub request_timeout: Duration,
    pub retry: RetryPolicy,
    /// `None` disables client-side limiting (the provider's 429s are still honoured).
    pub rate_limit: Option<RateLimit>,
    /// Largest response body read; a longer one is an error (it is not buffered further).
    pub max_response_bytes: usize,
    pub user_agent: String,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            retry: RetryPolicy::default(),
            rate_limit: Some(RateLimit {
                replenish_every: Duration::from_millis(200),
                burst: NonZeroU32::MIN.saturating_add(9),
            }),
            max_response_bytes: 16 * 1024 * 1024,
            user_agent: concat!("gpupool/", env!("CARGO_PKG_VERSION")).to_string(),
        }
    }
}

impl HttpConfig {
    /// Vast.ai throttles per endpoint and identity and answers 429 (handled with back-off);
    /// the client-side quota only keeps a burst of reconciles from provoking that: 10 at
    /// once, then 5 a second. A tighter single bucket would delay teardown confirmations
    /// behind unrelated calls.
    pub fn vast() -> Self {
        Self::default()
    }

    /// RunPod GraphQL: no published limit; 10 at once, then 5 a second.
    pub fn runpod() -> Self {
        Self::default()
    }

    /// RunPod Serverless allows 1000 `/run` and 2000 `/status` per 10 s; stay far below.
    pub fn runpod_serverless() -> Self {
        Self {
            rate_limit: Some(RateLimit {
                replenish_every: Duration::from_millis(20),
                burst: NonZeroU32::MIN.saturating_add(19),
            }),
            ..Self::default()
        }
    }
}

/// What an instance client must know about the worker its machines run: the port to expose
/// (and to build the endpoint URL from) and the container disk to ask for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorkerShape {
    pub port: u16,
    pub disk_gb: u32,
}

impl WorkerShape {
    /// From the pool's worker spec; `Permanent` for values the API server should have refused.
    pub fn from_spec(spec: &crate::crd::WorkerSpec) -> ProviderResult<Self> {
        let port = u16::try_from(spec.port)
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| {
                ProviderError::Permanent(format!("invalid worker port {}", spec.port))
            })?;
        let disk_gb = u32::try_from(spec.container_disk_gb)
            .ok()
            .filter(|d| *d > 0)
            .ok_or_else(|| {
                ProviderError::Permanent(format!(
                    "invalid container disk {} GB",
                    spec.container_disk_gb
                ))
            })?;
        Ok(Self { port, disk_gb })
    }
}

/// Makes sure rustls has a process-wide crypto provider before reqwest builds a TLS config
/// (reqwest is built with `rustls-no-provider` and would panic otherwise). The `ring`
/// provider is the one kube already uses.
pub(crate) fn ensure_tls_provider() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        if rustls::crypto::CryptoProvider::get_default().is_none() {
            // Err only means another thread installed one first: fine.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
    });
}

/// A `reqwest` client with the given connect timeout, no redirects (a redirect could carry
/// credentials elsewhere), and no default request timeout (each call sets its own).
pub(crate) fn build_reqwest(
    connect_timeout: Duration,
    user_agent: &str,
) -> Result<reqwest::Client, String> {
    ensure_tls_provider();
    reqwest::Client::builder()
        .connect_timeout(connect_timeout)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(user_agent)
        .build()
        .map_err(|e| format!("cannot build the HTTP client: {e}"))
}

/// Parses a configured base URL: http or https, no credentials, query or fragment.
pub fn parse_base_url(what: &str, raw: &str) -> ProviderResult<Url> {
    let url = Url::parse(raw.trim())
        .map_err(|e| ProviderError::Permanent(format!("invalid {what} base URL: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(ProviderError::Permanent(format!(
            "invalid {what} base URL: scheme must be http or https"
        )));
    }
    if url.cannot_be_a_base() || url.host_str().is_none() {
        return Err(ProviderError::Permanent(format!(
            "invalid {what} base URL: no host"
        )));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(ProviderError::Permanent(format!(
            "invalid {what} base URL: credentials do not belong in a URL"
        )));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(ProviderError::Permanent(format!(
            "invalid {what} base URL: no query or fragment allowed"
        )));
    }
    Ok(url)
}

/// `base` with `segments` appended, each percent-encoded as one path segment (so an id can
/// never add a path level). An empty last segment gives a trailing slash.
pub(crate) fn join_segments(base: &Url, segments: &[&str]) -> ProviderResult<Url> {
    let mut url = base.clone();
    url.path_segments_mut()
        .map_err(|_| ProviderError::Permanent("base URL cannot take a path".into()))?
        .pop_if_empty()
        .extend(segments);
    Ok(url)
}

/// Replaces every configured secret in `text` with `<redacted>`.
#[derive(Clone, Default)]
pub(crate) struct Redactor {
    secrets: Vec<Credentials>,
}

impl fmt::Debug for Redactor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Redactor({} secrets)", self.secrets.len())
    }
}

impl Redactor {
    pub(crate) fn new<'a>(secrets: impl IntoIterator<Item = &'a Credentials>) -> Self {
        Self {
            secrets: secrets
                .into_iter()
                .filter(|s| !s.expose().is_empty())
                .cloned()
                .collect(),
        }
    }

    pub(crate) fn redact(&self, text: &str) -> String {
        let mut out = text.to_string();
        for secret in &self.secrets {
            if out.contains(secret.expose()) {
                out = out.replace(secret.expose(), "<redacted>");
            }
        }
        out
    }

    /// A provider's or worker's own message, kept for the user: redacted, on one line, at
    /// most `max_chars` characters.
    pub(crate) fn message(&self, text: &str, max_chars: usize) -> String {
        let clean: String = self
            .redact(text)
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .take(max_chars)
            .collect();
        clean.trim().to_string()
    }

    /// A short, single-line, redacted quote of a body for an error message. Redaction runs
    /// before truncation so that a cut can never leave part of a secret behind.
    pub(crate) fn excerpt(&self, body: &[u8]) -> String {
        let scanned = &body[..self.scan_end(body)];
        let text = String::from_utf8_lossy(scanned);
        let redacted = self.redact(&text);
        let mut out = String::with_capacity(EXCERPT_CHARS + 3);
        let mut last_space = false;
        for c in redacted.chars() {
            let c = if c.is_control() || c.is_whitespace() {
                ' '
            } else {
                c
            };
            if c == ' ' && (last_space || out.is_empty()) {
                continue;
            }
            last_space = c == ' ';
            if out.chars().count() >= EXCERPT_CHARS {
                out.push('…');
                break;
            }
            out.push(c);
        }
        let trimmed = out.trim_end().to_string();
        if trimmed.is_empty() {
            "<empty body>".into()
        } else {
            trimmed
        }
    }

    /// The length of `prefix`, a body cut at a limit, without a trailing start of a secret:
    /// redaction cannot recognise a secret whose end was not read.
    pub(crate) fn uncut_len(&self, prefix: &[u8]) -> usize {
        let cut = self
            .secrets
            .iter()
            .filter_map(|secret| {
                let secret = secret.expose().as_bytes();
                (1..secret.len())
                    .rev()
                    .find(|&k| prefix.ends_with(&secret[..k]))
            })
            .max()
            .unwrap_or(0);
        prefix.len() - cut
    }

    /// Where an excerpt stops scanning `body`: at [`EXCERPT_SCAN_BYTES`], or just past a
    /// secret that straddles that point, so that redaction sees the whole of it. (Blanks
    /// collapse, so a body of 4000 spaces shows the end of the scanned window.)
    fn scan_end(&self, body: &[u8]) -> usize {
        let mut end = body.len().min(EXCERPT_SCAN_BYTES);
        loop {
            let before = end;
            for secret in &self.secrets {
                let secret = secret.expose().as_bytes();
                let first = end.saturating_sub(secret.len() - 1);
                if let Some(at) = body[first..]
                    .windows(secret.len())
                    .take(end - first)
                    .position(|w| w == secret)
                {
                    end = end.max(first + at + secret.len());
                }
            }
            if end == before {
                return end;
            }
        }
    }
}

/// Whether a call may be repeated after an ambiguous failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Idempotency {
    /// Reads, deletes, full-replace updates: repeat on any transient failure.
    Idempotent,
    /// Creates: repeat only when the provider certainly did nothing (429, no connection).
    NotIdempotent,
}

/// One call, as the vendor module describes it.
pub(crate) struct Call<'a> {
    /// Short operation name for spans and messages, e.g. `"vast.get_instance"`.
    pub op: &'static str,
    pub method: Method,
    pub url: Url,
    pub body: Option<&'a serde_json::Value>,
    pub idempotency: Idempotency,
}

/// What came back, before the vendor gives it a meaning.
#[derive(Debug)]
pub(crate) struct RawResponse {
    pub status: StatusCode,
    pub retry_after: Option<Duration>,
    pub body: Bytes,
}

impl RawResponse {
    pub(crate) fn is_success(&self) -> bool {
        self.status.is_success()
    }

    /// Decodes the body as `T`; a body that is not what was expected is a transient error
    /// (for a create it is also ambiguous: the call may have taken effect).
    pub(crate) fn json<T: DeserializeOwned>(
        &self,
        op: &str,
        redactor: &Redactor,
    ) -> ProviderResult<T> {
        serde_json::from_slice(&self.body).map_err(|e| {
            ProviderError::Transient(format!(
                "{op}: unexpected response (HTTP {}): {}; body: {}",
                self.status.as_u16(),
                // serde quotes the offending value, which may be megabytes long.
                redactor.excerpt(e.to_string().as_bytes()),
                redactor.excerpt(&self.body)
            ))
        })
    }
}

/// Default meaning of a non-2xx status: 429 → RateLimited, 401/403 → Unauthorized,
/// 404 → NotFound, 408 and 5xx → Transient, other 4xx (and stray 1xx/3xx) → Permanent.
pub(crate) fn status_error(op: &str, raw: &RawResponse, redactor: &Redactor) -> ProviderError {
    let excerpt = redactor.excerpt(&raw.body);
    let code = raw.status.as_u16();
    let msg = format!("{op}: HTTP {code}: {excerpt}");
    match raw.status {
        StatusCode::TOO_MANY_REQUESTS => ProviderError::RateLimited {
            retry_after: raw.retry_after,
        },
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => ProviderError::Unauthorized(msg),
        StatusCode::NOT_FOUND => ProviderError::NotFound(msg),
        StatusCode::REQUEST_TIMEOUT => ProviderError::Transient(msg),
        s if s.is_server_error() => ProviderError::Transient(msg),
        _ => ProviderError::Permanent(msg),
    }
}

/// `Retry-After` as delta-seconds or an HTTP date; `None` when absent or unreadable.
pub(crate) fn parse_retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(header::RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    if let Ok(secs) = value.parse::<f64>() {
        // Refuses what no Duration holds (negative, NaN, 1e300) instead of panicking.
        return Duration::try_from_secs_f64(secs).ok();
    }
    let at = jiff::fmt::rfc2822::parse(value).ok()?.timestamp();
    let delta = at.duration_since(jiff::Timestamp::now());
    Some(Duration::try_from(delta).unwrap_or(Duration::ZERO))
}

/// Reads at most `cap` bytes of a response body, chunk by chunk. `Err(true)` when the body is
/// longer (the rest is not read), `Err(false)` on a transport error.
pub(crate) async fn read_capped(
    resp: &mut reqwest::Response,
    cap: usize,
) -> Result<Bytes, ReadError> {
    if let Some(len) = resp.content_length()
        && len > cap as u64
    {
        return Err(ReadError::TooLarge);
    }
    let mut buf = BytesMut::new();
    loop {
        match resp.chunk().await {
            Ok(Some(chunk)) => {
                if buf.len() + chunk.len() > cap {
                    return Err(ReadError::TooLarge);
                }
                buf.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(buf.freeze()),
            Err(e) => return Err(ReadError::Transport(e)),
        }
    }
}

#[derive(Debug)]
pub(crate) enum ReadError {
    TooLarge,
    Transport(reqwest::Error),
}

/// Describes a transport error without its URL (which `reqwest` would otherwise print).
pub(crate) fn describe_transport_error(e: &reqwest::Error, timeout: Duration) -> String {
    if e.is_timeout() {
        return format!("timed out after {:.1}s", timeout.as_secs_f64());
    }
    let mut kind = if e.is_connect() {
        "connection failed"
    } else if e.is_body() || e.is_decode() {
        "reading the response failed"
    } else if e.is_request() {
        "sending the request failed"
    } else {
        "transport error"
    }
    .to_string();
    // The innermost cause says what happened ("connection refused"); the outer layers of a
    // reqwest error repeat the URL, which the caller already knows.
    let mut source = std::error::Error::source(e);
    let mut innermost = None;
    while let Some(s) = source {
        innermost = Some(s.to_string());
        source = s.source();
    }
    if let Some(cause) = innermost {
        kind.push_str(": ");
        kind.push_str(&cause);
    }
    kind
}

/// One failed attempt and whether it may be repeated.
struct Failure {
    error: ProviderError,
    retryable: bool,
}

/// The HTTP client of one provider entry: credentials, transport settings, quota.
pub(crate) struct ApiClient {
    vendor: &'static str,
    http: reqwest::Client,
    key: Credentials,
    config: HttpConfig,
    limiter: Option<Arc<PriorityQuota>>,
    redactor: Redactor,
}

impl fmt::Debug for ApiClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiClient")
            .field("vendor", &self.vendor)
            .field("key", &self.key)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl ApiClient {
    pub(crate) fn new(
        vendor: &'static str,
        key: Credentials,
        config: HttpConfig,
    ) -> ProviderResult<Self> {
        if key.expose().trim().is_empty() {
            return Err(ProviderError::Unauthorized(format!(
                "{vendor}: the API key is empty"
            )));
        }
        // The key goes into a header: refuse what would make an invalid or split header.
        if HeaderValue::from_str(&format!("Bearer {}", key.expose())).is_err() {
            return Err(ProviderError::Unauthorized(format!(
                "{vendor}: the API key contains characters not allowed in a header"
            )));
        }
        let http = build_reqwest(config.connect_timeout, &config.user_agent)
            .map_err(ProviderError::Permanent)?;
        let limiter = match &config.rate_limit {
            None => None,
            Some(limit) => {
                let quota =
                    PriorityQuota::new(limit.replenish_every, limit.burst).ok_or_else(|| {
                        ProviderError::Permanent(format!(
                            "{vendor}: rate limit period must be greater than zero"
                        ))
                    })?;
                Some(Arc::new(quota))
            }
        };
        let redactor = Redactor::new([&key]);
        Ok(Self {
            vendor,
            http,
            key,
            config,
            limiter,
            redactor,
        })
    }

    /// Runs `call` with the rate limit, timeouts and retry policy, giving each response to
    /// `classify`; transient errors are retried as the call's idempotency allows.
    pub(crate) async fn execute<T, F>(&self, call: &Call<'_>, classify: F) -> ProviderResult<T>
    where
        F: Fn(&RawResponse, &Redactor) -> ProviderResult<T>,
    {
        self.execute_with_secrets(call, &[], classify).await
    }

    /// [`Self::execute`] for a call whose body carries secrets besides the API key (a create
    /// passes the worker's session token and API key in its environment): a provider that
    /// echoes the request into an error must not put them in a message either.
    pub(crate) async fn execute_with_secrets<T, F>(
        &self,
        call: &Call<'_>,
        secrets: &[Credentials],
        classify: F,
    ) -> ProviderResult<T>
    where
        F: Fn(&RawResponse, &Redactor) -> ProviderResult<T>,
    {
        let with_secrets;
        let redactor = if secrets.is_empty() {
            &self.redactor
        } else {
            with_secrets = Redactor::new(std::iter::once(&self.key).chain(secrets));
            &with_secrets
        };
        let span = debug_span!(
            "provider_call",
            vendor = self.vendor,
            op = call.op,
            method = %call.method,
            path = %call.url.path(),
        );
        async {
            let body = match call.body {
                Some(v) => Some(Bytes::from(serde_json::to_vec(v).map_err(|e| {
                    ProviderError::Permanent(format!("{}: cannot encode request: {e}", call.op))
                })?)),
                None => None,
            };
            let policy = &self.config.retry;
            let started = Instant::now();
            let mut backoff = ExponentialBuilder::default()
                .with_min_delay(policy.min_delay)
                .with_max_delay(policy.max_delay)
                .with_factor(2.0)
                .with_max_times(policy.max_attempts.saturating_sub(1) as usize);
            if policy.jitter {
                backoff = backoff.with_jitter();
            }
            let result = (|| self.attempt(call, body.as_ref(), redactor, &classify))
                .retry(backoff)
                .sleep(tokio::time::sleep)
                .when(|f: &Failure| f.retryable)
                .adjust(|f: &Failure, next: Option<Duration>| {
                    let next = next?;
                    // A provider's Retry-After beats our own guess when it is longer.
                    let wait = match &f.error {
                        ProviderError::RateLimited {
                            retry_after: Some(after),
                        } => next.max(*after),
                        _ => next,
                    };
                    // Checked: a Retry-After of u64::MAX seconds must not overflow.
                    let ends = started.elapsed().checked_add(wait)?;
                    (ends <= policy.max_total).then_some(wait)
                })
                .notify(|f: &Failure, wait: Duration| {
                    debug!(
                        error = f.error.label(),
                        wait_ms = wait.as_millis() as u64,
                        "retrying after back-off"
                    );
                })
                .await;
            result.map_err(|f| f.error)
        }
        .instrument(span)
        .await
    }

    async fn attempt<T, F>(
        &self,
        call: &Call<'_>,
        body: Option<&Bytes>,
        redactor: &Redactor,
        classify: &F,
    ) -> Result<T, Failure>
    where
        F: Fn(&RawResponse, &Redactor) -> ProviderResult<T>,
    {
        if let Some(limiter) = &self.limiter {
            limiter.acquire(Lane::current()).await;
        }
        let idempotent = call.idempotency == Idempotency::Idempotent;
        let timeout = self.config.request_timeout;
        let mut auth =
            HeaderValue::from_str(&format!("Bearer {}", self.key.expose())).map_err(|_| {
                Failure {
                    error: ProviderError::Unauthorized(format!(
                        "{}: the API key is not a valid header value",
                        self.vendor
                    )),
                    retryable: false,
                }
            })?;
        auth.set_sensitive(true);
        let mut request = self
            .http
            .request(call.method.clone(), call.url.clone())
            .header(header::AUTHORIZATION, auth)
            .header(header::ACCEPT, "application/json")
            .timeout(timeout);
        if let Some(body) = body {
            request = request
                .header(header::CONTENT_TYPE, "application/json")
                .body(body.clone());
        }
        let started = Instant::now();
        let transport_failure = |e: reqwest::Error| {
            // A connection that was never made cannot have had any effect.
            let never_sent = e.is_connect();
            let msg = redactor.redact(&describe_transport_error(&e, timeout));
            Failure {
                error: ProviderError::Transient(format!("{}: {msg}", call.op)),
                retryable: idempotent || never_sent,
            }
        };
        let mut response = request.send().await.map_err(&transport_failure)?;
        let status = response.status();
        let retry_after = parse_retry_after(response.headers());
        let body = match read_capped(&mut response, self.config.max_response_bytes).await {
            Ok(body) => body,
            // An error status means the same whatever its body: a 401 with a huge page is
            // still a refused key, not a transient failure.
            Err(ReadError::TooLarge) if !status.is_success() => {
                Bytes::from_static(b"(body over the size limit, not read)")
            }
            Err(ReadError::TooLarge) => {
                return Err(Failure {
                    error: ProviderError::Transient(format!(
                        "{}: response larger than {} bytes",
                        call.op, self.config.max_response_bytes
                    )),
                    retryable: idempotent,
                });
            }
            Err(ReadError::Transport(e)) => {
                let mut failure = transport_failure(e);
                failure.retryable = idempotent;
                return Err(failure);
            }
        };
        debug!(
            status = status.as_u16(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            bytes = body.len(),
            "provider response"
        );
        let raw = RawResponse {
            status,
            retry_after,
            body,
        };
        classify(&raw, redactor).map_err(|error| {
            let retryable = match &error {
                // A 429 is a refusal: nothing happened, so even a create may be repeated.
                ProviderError::RateLimited { .. } => true,
                e => idempotent && e.is_transient(),
            };
            Failure { error, retryable }
        })
    }
}

/// Tolerant field decoders for the vendor DTOs: a field of an unexpected type becomes `None`
/// instead of failing the whole object (and with it a whole list).
pub(crate) mod lenient {
    use serde::{Deserialize, Deserializer, de::DeserializeOwned};
    use serde_json::Value;

    pub(crate) fn opt_f64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
        Ok(match Value::deserialize(d)? {
            Value::Number(n) => n.as_f64().filter(|f| f.is_finite()),
            Value::String(s) => s.trim().parse::<f64>().ok().filter(|f| f.is_finite()),
            _ => None,
        })
    }

    pub(crate) fn opt_u64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        Ok(match Value::deserialize(d)? {
            Value::Number(n) => n.as_u64().or_else(|| {
                n.as_f64()
                    .filter(|f| f.is_finite() && *f >= 0.0 && f.fract() == 0.0)
                    .map(|f| f as u64)
            }),
            Value::String(s) => s.trim().parse::<u64>().ok(),
            _ => None,
        })
    }

    /// Strings, and numbers rendered as strings (ids are numbers on Vast, strings on RunPod).
    pub(crate) fn opt_string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
        Ok(match Value::deserialize(d)? {
            Value::String(s) => Some(s),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        })
    }

    pub(crate) fn opt_bool<'de, D: Deserializer<'de>>(d: D) -> Result<Option<bool>, D::Error> {
        Ok(match Value::deserialize(d)? {
            Value::Bool(b) => Some(b),
            Value::Number(n) => n.as_i64().map(|i| i != 0),
            Value::String(s) => match s.trim().to_ascii_lowercase().as_str() {
                "true" | "1" => Some(true),
                "false" | "0" => Some(false),
                _ => None,
            },
            _ => None,
        })
    }

    /// Any JSON except `null`.
    pub(crate) fn opt_value<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
        Ok(match Value::deserialize(d)? {
            Value::Null => None,
            v => Some(v),
        })
    }

    /// A nested object that does not decode becomes `None`.
    pub(crate) fn opt_obj<'de, D: Deserializer<'de>, T: DeserializeOwned>(
        d: D,
    ) -> Result<Option<T>, D::Error> {
        Ok(match Value::deserialize(d)? {
            Value::Null => None,
            v => serde_json::from_value(v).ok(),
        })
    }

    /// A list whose elements that do not decode are skipped; anything but a list is empty.
    pub(crate) fn vec_skip_bad<'de, D: Deserializer<'de>, T: DeserializeOwned>(
        d: D,
    ) -> Result<Vec<T>, D::Error> {
        Ok(match Value::deserialize(d)? {
            Value::Array(items) => items
                .into_iter()
                .filter_map(|v| serde_json::from_value(v).ok())
                .collect(),
            _ => Vec::new(),
        })
    }
}

/// Money from a float on the wire, rounded to 6 decimals (the CRD's precision).
pub(crate) fn money(value: f64) -> Option<rust_decimal::Decimal> {
    if !value.is_finite() || value < 0.0 {
        return None;
    }
    rust_decimal::Decimal::try_from(value)
        .ok()
        .map(|d| d.round_dp(6).normalize())
}

/// A price string of the CRD (`"0.25"`), validated as a positive decimal.
pub(crate) fn parse_price(what: &str, raw: &str) -> ProviderResult<rust_decimal::Decimal> {
    let price: rust_decimal::Decimal = raw
        .trim()
        .parse()
        .map_err(|_| ProviderError::Permanent(format!("{what}: {raw:?} is not a decimal")))?;
    if price <= rust_decimal::Decimal::ZERO {
        return Err(ProviderError::Permanent(format!(
            "{what}: must be greater than zero"
        )));
    }
    Ok(price)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn excerpt_redacts_before_truncating_and_flattens() {
        let key = Credentials::new("sk-SECRET-123");
        let r = Redactor::new([&key]);
        let body = format!(
            "{{\"error\":\"bad key sk-SECRET-123\"}}\n\n{}",
            "x".repeat(500)
        );
        let e = r.excerpt(body.as_bytes());
        assert!(!e.contains("SECRET"), "{e}");
        assert!(e.contains("<redacted>"));
        assert!(!e.contains('\n'));
        assert!(e.chars().count() <= EXCERPT_CHARS + 1);
        assert_eq!(r.excerpt(b"  \n "), "<empty body>");
    }

    #[test]
    fn secret_straddling_the_excerpt_end_is_not_shown() {
        let key = Credentials::new("sk-SECRET-123");
        let r = Redactor::new([&key]);
        let body = format!("{}sk-SECRET-123", "a".repeat(EXCERPT_CHARS - 3));
        let e = r.excerpt(body.as_bytes());
        assert!(!e.contains("sk-"), "{e}");
    }

    #[test]
    fn secret_straddling_the_scan_limit_is_not_shown() {
        let key = Credentials::new("sk-SECRET-123");
        let r = Redactor::new([&key]);
        // Blanks collapse, so the excerpt reaches the end of the scanned window.
        for pad in EXCERPT_SCAN_BYTES - 13..=EXCERPT_SCAN_BYTES {
            let body = format!("{}sk-SECRET-123 tail", " ".repeat(pad));
            let e = r.excerpt(body.as_bytes());
            assert!(!e.contains("sk-"), "{pad}: {e}");
        }
        let body = format!("{}sk-SECRET-123", "\n".repeat(EXCERPT_SCAN_BYTES - 5));
        assert_eq!(r.excerpt(body.as_bytes()), "<redacted>");
    }

    #[test]
    fn a_cut_secret_is_dropped_from_a_prefix() {
        let key = Credentials::new("sk-SECRET-123");
        let r = Redactor::new([&key]);
        assert_eq!(r.uncut_len(b"error: sk-SEC"), 7);
        assert_eq!(r.uncut_len(b"error: s"), 7);
        assert_eq!(r.uncut_len(b"error: sk-SECRET-123"), 20);
        assert_eq!(r.uncut_len(b"error: none"), 11);
    }

    #[test]
    fn messages_are_redacted_flattened_and_bounded() {
        let key = Credentials::new("sk-SECRET-123");
        let r = Redactor::new([&key]);
        let m = r.message(&format!(" bad\nkey sk-SECRET-123 {}", "é".repeat(5000)), 50);
        assert!(m.starts_with("bad key <redacted> éé"), "{m}");
        assert_eq!(m.chars().count(), 49);
    }

    #[test]
    fn retry_after_seconds_and_dates() {
        let mut h = HeaderMap::new();
        assert_eq!(parse_retry_after(&h), None);
        h.insert(header::RETRY_AFTER, HeaderValue::from_static("7"));
        assert_eq!(parse_retry_after(&h), Some(Duration::from_secs(7)));
        h.insert(
            header::RETRY_AFTER,
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(parse_retry_after(&h), Some(Duration::ZERO));
        h.insert(header::RETRY_AFTER, HeaderValue::from_static("soon"));
        assert_eq!(parse_retry_after(&h), None);
        // Past what a Duration holds: no hint rather than a panic.
        for huge in ["1e300", "99999999999999999999", "-1.5", "NaN", "inf"] {
            h.insert(header::RETRY_AFTER, HeaderValue::from_static(huge));
            assert_eq!(parse_retry_after(&h), None, "{huge}");
        }
        h.insert(header::RETRY_AFTER, HeaderValue::from_static("0.25"));
        assert_eq!(parse_retry_after(&h), Some(Duration::from_millis(250)));
    }

    #[test]
    fn status_mapping() {
        let r = Redactor::default();
        let raw = |code: u16| RawResponse {
            status: StatusCode::from_u16(code).unwrap_or(StatusCode::IM_A_TEAPOT),
            retry_after: Some(Duration::from_secs(3)),
            body: Bytes::from_static(b"{}"),
        };
        assert_eq!(
            status_error("op", &raw(429), &r),
            ProviderError::RateLimited {
                retry_after: Some(Duration::from_secs(3))
            }
        );
        assert_eq!(status_error("op", &raw(401), &r).label(), "Unauthorized");
        assert_eq!(status_error("op", &raw(403), &r).label(), "Unauthorized");
        assert_eq!(status_error("op", &raw(404), &r).label(), "NotFound");
        assert_eq!(status_error("op", &raw(502), &r).label(), "Transient");
        assert_eq!(status_error("op", &raw(400), &r).label(), "Permanent");
        assert_eq!(status_error("op", &raw(302), &r).label(), "Permanent");
    }

    #[test]
    fn base_urls_are_checked_and_segments_escaped() {
        assert!(parse_base_url("x", "ftp://h").is_err());
        assert!(parse_base_url("x", "https://user:pw@h").is_err());
        assert!(parse_base_url("x", "https://h/?api_key=1").is_err());
        let base =
            parse_base_url("x", "https://api.runpod.ai/v2").unwrap_or_else(|e| panic!("{e}"));
        let url = join_segments(&base, &["ab/../c", "run"]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(url.as_str(), "https://api.runpod.ai/v2/ab%2F..%2Fc/run");
        let base = parse_base_url("x", "http://127.0.0.1:1/").unwrap_or_else(|e| panic!("{e}"));
        let url = join_segments(&base, &["api", "v0", "instances", "7", ""])
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(url.as_str(), "http://127.0.0.1:1/api/v0/instances/7/");
    }

    #[test]
    fn money_rounds_and_refuses_nonsense() {
        assert_eq!(
            money(0.2345678).map(|d| d.to_string()),
            Some("0.234568".into())
        );
        assert_eq!(money(f64::NAN), None);
        assert_eq!(money(-1.0), None);
        assert!(parse_price("p", "0").is_err());
        assert!(parse_price("p", "abc").is_err());
        assert_eq!(
            parse_price("p", "0.25").map(|d| d.to_string()).ok(),
            Some("0.25".into())
        );
    }
}
