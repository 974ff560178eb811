//! A short end-to-end run that means the same on every kernel: the real
//! agent attaches to a veth (TCX links from Linux 6.6, the clsact qdisc
//! before), a block list drops, a bit-rate limit admits its burst and no
//! more, and stopping detaches everything it added; pinned, the programs,
//! the block list and the rate-limit state stay through a restart, and
//! `detach` removes them. It runs on the host with the rest of the suite
//! and inside a 6.1 guest (xtask/src/guest.rs), where the clsact path is
//! the one taken.
//!
//! Nothing here depends on timing: the rate limit is 16 bit/s, so no pause
//! of a slow (emulated) machine refills a frame's worth of tokens.
//!
//! Needs root.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{Mutex, PoisonError},
    time::Duration,
};

use aya::programs::{SchedClassifier, TcAttachType};
use mmesh_tests::netns::{
    Agent, HOST_IF, NetNs, Pace, PinDir, PolicyFile, Topology, UdpSink, run, run_agent_to_exit,
    send_udp,
};

const ALPHA: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 77, 0, 10));
const ORDINARY: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 77, 0, 100));
const BLOCKED: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 77, 1, 1));
const PORT: u16 = 5000;
const PACKETS: u64 = 20;
/// UDP payload of a 1000-byte frame (Ethernet, IPv4 and UDP headers: 42).
const PAYLOAD: usize = 1000 - 42;
/// A sink is done once nothing arrived for this long after the sender.
const SINK_IDLE: Duration = Duration::from_millis(500);

/// alpha may send 16 bit/s with a burst of 16 kbit (2000 bytes): two
/// 1000-byte frames, then one more every 500 s.
const POLICY: &str = "
global:
  events_per_second: 100000
  block:
    - name: blocked
      cidrs: [10.77.1.0/24]
accounts:
  - id: alpha
    prefixes: [10.77.0.10/32]
    limits:
      outbound: { bps: 16, bps_burst: 16k }
";

/// One test at a time: both use the same interface names.
static SERIAL: Mutex<()> = Mutex::new(());

/// Whether the running kernel has TCX (Linux 6.6 and later).
fn kernel_has_tcx() -> bool {
    let release =
        std::fs::read_to_string("/proc/sys/kernel/osrelease").expect("reading the kernel release");
    let mut parts = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (major, minor) >= (6, 6)
}

/// `tc ARGS` in `ns`.
fn tc(ns: &NetNs, args: &[&str]) -> String {
    run(ns.command("tc").args(args))
}

fn has_clsact(ns: &NetNs) -> bool {
    has_clsact_on(ns, HOST_IF)
}

fn has_clsact_on(ns: &NetNs, dev: &str) -> bool {
    tc(ns, &["qdisc", "show", "dev", dev]).contains("clsact")
}

/// The names of the programs attached to [`HOST_IF`] on TC.
fn tc_programs(topo: &Topology) -> Vec<String> {
    tc_programs_on(topo, HOST_IF)
}

/// The names of the programs attached to `dev` of the host namespace on
/// TC: from the TCX lists, or from the clsact filters before TCX.
fn tc_programs_on(topo: &Topology, dev: &str) -> Vec<String> {
    if kernel_has_tcx() {
        return [TcAttachType::Ingress, TcAttachType::Egress]
            .into_iter()
            .flat_map(|side| {
                let (_, infos) = topo
                    .host
                    .enter(|| SchedClassifier::query_tcx(dev, side))
                    .unwrap_or_else(|e| panic!("querying the TCX programs of {dev}: {e}"));
                infos
                    .iter()
                    .map(|i| i.name_as_str().unwrap_or("?").to_owned())
                    .collect::<Vec<_>>()
            })
            .collect();
    }
    if !has_clsact_on(&topo.host, dev) {
        return Vec::new();
    }
    // One line per filter, which names its program twice (the filter's
    // name, then the program's: `... handle 0x1 tc_inbound direct-action
    // not_in_hw id 12 name tc_inbound tag ...`).
    ["ingress", "egress"]
        .iter()
        .flat_map(|side| {
            tc(&topo.host, &["filter", "show", "dev", dev, side])
                .lines()
                .filter_map(|line| line.split_whitespace().find(|w| w.starts_with("tc_")))
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Sends [`PACKETS`] 1000-byte datagrams from `src` in `from` to `dst` in
/// `to`; returns how many arrived.
fn arrivals(from: &NetNs, src: IpAddr, to: &NetNs, dst: IpAddr) -> u64 {
    let sink = UdpSink::bind(to, SocketAddr::new(dst, PORT));
    let socket = from.udp_socket(SocketAddr::new(src, 0));
    let sent = send_udp(
        &socket,
        sink.local_addr(),
        Pace {
            pps: 1000,
            packets: PACKETS,
            payload: PAYLOAD,
        },
    );
    assert_eq!(sent.packets, PACKETS, "every datagram was sent");
    sink.finish(SINK_IDLE).packets_from(src)
}

fn topology(tag: &str) -> Topology {
    let topo = Topology::new(tag);
    topo.add_host_addrs(&[ALPHA]);
    topo.add_remote_addrs(&[ORDINARY, BLOCKED]);
    topo
}

/// The agent as an uplink on [`HOST_IF`]: attach, block, limit, detach.
fn attach_block_limit_detach(topo: &Topology, clsact_before: bool) {
    let policy = PolicyFile::new("smoke", POLICY);
    let mut agent = Agent::start(&topo.host, policy.path(), &[&format!("{HOST_IF}:uplink")]);
    let tcx = kernel_has_tcx();
    let mode = if tcx { "tc=\"tcx\"" } else { "tc=\"clsact\"" };
    assert!(
        agent
            .logs()
            .iter()
            .any(|l| l.contains("attached") && l.contains(mode)),
        "the agent attaches with {mode}:\n{}",
        agent.logs().join("\n")
    );
    assert_eq!(
        tc_programs(topo),
        ["tc_inbound", "tc_outbound"],
        "the receive program on TC ingress (a veth), the transmit program on egress"
    );

    // The block list, inbound; ordinary traffic passes.
    assert_eq!(arrivals(&topo.remote, BLOCKED, &topo.host, ALPHA), 0);
    assert_eq!(arrivals(&topo.remote, ORDINARY, &topo.host, ALPHA), PACKETS);
    // The bit-rate limit, outbound: the 2000-byte burst holds two frames.
    assert_eq!(arrivals(&topo.host, ALPHA, &topo.remote, ORDINARY), 2);

    let status = agent.stop();
    assert!(status.success(), "the agent exits 0 on SIGTERM: {status}");
    assert!(
        tc_programs(topo).is_empty(),
        "no program attached after the agent stopped"
    );
    assert_eq!(
        has_clsact(&topo.host),
        clsact_before,
        "the clsact qdisc is there after the agent stopped exactly when it was there before"
    );
    assert_eq!(
        arrivals(&topo.remote, BLOCKED, &topo.host, ALPHA),
        PACKETS,
        "nothing is blocked once the agent stopped"
    );
}

#[test]
fn attach_block_limit_detach_on_a_bare_device() {
    let _serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    let topo = topology("smk1");
    attach_block_limit_detach(&topo, false);
}

/// Before TCX the agent shares a clsact qdisc someone else added, and
/// leaves it where it was; with TCX it does not touch it.
#[test]
fn a_clsact_qdisc_that_was_there_stays() {
    let _serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    let topo = topology("smk2");
    tc(&topo.host, &["qdisc", "add", "dev", HOST_IF, "clsact"]);
    attach_block_limit_detach(&topo, true);
}

/// A second interface of the pinned test, for its first agent only: one
/// end of a veth pair of the host namespace (its receive program is on TC
/// too).
const SPARE_IF: &str = "mmspare0";

/// `run` pinned in `dir`, with `interfaces` as uplinks.
fn pinned_args(policy: &PolicyFile, dir: &str, interfaces: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "run",
        "--policy",
        &policy.path().display().to_string(),
        "--summary-interval",
        "1",
        "--bpffs",
        dir,
    ]
    .map(String::from)
    .to_vec();
    for interface in interfaces {
        args.extend(["--interface".to_owned(), format!("{interface}:uplink")]);
    }
    args
}

/// What `devices` attached devices leave pinned under `links/`: a TCX link
/// per side, or before TCX the programs of the two filters and the qdisc
/// the agent added.
fn assert_links_pinned(pins: &PinDir, devices: usize) {
    let pinned = pins.pins();
    let links: Vec<&String> = pinned.iter().filter(|p| p.starts_with("links/")).collect();
    let count = |suffix: &str| links.iter().filter(|p| p.ends_with(suffix)).count();
    if kernel_has_tcx() {
        assert_eq!(links.len(), 2 * devices, "TCX links pinned: {pinned:?}");
    } else {
        assert!(
            links.len() == 3 * devices
                && count(":filter") == 2 * devices
                && count(":clsact") == devices,
            "filters and qdiscs pinned: {pinned:?}"
        );
    }
}

/// Pinned: the programs outlive the agent (TCX links, or clsact filters
/// before 6.6) and keep blocking; a second agent adopts them, the block
/// list still drops and the bit-rate limit's bucket is the one the first
/// agent emptied, and what was attached to an interface it is no longer
/// told to use goes; `detach` removes programs, pins and the clsact qdisc
/// the agent added.
#[test]
fn pins_survive_a_restart_and_detach_removes_everything() {
    let _serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    let topo = topology("smk3");
    let pins = PinDir::new("smoke");
    let policy = PolicyFile::new("smoke-pinned", POLICY);
    let dir = pins.dir().display().to_string();
    topo.host.ip(&[
        "link", "add", SPARE_IF, "type", "veth", "peer", "name", "mmspare1",
    ]);
    topo.host.ip(&["link", "set", SPARE_IF, "up"]);

    let mut agent = Agent::start_with_args(
        &topo.host,
        &pinned_args(&policy, &dir, &[HOST_IF, SPARE_IF]),
    );
    assert_eq!(tc_programs(&topo), ["tc_inbound", "tc_outbound"]);
    assert_eq!(
        tc_programs_on(&topo, SPARE_IF),
        ["tc_inbound", "tc_outbound"]
    );
    assert_eq!(arrivals(&topo.remote, BLOCKED, &topo.host, ALPHA), 0);
    // The burst: two 1000-byte frames; the bucket is empty afterwards.
    assert_eq!(arrivals(&topo.host, ALPHA, &topo.remote, ORDINARY), 2);
    assert!(agent.stop().success(), "the agent exits 0 on SIGTERM");

    assert_eq!(
        tc_programs(&topo),
        ["tc_inbound", "tc_outbound"],
        "still attached after the agent stopped"
    );
    assert_eq!(
        arrivals(&topo.remote, BLOCKED, &topo.host, ALPHA),
        0,
        "still blocking without an agent"
    );
    assert_links_pinned(&pins, 2);

    let mut agent = Agent::start_with_args(&topo.host, &pinned_args(&policy, &dir, &[HOST_IF]));
    assert!(
        agent
            .logs()
            .iter()
            .any(|l| l.contains("adopted (programs replaced in place)")),
        "the second agent adopts the programs:\n{}",
        agent.logs().join("\n")
    );
    assert_eq!(
        tc_programs(&topo),
        ["tc_inbound", "tc_outbound"],
        "adopted, not attached a second time"
    );
    assert!(
        tc_programs_on(&topo, SPARE_IF).is_empty() && !has_clsact_on(&topo.host, SPARE_IF),
        "nothing left on the interface the second agent is not told to use"
    );
    assert!(
        !pins.pins().iter().any(|p| p.contains(SPARE_IF)),
        "no pin of it left: {:?}",
        pins.pins()
    );
    assert_eq!(arrivals(&topo.remote, BLOCKED, &topo.host, ALPHA), 0);
    assert_eq!(
        arrivals(&topo.remote, ORDINARY, &topo.host, ALPHA),
        PACKETS,
        "ordinary traffic passes"
    );
    assert_eq!(
        arrivals(&topo.host, ALPHA, &topo.remote, ORDINARY),
        0,
        "the rate-limit state survived: the bucket the first agent emptied refills a frame in 500 s"
    );
    assert!(agent.stop().success(), "the agent exits 0 on SIGTERM");

    let out = run_agent_to_exit(
        &topo.host,
        &["detach", "--bpffs", &dir],
        Duration::from_secs(20),
    );
    assert!(
        out.status.success(),
        "detach: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(tc_programs(&topo).is_empty(), "no program after detach");
    assert!(
        !has_clsact(&topo.host),
        "no clsact qdisc after detach (there was none before)"
    );
    assert!(pins.pins().is_empty(), "no pin left: {:?}", pins.pins());
    assert_eq!(
        arrivals(&topo.remote, BLOCKED, &topo.host, ALPHA),
        PACKETS,
        "nothing is blocked after detach"
    );
}
