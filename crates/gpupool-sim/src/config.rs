//! Simulator configuration: what the YAML file (or a test) may set, and the built-in defaults.
//!
//! Only data lives here. Times are seconds as floats so a test can ask for `0.05`; money is
//! USD per hour as floats because that is how both providers put prices on the wire.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::faults::Faults;

/// Everything the simulator can be told at start. `SimConfig::default()` is a small, sensible
/// world: a few RTX 3060/4090 Vast offers and RunPod GPU types, and one serverless endpoint.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SimConfig {
    /// Seed of the one RNG every random choice comes from (ids, fault dice, fake ports).
    pub seed: u64,
    pub api_keys: ApiKeys,
    pub timing: Timing,
    pub vast_offers: Vec<VastOfferSpec>,
    pub runpod_gpu_types: Vec<GpuTypeSpec>,
    pub endpoints: Vec<EndpointSpec>,
    pub faults: Faults,
    /// Where RunPod GPU types can be placed (default: `US-TX-3` and `EU-RO-1`, every type).
    pub runpod_data_centers: Vec<DataCenterSpec>,
    /// RunPod serverless GPU pools (default: `ADA_24` = RTX 4090, `AMPERE_24` = RTX 3090).
    pub runpod_gpu_pools: Vec<GpuPoolSpec>,
    /// The quota RunPod REST v2 reports in `RateLimit`/`RateLimit-Policy` (and enforces, if told).
    pub runpod_v2_rate_limit: RateLimitSpec,
    /// Run each machine's worker as a real process (`gpupool-worker`) behind the simulator's
    /// port for it, instead of the built-in stand-in. `None` (default): the stand-in.
    pub worker_process: Option<WorkerProcessSpec>,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            seed: 42,
            api_keys: ApiKeys::default(),
            timing: Timing::default(),
            vast_offers: default_vast_offers(),
            runpod_gpu_types: default_gpu_types(),
            endpoints: vec![EndpointSpec::default()],
            faults: Faults::default(),
            runpod_data_centers: default_data_centers(),
            runpod_gpu_pools: default_gpu_pools(),
            runpod_v2_rate_limit: RateLimitSpec::default(),
            worker_process: None,
        }
    }
}

impl SimConfig {
    /// Parses a YAML document; unknown keys are refused so a typo does not silently do nothing.
    pub fn from_yaml(text: &str) -> Result<Self, String> {
        serde_yaml::from_str(text).map_err(|e| format!("invalid simulator config: {e}"))
    }

    /// A configuration for tests: instant provisioning and boot, short operations, fixed keys.
    pub fn fast() -> Self {
        Self {
            api_keys: ApiKeys {
                vast: vec!["vast-test-key".into()],
                runpod: vec!["runpod-test-key".into()],
            },
            timing: Timing {
                provisioning_seconds: 0.05,
                loading_seconds: 0.05,
                boot_seconds: 0.0,
                default_operation_seconds: 0.05,
                ..Timing::default()
            },
            ..Self::default()
        }
    }
}

/// The real worker a running machine gets: `command` started with the machine's environment
/// (what the operator asked the provider for: session token, API key, `worker.env`), then
/// `env` on top, `GPUPOOL_WORKER_PORT` set to a free loopback port and
/// `GPUPOOL_WORKER_BIND=127.0.0.1`. It is killed (SIGKILL) when the machine stops, dies or is
/// destroyed.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WorkerProcessSpec {
    /// Path of the worker binary (e.g. `target/debug/gpupool-worker`), or a name on `PATH`.
    pub command: String,
    #[serde(default)]
    pub args: Vec<String>,
    /// Added to every worker's environment (e.g. `GPUPOOL_WORKER_ALLOW_PRIVATE_URLS: "true"`,
    /// which a worker fetching from this machine's loopback needs).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Each worker's output goes to `{log_dir}/worker-{instance}.log`; the simulator's own
    /// stderr when unset.
    #[serde(default)]
    pub log_dir: Option<String>,
}

/// API keys each provider accepts. An empty list accepts any non-empty key.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ApiKeys {
    pub vast: Vec<String>,
    /// Used by RunPod GraphQL, REST v1 and Serverless alike (one RunPod account key).
    pub runpod: Vec<String>,
}

/// RunPod REST v2's per-user quota: requests per minute, hour and day in fixed windows
/// from the simulator's start (or last reset). Reported on every authenticated answer;
/// refused with 429 and `Retry-After` only when `enforce` is set.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimitSpec {
    pub minute: u64,
    pub hour: u64,
    pub day: u64,
    pub enforce: bool,
}

impl Default for RateLimitSpec {
    /// The policy of the REST v2 document's example.
    fn default() -> Self {
        Self {
            minute: 60,
            hour: 3000,
            day: 50_000,
            enforce: false,
        }
    }
}

/// Delays of the simulated world.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Timing {
    /// Time from create to the image pull (Vast `actual_status` null, RunPod runtime null).
    pub provisioning_seconds: f64,
    /// Time pulling the image / starting the container (Vast `loading`).
    pub loading_seconds: f64,
    /// Time the worker answers 503 on health after the instance reports running.
    pub boot_seconds: f64,
    /// Operation time of `/video/{operation}` when the operation has no entry below.
    pub default_operation_seconds: f64,
    /// Operation time per operation name (worker and serverless alike).
    pub operations: BTreeMap<String, f64>,
    /// How long a "hang" fault holds a request before answering 504.
    pub hang_seconds: f64,
    /// The RunPod HTTP proxy cuts requests after this long with a 524 (100 s on the real one).
    pub proxy_timeout_seconds: f64,
    /// Interruptible (bid) Vast instances are outbid at this rate once running, per
    /// machine-hour, each after an exponentially distributed time drawn from the seeded RNG.
    /// 0 (default): only the admin API outbids.
    pub interruptible_preemptions_per_hour: f64,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            provisioning_seconds: 1.0,
            loading_seconds: 2.0,
            boot_seconds: 1.0,
            default_operation_seconds: 2.0,
            operations: BTreeMap::new(),
            hang_seconds: 600.0,
            proxy_timeout_seconds: 100.0,
            interruptible_preemptions_per_hour: 0.0,
        }
    }
}

/// One Vast.ai offer (a machine that can be rented `capacity` times at once).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct VastOfferSpec {
    pub id: u64,
    pub gpu_name: String,
    #[serde(default = "one")]
    pub num_gpus: u32,
    /// USD per hour for the whole machine; this is what an instance from it bills.
    pub dph_total: f64,
    #[serde(default = "default_reliability")]
    pub reliability2: f64,
    #[serde(default = "default_geolocation")]
    pub geolocation: String,
    #[serde(default = "default_direct_ports")]
    pub direct_port_count: u32,
    /// `verified`, `unverified` or `deverified`.
    #[serde(default = "default_verification")]
    pub verification: String,
    /// How many instances may run on this offer at the same time.
    #[serde(default = "one")]
    pub capacity: u32,
    /// Any other offer field (`cuda_max_good`, `inet_down`, ...), copied over the generated ones.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// One RunPod GPU type with its prices and how many GPUs of it are free.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct GpuTypeSpec {
    /// e.g. `NVIDIA GeForce RTX 4090`.
    pub id: String,
    /// e.g. `RTX 4090`.
    pub display_name: String,
    #[serde(default = "default_memory")]
    pub memory_in_gb: u32,
    /// USD per GPU-hour in the secure cloud; `None` = not offered there.
    #[serde(default)]
    pub secure_price: Option<f64>,
    /// USD per GPU-hour in the community cloud; `None` = not offered there.
    #[serde(default)]
    pub community_price: Option<f64>,
    /// Free GPUs of this type; a pod takes `gpuCount` of them until terminated.
    #[serde(default = "default_stock")]
    pub stock: u32,
    #[serde(default = "default_max_gpu_count")]
    pub max_gpu_count: u32,
}

/// A RunPod data center and the GPU types it has. REST v2 creates must land in one that
/// has the type (`dataCenterIds` is a hard constraint); the catalogue lists them.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DataCenterSpec {
    /// e.g. `US-TX-3`, `EU-RO-1` (the country is the segment after `EU`/`EUR`, else the first).
    pub id: String,
    /// GPU type ids it has; empty means every type.
    #[serde(default)]
    pub gpu_types: Vec<String>,
}

/// A RunPod serverless GPU pool (what endpoints' `gpuIds` name): its GPU types and list
/// price, shown in the REST v2 catalogue as `pool` and `price.serverless`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GpuPoolSpec {
    /// e.g. `ADA_24`.
    pub id: String,
    pub gpu_types: Vec<String>,
    /// USD per GPU-hour; `None` = no serverless price shown.
    #[serde(default)]
    pub price: Option<f64>,
}

/// A RunPod Serverless endpoint. The API-visible settings are the ones `saveEndpoint` takes;
/// `cold_start_seconds`, `price_per_hour` and `operations` are simulator knobs.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct EndpointSpec {
    pub id: String,
    pub name: String,
    pub workers_min: u32,
    pub workers_max: u32,
    /// Seconds a worker stays up with nothing to do.
    pub idle_timeout: u32,
    pub gpu_ids: String,
    pub gpu_count: u32,
    pub template_id: String,
    pub scaler_type: String,
    pub scaler_value: u32,
    pub execution_timeout_ms: u64,
    /// Time from a worker's start until it takes jobs.
    pub cold_start_seconds: f64,
    /// USD per worker-hour, billed per worker-second.
    pub price_per_hour: f64,
    /// Per-operation times overriding [`Timing::operations`] for this endpoint.
    pub operations: BTreeMap<String, f64>,
}

impl Default for EndpointSpec {
    fn default() -> Self {
        Self {
            id: "abc123xyz".into(),
            name: "gpupool-video".into(),
            workers_min: 0,
            workers_max: 3,
            idle_timeout: 5,
            gpu_ids: "ADA_24".into(),
            gpu_count: 1,
            template_id: "gpupool-worker-tpl".into(),
            scaler_type: "QUEUE_DELAY".into(),
            scaler_value: 4,
            execution_timeout_ms: 600_000,
            cold_start_seconds: 1.0,
            price_per_hour: 0.69,
            operations: BTreeMap::new(),
        }
    }
}

fn one() -> u32 {
    1
}
fn default_reliability() -> f64 {
    0.99
}
fn default_geolocation() -> String {
    "Oregon, US".into()
}
fn default_direct_ports() -> u32 {
    20
}
fn default_verification() -> String {
    "verified".into()
}
fn default_memory() -> u32 {
    24
}
fn default_stock() -> u32 {
    8
}
fn default_max_gpu_count() -> u32 {
    8
}
fn default_data_centers() -> Vec<DataCenterSpec> {
    ["US-TX-3", "EU-RO-1"]
        .map(|id| DataCenterSpec {
            id: id.into(),
            gpu_types: Vec::new(),
        })
        .into()
}

fn default_gpu_pools() -> Vec<GpuPoolSpec> {
    let pool = |id: &str, gpu: &str, price: f64| GpuPoolSpec {
        id: id.into(),
        gpu_types: vec![gpu.into()],
        price: Some(price),
    };
    vec![
        pool("ADA_24", "NVIDIA GeForce RTX 4090", 1.1),
        pool("AMPERE_24", "NVIDIA GeForce RTX 3090", 0.68),
    ]
}

fn offer(id: u64, gpu: &str, n: u32, dph: f64, rel: f64, geo: &str, cap: u32) -> VastOfferSpec {
    VastOfferSpec {
        id,
        gpu_name: gpu.into(),
        num_gpus: n,
        dph_total: dph,
        reliability2: rel,
        geolocation: geo.into(),
        direct_port_count: 20,
        verification: "verified".into(),
        capacity: cap,
        extra: Map::new(),
    }
}

fn default_vast_offers() -> Vec<VastOfferSpec> {
    vec![
        offer(1001, "RTX 4090", 1, 0.40, 0.995, "Oregon, US", 3),
        offer(1002, "RTX 4090", 1, 0.35, 0.98, "Quebec, CA", 2),
        offer(1003, "RTX 3060", 1, 0.09, 0.99, "Texas, US", 3),
        offer(1004, "RTX 3060", 2, 0.17, 0.97, "Bavaria, DE", 1),
        offer(1005, "RTX 4090", 2, 0.78, 0.999, "Utah, US", 1),
    ]
}

fn default_gpu_types() -> Vec<GpuTypeSpec> {
    let t =
        |id: &str, name: &str, mem: u32, secure: Option<f64>, community: Option<f64>| GpuTypeSpec {
            id: id.into(),
            display_name: name.into(),
            memory_in_gb: mem,
            secure_price: secure,
            community_price: community,
            stock: 8,
            max_gpu_count: 8,
        };
    vec![
        t(
            "NVIDIA GeForce RTX 4090",
            "RTX 4090",
            24,
            Some(0.69),
            Some(0.34),
        ),
        t(
            "NVIDIA GeForce RTX 3090",
            "RTX 3090",
            24,
            Some(0.43),
            Some(0.22),
        ),
        t("NVIDIA GeForce RTX 3060", "RTX 3060", 12, None, Some(0.10)),
    ]
}
