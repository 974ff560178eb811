//! Builds the `STRIDE` nodes (see `mmesh_common::stride`) from the resolved
//! global IPv4 list entries.

use mmesh_common::{
    Verdict,
    maps::RuleValue,
    stride::{KIND_CHUNK, KIND_LPM, KIND_NONE, NODE_LEN, Node, chunk, hit, kind, payload},
};

/// The nodes of one policy, independent of the half they are written to:
/// chunk entries of `l1` hold chunk numbers (0, 1, …) that the datapath turns
/// into node indices of its half's chunk pool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stride {
    /// 256 level-1 nodes, one per value of the address's top byte.
    pub l1: Vec<Node>,
    pub chunks: Vec<Node>,
    /// /16 regions that needed a chunk when the pool was full: they ask the
    /// LPM trie (`--stride-chunks`).
    pub overflow: usize,
}

impl Default for Stride {
    fn default() -> Self {
        Self {
            l1: vec![[KIND_NONE; NODE_LEN]; NODE_LEN],
            chunks: Vec::new(),
            overflow: 0,
        }
    }
}

fn entry(value: RuleValue) -> u32 {
    if value.action == Verdict::Drop as u32 || value.action == Verdict::Monitor as u32 {
        hit(value.action, value.list)
    } else {
        KIND_NONE
    }
}

/// Fills `table[first..first + count]` with `value`.
fn fill(table: &mut [u32], first: usize, count: usize, value: u32) {
    for e in &mut table[first..first + count] {
        *e = value;
    }
}

impl Stride {
    /// Builds the nodes from resolved entries `(address, prefix length,
    /// value)` sorted by address then length, with at most `max_chunks`
    /// chunks.
    #[must_use]
    pub fn build(entries: &[(u32, u8, RuleValue)], max_chunks: u32) -> Self {
        // Level 1, flat: one entry per /16, from the entries of /16 and
        // shorter, shorter first so that longer ones win.
        let mut l1 = vec![KIND_NONE; 1 << 16];
        let mut short: Vec<&(u32, u8, RuleValue)> = entries.iter().filter(|e| e.1 <= 16).collect();
        short.sort_by_key(|e| e.1);
        for (addr, len, value) in short {
            fill(
                &mut l1,
                (addr >> 16) as usize,
                1 << (16 - len),
                entry(*value),
            );
        }
        // Regions holding longer entries get a chunk (or the LPM trie).
        let mut chunks = Vec::new();
        let mut overflow = 0;
        let long: Vec<&(u32, u8, RuleValue)> = entries.iter().filter(|e| e.1 > 16).collect();
        for region in long.chunk_by(|a, b| a.0 >> 16 == b.0 >> 16) {
            let r = (region[0].0 >> 16) as usize;
            if chunks.len() as u32 >= max_chunks {
                l1[r] = KIND_LPM;
                overflow += 1;
                continue;
            }
            let mut node: Node = [l1[r]; NODE_LEN];
            let mut mid: Vec<&&(u32, u8, RuleValue)> =
                region.iter().filter(|e| e.1 <= 24).collect();
            mid.sort_by_key(|e| e.1);
            for (addr, len, value) in mid {
                fill(
                    &mut node,
                    ((addr >> 8) & 0xff) as usize,
                    1 << (24 - len),
                    entry(*value),
                );
            }
            // A /24 with a longer entry inside is decided by the trie.
            for (addr, _, _) in region.iter().filter(|e| e.1 > 24) {
                node[((addr >> 8) & 0xff) as usize] = KIND_LPM;
            }
            l1[r] = chunk(chunks.len() as u32);
            chunks.push(node);
        }
        let mut nodes = Vec::with_capacity(NODE_LEN);
        for part in l1.chunks_exact(NODE_LEN) {
            let mut node = [0; NODE_LEN];
            node.copy_from_slice(part);
            nodes.push(node);
        }
        Self {
            l1: nodes,
            chunks,
            overflow,
        }
    }

    /// What the kernel answers for `addr`, given an LPM fallback (for tests):
    /// `Some(value)` for a hit, `None` when not blocked.
    #[must_use]
    pub fn lookup(&self, addr: u32, lpm: impl Fn(u32) -> Option<RuleValue>) -> Option<RuleValue> {
        let mut e = self.l1[(addr >> 24) as usize][((addr >> 16) & 0xff) as usize];
        if kind(e) == KIND_CHUNK {
            e = self.chunks[payload(e) as usize][((addr >> 8) & 0xff) as usize];
        }
        match kind(e) {
            KIND_LPM => lpm(addr),
            KIND_NONE => None,
            _ => Some(RuleValue {
                action: mmesh_common::stride::action(e),
                list: payload(e),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn v(action: Verdict, list: u32) -> RuleValue {
        RuleValue {
            action: action as u32,
            list,
        }
    }

    /// Longest prefix match over the entries, the way the trie answers.
    fn lpm(entries: &[(u32, u8, RuleValue)], addr: u32) -> Option<RuleValue> {
        entries
            .iter()
            .filter(|(a, l, _)| *l == 0 || (addr >> (32 - l)) == (a >> (32 - l)))
            .max_by_key(|(_, l, _)| *l)
            .map(|(_, _, v)| *v)
            .filter(|v| v.action != Verdict::Pass as u32)
    }

    fn sorted(mut entries: Vec<(u32, u8, RuleValue)>) -> Vec<(u32, u8, RuleValue)> {
        for e in &mut entries {
            e.0 &= if e.1 == 0 { 0 } else { u32::MAX << (32 - e.1) };
        }
        entries.sort_by_key(|e| (e.0, e.1));
        entries.dedup_by_key(|e| (e.0, e.1));
        entries
    }

    #[test]
    fn regions_are_decided_at_the_right_level() {
        let entries = sorted(vec![
            (0x0a00_0000, 8, v(Verdict::Drop, 1)),     // 10/8: uniform /16s
            (0x0b01_0000, 16, v(Verdict::Monitor, 2)), // 11.1/16
            (0x0c01_0200, 24, v(Verdict::Drop, 3)),    // 12.1.2/24: a chunk
            (0x0c01_0380, 25, v(Verdict::Drop, 4)),    // 12.1.3.128/25: LPM inside the chunk
            (0x0a05_0000, 16, v(Verdict::Pass, 5)),    // 10.5/16 allowed
        ]);
        let s = Stride::build(&entries, 16);
        assert_eq!(s.chunks.len(), 1);
        let look = |a: u32| s.lookup(a, |x| lpm(&entries, x));
        assert_eq!(look(0x0a09_0909), Some(v(Verdict::Drop, 1)));
        assert_eq!(look(0x0a05_0101), None, "the allow carve-out");
        assert_eq!(look(0x0b01_ffff), Some(v(Verdict::Monitor, 2)));
        assert_eq!(look(0x0c01_0207), Some(v(Verdict::Drop, 3)));
        assert_eq!(look(0x0c01_0381), Some(v(Verdict::Drop, 4)));
        assert_eq!(look(0x0c01_0301), None);
        assert_eq!(look(0x0808_0808), None);
        assert_eq!(s.l1[12][1] & 3, KIND_CHUNK);
        assert_eq!(s.chunks[0][3] & 3, KIND_LPM);
        // Without chunks the region falls back to the trie, still right.
        let s = Stride::build(&entries, 0);
        assert_eq!((s.chunks.len(), s.overflow), (0, 1));
        assert_eq!(
            s.lookup(0x0c01_0207, |x| lpm(&entries, x)),
            Some(v(Verdict::Drop, 3))
        );
    }

    proptest! {
        /// Whatever the entries and the chunk budget, the stride answers
        /// exactly as a longest-prefix match over the entries.
        #[test]
        fn answers_like_the_trie(
            raw in proptest::collection::vec((any::<u32>(), 0u8..=32, 0u8..3, 1u32..9), 0..60),
            probes in proptest::collection::vec(any::<u32>(), 32),
            max_chunks in 0u32..4,
        ) {
            // Concentrate the entries in a few /8s so that they nest.
            let entries = sorted(raw.into_iter().map(|(a, l, k, list)| {
                let a = (a & 0x03ff_ffff) | 0x0a00_0000;
                let action = [Verdict::Pass, Verdict::Drop, Verdict::Monitor][k as usize];
                (a, l, v(action, list))
            }).collect());
            let s = Stride::build(&entries, max_chunks);
            for p in probes.into_iter().chain(entries.iter().map(|e| e.0)) {
                let p = (p & 0x03ff_ffff) | 0x0a00_0000;
                prop_assert_eq!(s.lookup(p, |x| lpm(&entries, x)), lpm(&entries, p), "address {:#x}", p);
            }
        }
    }
}
