//! Compiles a validated [`Policy`] into the entries of the policy maps.
//!
//! The output is independent of the half it will be written to: the
//! datapath adds the half when it writes keys. Everything is in ordered maps,
//! so two compilations can be diffed entry by entry and only the difference
//! is written to the kernel.

use std::collections::{BTreeMap, BTreeSet};

use ipnet::{Ipv4Net, Ipv6Net};
use mmesh_common::{
    Verdict,
    maps::{
        ACCOUNT_ACTIVE, ACCOUNT_RULES_V4, ACCOUNT_RULES_V6, AccountConfig,
        DirLimits as MapDirLimits, GEN_PREFIXES_V4, GEN_PREFIXES_V6, GEN_RULES_V4, GEN_RULES_V6,
        GenConfig, NO_ACCOUNT, RateLimit, RuleValue,
    },
};
use serde::Serialize;

use crate::{
    policy::{Account, Action, DirLimits, List, ListKind, Policy},
    stride::Stride,
};

/// How much the maps were sized for at load time (per half). The defaults
/// are the command line's defaults.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Capacity {
    /// Accounts (`--max-accounts`).
    pub accounts: u32,
    /// Account prefixes per address family (`--max-account-prefixes`).
    pub account_prefixes: u32,
    /// Block/allow list prefixes per address family, all scopes together
    /// (`--max-list-prefixes`).
    pub list_prefixes: u32,
    /// (account, reason, verdict, direction) counters (`--max-counters`).
    pub counters: u32,
    /// Ring buffer bytes for events (`--event-buffer`).
    pub event_buffer: u32,
    /// Level-2 nodes of the global IPv4 stride per half (`--stride-chunks`):
    /// each costs 1 KiB (twice: one per half) and spares the /16 region it
    /// covers a trie lookup.
    pub stride_chunks: u32,
    /// Entries of the per-CPU flow cache (`--flow-cache`), a power of two;
    /// each costs 64 bytes per CPU.
    pub flow_cache: u32,
}

impl Default for Capacity {
    fn default() -> Self {
        Self {
            accounts: 16_384,
            account_prefixes: 65_536,
            list_prefixes: 1 << 20,
            counters: 65_536,
            event_buffer: 1 << 20,
            stride_chunks: 4096,
            flow_cache: 8192,
        }
    }
}

/// A policy that does not fit the maps.
#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    #[error(
        "the policy needs {needed} {what} but the datapath was loaded with room for {capacity}; \
         restart the agent with {flag} {needed} or more"
    )]
    OverCapacity {
        what: &'static str,
        needed: usize,
        capacity: u32,
        flag: &'static str,
    },
}

/// Stable account slots: an account keeps its slot (and with it its rate
/// limit state and counters) for as long as it stays in the policy.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SlotTable {
    pub by_id: BTreeMap<String, u32>,
    /// Slots released by earlier policies, reused lowest first.
    free: BTreeSet<u32>,
    /// Next never-used slot.
    next: u32,
}

impl SlotTable {
    /// The account id of a slot.
    #[must_use]
    pub fn id_of(&self, slot: u32) -> Option<&str> {
        self.by_id
            .iter()
            .find(|(_, s)| **s == slot)
            .map(|(id, _)| id.as_str())
    }

    /// Slots for `ids`: existing accounts keep theirs, new ones get free
    /// slots. Slots of accounts that left are freed only after this
    /// assignment, so no slot changes owner within one policy change.
    /// Returns the table and the slots that are new.
    fn assign<'a>(
        &self,
        ids: impl Iterator<Item = &'a str>,
        max: u32,
    ) -> Result<(Self, Vec<u32>), CompileError> {
        let mut next = Self {
            by_id: BTreeMap::new(),
            free: self.free.clone(),
            next: self.next.max(1),
        };
        let mut fresh = Vec::new();
        let ids: Vec<&str> = ids.collect();
        for id in &ids {
            if let Some(slot) = self.by_id.get(*id) {
                next.by_id.insert((*id).to_owned(), *slot);
            }
        }
        for id in ids {
            if next.by_id.contains_key(id) {
                continue;
            }
            let slot = if let Some(slot) = next.free.pop_first() {
                slot
            } else {
                let slot = next.next;
                next.next += 1;
                slot
            };
            if slot > max {
                return Err(CompileError::OverCapacity {
                    what: "account slots",
                    needed: slot as usize,
                    capacity: max,
                    flag: "--max-accounts",
                });
            }
            next.by_id.insert(id.to_owned(), slot);
            fresh.push(slot);
        }
        let kept: BTreeSet<u32> = next.by_id.values().copied().collect();
        next.free
            .extend(self.by_id.values().filter(|s| !kept.contains(s)));
        Ok((next, fresh))
    }
}

/// A list prefix in a scope: the key of the `RULES_*` tries minus the half.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct RuleKey<A> {
    /// [`NO_ACCOUNT`] for global lists, else the account slot.
    pub scope: u32,
    pub addr: A,
    pub len: u8,
}

/// An account prefix: the key of the `PREFIXES_*` tries minus the half.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct PrefixKey<A> {
    pub addr: A,
    pub len: u8,
}

/// Where a list id points, for events and `policy show`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ListInfo {
    /// `global` or the account id.
    pub scope: String,
    pub name: String,
}

/// The map entries of one policy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Compiled {
    /// Global settings; `generation` is filled in when applied.
    pub config: GenConfig,
    pub slots: SlotTable,
    /// Slots new in this policy: their rate-limit and sampler state must be
    /// reset before packets can see them.
    pub new_slots: Vec<u32>,
    pub accounts: BTreeMap<u32, AccountConfig>,
    pub hosts_v4: BTreeMap<[u8; 4], u32>,
    pub hosts_v6: BTreeMap<[u8; 16], u32>,
    pub prefixes_v4: BTreeMap<PrefixKey<[u8; 4]>, u32>,
    pub prefixes_v6: BTreeMap<PrefixKey<[u8; 16]>, u32>,
    pub rules_v4: BTreeMap<RuleKey<[u8; 4]>, RuleValue>,
    pub rules_v6: BTreeMap<RuleKey<[u8; 16]>, RuleValue>,
    /// List names by list id; id 0 is "no list".
    pub lists: Vec<ListInfo>,
    /// The first levels of the global IPv4 lists.
    pub stride: Stride,
}

impl Compiled {
    /// Adds one account's entries; returns the `GEN_PREFIXES_*` flags its
    /// wider prefixes need.
    fn add_account(&mut self, account: &Account) -> u32 {
        let mut flags = 0;
        let slot = self.slots.by_id[&account.id];
        for net in &account.prefixes_v4 {
            if net.prefix_len() == 32 {
                self.hosts_v4.insert(net.addr().octets(), slot);
            } else {
                flags |= GEN_PREFIXES_V4;
                self.prefixes_v4.insert(
                    PrefixKey {
                        addr: net.addr().octets(),
                        len: net.prefix_len(),
                    },
                    slot,
                );
            }
        }
        for net in &account.prefixes_v6 {
            if net.prefix_len() == 128 {
                self.hosts_v6.insert(net.addr().octets(), slot);
            } else {
                flags |= GEN_PREFIXES_V6;
                self.prefixes_v6.insert(
                    PrefixKey {
                        addr: net.addr().octets(),
                        len: net.prefix_len(),
                    },
                    slot,
                );
            }
        }
        let resolver = Resolver::new(&mut self.lists, &account.id, &account.lists);
        let (had_v4, had_v6) = resolver.emit(slot, &mut self.rules_v4, &mut self.rules_v6);
        let mut account_flags = ACCOUNT_ACTIVE;
        if had_v4 {
            account_flags |= ACCOUNT_RULES_V4;
        }
        if had_v6 {
            account_flags |= ACCOUNT_RULES_V6;
        }
        self.accounts.insert(
            slot,
            AccountConfig {
                flags: account_flags,
                // Set by the datapath when it applies the policy.
                epoch: 0,
                limits: [
                    map_limits(account.inbound.as_ref()),
                    map_limits(account.outbound.as_ref()),
                ],
            },
        );
        flags
    }
}

/// Compiles `policy`, keeping the slots of accounts already in `slots`.
pub fn compile(
    policy: &Policy,
    slots: &SlotTable,
    capacity: &Capacity,
) -> Result<Compiled, CompileError> {
    if policy.accounts.len() > capacity.accounts as usize {
        return Err(CompileError::OverCapacity {
            what: "accounts",
            needed: policy.accounts.len(),
            capacity: capacity.accounts,
            flag: "--max-accounts",
        });
    }
    let (slots, new_slots) = slots.assign(
        policy.accounts.iter().map(|a| a.id.as_str()),
        capacity.accounts,
    )?;
    let mut out = Compiled {
        slots,
        new_slots,
        lists: vec![ListInfo {
            scope: String::new(),
            name: String::new(),
        }],
        ..Compiled::default()
    };

    let mut flags = 0;
    let global = Resolver::new(&mut out.lists, "global", &policy.global.lists);
    let (global_v4, global_v6) = global.emit(NO_ACCOUNT, &mut out.rules_v4, &mut out.rules_v6);
    if global_v4 {
        flags |= GEN_RULES_V4;
    }
    if global_v6 {
        flags |= GEN_RULES_V6;
    }

    for account in &policy.accounts {
        flags |= out.add_account(account);
    }

    let global_v4: Vec<(u32, u8, RuleValue)> = out
        .rules_v4
        .iter()
        .take_while(|(k, _)| k.scope == NO_ACCOUNT)
        .map(|(k, v)| (u32::from_be_bytes(k.addr), k.len, *v))
        .collect();
    out.stride = Stride::build(&global_v4, capacity.stride_chunks);
    if out.lists.len() > mmesh_common::stride::MAX_PAYLOAD as usize {
        return Err(CompileError::OverCapacity {
            what: "lists",
            needed: out.lists.len(),
            capacity: mmesh_common::stride::MAX_PAYLOAD,
            flag: "(a fixed limit: merge lists)",
        });
    }
    out.config = GenConfig {
        generation: 0,
        flags,
        malformed: verdict_code(policy.global.malformed),
        event_rate: policy.global.events_per_second,
        _pad: 0,
    };
    check_capacity(&out, capacity)?;
    Ok(out)
}

fn check_capacity(out: &Compiled, capacity: &Capacity) -> Result<(), CompileError> {
    let checks = [
        (
            out.hosts_v4.len() + out.prefixes_v4.len(),
            capacity.account_prefixes,
            "IPv4 account prefixes",
            "--max-account-prefixes",
        ),
        (
            out.hosts_v6.len() + out.prefixes_v6.len(),
            capacity.account_prefixes,
            "IPv6 account prefixes",
            "--max-account-prefixes",
        ),
        (
            out.rules_v4.len(),
            capacity.list_prefixes,
            "IPv4 list prefixes",
            "--max-list-prefixes",
        ),
        (
            out.rules_v6.len(),
            capacity.list_prefixes,
            "IPv6 list prefixes",
            "--max-list-prefixes",
        ),
    ];
    for (needed, cap, what, flag) in checks {
        if needed > cap as usize {
            return Err(CompileError::OverCapacity {
                what,
                needed,
                capacity: cap,
                flag,
            });
        }
    }
    Ok(())
}

const fn verdict_code(action: Action) -> u32 {
    match action {
        Action::Drop => Verdict::Drop as u32,
        Action::Monitor => Verdict::Monitor as u32,
    }
}

fn map_limits(limits: Option<&DirLimits>) -> MapDirLimits {
    let Some(l) = limits else {
        return MapDirLimits::default();
    };
    let action = verdict_code(l.action);
    MapDirLimits {
        pps: l.pps.map_or_else(RateLimit::default, |r| {
            RateLimit::packets(r.rate, r.burst, action)
        }),
        bps: l.bps.map_or_else(RateLimit::default, |r| {
            RateLimit::bits(r.rate, r.burst, action)
        }),
    }
}

/// One entry of a scope's lists before resolution.
#[derive(Clone, Copy)]
struct Raw {
    addr: u128,
    len: u8,
    kind: ListKind,
    list: u32,
}

/// What the entries containing a prefix say: the most specific list of each
/// kind.
#[derive(Clone, Copy, Default)]
struct Resolution {
    allow: Option<u32>,
    drop: Option<u32>,
    monitor: Option<u32>,
}

impl Resolution {
    fn with(mut self, kind: ListKind, list: u32) -> Self {
        match kind {
            ListKind::Allow => self.allow = Some(list),
            ListKind::Block(Action::Drop) => self.drop = Some(list),
            ListKind::Block(Action::Monitor) => self.monitor = Some(list),
        }
        self
    }

    /// Allow beats block within a scope; drop beats monitor.
    fn value(self) -> RuleValue {
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
    fn answer(self) -> Option<RuleValue> {
        Some(self.value()).filter(|v| v.action != Verdict::Pass as u32)
    }
}

/// Resolves one scope's lists into trie entries whose longest match is the
/// scope's answer.
struct Resolver {
    v4: Vec<Raw>,
    v6: Vec<Raw>,
}

impl Resolver {
    fn new(table: &mut Vec<ListInfo>, scope: &str, lists: &[List]) -> Self {
        let mut v4 = Vec::new();
        let mut v6 = Vec::new();
        for list in lists {
            let id = table.len() as u32;
            table.push(ListInfo {
                scope: scope.to_owned(),
                name: list.name.clone(),
            });
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

    /// Emits the entries; returns whether any IPv4 / IPv6 entry was emitted.
    fn emit(
        self,
        scope: u32,
        v4: &mut BTreeMap<RuleKey<[u8; 4]>, RuleValue>,
        v6: &mut BTreeMap<RuleKey<[u8; 16]>, RuleValue>,
    ) -> (bool, bool) {
        let mut any4 = false;
        for (addr, len, value) in resolve(self.v4, 32) {
            any4 = true;
            v4.insert(
                RuleKey {
                    scope,
                    addr: (addr as u32).to_be_bytes(),
                    len,
                },
                value,
            );
        }
        let mut any6 = false;
        for (addr, len, value) in resolve(self.v6, 128) {
            any6 = true;
            v6.insert(
                RuleKey {
                    scope,
                    addr: addr.to_be_bytes(),
                    len,
                },
                value,
            );
        }
        (any4, any6)
    }
}

/// Whether prefix `outer` contains prefix `inner` (addresses right-aligned in
/// `width` bits).
fn contains(outer: (u128, u8), inner: (u128, u8), width: u8) -> bool {
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
fn resolve(mut raws: Vec<Raw>, width: u8) -> Vec<(u128, u8, RuleValue)> {
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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn policy(yaml: &str) -> Policy {
        Policy::parse(yaml, "test", Path::new(".")).expect("valid policy")
    }

    fn rule4(c: &Compiled, scope: u32, cidr: &str) -> Option<RuleValue> {
        let net: Ipv4Net = cidr.parse().unwrap();
        c.rules_v4
            .get(&RuleKey {
                scope,
                addr: net.addr().octets(),
                len: net.prefix_len(),
            })
            .copied()
    }

    /// A longest-prefix-match over the compiled entries, as the kernel does it.
    fn lookup4(c: &Compiled, scope: u32, addr: &str) -> Option<RuleValue> {
        let a: std::net::Ipv4Addr = addr.parse().unwrap();
        (0..=32u8).rev().find_map(|len| {
            let net = Ipv4Net::new(a, len).unwrap().trunc();
            rule4(c, scope, &net.to_string())
        })
    }

    #[test]
    fn allow_beats_block_and_drop_beats_monitor_within_a_scope() {
        let c = compile(
            &policy(
                "global:
  block:
    - { name: wide, cidrs: [10.0.0.0/8] }
    - { name: watch, action: monitor, cidrs: [10.9.0.0/16, 172.16.0.0/12] }
  allow:
    - { name: ok, cidrs: [10.1.0.0/16, 192.168.0.0/16] }
  ",
            ),
            &SlotTable::default(),
            &Capacity::default(),
        )
        .unwrap();
        let drop = Verdict::Drop as u32;
        let pass = Verdict::Pass as u32;
        let monitor = Verdict::Monitor as u32;
        assert_eq!(lookup4(&c, 0, "10.2.3.4").unwrap().action, drop);
        assert_eq!(
            lookup4(&c, 0, "10.1.3.4").unwrap().action,
            pass,
            "allow inside block"
        );
        assert_eq!(
            lookup4(&c, 0, "10.9.3.4").unwrap().action,
            drop,
            "monitor inside drop is still dropped"
        );
        assert_eq!(lookup4(&c, 0, "172.16.1.1").unwrap().action, monitor);
        assert_eq!(lookup4(&c, 0, "8.8.8.8"), None);
        assert_eq!(
            rule4(&c, 0, "192.168.0.0/16"),
            None,
            "an allow with no block around it is left out"
        );
        assert_eq!(
            c.lists[lookup4(&c, 0, "10.2.3.4").unwrap().list as usize].name,
            "wide"
        );
        assert_eq!(c.config.flags & GEN_RULES_V4, GEN_RULES_V4);
        assert_eq!(c.config.flags & GEN_RULES_V6, 0);
    }

    #[test]
    fn block_inside_allow_is_allowed() {
        let c = compile(
            &policy(
                "global:
  allow: [{ cidrs: [10.0.0.0/8] }]
  block: [{ cidrs: [10.1.0.0/16] }]
",
            ),
            &SlotTable::default(),
            &Capacity::default(),
        )
        .unwrap();
        // Not blocked; the block entry inside the allow changes nothing and
        // is not even written.
        assert_eq!(lookup4(&c, 0, "10.1.1.1"), None);
        assert!(c.rules_v4.is_empty());
    }

    #[test]
    fn redundant_prefixes_are_not_written() {
        let c = compile(
            &policy(
                "global:
  block:
    - { name: feed, cidrs: [10.0.0.0/16, 10.0.1.0/24, 10.0.1.7/32, 10.9.0.0/24] }
    - { name: other, cidrs: [10.0.2.0/24] }
",
            ),
            &SlotTable::default(),
            &Capacity::default(),
        )
        .unwrap();
        let written: Vec<String> = c
            .rules_v4
            .keys()
            .map(|k| format!("{}/{}", std::net::Ipv4Addr::from(k.addr), k.len))
            .collect();
        // The /24 and /32 of `feed` inside its own /16 add nothing; the /24 of
        // `other` is reported under its own name, so it stays.
        assert_eq!(written, ["10.0.0.0/16", "10.0.2.0/24", "10.9.0.0/24"]);
        assert_eq!(
            c.lists[lookup4(&c, 0, "10.0.2.9").unwrap().list as usize].name,
            "other"
        );
        assert_eq!(
            c.lists[lookup4(&c, 0, "10.0.1.7").unwrap().list as usize].name,
            "feed"
        );
    }

    #[test]
    fn accounts_get_stable_slots() {
        let p1 = policy(
            "accounts:
  - { id: a, prefixes: [10.0.0.1] }
  - { id: b, prefixes: [10.0.0.2, 10.2.0.0/16, '2001:db8::/64'] }
",
        );
        let c1 = compile(&p1, &SlotTable::default(), &Capacity::default()).unwrap();
        assert_eq!(c1.slots.by_id["a"], 1);
        assert_eq!(c1.slots.by_id["b"], 2);
        assert_eq!(c1.new_slots, vec![1, 2]);
        assert_eq!(c1.hosts_v4[&[10, 0, 0, 2]], 2);
        assert_eq!(c1.prefixes_v4.len(), 1);
        assert_eq!(
            c1.config.flags & (GEN_PREFIXES_V4 | GEN_PREFIXES_V6),
            GEN_PREFIXES_V4 | GEN_PREFIXES_V6
        );

        // a leaves, c arrives: b keeps 2; c must not take a's slot in the
        // same change, so it gets 3; a later newcomer reuses 1.
        let p2 = policy(
            "accounts:
  - { id: c, prefixes: [10.0.0.3] }
  - { id: b, prefixes: [10.0.0.2] }
",
        );
        let c2 = compile(&p2, &c1.slots, &Capacity::default()).unwrap();
        assert_eq!(c2.slots.by_id["b"], 2);
        assert_eq!(c2.slots.by_id["c"], 3);
        assert_eq!(c2.new_slots, vec![3]);
        let p3 = policy(
            "accounts:
  - { id: c, prefixes: [10.0.0.3] }
  - { id: b, prefixes: [10.0.0.2] }
  - { id: d, prefixes: [10.0.0.4] }
",
        );
        let c3 = compile(&p3, &c2.slots, &Capacity::default()).unwrap();
        assert_eq!(c3.slots.by_id["d"], 1);
    }

    #[test]
    fn account_lists_are_scoped_by_slot_and_limits_compiled() {
        let c = compile(
            &policy(
                "accounts:
  - id: a
    prefixes: [10.0.0.1]
    mode: monitor
    block: [{ cidrs: ['2001:db8:bad::/48'] }]
    limits:
      outbound: { pps: 1000, bps: 8M }
",
            ),
            &SlotTable::default(),
            &Capacity::default(),
        )
        .unwrap();
        let acc = c.accounts[&1];
        assert_eq!(acc.flags, ACCOUNT_ACTIVE | ACCOUNT_RULES_V6);
        assert_eq!(acc.limits[0], MapDirLimits::default(), "no inbound limits");
        let out = acc.limits[1];
        assert_eq!(
            out.pps.action,
            Verdict::Monitor as u32,
            "monitor mode applies to limits"
        );
        assert_eq!(
            out.pps,
            RateLimit::packets(1000, 100, Verdict::Monitor as u32)
        );
        assert_eq!(
            out.bps,
            RateLimit::bits(8_000_000, 800_000, Verdict::Monitor as u32)
        );
        let (key, value) = c.rules_v6.iter().next().unwrap();
        assert_eq!((key.scope, key.len), (1, 48));
        assert_eq!(value.action, Verdict::Monitor as u32);
    }

    #[test]
    fn capacity_errors_name_the_flag() {
        let p = policy(
            "accounts:
  - { id: a, prefixes: [10.0.0.1] }
  - { id: b, prefixes: [10.0.0.2] }
",
        );
        let cap = Capacity {
            accounts: 1,
            ..Capacity::default()
        };
        let err = compile(&p, &SlotTable::default(), &cap)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("2 accounts") && err.contains("--max-accounts"),
            "{err}"
        );
        let p = policy("global:\n  block: [{ cidrs: [10.0.0.0/8, 11.0.0.0/8] }]\n");
        let cap = Capacity {
            list_prefixes: 1,
            ..Capacity::default()
        };
        let err = compile(&p, &SlotTable::default(), &cap)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("IPv4 list prefixes") && err.contains("--max-list-prefixes"),
            "{err}"
        );
    }

    proptest::proptest! {
        /// The compiled trie answers every address exactly as the scope's
        /// rules say, computed naively over all entries.
        #[test]
        fn resolution_matches_naive_semantics(
            entries in proptest::collection::vec((0u32..256, 0u8..=8, 0u8..3), 1..40),
            probes in proptest::collection::vec(0u32..256, 1..64),
        ) {
            // 8-bit address space so that entries overlap a lot.
            let raws: Vec<Raw> = entries.iter().enumerate().map(|(i, (a, len, k))| {
                let mask = if *len == 0 { 0 } else { 0xffu32 << (8 - len) & 0xff };
                Raw {
                    addr: u128::from(a & mask),
                    len: *len,
                    kind: match k { 0 => ListKind::Allow, 1 => ListKind::Block(Action::Drop), _ => ListKind::Block(Action::Monitor) },
                    list: i as u32 + 1,
                }
            }).collect();
            let table = resolve(raws.clone(), 8);
            for p in probes {
                let p = u128::from(p);
                let matching: Vec<&Raw> = raws.iter().filter(|r| contains((r.addr, r.len), (p, 8), 8)).collect();
                let expected = if matching.iter().any(|r| r.kind == ListKind::Allow) {
                    Verdict::Pass as u32
                } else if matching.iter().any(|r| r.kind == ListKind::Block(Action::Drop)) {
                    Verdict::Drop as u32
                } else if matching.is_empty() {
                    Verdict::Pass as u32
                } else {
                    Verdict::Monitor as u32
                };
                let got = table.iter().filter(|(a, l, _)| contains((*a, *l), (p, 8), 8)).max_by_key(|(_, l, _)| *l).map_or(Verdict::Pass as u32, |(_, _, v)| v.action);
                proptest::prop_assert_eq!(got, expected, "probe {}", p);
            }
        }
    }
}
