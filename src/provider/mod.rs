//! The clouds: what the controller may ask of a GPU provider, and the closed set of ways a
//! provider can say no.
//!
//! Two narrow traits, Karpenter style: [`InstanceProvider`] for machine marketplaces (Vast.ai,
//! RunPod pods) and [`ServerlessProvider`] for RunPod Serverless endpoints. Each vendor module
//! keeps its wire DTOs private and maps them to the types here. This module never imports
//! `controller/`.

pub mod http;
pub mod instrumented;
pub mod quota;
pub mod runpod;
pub mod runpod_serverless;
pub mod runpod_v2;
pub mod vast;

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    time::Duration,
};

use async_trait::async_trait;
use jiff::Timestamp;
use rust_decimal::Decimal;
use serde_json::Value;

pub use crate::crd::ProviderKind;

/// Environment variable carrying the per-instance session token to the worker; the worker
/// then requires it in the `X-Session-Token` header.
pub const ENV_SESSION_TOKEN: &str = "GPUPOOL_SESSION_TOKEN";
/// Environment variable carrying the pool's worker API key to the worker; the worker then
/// requires it in the `X-API-Key` header.
pub const ENV_API_KEY: &str = "GPUPOOL_API_KEY";
/// Environment variable telling the worker which port to listen on.
pub const ENV_WORKER_PORT: &str = "GPUPOOL_WORKER_PORT";
/// Environment variable telling the worker the path of its health check (the pool's
/// `worker.healthPath`), which the operator probes.
pub const ENV_WORKER_HEALTH_PATH: &str = "GPUPOOL_WORKER_HEALTH_PATH";
/// Environment variable carrying the machine's gpupool label, where the provider keeps the
/// label in a field the user can change (a RunPod pod's `name`): a second mark, set at create,
/// that a machine must also carry to be taken for gpupool's.
pub const ENV_LABEL: &str = "GPUPOOL_LABEL";

/// Every way a provider call can fail. The controller branches on the variant, never on text.
#[derive(thiserror::Error, Debug, Clone, PartialEq)]
pub enum ProviderError {
    /// The machine, job or endpoint does not exist (deleting it again is success).
    #[error("not found: {0}")]
    NotFound(String),
    /// No offer or GPU matches now; try another provider and come back later.
    #[error("insufficient capacity: {0}")]
    InsufficientCapacity(String),
    /// Too many requests. `retry_after` is the provider's hint, if it gave one (Vast never does).
    #[error("rate limited by the provider")]
    RateLimited { retry_after: Option<Duration> },
    /// The API key was refused. Fix the Secret; retrying will not help.
    #[error("unauthorized: {0}")]
    Unauthorized(String),
    /// Network trouble, timeouts, 5xx: worth retrying with back-off.
    #[error("transient provider error: {0}")]
    Transient(String),
    /// The provider refused the request as invalid: retrying the same request will not help.
    #[error("provider refused the request: {0}")]
    Permanent(String),
}

impl ProviderError {
    /// Whether the same call may succeed if repeated later.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::RateLimited { .. } | Self::Transient(_))
    }

    /// Short, stable name for metrics and conditions.
    pub fn label(&self) -> &'static str {
        match self {
            Self::NotFound(_) => "NotFound",
            Self::InsufficientCapacity(_) => "InsufficientCapacity",
            Self::RateLimited { .. } => "RateLimited",
            Self::Unauthorized(_) => "Unauthorized",
            Self::Transient(_) => "Transient",
            Self::Permanent(_) => "Permanent",
        }
    }
}

pub type ProviderResult<T> = Result<T, ProviderError>;

/// An API key. Its `Debug` and `Display` never show the value; only [`Credentials::expose`]
/// does, at the one place a request header is built.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials(String);

impl Credentials {
    pub fn new(key: impl Into<String>) -> Self {
        Self(key.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Credentials(<redacted>)")
    }
}

impl fmt::Display for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// A machine offer the provider would rent now, within the pool entry's limits.
#[derive(Clone, Debug, PartialEq)]
pub struct Offer {
    /// Vast: the ask id. RunPod: the GPU type id.
    pub id: String,
    pub gpu_name: String,
    pub num_gpus: u32,
    /// Total USD per hour for the machine.
    pub price_per_hour: Decimal,
    pub region: Option<String>,
    pub reliability: Option<f64>,
}

/// What to run on a new machine.
#[derive(Clone, Debug, PartialEq)]
pub struct CreateRequest {
    /// Carries the cluster id and the GpuInstance UID (see [`instance_label`]); Vast stores
    /// it as `label`, RunPod as the pod `name`. Create is made idempotent by looking it up.
    pub label: String,
    pub image: String,
    /// Environment of the worker container (includes the session token, the API key and the
    /// values of `worker.env` entries read from Secrets; never log).
    pub env: BTreeMap<String, String>,
    /// Names of the [`Self::env`] entries whose values came from Secrets (`worker.env`
    /// `valueFrom`), besides the session token and API key.
    pub secret_env: BTreeSet<String>,
    /// Port the worker listens on inside the container.
    pub port: u16,
    pub disk_gb: u32,
}

impl CreateRequest {
    /// The values in [`Self::env`] that are secrets (the session token, the worker API key
    /// and every entry named in [`Self::secret_env`]): redacted from any error the provider
    /// answers to this request.
    pub fn secrets(&self) -> Vec<Credentials> {
        [ENV_SESSION_TOKEN, ENV_API_KEY]
            .into_iter()
            .chain(self.secret_env.iter().map(String::as_str))
            .filter_map(|k| self.env.get(k))
            .filter(|v| !v.is_empty())
            .map(|v| Credentials::new(v.clone()))
            .collect()
    }
}

/// Coarse state of a remote machine, mapped from each vendor's fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RemoteState {
    /// Being created, scheduled, pulling its image or starting.
    Starting,
    /// The provider reports it running. The worker may still be starting: check its health.
    Running,
    /// Stopped, exited or offline: it will not serve jobs without intervention.
    Stopped(String),
    /// Destroyed or being destroyed.
    Terminated,
}

/// A machine as the provider describes it.
#[derive(Clone, Debug, PartialEq)]
pub struct RemoteInstance {
    pub id: String,
    pub label: Option<String>,
    pub state: RemoteState,
    /// Base URL of the worker (`http://ip:port` or the RunPod proxy URL), once known.
    pub endpoint: Option<String>,
    pub gpu_name: Option<String>,
    pub num_gpus: Option<u32>,
    pub price_per_hour: Option<Decimal>,
    pub region: Option<String>,
    pub started_at: Option<Timestamp>,
}

/// A marketplace of machines (Vast.ai, RunPod pods). One value per pool provider entry:
/// it knows its own filters (GPU names, price cap, reliability...), credentials and base URL.
#[async_trait]
pub trait InstanceProvider: Send + Sync + fmt::Debug {
    fn kind(&self) -> ProviderKind;

    /// Offers matching the entry's filters, cheapest first. Empty when nothing matches.
    async fn offers(&self) -> ProviderResult<Vec<Offer>>;

    /// Rents a machine from `offer`. Not retried internally on ambiguous failures: the caller
    /// looks the label up before creating again.
    async fn create(&self, offer: &Offer, req: &CreateRequest) -> ProviderResult<RemoteInstance>;

    /// The machine with this provider id; `NotFound` when it is gone.
    async fn get(&self, id: &str) -> ProviderResult<RemoteInstance>;

    /// Destroys the machine. A machine that is already gone counts as destroyed (`Ok`).
    async fn delete(&self, id: &str) -> ProviderResult<()>;

    /// Every machine of this account whose label starts with `prefix`, all pages.
    async fn list_labeled(&self, prefix: &str) -> ProviderResult<Vec<RemoteInstance>>;

    /// The machine carrying exactly this label, if any (the first, when several do).
    async fn find_by_label(&self, label: &str) -> ProviderResult<Option<RemoteInstance>> {
        Ok(self
            .list_labeled(label)
            .await?
            .into_iter()
            .find(|i| i.label.as_deref() == Some(label)))
    }
}

/// State of a job at a serverless endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServerlessStatus {
    InQueue,
    InProgress,
    Completed,
    Failed,
    Cancelled,
    TimedOut,
}

impl ServerlessStatus {
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            Self::Completed | Self::Failed | Self::Cancelled | Self::TimedOut
        )
    }
}

/// A serverless job as the endpoint reports it.
#[derive(Clone, Debug, PartialEq)]
pub struct ServerlessJob {
    pub id: String,
    pub status: ServerlessStatus,
    pub output: Option<Value>,
    pub error: Option<String>,
    pub delay_time_ms: Option<u64>,
    pub execution_time_ms: Option<u64>,
}

/// Queue and worker counts of an endpoint.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EndpointHealth {
    pub jobs_in_queue: u64,
    pub jobs_in_progress: u64,
    pub jobs_completed: u64,
    pub jobs_failed: u64,
    pub workers_idle: u64,
    pub workers_running: u64,
}

/// The endpoint settings the operator keeps in line with its pool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointSettings {
    pub idle_timeout_seconds: u32,
    pub workers_min: u32,
    pub workers_max: u32,
}

/// A RunPod Serverless endpoint. One value per pool provider entry.
#[async_trait]
pub trait ServerlessProvider: Send + Sync + fmt::Debug {
    /// Queues a job; the body sent is `{"input": input}`. Returns the endpoint's job id.
    async fn submit(&self, input: &Value) -> ProviderResult<String>;
    async fn status(&self, job_id: &str) -> ProviderResult<ServerlessJob>;
    /// Cancels a queued or running job. A job already finished or gone is `Ok`.
    async fn cancel(&self, job_id: &str) -> ProviderResult<()>;
    async fn health(&self) -> ProviderResult<EndpointHealth>;
    async fn settings(&self) -> ProviderResult<EndpointSettings>;
    /// Changes only these three settings, keeping every other setting of the endpoint.
    async fn update_settings(&self, settings: &EndpointSettings) -> ProviderResult<()>;
}

/// Prefix of every label gpupool puts on a provider machine.
pub const LABEL_PREFIX: &str = "gpupool";

/// The label for a GpuInstance: `gpupool-{clusterId}-{gpuInstanceUid}`. It is a valid
/// RunPod pod name and Vast label (both under 256 characters).
pub fn instance_label(cluster_id: &str, instance_uid: &str) -> String {
    format!("{}{instance_uid}", cluster_label_prefix(cluster_id))
}

/// The prefix shared by every label of one cluster: what the orphan sweep lists.
pub fn cluster_label_prefix(cluster_id: &str) -> String {
    format!("{LABEL_PREFIX}-{cluster_id}-")
}

/// The GpuInstance UID inside a label of this cluster, if it is one.
pub fn instance_uid_from_label<'a>(cluster_id: &str, label: &'a str) -> Option<&'a str> {
    label
        .strip_prefix(&cluster_label_prefix(cluster_id))
        .filter(|uid| !uid.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_round_trip_and_do_not_match_other_clusters() {
        let label = instance_label("c0ffee", "5d2a-uid");
        assert_eq!(label, "gpupool-c0ffee-5d2a-uid");
        assert_eq!(instance_uid_from_label("c0ffee", &label), Some("5d2a-uid"));
        assert_eq!(instance_uid_from_label("c0ffe", &label), None);
        assert_eq!(instance_uid_from_label("c0ffee", "gpupool-c0ffee-"), None);
    }

    #[test]
    fn credentials_never_print() {
        let c = Credentials::new("sk-very-secret");
        assert!(!format!("{c:?} {c}").contains("very-secret"));
        assert_eq!(c.expose(), "sk-very-secret");
    }

    #[test]
    fn a_create_redacts_the_token_the_api_key_and_the_env_values_from_secrets() {
        let env = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let req = CreateRequest {
            label: "l".into(),
            image: "i".into(),
            env: env(&[
                (ENV_SESSION_TOKEN, "tok"),
                (ENV_API_KEY, "key"),
                ("S3_SECRET_KEY", "s3"),
                ("LOG_LEVEL", "info"),
            ]),
            secret_env: ["S3_SECRET_KEY".to_string()].into(),
            port: 8000,
            disk_gb: 10,
        };
        let shown: Vec<String> = req
            .secrets()
            .iter()
            .map(|c| c.expose().to_string())
            .collect();
        assert_eq!(shown, ["tok", "key", "s3"]);
    }

    #[test]
    fn error_classes() {
        assert!(ProviderError::RateLimited { retry_after: None }.is_transient());
        assert!(ProviderError::Transient("x".into()).is_transient());
        assert!(!ProviderError::Unauthorized("x".into()).is_transient());
        assert_eq!(
            ProviderError::InsufficientCapacity("x".into()).label(),
            "InsufficientCapacity"
        );
    }
}
