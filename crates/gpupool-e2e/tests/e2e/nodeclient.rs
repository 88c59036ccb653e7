//! The VPS video app the gateway tests play: `tests/gateway/vps-client.mjs`, a Node script
//! with a pinned axios (installed once by `hack/nodeclients.sh --axios` into the machine-local
//! cache). This module only runs it and hands back what it printed; the tests judge it.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
    path::PathBuf,
    process::{Command, Stdio},
    sync::{
        Arc, OnceLock,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use serde_json::{Value, json};

use crate::support::repo_root;

static AXIOS_DIR: OnceLock<PathBuf> = OnceLock::new();

/// The directory axios is installed in (its `node_modules/axios`), installing it on first use;
/// once per test binary.
pub fn axios_dir() -> PathBuf {
    AXIOS_DIR
        .get_or_init(|| {
            let out = Command::new(repo_root().join("hack/nodeclients.sh"))
                .arg("--axios")
                .current_dir(repo_root())
                .stderr(Stdio::inherit())
                .output()
                .expect("hack/nodeclients.sh runs (it needs node and npm)");
            assert!(
                out.status.success(),
                "hack/nodeclients.sh --axios failed: {}",
                String::from_utf8_lossy(&out.stdout)
            );
            let stdout = String::from_utf8_lossy(&out.stdout);
            let dir = PathBuf::from(stdout.lines().last().expect("the install directory").trim());
            assert!(
                dir.join("node_modules/axios").is_dir(),
                "no axios in {}",
                dir.display()
            );
            dir
        })
        .clone()
}

/// Runs the VPS client: `requests` synchronous `POST {gateway_url}/video/caption` with
/// `X-API-Key: api_key`, at most `concurrency` at once, and returns its JSON summary
/// (`requests`, `ok`, `statuses`, `p50Ms`, `p99Ms`, `results`; see the script's header).
/// Panics only when the script itself fails, never because of what the gateway answered.
pub fn run_vps_client(
    gateway_url: &str,
    api_key: &str,
    requests: usize,
    concurrency: usize,
) -> Value {
    run_vps_client_with(gateway_url, api_key, requests, concurrency, &[])
}

/// [`run_vps_client`] with more of the script's environment, e.g. `("OPERATION", "transcribe")`
/// or `("IDEMPOTENCY_PREFIX", "run-1-")`.
pub fn run_vps_client_with(
    gateway_url: &str,
    api_key: &str,
    requests: usize,
    concurrency: usize,
    env: &[(&str, &str)],
) -> Value {
    let script = repo_root().join("crates/gpupool-e2e/tests/gateway/vps-client.mjs");
    let out = Command::new("node")
        .arg(&script)
        .env("GATEWAY_URL", gateway_url)
        .env("API_KEY", api_key)
        .env("REQUESTS", requests.to_string())
        .env("CONCURRENCY", concurrency.to_string())
        .env("AXIOS_DIR", axios_dir())
        .envs(env.iter().copied())
        .current_dir(repo_root())
        .output()
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{} failed ({}):\n{stdout}\n{stderr}",
        script.display(),
        out.status
    );
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|e| {
        panic!("the VPS client's last line is not JSON ({e}): {last}\n{stderr}")
    })
}

/// A stand-in for the gateway on loopback, so the client's own contract is tested without
/// one: each POST is answered after 20 ms with a JSON echo of its path, headers and body, 200
/// (503 for `n % 10 == 7`, 401 for another key than `k1`). Returns its URL and the most
/// requests it ever had in flight at once.
fn echo_gateway() -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let in_flight = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let seen = most.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let (in_flight, most) = (in_flight.clone(), most.clone());
            std::thread::spawn(move || serve_echo(conn, &in_flight, &most));
        }
    });
    (url, seen)
}

/// The requests of one keep-alive connection, until the client closes it.
fn serve_echo(conn: TcpStream, in_flight: &AtomicUsize, most: &AtomicUsize) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut conn = conn;
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
            return;
        }
        let mut headers = Vec::new();
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            let (k, v) = line.split_once(':').unwrap();
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
        let header = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        };
        let len: usize = header("content-length").map_or(0, |l| l.parse().unwrap());
        let mut body = vec![0; len];
        reader.read_exact(&mut body).unwrap();
        let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);

        let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        most.fetch_max(now, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(20));
        in_flight.fetch_sub(1, Ordering::SeqCst);

        let status = if header("x-api-key").as_deref() != Some("k1") {
            "401 Unauthorized"
        } else if body["n"].as_u64().is_some_and(|n| n % 10 == 7) {
            "503 Service Unavailable"
        } else {
            "200 OK"
        };
        let answer = json!({
            "requestLine": request_line.trim_end(),
            "idempotencyKey": header("idempotency-key"),
            "prefer": header("prefer"),
            "body": body,
        })
        .to_string();
        let response = format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{answer}",
            answer.len()
        );
        if conn.write_all(response.as_bytes()).is_err() {
            return;
        }
    }
}

#[test]
fn the_vps_client_reports_every_answer_and_keeps_to_its_concurrency() {
    let (url, most) = echo_gateway();
    let summary = run_vps_client(&url, "k1", 30, 4);
    assert_eq!(summary["requests"], 30, "{summary}");
    assert_eq!(summary["ok"], 27, "{summary}");
    assert_eq!(
        summary["statuses"],
        json!({"200": 27, "503": 3}),
        "{summary}"
    );
    assert!(summary["p50Ms"].as_f64().unwrap() >= 20.0, "{summary}");
    assert!(
        summary["p99Ms"].as_f64() >= summary["p50Ms"].as_f64(),
        "{summary}"
    );
    let results = summary["results"].as_array().unwrap();
    for (i, r) in results.iter().enumerate() {
        assert_eq!(r["i"], i, "{r}");
        let echo = &r["body"];
        assert_eq!(echo["requestLine"], "POST /video/caption HTTP/1.1", "{r}");
        assert_eq!(
            echo["body"],
            json!({"videoUrl": format!("https://example.com/v/{i}.mp4"), "language": "en", "n": i}),
            "{r}"
        );
        // Synchronous: no Prefer: respond-async, and no idempotency key unless asked for.
        assert_eq!(echo["prefer"], Value::Null, "{r}");
        assert_eq!(echo["idempotencyKey"], Value::Null, "{r}");
    }
    let most = most.load(Ordering::SeqCst);
    assert!((2..=4).contains(&most), "{most} requests in flight at once");

    // Another operation, an idempotency key per request, and a key the server refuses.
    let summary = run_vps_client_with(
        &url,
        "wrong",
        3,
        3,
        &[
            ("OPERATION", "transcribe"),
            ("IDEMPOTENCY_PREFIX", "run-1-"),
        ],
    );
    assert_eq!(summary["ok"], 0, "{summary}");
    assert_eq!(summary["statuses"], json!({"401": 3}), "{summary}");
    let r = &summary["results"][2];
    assert_eq!(
        r["body"]["requestLine"], "POST /video/transcribe HTTP/1.1",
        "{r}"
    );
    assert_eq!(r["body"]["idempotencyKey"], "run-1-2", "{r}");

    // No server at all: every request is counted as an error, and the script still exits 0.
    let dead = TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_url = format!("http://{}", dead.local_addr().unwrap());
    drop(dead);
    let summary = run_vps_client(&dead_url, "k1", 2, 2);
    assert_eq!(summary["statuses"], json!({"error": 2}), "{summary}");
    assert_eq!(summary["results"][0]["status"], Value::Null, "{summary}");
}
