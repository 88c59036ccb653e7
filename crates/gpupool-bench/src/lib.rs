//! The policy benchmark: a discrete-event simulation, in simulated time, of what gpupool's
//! rules cost and how long jobs wait, next to a classic pool manager, one machine always on
//! and a serverless endpoint, over seeded arrival traces; and gpupool renting interruptible
//! (spot) machines, preempted at seeded random times ([`spot`]), next to on-demand.
//!
//! Not a timed test: it never sleeps and its figures do not depend on the machine. It drives
//! the controller's pure `scheduling` and `idle` functions and must not touch I/O, a clock
//! or Kubernetes. `crates/gpupool-bench/benches/policy.rs` prints [`report::render`]; `docs/benchmarks.md` keeps
//! the figures.

pub mod report;
pub mod sim;
pub mod spot;
pub mod trace;
