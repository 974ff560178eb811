//! Map names, keys and values shared by the eBPF programs and the agent.
//!
//! # Generations
//!
//! A policy change must be all-or-nothing as packets see it. Every map that
//! holds policy is split in two *halves* (a bit in the key or in the index);
//! [`Config::active`] says which half packets read. The agent writes a new
//! policy into the inactive half, flips `active` with one word store, then
//! brings the other half up to date. State that outlives a policy (rate-limit
//! buckets, sampler windows, counters) is not split.

/// Symbol names of the maps in the eBPF object.
pub mod names {
    pub const CONFIG: &str = "CONFIG";
    pub const HOSTS_V4: &str = "HOSTS_V4";
    pub const HOSTS_V6: &str = "HOSTS_V6";
    pub const PREFIXES_V4: &str = "PREFIXES_V4";
    pub const PREFIXES_V6: &str = "PREFIXES_V6";
    pub const ACCOUNTS: &str = "ACCOUNTS";
    pub const RULES_V4: &str = "RULES_V4";
    pub const RULES_V6: &str = "RULES_V6";
    pub const ACCT_RULES_V4: &str = "ACCT_RULES_V4";
    pub const ACCT_RULES_V6: &str = "ACCT_RULES_V6";
    pub const STRIDE: &str = "STRIDE";
    pub const FLOW_CACHE: &str = "FLOW_CACHE";
    pub const RATE_STATE: &str = "RATE_STATE";
    pub const SAMPLER: &str = "SAMPLER";
    pub const TOTALS: &str = "TOTALS";
    pub const ACCOUNT_COUNTERS: &str = "ACCT_COUNTERS";
    pub const STATS: &str = "STATS";
    pub const EVENTS: &str = "EVENTS";
}

/// Where the agent pins its datapath on bpffs, relative to its pin
/// directory (`--bpffs`, default [`pins::DEFAULT_DIR`]): the maps under
/// their [`names`], the links by interface, and three maps of the agent's own.
pub mod pins {
    /// The default pin directory.
    pub const DEFAULT_DIR: &str = "/sys/fs/bpf/mmesh";
    /// Subdirectory of the object's maps, each pinned under its symbol name.
    pub const MAPS: &str = "maps";
    /// Subdirectory of the links: `IFNAME:IFINDEX:receive` and
    /// `IFNAME:IFINDEX:transmit` (bpffs refuses dots in names: those of the
    /// interface name are written `%2e`).
    pub const LINKS: &str = "links";
    pub const RECEIVE: &str = "receive";
    pub const TRANSMIT: &str = "transmit";
    /// Before TCX (Linux 6.6) a TC program sits in a clsact filter, which
    /// has no link: `IFNAME:IFINDEX:{receive,transmit}:filter` pins the
    /// program of mmesh's filter on that side of the device.
    pub const FILTER: &str = "filter";
    /// `IFNAME:IFINDEX:clsact`: an agent added the device's clsact qdisc
    /// (before TCX), and `detach` removes it.
    pub const QDISC: &str = "clsact";
    /// A one-entry array the agent keeps (no program reads it): the format
    /// of the pin directory ([`FORMAT`]), the build identity of the object
    /// that made the pins, and the highest policy generation ever written.
    pub const AGENT: &str = "mmesh_agent";
    /// An array by account slot of a hash of the id of the account holding
    /// it, so that a restarted agent gives every account its slot back (and
    /// with it its counters and rate-limit state).
    pub const SLOT_IDS: &str = "mmesh_slot_ids";
    /// A hash from map name (zero-padded to 16 bytes) to the
    /// [`LAYOUT_VERSIONS`](super::LAYOUT_VERSIONS) entry of the agent that
    /// created the pinned map.
    pub const LAYOUTS: &str = "mmesh_layouts";
    /// Version of the pin directory's own arrays (their keys and values).
    /// An agent refuses a pin directory of another format.
    pub const FORMAT: u32 = 2;
}

/// Layout version of each map shared with the kernel, by symbol name: the
/// meaning of its keys and values. A pinned map is reused only when its
/// version here, its type, key and value sizes and flags (read from the
/// object) and its number of entries (from the capacities) are this
/// agent's; otherwise it is recreated and refilled. Raise a map's version
/// whenever the meaning of its entries changes, also when the sizes stay.
pub const LAYOUT_VERSIONS: [(&str, u32); 18] = [
    (names::CONFIG, 1),
    (names::HOSTS_V4, 1),
    (names::HOSTS_V6, 1),
    (names::PREFIXES_V4, 1),
    (names::PREFIXES_V6, 1),
    (names::ACCOUNTS, 1),
    (names::RULES_V4, 1),
    (names::RULES_V6, 1),
    (names::ACCT_RULES_V4, 1),
    (names::ACCT_RULES_V6, 1),
    (names::STRIDE, 1),
    (names::FLOW_CACHE, 1),
    (names::RATE_STATE, 1),
    (names::SAMPLER, 1),
    (names::TOTALS, 1),
    (names::ACCOUNT_COUNTERS, 1),
    (names::STATS, 1),
    (names::EVENTS, 1),
];

/// Symbol names of the programs in the eBPF object. A program's name says
/// its direction; the hook it sits on follows from the interface's role and
/// device (`mmesh_agent::hook`).
pub mod programs {
    /// XDP, packets towards accounts: uplink receive on a physical device.
    pub const XDP_INBOUND: &str = "xdp_inbound";
    /// XDP, packets from accounts: workload receive on a physical device.
    pub const XDP_OUTBOUND: &str = "xdp_outbound";
    /// TC, packets towards accounts: workload transmit (egress), and uplink
    /// receive (ingress) on a virtual device.
    pub const TC_INBOUND: &str = "tc_inbound";
    /// TC, packets from accounts: uplink transmit (egress), and workload
    /// receive (ingress) on a virtual device (a container's veth, a VM's tap).
    pub const TC_OUTBOUND: &str = "tc_outbound";
}

/// The slot of traffic attributed to no account. Account slots start at 1.
pub const NO_ACCOUNT: u32 = 0;

/// [`GenConfig::flags`]: some account owns an IPv4 prefix wider than /32,
/// so attribution must consult the LPM trie after the host hash.
pub const GEN_PREFIXES_V4: u32 = 1 << 0;
/// As [`GEN_PREFIXES_V4`] for IPv6 prefixes wider than /128.
pub const GEN_PREFIXES_V6: u32 = 1 << 1;
/// The global scope has IPv4 list entries.
pub const GEN_RULES_V4: u32 = 1 << 2;
/// The global scope has IPv6 list entries.
pub const GEN_RULES_V6: u32 = 1 << 3;

/// The single value of the `CONFIG` array.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// The half (0 or 1) packets use. Written last when a policy is applied.
    pub active: u32,
    /// Entries of `FLOW_CACHE` minus one (a power of two minus one).
    pub flow_mask: u32,
    /// Per-half settings, indexed by half.
    pub halves: [GenConfig; 2],
}

/// Global settings of one half.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GenConfig {
    /// The policy generation this half holds (increases with every apply);
    /// copied into events so they can be tied to the policy that made them.
    pub generation: u64,
    /// `GEN_*` bits.
    pub flags: u32,
    /// Verdict code for truncated and malformed IP packets: `Drop` or `Monitor`.
    pub malformed: u32,
    /// Events allowed per (account, reason) per second; 0 disables events.
    pub event_rate: u32,
    pub _pad: u32,
}

/// LPM trie and hash key for IPv4: a scope word, then the address in network
/// order. In the tries the scope is always matched in full, so an entry for
/// `addr/len` has prefix length `32 + len`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ScopedV4 {
    pub scope: u32,
    pub addr: [u8; 4],
}

/// As [`ScopedV4`] for IPv6.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ScopedV6 {
    pub scope: u32,
    pub addr: [u8; 16],
}

/// Bits of an LPM key taken by the scope word.
pub const SCOPE_BITS: u32 = 32;

/// The scope word: the half in the top bit, the list scope below it
/// ([`NO_ACCOUNT`] for global lists and attribution, else the account slot).
#[inline(always)]
#[must_use]
pub const fn scope(half: u32, id: u32) -> u32 {
    (half << 31) | id
}

/// Value of the `RULES_*` (global) and `ACCT_RULES_*` (per account) tries:
/// what a matching remote address gets.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RuleValue {
    /// A [`Verdict`](crate::Verdict) code: `Pass` (an allow entry), `Drop`
    /// or `Monitor`. Allow-over-block and drop-over-monitor are resolved when
    /// the policy is compiled, so the longest match is the answer.
    pub action: u32,
    /// Index of the named list that decided, for events.
    pub list: u32,
}

/// [`AccountConfig::flags`]: the slot is in use in this half.
pub const ACCOUNT_ACTIVE: u32 = 1 << 0;
/// The account has IPv4 list entries.
pub const ACCOUNT_RULES_V4: u32 = 1 << 1;
/// The account has IPv6 list entries.
pub const ACCOUNT_RULES_V6: u32 = 1 << 2;

/// Value of the `ACCOUNTS` array at [`account_index`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AccountConfig {
    /// `ACCOUNT_*` bits.
    pub flags: u32,
    /// The low 32 bits of the generation in which the slot got its current
    /// account: flow-cache counts from before belong to an account that is
    /// gone and are dropped, not flushed into the new owner's counters.
    pub epoch: u32,
    /// Limits indexed by [`Direction`](crate::Direction).
    pub limits: [DirLimits; 2],
}

/// The limits of one account in one direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirLimits {
    pub pps: RateLimit,
    pub bps: RateLimit,
}

/// One rate limit in the form the kernel evaluates (see [`crate::rate`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateLimit {
    /// Nanoseconds per unit (packet or byte), 32.32 fixed point.
    pub interval_fp: u64,
    /// Burst in bucket time (`2^-TIME_SHIFT` ns, see [`crate::rate`]): burst
    /// units times the interval.
    pub tolerance: u64,
    /// 0: no limit; else the [`Verdict`](crate::Verdict) code above the rate
    /// (`Drop` or `Monitor`).
    pub action: u32,
    pub _pad: u32,
}

/// Rate-limit state of one (account, direction), at [`rate_index`]. Shared by
/// all CPUs and updated with compare-and-swap; one cache line each so that two
/// accounts never contend for the same line.
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateState {
    /// Theoretical arrival time of the packet-rate bucket (ns, monotonic clock).
    pub pps_tat: u64,
    /// Theoretical arrival time of the bit-rate bucket.
    pub bps_tat: u64,
    pub _reserved: [u64; 6],
}

/// One entry of the per-CPU, direct-mapped `FLOW_CACHE`: the decision of
/// the checks that depend only on the addresses (attribution and the lists)
/// for one (local, remote, direction), valid for one policy generation, and
/// the packets of the flow that got exactly that decision. A repeated flow
/// skips the host hash, the stride and the tries, and is counted here rather
/// than in `ACCT_COUNTERS` (which receives the counts when the entry is
/// replaced); rate limits are still evaluated per packet.
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEntry {
    /// Local and remote address; IPv4 in the first four bytes, the rest zero.
    pub local: [u8; 16],
    pub remote: [u8; 16],
    /// The low 32 bits of the generation the decision belongs to; 0: empty.
    pub generation: u32,
    /// [`flow_tag`] of family and direction.
    pub tag: u16,
    pub reason: u8,
    pub verdict: u8,
    pub slot: u32,
    pub list: u32,
    /// Packets and bytes of this flow that got this decision since the entry
    /// was written.
    pub packets: u64,
    pub bytes: u64,
}

/// The generation as a [`FlowEntry`] keeps it: never 0 (empty) for a
/// written policy, even when the low bits wrap.
#[inline(always)]
#[must_use]
pub const fn flow_generation(generation: u64) -> u32 {
    let low = generation as u32;
    if low == 0 { 1 } else { low }
}

/// The family/direction word of a [`FlowEntry`] (never 0).
#[inline(always)]
#[must_use]
pub const fn flow_tag(family: u8, direction: u8) -> u16 {
    ((family as u16) << 8) | direction as u16
}

/// The family (4 or 6) and direction of a [`flow_tag`].
#[inline(always)]
#[must_use]
pub const fn flow_tag_parts(tag: u16) -> (u8, u8) {
    ((tag >> 8) as u8, tag as u8)
}

/// A packet and byte count, as on the wire: a GSO skb counts as its
/// segments, each with its own headers.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

/// Key of the per-CPU `ACCT_COUNTERS` hash.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CounterKey {
    pub slot: u32,
    pub reason: u8,
    pub verdict: u8,
    pub direction: u8,
    pub _pad: u8,
}

/// Entries of the per-CPU `TOTALS` array.
pub const TOTALS_LEN: u32 =
    (crate::Reason::COUNT * crate::Verdict::COUNT * crate::Direction::COUNT) as u32;

/// `STATS` (per-CPU `u64`): events lost because the ring buffer was full.
pub const STAT_EVENTS_LOST: u32 = 0;
/// `STATS`: packets not counted per account because `ACCT_COUNTERS` was full
/// (they are still in `TOTALS`).
pub const STAT_COUNTERS_FULL: u32 = 1;
/// `STATS`: rate-limit updates that lost every compare-and-swap retry and were
/// charged with a plain atomic add instead.
pub const STAT_RATE_CONTENDED: u32 = 2;
/// `STATS`: TC packets whose headers could not be pulled into the
/// linear part of the skb (they are then counted as truncated).
pub const STAT_PULL_FAILED: u32 = 3;
/// `STATS`: drops and monitored packets that were not reported as an event
/// because their (account, reason) had used its events for the second
/// (`event_rate`). With [`STAT_EVENTS_LOST`] and the events read, every
/// such packet is accounted for once.
pub const STAT_EVENTS_SAMPLED: u32 = 4;
/// Entries of `STATS`.
pub const STATS_LEN: u32 = 5;

#[inline(always)]
#[must_use]
pub const fn account_index(slot: u32, half: u32) -> u32 {
    slot * 2 + half
}

#[inline(always)]
#[must_use]
pub const fn rate_index(slot: u32, direction: u8) -> u32 {
    slot * 2 + direction as u32
}

#[inline(always)]
#[must_use]
pub const fn sampler_index(slot: u32, reason: u8) -> u32 {
    slot * crate::Reason::COUNT as u32 + reason as u32
}

#[inline(always)]
#[must_use]
pub const fn totals_index(reason: u8, verdict: u8, direction: u8) -> u32 {
    ((reason as u32 * crate::Verdict::COUNT as u32) + verdict as u32)
        * crate::Direction::COUNT as u32
        + direction as u32
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are `#[repr(C)]`, `Copy`, made of integers and
    // integer arrays with explicit padding fields, so every bit pattern is valid.
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::GenConfig {}
    unsafe impl aya::Pod for super::ScopedV4 {}
    unsafe impl aya::Pod for super::ScopedV6 {}
    unsafe impl aya::Pod for super::RuleValue {}
    unsafe impl aya::Pod for super::AccountConfig {}
    unsafe impl aya::Pod for super::RateState {}
    unsafe impl aya::Pod for super::Counter {}
    unsafe impl aya::Pod for super::CounterKey {}
    unsafe impl aya::Pod for super::FlowEntry {}
}

#[cfg(test)]
mod tests {
    use core::mem::size_of;

    use super::*;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<Config>(), 8 + 2 * size_of::<GenConfig>());
        assert_eq!(size_of::<GenConfig>(), 24);
        assert_eq!(size_of::<ScopedV4>(), 8);
        assert_eq!(size_of::<ScopedV6>(), 20);
        assert_eq!(size_of::<RuleValue>(), 8);
        assert_eq!(size_of::<RateLimit>(), 24);
        assert_eq!(size_of::<AccountConfig>(), 8 + 4 * 24);
        assert_eq!(size_of::<RateState>(), 64);
        assert_eq!(size_of::<CounterKey>(), 8);
        assert_eq!(size_of::<FlowEntry>(), 64);
    }

    #[test]
    fn totals_index_is_dense() {
        let mut seen = [false; TOTALS_LEN as usize];
        for r in crate::Reason::ALL {
            for v in crate::Verdict::ALL {
                for d in crate::Direction::ALL {
                    let i = totals_index(r as u8, v as u8, d as u8) as usize;
                    assert!(!seen[i]);
                    seen[i] = true;
                }
            }
        }
        assert!(seen.iter().all(|s| *s));
    }

    #[test]
    fn every_map_has_one_layout_version_and_a_short_name() {
        for (i, (name, _)) in LAYOUT_VERSIONS.iter().enumerate() {
            // The name is the key of `pins::LAYOUTS`.
            assert!(name.len() <= 16, "{name}");
            assert!(
                LAYOUT_VERSIONS[..i].iter().all(|(n, _)| n != name),
                "{name} listed twice"
            );
        }
    }

    #[test]
    fn scope_keeps_half_and_id_apart() {
        assert_eq!(scope(0, 5), 5);
        assert_eq!(scope(1, 5), 0x8000_0005);
    }
}
