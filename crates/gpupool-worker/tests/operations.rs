//! The operations on real media: a video the test makes with ffmpeg (`testsrc`, `sine`), served
//! from a loopback HTTP server, run by the worker through the operator's own client, outputs
//! PUT to a loopback server standing in for presigned URLs and checked by probing them; and
//! each bad input refused with a 400 naming the field, nothing left on disk, the next job run.
//! Needs ffmpeg and ffprobe (`hack/ffmpeg.sh`, run by `make test`).

use std::{sync::Arc, time::Duration};

use axum::{Router, extract::Path, http::StatusCode, routing::get};
use gpupool::{
    provider::Credentials,
    worker::{Dispatch, WorkerClient, WorkerClientConfig, WorkerError},
};
use gpupool_worker::{Config, Worker, media::Limits, ops::VideoOps};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TOKEN: &str = "probe-session-token";

/// A 2 s 320x240 H.264 video with a 440 Hz AAC tone, and a file of garbage.
fn media_dir() -> std::path::PathBuf {
    static DIR: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("gpupool-probe-media-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = std::process::Command::new("ffmpeg")
            .args([
                "-hide_banner",
                "-loglevel",
                "error",
                "-y",
                "-f",
                "lavfi",
                "-i",
                "testsrc=duration=2:size=320x240:rate=25",
                "-f",
                "lavfi",
                "-i",
                "sine=frequency=440:duration=2:sample_rate=44100",
                "-c:v",
                "libx264",
                "-pix_fmt",
                "yuv420p",
                "-c:a",
                "aac",
                "-shortest",
            ])
            .arg(dir.join("clip.mp4"))
            .output()
            .expect("ffmpeg runs (hack/ffmpeg.sh installs it)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::write(dir.join("garbage.mp4"), vec![0x5a; 50_000]).unwrap();
        std::fs::write(
            dir.join("subs.vtt"),
            "WEBVTT\n\n00:00:00.000 --> 00:00:02.000\nHELLO FROM THE TOP\n",
        )
        .unwrap();
        dir
    })
    .clone()
}

/// What the upload stand-in received, by path.
type Uploads = Arc<std::sync::Mutex<std::collections::HashMap<String, (String, Vec<u8>)>>>;

/// Serves the media directory at `/media/{name}`, and takes PUTs at `/up/{name}` (a presigned
/// URL's stand-in: the query is ignored; `/up/expired` answers 403).
async fn media_server() -> String {
    media_server_with(Uploads::default()).await
}

async fn media_server_with(uploads: Uploads) -> String {
    let dir = media_dir();
    let app = Router::new()
        .route(
            "/up/{name}",
            axum::routing::put(
                move |Path(name): Path<String>,
                      headers: axum::http::HeaderMap,
                      body: axum::body::Bytes| {
                    let uploads = uploads.clone();
                    async move {
                        if name == "expired" {
                            return StatusCode::FORBIDDEN;
                        }
                        let ct = headers
                            .get("content-type")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_string();
                        uploads.lock().unwrap().insert(name, (ct, body.to_vec()));
                        StatusCode::OK
                    }
                },
            ),
        )
        .route(
            "/media/{name}",
            get(move |Path(name): Path<String>| {
                let dir = dir.clone();
                async move {
                    match std::fs::read(dir.join(name)) {
                        Ok(b) => (StatusCode::OK, b),
                        Err(_) => (StatusCode::NOT_FOUND, Vec::new()),
                    }
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

/// A server that answers headers and one byte, then hangs.
async fn hanging_server() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\nx")
                    .await;
                tokio::time::sleep(Duration::from_secs(3600)).await;
            });
        }
    });
    format!("http://{addr}/video.mp4")
}

async fn worker(limits: Limits) -> String {
    worker_with(VideoOps::new(limits).unwrap()).await
}

async fn worker_with(ops: VideoOps) -> String {
    let config =
        Config::from_env(|k| (k == "GPUPOOL_SESSION_TOKEN").then(|| TOKEN.to_string())).unwrap();
    let w = Worker::new(config, Arc::new(ops));
    let (addr, server) = w.serve("127.0.0.1:0".parse().unwrap()).await.unwrap();
    tokio::spawn(server);
    format!("http://{addr}")
}

fn loopback() -> Limits {
    Limits {
        allow_private: true,
        ..Limits::default()
    }
}

async fn probe(endpoint: &str, input: Value, uid: &str) -> Result<Value, WorkerError> {
    run(endpoint, "probe", input, uid).await
}

async fn run(
    endpoint: &str,
    operation: &str,
    input: Value,
    uid: &str,
) -> Result<Value, WorkerError> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let c = WorkerClient::new(None, WorkerClientConfig::default()).unwrap();
    let token = Credentials::new(TOKEN);
    c.dispatch(&Dispatch {
        endpoint,
        operation,
        input: &input,
        job_uid: uid,
        attempt: 0,
        session_token: &token,
        timeout: Duration::from_secs(30),
    })
    .await
}

fn scratch_left(uid: &str) -> bool {
    std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .filter_map(Result::ok)
        .any(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(&format!("gpupool-worker-{uid}-"))
        })
}

#[tokio::test]
async fn probe_reports_the_duration_streams_and_codecs_of_a_real_video() {
    let media = media_server().await;
    let w = worker(loopback()).await;
    let out = probe(
        &w,
        json!({"videoUrl": format!("{media}/media/clip.mp4")}),
        "probe-ok",
    )
    .await
    .unwrap();
    let d = out["durationSeconds"].as_f64().unwrap();
    assert!((1.9..2.2).contains(&d), "{out:#}");
    let streams = out["streams"].as_array().unwrap();
    let video = streams.iter().find(|s| s["type"] == "video").unwrap();
    assert_eq!(
        (
            video["codec"].as_str(),
            video["width"].as_i64(),
            video["height"].as_i64()
        ),
        (Some("h264"), Some(320), Some(240))
    );
    assert_eq!(video["frameRate"], 25.0);
    let audio = streams.iter().find(|s| s["type"] == "audio").unwrap();
    assert_eq!(
        (audio["codec"].as_str(), audio["sampleRate"].as_f64()),
        (Some("aac"), Some(44100.0))
    );
    assert!(out["sizeBytes"].as_u64().unwrap() > 1000);
    assert!(!scratch_left("probe-ok"), "the input was left on disk");
    eprintln!("probe: {out}");
}

#[tokio::test]
async fn bad_input_is_refused_naming_the_field_and_leaves_nothing_behind() {
    let media = media_server().await;
    let strict = worker(Limits::default()).await;
    let small = worker(Limits {
        max_input_bytes: 1000,
        ..loopback()
    })
    .await;
    let open = worker(loopback()).await;
    let cases: Vec<(&str, &String, Value, &str)> = vec![
        ("missing", &open, json!({}), "videoUrl: required"),
        (
            "not a string",
            &open,
            json!({"videoUrl": 5}),
            "videoUrl: required",
        ),
        (
            "unknown field",
            &open,
            json!({"videoUrl": "http://x/y", "codec": "h264"}),
            "codec: unknown field",
        ),
        (
            "file URL",
            &open,
            json!({"videoUrl": "file:///etc/passwd"}),
            "videoUrl: only http and https",
        ),
        (
            "loopback",
            &strict,
            json!({"videoUrl": format!("{media}/media/clip.mp4")}),
            "loopback, private or link-local",
        ),
        (
            "metadata address",
            &strict,
            json!({"videoUrl": "http://169.254.169.254/latest"}),
            "loopback, private or link-local",
        ),
        (
            "over the limit",
            &small,
            json!({"videoUrl": format!("{media}/media/clip.mp4")}),
            "larger than the worker's limit",
        ),
        (
            "corrupt video",
            &open,
            json!({"videoUrl": format!("{media}/media/garbage.mp4")}),
            "not a readable media file",
        ),
        (
            "not found",
            &open,
            json!({"videoUrl": format!("{media}/media/nope.mp4")}),
            "404",
        ),
    ];
    for (i, (what, w, input, expect)) in cases.into_iter().enumerate() {
        let uid = format!("bad-{i}");
        match probe(w, input, &uid).await {
            Err(e @ WorkerError::Rejected { .. }) => {
                assert!(e.to_string().contains(expect), "{what}: {e}");
                assert!(!e.is_retryable(), "{what}");
            }
            other => panic!("{what}: {other:?}"),
        }
        assert!(!scratch_left(&uid), "{what}: scratch left on disk");
    }
    // And the next job runs.
    let ok = probe(
        &open,
        json!({"videoUrl": format!("{media}/media/clip.mp4")}),
        "after-bad",
    )
    .await;
    assert!(ok.is_ok(), "{ok:?}");
}

#[tokio::test]
async fn a_hung_download_ends_at_its_timeout_as_a_retryable_failure() {
    let hang = hanging_server().await;
    let media = media_server().await;
    let w = worker(Limits {
        download_timeout: Duration::from_secs(1),
        ..loopback()
    })
    .await;
    let r = probe(&w, json!({"videoUrl": hang}), "hung").await;
    match &r {
        Err(e @ WorkerError::ServerError { .. }) => {
            assert!(e.is_retryable());
            assert!(e.to_string().contains("did not finish within 1 s"), "{e}");
        }
        other => panic!("{other:?}"),
    }
    assert!(!scratch_left("hung"));
    let next = probe(
        &w,
        json!({"videoUrl": format!("{media}/media/clip.mp4")}),
        "after-hung",
    )
    .await;
    assert!(next.is_ok(), "{next:?}");
}

#[tokio::test]
async fn health_is_ready_with_the_ffmpeg_it_found() {
    let w = worker(loopback()).await;
    let res = reqwest::Client::new()
        .get(format!("{w}/health"))
        .header("x-session-token", TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let v: Value = res.json().await.unwrap();
    assert_eq!(v["ready"], true, "{v}");
    assert!(
        v["details"]["ffmpeg"]
            .as_str()
            .unwrap()
            .starts_with("ffmpeg version"),
        "{v}"
    );
    assert_eq!(
        v["operations"],
        json!(["probe", "thumbnails", "transcode", "caption"])
    );
}

/// ffprobe of bytes the test received: (codec, width, height).
fn probe_bytes(bytes: &[u8], name: &str) -> (String, i64, i64) {
    probe_stream(bytes, name, 0)
}

fn probe_stream(bytes: &[u8], name: &str, index: usize) -> (String, i64, i64) {
    let path = media_dir().join(format!("got-{name}"));
    std::fs::write(&path, bytes).unwrap();
    let out = std::process::Command::new("ffprobe")
        .args(["-v", "error", "-print_format", "json", "-show_streams"])
        .arg(&path)
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let s = &v["streams"][index];
    (
        s["codec_name"].as_str().unwrap_or_default().to_string(),
        s["width"].as_i64().unwrap_or(0),
        s["height"].as_i64().unwrap_or(0),
    )
}

fn sha256_hex(data: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, data);
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test]
async fn thumbnails_at_given_times_and_every_n_seconds_in_each_format() {
    let uploads = Uploads::default();
    let media = media_server_with(uploads.clone()).await;
    let w = worker(loopback()).await;
    let clip = format!("{media}/media/clip.mp4");
    let t0 = std::time::Instant::now();
    let out = run(
        &w,
        "thumbnails",
        json!({"videoUrl": clip, "times": [0.2, 1.5], "width": 160, "format": "jpeg",
               "uploadUrls": [format!("{media}/up/a.jpg?X-Amz-Signature=secret1"),
                              format!("{media}/up/b.jpg?X-Amz-Signature=secret2")]}),
        "thumbs-1",
    )
    .await
    .unwrap();
    let took = t0.elapsed();
    let outputs = out["outputs"].as_array().unwrap();
    assert_eq!(outputs.len(), 2, "{out:#}");
    let got = uploads.lock().unwrap().clone();
    for (o, name) in outputs.iter().zip(["a.jpg", "b.jpg"]) {
        let (ct, bytes) = &got[name];
        assert_eq!(ct, "image/jpeg");
        assert_eq!(o["bytes"].as_u64().unwrap() as usize, bytes.len());
        assert_eq!(o["sha256"], sha256_hex(bytes));
        // The signature is never shown back.
        assert!(!o["url"].as_str().unwrap().contains("secret"), "{o}");
        assert_eq!(probe_bytes(bytes, name), ("mjpeg".into(), 160, 120));
    }
    // testsrc moves: two times, two different pictures.
    assert_ne!(got["a.jpg"].1, got["b.jpg"].1);
    eprintln!(
        "thumbnails: 2 JPEG frames at 160x120 from a {}-byte 2 s video in {took:?}: {} and {} bytes",
        std::fs::metadata(media_dir().join("clip.mp4"))
            .unwrap()
            .len(),
        got["a.jpg"].1.len(),
        got["b.jpg"].1.len()
    );

    for (format, codec) in [("png", "png"), ("webp", "webp")] {
        let out = run(
            &w,
            "thumbnails",
            json!({"videoUrl": clip, "everySeconds": 0.5, "format": format,
                   "uploadUrls": (0..8).map(|i| format!("{media}/up/{format}-{i}")).collect::<Vec<_>>()}),
            &format!("thumbs-{format}"),
        )
        .await
        .unwrap();
        // Every 0.5 s of a 2 s video: 0, 0.5, 1, 1.5; the other URLs are left unused.
        let times: Vec<f64> = out["outputs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o["timeSeconds"].as_f64().unwrap())
            .collect();
        assert_eq!(times, [0.0, 0.5, 1.0, 1.5], "{out:#}");
        let got = uploads.lock().unwrap().clone();
        assert_eq!(
            probe_bytes(&got[&format!("{format}-0")].1, format),
            (codec.into(), 320, 240)
        );
        assert!(!got.contains_key(&format!("{format}-4")));
    }
}

#[tokio::test]
async fn bad_thumbnail_requests_are_refused_naming_the_field() {
    let media = media_server().await;
    let w = worker(loopback()).await;
    let clip = format!("{media}/media/clip.mp4");
    let up = |n: &str| format!("{media}/up/{n}");
    let cases = vec![
        (
            "no urls",
            json!({"videoUrl": clip, "times": [1]}),
            "uploadUrls: required",
        ),
        (
            "both",
            json!({"videoUrl": clip, "times": [1], "everySeconds": 1, "uploadUrls": [up("x")]}),
            "times: give exactly one",
        ),
        (
            "neither",
            json!({"videoUrl": clip, "uploadUrls": [up("x")]}),
            "times: give exactly one",
        ),
        (
            "format",
            json!({"videoUrl": clip, "times": [1], "format": "gif", "uploadUrls": [up("x")]}),
            "format: must be",
        ),
        (
            "width",
            json!({"videoUrl": clip, "times": [1], "width": 5, "uploadUrls": [up("x")]}),
            "width: must be",
        ),
        (
            "negative time",
            json!({"videoUrl": clip, "times": [-1], "uploadUrls": [up("x")]}),
            "times: each must be",
        ),
        (
            "count",
            json!({"videoUrl": clip, "times": [0, 1], "uploadUrls": [up("x")]}),
            "uploadUrls: give one upload destination per entry",
        ),
        (
            "s3 keys without a bucket",
            json!({"videoUrl": clip, "times": [1], "s3Keys": ["a.jpg"]}),
            "s3Keys: this worker has no S3 storage",
        ),
        (
            "both destinations",
            json!({"videoUrl": clip, "times": [1], "s3Keys": ["a.jpg"], "uploadUrls": [up("x")]}),
            "s3Keys: give uploadUrls or s3Keys, not both",
        ),
        (
            "past the end",
            json!({"videoUrl": clip, "times": [9], "uploadUrls": [up("x")]}),
            "times: 9 s is past the end",
        ),
        (
            "every too small",
            json!({"videoUrl": clip, "everySeconds": 0.01, "uploadUrls": [up("x")]}),
            "everySeconds: must be",
        ),
        (
            "upload refused",
            json!({"videoUrl": clip, "times": [1], "uploadUrls": [up("expired")]}),
            "uploadUrls: the upload was refused (403",
        ),
        (
            "upload to file",
            json!({"videoUrl": clip, "times": [1], "uploadUrls": ["file:///tmp/x"]}),
            "uploadUrls: only http and https",
        ),
    ];
    for (i, (what, input, expect)) in cases.into_iter().enumerate() {
        let uid = format!("tbad-{i}");
        match run(&w, "thumbnails", input, &uid).await {
            Err(e @ WorkerError::Rejected { .. }) => {
                assert!(e.to_string().contains(expect), "{what}: {e}")
            }
            other => panic!("{what}: {other:?}"),
        }
        assert!(!scratch_left(&uid), "{what}: scratch left on disk");
    }
}

#[tokio::test]
async fn transcode_to_h264_mp4_and_vp9_webm_reports_the_encoder_that_ran() {
    let uploads = Uploads::default();
    let media = media_server_with(uploads.clone()).await;
    let w = worker(loopback()).await;
    let clip = format!("{media}/media/clip.mp4");
    let t0 = std::time::Instant::now();
    let out = run(
        &w,
        "transcode",
        json!({"videoUrl": clip, "videoCodec": "h264", "crf": 30, "width": 160,
               "audioBitrateKbps": 64, "uploadUrl": format!("{media}/up/out.mp4?sig=s3cr3t")}),
        "tc-1",
    )
    .await
    .unwrap();
    let took = t0.elapsed();
    let o = &out["outputs"][0];
    assert_eq!(
        (o["encoder"].as_str(), o["hardware"].as_bool()),
        (Some("libx264"), Some(false)),
        "{out:#}"
    );
    assert_eq!(
        (o["width"].as_i64(), o["height"].as_i64()),
        (Some(160), Some(120))
    );
    let d = o["durationSeconds"].as_f64().unwrap();
    assert!((1.9..2.2).contains(&d), "{out:#}");
    assert!(!o["url"].as_str().unwrap().contains("s3cr3t"));
    let got = uploads.lock().unwrap().clone();
    let (ct, bytes) = &got["out.mp4"];
    assert_eq!(ct, "video/mp4");
    assert_eq!(o["sha256"], sha256_hex(bytes));
    assert_eq!(probe_stream(bytes, "out.mp4", 0), ("h264".into(), 160, 120));
    assert_eq!(probe_stream(bytes, "out.mp4", 1).0, "aac");
    eprintln!(
        "transcode: 2 s 320x240 -> {} bytes of H.264 160x120 mp4 ({}) in {took:?}",
        bytes.len(),
        o["encoder"]
    );

    let out = run(
        &w,
        "transcode",
        json!({"videoUrl": clip, "container": "webm", "uploadUrl": format!("{media}/up/out.webm")}),
        "tc-2",
    )
    .await
    .unwrap();
    assert_eq!(out["outputs"][0]["encoder"], "libvpx-vp9", "{out:#}");
    let got = uploads.lock().unwrap().clone();
    let bytes = &got["out.webm"].1;
    assert_eq!(probe_stream(bytes, "out.webm", 0), ("vp9".into(), 320, 240));
    assert_eq!(probe_stream(bytes, "out.webm", 1).0, "opus");
}

#[tokio::test]
async fn bad_transcode_requests_are_refused_and_a_missing_gpu_is_retryable() {
    let media = media_server().await;
    let w = worker(loopback()).await;
    let clip = format!("{media}/media/clip.mp4");
    let up = format!("{media}/up/x");
    let cases = vec![
        (
            "codec",
            json!({"videoUrl": clip, "videoCodec": "divx", "uploadUrl": up}),
            "videoCodec: must be one of",
        ),
        (
            "both rates",
            json!({"videoUrl": clip, "crf": 20, "bitrateKbps": 900, "uploadUrl": up}),
            "crf: give crf or bitrateKbps",
        ),
        (
            "crf range",
            json!({"videoUrl": clip, "crf": 99, "uploadUrl": up}),
            "crf: must be an integer",
        ),
        (
            "webm with h264",
            json!({"videoUrl": clip, "container": "webm", "videoCodec": "h264", "uploadUrl": up}),
            "container: webm holds",
        ),
        (
            "no upload",
            json!({"videoUrl": clip}),
            "uploadUrl: required",
        ),
        (
            "width",
            json!({"videoUrl": clip, "width": 8, "uploadUrl": up}),
            "width: must be",
        ),
    ];
    for (i, (what, input, expect)) in cases.into_iter().enumerate() {
        let uid = format!("tcbad-{i}");
        match run(&w, "transcode", input, &uid).await {
            Err(e @ WorkerError::Rejected { .. }) => {
                assert!(e.to_string().contains(expect), "{what}: {e}")
            }
            other => panic!("{what}: {other:?}"),
        }
        assert!(!scratch_left(&uid), "{what}");
    }
    // No GPU here: `hardware: require` is the machine's shortcoming, so the operator retries
    // (on another machine), rather than failing the job.
    let r = run(
        &w,
        "transcode",
        json!({"videoUrl": clip, "hardware": "require", "uploadUrl": up}),
        "tc-hw",
    )
    .await;
    match &r {
        Err(e @ WorkerError::ServerError { .. }) => {
            assert!(e.to_string().contains("no usable NVENC"), "{e}")
        }
        other => panic!("{other:?}"),
    }
}

/// The mean absolute difference of two videos' frames at 1 s, in the top and the bottom
/// quarter (grey levels 0-255), both decoded at 320x240.
fn region_difference(a: &[u8], b: &[u8]) -> (f64, f64) {
    let frame = |bytes: &[u8], name: &str| -> Vec<u8> {
        let path = media_dir().join(format!("cmp-{name}"));
        std::fs::write(&path, bytes).unwrap();
        let out = std::process::Command::new("ffmpeg")
            .args(["-v", "error", "-ss", "1", "-i"])
            .arg(&path)
            .args([
                "-frames:v",
                "1",
                "-vf",
                "scale=320:240",
                "-f",
                "rawvideo",
                "-pix_fmt",
                "gray",
                "-",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    };
    let (fa, fb) = (frame(a, "a.mp4"), frame(b, "b.mp4"));
    assert_eq!((fa.len(), fb.len()), (320 * 240, 320 * 240));
    let mean = |rows: std::ops::Range<usize>| {
        let px: Vec<f64> = rows
            .flat_map(|r| (0..320).map(move |c| r * 320 + c))
            .map(|i| (f64::from(fa[i]) - f64::from(fb[i])).abs())
            .collect();
        px.iter().sum::<f64>() / px.len() as f64
    };
    (mean(0..60), mean(180..240))
}

#[tokio::test]
async fn caption_burns_inline_cues_and_webvtt_where_asked() {
    let uploads = Uploads::default();
    let media = media_server_with(uploads.clone()).await;
    let w = worker(loopback()).await;
    let clip = format!("{media}/media/clip.mp4");
    let original = std::fs::read(media_dir().join("clip.mp4")).unwrap();
    let t0 = std::time::Instant::now();
    let out = run(
        &w,
        "caption",
        json!({"videoUrl": clip, "fontSize": 28, "color": "#FFFF00",
               "cues": [{"start": 0, "end": 2, "text": "BURNT IN AT THE BOTTOM"}],
               "uploadUrl": format!("{media}/up/cap.mp4")}),
        "cap-1",
    )
    .await
    .unwrap();
    let took = t0.elapsed();
    assert_eq!(out["outputs"][0]["encoder"], "libx264", "{out:#}");
    let secs = out["outputs"][0]["durationSeconds"].as_f64().unwrap_or(0.0);
    assert!((secs - 2.0).abs() < 0.2, "the caption's duration: {out:#}");
    let got = uploads.lock().unwrap().clone();
    let bottom_cap = &got["cap.mp4"].1;
    assert_eq!(out["outputs"][0]["sha256"], sha256_hex(bottom_cap));
    assert_eq!(
        probe_stream(bottom_cap, "cap.mp4", 0),
        ("h264".into(), 320, 240)
    );
    let (top, bottom) = region_difference(&original, bottom_cap);
    // The text changed the bottom of the picture, and (re-encoding aside) not the top.
    assert!(
        bottom > 3.0 && bottom > 4.0 * top,
        "top {top:.2}, bottom {bottom:.2}"
    );
    eprintln!(
        "caption: 1 cue burnt into a 2 s 320x240 video in {took:?}, {} bytes; mean grey difference top {top:.2}, bottom {bottom:.2}",
        bottom_cap.len()
    );

    run(
        &w,
        "caption",
        json!({"videoUrl": clip, "subtitlesUrl": format!("{media}/media/subs.vtt"), "position": "top",
               "uploadUrl": format!("{media}/up/cap-top.mp4")}),
        "cap-2",
    )
    .await
    .unwrap();
    let got = uploads.lock().unwrap().clone();
    let (top, bottom) = region_difference(&original, &got["cap-top.mp4"].1);
    assert!(
        top > 3.0 && top > 4.0 * bottom,
        "top {top:.2}, bottom {bottom:.2}"
    );
}

#[tokio::test]
async fn bad_caption_requests_are_refused_naming_the_field() {
    let media = media_server().await;
    let w = worker(loopback()).await;
    let clip = format!("{media}/media/clip.mp4");
    let up = format!("{media}/up/x");
    let cue = json!([{"start": 0, "end": 1, "text": "hi"}]);
    let cases = vec![
        (
            "neither",
            json!({"videoUrl": clip, "uploadUrl": up}),
            "cues: give exactly one",
        ),
        (
            "both",
            json!({"videoUrl": clip, "cues": cue, "subtitlesUrl": format!("{media}/media/subs.vtt"), "uploadUrl": up}),
            "cues: give exactly one",
        ),
        (
            "end before start",
            json!({"videoUrl": clip, "cues": [{"start": 2, "end": 1, "text": "x"}], "uploadUrl": up}),
            "cues: cue 0 needs",
        ),
        (
            "empty text",
            json!({"videoUrl": clip, "cues": [{"start": 0, "end": 1, "text": " "}], "uploadUrl": up}),
            "cues: cue 0 needs",
        ),
        (
            "colour",
            json!({"videoUrl": clip, "cues": cue, "color": "red", "uploadUrl": up}),
            "color: must be #RRGGBB",
        ),
        (
            "position",
            json!({"videoUrl": clip, "cues": cue, "position": "left", "uploadUrl": up}),
            "position: must be",
        ),
        (
            "font size",
            json!({"videoUrl": clip, "cues": cue, "fontSize": 1, "uploadUrl": up}),
            "fontSize: must be",
        ),
        (
            "subtitles not text",
            json!({"videoUrl": clip, "subtitlesUrl": format!("{media}/media/garbage.mp4"), "uploadUrl": up}),
            "subtitlesUrl: the subtitles could not be burnt in",
        ),
    ];
    for (i, (what, input, expect)) in cases.into_iter().enumerate() {
        let uid = format!("capbad-{i}");
        match run(&w, "caption", input, &uid).await {
            Err(e @ WorkerError::Rejected { .. }) => {
                assert!(e.to_string().contains(expect), "{what}: {e}")
            }
            other => panic!("{what}: {other:?}"),
        }
        assert!(!scratch_left(&uid), "{what}");
    }
}

/// With `GPUPOOL_WORKER_REQUIRE_GPU`, a machine without a visible GPU (this one) is not
/// ready, and says why; without it, the same machine is ready and shows what it found.
#[tokio::test]
async fn health_requires_a_gpu_only_when_told() {
    let has_gpu = std::process::Command::new("nvidia-smi")
        .arg("-L")
        .output()
        .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains("GPU "));
    if has_gpu {
        eprintln!("a GPU is visible here: the no-GPU case cannot be shown on this machine");
    }
    let get = |w: String| async move {
        let res = reqwest::Client::new()
            .get(format!("{w}/health"))
            .header("x-session-token", TOKEN)
            .send()
            .await
            .unwrap();
        (res.status().as_u16(), res.json::<Value>().await.unwrap())
    };
    let limits =
        Limits::from_env(|k| (k == "GPUPOOL_WORKER_REQUIRE_GPU").then(|| "true".into())).unwrap();
    assert!(limits.require_gpu);
    let (status, body) = get(worker(limits).await).await;
    let gpu = &body["details"]["gpu"];
    assert_eq!(gpu["required"], true, "{body}");
    if !has_gpu {
        assert_eq!(status, 503, "{body}");
        assert_eq!(body["ready"], false, "{body}");
        assert!(gpu["error"].as_str().unwrap().contains("no GPU"), "{body}");
    }
    let (status, body) = get(worker(loopback()).await).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["details"]["gpu"]["required"], false, "{body}");
    assert!(body["details"]["gpu"]["devices"].is_array(), "{body}");
    let err = Limits::from_env(|k| (k == "GPUPOOL_WORKER_REQUIRE_GPU").then(|| "yes".into()))
        .unwrap_err();
    assert!(err.contains("GPUPOOL_WORKER_REQUIRE_GPU"), "{err}");
}

/// Serves endless zeros: `/declared` says `Content-Length: 2147483648` (2 GiB) up front,
/// `/chunked` says nothing and just keeps sending.
async fn endless_server() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let declared = String::from_utf8_lossy(&buf[..n]).contains("/declared");
                let head: &[u8] = if declared {
                    b"HTTP/1.1 200 OK\r\nContent-Length: 2147483648\r\n\r\n"
                } else {
                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                };
                if s.write_all(head).await.is_err() {
                    return;
                }
                let zeros = vec![0u8; 1 << 20];
                let chunk = [
                    format!("{:x}\r\n", zeros.len()).into_bytes(),
                    zeros.clone(),
                    b"\r\n".to_vec(),
                ]
                .concat();
                // At most 2 GiB either way; the worker hangs up long before.
                for _ in 0..2048 {
                    let piece: &[u8] = if declared { &zeros } else { &chunk };
                    if s.write_all(piece).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    format!("http://{addr}")
}

/// A 2 GB input is refused before a byte is written (its declared length is over the 1 GiB
/// default limit); a stream with no declared length is cut at the limit. Both are a 400 on
/// `videoUrl`, nothing is left on disk, and the next job runs.
#[tokio::test]
async fn an_input_over_the_size_limit_is_refused_and_nothing_is_kept() {
    let big = endless_server().await;
    let media = media_server().await;
    let w = worker(loopback()).await;
    let started = std::time::Instant::now();
    let r = probe(
        &w,
        json!({"videoUrl": format!("{big}/declared.mp4")}),
        "two-gb",
    )
    .await;
    match &r {
        Err(WorkerError::Rejected {
            status: 400,
            message,
        }) => {
            assert!(message.contains("videoUrl"), "{message}");
            assert!(message.contains("limit of 1073741824 bytes"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the 2 GB input was downloaded before being refused"
    );
    assert!(!scratch_left("two-gb"));
    let small = worker(Limits {
        max_input_bytes: 8 << 20,
        ..loopback()
    })
    .await;
    let r = probe(
        &small,
        json!({"videoUrl": format!("{big}/chunked.mp4")}),
        "endless",
    )
    .await;
    match &r {
        Err(WorkerError::Rejected {
            status: 400,
            message,
        }) => assert!(message.contains("limit of 8388608 bytes"), "{message}"),
        other => panic!("{other:?}"),
    }
    assert!(!scratch_left("endless"));
    let next = probe(
        &small,
        json!({"videoUrl": format!("{media}/media/clip.mp4")}),
        "after-big",
    )
    .await;
    assert!(next.is_ok(), "{next:?}");
}

/// An S3-compatible server on loopback: `s3s-fs` (crates.io), built by hack/s3server.sh, with
/// SigV4 authentication, serving `root` (each directory a bucket). Killed when dropped.
struct S3Server {
    child: std::process::Child,
    endpoint: String,
    root: std::path::PathBuf,
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

const S3_KEY: &str = "AKIAGPUPOOLTEST";
const S3_SECRET: &str = "s3-secret-for-the-worker-test";

fn s3_server() -> S3Server {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../hack/s3server.sh");
    let out = std::process::Command::new(&script)
        .output()
        .expect("hack/s3server.sh runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bin = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap()
        .to_string();
    let root = std::env::temp_dir().join(format!(
        "gpupool-s3-{}-{}",
        std::process::id(),
        rand_suffix()
    ));
    std::fs::create_dir_all(root.join("media")).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = std::process::Command::new(bin)
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["--access-key", S3_KEY, "--secret-key", S3_SECRET])
        .arg(&root)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("s3s-fs starts");
    let server = S3Server {
        child,
        endpoint: format!("http://127.0.0.1:{port}"),
        root,
    };
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return server;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("s3s-fs did not listen on {port}");
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

fn s3_ops(endpoint: &str, secret: &str) -> VideoOps {
    let env = |k: &str| {
        match k {
            "GPUPOOL_WORKER_S3_BUCKET" => Some("media"),
            "GPUPOOL_WORKER_S3_ENDPOINT" => Some(endpoint),
            "GPUPOOL_WORKER_S3_PREFIX" => Some("jobs/"),
            "AWS_ACCESS_KEY_ID" => Some(S3_KEY),
            "AWS_SECRET_ACCESS_KEY" => Some(secret),
            _ => None,
        }
        .map(str::to_string)
    };
    VideoOps::new(loopback())
        .unwrap()
        .with_s3(gpupool_worker::s3::S3::from_env(env).unwrap())
}

/// Outputs to S3-compatible storage configured by environment: a transcode and two
/// thumbnails land in the bucket of a real S3 server on loopback (s3s-fs, which checks the
/// SigV4 signature), with the sizes and digests the answer gives; a wrong secret is refused by
/// the server, which the worker reports as a 400 on `s3Key` (not retried).
#[tokio::test]
async fn outputs_go_to_an_s3_bucket_set_by_environment() {
    let s3 = s3_server();
    let media = media_server().await;
    let clip = format!("{media}/media/clip.mp4");
    let w = worker_with(s3_ops(&s3.endpoint, S3_SECRET)).await;
    let out = run(
        &w,
        "transcode",
        json!({"videoUrl": clip, "s3Key": "out/small.mp4", "width": 160}),
        "s3-transcode",
    )
    .await
    .unwrap();
    let o = &out["outputs"][0];
    assert_eq!(o["url"], "s3://media/jobs/out/small.mp4", "{out}");
    let stored = std::fs::read(s3.root.join("media/jobs/out/small.mp4"))
        .expect("the object is in the bucket");
    assert_eq!(o["bytes"].as_u64(), Some(stored.len() as u64));
    assert_eq!(
        o["sha256"].as_str(),
        Some(gpupool_worker::media::sha256_hex(&stored).as_str())
    );
    let thumbs = run(
        &w,
        "thumbnails",
        json!({"videoUrl": clip, "times": [0.2, 1.5], "s3Keys": ["t/0.jpg", "t/1.jpg"]}),
        "s3-thumbs",
    )
    .await
    .unwrap();
    for (i, t) in thumbs["outputs"].as_array().unwrap().iter().enumerate() {
        let stored = std::fs::read(s3.root.join(format!("media/jobs/t/{i}.jpg"))).unwrap();
        assert_eq!(t["bytes"].as_u64(), Some(stored.len() as u64), "{thumbs}");
        assert_eq!(&stored[..2], &[0xff, 0xd8], "not a JPEG");
    }
    assert!(!out.to_string().contains(S3_SECRET));
    let wrong = worker_with(s3_ops(&s3.endpoint, "not-the-secret")).await;
    match run(
        &wrong,
        "transcode",
        json!({"videoUrl": clip, "s3Key": "out/denied.mp4"}),
        "s3-denied",
    )
    .await
    {
        Err(e @ WorkerError::Rejected { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("s3Key: the upload was refused (403"), "{msg}");
            assert!(!msg.contains("not-the-secret"), "{msg}");
        }
        other => panic!("{other:?}"),
    }
    assert!(!s3.root.join("media/jobs/out/denied.mp4").exists());
    assert!(!scratch_left("s3-denied"));
}
