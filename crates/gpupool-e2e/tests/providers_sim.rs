//! Each adapter against the provider simulator over real HTTP: the proof that our clients
//! (`VastClient`, RunPod pods over REST v2 (`RunpodV2Client`) and over GraphQL
//! (`RunpodClient`), each with public TCP and with the proxy, `RunpodServerlessClient`,
//! `WorkerClient`) and our simulator agree. Every RunPod pod test, and the Serverless
//! settings test, runs once per API (`*_over_rest_v2`, `*_over_graphql`).
//!
//! Every test starts its own in-process simulator (`SimConfig::fast()` timings) on a free
//! loopback port, drives it only through the clients under test, and checks the outcome in
//! the simulator's admin API (`/admin/state`, `bill`, `calls`, `executions`). Waiting is
//! polling with a generous deadline, never a fixed sleep.

use std::{future::Future, time::Duration};

use gpupool::{
    crd::{
        CloudType, RunpodApi, RunpodProvider, RunpodServerlessProvider, SecretKeyRef, VastProvider,
        pool::RunpodWorkerAccess,
    },
    provider::{
        CreateRequest, Credentials, ENV_API_KEY, ENV_SESSION_TOKEN, ENV_WORKER_PORT,
        EndpointSettings, InstanceProvider, Offer, ProviderError, RemoteInstance, RemoteState,
        ServerlessJob, ServerlessProvider, ServerlessStatus,
        http::{HttpConfig, RetryPolicy, WorkerShape},
        runpod::{RunpodClient, RunpodOptions},
        runpod_serverless::{RunpodServerlessClient, RunpodServerlessOptions},
        runpod_v2::{RunpodV2Client, RunpodV2Options},
        vast::{VastClient, VastOptions},
    },
    worker::{Dispatch, WorkerClient, WorkerClientConfig, WorkerError},
};
use gpupool_sim::{self as sim, EndpointSpec, GpuTypeSpec, SimConfig, SimHandle, VastOfferSpec};
use rust_decimal::Decimal;
use serde_json::{Value, json};
use tokio::time::Instant;

/// The keys `SimConfig::fast()` accepts.
const VAST_KEY: &str = "vast-test-key";
const RUNPOD_KEY: &str = "runpod-test-key";
/// What the operator would put in the create env, and then send to the worker.
const WORKER_API_KEY: &str = "wk-sim-api-key-0001";
const SESSION_TOKEN: &str = "sess-sim-token-0001";

const GPU_4090: &str = "NVIDIA GeForce RTX 4090";
const GPU_3090: &str = "NVIDIA GeForce RTX 3090";
const GPU_3060: &str = "NVIDIA GeForce RTX 3060";

const ENDPOINT_ID: &str = "gpupoolep1";

const WORKER: WorkerShape = WorkerShape {
    port: 8000,
    disk_gb: 16,
};

// ---------------------------------------------------------------- simulator and helpers

struct Sim {
    h: SimHandle,
    c: reqwest::Client,
}

impl Sim {
    async fn start(config: SimConfig) -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let h = sim::start(config).await.expect("simulator starts");
        let c = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(20))
            .build()
            .expect("reqwest client");
        Self { h, c }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.h.base_url)
    }

    async fn admin(&self, path: &str) -> Value {
        let res = self.c.get(self.url(path)).send().await.expect("admin get");
        assert_eq!(res.status(), reqwest::StatusCode::OK, "GET {path}");
        res.json().await.expect("admin json")
    }

    async fn admin_put(&self, path: &str, body: Value) {
        let res = self
            .c
            .put(self.url(path))
            .json(&body)
            .send()
            .await
            .expect("admin put");
        let status = res.status();
        let text = res.text().await.unwrap_or_default();
        assert_eq!(status, reqwest::StatusCode::OK, "PUT {path}: {text}");
    }

    async fn faults(&self, faults: Value) {
        self.admin_put("/admin/faults", faults).await;
    }

    /// How many calls of `op` the simulator answered with `status` (0: never answered).
    async fn calls(&self, op: &str, status: u16) -> u64 {
        self.admin("/admin/calls").await["counts"][op][status.to_string()]
            .as_u64()
            .unwrap_or(0)
    }

    /// All calls of `op`, whatever their status.
    async fn calls_total(&self, op: &str) -> u64 {
        self.admin("/admin/calls").await["counts"][op]
            .as_object()
            .map(|m| m.values().filter_map(Value::as_u64).sum())
            .unwrap_or(0)
    }

    async fn state_instance(&self, id: &str) -> Value {
        let state = self.admin("/admin/state").await;
        state["instances"]
            .as_array()
            .expect("instances")
            .iter()
            .find(|i| i["id"] == id)
            .cloned()
            .unwrap_or_else(|| panic!("instance {id} not in the admin state: {state}"))
    }

    async fn instance_count(&self) -> usize {
        self.admin("/admin/state").await["instances"]
            .as_array()
            .map_or(0, Vec::len)
    }

    async fn job_status(&self, job_id: &str) -> Value {
        let state = self.admin("/admin/state").await;
        state["jobs"]
            .as_array()
            .expect("jobs")
            .iter()
            .find(|j| j["id"] == job_id)
            .map(|j| j["status"].clone())
            .unwrap_or_else(|| panic!("job {job_id} not in the admin state"))
    }

    /// A GraphQL read with the right key, outside the client under test.
    async fn gql(&self, query: &str) -> Value {
        let res = self
            .c
            .post(self.url("/graphql"))
            .bearer_auth(RUNPOD_KEY)
            .json(&json!({"query": query}))
            .send()
            .await
            .expect("graphql");
        assert_eq!(res.status(), reqwest::StatusCode::OK);
        res.json().await.expect("graphql json")
    }

    /// The bill shows the machine billed at `price` and no longer alive.
    async fn assert_billed_and_gone(&self, provider: &str, id: &str, price: f64) {
        let bill = self.admin("/admin/bill").await;
        let row = bill["instances"]
            .as_array()
            .expect("bill instances")
            .iter()
            .find(|r| r["id"] == id && r["provider"] == provider)
            .cloned()
            .unwrap_or_else(|| panic!("{provider} {id} not billed: {bill}"));
        assert_eq!(row["alive"], false, "{row}");
        let billed_price = row["price_per_hour"].as_f64().expect("price");
        assert!((billed_price - price).abs() < 1e-9, "{row}");
        assert!(
            row["billed_seconds"].as_f64().expect("seconds") > 0.0,
            "{row}"
        );
        assert!(row["cost"].as_f64().expect("cost") > 0.0, "{row}");
        assert!(
            bill["by_provider"][provider].as_f64().expect("total") > 0.0,
            "{bill}"
        );
    }
}

/// Polls `f` until it yields a value (20 s at most: generous for a loaded 2-core machine).
async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
}

fn dec(s: &str) -> Decimal {
    s.parse().expect("decimal")
}

#[allow(clippy::too_many_arguments)]
fn vast_offer(
    id: u64,
    gpu: &str,
    num_gpus: u32,
    dph_total: f64,
    reliability: f64,
    geolocation: &str,
    verification: &str,
    capacity: u32,
) -> VastOfferSpec {
    VastOfferSpec {
        id,
        gpu_name: gpu.into(),
        num_gpus,
        dph_total,
        reliability2: reliability,
        geolocation: geolocation.into(),
        direct_port_count: 20,
        verification: verification.into(),
        capacity,
        extra: Default::default(),
    }
}

fn endpoint_spec(workers_max: u32) -> EndpointSpec {
    EndpointSpec {
        id: ENDPOINT_ID.into(),
        name: "gpupool-video-sim".into(),
        workers_min: 0,
        workers_max,
        idle_timeout: 30,
        gpu_ids: "AMPERE_24,ADA_24".into(),
        gpu_count: 2,
        template_id: "tpl-video-7".into(),
        scaler_type: "REQUEST_COUNT".into(),
        scaler_value: 3,
        execution_timeout_ms: 120_000,
        cold_start_seconds: 0.05,
        price_per_hour: 0.9,
        operations: Default::default(),
    }
}

/// `SimConfig::fast()` with a Vast catalogue that exercises every limit of the entry used
/// below (RTX 4090, one GPU, at most 0.45 USD/h, reliability 0.95, verified) and a fast
/// serverless endpoint.
fn config() -> SimConfig {
    SimConfig {
        vast_offers: vec![
            vast_offer(
                1001,
                "RTX 4090",
                1,
                0.40,
                0.995,
                "Oregon, US",
                "verified",
                3,
            ),
            vast_offer(1002, "RTX 4090", 1, 0.35, 0.98, "Quebec, CA", "verified", 2),
            vast_offer(1003, "RTX 3060", 1, 0.09, 0.99, "Texas, US", "verified", 3),
            vast_offer(1005, "RTX 4090", 2, 0.78, 0.999, "Utah, US", "verified", 1),
            vast_offer(1006, "RTX 4090", 1, 0.50, 0.99, "Ohio, US", "verified", 1),
            vast_offer(1007, "RTX 4090", 1, 0.20, 0.90, "Nevada, US", "verified", 1),
            vast_offer(
                1008,
                "RTX 4090",
                1,
                0.25,
                0.99,
                "Idaho, US",
                "unverified",
                1,
            ),
            vast_offer(
                1009,
                "RTX 4090",
                1,
                0.30,
                0.99,
                "Bavaria, DE",
                "verified",
                40,
            ),
        ],
        endpoints: vec![endpoint_spec(2)],
        ..SimConfig::fast()
    }
}

/// Transport settings that keep every test fast and deterministic: 3 attempts, 20 ms then
/// 40 ms back-off without jitter, 5 s per request, no client-side quota.
fn http() -> HttpConfig {
    HttpConfig {
        connect_timeout: Duration::from_secs(2),
        request_timeout: Duration::from_secs(5),
        retry: RetryPolicy {
            max_attempts: 3,
            min_delay: Duration::from_millis(20),
            max_delay: Duration::from_millis(100),
            max_total: Duration::from_secs(5),
            jitter: false,
        },
        rate_limit: None,
        ..HttpConfig::default()
    }
}

/// For hangs: each attempt is cut after 300 ms, two attempts in all.
fn short_timeout_http() -> HttpConfig {
    HttpConfig {
        request_timeout: Duration::from_millis(300),
        retry: RetryPolicy {
            max_attempts: 2,
            ..http().retry
        },
        ..http()
    }
}

/// RTX 4090, one GPU, at most 0.45 USD/h, reliability 0.95, any country.
fn vast_entry() -> VastProvider {
    VastProvider {
        gpu_names: vec!["RTX 4090".into()],
        max_price_per_hour: "0.45".into(),
        min_reliability: 0.95,
        num_gpus: 1,
        countries: vec![],
        bid_per_hour: None,
        credentials_secret_ref: SecretKeyRef::new("vast", "key"),
    }
}

fn vast_client(sim: &Sim, key: &str, http: HttpConfig) -> VastClient {
    vast_with(sim, &vast_entry(), key, http)
}

fn vast_with(sim: &Sim, entry: &VastProvider, key: &str, http: HttpConfig) -> VastClient {
    VastClient::new(
        entry,
        WORKER,
        Credentials::new(key),
        VastOptions {
            base_url: sim.h.base_url.clone(),
            http,
        },
    )
    .expect("vast client")
}

fn proxy_template(sim: &Sim) -> String {
    format!("{}/proxy/{{podId}}-{{port}}", sim.h.base_url)
}

fn runpod_entry(
    access: RunpodWorkerAccess,
    cloud: CloudType,
    gpu_type_ids: &[&str],
    max_price: &str,
) -> RunpodProvider {
    RunpodProvider {
        gpu_type_ids: gpu_type_ids.iter().map(|g| g.to_string()).collect(),
        cloud_type: cloud,
        max_price_per_hour: max_price.into(),
        gpu_count: 1,
        worker_access: access,
        data_center_ids: vec![],
        api: RunpodApi::GraphQL,
        credentials_secret_ref: SecretKeyRef::new("runpod", "key"),
    }
}

fn runpod_with(sim: &Sim, entry: &RunpodProvider, key: &str, http: HttpConfig) -> RunpodClient {
    RunpodClient::new(
        entry,
        WORKER,
        Credentials::new(key),
        RunpodOptions {
            graphql_base_url: sim.h.base_url.clone(),
            proxy_url_template: proxy_template(sim),
            http,
        },
    )
    .expect("runpod client")
}

/// The community-cloud entry most RunPod tests use: 4090 (0.34) is over the 0.30 cap, the
/// imaginary type is not listed at all, 3060 (0.10) and 3090 (0.22) remain.
fn runpod_client(sim: &Sim, key: &str, http: HttpConfig) -> RunpodClient {
    let entry = runpod_entry(
        RunpodWorkerAccess::PublicTcp,
        CloudType::Community,
        &[GPU_4090, GPU_3090, "NVIDIA Imaginary RTX 9999", GPU_3060],
        "0.30",
    );
    runpod_with(sim, &entry, key, http)
}

fn serverless_client(
    sim: &Sim,
    key: &str,
    endpoint_id: &str,
    http: HttpConfig,
) -> RunpodServerlessClient {
    serverless_client_over(sim, RunpodApi::GraphQL, key, endpoint_id, http)
}

/// A Serverless client whose endpoint settings go through `api`.
fn serverless_client_over(
    sim: &Sim,
    api: RunpodApi,
    key: &str,
    endpoint_id: &str,
    http: HttpConfig,
) -> RunpodServerlessClient {
    RunpodServerlessClient::new(
        &RunpodServerlessProvider {
            endpoint_id: endpoint_id.into(),
            manage_endpoint_settings: true,
            api,
            credentials_secret_ref: SecretKeyRef::new("runpod", "key"),
        },
        Credentials::new(key),
        RunpodServerlessOptions {
            base_url: sim.h.serverless_url(),
            rest_base_url: format!("{}/v2", sim.h.base_url),
            graphql_base_url: sim.h.base_url.clone(),
            http,
        },
    )
    .expect("serverless client")
}

fn worker_client(api_key: Option<&str>) -> WorkerClient {
    WorkerClient::new(
        api_key.map(Credentials::new),
        WorkerClientConfig {
            connect_timeout: Duration::from_secs(2),
            health_timeout: Duration::from_secs(5),
            ..WorkerClientConfig::default()
        },
    )
    .expect("worker client")
}

fn create_request(label: &str) -> CreateRequest {
    CreateRequest {
        label: label.into(),
        image: "ghcr.io/gpupool/video-worker:test".into(),
        env: [
            (ENV_SESSION_TOKEN, SESSION_TOKEN),
            (ENV_API_KEY, WORKER_API_KEY),
            (ENV_WORKER_PORT, "8000"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect(),
        secret_env: Default::default(),
        port: 8000,
        disk_gb: 16,
    }
}

fn dispatch<'a>(
    endpoint: &'a str,
    input: &'a Value,
    job_uid: &'a str,
    attempt: u32,
    token: &'a Credentials,
    timeout: Duration,
) -> Dispatch<'a> {
    Dispatch {
        endpoint,
        operation: "transcode",
        input,
        job_uid,
        attempt,
        session_token: token,
        timeout,
    }
}

const JOB_TIMEOUT: Duration = Duration::from_secs(15);

/// `get` until the provider reports the machine running with a worker endpoint.
async fn wait_running(p: &dyn InstanceProvider, id: &str) -> RemoteInstance {
    eventually("the machine running with an endpoint", || async {
        match p.get(id).await {
            Ok(i) if i.state == RemoteState::Running && i.endpoint.is_some() => Some(i),
            Ok(i) => {
                assert!(
                    matches!(i.state, RemoteState::Starting | RemoteState::Running),
                    "{i:?}"
                );
                None
            }
            Err(e) => panic!("get {id}: {e}"),
        }
    })
    .await
}

/// The worker at `endpoint` answers health and a job with the credentials from the create
/// env, and refuses wrong ones without running anything.
async fn exercise_worker(sim: &Sim, endpoint: &str, instance_id: &str, job_uid: &str) {
    let token = Credentials::new(SESSION_TOKEN);
    let worker = worker_client(Some(WORKER_API_KEY));
    worker
        .health(endpoint, "/health", &token)
        .await
        .expect("health");

    let input = json!({"url": "s3://videos/in.mp4", "height": 720});
    let out = worker
        .dispatch(&dispatch(endpoint, &input, job_uid, 0, &token, JOB_TIMEOUT))
        .await
        .expect("dispatch");
    assert_eq!(out["operation"], "transcode", "{out}");
    assert_eq!(out["jobId"], format!("{job_uid}-0"), "{out}");
    assert_eq!(out["instanceId"], instance_id, "{out}");
    assert_eq!(out["result"]["input"], input, "{out}");

    let refused = [
        (worker_client(Some("not-the-api-key")), token.clone()),
        (worker_client(None), token.clone()),
        (
            worker_client(Some(WORKER_API_KEY)),
            Credentials::new("not-the-session-token"),
        ),
    ];
    for (attempt, (client, token)) in (1..).zip(refused.iter()) {
        let e = client
            .dispatch(&dispatch(
                endpoint,
                &input,
                job_uid,
                attempt,
                token,
                JOB_TIMEOUT,
            ))
            .await
            .expect_err("wrong credentials are refused");
        assert_eq!(e, WorkerError::Unauthorized { status: 401 });
    }

    let executions = sim.admin("/admin/executions").await;
    let first = &executions["jobs"][format!("{job_uid}-0")];
    assert_eq!(
        (&first["count"], &first["instances"]),
        (&json!(1), &json!([instance_id])),
        "{executions}"
    );
    assert!(first["first_at"].is_string(), "{executions}");
    for attempt in 1..=3 {
        assert!(
            executions["jobs"]
                .get(format!("{job_uid}-{attempt}"))
                .is_none(),
            "a refused attempt ran: {executions}"
        );
    }
}

/// Delete, then the machine is gone for `get`, and deleting again is still success.
async fn delete_and_check_gone(p: &dyn InstanceProvider, id: &str) {
    p.delete(id).await.expect("delete");
    match p.get(id).await {
        Err(ProviderError::NotFound(_)) => {}
        other => panic!("get after delete: {other:?}"),
    }
    p.delete(id).await.expect("delete again is Ok");
}

/// The error class of a result (`"Ok"` for success), for compact assertions.
fn class<T>(r: &Result<T, ProviderError>) -> &'static str {
    match r {
        Ok(_) => "Ok",
        Err(e) => e.label(),
    }
}

// ---------------------------------------------------------------- Vast.ai

#[tokio::test]
async fn vast_happy_path_offers_create_run_dispatch_find_delete_and_bill() {
    let sim = Sim::start(config()).await;
    let vast = vast_client(&sim, VAST_KEY, http());

    // Only the offers within the entry's limits, cheapest first: 1003 (other GPU), 1005 (two
    // GPUs), 1006 (over the cap), 1007 (unreliable) and 1008 (unverified) are out.
    let offers = vast.offers().await.expect("offers");
    let ids: Vec<&str> = offers.iter().map(|o| o.id.as_str()).collect();
    assert_eq!(ids, ["1009", "1002", "1001"], "{offers:?}");
    let prices: Vec<Decimal> = offers.iter().map(|o| o.price_per_hour).collect();
    assert_eq!(prices, [dec("0.30"), dec("0.35"), dec("0.40")]);
    for o in &offers {
        assert_eq!((o.gpu_name.as_str(), o.num_gpus), ("RTX 4090", 1), "{o:?}");
        assert!(o.reliability.is_some_and(|r| r >= 0.95), "{o:?}");
    }
    assert_eq!(offers[0].region.as_deref(), Some("Bavaria, DE"));

    let label = "gpupool-c0ffee-vast-uid-1";
    let created = vast
        .create(&offers[0], &create_request(label))
        .await
        .expect("create");
    assert_eq!(created.state, RemoteState::Starting);
    assert_eq!(created.label.as_deref(), Some(label));
    let id = created.id.clone();

    let running = wait_running(&vast, &id).await;
    let worker_port = sim.state_instance(&id).await["worker_port"]
        .as_u64()
        .expect("worker port");
    assert_eq!(
        running.endpoint.as_deref(),
        Some(format!("http://127.0.0.1:{worker_port}").as_str()),
        "the endpoint is the worker's real port"
    );
    assert_eq!(running.label.as_deref(), Some(label));
    assert_eq!(running.gpu_name.as_deref(), Some("RTX 4090"));
    assert_eq!(running.num_gpus, Some(1));
    assert_eq!(running.price_per_hour, Some(dec("0.30")));
    assert_eq!(running.region.as_deref(), Some("Bavaria, DE"));
    assert!(running.started_at.is_some());

    exercise_worker(
        &sim,
        running.endpoint.as_deref().expect("endpoint"),
        &id,
        "vjob-1",
    )
    .await;

    let found = vast
        .find_by_label(label)
        .await
        .expect("find")
        .expect("found");
    assert_eq!(
        (found.id.as_str(), found.state),
        (id.as_str(), RemoteState::Running)
    );
    assert_eq!(found.endpoint, running.endpoint);
    assert_eq!(
        vast.find_by_label("gpupool-c0ffee-vast-uid-2")
            .await
            .expect("find"),
        None
    );
    let listed = vast.list_labeled("gpupool-c0ffee-").await.expect("list");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id, id);
    assert!(
        vast.list_labeled("gpupool-other-")
            .await
            .expect("list")
            .is_empty()
    );

    delete_and_check_gone(&vast, &id).await;
    assert_eq!(vast.find_by_label(label).await.expect("find"), None);
    sim.assert_billed_and_gone("vast", &id, 0.30).await;
}

#[tokio::test]
async fn vast_offers_keep_to_the_entry_countries() {
    let sim = Sim::start(config()).await;
    let entry = VastProvider {
        countries: vec!["CA".into(), "DE".into()],
        ..vast_entry()
    };
    let vast = vast_with(&sim, &entry, VAST_KEY, http());
    let offers = vast.offers().await.expect("offers");
    let got: Vec<(&str, Option<&str>)> = offers
        .iter()
        .map(|o| (o.id.as_str(), o.region.as_deref()))
        .collect();
    assert_eq!(
        got,
        [("1009", Some("Bavaria, DE")), ("1002", Some("Quebec, CA"))]
    );
    // The same catalogue with a GPU name spelled as the CLI writes it.
    let entry = VastProvider {
        gpu_names: vec!["rtx_4090".into()],
        countries: vec!["US".into()],
        ..vast_entry()
    };
    let ids: Vec<String> = vast_with(&sim, &entry, VAST_KEY, http())
        .offers()
        .await
        .expect("offers")
        .into_iter()
        .map(|o| o.id)
        .collect();
    assert_eq!(ids, ["1001"]);
}

#[tokio::test]
async fn vast_list_labeled_follows_pagination_beyond_25_machines() {
    let sim = Sim::start(config()).await;
    let vast = vast_client(&sim, VAST_KEY, http());
    let offer = vast
        .offers()
        .await
        .expect("offers")
        .into_iter()
        .find(|o| o.id == "1009")
        .expect("the roomy offer");
    let mut ours = Vec::new();
    for n in 0..27 {
        let label = format!("gpupool-c0ffee-uid-{n:02}");
        let i = vast
            .create(&offer, &create_request(&label))
            .await
            .expect("create");
        ours.push(i.id);
    }
    for n in 0..2 {
        vast.create(
            &offer,
            &create_request(&format!("gpupool-othercluster-uid-{n}")),
        )
        .await
        .expect("create");
    }

    let listed = vast.list_labeled("gpupool-c0ffee-").await.expect("list");
    let mut ids: Vec<String> = listed.iter().map(|i| i.id.clone()).collect();
    ids.sort();
    ours.sort();
    assert_eq!(ids, ours, "every machine of the cluster, across pages");
    assert!(listed.iter().all(|i| {
        i.label
            .as_deref()
            .is_some_and(|l| l.starts_with("gpupool-c0ffee-"))
    }));
    // 29 machines at 25 a page: two pages.
    assert_eq!(sim.calls("vast.list", 200).await, 2);

    let all = vast.list_labeled("gpupool-").await.expect("list");
    assert_eq!(all.len(), 29);
    let last = vast
        .find_by_label("gpupool-c0ffee-uid-26")
        .await
        .expect("find")
        .expect("the 27th machine is found");
    assert!(ours.contains(&last.id));
}

#[tokio::test]
async fn vast_wrong_key_is_unauthorized_and_not_retried() {
    let sim = Sim::start(config()).await;
    let good = vast_client(&sim, VAST_KEY, http());
    let offer = good.offers().await.expect("offers").remove(0);
    let id = good
        .create(&offer, &create_request("gpupool-c0ffee-uid-k"))
        .await
        .expect("create")
        .id;

    let bad = vast_client(&sim, "not-a-vast-key", http());
    assert_eq!(class(&bad.offers().await), "Unauthorized");
    assert_eq!(
        class(
            &bad.create(&offer, &create_request("gpupool-c0ffee-uid-x"))
                .await
        ),
        "Unauthorized"
    );
    assert_eq!(class(&bad.get(&id).await), "Unauthorized");
    assert_eq!(class(&bad.list_labeled("gpupool-").await), "Unauthorized");
    assert_eq!(
        class(&bad.find_by_label("gpupool-c0ffee-uid-k").await),
        "Unauthorized"
    );
    assert_eq!(class(&bad.delete(&id).await), "Unauthorized");

    for op in ["vast.search", "vast.create", "vast.show", "vast.destroy"] {
        assert_eq!(sim.calls(op, 401).await, 1, "{op} is not retried");
    }
    assert_eq!(sim.calls("vast.list", 401).await, 2);
    assert_eq!(sim.instance_count().await, 1, "nothing was created");
    assert_eq!(
        sim.state_instance(&id).await["alive"],
        true,
        "nor destroyed"
    );
}

#[tokio::test]
async fn vast_unknown_machine_is_not_found_and_an_invalid_request_is_permanent() {
    let sim = Sim::start(config()).await;
    let vast = vast_client(&sim, VAST_KEY, http());
    match vast.get("987654").await {
        Err(ProviderError::NotFound(_)) => {}
        other => panic!("get of an unknown machine: {other:?}"),
    }
    vast.delete("987654")
        .await
        .expect("deleting an unknown machine is Ok");

    // Vast refuses disks under 8 GB: the request is wrong, retrying will not help.
    let offer = vast.offers().await.expect("offers").remove(0);
    let mut req = create_request("gpupool-c0ffee-uid-disk");
    req.disk_gb = 4;
    match vast.create(&offer, &req).await {
        Err(ProviderError::Permanent(msg)) => assert!(msg.contains("disk"), "{msg}"),
        other => panic!("create with a 4 GB disk: {other:?}"),
    }
    assert_eq!(sim.calls("vast.create", 400).await, 1, "not retried");
    assert_eq!(sim.instance_count().await, 0);
}

#[tokio::test]
async fn vast_no_capacity_is_insufficient_capacity() {
    let sim = Sim::start(config()).await;
    let vast = vast_client(&sim, VAST_KEY, http());
    let offers = vast.offers().await.expect("offers");
    let small = offers
        .iter()
        .find(|o| o.id == "1002")
        .expect("offer 1002")
        .clone();

    // Offer 1002 holds two machines; the third create finds it full.
    for n in 0..2 {
        vast.create(&small, &create_request(&format!("gpupool-c0ffee-uid-{n}")))
            .await
            .expect("create");
    }
    match vast
        .create(&small, &create_request("gpupool-c0ffee-uid-2"))
        .await
    {
        Err(ProviderError::InsufficientCapacity(msg)) => {
            assert!(msg.contains("no_such_ask"), "{msg}")
        }
        other => panic!("create on a full offer: {other:?}"),
    }
    let ids: Vec<String> = vast
        .offers()
        .await
        .expect("offers")
        .into_iter()
        .map(|o| o.id)
        .collect();
    assert_eq!(ids, ["1009", "1001"], "a full offer is not listed");

    // Every RTX 4090 sold out: nothing is offered and an old offer cannot be rented.
    sim.faults(json!({"exhausted": ["RTX 4090"]})).await;
    assert_eq!(vast.offers().await.expect("offers"), Vec::<Offer>::new());
    assert_eq!(
        class(
            &vast
                .create(&offers[0], &create_request("gpupool-c0ffee-uid-3"))
                .await
        ),
        "InsufficientCapacity"
    );
    assert_eq!(sim.calls("vast.create", 404).await, 2, "never retried");
    assert_eq!(sim.instance_count().await, 2);
}

#[tokio::test]
async fn vast_server_errors_and_hangs_are_transient() {
    let sim = Sim::start(config()).await;
    let vast = vast_client(&sim, VAST_KEY, http());
    let offer = vast.offers().await.expect("offers").remove(0);
    let id = vast
        .create(&offer, &create_request("gpupool-c0ffee-uid-t"))
        .await
        .expect("create")
        .id;

    // Two 500s are absorbed by the retries.
    sim.faults(json!({"errors": {"vast.show": {"next": 2}}}))
        .await;
    vast.get(&id).await.expect("get after two 500s");
    assert_eq!(sim.calls("vast.show", 500).await, 2);
    assert_eq!(sim.calls("vast.show", 200).await, 1);

    // 500s beyond the retry budget: Transient after exactly three attempts.
    sim.faults(
        json!({"errors": {"vast.show": {"rate": 1.0}, "vast.list": {"next": 3, "status": 503}}}),
    )
    .await;
    match vast.get(&id).await {
        Err(ProviderError::Transient(msg)) => assert!(msg.contains("500"), "{msg}"),
        other => panic!("get under 500s: {other:?}"),
    }
    assert_eq!(sim.calls("vast.show", 500).await, 5);
    assert_eq!(class(&vast.list_labeled("gpupool-").await), "Transient");
    assert_eq!(sim.calls("vast.list", 503).await, 3);

    // A request the server holds far longer than the client's timeout.
    sim.faults(json!({"hangs": {"vast.show": {"rate": 1.0}}}))
        .await;
    let hung = vast_client(&sim, VAST_KEY, short_timeout_http());
    let t0 = Instant::now();
    match hung.get(&id).await {
        Err(ProviderError::Transient(msg)) => assert!(msg.contains("vast"), "{msg}"),
        other => panic!("get of a hanging server: {other:?}"),
    }
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    // Both attempts reached the server and were abandoned by the client.
    eventually("two abandoned calls logged", || async {
        (sim.calls("vast.show", 0).await == 2).then_some(())
    })
    .await;

    sim.faults(json!({})).await;
    assert_eq!(vast.get(&id).await.expect("get").id, id);
}

#[tokio::test]
async fn vast_rate_limits_clear_after_back_off_or_exhaust_the_budget() {
    let sim = Sim::start(config()).await;
    let vast = vast_client(&sim, VAST_KEY, http());
    let offer = vast.offers().await.expect("offers").remove(0);

    // A create refused with 429 did nothing, so even a create is repeated; one machine.
    sim.faults(json!({"rate_limits": {"vast.create": {"next": 1}}}))
        .await;
    let id = vast
        .create(&offer, &create_request("gpupool-c0ffee-uid-r"))
        .await
        .expect("create after a 429")
        .id;
    assert_eq!(sim.calls("vast.create", 429).await, 1);
    assert_eq!(sim.calls("vast.create", 200).await, 1);
    assert_eq!(sim.instance_count().await, 1);

    // Two 429s, then the call goes through: the retries are visible in the call log, spaced
    // by the back-off.
    sim.faults(json!({"rate_limits": {"vast.show": {"next": 2}}}))
        .await;
    let t0 = Instant::now();
    assert_eq!(vast.get(&id).await.expect("get after back-off").id, id);
    assert!(
        t0.elapsed() >= Duration::from_millis(60),
        "20 ms + 40 ms of back-off"
    );
    assert_eq!(sim.calls("vast.show", 429).await, 2);
    assert_eq!(sim.calls("vast.show", 200).await, 1);
    let calls = sim.admin("/admin/calls").await;
    let shows: Vec<u64> = calls["recent"]
        .as_array()
        .expect("recent")
        .iter()
        .filter(|c| c["operation"] == "vast.show")
        .map(|c| c["status"].as_u64().expect("status"))
        .collect();
    assert_eq!(shows, [429, 429, 200]);

    // A limit that never clears: RateLimited (without a hint: Vast sends none) once the
    // retry budget is spent, on every body shape Vast uses.
    sim.faults(json!({"rate_limits": {
        "vast.show": {"rate": 1.0},
        "vast.search": {"rate": 1.0},
        "vast.destroy": {"rate": 1.0},
    }}))
    .await;
    assert_eq!(
        vast.get(&id).await,
        Err(ProviderError::RateLimited { retry_after: None })
    );
    assert_eq!(sim.calls("vast.show", 429).await, 5);
    assert_eq!(class(&vast.offers().await), "RateLimited");
    assert_eq!(sim.calls("vast.search", 429).await, 3);
    assert_eq!(class(&vast.delete(&id).await), "RateLimited");
    assert_eq!(sim.calls("vast.destroy", 429).await, 3);
    assert_eq!(sim.state_instance(&id).await["alive"], true);
}

#[tokio::test]
async fn vast_ghost_create_errors_but_find_by_label_finds_the_machine() {
    let sim = Sim::start(config()).await;
    let vast = vast_client(&sim, VAST_KEY, http());
    let offer = vast.offers().await.expect("offers").remove(0);
    sim.faults(json!({"ghost_creates": {"vast.create": {"next": 1}}}))
        .await;

    let label_ = "gpupool-c0ffee-uid-ghost";
    let e = vast
        .create(&offer, &create_request(label_))
        .await
        .expect_err("the create answers an error");
    assert_eq!(e.label(), "Transient", "{e}");
    assert_eq!(
        sim.calls_total("vast.create").await,
        1,
        "an ambiguous create is not retried"
    );

    // What the operator relies on: the machine exists, carries the label, and is found.
    let ghost = vast
        .find_by_label(label_)
        .await
        .expect("find")
        .expect("the ghost is found by its label");
    assert_eq!(ghost.label.as_deref(), Some(label_));
    let listed = vast.list_labeled("gpupool-c0ffee-").await.expect("list");
    assert_eq!(listed.len(), 1);
    let running = wait_running(&vast, &ghost.id).await;
    assert!(running.endpoint.is_some());
    assert_eq!(sim.instance_count().await, 1);

    delete_and_check_gone(&vast, &ghost.id).await;
    sim.assert_billed_and_gone("vast", &ghost.id, 0.30).await;

    // A create that hangs is just as ambiguous: given up on, not repeated. This one never
    // reached the marketplace, so the label finds nothing and a new create is in order.
    sim.faults(json!({"hangs": {"vast.create": {"next": 1}}}))
        .await;
    let hung = vast_client(&sim, VAST_KEY, short_timeout_http());
    let label_ = "gpupool-c0ffee-uid-hung";
    assert_eq!(
        class(&hung.create(&offer, &create_request(label_)).await),
        "Transient"
    );
    eventually("the abandoned create logged", || async {
        (sim.calls("vast.create", 0).await == 1).then_some(())
    })
    .await;
    assert_eq!(sim.calls_total("vast.create").await, 2);
    assert_eq!(vast.find_by_label(label_).await.expect("find"), None);
    vast.create(&offer, &create_request(label_))
        .await
        .expect("create again");
    assert!(vast.find_by_label(label_).await.expect("find").is_some());
}

// ---------------------------------------------------------------- RunPod pods

/// A logical RunPod operation, named per API in the simulator's call log and fault keys.
#[derive(Clone, Copy, Debug)]
enum RpOp {
    Offers,
    Create,
    Get,
    List,
    Delete,
    /// Every RunPod operation of the API (a fault wildcard).
    Any,
}

/// The simulator's operation name of `op` over `api`: GraphQL ops are named after their
/// root field, REST v2 ops after their `operationId`.
fn rp_op(api: RunpodApi, op: RpOp) -> &'static str {
    match (api, op) {
        (RunpodApi::GraphQL, RpOp::Offers) => "runpod.gpuTypes",
        (RunpodApi::GraphQL, RpOp::Create) => "runpod.podFindAndDeployOnDemand",
        (RunpodApi::GraphQL, RpOp::Get) => "runpod.pod",
        (RunpodApi::GraphQL, RpOp::List) => "runpod.myself",
        (RunpodApi::GraphQL, RpOp::Delete) => "runpod.podTerminate",
        (RunpodApi::GraphQL, RpOp::Any) => "runpod.*",
        (RunpodApi::RestV2, RpOp::Offers) => "runpod.v2.listGpuTypes",
        (RunpodApi::RestV2, RpOp::Create) => "runpod.v2.createPod",
        (RunpodApi::RestV2, RpOp::Get) => "runpod.v2.getPod",
        (RunpodApi::RestV2, RpOp::List) => "runpod.v2.listPods",
        (RunpodApi::RestV2, RpOp::Delete) => "runpod.v2.deletePod",
        (RunpodApi::RestV2, RpOp::Any) => "runpod.v2.*",
    }
}

/// The id of an offer for `gpu` in `cloud` (`SECURE`/`COMMUNITY`): GraphQL offers are the
/// GPU type id, REST v2 offers name the cloud too.
fn rp_offer_id(api: RunpodApi, cloud: &str, gpu: &str) -> String {
    match api {
        RunpodApi::GraphQL => gpu.to_string(),
        RunpodApi::RestV2 => format!("{cloud}:{gpu}"),
    }
}

/// A rate-limit trigger: REST v2's 429s carry `Retry-After: 1` unless told otherwise, which
/// the client would honour; `0` keeps both APIs hint-free (GraphQL's default).
fn rp_rate_limit(trigger: Value) -> Value {
    let mut t = trigger;
    t["retry_after"] = json!(0);
    t
}

/// The pod client of `entry`'s API against the simulator.
fn runpod_provider(
    sim: &Sim,
    entry: &RunpodProvider,
    key: &str,
    http: HttpConfig,
) -> Box<dyn InstanceProvider> {
    match entry.api {
        RunpodApi::GraphQL => Box::new(runpod_with(sim, entry, key, http)),
        RunpodApi::RestV2 => Box::new(
            RunpodV2Client::new(
                entry,
                WORKER,
                Credentials::new(key),
                RunpodV2Options {
                    base_url: sim.h.rest_v2_url(),
                    proxy_url_template: proxy_template(sim),
                    http,
                },
            )
            .expect("runpod v2 client"),
        ),
    }
}

/// The community-cloud entry of [`runpod_client`], over `api`.
fn runpod_over(
    sim: &Sim,
    api: RunpodApi,
    key: &str,
    http: HttpConfig,
) -> Box<dyn InstanceProvider> {
    let entry = RunpodProvider {
        api,
        ..runpod_entry(
            RunpodWorkerAccess::PublicTcp,
            CloudType::Community,
            &[GPU_4090, GPU_3090, "NVIDIA Imaginary RTX 9999", GPU_3060],
            "0.30",
        )
    };
    runpod_provider(sim, &entry, key, http)
}

/// Two `#[tokio::test]`s, one over REST v2 and one over GraphQL, each calling
/// `body(api, args...)`.
macro_rules! over_both_apis {
    ($rest_v2:ident, $graphql:ident => $body:ident($($arg:expr),*)) => {
        #[tokio::test]
        async fn $rest_v2() {
            $body(RunpodApi::RestV2, $($arg),*).await;
        }

        #[tokio::test]
        async fn $graphql() {
            $body(RunpodApi::GraphQL, $($arg),*).await;
        }
    };
}

/// Offers, create, running with the expected endpoint, worker, find/list, delete, bill.
async fn runpod_happy_path(api: RunpodApi, access: RunpodWorkerAccess) {
    let sim = Sim::start(config()).await;
    let (entry, cloud, expected_offers, price) = match access {
        // Community: 4090 (0.34) is over the cap, the imaginary type is unknown.
        RunpodWorkerAccess::PublicTcp => (
            runpod_entry(
                access,
                CloudType::Community,
                &[GPU_4090, GPU_3090, "NVIDIA Imaginary RTX 9999", GPU_3060],
                "0.30",
            ),
            "COMMUNITY",
            vec![
                (GPU_3060, "RTX 3060", "0.1"),
                (GPU_3090, "RTX 3090", "0.22"),
            ],
            0.10,
        ),
        // Secure: the 3060 is not in the secure cloud, 3090 costs 0.43 and 4090 0.69.
        RunpodWorkerAccess::Proxy => (
            runpod_entry(
                access,
                CloudType::Secure,
                &[GPU_4090, GPU_3060, GPU_3090],
                "0.70",
            ),
            "SECURE",
            vec![
                (GPU_3090, "RTX 3090", "0.43"),
                (GPU_4090, "RTX 4090", "0.69"),
            ],
            0.43,
        ),
    };
    let entry = RunpodProvider { api, ..entry };
    let runpod = runpod_provider(&sim, &entry, RUNPOD_KEY, http());

    let offers = runpod.offers().await.expect("offers");
    let got: Vec<(&str, &str, Decimal)> = offers
        .iter()
        .map(|o| (o.id.as_str(), o.gpu_name.as_str(), o.price_per_hour))
        .collect();
    let want_ids: Vec<String> = expected_offers
        .iter()
        .map(|(gpu, _, _)| rp_offer_id(api, cloud, gpu))
        .collect();
    let want: Vec<(&str, &str, Decimal)> = expected_offers
        .iter()
        .zip(&want_ids)
        .map(|((_, name, p), id)| (id.as_str(), *name, dec(p)))
        .collect();
    assert_eq!(got, want);
    // GraphQL asks `gpuTypes` once per GPU type of the entry (the unknown one too); REST v2
    // reads the whole catalogue once.
    let catalogue_reads = match api {
        RunpodApi::GraphQL => entry.gpu_type_ids.len() as u64,
        RunpodApi::RestV2 => 1,
    };
    assert_eq!(
        sim.calls(rp_op(api, RpOp::Offers), 200).await,
        catalogue_reads
    );

    let label = "gpupool-c0ffee-pod-uid-1";
    let created = runpod
        .create(&offers[0], &create_request(label))
        .await
        .expect("create");
    assert_eq!(created.state, RemoteState::Starting);
    assert_eq!(created.label.as_deref(), Some(label));
    let id = created.id.clone();
    assert_eq!(sim.calls_total(rp_op(api, RpOp::Create)).await, 1);

    let running = wait_running(&*runpod, &id).await;
    let endpoint = running.endpoint.clone().expect("endpoint");
    match access {
        RunpodWorkerAccess::PublicTcp => {
            let port = sim.state_instance(&id).await["worker_port"]
                .as_u64()
                .expect("worker port");
            assert_eq!(endpoint, format!("http://127.0.0.1:{port}"));
        }
        RunpodWorkerAccess::Proxy => {
            assert_eq!(endpoint, format!("{}/proxy/{id}-8000", sim.h.base_url));
        }
    }
    assert_eq!(running.label.as_deref(), Some(label));
    assert_eq!(running.num_gpus, Some(1));
    // GraphQL's pod names its GPU by display name, as the offer does; REST v2's pod only
    // by GPU type id.
    let gpu_name = match api {
        RunpodApi::GraphQL => offers[0].gpu_name.clone(),
        RunpodApi::RestV2 => expected_offers[0].0.to_string(),
    };
    assert_eq!(running.gpu_name.as_deref(), Some(gpu_name.as_str()));
    assert_eq!(running.price_per_hour, Some(offers[0].price_per_hour));
    assert!(sim.calls(rp_op(api, RpOp::Get), 200).await >= 1);

    exercise_worker(&sim, &endpoint, &id, "pjob-1").await;
    if access == RunpodWorkerAccess::Proxy {
        let proxied = sim.calls("runpod.proxy", 200).await;
        assert!(
            proxied >= 2,
            "health and the job went through the proxy: {proxied}"
        );
    }

    let found = runpod
        .find_by_label(label)
        .await
        .expect("find")
        .expect("found");
    assert_eq!(
        (found.id.as_str(), &found.endpoint),
        (id.as_str(), &running.endpoint)
    );
    assert_eq!(
        runpod
            .find_by_label("gpupool-c0ffee-pod-uid-2")
            .await
            .expect("find"),
        None
    );
    let listed = runpod.list_labeled("gpupool-c0ffee-").await.expect("list");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].state, RemoteState::Running);
    assert!(
        runpod
            .list_labeled("gpupool-other-")
            .await
            .expect("list")
            .is_empty()
    );
    assert!(sim.calls(rp_op(api, RpOp::List), 200).await >= 4);

    delete_and_check_gone(&*runpod, &id).await;
    assert!(
        runpod
            .list_labeled("gpupool-")
            .await
            .expect("list")
            .is_empty()
    );
    assert!(sim.calls_total(rp_op(api, RpOp::Delete)).await >= 2);
    sim.assert_billed_and_gone("runpod", &id, price).await;
}

over_both_apis!(
    runpod_public_tcp_happy_path_over_rest_v2,
    runpod_public_tcp_happy_path_over_graphql
    => runpod_happy_path(RunpodWorkerAccess::PublicTcp)
);
over_both_apis!(
    runpod_proxy_happy_path_over_rest_v2,
    runpod_proxy_happy_path_over_graphql
    => runpod_happy_path(RunpodWorkerAccess::Proxy)
);

async fn runpod_wrong_key_is_unauthorized_and_not_retried(api: RunpodApi) {
    let sim = Sim::start(config()).await;
    let good = runpod_over(&sim, api, RUNPOD_KEY, http());
    let offer = good.offers().await.expect("offers").remove(0);
    let id = good
        .create(&offer, &create_request("gpupool-c0ffee-pod-k"))
        .await
        .expect("create")
        .id;

    let bad = runpod_over(&sim, api, "not-a-runpod-key", http());
    assert_eq!(class(&bad.offers().await), "Unauthorized");
    assert_eq!(
        class(
            &bad.create(&offer, &create_request("gpupool-c0ffee-pod-x"))
                .await
        ),
        "Unauthorized"
    );
    assert_eq!(class(&bad.get(&id).await), "Unauthorized");
    assert_eq!(class(&bad.list_labeled("gpupool-").await), "Unauthorized");
    assert_eq!(class(&bad.delete(&id).await), "Unauthorized");
    match api {
        // Refused before the document is read: all five under the generic operation name.
        RunpodApi::GraphQL => {
            assert_eq!(sim.calls("runpod.graphql", 401).await, 5, "none retried")
        }
        // REST v2 names the operation by its route, before authentication: one each.
        RunpodApi::RestV2 => {
            for op in [
                RpOp::Offers,
                RpOp::Create,
                RpOp::Get,
                RpOp::List,
                RpOp::Delete,
            ] {
                let op = rp_op(api, op);
                assert_eq!(sim.calls(op, 401).await, 1, "{op} is not retried");
            }
        }
    }
    assert_eq!(sim.instance_count().await, 1);
    assert_eq!(sim.state_instance(&id).await["alive"], true);
}

over_both_apis!(
    runpod_wrong_key_is_unauthorized_and_not_retried_over_rest_v2,
    runpod_wrong_key_is_unauthorized_and_not_retried_over_graphql
    => runpod_wrong_key_is_unauthorized_and_not_retried()
);

async fn runpod_unknown_pod_is_not_found_and_an_invalid_request_is_permanent(api: RunpodApi) {
    let sim = Sim::start(config()).await;
    let runpod = runpod_over(&sim, api, RUNPOD_KEY, http());
    match runpod.get("nosuchpod00001").await {
        Err(ProviderError::NotFound(_)) => {}
        other => panic!("get of an unknown pod: {other:?}"),
    }
    runpod
        .delete("nosuchpod00001")
        .await
        .expect("deleting an unknown pod is Ok");
    // GraphQL's podTerminate answers an unknown pod with success; REST v2's DELETE with a
    // 404, which the client takes as gone. Either way one call, not retried.
    let delete_status = match api {
        RunpodApi::GraphQL => 200,
        RunpodApi::RestV2 => 404,
    };
    assert_eq!(sim.calls(rp_op(api, RpOp::Delete), delete_status).await, 1);
    assert_eq!(sim.calls_total(rp_op(api, RpOp::Delete)).await, 1);

    // A GPU type RunPod does not have: the request is wrong, not the market sold out. The
    // bare GPU type id (no cloud) is the entry's cloud over REST v2.
    let bogus = Offer {
        id: "NVIDIA Imaginary RTX 9999".into(),
        gpu_name: "RTX 9999".into(),
        num_gpus: 1,
        price_per_hour: dec("0.2"),
        region: None,
        reliability: None,
    };
    match runpod
        .create(&bogus, &create_request("gpupool-c0ffee-pod-bogus"))
        .await
    {
        Err(ProviderError::Permanent(msg)) => assert!(msg.contains("Imaginary"), "{msg}"),
        other => panic!("create with an unknown GPU type: {other:?}"),
    }
    assert_eq!(sim.calls_total(rp_op(api, RpOp::Create)).await, 1);
    assert_eq!(sim.instance_count().await, 0);
}

over_both_apis!(
    runpod_unknown_pod_is_not_found_and_an_invalid_request_is_permanent_over_rest_v2,
    runpod_unknown_pod_is_not_found_and_an_invalid_request_is_permanent_over_graphql
    => runpod_unknown_pod_is_not_found_and_an_invalid_request_is_permanent()
);

async fn runpod_no_capacity_is_insufficient_capacity(api: RunpodApi) {
    let mut cfg = config();
    cfg.runpod_gpu_types = vec![
        GpuTypeSpec {
            id: GPU_3060.into(),
            display_name: "RTX 3060".into(),
            memory_in_gb: 12,
            secure_price: None,
            community_price: Some(0.10),
            stock: 1,
            max_gpu_count: 8,
        },
        GpuTypeSpec {
            id: GPU_3090.into(),
            display_name: "RTX 3090".into(),
            memory_in_gb: 24,
            secure_price: Some(0.43),
            community_price: Some(0.22),
            stock: 8,
            max_gpu_count: 8,
        },
    ];
    let sim = Sim::start(cfg).await;
    let runpod = runpod_over(&sim, api, RUNPOD_KEY, http());
    let offers = runpod.offers().await.expect("offers");
    assert_eq!(offers[0].id, rp_offer_id(api, "COMMUNITY", GPU_3060));

    // One 3060 in stock: the second pod does not fit.
    runpod
        .create(&offers[0], &create_request("gpupool-c0ffee-pod-0"))
        .await
        .expect("create");
    match runpod
        .create(&offers[0], &create_request("gpupool-c0ffee-pod-1"))
        .await
    {
        Err(ProviderError::InsufficientCapacity(msg)) => {
            assert!(msg.contains("no longer any instances available"), "{msg}")
        }
        other => panic!("create without stock: {other:?}"),
    }

    // The 3090 sold out by the fault.
    sim.faults(json!({"exhausted": [GPU_3090]})).await;
    assert_eq!(
        class(
            &runpod
                .create(&offers[1], &create_request("gpupool-c0ffee-pod-2"))
                .await
        ),
        "InsufficientCapacity"
    );
    assert_eq!(
        sim.calls_total(rp_op(api, RpOp::Create)).await,
        3,
        "a refusal is not retried"
    );
    assert_eq!(sim.instance_count().await, 1);
}

over_both_apis!(
    runpod_no_capacity_is_insufficient_capacity_over_rest_v2,
    runpod_no_capacity_is_insufficient_capacity_over_graphql
    => runpod_no_capacity_is_insufficient_capacity()
);

async fn runpod_server_errors_and_hangs_are_transient(api: RunpodApi) {
    let sim = Sim::start(config()).await;
    let runpod = runpod_over(&sim, api, RUNPOD_KEY, http());
    let offer = runpod.offers().await.expect("offers").remove(0);
    let id = runpod
        .create(&offer, &create_request("gpupool-c0ffee-pod-t"))
        .await
        .expect("create")
        .id;
    let (get, list) = (rp_op(api, RpOp::Get), rp_op(api, RpOp::List));

    sim.faults(json!({"errors": {get: {"next": 2}}})).await;
    assert_eq!(runpod.get(&id).await.expect("get after two 500s").id, id);
    assert_eq!(sim.calls(get, 500).await, 2);
    assert_eq!(sim.calls(get, 200).await, 1);

    // Beyond the budget. GraphQL: also the "Something went wrong" body with HTTP 200. REST
    // v2 has no such body (its errors are HTTP statuses): a 503 on every list instead.
    let (list_status, list_says) = match api {
        RunpodApi::GraphQL => (200, "Something went wrong"),
        RunpodApi::RestV2 => (503, "503"),
    };
    sim.faults(json!({"errors": {
        get: {"rate": 1.0},
        list: {"rate": 1.0, "status": list_status},
    }}))
    .await;
    assert_eq!(class(&runpod.get(&id).await), "Transient");
    assert_eq!(sim.calls(get, 500).await, 5);
    match runpod.list_labeled("gpupool-").await {
        Err(ProviderError::Transient(msg)) => assert!(msg.contains(list_says), "{msg}"),
        other => panic!("list under server errors: {other:?}"),
    }
    assert_eq!(sim.calls(list, list_status).await, 3);

    sim.faults(json!({"hangs": {get: {"rate": 1.0}}})).await;
    let hung = runpod_over(&sim, api, RUNPOD_KEY, short_timeout_http());
    let t0 = Instant::now();
    assert_eq!(class(&hung.get(&id).await), "Transient");
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    eventually("two abandoned calls logged", || async {
        (sim.calls(get, 0).await == 2).then_some(())
    })
    .await;

    sim.faults(json!({})).await;
    assert_eq!(runpod.get(&id).await.expect("get").id, id);
}

over_both_apis!(
    runpod_server_errors_and_hangs_are_transient_over_rest_v2,
    runpod_server_errors_and_hangs_are_transient_over_graphql
    => runpod_server_errors_and_hangs_are_transient()
);

async fn runpod_rate_limits_clear_after_back_off_or_exhaust_the_budget(api: RunpodApi) {
    let sim = Sim::start(config()).await;
    let runpod = runpod_over(&sim, api, RUNPOD_KEY, http());
    let offer = runpod.offers().await.expect("offers").remove(0);
    let (create, get) = (rp_op(api, RpOp::Create), rp_op(api, RpOp::Get));

    sim.faults(json!({"rate_limits": {create: rp_rate_limit(json!({"next": 1}))}}))
        .await;
    let id = runpod
        .create(&offer, &create_request("gpupool-c0ffee-pod-r"))
        .await
        .expect("create after a 429")
        .id;
    assert_eq!(sim.calls(create, 429).await, 1);
    assert_eq!(sim.instance_count().await, 1);

    sim.faults(json!({"rate_limits": {get: rp_rate_limit(json!({"next": 2}))}}))
        .await;
    assert_eq!(runpod.get(&id).await.expect("get after back-off").id, id);
    assert_eq!(sim.calls(get, 429).await, 2);
    assert_eq!(sim.calls(get, 200).await, 1);

    sim.faults(json!({"rate_limits": {
        rp_op(api, RpOp::Any): rp_rate_limit(json!({"rate": 1.0})),
    }}))
    .await;
    assert_eq!(
        runpod.get(&id).await,
        Err(ProviderError::RateLimited { retry_after: None })
    );
    assert_eq!(sim.calls(get, 429).await, 5);
    assert_eq!(class(&runpod.list_labeled("gpupool-").await), "RateLimited");
    assert_eq!(sim.calls(rp_op(api, RpOp::List), 429).await, 3);
    assert_eq!(class(&runpod.delete(&id).await), "RateLimited");
    assert_eq!(sim.calls(rp_op(api, RpOp::Delete), 429).await, 3);
    assert_eq!(sim.state_instance(&id).await["alive"], true);
}

over_both_apis!(
    runpod_rate_limits_clear_after_back_off_or_exhaust_the_budget_over_rest_v2,
    runpod_rate_limits_clear_after_back_off_or_exhaust_the_budget_over_graphql
    => runpod_rate_limits_clear_after_back_off_or_exhaust_the_budget()
);

async fn runpod_ghost_create_errors_but_find_by_label_finds_the_pod(api: RunpodApi) {
    let sim = Sim::start(config()).await;
    let runpod = runpod_over(&sim, api, RUNPOD_KEY, http());
    let offer = runpod.offers().await.expect("offers").remove(0);
    let create = rp_op(api, RpOp::Create);
    sim.faults(json!({"ghost_creates": {create: {"next": 1}}}))
        .await;

    let label_ = "gpupool-c0ffee-pod-ghost";
    let e = runpod
        .create(&offer, &create_request(label_))
        .await
        .expect_err("the create answers an error");
    assert_eq!(e.label(), "Transient", "{e}");
    assert_eq!(sim.calls_total(create).await, 1);

    let ghost = runpod
        .find_by_label(label_)
        .await
        .expect("find")
        .expect("the ghost is found by its name");
    assert_eq!(ghost.label.as_deref(), Some(label_));
    wait_running(&*runpod, &ghost.id).await;
    assert_eq!(sim.instance_count().await, 1);
    delete_and_check_gone(&*runpod, &ghost.id).await;
    sim.assert_billed_and_gone("runpod", &ghost.id, 0.10).await;
}

over_both_apis!(
    runpod_ghost_create_errors_but_find_by_label_finds_the_pod_over_rest_v2,
    runpod_ghost_create_errors_but_find_by_label_finds_the_pod_over_graphql
    => runpod_ghost_create_errors_but_find_by_label_finds_the_pod()
);

// ---------------------------------------------------------------- RunPod Serverless

async fn wait_final(sls: &RunpodServerlessClient, job_id: &str) -> ServerlessJob {
    eventually("the job final", || async {
        let job = sls.status(job_id).await.expect("status");
        job.status.is_final().then_some(job)
    })
    .await
}

async fn wait_status(sls: &RunpodServerlessClient, job_id: &str, want: ServerlessStatus) {
    eventually("the job status", || async {
        let job = sls.status(job_id).await.expect("status");
        (job.status == want).then_some(())
    })
    .await
}

#[tokio::test]
async fn serverless_happy_path_submit_status_completed_health_and_bill() {
    let sim = Sim::start(config()).await;
    let sls = serverless_client(&sim, RUNPOD_KEY, ENDPOINT_ID, http());

    let idle = sls.health().await.expect("health");
    assert_eq!(idle, Default::default(), "nothing ran yet");

    let input = json!({"operation": "transcode", "url": "s3://videos/a.mp4"});
    let job_id = sls.submit(&input).await.expect("submit");
    let job = wait_final(&sls, &job_id).await;
    assert_eq!(job.id, job_id);
    assert_eq!(job.status, ServerlessStatus::Completed, "{job:?}");
    assert_eq!(job.error, None);
    let output = job.output.expect("output");
    assert_eq!(output["operation"], "transcode", "{output}");
    assert_eq!(output["jobId"], job_id.as_str(), "{output}");
    assert_eq!(output["result"]["input"], input, "{output}");
    assert!(job.delay_time_ms.is_some() && job.execution_time_ms.is_some());
    let health = sls.health().await.expect("health");
    assert_eq!(health.jobs_completed, 1, "{health:?}");
    assert_eq!(
        (health.workers_idle, health.workers_running),
        (1, 0),
        "{health:?}"
    );

    // A job the handler fails, and one whose worker dies.
    let failing = sls
        .submit(
            &json!({"operation": "transcode", "simulate": {"status": 422, "error": "bad video"}}),
        )
        .await
        .expect("submit");
    let job = wait_final(&sls, &failing).await;
    assert_eq!(job.status, ServerlessStatus::Failed);
    assert_eq!(job.error.as_deref(), Some("bad video"));
    let dying = sls
        .submit(&json!({"operation": "transcode", "simulate": {"die": true}}))
        .await
        .expect("submit");
    let job = wait_final(&sls, &dying).await;
    assert_eq!(job.status, ServerlessStatus::Failed);
    assert!(job.error.is_some_and(|e| e.contains("exited")));

    let health = sls.health().await.expect("health");
    assert_eq!(
        (health.jobs_completed, health.jobs_failed),
        (1, 2),
        "{health:?}"
    );
    assert_eq!((health.jobs_in_queue, health.jobs_in_progress), (0, 0));

    assert_eq!(sim.job_status(&job_id).await, "COMPLETED");
    assert_eq!(sim.job_status(&failing).await, "FAILED");
    assert_eq!(sim.job_status(&dying).await, "FAILED");
    let bill = sim.admin("/admin/bill").await;
    let ep = &bill["endpoints"][0];
    assert_eq!(ep["id"], ENDPOINT_ID);
    assert!(
        ep["worker_seconds"].as_f64().expect("seconds") > 0.0,
        "{bill}"
    );
    assert!(bill["by_provider"]["serverless"].as_f64().expect("cost") > 0.0);
}

#[tokio::test]
async fn serverless_cancel_of_queued_running_and_unknown_jobs() {
    let mut cfg = config();
    cfg.endpoints = vec![endpoint_spec(1)];
    let sim = Sim::start(cfg).await;
    let sls = serverless_client(&sim, RUNPOD_KEY, ENDPOINT_ID, http());

    // One worker: a long job runs, the next one waits in the queue.
    let long = json!({"operation": "transcode", "simulate": {"seconds": 60}});
    let running = sls.submit(&long).await.expect("submit");
    wait_status(&sls, &running, ServerlessStatus::InProgress).await;
    let queued = sls.submit(&long).await.expect("submit");
    assert_eq!(
        sls.status(&queued).await.expect("status").status,
        ServerlessStatus::InQueue
    );
    let health = sls.health().await.expect("health");
    assert_eq!((health.jobs_in_progress, health.jobs_in_queue), (1, 1));

    sls.cancel(&queued).await.expect("cancel a queued job");
    assert_eq!(sim.job_status(&queued).await, "CANCELLED");
    assert_eq!(
        sls.status(&queued).await.expect("status").status,
        ServerlessStatus::Cancelled
    );
    sls.cancel(&running).await.expect("cancel a running job");
    assert_eq!(sim.job_status(&running).await, "CANCELLED");
    assert_eq!(
        sls.status(&running).await.expect("status").status,
        ServerlessStatus::Cancelled
    );

    // Cancelling what is already final, or what never existed, is success.
    sls.cancel(&running).await.expect("cancel again");
    sls.cancel("00000000-0000-0000-0000-000000000000")
        .await
        .expect("cancel of an unknown job");
    assert_eq!(sim.calls("serverless.cancel", 404).await, 1);

    // The worker is free again: a new job completes.
    let next = sls
        .submit(&json!({"operation": "thumbnail"}))
        .await
        .expect("submit");
    assert_eq!(
        wait_final(&sls, &next).await.status,
        ServerlessStatus::Completed
    );
}

/// The endpoint settings over `api`. REST v2 refuses an idle timeout on a queue-based
/// endpoint scaling by `REQUEST_COUNT` (and leaves it out of its answers), so over v2 the
/// endpoint scales by `QUEUE_DELAY`; the refusal is checked on a second endpoint.
async fn serverless_settings_round_trip_and_keep_the_other_fields(api: RunpodApi) {
    let scaler = match api {
        RunpodApi::GraphQL => "REQUEST_COUNT",
        RunpodApi::RestV2 => "QUEUE_DELAY",
    };
    let mut cfg = config();
    cfg.endpoints = vec![
        EndpointSpec {
            scaler_type: scaler.into(),
            ..endpoint_spec(2)
        },
        EndpointSpec {
            id: "gpupoolep2".into(),
            name: "gpupool-by-requests".into(),
            scaler_type: "REQUEST_COUNT".into(),
            ..endpoint_spec(2)
        },
    ];
    let sim = Sim::start(cfg).await;
    let sls = serverless_client_over(&sim, api, RUNPOD_KEY, ENDPOINT_ID, http());
    let (save, other_save) = match api {
        RunpodApi::GraphQL => ("runpod.saveEndpoint", "runpod.v2.updateEndpoint"),
        RunpodApi::RestV2 => ("runpod.v2.updateEndpoint", "runpod.saveEndpoint"),
    };
    let query = "{ myself { endpoints { id name templateId gpuIds gpuCount idleTimeout scalerType \
                 scalerValue workersMin workersMax executionTimeoutMs } } }";
    let before = sim.gql(query).await["data"]["myself"]["endpoints"][0].clone();

    assert_eq!(
        sls.settings().await.expect("settings"),
        EndpointSettings {
            idle_timeout_seconds: 30,
            workers_min: 0,
            workers_max: 2,
        }
    );
    let wanted = EndpointSettings {
        idle_timeout_seconds: 120,
        workers_min: 1,
        workers_max: 4,
    };
    sls.update_settings(&wanted).await.expect("update");
    assert_eq!(sls.settings().await.expect("settings"), wanted);
    assert_eq!(sim.calls(save, 200).await, 1);

    // Every other setting survived: the GraphQL full replace, the REST v2 partial PATCH.
    let after = sim.gql(query).await["data"]["myself"]["endpoints"][0].clone();
    let mut expected = before.clone();
    expected["idleTimeout"] = json!(120);
    expected["workersMin"] = json!(1);
    expected["workersMax"] = json!(4);
    assert_eq!(after, expected);
    assert_eq!(
        after,
        json!({
            "id": ENDPOINT_ID, "name": "gpupool-video-sim", "templateId": "tpl-video-7",
            "gpuIds": "AMPERE_24,ADA_24", "gpuCount": 2, "idleTimeout": 120,
            "scalerType": scaler, "scalerValue": 3, "workersMin": 1, "workersMax": 4,
            "executionTimeoutMs": 120000,
        })
    );
    let state = sim.admin("/admin/state").await;
    let ep = &state["endpoints"][0];
    assert_eq!(
        (&ep["idle_timeout"], &ep["workers_min"], &ep["workers_max"]),
        (&json!(120), &json!(1), &json!(4))
    );
    assert_eq!(ep["price_per_hour"], 0.9, "simulator knobs are kept too");
    // workersMin 1: the endpoint keeps a worker up.
    eventually("a warm worker", || async {
        let h = sls.health().await.expect("health");
        (h.workers_idle == 1).then_some(())
    })
    .await;

    sls.update_settings(&wanted).await.expect("update");
    match api {
        // Asking for what is already set sends nothing (the update reads first).
        RunpodApi::GraphQL => assert_eq!(sim.calls_total(save).await, 1),
        // REST v2 does not read first: the same partial PATCH again, which changes nothing.
        RunpodApi::RestV2 => assert_eq!(sim.calls(save, 200).await, 2),
    }
    assert_eq!(sls.settings().await.expect("settings"), wanted);
    assert_eq!(sim.calls_total(other_save).await, 0, "only {save} was used");

    let by_requests = serverless_client_over(&sim, api, RUNPOD_KEY, "gpupoolep2", http());
    match api {
        // GraphQL keeps the idle timeout of an endpoint scaling by request count.
        RunpodApi::GraphQL => {
            assert_eq!(
                by_requests
                    .settings()
                    .await
                    .expect("settings")
                    .idle_timeout_seconds,
                30
            );
            by_requests.update_settings(&wanted).await.expect("update");
            assert_eq!(by_requests.settings().await.expect("settings"), wanted);
        }
        // REST v2 leaves it out and refuses to set it: Permanent, naming REQUEST_COUNT.
        RunpodApi::RestV2 => {
            match by_requests.settings().await {
                Err(ProviderError::Permanent(msg)) => {
                    assert!(msg.contains("REQUEST_COUNT"), "{msg}")
                }
                other => panic!("settings of a REQUEST_COUNT endpoint: {other:?}"),
            }
            match by_requests.update_settings(&wanted).await {
                Err(ProviderError::Permanent(msg)) => {
                    assert!(msg.contains("REQUEST_COUNT"), "{msg}")
                }
                other => panic!("update of a REQUEST_COUNT endpoint: {other:?}"),
            }
            assert_eq!(sim.calls(save, 422).await, 1, "not retried");
        }
    }
}

over_both_apis!(
    serverless_settings_round_trip_and_keep_the_other_fields_over_rest_v2,
    serverless_settings_round_trip_and_keep_the_other_fields_over_graphql
    => serverless_settings_round_trip_and_keep_the_other_fields()
);

#[tokio::test]
async fn serverless_unauthorized_not_found_and_invalid_requests() {
    let sim = Sim::start(config()).await;
    let good = serverless_client(&sim, RUNPOD_KEY, ENDPOINT_ID, http());
    let job = good
        .submit(&json!({"operation": "transcode"}))
        .await
        .expect("submit");

    let bad = serverless_client(&sim, "not-a-runpod-key", ENDPOINT_ID, http());
    assert_eq!(class(&bad.submit(&json!({"a": 1})).await), "Unauthorized");
    assert_eq!(class(&bad.status(&job).await), "Unauthorized");
    assert_eq!(class(&bad.cancel(&job).await), "Unauthorized");
    assert_eq!(class(&bad.health().await), "Unauthorized");
    assert_eq!(class(&bad.settings().await), "Unauthorized");
    let s = EndpointSettings {
        idle_timeout_seconds: 1,
        workers_min: 0,
        workers_max: 1,
    };
    assert_eq!(class(&bad.update_settings(&s).await), "Unauthorized");
    assert_eq!(sim.calls("serverless.run", 401).await, 1, "not retried");

    match good.status("00000000-0000-0000-0000-000000000000").await {
        Err(ProviderError::NotFound(_)) => {}
        other => panic!("status of an unknown job: {other:?}"),
    }
    let elsewhere = serverless_client(&sim, RUNPOD_KEY, "nosuchendpoint", http());
    assert_eq!(class(&elsewhere.health().await), "NotFound");
    assert_eq!(class(&elsewhere.submit(&json!({"a": 1})).await), "NotFound");
    assert_eq!(class(&elsewhere.settings().await), "NotFound");
    assert_eq!(class(&elsewhere.update_settings(&s).await), "NotFound");

    // `{"input": null}` is refused as invalid; nothing is queued.
    match good.submit(&Value::Null).await {
        Err(ProviderError::Permanent(msg)) => assert!(msg.contains("input"), "{msg}"),
        other => panic!("submit without input: {other:?}"),
    }
    // workersMin above workersMax: saveEndpoint refuses it.
    let impossible = EndpointSettings {
        idle_timeout_seconds: 5,
        workers_min: 3,
        workers_max: 1,
    };
    assert_eq!(class(&good.update_settings(&impossible).await), "Permanent");
    assert_eq!(
        good.settings().await.expect("settings").workers_max,
        2,
        "unchanged"
    );
    let state = sim.admin("/admin/state").await;
    assert_eq!(state["jobs"].as_array().map(Vec::len), Some(1));
}

#[tokio::test]
async fn serverless_transient_errors_hangs_and_rate_limits() {
    let sim = Sim::start(config()).await;
    let sls = serverless_client(&sim, RUNPOD_KEY, ENDPOINT_ID, http());

    // A submit refused with 429 is repeated (nothing was queued); one job in the end.
    sim.faults(json!({"rate_limits": {"serverless.run": {"next": 1}}}))
        .await;
    let job = sls
        .submit(&json!({"operation": "transcode"}))
        .await
        .expect("submit after a 429");
    assert_eq!(sim.calls("serverless.run", 429).await, 1);
    assert_eq!(
        sim.admin("/admin/state").await["jobs"]
            .as_array()
            .map(Vec::len),
        Some(1)
    );

    // A submit answered 500 may have queued the job: not repeated.
    sim.faults(json!({"errors": {"serverless.run": {"next": 1}}}))
        .await;
    assert_eq!(class(&sls.submit(&json!({"a": 1})).await), "Transient");
    assert_eq!(sim.calls_total("serverless.run").await, 3);

    sim.faults(json!({"errors": {"serverless.status": {"next": 2, "status": 503}}}))
        .await;
    sls.status(&job).await.expect("status after two 503s");
    assert_eq!(sim.calls("serverless.status", 503).await, 2);

    sim.faults(json!({"errors": {"serverless.status": {"rate": 1.0}}}))
        .await;
    assert_eq!(class(&sls.status(&job).await), "Transient");
    assert_eq!(sim.calls("serverless.status", 500).await, 3);

    sim.faults(json!({"rate_limits": {"serverless.status": {"next": 2}}}))
        .await;
    sls.status(&job).await.expect("status after back-off");
    assert_eq!(sim.calls("serverless.status", 429).await, 2);

    sim.faults(json!({"rate_limits": {"serverless.health": {"rate": 1.0}}}))
        .await;
    assert_eq!(
        sls.health().await,
        Err(ProviderError::RateLimited { retry_after: None })
    );
    assert_eq!(sim.calls("serverless.health", 429).await, 3);

    sim.faults(json!({"hangs": {"serverless.health": {"rate": 1.0}}}))
        .await;
    let hung = serverless_client(&sim, RUNPOD_KEY, ENDPOINT_ID, short_timeout_http());
    let t0 = Instant::now();
    assert_eq!(class(&hung.health().await), "Transient");
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());

    sim.faults(json!({})).await;
    assert_eq!(
        wait_final(&sls, &job).await.status,
        ServerlessStatus::Completed
    );
}

// ---------------------------------------------------------------- the worker

/// A Vast machine created with the worker credentials, running; its id and endpoint.
async fn running_vast_machine(sim: &Sim, vast: &VastClient, label: &str) -> (String, String) {
    let offer = vast.offers().await.expect("offers").remove(0);
    let id = vast
        .create(&offer, &create_request(label))
        .await
        .expect("create")
        .id;
    let running = wait_running(vast, &id).await;
    let endpoint = running.endpoint.expect("endpoint");
    worker_client(Some(WORKER_API_KEY))
        .health(&endpoint, "/health", &Credentials::new(SESSION_TOKEN))
        .await
        .expect("health");
    assert_eq!(sim.state_instance(&id).await["phase"], "running");
    (id, endpoint)
}

#[tokio::test]
async fn worker_failures_map_to_their_error_classes() {
    let sim = Sim::start(config()).await;
    let vast = vast_client(&sim, VAST_KEY, http());
    let (_, endpoint) = running_vast_machine(&sim, &vast, "gpupool-c0ffee-uid-w").await;
    let worker = worker_client(Some(WORKER_API_KEY));
    let token = Credentials::new(SESSION_TOKEN);
    let run = |input: Value, timeout: Duration| {
        let worker = worker.clone();
        let token = token.clone();
        let endpoint = endpoint.clone();
        async move {
            worker
                .dispatch(&dispatch(&endpoint, &input, "wjob", 0, &token, timeout))
                .await
        }
    };

    assert_eq!(
        run(
            json!({"simulate": {"status": 422, "error": "bad video"}}),
            JOB_TIMEOUT
        )
        .await,
        Err(WorkerError::Rejected {
            status: 422,
            message: "bad video".into()
        })
    );
    let e = run(json!({"simulate": {"status": 503}}), JOB_TIMEOUT)
        .await
        .expect_err("503");
    assert!(
        matches!(e, WorkerError::ServerError { status: 503, .. }),
        "{e:?}"
    );
    assert!(e.is_retryable() && !e.instance_looks_broken());
    assert_eq!(
        run(json!({"simulate": {"outputBytes": 100_000}}), JOB_TIMEOUT).await,
        Err(WorkerError::OutputTooLarge { limit: 64 * 1024 })
    );
    // Just under the cap is fine.
    let out = run(json!({"simulate": {"outputBytes": 60_000}}), JOB_TIMEOUT)
        .await
        .expect("60 kB output");
    assert!(
        out["result"]["padding"]
            .as_str()
            .is_some_and(|p| p.len() > 50_000)
    );
    let e = run(json!({"simulate": {"nonJson": true}}), JOB_TIMEOUT)
        .await
        .expect_err("HTML");
    assert!(
        matches!(e, WorkerError::InvalidOutput { status: 200, .. }),
        "{e:?}"
    );
    assert_eq!(
        run(
            json!({"simulate": {"seconds": 5}}),
            Duration::from_millis(200)
        )
        .await,
        Err(WorkerError::Timeout(Duration::from_millis(200)))
    );
}

/// A job that kills its machine half-way: the connection drops (Connection, the machine
/// looks broken), the provider reports it stopped, and it bills until destroyed.
#[tokio::test]
async fn worker_job_that_dies_mid_way_is_a_connection_error() {
    let sim = Sim::start(config()).await;
    let vast = vast_client(&sim, VAST_KEY, http());
    let runpod = runpod_client(&sim, RUNPOD_KEY, http());
    let (vast_id, vast_endpoint) = running_vast_machine(&sim, &vast, "gpupool-c0ffee-uid-d").await;
    let offer = runpod.offers().await.expect("offers").remove(0);
    let pod_id = runpod
        .create(&offer, &create_request("gpupool-c0ffee-pod-d"))
        .await
        .expect("create")
        .id;
    let pod_endpoint = wait_running(&runpod, &pod_id)
        .await
        .endpoint
        .expect("endpoint");

    let worker = worker_client(Some(WORKER_API_KEY));
    let token = Credentials::new(SESSION_TOKEN);
    let input = json!({"url": "s3://videos/x.mp4", "simulate": {"die": true, "seconds": 0.2}});
    let machines: [(&dyn InstanceProvider, &str, &str); 2] = [
        (&vast, &vast_id, &vast_endpoint),
        (&runpod, &pod_id, &pod_endpoint),
    ];
    for (provider, id, endpoint) in machines {
        let e = worker
            .dispatch(&dispatch(endpoint, &input, "djob", 0, &token, JOB_TIMEOUT))
            .await
            .expect_err("the machine died");
        assert!(matches!(e, WorkerError::Connection(_)), "{id}: {e:?}");
        assert!(e.instance_looks_broken() && e.is_retryable());

        let stopped = eventually("the provider reports the machine stopped", || async {
            let i = provider.get(id).await.expect("get");
            matches!(i.state, RemoteState::Stopped(_)).then_some(i)
        })
        .await;
        assert_eq!(stopped.endpoint, None, "{stopped:?}");
        let e = worker
            .health(endpoint, "/health", &token)
            .await
            .expect_err("nothing listens any more");
        assert!(matches!(e, WorkerError::Connection(_)), "{e:?}");
        let state = sim.state_instance(id).await;
        assert_eq!(
            (&state["phase"], &state["alive"]),
            (&json!("dead"), &json!(true))
        );

        delete_and_check_gone(provider, id).await;
    }
    sim.assert_billed_and_gone("vast", &vast_id, 0.30).await;
    sim.assert_billed_and_gone("runpod", &pod_id, 0.10).await;
}

/// Through the RunPod proxy the connection to the operator survives: a dead worker is the
/// proxy's 502, a retryable server error, and the pod reads as stopped.
#[tokio::test]
async fn worker_job_that_dies_behind_the_proxy_is_a_bad_gateway() {
    let sim = Sim::start(config()).await;
    let entry = runpod_entry(
        RunpodWorkerAccess::Proxy,
        CloudType::Community,
        &[GPU_3060],
        "0.30",
    );
    let runpod = runpod_with(&sim, &entry, RUNPOD_KEY, http());
    let offer = runpod.offers().await.expect("offers").remove(0);
    let id = runpod
        .create(&offer, &create_request("gpupool-c0ffee-pod-p"))
        .await
        .expect("create")
        .id;
    let endpoint = wait_running(&runpod, &id).await.endpoint.expect("endpoint");
    let token = Credentials::new(SESSION_TOKEN);
    let input = json!({"simulate": {"die": true, "seconds": 0.2}});
    let e = worker_client(Some(WORKER_API_KEY))
        .dispatch(&dispatch(
            &endpoint,
            &input,
            "pdjob",
            0,
            &token,
            JOB_TIMEOUT,
        ))
        .await
        .expect_err("the pod died");
    assert!(
        matches!(e, WorkerError::ServerError { status: 502, .. }),
        "{e:?}"
    );
    eventually("the pod reported stopped", || async {
        let i = runpod.get(&id).await.expect("get");
        matches!(i.state, RemoteState::Stopped(_)).then_some(())
    })
    .await;
    delete_and_check_gone(&runpod, &id).await;
}
