//! The worker against `docs/worker-api.md`, driven by the operator's own client
//! (`gpupool::worker::WorkerClient`) over loopback HTTP, with operations made for the test:
//! credentials, health, one job at a time, the answers and how the operator classifies them,
//! and `X-Job-Id` de-duplication.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use gpupool::{
    provider::Credentials,
    worker::{Dispatch, WorkerClient, WorkerClientConfig, WorkerError},
};
use gpupool_worker::{Config, OpError, Operations, Worker};
use serde_json::{Map, Value, json};

const TOKEN: &str = "session-token-0123456789";
const KEY: &str = "worker-api-key-0123456789";

/// `sleep` waits `seconds` and echoes; `bad` refuses its input; `boom` fails; every run counted.
#[derive(Default)]
struct TestOps {
    runs: AtomicU32,
}

#[async_trait::async_trait]
impl Operations for TestOps {
    fn names(&self) -> Vec<String> {
        ["sleep", "bad", "boom", "big"].map(String::from).to_vec()
    }
    async fn health(&self) -> (bool, Value) {
        (true, json!({"tools": "test"}))
    }
    async fn run(&self, op: &str, uid: &str, input: Map<String, Value>) -> Result<Value, OpError> {
        let n = self.runs.fetch_add(1, Ordering::SeqCst) + 1;
        match op {
            "sleep" => {
                let s = input.get("seconds").and_then(Value::as_f64).unwrap_or(0.0);
                tokio::time::sleep(Duration::from_secs_f64(s)).await;
                Ok(json!({"uid": uid, "run": n, "input": input}))
            }
            "bad" => Err(OpError::Invalid {
                field: "videoUrl".into(),
                message: "must be an https URL".into(),
            }),
            "boom" => Err(OpError::Failed("ffmpeg exited with 1".into())),
            "big" => Ok(json!({"pad": "x".repeat(70 * 1024)})),
            _ => Err(OpError::Unknown),
        }
    }
}

async fn start(api_key: Option<&str>) -> (String, Arc<TestOps>) {
    let env = |k: &str| match k {
        "GPUPOOL_WORKER_PORT" => Some("0".to_string()),
        "GPUPOOL_SESSION_TOKEN" => Some(TOKEN.to_string()),
        "GPUPOOL_API_KEY" => api_key.map(str::to_string),
        _ => None,
    };
    let ops = Arc::new(TestOps::default());
    let worker = Worker::new(Config::from_env(env).unwrap(), ops.clone());
    let (addr, server) = worker.serve("127.0.0.1:0".parse().unwrap()).await.unwrap();
    tokio::spawn(server);
    (format!("http://{addr}"), ops)
}

fn client(key: Option<&str>) -> WorkerClient {
    let _ = rustls::crypto::ring::default_provider().install_default();
    WorkerClient::new(key.map(Credentials::new), WorkerClientConfig::default()).unwrap()
}

async fn dispatch(
    c: &WorkerClient,
    endpoint: &str,
    op: &str,
    input: Value,
    uid: &str,
    attempt: u32,
    token: &str,
) -> Result<Value, WorkerError> {
    let token = Credentials::new(token);
    c.dispatch(&Dispatch {
        endpoint,
        operation: op,
        input: &input,
        job_uid: uid,
        attempt,
        session_token: &token,
        timeout: Duration::from_secs(10),
    })
    .await
}

#[tokio::test]
async fn the_operator_runs_a_job_and_its_health_check_passes() {
    let (url, _) = start(Some(KEY)).await;
    let c = client(Some(KEY));
    c.health(&url, "/health", &Credentials::new(TOKEN))
        .await
        .unwrap();
    let out = dispatch(
        &c,
        &url,
        "sleep",
        json!({"seconds": 0, "n": 7}),
        "uid-a",
        0,
        TOKEN,
    )
    .await
    .unwrap();
    assert_eq!(out["uid"], "uid-a");
    assert_eq!(out["input"]["n"], 7);
}

#[tokio::test]
async fn wrong_or_missing_credentials_are_unauthorized_and_never_echoed() {
    let (url, ops) = start(Some(KEY)).await;
    let bad_token = dispatch(&client(Some(KEY)), &url, "sleep", json!({}), "u", 0, "nope").await;
    assert!(
        matches!(bad_token, Err(WorkerError::Unauthorized { .. })),
        "{bad_token:?}"
    );
    let no_key = dispatch(&client(None), &url, "sleep", json!({}), "u", 0, TOKEN).await;
    assert!(
        matches!(no_key, Err(WorkerError::Unauthorized { .. })),
        "{no_key:?}"
    );
    let wrong_key = dispatch(
        &client(Some("other")),
        &url,
        "sleep",
        json!({}),
        "u",
        0,
        TOKEN,
    )
    .await;
    let text = format!("{wrong_key:?}");
    assert!(matches!(wrong_key, Err(WorkerError::Unauthorized { .. })));
    assert!(!text.contains(KEY) && !text.contains(TOKEN), "{text}");
    assert!(
        client(Some(KEY))
            .health(&url, "/health", &Credentials::new("nope"))
            .await
            .is_err()
    );
    assert_eq!(ops.runs.load(Ordering::SeqCst), 0, "nothing ran");
    // Without a configured API key, the token alone is enough.
    let (open, _) = start(None).await;
    assert!(
        dispatch(&client(None), &open, "sleep", json!({}), "u", 0, TOKEN)
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn each_answer_is_the_one_the_operator_classifies_as_documented() {
    let (url, _) = start(None).await;
    let c = client(None);
    let bad = dispatch(&c, &url, "bad", json!({}), "u1", 0, TOKEN).await;
    match &bad {
        Err(e @ WorkerError::Rejected { .. }) => {
            assert!(!e.is_retryable());
            assert!(
                e.to_string().contains("videoUrl: must be an https URL"),
                "{e}"
            );
        }
        other => panic!("{other:?}"),
    }
    let boom = dispatch(&c, &url, "boom", json!({}), "u2", 0, TOKEN).await;
    assert!(
        matches!(&boom, Err(e @ WorkerError::ServerError { .. }) if e.is_retryable()),
        "{boom:?}"
    );
    let unknown = dispatch(&c, &url, "nope", json!({}), "u3", 0, TOKEN).await;
    assert!(
        matches!(unknown, Err(WorkerError::Rejected { .. })),
        "{unknown:?}"
    );
    // An output the operator would not read past 64 KiB is refused by the worker itself.
    let big = dispatch(&c, &url, "big", json!({}), "u4", 0, TOKEN).await;
    assert!(
        matches!(big, Err(WorkerError::ServerError { .. })),
        "{big:?}"
    );
    // Not an object, or no X-Job-Id: 400 with a JSON error.
    let http = reqwest::Client::new();
    for (body, job_id) in [
        ("[1]", Some("u5-0")),
        ("{}", None),
        ("{}", Some("no-attempt-x")),
    ] {
        let mut req = http
            .post(format!("{url}/video/sleep"))
            .header("x-session-token", TOKEN)
            .body(body);
        if let Some(id) = job_id {
            req = req.header("x-job-id", id);
        }
        let res = req.send().await.unwrap();
        assert_eq!(res.status(), 400, "{body} {job_id:?}");
        let v: Value = res.json().await.unwrap();
        assert!(v["error"].is_string(), "{v}");
    }
}

#[tokio::test]
async fn one_job_at_a_time_and_a_second_is_told_429() {
    let (url, ops) = start(None).await;
    let c = client(None);
    let first = {
        let (c, url) = (c.clone(), url.clone());
        tokio::spawn(async move {
            dispatch(&c, &url, "sleep", json!({"seconds": 1}), "long", 0, TOKEN).await
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let second = dispatch(&c, &url, "sleep", json!({}), "other", 0, TOKEN).await;
    // 429 is "busy, try again": retryable, not the job's fault.
    assert!(
        matches!(&second, Err(e @ WorkerError::ServerError { .. }) if e.is_retryable()),
        "{second:?}"
    );
    assert!(first.await.unwrap().is_ok());
    assert_eq!(ops.runs.load(Ordering::SeqCst), 1);
    // Free again.
    assert!(
        dispatch(&c, &url, "sleep", json!({}), "other", 1, TOKEN)
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn an_attempt_sent_again_gets_the_first_answer_and_never_runs_twice() {
    let (url, ops) = start(None).await;
    let c = client(None);
    let first = dispatch(&c, &url, "sleep", json!({"n": 1}), "job-1", 0, TOKEN)
        .await
        .unwrap();
    // The operator restarted and sent the same attempt again, then the next attempt.
    let again = dispatch(&c, &url, "sleep", json!({"n": 1}), "job-1", 0, TOKEN)
        .await
        .unwrap();
    let retry = dispatch(&c, &url, "sleep", json!({"n": 1}), "job-1", 1, TOKEN)
        .await
        .unwrap();
    assert_eq!(first, again);
    assert_eq!(first, retry);
    assert_eq!(ops.runs.load(Ordering::SeqCst), 1);
    // Sent again while it still runs: the second request waits for the first's answer.
    let running = {
        let (c, url) = (c.clone(), url.clone());
        tokio::spawn(async move {
            dispatch(
                &c,
                &url,
                "sleep",
                json!({"seconds": 0.5}),
                "job-2",
                0,
                TOKEN,
            )
            .await
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let joined = dispatch(
        &c,
        &url,
        "sleep",
        json!({"seconds": 0.5}),
        "job-2",
        1,
        TOKEN,
    )
    .await
    .unwrap();
    assert_eq!(running.await.unwrap().unwrap(), joined);
    assert_eq!(ops.runs.load(Ordering::SeqCst), 2);
    // A failure (5xx) is not kept: the operator's retry runs it again.
    let _ = dispatch(&c, &url, "boom", json!({}), "job-3", 0, TOKEN).await;
    let _ = dispatch(&c, &url, "boom", json!({}), "job-3", 1, TOKEN).await;
    assert_eq!(ops.runs.load(Ordering::SeqCst), 4);
}

#[tokio::test]
async fn a_dropped_request_stops_its_job_and_frees_the_worker() {
    let (url, ops) = start(None).await;
    let c = client(None);
    let token = Credentials::new(TOKEN);
    let input = json!({"seconds": 30});
    let short = c
        .dispatch(&Dispatch {
            endpoint: &url,
            operation: "sleep",
            input: &input,
            job_uid: "dropped",
            attempt: 0,
            session_token: &token,
            timeout: Duration::from_millis(300),
        })
        .await;
    assert!(matches!(short, Err(WorkerError::Timeout(_))), "{short:?}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The worker is free at once, not after 30 s.
    let next = dispatch(&c, &url, "sleep", json!({}), "next", 0, TOKEN).await;
    assert!(next.is_ok(), "{next:?}");
    assert_eq!(ops.runs.load(Ordering::SeqCst), 2);
}

#[test]
fn the_environment_is_read_as_documented() {
    let env = |vars: &'static [(&'static str, &'static str)]| {
        move |k: &str| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    };
    let c = Config::from_env(env(&[("GPUPOOL_SESSION_TOKEN", "t")])).unwrap();
    assert_eq!(
        (c.port, c.api_key.as_deref(), c.health_path.as_str()),
        (8000, None, "/health")
    );
    assert!(
        Config::from_env(env(&[]))
            .unwrap_err()
            .contains("GPUPOOL_SESSION_TOKEN")
    );
    assert!(
        Config::from_env(env(&[
            ("GPUPOOL_SESSION_TOKEN", "t"),
            ("GPUPOOL_WORKER_PORT", "x")
        ]))
        .is_err()
    );
    let shown = format!(
        "{:?}",
        Config::from_env(env(&[
            ("GPUPOOL_SESSION_TOKEN", "s3cr3t"),
            ("GPUPOOL_API_KEY", "k3y")
        ]))
        .unwrap()
    );
    assert!(
        !shown.contains("s3cr3t") && !shown.contains("k3y"),
        "{shown}"
    );
}

#[test]
fn the_worker_does_not_link_the_kubernetes_client() {
    let out = std::process::Command::new(env!("CARGO"))
        .args([
            "tree",
            "-p",
            "gpupool-worker",
            "-e",
            "normal",
            "--prefix",
            "none",
            "--offline",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo tree runs");
    let tree = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(tree.contains("axum"), "{tree}");
    for forbidden in ["kube ", "kube-client", "k8s-openapi", "gpupool v"] {
        assert!(
            !tree.lines().any(|l| l.starts_with(forbidden)),
            "{forbidden} in\n{tree}"
        );
    }
}
