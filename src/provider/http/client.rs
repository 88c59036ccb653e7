//! The [`ApiClient`] of one provider entry and its call loop: the client-side quota, the
//! per-attempt request, bounded retries with back-off, and which failures may be repeated.

use std::{borrow::Cow, fmt, sync::Arc, time::Duration};

use backon::{ExponentialBuilder, Retryable};
use bytes::Bytes;
use reqwest::{
    Method, StatusCode,
    header::{self, HeaderValue},
};
use tokio::time::Instant;
use tracing::{Instrument, debug, debug_span};
use url::Url;

use super::{
    HttpConfig, RawResponse, Redactor, RetryPolicy,
    response::{ReadError, describe_transport_error, parse_retry_after, read_capped},
    tls::build_reqwest,
};
use crate::provider::{
    Credentials, ProviderError, ProviderResult,
    quota::{Lane, PriorityQuota},
};

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

impl Call<'_> {
    fn is_idempotent(&self) -> bool {
        self.idempotency == Idempotency::Idempotent
    }
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
        let redactor = self.redactor_with(secrets);
        let span = debug_span!(
            "provider_call",
            vendor = self.vendor,
            op = call.op,
            method = %call.method,
            path = %call.url.path(),
        );
        async {
            let body = encode_body(call)?;
            self.with_retries(call, body.as_ref(), &redactor, &classify)
                .await
        }
        .instrument(span)
        .await
    }

    /// The client's own redactor, or one that also knows `secrets` (built only when needed).
    fn redactor_with(&self, secrets: &[Credentials]) -> Cow<'_, Redactor> {
        if secrets.is_empty() {
            Cow::Borrowed(&self.redactor)
        } else {
            Cow::Owned(Redactor::new(std::iter::once(&self.key).chain(secrets)))
        }
    }

    /// Repeats [`Self::attempt`] while its failure is retryable, the attempts last and the
    /// next wait ends within the policy's budget; the last failure is the call's error.
    async fn with_retries<T, F>(
        &self,
        call: &Call<'_>,
        body: Option<&Bytes>,
        redactor: &Redactor,
        classify: &F,
    ) -> ProviderResult<T>
    where
        F: Fn(&RawResponse, &Redactor) -> ProviderResult<T>,
    {
        let policy = &self.config.retry;
        let started = Instant::now();
        let result = (|| self.attempt(call, body, redactor, classify))
            .retry(backoff(policy))
            .sleep(tokio::time::sleep)
            .when(|f: &Failure| f.retryable)
            .adjust(|f: &Failure, next: Option<Duration>| next_wait(policy, started, f, next))
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

    /// One attempt: a place in the quota, the request, the body (up to the size limit), and
    /// the vendor's meaning of the response.
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
        let request = self.request(call, body)?;
        let started = Instant::now();
        let mut response = request
            .send()
            .await
            .map_err(|e| self.transport_failure(call, redactor, e))?;
        let status = response.status();
        let retry_after = parse_retry_after(response.headers());
        let body = self
            .read_body(call, redactor, status, &mut response)
            .await?;
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
        classify(&raw, redactor).map_err(|error| classified_failure(call, error))
    }

    /// The request of one attempt: the API key as a sensitive bearer header, JSON accepted
    /// (and sent, with a body), and the per-attempt timeout.
    fn request(
        &self,
        call: &Call<'_>,
        body: Option<&Bytes>,
    ) -> Result<reqwest::RequestBuilder, Failure> {
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
            .timeout(self.config.request_timeout);
        if let Some(body) = body {
            request = request
                .header(header::CONTENT_TYPE, "application/json")
                .body(body.clone());
        }
        Ok(request)
    }

    /// Reads the body of a response with `status`, up to the size limit.
    async fn read_body(
        &self,
        call: &Call<'_>,
        redactor: &Redactor,
        status: StatusCode,
        response: &mut reqwest::Response,
    ) -> Result<Bytes, Failure> {
        match read_capped(response, self.config.max_response_bytes).await {
            Ok(body) => Ok(body),
            // An error status means the same whatever its body: a 401 with a huge page is
            // still a refused key, not a transient failure.
            Err(ReadError::TooLarge) if !status.is_success() => {
                Ok(Bytes::from_static(b"(body over the size limit, not read)"))
            }
            Err(ReadError::TooLarge) => Err(Failure {
                error: ProviderError::Transient(format!(
                    "{}: response larger than {} bytes",
                    call.op, self.config.max_response_bytes
                )),
                retryable: call.is_idempotent(),
            }),
            Err(ReadError::Transport(e)) => {
                let mut failure = self.transport_failure(call, redactor, e);
                failure.retryable = call.is_idempotent();
                Err(failure)
            }
        }
    }

    /// A transport error of `call`, redacted and without its URL.
    fn transport_failure(
        &self,
        call: &Call<'_>,
        redactor: &Redactor,
        e: reqwest::Error,
    ) -> Failure {
        // A connection that was never made cannot have had any effect.
        let never_sent = e.is_connect();
        let msg = redactor.redact(&describe_transport_error(&e, self.config.request_timeout));
        Failure {
            error: ProviderError::Transient(format!("{}: {msg}", call.op)),
            retryable: call.is_idempotent() || never_sent,
        }
    }
}

/// The request body of `call`, encoded once for every attempt.
fn encode_body(call: &Call<'_>) -> ProviderResult<Option<Bytes>> {
    Ok(match call.body {
        Some(v) => Some(Bytes::from(serde_json::to_vec(v).map_err(|e| {
            ProviderError::Permanent(format!("{}: cannot encode request: {e}", call.op))
        })?)),
        None => None,
    })
}

/// Exponential back-off of `policy`: `min_delay` doubling up to `max_delay`, as many retries
/// as the attempts allow after the first, with jitter if asked.
fn backoff(policy: &RetryPolicy) -> ExponentialBuilder {
    let backoff = ExponentialBuilder::default()
        .with_min_delay(policy.min_delay)
        .with_max_delay(policy.max_delay)
        .with_factor(2.0)
        .with_max_times(policy.max_attempts.saturating_sub(1) as usize);
    if policy.jitter {
        backoff.with_jitter()
    } else {
        backoff
    }
}

/// The wait before the next attempt after failure `f`, given the back-off's `next` delay
/// (`None`: no attempt left), for a call that started at `started`; `None` when the wait
/// would end after the policy's `max_total`.
fn next_wait(
    policy: &RetryPolicy,
    started: Instant,
    f: &Failure,
    next: Option<Duration>,
) -> Option<Duration> {
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
}

/// The failure the vendor's `classify` made of a response, and whether it may be repeated.
fn classified_failure(call: &Call<'_>, error: ProviderError) -> Failure {
    let retryable = match &error {
        // A 429 is a refusal: nothing happened, so even a create may be repeated.
        ProviderError::RateLimited { .. } => true,
        e => call.is_idempotent() && e.is_transient(),
    };
    Failure { error, retryable }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_lengthens_the_wait_within_the_budget() {
        let policy = RetryPolicy {
            max_total: Duration::from_secs(30),
            ..RetryPolicy::default()
        };
        let started = Instant::now();
        let limited = |after: u64| Failure {
            error: ProviderError::RateLimited {
                retry_after: Some(Duration::from_secs(after)),
            },
            retryable: true,
        };
        let second = Some(Duration::from_secs(1));
        assert_eq!(
            next_wait(&policy, started, &limited(5), second),
            Some(Duration::from_secs(5))
        );
        assert_eq!(next_wait(&policy, started, &limited(0), second), second);
        assert_eq!(next_wait(&policy, started, &limited(60), second), None);
        assert_eq!(
            next_wait(&policy, started, &limited(u64::MAX), second),
            None
        );
        assert_eq!(next_wait(&policy, started, &limited(5), None), None);
        let transient = Failure {
            error: ProviderError::Transient("op: HTTP 502".into()),
            retryable: true,
        };
        assert_eq!(next_wait(&policy, started, &transient, second), second);
    }
}
