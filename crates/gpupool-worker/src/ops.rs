//! The video operations, on ffmpeg's tools. Each validates its whole input before anything
//! runs (a 400 naming the field otherwise).
//!
//! Built: `probe`, `thumbnails`, `transcode` and `caption`, outputs PUT to presigned URLs.
//! Still to come (issue 16): uploads to S3 configured by environment.

use serde_json::{Map, Value, json};

use crate::{
    OpError, Operations,
    media::{
        Limits, Scratch, checked_url, fetch, invalid, probe_summary, run_tool, sha256_hex,
        shown_url, upload,
    },
    s3::{S3, checked_key},
};

/// Where an output goes: a URL to PUT to, how it is shown, and the input field it came from.
struct Dest {
    url: reqwest::Url,
    shown: String,
    field: &'static str,
}

/// Most frames one `thumbnails` job makes.
pub const MAX_THUMBNAILS: usize = 100;

pub struct VideoOps {
    http: reqwest::Client,
    limits: Limits,
    s3: Option<S3>,
}

impl VideoOps {
    pub fn new(limits: Limits) -> Result<Self, String> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(10))
            // A redirect could lead to an internal address the URL check never saw.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("gpupool-worker/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        Ok(Self {
            http,
            limits,
            s3: None,
        })
    }

    /// Outputs may also go to this S3 bucket (`s3Key`, `s3Keys` in the input).
    #[must_use]
    pub fn with_s3(mut self, s3: Option<S3>) -> Self {
        self.s3 = s3;
        self
    }

    /// A destination in the worker's S3 bucket for the key in `raw`.
    fn s3_dest(&self, raw: &Value, field: &'static str) -> Result<Dest, OpError> {
        let Some(s3) = &self.s3 else {
            return Err(invalid(
                field,
                "this worker has no S3 storage (GPUPOOL_WORKER_S3_BUCKET is not set): give presigned URLs",
            ));
        };
        let (url, shown) = s3.put(&checked_key(raw, field)?);
        Ok(Dest { url, shown, field })
    }

    /// A presigned URL destination given in `field`.
    async fn url_dest(&self, raw: &str, field: &'static str) -> Result<Dest, OpError> {
        let url = checked_url(raw, field, &self.limits).await?;
        Ok(Dest {
            shown: shown_url(&url),
            url,
            field,
        })
    }

    /// Where the one output of an operation goes: `uploadUrl`, or `s3Key` in the worker's bucket.
    async fn upload_target(&self, input: &Map<String, Value>) -> Result<Dest, OpError> {
        match (input.get("uploadUrl"), input.get("s3Key")) {
            (Some(_), Some(_)) => Err(invalid("s3Key", "give uploadUrl or s3Key, not both")),
            (None, Some(key)) => self.s3_dest(key, "s3Key"),
            (Some(Value::String(raw)), None) => self.url_dest(raw, "uploadUrl").await,
            _ => Err(invalid(
                "uploadUrl",
                "required: the presigned URL the result is PUT to (or s3Key)",
            )),
        }
    }

    /// PUTs the file at `out` to `dest`; returns the destination as shown, the size and the SHA-256.
    async fn put_output(
        &self,
        out: &std::path::Path,
        dest: Dest,
        mime: &str,
    ) -> Result<(String, usize, String), OpError> {
        let bytes = std::fs::read(out).map_err(|e| OpError::Failed(format!("no output: {e}")))?;
        let (len, sha) = (bytes.len(), sha256_hex(&bytes));
        upload(&self.http, dest.url, dest.field, bytes, mime, &self.limits).await?;
        Ok((dest.shown, len, sha))
    }

    /// ffprobe's summary of an output the worker wrote (its duration and streams).
    async fn probe_output(&self, path: &str) -> Result<Value, OpError> {
        let probed = run_tool("ffprobe", &probe_args(path), self.limits.tool_timeout)
            .await
            .map_err(OpError::Failed)?;
        Ok(probe_summary(
            &serde_json::from_slice(&probed).unwrap_or(Value::Null),
        ))
    }

    /// The destinations of a job with several outputs: `uploadUrls` or `s3Keys`, 1 to `max`.
    async fn upload_targets(
        &self,
        input: &Map<String, Value>,
        max: usize,
    ) -> Result<Vec<Dest>, OpError> {
        let (field, list) = match (input.get("uploadUrls"), input.get("s3Keys")) {
            (Some(_), Some(_)) => {
                return Err(invalid("s3Keys", "give uploadUrls or s3Keys, not both"));
            }
            (None, Some(keys)) => ("s3Keys", keys),
            (Some(urls), None) => ("uploadUrls", urls),
            (None, None) => ("uploadUrls", &Value::Null),
        };
        let list = match list.as_array() {
            Some(a) if !a.is_empty() && a.len() <= max => a,
            _ => {
                return Err(invalid(
                    field,
                    format!("required: 1 to {max} presigned URLs (or s3Keys), one per output"),
                ));
            }
        };
        let mut dests = Vec::with_capacity(list.len());
        for v in list {
            dests.push(if field == "s3Keys" {
                self.s3_dest(v, "s3Keys")?
            } else {
                let raw = v
                    .as_str()
                    .ok_or_else(|| invalid("uploadUrls", "each must be a URL string"))?;
                self.url_dest(raw, "uploadUrls").await?
            });
        }
        Ok(dests)
    }

    async fn probe(&self, uid: &str, input: &Map<String, Value>) -> Result<Value, OpError> {
        only_fields(input, &["videoUrl"])?;
        let (_scratch, _, mut summary) = self.fetch_and_probe(uid, input).await?;
        summary["operation"] = json!("probe");
        Ok(summary)
    }
}

impl VideoOps {
    /// Fetches `videoUrl` into a scratch directory and probes it.
    async fn fetch_and_probe(
        &self,
        uid: &str,
        input: &Map<String, Value>,
    ) -> Result<(Scratch, String, Value), OpError> {
        let raw = input
            .get("videoUrl")
            .and_then(Value::as_str)
            .ok_or_else(|| invalid("videoUrl", "required: the http(s) URL of the video"))?;
        let url = checked_url(raw, "videoUrl", &self.limits).await?;
        let scratch = Scratch::new(uid)?;
        let file = fetch(
            &self.http,
            url,
            "videoUrl",
            scratch.path(),
            "input",
            &self.limits,
        )
        .await?;
        let path = file.to_string_lossy().to_string();
        let out = run_tool("ffprobe", &probe_args(&path), self.limits.tool_timeout)
            .await
            .map_err(|e| invalid("videoUrl", format!("not a readable media file ({e})")))?;
        let parsed: Value = serde_json::from_slice(&out)
            .map_err(|e| OpError::Failed(format!("ffprobe printed no JSON: {e}")))?;
        Ok((scratch, path, probe_summary(&parsed)))
    }

    /// Frames at given `times` or every `everySeconds`, as JPEG, PNG or WebP, `width` wide
    /// (height kept in proportion), each PUT to the next of `uploadUrls`.
    async fn thumbnails(&self, uid: &str, input: &Map<String, Value>) -> Result<Value, OpError> {
        only_fields(
            input,
            &[
                "videoUrl",
                "times",
                "everySeconds",
                "format",
                "width",
                "uploadUrls",
                "s3Keys",
            ],
        )?;
        let format = match input.get("format").map(|v| v.as_str()) {
            None => "jpeg",
            Some(Some(f @ ("jpeg" | "png" | "webp"))) => f,
            Some(_) => return Err(invalid("format", "must be jpeg, png or webp")),
        };
        let width = match input.get("width") {
            None => None,
            Some(w) => match w.as_u64() {
                Some(w @ 16..=3840) => Some(w),
                _ => return Err(invalid("width", "must be an integer from 16 to 3840")),
            },
        };
        let checked = self.upload_targets(input, MAX_THUMBNAILS).await?;
        let times: Option<Vec<f64>> = match input.get("times") {
            None => None,
            Some(Value::Array(a)) if !a.is_empty() => Some(
                a.iter()
                    .map(|t| t.as_f64().filter(|t| *t >= 0.0))
                    .collect::<Option<_>>()
                    .ok_or_else(|| {
                        invalid("times", "each must be a number of seconds, at least 0")
                    })?,
            ),
            Some(_) => return Err(invalid("times", "must be a non-empty array of seconds")),
        };
        let every = match input.get("everySeconds") {
            None => None,
            Some(v) => Some(v.as_f64().filter(|s| *s >= 0.1).ok_or_else(|| {
                invalid("everySeconds", "must be a number of seconds, at least 0.1")
            })?),
        };
        if times.is_some() == every.is_some() {
            return Err(invalid(
                "times",
                "give exactly one of times and everySeconds",
            ));
        }
        if let Some(t) = &times
            && t.len() != checked.len()
        {
            return Err(invalid(
                checked[0].field,
                "give one upload destination per entry of times",
            ));
        }
        let (scratch, path, summary) = self.fetch_and_probe(uid, input).await?;
        let duration = summary["durationSeconds"].as_f64().unwrap_or(0.0);
        let times = match (times, every) {
            (Some(t), _) => {
                if let Some(late) = t.iter().find(|t| **t >= duration) {
                    return Err(invalid(
                        "times",
                        format!("{late} s is past the end of the video ({duration} s)"),
                    ));
                }
                t
            }
            (None, Some(e)) => (0..checked.len())
                .map(|i| i as f64 * e)
                .take_while(|t| *t < duration)
                .collect(),
            (None, None) => unreachable!("checked above"),
        };
        let (ext, mime) = match format {
            "png" => ("png", "image/png"),
            "webp" => ("webp", "image/webp"),
            _ => ("jpg", "image/jpeg"),
        };
        let scale = width.map(|w| format!("scale={w}:-2"));
        let mut outputs = Vec::new();
        for (i, (t, dest)) in times.iter().zip(checked).enumerate() {
            let out = scratch.path().join(format!("frame-{i}.{ext}"));
            let out_s = out.to_string_lossy().to_string();
            let ts = format!("{t:.3}");
            let mut args = vec![
                "-v",
                "error",
                "-y",
                "-ss",
                &ts,
                "-i",
                &path,
                "-frames:v",
                "1",
            ];
            if let Some(s) = &scale {
                args.extend(["-vf", s.as_str()]);
            }
            args.push(&out_s);
            run_tool("ffmpeg", &args, self.limits.tool_timeout)
                .await
                .map_err(OpError::Failed)?;
            let bytes = std::fs::read(&out)
                .map_err(|e| OpError::Failed(format!("ffmpeg wrote no frame: {e}")))?;
            let (len, sha) = (bytes.len(), sha256_hex(&bytes));
            upload(&self.http, dest.url, dest.field, bytes, mime, &self.limits).await?;
            outputs.push(json!({
                "url": dest.shown, "bytes": len, "sha256": sha, "timeSeconds": t,
                "format": format, "encoder": match format { "png" => "png", "webp" => "libwebp", _ => "mjpeg" },
            }));
        }
        drop(scratch);
        Ok(json!({"operation": "thumbnails", "durationSeconds": duration, "outputs": outputs}))
    }
}

/// The encoders a codec may use: NVENC first (when a GPU is visible), then software.
fn encoders_for(codec: &str) -> (&'static str, &'static [&'static str]) {
    match codec {
        "hevc" => ("hevc_nvenc", &["libx265"]),
        "av1" => ("av1_nvenc", &["libsvtav1", "libaom-av1"]),
        "vp9" => ("", &["libvpx-vp9"]),
        _ => ("h264_nvenc", &["libx264"]),
    }
}

/// Encoder names ffmpeg lists (`ffmpeg -encoders`), read once.
async fn listed_encoders(timeout: std::time::Duration) -> Vec<String> {
    static LISTED: tokio::sync::OnceCell<Vec<String>> = tokio::sync::OnceCell::const_new();
    LISTED
        .get_or_init(|| async {
            let out = run_tool("ffmpeg", &["-hide_banner", "-encoders"], timeout)
                .await
                .unwrap_or_default();
            String::from_utf8_lossy(&out)
                .lines()
                .filter_map(|l| {
                    let mut parts = l.split_whitespace();
                    let flags = parts.next()?;
                    (flags.len() == 6 && flags.starts_with(['V', 'A'])).then(|| parts.next())?
                })
                .map(str::to_string)
                .collect()
        })
        .await
        .clone()
}

/// The NVIDIA GPUs `nvidia-smi -L` lists (none when it is missing or fails), asked once: a
/// machine's GPUs do not come and go while its worker runs.
async fn gpus() -> Vec<String> {
    static GPUS: tokio::sync::OnceCell<Vec<String>> = tokio::sync::OnceCell::const_new();
    GPUS.get_or_init(|| async {
        run_tool("nvidia-smi", &["-L"], std::time::Duration::from_secs(10))
            .await
            .map(|o| {
                String::from_utf8_lossy(&o)
                    .lines()
                    .filter(|l| l.starts_with("GPU "))
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default()
    })
    .await
    .clone()
}

async fn gpu_visible() -> bool {
    !gpus().await.is_empty()
}

/// The hardware encoders ffmpeg lists (`*_nvenc`).
async fn nvenc_listed(timeout: std::time::Duration) -> Vec<String> {
    listed_encoders(timeout)
        .await
        .into_iter()
        .filter(|e| e.ends_with("_nvenc"))
        .collect()
}

/// Whether the NVENC encoder `name` can run here: ffmpeg lists it and a GPU is visible
/// (Debian's ffmpeg lists NVENC on machines without one).
async fn nvenc_usable(name: &str, timeout: std::time::Duration) -> bool {
    !name.is_empty()
        && listed_encoders(timeout).await.iter().any(|e| e == name)
        && gpu_visible().await
}

impl VideoOps {
    /// Re-encodes `videoUrl` into `container` with `videoCodec` at `crf` or `bitrateKbps`,
    /// optionally scaled to `width`/`height`, with `audio`, and PUTs it to `uploadUrl`.
    async fn transcode(&self, uid: &str, input: &Map<String, Value>) -> Result<Value, OpError> {
        only_fields(
            input,
            &[
                "videoUrl",
                "container",
                "videoCodec",
                "crf",
                "bitrateKbps",
                "width",
                "height",
                "audio",
                "audioBitrateKbps",
                "hardware",
                "uploadUrl",
                "s3Key",
            ],
        )?;
        let pick = |field: &str,
                    allowed: &[&'static str],
                    default: &'static str|
         -> Result<&'static str, OpError> {
            match input.get(field) {
                None => Ok(default),
                Some(v) => v
                    .as_str()
                    .and_then(|s| allowed.iter().find(|a| **a == s).copied())
                    .ok_or_else(|| {
                        invalid(field, format!("must be one of {}", allowed.join(", ")))
                    }),
            }
        };
        let number = |field: &str, min: u64, max: u64| -> Result<Option<u64>, OpError> {
            match input.get(field) {
                None => Ok(None),
                Some(v) => v
                    .as_u64()
                    .filter(|n| (min..=max).contains(n))
                    .map(Some)
                    .ok_or_else(|| {
                        invalid(field, format!("must be an integer from {min} to {max}"))
                    }),
            }
        };
        let container = pick("container", &["mp4", "webm", "mkv"], "mp4")?;
        let codec = pick(
            "videoCodec",
            &["h264", "hevc", "av1", "vp9"],
            if container == "webm" { "vp9" } else { "h264" },
        )?;
        let audio = pick(
            "audio",
            &["aac", "opus", "none"],
            if container == "webm" { "opus" } else { "aac" },
        )?;
        let hardware = pick("hardware", &["auto", "never", "require"], "auto")?;
        let crf = number("crf", 0, 63)?;
        let bitrate = number("bitrateKbps", 100, 200_000)?;
        if crf.is_some() && bitrate.is_some() {
            return Err(invalid("crf", "give crf or bitrateKbps, not both"));
        }
        let width = number("width", 16, 7680)?;
        let height = number("height", 16, 4320)?;
        let audio_kbps = number("audioBitrateKbps", 16, 512)?;
        if container == "webm" && (!matches!(codec, "vp9" | "av1") || audio == "aac") {
            return Err(invalid(
                "container",
                "webm holds vp9 or av1 video and opus audio",
            ));
        }
        let dest = self.upload_target(input).await?;
        let listed = listed_encoders(self.limits.tool_timeout).await;
        let (hw, software) = encoders_for(codec);
        let hw_usable = nvenc_usable(hw, self.limits.tool_timeout).await;
        if hardware == "require" && !hw_usable {
            // Not the input's fault: another machine (with a GPU) can run it.
            return Err(OpError::Failed(format!(
                "hardware: require, but no usable NVENC encoder for {codec} on this machine"
            )));
        }
        let mut candidates: Vec<&str> = Vec::new();
        if hw_usable && hardware != "never" {
            candidates.push(hw);
        }
        if hardware != "require" {
            candidates.extend(
                software
                    .iter()
                    .copied()
                    .filter(|s| listed.iter().any(|e| e == s)),
            );
        }
        if candidates.is_empty() {
            return Err(invalid(
                "videoCodec",
                format!("no {codec} encoder on this worker"),
            ));
        }
        let (scratch, path, _) = self.fetch_and_probe(uid, input).await?;
        let out = scratch.path().join(format!("output.{container}"));
        let out_s = out.to_string_lossy().to_string();
        let scale = match (width, height) {
            (None, None) => None,
            (w, h) => Some(format!(
                "scale={}:{}",
                w.map(|w| w.to_string()).unwrap_or("-2".into()),
                h.map(|h| h.to_string()).unwrap_or("-2".into())
            )),
        };
        let mut used = None;
        let mut last_error = String::new();
        for encoder in candidates {
            let mut args: Vec<String> = ["-v", "error", "-y", "-i", &path, "-map", "0:v:0"]
                .iter()
                .map(|s| s.to_string())
                .collect();
            if audio != "none" {
                args.extend(["-map".into(), "0:a?".into()]);
            }
            args.extend(["-c:v".into(), encoder.into()]);
            match (crf, bitrate) {
                (_, Some(b)) => args.extend(["-b:v".into(), format!("{b}k")]),
                (Some(c), None) if encoder.ends_with("_nvenc") => {
                    args.extend(["-cq".into(), c.to_string()])
                }
                (Some(c), None) => args.extend(["-crf".into(), c.to_string()]),
                (None, None) if encoder == "libvpx-vp9" => {
                    args.extend(["-crf".into(), "32".into(), "-b:v".into(), "0".into()])
                }
                (None, None) => {}
            }
            if encoder == "libvpx-vp9" {
                args.extend([
                    "-deadline".into(),
                    "realtime".into(),
                    "-cpu-used".into(),
                    "8".into(),
                ]);
            }
            if codec == "h264" || codec == "hevc" {
                args.extend(["-pix_fmt".into(), "yuv420p".into()]);
            }
            if let Some(s) = &scale {
                args.extend(["-vf".into(), s.clone()]);
            }
            match audio {
                "none" => args.push("-an".into()),
                a => {
                    args.extend([
                        "-c:a".into(),
                        if a == "opus" {
                            "libopus".into()
                        } else {
                            "aac".into()
                        },
                    ]);
                    if let Some(k) = audio_kbps {
                        args.extend(["-b:a".into(), format!("{k}k")]);
                    }
                }
            }
            if container == "mp4" {
                args.extend(["-movflags".into(), "+faststart".into()]);
            }
            args.push(out_s.clone());
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            match run_tool("ffmpeg", &refs, self.limits.tool_timeout).await {
                Ok(_) => {
                    used = Some(encoder);
                    break;
                }
                Err(e) => last_error = e,
            }
        }
        let encoder =
            used.ok_or_else(|| OpError::Failed(format!("the encode failed: {last_error}")))?;
        let summary = self.probe_output(&out_s).await?;
        let mime = match container {
            "webm" => "video/webm",
            "mkv" => "video/x-matroska",
            _ => "video/mp4",
        };
        let (shown, len, sha) = self.put_output(&out, dest, mime).await?;
        let video = summary["streams"]
            .as_array()
            .and_then(|a| a.iter().find(|s| s["type"] == "video").cloned())
            .unwrap_or(Value::Null);
        drop(scratch);
        Ok(json!({
            "operation": "transcode",
            "outputs": [{
                "url": shown, "bytes": len, "sha256": sha,
                "durationSeconds": summary["durationSeconds"],
                "container": container, "videoCodec": codec, "encoder": encoder,
                "hardware": encoder.ends_with("_nvenc"),
                "width": video["width"], "height": video["height"],
            }],
        }))
    }
}

/// A cue's time as SRT writes it: `HH:MM:SS,mmm`.
fn srt_time(t: f64) -> String {
    let ms = (t * 1000.0).round() as u64;
    format!(
        "{:02}:{:02}:{:02},{:03}",
        ms / 3_600_000,
        ms / 60_000 % 60,
        ms / 1000 % 60,
        ms % 1000
    )
}

/// `#RRGGBB` as libass wants it: `&H00BBGGRR`.
fn ass_colour(hex: &str) -> Option<String> {
    let h = hex.strip_prefix('#')?;
    if h.len() != 6 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    Some(format!("&H00{}{}{}", &h[4..6], &h[2..4], &h[0..2]).to_ascii_uppercase())
}

impl VideoOps {
    /// Burns subtitles (inline `cues`, or SRT/WebVTT at `subtitlesUrl`) into `videoUrl` with
    /// `fontSize`, `color` and `position`, as H.264 mp4 PUT to `uploadUrl`.
    async fn caption(&self, uid: &str, input: &Map<String, Value>) -> Result<Value, OpError> {
        only_fields(
            input,
            &[
                "videoUrl",
                "subtitlesUrl",
                "cues",
                "fontSize",
                "color",
                "position",
                "uploadUrl",
                "s3Key",
            ],
        )?;
        let font_size = match input.get("fontSize") {
            None => 24,
            Some(v) => v
                .as_u64()
                .filter(|n| (6..=200).contains(n))
                .ok_or_else(|| invalid("fontSize", "must be an integer from 6 to 200"))?,
        };
        let colour = match input.get("color") {
            None => "&H00FFFFFF".to_string(),
            Some(v) => v
                .as_str()
                .and_then(ass_colour)
                .ok_or_else(|| invalid("color", "must be #RRGGBB"))?,
        };
        // The subtitles filter reads force_style's Alignment in the legacy SSA numbering
        // (2 bottom, 6 top, 10 middle, centred), not the keypad one of ASS v4+: 8 lands the
        // text mid-left. Checked by the test, which measures where the picture changed.
        let alignment = match input.get("position").map(|v| v.as_str()) {
            None | Some(Some("bottom")) => 2,
            Some(Some("middle")) => 10,
            Some(Some("top")) => 6,
            Some(_) => return Err(invalid("position", "must be bottom, middle or top")),
        };
        let srt = match (input.get("cues"), input.get("subtitlesUrl")) {
            (Some(_), Some(_)) | (None, None) => {
                return Err(invalid("cues", "give exactly one of cues and subtitlesUrl"));
            }
            (Some(Value::Array(cues)), None) if !cues.is_empty() && cues.len() <= 10_000 => {
                let mut srt = String::new();
                for (i, c) in cues.iter().enumerate() {
                    let start = c["start"].as_f64().filter(|s| *s >= 0.0);
                    let end = c["end"].as_f64();
                    let text = c["text"].as_str().map(|t| {
                        t.chars()
                            .filter(|ch| !ch.is_control() || *ch == '\n')
                            .collect::<String>()
                    });
                    match (start, end, text) {
                        (Some(s), Some(e), Some(t)) if e > s && !t.trim().is_empty() => {
                            srt.push_str(&format!(
                                "{}\n{} --> {}\n{}\n\n",
                                i + 1,
                                srt_time(s),
                                srt_time(e),
                                t.trim()
                            ));
                        }
                        _ => {
                            return Err(invalid(
                                "cues",
                                format!(
                                    "cue {i} needs start >= 0, end > start and a non-empty text"
                                ),
                            ));
                        }
                    }
                }
                Some(srt)
            }
            (Some(_), None) => {
                return Err(invalid("cues", "must be 1 to 10000 {start, end, text}"));
            }
            (None, Some(_)) => None,
        };
        let dest = self.upload_target(input).await?;
        let subs_url = match input.get("subtitlesUrl") {
            Some(v) => Some(
                checked_url(
                    v.as_str()
                        .ok_or_else(|| invalid("subtitlesUrl", "must be a URL string"))?,
                    "subtitlesUrl",
                    &self.limits,
                )
                .await?,
            ),
            None => None,
        };
        let (scratch, path, _) = self.fetch_and_probe(uid, input).await?;
        let subs = match (srt, subs_url) {
            (Some(srt), _) => {
                let p = scratch.path().join("subs.srt");
                std::fs::write(&p, srt)
                    .map_err(|e| OpError::Failed(format!("cannot write the cues: {e}")))?;
                p
            }
            (None, Some(url)) => {
                let got = fetch(
                    &self.http,
                    url,
                    "subtitlesUrl",
                    scratch.path(),
                    "subs",
                    &self.limits,
                )
                .await?;
                let head = std::fs::read(&got).unwrap_or_default();
                let text = String::from_utf8_lossy(&head[..head.len().min(64)]).to_string();
                let ext = if text.trim_start_matches('\u{feff}').starts_with("WEBVTT") {
                    "vtt"
                } else {
                    "srt"
                };
                let named = scratch.path().join(format!("subs.{ext}"));
                std::fs::rename(&got, &named).map_err(|e| OpError::Failed(e.to_string()))?;
                named
            }
            (None, None) => unreachable!("checked above"),
        };
        let out = scratch.path().join("captioned.mp4");
        let out_s = out.to_string_lossy().to_string();
        // The scratch path holds only [A-Za-z0-9/._-] (Scratch::new), so it needs no escaping
        // in the filter graph; the style is quoted for its commas.
        let filter = format!(
            "subtitles=filename={}:force_style='FontSize={font_size},PrimaryColour={colour},Alignment={alignment}'",
            subs.to_string_lossy()
        );
        let encoder = if nvenc_usable("h264_nvenc", self.limits.tool_timeout).await {
            "h264_nvenc"
        } else {
            "libx264"
        };
        let args = [
            "-v",
            "error",
            "-y",
            "-i",
            &path,
            "-vf",
            &filter,
            "-c:v",
            encoder,
            "-pix_fmt",
            "yuv420p",
            "-c:a",
            "copy",
            "-movflags",
            "+faststart",
            &out_s,
        ];
        run_tool("ffmpeg", &args, self.limits.tool_timeout)
            .await
            .map_err(|e| {
                invalid(
                    "subtitlesUrl",
                    format!("the subtitles could not be burnt in ({e})"),
                )
            })?;
        let summary = self.probe_output(&out_s).await?;
        let (shown, len, sha) = self.put_output(&out, dest, "video/mp4").await?;
        drop(scratch);
        Ok(json!({
            "operation": "caption",
            "outputs": [{"url": shown, "bytes": len, "sha256": sha, "encoder": encoder,
                         "durationSeconds": summary["durationSeconds"],
                         "container": "mp4", "videoCodec": "h264"}],
        }))
    }
}

/// ffprobe's arguments for the JSON of `path`'s format and streams.
fn probe_args(path: &str) -> [&str; 7] {
    [
        "-v",
        "error",
        "-print_format",
        "json",
        "-show_format",
        "-show_streams",
        path,
    ]
}

/// Refuses fields the operation does not know (a typo is an error, not a silent default).
fn only_fields(input: &Map<String, Value>, known: &[&str]) -> Result<(), OpError> {
    match input.keys().find(|k| !known.contains(&k.as_str())) {
        Some(k) => Err(invalid(
            k,
            format!("unknown field; known: {}", known.join(", ")),
        )),
        None => Ok(()),
    }
}

#[async_trait::async_trait]
impl Operations for VideoOps {
    fn names(&self) -> Vec<String> {
        vec![
            "probe".into(),
            "thumbnails".into(),
            "transcode".into(),
            "caption".into(),
        ]
    }

    async fn health(&self) -> (bool, Value) {
        let t = std::time::Duration::from_secs(5);
        let version = |out: Result<Vec<u8>, String>| {
            out.map(|o| {
                String::from_utf8_lossy(&o)
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .to_string()
            })
        };
        let ffmpeg = version(run_tool("ffmpeg", &["-hide_banner", "-version"], t).await);
        let ffprobe = version(run_tool("ffprobe", &["-hide_banner", "-version"], t).await);
        let tools = ffmpeg.is_ok() && ffprobe.is_ok();
        let devices = gpus().await;
        let nvenc = if tools {
            nvenc_listed(t).await
        } else {
            Vec::new()
        };
        // With GPUPOOL_WORKER_REQUIRE_GPU, a machine without a visible GPU and an NVENC
        // encoder is not ready: the operator replaces it instead of running jobs on the CPU.
        let gpu_ok = !self.limits.require_gpu || (!devices.is_empty() && !nvenc.is_empty());
        let show = |r: Result<String, String>| match r {
            Ok(v) => json!(v),
            Err(e) => json!({"error": e}),
        };
        let mut gpu = json!({"required": self.limits.require_gpu, "devices": devices,
                             "nvencListed": nvenc});
        if !gpu_ok {
            gpu["error"] = json!(if gpu["devices"].as_array().is_some_and(Vec::is_empty) {
                "GPUPOOL_WORKER_REQUIRE_GPU is set and nvidia-smi -L lists no GPU"
            } else {
                "GPUPOOL_WORKER_REQUIRE_GPU is set and ffmpeg lists no NVENC encoder"
            });
        }
        (
            tools && gpu_ok,
            json!({"ffmpeg": show(ffmpeg), "ffprobe": show(ffprobe), "gpu": gpu}),
        )
    }

    async fn run(&self, op: &str, uid: &str, input: Map<String, Value>) -> Result<Value, OpError> {
        match op {
            "probe" => self.probe(uid, &input).await,
            "thumbnails" => self.thumbnails(uid, &input).await,
            "transcode" => self.transcode(uid, &input).await,
            "caption" => self.caption(uid, &input).await,
            _ => Err(OpError::Unknown),
        }
    }
}
