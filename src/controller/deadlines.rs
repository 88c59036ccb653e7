//! The idle-teardown service: the idle rule applied to one instance from the caches, the
//! delete that carries it out, and a timer per idle instance so the delete happens at the
//! deadline even while the instance's own reconcile is busy (a provider call waiting for the
//! client-side quota, a provider that hangs).
//!
//! The instance reconciler and the dispatch task (which frees an instance) both use it;
//! neither calls the other. Whichever of the timer and the reconcile deletes first wins; the
//! other gets 404 or 409.

use std::{collections::HashMap, sync::Arc, sync::Mutex};

use jiff::Timestamp;
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
        if decision == IdleDecision::Teardown {
            let api: Api<GpuInstance> = Api::namespaced(ctx.client.clone(), &ns);
            if let Err(e) = delete_idle(&gi, &pool, &ctx, &api, idle_since, deadline).await {
                warn!(instance = %name, error = %e, "idle teardown failed; the reconcile retries");
            }
        }
    });
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
    match api.delete(&gi.name_any(), &dp).await {
        Ok(_) => {
            let late = seconds_between(deadline, ctx.now()).max(0.0);
            ctx.metrics.idle_teardown_lateness_seconds.observe(late);
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
