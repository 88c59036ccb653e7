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
//!
//! One concern per file: `tls` builds the `reqwest` client, `url` checks base URLs and joins
//! paths, `redact` keeps secrets out of messages, `response` reads and maps what came back,
//! `client` runs the call loop, `lenient` decodes vendor DTOs tolerantly and `money` reads
//! prices. This file holds the transport settings, the default hosts and the re-exports.

pub(crate) mod client;
pub(crate) mod lenient;
pub(crate) mod money;
pub(crate) mod redact;
pub(crate) mod response;
pub(crate) mod tls;
pub(crate) mod url;

use std::{num::NonZeroU32, time::Duration};

pub use self::url::parse_base_url;
pub(crate) use self::{
    client::{ApiClient, Call, Idempotency},
    money::{money, parse_price},
    redact::Redactor,
    response::{RawResponse, describe_transport_error, status_error},
    tls::build_reqwest,
    url::join_segments,
};
use super::{ProviderError, ProviderResult};

/// Vast.ai API host; paths are `/api/v0/...` and `/api/v1/instances/`.
pub const DEFAULT_VAST_BASE_URL: &str = "https://console.vast.ai";
/// RunPod GraphQL host; the client posts to `{base}/graphql`.
pub const DEFAULT_RUNPOD_GRAPHQL_BASE_URL: &str = "https://api.runpod.io";
/// RunPod REST v2 base, `/v2` included; the client calls `{base}/pods`, `{base}/catalog/gpus`
/// and `{base}/serverless/{endpointId}`.
pub const DEFAULT_RUNPOD_REST_V2_BASE_URL: &str = "https://api.runpod.io/v2";
/// RunPod Serverless base; the client calls `{base}/{endpointId}/run` and friends.
pub const DEFAULT_RUNPOD_SERVERLESS_BASE_URL: &str = "https://api.runpod.ai/v2";
/// RunPod's HTTPS proxy in front of `/http` pod ports; `{podId}` and `{port}` are replaced.
pub const DEFAULT_RUNPOD_PROXY_TEMPLATE: &str = "https://{podId}-{port}.proxy.runpod.net";

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

    /// RunPod REST v2 limits per user and says so in `RateLimit-Policy` (its published
    /// example: 60 a minute, 3000 an hour); 10 at once, then one a second, keeps below the
    /// minute window, and a 429's `Retry-After` is honoured past that.
    pub fn runpod_v2() -> Self {
        Self {
            rate_limit: Some(RateLimit {
                replenish_every: Duration::from_secs(1),
                burst: NonZeroU32::MIN.saturating_add(9),
            }),
            ..Self::default()
        }
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
