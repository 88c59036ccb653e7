//! Injected faults: what may go wrong, per operation, and the dice that decide it.
//!
//! Every fault is a [`Trigger`]: "the next N calls" and/or "this fraction of calls". Maps are
//! keyed by operation name (`vast.create`, `runpod.podFindAndDeployOnDemand`,
//! `serverless.status`, `worker.video`...), with `vast.*`-style family wildcards and `*`.
//! The dice come from the simulator's one seeded RNG, so a seed replays the same faults.

use std::collections::BTreeMap;

use rand::{Rng, rngs::StdRng};
use serde::{Deserialize, Serialize};

/// All faults currently armed. `PUT /admin/faults` replaces the whole value.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// Answer an error status (default 500) instead of doing the operation.
    pub errors: BTreeMap<String, Trigger>,
    /// Answer 429. `body` picks the Vast variant: `plain`, `detail` or `json` (default
    /// depends on the operation, as documented). `retry_after` sets the `Retry-After`
    /// header: REST v2 sends one (1 s unless set; `0` omits it), the others only when set.
    pub rate_limits: BTreeMap<String, Trigger>,
    /// Extra latency in milliseconds before the operation runs.
    pub latency_ms: BTreeMap<String, u64>,
    /// Hold the request for `timing.hang_seconds` (longer than any sane client timeout).
    pub hangs: BTreeMap<String, Trigger>,
    /// Create the instance (and bill it) but answer an error (default 500).
    pub ghost_creates: BTreeMap<String, Trigger>,
    /// GPU names (Vast `gpu_name`, RunPod type id or display name) with no capacity at all.
    pub exhausted: Vec<String>,
    /// Worker and serverless jobs that kill their instance / worker half-way through.
    pub die_mid_job: Trigger,
}

/// When a fault fires: first for the next `next` calls, then with probability `rate`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Trigger {
    pub next: u32,
    pub rate: f64,
    /// HTTP status for `errors` and `ghost_creates` (default 500).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// Body variant for `rate_limits` (`plain`, `detail`, `json`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    /// `Retry-After` seconds for `rate_limits` (`0`: no header at all).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<u64>,
}

impl Trigger {
    /// Rolls the dice once, consuming one of `next` if any are left.
    pub fn fire(&mut self, rng: &mut StdRng) -> bool {
        if self.next > 0 {
            self.next -= 1;
            return true;
        }
        self.rate > 0.0 && rng.random::<f64>() < self.rate
    }
}

/// The keys that may configure `op`, most specific first: `runpod.v2.createPod`,
/// `runpod.v2.*`, `runpod.*`, `*`.
fn keys_for(op: &str) -> Vec<String> {
    let mut keys = vec![op.to_string()];
    let mut prefix = op;
    while let Some((head, _)) = prefix.rsplit_once('.') {
        keys.push(format!("{head}.*"));
        prefix = head;
    }
    keys.push("*".to_string());
    keys
}

/// Fires the most specific trigger configured for `op`; returns a copy when it fired.
pub fn fire(map: &mut BTreeMap<String, Trigger>, op: &str, rng: &mut StdRng) -> Option<Trigger> {
    for key in keys_for(op) {
        if let Some(t) = map.get_mut(&key) {
            return t.fire(rng).then(|| t.clone());
        }
    }
    None
}

/// The configured extra latency for `op`, if any.
pub fn latency(map: &BTreeMap<String, u64>, op: &str) -> Option<u64> {
    keys_for(op).iter().find_map(|k| map.get(k).copied())
}

impl Faults {
    /// Whether a GPU (by any of its names) is marked as having no capacity.
    pub fn is_exhausted(&self, names: &[&str]) -> bool {
        self.exhausted
            .iter()
            .any(|e| names.iter().any(|n| e.eq_ignore_ascii_case(n)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn next_fires_exactly_n_times_then_rate_decides() {
        let mut rng = StdRng::seed_from_u64(1);
        let mut map = BTreeMap::new();
        map.insert(
            "vast.create".to_string(),
            Trigger {
                next: 2,
                ..Trigger::default()
            },
        );
        assert!(fire(&mut map, "vast.create", &mut rng).is_some());
        assert!(fire(&mut map, "vast.create", &mut rng).is_some());
        assert!(fire(&mut map, "vast.create", &mut rng).is_none());
        assert!(fire(&mut map, "vast.show", &mut rng).is_none());
    }

    #[test]
    fn family_wildcard_and_star_apply_when_no_exact_key() {
        let mut rng = StdRng::seed_from_u64(1);
        let mut map = BTreeMap::new();
        map.insert(
            "vast.*".to_string(),
            Trigger {
                rate: 1.0,
                ..Trigger::default()
            },
        );
        assert!(fire(&mut map, "vast.show", &mut rng).is_some());
        assert!(fire(&mut map, "runpod.pod", &mut rng).is_none());
        map.insert(
            "*".to_string(),
            Trigger {
                rate: 1.0,
                ..Trigger::default()
            },
        );
        assert!(fire(&mut map, "runpod.pod", &mut rng).is_some());
    }

    #[test]
    fn every_dotted_prefix_is_a_wildcard_most_specific_first() {
        assert_eq!(
            keys_for("runpod.v2.createPod"),
            ["runpod.v2.createPod", "runpod.v2.*", "runpod.*", "*"]
        );
        assert_eq!(keys_for("vast.show"), ["vast.show", "vast.*", "*"]);
        assert_eq!(keys_for("plain"), ["plain", "*"]);
    }

    #[test]
    fn exhausted_matches_any_name_ignoring_case() {
        let f = Faults {
            exhausted: vec!["rtx 4090".into()],
            ..Faults::default()
        };
        assert!(f.is_exhausted(&["NVIDIA GeForce RTX 4090", "RTX 4090"]));
        assert!(!f.is_exhausted(&["RTX 3060"]));
    }
}
