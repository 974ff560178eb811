//! Benchmark group `tcp`: TCP under a bit-rate limit with the default
//! burst, and a UDP flood under the same limit.
//!
//! Two namespaces joined by a veth pair ([`Topology`]); mmesh's datapath,
//! loaded in this process, is attached to the host end as a `workload`
//! device: the remote namespace is the container, and what it sends is the
//! account's outbound traffic, judged on the host's receive path, where a
//! packet over the limit is a loss the sender has to recover from. (On the
//! uplink's transmit path in this topology the sender is the host's own
//! stack, which sees a drop there as a failed send, not a loss; the
//! `uplink` cells measure that case too.)
//!
//! Every cell limits a fresh account (a full bucket) to `bps: RATE` with
//! no burst given, and runs bulk TCP ([`crate::tcp::bulk`]) from the
//! account for a warm-up, then a measured window: the figure is the
//! goodput in the window over the limit. TCP payload is at most 1448 of
//! the 1514 bytes of a full frame the limit counts (Ethernet, IP and TCP
//! headers with timestamps), so 0.956 is the ceiling. The round-trip time
//! comes from [`crate::tcp::DelayLine`] (this kernel has no netem), which
//! delays the receiver's ACKs. Socket buffers are raised so that the path's
//! bandwidth-delay product, not the window, is the limit; the sender uses
//! CUBIC (the Linux default) unless the cell says otherwise.
//!
//! The `tcp-burst` group (not run by default, `--only tcp-burst`) is the
//! sweep the default burst was chosen from: the same cells under several
//! explicit bursts.

use std::{
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::Path,
    sync::Arc,
    time::Duration,
};

use mmesh_agent::{
    compile::{Capacity, compile},
    datapath::Datapath,
    hook::ReceiveHook,
    interface::{InterfaceSpec, Role},
    policy::{MIN_DEFAULT_BPS_BURST, Policy, default_burst},
};

use super::{
    Options,
    report::{Figure, Goal, Report, Table},
};
use crate::{
    netns::{self, HOST_IF, HOST_MAC, Pace, REMOTE_IF, REMOTE_MAC, Topology, UdpSink, send_udp},
    tcp::{self, Bulk, DelayLine, Goodput, TcpCounters},
};

const GROUP: &str = "TCP under a bit-rate limit (default burst)";
const SWEEP_GROUP: &str = "TCP under a bit-rate limit: burst sweep";

const HOST: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 10);
const REMOTE: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 100);
const PORT: u16 = 5201;

/// Goodput over the limit, at best: 1448 bytes of payload per 1514-byte
/// frame.
const CEILING: f64 = 1448.0 / 1514.0;

/// Frame of the UDP flood, and its Ethernet, IPv4 and UDP headers.
const UDP_FRAME: usize = 1514;
const UDP_OVERHEAD: usize = 14 + 20 + 8;

/// Socket buffer limit: above the largest bandwidth-delay product measured
/// (1 Gbit/s × 100 ms = 12.5 MB) plus the burst.
const SOCKET_BUFFERS: usize = 64 << 20;

/// One cell of the grid.
#[derive(Clone, Copy, Debug)]
struct Cell {
    role: Role,
    rate: u64,
    rtt: Duration,
    streams: usize,
    congestion: &'static str,
}

impl Cell {
    fn name(&self) -> String {
        format!(
            "{}, {}, RTT {} ms, {} stream{}, {}",
            role_name(self.role),
            rate_name(self.rate),
            self.rtt.as_millis(),
            self.streams,
            if self.streams == 1 { "" } else { "s" },
            self.congestion
        )
    }
}

const fn role_name(role: Role) -> &'static str {
    match role {
        Role::Uplink => "uplink",
        Role::Workload => "workload",
    }
}

fn rate_name(bps: u64) -> String {
    if bps >= 1_000_000_000 {
        format!("{} Gbit/s", bps / 1_000_000_000)
    } else if bps >= 1_000_000 {
        format!("{} Mbit/s", bps / 1_000_000)
    } else {
        format!("{} kbit/s", bps / 1000)
    }
}

/// What one cell measured.
struct Outcome {
    goodput: Goodput,
    counters: TcpCounters,
}

impl Outcome {
    fn ratio(&self, rate: u64) -> f64 {
        self.goodput.bits_per_second() / rate as f64
    }
}

/// A topology with the datapath attached to [`HOST_IF`] in one role.
struct Bench {
    /// Dropped (detached) before the namespaces go.
    dp: Datapath,
    topo: Topology,
    role: Role,
    runs: u32,
}

impl Bench {
    fn new(role: Role) -> Self {
        let topo = Topology::new(&format!("tcp-{}", role_name(role)));
        topo.add_host_addrs(&[IpAddr::V4(HOST)]);
        topo.add_remote_addrs(&[IpAddr::V4(REMOTE)]);
        for ns in [&topo.host, &topo.remote] {
            tcp::set_tcp_buffers(ns, SOCKET_BUFFERS);
        }
        let capacity = Capacity {
            accounts: 64,
            account_prefixes: 256,
            list_prefixes: 4096,
            counters: 4096,
            event_buffer: 64 * 1024,
            ..Capacity::default()
        };
        let mut dp = Datapath::load(capacity).expect("loading mmesh (run as root)");
        drop(dp.take_events());
        topo.host
            .enter(|| {
                dp.attach(
                    &InterfaceSpec {
                        name: HOST_IF.into(),
                        role,
                    },
                    ReceiveHook::Auto,
                )
                .map(drop)
            })
            .expect("attaching the datapath");
        Self {
            dp,
            topo,
            role,
            runs: 0,
        }
    }

    /// The account's side (sender) and the other side (receiver).
    fn ends(&self) -> (&netns::NetNs, Ipv4Addr, &netns::NetNs, Ipv4Addr, [u8; 6]) {
        match self.role {
            Role::Uplink => (
                &self.topo.host,
                HOST,
                &self.topo.remote,
                REMOTE,
                mac(HOST_MAC),
            ),
            Role::Workload => (
                &self.topo.remote,
                REMOTE,
                &self.topo.host,
                HOST,
                mac(REMOTE_MAC),
            ),
        }
    }

    /// Limits a new account owning the sender's address to `rate` bits/s
    /// outbound, with `burst` bits or the default.
    fn limit(&mut self, rate: u64, burst: Option<u64>) {
        self.runs += 1;
        let (_, sender, _, _, _) = self.ends();
        let burst = burst.map_or_else(String::new, |b| format!(", bps_burst: {b}"));
        let yaml = format!(
            "accounts:\n  - id: tcp-{}\n    prefixes: [{sender}/32]\n    limits:\n      outbound: {{ bps: {rate}{burst} }}\n",
            self.runs
        );
        let policy =
            Policy::parse(&yaml, "tcp bench policy", Path::new(".")).expect("a valid policy");
        let compiled = compile(
            &policy,
            self.dp.active().map(AsRef::as_ref),
            self.dp.capacity(),
        )
        .expect("the policy compiles");
        self.dp
            .apply(Arc::new(compiled))
            .expect("applying the policy");
    }

    /// Bulk TCP from the account for `warmup + measure`, the path delayed
    /// to `rtt`.
    fn tcp(&self, cell: Cell, warmup: Duration, measure: Duration) -> Outcome {
        let (sender, src, receiver, dst, _) = self.ends();
        let before = TcpCounters::read(sender);
        let goodput = tcp::bulk(
            sender,
            IpAddr::V4(src),
            receiver,
            SocketAddr::new(IpAddr::V4(dst), PORT),
            Bulk {
                streams: cell.streams,
                warmup,
                measure,
                congestion: Some(cell.congestion),
            },
        );
        Outcome {
            goodput,
            counters: TcpCounters::read(sender).since(before),
        }
    }

    /// A UDP flood of full-size frames at twice `rate` from the account for
    /// `seconds`: the frame bits that arrived, and the flood's real span.
    fn udp_flood(&self, rate: u64, seconds: Duration) -> (f64, Duration) {
        let (sender, src, receiver, dst, _) = self.ends();
        let sink = UdpSink::bind(receiver, SocketAddr::new(IpAddr::V4(dst), PORT));
        let socket = sender.udp_socket(SocketAddr::new(IpAddr::V4(src), 0));
        let pps = 2 * rate / (UDP_FRAME as u64 * 8);
        let sent = send_udp(
            &socket,
            sink.local_addr(),
            Pace::for_duration(pps, seconds, UDP_FRAME - UDP_OVERHEAD),
        );
        let got = sink.finish(Duration::from_millis(200));
        let bits = got.packets_from(IpAddr::V4(src)) as f64 * UDP_FRAME as f64 * 8.0;
        (bits, sent.span)
    }

    /// Delays what the receiver sends back to the sender by `rtt`.
    fn delay(&self, rtt: Duration) -> Option<DelayLine> {
        if rtt.is_zero() {
            return None;
        }
        let (_, src, receiver, _, _) = self.ends();
        let (dev, peer) = match self.role {
            Role::Uplink => (REMOTE_IF, mac(HOST_MAC)),
            Role::Workload => (HOST_IF, mac(REMOTE_MAC)),
        };
        Some(DelayLine::start(
            receiver,
            dev,
            peer,
            &[IpAddr::V4(src)],
            rtt,
        ))
    }
}

fn mac(text: &str) -> [u8; 6] {
    let mut out = [0; 6];
    for (o, part) in out.iter_mut().zip(text.split(':')) {
        *o = u8::from_str_radix(part, 16).expect("a MAC address");
    }
    out
}

/// Warm-up and measured window for a cell: long enough for slow start and
/// the first losses to be over, and for several loss cycles.
fn durations(cell: Cell, quick: bool) -> (Duration, Duration) {
    if quick {
        return (Duration::from_millis(300), Duration::from_millis(500));
    }
    let rtt = cell.rtt.as_secs_f64();
    let warmup = Duration::from_secs_f64(1.0 + 10.0 * rtt);
    (warmup, Duration::from_secs(5))
}

fn grid(quick: bool) -> Vec<Cell> {
    let cell = |role, rate, rtt_ms, streams, congestion| Cell {
        role,
        rate,
        rtt: Duration::from_millis(rtt_ms),
        streams,
        congestion,
    };
    if quick {
        return vec![cell(Role::Workload, 10_000_000, 0, 1, "cubic")];
    }
    let mut cells = Vec::new();
    for rate in [1_000_000, 10_000_000, 100_000_000, 1_000_000_000] {
        for rtt in [0, 20, 100] {
            for streams in [1, 8] {
                cells.push(cell(Role::Workload, rate, rtt, streams, "cubic"));
            }
        }
    }
    for rate in [10_000_000, 100_000_000] {
        cells.push(cell(Role::Workload, rate, 20, 1, "bbr"));
        cells.push(cell(Role::Uplink, rate, 0, 1, "cubic"));
        cells.push(cell(Role::Uplink, rate, 20, 1, "cubic"));
    }
    cells
}

/// Runs the group into `report`.
pub fn run(opts: &Options, report: &mut Report) {
    let cells = grid(opts.quick);
    let mut table = Table {
        group: GROUP.into(),
        title: "TCP goodput under the limit, and the sender's retransmissions".into(),
        columns: [
            "role",
            "limit",
            "RTT",
            "streams",
            "congestion control",
            "goodput / limit",
            "retransmitted segments",
            "timeouts",
        ]
        .map(String::from)
        .to_vec(),
        rows: Vec::new(),
    };
    for role in [Role::Workload, Role::Uplink] {
        let mine: Vec<Cell> = cells.iter().copied().filter(|c| c.role == role).collect();
        if mine.is_empty() {
            continue;
        }
        let mut bench = Bench::new(role);
        for rtt in rtts(&mine) {
            let _delay = bench.delay(rtt);
            for cell in mine.iter().filter(|c| c.rtt == rtt) {
                bench.limit(cell.rate, None);
                let (warmup, measure) = durations(*cell, opts.quick);
                let out = bench.tcp(*cell, warmup, measure);
                let ratio = out.ratio(cell.rate);
                eprintln!(
                    "bench: tcp: {}: {ratio:.3} of the limit, {} of {} segments retransmitted, {} timeouts",
                    cell.name(),
                    out.counters.retrans_segs,
                    out.counters.out_segs,
                    out.counters.timeouts
                );
                table.rows.push(vec![
                    role_name(role).into(),
                    rate_name(cell.rate),
                    format!("{} ms", rtt.as_millis()),
                    cell.streams.to_string(),
                    cell.congestion.into(),
                    format!("{ratio:.3}"),
                    format!(
                        "{:.2}% ({})",
                        100.0 * out.counters.retrans_segs as f64
                            / out.counters.out_segs.max(1) as f64,
                        out.counters.retrans_segs
                    ),
                    out.counters.timeouts.to_string(),
                ]);
                report.add(Figure {
                    group: GROUP.into(),
                    name: cell.name(),
                    unit: "× limit".into(),
                    samples: vec![ratio],
                    baseline: None,
                    reference: None,
                    goal: Some(Goal::AtLeast(0.9)),
                    note: String::new(),
                });
            }
        }
    }
    report.tables.push(table);
    udp_floods(opts, report);
}

/// A UDP flood at twice the limit, default burst: what arrives is the burst
/// once, then the rate. The figure is the rate part over the limit.
fn udp_floods(opts: &Options, report: &mut Report) {
    let rates: &[u64] = if opts.quick {
        &[10_000_000]
    } else {
        // Above this the single paced sender cannot offer twice the rate.
        &[1_000_000, 10_000_000, 100_000_000]
    };
    let seconds = if opts.quick {
        Duration::from_millis(500)
    } else {
        Duration::from_secs(4)
    };
    let mut bench = Bench::new(Role::Workload);
    for &rate in rates {
        bench.limit(rate, None);
        let burst = default_burst(rate, MIN_DEFAULT_BPS_BURST) as f64;
        let (bits, span) = bench.udp_flood(rate, seconds);
        let ratio = (bits - burst) / (rate as f64 * span.as_secs_f64());
        eprintln!(
            "bench: tcp: UDP flood at 2× {}: {ratio:.3} of the limit beyond the burst",
            rate_name(rate)
        );
        report.add(Figure {
            group: GROUP.into(),
            name: format!("UDP flood at twice {}, beyond the burst", rate_name(rate)),
            unit: "× limit".into(),
            samples: vec![ratio],
            baseline: None,
            reference: None,
            goal: Some(Goal::Between(0.95, 1.05)),
            note: format!(
                "{seconds:?} of 1514-byte frames at twice the limit; (frame bits received − the default burst) / (limit × the flood's span)"
            ),
        });
    }
}

fn rtts(cells: &[Cell]) -> Vec<Duration> {
    let mut rtts: Vec<Duration> = cells.iter().map(|c| c.rtt).collect();
    rtts.sort();
    rtts.dedup();
    rtts
}

/// The sweep the default burst was chosen from: each cell under bursts of
/// 0.1 s to 1 s of the rate, with a floor.
pub fn sweep(opts: &Options, report: &mut Report) {
    let bursts: Vec<f64> = std::env::var("MMESH_BENCH_BURSTS").ok().map_or_else(
        || vec![0.1, 0.2, 0.3, 0.5],
        |v| v.split(',').filter_map(|s| s.trim().parse().ok()).collect(),
    );
    let floor_bits: u64 = std::env::var("MMESH_BENCH_BURST_FLOOR")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut cells = grid(opts.quick);
    if let Ok(filter) = std::env::var("MMESH_BENCH_CELLS") {
        cells.retain(|c| c.name().contains(&filter));
    }
    let mut text = String::new();
    for role in [Role::Workload, Role::Uplink] {
        let mine: Vec<Cell> = cells.iter().copied().filter(|c| c.role == role).collect();
        if mine.is_empty() {
            continue;
        }
        let mut bench = Bench::new(role);
        for rtt in rtts(&mine) {
            let _delay = bench.delay(rtt);
            for cell in mine.iter().filter(|c| c.rtt == rtt) {
                for &seconds in &bursts {
                    let burst = ((cell.rate as f64 * seconds) as u64).max(floor_bits);
                    bench.limit(cell.rate, Some(burst));
                    let (warmup, measure) = durations(*cell, opts.quick);
                    let out = bench.tcp(*cell, warmup, measure);
                    let ratio = out.ratio(cell.rate);
                    let line = format!(
                        "{} burst {seconds} s: {ratio:.3} (ceiling {CEILING:.3}), retrans {} / {} segs, {} timeouts",
                        cell.name(),
                        out.counters.retrans_segs,
                        out.counters.out_segs,
                        out.counters.timeouts
                    );
                    eprintln!("bench: {line}");
                    let _ = writeln!(text, "{line}");
                    report.add(Figure {
                        group: SWEEP_GROUP.into(),
                        name: format!("{}, burst {seconds} s", cell.name()),
                        unit: "× limit".into(),
                        samples: vec![ratio],
                        baseline: None,
                        reference: None,
                        goal: None,
                        note: String::new(),
                    });
                }
            }
        }
    }
    print!("{text}");
}
