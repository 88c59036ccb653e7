//! The Vast.ai API as the official `vastai` CLI/SDK use it (providers.md §1): offer search,
//! create, show, the paginated v1 list and the legacy v0 list, label/start/stop, destroy.
//!
//! Instances render from the shared state; a running instance's `ports["{p}/tcp"]` points at
//! the real loopback port of its worker. Every row carries `start_date` and `extra_env`
//! (the CLI dereferences both on every row).

use std::sync::Arc;

use axum::{
    Extension, Router,
    body::Bytes,
    extract::{Path, RawQuery, State},
    http::{HeaderMap, StatusCode},
    response::Response,
    routing::{get, post, put},
};
use jiff::Timestamp;
use rand::{Rng, rngs::StdRng};
use serde_json::{Map, Value, json};

use super::{
    config::VastOfferSpec,
    http::{self, AuthMode, Family, OpSlot},
    instances, query,
    state::{Instance, Phase, PortSpec, Provider, Sim, State as SimState, details},
    util,
};

pub fn routes() -> Router<Arc<Sim>> {
    Router::new()
        .route("/api/v0/bundles/", post(search_bundles))
        .route("/api/v0/bundles", post(search_bundles))
        .route("/api/v0/search/asks/", put(search_asks))
        .route("/api/v0/asks/{id}/", put(create))
        .route("/api/v0/asks/{id}", put(create))
        .route("/api/v0/instances/", get(list_v0))
        .route("/api/v0/instances", get(list_v0))
        .route("/api/v0/instances/filters/", get(filters))
        .route(
            "/api/v0/instances/{id}/",
            get(show).put(manage).delete(destroy),
        )
        .route(
            "/api/v0/instances/{id}",
            get(show).put(manage).delete(destroy),
        )
        .route("/api/v1/instances/", get(list_v1))
        .route("/api/v1/instances", get(list_v1))
}

fn vast_error(status: StatusCode, error: &str, msg: impl Into<String>) -> Response {
    util::json(
        status,
        &json!({"success": false, "error": error, "msg": msg.into()}),
    )
}

fn bad_json() -> Response {
    util::json(
        StatusCode::BAD_REQUEST,
        &json!({"error": "invalid_request", "msg": "Invalid json body"}),
    )
}

/// The request's JSON body as an object (an empty body counts as `{}`).
fn body_object(body: &Bytes) -> Result<Map<String, Value>, Response> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(bad_json()),
    }
}

/// Authentication and faults for a Vast operation.
async fn gate(
    sim: &Sim,
    slot: &OpSlot,
    op: &str,
    headers: &HeaderMap,
    q: &[(String, String)],
    mode: AuthMode,
) -> Result<(), Response> {
    let key = http::provided_key(headers, q);
    http::gate(sim, slot, op, Family::Vast, key.as_deref(), mode).await
}

/// Realistic per-GPU figures for the fields the catalogue does not set.
struct GpuFacts {
    ram_mb: u64,
    compute_cap: u64,
    dlperf: f64,
    tflops: f64,
}

fn gpu_facts(name: &str) -> GpuFacts {
    let n = name.to_ascii_uppercase();
    let (ram_mb, compute_cap, dlperf, tflops) = if n.contains("4090") {
        (24_564, 890, 42.0, 82.6)
    } else if n.contains("3090") {
        (24_576, 860, 24.0, 35.6)
    } else if n.contains("3060") {
        (12_288, 860, 9.5, 12.7)
    } else if n.contains("A100") || n.contains("H100") {
        (81_920, 900, 60.0, 60.0)
    } else {
        (16_384, 860, 15.0, 20.0)
    };
    GpuFacts {
        ram_mb,
        compute_cap,
        dlperf,
        tflops,
    }
}

/// The figures an offer's fields derive from: the GPU facts scaled by the number of GPUs.
struct OfferBasis {
    facts: GpuFacts,
    /// The number of GPUs as a factor (at least 1).
    gpus: f64,
    dph: f64,
    dlperf: f64,
    flops: f64,
}

impl OfferBasis {
    /// The basis of `o`.
    fn new(o: &VastOfferSpec) -> Self {
        let facts = gpu_facts(&o.gpu_name);
        let gpus = f64::from(o.num_gpus.max(1));
        Self {
            dlperf: facts.dlperf * gpus,
            flops: facts.tflops * gpus,
            facts,
            gpus,
            dph: o.dph_total,
        }
    }

    /// `x` per dollar-hour (0 for a free offer).
    fn per_dph(&self, x: f64) -> f64 {
        if self.dph > 0.0 { x / self.dph } else { 0.0 }
    }
}

/// The full offer object, shaped like the documented example, with catalogue overrides.
pub fn offer_json(o: &VastOfferSpec, now: Timestamp, is_bid: bool) -> Map<String, Value> {
    let b = OfferBasis::new(o);
    let mut m = offer_listing(o);
    m.extend(offer_host(o, &b));
    m.extend(offer_gpus(o, &b));
    m.extend(offer_network(o));
    m.extend(offer_pricing(o, &b));
    m.extend(offer_rental(now, is_bid));
    for (k, v) in &o.extra {
        m.insert(k.clone(), v.clone());
    }
    m
}

/// Offer fields naming the offer, its host and where it is, and how far it is trusted.
fn offer_listing(o: &VastOfferSpec) -> Map<String, Value> {
    let country = o
        .geolocation
        .rsplit(", ")
        .next()
        .unwrap_or("US")
        .to_string();
    util::object(json!({
        "id": o.id,
        "ask_contract_id": o.id,
        "bundle_id": o.id + 500_000,
        "bundled_results": null,
        "host_id": 90_000 + o.id,
        "machine_id": 40_000 + o.id,
        "hosting_type": 0,
        "hostname": null,
        "logo": "/static/logos/vastai_small2.png",
        "webpage": null,
        "resource_type": "gpu",
        "external": false,
        "geolocation": o.geolocation,
        "geolocode": 1_000 + (o.id % 1000),
        "country_code": country,
        "reliability": o.reliability2,
        "reliability2": o.reliability2,
        "reliability_mult": 1.0,
        "verification": o.verification,
        "vericode": u8::from(o.verification == "verified"),
    }))
}

/// Offer fields describing the machine around the GPUs: CPU, memory, disk, board, OS.
fn offer_host(o: &VastOfferSpec, b: &OfferBasis) -> Map<String, Value> {
    util::object(json!({
        "cpu_arch": "amd64",
        "cpu_cores": 32,
        "cpu_cores_effective": 8.0 * b.gpus,
        "cpu_ghz": 3.5,
        "cpu_name": "AMD EPYC 7543 32-Core Processor",
        "cpu_ram": 64_000 * u64::from(o.num_gpus.max(1)),
        "disk_bw": 2500.0,
        "disk_name": "Samsung SSD 980 PRO 2TB",
        "disk_space": 500.0,
        "mobo_name": "ROMED8-2T",
        "os_version": "22.04",
        "pci_gen": 4.0,
        "pcie_bw": 25.0,
        "has_avx": 1,
        "vms_enabled": false,
    }))
}

/// Offer fields describing the GPUs: model, memory, drivers and performance.
fn offer_gpus(o: &VastOfferSpec, b: &OfferBasis) -> Map<String, Value> {
    let f = &b.facts;
    util::object(json!({
        "num_gpus": o.num_gpus,
        "gpu_name": o.gpu_name,
        "gpu_arch": "nvidia",
        "gpu_ram": f.ram_mb,
        "gpu_total_ram": f.ram_mb * u64::from(o.num_gpus.max(1)),
        "gpu_mem_bw": 1000.0,
        "gpu_display_active": false,
        "gpu_frac": 1.0,
        "gpu_ids": [],
        "gpu_lanes": 16,
        "gpu_max_power": 450,
        "gpu_max_temp": 83,
        "bw_nvlink": 0.0,
        "compute_cap": f.compute_cap,
        "cuda_max_good": 12.4,
        "driver_version": "550.54.14",
        "driver_vers": 550_054_014,
        "dlperf": b.dlperf,
        "total_flops": b.flops,
    }))
}

/// Offer fields describing the network: addresses, ports, bandwidth and its prices.
fn offer_network(o: &VastOfferSpec) -> Map<String, Value> {
    util::object(json!({
        "public_ipaddr": "127.0.0.1",
        "static_ip": true,
        "direct_port_count": o.direct_port_count,
        "inet_down": 1000.0,
        "inet_up": 800.0,
        "inet_down_cost": 0.005,
        "inet_up_cost": 0.005,
        "internet_down_cost_per_tb": 5.0,
        "internet_up_cost_per_tb": 5.0,
    }))
}

/// Offer fields about the price: per hour, per performance, bids, storage and the breakdowns.
fn offer_pricing(o: &VastOfferSpec, b: &OfferBasis) -> Map<String, Value> {
    let dph = b.dph;
    util::object(json!({
        "dph_base": dph * 0.97,
        "dph_total": dph,
        "discounted_dph_total": dph,
        "dlperf_per_dphtotal": b.per_dph(b.dlperf),
        "flops_per_dphtotal": b.per_dph(b.flops),
        "vram_costperhour": dph / (b.facts.ram_mb as f64 * b.gpus / 1000.0),
        "score": b.dlperf * o.reliability2 / dph.max(0.01),
        "min_bid": (dph * 0.5 * 10_000.0).round() / 10_000.0,
        "credit_discount_max": 0.4,
        "storage_cost": 0.15,
        "storage_total_cost": 0.0,
        "search": {"gpuCostPerHour": dph * 0.97, "diskHour": dph * 0.03, "totalHour": dph,
                   "discountTotalHour": 0.0, "discountedTotalPerHour": dph},
        "instance": {"gpuCostPerHour": 0.0, "diskHour": dph * 0.03, "totalHour": dph * 0.03,
                     "discountTotalHour": 0.0, "discountedTotalPerHour": dph * 0.03},
    }))
}

/// Offer fields about renting it: availability, the kind of rental and its period.
fn offer_rental(now: Timestamp, is_bid: bool) -> Map<String, Value> {
    let duration = 30.0 * 86_400.0;
    util::object(json!({
        "rentable": true,
        "rented": false,
        "rn": 1,
        "is_bid": is_bid,
        "start_date": util::epoch_secs(now) - 86_400.0,
        "end_date": util::epoch_secs(now) + duration,
        "duration": duration,
        "time_remaining": "",
        "time_remaining_isbid": "",
    }))
}

/// Server-side spellings the CLI normally rewrites itself.
fn offer_alias(field: &str) -> &str {
    match field {
        "cuda_vers" => "cuda_max_good",
        "dph" => "dph_total",
        "dlperf_usd" => "dlperf_per_dphtotal",
        "flops_usd" => "flops_per_dphtotal",
        "display_active" => "gpu_display_active",
        other => other,
    }
}

/// Keys of a search body that are not filters.
const CONTROL_KEYS: &[&str] = &[
    "order",
    "type",
    "limit",
    "allocated_storage",
    "disable_bundling",
    "select_cols",
    "q",
];

/// An offer search: the available offers, filtered, ordered and cut to the limit.
fn run_search(sim: &Sim, q: &Map<String, Value>) -> Result<Vec<Value>, Response> {
    let now = util::now_ms();
    let is_bid = matches!(
        q.get("type").and_then(Value::as_str),
        Some("bid" | "interruptible")
    );
    let st = sim.lock();
    let mut rows: Vec<Map<String, Value>> = st
        .offers
        .iter()
        .filter(|o| st.offer_available(o))
        .map(|o| offer_json(o, now, is_bid))
        .collect();
    drop(st);
    for (key, cond) in q {
        if CONTROL_KEYS.contains(&key.as_str()) {
            continue;
        }
        rows = filter_offers(rows, offer_alias(key), cond)?;
    }
    let keys = search_order(q)?;
    query::sort_rows(&mut rows, &keys);
    if let Some(l) = search_limit(q) {
        rows.truncate(l);
    }
    Ok(rows.into_iter().map(Value::Object).collect())
}

/// The offers that pass the filter `cond` on `field`.
fn filter_offers(
    rows: Vec<Map<String, Value>>,
    field: &str,
    cond: &Value,
) -> Result<Vec<Map<String, Value>>, Response> {
    let mut keep = Vec::with_capacity(rows.len());
    for row in rows {
        let actual = if field == "verified" {
            Some(Value::Bool(
                row.get("verification").and_then(Value::as_str) == Some("verified"),
            ))
        } else {
            row.get(field).cloned()
        };
        // A filter on a field offers do not carry is ignored rather than matching nothing.
        let ok = match actual {
            Some(a) => query::passes(field, &a, cond)
                .map_err(|e| vast_error(StatusCode::BAD_REQUEST, "invalid_request", e))?,
            None => true,
        };
        if ok {
            keep.push(row);
        }
    }
    Ok(keep)
}

/// The search's sort keys (field, descending): its `order`, by default the best score first.
fn search_order(q: &Map<String, Value>) -> Result<Vec<(String, bool)>, Response> {
    let mut keys = Vec::new();
    match q.get("order") {
        Some(Value::Array(items)) => {
            for item in items {
                let (field, dir) = match item {
                    Value::Array(pair) => (
                        pair.first().and_then(Value::as_str).unwrap_or("score"),
                        pair.get(1).and_then(Value::as_str).unwrap_or("asc"),
                    ),
                    Value::String(s) => (s.as_str(), "asc"),
                    _ => continue,
                };
                keys.push((
                    offer_alias(field).to_string(),
                    dir.eq_ignore_ascii_case("desc"),
                ));
            }
        }
        None | Some(Value::Null) => keys.push(("score".to_string(), true)),
        Some(_) => {
            return Err(vast_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "order must be a list of [field, direction]",
            ));
        }
    }
    Ok(keys)
}

/// The search's `limit` (a number, or a numeric string), if any.
fn search_limit(q: &Map<String, Value>) -> Option<usize> {
    match q.get("limit") {
        Some(Value::Number(n)) => n.as_f64().map(|f| f.max(0.0) as usize),
        Some(Value::String(s)) => s.trim().parse::<f64>().ok().map(|f| f.max(0.0) as usize),
        _ => None,
    }
}

async fn search_bundles(
    State(sim): State<Arc<Sim>>,
    Extension(slot): Extension<OpSlot>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let q = util::query_pairs(raw.as_deref());
    if let Err(r) = gate(&sim, &slot, "vast.search", &headers, &q, AuthMode::Optional).await {
        return r;
    }
    let body = match body_object(&body) {
        Ok(b) => b,
        Err(r) => return r,
    };
    match run_search(&sim, &body) {
        Ok(offers) => util::json(StatusCode::OK, &json!({"offers": offers})),
        Err(r) => r,
    }
}

async fn search_asks(
    State(sim): State<Arc<Sim>>,
    Extension(slot): Extension<OpSlot>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let q = util::query_pairs(raw.as_deref());
    if let Err(r) = gate(&sim, &slot, "vast.search", &headers, &q, AuthMode::Optional).await {
        return r;
    }
    let body = match body_object(&body) {
        Ok(b) => b,
        Err(r) => return r,
    };
    let query = match body.get("q") {
        Some(Value::Object(m)) => m.clone(),
        None => Map::new(),
        Some(_) => return bad_json(),
    };
    match run_search(&sim, &query) {
        Ok(offers) => util::json(StatusCode::OK, &json!({"offers": offers})),
        Err(r) => r,
    }
}

/// Env entries: the object clients send, or the docker-flag string the OpenAPI schema shows.
fn parse_env(v: Option<&Value>) -> Result<Vec<(String, String)>, String> {
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Object(m)) => Ok(m
            .iter()
            .map(|(k, v)| {
                let v = match v {
                    Value::String(s) => s.clone(),
                    Value::Null => String::new(),
                    other => other.to_string(),
                };
                (k.clone(), v)
            })
            .collect()),
        Some(Value::String(s)) => {
            let mut out = Vec::new();
            let mut words = s.split_whitespace();
            while let Some(flag) = words.next() {
                match (flag, words.next()) {
                    ("-e", Some(kv)) => {
                        if let Some((k, v)) = kv.split_once('=') {
                            out.push((k.to_string(), v.trim_matches(['\'', '"']).to_string()));
                        }
                    }
                    ("-p" | "-v" | "-n", Some(arg)) => {
                        out.push((format!("{flag} {arg}"), "1".into()))
                    }
                    ("-h", Some(arg)) => out.push(("-h".into(), arg.to_string())),
                    _ => {}
                }
            }
            Ok(out)
        }
        Some(_) => Err("env must be an object".into()),
    }
}

/// Container ports requested with `-p a:b[/proto]` env keys.
fn requested_ports(env: &[(String, String)]) -> Vec<(u16, String)> {
    env.iter()
        .filter_map(|(k, _)| k.strip_prefix("-p "))
        .filter_map(|spec| {
            let (ports, proto) = spec.split_once('/').unwrap_or((spec, "tcp"));
            let inner = ports.rsplit(':').next()?;
            Some((inner.trim().parse().ok()?, proto.to_ascii_lowercase()))
        })
        .collect()
}

async fn create(
    State(sim): State<Arc<Sim>>,
    Extension(slot): Extension<OpSlot>,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let q = util::query_pairs(raw.as_deref());
    if let Err(r) = gate(&sim, &slot, "vast.create", &headers, &q, AuthMode::Required).await {
        return r;
    }
    let Ok(offer_id) = id.trim().parse::<u64>() else {
        return vast_error(
            StatusCode::BAD_REQUEST,
            "invalid_args",
            "error 400/3467: Invalid args: 'id' is required and must be a valid offer ID",
        );
    };
    let body = match body_object(&body) {
        Ok(b) => b,
        Err(r) => return r,
    };
    let request = match CreateRequest::parse(offer_id, &body) {
        Ok(r) => r,
        Err(r) => return r,
    };
    let now = util::now_ms();
    let placed = {
        let mut st = sim.lock();
        let st = &mut *st;
        pick_offer(st, offer_id).map(|spec| build_instance(st, offer_id, &spec, request, now))
    };
    match placed {
        Ok((inst, api_key)) => store_and_respond(&sim, &slot, inst, api_key),
        Err(r) => r,
    }
}

/// A create's body, checked as Vast checks it.
struct CreateRequest {
    label: Option<String>,
    image: String,
    disk: f64,
    /// The bid of an interruptible instance; `None` for on-demand.
    bid: Option<f64>,
    env: Vec<(String, String)>,
    runtype: String,
    /// Created stopped (`target_state: "stopped"`).
    stopped: bool,
    onstart: Value,
    args: Value,
    template_hash_id: Value,
}

impl CreateRequest {
    /// The first problem, in the order Vast checks, is the answer.
    fn parse(offer_id: u64, body: &Map<String, Value>) -> Result<Self, Response> {
        let invalid = |msg: String| invalid_create_args(offer_id, msg);
        let str_field = |k: &str| body.get(k).and_then(Value::as_str).map(str::to_string);
        let templated = str_field("template_hash_id").is_some()
            || body.get("template_id").is_some_and(|v| !v.is_null());
        let image = str_field("image").filter(|s| !s.is_empty());
        if image.is_none() && !templated {
            return Err(invalid("'image' is required".into()));
        }
        let image = image.unwrap_or_else(|| "vastai/base-image:@vastai-automatic-tag".into());
        if image.len() > 1024 {
            return Err(invalid("image is longer than 1024 characters".into()));
        }
        let label = str_field("label");
        if label.as_ref().is_some_and(|l| l.chars().count() > 256) {
            return Err(invalid("label is longer than 256 characters".into()));
        }
        let disk = requested_disk(body)
            .ok_or_else(|| invalid("disk must be a number of at least 8 (GB)".into()))?;
        let bid = requested_bid(offer_id, body)?;
        let env = requested_env(body).map_err(invalid)?;
        let runtype = str_field("runtype").unwrap_or_else(|| {
            if body.get("args").is_some_and(|a| !a.is_null()) || str_field("args_str").is_some() {
                "args".into()
            } else {
                "ssh".into()
            }
        });
        let stopped = str_field("target_state").as_deref() == Some("stopped");
        let field = |k: &str| body.get(k).cloned().unwrap_or(Value::Null);
        Ok(Self {
            label,
            image,
            disk,
            bid,
            env,
            runtype,
            stopped,
            onstart: field("onstart"),
            args: field("args"),
            template_hash_id: field("template_hash_id"),
        })
    }
}

/// A 400 `invalid_args` answer to a create of `offer_id`.
fn invalid_create_args(offer_id: u64, msg: String) -> Response {
    util::json(
        StatusCode::BAD_REQUEST,
        &json!({"success": false, "error": "invalid_args", "msg": format!("error 400/3467: Invalid args: {msg}"), "ask_id": offer_id}),
    )
}

/// The container disk in GB: 10 when not given; `None` when it is not a number of at least 8.
fn requested_disk(body: &Map<String, Value>) -> Option<f64> {
    match body.get("disk") {
        None | Some(Value::Null) => Some(10.0),
        Some(v) => v.as_f64().filter(|d| *d >= 8.0),
    }
}

/// The bid (`price`) of an interruptible create, between 0.001 and 128.
fn requested_bid(offer_id: u64, body: &Map<String, Value>) -> Result<Option<f64>, Response> {
    match body.get("price") {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_f64() {
            Some(p) if (0.001..=128.0).contains(&p) => Ok(Some(p)),
            _ => Err(util::json(
                StatusCode::BAD_REQUEST,
                &json!({"success": false, "error": "invalid_price", "msg": "error 400/3468: price must be between 0.001 and 128", "ask_id": offer_id}),
            )),
        },
    }
}

/// The env entries, within Vast's limits: 256 characters each, 32768 in all.
fn requested_env(body: &Map<String, Value>) -> Result<Vec<(String, String)>, String> {
    let env = parse_env(body.get("env"))?;
    if env.iter().any(|(k, v)| k.len() + v.len() > 256)
        || env.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>() > 32_768
    {
        return Err("env entries are limited to 256 characters, 32768 in total".into());
    }
    Ok(env)
}

/// The offer a create asks for, if it exists and is still available.
fn pick_offer(st: &SimState, offer_id: u64) -> Result<VastOfferSpec, Response> {
    let Some(spec) = st.offers.iter().find(|o| o.id == offer_id).cloned() else {
        return Err(no_such_ask(offer_id));
    };
    if !st.offer_available(&spec) {
        return Err(no_such_ask(offer_id));
    }
    Ok(spec)
}

/// The new instance on `spec` and its instance API key. Draws from the simulator's seeded
/// generator in a fixed order (key, ports, SSH port, Jupyter token), so a seed gives the same
/// instance every time.
fn build_instance(
    st: &mut SimState,
    offer_id: u64,
    spec: &VastOfferSpec,
    request: CreateRequest,
    now: Timestamp,
) -> (Instance, String) {
    let offer = offer_json(spec, now, request.bid.is_some());
    let id = st.next_vast_id;
    st.next_vast_id += 1;
    let api_key = util::hex_id(&mut st.rng, 64);
    let (ports, worker_port) = instance_ports(&mut st.rng, &request.env, &request.runtype);
    let ssh_port = st.rng.random_range(20_000..30_000u16);
    let jupyter_token = util::hex_id(&mut st.rng, 64);
    let details = details(json!({
        "offer_id": offer_id,
        "offer": offer,
        "disk": request.disk,
        "runtype": request.runtype,
        "onstart": request.onstart,
        "args": request.args,
        "is_bid": request.bid.is_some(),
        "ssh_port": ssh_port,
        "jupyter_token": jupyter_token,
        "template_hash_id": request.template_hash_id,
    }));
    let inst = Instance {
        provider: Provider::Vast,
        id: id.to_string(),
        label: request.label,
        gpu_name: spec.gpu_name.clone(),
        num_gpus: spec.num_gpus,
        price_per_hour: request.bid.unwrap_or(spec.dph_total),
        image: request.image,
        env: request.env,
        ports,
        worker_port,
        phase: if request.stopped {
            Phase::Stopped
        } else {
            Phase::Provisioning
        },
        created_at: now,
        running_at: None,
        last_started_at: None,
        died_at: None,
        destroyed_at: None,
        last_status_change: now,
        generation: 0,
        worker: None,
        worker_started: None,
        die_on_next_job: false,
        outbid: false,
        executions: 0,
        details,
    };
    (inst, api_key)
}

/// The ports of a new instance (each with a made-up public port) and its worker's port: the
/// `-p` env entries, the worker port (from its env variable, else the first TCP port, else
/// 8000), 22 for an SSH runtype and 8080 for Jupyter.
fn instance_ports(
    rng: &mut StdRng,
    env: &[(String, String)],
    runtype: &str,
) -> (Vec<PortSpec>, u16) {
    let mut fake_port = || rng.random_range(20_000..30_000u16);
    let mut ports: Vec<PortSpec> = requested_ports(env)
        .into_iter()
        .map(|(port, proto)| PortSpec {
            port,
            proto,
            public: fake_port(),
        })
        .collect();
    let worker_port = env
        .iter()
        .find(|(k, _)| k == crate::ENV_WORKER_PORT)
        .and_then(|(_, v)| v.trim().parse().ok())
        .or_else(|| ports.iter().find(|p| p.proto == "tcp").map(|p| p.port))
        .unwrap_or(8000);
    if !ports
        .iter()
        .any(|p| p.port == worker_port && p.proto == "tcp")
    {
        ports.push(PortSpec {
            port: worker_port,
            proto: "tcp".into(),
            public: fake_port(),
        });
    }
    if runtype.contains("ssh") && !ports.iter().any(|p| p.port == 22) {
        ports.push(PortSpec {
            port: 22,
            proto: "tcp".into(),
            public: fake_port(),
        });
    }
    if runtype.contains("jupyter") && !ports.iter().any(|p| p.port == 8080) {
        ports.push(PortSpec {
            port: 8080,
            proto: "tcp".into(),
            public: fake_port(),
        });
    }
    (ports, worker_port)
}

/// Stores the new instance, then answers with its contract id and instance API key (unless a
/// ghost-create fault drops the answer after the instance exists).
fn store_and_respond(sim: &Arc<Sim>, slot: &OpSlot, inst: Instance, api_key: String) -> Response {
    let contract = inst.id.clone();
    slot.set_instance(contract.clone());
    instances::create(sim, inst);
    if let Some(r) = http::ghost_create(sim, "vast.create", Family::Vast) {
        return r;
    }
    let contract: u64 = contract.parse().unwrap_or_default();
    util::json(
        StatusCode::OK,
        &json!({"success": true, "new_contract": contract, "instance_api_key": api_key}),
    )
}

fn no_such_ask(offer_id: u64) -> Response {
    util::json(
        StatusCode::NOT_FOUND,
        &json!({
            "success": false,
            "error": "invalid_args",
            "msg": format!("error 404/3603: no_such_ask Instance type by id {offer_id} is not available."),
            "ask_id": offer_id,
        }),
    )
}

/// Offer fields a rented instance does not carry.
const OFFER_ONLY: &[&str] = &[
    "ask_contract_id",
    "rented",
    "rn",
    "bundled_results",
    "hostname",
    "gpu_ids",
    "discounted_dph_total",
];

/// The instance object as `show instance(s)` returns it: the offer it was created on,
/// overlaid with the instance's own fields.
pub fn instance_json(i: &Instance, now: Timestamp) -> Map<String, Value> {
    let mut m = i
        .details
        .get("offer")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    for k in OFFER_ONLY {
        m.remove(*k);
    }
    let gpu_ram = m.get("gpu_ram").cloned().unwrap_or(json!(0));
    m.extend(instance_status(i, now));
    m.extend(instance_container(i));
    m.extend(instance_network(i));
    m.extend(instance_usage(i, gpu_ram));
    m.extend(instance_billing(i));
    if i.phase == Phase::Running {
        m.insert("ports".into(), Value::Object(running_ports(i)));
    }
    m
}

/// `actual_status`, `intended_status`, `cur_state` (also `next_state`) and `status_msg`.
fn phase_status(i: &Instance) -> (Value, &'static str, &'static str, Value) {
    match i.phase {
        Phase::Provisioning => (Value::Null, "running", "running", Value::Null),
        Phase::Loading => (
            json!("loading"),
            "running",
            "running",
            json!(format!("Pulling image {}", i.image)),
        ),
        Phase::Running => (
            json!("running"),
            "running",
            "running",
            json!(format!("success, running {}/ssh", i.image)),
        ),
        Phase::Stopped if i.outbid => (
            json!("stopped"),
            "stopped",
            "stopped",
            json!("stopped: outbid by a higher bid (simulated)"),
        ),
        Phase::Stopped => (
            json!("stopped"),
            "stopped",
            "stopped",
            json!("stopped by user"),
        ),
        Phase::Dead => (
            json!("exited"),
            "running",
            "running",
            json!("Error: container exited unexpectedly (simulated)"),
        ),
        Phase::Destroyed => (json!("offline"), "stopped", "unloaded", json!("destroyed")),
    }
}

/// Instance fields naming it and telling its state and how long it has been up.
fn instance_status(i: &Instance, now: Timestamp) -> Map<String, Value> {
    let (actual, intended, cur, msg) = phase_status(i);
    let uptime = i
        .last_started_at
        .filter(|_| i.phase == Phase::Running)
        .map(|t| util::seconds_between(t, now) / 60.0);
    util::object(json!({
        "id": i.id.parse::<u64>().unwrap_or_default(),
        "label": i.label,
        "actual_status": actual,
        "intended_status": intended,
        "cur_state": cur,
        "next_state": cur,
        "status_msg": msg,
        "start_date": util::epoch_secs(i.created_at),
        "uptime_mins": uptime,
        "duration": util::seconds_between(i.created_at, now),
        "client_run_time": 1.1,
        "host_run_time": 2_592_000.0,
    }))
}

/// Instance fields describing its container: template, image, how it runs, env, storage.
fn instance_container(i: &Instance) -> Map<String, Value> {
    let extra_env: Vec<Value> = i.env.iter().map(|(k, v)| json!([k, v])).collect();
    util::object(json!({
        "template_id": null,
        "template_hash_id": i.details.get("template_hash_id").cloned().unwrap_or(Value::Null),
        "template_name": null,
        "image_uuid": i.image,
        "image_args": i.details.get("args").and_then(Value::as_array).cloned().unwrap_or_default(),
        "image_runtype": i.detail_str("runtype").unwrap_or("ssh"),
        "extra_env": extra_env,
        "onstart": i.detail_str("onstart").unwrap_or(""),
        "jupyter_token": i.detail_str("jupyter_token").unwrap_or(""),
        "disk_space": i.details.get("disk").cloned().unwrap_or(json!(10.0)),
        "volume_info": [],
    }))
}

/// Instance fields describing how to reach it: addresses, SSH and the direct port range.
fn instance_network(i: &Instance) -> Map<String, Value> {
    let ssh_port = i.detail_u64("ssh_port").unwrap_or(22_000);
    util::object(json!({
        "public_ipaddr": "127.0.0.1",
        "local_ipaddrs": "127.0.0.1 172.17.0.1 \n",
        "ssh_host": "127.0.0.1",
        "ssh_idx": "1",
        "ssh_port": ssh_port,
        "machine_dir_ssh_port": ssh_port + 1,
        "direct_port_start": 20_000,
        "direct_port_end": 29_999,
    }))
}

/// Instance fields describing its machine and how busy it is (idle figures while running).
fn instance_usage(i: &Instance, gpu_ram: Value) -> Map<String, Value> {
    let running = i.phase == Phase::Running;
    util::object(json!({
        "num_gpus": i.num_gpus,
        "gpu_name": i.gpu_name,
        "gpu_totalram": gpu_ram,
        "cpu_util": if running { 0.05 } else { 0.0 },
        "mem_limit": null,
        "mem_usage": null,
        "vmem_usage": null,
        "gpu_util": if running { json!(0.0) } else { Value::Null },
        "gpu_temp": if running { json!(45.0) } else { Value::Null },
        "disk_util": 0.0,
        "disk_usage": 0.0,
    }))
}

/// Instance fields about what it costs and how it is paid for.
fn instance_billing(i: &Instance) -> Map<String, Value> {
    util::object(json!({
        "is_bid": i.details.get("is_bid").and_then(Value::as_bool).unwrap_or(false),
        "dph_total": i.price_per_hour,
        "rentable": true,
        "credit_balance": null,
        "credit_discount": null,
    }))
}

/// The `ports` of a running instance: each `{port}/{proto}` with its outside port (the
/// worker's real loopback port for the worker's own).
fn running_ports(i: &Instance) -> Map<String, Value> {
    let mut ports = Map::new();
    for p in &i.ports {
        let host = if p.port == i.worker_port && p.proto == "tcp" {
            i.worker_host_port().unwrap_or(p.public)
        } else {
            p.public
        };
        ports.insert(
            format!("{}/{}", p.port, p.proto),
            json!([{"HostIp": "0.0.0.0", "HostPort": host.to_string()}]),
        );
    }
    ports
}

async fn show(
    State(sim): State<Arc<Sim>>,
    Extension(slot): Extension<OpSlot>,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
) -> Response {
    let q = util::query_pairs(raw.as_deref());
    if let Err(r) = gate(&sim, &slot, "vast.show", &headers, &q, AuthMode::Required).await {
        return r;
    }
    if id.trim().parse::<u64>().is_err() {
        return vast_error(
            StatusCode::BAD_REQUEST,
            "invalid_args",
            "error 400/1782: Invalid args: invalid instance id",
        );
    }
    slot.set_instance(id.clone());
    let now = util::now_ms();
    let st = sim.lock();
    let row = st
        .instance(Provider::Vast, id.trim())
        .filter(|i| !i.is_destroyed())
        .map(|i| Value::Object(instance_json(i, now)));
    util::json(StatusCode::OK, &json!({"instances": row}))
}

async fn destroy(
    State(sim): State<Arc<Sim>>,
    Extension(slot): Extension<OpSlot>,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
) -> Response {
    let q = util::query_pairs(raw.as_deref());
    if let Err(r) = gate(
        &sim,
        &slot,
        "vast.destroy",
        &headers,
        &q,
        AuthMode::Required,
    )
    .await
    {
        return r;
    }
    if id.trim().parse::<u64>().is_err() {
        return vast_error(
            StatusCode::BAD_REQUEST,
            "invalid_args",
            "invalid instance_id",
        );
    }
    slot.set_instance(id.clone());
    match instances::destroy(&sim, Provider::Vast, id.trim()) {
        Some(task) => {
            instances::reap(task).await;
            util::json(StatusCode::OK, &json!({"success": true}))
        }
        None => vast_error(StatusCode::NOT_FOUND, "not_found", "Instance not found"),
    }
}

/// `PUT /instances/{id}/`: a label change, a start or a stop, told apart by the body.
async fn manage(
    State(sim): State<Arc<Sim>>,
    Extension(slot): Extension<OpSlot>,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    slot.set("vast.manage");
    let q = util::query_pairs(raw.as_deref());
    let body = match body_object(&body) {
        Ok(b) => b,
        Err(r) => return r,
    };
    let op = manage_op(&body);
    if let Err(r) = gate(&sim, &slot, op, &headers, &q, AuthMode::Required).await {
        return r;
    }
    let id = id.trim().to_string();
    if id.parse::<u64>().is_err() {
        return vast_error(
            StatusCode::BAD_REQUEST,
            "invalid_args",
            "invalid instance id",
        );
    }
    slot.set_instance(id.clone());
    match op {
        "vast.label" => set_label(&sim, &id, &body),
        "vast.stop" => match instances::stop(&sim, Provider::Vast, &id) {
            Some(task) => {
                instances::reap(task).await;
                util::json(StatusCode::OK, &json!({"success": true}))
            }
            None => no_such_instance(&id),
        },
        "vast.start" => match instances::start(&sim, Provider::Vast, &id) {
            Some(()) => util::json(StatusCode::OK, &json!({"success": true})),
            None => no_such_instance(&id),
        },
        _ => vast_error(
            StatusCode::BAD_REQUEST,
            "invalid_args",
            "expected {\"label\": ...} or {\"state\": \"running\"|\"stopped\"}",
        ),
    }
}

/// The operation a manage body asks for: a `label` wins over a `state`.
fn manage_op(body: &Map<String, Value>) -> &'static str {
    if body.contains_key("label") {
        "vast.label"
    } else {
        match body.get("state").and_then(Value::as_str) {
            Some("running") => "vast.start",
            Some("stopped") => "vast.stop",
            _ => "vast.manage",
        }
    }
}

/// The 404 of a manage call on an unknown or destroyed instance.
fn no_such_instance(id: &str) -> Response {
    vast_error(
        StatusCode::NOT_FOUND,
        "no_such_instance",
        format!("Instance {id} not found."),
    )
}

/// Sets (or, with null, clears) the label of instance `id`.
fn set_label(sim: &Sim, id: &str, body: &Map<String, Value>) -> Response {
    let label = match body.get("label") {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Null) => None,
        Some(other) => Some(other.to_string()),
        None => None,
    };
    if label.as_ref().is_some_and(|l| l.chars().count() > 1024) {
        return vast_error(
            StatusCode::BAD_REQUEST,
            "label_too_long",
            "Please limit label length to 1024 characters, ideally less than 128.",
        );
    }
    let mut st = sim.lock();
    match st
        .instance_mut(Provider::Vast, id)
        .filter(|i| !i.is_destroyed())
    {
        Some(i) => {
            i.label = label.clone();
            util::json(
                StatusCode::OK,
                &json!({"success": true, "msg": format!("label for {id} set to '{}'", label.unwrap_or_default())}),
            )
        }
        None => no_such_instance(id),
    }
}

/// Alive instance rows (destroyed ones are gone from the real API), by id.
fn alive_rows(sim: &Sim) -> Vec<Map<String, Value>> {
    let now = util::now_ms();
    let st = sim.lock();
    st.instances
        .iter()
        .filter(|i| i.provider == Provider::Vast && !i.is_destroyed())
        .map(|i| instance_json(i, now))
        .collect()
}

async fn list_v0(
    State(sim): State<Arc<Sim>>,
    Extension(slot): Extension<OpSlot>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
) -> Response {
    let q = util::query_pairs(raw.as_deref());
    if let Err(r) = gate(&sim, &slot, "vast.list", &headers, &q, AuthMode::Required).await {
        return r;
    }
    let mut rows = alive_rows(&sim);
    query::sort_rows(&mut rows, &[]);
    util::json(
        StatusCode::OK,
        &json!({"instances_found": rows.len(), "instances": rows}),
    )
}

async fn filters(
    State(sim): State<Arc<Sim>>,
    Extension(slot): Extension<OpSlot>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
) -> Response {
    let q = util::query_pairs(raw.as_deref());
    if let Err(r) = gate(
        &sim,
        &slot,
        "vast.filters",
        &headers,
        &q,
        AuthMode::Required,
    )
    .await
    {
        return r;
    }
    let mut combos: Vec<Value> = Vec::new();
    for row in alive_rows(&sim) {
        let c = json!({
            "actual_status": row.get("actual_status").cloned().unwrap_or(Value::Null),
            "verification": row.get("verification").cloned().unwrap_or(Value::Null),
            "gpu_name": row.get("gpu_name").cloned().unwrap_or(Value::Null),
        });
        if !combos.contains(&c) {
            combos.push(c);
        }
    }
    util::json(StatusCode::OK, &json!({"filters": combos}))
}

/// Columns the v1 list refuses to filter on (computed, not stored).
const COMPUTED: &[&str] = &[
    "dph_total",
    "num_gpus",
    "duration",
    "dlperf_per_dphtotal",
    "flops_per_dphtotal",
];

fn invalid_request(msg: impl Into<String>) -> Response {
    util::json(
        StatusCode::BAD_REQUEST,
        &json!({"success": false, "error": "invalid_request", "msg": format!("Error in query parameters: {}", msg.into())}),
    )
}

/// A query parameter holding JSON (the CLI JSON-encodes dicts, lists and numbers).
fn json_param(q: &[(String, String)], key: &str) -> Result<Option<Value>, Response> {
    match util::query_get(q, key) {
        None => Ok(None),
        Some(raw) if raw.trim().is_empty() => Ok(None),
        Some(raw) => serde_json::from_str(raw)
            .map(Some)
            .map_err(|_| invalid_request(format!("{key} is not valid JSON"))),
    }
}

async fn list_v1(
    State(sim): State<Arc<Sim>>,
    Extension(slot): Extension<OpSlot>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
) -> Response {
    let q = util::query_pairs(raw.as_deref());
    if let Err(r) = gate(&sim, &slot, "vast.list", &headers, &q, AuthMode::Required).await {
        return r;
    }
    match list_v1_page(&sim, &q) {
        Ok(v) => util::json(StatusCode::OK, &v),
        Err(r) => r,
    }
}

/// One page of the v1 list: the query checked parameter by parameter (in this order), then
/// the matching rows ordered, counted, resumed after `after_token` and cut to the limit.
fn list_v1_page(sim: &Sim, q: &[(String, String)]) -> Result<Value, Response> {
    let filters = v1_filters(q)?;
    let keys = v1_order(q)?;
    let limit = v1_limit(q)?;
    let cols = v1_cols(q)?;
    let mut rows = v1_matching(sim, &filters)?;
    query::sort_rows(&mut rows, &keys);
    let total = rows.len();
    let label_counts = label_counts(&rows);
    if let Some(token) = util::query_get(q, "after_token").filter(|t| !t.is_empty()) {
        let values = token_values(token)?;
        rows.retain(|r| query::row_cmp(r, &values, &keys) == std::cmp::Ordering::Greater);
    }
    let more = rows.len() > limit;
    rows.truncate(limit);
    let next_token = if more {
        rows.last().map(|last| page_token(last, &keys))
    } else {
        None
    };
    let rows: Vec<Value> = rows
        .into_iter()
        .map(|r| select_cols(r, cols.as_deref()))
        .collect();
    Ok(json!({
        "success": true,
        "instances_found": rows.len(),
        "total_instances": total,
        "label_counts": label_counts,
        "next_token": next_token,
        "instances": rows,
    }))
}

/// `select_filters`: column to condition (none when absent).
fn v1_filters(q: &[(String, String)]) -> Result<Map<String, Value>, Response> {
    match json_param(q, "select_filters")? {
        None | Some(Value::Null) => Ok(Map::new()),
        Some(Value::Object(m)) => Ok(m),
        Some(_) => Err(invalid_request("select_filters must be an object")),
    }
}

/// `order_by` as sort keys (column, descending), ending with `id` when it is not there.
fn v1_order(q: &[(String, String)]) -> Result<Vec<(String, bool)>, Response> {
    let mut keys: Vec<(String, bool)> = Vec::new();
    match json_param(q, "order_by")? {
        None | Some(Value::Null) => {}
        Some(Value::Array(items)) => {
            for item in items {
                let col = item
                    .get("col")
                    .and_then(Value::as_str)
                    .ok_or_else(|| invalid_request("order_by entries need a col"))?;
                let dir = item.get("dir").and_then(Value::as_str).unwrap_or("asc");
                keys.push((col.to_string(), dir.eq_ignore_ascii_case("desc")));
            }
        }
        Some(_) => return Err(invalid_request("order_by must be a list of {col, dir}")),
    }
    if !keys.iter().any(|(c, _)| c == "id") {
        keys.push(("id".into(), false));
    }
    Ok(keys)
}

/// The page size: 25 by default and at most, 5 for a limit of zero or less.
fn v1_limit(q: &[(String, String)]) -> Result<usize, Response> {
    Ok(match json_param(q, "limit")? {
        None | Some(Value::Null) => 25,
        Some(v) => {
            let n = v
                .as_i64()
                .or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()))
                .ok_or_else(|| invalid_request("limit must be an integer"))?;
            if n <= 0 { 5 } else { n.min(25) as usize }
        }
    })
}

/// `select_cols`: the columns to return, `None` for all (absent, or `*` among them).
fn v1_cols(q: &[(String, String)]) -> Result<Option<Vec<String>>, Response> {
    match json_param(q, "select_cols")? {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(items)) => {
            let cols: Vec<String> = items
                .iter()
                .filter_map(|c| c.as_str().map(str::to_string))
                .collect();
            Ok((!cols.iter().any(|c| c == "*")).then_some(cols))
        }
        Some(_) => Err(invalid_request("select_cols must be a list")),
    }
}

/// The alive rows that pass every filter; a filter on a computed column is refused.
fn v1_matching(
    sim: &Sim,
    filters: &Map<String, Value>,
) -> Result<Vec<Map<String, Value>>, Response> {
    let mut rows = Vec::new();
    for row in alive_rows(sim) {
        let mut ok = true;
        for (col, cond) in filters {
            if COMPUTED.contains(&col.as_str()) {
                return Err(invalid_request(format!("{col} is not a valid search key")));
            }
            let actual = row.get(col).cloned().unwrap_or(Value::Null);
            if !query::passes(col, &actual, cond).map_err(invalid_request)? {
                ok = false;
                break;
            }
        }
        if ok {
            rows.push(row);
        }
    }
    Ok(rows)
}

/// How many rows carry each label (no label counts as `""`).
fn label_counts(rows: &[Map<String, Value>]) -> Map<String, Value> {
    let mut counts = Map::new();
    for row in rows {
        let label = row
            .get("label")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let n = counts.get(&label).and_then(Value::as_u64).unwrap_or(0);
        counts.insert(label, json!(n + 1));
    }
    counts
}

/// The sort-key values an `after_token` carries (base64 of `{"values": {...}}`).
fn token_values(token: &str) -> Result<Map<String, Value>, Response> {
    let bad = || {
        util::json(
            StatusCode::BAD_REQUEST,
            &json!({"success": false, "error": "invalid_token", "msg": "Error in query parameters: invalid after_token"}),
        )
    };
    let decoded = util::b64_decode(token).ok_or_else(bad)?;
    serde_json::from_slice::<Value>(&decoded)
        .ok()
        .and_then(|v| v.get("values").and_then(Value::as_object).cloned())
        .ok_or_else(bad)
}

/// The `next_token` that resumes after `last`: its values of the sort keys.
fn page_token(last: &Map<String, Value>, keys: &[(String, bool)]) -> String {
    let values: Map<String, Value> = keys
        .iter()
        .map(|(c, _)| (c.clone(), last.get(c).cloned().unwrap_or(Value::Null)))
        .collect();
    util::b64_encode(json!({"values": values}).to_string().as_bytes())
}

/// A row cut to the selected columns (and `id`), or whole when no columns are selected.
fn select_cols(r: Map<String, Value>, cols: Option<&[String]>) -> Value {
    match cols {
        None => Value::Object(r),
        Some(cols) => {
            let mut m = Map::new();
            for c in cols.iter().chain(std::iter::once(&"id".to_string())) {
                if let Some(v) = r.get(c) {
                    m.insert(c.clone(), v.clone());
                }
            }
            Value::Object(m)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_accepts_object_and_docker_flag_string() {
        let obj = json!({"A": "1", "-p 8000:8000": "1", "N": 5});
        let env = parse_env(Some(&obj)).unwrap();
        assert!(env.contains(&("N".into(), "5".into())));
        let s = json!("-e HF=abc -p 8000:8000 -p 8082:8082/udp -h host");
        let env = parse_env(Some(&s)).unwrap();
        assert_eq!(env[0], ("HF".into(), "abc".into()));
        assert_eq!(
            requested_ports(&env),
            vec![(8000, "tcp".into()), (8082, "udp".into())]
        );
    }

    #[test]
    fn offer_has_the_fields_the_cli_reads() {
        let spec = VastOfferSpec {
            id: 9,
            gpu_name: "RTX 4090".into(),
            num_gpus: 2,
            dph_total: 0.8,
            reliability2: 0.99,
            geolocation: "Oregon, US".into(),
            direct_port_count: 10,
            verification: "verified".into(),
            capacity: 1,
            extra: [("cuda_max_good".to_string(), json!(12.8))]
                .into_iter()
                .collect(),
        };
        let o = offer_json(&spec, util::now_ms(), false);
        for k in [
            "id",
            "gpu_name",
            "num_gpus",
            "dph_total",
            "reliability2",
            "geolocation",
            "direct_port_count",
            "verification",
            "cpu_ram",
            "gpu_ram",
            "disk_space",
            "score",
            "duration",
        ] {
            assert!(o.contains_key(k), "{k}");
        }
        assert_eq!(o["cuda_max_good"], json!(12.8));
        assert_eq!(o["gpu_total_ram"], json!(2 * 24_564));
    }
}
