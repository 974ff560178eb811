//! Benchmark group `accuracy` (not written yet).

use super::{Options, report::Report};

/// Runs the group into `report`.
pub fn run(_opts: &Options, _report: &mut Report) {}
