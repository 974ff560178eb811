//! Loading the object: maps sized by the capacities, programs through the
//! verifier.

use std::sync::Arc;

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, MapData, MapError, MapInfo, PerCpuArray, PerCpuHashMap},
    programs::{ProgramError, SchedClassifier, Xdp},
    util::KernelVersion,
};
use mmesh_common::{
    Reason,
    maps::{
        AccountConfig, Config, Counter, CounterKey, FlowEntry, RateState, RuleValue, ScopedV4,
        ScopedV6, account_index, names, programs,
    },
    stride,
};

use super::{Datapath, DatapathError, error::is_permission, pin::Pins};
use crate::{
    barrier::ProgramBarrier,
    compile::{Capacity, Compiled},
};

/// The eBPF object built by build.rs (empty when built with `AYA_BUILD_SKIP`).
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mmesh"));

/// The benchmark baselines and traffic generator (mmesh-ebpf/src/bench.rs),
/// for `cargo xtask bench`.
#[cfg(feature = "bench")]
pub static BENCH_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mmesh-bench"));

/// Oldest kernel supported: BPF ring buffer (5.8), atomic compare-and-swap
/// (5.12), `bpf_link` for XDP (5.9); 5.15 is the first LTS with all of them.
pub const MIN_KERNEL: (u32, u32) = (5, 15);
/// Typed handles of the maps, owned in one place.
/// Every map of the object, all pinned in a pinned datapath.
const ALL_MAPS: [&str; 18] = [
    names::CONFIG,
    names::HOSTS_V4,
    names::HOSTS_V6,
    names::PREFIXES_V4,
    names::PREFIXES_V6,
    names::ACCOUNTS,
    names::RULES_V4,
    names::RULES_V6,
    names::ACCT_RULES_V4,
    names::ACCT_RULES_V6,
    names::STRIDE,
    names::FLOW_CACHE,
    names::RATE_STATE,
    names::SAMPLER,
    names::TOTALS,
    names::ACCOUNT_COUNTERS,
    names::STATS,
    names::EVENTS,
];

pub(super) struct Maps {
    pub(super) config: Array<MapData, Config>,
    pub(super) hosts_v4: HashMap<MapData, ScopedV4, u32>,
    pub(super) hosts_v6: HashMap<MapData, ScopedV6, u32>,
    pub(super) prefixes_v4: LpmTrie<MapData, ScopedV4, u32>,
    pub(super) prefixes_v6: LpmTrie<MapData, ScopedV6, u32>,
    pub(super) accounts: Array<MapData, AccountConfig>,
    pub(super) rules_v4: LpmTrie<MapData, ScopedV4, RuleValue>,
    pub(super) rules_v6: LpmTrie<MapData, ScopedV6, RuleValue>,
    pub(super) acct_rules_v4: LpmTrie<MapData, ScopedV4, RuleValue>,
    pub(super) acct_rules_v6: LpmTrie<MapData, ScopedV6, RuleValue>,
    pub(super) stride: Array<MapData, stride::Node>,
    /// Chunk nodes per half.
    pub(super) stride_chunks: u32,
    pub(super) rate_state: Array<MapData, RateState>,
    pub(super) sampler: Array<MapData, u64>,
    pub(super) totals: PerCpuArray<MapData, Counter>,
    pub(super) account_counters: PerCpuHashMap<MapData, CounterKey, Counter>,
    pub(super) flow_cache: PerCpuArray<MapData, FlowEntry>,
    pub(super) stats: PerCpuArray<MapData, u64>,
}

impl Datapath {
    /// Loads the object with maps sized by `capacity` and passes the
    /// programs through the verifier. Nothing is attached yet, and nothing
    /// outlives the agent (`--ephemeral`).
    pub fn load(capacity: Capacity) -> Result<Self, DatapathError> {
        Self::load_with(capacity, None)
    }

    /// As [`Datapath::load`], with the maps pinned in `pins`: the maps found
    /// there are reused with their contents (the policy in force, counters,
    /// rate-limit state), the generation and the slot epochs read back, and
    /// [`Datapath::attach`] adopts the pinned links.
    pub fn load_pinned(capacity: Capacity, pins: Pins) -> Result<Self, DatapathError> {
        Self::load_with(capacity, Some(pins))
    }

    fn load_with(capacity: Capacity, pins: Option<Pins>) -> Result<Self, DatapathError> {
        if EBPF_OBJECT.is_empty() {
            return Err(DatapathError::NoObject);
        }
        check_kernel()?;
        raise_memlock();
        let sizes = map_sizes(&capacity);
        let mut loader = EbpfLoader::new();
        for (name, entries) in sizes {
            loader.map_max_entries(name, entries);
        }
        let paths: Vec<(&str, std::path::PathBuf)> = pins
            .as_ref()
            .map(|p| ALL_MAPS.iter().map(|n| (*n, p.map_path(n))).collect())
            .unwrap_or_default();
        if let Some(pins) = &pins {
            check_pinned_sizes(pins, &sizes)?;
            for (name, path) in &paths {
                loader.map_pin_path(name, path.as_path());
            }
        }
        let mut ebpf = loader.load(EBPF_OBJECT).map_err(|e| {
            if let Some(pins) = &pins
                && matches!(
                    e,
                    aya::EbpfError::MapError(aya::maps::MapError::PinError { .. })
                )
            {
                return DatapathError::Bpffs {
                    dir: pins.dir().to_owned(),
                    source: std::io::Error::other(e),
                };
            }
            if is_permission(&e) {
                DatapathError::Permission {
                    doing: "creating BPF maps".to_owned(),
                }
            } else {
                DatapathError::Load(e)
            }
        })?;
        for name in [programs::XDP_INBOUND, programs::XDP_OUTBOUND] {
            let prog: &mut Xdp = program(&mut ebpf, name)?;
            prog.load().map_err(|e| load_error(name, e))?;
        }
        for name in [programs::TC_INBOUND, programs::TC_OUTBOUND] {
            let prog: &mut SchedClassifier = program(&mut ebpf, name)?;
            prog.load().map_err(|e| load_error(name, e))?;
        }
        let maps = Maps {
            config: take(&mut ebpf, names::CONFIG)?,
            hosts_v4: take(&mut ebpf, names::HOSTS_V4)?,
            hosts_v6: take(&mut ebpf, names::HOSTS_V6)?,
            prefixes_v4: take(&mut ebpf, names::PREFIXES_V4)?,
            prefixes_v6: take(&mut ebpf, names::PREFIXES_V6)?,
            accounts: take(&mut ebpf, names::ACCOUNTS)?,
            rules_v4: take(&mut ebpf, names::RULES_V4)?,
            rules_v6: take(&mut ebpf, names::RULES_V6)?,
            acct_rules_v4: take(&mut ebpf, names::ACCT_RULES_V4)?,
            acct_rules_v6: take(&mut ebpf, names::ACCT_RULES_V6)?,
            stride: take(&mut ebpf, names::STRIDE)?,
            stride_chunks: capacity.stride_chunks,
            rate_state: take(&mut ebpf, names::RATE_STATE)?,
            sampler: take(&mut ebpf, names::SAMPLER)?,
            totals: take(&mut ebpf, names::TOTALS)?,
            account_counters: take(&mut ebpf, names::ACCOUNT_COUNTERS)?,
            flow_cache: take(&mut ebpf, names::FLOW_CACHE)?,
            stats: take(&mut ebpf, names::STATS)?,
        };
        let events = Some(take(&mut ebpf, names::EVENTS)?);
        let empty = Arc::new(Compiled::default());
        let mut dp = Self {
            ebpf,
            maps,
            events,
            capacity,
            halves: [Some(empty.clone()), Some(empty)],
            config: Config {
                flow_mask: capacity.flow_cache - 1,
                ..Config::default()
            },
            generation: 0,
            epochs: Vec::new(),
            barrier: ProgramBarrier::new().map_err(DatapathError::Barrier)?,
            quiesced: true,
            attachments: Vec::new(),
            pins: None,
        };
        if let Some(pins) = pins {
            if pins.adopted().is_some() {
                dp.adopt_state()?;
            }
            pins.stamp()?;
            dp.pins = Some(pins);
        }
        Ok(dp)
    }

    /// Takes over the state of pinned maps that an earlier agent filled: the
    /// active half and its generation, the slot epochs. Both halves are read
    /// back from the kernel before their next write.
    fn adopt_state(&mut self) -> Result<(), DatapathError> {
        let config = self
            .maps
            .config
            .get(&0, 0)
            .map_err(|e| DatapathError::map(names::CONFIG, e))?;
        self.generation = config.halves[config.active as usize].generation;
        self.config = config;
        let configs = self.maps.account_configs()?;
        self.epochs = (0..=self.capacity.accounts)
            .map(|slot| {
                configs
                    .get(account_index(slot, config.active) as usize)
                    .map_or(0, |a| a.epoch)
            })
            .collect();
        self.halves = [None, None];
        // Programs of the earlier agent may have read the standby half.
        self.quiesced = false;
        Ok(())
    }
}

/// `max_entries` of the maps whose size the capacities set.
fn map_sizes(capacity: &Capacity) -> [(&'static str, u32); 15] {
    let slots = capacity.accounts + 1;
    [
        (names::HOSTS_V4, 2 * capacity.account_prefixes),
        (names::HOSTS_V6, 2 * capacity.account_prefixes),
        (names::PREFIXES_V4, 2 * capacity.account_prefixes),
        (names::PREFIXES_V6, 2 * capacity.account_prefixes),
        (names::ACCOUNTS, 2 * slots),
        (names::RULES_V4, 2 * capacity.list_prefixes),
        (names::RULES_V6, 2 * capacity.list_prefixes),
        (names::ACCT_RULES_V4, 2 * capacity.list_prefixes),
        (names::ACCT_RULES_V6, 2 * capacity.list_prefixes),
        (
            names::STRIDE,
            stride::CHUNK_BASE + 2 * capacity.stride_chunks,
        ),
        (names::FLOW_CACHE, capacity.flow_cache),
        (names::RATE_STATE, 2 * slots),
        (names::SAMPLER, slots * Reason::COUNT as u32),
        (names::ACCOUNT_COUNTERS, capacity.counters),
        (names::EVENTS, capacity.event_buffer),
    ]
}

/// A pinned map of another size would be reused as it is by the loader:
/// refuse it, naming the option.
fn check_pinned_sizes(pins: &Pins, sizes: &[(&str, u32)]) -> Result<(), DatapathError> {
    for &(name, entries) in sizes {
        let path = pins.map_path(name);
        if let Ok(info) = MapInfo::from_pin(&path)
            && info.max_entries() != entries
        {
            return Err(DatapathError::PinnedMismatch {
                dir: pins.dir().to_owned(),
                what: format!(
                    "map {name} was created with {} entries, this agent's capacity options ask for {entries}: start it with the options the pinned datapath was created with",
                    info.max_entries()
                ),
            });
        }
    }
    Ok(())
}

fn take<T: TryFrom<aya::maps::Map, Error = MapError>>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<T, DatapathError> {
    let map = ebpf.take_map(name).ok_or_else(|| DatapathError::Missing {
        what: "map",
        name: name.to_owned(),
    })?;
    T::try_from(map).map_err(|e| DatapathError::map(name, e))
}

pub(super) fn program<'a, T>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut T, DatapathError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    let prog = ebpf
        .program_mut(name)
        .ok_or_else(|| DatapathError::Missing {
            what: "program",
            name: name.to_owned(),
        })?;
    prog.try_into().map_err(|source| DatapathError::Program {
        program: name.to_owned(),
        source,
    })
}

fn load_error(program: &str, err: ProgramError) -> DatapathError {
    if is_permission(&err) {
        return DatapathError::Permission {
            doing: format!("loading program {program}"),
        };
    }
    match err {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            let log = verifier_log.to_string();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            DatapathError::Verifier {
                program: program.to_owned(),
                reason: io_error.to_string(),
                log: tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
            }
        }
        source => DatapathError::Program {
            program: program.to_owned(),
            source,
        },
    }
}

fn check_kernel() -> Result<(), DatapathError> {
    let found = KernelVersion::current().map_err(|e| DatapathError::KernelTooOld {
        found: format!("unknown ({e})"),
    })?;
    if found < KernelVersion::new(MIN_KERNEL.0 as u8, MIN_KERNEL.1 as u8, 0) {
        return Err(DatapathError::KernelTooOld {
            found: found.to_string(),
        });
    }
    Ok(())
}

/// Kernels before 5.11 charge BPF maps to `RLIMIT_MEMLOCK`; later ones to the
/// memory cgroup, where this changes nothing.
fn raise_memlock() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: a valid rlimit struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &raw const unlimited) } != 0 {
        tracing::debug!(
            "could not raise RLIMIT_MEMLOCK: {}",
            std::io::Error::last_os_error()
        );
    }
}
