//! Arrival traces for the policy benchmark: seeded, so every run prints the same figures.
//!
//! Times are integer milliseconds of simulated time from the start of the trace. The PRNG is
//! a SplitMix64 kept here so that the traces never change with a dependency's version.

/// A small deterministic PRNG (SplitMix64).
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Exponentially distributed with the given mean.
    pub fn exp(&mut self, mean: f64) -> f64 {
        -mean * (1.0 - self.unit()).ln()
    }
}

pub const SECOND: i64 = 1_000;
pub const HOUR: i64 = 3_600 * SECOND;
pub const DAY: i64 = 24 * HOUR;

/// Job arrival times over a simulated span.
#[derive(Clone, Debug)]
pub struct Trace {
    pub name: String,
    /// Sorted arrival instants, ms from the start.
    pub arrivals: Vec<i64>,
    /// The simulated span (what an always-on machine is billed for, at least).
    pub horizon: i64,
}

impl Trace {
    /// Poisson arrivals at `per_hour` jobs per hour over `days`.
    pub fn poisson(name: &str, per_hour: f64, days: i64, seed: u64) -> Self {
        let mut rng = SplitMix64::new(seed);
        let horizon = days * DAY;
        let mean_gap = HOUR as f64 / per_hour;
        let mut arrivals = Vec::new();
        let mut t = rng.exp(mean_gap);
        while (t as i64) < horizon {
            arrivals.push(t as i64);
            t += rng.exp(mean_gap);
        }
        Self::new(name, arrivals, horizon)
    }

    /// Bursts of `size` jobs (spread over one minute) at gaps uniform in 2..6 h.
    pub fn bursty(name: &str, size: usize, days: i64, seed: u64) -> Self {
        let mut rng = SplitMix64::new(seed);
        let horizon = days * DAY;
        let mut arrivals = Vec::new();
        let mut start = (rng.unit() * 2.0 * HOUR as f64) as i64;
        while start < horizon {
            for _ in 0..size {
                arrivals.push(start + (rng.unit() * 60.0 * SECOND as f64) as i64);
            }
            start += (2.0 * HOUR as f64 + rng.unit() * 4.0 * HOUR as f64) as i64;
        }
        Self::new(name, arrivals, horizon)
    }

    /// A working day: 1 job/h at night, rising from 07:00 to `peak_per_hour` at 14:00 and
    /// back by 21:00 (a half sine), by thinning a Poisson process.
    pub fn daily(name: &str, peak_per_hour: f64, days: i64, seed: u64) -> Self {
        let mut rng = SplitMix64::new(seed);
        let horizon = days * DAY;
        let max = peak_per_hour.max(1.0);
        let mean_gap = HOUR as f64 / max;
        let mut arrivals = Vec::new();
        let mut t = rng.exp(mean_gap);
        while (t as i64) < horizon {
            if rng.unit() < daily_rate(t as i64, peak_per_hour) / max {
                arrivals.push(t as i64);
            }
            t += rng.exp(mean_gap);
        }
        Self::new(name, arrivals, horizon)
    }

    fn new(name: &str, mut arrivals: Vec<i64>, horizon: i64) -> Self {
        arrivals.sort_unstable();
        Self {
            name: name.into(),
            arrivals,
            horizon,
        }
    }
}

/// Jobs per hour at `t` for [`Trace::daily`].
fn daily_rate(t: i64, peak_per_hour: f64) -> f64 {
    let hour = (t % DAY) as f64 / HOUR as f64;
    let day_part = if (7.0..21.0).contains(&hour) {
        (std::f64::consts::PI * (hour - 7.0) / 14.0).sin()
    } else {
        0.0
    };
    1.0 + (peak_per_hour - 1.0).max(0.0) * day_part
}

/// The benchmark's traces, with fixed seeds.
pub fn standard() -> Vec<Trace> {
    vec![
        Trace::poisson("poisson 1/h, 7 days", 1.0, 7, 1),
        Trace::poisson("poisson 6/h, 7 days", 6.0, 7, 2),
        Trace::poisson("poisson 30/h, 7 days", 30.0, 7, 3),
        Trace::poisson("poisson 2/min, 2 days", 120.0, 2, 4),
        Trace::bursty("bursts of 20 every 2-6 h, 7 days", 20, 7, 5),
        Trace::daily(
            "day-shaped, 1/h at night to 24/h at 14:00, 7 days",
            24.0,
            7,
            6,
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traces_are_reproducible_and_near_their_rates() {
        let a = Trace::poisson("a", 30.0, 7, 3);
        let b = Trace::poisson("b", 30.0, 7, 3);
        assert_eq!(a.arrivals, b.arrivals);
        let expected = 30.0 * 24.0 * 7.0;
        let n = a.arrivals.len() as f64;
        assert!((n - expected).abs() < 0.1 * expected, "{n} vs {expected}");
        assert!(a.arrivals.windows(2).all(|w| w[0] <= w[1]));
        assert!(a.arrivals.iter().all(|&t| (0..a.horizon).contains(&t)));
    }

    #[test]
    fn bursts_have_their_size() {
        let t = Trace::bursty("b", 20, 7, 5);
        assert_eq!(t.arrivals.len() % 20, 0);
    }
}
