//! Two replicas at once with leader election: one reconciles, every job runs once, no
//! machine is created twice; when the leader is SIGKILLed the other takes over; when the
//! leader is cut off from the API server it stops before the other takes over.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, api::ListParams};
use serde_json::json;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

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
    let fa = leader_flags(&ns.name, "replica-a");
    let fb = leader_flags(&ns.name, "replica-b");
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
    assert_one_machine_per_instance(&sim).await;
    ns.cleanup().await;
}

/// A TCP relay to kube-apiserver that can be frozen: once frozen it forwards nothing more
/// and closes nothing (packets dropped on a lost route look like this), so a request in
/// flight hangs instead of failing.
struct FreezableRelay {
    addr: std::net::SocketAddr,
    frozen: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl FreezableRelay {
    async fn start(target: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let frozen = Arc::new(AtomicBool::new(false));
        let f = frozen.clone();
        let task = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let (f, target) = (f.clone(), target.clone());
                tokio::spawn(async move {
                    let Ok(outbound) = TcpStream::connect(&target).await else {
                        return;
                    };
                    let (ri, wi) = inbound.into_split();
                    let (ro, wo) = outbound.into_split();
                    tokio::join!(pump(ri, wo, f.clone()), pump(ro, wi, f));
                });
            }
        });
        Self { addr, frozen, task }
    }

    fn freeze(&self) {
        self.frozen.store(true, Ordering::SeqCst);
    }
}

impl Drop for FreezableRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies one direction until the peer closes; once frozen, holds what it read and waits.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    frozen: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        while frozen.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// The leader loses its route to the API server while the standby keeps it. The leader must
/// stop (exit) once it could not renew for the renew deadline, before the standby may take
/// over: two leaders at once would mean two replicas renting and dispatching.
#[tokio::test]
async fn a_leader_cut_off_from_the_api_server_stops_before_the_standby_leads() {
    let ns = namespace_with_secrets("partition").await;
    let client = ns.client();
    let sim = sim().await;
    // Replica a reaches kube-apiserver through the relay, b directly.
    let kubeconfig = std::env::var("KUBECONFIG").expect("KUBECONFIG");
    let text = std::fs::read_to_string(&kubeconfig).unwrap();
    let server_line = text
        .lines()
        .find(|l| l.trim_start().starts_with("server:"))
        .expect("a server in the kubeconfig");
    let target = server_line
        .trim()
        .trim_start_matches("server:")
        .trim()
        .trim_start_matches("https://")
        .to_string();
    let relay = FreezableRelay::start(target.clone()).await;
    let relayed = std::env::temp_dir().join(format!("gpupool-partition-{}.kubeconfig", ns.name));
    std::fs::write(
        &relayed,
        text.replace(&target, &format!("127.0.0.1:{}", relay.addr.port())),
    )
    .unwrap();
    let relayed_path = relayed.to_string_lossy().to_string();
    let fa = leader_flags(&ns.name, "replica-a");
    let fb = leader_flags(&ns.name, "replica-b");
    let mut a = Operator::start_full(
        &ns.name,
        &sim,
        &fa.iter().map(String::as_str).collect::<Vec<_>>(),
        &[("KUBECONFIG", &relayed_path)],
        "a",
    );
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns.name);
    eventually(
        Duration::from_secs(30),
        "replica a to lead",
        Some(&a),
        || {
            let leases = leases.clone();
            async move { holder(&leases).await.filter(|h| h == "replica-a") }
        },
    )
    .await;
    let b = Operator::start_as(
        &ns.name,
        &sim,
        &fb.iter().map(String::as_str).collect::<Vec<_>>(),
        "b",
    );
    // b has seen the Lease held by a before the cut.
    eventually(
        Duration::from_secs(30),
        "replica b to stand by",
        Some(&b),
        || {
            let logs = b.logs();
            async move { logs.contains("gpupool listening").then_some(()) }
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;

    relay.freeze();
    let cut = Instant::now();
    let mut a_stopped = None;
    let mut b_leads = None;
    while cut.elapsed() < Duration::from_secs(40) && (a_stopped.is_none() || b_leads.is_none()) {
        if a_stopped.is_none() && a.exited() {
            a_stopped = Some(cut.elapsed());
        }
        if b_leads.is_none() && holder(&leases).await.as_deref() == Some("replica-b") {
            b_leads = Some(cut.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = std::fs::remove_file(&relayed);
    let a_stopped = a_stopped.unwrap_or_else(|| {
        panic!(
            "replica a kept running 40 s after losing the API server:\n{}",
            a.logs()
        )
    });
    let b_leads = b_leads.unwrap_or_else(|| panic!("replica b never led:\n{}", b.logs()));
    eprintln!(
        "partition: the cut-off leader exited {:.1} s after the cut, the standby led at {:.1} s",
        a_stopped.as_secs_f64(),
        b_leads.as_secs_f64()
    );
    assert!(
        a_stopped < b_leads,
        "two leaders: a exited at {a_stopped:?}, b led from {b_leads:?}"
    );
    assert!(
        a.logs().contains("lost the leader Lease"),
        "a exited for another reason:\n{}",
        a.logs()
    );

    // The new leader works.
    create_pool(&client, &ns.name, "default", vast_pool(30)).await;
    create_job(&client, &ns.name, "p-0", json!({"operation": "caption"})).await;
    let job = finished_job(&client, &ns.name, "p-0", Duration::from_secs(60), &b).await;
    assert_eq!(phase(&job), JobPhase::Succeeded, "{:?}", job.status);
    drop(b);
    ns.cleanup().await;
}
