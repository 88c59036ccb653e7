//! Worker secrets from `worker.env` `valueFrom.secretKeyRef`: the value reaches the rented
//! machine and nothing else (no status, event or log line), a missing Secret or key rents
//! nothing and says which, and the API server refuses an entry with both a value and a
//! `valueFrom` (that case is a fixture of `validation.rs`).

use std::time::Duration;

use kube::{
    Api, Client, ResourceExt,
    api::{ListParams, Patch, PatchParams},
};
use serde_json::{Value, json};

use gpupool::crd::{GpuInstance, GpuPool, JobPhase, VideoJob};
use gpupool_sim::SimHandle;

use crate::operator::*;

/// The Vast machines of the simulator as the Vast API shows them to the account (the same
/// `GET /api/v0/instances/` the `vastai` CLI uses): each row's `extra_env` is the machine's
/// environment, as on Vast.ai itself.
async fn vast_machines(sim: &SimHandle) -> Vec<Value> {
    let answer: Value = http()
        .get(format!("{}/api/v0/instances/", sim.base_url))
        .bearer_auth(VAST_KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    answer["instances"].as_array().cloned().unwrap_or_default()
}

/// The value of `name` in a Vast row's `extra_env` (a list of `[name, value]` pairs).
fn env_of<'a>(row: &'a Value, name: &str) -> Option<&'a str> {
    row["extra_env"]
        .as_array()?
        .iter()
        .find(|pair| pair[0] == name)?[1]
        .as_str()
}

/// A pool with one Vast entry whose worker gets `env`, with a health path of its own.
fn pool_with_env(env: Value) -> Value {
    let mut spec = vast_pool(3);
    spec["worker"]["healthPath"] = json!("/v1/ready");
    spec["worker"]["env"] = env;
    spec
}

fn s3_env(secret: &str, key: &str) -> Value {
    json!([
        {"name": "LOG_LEVEL", "value": "debug"},
        {"name": "S3_SECRET_KEY", "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}},
    ])
}

/// Everything a user or a log collector can see of namespace `ns`: every operator log of
/// the namespace, its events, and its pools, jobs and instances, as one text.
async fn everything_shown(client: &Client, ns: &str, op: &Operator) -> String {
    let mut shown = op.logs();
    let events = Api::<k8s_openapi::api::core::v1::Event>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await
        .unwrap()
        .items;
    shown.push_str(&serde_json::to_string(&events).unwrap());
    let lp = ListParams::default();
    let pools = Api::<GpuPool>::namespaced(client.clone(), ns)
        .list(&lp)
        .await;
    shown.push_str(&serde_json::to_string(&pools.unwrap().items).unwrap());
    let jobs = Api::<VideoJob>::namespaced(client.clone(), ns)
        .list(&lp)
        .await;
    shown.push_str(&serde_json::to_string(&jobs.unwrap().items).unwrap());
    let gis = Api::<GpuInstance>::namespaced(client.clone(), ns)
        .list(&lp)
        .await;
    shown.push_str(&serde_json::to_string(&gis.unwrap().items).unwrap());
    shown
}

/// A worker secret from a Secret key is in the environment of the machine the job ran on
/// (with the operator's GPUPOOL_WORKER_HEALTH_PATH), and in no log line, event or status.
#[tokio::test]
async fn a_worker_env_secret_reaches_the_machine_and_nothing_else() {
    let ns = namespace_with_secrets("wsecret").await;
    let client = ns.client();
    let value = format!("s3-secret-{:016x}", rand::random::<u64>());
    create_secret(&client, &ns.name, "s3", json!({"secretKey": value})).await;
    let sim = sim().await;
    let op = Operator::start(&ns.name, &sim, &[]);
    create_pool(
        &client,
        &ns.name,
        "default",
        pool_with_env(s3_env("s3", "secretKey")),
    )
    .await;
    create_job(&client, &ns.name, "j", json!({"operation": "caption"})).await;

    // The machine, while it is there (from its create until its idle teardown).
    let machine = eventually(
        Duration::from_secs(30),
        "a machine with the worker's env",
        Some(&op),
        || {
            let sim = &sim;
            async move {
                vast_machines(sim)
                    .await
                    .into_iter()
                    .find(|m| env_of(m, "S3_SECRET_KEY").is_some())
            }
        },
    )
    .await;
    assert_eq!(env_of(&machine, "S3_SECRET_KEY"), Some(value.as_str()));
    assert_eq!(env_of(&machine, "LOG_LEVEL"), Some("debug"));
    assert_eq!(
        env_of(&machine, "GPUPOOL_WORKER_HEALTH_PATH"),
        Some("/v1/ready")
    );
    assert_eq!(env_of(&machine, "GPUPOOL_WORKER_PORT"), Some("8000"));
    assert!(env_of(&machine, "GPUPOOL_SESSION_TOKEN").is_some());
    assert_eq!(env_of(&machine, "GPUPOOL_API_KEY"), Some(WORKER_KEY));

    let job = finished_job(&client, &ns.name, "j", Duration::from_secs(60), &op).await;
    assert_eq!(phase(&job), JobPhase::Succeeded, "{:?}", job.status);
    // The job ran on that machine.
    let inst = job
        .status
        .as_ref()
        .and_then(|s| s.instance.clone())
        .unwrap();
    let gi = Api::<GpuInstance>::namespaced(client.clone(), &ns.name)
        .get(&inst)
        .await
        .unwrap();
    let id = gi.status.and_then(|s| s.provider_instance_id).unwrap();
    assert_eq!(machine["id"].to_string(), id, "{machine}");

    // Seen while the instance exists, and again once it is destroyed (its final events).
    let shown = everything_shown(&client, &ns.name, &op).await;
    assert!(
        !shown.contains(&value),
        "the worker secret is shown in a log, event or status"
    );
    let gis: Api<GpuInstance> = Api::namespaced(client.clone(), &ns.name);
    eventually(
        Duration::from_secs(30),
        "the idle instance destroyed",
        Some(&op),
        || {
            let gis = gis.clone();
            async move {
                let left = gis.list(&ListParams::default()).await.ok()?.items;
                left.is_empty().then_some(())
            }
        },
    )
    .await;
    assert!(vast_machines(&sim).await.is_empty(), "a machine is left");
    let shown = everything_shown(&client, &ns.name, &op).await;
    assert!(
        !shown.contains(&value),
        "the worker secret is shown in a log, event or status"
    );
    assert!(
        shown.contains("S3_SECRET_KEY"),
        "the scan saw the pool's spec"
    );
    ns.cleanup().await;
}

/// A worker env entry whose Secret does not exist, or lacks the key: the pool's provider is
/// unavailable with a message naming the variable and the Secret (status and event), the job
/// waits, no GpuInstance is created and no machine rented. Adding the key runs the job.
#[tokio::test]
async fn a_missing_worker_env_secret_rents_nothing_and_names_the_secret() {
    let ns = namespace_with_secrets("wsecretmiss").await;
    let client = ns.client();
    create_secret(&client, &ns.name, "s3-nokey", json!({"other": "x"})).await;
    let sim = sim().await;
    let mut op = Operator::start(&ns.name, &sim, &[]);
    create_pool(
        &client,
        &ns.name,
        "nosecret",
        pool_with_env(s3_env("s3-absent", "secretKey")),
    )
    .await;
    create_pool(
        &client,
        &ns.name,
        "nokey",
        pool_with_env(s3_env("s3-nokey", "secretKey")),
    )
    .await;
    for (job, pool) in [("a", "nosecret"), ("k", "nokey")] {
        create_job(
            &client,
            &ns.name,
            job,
            json!({"operation": "caption", "pool": pool}),
        )
        .await;
    }

    let pools: Api<GpuPool> = Api::namespaced(client.clone(), &ns.name);
    let jobs: Api<VideoJob> = Api::namespaced(client.clone(), &ns.name);
    for (pool, job, wanted) in [
        (
            "nosecret",
            "a",
            &["S3_SECRET_KEY", "Secret", "s3-absent", "not found"][..],
        ),
        (
            "nokey",
            "k",
            &["S3_SECRET_KEY", "s3-nokey", "has no key secretKey"][..],
        ),
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
        let ready = pools.get(pool).await.unwrap().status.unwrap().conditions;
        let ready = ready.iter().find(|c| c.type_ == "Ready").unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "NoProviderAvailable"),
            "{pool}: {ready:?}"
        );
        let (reason, _) = eventually(
            Duration::from_secs(20),
            "the job waiting",
            Some(&op),
            || {
                let jobs = jobs.clone();
                async move {
                    let s = jobs.get(job).await.ok()?.status?;
                    let c = s.conditions.iter().find(|c| c.type_ == "Scheduled")?;
                    (c.status == "False").then(|| (c.reason.clone(), c.message.clone()))
                }
            },
        )
        .await;
        assert_eq!(reason, "NoProviderAvailable", "{job}");
    }
    // The pool's Warning event names the variable and the Secret.
    let events = Api::<k8s_openapi::api::core::v1::Event>::namespaced(client.clone(), &ns.name)
        .list(&ListParams::default())
        .await
        .unwrap()
        .items;
    for secret in ["s3-absent", "s3-nokey"] {
        assert!(
            events.iter().any(|e| {
                let note = e.message.as_deref().unwrap_or_default();
                e.reason.as_deref() == Some("ProviderUnavailable")
                    && e.type_.as_deref() == Some("Warning")
                    && note.contains("S3_SECRET_KEY")
                    && note.contains(secret)
            }),
            "no ProviderUnavailable event naming {secret}: {:?}",
            events.iter().map(|e| &e.message).collect::<Vec<_>>()
        );
    }

    // Over two back-off periods: nothing rented, no instance that could only fail.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(!op.exited(), "the operator crashed");
    assert_eq!(vast_machines(&sim).await.len(), 0, "a machine was rented");
    let gis: Api<GpuInstance> = Api::namespaced(client.clone(), &ns.name);
    let instances = gis.list(&ListParams::default()).await.unwrap().items;
    assert!(
        instances.is_empty(),
        "instances created: {:?}",
        instances.iter().map(|i| i.name_any()).collect::<Vec<_>>()
    );

    // Fixed: the key added, job k runs (the provider is checked again after its back-off).
    let patch =
        json!({"apiVersion": "v1", "kind": "Secret", "stringData": {"secretKey": "s3-fixed"}});
    Api::<k8s_openapi::api::core::v1::Secret>::namespaced(client.clone(), &ns.name)
        .patch(
            "s3-nokey",
            &PatchParams::apply("gpupool-e2e").force(),
            &Patch::Apply(&patch),
        )
        .await
        .unwrap();
    let job = finished_job(&client, &ns.name, "k", Duration::from_secs(60), &op).await;
    assert_eq!(phase(&job), JobPhase::Succeeded, "{:?}", job.status);
    let a = jobs.get("a").await.unwrap();
    assert!(!phase(&a).is_finished(), "job a ran without its Secret");
    eventually(
        Duration::from_secs(30),
        "the idle machine destroyed",
        Some(&op),
        || {
            let sim = &sim;
            async move { vast_machines(sim).await.is_empty().then_some(()) }
        },
    )
    .await;
    ns.cleanup().await;
}
