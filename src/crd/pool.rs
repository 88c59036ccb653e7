//! `GpuPool`: the policy for one pool of rented GPU machines.
//!
//! Types and schema only. The decisions that read a pool live in `controller/`.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{DNS_LABEL_PATTERN, MONEY_PATTERN, Money, SecretKeyRef, conditions_schema};

/// Default seconds an instance stays warm after its last job.
pub const DEFAULT_IDLE_TIMEOUT_SECONDS: i64 = 300;
/// Default cap on instances of one pool.
pub const DEFAULT_MAX_INSTANCES: i32 = 10;
/// Default time an instance has to become Ready before it is replaced.
pub const DEFAULT_PROVISION_TIMEOUT_SECONDS: i64 = 900;
/// Upper bound of every timeout in seconds: one day.
pub const MAX_TIMEOUT_SECONDS: i64 = 86_400;

/// A pool of GPU machines rented on demand from an ordered list of providers.
///
/// Instances of the pool are created when VideoJobs wait, reused while warm, and destroyed
/// `idleTimeoutSeconds` after their last job unless `minIdle` keeps them.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "gpupool.dev",
    version = "v1alpha1",
    kind = "GpuPool",
    plural = "gpupools",
    shortname = "gp",
    category = "gpupool",
    namespaced,
    status = "GpuPoolStatus",
    derive = "PartialEq",
    doc = "A pool of GPU machines rented on demand from Vast.ai and RunPod for VideoJobs.",
    printcolumn(
        name = "Instances",
        type_ = "integer",
        json_path = ".status.instances.total",
        description = "Instances of the pool that exist now"
    ),
    printcolumn(
        name = "Ready",
        type_ = "integer",
        json_path = ".status.instances.ready",
        description = "Ready instances, busy or idle"
    ),
    printcolumn(
        name = "Busy",
        type_ = "integer",
        json_path = ".status.instances.busy",
        description = "Instances running a job"
    ),
    printcolumn(
        name = "Max",
        type_ = "integer",
        json_path = ".spec.maxInstances",
        description = "Cap on instances"
    ),
    printcolumn(
        name = "Spend/h",
        type_ = "string",
        json_path = ".status.spendPerHour",
        description = "USD per hour over running instances"
    ),
    printcolumn(
        name = "Idle-Timeout",
        type_ = "integer",
        json_path = ".spec.idleTimeoutSeconds",
        priority = 1,
        description = "Seconds an idle instance is kept"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.minIdle <= self.maxInstances").message("minIdle must not exceed maxInstances").field_path(".minIdle"),
    validation = Rule::new("has(self.worker) || self.providers.all(p, has(p.runpodServerless))").message("worker is required when the pool has a vast or runpod provider").field_path(".worker"),
)]
pub struct GpuPoolSpec {
    /// Seconds an instance is kept after its last job finished (or after it became Ready);
    /// then it is destroyed unless minIdle keeps it. Between 1 and 86400.
    #[serde(default = "default_idle_timeout")]
    #[schemars(range(min = 1, max = MAX_TIMEOUT_SECONDS))]
    pub idle_timeout_seconds: i64,

    /// Ready instances kept warm past the idle timeout. 0 scales the pool to zero.
    #[serde(default)]
    #[schemars(range(min = 0, max = 1000))]
    pub min_idle: i32,

    /// Most instances of this pool that may exist at once, in any phase. 0 pauses
    /// provisioning; jobs then wait.
    #[serde(default = "default_max_instances")]
    #[schemars(range(min = 0, max = 1000))]
    pub max_instances: i32,

    /// Cap in USD per hour on the summed price of the pool's instances, as a decimal string
    /// such as "5.00". No new instance is rented that would exceed it. Unset: no cap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16), pattern(MONEY_PATTERN))]
    pub max_hourly_spend: Option<Money>,

    /// Seconds an instance has to become Ready (provider running and worker healthy);
    /// after that it is destroyed and replaced. Between 1 and 86400.
    #[serde(default = "default_provision_timeout")]
    #[schemars(range(min = 1, max = MAX_TIMEOUT_SECONDS))]
    pub provision_timeout_seconds: i64,

    /// Providers tried in order for each new instance: the first with capacity wins.
    /// Names must be unique within the pool.
    #[schemars(length(min = 1, max = 16))]
    #[x_kube(validation = Rule::new("self.all(p, self.exists_one(q, q.name == p.name))").message("provider names must be unique").reason(Reason::FieldValueDuplicate))]
    pub providers: Vec<ProviderSpec>,

    /// The worker every rented machine runs. Required unless every provider is RunPod
    /// Serverless (whose endpoint defines its own worker).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<WorkerSpec>,
}

fn default_idle_timeout() -> i64 {
    DEFAULT_IDLE_TIMEOUT_SECONDS
}
fn default_max_instances() -> i32 {
    DEFAULT_MAX_INSTANCES
}
fn default_provision_timeout() -> i64 {
    DEFAULT_PROVISION_TIMEOUT_SECONDS
}

/// One provider entry: a name and exactly one of `vast`, `runpod`, `runpodServerless`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("[has(self.vast), has(self.runpod), has(self.runpodServerless)].filter(x, x).size() == 1").message("exactly one of vast, runpod or runpodServerless must be set"))]
#[x_kube(validation = Rule::new("self.capacityType != 'Interruptible' || has(self.vast)").message("capacityType Interruptible is offered for vast entries only: RunPod's REST v2 API rents no interruptible pods, and a serverless endpoint runs its own workers").field_path(".capacityType"))]
#[x_kube(validation = Rule::new("!has(self.vast) || (self.capacityType == 'Interruptible') == has(self.vast.bidPerHour)").message("vast.bidPerHour is required with capacityType Interruptible and only allowed with it").field_path(".vast.bidPerHour"))]
pub struct ProviderSpec {
    /// Name of this entry, unique in the pool; VideoJobs and GpuInstances refer to it.
    #[schemars(length(min = 1, max = 63), pattern(DNS_LABEL_PATTERN))]
    pub name: String,

    /// OnDemand (default): machines rented at the listed price, kept until gpupool destroys
    /// them. Interruptible: Vast.ai machines rented with a bid (`vast.bidPerHour`), far
    /// cheaper, which the provider may stop when outbid; gpupool then destroys the machine
    /// and runs its job again elsewhere without spending one of the job's maxRetries. List an
    /// interruptible entry first and an on-demand one after it for "spot, then on-demand".
    #[serde(default)]
    pub capacity_type: CapacityType,

    /// Rent machines on the Vast.ai marketplace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vast: Option<VastProvider>,

    /// Rent on-demand pods on RunPod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runpod: Option<RunpodProvider>,

    /// Send jobs to an existing RunPod Serverless endpoint instead of renting machines.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runpod_serverless: Option<RunpodServerlessProvider>,
}

/// Whether an entry rents machines that stay or machines the provider may take back.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, Hash)]
pub enum CapacityType {
    #[default]
    OnDemand,
    Interruptible,
}

/// Which kind of provider an entry is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProviderKind {
    Vast,
    Runpod,
    RunpodServerless,
}

impl ProviderSpec {
    /// The kind of this entry; `None` only for an entry the API server would have refused.
    pub fn kind(&self) -> Option<ProviderKind> {
        match (&self.vast, &self.runpod, &self.runpod_serverless) {
            (Some(_), None, None) => Some(ProviderKind::Vast),
            (None, Some(_), None) => Some(ProviderKind::Runpod),
            (None, None, Some(_)) => Some(ProviderKind::RunpodServerless),
            _ => None,
        }
    }

    /// The Secret holding this provider's API key.
    pub fn credentials(&self) -> Option<&SecretKeyRef> {
        if let Some(v) = &self.vast {
            return Some(&v.credentials_secret_ref);
        }
        if let Some(r) = &self.runpod {
            return Some(&r.credentials_secret_ref);
        }
        self.runpod_serverless
            .as_ref()
            .map(|s| &s.credentials_secret_ref)
    }
}

/// Vast.ai marketplace offers to rent from.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VastProvider {
    /// GPU models accepted, as Vast.ai names them (for example "RTX 3060", "RTX 4090").
    #[schemars(length(min = 1, max = 32), inner(length(min = 1, max = 64)))]
    pub gpu_names: Vec<String>,

    /// Highest total price per hour accepted for an offer, in USD, as a decimal string
    /// greater than zero (for example "0.25").
    #[schemars(length(max = 16), pattern(MONEY_PATTERN))]
    #[x_kube(validation = Rule::new("self.matches('[1-9]')").message("must be greater than zero"))]
    pub max_price_per_hour: String,

    /// Lowest host reliability accepted, between 0 and 1.
    #[serde(default = "default_min_reliability")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub min_reliability: f64,

    /// GPUs per machine.
    #[serde(default = "default_one")]
    #[schemars(range(min = 1, max = 16))]
    pub num_gpus: i32,

    /// Only offers located in these countries (two-letter codes such as "US"). Empty: any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(pattern(r"^[A-Z]{2}$")))]
    pub countries: Vec<String>,

    /// With capacityType Interruptible: the bid, in USD per hour for the whole machine
    /// (Vast.ai's `price`, between 0.001 and 128). Offers whose minimum bid is higher are
    /// skipped; the machine bills at this price while it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16), pattern(MONEY_PATTERN))]
    #[x_kube(validation = Rule::new("self.matches('[1-9]') && double(self) <= 128.0").message("must be greater than zero and at most 128"))]
    pub bid_per_hour: Option<Money>,

    /// Secret key holding the Vast.ai API key.
    pub credentials_secret_ref: SecretKeyRef,
}

fn default_min_reliability() -> f64 {
    0.95
}
fn default_one() -> i32 {
    1
}

/// Where RunPod pods are rented.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum CloudType {
    /// Community cloud: cheaper hosts run by third parties.
    Community,
    /// Secure cloud: RunPod's own data centres.
    Secure,
    /// Either, whichever has capacity.
    #[default]
    All,
}

/// Which RunPod API an entry is served through.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum RunpodApi {
    /// RunPod's REST API v2 (`https://api.runpod.io/v2`), the current API.
    #[default]
    RestV2,
    /// RunPod's GraphQL API. Deprecated: RunPod retires it in early 2027.
    GraphQL,
}

/// When RunPod retires its GraphQL API, in RunPod's own words.
pub const RUNPOD_GRAPHQL_RETIREMENT: &str = "early 2027";
/// Reason of the Warning event for a pool that names a deprecated provider API.
pub const DEPRECATED_API_REASON: &str = "DeprecatedApi";

/// How the operator reaches the worker on a RunPod pod.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum RunpodWorkerAccess {
    /// A public IP and TCP port mapped to the worker port: no time limit per request.
    #[default]
    PublicTcp,
    /// RunPod's HTTPS proxy (`https://{podId}-{port}.proxy.runpod.net`), which cuts every
    /// request at 100 s: only for short jobs.
    Proxy,
}

/// On-demand RunPod pods to rent.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RunpodProvider {
    /// RunPod GPU type ids accepted, in order of preference (for example
    /// "NVIDIA GeForce RTX 3060").
    #[schemars(length(min = 1, max = 32), inner(length(min = 1, max = 128)))]
    pub gpu_type_ids: Vec<String>,

    /// COMMUNITY, SECURE or ALL (default). REST v2 has no ALL: there each GPU type is
    /// offered once per cloud that lists it, at that cloud's price (SECURE first at equal
    /// prices); through GraphQL RunPod picks the cloud and the higher price is assumed.
    #[serde(default)]
    pub cloud_type: CloudType,

    /// Highest price per hour accepted, in USD, as a decimal string greater than zero.
    #[schemars(length(max = 16), pattern(MONEY_PATTERN))]
    #[x_kube(validation = Rule::new("self.matches('[1-9]')").message("must be greater than zero"))]
    pub max_price_per_hour: String,

    /// GPUs per pod.
    #[serde(default = "default_one")]
    #[schemars(range(min = 1, max = 16))]
    pub gpu_count: i32,

    /// How the operator reaches the worker: PublicTcp (default) or Proxy.
    #[serde(default)]
    pub worker_access: RunpodWorkerAccess,

    /// Only these RunPod data centres (for example "EU-RO-1"). Empty: any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(min = 1, max = 64)))]
    pub data_center_ids: Vec<String>,

    /// RunPod API the pods are rented through: RestV2 (default) or GraphQL. GraphQL is
    /// deprecated: RunPod retires it in early 2027.
    #[serde(default)]
    pub api: RunpodApi,

    /// Secret key holding the RunPod API key.
    pub credentials_secret_ref: SecretKeyRef,
}

/// An existing RunPod Serverless endpoint that runs jobs itself.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RunpodServerlessProvider {
    /// The endpoint id, as in `https://api.runpod.ai/v2/{endpointId}/run`.
    #[schemars(length(min = 1, max = 64), pattern(r"^[a-zA-Z0-9]+$"))]
    pub endpoint_id: String,

    /// Keep the endpoint's idleTimeout, workersMin and workersMax equal to the pool's
    /// idleTimeoutSeconds, minIdle and maxInstances.
    #[serde(default = "default_true")]
    pub manage_endpoint_settings: bool,

    /// RunPod API the endpoint's settings are read and changed through: RestV2 (default) or
    /// GraphQL. Jobs always go to the Serverless jobs API. GraphQL is deprecated: RunPod
    /// retires it in early 2027.
    #[serde(default)]
    pub api: RunpodApi,

    /// Secret key holding the RunPod API key.
    pub credentials_secret_ref: SecretKeyRef,
}

fn default_true() -> bool {
    true
}

impl GpuPool {
    /// One line per provider entry that names a deprecated API (RunPod GraphQL), for the
    /// pool's `DeprecatedApi` warning event; empty when there is nothing to warn about.
    pub fn deprecated_apis(&self) -> Vec<String> {
        self.spec
            .providers
            .iter()
            .filter_map(|p| {
                let what = match (&p.runpod, &p.runpod_serverless) {
                    (Some(r), _) if r.api == RunpodApi::GraphQL => "RunPod pods",
                    (_, Some(s)) if s.api == RunpodApi::GraphQL => "RunPod Serverless settings",
                    _ => return None,
                };
                Some(format!(
                    "provider {} uses the RunPod GraphQL API for {what}, which is deprecated \
                     and which RunPod retires in {RUNPOD_GRAPHQL_RETIREMENT}: set api: RestV2 \
                     (the default) or remove the field",
                    p.name
                ))
            })
            .collect()
    }
}

/// What runs on each rented machine: a container serving the worker HTTP API.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WorkerSpec {
    /// Container image of the worker.
    #[schemars(length(min = 1, max = 512))]
    pub image: String,

    /// TCP port the worker listens on inside the container.
    #[serde(default = "default_worker_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,

    /// Path answered with 2xx once the worker can take jobs.
    #[serde(default = "default_health_path")]
    #[schemars(length(min = 1, max = 256), pattern(r"^/[-a-zA-Z0-9._~/]*$"))]
    pub health_path: String,

    /// Container disk in GB.
    #[serde(default = "default_disk")]
    #[schemars(range(min = 1, max = 4096))]
    pub container_disk_gb: i32,

    /// Environment variables for the worker container. A secret of the worker's own (storage
    /// credentials, a token) goes in valueFrom.secretKeyRef, never in value; the API key
    /// comes from apiKeySecretRef, and the session token, port and health path are added by
    /// the operator.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub env: Vec<EnvVar>,

    /// Secret key holding the API key the worker expects in the X-API-Key header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_secret_ref: Option<SecretKeyRef>,
}

fn default_worker_port() -> i32 {
    8000
}
fn default_health_path() -> String {
    "/health".into()
}
fn default_disk() -> i32 {
    10
}

/// One environment variable of the worker container: a literal `value`, or `valueFrom` a
/// Secret key in the pool's namespace (for the worker's own secrets: storage credentials,
/// tokens), never both.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.valueFrom) || self.value == ''").message("value and valueFrom are mutually exclusive: set value, or valueFrom.secretKeyRef, not both").field_path(".valueFrom"))]
pub struct EnvVar {
    /// Variable name: letters, digits and underscores, not starting with a digit. The
    /// operator's own variables (GPUPOOL_SESSION_TOKEN, GPUPOOL_API_KEY, GPUPOOL_WORKER_PORT,
    /// GPUPOOL_WORKER_HEALTH_PATH) replace an entry of the same name.
    #[schemars(length(min = 1, max = 128), pattern(r"^[A-Za-z_][A-Za-z0-9_]*$"))]
    pub name: String,
    /// Value of the variable. Leave it out (or empty) when valueFrom is set.
    #[serde(default)]
    #[schemars(length(max = 4096))]
    pub value: String,
    /// Where the value comes from instead: a key of a Secret in the pool's namespace, read
    /// when each machine is rented and given only to the provider's create call. A Secret or
    /// key that is missing (or empty) makes the pool's machine-renting providers unavailable
    /// until it exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_from: Option<EnvVarSource>,
}

impl EnvVar {
    /// The Secret key this variable's value comes from, if any.
    pub fn secret_key_ref(&self) -> Option<&SecretKeyRef> {
        self.value_from.as_ref().map(|f| &f.secret_key_ref)
    }
}

/// The source of an environment variable's value.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct EnvVarSource {
    /// A key of a Secret in the pool's namespace. Its value is used with surrounding
    /// whitespace trimmed; it must be UTF-8 text and not empty.
    pub secret_key_ref: SecretKeyRef,
}

/// Observed state of a pool, written by the operator.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GpuPoolStatus {
    /// The metadata.generation this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Instances of the pool by phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instances: Option<InstanceCounts>,

    /// Summed price per hour of the pool's instances that are billing, in USD.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spend_per_hour: Option<Money>,

    /// VideoJobs of the pool waiting for an instance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_jobs: Option<i32>,

    /// Health of each provider entry, including capacity back-off.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub providers: Vec<ProviderStatus>,

    /// Ready, ProvidersAvailable, SpendLimited and similar conditions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
}

/// Instances of a pool, counted by phase.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct InstanceCounts {
    /// All instances of the pool.
    pub total: i32,
    /// Instances waiting to be rented.
    pub pending: i32,
    /// Instances rented and starting.
    pub provisioning: i32,
    /// Ready instances (busy or idle).
    pub ready: i32,
    /// Ready instances running a job.
    pub busy: i32,
    /// Instances being destroyed.
    pub terminating: i32,
    /// Instances that failed.
    pub failed: i32,
}

/// State of one provider entry of a pool.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ProviderStatus {
    /// Name of the provider entry.
    pub name: String,
    /// Available, BackingOff or Unavailable.
    pub state: ProviderState,
    /// While BackingOff, the time before which the provider is not asked again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff_until: Option<Time>,
    /// Failures in a row; resets on success.
    #[serde(default)]
    pub consecutive_failures: i32,
    /// Last error reported by the provider, without credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Whether new instances may be asked of a provider now.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProviderState {
    /// Asked for new instances.
    Available,
    /// Skipped until backoffUntil after reporting no capacity or failing repeatedly.
    BackingOff,
    /// Cannot be used until its configuration is fixed (for example a missing Secret).
    Unavailable,
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn pool(providers: serde_json::Value) -> GpuPool {
        serde_json::from_value(json!({
            "apiVersion": "gpupool.dev/v1alpha1", "kind": "GpuPool",
            "metadata": {"name": "p", "namespace": "media"},
            "spec": {"providers": providers, "worker": {"image": "w:1"}}
        }))
        .expect("pool")
    }

    #[test]
    fn runpod_entries_default_to_rest_v2_and_graphql_is_reported_as_deprecated() {
        let secret = json!({"name": "runpod", "key": "apiKey"});
        let p = pool(json!([
            {"name": "pods", "runpod": {"gpuTypeIds": ["g"], "maxPricePerHour": "1",
                                        "credentialsSecretRef": secret}},
            {"name": "sls", "runpodServerless": {"endpointId": "abc", "credentialsSecretRef": secret}},
        ]));
        let entries = &p.spec.providers;
        assert_eq!(
            entries[0].runpod.as_ref().map(|r| r.api),
            Some(RunpodApi::RestV2)
        );
        assert_eq!(
            entries[1].runpod_serverless.as_ref().map(|s| s.api),
            Some(RunpodApi::RestV2)
        );
        assert!(p.deprecated_apis().is_empty());

        let p = pool(json!([
            {"name": "old-pods", "runpod": {"gpuTypeIds": ["g"], "maxPricePerHour": "1",
                                            "api": "GraphQL", "credentialsSecretRef": secret}},
            {"name": "new-sls", "runpodServerless": {"endpointId": "abc", "api": "RestV2",
                                                     "credentialsSecretRef": secret}},
            {"name": "old-sls", "runpodServerless": {"endpointId": "abc", "api": "GraphQL",
                                                     "credentialsSecretRef": secret}},
        ]));
        let warnings = p.deprecated_apis();
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(
            warnings[0].starts_with("provider old-pods "),
            "{}",
            warnings[0]
        );
        assert!(
            warnings[1].starts_with("provider old-sls "),
            "{}",
            warnings[1]
        );
        assert!(warnings.iter().all(|w| w.contains("early 2027")));
    }
}
