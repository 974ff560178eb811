//! Matching a new policy's accounts against the previous compilation's,
//! so that unchanged accounts keep their compiled entries.

use std::{collections::HashMap, sync::Arc};

use super::{
    AccountEntries, Capacity, CompileError, Compiled, Counts, SlotTable, entries::compile_account,
};
use crate::policy::{Account, Fingerprint};

/// The accounts of a compilation in the making.
pub(super) struct Accounts {
    pub(super) entries: imbl::Vector<Option<Arc<AccountEntries>>>,
    pub(super) counts: Counts,
    /// Slots whose entries were replaced.
    pub(super) touched: Vec<u32>,
}

impl Accounts {
    /// Gives `slot` its new entries (`None`: no account).
    pub(super) fn put(&mut self, slot: u32, entries: Option<Arc<AccountEntries>>) {
        self.touched.push(slot);
        while self.entries.len() <= slot as usize {
            self.entries.push_back(None);
        }
        if let Some(old) = &self.entries[slot as usize] {
            self.counts.add(old, -1);
        }
        if let Some(e) = &entries {
            self.counts.add(e, 1);
        }
        self.entries.set(slot as usize, entries);
    }
}

/// How far a new account list matches the previous policy's from each end.
pub(super) struct Ends {
    /// Accounts matched from the front and from the back.
    pub(super) head: usize,
    pub(super) tail: usize,
    /// (new index, previous index, slot) of the matched accounts whose
    /// fingerprints differ: the changed ones.
    pub(super) changed: Vec<(usize, usize, u32)>,
}

/// Matches `new` with the previous policy's accounts by position from both
/// ends: a position matches while the fingerprints are equal, or the ids are
/// (a changed account).
pub(super) fn match_ends(new: &[Arc<Account>], previous: &Compiled) -> Ends {
    let (n, m) = (new.len(), previous.order.len());
    let mut changed = Vec::new();
    let same_id =
        |account: &Account, slot: u32| previous.account_id(slot) == Some(account.id.as_str());
    let mut head = 0;
    for (account, &(slot, fingerprint)) in new.iter().zip(previous.order.iter()) {
        if fingerprint != account.fingerprint {
            if !same_id(account, slot) {
                break;
            }
            changed.push((head, head, slot));
        }
        head += 1;
    }
    let mut tail = 0;
    let rest = (n - head).min(m - head);
    for (account, &(slot, fingerprint)) in new[head..]
        .iter()
        .rev()
        .zip(previous.order.iter().rev())
        .take(rest)
    {
        if fingerprint != account.fingerprint {
            if !same_id(account, slot) {
                break;
            }
            changed.push((n - 1 - tail, m - 1 - tail, slot));
        }
        tail += 1;
    }
    Ends {
        head,
        tail,
        changed,
    }
}

/// The middle stretch of a policy, matched by id.
pub(super) struct Middle {
    /// (slot, fingerprint) of its accounts, in order.
    pub(super) order: Vec<(u32, Fingerprint)>,
    pub(super) new_slots: Vec<u32>,
    pub(super) released: Vec<u32>,
}

/// Matches the accounts `new` with the previous policy's accounts at
/// `positions` by id: accounts that stay keep their slot (and their entries
/// if unchanged); the others leave or arrive.
pub(super) fn match_middle(
    new: &[Arc<Account>],
    previous: &Compiled,
    positions: std::ops::Range<usize>,
    slots: &mut SlotTable,
    out: &mut Accounts,
    capacity: &Capacity,
) -> Result<Middle, CompileError> {
    let mut leaving: HashMap<&str, (u32, Fingerprint)> = previous
        .order
        .clone()
        .slice(positions)
        .into_iter()
        .filter_map(|(slot, fingerprint)| {
            previous
                .account_id(slot)
                .map(|id| (id, (slot, fingerprint)))
        })
        .collect();
    let mut order = Vec::with_capacity(new.len());
    let mut arriving = Vec::new();
    for account in new {
        if let Some((slot, fingerprint)) = leaving.remove(account.id.as_str()) {
            if fingerprint != account.fingerprint {
                out.put(slot, Some(Arc::new(compile_account(account, slot)?)));
            }
            order.push((slot, account.fingerprint));
        } else {
            arriving.push(order.len());
            order.push((0, account.fingerprint));
        }
    }
    // New accounts take slots before leaving ones release theirs, so that no
    // slot changes hands within one policy change.
    let mut new_slots = Vec::with_capacity(arriving.len());
    for k in arriving {
        let account = &new[k];
        let slot = slots.take(capacity.accounts)?;
        new_slots.push(slot);
        out.put(slot, Some(Arc::new(compile_account(account, slot)?)));
        order[k] = (slot, account.fingerprint);
    }
    let mut released = Vec::with_capacity(leaving.len());
    for (slot, _) in leaving.into_values() {
        slots.free.insert(slot);
        out.put(slot, None);
        released.push(slot);
    }
    Ok(Middle {
        order,
        new_slots,
        released,
    })
}
