//! Leader election on a `coordination.k8s.io/v1` Lease, so two or more replicas are safe:
//! only the holder of the Lease runs the controllers.
//!
//! The rules follow client-go's leader election: a Lease held by someone else is taken over
//! only when its record has not changed for `lease_duration` by this replica's own clock (no
//! trust in other clocks); the holder renews every `retry_period` and steps down (the
//! process exits, so no in-memory state survives) when it could not renew for
//! `renew_deadline`, which is shorter than `lease_duration`, so the old leader has stopped
//! before anyone else may start.

use std::time::{Duration, Instant};

use jiff::Timestamp;
use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
};
use kube::{Api, Client, api::PostParams};
use tracing::{info, warn};

/// Timing and identity of one candidate.
#[derive(Clone, Debug)]
pub struct LeaderConfig {
    pub namespace: String,
    pub lease_name: String,
    /// Unique per replica (the pod name in a Deployment).
    pub identity: String,
    /// How long a silent Lease blocks others.
    pub lease_duration: Duration,
    /// How long the holder keeps leading without a successful renewal.
    pub renew_deadline: Duration,
    /// How often the holder renews and candidates retry.
    pub retry_period: Duration,
}

impl LeaderConfig {
    pub fn new(namespace: String, lease_name: String, identity: String) -> Self {
        Self {
            namespace,
            lease_name,
            identity,
            lease_duration: Duration::from_secs(12),
            renew_deadline: Duration::from_secs(8),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// What a candidate remembers of the Lease it last saw held by someone else.
struct Observed {
    record: (Option<String>, Option<MicroTime>),
    since: Instant,
}

/// One candidate.
pub struct Elector {
    api: Api<Lease>,
    config: LeaderConfig,
    observed: Option<Observed>,
}

impl Elector {
    pub fn new(client: Client, config: LeaderConfig) -> Self {
        Self {
            api: Api::namespaced(client, &config.namespace),
            config,
            observed: None,
        }
    }

    fn secs(d: Duration) -> i32 {
        i32::try_from(d.as_secs()).unwrap_or(i32::MAX)
    }

    /// Tries once to acquire or renew; true when this replica holds the Lease now.
    pub async fn try_acquire_or_renew(&mut self) -> Result<bool, kube::Error> {
        let now = MicroTime(Timestamp::now());
        let me = self.config.identity.clone();
        let Some(mut lease) = self.api.get_opt(&self.config.lease_name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.config.lease_name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(me),
                    lease_duration_seconds: Some(Self::secs(self.config.lease_duration)),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let mut new_spec = spec.clone();
        if holder.as_deref() == Some(me.as_str()) {
            new_spec.renew_time = Some(now);
        } else {
            // Someone else holds it: take over only after its record stood still for the
            // whole lease duration, measured on our own clock.
            let record = (holder.clone(), spec.renew_time.clone());
            let expired = match &self.observed {
                Some(o) if o.record == record => {
                    let duration = spec
                        .lease_duration_seconds
                        .map(|s| Duration::from_secs(s.max(1) as u64))
                        .unwrap_or(self.config.lease_duration);
                    o.since.elapsed() >= duration
                }
                _ => {
                    self.observed = Some(Observed {
                        record,
                        since: Instant::now(),
                    });
                    holder.is_none()
                }
            };
            if !expired {
                return Ok(false);
            }
            new_spec.holder_identity = Some(me);
            new_spec.lease_duration_seconds = Some(Self::secs(self.config.lease_duration));
            new_spec.acquire_time = Some(now.clone());
            new_spec.renew_time = Some(now);
            new_spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        lease.spec = Some(new_spec);
        // A replace carries the resourceVersion we read: of two candidates, one wins.
        match self
            .api
            .replace(&self.config.lease_name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => {
                self.observed = None;
                Ok(true)
            }
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Waits until this replica holds the Lease.
    pub async fn acquire(&mut self) {
        loop {
            // A request that hangs (a stalled etcd, a lost route) must not stall the loop:
            // an attempt that timed out here but went through is seen as ours next time.
            let attempt =
                tokio::time::timeout(self.config.lease_duration, self.try_acquire_or_renew());
            match attempt.await {
                Ok(Ok(true)) => {
                    info!(identity = %self.config.identity, lease = %self.config.lease_name, "became the leader");
                    return;
                }
                Ok(Ok(false)) => {}
                Ok(Err(e)) => warn!(error = %e, "leader election: cannot read or write the Lease"),
                Err(_) => warn!("leader election: no answer from the API server"),
            }
            tokio::time::sleep(self.config.retry_period).await;
        }
    }

    /// Renews until a renewal has failed for `renew_deadline`; then returns (step down).
    ///
    /// Each attempt is cut off at the deadline: a renewal that hangs (etcd stalled, a
    /// connection whose packets are dropped) would otherwise keep this replica leading past
    /// its Lease while another one, which can reach the API server, takes over after
    /// `lease_duration`.
    pub async fn keep_renewing(&mut self) {
        let mut last_ok = Instant::now();
        loop {
            tokio::time::sleep(self.config.retry_period).await;
            let deadline = last_ok + self.config.renew_deadline;
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.try_acquire_or_renew()).await {
                Ok(Ok(true)) => last_ok = Instant::now(),
                Ok(Ok(false)) => {
                    warn!("leader election: the Lease was taken over");
                    return;
                }
                Ok(Err(e)) => warn!(error = %e, "leader election: renewal failed"),
                Err(_) => warn!("leader election: renewal got no answer in time"),
            }
            if last_ok.elapsed() >= self.config.renew_deadline {
                warn!("leader election: could not renew within the deadline");
                return;
            }
        }
    }
}
