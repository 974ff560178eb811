//! The maps. Sizes here are placeholders: the agent sets every capacity at
//! load time from its command line (`EbpfLoader::set_max_entries`).

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, PerCpuArray, PerCpuHashMap, RingBuf},
};
use mmesh_common::{
    maps::{
        AccountConfig, Config, Counter, CounterKey, FlowEntry, RateState, RuleValue, STATS_LEN,
        ScopedV4, ScopedV6, TOTALS_LEN,
    },
    stride::Node,
};

/// Which half is active, and the settings of each half.
#[map]
pub static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

/// Attribution of host addresses (/32): (half, address) -> account slot.
/// Checked before the tries because most account addresses are hosts and an
/// exact hash costs a fraction of an LPM lookup.
#[map]
pub static HOSTS_V4: HashMap<ScopedV4, u32> = HashMap::with_max_entries(1024, 0);

/// Attribution of host addresses (/128).
#[map]
pub static HOSTS_V6: HashMap<ScopedV6, u32> = HashMap::with_max_entries(1024, 0);

/// Attribution of wider IPv4 prefixes: (half, prefix) -> account slot.
#[map]
pub static PREFIXES_V4: LpmTrie<ScopedV4, u32> = LpmTrie::with_max_entries(1024, 0);

/// Attribution of wider IPv6 prefixes.
#[map]
pub static PREFIXES_V6: LpmTrie<ScopedV6, u32> = LpmTrie::with_max_entries(1024, 0);

/// Per-account settings at `account_index(slot, half)`.
#[map]
pub static ACCOUNTS: Array<AccountConfig> = Array::with_max_entries(2048, 0);

/// Global block and allow lists for the remote address: (half, prefix) ->
/// verdict. For IPv4, consulted only where `STRIDE` says so.
#[map]
pub static RULES_V4: LpmTrie<ScopedV4, RuleValue> = LpmTrie::with_max_entries(1024, 0);

/// As `RULES_V4` for IPv6.
#[map]
pub static RULES_V6: LpmTrie<ScopedV6, RuleValue> = LpmTrie::with_max_entries(1024, 0);

/// The accounts' own lists: (half | slot, prefix) -> verdict. Apart from the
/// global lists so that these small tries stay small and hot.
#[map]
pub static ACCT_RULES_V4: LpmTrie<ScopedV4, RuleValue> = LpmTrie::with_max_entries(1024, 0);

/// As `ACCT_RULES_V4` for IPv6.
#[map]
pub static ACCT_RULES_V6: LpmTrie<ScopedV6, RuleValue> = LpmTrie::with_max_entries(1024, 0);

/// The first levels of the global IPv4 lists (`mmesh_common::stride`).
#[map]
pub static STRIDE: Array<Node> = Array::with_max_entries(1024, 0);

/// Decisions of recent flows, per CPU, direct-mapped (`mmesh_common::maps::FlowEntry`).
#[map]
pub static FLOW_CACHE: PerCpuArray<FlowEntry> = PerCpuArray::with_max_entries(1024, 0);

/// Token buckets at `rate_index(slot, direction)`, shared by all CPUs.
#[map]
pub static RATE_STATE: Array<RateState> = Array::with_max_entries(2048, 0);

/// Event sampler windows at `sampler_index(slot, reason)`.
#[map]
pub static SAMPLER: Array<u64> = Array::with_max_entries(8192, 0);

/// Packets and bytes by (reason, verdict, direction), all accounts together.
#[map]
pub static TOTALS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(TOTALS_LEN, 0);

/// Packets and bytes by (account, reason, verdict, direction).
#[map]
pub static ACCT_COUNTERS: PerCpuHashMap<CounterKey, Counter> =
    PerCpuHashMap::with_max_entries(4096, 0);

/// Datapath health counters (`STAT_*`).
#[map]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STATS_LEN, 0);

/// Sampled events for the agent.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);
