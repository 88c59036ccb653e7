//! REST v2 pods: create, list (paged), get, update, delete and the state actions, over the
//! simulator's one set of RunPod pods, rendered as the document's `Pod`.
//!
//! Status is the instance's phase in v2's words: provisioning `PROVISIONING`, loading
//! `STARTING`, running `RUNNING`, stopped `EXITED`, dead (the container died: the kill knob,
//! a job that kills its machine) `ERROR`. Terminated pods are gone from every answer.

use std::sync::Arc;

use axum::{
    body::Bytes,
    extract::{Path, State},
    http::StatusCode,
    response::Response,
};
use jiff::Timestamp;
use serde_json::{Map, Value, json};

use super::check::{Check, at};
use super::{
    super::{
        http::{self, Family},
        instances,
        pods::{self as rp, CreateError, PodRequest},
        state::{Instance, Phase, PortSpec, Provider, Sim},
        util,
    },
    Call, bad_request, body_object, conflict, no_content, not_found, ok, unprocessable,
};

/// The status of a pod in v2's enum.
fn status(phase: Phase) -> &'static str {
    match phase {
        Phase::Provisioning => "PROVISIONING",
        Phase::Loading => "STARTING",
        Phase::Running => "RUNNING",
        Phase::Stopped => "EXITED",
        Phase::Dead => "ERROR",
        Phase::Destroyed => "TERMINATED",
    }
}

/// The actions valid in a status, as the document lists them.
fn actions(phase: Phase) -> &'static [&'static str] {
    match phase {
        Phase::Running => &["stop", "restart", "terminate"],
        Phase::Stopped | Phase::Dead => &["start", "terminate"],
        Phase::Provisioning | Phase::Loading => &["stop", "terminate"],
        Phase::Destroyed => &[],
    }
}

/// The v2 `Pod` of an instance.
pub fn pod_json(i: &Instance, now: Timestamp) -> Value {
    let env: Map<String, Value> = i.env.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
    let volume = i.detail_u64("volume_gb").unwrap_or(0);
    let mounts = if volume > 0 {
        json!({"persistent": {"size": volume, "path": i.detail_str("volume_mount_path").unwrap_or("/workspace")}})
    } else {
        json!({})
    };
    let cost = match i.phase {
        Phase::Stopped | Phase::Destroyed => 0.0,
        _ => i.price_per_hour,
    };
    let flag = |k: &str| i.details.get(k).and_then(Value::as_bool).unwrap_or(false);
    json!({
        "id": i.id,
        "name": i.label.clone().unwrap_or_default(),
        "status": status(i.phase),
        "actions": actions(i.phase),
        "image": i.image,
        "args": i.detail_str("docker_args").unwrap_or_default(),
        "disk": i.detail_u64("container_disk_gb").unwrap_or(50).max(1),
        "mounts": mounts,
        "ports": i.ports.iter().map(|p| format!("{}/{}", p.port, p.proto)).collect::<Vec<_>>(),
        "env": env,
        "registry": i.details.get("registry").cloned().unwrap_or(Value::Null),
        "gpu": {"id": i.detail_str("gpu_type_id").unwrap_or_default(), "count": i.num_gpus},
        "cloud": i.detail_str("cloud").unwrap_or("SECURE"),
        "dataCenterId": i.detail_str("data_center_id"),
        "cudaVersion": "12.8",
        "ssh": ssh(i),
        "template": i.details.get("template_id").cloned().unwrap_or(Value::Null),
        "cost": cost,
        "locked": flag("locked"),
        "globalNetworking": {"enabled": flag("global_networking")},
        "runtime": (i.phase == Phase::Running).then(|| runtime(i, now)),
        "createdAt": util::rfc3339(i.created_at),
        "startedAt": i.last_started_at.map(util::rfc3339),
    })
}

/// `ssh`: direct to the `22/tcp` port while running; no RunPod ssh proxy here.
fn ssh(i: &Instance) -> Value {
    let direct = i
        .ports
        .iter()
        .find(|p| p.port == 22 && p.proto == "tcp")
        .filter(|_| i.phase == Phase::Running)
        .map(|p| {
            let port = rp::public_port(i, p);
            json!({"host": "127.0.0.1", "port": port, "username": "root",
                   "command": format!("ssh root@127.0.0.1 -p {port}")})
        });
    json!({"proxy": null, "direct": direct})
}

/// `runtime` of a running pod: tcp ports public on 127.0.0.1 (the worker's with its real
/// port), http ports on the pod's private 100.65.x.y address behind the proxy.
fn runtime(i: &Instance, now: Timestamp) -> Value {
    let ports: Vec<Value> = i
        .ports
        .iter()
        .map(|p| {
            if p.proto == "http" {
                json!({"private": p.port, "public": p.public, "type": "http",
                       "ip": i.detail_str("private_ip").unwrap_or("100.65.0.2")})
            } else {
                json!({"private": p.port, "public": rp::public_port(i, p), "type": "tcp", "ip": "127.0.0.1"})
            }
        })
        .collect();
    let gpus: Vec<Value> = (0..i.num_gpus)
        .map(|_| json!({"util": 0, "memoryUtil": 0}))
        .collect();
    json!({
        "uptime": rp::uptime(i, now),
        "gpus": gpus,
        "cpu": {"util": 1},
        "memory": {"util": 2},
        "ports": ports,
    })
}

fn live_pod(sim: &Sim, id: &str) -> Option<Value> {
    let now = util::now_ms();
    sim.lock()
        .instance(Provider::RunPod, id)
        .filter(|i| !i.is_destroyed())
        .map(|i| pod_json(i, now))
}

fn pod_not_found(id: &str) -> Response {
    not_found(format!("pod {id} not found"))
}

/// The container fields shared by create and update (`ContainerConfig`), checked.
#[derive(Default)]
struct Container {
    image: Option<String>,
    args: Option<String>,
    disk: Option<u64>,
    env: Option<Vec<(String, String)>>,
    ports: Option<Vec<(u16, String)>>,
    registry: Option<Value>,
}

const CONTAINER_FIELDS: [&str; 6] = ["args", "disk", "env", "image", "ports", "registry"];

/// Checks the container fields of `b`; port strings that do not parse are a rule (400).
fn container(c: &mut Check, b: &Map<String, Value>) -> Result<Container, Response> {
    let get = |k: &str| b.get(k);
    let mut out = Container {
        image: get("image").and_then(|v| c.string("$.image", v, 0)),
        args: get("args").and_then(|v| c.string("$.args", v, 0)),
        disk: get("disk")
            .and_then(|v| c.integer("$.disk", v, 1, None))
            .map(|n| n as u64),
        env: get("env").and_then(|v| c.string_map("$.env", v)),
        registry: get("registry").and_then(|v| c.nullable_string("$.registry", v)),
        ports: None,
    };
    if let Some(list) = get("ports").and_then(|v| c.strings("$.ports", v)) {
        let mut ports = Vec::new();
        for p in list {
            ports.extend(rp::parse_ports(&p).map_err(bad_request)?);
        }
        out.ports = Some(ports);
    }
    Ok(out)
}

/// `mounts`: at most one of a persistent volume (size, path) or one network volume.
fn mounts(c: &mut Check, v: &Value) -> Option<(u64, String)> {
    let m = c.object("$.mounts", v, &["persistent", "network"], &[])?;
    if let Some(n) = m.get("network") {
        match n.as_array() {
            Some(list) if list.len() <= 1 => {
                for (k, item) in list.iter().enumerate() {
                    let at = format!("$.mounts.network[{k}]");
                    if let Some(o) =
                        c.object(&at, item, &["volumeId", "path"], &["volumeId", "path"])
                    {
                        o.get("volumeId").map(|v| c.string(&at, v, 0));
                        o.get("path").map(|v| c.string(&at, v, 0));
                    }
                }
            }
            Some(_) => c.fail("$.mounts.network", "must have at most 1 items"),
            None => c.fail("$.mounts.network", "expected array"),
        }
    }
    let p = m.get("persistent")?;
    let o = c.object(
        "$.mounts.persistent",
        p,
        &["size", "path"],
        &["size", "path"],
    )?;
    let size = o
        .get("size")
        .and_then(|v| c.integer("$.mounts.persistent.size", v, 10, None));
    let path = o
        .get("path")
        .and_then(|v| c.string("$.mounts.persistent.path", v, 0));
    Some((size? as u64, path?))
}

/// A checked `CreatePodRequest`.
struct CreateBody {
    name: String,
    container: Container,
    cloud: String,
    gpu: Option<(String, Option<u32>)>,
    cpu: bool,
    data_center_ids: Vec<String>,
    global_networking: bool,
    volume: Option<(u64, String)>,
    network_mount: bool,
    start_jupyter: bool,
    template_id: Option<String>,
}

/// Checks a create body against `CreatePodRequest` (422 on any mismatch).
fn create_body(b: &Map<String, Value>) -> Result<CreateBody, Response> {
    let mut c = Check::default();
    let mut allowed = CONTAINER_FIELDS.to_vec();
    allowed.extend([
        "name",
        "cloud",
        "cpu",
        "dataCenterIds",
        "globalNetworking",
        "gpu",
        "mounts",
        "startJupyter",
        "startSsh",
        "templateId",
    ]);
    let root = Value::Object(b.clone());
    let mut required = vec!["name"];
    if !b.contains_key("templateId") {
        required.push("image");
    }
    c.object("$", &root, &allowed, &required);
    let name = b.get("name").and_then(|v| c.string("$.name", v, 1));
    let container = container(&mut c, b)?;
    let cloud = match b.get("cloud") {
        Some(v) => c.one_of("$.cloud", v, &["SECURE", "COMMUNITY"]),
        None => Some("SECURE".into()),
    };
    let gpu = b.get("gpu").and_then(|v| gpu_config(&mut c, v));
    if let Some(v) = b.get("cpu")
        && let Some(o) = c.object("$.cpu", v, &["id", "vcpuCount"], &["id", "vcpuCount"])
    {
        o.get("id").map(|v| c.string("$.cpu.id", v, 1));
        o.get("vcpuCount")
            .map(|v| c.integer("$.cpu.vcpuCount", v, 2, None));
    }
    let flag = |c: &mut Check, k: &str| {
        b.get(k)
            .and_then(|v| c.boolean(&at("$", k), v))
            .unwrap_or(false)
    };
    let global_networking = flag(&mut c, "globalNetworking");
    let start_jupyter = flag(&mut c, "startJupyter");
    flag(&mut c, "startSsh");
    let data_center_ids = b
        .get("dataCenterIds")
        .and_then(|v| c.strings("$.dataCenterIds", v))
        .unwrap_or_default();
    let volume = b.get("mounts").and_then(|v| mounts(&mut c, v));
    let network_mount = b.get("mounts").and_then(|m| m.get("network")).is_some();
    let template_id = b
        .get("templateId")
        .and_then(|v| c.string("$.templateId", v, 1));
    if !c.is_ok() {
        return Err(unprocessable(&c.errors));
    }
    Ok(CreateBody {
        name: name.unwrap_or_default(),
        container,
        cloud: cloud.unwrap_or_default(),
        gpu,
        cpu: b.contains_key("cpu"),
        data_center_ids,
        global_networking,
        volume,
        network_mount,
        start_jupyter,
        template_id,
    })
}

/// `gpu` (`CreateGpuConfig`): its type id and count, if given.
fn gpu_config(c: &mut Check, v: &Value) -> Option<(String, Option<u32>)> {
    let allowed = ["id", "count", "allowedCudaVersions", "minCudaVersion"];
    let o = c.object("$.gpu", v, &allowed, &["id"])?;
    let id = o.get("id").and_then(|v| c.string("$.gpu.id", v, 0));
    let count = o
        .get("count")
        .and_then(|v| c.integer("$.gpu.count", v, 1, Some(i64::from(u32::MAX))));
    if let Some(v) = o.get("allowedCudaVersions") {
        c.versions("$.gpu.allowedCudaVersions", v);
    }
    if let Some(v) = o.get("minCudaVersion")
        && let Some(s) = c.string("$.gpu.minCudaVersion", v, 0)
        && !super::check::is_version(&s)
    {
        c.fail(
            "$.gpu.minCudaVersion",
            "does not match pattern ^\\d+\\.\\d+$",
        );
    }
    Some((id?, count.map(|n| n as u32)))
}

/// The rules RunPod answers with 400 once the body has the right shape, then the
/// [`PodRequest`] and the data center the pod lands in.
fn pod_request(sim: &Sim, b: CreateBody) -> Result<PodRequest, Response> {
    if let Some(t) = &b.template_id {
        return Err(not_found(format!("template {t} not found")));
    }
    let (gpu_id, count) = match (&b.gpu, b.cpu) {
        (Some(g), false) => g.clone(),
        (None, true) => return Err(bad_request("CPU pods are not simulated")),
        _ => return Err(bad_request("exactly one of gpu or cpu must be set")),
    };
    if b.volume.is_some() && b.network_mount {
        return Err(bad_request(
            "mounts: persistent and network are mutually exclusive",
        ));
    }
    let Some(count) = count else {
        // What the live API answers a create without gpu.count (providers.md §2.10).
        return Err(bad_request(rp::NO_CAPACITY));
    };
    let data_center = {
        let st = sim.lock();
        if !st.gpu_types.iter().any(|t| t.id == gpu_id) {
            return Err(bad_request(format!("unknown GPU type id {gpu_id:?}")));
        }
        let places = st.data_centers_of(&gpu_id);
        let wanted = if b.data_center_ids.is_empty() {
            places.first().map(|d| d.to_string())
        } else {
            b.data_center_ids
                .iter()
                .find(|d| places.contains(&d.as_str()))
                .cloned()
        };
        wanted.ok_or_else(|| bad_request(rp::NO_CAPACITY))?
    };
    let mut env = b.container.env.unwrap_or_default();
    if b.start_jupyter && !env.iter().any(|(k, _)| k == "JUPYTER_PASSWORD") {
        let password = util::alnum_id(&mut sim.lock().rng, 16);
        env.push(("JUPYTER_PASSWORD".into(), password));
    }
    let (volume_gb, volume_mount_path) = b.volume.unwrap_or((0, "/workspace".into()));
    Ok(PodRequest {
        name: b.name,
        image: b.container.image.unwrap_or_default(),
        gpu_type_ids: vec![gpu_id],
        gpu_count: count,
        cloud_type: b.cloud,
        container_disk_gb: b.container.disk.unwrap_or(50),
        volume_gb,
        volume_mount_path,
        ports: b.container.ports.unwrap_or_default(),
        env,
        docker_args: b.container.args.unwrap_or_default(),
        support_public_ip: true,
        data_center_id: Some(data_center),
        template_id: None,
        bid_per_gpu: None,
        interruptible: false,
    })
}

pub async fn create(State(sim): State<Arc<Sim>>, call: Call, body: Bytes) -> Response {
    const OP: &str = "runpod.v2.createPod";
    if let Err(r) = call.gate(&sim, OP).await {
        return r;
    }
    let checked = match body_object(&body).and_then(|b| create_body(&b)) {
        Ok(b) => b,
        Err(r) => return r,
    };
    let (registry, global_networking) = (
        checked.container.registry.clone(),
        checked.global_networking,
    );
    let req = match pod_request(&sim, checked) {
        Ok(r) => r,
        Err(r) => return r,
    };
    match rp::create(&sim, &req) {
        Ok(id) => {
            call.slot.set_instance(id.clone());
            if let Some(i) = sim.lock().instance_mut(Provider::RunPod, &id) {
                i.details
                    .insert("registry".into(), registry.unwrap_or(Value::Null));
                i.details
                    .insert("global_networking".into(), json!(global_networking));
            }
            if let Some(r) = http::ghost_create(&sim, OP, Family::RestV2) {
                return r;
            }
            match live_pod(&sim, &id) {
                Some(p) => util::json(StatusCode::CREATED, &p),
                None => pod_not_found(&id),
            }
        }
        Err(CreateError::NoCapacity) => bad_request(rp::NO_CAPACITY),
        Err(CreateError::Invalid(m)) => bad_request(m),
    }
}

/// A page cursor: the position after which the next page starts, in creation order.
fn cursor_encode(position: usize) -> String {
    util::b64_encode(format!("after:{position}").as_bytes())
}

fn cursor_decode(cursor: &str) -> Option<usize> {
    let raw = String::from_utf8(util::b64_decode(cursor)?).ok()?;
    raw.strip_prefix("after:")?.parse().ok()
}

/// `GET /v2/pods`: every live pod, oldest first. Without `limit` (and `cursor`) the bare
/// `{"pods": [...]}` of the published document; with them one page and `pagination`, as
/// later versions of the API answer. Other query parameters are ignored, `name` included.
pub async fn list(State(sim): State<Arc<Sim>>, call: Call) -> Response {
    if let Err(r) = call.gate(&sim, "runpod.v2.listPods").await {
        return r;
    }
    let paged = call.query("limit").is_some() || call.query("cursor").is_some();
    let limit = match call.query("limit").map(str::parse::<usize>) {
        None => 100,
        Some(Ok(n)) if (1..=1000).contains(&n) => n,
        Some(_) => return unprocessable(&["$.limit: must be an integer from 1 to 1000".into()]),
    };
    let after = match call.query("cursor").filter(|c| !c.is_empty()) {
        None => None,
        Some(c) => match cursor_decode(c) {
            Some(p) => Some(p),
            None => return bad_request("invalid cursor"),
        },
    };
    let now = util::now_ms();
    let st = sim.lock();
    let live: Vec<(usize, &Instance)> = st
        .instances
        .iter()
        .enumerate()
        .filter(|(n, i)| {
            i.provider == Provider::RunPod && !i.is_destroyed() && after.is_none_or(|a| *n > a)
        })
        .collect();
    if !paged {
        let pods: Vec<Value> = live.iter().map(|(_, i)| pod_json(i, now)).collect();
        return ok(&json!({"pods": pods}));
    }
    let page = &live[..live.len().min(limit)];
    let more = live.len() > page.len();
    let next = page.last().filter(|_| more).map(|(n, _)| cursor_encode(*n));
    let pods: Vec<Value> = page.iter().map(|(_, i)| pod_json(i, now)).collect();
    ok(&json!({"pods": pods, "pagination": {"hasNextPage": more, "nextCursor": next}}))
}

pub async fn show(State(sim): State<Arc<Sim>>, call: Call, Path(id): Path<String>) -> Response {
    if let Err(r) = call.gate(&sim, "runpod.v2.getPod").await {
        return r;
    }
    call.slot.set_instance(id.clone());
    live_pod(&sim, &id).map_or_else(|| pod_not_found(&id), |p| ok(&p))
}

pub async fn delete(State(sim): State<Arc<Sim>>, call: Call, Path(id): Path<String>) -> Response {
    if let Err(r) = call.gate(&sim, "runpod.v2.deletePod").await {
        return r;
    }
    call.slot.set_instance(id.clone());
    terminate(&sim, &id).await
}

async fn terminate(sim: &Sim, id: &str) -> Response {
    match instances::destroy(sim, Provider::RunPod, id) {
        Some(task) => {
            instances::reap(task).await;
            no_content()
        }
        None => pod_not_found(id),
    }
}

/// `PATCH /v2/pods/{id}`: only the fields present change (`UpdatePodRequest`).
pub async fn update(
    State(sim): State<Arc<Sim>>,
    call: Call,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    if let Err(r) = call.gate(&sim, "runpod.v2.updatePod").await {
        return r;
    }
    call.slot.set_instance(id.clone());
    let b = match body_object(&body) {
        Ok(b) => b,
        Err(r) => return r,
    };
    let mut c = Check::default();
    let mut allowed = CONTAINER_FIELDS.to_vec();
    allowed.extend(["globalNetworking", "locked", "mounts", "name", "templateId"]);
    c.object("$", &Value::Object(b.clone()), &allowed, &[]);
    let name = b.get("name").and_then(|v| c.string("$.name", v, 1));
    let container = match container(&mut c, &b) {
        Ok(k) => k,
        Err(r) => return r,
    };
    let locked = b.get("locked").and_then(|v| c.boolean("$.locked", v));
    let global = b
        .get("globalNetworking")
        .and_then(|v| c.boolean("$.globalNetworking", v));
    let volume = b.get("mounts").and_then(|v| mounts(&mut c, v));
    let template = b
        .get("templateId")
        .and_then(|v| c.string("$.templateId", v, 0));
    if !c.is_ok() {
        return unprocessable(&c.errors);
    }
    if let Some(t) = template {
        return not_found(format!("template {t} not found"));
    }
    {
        let mut st = sim.lock();
        let Some(i) = st
            .instance_mut(Provider::RunPod, &id)
            .filter(|i| !i.is_destroyed())
        else {
            return pod_not_found(&id);
        };
        if let Some(n) = name {
            i.label = Some(n);
        }
        apply_container(i, container);
        let mut set = |k: &str, v: Value| i.details.insert(k.into(), v);
        if let Some(l) = locked {
            set("locked", json!(l));
        }
        if let Some(g) = global {
            set("global_networking", json!(g));
        }
        if let Some((size, path)) = volume {
            set("volume_gb", json!(size));
            set("volume_mount_path", json!(path));
        }
    }
    live_pod(&sim, &id).map_or_else(|| pod_not_found(&id), |p| ok(&p))
}

/// Applies the container fields a PATCH gave. New ports get fake outside numbers; ports
/// kept keep theirs.
fn apply_container(i: &mut Instance, c: Container) {
    if let Some(image) = c.image {
        i.image = image;
    }
    if let Some(env) = c.env {
        i.env = env;
    }
    if let Some(args) = c.args {
        i.details.insert("docker_args".into(), json!(args));
    }
    if let Some(disk) = c.disk {
        i.details.insert("container_disk_gb".into(), json!(disk));
    }
    if let Some(registry) = c.registry {
        i.details.insert("registry".into(), registry);
    }
    if let Some(ports) = c.ports {
        let old = std::mem::take(&mut i.ports);
        i.ports = ports
            .into_iter()
            .map(|(port, proto)| {
                old.iter()
                    .find(|p| p.port == port && p.proto == proto)
                    .cloned()
                    .unwrap_or(PortSpec {
                        port,
                        proto,
                        public: 20_000 + port % 40_000,
                    })
            })
            .collect();
    }
}

/// `POST /v2/pods/{id}/action` `{"action": start|stop|restart|terminate}`.
pub async fn action(
    State(sim): State<Arc<Sim>>,
    call: Call,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    if let Err(r) = call.gate(&sim, "runpod.v2.podAction").await {
        return r;
    }
    call.slot.set_instance(id.clone());
    let b = match body_object(&body) {
        Ok(b) => b,
        Err(r) => return r,
    };
    let mut c = Check::default();
    c.object("$", &Value::Object(b.clone()), &["action"], &["action"]);
    let action = b
        .get("action")
        .and_then(|v| c.one_of("$.action", v, &["start", "stop", "restart", "terminate"]));
    let Some(action) = action.filter(|_| c.is_ok()) else {
        return unprocessable(&c.errors);
    };
    let (phase, locked) = {
        let st = sim.lock();
        match st
            .instance(Provider::RunPod, &id)
            .filter(|i| !i.is_destroyed())
        {
            Some(i) => (
                i.phase,
                i.details
                    .get("locked")
                    .and_then(Value::as_bool)
                    .unwrap_or(false),
            ),
            None => return pod_not_found(&id),
        }
    };
    if !actions(phase).contains(&action.as_str()) {
        return conflict(format!(
            "action {action} is not valid for a pod in status {}",
            status(phase)
        ));
    }
    if locked && matches!(action.as_str(), "stop" | "restart") {
        return conflict(format!("pod {id} is locked"));
    }
    let gone = || pod_not_found(&id);
    match action.as_str() {
        "terminate" => return terminate(&sim, &id).await,
        "stop" => match instances::stop(&sim, Provider::RunPod, &id) {
            Some(task) => instances::reap(task).await,
            None => return gone(),
        },
        "restart" => {
            let Some(task) = instances::stop(&sim, Provider::RunPod, &id) else {
                return gone();
            };
            instances::reap(task).await;
            if instances::start(&sim, Provider::RunPod, &id).is_none() {
                return gone();
            }
        }
        _ => {
            if instances::start(&sim, Provider::RunPod, &id).is_none() {
                return gone();
            }
        }
    }
    live_pod(&sim, &id).map_or_else(gone, |p| ok(&p))
}
