//! The loaded datapath: the eBPF object, its maps, its attachments, and the
//! all-or-nothing application of compiled policies.
//!
//! # Applying a policy
//!
//! Every policy map is split in two halves (see `mmesh_common::maps`).
//! [`Datapath::apply`]:
//!
//! 1. waits, if it has not since the last flip, for programs that may still
//!    read the inactive half ([`ProgramBarrier`]);
//! 2. writes into the inactive half the difference between what it holds and
//!    the new policy (packets do not read it);
//! 3. flips `CONFIG.active` with one word store: from the next packet on,
//!    every lookup uses the new policy.
//!
//! [`Datapath::sync_standby`] then brings the old half up to date (after the
//! same wait), so that the next change writes only its own difference. The
//! agent runs it right after every apply; the policy is in force before it.
//!
//! If step 2 fails, nothing packets see has changed and the error is
//! returned: the previous policy keeps enforcing. The agent tracks what each
//! half holds; a half whose writes failed part-way is marked unknown and read
//! back from the kernel before its next use.

use std::{
    collections::BTreeMap,
    os::{
        fd::{AsFd as _, OwnedFd},
        linux::net::SocketAddrExt as _,
        unix::net::UnixListener,
    },
    sync::Arc,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, HashMap, IterableMap as _, LpmTrie, MapData, MapError, PerCpuArray, PerCpuHashMap,
        RingBuf, lpm_trie::Key,
    },
    programs::{
        ProgramError, SchedClassifier, TcAttachType, Xdp, XdpMode, tc, tc::SchedClassifierLinkId,
        xdp::XdpLinkId,
    },
    util::KernelVersion,
};
use mmesh_common::{
    Direction, Reason, Verdict,
    maps::{
        ACCOUNT_ACTIVE, AccountConfig, Config, Counter, CounterKey, FlowEntry, GenConfig,
        NO_ACCOUNT, RateState, RuleValue, SCOPE_BITS, STATS_LEN, ScopedV4, ScopedV6, TOTALS_LEN,
        account_index, flow_generation, flow_tag_parts, names, programs, rate_index, sampler_index,
        scope, totals_index,
    },
    stride,
};
use serde::Serialize;

use crate::{
    barrier::ProgramBarrier,
    batch,
    compile::{AccountEntries, Capacity, Compiled, GlobalEntries, PrefixKey},
    hook::{self, Hook, ReceiveHook},
    interface::{self, InterfaceError, InterfaceSpec, Role},
    stride::Stride,
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

/// Why the datapath could not be loaded, attached or updated.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error(
        "this mmesh-agent was built without its eBPF object (AYA_BUILD_SKIP was set); rebuild it with `cargo xtask build`"
    )]
    NoObject,
    #[error("kernel {found} is too old: mmesh-agent needs Linux {}.{} or later", MIN_KERNEL.0, MIN_KERNEL.1)]
    KernelTooOld { found: String },
    #[error(
        "permission denied while {doing}: run mmesh-agent as root, or with CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON"
    )]
    Permission { doing: String },
    #[error("cannot load the eBPF object: {0}")]
    Load(#[source] aya::EbpfError),
    #[error("the kernel verifier rejected program {program}: {reason}\n{log}")]
    Verifier {
        program: String,
        reason: String,
        log: String,
    },
    #[error("cannot load program {program}: {source}")]
    Program {
        program: String,
        #[source]
        source: ProgramError,
    },
    #[error(
        "the eBPF object has no {what} named {name}: the agent and its object are out of step; rebuild both"
    )]
    Missing { what: &'static str, name: String },
    #[error("map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error(transparent)]
    Interface(#[from] InterfaceError),
    #[error(
        "interface {name} already has an XDP program attached by another tool; remove it first (`ip link set dev {name} xdp off`)"
    )]
    XdpBusy { name: String },
    #[error("cannot attach {program} to {name}: {source}")]
    Attach {
        program: &'static str,
        name: String,
        #[source]
        source: ProgramError,
    },
    #[error(
        "cannot tell what kind of device interface {name} is (ETHTOOL_GDRVINFO): {source}; choose its receive hook with --receive-hook xdp or tc"
    )]
    DeviceKind {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "interface {name} is already attached by another mmesh-agent; stop that one first (two agents would count and rate-limit every packet twice)"
    )]
    Claimed { name: String },
    #[error("cannot claim interface {name} for this agent: {source}")]
    Claim {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("interface {0} is attached twice; give each interface once")]
    DuplicateInterface(String),
    #[error("cannot create the program barrier map-in-map: {0}")]
    Barrier(#[source] std::io::Error),
}

impl DatapathError {
    fn map(map: &'static str, source: MapError) -> Self {
        if is_permission(&source) {
            return Self::Permission {
                doing: format!("writing map {map}"),
            };
        }
        Self::Map { map, source }
    }
}

/// The error of a failed [`batch::update`] of map `map`.
fn batch_error(map: &'static str) -> impl Fn(std::io::Error) -> DatapathError {
    move |io_error| {
        let call = "bpf_map_update_batch";
        DatapathError::map(
            map,
            MapError::SyscallError(aya::sys::SyscallError { call, io_error }),
        )
    }
}

/// Whether an error chain bottoms out in EPERM or EACCES.
fn is_permission(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && matches!(io.raw_os_error(), Some(libc::EPERM | libc::EACCES))
        {
            return true;
        }
        cur = e.source();
    }
    false
}

/// An interface with the programs attached to it.
#[derive(Clone, Debug, Serialize)]
pub struct Attachment {
    pub name: String,
    pub ifindex: u32,
    pub role: Role,
    /// Where the receive program is: XDP, or TC ingress.
    pub receive: Hook,
    /// The device's driver (`veth`, `tun`, `ixgbe`; empty if it has none),
    /// which decided `receive` under `--receive-hook auto`.
    pub driver: String,
    /// How TC programs are attached: `tcx` or `clsact`.
    pub tc_mode: &'static str,
    #[serde(skip)]
    added_clsact: bool,
    #[serde(skip)]
    links: AttachmentLinks,
}

/// The links of one attachment, to detach it alone, and its claim on the
/// device ([`claim`]).
#[derive(Debug)]
struct AttachmentLinks {
    receive: Option<Link>,
    transmit: Option<Link>,
    claim: Option<UnixListener>,
}

impl Clone for AttachmentLinks {
    /// A copy describes the attachment; only the original can detach it.
    fn clone(&self) -> Self {
        Self {
            receive: None,
            transmit: None,
            claim: None,
        }
    }
}

/// One link, and the program it attaches.
#[derive(Debug)]
enum Link {
    Xdp(&'static str, XdpLinkId),
    Tc(&'static str, SchedClassifierLinkId),
}

/// Typed handles of the maps, owned in one place.
struct Maps {
    config: Array<MapData, Config>,
    hosts_v4: HashMap<MapData, ScopedV4, u32>,
    hosts_v6: HashMap<MapData, ScopedV6, u32>,
    prefixes_v4: LpmTrie<MapData, ScopedV4, u32>,
    prefixes_v6: LpmTrie<MapData, ScopedV6, u32>,
    accounts: Array<MapData, AccountConfig>,
    rules_v4: LpmTrie<MapData, ScopedV4, RuleValue>,
    rules_v6: LpmTrie<MapData, ScopedV6, RuleValue>,
    acct_rules_v4: LpmTrie<MapData, ScopedV4, RuleValue>,
    acct_rules_v6: LpmTrie<MapData, ScopedV6, RuleValue>,
    stride: Array<MapData, stride::Node>,
    /// Chunk nodes per half.
    stride_chunks: u32,
    rate_state: Array<MapData, RateState>,
    sampler: Array<MapData, u64>,
    totals: PerCpuArray<MapData, Counter>,
    account_counters: PerCpuHashMap<MapData, CounterKey, Counter>,
    flow_cache: PerCpuArray<MapData, FlowEntry>,
    stats: PerCpuArray<MapData, u64>,
}

/// A slot's entries before and after a change.
type Change = (
    u32,
    Option<Arc<AccountEntries>>,
    Option<Arc<AccountEntries>>,
);

/// Account entries gathered for one batched system call per map
/// ([`batch::update`]): the first load of a large policy writes hundreds of
/// thousands of them. (Account rules go one by one: there are few.)
#[derive(Default)]
struct Pending {
    hosts_v4: Batch<ScopedV4, u32>,
    hosts_v6: Batch<ScopedV6, u32>,
    prefixes_v4: Batch<Key<ScopedV4>, u32>,
    prefixes_v6: Batch<Key<ScopedV6>, u32>,
    accounts: Batch<u32, AccountConfig>,
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

    fn write(&self, map: &MapData) -> std::io::Result<()> {
        batch::update(map, &self.keys, &self.values)
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
        for (slot, old, new) in &changed {
            self.remove_entries(half, *slot, old, new.unwrap_or(&empty))?;
        }
        let mut pending = Pending::default();
        for (slot, old, new) in &changed {
            self.put_entries(half, *slot, old, *new, epochs, &mut pending)?;
        }
        self.flush(&pending)
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
        for (slot, old, new) in &changed {
            self.remove_entries(
                half,
                *slot,
                old.as_deref().unwrap_or(&empty),
                new.as_deref().unwrap_or(&empty),
            )?;
        }
        let mut pending = Pending::default();
        for (slot, old, new) in &changed {
            self.put_entries(
                half,
                *slot,
                old.as_deref().unwrap_or(&empty),
                new.as_deref(),
                epochs,
                &mut pending,
            )?;
        }
        self.flush(&pending)
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
        let keys4: Vec<_> = new.rules_v4.iter().map(|(k, _)| *k).collect();
        for (k, _) in old.rules_v4.iter().filter(|(k, _)| !keys4.contains(k)) {
            remove_lpm(
                &mut self.acct_rules_v4,
                names::ACCT_RULES_V4,
                &key4(mine, k.addr, k.len),
            )?;
        }
        let keys6: Vec<_> = new.rules_v6.iter().map(|(k, _)| *k).collect();
        for (k, _) in old.rules_v6.iter().filter(|(k, _)| !keys6.contains(k)) {
            remove_lpm(
                &mut self.acct_rules_v6,
                names::ACCT_RULES_V6,
                &key6(mine, k.addr, k.len),
            )?;
        }
        Ok(())
    }

    /// Writes the entries of `new` that `old` does not have (or has with
    /// another value), and the account's settings; without `new`, leaves a
    /// tombstone holding the slot's epoch.
    fn put_entries(
        &mut self,
        half: u32,
        slot: u32,
        old: &AccountEntries,
        new: Option<&AccountEntries>,
        epochs: &[u32],
        pending: &mut Pending,
    ) -> Result<(), DatapathError> {
        let epoch = epochs.get(slot as usize).copied().unwrap_or(0);
        let Some(new) = new else {
            let tombstone = AccountConfig {
                epoch,
                ..AccountConfig::default()
            };
            pending.accounts.push(account_index(slot, half), tombstone);
            return Ok(());
        };
        let own = scope(half, NO_ACCOUNT);
        let mine = scope(half, slot);
        for a in gone(&new.hosts_v4, &old.hosts_v4) {
            pending.hosts_v4.push(
                ScopedV4 {
                    scope: own,
                    addr: *a,
                },
                slot,
            );
        }
        for a in gone(&new.hosts_v6, &old.hosts_v6) {
            pending.hosts_v6.push(
                ScopedV6 {
                    scope: own,
                    addr: *a,
                },
                slot,
            );
        }
        for k in gone(&new.prefixes_v4, &old.prefixes_v4) {
            pending.prefixes_v4.push(key4(own, k.addr, k.len), slot);
        }
        for k in gone(&new.prefixes_v6, &old.prefixes_v6) {
            pending.prefixes_v6.push(key6(own, k.addr, k.len), slot);
        }
        for rule in gone(&new.rules_v4, &old.rules_v4) {
            let (k, v) = rule;
            self.acct_rules_v4
                .insert(&key4(mine, k.addr, k.len), v, 0)
                .map_err(|e| DatapathError::map(names::ACCT_RULES_V4, e))?;
        }
        for rule in gone(&new.rules_v6, &old.rules_v6) {
            let (k, v) = rule;
            self.acct_rules_v6
                .insert(&key6(mine, k.addr, k.len), v, 0)
                .map_err(|e| DatapathError::map(names::ACCT_RULES_V6, e))?;
        }
        let config = AccountConfig {
            epoch,
            ..new.config
        };
        if old.config != config {
            pending.accounts.push(account_index(slot, half), config);
        }
        Ok(())
    }

    /// Writes the batched entries of `pending`. Order does not matter: the
    /// half is inactive, and a failure leaves it unknown.
    fn flush(&mut self, pending: &Pending) -> Result<(), DatapathError> {
        pending
            .hosts_v4
            .write(self.hosts_v4.map())
            .map_err(batch_error(names::HOSTS_V4))?;
        pending
            .hosts_v6
            .write(self.hosts_v6.map())
            .map_err(batch_error(names::HOSTS_V6))?;
        pending
            .prefixes_v4
            .write(self.prefixes_v4.map())
            .map_err(batch_error(names::PREFIXES_V4))?;
        pending
            .prefixes_v6
            .write(self.prefixes_v6.map())
            .map_err(batch_error(names::PREFIXES_V6))?;
        pending
            .accounts
            .write(self.accounts.map())
            .map_err(batch_error(names::ACCOUNTS))
    }

    /// The accounts' entries in half `half`, by slot (slots up to
    /// `max_slot`).
    fn read_accounts(
        &self,
        half: u32,
        max_slot: u32,
    ) -> Result<BTreeMap<u32, AccountEntries>, DatapathError> {
        let mut accounts: BTreeMap<u32, AccountEntries> = BTreeMap::new();
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
        for slot in 1..=max_slot {
            let config = self
                .accounts
                .get(&account_index(slot, half), 0)
                .map_err(|e| DatapathError::map(names::ACCOUNTS, e))?;
            if config.flags & ACCOUNT_ACTIVE != 0 {
                accounts.entry(slot).or_default().config = config;
            }
        }
        Ok(accounts)
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
    let mut out = Vec::new();
    for entry in map {
        let (key, value) = entry.map_err(|e| DatapathError::map(name, e))?;
        if in_half(scope(&key), half) {
            out.push((key, value));
        }
    }
    Ok(out)
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

/// The LPM key of `addr/len` in the scope word `scope`.
fn key4(scope: u32, addr: [u8; 4], len: u8) -> Key<ScopedV4> {
    Key::new(SCOPE_BITS + u32::from(len), ScopedV4 { scope, addr })
}

fn key6(scope: u32, addr: [u8; 16], len: u8) -> Key<ScopedV6> {
    Key::new(SCOPE_BITS + u32::from(len), ScopedV6 { scope, addr })
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

/// Totals by reason, verdict and direction, summed over CPUs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub counters: BTreeMap<(Reason, Verdict, Direction), Counter>,
    pub events_lost: u64,
    pub counters_full: u64,
    pub rate_contended: u64,
    pub pull_failed: u64,
}

/// The loaded programs and maps.
pub struct Datapath {
    ebpf: Ebpf,
    maps: Maps,
    events: Option<RingBuf<MapData>>,
    capacity: Capacity,
    /// What each half holds; `None` when a write failed part-way.
    halves: [Option<Arc<Compiled>>; 2],
    config: Config,
    generation: u64,
    /// Per account slot, the low bits of the generation in which it got its
    /// account (or lost it): see `AccountConfig::epoch`.
    epochs: Vec<u32>,
    barrier: ProgramBarrier,
    /// No program has read the standby half since the last flip.
    quiesced: bool,
    attachments: Vec<Attachment>,
}

impl Datapath {
    /// Loads the object with maps sized by `capacity` and passes the
    /// programs through the verifier. Nothing is attached yet.
    pub fn load(capacity: Capacity) -> Result<Self, DatapathError> {
        if EBPF_OBJECT.is_empty() {
            return Err(DatapathError::NoObject);
        }
        check_kernel()?;
        raise_memlock();
        let slots = capacity.accounts + 1;
        let mut loader = EbpfLoader::new();
        loader
            .map_max_entries(names::HOSTS_V4, 2 * capacity.account_prefixes)
            .map_max_entries(names::HOSTS_V6, 2 * capacity.account_prefixes)
            .map_max_entries(names::PREFIXES_V4, 2 * capacity.account_prefixes)
            .map_max_entries(names::PREFIXES_V6, 2 * capacity.account_prefixes)
            .map_max_entries(names::ACCOUNTS, 2 * slots)
            .map_max_entries(names::RULES_V4, 2 * capacity.list_prefixes)
            .map_max_entries(names::RULES_V6, 2 * capacity.list_prefixes)
            .map_max_entries(names::ACCT_RULES_V4, 2 * capacity.list_prefixes)
            .map_max_entries(names::ACCT_RULES_V6, 2 * capacity.list_prefixes)
            .map_max_entries(
                names::STRIDE,
                stride::CHUNK_BASE + 2 * capacity.stride_chunks,
            )
            .map_max_entries(names::FLOW_CACHE, capacity.flow_cache)
            .map_max_entries(names::RATE_STATE, 2 * slots)
            .map_max_entries(names::SAMPLER, slots * Reason::COUNT as u32)
            .map_max_entries(names::ACCOUNT_COUNTERS, capacity.counters)
            .map_max_entries(names::EVENTS, capacity.event_buffer);
        let mut ebpf = loader.load(EBPF_OBJECT).map_err(|e| {
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
        Ok(Self {
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
        })
    }

    /// The capacities the maps were created with.
    #[must_use]
    pub const fn capacity(&self) -> &Capacity {
        &self.capacity
    }

    /// The generation of the policy in force (0 before the first apply).
    #[must_use]
    pub const fn generation(&self) -> u64 {
        self.generation
    }

    /// Treats the standby half as unknown, as after a write into it that
    /// failed part-way: the next write reads it back from the kernel first.
    /// For tests of that path.
    #[doc(hidden)]
    pub fn forget_standby(&mut self) {
        self.halves[1 - self.config.active as usize] = None;
    }

    /// The compiled policy in force.
    #[must_use]
    pub fn active(&self) -> Option<&Arc<Compiled>> {
        self.halves[self.config.active as usize].as_ref()
    }

    /// The interfaces attached so far.
    #[must_use]
    pub fn attachments(&self) -> &[Attachment] {
        &self.attachments
    }

    /// The event ring buffer, for the event reader (once).
    pub fn take_events(&mut self) -> Option<RingBuf<MapData>> {
        self.events.take()
    }

    /// A program, for tests that run it with `BPF_PROG_TEST_RUN`.
    pub fn program_mut(&mut self, name: &str) -> Option<&mut aya::programs::Program> {
        self.ebpf.program_mut(name)
    }

    /// Attaches the receive and transmit programs of `spec.role`: receive on
    /// the hook `receive` chooses for the device (XDP, or TC ingress),
    /// transmit on TC egress. On failure nothing of this interface stays
    /// attached.
    pub fn attach(
        &mut self,
        spec: &InterfaceSpec,
        receive: ReceiveHook,
    ) -> Result<&Attachment, DatapathError> {
        if self.attachments.iter().any(|a| a.name == spec.name) {
            return Err(DatapathError::DuplicateInterface(spec.name.clone()));
        }
        let ifindex = interface::check(&spec.name)?;
        let device = hook::device_kind(&spec.name).map_err(|source| {
            if source.raw_os_error() == Some(libc::ENODEV) {
                DatapathError::Interface(InterfaceError::Unknown(spec.name.clone()))
            } else {
                DatapathError::DeviceKind {
                    name: spec.name.clone(),
                    source,
                }
            }
        })?;
        let hook = receive.resolve(&device);
        // Receive sees what comes from the other side of the interface.
        let (rx, tx) = match spec.role {
            Role::Uplink => (Direction::Inbound, Direction::Outbound),
            Role::Workload => (Direction::Outbound, Direction::Inbound),
        };
        let claim = claim(ifindex).map_err(|source| {
            if source.kind() == std::io::ErrorKind::AddrInUse {
                DatapathError::Claimed {
                    name: spec.name.clone(),
                }
            } else {
                DatapathError::Claim {
                    name: spec.name.clone(),
                    source,
                }
            }
        })?;
        let tcx = KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0));
        // Before TCX (6.6) a TC program needs the clsact qdisc, which
        // holds both the ingress and the egress hook.
        let added_clsact = !tcx && add_clsact(&spec.name, tc_program(tx))?;
        let undo_clsact = |e: DatapathError| {
            if added_clsact {
                remove_clsact(&spec.name);
            }
            e
        };
        let rx_link = match hook {
            Hook::Xdp => self.attach_xdp(xdp_program(rx), &spec.name, ifindex),
            Hook::Tc => self.attach_tc(tc_program(rx), &spec.name, TcAttachType::Ingress),
        }
        .map_err(undo_clsact)?;
        let tx_link = match self.attach_tc(tc_program(tx), &spec.name, TcAttachType::Egress) {
            Ok(link) => link,
            Err(e) => {
                self.unlink(rx_link);
                return Err(undo_clsact(e));
            }
        };
        self.attachments.push(Attachment {
            name: spec.name.clone(),
            ifindex,
            role: spec.role,
            receive: hook,
            driver: device.driver,
            tc_mode: if tcx { "tcx" } else { "clsact" },
            added_clsact,
            links: AttachmentLinks {
                receive: Some(rx_link),
                transmit: Some(tx_link),
                claim: Some(claim),
            },
        });
        Ok(self.attachments.last().expect("just pushed"))
    }

    fn attach_xdp(
        &mut self,
        name: &'static str,
        interface: &str,
        ifindex: u32,
    ) -> Result<Link, DatapathError> {
        let xdp: &mut Xdp = program(&mut self.ebpf, name)?;
        let link = xdp
            .attach_to_if_index(ifindex, XdpMode::Default)
            .map_err(|e| {
                if is_errno(&e, libc::EBUSY) || is_errno(&e, libc::EEXIST) {
                    DatapathError::XdpBusy {
                        name: interface.to_owned(),
                    }
                } else if is_permission(&e) {
                    DatapathError::Permission {
                        doing: format!("attaching XDP to {interface}"),
                    }
                } else {
                    DatapathError::Attach {
                        program: name,
                        name: interface.to_owned(),
                        source: e,
                    }
                }
            })?;
        Ok(Link::Xdp(name, link))
    }

    fn attach_tc(
        &mut self,
        name: &'static str,
        interface: &str,
        side: TcAttachType,
    ) -> Result<Link, DatapathError> {
        let classifier: &mut SchedClassifier = program(&mut self.ebpf, name)?;
        let link = classifier.attach(interface, side).map_err(|e| {
            if is_permission(&e) {
                DatapathError::Permission {
                    doing: format!("attaching TC to {interface}"),
                }
            } else {
                DatapathError::Attach {
                    program: name,
                    name: interface.to_owned(),
                    source: e,
                }
            }
        })?;
        Ok(Link::Tc(name, link))
    }

    /// Detaches one link. Best effort: a link whose device is gone fails to
    /// detach, and is released all the same when its file descriptor closes
    /// (at the latest with the program, at exit).
    fn unlink(&mut self, link: Link) {
        match link {
            Link::Xdp(name, link) => {
                if let Ok(xdp) = program::<Xdp>(&mut self.ebpf, name) {
                    xdp.detach(link).ok();
                }
            }
            Link::Tc(name, link) => {
                if let Ok(classifier) = program::<SchedClassifier>(&mut self.ebpf, name) {
                    classifier.detach(link).ok();
                }
            }
        }
    }

    /// Detaches the programs from the interface attached as `name`, and
    /// forgets it; `None` if no interface of that name is attached. For an
    /// interface that is gone already, this releases the links the kernel
    /// has made defunct.
    pub fn detach(&mut self, name: &str) -> Option<Attachment> {
        let at = self.attachments.iter().position(|a| a.name == name)?;
        let mut a = self.attachments.remove(at);
        for link in [a.links.receive.take(), a.links.transmit.take()]
            .into_iter()
            .flatten()
        {
            self.unlink(link);
        }
        if a.added_clsact {
            remove_clsact(&a.name);
            a.added_clsact = false;
        }
        // Last: another agent may take the device once nothing of ours is on it.
        drop(a.links.claim.take());
        Some(a)
    }

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
        self.write_half(1 - self.config.active, active, self.generation, &epochs)
    }

    /// Waits, once per flip, for the programs that may still use the half
    /// that was active before it ([`ProgramBarrier`]).
    fn quiesce(&mut self) -> Result<(), DatapathError> {
        if !self.quiesced {
            self.barrier.wait().map_err(DatapathError::Barrier)?;
            self.quiesced = true;
        }
        Ok(())
    }

    /// Clears the rate-limit and sampler state, and the counters, of slots
    /// that an account takes over.
    fn reset_slots(&mut self, slots: &[u32]) -> Result<(), DatapathError> {
        if slots.is_empty() {
            return Ok(());
        }
        let mut rate = Batch::default();
        let mut sampler = Batch::default();
        for &slot in slots {
            for d in Direction::ALL {
                rate.push(rate_index(slot, d as u8), RateState::default());
            }
            for r in Reason::ALL {
                sampler.push(sampler_index(slot, r as u8), 0u64);
            }
        }
        rate.write(self.maps.rate_state.map())
            .map_err(batch_error(names::RATE_STATE))?;
        sampler
            .write(self.maps.sampler.map())
            .map_err(batch_error(names::SAMPLER))?;
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

    /// Reads back what half `half` holds, after a failed write.
    fn read_half(&self, half: u32) -> Result<Compiled, DatapathError> {
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

    /// Totals summed over CPUs.
    pub fn totals(&self) -> Result<Totals, DatapathError> {
        let mut out = Totals::default();
        for reason in Reason::ALL {
            for verdict in Verdict::ALL {
                for direction in Direction::ALL {
                    let index = totals_index(reason as u8, verdict as u8, direction as u8);
                    debug_assert!(index < TOTALS_LEN);
                    let values = self
                        .maps
                        .totals
                        .get(&index, 0)
                        .map_err(|e| DatapathError::map(names::TOTALS, e))?;
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
        let mut stats = [0u64; STATS_LEN as usize];
        for (i, stat) in stats.iter_mut().enumerate() {
            let values = self
                .maps
                .stats
                .get(&(i as u32), 0)
                .map_err(|e| DatapathError::map(names::STATS, e))?;
            *stat = values.iter().sum();
        }
        [
            out.events_lost,
            out.counters_full,
            out.rate_contended,
            out.pull_failed,
        ] = stats;
        Ok(out)
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

    /// The global settings of the active half.
    #[must_use]
    pub fn active_config(&self) -> GenConfig {
        self.config.halves[self.config.active as usize]
    }
}

impl Drop for Datapath {
    fn drop(&mut self) {
        // Links are detached when `ebpf` drops; the clsact qdiscs this agent
        // added (kernels before TCX) are removed here.
        for a in &self.attachments {
            if a.added_clsact {
                remove_clsact(&a.name);
            }
        }
    }
}

/// Adds the clsact qdisc to `name` (kernels before TCX); true if this call
/// added it, false if it was there.
fn add_clsact(name: &str, program: &'static str) -> Result<bool, DatapathError> {
    match tc::qdisc_add_clsact(name) {
        Ok(()) => Ok(true),
        Err(tc::TcError::AlreadyAttached) => Ok(false),
        Err(e) if matches!(&e, tc::TcError::NetlinkError(_)) && is_errno(&e, libc::EEXIST) => {
            Ok(false)
        }
        Err(e) => Err(DatapathError::Attach {
            program,
            name: name.to_owned(),
            source: ProgramError::from(e),
        }),
    }
}

/// Claims the device `ifindex` of this network namespace for this agent:
/// an abstract Unix socket named after it, which the kernel keeps per
/// network namespace and releases when the process ends, however it ends.
/// Fails with `AddrInUse` if another agent holds it.
///
/// XDP takes one program per device, so a second agent used to find the
/// first one's program there; TC takes many, and which of them are mmesh's
/// cannot be told without `CAP_SYS_ADMIN` (a program's name needs a file
/// descriptor from its id), which the agent drops.
fn claim(ifindex: u32) -> std::io::Result<UnixListener> {
    let name = format!("mmesh-agent/ifindex/{ifindex}");
    UnixListener::bind_addr(&std::os::unix::net::SocketAddr::from_abstract_name(
        name.as_bytes(),
    )?)
}

/// The XDP program of `direction`.
const fn xdp_program(direction: Direction) -> &'static str {
    match direction {
        Direction::Inbound => programs::XDP_INBOUND,
        Direction::Outbound => programs::XDP_OUTBOUND,
    }
}

/// The TC program of `direction`, for ingress and egress alike.
const fn tc_program(direction: Direction) -> &'static str {
    match direction {
        Direction::Inbound => programs::TC_INBOUND,
        Direction::Outbound => programs::TC_OUTBOUND,
    }
}

fn remove_clsact(name: &str) {
    // Best effort at teardown: a failure leaves an empty qdisc behind, which
    // does nothing to traffic.
    let _ = std::process::Command::new("tc")
        .args(["qdisc", "del", "dev", name, "clsact"])
        .status();
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, DatapathError>
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

fn is_errno(err: &(dyn std::error::Error + 'static), errno: i32) -> bool {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && io.raw_os_error() == Some(errno)
        {
            return true;
        }
        cur = e.source();
    }
    false
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
    for (a, v) in changed {
        map.insert(&key(a), v, 0)
            .map_err(|e| DatapathError::map(name, e))?;
    }
    Ok(())
}
