//! The first two levels of the global IPv4 lists: a multibit trie of
//! 256-way nodes in front of the LPM trie.
//!
//! An LPM trie lookup walks one node per bit of prefix that differs; with a
//! million prefixes and addresses the CPU has not seen, that is a chain of
//! cache misses near a microsecond long. Most of the address space is decided
//! long before the last bit: a /16 with no longer prefix in it has one answer
//! for all its addresses. The `STRIDE` map holds 256-entry nodes:
//!
//! - level 1, indexed by the top byte of the address (one node per byte
//!   value and half), entries indexed by the second byte: the answer for the
//!   whole /16, or a pointer to a level-2 node;
//! - level 2 (chunks), entries indexed by the third byte: the answer for the
//!   whole /24, or "ask the LPM trie" when a longer prefix lies inside.
//!
//! Regions without a chunk (when the chunk pool is exhausted) say "ask the
//! LPM trie" at level 1: slower, never wrong.

/// Entries of a node.
pub const NODE_LEN: usize = 256;

/// A node of the `STRIDE` map.
pub type Node = [u32; NODE_LEN];

/// Level-1 nodes per half.
pub const L1_NODES: u32 = 256;

/// The first chunk's node index: after the level-1 nodes of both halves.
pub const CHUNK_BASE: u32 = 2 * L1_NODES;

/// No list entry covers the region: not blocked by the global lists.
pub const KIND_NONE: u32 = 0;
/// The region is decided: action and list id follow.
pub const KIND_HIT: u32 = 1;
/// Look at the level-2 node whose index follows.
pub const KIND_CHUNK: u32 = 2;
/// Ask the LPM trie.
pub const KIND_LPM: u32 = 3;

/// Largest list id or node index an entry can carry (24 bits).
pub const MAX_PAYLOAD: u32 = (1 << 24) - 1;

/// An entry deciding a whole region: a [`Verdict`](crate::Verdict) code
/// (`Drop` or `Monitor`) and the list id.
#[inline(always)]
#[must_use]
pub const fn hit(action: u32, list: u32) -> u32 {
    KIND_HIT | ((action & 3) << 2) | (list << 8)
}

/// An entry pointing at node `node` of the `STRIDE` map.
#[inline(always)]
#[must_use]
pub const fn chunk(node: u32) -> u32 {
    KIND_CHUNK | (node << 8)
}

#[inline(always)]
#[must_use]
pub const fn kind(entry: u32) -> u32 {
    entry & 3
}

#[inline(always)]
#[must_use]
pub const fn action(entry: u32) -> u32 {
    (entry >> 2) & 3
}

/// The list id of a hit, or the node index of a chunk entry.
#[inline(always)]
#[must_use]
pub const fn payload(entry: u32) -> u32 {
    entry >> 8
}

/// The level-1 node of `half` for an address (network order).
#[inline(always)]
#[must_use]
pub const fn l1_node(half: u32, addr: [u8; 4]) -> u32 {
    half * L1_NODES + addr[0] as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip() {
        let h = hit(1, MAX_PAYLOAD);
        assert_eq!((kind(h), action(h), payload(h)), (KIND_HIT, 1, MAX_PAYLOAD));
        let c = chunk(CHUNK_BASE + 7);
        assert_eq!((kind(c), payload(c)), (KIND_CHUNK, CHUNK_BASE + 7));
        assert_eq!(kind(KIND_LPM), KIND_LPM);
        assert_eq!(kind(0), KIND_NONE);
        assert_eq!(l1_node(1, [10, 1, 2, 3]), 256 + 10);
    }
}
