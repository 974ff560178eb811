//! Resolving a scope's overlapping list prefixes into one rule per prefix.

use ipnet::{Ipv4Net, Ipv6Net};
use mmesh_common::{Verdict, maps::RuleValue};

use crate::policy::{Action, List, ListKind};

/// One entry of a scope's lists before resolution.
#[derive(Clone, Copy)]
pub(super) struct Raw {
    pub(super) addr: u128,
    pub(super) len: u8,
    pub(super) kind: ListKind,
    pub(super) list: u32,
}

/// What the entries containing a prefix say: the most specific list of each
/// kind.
#[derive(Clone, Copy, Default)]
pub(super) struct Resolution {
    pub(super) allow: Option<u32>,
    pub(super) drop: Option<u32>,
    pub(super) monitor: Option<u32>,
}

impl Resolution {
    pub(super) fn with(mut self, kind: ListKind, list: u32) -> Self {
        match kind {
            ListKind::Allow => self.allow = Some(list),
            ListKind::Block(Action::Drop) => self.drop = Some(list),
            ListKind::Block(Action::Monitor) => self.monitor = Some(list),
        }
        self
    }

    /// Allow beats block within a scope; drop beats monitor.
    pub(super) fn value(self) -> RuleValue {
        let (action, list) = if let Some(list) = self.allow {
            (Verdict::Pass as u32, list)
        } else if let Some(list) = self.drop {
            (Verdict::Drop as u32, list)
        } else if let Some(list) = self.monitor {
            (Verdict::Monitor as u32, list)
        } else {
            (Verdict::Pass as u32, 0)
        };
        RuleValue { action, list }
    }

    /// What an address gets: `None` when it is not blocked (allowed, or in
    /// no block list).
    pub(super) fn answer(self) -> Option<RuleValue> {
        Some(self.value()).filter(|v| v.action != Verdict::Pass as u32)
    }
}

/// Resolved list entries: (address, prefix length, rule).
pub(super) type Resolved<A> = Vec<(A, u8, RuleValue)>;

/// Resolves one scope's lists into trie entries whose longest match is the
/// scope's answer.
pub(super) struct Resolver {
    pub(super) v4: Vec<Raw>,
    pub(super) v6: Vec<Raw>,
}

impl Resolver {
    /// `id(index, list)` names each list (and may record it).
    pub(super) fn new(lists: &[List], mut id: impl FnMut(u32, &List) -> u32) -> Self {
        let mut v4 = Vec::new();
        let mut v6 = Vec::new();
        for (index, list) in lists.iter().enumerate() {
            let id = id(index as u32, list);
            v4.extend(list.v4.iter().map(|n: &Ipv4Net| Raw {
                addr: u128::from(u32::from(n.network())),
                len: n.prefix_len(),
                kind: list.kind,
                list: id,
            }));
            v6.extend(list.v6.iter().map(|n: &Ipv6Net| Raw {
                addr: u128::from(n.network()),
                len: n.prefix_len(),
                kind: list.kind,
                list: id,
            }));
        }
        Self { v4, v6 }
    }

    /// The resolved entries, IPv4 and IPv6, in address order.
    pub(super) fn resolve(self) -> (Resolved<[u8; 4]>, Resolved<[u8; 16]>) {
        let v4 = resolve(self.v4, 32)
            .into_iter()
            .map(|(a, l, v)| ((a as u32).to_be_bytes(), l, v))
            .collect();
        let v6 = resolve(self.v6, 128)
            .into_iter()
            .map(|(a, l, v)| (a.to_be_bytes(), l, v))
            .collect();
        (v4, v6)
    }
}

/// Whether prefix `outer` contains prefix `inner` (addresses right-aligned in
/// `width` bits).
pub(super) fn contains(outer: (u128, u8), inner: (u128, u8), width: u8) -> bool {
    if outer.1 > inner.1 {
        return false;
    }
    let shift = u32::from(width - outer.1);
    if shift >= 128 {
        return true;
    }
    (outer.0 >> shift) == (inner.0 >> shift)
}

/// Sweeps the prefixes in address order with a stack of the prefixes that
/// contain the current one, so each prefix inherits the resolution of all its
/// ancestors in O(n log n). A prefix is emitted only where it changes the
/// answer: if the longest emitted prefix around it already gives its
/// addresses the same answer (same action, same list), it is redundant. That
/// leaves out allow entries with no block around them, and the longer
/// prefixes a shorter one of the same list already covers (a feed of /24s
/// inside its own /16s), which keeps the tries small and lets whole /16s be
/// decided by the stride.
pub(super) fn resolve(mut raws: Vec<Raw>, width: u8) -> Vec<(u128, u8, RuleValue)> {
    raws.sort_by_key(|r| (r.addr, r.len));
    let mut out = Vec::with_capacity(raws.len());
    // (prefix, resolution, the answer of the longest emitted prefix at or
    // above it)
    let mut stack: Vec<(u128, u8, Resolution, Option<RuleValue>)> = Vec::new();
    let mut i = 0;
    while i < raws.len() {
        let (addr, len) = (raws[i].addr, raws[i].len);
        // The same prefix in several lists: merge them.
        let mut own = Resolution::default();
        while i < raws.len() && raws[i].addr == addr && raws[i].len == len {
            own = own.with(raws[i].kind, raws[i].list);
            i += 1;
        }
        while let Some(top) = stack.last() {
            if contains((top.0, top.1), (addr, len), width) {
                break;
            }
            stack.pop();
        }
        let (inherited, around) = stack
            .last()
            .map_or((Resolution::default(), None), |t| (t.2, t.3));
        let resolution = Resolution {
            allow: own.allow.or(inherited.allow),
            drop: own.drop.or(inherited.drop),
            monitor: own.monitor.or(inherited.monitor),
        };
        let answer = resolution.answer();
        if answer != around {
            out.push((addr, len, resolution.value()));
        }
        stack.push((addr, len, resolution, answer));
    }
    out
}
