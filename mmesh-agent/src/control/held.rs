//! The policy message in force from the control plane, and deltas on it.
//!
//! Accounts are kept encoded and packed ([`Packed`], a persistent vector of
//! compressed blocks), and indexed by the validator's index of ids with the
//! deltas' changes beside it ([`layered::Ids`]), so that the next state
//! after a one-account delta shares all but that account's block, not a
//! copy of 100,000. At 100,000 accounts, decoded they took 75 MB, encoded
//! 20 MB, packed 3 MB. They are decoded only to be validated again whole (a
//! delta of `global` or `defaults`).

use std::collections::HashMap;

use prost::Message as _;

use super::{layered, packed::Packed, proto};

/// An account as held (encoded by prost). (A default, invalid account, if it
/// ever failed: validation refuses it, never the agent.)
fn decode(bytes: &[u8]) -> proto::Account {
    proto::Account::decode(bytes).unwrap_or_default()
}

/// The last policy message the agent applied from the control plane, by
/// version: what a [`proto::Delta`] is applied to.
#[derive(Clone, Debug)]
pub struct Held {
    pub version: String,
    global: Option<proto::Global>,
    defaults: Option<proto::Defaults>,
    /// Persistent: a delta's copy shares all but the blocks it changes (a
    /// vector of 100,000 was copied, 1.6 MB, for every delta).
    accounts: Packed,
    /// Account id to its index in `accounts` (the validated policy's
    /// accounts are in the same order).
    pub(super) index: layered::Ids,
}

/// What a delta did to the accounts, in order: a validated policy whose
/// accounts are in the same order as the held message's stays so by doing
/// the same.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// `swap_remove` at this index.
    Remove(usize),
    /// The account at this index replaced by the delta's upsert number `.1`.
    Replace(usize, usize),
    /// The delta's upsert number `.0` added at the end.
    Push(usize),
}

/// Why a delta cannot be applied to what is held.
#[derive(Debug, PartialEq, Eq)]
pub enum DeltaError {
    /// The delta's base is another version: a snapshot is needed.
    Base { held: String, base: String },
    /// The delta contradicts itself or its base.
    Problems(Vec<proto::Problem>),
}

impl Held {
    /// What a snapshot makes the agent hold: its `global` and `defaults`,
    /// its accounts encoded and packed, and the index of their ids (the
    /// validator's, of the validated policy).
    #[must_use]
    pub fn encoded(
        version: String,
        (global, defaults): (Option<proto::Global>, Option<proto::Defaults>),
        accounts: Packed,
        index: layered::Ids,
    ) -> Self {
        Self {
            version,
            global,
            defaults,
            accounts,
            index,
        }
    }

    /// The whole policy message (a copy: for the last-known-good file).
    #[must_use]
    pub fn message(&self) -> proto::Policy {
        proto::Policy {
            global: self.global.clone(),
            defaults: self.defaults.clone(),
            accounts: self.accounts().collect(),
        }
    }

    /// The encoded [`proto::LastKnownGood`] of what is held: the bytes of
    /// `LastKnownGood { version, policy: Some(self.message()) }`, written
    /// from the shared accounts (a copy of a 100,000-account message first
    /// took 75 MB).
    #[must_use]
    pub fn last_known_good(&self) -> Vec<u8> {
        let mut buf = Vec::new();
        let written = self.write_last_known_good(&mut |piece| {
            buf.extend_from_slice(piece);
            Ok(())
        });
        debug_assert!(written.is_ok(), "a vector takes every piece");
        buf
    }

    /// [`Held::last_known_good`] in pieces, each passed to `out` (the
    /// accounts unpacked a block at a time): for writing it to a file
    /// without a copy of the whole, 20 MB at 100,000 accounts.
    pub fn write_last_known_good(
        &self,
        out: &mut dyn FnMut(&[u8]) -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        use prost::encoding::{self, WireType};
        // Field numbers of proto/mmesh/v1/control.proto.
        let global = self
            .global
            .as_ref()
            .map_or(0, |g| encoding::message::encoded_len(1, g));
        let defaults = self
            .defaults
            .as_ref()
            .map_or(0, |d| encoding::message::encoded_len(2, d));
        let accounts: usize = self
            .accounts
            .iter()
            .map(|a| encoding::key_len(3) + encoding::encoded_len_varint(a.len() as u64) + a.len())
            .sum();
        let policy = global + defaults + accounts;
        let mut head = Vec::with_capacity(global + defaults + 64);
        if !self.version.is_empty() {
            encoding::string::encode(1, &self.version, &mut head);
        }
        encoding::encode_key(2, WireType::LengthDelimited, &mut head);
        encoding::encode_varint(policy as u64, &mut head);
        if let Some(g) = &self.global {
            encoding::message::encode(1, g, &mut head);
        }
        if let Some(d) = &self.defaults {
            encoding::message::encode(2, d, &mut head);
        }
        out(&head)?;
        for a in self.accounts.iter() {
            head.clear();
            encoding::encode_key(3, WireType::LengthDelimited, &mut head);
            encoding::encode_varint(a.len() as u64, &mut head);
            out(&head)?;
            out(&a)?;
        }
        Ok(())
    }

    #[must_use]
    pub fn global(&self) -> Option<&proto::Global> {
        self.global.as_ref()
    }

    #[must_use]
    pub fn defaults(&self) -> Option<&proto::Defaults> {
        self.defaults.as_ref()
    }

    /// The accounts, in order (decoded one by one).
    #[must_use]
    pub fn accounts(&self) -> impl ExactSizeIterator<Item = proto::Account> {
        self.accounts.iter().map(|a| decode(&a))
    }

    /// What holding `delta` on top of this would be, and the steps that
    /// took the accounts there. Nothing changes until the caller keeps the
    /// result (after the policy is in force). The index of the result
    /// still compares through the validated policy of this one's base:
    /// the caller builds it again when it is due ([`layered::due`]).
    pub fn with_delta(&self, delta: &proto::Delta) -> Result<(Self, Vec<Step>), DeltaError> {
        if delta.base_version != self.version {
            return Err(DeltaError::Base {
                held: self.version.clone(),
                base: delta.base_version.clone(),
            });
        }
        let mut problems = Vec::new();
        let mut next = self.clone();
        let mut steps =
            Vec::with_capacity(delta.remove_accounts.len() + delta.upsert_accounts.len());
        next.version.clone_from(&delta.version);
        let mut seen = HashMap::new();
        for (i, id) in delta.remove_accounts.iter().enumerate() {
            let path = format!("remove_accounts[{i}]");
            if seen.insert(id.as_str(), path.clone()).is_some() {
                problems.push(problem(path, format!("account {id:?} is named twice")));
            } else if let Some(at) = next.remove(id) {
                steps.push(Step::Remove(at));
            } else {
                problems.push(problem(
                    path,
                    format!("account {id:?} is not in version {:?}", self.version),
                ));
            }
        }
        for (k, account) in delta.upsert_accounts.iter().enumerate() {
            let path = format!("upsert_accounts[{k}].id");
            if let Some(first) = seen.insert(account.id.as_str(), path.clone()) {
                problems.push(problem(
                    path,
                    format!("account {:?} is also in {first}", account.id),
                ));
                continue;
            }
            steps.push(next.upsert(account, k));
        }
        if let Some(global) = &delta.global {
            next.global = Some(global.clone());
        }
        if let Some(defaults) = &delta.defaults {
            next.defaults = Some(defaults.clone());
        }
        if problems.is_empty() {
            Ok((next, steps))
        } else {
            Err(DeltaError::Problems(problems))
        }
    }

    fn upsert(&mut self, account: &proto::Account, k: usize) -> Step {
        if let Some(i) = self.index.get(&account.id) {
            self.accounts.set(i, &account.encode_to_vec());
            Step::Replace(i, k)
        } else {
            self.index.insert(account.id.clone(), self.accounts.len());
            self.accounts.push_back(&account.encode_to_vec());
            Step::Push(k)
        }
    }

    fn remove(&mut self, id: &str) -> Option<usize> {
        let i = self.index.get(id)?;
        self.index.remove(id);
        // As `Vec::swap_remove`: the last account takes its place.
        let last = self.accounts.pop_back()?;
        if i < self.accounts.len() {
            self.accounts.set(i, &last);
            self.index.insert(decode(&last).id, i);
        }
        Some(i)
    }
}

/// Does `steps` to `items`, whose order is the held accounts' order before
/// the delta; `upserts` are the delta's (validated) accounts. Calls
/// `gone` with every item removed or replaced.
pub fn replay<T: Clone>(
    items: &mut Vec<T>,
    steps: &[Step],
    upserts: &[T],
    mut gone: impl FnMut(T),
) {
    for step in steps {
        match *step {
            Step::Remove(i) => gone(items.swap_remove(i)),
            Step::Replace(i, k) => gone(std::mem::replace(&mut items[i], upserts[k].clone())),
            Step::Push(k) => items.push(upserts[k].clone()),
        }
    }
}

fn problem(path: String, message: String) -> proto::Problem {
    proto::Problem { path, message }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn account(id: &str, prefix: &str) -> proto::Account {
        proto::Account {
            id: id.into(),
            prefixes: vec![prefix.into()],
            ..proto::Account::default()
        }
    }

    /// What a valid snapshot of `accounts`, version v1, makes held.
    fn held_of(accounts: Vec<proto::Account>) -> Held {
        let policy = proto::Policy {
            accounts,
            ..proto::Policy::default()
        };
        let limits = crate::policy::ReadLimits::default();
        super::super::in_force::InForce::snapshot("v1".into(), policy, &limits)
            .expect("valid")
            .held
    }

    fn held() -> Held {
        held_of(vec![
            account("a", "10.0.0.1"),
            account("b", "10.0.0.2"),
            account("c", "10.0.0.3"),
        ])
    }

    fn pairs(h: &Held) -> Vec<(String, String)> {
        h.accounts()
            .map(|a| (a.id.clone(), a.prefixes[0].clone()))
            .collect()
    }

    fn owned(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter().map(|(a, b)| ((*a).into(), (*b).into())).collect()
    }

    #[test]
    fn a_delta_adds_replaces_and_removes_by_id_and_its_steps_replay_it() {
        let h = held();
        let delta = proto::Delta {
            version: "v2".into(),
            base_version: "v1".into(),
            upsert_accounts: vec![account("b", "10.0.0.22"), account("d", "10.0.0.4")],
            remove_accounts: vec!["a".into()],
            ..proto::Delta::default()
        };
        let (next, steps) = h.with_delta(&delta).expect("applies");
        assert_eq!(next.version, "v2");
        // a removed (c moves into its place), b replaced, d added.
        assert_eq!(
            pairs(&next),
            owned(&[("c", "10.0.0.3"), ("b", "10.0.0.22"), ("d", "10.0.0.4")])
        );
        // The same steps on a mirror of the accounts give the same order.
        let mut mirror: Vec<String> = pairs(&h).into_iter().map(|(id, _)| id).collect();
        let mut gone = Vec::new();
        let upserts: Vec<String> = delta.upsert_accounts.iter().map(|a| a.id.clone()).collect();
        replay(&mut mirror, &steps, &upserts, |g| gone.push(g));
        assert_eq!(mirror, ["c", "b", "d"]);
        assert_eq!(gone, ["a", "b"]);
        // The index follows the swap of a removal: c and d can be removed next.
        let (after, _) = next
            .with_delta(&proto::Delta {
                version: "v3".into(),
                base_version: "v2".into(),
                remove_accounts: vec!["c".into(), "d".into()],
                ..proto::Delta::default()
            })
            .expect("applies");
        assert_eq!(pairs(&after), owned(&[("b", "10.0.0.22")]));
        // The held state itself did not change.
        assert_eq!(pairs(&h).len(), 3);
    }

    /// Over several packed blocks: a removal moves the last account (in
    /// the last block) into the first, the index follows it, and the
    /// steps replay the same order on a mirror.
    #[test]
    fn deltas_over_several_blocks_keep_order_and_index() {
        let n = 300;
        let h = held_of(
            (0..n)
                .map(|i| account(&format!("a{i}"), &format!("10.0.{}.{}", i / 256, i % 256)))
                .collect(),
        );
        let delta = proto::Delta {
            version: "v2".into(),
            base_version: "v1".into(),
            upsert_accounts: vec![account("a150", "10.1.0.150"), account("new", "10.1.1.1")],
            remove_accounts: vec!["a3".into()],
            ..proto::Delta::default()
        };
        let (next, steps) = h.with_delta(&delta).expect("applies");
        let mut mirror: Vec<String> = (0..n).map(|i| format!("a{i}")).collect();
        let upserts: Vec<String> = delta.upsert_accounts.iter().map(|a| a.id.clone()).collect();
        replay(&mut mirror, &steps, &upserts, |_| {});
        let held: Vec<(String, String)> = pairs(&next);
        let ids: Vec<&str> = held.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(ids, mirror);
        assert_eq!(
            ids[3], "a299",
            "the last account took the removed one's place"
        );
        assert_eq!(held[150].1, "10.1.0.150");
        assert_eq!(held.last().map(|(id, _)| id.as_str()), Some("new"));
        assert_eq!(next.index.get("a299"), Some(3));
        assert_eq!(next.index.get("a3"), None);
        // The state before the delta is as it was.
        assert_eq!(pairs(&h)[3].0, "a3");
        assert_eq!(pairs(&h).len(), n);
    }

    #[test]
    fn the_last_known_good_bytes_are_the_message_encoded() {
        use prost::Message as _;
        let mut h = held();
        h.global = Some(proto::Global {
            mode: Some("monitor".into()),
            ..proto::Global::default()
        });
        for version in ["v1", ""] {
            h.version = version.into();
            let whole = proto::LastKnownGood {
                version: h.version.clone(),
                policy: Some(h.message()),
            };
            assert_eq!(h.last_known_good(), whole.encode_to_vec());
        }
    }

    #[test]
    fn a_delta_on_another_base_asks_for_a_snapshot() {
        let err = held()
            .with_delta(&proto::Delta {
                version: "v9".into(),
                base_version: "v8".into(),
                ..proto::Delta::default()
            })
            .expect_err("wrong base");
        assert_eq!(
            err,
            DeltaError::Base {
                held: "v1".into(),
                base: "v8".into()
            }
        );
    }

    #[test]
    fn unknown_removals_and_ids_named_twice_are_problems() {
        let err = held()
            .with_delta(&proto::Delta {
                version: "v2".into(),
                base_version: "v1".into(),
                upsert_accounts: vec![account("a", "10.0.0.9")],
                remove_accounts: vec!["zz".into(), "a".into()],
                ..proto::Delta::default()
            })
            .expect_err("two problems");
        let DeltaError::Problems(problems) = err else {
            panic!("problems expected: {err:?}");
        };
        let paths: Vec<_> = problems.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(paths, ["remove_accounts[0]", "upsert_accounts[0].id"]);
    }
}
