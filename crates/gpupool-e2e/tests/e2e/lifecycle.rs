//! The job life cycle through the real operator binary: provision, Ready, dispatch, output,
//! warm reuse, idle teardown at the deadline, and the simulator's bill against the
//! operator's accounting.

use std::time::Duration;

use jiff::Timestamp;
use kube::Api;
use rust_decimal::Decimal;
use serde_json::json;

use gpupool::crd::{GpuInstance, InstancePhase, JobPhase};

use crate::operator::*;

fn ts(v: &serde_json::Value) -> Timestamp {
    v.as_str().unwrap().parse().unwrap()
}

#[tokio::test]
async fn a_job_on_an_empty_pool_runs_then_its_instance_is_reused_and_destroyed_at_the_deadline() {
    let ns = namespace_with_secrets("life").await;
    let client = ns.client();
    let sim = sim().await;
    let op = Operator::start(&ns.name, &sim, &[]);
    create_pool(&client, &ns.name, "default", vast_pool(4)).await;

    create_job(
        &client,
        &ns.name,
        "cap-1",
        json!({"operation": "caption", "input": {"videoUrl": "https://x/1.mp4"}}),
    )
    .await;
    let job = finished_job(&client, &ns.name, "cap-1", Duration::from_secs(60), &op).await;
    let st = job.status.clone().unwrap();
    assert_eq!(st.phase, Some(JobPhase::Succeeded), "job: {st:?}");
    let output = st.output.clone().unwrap();
    assert_eq!(output["operation"], "caption", "output: {output}");
    assert_eq!(st.attempts, 1);
    let instance = st.instance.clone().unwrap();

    // Warm reuse: a second job inside the window runs on the same machine, no new create.
    let gis: Api<GpuInstance> = Api::namespaced(client.clone(), &ns.name);
    let first_deadline = gis
        .get(&instance)
        .await
        .unwrap()
        .status
        .unwrap()
        .idle_deadline
        .unwrap()
        .0;
    create_job(
        &client,
        &ns.name,
        "cap-2",
        json!({"operation": "caption", "input": {"videoUrl": "https://x/2.mp4"}}),
    )
    .await;
    let job2 = finished_job(&client, &ns.name, "cap-2", Duration::from_secs(30), &op).await;
    assert_eq!(
        job2.status.as_ref().unwrap().phase,
        Some(JobPhase::Succeeded)
    );
    assert_eq!(
        job2.status.as_ref().unwrap().instance.as_deref(),
        Some(instance.as_str()),
        "reused the warm instance"
    );
    // The job's outcome is written before the instance is freed: wait for the release.
    let gst = eventually(
        Duration::from_secs(10),
        "instance released",
        Some(&op),
        || {
            let gis = gis.clone();
            let instance = instance.clone();
            async move {
                let s = gis.get(&instance).await.ok()?.status?;
                s.current_job.is_none().then_some(s)
            }
        },
    )
    .await;
    assert_eq!(gst.jobs_completed, 2);
    let deadline = gst.idle_deadline.unwrap().0;
    assert!(
        deadline > first_deadline,
        "the deadline moved: {first_deadline} -> {deadline}"
    );
    let state = admin(&sim, "state").await;
    assert_eq!(
        state["instances"].as_array().unwrap().len(),
        1,
        "one create only: {state}"
    );

    // While it is idle, the metrics the alerts and the dashboard read show it and its deadline.
    let addr = op.http_addr().expect("the operator's address");
    let pool = [("namespace", ns.name.as_str()), ("pool", "default")];
    let idle_at = eventually(
        Duration::from_secs(10),
        "the idle deadline in /metrics",
        Some(&op),
        || {
            let addr = addr.clone();
            let labels = [pool[0], pool[1], ("gpuinstance", instance.as_str())];
            async move {
                let m = metrics_at(&addr).await;
                let at = sample(
                    &m,
                    "gpupool_instance_idle_deadline_timestamp_seconds",
                    &labels,
                )?;
                (sample(
                    &m,
                    "gpupool_jobs_by_phase",
                    &[pool[0], pool[1], ("phase", "Succeeded")],
                ) == Some(2.0))
                .then_some((at, m))
            }
        },
    )
    .await;
    let (at, m) = idle_at;
    assert!(
        (at - deadline.as_millisecond() as f64 / 1000.0).abs() < 0.002,
        "deadline {deadline} vs metric {at}"
    );
    assert_eq!(sample(&m, "gpupool_idle_instances", &pool), Some(1.0));
    assert_eq!(sample(&m, "gpupool_leader", &[]), Some(1.0));
    let vast = [pool[0], pool[1], ("provider", "vast")];
    for (state, want) in [
        ("Available", 1.0),
        ("BackingOff", 0.0),
        ("Unavailable", 0.0),
    ] {
        let labels = [vast[0], vast[1], vast[2], ("state", state)];
        assert_eq!(
            sample(&m, "gpupool_provider_state", &labels),
            Some(want),
            "{state}"
        );
    }

    // Teardown at the deadline: not before, within a second after.
    let last = final_state(&client, &ns.name, &instance, Duration::from_secs(30)).await;
    let state = admin(&sim, "state").await;
    let machine = &state["instances"][0];
    assert_eq!(machine["alive"], false, "{state}");
    let destroyed = ts(&machine["destroyed_at"]);
    let late = destroyed.duration_since(deadline).as_secs_f64();
    eprintln!("idle teardown lateness: {late:.3} s (deadline {deadline}, destroyed {destroyed})");
    assert!(late >= 0.0, "destroyed {late:.3} s before the deadline");
    assert!(late <= 1.0, "destroyed {late:.3} s after the deadline");

    // The bill matches the operator's accounting within 1%.
    let billed: f64 = machine["cost"].as_f64().unwrap();
    let accrued: Decimal = last.status.as_ref().unwrap().accrued_cost.unwrap().amount();
    let accrued: f64 = accrued.try_into().unwrap();
    eprintln!("simulator bill {billed:.6} USD, operator accrued {accrued:.6} USD");
    assert!(
        (billed - accrued).abs() <= billed * 0.01 + 1e-6,
        "bill {billed} vs accrued {accrued}"
    );
    assert_eq!(
        last.status.unwrap_or_default().phase,
        Some(InstancePhase::Terminating)
    );
    // So does the spend metric, counted once although the finalizer may run twice.
    let metrics = metrics_at(&addr).await;
    let spent: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("gpupool_spend_dollars_total"))
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .sum();
    assert!(
        (billed - spent).abs() <= billed * 0.01 + 1e-6,
        "bill {billed} vs gpupool_spend_dollars_total {spent}"
    );
    // Gone, it is no longer idle: its deadline series is removed, not left to look overdue.
    eventually(
        Duration::from_secs(10),
        "the idle deadline removed from /metrics",
        Some(&op),
        || {
            let addr = addr.clone();
            async move {
                let m = metrics_at(&addr).await;
                (!m.contains("gpupool_instance_idle_deadline_timestamp_seconds{")
                    && sample(&m, "gpupool_idle_instances", &pool) == Some(0.0))
                .then_some(())
            }
        },
    )
    .await;
    ns.cleanup().await;
}
