//! `cargo bench --bench policy` (or `make bench-policy`): prints one table per arrival trace,
//! then one per trace for gpupool on interruptible machines.

use gpupool_bench::{report, sim::Params, trace};

fn main() {
    let p = Params::default();
    let reports: Vec<_> = trace::standard()
        .iter()
        .map(|t| report::run_trace(t, &p))
        .collect();
    print!("{}", report::render(&reports, &p));
}
