//! The accounts of a policy indexed by id and by prefix: how the validator
//! finds repeated ids and prefixes owned twice, and what a control-plane
//! policy keeps to validate a delta against the accounts it leaves alone.
//!
//! Neither index copies its keys. An entry is a position in the accounts
//! (and, for a prefix, which of that account's prefixes of the family it
//! is), hashed by its key and compared through the accounts the index was
//! built from, which every look-up is given. At 100,000 accounts with two
//! IPv4 and two IPv6 prefixes each, by hashbrown's layout (a bucket and a
//! control byte each, tables of a power of two at most 7/8 full): the ids
//! take 131,072 × 5 bytes and each family's prefixes 262,144 × 9, 5.4 MB
//! together; maps of copied ids to `usize` and of `IpNet` to `usize` (32
//! bytes a bucket: a v4 prefix padded to a v6 one) took 25 MB.

use std::{fmt, hash::BuildHasher, sync::Arc};

use hashbrown::{HashTable, hash_table::Entry};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use super::{Account, FastHash};

/// Account ids, each to the position of the first account that has it.
#[derive(Clone, Default)]
pub struct Ids {
    table: HashTable<u32>,
    hash: FastHash,
}

/// Account prefixes, each to the position of the first account that owns
/// it.
#[derive(Clone, Default)]
pub struct Owners {
    v4: HashTable<Slot>,
    v6: HashTable<Slot>,
    hash: FastHash,
}

/// Prefix number `prefix` of its family in the account at `account`.
#[derive(Clone, Copy)]
struct Slot {
    account: u32,
    prefix: u32,
}

/// The prefixes of one family of an account.
trait Family: Copy + Eq + std::hash::Hash {
    fn of(account: &Account) -> &[Self];

    /// The prefix a slot stands for.
    fn at(accounts: &[Arc<Account>], slot: Slot) -> Self {
        Self::of(&accounts[slot.account as usize])[slot.prefix as usize]
    }
}

impl Family for Ipv4Net {
    fn of(account: &Account) -> &[Self] {
        &account.prefixes_v4
    }
}

impl Family for Ipv6Net {
    fn of(account: &Account) -> &[Self] {
        &account.prefixes_v6
    }
}

/// A position as an index keeps it: a policy is read within a byte budget,
/// and 2^32 accounts are far beyond any.
fn position(i: usize) -> u32 {
    u32::try_from(i).expect("fewer than 2^32 accounts or prefixes in an account")
}

impl Ids {
    /// An index with room for `n` ids.
    #[must_use]
    pub fn with_capacity(n: usize) -> Self {
        Self {
            table: HashTable::with_capacity(n),
            hash: FastHash::default(),
        }
    }

    /// Every account of `accounts` indexed, each by its id: those of a
    /// valid policy, whose ids are unique (not checked: a second account
    /// with an id would be indexed beside the first).
    #[must_use]
    pub fn of(accounts: &[Arc<Account>]) -> Self {
        let mut ids = Self::with_capacity(accounts.len());
        let hash = &ids.hash;
        for (i, account) in accounts.iter().enumerate() {
            ids.table
                .insert_unique(hash.hash_one(account.id.as_str()), position(i), |&p| {
                    hash.hash_one(accounts[p as usize].id.as_str())
                });
        }
        ids
    }

    #[must_use]
    pub fn len(&self) -> usize {
        self.table.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// The position of the account with id `id`; `accounts`: those the
    /// index was built from.
    #[must_use]
    pub fn get(&self, id: &str, accounts: &[Arc<Account>]) -> Option<usize> {
        self.table
            .find(self.hash.hash_one(id), |&p| accounts[p as usize].id == id)
            .map(|&p| p as usize)
    }

    /// Indexes `accounts[i]` by its id, unless an account indexed before
    /// has that id: then its position, and the index is as it was.
    pub fn insert(&mut self, i: usize, accounts: &[Arc<Account>]) -> Option<usize> {
        let id = accounts[i].id.as_str();
        let hash = &self.hash;
        match self.table.entry(
            hash.hash_one(id),
            |&p| accounts[p as usize].id == id,
            |&p| hash.hash_one(accounts[p as usize].id.as_str()),
        ) {
            Entry::Occupied(first) => Some(*first.get() as usize),
            Entry::Vacant(free) => {
                free.insert(position(i));
                None
            }
        }
    }

    /// Bytes allocated for the index.
    #[must_use]
    pub fn allocation_size(&self) -> usize {
        self.table.allocation_size()
    }
}

impl Owners {
    /// An index with room for `v4` and `v6` prefixes.
    #[must_use]
    pub fn with_capacity(v4: usize, v6: usize) -> Self {
        Self {
            v4: HashTable::with_capacity(v4),
            v6: HashTable::with_capacity(v6),
            hash: FastHash::default(),
        }
    }

    /// The prefixes of every account of `accounts` indexed: those of a
    /// valid policy, whose prefixes are owned once (not checked, as in
    /// [`Ids::of`]).
    #[must_use]
    pub fn of(accounts: &[Arc<Account>]) -> Self {
        let v4 = accounts.iter().map(|a| a.prefixes_v4.len()).sum();
        let v6 = accounts.iter().map(|a| a.prefixes_v6.len()).sum();
        let mut owners = Self::with_capacity(v4, v6);
        index_all::<Ipv4Net>(&mut owners.v4, &owners.hash, accounts);
        index_all::<Ipv6Net>(&mut owners.v6, &owners.hash, accounts);
        owners
    }

    /// Prefixes indexed, both families.
    #[must_use]
    pub fn len(&self) -> usize {
        self.v4.len() + self.v6.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The position of the account that owns `net`; `accounts`: those the
    /// index was built from.
    #[must_use]
    pub fn get(&self, net: IpNet, accounts: &[Arc<Account>]) -> Option<usize> {
        match net {
            IpNet::V4(net) => find(&self.v4, &self.hash, net, accounts),
            IpNet::V6(net) => find(&self.v6, &self.hash, net, accounts),
        }
    }

    /// Indexes each prefix of `accounts[i]` that no account indexed before
    /// owns, and calls `taken` with each of the others and the position of
    /// its owner.
    pub fn claim(
        &mut self,
        i: usize,
        accounts: &[Arc<Account>],
        mut taken: impl FnMut(IpNet, usize),
    ) {
        let account = &accounts[i];
        for j in 0..account.prefixes_v4.len() {
            if let Some((net, owner)) = claim::<Ipv4Net>(&mut self.v4, &self.hash, i, j, accounts) {
                taken(IpNet::V4(net), owner);
            }
        }
        for j in 0..account.prefixes_v6.len() {
            if let Some((net, owner)) = claim::<Ipv6Net>(&mut self.v6, &self.hash, i, j, accounts) {
                taken(IpNet::V6(net), owner);
            }
        }
    }

    /// Bytes allocated for the index.
    #[must_use]
    pub fn allocation_size(&self) -> usize {
        self.v4.allocation_size() + self.v6.allocation_size()
    }
}

/// Every prefix of family `N` of `accounts` into `table`, unchecked (see
/// [`Owners::of`]).
fn index_all<N: Family>(table: &mut HashTable<Slot>, hash: &FastHash, accounts: &[Arc<Account>]) {
    for (i, account) in accounts.iter().enumerate() {
        for (j, &net) in N::of(account).iter().enumerate() {
            let slot = Slot {
                account: position(i),
                prefix: position(j),
            };
            table.insert_unique(hash.hash_one(net), slot, |&s| {
                hash.hash_one(N::at(accounts, s))
            });
        }
    }
}

fn find<N: Family>(
    table: &HashTable<Slot>,
    hash: &FastHash,
    net: N,
    accounts: &[Arc<Account>],
) -> Option<usize> {
    table
        .find(hash.hash_one(net), |&s| N::at(accounts, s) == net)
        .map(|s| s.account as usize)
}

/// Indexes prefix `j` of family `N` of `accounts[i]`, unless an account
/// indexed before owns it: then the prefix and that account's position.
fn claim<N: Family>(
    table: &mut HashTable<Slot>,
    hash: &FastHash,
    i: usize,
    j: usize,
    accounts: &[Arc<Account>],
) -> Option<(N, usize)> {
    let net = N::of(&accounts[i])[j];
    match table.entry(
        hash.hash_one(net),
        |&s| N::at(accounts, s) == net,
        |&s| hash.hash_one(N::at(accounts, s)),
    ) {
        Entry::Occupied(owner) => Some((net, owner.get().account as usize)),
        Entry::Vacant(free) => {
            free.insert(Slot {
                account: position(i),
                prefix: position(j),
            });
            None
        }
    }
}

impl fmt::Debug for Ids {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ids")
            .field("len", &self.len())
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for Owners {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Owners")
            .field("v4", &self.v4.len())
            .field("v6", &self.v6.len())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn account(id: &str, prefixes: &[&str]) -> Arc<Account> {
        let mut prefixes_v4 = Vec::new();
        let mut prefixes_v6 = Vec::new();
        for p in prefixes {
            match p.parse::<IpNet>().expect("a prefix") {
                IpNet::V4(n) => prefixes_v4.push(n),
                IpNet::V6(n) => prefixes_v6.push(n),
            }
        }
        Arc::new(Account {
            id: id.into(),
            mode: super::super::Mode::Enforce,
            prefixes_v4,
            prefixes_v6,
            lists: Vec::new(),
            inbound: None,
            outbound: None,
            fingerprint: super::super::Fingerprint::default(),
        })
    }

    #[test]
    fn the_first_account_keeps_an_id_or_prefix_and_the_others_are_told_its_position() {
        let accounts = [
            account("a", &["10.0.0.1/32", "fd00::1/128"]),
            account("b", &["10.0.0.2/32", "fd00::1/128"]),
            account("a", &["10.0.0.1/32", "10.0.0.3/32"]),
        ];
        let mut ids = Ids::with_capacity(0);
        let mut owners = Owners::with_capacity(0, 0);
        let mut taken = Vec::new();
        let mut repeated = Vec::new();
        for i in 0..accounts.len() {
            repeated.push(ids.insert(i, &accounts));
            owners.claim(i, &accounts, |net, owner| taken.push((i, net, owner)));
        }
        assert_eq!(repeated, [None, None, Some(0)]);
        assert_eq!(
            taken,
            [
                (1, "fd00::1/128".parse().unwrap(), 0),
                (2, "10.0.0.1/32".parse().unwrap(), 0)
            ]
        );
        assert_eq!((ids.len(), owners.len()), (2, 4));
        assert_eq!(ids.get("b", &accounts), Some(1));
        assert_eq!(ids.get("c", &accounts), None);
        let owner = |p: &str| owners.get(p.parse().unwrap(), &accounts);
        assert_eq!(
            [
                owner("10.0.0.1/32"),
                owner("10.0.0.2/32"),
                owner("10.0.0.3/32"),
                owner("fd00::1/128"),
                owner("10.0.0.1/31"),
                owner("fd00::2/128")
            ],
            [Some(0), Some(1), Some(2), Some(0), None, None]
        );
    }

    #[test]
    fn an_index_of_a_whole_policy_finds_every_account() {
        let accounts: Vec<_> = (0..5000)
            .map(|i| {
                account(
                    &format!("acct-{i}"),
                    &[
                        &format!("10.{}.{}.0/24", i / 256, i % 256),
                        &format!("fd00::{i:x}/128"),
                    ],
                )
            })
            .collect();
        let (ids, owners) = (Ids::of(&accounts), Owners::of(&accounts));
        for (i, a) in accounts.iter().enumerate() {
            assert_eq!(ids.get(&a.id, &accounts), Some(i));
            assert_eq!(owners.get(IpNet::V4(a.prefixes_v4[0]), &accounts), Some(i));
            assert_eq!(owners.get(IpNet::V6(a.prefixes_v6[0]), &accounts), Some(i));
        }
        assert_eq!((ids.len(), owners.len()), (5000, 10_000));
    }
}
