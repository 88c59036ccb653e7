//! Two replicas at once with leader election: one reconciles, every job runs once, no
//! machine is created twice; when the leader is SIGKILLed the other takes over.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, api::ListParams};
use serde_json::json;

use gpupool::crd::{JobPhase, VideoJob};

use crate::operator::*;

async fn holder(leases: &Api<Lease>) -> Option<String> {
    leases
        .get_opt("gpupool-leader")
        .await
        .ok()??
        .spec?
        .holder_identity
}

#[tokio::test]
async fn two_replicas_run_every_job_once_and_fail_over_when_the_leader_dies() {
    let ns = namespace_with_secrets("replicas").await;
    let client = ns.client();
    let sim = sim().await;
    let flags = |name: &str| {
        vec![
            "--leader-elect".to_string(),
            format!("--leader-election-namespace={}", ns.name),
            format!("--pod-name={name}"),
        ]
    };
    let fa = flags("replica-a");
    let fb = flags("replica-b");
    let mut a = Operator::start_as(
        &ns.name,
        &sim,
        &fa.iter().map(String::as_str).collect::<Vec<_>>(),
        "a",
    );
    let mut b = Operator::start_as(
        &ns.name,
        &sim,
        &fb.iter().map(String::as_str).collect::<Vec<_>>(),
        "b",
    );
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns.name);
    let leader = eventually(Duration::from_secs(30), "a leader", Some(&a), || {
        let leases = leases.clone();
        async move { holder(&leases).await }
    })
    .await;

    create_pool(&client, &ns.name, "default", vast_pool(30)).await;
    for i in 0..8 {
        create_job(
            &client,
            &ns.name,
            &format!("r-{i}"),
            json!({"operation": "caption"}),
        )
        .await;
    }
    for i in 0..8 {
        let op = if leader == "replica-a" { &a } else { &b };
        let job = finished_job(
            &client,
            &ns.name,
            &format!("r-{i}"),
            Duration::from_secs(60),
            op,
        )
        .await;
        assert_eq!(phase(&job), JobPhase::Succeeded, "{:?}", job.status);
    }

    // Kill the leader; the other takes the Lease and carries on.
    let killed = Instant::now();
    let standby = if leader == "replica-a" {
        a.kill();
        &b
    } else {
        b.kill();
        &a
    };
    let new_leader = eventually(
        Duration::from_secs(40),
        "the standby to lead",
        Some(standby),
        || {
            let leases = leases.clone();
            let old = leader.clone();
            async move { holder(&leases).await.filter(|h| *h != old) }
        },
    )
    .await;
    let failover = killed.elapsed().as_secs_f64();
    for i in 8..11 {
        create_job(
            &client,
            &ns.name,
            &format!("r-{i}"),
            json!({"operation": "caption"}),
        )
        .await;
    }
    for i in 8..11 {
        let job = finished_job(
            &client,
            &ns.name,
            &format!("r-{i}"),
            Duration::from_secs(60),
            standby,
        )
        .await;
        assert_eq!(phase(&job), JobPhase::Succeeded, "{:?}", job.status);
    }
    eprintln!("leader {leader} killed; {new_leader} took the Lease after {failover:.1} s");

    // Every job ran exactly once (one X-Job-Id per job, executed once).
    let execs = admin(&sim, "executions").await;
    let jobs: Api<VideoJob> = Api::namespaced(client.clone(), &ns.name);
    for j in jobs.list(&ListParams::default()).await.unwrap() {
        let uid = j.metadata.uid.clone().unwrap();
        let runs: u64 = execs["jobs"]
            .as_object()
            .unwrap()
            .iter()
            .filter(|(k, _)| k.starts_with(&uid))
            .map(|(_, v)| v["count"].as_u64().unwrap())
            .sum();
        assert_eq!(runs, 1, "job {:?} ran {runs} times", j.metadata.name);
    }
    // No machine was created twice for the same GpuInstance.
    let state = admin(&sim, "state").await;
    let mut labels: HashMap<String, usize> = HashMap::new();
    for m in state["instances"].as_array().unwrap() {
        *labels
            .entry(m["label"].as_str().unwrap_or_default().to_string())
            .or_default() += 1;
    }
    assert!(
        labels.values().all(|n| *n == 1),
        "duplicate creates: {labels:?}"
    );
    ns.cleanup().await;
}
