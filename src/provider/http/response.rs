//! What came back from a provider before a vendor module gives it a meaning: the raw response,
//! the default mapping of a status to an error, `Retry-After`, reading a body up to a size
//! limit, and describing a transport error without its URL.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use reqwest::{
    StatusCode,
    header::{self, HeaderMap},
};
use serde::de::DeserializeOwned;

use super::Redactor;
use crate::provider::{ProviderError, ProviderResult};

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

#[cfg(test)]
mod tests {
    use reqwest::header::HeaderValue;

    use super::*;

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
}
