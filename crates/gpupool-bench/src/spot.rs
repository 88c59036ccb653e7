//! Interruptible (spot) machines for the gpupool policy: what they cost, when the provider
//! takes them back, and when none can be rented.
//!
//! Assumptions (also in the README's benchmark section):
//! - an interruptible machine bills at a bid, a fixed fraction of the on-demand price (0.35 in
//!   the report, a typical Vast.ai interruptible bid), per second like an on-demand one;
//! - the provider takes each machine back after an exponential time (a rate per
//!   machine-hour, drawn per machine in creation order from a seeded stream), whether it is
//!   starting, idle or busy;
//! - the machine stops working at once: its job's connection resets, the job goes back to the
//!   queue without consuming a retry and later runs again from the start; the scheduler no
//!   longer counts the machine;
//! - the operator destroys it one liveness interval (60 s) later and it bills at the full bid
//!   until then (a stopped Vast instance bills only storage until destroyed, so this is an
//!   upper bound);
//! - optionally, seeded windows in which no interruptible capacity can be rented (the entry
//!   is backing off, `available: false`), with or without an on-demand entry after it.

use super::{
    sim::Params,
    trace::{HOUR, SECOND, SplitMix64},
};

/// The operator's default liveness interval: how long a preempted machine bills before the
/// operator notices and destroys it.
pub const LIVENESS_INTERVAL: i64 = 60 * SECOND;

/// When the provider takes new interruptible machines back.
#[derive(Clone, Debug)]
pub enum Preemption {
    /// After an exponential time, `per_hour` preemptions per machine-hour (0: never), one
    /// draw per created machine from a SplitMix64 seeded with `seed`.
    Rate { per_hour: f64, seed: u64 },
    /// After these delays from creation, by machine in creation order (`None` or past the
    /// end: never); for tests.
    After(Vec<Option<i64>>),
}

/// gpupool renting interruptible machines.
#[derive(Clone, Debug)]
pub struct Interruptible {
    /// The bid as a fraction of the on-demand `Params::price_per_hour`.
    pub bid_fraction: f64,
    pub preemption: Preemption,
    /// From preemption to destruction (one liveness interval), billed at the bid.
    pub detection: i64,
    /// Windows `[from, to)`, ms, in which no interruptible machine can be rented.
    pub outages: Vec<(i64, i64)>,
    /// An on-demand entry after the interruptible one, as the pool's provider order.
    pub on_demand_fallback: bool,
}

impl Interruptible {
    /// Interruptible machines at `bid_fraction` of on-demand, preempted at `per_hour` per
    /// machine-hour (seeded), detected 60 s later; always available, no fallback.
    pub fn at_rate(bid_fraction: f64, per_hour: f64, seed: u64) -> Self {
        Self {
            bid_fraction,
            preemption: Preemption::Rate { per_hour, seed },
            detection: LIVENESS_INTERVAL,
            outages: Vec::new(),
            on_demand_fallback: false,
        }
    }

    /// The bid in dollars per machine-hour.
    pub fn bid(&self, p: &Params) -> f64 {
        self.bid_fraction * p.price_per_hour
    }
}

/// Times to preemption of new machines, one per created machine in creation order.
pub(crate) struct Draws<'a> {
    preemption: &'a Preemption,
    rng: SplitMix64,
    made: usize,
}

impl<'a> Draws<'a> {
    pub(crate) fn new(preemption: &'a Preemption) -> Self {
        let seed = match preemption {
            Preemption::Rate { seed, .. } => *seed,
            Preemption::After(_) => 0,
        };
        Self {
            preemption,
            rng: SplitMix64::new(seed),
            made: 0,
        }
    }

    /// The next machine's time from creation to preemption, ms, or `None` for never.
    pub(crate) fn next_delay(&mut self) -> Option<i64> {
        let i = self.made;
        self.made += 1;
        match self.preemption {
            Preemption::Rate { per_hour, .. } if *per_hour > 0.0 => {
                Some(self.rng.exp(HOUR as f64 / per_hour) as i64)
            }
            Preemption::Rate { .. } => None,
            Preemption::After(delays) => delays.get(i).copied().flatten(),
        }
    }
}

/// Outage windows over `[0, horizon)`: available for exponential spells of mean `mean_up`,
/// then unavailable for exponential spells of mean `mean_down` (cut at the horizon).
pub fn outage_windows(horizon: i64, mean_up: i64, mean_down: i64, seed: u64) -> Vec<(i64, i64)> {
    let mut rng = SplitMix64::new(seed);
    let mut windows = Vec::new();
    let mut t = rng.exp(mean_up as f64) as i64;
    while t < horizon {
        let end = (t + rng.exp(mean_down as f64) as i64).min(horizon);
        if end > t {
            windows.push((t, end));
        }
        t = end + rng.exp(mean_up as f64) as i64;
    }
    windows
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        sim::{self, Outcome},
        trace::{self, DAY, Trace},
    };

    const IDLE_S: i64 = 300;

    fn p() -> Params {
        Params::default()
    }

    fn trace(arrivals: &[i64]) -> Trace {
        Trace {
            name: "t".into(),
            arrivals: arrivals.to_vec(),
            horizon: DAY,
        }
    }

    fn after(delays: &[Option<i64>]) -> Interruptible {
        Interruptible {
            preemption: Preemption::After(delays.to_vec()),
            ..Interruptible::at_rate(0.35, 0.0, 0)
        }
    }

    fn check_accounting(o: &Outcome, p: &Params) {
        assert_eq!(o.double_bookings, 0, "one job per machine");
        assert!(o.busy >= o.jobs as i64 * p.job, "every job ran in full");
        let sum = o.busy + o.idle + o.booting + o.dead;
        assert_eq!(o.billed, sum, "billed time adds up");
        assert!(o.billed_spot <= o.billed);
        assert!(o.peak_machines <= p.max_instances);
        assert!(o.reruns <= o.preemptions);
    }

    #[test]
    fn rate_zero_is_on_demand_at_the_bid() {
        let p = p();
        for t in trace::standard() {
            let d = sim::gpupool(&t, &p, IDLE_S);
            let s =
                sim::gpupool_interruptible(&t, &p, IDLE_S, &Interruptible::at_rate(0.35, 0.0, 9));
            assert_eq!(
                (s.billed, s.billed_spot),
                (d.billed, d.billed),
                "{}",
                t.name
            );
            assert_eq!(s.waits, d.waits, "{}", t.name);
            assert_eq!(
                (s.cold_starts, s.preemptions, s.reruns),
                (d.cold_starts, 0, 0)
            );
            let want = 0.35 * d.dollars_per_1000_jobs(p.price_per_hour);
            let got = s.dollars_per_1000_jobs_at(p.price_per_hour, 0.35 * p.price_per_hour);
            assert!(
                (got - want).abs() < 1e-9 * want,
                "{}: {got} vs {want}",
                t.name
            );
        }
    }

    #[test]
    fn a_preempted_job_goes_back_at_once_and_runs_again_on_a_new_machine() {
        // Created at 1 s, Ready at 41 s, preempted at 71 s, 30 s into its job; the job is
        // placed again at once on a new machine (Ready at 111 s, done at 171 s).
        let o = sim::gpupool_interruptible(
            &trace(&[SECOND]),
            &p(),
            IDLE_S,
            &after(&[Some(70 * SECOND)]),
        );
        check_accounting(&o, &p());
        assert_eq!((o.preemptions, o.reruns, o.cold_starts), (1, 1, 2));
        assert_eq!(o.waits, vec![110 * SECOND]);
        assert_eq!(o.busy, (30 + 60) * SECOND);
        // The first machine bills until 131 s (60 s after), the second 71 s to 471 s.
        assert_eq!(o.dead, 60 * SECOND);
        assert_eq!(o.billed, (130 + 400) * SECOND);
        assert_eq!(o.billed_spot, o.billed);
    }

    #[test]
    fn the_bill_counts_the_detection_delay() {
        // Idle from 101 s, preempted at 201 s: billed to 261 s, not to the 401 s deadline.
        let t = trace(&[SECOND]);
        let o = sim::gpupool_interruptible(&t, &p(), IDLE_S, &after(&[Some(200 * SECOND)]));
        check_accounting(&o, &p());
        assert_eq!((o.billed, o.dead, o.reruns), (260 * SECOND, 60 * SECOND, 0));
        let instant = Interruptible {
            detection: 0,
            ..after(&[Some(200 * SECOND)])
        };
        let o = sim::gpupool_interruptible(&t, &p(), IDLE_S, &instant);
        assert_eq!((o.billed, o.dead), (200 * SECOND, 0));
        let bid = 0.35 * p().price_per_hour;
        let want = 200.0 / 3600.0 * bid * 1000.0;
        assert!((o.dollars_per_1000_jobs_at(p().price_per_hour, bid) - want).abs() < 1e-12);
    }

    #[test]
    fn a_machine_preempted_while_starting_is_replaced() {
        let o = sim::gpupool_interruptible(
            &trace(&[SECOND]),
            &p(),
            IDLE_S,
            &after(&[Some(20 * SECOND)]),
        );
        check_accounting(&o, &p());
        assert_eq!((o.preemptions, o.reruns, o.lost_starts), (1, 0, 1));
        // The replacement is asked for at 21 s and takes the job at 61 s.
        assert_eq!(o.waits, vec![60 * SECOND]);
        assert_eq!(o.booting, (20 + 40) * SECOND);
    }

    #[test]
    fn outages_make_jobs_wait_unless_on_demand_follows() {
        let t = trace(&[SECOND]);
        let out = Interruptible {
            outages: vec![(0, 600 * SECOND)],
            ..Interruptible::at_rate(0.35, 0.0, 0)
        };
        let o = sim::gpupool_interruptible(&t, &p(), IDLE_S, &out);
        assert_eq!(o.waits, vec![(600 + 40 - 1) * SECOND]);
        let fallback = Interruptible {
            on_demand_fallback: true,
            ..out
        };
        let o = sim::gpupool_interruptible(&t, &p(), IDLE_S, &fallback);
        assert_eq!((o.waits.clone(), o.billed_spot), (vec![40 * SECOND], 0));
        let on_demand = sim::gpupool(&t, &p(), IDLE_S);
        assert_eq!(o.billed, on_demand.billed);
    }

    #[test]
    fn every_trace_and_rate_adds_up_is_reproducible_and_preempts_near_its_rate() {
        let p = p();
        for t in trace::standard() {
            for rate in [0.05, 0.5, 5.0] {
                let mut s = Interruptible::at_rate(0.35, rate, 21);
                s.outages = outage_windows(t.horizon, 9 * HOUR, HOUR, 22);
                s.on_demand_fallback = rate > 1.0;
                let o = sim::gpupool_interruptible(&t, &p, IDLE_S, &s);
                check_accounting(&o, &p);
                assert_eq!(o.waits.len(), t.arrivals.len(), "{}", t.name);
                let again = sim::gpupool_interruptible(&t, &p, IDLE_S, &s);
                assert_eq!((o.billed, o.waits), (again.billed, again.waits));
            }
        }
        // 2 jobs/min at 0.5 per machine-hour: about 120 preemptions in 240 machine-hours.
        let t = Trace::poisson("busy", 120.0, 2, 4);
        let o = sim::gpupool_interruptible(&t, &p, IDLE_S, &Interruptible::at_rate(0.35, 0.5, 21));
        let hours = (o.billed_spot - o.dead) as f64 / HOUR as f64;
        let observed = o.preemptions as f64 / hours;
        assert!((observed - 0.5).abs() < 0.1, "{observed} per machine-hour");
    }

    #[test]
    fn outage_windows_are_ordered_disjoint_and_near_their_share() {
        let w = outage_windows(70 * DAY, 9 * HOUR, HOUR, 22);
        assert!(w.windows(2).all(|x| x[0].1 < x[1].0));
        assert!(w.iter().all(|&(a, b)| 0 <= a && a < b && b <= 70 * DAY));
        let down: i64 = w.iter().map(|&(a, b)| b - a).sum();
        let share = down as f64 / (70 * DAY) as f64;
        assert!((share - 0.1).abs() < 0.03, "{share}");
    }
}
