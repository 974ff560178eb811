//! Reading the totals without the datapath's lock.
//!
//! The enforcer holds the datapath's lock while it writes a policy (seconds
//! for a large one). The summary reads the counters through second handles
//! to the same kernel maps, opened from duplicates of their fds: the kernel
//! map is one, its counters are the same, and nothing the enforcer does
//! makes the reader wait.

use std::os::fd::OwnedFd;

use aya::maps::{Map, MapData, MapError, PerCpuArray};
use mmesh_common::{
    Direction, Reason, Verdict,
    maps::{Counter, STATS_LEN, TOTALS_LEN, names, totals_index},
};

use crate::datapath::Totals;

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
