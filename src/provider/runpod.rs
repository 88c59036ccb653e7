//! RunPod pods client ([`RunpodClient`]) over RunPod's GraphQL API, deprecated (RunPod retires
//! it in early 2027; REST v2 is [`super::runpod_v2`], the default), as the official SDK and
//! `runpodctl` use it (`providers.md` §2.2-2.7): GPU type prices, `podFindAndDeployOnDemand`,
//! `pod`, `myself { pods }`, `podTerminate`. Also the GraphQL transport that the Serverless
//! client reuses for endpoint settings.
//!
//! RunPod-specific decisions:
//! * every user value travels as a GraphQL **variable**, never spliced into the query text;
//! * resolver errors come back as HTTP 200 with `errors[0].message`; the known messages are
//!   mapped to [`ProviderError`] variants ([`graphql_error`]); HTTP 401 is the bad-key signal;
//! * RunPod prices GPU types, not machines: an offer is a GPU type of the entry, priced
//!   `per-GPU price × gpuCount`. With `cloudType: ALL` RunPod may place the pod in either cloud,
//!   so the offer carries the higher of the two clouds' prices: the price cap holds wherever the
//!   pod lands;
//! * `dataCenterId` is singular in GraphQL: with several configured data centres, create
//!   tries them in order, moving on only when one answers "no capacity" (a refusal, so
//!   nothing was rented);
//! * the pod `name` is the gpupool label, which is how create is made idempotent by the caller.

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
};

use async_trait::async_trait;
use reqwest::{Method, StatusCode};
use rust_decimal::Decimal;
use serde::{Deserialize, de::DeserializeOwned};
use serde_json::{Value, json};
use tracing::{debug, warn};
use url::Url;

use super::{
    CreateRequest, Credentials, InstanceProvider, Offer, ProviderError, ProviderKind,
    ProviderResult, RemoteInstance, RemoteState,
    http::{
        ApiClient, Call, DEFAULT_RUNPOD_GRAPHQL_BASE_URL, DEFAULT_RUNPOD_PROXY_TEMPLATE,
        HttpConfig, Idempotency, RawResponse, Redactor, WorkerShape, join_segments, lenient, money,
        parse_base_url, parse_price, status_error,
    },
    quota::destroy_lane,
};
use crate::crd::{CloudType, RunpodProvider, pool::RunpodWorkerAccess};

/// Longest GraphQL error message quoted, in characters.
const GRAPHQL_MESSAGE_CHARS: usize = 300;

/// The fields read of every pod, for `pod` and `myself { pods }`.
const POD_FIELDS: &str = "id name desiredStatus imageName costPerHr gpuCount lastStatusChange \
     machine { gpuDisplayName location } \
     runtime { uptimeInSeconds ports { ip isIpPublic privatePort publicPort type } }";

/// Where and how to reach RunPod.
#[derive(Clone, Debug)]
pub struct RunpodOptions {
    /// GraphQL host, as runpod-python's `RUNPOD_API_BASE_URL`; `/graphql` is appended unless
    /// the URL already ends with it.
    pub graphql_base_url: String,
    /// URL of a pod's `/http` port behind RunPod's proxy; `{podId}` and `{port}` are replaced.
    pub proxy_url_template: String,
    pub http: HttpConfig,
}

impl Default for RunpodOptions {
    fn default() -> Self {
        Self {
            graphql_base_url: DEFAULT_RUNPOD_GRAPHQL_BASE_URL.into(),
            proxy_url_template: DEFAULT_RUNPOD_PROXY_TEMPLATE.into(),
            http: HttpConfig::runpod(),
        }
    }
}

/// One `runpod` provider entry of a pool.
#[derive(Debug)]
pub struct RunpodClient {
    api: ApiClient,
    graphql: Url,
    proxy_template: ProxyTemplate,
    gpu_type_ids: Vec<String>,
    cloud: CloudType,
    max_price: Decimal,
    gpu_count: u32,
    access: RunpodWorkerAccess,
    data_centers: Vec<String>,
    worker: WorkerShape,
}

impl RunpodClient {
    pub fn new(
        entry: &RunpodProvider,
        worker: WorkerShape,
        credentials: Credentials,
        options: RunpodOptions,
    ) -> ProviderResult<Self> {
        let graphql = graphql_url(&options.graphql_base_url)?;
        let proxy_template = ProxyTemplate::parse(&options.proxy_url_template)?;
        let max_price = parse_price("runpod maxPricePerHour", &entry.max_price_per_hour)?;
        let gpu_count = u32::try_from(entry.gpu_count)
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| {
                ProviderError::Permanent(format!("invalid gpuCount {}", entry.gpu_count))
            })?;
        if entry.gpu_type_ids.is_empty() {
            return Err(ProviderError::Permanent(
                "runpod gpuTypeIds is empty".into(),
            ));
        }
        Ok(Self {
            api: ApiClient::new("runpod", credentials, options.http)?,
            graphql,
            proxy_template,
            gpu_type_ids: entry.gpu_type_ids.clone(),
            cloud: entry.cloud_type,
            max_price,
            gpu_count,
            access: entry.worker_access,
            data_centers: entry.data_center_ids.clone(),
            worker,
        })
    }

    async fn query<T: DeserializeOwned>(
        &self,
        op: &'static str,
        query: &str,
        variables: Value,
        idempotency: Idempotency,
    ) -> ProviderResult<T> {
        graphql(
            &self.api,
            &self.graphql,
            op,
            query,
            variables,
            idempotency,
            &[],
        )
        .await
    }

    /// The offer for one GPU type, if RunPod lists it in the entry's cloud under the cap.
    async fn gpu_type_offer(&self, gpu_type_id: &str) -> ProviderResult<Option<Offer>> {
        const QUERY: &str = "query GpuTypeOffer($gpuTypesInput: GpuTypeFilter, \
            $lowestPriceInput: GpuLowestPriceInput) { \
            gpuTypes(input: $gpuTypesInput) { id displayName memoryInGb secureCloud \
            communityCloud securePrice communityPrice \
            lowestPrice(input: $lowestPriceInput) { uninterruptablePrice } } }";
        let mut lowest = json!({"gpuCount": self.gpu_count});
        match self.cloud {
            CloudType::Secure => lowest["secureCloud"] = json!(true),
            CloudType::Community => lowest["secureCloud"] = json!(false),
            CloudType::All => {}
        }
        let variables = json!({
            "gpuTypesInput": {"id": gpu_type_id},
            "lowestPriceInput": lowest,
        });
        let data: GpuTypesData = self
            .query(
                "runpod.gpu_types",
                QUERY,
                variables,
                Idempotency::Idempotent,
            )
            .await?;
        // Only the requested type: a server that ignored the filter must not get another
        // GPU's price booked under this id.
        let Some(dto) = data
            .gpu_types
            .iter()
            .find(|g| g.id.as_deref() == Some(gpu_type_id))
        else {
            warn!(gpu_type_id, "RunPod does not list this GPU type");
            return Ok(None);
        };
        Ok(self.offer_from(gpu_type_id, dto))
    }

    fn offer_from(&self, gpu_type_id: &str, dto: &GpuTypeDto) -> Option<Offer> {
        let per_gpu = per_gpu_price(dto, self.cloud)?;
        // Checked: a price near Decimal::MAX times the GPU count would overflow (and panic).
        let price = money(per_gpu)?.checked_mul(Decimal::from(self.gpu_count))?;
        if price > self.max_price {
            debug!(gpu_type_id, %price, "RunPod GPU type over the price cap");
            return None;
        }
        Some(Offer {
            id: gpu_type_id.to_string(),
            gpu_name: dto
                .display_name
                .clone()
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| gpu_type_id.to_string()),
            num_gpus: self.gpu_count,
            price_per_hour: price.normalize(),
            region: None,
            reliability: None,
        })
    }

    fn deploy_input(&self, gpu_type_id: &str, req: &CreateRequest, dc: Option<&str>) -> Value {
        let (ports, public_ip) = match self.access {
            RunpodWorkerAccess::PublicTcp => (format!("{}/tcp", req.port), true),
            RunpodWorkerAccess::Proxy => (format!("{}/http", req.port), false),
        };
        let env: Vec<Value> = req
            .env
            .iter()
            .map(|(k, v)| json!({"key": k, "value": v}))
            .collect();
        let mut input = json!({
            "name": req.label,
            "imageName": req.image,
            "gpuTypeId": gpu_type_id,
            "gpuCount": self.gpu_count,
            "cloudType": cloud_type_name(self.cloud),
            "containerDiskInGb": req.disk_gb,
            "volumeInGb": 0,
            "ports": ports,
            "supportPublicIp": public_ip,
            "env": env,
        });
        if let Some(dc) = dc {
            input["dataCenterId"] = json!(dc);
        }
        input
    }

    fn to_remote(&self, dto: &PodDto) -> Option<RemoteInstance> {
        let id = dto.id.clone().filter(|i| !i.is_empty())?;
        let endpoint = self.endpoint(&id, dto);
        Some(RemoteInstance {
            label: dto.name.clone().filter(|n| !n.is_empty()),
            state: pod_state(dto),
            endpoint,
            gpu_name: dto
                .machine
                .as_ref()
                .and_then(|m| m.gpu_display_name.clone()),
            num_gpus: dto.gpu_count.and_then(|n| u32::try_from(n).ok()),
            price_per_hour: dto.cost_per_hr.and_then(money),
            region: dto
                .machine
                .as_ref()
                .and_then(|m| m.location.clone())
                .filter(|l| !l.is_empty()),
            started_at: None,
            id,
        })
    }

    /// The worker's base URL once the container runs: the public TCP mapping of the worker
    /// port, or the proxy URL.
    fn endpoint(&self, pod_id: &str, dto: &PodDto) -> Option<String> {
        let runtime = dto.runtime.as_ref()?;
        let port = self.worker.port;
        match self.access {
            RunpodWorkerAccess::Proxy => Some(self.proxy_template.render(pod_id, port)),
            RunpodWorkerAccess::PublicTcp => runtime
                .ports
                .iter()
                .find(|p| {
                    p.kind.as_deref().map(str::to_ascii_lowercase).as_deref() == Some("tcp")
                        && p.private_port == Some(u64::from(port))
                        && p.is_ip_public == Some(true)
                })
                .and_then(|p| {
                    // An address, not any text: it becomes the worker's URL.
                    let ip: IpAddr = p.ip.as_deref()?.trim().parse().ok()?;
                    let public = u16::try_from(p.public_port?).ok().filter(|p| *p > 0)?;
                    Some(format!("http://{}", SocketAddr::new(ip, public)))
                }),
        }
    }
}

#[async_trait]
impl InstanceProvider for RunpodClient {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Runpod
    }

    async fn offers(&self) -> ProviderResult<Vec<Offer>> {
        let mut offers = Vec::new();
        for gpu_type_id in &self.gpu_type_ids {
            if let Some(offer) = self.gpu_type_offer(gpu_type_id).await? {
                offers.push(offer);
            }
        }
        // Stable: the entry's order breaks ties between equal prices.
        offers.sort_by_key(|o| o.price_per_hour);
        Ok(offers)
    }

    async fn create(&self, offer: &Offer, req: &CreateRequest) -> ProviderResult<RemoteInstance> {
        const MUTATION: &str = "mutation DeployPod($input: PodFindAndDeployOnDemandInput!) { \
            podFindAndDeployOnDemand(input: $input) { id name desiredStatus imageName \
            costPerHr gpuCount machine { gpuDisplayName location } } }";
        let centres: Vec<Option<&str>> = if self.data_centers.is_empty() {
            vec![None]
        } else {
            self.data_centers.iter().map(|d| Some(d.as_str())).collect()
        };
        let mut last = None;
        let secrets = req.secrets();
        for dc in centres {
            let variables = json!({"input": self.deploy_input(&offer.id, req, dc)});
            // The input carries the worker's secrets: redacted from any error quoting it.
            let result: ProviderResult<DeployData> = graphql(
                &self.api,
                &self.graphql,
                "runpod.deploy_pod",
                MUTATION,
                variables,
                Idempotency::NotIdempotent,
                &secrets,
            )
            .await;
            match result {
                Ok(data) => {
                    let Some(pod) = data.pod else {
                        // No error and no pod: the pod may exist; the caller adopts by label.
                        return Err(ProviderError::Transient(
                            "runpod.deploy_pod: empty response".into(),
                        ));
                    };
                    let mut remote = self.to_remote(&pod).ok_or_else(|| {
                        ProviderError::Transient("runpod.deploy_pod: pod without id".into())
                    })?;
                    remote.label = Some(req.label.clone());
                    remote.state = match remote.state {
                        RemoteState::Running | RemoteState::Starting => RemoteState::Starting,
                        other => other,
                    };
                    remote.gpu_name = remote.gpu_name.or_else(|| Some(offer.gpu_name.clone()));
                    remote.num_gpus = remote.num_gpus.or(Some(offer.num_gpus));
                    remote.price_per_hour = remote.price_per_hour.or(Some(offer.price_per_hour));
                    remote.region = remote.region.or_else(|| dc.map(str::to_string));
                    return Ok(remote);
                }
                Err(ProviderError::InsufficientCapacity(msg)) => {
                    debug!(data_center = dc, "RunPod: no capacity, trying the next");
                    last = Some(ProviderError::InsufficientCapacity(msg));
                }
                // "GPU type not found" and the like: the entry is wrong, not the pod gone.
                Err(ProviderError::NotFound(msg)) => return Err(ProviderError::Permanent(msg)),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| {
            ProviderError::InsufficientCapacity("runpod.deploy_pod: no data centre".into())
        }))
    }

    async fn get(&self, id: &str) -> ProviderResult<RemoteInstance> {
        let query = format!(
            "query Pod($podId: String!) {{ pod(input: {{podId: $podId}}) {{ {POD_FIELDS} }} }}"
        );
        let data: PodData = self
            .query(
                "runpod.pod",
                &query,
                json!({"podId": id}),
                Idempotency::Idempotent,
            )
            .await?;
        data.pod
            .as_ref()
            .and_then(|p| self.to_remote(p))
            .ok_or_else(|| ProviderError::NotFound(format!("runpod pod {id}")))
    }

    async fn delete(&self, id: &str) -> ProviderResult<()> {
        const MUTATION: &str =
            "mutation TerminatePod($podId: String!) { podTerminate(input: {podId: $podId}) }";
        // podTerminate returns a scalar (null): only errors matter. The pod bills until this
        // call is made: it goes before any other.
        let result: ProviderResult<Value> = destroy_lane(self.query(
            "runpod.terminate_pod",
            MUTATION,
            json!({"podId": id}),
            Idempotency::Idempotent,
        ))
        .await;
        match result {
            Ok(_) | Err(ProviderError::NotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn list_labeled(&self, prefix: &str) -> ProviderResult<Vec<RemoteInstance>> {
        let query = format!("query Pods {{ myself {{ pods {{ {POD_FIELDS} }} }} }}");
        let data: MyselfPodsData = self
            .query("runpod.pods", &query, json!({}), Idempotency::Idempotent)
            .await?;
        let myself = data.myself.ok_or_else(|| {
            ProviderError::Transient("runpod.pods: no account in the response".into())
        })?;
        Ok(myself
            .pods
            .iter()
            .filter(|p| p.name.as_deref().is_some_and(|n| n.starts_with(prefix)))
            .filter_map(|p| self.to_remote(p))
            .collect())
    }
}

/// `cloudType` as the GraphQL enum spells it.
fn cloud_type_name(cloud: CloudType) -> &'static str {
    match cloud {
        CloudType::All => "ALL",
        CloudType::Secure => "SECURE",
        CloudType::Community => "COMMUNITY",
    }
}

/// Per-GPU price in the entry's cloud(s): the listed price of each cloud that offers the type
/// (the higher one for ALL), falling back to `lowestPrice` when no cloud price is listed.
/// `None` when no allowed cloud offers the type or nothing gives a price.
fn per_gpu_price(dto: &GpuTypeDto, cloud: CloudType) -> Option<f64> {
    let positive = |p: Option<f64>| p.filter(|p| *p > 0.0);
    let secure = (dto.secure_cloud != Some(false)).then(|| positive(dto.secure_price));
    let community = (dto.community_cloud != Some(false)).then(|| positive(dto.community_price));
    let allowed: Vec<Option<f64>> = match cloud {
        CloudType::Secure => vec![secure],
        CloudType::Community => vec![community],
        CloudType::All => vec![secure, community],
    }
    .into_iter()
    .flatten()
    .collect();
    if allowed.is_empty() {
        return None;
    }
    let listed = allowed.iter().flatten().copied().reduce(f64::max);
    listed.or_else(|| positive(dto.lowest_price.as_ref()?.uninterruptable_price))
}

/// `desiredStatus` and `runtime` to a coarse state: RunPod's own readiness rule is
/// `RUNNING` with a runtime.
fn pod_state(dto: &PodDto) -> RemoteState {
    let status = dto
        .desired_status
        .as_deref()
        .map(|s| s.trim().to_ascii_uppercase())
        .unwrap_or_default();
    let detail = || {
        let mut m = status.clone();
        if let Some(change) = dto
            .last_status_change
            .as_deref()
            .map(str::trim)
            .filter(|c| !c.is_empty())
        {
            m.push_str(": ");
            m.extend(change.chars().take(200));
        }
        m
    };
    match status.as_str() {
        "RUNNING" if dto.runtime.is_some() => RemoteState::Running,
        "RUNNING" | "CREATED" | "RESTARTING" | "PROVISIONING" | "STARTING" => RemoteState::Starting,
        "EXITED" | "PAUSED" | "DEAD" | "ERROR" => RemoteState::Stopped(detail()),
        "TERMINATED" => RemoteState::Terminated,
        // Unknown or missing: not ready; the provision timeout bounds how long.
        _ => RemoteState::Starting,
    }
}

/// `{base}/graphql`, unless the base already names the GraphQL path.
pub(crate) fn graphql_url(base: &str) -> ProviderResult<Url> {
    let url = parse_base_url("RunPod GraphQL", base)?;
    if url.path().trim_end_matches('/').ends_with("/graphql") {
        return Ok(url);
    }
    join_segments(&url, &["graphql"])
}

/// Posts one GraphQL document with its variables and decodes `data` as `T`.
pub(crate) async fn graphql<T: DeserializeOwned>(
    api: &ApiClient,
    url: &Url,
    op: &'static str,
    query: &str,
    variables: Value,
    idempotency: Idempotency,
    secrets: &[Credentials],
) -> ProviderResult<T> {
    let body = json!({"query": query, "variables": variables});
    let call = Call {
        op,
        method: Method::POST,
        url: url.clone(),
        body: Some(&body),
        idempotency,
    };
    api.execute_with_secrets(&call, secrets, |raw, r| classify_graphql(op, raw, r))
        .await
}

/// HTTP status first (401 is the bad key, 429 the rate limit, 5xx transient), then
/// `errors[0]`, then `data`.
pub(crate) fn classify_graphql<T: DeserializeOwned>(
    op: &str,
    raw: &RawResponse,
    redactor: &Redactor,
) -> ProviderResult<T> {
    let status = raw.status;
    if matches!(
        status,
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN | StatusCode::TOO_MANY_REQUESTS
    ) || status.is_server_error()
    {
        return Err(status_error(op, raw, redactor));
    }
    let envelope: Option<Envelope> = serde_json::from_slice(&raw.body).ok();
    if let Some(first) = envelope.as_ref().and_then(|e| e.errors.first()) {
        return Err(graphql_error(op, first, redactor));
    }
    if !status.is_success() {
        return Err(status_error(op, raw, redactor));
    }
    let data = envelope.and_then(|e| e.data).ok_or_else(|| {
        ProviderError::Transient(format!(
            "{op}: response without data: {}",
            redactor.excerpt(&raw.body)
        ))
    })?;
    serde_json::from_value(data).map_err(|e| {
        ProviderError::Transient(format!(
            "{op}: unexpected data: {}",
            redactor.excerpt(e.to_string().as_bytes())
        ))
    })
}

/// The meaning of a GraphQL resolver error, from its message (the only stable part).
fn graphql_error(op: &str, error: &GraphqlErrorDto, redactor: &Redactor) -> ProviderError {
    let message = error.message.clone().unwrap_or_default();
    let shown: String = redactor
        .redact(message.trim())
        .chars()
        .take(GRAPHQL_MESSAGE_CHARS)
        .collect();
    let lower = message.to_ascii_lowercase();
    let code = error
        .extensions
        .as_ref()
        .and_then(|x| x.get("code"))
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_ascii_uppercase();
    let msg = format!("{op}: {shown}");
    if lower.contains("no longer any instances available") || lower.contains("not enough free gpus")
    {
        ProviderError::InsufficientCapacity(msg)
    } else if lower.contains("something went wrong") {
        ProviderError::Transient(msg)
    } else if lower.contains("too many requests") || lower.contains("rate limit") {
        ProviderError::RateLimited { retry_after: None }
    } else if code == "UNAUTHENTICATED" || code == "FORBIDDEN" || lower.starts_with("unauthorized")
    {
        ProviderError::Unauthorized(msg)
    } else if lower.contains("not found") || lower.contains("does not exist") {
        ProviderError::NotFound(msg)
    } else {
        ProviderError::Permanent(msg)
    }
}

/// A URL template with `{podId}` and `{port}`, checked once.
#[derive(Clone)]
pub(crate) struct ProxyTemplate(String);

impl fmt::Debug for ProxyTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl ProxyTemplate {
    pub(crate) fn parse(template: &str) -> ProviderResult<Self> {
        let t = Self(template.trim().to_string());
        if !t.0.contains("{podId}") {
            return Err(ProviderError::Permanent(
                "RunPod proxy URL template must contain {podId}".into(),
            ));
        }
        parse_base_url("RunPod proxy", &t.render("abc123", 8000))?;
        Ok(t)
    }

    pub(crate) fn render(&self, pod_id: &str, port: u16) -> String {
        // Pod ids are lowercase alphanumerics; anything else is not put into a host name.
        let safe: String = pod_id
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
            .collect();
        self.0
            .replace("{podId}", &safe)
            .replace("{port}", &port.to_string())
    }
}

// ---- wire DTOs (private) ----

#[derive(Deserialize, Debug, Default)]
#[serde(default)]
struct Envelope {
    data: Option<Value>,
    #[serde(deserialize_with = "lenient::vec_skip_bad")]
    errors: Vec<GraphqlErrorDto>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(default)]
pub(crate) struct GraphqlErrorDto {
    #[serde(deserialize_with = "lenient::opt_string")]
    message: Option<String>,
    #[serde(deserialize_with = "lenient::opt_value")]
    extensions: Option<Value>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(default, rename_all = "camelCase")]
struct GpuTypesData {
    #[serde(deserialize_with = "lenient::vec_skip_bad")]
    gpu_types: Vec<GpuTypeDto>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(default, rename_all = "camelCase")]
struct GpuTypeDto {
    #[serde(deserialize_with = "lenient::opt_string")]
    id: Option<String>,
    #[serde(deserialize_with = "lenient::opt_string")]
    display_name: Option<String>,
    #[serde(deserialize_with = "lenient::opt_bool")]
    secure_cloud: Option<bool>,
    #[serde(deserialize_with = "lenient::opt_bool")]
    community_cloud: Option<bool>,
    #[serde(deserialize_with = "lenient::opt_f64")]
    secure_price: Option<f64>,
    #[serde(deserialize_with = "lenient::opt_f64")]
    community_price: Option<f64>,
    #[serde(deserialize_with = "lenient::opt_obj")]
    lowest_price: Option<LowestPriceDto>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(default, rename_all = "camelCase")]
struct LowestPriceDto {
    #[serde(deserialize_with = "lenient::opt_f64")]
    uninterruptable_price: Option<f64>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(default)]
struct DeployData {
    #[serde(
        rename = "podFindAndDeployOnDemand",
        deserialize_with = "lenient::opt_obj"
    )]
    pod: Option<PodDto>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(default)]
struct PodData {
    #[serde(deserialize_with = "lenient::opt_obj")]
    pod: Option<PodDto>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(default)]
struct MyselfPodsData {
    #[serde(deserialize_with = "lenient::opt_obj")]
    myself: Option<MyselfPods>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(default)]
struct MyselfPods {
    #[serde(deserialize_with = "lenient::vec_skip_bad")]
    pods: Vec<PodDto>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(default, rename_all = "camelCase")]
struct PodDto {
    #[serde(deserialize_with = "lenient::opt_string")]
    id: Option<String>,
    #[serde(deserialize_with = "lenient::opt_string")]
    name: Option<String>,
    #[serde(deserialize_with = "lenient::opt_string")]
    desired_status: Option<String>,
    #[serde(deserialize_with = "lenient::opt_f64")]
    cost_per_hr: Option<f64>,
    #[serde(deserialize_with = "lenient::opt_u64")]
    gpu_count: Option<u64>,
    #[serde(deserialize_with = "lenient::opt_string")]
    last_status_change: Option<String>,
    #[serde(deserialize_with = "lenient::opt_obj")]
    machine: Option<MachineDto>,
    /// `null` until the container is up.
    #[serde(deserialize_with = "lenient::opt_obj")]
    runtime: Option<RuntimeDto>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(default, rename_all = "camelCase")]
struct MachineDto {
    #[serde(deserialize_with = "lenient::opt_string")]
    gpu_display_name: Option<String>,
    #[serde(deserialize_with = "lenient::opt_string")]
    location: Option<String>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(default, rename_all = "camelCase")]
struct RuntimeDto {
    #[serde(deserialize_with = "lenient::vec_skip_bad")]
    ports: Vec<RuntimePortDto>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(default, rename_all = "camelCase")]
struct RuntimePortDto {
    #[serde(deserialize_with = "lenient::opt_string")]
    ip: Option<String>,
    #[serde(deserialize_with = "lenient::opt_bool")]
    is_ip_public: Option<bool>,
    #[serde(deserialize_with = "lenient::opt_u64")]
    private_port: Option<u64>,
    #[serde(deserialize_with = "lenient::opt_u64")]
    public_port: Option<u64>,
    #[serde(rename = "type", deserialize_with = "lenient::opt_string")]
    kind: Option<String>,
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::crd::SecretKeyRef;

    macro_rules! fixture {
        ($name:literal) => {
            include_str!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/fixtures/providers/runpod/",
                $name
            ))
        };
    }

    fn client(access: RunpodWorkerAccess, cloud: CloudType, max: &str, port: u16) -> RunpodClient {
        let entry = RunpodProvider {
            gpu_type_ids: vec!["NVIDIA GeForce RTX 3090".into()],
            cloud_type: cloud,
            max_price_per_hour: max.into(),
            gpu_count: 2,
            worker_access: access,
            data_center_ids: vec![],
            api: crate::crd::RunpodApi::GraphQL,
            credentials_secret_ref: SecretKeyRef::new("s", "k"),
        };
        RunpodClient::new(
            &entry,
            WorkerShape { port, disk_gb: 20 },
            Credentials::new("rp-key"),
            RunpodOptions::default(),
        )
        .expect("client")
    }

    fn raw(status: u16, body: &str) -> RawResponse {
        RawResponse {
            status: StatusCode::from_u16(status).expect("status"),
            retry_after: None,
            body: Bytes::copy_from_slice(body.as_bytes()),
        }
    }

    fn decode<T: DeserializeOwned>(body: &str) -> ProviderResult<T> {
        classify_graphql("test", &raw(200, body), &Redactor::default())
    }

    #[test]
    fn published_gpu_type_prices_an_offer() {
        let data: GpuTypesData = decode(fixture!("gpu_types.by_id.200.json")).expect("data");
        let dto = &data.gpu_types[0];
        // Community only, no listed price: lowestPrice gives 0.30 per GPU, two GPUs.
        let c = client(RunpodWorkerAccess::PublicTcp, CloudType::All, "1", 8000);
        let offer = c.offer_from("NVIDIA GeForce RTX 3090", dto).expect("offer");
        assert_eq!(offer.price_per_hour.to_string(), "0.6");
        assert_eq!(offer.gpu_name, "RTX 3090");
        assert_eq!(offer.num_gpus, 2);
        assert!(
            client(RunpodWorkerAccess::PublicTcp, CloudType::Secure, "1", 8000)
                .offer_from("x", dto)
                .is_none(),
            "not in the secure cloud"
        );
        assert!(
            client(RunpodWorkerAccess::PublicTcp, CloudType::All, "0.59", 8000)
                .offer_from("x", dto)
                .is_none(),
            "over the cap"
        );

        let all: GpuTypesData = decode(fixture!("gpu_types.all.200.json")).expect("list");
        assert_eq!(all.gpu_types.len(), 3);
        assert_eq!(all.gpu_types[2].display_name.as_deref(), Some("RTX A6000"));
    }

    #[test]
    fn an_absurd_price_is_no_offer_not_an_overflow() {
        let c = client(RunpodWorkerAccess::PublicTcp, CloudType::All, "1", 8000);
        for price in [7.9e28, 4e28, 1e300] {
            let dto = GpuTypeDto {
                secure_price: Some(price),
                ..GpuTypeDto::default()
            };
            assert_eq!(c.offer_from("x", &dto), None, "{price}");
        }
    }

    #[test]
    fn all_clouds_price_is_the_higher_one() {
        let dto = GpuTypeDto {
            secure_price: Some(0.44),
            community_price: Some(0.22),
            ..GpuTypeDto::default()
        };
        assert_eq!(per_gpu_price(&dto, CloudType::All), Some(0.44));
        assert_eq!(per_gpu_price(&dto, CloudType::Community), Some(0.22));
        assert_eq!(per_gpu_price(&dto, CloudType::Secure), Some(0.44));
        let community_only = GpuTypeDto {
            secure_cloud: Some(false),
            ..dto
        };
        assert_eq!(per_gpu_price(&community_only, CloudType::All), Some(0.22));
        assert_eq!(per_gpu_price(&community_only, CloudType::Secure), None);
    }

    #[test]
    fn published_pod_examples_map() {
        let data: PodData = decode(fixture!("pod.200.json")).expect("pod");
        let pod = data.pod.expect("some pod");
        // The example pod has a runtime but no desiredStatus selected: not known running.
        let proxy = client(RunpodWorkerAccess::Proxy, CloudType::All, "1", 8888);
        let i = proxy.to_remote(&pod).expect("remote");
        assert_eq!(i.id, "YOUR_POD_ID");
        assert_eq!(i.label.as_deref(), Some("Runpod Pytorch"));
        assert_eq!(i.state, RemoteState::Starting);
        // Pod ids are alphanumeric; the placeholder's underscores are dropped from the host.
        assert_eq!(
            i.endpoint.as_deref(),
            Some("https://YOURPODID-8888.proxy.runpod.net")
        );
        // Its only port is an http port on a private IP: no public TCP endpoint.
        let tcp = client(RunpodWorkerAccess::PublicTcp, CloudType::All, "1", 8888);
        assert_eq!(tcp.to_remote(&pod).and_then(|i| i.endpoint), None);

        let list: MyselfPodsData = decode(fixture!("myself_pods.200.json")).expect("pods");
        let pods = list.myself.expect("myself").pods;
        assert_eq!(pods.len(), 1);
        assert_eq!(pods[0].id.as_deref(), Some("ldl1dxirsim64n"));
        let i = proxy.to_remote(&pods[0]).expect("remote");
        assert_eq!(
            i.endpoint.as_deref(),
            Some("https://ldl1dxirsim64n-8888.proxy.runpod.net")
        );

        let deployed: DeployData =
            decode(fixture!("pod_find_and_deploy_on_demand.200.json")).expect("deploy");
        assert_eq!(
            deployed.pod.and_then(|p| p.id).as_deref(),
            Some("50qynxzilsxoey")
        );

        let stop: Value = decode(fixture!("pod_stop.200.json")).expect("stop");
        let stopped = PodDto {
            desired_status: stop["podStop"]["desiredStatus"]
                .as_str()
                .map(str::to_string),
            ..PodDto::default()
        };
        assert_eq!(pod_state(&stopped), RemoteState::Stopped("EXITED".into()));

        let terminated: Value = decode(fixture!("pod_terminate.200.json")).expect("terminate");
        assert_eq!(terminated, json!({"podTerminate": null}));
    }

    #[test]
    fn public_tcp_endpoint_needs_the_public_worker_port() {
        let c = client(RunpodWorkerAccess::PublicTcp, CloudType::All, "1", 8000);
        let pod: PodDto = serde_json::from_value(json!({
            "id": "abc123", "name": "gpupool-x-y", "desiredStatus": "RUNNING", "costPerHr": 0.69,
            "gpuCount": 2, "machine": {"gpuDisplayName": "RTX 4090", "location": "EU-RO-1"},
            "runtime": {"uptimeInSeconds": 12, "ports": [
                {"ip": "100.65.0.101", "isIpPublic": false, "privatePort": 8000, "publicPort": 60141, "type": "http"},
                {"ip": "10.0.0.2", "isIpPublic": false, "privatePort": 8000, "publicPort": 1, "type": "tcp"},
                {"ip": "213.173.1.2", "isIpPublic": true, "privatePort": 22, "publicPort": 2, "type": "tcp"},
                {"ip": "213.173.1.2", "isIpPublic": true, "privatePort": 8000, "publicPort": 40123, "type": "tcp"},
                "garbage"
            ]}
        }))
        .expect("pod");
        let i = c.to_remote(&pod).expect("remote");
        assert_eq!(i.state, RemoteState::Running);
        assert_eq!(i.endpoint.as_deref(), Some("http://213.173.1.2:40123"));
        assert_eq!(
            i.price_per_hour.map(|p| p.to_string()).as_deref(),
            Some("0.69")
        );
        assert_eq!(i.gpu_name.as_deref(), Some("RTX 4090"));
        assert_eq!(i.region.as_deref(), Some("EU-RO-1"));
        assert_eq!(i.num_gpus, Some(2));
    }

    #[test]
    fn public_tcp_endpoint_needs_an_address() {
        let c = client(RunpodWorkerAccess::PublicTcp, CloudType::All, "1", 8000);
        let with_ip = |ip: &str| {
            let pod: PodDto = serde_json::from_value(json!({
                "id": "abc123", "desiredStatus": "RUNNING",
                "runtime": {"ports": [
                    {"ip": ip, "isIpPublic": true, "privatePort": 8000, "publicPort": 40123, "type": "tcp"}
                ]}
            }))
            .expect("pod");
            c.to_remote(&pod).and_then(|i| i.endpoint)
        };
        for bad in ["not found", "evil.example/x?", "user@213.173.1.2", ""] {
            assert_eq!(with_ip(bad), None, "{bad:?}");
        }
        assert_eq!(
            with_ip(" 2001:db8::9 ").as_deref(),
            Some("http://[2001:db8::9]:40123")
        );
    }

    #[test]
    fn pod_states() {
        let s = |status: &str, runtime: bool| {
            pod_state(&PodDto {
                desired_status: Some(status.into()),
                runtime: runtime.then(RuntimeDto::default),
                ..PodDto::default()
            })
        };
        assert_eq!(s("RUNNING", true), RemoteState::Running);
        assert_eq!(s("RUNNING", false), RemoteState::Starting);
        assert_eq!(s("CREATED", false), RemoteState::Starting);
        assert_eq!(s("RESTARTING", true), RemoteState::Starting);
        for stopped in ["EXITED", "PAUSED", "DEAD"] {
            assert!(
                matches!(s(stopped, false), RemoteState::Stopped(_)),
                "{stopped}"
            );
        }
        assert_eq!(s("TERMINATED", false), RemoteState::Terminated);
    }

    #[test]
    fn published_errors_map_to_variants() {
        let e = decode::<Value>(fixture!("error.no_capacity.json")).expect_err("capacity");
        assert_eq!(e.label(), "InsufficientCapacity");
        assert!(e.to_string().contains("no longer any instances"), "{e}");
        assert_eq!(
            decode::<Value>(fixture!("error.not_enough_free_gpus.json")).map_err(|e| e.label()),
            Err("InsufficientCapacity")
        );
        assert_eq!(
            decode::<Value>(fixture!("error.something_went_wrong.json")).map_err(|e| e.label()),
            Err("Transient")
        );
        assert_eq!(
            decode::<Value>(r#"{"errors":[{"message":"Pod not found"}],"data":null}"#)
                .map_err(|e| e.label()),
            Err("NotFound")
        );
        assert_eq!(
            decode::<Value>(r#"{"errors":[{"message":"Invalid gpuCount"}]}"#)
                .map_err(|e| e.label()),
            Err("Permanent")
        );
        let r = Redactor::default();
        assert_eq!(
            classify_graphql::<Value>("t", &raw(401, "{}"), &r).map_err(|e| e.label()),
            Err("Unauthorized")
        );
        assert_eq!(
            classify_graphql::<Value>("t", &raw(429, ""), &r).map_err(|e| e.label()),
            Err("RateLimited")
        );
        assert_eq!(
            classify_graphql::<Value>("t", &raw(502, "<html>"), &r).map_err(|e| e.label()),
            Err("Transient")
        );
        assert_eq!(
            classify_graphql::<Value>(
                "t",
                &raw(400, r#"{"errors":[{"message":"Syntax Error"}]}"#),
                &r
            )
            .map_err(|e| e.label()),
            Err("Permanent")
        );
        assert_eq!(
            classify_graphql::<Value>("t", &raw(200, "not json"), &r).map_err(|e| e.label()),
            Err("Transient")
        );
    }

    #[test]
    fn deploy_input_uses_the_entry() {
        let req = CreateRequest {
            label: "gpupool-c-u".into(),
            image: "img:1".into(),
            env: [("A".to_string(), "b\"c".to_string())].into(),
            secret_env: Default::default(),
            port: 8000,
            disk_gb: 20,
        };
        let c = client(
            RunpodWorkerAccess::PublicTcp,
            CloudType::Community,
            "1",
            8000,
        );
        let input = c.deploy_input("NVIDIA GeForce RTX 3090", &req, Some("EU-RO-1"));
        assert_eq!(
            input,
            json!({
                "name": "gpupool-c-u", "imageName": "img:1", "gpuTypeId": "NVIDIA GeForce RTX 3090",
                "gpuCount": 2, "cloudType": "COMMUNITY", "containerDiskInGb": 20, "volumeInGb": 0,
                "ports": "8000/tcp", "supportPublicIp": true,
                "env": [{"key": "A", "value": "b\"c"}], "dataCenterId": "EU-RO-1"
            })
        );
        let proxy = client(RunpodWorkerAccess::Proxy, CloudType::All, "1", 8000);
        let input = proxy.deploy_input("g", &req, None);
        assert_eq!(input["ports"], "8000/http");
        assert_eq!(input["supportPublicIp"], false);
        assert_eq!(input["cloudType"], "ALL");
        assert!(input.get("dataCenterId").is_none());
    }

    #[test]
    fn graphql_url_and_proxy_template() {
        assert_eq!(
            graphql_url("https://api.runpod.io")
                .map(|u| u.to_string())
                .ok()
                .as_deref(),
            Some("https://api.runpod.io/graphql")
        );
        assert_eq!(
            graphql_url("http://127.0.0.1:9/x/graphql")
                .map(|u| u.to_string())
                .ok()
                .as_deref(),
            Some("http://127.0.0.1:9/x/graphql")
        );
        assert!(ProxyTemplate::parse("https://proxy.example/{port}").is_err());
        let t = ProxyTemplate::parse("http://127.0.0.1:7000/{podId}/{port}").expect("template");
        assert_eq!(t.render("abc", 8000), "http://127.0.0.1:7000/abc/8000");
    }
}
