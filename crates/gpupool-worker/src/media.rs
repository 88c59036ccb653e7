//! Media in and tools out: inputs fetched by http(s) URL only, within size and time limits and
//! never from loopback, private or link-local addresses unless allowed; ffmpeg's tools run
//! without a shell, in their own process group, killed when the job's future is dropped; every
//! temporary file removed with its job.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

use crate::OpError;

/// Limits on what a job may fetch, from the environment.
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_input_bytes: u64,
    pub download_timeout: Duration,
    pub allow_private: bool,
    pub tool_timeout: Duration,
    /// `GPUPOOL_WORKER_REQUIRE_GPU`: health is ready only with a GPU and an NVENC encoder.
    pub require_gpu: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_input_bytes: 1 << 30,
            download_timeout: Duration::from_secs(600),
            allow_private: false,
            tool_timeout: Duration::from_secs(3600),
            require_gpu: false,
        }
    }
}

impl Limits {
    /// `GPUPOOL_WORKER_MAX_INPUT_BYTES` (1 GiB), `GPUPOOL_WORKER_DOWNLOAD_TIMEOUT_SECONDS`
    /// (600), `GPUPOOL_WORKER_ALLOW_PRIVATE_URLS` (`true` to allow; off by default),
    /// `GPUPOOL_WORKER_REQUIRE_GPU` (`true`: not ready without a GPU and NVENC).
    pub fn from_env(get: impl Fn(&str) -> Option<String>) -> Result<Self, String> {
        let mut l = Self::default();
        if let Some(v) = get("GPUPOOL_WORKER_MAX_INPUT_BYTES") {
            l.max_input_bytes = v
                .parse()
                .map_err(|_| format!("GPUPOOL_WORKER_MAX_INPUT_BYTES is not a number: {v:?}"))?;
        }
        if let Some(v) = get("GPUPOOL_WORKER_DOWNLOAD_TIMEOUT_SECONDS") {
            let s: u64 = v.parse().map_err(|_| {
                format!("GPUPOOL_WORKER_DOWNLOAD_TIMEOUT_SECONDS is not a number: {v:?}")
            })?;
            l.download_timeout = Duration::from_secs(s);
        }
        l.allow_private = get("GPUPOOL_WORKER_ALLOW_PRIVATE_URLS").as_deref() == Some("true");
        l.require_gpu = match get("GPUPOOL_WORKER_REQUIRE_GPU").as_deref() {
            None | Some("" | "false" | "0") => false,
            Some("true" | "1") => true,
            Some(v) => {
                return Err(format!(
                    "GPUPOOL_WORKER_REQUIRE_GPU must be true or false, not {v:?}"
                ));
            }
        };
        Ok(l)
    }
}

/// A job's scratch directory, removed with everything in it when dropped.
pub struct Scratch(PathBuf);

impl Scratch {
    pub fn new(job_uid: &str) -> Result<Self, OpError> {
        let safe: String = job_uid
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
            .take(64)
            .collect();
        let nonce: u64 = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let dir = std::env::temp_dir().join(format!("gpupool-worker-{safe}-{nonce:x}"));
        std::fs::create_dir_all(&dir)
            .map_err(|e| OpError::Failed(format!("cannot create a scratch directory: {e}")))?;
        Ok(Self(dir))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Loopback, private, link-local, carrier-grade NAT, unspecified, multicast, broadcast.
pub fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => is_internal(IpAddr::V4(v4)),
            None => {
                let first = v6.segments()[0];
                v6.is_loopback()
                    || v6.is_unspecified()
                    || v6.is_multicast()
                    || first & 0xfe00 == 0xfc00
                    || first & 0xffc0 == 0xfe80
            }
        },
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            a == 0
                || (a == 100 && (64..128).contains(&b))
                || v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_broadcast()
                || v4.is_multicast()
        }
    }
}

/// A 400 naming `field`.
pub fn invalid(field: &str, message: impl Into<String>) -> OpError {
    OpError::Invalid {
        field: field.to_string(),
        message: message.into(),
    }
}

/// The URL in `field`, checked: http(s), a host, no credentials, and (unless allowed) a host
/// that resolves to public addresses only.
pub async fn checked_url(raw: &str, field: &str, limits: &Limits) -> Result<reqwest::Url, OpError> {
    let url = reqwest::Url::parse(raw).map_err(|e| invalid(field, format!("not a URL ({e})")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(invalid(field, "only http and https URLs are fetched"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(invalid(field, "credentials in the URL are not accepted"));
    }
    let host = url
        .host_str()
        .ok_or_else(|| invalid(field, "the URL has no host"))?
        .trim_matches(['[', ']'])
        .to_string();
    if !limits.allow_private {
        let port = url.port_or_known_default().unwrap_or(443);
        let addrs = tokio::net::lookup_host((host.as_str(), port))
            .await
            .map_err(|_| invalid(field, "the host does not resolve"))?;
        for a in addrs {
            if is_internal(a.ip()) {
                return Err(invalid(
                    field,
                    "the host is a loopback, private or link-local address",
                ));
            }
        }
    }
    Ok(url)
}

/// Downloads `url` into `dir/name`, refusing more than the limit and stopping at the timeout.
pub async fn fetch(
    http: &reqwest::Client,
    url: reqwest::Url,
    field: &str,
    dir: &Path,
    name: &str,
    limits: &Limits,
) -> Result<PathBuf, OpError> {
    let path = dir.join(name);
    let work =
        async {
            let mut res = http.get(url).send().await.map_err(|e| {
                OpError::Failed(format!("{field}: the download failed ({})", kind(&e)))
            })?;
            let status = res.status();
            if status.is_client_error() {
                return Err(invalid(field, format!("the server answered {status}")));
            }
            if !status.is_success() {
                return Err(OpError::Failed(format!(
                    "{field}: the server answered {status}"
                )));
            }
            let too_big = || {
                invalid(
                    field,
                    format!(
                        "larger than the worker's limit of {} bytes",
                        limits.max_input_bytes
                    ),
                )
            };
            if res
                .content_length()
                .is_some_and(|n| n > limits.max_input_bytes)
            {
                return Err(too_big());
            }
            let mut file = tokio::fs::File::create(&path)
                .await
                .map_err(|e| OpError::Failed(format!("cannot write the input: {e}")))?;
            let mut total = 0u64;
            while let Some(chunk) = res.chunk().await.map_err(|e| {
                OpError::Failed(format!("{field}: the download failed ({})", kind(&e)))
            })? {
                total += chunk.len() as u64;
                if total > limits.max_input_bytes {
                    return Err(too_big());
                }
                file.write_all(&chunk)
                    .await
                    .map_err(|e| OpError::Failed(format!("cannot write the input: {e}")))?;
            }
            file.flush()
                .await
                .map_err(|e| OpError::Failed(format!("cannot write the input: {e}")))?;
            Ok(path.clone())
        };
    match tokio::time::timeout(limits.download_timeout, work).await {
        Ok(r) => r,
        Err(_) => Err(OpError::Failed(format!(
            "{field}: the download did not finish within {} s",
            limits.download_timeout.as_secs()
        ))),
    }
}

/// A transport error's kind, without the URL (which may carry a presigned token).
fn kind(e: &reqwest::Error) -> &'static str {
    if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "could not connect"
    } else {
        "broken transfer"
    }
}

/// Runs `program` with `args` (no shell), in a process group of its own that is killed when
/// the future is dropped or `timeout` passes. Returns stdout, or stderr's tail on failure.
pub async fn run_tool(program: &str, args: &[&str], timeout: Duration) -> Result<Vec<u8>, String> {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .process_group(0);
    let child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {program}: {e}"))?;
    let pid = child.id();
    let group = KillGroup(pid);
    let out = match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(r) => r.map_err(|e| format!("{program}: {e}"))?,
        Err(_) => {
            return Err(format!(
                "{program} did not finish within {} s",
                timeout.as_secs()
            ));
        }
    };
    std::mem::forget(group);
    if out.status.success() {
        Ok(out.stdout)
    } else {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: String = err
            .chars()
            .rev()
            .take(600)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        Err(format!(
            "{program} failed ({}): {}",
            out.status,
            tail.trim()
        ))
    }
}

/// Kills a whole process group (the tool and anything it started) unless forgotten.
struct KillGroup(Option<u32>);

impl Drop for KillGroup {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            // `kill -KILL -<pgid>`: no libc binding needed, and the group id is the pid.
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &format!("-{pid}")])
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}

/// What ffprobe says of a file, in the worker's own shape.
pub fn probe_summary(ffprobe_json: &Value) -> Value {
    let num = |v: &Value| -> Option<f64> { v.as_str().and_then(|s| s.parse().ok()).or(v.as_f64()) };
    let format = &ffprobe_json["format"];
    let streams: Vec<Value> = ffprobe_json["streams"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|s| {
                    let mut o = json!({
                        "index": s["index"],
                        "type": s["codec_type"],
                        "codec": s["codec_name"],
                    });
                    for (from, to) in [
                        ("width", "width"),
                        ("height", "height"),
                        ("channels", "channels"),
                    ] {
                        if let Some(v) = s[from].as_i64() {
                            o[to] = json!(v);
                        }
                    }
                    if let Some(r) = num(&s["sample_rate"]) {
                        o["sampleRate"] = json!(r);
                    }
                    if let Some(d) = num(&s["duration"]) {
                        o["durationSeconds"] = json!(d);
                    }
                    if let Some((n, d)) =
                        s["avg_frame_rate"].as_str().and_then(|r| r.split_once('/'))
                        && let (Ok(n), Ok(d)) = (n.parse::<f64>(), d.parse::<f64>())
                        && d > 0.0
                    {
                        o["frameRate"] = json!((n / d * 1000.0).round() / 1000.0);
                    }
                    o
                })
                .collect()
        })
        .unwrap_or_default();
    json!({
        "durationSeconds": num(&format["duration"]),
        "formatName": format["format_name"],
        "sizeBytes": num(&format["size"]).map(|n| n as u64),
        "bitRate": num(&format["bit_rate"]).map(|n| n as u64),
        "streams": streams,
    })
}

/// Lower-case hex of SHA-256.
pub fn sha256_hex(data: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, data);
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// The URL as it may be shown: without its query (a presigned URL's signature is there).
pub fn shown_url(url: &reqwest::Url) -> String {
    let mut u = url.clone();
    u.set_query(None);
    u.set_fragment(None);
    u.to_string()
}

/// PUTs `body` to a presigned `url` (checked like an input URL). A 4xx is the input's fault
/// (an expired or wrong URL: not retried), anything else but a 2xx a failure to retry.
pub async fn upload(
    http: &reqwest::Client,
    url: reqwest::Url,
    field: &str,
    body: Vec<u8>,
    content_type: &str,
    limits: &Limits,
) -> Result<(), OpError> {
    let sent = http
        .put(url)
        .header("content-type", content_type)
        .body(body)
        .timeout(limits.download_timeout)
        .send()
        .await
        .map_err(|e| OpError::Failed(format!("{field}: the upload failed ({})", kind(&e))))?;
    let status = sent.status();
    if status.is_success() {
        Ok(())
    } else if status.is_client_error() {
        Err(invalid(field, format!("the upload was refused ({status})")))
    } else {
        Err(OpError::Failed(format!(
            "{field}: the upload failed ({status})"
        )))
    }
}
