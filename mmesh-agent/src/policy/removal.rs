//! How much of a running policy a new one removes.

use std::fmt;

use super::{Account, FastMap, List, Policy};

/// How much of a running policy a new one removes: accounts (by id) and list
/// entries (prefixes of a list of the same scope and name). A half-written
/// or mistaken file usually shows as a policy that removes most of what runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Removal {
    pub accounts_before: usize,
    pub accounts_removed: usize,
    pub list_entries_before: usize,
    pub list_entries_removed: usize,
}

impl Removal {
    /// What `new` removes from `running`.
    #[must_use]
    pub fn between(running: &Policy, new: &Policy) -> Self {
        let mut out = Self {
            accounts_before: running.accounts.len(),
            ..Self::default()
        };
        let (before, removed) = list_entries_removed(&running.global.lists, &new.global.lists);
        out.list_entries_before += before;
        out.list_entries_removed += removed;
        let by_id: FastMap<&str, &Account> =
            new.accounts.iter().map(|a| (a.id.as_str(), &**a)).collect();
        for old in &running.accounts {
            match by_id.get(old.id.as_str()) {
                Some(kept) if kept.fingerprint == old.fingerprint => {
                    out.list_entries_before += old.lists.iter().map(List::len).sum::<usize>();
                }
                Some(kept) => {
                    let (before, removed) = list_entries_removed(&old.lists, &kept.lists);
                    out.list_entries_before += before;
                    out.list_entries_removed += removed;
                }
                None => {
                    let entries: usize = old.lists.iter().map(List::len).sum();
                    out.accounts_removed += 1;
                    out.list_entries_before += entries;
                    out.list_entries_removed += entries;
                }
            }
        }
        out
    }

    /// Whether more than half of the running accounts, or more than half of
    /// the running list entries, go.
    #[must_use]
    pub fn removes_most(&self) -> bool {
        2 * self.accounts_removed > self.accounts_before
            || 2 * self.list_entries_removed > self.list_entries_before
    }
}

impl fmt::Display for Removal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "removes {} of {} accounts and {} of {} list entries",
            self.accounts_removed,
            self.accounts_before,
            self.list_entries_removed,
            self.list_entries_before
        )
    }
}

/// Entries of the lists `old`, and how many of them are not in the list of
/// the same name of `new`.
pub(super) fn list_entries_removed(old: &[List], new: &[List]) -> (usize, usize) {
    let mut before = 0;
    let mut removed = 0;
    for list in old {
        before += list.len();
        removed += match new.iter().find(|n| n.name == list.name) {
            Some(n) => missing(&list.v4, &n.v4) + missing(&list.v6, &n.v6),
            None => list.len(),
        };
    }
    (before, removed)
}

/// How many items of `old` are not in `new`, both sorted (a merge, linear).
pub(super) fn missing<T: Ord>(old: &[T], new: &[T]) -> usize {
    let mut new = new.iter().peekable();
    let mut n = 0;
    for item in old {
        while new.next_if(|x| *x < item).is_some() {}
        if new.next_if(|x| *x == item).is_none() {
            n += 1;
        }
    }
    n
}
