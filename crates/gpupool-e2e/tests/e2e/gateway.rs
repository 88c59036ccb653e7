//! `gpupool gateway` end to end: the real gateway process (the operator's binary), the real
//! operator, the simulator, a real API server. What a VPS video app does through it, how it
//! survives a SIGKILL, its callbacks, and every refusal.

use std::{
    collections::HashMap,
    fs::File,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use gpupool::crd::VideoJob;
use gpupool_sim::SimHandle;
use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api, Client, ResourceExt,
    api::{ListParams, PostParams},
};
use serde_json::{Value, json};

use crate::operator::{
    Operator, admin, admin_put, create_pool, eventually, http, metrics_at, namespace_with_secrets,
    sample, sim, vast_pool,
};

pub const KEY_A: &str = "key-a-0123456789";
pub const KEY_B: &str = "key-b-0123456789";
pub const SIGN_A: &str = "sign-a-secret";

/// A running `gpupool gateway`, SIGKILLed when dropped.
pub struct Gateway {
    child: Child,
    log: std::path::PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    tag: String,
    generation: u32,
    pub url: String,
}

impl Gateway {
    /// Starts a gateway on `ns` on a free loopback port, with `extra` flags; waits until it
    /// is ready.
    pub async fn start(ns: &str, tag: &str, extra: &[&str]) -> Self {
        Self::start_with_env(ns, tag, extra, &[]).await
    }

    pub async fn start_with_env(ns: &str, tag: &str, extra: &[&str], env: &[(&str, &str)]) -> Self {
        let mut args: Vec<String> = vec![
            "gateway".into(),
            format!("--namespace={ns}"),
            "--http-addr=127.0.0.1:0".into(),
            format!("--pod-name={ns}-{tag}"),
            "--callback-allow-private".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let mut g = Self::spawn(ns, tag, args, env, 0);
        g.wait_ready().await;
        g
    }

    fn spawn(
        ns: &str,
        tag: &str,
        args: Vec<String>,
        env: Vec<(String, String)>,
        generation: u32,
    ) -> Self {
        let dir = crate::support::state_dir().join("operator-logs");
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join(format!("{ns}-gateway-{tag}-{generation}.log"));
        let out = File::create(&log).unwrap();
        let child = Command::new(crate::support::operator_binary())
            .args(&args)
            .env("RUST_LOG", "info,gpupool=debug")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::from(out.try_clone().unwrap()))
            .stderr(Stdio::from(out))
            .spawn()
            .expect("gateway starts");
        Self {
            child,
            log,
            args,
            env,
            tag: format!("{ns}-{tag}"),
            generation,
            url: String::new(),
        }
    }

    /// Waits for the listening line, then for `/readyz`.
    async fn wait_ready(&mut self) {
        let started = Instant::now();
        loop {
            let logs = self.logs();
            if let Some(addr) = logs
                .lines()
                .find(|l| l.contains("gpupool gateway listening"))
                .and_then(|l| l.split("addr=").nth(1))
                .and_then(|r| r.split_whitespace().next())
            {
                self.url = format!("http://{addr}");
                let ready = http()
                    .get(format!("{}/readyz", self.url))
                    .send()
                    .await
                    .is_ok_and(|r| r.status() == 200);
                if ready {
                    return;
                }
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("the gateway exited ({status}):\n{}", self.logs());
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "the gateway did not become ready:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, as the kubelet sends it on a rolling update.
    pub fn terminate(&self) {
        let pid = self.child.id().to_string();
        let status = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(status.success());
    }

    /// SIGKILL, then a new process with the same flags (on a new port).
    pub async fn restart(&mut self) {
        self.kill();
        let ns_tag = self.tag.clone();
        let (ns, tag) = ns_tag.rsplit_once('-').unwrap();
        let mut next = Self::spawn(
            ns,
            tag,
            self.args.clone(),
            self.env.clone(),
            self.generation + 1,
        );
        next.wait_ready().await;
        let old = std::mem::replace(self, next);
        drop(old);
    }

    /// Waits for the process to exit by itself and returns its log.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<String> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Ok(Some(_)) = self.child.try_wait() {
                return Some(self.logs());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        None
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The keys Secret: clients vps-a (with a callback secret) and vps-b.
pub async fn create_keys(client: &Client, ns: &str) {
    let s: Secret = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "gpupool-gateway-keys"},
        "stringData": {"vps-a": KEY_A, "vps-a.callback-secret": SIGN_A, "vps-b": KEY_B}
    }))
    .unwrap();
    Api::<Secret>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &s)
        .await
        .unwrap();
}

/// A namespace with provider Secrets, gateway keys, a pool `default`, and the operator.
async fn setup(
    prefix: &str,
    pool_idle: i64,
) -> (crate::support::TestNamespace, SimHandle, Operator) {
    let ns = namespace_with_secrets(prefix).await;
    let client = ns.client();
    create_keys(&client, &ns.name).await;
    let sim = sim().await;
    let op = Operator::start(&ns.name, &sim, &[]);
    create_pool(&client, &ns.name, "default", vast_pool(pool_idle)).await;
    (ns, sim, op)
}

async fn gateway_jobs(client: &Client, ns: &str) -> Vec<VideoJob> {
    Api::<VideoJob>::namespaced(client.clone(), ns)
        .list(&ListParams::default().labels("gpupool.dev/client"))
        .await
        .unwrap()
        .items
}

/// Waits until `n` gateway jobs exist in `ns`.
async fn wait_for_gateway_jobs(client: &Client, ns: &str, n: usize, op: &Operator) {
    eventually(
        Duration::from_secs(30),
        &format!("{n} gateway jobs"),
        Some(op),
        || {
            let client = client.clone();
            async move { (gateway_jobs(&client, ns).await.len() == n).then_some(()) }
        },
    )
    .await;
}

/// Serves a callback receiver on loopback; returns the URL of its `/hook` route.
async fn serve_hook(app: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    hook
}

/// A request to the gateway: method, path, key, body; returns status, headers, JSON body.
async fn call(
    method: reqwest::Method,
    url: &str,
    key: Option<&str>,
    headers: &[(&str, &str)],
    body: Option<Vec<u8>>,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let mut req = http()
        .request(method, url)
        .timeout(Duration::from_secs(120));
    if let Some(k) = key {
        req = req.header("x-api-key", k);
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    if let Some(b) = body {
        req = req.header("content-type", "application/json").body(b);
    }
    let res = req.send().await.expect("the gateway answers");
    let status = res.status().as_u16();
    let headers = res.headers().clone();
    let bytes = res.bytes().await.unwrap_or_default();
    let body = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()));
    (status, headers, body)
}

async fn post(
    url: &str,
    key: &str,
    headers: &[(&str, &str)],
    body: Value,
) -> (u16, reqwest::header::HeaderMap, Value) {
    call(
        reqwest::Method::POST,
        url,
        Some(key),
        headers,
        Some(serde_json::to_vec(&body).unwrap()),
    )
    .await
}

/// A validator for one component schema of the gateway's OpenAPI document.
fn openapi_validator(doc: &Value, component: &str) -> jsonschema::Validator {
    let root = json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$ref": format!("#/components/schemas/{component}"),
        "components": doc["components"].clone(),
    });
    jsonschema::options()
        .with_draft(jsonschema::Draft::Draft202012)
        .build(&root)
        .expect("the gateway's schema compiles")
}

fn assert_valid(doc: &Value, component: &str, body: &Value) {
    let v = openapi_validator(doc, component);
    let errors: Vec<String> = v
        .iter_errors(body)
        .map(|e| format!("{}: {e}", e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "{component} does not match the OpenAPI document: {errors:?}\n{body:#}"
    );
}

/// A VPS app that none of us wrote (Node + axios) posts /video/caption synchronously, 50
/// requests 10 at a time, and gets every worker output back; then the read side of the API
/// (jobs, pages, stats, metrics, OpenAPI) is checked against the same jobs.
#[tokio::test]
async fn a_vps_client_gets_every_output_back_through_the_gateway() {
    let (ns, _sim, op) = setup("gw-vps", 60).await;
    let client = ns.client();
    let gw = Gateway::start(&ns.name, "a", &[]).await;

    let summary = tokio::task::spawn_blocking({
        let url = gw.url.clone();
        move || crate::nodeclient::run_vps_client(&url, KEY_A, 50, 10)
    })
    .await
    .unwrap();
    let results = summary["results"].as_array().expect("results");
    assert_eq!(results.len(), 50, "{summary:#}");
    for r in results {
        let i = r["i"].as_u64().unwrap();
        assert_eq!(r["status"], 200, "request {i}: {r}\n{}", op.log_tail());
        // The worker's answer, derived from this request's own input.
        assert_eq!(r["body"]["operation"], "caption", "{r}");
        assert_eq!(r["body"]["result"]["input"]["n"], i, "{r}");
    }
    eprintln!(
        "axios: 50 synchronous requests at 10 at once: p50 {} ms, p99 {} ms",
        summary["p50Ms"], summary["p99Ms"]
    );
    let jobs = gateway_jobs(&client, &ns.name).await;
    assert_eq!(jobs.len(), 50);
    assert!(
        jobs.iter()
            .all(|j| j.labels()["gpupool.dev/client"] == "vps-a")
    );
    assert!(
        jobs.iter()
            .all(|j| j.spec.ttl_seconds_after_finished == Some(86_400))
    );

    let doc: Value = http()
        .get(format!("{}/openapi.json", gw.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();

    // Paged list of the caller's jobs: 50 in pages of 20, each once.
    let mut seen = Vec::new();
    let mut after = String::new();
    for _ in 0..5 {
        let url = format!("{}/jobs?phase=Succeeded&limit=20&after={after}", gw.url);
        let (status, _, page) = call(reqwest::Method::GET, &url, Some(KEY_A), &[], None).await;
        assert_eq!(status, 200, "{page}");
        assert_valid(&doc, "JobList", &page);
        for item in page["items"].as_array().unwrap() {
            seen.push(item["name"].as_str().unwrap().to_string());
        }
        match page["next"].as_str() {
            Some(n) => after = n.to_string(),
            None => break,
        }
    }
    let mut unique = seen.clone();
    unique.sort();
    unique.dedup();
    assert_eq!((seen.len(), unique.len()), (50, 50));
    // Another client sees none of them, and cannot read one.
    let (_, _, other) = call(
        reqwest::Method::GET,
        &format!("{}/jobs", gw.url),
        Some(KEY_B),
        &[],
        None,
    )
    .await;
    assert_eq!(other["items"], json!([]));
    let (status, _, body) = call(
        reqwest::Method::GET,
        &format!("{}/jobs/{}", gw.url, seen[0]),
        Some(KEY_B),
        &[],
        None,
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("JobNotFound"))
    );
    let (status, _, one) = call(
        reqwest::Method::GET,
        &format!("{}/jobs/{}", gw.url, seen[0]),
        Some(KEY_A),
        &[],
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert_valid(&doc, "Job", &one);
    assert_eq!(one["phase"], "Succeeded");

    // Stats in the orchestrator's shape: the machines that ran them, now idle.
    let (status, _, stats) = call(
        reqwest::Method::GET,
        &format!("{}/pool/stats?pool=default", gw.url),
        Some(KEY_A),
        &[],
        None,
    )
    .await;
    assert_eq!(status, 200, "{stats}");
    assert_valid(&doc, "PoolStats", &stats);
    let total = stats["total"].as_i64().unwrap();
    assert!((1..=5).contains(&total), "{stats:#}");
    assert_eq!(
        stats["busy"].as_i64().unwrap()
            + stats["idle"].as_i64().unwrap()
            + stats["starting"].as_i64().unwrap(),
        total
    );
    assert_eq!(
        stats["instances"].as_array().unwrap().len() as i64,
        total,
        "{stats:#}"
    );
    assert!(
        stats["spendPerHour"]
            .as_str()
            .unwrap()
            .parse::<f64>()
            .unwrap()
            > 0.0
    );

    // Metrics: the 50 answers by route and code, and their waits.
    let addr = gw.url.trim_start_matches("http://").to_string();
    let m = metrics_at(&addr).await;
    assert_eq!(
        sample(
            &m,
            "gpupool_gateway_requests_total",
            &[("route", "/video/{operation}"), ("code", "200")]
        ),
        Some(50.0),
        "{m}"
    );
    assert_eq!(
        sample(&m, "gpupool_gateway_wait_seconds_count", &[]),
        Some(50.0)
    );
    assert_eq!(
        sample(&m, "gpupool_gateway_waits_in_flight", &[]),
        Some(0.0)
    );
    // Every route of the router is in the document.
    for path in [
        "/video/{operation}",
        "/jobs",
        "/jobs/{name}",
        "/pool/stats",
        "/healthz",
        "/readyz",
        "/metrics",
        "/openapi.json",
    ] {
        assert!(doc["paths"].get(path).is_some(), "{path}");
    }
    // No key in the gateway's log.
    for secret in [KEY_A, KEY_B, SIGN_A] {
        assert!(!gw.logs().contains(secret), "a key in the gateway log");
    }
    ns.cleanup().await;
}

/// Idempotency across a SIGKILL: 10 synchronous requests with keys wait on gateway A, A is
/// killed, each request is retried with its key on gateway B, and every job ran exactly once.
#[tokio::test]
async fn a_retry_after_a_gateway_sigkill_attaches_to_the_job_already_running() {
    let (ns, sim, op) = setup("gw-idem", 60).await;
    let client = ns.client();
    let mut a = Gateway::start(&ns.name, "a", &[]).await;
    let b = Gateway::start(&ns.name, "b", &[]).await;
    let body = |i: usize| json!({"videoUrl": format!("https://example.com/{i}.mp4"), "simulate": {"seconds": 3}});

    let mut waiting = Vec::new();
    for i in 0..10 {
        let url = format!("{}/video/caption", a.url);
        let key = format!("order-{i}");
        waiting.push(tokio::spawn(async move {
            http()
                .post(url)
                .header("x-api-key", KEY_A)
                .header("idempotency-key", key)
                .json(&body(i))
                .timeout(Duration::from_secs(60))
                .send()
                .await
        }));
    }
    // All 10 created and waiting (some running) before the kill.
    wait_for_gateway_jobs(&client, &ns.name, 10, &op).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    a.kill();
    let mut dropped = 0;
    for w in waiting {
        if w.await.unwrap().is_err() {
            dropped += 1;
        }
    }
    assert_eq!(
        dropped, 10,
        "every waiting request lost its connection with A"
    );

    // The client retries each request with its key, on the other replica.
    let mut retries = Vec::new();
    for i in 0..10 {
        let url = format!("{}/video/caption", b.url);
        let key = format!("order-{i}");
        retries.push(tokio::spawn(async move {
            post(&url, KEY_A, &[("idempotency-key", &key)], body(i)).await
        }));
    }
    for (i, r) in retries.into_iter().enumerate() {
        let (status, headers, out) = r.await.unwrap();
        assert_eq!(status, 200, "retry {i}: {out}\n{}", op.log_tail());
        assert_eq!(headers["idempotent-replayed"], "true", "retry {i}");
        assert_eq!(
            out["result"]["input"]["videoUrl"],
            format!("https://example.com/{i}.mp4")
        );
    }
    let jobs = gateway_jobs(&client, &ns.name).await;
    assert_eq!(jobs.len(), 10, "a retry started a second job");
    let executions = admin(&sim, "executions").await;
    for j in &jobs {
        let uid = j.uid().unwrap();
        let ran: u64 = executions["jobs"]
            .as_object()
            .unwrap()
            .iter()
            .filter(|(id, _)| id.starts_with(&uid))
            .map(|(_, e)| e["count"].as_u64().unwrap_or(0))
            .sum();
        assert_eq!(ran, 1, "job {} ran {ran} times", j.name_any());
    }
    // The same key with another body is refused, and creates nothing.
    let (status, _, err) = post(
        &format!("{}/video/caption", b.url),
        KEY_A,
        &[("idempotency-key", "order-0")],
        json!({"videoUrl": "https://example.com/other.mp4"}),
    )
    .await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (422, Some("IdempotencyKeyReused")),
        "{err}"
    );
    // Another client's identical key is another job.
    let (status, headers, _) = post(
        &format!("{}/video/caption?wait=0", b.url),
        KEY_B,
        &[("idempotency-key", "order-0")],
        body(0),
    )
    .await;
    assert_eq!(status, 202);
    assert!(headers.get("idempotent-replayed").is_none());
    assert_eq!(gateway_jobs(&client, &ns.name).await.len(), 11);
    ns.cleanup().await;
}

/// What a callback receiver saw: per delivery id, the bodies accepted and refused.
#[derive(Default)]
struct Received {
    attempts: HashMap<String, u32>,
    /// The first accepted delivery of each id (a receiver keeps one per delivery id).
    accepted: HashMap<String, Value>,
    /// Deliveries of an id already accepted, per id: acknowledged, not kept.
    duplicates: HashMap<String, u32>,
    bad_signatures: u32,
}

fn verify(secret: &[u8], header: &str, body: &[u8]) -> bool {
    let Some((t, v1)) = header
        .split_once(',')
        .and_then(|(t, v)| Some((t.strip_prefix("t=")?, v.strip_prefix("v1=")?)))
    else {
        return false;
    };
    let age = jiff::Timestamp::now().as_second() - t.parse::<i64>().unwrap_or(0);
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let mut msg = format!("{t}.").into_bytes();
    msg.extend_from_slice(body);
    let Some(tag) = (0..v1.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(v1.get(i..i + 2)?, 16).ok())
        .collect::<Option<Vec<u8>>>()
    else {
        return false;
    };
    age.abs() < 300 && ring::hmac::verify(&key, &msg, &tag).is_ok()
}

/// Callbacks: a receiver that fails each job's first two deliveries; the gateway is
/// restarted in between; every job's callback arrives signed, and one is accepted per job.
#[tokio::test]
async fn callbacks_arrive_signed_once_per_job_across_failures_and_a_restart() {
    let (ns, _sim, op) = setup("gw-cb", 60).await;
    let client = ns.client();
    let received: Arc<Mutex<Received>> = Arc::default();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post({
            let received = received.clone();
            move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                let received = received.clone();
                async move {
                    let mut r = received.lock().unwrap();
                    let sig = headers
                        .get("x-gpupool-signature")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default();
                    if !verify(SIGN_A.as_bytes(), sig, &body) {
                        r.bad_signatures += 1;
                        return axum::http::StatusCode::UNAUTHORIZED;
                    }
                    let id = headers["x-gpupool-delivery-id"]
                        .to_str()
                        .unwrap()
                        .to_string();
                    let n = r.attempts.entry(id.clone()).or_default();
                    *n += 1;
                    if *n <= 2 {
                        return axum::http::StatusCode::SERVICE_UNAVAILABLE;
                    }
                    let first = serde_json::from_slice(&body).unwrap();
                    let r = &mut *r;
                    match r.accepted.entry(id) {
                        std::collections::hash_map::Entry::Occupied(e) => {
                            *r.duplicates.entry(e.key().clone()).or_default() += 1;
                        }
                        std::collections::hash_map::Entry::Vacant(e) => {
                            e.insert(first);
                        }
                    }
                    axum::http::StatusCode::OK
                }
            }
        }),
    );
    let hook = serve_hook(app).await;

    let mut gw = Gateway::start(&ns.name, "a", &[]).await;
    let mut names = Vec::new();
    for i in 0..5 {
        let (status, headers, view) = post(
            &format!("{}/video/caption?callbackUrl={hook}", gw.url),
            KEY_A,
            &[("prefer", "respond-async")],
            json!({"n": i}),
        )
        .await;
        assert_eq!(status, 202, "{view}");
        assert_eq!(view["phase"], "Pending");
        assert_eq!(
            headers["location"],
            format!("/jobs/{}", view["name"].as_str().unwrap())
        );
        names.push(view["name"].as_str().unwrap().to_string());
    }
    // A client without a callback secret cannot ask for one.
    let (status, _, err) = post(
        &format!("{}/video/caption?callbackUrl={hook}", gw.url),
        KEY_B,
        &[],
        json!({}),
    )
    .await;
    assert_eq!(
        (status, err["error"]["field"].as_str()),
        (400, Some("callbackUrl"))
    );

    // Restart the gateway once the first deliveries have been refused.
    eventually(
        Duration::from_secs(60),
        "first callback attempts",
        Some(&op),
        || {
            let received = received.clone();
            async move { (received.lock().unwrap().attempts.len() >= 3).then_some(()) }
        },
    )
    .await;
    gw.restart().await;

    let jobs = Api::<VideoJob>::namespaced(client.clone(), &ns.name);
    eventually(
        Duration::from_secs(90),
        "every callback accepted",
        Some(&op),
        || {
            let received = received.clone();
            async move { (received.lock().unwrap().accepted.len() == 5).then_some(()) }
        },
    )
    .await;
    // Recorded on each job: delivered, finalizer gone.
    for name in &names {
        let job = eventually(
            Duration::from_secs(20),
            "delivery recorded",
            Some(&op),
            || {
                let jobs = jobs.clone();
                async move {
                    let j = jobs.get(name).await.ok()?;
                    let state: Value =
                        serde_json::from_str(j.annotations().get("gpupool.dev/callback")?).ok()?;
                    (state["state"] == "Delivered"
                        && !j
                            .finalizers()
                            .iter()
                            .any(|f| f == "gpupool.dev/gateway-callback"))
                    .then_some(j)
                }
            },
        )
        .await;
        let state: Value =
            serde_json::from_str(&job.annotations()["gpupool.dev/callback"]).unwrap();
        // Three deliveries reached the receiver; one may have been sent by the gateway that
        // was SIGKILLed before it could record it (at least once, never silently dropped).
        let attempts = state["attempts"].as_u64().unwrap();
        assert!((2..=3).contains(&attempts), "{state}");
        let uid = job.uid().unwrap();
        assert!(
            received.lock().unwrap().accepted.contains_key(&uid),
            "{name}: no delivery"
        );
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    {
        let r = received.lock().unwrap();
        assert_eq!(r.bad_signatures, 0);
        assert_eq!(r.accepted.len(), 5);
        for (id, body) in &r.accepted {
            assert_eq!(body["deliveryId"], id.as_str());
            assert_eq!(body["job"]["phase"], "Succeeded");
            assert_eq!(body["job"]["output"]["operation"], "caption");
        }
        // One restart can make a delivery in flight be sent again, at most once per job.
        assert!(r.duplicates.values().all(|n| *n <= 1), "{:?}", r.duplicates);
        eprintln!(
            "callbacks: deliveries per job {:?}, duplicates after acceptance {}",
            r.attempts.values().collect::<Vec<_>>(),
            r.duplicates.values().sum::<u32>()
        );
    }
    ns.cleanup().await;
}

/// Outcomes other than success: a worker failure is 502, a job out of time 504, a pool
/// without capacity 503 (the job withdrawn), a long job 202 after the wait.
#[tokio::test]
async fn failures_timeouts_and_no_capacity_get_their_documented_answers() {
    let (ns, sim, op) = setup("gw-fail", 60).await;
    let client = ns.client();
    let gw = Gateway::start(&ns.name, "a", &["--capacity-wait-seconds=2"]).await;
    let url = |q: &str| format!("{}/video/caption{q}", gw.url);

    let (status, _, err) = post(
        &url(""),
        KEY_A,
        &[],
        json!({"simulate": {"status": 422, "error": "bad subtitles"}}),
    )
    .await;
    assert_eq!(status, 502, "{err}");
    assert_eq!(err["error"]["code"], "JobFailed");
    assert_eq!(err["job"]["phase"], "Failed");

    let (status, _, err) = post(
        &url("?timeout=1&retries=0"),
        KEY_A,
        &[],
        json!({"simulate": {"seconds": 4}}),
    )
    .await;
    assert_eq!(status, 504, "{err}\n{}", op.log_tail());
    assert_eq!(
        (
            err["error"]["code"].as_str(),
            err["error"]["reason"].as_str()
        ),
        (Some("JobTimedOut"), Some("TimedOut"))
    );

    let (status, headers, view) = post(
        &url("?wait=1"),
        KEY_A,
        &[],
        json!({"simulate": {"seconds": 3}}),
    )
    .await;
    assert_eq!(status, 202, "{view}");
    let location = headers["location"].to_str().unwrap().to_string();
    let done = eventually(Duration::from_secs(30), "the long job", Some(&op), || {
        let u = format!("{}{location}", gw.url);
        async move {
            let (_, _, v) = call(reqwest::Method::GET, &u, Some(KEY_A), &[], None).await;
            (v["phase"] == "Succeeded").then_some(v)
        }
    })
    .await;
    assert_eq!(done["output"]["operation"], "caption");

    // A pool whose only GPU has no capacity anywhere.
    admin_put(
        &sim,
        "faults",
        json!({"exhausted": ["RTX 3060", "RTX 4090"]}),
    )
    .await;
    let mut spec = vast_pool(60);
    spec["providers"][0]["vast"]["gpuNames"] = json!(["RTX 4090"]);
    create_pool(&client, &ns.name, "dry", spec).await;
    eventually(
        Duration::from_secs(10),
        "the pool in the gateway cache",
        Some(&op),
        || {
            let u = format!("{}/pool/stats?pool=dry", gw.url);
            async move {
                (call(reqwest::Method::GET, &u, Some(KEY_A), &[], None)
                    .await
                    .0
                    == 200)
                    .then_some(())
            }
        },
    )
    .await;
    let before = gateway_jobs(&client, &ns.name).await.len();
    let (status, headers, err) = post(&url("?pool=dry"), KEY_A, &[], json!({})).await;
    assert_eq!(status, 503, "{err}\n{}", op.log_tail());
    assert_eq!(err["error"]["code"], "NoCapacity");
    assert_eq!(headers["retry-after"], "30");
    let withdrawn = headers["x-gpupool-job"].to_str().unwrap().to_string();
    eventually(
        Duration::from_secs(10),
        "the withdrawn job gone",
        Some(&op),
        || {
            let client = client.clone();
            let ns = ns.name.clone();
            let withdrawn = withdrawn.clone();
            async move {
                let jobs = gateway_jobs(&client, &ns).await;
                (!jobs.iter().any(|j| j.name_any() == withdrawn)).then_some(())
            }
        },
    )
    .await;
    assert_eq!(gateway_jobs(&client, &ns.name).await.len(), before);

    // Cancel: DELETE of a running job.
    admin_put(&sim, "faults", json!({})).await;
    let (status, _, view) = post(
        &url("?wait=0"),
        KEY_A,
        &[],
        json!({"simulate": {"seconds": 30}}),
    )
    .await;
    assert_eq!(status, 202);
    let name = view["name"].as_str().unwrap().to_string();
    let (status, _, cancelled) = call(
        reqwest::Method::DELETE,
        &format!("{}/jobs/{name}", gw.url),
        Some(KEY_A),
        &[],
        None,
    )
    .await;
    assert_eq!(
        (status, cancelled["phase"].as_str()),
        (202, Some("Cancelled")),
        "{cancelled}"
    );
    eventually(
        Duration::from_secs(30),
        "the cancelled job gone",
        Some(&op),
        || {
            let jobs = Api::<VideoJob>::namespaced(client.clone(), &ns.name);
            let name = name.clone();
            async move { jobs.get_opt(&name).await.ok()?.is_none().then_some(()) }
        },
    )
    .await;
    ns.cleanup().await;
}

/// Every refusal: the documented status and JSON error, and no VideoJob created.
#[tokio::test]
async fn bad_requests_are_refused_with_a_json_error_and_create_nothing() {
    let (ns, _sim, _op) = setup("gw-bad", 60).await;
    let client = ns.client();
    let gw = Gateway::start(
        &ns.name,
        "a",
        &[
            "--max-body-bytes=1000",
            "--rate-per-client=2",
            "--max-in-flight-per-client=1",
        ],
    )
    .await;
    let doc: Value = serde_json::from_str(gpupool::gateway::routes::OPENAPI).unwrap();
    let v = |p: &str| format!("{}{p}", gw.url);
    let big = json!({"pad": "x".repeat(2000)});
    type Case<'a> = (
        &'a str,
        String,
        Option<&'a str>,
        Vec<(&'a str, &'a str)>,
        Vec<u8>,
        u16,
        &'a str,
        Option<&'a str>,
    );
    let j = |v: Value| serde_json::to_vec(&v).unwrap();
    let cases: Vec<Case> = vec![
        (
            "no key",
            v("/video/caption"),
            None,
            vec![],
            j(json!({})),
            401,
            "Unauthorized",
            None,
        ),
        (
            "wrong key",
            v("/video/caption"),
            Some("nope"),
            vec![],
            j(json!({})),
            401,
            "Unauthorized",
            None,
        ),
        (
            "bearer, wrong",
            v("/video/caption"),
            None,
            vec![("authorization", "Bearer nope")],
            j(json!({})),
            401,
            "Unauthorized",
            None,
        ),
        (
            "array body",
            v("/video/caption"),
            Some(KEY_B),
            vec![],
            j(json!([1, 2])),
            400,
            "InvalidRequest",
            Some("body"),
        ),
        (
            "not JSON",
            v("/video/caption"),
            Some(KEY_B),
            vec![],
            b"{oops".to_vec(),
            400,
            "InvalidRequest",
            Some("body"),
        ),
        (
            "too large",
            v("/video/caption"),
            Some(KEY_B),
            vec![],
            j(big),
            413,
            "BodyTooLarge",
            Some("body"),
        ),
        (
            "unknown pool",
            v("/video/caption?pool=nope"),
            Some(KEY_B),
            vec![],
            j(json!({})),
            404,
            "PoolNotFound",
            Some("pool"),
        ),
        (
            "unknown pool header",
            v("/video/caption"),
            Some(KEY_B),
            vec![("x-gpupool-pool", "nope")],
            j(json!({})),
            404,
            "PoolNotFound",
            Some("pool"),
        ),
        (
            "bad operation",
            v("/video/Caption_1"),
            Some(KEY_B),
            vec![],
            j(json!({})),
            400,
            "InvalidRequest",
            Some("operation"),
        ),
        (
            "timeout 0",
            v("/video/caption?timeout=0"),
            Some(KEY_B),
            vec![],
            j(json!({})),
            400,
            "InvalidRequest",
            Some("timeout"),
        ),
        (
            "timeout text",
            v("/video/caption?timeout=soon"),
            Some(KEY_B),
            vec![],
            j(json!({})),
            400,
            "InvalidRequest",
            Some("timeout"),
        ),
        (
            "retries 11",
            v("/video/caption?retries=11"),
            Some(KEY_B),
            vec![],
            j(json!({})),
            400,
            "InvalidRequest",
            Some("retries"),
        ),
        (
            "private callback",
            v("/video/caption?callbackUrl=ftp://x/y"),
            Some(KEY_A),
            vec![],
            j(json!({})),
            400,
            "InvalidRequest",
            Some("callbackUrl"),
        ),
    ];
    for (what, url, key, headers, body, status, code, field) in cases {
        // Stay under the 2/s rate limit (burst 4) so each case meets its own check.
        tokio::time::sleep(Duration::from_millis(600)).await;
        let (got, resp_headers, err) =
            call(reqwest::Method::POST, &url, key, &headers, Some(body)).await;
        assert_eq!(got, status, "{what}: {err}");
        assert_valid(&doc, "Error", &err);
        assert_eq!(err["error"]["code"], code, "{what}: {err}");
        assert_eq!(err["error"]["field"].as_str(), field, "{what}: {err}");
        if status == 401 {
            assert!(resp_headers.contains_key("www-authenticate"), "{what}");
        }
    }
    assert!(
        gateway_jobs(&client, &ns.name).await.is_empty(),
        "a refused request created a job"
    );

    // The idempotency key reused with another body (after one good request).
    tokio::time::sleep(Duration::from_millis(600)).await;
    let (s, _, _) = post(
        &v("/video/caption?wait=0"),
        KEY_B,
        &[("idempotency-key", "k")],
        json!({"a": 1}),
    )
    .await;
    assert_eq!(s, 202);
    tokio::time::sleep(Duration::from_millis(600)).await;
    let (s, _, err) = post(
        &v("/video/caption?wait=0"),
        KEY_B,
        &[("idempotency-key", "k")],
        json!({"a": 2}),
    )
    .await;
    assert_eq!(
        (s, err["error"]["code"].as_str()),
        (422, Some("IdempotencyKeyReused"))
    );
    // The in-flight limit (1): a second job while the first is unfinished.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let (s, _, err) = post(
        &v("/video/caption?wait=0"),
        KEY_B,
        &[],
        json!({"simulate": {"seconds": 5}}),
    )
    .await;
    // The first may have finished already (it takes 50 ms): then this one is the one in flight.
    if s == 202 {
        tokio::time::sleep(Duration::from_millis(600)).await;
        let (s2, _, err2) = post(&v("/video/caption?wait=0"), KEY_B, &[], json!({})).await;
        assert_eq!(
            (s2, err2["error"]["code"].as_str()),
            (429, Some("TooManyJobs")),
            "{err2}"
        );
    } else {
        assert_eq!(
            (s, err["error"]["code"].as_str()),
            (429, Some("TooManyJobs")),
            "{err}"
        );
    }
    // The rate limit: a burst past 2/s (burst 4) is refused with Retry-After.
    let mut limited = None;
    for _ in 0..8 {
        let (s, h, err) = call(reqwest::Method::GET, &v("/jobs"), Some(KEY_A), &[], None).await;
        if s == 429 {
            limited = Some((h, err));
            break;
        }
    }
    let (h, err) = limited.expect("the burst was rate limited");
    assert_eq!(err["error"]["code"], "RateLimited");
    assert!(h["retry-after"].to_str().unwrap().parse::<u64>().unwrap() >= 1);
    // Unknown routes are JSON too.
    let (s, _, err) = call(reqwest::Method::GET, &v("/nope"), None, &[], None).await;
    assert_eq!((s, err["error"]["code"].as_str()), (404, Some("NotFound")));
    let at_most = gateway_jobs(&client, &ns.name).await.len();
    assert!(at_most <= 2, "{at_most} jobs");
    ns.cleanup().await;
}

/// Without keys the gateway does not start (unless told --insecure-no-auth), and says why
/// without printing any key.
#[tokio::test]
async fn the_gateway_refuses_to_start_without_keys() {
    let ns = namespace_with_secrets("gw-nokeys").await;
    let mut g = Gateway::spawn(
        &ns.name,
        "a",
        vec![
            "gateway".into(),
            format!("--namespace={}", ns.name),
            "--http-addr=127.0.0.1:0".into(),
        ],
        vec![],
        0,
    );
    let log = g
        .wait_exit(Duration::from_secs(20))
        .expect("the gateway exits");
    assert!(
        log.contains("gpupool-gateway-keys") && log.contains("does not exist"),
        "{log}"
    );
    let open = Gateway::start(&ns.name, "open", &["--insecure-no-auth"]).await;
    let (s, _, err) = call(
        reqwest::Method::POST,
        &format!("{}/video/caption", open.url),
        None,
        &[],
        Some(b"{}".to_vec()),
    )
    .await;
    // Anonymous is allowed in, and meets the next check: no pool named default here.
    assert_eq!(
        (s, err["error"]["code"].as_str()),
        (404, Some("PoolNotFound"))
    );
    ns.cleanup().await;
}

/// The chart's RBAC for the gateway is enough for everything it does: the gateway binary,
/// with nothing but a token of the chart's gateway ServiceAccount, reads its keys, serves a
/// synchronous request, delivers its callback (patch, finalizer), cancels a job and answers
/// the stats.
#[tokio::test]
async fn the_gateway_runs_every_route_with_only_the_chart_rbac() {
    let ns = namespace_with_secrets("gw-rbac").await;
    let release_ns = crate::support::TestNamespace::new("gw-rbac-rel").await;
    let client = ns.client();
    create_keys(&client, &ns.name).await;
    let kubeconfig = crate::chart::gateway_kubeconfig(&release_ns.name, &ns.name, &[]);
    let sim = sim().await;
    let op = Operator::start(&ns.name, &sim, &[]);
    create_pool(&client, &ns.name, "default", vast_pool(60)).await;

    let delivered: Arc<Mutex<Vec<String>>> = Arc::default();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post({
            let delivered = delivered.clone();
            move |headers: axum::http::HeaderMap| {
                let delivered = delivered.clone();
                async move {
                    let id = headers["x-gpupool-delivery-id"]
                        .to_str()
                        .unwrap()
                        .to_string();
                    delivered.lock().unwrap().push(id);
                    axum::http::StatusCode::NO_CONTENT
                }
            }
        }),
    );
    let hook = serve_hook(app).await;

    let gw = Gateway::start_with_env(
        &ns.name,
        "sa",
        &[],
        &[("KUBECONFIG", kubeconfig.to_str().unwrap())],
    )
    .await;
    let (status, headers, out) = post(
        &format!("{}/video/caption?callbackUrl={hook}", gw.url),
        KEY_A,
        &[("idempotency-key", "rbac-1")],
        json!({"n": 1}),
    )
    .await;
    assert_eq!(status, 200, "{out}\n{}\n{}", gw.logs(), op.log_tail());
    assert_eq!(out["result"]["input"]["n"], 1);
    let name = headers["x-gpupool-job"].to_str().unwrap().to_string();
    let jobs = Api::<VideoJob>::namespaced(client.clone(), &ns.name);
    eventually(
        Duration::from_secs(30),
        "the callback delivered and recorded",
        Some(&op),
        || {
            let (jobs, name, delivered) = (jobs.clone(), name.clone(), delivered.clone());
            async move {
                let j = jobs.get(&name).await.ok()?;
                let ok = !delivered.lock().unwrap().is_empty()
                    && !j
                        .finalizers()
                        .iter()
                        .any(|f| f == "gpupool.dev/gateway-callback");
                ok.then_some(())
            }
        },
    )
    .await;
    let (status, _, view) = post(
        &format!("{}/video/caption?wait=0", gw.url),
        KEY_A,
        &[],
        json!({"simulate": {"seconds": 30}}),
    )
    .await;
    assert_eq!(status, 202, "{view}");
    let (status, _, _) = call(
        reqwest::Method::DELETE,
        &format!("{}/jobs/{}", gw.url, view["name"].as_str().unwrap()),
        Some(KEY_A),
        &[],
        None,
    )
    .await;
    assert_eq!(status, 202);
    let (status, _, stats) = call(
        reqwest::Method::GET,
        &format!("{}/pool/stats", gw.url),
        Some(KEY_A),
        &[],
        None,
    )
    .await;
    assert_eq!(status, 200, "{stats}");
    assert!(
        !gw.logs().to_lowercase().contains("forbidden"),
        "{}",
        gw.logs()
    );
    release_ns.cleanup().await;
    ns.cleanup().await;
}

/// A rolling update: SIGTERM while synchronous requests wait. Each is answered 202 with its
/// job's Location (none is cut off), the process exits, and the jobs finish anyway.
#[tokio::test]
async fn sigterm_answers_waiting_requests_202_then_exits() {
    let (ns, _sim, op) = setup("gw-term", 60).await;
    let client = ns.client();
    let mut gw = Gateway::start(&ns.name, "a", &[]).await;
    let mut waiting = Vec::new();
    for i in 0..3 {
        let url = format!("{}/video/caption", gw.url);
        waiting.push(tokio::spawn(async move {
            post(
                &url,
                KEY_A,
                &[],
                json!({"n": i, "simulate": {"seconds": 4}}),
            )
            .await
        }));
    }
    wait_for_gateway_jobs(&client, &ns.name, 3, &op).await;
    let t = Instant::now();
    gw.terminate();
    let mut locations = Vec::new();
    for w in waiting {
        let (status, headers, view) = w.await.unwrap();
        assert_eq!(status, 202, "{view}\n{}", gw.logs());
        locations.push(headers["location"].to_str().unwrap().to_string());
    }
    let log = gw
        .wait_exit(Duration::from_secs(15))
        .expect("the gateway exits after SIGTERM");
    assert!(log.contains("SIGTERM"), "{log}");
    eprintln!(
        "SIGTERM: 3 waiting requests answered 202 and the gateway gone in {:?}",
        t.elapsed()
    );
    let jobs = Api::<VideoJob>::namespaced(client.clone(), &ns.name);
    for loc in locations {
        let name = loc.trim_start_matches("/jobs/").to_string();
        let job =
            crate::operator::finished_job(&client, &ns.name, &name, Duration::from_secs(30), &op)
                .await;
        assert_eq!(
            crate::operator::phase(&job),
            gpupool::crd::JobPhase::Succeeded
        );
        assert!(jobs.get_opt(&name).await.unwrap().is_some());
    }
    ns.cleanup().await;
}
