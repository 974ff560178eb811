//! CIDR block and allow lists for the remote address.
//!
//! Each scope (global, or one account) is one set of entries. The agent
//! resolves allow-over-block and drop-over-monitor when it compiles the
//! policy, so the longest matching entry already carries the scope's answer:
//! one lookup per scope. The global IPv4 lists go through the `STRIDE` nodes
//! first and reach their trie only for the few /24s with longer prefixes.

use aya_ebpf::maps::lpm_trie::Key;
use mmesh_common::{
    maps::{NO_ACCOUNT, RuleValue, SCOPE_BITS, ScopedV4, ScopedV6, scope},
    stride::{KIND_CHUNK, KIND_HIT, KIND_LPM, action, kind, l1_node, payload},
};

use crate::maps::{ACCT_RULES_V4, ACCT_RULES_V6, RULES_V4, RULES_V6, STRIDE};

#[inline(always)]
fn key_v4(half: u32, id: u32, addr: [u8; 4]) -> Key<ScopedV4> {
    Key::new(
        SCOPE_BITS + 32,
        ScopedV4 {
            scope: scope(half, id),
            addr,
        },
    )
}

#[inline(always)]
fn key_v6(half: u32, id: u32, addr: [u8; 16]) -> Key<ScopedV6> {
    Key::new(
        SCOPE_BITS + 128,
        ScopedV6 {
            scope: scope(half, id),
            addr,
        },
    )
}

/// The global lists' answer for an IPv4 remote address.
#[inline(always)]
pub fn global_v4(half: u32, remote: [u8; 4]) -> Option<RuleValue> {
    let node = STRIDE.get(l1_node(half, remote))?;
    let mut entry = node[usize::from(remote[1])];
    if kind(entry) == KIND_CHUNK {
        entry = STRIDE.get(payload(entry))?[usize::from(remote[2])];
    }
    match kind(entry) {
        KIND_HIT => Some(RuleValue {
            action: action(entry),
            list: payload(entry),
        }),
        KIND_LPM => RULES_V4.get(key_v4(half, NO_ACCOUNT, remote)).copied(),
        _ => None,
    }
}

/// The global lists' answer for an IPv6 remote address.
#[inline(always)]
pub fn global_v6(half: u32, remote: [u8; 16]) -> Option<RuleValue> {
    RULES_V6.get(key_v6(half, NO_ACCOUNT, remote)).copied()
}

/// The account's lists' answer for an IPv4 remote address.
#[inline(always)]
pub fn account_v4(half: u32, slot: u32, remote: [u8; 4]) -> Option<RuleValue> {
    ACCT_RULES_V4.get(key_v4(half, slot, remote)).copied()
}

/// The account's lists' answer for an IPv6 remote address.
#[inline(always)]
pub fn account_v6(half: u32, slot: u32, remote: [u8; 16]) -> Option<RuleValue> {
    ACCT_RULES_V6.get(key_v6(half, slot, remote)).copied()
}
