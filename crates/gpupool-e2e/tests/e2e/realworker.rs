//! VideoJobs through the operator onto the reference worker (`gpupool-worker`) run as a real
//! process on every simulated machine (`worker_process` in the simulator's configuration),
//! on a video the test makes with ffmpeg. Inputs and outputs go through the simulator's
//! presigned-URL storage stand-in (`/storage/...`), and the outputs are probed with ffprobe.

use std::time::Duration;

use kube::Api;
use serde_json::{Value, json};

use gpupool::crd::{GpuInstance, JobPhase};
use gpupool_sim::{SimConfig, SimHandle, WorkerProcessSpec};

use crate::{
    operator::{
        Operator, admin, create_job, create_pool, eventually, final_state, finished_job, http,
        namespace_with_secrets, phase, sim_with, vast_pool,
    },
    support::{state_dir, worker_binary},
};

/// A simulator whose machines run the real worker (allowed to fetch from loopback, where the
/// simulator's storage is).
async fn sim_with_real_workers(mut config: SimConfig) -> SimHandle {
    config.worker_process = Some(WorkerProcessSpec {
        command: worker_binary().display().to_string(),
        args: Vec::new(),
        env: [(
            "GPUPOOL_WORKER_ALLOW_PRIVATE_URLS".to_string(),
            "true".to_string(),
        )]
        .into(),
        log_dir: Some(state_dir().join("realworker").display().to_string()),
    });
    sim_with(config).await
}

/// Makes a `seconds`-long 320x240 H.264/AAC clip with ffmpeg and stores it at
/// `/storage/{key}`; returns its URL.
async fn stored_clip(sim: &SimHandle, key: &str, seconds: u32) -> String {
    let dir = state_dir().join("realworker");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!(
        "{}-{}.mp4",
        std::process::id(),
        key.replace('/', "-")
    ));
    let out = std::process::Command::new("ffmpeg")
        .args([
            "-hide_banner",
            "-loglevel",
            "error",
            "-y",
            "-f",
            "lavfi",
            "-i",
        ])
        .arg(format!("testsrc=duration={seconds}:size=320x240:rate=25"))
        .args(["-f", "lavfi", "-i"])
        .arg(format!("sine=frequency=440:duration={seconds}"))
        .args([
            "-c:v",
            "libx264",
            "-pix_fmt",
            "yuv420p",
            "-c:a",
            "aac",
            "-shortest",
        ])
        .arg(&path)
        .output()
        .expect("ffmpeg runs (hack/ffmpeg.sh installs it; make test runs that)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bytes = std::fs::read(&path).unwrap();
    std::fs::remove_file(&path).ok();
    let url = format!("{}/storage/{key}", sim.base_url);
    let res = http()
        .put(&url)
        .header("content-type", "video/mp4")
        .body(bytes)
        .send()
        .await
        .unwrap();
    assert!(res.status().is_success(), "{}", res.status());
    url
}

/// ffprobe's JSON of the object stored at `url`.
async fn probe_stored(url: &str) -> Value {
    let bytes = http().get(url).send().await.unwrap().bytes().await.unwrap();
    let path = state_dir().join("realworker").join(format!(
        "{}-probe-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::write(&path, &bytes).unwrap();
    let out = std::process::Command::new("ffprobe")
        .args("-v error -print_format json -show_format -show_streams".split(' '))
        .arg(&path)
        .output()
        .unwrap();
    std::fs::remove_file(&path).ok();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The worker pid of a live machine, from the simulator's state.
async fn worker_pid(sim: &SimHandle, id: &str) -> u32 {
    let state = admin(sim, "state").await;
    state["instances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["id"] == id)
        .and_then(|i| i["worker_pid"].as_u64())
        .filter(|p| *p != 0)
        .unwrap_or_else(|| panic!("machine {id} has no worker process: {state}")) as u32
}

/// Whether process `pid` is gone (or a zombie not yet reaped).
fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z')),
    }
}

/// The attempts the VideoJobs `names` made, summed.
async fn job_attempts(client: &kube::Client, ns: &str, names: &[&str]) -> i32 {
    let api: Api<gpupool::crd::VideoJob> = Api::namespaced(client.clone(), ns);
    let mut n = 0;
    for name in names {
        n += api
            .get(name)
            .await
            .unwrap()
            .status
            .map_or(0, |s| s.attempts);
    }
    n
}

/// The simulator's machine behind a GpuInstance.
async fn machine_of(client: &kube::Client, ns: &str, instance: &str) -> String {
    let gis: Api<GpuInstance> = Api::namespaced(client.clone(), ns);
    gis.get(instance)
        .await
        .unwrap()
        .status
        .and_then(|s| s.provider_instance_id)
        .expect("the instance has its machine's id")
}

/// Three operations on one warm machine running the real worker, outputs checked by probing
/// them; then the machine idles out and its worker process is gone.
#[tokio::test]
async fn real_worker_runs_operations_reuses_the_warm_machine_and_is_stopped_at_teardown() {
    let ns = namespace_with_secrets("realw").await;
    let client = ns.client();
    let sim = sim_with_real_workers(SimConfig::fast()).await;
    let op = Operator::start(&ns.name, &sim, &[]);
    let clip = stored_clip(&sim, "in/clip.mp4", 4).await;
    let out = |k: &str| format!("{}/storage/out/{k}?X-Amz-Signature=stand-in", sim.base_url);
    create_pool(&client, &ns.name, "default", vast_pool(5)).await;

    create_job(
        &client,
        &ns.name,
        "probe-1",
        json!({"operation": "probe", "input": {"videoUrl": clip}}),
    )
    .await;
    let probe = finished_job(&client, &ns.name, "probe-1", Duration::from_secs(90), &op).await;
    assert_eq!(phase(&probe), JobPhase::Succeeded, "{:?}", probe.status);
    let st = probe.status.clone().unwrap();
    let output = st.output.clone().unwrap();
    let duration = output["durationSeconds"].as_f64().unwrap();
    assert!(
        (duration - 4.0).abs() < 0.2,
        "probe said {duration} s: {output}"
    );
    let codecs: Vec<_> = output["streams"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["codec"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(codecs, ["h264", "aac"], "{output}");
    let instance = st.instance.unwrap();
    let machine = machine_of(&client, &ns.name, &instance).await;
    let pid = worker_pid(&sim, &machine).await;

    // One after the other, so each finds the machine idle (at once, the second would rent).
    let jobs = [
        (
            "thumbs-1",
            json!({"operation": "thumbnails", "input": {"videoUrl": clip, "times": [0.5, 3.0],
            "format": "png", "width": 160, "uploadUrls": [out("t0.png"), out("t1.png")]}}),
        ),
        (
            "transcode-1",
            json!({"operation": "transcode", "input": {"videoUrl": clip,
            "uploadUrl": out("small.webm"), "container": "webm", "width": 160, "crf": 40}}),
        ),
    ];
    for (name, spec) in jobs {
        create_job(&client, &ns.name, name, spec).await;
        let job = finished_job(&client, &ns.name, name, Duration::from_secs(120), &op).await;
        assert_eq!(phase(&job), JobPhase::Succeeded, "{name}: {:?}", job.status);
        let st = job.status.unwrap();
        assert_eq!(
            st.instance.as_deref(),
            Some(instance.as_str()),
            "{name} did not reuse the warm machine"
        );
        eprintln!("{name}: {}", st.output.unwrap());
    }
    for t in ["t0.png", "t1.png"] {
        let p = probe_stored(&format!("{}/storage/out/{t}", sim.base_url)).await;
        assert_eq!(p["streams"][0]["codec_name"], "png", "{p}");
        assert_eq!(p["streams"][0]["width"], 160, "{p}");
        assert_eq!(p["streams"][0]["height"], 120, "{p}");
    }
    let webm = probe_stored(&format!("{}/storage/out/small.webm", sim.base_url)).await;
    let video = &webm["streams"][0];
    assert_eq!(video["codec_name"], "vp9", "{webm}");
    assert_eq!(video["width"], 160, "{webm}");
    let secs: f64 = webm["format"]["duration"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((secs - 4.0).abs() < 0.3, "transcoded duration {secs}");
    assert_eq!(
        admin(&sim, "state").await["instances"]
            .as_array()
            .unwrap()
            .len(),
        1,
        "a second machine was rented"
    );

    // Idle for 5 s after the last job: destroyed, and its worker process with it.
    let last = final_state(&client, &ns.name, &instance, Duration::from_secs(60)).await;
    assert!(last.status.unwrap().accrued_cost.is_some());
    eventually(
        Duration::from_secs(10),
        "the worker process to be gone",
        Some(&op),
        || async move { gone(pid).then_some(()) },
    )
    .await;
    ns.cleanup().await;
}

/// The worker process SIGKILLed while it transcodes: the operator sees the machine die, runs
/// the job again on a new machine, and that machine's worker finishes it.
#[tokio::test]
async fn a_real_worker_killed_mid_job_is_retried_on_another_machine() {
    let ns = namespace_with_secrets("realkill").await;
    let client = ns.client();
    let mut config = SimConfig::fast();
    // The machine dies half-way through this time after the job reaches it.
    config.timing.operations = [("transcode".to_string(), 0.6)].into();
    let sim = sim_with_real_workers(config).await;
    let op = Operator::start(&ns.name, &sim, &[]);
    let clip = stored_clip(&sim, "in/long.mp4", 20).await;
    create_pool(&client, &ns.name, "default", vast_pool(30)).await;
    create_job(
        &client,
        &ns.name,
        "warm",
        json!({"operation": "probe", "input": {"videoUrl": clip}}),
    )
    .await;
    let warm = finished_job(&client, &ns.name, "warm", Duration::from_secs(90), &op).await;
    assert_eq!(phase(&warm), JobPhase::Succeeded, "{:?}", warm.status);
    let first = warm.status.unwrap().instance.unwrap();
    let machine = machine_of(&client, &ns.name, &first).await;
    let pid = worker_pid(&sim, &machine).await;
    let armed = http()
        .post(format!("{}/admin/instances/{machine}/kill", sim.base_url))
        .json(&json!({"when": "next_job"}))
        .send()
        .await
        .unwrap();
    assert!(armed.status().is_success(), "{}", armed.status());

    let upload = format!("{}/storage/out/retried.mp4", sim.base_url);
    create_job(
        &client,
        &ns.name,
        "killed",
        json!({"operation": "transcode", "maxRetries": 2,
               "input": {"videoUrl": clip, "uploadUrl": upload, "width": 320}}),
    )
    .await;
    let job = finished_job(&client, &ns.name, "killed", Duration::from_secs(180), &op).await;
    assert_eq!(phase(&job), JobPhase::Succeeded, "{:?}", job.status);
    let st = job.status.unwrap();
    assert_ne!(
        st.instance.as_deref(),
        Some(first.as_str()),
        "the job finished on the machine that was killed"
    );
    assert!(gone(pid), "the killed worker process {pid} still runs");
    let execs = admin(&sim, "executions").await;
    let ran: Vec<_> = execs["jobs"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(_, e)| {
            e["instances"]
                .as_array()
                .is_some_and(|i| i.iter().any(|m| m == machine.as_str()))
        })
        .map(|(id, e)| (id.clone(), e["count"].clone()))
        .collect();
    assert_eq!(ran.len(), 2, "the warm job and the killed attempt: {ran:?}");
    let mp4 = probe_stored(&upload).await;
    let secs: f64 = mp4["format"]["duration"].as_str().unwrap().parse().unwrap();
    assert!(
        (secs - 20.0).abs() < 0.5,
        "the retried output lasts {secs} s"
    );
    eprintln!(
        "killed mid-job on {first}, finished on {:?}: {}",
        st.instance,
        st.output.unwrap()
    );
    ns.cleanup().await;
}

/// A GpuPool on the simulated RunPod Serverless endpoint whose workers are real
/// `gpupool-worker serverless` processes: the jobs go through the endpoint's queue to them
/// (take, progress, result, ping), a bad input fails with the worker's message naming the
/// field, a deleted running job is stopped at the worker, and the workers are killed when the
/// endpoint scales down.
#[tokio::test]
async fn serverless_jobs_run_on_real_serverless_workers() {
    let ns = namespace_with_secrets("realsls").await;
    let client = ns.client();
    let sim = sim_with_real_workers(SimConfig::fast()).await;
    let op = Operator::start(&ns.name, &sim, &[]);
    let clip = stored_clip(&sim, "in/sls.mp4", 3).await;
    create_pool(
        &client,
        &ns.name,
        "default",
        json!({
            // The operator sets the endpoint's idle timeout from the pool's.
            "idleTimeoutSeconds": 3,
            "providers": [{"name": "sls", "runpodServerless": {"endpointId": "abc123xyz",
                           "credentialsSecretRef": {"name": "runpod", "key": "apiKey"}}}]
        }),
    )
    .await;
    let thumb = format!("{}/storage/out/sls-thumb.jpg", sim.base_url);
    create_job(
        &client,
        &ns.name,
        "sls-thumbs",
        json!({"operation": "thumbnails", "input": {"videoUrl": clip, "times": [1.0],
               "width": 96, "uploadUrls": [thumb]}}),
    )
    .await;
    create_job(
        &client,
        &ns.name,
        "sls-bad",
        json!({"operation": "probe", "input": {"videoUrl": "file:///etc/passwd"}}),
    )
    .await;
    let job = finished_job(
        &client,
        &ns.name,
        "sls-thumbs",
        Duration::from_secs(120),
        &op,
    )
    .await;
    assert_eq!(phase(&job), JobPhase::Succeeded, "{:?}", job.status);
    let output = job.status.unwrap().output.unwrap();
    assert_eq!(
        output["outputs"][0]["bytes"].as_u64().map(|b| b > 0),
        Some(true),
        "{output}"
    );
    let p = probe_stored(&thumb).await;
    assert_eq!(p["streams"][0]["codec_name"], "mjpeg", "{p}");
    assert_eq!(p["streams"][0]["width"], 96, "{p}");
    let bad = finished_job(&client, &ns.name, "sls-bad", Duration::from_secs(120), &op).await;
    assert_eq!(phase(&bad), JobPhase::Failed, "{:?}", bad.status);
    let msg = bad.status.unwrap().error.unwrap_or_default();
    assert!(
        msg.contains("videoUrl"),
        "the failure does not name the field: {msg}"
    );

    // One job at the endpoint per attempt: no attempt was submitted twice.
    let state = admin(&sim, "state").await;
    let attempts = job_attempts(&client, &ns.name, &["sls-thumbs", "sls-bad"]).await;
    assert_eq!(
        state["jobs"].as_array().unwrap().len() as i32,
        attempts,
        "endpoint jobs vs attempts: {}",
        state["jobs"]
    );
    // A job whose download hangs, deleted while it runs: cancelled at the endpoint, and the
    // worker, told through job-stop, drops it and asks for work again.
    let hang = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hang_url = format!("http://{}/stuck.mp4", hang.local_addr().unwrap());
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = hang.accept().await {
            held.push(s);
        }
    });
    create_job(
        &client,
        &ns.name,
        "sls-stuck",
        json!({"operation": "probe", "input": {"videoUrl": hang_url}}),
    )
    .await;
    let jobs: Api<gpupool::crd::VideoJob> = Api::namespaced(client.clone(), &ns.name);
    let remote = eventually(
        Duration::from_secs(60),
        "sls-stuck running on a worker",
        Some(&op),
        || {
            let (jobs, sim) = (jobs.clone(), &sim);
            async move {
                let remote = jobs.get("sls-stuck").await.ok()?.status?.remote_job_id?;
                let s = admin(sim, "state").await;
                let busy = s["endpoints"][0]["workers"]
                    .as_array()?
                    .iter()
                    .find(|w| w["state"] == format!("busy:{remote}").as_str())?["id"]
                    .as_str()?
                    .to_string();
                Some((remote, busy))
            }
        },
    )
    .await;
    jobs.delete("sls-stuck", &kube::api::DeleteParams::default())
        .await
        .unwrap();
    let (remote_id, worker) = remote;
    eventually(
        Duration::from_secs(30),
        "the stuck job stopped at its worker",
        Some(&op),
        || {
            let (sim, remote_id, worker) = (&sim, remote_id.clone(), worker.clone());
            async move {
                let s = admin(sim, "state").await;
                let job = s["jobs"]
                    .as_array()?
                    .iter()
                    .find(|j| j["id"] == remote_id.as_str())?
                    .clone();
                let w = s["endpoints"][0]["workers"]
                    .as_array()?
                    .iter()
                    .find(|w| w["id"] == worker.as_str())?
                    .clone();
                (job["status"] == "CANCELLED" && w["state"] != format!("busy:{remote_id}").as_str())
                    .then_some(())
            }
        },
    )
    .await;

    // The workers ran as processes, pinged, and stop once idle past the endpoint's timeout.
    let workers = state["endpoints"][0]["workers"].as_array().unwrap().clone();
    assert!(!workers.is_empty(), "{state}");
    assert!(
        workers.iter().any(|w| w["pings"].as_u64() > Some(0)),
        "no worker pinged: {workers:?}"
    );
    let jobs = state["jobs"].as_array().unwrap();
    assert!(
        jobs.iter().all(|j| j["worker_id"].is_string()),
        "a job ran on no worker: {jobs:?}"
    );
    eventually(
        Duration::from_secs(30),
        "every serverless worker to stop",
        Some(&op),
        || {
            let sim = &sim;
            async move {
                let s = admin(sim, "state").await;
                (s["endpoints"][0]["active_workers"] == 0).then_some(())
            }
        },
    )
    .await;
    ns.cleanup().await;
}
