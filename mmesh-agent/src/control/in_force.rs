//! The control-plane policy in force: the message held (for deltas), the
//! validated policy it made, and which account owns each prefix — so that a
//! delta that changes a few accounts is validated by validating those
//! accounts, not the whole policy again.
//!
//! A delta that changes only accounts validates its upserted accounts on
//! the files' own path (a small document with the held `defaults` and
//! those accounts), then checks what involves the other accounts: prefix
//! ownership. Ids are unique by construction (the held index). Capacity is
//! checked by the compiler, as for every policy. A delta that replaces
//! `global` or `defaults` is validated whole.
//!
//! Both indexes (ids, prefix owners) are the ones the validator built to
//! find duplicates, kept with the deltas' changes beside them
//! ([`layered`]): building them again took longer than the validation.

use std::sync::Arc;

use ipnet::IpNet;

use super::{
    convert,
    held::{DeltaError, Held, replay},
    layered::{self, Base},
    packed::Packer,
    proto, wire,
};
use crate::policy::{Account, Index, Policy, PolicyError, ReadLimits, quote};

/// A validated control-plane policy and what it was made from.
#[derive(Clone, Debug)]
pub struct InForce {
    pub held: Held,
    /// Shared with the enforcer, which keeps the policy in force.
    pub policy: Arc<Policy>,
    /// The account owning each account prefix.
    owners: layered::Owners,
}

/// Why a message cannot become the policy in force.
#[derive(Debug)]
pub enum Refusal {
    /// A delta against another version than the one held.
    Base { held: String, base: String },
    /// Every problem, as `policy validate` words them; `full` names the map
    /// too small for the policy, if that is one of them (for
    /// `mmesh_map_inserts_refused_total`).
    Problems {
        problems: Vec<proto::Problem>,
        full: Option<&'static str>,
    },
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Base { held, base } => {
                write!(f, "it is against version {base:?}, but {held:?} is held")
            }
            Self::Problems { problems, .. } => f.write_str(&describe(problems)),
        }
    }
}

/// Problems on one line: `path: message; …`.
#[must_use]
pub fn describe(problems: &[proto::Problem]) -> String {
    let text: Vec<String> = problems
        .iter()
        .map(|p| format!("{}: {}", p.path, p.message))
        .collect();
    text.join("; ")
}

impl From<DeltaError> for Refusal {
    fn from(e: DeltaError) -> Self {
        match e {
            DeltaError::Base { held, base } => Self::Base { held, base },
            DeltaError::Problems(problems) => Self::Problems {
                problems,
                full: None,
            },
        }
    }
}

impl From<&PolicyError> for Refusal {
    fn from(e: &PolicyError) -> Self {
        Self::Problems {
            problems: convert::problems(e),
            full: e.full_map(),
        }
    }
}

/// How a policy from the control plane is named in messages.
fn source_name(version: &str) -> String {
    format!(
        "control-plane version {}",
        crate::sink::escape_controls(version)
    )
}

impl InForce {
    /// Validates a whole policy message, decoded: what holding it makes.
    /// (A received snapshot and the last-known-good file go through
    /// [`InForce::received`], their accounts still encoded.)
    pub fn snapshot(
        version: String,
        message: proto::Policy,
        limits: &ReadLimits,
    ) -> Result<Self, PolicyError> {
        // Each account is encoded for holding as it is turned into the
        // validator's raw schema, and dropped then: the decoded message
        // (67 MB at 100,000 accounts) goes while the raw schema grows,
        // instead of staying beside it and the validated policy.
        let proto::Policy {
            global,
            defaults,
            accounts,
        } = message;
        let accounts = accounts.into_iter().map(|account| {
            let encoded = prost::Message::encode_to_vec(&account);
            (account, encoded)
        });
        Self::whole(version, (global, defaults), accounts, limits)
    }

    /// Validates a snapshot as received, its accounts still encoded: each
    /// is decoded as it is turned into the raw schema, and its bytes are
    /// what is held ([`wire`]). An account that does not decode refuses
    /// the snapshot, named by its position.
    pub fn received(
        version: String,
        policy: wire::Policy,
        limits: &ReadLimits,
    ) -> Result<Self, PolicyError> {
        let wire::Policy {
            global,
            defaults,
            accounts,
        } = policy;
        let mut undecodable = None;
        let decoded =
            accounts
                .into_iter()
                .enumerate()
                .map(|(i, bytes)| match wire::account(&bytes) {
                    Ok(account) => (account, bytes),
                    Err(e) => {
                        undecodable.get_or_insert((i, e));
                        (proto::Account::default(), bytes::Bytes::new())
                    }
                });
        let name = source_name(&version);
        // The message's bytes go once the accounts are read (and packed),
        // before they are validated.
        let whole = Self::whole(version, (global, defaults), decoded, limits);
        match undecodable {
            Some((i, e)) => Err(PolicyError::Syntax {
                source_name: name,
                format: "protobuf",
                message: format!("accounts[{i}]: {e}"),
            }),
            None => whole,
        }
    }

    /// What holding a whole policy makes: its accounts, each with its
    /// encoding (packed as they come), validated.
    fn whole(
        version: String,
        (global, defaults): (Option<proto::Global>, Option<proto::Defaults>),
        accounts: impl ExactSizeIterator<Item = (proto::Account, impl AsRef<[u8]>)>,
        limits: &ReadLimits,
    ) -> Result<Self, PolicyError> {
        let mut encoded = Packer::default();
        let validated = Policy::from_message_indexed(
            global.as_ref(),
            defaults.as_ref(),
            accounts.map(|(account, bytes)| {
                encoded.push(bytes.as_ref());
                account
            }),
            &version,
            &source_name(&version),
            limits,
        );
        let (policy, index) = validated?;
        let (policy, ids, owners) = indexed(policy, index);
        let held = Held::encoded(version, (global, defaults), encoded.finish(), ids);
        Ok(Self {
            held,
            policy,
            owners,
        })
    }

    /// Validates a whole held message (a delta of `global` or `defaults`).
    pub fn validate(mut held: Held, limits: &ReadLimits) -> Result<Self, PolicyError> {
        let (policy, index) = Policy::from_message_indexed(
            held.global(),
            held.defaults(),
            held.accounts(),
            &held.version,
            &source_name(&held.version),
            limits,
        )?;
        let (policy, ids, owners) = indexed(policy, index);
        held.index = ids;
        Ok(Self {
            held,
            policy,
            owners,
        })
    }

    /// What `delta` on top of this makes, validated.
    pub fn delta(&self, delta: &proto::Delta, limits: &ReadLimits) -> Result<Self, Refusal> {
        let (mut held, steps) = self.held.with_delta(delta)?;
        if delta.global.is_some() || delta.defaults.is_some() {
            return Self::validate(held, limits).map_err(|e| Refusal::from(&e));
        }
        // The upserted accounts, validated as accounts of a policy with the
        // held defaults.
        let name = source_name(&delta.version);
        let upserts = Policy::from_message(
            None,
            held.defaults(),
            delta.upsert_accounts.iter(),
            &delta.version,
            &name,
            limits,
        )
        .map_err(|e| Refusal::Problems {
            problems: upsert_paths(convert::problems(&e)),
            full: e.full_map(),
        })?
        .accounts;
        // Prefixes owned by accounts the delta leaves alone.
        let leaving: std::collections::HashSet<&str> = delta
            .remove_accounts
            .iter()
            .map(String::as_str)
            .chain(delta.upsert_accounts.iter().map(|a| a.id.as_str()))
            .collect();
        let mut problems = Vec::new();
        for (k, account) in upserts.iter().enumerate() {
            for net in prefixes(account) {
                if let Some(owner) = self.owners.get(net)
                    && owner.id != account.id
                    && !leaving.contains(owner.id.as_str())
                {
                    problems.push(proto::Problem {
                        path: format!("upsert_accounts[{k}].prefixes"),
                        message: format!(
                            "prefix {net} is also owned by account {}; an address belongs to one account (nested prefixes are allowed, the most specific wins)",
                            quote(&owner.id)
                        ),
                    });
                }
            }
        }
        if !problems.is_empty() {
            return Err(Refusal::Problems {
                problems,
                full: None,
            });
        }
        let mut policy = Policy {
            source: name,
            version: Some(delta.version.clone()),
            global: self.policy.global.clone(),
            accounts: self.policy.accounts.clone(),
        };
        let mut owners = self.owners.clone();
        replay(&mut policy.accounts, &steps, &upserts, |gone| {
            for net in prefixes(&gone) {
                if owners.get(net).is_some_and(|o| o.id == gone.id) {
                    owners.remove(net);
                }
            }
        });
        for account in &upserts {
            for net in prefixes(account) {
                owners.insert(net, Arc::clone(account));
            }
        }
        let policy = Arc::new(policy);
        if layered::due(
            held.index.changes() + owners.changes(),
            policy.accounts.len(),
        ) {
            let base = Base::of(Arc::clone(&policy));
            held.index = layered::Ids::new(Arc::clone(&base));
            owners = layered::Owners::new(base);
        }
        Ok(Self {
            held,
            policy,
            owners,
        })
    }
}

/// A validated policy, shared, and the indexes kept for its deltas: the
/// validator's `index` of it.
fn indexed(policy: Policy, index: Index) -> (Arc<Policy>, layered::Ids, layered::Owners) {
    let policy = Arc::new(policy);
    let base = Base::new(Arc::clone(&policy), index);
    (
        policy,
        layered::Ids::new(Arc::clone(&base)),
        layered::Owners::new(base),
    )
}

fn prefixes(a: &Account) -> impl Iterator<Item = IpNet> + '_ {
    a.prefixes_v4
        .iter()
        .map(|n| IpNet::V4(*n))
        .chain(a.prefixes_v6.iter().map(|n| IpNet::V6(*n)))
}

/// Problems of the upsert document, with its `accounts[i]` named as the
/// delta's `upsert_accounts[i]`.
fn upsert_paths(problems: Vec<proto::Problem>) -> Vec<proto::Problem> {
    problems
        .into_iter()
        .map(|mut p| {
            if let Some(rest) = p.path.strip_prefix("accounts") {
                p.path = format!("upsert_accounts{rest}");
            }
            p
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn account(id: &str, prefixes: &[&str]) -> proto::Account {
        proto::Account {
            id: id.into(),
            prefixes: prefixes.iter().map(|p| (*p).into()).collect(),
            ..proto::Account::default()
        }
    }

    fn in_force() -> InForce {
        InForce::snapshot("v1".into(), message(), &ReadLimits::default()).expect("valid")
    }

    fn message() -> proto::Policy {
        proto::Policy {
            defaults: Some(proto::Defaults {
                mode: None,
                limits: Some(proto::Limits {
                    inbound: Some(proto::DirLimits {
                        pps: Some("1k".into()),
                        ..proto::DirLimits::default()
                    }),
                    outbound: None,
                }),
            }),
            accounts: vec![
                account("a", &["10.0.0.1"]),
                account("b", &["10.0.0.2", "fd00::2"]),
                account("c", &["10.0.0.3"]),
            ],
            ..proto::Policy::default()
        }
    }

    /// A snapshot as received (accounts as their bytes) is held as the same
    /// message decoded would be; an account that does not decode refuses it.
    #[test]
    fn a_received_snapshot_is_held_as_decoded_and_refused_for_an_undecodable_account() {
        use prost::Message as _;

        let bytes = bytes::Bytes::from(message().encode_to_vec());
        let wire = wire::Policy::decode(bytes).expect("decodes");
        let received =
            InForce::received("v1".into(), wire.clone(), &ReadLimits::default()).expect("valid");
        let decoded = in_force();
        assert_eq!(received.policy, decoded.policy);
        assert_eq!(
            received.held.last_known_good(),
            decoded.held.last_known_good()
        );

        let mut broken = wire;
        broken.accounts[1] = bytes::Bytes::from_static(&[0x0a, 0x05, b'b']);
        let Err(err) = InForce::received("v2".into(), broken, &ReadLimits::default()) else {
            panic!("refused");
        };
        let text = err.to_string();
        assert!(
            text.contains("control-plane version v2 is not valid protobuf")
                && text.contains("accounts[1]: "),
            "{text}"
        );
    }

    fn delta(upserts: Vec<proto::Account>, removes: &[&str]) -> proto::Delta {
        proto::Delta {
            version: "v2".into(),
            base_version: "v1".into(),
            upsert_accounts: upserts,
            remove_accounts: removes.iter().map(|r| (*r).into()).collect(),
            ..proto::Delta::default()
        }
    }

    /// The incremental result is what validating the whole new message
    /// gives: same accounts (fingerprints included), same order.
    #[test]
    fn a_delta_validates_to_what_the_whole_message_would() {
        let base = in_force();
        let d = delta(
            vec![account("b", &["10.0.0.20"]), account("d", &["10.0.0.1"])],
            &["a"],
        );
        let next = base.delta(&d, &ReadLimits::default()).expect("valid delta");
        let whole = InForce::validate(next.held.clone(), &ReadLimits::default()).expect("valid");
        assert_eq!(next.policy.accounts, whole.policy.accounts);
        assert_eq!(next.policy.global, whole.policy.global);
        let ids: Vec<&str> = next.policy.accounts.iter().map(|a| a.id.as_str()).collect();
        assert_eq!(ids, ["c", "b", "d"]);
        // The defaults reached the new account.
        assert_eq!(
            next.policy.accounts[2]
                .inbound
                .and_then(|l| l.pps)
                .map(|r| r.rate),
            Some(1000)
        );
        // b's old prefixes are free again, d owns a's.
        let again = next
            .delta(
                &proto::Delta {
                    version: "v3".into(),
                    base_version: "v2".into(),
                    upsert_accounts: vec![account("e", &["fd00::2"])],
                    ..proto::Delta::default()
                },
                &ReadLimits::default(),
            )
            .expect("fd00::2 is free since v2");
        assert_eq!(again.policy.accounts.len(), 4);
    }

    #[test]
    fn a_delta_is_refused_for_a_prefix_another_account_keeps_or_a_bad_value() {
        let base = in_force();
        let mut bad = account("d", &["10.0.0.2"]);
        bad.mode = Some("loud".into());
        let Err(Refusal::Problems { problems, .. }) =
            base.delta(&delta(vec![bad], &[]), &ReadLimits::default())
        else {
            panic!("refused");
        };
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].path, "upsert_accounts[0].mode");
        let Err(Refusal::Problems { problems, .. }) = base.delta(
            &delta(vec![account("d", &["10.0.0.2"])], &[]),
            &ReadLimits::default(),
        ) else {
            panic!("refused");
        };
        assert_eq!(problems[0].path, "upsert_accounts[0].prefixes");
        assert!(problems[0].message.contains("\"b\""), "{problems:?}");
        // Removing b in the same delta frees its prefix.
        assert!(
            base.delta(
                &delta(vec![account("d", &["10.0.0.2"])], &["b"]),
                &ReadLimits::default()
            )
            .is_ok()
        );
    }

    /// Whether the indexes kept for deltas answer as indexes built afresh
    /// for the policy would.
    fn indexes_are_exact(f: &InForce) {
        let fresh = Base::of(Arc::clone(&f.policy));
        let (ids, owners) = (
            layered::Ids::new(Arc::clone(&fresh)),
            layered::Owners::new(fresh),
        );
        for i in 0..40 {
            let id = format!("a{i}");
            assert_eq!(f.held.index.get(&id), ids.get(&id), "{id}");
        }
        for i in 0..40 {
            for net in [format!("10.0.0.{i}/32"), format!("fd00::{i}/128")] {
                let net: IpNet = net.parse().unwrap();
                assert_eq!(
                    f.owners.get(net).map(|o| &o.id),
                    owners.get(net).map(|o| &o.id),
                    "{net}"
                );
            }
        }
    }

    /// Random deltas (accounts removed, replaced, added, prefixes moved
    /// between them; the indexes built again every few changes): each is
    /// accepted exactly when the whole message it makes is valid, to the
    /// same accounts, and the indexes stay exact.
    #[test]
    fn random_deltas_keep_the_indexes_exact() {
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n) as usize
        };
        let mut state = in_force();
        let mut accepted = 0;
        for step in 0..300 {
            let held: Vec<String> = state.held.accounts().map(|a| a.id).collect();
            let mut removes = Vec::new();
            for _ in 0..next(3) {
                if !held.is_empty() {
                    removes.push(held[next(held.len() as u64)].clone());
                }
            }
            removes.dedup();
            let upserts: Vec<proto::Account> = (0..next(3))
                .map(|_| {
                    let prefixes: Vec<String> = (0..=next(3))
                        .map(|_| {
                            let i = next(40);
                            if next(2) == 0 {
                                format!("10.0.0.{i}")
                            } else {
                                format!("fd00::{i}")
                            }
                        })
                        .collect();
                    let prefixes: Vec<&str> = prefixes.iter().map(String::as_str).collect();
                    account(&format!("a{}", next(40)), &prefixes)
                })
                .collect();
            let d = proto::Delta {
                version: format!("v{}", step + 2),
                base_version: state.held.version.clone(),
                upsert_accounts: upserts,
                remove_accounts: removes,
                ..proto::Delta::default()
            };
            let whole = state
                .held
                .with_delta(&d)
                .ok()
                .and_then(|(held, _)| InForce::validate(held, &ReadLimits::default()).ok());
            match (state.delta(&d, &ReadLimits::default()), whole) {
                (Ok(next), Some(whole)) => {
                    assert_eq!(next.policy.accounts, whole.policy.accounts, "{d:?}");
                    indexes_are_exact(&next);
                    state = next;
                    accepted += 1;
                }
                (Err(_), None) => {}
                (delta, whole) => panic!(
                    "delta {:?}, whole message {:?}: {d:?}",
                    delta.map(|_| ()),
                    whole.map(|_| ())
                ),
            }
        }
        assert!(accepted > 50, "{accepted} deltas accepted");
    }
}
