//! The provider clients over real HTTP, against small scripted servers on 127.0.0.1.
//!
//! Each test starts a server whose single handler records every request and answers from a
//! closure given the request and its index, so a test can script "429, 429, then 200" or
//! route GraphQL by its variables. No provider simulator is involved.

use std::{
    collections::BTreeMap,
    num::NonZeroU32,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{Router, body::Body, extract::Request, response::Response};
use gpupool::{
    crd::{
        CloudType, RunpodApi, RunpodProvider, RunpodServerlessProvider, SecretKeyRef, VastProvider,
        pool::RunpodWorkerAccess,
    },
    provider::{
        CreateRequest, Credentials, EndpointSettings, InstanceProvider, Offer, ProviderError,
        RemoteState, ServerlessProvider, ServerlessStatus,
        http::{HttpConfig, RateLimit, RetryPolicy, WorkerShape},
        runpod::{RunpodClient, RunpodOptions},
        runpod_serverless::{RunpodServerlessClient, RunpodServerlessOptions},
        runpod_v2::{RunpodV2Client, RunpodV2Options},
        vast::{VastClient, VastOptions},
    },
};
use serde_json::{Value, json};
use tokio::time::Instant;

const KEY: &str = "sk-TEST-very-secret-0123";

// ---------------------------------------------------------------- scripted server

#[derive(Clone, Debug)]
struct Seen {
    method: String,
    path: String,
    query: BTreeMap<String, String>,
    headers: axum::http::HeaderMap,
    body: Value,
    at: Instant,
}

#[derive(Clone, Debug)]
struct Reply {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: String,
    delay: Duration,
}

fn reply(status: u16, body: impl Into<String>) -> Reply {
    Reply {
        status,
        headers: vec![("content-type", "application/json".into())],
        body: body.into(),
        delay: Duration::ZERO,
    }
}

fn json_reply(status: u16, body: Value) -> Reply {
    reply(status, body.to_string())
}

impl Reply {
    fn header(mut self, name: &'static str, value: &str) -> Self {
        self.headers.push((name, value.into()));
        self
    }
    fn delayed(mut self, d: Duration) -> Self {
        self.delay = d;
        self
    }
}

struct Mock {
    base: String,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Mock {
    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("lock").clone()
    }
    fn hits(&self) -> usize {
        self.seen.lock().expect("lock").len()
    }
}

async fn mock<F>(answer: F) -> Mock
where
    F: Fn(&Seen, usize) -> Reply + Send + Sync + 'static,
{
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let answer = Arc::new(answer);
    let log = seen.clone();
    let app = Router::new().fallback(move |req: Request| {
        let log = log.clone();
        let answer = answer.clone();
        async move {
            let (parts, body) = req.into_parts();
            let bytes = axum::body::to_bytes(body, usize::MAX)
                .await
                .unwrap_or_default();
            let query = parts
                .uri
                .query()
                .map(|q| {
                    url::form_urlencoded::parse(q.as_bytes())
                        .into_owned()
                        .collect()
                })
                .unwrap_or_default();
            let seen = Seen {
                method: parts.method.to_string(),
                path: parts.uri.path().to_string(),
                query,
                headers: parts.headers,
                body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
                at: Instant::now(),
            };
            let index = {
                let mut log = log.lock().expect("lock");
                log.push(seen.clone());
                log.len() - 1
            };
            let r = answer(&seen, index);
            if !r.delay.is_zero() {
                tokio::time::sleep(r.delay).await;
            }
            let mut resp = Response::builder().status(r.status);
            for (k, v) in &r.headers {
                resp = resp.header(*k, v);
            }
            resp.body(Body::from(r.body)).expect("response")
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Mock {
        base: format!("http://{addr}"),
        seen,
    }
}

/// Fast, deterministic transport settings for tests: 3 attempts, 50 ms then 100 ms back-off,
/// no jitter, 1 s per request, no client-side quota.
fn fast_http() -> HttpConfig {
    HttpConfig {
        connect_timeout: Duration::from_secs(1),
        request_timeout: Duration::from_secs(1),
        retry: RetryPolicy {
            max_attempts: 3,
            min_delay: Duration::from_millis(50),
            max_delay: Duration::from_millis(400),
            max_total: Duration::from_secs(10),
            jitter: false,
        },
        rate_limit: None,
        ..HttpConfig::default()
    }
}

fn assert_no_secret(text: &str) {
    assert!(!text.contains(KEY), "secret leaked in {text:?}");
    assert!(!text.contains("very-secret"), "secret leaked in {text:?}");
}

fn check_error_is_clean(e: &ProviderError) {
    assert_no_secret(&e.to_string());
    assert_no_secret(&format!("{e:?}"));
}

fn bearer_of(s: &Seen) -> Option<String> {
    s.headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// A body that quotes back everything the client sent, secrets included: what a careless
/// server (or a proxy error page) might do.
fn echo_body(s: &Seen) -> String {
    format!(
        "{{\"error\":\"invalid_request\",\"msg\":\"echo {} auth={} body={}\"}}",
        s.path,
        bearer_of(s).unwrap_or_default(),
        s.body
    )
}

// ---------------------------------------------------------------- Vast.ai

fn vast_entry() -> VastProvider {
    VastProvider {
        gpu_names: vec!["RTX 4090".into(), "RTX 3090".into()],
        max_price_per_hour: "0.50".into(),
        min_reliability: 0.95,
        num_gpus: 1,
        countries: vec![],
        bid_per_hour: None,
        credentials_secret_ref: SecretKeyRef::new("vast", "key"),
    }
}

fn vast(base: &str, http: HttpConfig) -> VastClient {
    VastClient::new(
        &vast_entry(),
        WorkerShape {
            port: 8000,
            disk_gb: 16,
        },
        Credentials::new(KEY),
        VastOptions {
            base_url: base.into(),
            http,
        },
    )
    .expect("vast client")
}

fn vast_offer(id: u64, gpu: &str, price: f64, reliability: f64) -> Value {
    json!({
        "id": id, "ask_contract_id": id, "gpu_name": gpu, "num_gpus": 1, "dph_total": price,
        "reliability": reliability, "geolocation": "Oregon, US", "direct_port_count": 4,
        "rentable": true, "rented": false, "verification": "verified"
    })
}

fn vast_instance(id: u64, label: &str, actual: Option<&str>) -> Value {
    json!({
        "id": id, "label": label, "actual_status": actual, "intended_status": "running",
        "cur_state": "running", "public_ipaddr": "203.0.113.7", "gpu_name": "RTX 4090",
        "num_gpus": 1, "dph_total": 0.41, "geolocation": "Oregon, US", "start_date": 1700000000.5,
        "extra_env": [], "ports": {"8000/tcp": [{"HostIp": "0.0.0.0", "HostPort": "41234"}],
                                    "22/tcp": [{"HostIp": "0.0.0.0", "HostPort": "20000"}]}
    })
}

fn create_request(label: &str) -> CreateRequest {
    CreateRequest {
        label: label.into(),
        image: "ghcr.io/acme/video-worker:1.2".into(),
        env: [
            (
                "GPUPOOL_SESSION_TOKEN".to_string(),
                "session-tok".to_string(),
            ),
            ("GPUPOOL_WORKER_PORT".to_string(), "8000".to_string()),
        ]
        .into(),
        secret_env: Default::default(),
        port: 8000,
        disk_gb: 16,
    }
}

fn some_offer(id: &str) -> Offer {
    Offer {
        id: id.into(),
        gpu_name: "RTX 4090".into(),
        num_gpus: 1,
        price_per_hour: "0.41".parse().expect("price"),
        region: Some("Oregon, US".into()),
        reliability: Some(0.99),
    }
}

#[tokio::test]
async fn vast_offers_filter_server_side_recheck_and_rank_cheapest_first() {
    let server = mock(|_, _| {
        json_reply(
            200,
            json!({"offers": [
                vast_offer(3, "RTX 4090", 0.45, 0.99),
                vast_offer(1, "RTX 3090", 0.20, 0.97),
                vast_offer(9, "RTX 4090", 0.75, 0.99),      // over the cap
                vast_offer(8, "A100 SXM4", 0.30, 0.99),     // not an accepted GPU
                vast_offer(7, "RTX 4090", 0.30, 0.50),      // unreliable
                {"id": "junk", "dph_total": "n/a"},         // unreadable row: skipped
                vast_offer(2, "RTX 4090", 0.20, 0.99),
            ]}),
        )
    })
    .await;
    let offers = vast(&server.base, fast_http())
        .offers()
        .await
        .expect("offers");
    let ids: Vec<_> = offers.iter().map(|o| o.id.as_str()).collect();
    assert_eq!(
        ids,
        ["2", "1", "3"],
        "cheapest first, more reliable first on ties"
    );
    assert_eq!(offers[0].price_per_hour.to_string(), "0.2");
    assert_eq!(offers[0].region.as_deref(), Some("Oregon, US"));

    let seen = server.seen();
    assert_eq!(seen.len(), 1);
    let req = &seen[0];
    assert_eq!(
        (req.method.as_str(), req.path.as_str()),
        ("POST", "/api/v0/bundles/")
    );
    assert_eq!(
        bearer_of(req).as_deref(),
        Some(format!("Bearer {KEY}").as_str())
    );
    assert!(req.query.is_empty(), "the key never goes in the query");
    assert_eq!(
        req.body["gpu_name"],
        json!({"in": ["RTX 4090", "RTX 3090"]})
    );
    assert_eq!(req.body["dph_total"], json!({"lte": 0.5}));
    assert_eq!(req.body["allocated_storage"], 16);
    assert_eq!(req.body["type"], "on-demand");
}

#[tokio::test]
async fn vast_create_maps_the_worker_port_and_returns_the_new_contract() {
    let server =
        mock(|_, _| json_reply(200, json!({"success": true, "new_contract": 7835610}))).await;
    let created = vast(&server.base, fast_http())
        .create(&some_offer("123"), &create_request("gpupool-c1-uid1"))
        .await
        .expect("create");
    assert_eq!(created.id, "7835610");
    assert_eq!(created.label.as_deref(), Some("gpupool-c1-uid1"));
    assert_eq!(created.state, RemoteState::Starting);
    assert_eq!(
        created.price_per_hour.map(|p| p.to_string()).as_deref(),
        Some("0.41")
    );

    let req = &server.seen()[0];
    assert_eq!(
        (req.method.as_str(), req.path.as_str()),
        ("PUT", "/api/v0/asks/123/")
    );
    assert_eq!(req.body["image"], "ghcr.io/acme/video-worker:1.2");
    assert_eq!(req.body["label"], "gpupool-c1-uid1");
    assert_eq!(req.body["disk"], 16);
    assert_eq!(req.body["runtype"], "args");
    assert_eq!(req.body["cancel_unavail"], true);
    assert_eq!(
        req.body["env"],
        json!({"GPUPOOL_SESSION_TOKEN": "session-tok", "GPUPOOL_WORKER_PORT": "8000", "-p 8000:8000": "1"})
    );
}

#[tokio::test]
async fn vast_create_unavailable_offer_is_insufficient_capacity() {
    for (status, body) in [
        (
            404,
            json!({"success": false, "error": "invalid_args", "msg": "error 404/3603: no_such_ask Instance type by id 123 is not available.", "ask_id": 123}),
        ),
        (
            410,
            json!({"success": false, "error": "no_such_ask", "msg": "error 410/3907: no_such_ask Instance type 123 is no longer available.", "ask_id": 123}),
        ),
    ] {
        let server = mock(move |_, _| json_reply(status, body.clone())).await;
        let err = vast(&server.base, fast_http())
            .create(&some_offer("123"), &create_request("gpupool-c1-uid1"))
            .await
            .expect_err("no capacity");
        assert!(
            matches!(err, ProviderError::InsufficientCapacity(_)),
            "{status}: {err:?}"
        );
        assert_eq!(server.hits(), 1, "a refusal is final, no retry");
    }
}

#[tokio::test]
async fn vast_create_is_never_retried_after_an_ambiguous_failure() {
    // 502: the server may have rented the machine before failing.
    let server = mock(|_, _| reply(502, "<html>bad gateway</html>")).await;
    let err = vast(&server.base, fast_http())
        .create(&some_offer("5"), &create_request("gpupool-c1-u"))
        .await
        .expect_err("5xx");
    assert!(matches!(err, ProviderError::Transient(_)), "{err:?}");
    assert_eq!(server.hits(), 1);

    // Timeout: same.
    let server = mock(|_, _| {
        json_reply(200, json!({"success": true, "new_contract": 1})).delayed(Duration::from_secs(3))
    })
    .await;
    let http = HttpConfig {
        request_timeout: Duration::from_millis(300),
        ..fast_http()
    };
    let started = Instant::now();
    let err = vast(&server.base, http)
        .create(&some_offer("5"), &create_request("gpupool-c1-u"))
        .await
        .expect_err("timeout");
    assert!(
        matches!(&err, ProviderError::Transient(m) if m.contains("timed out")),
        "{err:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(server.hits(), 1);
}

#[tokio::test]
async fn vast_create_refused_with_429_is_retried() {
    let server = mock(|_, i| {
        if i == 0 {
            json_reply(
                429,
                json!({"detail": "API requests too frequent endpoint threshold=4.5"}),
            )
        } else {
            json_reply(200, json!({"success": true, "new_contract": 42}))
        }
    })
    .await;
    let created = vast(&server.base, fast_http())
        .create(&some_offer("5"), &create_request("gpupool-c1-u"))
        .await
        .expect("created after the 429");
    assert_eq!(created.id, "42");
    assert_eq!(server.hits(), 2);
}

#[tokio::test]
async fn vast_get_maps_state_and_endpoint_and_null_is_not_found() {
    let server = mock(|s, _| {
        if s.path == "/api/v0/instances/77/" {
            json_reply(
                200,
                json!({"instances": vast_instance(77, "gpupool-c1-a", Some("running"))}),
            )
        } else {
            json_reply(200, json!({"instances": null}))
        }
    })
    .await;
    let client = vast(&server.base, fast_http());
    let i = client.get("77").await.expect("get");
    assert_eq!(i.state, RemoteState::Running);
    assert_eq!(i.endpoint.as_deref(), Some("http://203.0.113.7:41234"));
    assert_eq!(i.label.as_deref(), Some("gpupool-c1-a"));
    assert_eq!(i.started_at.map(|t| t.as_second()), Some(1_700_000_000));
    assert_eq!(
        server.seen()[0].query.get("owner").map(String::as_str),
        Some("me")
    );

    let err = client.get("78").await.expect_err("gone");
    assert!(matches!(err, ProviderError::NotFound(_)), "{err:?}");
    let err = client.get("../etc").await.expect_err("not an id");
    assert!(matches!(err, ProviderError::Permanent(_)), "{err:?}");
}

#[tokio::test]
async fn vast_list_follows_next_token_and_filters_the_label_prefix() {
    let server = mock(|s, _| {
        let page = match s.query.get("after_token").map(String::as_str) {
            None => json!({"success": true, "next_token": "t1", "instances": [
                vast_instance(1, "gpupool-c1-a", Some("running")),
                vast_instance(2, "someone-else", Some("running")),
            ]}),
            Some("t1") => json!({"success": true, "next_token": "t2", "instances": [
                vast_instance(3, "gpupool-c2-x", Some("loading")),
                {"id": 4, "label": "gpupool-c1-b"},
            ]}),
            Some("t2") => json!({"success": true, "next_token": null, "instances": [
                vast_instance(5, "gpupool-c1-c", None),
                "not an object",
            ]}),
            Some(_) => json!({"error": "invalid_token"}),
        };
        json_reply(200, page)
    })
    .await;
    let client = vast(&server.base, fast_http());
    let found = client.list_labeled("gpupool-c1-").await.expect("list");
    let ids: Vec<_> = found.iter().map(|i| i.id.as_str()).collect();
    assert_eq!(ids, ["1", "4", "5"]);
    // A row with only an id and a label still maps (missing fields are not errors).
    assert_eq!(found[1].state, RemoteState::Starting);
    assert_eq!(found[1].endpoint, None);

    let seen = server.seen();
    assert_eq!(seen.len(), 3);
    for s in &seen {
        assert_eq!(s.path, "/api/v1/instances/");
        assert_eq!(s.query.get("limit").map(String::as_str), Some("25"));
        assert_eq!(
            s.query.get("select_filters").map(String::as_str),
            Some("{}")
        );
    }
    assert_eq!(
        seen[2].query.get("after_token").map(String::as_str),
        Some("t2")
    );
}

#[tokio::test]
async fn vast_find_by_label_asks_for_the_exact_label() {
    let server = mock(|_, _| {
        json_reply(
            200,
            json!({"next_token": null, "instances": [
                vast_instance(10, "gpupool-c1-abc-extra", Some("running")),
                vast_instance(11, "gpupool-c1-abc", Some("running")),
            ]}),
        )
    })
    .await;
    let found = vast(&server.base, fast_http())
        .find_by_label("gpupool-c1-abc")
        .await
        .expect("find");
    assert_eq!(found.map(|i| i.id).as_deref(), Some("11"));
    let filters: Value =
        serde_json::from_str(&server.seen()[0].query["select_filters"]).expect("json filter");
    assert_eq!(filters, json!({"label": {"in": ["gpupool-c1-abc"]}}));
}

#[tokio::test]
async fn vast_pagination_that_loops_is_an_error_not_a_hang() {
    let server = mock(|_, _| json_reply(200, json!({"next_token": "same", "instances": []}))).await;
    let err = vast(&server.base, fast_http())
        .list_labeled("gpupool-")
        .await
        .expect_err("loop");
    assert!(matches!(err, ProviderError::Permanent(_)), "{err:?}");
}

#[tokio::test]
async fn vast_delete_of_a_gone_instance_is_ok() {
    let server = mock(|s, _| match s.path.as_str() {
        "/api/v0/instances/1/" => json_reply(200, json!({"success": true})),
        "/api/v0/instances/2/" => json_reply(
            404,
            json!({"success": false, "error": "not_found", "msg": "Instance not found"}),
        ),
        "/api/v0/instances/3/" => json_reply(
            200,
            json!({"success": false, "msg": "Instance 3 not found."}),
        ),
        _ => json_reply(
            400,
            json!({"success": false, "error": "invalid_args", "msg": "invalid instance_id"}),
        ),
    })
    .await;
    let client = vast(&server.base, fast_http());
    for id in ["1", "2", "3"] {
        client
            .delete(id)
            .await
            .unwrap_or_else(|e| panic!("{id}: {e}"));
    }
    let err = client.delete("4").await.expect_err("invalid");
    assert!(matches!(err, ProviderError::Permanent(_)), "{err:?}");
    let seen = server.seen();
    assert!(
        seen.iter()
            .all(|s| s.method == "DELETE" && s.body == json!({}))
    );
}

#[tokio::test]
async fn vast_bad_key_is_unauthorized_and_never_quoted() {
    let server = mock(|s, _| reply(401, echo_body(s))).await;
    let client = vast(&server.base, fast_http());
    let err = client.offers().await.expect_err("401");
    assert!(matches!(err, ProviderError::Unauthorized(_)), "{err:?}");
    assert!(err.to_string().contains("<redacted>"), "{err}");
    check_error_is_clean(&err);
    assert_eq!(server.hits(), 1, "a bad key is not retried");
    assert_no_secret(&format!("{client:?}"));
}

#[tokio::test]
async fn rate_limit_that_clears_is_retried_with_exponential_back_off() {
    // Vast's 429 has no Retry-After: our own back-off (50 ms, then 100 ms) applies.
    let server = mock(|_, i| {
        if i < 2 {
            reply(429, "API requests too frequent: endpoint threshold=2.0")
        } else {
            json_reply(
                200,
                json!({"instances": vast_instance(5, "gpupool-c1-x", Some("running"))}),
            )
        }
    })
    .await;
    let started = Instant::now();
    let i = vast(&server.base, fast_http())
        .get("5")
        .await
        .expect("clears");
    assert_eq!(i.id, "5");
    let seen = server.seen();
    assert_eq!(seen.len(), 3, "two retries");
    let waits = [seen[1].at - seen[0].at, seen[2].at - seen[1].at];
    assert!(waits[0] >= Duration::from_millis(50), "{waits:?}");
    assert!(waits[1] >= Duration::from_millis(100), "{waits:?}");
    assert!(started.elapsed() >= Duration::from_millis(150));
}

#[tokio::test]
async fn rate_limit_that_never_clears_is_rate_limited() {
    let server = mock(|_, _| json_reply(429, json!({"success": false, "error": "rate_limit_exceeded", "msg": "API requests too frequent endpoint threshold=3.0"}))).await;
    let err = vast(&server.base, fast_http())
        .delete("9")
        .await
        .expect_err("429");
    assert_eq!(err, ProviderError::RateLimited { retry_after: None });
    assert_eq!(server.hits(), 3, "max_attempts");
}

#[tokio::test]
async fn retry_after_is_honoured_and_reported() {
    // RunPod Serverless may send Retry-After: the wait is at least that long.
    let server = mock(|_, i| {
        if i == 0 {
            reply(429, "slow down").header("retry-after", "1")
        } else {
            json_reply(200, json!({"jobs": {"inQueue": 3}, "workers": {"idle": 1}}))
        }
    })
    .await;
    let client = serverless(&server.base, &server.base, fast_http());
    let health = client.health().await.expect("health");
    assert_eq!(health.jobs_in_queue, 3);
    let seen = server.seen();
    assert!(
        seen[1].at - seen[0].at >= Duration::from_secs(1),
        "{:?}",
        seen[1].at - seen[0].at
    );

    // A Retry-After beyond the call's budget is returned to the caller instead.
    let server = mock(|_, _| reply(429, "").header("retry-after", "120")).await;
    let client = serverless(&server.base, &server.base, fast_http());
    let started = Instant::now();
    let err = client.health().await.expect_err("429");
    assert_eq!(
        err,
        ProviderError::RateLimited {
            retry_after: Some(Duration::from_secs(120))
        }
    );
    assert_eq!(server.hits(), 1);
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn server_errors_are_transient_after_bounded_retries() {
    let server = mock(|_, _| reply(503, "upstream unavailable")).await;
    let err = vast(&server.base, fast_http())
        .get("1")
        .await
        .expect_err("503");
    assert!(
        matches!(&err, ProviderError::Transient(m) if m.contains("503")),
        "{err:?}"
    );
    assert_eq!(server.hits(), 3);
}

#[tokio::test]
async fn slow_server_times_out_within_the_configured_time() {
    let server =
        mock(|_, _| json_reply(200, json!({"instances": null})).delayed(Duration::from_secs(5)))
            .await;
    let http = HttpConfig {
        request_timeout: Duration::from_millis(300),
        retry: RetryPolicy {
            max_attempts: 2,
            ..fast_http().retry
        },
        ..fast_http()
    };
    let started = Instant::now();
    let err = vast(&server.base, http)
        .get("1")
        .await
        .expect_err("timeout");
    let took = started.elapsed();
    assert!(
        matches!(&err, ProviderError::Transient(m) if m.contains("timed out after 0.3s")),
        "{err:?}"
    );
    assert!(
        took >= Duration::from_millis(600) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert_eq!(server.hits(), 2);
}

#[tokio::test]
async fn malformed_json_is_a_clear_error() {
    let server = mock(|_, _| reply(200, "{\"offers\": [ {\"id\": 1, ")).await;
    let err = vast(&server.base, fast_http())
        .offers()
        .await
        .expect_err("bad json");
    assert!(
        matches!(&err, ProviderError::Transient(m) if m.contains("unexpected response")),
        "{err:?}"
    );
    let server = mock(|_, _| reply(200, "<html>maintenance</html>")).await;
    let err = runpod(
        &server.base,
        RunpodWorkerAccess::PublicTcp,
        vec![],
        fast_http(),
    )
    .get("abc")
    .await
    .expect_err("html");
    assert!(matches!(err, ProviderError::Transient(_)), "{err:?}");
}

#[tokio::test]
async fn connection_refused_is_transient() {
    // Bind and drop to get a port nobody listens on.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let base = format!("http://127.0.0.1:{port}");
    let err = vast(&base, fast_http())
        .get("1")
        .await
        .expect_err("refused");
    assert!(
        matches!(&err, ProviderError::Transient(m) if m.contains("connection")),
        "{err:?}"
    );
    check_error_is_clean(&err);
    // Nothing reached a server, so even a create may be repeated: still Transient in the end.
    let err = vast(&base, fast_http())
        .create(&some_offer("1"), &create_request("gpupool-c-u"))
        .await
        .expect_err("refused");
    assert!(matches!(err, ProviderError::Transient(_)), "{err:?}");
}

#[tokio::test]
async fn client_side_quota_spaces_requests() {
    let server = mock(|_, _| json_reply(200, json!({"instances": null}))).await;
    let http = HttpConfig {
        rate_limit: Some(RateLimit {
            replenish_every: Duration::from_millis(200),
            burst: NonZeroU32::MIN,
        }),
        ..fast_http()
    };
    let client = vast(&server.base, http);
    let started = Instant::now();
    for _ in 0..3 {
        let _ = client.get("1").await;
    }
    assert!(
        started.elapsed() >= Duration::from_millis(380),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(server.hits(), 3);
}

// ---------------------------------------------------------------- RunPod pods (GraphQL)

fn runpod(
    base: &str,
    access: RunpodWorkerAccess,
    dcs: Vec<String>,
    http: HttpConfig,
) -> RunpodClient {
    let entry = RunpodProvider {
        gpu_type_ids: vec![
            "NVIDIA GeForce RTX 4090".into(),
            "NVIDIA RTX A5000".into(),
            "NVIDIA GeForce RTX 3090".into(),
            "NVIDIA H100 80GB HBM3".into(),
        ],
        cloud_type: CloudType::Community,
        max_price_per_hour: "1.00".into(),
        gpu_count: 1,
        worker_access: access,
        data_center_ids: dcs,
        api: RunpodApi::GraphQL,
        credentials_secret_ref: SecretKeyRef::new("runpod", "key"),
    };
    RunpodClient::new(
        &entry,
        WorkerShape {
            port: 8000,
            disk_gb: 16,
        },
        Credentials::new(KEY),
        RunpodOptions {
            graphql_base_url: base.into(),
            proxy_url_template: "https://{podId}-{port}.proxy.runpod.net".into(),
            http,
        },
    )
    .expect("runpod client")
}

fn gql_query(s: &Seen) -> String {
    s.body["query"].as_str().unwrap_or_default().to_string()
}

fn gql_error(message: &str, field: &str) -> Reply {
    json_reply(
        200,
        json!({"errors": [{"message": message, "path": [field], "extensions": {"code": "INTERNAL_SERVER_ERROR"}}],
               "data": {field: null}}),
    )
}

fn pod(id: &str, name: &str, status: &str, runtime: Value) -> Value {
    json!({
        "id": id, "name": name, "desiredStatus": status, "imageName": "img", "costPerHr": 0.44,
        "gpuCount": 1, "lastStatusChange": "Rented by User", "machine": {"gpuDisplayName": "RTX 4090", "location": "CZ"},
        "runtime": runtime
    })
}

fn public_runtime() -> Value {
    json!({"uptimeInSeconds": 30, "ports": [
        {"ip": "100.65.0.2", "isIpPublic": false, "privatePort": 8000, "publicPort": 60001, "type": "http"},
        {"ip": "194.68.245.9", "isIpPublic": true, "privatePort": 8000, "publicPort": 22117, "type": "tcp"}
    ]})
}

#[tokio::test]
async fn runpod_offers_use_variables_and_rank_by_price_then_entry_order() {
    let server = mock(|s, _| {
        let id = s.body["variables"]["gpuTypesInput"]["id"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let (community, price) = match id.as_str() {
            "NVIDIA GeForce RTX 4090" => (true, 0.44),
            "NVIDIA RTX A5000" => (true, 0.22),
            "NVIDIA GeForce RTX 3090" => (true, 0.22),
            _ => (true, 2.49), // H100: over the cap
        };
        json_reply(
            200,
            json!({"data": {"gpuTypes": [{
                "id": id, "displayName": id.replace("NVIDIA ", ""), "memoryInGb": 24,
                "secureCloud": true, "communityCloud": community,
                "securePrice": price * 2.0, "communityPrice": price,
                "lowestPrice": {"uninterruptablePrice": price}
            }]}}),
        )
    })
    .await;
    let offers = runpod(
        &server.base,
        RunpodWorkerAccess::PublicTcp,
        vec![],
        fast_http(),
    )
    .offers()
    .await
    .expect("offers");
    let ids: Vec<_> = offers.iter().map(|o| o.id.as_str()).collect();
    assert_eq!(
        ids,
        [
            "NVIDIA RTX A5000",
            "NVIDIA GeForce RTX 3090",
            "NVIDIA GeForce RTX 4090"
        ]
    );
    assert_eq!(offers[0].price_per_hour.to_string(), "0.22");

    let seen = server.seen();
    assert_eq!(seen.len(), 4);
    for s in &seen {
        assert_eq!(s.path, "/graphql");
        assert_eq!(
            bearer_of(s).as_deref(),
            Some(format!("Bearer {KEY}").as_str())
        );
        assert!(
            !gql_query(s).contains("NVIDIA"),
            "user values travel as variables"
        );
        assert_eq!(
            s.body["variables"]["lowestPriceInput"],
            json!({"gpuCount": 1, "secureCloud": false})
        );
    }
}

#[tokio::test]
async fn runpod_offers_ignore_other_gpu_types_and_empty_answers() {
    // A server that ignores the id filter: another type's price is never booked under ours.
    let server = mock(|s, _| {
        let id = s.body["variables"]["gpuTypesInput"]["id"]
            .as_str()
            .unwrap_or_default();
        if id == "NVIDIA GeForce RTX 4090" {
            json_reply(
                200,
                json!({"data": {"gpuTypes": [
                    {"id": "NVIDIA RTX A4000", "communityPrice": 0.10, "communityCloud": true}
                ]}}),
            )
        } else {
            json_reply(200, json!({"data": {"gpuTypes": []}}))
        }
    })
    .await;
    let offers = runpod(
        &server.base,
        RunpodWorkerAccess::PublicTcp,
        vec![],
        fast_http(),
    )
    .offers()
    .await
    .expect("offers");
    assert!(offers.is_empty(), "{offers:?}");
    assert_eq!(server.hits(), 4);

    let server = mock(|_, _| json_reply(200, json!({"offers": []}))).await;
    let offers = vast(&server.base, fast_http())
        .offers()
        .await
        .expect("offers");
    assert!(offers.is_empty());
}

#[tokio::test]
async fn runpod_create_sends_the_deploy_input_as_a_variable() {
    let server = mock(|s, _| {
        let input = &s.body["variables"]["input"];
        json_reply(
            200,
            json!({"data": {"podFindAndDeployOnDemand": {
                "id": "50qynxzilsxoey", "name": input["name"], "desiredStatus": "RUNNING",
                "imageName": input["imageName"], "costPerHr": 0.44, "gpuCount": 1,
                "machine": {"gpuDisplayName": "RTX 4090", "location": null}
            }}}),
        )
    })
    .await;
    // A label with GraphQL syntax in it must arrive verbatim, not as query text.
    let label = "gpupool-c1-\"}) { id } } mutation { podTerminate";
    let created = runpod(
        &server.base,
        RunpodWorkerAccess::PublicTcp,
        vec![],
        fast_http(),
    )
    .create(
        &some_offer("NVIDIA GeForce RTX 4090"),
        &create_request(label),
    )
    .await
    .expect("create");
    assert_eq!(created.id, "50qynxzilsxoey");
    assert_eq!(created.label.as_deref(), Some(label));
    assert_eq!(created.state, RemoteState::Starting);
    assert_eq!(
        created.price_per_hour.map(|p| p.to_string()).as_deref(),
        Some("0.44")
    );

    let s = &server.seen()[0];
    assert!(gql_query(s).contains("podFindAndDeployOnDemand(input: $input)"));
    assert!(!gql_query(s).contains("gpupool-c1"));
    let input = &s.body["variables"]["input"];
    assert_eq!(input["name"], label);
    assert_eq!(input["gpuTypeId"], "NVIDIA GeForce RTX 4090");
    assert_eq!(input["cloudType"], "COMMUNITY");
    assert_eq!(input["ports"], "8000/tcp");
    assert_eq!(input["supportPublicIp"], true);
    assert_eq!(input["volumeInGb"], 0);
    assert_eq!(input["containerDiskInGb"], 16);
    assert_eq!(
        input["env"],
        json!([{"key": "GPUPOOL_SESSION_TOKEN", "value": "session-tok"}, {"key": "GPUPOOL_WORKER_PORT", "value": "8000"}])
    );
    assert!(input.get("dataCenterId").is_none());
}

#[tokio::test]
async fn runpod_create_without_capacity_tries_the_next_data_centre() {
    let server = mock(|s, _| {
        match s.body["variables"]["input"]["dataCenterId"].as_str() {
            Some("EU-RO-1") => gql_error(
                "There are no longer any instances available with the requested specifications. Please refresh and try again.",
                "podFindAndDeployOnDemand",
            ),
            _ => json_reply(200, json!({"data": {"podFindAndDeployOnDemand": {"id": "p2", "name": "gpupool-c1-u", "desiredStatus": "RUNNING"}}})),
        }
    })
    .await;
    let dcs = vec!["EU-RO-1".to_string(), "US-TX-3".to_string()];
    let created = runpod(
        &server.base,
        RunpodWorkerAccess::PublicTcp,
        dcs.clone(),
        fast_http(),
    )
    .create(
        &some_offer("NVIDIA GeForce RTX 4090"),
        &create_request("gpupool-c1-u"),
    )
    .await
    .expect("second data centre");
    assert_eq!(created.id, "p2");
    assert_eq!(created.region.as_deref(), Some("US-TX-3"));
    assert_eq!(server.hits(), 2);

    // Nowhere: InsufficientCapacity, once per data centre, no retries.
    let server = mock(|_, _| {
        gql_error("There are no longer any instances available with the requested specifications. Please refresh and try again.", "podFindAndDeployOnDemand")
    })
    .await;
    let err = runpod(
        &server.base,
        RunpodWorkerAccess::PublicTcp,
        dcs,
        fast_http(),
    )
    .create(
        &some_offer("NVIDIA GeForce RTX 4090"),
        &create_request("gpupool-c1-u"),
    )
    .await
    .expect_err("no capacity");
    assert!(
        matches!(err, ProviderError::InsufficientCapacity(_)),
        "{err:?}"
    );
    assert_eq!(server.hits(), 2);
}

#[tokio::test]
async fn runpod_graphql_errors_map_and_creates_are_not_retried() {
    let server = mock(|_, _| {
        gql_error(
            "Something went wrong. Please try again later or contact support.",
            "podFindAndDeployOnDemand",
        )
    })
    .await;
    let err = runpod(
        &server.base,
        RunpodWorkerAccess::PublicTcp,
        vec![],
        fast_http(),
    )
    .create(&some_offer("g"), &create_request("gpupool-c1-u"))
    .await
    .expect_err("ambiguous");
    assert!(matches!(err, ProviderError::Transient(_)), "{err:?}");
    assert_eq!(
        server.hits(),
        1,
        "an ambiguous create is left to adoption by label"
    );

    let server = mock(|_, _| {
        gql_error(
            "There are not enough free GPUs on the host machine to start this pod.",
            "podFindAndDeployOnDemand",
        )
    })
    .await;
    let err = runpod(
        &server.base,
        RunpodWorkerAccess::PublicTcp,
        vec![],
        fast_http(),
    )
    .create(&some_offer("g"), &create_request("gpupool-c1-u"))
    .await
    .expect_err("capacity");
    assert!(
        matches!(err, ProviderError::InsufficientCapacity(_)),
        "{err:?}"
    );

    let server = mock(|_, _| gql_error("GPU type not found", "podFindAndDeployOnDemand")).await;
    let err = runpod(
        &server.base,
        RunpodWorkerAccess::PublicTcp,
        vec![],
        fast_http(),
    )
    .create(&some_offer("g"), &create_request("gpupool-c1-u"))
    .await
    .expect_err("bad type");
    assert!(matches!(err, ProviderError::Permanent(_)), "{err:?}");

    let server = mock(|_, _| {
        gql_error(
            "Something went wrong. Please try again later or contact support.",
            "pod",
        )
    })
    .await;
    let err = runpod(
        &server.base,
        RunpodWorkerAccess::PublicTcp,
        vec![],
        fast_http(),
    )
    .get("p1")
    .await
    .expect_err("transient");
    assert!(matches!(err, ProviderError::Transient(_)), "{err:?}");
    assert_eq!(server.hits(), 3, "reads are retried");
}

#[tokio::test]
async fn runpod_get_maps_state_and_endpoints() {
    let server = mock(|s, _| {
        let id = s.body["variables"]["podId"].as_str().unwrap_or_default();
        let p = match id {
            "running" => pod("running", "gpupool-c1-a", "RUNNING", public_runtime()),
            "booting" => pod("booting", "gpupool-c1-b", "RUNNING", Value::Null),
            "exited" => pod("exited", "gpupool-c1-c", "EXITED", Value::Null),
            "gone" => pod("gone", "gpupool-c1-d", "TERMINATED", Value::Null),
            _ => Value::Null,
        };
        json_reply(200, json!({"data": {"pod": p}}))
    })
    .await;
    let tcp = runpod(
        &server.base,
        RunpodWorkerAccess::PublicTcp,
        vec![],
        fast_http(),
    );
    let i = tcp.get("running").await.expect("running");
    assert_eq!(i.state, RemoteState::Running);
    assert_eq!(i.endpoint.as_deref(), Some("http://194.68.245.9:22117"));
    assert_eq!(i.region.as_deref(), Some("CZ"));
    assert_eq!(i.label.as_deref(), Some("gpupool-c1-a"));

    let b = tcp.get("booting").await.expect("booting");
    assert_eq!((b.state, b.endpoint), (RemoteState::Starting, None));
    assert!(
        matches!(tcp.get("exited").await.map(|i| i.state), Ok(RemoteState::Stopped(m)) if m.contains("EXITED"))
    );
    assert_eq!(
        tcp.get("gone").await.map(|i| i.state).ok(),
        Some(RemoteState::Terminated)
    );
    let err = tcp.get("unknown").await.expect_err("null pod");
    assert!(matches!(err, ProviderError::NotFound(_)), "{err:?}");

    let proxy = runpod(&server.base, RunpodWorkerAccess::Proxy, vec![], fast_http());
    let i = proxy.get("running").await.expect("running");
    assert_eq!(
        i.endpoint.as_deref(),
        Some("https://running-8000.proxy.runpod.net")
    );
    let s = &server.seen()[0];
    assert!(gql_query(s).contains("pod(input: {podId: $podId})"));
}

#[tokio::test]
async fn runpod_list_labeled_filters_by_name_prefix() {
    let server = mock(|_, _| {
        json_reply(
            200,
            json!({"data": {"myself": {"pods": [
                pod("a", "gpupool-c1-a", "RUNNING", public_runtime()),
                pod("b", "my notebook", "RUNNING", Value::Null),
                pod("c", "gpupool-c1-c", "EXITED", Value::Null),
                {"name": "gpupool-c1-no-id"},
                pod("d", "gpupool-c2-d", "RUNNING", Value::Null),
            ]}}}),
        )
    })
    .await;
    let pods = runpod(
        &server.base,
        RunpodWorkerAccess::PublicTcp,
        vec![],
        fast_http(),
    )
    .list_labeled("gpupool-c1-")
    .await
    .expect("list");
    let ids: Vec<_> = pods.iter().map(|p| p.id.as_str()).collect();
    assert_eq!(ids, ["a", "c"]);
}

#[tokio::test]
async fn runpod_delete_of_a_gone_pod_is_ok() {
    let server = mock(|s, _| match s.body["variables"]["podId"].as_str() {
        Some("live") => json_reply(200, json!({"data": {"podTerminate": null}})),
        Some("gone") => gql_error("Pod not found", "podTerminate"),
        _ => gql_error(
            "You do not have permission to terminate this pod",
            "podTerminate",
        ),
    })
    .await;
    let client = runpod(
        &server.base,
        RunpodWorkerAccess::PublicTcp,
        vec![],
        fast_http(),
    );
    client.delete("live").await.expect("terminate");
    client.delete("gone").await.expect("already gone");
    let err = client.delete("other").await.expect_err("refused");
    assert!(matches!(err, ProviderError::Permanent(_)), "{err:?}");
    assert!(gql_query(&server.seen()[0]).contains("podTerminate(input: {podId: $podId})"));
}

#[tokio::test]
async fn runpod_bad_key_is_unauthorized_and_never_quoted() {
    let server = mock(|s, _| reply(401, echo_body(s))).await;
    let client = runpod(
        &server.base,
        RunpodWorkerAccess::PublicTcp,
        vec![],
        fast_http(),
    );
    for err in [
        client.offers().await.expect_err("401"),
        client.get("x").await.expect_err("401"),
        client.delete("x").await.expect_err("401"),
        client
            .create(&some_offer("g"), &create_request("gpupool-c-u"))
            .await
            .expect_err("401"),
    ] {
        assert!(matches!(err, ProviderError::Unauthorized(_)), "{err:?}");
        check_error_is_clean(&err);
    }
    assert_eq!(server.hits(), 4);
    assert_no_secret(&format!("{client:?}"));
}

// ---------------------------------------------------------------- RunPod pods (REST v2)

/// RunPod's published REST v2 document, parsed once.
fn v2_spec() -> &'static Value {
    static SPEC: std::sync::OnceLock<Value> = std::sync::OnceLock::new();
    SPEC.get_or_init(|| {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/providers/runpod_v2/rest-v2.openapi.json"
        );
        serde_json::from_str(&std::fs::read_to_string(path).expect("spec")).expect("spec JSON")
    })
}

/// The OpenAPI path template of `path` (`/v2/pods/abc` → `/v2/pods/{id}`), if the spec has one.
fn v2_template(path: &str) -> Option<&'static str> {
    let parts: Vec<&str> = path.split('/').collect();
    v2_spec()["paths"]
        .as_object()?
        .keys()
        .map(String::as_str)
        .filter(|t| {
            let tp: Vec<&str> = t.split('/').collect();
            tp.len() == parts.len()
                && tp
                    .iter()
                    .zip(&parts)
                    .all(|(t, p)| t == p || (t.starts_with('{') && !p.is_empty()))
        })
        // A literal segment beats a parameter (`/v2/catalog/gpus` over `/v2/catalog/{x}`).
        .min_by_key(|t| t.matches('{').count())
}

/// Validates `body` against the request schema of `method` `template`, every `$ref` resolved
/// inside the document (draft 2020-12, as OpenAPI 3.1 says). The violations, if any.
fn v2_violations(method: &str, template: &str, body: &Value) -> Vec<String> {
    let op = &v2_spec()["paths"][template][method.to_ascii_lowercase()];
    let schema = &op["requestBody"]["content"]["application/json"]["schema"];
    assert!(
        schema.is_object(),
        "{method} {template} takes no body, got {body}"
    );
    let mut root = schema.clone();
    root["$schema"] = json!("https://json-schema.org/draft/2020-12/schema");
    root["components"] = v2_spec()["components"].clone();
    let validator = jsonschema::options()
        .with_draft(jsonschema::Draft::Draft202012)
        .build(&root)
        .expect("the published schema compiles");
    validator
        .iter_errors(body)
        .map(|e| format!("{}: {e}", e.instance_path()))
        .collect()
}

/// Every request seen is an operation of the published document, and every body it carried
/// validates against that operation's request schema (bodiless operations got none).
fn assert_requests_follow_the_spec(seen: &[Seen]) {
    assert!(!seen.is_empty());
    for s in seen {
        let template = v2_template(&s.path)
            .unwrap_or_else(|| panic!("{} {} is not in the published document", s.method, s.path));
        let op = &v2_spec()["paths"][template][s.method.to_ascii_lowercase()];
        assert!(
            op.is_object(),
            "{} {template} is not a published operation",
            s.method
        );
        if op["requestBody"].is_null() {
            assert_eq!(s.body, Value::Null, "{} {template} takes no body", s.method);
            continue;
        }
        let violations = v2_violations(&s.method, template, &s.body);
        assert!(
            violations.is_empty(),
            "{} {template}: body {} breaks the published schema: {violations:#?}",
            s.method,
            s.body
        );
    }
}

fn runpod_v2_entry(
    access: RunpodWorkerAccess,
    cloud: CloudType,
    dcs: Vec<String>,
) -> RunpodProvider {
    RunpodProvider {
        gpu_type_ids: vec![
            "NVIDIA GeForce RTX 4090".into(),
            "NVIDIA RTX A5000".into(),
            "NVIDIA GeForce RTX 3090".into(),
            "NVIDIA H100 80GB HBM3".into(),
        ],
        cloud_type: cloud,
        max_price_per_hour: "1.00".into(),
        gpu_count: 1,
        worker_access: access,
        data_center_ids: dcs,
        api: RunpodApi::RestV2,
        credentials_secret_ref: SecretKeyRef::new("runpod", "key"),
    }
}

fn runpod_v2_with(base: &str, entry: &RunpodProvider, http: HttpConfig) -> RunpodV2Client {
    RunpodV2Client::new(
        entry,
        WorkerShape {
            port: 8000,
            disk_gb: 16,
        },
        Credentials::new(KEY),
        RunpodV2Options {
            base_url: format!("{base}/v2"),
            proxy_url_template: "https://{podId}-{port}.proxy.runpod.net".into(),
            http,
        },
    )
    .expect("runpod v2 client")
}

fn runpod_v2(base: &str, access: RunpodWorkerAccess, http: HttpConfig) -> RunpodV2Client {
    runpod_v2_with(
        base,
        &runpod_v2_entry(access, CloudType::Community, vec![]),
        http,
    )
}

fn problem(status: u16, title: &str, detail: &str) -> Reply {
    let mut r = json_reply(
        status,
        json!({"title": title, "status": status, "detail": detail}),
    );
    r.headers = vec![("content-type", "application/problem+json".into())];
    r
}

const NO_CAPACITY: &str = "There are no longer any instances available with the requested specifications. Please refresh and try again.";

/// A pod as `GET /v2/pods/{id}` answers it; `marker` is the env's GPUPOOL_LABEL, if any.
fn v2_pod(id: &str, name: &str, marker: Option<&str>, status: &str, runtime: Value) -> Value {
    let mut env = json!({"GPUPOOL_SESSION_TOKEN": "session-tok", "GPUPOOL_WORKER_PORT": "8000"});
    if let Some(m) = marker {
        env["GPUPOOL_LABEL"] = json!(m);
    }
    json!({
        "id": id, "name": name, "status": status, "actions": ["terminate"],
        "image": "ghcr.io/acme/video-worker:1.2", "args": "", "disk": 16, "mounts": {},
        "ports": ["8000/tcp"], "env": env, "registry": null,
        "gpu": {"id": "NVIDIA GeForce RTX 4090", "count": 1}, "cloud": "COMMUNITY",
        "dataCenterId": "EU-RO-1", "cudaVersion": "12.8", "ssh": {"proxy": null, "direct": null},
        "template": null, "cost": if status == "RUNNING" { 0.34 } else { 0.0 }, "locked": false,
        "globalNetworking": {"enabled": false}, "runtime": runtime,
        "createdAt": "2026-12-01T10:00:00Z",
        "startedAt": if status == "RUNNING" { json!("2026-12-01T10:01:30Z") } else { Value::Null }
    })
}

fn v2_runtime() -> Value {
    json!({"uptime": 30, "ports": [
        {"private": 8000, "public": 60001, "type": "http", "ip": "100.65.0.2"},
        {"private": 8000, "public": 22117, "type": "tcp", "ip": "194.68.245.9"}
    ]})
}

fn v2_catalog() -> Value {
    let gpu = |id: &str, name: &str, secure: f64, community: f64| {
        json!({"id": id, "name": name, "pool": "ADA_24", "manufacturer": "NVIDIA", "memory": 24,
               "secure": true, "community": true,
               "price": {"secure": secure, "community": community},
               "maxCount": {"secure": 8, "community": 4}})
    };
    json!({"gpus": [
        gpu("NVIDIA H100 80GB HBM3", "H100 SXM", 2.99, 2.49),
        gpu("NVIDIA GeForce RTX 3090", "RTX 3090", 0.43, 0.22),
        gpu("NVIDIA A40", "A40", 0.01, 0.01),
        gpu("NVIDIA GeForce RTX 4090", "RTX 4090", 0.69, 0.34),
        gpu("NVIDIA RTX A5000", "RTX A5000", 0.27, 0.22),
    ]})
}

#[tokio::test]
async fn runpod_v2_offers_come_from_one_catalog_read_cheapest_first_per_cloud() {
    let server = mock(|_, _| json_reply(200, v2_catalog())).await;
    let community = runpod_v2(&server.base, RunpodWorkerAccess::PublicTcp, fast_http());
    let offers = community.offers().await.expect("offers");
    let ids: Vec<_> = offers.iter().map(|o| o.id.as_str()).collect();
    // Equal prices keep the entry's order; the A40 was never asked for; the H100 is over.
    assert_eq!(
        ids,
        [
            "COMMUNITY:NVIDIA RTX A5000",
            "COMMUNITY:NVIDIA GeForce RTX 3090",
            "COMMUNITY:NVIDIA GeForce RTX 4090"
        ]
    );
    assert_eq!(offers[0].gpu_name, "RTX A5000");

    // ALL: both clouds, each at its own price; SECURE first where they tie.
    let all = runpod_v2_with(
        &server.base,
        &runpod_v2_entry(RunpodWorkerAccess::PublicTcp, CloudType::All, vec![]),
        fast_http(),
    );
    let offers = all.offers().await.expect("offers");
    let got: Vec<(String, String)> = offers
        .iter()
        .map(|o| (o.id.clone(), o.price_per_hour.to_string()))
        .collect();
    let want = [
        ("COMMUNITY:NVIDIA RTX A5000", "0.22"),
        ("COMMUNITY:NVIDIA GeForce RTX 3090", "0.22"),
        ("SECURE:NVIDIA RTX A5000", "0.27"),
        ("COMMUNITY:NVIDIA GeForce RTX 4090", "0.34"),
        ("SECURE:NVIDIA GeForce RTX 3090", "0.43"),
        ("SECURE:NVIDIA GeForce RTX 4090", "0.69"),
    ];
    assert_eq!(got, want.map(|(a, b)| (a.to_string(), b.to_string())));

    let seen = server.seen();
    assert_eq!(seen.len(), 2, "one catalogue read per offers()");
    for s in &seen {
        assert_eq!(
            (s.method.as_str(), s.path.as_str()),
            ("GET", "/v2/catalog/gpus")
        );
        assert!(
            s.query.is_empty(),
            "count/cloud need include=AVAILABILITY: {:?}",
            s.query
        );
        assert_eq!(
            bearer_of(s).as_deref(),
            Some(format!("Bearer {KEY}").as_str())
        );
    }
    assert_requests_follow_the_spec(&seen);

    // A body without the list is not an empty catalogue.
    let server = mock(|_, _| json_reply(200, json!({"data": []}))).await;
    let err = runpod_v2(&server.base, RunpodWorkerAccess::PublicTcp, fast_http())
        .offers()
        .await
        .expect_err("no list");
    assert!(matches!(err, ProviderError::Transient(_)), "{err:?}");
}

#[tokio::test]
async fn runpod_v2_create_sends_a_schema_valid_body_with_the_label_twice() {
    let server = mock(|s, _| {
        let b = &s.body;
        let mut pod = v2_pod(
            "p1",
            b["name"].as_str().unwrap_or_default(),
            None,
            "PROVISIONING",
            Value::Null,
        );
        pod["env"] = b["env"].clone();
        json_reply(201, pod)
    })
    .await;
    let label = "gpupool-c1-\"}) { id } } 5d2a";
    let tcp = runpod_v2_with(
        &server.base,
        &runpod_v2_entry(RunpodWorkerAccess::PublicTcp, CloudType::All, vec![]),
        fast_http(),
    );
    let created = tcp
        .create(
            &some_offer("COMMUNITY:NVIDIA GeForce RTX 4090"),
            &create_request(label),
        )
        .await
        .expect("create");
    assert_eq!(created.id, "p1");
    assert_eq!(created.label.as_deref(), Some(label));
    assert_eq!(created.state, RemoteState::Starting);
    // No cost yet: the offer's price stands.
    assert_eq!(
        created.price_per_hour.map(|p| p.to_string()).as_deref(),
        Some("0.41")
    );
    assert_eq!(created.region.as_deref(), Some("EU-RO-1"));

    let proxy = runpod_v2_with(
        &server.base,
        &runpod_v2_entry(
            RunpodWorkerAccess::Proxy,
            CloudType::Secure,
            vec!["EU-RO-1".into(), "US-TX-3".into()],
        ),
        fast_http(),
    );
    proxy
        .create(
            &some_offer("SECURE:NVIDIA RTX A5000"),
            &create_request("gpupool-c1-u2"),
        )
        .await
        .expect("create");

    let seen = server.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(
        (seen[0].method.as_str(), seen[0].path.as_str()),
        ("POST", "/v2/pods")
    );
    assert_eq!(
        seen[0].body,
        json!({
            "name": label, "image": "ghcr.io/acme/video-worker:1.2",
            "gpu": {"id": "NVIDIA GeForce RTX 4090", "count": 1}, "cloud": "COMMUNITY",
            "ports": ["8000/tcp"], "disk": 16,
            "env": {"GPUPOOL_SESSION_TOKEN": "session-tok", "GPUPOOL_WORKER_PORT": "8000",
                    "GPUPOOL_LABEL": label}
        })
    );
    let second = &seen[1].body;
    assert_eq!(second["gpu"], json!({"id": "NVIDIA RTX A5000", "count": 1}));
    assert_eq!(second["cloud"], "SECURE");
    assert_eq!(second["ports"], json!(["8000/http"]));
    assert_eq!(second["dataCenterIds"], json!(["EU-RO-1", "US-TX-3"]));
    assert_requests_follow_the_spec(&seen);
}

#[tokio::test]
async fn runpod_v2_create_errors_map_and_ambiguous_ones_are_not_retried() {
    let cases: [(Reply, &str); 9] = [
        (
            problem(400, "Bad Request", NO_CAPACITY),
            "InsufficientCapacity",
        ),
        (
            problem(
                400,
                "Bad Request",
                "allowedCudaVersions and minCudaVersion are exclusive",
            ),
            "Permanent",
        ),
        (
            problem(402, "Payment Required", "insufficient balance"),
            "Permanent",
        ),
        (
            problem(403, "Forbidden", "access denied"),
            "InsufficientCapacity",
        ),
        (problem(404, "Not Found", "gpu type not found"), "Permanent"),
        (problem(409, "Conflict", "conflict"), "Permanent"),
        (
            problem(422, "Unprocessable Entity", "Request validation failed."),
            "Permanent",
        ),
        (problem(500, "Internal Server Error", "boom"), "Transient"),
        (
            problem(401, "Unauthorized", "invalid bearer token"),
            "Unauthorized",
        ),
    ];
    for (answer, want) in cases {
        let status = answer.status;
        let server = mock(move |_, _| answer.clone()).await;
        let err = runpod_v2(&server.base, RunpodWorkerAccess::PublicTcp, fast_http())
            .create(
                &some_offer("COMMUNITY:NVIDIA GeForce RTX 4090"),
                &create_request("gpupool-c1-u"),
            )
            .await
            .expect_err("refused");
        assert_eq!(err.label(), want, "{status}: {err}");
        assert_eq!(
            server.hits(),
            1,
            "{status}: a create is never repeated after an answer"
        );
        check_error_is_clean(&err);
        let text = err.to_string();
        match status {
            402 => assert!(text.contains("balance is too low"), "{text}"),
            403 => assert!(text.contains("pool"), "{text}"),
            422 => assert!(text.contains("gpupool bug"), "{text}"),
            _ => {}
        }
    }

    // A 201 whose body does not decode: the pod may exist; left to adoption by label.
    let server = mock(|_, _| {
        reply(
            201,
            "{\"id\": \"p1\", \"env\": {\"GPUPOOL_SESSION_TOKEN\": \"session-tok\"",
        )
    })
    .await;
    let err = runpod_v2(&server.base, RunpodWorkerAccess::PublicTcp, fast_http())
        .create(&some_offer("COMMUNITY:g"), &create_request("gpupool-c1-u"))
        .await
        .expect_err("cut body");
    assert!(matches!(err, ProviderError::Transient(_)), "{err:?}");
    assert!(!err.to_string().contains("session-tok"), "{err}");
    assert_eq!(server.hits(), 1);
}

#[tokio::test]
async fn runpod_v2_create_refused_with_429_waits_for_retry_after() {
    let server = mock(|s, i| {
        if i == 0 {
            problem(
                429,
                "Too Many Requests",
                "rate limit exceeded for the minute window",
            )
            .header("retry-after", "1")
        } else {
            json_reply(
                201,
                v2_pod(
                    "p9",
                    s.body["name"].as_str().unwrap_or_default(),
                    None,
                    "PROVISIONING",
                    Value::Null,
                ),
            )
        }
    })
    .await;
    let created = runpod_v2(&server.base, RunpodWorkerAccess::PublicTcp, fast_http())
        .create(&some_offer("COMMUNITY:g"), &create_request("gpupool-c1-u"))
        .await
        .expect("created after the wait");
    assert_eq!(created.id, "p9");
    let seen = server.seen();
    assert_eq!(seen.len(), 2);
    assert!(
        seen[1].at - seen[0].at >= Duration::from_secs(1),
        "Retry-After honoured"
    );

    let server = mock(|_, _| {
        problem(429, "Too Many Requests", "rate limit exceeded").header("retry-after", "7")
    })
    .await;
    let http = HttpConfig {
        retry: RetryPolicy {
            max_total: Duration::from_secs(2),
            ..fast_http().retry
        },
        ..fast_http()
    };
    let err = runpod_v2(&server.base, RunpodWorkerAccess::PublicTcp, http)
        .get("p1")
        .await
        .expect_err("limited");
    assert_eq!(
        err,
        ProviderError::RateLimited {
            retry_after: Some(Duration::from_secs(7))
        }
    );
    assert_eq!(server.hits(), 1, "a wait past the budget is not started");
}

#[tokio::test]
async fn runpod_v2_get_maps_states_endpoints_and_errors() {
    let server = mock(|s, _| {
        let id = s.path.rsplit('/').next().unwrap_or_default().to_string();
        let pod = |status: &str, runtime: Value| {
            json_reply(
                200,
                v2_pod(&id, "gpupool-c1-a", Some("gpupool-c1-a"), status, runtime),
            )
        };
        match id.as_str() {
            "running" => pod("RUNNING", v2_runtime()),
            "booting" => pod("STARTING", Value::Null),
            "provisioning" => pod("PROVISIONING", Value::Null),
            "broken" => pod("ERROR", Value::Null),
            "exited" => pod("EXITED", Value::Null),
            "gone" => pod("TERMINATED", Value::Null),
            "flaky" => problem(503, "Service Unavailable", "try later"),
            _ => problem(404, "Not Found", "pod not found"),
        }
    })
    .await;
    let tcp = runpod_v2(&server.base, RunpodWorkerAccess::PublicTcp, fast_http());
    let i = tcp.get("running").await.expect("running");
    assert_eq!(i.state, RemoteState::Running);
    assert_eq!(i.endpoint.as_deref(), Some("http://194.68.245.9:22117"));
    assert_eq!(
        i.price_per_hour.map(|p| p.to_string()).as_deref(),
        Some("0.34")
    );
    assert_eq!(i.gpu_name.as_deref(), Some("NVIDIA GeForce RTX 4090"));
    assert_eq!(i.region.as_deref(), Some("EU-RO-1"));
    assert_eq!(
        i.started_at,
        Some("2026-12-01T10:01:30Z".parse().expect("time"))
    );
    for starting in ["booting", "provisioning"] {
        let i = tcp.get(starting).await.expect(starting);
        assert_eq!(
            (i.state, i.endpoint),
            (RemoteState::Starting, None),
            "{starting}"
        );
    }
    let broken = tcp.get("broken").await.expect("broken");
    assert!(
        matches!(&broken.state, RemoteState::Stopped(m) if m.contains("ERROR")),
        "{broken:?}"
    );
    assert_eq!(broken.price_per_hour, None, "a cost of 0 is no price");
    assert!(
        matches!(tcp.get("exited").await.map(|i| i.state), Ok(RemoteState::Stopped(m)) if m.contains("EXITED"))
    );
    assert_eq!(
        tcp.get("gone").await.map(|i| i.state).ok(),
        Some(RemoteState::Terminated)
    );
    let err = tcp.get("unknown").await.expect_err("404");
    assert!(matches!(err, ProviderError::NotFound(_)), "{err:?}");
    let before = server.hits();
    let err = tcp.get("flaky").await.expect_err("503");
    assert!(matches!(err, ProviderError::Transient(_)), "{err:?}");
    assert_eq!(server.hits() - before, 3, "reads are retried");

    let proxy = runpod_v2(&server.base, RunpodWorkerAccess::Proxy, fast_http());
    assert_eq!(
        proxy
            .get("running")
            .await
            .expect("running")
            .endpoint
            .as_deref(),
        Some("https://running-8000.proxy.runpod.net")
    );
    let err = tcp.get("a/../b").await.expect_err("escaped id");
    assert!(matches!(err, ProviderError::NotFound(_)), "{err:?}");
    let seen = server.seen();
    assert!(
        seen.iter().any(|s| s.path == "/v2/pods/a%2F..%2Fb"),
        "ids are one path segment"
    );
    assert_requests_follow_the_spec(&seen);
}

#[tokio::test]
async fn runpod_v2_list_follows_cursors_and_takes_only_pods_marked_twice() {
    let server = mock(|s, _| {
        let page = s.query.get("cursor").cloned().unwrap_or_default();
        match page.as_str() {
            "" => json_reply(
                200,
                json!({"pods": [
                v2_pod("a", "gpupool-c1-a", Some("gpupool-c1-a"), "RUNNING", v2_runtime()),
                v2_pod("b", "my notebook", None, "RUNNING", Value::Null),
                // Named like ours, without the marker: a user's pod, never ours.
                v2_pod("x", "gpupool-c1-x", None, "RUNNING", Value::Null),
            ], "pagination": {"hasNextPage": true, "nextCursor": "page2"}}),
            ),
            "page2" => json_reply(
                200,
                json!({"pods": [
                // Renamed by someone: the name no longer says so.
                v2_pod("r", "renamed", Some("gpupool-c1-r"), "RUNNING", Value::Null),
                v2_pod("c", "gpupool-c1-c", Some("gpupool-c1-c"), "EXITED", Value::Null),
                v2_pod("d", "gpupool-c2-d", Some("gpupool-c2-d"), "RUNNING", Value::Null),
                {"name": "gpupool-c1-no-id", "env": {"GPUPOOL_LABEL": "gpupool-c1-no-id"}},
            ], "pagination": {"hasNextPage": true, "nextCursor": "page3"}}),
            ),
            _ => json_reply(
                200,
                json!({"pods": [
                v2_pod("t", "gpupool-c1-a", Some("gpupool-c1-a"), "TERMINATED", Value::Null),
            ], "pagination": {"hasNextPage": false, "nextCursor": null}}),
            ),
        }
    })
    .await;
    let client = runpod_v2(&server.base, RunpodWorkerAccess::PublicTcp, fast_http());
    let pods = client.list_labeled("gpupool-c1-").await.expect("list");
    let ids: Vec<_> = pods.iter().map(|p| p.id.as_str()).collect();
    assert_eq!(ids, ["a", "c", "t"]);
    assert_eq!(pods[0].label.as_deref(), Some("gpupool-c1-a"));
    let seen = server.seen();
    assert_eq!(seen.len(), 3);
    for s in &seen {
        assert_eq!((s.method.as_str(), s.path.as_str()), ("GET", "/v2/pods"));
        assert_eq!(s.query.get("limit").map(String::as_str), Some("100"));
        assert!(
            !s.query.contains_key("name"),
            "GET /pods has no name filter"
        );
    }
    assert_eq!(
        seen[1].query.get("cursor").map(String::as_str),
        Some("page2")
    );
    assert_requests_follow_the_spec(&seen);

    // The live pod with the label wins over a terminated one listed later... or earlier.
    let found = client.find_by_label("gpupool-c1-a").await.expect("find");
    assert_eq!(found.map(|i| i.id).as_deref(), Some("a"));
    assert_eq!(
        client.find_by_label("gpupool-c1-x").await.expect("find"),
        None
    );

    // The August form: a bare {"pods": [...]} is the whole list.
    let server = mock(|_, _| {
        json_reply(200, json!({"pods": [v2_pod("a", "gpupool-c1-a", Some("gpupool-c1-a"), "RUNNING", Value::Null)]}))
    })
    .await;
    let pods = runpod_v2(&server.base, RunpodWorkerAccess::PublicTcp, fast_http())
        .list_labeled("gpupool-c1-")
        .await
        .expect("list");
    assert_eq!(pods.len(), 1);
    assert_eq!(server.hits(), 1);
}

#[tokio::test]
async fn runpod_v2_pages_that_loop_or_never_end_are_errors_not_hangs() {
    let server = mock(|_, _| {
        json_reply(
            200,
            json!({"pods": [], "pagination": {"hasNextPage": true, "nextCursor": "same"}}),
        )
    })
    .await;
    let err = runpod_v2(&server.base, RunpodWorkerAccess::PublicTcp, fast_http())
        .list_labeled("gpupool-c1-")
        .await
        .expect_err("loop");
    assert!(matches!(err, ProviderError::Transient(_)), "{err:?}");
    assert_eq!(server.hits(), 2);

    let server = mock(|_, i| {
        json_reply(
            200,
            json!({"pods": [], "pagination": {"hasNextPage": true, "nextCursor": format!("c{i}")}}),
        )
    })
    .await;
    let err = runpod_v2(&server.base, RunpodWorkerAccess::PublicTcp, fast_http())
        .find_by_label("gpupool-c1-u")
        .await
        .expect_err("endless");
    assert!(
        matches!(&err, ProviderError::Transient(m) if m.contains("pages")),
        "{err:?}"
    );
    assert_eq!(server.hits(), gpupool::provider::runpod_v2::MAX_PAGES);
}

#[tokio::test]
async fn runpod_v2_delete_of_a_gone_pod_is_ok() {
    let server = mock(|s, _| match s.path.as_str() {
        "/v2/pods/live" => reply(204, ""),
        "/v2/pods/gone" => problem(404, "Not Found", "pod not found"),
        "/v2/pods/member" => problem(409, "Conflict", "pod belongs to a cluster"),
        _ => problem(403, "Forbidden", "access denied"),
    })
    .await;
    let client = runpod_v2(&server.base, RunpodWorkerAccess::PublicTcp, fast_http());
    client.delete("live").await.expect("terminate");
    client.delete("gone").await.expect("already gone");
    let err = client.delete("member").await.expect_err("cluster pod");
    assert!(
        matches!(&err, ProviderError::Permanent(m) if m.contains("cluster")),
        "{err:?}"
    );
    let err = client.delete("other").await.expect_err("forbidden");
    assert!(matches!(err, ProviderError::Unauthorized(_)), "{err:?}");
    let seen = server.seen();
    assert!(seen.iter().all(|s| s.method == "DELETE"));
    assert_requests_follow_the_spec(&seen);
}

#[tokio::test]
async fn runpod_v2_bad_key_is_unauthorized_and_never_quoted() {
    let server = mock(|s, _| {
        let mut r = reply(401, echo_body(s));
        r.headers = vec![("content-type", "application/problem+json".into())];
        r
    })
    .await;
    let client = runpod_v2(&server.base, RunpodWorkerAccess::PublicTcp, fast_http());
    for err in [
        client.offers().await.expect_err("401"),
        client.get("x").await.expect_err("401"),
        client.delete("x").await.expect_err("401"),
        client.list_labeled("gpupool-").await.expect_err("401"),
        client
            .create(&some_offer("COMMUNITY:g"), &create_request("gpupool-c-u"))
            .await
            .expect_err("401"),
    ] {
        assert!(matches!(err, ProviderError::Unauthorized(_)), "{err:?}");
        check_error_is_clean(&err);
        assert!(!err.to_string().contains("session-tok"), "{err}");
    }
    // A problem document that quotes the key, the way a proxy might.
    let server = mock(|s, _| {
        problem(
            403,
            "Forbidden",
            &format!(
                "token {} lacks pods:write",
                bearer_of(s).unwrap_or_default()
            ),
        )
    })
    .await;
    let err = runpod_v2(&server.base, RunpodWorkerAccess::PublicTcp, fast_http())
        .get("x")
        .await
        .expect_err("403");
    assert!(matches!(err, ProviderError::Unauthorized(_)), "{err:?}");
    check_error_is_clean(&err);
    assert!(err.to_string().contains("lacks pods:write"), "{err}");
    assert_no_secret(&format!("{client:?}"));
}

#[test]
fn the_schema_check_catches_what_runpod_would_refuse() {
    let good = json!({"name": "gpupool-c-u", "image": "img:1",
                      "gpu": {"id": "NVIDIA GeForce RTX 4090", "count": 1}, "cloud": "SECURE"});
    assert_eq!(
        v2_violations("POST", "/v2/pods", &good),
        Vec::<String>::new()
    );
    let published = &v2_spec()["paths"]["/v2/pods"]["post"]["requestBody"]["content"]["application/json"]
        ["examples"]["gpuPod"]["value"];
    assert_eq!(
        v2_violations("POST", "/v2/pods", published),
        Vec::<String>::new()
    );
    // What the GraphQL client sends, and what a careless port would: all refused.
    for (field, value) in [
        ("supportPublicIp", json!(true)),
        ("volumeInGb", json!(0)),
        ("imageName", json!("img:1")),
        ("cloud", json!("ALL")),
        ("gpu", json!({"count": 1})),
        ("gpu", json!({"id": "g", "count": 0})),
        ("ports", json!("8000/tcp")),
        ("env", json!([{"key": "A", "value": "b"}])),
        ("disk", json!(0)),
    ] {
        let mut bad = good.clone();
        bad[field] = value.clone();
        assert!(
            !v2_violations("POST", "/v2/pods", &bad).is_empty(),
            "{field}: {value} passed"
        );
    }
    let mut no_image = good.clone();
    no_image.as_object_mut().map(|o| o.remove("image"));
    assert!(!v2_violations("POST", "/v2/pods", &no_image).is_empty());

    let patch = json!({"workers": {"min": 0, "max": 3, "idleTimeout": 300}});
    assert_eq!(
        v2_violations("PATCH", "/v2/serverless/{id}", &patch),
        Vec::<String>::new()
    );
    for bad in [
        json!({"workers": {"min": 0, "max": 3, "idleTimeout": 0}}),
        json!({"workers": {"workersMin": 0}}),
        json!({"idleTimeout": 5}),
    ] {
        assert!(
            !v2_violations("PATCH", "/v2/serverless/{id}", &bad).is_empty(),
            "{bad}"
        );
    }
}

// ---------------------------------------------------------------- RunPod Serverless

fn serverless(base: &str, graphql: &str, http: HttpConfig) -> RunpodServerlessClient {
    RunpodServerlessClient::new(
        &RunpodServerlessProvider {
            endpoint_id: "ep123abc".into(),
            manage_endpoint_settings: true,
            api: RunpodApi::GraphQL,
            credentials_secret_ref: SecretKeyRef::new("runpod", "key"),
        },
        Credentials::new(KEY),
        RunpodServerlessOptions {
            base_url: format!("{base}/v2"),
            rest_base_url: format!("{graphql}/v2"),
            graphql_base_url: graphql.into(),
            http,
        },
    )
    .expect("serverless client")
}

#[tokio::test]
async fn serverless_submit_wraps_the_input_and_returns_the_job_id() {
    let server = mock(|_, _| {
        json_reply(
            200,
            json!({"id": "eaebd6e7-6a92-4bb8-a911-f996ac5ea99d", "status": "IN_QUEUE"}),
        )
    })
    .await;
    let input = json!({"operation": "transcode", "src": "s3://b/k.mp4"});
    let id = serverless(&server.base, &server.base, fast_http())
        .submit(&input)
        .await
        .expect("submit");
    assert_eq!(id, "eaebd6e7-6a92-4bb8-a911-f996ac5ea99d");
    let s = &server.seen()[0];
    assert_eq!(
        (s.method.as_str(), s.path.as_str()),
        ("POST", "/v2/ep123abc/run")
    );
    assert_eq!(s.body, json!({"input": input}));
    assert_eq!(
        bearer_of(s).as_deref(),
        Some(format!("Bearer {KEY}").as_str())
    );
}

#[tokio::test]
async fn serverless_submit_is_retried_only_when_refused() {
    let server = mock(|_, _| reply(500, "oops")).await;
    let err = serverless(&server.base, &server.base, fast_http())
        .submit(&json!({}))
        .await
        .expect_err("500");
    assert!(matches!(err, ProviderError::Transient(_)), "{err:?}");
    assert_eq!(server.hits(), 1, "the job may be queued: no blind retry");

    let server = mock(|_, i| {
        if i == 0 {
            reply(429, "")
        } else {
            json_reply(200, json!({"id": "j1", "status": "IN_QUEUE"}))
        }
    })
    .await;
    let id = serverless(&server.base, &server.base, fast_http())
        .submit(&json!({}))
        .await
        .expect("after 429");
    assert_eq!((id.as_str(), server.hits()), ("j1", 2));
}

#[tokio::test]
async fn serverless_status_maps_every_state() {
    let server = mock(|s, _| {
        let id = s.path.rsplit('/').next().unwrap_or_default().to_string();
        match id.as_str() {
            "expired" => reply(404, "job not found"),
            "failed" => json_reply(200, json!({"id": id, "status": "FAILED", "error": "ffmpeg exited with 1", "delayTime": 10, "executionTime": 20})),
            "done" => json_reply(200, json!({"id": id, "status": "COMPLETED", "output": {"url": "s3://out"}, "delayTime": 824, "executionTime": 3391})),
            other => json_reply(200, json!({"id": other, "status": other.to_uppercase()})),
        }
    })
    .await;
    let client = serverless(&server.base, &server.base, fast_http());
    for (id, want) in [
        ("in_queue", ServerlessStatus::InQueue),
        ("in_progress", ServerlessStatus::InProgress),
        ("running", ServerlessStatus::InProgress),
        ("cancelled", ServerlessStatus::Cancelled),
        ("timed_out", ServerlessStatus::TimedOut),
    ] {
        assert_eq!(
            client.status(id).await.map(|j| j.status).ok(),
            Some(want.clone()),
            "{id}"
        );
    }
    let done = client.status("done").await.expect("done");
    assert_eq!(done.status, ServerlessStatus::Completed);
    assert!(done.status.is_final());
    assert_eq!(done.output, Some(json!({"url": "s3://out"})));
    assert_eq!(
        (done.delay_time_ms, done.execution_time_ms),
        (Some(824), Some(3391))
    );
    let failed = client.status("failed").await.expect("failed");
    assert_eq!(failed.status, ServerlessStatus::Failed);
    assert_eq!(failed.error.as_deref(), Some("ffmpeg exited with 1"));
    let err = client.status("expired").await.expect_err("404");
    assert!(matches!(err, ProviderError::NotFound(_)), "{err:?}");
    assert_eq!(server.seen()[0].path, "/v2/ep123abc/status/in_queue");
}

#[tokio::test]
async fn serverless_cancel_is_ok_for_gone_and_final_jobs() {
    let server = mock(|s, _| match s.path.rsplit('/').next() {
        Some("live") => json_reply(200, json!({"id": "live", "status": "CANCELLED"})),
        Some("gone") => reply(404, "not found"),
        Some("done") => json_reply(400, json!({"error": "Job already COMPLETED"})),
        _ => reply(401, "Unauthorized"),
    })
    .await;
    let client = serverless(&server.base, &server.base, fast_http());
    for id in ["live", "gone", "done"] {
        client
            .cancel(id)
            .await
            .unwrap_or_else(|e| panic!("{id}: {e}"));
    }
    let err = client.cancel("other").await.expect_err("401");
    assert!(matches!(err, ProviderError::Unauthorized(_)), "{err:?}");
    assert!(
        server
            .seen()
            .iter()
            .all(|s| s.method == "POST" && s.path.starts_with("/v2/ep123abc/cancel/"))
    );
}

#[tokio::test]
async fn serverless_health_counts() {
    let server = mock(|_, _| json_reply(200, json!({"jobs": {"completed": 1, "failed": 5, "inProgress": 2, "inQueue": 3, "retried": 0}, "workers": {"idle": 1, "running": 2, "initializing": 1}}))).await;
    let h = serverless(&server.base, &server.base, fast_http())
        .health()
        .await
        .expect("health");
    assert_eq!(
        (
            h.jobs_in_queue,
            h.jobs_in_progress,
            h.jobs_completed,
            h.jobs_failed
        ),
        (3, 2, 1, 5)
    );
    assert_eq!((h.workers_idle, h.workers_running), (1, 2));
    assert_eq!(server.seen()[0].path, "/v2/ep123abc/health");
}

/// A GraphQL server holding one endpoint; `saveEndpoint` replaces it wholesale, as RunPod
/// does, so a field the client forgets to send comes back reset.
#[tokio::test]
async fn serverless_settings_update_preserves_every_other_field() {
    let stored = Arc::new(Mutex::new(json!({
        "id": "ep123abc", "name": "video-xcode", "templateId": "tpl9", "gpuIds": "ADA_24,AMPERE_24",
        "gpuCount": 1, "instanceIds": null, "idleTimeout": 5, "locations": "EU-RO-1,US-TX-3",
        "networkVolumeId": "vol1", "networkVolumeIds": [{"networkVolumeId": "vol1"}],
        "scalerType": "REQUEST_COUNT", "scalerValue": 2, "workersMin": 0, "workersMax": 3,
        "flashBootType": "FLASHBOOT", "executionTimeoutMs": 1200000, "allowedCudaVersions": "12.4",
        "minCudaVersion": null, "type": "QB", "modelReferences": []
    })));
    let state = stored.clone();
    let server = mock(move |s, _| {
        let q = gql_query(s);
        if q.contains("saveEndpoint") {
            let input = s.body["variables"]["input"].clone();
            *state.lock().expect("lock") = input.clone();
            json_reply(200, json!({"data": {"saveEndpoint": {"id": input["id"], "idleTimeout": input["idleTimeout"], "workersMin": input["workersMin"], "workersMax": input["workersMax"]}}}))
        } else {
            let current = state.lock().expect("lock").clone();
            json_reply(200, json!({"data": {"myself": {"endpoints": [
                {"id": "other", "name": "x", "idleTimeout": 1, "workersMin": 0, "workersMax": 1},
                current
            ]}}}))
        }
    })
    .await;
    let client = serverless(&server.base, &server.base, fast_http());
    let before = client.settings().await.expect("settings");
    assert_eq!(
        before,
        EndpointSettings {
            idle_timeout_seconds: 5,
            workers_min: 0,
            workers_max: 3
        }
    );

    let wanted = EndpointSettings {
        idle_timeout_seconds: 300,
        workers_min: 1,
        workers_max: 8,
    };
    client.update_settings(&wanted).await.expect("update");
    assert_eq!(client.settings().await.expect("settings"), wanted);

    let after = stored.lock().expect("lock").clone();
    assert_eq!(
        after,
        json!({
            "id": "ep123abc", "name": "video-xcode", "templateId": "tpl9", "gpuIds": "ADA_24,AMPERE_24",
            "gpuCount": 1, "idleTimeout": 300, "locations": "EU-RO-1,US-TX-3",
            "networkVolumeId": "vol1", "networkVolumeIds": [{"networkVolumeId": "vol1"}],
            "scalerType": "REQUEST_COUNT", "scalerValue": 2, "workersMin": 1, "workersMax": 8,
            "flashBootType": "FLASHBOOT", "executionTimeoutMs": 1200000, "allowedCudaVersions": "12.4",
            "type": "QB", "modelReferences": []
        })
    );
    let saves: Vec<_> = server
        .seen()
        .into_iter()
        .filter(|s| gql_query(s).contains("saveEndpoint"))
        .collect();
    assert_eq!(saves.len(), 1);
    assert!(gql_query(&saves[0]).contains("saveEndpoint(input: $input)"));
    assert!(gql_query(&saves[0]).contains("EndpointInput!"));

    // Already in line: no write at all.
    client.update_settings(&wanted).await.expect("no-op");
    assert_eq!(
        server
            .seen()
            .iter()
            .filter(|s| gql_query(s).contains("saveEndpoint"))
            .count(),
        1
    );
}

#[tokio::test]
async fn serverless_unknown_endpoint_and_bad_key() {
    let server = mock(|s, _| {
        if s.path == "/graphql" {
            json_reply(200, json!({"data": {"myself": {"endpoints": []}}}))
        } else {
            reply(401, echo_body(s))
        }
    })
    .await;
    let client = serverless(&server.base, &server.base, fast_http());
    let err = client.settings().await.expect_err("missing");
    assert!(matches!(err, ProviderError::NotFound(_)), "{err:?}");
    let err = client
        .update_settings(&EndpointSettings {
            idle_timeout_seconds: 1,
            workers_min: 0,
            workers_max: 1,
        })
        .await
        .expect_err("missing");
    assert!(matches!(err, ProviderError::NotFound(_)), "{err:?}");
    for err in [
        client.submit(&json!({"k": KEY})).await.expect_err("401"),
        client.status("j").await.expect_err("401"),
        client.health().await.expect_err("401"),
    ] {
        assert!(matches!(err, ProviderError::Unauthorized(_)), "{err:?}");
        check_error_is_clean(&err);
    }
    assert_no_secret(&format!("{client:?}"));
}

#[test]
fn constructors_refuse_bad_configuration() {
    let bad_url = VastClient::new(
        &vast_entry(),
        WorkerShape {
            port: 8000,
            disk_gb: 10,
        },
        Credentials::new(KEY),
        VastOptions {
            base_url: format!("https://user:{KEY}@console.vast.ai"),
            http: fast_http(),
        },
    )
    .expect_err("credentials in URL");
    check_error_is_clean(&bad_url);
    let empty_key = VastClient::new(
        &vast_entry(),
        WorkerShape {
            port: 8000,
            disk_gb: 10,
        },
        Credentials::new(""),
        VastOptions::default(),
    )
    .expect_err("empty key");
    assert!(matches!(empty_key, ProviderError::Unauthorized(_)));
    let bad_price = VastClient::new(
        &VastProvider {
            max_price_per_hour: "cheap".into(),
            ..vast_entry()
        },
        WorkerShape {
            port: 8000,
            disk_gb: 10,
        },
        Credentials::new(KEY),
        VastOptions::default(),
    )
    .expect_err("price");
    assert!(matches!(bad_price, ProviderError::Permanent(_)));
    let bad_endpoint = RunpodServerlessClient::new(
        &RunpodServerlessProvider {
            endpoint_id: "../x".into(),
            manage_endpoint_settings: false,
            api: RunpodApi::GraphQL,
            credentials_secret_ref: SecretKeyRef::new("a", "b"),
        },
        Credentials::new(KEY),
        RunpodServerlessOptions::default(),
    )
    .expect_err("endpoint id");
    assert!(matches!(bad_endpoint, ProviderError::Permanent(_)));
}

fn serverless_v2(base: &str, http: HttpConfig) -> RunpodServerlessClient {
    RunpodServerlessClient::new(
        &RunpodServerlessProvider {
            endpoint_id: "ep123abc".into(),
            manage_endpoint_settings: true,
            api: RunpodApi::RestV2,
            credentials_secret_ref: SecretKeyRef::new("runpod", "key"),
        },
        Credentials::new(KEY),
        RunpodServerlessOptions {
            base_url: format!("{base}/jobs/v2"),
            rest_base_url: format!("{base}/v2"),
            graphql_base_url: format!("{base}/never"),
            http,
        },
    )
    .expect("serverless client")
}

fn v2_endpoint(kind: &str, scaling: Value, workers: Value) -> Value {
    json!({
        "id": "ep123abc", "name": "video", "type": kind, "image": "img:1", "args": "", "disk": 20,
        "ports": [], "env": {}, "registry": null,
        "gpu": {"pools": ["ADA_24"], "count": 1, "allowedCudaVersions": [], "minCudaVersion": null},
        "workers": workers, "scaling": scaling, "dataCenterIds": [], "networkVolumes": [],
        "timeout": 600000, "flashboot": "OFF", "createdAt": "2026-12-01T10:00:00Z"
    })
}

#[tokio::test]
async fn serverless_v2_settings_are_read_and_patched_partially() {
    let stored = Arc::new(Mutex::new(json!({"min": 0, "max": 5, "idleTimeout": 5})));
    let state = stored.clone();
    let server = mock(move |s, _| {
        let mut workers = state.lock().expect("lock");
        if s.method == "PATCH"
            && let Some(w) = s.body["workers"].as_object()
        {
            for (k, v) in w {
                workers[k] = v.clone();
            }
        }
        json_reply(
            200,
            v2_endpoint(
                "QUEUE",
                json!({"type": "QUEUE_DELAY", "queueDelay": 4}),
                workers.clone(),
            ),
        )
    })
    .await;
    let sls = serverless_v2(&server.base, fast_http());
    assert_eq!(
        sls.settings().await.expect("settings"),
        EndpointSettings {
            idle_timeout_seconds: 5,
            workers_min: 0,
            workers_max: 5
        }
    );
    let wanted = EndpointSettings {
        idle_timeout_seconds: 300,
        workers_min: 1,
        workers_max: 4,
    };
    sls.update_settings(&wanted).await.expect("update");
    assert_eq!(sls.settings().await.expect("settings"), wanted);

    let seen = server.seen();
    let methods: Vec<_> = seen
        .iter()
        .map(|s| (s.method.as_str(), s.path.as_str()))
        .collect();
    assert_eq!(
        methods,
        [
            ("GET", "/v2/serverless/ep123abc"),
            ("PATCH", "/v2/serverless/ep123abc"),
            ("GET", "/v2/serverless/ep123abc")
        ],
        "no read-modify-write, no GraphQL"
    );
    assert_eq!(
        seen[1].body,
        json!({"workers": {"min": 1, "max": 4, "idleTimeout": 300}})
    );
    assert_requests_follow_the_spec(&seen);
}

#[tokio::test]
async fn serverless_v2_request_count_scaling_is_a_clear_error() {
    // Queue-based by request count: RunPod leaves idleTimeout out and refuses one.
    let server = mock(|s, _| {
        if s.method == "PATCH" {
            let mut r = json_reply(
                422,
                json!({"title": "Unprocessable Entity", "status": 422,
                "detail": "Request validation failed.",
                "errors": ["workers.idleTimeout: not applicable with REQUEST_COUNT scaling"]}),
            );
            r.headers = vec![("content-type", "application/problem+json".into())];
            return r;
        }
        json_reply(
            200,
            v2_endpoint(
                "QUEUE",
                json!({"type": "REQUEST_COUNT", "requestCount": 4}),
                json!({"min": 0, "max": 3}),
            ),
        )
    })
    .await;
    let sls = serverless_v2(&server.base, fast_http());
    let err = sls.settings().await.expect_err("no idle timeout");
    assert!(
        matches!(&err, ProviderError::Permanent(m) if m.contains("REQUEST_COUNT") && m.contains("manageEndpointSettings")),
        "{err:?}"
    );
    let s = EndpointSettings {
        idle_timeout_seconds: 60,
        workers_min: 0,
        workers_max: 3,
    };
    let err = sls.update_settings(&s).await.expect_err("422");
    assert!(
        matches!(&err, ProviderError::Permanent(m) if m.contains("REQUEST_COUNT") && m.contains("QUEUE_DELAY")),
        "{err:?}"
    );
    let seen = server.seen();
    assert_eq!(seen.len(), 3, "a 422 is not retried; one read tells why");
    assert_requests_follow_the_spec(&seen);

    // A 422 on an endpoint that takes idle timeouts: our body was wrong, and the error says so.
    let server = mock(|s, _| {
        if s.method == "PATCH" {
            return problem(422, "Unprocessable Entity", "Request validation failed.");
        }
        json_reply(
            200,
            v2_endpoint(
                "QUEUE",
                json!({"type": "QUEUE_DELAY", "queueDelay": 4}),
                json!({"min": 0, "max": 3, "idleTimeout": 5}),
            ),
        )
    })
    .await;
    let err = serverless_v2(&server.base, fast_http())
        .update_settings(&s)
        .await
        .expect_err("422");
    assert!(
        matches!(&err, ProviderError::Permanent(m) if m.contains("gpupool bug")),
        "{err:?}"
    );
}

#[tokio::test]
async fn serverless_v2_unknown_endpoint_and_bad_key() {
    let server = mock(|s, _| {
        if bearer_of(s).as_deref() == Some(format!("Bearer {KEY}").as_str()) {
            problem(404, "Not Found", "endpoint not found")
        } else {
            problem(401, "Unauthorized", "invalid bearer token")
        }
    })
    .await;
    let sls = serverless_v2(&server.base, fast_http());
    assert!(matches!(
        sls.settings().await,
        Err(ProviderError::NotFound(_))
    ));
    let s = EndpointSettings {
        idle_timeout_seconds: 60,
        workers_min: 0,
        workers_max: 3,
    };
    assert!(matches!(
        sls.update_settings(&s).await,
        Err(ProviderError::NotFound(_))
    ));
    // The jobs API is unchanged: it stays on the Serverless base.
    let _ = sls.health().await;
    assert!(
        server
            .seen()
            .last()
            .is_some_and(|s| s.path == "/jobs/v2/ep123abc/health")
    );
}

// ---------------------------------------------------------------- every client, every class

#[derive(Clone, Copy, Debug)]
enum Kind {
    Vast,
    Runpod,
    RunpodV2,
    Serverless,
    ServerlessV2,
}

const KINDS: [Kind; 5] = [
    Kind::Vast,
    Kind::Runpod,
    Kind::RunpodV2,
    Kind::Serverless,
    Kind::ServerlessV2,
];

/// A good answer to the read `read_once` makes.
fn ok_body(kind: Kind) -> Value {
    match kind {
        Kind::Vast => json!({"instances": vast_instance(5, "gpupool-c1-x", Some("running"))}),
        Kind::Runpod => {
            json!({"data": {"pod": pod("p5", "gpupool-c1-x", "RUNNING", public_runtime())}})
        }
        Kind::RunpodV2 => v2_pod(
            "p5",
            "gpupool-c1-x",
            Some("gpupool-c1-x"),
            "RUNNING",
            v2_runtime(),
        ),
        Kind::Serverless => json!({"id": "j5", "status": "IN_QUEUE"}),
        Kind::ServerlessV2 => v2_endpoint(
            "QUEUE",
            json!({"type": "QUEUE_DELAY", "queueDelay": 4}),
            json!({"min": 0, "max": 3, "idleTimeout": 5}),
        ),
    }
}

/// One idempotent read of each client: Vast `get`, RunPod `get` (GraphQL and REST v2),
/// Serverless `status`, REST v2 endpoint `settings`.
async fn read_once(kind: Kind, base: &str, http: HttpConfig) -> Result<(), ProviderError> {
    match kind {
        Kind::Vast => vast(base, http).get("5").await.map(drop),
        Kind::Runpod => runpod(base, RunpodWorkerAccess::PublicTcp, vec![], http)
            .get("p5")
            .await
            .map(drop),
        Kind::RunpodV2 => runpod_v2(base, RunpodWorkerAccess::PublicTcp, http)
            .get("p5")
            .await
            .map(drop),
        Kind::Serverless => serverless(base, base, http).status("j5").await.map(drop),
        Kind::ServerlessV2 => serverless_v2(base, http).settings().await.map(drop),
    }
}

#[tokio::test]
async fn every_client_retries_a_429_that_clears() {
    for kind in KINDS {
        let server = mock(move |_, i| {
            if i < 2 {
                reply(429, "too many")
            } else {
                json_reply(200, ok_body(kind))
            }
        })
        .await;
        read_once(kind, &server.base, fast_http())
            .await
            .unwrap_or_else(|e| panic!("{kind:?}: {e}"));
        let seen = server.seen();
        assert_eq!(seen.len(), 3, "{kind:?}");
        assert!(
            seen[2].at - seen[0].at >= Duration::from_millis(150),
            "{kind:?}"
        );
    }
}

#[tokio::test]
async fn every_client_reports_a_429_that_never_clears() {
    for kind in KINDS {
        let server = mock(|_, _| reply(429, "too many")).await;
        let err = read_once(kind, &server.base, fast_http())
            .await
            .expect_err("429");
        assert_eq!(
            err,
            ProviderError::RateLimited { retry_after: None },
            "{kind:?}"
        );
        assert_eq!(server.hits(), 3, "{kind:?}");
    }
}

#[tokio::test]
async fn every_client_treats_5xx_as_transient() {
    for kind in KINDS {
        let server = mock(|_, _| reply(500, "internal error")).await;
        let err = read_once(kind, &server.base, fast_http())
            .await
            .expect_err("500");
        assert!(
            matches!(err, ProviderError::Transient(_)),
            "{kind:?}: {err:?}"
        );
        assert_eq!(server.hits(), 3, "{kind:?}");
    }
}

#[tokio::test]
async fn every_client_times_out_within_the_configured_time() {
    for kind in KINDS {
        let server =
            mock(move |_, _| json_reply(200, ok_body(kind)).delayed(Duration::from_secs(5))).await;
        let http = HttpConfig {
            request_timeout: Duration::from_millis(250),
            retry: RetryPolicy {
                max_attempts: 2,
                ..fast_http().retry
            },
            ..fast_http()
        };
        let started = Instant::now();
        let err = read_once(kind, &server.base, http)
            .await
            .expect_err("timeout");
        let took = started.elapsed();
        assert!(
            matches!(&err, ProviderError::Transient(m) if m.contains("timed out")),
            "{kind:?}: {err:?}"
        );
        assert!(
            took >= Duration::from_millis(500) && took < Duration::from_secs(3),
            "{kind:?}: {took:?}"
        );
    }
}

#[tokio::test]
async fn every_client_reports_malformed_json_clearly() {
    for kind in KINDS {
        let server = mock(|_, _| reply(200, "{\"truncated\": ")).await;
        let err = read_once(kind, &server.base, fast_http())
            .await
            .expect_err("malformed");
        assert!(
            matches!(&err, ProviderError::Transient(m) if m.contains("unexpected") || m.contains("without data")),
            "{kind:?}: {err:?}"
        );
    }
}

#[tokio::test]
async fn every_client_maps_401_to_unauthorized_without_the_key() {
    for kind in KINDS {
        let server = mock(|s, _| reply(401, echo_body(s))).await;
        let err = read_once(kind, &server.base, fast_http())
            .await
            .expect_err("401");
        assert!(
            matches!(err, ProviderError::Unauthorized(_)),
            "{kind:?}: {err:?}"
        );
        check_error_is_clean(&err);
        assert_eq!(server.hits(), 1, "{kind:?}");
    }
}
