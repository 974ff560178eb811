use std::{collections::HashMap, path::Path};

use ipnet::Ipv4Net;
use mmesh_common::{
    Verdict,
    maps::{
        ACCOUNT_ACTIVE, ACCOUNT_RULES_V6, DirLimits as MapDirLimits, GEN_PREFIXES_V4,
        GEN_PREFIXES_V6, GEN_RULES_V4, GEN_RULES_V6, RateLimit,
    },
};

use super::{
    resolve::{Raw, contains, resolve},
    *,
};
use crate::policy::{Action, ListKind};

fn policy(yaml: &str) -> Policy {
    Policy::parse(yaml, "test", Path::new(".")).expect("valid policy")
}

fn fresh(yaml: &str) -> Compiled {
    compile(&policy(yaml), None, &Capacity::default()).expect("compiles")
}

fn global4(c: &Compiled, cidr: &str) -> Option<RuleValue> {
    let net: Ipv4Net = cidr.parse().unwrap();
    c.global
        .rules_v4
        .get(&PrefixKey {
            addr: net.addr().octets(),
            len: net.prefix_len(),
        })
        .copied()
}

/// A longest-prefix-match over the compiled global entries, as the
/// kernel does it.
fn lookup4(c: &Compiled, addr: &str) -> Option<RuleValue> {
    let a: std::net::Ipv4Addr = addr.parse().unwrap();
    (0..=32u8)
        .rev()
        .find_map(|len| global4(c, &Ipv4Net::new(a, len).unwrap().trunc().to_string()))
}

fn list_name(c: &Compiled, v: Option<RuleValue>) -> &str {
    c.list(v.expect("a match").list)
        .expect("a named list")
        .name
        .as_str()
}

#[test]
fn allow_beats_block_and_drop_beats_monitor_within_a_scope() {
    let c = fresh(
        "global:
  block:
    - { name: wide, cidrs: [10.0.0.0/8] }
    - { name: watch, action: monitor, cidrs: [10.9.0.0/16, 172.16.0.0/12] }
  allow:
    - { name: ok, cidrs: [10.1.0.0/16, 192.168.0.0/16] }
",
    );
    let (drop, pass, monitor) = (
        Verdict::Drop as u32,
        Verdict::Pass as u32,
        Verdict::Monitor as u32,
    );
    assert_eq!(lookup4(&c, "10.2.3.4").unwrap().action, drop);
    assert_eq!(
        lookup4(&c, "10.1.3.4").unwrap().action,
        pass,
        "allow inside block"
    );
    assert_eq!(
        lookup4(&c, "10.9.3.4").unwrap().action,
        drop,
        "monitor inside drop is still dropped"
    );
    assert_eq!(lookup4(&c, "172.16.1.1").unwrap().action, monitor);
    assert_eq!(lookup4(&c, "8.8.8.8"), None);
    assert_eq!(
        global4(&c, "192.168.0.0/16"),
        None,
        "an allow with no block around it is left out"
    );
    assert_eq!(list_name(&c, lookup4(&c, "10.2.3.4")), "wide");
    assert_eq!(c.config.flags & GEN_RULES_V4, GEN_RULES_V4);
    assert_eq!(c.config.flags & GEN_RULES_V6, 0);
}

#[test]
fn block_inside_allow_is_allowed() {
    let c = fresh(
        "global:
  allow: [{ cidrs: [10.0.0.0/8] }]
  block: [{ cidrs: [10.1.0.0/16] }]
",
    );
    // Not blocked; the block entry inside the allow changes nothing and
    // is not even written.
    assert_eq!(lookup4(&c, "10.1.1.1"), None);
    assert!(c.global.rules_v4.is_empty());
}

#[test]
fn redundant_prefixes_are_not_written() {
    let c = fresh(
        "global:
  block:
    - { name: feed, cidrs: [10.0.0.0/16, 10.0.1.0/24, 10.0.1.7/32, 10.9.0.0/24] }
    - { name: other, cidrs: [10.0.2.0/24] }
",
    );
    let written: Vec<String> = c
        .global
        .rules_v4
        .keys()
        .map(|k| format!("{}/{}", std::net::Ipv4Addr::from(k.addr), k.len))
        .collect();
    // The /24 and /32 of `feed` inside its own /16 add nothing; the /24 of
    // `other` is reported under its own name, so it stays.
    assert_eq!(written, ["10.0.0.0/16", "10.0.2.0/24", "10.9.0.0/24"]);
    assert_eq!(list_name(&c, lookup4(&c, "10.0.2.9")), "other");
    assert_eq!(list_name(&c, lookup4(&c, "10.0.1.7")), "feed");
}

#[test]
fn accounts_get_stable_slots() {
    let p1 = policy(
        "accounts:
  - { id: a, prefixes: [10.0.0.1] }
  - { id: b, prefixes: [10.0.0.2, 10.2.0.0/16, '2001:db8::/64'] }
",
    );
    let c1 = compile(&p1, None, &Capacity::default()).unwrap();
    assert_eq!((c1.slot_of("a").unwrap(), c1.slot_of("b").unwrap()), (1, 2));
    assert_eq!(c1.new_slots, vec![1, 2]);
    assert_eq!(c1.account(2).unwrap().hosts_v4, [[10, 0, 0, 2]].into());
    assert_eq!(c1.account(2).unwrap().prefixes_v4.len(), 1);
    assert_eq!(c1.account_id(2), Some("b"));
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
    let c2 = compile(&p2, Some(&c1), &Capacity::default()).unwrap();
    assert_eq!((c2.slot_of("b").unwrap(), c2.slot_of("c").unwrap()), (2, 3));
    assert_eq!(c2.new_slots, vec![3]);
    let p3 = policy(
        "accounts:
  - { id: c, prefixes: [10.0.0.3] }
  - { id: b, prefixes: [10.0.0.2] }
  - { id: d, prefixes: [10.0.0.4] }
",
    );
    let c3 = compile(&p3, Some(&c2), &Capacity::default()).unwrap();
    assert_eq!(c3.slot_of("d").unwrap(), 1);
}

#[test]
fn unchanged_pieces_are_reused_as_they_are() {
    let base = "global:
  block: [{ name: g, cidrs: [192.0.2.0/24] }]
accounts:
  - { id: a, prefixes: [10.0.0.1], limits: { inbound: { pps: 1000 } } }
  - { id: b, prefixes: [10.0.0.2], block: [{ name: own, cidrs: [198.51.100.0/24] }] }
";
    let c1 = fresh(base);
    // Same text: every piece is the same Arc, the slot table too.
    let c2 = compile(&policy(base), Some(&c1), &Capacity::default()).unwrap();
    assert!(Arc::ptr_eq(&c1.global, &c2.global));
    assert_eq!(c1.slots, c2.slots);
    assert!(
        c1.accounts()
            .all(|(s, a)| Arc::ptr_eq(a, c2.account(s).unwrap()))
    );
    // One account's limit changes: only its piece is new.
    let c3 = compile(
        &policy(&base.replace("pps: 1000", "pps: 2000")),
        Some(&c2),
        &Capacity::default(),
    )
    .unwrap();
    assert!(!Arc::ptr_eq(c2.account(1).unwrap(), c3.account(1).unwrap()));
    assert!(Arc::ptr_eq(c2.account(2).unwrap(), c3.account(2).unwrap()));
    assert!(Arc::ptr_eq(&c2.global, &c3.global));
    assert_eq!(
        c3.account(1).unwrap().config.limits[0].pps,
        // The default burst: half a second of the rate.
        RateLimit::packets(2000, 1000, Verdict::Drop as u32)
    );
    // The global list changes: a new global piece, the accounts stay.
    let c4 = compile(
        &policy(&base.replace("192.0.2.0/24", "192.0.2.0/25")),
        Some(&c3),
        &Capacity::default(),
    )
    .unwrap();
    assert!(!Arc::ptr_eq(&c3.global, &c4.global));
    assert!(Arc::ptr_eq(c3.account(2).unwrap(), c4.account(2).unwrap()));
    // Account list ids do not depend on other accounts.
    let id = c4.account(2).unwrap().rules_v4()[0].1.list;
    assert_eq!(id, account_list_id(2, 0));
    assert_eq!(c4.list(id).unwrap().name, "own");
    assert_eq!(c4.list(id).unwrap().scope, "b");
}

#[test]
fn account_lists_are_scoped_by_slot_and_limits_compiled() {
    let c = fresh(
        "accounts:
  - id: a
    prefixes: [10.0.0.1]
    mode: monitor
    block: [{ cidrs: ['2001:db8:bad::/48'] }]
    limits:
      outbound: { pps: 1000, bps: 8M }
",
    );
    let acc = &c.account(1).unwrap();
    assert_eq!(acc.config.flags, ACCOUNT_ACTIVE | ACCOUNT_RULES_V6);
    assert_eq!(
        acc.config.limits[0],
        MapDirLimits::default(),
        "no inbound limits"
    );
    let out = acc.config.limits[1];
    assert_eq!(
        out.pps.action,
        Verdict::Monitor as u32,
        "monitor mode applies to limits"
    );
    assert_eq!(
        out.pps,
        RateLimit::packets(1000, 500, Verdict::Monitor as u32)
    );
    assert_eq!(
        out.bps,
        RateLimit::bits(8_000_000, 4_000_000, Verdict::Monitor as u32)
    );
    let (key, value) = acc.rules_v6()[0];
    assert_eq!(key.len, 48);
    assert_eq!(value.action, Verdict::Monitor as u32);
}

#[test]
fn capacity_errors_name_the_map_and_the_flag() {
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
    let err = compile(&p, None, &cap).unwrap_err();
    assert_eq!(err.refused_map(), Some("accounts"));
    let err = err.to_string();
    assert!(
        err.contains("2 accounts")
            && err.contains("map accounts")
            && err.contains("--max-accounts"),
        "{err}"
    );
    let p = policy("global:\n  block: [{ cidrs: [10.0.0.0/8, 11.0.0.0/8] }]\n");
    let cap = Capacity {
        list_prefixes: 1,
        ..Capacity::default()
    };
    let err = compile(&p, None, &cap).unwrap_err();
    assert_eq!(err.refused_map(), Some("list_prefixes_v4"));
    let err = err.to_string();
    assert!(
        err.contains("IPv4 list prefixes")
            && err.contains("map list_prefixes_v4")
            && err.contains("--max-list-prefixes 2 or more"),
        "{err}"
    );
}

/// A small policy from a list of (account number, variant): ids from a
/// small pool so that consecutive policies share, add, drop, reorder
/// and change accounts.
fn policy_of(accounts: &[(u8, u8)]) -> Policy {
    use std::fmt::Write as _;
    let mut y = String::from("global:\n  block: [{ name: g, cidrs: [192.0.2.0/24] }]\naccounts:\n");
    let mut seen = std::collections::HashSet::new();
    for (n, variant) in accounts {
        if !seen.insert(*n) {
            continue;
        }
        let _ = write!(
            y,
            "  - {{ id: a{n}, prefixes: [10.0.{n}.1, '10.1.{n}.0/24'], limits: {{ inbound: {{ pps: {} }} }}",
            1000 + u32::from(*variant % 3)
        );
        if variant % 2 == 1 {
            let _ = write!(
                y,
                ", block: [{{ name: own, cidrs: [198.51.{}.0/24] }}]",
                variant % 4
            );
        }
        y.push_str(" }\n");
    }
    policy(&y)
}

/// What an account puts in the maps, with list ids replaced by names so
/// that it does not depend on the slot.
#[allow(clippy::type_complexity, reason = "a test's tuple of what it compares")]
fn portable(
    c: &Compiled,
    slot: u32,
) -> (
    Vec<[u8; 4]>,
    Vec<PrefixKey<[u8; 4]>>,
    Vec<(PrefixKey<[u8; 4]>, u32, String)>,
    AccountConfig,
) {
    let a = c.account(slot).expect("compiled");
    let rules = a
        .rules_v4()
        .iter()
        .map(|(k, v)| (*k, v.action, c.list(v.list).unwrap().name.clone()))
        .collect();
    (a.hosts_v4.to_vec(), a.prefixes_v4.to_vec(), rules, a.config)
}

proptest::proptest! {
    /// Compiling B against A gives the same entries as compiling B
    /// afresh, accounts present in both keep their slots, no slot is
    /// shared, and the new slots are exactly those of the new accounts.
    #[test]
    fn incremental_compile_matches_a_fresh_one(
        a in proptest::collection::vec((0u8..12, 0u8..6), 0..10),
        b in proptest::collection::vec((0u8..12, 0u8..6), 0..10),
    ) {
        let cap = Capacity::default();
        let (pa, pb) = (policy_of(&a), policy_of(&b));
        let ca = compile(&pa, None, &cap).unwrap();
        let incremental = compile(&pb, Some(&ca), &cap).unwrap();
        let fresh = compile(&pb, None, &cap).unwrap();
        proptest::prop_assert_eq!(incremental.counts(), fresh.counts());
        proptest::prop_assert_eq!(incremental.config, fresh.config);
        let mut used = std::collections::HashSet::new();
        for account in &pb.accounts {
            let si = incremental.slot_of(&account.id).unwrap();
            let sf = fresh.slot_of(&account.id).unwrap();
            proptest::prop_assert!(used.insert(si), "slot {} given twice", si);
            proptest::prop_assert_eq!(portable(&incremental, si), portable(&fresh, sf));
            match ca.slot_of(&account.id) {
                Some(before) => {
                    proptest::prop_assert_eq!(si, before, "{} moved", account.id);
                    proptest::prop_assert!(!incremental.new_slots.contains(&si));
                }
                None => proptest::prop_assert!(incremental.new_slots.contains(&si)),
            }
        }
        proptest::prop_assert_eq!(incremental.accounts().count(), pb.accounts.len());
        proptest::prop_assert_eq!(incremental.order.len(), pb.accounts.len());
    }
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

/// Accounts drawn from small domains, so that two of them are often equal
/// in some fields and different in others.
mod fingerprint {
    use ipnet::{Ipv4Net, Ipv6Net};
    use proptest::{collection::vec, option, prelude::*, sample::select};

    use super::super::entries::compile_account;
    use crate::policy::{Account, Action, DirLimits, Fingerprint, List, ListKind, Mode, Rate};

    fn action() -> impl Strategy<Value = Action> {
        select(vec![Action::Drop, Action::Monitor])
    }

    fn v4() -> impl Strategy<Value = Vec<Ipv4Net>> {
        vec(
            select(vec![
                "10.0.0.0/8",
                "10.1.0.0/16",
                "192.0.2.7/32",
                "198.51.100.0/24",
            ]),
            0..3,
        )
        .prop_map(|v| {
            let mut v: Vec<Ipv4Net> = v.iter().map(|s| s.parse().unwrap()).collect();
            v.sort_unstable();
            v.dedup();
            v
        })
    }

    fn v6() -> impl Strategy<Value = Vec<Ipv6Net>> {
        vec(
            select(vec!["2001:db8::/32", "2001:db8:1::/48", "fd00::1/128"]),
            0..3,
        )
        .prop_map(|v| {
            let mut v: Vec<Ipv6Net> = v.iter().map(|s| s.parse().unwrap()).collect();
            v.sort_unstable();
            v.dedup();
            v
        })
    }

    fn lists() -> impl Strategy<Value = Vec<List>> {
        vec(
            (
                select(vec![
                    ListKind::Allow,
                    ListKind::Block(Action::Drop),
                    ListKind::Block(Action::Monitor),
                ]),
                v4(),
                v6(),
            ),
            0..3,
        )
        .prop_map(|lists| {
            lists
                .into_iter()
                .enumerate()
                .map(|(i, (kind, v4, v6))| List {
                    name: format!("l{i}"),
                    kind,
                    v4,
                    v6,
                })
                .collect()
        })
    }

    fn rate() -> impl Strategy<Value = Option<Rate>> {
        option::of((select(vec![1_000_u64, 2_000]), select(vec![100_u64, 200])))
            .prop_map(|r| r.map(|(rate, burst)| Rate { rate, burst }))
    }

    fn limits() -> impl Strategy<Value = Option<DirLimits>> {
        option::of((rate(), rate(), action()))
            .prop_map(|l| l.map(|(pps, bps, action)| DirLimits { pps, bps, action }))
    }

    fn account() -> impl Strategy<Value = Account> {
        (
            select(vec!["a", "b"]),
            select(vec![Mode::Enforce, Mode::Monitor]),
            v4(),
            v6(),
            lists(),
            limits(),
            limits(),
        )
            .prop_map(
                |(id, mode, prefixes_v4, prefixes_v6, lists, inbound, outbound)| {
                    let mut account = Account {
                        id: id.to_owned(),
                        mode,
                        prefixes_v4,
                        prefixes_v6,
                        lists,
                        inbound,
                        outbound,
                        fingerprint: Fingerprint::default(),
                    };
                    account.fingerprint = account.fingerprint_of();
                    account
                },
            )
    }

    /// `b` is `a` with one field (chosen by `field`) taken from `other`:
    /// pairs that differ in exactly one place, the case a fingerprint that
    /// leaves a field out gets wrong.
    fn splice(a: &Account, other: &Account, field: u8) -> Account {
        let mut b = a.clone();
        match field {
            0 => b.id.clone_from(&other.id),
            1 => b.mode = other.mode,
            2 => b.prefixes_v4.clone_from(&other.prefixes_v4),
            3 => b.prefixes_v6.clone_from(&other.prefixes_v6),
            4 => b.lists.clone_from(&other.lists),
            5 => b.inbound = other.inbound,
            _ => b.outbound = other.outbound,
        }
        b.fingerprint = b.fingerprint_of();
        b
    }

    /// What the kernel would get for `account` in slot 1 (without the id,
    /// which is the account's own).
    fn entries(account: &Account) -> Result<super::AccountEntries, String> {
        compile_account(&std::sync::Arc::new(account.clone()), 1)
            .map(|mut e| {
                e.id = None;
                e
            })
            .map_err(|e| e.to_string())
    }

    proptest! {
        /// Equal fingerprints mean equal compiled entries: the incremental
        /// compile keeps an account's entries when its fingerprint is
        /// unchanged, so a fingerprint blind to a field that the entries
        /// depend on would leave stale entries in the kernel.
        #[test]
        fn equal_fingerprints_compile_alike(
            a in account(),
            other in account(),
            field in 0u8..7,
        ) {
            for b in [splice(&a, &other, field), other.clone()] {
                if a.fingerprint == b.fingerprint {
                    prop_assert_eq!(entries(&a), entries(&b), "field {}", field);
                } else {
                    prop_assert_ne!(&a, &b);
                }
            }
        }
    }
}

/// An adopted datapath: accounts the pins name keep their slots (not
/// new: their state is kept), new ones take free slots, the others are
/// released; the next ordinary compile builds on the result.
#[test]
fn adopting_keeps_the_slots_the_pins_name() {
    let p = policy(
        "accounts:
  - { id: a, prefixes: [10.0.0.1/32] }
  - { id: b, prefixes: [10.0.0.2/32] }
  - { id: new, prefixes: [10.0.0.3/32] }
",
    );
    // An earlier agent had b in slot 3, a in slot 1, gone in slot 2.
    let held: HashMap<u128, u32> = [
        (account_key("b"), 3),
        (account_key("a"), 1),
        (account_key("gone"), 2),
    ]
    .into_iter()
    .collect();
    let c = compile_adopting(&p, &held, &Capacity::default()).expect("compiles");
    assert_eq!(c.slot_of("a"), Some(1));
    assert_eq!(c.slot_of("b"), Some(3));
    assert_eq!(c.slot_of("new"), Some(2), "the lowest free slot");
    assert_eq!(c.new_slots, [2]);
    assert!(c.released.is_empty(), "slot 2 changed hands instead");
    let held: HashMap<u128, u32> = [(account_key("gone"), 4), (account_key("a"), 1)]
        .into_iter()
        .collect();
    let c = compile_adopting(&p, &held, &Capacity::default()).expect("compiles");
    assert_eq!(c.released, [4]);
    assert_eq!(c.slot_of("a"), Some(1));
    let next = compile(&p, Some(&c), &Capacity::default()).expect("compiles");
    assert!(next.new_slots.is_empty() && next.released.is_empty());
    assert_eq!(next.slot_of("b"), c.slot_of("b"));
}
