//! Attribution: which account owns the local address.
//!
//! Host addresses (/32, /128) are looked up in an exact hash first; only when
//! the active policy has wider account prefixes is the LPM trie consulted.
//! Both give the longest match: a host entry is the longest prefix there is.

use aya_ebpf::maps::lpm_trie::Key;
use mmesh_common::maps::{
    GEN_PREFIXES_V4, GEN_PREFIXES_V6, NO_ACCOUNT, SCOPE_BITS, ScopedV4, ScopedV6, scope,
};

use crate::maps::{HOSTS_V4, HOSTS_V6, PREFIXES_V4, PREFIXES_V6};

#[inline(always)]
pub fn account_v4(half: u32, flags: u32, addr: [u8; 4]) -> u32 {
    let key = ScopedV4 {
        scope: scope(half, NO_ACCOUNT),
        addr,
    };
    // SAFETY: the value is a plain u32 that the agent writes whole.
    if let Some(slot) = unsafe { HOSTS_V4.get(key) } {
        return *slot;
    }
    if flags & GEN_PREFIXES_V4 != 0
        && let Some(slot) = PREFIXES_V4.get(Key::new(SCOPE_BITS + 32, key))
    {
        return *slot;
    }
    NO_ACCOUNT
}

#[inline(always)]
pub fn account_v6(half: u32, flags: u32, addr: [u8; 16]) -> u32 {
    let key = ScopedV6 {
        scope: scope(half, NO_ACCOUNT),
        addr,
    };
    // SAFETY: as above.
    if let Some(slot) = unsafe { HOSTS_V6.get(key) } {
        return *slot;
    }
    if flags & GEN_PREFIXES_V6 != 0
        && let Some(slot) = PREFIXES_V6.get(Key::new(SCOPE_BITS + 128, key))
    {
        return *slot;
    }
    NO_ACCOUNT
}
