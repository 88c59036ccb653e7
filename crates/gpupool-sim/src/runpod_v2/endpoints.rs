//! REST v2 serverless endpoint settings (`GET /v2/serverless[/{id}]`, `PATCH
//! /v2/serverless/{id}`) over the endpoints GraphQL `saveEndpoint` keeps: a PATCH changes
//! only what it names, and the endpoint's driver scales to the new settings at once.
//!
//! `workers.idleTimeout` does not apply to an endpoint scaling on `REQUEST_COUNT`: it is
//! refused (422) on one and left out of its answers. `scaling.queueDelay` is kept in whole
//! seconds (rounded up), as `saveEndpoint`'s `scalerValue` is an integer.

use std::sync::Arc;

use axum::{
    body::Bytes,
    extract::{Path, State},
    response::Response,
};
use serde_json::{Map, Value, json};

use super::{
    super::{serverless::Endpoint, state::Sim},
    Call, bad_request, body_object,
    check::Check,
    not_found, ok, unprocessable,
};

/// The v2 `Endpoint` of `ep`; `origin` is where its jobs API is served.
fn endpoint_json(ep: &Endpoint, origin: &str) -> Value {
    let s = &ep.spec;
    let by_requests = s.scaler_type == "REQUEST_COUNT";
    let mut workers = json!({"min": s.workers_min, "max": s.workers_max});
    if !by_requests {
        workers["idleTimeout"] = json!(s.idle_timeout);
    }
    let scaling = if by_requests {
        json!({"type": "REQUEST_COUNT", "requestCount": s.scaler_value})
    } else {
        json!({"type": "QUEUE_DELAY", "queueDelay": f64::from(s.scaler_value)})
    };
    let (pools, excluded): (Vec<&str>, Vec<&str>) = s
        .gpu_ids
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .partition(|p| !p.starts_with('-'));
    let extra = |k: &str| ep.v2.get(k).cloned();
    let gpu = (!pools.is_empty()).then(|| {
        let mut g = json!({
            "pools": pools,
            "count": s.gpu_count,
            "allowedCudaVersions": extra("allowedCudaVersions").unwrap_or_else(|| json!([])),
            "minCudaVersion": extra("minCudaVersion").unwrap_or(Value::Null),
        });
        if !excluded.is_empty() {
            g["excludedTypes"] = excluded.iter().map(|e| json!(e[1..].trim())).collect();
        }
        g
    });
    let url = |path: &str| format!("{origin}/v2/{}/{path}", s.id);
    let mut v = json!({
        "id": s.id,
        "name": s.name,
        "type": "QUEUE",
        "requestUrls": {
            "run": url("run"), "runSync": url("runsync"), "status": url("status/{job_id}"),
            "stream": url("stream/{job_id}"), "cancel": url("cancel/{job_id}"),
            "retry": url("retry/{job_id}"), "purgeQueue": url("purge-queue"), "health": url("health"),
        },
        "gpu": gpu,
        "workers": workers,
        "scaling": scaling,
        "dataCenterIds": extra("dataCenterIds").unwrap_or_else(|| json!([])),
        "networkVolumes": extra("networkVolumes").unwrap_or_else(|| json!([])),
        "timeout": s.execution_timeout_ms,
        "flashboot": extra("flashboot").unwrap_or_else(|| json!("OFF")),
        "createdAt": super::super::util::rfc3339(ep.created_at),
    });
    for k in ["image", "args", "disk", "env", "ports", "registry"] {
        if let Some(x) = extra(k) {
            v[k] = x;
        }
    }
    v
}

pub async fn list(State(sim): State<Arc<Sim>>, call: Call) -> Response {
    if let Err(r) = call.gate(&sim, "runpod.v2.listEndpoints").await {
        return r;
    }
    let origin = call.origin();
    let st = sim.lock();
    let endpoints: Vec<Value> = st
        .endpoints
        .iter()
        .map(|e| endpoint_json(e, &origin))
        .collect();
    ok(&json!({"endpoints": endpoints}))
}

fn endpoint_not_found(id: &str) -> Response {
    not_found(format!("endpoint {id} not found"))
}

pub async fn show(State(sim): State<Arc<Sim>>, call: Call, Path(id): Path<String>) -> Response {
    if let Err(r) = call.gate(&sim, "runpod.v2.getEndpoint").await {
        return r;
    }
    let st = sim.lock();
    st.endpoints.iter().find(|e| e.spec.id == id).map_or_else(
        || endpoint_not_found(&id),
        |e| ok(&endpoint_json(e, &call.origin())),
    )
}

/// A checked `UpdateEndpointRequest`: what to change.
#[derive(Default)]
struct Patch {
    name: Option<String>,
    workers: Option<(Option<i64>, Option<i64>, Option<i64>)>,
    scaling: Option<(String, u32)>,
    gpu: Option<GpuPatch>,
    timeout: Option<i64>,
    /// v2-only settings stored as given (`flashboot`, container config...).
    extra: Map<String, Value>,
    template_id: Option<String>,
    cpu: bool,
}

#[derive(Default)]
struct GpuPatch {
    pools: Option<Vec<String>>,
    excluded: Option<Vec<String>>,
    count: Option<i64>,
    allowed_cuda: Option<Vec<String>>,
    min_cuda: Option<String>,
}

const FIELDS: [&str; 16] = [
    "args",
    "disk",
    "env",
    "image",
    "ports",
    "registry",
    "cpu",
    "dataCenterIds",
    "flashboot",
    "gpu",
    "name",
    "networkVolumes",
    "scaling",
    "templateId",
    "timeout",
    "workers",
];

fn patch_body(b: &Map<String, Value>) -> Result<Patch, Response> {
    let mut c = Check::default();
    c.object("$", &Value::Object(b.clone()), &FIELDS, &[]);
    let mut p = Patch {
        name: b.get("name").and_then(|v| c.string("$.name", v, 1)),
        timeout: b
            .get("timeout")
            .and_then(|v| c.integer("$.timeout", v, i64::MIN, None)),
        template_id: b
            .get("templateId")
            .and_then(|v| c.string("$.templateId", v, 0)),
        cpu: b.contains_key("cpu"),
        ..Patch::default()
    };
    if let Some(v) = b.get("workers")
        && let Some(w) = c.object("$.workers", v, &["min", "max", "idleTimeout"], &[])
    {
        let int = |c: &mut Check, k: &str, min, max| {
            w.get(k)
                .and_then(|v| c.integer(&format!("$.workers.{k}"), v, min, max))
        };
        p.workers = Some((
            int(&mut c, "min", 0, None),
            int(&mut c, "max", 0, None),
            int(&mut c, "idleTimeout", 1, Some(3600)),
        ));
    }
    if let Some(v) = b.get("scaling") {
        p.scaling = scaling(&mut c, v);
    }
    if let Some(v) = b.get("gpu") {
        p.gpu = gpu(&mut c, v);
    }
    if let Some(v) = b.get("flashboot")
        && let Some(f) = c.one_of(
            "$.flashboot",
            v,
            &["OFF", "FLASHBOOT", "PRIORITY_FLASHBOOT"],
        )
    {
        p.extra.insert("flashboot".into(), json!(f));
    }
    for k in ["dataCenterIds", "networkVolumes"] {
        if let Some(list) = b.get(k).and_then(|v| c.strings(&format!("$.{k}"), v)) {
            p.extra.insert(k.into(), json!(list));
        }
    }
    for k in ["image", "args"] {
        if let Some(s) = b.get(k).and_then(|v| c.string(&format!("$.{k}"), v, 0)) {
            p.extra.insert(k.into(), json!(s));
        }
    }
    if let Some(d) = b.get("disk").and_then(|v| c.integer("$.disk", v, 1, None)) {
        p.extra.insert("disk".into(), json!(d));
    }
    if let Some(env) = b.get("env").and_then(|v| c.string_map("$.env", v)) {
        let env: Map<String, Value> = env.into_iter().map(|(k, v)| (k, json!(v))).collect();
        p.extra.insert("env".into(), Value::Object(env));
    }
    if let Some(ports) = b.get("ports").and_then(|v| c.strings("$.ports", v)) {
        p.extra.insert("ports".into(), json!(ports));
    }
    if let Some(r) = b
        .get("registry")
        .and_then(|v| c.nullable_string("$.registry", v))
    {
        p.extra.insert("registry".into(), r);
    }
    if c.is_ok() {
        Ok(p)
    } else {
        Err(unprocessable(&c.errors))
    }
}

/// `scaling`: one of `{type: QUEUE_DELAY, queueDelay >= 0.5}` or `{type: REQUEST_COUNT,
/// requestCount >= 1}`, as the scaler type and its whole value.
fn scaling(c: &mut Check, v: &Value) -> Option<(String, u32)> {
    let kind = v
        .get("type")
        .map(|t| c.one_of("$.scaling.type", t, &["QUEUE_DELAY", "REQUEST_COUNT"]));
    let Some(Some(kind)) = kind else {
        if kind.is_none() {
            c.fail("$.scaling", "missing property 'type'");
        }
        return None;
    };
    let field = if kind == "QUEUE_DELAY" {
        "queueDelay"
    } else {
        "requestCount"
    };
    c.object("$.scaling", v, &["type", field], &["type", field]);
    let at = format!("$.scaling.{field}");
    let value = v.get(field)?;
    let n = if kind == "QUEUE_DELAY" {
        c.number(&at, value, 0.5)?.ceil()
    } else {
        c.integer(&at, value, 1, Some(i64::from(u32::MAX)))? as f64
    };
    Some((kind, n as u32))
}

/// `gpu` (`UpdateEndpointGpuConfig`): every part optional; `excludedTypes` needs `pools`.
fn gpu(c: &mut Check, v: &Value) -> Option<GpuPatch> {
    let allowed = [
        "pools",
        "excludedTypes",
        "count",
        "allowedCudaVersions",
        "minCudaVersion",
    ];
    let o = c.object("$.gpu", v, &allowed, &[])?;
    let g = GpuPatch {
        pools: o.get("pools").and_then(|v| c.strings("$.gpu.pools", v)),
        excluded: o
            .get("excludedTypes")
            .and_then(|v| c.strings("$.gpu.excludedTypes", v)),
        count: o
            .get("count")
            .and_then(|v| c.integer("$.gpu.count", v, 1, Some(64))),
        allowed_cuda: o
            .get("allowedCudaVersions")
            .and_then(|v| c.versions("$.gpu.allowedCudaVersions", v)),
        min_cuda: o
            .get("minCudaVersion")
            .and_then(|v| c.string("$.gpu.minCudaVersion", v, 0)),
    };
    if g.pools.as_ref().is_some_and(Vec::is_empty) {
        c.fail("$.gpu.pools", "must have at least 1 items");
    }
    if g.excluded.is_some() && g.pools.is_none() {
        c.fail("$.gpu", "has excludedTypes but not pools");
    }
    if let Some(m) = &g.min_cuda
        && !m.is_empty()
        && !super::check::is_version(m)
    {
        c.fail(
            "$.gpu.minCudaVersion",
            "does not match pattern ^$|^\\d+\\.\\d+$",
        );
    }
    Some(g)
}

/// `PATCH /v2/serverless/{id}`.
pub async fn update(
    State(sim): State<Arc<Sim>>,
    call: Call,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    if let Err(r) = call.gate(&sim, "runpod.v2.updateEndpoint").await {
        return r;
    }
    let p = match body_object(&body).and_then(|b| patch_body(&b)) {
        Ok(p) => p,
        Err(r) => return r,
    };
    let mut st = sim.lock();
    let st = &mut *st;
    let Some(ep) = st.endpoints.iter_mut().find(|e| e.spec.id == id) else {
        return endpoint_not_found(&id);
    };
    if let Some(t) = p.template_id {
        return not_found(format!("template {t} not found"));
    }
    if p.cpu {
        return bad_request("cpu is valid only for a CPU endpoint; compute family cannot change");
    }
    let scaler = p
        .scaling
        .as_ref()
        .map_or(ep.spec.scaler_type.as_str(), |s| s.0.as_str());
    let (min, max, idle) = p.workers.unwrap_or_default();
    if idle.is_some() && scaler == "REQUEST_COUNT" {
        return unprocessable(&[
            "$.workers.idleTimeout: not applicable to an endpoint scaling on REQUEST_COUNT".into(),
        ]);
    }
    let (new_min, new_max) = (
        min.map_or(ep.spec.workers_min, |n| n as u32),
        max.map_or(ep.spec.workers_max, |n| n as u32),
    );
    if new_min > new_max {
        return bad_request("workers.min cannot be greater than workers.max");
    }
    if p.timeout.is_some_and(|t| t < 1) {
        return bad_request("timeout must be a positive number of milliseconds");
    }
    let gpu_ids = match &p.gpu {
        Some(g) => match gpu_ids(&st.gpu_pools, &ep.spec.gpu_ids, &ep.v2, g) {
            Ok(ids) => Some(ids),
            Err(r) => return r,
        },
        None => None,
    };
    let s = &mut ep.spec;
    if let Some(n) = p.name {
        s.name = n;
    }
    (s.workers_min, s.workers_max) = (new_min, new_max);
    if let Some(i) = idle {
        s.idle_timeout = i as u32;
    }
    if let Some((kind, value)) = p.scaling {
        (s.scaler_type, s.scaler_value) = (kind, value);
    }
    if let Some(t) = p.timeout {
        s.execution_timeout_ms = t as u64;
    }
    if let (Some(ids), Some(g)) = (gpu_ids, &p.gpu) {
        s.gpu_ids = ids;
        if let Some(n) = g.count {
            s.gpu_count = n as u32;
        }
        if let Some(a) = &g.allowed_cuda {
            ep.v2.insert("allowedCudaVersions".into(), json!(a));
        }
        match g.min_cuda.as_deref() {
            Some("") => {
                ep.v2.remove("minCudaVersion");
            }
            Some(m) => {
                ep.v2.insert("minCudaVersion".into(), json!(m));
            }
            None => {}
        }
    }
    ep.v2.extend(p.extra);
    ep.version += 1;
    ep.notify.notify_one();
    ok(&endpoint_json(ep, &call.origin()))
}

/// The endpoint's new `gpuIds` (`POOL,POOL,-EXCLUDED TYPE`) after a `gpu` patch; 400 for
/// an exclusion outside the pools or CUDA constraints that contradict each other.
fn gpu_ids(
    pools: &[super::super::config::GpuPoolSpec],
    current: &str,
    v2: &Map<String, Value>,
    g: &GpuPatch,
) -> Result<String, Response> {
    let allowed_after = g.allowed_cuda.clone().map_or_else(
        || {
            v2.get("allowedCudaVersions")
                .and_then(Value::as_array)
                .map_or(0, Vec::len)
        },
        |a| a.len(),
    );
    let min_after = g
        .min_cuda
        .clone()
        .or_else(|| {
            v2.get("minCudaVersion")
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .filter(|m| !m.is_empty());
    if allowed_after > 0
        && min_after.is_some()
        && (g.allowed_cuda.is_some() || g.min_cuda.is_some())
    {
        return Err(bad_request(
            "allowedCudaVersions and minCudaVersion are mutually exclusive",
        ));
    }
    let Some(selected) = &g.pools else {
        return Ok(current.to_string());
    };
    let mut ids: Vec<String> = selected.iter().map(|p| p.trim().to_string()).collect();
    for e in g.excluded.iter().flatten().map(|e| e.trim()) {
        let in_pool = pools
            .iter()
            .any(|p| selected.contains(&p.id) && p.gpu_types.iter().any(|t| t == e));
        if !in_pool {
            return Err(bad_request(format!(
                "excludedTypes: {e:?} is not a GPU type in the selected pools"
            )));
        }
        ids.push(format!("-{e}"));
    }
    Ok(ids.join(","))
}
