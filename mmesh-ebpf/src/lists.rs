//! CIDR block and allow lists for the remote address.
//!
//! Each scope (global, or one account) is one set of entries in a trie keyed
//! by (half | scope, prefix). The agent resolves allow-over-block and
//! drop-over-monitor when it compiles the policy, so the longest matching
//! entry already carries the scope's answer: one lookup per scope.

use aya_ebpf::maps::lpm_trie::Key;
use mmesh_common::maps::{RuleValue, SCOPE_BITS, ScopedV4, ScopedV6, scope};

use crate::maps::{RULES_V4, RULES_V6};

#[inline(always)]
pub fn lookup_v4(half: u32, id: u32, remote: [u8; 4]) -> Option<&'static RuleValue> {
    let key = ScopedV4 {
        scope: scope(half, id),
        addr: remote,
    };
    RULES_V4.get(Key::new(SCOPE_BITS + 32, key))
}

#[inline(always)]
pub fn lookup_v6(half: u32, id: u32, remote: [u8; 16]) -> Option<&'static RuleValue> {
    let key = ScopedV6 {
        scope: scope(half, id),
        addr: remote,
    };
    RULES_V6.get(Key::new(SCOPE_BITS + 128, key))
}
