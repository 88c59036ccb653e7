//! RunPod's GraphQL API (`POST /graphql`, providers.md §2.2-2.5, 2.9): GPU types, pods
//! (create, inspect, stop, resume, terminate) and serverless endpoint settings.
//!
//! Requests are parsed as real GraphQL (inline literals with bare enums, or `variables`);
//! each root field's resolver builds whole entities that are projected through the
//! selection set. Resolver errors come back as HTTP 200 with `errors` and `data: null`;
//! unparsable documents and unknown root fields as HTTP 400, as GraphQL servers do.

use std::sync::Arc;

use axum::{
    Extension, Router,
    body::Bytes,
    extract::{RawQuery, State},
    http::{HeaderMap, StatusCode},
    response::Response,
    routing::post,
};
use jiff::Timestamp;
use serde_json::{Map, Value, json};

use super::{
    config::GpuTypeSpec,
    graphql::{self, Kind},
    http::{self, AuthMode, Family, OpSlot},
    instances, pods,
    pods::{CreateError, PodRequest},
    serverless,
    state::{Provider, Sim, State as SimState},
    util,
};

pub fn routes() -> Router<Arc<Sim>> {
    Router::new().route("/graphql", post(handle))
}

/// A resolver's failure: the message clients show, and the `extensions.code`.
struct GqlError {
    message: String,
    code: &'static str,
}

impl GqlError {
    fn new(message: impl Into<String>, code: &'static str) -> Self {
        Self {
            message: message.into(),
            code,
        }
    }
}

fn bad_request(message: &str, code: &str) -> Response {
    util::json(
        StatusCode::BAD_REQUEST,
        &json!({"errors": [{"message": message, "extensions": {"code": code}}]}),
    )
}

const QUERY_FIELDS: &[&str] = &["gpuTypes", "pod", "myself"];
const MUTATION_FIELDS: &[&str] = &[
    "podFindAndDeployOnDemand",
    "podRentInterruptable",
    "deployCpuPod",
    "podStop",
    "podResume",
    "podBidResume",
    "podTerminate",
    "saveEndpoint",
    "deleteEndpoint",
];

/// A root field to resolve, taken out of the parsed document so that nothing borrowed from
/// it is held across an `.await` (the document is parsed again to project the results).
struct RootCall {
    key: String,
    name: String,
    args: Map<String, Value>,
}

/// Deepest bracket nesting outside string literals. The parser is recursive, so absurdly
/// deep documents are refused before parsing rather than risking the stack.
fn nesting_depth(text: &str) -> usize {
    let (mut depth, mut max, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for c in text.chars() {
        if in_string {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => in_string = true,
            '{' | '[' | '(' => {
                depth += 1;
                max = max.max(depth);
            }
            '}' | ']' | ')' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

/// Deepest nesting a document may have (real queries stay under 10).
const MAX_DEPTH: usize = 64;

/// Parses and validates the request; the root fields to resolve, or the 400 to send.
fn plan(
    text: &str,
    op_name: Option<&str>,
    vars: &Map<String, Value>,
) -> Result<(Kind, Vec<RootCall>), Response> {
    if nesting_depth(text) > MAX_DEPTH {
        return Err(bad_request(
            "Query is nested too deeply.",
            "GRAPHQL_VALIDATION_FAILED",
        ));
    }
    let doc = graphql::parse(text)
        .map_err(|e| bad_request(&format!("Syntax Error: {e}"), "GRAPHQL_PARSE_FAILED"))?;
    let request = graphql::Request::new(&doc, op_name, vars)
        .map_err(|e| bad_request(&e, "GRAPHQL_VALIDATION_FAILED"))?;
    let known = match request.kind {
        Kind::Query => QUERY_FIELDS,
        Kind::Mutation => MUTATION_FIELDS,
    };
    let mut calls = Vec::new();
    for f in request.fields(request.selection) {
        if f.name != "__typename" && !known.contains(&f.name) {
            return Err(bad_request(
                &format!(
                    "Cannot query field \"{}\" on type \"{}\".",
                    f.name,
                    request.kind.type_name()
                ),
                "GRAPHQL_VALIDATION_FAILED",
            ));
        }
        calls.push(RootCall {
            key: f.alias.unwrap_or(f.name).to_string(),
            name: f.name.to_string(),
            args: request.args(f),
        });
    }
    Ok((request.kind, calls))
}

/// Projects each resolved root value through its field's selection set.
fn project_all(
    sim: &Sim,
    text: &str,
    op_name: Option<&str>,
    vars: &Map<String, Value>,
    results: Vec<Value>,
) -> Map<String, Value> {
    let mut data = Map::new();
    let (Ok(doc), free) = (graphql::parse(text), gpu_snapshot(sim)) else {
        return data;
    };
    let Ok(request) = graphql::Request::new(&doc, op_name, vars) else {
        return data;
    };
    let hook = |parent: &Map<String, Value>, name: &str, a: &Map<String, Value>| {
        lowest_price(&free, parent, name, a)
    };
    for (f, value) in request.fields(request.selection).into_iter().zip(results) {
        let key = f.alias.unwrap_or(f.name).to_string();
        let v = if f.selection_set.items.is_empty() {
            value
        } else {
            request.project(&value, &f.selection_set, &hook)
        };
        data.insert(key, v);
    }
    data
}

/// `POST /graphql`: authentication, the body, the document, the faults of the first root
/// field's operation, then every root field resolved in order and projected.
async fn handle(
    State(sim): State<Arc<Sim>>,
    Extension(slot): Extension<OpSlot>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    slot.set("runpod.graphql");
    let q = util::query_pairs(raw.as_deref());
    let key = http::provided_key(&headers, &q);
    if let Err(r) = http::check_auth(&sim, Family::Graphql, key.as_deref(), AuthMode::Required) {
        return r;
    }
    let GqlBody {
        text,
        vars,
        op_name,
    } = match parse_body(&body) {
        Ok(b) => b,
        Err(r) => return r,
    };
    let (kind, calls) = match plan(&text, op_name.as_deref(), &vars) {
        Ok(p) => p,
        Err(r) => return r,
    };
    let op = format!(
        "runpod.{}",
        calls.first().map(|c| c.name.as_str()).unwrap_or("graphql")
    );
    slot.set(op.clone());
    if let Err(r) = http::delay_faults(&sim, &op, Family::Graphql).await {
        return r;
    }
    if let Err(r) = http::status_faults(&sim, &op, Family::Graphql) {
        return r;
    }
    let (results, errors) = match resolve_all(&sim, &slot, &op, kind, &calls).await {
        Ok(r) => r,
        Err(ghost) => return ghost,
    };
    if !errors.is_empty() {
        return util::json(StatusCode::OK, &json!({"errors": errors, "data": null}));
    }
    let data = project_all(&sim, &text, op_name.as_deref(), &vars, results);
    util::json(StatusCode::OK, &json!({"data": data}))
}

/// A GraphQL request body: the document, its variables and the operation to run.
struct GqlBody {
    text: String,
    vars: Map<String, Value>,
    op_name: Option<String>,
}

/// The request body's `query`, `variables` and `operationName`.
fn parse_body(body: &Bytes) -> Result<GqlBody, Response> {
    let Ok(Value::Object(req)) = serde_json::from_slice::<Value>(body) else {
        return Err(bad_request(
            "POST body must be a JSON object with a \"query\" string.",
            "BAD_REQUEST",
        ));
    };
    let Some(text) = req.get("query").and_then(Value::as_str).map(str::to_string) else {
        return Err(bad_request(
            "POST body must contain a \"query\" string.",
            "BAD_REQUEST",
        ));
    };
    let vars = match req.get("variables") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m.clone(),
        Some(_) => {
            return Err(bad_request(
                "\"variables\" must be an object.",
                "BAD_REQUEST",
            ));
        }
    };
    let op_name = req
        .get("operationName")
        .and_then(Value::as_str)
        .map(str::to_string);
    Ok(GqlBody {
        text,
        vars,
        op_name,
    })
}

/// Resolves every root field in order: the results (null where one failed) and the
/// errors, or the ghost-create fault's answer once every field has been resolved.
async fn resolve_all(
    sim: &Arc<Sim>,
    slot: &OpSlot,
    op: &str,
    kind: Kind,
    calls: &[RootCall],
) -> Result<(Vec<Value>, Vec<Value>), Response> {
    let mut results = Vec::new();
    let mut errors = Vec::new();
    let mut ghost = None;
    for call in calls {
        if call.name == "__typename" {
            results.push(json!(kind.type_name()));
            continue;
        }
        let input = call
            .args
            .get("input")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        match resolve(sim, slot, &call.name, &call.args, &input).await {
            Ok(v) => {
                if matches!(
                    call.name.as_str(),
                    "podFindAndDeployOnDemand" | "podRentInterruptable"
                ) {
                    ghost = http::ghost_create(sim, op, Family::Graphql);
                }
                results.push(v);
            }
            Err(e) => {
                errors.push(json!({"message": e.message, "path": [call.key], "extensions": {"code": e.code}}));
                results.push(Value::Null);
            }
        }
    }
    match ghost {
        Some(r) => Err(r),
        None => Ok((results, errors)),
    }
}

/// Free GPUs per type id, taken once per request for `lowestPrice`.
fn gpu_snapshot(sim: &Sim) -> Vec<(String, u32)> {
    let st = sim.lock();
    st.gpu_types
        .iter()
        .map(|t| (t.id.clone(), st.gpus_free(t)))
        .collect()
}

fn stock_status(free: u32) -> Value {
    match free {
        0 => Value::Null,
        1..=2 => json!("Low"),
        3..=7 => json!("Medium"),
        _ => json!("High"),
    }
}

/// `GpuType.lowestPrice(input: {gpuCount, secureCloud?})`, computed per request.
fn lowest_price(
    free: &[(String, u32)],
    parent: &Map<String, Value>,
    field: &str,
    args: &Map<String, Value>,
) -> Option<Value> {
    if field != "lowestPrice" || parent.get("__typename").and_then(Value::as_str) != Some("GpuType")
    {
        return None;
    }
    let id = parent.get("id").and_then(Value::as_str)?;
    let input = args.get("input").and_then(Value::as_object);
    let count = input
        .and_then(|i| i.get("gpuCount"))
        .and_then(Value::as_u64)
        .unwrap_or(1)
        .max(1);
    let secure = input
        .and_then(|i| i.get("secureCloud"))
        .and_then(Value::as_bool);
    let avail = free
        .iter()
        .find(|(t, _)| t == id)
        .map(|(_, n)| *n)
        .unwrap_or(0);
    let price = |k: &str| parent.get(k).and_then(Value::as_f64);
    let unit = match secure {
        Some(true) => price("securePrice"),
        Some(false) => price("communityPrice"),
        None => match (price("securePrice"), price("communityPrice")) {
            (Some(s), Some(c)) => Some(s.min(c)),
            (s, c) => s.or(c),
        },
    };
    let fits = u64::from(avail) >= count && unit.is_some();
    let counts: Vec<u32> = [1u32, 2, 4, 8]
        .into_iter()
        .filter(|n| *n <= avail)
        .collect();
    Some(json!({
        "gpuCount": count,
        "minimumBidPrice": if fits { price("communitySpotPrice") } else { None },
        "uninterruptablePrice": if fits { unit } else { None },
        "minVcpu": 8 * count,
        "minMemory": 31 * count,
        "stockStatus": if fits { stock_status(avail) } else { Value::Null },
        "availableGpuCounts": counts,
        "countryCode": "US",
        "rentalPercentage": 0.5,
    }))
}

fn gpu_type_entity(st: &SimState, t: &GpuTypeSpec) -> Value {
    let free = st.gpus_free(t);
    let spot = |p: Option<f64>| p.map(|p| (p * 0.6 * 1000.0).round() / 1000.0);
    let cuda_cores = if t.display_name.contains("4090") {
        16_384
    } else if t.display_name.contains("3090") {
        10_496
    } else {
        3_584
    };
    json!({
        "__typename": "GpuType",
        "id": t.id,
        "displayName": t.display_name,
        "manufacturer": "Nvidia",
        "memoryInGb": t.memory_in_gb,
        "cudaCores": cuda_cores,
        "secureCloud": t.secure_price.is_some(),
        "communityCloud": t.community_price.is_some(),
        "securePrice": t.secure_price,
        "communityPrice": t.community_price,
        "oneWeekPrice": t.secure_price.or(t.community_price),
        "oneMonthPrice": t.secure_price.or(t.community_price).map(|p| p * 0.95),
        "threeMonthPrice": t.secure_price.or(t.community_price).map(|p| p * 0.9),
        "sixMonthPrice": t.secure_price.or(t.community_price).map(|p| p * 0.85),
        "communitySpotPrice": spot(t.community_price),
        "secureSpotPrice": spot(t.secure_price),
        "maxGpuCount": t.max_gpu_count,
        "maxGpuCountSecureCloud": if t.secure_price.is_some() { t.max_gpu_count } else { 0 },
        "maxGpuCountCommunityCloud": if t.community_price.is_some() { t.max_gpu_count } else { 0 },
        "stockStatus": stock_status(free),
        "nodeGroupDatacenters": [],
    })
}

fn myself(st: &SimState, now: Timestamp) -> Value {
    let pods: Vec<Value> = st
        .instances
        .iter()
        .filter(|i| i.provider == Provider::RunPod && !i.is_destroyed())
        .map(|i| pods::graphql_pod(i, now))
        .collect();
    let spend: f64 = st
        .instances
        .iter()
        .filter(|i| i.provider == Provider::RunPod && !i.is_destroyed())
        .map(|i| i.price_per_hour)
        .sum();
    let endpoints: Vec<Value> = st
        .endpoints
        .iter()
        .map(serverless::graphql_endpoint)
        .collect();
    json!({
        "__typename": "User",
        "id": "user_sim",
        "email": "sim@example.invalid",
        "pubKey": "",
        "clientBalance": 1000.0,
        "currentSpendPerHr": spend,
        "spendLimit": 5000,
        "networkVolumes": [],
        "pods": pods,
        "endpoints": endpoints,
    })
}

fn str_of(input: &Map<String, Value>, key: &str) -> Option<String> {
    input.get(key).and_then(Value::as_str).map(str::to_string)
}

/// A pod create input (GraphQL spelling) as a [`PodRequest`]; the first problem, in this
/// order (ports, env, GPU type, count, cloud, bid), is the answer.
fn pod_request(input: &Map<String, Value>, spot: bool) -> Result<PodRequest, GqlError> {
    let ports = input_ports(input)?;
    let env = input_env(input)?;
    let gpu_type = str_of(input, "gpuTypeId").filter(|s| !s.is_empty());
    let Some(gpu_type) = gpu_type else {
        return Err(bad_input("gpuTypeId is required".into()));
    };
    let gpu_count = match input.get("gpuCount") {
        None | Some(Value::Null) => 1,
        Some(v) => {
            v.as_u64()
                .ok_or_else(|| bad_input("gpuCount must be an integer".into()))? as u32
        }
    };
    let cloud = str_of(input, "cloudType")
        .unwrap_or_else(|| "ALL".into())
        .to_ascii_uppercase();
    if !matches!(cloud.as_str(), "ALL" | "SECURE" | "COMMUNITY") {
        return Err(bad_input(format!(
            "Value \"{cloud}\" does not exist in \"CloudTypeEnum\" enum."
        )));
    }
    let bid = input.get("bidPerGpu").and_then(Value::as_f64);
    if spot && bid.is_none() {
        return Err(bad_input("bidPerGpu is required".into()));
    }
    let num = |k: &str, d: u64| input.get(k).and_then(Value::as_u64).unwrap_or(d);
    Ok(PodRequest {
        name: str_of(input, "name").unwrap_or_default(),
        image: str_of(input, "imageName").unwrap_or_default(),
        gpu_type_ids: vec![gpu_type],
        gpu_count,
        cloud_type: cloud,
        container_disk_gb: num("containerDiskInGb", 10),
        volume_gb: num("volumeInGb", 0),
        volume_mount_path: str_of(input, "volumeMountPath").unwrap_or_else(|| "/workspace".into()),
        ports,
        env,
        docker_args: str_of(input, "dockerArgs").unwrap_or_default(),
        support_public_ip: input
            .get("supportPublicIp")
            .and_then(Value::as_bool)
            .unwrap_or(true),
        data_center_id: str_of(input, "dataCenterId"),
        template_id: str_of(input, "templateId"),
        bid_per_gpu: bid,
        interruptible: spot,
    })
}

/// A `BAD_USER_INPUT` error.
fn bad_input(m: String) -> GqlError {
    GqlError::new(m, "BAD_USER_INPUT")
}

/// `ports`: a `"8000/http,22/tcp"` string.
fn input_ports(input: &Map<String, Value>) -> Result<Vec<(u16, String)>, GqlError> {
    match input.get("ports") {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) => pods::parse_ports(s).map_err(bad_input),
        Some(_) => Err(bad_input(
            "ports must be a string like \"8000/http,22/tcp\"".into(),
        )),
    }
}

/// `env`: a list of `{key, value}` (non-string values as their JSON text, null as empty).
fn input_env(input: &Map<String, Value>) -> Result<Vec<(String, String)>, GqlError> {
    match input.get("env") {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|e| {
                let k = e.get("key").and_then(Value::as_str);
                let v = e.get("value").map(|v| match v {
                    Value::String(s) => s.clone(),
                    Value::Null => String::new(),
                    other => other.to_string(),
                });
                match (k, v) {
                    (Some(k), Some(v)) => Ok((k.to_string(), v)),
                    _ => Err(bad_input("env entries must be {key, value}".into())),
                }
            })
            .collect(),
        Some(_) => Err(bad_input("env must be a list of {key, value}".into())),
    }
}

fn pod_id(input: &Map<String, Value>) -> Result<String, GqlError> {
    str_of(input, "podId")
        .filter(|s| !s.is_empty())
        .ok_or_else(|| GqlError::new("podId is required", "BAD_USER_INPUT"))
}

fn pod_not_found() -> GqlError {
    GqlError::new("Pod not found.", "NOT_FOUND")
}

fn pod_view(sim: &Sim, id: &str) -> Option<Value> {
    let now = util::now_ms();
    let st = sim.lock();
    st.instance(Provider::RunPod, id)
        .filter(|i| !i.is_destroyed())
        .map(|i| pods::graphql_pod(i, now))
}

/// Resolves one root field to its whole entity.
async fn resolve(
    sim: &Arc<Sim>,
    slot: &OpSlot,
    field: &str,
    args: &Map<String, Value>,
    input: &Map<String, Value>,
) -> Result<Value, GqlError> {
    let now = util::now_ms();
    match field {
        "gpuTypes" => Ok(gpu_types(&sim.lock(), input)),
        "pod" => {
            let id = pod_id(input)?;
            slot.set_instance(id.clone());
            Ok(pod_view(sim, &id).unwrap_or(Value::Null))
        }
        "myself" => Ok(myself(&sim.lock(), now)),
        "podFindAndDeployOnDemand" | "podRentInterruptable" => {
            deploy(sim, slot, input, field == "podRentInterruptable")
        }
        "deployCpuPod" => Err(GqlError::new(
            "CPU pods are not simulated.",
            "BAD_USER_INPUT",
        )),
        "podStop" => {
            let id = pod_id(input)?;
            slot.set_instance(id.clone());
            let task = instances::stop(sim, Provider::RunPod, &id).ok_or_else(pod_not_found)?;
            instances::reap(task).await;
            pod_view(sim, &id).ok_or_else(pod_not_found)
        }
        "podResume" | "podBidResume" => {
            let id = pod_id(input)?;
            slot.set_instance(id.clone());
            instances::start(sim, Provider::RunPod, &id).ok_or_else(pod_not_found)?;
            pod_view(sim, &id).ok_or_else(pod_not_found)
        }
        "podTerminate" => {
            let id = pod_id(input)?;
            slot.set_instance(id.clone());
            let task = instances::destroy(sim, Provider::RunPod, &id).ok_or_else(pod_not_found)?;
            instances::reap(task).await;
            Ok(Value::Null)
        }
        "saveEndpoint" => serverless::save_endpoint(sim, input).map_err(bad_input),
        "deleteEndpoint" => {
            let id = args.get("id").and_then(Value::as_str).unwrap_or_default();
            serverless::delete_endpoint(sim, id)
                .map(|()| Value::Null)
                .map_err(bad_input)
        }
        other => Err(GqlError::new(
            format!("Cannot query field \"{other}\"."),
            "GRAPHQL_VALIDATION_FAILED",
        )),
    }
}

/// `gpuTypes(input: {id} | {ids})`: the GPU types, all of them without a filter.
fn gpu_types(st: &SimState, input: &Map<String, Value>) -> Value {
    let ids: Option<Vec<String>> = match (input.get("id"), input.get("ids")) {
        (Some(Value::String(id)), _) => Some(vec![id.clone()]),
        (_, Some(Value::Array(ids))) => Some(
            ids.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect(),
        ),
        _ => None,
    };
    Value::Array(
        st.gpu_types
            .iter()
            .filter(|t| ids.as_ref().is_none_or(|ids| ids.contains(&t.id)))
            .map(|t| gpu_type_entity(st, t))
            .collect(),
    )
}

/// `podFindAndDeployOnDemand` / `podRentInterruptable` (`spot`): the new pod.
fn deploy(
    sim: &Arc<Sim>,
    slot: &OpSlot,
    input: &Map<String, Value>,
    spot: bool,
) -> Result<Value, GqlError> {
    let req = pod_request(input, spot)?;
    match pods::create(sim, &req) {
        Ok(id) => {
            slot.set_instance(id.clone());
            pod_view(sim, &id).ok_or_else(|| GqlError::new("pod vanished", "INTERNAL_SERVER_ERROR"))
        }
        Err(CreateError::NoCapacity) => {
            Err(GqlError::new(pods::NO_CAPACITY, "INTERNAL_SERVER_ERROR"))
        }
        Err(CreateError::Invalid(m)) => Err(bad_input(m)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nesting_ignores_brackets_inside_strings() {
        assert_eq!(nesting_depth(r#"{ a(input: {b: "}}}{{{{"}) { c } }"#), 3);
        assert_eq!(nesting_depth(r#"{ a(s: "x\"{{{") }"#), 2);
        assert!(nesting_depth(&"{".repeat(100_000)) > MAX_DEPTH);
    }
}
