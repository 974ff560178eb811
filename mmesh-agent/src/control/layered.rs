//! The account indexes of a control-plane policy (id to position, prefix to
//! owner): the validator's, for the policy they were built with, and the
//! changes of the deltas since, kept beside them in persistent maps.
//!
//! The validator builds the indexes anyway, to find repeated ids and
//! prefixes; building persistent maps of 100,000 ids and 400,000 prefixes
//! again took longer than the validation (about 270 ms). Its indexes hold
//! positions compared through the accounts they were built from
//! ([`crate::policy::Ids`]), so they are kept with that policy (a
//! [`Base`]): exact whatever the deltas did to the policy since, as long as
//! every key whose answer changed is in the changes. A delta must leave the
//! indexes it was validated against as they were (the enforcer may still
//! refuse the result), and copies only the few changes it makes: the
//! persistent layer shares all but those.
//!
//! A base keeps its policy's accounts alive, also those the deltas have
//! replaced or removed since; each such account left at least one of its
//! prefixes in the changes. When the changes grow to a share of the
//! accounts, the indexes are built again for the policy of the day
//! ([`due`]), which lets those go.

use std::sync::Arc;

use ipnet::IpNet;

use crate::policy::{self, Account, FastHash, Index, Policy};

/// Changes kept beside a base before the indexes are built again: an
/// eighth of the accounts, and at least this many (a few in unit tests, so
/// that a handful of deltas builds them again).
const MIN_FOLD: usize = if cfg!(test) { 4 } else { 4096 };

type Changes<K, V> =
    imbl::GenericHashMap<K, Option<V>, FastHash, imbl::shared_ptr::DefaultSharedPtr>;

/// A policy and the indexes of its accounts.
#[derive(Debug)]
pub struct Base {
    policy: Arc<Policy>,
    ids: policy::Ids,
    owners: policy::Owners,
}

impl Base {
    /// `index`: the validator's, of `policy`.
    #[must_use]
    pub fn new(policy: Arc<Policy>, index: Index) -> Arc<Self> {
        Arc::new(Self {
            policy,
            ids: index.ids,
            owners: index.owners,
        })
    }

    /// The indexes of a valid policy's accounts built: the ids on a thread
    /// of their own while the prefixes are on this one.
    #[must_use]
    pub fn of(policy: Arc<Policy>) -> Arc<Self> {
        let accounts = policy.accounts.as_slice();
        let (ids, owners) = std::thread::scope(|s| {
            let ids = s.spawn(|| policy::Ids::of(accounts));
            let owners = policy::Owners::of(accounts);
            let ids = ids
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            (ids, owners)
        });
        Arc::new(Self {
            policy,
            ids,
            owners,
        })
    }

    fn accounts(&self) -> &[Arc<Account>] {
        &self.policy.accounts
    }
}

/// Whether indexes with `changes` beside their base are to be built again
/// for a policy of `accounts` accounts.
#[must_use]
pub fn due(changes: usize, accounts: usize) -> bool {
    changes >= MIN_FOLD.max(accounts / 8)
}

/// Account ids to positions.
#[derive(Clone, Debug)]
pub struct Ids {
    base: Arc<Base>,
    changes: Changes<String, u32>,
}

impl Ids {
    #[must_use]
    pub fn new(base: Arc<Base>) -> Self {
        Self {
            base,
            changes: Changes::with_hasher(FastHash::default()),
        }
    }

    #[must_use]
    pub fn get(&self, id: &str) -> Option<usize> {
        match self.changes.get(id) {
            Some(change) => change.map(|at| at as usize),
            None => self.base.ids.get(id, self.base.accounts()),
        }
    }

    pub fn insert(&mut self, id: String, at: usize) {
        let at = u32::try_from(at).expect("fewer than 2^32 accounts");
        self.changes.insert(id, Some(at));
    }

    pub fn remove(&mut self, id: &str) {
        if self.base.ids.get(id, self.base.accounts()).is_some() {
            self.changes.insert(id.to_owned(), None);
        } else {
            self.changes.remove(id);
        }
    }

    /// Ids changed since the base.
    #[must_use]
    pub fn changes(&self) -> usize {
        self.changes.len()
    }
}

/// Account prefixes to the accounts that own them.
#[derive(Clone, Debug)]
pub struct Owners {
    base: Arc<Base>,
    changes: Changes<IpNet, Arc<Account>>,
}

impl Owners {
    #[must_use]
    pub fn new(base: Arc<Base>) -> Self {
        Self {
            base,
            changes: Changes::with_hasher(FastHash::default()),
        }
    }

    /// The owner of `net`. (Owned since the base, it is the account the
    /// base has at the position: only its id is to be read, its other
    /// fields may be older than the policy's.)
    #[must_use]
    pub fn get(&self, net: IpNet) -> Option<&Arc<Account>> {
        if let Some(change) = self.changes.get(&net) {
            return change.as_ref();
        }
        let accounts = self.base.accounts();
        self.base.owners.get(net, accounts).map(|at| &accounts[at])
    }

    pub fn insert(&mut self, net: IpNet, owner: Arc<Account>) {
        self.changes.insert(net, Some(owner));
    }

    pub fn remove(&mut self, net: IpNet) {
        if self.base.owners.get(net, self.base.accounts()).is_some() {
            self.changes.insert(net, None);
        } else {
            self.changes.remove(&net);
        }
    }

    /// Prefixes whose owner changed since the base.
    #[must_use]
    pub fn changes(&self) -> usize {
        self.changes.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{control::proto, policy::ReadLimits};

    fn policy(accounts: &[(&str, &str)]) -> (Policy, Index) {
        let accounts = accounts.iter().map(|(id, prefix)| proto::Account {
            id: (*id).into(),
            prefixes: vec![(*prefix).into()],
            ..proto::Account::default()
        });
        Policy::from_message_indexed(None, None, accounts, "v1", "test", &ReadLimits::default())
            .expect("valid")
    }

    #[test]
    fn changes_override_the_base_and_survive_a_rebuild() {
        let (p, index) = policy(&[("a", "10.0.0.1"), ("b", "fd00::2")]);
        let p = Arc::new(p);
        let base = Base::new(Arc::clone(&p), index);
        let (mut ids, mut owners) = (Ids::new(Arc::clone(&base)), Owners::new(base));
        let before = (ids.clone(), owners.clone());
        let net = |s: &str| s.parse::<IpNet>().unwrap();
        let owner = |o: &Owners, s: &str| o.get(net(s)).map(|a| a.id.clone());
        ids.insert("b".into(), 20);
        ids.insert("c".into(), 3);
        ids.remove("a");
        ids.remove("zz");
        owners.insert(net("fd00::2/128"), Arc::clone(&p.accounts[0]));
        owners.insert(net("10.0.0.3/32"), Arc::clone(&p.accounts[1]));
        owners.remove(net("10.0.0.1/32"));
        assert_eq!(
            (ids.get("a"), ids.get("b"), ids.get("c")),
            (None, Some(20), Some(3))
        );
        assert_eq!(
            (
                owner(&owners, "10.0.0.1/32"),
                owner(&owners, "fd00::2/128"),
                owner(&owners, "10.0.0.3/32")
            ),
            (None, Some("a".into()), Some("b".into()))
        );
        // The copies taken before are as they were.
        assert_eq!((before.0.get("a"), before.0.get("b")), (Some(0), Some(1)));
        assert_eq!(
            (
                owner(&before.1, "10.0.0.1/32"),
                owner(&before.1, "fd00::2/128")
            ),
            (Some("a".into()), Some("b".into()))
        );
        // Removing what only the changes held leaves nothing behind.
        ids.remove("c");
        owners.remove(net("10.0.0.3/32"));
        assert_eq!((ids.get("c"), owner(&owners, "10.0.0.3/32")), (None, None));
        assert_eq!((ids.changes(), owners.changes()), (2, 2));
        // Built again for the policy the changes describe, the indexes
        // answer as the changes did.
        let (p, _) = policy(&[("c", "10.0.0.3"), ("b", "fd00::2")]);
        let base = Base::of(Arc::new(p));
        let (ids, owners) = (Ids::new(Arc::clone(&base)), Owners::new(base));
        assert_eq!(
            (ids.get("a"), ids.get("b"), ids.get("c")),
            (None, Some(1), Some(0))
        );
        assert_eq!(
            (owner(&owners, "10.0.0.1/32"), owner(&owners, "10.0.0.3/32")),
            (None, Some("c".into()))
        );
        assert!(!due(MIN_FOLD - 1, 8 * MIN_FOLD) && due(MIN_FOLD, 8 * MIN_FOLD));
        assert!(!due(2 * MIN_FOLD - 1, 16 * MIN_FOLD) && due(2 * MIN_FOLD, 16 * MIN_FOLD));
    }
}
