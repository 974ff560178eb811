//! Atomic operations on map values.
//!
//! `core::sync::atomic` offers only loads and stores on `bpfel-unknown-none`
//! (the target declares no compare-and-swap), although the BPF ISA has had
//! atomic add, exchange and compare-and-exchange on 64-bit words since v3
//! (kernel 5.12). The intrinsics reach them directly; bpf-linker generates
//! code for `--cpu=v3` (see build.rs).

use core::intrinsics::{AtomicOrdering, atomic_cxchg, atomic_xadd};

/// Reads `*ptr` atomically.
///
/// An aligned 64-bit BPF load is a single load instruction, so a volatile read
/// is atomic; LLVM's BPF backend cannot select an `atomic load` before v4.
///
/// # Safety
/// `ptr` must point to a live, 8-byte aligned `u64` (a map value field).
#[inline(always)]
pub unsafe fn load(ptr: *mut u64) -> u64 {
    // SAFETY: per the function's contract.
    unsafe { ptr.read_volatile() }
}

/// Replaces `*ptr` with `new` if it still holds `current`; returns what it
/// held otherwise.
///
/// # Safety
/// As [`load`].
#[inline(always)]
pub unsafe fn compare_exchange(ptr: *mut u64, current: u64, new: u64) -> Result<(), u64> {
    // SAFETY: per the function's contract.
    let (seen, swapped) = unsafe {
        atomic_cxchg::<u64, { AtomicOrdering::Relaxed }, { AtomicOrdering::Relaxed }>(
            ptr, current, new,
        )
    };
    if swapped { Ok(()) } else { Err(seen) }
}

/// Adds `value` to `*ptr`.
///
/// # Safety
/// As [`load`].
#[inline(always)]
pub unsafe fn add(ptr: *mut u64, value: u64) {
    // SAFETY: per the function's contract.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(ptr, value) };
}
