//! The policy message in force from the control plane, and deltas on it.

use std::collections::HashMap;

use super::proto;

/// The last policy message the agent applied from the control plane, by
/// version: what a [`proto::Delta`] is applied to.
#[derive(Clone, Debug, Default)]
pub struct Held {
    pub version: String,
    global: Option<proto::Global>,
    defaults: Option<proto::Defaults>,
    accounts: Vec<proto::Account>,
    /// Account id to its index in `accounts`.
    index: HashMap<String, usize>,
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
    /// What a snapshot makes the agent hold.
    #[must_use]
    pub fn snapshot(version: String, policy: proto::Policy) -> Self {
        let index = policy
            .accounts
            .iter()
            .enumerate()
            .map(|(i, a)| (a.id.clone(), i))
            .collect();
        Self {
            version,
            global: policy.global,
            defaults: policy.defaults,
            accounts: policy.accounts,
            index,
        }
    }

    /// The whole policy message.
    #[must_use]
    pub fn message(&self) -> proto::Policy {
        proto::Policy {
            global: self.global.clone(),
            defaults: self.defaults.clone(),
            accounts: self.accounts.clone(),
        }
    }

    /// What holding `delta` on top of this would be. Nothing changes until
    /// the caller keeps the result (after the policy is in force).
    pub fn with_delta(&self, delta: &proto::Delta) -> Result<Self, DeltaError> {
        if delta.base_version != self.version {
            return Err(DeltaError::Base {
                held: self.version.clone(),
                base: delta.base_version.clone(),
            });
        }
        let mut problems = Vec::new();
        let mut next = self.clone();
        next.version.clone_from(&delta.version);
        let mut seen = HashMap::new();
        for (i, id) in delta.remove_accounts.iter().enumerate() {
            let path = format!("remove_accounts[{i}]");
            if seen.insert(id.as_str(), path.clone()).is_some() {
                problems.push(problem(path, format!("account {id:?} is named twice")));
            } else if !next.remove(id) {
                problems.push(problem(
                    path,
                    format!("account {id:?} is not in version {:?}", self.version),
                ));
            }
        }
        for (i, account) in delta.upsert_accounts.iter().enumerate() {
            let path = format!("upsert_accounts[{i}].id");
            if let Some(first) = seen.insert(account.id.as_str(), path.clone()) {
                problems.push(problem(
                    path,
                    format!("account {:?} is also in {first}", account.id),
                ));
                continue;
            }
            next.upsert(account.clone());
        }
        if let Some(global) = &delta.global {
            next.global = Some(global.clone());
        }
        if let Some(defaults) = &delta.defaults {
            next.defaults = Some(defaults.clone());
        }
        if problems.is_empty() {
            Ok(next)
        } else {
            Err(DeltaError::Problems(problems))
        }
    }

    fn upsert(&mut self, account: proto::Account) {
        if let Some(&i) = self.index.get(&account.id) {
            self.accounts[i] = account;
        } else {
            self.index.insert(account.id.clone(), self.accounts.len());
            self.accounts.push(account);
        }
    }

    fn remove(&mut self, id: &str) -> bool {
        let Some(i) = self.index.remove(id) else {
            return false;
        };
        self.accounts.swap_remove(i);
        if let Some(moved) = self.accounts.get(i) {
            self.index.insert(moved.id.clone(), i);
        }
        true
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

    fn held() -> Held {
        Held::snapshot(
            "v1".into(),
            proto::Policy {
                accounts: vec![
                    account("a", "10.0.0.1"),
                    account("b", "10.0.0.2"),
                    account("c", "10.0.0.3"),
                ],
                ..proto::Policy::default()
            },
        )
    }

    fn ids(h: &Held) -> Vec<(String, String)> {
        let mut v: Vec<_> = h
            .message()
            .accounts
            .into_iter()
            .map(|a| (a.id, a.prefixes[0].clone()))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn a_delta_adds_replaces_and_removes_by_id() {
        let h = held();
        let next = h
            .with_delta(&proto::Delta {
                version: "v2".into(),
                base_version: "v1".into(),
                upsert_accounts: vec![account("b", "10.0.0.22"), account("d", "10.0.0.4")],
                remove_accounts: vec!["a".into()],
                ..proto::Delta::default()
            })
            .expect("applies");
        assert_eq!(next.version, "v2");
        let pairs = |v: &[(&str, &str)]| -> Vec<(String, String)> {
            v.iter().map(|(a, b)| ((*a).into(), (*b).into())).collect()
        };
        assert_eq!(
            ids(&next),
            pairs(&[("b", "10.0.0.22"), ("c", "10.0.0.3"), ("d", "10.0.0.4")])
        );
        // The index follows the swap of a removal: c can be removed next.
        let after = next
            .with_delta(&proto::Delta {
                version: "v3".into(),
                base_version: "v2".into(),
                remove_accounts: vec!["c".into(), "d".into()],
                ..proto::Delta::default()
            })
            .expect("applies");
        assert_eq!(ids(&after), pairs(&[("b", "10.0.0.22")]));
        // The held state itself did not change.
        assert_eq!(ids(&h).len(), 3);
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
