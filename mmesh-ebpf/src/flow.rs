//! The per-CPU flow cache: the decision of the address-only checks
//! (attribution, global and account lists) of recent flows.
//!
//! Direct-mapped and per CPU, so a lookup is an inlined array access and a
//! compare, with no lock and no shared cache line; entries carry the policy
//! generation, so a policy change invalidates them all at once without the
//! agent touching the cache. A flood from ever-new remote addresses misses
//! every time and pays the full checks plus one 64-byte store.

use mmesh_common::maps::{FlowEntry, flow_tag};

use crate::{Decision, maps::FLOW_CACHE};

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

#[inline(always)]
fn head(a: &[u8; 16]) -> [u8; 4] {
    [a[0], a[1], a[2], a[3]]
}

/// Multiplicative hashing of the two addresses (Fibonacci and murmur3
/// constants), mixed with the direction.
#[inline(always)]
fn hash(local: u32, remote: u32, direction: u8) -> u32 {
    let h = local.wrapping_mul(0x9e37_79b1)
        ^ remote.wrapping_mul(0x85eb_ca77).rotate_left(13)
        ^ u32::from(direction);
    h ^ (h >> 16)
}

/// The decision for `ends` in `direction` under `generation`: the cached one,
/// or the one `decide` makes, which is then remembered.
#[inline(always)]
pub fn decision(
    mask: u32,
    generation: u64,
    direction: u8,
    ends: Ends,
    decide: impl FnOnce() -> Decision,
) -> Decision {
    let (family, index) = match ends {
        Ends::V4 { local, remote } => (
            4,
            hash(
                u32::from_ne_bytes(local),
                u32::from_ne_bytes(remote),
                direction,
            ),
        ),
        Ends::V6 { local, remote } => (6, hash(fold(&local), fold(&remote), direction)),
    };
    let tag = flow_tag(family, direction);
    let Some(entry) = FLOW_CACHE.get_ptr_mut(index & mask) else {
        return decide();
    };
    // SAFETY: this CPU's entry of a per-CPU array; programs do not nest on a CPU.
    let entry = unsafe { &mut *entry };
    if entry.generation == generation && entry.tag == tag {
        let same = match ends {
            Ends::V4 { local, remote } => {
                head(&entry.local) == local && head(&entry.remote) == remote
            }
            Ends::V6 { local, remote } => entry.local == local && entry.remote == remote,
        };
        if same {
            return Decision {
                reason: entry.reason,
                verdict: entry.verdict,
                slot: entry.slot,
                list: entry.list,
            };
        }
    }
    let decided = decide();
    let (mut l, mut r) = ([0u8; 16], [0u8; 16]);
    match ends {
        Ends::V4 { local, remote } => {
            l[..4].copy_from_slice(&local);
            r[..4].copy_from_slice(&remote);
        }
        Ends::V6 { local, remote } => {
            l = local;
            r = remote;
        }
    }
    *entry = FlowEntry {
        local: l,
        remote: r,
        generation,
        tag,
        slot: decided.slot,
        list: decided.list,
        reason: decided.reason,
        verdict: decided.verdict,
        _pad: [0; 10],
    };
    decided
}
