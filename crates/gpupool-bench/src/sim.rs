//! The discrete-event simulation of the ways to run GPU jobs, in simulated time.
//!
//! Every policy sees the same trace and the same machine: a job takes `job` ms, a new machine
//! is billed from the moment it is asked for and takes `cold_start` ms to take work, at most
//! `max_instances` machines at once. Nothing sleeps; events are processed in time order (ties
//! in the order they were queued). The gpupool policy calls the controller's own pure
//! functions, [`scheduling::schedule`] on every event and [`idle::decide`] at
//! [`idle::deadline`], so the figures are those of the code that runs in the cluster. The
//! same gpupool run also rents interruptible machines ([`gpupool_interruptible`], the model in
//! [`crate::spot`]): preempted machines leave the scheduler's view at once and bill until
//! destroyed.

use std::{
    cmp::Reverse,
    collections::{BinaryHeap, VecDeque},
};

use jiff::Timestamp;
use rust_decimal::Decimal;

use super::{
    spot::{Draws, Interruptible},
    trace::{DAY, SECOND, SplitMix64, Trace},
};
use gpupool::{
    controller::{
        idle::{self, IdleDecision, IdleInstance},
        scheduling::{self, InstanceView, Limits, PendingJob, ProviderView},
    },
    crd::{InstancePhase, ProviderKind},
};

/// The workload and the machine, shared by every policy.
#[derive(Clone, Debug)]
pub struct Params {
    pub job: i64,
    pub cold_start: i64,
    /// Dollars per machine-hour (and per worker-hour for serverless).
    pub price_per_hour: f64,
    /// The pool's `maxInstances` (the product default), also the endpoint's `workersMax` and
    /// the pool manager's cap, so no policy wins by renting more at once.
    pub max_instances: usize,
}

impl Default for Params {
    fn default() -> Self {
        Self {
            job: 60 * SECOND,
            cold_start: 40 * SECOND,
            price_per_hour: 0.18,
            max_instances: 10,
        }
    }
}

/// What a policy cost and how long jobs waited, over one trace.
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    pub jobs: usize,
    /// Machine time paid for, from the request to the destruction.
    pub billed: i64,
    /// Time machines spent running jobs (including runs cut short by a restart).
    pub busy: i64,
    /// Time machines were ready with no job.
    pub idle: i64,
    /// Time machines spent starting.
    pub booting: i64,
    pub cold_starts: usize,
    /// Running jobs killed by a restart of the pool manager, or by a preemption, and run again.
    pub reruns: usize,
    /// Machines destroyed by a restart, or preempted, while still starting (their jobs start
    /// over).
    pub lost_starts: usize,
    /// Interruptible only: machines the provider took back.
    pub preemptions: usize,
    /// Interruptible only: time preempted machines billed until destroyed (detection delay).
    pub dead: i64,
    /// The part of `billed` on interruptible machines, billed at the bid.
    pub billed_spot: i64,
    /// Arrival to (final) start, per job, sorted.
    pub waits: Vec<i64>,
    /// Most machines alive at once.
    pub peak_machines: usize,
    /// A job was given to a machine that already had one (must stay 0).
    pub double_bookings: usize,
}

impl Outcome {
    fn per_job(&self, ms: i64) -> f64 {
        ms as f64 / SECOND as f64 / self.jobs.max(1) as f64
    }
    pub fn billed_s_per_job(&self) -> f64 {
        self.per_job(self.billed)
    }
    pub fn idle_s_per_job(&self) -> f64 {
        self.per_job(self.idle)
    }
    pub fn cold_starts_per_100(&self) -> f64 {
        100.0 * self.cold_starts as f64 / self.jobs.max(1) as f64
    }
    /// Nearest-rank percentile of the wait, in seconds.
    pub fn wait_percentile_s(&self, p: f64) -> f64 {
        if self.waits.is_empty() {
            return 0.0;
        }
        let rank = ((p / 100.0) * self.waits.len() as f64).ceil() as usize;
        self.waits[rank.clamp(1, self.waits.len()) - 1] as f64 / SECOND as f64
    }
    pub fn dollars_per_1000_jobs(&self, price_per_hour: f64) -> f64 {
        self.billed as f64 / 3_600_000.0 * price_per_hour * 1000.0 / self.jobs.max(1) as f64
    }
    /// Dollars per 1000 jobs with interruptible time (`billed_spot`) at `bid_per_hour` and
    /// the rest at `price_per_hour`.
    pub fn dollars_per_1000_jobs_at(&self, price_per_hour: f64, bid_per_hour: f64) -> f64 {
        let hours = |ms: i64| ms as f64 / 3_600_000.0;
        let dollars = hours(self.billed - self.billed_spot) * price_per_hour
            + hours(self.billed_spot) * bid_per_hour;
        dollars * 1000.0 / self.jobs.max(1) as f64
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Ev {
    Arrival(usize),
    Ready(usize),
    JobEnd(usize),
    /// Idle-deadline check for a machine idle since the given instant.
    IdleCheck(usize, i64),
    /// The pool manager's monitor loop.
    Tick,
    /// The pool manager restarts.
    Restart,
    /// Interruptible only: the provider takes the machine back.
    Preempt(usize),
    /// Interruptible only: the operator notices the preemption and destroys the machine.
    Detected(usize),
    /// Interruptible only: interruptible capacity can (true) or cannot be rented from now.
    Capacity(bool),
}

#[derive(Clone, Debug)]
struct Machine {
    created: i64,
    ready: bool,
    gone: bool,
    /// (job, started)
    job: Option<(usize, i64)>,
    idle_since: Option<i64>,
    /// Pool manager only: the job this machine was started for.
    reserved: Option<usize>,
    /// gpupool only: the index of its provider entry.
    provider: usize,
    /// Interruptible: billed at the bid, may be preempted.
    spot: bool,
    /// When the provider took it back; it has worked no more since.
    preempted: Option<i64>,
}

/// Machines, clock, event queue and accounting, shared by the pay-per-use policies.
struct World<'a> {
    trace: &'a Trace,
    p: &'a Params,
    queue: BinaryHeap<Reverse<(i64, u64, Ev)>>,
    seq: u64,
    machines: Vec<Machine>,
    /// Indices of machines not yet destroyed, in creation order.
    live: Vec<usize>,
    out: Outcome,
    done: usize,
    arrived: usize,
}

impl<'a> World<'a> {
    fn new(trace: &'a Trace, p: &'a Params) -> Self {
        let mut w = Self {
            trace,
            p,
            queue: BinaryHeap::new(),
            seq: 0,
            machines: Vec::new(),
            live: Vec::new(),
            out: Outcome {
                jobs: trace.arrivals.len(),
                waits: vec![0; trace.arrivals.len()],
                ..Outcome::default()
            },
            done: 0,
            arrived: 0,
        };
        for (j, &t) in trace.arrivals.iter().enumerate() {
            w.push(t, Ev::Arrival(j));
        }
        w
    }

    fn push(&mut self, at: i64, ev: Ev) {
        self.seq += 1;
        self.queue.push(Reverse((at, self.seq, ev)));
    }

    fn pop(&mut self) -> Option<(i64, Ev)> {
        let Reverse((t, _, ev)) = self.queue.pop()?;
        if let Ev::Arrival(_) = ev {
            self.arrived += 1;
        }
        Some((t, ev))
    }

    fn create(&mut self, now: i64, reserved: Option<usize>) -> usize {
        let m = self.machines.len();
        self.machines.push(Machine {
            created: now,
            ready: false,
            gone: false,
            job: None,
            idle_since: None,
            reserved,
            provider: 0,
            spot: false,
            preempted: None,
        });
        self.live.push(m);
        self.out.cold_starts += 1;
        self.out.peak_machines = self.out.peak_machines.max(self.live.len());
        self.push(now + self.p.cold_start, Ev::Ready(m));
        m
    }

    /// The machine is up: record its boot and make it idle.
    fn ready(&mut self, m: usize, now: i64) {
        let mc = &mut self.machines[m];
        mc.ready = true;
        self.out.booting += now - mc.created;
        mc.idle_since = Some(now);
    }

    fn start(&mut self, job: usize, m: usize, now: i64) {
        let mc = &mut self.machines[m];
        if mc.job.is_some() || !mc.ready || mc.gone {
            self.out.double_bookings += 1;
        }
        if let Some(since) = mc.idle_since.take() {
            self.out.idle += now - since;
        }
        mc.job = Some((job, now));
        mc.reserved = None;
        self.out.waits[job] = now - self.trace.arrivals[job];
        self.push(now + self.p.job, Ev::JobEnd(m));
    }

    /// The job on `m` ends now; the machine becomes idle.
    fn finish(&mut self, m: usize, now: i64) {
        let mc = &mut self.machines[m];
        let (_, started) = mc.job.take().expect("a job to finish");
        self.out.busy += now - started;
        mc.idle_since = Some(now);
        self.done += 1;
    }

    /// Destroys `m` now and returns the job it was running, if any.
    fn destroy(&mut self, m: usize, now: i64) -> Option<usize> {
        let killed = self.stop(m, now);
        let mc = &mut self.machines[m];
        mc.gone = true;
        self.out.billed += now - mc.created;
        if mc.spot {
            self.out.billed_spot += now - mc.created;
        }
        if let Some(at) = mc.preempted {
            self.out.dead += now - at;
        }
        self.live.retain(|&x| x != m);
        killed
    }

    /// `m` stops working now (unless it already has): closes its starting, idle or busy time
    /// and returns the job it was running, if any, to be run again.
    fn stop(&mut self, m: usize, now: i64) -> Option<usize> {
        let mc = &mut self.machines[m];
        if mc.preempted.is_some() {
            return None;
        }
        if !mc.ready {
            self.out.booting += now - mc.created;
            self.out.lost_starts += 1;
        }
        if let Some(since) = mc.idle_since.take() {
            self.out.idle += now - since;
        }
        mc.job.take().map(|(job, started)| {
            self.out.busy += now - started;
            self.out.reruns += 1;
            job
        })
    }

    /// The provider takes `m` back now: it stops working and leaves the pool's view, but
    /// bills until [`World::destroy`]. Returns the job it was running, if any.
    fn preempt(&mut self, m: usize, now: i64) -> Option<usize> {
        let killed = self.stop(m, now);
        self.machines[m].preempted = Some(now);
        self.out.preemptions += 1;
        self.live.retain(|&x| x != m);
        killed
    }

    fn idle_machines(&self) -> impl Iterator<Item = usize> + '_ {
        self.live.iter().copied().filter(|&m| {
            let mc = &self.machines[m];
            mc.ready && mc.job.is_none()
        })
    }

    fn first_idle(&self) -> Option<usize> {
        self.idle_machines().next()
    }

    fn finish_outcome(mut self) -> Outcome {
        assert!(self.live.is_empty(), "machines left running at the end");
        assert_eq!(self.done, self.out.jobs, "every job runs to the end");
        self.out.waits.sort_unstable();
        self.out
    }
}

const EPOCH_MS: i64 = 1_800_000_000_000;

fn ts(ms: i64) -> Timestamp {
    Timestamp::from_millisecond(EPOCH_MS + ms).expect("simulated time in range")
}

fn ms(t: Timestamp) -> i64 {
    t.as_millisecond() - EPOCH_MS
}

fn job_name(j: usize) -> String {
    format!("j{j:08}")
}

fn machine_name(m: usize) -> String {
    format!("i{m:08}")
}

fn index(name: &str) -> usize {
    name[1..].parse().expect("a simulator name")
}

/// gpupool: `schedule()` on every event, teardown exactly at `idle::deadline` per `decide()`.
pub fn gpupool(trace: &Trace, p: &Params, idle_timeout_s: i64) -> Outcome {
    Gpupool::new(trace, p, idle_timeout_s, None).run()
}

/// gpupool renting interruptible machines (and on-demand ones after them if `spot` says so):
/// the same rules, plus preemption, detection and outages as [`Interruptible`] describes.
pub fn gpupool_interruptible(
    trace: &Trace,
    p: &Params,
    idle_timeout_s: i64,
    spot: &Interruptible,
) -> Outcome {
    Gpupool::new(trace, p, idle_timeout_s, Some(spot)).run()
}

fn decimal(dollars: f64) -> Decimal {
    Decimal::try_from(dollars).expect("a price")
}

/// One gpupool run: the machines, the pool as `schedule()` sees it and the jobs waiting.
struct Gpupool<'a> {
    w: World<'a>,
    idle_timeout_s: i64,
    /// The pool's provider entries in order; with `spot`, the first is interruptible.
    providers: Vec<ProviderView>,
    limits: Limits,
    pending: Vec<usize>,
    spot: Option<(&'a Interruptible, Draws<'a>)>,
}

impl<'a> Gpupool<'a> {
    fn new(
        trace: &'a Trace,
        p: &'a Params,
        idle_timeout_s: i64,
        spot: Option<&'a Interruptible>,
    ) -> Self {
        let on_demand = ProviderView {
            name: "vast".into(),
            kind: ProviderKind::Vast,
            available: true,
            max_price_per_hour: Some(decimal(p.price_per_hour)),
        };
        let mut w = World::new(trace, p);
        let providers = match spot {
            None => vec![on_demand],
            Some(s) => {
                for &(from, to) in &s.outages {
                    w.push(from, Ev::Capacity(false));
                    w.push(to, Ev::Capacity(true));
                }
                let interruptible = ProviderView {
                    name: "vast-interruptible".into(),
                    max_price_per_hour: Some(decimal(s.bid(p))),
                    ..on_demand.clone()
                };
                let fallback = s.on_demand_fallback.then_some(on_demand);
                std::iter::once(interruptible).chain(fallback).collect()
            }
        };
        Self {
            w,
            idle_timeout_s,
            providers,
            limits: Limits {
                max_instances: p.max_instances,
                max_hourly_spend: None,
            },
            pending: Vec::new(),
            spot: spot.map(|s| (s, Draws::new(&s.preemption))),
        }
    }

    fn run(mut self) -> Outcome {
        while let Some((now, ev)) = self.w.pop() {
            if self.handle(now, ev) && !self.pending.is_empty() {
                self.schedule(now);
            }
        }
        self.w.finish_outcome()
    }

    /// Applies one event; false when it changed nothing the scheduler sees.
    fn handle(&mut self, now: i64, ev: Ev) -> bool {
        match ev {
            Ev::Arrival(j) => self.pending.push(j),
            Ev::Ready(m) | Ev::JobEnd(m) if self.w.machines[m].preempted.is_some() => {
                return false;
            }
            Ev::Ready(m) => {
                self.w.ready(m, now);
                arm_idle_check(&mut self.w, m, now, self.idle_timeout_s);
            }
            Ev::JobEnd(m) => {
                self.w.finish(m, now);
                arm_idle_check(&mut self.w, m, now, self.idle_timeout_s);
            }
            Ev::IdleCheck(m, since) => return self.idle_check(m, since, now),
            Ev::Preempt(m) => return self.preempt(m, now),
            Ev::Detected(m) => {
                self.w.destroy(m, now);
                return false;
            }
            Ev::Capacity(up) => self.providers[0].available = up,
            Ev::Tick | Ev::Restart => unreachable!("not a gpupool event"),
        }
        true
    }

    /// `decide()` for `m` if it is still idle since `since`; false if it is not.
    fn idle_check(&mut self, m: usize, since: i64, now: i64) -> bool {
        let w = &mut self.w;
        if w.machines[m].gone || w.machines[m].idle_since != Some(since) {
            return false;
        }
        let pool_idle: Vec<IdleInstance> = w
            .idle_machines()
            .map(|i| IdleInstance {
                name: machine_name(i),
                idle_since: ts(w.machines[i].idle_since.expect("idle")),
            })
            .collect();
        let me = IdleInstance {
            name: machine_name(m),
            idle_since: ts(since),
        };
        match idle::decide(ts(now), &me, self.idle_timeout_s, &pool_idle, 0) {
            IdleDecision::WaitFor(d) => {
                w.push(now + d.as_millis() as i64, Ev::IdleCheck(m, since));
            }
            IdleDecision::KeepWarm => {}
            IdleDecision::Teardown => {
                w.destroy(m, now);
            }
        }
        true
    }

    /// The provider takes `m` back: its job waits again at once (no retry used) and the
    /// machine is destroyed one detection delay later.
    fn preempt(&mut self, m: usize, now: i64) -> bool {
        let (spot, _) = self
            .spot
            .as_ref()
            .expect("preemption of an interruptible machine");
        let detection = spot.detection;
        if self.w.machines[m].gone || self.w.machines[m].preempted.is_some() {
            return false;
        }
        self.pending.extend(self.w.preempt(m, now));
        self.w.push(now + detection, Ev::Detected(m));
        true
    }

    /// One `schedule()` pass over the pending jobs and the machines in service, applied.
    fn schedule(&mut self, now: i64) {
        let trace = self.w.trace;
        let jobs: Vec<PendingJob> = self
            .pending
            .iter()
            .map(|&j| PendingJob {
                name: job_name(j),
                created: ts(trace.arrivals[j]),
                provider: None,
            })
            .collect();
        let views = self.views();
        let plan = scheduling::schedule(&jobs, &views, &self.providers, &self.limits);
        for (job, inst) in &plan.bind {
            let j = index(job);
            self.pending.retain(|&x| x != j);
            self.w.start(j, index(inst), now);
        }
        for entry in &plan.create {
            self.create(entry, now);
        }
    }

    /// The machines in service as `schedule()` sees them.
    fn views(&self) -> Vec<InstanceView> {
        let w = &self.w;
        w.live
            .iter()
            .map(|&m| {
                let mc = &w.machines[m];
                let entry = &self.providers[mc.provider];
                InstanceView {
                    name: machine_name(m),
                    provider: entry.name.clone(),
                    phase: if mc.ready {
                        InstancePhase::Ready
                    } else {
                        InstancePhase::Provisioning
                    },
                    busy: mc.job.is_some(),
                    releasing: false,
                    deleting: false,
                    price_per_hour: entry.max_price_per_hour,
                }
            })
            .collect()
    }

    /// A new machine from provider entry `entry`; an interruptible one gets its preemption.
    fn create(&mut self, entry: &str, now: i64) {
        let provider = self
            .providers
            .iter()
            .position(|p| p.name == entry)
            .expect("a provider entry of the pool");
        let m = self.w.create(now, None);
        self.w.machines[m].provider = provider;
        let Some((_, draws)) = &mut self.spot else {
            return;
        };
        let delay = draws.next_delay();
        if provider == 0 {
            self.w.machines[m].spot = true;
            if let Some(d) = delay {
                self.w.push(now + d, Ev::Preempt(m));
            }
        }
    }
}

fn arm_idle_check(w: &mut World<'_>, m: usize, since: i64, idle_timeout_s: i64) {
    let due = ms(idle::deadline(ts(since), idle_timeout_s));
    w.push(due, Ev::IdleCheck(m, since));
}

/// A classic pool manager: an arriving job takes any idle machine, else starts a machine of
/// its own (or queues at the cap); a monitor loop every `poll_s` destroys machines idle
/// `idle_s` or more; once a day, at a seeded random time, the manager restarts and destroys
/// every machine, and the jobs they were running start again from the beginning.
pub fn pool_manager(trace: &Trace, p: &Params, idle_s: i64, poll_s: i64, seed: u64) -> Outcome {
    let mut w = World::new(trace, p);
    let mut rng = SplitMix64::new(seed);
    let mut day = 0;
    while day * DAY < trace.horizon {
        let at = day * DAY + (rng.unit() * DAY as f64) as i64;
        if at < trace.horizon {
            w.push(at, Ev::Restart);
        }
        day += 1;
    }
    w.push(0, Ev::Tick);
    let mut queue: VecDeque<usize> = VecDeque::new();

    fn acquire(w: &mut World<'_>, queue: &mut VecDeque<usize>, j: usize, now: i64) {
        if let Some(m) = w.first_idle() {
            w.start(j, m, now);
        } else if w.live.len() < w.p.max_instances {
            w.create(now, Some(j));
        } else {
            queue.push_back(j);
        }
    }

    fn free(w: &mut World<'_>, queue: &mut VecDeque<usize>, m: usize, now: i64) {
        if let Some(j) = w.machines[m].reserved {
            w.start(j, m, now);
        } else if let Some(j) = queue.pop_front() {
            w.start(j, m, now);
        }
    }

    while let Some((now, ev)) = w.pop() {
        match ev {
            Ev::Arrival(j) => acquire(&mut w, &mut queue, j, now),
            Ev::Ready(m) if !w.machines[m].gone => {
                w.ready(m, now);
                free(&mut w, &mut queue, m, now);
            }
            Ev::JobEnd(m) if !w.machines[m].gone => {
                w.finish(m, now);
                free(&mut w, &mut queue, m, now);
            }
            Ev::Ready(_) | Ev::JobEnd(_) => {}
            Ev::Tick => {
                let stale: Vec<usize> = w
                    .idle_machines()
                    .filter(|&m| now - w.machines[m].idle_since.expect("idle") >= idle_s * SECOND)
                    .collect();
                for m in stale {
                    w.destroy(m, now);
                }
                let more = w.arrived < w.out.jobs || !w.live.is_empty() || !queue.is_empty();
                if more {
                    w.push(now + poll_s * SECOND, Ev::Tick);
                }
            }
            Ev::Restart => {
                let mut again: Vec<usize> = Vec::new();
                for m in w.live.clone() {
                    let reserved = w.machines[m].reserved;
                    again.extend(w.destroy(m, now));
                    again.extend(reserved);
                }
                again.extend(queue.drain(..));
                again.sort_by_key(|&j| (trace.arrivals[j], j));
                for j in again {
                    acquire(&mut w, &mut queue, j, now);
                }
            }
            Ev::IdleCheck(..) | Ev::Preempt(_) | Ev::Detected(_) | Ev::Capacity(_) => {
                unreachable!("not a pool manager event")
            }
        }
    }
    w.finish_outcome()
}

/// A serverless endpoint: queued jobs take warm idle workers; each job no warm or starting
/// worker will take gets a new worker (cold start), up to the cap; a worker stays warm
/// `idle_timeout_s` after its last job; billed per worker-second from the request.
pub fn serverless(trace: &Trace, p: &Params, idle_timeout_s: i64) -> Outcome {
    let mut w = World::new(trace, p);
    let mut queue: VecDeque<usize> = VecDeque::new();
    let timeout = idle_timeout_s * SECOND;
    while let Some((now, ev)) = w.pop() {
        match ev {
            Ev::Arrival(j) => queue.push_back(j),
            Ev::Ready(m) => {
                w.ready(m, now);
                w.push(now + timeout, Ev::IdleCheck(m, now));
            }
            Ev::JobEnd(m) => {
                w.finish(m, now);
                w.push(now + timeout, Ev::IdleCheck(m, now));
            }
            Ev::IdleCheck(m, since) => {
                if !w.machines[m].gone && w.machines[m].idle_since == Some(since) {
                    w.destroy(m, now);
                }
            }
            Ev::Tick | Ev::Restart | Ev::Preempt(_) | Ev::Detected(_) | Ev::Capacity(_) => {
                unreachable!("not a serverless event")
            }
        }
        while !queue.is_empty() {
            let Some(m) = w.first_idle() else {
                break;
            };
            let j = queue.pop_front().expect("a queued job");
            w.start(j, m, now);
        }
        let starting = w.live.iter().filter(|&&m| !w.machines[m].ready).count();
        let uncovered = queue.len().saturating_sub(starting);
        let room = p.max_instances.saturating_sub(w.live.len());
        for _ in 0..uncovered.min(room) {
            w.create(now, None);
        }
    }
    w.finish_outcome()
}

/// One machine, always on and warm, billed for the whole span; jobs queue first come first
/// served.
pub fn always_on(trace: &Trace, p: &Params) -> Outcome {
    let mut out = Outcome {
        jobs: trace.arrivals.len(),
        peak_machines: 1,
        ..Outcome::default()
    };
    let mut free_at = 0;
    for &a in &trace.arrivals {
        let start = a.max(free_at);
        out.waits.push(start - a);
        free_at = start + p.job;
        out.busy += p.job;
    }
    out.billed = trace.horizon.max(free_at);
    out.idle = out.billed - out.busy;
    out.waits.sort_unstable();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::{self, HOUR};

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

    fn check_accounting(o: &Outcome, p: &Params) {
        assert_eq!(o.double_bookings, 0, "one job per machine");
        assert!(o.busy >= o.jobs as i64 * p.job, "every job ran in full");
        assert!(o.billed >= o.busy, "billed {} < busy {}", o.billed, o.busy);
        assert_eq!(o.billed, o.busy + o.idle + o.booting, "billed time adds up");
        assert!(o.peak_machines <= p.max_instances);
    }

    #[test]
    fn a_lone_job_cold_starts_runs_and_is_destroyed_exactly_at_the_deadline() {
        let o = gpupool(&trace(&[1_000]), &p(), 300);
        assert_eq!(o.cold_starts, 1);
        assert_eq!(o.waits, vec![40 * SECOND]);
        assert_eq!(o.billed, (40 + 60 + 300) * SECOND);
        assert_eq!(o.idle, 300 * SECOND);
    }

    #[test]
    fn a_job_within_the_timeout_reuses_the_warm_machine() {
        let at = (1 + 40 + 60 + 299) * SECOND;
        let o = gpupool(&trace(&[1_000, at]), &p(), 300);
        assert_eq!(o.cold_starts, 1);
        assert_eq!(o.waits, vec![0, 40 * SECOND]);
        let late = gpupool(&trace(&[1_000, at + 2 * SECOND]), &p(), 300);
        assert_eq!(late.cold_starts, 2);
    }

    #[test]
    fn the_pool_manager_destroys_on_its_first_tick_past_the_timeout() {
        // Idle from 120 s: 300 s idle at 420 s, itself a tick of the 30 s loop.
        let o = pool_manager(&trace(&[20 * SECOND]), &p(), 300, 30, 7);
        assert_eq!(o.billed, 400 * SECOND);
        // Idle from 100 s: 290 s at the 390 s tick, destroyed at 420 s, 20 s late.
        let o = pool_manager(&trace(&[0]), &p(), 300, 30, 7);
        assert_eq!(o.billed, 420 * SECOND);
        assert_eq!(o.idle, 320 * SECOND);
    }

    #[test]
    fn invariants_hold_for_every_policy_and_trace() {
        let p = p();
        for t in trace::standard() {
            for o in [
                gpupool(&t, &p, 300),
                gpupool(&t, &p, 0),
                pool_manager(&t, &p, 300, 30, 11),
                serverless(&t, &p, 300),
                always_on(&t, &p),
            ] {
                check_accounting(&o, &p);
                assert_eq!(o.waits.len(), t.arrivals.len(), "{}", t.name);
            }
        }
    }

    #[test]
    fn serverless_at_the_same_price_and_timeout_matches_gpupool() {
        // Two independent implementations of "take a warm machine, else wait for one that
        // is starting, else start one; destroy 300 s after the last job".
        let p = p();
        for t in trace::standard() {
            let a = gpupool(&t, &p, 300);
            let b = serverless(&t, &p, 300);
            assert_eq!(a.billed, b.billed, "{}", t.name);
            assert_eq!(a.waits, b.waits, "{}", t.name);
        }
    }

    #[test]
    fn gpupool_is_no_costlier_than_the_pool_manager_at_no_worse_p99_wait() {
        let p = p();
        for t in trace::standard() {
            let g = gpupool(&t, &p, 300);
            let c = pool_manager(&t, &p, 300, 30, 11);
            assert!(
                g.billed <= c.billed,
                "{}: {} > {}",
                t.name,
                g.billed,
                c.billed
            );
            assert!(
                g.wait_percentile_s(99.0) <= c.wait_percentile_s(99.0),
                "{}: p99 {} > {}",
                t.name,
                g.wait_percentile_s(99.0),
                c.wait_percentile_s(99.0)
            );
        }
    }

    #[test]
    fn an_overloaded_single_machine_queues() {
        let t = Trace::poisson("fast", 120.0, 1, 1);
        let o = always_on(&t, &p());
        assert!(o.wait_percentile_s(99.0) > HOUR as f64 / SECOND as f64);
    }
}
