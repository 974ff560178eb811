#![no_std]
// The programs live in the `mmesh` binary (src/main.rs); this library target
// only lets the agent declare a build dependency on this crate, so that cargo
// rebuilds the agent when the programs change.
