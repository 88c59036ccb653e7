//! Callbacks: the finished job POSTed to the URL its request gave, signed, retried with
//! back-off, and recorded on the VideoJob so that a gateway restart neither loses nor repeats
//! it.
//!
//! The state lives on the job: the annotation [`CALLBACK_STATE_ANNOTATION`] holds a
//! [`Delivery`], and the finalizer [`CALLBACK_FINALIZER`] keeps the job (against its TTL or a
//! cancel) until the delivery is done or given up. Every replica runs [`deliver_forever`]; a
//! replica claims a delivery with a merge patch whose precondition is the job's
//! resourceVersion, so two replicas never send at once, and a claim lapses after
//! [`CLAIM_SECONDS`] so a replica that died mid-delivery is taken over. The receiver may see
//! a delivery twice (the POST succeeded, the replica died before recording it): delivery is at
//! least once, and `X-Gpupool-Delivery-Id` (the job's UID) lets it keep the first.
//!
//! Each request is signed: `X-Gpupool-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256>` of
//! `"<t>.<body>"` with the client's callback secret, so a receiver checks both who sent it and
//! that it is fresh (reject a `t` far from its clock).

use std::{
    collections::HashSet,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use jiff::Timestamp;
use kube::{
    ResourceExt,
    api::{Patch, PatchParams},
};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tracing::{debug, info, warn};

use super::{
    CALLBACK_FINALIZER, CALLBACK_STATE_ANNOTATION, CALLBACK_URL_ANNOTATION, CLIENT_LABEL,
    GatewayState,
    auth::hex,
    submit::{is_finished, view},
};
use crate::crd::VideoJob;

/// How long a claim keeps other replicas off a delivery.
pub const CLAIM_SECONDS: i64 = 30;
/// The longest pause between two attempts.
pub const MAX_BACKOFF_SECONDS: i64 = 300;
/// Time allowed for one delivery: connect, send, answer.
pub const DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DeliveryState {
    /// Waiting for the job to finish, or for the next attempt.
    #[default]
    Pending,
    /// The receiver answered 2xx.
    Delivered,
    /// Every attempt failed; given up.
    Failed,
    /// The job was withdrawn before it ran (its request was answered 503): nothing to send.
    Withdrawn,
}

/// A callback's state, kept on its job.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Delivery {
    pub state: DeliveryState,
    #[serde(default)]
    pub attempts: u32,
    /// No attempt before this time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claimed_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claimed_until: Option<Timestamp>,
    /// Why the last attempt failed (a status code or a connection error; never a secret).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivered_at: Option<Timestamp>,
}

impl Delivery {
    pub fn withdrawn() -> Self {
        Self {
            state: DeliveryState::Withdrawn,
            ..Self::default()
        }
    }

    pub fn of(job: &VideoJob) -> Option<Self> {
        serde_json::from_str(job.annotations().get(CALLBACK_STATE_ANNOTATION)?).ok()
    }

    /// Whether `replica` should attempt this delivery at `now`.
    pub fn due(&self, replica: &str, now: Timestamp) -> bool {
        self.state == DeliveryState::Pending
            && self.next.is_none_or(|n| n <= now)
            && (self.claimed_until.is_none_or(|u| u <= now)
                || self.claimed_by.as_deref() == Some(replica))
    }

    /// After a failed attempt at `now`: the next one, or given up after `max_attempts`.
    pub fn failed_attempt(&mut self, error: String, max_attempts: u32, now: Timestamp) {
        self.attempts += 1;
        self.last_error = Some(error);
        self.claimed_by = None;
        self.claimed_until = None;
        if self.attempts >= max_attempts {
            self.state = DeliveryState::Failed;
            self.next = None;
        } else {
            self.next = Some(now + jiff::SignedDuration::from_secs(backoff_seconds(self.attempts)));
        }
    }

    pub fn delivered(&mut self, now: Timestamp) {
        self.attempts += 1;
        self.state = DeliveryState::Delivered;
        self.delivered_at = Some(now);
        self.next = None;
        self.claimed_by = None;
        self.claimed_until = None;
        self.last_error = None;
    }
}

/// 1 s, 2 s, 4 s... up to [`MAX_BACKOFF_SECONDS`], after `attempts` failures.
pub fn backoff_seconds(attempts: u32) -> i64 {
    1i64.checked_shl(attempts.saturating_sub(1))
        .unwrap_or(i64::MAX)
        .min(MAX_BACKOFF_SECONDS)
}

/// `t=<t>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`.
pub fn signature(secret: &[u8], t: i64, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let mut ctx = ring::hmac::Context::with_key(&key);
    ctx.update(t.to_string().as_bytes());
    ctx.update(b".");
    ctx.update(body);
    format!("t={t},v1={}", hex(ctx.sign().as_ref()))
}

/// Whether an address is one a callback may not reach unless private targets are allowed:
/// loopback, private, link-local, carrier-grade NAT, unspecified, multicast, broadcast.
pub fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || (o[0] == 100 && (o[1] & 0xc0) == 64)
                || o[0] == 0
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_private(IpAddr::V4(v4));
            }
            let s = v6.segments();
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00
                || (s[0] & 0xffc0) == 0xfe80
        }
    }
}

/// Checks a callback URL as given in a request: http(s), a host, and (unless allowed) no
/// private address literal and no `localhost`. Names are resolved again at delivery.
pub fn check_url(raw: &str, allow_private: bool) -> Result<url::Url, String> {
    let url = url::Url::parse(raw).map_err(|e| format!("not a URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err("must be an http or https URL".into());
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("must not carry credentials".into());
    }
    let host = url.host().ok_or("must have a host")?;
    if !allow_private {
        let private = match host {
            url::Host::Ipv4(ip) => is_private(ip.into()),
            url::Host::Ipv6(ip) => is_private(ip.into()),
            url::Host::Domain(d) => {
                let d = d.trim_end_matches('.').to_ascii_lowercase();
                d == "localhost" || d.ends_with(".localhost")
            }
        };
        if private {
            return Err("must not point at a loopback, private or link-local address".into());
        }
    }
    Ok(url)
}

/// Resolves the URL's host and refuses private addresses (unless allowed), just before a
/// delivery, so a name that resolves to an internal service is not called.
async fn check_destination(url: &url::Url, allow_private: bool) -> Result<(), String> {
    if allow_private {
        return Ok(());
    }
    let host = url.host_str().ok_or("no host")?;
    let port = url.port_or_known_default().unwrap_or(443);
    let addrs = tokio::net::lookup_host((host.trim_matches(['[', ']']), port))
        .await
        .map_err(|e| format!("cannot resolve the callback host: {e}"))?;
    for a in addrs {
        if is_private(a.ip()) {
            return Err("the callback host resolves to a private address".into());
        }
    }
    Ok(())
}

/// The body POSTed for a finished (or cancelled) job.
pub fn payload(job: &VideoJob) -> serde_json::Value {
    json!({
        "type": "videojob.finished",
        "deliveryId": job.uid(),
        "job": view(job),
    })
}

/// Finds due deliveries in the cache and sends them, for ever.
pub async fn deliver_forever(state: Arc<GatewayState>) {
    let replica = state.config.replica();
    let busy: Arc<Mutex<HashSet<String>>> = Arc::default();
    loop {
        tokio::select! {
            () = state.job_events.notified() => {}
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        let now = Timestamp::now();
        for job in state.caches.jobs.state() {
            let ready = is_finished(&job) || job.metadata.deletion_timestamp.is_some();
            if !ready || !job.finalizers().iter().any(|f| f == CALLBACK_FINALIZER) {
                continue;
            }
            let Some(d) = Delivery::of(&job) else {
                continue;
            };
            if !d.due(&replica, now) {
                continue;
            }
            let uid = job.uid().unwrap_or_default();
            if !busy.lock().expect("busy lock").insert(uid.clone()) {
                continue;
            }
            let (state, busy, replica) = (state.clone(), busy.clone(), replica.clone());
            tokio::spawn(async move {
                if let Err(e) = deliver_one(&state, &job, &replica).await {
                    debug!(job = %job.name_any(), error = %e, "callback not recorded; will retry");
                }
                busy.lock().expect("busy lock").remove(&uid);
            });
        }
    }
}

/// One attempt: claim, send, record.
async fn deliver_one(
    state: &GatewayState,
    job: &VideoJob,
    replica: &str,
) -> Result<(), kube::Error> {
    let api = state.jobs();
    let name = job.name_any();
    let now = Timestamp::now();
    let mut d = Delivery::of(job).unwrap_or_default();
    d.claimed_by = Some(replica.to_string());
    d.claimed_until = Some(now + jiff::SignedDuration::from_secs(CLAIM_SECONDS));
    let claim = json!({"metadata": {
        "resourceVersion": job.resource_version(),
        "annotations": {CALLBACK_STATE_ANNOTATION: serde_json::to_string(&d).unwrap_or_default()},
    }});
    let claimed = match api
        .patch(&name, &PatchParams::default(), &Patch::Merge(&claim))
        .await
    {
        Ok(j) => j,
        // Another replica claimed it, or the job changed: the next pass looks again.
        Err(kube::Error::Api(e)) if e.code == 409 || e.code == 404 => return Ok(()),
        Err(e) => return Err(e),
    };
    let outcome = send(state, &claimed).await;
    record(state, &name, replica, outcome).await
}

/// POSTs the job to its callback URL. `Ok` for a 2xx answer.
async fn send(state: &GatewayState, job: &VideoJob) -> Result<u16, String> {
    let client = job.labels().get(CLIENT_LABEL).cloned().unwrap_or_default();
    let secret = state
        .keys
        .client(&client)
        .and_then(|c| c.callback_secret)
        .ok_or_else(|| format!("client {client} has no callback secret any more"))?;
    let raw = job
        .annotations()
        .get(CALLBACK_URL_ANNOTATION)
        .cloned()
        .unwrap_or_default();
    let url = check_url(&raw, state.config.callback_allow_private)?;
    check_destination(&url, state.config.callback_allow_private).await?;
    let body = serde_json::to_vec(&payload(job)).unwrap_or_default();
    let t = Timestamp::now().as_second();
    let answer = state
        .http
        .post(url)
        .timeout(DELIVERY_TIMEOUT)
        .header("content-type", "application/json")
        .header("x-gpupool-delivery-id", job.uid().unwrap_or_default())
        .header("x-gpupool-signature", signature(&secret, t, &body))
        .body(body)
        .send()
        .await
        .map_err(|e| {
            // reqwest's error names the URL, which a client may have put a token in.
            let kind = if e.is_timeout() {
                "timed out"
            } else if e.is_connect() {
                "could not connect"
            } else {
                "request failed"
            };
            kind.to_string()
        })?;
    let code = answer.status().as_u16();
    if answer.status().is_success() {
        Ok(code)
    } else {
        Err(format!("the receiver answered {code}"))
    }
}

/// Records the attempt on the job (retried on conflicts with fresh reads), and drops the
/// finalizer when the delivery is done or given up.
async fn record(
    state: &GatewayState,
    name: &str,
    replica: &str,
    outcome: Result<u16, String>,
) -> Result<(), kube::Error> {
    let api = state.jobs();
    for _ in 0..5 {
        let Some(job) = api.get_opt(name).await? else {
            return Ok(());
        };
        let mut d = Delivery::of(&job).unwrap_or_default();
        if d.state != DeliveryState::Pending || d.claimed_by.as_deref() != Some(replica) {
            // Our claim lapsed and another replica took over: it records.
            return Ok(());
        }
        let now = Timestamp::now();
        match &outcome {
            Ok(_) => d.delivered(now),
            Err(e) => d.failed_attempt(e.clone(), state.config.callback_max_attempts, now),
        }
        let done = d.state != DeliveryState::Pending;
        let mut meta = json!({
            "resourceVersion": job.resource_version(),
            "annotations": {CALLBACK_STATE_ANNOTATION: serde_json::to_string(&d).unwrap_or_default()},
        });
        if done {
            let rest: Vec<&String> = job
                .finalizers()
                .iter()
                .filter(|f| *f != CALLBACK_FINALIZER)
                .collect();
            meta["finalizers"] = json!(rest);
        }
        match api
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(&json!({"metadata": meta})),
            )
            .await
        {
            Ok(_) => {
                let outcome_label = match d.state {
                    DeliveryState::Delivered => "delivered",
                    DeliveryState::Failed => "failed",
                    _ => "retry",
                };
                state.metrics.callback(outcome_label);
                match d.state {
                    DeliveryState::Delivered => {
                        info!(job = %name, attempts = d.attempts, "callback delivered")
                    }
                    DeliveryState::Failed => {
                        warn!(job = %name, attempts = d.attempts, error = ?d.last_error, "callback given up")
                    }
                    _ => {
                        info!(job = %name, attempts = d.attempts, error = ?d.last_error, "callback failed; will retry")
                    }
                }
                return Ok(());
            }
            Err(kube::Error::Api(e)) if e.code == 409 => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_hmac_sha256_of_time_dot_body() {
        // HMAC-SHA256(key="key", "The quick brown fox jumps over the lazy dog"), split as
        // t="The quick brown fox jumps over the lazy dog" would be; here t=1 and body "x":
        let sig = signature(b"secret", 1_700_000_000, b"{\"a\":1}");
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"secret");
        let tag = ring::hmac::sign(&key, b"1700000000.{\"a\":1}");
        assert_eq!(sig, format!("t=1700000000,v1={}", hex(tag.as_ref())));
        // RFC 4231 test case 2, so the primitive is the standard one.
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"Jefe");
        let tag = ring::hmac::sign(&key, b"what do ya want for nothing?");
        assert_eq!(
            hex(tag.as_ref()),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn back_off_doubles_to_five_minutes_and_gives_up_after_the_maximum() {
        let seq: Vec<i64> = (1..=11).map(backoff_seconds).collect();
        assert_eq!(seq, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300]);
        let t0: Timestamp = "2026-12-01T00:00:00Z".parse().unwrap();
        let mut d = Delivery::default();
        assert!(d.due("a", t0));
        d.failed_attempt("503".into(), 3, t0);
        assert!(!d.due("a", t0));
        assert!(d.due("a", t0 + jiff::SignedDuration::from_secs(1)));
        d.failed_attempt("503".into(), 3, t0);
        d.failed_attempt("503".into(), 3, t0);
        assert_eq!((d.state, d.attempts), (DeliveryState::Failed, 3));
        assert!(!d.due("a", t0 + jiff::SignedDuration::from_secs(3600)));
    }

    #[test]
    fn a_claim_keeps_other_replicas_off_until_it_lapses() {
        let t0: Timestamp = "2026-12-01T00:00:00Z".parse().unwrap();
        let d = Delivery {
            claimed_by: Some("a".into()),
            claimed_until: Some(t0 + jiff::SignedDuration::from_secs(30)),
            ..Delivery::default()
        };
        assert!(d.due("a", t0));
        assert!(!d.due("b", t0));
        assert!(d.due("b", t0 + jiff::SignedDuration::from_secs(30)));
        let json = serde_json::to_string(&d).unwrap();
        assert!(
            json.contains("\"state\":\"Pending\"") && json.contains("claimedBy"),
            "{json}"
        );
    }

    #[test]
    fn callback_urls_must_be_public_http_unless_private_is_allowed() {
        for ok in [
            "https://hooks.example.com/x?y=1",
            "http://203.0.113.7:8080/cb",
        ] {
            assert!(check_url(ok, false).is_ok(), "{ok}");
        }
        for bad in [
            "ftp://example.com/x",
            "file:///etc/passwd",
            "http://127.0.0.1/x",
            "http://localhost:9000/x",
            "http://10.1.2.3/x",
            "http://169.254.169.254/latest/meta-data",
            "http://[::1]/x",
            "http://[fd00::1]/x",
            "http://[::ffff:192.168.1.1]/x",
            "http://100.64.0.1/x",
            "http://user:pw@example.com/x",
            "not a url",
        ] {
            assert!(check_url(bad, false).is_err(), "{bad}");
        }
        assert!(check_url("http://127.0.0.1:9000/x", true).is_ok());
    }
}
