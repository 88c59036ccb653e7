//! The reconcilers and the pure decisions they rest on.

pub mod idle;
pub mod scheduling;
