//! The client-side request quota of one provider client, with priority lanes for teardown.
//!
//! A token bucket: `burst` requests at once, one more token every `replenish_every`. Each call
//! waits in a lane, and a token goes to the most urgent lane that has a caller waiting:
//!
//! 1. [`Lane::Destroy`]: the call that destroys a machine (every vendor's delete sets it),
//!    because the machine bills until it is made;
//! 2. [`Lane::Teardown`]: the rest of a teardown (the confirming read, a label lookup), set
//!    with [`teardown_lane`] by the finalizer and the orphan sweep;
//! 3. [`Lane::Normal`]: everything else (offers, creates, provisioning polls, liveness).
//!
//! Without lanes, a destroy queued behind two hundred provisioning polls waited minutes at
//! 5 requests/s while the machine kept billing (docs/benchmarks.md, "teardown"). The total
//! rate never exceeds the quota: lanes only reorder who goes next.
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

/// Which queue a call waits in, the most urgent last.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Lane {
    Normal = 0,
    Teardown = 1,
    Destroy = 2,
}

const LANES: usize = 3;

tokio::task_local! {
    static LANE: Lane;
}

/// Runs `fut` with every provider call inside it in the teardown lane (a destroy inside it
/// still goes in the destroy lane).
pub async fn teardown_lane<F: Future>(fut: F) -> F::Output {
    LANE.scope(Lane::Teardown, fut).await
}

/// Runs `fut`, a call that destroys a machine, in the destroy lane.
pub async fn destroy_lane<F: Future>(fut: F) -> F::Output {
    LANE.scope(Lane::Destroy, fut).await
}

impl Lane {
    /// The lane of the current task.
    pub fn current() -> Self {
        LANE.try_with(|l| *l).unwrap_or(Self::Normal)
    }
}

#[derive(Debug)]
struct Bucket {
    /// Tokens available now (fractional between refills).
    tokens: f64,
    refilled_at: Instant,
}

/// A token bucket with lanes; see the module documentation.
#[derive(Debug)]
pub struct PriorityQuota {
    every: Duration,
    burst: f64,
    bucket: Mutex<Bucket>,
    /// Callers waiting in each lane above `Normal`: a call defers to any in a higher lane.
    waiting: [AtomicUsize; LANES],
}

/// Decrements a waiting count however the wait ends (a token, or the call dropped).
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
            waiting: Default::default(),
        })
    }

    /// Callers waiting in `lane` now.
    pub fn waiting(&self, lane: Lane) -> usize {
        self.waiting[lane as usize].load(Ordering::SeqCst)
    }

    /// Waits for a token in `lane`.
    pub async fn acquire(&self, lane: Lane) {
        let counter = &self.waiting[lane as usize];
        counter.fetch_add(1, Ordering::SeqCst);
        let _waiting = Waiting(counter);
        loop {
            match self.try_take(lane) {
                None => return,
                Some(wait) => tokio::time::sleep(wait).await,
            }
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
        let outranked = self.waiting[lane as usize + 1..]
            .iter()
            .any(|w| w.load(Ordering::SeqCst) > 0);
        if !outranked && b.tokens >= 1.0 {
            b.tokens -= 1.0;
            return None;
        }
        // A call held back by a higher lane looks again when the next token is due: by then
        // the more urgent call has usually taken the previous one.
        let missing = (1.0 - b.tokens).max(0.0);
        Some(self.every.mul_f64(missing).max(Duration::from_millis(1)))
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

    /// Spawns a caller that waits in `lane`, set the way callers set it (the task-local
    /// scope), and returns when it got a token.
    fn caller(
        q: &Arc<PriorityQuota>,
        start: Instant,
        lane: Lane,
    ) -> tokio::task::JoinHandle<Duration> {
        let q = q.clone();
        tokio::spawn(async move {
            let wait = async { q.acquire(Lane::current()).await };
            match lane {
                Lane::Normal => wait.await,
                Lane::Teardown => teardown_lane(wait).await,
                Lane::Destroy => destroy_lane(wait).await,
            }
            start.elapsed()
        })
    }

    #[tokio::test(start_paused = true)]
    async fn destroys_go_first_then_teardown_reads_then_the_rest() {
        let q = quota(5, 1);
        q.acquire(Lane::Normal).await; // the bucket is empty now
        let start = Instant::now();
        let ordinary: Vec<_> = (0..50).map(|_| caller(&q, start, Lane::Normal)).collect();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let reads: Vec<_> = (0..3).map(|_| caller(&q, start, Lane::Teardown)).collect();
        tokio::time::sleep(Duration::from_millis(10)).await;
        let destroys: Vec<_> = (0..2).map(|_| caller(&q, start, Lane::Destroy)).collect();
        let at = |handles: Vec<tokio::task::JoinHandle<Duration>>| async move {
            let mut times = Vec::new();
            for h in handles {
                times.push(h.await.unwrap());
            }
            times.sort();
            times
        };
        let destroys = at(destroys).await;
        let reads = at(reads).await;
        let ordinary = at(ordinary).await;
        let ms = |n: u64| Duration::from_millis(n);
        // One token every 200 ms: the two destroys take the next two, then the three reads,
        // then the 50 ordinary calls that were waiting before all of them.
        assert!(
            destroys[0] <= ms(201) && destroys[1] <= ms(401),
            "{destroys:?}"
        );
        assert!(reads[0] >= destroys[1] && reads[2] <= ms(1001), "{reads:?}");
        assert!(ordinary[0] >= reads[2], "{:?} vs {reads:?}", ordinary[0]);
        let last = *ordinary.last().unwrap();
        assert!(last >= ms(200 * 55) && last < ms(200 * 56), "{last:?}");
        for lane in [Lane::Normal, Lane::Teardown, Lane::Destroy] {
            assert_eq!(q.waiting(lane), 0);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_urgent_wait_does_not_block_the_others() {
        let q = quota(5, 1);
        q.acquire(Lane::Normal).await;
        let cancelled =
            tokio::time::timeout(Duration::from_millis(10), q.acquire(Lane::Destroy)).await;
        assert!(cancelled.is_err());
        assert_eq!(q.waiting(Lane::Destroy), 0);
        let start = Instant::now();
        q.acquire(Lane::Normal).await;
        assert!(start.elapsed() <= Duration::from_millis(200));
    }

    #[tokio::test]
    async fn lanes_nest_and_do_not_leak_out_of_their_scope() {
        assert_eq!(Lane::current(), Lane::Normal);
        teardown_lane(async {
            assert_eq!(Lane::current(), Lane::Teardown);
            destroy_lane(async { assert_eq!(Lane::current(), Lane::Destroy) }).await;
            assert_eq!(Lane::current(), Lane::Teardown);
        })
        .await;
        assert_eq!(Lane::current(), Lane::Normal);
    }

    #[test]
    fn a_zero_period_is_refused() {
        assert!(PriorityQuota::new(Duration::ZERO, NonZeroU32::MIN).is_none());
    }
}
