//! The single exit of every packet: counters, and sampled events.

use aya_ebpf::helpers::{bpf_ktime_get_coarse_ns, bpf_ktime_get_ns};
use mmesh_common::{
    Verdict,
    event::Event,
    maps::{
        Counter, CounterKey, FlowEntry, GenConfig, STAT_COUNTERS_FULL, STAT_EVENTS_LOST,
        STAT_EVENTS_SAMPLED, sampler_index, totals_index,
    },
    sample,
};
use mmesh_ebpf::parse::{Addrs, Packet};

use crate::{
    Decision, Frame, atomic,
    maps::{ACCT_COUNTERS, EVENTS, SAMPLER, STATS, TOTALS},
};

/// `BPF_NOEXIST`: insert only.
const BPF_NOEXIST: u64 = 1;

/// Counts the packet and, if a rule matched, offers it to the event sampler.
/// `flow` is the packet's flow-cache entry: the packet is counted there when
/// its decision is the cached one. A GSO frame counts as its wire packets and
/// wire bytes ([`Frame::wire_bytes`]), as the rate limits charge it.
#[inline(always)]
pub fn record(
    frame: &Frame,
    direction: u8,
    config: &GenConfig,
    pkt: &Packet,
    decision: &Decision,
    flow: Option<*mut FlowEntry>,
) {
    let reason = decision.reason;
    let verdict = decision.verdict;
    let packets = u64::from(frame.segs);
    let bytes = frame.wire_bytes(pkt);
    if let Some(total) = TOTALS.get_ptr_mut(totals_index(reason, verdict, direction)) {
        // SAFETY: this CPU's slot of a per-CPU array; programs do not nest on a CPU.
        unsafe { add(total, packets, u64::from(bytes)) };
    }
    let in_flow = match flow {
        // SAFETY: this CPU's flow-cache entry.
        Some(entry) => unsafe {
            let entry = &mut *entry;
            if entry.reason == reason && entry.verdict == verdict {
                entry.packets += packets;
                entry.bytes += u64::from(bytes);
                true
            } else {
                false
            }
        },
        None => false,
    };
    if !in_flow {
        count_account(
            decision.slot,
            reason,
            verdict,
            direction,
            packets,
            u64::from(bytes),
        );
    }
    if decision.verdict != Verdict::Pass as u8 {
        emit(frame, bytes, direction, config, pkt, decision);
    }
}

#[inline(always)]
unsafe fn add(counter: *mut Counter, packets: u64, bytes: u64) {
    // SAFETY: the caller passes a valid per-CPU value.
    unsafe {
        (*counter).packets += packets;
        (*counter).bytes += bytes;
    }
}

/// Adds to the per-account counter of (slot, reason, verdict, direction).
#[inline(always)]
pub fn count_account(slot: u32, reason: u8, verdict: u8, direction: u8, packets: u64, bytes: u64) {
    let key = CounterKey {
        slot,
        reason,
        verdict,
        direction,
        _pad: 0,
    };
    if let Some(counter) = ACCT_COUNTERS.get_ptr_mut(key) {
        // SAFETY: this CPU's value of a per-CPU hash entry.
        unsafe { add(counter, packets, bytes) };
        return;
    }
    let first = Counter { packets, bytes };
    // A failed insert is either a full map (counted, the packet is still in
    // TOTALS) or another CPU inserting the same key first (then this CPU's
    // value is the fresh zero one: retry the lookup once).
    if ACCT_COUNTERS.insert(key, first, BPF_NOEXIST).is_err() {
        match ACCT_COUNTERS.get_ptr_mut(key) {
            // SAFETY: as above.
            Some(counter) => unsafe { add(counter, packets, bytes) },
            None => bump_stat(STAT_COUNTERS_FULL),
        }
    }
}

/// Adds one to a `STATS` counter.
#[inline(always)]
pub fn bump_stat(index: u32) {
    if let Some(stat) = STATS.get_ptr_mut(index) {
        // SAFETY: this CPU's slot of a per-CPU array.
        unsafe { *stat += 1 };
    }
}

/// `bytes`: the frame's wire bytes.
#[inline(always)]
fn emit(
    frame: &Frame,
    bytes: u32,
    direction: u8,
    config: &GenConfig,
    pkt: &Packet,
    decision: &Decision,
) {
    let Some(window) = SAMPLER.get_ptr_mut(sampler_index(decision.slot, decision.reason)) else {
        return;
    };
    // The one-second window needs no precision: the coarse clock (a tick,
    // a few ms) costs a fraction of the exact one, and a flood pays it on
    // every packet it sends.
    // SAFETY: helper without preconditions.
    let coarse = unsafe { bpf_ktime_get_coarse_ns() };
    // SAFETY: an 8-byte aligned map value, only ever accessed atomically.
    let current = unsafe { atomic::load(window) };
    let Some(next) = sample::take(current, coarse, config.event_rate) else {
        bump_stat(STAT_EVENTS_SAMPLED);
        return;
    };
    // One attempt: losing the race to another CPU means that CPU reports an
    // event of the same (account, reason) in the same second; skipping this
    // one keeps the limit exact.
    // SAFETY: as above.
    if unsafe { atomic::compare_exchange(window, current, next) }.is_err() {
        bump_stat(STAT_EVENTS_SAMPLED);
        return;
    }
    let Some(mut entry) = EVENTS.reserve::<Event>(0) else {
        bump_stat(STAT_EVENTS_LOST);
        return;
    };
    let mut event = Event {
        // SAFETY: helper without preconditions.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        generation: config.generation,
        slot: decision.slot,
        list: decision.list,
        len: bytes,
        ifindex: frame.ifindex,
        direction,
        reason: decision.reason,
        verdict: decision.verdict,
        family: 0,
        protocol: pkt.protocol,
        flags: pkt.flags,
        sport: pkt.sport,
        dport: pkt.dport,
        _pad16: 0,
        _pad32: 0,
        src: [0; 16],
        dst: [0; 16],
    };
    match pkt.addrs {
        Some(Addrs::V4 { src, dst }) => {
            event.family = 4;
            event.src = crate::flow::widen(src);
            event.dst = crate::flow::widen(dst);
        }
        Some(Addrs::V6 { src, dst }) => {
            event.family = 6;
            event.src = src;
            event.dst = dst;
        }
        None => {}
    }
    entry.write(event);
    entry.submit(0);
}
