//! Code shared by the programs of this crate: the `mmesh` datapath
//! (src/main.rs) and the benchmark baselines (src/bench.rs), which must parse
//! exactly as the datapath does to be a fair comparison.
//!
//! This library target also lets the agent declare a build dependency on the
//! crate, so that cargo rebuilds the agent when the programs change.
#![no_std]

pub mod parse;
