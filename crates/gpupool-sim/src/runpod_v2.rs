//! RunPod REST v2 (providers.md §2.10, `api-specs/runpod/rest-v2.openapi.json`): pods, the
//! GPU catalogue and serverless endpoint settings under `/v2/...`, over the same pods as
//! GraphQL and REST v1 and the same endpoints as GraphQL `saveEndpoint`.
//!
//! What every v2 answer shares lives here: Bearer-only authentication, errors as
//! `application/problem+json` `{title, status, detail, errors?}`, the quota reported in
//! `RateLimit`/`RateLimit-Policy` on every authenticated answer (and enforced when
//! configured), and the injected faults in v2's shape. The serverless jobs API shares the
//! `/v2/` prefix (`/v2/{endpointId}/run`...): these routes are static in their second
//! segment (`pods`, `catalog`, `serverless`), and static segments win, so an endpoint id
//! equal to one of them is shadowed; every other id still reaches the jobs API.

mod catalog;
mod check;
mod endpoints;
mod pods;

use std::{convert::Infallible, sync::Arc};

use axum::{
    Router,
    body::Bytes,
    extract::{FromRequestParts, Request, State},
    http::{HeaderMap, HeaderValue, StatusCode, request::Parts},
    middleware::{self, Next},
    response::Response,
    routing::{get, post},
};
use serde_json::{Map, Value};

use super::{
    http::{self, AuthMode, Family, OpSlot},
    state::Sim,
    util,
};

pub fn routes(sim: Arc<Sim>) -> Router<Arc<Sim>> {
    Router::new()
        .route("/v2/pods", get(pods::list).post(pods::create))
        .route(
            "/v2/pods/{id}",
            get(pods::show).patch(pods::update).delete(pods::delete),
        )
        .route("/v2/pods/{id}/action", post(pods::action))
        .route("/v2/catalog/gpus", get(catalog::list))
        .route("/v2/catalog/gpus/{id}", get(catalog::show))
        .route("/v2/serverless", get(endpoints::list))
        .route(
            "/v2/serverless/{id}",
            get(endpoints::show).patch(endpoints::update),
        )
        .route_layer(middleware::from_fn_with_state(sim, quota))
}

/// What the quota said about this request (put in by [`quota`] for authenticated ones).
#[derive(Clone, Copy, Debug)]
struct Quota {
    allowed: bool,
    retry_after: u64,
}

/// Middleware: counts an authenticated request against the quota, tells the handler
/// whether it may go on, and puts the quota's headers on whatever it answers. Requests
/// without an accepted key are rate-limit-exempt in the document's sense: no headers.
async fn quota(State(sim): State<Arc<Sim>>, mut req: Request, next: Next) -> Response {
    let key = http::bearer_key(req.headers());
    let verdict = {
        let mut st = sim.lock();
        let st = &mut *st;
        http::key_accepted(&st.api_keys.runpod, key.as_deref()).then(|| {
            let elapsed = util::now_ms().as_millisecond() - st.started_at.as_millisecond();
            st.rate_windows
                .admit(&st.rate_limit, u64::try_from(elapsed).unwrap_or(0))
        })
    };
    if let Some(v) = &verdict {
        req.extensions_mut().insert(Quota {
            allowed: v.allowed,
            retry_after: v.retry_after,
        });
    }
    let mut res = next.run(req).await;
    if let Some(v) = verdict {
        let h = res.headers_mut();
        for (name, value) in [("ratelimit", v.state), ("ratelimit-policy", v.policy)] {
            if let Ok(value) = HeaderValue::from_str(&value) {
                h.insert(name, value);
            }
        }
    }
    res
}

/// The parts of a v2 request every handler needs.
struct Call {
    slot: OpSlot,
    headers: HeaderMap,
    query: Vec<(String, String)>,
    quota: Option<Quota>,
}

impl<S: Send + Sync> FromRequestParts<S> for Call {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Self {
            slot: parts
                .extensions
                .get::<OpSlot>()
                .cloned()
                .unwrap_or_default(),
            headers: parts.headers.clone(),
            query: util::query_pairs(parts.uri.query()),
            quota: parts.extensions.get::<Quota>().copied(),
        })
    }
}

impl Call {
    /// The gate of a v2 operation: its name, delay faults, Bearer authentication, the
    /// enforced quota, status faults. `Err` carries the answer to send instead.
    async fn gate(&self, sim: &Sim, op: &str) -> Result<(), Response> {
        self.slot.set(op);
        http::delay_faults(sim, op, Family::RestV2).await?;
        let key = http::bearer_key(&self.headers);
        http::check_auth(sim, Family::RestV2, key.as_deref(), AuthMode::Required)?;
        if let Some(q) = self.quota.filter(|q| !q.allowed) {
            let mut res = util::problem(StatusCode::TOO_MANY_REQUESTS, "rate limit exceeded");
            res.headers_mut()
                .insert(axum::http::header::RETRY_AFTER, q.retry_after.max(1).into());
            return Err(res);
        }
        http::status_faults(sim, op, Family::RestV2)
    }

    fn query(&self, key: &str) -> Option<&str> {
        util::query_get(&self.query, key)
    }

    /// `http://{Host}`, for URLs that point back at this simulator.
    fn origin(&self) -> String {
        let host = self
            .headers
            .get(axum::http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("127.0.0.1");
        format!("http://{host}")
    }
}

fn bad_request(detail: impl Into<String>) -> Response {
    util::problem(StatusCode::BAD_REQUEST, detail)
}

fn not_found(detail: impl Into<String>) -> Response {
    util::problem(StatusCode::NOT_FOUND, detail)
}

fn conflict(detail: impl Into<String>) -> Response {
    util::problem(StatusCode::CONFLICT, detail)
}

/// The 422 of a body that does not match the contract, listing every violation.
fn unprocessable(errors: &[String]) -> Response {
    util::problem_with(
        StatusCode::UNPROCESSABLE_ENTITY,
        "the request does not match the API contract",
        errors,
    )
}

fn ok(v: &Value) -> Response {
    util::json(StatusCode::OK, v)
}

fn no_content() -> Response {
    let mut res = Response::new(axum::body::Body::empty());
    *res.status_mut() = StatusCode::NO_CONTENT;
    res
}

/// The request body as a JSON object: unparsable JSON is a 400, any other JSON a 422.
fn body_object(body: &Bytes) -> Result<Map<String, Value>, Response> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(unprocessable(&["$: expected object".to_string()])),
        Err(e) => Err(bad_request(format!("the body is not valid JSON: {e}"))),
    }
}
