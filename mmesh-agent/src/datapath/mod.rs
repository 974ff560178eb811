//! The loaded datapath: the eBPF object, its maps, its attachments, and the
//! all-or-nothing application of compiled policies.
//!
//! # Applying a policy
//!
//! Every policy map is split in two halves (see `mmesh_common::maps`).
//! [`Datapath::apply`]:
//!
//! 1. waits, if it has not since the last flip, for programs that may still
//!    read the inactive half ([`ProgramBarrier`]);
//! 2. writes into the inactive half the difference between what it holds and
//!    the new policy (packets do not read it);
//! 3. flips `CONFIG.active` with one word store: from the next packet on,
//!    every lookup uses the new policy.
//!
//! [`Datapath::sync_standby`] then brings the old half up to date (after the
//! same wait), so that the next change writes only its own difference. The
//! agent runs it right after every apply; the policy is in force before it.
//!
//! If step 2 fails, nothing packets see has changed and the error is
//! returned: the previous policy keeps enforcing. The agent tracks what each
//! half holds; a half whose writes failed part-way is marked unknown and read
//! back from the kernel before its next use.

mod attach;
pub(crate) mod error;
mod load;
pub mod pin;
mod read;
mod write;

use std::sync::Arc;

use aya::{
    Ebpf,
    maps::{MapData, RingBuf},
};
use mmesh_common::maps::{Config, GenConfig};

#[cfg(feature = "bench")]
pub use self::load::BENCH_OBJECT;
use self::load::Maps;
pub use self::{
    attach::Attachment,
    error::DatapathError,
    load::{EBPF_OBJECT, MIN_KERNEL},
    read::Totals,
};
use crate::{
    barrier::ProgramBarrier,
    compile::{Capacity, Compiled},
};

/// The loaded programs and maps.
pub struct Datapath {
    ebpf: Ebpf,
    maps: Maps,
    events: Option<RingBuf<MapData>>,
    capacity: Capacity,
    /// What each half holds; `None` when a write failed part-way.
    halves: [Option<Arc<Compiled>>; 2],
    config: Config,
    generation: u64,
    /// Per account slot, the low bits of the generation in which it got its
    /// account (or lost it): see `AccountConfig::epoch`.
    epochs: Vec<u32>,
    /// Account slots from this one up have held no account since the maps
    /// of per-slot state (rate-limit buckets, sampler windows, account
    /// counters) were created: their state is still the zeroes the kernel
    /// made, and an account taking one needs no reset. Packets write the
    /// state of a slot only once an account holds it (the slot comes from
    /// the account's entries), so a slot stays clean until it is given out.
    clean_from: u32,
    barrier: ProgramBarrier,
    /// No program has read the standby half since the last flip.
    quiesced: bool,
    attachments: Vec<Attachment>,
    /// The pin directory; `None` when ephemeral.
    pins: Option<pin::Pins>,
}

impl Datapath {
    /// The capacities the maps were created with.
    #[must_use]
    pub const fn capacity(&self) -> &Capacity {
        &self.capacity
    }

    /// The generation of the policy in force (0 before the first apply).
    #[must_use]
    pub const fn generation(&self) -> u64 {
        self.generation
    }

    /// Treats the standby half as unknown, as after a write into it that
    /// failed part-way: the next write reads it back from the kernel first.
    /// For tests of that path.
    #[doc(hidden)]
    pub fn forget_standby(&mut self) {
        self.halves[1 - self.config.active as usize] = None;
    }

    /// The compiled policy in force.
    #[must_use]
    pub fn active(&self) -> Option<&Arc<Compiled>> {
        self.halves[self.config.active as usize].as_ref()
    }

    /// The interfaces attached so far.
    #[must_use]
    pub fn attachments(&self) -> &[Attachment] {
        &self.attachments
    }

    /// The event ring buffer, for the event reader (once).
    pub fn take_events(&mut self) -> Option<RingBuf<MapData>> {
        self.events.take()
    }

    /// A program, for tests that run it with `BPF_PROG_TEST_RUN`.
    pub fn program_mut(&mut self, name: &str) -> Option<&mut aya::programs::Program> {
        self.ebpf.program_mut(name)
    }

    /// The pin directory, unless ephemeral.
    #[must_use]
    pub const fn pins(&self) -> Option<&pin::Pins> {
        self.pins.as_ref()
    }

    /// The global settings of the active half.
    #[must_use]
    pub fn active_config(&self) -> GenConfig {
        self.config.halves[self.config.active as usize]
    }
}
