//! Policy messages to and from [`Policy`].
//!
//! A policy message becomes the raw schema a policy file is read into, and
//! is validated on the files' own path ([`Policy::from_message`]): one
//! validation for every source, the same words in every message. The other
//! way, a validated [`Policy`] becomes the message a control plane sends
//! (defaults resolved into the accounts, bursts explicit).

use super::proto;
use crate::policy::{
    Account, Action, DirLimits, List, ListKind, Mode, Policy, PolicyError, ReadLimits,
};

/// Validates a policy message as the file `source_name` would be.
/// `version` becomes the policy's `version`. A message names no files
/// (list prefixes are inline), so nothing is read from disk.
pub fn validate(
    message: &proto::Policy,
    version: &str,
    source_name: &str,
    limits: &ReadLimits,
) -> Result<Policy, PolicyError> {
    Policy::from_message(
        message.global.as_ref(),
        message.defaults.as_ref(),
        message.accounts.iter(),
        version,
        source_name,
        limits,
    )
}

/// The problems of a rejected policy, for a Nack: field paths and messages
/// as `mmesh-agent policy validate` words them, without file locations
/// (the document is the agent's own rendering of the message).
#[must_use]
pub fn problems(err: &PolicyError) -> Vec<proto::Problem> {
    match err {
        PolicyError::Invalid { issues, .. } => issues
            .iter()
            .map(|i| proto::Problem {
                path: i.path.clone(),
                message: i.message.clone(),
            })
            .collect(),
        other => vec![proto::Problem {
            path: String::new(),
            message: other.to_string(),
        }],
    }
}

// ---------------------------------------------------------------------------
// Policy to message

/// The message for a validated policy: what a control plane sends for a
/// policy file it read. Defaults are already in the accounts and bursts are
/// explicit, so the message says everything the policy means.
#[must_use]
pub fn to_message(policy: &Policy) -> proto::Policy {
    let (block, allow) = lists(&policy.global.lists);
    proto::Policy {
        global: Some(proto::Global {
            mode: Some(mode_word(policy.global.mode).into()),
            malformed: Some(action_word(policy.global.malformed).into()),
            events_per_second: Some(policy.global.events_per_second.to_string()),
            block,
            allow,
        }),
        defaults: None,
        accounts: policy.accounts.iter().map(|a| account_message(a)).collect(),
    }
}

/// One account's message.
#[must_use]
pub fn account_message(a: &Account) -> proto::Account {
    let (block, allow) = lists(&a.lists);
    let limits = (a.inbound.is_some() || a.outbound.is_some()).then(|| proto::Limits {
        inbound: a.inbound.as_ref().map(dir_limits),
        outbound: a.outbound.as_ref().map(dir_limits),
    });
    proto::Account {
        id: a.id.clone(),
        prefixes: a
            .prefixes_v4
            .iter()
            .map(ToString::to_string)
            .chain(a.prefixes_v6.iter().map(ToString::to_string))
            .collect(),
        mode: Some(mode_word(a.mode).into()),
        block,
        allow,
        limits,
    }
}

fn lists(lists: &[List]) -> (Vec<proto::List>, Vec<proto::List>) {
    let mut block = Vec::new();
    let mut allow = Vec::new();
    for l in lists {
        let cidrs =
            l.v4.iter()
                .map(ToString::to_string)
                .chain(l.v6.iter().map(ToString::to_string))
                .collect();
        match l.kind {
            ListKind::Block(action) => block.push(proto::List {
                name: Some(l.name.clone()),
                // The scope's mode is applied at validation: the message
                // carries the action as written, which a monitor scope
                // turns into monitor again.
                action: Some(action_word(action).into()),
                cidrs,
            }),
            ListKind::Allow => allow.push(proto::List {
                name: Some(l.name.clone()),
                action: None,
                cidrs,
            }),
        }
    }
    (block, allow)
}

fn dir_limits(d: &DirLimits) -> proto::DirLimits {
    proto::DirLimits {
        pps: d.pps.map(|r| r.rate.to_string()),
        pps_burst: d.pps.map(|r| r.burst.to_string()),
        bps: d.bps.map(|r| r.rate.to_string()),
        bps_burst: d.bps.map(|r| r.burst.to_string()),
        action: Some(action_word(d.action).into()),
    }
}

fn mode_word(mode: Mode) -> &'static str {
    match mode {
        Mode::Enforce => "enforce",
        Mode::Monitor => "monitor",
    }
}

fn action_word(action: Action) -> &'static str {
    match action {
        Action::Drop => "drop",
        Action::Monitor => "monitor",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../../../examples/policy.yaml");

    fn example() -> Policy {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
        Policy::parse(EXAMPLE, "examples/policy.yaml", &dir).expect("the example validates")
    }

    #[test]
    fn a_policy_survives_the_round_trip_through_its_message() {
        let policy = example();
        let back = validate(
            &to_message(&policy),
            policy.version.as_deref().unwrap_or_default(),
            "message",
            &ReadLimits::default(),
        )
        .expect("the message of a valid policy validates");
        assert_eq!(back.global, policy.global);
        assert_eq!(back.accounts, policy.accounts);
        assert_eq!(back.version, policy.version);
    }

    #[test]
    fn an_invalid_message_gets_every_problem_with_its_field_path() {
        let mut message = to_message(&example());
        message.accounts[0].prefixes.push("10.1.0.1/24".into());
        let limits = message.accounts[1].limits.get_or_insert_default();
        limits.outbound = Some(proto::DirLimits {
            pps: Some("lots".into()),
            ..proto::DirLimits::default()
        });
        let err =
            validate(&message, "v2", "message", &ReadLimits::default()).expect_err("two problems");
        let problems = problems(&err);
        let paths: Vec<_> = problems.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(
            paths,
            ["accounts[0].prefixes[3]", "accounts[1].limits.outbound.pps"],
            "{problems:?}"
        );
    }
}
