//! Compiles a validated [`Policy`] into the entries of the policy maps.
//!
//! The output is independent of the half it will be written to: the
//! datapath adds the half when it writes keys. It is made of shared pieces,
//! one for the global lists and one per account, and compiling against the
//! previous policy reuses every piece whose source did not change. The
//! datapath then writes only the pieces that are not the very same ones it
//! wrote before: a change of one account among a hundred thousand compiles
//! and writes that account alone.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
};

use ipnet::{Ipv4Net, Ipv6Net};
use mmesh_common::{
    Verdict,
    maps::{
        ACCOUNT_ACTIVE, ACCOUNT_RULES_V4, ACCOUNT_RULES_V6, AccountConfig,
        DirLimits as MapDirLimits, GEN_PREFIXES_V4, GEN_PREFIXES_V6, GEN_RULES_V4, GEN_RULES_V6,
        GenConfig, RateLimit, RuleValue,
    },
};
use serde::Serialize;

use crate::{
    policy::{Account, Action, DirLimits, List, ListKind, Policy},
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
    #[error(
        "the policy needs {needed} {what} but the datapath was loaded with room for {capacity}; \
         restart the agent with {flag} {needed} or more"
    )]
    OverCapacity {
        what: &'static str,
        needed: usize,
        capacity: u32,
        flag: &'static str,
    },
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
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AccountEntries {
    /// What it was compiled from; `None` when read back from the kernel.
    pub source: Option<Account>,
    /// The settings, `epoch` left to the datapath.
    pub config: AccountConfig,
    pub hosts_v4: Vec<[u8; 4]>,
    pub hosts_v6: Vec<[u8; 16]>,
    pub prefixes_v4: Vec<PrefixKey<[u8; 4]>>,
    pub prefixes_v6: Vec<PrefixKey<[u8; 16]>>,
    pub rules_v4: Vec<(PrefixKey<[u8; 4]>, RuleValue)>,
    pub rules_v6: Vec<(PrefixKey<[u8; 16]>, RuleValue)>,
    /// The account's list names, by index.
    pub lists: Vec<ListInfo>,
}

impl AccountEntries {
    /// The account id, if known.
    #[must_use]
    pub fn id(&self) -> Option<&str> {
        self.source.as_ref().map(|a| a.id.as_str())
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
    pub order: imbl::Vector<(u32, u128)>,
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
        add(&mut self.list_prefixes_v4, a.rules_v4.len());
        add(&mut self.list_prefixes_v6, a.rules_v6.len());
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
                .lists
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
    if policy.accounts.len() > capacity.accounts as usize {
        return Err(CompileError::OverCapacity {
            what: "accounts",
            needed: policy.accounts.len(),
            capacity: capacity.accounts,
            flag: "--max-accounts",
        });
    }
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

/// The key under which a pinned datapath remembers which slot account `id`
/// holds (`mmesh_agent::datapath::pin`): a 128-bit hash of the id, never 0.
#[must_use]
pub fn account_key(id: &str) -> u128 {
    xxhash_rust::xxh3::xxh3_128(id.as_bytes()).max(1)
}

/// Compiles `policy` for a datapath adopted from pins, where an earlier agent
/// left its accounts in the slots `held` (by [`account_key`]): those accounts
/// keep their slots, and with them their counters and rate-limit state; the
/// others arrive in new slots (reset), and slots held by accounts no longer
/// in the policy are released. Applied like any other change.
pub fn compile_adopting<S: std::hash::BuildHasher>(
    policy: &Policy,
    held: &HashMap<u128, u32, S>,
    capacity: &Capacity,
) -> Result<Compiled, CompileError> {
    if policy.accounts.len() > capacity.accounts as usize {
        return Err(CompileError::OverCapacity {
            what: "accounts",
            needed: policy.accounts.len(),
            capacity: capacity.accounts,
            flag: "--max-accounts",
        });
    }
    let global = Arc::new(compile_global(&policy.global.lists, capacity)?);
    let usable = |slot: u32| (1..=capacity.accounts).contains(&slot);
    let mut out = Accounts {
        entries: imbl::Vector::new(),
        counts: Counts::default(),
        touched: Vec::new(),
    };
    let mut kept = std::collections::HashSet::new();
    let mut order = Vec::with_capacity(policy.accounts.len());
    let mut arriving = Vec::new();
    for (k, account) in policy.accounts.iter().enumerate() {
        match held.get(&account_key(&account.id)) {
            Some(&slot) if usable(slot) && kept.insert(slot) => {
                out.put(slot, Some(Arc::new(compile_account(account, slot)?)));
                order.push((slot, account.fingerprint));
            }
            _ => {
                arriving.push(k);
                order.push((0, account.fingerprint));
            }
        }
    }
    let top = held
        .values()
        .copied()
        .filter(|s| usable(*s))
        .max()
        .unwrap_or(0);
    let mut slots = SlotTable {
        free: (1..=top).filter(|s| !kept.contains(s)).collect(),
        next: top + 1,
    };
    let mut new_slots = Vec::with_capacity(arriving.len());
    for k in arriving {
        let account = &policy.accounts[k];
        let slot = slots.take(capacity.accounts)?;
        new_slots.push(slot);
        out.put(slot, Some(Arc::new(compile_account(account, slot)?)));
        order[k] = (slot, account.fingerprint);
    }
    let released: Vec<u32> = held
        .values()
        .copied()
        .filter(|s| usable(*s) && !kept.contains(s) && !new_slots.contains(s))
        .collect();
    let Accounts {
        entries: accounts,
        counts,
        touched,
    } = out;
    let out = Compiled {
        config: GenConfig {
            generation: 0,
            flags: generation_flags(&global, &counts),
            malformed: verdict_code(policy.global.malformed),
            event_rate: policy.global.events_per_second,
            _pad: 0,
        },
        slots,
        new_slots,
        global,
        accounts,
        order: order.into_iter().collect(),
        counts,
        id: COMPILATIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        base: 0,
        changed: touched
            .into_iter()
            .chain(released.iter().copied())
            .collect(),
        released,
    };
    check_capacity(&out.counts(), capacity)?;
    Ok(out)
}

/// The accounts of a compilation in the making.
struct Accounts {
    entries: imbl::Vector<Option<Arc<AccountEntries>>>,
    counts: Counts,
    /// Slots whose entries were replaced.
    touched: Vec<u32>,
}

impl Accounts {
    /// Gives `slot` its new entries (`None`: no account).
    fn put(&mut self, slot: u32, entries: Option<Arc<AccountEntries>>) {
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
struct Ends {
    /// Accounts matched from the front and from the back.
    head: usize,
    tail: usize,
    /// (new index, previous index, slot) of the matched accounts whose
    /// fingerprints differ: the changed ones.
    changed: Vec<(usize, usize, u32)>,
}

/// Matches `new` with the previous policy's accounts by position from both
/// ends: a position matches while the fingerprints are equal, or the ids are
/// (a changed account).
fn match_ends(new: &[Account], previous: &Compiled) -> Ends {
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
struct Middle {
    /// (slot, fingerprint) of its accounts, in order.
    order: Vec<(u32, u128)>,
    new_slots: Vec<u32>,
    released: Vec<u32>,
}

/// Matches the accounts `new` with the previous policy's accounts at
/// `positions` by id: accounts that stay keep their slot (and their entries
/// if unchanged); the others leave or arrive.
fn match_middle(
    new: &[Account],
    previous: &Compiled,
    positions: std::ops::Range<usize>,
    slots: &mut SlotTable,
    out: &mut Accounts,
    capacity: &Capacity,
) -> Result<Middle, CompileError> {
    let mut leaving: HashMap<&str, (u32, u128)> = previous
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

/// The `GenConfig` flags: which lookups the programs can skip.
fn generation_flags(global: &GlobalEntries, counts: &Counts) -> u32 {
    let mut flags = 0;
    if !global.rules_v4.is_empty() {
        flags |= GEN_RULES_V4;
    }
    if !global.rules_v6.is_empty() {
        flags |= GEN_RULES_V6;
    }
    if counts.wide_v4 > 0 {
        flags |= GEN_PREFIXES_V4;
    }
    if counts.wide_v6 > 0 {
        flags |= GEN_PREFIXES_V6;
    }
    flags
}

fn compile_global(lists: &[List], capacity: &Capacity) -> Result<GlobalEntries, CompileError> {
    if lists.len() > mmesh_common::stride::MAX_PAYLOAD as usize {
        return Err(CompileError::OverCapacity {
            what: "global lists",
            needed: lists.len(),
            capacity: mmesh_common::stride::MAX_PAYLOAD,
            flag: "(a fixed limit: merge lists)",
        });
    }
    let mut infos = Vec::with_capacity(lists.len());
    let resolver = Resolver::new(lists, |index, list| {
        infos.push(ListInfo {
            scope: "global".to_owned(),
            name: list.name.clone(),
        });
        index + 1
    });
    let (v4, v6) = resolver.resolve();
    let rules_v4: BTreeMap<_, _> = v4
        .into_iter()
        .map(|(addr, len, v)| (PrefixKey { addr, len }, v))
        .collect();
    let rules_v6: BTreeMap<_, _> = v6
        .into_iter()
        .map(|(addr, len, v)| (PrefixKey { addr, len }, v))
        .collect();
    let flat: Vec<(u32, u8, RuleValue)> = rules_v4
        .iter()
        .map(|(k, v)| (u32::from_be_bytes(k.addr), k.len, *v))
        .collect();
    Ok(GlobalEntries {
        source: Some(lists.to_vec()),
        stride: Stride::build(&flat, capacity.stride_chunks),
        rules_v4,
        rules_v6,
        lists: infos,
    })
}

fn compile_account(account: &Account, slot: u32) -> Result<AccountEntries, CompileError> {
    if account.lists.len() > MAX_ACCOUNT_LISTS {
        return Err(CompileError::OverCapacity {
            what: "lists in one account",
            needed: account.lists.len(),
            capacity: MAX_ACCOUNT_LISTS as u32,
            flag: "(a fixed limit: merge the account's lists)",
        });
    }
    let mut out = AccountEntries {
        source: Some(account.clone()),
        ..AccountEntries::default()
    };
    for net in &account.prefixes_v4 {
        if net.prefix_len() == 32 {
            out.hosts_v4.push(net.addr().octets());
        } else {
            out.prefixes_v4.push(PrefixKey {
                addr: net.addr().octets(),
                len: net.prefix_len(),
            });
        }
    }
    for net in &account.prefixes_v6 {
        if net.prefix_len() == 128 {
            out.hosts_v6.push(net.addr().octets());
        } else {
            out.prefixes_v6.push(PrefixKey {
                addr: net.addr().octets(),
                len: net.prefix_len(),
            });
        }
    }
    let mut infos = Vec::with_capacity(account.lists.len());
    let resolver = Resolver::new(&account.lists, |index, list| {
        infos.push(ListInfo {
            scope: account.id.clone(),
            name: list.name.clone(),
        });
        account_list_id(slot, index)
    });
    let (v4, v6) = resolver.resolve();
    out.rules_v4 = v4
        .into_iter()
        .map(|(addr, len, v)| (PrefixKey { addr, len }, v))
        .collect();
    out.rules_v6 = v6
        .into_iter()
        .map(|(addr, len, v)| (PrefixKey { addr, len }, v))
        .collect();
    out.lists = infos;
    let mut flags = ACCOUNT_ACTIVE;
    if !out.rules_v4.is_empty() {
        flags |= ACCOUNT_RULES_V4;
    }
    if !out.rules_v6.is_empty() {
        flags |= ACCOUNT_RULES_V6;
    }
    out.config = AccountConfig {
        flags,
        // The datapath's: the generation in which the slot got its account.
        epoch: 0,
        limits: [
            map_limits(account.inbound.as_ref()),
            map_limits(account.outbound.as_ref()),
        ],
    };
    Ok(out)
}

fn check_capacity(c: &Counts, capacity: &Capacity) -> Result<(), CompileError> {
    let checks = [
        (
            c.account_prefixes_v4,
            capacity.account_prefixes,
            "IPv4 account prefixes",
            "--max-account-prefixes",
        ),
        (
            c.account_prefixes_v6,
            capacity.account_prefixes,
            "IPv6 account prefixes",
            "--max-account-prefixes",
        ),
        (
            c.list_prefixes_v4,
            capacity.list_prefixes,
            "IPv4 list prefixes",
            "--max-list-prefixes",
        ),
        (
            c.list_prefixes_v6,
            capacity.list_prefixes,
            "IPv6 list prefixes",
            "--max-list-prefixes",
        ),
    ];
    for (needed, cap, what, flag) in checks {
        if needed > cap as usize {
            return Err(CompileError::OverCapacity {
                what,
                needed,
                capacity: cap,
                flag,
            });
        }
    }
    Ok(())
}

const fn verdict_code(action: Action) -> u32 {
    match action {
        Action::Drop => Verdict::Drop as u32,
        Action::Monitor => Verdict::Monitor as u32,
    }
}

fn map_limits(limits: Option<&DirLimits>) -> MapDirLimits {
    let Some(l) = limits else {
        return MapDirLimits::default();
    };
    let action = verdict_code(l.action);
    MapDirLimits {
        pps: l.pps.map_or_else(RateLimit::default, |r| {
            RateLimit::packets(r.rate, r.burst, action)
        }),
        bps: l.bps.map_or_else(RateLimit::default, |r| {
            RateLimit::bits(r.rate, r.burst, action)
        }),
    }
}

/// One entry of a scope's lists before resolution.
#[derive(Clone, Copy)]
struct Raw {
    addr: u128,
    len: u8,
    kind: ListKind,
    list: u32,
}

/// What the entries containing a prefix say: the most specific list of each
/// kind.
#[derive(Clone, Copy, Default)]
struct Resolution {
    allow: Option<u32>,
    drop: Option<u32>,
    monitor: Option<u32>,
}

impl Resolution {
    fn with(mut self, kind: ListKind, list: u32) -> Self {
        match kind {
            ListKind::Allow => self.allow = Some(list),
            ListKind::Block(Action::Drop) => self.drop = Some(list),
            ListKind::Block(Action::Monitor) => self.monitor = Some(list),
        }
        self
    }

    /// Allow beats block within a scope; drop beats monitor.
    fn value(self) -> RuleValue {
        let (action, list) = if let Some(list) = self.allow {
            (Verdict::Pass as u32, list)
        } else if let Some(list) = self.drop {
            (Verdict::Drop as u32, list)
        } else if let Some(list) = self.monitor {
            (Verdict::Monitor as u32, list)
        } else {
            (Verdict::Pass as u32, 0)
        };
        RuleValue { action, list }
    }

    /// What an address gets: `None` when it is not blocked (allowed, or in
    /// no block list).
    fn answer(self) -> Option<RuleValue> {
        Some(self.value()).filter(|v| v.action != Verdict::Pass as u32)
    }
}

/// Resolved list entries: (address, prefix length, rule).
type Resolved<A> = Vec<(A, u8, RuleValue)>;

/// Resolves one scope's lists into trie entries whose longest match is the
/// scope's answer.
struct Resolver {
    v4: Vec<Raw>,
    v6: Vec<Raw>,
}

impl Resolver {
    /// `id(index, list)` names each list (and may record it).
    fn new(lists: &[List], mut id: impl FnMut(u32, &List) -> u32) -> Self {
        let mut v4 = Vec::new();
        let mut v6 = Vec::new();
        for (index, list) in lists.iter().enumerate() {
            let id = id(index as u32, list);
            v4.extend(list.v4.iter().map(|n: &Ipv4Net| Raw {
                addr: u128::from(u32::from(n.network())),
                len: n.prefix_len(),
                kind: list.kind,
                list: id,
            }));
            v6.extend(list.v6.iter().map(|n: &Ipv6Net| Raw {
                addr: u128::from(n.network()),
                len: n.prefix_len(),
                kind: list.kind,
                list: id,
            }));
        }
        Self { v4, v6 }
    }

    /// The resolved entries, IPv4 and IPv6, in address order.
    fn resolve(self) -> (Resolved<[u8; 4]>, Resolved<[u8; 16]>) {
        let v4 = resolve(self.v4, 32)
            .into_iter()
            .map(|(a, l, v)| ((a as u32).to_be_bytes(), l, v))
            .collect();
        let v6 = resolve(self.v6, 128)
            .into_iter()
            .map(|(a, l, v)| (a.to_be_bytes(), l, v))
            .collect();
        (v4, v6)
    }
}

/// Whether prefix `outer` contains prefix `inner` (addresses right-aligned in
/// `width` bits).
fn contains(outer: (u128, u8), inner: (u128, u8), width: u8) -> bool {
    if outer.1 > inner.1 {
        return false;
    }
    let shift = u32::from(width - outer.1);
    if shift >= 128 {
        return true;
    }
    (outer.0 >> shift) == (inner.0 >> shift)
}

/// Sweeps the prefixes in address order with a stack of the prefixes that
/// contain the current one, so each prefix inherits the resolution of all its
/// ancestors in O(n log n). A prefix is emitted only where it changes the
/// answer: if the longest emitted prefix around it already gives its
/// addresses the same answer (same action, same list), it is redundant. That
/// leaves out allow entries with no block around them, and the longer
/// prefixes a shorter one of the same list already covers (a feed of /24s
/// inside its own /16s), which keeps the tries small and lets whole /16s be
/// decided by the stride.
fn resolve(mut raws: Vec<Raw>, width: u8) -> Vec<(u128, u8, RuleValue)> {
    raws.sort_by_key(|r| (r.addr, r.len));
    let mut out = Vec::with_capacity(raws.len());
    // (prefix, resolution, the answer of the longest emitted prefix at or
    // above it)
    let mut stack: Vec<(u128, u8, Resolution, Option<RuleValue>)> = Vec::new();
    let mut i = 0;
    while i < raws.len() {
        let (addr, len) = (raws[i].addr, raws[i].len);
        // The same prefix in several lists: merge them.
        let mut own = Resolution::default();
        while i < raws.len() && raws[i].addr == addr && raws[i].len == len {
            own = own.with(raws[i].kind, raws[i].list);
            i += 1;
        }
        while let Some(top) = stack.last() {
            if contains((top.0, top.1), (addr, len), width) {
                break;
            }
            stack.pop();
        }
        let (inherited, around) = stack
            .last()
            .map_or((Resolution::default(), None), |t| (t.2, t.3));
        let resolution = Resolution {
            allow: own.allow.or(inherited.allow),
            drop: own.drop.or(inherited.drop),
            monitor: own.monitor.or(inherited.monitor),
        };
        let answer = resolution.answer();
        if answer != around {
            out.push((addr, len, resolution.value()));
        }
        stack.push((addr, len, resolution, answer));
    }
    out
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn policy(yaml: &str) -> Policy {
        Policy::parse(yaml, "test", Path::new(".")).expect("valid policy")
    }

    fn fresh(yaml: &str) -> Compiled {
        compile(&policy(yaml), None, &Capacity::default()).expect("compiles")
    }

    /// An adopted datapath: accounts the pins name keep their slots (not
    /// new: their state is kept), new ones take free slots, the others are
    /// released; the next ordinary compile builds on the result.
    #[test]
    fn adopting_keeps_the_slots_the_pins_name() {
        let p = policy(
            "accounts:
  - { id: a, prefixes: [10.0.0.1/32] }
  - { id: b, prefixes: [10.0.0.2/32] }
  - { id: new, prefixes: [10.0.0.3/32] }
",
        );
        // An earlier agent had b in slot 3, a in slot 1, gone in slot 2.
        let held: HashMap<u128, u32> = [
            (account_key("b"), 3),
            (account_key("a"), 1),
            (account_key("gone"), 2),
        ]
        .into_iter()
        .collect();
        let c = compile_adopting(&p, &held, &Capacity::default()).expect("compiles");
        assert_eq!(c.slot_of("a"), Some(1));
        assert_eq!(c.slot_of("b"), Some(3));
        assert_eq!(c.slot_of("new"), Some(2), "the lowest free slot");
        assert_eq!(c.new_slots, [2]);
        assert!(c.released.is_empty(), "slot 2 changed hands instead");
        let held: HashMap<u128, u32> = [(account_key("gone"), 4), (account_key("a"), 1)]
            .into_iter()
            .collect();
        let c = compile_adopting(&p, &held, &Capacity::default()).expect("compiles");
        assert_eq!(c.released, [4]);
        assert_eq!(c.slot_of("a"), Some(1));
        let next = compile(&p, Some(&c), &Capacity::default()).expect("compiles");
        assert!(next.new_slots.is_empty() && next.released.is_empty());
        assert_eq!(next.slot_of("b"), c.slot_of("b"));
    }

    fn global4(c: &Compiled, cidr: &str) -> Option<RuleValue> {
        let net: Ipv4Net = cidr.parse().unwrap();
        c.global
            .rules_v4
            .get(&PrefixKey {
                addr: net.addr().octets(),
                len: net.prefix_len(),
            })
            .copied()
    }

    /// A longest-prefix-match over the compiled global entries, as the
    /// kernel does it.
    fn lookup4(c: &Compiled, addr: &str) -> Option<RuleValue> {
        let a: std::net::Ipv4Addr = addr.parse().unwrap();
        (0..=32u8)
            .rev()
            .find_map(|len| global4(c, &Ipv4Net::new(a, len).unwrap().trunc().to_string()))
    }

    fn list_name(c: &Compiled, v: Option<RuleValue>) -> &str {
        c.list(v.expect("a match").list)
            .expect("a named list")
            .name
            .as_str()
    }

    #[test]
    fn allow_beats_block_and_drop_beats_monitor_within_a_scope() {
        let c = fresh(
            "global:
  block:
    - { name: wide, cidrs: [10.0.0.0/8] }
    - { name: watch, action: monitor, cidrs: [10.9.0.0/16, 172.16.0.0/12] }
  allow:
    - { name: ok, cidrs: [10.1.0.0/16, 192.168.0.0/16] }
",
        );
        let (drop, pass, monitor) = (
            Verdict::Drop as u32,
            Verdict::Pass as u32,
            Verdict::Monitor as u32,
        );
        assert_eq!(lookup4(&c, "10.2.3.4").unwrap().action, drop);
        assert_eq!(
            lookup4(&c, "10.1.3.4").unwrap().action,
            pass,
            "allow inside block"
        );
        assert_eq!(
            lookup4(&c, "10.9.3.4").unwrap().action,
            drop,
            "monitor inside drop is still dropped"
        );
        assert_eq!(lookup4(&c, "172.16.1.1").unwrap().action, monitor);
        assert_eq!(lookup4(&c, "8.8.8.8"), None);
        assert_eq!(
            global4(&c, "192.168.0.0/16"),
            None,
            "an allow with no block around it is left out"
        );
        assert_eq!(list_name(&c, lookup4(&c, "10.2.3.4")), "wide");
        assert_eq!(c.config.flags & GEN_RULES_V4, GEN_RULES_V4);
        assert_eq!(c.config.flags & GEN_RULES_V6, 0);
    }

    #[test]
    fn block_inside_allow_is_allowed() {
        let c = fresh(
            "global:
  allow: [{ cidrs: [10.0.0.0/8] }]
  block: [{ cidrs: [10.1.0.0/16] }]
",
        );
        // Not blocked; the block entry inside the allow changes nothing and
        // is not even written.
        assert_eq!(lookup4(&c, "10.1.1.1"), None);
        assert!(c.global.rules_v4.is_empty());
    }

    #[test]
    fn redundant_prefixes_are_not_written() {
        let c = fresh(
            "global:
  block:
    - { name: feed, cidrs: [10.0.0.0/16, 10.0.1.0/24, 10.0.1.7/32, 10.9.0.0/24] }
    - { name: other, cidrs: [10.0.2.0/24] }
",
        );
        let written: Vec<String> = c
            .global
            .rules_v4
            .keys()
            .map(|k| format!("{}/{}", std::net::Ipv4Addr::from(k.addr), k.len))
            .collect();
        // The /24 and /32 of `feed` inside its own /16 add nothing; the /24 of
        // `other` is reported under its own name, so it stays.
        assert_eq!(written, ["10.0.0.0/16", "10.0.2.0/24", "10.9.0.0/24"]);
        assert_eq!(list_name(&c, lookup4(&c, "10.0.2.9")), "other");
        assert_eq!(list_name(&c, lookup4(&c, "10.0.1.7")), "feed");
    }

    #[test]
    fn accounts_get_stable_slots() {
        let p1 = policy(
            "accounts:
  - { id: a, prefixes: [10.0.0.1] }
  - { id: b, prefixes: [10.0.0.2, 10.2.0.0/16, '2001:db8::/64'] }
",
        );
        let c1 = compile(&p1, None, &Capacity::default()).unwrap();
        assert_eq!((c1.slot_of("a").unwrap(), c1.slot_of("b").unwrap()), (1, 2));
        assert_eq!(c1.new_slots, vec![1, 2]);
        assert_eq!(c1.account(2).unwrap().hosts_v4, vec![[10, 0, 0, 2]]);
        assert_eq!(c1.account(2).unwrap().prefixes_v4.len(), 1);
        assert_eq!(c1.account_id(2), Some("b"));
        assert_eq!(
            c1.config.flags & (GEN_PREFIXES_V4 | GEN_PREFIXES_V6),
            GEN_PREFIXES_V4 | GEN_PREFIXES_V6
        );

        // a leaves, c arrives: b keeps 2; c must not take a's slot in the
        // same change, so it gets 3; a later newcomer reuses 1.
        let p2 = policy(
            "accounts:
  - { id: c, prefixes: [10.0.0.3] }
  - { id: b, prefixes: [10.0.0.2] }
",
        );
        let c2 = compile(&p2, Some(&c1), &Capacity::default()).unwrap();
        assert_eq!((c2.slot_of("b").unwrap(), c2.slot_of("c").unwrap()), (2, 3));
        assert_eq!(c2.new_slots, vec![3]);
        let p3 = policy(
            "accounts:
  - { id: c, prefixes: [10.0.0.3] }
  - { id: b, prefixes: [10.0.0.2] }
  - { id: d, prefixes: [10.0.0.4] }
",
        );
        let c3 = compile(&p3, Some(&c2), &Capacity::default()).unwrap();
        assert_eq!(c3.slot_of("d").unwrap(), 1);
    }

    #[test]
    fn unchanged_pieces_are_reused_as_they_are() {
        let base = "global:
  block: [{ name: g, cidrs: [192.0.2.0/24] }]
accounts:
  - { id: a, prefixes: [10.0.0.1], limits: { inbound: { pps: 1000 } } }
  - { id: b, prefixes: [10.0.0.2], block: [{ name: own, cidrs: [198.51.100.0/24] }] }
";
        let c1 = fresh(base);
        // Same text: every piece is the same Arc, the slot table too.
        let c2 = compile(&policy(base), Some(&c1), &Capacity::default()).unwrap();
        assert!(Arc::ptr_eq(&c1.global, &c2.global));
        assert_eq!(c1.slots, c2.slots);
        assert!(
            c1.accounts()
                .all(|(s, a)| Arc::ptr_eq(a, c2.account(s).unwrap()))
        );
        // One account's limit changes: only its piece is new.
        let c3 = compile(
            &policy(&base.replace("pps: 1000", "pps: 2000")),
            Some(&c2),
            &Capacity::default(),
        )
        .unwrap();
        assert!(!Arc::ptr_eq(c2.account(1).unwrap(), c3.account(1).unwrap()));
        assert!(Arc::ptr_eq(c2.account(2).unwrap(), c3.account(2).unwrap()));
        assert!(Arc::ptr_eq(&c2.global, &c3.global));
        assert_eq!(
            c3.account(1).unwrap().config.limits[0].pps,
            // The default burst: half a second of the rate.
            RateLimit::packets(2000, 1000, Verdict::Drop as u32)
        );
        // The global list changes: a new global piece, the accounts stay.
        let c4 = compile(
            &policy(&base.replace("192.0.2.0/24", "192.0.2.0/25")),
            Some(&c3),
            &Capacity::default(),
        )
        .unwrap();
        assert!(!Arc::ptr_eq(&c3.global, &c4.global));
        assert!(Arc::ptr_eq(c3.account(2).unwrap(), c4.account(2).unwrap()));
        // Account list ids do not depend on other accounts.
        let id = c4.account(2).unwrap().rules_v4[0].1.list;
        assert_eq!(id, account_list_id(2, 0));
        assert_eq!(c4.list(id).unwrap().name, "own");
        assert_eq!(c4.list(id).unwrap().scope, "b");
    }

    #[test]
    fn account_lists_are_scoped_by_slot_and_limits_compiled() {
        let c = fresh(
            "accounts:
  - id: a
    prefixes: [10.0.0.1]
    mode: monitor
    block: [{ cidrs: ['2001:db8:bad::/48'] }]
    limits:
      outbound: { pps: 1000, bps: 8M }
",
        );
        let acc = &c.account(1).unwrap();
        assert_eq!(acc.config.flags, ACCOUNT_ACTIVE | ACCOUNT_RULES_V6);
        assert_eq!(
            acc.config.limits[0],
            MapDirLimits::default(),
            "no inbound limits"
        );
        let out = acc.config.limits[1];
        assert_eq!(
            out.pps.action,
            Verdict::Monitor as u32,
            "monitor mode applies to limits"
        );
        assert_eq!(
            out.pps,
            RateLimit::packets(1000, 500, Verdict::Monitor as u32)
        );
        assert_eq!(
            out.bps,
            RateLimit::bits(8_000_000, 4_000_000, Verdict::Monitor as u32)
        );
        let (key, value) = acc.rules_v6[0];
        assert_eq!(key.len, 48);
        assert_eq!(value.action, Verdict::Monitor as u32);
    }

    #[test]
    fn capacity_errors_name_the_flag() {
        let p = policy(
            "accounts:
  - { id: a, prefixes: [10.0.0.1] }
  - { id: b, prefixes: [10.0.0.2] }
",
        );
        let cap = Capacity {
            accounts: 1,
            ..Capacity::default()
        };
        let err = compile(&p, None, &cap).unwrap_err().to_string();
        assert!(
            err.contains("2 accounts") && err.contains("--max-accounts"),
            "{err}"
        );
        let p = policy("global:\n  block: [{ cidrs: [10.0.0.0/8, 11.0.0.0/8] }]\n");
        let cap = Capacity {
            list_prefixes: 1,
            ..Capacity::default()
        };
        let err = compile(&p, None, &cap).unwrap_err().to_string();
        assert!(
            err.contains("IPv4 list prefixes") && err.contains("--max-list-prefixes"),
            "{err}"
        );
    }

    /// A small policy from a list of (account number, variant): ids from a
    /// small pool so that consecutive policies share, add, drop, reorder
    /// and change accounts.
    fn policy_of(accounts: &[(u8, u8)]) -> Policy {
        use std::fmt::Write as _;
        let mut y =
            String::from("global:\n  block: [{ name: g, cidrs: [192.0.2.0/24] }]\naccounts:\n");
        let mut seen = std::collections::HashSet::new();
        for (n, variant) in accounts {
            if !seen.insert(*n) {
                continue;
            }
            let _ = write!(
                y,
                "  - {{ id: a{n}, prefixes: [10.0.{n}.1, '10.1.{n}.0/24'], limits: {{ inbound: {{ pps: {} }} }}",
                1000 + u32::from(*variant % 3)
            );
            if variant % 2 == 1 {
                let _ = write!(
                    y,
                    ", block: [{{ name: own, cidrs: [198.51.{}.0/24] }}]",
                    variant % 4
                );
            }
            y.push_str(" }\n");
        }
        policy(&y)
    }

    /// What an account puts in the maps, with list ids replaced by names so
    /// that it does not depend on the slot.
    #[allow(clippy::type_complexity, reason = "a test's tuple of what it compares")]
    fn portable(
        c: &Compiled,
        slot: u32,
    ) -> (
        Vec<[u8; 4]>,
        Vec<PrefixKey<[u8; 4]>>,
        Vec<(PrefixKey<[u8; 4]>, u32, String)>,
        AccountConfig,
    ) {
        let a = c.account(slot).expect("compiled");
        let rules = a
            .rules_v4
            .iter()
            .map(|(k, v)| (*k, v.action, c.list(v.list).unwrap().name.clone()))
            .collect();
        (a.hosts_v4.clone(), a.prefixes_v4.clone(), rules, a.config)
    }

    proptest::proptest! {
        /// Compiling B against A gives the same entries as compiling B
        /// afresh, accounts present in both keep their slots, no slot is
        /// shared, and the new slots are exactly those of the new accounts.
        #[test]
        fn incremental_compile_matches_a_fresh_one(
            a in proptest::collection::vec((0u8..12, 0u8..6), 0..10),
            b in proptest::collection::vec((0u8..12, 0u8..6), 0..10),
        ) {
            let cap = Capacity::default();
            let (pa, pb) = (policy_of(&a), policy_of(&b));
            let ca = compile(&pa, None, &cap).unwrap();
            let incremental = compile(&pb, Some(&ca), &cap).unwrap();
            let fresh = compile(&pb, None, &cap).unwrap();
            proptest::prop_assert_eq!(incremental.counts(), fresh.counts());
            proptest::prop_assert_eq!(incremental.config, fresh.config);
            let mut used = std::collections::HashSet::new();
            for account in &pb.accounts {
                let si = incremental.slot_of(&account.id).unwrap();
                let sf = fresh.slot_of(&account.id).unwrap();
                proptest::prop_assert!(used.insert(si), "slot {} given twice", si);
                proptest::prop_assert_eq!(portable(&incremental, si), portable(&fresh, sf));
                match ca.slot_of(&account.id) {
                    Some(before) => {
                        proptest::prop_assert_eq!(si, before, "{} moved", account.id);
                        proptest::prop_assert!(!incremental.new_slots.contains(&si));
                    }
                    None => proptest::prop_assert!(incremental.new_slots.contains(&si)),
                }
            }
            proptest::prop_assert_eq!(incremental.accounts().count(), pb.accounts.len());
            proptest::prop_assert_eq!(incremental.order.len(), pb.accounts.len());
        }
    }

    proptest::proptest! {
        /// The compiled trie answers every address exactly as the scope's
        /// rules say, computed naively over all entries.
        #[test]
        fn resolution_matches_naive_semantics(
            entries in proptest::collection::vec((0u32..256, 0u8..=8, 0u8..3), 1..40),
            probes in proptest::collection::vec(0u32..256, 1..64),
        ) {
            // 8-bit address space so that entries overlap a lot.
            let raws: Vec<Raw> = entries.iter().enumerate().map(|(i, (a, len, k))| {
                let mask = if *len == 0 { 0 } else { 0xffu32 << (8 - len) & 0xff };
                Raw {
                    addr: u128::from(a & mask),
                    len: *len,
                    kind: match k { 0 => ListKind::Allow, 1 => ListKind::Block(Action::Drop), _ => ListKind::Block(Action::Monitor) },
                    list: i as u32 + 1,
                }
            }).collect();
            let table = resolve(raws.clone(), 8);
            for p in probes {
                let p = u128::from(p);
                let matching: Vec<&Raw> = raws.iter().filter(|r| contains((r.addr, r.len), (p, 8), 8)).collect();
                let expected = if matching.iter().any(|r| r.kind == ListKind::Allow) {
                    Verdict::Pass as u32
                } else if matching.iter().any(|r| r.kind == ListKind::Block(Action::Drop)) {
                    Verdict::Drop as u32
                } else if matching.is_empty() {
                    Verdict::Pass as u32
                } else {
                    Verdict::Monitor as u32
                };
                let got = table.iter().filter(|(a, l, _)| contains((*a, *l), (p, 8), 8)).max_by_key(|(_, l, _)| *l).map_or(Verdict::Pass as u32, |(_, _, v)| v.action);
                proptest::prop_assert_eq!(got, expected, "probe {}", p);
            }
        }
    }
}
