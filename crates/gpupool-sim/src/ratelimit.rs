//! RunPod REST v2's per-user quota (providers.md §2.10): fixed minute, hour and day windows,
//! reported on every authenticated answer as the IETF draft's `RateLimit` and
//! `RateLimit-Policy` structured-field lists, and enforced only when configured.
//!
//! Pure bookkeeping: the caller passes the time elapsed since the simulator's start, so the
//! windows are aligned to it and tests need no clock.

use super::config::RateLimitSpec;

/// The three windows, shortest first: name and length in seconds.
const WINDOWS: [(&str, u64); 3] = [("minute", 60), ("hour", 3600), ("day", 86_400)];

/// Requests counted in the current window of each length.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RateWindows {
    /// Per window: (index of the current window since the start, requests counted in it).
    counts: [(u64, u64); 3],
}

/// What one request was told.
#[derive(Clone, Debug, PartialEq)]
pub struct Verdict {
    /// False when an enforced window was already used up.
    pub allowed: bool,
    /// The `RateLimit` header: `"minute";r=59;t=42, ...`.
    pub state: String,
    /// The `RateLimit-Policy` header: `"minute";q=60;w=60, ...`.
    pub policy: String,
    /// Seconds until the exhausted window that lasts longest resets (for `Retry-After`).
    pub retry_after: u64,
}

fn quota(spec: &RateLimitSpec, n: usize) -> u64 {
    [spec.minute, spec.hour, spec.day][n]
}

impl RateWindows {
    /// Counts one request `elapsed_ms` after the start (unless it is refused) and says what
    /// its answer reports.
    pub fn admit(&mut self, spec: &RateLimitSpec, elapsed_ms: u64) -> Verdict {
        let elapsed = elapsed_ms / 1000;
        for (n, (_, len)) in WINDOWS.iter().enumerate() {
            let index = elapsed / len;
            if self.counts[n].0 != index {
                self.counts[n] = (index, 0);
            }
        }
        let reset = |n: usize| {
            let len = WINDOWS[n].1;
            len - elapsed % len
        };
        let exhausted: Vec<usize> = (0..3)
            .filter(|&n| self.counts[n].1 >= quota(spec, n))
            .collect();
        let allowed = !spec.enforce || exhausted.is_empty();
        if allowed {
            for c in &mut self.counts {
                c.1 += 1;
            }
        }
        let state = (0..3)
            .map(|n| {
                let left = quota(spec, n).saturating_sub(self.counts[n].1);
                format!("\"{}\";r={left};t={}", WINDOWS[n].0, reset(n))
            })
            .collect::<Vec<_>>()
            .join(", ");
        let policy = (0..3)
            .map(|n| {
                format!(
                    "\"{}\";q={};w={}",
                    WINDOWS[n].0,
                    quota(spec, n),
                    WINDOWS[n].1
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        Verdict {
            allowed,
            state,
            policy,
            retry_after: exhausted.into_iter().map(reset).max().unwrap_or(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(minute: u64, enforce: bool) -> RateLimitSpec {
        RateLimitSpec {
            minute,
            hour: 100,
            day: 1000,
            enforce,
        }
    }

    #[test]
    fn headers_count_down_and_name_the_reset_of_each_window() {
        let mut w = RateWindows::default();
        let v = w.admit(&spec(60, false), 12_500);
        assert!(v.allowed);
        assert_eq!(
            v.state,
            "\"minute\";r=59;t=48, \"hour\";r=99;t=3588, \"day\";r=999;t=86388"
        );
        assert_eq!(
            v.policy,
            "\"minute\";q=60;w=60, \"hour\";q=100;w=3600, \"day\";q=1000;w=86400"
        );
    }

    #[test]
    fn an_unenforced_quota_reports_zero_but_lets_requests_through() {
        let mut w = RateWindows::default();
        for _ in 0..3 {
            assert!(w.admit(&spec(2, false), 0).allowed);
        }
        assert!(
            w.admit(&spec(2, false), 0)
                .state
                .starts_with("\"minute\";r=0;t=60")
        );
    }

    #[test]
    fn an_enforced_quota_refuses_until_its_window_resets() {
        let mut w = RateWindows::default();
        let s = spec(2, true);
        assert!(w.admit(&s, 1_000).allowed);
        assert!(w.admit(&s, 2_000).allowed);
        let refused = w.admit(&s, 20_000);
        assert!(!refused.allowed);
        assert_eq!(refused.retry_after, 40);
        assert!(refused.state.starts_with("\"minute\";r=0;t=40"));
        let next_minute = w.admit(&s, 61_000);
        assert!(next_minute.allowed);
        assert!(next_minute.state.contains("\"hour\";r=97;"));
    }
}
