//! Per-account, per-direction rate limits: packets/s and bits/s.
//!
//! Concurrency: the bucket state is shared by every CPU, one `u64` per bucket
//! (the GCRA "theoretical arrival time", see `mmesh_common::rate`), updated
//! with compare-and-swap. A per-CPU bucket would be cheaper, but it admits up
//! to `rate * CPUs` when traffic spreads over all CPUs, or needs a correction
//! that is only right when the load is spread evenly. Shared state keeps the
//! admitted rate exact whatever the spread, and stays cheap where it matters:
//! a packet over the limit only *reads* the state, so a flood that is being
//! dropped does not make CPUs fight over the cache line; only admitted
//! packets write it, and those are bounded by the configured rate.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use mmesh_common::{
    Reason,
    maps::{DirLimits, RateLimit, STAT_RATE_CONTENDED, rate_index},
    rate::{admit, bucket_time, cost},
};

use crate::{atomic, maps::RATE_STATE, report::bump_stat};

/// Compare-and-swap attempts before giving up (a CPU loses a round only when
/// another CPU admitted a packet of the same bucket in between).
const CAS_RETRIES: usize = 4;

/// Over-limit outcome: the reason and the rule's action (a verdict code).
pub struct Over {
    pub reason: Reason,
    pub action: u32,
}

/// Checks and charges the account's buckets for one packet of `bytes` bytes
/// that counts as `packets` packets (GSO segments on transmit).
#[inline(always)]
pub fn check(
    slot: u32,
    direction: u8,
    limits: &DirLimits,
    packets: u32,
    bytes: u32,
) -> Option<Over> {
    let pps = &limits.pps;
    let bps = &limits.bps;
    if pps.action == 0 && bps.action == 0 {
        return None;
    }
    let state = RATE_STATE.get_ptr_mut(rate_index(slot, direction))?;
    // Map values are 8-byte aligned and live as long as the map; these fields
    // are only ever accessed atomically.
    // SAFETY: `state` is a valid map value pointer.
    let (pps_tat, bps_tat) = unsafe { (&raw mut (*state).pps_tat, &raw mut (*state).bps_tat) };
    // SAFETY: helper without preconditions.
    let now = bucket_time(unsafe { bpf_ktime_get_ns() });
    let pps_cost = cost(u64::from(packets), pps.interval_fp);
    let bps_cost = cost(u64::from(bytes), bps.interval_fp);

    // Look before charging, so a packet refused by one bucket spends nothing
    // from the other, and a refused packet writes nothing at all.
    if refuses(pps, pps_tat, now, pps_cost) {
        return Some(Over {
            reason: Reason::RatePps,
            action: pps.action,
        });
    }
    if refuses(bps, bps_tat, now, bps_cost) {
        return Some(Over {
            reason: Reason::RateBps,
            action: bps.action,
        });
    }
    if pps.action != 0 && !charge(pps_tat, now, pps_cost, pps.tolerance) {
        return Some(Over {
            reason: Reason::RatePps,
            action: pps.action,
        });
    }
    if bps.action != 0 && !charge(bps_tat, now, bps_cost, bps.tolerance) {
        return Some(Over {
            reason: Reason::RateBps,
            action: bps.action,
        });
    }
    None
}

#[inline(always)]
fn refuses(limit: &RateLimit, tat: *mut u64, now: u64, cost: u64) -> bool {
    // SAFETY: `tat` points into a RATE_STATE value (see `check`).
    limit.action != 0 && admit(unsafe { atomic::load(tat) }, now, cost, limit.tolerance).is_none()
}

/// Charges one admitted packet; false if the bucket refuses it after all
/// (other CPUs used up the burst since we looked).
#[inline(always)]
fn charge(tat: *mut u64, now: u64, cost: u64, tolerance: u64) -> bool {
    // SAFETY (all atomic calls below): `tat` points into a RATE_STATE value.
    let mut current = unsafe { atomic::load(tat) };
    for _ in 0..CAS_RETRIES {
        let Some(next) = admit(current, now, cost, tolerance) else {
            return false;
        };
        match unsafe { atomic::compare_exchange(tat, current, next) } {
            Ok(()) => return true,
            Err(actual) => current = actual,
        }
    }
    // Lost every round to other CPUs admitting packets: admit this one too and
    // charge it with a plain atomic add. That is exact while tat > now, which
    // is the state of a bucket being raced for; it is counted so that heavy
    // contention shows.
    unsafe { atomic::add(tat, cost) };
    bump_stat(STAT_RATE_CONTENDED);
    true
}
