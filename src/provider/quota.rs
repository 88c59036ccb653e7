//! The client-side request quota of one provider client, with a priority lane for teardown.
//!
//! A token bucket: `burst` requests at once, one more token every `replenish_every`. Calls
//! made inside [`teardown_lane`] (destroying a machine, confirming it is gone, sweeping an
//! orphan) take the next token before any other call: while one of them waits, no ordinary
//! call may take a token. Without the lane, a destroy queued behind two hundred provisioning
//! polls waited tens of seconds at 5 requests/s while the machine kept billing
//! (docs/benchmarks.md, "teardown"). The total rate never exceeds the quota: the lane only
//! reorders who goes next.
//!
//! The lane is carried by a task-local rather than a parameter so that the provider traits
//! keep one `get`/`delete` each; it holds for every call awaited inside the future, not for
//! tasks spawned from it.

use std::{
    future::Future,
    num::NonZeroU32,
    sync::{
        Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::time::Instant;

tokio::task_local! {
    static TEARDOWN: ();
}

/// Runs `fut` with every provider call inside it in the teardown lane.
pub async fn teardown_lane<F: Future>(fut: F) -> F::Output {
    TEARDOWN.scope((), fut).await
}

/// Whether the current task is inside [`teardown_lane`].
pub fn in_teardown_lane() -> bool {
    TEARDOWN.try_with(|_| ()).is_ok()
}

/// Which queue a call waits in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lane {
    Normal,
    Teardown,
}

impl Lane {
    /// The lane of the current task.
    pub fn current() -> Self {
        if in_teardown_lane() {
            Self::Teardown
        } else {
            Self::Normal
        }
    }
}

#[derive(Debug)]
struct Bucket {
    /// Tokens available now (fractional between refills).
    tokens: f64,
    refilled_at: Instant,
}

/// A token bucket with two lanes; see the module documentation.
#[derive(Debug)]
pub struct PriorityQuota {
    every: Duration,
    burst: f64,
    bucket: Mutex<Bucket>,
    /// Teardown calls waiting for a token: ordinary calls hold back while it is not zero.
    teardown_waiting: AtomicUsize,
}

/// Decrements the waiting count however the wait ends (a token, or the call dropped).
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl PriorityQuota {
    /// `None` when `every` is zero (there would be no limit to speak of).
    pub fn new(every: Duration, burst: NonZeroU32) -> Option<Self> {
        if every.is_zero() {
            return None;
        }
        let burst = f64::from(burst.get());
        Some(Self {
            every,
            burst,
            bucket: Mutex::new(Bucket {
                tokens: burst,
                refilled_at: Instant::now(),
            }),
            teardown_waiting: AtomicUsize::new(0),
        })
    }

    /// Teardown calls waiting now.
    pub fn teardown_waiting(&self) -> usize {
        self.teardown_waiting.load(Ordering::SeqCst)
    }

    /// Waits for a token in `lane`.
    pub async fn acquire(&self, lane: Lane) {
        let _waiting = (lane == Lane::Teardown).then(|| {
            self.teardown_waiting.fetch_add(1, Ordering::SeqCst);
            Waiting(&self.teardown_waiting)
        });
        loop {
            let wait = match self.try_take(lane) {
                None => return,
                Some(wait) => wait,
            };
            tokio::time::sleep(wait).await;
        }
    }

    /// Takes a token, or says how long to wait before trying again.
    fn try_take(&self, lane: Lane) -> Option<Duration> {
        let now = Instant::now();
        // A poisoned lock only means another caller panicked mid-update of two numbers.
        let mut b = self
            .bucket
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let elapsed = now.saturating_duration_since(b.refilled_at);
        b.tokens = (b.tokens + elapsed.as_secs_f64() / self.every.as_secs_f64()).min(self.burst);
        b.refilled_at = now;
        // A teardown call counts itself among the waiting; an ordinary one defers to any.
        let may_take = lane == Lane::Teardown || self.teardown_waiting() == 0;
        if may_take && b.tokens >= 1.0 {
            b.tokens -= 1.0;
            return None;
        }
        let missing = (1.0 - b.tokens).max(0.0);
        let until_token = self.every.mul_f64(missing);
        // An ordinary call held back by the lane looks again when the next token is due:
        // by then the teardown call has usually taken the previous one.
        Some(until_token.max(Duration::from_millis(1)))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn quota(per_second: u32, burst: u32) -> Arc<PriorityQuota> {
        Arc::new(
            PriorityQuota::new(
                Duration::from_secs(1) / per_second,
                NonZeroU32::new(burst).unwrap(),
            )
            .unwrap(),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn the_burst_passes_then_one_per_period() {
        let q = quota(5, 3);
        let start = Instant::now();
        for _ in 0..3 {
            q.acquire(Lane::Normal).await;
        }
        assert_eq!(start.elapsed(), Duration::ZERO);
        q.acquire(Lane::Normal).await;
        q.acquire(Lane::Normal).await;
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_millis(400) && waited < Duration::from_millis(410),
            "{waited:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_teardown_call_goes_before_a_queue_of_ordinary_calls() {
        let q = quota(5, 1);
        q.acquire(Lane::Normal).await; // the bucket is empty now
        let start = Instant::now();
        let mut ordinary = Vec::new();
        for _ in 0..50 {
            let q = q.clone();
            ordinary.push(tokio::spawn(async move {
                q.acquire(Lane::Normal).await;
                start.elapsed()
            }));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let q2 = q.clone();
        let teardown = tokio::spawn(async move {
            teardown_lane(async {
                assert_eq!(Lane::current(), Lane::Teardown);
                q2.acquire(Lane::current()).await;
            })
            .await;
            start.elapsed()
        });
        let teardown_at = teardown.await.unwrap();
        // The next token (due at 200 ms) goes to the teardown call, not to the 50 ahead of it.
        assert!(teardown_at <= Duration::from_millis(201), "{teardown_at:?}");
        let mut times = Vec::new();
        for t in ordinary {
            times.push(t.await.unwrap());
        }
        times.sort();
        // The ordinary calls still run at the quota, one per 200 ms, after the teardown call.
        assert!(times[0] >= teardown_at, "{:?} vs {teardown_at:?}", times[0]);
        let last = *times.last().unwrap();
        assert!(
            last >= Duration::from_millis(200 * 51) && last < Duration::from_millis(200 * 52),
            "{last:?}"
        );
        assert_eq!(q.teardown_waiting(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_teardown_wait_does_not_block_the_others() {
        let q = quota(5, 1);
        q.acquire(Lane::Normal).await;
        let cancelled =
            tokio::time::timeout(Duration::from_millis(10), q.acquire(Lane::Teardown)).await;
        assert!(cancelled.is_err());
        assert_eq!(q.teardown_waiting(), 0);
        let start = Instant::now();
        q.acquire(Lane::Normal).await;
        assert!(start.elapsed() <= Duration::from_millis(200));
    }

    #[tokio::test]
    async fn the_lane_does_not_leak_out_of_its_scope() {
        assert_eq!(Lane::current(), Lane::Normal);
        teardown_lane(async { assert_eq!(Lane::current(), Lane::Teardown) }).await;
        assert_eq!(Lane::current(), Lane::Normal);
    }

    #[test]
    fn a_zero_period_is_refused() {
        assert!(PriorityQuota::new(Duration::ZERO, NonZeroU32::MIN).is_none());
    }
}
