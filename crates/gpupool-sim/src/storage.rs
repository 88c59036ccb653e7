//! A stand-in for object storage behind presigned URLs: `PUT /storage/{key}` stores the body
//! (its `Content-Type` kept), `GET`/`HEAD /storage/{key}` serve it back, and
//! `GET /admin/storage` lists what is stored. The query string (a presigned URL's
//! signature) is accepted and ignored. Objects live in memory, at most
//! [`MAX_OBJECT_BYTES`] each and [`MAX_TOTAL_BYTES`] in all; `/admin/reset` does not clear them.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use axum::{
    Router,
    body::Bytes,
    extract::{DefaultBodyLimit, Path, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use serde_json::json;

use super::{state::Sim, util};

pub const MAX_OBJECT_BYTES: usize = 256 * 1024 * 1024;
pub const MAX_TOTAL_BYTES: usize = 1024 * 1024 * 1024;

/// The stored objects: key -> (content type, bytes).
#[derive(Default)]
pub struct Store(Mutex<BTreeMap<String, (String, Bytes)>>);

impl Store {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, (String, Bytes)>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

pub fn routes() -> Router<Arc<Sim>> {
    Router::new()
        .route("/storage/{*key}", get(fetch).head(fetch).put(put))
        .route("/admin/storage", get(list))
        .layer(DefaultBodyLimit::max(MAX_OBJECT_BYTES))
}

async fn put(
    State(sim): State<Arc<Sim>>,
    Path(key): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let kind = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/octet-stream")
        .to_string();
    let mut objects = sim.storage.lock();
    let used: usize = objects
        .iter()
        .filter(|(k, _)| **k != key)
        .map(|(_, (_, b))| b.len())
        .sum();
    if used + body.len() > MAX_TOTAL_BYTES {
        return util::json(
            StatusCode::INSUFFICIENT_STORAGE,
            &json!({"error": "the simulator's storage is full"}),
        );
    }
    objects.insert(key, (kind, body));
    StatusCode::OK.into_response()
}

async fn fetch(State(sim): State<Arc<Sim>>, Path(key): Path<String>) -> Response {
    let found = sim.storage.lock().get(&key).cloned();
    match found {
        Some((kind, body)) => ([(header::CONTENT_TYPE, kind)], body).into_response(),
        None => util::json(StatusCode::NOT_FOUND, &json!({"error": "no such object"})),
    }
}

async fn list(State(sim): State<Arc<Sim>>) -> Response {
    let objects = sim.storage.lock();
    let list: Vec<_> = objects
        .iter()
        .map(|(k, (kind, b))| json!({"key": k, "bytes": b.len(), "contentType": kind}))
        .collect();
    util::json(StatusCode::OK, &json!({"objects": list}))
}
