//! Which pending job goes where, as a pure function over a snapshot of one pool.
//!
//! No I/O, no clock, no Kubernetes types: the pool reconciler builds the views from its
//! caches, and the policy benchmark drives the same function. Rules (DESIGN.md section 3):
//! pending jobs, oldest first, take Ready idle instances of the pool; a job waits for an
//! instance already starting rather than renting another; otherwise the pool's providers are
//! tried in order (a job's pin restricts them), a serverless provider takes the job directly,
//! an instance provider gets a new instance if `maxInstances` and `maxHourlySpend` allow.
//! One job per instance. Jobs that cannot be placed wait; they never fail here.

use jiff::Timestamp;
use rust_decimal::Decimal;

use crate::crd::{InstancePhase, ProviderKind};

/// A job waiting to be placed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingJob {
    pub name: String,
    pub created: Timestamp,
    /// The provider entry the job is pinned to, if any.
    pub provider: Option<String>,
}

/// An instance of the pool as the scheduler needs it.
#[derive(Clone, Debug, PartialEq)]
pub struct InstanceView {
    pub name: String,
    pub provider: String,
    pub phase: InstancePhase,
    /// Has a current job.
    pub busy: bool,
    /// Busy with a job that has already finished: free in a moment, so jobs wait for it
    /// rather than rent another machine.
    pub releasing: bool,
    /// Has a deletionTimestamp: going away, never bound.
    pub deleting: bool,
    /// Price per hour once known (after the offer is taken).
    pub price_per_hour: Option<Decimal>,
}

impl InstanceView {
    fn counts_against_limits(&self) -> bool {
        !self.deleting && self.phase != InstancePhase::Failed
    }
}

/// A provider entry of the pool, in the pool's order.
#[derive(Clone, Debug, PartialEq)]
pub struct ProviderView {
    pub name: String,
    pub kind: ProviderKind,
    /// False while backing off after "no capacity" or repeated failures, or while its
    /// configuration is broken (missing Secret).
    pub available: bool,
    /// The entry's price cap: what a new instance is assumed to cost until its offer is known.
    pub max_price_per_hour: Option<Decimal>,
}

/// The pool's limits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    pub max_instances: usize,
    pub max_hourly_spend: Option<Decimal>,
}

/// Why a job is still waiting.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WaitReason {
    /// An instance that will take it is starting.
    InstanceStarting,
    /// The pool has `maxInstances` instances already.
    MaxInstances,
    /// A new instance would take the pool over `maxHourlySpend`.
    MaxHourlySpend,
    /// Every provider the job may use is backing off or misconfigured.
    NoProviderAvailable,
    /// The job is pinned to a provider the pool does not have.
    UnknownProvider(String),
}

/// What the pool should do now.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// (job, idle instance) pairs to bind.
    pub bind: Vec<(String, String)>,
    /// (job, serverless provider) pairs to submit.
    pub serverless: Vec<(String, String)>,
    /// New instances to create, by provider entry name (one per entry in the list).
    pub create: Vec<String>,
    /// Jobs left waiting, with the reason.
    pub waiting: Vec<(String, WaitReason)>,
}

/// Places `jobs` (any order; sorted here, oldest first) on the pool described by the rest.
pub fn schedule(
    jobs: &[PendingJob],
    instances: &[InstanceView],
    providers: &[ProviderView],
    limits: &Limits,
) -> Plan {
    let mut order: Vec<&PendingJob> = jobs.iter().collect();
    order.sort_by(|a, b| a.created.cmp(&b.created).then_with(|| a.name.cmp(&b.name)));
    let mut room = Room::new(instances, providers, limits);
    let mut plan = Plan::default();
    for job in order {
        room.place(job, &mut plan);
    }
    plan
}

/// What is left to place jobs on while a pass goes down the queue.
struct Room<'a> {
    /// Ready instances with no job, in name order.
    idle: Vec<&'a InstanceView>,
    /// Instances that will take a job soon: starting, or finishing their job.
    starting: Vec<&'a InstanceView>,
    /// Instances counted against `maxInstances`, and their summed price per hour.
    total: usize,
    spend: Decimal,
    providers: &'a [ProviderView],
    limits: &'a Limits,
}

impl<'a> Room<'a> {
    fn new(
        instances: &'a [InstanceView],
        providers: &'a [ProviderView],
        limits: &'a Limits,
    ) -> Self {
        let idle = instances
            .iter()
            .filter(|i| i.phase == InstancePhase::Ready && !i.busy && !i.deleting)
            .collect();
        let starting = instances
            .iter()
            .filter(|i| {
                !i.deleting
                    && (matches!(
                        i.phase,
                        InstancePhase::Pending | InstancePhase::Provisioning
                    ) || (i.phase == InstancePhase::Ready && i.busy && i.releasing))
            })
            .collect();
        let counted = || instances.iter().filter(|i| i.counts_against_limits());
        let price = |i: &InstanceView| {
            i.price_per_hour
                .or_else(|| {
                    providers
                        .iter()
                        .find(|p| p.name == i.provider)?
                        .max_price_per_hour
                })
                .unwrap_or_default()
        };
        Self {
            idle,
            starting,
            total: counted().count(),
            spend: counted().map(price).sum(),
            providers,
            limits,
        }
    }

    /// Places one job: an idle instance, else a serverless entry that comes first, else an
    /// instance about to be free, else a new instance or serverless run from the first entry
    /// that can take it; otherwise it waits, with the reason.
    fn place(&mut self, job: &PendingJob, plan: &mut Plan) {
        let name = job.name.clone();
        let allowed = |provider: &str| job.provider.as_deref().is_none_or(|pin| pin == provider);
        if let Some(pin) = &job.provider
            && !self.providers.iter().any(|p| &p.name == pin)
        {
            plan.waiting
                .push((name, WaitReason::UnknownProvider(pin.clone())));
            return;
        }
        if let Some(pos) = self.idle.iter().position(|i| allowed(&i.provider)) {
            let inst = self.idle.remove(pos);
            plan.bind.push((name, inst.name.clone()));
            return;
        }
        // A serverless endpoint that comes first in the pool's order runs the job now rather
        // than have it wait for a machine that is still starting.
        if let Some(p) = self
            .providers
            .iter()
            .find(|p| allowed(&p.name) && p.available)
            && p.kind == ProviderKind::RunpodServerless
        {
            plan.serverless.push((name, p.name.clone()));
            return;
        }
        if let Some(pos) = self.starting.iter().position(|i| allowed(&i.provider)) {
            self.starting.remove(pos);
            plan.waiting.push((name, WaitReason::InstanceStarting));
            return;
        }
        if let Err(reason) = self.rent(&name, allowed, plan) {
            plan.waiting.push((name, reason));
        }
    }

    /// Runs the job at the first available entry it may use: a serverless run, or a new
    /// instance within the pool's limits (the job then waits for it).
    fn rent(
        &mut self,
        job: &str,
        allowed: impl Fn(&str) -> bool,
        plan: &mut Plan,
    ) -> Result<(), WaitReason> {
        let mut reason = WaitReason::NoProviderAvailable;
        for p in self
            .providers
            .iter()
            .filter(|p| allowed(&p.name) && p.available)
        {
            if p.kind == ProviderKind::RunpodServerless {
                plan.serverless.push((job.to_string(), p.name.clone()));
                return Ok(());
            }
            if self.total >= self.limits.max_instances {
                reason = WaitReason::MaxInstances;
                continue;
            }
            let cost = p.max_price_per_hour.unwrap_or_default();
            if self
                .limits
                .max_hourly_spend
                .is_some_and(|cap| self.spend + cost > cap)
            {
                reason = WaitReason::MaxHourlySpend;
                continue;
            }
            plan.create.push(p.name.clone());
            self.total += 1;
            self.spend += cost;
            plan.waiting
                .push((job.to_string(), WaitReason::InstanceStarting));
            return Ok(());
        }
        Err(reason)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dec(s: &str) -> Decimal {
        s.parse().unwrap()
    }

    fn job(name: &str, secs: i64, pin: Option<&str>) -> PendingJob {
        PendingJob {
            name: name.into(),
            created: Timestamp::from_second(1_800_000_000 + secs).unwrap(),
            provider: pin.map(Into::into),
        }
    }

    fn inst(name: &str, provider: &str, phase: InstancePhase, busy: bool) -> InstanceView {
        InstanceView {
            name: name.into(),
            provider: provider.into(),
            phase,
            busy,
            releasing: false,
            deleting: false,
            price_per_hour: Some(dec("0.20")),
        }
    }

    fn vast(available: bool) -> ProviderView {
        ProviderView {
            name: "vast".into(),
            kind: ProviderKind::Vast,
            available,
            max_price_per_hour: Some(dec("0.25")),
        }
    }

    fn runpod() -> ProviderView {
        ProviderView {
            name: "rp".into(),
            kind: ProviderKind::Runpod,
            available: true,
            max_price_per_hour: Some(dec("0.30")),
        }
    }

    fn serverless(available: bool) -> ProviderView {
        ProviderView {
            name: "sls".into(),
            kind: ProviderKind::RunpodServerless,
            available,
            max_price_per_hour: None,
        }
    }

    fn limits(max: usize, spend: Option<&str>) -> Limits {
        Limits {
            max_instances: max,
            max_hourly_spend: spend.map(dec),
        }
    }

    #[test]
    fn oldest_job_takes_the_idle_instance_others_get_new_ones() {
        let plan = schedule(
            &[job("young", 5, None), job("old", 1, None)],
            &[inst("i1", "vast", InstancePhase::Ready, false)],
            &[vast(true)],
            &limits(10, None),
        );
        assert_eq!(plan.bind, vec![("old".into(), "i1".into())]);
        assert_eq!(plan.create, vec!["vast".to_string()]);
        assert_eq!(
            plan.waiting,
            vec![("young".into(), WaitReason::InstanceStarting)]
        );
    }

    #[test]
    fn one_job_per_instance_and_busy_or_deleting_instances_are_skipped() {
        let mut deleting = inst("d", "vast", InstancePhase::Ready, false);
        deleting.deleting = true;
        let plan = schedule(
            &[job("a", 1, None), job("b", 2, None)],
            &[
                inst("busy", "vast", InstancePhase::Ready, true),
                deleting,
                inst("free", "vast", InstancePhase::Ready, false),
            ],
            &[vast(true)],
            &limits(3, None),
        );
        assert_eq!(plan.bind, vec![("a".into(), "free".into())]);
        // busy + free count; deleting does not: one more fits under 3.
        assert_eq!(plan.create, vec!["vast".to_string()]);
    }

    #[test]
    fn jobs_wait_for_starting_instances_instead_of_renting_more() {
        let plan = schedule(
            &[job("a", 1, None), job("b", 2, None)],
            &[inst("s", "vast", InstancePhase::Provisioning, false)],
            &[vast(true)],
            &limits(10, None),
        );
        assert!(plan.bind.is_empty());
        assert_eq!(plan.create, vec!["vast".to_string()]);
        assert_eq!(plan.waiting.len(), 2);
    }

    #[test]
    fn a_job_waits_for_an_instance_whose_job_just_finished() {
        let mut finishing = inst("f", "vast", InstancePhase::Ready, true);
        finishing.releasing = true;
        let plan = schedule(
            &[job("next", 1, None)],
            &[finishing],
            &[vast(true)],
            &limits(10, None),
        );
        assert!(plan.create.is_empty() && plan.bind.is_empty());
        assert_eq!(
            plan.waiting,
            vec![("next".into(), WaitReason::InstanceStarting)]
        );
    }

    #[test]
    fn max_instances_holds_and_jobs_wait() {
        let plan = schedule(
            &[job("a", 1, None), job("b", 2, None), job("c", 3, None)],
            &[],
            &[vast(true)],
            &limits(2, None),
        );
        assert_eq!(plan.create.len(), 2);
        assert_eq!(plan.waiting[2], ("c".into(), WaitReason::MaxInstances));
    }

    #[test]
    fn max_hourly_spend_counts_known_prices_and_caps_of_unknown_ones() {
        // One running at 0.20, one starting (price unknown: counted at the 0.25 cap) = 0.45.
        let mut starting = inst("s", "vast", InstancePhase::Pending, false);
        starting.price_per_hour = None;
        let plan = schedule(
            &[job("a", 1, None), job("b", 2, None), job("c", 3, None)],
            &[inst("r", "vast", InstancePhase::Ready, true), starting],
            &[vast(true), runpod()],
            &limits(10, Some("0.75")),
        );
        // "a" waits for the starting one; for "b" 0.45 + 0.25 (vast) = 0.70 fits; for "c"
        // neither 0.70 + 0.25 (vast) nor 0.70 + 0.30 (rp) does.
        assert_eq!(plan.create, vec!["vast".to_string()]);
        assert_eq!(plan.waiting[0], ("a".into(), WaitReason::InstanceStarting));
        assert_eq!(plan.waiting[2], ("c".into(), WaitReason::MaxHourlySpend));
    }

    #[test]
    fn providers_in_order_skip_backing_off_ones_and_serverless_takes_jobs_directly() {
        let plan = schedule(
            &[job("a", 1, None)],
            &[],
            &[serverless(true), vast(true)],
            &limits(10, None),
        );
        assert_eq!(plan.serverless, vec![("a".into(), "sls".into())]);
        assert!(plan.create.is_empty());

        let plan = schedule(
            &[job("a", 1, None)],
            &[],
            &[serverless(false), vast(false), runpod()],
            &limits(10, None),
        );
        assert_eq!(plan.create, vec!["rp".to_string()]);

        let plan = schedule(
            &[job("a", 1, None)],
            &[],
            &[serverless(false), vast(false)],
            &limits(10, None),
        );
        assert_eq!(
            plan.waiting,
            vec![("a".into(), WaitReason::NoProviderAvailable)]
        );
    }

    #[test]
    fn serverless_first_in_order_beats_waiting_for_a_starting_instance() {
        let plan = schedule(
            &[job("a", 1, None), job("pinned", 2, Some("vast"))],
            &[inst("s", "vast", InstancePhase::Provisioning, false)],
            &[serverless(true), vast(true)],
            &limits(10, None),
        );
        assert_eq!(plan.serverless, vec![("a".into(), "sls".into())]);
        assert_eq!(
            plan.waiting,
            vec![("pinned".into(), WaitReason::InstanceStarting)]
        );
        assert!(plan.create.is_empty());
    }

    #[test]
    fn warm_instances_win_over_serverless() {
        let plan = schedule(
            &[job("a", 1, None)],
            &[inst("warm", "vast", InstancePhase::Ready, false)],
            &[serverless(true), vast(true)],
            &limits(10, None),
        );
        assert_eq!(plan.bind, vec![("a".into(), "warm".into())]);
    }

    #[test]
    fn pins_are_honoured() {
        let plan = schedule(
            &[
                job("pinned", 1, Some("rp")),
                job("free", 2, None),
                job("lost", 3, Some("nope")),
            ],
            &[inst("v", "vast", InstancePhase::Ready, false)],
            &[vast(true), runpod()],
            &limits(10, None),
        );
        assert_eq!(plan.bind, vec![("free".into(), "v".into())]);
        assert_eq!(plan.create, vec!["rp".to_string()]);
        assert_eq!(
            plan.waiting.last().unwrap(),
            &("lost".into(), WaitReason::UnknownProvider("nope".into()))
        );
    }

    #[test]
    fn failed_instances_do_not_count_against_limits() {
        let plan = schedule(
            &[job("a", 1, None)],
            &[inst("f", "vast", InstancePhase::Failed, false)],
            &[vast(true)],
            &limits(1, None),
        );
        assert_eq!(plan.create, vec!["vast".to_string()]);
    }
}
