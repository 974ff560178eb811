//! Reading the totals without the datapath's lock.
//!
//! The enforcer holds the datapath's lock while it writes a policy (seconds
//! for a large one). The summary reads the counters through second handles
//! to the same kernel maps, opened from duplicates of their fds: the kernel
//! map is one, its counters are the same, and nothing the enforcer does
//! makes the reader wait.

use std::{
    collections::{BTreeMap, HashMap},
    os::fd::OwnedFd,
};

use aya::maps::{Array, IterableMap as _, Map, MapData, MapError, PerCpuArray, PerCpuHashMap};
use mmesh_common::{
    Direction, Reason, Verdict,
    maps::{
        AccountConfig, Config, Counter, CounterKey, FlowEntry, NO_ACCOUNT, STATS_LEN, TOTALS_LEN,
        account_index, names, totals_index,
    },
};

use crate::{batch, compile::Compiled, datapath::Totals};

/// Why the counters could not be opened or read.
#[derive(Debug, thiserror::Error)]
pub enum CounterError {
    #[error("cannot open a second handle to the {map} map: {source}")]
    Open {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error("cannot read the {map} map: {source}")]
    Read {
        map: &'static str,
        #[source]
        source: MapError,
    },
}

/// Read-only handles to the `TOTALS` and `STATS` maps.
pub struct CounterReader {
    totals: PerCpuArray<MapData, Counter>,
    stats: PerCpuArray<MapData, u64>,
}

impl CounterReader {
    /// Opens the maps behind `totals` and `stats`, fds of the `TOTALS` and
    /// `STATS` maps (see `Datapath::counter_fds`).
    pub fn from_fds(totals: OwnedFd, stats: OwnedFd) -> Result<Self, CounterError> {
        let open = |map: &'static str, fd: OwnedFd| {
            MapData::from_fd(fd)
                .map(Map::PerCpuArray)
                .map_err(|source| CounterError::Open { map, source })
        };
        Ok(Self {
            totals: open(names::TOTALS, totals)?.try_into().map_err(|source| {
                CounterError::Open {
                    map: names::TOTALS,
                    source,
                }
            })?,
            stats: open(names::STATS, stats)?
                .try_into()
                .map_err(|source| CounterError::Open {
                    map: names::STATS,
                    source,
                })?,
        })
    }

    /// The totals and health counters, summed over CPUs (what
    /// `Datapath::totals` reads, through these handles).
    pub fn totals(&self) -> Result<Totals, CounterError> {
        read_totals(&self.totals, &self.stats)
            .map_err(|(map, source)| CounterError::Read { map, source })
    }
}

/// Duplicates of the fds of the maps that per-account counts are read
/// from (see `Datapath::account_fds`).
pub struct AccountFds {
    pub counters: OwnedFd,
    pub flow_cache: OwnedFd,
    pub accounts: OwnedFd,
    pub config: OwnedFd,
}

/// Read-only handles to `ACCT_COUNTERS` and to what tells which of the
/// flow cache's unflushed counts still belong to their slot's account
/// (`FLOW_CACHE`, `ACCOUNTS`, `CONFIG`): per-account drops without the
/// datapath's lock, for `top` and the top-offender metric.
pub struct AccountReader {
    counters: PerCpuHashMap<MapData, CounterKey, Counter>,
    flow_cache: PerCpuArray<MapData, FlowEntry>,
    accounts: Array<MapData, AccountConfig>,
    config: Array<MapData, Config>,
}

/// Drops of one account: packets and bytes, every reason and direction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccountDrops {
    pub account: String,
    pub packets: u64,
    pub bytes: u64,
}

/// What `ACCT_COUNTERS` and the flow cache hold.
#[derive(Clone, Debug, Default)]
pub struct AccountCounts {
    /// Dropped packets and bytes by account slot (slot 0, no account, left
    /// out), flow-cache counts included.
    pub drops: BTreeMap<u32, Counter>,
    /// Keys in `ACCT_COUNTERS`.
    pub counter_entries: u64,
    /// Flow-cache entries (over all CPUs) of the policy half in force.
    pub flow_entries: u64,
}

impl AccountReader {
    pub fn from_fds(fds: AccountFds) -> Result<Self, CounterError> {
        fn open<T: TryFrom<Map, Error = MapError>>(
            map: &'static str,
            fd: OwnedFd,
            kind: fn(MapData) -> Map,
        ) -> Result<T, CounterError> {
            MapData::from_fd(fd)
                .map(kind)
                .and_then(T::try_from)
                .map_err(|source| CounterError::Open { map, source })
        }
        Ok(Self {
            counters: open(names::ACCOUNT_COUNTERS, fds.counters, Map::PerCpuHashMap)?,
            flow_cache: open(names::FLOW_CACHE, fds.flow_cache, Map::PerCpuArray)?,
            accounts: open(names::ACCOUNTS, fds.accounts, Map::Array)?,
            config: open(names::CONFIG, fds.config, Map::Array)?,
        })
    }

    /// Drops per account slot: `ACCT_COUNTERS` plus what flow-cache entries
    /// hold and have not flushed yet, by the kernel's rule (an entry older
    /// than its slot's account belongs to an account that is gone).
    pub fn read(&self) -> Result<AccountCounts, CounterError> {
        let read = |map: &'static str| {
            move |io_error| CounterError::Read {
                map,
                source: MapError::SyscallError(aya::sys::SyscallError {
                    call: "bpf_map_lookup_batch",
                    io_error,
                }),
            }
        };
        // Values are laid out per possible CPU.
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| read(names::FLOW_CACHE)(e))?;
        let mut out = AccountCounts::default();
        let mut add = |slot: u32, packets: u64, bytes: u64| {
            let c = out.drops.entry(slot).or_default();
            c.packets += packets;
            c.bytes += bytes;
        };
        let mut entries = 0;
        batch::for_each_per_cpu::<CounterKey, Counter>(self.counters.map(), cpus, |key, values| {
            entries += 1;
            if key.slot != NO_ACCOUNT && key.verdict == Verdict::Drop as u8 {
                for c in values {
                    add(key.slot, c.packets, c.bytes);
                }
            }
        })
        .map_err(read(names::ACCOUNT_COUNTERS))?;
        let config = self
            .config
            .get(&0, 0)
            .map_err(|source| CounterError::Read {
                map: names::CONFIG,
                source,
            })?;
        let generation = mmesh_common::maps::flow_generation(
            config.halves[config.active as usize & 1].generation,
        );
        let mut epochs: HashMap<u32, u32> = HashMap::new();
        let mut flow_entries = 0;
        batch::for_each_per_cpu::<u32, FlowEntry>(self.flow_cache.map(), cpus, |_, values| {
            for e in values {
                flow_entries += u64::from(e.generation == generation);
                if e.slot == NO_ACCOUNT || e.packets == 0 || e.verdict != Verdict::Drop as u8 {
                    continue;
                }
                let epoch = *epochs.entry(e.slot).or_insert_with(|| {
                    self.accounts
                        .get(&account_index(e.slot, config.active), 0)
                        .map_or(0, |a| a.epoch)
                });
                if e.generation >= epoch {
                    add(e.slot, e.packets, e.bytes);
                }
            }
        })
        .map_err(read(names::FLOW_CACHE))?;
        out.counter_entries = entries;
        out.flow_entries = flow_entries;
        Ok(out)
    }
}

/// The `n` accounts of `compiled` with the most dropped packets (ties by
/// id), from [`AccountCounts::drops`]: `top --by account` and the
/// top-offender metric. Slots without an account in `compiled` (it left)
/// are not offenders any more and are left out, as are accounts without a
/// drop.
#[must_use]
pub fn top_accounts(
    drops: &BTreeMap<u32, Counter>,
    compiled: &Compiled,
    n: usize,
) -> Vec<AccountDrops> {
    let mut all: Vec<AccountDrops> = drops
        .iter()
        .filter(|(_, c)| c.packets > 0)
        .filter_map(|(slot, c)| {
            Some(AccountDrops {
                account: compiled.account_id(*slot)?.to_owned(),
                packets: c.packets,
                bytes: c.bytes,
            })
        })
        .collect();
    all.sort_by(|a, b| {
        b.packets
            .cmp(&a.packets)
            .then_with(|| a.account.cmp(&b.account))
    });
    all.truncate(n);
    all
}

/// The totals and health counters of a `TOTALS` and a `STATS` map, summed
/// over CPUs; on failure, the map that could not be read. Shared by
/// [`CounterReader::totals`] and `Datapath::totals`.
pub(crate) fn read_totals(
    totals: &PerCpuArray<MapData, Counter>,
    stats: &PerCpuArray<MapData, u64>,
) -> Result<Totals, (&'static str, MapError)> {
    let mut out = Totals::default();
    for reason in Reason::ALL {
        for verdict in Verdict::ALL {
            for direction in Direction::ALL {
                let index = totals_index(reason as u8, verdict as u8, direction as u8);
                debug_assert!(index < TOTALS_LEN);
                let values = totals.get(&index, 0).map_err(|e| (names::TOTALS, e))?;
                let sum = values.iter().fold(Counter::default(), |a, c| Counter {
                    packets: a.packets + c.packets,
                    bytes: a.bytes + c.bytes,
                });
                if sum.packets > 0 {
                    out.counters.insert((reason, verdict, direction), sum);
                }
            }
        }
    }
    let mut sums = [0u64; STATS_LEN as usize];
    for (i, stat) in sums.iter_mut().enumerate() {
        let values = stats.get(&(i as u32), 0).map_err(|e| (names::STATS, e))?;
        *stat = values.iter().sum();
    }
    [
        out.events_lost,
        out.counters_full,
        out.rate_contended,
        out.pull_failed,
        out.events_sampled,
    ] = sums;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::{compile::Capacity, policy::Policy};

    #[test]
    fn top_accounts_ranks_by_drops_and_leaves_out_departed_slots() {
        let policy = Policy::parse(
            "accounts:\n  - { id: a, prefixes: [10.0.0.1/32] }\n  - { id: b, prefixes: [10.0.0.2/32] }\n  - { id: c, prefixes: [10.0.0.3/32] }\n",
            "test",
            Path::new("."),
        )
        .unwrap();
        let compiled = crate::compile::compile(&policy, None, &Capacity::default()).unwrap();
        let slot = |id| compiled.slot_of(id).unwrap();
        let drops: BTreeMap<u32, Counter> = [
            (slot("a"), 5),
            (slot("b"), 9),
            (slot("c"), 5),
            // A slot whose account left: not an offender any more.
            (999, 100),
        ]
        .into_iter()
        .map(|(s, packets)| {
            (
                s,
                Counter {
                    packets,
                    bytes: packets * 100,
                },
            )
        })
        .collect();
        let top = |n| {
            top_accounts(&drops, &compiled, n)
                .into_iter()
                .map(|a| (a.account, a.packets))
                .collect::<Vec<_>>()
        };
        // Ties by id.
        assert_eq!(
            top(10),
            [
                ("b".to_owned(), 9),
                ("a".to_owned(), 5),
                ("c".to_owned(), 5)
            ]
        );
        assert_eq!(top(1), [("b".to_owned(), 9)]);
        assert!(top(0).is_empty());
    }
}
