//! End-to-end benchmarks: the real `gpupool` binary on the local control plane (kube-apiserver
//! and etcd) with the in-process provider simulator, as in the e2e tests. They print figures and
//! never fail on a slow machine; they stop with a message only when something is wrong (a job
//! lost, an instance never ready).
//!
//!   hack/with-control-plane.sh cargo bench --features e2e --bench cluster [-- NAME...]
//!
//! NAME is any of `dispatch`, `warm`, `burst`, `teardown`, `scale`, `gateway` (default: all). `make bench` runs
//! them all after the policy benchmark. Scale knobs (for a quicker look): BENCH_JOBS,
//! BENCH_SCALE_JOBS, BENCH_SCALE_INSTANCES, BENCH_TEARDOWN_INSTANCES.

#[allow(dead_code)]
#[path = "../tests/e2e/support.rs"]
mod support;

#[allow(dead_code)]
#[path = "../tests/e2e/operator.rs"]
mod operator;

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::{Duration, Instant},
};

use futures::{StreamExt, TryStreamExt};
use jiff::Timestamp;
use kube::{
    Api, Client, ResourceExt,
    api::{ListParams, PostParams},
    runtime::watcher,
};
use serde_json::{Value, json};
use tokio::sync::Mutex;

use gpupool::{
    crd::{GpuInstance, InstancePhase, VideoJob},
    provider::Credentials,
    worker::{Dispatch, WorkerClient, WorkerClientConfig},
};
use gpupool_sim::{SimConfig, SimHandle};
use operator::{
    Operator, WORKER_KEY, admin, create_pool, http, metrics_at, namespace_with_secrets, sim_with,
};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A simulator whose cheapest Vast offer can be rented `capacity` times at once.
async fn big_sim(capacity: u32) -> SimHandle {
    let mut config = SimConfig::fast();
    for o in &mut config.vast_offers {
        if o.gpu_name == "RTX 3060" && o.num_gpus == 1 {
            o.capacity = capacity;
        }
    }
    sim_with(config).await
}

fn pool_spec(max: usize, min_idle: usize, idle_timeout: i64) -> Value {
    json!({
        "idleTimeoutSeconds": idle_timeout,
        "maxInstances": max,
        "minIdle": min_idle,
        "providers": [{"name": "vast", "vast": {"gpuNames": ["RTX 3060"], "maxPricePerHour": "0.50",
                        "credentialsSecretRef": {"name": "vast", "key": "apiKey"}}}],
        "worker": {"image": "example/worker:1", "port": 8000, "healthPath": "/health",
                   "apiKeySecretRef": {"name": "gpu-worker", "key": "apiKey"}}
    })
}

/// The operator as a production deployment would run it (info logs, default intervals).
fn start_operator(ns: &str, sim: &SimHandle, tag: &str) -> Operator {
    start_operator_qps(ns, sim, tag, 5)
}

/// As [`start_operator`], with another client-side quota per provider account (requests/s).
fn start_operator_qps(ns: &str, sim: &SimHandle, tag: &str, qps: u32) -> Operator {
    let log = std::env::var("BENCH_RUST_LOG").unwrap_or_else(|_| "info".into());
    let qps = format!("--provider-qps={qps}");
    Operator::start_full(
        ns,
        sim,
        &[
            "--sweep-interval-seconds=60",
            "--liveness-interval-seconds=30",
            "--provision-poll-ms=500",
            &qps,
        ],
        &[("RUST_LOG", &log)],
        tag,
    )
}

async fn wait_for_addr(op: &Operator) -> String {
    let start = Instant::now();
    loop {
        if let Some(a) = op.http_addr() {
            return a;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the operator did not start:\n{}",
            op.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `gpupool_kube_requests_total` by verb (summed over resources).
async fn kube_requests(addr: &str) -> BTreeMap<String, f64> {
    let text = metrics_at(addr).await;
    let mut by_verb = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("gpupool_kube_requests_total{") else {
            continue;
        };
        let verb = rest
            .split("verb=\"")
            .nth(1)
            .and_then(|v| v.split('"').next())
            .unwrap_or("?")
            .to_string();
        let value: f64 = line
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        *by_verb.entry(verb).or_insert(0.0) += value;
    }
    by_verb
}

/// CPU seconds (user + system) and peak RSS (MiB) of a process, from /proc.
fn proc_usage(pid: u32) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    let ticks: f64 = fields
        .get(11..13)
        .map(|f| f.iter().filter_map(|v| v.parse::<f64>().ok()).sum())
        .unwrap_or(0.0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let hwm_kib: f64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    (ticks / clock_ticks(), hwm_kib / 1024.0)
}

/// CPU seconds of kube-apiserver and etcd (their pids are recorded next to the kubeconfig).
fn control_plane_cpu() -> (f64, f64) {
    let dir = std::path::PathBuf::from(std::env::var("KUBECONFIG").unwrap_or_default());
    let dir = dir.parent().map(|d| d.to_path_buf()).unwrap_or_default();
    let cpu = |name: &str| {
        std::fs::read_to_string(dir.join(name))
            .ok()
            .and_then(|p| p.trim().parse::<u32>().ok())
            .map(|pid| proc_usage(pid).0)
            .unwrap_or(f64::NAN)
    };
    (cpu("apiserver.pid"), cpu("etcd.pid"))
}

fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

fn pct(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * q).round() as usize]
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v
}

fn row(name: &str, value: String) {
    println!("  {name:<52} {value}");
}

fn header(title: &str) {
    println!("\n== {title}");
}

async fn wait_ready_instances(
    client: &Client,
    ns: &str,
    n: usize,
    timeout: Duration,
) -> Vec<GpuInstance> {
    let api: Api<GpuInstance> = Api::namespaced(client.clone(), ns);
    let start = Instant::now();
    loop {
        let list = api.list(&ListParams::default()).await.unwrap().items;
        let ready: Vec<GpuInstance> = list
            .into_iter()
            .filter(|i| i.status.as_ref().and_then(|s| s.phase) == Some(InstancePhase::Ready))
            .filter(|i| i.status.as_ref().is_some_and(|s| s.current_job.is_none()))
            .collect();
        if ready.len() >= n {
            return ready;
        }
        assert!(
            start.elapsed() < timeout,
            "only {} of {n} instances Ready after {timeout:?}",
            ready.len()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Jobs finished so far (Succeeded or Failed), listed in pages.
async fn list_jobs(client: &Client, ns: &str) -> Vec<VideoJob> {
    let api: Api<VideoJob> = Api::namespaced(client.clone(), ns);
    let mut out = Vec::new();
    let mut lp = ListParams::default().limit(2000);
    loop {
        let page = api.list(&lp).await.unwrap();
        out.extend(page.items);
        match page.metadata.continue_ {
            Some(c) if !c.is_empty() => lp = lp.continue_token(&c),
            _ => return out,
        }
    }
}

fn finished(j: &VideoJob) -> bool {
    j.status
        .as_ref()
        .and_then(|s| s.phase)
        .is_some_and(|p| p.is_finished())
}

async fn wait_all_finished(
    client: &Client,
    ns: &str,
    n: usize,
    timeout: Duration,
) -> Vec<VideoJob> {
    let start = Instant::now();
    loop {
        let jobs = list_jobs(client, ns).await;
        let done = jobs.iter().filter(|j| finished(j)).count();
        if done >= n {
            return jobs;
        }
        assert!(
            start.elapsed() < timeout,
            "only {done} of {n} jobs finished after {timeout:?}"
        );
        // Listing thousands of jobs is work for the API server the operator competes with:
        // look seldom (the figures come from the jobs' own timestamps, not from this loop).
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
}

fn job_body(name: &str, seconds: f64) -> VideoJob {
    serde_json::from_value(json!({
        "apiVersion": "gpupool.dev/v1alpha1", "kind": "VideoJob", "metadata": {"name": name},
        "spec": {"pool": "bench", "operation": "caption", "input": {"simulate": {"seconds": seconds}}}
    }))
    .unwrap()
}

/// Rents `n` instances by giving each a job of 3 s at once; with a long idle timeout they
/// then stay warm. Returns them once all are Ready and free.
async fn warm_up(client: &Client, ns: &str, n: usize) -> Vec<GpuInstance> {
    create_jobs(client, ns, "warm", n, 0.0, 3.0).await;
    wait_all_finished(client, ns, n, Duration::from_secs(900)).await;
    wait_ready_instances(client, ns, n, Duration::from_secs(300)).await
}

/// Creates `n` jobs, `rate` per second (0: as fast as 32 concurrent requests go); returns
/// when each create request was sent, by job name, and each job's UID.
async fn create_jobs(
    client: &Client,
    ns: &str,
    prefix: &str,
    n: usize,
    rate: f64,
    seconds: f64,
) -> (HashMap<String, Timestamp>, HashMap<String, String>) {
    let api: Api<VideoJob> = Api::namespaced(client.clone(), ns);
    let sent = Arc::new(Mutex::new(HashMap::new()));
    let uids = Arc::new(Mutex::new(HashMap::new()));
    let start = Instant::now();
    let creates = futures::stream::iter(0..n).map(|i| {
        let (api, sent, uids) = (api.clone(), sent.clone(), uids.clone());
        async move {
            if rate > 0.0 {
                let at = start + Duration::from_secs_f64(i as f64 / rate);
                tokio::time::sleep_until(at.into()).await;
            }
            let name = format!("{prefix}-{i:05}");
            let body = job_body(&name, seconds);
            sent.lock().await.insert(name.clone(), Timestamp::now());
            let created = api.create(&PostParams::default(), &body).await.unwrap();
            uids.lock()
                .await
                .insert(name, created.uid().unwrap_or_default());
        }
    });
    if rate > 0.0 {
        // Every create waits for its own moment, so none is late because another is slow.
        creates.buffer_unordered(usize::MAX).collect::<()>().await;
    } else {
        creates.buffer_unordered(32).collect::<()>().await;
    }
    let sent = Arc::try_unwrap(sent).unwrap().into_inner();
    let uids = Arc::try_unwrap(uids).unwrap().into_inner();
    (sent, uids)
}

fn micro(
    t: &Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime>,
) -> Option<Timestamp> {
    t.as_ref().map(|t| t.0)
}

fn secs(from: Timestamp, to: Timestamp) -> f64 {
    (to.as_microsecond() - from.as_microsecond()) as f64 / 1e6
}

/// One worker call made directly (no Kubernetes), for the ratio.
async fn direct_calls(
    client: &Client,
    ns: &str,
    inst: &GpuInstance,
    n: usize,
    seconds: f64,
) -> Vec<f64> {
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client.clone(), ns);
    let secret = secrets
        .get(&format!("gpupool-session-{}", inst.uid().unwrap()))
        .await
        .unwrap();
    let token = String::from_utf8(secret.data.unwrap()["token"].0.clone()).unwrap();
    let token = Credentials::new(token);
    let worker = WorkerClient::new(
        Some(Credentials::new(WORKER_KEY)),
        WorkerClientConfig::default(),
    )
    .unwrap();
    let endpoint = inst.status.as_ref().unwrap().endpoint.clone().unwrap();
    let input = json!({"simulate": {"seconds": seconds}});
    let mut out = Vec::new();
    for i in 0..n {
        let uid = format!("direct-{i}");
        let t = Instant::now();
        worker
            .dispatch(&Dispatch {
                endpoint: &endpoint,
                operation: "caption",
                input: &input,
                job_uid: &uid,
                attempt: 0,
                session_token: &token,
                timeout: Duration::from_secs(30),
            })
            .await
            .expect("direct worker call");
        out.push(t.elapsed().as_secs_f64());
    }
    out
}

/// Creation-to-dispatch (the worker's first request for the job, at the simulator) and
/// creation-to-finish (the job's finishedAt), per job, in seconds.
async fn job_latencies(
    sim: &SimHandle,
    jobs: &[VideoJob],
    sent: &HashMap<String, Timestamp>,
) -> (Vec<f64>, Vec<f64>, Timestamp, Timestamp, usize) {
    let executions = admin(sim, "executions").await;
    let mut dispatch = Vec::new();
    let mut e2e = Vec::new();
    let mut first = Timestamp::MAX;
    let mut last = Timestamp::MIN;
    let mut duplicates = 0;
    for j in jobs {
        let Some(created) = sent.get(&j.name_any()) else {
            continue;
        };
        first = first.min(*created);
        let uid = j.uid().unwrap_or_default();
        let e = &executions["jobs"][format!("{uid}-0")];
        if let Some(at) = e["first_at"]
            .as_str()
            .and_then(|s| s.parse::<Timestamp>().ok())
        {
            dispatch.push(secs(*created, at));
        }
        if e["count"].as_u64().unwrap_or(0) > 1 {
            duplicates += 1;
        }
        if let Some(done) = j.status.as_ref().and_then(|s| micro(&s.finished_at)) {
            e2e.push(secs(*created, done));
            last = last.max(done);
        }
    }
    (sorted(dispatch), sorted(e2e), first, last, duplicates)
}

fn print_latency(name: &str, v: &[f64]) {
    row(
        name,
        format!(
            "p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms  (n={})",
            pct(v, 0.5) * 1e3,
            pct(v, 0.99) * 1e3,
            v.last().copied().unwrap_or(f64::NAN) * 1e3,
            v.len()
        ),
    );
}

/// Jobs onto warm instances: 2,000 at 20/s on 10 (dispatch), or as fast as they can be
/// created on 40 (burst).
async fn throughput(name: &str, n: usize, instances: usize, rate: f64, worker_seconds: f64) {
    let ns = namespace_with_secrets(&format!("bench-{name}")).await;
    let client = ns.client();
    let sim = big_sim(4 * instances as u32).await;
    create_pool(
        &client,
        &ns.name,
        "bench",
        pool_spec(instances, instances, 3600),
    )
    .await;
    let op = start_operator(&ns.name, &sim, name);
    let addr = wait_for_addr(&op).await;
    let warm = warm_up(&client, &ns.name, instances).await;
    let direct = sorted(direct_calls(&client, &ns.name, &warm[0], 20, worker_seconds).await);

    let requests_before = kube_requests(&addr).await;
    let (cpu_before, _) = proc_usage(op.pid());
    let (api_before, etcd_before) = control_plane_cpu();
    let t0 = Instant::now();
    let (sent, _) = create_jobs(&client, &ns.name, "job", n, rate, worker_seconds).await;
    let created_in = t0.elapsed().as_secs_f64();
    let jobs = wait_all_finished(&client, &ns.name, n + instances, Duration::from_secs(1200)).await;
    let jobs: Vec<VideoJob> = jobs
        .into_iter()
        .filter(|j| sent.contains_key(&j.name_any()))
        .collect();
    let (cpu_after, peak_rss) = proc_usage(op.pid());
    let (api_after, etcd_after) = control_plane_cpu();
    let requests_after = kube_requests(&addr).await;
    let (dispatch, e2e, first, last, duplicates) = job_latencies(&sim, &jobs, &sent).await;
    let failed = jobs
        .iter()
        .filter(|j| {
            j.status.as_ref().and_then(|s| s.phase) != Some(gpupool::crd::JobPhase::Succeeded)
        })
        .count();
    let span = secs(first, last);

    header(&format!(
        "{name}: {n} VideoJobs {} onto {instances} warm instances, worker time {worker_seconds} s",
        if rate > 0.0 {
            format!("at {rate}/s")
        } else {
            "created as fast as possible".into()
        }
    ));
    row(
        "jobs succeeded / failed / run twice",
        format!("{} / {failed} / {duplicates}", jobs.len() - failed),
    );
    row(
        "created in",
        format!("{created_in:.1} s ({:.1}/s)", n as f64 / created_in),
    );
    row(
        "throughput (first create to last finish)",
        format!(
            "{:.1} jobs/s over {span:.1} s (ceiling {:.1}/s)",
            n as f64 / span,
            instances as f64 / worker_seconds
        ),
    );
    print_latency("creation to dispatch", &dispatch);
    print_latency("creation to finished (through gpupool)", &e2e);
    print_latency("worker called directly", &direct);
    row(
        "end-to-end ratio gpupool / direct (p50)",
        format!("{:.2}", pct(&e2e, 0.5) / pct(&direct, 0.5)),
    );
    row(
        "operator CPU during the run",
        format!(
            "{:.1} s ({:.2} ms per job)",
            cpu_after - cpu_before,
            (cpu_after - cpu_before) * 1e3 / n as f64
        ),
    );
    row("operator peak RSS", format!("{peak_rss:.1} MiB"));
    row(
        "kube-apiserver / etcd CPU during the run",
        format!(
            "{:.1} s / {:.1} s (over {span:.1} s on 2 cores)",
            api_after - api_before,
            etcd_after - etcd_before
        ),
    );
    let total: f64 = requests_after.values().sum::<f64>() - requests_before.values().sum::<f64>();
    let by_verb: Vec<String> = requests_after
        .iter()
        .map(|(v, after)| (v, after - requests_before.get(v).copied().unwrap_or(0.0)))
        .filter(|(_, d)| *d > 0.0)
        .map(|(v, d)| format!("{v} {:.2}", d / n as f64))
        .collect();
    row(
        "Kubernetes API requests per job",
        format!("{:.2} ({})", total / n as f64, by_verb.join(", ")),
    );
    drop(op);
    ns.cleanup().await;
}

/// Idle teardown precision over many instances: each gets one job that overlaps the others,
/// so every job rents its own machine; deadlines spread over the arrival window.
async fn teardown(n: usize, qps: u32) {
    let ns = namespace_with_secrets("bench-teardown").await;
    let client = ns.client();
    let sim = big_sim(2 * n as u32).await;
    let idle = 20;
    create_pool(&client, &ns.name, "bench", pool_spec(n + 10, 0, idle)).await;
    let op = start_operator_qps(&ns.name, &sim, "teardown", qps);
    wait_for_addr(&op).await;

    // Remember every instance's last state before deletion (its idle deadline).
    let api: Api<GpuInstance> = Api::namespaced(client.clone(), &ns.name);
    let last: Arc<Mutex<HashMap<String, GpuInstance>>> = Arc::default();
    let deleted: Arc<Mutex<Vec<GpuInstance>>> = Arc::default();
    let watch = {
        let (last, deleted) = (last.clone(), deleted.clone());
        let mut stream = watcher(api.clone(), watcher::Config::default()).boxed();
        tokio::spawn(async move {
            while let Ok(Some(ev)) = stream.try_next().await {
                match ev {
                    watcher::Event::Apply(o) | watcher::Event::InitApply(o) => {
                        last.lock().await.insert(o.name_any(), o);
                    }
                    watcher::Event::Delete(o) => {
                        let prev = last.lock().await.remove(&o.name_any());
                        deleted.lock().await.push(prev.unwrap_or(o));
                    }
                    _ => {}
                }
            }
        })
    };
    // Jobs of 10 s arriving over 8 s: all overlap, so none reuses another's machine.
    create_jobs(&client, &ns.name, "job", n, n as f64 / 8.0, 10.0).await;
    wait_all_finished(&client, &ns.name, n, Duration::from_secs(600)).await;
    let start = Instant::now();
    loop {
        let gone = deleted.lock().await.len();
        if gone >= n {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "only {gone} of {n} instances torn down"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    watch.abort();
    let state = admin(&sim, "state").await;
    let destroyed: HashMap<String, Timestamp> = state["instances"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| {
            Some((
                i["id"]
                    .as_str()
                    .map(str::to_string)
                    .or_else(|| i["id"].as_u64().map(|v| v.to_string()))?,
                i["destroyed_at"].as_str()?.parse().ok()?,
            ))
        })
        .collect();
    let mut lateness = Vec::new();
    let mut early = 0;
    for gi in deleted.lock().await.iter() {
        let s = gi.status.clone().unwrap_or_default();
        let (Some(deadline), Some(id)) = (micro(&s.idle_deadline), s.provider_instance_id.clone())
        else {
            continue;
        };
        if let Some(at) = destroyed.get(&id) {
            let l = secs(deadline, *at);
            if l < 0.0 {
                early += 1;
            }
            lateness.push(l);
        }
    }
    let lateness = sorted(lateness);
    // The operator's side: when it deleted the GpuInstance (its log has each lateness).
    let deleted_late = sorted(
        op.logs()
            .lines()
            .filter(|l| l.contains("idle deadline reached"))
            .filter_map(|l| {
                l.split("lateness_s=")
                    .nth(1)?
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            })
            .collect(),
    );
    let (_, peak_rss) = proc_usage(op.pid());
    header(&format!(
        "teardown: {n} instances rented at once, idle timeout {idle} s, provider quota {qps} requests/s"
    ));
    row(
        "instances measured",
        format!("{} (early: {early})", lateness.len()),
    );
    row(
        "machine destroyed at the provider, minus deadline",
        format!(
            "min {:.0} ms  p50 {:.0} ms  p99 {:.0} ms  max {:.0} ms",
            lateness.first().copied().unwrap_or(f64::NAN) * 1e3,
            pct(&lateness, 0.5) * 1e3,
            pct(&lateness, 0.99) * 1e3,
            lateness.last().copied().unwrap_or(f64::NAN) * 1e3
        ),
    );
    row(
        "GpuInstance deleted by the operator, minus deadline",
        format!(
            "p50 {:.0} ms  p99 {:.0} ms  max {:.0} ms  (n={})",
            pct(&deleted_late, 0.5) * 1e3,
            pct(&deleted_late, 0.99) * 1e3,
            deleted_late.last().copied().unwrap_or(f64::NAN) * 1e3,
            deleted_late.len()
        ),
    );
    row("operator peak RSS", format!("{peak_rss:.1} MiB"));
    drop(op);
    ns.cleanup().await;
}

/// Many objects stored: `instances` warm GpuInstances and a backlog of `n` VideoJobs created
/// while the operator was down; then start-up, backlog and memory.
async fn scale(n: usize, instances: usize) {
    let ns = namespace_with_secrets("bench-scale").await;
    let client = ns.client();
    let sim = big_sim(2 * instances as u32).await;
    create_pool(
        &client,
        &ns.name,
        "bench",
        pool_spec(instances, instances, 3600),
    )
    .await;
    // 1,000 machines at once would take many minutes under the default quota of 5 requests/s
    // (the teardown benchmark shows that); the scale benchmark is about the operator.
    let mut op = start_operator_qps(&ns.name, &sim, "scale", 500);
    wait_for_addr(&op).await;
    let t = Instant::now();
    warm_up(&client, &ns.name, instances).await;
    let warmup = t.elapsed().as_secs_f64();
    op.kill();

    // The warm-up jobs count among the stored ones.
    let backlog_jobs = n.saturating_sub(instances);
    let t = Instant::now();
    create_jobs(&client, &ns.name, "job", backlog_jobs, 0.0, 0.1).await;
    let created_in = t.elapsed().as_secs_f64();

    // Start-up with the backlog stored, then the backlog itself.
    let t = Instant::now();
    let op = start_operator_qps(&ns.name, &sim, "scale-1", 500);
    let addr = wait_for_addr(&op).await;
    wait_ready(&addr).await;
    let ready_after = t.elapsed().as_secs_f64();
    wait_all_finished(&client, &ns.name, n, Duration::from_secs(1800)).await;
    let backlog = t.elapsed().as_secs_f64();
    let (cpu, peak_rss) = proc_usage(op.pid());
    drop(op);

    // Start-up with everything finished: the steady state of a cluster with history.
    let t = Instant::now();
    let op = start_operator_qps(&ns.name, &sim, "scale-2", 500);
    let addr = wait_for_addr(&op).await;
    wait_ready(&addr).await;
    let ready_idle = t.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let (_, idle_rss) = proc_usage(op.pid());
    drop(op);

    header(&format!(
        "scale: {n} VideoJobs and {instances} GpuInstances stored"
    ));
    row(
        "instances rented and Ready (one 3 s job each)",
        format!("{warmup:.1} s"),
    );
    row(
        &format!("backlog of {backlog_jobs} jobs created (operator stopped)"),
        format!(
            "{created_in:.1} s ({:.0}/s)",
            backlog_jobs as f64 / created_in
        ),
    );
    row(
        "start-up until ready, backlog stored",
        format!("{ready_after:.2} s"),
    );
    row(
        "start until the whole backlog finished",
        format!(
            "{backlog:.1} s ({:.1} jobs/s)",
            backlog_jobs as f64 / backlog
        ),
    );
    row("operator CPU, backlog run", format!("{cpu:.1} s"));
    row(
        "operator peak RSS, backlog run",
        format!("{peak_rss:.1} MiB"),
    );
    row(
        "start-up until ready, all finished",
        format!("{ready_idle:.2} s"),
    );
    row(
        "operator peak RSS, restarted with all finished (10 s)",
        format!("{idle_rss:.1} MiB"),
    );
    ns.cleanup().await;
}

/// Polls /readyz until it answers 200; returns how long the polling took.
async fn wait_ready(addr: &str) -> f64 {
    let t = Instant::now();
    loop {
        if let Ok(r) = http().get(format!("http://{addr}/readyz")).send().await
            && r.status().is_success()
        {
            return t.elapsed().as_secs_f64();
        }
        assert!(
            t.elapsed() < Duration::from_secs(300),
            "operator not ready after 300 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A `gpupool gateway` process for the benchmark (release build, no rate or in-flight limit
/// in the way); killed when dropped.
struct GatewayProcess {
    child: std::process::Child,
    url: String,
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start_gateway(ns: &str) -> GatewayProcess {
    let dir = support::state_dir().join("operator-logs");
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join(format!("{ns}-gateway.log"));
    let out = std::fs::File::create(&log).unwrap();
    let child = std::process::Command::new(support::operator_binary())
        .args([
            "gateway",
            &format!("--namespace={ns}"),
            "--http-addr=127.0.0.1:0",
            "--rate-per-client=1000000",
            "--max-in-flight-per-client=1000000",
        ])
        .env("RUST_LOG", "warn,gpupool=info")
        .stdout(std::process::Stdio::from(out.try_clone().unwrap()))
        .stderr(std::process::Stdio::from(out))
        .spawn()
        .expect("gateway starts");
    // Owned at once, so the process is killed and reaped on every path out of here.
    let mut gateway = GatewayProcess {
        child,
        url: String::new(),
    };
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if let Some(addr) = text
            .lines()
            .find(|l| l.contains("gpupool gateway listening"))
            .and_then(|l| l.split("addr=").nth(1))
            .and_then(|r| r.split_whitespace().next())
        {
            let url = format!("http://{addr}");
            if http()
                .get(format!("{url}/readyz"))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200)
            {
                gateway.url = url;
                return gateway;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the gateway did not start:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What a Kubernetes client without the gateway does: one watch on the namespace's jobs,
/// started once (as an informer would be), telling who waits on which job that it finished.
fn watch_finished(client: &Client, ns: &str) -> tokio::sync::broadcast::Sender<String> {
    let (tx, _) = tokio::sync::broadcast::channel(4096);
    let api: Api<VideoJob> = Api::namespaced(client.clone(), ns);
    let sender = tx.clone();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(watcher(api, watcher::Config::default()));
        while let Ok(Some(ev)) = stream.try_next().await {
            if let watcher::Event::Apply(j) | watcher::Event::InitApply(j) = ev
                && finished(&j)
            {
                let _ = sender.send(j.name_any());
            }
        }
    });
    tx
}

/// Creates the VideoJob directly and waits for the watch to see it finished. Seconds.
async fn direct_job(
    client: &Client,
    ns: &str,
    finished_jobs: &tokio::sync::broadcast::Sender<String>,
    name: &str,
) -> f64 {
    let api: Api<VideoJob> = Api::namespaced(client.clone(), ns);
    let mut rx = finished_jobs.subscribe();
    let t = Instant::now();
    let body: VideoJob = serde_json::from_value(json!({
        "apiVersion": "gpupool.dev/v1alpha1", "kind": "VideoJob", "metadata": {"name": name},
        "spec": {"pool": "bench", "operation": "caption", "input": {"simulate": {"seconds": 0}}}
    }))
    .unwrap();
    api.create(&PostParams::default(), &body).await.unwrap();
    while rx.recv().await.unwrap() != name {}
    t.elapsed().as_secs_f64()
}

/// One synchronous request through the gateway. Seconds.
async fn gateway_job(web: &reqwest::Client, url: &str) -> f64 {
    let t = Instant::now();
    let res = web
        .post(format!("{url}/video/caption?pool=bench"))
        .header("x-api-key", "bench-key")
        .json(&json!({"simulate": {"seconds": 0}}))
        .timeout(Duration::from_secs(120))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200, "{:?}", res.text().await);
    t.elapsed().as_secs_f64()
}

/// The gateway's overhead and throughput: a synchronous job on a warm machine through the
/// gateway against the same job created directly and watched (alternating, one at a time),
/// then what one replica sustains: synchronous jobs 32 at once on 10 warm machines, async
/// submissions (create only), and reads of a job (cache only).
async fn gateway(n: usize) {
    let ns = namespace_with_secrets("bench-gateway").await;
    let client = ns.client();
    let keys: k8s_openapi::api::core::v1::Secret = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "gpupool-gateway-keys"},
        "stringData": {"bench": "bench-key"}
    }))
    .unwrap();
    Api::<k8s_openapi::api::core::v1::Secret>::namespaced(client.clone(), &ns.name)
        .create(&PostParams::default(), &keys)
        .await
        .unwrap();
    let instances = 10;
    let sim = big_sim(4 * instances as u32).await;
    create_pool(
        &client,
        &ns.name,
        "bench",
        pool_spec(instances, instances, 3600),
    )
    .await;
    let op = start_operator(&ns.name, &sim, "gateway");
    wait_for_addr(&op).await;
    warm_up(&client, &ns.name, instances).await;
    let gw = start_gateway(&ns.name).await;
    let gw_pid = gw.child.id();
    // One HTTP client, keeping its connections, as an app would.
    let web = http();
    let finished_jobs = watch_finished(&client, &ns.name);
    tokio::time::sleep(Duration::from_millis(500)).await;

    let (mut via_gateway, mut direct) = (Vec::new(), Vec::new());
    for i in 0..n {
        let name = format!("direct-{i:05}");
        direct.push(direct_job(&client, &ns.name, &finished_jobs, &name).await);
        via_gateway.push(gateway_job(&web, &gw.url).await);
    }
    header(&format!(
        "gateway: a synchronous job on a warm machine (worker 0 s), {n} each, alternating"
    ));
    let (direct, via_gateway) = (sorted(direct), sorted(via_gateway));
    print_latency("create VideoJob + watch to finish", &direct);
    print_latency("POST /video/caption (sync)", &via_gateway);
    row(
        "gateway overhead",
        format!(
            "p50 {:+.1} ms  p99 {:+.1} ms",
            (pct(&via_gateway, 0.5) - pct(&direct, 0.5)) * 1e3,
            (pct(&via_gateway, 0.99) - pct(&direct, 0.99)) * 1e3
        ),
    );

    let (cpu0, _) = proc_usage(gw_pid);
    let (api0, _) = control_plane_cpu();
    let sync_n = n * 3;
    let t = Instant::now();
    futures::stream::iter(0..sync_n)
        .map(|_| gateway_job(&web, &gw.url))
        .buffer_unordered(32)
        .collect::<Vec<f64>>()
        .await;
    let sync_secs = t.elapsed().as_secs_f64();
    let (cpu1, rss) = proc_usage(gw_pid);
    let (api1, _) = control_plane_cpu();
    row(
        "sync jobs, 32 at once, 10 warm machines",
        format!(
            "{:.1} jobs/s  (gateway CPU {:.2} ms/job, kube-apiserver {:.2} ms/job)",
            sync_n as f64 / sync_secs,
            (cpu1 - cpu0) * 1e3 / sync_n as f64,
            (api1 - api0) * 1e3 / sync_n as f64
        ),
    );

    let t = Instant::now();
    let names: Vec<String> = futures::stream::iter(0..sync_n)
        .map(|_| {
            let (url, web) = (gw.url.clone(), web.clone());
            async move {
                let res = web
                    .post(format!("{url}/video/caption?pool=bench"))
                    .header("x-api-key", "bench-key")
                    .header("prefer", "respond-async")
                    .json(&json!({"simulate": {"seconds": 0}}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(res.status(), 202);
                res.headers()["x-gpupool-job"].to_str().unwrap().to_string()
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    row(
        "async submissions (Prefer: respond-async), 32 at once",
        format!(
            "{:.1} requests/s",
            sync_n as f64 / t.elapsed().as_secs_f64()
        ),
    );
    let reads = 20_000;
    let t = Instant::now();
    futures::stream::iter(0..reads)
        .map(|i| {
            let url = format!("{}/jobs/{}", gw.url, names[i % names.len()]);
            let web = web.clone();
            async move {
                let res = web
                    .get(url)
                    .header("x-api-key", "bench-key")
                    .send()
                    .await
                    .unwrap();
                assert_eq!(res.status(), 200);
            }
        })
        .buffer_unordered(32)
        .collect::<()>()
        .await;
    let (cpu2, rss2) = proc_usage(gw_pid);
    row(
        "GET /jobs/{name}, 32 at once",
        format!("{:.0} requests/s", reads as f64 / t.elapsed().as_secs_f64()),
    );
    row(
        "gateway process",
        format!(
            "peak RSS {:.1} MiB after the sync jobs, {:.1} MiB after the reads; CPU {:.1} s in all",
            rss, rss2, cpu2
        ),
    );
    drop(gw);
    drop(op);
    ns.cleanup().await;
}

#[tokio::main]
async fn main() {
    let wanted: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let run = |name: &str| wanted.is_empty() || wanted.iter().any(|w| w == name);
    if std::env::var_os("KUBECONFIG").is_none() {
        eprintln!(
            "the cluster benchmarks need the local control plane: hack/with-control-plane.sh cargo bench --features e2e --bench cluster"
        );
        std::process::exit(2);
    }
    let started = Instant::now();
    println!(
        "gpupool cluster benchmarks: real operator (release build), kube-apiserver + etcd on loopback, simulated providers; {} CPUs",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    if run("dispatch") {
        throughput("dispatch", env_usize("BENCH_JOBS", 2000), 10, 20.0, 0.5).await;
    }
    if run("warm") {
        // The dispatch overhead itself: a warm instance is free for nearly every job.
        throughput("warm", env_usize("BENCH_WARM_JOBS", 300), 10, 8.0, 0.5).await;
    }
    if run("burst") {
        throughput("burst", env_usize("BENCH_JOBS", 2000), 40, 0.0, 0.5).await;
    }
    if run("teardown") {
        // The default quota, then one that does not starve (what the quota costs is visible).
        let quotas = std::env::var("BENCH_TEARDOWN_QPS").unwrap_or_else(|_| "5,100".into());
        for qps in quotas.split(',').filter_map(|q| q.trim().parse().ok()) {
            teardown(env_usize("BENCH_TEARDOWN_INSTANCES", 200), qps).await;
        }
    }
    if run("scale") {
        scale(
            env_usize("BENCH_SCALE_JOBS", 10_000),
            env_usize("BENCH_SCALE_INSTANCES", 1000),
        )
        .await;
    }
    if run("gateway") {
        gateway(env_usize("BENCH_GATEWAY_JOBS", 100)).await;
    }
    println!("\ntotal {:.0} s", started.elapsed().as_secs_f64());
}
