//! The worker client against small workers on 127.0.0.1: every outcome the controller
//! branches on, the headers a worker relies on, and that no error shows a secret.

use std::{
    convert::Infallible,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{Router, body::Body, extract::Request, http::HeaderMap, response::Response};
use bytes::Bytes;
use gpupool::{
    provider::Credentials,
    worker::{Dispatch, WorkerClient, WorkerClientConfig, WorkerError},
};
use serde_json::{Value, json};
use tokio::{io::AsyncWriteExt, net::TcpListener, time::Instant};

const API_KEY: &str = "wk-API-KEY-secret-42";
const TOKEN: &str = "sess-TOKEN-secret-77";

#[derive(Clone, Debug)]
struct Seen {
    method: String,
    path: String,
    headers: HeaderMap,
    body: Bytes,
}

/// A worker whose one handler records the request and answers with `answer`.
async fn worker<F>(answer: F) -> (String, Arc<Mutex<Vec<Seen>>>)
where
    F: Fn(&Seen) -> Response + Send + Sync + 'static,
{
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let log = seen.clone();
    let answer = Arc::new(answer);
    let app = Router::new().fallback(move |req: Request| {
        let log = log.clone();
        let answer = answer.clone();
        async move {
            let (parts, body) = req.into_parts();
            let body = axum::body::to_bytes(body, usize::MAX)
                .await
                .unwrap_or_default();
            let s = Seen {
                method: parts.method.to_string(),
                path: parts.uri.path().to_string(),
                headers: parts.headers,
                body,
            };
            log.lock().expect("lock").push(s.clone());
            answer(&s)
        }
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://{addr}"), seen)
}

fn respond(status: u16, content_type: &str, body: impl Into<Body>) -> Response {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(body.into())
        .expect("response")
}

fn client(api_key: Option<&str>) -> WorkerClient {
    WorkerClient::new(
        api_key.map(Credentials::new),
        WorkerClientConfig {
            connect_timeout: Duration::from_secs(1),
            health_timeout: Duration::from_millis(500),
            max_output_bytes: 1024,
            max_error_body_bytes: 256,
            ..WorkerClientConfig::default()
        },
    )
    .expect("client")
}

fn token() -> Credentials {
    Credentials::new(TOKEN)
}

async fn dispatch(
    client: &WorkerClient,
    endpoint: &str,
    timeout: Duration,
) -> Result<Value, WorkerError> {
    let input = json!({"src": "s3://in/a.mp4", "codec": "av1"});
    let token = token();
    client
        .dispatch(&Dispatch {
            endpoint,
            operation: "transcode",
            input: &input,
            job_uid: "4f1c-uid",
            attempt: 2,
            session_token: &token,
            timeout,
        })
        .await
}

fn assert_clean(e: &WorkerError) {
    for text in [e.to_string(), format!("{e:?}")] {
        assert!(
            !text.contains(API_KEY) && !text.contains(TOKEN),
            "secret in {text:?}"
        );
        assert!(!text.contains("secret-"), "secret in {text:?}");
    }
}

/// Echoes the credentials back in an error body, as a careless worker might.
fn echo(s: &Seen) -> String {
    let h = |n: &str| {
        s.headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    json!({"error": format!("bad request, key={} token={}", h("x-api-key"), h("x-session-token"))})
        .to_string()
}

#[tokio::test]
async fn success_returns_the_json_output_and_sends_the_contract_headers() {
    let (base, seen) = worker(|_| {
        respond(
            200,
            "application/json",
            r#"{"url":"s3://out/a.mkv","frames":1440}"#,
        )
    })
    .await;
    let out = dispatch(&client(Some(API_KEY)), &base, Duration::from_secs(2))
        .await
        .expect("output");
    assert_eq!(out, json!({"url": "s3://out/a.mkv", "frames": 1440}));

    let s = seen.lock().expect("lock")[0].clone();
    assert_eq!(
        (s.method.as_str(), s.path.as_str()),
        ("POST", "/video/transcode")
    );
    let h = |n: &str| {
        s.headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    assert_eq!(h("x-api-key").as_deref(), Some(API_KEY));
    assert_eq!(h("x-session-token").as_deref(), Some(TOKEN));
    assert_eq!(h("x-job-id").as_deref(), Some("4f1c-uid-2"));
    assert_eq!(h("content-type").as_deref(), Some("application/json"));
    assert_eq!(
        serde_json::from_slice::<Value>(&s.body).expect("json body"),
        json!({"src": "s3://in/a.mp4", "codec": "av1"})
    );
}

#[tokio::test]
async fn without_an_api_key_no_api_key_header_is_sent() {
    let (base, seen) = worker(|_| respond(200, "application/json", "[1,2]")).await;
    let out = dispatch(&client(None), &base, Duration::from_secs(2))
        .await
        .expect("output");
    assert_eq!(out, json!([1, 2]));
    let s = seen.lock().expect("lock")[0].clone();
    assert!(s.headers.get("x-api-key").is_none());
    assert!(s.headers.get("x-session-token").is_some());
}

#[tokio::test]
async fn non_json_success_is_invalid_output() {
    let (base, _) = worker(|_| respond(200, "text/plain", "done!")).await;
    let err = dispatch(&client(Some(API_KEY)), &base, Duration::from_secs(2))
        .await
        .expect_err("text");
    assert!(
        matches!(&err, WorkerError::InvalidOutput { status: 200, detail } if detail.contains("done!")),
        "{err:?}"
    );
    assert!(!err.is_retryable());

    let (base, _) = worker(|_| respond(204, "application/json", "")).await;
    let err = dispatch(&client(Some(API_KEY)), &base, Duration::from_secs(2))
        .await
        .expect_err("empty");
    assert!(
        matches!(&err, WorkerError::InvalidOutput { status: 204, detail } if detail == "empty body"),
        "{err:?}"
    );
}

#[tokio::test]
async fn client_errors_reject_the_job_with_the_worker_message() {
    let (base, _) = worker(|_| {
        respond(
            422,
            "application/json",
            r#"{"error":"unsupported codec av2"}"#,
        )
    })
    .await;
    let err = dispatch(&client(Some(API_KEY)), &base, Duration::from_secs(2))
        .await
        .expect_err("422");
    assert_eq!(
        err,
        WorkerError::Rejected {
            status: 422,
            message: "unsupported codec av2".into()
        }
    );
    assert!(!err.is_retryable());
    assert_eq!(err.label(), "Rejected");

    // A non-JSON error body is quoted, shortened.
    let (base, _) = worker(|_| respond(400, "text/plain", "x".repeat(10_000))).await;
    match dispatch(&client(Some(API_KEY)), &base, Duration::from_secs(2)).await {
        Err(WorkerError::Rejected {
            status: 400,
            message,
        }) => assert!(message.len() < 300, "{}", message.len()),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn server_errors_are_retryable() {
    let (base, _) =
        worker(|_| respond(503, "application/json", r#"{"error":"GPU out of memory"}"#)).await;
    let err = dispatch(&client(Some(API_KEY)), &base, Duration::from_secs(2))
        .await
        .expect_err("503");
    assert_eq!(
        err,
        WorkerError::ServerError {
            status: 503,
            message: "GPU out of memory".into()
        }
    );
    assert!(err.is_retryable() && !err.instance_looks_broken());
}

#[tokio::test]
async fn wrong_credentials_are_unauthorized_and_never_echoed() {
    for status in [401, 403] {
        let (base, _) = worker(move |s| respond(status, "application/json", echo(s))).await;
        let err = dispatch(&client(Some(API_KEY)), &base, Duration::from_secs(2))
            .await
            .expect_err("auth");
        assert_eq!(err, WorkerError::Unauthorized { status });
        assert!(!err.is_retryable());
        assert_clean(&err);
    }
    // A 4xx that quotes the secrets back: redacted in the job's failure message.
    let (base, _) = worker(|s| respond(400, "application/json", echo(s))).await;
    let err = dispatch(&client(Some(API_KEY)), &base, Duration::from_secs(2))
        .await
        .expect_err("400");
    assert!(
        matches!(&err, WorkerError::Rejected { message, .. } if message.contains("<redacted>")),
        "{err:?}"
    );
    assert_clean(&err);
    let c = client(Some(API_KEY));
    assert!(!format!("{c:?}").contains(API_KEY));
}

#[tokio::test]
async fn a_slow_worker_times_out_per_attempt() {
    // The scripted worker's handler is synchronous: a separate server sleeps.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let app = Router::new().fallback(|| async {
        tokio::time::sleep(Duration::from_secs(10)).await;
        "{}"
    });
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let started = Instant::now();
    let err = dispatch(
        &client(Some(API_KEY)),
        &format!("http://{addr}"),
        Duration::from_millis(300),
    )
    .await
    .expect_err("timeout");
    let took = started.elapsed();
    assert_eq!(err, WorkerError::Timeout(Duration::from_millis(300)));
    assert!(err.is_retryable());
    assert!(
        took >= Duration::from_millis(290) && took < Duration::from_secs(3),
        "{took:?}"
    );
}

#[tokio::test]
async fn refused_and_reset_connections_look_broken() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let err = dispatch(
        &client(Some(API_KEY)),
        &format!("http://127.0.0.1:{port}"),
        Duration::from_secs(2),
    )
    .await
    .expect_err("refused");
    assert!(matches!(err, WorkerError::Connection(_)), "{err:?}");
    assert!(err.is_retryable() && err.instance_looks_broken());
    assert_clean(&err);

    // A worker that accepts, then hangs up without answering.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let _ = sock.shutdown().await;
            drop(sock);
        }
    });
    let err = dispatch(
        &client(Some(API_KEY)),
        &format!("http://{addr}"),
        Duration::from_secs(2),
    )
    .await
    .expect_err("reset");
    assert!(matches!(err, WorkerError::Connection(_)), "{err:?}");
}

#[tokio::test]
async fn oversized_output_is_refused_without_reading_it_all() {
    // Declared length over the limit.
    let (base, _) = worker(|_| {
        respond(
            200,
            "application/json",
            format!("[{}]", "1,".repeat(2000) + "1"),
        )
    })
    .await;
    let err = dispatch(&client(Some(API_KEY)), &base, Duration::from_secs(2))
        .await
        .expect_err("big");
    assert_eq!(err, WorkerError::OutputTooLarge { limit: 1024 });
    assert!(err.to_string().contains("1024"), "{err}");
    assert!(!err.is_retryable());

    // An endless chunked stream: the client stops at the limit instead of buffering forever.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let app = Router::new().fallback(|| async {
        let chunks =
            futures::stream::repeat_with(|| Ok::<_, Infallible>(Bytes::from_static(&[b' '; 512])));
        Response::builder()
            .status(200)
            .header("content-type", "application/json")
            .body(Body::from_stream(chunks))
            .expect("response")
    });
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let started = Instant::now();
    let err = dispatch(
        &client(Some(API_KEY)),
        &format!("http://{addr}"),
        Duration::from_secs(5),
    )
    .await
    .expect_err("endless");
    assert_eq!(err, WorkerError::OutputTooLarge { limit: 1024 });
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn health_is_2xx_on_the_configured_path() {
    let (base, seen) = worker(|s| match s.path.as_str() {
        "/ready" => respond(200, "text/plain", "ok"),
        "/health" => respond(503, "application/json", r#"{"error":"loading model"}"#),
        _ => respond(404, "text/plain", "no such path"),
    })
    .await;
    let c = client(Some(API_KEY));
    c.health(&base, "/ready", &token()).await.expect("healthy");
    let err = c
        .health(&base, "/health", &token())
        .await
        .expect_err("starting");
    assert_eq!(
        err,
        WorkerError::ServerError {
            status: 503,
            message: "loading model".into()
        }
    );
    let err = c.health(&base, "/nope", &token()).await.expect_err("404");
    assert!(
        matches!(err, WorkerError::Rejected { status: 404, .. }),
        "{err:?}"
    );
    let s = seen.lock().expect("lock")[0].clone();
    assert_eq!(s.method, "GET");
    assert_eq!(
        s.headers
            .get("x-session-token")
            .and_then(|v| v.to_str().ok()),
        Some(TOKEN)
    );
    assert!(s.headers.get("x-job-id").is_none());

    // Health probes have their own short timeout.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let app = Router::new().fallback(|| async {
        tokio::time::sleep(Duration::from_secs(10)).await;
        "ok"
    });
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let err = c
        .health(&format!("http://{addr}"), "/health", &token())
        .await
        .expect_err("slow");
    assert_eq!(err, WorkerError::Timeout(Duration::from_millis(500)));
}

#[tokio::test]
async fn bad_endpoints_are_invalid_requests() {
    let c = client(Some(API_KEY));
    for endpoint in ["not a url", "ftp://h", "http://user:pw@h"] {
        let err = dispatch(&c, endpoint, Duration::from_secs(1))
            .await
            .expect_err(endpoint);
        assert!(
            matches!(err, WorkerError::InvalidRequest(_)),
            "{endpoint}: {err:?}"
        );
    }
    let bad_token = Credentials::new("line\nbreak");
    let input = json!({});
    let err = c
        .dispatch(&Dispatch {
            endpoint: "http://127.0.0.1:9",
            operation: "transcode",
            input: &input,
            job_uid: "u",
            attempt: 0,
            session_token: &bad_token,
            timeout: Duration::from_secs(1),
        })
        .await
        .expect_err("bad token");
    assert!(
        matches!(&err, WorkerError::InvalidRequest(m) if !m.contains("line")),
        "{err:?}"
    );
}
