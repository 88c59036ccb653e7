//! The operator as users run it (the `gpupool` binary, configured by flags) against the local
//! control plane and an in-process provider simulator, one of each per test.

use std::{
    fs::File,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use futures::{StreamExt, TryStreamExt};
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
    runtime::watcher,
};
use serde_json::{Value, json};

use gpupool::crd::{GpuInstance, GpuPool, JobPhase, VideoJob};
use gpupool_sim::{SimConfig, SimHandle};

use crate::support::TestNamespace;

pub const VAST_KEY: &str = "vast-test-key";
pub const RUNPOD_KEY: &str = "runpod-test-key";
pub const WORKER_KEY: &str = "worker-test-key";

/// Installs the TLS provider reqwest needs (it is built without a default one).
pub fn tls() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

pub fn http() -> reqwest::Client {
    tls();
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// Starts a simulator with fast timings and the test keys.
pub async fn sim() -> SimHandle {
    sim_with(SimConfig::fast()).await
}

pub async fn sim_with(config: SimConfig) -> SimHandle {
    tls();
    gpupool_sim::start(config).await.expect("simulator starts")
}

pub async fn admin(sim: &SimHandle, path: &str) -> Value {
    http()
        .get(format!("{}/admin/{path}", sim.base_url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

pub async fn admin_put(sim: &SimHandle, path: &str, body: Value) -> Value {
    http()
        .put(format!("{}/admin/{path}", sim.base_url))
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap_or(Value::Null)
}

/// A running `gpupool` process, killed (SIGKILL) when dropped.
pub struct Operator {
    child: Child,
    pub log: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
}

impl Operator {
    /// Starts the operator on namespace `ns` only, with its own cluster id, against `sim`.
    pub fn start(ns: &str, sim: &SimHandle, extra: &[&str]) -> Self {
        Self::start_full(ns, sim, extra, &[], "")
    }

    /// As [`Operator::start`], with extra environment variables for the process (for example
    /// `KUBECONFIG` pointing at a ServiceAccount token, to run with the chart's RBAC).
    pub fn start_with_env(ns: &str, sim: &SimHandle, extra: &[&str], env: &[(&str, &str)]) -> Self {
        Self::start_full(ns, sim, extra, env, "")
    }

    /// Like [`Operator::start`], with a tag that keeps the logs of replicas apart.
    pub fn start_as(ns: &str, sim: &SimHandle, extra: &[&str], tag: &str) -> Self {
        Self::start_full(ns, sim, extra, &[], tag)
    }

    /// The general form: extra flags, extra environment, and a tag for the log file.
    pub fn start_full(
        ns: &str,
        sim: &SimHandle,
        extra: &[&str],
        env: &[(&str, &str)],
        tag: &str,
    ) -> Self {
        let mut args: Vec<String> = vec![
            format!("--namespace={ns}"),
            format!("--cluster-id={ns}"),
            "--http-addr=127.0.0.1:0".into(),
            format!("--vast-url={}", sim.base_url),
            format!("--runpod-api-url={}", sim.base_url),
            format!("--runpod-rest-url={}/v2", sim.base_url),
            format!("--runpod-serverless-url={}", sim.serverless_url()),
            format!(
                "--runpod-proxy-template={}/proxy/{{podId}}-{{port}}",
                sim.base_url
            ),
            "--sweep-interval-seconds=2".into(),
            "--orphan-grace-seconds=3".into(),
            "--provider-backoff-seconds=5".into(),
            "--liveness-interval-seconds=5".into(),
            "--provision-poll-ms=200".into(),
        ];
        // A flag given in `extra` replaces the default above; given with an empty value
        // (`--cluster-id=`) it removes the default, so the operator's own default applies.
        let flag = |a: &str| a.split('=').next().unwrap_or_default().to_string();
        args.retain(|a| !extra.iter().any(|e| flag(e) == flag(a)));
        args.extend(
            extra
                .iter()
                .filter(|e| !e.ends_with('='))
                .map(|s| s.to_string()),
        );
        let env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let name = if tag.is_empty() {
            ns.to_string()
        } else {
            format!("{ns}-{tag}")
        };
        Self::spawn(&name, args, env, 0)
    }

    fn spawn(ns: &str, args: Vec<String>, env: Vec<(String, String)>, generation: u32) -> Self {
        let dir = crate::support::state_dir().join("operator-logs");
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join(format!("{ns}-{generation}.log"));
        let out = File::create(&log).unwrap();
        let child = Command::new(crate::support::operator_binary())
            .args(&args)
            .env("RUST_LOG", "info,gpupool=debug")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::from(out.try_clone().unwrap()))
            .stderr(Stdio::from(out))
            .spawn()
            .expect("operator starts");
        Self {
            child,
            log,
            args,
            env,
        }
    }

    /// SIGKILLs the operator and starts a new one with the same flags.
    pub fn crash_and_restart(&mut self, ns: &str, generation: u32) {
        self.kill();
        let (args, env) = (self.args.clone(), self.env.clone());
        *self = Self::spawn(ns, args, env, generation);
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Whether the process has exited (it should only when killed).
    pub fn exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }

    /// The process id (for CPU time and peak memory in the benchmarks).
    #[allow(dead_code)] // used by crates/gpupool-e2e/benches/cluster.rs, which includes this file
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The address of the operator's HTTP server (/metrics, /readyz), from its start-up log
    /// line; `None` until it has logged it.
    pub fn http_addr(&self) -> Option<String> {
        let logs = self.logs();
        let line = logs.lines().find(|l| l.contains("gpupool listening"))?;
        Some(
            line.split("addr=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .to_string(),
        )
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last 60 lines of the log, for a failure message.
    pub fn log_tail(&self) -> String {
        let logs = self.logs();
        let lines: Vec<&str> = logs.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A namespace with the provider and worker Secrets a pool needs.
pub async fn namespace_with_secrets(prefix: &str) -> TestNamespace {
    let ns = TestNamespace::new(prefix).await;
    create_secrets(&ns.client(), &ns.name).await;
    ns
}

/// The provider and worker Secrets a pool needs, in `ns`.
pub async fn create_secrets(client: &Client, ns: &str) {
    for (name, value) in [
        ("vast", VAST_KEY),
        ("runpod", RUNPOD_KEY),
        ("gpu-worker", WORKER_KEY),
    ] {
        create_secret(client, ns, name, json!({"apiKey": value})).await;
    }
}

/// Creates Secret `name` in `ns` with `string_data` (key to text value).
pub async fn create_secret(client: &Client, ns: &str, name: &str, string_data: Value) {
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client.clone(), ns);
    let s = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": name},
        "stringData": string_data
    }))
    .unwrap();
    secrets.create(&PostParams::default(), &s).await.unwrap();
}

/// A pool spec with one Vast provider (the simulator's default offers include RTX 3060).
pub fn vast_pool(idle_timeout: i64) -> Value {
    json!({
        "idleTimeoutSeconds": idle_timeout,
        "maxInstances": 5,
        "providers": [{"name": "vast", "vast": {"gpuNames": ["RTX 3060", "RTX 4090"], "maxPricePerHour": "2.00",
                        "minReliability": 0.9, "credentialsSecretRef": {"name": "vast", "key": "apiKey"}}}],
        "worker": {"image": "example/worker:1", "port": 8000, "healthPath": "/health",
                   "apiKeySecretRef": {"name": "gpu-worker", "key": "apiKey"}}
    })
}

pub async fn create_pool(client: &Client, ns: &str, name: &str, spec: Value) -> GpuPool {
    let api: Api<GpuPool> = Api::namespaced(client.clone(), ns);
    let pool = serde_json::from_value(json!({
        "apiVersion": "gpupool.dev/v1alpha1", "kind": "GpuPool", "metadata": {"name": name}, "spec": spec
    }))
    .unwrap();
    api.create(&PostParams::default(), &pool).await.unwrap()
}

pub async fn create_job(client: &Client, ns: &str, name: &str, spec: Value) -> VideoJob {
    let api: Api<VideoJob> = Api::namespaced(client.clone(), ns);
    let job = serde_json::from_value(json!({
        "apiVersion": "gpupool.dev/v1alpha1", "kind": "VideoJob", "metadata": {"name": name}, "spec": spec
    }))
    .unwrap();
    api.create(&PostParams::default(), &job).await.unwrap()
}

/// Polls until `check` returns Some, or panics after `timeout` with `what` and the operator log tail.
pub async fn eventually<T, F, Fut>(
    timeout: Duration,
    what: &str,
    op: Option<&Operator>,
    mut check: F,
) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if start.elapsed() > timeout {
            let tail = op.map(Operator::log_tail).unwrap_or_default();
            panic!("timed out after {timeout:?} waiting for {what}\noperator log tail:\n{tail}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until job `name` is Succeeded or Failed and returns it.
pub async fn finished_job(
    client: &Client,
    ns: &str,
    name: &str,
    timeout: Duration,
    op: &Operator,
) -> VideoJob {
    let api: Api<VideoJob> = Api::namespaced(client.clone(), ns);
    eventually(timeout, &format!("job {name} to finish"), Some(op), || {
        let api = api.clone();
        async move {
            let j = api.get_opt(name).await.ok()??;
            j.status.as_ref()?.phase.filter(|p| p.is_finished())?;
            Some(j)
        }
    })
    .await
}

pub fn phase(job: &VideoJob) -> JobPhase {
    job.status
        .as_ref()
        .and_then(|s| s.phase)
        .unwrap_or_default()
}

/// Watches the GpuInstances of `ns` until `name` is deleted; returns its last state.
pub async fn final_state(client: &Client, ns: &str, name: &str, timeout: Duration) -> GpuInstance {
    let api: Api<GpuInstance> = Api::namespaced(client.clone(), ns);
    let cfg = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut stream = watcher(api.clone(), cfg).boxed();
    let mut last: Option<GpuInstance> = api.get_opt(name).await.unwrap();
    let deadline = Instant::now() + timeout;
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let ev = tokio::time::timeout(remaining, stream.try_next())
            .await
            .unwrap_or_else(|_| panic!("instance {name} not deleted within {timeout:?}"))
            .expect("watch works");
        match ev {
            Some(watcher::Event::Apply(o)) | Some(watcher::Event::InitApply(o)) => last = Some(o),
            Some(watcher::Event::Delete(o)) => return o,
            Some(_) => {}
            None => panic!("watch ended"),
        }
        if last.is_none() {
            // Already gone before the watch started.
            if api.get_opt(name).await.unwrap().is_none() {
                panic!("instance {name} was gone before its final state could be seen");
            }
        }
    }
}

/// Applies a status patch as the test (used to simulate states).
#[allow(dead_code)]
pub async fn patch_status<K>(api: &Api<K>, name: &str, status: Value)
where
    K: kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let patch =
        json!({"apiVersion": "gpupool.dev/v1alpha1", "kind": K::kind(&()), "status": status});
    api.patch_status(
        name,
        &PatchParams::apply("gpupool-e2e").force(),
        &Patch::Apply(&patch),
    )
    .await
    .unwrap();
}

/// The operator's `/metrics` text, from the address it logged.
pub async fn metrics_at(addr: &str) -> String {
    http()
        .get(format!("http://{addr}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The value of the sample `name{labels}` in a `/metrics` text, if there is one: every label
/// given must match (others may be present).
pub fn sample(metrics: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    metrics.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?;
        let (set, value) = match rest.strip_prefix('{') {
            Some(r) => r.split_once("} ")?,
            None => ("", rest.strip_prefix(' ')?),
        };
        labels
            .iter()
            .all(|(k, v)| set.split(',').any(|kv| kv == format!("{k}=\"{v}\"")))
            .then(|| value.trim().parse().ok())?
    })
}

/// Asserts that namespace `ns` holds at least one event with each of `reasons`.
pub async fn assert_event_reasons(client: &Client, ns: &str, reasons: &[&str]) {
    let events = Api::<k8s_openapi::api::core::v1::Event>::namespaced(client.clone(), ns)
        .list(&kube::api::ListParams::default())
        .await
        .unwrap();
    let seen: Vec<String> = events
        .items
        .iter()
        .filter_map(|e| e.reason.clone())
        .collect();
    for r in reasons {
        assert!(seen.iter().any(|x| x == r), "no {r} event in {seen:?}");
    }
}

/// The flags of replica `name` under leader election, its Lease in namespace `ns`.
pub fn leader_flags(ns: &str, name: &str) -> Vec<String> {
    vec![
        "--leader-elect".to_string(),
        format!("--leader-election-namespace={ns}"),
        format!("--pod-name={name}"),
    ]
}

/// Asserts that the simulator rented at most one machine per label (per GpuInstance: a
/// second create for one instance would be a leak); returns how many machines it rented.
pub async fn assert_one_machine_per_instance(sim: &SimHandle) -> usize {
    let state = admin(sim, "state").await;
    let mut labels: std::collections::HashMap<String, usize> = Default::default();
    for m in state["instances"].as_array().unwrap() {
        *labels
            .entry(m["label"].as_str().unwrap_or_default().to_string())
            .or_default() += 1;
    }
    assert!(
        labels.values().all(|n| *n == 1),
        "a GpuInstance got two machines: {labels:?}"
    );
    labels.len()
}
