//! Types and arithmetic shared by the mmesh eBPF programs and the agent.
//!
//! Everything here is compiled twice: into the eBPF object (`bpfel-unknown-none`,
//! no allocator, no panics) and into the agent, where it is unit- and
//! property-tested. Map keys and values are `#[repr(C)]` with explicit padding
//! so both sides agree on every byte.
#![no_std]

pub mod event;
pub mod maps;
pub mod rate;
pub mod reason;
pub mod sample;
pub mod stride;

pub use reason::{Direction, Reason, Verdict};
