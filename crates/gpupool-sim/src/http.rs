//! Cross-cutting HTTP behaviour of every simulated API: the call log, authentication, and
//! the injected faults (latency, hang, 429, errors) in each provider's own error shape.
//!
//! Handlers name their operation in an [`OpSlot`] the logging middleware put in the request;
//! the middleware records the call when the response is sent, or with status 0 when none
//! ever is (a hang, or a connection dropped by a dying worker). Only the path is logged:
//! query strings can carry `api_key`.

use std::{
    sync::{Arc, Mutex},
    time::Instant,
};

use axum::{
    extract::{Request, State},
    http::{HeaderMap, StatusCode},
    middleware::Next,
    response::Response,
};
use serde_json::json;

use super::{
    faults, serve,
    state::{CallRecord, Sim},
    util,
};

/// Where a handler writes the name of the operation it serves (and the instance, if any).
#[derive(Clone, Default)]
pub struct OpSlot(Arc<Mutex<(Option<String>, Option<String>)>>);

impl OpSlot {
    pub fn set(&self, op: impl Into<String>) {
        if let Ok(mut g) = self.0.lock() {
            g.0 = Some(op.into());
        }
    }

    pub fn set_instance(&self, id: impl Into<String>) {
        if let Ok(mut g) = self.0.lock() {
            g.1 = Some(id.into());
        }
    }

    fn take(&self) -> (Option<String>, Option<String>) {
        self.0.lock().map(|g| g.clone()).unwrap_or_default()
    }
}

/// Records the call when dropped: with the response status, or 0 if there was none.
struct CallGuard {
    sim: Arc<Sim>,
    method: String,
    path: String,
    slot: OpSlot,
    started: Instant,
    status: u16,
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        let (op, instance) = self.slot.take();
        let rec = CallRecord {
            time: util::now_ms(),
            method: std::mem::take(&mut self.method),
            path: std::mem::take(&mut self.path),
            operation: op.unwrap_or_else(|| "unmatched".into()),
            status: self.status,
            instance,
            duration_ms: self.started.elapsed().as_millis() as u64,
        };
        self.sim.lock().calls.record(rec);
    }
}

/// Middleware: gives the request an [`OpSlot`] and logs the call (admin calls are not logged).
pub async fn record_calls(State(sim): State<Arc<Sim>>, mut req: Request, next: Next) -> Response {
    let path = req.uri().path().to_string();
    if path.starts_with("/admin") {
        return next.run(req).await;
    }
    let slot = OpSlot::default();
    req.extensions_mut().insert(slot.clone());
    let mut guard = CallGuard {
        sim,
        method: req.method().to_string(),
        path,
        slot,
        started: Instant::now(),
        status: 0,
    };
    let res = next.run(req).await;
    guard.status = res.status().as_u16();
    res
}

/// Which API family answers, so faults come back in that family's error shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    Vast,
    Graphql,
    Rest,
    /// RunPod REST v2: `application/problem+json` errors, Bearer keys only.
    RestV2,
    Serverless,
    Worker,
}

/// The API key a request carries: `Authorization: Bearer K`, a bare `Authorization: K`
/// (RunPod's serverless docs show it), or `?api_key=K`.
pub fn provided_key(headers: &HeaderMap, query: &[(String, String)]) -> Option<String> {
    let header = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty());
    if let Some(h) = header {
        let key = match h.split_once(' ') {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("bearer") => rest.trim(),
            _ => h,
        };
        return Some(key.to_string());
    }
    util::query_get(query, "api_key")
        .filter(|k| !k.is_empty())
        .map(str::to_string)
}

/// The key of an `Authorization: Bearer K` header, the only form RunPod REST v2 takes.
pub fn bearer_key(headers: &HeaderMap) -> Option<String> {
    let h = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())?
        .trim();
    match h.split_once(' ') {
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("bearer") => {
            Some(rest.trim().to_string()).filter(|k| !k.is_empty())
        }
        _ => None,
    }
}

/// Whether `key` is accepted: any non-empty key when the list is empty, else a listed one.
pub fn key_accepted(accepted: &[String], key: Option<&str>) -> bool {
    match key {
        None | Some("") => false,
        Some(k) => accepted.is_empty() || accepted.iter().any(|a| a == k),
    }
}

/// The 401 of each family.
pub fn unauthorized(family: Family) -> Response {
    match family {
        Family::Vast => util::json(
            StatusCode::UNAUTHORIZED,
            &json!({"success": false, "error": "auth_error", "msg": "Invalid user key"}),
        ),
        Family::Graphql => util::json(
            StatusCode::UNAUTHORIZED,
            &json!({"errors": [{"message": "Unauthorized", "extensions": {"code": "UNAUTHENTICATED"}}]}),
        ),
        Family::Rest => util::json(
            StatusCode::UNAUTHORIZED,
            &json!({"message": "Unauthorized: a valid API key is required"}),
        ),
        Family::RestV2 => util::problem(
            StatusCode::UNAUTHORIZED,
            "a valid API key is required as Authorization: Bearer <key>",
        ),
        Family::Serverless => {
            util::json(StatusCode::UNAUTHORIZED, &json!({"error": "Unauthorized"}))
        }
        Family::Worker => util::json(StatusCode::UNAUTHORIZED, &json!({"error": "unauthorized"})),
    }
}

/// Vast's documented per-endpoint thresholds, quoted in its 429 messages.
fn vast_threshold(op: &str) -> &'static str {
    match op {
        "vast.create" => "4.5",
        "vast.show" => "2.0",
        "vast.destroy" => "3.0",
        _ => "1.0",
    }
}

/// A 429 in the family's shape, with `Retry-After` when the trigger sets one (REST v2: 1 s
/// unless the trigger says otherwise, `0` for none).
pub fn rate_limited(family: Family, op: &str, trigger: &faults::Trigger) -> Response {
    let default = if family == Family::RestV2 { 1 } else { 0 };
    let mut res = rate_limited_body(family, op, trigger.body.as_deref());
    let seconds = trigger.retry_after.unwrap_or(default);
    if seconds > 0 {
        res.headers_mut()
            .insert(axum::http::header::RETRY_AFTER, seconds.into());
    }
    res
}

/// The body of a 429 in the family's shape.
fn rate_limited_body(family: Family, op: &str, body: Option<&str>) -> Response {
    let code = StatusCode::TOO_MANY_REQUESTS;
    match family {
        Family::Vast => {
            let default = match op {
                "vast.search" => "plain",
                "vast.destroy" => "json",
                _ => "detail",
            };
            let msg = format!(
                "API requests too frequent endpoint threshold={}",
                vast_threshold(op)
            );
            match body.unwrap_or(default) {
                "plain" => util::text(code, "API requests too frequent"),
                "plain_threshold" => util::text(code, msg),
                "json" => util::json(
                    code,
                    &json!({"success": false, "error": "rate_limit_exceeded", "msg": msg}),
                ),
                _ => util::json(code, &json!({"detail": msg})),
            }
        }
        Family::Graphql => util::json(
            code,
            &json!({"errors": [{"message": "Too many requests. Please slow down.", "extensions": {"code": "TOO_MANY_REQUESTS"}}]}),
        ),
        Family::Rest => util::json(code, &json!({"message": "Too Many Requests"})),
        Family::RestV2 => util::problem(code, "rate limit exceeded (simulated fault)"),
        Family::Serverless => util::json(code, &json!({"error": "Too Many Requests"})),
        Family::Worker => util::json(code, &json!({"error": "too many requests"})),
    }
}

/// A server error (default 500) in the family's shape.
pub fn server_error(family: Family, status: Option<u16>) -> Response {
    let code = util::status(status.unwrap_or(500));
    match family {
        Family::Vast => util::json(
            code,
            &json!({"success": false, "error": "server_error", "msg": "Internal server error (simulated fault)"}),
        ),
        Family::Graphql => util::json(
            code,
            &json!({
                "errors": [{
                    "message": "Something went wrong. Please try again later or contact support.",
                    "extensions": {"code": "INTERNAL_SERVER_ERROR"}
                }],
                "data": null
            }),
        ),
        Family::Rest => util::json(
            code,
            &json!({"error": "internal server error (simulated fault)", "status": code.as_u16()}),
        ),
        Family::RestV2 => util::problem(code, "upstream failure (simulated fault)"),
        Family::Serverless => util::json(
            code,
            &json!({"error": "Internal Server Error (simulated fault)"}),
        ),
        Family::Worker => util::json(code, &json!({"error": "simulated worker fault"})),
    }
}

/// Latency and hang faults: applied before anything else, even authentication.
pub async fn delay_faults(sim: &Sim, op: &str, family: Family) -> Result<(), Response> {
    let (latency, hang, hang_seconds) = {
        let mut st = sim.lock();
        let st = &mut *st;
        let latency = faults::latency(&st.faults.latency_ms, op);
        let hang = faults::fire(&mut st.faults.hangs, op, &mut st.rng).is_some();
        (latency, hang, st.timing.hang_seconds)
    };
    if let Some(ms) = latency {
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
    }
    if hang {
        let mut stop = sim.shutdown.subscribe();
        tokio::select! {
            _ = tokio::time::sleep(util::secs(hang_seconds)) => {}
            _ = serve::wait_true(&mut stop) => {}
        }
        return Err(match family {
            Family::Vast | Family::Worker => {
                util::text(StatusCode::GATEWAY_TIMEOUT, "upstream timed out")
            }
            Family::RestV2 => util::problem(StatusCode::GATEWAY_TIMEOUT, "upstream timed out"),
            _ => util::json(
                StatusCode::GATEWAY_TIMEOUT,
                &json!({"error": "upstream timed out"}),
            ),
        });
    }
    Ok(())
}

/// 429 and error faults: applied after authentication.
pub fn status_faults(sim: &Sim, op: &str, family: Family) -> Result<(), Response> {
    let mut st = sim.lock();
    let st = &mut *st;
    if let Some(t) = faults::fire(&mut st.faults.rate_limits, op, &mut st.rng) {
        return Err(rate_limited(family, op, &t));
    }
    if let Some(t) = faults::fire(&mut st.faults.errors, op, &mut st.rng) {
        return Err(server_error(family, t.status));
    }
    Ok(())
}

/// Whether a ghost-create fault fires for `op` (the caller creates, then answers this).
pub fn ghost_create(sim: &Sim, op: &str, family: Family) -> Option<Response> {
    let mut st = sim.lock();
    let st = &mut *st;
    faults::fire(&mut st.faults.ghost_creates, op, &mut st.rng)
        .map(|t| server_error(family, t.status))
}

/// How a surface authenticates.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum AuthMode {
    /// A valid key is required.
    Required,
    /// No key is fine (public search); a wrong key is still refused.
    Optional,
}

/// The standard gate of an API call: name the operation, delay faults, authentication,
/// status faults. `Err` carries the response to send instead.
pub async fn gate(
    sim: &Sim,
    slot: &OpSlot,
    op: &str,
    family: Family,
    key: Option<&str>,
    mode: AuthMode,
) -> Result<(), Response> {
    slot.set(op);
    delay_faults(sim, op, family).await?;
    check_auth(sim, family, key, mode)?;
    status_faults(sim, op, family)
}

/// Authentication against the family's accepted keys.
pub fn check_auth(
    sim: &Sim,
    family: Family,
    key: Option<&str>,
    mode: AuthMode,
) -> Result<(), Response> {
    if mode == AuthMode::Optional && key.is_none() {
        return Ok(());
    }
    let st = sim.lock();
    let accepted = match family {
        Family::Vast => &st.api_keys.vast,
        _ => &st.api_keys.runpod,
    };
    if key_accepted(accepted, key) {
        Ok(())
    } else {
        Err(unauthorized(family))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn keys_come_from_bearer_bare_header_or_query() {
        let mut h = HeaderMap::new();
        h.insert("authorization", HeaderValue::from_static("Bearer abc"));
        assert_eq!(provided_key(&h, &[]).as_deref(), Some("abc"));
        h.insert("authorization", HeaderValue::from_static("xyz"));
        assert_eq!(provided_key(&h, &[]).as_deref(), Some("xyz"));
        let q = vec![("api_key".to_string(), "q1".to_string())];
        assert_eq!(provided_key(&HeaderMap::new(), &q).as_deref(), Some("q1"));
        assert_eq!(provided_key(&HeaderMap::new(), &[]), None);
    }

    #[test]
    fn rest_v2_takes_only_bearer_keys() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer_key(&h), None);
        h.insert("authorization", HeaderValue::from_static("bearer abc"));
        assert_eq!(bearer_key(&h).as_deref(), Some("abc"));
        h.insert("authorization", HeaderValue::from_static("abc"));
        assert_eq!(bearer_key(&h), None);
        h.insert("authorization", HeaderValue::from_static("Bearer "));
        assert_eq!(bearer_key(&h), None);
    }

    #[test]
    fn empty_key_list_accepts_any_non_empty_key() {
        assert!(key_accepted(&[], Some("anything")));
        assert!(!key_accepted(&[], Some("")));
        assert!(!key_accepted(&[], None));
        let list = vec!["good".to_string()];
        assert!(key_accepted(&list, Some("good")));
        assert!(!key_accepted(&list, Some("bad")));
    }
}
