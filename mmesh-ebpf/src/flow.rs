//! The per-CPU flow cache: the decision of the address-only checks
//! (attribution, global and account lists) of recent flows.
//!
//! Direct-mapped and per CPU, so a lookup is an inlined array access and a
//! compare, with no lock and no shared cache line; entries carry the policy
//! generation, so a policy change invalidates them all at once without the
//! agent touching the cache. A flood from ever-new remote addresses misses
//! every time and pays the full checks plus one 64-byte store.
//!
//! The entry also counts the flow's packets that got the cached decision, so
//! that a hit costs no counter-map lookup; the counts move to `ACCT_COUNTERS`
//! when the entry is replaced, and the agent adds the ones still in the cache
//! when it reads counters.

use mmesh_common::maps::{
    FlowEntry, NO_ACCOUNT, account_index, flow_generation, flow_tag, flow_tag_parts,
};

use crate::{
    Decision,
    maps::{ACCOUNTS, FLOW_CACHE},
    report,
};

/// Local and remote address of a packet.
#[derive(Clone, Copy)]
pub enum Ends {
    V4 { local: [u8; 4], remote: [u8; 4] },
    V6 { local: [u8; 16], remote: [u8; 16] },
}

#[inline(always)]
fn fold(a: &[u8; 16]) -> u32 {
    u32::from_ne_bytes([a[0], a[1], a[2], a[3]])
        ^ u32::from_ne_bytes([a[4], a[5], a[6], a[7]])
        ^ u32::from_ne_bytes([a[8], a[9], a[10], a[11]])
        ^ u32::from_ne_bytes([a[12], a[13], a[14], a[15]])
}

/// An IPv4 address in the first four bytes of sixteen, the rest zero,
/// without a zeroed array and a copy (which compile to `memset` calls).
#[inline(always)]
pub fn widen(a: [u8; 4]) -> [u8; 16] {
    // Little-endian both ways: the four bytes keep their order.
    u128::from(u32::from_le_bytes(a)).to_le_bytes()
}

#[inline(always)]
fn head(a: &[u8; 16]) -> [u8; 4] {
    [a[0], a[1], a[2], a[3]]
}

/// Hash of the two addresses and the direction: combined, then murmur3's
/// 32-bit finalizer. The finalizer matters: addresses are loaded in network
/// order, so the octet that varies most (the last) sits in the top byte, and
/// without an avalanche step the low bits that index the cache would hardly
/// depend on it.
#[inline(always)]
fn hash(local: u32, remote: u32, direction: u8) -> u32 {
    let mut h = local.wrapping_mul(0x9e37_79b1) ^ remote.rotate_left(16) ^ u32::from(direction);
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// What [`lookup`] found for a packet's flow.
pub enum Lookup {
    /// The cached decision, with the entry (to count the packet in).
    Hit(Decision, *mut FlowEntry),
    /// No valid entry for this flow: the decision is to be made and then
    /// [`remember`]ed in this entry (its old counts already flushed), or
    /// nowhere if the cache has no entry at the index.
    Miss(Option<*mut FlowEntry>),
}

/// The cached decision for `ends` in `direction` under `generation`, if any.
///
/// Lookup and [`remember`] are two functions, not one taking the checks as
/// a closure: LLVM left such a closure out of line, a BPF-to-BPF call, and
/// 6.1's verifier cannot follow precision across a call (it marks every
/// scalar of the path precise instead, and then hardly prunes; later
/// kernels follow precision into and out of subprograms).
#[inline(always)]
pub fn lookup(mask: u32, generation: u64, half: u32, direction: u8, ends: Ends) -> Lookup {
    let index = match ends {
        Ends::V4 { local, remote } => hash(
            u32::from_ne_bytes(local),
            u32::from_ne_bytes(remote),
            direction,
        ),
        Ends::V6 { local, remote } => hash(fold(&local), fold(&remote), direction),
    };
    let Some(ptr) = FLOW_CACHE.get_ptr_mut(index & mask) else {
        return Lookup::Miss(None);
    };
    // SAFETY: this CPU's entry of a per-CPU array; programs do not nest on a CPU.
    let entry = unsafe { &mut *ptr };
    if entry.generation == flow_generation(generation) && entry.tag == tag(ends, direction) {
        let same = match ends {
            Ends::V4 { local, remote } => {
                head(&entry.local) == local && head(&entry.remote) == remote
            }
            Ends::V6 { local, remote } => entry.local == local && entry.remote == remote,
        };
        if same {
            let cached = Decision {
                reason: entry.reason,
                verdict: entry.verdict,
                slot: entry.slot,
                list: entry.list,
            };
            return Lookup::Hit(cached, ptr);
        }
    }
    if entry.packets != 0 {
        flush(entry, half);
    }
    Lookup::Miss(Some(ptr))
}

#[inline(always)]
fn tag(ends: Ends, direction: u8) -> u16 {
    let family = match ends {
        Ends::V4 { .. } => 4,
        Ends::V6 { .. } => 6,
    };
    flow_tag(family, direction)
}

/// Stores `decided` for `ends` in `direction` under `generation` in the
/// entry a [`Lookup::Miss`] returned, with the counts zeroed.
#[inline(always)]
pub fn remember(
    ptr: *mut FlowEntry,
    generation: u64,
    direction: u8,
    ends: Ends,
    decided: &Decision,
) {
    // SAFETY: this CPU's entry of a per-CPU array; programs do not nest on a CPU.
    let entry = unsafe { &mut *ptr };
    let (l, r) = match ends {
        Ends::V4 { local, remote } => (widen(local), widen(remote)),
        Ends::V6 { local, remote } => (local, remote),
    };
    entry.local = l;
    entry.remote = r;
    entry.generation = flow_generation(generation);
    entry.tag = tag(ends, direction);
    entry.reason = decided.reason;
    entry.verdict = decided.verdict;
    entry.slot = decided.slot;
    entry.list = decided.list;
    // Two stores that LLVM must not merge: merged, they become a call to a
    // byte-by-byte `memset` that the verifier walks again in every state
    // (on 6.1 that alone took the TC programs past its million steps).
    // SAFETY: fields of this CPU's entry.
    unsafe {
        core::ptr::write_volatile(&raw mut entry.packets, 0);
        core::ptr::write_volatile(&raw mut entry.bytes, 0);
    }
}

/// Moves the counts of an entry about to be replaced into `ACCT_COUNTERS`,
/// unless its account has left the slot since (see `AccountConfig::epoch`).
#[inline(always)]
fn flush(entry: &FlowEntry, half: u32) {
    if entry.slot != NO_ACCOUNT {
        let epoch = ACCOUNTS
            .get(account_index(entry.slot, half))
            .map_or(0, |a| a.epoch);
        if entry.generation < epoch {
            return;
        }
    }
    let (_, direction) = flow_tag_parts(entry.tag);
    report::count_account(
        entry.slot,
        entry.reason,
        entry.verdict,
        direction,
        entry.packets,
        entry.bytes,
    );
}
