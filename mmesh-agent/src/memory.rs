//! Kernel memory the maps need for given capacities, estimated before they
//! are created.
//!
//! Arrays, preallocated hash maps and the ring buffer take all their memory
//! when they are created; LPM tries take it entry by entry as a policy fills
//! them. A capacity far beyond the machine would otherwise fail deep inside
//! map creation with a bare `ENOMEM`, naming no option; the estimate refuses
//! it first, naming the option that asks for the most and what it costs.
//!
//! The per-entry overheads follow the kernel's structures (6.x, 64-bit):
//! `htab_elem` is 48 bytes before its key and value, a bucket 16; an LPM
//! trie node 48 before its key bytes and value. They are estimates: the
//! slab rounds up, and the kernel's own bookkeeping is left out.

use mmesh_common::{
    Reason,
    maps::{
        AccountConfig, Config, Counter, CounterKey, FlowEntry, RateState, RuleValue, STATS_LEN,
        ScopedV4, ScopedV6, TOTALS_LEN,
    },
    stride::{CHUNK_BASE, Node},
};

use crate::compile::Capacity;

const HTAB_ELEM: u64 = 48;
const HTAB_BUCKET: u64 = 16;
const LPM_NODE: u64 = 48;

/// What the maps that one option sizes cost.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OptionMemory {
    /// The command-line option.
    pub option: &'static str,
    /// Bytes taken when the maps are created.
    pub upfront: u64,
    /// Bytes when every entry is in use.
    pub full: u64,
}

/// Why the capacities cannot be had.
#[derive(Debug, thiserror::Error)]
#[error(
    "the maps for these capacities need about {} MiB of kernel memory when created ({} MiB at full use), more than the {} MiB this machine has available; {option} alone asks for {} MiB: lower it",
    mib(*upfront), mib(*full), mib(*available), mib(*option_bytes)
)]
pub struct TooLarge {
    pub upfront: u64,
    pub full: u64,
    pub available: u64,
    pub option: &'static str,
    pub option_bytes: u64,
}

fn mib(bytes: u64) -> u64 {
    bytes.div_ceil(1 << 20)
}

const fn round8(n: usize) -> u64 {
    ((n as u64) + 7) & !7
}

fn array(entries: u64, value: usize) -> u64 {
    entries * round8(value)
}

fn per_cpu_array(entries: u64, value: usize, cpus: u64) -> u64 {
    entries * round8(value) * cpus
}

fn hash(entries: u64, key: usize, value: usize) -> u64 {
    entries * (HTAB_ELEM + round8(key) + round8(value)) + entries.next_power_of_two() * HTAB_BUCKET
}

fn per_cpu_hash(entries: u64, key: usize, value: usize, cpus: u64) -> u64 {
    // The element holds a pointer to the per-CPU value.
    entries * (HTAB_ELEM + round8(key) + 8 + round8(value) * cpus)
        + entries.next_power_of_two() * HTAB_BUCKET
}

/// At full use a trie of n prefixes has up to n - 1 intermediate nodes too.
fn lpm(entries: u64, key: usize, value: usize) -> u64 {
    // The key's prefix length is a field of the node, not of its data.
    let data = round8(key.saturating_sub(4));
    entries * (LPM_NODE + data + round8(value)) + entries.saturating_sub(1) * (LPM_NODE + data)
}

/// The memory of every map, by the option that sizes it.
#[must_use]
pub fn estimate(c: &Capacity, cpus: u64) -> Vec<OptionMemory> {
    let cpus = cpus.max(1);
    let slots = u64::from(c.accounts) + 1;
    let prefixes = 2 * u64::from(c.account_prefixes);
    let lists = 2 * u64::from(c.list_prefixes);
    let size = size_of::<u32>();
    vec![
        OptionMemory {
            option: "--max-accounts",
            upfront: array(2 * slots, size_of::<AccountConfig>())
                + array(2 * slots, size_of::<RateState>())
                + array(slots * Reason::COUNT as u64, size_of::<u64>()),
            full: 0,
        },
        OptionMemory {
            option: "--max-account-prefixes",
            // Hosts in hash maps (preallocated), wider prefixes in tries.
            upfront: hash(prefixes, size_of::<ScopedV4>(), size)
                + hash(prefixes, size_of::<ScopedV6>(), size),
            full: lpm(prefixes, size_of::<ScopedV4>(), size)
                + lpm(prefixes, size_of::<ScopedV6>(), size),
        },
        OptionMemory {
            option: "--max-list-prefixes",
            upfront: 0,
            full: 2
                * (lpm(lists, size_of::<ScopedV4>(), size_of::<RuleValue>())
                    + lpm(lists, size_of::<ScopedV6>(), size_of::<RuleValue>())),
        },
        OptionMemory {
            option: "--max-counters",
            upfront: per_cpu_hash(
                u64::from(c.counters),
                size_of::<CounterKey>(),
                size_of::<Counter>(),
                cpus,
            ),
            full: 0,
        },
        OptionMemory {
            option: "--stride-chunks",
            upfront: array(
                u64::from(CHUNK_BASE) + 2 * u64::from(c.stride_chunks),
                size_of::<Node>(),
            ),
            full: 0,
        },
        OptionMemory {
            option: "--flow-cache",
            upfront: per_cpu_array(u64::from(c.flow_cache), size_of::<FlowEntry>(), cpus),
            full: 0,
        },
        OptionMemory {
            option: "--event-buffer",
            upfront: u64::from(c.event_buffer),
            full: 0,
        },
        OptionMemory {
            option: "(fixed maps)",
            upfront: array(1, size_of::<Config>())
                + per_cpu_array(u64::from(TOTALS_LEN), size_of::<Counter>(), cpus)
                + per_cpu_array(u64::from(STATS_LEN), size_of::<u64>(), cpus),
            full: 0,
        },
    ]
    .into_iter()
    .map(|mut m| {
        m.full += m.upfront;
        m
    })
    .collect()
}

/// Memory the kernel can still give: `MemAvailable`, or less if this
/// process's memory cgroup has a lower limit left. `None` if unknown.
#[must_use]
pub fn available() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let mut avail = meminfo.lines().find_map(|l| {
        let kb = l.strip_prefix("MemAvailable:")?.trim().strip_suffix("kB")?;
        kb.trim().parse::<u64>().ok().map(|kb| kb * 1024)
    })?;
    if let Some(left) = cgroup_left() {
        avail = avail.min(left);
    }
    Some(avail)
}

/// `memory.max - memory.current` of this process's cgroup (v2), if limited.
fn cgroup_left() -> Option<u64> {
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = cgroup.lines().find_map(|l| l.strip_prefix("0::"))?;
    let dir = std::path::Path::new("/sys/fs/cgroup").join(path.trim_start_matches('/'));
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).ok();
    let max: u64 = read("memory.max")?.trim().parse().ok()?;
    let current: u64 = read("memory.current")?.trim().parse().ok()?;
    Some(max.saturating_sub(current))
}

/// Refuses capacities whose maps would take more memory up front than the
/// machine has available.
pub fn check(capacity: &Capacity, cpus: u64, available: u64) -> Result<u64, TooLarge> {
    let by_option = estimate(capacity, cpus);
    let upfront: u64 = by_option.iter().map(|m| m.upfront).sum();
    let full: u64 = by_option.iter().map(|m| m.full).sum();
    if upfront <= available {
        return Ok(upfront);
    }
    let largest = by_option
        .iter()
        .max_by_key(|m| m.upfront)
        .expect("the estimate lists every option");
    Err(TooLarge {
        upfront,
        full,
        available,
        option: largest.option,
        option_bytes: largest.upfront,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_fit_in_a_few_dozen_mib() {
        let total: u64 = estimate(&Capacity::default(), 2)
            .iter()
            .map(|m| m.upfront)
            .sum();
        assert!(total < 64 << 20, "{} MiB", mib(total));
        assert!(check(&Capacity::default(), 2, 1 << 30).is_ok());
    }

    #[test]
    fn too_large_names_the_option_that_asks_most() {
        let capacity = Capacity {
            counters: 1 << 26,
            ..Capacity::default()
        };
        let err = check(&capacity, 64, 8 << 30).unwrap_err();
        assert_eq!(err.option, "--max-counters");
        let text = err.to_string();
        assert!(
            text.contains("--max-counters alone asks for")
                && text.contains("MiB this machine has available"),
            "{text}"
        );
    }
}
