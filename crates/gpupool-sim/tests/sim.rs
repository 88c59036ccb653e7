//! The provider simulator over real HTTP: every API surface, the instance life cycle, billing,
//! every fault kind, the admin API, and the `gpupool-sim` binary.
//!
//! Each test starts its own in-process simulator on a free loopback port and talks to it with
//! reqwest, as the operator will. Waiting is done by polling the API or the admin state.

use std::{
    future::Future,
    io::{BufRead, BufReader},
    net::TcpStream,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use gpupool_sim::{self as sim, EndpointSpec, SimConfig, SimHandle, VastOfferSpec};
use reqwest::{Client, Method, RequestBuilder, StatusCode};
use serde_json::{Value, json};

const VAST_KEY: &str = "vast-test-key";
const RUNPOD_KEY: &str = "runpod-test-key";
const GPU_4090: &str = "NVIDIA GeForce RTX 4090";

struct Sim {
    h: SimHandle,
    c: Client,
}

fn client() -> Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("reqwest client")
}

async fn start(config: SimConfig) -> Sim {
    let h = sim::start(config).await.expect("simulator starts");
    Sim { h, c: client() }
}

async fn fast() -> Sim {
    start(SimConfig::fast()).await
}

/// Polls `f` until it yields a value (10 s at most).
async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn body(res: reqwest::Response) -> (StatusCode, Value) {
    let status = res.status();
    let text = res.text().await.expect("body");
    let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, v)
}

/// A query string, encoded as the vastai client does (`quote_plus`).
fn qs(params: &[(&str, String)]) -> String {
    let mut ser = url::form_urlencoded::Serializer::new(String::new());
    for (k, v) in params {
        ser.append_pair(k, v);
    }
    ser.finish()
}

fn port_open(port: u16) -> bool {
    TcpStream::connect(("127.0.0.1", port)).is_ok()
}

fn ts(v: &Value) -> jiff::Timestamp {
    v.as_str()
        .expect("timestamp string")
        .parse()
        .expect("RFC 3339")
}

impl Sim {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.h.base_url)
    }

    fn vast(&self, method: Method, path: &str) -> RequestBuilder {
        self.c.request(method, self.url(path)).bearer_auth(VAST_KEY)
    }

    async fn admin(&self, path: &str) -> Value {
        body(self.c.get(self.url(path)).send().await.expect("admin"))
            .await
            .1
    }

    async fn admin_put(&self, path: &str, v: Value) -> (StatusCode, Value) {
        body(
            self.c
                .put(self.url(path))
                .json(&v)
                .send()
                .await
                .expect("admin put"),
        )
        .await
    }

    async fn gql(&self, query: &str, variables: Value) -> (StatusCode, Value) {
        let req = json!({"query": query, "variables": variables});
        body(
            self.c
                .post(self.url("/graphql"))
                .bearer_auth(RUNPOD_KEY)
                .json(&req)
                .send()
                .await
                .expect("graphql"),
        )
        .await
    }

    async fn vast_create(&self, offer: u64, label: &str, env: Value) -> (StatusCode, Value) {
        let req = json!({
            "client_id": "me", "image": "ghcr.io/gpupool/worker:test", "env": env, "price": null,
            "disk": 10, "label": label, "extra": null, "onstart": null, "runtype": "args",
        });
        body(
            self.vast(Method::PUT, &format!("/api/v0/asks/{offer}/"))
                .json(&req)
                .send()
                .await
                .expect("create"),
        )
        .await
    }

    async fn vast_show(&self, id: u64) -> Value {
        let (s, v) = body(
            self.vast(Method::GET, &format!("/api/v0/instances/{id}/?owner=me"))
                .send()
                .await
                .expect("show"),
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        v["instances"].clone()
    }

    async fn vast_running(&self, id: u64) -> Value {
        eventually("vast instance running", || async {
            let row = self.vast_show(id).await;
            (row["actual_status"] == "running").then_some(row)
        })
        .await
    }

    async fn create_pod(&self, ports: &str, env: &[(&str, &str)], gpu_count: u32) -> String {
        let env: Vec<String> = env
            .iter()
            .map(|(k, v)| format!("{{key: \"{k}\", value: \"{v}\"}}"))
            .collect();
        let q = format!(
            "mutation {{ podFindAndDeployOnDemand(input: {{name: \"gpupool-c-pod\", imageName: \"img:1\", gpuTypeId: \"{GPU_4090}\", \
             cloudType: ALL, gpuCount: {gpu_count}, ports: \"{ports}\", env: [{}], dataCenterId: null, supportPublicIp: true}}) \
             {{ id imageName env machineId machine {{ podHostId }} }} }}",
            env.join(", ")
        );
        let (s, v) = self.gql(&q, json!({})).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        v["data"]["podFindAndDeployOnDemand"]["id"]
            .as_str()
            .expect("pod id")
            .to_string()
    }

    async fn pod(&self, id: &str) -> Value {
        let q = format!(
            "query {{ pod(input: {{podId: \"{id}\"}}) {{ id desiredStatus costPerHr gpuCount runtime {{ ports {{ ip isIpPublic privatePort publicPort type }} }} }} }}"
        );
        let (s, v) = self.gql(&q, json!({})).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        v["data"]["pod"].clone()
    }

    async fn pod_running(&self, id: &str) -> Value {
        eventually("pod running", || async {
            let p = self.pod(id).await;
            (!p["runtime"].is_null()).then_some(p)
        })
        .await
    }

    async fn job(
        &self,
        port: u16,
        op: &str,
        job: &str,
        headers: &[(&str, &str)],
        input: Value,
    ) -> reqwest::Result<reqwest::Response> {
        let mut req = self
            .c
            .post(format!("http://127.0.0.1:{port}/video/{op}"))
            .header("X-Job-Id", job)
            .json(&input);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        req.send().await
    }

    async fn serverless(
        &self,
        method: Method,
        path: &str,
        v: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = self
            .c
            .request(method, format!("{}{path}", self.h.serverless_url()))
            .bearer_auth(RUNPOD_KEY);
        if let Some(v) = v {
            req = req.json(&v);
        }
        body(req.send().await.expect("serverless")).await
    }

    async fn job_done(&self, endpoint: &str, id: &str) -> Value {
        eventually("serverless job final", || async {
            let (_, v) = self
                .serverless(Method::GET, &format!("/{endpoint}/status/{id}"), None)
                .await;
            matches!(
                v["status"].as_str(),
                Some("COMPLETED" | "FAILED" | "CANCELLED" | "TIMED_OUT")
            )
            .then_some(v)
        })
        .await
    }
}

fn host_port(row: &Value, key: &str) -> u16 {
    row["ports"][key][0]["HostPort"]
        .as_str()
        .expect("HostPort is a string")
        .parse()
        .expect("port")
}

fn worker_env() -> Value {
    json!({"-p 8000:8000": "1", "GPUPOOL_API_KEY": "pool-key-secret", "GPUPOOL_SESSION_TOKEN": "session-secret", "GPUPOOL_WORKER_PORT": "8000"})
}

const AUTH: &[(&str, &str)] = &[
    ("X-API-Key", "pool-key-secret"),
    ("X-Session-Token", "session-secret"),
];

// ---------------------------------------------------------------------------------------
// Vast.ai
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn vast_search_filters_orders_limits_and_answers_plain_application_json() {
    let s = fast().await;
    // As the CLI sends it: values as strings, GPU name with a space, default filters.
    let q = json!({"verified": {"eq": true}, "external": {"eq": false}, "rentable": {"eq": true},
                   "gpu_name": {"eq": "RTX 4090"}, "num_gpus": {"eq": "1"}, "order": [["dph_total", "asc"]],
                   "type": "on-demand", "allocated_storage": 5.0});
    let res =
        s.c.post(s.url("/api/v0/bundles/"))
            .bearer_auth(VAST_KEY)
            .json(&q)
            .send()
            .await
            .unwrap();
    assert_eq!(res.headers()["content-type"], "application/json");
    let (st, v) = body(res).await;
    assert_eq!(st, StatusCode::OK);
    let ids: Vec<u64> = v["offers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, vec![1002, 1001]);
    for o in v["offers"].as_array().unwrap() {
        assert_eq!(o["gpu_name"], "RTX 4090");
        for k in [
            "dph_total",
            "reliability2",
            "geolocation",
            "direct_port_count",
            "verification",
            "num_gpus",
        ] {
            assert!(!o[k].is_null(), "{k}");
        }
    }
    // As the docs send it: numbers, underscores, in/notin, country codes, limit.
    let q = json!({"gpu_name": {"in": ["RTX_3060", "RTX_4090"]}, "geolocation": {"notin": ["CA"]},
                   "dph_total": {"lte": 0.5}, "order": [["dph_total", "desc"]], "limit": 2});
    let (_, v) = body(
        s.vast(Method::POST, "/api/v0/bundles/")
            .json(&q)
            .send()
            .await
            .unwrap(),
    )
    .await;
    let ids: Vec<u64> = v["offers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, vec![1001, 1004]);
    // The CLI's --new search.
    let (_, v) = body(
        s.vast(Method::PUT, "/api/v0/search/asks/")
            .json(&json!({"select_cols": ["*"], "q": {"num_gpus": {"gte": 2}}}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(v["offers"].as_array().unwrap().len(), 2);
    // Search is public, but a wrong key is refused; a bad operator or body is a 400.
    let (st, _) = body(
        s.c.post(s.url("/api/v0/bundles/"))
            .json(&json!({}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    let (st, v) = body(
        s.c.post(s.url("/api/v0/bundles/"))
            .bearer_auth("wrong")
            .json(&json!({}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    assert_eq!(
        v,
        json!({"success": false, "error": "auth_error", "msg": "Invalid user key"})
    );
    let (st, _) = body(
        s.vast(Method::POST, "/api/v0/bundles/")
            .json(&json!({"num_gpus": {"like": 1}}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    let (st, v) = body(
        s.vast(Method::POST, "/api/v0/bundles/")
            .body("{not json")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert_eq!(v["error"], "invalid_request");
}

#[tokio::test]
async fn vast_instance_life_cycle_create_loading_running_job_destroy_port_closed() {
    let mut config = SimConfig::fast();
    // Long enough that polling every 10 ms sees each phase even on a loaded machine.
    config.timing.provisioning_seconds = 0.5;
    config.timing.loading_seconds = 0.5;
    let s = start(config).await;
    let (st, v) = s.vast_create(1001, "gpupool-c1-uid-1", worker_env()).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["success"], true);
    assert!(
        v["instance_api_key"]
            .as_str()
            .is_some_and(|k| !k.is_empty())
    );
    let id = v["new_contract"]
        .as_u64()
        .expect("new_contract is an integer");

    // Observe null -> loading -> running, with ports only while running.
    let mut seen: Vec<Value> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    let row = loop {
        let row = s.vast_show(id).await;
        assert!(row.get("start_date").is_some_and(Value::is_f64));
        assert!(row["extra_env"].is_array());
        if seen.last() != Some(&row["actual_status"]) {
            seen.push(row["actual_status"].clone());
        }
        if row["actual_status"] == "running" {
            break row;
        }
        assert!(row.get("ports").is_none(), "no ports before running: {row}");
        assert!(Instant::now() < deadline, "never running");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(seen, vec![Value::Null, json!("loading"), json!("running")]);
    assert_eq!(row["intended_status"], "running");
    assert_eq!(row["cur_state"], "running");
    assert_eq!(row["public_ipaddr"], "127.0.0.1");
    assert_eq!(row["label"], "gpupool-c1-uid-1");
    assert_eq!(row["dph_total"], 0.40);
    assert!(
        row["extra_env"]
            .as_array()
            .unwrap()
            .contains(&json!(["-p 8000:8000", "1"]))
    );
    assert_eq!(row["ports"]["8000/tcp"][0]["HostIp"], "0.0.0.0");
    let port = host_port(&row, "8000/tcp");

    // The worker: health, a job, its auth.
    let res =
        s.c.get(format!("http://127.0.0.1:{port}/health"))
            .send()
            .await
            .unwrap();
    assert_eq!(body(res).await, (StatusCode::OK, json!({"status": "ok"})));
    let res = s
        .job(
            port,
            "transcode",
            "job-1/0",
            AUTH,
            json!({"url": "s3://in.mp4"}),
        )
        .await
        .unwrap();
    let (st, v) = body(res).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["operation"], "transcode");
    assert_eq!(v["jobId"], "job-1/0");
    assert_eq!(v["instanceId"], id.to_string());
    assert_eq!(v["result"]["input"], json!({"url": "s3://in.mp4"}));
    let (st, v) = body(
        s.job(
            port,
            "transcode",
            "job-2/0",
            &[("X-Session-Token", "session-secret")],
            json!({}),
        )
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    assert!(v["error"].is_string());
    let (st, _) = body(
        s.job(
            port,
            "transcode",
            "job-2/0",
            &[("X-API-Key", "pool-key-secret")],
            json!({}),
        )
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    let ex = s.admin("/admin/executions").await;
    let job = &ex["jobs"]["job-1/0"];
    assert_eq!(job["count"], json!(1));
    assert_eq!(job["instances"], json!([id.to_string()]));
    assert!(job["first_at"].is_string(), "{ex}");
    assert!(
        ex["jobs"].get("job-2/0").is_none(),
        "refused calls are not executions"
    );

    // Destroy: gone from the API, worker port closed, second destroy is a 404.
    let (st, v) = body(
        s.vast(Method::DELETE, &format!("/api/v0/instances/{id}/"))
            .json(&json!({}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((st, v), (StatusCode::OK, json!({"success": true})));
    assert_eq!(s.vast_show(id).await, Value::Null);
    assert!(!port_open(port), "worker port closed after destroy");
    let (st, v) = body(
        s.vast(Method::DELETE, &format!("/api/v0/instances/{id}/"))
            .json(&json!({}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    assert_eq!(
        v,
        json!({"success": false, "error": "not_found", "msg": "Instance not found"})
    );
    let state = s.admin("/admin/state").await;
    let inst = &state["instances"][0];
    assert_eq!(inst["alive"], false);
    assert!(inst["destroyed_at"].is_string() && inst["running_at"].is_string());
}

#[tokio::test]
async fn vast_create_refuses_unknown_or_taken_offers_and_bad_input() {
    let s = fast().await;
    let (st, v) = s.vast_create(424242, "x", json!({})).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    assert!(v["msg"].as_str().unwrap().contains("no_such_ask"), "{v}");
    // Offer 1004 rents once; the second create is refused until the first is destroyed.
    let (_, v) = s.vast_create(1004, "a", json!({})).await;
    let first = v["new_contract"].as_u64().unwrap();
    let (st, _) = s.vast_create(1004, "b", json!({})).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    let (_, v) = body(
        s.vast(Method::POST, "/api/v0/bundles/")
            .json(&json!({"id": {"eq": 1004}}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(v["offers"], json!([]), "a fully rented offer is not listed");
    s.vast(Method::DELETE, &format!("/api/v0/instances/{first}/"))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    let (st, _) = s.vast_create(1004, "b", json!({})).await;
    assert_eq!(st, StatusCode::OK);
    // Bad input.
    let (st, v) = body(
        s.vast(Method::PUT, "/api/v0/asks/1001/")
            .json(&json!({"disk": 10}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert_eq!(v["error"], "invalid_args");
    let (st, _) = body(
        s.vast(Method::PUT, "/api/v0/asks/1001/")
            .json(&json!({"image": "i", "disk": 2}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    let (st, v) = body(
        s.vast(Method::PUT, "/api/v0/asks/1001/")
            .json(&json!({"image": "i", "price": 500.0}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (st, v["error"].clone()),
        (StatusCode::BAD_REQUEST, json!("invalid_price"))
    );
    let (st, _) = body(
        s.vast(Method::PUT, "/api/v0/asks/abc/")
            .json(&json!({"image": "i"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    let (st, v) = body(
        s.c.put(s.url("/api/v0/asks/1001/?api_key=nope"))
            .json(&json!({"image": "i"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (st, v["msg"].clone()),
        (StatusCode::UNAUTHORIZED, json!("Invalid user key"))
    );
    // ?api_key= works as well as the Bearer header.
    let (st, _) = body(
        s.c.get(s.url(&format!("/api/v0/instances/1/?api_key={VAST_KEY}")))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(st, StatusCode::OK);
}

#[tokio::test]
async fn vast_label_stop_and_start_follow_the_instance() {
    let s = fast().await;
    let (_, v) = s.vast_create(1001, "old", worker_env()).await;
    let id = v["new_contract"].as_u64().unwrap();
    let row = s.vast_running(id).await;
    let port = host_port(&row, "8000/tcp");
    let (st, v) = body(
        s.vast(Method::PUT, &format!("/api/v0/instances/{id}/"))
            .json(&json!({"label": "new-label"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(v["success"], true);
    assert_eq!(s.vast_show(id).await["label"], "new-label");
    let (_, v) = body(
        s.vast(Method::PUT, &format!("/api/v0/instances/{id}/"))
            .json(&json!({"state": "stopped"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(v, json!({"success": true}));
    let row = s.vast_show(id).await;
    assert_eq!(
        (row["actual_status"].clone(), row["intended_status"].clone()),
        (json!("stopped"), json!("stopped"))
    );
    assert!(!port_open(port));
    s.vast(Method::PUT, &format!("/api/v0/instances/{id}/"))
        .json(&json!({"state": "running"}))
        .send()
        .await
        .unwrap();
    let row = s.vast_running(id).await;
    let port2 = host_port(&row, "8000/tcp");
    assert!(port_open(port2));
    let (st, v) = body(
        s.vast(Method::PUT, "/api/v0/instances/99/")
            .json(&json!({"label": "x"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (st, v["error"].clone()),
        (StatusCode::NOT_FOUND, json!("no_such_instance"))
    );
    let (st, v) = body(
        s.vast(Method::PUT, &format!("/api/v0/instances/{id}/"))
            .json(&json!({"label": "x".repeat(1025)}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (st, v["error"].clone()),
        (StatusCode::BAD_REQUEST, json!("label_too_long"))
    );
}

#[tokio::test]
async fn vast_v1_list_paginates_with_tokens_filters_labels_and_counts() {
    let mut config = SimConfig::fast();
    config.vast_offers = vec![VastOfferSpec {
        id: 5000,
        gpu_name: "RTX 3060".into(),
        num_gpus: 1,
        dph_total: 0.1,
        reliability2: 0.99,
        geolocation: "Texas, US".into(),
        direct_port_count: 20,
        verification: "verified".into(),
        capacity: 40,
        extra: Default::default(),
    }];
    let s = start(config).await;
    let mut ids = Vec::new();
    for n in 0..30 {
        let label = if n < 3 {
            Value::Null
        } else {
            json!(format!("gpupool-c1-{}", n % 2))
        };
        let req = json!({"image": "i", "label": label, "env": {}});
        let (_, v) = body(
            s.vast(Method::PUT, "/api/v0/asks/5000/")
                .json(&req)
                .send()
                .await
                .unwrap(),
        )
        .await;
        ids.push(v["new_contract"].as_u64().unwrap());
    }
    let list = |params: Vec<(&'static str, String)>| {
        let s = &s;
        async move {
            let path = format!("/api/v1/instances/?{}", qs(&params));
            let (st, v) = body(s.vast(Method::GET, &path).send().await.unwrap()).await;
            (st, v)
        }
    };
    let base = vec![
        ("select_filters", "{}".to_string()),
        ("order_by", r#"[{"col":"id","dir":"asc"}]"#.to_string()),
        ("limit", "25".to_string()),
    ];
    let (st, page1) = list(base.clone()).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(page1["success"], true);
    assert_eq!(page1["instances"].as_array().unwrap().len(), 25);
    assert_eq!(page1["total_instances"], 30);
    assert_eq!(
        page1["label_counts"],
        json!({"": 3, "gpupool-c1-0": 13, "gpupool-c1-1": 14})
    );
    let token = page1["next_token"]
        .as_str()
        .expect("next_token")
        .to_string();
    let mut p2 = base.clone();
    p2.push(("after_token", token));
    let (_, page2) = list(p2).await;
    assert_eq!(page2["instances"].as_array().unwrap().len(), 5);
    assert!(page2["next_token"].is_null());
    let got: Vec<u64> = page1["instances"]
        .as_array()
        .unwrap()
        .iter()
        .chain(page2["instances"].as_array().unwrap())
        .map(|r| r["id"].as_u64().unwrap())
        .collect();
    assert_eq!(got, ids, "every instance once, in id order");
    for r in page1["instances"].as_array().unwrap() {
        assert!(r["start_date"].is_number() && r["extra_env"].is_array());
    }
    // Label filter (null = unlabeled), descending order, small limit.
    let (_, v) = list(vec![
        (
            "select_filters",
            r#"{"label": {"in": [null, "gpupool-c1-1"]}}"#.into(),
        ),
        ("order_by", r#"[{"col":"id","dir":"desc"}]"#.into()),
        ("limit", "4".into()),
    ])
    .await;
    assert_eq!(v["total_instances"], 17);
    let first: Vec<u64> = v["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_u64().unwrap())
        .collect();
    assert_eq!(first, vec![ids[29], ids[27], ids[25], ids[23]]);
    // select_cols, computed columns, bad tokens, legacy v0.
    let (_, v) = list(vec![
        ("select_cols", r#"["id","label"]"#.into()),
        ("limit", "1".into()),
    ])
    .await;
    assert_eq!(v["instances"][0].as_object().unwrap().len(), 2);
    let (st, v) = list(vec![(
        "select_filters",
        r#"{"dph_total": {"lt": 1}}"#.into(),
    )])
    .await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert!(
        v["msg"]
            .as_str()
            .unwrap()
            .contains("dph_total is not a valid search key")
    );
    let (st, v) = list(vec![("after_token", "!!!".into())]).await;
    assert_eq!(
        (st, v["error"].clone()),
        (StatusCode::BAD_REQUEST, json!("invalid_token"))
    );
    let (st, _) = list(vec![("select_filters", "{".into())]).await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    let (_, v) = body(
        s.vast(Method::GET, "/api/v0/instances/?owner=me")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(v["instances_found"], 30);
}

// ---------------------------------------------------------------------------------------
// RunPod GraphQL, REST v1, proxy
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn runpod_graphql_inline_literals_variables_aliases_and_errors() {
    let s = fast().await;
    // runpod-python's per-type query, inline literals.
    let q = format!(
        "query GpuTypes {{ gpuTypes(input: {{id: \"{GPU_4090}\"}}) {{ maxGpuCount id displayName manufacturer memoryInGb cudaCores \
         secureCloud communityCloud securePrice communityPrice oneMonthPrice threeMonthPrice oneWeekPrice communitySpotPrice \
         secureSpotPrice lowestPrice(input: {{gpuCount: 2}}) {{ minimumBidPrice uninterruptablePrice stockStatus }} }} }}"
    );
    let (st, v) = s.gql(&q, json!({})).await;
    assert_eq!(st, StatusCode::OK);
    let t = &v["data"]["gpuTypes"][0];
    assert_eq!(t["id"], GPU_4090);
    assert_eq!(
        (t["securePrice"].clone(), t["communityPrice"].clone()),
        (json!(0.69), json!(0.34))
    );
    assert_eq!(t["lowestPrice"]["uninterruptablePrice"], 0.34);
    assert_eq!(t["lowestPrice"]["stockStatus"], "High");
    let (_, v) = s
        .gql(
            "query { gpuTypes { id displayName memoryInGb } }",
            json!({}),
        )
        .await;
    assert_eq!(v["data"]["gpuTypes"].as_array().unwrap().len(), 3);

    // runpodctl-style: variables, operation name, enum as a variable string.
    let q = "mutation createPod($input: PodFindAndDeployOnDemandInput!) { podFindAndDeployOnDemand(input: $input) { \
             id name imageName desiredStatus costPerHr containerDiskInGb volumeInGb volumeMountPath gpuCount memoryInGb \
             vcpuCount ports lastStatusChange env machine { gpuDisplayName location } } }";
    let input = json!({"input": {"name": "gpupool-c-v", "imageName": "img:2", "gpuTypeId": GPU_4090, "cloudType": "SECURE",
                                 "gpuCount": 1, "containerDiskInGb": 20, "volumeInGb": 0, "ports": "8000/tcp",
                                 "env": [{"key": "GPUPOOL_WORKER_PORT", "value": "8000"}]}});
    let (st, v) = s.gql(q, input).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let pod = &v["data"]["podFindAndDeployOnDemand"];
    assert_eq!(pod["name"], "gpupool-c-v");
    assert_eq!(pod["costPerHr"], 0.69, "secure price");
    assert_eq!(pod["env"], json!(["GPUPOOL_WORKER_PORT=8000"]));
    assert_eq!(pod["ports"], "8000/tcp");
    assert_eq!(pod["machine"]["gpuDisplayName"], "RTX 4090");
    let id = pod["id"].as_str().unwrap().to_string();
    assert_eq!(id.len(), 14);

    // Aliases, fragments, __typename; myself lists the pod.
    let q = "query { me: myself { pods { ...P } } kind: __typename } fragment P on Pod { podId: id desiredStatus }";
    let (_, v) = s.gql(q, json!({})).await;
    assert_eq!(
        v["data"]["me"]["pods"],
        json!([{"podId": id, "desiredStatus": "RUNNING"}])
    );
    assert_eq!(v["data"]["kind"], "Query");

    // Errors: unknown pod is null, terminating it is an error; syntax and unknown fields are 400s; auth.
    let (_, v) = s
        .gql("{ pod(input: {podId: \"nope\"}) { id } }", json!({}))
        .await;
    assert_eq!(v, json!({"data": {"pod": null}}));
    let (st, v) = s
        .gql(
            "mutation { podTerminate(input: {podId: \"nope\"}) }",
            json!({}),
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(v["data"], Value::Null);
    assert_eq!(v["errors"][0]["path"], json!(["podTerminate"]));
    let (st, v) = s
        .gql("query { pod(input: {podId: }) { id }", json!({}))
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert_eq!(v["errors"][0]["extensions"]["code"], "GRAPHQL_PARSE_FAILED");
    let (st, _) = s.gql("query { nothing }", json!({})).await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    let res =
        s.c.post(s.url("/graphql"))
            .bearer_auth("bad")
            .json(&json!({"query": "{ myself { id } }"}))
            .send()
            .await
            .unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    let res =
        s.c.post(s.url(&format!("/graphql?api_key={RUNPOD_KEY}")))
            .json(&json!({"query": "{ myself { id } }"}))
            .send()
            .await
            .unwrap();
    assert_eq!(
        body(res).await.1,
        json!({"data": {"myself": {"id": "user_sim"}}})
    );

    // Terminate answers a scalar null.
    let (st, v) = s
        .gql(
            &format!("mutation {{ podTerminate(input: {{podId: \"{id}\"}}) }}"),
            json!({}),
        )
        .await;
    assert_eq!(
        (st, v),
        (StatusCode::OK, json!({"data": {"podTerminate": null}}))
    );
    assert_eq!(s.pod(&id).await, Value::Null);
}

#[tokio::test]
async fn runpod_pod_runtime_ports_reach_the_worker_directly_and_through_the_proxy() {
    let mut config = SimConfig::fast();
    config.timing.proxy_timeout_seconds = 0.3;
    let s = start(config).await;
    let id = s
        .create_pod(
            "8000/http,22/tcp",
            &[
                ("GPUPOOL_API_KEY", "pool-key-secret"),
                ("GPUPOOL_WORKER_PORT", "8000"),
            ],
            1,
        )
        .await;
    let pod = s.pod(&id).await;
    assert!(
        pod["runtime"].is_null(),
        "runtime is null until running: {pod}"
    );
    let pod = s.pod_running(&id).await;
    let ports = pod["runtime"]["ports"].as_array().unwrap();
    let http = ports.iter().find(|p| p["privatePort"] == 8000).unwrap();
    assert_eq!(
        (http["type"].clone(), http["isIpPublic"].clone()),
        (json!("http"), json!(false))
    );
    let ssh = ports.iter().find(|p| p["privatePort"] == 22).unwrap();
    assert_eq!(
        (ssh["ip"].clone(), ssh["type"].clone()),
        (json!("127.0.0.1"), json!("tcp"))
    );

    // Through the proxy stand-in: method, path, headers and body are forwarded.
    let proxy = s.url(&format!("/proxy/{id}-8000"));
    let (st, v) = body(s.c.get(format!("{proxy}/health")).send().await.unwrap()).await;
    assert_eq!((st, v), (StatusCode::OK, json!({"status": "ok"})));
    let res =
        s.c.post(format!("{proxy}/video/thumbnail"))
            .header("X-API-Key", "pool-key-secret")
            .header("X-Job-Id", "j-proxy")
            .json(&json!({"at": 3}))
            .send()
            .await
            .unwrap();
    let (st, v) = body(res).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(
        (v["jobId"].clone(), v["result"]["input"].clone()),
        (json!("j-proxy"), json!({"at": 3}))
    );
    let (st, _) = body(
        s.c.post(format!("{proxy}/video/thumbnail"))
            .header("X-Job-Id", "j")
            .json(&json!({}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        st,
        StatusCode::UNAUTHORIZED,
        "worker auth passes through the proxy"
    );
    let res =
        s.c.post(format!("{proxy}/video/slow"))
            .header("X-API-Key", "pool-key-secret")
            .header("X-Job-Id", "j-slow")
            .json(&json!({"simulate": {"seconds": 2}}))
            .send()
            .await
            .unwrap();
    assert_eq!(res.status().as_u16(), 524, "the proxy cuts slow requests");
    let (st, _) = body(
        s.c.get(s.url(&format!("/proxy/{id}-22/health")))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(st, StatusCode::NOT_FOUND, "tcp ports are not proxied");

    // A tcp worker port is public: 127.0.0.1 and the real worker port.
    let id2 = s.create_pod("8000/tcp", &[], 1).await;
    let pod = s.pod_running(&id2).await;
    let p = &pod["runtime"]["ports"][0];
    assert_eq!(
        (p["ip"].clone(), p["isIpPublic"].clone(), p["type"].clone()),
        (json!("127.0.0.1"), json!(true), json!("tcp"))
    );
    let port = p["publicPort"].as_u64().unwrap() as u16;
    assert!(port_open(port));

    // Stop / resume / terminate.
    let (_, v) = s
        .gql(
            &format!("mutation {{ podStop(input: {{podId: \"{id2}\"}}) {{ id desiredStatus }} }}"),
            json!({}),
        )
        .await;
    assert_eq!(
        v["data"]["podStop"],
        json!({"id": id2, "desiredStatus": "EXITED"})
    );
    assert!(!port_open(port));
    let (_, v) = s.gql(&format!("mutation {{ podResume(input: {{podId: \"{id2}\", gpuCount: 1}}) {{ id desiredStatus }} }}"), json!({})).await;
    assert_eq!(v["data"]["podResume"]["desiredStatus"], "RUNNING");
    let pod = s.pod_running(&id2).await;
    let port = pod["runtime"]["ports"][0]["publicPort"].as_u64().unwrap() as u16;
    s.gql(
        &format!("mutation {{ podTerminate(input: {{podId: \"{id2}\"}}) }}"),
        json!({}),
    )
    .await;
    assert!(!port_open(port), "terminate closes the worker port");
}

#[tokio::test]
async fn runpod_rest_v1_pods_share_state_with_graphql() {
    let s = fast().await;
    let rest = |m: Method, p: &str| {
        s.c.request(m, format!("{}{p}", s.h.rest_url()))
            .bearer_auth(RUNPOD_KEY)
    };
    let req = json!({"name": "gpupool-rest", "imageName": "img", "gpuTypeIds": ["NVIDIA GeForce RTX 3090"], "gpuCount": 2,
                     "cloudType": "COMMUNITY", "ports": ["8000/http", "22/tcp"], "env": {"A": "b"}});
    let (st, pod) = body(rest(Method::POST, "/pods").json(&req).send().await.unwrap()).await;
    assert_eq!(st, StatusCode::CREATED, "{pod}");
    assert_eq!(pod["costPerHr"], 0.44, "community price x gpuCount");
    assert_eq!(pod["env"], json!({"A": "b"}));
    assert_eq!(pod["publicIp"], Value::Null);
    let id = pod["id"].as_str().unwrap().to_string();
    let (_, list) = body(rest(Method::GET, "/pods").send().await.unwrap()).await;
    assert!(list.is_array() && list.as_array().unwrap().len() == 1);
    let (_, v) = s
        .gql("{ myself { pods { id gpuCount } } }", json!({}))
        .await;
    assert_eq!(
        v["data"]["myself"]["pods"],
        json!([{"id": id, "gpuCount": 2}])
    );
    let got = eventually("REST pod public ip", || async {
        let (_, p) = body(
            rest(Method::GET, &format!("/pods/{id}"))
                .send()
                .await
                .unwrap(),
        )
        .await;
        (p["publicIp"] == "127.0.0.1").then_some(p)
    })
    .await;
    assert!(got["portMappings"]["22"].is_u64());
    let (st, p) = body(
        rest(Method::POST, &format!("/pods/{id}/stop"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (st, p["desiredStatus"].clone()),
        (StatusCode::OK, json!("EXITED"))
    );
    let (_, p) = body(
        rest(Method::POST, &format!("/pods/{id}/start"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(p["desiredStatus"], "RUNNING");
    let (_, p) = body(
        rest(Method::PATCH, &format!("/pods/{id}"))
            .json(&json!({"name": "renamed"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(p["name"], "renamed");
    let res = rest(Method::DELETE, &format!("/pods/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    let (st, _) = body(
        rest(Method::GET, &format!("/pods/{id}"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    let (st, _) = body(
        rest(Method::POST, "/pods")
            .json(&json!({"imageName": "x"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "gpuTypeIds is required");
    let typo = json!({"imageName": "x", "gpuTypeIds": ["NVIDIA GeForce RTX 4091"]});
    let (st, v) = body(
        rest(Method::POST, "/pods")
            .json(&typo)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    let (st, _) = body(
        s.c.get(format!("{}/pods", s.h.rest_url()))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
}

// ---------------------------------------------------------------------------------------
// Worker hooks and billing
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn worker_boot_delay_and_simulate_hooks() {
    let mut config = SimConfig::fast();
    config.timing.boot_seconds = 0.4;
    let s = start(config).await;
    let (_, v) = s
        .vast_create(1001, "hooks", json!({"-p 8000:8000": "1"}))
        .await;
    let id = v["new_contract"].as_u64().unwrap();
    let row = s.vast_running(id).await;
    let port = host_port(&row, "8000/tcp");
    let health = || async {
        s.c.get(format!("http://127.0.0.1:{port}/health"))
            .send()
            .await
            .unwrap()
            .status()
    };
    assert_eq!(
        health().await,
        StatusCode::SERVICE_UNAVAILABLE,
        "503 while booting"
    );
    eventually("worker booted", || async {
        (health().await == StatusCode::OK).then_some(())
    })
    .await;
    let (st, _) = body(
        s.c.get(format!("http://127.0.0.1:{port}/anything/else"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "any GET but /video is health");

    let (st, v) = body(
        s.job(
            port,
            "transcode",
            "h1",
            &[],
            json!({"simulate": {"status": 422, "error": "bad video", "seconds": 0}}),
        )
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(
        (st, v),
        (
            StatusCode::UNPROCESSABLE_ENTITY,
            json!({"error": "bad video"})
        )
    );
    let res = s
        .job(
            port,
            "transcode",
            "h2",
            &[],
            json!({"simulate": {"nonJson": true, "seconds": 0}}),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert!(serde_json::from_str::<Value>(&res.text().await.unwrap()).is_err());
    let res = s
        .job(
            port,
            "transcode",
            "h3",
            &[],
            json!({"simulate": {"outputBytes": 50000, "seconds": 0}}),
        )
        .await
        .unwrap();
    let len = res.bytes().await.unwrap().len();
    assert!((49_000..=51_000).contains(&len), "{len}");
    let t0 = Instant::now();
    s.job(
        port,
        "transcode",
        "h4",
        &[],
        json!({"simulate": {"seconds": 0.3}}),
    )
    .await
    .unwrap();
    assert!(t0.elapsed() >= Duration::from_millis(300));
    let (st, _) = body(
        s.c.post(format!("http://127.0.0.1:{port}/video/x"))
            .json(&json!({}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "X-Job-Id is required");
    let (st, _) = body(
        s.c.post(format!("http://127.0.0.1:{port}/video/x"))
            .header("X-Job-Id", "j")
            .body("[1]")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "the input must be an object");
    // The same job id twice counts two executions.
    s.job(port, "t", "dup", &[], json!({"simulate": {"seconds": 0}}))
        .await
        .unwrap();
    s.job(port, "t", "dup", &[], json!({"simulate": {"seconds": 0}}))
        .await
        .unwrap();
    assert_eq!(
        s.admin("/admin/executions").await["jobs"]["dup"]["count"],
        2
    );
}

#[tokio::test]
async fn billing_is_price_per_hour_times_seconds_between_create_and_destroy() {
    let s = fast().await;
    let (_, v) = s.vast_create(1001, "bill", json!({})).await;
    let vid = v["new_contract"].as_u64().unwrap();
    s.vast_running(vid).await;
    s.vast(Method::DELETE, &format!("/api/v0/instances/{vid}/"))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    let pid = s.create_pod("8000/http", &[], 2).await;
    s.pod_running(&pid).await;
    assert_eq!(
        s.pod(&pid).await["costPerHr"],
        0.68,
        "community 0.34 x 2 GPUs"
    );
    s.gql(
        &format!("mutation {{ podTerminate(input: {{podId: \"{pid}\"}}) }}"),
        json!({}),
    )
    .await;

    let state = s.admin("/admin/state").await;
    let bill = s.admin("/admin/bill").await;
    let mut total = 0.0;
    for (inst, price) in state["instances"]
        .as_array()
        .unwrap()
        .iter()
        .zip([0.40, 0.68])
    {
        let secs = (ts(&inst["destroyed_at"]).as_millisecond()
            - ts(&inst["created_at"]).as_millisecond()) as f64
            / 1000.0;
        assert!(secs > 0.0);
        let expected = price / 3600.0 * secs;
        assert_eq!(inst["price_per_hour"], price);
        assert_eq!(inst["billed_seconds"].as_f64().unwrap(), secs);
        assert!(
            (inst["cost"].as_f64().unwrap() - expected).abs() < 1e-12,
            "{inst}"
        );
        let line = bill["instances"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["id"] == inst["id"])
            .unwrap();
        assert!((line["cost"].as_f64().unwrap() - expected).abs() < 1e-12);
        total += expected;
    }
    assert!(
        (bill["by_provider"]["vast"].as_f64().unwrap()
            + bill["by_provider"]["runpod"].as_f64().unwrap()
            - total)
            .abs()
            < 1e-12
    );
    // Destroyed instances stop accruing.
    let again = s.admin("/admin/bill").await;
    assert_eq!(again["by_provider"]["vast"], bill["by_provider"]["vast"]);
}

// ---------------------------------------------------------------------------------------
// Faults
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn error_fault_answers_500_for_the_next_calls_then_recovers() {
    let s = fast().await;
    s.admin_put("/admin/faults", json!({"errors": {"vast.create": {"next": 2}, "runpod.podFindAndDeployOnDemand": {"next": 1}, "serverless.status": {"next": 1, "status": 503}}})).await;
    for _ in 0..2 {
        let (st, v) = s.vast_create(1001, "e", json!({})).await;
        assert_eq!(
            (st, v["success"].clone()),
            (StatusCode::INTERNAL_SERVER_ERROR, json!(false))
        );
    }
    assert_eq!(s.vast_create(1001, "e", json!({})).await.0, StatusCode::OK);
    let q = format!(
        "mutation {{ podFindAndDeployOnDemand(input: {{imageName: \"i\", gpuTypeId: \"{GPU_4090}\", cloudType: ALL}}) {{ id }} }}"
    );
    let (st, v) = s.gql(&q, json!({})).await;
    assert_eq!(st, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(v["errors"][0]["message"].is_string());
    assert_eq!(s.gql(&q, json!({})).await.0, StatusCode::OK);
    let (_, v) = s
        .serverless(Method::POST, "/abc123xyz/run", Some(json!({"input": {}})))
        .await;
    let job = v["id"].as_str().unwrap().to_string();
    assert_eq!(
        s.serverless(Method::GET, &format!("/abc123xyz/status/{job}"), None)
            .await
            .0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    let calls = s.admin("/admin/calls").await;
    assert_eq!(calls["counts"]["vast.create"], json!({"200": 1, "500": 2}));
    assert_eq!(
        s.admin("/admin/state").await["instances"]
            .as_array()
            .unwrap()
            .len(),
        2,
        "failed creates created nothing"
    );
}

#[tokio::test]
async fn rate_limits_use_the_documented_bodies_and_never_send_retry_after() {
    let s = fast().await;
    s.admin_put(
        "/admin/faults",
        json!({"rate_limits": {"vast.search": {"next": 1}, "vast.show": {"next": 1}, "vast.destroy": {"next": 1},
                               "vast.list": {"next": 1, "body": "json"}, "runpod.myself": {"next": 1}, "serverless.health": {"next": 1}}}),
    )
    .await;
    let res = s
        .vast(Method::POST, "/api/v0/bundles/")
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert!(res.headers().get("retry-after").is_none());
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(res.text().await.unwrap(), "API requests too frequent");
    let res = s
        .vast(Method::GET, "/api/v0/instances/1/")
        .send()
        .await
        .unwrap();
    assert!(res.headers().get("retry-after").is_none());
    assert_eq!(
        body(res).await,
        (
            StatusCode::TOO_MANY_REQUESTS,
            json!({"detail": "API requests too frequent endpoint threshold=2.0"})
        )
    );
    let (st, v) = body(
        s.vast(Method::DELETE, "/api/v0/instances/1/")
            .json(&json!({}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(st, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(v["error"], "rate_limit_exceeded");
    let (_, v) = body(
        s.vast(Method::GET, "/api/v1/instances/")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(v["success"], false);
    assert_eq!(
        s.gql("{ myself { id } }", json!({})).await.0,
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(
        s.serverless(Method::GET, "/abc123xyz/health", None).await.0,
        StatusCode::TOO_MANY_REQUESTS
    );
    // Bursts are over: everything answers again.
    assert_eq!(
        s.vast(Method::GET, "/api/v0/instances/1/")
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    assert_eq!(
        s.gql("{ myself { id } }", json!({})).await.0,
        StatusCode::OK
    );
}

#[tokio::test]
async fn latency_and_hang_faults_delay_and_hold_requests() {
    let s = fast().await;
    s.admin_put(
        "/admin/faults",
        json!({"latency_ms": {"vast.show": 300}, "hangs": {"vast.destroy": {"next": 1}}}),
    )
    .await;
    let t0 = Instant::now();
    s.vast(Method::GET, "/api/v0/instances/1/")
        .send()
        .await
        .unwrap();
    assert!(t0.elapsed() >= Duration::from_millis(300));
    let err = s
        .vast(Method::DELETE, "/api/v0/instances/1/")
        .timeout(Duration::from_millis(300))
        .json(&json!({}))
        .send()
        .await
        .expect_err("a hung request times out on the client");
    assert!(err.is_timeout());
    // The abandoned call is logged without a status.
    eventually("hung call logged", || async {
        let calls = s.admin("/admin/calls").await;
        (calls["counts"]["vast.destroy"]["0"] == 1).then_some(())
    })
    .await;
    let (st, _) = body(
        s.vast(Method::DELETE, "/api/v0/instances/1/")
            .json(&json!({}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(st, StatusCode::NOT_FOUND, "only the next call hung");
}

#[tokio::test]
async fn capacity_exhaustion_hides_offers_and_refuses_creates() {
    let s = fast().await;
    s.admin_put("/admin/faults", json!({"exhausted": ["RTX 4090"]}))
        .await;
    let (_, v) = body(
        s.vast(Method::POST, "/api/v0/bundles/")
            .json(&json!({}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert!(
        v["offers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|o| o["gpu_name"] == "RTX 3060")
    );
    let (st, v) = s.vast_create(1001, "x", json!({})).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    assert!(v["msg"].as_str().unwrap().contains("no_such_ask"));
    let q = format!(
        "mutation {{ podFindAndDeployOnDemand(input: {{imageName: \"i\", gpuTypeId: \"{GPU_4090}\", cloudType: ALL}}) {{ id }} }}"
    );
    let (st, v) = s.gql(&q, json!({})).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(
        v["errors"][0]["message"],
        "There are no longer any instances available with the requested specifications. Please refresh and try again."
    );
    let (_, v) = s
        .gql(
            &format!("{{ gpuTypes(input: {{id: \"{GPU_4090}\"}}) {{ stockStatus }} }}"),
            json!({}),
        )
        .await;
    assert_eq!(v["data"]["gpuTypes"][0]["stockStatus"], Value::Null);
    // Stock is finite too: 8 RTX 3090 GPUs, then no capacity until one pod goes.
    s.admin_put("/admin/faults", json!({})).await;
    let q3090 = |n: u32| {
        format!(
            "mutation {{ podFindAndDeployOnDemand(input: {{imageName: \"i\", gpuTypeId: \"NVIDIA GeForce RTX 3090\", gpuCount: {n}}}) {{ id }} }}"
        )
    };
    let (_, v) = s.gql(&q3090(8), json!({})).await;
    let big = v["data"]["podFindAndDeployOnDemand"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(s.gql(&q3090(1), json!({})).await.1["errors"].is_array());
    s.gql(
        &format!("mutation {{ podTerminate(input: {{podId: \"{big}\"}}) }}"),
        json!({}),
    )
    .await;
    assert!(
        s.gql(&q3090(1), json!({})).await.1["data"]["podFindAndDeployOnDemand"]["id"].is_string()
    );
    // The catalogue can be replaced at runtime.
    let (st, _) = s
        .admin_put(
            "/admin/catalogue",
            json!({"vast_offers": [{"id": 77, "gpu_name": "RTX 4090", "dph_total": 1.5}]}),
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    let (_, v) = body(
        s.vast(Method::POST, "/api/v0/bundles/")
            .json(&json!({}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        v["offers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o["id"].clone())
            .collect::<Vec<_>>(),
        vec![json!(77)]
    );
}

#[tokio::test]
async fn instances_die_mid_job_on_a_hook_on_demand_or_by_rate() {
    let s = fast().await;
    // simulate.die: the connection drops, the worker stops, Vast reports exited.
    let (_, v) = s
        .vast_create(1001, "die", json!({"-p 8000:8000": "1"}))
        .await;
    let id = v["new_contract"].as_u64().unwrap();
    let port = host_port(&s.vast_running(id).await, "8000/tcp");
    let err = s
        .job(
            port,
            "t",
            "die-1",
            &[],
            json!({"simulate": {"die": true, "seconds": 0.4}}),
        )
        .await;
    assert!(err.is_err(), "the connection is dropped mid-job");
    let row = s.vast_show(id).await;
    assert_eq!(
        (row["actual_status"].clone(), row["intended_status"].clone()),
        (json!("exited"), json!("running"))
    );
    assert!(row.get("ports").is_none());
    assert!(!port_open(port));
    assert_eq!(
        s.admin("/admin/executions").await["jobs"]["die-1"]["count"],
        1
    );
    let inst = &s.admin("/admin/state").await["instances"][0];
    assert_eq!(
        (inst["phase"].clone(), inst["alive"].clone()),
        (json!("dead"), json!(true)),
        "dead instances still bill"
    );

    // On demand, at the next job, for a RunPod pod: DEAD.
    let pid = s.create_pod("8000/tcp", &[], 1).await;
    let pod = s.pod_running(&pid).await;
    let port = pod["runtime"]["ports"][0]["publicPort"].as_u64().unwrap() as u16;
    let (st, _) = body(
        s.c.post(s.url(&format!("/admin/instances/{pid}/kill")))
            .json(&json!({"when": "next_job"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    assert!(s.job(port, "t", "die-2", &[], json!({})).await.is_err());
    let (_, v) = s.gql(&format!("{{ pod(input: {{podId: \"{pid}\"}}) {{ desiredStatus runtime {{ uptimeInSeconds }} }} }}"), json!({})).await;
    assert_eq!(
        v["data"]["pod"],
        json!({"desiredStatus": "DEAD", "runtime": null})
    );

    // Right now, through the admin API; and by rate.
    let (_, v) = s.vast_create(1002, "kill", json!({})).await;
    let id = v["new_contract"].as_u64().unwrap();
    let port = host_port(&s.vast_running(id).await, "8000/tcp");
    s.c.post(s.url(&format!("/admin/instances/{id}/kill")))
        .send()
        .await
        .unwrap();
    assert_eq!(s.vast_show(id).await["actual_status"], "exited");
    assert!(!port_open(port));
    s.admin_put("/admin/faults", json!({"die_mid_job": {"rate": 1.0}}))
        .await;
    let (_, v) = s.vast_create(1003, "rate", json!({})).await;
    let id = v["new_contract"].as_u64().unwrap();
    let port = host_port(&s.vast_running(id).await, "8000/tcp");
    assert!(s.job(port, "t", "die-3", &[], json!({})).await.is_err());
    assert_eq!(s.vast_show(id).await["actual_status"], "exited");
    let (st, _) = body(
        s.c.post(s.url("/admin/instances/nope/kill"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(st, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn ghost_create_answers_an_error_but_the_instance_exists_and_bills() {
    let s = fast().await;
    s.admin_put("/admin/faults", json!({"ghost_creates": {"vast.create": {"next": 1}, "runpod.podFindAndDeployOnDemand": {"next": 1, "status": 502}}})).await;
    let (st, _) = s.vast_create(1001, "gpupool-c1-ghost", json!({})).await;
    assert_eq!(st, StatusCode::INTERNAL_SERVER_ERROR);
    let (_, v) = body(
        s.vast(
            Method::GET,
            &format!(
                "/api/v1/instances/?{}",
                qs(&[(
                    "select_filters",
                    r#"{"label": {"in": ["gpupool-c1-ghost"]}}"#.to_string()
                )])
            ),
        )
        .send()
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(
        v["instances"].as_array().unwrap().len(),
        1,
        "found by its label"
    );
    let q = format!(
        "mutation {{ podFindAndDeployOnDemand(input: {{name: \"gpupool-c1-ghost2\", imageName: \"i\", gpuTypeId: \"{GPU_4090}\"}}) {{ id }} }}"
    );
    assert_eq!(s.gql(&q, json!({})).await.0, StatusCode::BAD_GATEWAY);
    let (_, v) = s.gql("{ myself { pods { name } } }", json!({})).await;
    assert_eq!(
        v["data"]["myself"]["pods"],
        json!([{"name": "gpupool-c1-ghost2"}])
    );
    let state = s.admin("/admin/state").await;
    assert!(
        state["instances"]
            .as_array()
            .unwrap()
            .iter()
            .all(|i| i["alive"] == true)
    );
    eventually("ghosts bill", || async {
        let bill = s.admin("/admin/bill").await;
        (bill["by_provider"]["vast"].as_f64().unwrap() > 0.0
            && bill["by_provider"]["runpod"].as_f64().unwrap() > 0.0)
            .then_some(())
    })
    .await;
}

#[tokio::test]
async fn rate_based_faults_replay_identically_with_the_same_seed() {
    async fn outcomes(seed: u64) -> Vec<u16> {
        let mut config = SimConfig::fast();
        config.seed = seed;
        config.faults.errors.insert(
            "vast.show".into(),
            sim::Trigger {
                rate: 0.5,
                ..Default::default()
            },
        );
        let s = start(config).await;
        let mut out = Vec::new();
        for _ in 0..24 {
            out.push(
                s.vast(Method::GET, "/api/v0/instances/1/")
                    .send()
                    .await
                    .unwrap()
                    .status()
                    .as_u16(),
            );
        }
        out
    }
    let a = outcomes(7).await;
    assert_eq!(a, outcomes(7).await);
    assert!(a.contains(&500) && a.contains(&200), "{a:?}");
    assert_ne!(a, outcomes(8).await);
}

// ---------------------------------------------------------------------------------------
// Serverless
// ---------------------------------------------------------------------------------------

fn serverless_config() -> SimConfig {
    let mut config = SimConfig::fast();
    config.endpoints = vec![EndpointSpec {
        id: "idle-ep".into(),
        workers_max: 1,
        idle_timeout: 1,
        cold_start_seconds: 0.1,
        price_per_hour: 3.6,
        ..EndpointSpec::default()
    }];
    config
}

#[tokio::test]
async fn serverless_queue_runs_jobs_in_order_and_workers_stop_after_the_idle_timeout() {
    let s = start(serverless_config()).await;
    let mut ids = Vec::new();
    for n in 0..3 {
        let (st, v) = s
            .serverless(
                Method::POST,
                "/idle-ep/run",
                Some(
                    json!({"input": {"operation": "thumb", "n": n, "simulate": {"seconds": 0.15}}}),
                ),
            )
            .await;
        assert_eq!(st, StatusCode::OK);
        assert_eq!(v["status"], "IN_QUEUE");
        ids.push(v["id"].as_str().unwrap().to_string());
    }
    let (_, h) = s.serverless(Method::GET, "/idle-ep/health", None).await;
    assert_eq!(
        h["jobs"]["inQueue"].as_u64().unwrap() + h["jobs"]["inProgress"].as_u64().unwrap(),
        3
    );
    let mut finished = Vec::new();
    for id in &ids {
        let v = s.job_done("idle-ep", id).await;
        assert_eq!(v["status"], "COMPLETED", "{v}");
        assert_eq!(
            v["output"]["result"]["input"]["n"],
            ids.iter().position(|i| i == id).unwrap()
        );
        assert!(v["delayTime"].is_u64() && v["executionTime"].as_u64().unwrap() >= 150);
    }
    let state = s.admin("/admin/state").await;
    for j in state["jobs"].as_array().unwrap() {
        finished.push(ts(&j["finished_at"]));
    }
    // workersMax 1: the jobs ran one after another on the one worker.
    assert!(finished.windows(2).all(|w| w[0] <= w[1]));
    let (_, h) = s.serverless(Method::GET, "/idle-ep/health", None).await;
    assert_eq!(h["jobs"]["completed"], 3);
    let worker = eventually("idle worker stopped", || async {
        let st = s.admin("/admin/state").await;
        let w = st["endpoints"][0]["workers"][0].clone();
        (w["state"] == "stopped").then_some(w)
    })
    .await;
    let last = *finished.iter().max().unwrap();
    let idle = (ts(&worker["stopped_at"]).as_millisecond() - last.as_millisecond()) as f64 / 1000.0;
    assert!(
        // 10 ms of slack: the two timestamps are taken microseconds apart and truncated to ms.
        (0.99..2.0).contains(&idle),
        "stopped {idle}s after the last job (idleTimeout 1s)"
    );
    let secs = (ts(&worker["stopped_at"]).as_millisecond()
        - ts(&worker["started_at"]).as_millisecond()) as f64
        / 1000.0;
    assert!(
        (worker["cost"].as_f64().unwrap() - 3.6 / 3600.0 * secs).abs() < 1e-12,
        "per worker-second billing"
    );
    let bill = s.admin("/admin/bill").await;
    assert_eq!(bill["by_provider"]["serverless"], worker["cost"]);
    assert_eq!(s.admin("/admin/executions").await["total"], 3);
}

#[tokio::test]
async fn serverless_cancel_purge_runsync_stream_failures_and_errors() {
    let s = start(serverless_config()).await;
    let run =
        |input: Value| s.serverless(Method::POST, "/idle-ep/run", Some(json!({"input": input})));
    let (_, a) = run(json!({"simulate": {"seconds": 0.5}})).await;
    let (_, b) = run(json!({"simulate": {"seconds": 0.5}})).await;
    let (_, c) = run(json!({"simulate": {"seconds": 0.5}})).await;
    let (a, b, c) = (
        a["id"].as_str().unwrap().to_string(),
        b["id"].as_str().unwrap().to_string(),
        c["id"].as_str().unwrap().to_string(),
    );
    eventually(
        "first job picked up by the (cold-started) worker",
        || async {
            let (_, v) = s
                .serverless(Method::GET, &format!("/idle-ep/status/{a}"), None)
                .await;
            (v["status"] == "IN_PROGRESS").then_some(())
        },
    )
    .await;
    let (_, v) = s
        .serverless(Method::POST, &format!("/idle-ep/cancel/{c}"), None)
        .await;
    assert_eq!(v, json!({"id": c, "status": "CANCELLED"}));
    let (_, v) = s
        .serverless(Method::POST, "/idle-ep/purge-queue", None)
        .await;
    assert_eq!(
        v,
        json!({"removed": 1, "status": "completed"}),
        "b was still queued"
    );
    assert_eq!(s.job_done("idle-ep", &b).await["status"], "CANCELLED");
    let (_, v) = s
        .serverless(Method::POST, &format!("/idle-ep/cancel/{a}"), None)
        .await;
    assert!(matches!(
        v["status"].as_str(),
        Some("CANCELLED" | "COMPLETED")
    ));

    let (st, v) = s
        .serverless(
            Method::POST,
            "/idle-ep/runsync",
            Some(json!({"input": {"operation": "x", "simulate": {"seconds": 0.1}}})),
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(v["status"], "COMPLETED", "{v}");
    assert!(v["id"].as_str().unwrap().starts_with("sync-"));
    let sync_id = v["id"].as_str().unwrap().to_string();
    let (_, v) = s
        .serverless(Method::GET, &format!("/idle-ep/stream/{sync_id}"), None)
        .await;
    assert_eq!(v["stream"].as_array().unwrap().len(), 1);
    let (_, v) = s
        .serverless(Method::GET, &format!("/idle-ep/stream/{sync_id}"), None)
        .await;
    assert_eq!(
        v,
        json!({"status": "COMPLETED", "stream": []}),
        "the output streams once"
    );

    let (_, v) =
        run(json!({"simulate": {"status": 422, "error": "bad video", "seconds": 0}})).await;
    let v = s.job_done("idle-ep", v["id"].as_str().unwrap()).await;
    assert_eq!(
        (v["status"].clone(), v["error"].clone()),
        (json!("FAILED"), json!("bad video"))
    );
    let (_, v) = s
        .serverless(
            Method::POST,
            "/idle-ep/run",
            Some(
                json!({"input": {"simulate": {"seconds": 1}}, "policy": {"executionTimeout": 100}}),
            ),
        )
        .await;
    assert_eq!(
        s.job_done("idle-ep", v["id"].as_str().unwrap()).await["status"],
        "TIMED_OUT"
    );
    let (_, v) = run(json!({"simulate": {"die": true, "seconds": 0.1}})).await;
    let died = s.job_done("idle-ep", v["id"].as_str().unwrap()).await;
    assert_eq!(died["status"], "FAILED");
    let (_, v) = s
        .serverless(
            Method::POST,
            &format!("/idle-ep/retry/{}", died["id"].as_str().unwrap()),
            None,
        )
        .await;
    assert_eq!(v["status"], "IN_QUEUE");

    assert_eq!(
        s.serverless(Method::GET, "/nope/health", None).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        s.serverless(Method::GET, "/idle-ep/status/nope", None)
            .await
            .0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        s.serverless(Method::POST, "/idle-ep/run", Some(json!({"x": 1})))
            .await
            .0,
        StatusCode::BAD_REQUEST
    );
    let res =
        s.c.get(format!("{}/idle-ep/health", s.h.serverless_url()))
            .bearer_auth("bad")
            .send()
            .await
            .unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    let res =
        s.c.get(format!("{}/idle-ep/health", s.h.serverless_url()))
            .header("authorization", RUNPOD_KEY)
            .send()
            .await
            .unwrap();
    assert_eq!(
        res.status(),
        StatusCode::OK,
        "a bare authorization header works as in the docs"
    );
}

#[tokio::test]
async fn save_endpoint_replaces_settings_and_new_endpoints_serve_jobs() {
    let s = fast().await;
    let q = "mutation { saveEndpoint(input: {id: \"abc123xyz\", name: \"gpupool-video\", templateId: \"t\", gpuIds: \"ADA_24\", \
             workersMin: 0, workersMax: 5, scalerType: \"QUEUE_DELAY\", scalerValue: 4}) { id idleTimeout workersMax } }";
    let (_, v) = s.gql(q, json!({})).await;
    assert_eq!(
        v["data"]["saveEndpoint"],
        json!({"id": "abc123xyz", "idleTimeout": 5, "workersMax": 5}),
        "omitted fields reset"
    );
    let q = "mutation S($i: EndpointInput!) { saveEndpoint(input: $i) { id name workersMin } }";
    let (_, v) = s.gql(q, json!({"i": {"name": "second-endpoint", "templateId": "t", "gpuIds": "AMPERE_16", "idleTimeout": 2}})).await;
    let id = v["data"]["saveEndpoint"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (_, v) = s
        .serverless(
            Method::POST,
            &format!("/{id}/runsync"),
            Some(json!({"input": {"simulate": {"seconds": 0.05}}})),
        )
        .await;
    assert_eq!(v["status"], "COMPLETED");
    let (_, v) = s
        .gql(
            "{ myself { endpoints { id name idleTimeout } } }",
            json!({}),
        )
        .await;
    assert_eq!(
        v["data"]["myself"]["endpoints"].as_array().unwrap().len(),
        2
    );
    let (_, v) = s
        .gql(
            "mutation { saveEndpoint(input: {name: \"ab\"}) { id } }",
            json!({}),
        )
        .await;
    assert!(
        v["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("3 characters")
    );
    let (_, v) = s
        .gql(
            &format!("mutation {{ deleteEndpoint(id: \"{id}\") }}"),
            json!({}),
        )
        .await;
    assert!(v["errors"].is_array(), "workers must be 0/0 first");

    // workersMin keeps a warm worker (and its bill) with an empty queue.
    let save = |min: u32, max: u32| {
        format!(
            "mutation {{ saveEndpoint(input: {{id: \"{id}\", name: \"second-endpoint\", workersMin: {min}, workersMax: {max}, idleTimeout: 1}}) {{ id }} }}"
        )
    };
    s.gql(&save(1, 2), json!({})).await;
    let workers = |st: Value| -> Vec<Value> {
        let ep = st["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["id"] == id.as_str())
            .cloned()
            .unwrap();
        ep["workers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|w| w["state"] != "stopped")
            .cloned()
            .collect()
    };
    eventually("a warm worker", || async {
        (workers(s.admin("/admin/state").await).len() == 1).then_some(())
    })
    .await;
    s.gql(&save(0, 0), json!({})).await;
    eventually("no workers", || async {
        workers(s.admin("/admin/state").await)
            .is_empty()
            .then_some(())
    })
    .await;
    let (_, v) = s
        .gql(
            &format!("mutation {{ deleteEndpoint(id: \"{id}\") }}"),
            json!({}),
        )
        .await;
    assert_eq!(v, json!({"data": {"deleteEndpoint": null}}));
    assert_eq!(
        s.serverless(Method::GET, &format!("/{id}/health"), None)
            .await
            .0,
        StatusCode::NOT_FOUND
    );
}

// ---------------------------------------------------------------------------------------
// Admin, robustness, the binary
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn admin_reset_stops_workers_and_restores_the_configured_world() {
    let s = fast().await;
    let (_, v) = s.vast_create(1001, "r", json!({})).await;
    let id = v["new_contract"].as_u64().unwrap();
    let port = host_port(&s.vast_running(id).await, "8000/tcp");
    s.admin_put("/admin/faults", json!({"errors": {"*": {"rate": 1.0}}}))
        .await;
    s.serverless(Method::POST, "/abc123xyz/run", Some(json!({"input": {}})))
        .await;
    let (st, _) = body(s.c.post(s.url("/admin/reset")).send().await.unwrap()).await;
    assert_eq!(st, StatusCode::OK);
    assert!(!port_open(port));
    let state = s.admin("/admin/state").await;
    assert_eq!(
        (state["instances"].clone(), state["jobs"].clone()),
        (json!([]), json!([]))
    );
    assert_eq!(state["endpoints"][0]["id"], "abc123xyz");
    assert_eq!(s.admin("/admin/faults").await["errors"], json!({}));
    assert_eq!(s.admin("/admin/calls").await["total"], 0);
    assert_eq!(s.admin("/admin/bill").await["total"], 0.0);
    let (_, v) = s.vast_create(1001, "r", json!({})).await;
    assert_eq!(v["new_contract"].as_u64().unwrap(), id, "ids start over");
}

#[tokio::test]
async fn malformed_requests_get_400s_and_secrets_never_reach_the_admin_api() {
    let s = fast().await;
    let send = |m: Method, p: &str, b: &'static str| {
        s.c.request(m, s.url(p))
            .bearer_auth(VAST_KEY)
            .body(b)
            .send()
    };
    assert_eq!(
        send(Method::PUT, "/api/v0/asks/1001/", "\u{0}\u{1}")
            .await
            .unwrap()
            .status(),
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        send(Method::PUT, "/api/v0/instances/1/", "[")
            .await
            .unwrap()
            .status(),
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        send(Method::GET, "/api/v0/instances/%FF/", "")
            .await
            .unwrap()
            .status(),
        StatusCode::BAD_REQUEST
    );
    let gql = |b: &'static str| {
        s.c.post(s.url("/graphql"))
            .bearer_auth(RUNPOD_KEY)
            .body(b)
            .send()
    };
    for bad in [
        "",
        "x",
        "[]",
        r#"{"query": 5}"#,
        r#"{"query": "{ myself { id } }", "variables": []}"#,
        r#"{"query": "{"}"#,
    ] {
        assert_eq!(
            gql(bad).await.unwrap().status(),
            StatusCode::BAD_REQUEST,
            "{bad}"
        );
    }
    let deep = json!({"query": format!("{{ myself {} }}", "{ id ".repeat(50_000))});
    let res =
        s.c.post(s.url("/graphql"))
            .bearer_auth(RUNPOD_KEY)
            .json(&deep)
            .send()
            .await
            .unwrap();
    assert_eq!(
        res.status(),
        StatusCode::BAD_REQUEST,
        "absurd nesting is refused, not a stack overflow"
    );
    let rest =
        s.c.post(format!("{}/pods", s.h.rest_url()))
            .bearer_auth(RUNPOD_KEY)
            .body("[]")
            .send()
            .await
            .unwrap();
    assert_eq!(rest.status(), StatusCode::BAD_REQUEST);
    let sl =
        s.c.post(format!("{}/abc123xyz/run", s.h.serverless_url()))
            .bearer_auth(RUNPOD_KEY)
            .body("nope")
            .send()
            .await
            .unwrap();
    assert_eq!(sl.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        s.admin_put("/admin/faults", json!({"nonsense": 1})).await.0,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        s.admin_put("/admin/catalogue", json!({"vast_offers": 3}))
            .await
            .0,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        s.c.get(s.url("/no/such/route"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::NOT_FOUND
    );

    // Keys in the query string and secrets in the env never show up in the admin API.
    s.c.get(s.url("/api/v0/instances/1/?api_key=SUPERSECRET-1"))
        .send()
        .await
        .unwrap();
    s.c.post(s.url("/graphql?api_key=SUPERSECRET-2"))
        .json(&json!({"query": "{ myself { id } }"}))
        .send()
        .await
        .unwrap();
    let (_, v) = s.vast_create(1001, "secret", worker_env()).await;
    s.vast_running(v["new_contract"].as_u64().unwrap()).await;
    for path in [
        "/admin/calls",
        "/admin/state",
        "/admin/bill",
        "/admin/executions",
    ] {
        let text =
            s.c.get(s.url(path))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
        for secret in [
            "SUPERSECRET",
            "pool-key-secret",
            "session-secret",
            VAST_KEY,
            RUNPOD_KEY,
        ] {
            assert!(!text.contains(secret), "{path} leaks {secret}");
        }
    }
}

#[test]
fn the_binary_prints_its_address_writes_the_port_file_and_stops_on_sigterm() {
    let dir = std::env::temp_dir().join(format!("gpupool-sim-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("sim.yaml");
    std::fs::write(&config, "seed: 3\napi_keys:\n  vast: [k1]\ntiming:\n  provisioning_seconds: 0.1\nendpoints:\n  - id: yaml-ep\n    idle_timeout: 2\n").unwrap();
    let port_file = dir.join("port");
    let mut child = Command::new(env!("CARGO_BIN_EXE_gpupool-sim"))
        .args([
            "--config",
            config.to_str().unwrap(),
            "--port-file",
            port_file.to_str().unwrap(),
            "--seed",
            "9",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn gpupool-sim");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .trim()
        .strip_prefix("gpupool-sim listening on ")
        .expect(&line)
        .to_string();
    let port: u16 = url
        .strip_prefix("http://127.0.0.1:")
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(
        std::fs::read_to_string(&port_file).unwrap().trim(),
        port.to_string()
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let c = client();
        let state: Value = c
            .get(format!("{url}/admin/state"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(state["endpoints"][0]["id"], "yaml-ep");
        assert_eq!(state["endpoints"][0]["idle_timeout"], 2);
        let st = c
            .get(format!("{url}/api/v0/instances/1/"))
            .bearer_auth("k2")
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(st, StatusCode::UNAUTHORIZED, "only the configured key");
    });
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "gpupool-sim did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
    assert!(!port_open(port));
    // A non-loopback listen address is refused.
    let out = Command::new(env!("CARGO_BIN_EXE_gpupool-sim"))
        .args(["--listen", "0.0.0.0:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_yaml_examples_in_the_manual_are_valid_configurations() {
    let manual = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../docs/simulator.md"
    ))
    .unwrap();
    let blocks: Vec<&str> = manual
        .split("```yaml\n")
        .skip(1)
        .filter_map(|b| b.split("```").next())
        .collect();
    assert_eq!(
        blocks.len(),
        3,
        "the configuration, the faults and the real workers examples"
    );
    for b in blocks {
        SimConfig::from_yaml(b).unwrap_or_else(|e| panic!("{e}\n{b}"));
    }
    let full = SimConfig::from_yaml(
        manual
            .split("```yaml\n")
            .nth(1)
            .unwrap()
            .split("```")
            .next()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(full.vast_offers[0].extra["cuda_max_good"], json!(12.8));
    assert!(
        SimConfig::from_yaml("sede: 1").is_err(),
        "typos are refused"
    );
}

#[tokio::test]
async fn interruptible_vast_instances_bill_at_the_bid_and_are_outbid_by_the_admin_or_by_rate() {
    let s = fast().await;
    let bid_create = |label: &'static str| {
        let req = json!({
            "client_id": "me", "image": "ghcr.io/gpupool/worker:test", "env": {}, "price": 0.05,
            "disk": 10, "label": label, "extra": null, "onstart": null, "runtype": "args",
        });
        s.vast(Method::PUT, "/api/v0/asks/1001/").json(&req).send()
    };
    let (st, v) = body(bid_create("spot-1").await.unwrap()).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let id = v["new_contract"].as_u64().unwrap();
    let port = host_port(&s.vast_running(id).await, "8000/tcp");
    let shown = s.vast_show(id).await;
    assert_eq!(
        (shown["is_bid"].clone(), shown["dph_total"].clone()),
        (json!(true), json!(0.05))
    );

    let (st, _) = body(
        s.c.post(s.url(&format!("/admin/instances/{id}/kill")))
            .json(&json!({"when": "outbid"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    let shown = s.vast_show(id).await;
    assert_eq!(shown["actual_status"], "stopped");
    assert!(
        shown["status_msg"].as_str().unwrap().contains("outbid"),
        "{shown}"
    );
    assert!(!port_open(port), "the worker's port closes");

    // By rate: with a high rate every running bid instance is outbid within seconds.
    let mut timing = s.admin("/admin/timing").await;
    timing["interruptible_preemptions_per_hour"] = json!(3600.0);
    s.admin_put("/admin/timing", timing).await;
    let (_, v) = body(bid_create("spot-2").await.unwrap()).await;
    let id = v["new_contract"].as_u64().unwrap();
    eventually("the rate outbids it", || async {
        (s.vast_show(id).await["actual_status"] == "stopped").then_some(())
    })
    .await;
}
