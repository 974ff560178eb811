//! The policy at scale the benchmarks run against, built in memory (the
//! policy-path benchmark measures the YAML route separately).
//!
//! - 100,000 accounts, each with an IPv4 host address (100.64.0.0/10), an
//!   IPv4 /28 (in 10.0.0.0/8), an IPv6 host address and an IPv6 /64 (in
//!   `fd00:acc::/32`), and limits high enough never to bite (1 Gpps, 100 Tbit/s)
//!   so that the pass path pays for evaluating them;
//! - one account, `limited`, at 1 packet/s;
//! - every 100th account with a block list of ten IPv4 prefixes;
//! - global block lists of 750,000 IPv4 prefixes (/16 to /32, lengths evenly
//!   spread) and 250,000 IPv6 prefixes (/48 to /128), deterministic
//!   pseudo-random, kept clear of the account ranges and of the benchmark's
//!   own remote addresses.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};
use mmesh_agent::policy::{
    Account, Action, DirLimits, Fingerprint, Global, List, ListKind, Mode, Policy, Rate,
};

/// Sizes of the policy (reduced in quick mode).
#[derive(Clone, Copy, Debug)]
pub struct Scale {
    pub accounts: u32,
    pub global_v4: u32,
    pub global_v6: u32,
}

impl Scale {
    pub const FULL: Self = Self {
        accounts: 100_000,
        global_v4: 750_000,
        global_v6: 250_000,
    };
    pub const QUICK: Self = Self {
        accounts: 1_000,
        global_v4: 10_000,
        global_v6: 2_000,
    };
}

/// The remote address of passing traffic (benchmarking range, in no list).
pub const REMOTE_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
pub const REMOTE_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1);
/// A destination no account owns.
pub const UNOWNED_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 5);

/// Account `i`'s IPv4 host address.
#[must_use]
pub fn host_v4(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(100, 64, 0, 0)) + i)
}

/// Account `i`'s IPv6 host address.
#[must_use]
pub fn host_v6(i: u32) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x0acc, 0, 0, 0, 0, (i >> 16) as u16, i as u16)
}

/// The address the `limited` account owns.
pub const LIMITED_V4: Ipv4Addr = Ipv4Addr::new(100, 127, 255, 254);

/// An address in account 0's own block list.
pub const ACCOUNT_BLOCKED_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 77);

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Whether a global prefix would cover an address the benchmark relies on.
fn clear_v4(net: Ipv4Net) -> bool {
    let reserved: [Ipv4Net; 5] = [
        "10.0.0.0/8".parse().expect("literal"),
        "100.64.0.0/10".parse().expect("literal"),
        "198.18.0.0/15".parse().expect("literal"),
        "203.0.113.0/24".parse().expect("literal"),
        "192.0.2.0/24".parse().expect("literal"),
    ];
    !reserved.iter().any(|r| r.contains(&net) || net.contains(r))
}

fn clear_v6(net: &Ipv6Net) -> bool {
    let reserved: [Ipv6Net; 2] = [
        "fd00::/8".parse().expect("literal"),
        "2001:db8::/32".parse().expect("literal"),
    ];
    !reserved.iter().any(|r| r.contains(net) || net.contains(r))
}

/// The global IPv4 block prefixes.
#[must_use]
pub fn global_v4(count: u32) -> Vec<Ipv4Net> {
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let mut out = Vec::with_capacity(count as usize);
    let mut i = 0u32;
    while out.len() < count as usize {
        let len = 16 + (i % 17) as u8;
        i += 1;
        let net = Ipv4Net::new(Ipv4Addr::from(rng.next() as u32), len)
            .expect("length ≤ 32")
            .trunc();
        if clear_v4(net) {
            out.push(net);
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// The global IPv6 block prefixes.
#[must_use]
pub fn global_v6(count: u32) -> Vec<Ipv6Net> {
    let mut rng = XorShift(0x2545_f491_4f6c_dd1d);
    let mut out = Vec::with_capacity(count as usize);
    let mut i = 0u32;
    while out.len() < count as usize {
        let len = 48 + (i % 81) as u8;
        i += 1;
        // Global unicast, 2000::/3.
        let hi = (rng.next() & 0x1fff_ffff_ffff_ffff) | 0x2000_0000_0000_0000;
        let addr = (u128::from(hi) << 64) | u128::from(rng.next());
        let net = Ipv6Net::new(Ipv6Addr::from(addr), len)
            .expect("length ≤ 128")
            .trunc();
        if clear_v6(&net) {
            out.push(net);
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// A remote address inside a global IPv4 block prefix.
#[must_use]
pub fn blocked_v4(global: &[Ipv4Net]) -> Ipv4Addr {
    let net = global
        .iter()
        .find(|n| n.prefix_len() == 24)
        .expect("some /24 in the list");
    Ipv4Addr::from(u32::from(net.network()) + 9)
}

fn unlimited() -> DirLimits {
    DirLimits {
        pps: Some(Rate {
            rate: 1_000_000_000,
            burst: 1_000_000,
        }),
        bps: Some(Rate {
            rate: 100_000_000_000_000,
            burst: 1_000_000_000,
        }),
        action: Action::Drop,
    }
}

/// The policy at `scale`.
#[must_use]
pub fn policy(scale: Scale) -> Policy {
    let v4 = global_v4(scale.global_v4);
    let v6 = global_v6(scale.global_v6);
    let mut accounts = Vec::with_capacity(scale.accounts as usize + 1);
    for i in 0..scale.accounts {
        let mut lists = Vec::new();
        if i % 100 == 0 {
            let mut own: Vec<Ipv4Net> = (0..10u32)
                .map(|k| Ipv4Net::new(Ipv4Addr::new(192, 0, 2, (k * 16) as u8), 28).expect("valid"))
                .collect();
            if i == 0 {
                own.push(Ipv4Net::new(ACCOUNT_BLOCKED_V4, 32).expect("valid"));
            }
            lists.push(List {
                name: format!("acct-{i}-block"),
                kind: ListKind::Block(Action::Drop),
                v4: own,
                v6: Vec::new(),
            });
        }
        accounts.push(Account {
            id: format!("acct-{i}"),
            mode: Mode::Enforce,
            prefixes_v4: vec![
                Ipv4Net::new(host_v4(i), 32).expect("valid"),
                Ipv4Net::new(Ipv4Addr::from((10 << 24) + i * 16), 28).expect("valid"),
            ],
            prefixes_v6: vec![
                Ipv6Net::new(host_v6(i), 128).expect("valid"),
                Ipv6Net::new(
                    Ipv6Addr::new(0xfd00, 0x0acc, 1, (i >> 16) as u16, i as u16, 0, 0, 0),
                    80,
                )
                .expect("valid"),
            ],
            lists,
            inbound: Some(unlimited()),
            outbound: Some(unlimited()),
            fingerprint: Fingerprint::default(),
        });
    }
    accounts.push(Account {
        id: "limited".into(),
        mode: Mode::Enforce,
        prefixes_v4: vec![Ipv4Net::new(LIMITED_V4, 32).expect("valid")],
        prefixes_v6: Vec::new(),
        lists: Vec::new(),
        inbound: Some(DirLimits {
            pps: Some(Rate { rate: 1, burst: 1 }),
            bps: None,
            action: Action::Drop,
        }),
        outbound: None,
        fingerprint: Fingerprint::default(),
    });
    for account in &mut accounts {
        account.fingerprint = account.fingerprint_of();
    }
    Policy {
        source: "benchmark policy".into(),
        version: None,
        global: Global {
            mode: Mode::Enforce,
            malformed: Action::Drop,
            events_per_second: 10,
            lists: vec![List {
                name: "global-block".into(),
                kind: ListKind::Block(Action::Drop),
                v4,
                v6,
            }],
        },
        accounts: accounts.into_iter().map(std::sync::Arc::new).collect(),
    }
}

/// An address of either family, for frames.
#[must_use]
pub fn ip4(a: Ipv4Addr) -> IpAddr {
    IpAddr::V4(a)
}

#[must_use]
pub fn ip6(a: Ipv6Addr) -> IpAddr {
    IpAddr::V6(a)
}
