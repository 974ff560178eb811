//! End to end, under faults an operator or an attacker can cause: the agent
//! must keep enforcing, answer its signals, and never block on its output.
//!
//! Each test starts the real agent on the host end of a veth pair with a
//! policy that blocks one remote prefix per family, causes a fault, and
//! checks enforcement with real UDP traffic from the blocked addresses (it
//! must not arrive) next to ordinary traffic (it must).
//!
//! Needs root. One test at a time; each is bounded in packets and time.

use std::{
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    process::Command,
    time::{Duration, Instant},
};

use mmesh_tests::netns::{
    Agent, HOST_IF, NetNs, Pace, PolicyFile, Streams, Topology, UdpSink, agent_binary,
    run_agent_to_exit, send_udp, serial, wait_until,
};

const ALPHA4: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 77, 0, 10));
const ORDINARY4: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 77, 0, 100));
const BLOCKED4: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 77, 1, 1));
const ALPHA6: IpAddr = IpAddr::V6(Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 0x10));
const ORDINARY6: IpAddr = IpAddr::V6(Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 0x100));
const BLOCKED6: IpAddr = IpAddr::V6(Ipv6Addr::new(0xfd77, 1, 0, 0, 0, 0, 0, 1));

const HOST_ADDRS: [IpAddr; 2] = [ALPHA4, ALPHA6];
const REMOTE_ADDRS: [IpAddr; 4] = [ORDINARY4, BLOCKED4, ORDINARY6, BLOCKED6];

const PORT: u16 = 5000;
const PACKETS: u64 = 50;

/// Blocks `10.77.1.0/24` and `fd77:1::/64`; every drop is an event.
const BLOCKING: &str = "version: blocking
global:
  events_per_second: 100000
  block:
    - name: blk
      cidrs: [10.77.1.0/24, 'fd77:1::/64']
accounts:
  - id: alpha
    prefixes: [10.77.0.10/32, 'fd77::10/128']
";

/// The same accounts, nothing blocked.
const OPEN: &str = "version: open
accounts:
  - id: alpha
    prefixes: [10.77.0.10/32, 'fd77::10/128']
";

fn topology(tag: &str) -> Topology {
    let topo = Topology::new(tag);
    topo.add_host_addrs(&HOST_ADDRS);
    topo.add_remote_addrs(&REMOTE_ADDRS);
    topo
}

/// Ready when a receive and a transmit program sit on the interface (the
/// loop starts right after): for agents whose stderr is not read.
fn attached(topo: &Topology) -> impl Fn(&Agent) -> bool + '_ {
    |_| {
        let programs = topo.host_programs();
        programs
            .iter()
            .any(|(hook, _)| matches!(*hook, "xdp" | "tcx_ingress"))
            && programs.iter().any(|(hook, _)| *hook == "tcx_egress")
    }
}

/// Sends [`PACKETS`] datagrams from the blocked and from the ordinary
/// remote address of each family to alpha; returns what arrived from the
/// blocked ones (ordinary traffic must always arrive).
fn blocked_arrivals(topo: &Topology) -> [u64; 2] {
    [(ALPHA4, ORDINARY4, BLOCKED4), (ALPHA6, ORDINARY6, BLOCKED6)].map(
        |(alpha, ordinary, blocked)| {
            let sink = UdpSink::bind(&topo.host, SocketAddr::new(alpha, PORT));
            for src in [blocked, ordinary] {
                let socket = topo.remote.udp_socket(SocketAddr::new(src, 0));
                let _sent = send_udp(
                    &socket,
                    sink.local_addr(),
                    Pace {
                        pps: 2000,
                        packets: PACKETS,
                        payload: 100,
                    },
                );
            }
            let got = sink.finish(Duration::from_millis(250));
            assert_eq!(
                got.packets_from(ordinary),
                PACKETS,
                "ordinary traffic from {ordinary} always arrives"
            );
            got.packets_from(blocked)
        },
    )
}

/// Stops the agent and checks that it exited by itself, with status 0.
fn assert_stops_cleanly(agent: &mut Agent) {
    let status = agent.stop();
    assert!(status.success(), "the agent exited with {status}");
}

/// A closed stderr loses log lines, nothing else: no crash (before: exit 101
/// within seconds, a panic writing the panic message), no detach.
#[test]
fn a_closed_stderr_loses_logs_and_nothing_else() {
    let _serial = serial();
    let topo = topology("stderr-closed");
    let policy = PolicyFile::new("stderr-closed", BLOCKING);
    let mut agent = Agent::start_with_streams(
        &topo.host,
        &policy.uplink_run_args(&[]),
        Streams::StderrClosed,
        attached(&topo),
    );
    // Reloads log a line each; summaries one a second.
    for _ in 0..5 {
        agent.signal(libc::SIGHUP);
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(blocked_arrivals(&topo), [0, 0], "still enforcing");
    wait_until("a drop event on stdout", Duration::from_secs(5), || {
        !agent.events().is_empty()
    });
    assert!(agent.is_running(), "the agent survived its closed stderr");
    assert!(attached(&topo)(&agent), "still attached");
    assert_stops_cleanly(&mut agent);
}

/// A stderr nobody reads fills up; the agent goes on: SIGHUP still applies
/// a policy (seen in the traffic: the block is lifted) and SIGTERM still
/// stops it.
#[test]
fn a_stalled_stderr_blocks_neither_reloads_nor_stopping() {
    let _serial = serial();
    let topo = topology("stderr-stalled");
    // Every account of this policy is a problem: the rejection fills the
    // one-page pipe at once.
    let mut bad = String::from("accounts:\n");
    for i in 0..200 {
        let _ = writeln!(bad, "  - {{ id: bad-{i}, prefixes: [not-an-address-{i}] }}");
    }
    let policy = PolicyFile::new("stderr-stalled", BLOCKING);
    let mut agent = Agent::start_with_streams(
        &topo.host,
        &policy.uplink_run_args(&[]),
        Streams::StderrStalled,
        attached(&topo),
    );
    policy.write(&bad);
    for _ in 0..3 {
        agent.signal(libc::SIGHUP);
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        blocked_arrivals(&topo),
        [0, 0],
        "the bad policy was rejected"
    );
    policy.write(OPEN);
    agent.signal(libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if blocked_arrivals(&topo) == [PACKETS, PACKETS] {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "SIGHUP was not applied while stderr was stalled"
        );
    }
    assert_stops_cleanly(&mut agent);
}

/// A stdout nobody reads, during a flood of events: summaries go on and
/// say what was lost, SIGHUP is applied, SIGTERM stops the agent.
#[test]
fn a_stalled_stdout_loses_events_and_nothing_else() {
    let _serial = serial();
    let topo = topology("stdout-stalled");
    let policy = PolicyFile::new("stdout-stalled", BLOCKING);
    let mut agent = Agent::start_with_streams(
        &topo.host,
        &policy.uplink_run_args(&[]),
        Streams::StdoutStalled,
        |a| a.log_position("running; SIGHUP reloads", 0).is_some(),
    );
    // Drop events until the queue in front of the stalled pipe overflows
    // (a page of pipe and 64 chunks of queue: a few thousand at most).
    let lost = |agent: &Agent| {
        agent
            .logs()
            .iter()
            .any(|l| l.contains("events lost to a slow or closed consumer: stdout"))
    };
    for _ in 0..40 {
        assert_eq!(blocked_arrivals(&topo), [0, 0]);
        if lost(&agent) {
            break;
        }
    }
    wait_until(
        "a summary that counts the events lost to stdout",
        Duration::from_secs(10),
        || lost(&agent),
    );
    // The summary reads the counters through handles of its own (not the
    // datapath's): they see the kernel's drops.
    assert!(
        agent
            .logs()
            .iter()
            .any(|l| l.contains("seen ") && l.contains("dropped: global_block ")),
        "a summary with the blocked packets:\n{}",
        agent.logs().join("\n")
    );
    policy.write(OPEN);
    let answer = agent.reload();
    assert!(answer.contains("policy in force"), "{answer}");
    assert_eq!(blocked_arrivals(&topo), [PACKETS, PACKETS]);
    let from = agent.logs().len();
    wait_until("two more summaries", Duration::from_secs(10), || {
        agent.logs()[from..]
            .iter()
            .filter(|l| l.contains("seen "))
            .count()
            >= 2
    });
    assert_stops_cleanly(&mut agent);
}

/// An interface deleted and created again under the same name (a
/// container restarted) is attached again, and enforced again.
#[test]
fn an_interface_created_again_is_enforced_again() {
    let _serial = serial();
    let topo = topology("recreated");
    let policy = PolicyFile::new("recreated", BLOCKING);
    let mut agent = Agent::start(&topo.host, policy.path(), &[&format!("{HOST_IF}:uplink")]);
    assert_eq!(blocked_arrivals(&topo), [0, 0]);
    let first = topo.host_ifindex();

    topo.delete_link();
    wait_until(
        "the agent to notice the interface is gone",
        Duration::from_secs(10),
        || agent.log_position("interface disappeared", 0).is_some(),
    );
    topo.recreate_link(&HOST_ADDRS, &REMOTE_ADDRS);
    assert_ne!(topo.host_ifindex(), first, "a new interface");
    wait_until("the agent to re-attach", Duration::from_secs(10), || {
        agent
            .log_position("interface is back: re-attached", 0)
            .is_some()
    });
    assert_eq!(blocked_arrivals(&topo), [0, 0], "enforced again");
    let from = agent.logs().len();
    wait_until(
        "a summary listing the interface",
        Duration::from_secs(10),
        || {
            agent.logs()[from..]
                .iter()
                .any(|l| l.contains(&format!("attached: {HOST_IF} (uplink, receive ")))
        },
    );
    assert_stops_cleanly(&mut agent);
}

/// A SIGHUP while the agent is still loading a large policy is a reload
/// once it runs, not its end (before: exit 129, the default action, since
/// the handlers came after loading).
#[test]
fn sighup_during_start_up_is_a_reload_after_it() {
    let _serial = serial();
    let topo = topology("early-hup");
    // 100,000 list prefixes: loading takes long enough to signal into it.
    let mut big = String::from(BLOCKING);
    big.push_str("  - id: bulk\n    prefixes: [10.77.0.20/32]\n    block:\n      - name: many\n        cidrs:\n");
    for i in 0..100_000u32 {
        let _ = writeln!(
            big,
            "          - 100.{}.{}.{}/32",
            64 + (i >> 16),
            (i >> 8) & 0xff,
            i & 0xff
        );
    }
    let policy = PolicyFile::new("early-hup", &big);
    let sent = std::sync::atomic::AtomicBool::new(false);
    let mut agent = Agent::start_with_streams(
        &topo.host,
        &policy.uplink_run_args(&[]),
        Streams::Read,
        |a| {
            if !sent.load(std::sync::atomic::Ordering::Relaxed) && catches_sighup(a.pid()) {
                assert!(
                    a.log_position("attached", 0).is_none(),
                    "the SIGHUP handler must be installed before attaching"
                );
                a.signal(libc::SIGHUP);
                sent.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            a.log_position("running; SIGHUP reloads", 0).is_some()
        },
    );
    assert!(sent.into_inner(), "SIGHUP was sent during start-up");
    wait_until("the reload after start-up", Duration::from_secs(30), || {
        agent.log_position("SIGHUP: policy in force", 0).is_some()
    });
    assert!(agent.is_running());
    assert_eq!(blocked_arrivals(&topo), [0, 0]);
    assert_stops_cleanly(&mut agent);
}

/// Whether process `pid` has a handler for SIGHUP (`SigCgt` in its status).
fn catches_sighup(pid: u32) -> bool {
    status_field(pid, "SigCgt").is_some_and(|m| m & (1 << (libc::SIGHUP - 1)) != 0)
}

/// A hexadecimal mask field of `/proc/PID/status`.
fn status_field(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| {
        let value = l.strip_prefix(field)?.strip_prefix(':')?.trim();
        u64::from_str_radix(value, 16).ok()
    })
}

/// The running agent holds `CAP_NET_ADMIN`, `CAP_PERFMON` and `CAP_BPF`, and
/// nothing else in any set (and has transparent huge pages off).
#[test]
fn the_agent_keeps_three_capabilities() {
    let _serial = serial();
    let topo = topology("caps");
    let policy = PolicyFile::new("caps", BLOCKING);
    let mut agent = Agent::start(&topo.host, policy.path(), &[&format!("{HOST_IF}:uplink")]);
    let three = (1u64 << 12) | (1 << 38) | (1 << 39);
    for (field, expected) in [
        ("CapEff", three),
        ("CapPrm", three),
        ("CapBnd", three),
        ("CapInh", 0),
        ("CapAmb", 0),
    ] {
        assert_eq!(
            status_field(agent.pid(), field),
            Some(expected),
            "{field} of the agent"
        );
    }
    // Transparent huge pages are off for it (`alloc::no_huge_pages`).
    assert_eq!(status_field(agent.pid(), "THP_enabled"), Some(0));
    // And it still works with them: reloads, enforcement.
    policy.write(OPEN);
    assert!(agent.reload().contains("policy in force"));
    assert_eq!(blocked_arrivals(&topo), [PACKETS, PACKETS]);
    assert_stops_cleanly(&mut agent);
}

/// A tun device carries bare IP packets: refused, also when the agent runs
/// through `nsenter --net` and `/sys` still shows another namespace (before:
/// the link type was read from that `/sys`, found missing, and taken for
/// Ethernet).
#[test]
fn a_tun_device_is_refused_also_through_nsenter() {
    let _serial = serial();
    let ns = NetNs::create(&mmesh_tests::netns::unique_name("tun"));
    ns.ip(&["tuntap", "add", "dev", "mmt-tun", "mode", "tun"]);
    let policy = PolicyFile::new("tun", OPEN);
    let path = policy.path().display().to_string();
    let args = ["run", "--policy", &path, "--interface", "mmt-tun"];
    let out = run_agent_to_exit(&ns, &args, Duration::from_secs(20));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("mmt-tun is not an Ethernet device"),
        "{}: {stderr}",
        out.status
    );
    let out = Command::new("nsenter")
        .arg(format!("--net={}", ns.path().display()))
        .arg(agent_binary())
        .args(args)
        .args(["--ephemeral", "--no-admin-socket"])
        .env("MMESH_LOG", "info")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("running nsenter");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("mmt-tun is not an Ethernet device"),
        "through nsenter: {}: {stderr}",
        out.status
    );
    assert!(
        !ns.ip_output(&["-d", "link", "show", "dev", "mmt-tun"])
            .contains("prog/xdp"),
        "nothing attached to the tun device"
    );
}

/// A list file that is a FIFO or a device is refused at once, with the
/// running policy left in force (before: a FIFO blocked the control loop
/// for good, `/dev/zero` grew the agent until it was killed).
#[test]
fn list_files_that_are_not_regular_files_are_refused_at_once() {
    let _serial = serial();
    let topo = topology("fifo");
    let policy = PolicyFile::new("fifo", BLOCKING);
    let mut agent = Agent::start(&topo.host, policy.path(), &[&format!("{HOST_IF}:uplink")]);
    let fifo = policy.path().with_file_name("list.fifo");
    let c_path = std::ffi::CString::new(fifo.display().to_string()).expect("no NUL in the path");
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
    for (file, says) in [
        (fifo.display().to_string(), "FIFO"),
        ("/dev/zero".to_owned(), "device"),
    ] {
        policy.write(&format!(
            "{OPEN}global:\n  block:\n    - {{ name: from-file, file: {file} }}\n"
        ));
        let answer = agent.reload();
        assert!(
            answer.contains("policy rejected") && answer.contains(says),
            "{file}: {answer}"
        );
        assert_eq!(blocked_arrivals(&topo), [0, 0], "the running policy stays");
    }
    assert_stops_cleanly(&mut agent);
}

/// After SIGSTOP and SIGCONT the agent prints one summary, not a burst of
/// the missed ones (before: a dozen lines at once, the first claiming a rate
/// many times too high), and its rate is over the time that really passed.
#[test]
fn a_stopped_agent_resumes_with_one_summary() {
    let _serial = serial();
    let topo = topology("sigstop");
    let policy = PolicyFile::new("sigstop", BLOCKING);
    let mut agent = Agent::start(&topo.host, policy.path(), &[&format!("{HOST_IF}:uplink")]);
    let summaries = |agent: &Agent, from: usize| {
        agent.logs()[from..]
            .iter()
            .filter(|l| l.contains("seen "))
            .cloned()
            .collect::<Vec<_>>()
    };
    agent.signal(libc::SIGSTOP);
    // Three summary intervals missed.
    std::thread::sleep(Duration::from_secs(3));
    let from = agent.logs().len();
    agent.signal(libc::SIGCONT);
    wait_until("a summary after SIGCONT", Duration::from_secs(10), || {
        !summaries(&agent, from).is_empty()
    });
    // The next one is due a whole interval later: within half of one, no
    // second line may appear (a late one only makes this pass, never fail).
    std::thread::sleep(Duration::from_millis(500));
    let lines = summaries(&agent, from);
    assert_eq!(
        lines.len(),
        1,
        "one summary after the pause:\n{}",
        lines.join("\n")
    );
    // And it goes on summarizing what it enforces.
    let from = agent.logs().len();
    assert_eq!(blocked_arrivals(&topo), [0, 0]);
    wait_until(
        "the summary of the traffic",
        Duration::from_secs(10),
        || {
            summaries(&agent, from)
                .iter()
                .any(|l| l.contains("dropped: global_block"))
        },
    );
    assert_stops_cleanly(&mut agent);
}
