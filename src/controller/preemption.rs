//! The preemption service: an interruptible machine the provider took back (Vast.ai stops an
//! outbid instance) is told apart from a broken one, its job goes back to the queue without
//! spending a retry (`VideoJobStatus::preempt`), and it is counted
//! (`gpupool_preemptions_total`) and reported (a `Preempted` event on the instance and on the
//! job). The instance reconciler finds a preemption through its liveness check; the dispatch
//! task finds one when the worker's connection drops mid-job. Either then deletes the
//! instance, whose finalizer destroys the machine (a stopped Vast instance still bills for
//! its disk).

use kube::{Api, ResourceExt, runtime::events::EventType};

use crate::{
    crd::{CapacityType, GpuInstance, GpuPool, JobPhase, VideoJob},
    metrics::ProviderEntryLabels,
    provider::{ProviderError, RemoteState},
};

use super::{Context, Error, Result, dispatch::count_outcome, status::apply_status};

/// Whether `gi` is a machine its provider may take back.
pub fn interruptible(gi: &GpuInstance) -> bool {
    gi.spec.capacity_type == CapacityType::Interruptible
}

/// Whether what the provider says of an interruptible machine means it was taken back: it
/// stopped (we never stop machines), or it is gone without our asking.
pub fn taken_back(state: &Result<RemoteState, ProviderError>) -> bool {
    matches!(
        state,
        Ok(RemoteState::Stopped(_) | RemoteState::Terminated) | Err(ProviderError::NotFound(_))
    )
}

/// Asks the provider whether the interruptible instance `gi` was taken back. Any failure to
/// ask is "no": the caller then treats the instance as it would an on-demand one.
pub async fn check(ctx: &Context, pool: &GpuPool, gi: &GpuInstance) -> bool {
    let Some(id) = gi
        .status
        .as_ref()
        .and_then(|s| s.provider_instance_id.clone())
    else {
        return false;
    };
    if !interruptible(gi) {
        return false;
    }
    let Ok(provider) = ctx.providers.instance(pool, &gi.spec.provider).await else {
        return false;
    };
    taken_back(&provider.get(&id).await.map(|r| r.state))
}

/// Counts the preemption of `gi` in `gpupool_preemptions_total`.
pub fn count(ctx: &Context, gi: &GpuInstance) {
    let labels = ProviderEntryLabels {
        namespace: gi.namespace().unwrap_or_default(),
        pool: gi.spec.pool.clone(),
        provider: gi.spec.provider.clone(),
    };
    ctx.metrics.preemptions.get_or_create(&labels).inc();
}

/// Counts the preemption of `gi` and says so on it.
pub async fn report(ctx: &Context, gi: &GpuInstance, why: &str) {
    count(ctx, gi);
    let note = format!("{why}; destroying the machine and running its job elsewhere");
    ctx.event(gi, EventType::Warning, "Preempted", note).await;
}

/// Puts `job` (running on the preempted instance `instance`) back to Pending without
/// spending a retry; nothing happens when the job has moved on. Retried on conflicts.
pub async fn requeue_job(
    ctx: &Context,
    ns: &str,
    job: &str,
    instance: &str,
    why: &str,
) -> Result<()> {
    let api: Api<VideoJob> = Api::namespaced(ctx.client.clone(), ns);
    for _ in 0..10 {
        let Some(current) = api.get_opt(job).await? else {
            return Ok(());
        };
        let mut s = current.status.clone().unwrap_or_default();
        let on_it = s.instance.as_deref() == Some(instance)
            && matches!(s.phase, Some(JobPhase::Scheduled | JobPhase::Running));
        if !on_it {
            return Ok(());
        }
        let reason = s.preempt(why.to_string(), current.metadata.generation, ctx.now());
        match apply_status(&api, &current, &s).await {
            Ok(updated) => {
                if let Some(outcome) = s.outcome() {
                    count_outcome(ctx, &updated, outcome);
                }
                ctx.event(&updated, EventType::Warning, reason, why.to_string())
                    .await;
                return Ok(());
            }
            Err(e) if e.is_conflict() => continue,
            Err(Error::Kube(kube::Error::Api(s))) if s.code == 404 => return Ok(()),
            Err(e) => return Err(e),
        }
    }
    Err(Error::ConflictsExhausted(format!(
        "could not requeue job {job} after 10 conflicts"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stopped_or_vanished_machine_was_taken_back_a_failing_call_says_nothing() {
        assert!(taken_back(&Ok(RemoteState::Stopped("outbid".into()))));
        assert!(taken_back(&Ok(RemoteState::Terminated)));
        assert!(taken_back(&Err(ProviderError::NotFound("m".into()))));
        assert!(!taken_back(&Ok(RemoteState::Running)));
        assert!(!taken_back(&Ok(RemoteState::Starting)));
        assert!(!taken_back(&Err(ProviderError::Transient("503".into()))));
    }
}
