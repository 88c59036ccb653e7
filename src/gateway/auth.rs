//! API keys and per-client limits.
//!
//! Keys come from one Secret, read by name (RBAC `resourceNames`) at start and every 30 s:
//! an entry `<client>` is that client's API key, `<client>.callback-secret` the key that signs
//! its callbacks. A presented key is hashed (SHA-256) and compared with every client's digest
//! in constant time, with no early exit, so neither the key nor which client it belongs to
//! leaks through timing. Keys are never logged, and never leave this module but as digests.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};
use tracing::{info, warn};

use super::GatewayState;
use crate::crd::common::DNS_LABEL_PATTERN;

/// The suffix of a client's callback-signing entry in the keys Secret.
pub const CALLBACK_SECRET_SUFFIX: &str = ".callback-secret";
/// The client of every request under `--insecure-no-auth`.
pub const ANONYMOUS: &str = "anonymous";

/// One client: its name (a label value on its jobs), its key's digest, its callback key.
#[derive(Clone)]
pub struct ClientKey {
    pub name: String,
    digest: [u8; 32],
    pub callback_secret: Option<Vec<u8>>,
}

impl std::fmt::Debug for ClientKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientKey")
            .field("name", &self.name)
            .field(
                "callback_secret",
                &self.callback_secret.as_ref().map(|_| "<redacted>"),
            )
            .finish_non_exhaustive()
    }
}

impl ClientKey {
    /// The one client of `--insecure-no-auth`: no key (none is ever compared), no callbacks.
    pub fn anonymous() -> Self {
        Self {
            name: ANONYMOUS.to_string(),
            digest: [0; 32],
            callback_secret: None,
        }
    }
}

pub fn sha256(data: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    s
}

/// Equal in time independent of where the inputs differ.
fn same_digest(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Clients and their keys from the Secret's entries. Entries that are not a valid client
/// name (a DNS label, since it becomes a label value) or are empty are skipped, by name.
pub fn parse_keys(data: &HashMap<String, Vec<u8>>) -> Vec<ClientKey> {
    let pattern = regex_lite_dns_label();
    let mut clients: Vec<ClientKey> = Vec::new();
    for (entry, value) in data {
        if entry.ends_with(CALLBACK_SECRET_SUFFIX) {
            continue;
        }
        let key = trim_newline(value);
        if !pattern(entry) || key.is_empty() {
            warn!(
                entry,
                "skipping a keys Secret entry: not a DNS-label client name with a key"
            );
            continue;
        }
        let callback_secret = data
            .get(&format!("{entry}{CALLBACK_SECRET_SUFFIX}"))
            .map(|v| trim_newline(v).to_vec())
            .filter(|v| !v.is_empty());
        clients.push(ClientKey {
            name: entry.clone(),
            digest: sha256(key),
            callback_secret,
        });
    }
    clients.sort_by(|a, b| a.name.cmp(&b.name));
    clients
}

/// `kubectl create secret --from-file` keeps a trailing newline; a key never ends in one.
fn trim_newline(v: &[u8]) -> &[u8] {
    let mut v = v;
    while let [rest @ .., b'\n' | b'\r'] = v {
        v = rest;
    }
    v
}

/// Whether `s` matches [`DNS_LABEL_PATTERN`], checked by hand (no regex engine in the tree).
fn regex_lite_dns_label() -> impl Fn(&str) -> bool {
    debug_assert_eq!(DNS_LABEL_PATTERN, r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$");
    |s: &str| {
        let b = s.as_bytes();
        let alnum = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
        !b.is_empty()
            && b.len() <= 63
            && alnum(&b[0])
            && alnum(&b[b.len() - 1])
            && b.iter().all(|c| alnum(c) || *c == b'-')
    }
}

/// The clients currently known; swapped whole when the Secret changes.
#[derive(Default)]
pub struct KeyRing {
    clients: RwLock<Arc<Vec<ClientKey>>>,
}

impl KeyRing {
    pub fn replace(&self, clients: Vec<ClientKey>) {
        *self.clients.write().expect("keys lock") = Arc::new(clients);
    }

    pub fn is_empty(&self) -> bool {
        self.clients.read().expect("keys lock").is_empty()
    }

    /// The client whose key is `presented`, comparing against every key.
    pub fn authenticate(&self, presented: &str) -> Option<ClientKey> {
        let digest = sha256(presented.as_bytes());
        let clients = self.clients.read().expect("keys lock").clone();
        let mut found = None;
        for c in clients.iter() {
            if same_digest(&c.digest, &digest) {
                found = Some(c.clone());
            }
        }
        found
    }

    pub fn client(&self, name: &str) -> Option<ClientKey> {
        let clients = self.clients.read().expect("keys lock").clone();
        clients.iter().find(|c| c.name == name).cloned()
    }
}

/// Reads the keys Secret. A missing Secret is an empty key set, with a clear message.
pub async fn load_keys(
    client: &Client,
    namespace: &str,
    name: &str,
) -> Result<Vec<ClientKey>, String> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    match api.get_opt(name).await {
        Ok(Some(secret)) => {
            let data: HashMap<String, Vec<u8>> = secret
                .data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.0))
                .collect();
            Ok(parse_keys(&data))
        }
        Ok(None) => Err(format!(
            "the keys Secret {namespace}/{name} does not exist; create it with one entry per \
             client (or run with --insecure-no-auth on a trusted network only)"
        )),
        Err(e) => Err(format!("reading the keys Secret {namespace}/{name}: {e}")),
    }
}

/// Re-reads the keys every 30 s; a failed read keeps the keys already loaded.
pub async fn reload_keys(state: Arc<GatewayState>) {
    if state.config.insecure_no_auth {
        return;
    }
    let mut last: Vec<String> = Vec::new();
    loop {
        tokio::time::sleep(Duration::from_secs(30)).await;
        match load_keys(
            &state.client,
            &state.config.namespace,
            &state.config.keys_secret,
        )
        .await
        {
            Ok(clients) => {
                let names: Vec<String> = clients.iter().map(|c| c.name.clone()).collect();
                if names != last {
                    info!(clients = ?names, "API keys reloaded");
                    last = names;
                }
                state.keys.replace(clients);
            }
            Err(e) => warn!(error = %e, "keeping the API keys already loaded"),
        }
    }
}

/// The key a request presents: `X-API-Key`, else `Authorization: Bearer`.
pub fn presented_key(headers: &http::HeaderMap) -> Option<&str> {
    if let Some(k) = headers.get("x-api-key").and_then(|v| v.to_str().ok()) {
        return Some(k.trim());
    }
    let auth = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = auth.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// A token bucket per client: `rate` per second, bursts of `2 * rate`.
pub struct Limits {
    rate: f64,
    buckets: Mutex<HashMap<String, Bucket>>,
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Limits {
    pub fn new(rate: f64) -> Self {
        Self {
            rate: rate.max(0.001),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token for `client`, or says how many seconds until one is free.
    pub fn take(&self, client: &str) -> Result<(), u64> {
        self.take_at(client, Instant::now())
    }

    fn take_at(&self, client: &str, now: Instant) -> Result<(), u64> {
        let burst = self.rate * 2.0;
        let mut buckets = self.buckets.lock().expect("limits lock");
        let b = buckets.entry(client.to_string()).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + elapsed * self.rate).min(burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(((1.0 - b.tokens) / self.rate).ceil().max(1.0) as u64)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(entries: &[(&str, &str)]) -> HashMap<String, Vec<u8>> {
        entries
            .iter()
            .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
            .collect()
    }

    #[test]
    fn each_entry_is_a_client_and_only_its_own_key_authenticates_it() {
        let ring = KeyRing::default();
        ring.replace(parse_keys(&secret(&[
            ("vps-a", "key-a\n"),
            ("vps-a.callback-secret", "sign-a"),
            ("vps-b", "key-b"),
            ("Not_A_Label", "key-c"),
            ("empty", ""),
        ])));
        let a = ring.authenticate("key-a").unwrap();
        assert_eq!(a.name, "vps-a");
        assert_eq!(a.callback_secret.as_deref(), Some(&b"sign-a"[..]));
        let b = ring.authenticate("key-b").unwrap();
        assert_eq!((b.name.as_str(), b.callback_secret), ("vps-b", None));
        for wrong in ["key-c", "", "key-a\n", "key-", "KEY-A"] {
            assert!(ring.authenticate(wrong).is_none(), "{wrong:?}");
        }
        // The callback entry is not a client of its own.
        assert!(ring.authenticate("sign-a").is_none());
    }

    #[test]
    fn a_client_key_debug_shows_no_secret() {
        let keys = parse_keys(&secret(&[("c", "k"), ("c.callback-secret", "s3cr3t")]));
        let shown = format!("{:?}", keys[0]);
        assert!(
            !shown.contains("s3cr3t") && shown.contains("redacted"),
            "{shown}"
        );
    }

    #[test]
    fn the_key_comes_from_x_api_key_or_a_bearer_token() {
        let mut h = http::HeaderMap::new();
        assert_eq!(presented_key(&h), None);
        h.insert("authorization", "Bearer  tok ".parse().unwrap());
        assert_eq!(presented_key(&h), Some("tok"));
        h.insert("authorization", "Basic dXNlcg==".parse().unwrap());
        assert_eq!(presented_key(&h), None);
        h.insert("x-api-key", "k1".parse().unwrap());
        assert_eq!(presented_key(&h), Some("k1"));
    }

    #[test]
    fn the_rate_limit_allows_a_burst_then_the_rate() {
        let limits = Limits::new(5.0);
        let t0 = Instant::now();
        for _ in 0..10 {
            assert!(limits.take_at("c", t0).is_ok());
        }
        assert_eq!(limits.take_at("c", t0), Err(1));
        // Another client has its own bucket.
        assert!(limits.take_at("other", t0).is_ok());
        // 5/s: after 0.2 s one more request passes, then none.
        let t1 = t0 + Duration::from_millis(200);
        assert!(limits.take_at("c", t1).is_ok());
        assert!(limits.take_at("c", t1).is_err());
    }

    #[test]
    fn hex_and_sha256_are_the_usual_ones() {
        assert_eq!(
            hex(&sha256(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
