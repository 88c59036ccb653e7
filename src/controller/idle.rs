//! The idle-teardown rule, as pure functions: when an instance's deadline falls, and whether
//! it may be destroyed then.
//!
//! No I/O and no clock: callers pass `now`. An instance is idle when Ready, with no current
//! job and not being deleted. `deadline = idleSince + idleTimeoutSeconds`. At the deadline it
//! is destroyed unless it is one of the pool's `minIdle` most recently idle instances.

use std::time::Duration;

use jiff::{SignedDuration, Timestamp};

/// What an instance needs from the idle rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdleInstance {
    pub name: String,
    pub idle_since: Timestamp,
}

/// The instant an instance idle since `idle_since` may be destroyed.
pub fn deadline(idle_since: Timestamp, idle_timeout_seconds: i64) -> Timestamp {
    idle_since
        .saturating_add(SignedDuration::from_secs(idle_timeout_seconds.max(0)))
        .unwrap_or(idle_since)
}

/// What to do with one idle instance now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IdleDecision {
    /// Before the deadline: look again in exactly this long.
    WaitFor(Duration),
    /// Past the deadline but kept by `minIdle`.
    KeepWarm,
    /// Past the deadline: destroy it (with a resourceVersion precondition).
    Teardown,
}

/// The instances that `minIdle` keeps: the `min_idle` most recently idle ones (latest
/// `idle_since` first, name breaking ties) so every replica computes the same set.
pub fn protected_by_min_idle(idle: &[IdleInstance], min_idle: usize) -> Vec<&str> {
    let mut sorted: Vec<&IdleInstance> = idle.iter().collect();
    sorted.sort_by(|a, b| {
        b.idle_since
            .cmp(&a.idle_since)
            .then_with(|| a.name.cmp(&b.name))
    });
    sorted
        .into_iter()
        .take(min_idle)
        .map(|i| i.name.as_str())
        .collect()
}

/// The decision for `instance`, one of the pool's idle instances `pool_idle` (which should
/// contain it), at `now`.
pub fn decide(
    now: Timestamp,
    instance: &IdleInstance,
    idle_timeout_seconds: i64,
    pool_idle: &[IdleInstance],
    min_idle: usize,
) -> IdleDecision {
    let due = deadline(instance.idle_since, idle_timeout_seconds);
    if now < due {
        let wait = now.duration_until(due);
        return IdleDecision::WaitFor(wait.unsigned_abs());
    }
    if protected_by_min_idle(pool_idle, min_idle).contains(&instance.name.as_str()) {
        IdleDecision::KeepWarm
    } else {
        IdleDecision::Teardown
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn idle(name: &str, since: &str) -> IdleInstance {
        IdleInstance {
            name: name.into(),
            idle_since: at(since),
        }
    }

    #[test]
    fn waits_exactly_until_the_deadline_never_earlier() {
        let i = idle("a", "2026-01-01T00:00:00Z");
        let pool = [i.clone()];
        assert_eq!(
            decide(at("2026-01-01T00:00:00Z"), &i, 300, &pool, 0),
            IdleDecision::WaitFor(Duration::from_secs(300))
        );
        assert_eq!(
            decide(at("2026-01-01T00:04:59.750Z"), &i, 300, &pool, 0),
            IdleDecision::WaitFor(Duration::from_millis(250))
        );
        assert_eq!(
            decide(at("2026-01-01T00:05:00Z"), &i, 300, &pool, 0),
            IdleDecision::Teardown
        );
        assert_eq!(
            decide(at("2026-01-01T00:07:00Z"), &i, 300, &pool, 0),
            IdleDecision::Teardown
        );
    }

    #[test]
    fn min_idle_keeps_the_most_recently_idle() {
        let a = idle("a", "2026-01-01T00:00:00Z");
        let b = idle("b", "2026-01-01T00:01:00Z");
        let c = idle("c", "2026-01-01T00:02:00Z");
        let pool = [a.clone(), b.clone(), c.clone()];
        let now = at("2026-01-01T01:00:00Z");
        assert_eq!(decide(now, &a, 300, &pool, 2), IdleDecision::Teardown);
        assert_eq!(decide(now, &b, 300, &pool, 2), IdleDecision::KeepWarm);
        assert_eq!(decide(now, &c, 300, &pool, 2), IdleDecision::KeepWarm);
        assert_eq!(protected_by_min_idle(&pool, 0), Vec::<&str>::new());
        assert_eq!(protected_by_min_idle(&pool, 9), vec!["c", "b", "a"]);
    }

    #[test]
    fn deadline_survives_absurd_inputs() {
        let t = at("2026-01-01T00:00:00Z");
        assert_eq!(deadline(t, -5), t);
        assert_eq!(deadline(t, 1).to_string(), "2026-01-01T00:00:01Z");
    }
}
