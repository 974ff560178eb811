//! Waiting for programs that may still read the previous policy half.
//!
//! After the agent flips `CONFIG.active`, a packet whose program read the old
//! value may still be looking up entries of the old half. Before the agent
//! rewrites that half it must wait for those programs to finish. XDP and TC
//! programs run inside RCU read-side critical sections, so an RCU grace
//! period is exactly that wait, and the kernel offers one to user space
//! through a side effect: every update of a map-in-map
//! (`BPF_MAP_TYPE_ARRAY_OF_MAPS`) ends with `synchronize_rcu()` so that the
//! caller knows no program still uses the old inner map
//! (`maybe_wait_bpf_programs()` in kernel/bpf/syscall.c, since 5.0).
//!
//! The barrier is a one-slot array-of-maps that no program uses; updating
//! its slot is the wait. aya 0.14 cannot create a standalone map-in-map
//! ([`crate::sys`]).

use std::{
    io,
    os::fd::{AsFd as _, AsRawFd as _, OwnedFd},
};

use crate::sys::{self, BPF_MAP_TYPE_ARRAY, BPF_MAP_TYPE_ARRAY_OF_MAPS};

/// A grace-period barrier for running BPF programs.
#[derive(Debug)]
pub struct ProgramBarrier {
    outer: OwnedFd,
    inner: OwnedFd,
}

impl ProgramBarrier {
    pub fn new() -> io::Result<Self> {
        let inner = sys::map_create(BPF_MAP_TYPE_ARRAY, 4, 4, 1, None, b"mmesh_barrier_i")?;
        let outer = sys::map_create(
            BPF_MAP_TYPE_ARRAY_OF_MAPS,
            4,
            4,
            1,
            Some(inner.as_fd()),
            b"mmesh_barrier",
        )?;
        Ok(Self { outer, inner })
    }

    /// Returns once every BPF program that was running when it was called
    /// has finished.
    pub fn wait(&self) -> io::Result<()> {
        let key: u32 = 0;
        let value: u32 = self.inner.as_raw_fd() as u32;
        // SAFETY: the outer map's keys and values are u32.
        unsafe {
            sys::map_update_elem(
                self.outer.as_fd(),
                std::ptr::from_ref(&key).cast(),
                std::ptr::from_ref(&value).cast(),
            )
        }
    }
}
