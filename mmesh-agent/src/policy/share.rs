//! Accounts of a policy being read that are equal to the running policy's
//! are taken from it (the same `Arc`) instead of kept twice.
//!
//! A reload reads the whole file again, usually to change a few accounts.
//! Each account is compared with the running one where it is expected (at
//! its position, give or take one account added or removed before it) as
//! soon as it is validated: an equal one is dropped at once, and the new
//! policy costs little more than its vector of pointers. At 100,000
//! accounts that is the 40 MB of a second copy, which stayed resident after
//! the reload (with the reader's free memory returned, the agent was at
//! 154 MB after a one-account change without this, 118 with it). Accounts
//! that moved further are kept as validated: equal all the
//! same, only not shared. The running policy is a thread's own: a
//! validation that spreads over threads hands it to each ([`running`]).

use std::{cell::RefCell, sync::Arc};

use super::{Account, Policy};

std::thread_local! {
    /// The running policy while a new one is read on this thread, and where
    /// the last match was (the offset of its position in the running
    /// policy from the new one's).
    static RUNNING: RefCell<Option<(Arc<Policy>, isize)>> = const { RefCell::new(None) };
}

/// Runs `read` (which reads and validates a policy on this thread) sharing
/// the accounts it validates with `running`'s.
pub fn reading_beside<T>(running: &Arc<Policy>, read: impl FnOnce() -> T) -> T {
    struct Restore(Option<(Arc<Policy>, isize)>);
    impl Drop for Restore {
        fn drop(&mut self) {
            RUNNING.set(self.0.take());
        }
    }
    let _restore = Restore(RUNNING.replace(Some((Arc::clone(running), 0))));
    read()
}

/// The running policy this thread reads beside, if any: for the threads a
/// validation spreads to, each with [`reading_beside`].
pub(super) fn running() -> Option<Arc<Policy>> {
    RUNNING.with_borrow(|r| r.as_ref().map(|(policy, _)| Arc::clone(policy)))
}

/// Account number `index` of the policy being validated: the running
/// policy's equal account if it is where expected, else `account` itself.
pub(super) fn shared(account: Account, index: usize) -> Arc<Account> {
    RUNNING.with_borrow_mut(|running| {
        let Some((policy, offset)) = running else {
            return Arc::new(account);
        };
        // Where the last match says, then one further (an account was
        // removed before it), then one nearer (one was added).
        for step in [0, 1, -1] {
            let Some(at) = index.checked_add_signed(*offset + step) else {
                continue;
            };
            if let Some(old) = policy.accounts.get(at)
                && old.fingerprint == account.fingerprint
                && **old == account
            {
                *offset += step;
                return Arc::clone(old);
            }
        }
        Arc::new(account)
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn policy(accounts: &[(&str, &str)]) -> Policy {
        let accounts: Vec<String> = accounts
            .iter()
            .map(|(id, prefix)| format!("{{\"id\": \"{id}\", \"prefixes\": [\"{prefix}\"]}}"))
            .collect();
        let text = format!("{{\"accounts\": [{}]}}", accounts.join(", "));
        Policy::parse(&text, "test", Path::new(".")).expect("valid")
    }

    /// Which accounts of `new` are the very ones of `running`.
    fn same(running: &Policy, new: &Policy) -> Vec<bool> {
        new.accounts
            .iter()
            .map(|a| running.accounts.iter().any(|r| Arc::ptr_eq(a, r)))
            .collect()
    }

    #[test]
    fn equal_accounts_are_the_running_ones_also_past_an_account_added_or_removed() {
        let running = Arc::new(policy(&[
            ("a", "10.0.0.1"),
            ("b", "10.0.0.2"),
            ("c", "10.0.0.3"),
            ("d", "10.0.0.4"),
        ]));
        let read = |accounts: &[(&str, &str)]| reading_beside(&running, || policy(accounts));
        // One changed: the others shared, the changed one as read.
        let changed = read(&[
            ("a", "10.0.0.1"),
            ("b", "10.0.0.20"),
            ("c", "10.0.0.3"),
            ("d", "10.0.0.4"),
        ]);
        assert_eq!(same(&running, &changed), [true, false, true, true]);
        assert_eq!(
            changed.accounts[1].prefixes_v4[0].to_string(),
            "10.0.0.20/32"
        );
        // One added at the front, one removed in the middle.
        let moved = read(&[
            ("new", "10.0.0.9"),
            ("a", "10.0.0.1"),
            ("c", "10.0.0.3"),
            ("d", "10.0.0.4"),
        ]);
        assert_eq!(same(&running, &moved), [false, true, true, true]);
        // The result is the policy read without the running one.
        assert_eq!(
            moved,
            policy(&[
                ("new", "10.0.0.9"),
                ("a", "10.0.0.1"),
                ("c", "10.0.0.3"),
                ("d", "10.0.0.4"),
            ])
        );
        // Nothing is shared outside `reading_beside`.
        assert_eq!(same(&running, &policy(&[("a", "10.0.0.1")])), [false]);
    }

    /// A policy large enough to be validated on several threads shares
    /// its accounts on each of them.
    #[test]
    fn accounts_validated_on_other_threads_are_shared_too() {
        let n = super::super::validate::PARALLEL_ACCOUNTS * 2;
        let ids: Vec<(String, String)> = (0..n)
            .map(|i| {
                (
                    format!("a{i}"),
                    format!("10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255),
                )
            })
            .collect();
        let pairs = |ids: &[(String, String)]| -> Policy {
            let v: Vec<(&str, &str)> = ids.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
            policy(&v)
        };
        let running = Arc::new(pairs(&ids));
        let mut changed = ids.clone();
        changed[n - 1].1 = "10.255.0.1".into();
        let read = reading_beside(&running, || pairs(&changed));
        let shared = same(&running, &read);
        assert!(!shared[n - 1], "the changed account is the one read");
        assert!(
            shared[..n - 1].iter().all(|s| *s),
            "{} of {} unchanged accounts shared",
            shared[..n - 1].iter().filter(|s| **s).count(),
            n - 1
        );
    }
}
