//! The controller's promises, each against the real operator binary, the local control
//! plane and the simulator: the deadline race, crash safety, failover, serverless, worker
//! failures, limits, restarts, and the untouched 300 s default.

use std::time::{Duration, Instant};

use jiff::Timestamp;
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams},
};
use serde_json::{Value, json};

use gpupool::crd::{GpuInstance, GpuPool, InstancePhase, JobPhase, VideoJob};
use gpupool_sim::SimConfig;

use crate::operator::*;

fn ts(v: &Value) -> Option<Timestamp> {
    v.as_str()?.parse().ok()
}

async fn sim_instances(sim: &gpupool_sim::SimHandle) -> Vec<Value> {
    admin(sim, "state").await["instances"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

async fn alive(sim: &gpupool_sim::SimHandle) -> usize {
    sim_instances(sim)
        .await
        .iter()
        .filter(|i| i["alive"] == true)
        .count()
}

async fn instance_named(client: &kube::Client, ns: &str, name: &str) -> GpuInstance {
    Api::<GpuInstance>::namespaced(client.clone(), ns)
        .get(name)
        .await
        .unwrap()
}

/// A job created within a few hundred milliseconds of an instance's idle deadline either
/// wins the instance (and the teardown is refused) or goes elsewhere: it always completes,
/// on its first attempt, never on a destroyed machine.
#[tokio::test]
async fn deadline_race_never_loses_a_job_nor_uses_a_destroyed_machine() {
    let ns = namespace_with_secrets("race").await;
    let client = ns.client();
    let sim = sim().await;
    let op = Operator::start(&ns.name, &sim, &[]);
    create_pool(&client, &ns.name, "default", vast_pool(2)).await;
    let rounds = 20;
    let mut won = 0;
    for round in 0..rounds {
        let name = format!("warm-{round}");
        create_job(&client, &ns.name, &name, json!({"operation": "caption"})).await;
        let job = finished_job(&client, &ns.name, &name, Duration::from_secs(60), &op).await;
        assert_eq!(phase(&job), JobPhase::Succeeded, "{name}: {:?}", job.status);
        let inst = job.status.unwrap().instance.unwrap();
        // Wait for the instance to be idle with its deadline, then aim near it.
        let deadline = eventually(Duration::from_secs(10), "idle deadline", Some(&op), || {
            let client = client.clone();
            let (ns, inst) = (ns.name.clone(), inst.clone());
            async move {
                let gi = Api::<GpuInstance>::namespaced(client, &ns)
                    .get_opt(&inst)
                    .await
                    .ok()??;
                let s = gi.status?;
                if s.current_job.is_some() {
                    return None;
                }
                s.idle_deadline.map(|t| t.0)
            }
        })
        .await;
        // Offsets from -300 ms to +300 ms around the last moment a claim may be made (the
        // claim margin before the deadline: 500 ms for this 2 s idle timeout), spread over the
        // rounds. Past it the job rents a new machine; before it, it may take this one.
        let offset_ms = -300 + (600 * round as i64) / (rounds as i64 - 1);
        let aim = deadline
            .checked_sub(gpupool::controller::deadlines::claim_margin(2))
            .and_then(|t| t.checked_add(jiff::SignedDuration::from_millis(offset_ms)))
            .unwrap();
        let wait = Timestamp::now().duration_until(aim);
        if wait.is_positive() {
            tokio::time::sleep(wait.unsigned_abs()).await;
        }
        let racer = format!("racer-{round}");
        create_job(&client, &ns.name, &racer, json!({"operation": "caption"})).await;
        let job = finished_job(&client, &ns.name, &racer, Duration::from_secs(60), &op).await;
        let st = job.status.unwrap();
        assert_eq!(
            st.phase,
            Some(JobPhase::Succeeded),
            "{racer} (offset {offset_ms} ms): {st:?}"
        );
        assert_eq!(
            st.attempts, 1,
            "{racer} (offset {offset_ms} ms) needed a retry: {:?}",
            st.error
        );
        if st.instance.as_deref() == Some(inst.as_str()) {
            won += 1;
        }
        // Let everything idle out before the next round.
        eventually(Duration::from_secs(20), "pool empty", Some(&op), || {
            let sim = &sim;
            async move { (alive(sim).await == 0).then_some(()) }
        })
        .await;
    }
    // Every execution happened on a machine alive at the time: one per job, no repeats.
    let execs = admin(&sim, "executions").await;
    for (id, e) in execs["jobs"].as_object().unwrap() {
        assert_eq!(e["count"], 1, "X-Job-Id {id} executed {} times", e["count"]);
    }
    eprintln!("deadline race: {rounds} rounds, the racer took the warm instance in {won}");
    ns.cleanup().await;
}

/// Crash safety: the operator SIGKILLed right after the provider created a machine is
/// restarted and adopts it (no second create).
#[tokio::test]
async fn operator_killed_right_after_a_create_adopts_the_machine_on_restart() {
    let ns = namespace_with_secrets("crash").await;
    let client = ns.client();
    let mut config = SimConfig::fast();
    config.timing.provisioning_seconds = 1.0;
    let sim = sim_with(config).await;
    let mut op = Operator::start(&ns.name, &sim, &[]);
    create_pool(&client, &ns.name, "default", vast_pool(30)).await;
    create_job(
        &client,
        &ns.name,
        "crash-1",
        json!({"operation": "caption"}),
    )
    .await;
    let started = Instant::now();
    while sim_instances(&sim).await.is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no create reached the simulator"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    op.crash_and_restart(&ns.name, 1);
    let job = finished_job(&client, &ns.name, "crash-1", Duration::from_secs(60), &op).await;
    assert_eq!(phase(&job), JobPhase::Succeeded, "{:?}", job.status);
    let machines = sim_instances(&sim).await;
    assert_eq!(
        machines.len(),
        1,
        "a second machine was created: {machines:?}"
    );
    ns.cleanup().await;
}

/// A create that answers an error although the machine was made leaves no orphan: the
/// label lookup adopts it.
#[tokio::test]
async fn a_create_that_errors_but_creates_is_adopted_not_duplicated() {
    let ns = namespace_with_secrets("ghost").await;
    let client = ns.client();
    let sim = sim().await;
    admin_put(
        &sim,
        "faults",
        json!({"ghost_creates": {"vast.create": {"next": 1}}}),
    )
    .await;
    let op = Operator::start(&ns.name, &sim, &[]);
    create_pool(&client, &ns.name, "default", vast_pool(30)).await;
    create_job(
        &client,
        &ns.name,
        "ghost-1",
        json!({"operation": "caption"}),
    )
    .await;
    let job = finished_job(&client, &ns.name, "ghost-1", Duration::from_secs(60), &op).await;
    assert_eq!(phase(&job), JobPhase::Succeeded, "{:?}", job.status);
    let machines = sim_instances(&sim).await;
    assert_eq!(
        machines.len(),
        1,
        "expected the ghost to be adopted: {machines:?}"
    );
    ns.cleanup().await;
}

/// A GpuInstance whose finalizer is removed by hand disappears without a teardown; the
/// sweep finds its machine by label and destroys it.
#[tokio::test]
async fn the_sweep_destroys_a_machine_whose_instance_vanished() {
    let ns = namespace_with_secrets("orphan").await;
    let client = ns.client();
    let sim = sim().await;
    let mut op = Operator::start(&ns.name, &sim, &[]);
    create_pool(&client, &ns.name, "default", vast_pool(600)).await;
    create_job(&client, &ns.name, "o-1", json!({"operation": "caption"})).await;
    let job = finished_job(&client, &ns.name, "o-1", Duration::from_secs(60), &op).await;
    let inst = job.status.unwrap().instance.unwrap();
    let gis: Api<GpuInstance> = Api::namespaced(client.clone(), &ns.name);
    // With the operator down (it would put its finalizer back), remove the finalizer by hand
    // and delete the object: the machine is left behind with this cluster's label.
    op.kill();
    gis.patch(
        &inst,
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await
    .unwrap();
    gis.delete(&inst, &DeleteParams::default()).await.ok();
    assert_eq!(alive(&sim).await, 1, "the machine outlived its GpuInstance");
    op.crash_and_restart(&ns.name, 1);
    let removed = Instant::now();
    eventually(
        Duration::from_secs(30),
        "the sweep to destroy the orphan",
        Some(&op),
        || {
            let sim = &sim;
            async move { (alive(sim).await == 0).then_some(()) }
        },
    )
    .await;
    eprintln!(
        "orphan destroyed {:.1} s after its GpuInstance vanished",
        removed.elapsed().as_secs_f64()
    );
    // The sweep logs after the provider answered the destroy, so the line can trail the
    // simulator's state by a moment.
    eventually(
        Duration::from_secs(5),
        "the sweep's log line",
        Some(&op),
        || {
            let seen = op.logs().contains("destroyed an orphan machine");
            async move { seen.then_some(()) }
        },
    )
    .await;
    ns.cleanup().await;
}

/// The first provider is out of capacity: the next one runs the job and the pool shows the
/// back-off.
#[tokio::test]
async fn failover_to_the_next_provider_with_visible_back_off() {
    failover("failover", None).await;
}

/// The same over RunPod's GraphQL API, still selectable per entry until RunPod retires it:
/// the pool gets a DeprecatedApi warning, and the pods go through GraphQL, not REST v2.
#[tokio::test]
async fn failover_over_runpod_graphql_works_and_warns_it_is_deprecated() {
    failover("failover-gql", Some("GraphQL")).await;
}

/// A job on a pool whose Vast entry has no capacity lands on its RunPod entry, over `api`
/// (the default, REST v2, when `None`).
async fn failover(prefix: &str, api: Option<&str>) {
    let ns = namespace_with_secrets(prefix).await;
    let client = ns.client();
    let sim = sim().await;
    admin_put(
        &sim,
        "faults",
        json!({"exhausted": ["RTX 3060", "RTX 4090"]}),
    )
    .await;
    let op = Operator::start(&ns.name, &sim, &["--provider-backoff-seconds=60"]);
    let mut spec = vast_pool(30);
    spec["providers"].as_array_mut().unwrap().push(json!({
        "name": "rp", "runpod": {"gpuTypeIds": ["NVIDIA GeForce RTX 3090"], "cloudType": "COMMUNITY",
        "maxPricePerHour": "0.50", "credentialsSecretRef": {"name": "runpod", "key": "apiKey"}}
    }));
    if let Some(api) = api {
        spec["providers"][1]["runpod"]["api"] = json!(api);
    }
    create_pool(&client, &ns.name, "default", spec).await;
    create_job(&client, &ns.name, "f-1", json!({"operation": "caption"})).await;
    let job = finished_job(&client, &ns.name, "f-1", Duration::from_secs(60), &op).await;
    let st = job.status.unwrap();
    assert_eq!(st.phase, Some(JobPhase::Succeeded), "{st:?}");
    assert_eq!(st.provider.as_deref(), Some("rp"));
    let pools: Api<GpuPool> = Api::namespaced(client.clone(), &ns.name);
    let status = eventually(
        Duration::from_secs(10),
        "back-off in pool status",
        Some(&op),
        || {
            let pools = pools.clone();
            async move {
                let s = pools.get("default").await.ok()?.status?;
                let vast = s.providers.iter().find(|p| p.name == "vast")?.clone();
                (format!("{:?}", vast.state) == "BackingOff").then_some(vast)
            }
        },
    )
    .await;
    assert!(status.backoff_until.is_some() && status.message.unwrap().contains("capacity"));
    // The pods went through the API the entry names.
    let calls = admin(&sim, "calls").await;
    let used = |prefix: &str| {
        calls["counts"]
            .as_object()
            .unwrap()
            .keys()
            .any(|op| op.starts_with(prefix))
    };
    match api {
        Some("GraphQL") => {
            assert!(
                used("runpod.podFindAndDeployOnDemand") && !used("runpod.v2."),
                "{}",
                calls["counts"]
            );
            assert_event_reasons(&client, &ns.name, &["DeprecatedApi"]).await;
        }
        _ => assert!(
            used("runpod.v2.") && !used("runpod.podFindAndDeployOnDemand"),
            "{}",
            calls["counts"]
        ),
    }
    ns.cleanup().await;
}

/// Serverless: a job through run/status with the endpoint's output; deleting a running job
/// cancels it at the endpoint.
#[tokio::test]
async fn serverless_jobs_run_through_the_endpoint_and_deletion_cancels() {
    let ns = namespace_with_secrets("sls").await;
    let client = ns.client();
    let mut config = SimConfig::fast();
    for e in &mut config.endpoints {
        e.cold_start_seconds = 0.2;
    }
    let sim = sim_with(config).await;
    let op = Operator::start(&ns.name, &sim, &[]);
    create_pool(
        &client,
        &ns.name,
        "default",
        json!({
            "idleTimeoutSeconds": 30,
            "providers": [{"name": "sls", "runpodServerless": {"endpointId": "abc123xyz",
                           "credentialsSecretRef": {"name": "runpod", "key": "apiKey"}}}]
        }),
    )
    .await;
    create_job(
        &client,
        &ns.name,
        "s-1",
        json!({"operation": "caption", "input": {"videoUrl": "https://x/s.mp4"}}),
    )
    .await;
    let job = finished_job(&client, &ns.name, "s-1", Duration::from_secs(60), &op).await;
    let st = job.status.unwrap();
    assert_eq!(st.phase, Some(JobPhase::Succeeded), "{st:?}");
    assert!(st.remote_job_id.is_some());
    assert_eq!(st.output.unwrap()["operation"], "caption");
    // The endpoint's idle timeout and worker bounds follow the pool (manageEndpointSettings).
    let endpoint = eventually(
        Duration::from_secs(20),
        "endpoint settings synced",
        Some(&op),
        || {
            let sim = &sim;
            async move {
                let state = admin(sim, "state").await;
                let e = state["endpoints"]
                    .as_array()?
                    .iter()
                    .find(|e| e["id"] == "abc123xyz")?
                    .clone();
                (e["idle_timeout"] == 30).then_some(e)
            }
        },
    )
    .await;
    assert_eq!(
        (
            endpoint["workers_min"].clone(),
            endpoint["workers_max"].clone()
        ),
        (json!(0), json!(10)),
        "{endpoint}"
    );

    create_job(
        &client,
        &ns.name,
        "s-long",
        json!({"operation": "caption", "input": {"simulate": {"seconds": 60}}}),
    )
    .await;
    let jobs: Api<VideoJob> = Api::namespaced(client.clone(), &ns.name);
    let remote = eventually(
        Duration::from_secs(30),
        "s-long submitted",
        Some(&op),
        || {
            let jobs = jobs.clone();
            async move { jobs.get("s-long").await.ok()?.status?.remote_job_id }
        },
    )
    .await;
    jobs.delete("s-long", &DeleteParams::default())
        .await
        .unwrap();
    eventually(Duration::from_secs(30), "s-long gone", Some(&op), || {
        let jobs = jobs.clone();
        async move { jobs.get_opt("s-long").await.ok()?.is_none().then_some(()) }
    })
    .await;
    let state = admin(&sim, "state").await;
    let remote_job = state["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["id"] == remote.as_str())
        .cloned();
    assert_eq!(
        remote_job.as_ref().map(|j| j["status"].clone()),
        Some(json!("CANCELLED")),
        "{state}"
    );
    ns.cleanup().await;
}

/// 4xx fails at once; 5xx is retried up to maxRetries; a machine that dies mid-job has the
/// job retried on another machine.
#[tokio::test]
async fn worker_failures_fail_fast_retry_and_move_on() {
    let ns = namespace_with_secrets("fail").await;
    let client = ns.client();
    let sim = sim().await;
    let op = Operator::start(&ns.name, &sim, &[]);
    create_pool(&client, &ns.name, "default", vast_pool(30)).await;

    create_job(&client, &ns.name, "bad-input", json!({"operation": "caption", "input": {"simulate": {"status": 422, "error": "unreadable video"}}})).await;
    let job = finished_job(&client, &ns.name, "bad-input", Duration::from_secs(60), &op).await;
    let st = job.status.unwrap();
    assert_eq!(
        (st.phase, st.attempts),
        (Some(JobPhase::Failed), 1),
        "{st:?}"
    );
    assert!(st.error.unwrap().contains("unreadable video"));

    create_job(
        &client,
        &ns.name,
        "flaky",
        json!({"operation": "caption", "maxRetries": 2, "input": {"simulate": {"status": 503}}}),
    )
    .await;
    let job = finished_job(&client, &ns.name, "flaky", Duration::from_secs(60), &op).await;
    let st = job.status.unwrap();
    assert_eq!(
        (st.phase, st.attempts),
        (Some(JobPhase::Failed), 3),
        "{st:?}"
    );
    let uid = job.metadata.uid.clone().unwrap();
    let execs = admin(&sim, "executions").await;
    let attempts: Vec<&String> = execs["jobs"]
        .as_object()
        .unwrap()
        .keys()
        .filter(|k| k.starts_with(&uid))
        .collect();
    assert_eq!(
        attempts.len(),
        3,
        "three attempts, each with its own X-Job-Id: {attempts:?}"
    );

    admin_put(&sim, "faults", json!({"die_mid_job": {"next": 1}})).await;
    create_job(
        &client,
        &ns.name,
        "dies",
        json!({"operation": "caption", "maxRetries": 2}),
    )
    .await;
    let job = finished_job(&client, &ns.name, "dies", Duration::from_secs(60), &op).await;
    let st = job.status.unwrap();
    assert_eq!(
        (st.phase, st.attempts),
        (Some(JobPhase::Succeeded), 2),
        "{st:?}"
    );
    let machines = sim_instances(&sim).await;
    assert!(
        machines.iter().any(|m| !m["died_at"].is_null()),
        "one machine died: {machines:?}"
    );
    // The dead machine is not left billing.
    eventually(
        Duration::from_secs(20),
        "dead machine destroyed",
        Some(&op),
        || {
            let sim = &sim;
            async move {
                let m = sim_instances(sim).await;
                m.iter()
                    .filter(|m| !m["died_at"].is_null())
                    .all(|m| m["alive"] == false)
                    .then_some(())
            }
        },
    )
    .await;
    ns.cleanup().await;
}

/// maxInstances and maxHourlySpend hold under a burst; every job still completes.
#[tokio::test]
async fn limits_hold_under_a_burst() {
    let ns = namespace_with_secrets("limits").await;
    let client = ns.client();
    let mut config = SimConfig::fast();
    config.timing.default_operation_seconds = 0.5;
    let sim = sim_with(config).await;
    let op = Operator::start(&ns.name, &sim, &[]);
    let mut spec = vast_pool(5);
    spec["maxInstances"] = json!(2);
    create_pool(&client, &ns.name, "default", spec).await;
    let mut spend = vast_pool(5);
    spend["providers"][0]["vast"]["maxPricePerHour"] = json!("0.10");
    spend["maxHourlySpend"] = json!("0.30");
    create_pool(&client, &ns.name, "cheap", spend).await;
    for i in 0..6 {
        create_job(
            &client,
            &ns.name,
            &format!("burst-{i}"),
            json!({"operation": "caption"}),
        )
        .await;
        create_job(
            &client,
            &ns.name,
            &format!("cheap-{i}"),
            json!({"operation": "caption", "pool": "cheap"}),
        )
        .await;
    }
    let mut peak_default = 0;
    let mut peak_cheap = 0;
    let gis: Api<GpuInstance> = Api::namespaced(client.clone(), &ns.name);
    let jobs: Api<VideoJob> = Api::namespaced(client.clone(), &ns.name);
    let start = Instant::now();
    loop {
        let list = gis.list(&ListParams::default()).await.unwrap();
        peak_default = peak_default.max(
            list.items
                .iter()
                .filter(|i| i.spec.pool == "default")
                .count(),
        );
        peak_cheap = peak_cheap.max(list.items.iter().filter(|i| i.spec.pool == "cheap").count());
        let done = jobs
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .iter()
            .filter(|j| phase(j).is_finished())
            .count();
        if done == 12 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "jobs did not finish; {}",
            op.logs()
                .lines()
                .rev()
                .take(30)
                .collect::<Vec<_>>()
                .join("\n")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for j in jobs.list(&ListParams::default()).await.unwrap() {
        assert_eq!(
            phase(&j),
            JobPhase::Succeeded,
            "{}: {:?}",
            j.name_any(),
            j.status
        );
    }
    eprintln!(
        "peak instances: {peak_default} (maxInstances 2), {peak_cheap} (0.30 USD/h at 0.10 each)"
    );
    assert!(peak_default <= 2, "maxInstances exceeded: {peak_default}");
    assert!(
        peak_cheap <= 3,
        "maxHourlySpend exceeded: {peak_cheap} instances"
    );
    ns.cleanup().await;
}

/// Warm instances survive an operator restart, with the deadlines they had.
#[tokio::test]
async fn warm_instances_survive_a_restart_with_their_deadlines() {
    let ns = namespace_with_secrets("restart").await;
    let client = ns.client();
    let sim = sim().await;
    let mut op = Operator::start(&ns.name, &sim, &[]);
    create_pool(&client, &ns.name, "default", vast_pool(6)).await;
    create_job(&client, &ns.name, "r-1", json!({"operation": "caption"})).await;
    let job = finished_job(&client, &ns.name, "r-1", Duration::from_secs(60), &op).await;
    let inst = job.status.unwrap().instance.unwrap();
    let deadline = eventually(Duration::from_secs(10), "idle", Some(&op), || {
        let client = client.clone();
        let (ns, inst) = (ns.name.clone(), inst.clone());
        async move {
            let s = Api::<GpuInstance>::namespaced(client, &ns)
                .get(&inst)
                .await
                .ok()?
                .status?;
            s.current_job.is_none().then_some(s.idle_deadline?.0)
        }
    })
    .await;
    op.crash_and_restart(&ns.name, 1);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let gi = instance_named(&client, &ns.name, &inst).await;
    assert_eq!(
        gi.status.as_ref().unwrap().phase,
        Some(InstancePhase::Ready),
        "survived the restart"
    );
    assert_eq!(
        gi.status.unwrap().idle_deadline.unwrap().0,
        deadline,
        "deadline unchanged"
    );
    final_state(&client, &ns.name, &inst, Duration::from_secs(20)).await;
    let machine = sim_instances(&sim).await.into_iter().next().unwrap();
    let destroyed = ts(&machine["destroyed_at"]).unwrap();
    let late = destroyed.duration_since(deadline).as_secs_f64();
    eprintln!("after restart, idle teardown lateness: {late:.3} s");
    assert!(
        (0.0..=1.0).contains(&late),
        "destroyed {late:.3} s from the deadline"
    );
    ns.cleanup().await;
}

/// The default, untouched: 300 s after the last job the machine is still there at 295 s and
/// gone by 302 s (by the simulator's destroy timestamp).
#[tokio::test]
async fn default_idle_timeout_is_300_seconds() {
    let ns = namespace_with_secrets("default300").await;
    let client = ns.client();
    let sim = sim().await;
    let op = Operator::start(&ns.name, &sim, &[]);
    let mut spec = vast_pool(300);
    spec.as_object_mut().unwrap().remove("idleTimeoutSeconds");
    let pool = create_pool(&client, &ns.name, "default", spec).await;
    assert_eq!(pool.spec.idle_timeout_seconds, 300);
    create_job(&client, &ns.name, "d-1", json!({"operation": "caption"})).await;
    let job = finished_job(&client, &ns.name, "d-1", Duration::from_secs(60), &op).await;
    let finished = job.status.unwrap().finished_at.unwrap().0;
    let at_295 = finished
        .checked_add(jiff::SignedDuration::from_secs(295))
        .unwrap();
    tokio::time::sleep(Timestamp::now().duration_until(at_295).unsigned_abs()).await;
    let machines = sim_instances(&sim).await;
    assert_eq!(machines.len(), 1);
    assert_eq!(
        machines[0]["alive"], true,
        "destroyed before 295 s: {machines:?}"
    );
    let at_302 = finished
        .checked_add(jiff::SignedDuration::from_secs(302))
        .unwrap();
    tokio::time::sleep(Timestamp::now().duration_until(at_302).unsigned_abs()).await;
    let machine = sim_instances(&sim).await.into_iter().next().unwrap();
    assert_eq!(machine["alive"], false, "still alive at 302 s: {machine}");
    let destroyed = ts(&machine["destroyed_at"]).unwrap();
    let after = destroyed.duration_since(finished).as_secs_f64();
    eprintln!("default idle timeout: destroyed {after:.3} s after the job finished");
    assert!(
        (300.0..=301.0).contains(&after),
        "destroyed {after:.3} s after the last job"
    );
    ns.cleanup().await;
}

/// What only the operator can detect becomes a condition and an event, never a crash: an
/// unknown pool, a missing Secret, a teardown the provider keeps refusing (retried until it
/// works, the finalizer held meanwhile). Finished jobs go after ttlSecondsAfterFinished.
#[tokio::test]
async fn bad_references_and_failing_teardowns_are_reported_and_survived() {
    let ns = namespace_with_secrets("refs").await;
    let client = ns.client();
    let sim = sim().await;
    let op = Operator::start(&ns.name, &sim, &[]);
    let jobs: Api<VideoJob> = Api::namespaced(client.clone(), &ns.name);

    create_job(
        &client,
        &ns.name,
        "lost",
        json!({"operation": "caption", "pool": "nope"}),
    )
    .await;
    let reason = eventually(
        Duration::from_secs(20),
        "PoolNotFound condition",
        Some(&op),
        || {
            let jobs = jobs.clone();
            async move {
                let s = jobs.get("lost").await.ok()?.status?;
                s.conditions
                    .iter()
                    .find(|c| c.type_ == "Scheduled")
                    .map(|c| c.reason.clone())
            }
        },
    )
    .await;
    assert_eq!(reason, "PoolNotFound");

    let mut spec = vast_pool(2);
    spec["providers"][0]["vast"]["credentialsSecretRef"]["name"] = json!("missing-secret");
    spec["providers"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "vast-ok", "vast": {"gpuNames": ["RTX 3060"],
        "maxPricePerHour": "1.00", "credentialsSecretRef": {"name": "vast", "key": "apiKey"}}}));
    create_pool(&client, &ns.name, "default", spec).await;
    // The provider will refuse the first six destroys (the client retries three times per call) (used at the end of this test).
    admin_put(
        &sim,
        "faults",
        json!({"errors": {"vast.destroy": {"next": 6, "status": 500}}}),
    )
    .await;
    create_job(
        &client,
        &ns.name,
        "ttl",
        json!({"operation": "caption", "ttlSecondsAfterFinished": 1}),
    )
    .await;
    let job = finished_job(&client, &ns.name, "ttl", Duration::from_secs(60), &op).await;
    assert_eq!(
        phase(&job),
        JobPhase::Succeeded,
        "the second provider ran it: {:?}",
        job.status
    );
    assert_eq!(
        job.status.as_ref().unwrap().provider.as_deref(),
        Some("vast-ok")
    );
    let pools: Api<GpuPool> = Api::namespaced(client.clone(), &ns.name);
    let vast = pools
        .get("default")
        .await
        .unwrap()
        .status
        .unwrap()
        .providers
        .into_iter()
        .find(|p| p.name == "vast")
        .unwrap();
    assert_eq!(format!("{:?}", vast.state), "Unavailable");
    assert!(
        vast.message.unwrap().contains("Secret"),
        "the message names the missing Secret"
    );
    eventually(
        Duration::from_secs(20),
        "the TTL to delete the job",
        Some(&op),
        || {
            let jobs = jobs.clone();
            async move { jobs.get_opt("ttl").await.ok()?.is_none().then_some(()) }
        },
    )
    .await;

    // The provider refuses the destroy six times: the finalizer holds, the condition says
    // so, then it succeeds and the machine is gone.
    let inst = job.status.unwrap().instance.unwrap();
    let gis: Api<GpuInstance> = Api::namespaced(client.clone(), &ns.name);
    eventually(
        Duration::from_secs(30),
        "TeardownFailing condition",
        Some(&op),
        || {
            let gis = gis.clone();
            let inst = inst.clone();
            async move {
                let s = gis.get_opt(&inst).await.ok()??.status?;
                s.conditions
                    .iter()
                    .any(|c| c.type_ == "TeardownFailing" && c.status == "True")
                    .then_some(())
            }
        },
    )
    .await;
    final_state(&client, &ns.name, &inst, Duration::from_secs(60)).await;
    assert_eq!(alive(&sim).await, 0, "the machine was destroyed in the end");
    assert_event_reasons(
        &client,
        &ns.name,
        &[
            "PoolNotFound",
            "ProviderUnavailable",
            "TeardownFailing",
            "Destroyed",
        ],
    )
    .await;
    ns.cleanup().await;
}

/// The other references only the operator can check: a provider Secret without the key, a
/// provider key that is empty, a worker API key Secret that does not exist, and a job pinned
/// to a provider the pool does not have. Each becomes a condition and an event naming what
/// is wrong; no machine is rented while it cannot be used; the jobs run once it is fixed.
#[tokio::test]
async fn missing_keys_and_unknown_providers_are_conditions_not_crashes() {
    let ns = namespace_with_secrets("refkeys").await;
    let client = ns.client();
    let sim = sim().await;
    let mut op = Operator::start(&ns.name, &sim, &[]);
    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(client.clone(), &ns.name);
    for (name, data) in [
        ("no-key", json!({"other": "x"})),
        ("empty-key", json!({"apiKey": ""})),
    ] {
        let s = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": name},
            "stringData": data
        }))
        .unwrap();
        secrets
            .create(&kube::api::PostParams::default(), &s)
            .await
            .unwrap();
    }
    // Pool "keys": its only provider's Secret lacks the key. Pool "empty": the key is empty.
    // Pool "worker": providers fine, the worker API key Secret missing.
    let mut keys = vast_pool(2);
    keys["providers"][0]["vast"]["credentialsSecretRef"]["name"] = json!("no-key");
    create_pool(&client, &ns.name, "keys", keys).await;
    let mut empty = vast_pool(2);
    empty["providers"][0]["vast"]["credentialsSecretRef"]["name"] = json!("empty-key");
    create_pool(&client, &ns.name, "empty", empty).await;
    let mut worker = vast_pool(2);
    worker["worker"]["apiKeySecretRef"]["name"] = json!("worker-key-missing");
    create_pool(&client, &ns.name, "worker", worker).await;
    create_pool(&client, &ns.name, "default", vast_pool(2)).await;

    for (job, spec) in [
        ("k", json!({"operation": "caption", "pool": "keys"})),
        ("e", json!({"operation": "caption", "pool": "empty"})),
        ("w", json!({"operation": "caption", "pool": "worker"})),
        (
            "pin",
            json!({"operation": "caption", "provider": "runpod-nope"}),
        ),
    ] {
        create_job(&client, &ns.name, job, spec).await;
    }
    let jobs: Api<VideoJob> = Api::namespaced(client.clone(), &ns.name);
    let pools: Api<GpuPool> = Api::namespaced(client.clone(), &ns.name);
    let gis: Api<GpuInstance> = Api::namespaced(client.clone(), &ns.name);
    let condition = |name: &'static str| {
        let jobs = jobs.clone();
        async move {
            let s = jobs.get(name).await.ok()?.status?;
            let c = s.conditions.iter().find(|c| c.type_ == "Scheduled")?;
            (c.status == "False").then(|| (c.reason.clone(), c.message.clone()))
        }
    };
    let (reason, message) = eventually(Duration::from_secs(20), "job k waiting", Some(&op), || {
        condition("k")
    })
    .await;
    assert_eq!(reason, "NoProviderAvailable", "{message}");
    let (reason, message) = eventually(
        Duration::from_secs(20),
        "job pin waiting",
        Some(&op),
        || condition("pin"),
    )
    .await;
    assert_eq!(reason, "UnknownProvider");
    assert!(message.contains("runpod-nope"), "{message}");
    // Each broken pool says why its provider is unavailable. The worker key: a machine
    // could not be given it, so none is rented and no instance is created.
    for (pool, wanted) in [
        ("keys", &["has no key apiKey"][..]),
        ("empty", &["is empty"][..]),
        ("worker", &["worker API key", "worker-key-missing"][..]),
    ] {
        let message = eventually(
            Duration::from_secs(20),
            "the provider marked unavailable",
            Some(&op),
            || {
                let pools = pools.clone();
                async move {
                    let p = pools
                        .get(pool)
                        .await
                        .ok()?
                        .status?
                        .providers
                        .into_iter()
                        .next()?;
                    (format!("{:?}", p.state) == "Unavailable").then_some(p.message?)
                }
            },
        )
        .await;
        for w in wanted {
            assert!(message.contains(w), "{pool}: {message}");
        }
    }
    let (reason, _) = eventually(Duration::from_secs(20), "job w waiting", Some(&op), || {
        condition("w")
    })
    .await;
    assert_eq!(reason, "NoProviderAvailable");
    // Over two back-off periods: nothing rented, no instance created for the broken pools.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(sim_instances(&sim).await.len(), 0, "a machine was rented");
    assert!(!op.exited(), "the operator crashed");
    let instances_now = gis.list(&ListParams::default()).await.unwrap().items.len();
    assert_eq!(instances_now, 0, "instances created that could only fail");

    // Fixed: every waiting job runs (the pinned job is deleted: it can never run).
    for name in ["no-key", "empty-key"] {
        secrets
            .patch(
                name,
                &PatchParams::apply("gpupool-e2e").force(),
                &Patch::Apply(json!({
                    "apiVersion": "v1", "kind": "Secret", "metadata": {"name": name},
                    "stringData": {"apiKey": VAST_KEY}
                })),
            )
            .await
            .unwrap();
    }
    let s = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "worker-key-missing"},
        "stringData": {"apiKey": WORKER_KEY}
    }))
    .unwrap();
    secrets
        .create(&kube::api::PostParams::default(), &s)
        .await
        .unwrap();
    for name in ["k", "e", "w"] {
        let job = finished_job(&client, &ns.name, name, Duration::from_secs(90), &op).await;
        assert_eq!(phase(&job), JobPhase::Succeeded, "{name}: {:?}", job.status);
    }
    let pin = jobs.get("pin").await.unwrap();
    assert_eq!(phase(&pin), JobPhase::Pending);
    assert_event_reasons(
        &client,
        &ns.name,
        &[
            "NoProviderAvailable",
            "UnknownProvider",
            "ProviderUnavailable",
        ],
    )
    .await;
    ns.cleanup().await;
}

/// Dispatch overhead on a warm instance: from the job's creation to the moment the attempt is
/// sent, over 20 jobs one after another. Printed, not asserted (a benchmark, not a timed test).
#[tokio::test]
async fn dispatch_overhead_on_a_warm_instance_is_measured() {
    let ns = namespace_with_secrets("overhead").await;
    let client = ns.client();
    let sim = sim().await;
    let op = Operator::start(&ns.name, &sim, &[]);
    create_pool(&client, &ns.name, "default", vast_pool(60)).await;
    create_job(&client, &ns.name, "warmup", json!({"operation": "caption"})).await;
    let warm = finished_job(&client, &ns.name, "warmup", Duration::from_secs(60), &op).await;
    let warm_instance = warm.status.unwrap().instance.unwrap();
    let mut overheads = Vec::new();
    for i in 0..20 {
        let name = format!("o-{i}");
        let t0 = Timestamp::now();
        create_job(&client, &ns.name, &name, json!({"operation": "caption"})).await;
        let job = finished_job(&client, &ns.name, &name, Duration::from_secs(30), &op).await;
        let st = job.status.unwrap();
        assert_eq!(
            st.instance.as_deref(),
            Some(warm_instance.as_str()),
            "ran on the warm instance"
        );
        overheads.push(t0.duration_until(st.started_at.unwrap().0).as_secs_f64() * 1000.0);
        // Wait until the instance is free again so each job finds it warm and idle.
        eventually(Duration::from_secs(10), "instance idle", Some(&op), || {
            let client = client.clone();
            let (ns, inst) = (ns.name.clone(), warm_instance.clone());
            async move {
                let s = Api::<GpuInstance>::namespaced(client, &ns)
                    .get(&inst)
                    .await
                    .ok()?
                    .status?;
                s.current_job.is_none().then_some(())
            }
        })
        .await;
    }
    overheads.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let p = |q: f64| overheads[((overheads.len() as f64 - 1.0) * q).round() as usize];
    eprintln!(
        "dispatch overhead on a warm instance (creation to request, 20 jobs): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        p(0.5),
        p(0.99),
        overheads.last().unwrap()
    );
    let addr = op.http_addr().expect("the operator logged its address");
    let metrics = metrics_at(&addr).await;
    for name in [
        "gpupool_instances",
        "gpupool_jobs_total",
        "gpupool_job_wait_seconds",
        "gpupool_idle_teardown_lateness_seconds",
        "gpupool_provider_calls_total",
        "gpupool_spend_dollars_per_hour",
    ] {
        assert!(metrics.contains(name), "{name} missing from /metrics");
    }
    let ready = http()
        .get(format!("http://{addr}/readyz"))
        .send()
        .await
        .unwrap();
    assert!(ready.status().is_success());
    ns.cleanup().await;
}

/// An interruptible machine outbid in the middle of a job: the job runs again on another
/// machine and succeeds although it allows no retry (a preemption is not its fault), the
/// preemption is recorded on the job, in an event and in gpupool_preemptions_total, the
/// outbid machine is destroyed, and the bill of every machine equals the operator's
/// accounting.
#[tokio::test]
async fn an_outbid_interruptible_machine_is_replaced_and_its_job_spends_no_retry() {
    let ns = namespace_with_secrets("spot").await;
    let client = ns.client();
    let mut config = SimConfig::fast();
    config.timing.operations.insert("transcode".into(), 6.0);
    let sim = sim_with(config).await;
    let op = Operator::start(&ns.name, &sim, &[]);
    let mut spec = vast_pool(2);
    spec["providers"][0]["capacityType"] = json!("Interruptible");
    spec["providers"][0]["vast"]["bidPerHour"] = json!("0.05");
    create_pool(&client, &ns.name, "default", spec).await;
    create_job(
        &client,
        &ns.name,
        "spot-job",
        json!({"operation": "transcode", "maxRetries": 0}),
    )
    .await;

    // Outbid its machine while the job runs there.
    let jobs: Api<VideoJob> = Api::namespaced(client.clone(), &ns.name);
    let first = eventually(
        Duration::from_secs(60),
        "the job running",
        Some(&op),
        || {
            let jobs = jobs.clone();
            async move {
                let s = jobs.get("spot-job").await.ok()?.status?;
                (s.phase == Some(JobPhase::Running)).then_some(s.instance?)
            }
        },
    )
    .await;
    let gi = instance_named(&client, &ns.name, &first).await;
    assert_eq!(
        gi.spec.capacity_type,
        gpupool::crd::CapacityType::Interruptible
    );
    let machine = gi.status.unwrap().provider_instance_id.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let outbid = http()
        .post(format!("{}/admin/instances/{machine}/kill", sim.base_url))
        .json(&json!({"when": "outbid"}))
        .send()
        .await
        .unwrap();
    assert!(outbid.status().is_success());

    let job = finished_job(&client, &ns.name, "spot-job", Duration::from_secs(90), &op).await;
    let st = job.status.unwrap();
    assert_eq!(
        (st.phase, st.attempts, st.preemptions),
        (Some(JobPhase::Succeeded), 2, 1),
        "{st:?}"
    );
    assert_ne!(
        st.instance.as_deref(),
        Some(first.as_str()),
        "it ran elsewhere"
    );

    // Every machine destroyed (the outbid one at once, the other at its idle deadline), and
    // billed what the operator accounted.
    eventually(
        Duration::from_secs(60),
        "every machine destroyed",
        Some(&op),
        || {
            let sim = &sim;
            async move { (alive(sim).await == 0).then_some(()) }
        },
    )
    .await;
    let addr = op.http_addr().expect("the operator's address");
    let machines = sim_instances(&sim).await;
    assert_eq!(machines.len(), 2, "{machines:?}");
    let billed: f64 = machines.iter().map(|m| m["cost"].as_f64().unwrap()).sum();
    let price: f64 = machines[0]["price_per_hour"].as_f64().unwrap();
    assert_eq!(price, 0.05, "billed at the bid");
    let metrics = eventually(
        Duration::from_secs(10),
        "both costs counted",
        Some(&op),
        || {
            let addr = addr.clone();
            async move {
                let m = metrics_at(&addr).await;
                let spent: f64 = m
                    .lines()
                    .filter(|l| l.starts_with("gpupool_spend_dollars_total"))
                    .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
                    .sum();
                ((billed - spent).abs() <= billed * 0.01 + 1e-6).then_some(m)
            }
        },
    )
    .await;
    let preemptions: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("gpupool_preemptions_total"))
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .sum();
    assert_eq!(preemptions, 1.0, "{metrics}");
    assert_event_reasons(&client, &ns.name, &["Preempted", "Destroyed"]).await;
    ns.cleanup().await;
}
