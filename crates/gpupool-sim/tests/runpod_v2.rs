//! RunPod REST v2 over real HTTP: the pod life cycle and its actions, paging, every error
//! class (401, 404, 409, 400 no capacity, 422 contract), the injected faults in v2's shape,
//! the quota headers, cross-surface visibility with GraphQL and REST v1, the catalogue,
//! endpoint settings shared with `saveEndpoint`, and the `/v2/` prefix shared with the
//! serverless jobs API.

use std::{
    future::Future,
    time::{Duration, Instant},
};

use gpupool_sim::{self as sim, SimConfig, SimHandle};
use reqwest::{Client, Method, StatusCode, header::HeaderMap};
use serde_json::{Value, json};

const KEY: &str = "runpod-test-key";
const GPU_4090: &str = "NVIDIA GeForce RTX 4090";

struct Sim {
    h: SimHandle,
    c: Client,
}

/// One answer: status, headers and the body as JSON (or a string, or null when empty).
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Value,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// A problem+json answer with this status; its `detail`.
    fn problem(&self, status: u16) -> &str {
        assert_eq!(self.status.as_u16(), status, "{}", self.body);
        assert_eq!(
            self.header("content-type"),
            Some("application/problem+json")
        );
        assert_eq!(self.body["status"], status);
        assert!(self.body["title"].is_string());
        self.body["detail"].as_str().expect("detail")
    }
}

async fn start(config: SimConfig) -> Sim {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let c = Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("reqwest client");
    Sim {
        h: sim::start(config).await.expect("simulator starts"),
        c,
    }
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

async fn answer(res: reqwest::Response) -> Answer {
    let status = res.status();
    let headers = res.headers().clone();
    let text = res.text().await.expect("body");
    let body = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or(Value::String(text))
    };
    Answer {
        status,
        headers,
        body,
    }
}

fn pod_body(name: &str) -> Value {
    json!({"name": name, "image": "ghcr.io/gpupool/worker:test",
           "gpu": {"id": GPU_4090, "count": 1}, "ports": ["8000/tcp", "22/tcp"],
           "env": {"GPUPOOL_WORKER_PORT": "8000", "MARK": name}})
}

impl Sim {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.h.base_url)
    }

    async fn v2(&self, method: Method, path: &str, body: Option<Value>) -> Answer {
        let mut req = self
            .c
            .request(method, format!("{}{path}", self.h.rest_v2_url()))
            .bearer_auth(KEY);
        if let Some(b) = body {
            req = req.json(&b);
        }
        answer(req.send().await.expect("v2 request")).await
    }

    async fn create(&self, body: Value) -> Answer {
        self.v2(Method::POST, "/pods", Some(body)).await
    }

    async fn created(&self, name: &str) -> String {
        let a = self.create(pod_body(name)).await;
        assert_eq!(a.status, StatusCode::CREATED, "{}", a.body);
        a.body["id"].as_str().unwrap().to_string()
    }

    async fn get(&self, id: &str) -> Answer {
        self.v2(Method::GET, &format!("/pods/{id}"), None).await
    }

    async fn status_is(&self, id: &str, want: &str) -> Value {
        eventually(want, || async {
            let a = self.get(id).await;
            (a.body["status"] == want).then_some(a.body)
        })
        .await
    }

    async fn act(&self, id: &str, action: &str) -> Answer {
        self.v2(
            Method::POST,
            &format!("/pods/{id}/action"),
            Some(json!({"action": action})),
        )
        .await
    }

    async fn admin_put(&self, path: &str, v: Value) {
        let res = self.c.put(self.url(path)).json(&v).send().await.unwrap();
        assert_eq!(
            res.status(),
            StatusCode::OK,
            "{}",
            res.text().await.unwrap()
        );
    }

    async fn admin(&self, path: &str) -> Value {
        answer(self.c.get(self.url(path)).send().await.unwrap())
            .await
            .body
    }

    async fn gql(&self, query: &str) -> Value {
        let res = self
            .c
            .post(self.url("/graphql"))
            .bearer_auth(KEY)
            .json(&json!({"query": query}))
            .send()
            .await
            .unwrap();
        answer(res).await.body
    }

    async fn v1(&self, method: Method, path: &str) -> Answer {
        let req = self
            .c
            .request(method, format!("{}{path}", self.h.rest_url()))
            .bearer_auth(KEY);
        answer(req.send().await.unwrap()).await
    }
}

fn tcp_port(pod: &Value, private: u64) -> u16 {
    pod["runtime"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["private"] == private)
        .and_then(|p| p["public"].as_u64())
        .expect("port") as u16
}

#[tokio::test]
async fn a_pod_goes_from_provisioning_to_running_and_through_every_action() {
    let s = fast().await;
    let a = s.create(pod_body("life")).await;
    assert_eq!(a.status, StatusCode::CREATED);
    let p = &a.body;
    assert_eq!(p["status"], "PROVISIONING");
    assert_eq!(p["actions"], json!(["stop", "terminate"]));
    assert_eq!(p["runtime"], Value::Null);
    assert_eq!(p["gpu"], json!({"id": GPU_4090, "count": 1}));
    assert_eq!(p["cost"], 0.69, "the secure price of one GPU");
    assert_eq!(p["cloud"], "SECURE");
    assert_eq!(p["env"]["MARK"], "life");
    assert_eq!(p["ports"], json!(["8000/tcp", "22/tcp"]));
    assert_eq!(p["dataCenterId"], "US-TX-3");
    assert_eq!(p["startedAt"], Value::Null);
    assert!(a.header("ratelimit").unwrap().starts_with("\"minute\";r="));
    assert_eq!(
        a.header("ratelimit-policy"),
        Some("\"minute\";q=60;w=60, \"hour\";q=3000;w=3600, \"day\";q=50000;w=86400")
    );
    let id = p["id"].as_str().unwrap().to_string();

    let running = s.status_is(&id, "RUNNING").await;
    assert_eq!(running["actions"], json!(["stop", "restart", "terminate"]));
    let port = tcp_port(&running, 8000);
    let health =
        s.c.get(format!("http://127.0.0.1:{port}/health"))
            .send()
            .await
            .unwrap();
    assert_eq!(health.status(), StatusCode::OK, "the worker answers");
    assert_eq!(
        running["ssh"]["direct"]["port"].as_u64(),
        Some(u64::from(tcp_port(&running, 22)))
    );
    assert!(running["startedAt"].is_string());

    let stopped = s.act(&id, "stop").await;
    assert_eq!(stopped.status, StatusCode::OK);
    assert_eq!(stopped.body["status"], "EXITED");
    assert_eq!(stopped.body["cost"], 0.0);
    assert_eq!(stopped.body["runtime"], Value::Null);
    assert_eq!(stopped.body["actions"], json!(["start", "terminate"]));
    let detail = s.act(&id, "restart").await.problem(409).to_string();
    assert!(detail.contains("EXITED"), "{detail}");

    assert_eq!(s.act(&id, "start").await.body["status"], "STARTING");
    s.status_is(&id, "RUNNING").await;
    assert_eq!(s.act(&id, "restart").await.body["status"], "STARTING");
    let again = s.status_is(&id, "RUNNING").await;
    assert_ne!(tcp_port(&again, 8000), 0);

    let gone = s.act(&id, "terminate").await;
    assert_eq!(gone.status, StatusCode::NO_CONTENT);
    assert_eq!(gone.body, Value::Null);
    assert!(
        gone.header("ratelimit").is_some(),
        "204s carry the quota too"
    );
    s.get(&id).await.problem(404);
    s.v2(Method::DELETE, &format!("/pods/{id}"), None)
        .await
        .problem(404);

    let id = s.created("delete-me").await;
    let del = s.v2(Method::DELETE, &format!("/pods/{id}"), None).await;
    assert_eq!(del.status, StatusCode::NO_CONTENT);
    assert_eq!(
        s.v2(Method::GET, "/pods", None).await.body["pods"],
        json!([])
    );
    let bill = s.admin("/admin/bill").await;
    assert_eq!(bill["instances"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn patch_changes_only_the_fields_it_names_and_locked_pods_refuse_to_stop() {
    let s = fast().await;
    let id = s.created("before").await;
    let a = s
        .v2(
            Method::PATCH,
            &format!("/pods/{id}"),
            Some(json!({"name": "after", "locked": true, "env": {"K": "v"}, "ports": ["8000/tcp", "9000/http"]})),
        )
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    assert_eq!(a.body["name"], "after");
    assert_eq!(a.body["env"], json!({"K": "v"}));
    assert_eq!(a.body["image"], "ghcr.io/gpupool/worker:test");
    assert_eq!(a.body["ports"], json!(["8000/tcp", "9000/http"]));
    assert_eq!(a.body["locked"], true);
    s.status_is(&id, "RUNNING").await;
    assert!(s.act(&id, "stop").await.problem(409).contains("locked"));
    let bad = s
        .v2(
            Method::PATCH,
            &format!("/pods/{id}"),
            Some(json!({"nmae": "x"})),
        )
        .await;
    assert_eq!(
        bad.problem(422),
        "the request does not match the API contract"
    );
    assert_eq!(
        bad.body["errors"],
        json!(["$: additional properties 'nmae' not allowed"])
    );
}

#[tokio::test]
async fn list_pages_with_limit_and_cursor_and_ignores_unknown_parameters() {
    let s = fast().await;
    let mut ids = Vec::new();
    for n in 0..5 {
        ids.push(s.created(&format!("page-{n}")).await);
    }
    let all = s.v2(Method::GET, "/pods?name=page-0&bogus=1", None).await;
    assert_eq!(
        all.body["pods"].as_array().unwrap().len(),
        5,
        "no name filter"
    );
    assert!(all.body.get("pagination").is_none(), "the published shape");

    let first = s.v2(Method::GET, "/pods?limit=2", None).await.body;
    assert_eq!(first["pagination"]["hasNextPage"], true);
    let got = |page: &Value| -> Vec<String> {
        page["pods"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["id"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(got(&first), ids[..2]);
    let cursor = first["pagination"]["nextCursor"]
        .as_str()
        .unwrap()
        .to_string();
    // A pod of the next page goes away: the cursor still continues where it was.
    s.v2(Method::DELETE, &format!("/pods/{}", ids[2]), None)
        .await;
    let second = s
        .v2(Method::GET, &format!("/pods?limit=2&cursor={cursor}"), None)
        .await
        .body;
    assert_eq!(got(&second), ids[3..5]);
    assert_eq!(
        second["pagination"],
        json!({"hasNextPage": false, "nextCursor": null})
    );

    s.v2(Method::GET, "/pods?cursor=not-a-cursor", None)
        .await
        .problem(400);
    s.v2(Method::GET, "/pods?limit=0", None).await.problem(422);
}

#[tokio::test]
async fn create_errors_tell_contract_from_rules_from_capacity() {
    let s = fast().await;
    let with = |patch: Value| {
        let mut b = pod_body("err");
        for (k, v) in patch.as_object().unwrap() {
            if v.is_null() {
                b.as_object_mut().unwrap().remove(k);
            } else {
                b[k] = v.clone();
            }
        }
        b
    };
    let a = s
        .create(with(
            json!({"bogus": 1, "cloud": "ALL", "gpu": {"id": GPU_4090, "count": 0, "typo": 1}}),
        ))
        .await;
    a.problem(422);
    assert_eq!(
        a.body["errors"],
        json!([
            "$: additional properties 'bogus' not allowed",
            "$.cloud: value must be one of SECURE, COMMUNITY",
            "$.gpu: additional properties 'typo' not allowed",
            "$.gpu.count: must be >= 1"
        ])
    );
    assert!(a.header("ratelimit").is_some());
    let missing = s.create(with(json!({"name": null, "image": null}))).await;
    missing.problem(422);
    assert_eq!(
        missing.body["errors"],
        json!(["$: missing property 'name'", "$: missing property 'image'"])
    );
    let bad_env = s.create(with(json!({"env": {"A": 1}}))).await;
    assert_eq!(bad_env.body["errors"], json!(["$.env.A: expected string"]));

    // The shape is right; RunPod's rules answer 400, and so does a lack of capacity.
    let no_count = s.create(with(json!({"gpu": {"id": GPU_4090}}))).await;
    assert!(
        no_count
            .problem(400)
            .contains("no longer any instances available")
    );
    assert!(
        s.create(with(json!({"gpu": null})))
            .await
            .problem(400)
            .contains("exactly one")
    );
    assert!(
        s.create(with(json!({"dataCenterIds": ["EU-SE-1"]})))
            .await
            .problem(400)
            .contains("no longer any instances")
    );
    let placed = s
        .create(with(json!({"dataCenterIds": ["EU-SE-1", "EU-RO-1"]})))
        .await;
    assert_eq!(placed.body["dataCenterId"], "EU-RO-1");
    assert!(
        s.create(with(
            json!({"gpu": {"id": "NVIDIA GeForce RTX 3060", "count": 1}})
        ))
        .await
        .problem(400)
        .contains("no longer any instances"),
        "the 3060 is community-only and the default cloud is SECURE"
    );
    let community = s
        .create(with(
            json!({"gpu": {"id": "NVIDIA GeForce RTX 3060", "count": 2}, "cloud": "COMMUNITY"}),
        ))
        .await;
    assert_eq!(community.body["cost"], 0.2);
    assert!(
        s.create(with(json!({"gpu": {"id": "NVIDIA H100", "count": 1}})))
            .await
            .problem(400)
            .contains("unknown GPU")
    );
    assert!(
        s.create(with(json!({"ports": ["8000/udp"]})))
            .await
            .problem(400)
            .contains("protocol")
    );
    s.create(with(json!({"templateId": "tpl-1", "image": null})))
        .await
        .problem(404);
    s.admin_put("/admin/faults", json!({"exhausted": ["RTX 4090"]}))
        .await;
    assert!(
        s.create(pod_body("x"))
            .await
            .problem(400)
            .contains("no longer any instances")
    );
    let junk = answer(
        s.c.post(format!("{}/pods", s.h.rest_v2_url()))
            .bearer_auth(KEY)
            .body("{not json")
            .send()
            .await
            .unwrap(),
    )
    .await;
    junk.problem(400);
}

#[tokio::test]
async fn only_bearer_keys_authenticate_and_unauthenticated_answers_carry_no_quota() {
    let s = fast().await;
    let base = s.h.rest_v2_url();
    for req in [
        s.c.get(format!("{base}/pods?api_key={KEY}")),
        s.c.get(format!("{base}/pods")).header("authorization", KEY),
        s.c.get(format!("{base}/pods")).bearer_auth("wrong"),
        s.c.get(format!("{base}/catalog/gpus")),
    ] {
        let a = answer(req.send().await.unwrap()).await;
        a.problem(401);
        assert!(a.header("ratelimit").is_none());
    }
    s.get("nope").await.problem(404);
    s.v2(
        Method::POST,
        "/pods/nope/action",
        Some(json!({"action": "stop"})),
    )
    .await
    .problem(404);
    let bad = s
        .v2(
            Method::POST,
            "/pods/nope/action",
            Some(json!({"action": "pause"})),
        )
        .await;
    bad.problem(422);
}

#[tokio::test]
async fn faults_answer_in_v2s_shape_with_and_without_retry_after() {
    let mut config = SimConfig::fast();
    config.timing.hang_seconds = 0.2;
    let s = start(config).await;
    s.admin_put(
        "/admin/faults",
        json!({
            "errors": {"runpod.v2.listPods": {"next": 1, "status": 503}},
            "rate_limits": {"runpod.v2.getPod": {"next": 1},
                            "runpod.v2.listGpuTypes": {"next": 1, "retry_after": 7},
                            "runpod.v2.getGpuType": {"next": 1, "retry_after": 0}},
            "hangs": {"runpod.v2.getEndpoint": {"next": 1}},
            "latency_ms": {"runpod.v2.listEndpoints": 150},
        }),
    )
    .await;
    let a = s.v2(Method::GET, "/pods", None).await;
    a.problem(503);
    assert!(a.header("ratelimit").is_some());
    assert_eq!(
        s.v2(Method::GET, "/pods", None).await.status,
        StatusCode::OK
    );
    let a = s.get("any").await;
    a.problem(429);
    assert_eq!(
        a.header("retry-after"),
        Some("1"),
        "RunPod v2 sends Retry-After"
    );
    let a = s.v2(Method::GET, "/catalog/gpus", None).await;
    a.problem(429);
    assert_eq!(a.header("retry-after"), Some("7"));
    let a = s
        .v2(Method::GET, &format!("/catalog/gpus/{GPU_4090}"), None)
        .await;
    a.problem(429);
    assert_eq!(a.header("retry-after"), None);
    let started = Instant::now();
    s.v2(Method::GET, "/serverless/abc123xyz", None)
        .await
        .problem(504);
    assert!(started.elapsed() >= Duration::from_millis(200));
    let started = Instant::now();
    assert_eq!(
        s.v2(Method::GET, "/serverless", None).await.status,
        StatusCode::OK
    );
    assert!(started.elapsed() >= Duration::from_millis(150));

    // Wildcards: `runpod.v2.*` covers every v2 operation and nothing else.
    s.admin_put(
        "/admin/faults",
        json!({"errors": {"runpod.v2.*": {"next": 2}}}),
    )
    .await;
    assert_eq!(
        s.gql("{ myself { id } }").await["data"]["myself"]["id"],
        "user_sim"
    );
    s.v2(Method::GET, "/pods", None).await.problem(500);
    s.v2(Method::GET, "/catalog/gpus", None).await.problem(500);
    assert_eq!(
        s.v2(Method::GET, "/pods", None).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn a_ghost_create_answers_an_error_but_the_pod_exists_and_bills() {
    let s = fast().await;
    s.admin_put(
        "/admin/faults",
        json!({"ghost_creates": {"runpod.v2.createPod": {"next": 1, "status": 502}}}),
    )
    .await;
    s.create(pod_body("ghost")).await.problem(502);
    let pods = s.v2(Method::GET, "/pods", None).await.body;
    let found: Vec<&Value> = pods["pods"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["env"]["MARK"] == "ghost")
        .collect();
    assert_eq!(found.len(), 1, "found by the marker in its env");
    assert!(
        s.admin("/admin/bill").await["by_provider"]["runpod"]
            .as_f64()
            .unwrap()
            >= 0.0
    );
    let calls = s.admin("/admin/calls").await;
    assert_eq!(calls["counts"]["runpod.v2.createPod"]["502"], 1);
    assert_eq!(
        calls["recent"][0]["instance"], found[0]["id"],
        "the call log names the ghost"
    );
}

#[tokio::test]
async fn a_pod_whose_container_dies_reports_error_and_can_be_started_again() {
    let s = fast().await;
    let id = s.created("die").await;
    let running = s.status_is(&id, "RUNNING").await;
    let port = tcp_port(&running, 8000);
    let job =
        s.c.post(format!("http://127.0.0.1:{port}/video/t"))
            .header("X-Job-Id", "die-v2")
            .json(&json!({"simulate": {"die": true, "seconds": 0.2}}))
            .send()
            .await;
    assert!(job.is_err(), "the connection drops mid-job");
    let dead = s.status_is(&id, "ERROR").await;
    assert_eq!(dead["actions"], json!(["start", "terminate"]));
    assert_eq!(dead["runtime"], Value::Null);
    assert_eq!(dead["cost"], 0.69, "a dead pod still bills");
    assert_eq!(s.act(&id, "start").await.body["status"], "STARTING");
    s.status_is(&id, "RUNNING").await;
    // The admin kill knob gives ERROR too, even before the pod ever ran.
    s.admin_put("/admin/timing", json!({"provisioning_seconds": 30.0}))
        .await;
    let slow = s.created("slow").await;
    let res =
        s.c.post(s.url(&format!("/admin/instances/{slow}/kill")))
            .send()
            .await
            .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(s.get(&slow).await.body["status"], "ERROR");
}

#[tokio::test]
async fn an_enforced_quota_refuses_with_retry_after_until_the_window_resets() {
    let mut config = SimConfig::fast();
    config.runpod_v2_rate_limit = sim::RateLimitSpec {
        minute: 3,
        hour: 100,
        day: 1000,
        enforce: true,
    };
    let s = start(config).await;
    for left in [2, 1, 0] {
        let a = s.v2(Method::GET, "/pods", None).await;
        assert_eq!(a.status, StatusCode::OK);
        assert!(
            a.header("ratelimit")
                .unwrap()
                .starts_with(&format!("\"minute\";r={left};"))
        );
    }
    let a = s.v2(Method::GET, "/pods", None).await;
    a.problem(429);
    let wait: u64 = a.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=60).contains(&wait));
    assert!(
        a.header("ratelimit")
            .unwrap()
            .starts_with("\"minute\";r=0;")
    );
    assert_eq!(
        s.admin("/admin/calls").await["counts"]["runpod.v2.listPods"]["429"],
        1
    );
    // Other surfaces are not counted; lifting enforcement lets v2 through again.
    assert_eq!(s.v1(Method::GET, "/pods").await.status, StatusCode::OK);
    s.admin_put(
        "/admin/rate-limit",
        json!({"minute": 3, "hour": 100, "day": 1000, "enforce": false}),
    )
    .await;
    assert_eq!(
        s.v2(Method::GET, "/pods", None).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn pods_are_the_same_over_graphql_rest_v1_and_rest_v2() {
    let s = fast().await;
    // v2 -> GraphQL and v1.
    let id = s.created("cross").await;
    s.status_is(&id, "RUNNING").await;
    let g = s
        .gql(&format!(
            "{{ pod(input: {{podId: \"{id}\"}}) {{ id name desiredStatus gpuCount costPerHr }} }}"
        ))
        .await;
    assert_eq!(
        g["data"]["pod"],
        json!({"id": id, "name": "cross", "desiredStatus": "RUNNING", "gpuCount": 1, "costPerHr": 0.69})
    );
    let v1 = s.v1(Method::GET, &format!("/pods/{id}")).await;
    assert_eq!(v1.body["desiredStatus"], "RUNNING");
    assert_eq!(v1.body["env"]["MARK"], "cross");
    // A stop over v1 shows in v2; a delete over v2 shows in GraphQL.
    s.v1(Method::POST, &format!("/pods/{id}/stop")).await;
    assert_eq!(s.get(&id).await.body["status"], "EXITED");
    s.v2(Method::DELETE, &format!("/pods/{id}"), None).await;
    let g = s
        .gql(&format!("{{ pod(input: {{podId: \"{id}\"}}) {{ id }} }}"))
        .await;
    assert_eq!(g["data"]["pod"], Value::Null);

    // GraphQL -> v2, in the community cloud, two GPUs.
    let g = s
        .gql(&format!(
            "mutation {{ podFindAndDeployOnDemand(input: {{name: \"from-gql\", imageName: \"img\", gpuTypeId: \"{GPU_4090}\", gpuCount: 2, cloudType: COMMUNITY, ports: \"8000/tcp\", volumeInGb: 20}}) {{ id }} }}"
        ))
        .await;
    let gid = g["data"]["podFindAndDeployOnDemand"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let p = s.get(&gid).await.body;
    assert_eq!(p["name"], "from-gql");
    assert_eq!(p["gpu"], json!({"id": GPU_4090, "count": 2}));
    assert_eq!(p["cloud"], "COMMUNITY");
    assert_eq!(p["cost"], 0.68);
    assert_eq!(
        p["mounts"],
        json!({"persistent": {"size": 20, "path": "/workspace"}})
    );
    let listed = s.v2(Method::GET, "/pods", None).await.body;
    assert_eq!(listed["pods"][0]["id"], gid);
    // A stop over v2 shows in GraphQL.
    s.status_is(&gid, "RUNNING").await;
    s.act(&gid, "stop").await;
    let g = s
        .gql(&format!(
            "{{ pod(input: {{podId: \"{gid}\"}}) {{ desiredStatus }} }}"
        ))
        .await;
    assert_eq!(g["data"]["pod"]["desiredStatus"], "EXITED");
}

#[tokio::test]
async fn the_catalog_lists_per_gpu_prices_and_availability_on_request() {
    let s = fast().await;
    let all = s.v2(Method::GET, "/catalog/gpus", None).await.body;
    let gpus = all["gpus"].as_array().unwrap();
    assert_eq!(gpus.len(), 3);
    assert_eq!(
        gpus[0]["price"],
        json!({"secure": 0.69, "community": 0.34, "serverless": 1.1})
    );
    assert!(gpus[0].get("availability").is_none(), "only on request");
    assert_eq!(gpus[2]["maxCount"], json!({"secure": 0, "community": 8}));

    let s = &s;
    let one = |q: &str| {
        let path = format!("/catalog/gpus/{}{q}", GPU_4090.replace(' ', "%20"));
        async move { s.v2(Method::GET, &path, None).await }
    };
    let a = one("?include=AVAILABILITY&product=POD").await.body;
    assert_eq!(a["availability"], "HIGH");
    assert_eq!(
        a["dataCenters"][0],
        json!({"id": "US-TX-3", "name": "US-TX-3", "availability": "HIGH"})
    );
    for _ in 0..6 {
        s.created("stock").await;
    }
    assert_eq!(
        one("?include=AVAILABILITY&product=POD").await.body["availability"],
        "LOW"
    );
    assert_eq!(
        one("?include=AVAILABILITY&product=POD&count=4").await.body["availability"],
        "NONE"
    );
    let far = one("?include=AVAILABILITY&product=POD&countryCodes=JP")
        .await
        .body;
    assert_eq!(far["availability"], "NONE");
    assert!(far.get("dataCenters").is_none());
    assert_eq!(
        one("?include=AVAILABILITY&product=POD&minCudaVersion=13")
            .await
            .body["availability"],
        "NONE"
    );
    one("?include=AVAILABILITY").await.problem(400);
    one("?product=POD").await.problem(400);
    one("?include=AVAILABILITY&product=POD&countryCodes=usa")
        .await
        .problem(422);
    s.v2(Method::GET, "/catalog/gpus/NVIDIA%20H100", None)
        .await
        .problem(404);
    let listed = s
        .v2(
            Method::GET,
            "/catalog/gpus?include=AVAILABILITY&product=POD&countryCodes=RO",
            None,
        )
        .await
        .body;
    assert_eq!(
        listed["gpus"][0]["dataCenters"],
        json!([{"id": "EU-RO-1", "name": "EU-RO-1", "availability": "LOW"}])
    );
}

#[tokio::test]
async fn endpoint_settings_are_shared_with_save_endpoint_and_patched_partially() {
    let s = fast().await;
    let ep = s.v2(Method::GET, "/serverless/abc123xyz", None).await.body;
    assert_eq!(ep["workers"], json!({"min": 0, "max": 3, "idleTimeout": 5}));
    assert_eq!(
        ep["scaling"],
        json!({"type": "QUEUE_DELAY", "queueDelay": 4.0})
    );
    assert_eq!(ep["gpu"]["pools"], json!(["ADA_24"]));
    assert_eq!(
        ep["requestUrls"]["run"],
        format!("{}/abc123xyz/run", s.h.serverless_url())
    );
    let a = s
        .v2(
            Method::PATCH,
            "/serverless/abc123xyz",
            Some(json!({"workers": {"min": 1, "idleTimeout": 30}, "flashboot": "FLASHBOOT"})),
        )
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    assert_eq!(
        a.body["workers"],
        json!({"min": 1, "max": 3, "idleTimeout": 30})
    );
    assert_eq!(a.body["flashboot"], "FLASHBOOT");
    let g = s
        .gql("{ myself { endpoints { id workersMin idleTimeout } } }")
        .await;
    assert_eq!(
        g["data"]["myself"]["endpoints"][0],
        json!({"id": "abc123xyz", "workersMin": 1, "idleTimeout": 30})
    );
    eventually("a worker kept warm for workers.min", || async {
        let st = s.admin("/admin/state").await;
        (st["endpoints"][0]["active_workers"] == 1).then_some(())
    })
    .await;

    // Scaling on requests: idleTimeout no longer applies and is refused.
    let a = s
        .v2(
            Method::PATCH,
            "/serverless/abc123xyz",
            Some(json!({"scaling": {"type": "REQUEST_COUNT", "requestCount": 2}})),
        )
        .await;
    assert_eq!(a.body["workers"], json!({"min": 1, "max": 3}));
    let refused = s
        .v2(
            Method::PATCH,
            "/serverless/abc123xyz",
            Some(json!({"workers": {"idleTimeout": 10}})),
        )
        .await;
    refused.problem(422);
    assert!(
        refused.body["errors"][0]
            .as_str()
            .unwrap()
            .contains("idleTimeout")
    );
    s.v2(
        Method::PATCH,
        "/serverless/abc123xyz",
        Some(json!({"workers": {"min": 5}})),
    )
    .await
    .problem(400);
    s.v2(
        Method::PATCH,
        "/serverless/abc123xyz",
        Some(json!({"workers": {"mni": 0}})),
    )
    .await
    .problem(422);
    s.v2(
        Method::PATCH,
        "/serverless/nope",
        Some(json!({"name": "x"})),
    )
    .await
    .problem(404);
    let gpus = s
        .v2(
            Method::PATCH,
            "/serverless/abc123xyz",
            Some(json!({"gpu": {"pools": ["ADA_24", "AMPERE_24"], "excludedTypes": ["NVIDIA GeForce RTX 3090"], "count": 2}})),
        )
        .await
        .body;
    assert_eq!(gpus["gpu"]["pools"], json!(["ADA_24", "AMPERE_24"]));
    assert_eq!(
        gpus["gpu"]["excludedTypes"],
        json!(["NVIDIA GeForce RTX 3090"])
    );
    assert_eq!(gpus["gpu"]["count"], 2);
    s.v2(
        Method::PATCH,
        "/serverless/abc123xyz",
        Some(json!({"gpu": {"pools": ["ADA_24"], "excludedTypes": ["NVIDIA GeForce RTX 3090"]}})),
    )
    .await
    .problem(400);
    let listed = s.v2(Method::GET, "/serverless", None).await.body;
    assert_eq!(listed["endpoints"][0]["name"], "gpupool-video");
}

#[tokio::test]
async fn static_v2_routes_win_and_the_serverless_jobs_api_keeps_its_paths() {
    let s = fast().await;
    let s = &s;
    let jobs = |method: Method, path: &str, body: Option<Value>| {
        let mut req =
            s.c.request(method, format!("{}{path}", s.h.serverless_url()))
                .bearer_auth(KEY);
        if let Some(b) = body {
            req = req.json(&b);
        }
        async move { answer(req.send().await.unwrap()).await }
    };
    let run = jobs(
        Method::POST,
        "/abc123xyz/run",
        Some(json!({"input": {"seconds": 0}})),
    )
    .await;
    assert_eq!(run.status, StatusCode::OK);
    assert_eq!(run.body["status"], "IN_QUEUE");
    assert!(
        run.header("ratelimit").is_none(),
        "the jobs API is not v2 REST"
    );
    let job = run.body["id"].as_str().unwrap();
    let status = jobs(Method::GET, &format!("/abc123xyz/status/{job}"), None).await;
    assert_eq!(status.status, StatusCode::OK);
    assert_eq!(
        jobs(Method::GET, "/abc123xyz/health", None).await.status,
        StatusCode::OK
    );
    // `/v2/pods/health` and `/v2/serverless/health` are v2 resources, not endpoint health.
    s.v2(Method::GET, "/pods/health", None).await.problem(404);
    s.v2(Method::GET, "/serverless/health", None)
        .await
        .problem(404);
    let calls = s.admin("/admin/calls").await;
    assert_eq!(calls["counts"]["runpod.v2.getPod"]["404"], 1);
    assert_eq!(calls["counts"]["runpod.v2.getEndpoint"]["404"], 1);
    assert_eq!(calls["counts"]["serverless.run"]["200"], 1);
}
