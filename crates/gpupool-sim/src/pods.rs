//! RunPod pods: creation against the GPU-type catalogue, and the two wire shapes of a pod
//! (GraphQL `Pod` and REST v1 `Pod`) rendered from the same instance.
//!
//! A pod's `runtime` is null until its container runs; then each `/tcp` port has a public
//! `127.0.0.1` entry (the worker's one with its real loopback port) and each `/http` port a
//! private-ip entry, reachable through the sim's `/proxy/{podId}-{port}/` stand-in.

use std::sync::Arc;

use jiff::Timestamp;
use rand::{Rng, rngs::StdRng};
use serde_json::{Map, Value, json};

use super::{
    config::GpuTypeSpec,
    instances,
    state::{Instance, Phase, PortSpec, Provider, Sim, State as SimState, details},
    util,
};

/// The message RunPod answers when no machine fits.
pub const NO_CAPACITY: &str = "There are no longer any instances available with the requested specifications. Please refresh and try again.";

/// What a pod create asks for, from GraphQL input or the REST body.
#[derive(Clone, Debug, Default)]
pub struct PodRequest {
    pub name: String,
    pub image: String,
    /// Candidates in order of preference (GraphQL gives one).
    pub gpu_type_ids: Vec<String>,
    pub gpu_count: u32,
    /// `ALL`, `SECURE` or `COMMUNITY`.
    pub cloud_type: String,
    pub container_disk_gb: u64,
    pub volume_gb: u64,
    pub volume_mount_path: String,
    pub ports: Vec<(u16, String)>,
    pub env: Vec<(String, String)>,
    pub docker_args: String,
    pub support_public_ip: bool,
    pub data_center_id: Option<String>,
    pub template_id: Option<String>,
    /// Spot: USD per GPU-hour bid.
    pub bid_per_gpu: Option<f64>,
    pub interruptible: bool,
}

/// Why a create failed.
#[derive(Clone, Debug, PartialEq)]
pub enum CreateError {
    NoCapacity,
    Invalid(String),
}

/// Parses `"8000/http,22/tcp"` (a missing protocol means http, as on RunPod).
pub fn parse_ports(spec: &str) -> Result<Vec<(u16, String)>, String> {
    spec.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (num, proto) = p.split_once('/').unwrap_or((p, "http"));
            let port = num
                .trim()
                .parse::<u16>()
                .map_err(|_| format!("invalid port {p:?}"))?;
            let proto = proto.trim().to_ascii_lowercase();
            if proto != "http" && proto != "tcp" {
                return Err(format!("invalid port protocol in {p:?} (http or tcp)"));
            }
            Ok((port, proto))
        })
        .collect()
}

/// USD per GPU-hour of a type in a cloud (`ALL` takes the cheaper cloud); `None` if unavailable.
pub fn unit_price(t: &GpuTypeSpec, cloud: &str) -> Option<(f64, &'static str)> {
    match cloud {
        "SECURE" => t.secure_price.map(|p| (p, "SECURE")),
        "COMMUNITY" => t.community_price.map(|p| (p, "COMMUNITY")),
        _ => match (t.secure_price, t.community_price) {
            (Some(s), Some(c)) if c <= s => Some((c, "COMMUNITY")),
            (Some(s), _) => Some((s, "SECURE")),
            (None, Some(c)) => Some((c, "COMMUNITY")),
            (None, None) => None,
        },
    }
}

/// Creates a pod if a listed GPU type has the GPUs free; returns its id.
pub fn create(sim: &Arc<Sim>, req: &PodRequest) -> Result<String, CreateError> {
    if req.image.is_empty() && req.template_id.is_none() {
        return Err(CreateError::Invalid("imageName is required".into()));
    }
    if req.gpu_count == 0 {
        return Err(CreateError::Invalid("gpuCount must be at least 1".into()));
    }
    let now = util::now_ms();
    let inst = {
        let mut st = sim.lock();
        let st = &mut *st;
        let (gpu, unit, cloud) = choose_gpu(st, req)?;
        let unit = req.bid_per_gpu.unwrap_or(unit);
        let draws = PodDraws::draw(&mut st.rng, req);
        pod_instance(req, &gpu, unit, cloud, draws, now)
    };
    let id = inst.id.clone();
    instances::create(sim, inst);
    Ok(id)
}

/// The first listed GPU type with the GPUs free, its unit price and cloud. A GPU type that
/// does not exist at all is a mistake in the request, not a lack of capacity (a typo would
/// otherwise look like a sold-out market forever).
fn choose_gpu(
    st: &SimState,
    req: &PodRequest,
) -> Result<(GpuTypeSpec, f64, &'static str), CreateError> {
    let known = |want: &String| {
        st.gpu_types
            .iter()
            .any(|t| t.id == *want || t.display_name == *want)
    };
    if let Some(unknown) = req.gpu_type_ids.iter().find(|w| !known(w)) {
        return Err(CreateError::Invalid(format!(
            "unknown GPU type id {unknown:?}"
        )));
    }
    let chosen = req.gpu_type_ids.iter().find_map(|want| {
        let t = st
            .gpu_types
            .iter()
            .find(|t| t.id == *want || t.display_name == *want)?;
        let (price, cloud) = unit_price(t, &req.cloud_type)?;
        (req.gpu_count <= t.max_gpu_count && st.gpus_free(t) >= req.gpu_count)
            .then(|| (t.clone(), price, cloud))
    });
    chosen.ok_or(CreateError::NoCapacity)
}

/// A new pod's ids, ports and address, drawn from the simulator's seeded generator in a
/// fixed order (pod id, machine id, host suffix, docker id, the ports, the private ip), so a
/// seed gives the same pod every time.
struct PodDraws {
    id: String,
    machine_id: String,
    host_suffix: u32,
    docker_id: String,
    ports: Vec<PortSpec>,
    private_ip: String,
}

impl PodDraws {
    /// Draws them for `req`.
    fn draw(rng: &mut StdRng, req: &PodRequest) -> Self {
        let id = util::alnum_id(rng, 14);
        let machine_id = util::alnum_id(rng, 12);
        let host_suffix: u32 = rng.random_range(10_000_000..99_999_999);
        let docker_id = util::hex_id(rng, 12);
        let ports: Vec<PortSpec> = req
            .ports
            .iter()
            .map(|(port, proto)| PortSpec {
                port: *port,
                proto: proto.clone(),
                public: rng.random_range(10_000..60_000),
            })
            .collect();
        let private_ip = format!(
            "100.65.{}.{}",
            rng.random_range(0..255u8),
            rng.random_range(2..255u8)
        );
        Self {
            id,
            machine_id,
            host_suffix,
            docker_id,
            ports,
            private_ip,
        }
    }
}

/// The new pod, provisioning, on `gpu` at `unit` USD per GPU-hour.
fn pod_instance(
    req: &PodRequest,
    gpu: &GpuTypeSpec,
    unit: f64,
    cloud: &str,
    draws: PodDraws,
    now: Timestamp,
) -> Instance {
    let worker_port = req
        .env
        .iter()
        .find(|(k, _)| k == crate::ENV_WORKER_PORT)
        .and_then(|(_, v)| v.trim().parse().ok())
        .or_else(|| draws.ports.first().map(|p| p.port))
        .unwrap_or(8000);
    let details = pod_details(req, gpu, unit, cloud, &draws);
    Instance {
        provider: Provider::RunPod,
        id: draws.id,
        label: Some(req.name.clone()),
        gpu_name: gpu.display_name.clone(),
        num_gpus: req.gpu_count,
        price_per_hour: unit * f64::from(req.gpu_count),
        image: req.image.clone(),
        env: req.env.clone(),
        ports: draws.ports,
        worker_port,
        phase: Phase::Provisioning,
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
    }
}

/// What a pod keeps from its create: GPU type and prices, machine, container and volume.
fn pod_details(
    req: &PodRequest,
    gpu: &GpuTypeSpec,
    unit: f64,
    cloud: &str,
    d: &PodDraws,
) -> Map<String, Value> {
    details(json!({
        "gpu_type_id": gpu.id,
        "gpu_display_name": gpu.display_name,
        "secure_price": gpu.secure_price,
        "community_price": gpu.community_price,
        "cloud": cloud,
        "unit_price": unit,
        "machine_id": d.machine_id,
        "pod_host_id": format!("{}-{}", d.id, d.host_suffix),
        "docker_id": d.docker_id,
        "docker_args": req.docker_args,
        "container_disk_gb": req.container_disk_gb,
        "volume_gb": req.volume_gb,
        "volume_mount_path": req.volume_mount_path,
        "data_center_id": req.data_center_id.clone().unwrap_or_else(|| "US-TX-3".into()),
        "support_public_ip": req.support_public_ip,
        "template_id": req.template_id,
        "interruptible": req.interruptible || req.bid_per_gpu.is_some(),
        "private_ip": d.private_ip,
        "memory_gb": 62 * u64::from(req.gpu_count),
        "vcpu": 16 * u64::from(req.gpu_count),
    }))
}

/// RunPod's `lastStatusChange` text.
fn status_text(i: &Instance) -> String {
    let when = i
        .last_status_change
        .strftime("%a %b %d %Y %H:%M:%S GMT+0000 (Coordinated Universal Time)")
        .to_string();
    let what = match i.phase {
        Phase::Provisioning | Phase::Loading | Phase::Running => "Rented by User",
        Phase::Stopped => "Exited by User",
        Phase::Dead => "Exited: container crashed (simulated)",
        Phase::Destroyed => "Terminated by User",
    };
    format!("{what}: {when}")
}

pub fn ports_string(i: &Instance) -> String {
    i.ports
        .iter()
        .map(|p| format!("{}/{}", p.port, p.proto))
        .collect::<Vec<_>>()
        .join(",")
}

/// The outside port of a pod port while running: the worker's real one, else the fake.
pub fn public_port(i: &Instance, p: &PortSpec) -> u16 {
    if p.port == i.worker_port {
        i.worker_host_port().unwrap_or(p.public)
    } else {
        p.public
    }
}

pub fn uptime(i: &Instance, now: Timestamp) -> u64 {
    match (i.phase, i.last_started_at) {
        (Phase::Running, Some(t)) => util::seconds_between(t, now) as u64,
        _ => 0,
    }
}

/// The GraphQL `Pod` object, every field the official clients select.
pub fn graphql_pod(i: &Instance, now: Timestamp) -> Value {
    let env: Vec<String> = i.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    json!({
        "__typename": "Pod",
        "id": i.id,
        "name": i.label.clone().unwrap_or_default(),
        "desiredStatus": graphql_desired_status(i.phase),
        "imageName": i.image,
        "env": env,
        "ports": ports_string(i),
        "port": i.ports.first().map(|p| p.port),
        "gpuCount": i.num_gpus,
        "vcpuCount": i.detail_u64("vcpu").unwrap_or(16),
        "memoryInGb": i.detail_u64("memory_gb").unwrap_or(62),
        "containerDiskInGb": i.detail_u64("container_disk_gb").unwrap_or(10),
        "volumeInGb": i.detail_u64("volume_gb").unwrap_or(0),
        "volumeMountPath": i.detail_str("volume_mount_path").unwrap_or("/workspace"),
        "costPerHr": i.price_per_hour,
        "adjustedCostPerHr": i.price_per_hour,
        "podType": if interruptible(i) { "INTERRUPTABLE" } else { "RESERVED" },
        "machineId": i.detail_str("machine_id").unwrap_or_default(),
        "dockerId": i.detail_str("docker_id").unwrap_or_default(),
        "dockerArgs": i.detail_str("docker_args").unwrap_or_default(),
        "lastStatusChange": status_text(i),
        "uptimeSeconds": uptime(i, now),
        "createdAt": util::rfc3339(i.created_at),
        "locked": false,
        "templateId": i.details.get("template_id").cloned().unwrap_or(Value::Null),
        "networkVolumeId": null,
        "gpuTypeId": i.detail_str("gpu_type_id"),
        "machine": graphql_machine(i),
        "runtime": (i.phase == Phase::Running).then(|| graphql_runtime(i, now)),
    })
}

/// The GraphQL `desiredStatus` of a phase.
fn graphql_desired_status(phase: Phase) -> &'static str {
    match phase {
        Phase::Stopped => "EXITED",
        Phase::Dead => "DEAD",
        Phase::Destroyed => "TERMINATED",
        _ => "RUNNING",
    }
}

/// Whether the pod is a spot (interruptible) one.
fn interruptible(i: &Instance) -> bool {
    i.details
        .get("interruptible")
        .and_then(Value::as_bool)
        .unwrap_or(false)
}

/// The GraphQL `Machine` of a pod.
fn graphql_machine(i: &Instance) -> Value {
    json!({
        "__typename": "Machine",
        "podHostId": i.detail_str("pod_host_id"),
        "gpuDisplayName": i.gpu_name,
        "gpuTypeId": i.detail_str("gpu_type_id"),
        "location": "US",
        "dataCenterId": i.detail_str("data_center_id"),
        "secureCloud": i.detail_str("cloud") == Some("SECURE"),
        "supportPublicIp": true,
        "maxDownloadSpeedMbps": 1000,
        "maxUploadSpeedMbps": 1000,
    })
}

/// The GraphQL `runtime` of a running pod: uptime, port entries, GPUs and container load.
fn graphql_runtime(i: &Instance, now: Timestamp) -> Value {
    let ports: Vec<Value> = i
        .ports
        .iter()
        .map(|p| {
            if p.proto == "http" {
                json!({"ip": i.detail_str("private_ip").unwrap_or("100.65.0.2"), "isIpPublic": false,
                       "privatePort": p.port, "publicPort": p.public, "type": "http"})
            } else {
                json!({"ip": "127.0.0.1", "isIpPublic": true, "privatePort": p.port,
                       "publicPort": public_port(i, p), "type": "tcp"})
            }
        })
        .collect();
    let gpus: Vec<Value> = (0..i.num_gpus)
        .map(|n| json!({"id": format!("GPU-{}-{n}", i.id), "gpuUtilPercent": 0, "memoryUtilPercent": 0}))
        .collect();
    json!({
        "uptimeInSeconds": uptime(i, now),
        "ports": ports,
        "gpus": gpus,
        "container": {"cpuPercent": 1, "memoryPercent": 2},
    })
}

/// The REST v1 `Pod` (api-specs/runpod/rest-v1.openapi.json). Null-valued fields whose
/// schema is a non-nullable string are omitted rather than sent as null.
pub fn rest_pod(i: &Instance) -> Value {
    let running = i.phase == Phase::Running;
    let desired = match i.phase {
        Phase::Stopped | Phase::Dead => "EXITED",
        Phase::Destroyed => "TERMINATED",
        _ => "RUNNING",
    };
    let env: Map<String, Value> = i.env.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
    let mut pod = json!({
        "id": i.id,
        "name": i.label.clone().unwrap_or_default(),
        "desiredStatus": desired,
        "image": i.image,
        "imageName": i.image,
        "costPerHr": i.price_per_hour,
        "adjustedCostPerHr": i.price_per_hour,
        "gpu": rest_gpu_type(i),
        "gpuCount": i.num_gpus,
        "machine": rest_machine(i),
        "machineId": i.detail_str("machine_id").unwrap_or_default(),
        "publicIp": if running { json!("127.0.0.1") } else { Value::Null },
        "portMappings": if running { Value::Object(port_mappings(i)) } else { Value::Null },
        "ports": i.ports.iter().map(|p| format!("{}/{}", p.port, p.proto)).collect::<Vec<_>>(),
        "env": env,
        "interruptible": interruptible(i),
        "lastStatusChange": status_text(i),
        "containerDiskInGb": i.detail_u64("container_disk_gb").unwrap_or(10),
        "volumeInGb": i.detail_u64("volume_gb").unwrap_or(0),
        "volumeMountPath": i.detail_str("volume_mount_path").unwrap_or("/workspace"),
        "memoryInGb": i.detail_u64("memory_gb").unwrap_or(62),
        "vcpuCount": i.detail_u64("vcpu").unwrap_or(16),
        "locked": false,
        "consumerUserId": "user_sim",
        "dockerEntrypoint": [],
        "dockerStartCmd": [],
        "savingsPlans": [],
        "slsVersion": 0,
        "volumeEncrypted": false,
    });
    if let Some(obj) = pod.as_object_mut() {
        if let Some(t) = i.last_started_at {
            obj.insert("lastStartedAt".into(), json!(util::rfc3339(t)));
        }
        if let Some(t) = i.detail_str("template_id") {
            obj.insert("templateId".into(), json!(t));
        }
    }
    pod
}

/// The REST GPU type of a pod, with its prices.
fn rest_gpu_type(i: &Instance) -> Value {
    json!({
        "id": i.detail_str("gpu_type_id").unwrap_or_default(),
        "count": i.num_gpus,
        "displayName": i.gpu_name,
        "securePrice": i.details.get("secure_price").and_then(Value::as_f64).unwrap_or(0.0),
        "communityPrice": i.details.get("community_price").and_then(Value::as_f64).unwrap_or(0.0),
    })
}

/// The REST `machine` of a pod.
fn rest_machine(i: &Instance) -> Value {
    json!({
        "gpuTypeId": i.detail_str("gpu_type_id").unwrap_or_default(),
        "gpuType": rest_gpu_type(i),
        "location": "US",
        "dataCenterId": i.detail_str("data_center_id").unwrap_or("US-TX-3"),
        "gpuDisplayName": i.gpu_name,
        "supportPublicIp": true,
        "secureCloud": i.detail_str("cloud") == Some("SECURE"),
        "costPerHr": i.price_per_hour,
        "currentPricePerGpu": i.details.get("unit_price").and_then(Value::as_f64).unwrap_or(0.0),
        "maxDownloadSpeedMbps": 1000,
        "maxUploadSpeedMbps": 1000,
    })
}

/// `portMappings` of a running pod: each TCP port to its outside port.
fn port_mappings(i: &Instance) -> Map<String, Value> {
    let mut mappings = Map::new();
    for p in i.ports.iter().filter(|p| p.proto == "tcp") {
        mappings.insert(p.port.to_string(), json!(public_port(i, p)));
    }
    mappings
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_parse_with_and_without_protocol() {
        assert_eq!(
            parse_ports("8000/http, 22/tcp,8888").unwrap(),
            vec![
                (8000, "http".into()),
                (22, "tcp".into()),
                (8888, "http".into())
            ]
        );
        assert!(parse_ports("8000/udp").is_err());
        assert!(parse_ports("x/tcp").is_err());
        assert!(parse_ports("").unwrap().is_empty());
    }

    #[test]
    fn all_cloud_takes_the_cheaper_price() {
        let t = GpuTypeSpec {
            id: "g".into(),
            display_name: "G".into(),
            memory_in_gb: 24,
            secure_price: Some(0.7),
            community_price: Some(0.3),
            stock: 1,
            max_gpu_count: 8,
        };
        assert_eq!(unit_price(&t, "ALL"), Some((0.3, "COMMUNITY")));
        assert_eq!(unit_price(&t, "SECURE"), Some((0.7, "SECURE")));
        let secure_only = GpuTypeSpec {
            community_price: None,
            ..t
        };
        assert_eq!(unit_price(&secure_only, "COMMUNITY"), None);
    }
}
