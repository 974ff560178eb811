//! Compiles a validated [`Policy`] into the entries of the policy maps.
//!
//! The output is independent of the half it will be written to: the
//! datapath adds the half when it writes keys. It is made of shared pieces,
//! one for the global lists and one per account, and compiling against the
//! previous policy reuses every piece whose source did not change. The
//! datapath then writes only the pieces that are not the very same ones it
//! wrote before: a change of one account among a hundred thousand compiles
//! and writes that account alone.
//!
//! `incremental` matches the new accounts against the previous compilation,
//! `entries` builds the entries of the global lists and of one account, and
//! `resolve` turns a scope's overlapping list prefixes into one rule each.

use std::{collections::BTreeMap, sync::Arc};

use mmesh_common::maps::{AccountConfig, GenConfig, RuleValue};
use serde::Serialize;

mod adopt;
mod entries;
mod incremental;
mod resolve;
#[cfg(test)]
mod tests;

pub use adopt::{account_key, compile_adopting};
use entries::{check_capacity, compile_account, compile_global, generation_flags, verdict_code};
use incremental::{Accounts, Ends, Middle, match_ends, match_middle};

use crate::{
    policy::{Fingerprint, List, Policy},
    stride::Stride,
};

/// How much the maps were sized for at load time (per half). The defaults
/// are the command line's defaults.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Capacity {
    /// Accounts (`--max-accounts`).
    pub accounts: u32,
    /// Account prefixes per address family (`--max-account-prefixes`).
    pub account_prefixes: u32,
    /// Block/allow list prefixes per address family, all scopes together
    /// (`--max-list-prefixes`).
    pub list_prefixes: u32,
    /// (account, reason, verdict, direction) counters (`--max-counters`).
    pub counters: u32,
    /// Ring buffer bytes for events (`--event-buffer`).
    pub event_buffer: u32,
    /// Level-2 nodes of the global IPv4 stride per half (`--stride-chunks`):
    /// each costs 1 KiB (twice: one per half) and spares the /16 region it
    /// covers a trie lookup.
    pub stride_chunks: u32,
    /// Entries of the per-CPU flow cache (`--flow-cache`), a power of two;
    /// each costs 64 bytes per CPU.
    pub flow_cache: u32,
}

impl Default for Capacity {
    fn default() -> Self {
        Self {
            accounts: 16_384,
            account_prefixes: 65_536,
            list_prefixes: 1 << 20,
            counters: 65_536,
            event_buffer: 1 << 20,
            stride_chunks: 4096,
            flow_cache: 8192,
        }
    }
}

/// A policy that does not fit the maps.
#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    /// A map sized at load time is too small: its inserts are refused.
    #[error(
        "the policy needs {needed} {what} but map {map} was loaded with room for {capacity}; \
         nothing of it was applied: restart the agent with {flag} {needed} or more"
    )]
    OverCapacity {
        what: &'static str,
        /// The map, as `mmesh_map_capacity` names it.
        map: &'static str,
        needed: usize,
        capacity: u32,
        flag: &'static str,
    },
    /// A limit of the datapath's own, which no option raises.
    #[error(
        "the policy has {needed} {what}, more than the datapath's fixed limit of {limit}; {remedy}"
    )]
    OverLimit {
        what: &'static str,
        needed: usize,
        limit: u32,
        remedy: &'static str,
    },
}

impl CompileError {
    /// The map whose inserts this refused, if one (for
    /// `mmesh_map_inserts_refused_total`).
    #[must_use]
    pub const fn refused_map(&self) -> Option<&'static str> {
        match self {
            Self::OverCapacity { map, .. } => Some(map),
            Self::OverLimit { .. } => None,
        }
    }
}

/// Stable account slots: an account keeps its slot (and with it its rate
/// limit state and counters) for as long as it stays in the policy.
/// Persistent maps: the table of one policy shares all but its changes with
/// the previous one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SlotTable {
    /// Slots released by earlier policies, reused lowest first.
    free: imbl::OrdSet<u32>,
    /// Next never-used slot.
    next: u32,
}

impl SlotTable {
    /// A slot for a new account: a released one, else a never-used one.
    fn take(&mut self, max: u32) -> Result<u32, CompileError> {
        let slot = if let Some(slot) = self.free.remove_min() {
            slot
        } else {
            self.next = self.next.max(1);
            let slot = self.next;
            self.next += 1;
            slot
        };
        if slot > max {
            return Err(CompileError::OverCapacity {
                what: "account slots",
                map: "accounts",
                needed: slot as usize,
                capacity: max,
                flag: "--max-accounts",
            });
        }
        Ok(slot)
    }
}

/// A prefix: the key of an LPM trie minus the half and the scope.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct PrefixKey<A> {
    pub addr: A,
    pub len: u8,
}

/// Where a list id points, for events and `policy show`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ListInfo {
    /// `global` or the account id.
    pub scope: String,
    pub name: String,
}

/// Account list ids carry this bit, the slot and the list's index in the
/// account: stable for as long as the account keeps its slot, so that one
/// account's change never renumbers another's lists. Global list ids are
/// small (1, 2, …): the stride has 24 bits for them.
pub const ACCOUNT_LIST: u32 = 1 << 31;

/// Lists an account may have (the index takes 8 bits of the id).
pub const MAX_ACCOUNT_LISTS: usize = 255;

/// The id of list `index` of the account in `slot`.
#[must_use]
pub const fn account_list_id(slot: u32, index: u32) -> u32 {
    ACCOUNT_LIST | (slot << 8) | index
}

/// The global part of a compiled policy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GlobalEntries {
    /// What it was compiled from; `None` when read back from the kernel.
    pub source: Option<Vec<List>>,
    pub rules_v4: BTreeMap<PrefixKey<[u8; 4]>, RuleValue>,
    pub rules_v6: BTreeMap<PrefixKey<[u8; 16]>, RuleValue>,
    /// The first levels of the global IPv4 lists.
    pub stride: Stride,
    /// List names; list id `i` is `lists[i - 1]`.
    pub lists: Vec<ListInfo>,
}

/// Everything one account puts in the maps.
///
/// Boxed slices, not vectors, and the lists' entries apart: a hundred
/// thousand accounts are kept compiled, each with a few entries and most
/// with no list, and a vector's spare capacity (room for four where an
/// account has one), its third word and three empty vectors took 300 of the
/// 600 bytes an account cost.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AccountEntries {
    /// The id of the account it was compiled from; `None` when read back
    /// from the kernel. Only the id: the compiled policies of recent
    /// generations are kept to name events, and a copy of every account
    /// kept for them held the policy before a reload alive beside the new
    /// one.
    pub id: Option<Box<str>>,
    /// The settings, `epoch` left to the datapath.
    pub config: AccountConfig,
    pub hosts_v4: Box<[[u8; 4]]>,
    pub hosts_v6: Box<[[u8; 16]]>,
    pub prefixes_v4: Box<[PrefixKey<[u8; 4]>]>,
    pub prefixes_v6: Box<[PrefixKey<[u8; 16]>]>,
    /// `None` for an account without lists.
    pub lists: Option<Box<AccountLists>>,
}

/// The entries of an account's block and allow lists.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AccountLists {
    pub rules_v4: Box<[(PrefixKey<[u8; 4]>, RuleValue)]>,
    pub rules_v6: Box<[(PrefixKey<[u8; 16]>, RuleValue)]>,
    /// The list names, by index (none when read back from the kernel).
    pub names: Box<[ListInfo]>,
}

impl AccountLists {
    /// `None` for no lists at all.
    #[must_use]
    pub fn boxed(self) -> Option<Box<Self>> {
        (self != Self::default()).then(|| Box::new(self))
    }
}

impl AccountEntries {
    /// The account id, if known.
    #[must_use]
    pub fn id(&self) -> Option<&str> {
        self.id.as_deref()
    }

    /// The entries of the account's lists in `ACCT_RULES_V4`.
    #[must_use]
    pub fn rules_v4(&self) -> &[(PrefixKey<[u8; 4]>, RuleValue)] {
        self.lists.as_ref().map_or(&[], |l| &l.rules_v4)
    }

    /// The entries of the account's lists in `ACCT_RULES_V6`.
    #[must_use]
    pub fn rules_v6(&self) -> &[(PrefixKey<[u8; 16]>, RuleValue)] {
        self.lists.as_ref().map_or(&[], |l| &l.rules_v6)
    }

    /// The account's list names, by index.
    #[must_use]
    pub fn list_names(&self) -> &[ListInfo] {
        self.lists.as_ref().map_or(&[], |l| &l.names)
    }
}

/// The map entries of one policy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Compiled {
    /// Global settings; the datapath fills in the generation.
    pub config: GenConfig,
    pub slots: SlotTable,
    /// Slots new in this policy: their rate-limit and sampler state must be
    /// reset before packets can see them.
    pub new_slots: Vec<u32>,
    pub global: Arc<GlobalEntries>,
    /// The accounts' entries, indexed by slot (slot 0 is never an account).
    pub accounts: imbl::Vector<Option<Arc<AccountEntries>>>,
    /// (slot, fingerprint) of the policy's accounts in their order: what the
    /// next compile compares against. Persistent, so that a one-account
    /// change copies a path, not the whole list.
    pub order: imbl::Vector<(u32, Fingerprint)>,
    /// Entry counts, kept up to date piece by piece.
    pub counts: Counts,
    /// This compilation's identity, and that of the one it was compiled
    /// against (0: none).
    pub id: u64,
    pub base: u64,
    /// Slots whose entries differ from the base's (changed, new, released):
    /// a half that holds the base needs only these written.
    pub changed: Vec<u32>,
    /// Slots whose accounts left with this policy.
    pub released: Vec<u32>,
}

/// Source of [`Compiled::id`].
static COMPILATIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// Entry counts per map, against the capacities.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub accounts: usize,
    pub account_prefixes_v4: usize,
    pub account_prefixes_v6: usize,
    pub list_prefixes_v4: usize,
    pub list_prefixes_v6: usize,
    /// Accounts with IPv4 / IPv6 prefixes wider than a host (for the
    /// `GEN_PREFIXES_*` flags).
    pub wide_v4: usize,
    pub wide_v6: usize,
}

impl Counts {
    fn add(&mut self, a: &AccountEntries, sign: isize) {
        let add = |n: &mut usize, d: usize| *n = n.wrapping_add_signed(sign * d as isize);
        add(&mut self.accounts, 1);
        add(
            &mut self.account_prefixes_v4,
            a.hosts_v4.len() + a.prefixes_v4.len(),
        );
        add(
            &mut self.account_prefixes_v6,
            a.hosts_v6.len() + a.prefixes_v6.len(),
        );
        add(&mut self.list_prefixes_v4, a.rules_v4().len());
        add(&mut self.list_prefixes_v6, a.rules_v6().len());
        add(&mut self.wide_v4, usize::from(!a.prefixes_v4.is_empty()));
        add(&mut self.wide_v6, usize::from(!a.prefixes_v6.is_empty()));
    }
}

impl Compiled {
    /// The entries of the account in `slot`.
    #[must_use]
    pub fn account(&self, slot: u32) -> Option<&Arc<AccountEntries>> {
        self.accounts.get(slot as usize).and_then(Option::as_ref)
    }

    /// The accounts with their slots, in slot order.
    pub fn accounts(&self) -> impl Iterator<Item = (u32, &Arc<AccountEntries>)> {
        self.accounts
            .iter()
            .enumerate()
            .filter_map(|(slot, a)| a.as_ref().map(|a| (slot as u32, a)))
    }

    /// The name of list `id`.
    #[must_use]
    pub fn list(&self, id: u32) -> Option<&ListInfo> {
        if id & ACCOUNT_LIST != 0 {
            self.account((id & !ACCOUNT_LIST) >> 8)?
                .list_names()
                .get((id & 0xff) as usize)
        } else {
            self.global.lists.get((id as usize).checked_sub(1)?)
        }
    }

    /// The slot of account `id` (a scan: for tests and tools).
    #[must_use]
    pub fn slot_of(&self, id: &str) -> Option<u32> {
        self.order
            .iter()
            .map(|(slot, _)| *slot)
            .find(|slot| self.account_id(*slot) == Some(id))
    }

    /// The account id of `slot`.
    #[must_use]
    pub fn account_id(&self, slot: u32) -> Option<&str> {
        self.account(slot).and_then(|a| a.id())
    }

    /// How many entries each map needs.
    #[must_use]
    pub fn counts(&self) -> Counts {
        Counts {
            list_prefixes_v4: self.counts.list_prefixes_v4 + self.global.rules_v4.len(),
            list_prefixes_v6: self.counts.list_prefixes_v6 + self.global.rules_v6.len(),
            ..self.counts
        }
    }
}

/// Refuses a policy with more accounts than the maps hold.
pub(super) fn accounts_fit(policy: &Policy, capacity: &Capacity) -> Result<(), CompileError> {
    if policy.accounts.len() > capacity.accounts as usize {
        return Err(CompileError::OverCapacity {
            what: "accounts",
            map: "accounts",
            needed: policy.accounts.len(),
            capacity: capacity.accounts,
            flag: "--max-accounts",
        });
    }
    Ok(())
}

/// Compiles `policy`. With the `previous` compiled policy, accounts keep
/// their slots, and every piece whose source is unchanged is reused as it
/// is (the same `Arc`), which is what lets the datapath skip it.
///
/// Accounts are matched with the previous policy's by position from both
/// ends (fingerprints compared, ids only where fingerprints differ), and by
/// id only in the stretch in between that differs: a change to one account,
/// one account added or removed, costs a scan of the fingerprints plus the
/// work of that account, whatever the size of the policy.
pub fn compile(
    policy: &Policy,
    previous: Option<&Compiled>,
    capacity: &Capacity,
) -> Result<Compiled, CompileError> {
    accounts_fit(policy, capacity)?;
    // (An empty `Compiled` allocates the empty stride tables: only when needed.)
    let empty;
    let previous = if let Some(previous) = previous {
        previous
    } else {
        empty = Compiled::default();
        &empty
    };
    let global = match &previous.global.source {
        Some(source) if *source == policy.global.lists => previous.global.clone(),
        _ => Arc::new(compile_global(&policy.global.lists, capacity)?),
    };

    let new = &policy.accounts;
    let (n, m) = (new.len(), previous.order.len());
    let Ends {
        head,
        tail,
        changed,
    } = match_ends(new, previous);
    let mut slots = previous.slots.clone();
    let mut out = Accounts {
        entries: previous.accounts.clone(),
        counts: previous.counts,
        touched: Vec::new(),
    };

    // The ends: same accounts in the same places; recompile the changed ones.
    let mut order = previous.order.clone();
    for (i, j, slot) in changed {
        out.put(slot, Some(Arc::new(compile_account(&new[i], slot)?)));
        order.set(j, (slot, new[i].fingerprint));
    }

    // The middle: by id.
    let Middle {
        order: middle,
        new_slots,
        released,
    } = match_middle(
        &new[head..n - tail],
        previous,
        head..m - tail,
        &mut slots,
        &mut out,
        capacity,
    )?;
    if head + tail < m || head + tail < n {
        let mut spliced = order.take(head);
        spliced.append(middle.into_iter().collect());
        spliced.append(order.skip(m - tail));
        order = spliced;
    }

    let Accounts {
        entries: accounts,
        counts,
        touched,
    } = out;
    let flags = generation_flags(&global, &counts);
    let out = Compiled {
        config: GenConfig {
            generation: 0,
            flags,
            malformed: verdict_code(policy.global.malformed),
            event_rate: policy.global.events_per_second,
            _pad: 0,
        },
        slots,
        new_slots,
        global,
        accounts,
        order,
        counts,
        id: COMPILATIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        base: previous.id,
        changed: touched,
        released,
    };
    check_capacity(&out.counts(), capacity)?;
    Ok(out)
}
