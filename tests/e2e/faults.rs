//! Control-plane faults: etcd stalls (SIGSTOP for a few seconds) and kube-apiserver is
//! SIGKILLed and started again while jobs arrive. The operator must recover by itself (no
//! restart), finish every job, run none twice and leave no machine behind. The test runs
//! its own control plane, so the other tests never see the outage.

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

use crate::{operator::*, support};

/// A control plane of the test's own, stopped (by its recorded pids) when dropped.
struct OwnControlPlane {
    dir: PathBuf,
}

impl OwnControlPlane {
    fn start() -> Self {
        let dir = PathBuf::from(
            std::env::var("GPUPOOL_STATE")
                .unwrap_or_else(|_| format!("{}/.state", env!("CARGO_MANIFEST_DIR"))),
        )
        .join(format!("control-plane-faults-{}", std::process::id()));
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
async fn create_job_patiently(client: &Client, ns: &str, name: &str) {
    let api: Api<VideoJob> = Api::namespaced(client.clone(), ns);
    let job: VideoJob = serde_json::from_value(json!({
        "apiVersion": "gpupool.dev/v1alpha1", "kind": "VideoJob", "metadata": {"name": name},
        "spec": {"operation": "caption", "input": {"simulate": {"seconds": 0.3}}}
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_operator_recovers_from_an_etcd_stall_and_an_api_server_restart() {
    let cp = OwnControlPlane::start();
    let kubeconfig = cp.kubeconfig();
    let out = support::kubectl_with(
        &kubeconfig,
        &[
            "apply",
            "--server-side",
            "--field-manager=gpupool-e2e",
            "-f",
            "crds/",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = support::kubectl_with(
        &kubeconfig,
        &[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/gpupools.gpupool.dev",
            "crd/gpuinstances.gpupool.dev",
            "crd/videojobs.gpupool.dev",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let client = support::client_from(&kubeconfig).await;
    let ns = format!("cpfaults-{}", std::process::id());
    let namespace: Namespace = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}
    }))
    .unwrap();
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &namespace)
        .await
        .unwrap();
    create_secrets(&client, &ns).await;
    create_pool(&client, &ns, "default", vast_pool(6)).await;
    let sim = sim().await;
    let kc = kubeconfig.to_string_lossy().to_string();
    let mut op = Operator::start_with_env(&ns, &sim, &[], &[("KUBECONFIG", &kc)]);

    let jobs = 24;
    let start = Instant::now();
    let creator = {
        let (client, ns) = (client.clone(), ns.clone());
        tokio::spawn(async move {
            for i in 0..jobs {
                tokio::time::sleep_until((start + Duration::from_millis(500 * i)).into()).await;
                create_job_patiently(&client, &ns, &format!("f-{i:02}")).await;
            }
        })
    };
    // etcd stalls for 5 s from t=3 s; kube-apiserver dies at t=10 s and starts again.
    tokio::time::sleep_until((start + Duration::from_secs(3)).into()).await;
    cp.signal_etcd("-STOP");
    tokio::time::sleep(Duration::from_secs(5)).await;
    cp.signal_etcd("-CONT");
    tokio::time::sleep_until((start + Duration::from_secs(10)).into()).await;
    let restart = Instant::now();
    cp.script(&["restart-apiserver"]);
    let restart_took = restart.elapsed().as_secs_f64();
    creator.await.unwrap();

    let api: Api<VideoJob> = Api::namespaced(client.clone(), &ns);
    let all = eventually(
        Duration::from_secs(180),
        "every job to finish",
        Some(&op),
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
    assert!(!op.exited(), "the operator exited:\n{}", op.logs());
    let failed: Vec<_> = all
        .iter()
        .filter(|j| phase(j) != JobPhase::Succeeded)
        .map(|j| (j.name_any(), j.status.clone()))
        .collect();
    assert!(failed.is_empty(), "{failed:?}");
    let executions = admin(&sim, "executions").await;
    let twice: Vec<String> = all
        .iter()
        .filter(|j| {
            let uid = j.uid().unwrap_or_default();
            executions["jobs"][format!("{uid}-0")]["count"].as_u64() != Some(1)
        })
        .map(|j| j.name_any())
        .collect();
    // Machines: destroyed after the 6 s idle timeout, none left at the provider.
    eventually(
        Duration::from_secs(60),
        "every machine destroyed",
        Some(&op),
        || {
            let sim = &sim;
            async move {
                let bill = admin(sim, "bill").await;
                bill["instances"]
                    .as_array()?
                    .iter()
                    .all(|i| i["alive"] == json!(false))
                    .then_some(())
            }
        },
    )
    .await;
    let machines = admin(&sim, "bill").await["instances"]
        .as_array()
        .unwrap()
        .len();
    eprintln!(
        "control-plane faults: {jobs} jobs finished {finished_in:.1} s after the first (etcd stopped 5 s, \
         kube-apiserver restart took {restart_took:.1} s); executed other than once: {twice:?}; \
         {machines} machines rented, none alive"
    );
    assert!(
        twice.is_empty(),
        "jobs not executed exactly once: {twice:?}"
    );
    drop(op);
}
