//! A policy message from the control plane (`proto/`), turned into the raw
//! schema directly and validated as a file is: the same checks and words,
//! without writing and parsing a document (which took longer than the
//! validation itself at 100,000 accounts).

use std::{borrow::Borrow, path::Path};

use super::{
    Index, Policy, PolicyError, ReadLimits,
    raw::{
        At, Extras, RawAccount, RawAccounts, RawDefaults, RawDirLimits, RawGlobal, RawLimits,
        RawList, RawPolicy, Scalar,
    },
    read::Reads,
    validate::Validator,
};
use crate::control::proto;

impl Policy {
    /// Validates a policy message, made of its parts, as the file
    /// `source_name` would be; `version` becomes its `version`. A message
    /// names no list files, so nothing is read from disk.
    pub fn from_message(
        global: Option<&proto::Global>,
        defaults: Option<&proto::Defaults>,
        accounts: impl Iterator<Item = impl Borrow<proto::Account>>,
        version: &str,
        source_name: &str,
        limits: &ReadLimits,
    ) -> Result<Self, PolicyError> {
        Self::from_message_indexed(global, defaults, accounts, version, source_name, limits)
            .map(|(policy, _)| policy)
    }

    /// [`Policy::from_message`], and the validator's indexes of the
    /// accounts (by id and by prefix), which hold for the message's order.
    pub fn from_message_indexed(
        global: Option<&proto::Global>,
        defaults: Option<&proto::Defaults>,
        accounts: impl Iterator<Item = impl Borrow<proto::Account>>,
        version: &str,
        source_name: &str,
        limits: &ReadLimits,
    ) -> Result<(Self, Index), PolicyError> {
        let raw = RawPolicy {
            version: Some(scalar(version)),
            global: global.map(raw_global),
            defaults: defaults.map(|d| RawDefaults {
                mode: d.mode.as_deref().map(scalar),
                limits: d.limits.as_ref().map(|l| Box::new(raw_limits(l))),
                extra: Extras::default(),
            }),
            accounts: Some(raw_accounts(accounts, limits)),
            extra: Extras::default(),
        };
        let mut reads = Reads::default();
        let mut v = Validator {
            source: source_name,
            base_dir: Path::new("/nonexistent"),
            limits,
            reads: &mut reads,
            issues: Vec::new(),
        };
        let (policy, index) = v.policy_indexed(raw);
        if v.issues.is_empty() {
            Ok((policy, index))
        } else {
            Err(PolicyError::Invalid {
                source_name: source_name.to_owned(),
                issues: v.issues,
            })
        }
    }
}

/// A scalar without a location: problems are named by their field path.
fn scalar(text: &str) -> At<Scalar> {
    At {
        value: Scalar::new(text),
        line: 0,
        column: 0,
    }
}

fn opt(text: Option<&String>) -> Option<At<Scalar>> {
    text.map(|t| scalar(t))
}

fn list(l: &proto::List) -> RawList {
    RawList {
        name: opt(l.name.as_ref()),
        action: opt(l.action.as_ref()),
        cidrs: Some(l.cidrs.iter().map(|c| scalar(c)).collect()),
        file: None,
        extra: Extras::default(),
    }
}

fn lists(l: &[proto::List]) -> Option<Vec<RawList>> {
    (!l.is_empty()).then(|| l.iter().map(list).collect())
}

fn raw_global(g: &proto::Global) -> RawGlobal {
    RawGlobal {
        mode: opt(g.mode.as_ref()),
        malformed: opt(g.malformed.as_ref()),
        events_per_second: opt(g.events_per_second.as_ref()),
        block: lists(&g.block),
        allow: lists(&g.allow),
        extra: Extras::default(),
    }
}

fn raw_dir(d: &proto::DirLimits) -> RawDirLimits {
    RawDirLimits::new([
        opt(d.pps.as_ref()),
        opt(d.pps_burst.as_ref()),
        opt(d.bps.as_ref()),
        opt(d.bps_burst.as_ref()),
        opt(d.action.as_ref()),
    ])
}

fn raw_limits(l: &proto::Limits) -> RawLimits {
    RawLimits {
        inbound: l.inbound.as_ref().map(|d| Box::new(raw_dir(d))),
        outbound: l.outbound.as_ref().map(|d| Box::new(raw_dir(d))),
        extra: Extras::default(),
    }
}

/// The accounts, kept within the bounds a file's are kept in (past them
/// only counted), so that a message far over capacity is refused as a file
/// would be.
fn raw_accounts(
    accounts: impl Iterator<Item = impl Borrow<proto::Account>>,
    limits: &ReadLimits,
) -> RawAccounts {
    let max_accounts = limits.max_accounts.map_or(usize::MAX, |n| n as usize);
    let max_raw_prefixes = limits
        .max_account_prefixes
        .map_or(usize::MAX, |n| 2 * n as usize);
    // The room for all at once: grown by doubling, the accounts of a
    // 100,000-account snapshot left 15 MB of outgrown vectors behind. (At
    // most a million ahead: a message of empty accounts has millions.)
    let mut out = RawAccounts {
        kept: Vec::with_capacity(accounts.size_hint().0.min(max_accounts).min(1 << 20)),
        ..RawAccounts::default()
    };
    for a in accounts {
        let a = a.borrow();
        out.total += 1;
        if out.kept.len() >= max_accounts || out.raw_prefixes > max_raw_prefixes {
            continue;
        }
        out.raw_prefixes += a.prefixes.len();
        out.kept.push(RawAccount {
            id: Some(scalar(&a.id)),
            prefixes: Some(a.prefixes.iter().map(|p| scalar(p)).collect()),
            mode: opt(a.mode.as_ref()).map(Box::new),
            block: lists(&a.block).map(Vec::into_boxed_slice),
            allow: lists(&a.allow).map(Vec::into_boxed_slice),
            limits: a.limits.as_ref().map(|l| Box::new(raw_limits(l))),
            extra: Extras::default(),
        });
    }
    out
}
