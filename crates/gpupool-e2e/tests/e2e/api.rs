//! The API as a user meets it: CRDs established, examples applied, printer columns,
//! `kubectl explain`, defaults, and status written by server-side apply.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{
    Api,
    api::{Patch, PatchParams, PostParams},
};
use serde_json::json;

use gpupool::crd::{
    GpuInstance, GpuInstanceStatus, GpuPool, GpuPoolStatus, InstancePhase, JobPhase, MANAGER,
    VideoJob, VideoJobStatus,
};

use crate::support::{TestNamespace, client, install_crds, kubectl, kubectl_ok};

#[tokio::test]
async fn crds_are_established_with_short_names_and_category() {
    install_crds();
    let crds: Api<CustomResourceDefinition> = Api::all(client().await);
    for (name, short) in [
        ("gpupools.gpupool.dev", "gp"),
        ("gpuinstances.gpupool.dev", "gi"),
        ("videojobs.gpupool.dev", "vj"),
    ] {
        let crd = crds.get(name).await.expect("CRD exists");
        let conditions = crd.status.and_then(|s| s.conditions).unwrap_or_default();
        assert!(
            conditions
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True"),
            "{name} not Established: {conditions:?}"
        );
        let names = &crd.spec.names;
        assert_eq!(names.short_names.as_deref(), Some(&[short.to_string()][..]));
        assert_eq!(
            names.categories.as_deref(),
            Some(&["gpupool".to_string()][..])
        );
        assert_eq!(crd.spec.scope, "Namespaced");
        let version = &crd.spec.versions[0];
        assert_eq!(version.name, "v1alpha1");
        assert!(
            version
                .subresources
                .as_ref()
                .and_then(|s| s.status.as_ref())
                .is_some(),
            "{name} has no status subresource"
        );
    }
}

#[tokio::test]
async fn examples_apply_and_show_printer_columns() {
    let ns = TestNamespace::new("examples").await;
    let out = kubectl_ok(&["apply", "-n", &ns.name, "-f", "deploy/examples/"]);
    for line in [
        "gpupool.gpupool.dev/default created",
        "gpuinstance.gpupool.dev/prewarm-vast-1 created",
        "videojob.gpupool.dev/caption-42 created",
        "videojob.gpupool.dev/transcode-43 created",
        "videojob.gpupool.dev/thumbnails-44 created",
    ] {
        assert!(out.contains(line), "missing {line:?} in:\n{out}");
    }

    // Give the pool a status so the columns show values, as the operator will.
    let pools: Api<GpuPool> = Api::namespaced(ns.client(), &ns.name);
    let status = json!({
        "apiVersion": "gpupool.dev/v1alpha1", "kind": "GpuPool",
        "status": {"spendPerHour": "0.43", "instances": {"total": 2, "pending": 0, "provisioning": 1,
                   "ready": 1, "busy": 1, "terminating": 0, "failed": 0}}
    });
    pools
        .patch_status(
            "default",
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&status),
        )
        .await
        .expect("status applied");

    let table = kubectl_ok(&["get", "gp,gi,vj", "-n", &ns.name]);
    for header in [
        "INSTANCES",
        "READY",
        "BUSY",
        "MAX",
        "SPEND/H", // GpuPool
        "POOL",
        "PROVIDER",
        "PHASE",
        "GPU",
        "$/H",
        "JOB",
        "IDLE-SINCE", // GpuInstance
        "OPERATION",
        "INSTANCE",
        "ATTEMPTS",
        "AGE", // VideoJob
    ] {
        assert!(
            table.contains(header),
            "column {header} missing in:\n{table}"
        );
    }
    let pool_row = table
        .lines()
        .find(|l| l.starts_with("gpupool.gpupool.dev/default"))
        .expect("pool row");
    let cells: Vec<&str> = pool_row.split_whitespace().collect();
    assert_eq!(
        &cells[1..6],
        &["2", "1", "1", "10", "0.43"],
        "row: {pool_row}"
    );
    assert!(table.contains("transcode-43") && table.contains("transcode"));

    // The category lists all three kinds at once.
    let all = kubectl_ok(&["get", "gpupool", "-n", &ns.name, "-o", "name"]);
    assert_eq!(all.lines().count(), 5, "kubectl get gpupool:\n{all}");

    // Wide output shows the priority-1 columns.
    let wide = kubectl_ok(&["get", "vj", "-n", &ns.name, "-o", "wide"]);
    assert!(wide.contains("COST") && wide.contains("ERROR"), "{wide}");
    ns.cleanup().await;
}

/// `kubectl explain` output with its line wrapping undone, so phrases can be searched.
fn explain(path: &str) -> String {
    // A CRD's OpenAPI is published a moment after it is Established: retry for a while.
    let started = std::time::Instant::now();
    while !crate::support::kubectl(&["explain", path]).status.success()
        && started.elapsed() < std::time::Duration::from_secs(60)
    {
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
    kubectl_ok(&["explain", path])
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

#[tokio::test]
async fn kubectl_explain_teaches_the_api() {
    install_crds();
    let out = explain("videojob.spec");
    for text in [
        "operation <string> -required-",
        "Worker operation, sent as `POST /video/{operation}`",
        "timeoutSeconds <integer>",
        "ttlSecondsAfterFinished",
        "any JSON object, sent to the worker as the request body",
    ] {
        assert!(
            out.contains(text),
            "explain videojob.spec lacks {text:?}:\n{out}"
        );
    }
    let out = explain("gpupool.spec.providers");
    assert!(
        out.contains("runpodServerless") && out.contains("Providers tried in order"),
        "{out}"
    );
    let out = explain("gpuinstance.status.idleDeadline");
    assert!(
        out.contains("idleSince plus the pool's idleTimeoutSeconds"),
        "{out}"
    );
    let out = explain("gpupool.spec.providers.vast.maxPricePerHour");
    assert!(
        out.contains("as a decimal string greater than zero"),
        "{out}"
    );
}

#[tokio::test]
async fn defaults_are_filled_in_by_the_api_server() {
    let ns = TestNamespace::new("defaults").await;
    let jobs: Api<VideoJob> = Api::namespaced(ns.client(), &ns.name);
    let job: VideoJob = serde_json::from_value(json!({
        "apiVersion": "gpupool.dev/v1alpha1", "kind": "VideoJob",
        "metadata": {"name": "bare"}, "spec": {"operation": "caption"}
    }))
    .unwrap();
    let created = jobs.create(&PostParams::default(), &job).await.unwrap();
    assert_eq!(created.spec.pool, "default");
    assert_eq!(created.spec.timeout_seconds, 600);
    assert_eq!(created.spec.max_retries, 2);
    assert!(created.spec.input.is_empty());
    assert_eq!(created.spec.provider, None);

    let pools: Api<GpuPool> = Api::namespaced(ns.client(), &ns.name);
    let pool: GpuPool = serde_json::from_value(json!({
        "apiVersion": "gpupool.dev/v1alpha1", "kind": "GpuPool", "metadata": {"name": "p"},
        "spec": {"providers": [{"name": "vast", "vast": {"gpuNames": ["RTX 3060"],
                 "maxPricePerHour": "0.25", "credentialsSecretRef": {"name": "vast", "key": "apiKey"}}}],
                 "worker": {"image": "w:1"}}
    }))
    .unwrap();
    let pool = pools.create(&PostParams::default(), &pool).await.unwrap();
    assert_eq!(pool.spec.idle_timeout_seconds, 300);
    assert_eq!(pool.spec.min_idle, 0);
    assert_eq!(pool.spec.max_instances, 10);
    assert_eq!(pool.spec.provision_timeout_seconds, 900);
    let vast = pool.spec.providers[0].vast.as_ref().unwrap();
    assert_eq!(vast.min_reliability, 0.95);
    assert_eq!(vast.num_gpus, 1);
    let worker = pool.spec.worker.as_ref().unwrap();
    assert_eq!(
        (
            worker.port,
            worker.health_path.as_str(),
            worker.container_disk_gb
        ),
        (8000, "/health", 10)
    );
    ns.cleanup().await;
}

/// Writes status with server-side apply under the `gpupool` field manager and checks the
/// server kept it, recorded the manager on the status subresource, and left spec alone.
async fn apply_status<K>(api: &Api<K>, name: &str, status: serde_json::Value) -> K
where
    K: kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let patch = json!({
        "apiVersion": "gpupool.dev/v1alpha1",
        "kind": K::kind(&()),
        "status": status,
    });
    let obj = api
        .patch_status(
            name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
        .expect("status applied");
    let managed = obj.meta().managed_fields.clone().unwrap_or_default();
    assert!(
        managed.iter().any(|m| m.manager.as_deref() == Some(MANAGER)
            && m.operation.as_deref() == Some("Apply")
            && m.subresource.as_deref() == Some("status")),
        "no Apply entry for {MANAGER} on status: {managed:?}"
    );
    obj
}

#[tokio::test]
async fn status_is_written_by_server_side_apply_on_each_kind() {
    let ns = TestNamespace::new("status").await;
    kubectl_ok(&["apply", "-n", &ns.name, "-f", "deploy/examples/"]);
    let now = "2026-11-27T12:00:00Z";
    let condition = json!({"type": "Ready", "status": "True", "reason": "WorkerHealthy",
                           "message": "worker answered /health", "lastTransitionTime": now,
                           "observedGeneration": 1});

    let pools: Api<GpuPool> = Api::namespaced(ns.client(), &ns.name);
    let pool = apply_status(
        &pools,
        "default",
        json!({
            "observedGeneration": 1, "spendPerHour": "0.25", "pendingJobs": 3,
            "providers": [{"name": "vast", "state": "BackingOff", "backoffUntil": now,
                           "consecutiveFailures": 2, "message": "no offers under 0.25/h"}],
            "conditions": [condition],
        }),
    )
    .await;
    let status: GpuPoolStatus = pool.status.unwrap();
    assert_eq!(status.pending_jobs, Some(3));
    assert_eq!(status.providers[0].consecutive_failures, 2);

    let instances: Api<GpuInstance> = Api::namespaced(ns.client(), &ns.name);
    let gi = apply_status(&instances, "prewarm-vast-1", json!({
        "phase": "Ready", "providerInstanceId": "4242",
        "offer": {"offerId": "99", "gpuName": "RTX 3060", "numGpus": 1, "pricePerHour": "0.18", "region": "US"},
        "endpoint": "http://127.0.0.1:40001", "idleSince": now, "idleDeadline": "2026-11-27T12:05:00Z",
        "accruedCost": "0.004200", "conditions": [condition],
    }))
    .await;
    let status: GpuInstanceStatus = gi.status.unwrap();
    assert_eq!(status.phase, Some(InstancePhase::Ready));
    assert_eq!(
        status.idle_deadline.unwrap().0.to_string(),
        "2026-11-27T12:05:00Z"
    );
    // Spec is untouched by a status write.
    assert_eq!(gi.spec.pool, "default");

    let jobs: Api<VideoJob> = Api::namespaced(ns.client(), &ns.name);
    let vj = apply_status(&jobs, "caption-42", json!({
        "phase": "Succeeded", "instance": "prewarm-vast-1", "provider": "vast", "attempts": 1,
        "startedAt": now, "finishedAt": now, "output": {"captionsUrl": "https://x/42.srt", "words": 311},
        "cost": "0.0031", "conditions": [condition],
    }))
    .await;
    let status: VideoJobStatus = vj.status.unwrap();
    assert_eq!(status.phase, Some(JobPhase::Succeeded));
    assert_eq!(status.output.unwrap()["words"], 311);

    // A second apply by the same manager that omits a field removes it (apply semantics),
    // and the conditions list merges by type.
    let vj = apply_status(
        &jobs,
        "caption-42",
        json!({
            "phase": "Succeeded", "attempts": 1,
            "conditions": [{"type": "Complete", "status": "True", "reason": "WorkerSucceeded",
                            "message": "", "lastTransitionTime": now}],
        }),
    )
    .await;
    let status = vj.status.unwrap();
    assert_eq!(status.output, None);
    assert_eq!(status.conditions.len(), 1);
    assert_eq!(status.conditions[0].type_, "Complete");

    // Status is validated too.
    let bad = jobs
        .patch_status(
            "caption-42",
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(
                &json!({"apiVersion": "gpupool.dev/v1alpha1", "kind": "VideoJob",
                                  "status": {"phase": "Exploded"}}),
            ),
        )
        .await
        .expect_err("bad phase refused");
    assert!(bad.to_string().contains("status.phase"), "{bad}");

    // A spec write through the status subresource is ignored.
    let out = kubectl(&[
        "get",
        "vj",
        "caption-42",
        "-n",
        &ns.name,
        "-o",
        "jsonpath={.spec.operation}",
    ]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "caption");
    ns.cleanup().await;
}
