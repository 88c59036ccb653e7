//! RunPod REST v1 pods (`/v1/pods...`, providers.md §2.6), as `runpodctl` uses them, over the
//! same pods as GraphQL. Bodies follow `api-specs/runpod/rest-v1.openapi.json`.

use std::sync::Arc;

use axum::{
    Extension, Router,
    body::Bytes,
    extract::{Path, RawQuery, State},
    http::{HeaderMap, StatusCode},
    response::Response,
    routing::{get, post},
};
use serde_json::{Map, Value, json};

use super::{
    http::{self, AuthMode, Family, OpSlot},
    instances, pods,
    pods::{CreateError, PodRequest},
    state::{Provider, Sim},
    util,
};

pub fn routes() -> Router<Arc<Sim>> {
    Router::new()
        .route("/v1/pods", get(list).post(create))
        .route(
            "/v1/pods/{id}",
            get(show).delete(delete).patch(update).post(update),
        )
        .route("/v1/pods/{id}/update", post(update))
        .route("/v1/pods/{id}/stop", post(stop))
        .route("/v1/pods/{id}/start", post(start))
}

fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    util::json(
        status,
        &json!({"error": msg.into(), "status": status.as_u16()}),
    )
}

async fn gate(
    sim: &Sim,
    slot: &OpSlot,
    op: &str,
    headers: &HeaderMap,
    raw: Option<&str>,
) -> Result<(), Response> {
    let q = util::query_pairs(raw);
    let key = http::provided_key(headers, &q);
    http::gate(
        sim,
        slot,
        op,
        Family::Rest,
        key.as_deref(),
        AuthMode::Required,
    )
    .await
}

fn body_object(body: &Bytes) -> Result<Map<String, Value>, Response> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(error(
            StatusCode::BAD_REQUEST,
            "Invalid input: the body must be a JSON object.",
        )),
    }
}

fn strings(v: Option<&Value>, what: &str) -> Result<Vec<String>, Response> {
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| {
                i.as_str().map(str::to_string).ok_or_else(|| {
                    error(
                        StatusCode::BAD_REQUEST,
                        format!("Invalid input: {what} must be a list of strings."),
                    )
                })
            })
            .collect(),
        Some(_) => Err(error(
            StatusCode::BAD_REQUEST,
            format!("Invalid input: {what} must be a list of strings."),
        )),
    }
}

/// A create body as a [`PodRequest`]; the first problem, in the order RunPod checks, is
/// the answer.
fn rest_request(b: &Map<String, Value>) -> Result<PodRequest, Response> {
    if b.get("computeType").and_then(Value::as_str) == Some("CPU") {
        return Err(invalid_input("CPU pods are not simulated."));
    }
    let gpu_type_ids = strings(b.get("gpuTypeIds"), "gpuTypeIds")?;
    if gpu_type_ids.is_empty() {
        return Err(invalid_input("gpuTypeIds is required for GPU pods."));
    }
    let name = b
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or("my pod")
        .to_string();
    if name.chars().count() > 191 {
        return Err(invalid_input("name is longer than 191 characters."));
    }
    let cloud = b
        .get("cloudType")
        .and_then(Value::as_str)
        .unwrap_or("SECURE")
        .to_string();
    if cloud != "SECURE" && cloud != "COMMUNITY" {
        return Err(invalid_input("cloudType must be SECURE or COMMUNITY."));
    }
    let gpu_count = requested_gpu_count(b)?;
    let ports = requested_ports(b)?;
    let env = match b.get("env") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Object(m)) => env_pairs(m),
        Some(_) => return Err(invalid_input("env must be an object of strings.")),
    };
    let str_or = |k: &str, d: &str| b.get(k).and_then(Value::as_str).unwrap_or(d).to_string();
    let num = |k: &str, d: u64| b.get(k).and_then(Value::as_u64).unwrap_or(d);
    let flag = |k: &str, d: bool| b.get(k).and_then(Value::as_bool).unwrap_or(d);
    Ok(PodRequest {
        name,
        image: str_or("imageName", ""),
        gpu_type_ids,
        gpu_count,
        cloud_type: cloud,
        container_disk_gb: num("containerDiskInGb", 50),
        volume_gb: num("volumeInGb", 20),
        volume_mount_path: str_or("volumeMountPath", "/workspace"),
        ports,
        env,
        docker_args: String::new(),
        support_public_ip: flag("supportPublicIp", true),
        data_center_id: strings(b.get("dataCenterIds"), "dataCenterIds")?
            .into_iter()
            .next(),
        template_id: b
            .get("templateId")
            .and_then(Value::as_str)
            .map(str::to_string),
        bid_per_gpu: None,
        interruptible: flag("interruptible", false),
    })
}

/// A 400 `Invalid input: {m}`.
fn invalid_input(m: &str) -> Response {
    error(StatusCode::BAD_REQUEST, format!("Invalid input: {m}"))
}

/// `gpuCount`: 1 when not given, else an integer of at least 1.
fn requested_gpu_count(b: &Map<String, Value>) -> Result<u32, Response> {
    Ok(match b.get("gpuCount") {
        None | Some(Value::Null) => 1,
        Some(v) => v
            .as_u64()
            .filter(|n| *n >= 1)
            .ok_or_else(|| invalid_input("gpuCount must be an integer >= 1."))?
            as u32,
    })
}

/// `ports`: a list of `"8000/http,22/tcp"`-style strings, flattened.
fn requested_ports(b: &Map<String, Value>) -> Result<Vec<(u16, String)>, Response> {
    let mut ports = Vec::new();
    for p in strings(b.get("ports"), "ports")? {
        ports.extend(pods::parse_ports(&p).map_err(|e| invalid_input(&e))?);
    }
    Ok(ports)
}

/// An `env` object as pairs (non-string values as their JSON text).
fn env_pairs(m: &Map<String, Value>) -> Vec<(String, String)> {
    m.iter()
        .map(|(k, v)| {
            (
                k.clone(),
                v.as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| v.to_string()),
            )
        })
        .collect()
}

fn pod_json(sim: &Sim, id: &str) -> Option<Value> {
    sim.lock()
        .instance(Provider::RunPod, id)
        .filter(|i| !i.is_destroyed())
        .map(pods::rest_pod)
}

fn not_found() -> Response {
    error(StatusCode::NOT_FOUND, "Pod not found.")
}

async fn create(
    State(sim): State<Arc<Sim>>,
    Extension(slot): Extension<OpSlot>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(r) = gate(
        &sim,
        &slot,
        "runpod.rest.createPod",
        &headers,
        raw.as_deref(),
    )
    .await
    {
        return r;
    }
    let req = match body_object(&body).and_then(|b| rest_request(&b)) {
        Ok(r) => r,
        Err(r) => return r,
    };
    match pods::create(&sim, &req) {
        Ok(id) => {
            slot.set_instance(id.clone());
            if let Some(r) = http::ghost_create(&sim, "runpod.rest.createPod", Family::Rest) {
                return r;
            }
            match pod_json(&sim, &id) {
                Some(p) => util::json(StatusCode::CREATED, &p),
                None => not_found(),
            }
        }
        Err(CreateError::NoCapacity) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("create pod: {}", pods::NO_CAPACITY),
        ),
        Err(CreateError::Invalid(m)) => {
            error(StatusCode::BAD_REQUEST, format!("Invalid input: {m}"))
        }
    }
}

async fn list(
    State(sim): State<Arc<Sim>>,
    Extension(slot): Extension<OpSlot>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = gate(
        &sim,
        &slot,
        "runpod.rest.listPods",
        &headers,
        raw.as_deref(),
    )
    .await
    {
        return r;
    }
    let q = util::query_pairs(raw.as_deref());
    let wanted = |key: &str| -> Vec<&str> {
        q.iter()
            .filter(|(k, _)| k == key || *k == format!("{key}[]"))
            .map(|(_, v)| v.as_str())
            .collect()
    };
    let (names, ids, statuses, gpus, images) = (
        wanted("name"),
        wanted("id"),
        wanted("desiredStatus"),
        wanted("gpuTypeId"),
        wanted("imageName"),
    );
    let st = sim.lock();
    let pods: Vec<Value> = st
        .instances
        .iter()
        .filter(|i| i.provider == Provider::RunPod && !i.is_destroyed())
        .map(pods::rest_pod)
        .filter(|p| {
            let field = |k: &str| {
                p.get(k)
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string()
            };
            let gpu = p
                .pointer("/machine/gpuTypeId")
                .and_then(Value::as_str)
                .unwrap_or_default();
            (names.is_empty() || names.contains(&field("name").as_str()))
                && (ids.is_empty() || ids.contains(&field("id").as_str()))
                && (statuses.is_empty() || statuses.contains(&field("desiredStatus").as_str()))
                && (images.is_empty() || images.contains(&field("imageName").as_str()))
                && (gpus.is_empty() || gpus.contains(&gpu))
        })
        .collect();
    util::json(StatusCode::OK, &Value::Array(pods))
}

async fn show(
    State(sim): State<Arc<Sim>>,
    Extension(slot): Extension<OpSlot>,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = gate(&sim, &slot, "runpod.rest.getPod", &headers, raw.as_deref()).await {
        return r;
    }
    slot.set_instance(id.clone());
    match pod_json(&sim, &id) {
        Some(p) => util::json(StatusCode::OK, &p),
        None => not_found(),
    }
}

async fn delete(
    State(sim): State<Arc<Sim>>,
    Extension(slot): Extension<OpSlot>,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = gate(
        &sim,
        &slot,
        "runpod.rest.deletePod",
        &headers,
        raw.as_deref(),
    )
    .await
    {
        return r;
    }
    slot.set_instance(id.clone());
    match instances::destroy(&sim, Provider::RunPod, &id) {
        Some(task) => {
            instances::reap(task).await;
            let mut res = Response::new(axum::body::Body::empty());
            *res.status_mut() = StatusCode::NO_CONTENT;
            res
        }
        None => not_found(),
    }
}

async fn update(
    State(sim): State<Arc<Sim>>,
    Extension(slot): Extension<OpSlot>,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(r) = gate(
        &sim,
        &slot,
        "runpod.rest.updatePod",
        &headers,
        raw.as_deref(),
    )
    .await
    {
        return r;
    }
    slot.set_instance(id.clone());
    let b = match body_object(&body) {
        Ok(b) => b,
        Err(r) => return r,
    };
    {
        let mut st = sim.lock();
        let Some(i) = st
            .instance_mut(Provider::RunPod, &id)
            .filter(|i| !i.is_destroyed())
        else {
            return not_found();
        };
        if let Some(name) = b.get("name").and_then(Value::as_str) {
            i.label = Some(name.to_string());
        }
        if let Some(image) = b.get("imageName").and_then(Value::as_str) {
            i.image = image.to_string();
        }
        if let Some(Value::Object(env)) = b.get("env") {
            i.env = env_pairs(env);
        }
    }
    match pod_json(&sim, &id) {
        Some(p) => util::json(StatusCode::OK, &p),
        None => not_found(),
    }
}

async fn stop(
    State(sim): State<Arc<Sim>>,
    Extension(slot): Extension<OpSlot>,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = gate(&sim, &slot, "runpod.rest.stopPod", &headers, raw.as_deref()).await {
        return r;
    }
    slot.set_instance(id.clone());
    match instances::stop(&sim, Provider::RunPod, &id) {
        Some(task) => {
            instances::reap(task).await;
            pod_json(&sim, &id).map_or_else(not_found, |p| util::json(StatusCode::OK, &p))
        }
        None => not_found(),
    }
}

async fn start(
    State(sim): State<Arc<Sim>>,
    Extension(slot): Extension<OpSlot>,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = gate(
        &sim,
        &slot,
        "runpod.rest.startPod",
        &headers,
        raw.as_deref(),
    )
    .await
    {
        return r;
    }
    slot.set_instance(id.clone());
    match instances::start(&sim, Provider::RunPod, &id) {
        Some(()) => pod_json(&sim, &id).map_or_else(not_found, |p| util::json(StatusCode::OK, &p)),
        None => not_found(),
    }
}
