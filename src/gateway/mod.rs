//! `gpupool gateway`: the HTTP way in for applications that are not Kubernetes clients.
//!
//! A video app on a VPS calls `POST /video/{operation}` with its API key, as it called its own
//! orchestrator; the gateway turns the request into a VideoJob in its namespace, waits for the
//! operator to run it, and answers with the worker's output. Every piece of state is in the API
//! server (the job, its idempotency hash, its pending callback), so any replica answers any
//! request and a restart loses nothing. See docs/gateway.md for the API and
//! docs/architecture.md for the design.
//!
//! | module | what it holds |
//! |---|---|
//! | [`auth`] | API keys from a Secret, the constant-time check, rate and in-flight limits |
//! | [`submit`] | the VideoJob a request becomes, idempotency, waiting for the outcome |
//! | [`routes`] | the axum handlers and the error body |
//! | [`callback`] | signed, retried, at-least-once delivery of finished jobs |
//! | [`stats`] | `GET /pool/stats` |
//! | [`metrics`] | the gateway's own Prometheus registry |

pub mod auth;
pub mod callback;
pub mod metrics;
pub mod routes;
pub mod stats;
pub mod submit;

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use futures::StreamExt;
use kube::{
    Api, Client, ResourceExt,
    runtime::{
        WatchStreamExt,
        reflector::{self, Store},
        watcher,
    },
};
use tokio::sync::{Notify, watch};
use tracing::{info, warn};

use crate::crd::{GpuInstance, GpuPool, VideoJob};

/// The label naming the gateway client that submitted a VideoJob (gateway jobs only).
pub const CLIENT_LABEL: &str = "gpupool.dev/client";
/// sha256 of what the request asked for, to tell a retry from a reuse of its Idempotency-Key.
pub const REQUEST_HASH_ANNOTATION: &str = "gpupool.dev/request-hash";
/// The URL a finished job is POSTed to.
pub const CALLBACK_URL_ANNOTATION: &str = "gpupool.dev/callback-url";
/// The callback's delivery state (JSON, see [`callback::Delivery`]).
pub const CALLBACK_STATE_ANNOTATION: &str = "gpupool.dev/callback";
/// Holds a job with a pending callback until it is delivered (or given up).
pub const CALLBACK_FINALIZER: &str = "gpupool.dev/gateway-callback";
/// The field manager and client name in the User-Agent.
pub const MANAGER: &str = "gpupool-gateway";

/// The gateway's flags, each with a `GPUPOOL_GATEWAY_*` environment variable.
#[derive(clap::Args, Debug, Clone)]
pub struct GatewayConfig {
    /// Namespace whose GpuPools run the jobs; VideoJobs are created there.
    #[arg(long, env = "GPUPOOL_GATEWAY_NAMESPACE")]
    pub namespace: String,

    /// Address of the HTTP server (the API, /healthz, /readyz, /metrics, /openapi.json).
    #[arg(
        long,
        env = "GPUPOOL_GATEWAY_HTTP_ADDR",
        default_value = "0.0.0.0:8090"
    )]
    pub http_addr: SocketAddr,

    /// Secret (in the namespace) holding one entry per client: `<client>` is its API key,
    /// `<client>.callback-secret` the optional key that signs its callbacks.
    #[arg(
        long,
        env = "GPUPOOL_GATEWAY_KEYS_SECRET",
        default_value = "gpupool-gateway-keys"
    )]
    pub keys_secret: String,

    /// Serve without API keys: every request is the client `anonymous`. For a trusted
    /// loopback only; without it the gateway refuses to start with no keys.
    #[arg(long, env = "GPUPOOL_GATEWAY_INSECURE_NO_AUTH")]
    pub insecure_no_auth: bool,

    /// Pool of a request that names none.
    #[arg(long, env = "GPUPOOL_GATEWAY_DEFAULT_POOL", default_value = "default")]
    pub default_pool: String,

    /// Longest a synchronous request waits before it is answered 202 (the job goes on).
    #[arg(long, env = "GPUPOOL_GATEWAY_MAX_WAIT_SECONDS", default_value_t = 600)]
    pub max_wait_seconds: u64,

    /// Seconds a synchronous job may wait unscheduled because the pool has no capacity
    /// (limits, no provider) before it is withdrawn and answered 503.
    #[arg(
        long,
        env = "GPUPOOL_GATEWAY_CAPACITY_WAIT_SECONDS",
        default_value_t = 60
    )]
    pub capacity_wait_seconds: u64,

    /// Requests per second each client may make (bursts of twice as many pass).
    #[arg(long, env = "GPUPOOL_GATEWAY_RATE_PER_CLIENT", default_value_t = 20.0)]
    pub rate_per_client: f64,

    /// Largest request body accepted, in bytes.
    #[arg(long, env = "GPUPOOL_GATEWAY_MAX_BODY_BYTES", default_value_t = 1 << 20)]
    pub max_body_bytes: usize,

    /// Unfinished jobs each client may have at once.
    #[arg(
        long,
        env = "GPUPOOL_GATEWAY_MAX_IN_FLIGHT_PER_CLIENT",
        default_value_t = 100
    )]
    pub max_in_flight_per_client: usize,

    /// ttlSecondsAfterFinished of the jobs the gateway creates (0: kept).
    #[arg(
        long,
        env = "GPUPOOL_GATEWAY_JOB_TTL_SECONDS",
        default_value_t = 86_400
    )]
    pub job_ttl_seconds: i64,

    /// Deliveries of one callback before it is given up.
    #[arg(
        long,
        env = "GPUPOOL_GATEWAY_CALLBACK_MAX_ATTEMPTS",
        default_value_t = 8
    )]
    pub callback_max_attempts: u32,

    /// Allow callback URLs on loopback, private and link-local addresses.
    #[arg(long, env = "GPUPOOL_GATEWAY_CALLBACK_ALLOW_PRIVATE")]
    pub callback_allow_private: bool,

    /// This replica's name, recorded in callback claims.
    #[arg(long, env = "POD_NAME")]
    pub pod_name: Option<String>,

    /// Log format: text or json.
    #[arg(long, env = "GPUPOOL_LOG_FORMAT", default_value = "text")]
    pub log_format: String,
}

impl GatewayConfig {
    pub fn replica(&self) -> String {
        self.pod_name
            .clone()
            .unwrap_or_else(|| format!("gateway-{}", std::process::id()))
    }
}

/// Read-only views of the namespace, kept by watches.
#[derive(Clone)]
pub struct Caches {
    /// Gateway jobs only (those with the client label).
    pub jobs: Store<VideoJob>,
    pub instances: Store<GpuInstance>,
    pub pools: Store<GpuPool>,
}

/// Waiters per job name: each watch event on a job bumps its channel.
#[derive(Default)]
pub struct Waiters {
    channels: Mutex<HashMap<String, watch::Sender<u64>>>,
}

impl Waiters {
    /// A receiver that changes whenever the job `name` does.
    pub fn subscribe(self: &Arc<Self>, name: &str) -> Waiter {
        let mut channels = self.channels.lock().expect("waiters lock");
        let rx = channels
            .entry(name.to_string())
            .or_insert_with(|| watch::channel(0).0)
            .subscribe();
        Waiter {
            rx,
            name: name.to_string(),
            waiters: self.clone(),
        }
    }

    /// Wakes whoever waits on `name`.
    pub fn bump(&self, name: &str) {
        if let Some(tx) = self.channels.lock().expect("waiters lock").get(name) {
            tx.send_modify(|n| *n = n.wrapping_add(1));
        }
    }
}

/// A subscription to one job's changes; the channel goes when its last waiter does.
pub struct Waiter {
    pub rx: watch::Receiver<u64>,
    name: String,
    waiters: Arc<Waiters>,
}

impl Drop for Waiter {
    fn drop(&mut self) {
        let mut channels = self.waiters.channels.lock().expect("waiters lock");
        // This receiver is still counted while it is being dropped.
        if channels
            .get(&self.name)
            .is_some_and(|tx| tx.receiver_count() <= 1)
        {
            channels.remove(&self.name);
        }
    }
}

/// Everything a handler needs; never the controller's `Context`.
pub struct GatewayState {
    pub client: Client,
    pub config: GatewayConfig,
    pub caches: Caches,
    pub waiters: Arc<Waiters>,
    pub keys: auth::KeyRing,
    pub limits: auth::Limits,
    pub metrics: metrics::GatewayMetrics,
    /// Woken on every job event, for the callback loop.
    pub job_events: Notify,
    /// When the API server last answered `GET /version`.
    pub api_seen: Mutex<Option<std::time::Instant>>,
    pub http: reqwest::Client,
    /// Set once every cache has listed.
    synced: AtomicBool,
    /// Creations in progress per client (not yet in the cache), for the in-flight limit.
    creating: Mutex<HashMap<String, usize>>,
    /// Set on SIGTERM: not ready any more, and every wait answers 202 at once.
    pub draining: watch::Sender<bool>,
}

impl GatewayState {
    pub fn jobs(&self) -> Api<VideoJob> {
        Api::namespaced(self.client.clone(), &self.config.namespace)
    }

    pub fn job(&self, name: &str) -> Option<Arc<VideoJob>> {
        self.caches
            .jobs
            .get(&reflector::ObjectRef::new(name).within(&self.config.namespace))
    }

    pub fn pool(&self, name: &str) -> Option<Arc<GpuPool>> {
        self.caches
            .pools
            .get(&reflector::ObjectRef::new(name).within(&self.config.namespace))
    }

    /// Ready: the caches have listed, keys are loaded, and the API server answered lately.
    pub fn not_ready(&self) -> Option<&'static str> {
        if *self.draining.borrow() {
            return Some("shutting down");
        }
        if !self.is_synced() {
            return Some("caches not synced");
        }
        if !self.config.insecure_no_auth && self.keys.is_empty() {
            return Some("no API keys loaded");
        }
        let fresh = self
            .api_seen
            .lock()
            .expect("api_seen lock")
            .is_some_and(|t| t.elapsed() < Duration::from_secs(10));
        if !fresh {
            return Some("the API server has not answered lately");
        }
        None
    }

    /// Unfinished jobs of `client`: in the cache, plus creations in progress.
    pub fn in_flight(&self, client: &str) -> usize {
        let cached = self
            .caches
            .jobs
            .state()
            .iter()
            .filter(|j| j.labels().get(CLIENT_LABEL).map(String::as_str) == Some(client))
            .filter(|j| !submit::is_finished(j) && j.metadata.deletion_timestamp.is_none())
            .count();
        let creating = self
            .creating
            .lock()
            .expect("creating lock")
            .get(client)
            .copied()
            .unwrap_or(0);
        cached + creating
    }

    /// Reserves one of the client's in-flight slots for a creation, or refuses (429).
    pub fn limits_in_flight(
        self: &Arc<Self>,
        client: &str,
    ) -> Result<InFlightSlot, routes::ApiError> {
        let max = self.config.max_in_flight_per_client;
        if self.in_flight(client) >= max {
            return Err(routes::ApiError::new(
                429,
                "TooManyJobs",
                &format!("this client already has {max} unfinished jobs; wait for some to finish"),
            )
            .retry_after(5));
        }
        *self
            .creating
            .lock()
            .expect("creating lock")
            .entry(client.to_string())
            .or_default() += 1;
        Ok(InFlightSlot {
            state: self.clone(),
            client: client.to_string(),
        })
    }

    /// Whether every cache has listed once.
    pub fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Relaxed)
    }
}

/// A creation counted against its client's in-flight limit until it is dropped.
pub struct InFlightSlot {
    state: Arc<GatewayState>,
    client: String,
}

impl Drop for InFlightSlot {
    fn drop(&mut self) {
        let mut creating = self.state.creating.lock().expect("creating lock");
        if let Some(n) = creating.get_mut(&self.client) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                creating.remove(&self.client);
            }
        }
    }
}

/// Runs the gateway until its server fails or the process is stopped.
pub async fn run(config: GatewayConfig) -> Result<(), Box<dyn std::error::Error>> {
    let client = Client::try_default().await?;
    let keys = auth::KeyRing::default();
    if !config.insecure_no_auth {
        // Refuse to start without keys, with a message that names the Secret (never a key).
        let loaded = auth::load_keys(&client, &config.namespace, &config.keys_secret).await?;
        if loaded.is_empty() {
            return Err(format!(
                "the Secret {}/{} holds no API key; add one entry per client, or run with \
                 --insecure-no-auth on a trusted network only",
                config.namespace, config.keys_secret
            )
            .into());
        }
        keys.replace(loaded);
    } else {
        keys.replace(vec![auth::ClientKey::anonymous()]);
    }
    let (jobs, job_writer) = reflector::store();
    let (instances, instance_writer) = reflector::store();
    let (pools, pool_writer) = reflector::store();
    let http = crate::provider::http::build_reqwest(
        Duration::from_secs(5),
        concat!("gpupool-gateway/", env!("CARGO_PKG_VERSION")),
    )?;
    let state = Arc::new(GatewayState {
        limits: auth::Limits::new(config.rate_per_client),
        client: client.clone(),
        caches: Caches {
            jobs: jobs.clone(),
            instances: instances.clone(),
            pools: pools.clone(),
        },
        waiters: Arc::new(Waiters::default()),
        keys,
        metrics: metrics::GatewayMetrics::new(),
        job_events: Notify::new(),
        api_seen: Mutex::new(None),
        http,
        synced: AtomicBool::new(false),
        creating: Mutex::default(),
        draining: watch::channel(false).0,
        config,
    });
    let ns = state.config.namespace.clone();

    let job_watch = {
        let state = state.clone();
        let api: Api<VideoJob> = Api::namespaced(client.clone(), &ns);
        let cfg = watcher::Config::default().labels(CLIENT_LABEL);
        watcher(api, cfg)
            .default_backoff()
            .reflect(job_writer)
            .for_each(move |event| {
                let state = state.clone();
                async move {
                    match event {
                        Ok(watcher::Event::Apply(job) | watcher::Event::Delete(job)) => {
                            state.waiters.bump(&job.name_any());
                            state.job_events.notify_one();
                        }
                        Ok(watcher::Event::InitDone) => {
                            for job in state.caches.jobs.state() {
                                state.waiters.bump(&job.name_any());
                            }
                            state.job_events.notify_one();
                        }
                        Ok(_) => {}
                        Err(e) => warn!(error = %e, "VideoJob watch failed; retrying"),
                    }
                }
            })
    };
    let instance_watch = {
        let api: Api<GpuInstance> = Api::namespaced(client.clone(), &ns);
        watcher(api, watcher::Config::default())
            .default_backoff()
            .reflect(instance_writer)
            .for_each(|e| async move {
                if let Err(e) = e {
                    warn!(error = %e, "GpuInstance watch failed; retrying");
                }
            })
    };
    let pool_watch = {
        let api: Api<GpuPool> = Api::namespaced(client.clone(), &ns);
        watcher(api, watcher::Config::default())
            .default_backoff()
            .reflect(pool_writer)
            .for_each(|e| async move {
                if let Err(e) = e {
                    warn!(error = %e, "GpuPool watch failed; retrying");
                }
            })
    };
    tokio::spawn(job_watch);
    tokio::spawn(instance_watch);
    tokio::spawn(pool_watch);
    let synced = state.clone();
    tokio::spawn(async move {
        let _ = tokio::join!(
            jobs.wait_until_ready(),
            instances.wait_until_ready(),
            pools.wait_until_ready()
        );
        synced.synced.store(true, Ordering::Relaxed);
    });
    tokio::spawn(auth::reload_keys(state.clone()));
    tokio::spawn(api_probe(state.clone()));
    tokio::spawn(callback::deliver_forever(state.clone()));

    let (addr, server) = routes::serve(state.clone()).await?;
    info!(%addr, namespace = %ns, auth = !state.config.insecure_no_auth, "gpupool gateway listening");
    let mut server = tokio::spawn(server);
    tokio::select! {
        r = &mut server => r??,
        () = terminated() => {
            // A rolling update must not cut synchronous requests off: each waiting request is
            // answered 202 with its job's Location (the job goes on), and the server stops
            // taking connections and ends once those answers are out.
            info!("SIGTERM: answering waiting requests 202 and shutting down");
            state.draining.send_replace(true);
            match tokio::time::timeout(DRAIN_GRACE, server).await {
                Ok(r) => r??,
                Err(_) => warn!("requests still open after the drain grace; stopping anyway"),
            }
        }
    }
    Ok(())
}

/// How long a stopping gateway keeps serving the answers it owes.
const DRAIN_GRACE: Duration = Duration::from_secs(10);

async fn terminated() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut s) => {
            s.recv().await;
        }
        Err(e) => {
            warn!(error = %e, "cannot listen for SIGTERM");
            std::future::pending::<()>().await;
        }
    }
}

/// Asks the API server for its version every 2 s, for `/readyz`.
async fn api_probe(state: Arc<GatewayState>) {
    loop {
        match state.client.apiserver_version().await {
            Ok(_) => {
                *state.api_seen.lock().expect("api_seen lock") = Some(std::time::Instant::now())
            }
            Err(e) => warn!(error = %e, "the API server did not answer /version"),
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}
