//! Runs every policy over every trace, sweeps gpupool's idle timeout, and prints the tables.

use std::fmt::Write;

use super::{
    sim::{self, Outcome, Params},
    spot::{self, Interruptible},
    trace::{HOUR, SECOND, Trace},
};

/// The pool manager's monitor loop period and its idle threshold.
pub const POLL_S: i64 = 30;
pub const DEFAULT_IDLE_S: i64 = 300;
/// Seed of the pool manager's daily restart times.
pub const RESTART_SEED: u64 = 11;
/// The idle timeouts swept for the advice: 0 to 1800 s by 30 s.
pub fn sweep_timeouts() -> impl Iterator<Item = i64> {
    (0..=1800).step_by(30)
}

/// Interruptible machines: the bid as a fraction of on-demand (a typical Vast.ai
/// interruptible bid), the preemption rates run (per machine-hour) and their seed.
pub const BID_FRACTION: f64 = 0.35;
pub const PREEMPTION_RATES: [f64; 4] = [0.0, 0.05, 0.2, 0.5];
pub const PREEMPTION_SEED: u64 = 21;
/// Interruptible outages: mean spells with and without capacity, their seed, and the
/// preemption rate the outage variants run at.
pub const OUTAGE_MEAN_UP: i64 = 9 * HOUR;
pub const OUTAGE_MEAN_DOWN: i64 = HOUR;
pub const OUTAGE_SEED: u64 = 22;
pub const OUTAGE_RATE: f64 = 0.2;

/// One policy's outcome on one trace.
pub struct Row {
    pub policy: String,
    pub outcome: Outcome,
}

/// One interruptible variant (or the on-demand reference) on one trace.
pub struct SpotRow {
    pub policy: String,
    /// Preemptions per machine-hour; `None` for on-demand.
    pub per_hour: Option<f64>,
    pub outcome: Outcome,
    pub dollars_per_1000: f64,
}

/// One swept idle timeout.
#[derive(Clone, Copy, Debug)]
pub struct Point {
    pub idle_s: i64,
    pub dollars_per_1000: f64,
    pub p50_s: f64,
    pub p99_s: f64,
}

/// The figures of one trace.
pub struct TraceReport {
    pub trace: String,
    pub jobs: usize,
    pub rows: Vec<Row>,
    /// The idle timeout with the lowest cost (ties: lower p99, then shorter timeout).
    pub cheapest: Point,
    /// The cheapest whose p50 and p99 waits are no worse than at the default 300 s.
    pub cheapest_no_slower: Point,
    /// gpupool on-demand, then interruptible at each rate, then the outage variants.
    pub spot: Vec<SpotRow>,
}

pub fn run_trace(t: &Trace, p: &Params) -> TraceReport {
    let rows = vec![
        Row {
            policy: format!("gpupool (idle {DEFAULT_IDLE_S} s at the deadline)"),
            outcome: sim::gpupool(t, p, DEFAULT_IDLE_S),
        },
        Row {
            policy: format!("pool manager ({POLL_S} s loop, daily restart)"),
            outcome: sim::pool_manager(t, p, DEFAULT_IDLE_S, POLL_S, RESTART_SEED),
        },
        Row {
            policy: "one machine always on".into(),
            outcome: sim::always_on(t, p),
        },
        Row {
            policy: format!("serverless (idle {DEFAULT_IDLE_S} s)"),
            outcome: sim::serverless(t, p, DEFAULT_IDLE_S),
        },
    ];
    let points: Vec<Point> = sweep_timeouts()
        .map(|idle_s| {
            let o = sim::gpupool(t, p, idle_s);
            Point {
                idle_s,
                dollars_per_1000: o.dollars_per_1000_jobs(p.price_per_hour),
                p50_s: o.wait_percentile_s(50.0),
                p99_s: o.wait_percentile_s(99.0),
            }
        })
        .collect();
    let best = |ok: &dyn Fn(&Point) -> bool| {
        points
            .iter()
            .filter(|x| ok(x))
            .min_by(|a, b| {
                a.dollars_per_1000
                    .total_cmp(&b.dollars_per_1000)
                    .then(a.p99_s.total_cmp(&b.p99_s))
                    .then(a.idle_s.cmp(&b.idle_s))
            })
            .copied()
            .expect("the sweep has points")
    };
    let spot = spot_rows(t, p, &rows[0].outcome);
    let default_p50 = rows[0].outcome.wait_percentile_s(50.0);
    let default_p99 = rows[0].outcome.wait_percentile_s(99.0);
    TraceReport {
        trace: t.name.clone(),
        jobs: t.arrivals.len(),
        rows,
        cheapest: best(&|_| true),
        cheapest_no_slower: best(&|x| x.p50_s <= default_p50 && x.p99_s <= default_p99),
        spot,
    }
}

/// The interruptible variants on `t`, after the on-demand gpupool `on_demand` (same trace).
fn spot_rows(t: &Trace, p: &Params, on_demand: &Outcome) -> Vec<SpotRow> {
    let row = |policy: &str, s: &Interruptible, per_hour: f64| {
        let outcome = sim::gpupool_interruptible(t, p, DEFAULT_IDLE_S, s);
        SpotRow {
            policy: policy.into(),
            per_hour: Some(per_hour),
            dollars_per_1000: outcome.dollars_per_1000_jobs_at(p.price_per_hour, s.bid(p)),
            outcome,
        }
    };
    let mut rows = vec![SpotRow {
        policy: "gpupool on-demand".into(),
        per_hour: None,
        outcome: on_demand.clone(),
        dollars_per_1000: on_demand.dollars_per_1000_jobs(p.price_per_hour),
    }];
    for rate in PREEMPTION_RATES {
        let s = Interruptible::at_rate(BID_FRACTION, rate, PREEMPTION_SEED);
        rows.push(row("gpupool interruptible", &s, rate));
    }
    let mut s = Interruptible::at_rate(BID_FRACTION, OUTAGE_RATE, PREEMPTION_SEED);
    s.outages = spot::outage_windows(t.horizon, OUTAGE_MEAN_UP, OUTAGE_MEAN_DOWN, OUTAGE_SEED);
    rows.push(row("interruptible only, with outages", &s, OUTAGE_RATE));
    s.on_demand_fallback = true;
    rows.push(row(
        "interruptible, then on-demand, outages",
        &s,
        OUTAGE_RATE,
    ));
    rows
}

pub fn render(reports: &[TraceReport], p: &Params) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "jobs {} s, cold start {} s, ${}/h, at most {} machines (workers) at once; simulated time\n",
        p.job / 1000,
        p.cold_start / 1000,
        p.price_per_hour,
        p.max_instances
    );
    for r in reports {
        let _ = writeln!(s, "{} ({} jobs)", r.trace, r.jobs);
        let _ = writeln!(
            s,
            "  {:<40} {:>14} {:>12} {:>15} {:>12} {:>12} {:>13}",
            "policy",
            "billed s/job",
            "idle s/job",
            "cold/100 jobs",
            "p50 wait s",
            "p99 wait s",
            "$/1000 jobs"
        );
        for row in &r.rows {
            let o = &row.outcome;
            let _ = writeln!(
                s,
                "  {:<40} {:>14.1} {:>12.1} {:>15.1} {:>12.1} {:>12.1} {:>13.2}",
                row.policy,
                o.billed_s_per_job(),
                o.idle_s_per_job(),
                o.cold_starts_per_100(),
                o.wait_percentile_s(50.0),
                o.wait_percentile_s(99.0),
                o.dollars_per_1000_jobs(p.price_per_hour)
            );
        }
        let pm = &r.rows[1].outcome;
        if pm.reruns + pm.lost_starts > 0 {
            let _ = writeln!(
                s,
                "  (pool manager restarts: {} running jobs killed and run again, {} machine(s) lost while starting)",
                pm.reruns, pm.lost_starts
            );
        }
        let c = r.cheapest;
        let n = r.cheapest_no_slower;
        let _ = writeln!(
            s,
            "  advice: cheapest gpupool idle timeout {} s: ${:.2}/1000 jobs, wait p50 {:.1} s, p99 {:.1} s",
            c.idle_s, c.dollars_per_1000, c.p50_s, c.p99_s
        );
        let _ = writeln!(
            s,
            "          cheapest with p50 and p99 no worse than at {DEFAULT_IDLE_S} s: {} s: ${:.2}/1000 jobs, wait p50 {:.1} s, p99 {:.1} s\n",
            n.idle_s, n.dollars_per_1000, n.p50_s, n.p99_s
        );
    }
    render_spot(&mut s, reports, p);
    s
}

/// The interruptible section: its assumptions, then one table per trace.
fn render_spot(s: &mut String, reports: &[TraceReport], p: &Params) {
    let hours = |ms: i64| ms as f64 / HOUR as f64;
    let _ = writeln!(
        s,
        "interruptible machines: gpupool's rules (idle {DEFAULT_IDLE_S} s) at a bid of {BID_FRACTION} x on-demand (${:.4}/h);\n\
         each machine is preempted after an exponential time (rate per machine-hour, seed {PREEMPTION_SEED}); its job goes\n\
         back to the queue at once and runs again from the start; the machine bills at the bid until destroyed\n\
         {} s later (one liveness interval). Outages: no interruptible capacity for spells of mean {} h\n\
         between spells of mean {} h (exponential, seed {OUTAGE_SEED}).\n",
        BID_FRACTION * p.price_per_hour,
        spot::LIVENESS_INTERVAL / SECOND,
        hours(OUTAGE_MEAN_DOWN),
        hours(OUTAGE_MEAN_UP),
    );
    for r in reports {
        let _ = writeln!(s, "{} ({} jobs)", r.trace, r.jobs);
        let _ = writeln!(
            s,
            "  {:<40} {:>12} {:>13} {:>12} {:>12} {:>12} {:>12} {:>10} {:>15}",
            "policy",
            "per mach-h",
            "$/1000 jobs",
            "x on-demand",
            "p50 wait s",
            "p99 wait s",
            "preemptions",
            "re-runs",
            "cold/100 jobs"
        );
        let base = r.spot[0].dollars_per_1000;
        for row in &r.spot {
            let o = &row.outcome;
            let rate = row.per_hour.map_or("-".into(), |x| format!("{x:.2}"));
            let _ = writeln!(
                s,
                "  {:<40} {:>12} {:>13.2} {:>12.2} {:>12.1} {:>12.1} {:>12} {:>10} {:>15.1}",
                row.policy,
                rate,
                row.dollars_per_1000,
                row.dollars_per_1000 / base,
                o.wait_percentile_s(50.0),
                o.wait_percentile_s(99.0),
                o.preemptions,
                o.reruns,
                o.cold_starts_per_100()
            );
        }
        let _ = writeln!(s);
    }
}
