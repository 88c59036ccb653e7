//! Control-plane faults: etcd stalls (SIGSTOP) and kube-apiserver is SIGKILLed and started
//! again while jobs arrive, briefly and for half a minute each. The operator must recover by
//! itself, finish every job, run none twice (a leader that had to step down may send an
//! attempt again, with the same `X-Job-Id`) and leave no machine behind. Each test runs its
//! own control plane, so the other tests never see the outage.

use std::{
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::Namespace;
use kube::{
    Api, Client, ResourceExt,
    api::{ListParams, PostParams},
};
use serde_json::json;

use gpupool::crd::{JobPhase, VideoJob};
use gpupool_sim::SimHandle;

use crate::{operator::*, support};

/// A control plane of the test's own, stopped (by its recorded pids) when dropped.
struct OwnControlPlane {
    dir: PathBuf,
}

impl OwnControlPlane {
    fn start(name: &str) -> Self {
        let dir = crate::support::state_dir()
            .join(format!("control-plane-{name}-{}", std::process::id()));
        let cp = Self { dir };
        cp.script(&["start"]);
        cp
    }

    fn script(&self, action: &[&str]) {
        let out = Command::new(support::repo_root().join("hack/control-plane.sh"))
            .args(action)
            .arg(&self.dir)
            .output()
            .expect("control-plane.sh runs");
        assert!(
            out.status.success(),
            "control-plane.sh {action:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("{}", String::from_utf8_lossy(&out.stderr).trim());
    }

    fn kubeconfig(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }

    fn signal_etcd(&self, signal: &str) {
        let pid = std::fs::read_to_string(self.dir.join("etcd.pid")).unwrap();
        let ok = Command::new("kill")
            .args([signal, pid.trim()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {signal} etcd");
    }
}

impl Drop for OwnControlPlane {
    fn drop(&mut self) {
        let _ = Command::new(support::repo_root().join("hack/control-plane.sh"))
            .arg("stop")
            .arg(&self.dir)
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Creates a job, retrying while the control plane is down (as a user's kubectl would).
async fn create_job_patiently(client: &Client, ns: &str, name: &str, seconds: f64) {
    let api: Api<VideoJob> = Api::namespaced(client.clone(), ns);
    let job: VideoJob = serde_json::from_value(json!({
        "apiVersion": "gpupool.dev/v1alpha1", "kind": "VideoJob", "metadata": {"name": name},
        "spec": {"operation": "caption", "input": {"simulate": {"seconds": seconds}}}
    }))
    .unwrap();
    let start = Instant::now();
    loop {
        match api.create(&PostParams::default(), &job).await {
            Ok(_) => return,
            Err(kube::Error::Api(s)) if s.code == 409 => return, // an earlier try got through
            Err(e) => {
                assert!(
                    start.elapsed() < Duration::from_secs(90),
                    "cannot create {name}: {e}"
                );
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }
}

/// A control plane of the test's own with the CRDs, a namespace with the Secrets and a Vast
/// pool of at most 6 machines (idle timeout 6 s), and the simulator.
struct Setup {
    cp: OwnControlPlane,
    client: Client,
    ns: String,
    kubeconfig: String,
    sim: SimHandle,
}

async fn setup(prefix: &str) -> Setup {
    let mut pool = vast_pool(6);
    pool["maxInstances"] = json!(6);
    setup_with(prefix, pool, gpupool_sim::SimConfig::fast()).await
}

async fn setup_with(
    prefix: &str,
    pool: serde_json::Value,
    sim_config: gpupool_sim::SimConfig,
) -> Setup {
    let cp = OwnControlPlane::start(prefix);
    let kubeconfig = cp.kubeconfig();
    for args in [
        &[
            "apply",
            "--server-side",
            "--field-manager=gpupool-e2e",
            "-f",
            "crds/",
        ][..],
        &[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/gpupools.gpupool.dev",
            "crd/gpuinstances.gpupool.dev",
            "crd/videojobs.gpupool.dev",
        ][..],
    ] {
        let out = support::kubectl_with(&kubeconfig, args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let client = support::client_from(&kubeconfig).await;
    let ns = format!("{prefix}-{}", std::process::id());
    let namespace: Namespace = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}
    }))
    .unwrap();
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &namespace)
        .await
        .unwrap();
    create_secrets(&client, &ns).await;
    create_pool(&client, &ns, "default", pool).await;
    let sim = sim_with(sim_config).await;
    let kubeconfig = kubeconfig.to_string_lossy().to_string();
    Setup {
        cp,
        client,
        ns,
        kubeconfig,
        sim,
    }
}

/// Creates `jobs` jobs, one every 500 ms from `start`, each running `seconds` on its worker.
fn create_jobs(s: &Setup, jobs: u64, seconds: f64, start: Instant) -> tokio::task::JoinHandle<()> {
    let (client, ns) = (s.client.clone(), s.ns.clone());
    tokio::spawn(async move {
        for i in 0..jobs {
            tokio::time::sleep_until((start + Duration::from_millis(500 * i)).into()).await;
            create_job_patiently(&client, &ns, &format!("f-{i:02}"), seconds).await;
        }
    })
}

/// What the end of a run shows: every job finished, how often each was executed, and the
/// machines (all destroyed once the idle timeout has passed).
struct Outcome {
    finished_in: f64,
    /// Executions of each job's first attempt (`X-Job-Id` `{uid}-0`), by job name.
    executions: Vec<(String, u64)>,
    machines: usize,
}

/// Waits for every job and then for every machine to be destroyed, restarting the operator
/// (as its Deployment would) whenever it exits, if `supervise`.
async fn finish(
    s: &Setup,
    op: &mut Operator,
    jobs: u64,
    start: Instant,
    supervise: Option<&mut u32>,
) -> Outcome {
    let api: Api<VideoJob> = Api::namespaced(s.client.clone(), &s.ns);
    let mut restarts = supervise;
    let all = poll_supervised(
        op,
        &s.ns,
        restarts.as_deref_mut(),
        Duration::from_secs(240),
        "every job to finish",
        || {
            let api = api.clone();
            async move {
                let list = api.list(&ListParams::default()).await.ok()?.items;
                (list.len() == jobs as usize && list.iter().all(|j| phase(j).is_finished()))
                    .then_some(list)
            }
        },
    )
    .await;
    let finished_in = start.elapsed().as_secs_f64();
    let failed: Vec<_> = all
        .iter()
        .filter(|j| phase(j) != JobPhase::Succeeded)
        .map(|j| (j.name_any(), j.status.clone()))
        .collect();
    assert!(failed.is_empty(), "{failed:?}");
    let executions = admin(&s.sim, "executions").await;
    let executions = all
        .iter()
        .map(|j| {
            let uid = j.uid().unwrap_or_default();
            let n = executions["jobs"][format!("{uid}-0")]["count"]
                .as_u64()
                .unwrap_or(0);
            (j.name_any(), n)
        })
        .collect();
    poll_supervised(
        op,
        &s.ns,
        restarts,
        Duration::from_secs(90),
        "every machine destroyed after the last job",
        || async {
            let bill = admin(&s.sim, "bill").await;
            bill["instances"]
                .as_array()?
                .iter()
                .all(|i| i["alive"] == json!(false))
                .then_some(())
        },
    )
    .await;
    let machines = assert_one_machine_per_instance(&s.sim).await;
    Outcome {
        finished_in,
        executions,
        machines,
    }
}

/// Polls `check` until it gives a value, restarting the operator (as its Deployment would)
/// whenever it exits, if `supervise`; fails with the log tail after `timeout`.
async fn poll_supervised<T, F, Fut>(
    op: &mut Operator,
    ns: &str,
    mut supervise: Option<&mut u32>,
    timeout: Duration,
    what: &str,
    mut check: F,
) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(r) = supervise.as_deref_mut() {
            restart_if_exited(op, ns, r);
        }
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}; operator log tail:\n{}",
            op.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn restart_if_exited(op: &mut Operator, ns: &str, restarts: &mut u32) {
    if op.exited() {
        *restarts += 1;
        op.crash_and_restart(ns, *restarts);
    }
}

/// Sleeps until `until`, restarting the operator whenever it exits, if `supervise`.
async fn wait_until(op: &mut Operator, ns: &str, until: Instant, mut supervise: Option<&mut u32>) {
    while Instant::now() < until {
        if let Some(r) = supervise.as_deref_mut() {
            restart_if_exited(op, ns, r);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_operator_recovers_from_an_etcd_stall_and_an_api_server_restart() {
    let s = setup("cpfaults").await;
    let mut op = Operator::start_with_env(&s.ns, &s.sim, &[], &[("KUBECONFIG", &s.kubeconfig)]);

    let jobs = 24;
    let start = Instant::now();
    let creator = create_jobs(&s, jobs, 0.3, start);
    // etcd stalls for 5 s from t=3 s; kube-apiserver dies at t=10 s and starts again.
    tokio::time::sleep_until((start + Duration::from_secs(3)).into()).await;
    s.cp.signal_etcd("-STOP");
    tokio::time::sleep(Duration::from_secs(5)).await;
    s.cp.signal_etcd("-CONT");
    tokio::time::sleep_until((start + Duration::from_secs(10)).into()).await;
    let restart = Instant::now();
    s.cp.script(&["restart-apiserver"]);
    let restart_took = restart.elapsed().as_secs_f64();
    creator.await.unwrap();

    let out = finish(&s, &mut op, jobs, start, None).await;
    assert!(!op.exited(), "the operator exited:\n{}", op.logs());
    let twice: Vec<_> = out.executions.iter().filter(|(_, n)| *n != 1).collect();
    eprintln!(
        "control-plane faults: {jobs} jobs finished {:.1} s after the first (etcd stopped 5 s, \
         kube-apiserver restart took {restart_took:.1} s); executed other than once: {twice:?}; \
         {} machines rented, none alive",
        out.finished_in, out.machines
    );
    assert!(
        twice.is_empty(),
        "jobs not executed exactly once: {twice:?}"
    );
}

/// Half a minute of etcd stalled, then half a minute with no kube-apiserver at all, while
/// 2 s jobs run on up to 6 machines and more arrive. Alone (the default), the operator rides
/// it out and runs every job exactly once. With leader election it must step down within
/// its renew deadline (it cannot prove it still holds the Lease) and exits; restarted like
/// a Deployment would, it leads again once the API server answers, and an attempt whose
/// outcome it could not record is sent again with the same `X-Job-Id`: at most once more
/// per exit.
async fn long_outage(leader_elect: bool) {
    let s = setup(if leader_elect { "longha" } else { "longout" }).await;
    let flags = if leader_elect {
        leader_flags(&s.ns, "gpupool-0")
    } else {
        vec![]
    };
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let mut op = Operator::start_with_env(&s.ns, &s.sim, &flags, &[("KUBECONFIG", &s.kubeconfig)]);
    let mut restarts = 0u32;
    let mut supervise = leader_elect.then_some(&mut restarts);

    let jobs = 16;
    let start = Instant::now();
    let creator = create_jobs(&s, jobs, 2.0, start);
    wait_until(
        &mut op,
        &s.ns,
        start + Duration::from_secs(3),
        supervise.as_deref_mut(),
    )
    .await;
    s.cp.signal_etcd("-STOP");
    wait_until(
        &mut op,
        &s.ns,
        start + Duration::from_secs(33),
        supervise.as_deref_mut(),
    )
    .await;
    s.cp.signal_etcd("-CONT");
    wait_until(
        &mut op,
        &s.ns,
        start + Duration::from_secs(38),
        supervise.as_deref_mut(),
    )
    .await;
    s.cp.script(&["stop-apiserver"]);
    wait_until(
        &mut op,
        &s.ns,
        start + Duration::from_secs(68),
        supervise.as_deref_mut(),
    )
    .await;
    s.cp.script(&["start-apiserver"]);
    let back = start.elapsed().as_secs_f64();
    creator.await.unwrap();

    let out = finish(&s, &mut op, jobs, start, supervise).await;
    let repeats: u64 = out
        .executions
        .iter()
        .map(|(_, n)| n.saturating_sub(1))
        .sum();
    let never: Vec<_> = out.executions.iter().filter(|(_, n)| *n == 0).collect();
    eprintln!(
        "long outage ({}): etcd stopped t=3..33 s, no kube-apiserver t=38..68 s (ready again at \
         {back:.1} s); {jobs} jobs Succeeded {:.1} s after the first; operator exits {restarts}; \
         attempts sent again {repeats}; {} machines, none alive",
        if leader_elect {
            "leader election, restarted on exit"
        } else {
            "one operator"
        },
        out.finished_in,
        out.machines
    );
    assert!(
        never.is_empty(),
        "jobs whose first attempt never ran: {never:?}"
    );
    if leader_elect {
        assert!(
            restarts >= 1,
            "the leader never stepped down in a 30 s outage"
        );
        let too_many: Vec<_> = out
            .executions
            .iter()
            .filter(|(_, n)| *n > 1 + u64::from(restarts))
            .collect();
        assert!(
            too_many.is_empty(),
            "sent again more than once per exit: {too_many:?}"
        );
    } else {
        assert!(!op.exited(), "the operator exited:\n{}", op.logs());
        let twice: Vec<_> = out.executions.iter().filter(|(_, n)| *n != 1).collect();
        assert!(
            twice.is_empty(),
            "jobs not executed exactly once: {twice:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_operator_rides_out_half_a_minute_without_etcd_and_without_kube_apiserver() {
    long_outage(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leader_steps_down_in_a_long_outage_and_leads_again_after_it() {
    long_outage(true).await;
}

/// Issue 17: a machine whose idle deadline passes while kube-apiserver is stopped is destroyed
/// at the provider at its deadline all the same; its GpuInstance goes, and its cost is
/// recorded once, when the API server is back. One operator, 60 s without kube-apiserver.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_machines_are_destroyed_on_time_while_kube_apiserver_is_down() {
    let mut config = gpupool_sim::SimConfig::fast();
    for o in &mut config.vast_offers {
        o.capacity = 10;
    }
    // Long enough an idle timeout for 20 machines to be rented and used on a busy machine
    // before the first deadline.
    let mut pool = vast_pool(45);
    pool["maxInstances"] = json!(20);
    let s = setup_with("outage-idle", pool, config).await;
    let mut op = Operator::start_with_env(
        &s.ns,
        &s.sim,
        &["--provider-qps=50"],
        &[("KUBECONFIG", &s.kubeconfig)],
    );
    // 20 jobs at once, of different lengths, so the deadlines spread out.
    for i in 0..20 {
        create_job(
            &s.client,
            &s.ns,
            &format!("o-{i}"),
            json!({"operation": "caption", "input": {"simulate": {"seconds": 0.5 + f64::from(i) * 0.3}}}),
        )
        .await;
    }
    let jobs: Api<VideoJob> = Api::namespaced(s.client.clone(), &s.ns);
    let gis: Api<gpupool::crd::GpuInstance> = Api::namespaced(s.client.clone(), &s.ns);
    // Every job done and every machine idle with its deadline: what the operator knows when
    // the API server goes away.
    let deadlines: Vec<(String, String, jiff::Timestamp)> = poll_supervised(
        &mut op,
        &s.ns,
        None,
        Duration::from_secs(120),
        "every job done and every machine idle",
        || {
            let (jobs, gis) = (jobs.clone(), gis.clone());
            async move {
                let js = jobs.list(&ListParams::default()).await.ok()?.items;
                let done = js
                    .iter()
                    .filter(|j| phase(j) == JobPhase::Succeeded)
                    .count();
                let is = gis.list(&ListParams::default()).await.ok()?.items;
                let idle: Vec<_> = is
                    .iter()
                    .filter_map(|i| {
                        let st = i.status.as_ref()?;
                        st.current_job.is_none().then_some(())?;
                        Some((
                            i.name_any(),
                            st.provider_instance_id.clone()?,
                            st.idle_deadline.as_ref()?.0,
                        ))
                    })
                    .collect();
                (done == 20 && !idle.is_empty() && idle.len() == is.len()).then_some(idle)
            }
        },
    )
    .await;
    let first = deadlines.iter().map(|d| d.2).min().unwrap();
    let last = deadlines.iter().map(|d| d.2).max().unwrap();
    s.cp.script(&["stop-apiserver"]);
    let stopped = jiff::Timestamp::now();
    assert!(
        stopped < first,
        "kube-apiserver stopped after the first deadline ({first}); the test is too slow here"
    );
    // Watch the simulator while the API server is away.
    let mut destroyed: std::collections::BTreeMap<String, jiff::Timestamp> = Default::default();
    let until = Instant::now() + Duration::from_secs(60);
    while Instant::now() < until {
        let state = admin(&s.sim, "state").await;
        for i in state["instances"].as_array().unwrap() {
            if let Some(at) = i["destroyed_at"].as_str() {
                destroyed
                    .entry(i["id"].as_str().unwrap().to_string())
                    .or_insert_with(|| at.parse().unwrap());
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    s.cp.script(&["start-apiserver"]);
    assert!(!op.exited(), "the operator exited:\n{}", op.logs());
    assert!(
        last < jiff::Timestamp::now(),
        "the last deadline ({last}) is after the outage"
    );
    let mut worst = 0.0f64;
    for (name, machine, deadline) in &deadlines {
        let at = destroyed.get(machine).unwrap_or_else(|| {
            panic!(
                "{name}'s machine {machine} was not destroyed while the API server was down:\n{}",
                op.log_tail()
            )
        });
        let late = at.duration_since(*deadline).as_secs_f64();
        assert!(
            late >= 0.0,
            "{name} destroyed {late:.3} s before its deadline"
        );
        assert!(
            late <= 1.0,
            "{name} destroyed {late:.3} s after its deadline"
        );
        worst = worst.max(late);
    }
    // Back: every GpuInstance goes, each destroy recorded once, the bill equal to the accounting.
    poll_supervised(
        &mut op,
        &s.ns,
        None,
        // The watches come back with back-off after a minute's outage (up to 30 s), then relist.
        Duration::from_secs(180),
        "every GpuInstance deleted after the outage",
        || {
            let gis = gis.clone();
            async move {
                gis.list(&ListParams::default())
                    .await
                    .ok()?
                    .items
                    .is_empty()
                    .then_some(())
            }
        },
    )
    .await;
    let events: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(s.client.clone(), &s.ns);
    let destroyed_events = events
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some("Destroyed"))
        .map(|e| e.involved_object.name.unwrap_or_default())
        .collect::<Vec<_>>();
    for (name, _, _) in &deadlines {
        assert_eq!(
            destroyed_events.iter().filter(|n| *n == name).count(),
            1,
            "Destroyed events of {name}: {destroyed_events:?}"
        );
    }
    let bill = admin(&s.sim, "bill").await;
    let billed = bill["by_provider"]["vast"].as_f64().unwrap();
    let addr = op.http_addr().unwrap();
    let spent: f64 = metrics_at(&addr)
        .await
        .lines()
        .filter(|l| l.starts_with("gpupool_spend_dollars_total"))
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .sum();
    assert!(
        (billed - spent).abs() <= billed * 0.01 + 1e-6,
        "bill {billed} vs gpupool_spend_dollars_total {spent}"
    );
    eprintln!(
        "outage teardown: {} machines idle, kube-apiserver stopped {:.1} s before the first \
         deadline for 60 s; each destroyed at the simulator at most {worst:.3} s after its \
         deadline; bill {billed:.6} vs accounted {spent:.6} USD",
        deadlines.len(),
        first.duration_since(stopped).as_secs_f64()
    );
}
