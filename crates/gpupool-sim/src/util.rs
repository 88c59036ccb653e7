//! Small helpers shared by the simulator's modules: clock, ids, base64, response builders.
//!
//! Responses are built by hand rather than with `axum::Json` so the `Content-Type` is exactly
//! what the real services send (the `vastai` CLI string-compares it with `application/json`).

use std::time::Duration;

use axum::{
    body::Body,
    http::{HeaderValue, StatusCode, header},
    response::Response,
};
use jiff::Timestamp;
use rand::{Rng, rngs::StdRng};
use serde_json::{Map, Value};

/// Now, truncated to the millisecond so reported timestamps and billed time agree exactly.
pub fn now_ms() -> Timestamp {
    let ms = Timestamp::now().as_millisecond();
    Timestamp::from_millisecond(ms).unwrap_or(Timestamp::UNIX_EPOCH)
}

/// RFC 3339 with milliseconds, e.g. `2026-01-02T03:04:05.678Z`.
pub fn rfc3339(t: Timestamp) -> String {
    format!("{t:.3}")
}

/// Seconds between two timestamps (never negative).
pub fn seconds_between(from: Timestamp, to: Timestamp) -> f64 {
    let ms = to.as_millisecond() - from.as_millisecond();
    (ms.max(0) as f64) / 1000.0
}

/// Epoch seconds as a float, the way Vast reports `start_date`.
pub fn epoch_secs(t: Timestamp) -> f64 {
    t.as_millisecond() as f64 / 1000.0
}

/// A duration from configured seconds; negative, NaN or absurd values are clamped.
pub fn secs(s: f64) -> Duration {
    if s.is_finite() && s > 0.0 {
        Duration::from_secs_f64(s.min(1.0e7))
    } else {
        Duration::ZERO
    }
}

/// Cost in USD of `seconds` at `price_per_hour`.
pub fn cost(price_per_hour: f64, seconds: f64) -> f64 {
    price_per_hour / 3600.0 * seconds
}

const ALNUM: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";

/// A lowercase alphanumeric id starting with a letter (RunPod pod and machine id style).
pub fn alnum_id(rng: &mut StdRng, len: usize) -> String {
    let mut s = String::with_capacity(len);
    s.push(ALNUM[rng.random_range(0..26)] as char);
    for _ in 1..len {
        s.push(ALNUM[rng.random_range(0..ALNUM.len())] as char);
    }
    s
}

/// Random lowercase hex of `len` characters.
pub fn hex_id(rng: &mut StdRng, len: usize) -> String {
    const HEX: &[u8] = b"0123456789abcdef";
    (0..len)
        .map(|_| HEX[rng.random_range(0..16)] as char)
        .collect()
}

/// A version-4 UUID drawn from the simulator's RNG (RunPod job id style).
pub fn uuid(rng: &mut StdRng) -> String {
    let mut bytes = [0u8; 16];
    rng.fill(&mut bytes);
    uuid::Builder::from_random_bytes(bytes)
        .into_uuid()
        .to_string()
}

const B64: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding (the shape of Vast's `next_token`).
pub fn b64_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(B64[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Decodes standard or URL-safe base64, padded or not; `None` on anything else.
pub fn b64_decode(text: &str) -> Option<Vec<u8>> {
    let mut bits: u32 = 0;
    let mut nbits = 0;
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    for c in text.trim_end_matches('=').bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            _ => return None,
        };
        bits = (bits << 6) | u32::from(v);
        nbits += 6;
        if nbits >= 8 {
            nbits -= 8;
            out.push((bits >> nbits) as u8);
            bits &= (1 << nbits) - 1;
        }
    }
    Some(out)
}

/// The fields of a JSON object literal (anything else gives no fields).
pub fn object(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

/// A JSON response with `Content-Type: application/json` exactly.
pub fn json(status: StatusCode, value: &Value) -> Response {
    let body = serde_json::to_vec(value).unwrap_or_else(|_| b"null".to_vec());
    bytes_response(status, "application/json", body)
}

/// An RFC 9457 `application/problem+json` answer `{title, status, detail}` (RunPod REST v2).
pub fn problem(status: StatusCode, detail: impl Into<String>) -> Response {
    problem_with(status, detail, &[])
}

/// A problem answer that also lists the individual validation failures in `errors`.
pub fn problem_with(status: StatusCode, detail: impl Into<String>, errors: &[String]) -> Response {
    let mut v = serde_json::json!({
        "title": status.canonical_reason().unwrap_or("Error"),
        "status": status.as_u16(),
        "detail": detail.into(),
    });
    if !errors.is_empty() {
        v["errors"] = serde_json::json!(errors);
    }
    let body = serde_json::to_vec(&v).unwrap_or_default();
    bytes_response(status, "application/problem+json", body)
}

/// A plain-text response.
pub fn text(status: StatusCode, body: impl Into<String>) -> Response {
    bytes_response(status, "text/plain", body.into().into_bytes())
}

/// A response with an explicit content type.
pub fn bytes_response(status: StatusCode, content_type: &'static str, body: Vec<u8>) -> Response {
    let mut res = Response::new(Body::from(body));
    *res.status_mut() = status;
    res.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    res
}

/// Status from a number, falling back to 500 for nonsense.
pub fn status(code: u16) -> StatusCode {
    StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

/// Query-string pairs, percent-decoded (`+` is a space, as `quote_plus` sends it).
pub fn query_pairs(raw: Option<&str>) -> Vec<(String, String)> {
    raw.map(|q| {
        url::form_urlencoded::parse(q.as_bytes())
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect()
    })
    .unwrap_or_default()
}

/// The first value of a query parameter.
pub fn query_get<'a>(pairs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn base64_round_trips_and_matches_vast_example() {
        let token = "eyJ2YWx1ZXMiOiB7ImlkIjogMTIzfX0=";
        let raw = b64_decode(token).unwrap();
        assert_eq!(raw, br#"{"values": {"id": 123}}"#);
        assert_eq!(b64_encode(&raw), token);
        for n in 0..10 {
            let data: Vec<u8> = (0..n).collect();
            assert_eq!(b64_decode(&b64_encode(&data)).unwrap(), data);
        }
        assert!(b64_decode("not base64!").is_none());
    }

    #[test]
    fn ids_have_the_provider_shapes() {
        let mut rng = StdRng::seed_from_u64(7);
        let id = alnum_id(&mut rng, 14);
        assert_eq!(id.len(), 14);
        assert!(id.chars().next().unwrap().is_ascii_lowercase());
        assert_eq!(uuid(&mut rng).len(), 36);
    }

    #[test]
    fn timestamps_have_milliseconds() {
        let t = Timestamp::from_millisecond(1_700_000_000_123).unwrap();
        assert_eq!(rfc3339(t), "2023-11-14T22:13:20.123Z");
        let t0 = Timestamp::from_millisecond(1_700_000_000_000).unwrap();
        assert_eq!(rfc3339(t0), "2023-11-14T22:13:20.000Z");
        assert!((seconds_between(t0, t) - 0.123).abs() < 1e-12);
    }
}
