//! Vast.ai marketplace client ([`VastClient`]): search offers, rent one (`PUT /asks/{id}/`),
//! inspect, list by label and destroy instances, as `providers.md` §1 describes the API.
//!
//! Vast-specific decisions:
//! * offers are searched with the entry's filters server-side *and* re-checked here, because
//!   the server's filter semantics (string vs number values, `_` vs space in GPU names) are
//!   loose and an offer over the price cap must never be rented;
//! * the worker port is mapped with the docker option `"-p {port}:{port}": "1"` in `env`,
//!   and the instance runs with runtype `args` so the image's own entrypoint starts the worker;
//! * `cancel_unavail: true`, so an offer that cannot start now is refused (410) rather than
//!   turned into a stopped instance that bills for disk;
//! * a destroyed or unknown instance reads as `{"instances": null}`: that, a 404, and a delete
//!   answered "not found" all mean "gone".
//!
//! Wire DTOs stay private; every optional field is decoded leniently so one odd row never
//! fails a whole list.

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
};

use async_trait::async_trait;
use reqwest::{Method, StatusCode};
use rust_decimal::{Decimal, prelude::ToPrimitive};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use tracing::{debug, warn};
use url::Url;

use super::{
    CreateRequest, Credentials, InstanceProvider, Offer, ProviderError, ProviderKind,
    ProviderResult, RemoteInstance, RemoteState,
    http::{
        ApiClient, Call, DEFAULT_VAST_BASE_URL, HttpConfig, Idempotency, RawResponse, Redactor,
        WorkerShape, join_segments, lenient, money, parse_base_url, parse_price, status_error,
    },
    quota::destroy_lane,
};
use crate::crd::VastProvider;

/// Instances per page of `GET /api/v1/instances/` (the server's maximum).
const PAGE_LIMIT: u32 = 25;
/// Pages followed before giving up: 10 000 instances is far beyond any pool.
const MAX_PAGES: usize = 400;
/// Offers asked of the search; the cheapest come first, so this is plenty.
const OFFER_LIMIT: u32 = 64;

/// Where and how to reach Vast.ai.
#[derive(Clone, Debug)]
pub struct VastOptions {
    /// Host only, as the official CLI's `VAST_URL`; `/api/v0/...` is appended.
    pub base_url: String,
    pub http: HttpConfig,
}

impl Default for VastOptions {
    fn default() -> Self {
        Self {
            base_url: DEFAULT_VAST_BASE_URL.into(),
            http: HttpConfig::vast(),
        }
    }
}

/// One `vast` provider entry of a pool.
#[derive(Debug)]
pub struct VastClient {
    api: ApiClient,
    base: Url,
    gpu_names: Vec<String>,
    max_price: Decimal,
    /// Interruptible entries: the bid per machine-hour (Vast's `price`).
    bid: Option<Decimal>,
    min_reliability: f64,
    num_gpus: u32,
    countries: BTreeSet<String>,
    worker: WorkerShape,
}

impl VastClient {
    pub fn new(
        entry: &VastProvider,
        worker: WorkerShape,
        credentials: Credentials,
        options: VastOptions,
    ) -> ProviderResult<Self> {
        let base = parse_base_url("Vast.ai", &options.base_url)?;
        let max_price = parse_price("vast maxPricePerHour", &entry.max_price_per_hour)?;
        let num_gpus = u32::try_from(entry.num_gpus)
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| {
                ProviderError::Permanent(format!("invalid numGpus {}", entry.num_gpus))
            })?;
        if !(0.0..=1.0).contains(&entry.min_reliability) {
            return Err(ProviderError::Permanent(format!(
                "invalid minReliability {}",
                entry.min_reliability
            )));
        }
        if entry.gpu_names.is_empty() {
            return Err(ProviderError::Permanent("vast gpuNames is empty".into()));
        }
        Ok(Self {
            api: ApiClient::new("vast", credentials, options.http)?,
            base,
            gpu_names: entry.gpu_names.clone(),
            max_price,
            bid: entry.bid_per_hour.map(|b| b.amount()),
            min_reliability: entry.min_reliability,
            num_gpus,
            countries: entry
                .countries
                .iter()
                .map(|c| c.to_ascii_uppercase())
                .collect(),
            worker,
        })
    }

    fn url(&self, segments: &[&str]) -> ProviderResult<Url> {
        join_segments(&self.base, segments)
    }

    /// The body of `POST /api/v0/bundles/`.
    fn search_body(&self) -> Value {
        let mut body = json!({
            "gpu_name": {"in": self.gpu_names},
            "dph_total": {"lte": self.max_price.to_f64().unwrap_or(0.0)},
            "reliability": {"gte": self.min_reliability},
            "num_gpus": {"eq": self.num_gpus},
            "direct_port_count": {"gte": 1},
            "rentable": {"eq": true},
            "verified": {"eq": true},
            "rented": {"eq": false},
            "type": if self.bid.is_some() { "bid" } else { "on-demand" },
            "allocated_storage": self.worker.disk_gb,
            "order": [["dph_total", "asc"]],
            "limit": OFFER_LIMIT,
        });
        if !self.countries.is_empty()
            && let Some(map) = body.as_object_mut()
        {
            map.insert("geolocation".into(), json!({"in": self.countries}));
        }
        body
    }

    /// The entry's limits, checked again on what the server returned.
    fn accept_offer(&self, dto: &OfferDto) -> Option<Offer> {
        let id = dto.id.or(dto.ask_contract_id)?;
        let gpu_name = dto.gpu_name.as_deref()?.trim();
        if !self
            .gpu_names
            .iter()
            .any(|want| same_gpu_name(want, gpu_name))
        {
            return None;
        }
        if dto.num_gpus? != u64::from(self.num_gpus) {
            return None;
        }
        let listed = money(dto.dph_total?)?;
        if listed > self.max_price {
            return None;
        }
        // An interruptible machine bills at the bid, which must reach the host's floor.
        let price = match self.bid {
            Some(bid) if dto.min_bid.and_then(money).is_some_and(|floor| floor > bid) => {
                return None;
            }
            Some(bid) => bid,
            None => listed,
        };
        let reliability = dto.reliability.or(dto.reliability2);
        match reliability {
            Some(r) if r < self.min_reliability => return None,
            None if self.min_reliability > 0.0 => return None,
            _ => {}
        }
        if dto.direct_port_count.is_some_and(|n| n < 1.0)
            || dto.rentable == Some(false)
            || dto.rented == Some(true)
            || dto.verification.as_deref().is_some_and(|v| v != "verified")
        {
            return None;
        }
        // An unreadable location is left to the server-side filter; a readable one that is
        // not allowed is refused.
        if !self.countries.is_empty()
            && let Some(code) = dto.geolocation.as_deref().and_then(country_code)
            && !self.countries.contains(&code)
        {
            return None;
        }
        Some(Offer {
            id: id.to_string(),
            gpu_name: gpu_name.to_string(),
            num_gpus: self.num_gpus,
            price_per_hour: price,
            region: dto.geolocation.clone().filter(|g| !g.trim().is_empty()),
            reliability,
        })
    }

    fn to_remote(&self, dto: &InstanceDto, fallback_id: Option<&str>) -> Option<RemoteInstance> {
        let id = dto
            .id
            .map(|i| i.to_string())
            .or_else(|| fallback_id.map(str::to_string))?;
        Some(RemoteInstance {
            id,
            label: dto.label.clone().filter(|l| !l.is_empty()),
            state: instance_state(dto),
            endpoint: worker_endpoint(dto, self.worker.port),
            gpu_name: dto.gpu_name.clone(),
            num_gpus: dto.num_gpus.and_then(|n| u32::try_from(n).ok()),
            price_per_hour: dto.dph_total.and_then(money),
            region: dto.geolocation.clone().filter(|g| !g.trim().is_empty()),
            started_at: dto
                .start_date
                .filter(|s| *s > 0.0)
                .and_then(|s| jiff::Timestamp::from_millisecond((s * 1000.0) as i64).ok()),
        })
    }

    /// Every instance of the account matching `filters`, all pages.
    async fn list_instances(&self, filters: &Value) -> ProviderResult<Vec<InstanceDto>> {
        let mut after: Option<String> = None;
        let mut seen_tokens = BTreeSet::new();
        let mut rows = Vec::new();
        for _ in 0..MAX_PAGES {
            let mut url = self.url(&["api", "v1", "instances", ""])?;
            {
                let mut q = url.query_pairs_mut();
                q.append_pair("select_filters", &filters.to_string());
                q.append_pair("order_by", r#"[{"col":"id","dir":"asc"}]"#);
                q.append_pair("limit", &PAGE_LIMIT.to_string());
                if let Some(token) = &after {
                    q.append_pair("after_token", token);
                }
            }
            let call = Call {
                op: "vast.list_instances",
                method: Method::GET,
                url,
                body: None,
                idempotency: Idempotency::Idempotent,
            };
            let page: ListPageDto = self
                .api
                .execute(&call, |raw, r| {
                    if raw.is_success() {
                        raw.json("vast.list_instances", r)
                    } else {
                        Err(vast_error("vast.list_instances", raw, r))
                    }
                })
                .await?;
            rows.extend(page.instances.into_iter().filter_map(|v| {
                // The serde message may quote the row: not logged.
                serde_json::from_value::<InstanceDto>(v)
                    .map_err(|_| warn!("skipping an unreadable Vast instance row"))
                    .ok()
            }));
            match page.next_token.filter(|t| !t.is_empty()) {
                None => return Ok(rows),
                Some(token) => {
                    if !seen_tokens.insert(token.clone()) {
                        return Err(ProviderError::Permanent(
                            "vast.list_instances: pagination returned the same next_token twice"
                                .into(),
                        ));
                    }
                    after = Some(token);
                }
            }
        }
        Err(ProviderError::Permanent(format!(
            "vast.list_instances: more than {MAX_PAGES} pages"
        )))
    }
}

#[async_trait]
impl InstanceProvider for VastClient {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Vast
    }

    async fn offers(&self) -> ProviderResult<Vec<Offer>> {
        let body = self.search_body();
        let call = Call {
            op: "vast.search_offers",
            method: Method::POST,
            url: self.url(&["api", "v0", "bundles", ""])?,
            body: Some(&body),
            // A search changes nothing.
            idempotency: Idempotency::Idempotent,
        };
        let found: SearchDto = self
            .api
            .execute(&call, |raw, r| {
                if raw.is_success() {
                    raw.json("vast.search_offers", r)
                } else {
                    Err(vast_error("vast.search_offers", raw, r))
                }
            })
            .await?;
        let total = found.offers.len();
        let mut offers: Vec<Offer> = found
            .offers
            .into_iter()
            .filter_map(|v| serde_json::from_value::<OfferDto>(v).ok())
            .filter_map(|dto| self.accept_offer(&dto))
            .collect();
        rank_offers(&mut offers);
        debug!(returned = total, accepted = offers.len(), "vast offers");
        Ok(offers)
    }

    async fn create(&self, offer: &Offer, req: &CreateRequest) -> ProviderResult<RemoteInstance> {
        let ask_id: u64 = offer.id.parse().map_err(|_| {
            ProviderError::Permanent(format!(
                "vast.create: offer id {:?} is not a Vast ask id",
                offer.id
            ))
        })?;
        let mut body = create_body(req)?;
        if let (Some(bid), Some(map)) = (self.bid, body.as_object_mut()) {
            map.insert("price".into(), json!(bid.to_f64().unwrap_or(0.0)));
        }
        let call = Call {
            op: "vast.create_instance",
            method: Method::PUT,
            url: self.url(&["api", "v0", "asks", &ask_id.to_string(), ""])?,
            body: Some(&body),
            idempotency: Idempotency::NotIdempotent,
        };
        let id = self
            .api
            .execute_with_secrets(&call, &req.secrets(), classify_create)
            .await?;
        Ok(RemoteInstance {
            id: id.to_string(),
            label: Some(req.label.clone()),
            state: RemoteState::Starting,
            endpoint: None,
            gpu_name: Some(offer.gpu_name.clone()),
            num_gpus: Some(offer.num_gpus),
            price_per_hour: Some(offer.price_per_hour),
            region: offer.region.clone(),
            started_at: None,
        })
    }

    async fn get(&self, id: &str) -> ProviderResult<RemoteInstance> {
        let numeric = instance_id(id)?;
        let mut url = self.url(&["api", "v0", "instances", &numeric.to_string(), ""])?;
        url.query_pairs_mut().append_pair("owner", "me");
        let call = Call {
            op: "vast.show_instance",
            method: Method::GET,
            url,
            body: None,
            idempotency: Idempotency::Idempotent,
        };
        let dto = self
            .api
            .execute(&call, |raw, r| classify_show(raw, r, numeric))
            .await?;
        self.to_remote(&dto, Some(id))
            .ok_or_else(|| ProviderError::NotFound(format!("vast instance {id}")))
    }

    async fn delete(&self, id: &str) -> ProviderResult<()> {
        let numeric = instance_id(id)?;
        let body = json!({});
        let call = Call {
            op: "vast.destroy_instance",
            method: Method::DELETE,
            url: self.url(&["api", "v0", "instances", &numeric.to_string(), ""])?,
            body: Some(&body),
            // Destroying twice is harmless: the second answer is "not found", which is Ok.
            idempotency: Idempotency::Idempotent,
        };
        // The machine bills until this call is made: it goes before any other.
        destroy_lane(self.api.execute(&call, classify_destroy)).await
    }

    async fn list_labeled(&self, prefix: &str) -> ProviderResult<Vec<RemoteInstance>> {
        let rows = self.list_instances(&json!({})).await?;
        Ok(rows
            .iter()
            .filter(|r| r.label.as_deref().is_some_and(|l| l.starts_with(prefix)))
            .filter_map(|r| self.to_remote(r, None))
            .collect())
    }

    async fn find_by_label(&self, label: &str) -> ProviderResult<Option<RemoteInstance>> {
        // The exact label filter of the official CLI (`label in [..]`); checked again here.
        let rows = self
            .list_instances(&json!({"label": {"in": [label]}}))
            .await?;
        Ok(rows
            .iter()
            .filter(|r| r.label.as_deref() == Some(label))
            .find_map(|r| self.to_remote(r, None)))
    }
}

/// Cheapest first; among equal prices the more reliable host, then the lower id (stable).
fn rank_offers(offers: &mut [Offer]) {
    offers.sort_by(|a, b| {
        a.price_per_hour
            .cmp(&b.price_per_hour)
            .then_with(|| {
                b.reliability
                    .unwrap_or(0.0)
                    .total_cmp(&a.reliability.unwrap_or(0.0))
            })
            .then_with(|| {
                let (x, y) = (a.id.parse::<u64>().ok(), b.id.parse::<u64>().ok());
                x.cmp(&y)
            })
    });
}

/// The body of `PUT /api/v0/asks/{id}/`.
fn create_body(req: &CreateRequest) -> ProviderResult<Value> {
    if req.label.len() > 256 {
        return Err(ProviderError::Permanent(
            "vast.create: label longer than 256".into(),
        ));
    }
    if req.image.trim().is_empty() || req.image.len() > 1024 {
        return Err(ProviderError::Permanent(
            "vast.create: image must be 1 to 1024 characters".into(),
        ));
    }
    let mut env = Map::new();
    for (k, v) in &req.env {
        // Vast reads keys starting with '-' as docker options: only plain names are
        // environment variables, anything else could inject options.
        if !is_env_name(k) {
            return Err(ProviderError::Permanent(format!(
                "vast.create: {k:?} is not a valid environment variable name"
            )));
        }
        env.insert(k.clone(), Value::String(v.clone()));
    }
    let port = req.port;
    env.insert(format!("-p {port}:{port}"), Value::String("1".into()));
    Ok(json!({
        "client_id": "me",
        "image": req.image,
        "env": env,
        "disk": req.disk_gb,
        "label": req.label,
        // `args` keeps the image's ENTRYPOINT and CMD (no ssh/jupyter injection).
        "runtype": "args",
        "cancel_unavail": true,
    }))
}

fn is_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn instance_id(id: &str) -> ProviderResult<u64> {
    id.trim()
        .parse()
        .map_err(|_| ProviderError::Permanent(format!("{id:?} is not a Vast instance id")))
}

/// GPU names match ignoring case and `_` versus space ("RTX_4090" is "RTX 4090").
fn same_gpu_name(a: &str, b: &str) -> bool {
    let norm = |s: &str| s.trim().replace('_', " ").to_ascii_lowercase();
    norm(a) == norm(b)
}

/// The two-letter country code at the end of a Vast location (`"Washington, US"`).
fn country_code(geolocation: &str) -> Option<String> {
    let last = geolocation.rsplit(',').next()?.trim();
    (last.len() == 2 && last.chars().all(|c| c.is_ascii_alphabetic()))
        .then(|| last.to_ascii_uppercase())
}

/// The readiness rule of Vast's own tooling: intended and actual status both `running`.
fn instance_state(dto: &InstanceDto) -> RemoteState {
    // Statuses are short words; a longer one is cut, as it may be quoted in a message.
    let norm = |s: &Option<String>| {
        s.as_deref().map(|v| {
            v.trim()
                .chars()
                .take(64)
                .collect::<String>()
                .to_ascii_lowercase()
        })
    };
    let actual = norm(&dto.actual_status);
    let intended = norm(&dto.intended_status);
    let cur = norm(&dto.cur_state);
    let gone = |s: &Option<String>| matches!(s.as_deref(), Some("destroyed" | "unloaded"));
    if gone(&cur) || gone(&actual) || gone(&intended) {
        return RemoteState::Terminated;
    }
    let detail = |what: &str| {
        let mut m = what.to_string();
        if let Some(msg) = dto
            .status_msg
            .as_deref()
            .map(str::trim)
            .filter(|m| !m.is_empty())
        {
            m.push_str(": ");
            m.extend(msg.chars().take(200));
        }
        m
    };
    match actual.as_deref() {
        Some("running") if intended.as_deref() == Some("running") => RemoteState::Running,
        Some("running") => RemoteState::Stopped(detail(&format!(
            "running but intended {}",
            intended.as_deref().unwrap_or("unknown")
        ))),
        None | Some("" | "loading" | "created" | "scheduling" | "rebooting") => {
            RemoteState::Starting
        }
        Some(s @ ("exited" | "stopped" | "offline" | "frozen" | "unknown")) => {
            RemoteState::Stopped(detail(s))
        }
        // A status this client does not know yet: not ready, and the provision timeout bounds
        // how long that can last.
        Some(_) => RemoteState::Starting,
    }
}

/// `http://{public_ipaddr}:{HostPort of "{port}/tcp"}`, once Vast has mapped the port.
fn worker_endpoint(dto: &InstanceDto, port: u16) -> Option<String> {
    // An address, not any text: it becomes the worker's URL.
    let ip: IpAddr = dto.public_ipaddr.as_deref()?.trim().parse().ok()?;
    let binding = dto.ports.as_ref()?.get(format!("{port}/tcp"))?.get(0)?;
    let host_port: u16 = match binding.get("HostPort")? {
        Value::String(s) => s.trim().parse().ok()?,
        Value::Number(n) => u16::try_from(n.as_u64()?).ok()?,
        _ => return None,
    };
    if host_port == 0 {
        return None;
    }
    Some(format!("http://{}", SocketAddr::new(ip, host_port)))
}

/// A Vast error body: `{success, error, msg}`, or `{detail}`, or `{message}`, or plain text.
fn error_parts(raw: &RawResponse, redactor: &Redactor) -> (Option<String>, String) {
    let parsed: Option<ErrorDto> = serde_json::from_slice(&raw.body).ok();
    // Quoted in messages like the text: redacted and short.
    let code = parsed
        .as_ref()
        .and_then(|e| e.error.as_deref())
        .filter(|c| !c.trim().is_empty())
        .map(|c| redactor.excerpt(c.as_bytes()));
    let text = parsed
        .and_then(|e| e.msg.or(e.message).or(e.detail))
        .map(|t| redactor.excerpt(t.as_bytes()))
        .unwrap_or_else(|| redactor.excerpt(&raw.body));
    (code, text)
}

fn vast_error(op: &str, raw: &RawResponse, redactor: &Redactor) -> ProviderError {
    let (code, text) = error_parts(raw, redactor);
    match status_error(op, raw, redactor) {
        ProviderError::RateLimited { retry_after } => ProviderError::RateLimited { retry_after },
        other => {
            let msg = match code {
                Some(code) => format!("{op}: HTTP {}: {code}: {text}", raw.status.as_u16()),
                None => format!("{op}: HTTP {}: {text}", raw.status.as_u16()),
            };
            match other {
                ProviderError::Unauthorized(_) => ProviderError::Unauthorized(msg),
                ProviderError::NotFound(_) => ProviderError::NotFound(msg),
                ProviderError::Transient(_) => ProviderError::Transient(msg),
                _ => ProviderError::Permanent(msg),
            }
        }
    }
}

/// `PUT /asks/{id}/`: the new instance id, or why not.
fn classify_create(raw: &RawResponse, redactor: &Redactor) -> ProviderResult<u64> {
    const OP: &str = "vast.create_instance";
    let (code, text) = error_parts(raw, redactor);
    let no_such_ask = code.as_deref() == Some("no_such_ask") || text.contains("no_such_ask");
    if raw.is_success() {
        let dto: CreateDto = raw.json(OP, redactor)?;
        if dto.success == Some(false) {
            return Err(if no_such_ask {
                ProviderError::InsufficientCapacity(format!("{OP}: {text}"))
            } else {
                ProviderError::Permanent(format!("{OP}: {text}"))
            });
        }
        // 200 without an id: the instance may exist; the caller adopts it by label.
        return dto.new_contract.ok_or_else(|| {
            ProviderError::Transient(format!(
                "{OP}: success without new_contract: {}",
                redactor.excerpt(&raw.body)
            ))
        });
    }
    match raw.status {
        // 404 "no_such_ask ... is not available", 410 "... is no longer available".
        StatusCode::NOT_FOUND | StatusCode::GONE => Err(ProviderError::InsufficientCapacity(
            format!("{OP}: HTTP {}: {text}", raw.status.as_u16()),
        )),
        StatusCode::BAD_REQUEST if no_such_ask => Err(ProviderError::InsufficientCapacity(
            format!("{OP}: HTTP 400: {text}"),
        )),
        // 403 invalid_args "Offer ... is not your own" is about the offer, not the key.
        StatusCode::FORBIDDEN if code.as_deref() == Some("invalid_args") => {
            Err(ProviderError::Permanent(format!("{OP}: HTTP 403: {text}")))
        }
        _ => Err(vast_error(OP, raw, redactor)),
    }
}

/// `GET /instances/{id}/`: `{"instances": null}` (or 404) is gone.
fn classify_show(raw: &RawResponse, redactor: &Redactor, id: u64) -> ProviderResult<InstanceDto> {
    const OP: &str = "vast.show_instance";
    if !raw.is_success() {
        return Err(vast_error(OP, raw, redactor));
    }
    let dto: ShowDto = raw.json(OP, redactor)?;
    let found = match dto.instances {
        None | Some(Value::Null) => None,
        // The legacy list shape, defensively: pick the row with this id.
        Some(Value::Array(rows)) => rows.into_iter().find(|r| {
            r.get("id")
                .and_then(|v| v.as_u64().or_else(|| v.as_str()?.parse().ok()))
                == Some(id)
        }),
        Some(v) => Some(v),
    };
    let value = found
        .ok_or_else(|| ProviderError::NotFound(format!("vast instance {id} does not exist")))?;
    serde_json::from_value(value).map_err(|e| {
        ProviderError::Transient(format!(
            "{OP}: unexpected instance object: {}",
            redactor.excerpt(e.to_string().as_bytes())
        ))
    })
}

/// `DELETE /instances/{id}/`: success, and "not found" in any of its forms, are Ok.
fn classify_destroy(raw: &RawResponse, redactor: &Redactor) -> ProviderResult<()> {
    const OP: &str = "vast.destroy_instance";
    let (code, text) = error_parts(raw, redactor);
    let gone = matches!(code.as_deref(), Some("not_found" | "no_such_instance"))
        || text.to_ascii_lowercase().contains("not found");
    if raw.is_success() {
        let success = serde_json::from_slice::<ErrorDto>(&raw.body)
            .ok()
            .and_then(|d| d.success);
        return match success {
            Some(false) if !gone => Err(ProviderError::Permanent(format!("{OP}: {text}"))),
            _ => Ok(()),
        };
    }
    // A refused key or a throttle says nothing about the machine, whatever its text says:
    // reading it as "gone" would release the instance while it still bills.
    let refused = matches!(
        raw.status,
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN | StatusCode::TOO_MANY_REQUESTS
    );
    if raw.status == StatusCode::NOT_FOUND || (raw.status.is_client_error() && gone && !refused) {
        return Ok(());
    }
    Err(vast_error(OP, raw, redactor))
}

// ---- wire DTOs (private) ----

#[derive(Deserialize, Debug, Default)]
struct SearchDto {
    /// An array per the schema; the published example has a single object, accepted too.
    #[serde(default, deserialize_with = "offers_list")]
    offers: Vec<Value>,
}

fn offers_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Value>, D::Error> {
    Ok(match Value::deserialize(d)? {
        Value::Array(items) => items,
        v @ Value::Object(_) => vec![v],
        _ => Vec::new(),
    })
}

#[derive(Deserialize, Debug, Default)]
#[serde(default)]
struct OfferDto {
    #[serde(deserialize_with = "lenient::opt_u64")]
    id: Option<u64>,
    #[serde(deserialize_with = "lenient::opt_u64")]
    ask_contract_id: Option<u64>,
    #[serde(deserialize_with = "lenient::opt_string")]
    gpu_name: Option<String>,
    #[serde(deserialize_with = "lenient::opt_u64")]
    num_gpus: Option<u64>,
    #[serde(deserialize_with = "lenient::opt_f64")]
    dph_total: Option<f64>,
    #[serde(deserialize_with = "lenient::opt_f64")]
    min_bid: Option<f64>,
    #[serde(deserialize_with = "lenient::opt_f64")]
    reliability: Option<f64>,
    #[serde(deserialize_with = "lenient::opt_f64")]
    reliability2: Option<f64>,
    #[serde(deserialize_with = "lenient::opt_string")]
    geolocation: Option<String>,
    #[serde(deserialize_with = "lenient::opt_f64")]
    direct_port_count: Option<f64>,
    #[serde(deserialize_with = "lenient::opt_bool")]
    rentable: Option<bool>,
    #[serde(deserialize_with = "lenient::opt_bool")]
    rented: Option<bool>,
    #[serde(deserialize_with = "lenient::opt_string")]
    verification: Option<String>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(default)]
struct CreateDto {
    #[serde(deserialize_with = "lenient::opt_bool")]
    success: Option<bool>,
    #[serde(deserialize_with = "lenient::opt_u64")]
    new_contract: Option<u64>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(default)]
struct ShowDto {
    instances: Option<Value>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(default)]
struct ListPageDto {
    #[serde(deserialize_with = "lenient::vec_skip_bad")]
    instances: Vec<Value>,
    #[serde(deserialize_with = "lenient::opt_string")]
    next_token: Option<String>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(default)]
struct InstanceDto {
    #[serde(deserialize_with = "lenient::opt_u64")]
    id: Option<u64>,
    #[serde(deserialize_with = "lenient::opt_string")]
    label: Option<String>,
    #[serde(deserialize_with = "lenient::opt_string")]
    actual_status: Option<String>,
    #[serde(deserialize_with = "lenient::opt_string")]
    intended_status: Option<String>,
    #[serde(deserialize_with = "lenient::opt_string")]
    cur_state: Option<String>,
    #[serde(deserialize_with = "lenient::opt_string")]
    status_msg: Option<String>,
    #[serde(deserialize_with = "lenient::opt_string")]
    public_ipaddr: Option<String>,
    /// `{"8000/tcp": [{"HostIp": "0.0.0.0", "HostPort": "41234"}]}` while running.
    #[serde(deserialize_with = "lenient::opt_value")]
    ports: Option<Value>,
    #[serde(deserialize_with = "lenient::opt_string")]
    gpu_name: Option<String>,
    #[serde(deserialize_with = "lenient::opt_u64")]
    num_gpus: Option<u64>,
    #[serde(deserialize_with = "lenient::opt_f64")]
    dph_total: Option<f64>,
    #[serde(deserialize_with = "lenient::opt_string")]
    geolocation: Option<String>,
    #[serde(deserialize_with = "lenient::opt_f64")]
    start_date: Option<f64>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(default)]
struct ErrorDto {
    #[serde(deserialize_with = "lenient::opt_bool")]
    success: Option<bool>,
    #[serde(deserialize_with = "lenient::opt_string")]
    error: Option<String>,
    #[serde(deserialize_with = "lenient::opt_string")]
    msg: Option<String>,
    #[serde(deserialize_with = "lenient::opt_string")]
    message: Option<String>,
    #[serde(deserialize_with = "lenient::opt_string")]
    detail: Option<String>,
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
                "/tests/fixtures/providers/vast/",
                $name
            ))
        };
    }

    fn client(
        gpu: &str,
        max_price: &str,
        num_gpus: i32,
        countries: &[&str],
        port: u16,
    ) -> VastClient {
        let entry = VastProvider {
            gpu_names: vec![gpu.into()],
            max_price_per_hour: max_price.into(),
            min_reliability: 0.99,
            num_gpus,
            countries: countries.iter().map(|c| c.to_string()).collect(),
            bid_per_hour: None,
            credentials_secret_ref: SecretKeyRef::new("s", "k"),
        };
        VastClient::new(
            &entry,
            WorkerShape { port, disk_gb: 10 },
            Credentials::new("test-key"),
            VastOptions::default(),
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

    fn instance(json: &str) -> InstanceDto {
        let show: ShowDto = serde_json::from_str(json).expect("show");
        serde_json::from_value(show.instances.expect("instance")).expect("dto")
    }

    #[test]
    fn published_offer_example_parses_and_is_rechecked() {
        // The example has `offers` as one object; it must still be read.
        let found: SearchDto =
            serde_json::from_str(fixture!("search_offers.200.json")).expect("parse");
        assert_eq!(found.offers.len(), 1);
        let dto: OfferDto = serde_json::from_value(found.offers[0].clone()).expect("offer");

        let c = client("Imaginary RTX 9999", "0.25", 4, &["AT"], 8000);
        let offer = c.accept_offer(&dto).expect("accepted");
        assert_eq!(offer.id, "12345678");
        assert_eq!(offer.gpu_name, "Imaginary RTX 9999");
        assert_eq!(offer.num_gpus, 4);
        assert_eq!(offer.price_per_hour.to_string(), "0.234567");
        assert_eq!(offer.region.as_deref(), Some("Atlantis, AT"));
        assert_eq!(offer.reliability, Some(0.9999));

        // Over the cap, other GPU, other count, other country: refused here whatever the
        // server-side filter did.
        assert!(
            client("Imaginary RTX 9999", "0.2345", 4, &[], 8000)
                .accept_offer(&dto)
                .is_none()
        );
        assert!(
            client("RTX 4090", "1", 4, &[], 8000)
                .accept_offer(&dto)
                .is_none()
        );
        assert!(
            client("Imaginary RTX 9999", "1", 1, &[], 8000)
                .accept_offer(&dto)
                .is_none()
        );
        assert!(
            client("Imaginary RTX 9999", "1", 4, &["US"], 8000)
                .accept_offer(&dto)
                .is_none()
        );
        // Underscores as the CLI writes them match spaces.
        assert!(
            client("imaginary_rtx_9999", "1", 4, &[], 8000)
                .accept_offer(&dto)
                .is_some()
        );
    }

    #[test]
    fn an_interruptible_entry_searches_bids_prices_at_its_bid_and_sends_it() {
        let mut c = client("Imaginary RTX 9999", "0.25", 4, &["AT"], 8000);
        c.bid = Some("0.09".parse().unwrap());
        assert_eq!(c.search_body()["type"], "bid");
        let found: SearchDto =
            serde_json::from_str(fixture!("search_offers.200.json")).expect("parse");
        let mut dto: OfferDto = serde_json::from_value(found.offers[0].clone()).expect("offer");
        dto.min_bid = Some(0.05);
        let offer = c.accept_offer(&dto).expect("the bid reaches the floor");
        assert_eq!(
            offer.price_per_hour.to_string(),
            "0.09",
            "billed at the bid"
        );
        dto.min_bid = Some(0.1);
        assert!(c.accept_offer(&dto).is_none(), "a floor above the bid");
    }

    #[test]
    fn search_body_carries_the_entry_filters() {
        let c = client("RTX 4090", "0.40", 2, &["US", "ca"], 8000);
        let body = c.search_body();
        assert_eq!(body["gpu_name"], json!({"in": ["RTX 4090"]}));
        assert_eq!(body["dph_total"], json!({"lte": 0.4}));
        assert_eq!(body["num_gpus"], json!({"eq": 2}));
        assert_eq!(body["reliability"], json!({"gte": 0.99}));
        assert_eq!(body["direct_port_count"], json!({"gte": 1}));
        assert_eq!(body["geolocation"], json!({"in": ["CA", "US"]}));
        assert_eq!(body["type"], "on-demand");
        assert_eq!(body["allocated_storage"], 10);
        assert_eq!(body["order"], json!([["dph_total", "asc"]]));
        for key in ["rentable", "verified"] {
            assert_eq!(body[key], json!({"eq": true}));
        }
        assert_eq!(body["rented"], json!({"eq": false}));
    }

    #[test]
    fn published_single_instance_example_maps() {
        let dto = instance(fixture!("show_instance.200.json"));
        let c = client("RTX A5000", "2", 1, &[], 8080);
        let i = c.to_remote(&dto, None).expect("instance");
        assert_eq!(i.id, "883");
        assert_eq!(i.state, RemoteState::Running);
        // That example's `ports` is a list of ints (a documentation error): no endpoint, no
        // failure.
        assert_eq!(i.endpoint, None);
        assert_eq!(i.gpu_name.as_deref(), Some("RTX A5000"));
        assert_eq!(i.num_gpus, Some(1));
        assert_eq!(
            i.price_per_hour.map(|p| p.to_string()).as_deref(),
            Some("1.002074")
        );
        assert_eq!(i.region.as_deref(), Some("Washington, US"));
        assert_eq!(i.label, None);
        assert_eq!(i.started_at.map(|t| t.as_second()), Some(1_761_008_618));
    }

    #[test]
    fn published_list_example_maps_with_endpoint() {
        let page: ListPageDto =
            serde_json::from_str(fixture!("show_instances_v1.200.json")).expect("page");
        assert_eq!(
            page.next_token.as_deref(),
            Some("eyJ2YWx1ZXMiOiB7ImlkIjogMTIzfX0=")
        );
        let dto: InstanceDto = serde_json::from_value(page.instances[0].clone()).expect("row");
        let i = client("RTX 4090", "1", 1, &[], 8888)
            .to_remote(&dto, None)
            .expect("instance");
        assert_eq!(i.id, "312");
        assert_eq!(i.label.as_deref(), Some("ML Training Job 2025"));
        assert_eq!(i.state, RemoteState::Running);
        assert_eq!(i.endpoint.as_deref(), Some("http://192.0.2.45:8888"));
        assert_eq!(
            i.price_per_hour.map(|p| p.to_string()).as_deref(),
            Some("0.8021")
        );
        // The worker port was not mapped on this machine.
        assert_eq!(
            client("RTX 4090", "1", 1, &[], 8000)
                .to_remote(&dto, None)
                .and_then(|i| i.endpoint),
            None
        );

        let v0: ListPageDto =
            serde_json::from_str(fixture!("show_instances_v0.200.hello-world.json")).expect("v0");
        assert!(v0.instances.is_empty() && v0.next_token.is_none());
    }

    #[test]
    fn loading_instance_is_starting() {
        let dto = instance(fixture!("show_instance.200.loading.hello-world.json"));
        assert_eq!(instance_state(&dto), RemoteState::Starting);
    }

    #[test]
    fn state_follows_the_readiness_rule() {
        let s = |actual: Option<&str>, intended: &str, cur: &str| {
            instance_state(&InstanceDto {
                actual_status: actual.map(str::to_string),
                intended_status: Some(intended.into()),
                cur_state: Some(cur.into()),
                status_msg: Some("oci runtime error".into()),
                ..InstanceDto::default()
            })
        };
        assert_eq!(
            s(Some("running"), "running", "running"),
            RemoteState::Running
        );
        assert!(matches!(
            s(Some("running"), "stopped", "running"),
            RemoteState::Stopped(_)
        ));
        for starting in [None, Some("loading"), Some("created"), Some("scheduling")] {
            assert_eq!(s(starting, "running", "running"), RemoteState::Starting);
        }
        for stopped in ["exited", "stopped", "offline", "frozen", "unknown"] {
            match s(Some(stopped), "running", "running") {
                RemoteState::Stopped(msg) => {
                    assert!(
                        msg.starts_with(stopped) && msg.contains("oci runtime"),
                        "{msg}"
                    )
                }
                other => panic!("{stopped}: {other:?}"),
            }
        }
        assert_eq!(
            s(Some("running"), "running", "unloaded"),
            RemoteState::Terminated
        );
        assert_eq!(
            s(Some("destroyed"), "stopped", "stopped"),
            RemoteState::Terminated
        );
        // A status of megabytes is not quoted whole.
        match s(Some("running"), &"x".repeat(100_000), "running") {
            RemoteState::Stopped(msg) => assert!(msg.len() < 300, "{} bytes", msg.len()),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn create_outcomes_from_the_published_examples() {
        let r = Redactor::default();
        assert_eq!(
            classify_create(&raw(200, fixture!("create_instance.200.json")), &r),
            Ok(1_234_568)
        );
        assert_eq!(
            classify_create(
                &raw(200, fixture!("create_instance.200.hello-world.json")),
                &r
            ),
            Ok(12_345_678)
        );
        for (code, body) in [
            (404, fixture!("create_instance.404.json")),
            (410, fixture!("create_instance.410.json")),
        ] {
            let e = classify_create(&raw(code, body), &r).expect_err("capacity");
            assert_eq!(e.label(), "InsufficientCapacity", "{code}: {e}");
            assert!(e.to_string().contains("no_such_ask"));
        }
        assert_eq!(
            classify_create(&raw(400, fixture!("create_instance.400.json")), &r)
                .map_err(|e| e.label()),
            Err("Permanent")
        );
        assert_eq!(
            classify_create(&raw(403, fixture!("create_instance.403.json")), &r)
                .map_err(|e| e.label()),
            Err("Permanent")
        );
        assert_eq!(
            classify_create(&raw(429, fixture!("create_instance.429.json")), &r),
            Err(ProviderError::RateLimited { retry_after: None })
        );
        assert_eq!(
            classify_create(&raw(401, fixture!("show_instance.401.json")), &r)
                .map_err(|e| e.label()),
            Err("Unauthorized")
        );
        // A 200 that says no, and a 200 without an id (ambiguous: adopt by label).
        assert_eq!(
            classify_create(
                &raw(
                    200,
                    r#"{"success":false,"error":"no_such_ask","msg":"gone"}"#
                ),
                &r
            )
            .map_err(|e| e.label()),
            Err("InsufficientCapacity")
        );
        assert_eq!(
            classify_create(&raw(200, r#"{"success":true}"#), &r).map_err(|e| e.label()),
            Err("Transient")
        );
        assert_eq!(
            classify_create(&raw(200, "<html>"), &r).map_err(|e| e.label()),
            Err("Transient")
        );
    }

    #[test]
    fn destroy_outcomes_from_the_published_examples() {
        let r = Redactor::default();
        assert_eq!(
            classify_destroy(&raw(200, fixture!("destroy_instance.200.json")), &r),
            Ok(())
        );
        assert_eq!(
            classify_destroy(&raw(404, fixture!("destroy_instance.404.json")), &r),
            Ok(())
        );
        assert_eq!(
            classify_destroy(
                &raw(200, r#"{"success":false,"msg":"Instance 5 not found."}"#),
                &r
            ),
            Ok(())
        );
        assert_eq!(
            classify_destroy(&raw(400, fixture!("destroy_instance.400.json")), &r)
                .map_err(|e| e.label()),
            Err("Permanent")
        );
        assert_eq!(
            classify_destroy(&raw(429, fixture!("destroy_instance.429.json")), &r)
                .map_err(|e| e.label()),
            Err("RateLimited")
        );
        assert_eq!(
            classify_destroy(&raw(503, "busy"), &r).map_err(|e| e.label()),
            Err("Transient")
        );
        // "Not found" under a refused key or a throttle is not a confirmation.
        let not_found = r#"{"success":false,"error":"not_found","msg":"Instance not found"}"#;
        for (code, label) in [
            (401, "Unauthorized"),
            (403, "Unauthorized"),
            (429, "RateLimited"),
        ] {
            assert_eq!(
                classify_destroy(&raw(code, not_found), &r).map_err(|e| e.label()),
                Err(label),
                "{code}"
            );
        }
    }

    #[test]
    fn show_null_is_not_found_and_errors_keep_their_text() {
        let r = Redactor::default();
        assert_eq!(
            classify_show(&raw(200, r#"{"instances": null}"#), &r, 5)
                .map_err(|e| e.label())
                .err(),
            Some("NotFound")
        );
        assert_eq!(
            classify_show(&raw(404, "{}"), &r, 5)
                .map_err(|e| e.label())
                .err(),
            Some("NotFound")
        );
        let e =
            classify_show(&raw(401, fixture!("show_instance.401.json")), &r, 5).expect_err("401");
        assert_eq!(e.label(), "Unauthorized");
        assert!(e.to_string().contains("Invalid user key"), "{e}");
        let e =
            classify_show(&raw(429, fixture!("show_instance.429.json")), &r, 5).expect_err("429");
        assert_eq!(e, ProviderError::RateLimited { retry_after: None });
        let e = vast_error("op", &raw(400, fixture!("show_instances_v1.400.json")), &r);
        assert!(
            e.to_string().contains("invalid_request") && e.to_string().contains("dph_total"),
            "{e}"
        );
        let e = vast_error("op", &raw(400, fixture!("search_offers.400.json")), &r);
        assert!(e.to_string().contains("Invalid json body"), "{e}");
    }

    #[test]
    fn error_codes_are_redacted_and_short() {
        let key = Credentials::new("vk-SECRET-key");
        let r = Redactor::new([&key]);
        let body = json!({"success": false, "error": format!("vk-SECRET-key{}", "c".repeat(100_000)),
                          "msg": "bad"});
        let e = vast_error("op", &raw(400, &body.to_string()), &r);
        let shown = e.to_string();
        assert!(
            !shown.contains("SECRET") && shown.contains("<redacted>"),
            "{shown:.80}"
        );
        assert!(shown.len() < 600, "{} bytes", shown.len());
    }

    #[test]
    fn create_body_maps_the_port_and_keeps_the_entrypoint() {
        let req = CreateRequest {
            label: "gpupool-c-u".into(),
            image: "ghcr.io/x/worker:1".into(),
            env: [("GPUPOOL_SESSION_TOKEN".to_string(), "tok".to_string())].into(),
            secret_env: Default::default(),
            port: 8000,
            disk_gb: 20,
        };
        let body = create_body(&req).expect("body");
        assert_eq!(
            body["env"],
            json!({"GPUPOOL_SESSION_TOKEN": "tok", "-p 8000:8000": "1"})
        );
        assert_eq!(body["runtype"], "args");
        assert_eq!(body["cancel_unavail"], true);
        assert_eq!(body["disk"], 20);
        assert_eq!(body["label"], "gpupool-c-u");
        assert!(body.get("price").is_none(), "on-demand: no bid price");
        let bad = CreateRequest {
            env: [("-v /:/host".to_string(), "1".to_string())].into(),
            ..req
        };
        assert!(create_body(&bad).is_err());
    }

    #[test]
    fn ranking_is_cheapest_first() {
        let o = |id: &str, p: &str, r: f64| Offer {
            id: id.into(),
            gpu_name: "g".into(),
            num_gpus: 1,
            price_per_hour: p.parse().expect("price"),
            region: None,
            reliability: Some(r),
        };
        let mut offers = vec![
            o("3", "0.30", 0.99),
            o("2", "0.20", 0.95),
            o("1", "0.20", 0.99),
        ];
        rank_offers(&mut offers);
        let ids: Vec<_> = offers.iter().map(|o| o.id.as_str()).collect();
        assert_eq!(ids, ["1", "2", "3"]);
    }

    #[test]
    fn endpoint_tolerates_odd_port_shapes() {
        let mut dto = InstanceDto {
            public_ipaddr: Some(" 203.0.113.9\n".into()),
            ports: Some(json!({"8000/tcp": [{"HostIp": "0.0.0.0", "HostPort": 41234}]})),
            ..InstanceDto::default()
        };
        assert_eq!(
            worker_endpoint(&dto, 8000).as_deref(),
            Some("http://203.0.113.9:41234")
        );
        dto.ports = Some(json!({"8000/tcp": []}));
        assert_eq!(worker_endpoint(&dto, 8000), None);
        dto.ports = Some(json!({"8000/tcp": [{"HostPort": "not-a-port"}]}));
        assert_eq!(worker_endpoint(&dto, 8000), None);
        dto.ports = Some(json!("weird"));
        assert_eq!(worker_endpoint(&dto, 8000), None);
        // Only an address becomes a URL: no host names, paths or credentials.
        dto.ports = Some(json!({"8000/tcp": [{"HostPort": 41234}]}));
        for bad in ["", "evil.example/x?", "user@203.0.113.9", "a b", "<"] {
            dto.public_ipaddr = Some(bad.into());
            assert_eq!(worker_endpoint(&dto, 8000), None, "{bad:?}");
        }
        dto.public_ipaddr = Some("2001:db8::7".into());
        assert_eq!(
            worker_endpoint(&dto, 8000).as_deref(),
            Some("http://[2001:db8::7]:41234")
        );
    }
}
