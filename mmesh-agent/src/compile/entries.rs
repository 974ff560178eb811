//! The map entries of the global lists and of one account.

use std::{collections::BTreeMap, sync::Arc};

use mmesh_common::{
    Verdict,
    maps::{
        ACCOUNT_ACTIVE, ACCOUNT_RULES_V4, ACCOUNT_RULES_V6, AccountConfig,
        DirLimits as MapDirLimits, GEN_PREFIXES_V4, GEN_PREFIXES_V6, GEN_RULES_V4, GEN_RULES_V6,
        RateLimit, RuleValue,
    },
};

use super::{
    AccountEntries, AccountLists, Capacity, CompileError, Counts, GlobalEntries, ListInfo,
    MAX_ACCOUNT_LISTS, PrefixKey, account_list_id, resolve::Resolver,
};
use crate::{
    policy::{Account, Action, DirLimits, List},
    stride::Stride,
};

/// The `GenConfig` flags: which lookups the programs can skip.
pub(super) fn generation_flags(global: &GlobalEntries, counts: &Counts) -> u32 {
    let mut flags = 0;
    if !global.rules_v4.is_empty() {
        flags |= GEN_RULES_V4;
    }
    if !global.rules_v6.is_empty() {
        flags |= GEN_RULES_V6;
    }
    if counts.wide_v4 > 0 {
        flags |= GEN_PREFIXES_V4;
    }
    if counts.wide_v6 > 0 {
        flags |= GEN_PREFIXES_V6;
    }
    flags
}

pub(super) fn compile_global(
    lists: &[List],
    capacity: &Capacity,
) -> Result<GlobalEntries, CompileError> {
    if lists.len() > mmesh_common::stride::MAX_PAYLOAD as usize {
        return Err(CompileError::OverLimit {
            what: "global lists",
            needed: lists.len(),
            limit: mmesh_common::stride::MAX_PAYLOAD,
            remedy: "merge lists",
        });
    }
    let mut infos = Vec::with_capacity(lists.len());
    let resolver = Resolver::new(lists, |index, list| {
        infos.push(ListInfo {
            scope: "global".to_owned(),
            name: list.name.clone(),
        });
        index + 1
    });
    let (v4, v6) = resolver.resolve();
    let rules_v4: BTreeMap<_, _> = v4
        .into_iter()
        .map(|(addr, len, v)| (PrefixKey { addr, len }, v))
        .collect();
    let rules_v6: BTreeMap<_, _> = v6
        .into_iter()
        .map(|(addr, len, v)| (PrefixKey { addr, len }, v))
        .collect();
    let flat: Vec<(u32, u8, RuleValue)> = rules_v4
        .iter()
        .map(|(k, v)| (u32::from_be_bytes(k.addr), k.len, *v))
        .collect();
    Ok(GlobalEntries {
        source: Some(lists.to_vec()),
        stride: Stride::build(&flat, capacity.stride_chunks),
        rules_v4,
        rules_v6,
        lists: infos,
    })
}

pub(super) fn compile_account(
    account: &Arc<Account>,
    slot: u32,
) -> Result<AccountEntries, CompileError> {
    if account.lists.len() > MAX_ACCOUNT_LISTS {
        return Err(CompileError::OverLimit {
            what: "lists in one account",
            needed: account.lists.len(),
            limit: MAX_ACCOUNT_LISTS as u32,
            remedy: "merge the account's lists",
        });
    }
    let mut infos = Vec::with_capacity(account.lists.len());
    let resolver = Resolver::new(&account.lists, |index, list| {
        infos.push(ListInfo {
            scope: account.id.clone(),
            name: list.name.clone(),
        });
        account_list_id(slot, index)
    });
    let (v4, v6) = resolver.resolve();
    // The account's hosts (`true`) or its wider prefixes.
    let v4_nets = |hosts: bool| {
        account
            .prefixes_v4
            .iter()
            .filter(move |net| (net.prefix_len() == 32) == hosts)
    };
    let v6_nets = |hosts: bool| {
        account
            .prefixes_v6
            .iter()
            .filter(move |net| (net.prefix_len() == 128) == hosts)
    };
    let mut out = AccountEntries {
        id: Some(account.id.as_str().into()),
        // (Two passes over a few prefixes each cost less than a vector to
        // sort them into.)
        hosts_v4: v4_nets(true).map(|net| net.addr().octets()).collect(),
        hosts_v6: v6_nets(true).map(|net| net.addr().octets()).collect(),
        prefixes_v4: v4_nets(false)
            .map(|net| PrefixKey {
                addr: net.addr().octets(),
                len: net.prefix_len(),
            })
            .collect(),
        prefixes_v6: v6_nets(false)
            .map(|net| PrefixKey {
                addr: net.addr().octets(),
                len: net.prefix_len(),
            })
            .collect(),
        lists: AccountLists {
            rules_v4: v4
                .into_iter()
                .map(|(addr, len, v)| (PrefixKey { addr, len }, v))
                .collect(),
            rules_v6: v6
                .into_iter()
                .map(|(addr, len, v)| (PrefixKey { addr, len }, v))
                .collect(),
            names: infos.into(),
        }
        .boxed(),
        ..AccountEntries::default()
    };
    let mut flags = ACCOUNT_ACTIVE;
    if !out.rules_v4().is_empty() {
        flags |= ACCOUNT_RULES_V4;
    }
    if !out.rules_v6().is_empty() {
        flags |= ACCOUNT_RULES_V6;
    }
    out.config = AccountConfig {
        flags,
        // The datapath's: the generation in which the slot got its account.
        epoch: 0,
        limits: [
            map_limits(account.inbound.as_ref()),
            map_limits(account.outbound.as_ref()),
        ],
    };
    Ok(out)
}

pub(super) fn check_capacity(c: &Counts, capacity: &Capacity) -> Result<(), CompileError> {
    let checks = [
        (
            c.account_prefixes_v4,
            capacity.account_prefixes,
            "IPv4 account prefixes",
            "account_prefixes_v4",
            "--max-account-prefixes",
        ),
        (
            c.account_prefixes_v6,
            capacity.account_prefixes,
            "IPv6 account prefixes",
            "account_prefixes_v6",
            "--max-account-prefixes",
        ),
        (
            c.list_prefixes_v4,
            capacity.list_prefixes,
            "IPv4 list prefixes",
            "list_prefixes_v4",
            "--max-list-prefixes",
        ),
        (
            c.list_prefixes_v6,
            capacity.list_prefixes,
            "IPv6 list prefixes",
            "list_prefixes_v6",
            "--max-list-prefixes",
        ),
    ];
    for (needed, cap, what, map, flag) in checks {
        if needed > cap as usize {
            return Err(CompileError::OverCapacity {
                what,
                map,
                needed,
                capacity: cap,
                flag,
            });
        }
    }
    Ok(())
}

pub(super) const fn verdict_code(action: Action) -> u32 {
    match action {
        Action::Drop => Verdict::Drop as u32,
        Action::Monitor => Verdict::Monitor as u32,
    }
}

pub(super) fn map_limits(limits: Option<&DirLimits>) -> MapDirLimits {
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
