//! Writing compiled policies into the inactive half, and the flip.

use std::sync::Arc;

use aya::maps::{HashMap, IterableMap as _, LpmTrie, MapData, MapError, lpm_trie::Key};
use mmesh_common::{
    Direction, Reason,
    maps::{
        AccountConfig, CounterKey, GenConfig, NO_ACCOUNT, RateState, RuleValue, SCOPE_BITS,
        ScopedV4, ScopedV6, account_index, flow_generation, names, rate_index, sampler_index,
        scope,
    },
    stride,
};

use super::{Datapath, DatapathError, error::batch_error, load::Maps};
use crate::{
    batch,
    compile::{AccountEntries, Compiled, GlobalEntries, PrefixKey},
    stride::Stride,
};

/// Entries from which [`Maps::flush`] writes from two threads: below it,
/// starting the thread costs more than it saves (a one-account delta
/// writes a handful).
const PARALLEL_WRITE: usize = 4096;

/// Slots whose new entries are gathered and written together. Gathered at
/// once, the entries of a first policy of 100,000 accounts took about 24 MB
/// (by their sizes, the vectors' spare room included), at the moment the
/// agent holds the most: the validated policy and its compiled form.
const FLUSH_SLOTS: usize = 8192;

/// Runs `jobs`, on this thread and, if `parallel`, on a second one, each
/// taking the next job not taken; the first error of each thread (a
/// thread stops at its first error).
fn side_by_side(
    jobs: &[&(dyn Fn() -> Result<(), DatapathError> + Sync)],
    parallel: bool,
) -> Result<(), DatapathError> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let work = || {
        while let Some(job) = jobs.get(next.fetch_add(1, std::sync::atomic::Ordering::Relaxed)) {
            job()?;
        }
        Ok(())
    };
    if !parallel {
        return work();
    }
    std::thread::scope(|s| {
        let other = s.spawn(work);
        let mine = work();
        let theirs = other
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        mine.and(theirs)
    })
}

/// A slot's entries before and after a change.
type Change = (
    u32,
    Option<Arc<AccountEntries>>,
    Option<Arc<AccountEntries>>,
);

/// Account entries gathered for one batched system call per map
/// ([`batch::update`]): the first load of a large policy writes hundreds of
/// thousands of them (and 10,000 account rules one call each took tens of
/// milliseconds).
#[derive(Default)]
struct Pending {
    hosts_v4: Batch<ScopedV4, u32>,
    hosts_v6: Batch<ScopedV6, u32>,
    prefixes_v4: Batch<Key<ScopedV4>, u32>,
    prefixes_v6: Batch<Key<ScopedV6>, u32>,
    rules_v4: Batch<Key<ScopedV4>, RuleValue>,
    rules_v6: Batch<Key<ScopedV6>, RuleValue>,
    accounts: Batch<u32, AccountConfig>,
}

impl Pending {
    /// Gathers the entries of `new` that `old` does not have (or has with
    /// another value), and the account's settings; without `new`, leaves a
    /// tombstone holding the slot's epoch.
    fn put(
        &mut self,
        half: u32,
        slot: u32,
        old: &AccountEntries,
        new: Option<&AccountEntries>,
        epochs: &[u32],
    ) {
        let epoch = epochs.get(slot as usize).copied().unwrap_or(0);
        let Some(new) = new else {
            let tombstone = AccountConfig {
                epoch,
                ..AccountConfig::default()
            };
            self.accounts.push(account_index(slot, half), tombstone);
            return;
        };
        let own = scope(half, NO_ACCOUNT);
        let mine = scope(half, slot);
        for a in gone(&new.hosts_v4, &old.hosts_v4) {
            self.hosts_v4.push(
                ScopedV4 {
                    scope: own,
                    addr: *a,
                },
                slot,
            );
        }
        for a in gone(&new.hosts_v6, &old.hosts_v6) {
            self.hosts_v6.push(
                ScopedV6 {
                    scope: own,
                    addr: *a,
                },
                slot,
            );
        }
        for k in gone(&new.prefixes_v4, &old.prefixes_v4) {
            self.prefixes_v4.push(key4(own, k.addr, k.len), slot);
        }
        for k in gone(&new.prefixes_v6, &old.prefixes_v6) {
            self.prefixes_v6.push(key6(own, k.addr, k.len), slot);
        }
        for (k, v) in gone(new.rules_v4(), old.rules_v4()) {
            self.rules_v4.push(key4(mine, k.addr, k.len), *v);
        }
        for (k, v) in gone(new.rules_v6(), old.rules_v6()) {
            self.rules_v6.push(key6(mine, k.addr, k.len), *v);
        }
        let config = AccountConfig {
            epoch,
            ..new.config
        };
        if old.config != config {
            self.accounts.push(account_index(slot, half), config);
        }
    }
}

struct Batch<K, V> {
    keys: Vec<K>,
    values: Vec<V>,
}

impl<K, V> Default for Batch<K, V> {
    fn default() -> Self {
        Self {
            keys: Vec::new(),
            values: Vec::new(),
        }
    }
}

impl<K: aya::Pod, V: aya::Pod> Batch<K, V> {
    fn push(&mut self, key: K, value: V) {
        self.keys.push(key);
        self.values.push(value);
    }

    /// Writes the batch into `map`, named `name` in the error.
    fn write(&self, map: &MapData, name: &'static str) -> Result<(), DatapathError> {
        batch::update(map, &self.keys, &self.values).map_err(batch_error(name))
    }
}
impl Maps {
    /// Brings the global lists of half `half` from `current` to `target`.
    fn sync_global(
        &mut self,
        half: u32,
        current: &GlobalEntries,
        target: &GlobalEntries,
    ) -> Result<(), DatapathError> {
        let own = scope(half, NO_ACCOUNT);
        let v4 = |k: &PrefixKey<[u8; 4]>| key4(own, k.addr, k.len);
        let v6 = |k: &PrefixKey<[u8; 16]>| key6(own, k.addr, k.len);
        sync_lpm(
            &mut self.rules_v4,
            names::RULES_V4,
            current.rules_v4.iter(),
            target.rules_v4.iter(),
            v4,
        )?;
        sync_lpm(
            &mut self.rules_v6,
            names::RULES_V6,
            current.rules_v6.iter(),
            target.rules_v6.iter(),
            v6,
        )?;
        self.sync_stride(half, &current.stride, &target.stride)
    }

    /// Brings the accounts of half `half` from `current` to `target`,
    /// touching only the accounts whose entries are not the very same
    /// (`Arc`). Every entry that goes away is removed before any entry is
    /// written, so that a prefix passing from one account to another in the
    /// same change ends up with its new owner.
    fn sync_accounts(
        &mut self,
        half: u32,
        current: &imbl::Vector<Option<Arc<AccountEntries>>>,
        target: &imbl::Vector<Option<Arc<AccountEntries>>>,
        epochs: &[u32],
    ) -> Result<(), DatapathError> {
        let empty = AccountEntries::default();
        let mut changed: Vec<(u32, &AccountEntries, Option<&AccountEntries>)> = Vec::new();
        let pad = std::iter::repeat(&None);
        let pairs = current
            .iter()
            .chain(pad.clone())
            .zip(target.iter().chain(pad))
            .take(current.len().max(target.len()));
        for (slot, (old, new)) in pairs.enumerate() {
            match (old.as_ref(), new.as_ref()) {
                (Some(o), Some(n)) if Arc::ptr_eq(o, n) => {}
                (None, None) => {}
                (o, n) => changed.push((slot as u32, o.map_or(&empty, |o| &**o), n.map(|n| &**n))),
            }
        }
        self.change_slots(half, &changed, epochs)
    }

    /// Removes what the slots of `changed` no longer hold, then writes what
    /// they hold anew, [`FLUSH_SLOTS`] slots at a time.
    fn change_slots(
        &mut self,
        half: u32,
        changed: &[(u32, &AccountEntries, Option<&AccountEntries>)],
        epochs: &[u32],
    ) -> Result<(), DatapathError> {
        let empty = AccountEntries::default();
        for (slot, old, new) in changed {
            self.remove_entries(half, *slot, old, new.unwrap_or(&empty))?;
        }
        for part in changed.chunks(FLUSH_SLOTS) {
            let mut pending = Pending::default();
            for (slot, old, new) in part {
                pending.put(half, *slot, old, *new, epochs);
            }
            self.flush(&pending)?;
        }
        Ok(())
    }

    /// As [`Maps::sync_accounts`], for the listed slots only.
    fn sync_slots(
        &mut self,
        half: u32,
        slots: &[u32],
        current: &imbl::Vector<Option<Arc<AccountEntries>>>,
        target: &imbl::Vector<Option<Arc<AccountEntries>>>,
        epochs: &[u32],
    ) -> Result<(), DatapathError> {
        let empty = AccountEntries::default();
        let entries = |v: &imbl::Vector<Option<Arc<AccountEntries>>>, slot: u32| {
            v.get(slot as usize).cloned().flatten()
        };
        let changed: Vec<Change> = slots
            .iter()
            .map(|slot| (*slot, entries(current, *slot), entries(target, *slot)))
            .collect();
        let changed: Vec<_> = changed
            .iter()
            .map(|(slot, old, new)| (*slot, old.as_deref().unwrap_or(&empty), new.as_deref()))
            .collect();
        self.change_slots(half, &changed, epochs)
    }

    /// Removes the entries of `old` that `new` does not have.
    fn remove_entries(
        &mut self,
        half: u32,
        slot: u32,
        old: &AccountEntries,
        new: &AccountEntries,
    ) -> Result<(), DatapathError> {
        let own = scope(half, NO_ACCOUNT);
        let mine = scope(half, slot);
        for a in gone(&old.hosts_v4, &new.hosts_v4) {
            remove_hash(
                &mut self.hosts_v4,
                names::HOSTS_V4,
                &ScopedV4 {
                    scope: own,
                    addr: *a,
                },
            )?;
        }
        for a in gone(&old.hosts_v6, &new.hosts_v6) {
            remove_hash(
                &mut self.hosts_v6,
                names::HOSTS_V6,
                &ScopedV6 {
                    scope: own,
                    addr: *a,
                },
            )?;
        }
        for k in gone(&old.prefixes_v4, &new.prefixes_v4) {
            remove_lpm(
                &mut self.prefixes_v4,
                names::PREFIXES_V4,
                &key4(own, k.addr, k.len),
            )?;
        }
        for k in gone(&old.prefixes_v6, &new.prefixes_v6) {
            remove_lpm(
                &mut self.prefixes_v6,
                names::PREFIXES_V6,
                &key6(own, k.addr, k.len),
            )?;
        }
        let keys4: Vec<_> = new.rules_v4().iter().map(|(k, _)| *k).collect();
        for (k, _) in old.rules_v4().iter().filter(|(k, _)| !keys4.contains(k)) {
            remove_lpm(
                &mut self.acct_rules_v4,
                names::ACCT_RULES_V4,
                &key4(mine, k.addr, k.len),
            )?;
        }
        let keys6: Vec<_> = new.rules_v6().iter().map(|(k, _)| *k).collect();
        for (k, _) in old.rules_v6().iter().filter(|(k, _)| !keys6.contains(k)) {
            remove_lpm(
                &mut self.acct_rules_v6,
                names::ACCT_RULES_V6,
                &key6(mine, k.addr, k.len),
            )?;
        }
        Ok(())
    }

    /// Writes the batched entries of `pending`. Order does not matter: the
    /// half is inactive, and a failure leaves it unknown.
    ///
    /// A large batch is written from two threads, each taking the next map
    /// to write (the tries first: they take longest): the time goes to the
    /// kernel's map updates, which lock each map on its own, so two maps are
    /// written side by side on two CPUs. (The thread is joined before
    /// anything packets see changes.)
    fn flush(&mut self, pending: &Pending) -> Result<(), DatapathError> {
        let p4 = || {
            pending
                .prefixes_v4
                .write(self.prefixes_v4.map(), names::PREFIXES_V4)
        };
        let p6 = || {
            pending
                .prefixes_v6
                .write(self.prefixes_v6.map(), names::PREFIXES_V6)
        };
        let h4 = || pending.hosts_v4.write(self.hosts_v4.map(), names::HOSTS_V4);
        let h6 = || pending.hosts_v6.write(self.hosts_v6.map(), names::HOSTS_V6);
        let accounts = || pending.accounts.write(self.accounts.map(), names::ACCOUNTS);
        let rules = || {
            pending
                .rules_v4
                .write(self.acct_rules_v4.map(), names::ACCT_RULES_V4)?;
            pending
                .rules_v6
                .write(self.acct_rules_v6.map(), names::ACCT_RULES_V6)
        };
        let entries = pending.hosts_v4.keys.len()
            + pending.hosts_v6.keys.len()
            + pending.prefixes_v4.keys.len()
            + pending.prefixes_v6.keys.len()
            + pending.rules_v4.keys.len()
            + pending.rules_v6.keys.len()
            + pending.accounts.keys.len();
        side_by_side(
            &[&p4, &p6, &h4, &h6, &rules, &accounts],
            entries >= PARALLEL_WRITE,
        )
    }

    /// Writes the stride nodes of half `half` that differ. Chunk numbers
    /// become node indices of the half's share of the chunk pool.
    fn sync_stride(
        &mut self,
        half: u32,
        current: &Stride,
        target: &Stride,
    ) -> Result<(), DatapathError> {
        let base = stride::CHUNK_BASE + half * self.stride_chunks;
        for (i, node) in target.l1.iter().enumerate() {
            if current.l1.get(i) == Some(node) {
                continue;
            }
            let mut placed = *node;
            for e in &mut placed {
                if stride::kind(*e) == stride::KIND_CHUNK {
                    *e = stride::chunk(base + stride::payload(*e));
                }
            }
            self.stride
                .set(half * stride::L1_NODES + i as u32, placed, 0)
                .map_err(|e| DatapathError::map(names::STRIDE, e))?;
        }
        for (k, node) in target.chunks.iter().enumerate() {
            if current.chunks.get(k) != Some(node) {
                self.stride
                    .set(base + k as u32, node, 0)
                    .map_err(|e| DatapathError::map(names::STRIDE, e))?;
            }
        }
        Ok(())
    }
}

/// The items of `a` that `b` does not have. Accounts hold a handful of
/// entries, where a scan beats hashing; large ones go through a set.
fn gone<'a, T: PartialEq + Eq + std::hash::Hash + Copy>(
    a: &'a [T],
    b: &'a [T],
) -> impl Iterator<Item = &'a T> + 'a {
    let set: Option<std::collections::HashSet<T>> =
        (b.len() > 32).then(|| b.iter().copied().collect());
    a.iter().filter(move |x| match &set {
        Some(set) => !set.contains(*x),
        None => !b.contains(x),
    })
}

fn remove_hash<K: aya::Pod>(
    map: &mut HashMap<MapData, K, u32>,
    name: &'static str,
    key: &K,
) -> Result<(), DatapathError> {
    match map.remove(key) {
        Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
        Err(e) => Err(DatapathError::map(name, e)),
    }
}

fn remove_lpm<K: aya::Pod, V: aya::Pod>(
    map: &mut LpmTrie<MapData, K, V>,
    name: &'static str,
    key: &Key<K>,
) -> Result<(), DatapathError> {
    match map.remove(key) {
        Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
        Err(e) => Err(DatapathError::map(name, e)),
    }
}
/// The LPM key of `addr/len` in the scope word `scope`.
fn key4(scope: u32, addr: [u8; 4], len: u8) -> Key<ScopedV4> {
    Key::new(SCOPE_BITS + u32::from(len), ScopedV4 { scope, addr })
}

fn key6(scope: u32, addr: [u8; 16], len: u8) -> Key<ScopedV6> {
    Key::new(SCOPE_BITS + u32::from(len), ScopedV6 { scope, addr })
}

impl Datapath {
    /// Applies a compiled policy all-or-nothing and returns its generation.
    /// When it returns, packets see the new policy; the standby half still
    /// holds the previous one until [`Datapath::sync_standby`] (the next
    /// apply works either way).
    pub fn apply(&mut self, compiled: Arc<Compiled>) -> Result<u64, DatapathError> {
        let generation = self.generation + 1;
        let new = 1 - self.config.active;
        // Slots that change hands start a new epoch.
        let mut epochs = self.epochs.clone();
        epochs.resize(epochs.len().max(compiled.accounts.len()), 0);
        let stamp = flow_generation(generation);
        for slot in &compiled.new_slots {
            epochs[*slot as usize] = stamp;
        }
        for slot in &compiled.released {
            epochs[*slot as usize] = stamp;
        }

        // The half about to be written was the active one before the last
        // flip: no program may still be reading it.
        self.quiesce()?;
        self.reset_slots(&compiled.new_slots)?;
        if let Some(pins) = &self.pins {
            // Before the flip, so that the record is never behind a
            // generation packets have seen (a recreated CONFIG starts from
            // it); and before the standby half changes, which it then no
            // longer says is a copy of the active one.
            pins.stamp(generation, false)?;
        }
        self.write_half(new, compiled, generation, &epochs)?;
        // The flip: one CONFIG write whose only changed word is `active`.
        let mut flipped = self.config;
        flipped.active = new;
        self.maps
            .config
            .set(0, flipped, 0)
            .map_err(|e| DatapathError::map(names::CONFIG, e))?;
        self.config = flipped;
        self.generation = generation;
        self.epochs = epochs;
        self.quiesced = false;
        if let Some(pins) = &self.pins {
            // Which account holds which slot, for the next agent: after the
            // flip, so that it describes the policy in force. Lost on a crash
            // right here, a slot's account is taken for a new one next time
            // (its counters and buckets start again), never for another.
            let active = self.halves[new as usize].as_ref().expect("just written");
            let (slots, ids): (Vec<u32>, Vec<u128>) = active
                .new_slots
                .iter()
                .chain(&active.released)
                .map(|slot| {
                    let id = active
                        .account_id(*slot)
                        .map_or(0, crate::compile::account_key);
                    (*slot, id)
                })
                .unzip();
            pins.set_slot_ids(&slots, &ids)?;
        }
        Ok(generation)
    }

    /// Brings the standby half up to date with the policy in force, so that
    /// the next change only writes its own difference. Waits for programs
    /// still reading the standby half first.
    pub fn sync_standby(&mut self) -> Result<(), DatapathError> {
        let Some(active) = self.halves[self.config.active as usize].clone() else {
            return Ok(());
        };
        self.quiesce()?;
        let epochs = self.epochs.clone();
        self.write_half(1 - self.config.active, active, self.generation, &epochs)?;
        if let Some(pins) = &self.pins {
            // A restarted agent reads back one half instead of two.
            pins.stamp(self.generation, true)?;
        }
        Ok(())
    }

    /// Waits, once per flip, for the programs that may still use the half
    /// that was active before it ([`crate::barrier::ProgramBarrier`]).
    fn quiesce(&mut self) -> Result<(), DatapathError> {
        if !self.quiesced {
            self.barrier.wait().map_err(DatapathError::Barrier)?;
            self.quiesced = true;
        }
        Ok(())
    }

    /// Clears the rate-limit and sampler state, and the counters, of slots
    /// that an account takes over, unless still clean (never given out
    /// since those maps were created: the first 100,000-account policy of a
    /// new agent spent a quarter of a second writing a million zeroes).
    fn reset_slots(&mut self, slots: &[u32]) -> Result<(), DatapathError> {
        let clean_from = self.clean_from;
        // Before any write: a slot given out is never taken for clean
        // again, whatever happens next.
        if let Some(top) = slots.iter().max() {
            self.clean_from = clean_from.max(top.saturating_add(1));
        }
        let slots: Vec<u32> = slots.iter().copied().filter(|s| *s < clean_from).collect();
        if slots.is_empty() {
            return Ok(());
        }
        let mut rate = Batch::default();
        let mut sampler = Batch::default();
        for &slot in &slots {
            for d in Direction::ALL {
                rate.push(rate_index(slot, d as u8), RateState::default());
            }
            for r in Reason::ALL {
                sampler.push(sampler_index(slot, r as u8), 0u64);
            }
        }
        rate.write(self.maps.rate_state.map(), names::RATE_STATE)?;
        sampler.write(self.maps.sampler.map(), names::SAMPLER)?;
        let taken: std::collections::HashSet<u32> = slots.iter().copied().collect();
        let stale: Vec<CounterKey> = self
            .maps
            .account_counters
            .keys()
            .filter_map(Result::ok)
            .filter(|k| taken.contains(&k.slot))
            .collect();
        for key in stale {
            match self.maps.account_counters.remove(&key) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(DatapathError::map(names::ACCOUNT_COUNTERS, e)),
            }
        }
        Ok(())
    }

    /// Makes half `half` hold `target` (of generation `generation`).
    fn write_half(
        &mut self,
        half: u32,
        target: Arc<Compiled>,
        generation: u64,
        epochs: &[u32],
    ) -> Result<(), DatapathError> {
        let current = match self.halves[half as usize].take() {
            Some(c) => c,
            None => Arc::new(self.read_half(half)?),
        };
        // From here until success the half is unknown (`None`).
        if !Arc::ptr_eq(&current.global, &target.global) {
            self.maps
                .sync_global(half, &current.global, &target.global)?;
        }
        if current.id == target.base {
            // The half holds what the target was compiled against: only the
            // slots the compilation touched can differ.
            self.maps.sync_slots(
                half,
                &target.changed,
                &current.accounts,
                &target.accounts,
                epochs,
            )?;
        } else {
            self.maps
                .sync_accounts(half, &current.accounts, &target.accounts, epochs)?;
        }
        // Last, the half's global settings (the other half's bytes are
        // rewritten unchanged).
        let mut config = self.config;
        config.halves[half as usize] = GenConfig {
            generation,
            ..target.config
        };
        if config != self.config {
            self.maps
                .config
                .set(0, config, 0)
                .map_err(|e| DatapathError::map(names::CONFIG, e))?;
            self.config = config;
        }
        self.halves[half as usize] = Some(target);
        Ok(())
    }
}

/// Entries to delete and entries to write to get from `old` to `new`.
/// Entries to delete and entries to write to get from `old` to `new`, both
/// sorted by key (a merge walk: linear in the entries).
fn diff<'a, K: Ord + 'a, V: PartialEq + Copy + 'a>(
    old: impl Iterator<Item = (&'a K, &'a V)>,
    new: impl Iterator<Item = (&'a K, &'a V)>,
) -> (Vec<&'a K>, Vec<(&'a K, V)>) {
    let (mut old, mut new) = (old.peekable(), new.peekable());
    let (mut removed, mut changed) = (Vec::new(), Vec::new());
    loop {
        match (old.peek(), new.peek()) {
            (Some((ok, ov)), Some((nk, nv))) => match ok.cmp(nk) {
                std::cmp::Ordering::Less => {
                    removed.push(*ok);
                    old.next();
                }
                std::cmp::Ordering::Greater => {
                    changed.push((*nk, **nv));
                    new.next();
                }
                std::cmp::Ordering::Equal => {
                    if ov != nv {
                        changed.push((*nk, **nv));
                    }
                    old.next();
                    new.next();
                }
            },
            (Some((ok, _)), None) => {
                removed.push(*ok);
                old.next();
            }
            (None, Some((nk, nv))) => {
                changed.push((*nk, **nv));
                new.next();
            }
            (None, None) => return (removed, changed),
        }
    }
}

fn sync_lpm<'a, A: Ord + 'a, K: aya::Pod, V: aya::Pod + PartialEq + 'a>(
    map: &mut LpmTrie<MapData, K, V>,
    name: &'static str,
    old: impl Iterator<Item = (&'a A, &'a V)>,
    new: impl Iterator<Item = (&'a A, &'a V)>,
    key: impl Fn(&A) -> Key<K>,
) -> Result<(), DatapathError> {
    let (removed, changed) = diff(old, new);
    for a in removed {
        match map.remove(&key(a)) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(DatapathError::map(name, e)),
        }
    }
    // Batched ([`batch::update`]): a system call per entry took tens of
    // milliseconds for ten thousand.
    let mut batch = Batch::default();
    for (a, v) in changed {
        batch.push(key(a), v);
    }
    batch.write(map.map(), name)
}
