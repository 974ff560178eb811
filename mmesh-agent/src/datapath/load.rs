//! Loading the object: maps sized by the capacities, programs through the
//! verifier.

use std::sync::Arc;

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, MapData, MapError, MapType, PerCpuArray, PerCpuHashMap},
    programs::{ProgramError, SchedClassifier, Xdp},
    util::KernelVersion,
};
use mmesh_common::{
    Reason,
    maps::{
        AccountConfig, Config, Counter, CounterKey, FlowEntry, LAYOUT_VERSIONS, RateState,
        RuleValue, ScopedV4, ScopedV6, account_index, flow_generation, names, programs,
    },
    stride,
};

use super::{
    Datapath, DatapathError,
    error::is_permission,
    pin::{MapPlan, MapShape, Pins},
};
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
    /// there of this agent's layout are reused with their contents (the
    /// policy in force, counters, rate-limit state), the generation and the
    /// slot epochs read back, and [`Datapath::attach`] adopts the pinned
    /// links. A pinned map of another layout version or size is recreated
    /// (empty: the policy apply refills what is policy; logged with the
    /// state that is reset) and pinned in place of the old one, which the
    /// running programs keep using until the links get the new programs.
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
        let shapes = if pins.is_some() {
            map_shapes(&sizes)?
        } else {
            Vec::new()
        };
        let planned = match &pins {
            Some(pins) => plan_maps(pins, &shapes, &mut loader)?,
            None => Planned {
                created: sizes.iter().map(|(name, _)| *name).collect(),
                ..Planned::default()
            },
        };
        let mut ebpf = loader
            .load(EBPF_OBJECT)
            .map_err(|e| object_error(e, pins.as_ref()))?;
        for name in [programs::XDP_INBOUND, programs::XDP_OUTBOUND] {
            let prog: &mut Xdp = program(&mut ebpf, name)?;
            prog.load().map_err(|e| load_error(name, e))?;
        }
        for name in [programs::TC_INBOUND, programs::TC_OUTBOUND] {
            let prog: &mut SchedClassifier = program(&mut ebpf, name)?;
            prog.load().map_err(|e| load_error(name, e))?;
        }
        if let Some(pins) = &pins {
            install(&mut ebpf, pins, &planned, &shapes)?;
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
        let clean_from = if SLOT_STATE.iter().all(|name| planned.created.contains(name)) {
            // Slot 0 is never an account's.
            1
        } else {
            u32::MAX
        };
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
            clean_from,
            barrier: ProgramBarrier::new().map_err(DatapathError::Barrier)?,
            quiesced: true,
            attachments: Vec::new(),
            pins: None,
        };
        if let Some(pins) = pins {
            if pins.adopted().is_some() {
                // The policy maps that start empty (CONFIG copied is not).
                let fresh: Vec<&str> = planned
                    .fresh
                    .iter()
                    .map(|(name, _)| *name)
                    .filter(|name| {
                        HALVED.contains(name)
                            || (*name == names::CONFIG && planned.config.is_none())
                    })
                    .collect();
                dp.adopt_state(pins.generation_floor(), &fresh, pins.standby_synced_at())?;
            }
            // Whether the halves are copies is known again after this
            // agent's first sync of the standby half.
            pins.stamp(dp.generation, false)?;
            dp.pins = Some(pins);
        }
        Ok(dp)
    }

    /// Takes over the state of pinned maps that an earlier agent filled: the
    /// active half and its generation (never below `floor`, the highest
    /// generation the agent record holds), the slot epochs. Both halves are
    /// read back from the kernel before their next write, or only the
    /// active one when the earlier agent recorded that the standby half is
    /// its copy (`synced`: at that generation). `fresh`: the policy maps
    /// created empty instead of reused.
    fn adopt_state(
        &mut self,
        floor: u64,
        fresh: &[&str],
        synced: Option<u64>,
    ) -> Result<(), DatapathError> {
        let config = self
            .maps
            .config
            .get(&0, 0)
            .map_err(|e| DatapathError::map(names::CONFIG, e))?;
        self.generation = config.halves[config.active as usize].generation.max(floor);
        // A recreated CONFIG is a copy of the old one, or zeroes (and then
        // every halved map is new too); a recreated FLOW_CACHE may be of
        // another size (and then CONFIG was recreated with it).
        self.config = Config {
            flow_mask: self.capacity.flow_cache - 1,
            ..config
        };
        self.epochs = if fresh.contains(&names::ACCOUNTS) {
            // The epochs went with the old map. Every slot starts one at the
            // carried generation: flow-cache counts of earlier generations
            // are dropped, never given to an account that took the slot
            // since (the epochs only ever grow).
            vec![flow_generation(self.generation); self.capacity.accounts as usize + 1]
        } else {
            let configs = self.maps.account_configs()?;
            (0..=self.capacity.accounts)
                .map(|slot| {
                    configs
                        .get(account_index(slot, config.active) as usize)
                        .map_or(0, |a| a.epoch)
                })
                .collect()
        };
        let active = config.halves[config.active as usize].generation;
        self.halves = if fresh.is_empty() && synced == Some(active) {
            // Reading a half back is most of an adoption (the tries are
            // read one entry at a time): one read serves both.
            let held = Arc::new(self.read_half(config.active)?);
            [Some(held.clone()), Some(held)]
        } else {
            [None, None]
        };
        // Programs of the earlier agent may have read the standby half.
        self.quiesced = false;
        Ok(())
    }
}

fn object_error(e: aya::EbpfError, pins: Option<&Pins>) -> DatapathError {
    if let Some(pins) = pins
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
}

/// The maps that hold policy in two halves, which `CONFIG.active` picks.
const HALVED: [&str; 10] = [
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
];

/// What [`plan_maps`] decided.
#[derive(Default)]
struct Planned {
    /// Maps created fresh although there were pins to adopt, with the
    /// reason.
    fresh: Vec<(&'static str, String)>,
    /// Those of them to pin in place of a pinned map.
    replace: Vec<&'static str>,
    /// The old `CONFIG`'s value, when `CONFIG` is recreated only along with
    /// other maps: the new one starts as its copy.
    config: Option<Config>,
    /// Maps this load creates (empty), rather than reuses: all of them
    /// when nothing is pinned. Of the sized maps only (`map_sizes`).
    created: Vec<&'static str>,
}

/// The maps of per-slot state that an account taking a slot must find
/// zeroed ([`Datapath`]'s `clean_from`).
const SLOT_STATE: [&str; 3] = [names::RATE_STATE, names::SAMPLER, names::ACCOUNT_COUNTERS];

/// Tells the loader which pinned maps to reuse or create pinned; the maps
/// to recreate it creates unpinned, for [`pin_in_place`].
fn plan_maps(
    pins: &Pins,
    shapes: &[MapShape],
    loader: &mut EbpfLoader<'_>,
) -> Result<Planned, DatapathError> {
    let mut planned = Planned::default();
    let mut plans = pins.plan(shapes)?;
    let adopting = pins.adopted().is_some();
    let position = |name: &str| shapes.iter().position(|s| s.name == name);
    if let Some(config) = position(names::CONFIG)
        && adopting
    {
        if plans[config] == MapPlan::Reuse && plans.iter().any(|p| *p != MapPlan::Reuse) {
            // The running programs must not see the first flip of this
            // agent: it would send them to a half of the maps they share
            // with it while they still read their own copy of a recreated
            // map. With a CONFIG of their own they keep one consistent
            // policy until the links get the new programs. The new CONFIG
            // starts as a copy, so that this agent writes into the half the
            // old programs do not read.
            let old = MapData::from_pin(pins.map_path(names::CONFIG))
                .map_err(|e| DatapathError::map(names::CONFIG, e))
                .and_then(|data| {
                    Array::<MapData, Config>::try_from(aya::maps::Map::Array(data))
                        .and_then(|a| a.get(&0, 0))
                        .map_err(|e| DatapathError::map(names::CONFIG, e))
                })?;
            planned.config = Some(old);
            plans[config] = MapPlan::Recreate {
                why: "with the other recreated maps, so that the running programs keep a consistent policy until they are replaced".to_owned(),
            };
        } else if plans[config] != MapPlan::Reuse {
            // Which half the running programs read is not known (CONFIG of
            // another layout, or gone): the halved maps go with it, and the
            // running programs keep theirs whole.
            for name in HALVED {
                if let Some(i) = position(name)
                    && plans[i] == MapPlan::Reuse
                {
                    plans[i] = MapPlan::Recreate {
                        why: "with CONFIG, whose halves it follows".to_owned(),
                    };
                }
            }
        }
    }
    for (shape, plan) in shapes.iter().zip(plans) {
        if plan != MapPlan::Reuse {
            planned.created.push(shape.name);
        }
        match plan {
            MapPlan::Create if adopting => {
                planned
                    .fresh
                    .push((shape.name, "it was not pinned".to_owned()));
            }
            MapPlan::Recreate { why } => {
                planned.fresh.push((shape.name, why));
                planned.replace.push(shape.name);
                continue;
            }
            MapPlan::Reuse | MapPlan::Create => {}
        }
        loader.map_pin_path(shape.name, pins.map_path(shape.name));
    }
    Ok(planned)
}

/// Once the programs passed the verifier: the new `CONFIG` made a copy of
/// the old one if so planned, the recreated maps pinned in place, the
/// layouts recorded, and what was reset logged.
fn install(
    ebpf: &mut Ebpf,
    pins: &Pins,
    planned: &Planned,
    shapes: &[MapShape],
) -> Result<(), DatapathError> {
    if let Some(old) = planned.config {
        // Before it is pinned: a CONFIG of zeroes under this agent's layout
        // would tell the next agent that half 0 is the active one.
        let map = ebpf
            .map_mut(names::CONFIG)
            .ok_or_else(|| DatapathError::Missing {
                what: "map",
                name: names::CONFIG.to_owned(),
            })?;
        Array::<&mut MapData, Config>::try_from(map)
            .and_then(|mut config| config.set(0, old, 0))
            .map_err(|e| DatapathError::map(names::CONFIG, e))?;
    }
    pin_in_place(ebpf, pins, &planned.replace)?;
    // Only now: a version recorded for a map not yet replaced would let the
    // next agent reuse the old one as if it were new.
    pins.record_layouts(shapes)?;
    for (name, why) in &planned.fresh {
        tracing::warn!("map {name} recreated ({why}): {}", resets(name));
    }
    Ok(())
}

/// Pins the recreated maps in place of the old ones, once the programs
/// passed the verifier. The running programs hold the old maps until the
/// links get the new programs; an agent that dies in between leaves a name
/// unpinned, which the next one creates afresh (it would have been empty
/// here too).
fn pin_in_place(ebpf: &Ebpf, pins: &Pins, replace: &[&'static str]) -> Result<(), DatapathError> {
    for name in replace {
        let path = pins.map_path(name);
        let pin = |source: std::io::Error| DatapathError::Pin {
            path: path.clone(),
            source,
        };
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(pin(e)),
        }
        ebpf.map(name)
            .ok_or_else(|| DatapathError::Missing {
                what: "map",
                name: (*name).to_owned(),
            })?
            .pin(&path)
            .map_err(|e| pin(std::io::Error::other(e)))?;
    }
    Ok(())
}

/// What a recreated map's contents were, and so what is reset when it is
/// recreated (the README's table of upgrades says the same).
fn resets(name: &str) -> &'static str {
    match name {
        names::CONFIG => {
            "nothing is lost: rewritten with the policy, the generation carried over in the agent record"
        }
        names::ACCOUNTS => {
            "refilled from the policy; the slot epochs restart at the current generation (flow-cache counts of earlier generations are dropped)"
        }
        names::FLOW_CACHE => {
            "cached decisions are made again; packet counts cached there and not yet moved to the per-account counters are lost"
        }
        names::RATE_STATE => "rate-limit buckets reset: every account starts with a full burst",
        names::SAMPLER => "event sampling windows reset",
        names::TOTALS => "the totals restart from zero",
        names::ACCOUNT_COUNTERS => "the per-account counters restart from zero",
        names::STATS => {
            "the datapath statistics (events lost, counters full, ...) restart from zero"
        }
        names::EVENTS => "events the old programs write until they are replaced are not read",
        _ => "refilled from the policy",
    }
}

/// The shape of every map of the object as this agent creates it, for
/// [`Pins::plan`]: type, key and value sizes and flags from the object,
/// entries from the capacities, and the layout version.
fn map_shapes(sizes: &[(&str, u32)]) -> Result<Vec<MapShape>, DatapathError> {
    let object = aya_obj::Object::parse(EBPF_OBJECT)
        .map_err(|e| DatapathError::Load(aya::EbpfError::ParseError(e)))?;
    LAYOUT_VERSIONS
        .iter()
        .map(|&(name, version)| {
            let map = object
                .maps
                .get(name)
                .ok_or_else(|| DatapathError::Missing {
                    what: "map",
                    name: name.to_owned(),
                })?;
            let map_type = aya_obj::generated::bpf_map_type::try_from(map.map_type())
                .map_err(MapError::from)
                .and_then(MapType::try_from)
                .map_err(|e| DatapathError::map(name, e))?;
            let entries = sizes
                .iter()
                .find(|(n, _)| *n == name)
                .map_or(map.max_entries(), |(_, e)| *e);
            Ok(MapShape {
                name,
                map_type,
                key: map.key_size(),
                value: map.value_size(),
                flags: map.map_flags(),
                entries,
                version,
            })
        })
        .collect()
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
