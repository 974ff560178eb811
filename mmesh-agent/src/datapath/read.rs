//! Reading the kernel's state: counters and totals, and what a policy half
//! holds.

use std::{
    collections::BTreeMap,
    os::fd::{AsFd as _, OwnedFd},
    sync::Arc,
};

use aya::maps::{HashMap, IterableMap as _, LpmTrie, MapData, MapError};
use mmesh_common::{
    Direction, Reason, Verdict,
    maps::{
        ACCOUNT_ACTIVE, AccountConfig, Counter, NO_ACCOUNT, RuleValue, SCOPE_BITS, account_index,
        flow_generation, flow_tag_parts, names,
    },
    stride,
};

use super::{Datapath, DatapathError, load::Maps};
use crate::{
    batch,
    compile::{AccountEntries, AccountLists, Compiled, GlobalEntries, PrefixKey},
    stride::Stride,
};

/// One account's entries as they are read back, map by map.
#[derive(Default)]
struct ReadBack {
    config: AccountConfig,
    hosts_v4: Vec<[u8; 4]>,
    hosts_v6: Vec<[u8; 16]>,
    prefixes_v4: Vec<PrefixKey<[u8; 4]>>,
    prefixes_v6: Vec<PrefixKey<[u8; 16]>>,
    rules_v4: Vec<(PrefixKey<[u8; 4]>, RuleValue)>,
    rules_v6: Vec<(PrefixKey<[u8; 16]>, RuleValue)>,
}

impl ReadBack {
    fn into_entries(self) -> AccountEntries {
        AccountEntries {
            id: None,
            config: self.config,
            hosts_v4: self.hosts_v4.into(),
            hosts_v6: self.hosts_v6.into(),
            prefixes_v4: self.prefixes_v4.into(),
            prefixes_v6: self.prefixes_v6.into(),
            lists: AccountLists {
                rules_v4: self.rules_v4.into(),
                rules_v6: self.rules_v6.into(),
                names: Box::default(),
            }
            .boxed(),
        }
    }
}

/// Totals by reason, verdict and direction, summed over CPUs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub counters: BTreeMap<(Reason, Verdict, Direction), Counter>,
    pub events_lost: u64,
    pub counters_full: u64,
    pub rate_contended: u64,
    pub pull_failed: u64,
    /// Drops and monitored packets over the event rate of their (account,
    /// reason): not reported as events.
    pub events_sampled: u64,
}

impl Maps {
    /// The accounts' entries in half `half`, by slot (slots up to
    /// `max_slot`).
    fn read_accounts(
        &self,
        half: u32,
        max_slot: u32,
    ) -> Result<BTreeMap<u32, AccountEntries>, DatapathError> {
        let mut accounts: BTreeMap<u32, ReadBack> = BTreeMap::new();
        for (key, slot) in hash_entries(&self.hosts_v4, names::HOSTS_V4, half, |k| k.scope)? {
            accounts.entry(slot).or_default().hosts_v4.push(key.addr);
        }
        for (key, slot) in hash_entries(&self.hosts_v6, names::HOSTS_V6, half, |k| k.scope)? {
            accounts.entry(slot).or_default().hosts_v6.push(key.addr);
        }
        for (key, len, slot) in
            lpm_entries(&self.prefixes_v4, names::PREFIXES_V4, half, |k| k.scope)?
        {
            let entry = accounts.entry(slot).or_default();
            entry.prefixes_v4.push(PrefixKey {
                addr: key.addr,
                len,
            });
        }
        for (key, len, slot) in
            lpm_entries(&self.prefixes_v6, names::PREFIXES_V6, half, |k| k.scope)?
        {
            let entry = accounts.entry(slot).or_default();
            entry.prefixes_v6.push(PrefixKey {
                addr: key.addr,
                len,
            });
        }
        // Account rules are scoped by their slot.
        let slot_of = |scope: u32| scope & !(1 << 31);
        for (key, len, rule) in
            lpm_entries(&self.acct_rules_v4, names::ACCT_RULES_V4, half, |k| k.scope)?
        {
            let entry = accounts.entry(slot_of(key.scope)).or_default();
            entry.rules_v4.push((
                PrefixKey {
                    addr: key.addr,
                    len,
                },
                rule,
            ));
        }
        for (key, len, rule) in
            lpm_entries(&self.acct_rules_v6, names::ACCT_RULES_V6, half, |k| k.scope)?
        {
            let entry = accounts.entry(slot_of(key.scope)).or_default();
            entry.rules_v6.push((
                PrefixKey {
                    addr: key.addr,
                    len,
                },
                rule,
            ));
        }
        let configs = self.account_configs()?;
        for slot in 1..=max_slot {
            let config = configs
                .get(account_index(slot, half) as usize)
                .copied()
                .unwrap_or_default();
            if config.flags & ACCOUNT_ACTIVE != 0 {
                accounts.entry(slot).or_default().config = config;
            }
        }
        Ok(accounts
            .into_iter()
            .map(|(slot, a)| (slot, a.into_entries()))
            .collect())
    }

    /// Every entry of `ACCOUNTS`, by index, in batches.
    pub(super) fn account_configs(&self) -> Result<Vec<AccountConfig>, DatapathError> {
        let entries =
            batch::lookup_all::<u32, AccountConfig>(self.accounts.map()).map_err(|io_error| {
                DatapathError::map(
                    names::ACCOUNTS,
                    MapError::SyscallError(aya::sys::SyscallError {
                        call: "bpf_map_lookup_batch",
                        io_error,
                    }),
                )
            })?;
        let mut out = vec![AccountConfig::default(); entries.len()];
        for (index, config) in entries {
            if let Some(slot) = out.get_mut(index as usize) {
                *slot = config;
            }
        }
        Ok(out)
    }

    /// The global lists in half `half`.
    fn read_global(&self, half: u32) -> Result<GlobalEntries, DatapathError> {
        let mut global = GlobalEntries::default();
        for (key, len, rule) in lpm_entries(&self.rules_v4, names::RULES_V4, half, |k| k.scope)? {
            global.rules_v4.insert(
                PrefixKey {
                    addr: key.addr,
                    len,
                },
                rule,
            );
        }
        for (key, len, rule) in lpm_entries(&self.rules_v6, names::RULES_V6, half, |k| k.scope)? {
            global.rules_v6.insert(
                PrefixKey {
                    addr: key.addr,
                    len,
                },
                rule,
            );
        }
        global.stride = self.read_stride(half)?;
        Ok(global)
    }
    /// Reads back the stride nodes of half `half`, chunk pointers turned
    /// back into chunk numbers.
    fn read_stride(&self, half: u32) -> Result<Stride, DatapathError> {
        let base = stride::CHUNK_BASE + half * self.stride_chunks;
        let node = |i: u32| {
            self.stride
                .get(&i, 0)
                .map_err(|e| DatapathError::map(names::STRIDE, e))
        };
        let l1 = (0..stride::L1_NODES)
            .map(|i| {
                let mut n = node(half * stride::L1_NODES + i)?;
                for e in &mut n {
                    if stride::kind(*e) == stride::KIND_CHUNK {
                        *e = stride::chunk(stride::payload(*e) - base);
                    }
                }
                Ok(n)
            })
            .collect::<Result<_, DatapathError>>()?;
        let chunks = (0..self.stride_chunks)
            .map(|k| node(base + k))
            .collect::<Result<_, _>>()?;
        Ok(Stride {
            l1,
            chunks,
            overflow: 0,
        })
    }
}

/// Whether a scope word belongs to half `half` (its top bit).
fn in_half(scope: u32, half: u32) -> bool {
    scope >> 31 == half
}

/// The entries of a hash map whose keys (`scope` of them) are in half
/// `half`.
fn hash_entries<K: aya::Pod, V: aya::Pod>(
    map: &HashMap<MapData, K, V>,
    name: &'static str,
    half: u32,
    scope: impl Fn(&K) -> u32,
) -> Result<Vec<(K, V)>, DatapathError> {
    // In batches: reading back 100,000 accounts' addresses one
    // `get_next_key` and one lookup at a time took seconds.
    let entries = batch::lookup_all::<K, V>(map.map()).map_err(|io_error| {
        DatapathError::map(
            name,
            MapError::SyscallError(aya::sys::SyscallError {
                call: "bpf_map_lookup_batch",
                io_error,
            }),
        )
    })?;
    Ok(entries
        .into_iter()
        .filter(|(k, _)| in_half(scope(k), half))
        .collect())
}

/// The entries of an LPM trie whose keys (`scope` of them) are in half
/// `half`, with their prefix lengths less the scope bits.
fn lpm_entries<K: aya::Pod, V: aya::Pod>(
    trie: &LpmTrie<MapData, K, V>,
    name: &'static str,
    half: u32,
    scope: impl Fn(&K) -> u32,
) -> Result<Vec<(K, u8, V)>, DatapathError> {
    let mut out = Vec::new();
    for entry in trie {
        let (key, value) = entry.map_err(|e| DatapathError::map(name, e))?;
        let data = key.data();
        if in_half(scope(&data), half) {
            out.push((data, (key.prefix_len() - SCOPE_BITS) as u8, value));
        }
    }
    Ok(out)
}

impl Datapath {
    /// Reads back what half `half` holds, after a failed write.
    pub(super) fn read_half(&self, half: u32) -> Result<Compiled, DatapathError> {
        let accounts = self.maps.read_accounts(half, self.capacity.accounts)?;
        let top = accounts.keys().last().map_or(0, |s| *s as usize);
        let mut laid_out: imbl::Vector<Option<Arc<AccountEntries>>> =
            std::iter::repeat_n(None, top + 1).collect();
        for (slot, a) in accounts {
            laid_out.set(slot as usize, Some(Arc::new(a)));
        }
        Ok(Compiled {
            // Read back: the base of no compilation.
            id: u64::MAX,
            config: self.config.halves[half as usize],
            global: Arc::new(self.maps.read_global(half)?),
            accounts: laid_out,
            ..Compiled::default()
        })
    }

    /// Duplicates of the fds of the `TOTALS` and `STATS` maps, for a
    /// [`CounterReader`](crate::counters::CounterReader) that reads them
    /// without this struct's lock.
    pub fn counter_fds(&self) -> std::io::Result<(OwnedFd, OwnedFd)> {
        Ok((
            self.maps.totals.map().fd().as_fd().try_clone_to_owned()?,
            self.maps.stats.map().fd().as_fd().try_clone_to_owned()?,
        ))
    }

    /// Duplicates of the fds of the maps an
    /// [`AccountReader`](crate::counters::AccountReader) reads per-account
    /// drops from, without this struct's lock.
    pub fn account_fds(&self) -> std::io::Result<crate::counters::AccountFds> {
        Ok(crate::counters::AccountFds {
            counters: self
                .maps
                .account_counters
                .map()
                .fd()
                .as_fd()
                .try_clone_to_owned()?,
            flow_cache: self
                .maps
                .flow_cache
                .map()
                .fd()
                .as_fd()
                .try_clone_to_owned()?,
            accounts: self.maps.accounts.map().fd().as_fd().try_clone_to_owned()?,
            config: self.maps.config.map().fd().as_fd().try_clone_to_owned()?,
        })
    }

    /// Totals summed over CPUs.
    pub fn totals(&self) -> Result<Totals, DatapathError> {
        crate::counters::read_totals(&self.maps.totals, &self.maps.stats)
            .map_err(|(map, e)| DatapathError::map(map, e))
    }

    /// Counters of one account slot, summed over CPUs.
    pub fn account_counters(
        &self,
        slot: u32,
    ) -> Result<BTreeMap<(Reason, Verdict, Direction), Counter>, DatapathError> {
        let mut out: BTreeMap<(Reason, Verdict, Direction), Counter> = BTreeMap::new();
        let mut add = |reason: u8, verdict: u8, direction: u8, packets: u64, bytes: u64| {
            let (Some(r), Some(v), Some(d)) = (
                Reason::from_u8(reason),
                Verdict::from_u8(verdict),
                Direction::from_u8(direction),
            ) else {
                return;
            };
            let c = out.entry((r, v, d)).or_default();
            c.packets += packets;
            c.bytes += bytes;
        };
        for entry in &self.maps.account_counters {
            let (key, values) =
                entry.map_err(|e| DatapathError::map(names::ACCOUNT_COUNTERS, e))?;
            if key.slot == slot {
                for c in values.iter() {
                    add(key.reason, key.verdict, key.direction, c.packets, c.bytes);
                }
            }
        }
        // Packets still counted in flow-cache entries, with the kernel's rule
        // for entries older than the slot's account.
        let epoch = match self.active() {
            _ if slot == NO_ACCOUNT => 0,
            Some(policy) if policy.account(slot).is_some() => {
                self.epochs.get(slot as usize).copied().unwrap_or(0)
            }
            _ => u32::MAX,
        };
        for index in 0..self.capacity.flow_cache {
            let values = self
                .maps
                .flow_cache
                .get(&index, 0)
                .map_err(|e| DatapathError::map(names::FLOW_CACHE, e))?;
            for e in values
                .iter()
                .filter(|e| e.slot == slot && e.packets != 0 && e.generation >= epoch)
            {
                let (_, direction) = flow_tag_parts(e.tag);
                add(e.reason, e.verdict, direction, e.packets, e.bytes);
            }
        }
        Ok(out)
    }

    /// Flow-cache entries of the policy in force, over all CPUs.
    pub fn flow_cache_entries(&self) -> Result<usize, DatapathError> {
        let generation = flow_generation(self.generation);
        let mut n = 0;
        for index in 0..self.capacity.flow_cache {
            let values = self
                .maps
                .flow_cache
                .get(&index, 0)
                .map_err(|e| DatapathError::map(names::FLOW_CACHE, e))?;
            n += values.iter().filter(|e| e.generation == generation).count();
        }
        Ok(n)
    }
}
