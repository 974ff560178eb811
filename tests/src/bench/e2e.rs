//! Benchmark group `e2e`: a flood of blocked traffic through a veth pair,
//! counted where it is received.
//!
//! Two network namespaces joined by a veth pair ([`Topology`]): the sender
//! (`remote`, [`REMOTE_IF`]) and the receiver (`host`, [`HOST_IF`]). The
//! generator is `bench_tx` (`XDP_TX`) run by `BPF_PROG_TEST_RUN` with live
//! frames (`BPF_F_TEST_XDP_LIVE_FRAMES`) on a thread that joined the sender
//! namespace and is pinned to one CPU: every run of the program transmits
//! one frame out of the sender veth into the receiver veth, whose receive
//! path runs in softirq on the same CPU, so generator and receiver share one
//! CPU. hping3 or `AF_PACKET` stop near 1 Mpps; this generator runs about
//! 45 Mpps on its own here, 25 with an `XDP_DROP` behind it.
//!
//! The frame is UDP from a source in mmesh's global block list to an
//! account's address, so every receiver drops it, and the figure is what
//! each receiver counts as dropped per second of the generator's run:
//!
//! - bare `XDP_DROP`: `bench_count`, a per-CPU counter, then `XDP_DROP`;
//! - mmesh: its `xdp_inbound` program (uplink receive) with the benchmark
//!   policy at full scale, counted by its own totals;
//! - nftables: no XDP program; a `netdev` table with an ingress chain on the
//!   receiver veth holding the same policy (interval sets, per-address
//!   limits), counted by a named counter. GRO is turned on for this run: a
//!   veth silently drops `XDP_TX` frames when its peer has neither an XDP
//!   program nor GRO (NAPI);
//! - xdp-filter: xdp-tools' own object with equivalent rules
//!   ([`super::xdp_filter`]), counted by its stats map;
//! - and, for reference, the generator alone: nothing on the receiving side,
//!   so the veth refuses every frame at transmit.
//!
//! Time is the kernel's own timing of the generator's loop (see
//! [`Bench::generate`]). Every round measures every receiver, one after the
//! other; XDP programs are attached for their own measurement only, and
//! every measurement is sized (from a probe) to about two seconds of that
//! time, 0.2 s in quick mode.

use std::{
    cell::Cell,
    collections::{BTreeMap, HashMap},
    fmt::Write as _,
    io::Write as _,
    net::{IpAddr, Ipv4Addr},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use aya::{
    Ebpf,
    maps::{MapData, PerCpuArray},
    programs::{TestRun as _, TestRunAttrs, TestRunOptions, Xdp, XdpMode, xdp::XdpLinkId},
};
use ipnet::{Ipv4Net, Ipv6Net};
use mmesh_agent::{
    compile::compile,
    datapath::{BENCH_OBJECT, Datapath},
    policy::{Action, ListKind, Policy},
};
use mmesh_common::{Verdict, maps::programs};

use super::{
    Options,
    report::{Figure, Goal, Report},
    scale::{self, Scale},
    xdp_filter::{self, Rules, XdpFilter},
};
use crate::{
    netns::{self, HOST_IF, HOST_MAC, NetNs, REMOTE_IF, REMOTE_MAC, Topology},
    packets::udp,
};

const GROUP: &str = "end to end (veth, one CPU)";

/// Frames per batch of the live-frames generator: the kernel's default
/// (`NAPI_POLL_WEIGHT`), also the veth's NAPI budget per poll.
const BATCH: u32 = 64;

/// The nftables table (in the receiver namespace) and its counter.
const NFT_TABLE: &str = "mmesh_bench";
const NFT_COUNTER: &str = "dropped";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Receiver {
    /// Nothing: the veth drops at transmit.
    Nothing,
    Bare,
    Mmesh,
    Nftables,
    XdpFilter,
}

impl Receiver {
    const ALL: [Self; 5] = [
        Self::Nothing,
        Self::Bare,
        Self::Mmesh,
        Self::Nftables,
        Self::XdpFilter,
    ];

    const fn short(self) -> &'static str {
        match self {
            Self::Nothing => "nothing",
            Self::Bare => "XDP_DROP",
            Self::Mmesh => "mmesh",
            Self::Nftables => "nftables",
            Self::XdpFilter => "xdp-filter",
        }
    }

    const fn figure(self) -> &'static str {
        match self {
            Self::Nothing => "generator alone (nothing receives: the veth drops at transmit)",
            Self::Bare => "bare XDP_DROP",
            Self::Mmesh => "mmesh, full policy",
            Self::Nftables => "nftables netdev ingress, same rules",
            Self::XdpFilter => "xdp-filter",
        }
    }
}

/// One measurement.
#[derive(Clone, Copy, Debug)]
struct Run {
    /// Frames the generator ran through `bench_tx`.
    sent: u64,
    /// Frames the receiver counted as dropped.
    received: u64,
    /// The kernel's time for the generator's loop.
    time: Duration,
}

impl Run {
    fn mpps(self, packets: u64) -> f64 {
        packets as f64 / self.time.as_secs_f64() / 1e6
    }
}

/// The programs that receive, each attached only while it is measured, or
/// why one is missing.
struct Receivers {
    bench: Ebpf,
    mmesh: Result<Datapath, String>,
    xdp_filter: Result<XdpFilter, String>,
    nftables: Result<Nft, String>,
}

impl Receivers {
    fn xdp(&mut self, r: Receiver) -> Option<&mut Xdp> {
        let prog = match r {
            Receiver::Bare => self.bench.program_mut("bench_count")?,
            Receiver::Mmesh => self
                .mmesh
                .as_mut()
                .ok()?
                .program_mut(programs::XDP_INBOUND)?,
            Receiver::XdpFilter => return self.xdp_filter.as_mut().ok().map(XdpFilter::program),
            Receiver::Nothing | Receiver::Nftables => return None,
        };
        prog.try_into().ok()
    }
}

struct Bench {
    receivers: Receivers,
    /// Dropped last: deleting the namespaces removes the veth pair, the
    /// nftables table and anything still attached.
    topo: Topology,
    frame: Vec<u8>,
    /// `struct xdp_md` for the generator: ingress on the sender veth.
    ctx: [u8; 24],
    cpu: usize,
    /// Whether GRO can be switched on (ethtool).
    gro: Result<(), String>,
    /// What the benchmark policy holds, for the notes.
    policy: String,
    /// Receivers found not to drop the flood.
    broken: HashMap<Receiver, String>,
    /// Frames per measurement, calibrated on each receiver's first run.
    repeats: HashMap<Receiver, u32>,
}

impl Bench {
    fn new(scale: Scale, tools: &Tools) -> Self {
        let t = Instant::now();
        let policy = scale::policy(scale);
        let global_v4 = scale::global_v4(scale.global_v4);
        let global_v6 = scale::global_v6(scale.global_v6);
        let blocked = scale::blocked_v4(&global_v4);
        eprintln!("bench: e2e: policy built in {:.1?}", t.elapsed());

        let topo = Topology::new("e2e");
        let frame = flood_frame(blocked, scale::host_v4(0));
        let sender = topo.remote.ifindex(REMOTE_IF);
        let mut ctx = [0u8; 24];
        let frame_len = u32::try_from(frame.len()).expect("a small frame");
        // data = 0, data_end = the frame's length, data_meta = 0,
        // ingress_ifindex, rx_queue_index = 0, egress_ifindex = 0.
        ctx[4..8].copy_from_slice(&frame_len.to_ne_bytes());
        ctx[12..16].copy_from_slice(&sender.to_ne_bytes());

        let mut bench = aya::EbpfLoader::new()
            .load(BENCH_OBJECT)
            .expect("loading the benchmark programs");
        super::load_xdp(&mut bench, &["bench_tx", "bench_count"]);

        let t = Instant::now();
        let mmesh = load_mmesh(scale, &policy);
        if mmesh.is_ok() {
            eprintln!(
                "bench: e2e: mmesh loaded with {} accounts, {} + {} global prefixes in {:.1?}",
                policy.accounts.len(),
                global_v4.len(),
                global_v6.len(),
                t.elapsed()
            );
        }
        let xdp_filter = tools.xdp_filter.clone().and_then(|()| {
            let t = Instant::now();
            let rules = Rules::equivalent(&global_v4, &global_v6, blocked, xdp_filter::CAPACITY);
            let f = XdpFilter::load(&rules).map_err(|e| format!("not measured: {e}"))?;
            eprintln!(
                "bench: e2e: xdp-filter loaded with {} IPv4 and {} IPv6 sources in {:.1?}",
                rules.src_v4.len(),
                rules.src_v6.len(),
                t.elapsed()
            );
            Ok(f)
        });
        let nftables = tools
            .nft
            .clone()
            .and_then(|()| load_nftables(&topo.host, &policy));
        let mut bench = Self {
            receivers: Receivers {
                bench,
                mmesh,
                xdp_filter,
                nftables,
            },
            topo,
            frame,
            ctx,
            cpu: generator_cpu(),
            gro: tools.ethtool.clone(),
            policy: format!(
                "policy of {} accounts and {} + {} global block prefixes",
                policy.accounts.len(),
                global_v4.len(),
                global_v6.len()
            ),
            broken: HashMap::new(),
            repeats: HashMap::new(),
        };
        bench.check_verdicts();
        bench
    }

    /// Runs each XDP receiver once on the flood's frame (no live frames):
    /// one that does not drop it is not measured.
    fn check_verdicts(&mut self) {
        const XDP_DROP: u32 = 1;
        for r in [Receiver::Bare, Receiver::Mmesh, Receiver::XdpFilter] {
            let frame = self.frame.clone();
            let Some(prog) = self.receivers.xdp(r) else {
                continue;
            };
            let verdict = prog.test_run(TestRunOptions {
                data_in: Some(&frame),
                ..TestRunOptions::default()
            });
            match verdict {
                Ok(v) if v.return_value == XDP_DROP => {}
                Ok(v) => {
                    self.broken.insert(
                        r,
                        format!(
                            "not measured: it does not drop the flood's frame (XDP verdict {})",
                            v.return_value
                        ),
                    );
                }
                Err(e) => {
                    self.broken
                        .insert(r, format!("not measured: BPF_PROG_TEST_RUN: {e}"));
                }
            }
        }
    }

    /// Why `r` cannot be measured, if it cannot.
    fn unavailable(&self, r: Receiver) -> Option<String> {
        let missing = match r {
            Receiver::Mmesh => self.receivers.mmesh.as_ref().err(),
            Receiver::XdpFilter => self.receivers.xdp_filter.as_ref().err(),
            Receiver::Nftables => self
                .receivers
                .nftables
                .as_ref()
                .err()
                .or(self.gro.as_ref().err()),
            Receiver::Nothing | Receiver::Bare => None,
        };
        missing.or_else(|| self.broken.get(&r)).cloned()
    }

    /// Sets up `r` on the receiving veth.
    fn attach(&mut self, r: Receiver) -> Option<XdpLinkId> {
        if r == Receiver::Nftables {
            self.set_gro(true);
            return None;
        }
        let host = &self.topo.host;
        let prog = self.receivers.xdp(r)?;
        let link = host
            .enter(|| prog.attach(HOST_IF, XdpMode::Default))
            .unwrap_or_else(|e| panic!("attaching {} to {HOST_IF}: {e}", r.figure()));
        Some(link)
    }

    fn detach(&mut self, r: Receiver, link: Option<XdpLinkId>) {
        if r == Receiver::Nftables {
            self.set_gro(false);
        }
        if let (Some(link), Some(prog)) = (link, self.receivers.xdp(r)) {
            prog.detach(link)
                .unwrap_or_else(|e| panic!("detaching {}: {e}", r.figure()));
        }
    }

    fn set_gro(&self, on: bool) {
        let _ = netns::run(self.topo.host.command("ethtool").args([
            "-K",
            HOST_IF,
            "gro",
            if on { "on" } else { "off" },
        ]));
    }

    /// What `r` counted as dropped so far.
    fn count(&self, r: Receiver) -> u64 {
        match r {
            Receiver::Nothing => 0,
            Receiver::Bare => {
                let state: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(
                    self.receivers
                        .bench
                        .map("BENCH_STATE")
                        .expect("BENCH_STATE"),
                )
                .expect("per-CPU array");
                state.get(&1, 0).expect("BENCH_STATE[1]").iter().sum()
            }
            Receiver::Mmesh => self
                .receivers
                .mmesh
                .as_ref()
                .expect("measured only when loaded")
                .totals()
                .expect("mmesh totals")
                .counters
                .iter()
                .filter(|((_, verdict, _), _)| *verdict == Verdict::Drop)
                .map(|(_, c)| c.packets)
                .sum(),
            Receiver::Nftables => self
                .receivers
                .nftables
                .as_ref()
                .expect("measured only when loaded")
                .counter
                .packets()
                .expect("nftables counter"),
            Receiver::XdpFilter => self
                .receivers
                .xdp_filter
                .as_ref()
                .expect("measured only when loaded")
                .dropped()
                .expect("xdp-filter stats"),
        }
    }

    /// Runs the generator for `repeat` frames (a multiple of [`BATCH`]);
    /// returns the time the kernel spent in its loop.
    ///
    /// The kernel times the loop itself, softirq work on this CPU included
    /// (the receiving veth's NAPI poll runs when each batch re-enables
    /// bottom halves), and stops the clock whenever it yields the CPU to
    /// another task: on a shared machine that is more robust than the wall
    /// clock, which also counts the XDP dispatcher updates the kernel makes
    /// before and after every run (20 to 35 ms a call here). The kernel
    /// reports whole nanoseconds per frame, rounded down.
    fn generate(&mut self, repeat: u32) -> Result<Duration, String> {
        let prog: &mut Xdp = self
            .receivers
            .bench
            .program_mut("bench_tx")
            .expect("bench_tx")
            .try_into()
            .expect("XDP");
        let prog: &Xdp = prog;
        let (frame, ctx, cpu) = (&self.frame, &self.ctx, self.cpu);
        // The kernel resolves ingress_ifindex in the caller's namespace.
        let per_frame = self.topo.remote.enter(|| {
            pin_to_cpu(cpu);
            prog.test_run(TestRunOptions {
                data_in: Some(frame),
                ctx_in: Some(ctx),
                repeat,
                attrs: TestRunAttrs::new().xdp_live_frames(BATCH),
                ..TestRunOptions::default()
            })
            .map(|result| result.duration)
            .map_err(|e| {
                format!(
                    "not measured: the generator (BPF_PROG_TEST_RUN with live frames) failed: {e}"
                )
            })
        })?;
        Ok(per_frame * repeat)
    }

    /// The counter once it has stopped moving (the last frames may still be
    /// in the receiver's softirq when the generator returns).
    fn settled_count(&self, r: Receiver) -> u64 {
        let deadline = Instant::now() + Duration::from_millis(500);
        let mut last = self.count(r);
        loop {
            thread::sleep(Duration::from_millis(5));
            let now = self.count(r);
            if now == last || Instant::now() > deadline {
                return now;
            }
            last = now;
        }
    }

    fn measure(&mut self, r: Receiver, target: Duration, probe: u32) -> Result<Run, String> {
        let link = self.attach(r);
        let result = self.measure_attached(r, target, probe);
        self.detach(r, link);
        result
    }

    fn measure_attached(
        &mut self,
        r: Receiver,
        target: Duration,
        probe: u32,
    ) -> Result<Run, String> {
        let repeat = if let Some(n) = self.repeats.get(&r) {
            *n
        } else {
            let elapsed = self.generate(probe)?;
            let rate = f64::from(probe) / elapsed.as_secs_f64().max(1e-6);
            let n = (rate * target.as_secs_f64()).clamp(1e5, 4e8) as u32;
            // Whole batches: the kernel divides its time by the frames of
            // whole batches.
            let n = n / BATCH * BATCH;
            self.repeats.insert(r, n);
            n
        };
        let before = self.settled_count(r);
        let time = self.generate(repeat)?;
        let after = self.settled_count(r);
        let sent = u64::from(repeat);
        Ok(Run {
            sent,
            received: if r == Receiver::Nothing {
                sent
            } else {
                after - before
            },
            time,
        })
    }
}

/// Loads mmesh with maps sized for `scale` and applies `policy`.
fn load_mmesh(scale: Scale, policy: &Policy) -> Result<Datapath, String> {
    // mmesh's map sizes for `scale`, as the in-kernel group sizes them.
    let cap = super::kernel::capacity(scale);
    let mut dp = Datapath::load(cap).map_err(|e| format!("not measured: loading mmesh: {e}"))?;
    let compiled = compile(policy, None, &cap)
        .map_err(|e| format!("not measured: compiling the benchmark policy: {e}"))?;
    dp.apply(std::sync::Arc::new(compiled))
        .map_err(|e| format!("not measured: applying the benchmark policy: {e}"))?;
    Ok(dp)
}

/// The flood's frame: UDP from `src` to `dst`, between the two veth ends'
/// MAC addresses.
fn flood_frame(src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    let mut frame = udp(IpAddr::V4(src), IpAddr::V4(dst), 40_000, 53, 18);
    frame[0..6].copy_from_slice(&mac(HOST_MAC));
    frame[6..12].copy_from_slice(&mac(REMOTE_MAC));
    frame
}

fn mac(text: &str) -> [u8; 6] {
    let mut out = [0u8; 6];
    for (o, part) in out.iter_mut().zip(text.split(':')) {
        *o = u8::from_str_radix(part, 16).expect("a MAC address literal");
    }
    out
}

/// The CPU the generator runs on: the last one this process may use.
fn generator_cpu() -> usize {
    // SAFETY: a zeroed cpu_set_t is an empty set; sched_getaffinity fills it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: a valid cpu_set_t of the size given.
    let rc = unsafe { libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &raw mut set) };
    if rc != 0 {
        return 0;
    }
    (0..libc::CPU_SETSIZE as usize)
        // SAFETY: `cpu` is below CPU_SETSIZE.
        .rfind(|cpu| unsafe { libc::CPU_ISSET(*cpu, &set) })
        .unwrap_or(0)
}

fn pin_to_cpu(cpu: usize) {
    // SAFETY: as in `generator_cpu`; `cpu` came from this process's mask.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        let rc = libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &raw const set);
        assert!(
            rc == 0,
            "pinning the generator to CPU {cpu}: {}",
            std::io::Error::last_os_error()
        );
    }
}

// ---------------------------------------------------------------------------
// The peers' tools

fn on_path(program: &str) -> bool {
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':')
        .chain(["/usr/sbin", "/sbin"])
        .any(|dir| std::path::Path::new(dir).join(program).is_file())
}

/// Whether each peer's tool is there (after installing what was missing).
struct Tools {
    nft: Result<(), String>,
    ethtool: Result<(), String>,
    xdp_filter: Result<(), String>,
}

/// Whether the program or object a peer package provides is there.
fn present(package: &str) -> bool {
    match package {
        "nftables" => on_path("nft"),
        "ethtool" => on_path("ethtool"),
        _ => xdp_filter::object_path().is_some(),
    }
}

/// Installs nftables, ethtool and xdp-tools where missing.
fn install_tools() -> Tools {
    let packages = ["nftables", "ethtool", xdp_filter::PACKAGE];
    let missing: Vec<&str> = packages.into_iter().filter(|p| !present(p)).collect();
    let mut error = String::new();
    if !missing.is_empty() {
        eprintln!("bench: e2e: installing {} with apt-get", missing.join(" "));
        match xdp_filter::apt_install(&missing) {
            Ok(took) => eprintln!("bench: e2e: installed {} in {took:.1?}", missing.join(" ")),
            Err(e) => {
                eprintln!("bench: e2e: {e}");
                error = e;
            }
        }
    }
    let [nft, ethtool, xdp] = packages.map(|package| {
        if present(package) {
            Ok(())
        } else {
            Err(format!(
                "not measured: the {package} package is missing and could not be installed: {error}"
            ))
        }
    });
    Tools {
        nft,
        ethtool,
        xdp_filter: xdp,
    }
}

// ---------------------------------------------------------------------------
// nftables

/// A rate limit: per second, packets (`true`) or bits, rate and burst.
type Limit = (bool, u64, u64);

/// Account prefixes of both families.
#[derive(Default)]
struct Prefixes {
    v4: Vec<Ipv4Net>,
    v6: Vec<Ipv6Net>,
}

/// The drops of the benchmark policy, as nftables can express them:
///
/// - each global block list → an interval set of source prefixes
///   (`auto-merge`: nftables merges nested and adjacent prefixes itself);
/// - each account's block lists → a concatenated interval set
///   (account prefix . remote prefix);
/// - each distinct inbound rate limit → a set of the prefixes of the
///   accounts that have it and a meter per destination address with a
///   `limit` statement (nftables has no per-account bucket);
/// - every drop through one named counter.
///
/// Lists in monitor mode do not drop, so they are left out; allow lists
/// have no equivalent here and are refused.
#[derive(Default)]
struct NftRules {
    global: Prefixes,
    /// `account prefix . remote prefix` elements.
    account_v4: Vec<String>,
    account_v6: Vec<String>,
    limits: BTreeMap<Limit, Prefixes>,
}

impl NftRules {
    fn from_policy(policy: &Policy) -> Result<Self, String> {
        let mut out = Self::default();
        for list in &policy.global.lists {
            match list.kind {
                ListKind::Block(action) if policy.global.mode.apply(action) == Action::Drop => {
                    out.global.v4.extend(&list.v4);
                    out.global.v6.extend(&list.v6);
                }
                ListKind::Block(_) => {}
                ListKind::Allow => return Err(format!("allow list {} not translated", list.name)),
            }
        }
        for account in &policy.accounts {
            let mut remote = Prefixes::default();
            for list in &account.lists {
                match list.kind {
                    ListKind::Block(action) if account.mode.apply(action) == Action::Drop => {
                        remote.v4.extend(&list.v4);
                        remote.v6.extend(&list.v6);
                    }
                    ListKind::Block(_) => {}
                    ListKind::Allow => {
                        return Err(format!("allow list {} not translated", list.name));
                    }
                }
            }
            // A concatenated set cannot merge overlapping elements itself.
            for r in Ipv4Net::aggregate(&remote.v4) {
                for own in &account.prefixes_v4 {
                    out.account_v4.push(format!("{own} . {r}"));
                }
            }
            for r in Ipv6Net::aggregate(&remote.v6) {
                for own in &account.prefixes_v6 {
                    out.account_v6.push(format!("{own} . {r}"));
                }
            }
            if let Some(inbound) = &account.inbound
                && account.mode.apply(inbound.action) == Action::Drop
            {
                for (pps, rate) in [(true, inbound.pps), (false, inbound.bps)] {
                    if let Some(rate) = rate {
                        let members = out.limits.entry((pps, rate.rate, rate.burst)).or_default();
                        members.v4.extend(&account.prefixes_v4);
                        members.v6.extend(&account.prefixes_v6);
                    }
                }
            }
        }
        Ok(out)
    }

    /// The `nft -f` input: a `netdev` table on [`HOST_IF`]'s ingress hook;
    /// and a line saying what it holds.
    fn render(&self) -> (String, String) {
        let mut sets = String::new();
        let mut rules = String::new();
        let counted = format!("counter name \"{NFT_COUNTER}\" drop");
        let text = |v: &[Ipv4Net]| v.iter().map(ToString::to_string).collect::<Vec<_>>();
        let text6 = |v: &[Ipv6Net]| v.iter().map(ToString::to_string).collect::<Vec<_>>();
        let merge = "interval\n    auto-merge";
        if !self.global.v4.is_empty() {
            add_set(
                &mut sets,
                "global_v4",
                "ipv4_addr",
                merge,
                &text(&self.global.v4),
            );
            let _ = writeln!(rules, "    ip saddr @global_v4 {counted}");
        }
        if !self.global.v6.is_empty() {
            add_set(
                &mut sets,
                "global_v6",
                "ipv6_addr",
                merge,
                &text6(&self.global.v6),
            );
            let _ = writeln!(rules, "    ip6 saddr @global_v6 {counted}");
        }
        if !self.account_v4.is_empty() {
            let kind = "ipv4_addr . ipv4_addr";
            add_set(&mut sets, "account_v4", kind, "interval", &self.account_v4);
            let _ = writeln!(rules, "    ip daddr . ip saddr @account_v4 {counted}");
        }
        if !self.account_v6.is_empty() {
            let kind = "ipv6_addr . ipv6_addr";
            add_set(&mut sets, "account_v6", kind, "interval", &self.account_v6);
            let _ = writeln!(rules, "    ip6 daddr . ip6 saddr @account_v6 {counted}");
        }
        let mut limit_rules = 0usize;
        let mut capped = 0usize;
        for (k, ((pps, rate, burst), members)) in self.limits.iter().enumerate() {
            let limit = if *pps {
                format!("limit rate over {rate}/second burst {burst} packets")
            } else {
                // Bits to bytes. The kernel refuses a byte limit whose
                // (rate + burst) × 10⁹ overflows 64 bits (nft_limit_init):
                // such rates (beyond about 140 Gbit/s) are capped, which
                // changes nothing on a veth that carries a few Gbit/s.
                let burst = (burst / 8).min(u64::from(u32::MAX));
                let cap = u64::MAX / 1_000_000_000 - burst;
                if rate / 8 > cap {
                    capped += 1;
                }
                format!(
                    "limit rate over {} bytes/second burst {burst} bytes",
                    (rate / 8).min(cap)
                )
            };
            for (family, kind, addr, members) in [
                ("v4", "ipv4_addr", "ip daddr", text(&members.v4)),
                ("v6", "ipv6_addr", "ip6 daddr", text6(&members.v6)),
            ] {
                if members.is_empty() {
                    continue;
                }
                limit_rules += 1;
                add_set(
                    &mut sets,
                    &format!("limit{k}_{family}"),
                    kind,
                    merge,
                    &members,
                );
                let _ = writeln!(
                    sets,
                    "  set meter{k}_{family} {{\n    type {kind}\n    size 65536\n    flags dynamic,timeout\n    timeout 10s\n  }}"
                );
                let _ = writeln!(
                    rules,
                    "    {addr} @limit{k}_{family} update @meter{k}_{family} {{ {addr} {limit} }} {counted}"
                );
            }
        }
        let ruleset = format!(
            "table netdev {NFT_TABLE} {{\n  counter {NFT_COUNTER} {{\n  }}\n{sets}  chain ingress {{\n    type filter hook ingress device \"{HOST_IF}\" priority filter; policy accept;\n{rules}  }}\n}}\n"
        );
        let mut summary = format!(
            "interval sets of the {} IPv4 and {} IPv6 global block prefixes (auto-merge makes them {} and {} ranges), a concatenated set of {} (account prefix, blocked prefix) pairs for the account lists, {limit_rules} rate-limit rules (one per distinct inbound limit and family: a meter per destination address with a limit statement, nftables having no per-account bucket), one named counter",
            self.global.v4.len(),
            self.global.v6.len(),
            Ipv4Net::aggregate(&self.global.v4).len(),
            Ipv6Net::aggregate(&self.global.v6).len(),
            self.account_v4.len() + self.account_v6.len(),
        );
        if capped > 0 {
            let _ = write!(
                summary,
                "; {capped} bit rate(s) capped at what nftables accepts (about 140 Gbit/s)"
            );
        }
        (ruleset, summary)
    }
}

fn add_set(sets: &mut String, name: &str, kind: &str, flags: &str, elements: &[String]) {
    let _ = write!(
        sets,
        "  set {name} {{\n    type {kind}\n    flags {flags}\n"
    );
    if !elements.is_empty() {
        let _ = writeln!(sets, "    elements = {{\n{}\n    }}", elements.join(",\n"));
    }
    sets.push_str("  }\n");
}

/// Loads the policy into nftables in `ns`; returns what it holds and how
/// long loading took.
/// The nftables table in the receiver's namespace.
struct Nft {
    /// What it holds and how long it took to load.
    summary: String,
    counter: NftCounter,
}

fn load_nftables(ns: &NetNs, policy: &Policy) -> Result<Nft, String> {
    let (ruleset, summary) = NftRules::from_policy(policy)?.render();
    let start = Instant::now();
    let mut child = ns
        .command("nft")
        .args(["-f", "/dev/stdin"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run nft: {e}"))?;
    let mut stdin = child.stdin.take().expect("piped");
    // Written from a thread: nft may report errors (on stderr) before it has
    // read everything.
    let out = thread::scope(|s| {
        s.spawn(move || {
            let _ = stdin.write_all(ruleset.as_bytes());
        });
        child.wait_with_output()
    })
    .map_err(|e| format!("nft: {e}"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let err: String = err.lines().take(5).collect::<Vec<_>>().join(" | ");
        return Err(format!(
            "not measured: nft could not load the rules ({}): {err}",
            out.status
        ));
    }
    let took = start.elapsed();
    eprintln!("bench: e2e: nftables loaded in {took:.1?}: {summary}");
    let counter = NftCounter::open(ns).map_err(|e| format!("not measured: {e}"))?;
    counter
        .packets()
        .map_err(|e| format!("not measured: {e}"))?;
    Ok(Nft {
        summary: format!("{summary}; `nft -f` took {took:.1?}"),
        counter,
    })
}

/// The table's named counter, read with one netfilter netlink request
/// (`NFT_MSG_GETOBJ`) on a socket of the receiver's namespace: `nft list
/// counter` fetches the whole table, set elements included, which takes
/// seconds with a million prefixes.
struct NftCounter {
    socket: OwnedFd,
    seq: Cell<u32>,
}

impl NftCounter {
    // include/uapi/linux/netfilter/nfnetlink.h, nf_tables.h
    const NFNL_SUBSYS_NFTABLES: u16 = 10;
    const NFT_MSG_GETOBJ: u16 = 19;
    const NFPROTO_NETDEV: u8 = 5;
    const NFTA_OBJ_TABLE: u16 = 1;
    const NFTA_OBJ_NAME: u16 = 2;
    const NFTA_OBJ_TYPE: u16 = 3;
    const NFTA_OBJ_DATA: u16 = 4;
    const NFT_OBJECT_COUNTER: u32 = 1;
    const NFTA_COUNTER_PACKETS: u16 = 2;

    fn open(ns: &NetNs) -> Result<Self, String> {
        let socket = ns.enter(|| {
            // SAFETY: plain socket(2); the descriptor is owned right away.
            let fd = unsafe {
                libc::socket(
                    libc::AF_NETLINK,
                    libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                    libc::NETLINK_NETFILTER,
                )
            };
            if fd < 0 {
                return Err(format!(
                    "netfilter netlink socket: {}",
                    std::io::Error::last_os_error()
                ));
            }
            // SAFETY: a descriptor just returned by socket(2).
            Ok(unsafe { OwnedFd::from_raw_fd(fd) })
        })?;
        let timeout = libc::timeval {
            tv_sec: 5,
            tv_usec: 0,
        };
        // SAFETY: a valid socket and option of the size given.
        unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const timeout).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            );
        }
        Ok(Self {
            socket,
            seq: Cell::new(0),
        })
    }

    fn attr(msg: &mut Vec<u8>, kind: u16, payload: &[u8]) {
        let len = u16::try_from(4 + payload.len()).expect("a short attribute");
        msg.extend_from_slice(&len.to_ne_bytes());
        msg.extend_from_slice(&kind.to_ne_bytes());
        msg.extend_from_slice(payload);
        msg.resize(msg.len().next_multiple_of(4), 0);
    }

    /// The attributes in `data`: (type without flags, payload).
    fn attrs(mut data: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
        std::iter::from_fn(move || {
            let len = usize::from(u16::from_ne_bytes(data.get(0..2)?.try_into().ok()?));
            let kind = u16::from_ne_bytes(data.get(2..4)?.try_into().ok()?) & 0x3fff;
            let payload = data.get(4..len)?;
            data = data.get(len.next_multiple_of(4)..).unwrap_or_default();
            Some((kind, payload))
        })
    }

    fn packets(&self) -> Result<u64, String> {
        let seq = self.seq.get().wrapping_add(1);
        self.seq.set(seq);
        let mut msg = Vec::with_capacity(64);
        msg.extend_from_slice(&[0; 4]); // length, below
        msg.extend_from_slice(
            &((Self::NFNL_SUBSYS_NFTABLES << 8) | Self::NFT_MSG_GETOBJ).to_ne_bytes(),
        );
        msg.extend_from_slice(&(libc::NLM_F_REQUEST as u16).to_ne_bytes());
        msg.extend_from_slice(&seq.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
        msg.extend_from_slice(&[Self::NFPROTO_NETDEV, 0, 0, 0]); // nfgenmsg
        Self::attr(
            &mut msg,
            Self::NFTA_OBJ_TABLE,
            format!("{NFT_TABLE}\0").as_bytes(),
        );
        Self::attr(
            &mut msg,
            Self::NFTA_OBJ_NAME,
            format!("{NFT_COUNTER}\0").as_bytes(),
        );
        Self::attr(
            &mut msg,
            Self::NFTA_OBJ_TYPE,
            &Self::NFT_OBJECT_COUNTER.to_be_bytes(),
        );
        let len = u32::try_from(msg.len()).expect("a short message");
        msg[0..4].copy_from_slice(&len.to_ne_bytes());
        let fd = self.socket.as_raw_fd();
        // SAFETY: a valid socket and buffer.
        let sent = unsafe { libc::send(fd, msg.as_ptr().cast(), msg.len(), 0) };
        if sent < 0 {
            return Err(format!("netlink send: {}", std::io::Error::last_os_error()));
        }
        let mut buf = vec![0u8; 8192];
        loop {
            // SAFETY: a valid socket and buffer of the size given.
            let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
            let n = usize::try_from(n)
                .map_err(|_| format!("netlink recv: {}", std::io::Error::last_os_error()))?;
            let reply = &buf[..n];
            let field = |at: usize| -> u32 {
                reply
                    .get(at..at + 4)
                    .map_or(0, |b| u32::from_ne_bytes(b.try_into().expect("4 bytes")))
            };
            if reply.len() < 20 || field(8) != seq {
                continue;
            }
            let kind = u16::from_ne_bytes([reply[4], reply[5]]);
            if i32::from(kind) == libc::NLMSG_ERROR {
                let errno = -(field(16) as i32);
                return Err(format!(
                    "reading counter {NFT_COUNTER}: {}",
                    std::io::Error::from_raw_os_error(errno)
                ));
            }
            let len = (field(0) as usize).min(reply.len());
            let data = Self::attrs(&reply[20..len])
                .find(|(kind, _)| *kind == Self::NFTA_OBJ_DATA)
                .map(|(_, data)| data)
                .ok_or("no NFTA_OBJ_DATA in the reply")?;
            return Self::attrs(data)
                .find(|(kind, _)| *kind == Self::NFTA_COUNTER_PACKETS)
                .and_then(|(_, v)| v.try_into().ok().map(u64::from_be_bytes))
                .ok_or_else(|| "no NFTA_COUNTER_PACKETS in the reply".to_owned());
        }
    }
}

// ---------------------------------------------------------------------------
// The group

/// The version of a Debian package, for the notes.
fn package_version(package: &str) -> String {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Version}", package])
        .stdin(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .filter(|v| !v.is_empty())
        .map_or_else(|| package.to_owned(), |v| format!("{package} {v}"))
}

fn note(r: Receiver, bench: &Bench) -> String {
    match r {
        Receiver::Nothing => "for reference: bench_tx run by BPF_PROG_TEST_RUN with live frames and nothing on the receiving veth (no XDP program, no GRO), which refuses every frame at transmit: the generator's own ceiling, in frames run per second of the kernel's timing of its loop".into(),
        Receiver::Bare => format!(
            "bench_count on the receiving veth: a per-CPU counter, then XDP_DROP. For every figure of this group: UDP frames of {} bytes from a source in mmesh's global block list to an account's address, XDP_TX'd out of the sender veth by bench_tx (BPF_PROG_TEST_RUN, live frames, batches of {BATCH}) on one pinned CPU, where the receiving veth's softirq runs too; frames counted as dropped by the receiver over the kernel's own timing of the generator's loop (softirq work included, other tasks' time left out; whole ns per frame, rounded down)",
            bench.frame.len()
        ),
        Receiver::Mmesh => format!(
            "mmesh's xdp_inbound (uplink receive) attached to the receiving veth with aya (the receive path; the agent would also attach its TC program for transmit), {}; counted by mmesh's drop totals",
            bench.policy
        ),
        Receiver::Nftables => format!(
            "{}, no XDP program; GRO on the receiving veth (a veth drops XDP_TX frames unless its peer has an XDP program or GRO); table netdev, ingress hook on the receiving veth: {}; counted by its named counter",
            package_version("nftables"),
            bench
                .receivers
                .nftables
                .as_ref()
                .map_or("", |n| n.summary.as_str())
        ),
        Receiver::XdpFilter => bench.receivers.xdp_filter.as_ref().map_or_else(
            Clone::clone,
            |f| format!(
                "xdp-filter's {} from {} (default allow, every rule kind: MAC, IPv4, IPv6, ports) loaded with aya and attached without libxdp's dispatcher; {} IPv4 and {} IPv6 source addresses, the flood's among them (xdp-filter matches exact addresses, no prefixes, {} per family as built), TCP destination port 25; counted by its xdp_stats_map",
                xdp_filter::OBJECT,
                xdp_filter::object_origin(),
                f.rules().src_v4.len(),
                f.rules().src_v6.len(),
                xdp_filter::CAPACITY
            ),
        ),
    }
}

/// Runs the group into `report`.
pub fn run(opts: &Options, report: &mut Report) {
    let scale = if opts.quick {
        Scale::QUICK
    } else {
        Scale::FULL
    };
    // Frames per measurement are calibrated on a probe of this many frames
    // to take about `target` of the kernel's time.
    let (target, probe) = if opts.quick {
        (Duration::from_millis(200), 1 << 17)
    } else {
        (Duration::from_secs(2), 1 << 21)
    };
    let setup = Instant::now();
    let tools = install_tools();
    let mut bench = Bench::new(scale, &tools);
    eprintln!(
        "bench: e2e: set up in {:.1?}; generator on CPU {}",
        setup.elapsed(),
        bench.cpu
    );
    let mut runs: HashMap<Receiver, Vec<Run>> = HashMap::new();
    let mut failure: Option<String> = None;
    'rounds: for round in 0..opts.rounds {
        let started = Instant::now();
        let mut line = String::new();
        for r in Receiver::ALL {
            if bench.unavailable(r).is_some() {
                continue;
            }
            match bench.measure(r, target, probe) {
                Ok(run) => {
                    let _ = write!(line, " {} {:.2}", r.short(), run.mpps(run.received));
                    runs.entry(r).or_default().push(run);
                }
                Err(e) => {
                    failure = Some(e);
                    break 'rounds;
                }
            }
        }
        eprintln!(
            "bench: e2e round {}/{} in {:.1?} (Mpps):{line}",
            round + 1,
            opts.rounds,
            started.elapsed()
        );
    }
    if let Some(e) = &failure {
        eprintln!("bench: e2e: {e}");
        // Figures only from complete rounds, so that baselines pair up.
        let complete = Receiver::ALL
            .iter()
            .filter(|r| bench.unavailable(**r).is_none())
            .map(|r| runs.get(r).map_or(0, Vec::len))
            .min()
            .unwrap_or(0);
        for v in runs.values_mut() {
            v.truncate(complete);
        }
    }

    add_figures(report, &bench, &runs, failure.as_deref());
    let teardown = Instant::now();
    drop(bench);
    eprintln!("bench: e2e: torn down in {:.1?}", teardown.elapsed());
}

/// One figure per receiver, and mmesh against each peer, from complete
/// rounds.
fn add_figures(
    report: &mut Report,
    bench: &Bench,
    runs: &HashMap<Receiver, Vec<Run>>,
    failure: Option<&str>,
) {
    let mpps = |r: Receiver| -> Vec<f64> {
        runs.get(&r)
            .map(|v| v.iter().map(|run| run.mpps(run.received)).collect())
            .unwrap_or_default()
    };
    let why_not = |r: Receiver| -> Option<String> {
        bench.unavailable(r).or_else(|| {
            failure
                .filter(|_| runs.get(&r).is_none_or(Vec::is_empty))
                .map(str::to_owned)
        })
    };
    let bare = mpps(Receiver::Bare);
    for r in Receiver::ALL {
        let mut note = why_not(r).unwrap_or_else(|| note(r, bench));
        if let Some(v) = runs.get(&r)
            && r != Receiver::Nothing
            && !v.is_empty()
        {
            let sent: u64 = v.iter().map(|run| run.sent).sum();
            let received: u64 = v.iter().map(|run| run.received).sum();
            let _ = write!(
                note,
                "; it counted {:.1}% of the frames sent",
                100.0 * received as f64 / sent.max(1) as f64
            );
        }
        let (baseline, goal) = match r {
            Receiver::Nothing | Receiver::Bare => (None, None),
            Receiver::Mmesh => (Some(bare.clone()), Some(Goal::RatioAtLeast(0.7))),
            Receiver::Nftables | Receiver::XdpFilter => (Some(bare.clone()), None),
        };
        report.add(Figure {
            group: GROUP.into(),
            name: r.figure().into(),
            unit: "Mpps".into(),
            samples: mpps(r),
            baseline: baseline.map(|b| (Receiver::Bare.figure().to_owned(), b)),
            reference: None,
            goal,
            note,
        });
    }
    for (name, peer, goal) in [
        (
            "mmesh vs nftables",
            Receiver::Nftables,
            Some(Goal::RatioAtLeast(3.0)),
        ),
        ("mmesh vs xdp-filter", Receiver::XdpFilter, None),
    ] {
        let (ours, theirs) = (mpps(Receiver::Mmesh), mpps(peer));
        let missing = why_not(Receiver::Mmesh).or_else(|| why_not(peer));
        let measured = missing.is_none() && !ours.is_empty() && ours.len() == theirs.len();
        report.add(Figure {
            group: GROUP.into(),
            name: name.into(),
            unit: "Mpps".into(),
            samples: if measured { ours } else { Vec::new() },
            baseline: measured.then(|| (peer.figure().to_owned(), theirs)),
            reference: None,
            goal,
            note: missing.map_or_else(
                || format!("mmesh's rate over {}'s, per round", peer.short()),
                |why| format!("no comparison: {why}"),
            ),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nftables_rules_follow_the_policy() {
        let scale = Scale {
            accounts: 2,
            global_v4: 40,
            global_v6: 4,
        };
        let policy = scale::policy(scale);
        let (ruleset, summary) = NftRules::from_policy(&policy)
            .expect("the benchmark policy translates")
            .render();
        let counted = "counter name \"dropped\" drop";
        for rule in [
            format!("ip saddr @global_v4 {counted}"),
            format!("ip6 saddr @global_v6 {counted}"),
            format!("ip daddr . ip saddr @account_v4 {counted}"),
            "{ ip daddr limit rate over 1/second burst 1 packets }".to_owned(),
        ] {
            assert!(ruleset.contains(&rule), "no {rule:?} in\n{ruleset}");
        }
        // Account 0's list: ten adjacent /28s (192.0.2.0 to .159) and a /32
        // inside one of them, merged into a /25 and a /27, for each of its
        // two IPv4 prefixes.
        for element in [
            "100.64.0.0/32 . 192.0.2.0/25",
            "10.0.0.0/28 . 192.0.2.128/27",
        ] {
            assert!(ruleset.contains(element), "no {element:?} in\n{ruleset}");
        }
        assert!(!ruleset.contains("192.0.2.77/32"), "{ruleset}");
        assert!(
            summary.contains("a concatenated set of 4 (account prefix"),
            "{summary}"
        );
        // pps and bps for the unlimited accounts (both families), pps for
        // `limited` (IPv4 only).
        assert!(summary.contains("5 rate-limit rules"), "{summary}");
        assert!(ruleset.contains(&format!("device \"{HOST_IF}\"")));
    }

    #[test]
    fn netlink_attributes_parse() {
        let mut msg = Vec::new();
        NftCounter::attr(&mut msg, 1, b"abc\0");
        NftCounter::attr(&mut msg, 0x8000 | 4, &[9; 5]);
        NftCounter::attr(&mut msg, 2, &7u64.to_be_bytes());
        let attrs: Vec<(u16, &[u8])> = NftCounter::attrs(&msg).collect();
        assert_eq!(
            attrs,
            vec![
                (1, &b"abc\0"[..]),
                (4, &[9; 5][..]),
                (2, &7u64.to_be_bytes()[..])
            ]
        );
        // A truncated attribute ends the walk instead of reading past it.
        assert_eq!(NftCounter::attrs(&msg[..6]).count(), 0);
    }

    #[test]
    fn flood_frame_goes_between_the_veth_ends() {
        let frame = flood_frame(Ipv4Addr::new(1, 2, 3, 4), scale::host_v4(0));
        assert_eq!(frame[0..6], mac(HOST_MAC));
        assert_eq!(frame[6..12], mac(REMOTE_MAC));
        let (src, dst, ports) = crate::packets::reference_parse(&frame).expect("UDP/IPv4");
        assert_eq!(src, IpAddr::V4(Ipv4Addr::new(1, 2, 3, 4)));
        assert_eq!(dst, IpAddr::V4(scale::host_v4(0)));
        assert_eq!(ports, Some((40_000, 53)));
    }
}
