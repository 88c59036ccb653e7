//! RunPod pods client ([`RunpodV2Client`]) over RunPod's REST API v2 (`providers.md` §2.10,
//! `api-specs/runpod/rest-v2.openapi.json`): `GET /catalog/gpus`, `POST /pods`,
//! `GET /pods/{id}`, `GET /pods`, `DELETE /pods/{id}`. The base URL includes `/v2`. Also the
//! error mapping ([`rest_error`]) that the Serverless client reuses for endpoint settings.
//!
//! What differs from the GraphQL client ([`super::runpod`]), and why:
//! * **No `ALL` cloud.** A pod is created in `SECURE` or `COMMUNITY`. An entry with
//!   `cloudType: ALL` gets one offer per cloud that lists the GPU type, each at that cloud's
//!   price; the offer id names the cloud (`COMMUNITY:NVIDIA GeForce RTX 4090`), so the
//!   controller's offer loop tries the cheaper cloud first and the other when the first has
//!   no capacity (SECURE first at equal prices).
//! * **Catalogue prices are per GPU**: an offer costs `price.<cloud> × gpuCount`, and a cloud
//!   whose `maxCount` is below the entry's `gpuCount` is no offer.
//! * **`dataCenterIds` is a list** (a hard constraint), sent only when the entry names some;
//!   too narrow a list answers with the same 400 as no capacity.
//! * **Finding a pod after a lost create.** There is no idempotency key and `GET /pods` has no
//!   name filter (unknown query parameters are ignored, so `?name=` lists every pod). The pod
//!   `name` is the gpupool label and the env carries it again as [`ENV_LABEL`]; a pod is taken
//!   for gpupool's only when both say so (a name can be changed, and a user's pod may happen
//!   to be called `gpupool-...`). Every page is read (`limit`/`cursor`,
//!   `pagination.{hasNextPage,nextCursor}`; a bare `{"pods": [...]}` is one page), up to
//!   [`MAX_PAGES`].
//! * **Errors** are `application/problem+json` (`{title, status, detail, errors?}`); see
//!   [`rest_error`] for the mapping. A 403 on create means the account cannot use that GPU
//!   type's pool: RunPod's guidance is to skip that candidate and go on, which is what
//!   `InsufficientCapacity` makes the controller do.
//! * **Pod bodies carry the env** (the worker's session token and API key among it), so a 2xx
//!   pod body that does not decode is never quoted in an error.
//! * Only fields of the published `CreatePodRequest` schema are sent (unknown ones are a 422):
//!   no volume, no `supportPublicIp`, no spot.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
};

use async_trait::async_trait;
use jiff::Timestamp;
use reqwest::{Method, StatusCode};
use rust_decimal::Decimal;
use serde::{Deserialize, de::DeserializeOwned};
use serde_json::{Map, Value, json};
use tracing::{debug, warn};
use url::Url;

use super::{
    CreateRequest, Credentials, ENV_LABEL, InstanceProvider, Offer, ProviderError, ProviderKind,
    ProviderResult, RemoteInstance, RemoteState,
    http::{
        ApiClient, Call, DEFAULT_RUNPOD_PROXY_TEMPLATE, DEFAULT_RUNPOD_REST_V2_BASE_URL,
        HttpConfig, Idempotency, RawResponse, Redactor, WorkerShape, join_segments, lenient, money,
        parse_base_url, parse_price,
    },
    quota::destroy_lane,
    runpod::ProxyTemplate,
};
use crate::crd::{CloudType, RunpodProvider, pool::RunpodWorkerAccess};

/// Pods asked for per page of `GET /pods` (servers that do not page ignore it).
pub const PAGE_LIMIT: usize = 100;
/// Most pages of `GET /pods` read in one listing; more is an error, not a partial list.
pub const MAX_PAGES: usize = 50;
/// Longest problem text (title, detail, errors) quoted in an error, in characters.
const PROBLEM_CHARS: usize = 400;
/// What RunPod's `detail` says when no machine can take the pod.
const NO_CAPACITY: &str = "no longer any instances available";

/// Where and how to reach RunPod REST v2.
#[derive(Clone, Debug)]
pub struct RunpodV2Options {
    /// REST v2 base, `/v2` included (as RunPod's MCP server's `RUNPOD_REST_V2_API_URL`).
    pub base_url: String,
    /// URL of a pod's `/http` port behind RunPod's proxy; `{podId}` and `{port}` are replaced.
    pub proxy_url_template: String,
    pub http: HttpConfig,
}

impl Default for RunpodV2Options {
    fn default() -> Self {
        Self {
            base_url: DEFAULT_RUNPOD_REST_V2_BASE_URL.into(),
            proxy_url_template: DEFAULT_RUNPOD_PROXY_TEMPLATE.into(),
            http: HttpConfig::runpod_v2(),
        }
    }
}

/// A RunPod cloud as REST v2 spells it (`Cloud` in the spec).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cloud {
    Secure,
    Community,
}

impl Cloud {
    fn name(self) -> &'static str {
        match self {
            Self::Secure => "SECURE",
            Self::Community => "COMMUNITY",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "SECURE" => Some(Self::Secure),
            "COMMUNITY" => Some(Self::Community),
            _ => None,
        }
    }
}

/// Which kind of call an error answered: the same status can mean different things.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verb {
    Create,
    Read,
    Delete,
    Update,
}

/// One `runpod` provider entry of a pool whose `api` is `RestV2`.
#[derive(Debug)]
pub struct RunpodV2Client {
    api: ApiClient,
    base: Url,
    proxy_template: ProxyTemplate,
    gpu_type_ids: Vec<String>,
    cloud: CloudType,
    max_price: Decimal,
    gpu_count: u32,
    access: RunpodWorkerAccess,
    data_centers: Vec<String>,
    worker: WorkerShape,
}

impl RunpodV2Client {
    pub fn new(
        entry: &RunpodProvider,
        worker: WorkerShape,
        credentials: Credentials,
        options: RunpodV2Options,
    ) -> ProviderResult<Self> {
        let base = parse_base_url("RunPod REST v2", &options.base_url)?;
        let proxy_template = ProxyTemplate::parse(&options.proxy_url_template)?;
        let max_price = parse_price("runpod maxPricePerHour", &entry.max_price_per_hour)?;
        let gpu_count = u32::try_from(entry.gpu_count)
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| {
                ProviderError::Permanent(format!("invalid gpuCount {}", entry.gpu_count))
            })?;
        if entry.gpu_type_ids.iter().all(|g| g.trim().is_empty()) {
            return Err(ProviderError::Permanent(
                "runpod gpuTypeIds is empty".into(),
            ));
        }
        Ok(Self {
            api: ApiClient::new("runpod", credentials, options.http)?,
            base,
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

    fn url(&self, segments: &[&str]) -> ProviderResult<Url> {
        join_segments(&self.base, segments)
    }

    /// The clouds the entry may rent in, in the order offers of equal price are tried.
    fn clouds(&self) -> &'static [Cloud] {
        match self.cloud {
            CloudType::Secure => &[Cloud::Secure],
            CloudType::Community => &[Cloud::Community],
            CloudType::All => &[Cloud::Secure, Cloud::Community],
        }
    }

    /// The entry's offers in the catalogue: its GPU types in its order, each once per
    /// allowed cloud that lists it within the price cap; then cheapest first (stable, so the
    /// entry's order and then SECURE break ties), as the GraphQL client ranks them.
    fn offers_from(&self, catalog: &[GpuTypeDto]) -> Vec<Offer> {
        let mut offers = Vec::new();
        for wanted in &self.gpu_type_ids {
            // Only the exact type: another GPU's price is never booked under this id.
            let Some(gpu) = catalog.iter().find(|g| g.id.as_deref() == Some(wanted)) else {
                warn!(gpu_type_id = %wanted, "the RunPod catalogue does not list this GPU type");
                continue;
            };
            for cloud in self.clouds() {
                offers.extend(self.offer_for(wanted, gpu, *cloud));
            }
        }
        offers.sort_by_key(|o| o.price_per_hour);
        offers
    }

    fn offer_for(&self, gpu_type_id: &str, gpu: &GpuTypeDto, cloud: Cloud) -> Option<Offer> {
        let (listed, per_gpu, max_count) = match cloud {
            Cloud::Secure => (
                gpu.secure,
                gpu.price.as_ref().and_then(|p| p.secure),
                gpu.max_count.as_ref().and_then(|m| m.secure),
            ),
            Cloud::Community => (
                gpu.community,
                gpu.price.as_ref().and_then(|p| p.community),
                gpu.max_count.as_ref().and_then(|m| m.community),
            ),
        };
        if listed == Some(false) {
            return None;
        }
        if max_count.is_some_and(|max| max < u64::from(self.gpu_count)) {
            debug!(
                gpu_type_id,
                cloud = cloud.name(),
                "fewer GPUs per pod than asked"
            );
            return None;
        }
        let per_gpu = per_gpu.filter(|p| *p > 0.0)?;
        // Checked: a price near Decimal::MAX times the GPU count would overflow (and panic).
        let price = money(per_gpu)?.checked_mul(Decimal::from(self.gpu_count))?;
        if price > self.max_price {
            debug!(gpu_type_id, cloud = cloud.name(), %price, "over the price cap");
            return None;
        }
        Some(Offer {
            id: format!("{}:{gpu_type_id}", cloud.name()),
            gpu_name: gpu
                .name
                .clone()
                .filter(|n| !n.trim().is_empty())
                .unwrap_or_else(|| gpu_type_id.to_string()),
            num_gpus: self.gpu_count,
            price_per_hour: price.normalize(),
            region: None,
            reliability: None,
        })
    }

    /// The cloud and GPU type id an offer id names. An id without a cloud (not made by this
    /// client) is the entry's cloud, or SECURE (RunPod's default) for ALL.
    fn offer_target<'a>(&self, offer_id: &'a str) -> ProviderResult<(Cloud, &'a str)> {
        let (cloud, gpu) = match offer_id.split_once(':') {
            Some((c, gpu)) if Cloud::parse(c).is_some() => (Cloud::parse(c), gpu),
            _ => (None, offer_id),
        };
        let cloud = cloud.unwrap_or(match self.cloud {
            CloudType::Community => Cloud::Community,
            CloudType::Secure | CloudType::All => Cloud::Secure,
        });
        if gpu.trim().is_empty() {
            return Err(ProviderError::Permanent(format!(
                "runpod.create_pod: offer {offer_id:?} names no GPU type"
            )));
        }
        Ok((cloud, gpu))
    }

    /// The `CreatePodRequest` body: only fields of the published schema.
    fn create_body(&self, gpu_type_id: &str, cloud: Cloud, req: &CreateRequest) -> Value {
        let port = match self.access {
            RunpodWorkerAccess::PublicTcp => format!("{}/tcp", req.port),
            RunpodWorkerAccess::Proxy => format!("{}/http", req.port),
        };
        let mut env: Map<String, Value> = req
            .env
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        env.insert(ENV_LABEL.into(), Value::String(req.label.clone()));
        let mut body = json!({
            "name": req.label,
            "image": req.image,
            // Always with the count: a create without it fails like one without capacity.
            "gpu": {"id": gpu_type_id, "count": self.gpu_count},
            "cloud": cloud.name(),
            "ports": [port],
            "env": env,
            "disk": req.disk_gb,
        });
        if !self.data_centers.is_empty() {
            body["dataCenterIds"] = json!(self.data_centers);
        }
        body
    }

    fn to_remote(&self, dto: &PodDto, asked_id: Option<&str>) -> Option<RemoteInstance> {
        let id = dto
            .id
            .clone()
            .filter(|i| !i.is_empty())
            .or_else(|| asked_id.map(str::to_string))?;
        Some(RemoteInstance {
            label: dto.name.clone().filter(|n| !n.is_empty()),
            state: pod_state(dto),
            endpoint: self.endpoint(&id, dto),
            gpu_name: dto
                .gpu
                .as_ref()
                .and_then(|g| g.id.clone())
                .filter(|g| !g.is_empty()),
            num_gpus: dto
                .gpu
                .as_ref()
                .and_then(|g| g.count)
                .and_then(|n| u32::try_from(n).ok()),
            // 0 when stopped: no price rather than a free machine.
            price_per_hour: dto.cost.filter(|c| *c > 0.0).and_then(money),
            region: dto.data_center_id.clone().filter(|d| !d.is_empty()),
            started_at: dto
                .started_at
                .as_deref()
                .and_then(|s| s.trim().parse::<Timestamp>().ok()),
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
                .filter(|p| {
                    p.kind
                        .as_deref()
                        .is_some_and(|k| k.eq_ignore_ascii_case("tcp"))
                })
                .filter(|p| p.private == Some(u64::from(port)))
                .find_map(|p| {
                    // An address, not any text: it becomes the worker's URL.
                    let ip: IpAddr = p.ip.as_deref()?.trim().parse().ok()?;
                    if !reachable(ip) {
                        return None;
                    }
                    let public = u16::try_from(p.public?).ok().filter(|p| *p > 0)?;
                    Some(format!("http://{}", SocketAddr::new(ip, public)))
                }),
        }
    }

    /// One page of `GET /pods`.
    async fn list_page(&self, cursor: Option<&str>) -> ProviderResult<PodsPage> {
        const OP: &str = "runpod.list_pods";
        let mut url = self.url(&["pods"])?;
        {
            let mut q = url.query_pairs_mut();
            q.append_pair("limit", &PAGE_LIMIT.to_string());
            if let Some(c) = cursor {
                q.append_pair("cursor", c);
            }
        }
        let call = Call {
            op: OP,
            method: Method::GET,
            url,
            body: None,
            idempotency: Idempotency::Idempotent,
        };
        self.api
            .execute(&call, |raw, r| {
                if !raw.is_success() {
                    return Err(rest_error(OP, raw, r, Verb::Read));
                }
                pods_page(OP, raw)
            })
            .await
    }
}

#[async_trait]
impl InstanceProvider for RunpodV2Client {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Runpod
    }

    async fn offers(&self) -> ProviderResult<Vec<Offer>> {
        const OP: &str = "runpod.catalog_gpus";
        // No query: `count` and `cloud` are valid only with include=AVAILABILITY (400 else),
        // and the list prices are all an offer needs.
        let call = Call {
            op: OP,
            method: Method::GET,
            url: self.url(&["catalog", "gpus"])?,
            body: None,
            idempotency: Idempotency::Idempotent,
        };
        let catalog: CatalogDto = self
            .api
            .execute(&call, |raw, r| {
                if !raw.is_success() {
                    return Err(rest_error(OP, raw, r, Verb::Read));
                }
                let v: Value = raw.json(OP, r)?;
                // A body without the list is not an empty catalogue.
                if !v.get("gpus").is_some_and(Value::is_array) {
                    return Err(ProviderError::Transient(format!(
                        "{OP}: response without a gpus list: {}",
                        r.excerpt(&raw.body)
                    )));
                }
                serde_json::from_value(v).map_err(|e| {
                    ProviderError::Transient(format!(
                        "{OP}: unexpected response: {}",
                        r.excerpt(e.to_string().as_bytes())
                    ))
                })
            })
            .await?;
        Ok(self.offers_from(&catalog.gpus))
    }

    async fn create(&self, offer: &Offer, req: &CreateRequest) -> ProviderResult<RemoteInstance> {
        const OP: &str = "runpod.create_pod";
        let (cloud, gpu_type_id) = self.offer_target(&offer.id)?;
        let body = self.create_body(gpu_type_id, cloud, req);
        let call = Call {
            op: OP,
            method: Method::POST,
            url: self.url(&["pods"])?,
            body: Some(&body),
            idempotency: Idempotency::NotIdempotent,
        };
        // The body carries the worker's secrets: redacted from any error quoting it.
        let dto: PodDto = self
            .api
            .execute_with_secrets(&call, &req.secrets(), |raw, r| {
                if raw.is_success() {
                    // Not decodable: the pod may exist; the caller adopts it by label.
                    return decode_pod_body(OP, raw);
                }
                Err(match rest_error(OP, raw, r, Verb::Create) {
                    // An unknown GPU type or template: the entry is wrong, not a pod gone.
                    ProviderError::NotFound(m) => ProviderError::Permanent(m),
                    e => e,
                })
            })
            .await?;
        let mut remote = self
            .to_remote(&dto, None)
            .ok_or_else(|| ProviderError::Transient(format!("{OP}: answer without a pod id")))?;
        remote.label = Some(req.label.clone());
        remote.state = match remote.state {
            RemoteState::Running | RemoteState::Starting => RemoteState::Starting,
            other => other,
        };
        remote.gpu_name = remote.gpu_name.or_else(|| Some(offer.gpu_name.clone()));
        remote.num_gpus = remote.num_gpus.or(Some(offer.num_gpus));
        remote.price_per_hour = remote.price_per_hour.or(Some(offer.price_per_hour));
        Ok(remote)
    }

    async fn get(&self, id: &str) -> ProviderResult<RemoteInstance> {
        const OP: &str = "runpod.get_pod";
        let call = Call {
            op: OP,
            method: Method::GET,
            url: self.url(&["pods", id])?,
            body: None,
            idempotency: Idempotency::Idempotent,
        };
        let dto: PodDto = self
            .api
            .execute(&call, |raw, r| {
                if raw.is_success() {
                    decode_pod_body(OP, raw)
                } else {
                    Err(rest_error(OP, raw, r, Verb::Read))
                }
            })
            .await?;
        self.to_remote(&dto, Some(id))
            .ok_or_else(|| ProviderError::NotFound(format!("runpod pod {id}")))
    }

    async fn delete(&self, id: &str) -> ProviderResult<()> {
        const OP: &str = "runpod.delete_pod";
        let call = Call {
            op: OP,
            method: Method::DELETE,
            url: self.url(&["pods", id])?,
            body: None,
            idempotency: Idempotency::Idempotent,
        };
        // The pod bills until this call is made: it goes before any other.
        destroy_lane(self.api.execute(&call, |raw, r| {
            if raw.is_success() || raw.status == StatusCode::NOT_FOUND {
                // 204; 404 is "not found or not yours": gone either way.
                return Ok(());
            }
            Err(rest_error(OP, raw, r, Verb::Delete))
        }))
        .await
    }

    async fn list_labeled(&self, prefix: &str) -> ProviderResult<Vec<RemoteInstance>> {
        let mut found = Vec::new();
        let mut cursor: Option<String> = None;
        let mut seen_cursors = Vec::new();
        for _ in 0..MAX_PAGES {
            let page = self.list_page(cursor.as_deref()).await?;
            found.extend(
                page.pods
                    .iter()
                    .filter(|p| is_ours(p, prefix))
                    .filter_map(|p| self.to_remote(p, None)),
            );
            let Some(next) = page.next else {
                return Ok(found);
            };
            if seen_cursors.contains(&next) {
                return Err(ProviderError::Transient(
                    "runpod.list_pods: the pages loop (a cursor came back)".into(),
                ));
            }
            seen_cursors.push(next.clone());
            cursor = Some(next);
        }
        Err(ProviderError::Transient(format!(
            "runpod.list_pods: more than {MAX_PAGES} pages of {PAGE_LIMIT} pods"
        )))
    }

    async fn find_by_label(&self, label: &str) -> ProviderResult<Option<RemoteInstance>> {
        let mut matches: Vec<RemoteInstance> = self
            .list_labeled(label)
            .await?
            .into_iter()
            .filter(|i| i.label.as_deref() == Some(label))
            .collect();
        // A terminated pod that still lists is history; a live one with the label is ours.
        matches.sort_by_key(|i| i.state == RemoteState::Terminated);
        Ok(matches.into_iter().next())
    }
}

/// Whether a listed pod is one of gpupool's under `prefix`: its name starts with it and its
/// env marker repeats the name.
fn is_ours(pod: &PodDto, prefix: &str) -> bool {
    let Some(name) = pod.name.as_deref().filter(|n| n.starts_with(prefix)) else {
        return false;
    };
    pod.env
        .as_ref()
        .and_then(|env| env.get(ENV_LABEL))
        .and_then(Value::as_str)
        == Some(name)
}

/// Whether the operator can reach `ip`: not unspecified, and not in 100.64.0.0/10, the
/// shared address space RunPod reports for ports behind its proxy.
fn reachable(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            let shared = a == 100 && (64..128).contains(&b);
            !(v4.is_unspecified() || shared)
        }
        IpAddr::V6(v6) => !v6.is_unspecified(),
    }
}

/// `status` and `runtime` to a coarse state. RUNNING counts once the runtime is there (the
/// same readiness rule as the GraphQL client); ERROR is a stopped pod, never "starting".
fn pod_state(dto: &PodDto) -> RemoteState {
    let status = dto
        .status
        .as_deref()
        .map(|s| s.trim().to_ascii_uppercase())
        .unwrap_or_default();
    match status.as_str() {
        "RUNNING" if dto.runtime.is_some() => RemoteState::Running,
        "RUNNING" | "PROVISIONING" | "STARTING" => RemoteState::Starting,
        "EXITED" => RemoteState::Stopped("EXITED: the container exited".into()),
        "ERROR" => {
            RemoteState::Stopped("ERROR: the container is in an unrecoverable error state".into())
        }
        "TERMINATED" => RemoteState::Terminated,
        // Unknown or missing: not ready; the provision timeout bounds how long.
        _ => RemoteState::Starting,
    }
}

/// A 2xx pod body as `T`. Pod bodies carry the worker's env (its session token and API key),
/// so a body that does not decode is described by position only, never quoted.
fn decode_pod_body<T: DeserializeOwned>(op: &str, raw: &RawResponse) -> ProviderResult<T> {
    serde_json::from_slice(&raw.body).map_err(|e| {
        ProviderError::Transient(format!(
            "{op}: unexpected response (HTTP {}, {} bytes, {:?} error at line {} column {})",
            raw.status.as_u16(),
            raw.body.len(),
            e.classify(),
            e.line(),
            e.column()
        ))
    })
}

/// One page of pods and the cursor of the next, from either the paged form
/// `{pods, pagination: {hasNextPage, nextCursor}}` or a bare `{pods}` (a top-level list is
/// also accepted, as REST v1 answered).
fn pods_page(op: &str, raw: &RawResponse) -> ProviderResult<PodsPage> {
    let body: Value = decode_pod_body(op, raw)?;
    let (items, pagination) = match body {
        Value::Array(items) => (items, None),
        Value::Object(mut map) => match map.remove("pods") {
            Some(Value::Array(items)) => (items, map.remove("pagination")),
            _ => {
                return Err(ProviderError::Transient(format!(
                    "{op}: response without a pods list"
                )));
            }
        },
        _ => {
            return Err(ProviderError::Transient(format!(
                "{op}: response is not a pod list"
            )));
        }
    };
    let pods = items
        .into_iter()
        .filter_map(|v| serde_json::from_value(v).ok())
        .collect();
    let pagination: PaginationDto = pagination
        .and_then(|p| serde_json::from_value(p).ok())
        .unwrap_or_default();
    let cursor = pagination.next_cursor.filter(|c| !c.is_empty());
    let next = match (pagination.has_next_page, cursor) {
        (Some(false), _) | (None, None) => None,
        (_, Some(c)) => Some(c),
        (Some(true), None) => {
            // Stopping here would be a partial list: a lost create would be made again.
            return Err(ProviderError::Transient(format!(
                "{op}: hasNextPage without a nextCursor"
            )));
        }
    };
    Ok(PodsPage { pods, next })
}

/// The meaning of a REST v2 error answer (`application/problem+json`) to a `verb` call:
///
/// | status | error |
/// |---|---|
/// | 400 whose text says "no longer any instances available" | InsufficientCapacity |
/// | other 400 | Permanent |
/// | 401 | Unauthorized |
/// | 402 | Permanent (balance) |
/// | 403 to a create | InsufficientCapacity (no access to that GPU pool: next offer) |
/// | other 403 | Unauthorized (the key lacks a permission) |
/// | 404 | NotFound (callers refine: success for a delete, Permanent for a create) |
/// | 409 | Permanent |
/// | 422 | Permanent, naming it a gpupool bug (a body off the published schema) |
/// | 429 | RateLimited with `Retry-After` |
/// | 408, 5xx | Transient |
/// | anything else | Permanent |
pub(crate) fn rest_error(
    op: &str,
    raw: &RawResponse,
    redactor: &Redactor,
    verb: Verb,
) -> ProviderError {
    let problem: Option<ProblemDto> = serde_json::from_slice(&raw.body).ok();
    let said = problem
        .as_ref()
        .and_then(|p| p.describe(redactor))
        .unwrap_or_else(|| redactor.excerpt(&raw.body));
    let code = raw.status.as_u16();
    let msg = format!("{op}: HTTP {code}: {said}");
    match code {
        429 => ProviderError::RateLimited {
            retry_after: raw.retry_after,
        },
        401 => ProviderError::Unauthorized(format!("{msg} (the RunPod API key was refused)")),
        402 => ProviderError::Permanent(format!(
            "{op}: the RunPod account's balance is too low (HTTP 402): add funds; {said}"
        )),
        403 if verb == Verb::Create => ProviderError::InsufficientCapacity(format!(
            "{msg} (the account cannot use this GPU type's pool; trying the next offer)"
        )),
        403 => ProviderError::Unauthorized(format!(
            "{msg} (the RunPod API key lacks a permission this call needs)"
        )),
        404 => ProviderError::NotFound(msg),
        422 => ProviderError::Permanent(format!(
            "{op}: RunPod refused the request as not matching its published schema (HTTP 422), \
             a gpupool bug worth reporting: {said}"
        )),
        400 if says_no_capacity(problem.as_ref(), &raw.body) => {
            ProviderError::InsufficientCapacity(msg)
        }
        408 => ProviderError::Transient(msg),
        _ if raw.status.is_server_error() => ProviderError::Transient(msg),
        _ => ProviderError::Permanent(msg),
    }
}

fn says_no_capacity(problem: Option<&ProblemDto>, body: &[u8]) -> bool {
    let text = match problem.and_then(|p| p.detail.as_deref()) {
        Some(detail) => detail.to_ascii_lowercase(),
        None => String::from_utf8_lossy(&body[..body.len().min(4096)]).to_ascii_lowercase(),
    };
    text.contains(NO_CAPACITY)
}

// ---- wire DTOs (private) ----

struct PodsPage {
    pods: Vec<PodDto>,
    next: Option<String>,
}

/// `ErrorResponse`: `{title, status, detail, errors?}`.
#[derive(Deserialize, Debug, Default)]
#[serde(default)]
pub(crate) struct ProblemDto {
    #[serde(deserialize_with = "lenient::opt_string")]
    title: Option<String>,
    #[serde(deserialize_with = "lenient::opt_string")]
    pub(crate) detail: Option<String>,
    #[serde(deserialize_with = "lenient::vec_skip_bad")]
    errors: Vec<String>,
}

impl ProblemDto {
    /// "title: detail (errors: a; b)", redacted, on one line, bounded; `None` when empty.
    pub(crate) fn describe(&self, redactor: &Redactor) -> Option<String> {
        let mut parts: Vec<String> = [&self.title, &self.detail]
            .into_iter()
            .flatten()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
        parts.dedup();
        let mut text = parts.join(": ");
        if !self.errors.is_empty() {
            text.push_str(&format!(" (errors: {})", self.errors.join("; ")));
        }
        let text = redactor.message(&text, PROBLEM_CHARS);
        (!text.is_empty()).then_some(text)
    }
}

#[derive(Deserialize, Debug, Default)]
#[serde(default)]
struct CatalogDto {
    #[serde(deserialize_with = "lenient::vec_skip_bad")]
    gpus: Vec<GpuTypeDto>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(default, rename_all = "camelCase")]
struct GpuTypeDto {
    #[serde(deserialize_with = "lenient::opt_string")]
    id: Option<String>,
    #[serde(deserialize_with = "lenient::opt_string")]
    name: Option<String>,
    #[serde(deserialize_with = "lenient::opt_bool")]
    secure: Option<bool>,
    #[serde(deserialize_with = "lenient::opt_bool")]
    community: Option<bool>,
    #[serde(deserialize_with = "lenient::opt_obj")]
    price: Option<CloudPricesDto>,
    #[serde(deserialize_with = "lenient::opt_obj")]
    max_count: Option<CloudCountsDto>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(default)]
struct CloudPricesDto {
    #[serde(deserialize_with = "lenient::opt_f64")]
    secure: Option<f64>,
    #[serde(deserialize_with = "lenient::opt_f64")]
    community: Option<f64>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(default)]
struct CloudCountsDto {
    #[serde(deserialize_with = "lenient::opt_u64")]
    secure: Option<u64>,
    #[serde(deserialize_with = "lenient::opt_u64")]
    community: Option<u64>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(default, rename_all = "camelCase")]
struct PaginationDto {
    #[serde(deserialize_with = "lenient::opt_bool")]
    has_next_page: Option<bool>,
    #[serde(deserialize_with = "lenient::opt_string")]
    next_cursor: Option<String>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(default, rename_all = "camelCase")]
struct PodDto {
    #[serde(deserialize_with = "lenient::opt_string")]
    id: Option<String>,
    #[serde(deserialize_with = "lenient::opt_string")]
    name: Option<String>,
    #[serde(deserialize_with = "lenient::opt_string")]
    status: Option<String>,
    /// Environment as `{K: V}`: where the label marker is read.
    #[serde(deserialize_with = "lenient::opt_obj")]
    env: Option<BTreeMap<String, Value>>,
    #[serde(deserialize_with = "lenient::opt_obj")]
    gpu: Option<PodGpuDto>,
    /// USD per hour for the whole pod; 0 when EXITED or TERMINATED.
    #[serde(deserialize_with = "lenient::opt_f64")]
    cost: Option<f64>,
    #[serde(deserialize_with = "lenient::opt_string")]
    data_center_id: Option<String>,
    /// `null` unless RUNNING.
    #[serde(deserialize_with = "lenient::opt_obj")]
    runtime: Option<RuntimeDto>,
    #[serde(deserialize_with = "lenient::opt_string")]
    started_at: Option<String>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(default)]
struct PodGpuDto {
    #[serde(deserialize_with = "lenient::opt_string")]
    id: Option<String>,
    #[serde(deserialize_with = "lenient::opt_u64")]
    count: Option<u64>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(default)]
struct RuntimeDto {
    #[serde(deserialize_with = "lenient::vec_skip_bad")]
    ports: Vec<RuntimePortDto>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(default)]
struct RuntimePortDto {
    #[serde(deserialize_with = "lenient::opt_u64")]
    private: Option<u64>,
    #[serde(deserialize_with = "lenient::opt_u64")]
    public: Option<u64>,
    #[serde(rename = "type", deserialize_with = "lenient::opt_string")]
    kind: Option<String>,
    #[serde(deserialize_with = "lenient::opt_string")]
    ip: Option<String>,
}

#[cfg(test)]
pub(crate) mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::crd::SecretKeyRef;

    /// RunPod's published REST v2 document (`tests/fixtures/providers/runpod_v2/`).
    pub(crate) fn spec() -> Value {
        serde_json::from_str(include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/providers/runpod_v2/rest-v2.openapi.json"
        )))
        .expect("the published document is JSON")
    }

    /// The named example of the JSON content at `pointer` in the document.
    pub(crate) fn example(pointer: &str, name: &str) -> Value {
        let doc = spec();
        let content = doc.pointer(pointer).unwrap_or_else(|| panic!("{pointer}"));
        content["examples"][name]["value"].clone()
    }

    const JSON: &str = "content/application~1json";
    const PROBLEM: &str = "content/application~1problem+json";

    fn client(
        access: RunpodWorkerAccess,
        cloud: CloudType,
        max: &str,
        port: u16,
    ) -> RunpodV2Client {
        let entry = RunpodProvider {
            gpu_type_ids: vec!["NVIDIA GeForce RTX 4090".into(), "NVIDIA RTX A5000".into()],
            cloud_type: cloud,
            max_price_per_hour: max.into(),
            gpu_count: 2,
            worker_access: access,
            data_center_ids: vec![],
            api: crate::crd::RunpodApi::RestV2,
            credentials_secret_ref: SecretKeyRef::new("s", "k"),
        };
        RunpodV2Client::new(
            &entry,
            WorkerShape { port, disk_gb: 20 },
            Credentials::new("rp-key"),
            RunpodV2Options::default(),
        )
        .expect("client")
    }

    fn raw(status: u16, body: &Value) -> RawResponse {
        RawResponse {
            status: StatusCode::from_u16(status).expect("status"),
            retry_after: None,
            body: Bytes::from(body.to_string()),
        }
    }

    fn pod(v: Value) -> PodDto {
        serde_json::from_value(v).expect("pod")
    }

    #[test]
    fn published_catalog_prices_offers_per_cloud_times_gpu_count() {
        let body = example(
            &format!("/paths/~1v2~1catalog~1gpus/get/responses/200/{JSON}"),
            "gpus",
        );
        let catalog: CatalogDto = serde_json::from_value(body).expect("catalog");
        // RTX 4090: 0.44 secure, 0.31 community per GPU; two GPUs; the A5000 is not listed.
        let all = client(RunpodWorkerAccess::PublicTcp, CloudType::All, "1", 8000);
        let offers = all.offers_from(&catalog.gpus);
        let got: Vec<(&str, String)> = offers
            .iter()
            .map(|o| (o.id.as_str(), o.price_per_hour.to_string()))
            .collect();
        assert_eq!(
            got,
            [
                ("COMMUNITY:NVIDIA GeForce RTX 4090", "0.62".to_string()),
                ("SECURE:NVIDIA GeForce RTX 4090", "0.88".to_string())
            ]
        );
        assert_eq!(offers[0].gpu_name, "RTX 4090");
        assert_eq!(offers[0].num_gpus, 2);
        // The cap holds per cloud.
        let capped = client(RunpodWorkerAccess::PublicTcp, CloudType::All, "0.70", 8000);
        assert_eq!(capped.offers_from(&catalog.gpus).len(), 1);
        let secure = client(
            RunpodWorkerAccess::PublicTcp,
            CloudType::Secure,
            "0.70",
            8000,
        );
        assert!(secure.offers_from(&catalog.gpus).is_empty());
    }

    #[test]
    fn catalog_entries_that_cannot_host_the_pod_are_no_offer() {
        let c = client(RunpodWorkerAccess::PublicTcp, CloudType::All, "100", 8000);
        let catalog: CatalogDto = serde_json::from_value(json!({"gpus": [
            // Two GPUs asked: community hosts only one of this type; the secure price is 0.
            {"id": "NVIDIA GeForce RTX 4090", "secure": true, "community": true,
             "price": {"secure": 0, "community": 0.3}, "maxCount": {"secure": 8, "community": 1}},
            // Not in the secure cloud; an absurd community price.
            {"id": "NVIDIA RTX A5000", "secure": false, "community": true,
             "price": {"secure": 0.2, "community": 1e300}, "maxCount": {"secure": 8, "community": 8}},
            // Another type under a price we never asked for.
            {"id": "NVIDIA A40", "price": {"secure": 0.01, "community": 0.01}},
            "garbage"
        ]}))
        .expect("catalog");
        assert!(c.offers_from(&catalog.gpus).is_empty());
        for price in [7.9e28, 4e28] {
            let dto = GpuTypeDto {
                price: Some(CloudPricesDto {
                    secure: Some(price),
                    community: None,
                }),
                ..GpuTypeDto::default()
            };
            assert_eq!(c.offer_for("x", &dto, Cloud::Secure), None, "{price}");
        }
    }

    #[test]
    fn offer_ids_name_the_cloud_and_plain_ids_take_the_entry_cloud() {
        let all = client(RunpodWorkerAccess::PublicTcp, CloudType::All, "1", 8000);
        assert_eq!(
            all.offer_target("COMMUNITY:NVIDIA GeForce RTX 4090").ok(),
            Some((Cloud::Community, "NVIDIA GeForce RTX 4090"))
        );
        assert_eq!(
            all.offer_target("NVIDIA H100 80GB HBM3").ok(),
            Some((Cloud::Secure, "NVIDIA H100 80GB HBM3"))
        );
        let community = client(
            RunpodWorkerAccess::PublicTcp,
            CloudType::Community,
            "1",
            8000,
        );
        assert_eq!(
            community.offer_target("g").ok(),
            Some((Cloud::Community, "g"))
        );
        assert!(all.offer_target("SECURE:").is_err());
    }

    #[test]
    fn create_body_has_the_published_shape() {
        let published = example(
            "/paths/~1v2~1pods/post/requestBody/content/application~1json",
            "gpuPod",
        );
        let req = CreateRequest {
            label: "gpupool-c-u".into(),
            image: "img:1".into(),
            env: [("A".to_string(), "b\"c".to_string())].into(),
            secret_env: Default::default(),
            port: 8000,
            disk_gb: 20,
        };
        let tcp = client(RunpodWorkerAccess::PublicTcp, CloudType::All, "1", 8000);
        let body = tcp.create_body("NVIDIA GeForce RTX 4090", Cloud::Community, &req);
        assert_eq!(
            body,
            json!({
                "name": "gpupool-c-u", "image": "img:1",
                "gpu": {"id": "NVIDIA GeForce RTX 4090", "count": 2}, "cloud": "COMMUNITY",
                "ports": ["8000/tcp"], "env": {"A": "b\"c", "GPUPOOL_LABEL": "gpupool-c-u"},
                "disk": 20
            })
        );
        // Every field the published example uses is one we send, typed alike.
        for (k, v) in published.as_object().expect("object") {
            assert_eq!(
                std::mem::discriminant(v),
                std::mem::discriminant(&body[k]),
                "{k}"
            );
        }
        let mut proxy = client(RunpodWorkerAccess::Proxy, CloudType::Secure, "1", 8000);
        proxy.data_centers = vec!["EU-RO-1".into(), "US-TX-3".into()];
        let body = proxy.create_body("g", Cloud::Secure, &req);
        assert_eq!(body["ports"], json!(["8000/http"]));
        assert_eq!(body["dataCenterIds"], json!(["EU-RO-1", "US-TX-3"]));
    }

    #[test]
    fn published_pod_examples_map() {
        let running = example(
            &format!("/paths/~1v2~1pods~1{{id}}/get/responses/200/{JSON}"),
            "pod",
        );
        // The example's only runtime port is 22/tcp on a public address.
        let ssh = client(RunpodWorkerAccess::PublicTcp, CloudType::All, "1", 22);
        let i = ssh.to_remote(&pod(running.clone()), None).expect("remote");
        assert_eq!(i.id, "7h9k2m4n6p");
        assert_eq!(i.label.as_deref(), Some("pytorch-training"));
        assert_eq!(i.state, RemoteState::Running);
        assert_eq!(i.endpoint.as_deref(), Some("http://195.26.233.3:34446"));
        assert_eq!(i.gpu_name.as_deref(), Some("NVIDIA GeForce RTX 4090"));
        assert_eq!(i.num_gpus, Some(1));
        assert_eq!(
            i.price_per_hour.map(|p| p.to_string()).as_deref(),
            Some("0.44")
        );
        assert_eq!(i.region.as_deref(), Some("US-KS-2"));
        assert_eq!(
            i.started_at,
            Some("2026-06-01T12:02:00Z".parse().expect("time"))
        );
        // No mapping of the worker port: running, but no endpoint yet.
        let worker = client(RunpodWorkerAccess::PublicTcp, CloudType::All, "1", 8000);
        assert_eq!(
            worker
                .to_remote(&pod(running.clone()), None)
                .and_then(|i| i.endpoint),
            None
        );
        let proxy = client(RunpodWorkerAccess::Proxy, CloudType::All, "1", 8888);
        assert_eq!(
            proxy
                .to_remote(&pod(running), None)
                .and_then(|i| i.endpoint)
                .as_deref(),
            Some("https://7h9k2m4n6p-8888.proxy.runpod.net")
        );

        let created = example(
            &format!("/paths/~1v2~1pods/post/responses/201/{JSON}"),
            "pod",
        );
        let i = worker.to_remote(&pod(created), None).expect("created");
        assert_eq!(i.state, RemoteState::Starting);

        let list = example(
            &format!("/paths/~1v2~1pods/get/responses/200/{JSON}"),
            "pods",
        );
        let page = pods_page("t", &raw(200, &list)).expect("page");
        assert_eq!(page.pods.len(), 1);
        assert_eq!(page.next, None);
        // A user's pod: neither its name nor its env marks it as gpupool's.
        assert!(!is_ours(&page.pods[0], "gpupool-"));
        assert!(!is_ours(&page.pods[0], ""), "no env marker");
    }

    #[test]
    fn pods_are_ours_only_with_the_name_and_the_env_marker() {
        let p = |name: &str, marker: Value| {
            pod(json!({"id": "x", "name": name, "env": {"GPUPOOL_LABEL": marker, "A": "b"}}))
        };
        assert!(is_ours(
            &p("gpupool-c1-u", json!("gpupool-c1-u")),
            "gpupool-c1-"
        ));
        // Renamed by a user, or a user's pod named like ours, or a marker of another pod.
        assert!(!is_ours(
            &p("renamed", json!("gpupool-c1-u")),
            "gpupool-c1-"
        ));
        assert!(!is_ours(&p("gpupool-c1-u", Value::Null), "gpupool-c1-"));
        assert!(!is_ours(
            &p("gpupool-c1-u", json!("gpupool-c1-v")),
            "gpupool-c1-"
        ));
        assert!(!is_ours(
            &p("gpupool-c2-u", json!("gpupool-c2-u")),
            "gpupool-c1-"
        ));
        assert!(!is_ours(
            &pod(json!({"name": "gpupool-c1-u", "env": "x"})),
            "gpupool-c1-"
        ));
    }

    #[test]
    fn pod_states_and_error_is_not_starting() {
        let s = |status: &str, runtime: bool| {
            pod_state(&PodDto {
                status: Some(status.into()),
                runtime: runtime.then(RuntimeDto::default),
                ..PodDto::default()
            })
        };
        assert_eq!(s("RUNNING", true), RemoteState::Running);
        assert_eq!(s("RUNNING", false), RemoteState::Starting);
        assert_eq!(s("PROVISIONING", false), RemoteState::Starting);
        assert_eq!(s("STARTING", false), RemoteState::Starting);
        assert!(matches!(s("EXITED", false), RemoteState::Stopped(m) if m.starts_with("EXITED")));
        assert!(matches!(s("ERROR", false), RemoteState::Stopped(m) if m.starts_with("ERROR")));
        assert!(matches!(s("error", true), RemoteState::Stopped(_)));
        assert_eq!(s("TERMINATED", false), RemoteState::Terminated);
        assert_eq!(s("SOMETHING_NEW", false), RemoteState::Starting);
        assert_eq!(pod_state(&PodDto::default()), RemoteState::Starting);
    }

    #[test]
    fn public_tcp_endpoint_needs_a_reachable_address() {
        let c = client(RunpodWorkerAccess::PublicTcp, CloudType::All, "1", 8000);
        let with = |ports: Value| {
            c.to_remote(
                &pod(json!({"id": "abc", "status": "RUNNING", "runtime": {"ports": ports}})),
                None,
            )
            .and_then(|i| i.endpoint)
        };
        assert_eq!(
            with(json!([
                {"private": 8000, "public": 60001, "type": "http", "ip": "100.65.0.2"},
                {"private": 8000, "public": 1, "type": "tcp", "ip": "100.64.0.9"},
                {"private": 8000, "public": 2, "type": "tcp", "ip": "0.0.0.0"},
                {"private": 8000, "public": null, "type": "tcp", "ip": "213.173.1.2"},
                {"private": 22, "public": 3, "type": "tcp", "ip": "213.173.1.2"},
                {"private": 8000, "public": 40123, "type": "TCP", "ip": "213.173.1.2"},
                "garbage"
            ]))
            .as_deref(),
            Some("http://213.173.1.2:40123")
        );
        for bad in ["not an ip", "evil.example/x?", "user@213.173.1.2", ""] {
            let ports = json!([{"private": 8000, "public": 40123, "type": "tcp", "ip": bad}]);
            assert_eq!(with(ports), None, "{bad:?}");
        }
        let v6 = json!([{"private": 8000, "public": 40123, "type": "tcp", "ip": " 2001:db8::9 "}]);
        assert_eq!(with(v6).as_deref(), Some("http://[2001:db8::9]:40123"));
    }

    #[test]
    fn pages_follow_cursors_and_refuse_dead_ends() {
        let page = |v: Value| pods_page("t", &raw(200, &v)).map(|p| (p.pods.len(), p.next));
        assert_eq!(page(json!({"pods": [{}, {}]})).ok(), Some((2, None)));
        assert_eq!(page(json!([{}])).ok(), Some((1, None)));
        assert_eq!(
            page(json!({"pods": [{}], "pagination": {"hasNextPage": true, "nextCursor": "c2"}}))
                .ok(),
            Some((1, Some("c2".into())))
        );
        assert_eq!(
            page(json!({"pods": [], "pagination": {"hasNextPage": false, "nextCursor": "c2"}}))
                .ok(),
            Some((0, None))
        );
        assert_eq!(
            page(json!({"pods": [], "pagination": {"nextCursor": "c3"}})).ok(),
            Some((0, Some("c3".into())))
        );
        for bad in [
            json!({"pods": [], "pagination": {"hasNextPage": true}}),
            json!({"pods": [], "pagination": {"hasNextPage": true, "nextCursor": ""}}),
            json!({"title": "Not Found"}),
            json!({"pods": {}}),
            json!("pods"),
        ] {
            assert_eq!(
                page(bad.clone()).map_err(|e| e.label()),
                Err("Transient"),
                "{bad}"
            );
        }
    }

    #[test]
    fn undecodable_pod_bodies_are_never_quoted() {
        let body = RawResponse {
            status: StatusCode::OK,
            retry_after: None,
            body: Bytes::from_static(br#"{"env": {"GPUPOOL_SESSION_TOKEN": "st-secret"}, "#),
        };
        let e = decode_pod_body::<PodDto>("op", &body).expect_err("cut");
        assert_eq!(e.label(), "Transient");
        assert!(!e.to_string().contains("st-secret"), "{e}");
        assert!(e.to_string().contains("line 1"), "{e}");
    }

    #[test]
    fn published_errors_map_to_variants() {
        let r = Redactor::default();
        let doc = spec();
        let problem = |response: &str| {
            doc.pointer(&format!(
                "/components/responses/{response}/{PROBLEM}/examples"
            ))
            .and_then(Value::as_object)
            .and_then(|e| e.values().next())
            .map(|e| e["value"].clone())
            .unwrap_or_else(|| panic!("{response}"))
        };
        let class = |response: &str, verb: Verb| {
            let body = problem(response);
            let status = body["status"].as_u64().expect("status") as u16;
            rest_error("op", &raw(status, &body), &r, verb)
        };
        assert_eq!(
            class("UnauthorizedError", Verb::Read).label(),
            "Unauthorized"
        );
        assert!(
            class("UnauthorizedError", Verb::Read)
                .to_string()
                .contains("missing bearer token")
        );
        assert_eq!(class("ForbiddenError", Verb::Read).label(), "Unauthorized");
        assert_eq!(
            class("ForbiddenError", Verb::Create).label(),
            "InsufficientCapacity"
        );
        assert_eq!(class("BadRequestError", Verb::Create).label(), "Permanent");
        assert_eq!(class("NotFoundError", Verb::Read).label(), "NotFound");
        let e = class("UnprocessableEntityError", Verb::Create);
        assert_eq!(e.label(), "Permanent");
        assert!(e.to_string().contains("gpupool bug"), "{e}");
        assert_eq!(
            class("TooManyRequestsError", Verb::Read),
            ProviderError::RateLimited { retry_after: None }
        );
        assert_eq!(
            class("MethodNotAllowedError", Verb::Read).label(),
            "Permanent"
        );

        let capacity = json!({"title": "Bad Request", "status": 400,
            "detail": "There are no longer any instances available with the requested specifications. Please refresh and try again."});
        let e = rest_error("op", &raw(400, &capacity), &r, Verb::Create);
        assert_eq!(e.label(), "InsufficientCapacity");
        assert!(e.to_string().contains("no longer any instances"), "{e}");
        let unprocessable = json!({"title": "Unprocessable Entity", "status": 422,
            "detail": "Request validation failed.", "errors": ["$: additional properties 'bogus' not allowed"]});
        let e = rest_error("op", &raw(422, &unprocessable), &r, Verb::Create);
        assert!(e.to_string().contains("'bogus' not allowed"), "{e}");
        let balance =
            json!({"title": "Payment Required", "status": 402, "detail": "insufficient balance"});
        let e = rest_error("op", &raw(402, &balance), &r, Verb::Create);
        assert_eq!(e.label(), "Permanent");
        assert!(e.to_string().contains("balance is too low"), "{e}");
        for (status, label) in [
            (409, "Permanent"),
            (500, "Transient"),
            (503, "Transient"),
            (408, "Transient"),
            (410, "Permanent"),
        ] {
            assert_eq!(
                rest_error("op", &raw(status, &json!({})), &r, Verb::Delete).label(),
                label,
                "{status}"
            );
        }
        // A problem that quotes the key does not show it.
        let key = Credentials::new("rp-SECRET-key");
        let r = Redactor::new([&key]);
        let echo =
            json!({"title": "Unauthorized", "status": 401, "detail": "bad key rp-SECRET-key"});
        let e = rest_error("op", &raw(401, &echo), &r, Verb::Read);
        assert!(!e.to_string().contains("SECRET"), "{e}");
    }
}
