//! The idle-teardown service: the idle rule applied to one instance from the caches, the
//! delete that carries it out, and a timer per idle instance so the delete happens at the
//! deadline even while the instance's own reconcile is busy (a provider call waiting for the
//! client-side quota, a provider that hangs).
//!
//! The instance reconciler and the dispatch task (which frees an instance) both use it;
//! neither calls the other. Whichever of the timer and the reconcile deletes first wins; the
//! other gets 404 or 409.

use std::{collections::HashMap, sync::Arc, sync::Mutex};

use jiff::{SignedDuration, Timestamp};
use kube::runtime::events::EventType;
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, Preconditions},
};
use tracing::{info, warn};

use crate::crd::{GpuInstance, GpuInstanceStatus, GpuPool};

use super::{
    Context, Result,
    idle::{self, IdleDecision, IdleInstance},
    status::seconds_between,
};

/// No job is bound to an instance in the last margin before its idle deadline (the claim
/// checks it, [`claimable`]): `CLAIM_MARGIN`, or a quarter of the pool's idle timeout when
/// that is shorter. At the deadline the machine can then be destroyed at the provider
/// without asking the API server whether a job took it: a claim that could still win was
/// begun by this process before the check, and is in [`Claims`]. The margin covers the wall
/// clock stepping back a little, and a claim write still in flight.
pub const CLAIM_MARGIN: SignedDuration = SignedDuration::from_secs(2);

/// The claim margin of a pool whose idle timeout is `idle_timeout_seconds`.
pub fn claim_margin(idle_timeout_seconds: i64) -> SignedDuration {
    SignedDuration::from_millis(idle_timeout_seconds.max(0).saturating_mul(250)).min(CLAIM_MARGIN)
}

/// Whether an instance whose idle deadline is `deadline` may be claimed at `now`.
pub fn claimable(deadline: Option<Timestamp>, idle_timeout_seconds: i64, now: Timestamp) -> bool {
    deadline.is_none_or(|d| {
        now < d
            .checked_sub(claim_margin(idle_timeout_seconds))
            .unwrap_or(Timestamp::MIN)
    })
}

/// What this process did to instances without the API server's word: the last time it began
/// a claim of each (before the claim write), and the machines it destroyed at their deadline
/// before their GpuInstance was deleted (the time of the destroy, for the final cost).
#[derive(Default)]
pub struct Claims {
    begun: Mutex<HashMap<String, Timestamp>>,
    destroyed: Mutex<HashMap<String, Timestamp>>,
}

impl Claims {
    fn lock(
        m: &Mutex<HashMap<String, Timestamp>>,
    ) -> std::sync::MutexGuard<'_, HashMap<String, Timestamp>> {
        m.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records that a claim of `instance_uid` begins now; call before checking
    /// [`claimable`] and before the claim write.
    pub fn begin(&self, instance_uid: &str, now: Timestamp) {
        Self::lock(&self.begun).insert(instance_uid.to_string(), now);
    }

    /// Whether a claim of the instance was begun at or after `since`.
    pub fn begun_since(&self, instance_uid: &str, since: Timestamp) -> bool {
        Self::lock(&self.begun)
            .get(instance_uid)
            .is_some_and(|t| *t >= since)
    }

    pub fn destroyed(&self, instance_uid: &str, at: Timestamp) {
        Self::lock(&self.destroyed).insert(instance_uid.to_string(), at);
    }

    /// When this process destroyed the instance's machine ahead of its finalizer, if it did.
    pub fn destroyed_at(&self, instance_uid: &str) -> Option<Timestamp> {
        Self::lock(&self.destroyed).get(instance_uid).copied()
    }

    pub fn forget(&self, instance_uid: &str) {
        Self::lock(&self.begun).remove(instance_uid);
        Self::lock(&self.destroyed).remove(instance_uid);
    }
}

/// The deadline each armed timer waits for, by instance UID.
#[derive(Default)]
pub struct Deadlines {
    armed: Mutex<HashMap<String, Timestamp>>,
}

impl Deadlines {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Timestamp>> {
        self.armed.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a timer for this deadline; false if one is armed for it already.
    fn arm(&self, instance_uid: &str, deadline: Timestamp) -> bool {
        self.lock().insert(instance_uid.to_string(), deadline) != Some(deadline)
    }

    fn disarm(&self, instance_uid: &str, deadline: Timestamp) {
        let mut d = self.lock();
        if d.get(instance_uid) == Some(&deadline) {
            d.remove(instance_uid);
        }
    }

    /// Timers armed now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The idle rule for one Ready, job-less instance at `now`, with the pool's other idle
/// instances (from the cache) for `minIdle`: the decision, since when it is idle, and its
/// deadline.
pub fn decide(
    ctx: &Context,
    gi: &GpuInstance,
    pool: &GpuPool,
    now: Timestamp,
) -> (IdleDecision, Timestamp, Timestamp) {
    let status = gi.status.clone().unwrap_or_default();
    let idle_since = status.idle_start().unwrap_or(now);
    let me = IdleInstance {
        name: gi.name_any(),
        idle_since,
    };
    let decision = idle::decide(
        now,
        &me,
        pool.spec.idle_timeout_seconds,
        &pool_idle(ctx, &gi.namespace().unwrap_or_default(), &gi.spec.pool),
        pool.spec.min_idle.max(0) as usize,
    );
    let deadline = idle::deadline(idle_since, pool.spec.idle_timeout_seconds);
    (decision, idle_since, deadline)
}

/// The pool's idle instances (Ready, no job, not being deleted), for the `minIdle` rule.
fn pool_idle(ctx: &Context, ns: &str, pool: &str) -> Vec<IdleInstance> {
    ctx.stores()
        .instances
        .state()
        .into_iter()
        .filter(|i| {
            i.namespace().as_deref() == Some(ns)
                && i.spec.pool == pool
                && i.metadata.deletion_timestamp.is_none()
        })
        .filter_map(|i| {
            let s = i.status.as_ref()?;
            s.is_idle().then(|| IdleInstance {
                name: i.name_any(),
                idle_since: s
                    .idle_since
                    .as_ref()
                    .map(|t| t.0)
                    .unwrap_or(Timestamp::UNIX_EPOCH),
            })
        })
        .collect()
}

/// Whether the timer should act on this cached instance: still the same object, idle and
/// not being deleted.
fn still_idle(gi: &GpuInstance, uid: &str) -> bool {
    let status: GpuInstanceStatus = gi.status.clone().unwrap_or_default();
    gi.uid().as_deref() == Some(uid) && gi.metadata.deletion_timestamp.is_none() && status.is_idle()
}

/// Arms the timer of this instance's idle deadline unless one is armed for it already.
pub fn arm(ctx: &Arc<Context>, gi: &GpuInstance, deadline: Timestamp) {
    let uid = gi.uid().unwrap_or_default();
    if !ctx.deadlines.arm(&uid, deadline) {
        return;
    }
    let ctx = Arc::clone(ctx);
    let (ns, name) = (gi.namespace().unwrap_or_default(), gi.name_any());
    tokio::spawn(async move {
        let now = ctx.now();
        if now < deadline {
            tokio::time::sleep(now.duration_until(deadline).unsigned_abs()).await;
        }
        ctx.deadlines.disarm(&uid, deadline);
        let Some(gi) = ctx.instance(&ns, &name).filter(|i| still_idle(i, &uid)) else {
            return;
        };
        let Some(pool) = ctx.pool(&ns, &gi.spec.pool) else {
            return;
        };
        let (decision, idle_since, deadline) = decide(&ctx, &gi, &pool, ctx.now());
        if decision != IdleDecision::Teardown {
            return;
        }
        let api: Api<GpuInstance> = Api::namespaced(ctx.client.clone(), &ns);
        // The usual way first: delete the GpuInstance, and its finalizer destroys the machine
        // and takes the cost from the destroy. When the API server does not answer at once,
        // the machine is destroyed now, and the record follows when it does.
        let quick = tokio::time::timeout(
            API_PATIENCE,
            delete_idle(&gi, &pool, &ctx, &api, idle_since, deadline),
        )
        .await;
        if matches!(quick, Ok(Ok(_))) {
            return;
        }
        destroy_first(&ctx, &gi, &pool, idle_since, deadline).await;
        // The GpuInstance goes next, when the API server answers; until then the machine is
        // already gone if `destroy_first` could do it, and only the record waits.
        let mut wait = std::time::Duration::from_millis(500);
        loop {
            match delete_idle(&gi, &pool, &ctx, &api, idle_since, deadline).await {
                Ok(_) => return,
                Err(e) => {
                    warn!(instance = %name, error = %e, "cannot delete the idle instance yet; retrying");
                }
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(std::time::Duration::from_secs(5));
            // Stop when the reconcile took over (the instance changed or went away).
            match ctx.instance(&ns, &name) {
                Some(now) if now.resource_version() == gi.resource_version() => {}
                _ if ctx.claims.destroyed_at(&uid).is_some() => {}
                _ => return,
            }
        }
    });
}

/// How long the idle timer waits for the API server before it destroys the machine itself.
const API_PATIENCE: std::time::Duration = std::time::Duration::from_millis(500);

/// At the deadline, with the API server not answering, destroys the machine at the provider,
/// unless this process began a claim of it during this idle period. The GpuInstance
/// is deleted after (its finalizer finds the machine gone). False when it could not: no
/// machine id, a claim begun, the provider unreachable; the usual path then runs.
async fn destroy_first(
    ctx: &Context,
    gi: &GpuInstance,
    pool: &GpuPool,
    idle_since: Timestamp,
    deadline: Timestamp,
) -> bool {
    let uid = gi.uid().unwrap_or_default();
    let Some(id) = gi
        .status
        .as_ref()
        .and_then(|s| s.provider_instance_id.clone())
    else {
        return false;
    };
    if ctx.claims.begun_since(&uid, idle_since) || ctx.now() < deadline {
        return false;
    }
    let provider = match ctx.providers.instance(pool, &gi.spec.provider).await {
        Ok(p) => p,
        Err(e) => {
            warn!(instance = %gi.name_any(), error = %e, "no provider client for the idle teardown");
            return false;
        }
    };
    if let Err(e) = crate::provider::quota::teardown_lane(provider.delete(&id)).await {
        warn!(instance = %gi.name_any(), error = %e, "destroying the idle machine failed; the finalizer retries");
        return false;
    }
    let now = ctx.now();
    ctx.claims.destroyed(&uid, now);
    let late = seconds_between(deadline, now).max(0.0);
    ctx.metrics.idle_teardown_lateness_seconds.observe(late);
    info!(instance = %gi.name_any(), machine = %id, lateness_s = late, "idle deadline reached; machine destroyed");
    true
}

/// Deletes an idle instance whose deadline has come; true when this call deleted it. The
/// delete carries the resourceVersion the decision was made on, so a job's claim that got
/// there first wins (409, and false).
pub async fn delete_idle(
    gi: &GpuInstance,
    pool: &GpuPool,
    ctx: &Context,
    api: &Api<GpuInstance>,
    idle_since: Timestamp,
    deadline: Timestamp,
) -> Result<bool> {
    let dp = DeleteParams {
        preconditions: Some(Preconditions {
            resource_version: gi.resource_version(),
            uid: gi.uid(),
        }),
        ..DeleteParams::default()
    };
    let destroyed = ctx.claims.destroyed_at(&gi.uid().unwrap_or_default());
    let mut deleted = api.delete(&gi.name_any(), &dp).await;
    if destroyed.is_some() && matches!(&deleted, Err(kube::Error::Api(s)) if s.code == 409) {
        // The machine is gone already and no claim of it can have won (`CLAIM_MARGIN`): a
        // status written meanwhile (a liveness check) must not keep the record alive.
        let dp = DeleteParams {
            preconditions: Some(Preconditions {
                resource_version: None,
                uid: gi.uid(),
            }),
            ..DeleteParams::default()
        };
        deleted = api.delete(&gi.name_any(), &dp).await;
    }
    match deleted {
        Ok(_) => {
            let late = seconds_between(deadline, destroyed.unwrap_or_else(|| ctx.now())).max(0.0);
            if destroyed.is_none() {
                ctx.metrics.idle_teardown_lateness_seconds.observe(late);
            }
            info!(
                instance = %gi.name_any(),
                lateness_s = late,
                "idle deadline reached; deleting the instance"
            );
            let note = format!(
                "idle since {idle_since} ({} s); destroying the machine",
                pool.spec.idle_timeout_seconds
            );
            ctx.event(gi, EventType::Normal, "IdleTimeout", note).await;
            Ok(true)
        }
        // A job claimed it first (or it changed): that write wins.
        Err(kube::Error::Api(s)) if s.code == 409 || s.code == 404 => Ok(false),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use jiff::{SignedDuration, Timestamp};
    use proptest::prelude::*;

    use super::{CLAIM_MARGIN, Claims, claimable};

    fn t(ms: i64) -> Timestamp {
        Timestamp::from_millisecond(1_800_000_000_000 + ms).unwrap()
    }

    #[test]
    fn an_instance_is_claimable_until_the_margin_before_its_deadline() {
        let d = t(10_000);
        assert!(claimable(None, 300, d));
        assert!(claimable(Some(d), 300, t(7_999)));
        assert!(!claimable(Some(d), 300, d - CLAIM_MARGIN));
        assert!(!claimable(Some(d), 300, d));
        assert!(!claimable(Some(Timestamp::MIN), 300, t(0)));
        // A short idle timeout gets a quarter of it: 1 s idle, 250 ms.
        assert_eq!(super::claim_margin(1), SignedDuration::from_millis(250));
        assert!(claimable(Some(d), 1, t(9_749)));
        assert!(!claimable(Some(d), 1, t(9_750)));
    }

    /// What one process does to one instance, in any order: claims (begun, checked, written)
    /// and releases (a new idle period and deadline), and the timer of the current deadline.
    #[derive(Clone, Debug)]
    enum Step {
        /// A claim attempt this many ms after the previous step.
        Claim(u16),
        /// The job ends: a new idle period starts this many ms later.
        Release(u16),
        /// Time passes to the current deadline, and a little past it; the timer fires.
        Deadline(u16),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (0u16..4000).prop_map(Step::Claim),
            (0u16..4000).prop_map(Step::Release),
            (0u16..500).prop_map(Step::Deadline),
        ]
    }

    proptest! {
        /// The rule the idle timer relies on to destroy without the API server: no claim
        /// succeeds at or after `deadline - CLAIM_MARGIN`, and the timer never destroys a
        /// machine that a claim of this idle period took.
        #[test]
        fn no_claim_after_the_margin_and_no_destroy_of_a_claimed_machine(
            steps in proptest::collection::vec(step(), 1..60),
            idle_ms in 3000i64..20_000,
        ) {
            let claims = Claims::default();
            let idle = SignedDuration::from_millis(idle_ms);
            let mut now = t(0);
            let mut idle_since = now;
            let mut busy = false;
            let mut destroyed = false;
            for s in steps {
                if destroyed {
                    break;
                }
                let deadline = idle_since + idle;
                match s {
                    Step::Claim(after) => {
                        now += SignedDuration::from_millis(i64::from(after));
                        if busy {
                            continue;
                        }
                        // As pool.rs `bind`: begin, then check, then the write (which wins
                        // here: the precondition is the API server's part).
                        claims.begin("i", now);
                        if claimable(Some(deadline), idle_ms / 1000, now) {
                            prop_assert!(now < deadline - super::claim_margin(idle_ms / 1000));
                            busy = true;
                        }
                    }
                    Step::Release(after) => {
                        if busy {
                            now += SignedDuration::from_millis(i64::from(after));
                            busy = false;
                            idle_since = now;
                        }
                    }
                    Step::Deadline(late) => {
                        if now < deadline {
                            now = deadline;
                        }
                        now += SignedDuration::from_millis(i64::from(late));
                        // As `destroy_first`: only at or past the deadline, and only when no
                        // claim was begun in this idle period.
                        if now >= deadline && !claims.begun_since("i", idle_since) {
                            prop_assert!(!busy, "destroyed a machine a claim took");
                            destroyed = true;
                        }
                    }
                }
            }
        }
    }
}
