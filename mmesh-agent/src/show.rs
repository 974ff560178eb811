//! `mmesh-agent policy show`: the compiled, effective policy.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Arc,
};

use ipnet::IpNet;
use mmesh_common::{
    Verdict,
    maps::{RateLimit, RuleValue},
};
use serde::Serialize;

use crate::{
    compile::{Capacity, Compiled, PrefixKey},
    policy::{Account, Action, DirLimits, Fingerprint, Mode, Policy},
};

#[derive(Debug, Serialize)]
pub struct EffectivePolicy {
    pub source: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    pub global: EffectiveGlobal,
    pub accounts: Vec<EffectiveAccount>,
    /// Map entries per half, against the capacities they must fit.
    pub entries: Entries,
}

#[derive(Debug, Serialize)]
pub struct EffectiveGlobal {
    pub mode: Mode,
    pub malformed: Action,
    pub events_per_second: u32,
    /// The remote-address rules after allow/block resolution: the longest
    /// matching prefix decides.
    pub rules: Vec<EffectiveRule>,
}

#[derive(Debug, Serialize)]
pub struct EffectiveAccount {
    pub id: String,
    pub slot: u32,
    pub mode: Mode,
    pub prefixes: Vec<IpNet>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inbound: Option<EffectiveLimits>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outbound: Option<EffectiveLimits>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<EffectiveRule>,
}

#[derive(Debug, Serialize)]
pub struct EffectiveLimits {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pps: Option<EffectiveRate>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bps: Option<EffectiveRate>,
    pub action: Action,
}

#[derive(Debug, Serialize)]
pub struct EffectiveRate {
    pub rate: u64,
    pub burst: u64,
    /// What the kernel evaluates: nanoseconds per packet (or per byte for
    /// bps) and the burst tolerance in nanoseconds.
    pub interval_ns: f64,
    pub tolerance_ns: f64,
}

#[derive(Debug, Serialize)]
pub struct EffectiveRule {
    pub prefix: IpNet,
    /// `allow` (an exception carved out of a block), `drop` or `monitor`.
    pub action: &'static str,
    pub list: String,
}

#[derive(Debug, Serialize)]
pub struct Entries {
    pub accounts: usize,
    pub account_prefixes_v4: usize,
    pub account_prefixes_v6: usize,
    pub list_prefixes_v4: usize,
    pub list_prefixes_v6: usize,
    pub capacity: Capacity,
}

/// Builds the view of `policy` compiled as `compiled`.
#[must_use]
pub fn effective(policy: &Policy, compiled: &Compiled, capacity: &Capacity) -> EffectivePolicy {
    let global = compiled
        .global
        .rules_v4
        .iter()
        .map(|(k, v)| rule(compiled, v4_net(*k), *v));
    let global = global.chain(
        compiled
            .global
            .rules_v6
            .iter()
            .map(|(k, v)| rule(compiled, v6_net(k), *v)),
    );
    let counts = compiled.counts();
    EffectivePolicy {
        source: policy.source.clone(),
        version: policy.version.clone(),
        global: EffectiveGlobal {
            mode: policy.global.mode,
            malformed: policy.global.malformed,
            events_per_second: policy.global.events_per_second,
            rules: global.collect(),
        },
        accounts: policy
            .accounts
            .iter()
            .zip(compiled.order.iter())
            .map(|(a, (slot, _)): (&Arc<Account>, &(u32, Fingerprint))| {
                let entries = compiled
                    .account(*slot)
                    .expect("every account of the policy is compiled");
                let limits = &entries.config.limits;
                let own = entries
                    .rules_v4()
                    .iter()
                    .map(|(k, v)| rule(compiled, v4_net(*k), *v));
                let own = own.chain(
                    entries
                        .rules_v6()
                        .iter()
                        .map(|(k, v)| rule(compiled, v6_net(k), *v)),
                );
                EffectiveAccount {
                    id: a.id.clone(),
                    slot: *slot,
                    mode: a.mode,
                    prefixes: a
                        .prefixes_v4
                        .iter()
                        .map(|n| IpNet::V4(*n))
                        .chain(a.prefixes_v6.iter().map(|n| IpNet::V6(*n)))
                        .collect(),
                    inbound: a
                        .inbound
                        .as_ref()
                        .map(|l| effective_limits(l, &limits[0].pps, &limits[0].bps)),
                    outbound: a
                        .outbound
                        .as_ref()
                        .map(|l| effective_limits(l, &limits[1].pps, &limits[1].bps)),
                    rules: own.collect(),
                }
            })
            .collect(),
        entries: Entries {
            accounts: counts.accounts,
            account_prefixes_v4: counts.account_prefixes_v4,
            account_prefixes_v6: counts.account_prefixes_v6,
            list_prefixes_v4: counts.list_prefixes_v4,
            list_prefixes_v6: counts.list_prefixes_v6,
            capacity: *capacity,
        },
    }
}

fn v4_net(k: PrefixKey<[u8; 4]>) -> IpNet {
    IpNet::new(IpAddr::V4(Ipv4Addr::from(k.addr)), k.len)
        .expect("compiled prefix lengths are valid")
}

fn v6_net(k: &PrefixKey<[u8; 16]>) -> IpNet {
    IpNet::new(IpAddr::V6(Ipv6Addr::from(k.addr)), k.len)
        .expect("compiled prefix lengths are valid")
}

fn rule(compiled: &Compiled, prefix: IpNet, value: RuleValue) -> EffectiveRule {
    let action = match Verdict::from_u8(value.action as u8) {
        Some(Verdict::Drop) => "drop",
        Some(Verdict::Monitor) => "monitor",
        _ => "allow",
    };
    let list = compiled
        .list(value.list)
        .map_or_else(String::new, |l| format!("{}/{}", l.scope, l.name));
    EffectiveRule {
        prefix,
        action,
        list,
    }
}

fn effective_limits(limits: &DirLimits, pps: &RateLimit, bps: &RateLimit) -> EffectiveLimits {
    let rate = |r: Option<crate::policy::Rate>, m: &RateLimit| {
        r.map(|r| EffectiveRate {
            rate: r.rate,
            burst: r.burst,
            interval_ns: m.interval_fp as f64 / f64::from(1u32 << 16) / f64::from(1u32 << 16),
            tolerance_ns: m.tolerance as f64 / f64::from(1u32 << mmesh_common::rate::TIME_SHIFT),
        })
    };
    EffectiveLimits {
        pps: rate(limits.pps, pps),
        bps: rate(limits.bps, bps),
        action: limits.action,
    }
}
