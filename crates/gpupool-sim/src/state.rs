//! The simulated world behind every API surface: instances, the catalogue, faults, the call
//! log, executions, serverless endpoints and jobs, and the one seeded RNG.
//!
//! One `std::sync::Mutex` guards it all; it is never held across an `.await`. Each provider
//! module renders this state in its own wire format, so the Vast API, RunPod GraphQL and
//! REST v1 all see the same machines.

use std::{
    collections::{BTreeMap, VecDeque},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use axum::body::Body;
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use jiff::Timestamp;
use rand::{SeedableRng, rngs::StdRng};
use serde_json::{Map, Value, json};
use tokio::{sync::watch, task::JoinHandle};

use super::{
    config::{
        ApiKeys, DataCenterSpec, GpuPoolSpec, GpuTypeSpec, RateLimitSpec, SimConfig, Timing,
        VastOfferSpec,
    },
    faults::Faults,
    ratelimit::RateWindows,
    serverless::{Endpoint, Job},
    util,
};

/// The simulator: its starting configuration (for reset) and the live state.
pub struct Sim {
    pub initial: SimConfig,
    state: Mutex<State>,
    /// Set to true once on shutdown; every background loop watches it.
    pub shutdown: watch::Sender<bool>,
    /// Bumped whenever a serverless job changes, so `/runsync` can wait without polling.
    pub jobs_changed: watch::Sender<u64>,
    /// HTTP client of the RunPod proxy stand-in.
    pub client: Client<HttpConnector, Body>,
    /// `http://127.0.0.1:PORT`, once listening (what real serverless workers are pointed at).
    pub base_url: std::sync::OnceLock<String>,
    /// The key real serverless workers present to the queue (`RUNPOD_AI_API_KEY`).
    pub queue_key: String,
    /// The presigned-URL storage stand-in (`/storage/...`).
    pub storage: super::storage::Store,
    /// Source of instance generations, unique for the process so that a lifecycle task from
    /// before a reset never mistakes a new instance with a reused id for its own.
    generations: AtomicU64,
}

impl Sim {
    pub fn new(config: SimConfig) -> Arc<Self> {
        let client =
            Client::builder(hyper_util::rt::TokioExecutor::new()).build(HttpConnector::new());
        Arc::new(Self {
            state: Mutex::new(State::new(&config, 0)),
            initial: config,
            shutdown: watch::channel(false).0,
            jobs_changed: watch::channel(0).0,
            client,
            storage: Default::default(),
            base_url: std::sync::OnceLock::new(),
            queue_key: format!("rp-queue-{}", uuid::Uuid::new_v4().simple()),
            generations: AtomicU64::new(1),
        })
    }

    /// A generation number never handed out before.
    pub fn next_generation(&self) -> u64 {
        self.generations.fetch_add(1, Ordering::Relaxed)
    }

    /// The state. A panic elsewhere must not wedge the simulator, so poisoning is ignored.
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn notify_jobs(&self) {
        self.jobs_changed.send_modify(|v| *v = v.wrapping_add(1));
    }
}

/// Which marketplace an instance belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Provider {
    Vast,
    RunPod,
}

impl Provider {
    pub fn name(self) -> &'static str {
        match self {
            Self::Vast => "vast",
            Self::RunPod => "runpod",
        }
    }
}

/// Where an instance is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Created, waiting for a machine (Vast `actual_status` null).
    Provisioning,
    /// Pulling the image, starting the container (Vast `loading`).
    Loading,
    /// Container up, worker listening.
    Running,
    /// Stopped by its owner; keeps the machine, no worker.
    Stopped,
    /// The container died (Vast `exited`, RunPod `DEAD`); still billed until destroyed.
    Dead,
    /// Destroyed / terminated; kept for the admin API and the bill.
    Destroyed,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Self::Provisioning => "provisioning",
            Self::Loading => "loading",
            Self::Running => "running",
            Self::Stopped => "stopped",
            Self::Dead => "dead",
            Self::Destroyed => "destroyed",
        }
    }
}

/// A port the instance asked for. `public` is the outside port (fake unless it is the
/// worker's, whose outside port is the real loopback port while running).
#[derive(Clone, Debug, PartialEq)]
pub struct PortSpec {
    pub port: u16,
    /// `tcp`, `udp` or `http`.
    pub proto: String,
    pub public: u16,
}

/// The worker server of a running instance.
#[derive(Debug)]
pub struct WorkerHandle {
    pub port: u16,
    pub task: JoinHandle<()>,
    /// The pid of the real worker process behind the port (`worker_process`); 0 once gone.
    pub pid: Option<std::sync::Arc<std::sync::atomic::AtomicU32>>,
}

/// A rented machine, Vast instance or RunPod pod.
#[derive(Debug)]
pub struct Instance {
    pub provider: Provider,
    /// Vast: decimal contract id. RunPod: pod id.
    pub id: String,
    /// Vast `label`, RunPod pod `name`.
    pub label: Option<String>,
    pub gpu_name: String,
    pub num_gpus: u32,
    pub price_per_hour: f64,
    pub image: String,
    /// Environment as given (Vast: includes `-p ...` option keys).
    pub env: Vec<(String, String)>,
    pub ports: Vec<PortSpec>,
    /// Container port the worker serves on.
    pub worker_port: u16,
    pub phase: Phase,
    pub created_at: Timestamp,
    /// First time it reached running.
    pub running_at: Option<Timestamp>,
    /// Latest time it reached running (differs after a stop/start).
    pub last_started_at: Option<Timestamp>,
    pub died_at: Option<Timestamp>,
    pub destroyed_at: Option<Timestamp>,
    pub last_status_change: Timestamp,
    /// Bumped on every externally caused transition so stale lifecycle tasks stand down.
    pub generation: u64,
    pub worker: Option<WorkerHandle>,
    /// When the worker started serving (for the boot delay).
    pub worker_started: Option<Instant>,
    pub die_on_next_job: bool,
    /// Stopped because a higher bid took the machine (interruptible instances only).
    pub outbid: bool,
    pub executions: u64,
    /// Provider-specific fields fixed at create (Vast offer snapshot, RunPod input...).
    pub details: Map<String, Value>,
}

impl Instance {
    pub fn is_destroyed(&self) -> bool {
        self.phase == Phase::Destroyed
    }

    /// Whether it was rented with a bid (Vast interruptible).
    pub fn is_bid(&self) -> bool {
        self.details
            .get("is_bid")
            .and_then(Value::as_bool)
            .unwrap_or(false)
    }

    /// Seconds billed so far: from create until destroy (or now).
    pub fn billed_seconds(&self, now: Timestamp) -> f64 {
        util::seconds_between(self.created_at, self.destroyed_at.unwrap_or(now))
    }

    pub fn cost(&self, now: Timestamp) -> f64 {
        util::cost(self.price_per_hour, self.billed_seconds(now))
    }

    /// The outside port of the worker while running.
    pub fn worker_host_port(&self) -> Option<u16> {
        self.worker.as_ref().map(|w| w.port)
    }

    pub fn env_value(&self, key: &str) -> Option<&str> {
        self.env
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .filter(|v| !v.is_empty())
    }

    pub fn detail_str(&self, key: &str) -> Option<&str> {
        self.details.get(key).and_then(Value::as_str)
    }

    pub fn detail_u64(&self, key: &str) -> Option<u64> {
        self.details.get(key).and_then(Value::as_u64)
    }
}

/// One API call as the admin API reports it (never with keys or tokens: path only).
#[derive(Clone, Debug)]
pub struct CallRecord {
    pub time: Timestamp,
    pub method: String,
    pub path: String,
    pub operation: String,
    /// 0 when no response was sent (hung, or the connection was dropped).
    pub status: u16,
    pub instance: Option<String>,
    pub duration_ms: u64,
}

/// Counts per operation and status, and a bounded log of recent calls.
#[derive(Debug, Default)]
pub struct CallLog {
    pub counts: BTreeMap<String, BTreeMap<String, u64>>,
    pub recent: VecDeque<CallRecord>,
    pub total: u64,
}

/// How many recent calls `/admin/calls` keeps.
pub const CALL_LOG_CAPACITY: usize = 2000;

impl CallLog {
    pub fn record(&mut self, rec: CallRecord) {
        *self
            .counts
            .entry(rec.operation.clone())
            .or_default()
            .entry(rec.status.to_string())
            .or_default() += 1;
        self.total += 1;
        if self.recent.len() >= CALL_LOG_CAPACITY {
            self.recent.pop_front();
        }
        self.recent.push_back(rec);
    }
}

/// Executions of one job id (`X-Job-Id`, or a serverless job id).
#[derive(Clone, Debug, Default)]
pub struct Execution {
    pub count: u64,
    /// The instance (or serverless worker) of each execution, in order.
    pub instances: Vec<String>,
    /// When the first execution arrived (microseconds: the benchmarks measure dispatch by it).
    pub first_at: Option<Timestamp>,
}

/// Everything that changes while the simulator runs.
pub struct State {
    pub rng: StdRng,
    pub timing: Timing,
    pub api_keys: ApiKeys,
    pub faults: Faults,
    pub offers: Vec<VastOfferSpec>,
    pub gpu_types: Vec<GpuTypeSpec>,
    pub data_centers: Vec<DataCenterSpec>,
    pub gpu_pools: Vec<GpuPoolSpec>,
    pub instances: Vec<Instance>,
    pub next_vast_id: u64,
    pub calls: CallLog,
    pub executions: BTreeMap<String, Execution>,
    pub endpoints: Vec<Endpoint>,
    pub jobs: Vec<Job>,
    /// RunPod REST v2's quota and the requests counted against it.
    pub rate_limit: RateLimitSpec,
    pub rate_windows: RateWindows,
    /// Bumped by reset; background tasks of an older epoch stop.
    pub epoch: u64,
    /// When the simulator (or the last reset) started.
    pub started_at: Timestamp,
}

impl State {
    pub fn new(config: &SimConfig, epoch: u64) -> Self {
        Self {
            rng: StdRng::seed_from_u64(config.seed),
            timing: config.timing.clone(),
            api_keys: config.api_keys.clone(),
            faults: config.faults.clone(),
            offers: config.vast_offers.clone(),
            gpu_types: config.runpod_gpu_types.clone(),
            data_centers: config.runpod_data_centers.clone(),
            gpu_pools: config.runpod_gpu_pools.clone(),
            instances: Vec::new(),
            next_vast_id: 7_000_001,
            calls: CallLog::default(),
            executions: BTreeMap::new(),
            endpoints: Vec::new(),
            jobs: Vec::new(),
            rate_limit: config.runpod_v2_rate_limit.clone(),
            rate_windows: RateWindows::default(),
            epoch,
            started_at: util::now_ms(),
        }
    }

    pub fn instance(&self, provider: Provider, id: &str) -> Option<&Instance> {
        self.instances
            .iter()
            .find(|i| i.provider == provider && i.id == id)
    }

    pub fn instance_mut(&mut self, provider: Provider, id: &str) -> Option<&mut Instance> {
        self.instances
            .iter_mut()
            .find(|i| i.provider == provider && i.id == id)
    }

    /// Any provider's instance by id (Vast ids are numeric, pod ids start with a letter).
    pub fn any_instance_mut(&mut self, id: &str) -> Option<&mut Instance> {
        self.instances.iter_mut().find(|i| i.id == id)
    }

    /// Live (not destroyed) Vast instances on an offer.
    pub fn offer_in_use(&self, offer_id: u64) -> u32 {
        self.instances
            .iter()
            .filter(|i| i.provider == Provider::Vast && !i.is_destroyed())
            .filter(|i| i.detail_u64("offer_id") == Some(offer_id))
            .count() as u32
    }

    /// GPUs of a RunPod type held by live pods.
    pub fn gpus_in_use(&self, gpu_type_id: &str) -> u32 {
        self.instances
            .iter()
            .filter(|i| i.provider == Provider::RunPod && !i.is_destroyed())
            .filter(|i| i.detail_str("gpu_type_id") == Some(gpu_type_id))
            .map(|i| i.num_gpus)
            .sum()
    }

    /// The ids of the data centers that have RunPod GPU type `gpu_type_id`, in order.
    pub fn data_centers_of(&self, gpu_type_id: &str) -> Vec<&str> {
        self.data_centers
            .iter()
            .filter(|d| d.gpu_types.is_empty() || d.gpu_types.iter().any(|g| g == gpu_type_id))
            .map(|d| d.id.as_str())
            .collect()
    }

    /// The serverless pool RunPod GPU type `gpu_type_id` is in, if any.
    pub fn pool_of(&self, gpu_type_id: &str) -> Option<&GpuPoolSpec> {
        self.gpu_pools
            .iter()
            .find(|p| p.gpu_types.iter().any(|g| g == gpu_type_id))
    }

    /// Free GPUs of a RunPod type right now (0 when exhausted by a fault).
    pub fn gpus_free(&self, t: &GpuTypeSpec) -> u32 {
        if self.faults.is_exhausted(&[&t.id, &t.display_name]) {
            return 0;
        }
        t.stock.saturating_sub(self.gpus_in_use(&t.id))
    }

    /// Whether a Vast offer can be rented now.
    pub fn offer_available(&self, o: &VastOfferSpec) -> bool {
        !self.faults.is_exhausted(&[&o.gpu_name]) && self.offer_in_use(o.id) < o.capacity
    }

    /// Counts one execution of `job_id` on `instance`.
    pub fn count_execution(&mut self, job_id: &str, instance: &str) {
        let e = self.executions.entry(job_id.to_string()).or_default();
        e.count += 1;
        e.first_at.get_or_insert_with(Timestamp::now);
        e.instances.push(instance.to_string());
    }
}

/// `{"k": v}` helper for building detail maps.
pub fn details(pairs: Value) -> Map<String, Value> {
    match pairs {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

/// Summary of one instance for the admin API.
pub fn instance_summary(i: &Instance, now: Timestamp) -> Value {
    json!({
        "provider": i.provider.name(),
        "id": i.id,
        "label": i.label,
        "gpu": i.gpu_name,
        "num_gpus": i.num_gpus,
        "price_per_hour": i.price_per_hour,
        "phase": i.phase.name(),
        "alive": !i.is_destroyed(),
        "created_at": util::rfc3339(i.created_at),
        "running_at": i.running_at.map(util::rfc3339),
        "died_at": i.died_at.map(util::rfc3339),
        "destroyed_at": i.destroyed_at.map(util::rfc3339),
        "billed_seconds": i.billed_seconds(now),
        "cost": i.cost(now),
        "worker_port": i.worker_host_port(),
        "worker_pid": i.worker.as_ref().and_then(|w| w.pid.as_ref()).map(|p| p.load(std::sync::atomic::Ordering::SeqCst)),
        "executions": i.executions,
    })
}
