//! Restarts of an agent with a pinned datapath: how long a new agent takes
//! to adopt the pins of a 100,000-account policy, against a cold start in
//! the same round, and whether enforcement stops meanwhile.
//!
//! Every round, with the real `mmesh-agent` binary (the release build, as
//! for the agent figures of the `policy` group) on a veth pair between two
//! namespaces, the policy of the `policy` group plus a probe account and a
//! blocked prefix, in JSON:
//!
//! 1. cold start: an empty pin directory; the time from spawning the agent
//!    to its `pins made, policy in force` log line (polled every 10 ms);
//! 2. restart: kill -9, then a new agent on the same pins and policy; the
//!    time from spawning it to `adopted, policy in force`;
//! 3. upgrade recreating one map: kill -9, the recorded layout version of
//!    `RATE_STATE` changed, a new agent; the same time.
//!
//! During 2 and 3, from before the kill until after the log line, a source
//! in the blocked prefix sends probes at 10,000 packets/s and an allowed one
//! at 1,000/s to the probe account's address: the blocked probes that
//! arrive are the enforcement gap (the goal is none), the allowed ones lost
//! say whether traffic flowed.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket},
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use super::{
    Options,
    policy::{Format, Restore, agent_binary, capacity, no_agent_binary, policy_text},
    report::{Figure, Goal, Report},
};
use crate::netns::{
    Agent, HOST_IF, Pace, PinDir, PolicyFile, Streams, Topology, UdpSink, run_agent_to_exit,
    send_udp,
};

const GROUP: &str = "restart";

const PROBE: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 77, 0, 10));
const ALLOWED: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 77, 0, 100));
const BLOCKED: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 77, 1, 1));
const PORT: u16 = 5000;
const BLOCKED_PPS: u64 = 10_000;
const ALLOWED_PPS: u64 = 1_000;

/// The `policy` group's policy with the probe account and `10.77.1.0/24`
/// in the global block list.
fn restart_policy(accounts: u32) -> String {
    let text = policy_text(accounts, 0, Format::Json);
    let text = text.replacen("\"cidrs\": [", "\"cidrs\": [\"10.77.1.0/24\", ", 1);
    text.replacen(
        "\"accounts\": [\n",
        "\"accounts\": [\n  {\"id\": \"probe\", \"prefixes\": [\"10.77.0.10/32\"]},\n",
        1,
    )
}

/// One figure per kind of start, in the order they run.
const STARTS: [&str; 3] = [
    "cold start",
    "restart after kill -9 (adopt)",
    "upgrade recreating RATE_STATE (adopt)",
];

pub fn run(opts: &Options, report: &mut Report) {
    let accounts: u32 = if opts.quick { 2_000 } else { 100_000 };
    let names: Vec<String> = STARTS
        .iter()
        .map(|s| format!("{s}, {accounts} accounts: until policy in force"))
        .collect();
    let gaps: Vec<String> = STARTS[1..]
        .iter()
        .map(|s| format!("{s}: blocked probes that arrived"))
        .collect();
    let Some(bin) = agent_binary(opts.quick) else {
        for name in names.iter().chain(&gaps) {
            report.add(no_agent_binary(GROUP, name.clone(), ""));
        }
        return;
    };
    eprintln!("bench: restart: {accounts} accounts, {}", bin.display());
    let restore = Restore::agent_bin(&bin);
    let file = PolicyFile::new("bench-restart", &restart_policy(accounts));
    let topo = Topology::new("bench-restart");
    topo.add_host_addrs(&[PROBE]);
    topo.add_remote_addrs(&[ALLOWED, BLOCKED]);
    for round in 0..opts.rounds {
        one_round(&topo, &file, accounts, &names, &gaps, report);
        eprintln!("bench: restart round {}/{} done", round + 1, opts.rounds);
    }
    drop(topo);
    drop(restore);
}

fn agent_args(file: &PolicyFile, pins: &PinDir, accounts: u32) -> Vec<String> {
    let cap = capacity(accounts);
    let mut args: Vec<String> = [
        "run",
        "--policy",
        &file.path().display().to_string(),
        "--interface",
        &format!("{HOST_IF}:uplink"),
        "--summary-interval",
        "3600",
        "--bpffs",
        &pins.dir().display().to_string(),
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    for (flag, value) in [
        ("--max-accounts", cap.accounts),
        ("--max-account-prefixes", cap.account_prefixes),
        ("--max-list-prefixes", cap.list_prefixes),
        ("--max-counters", cap.counters),
        ("--event-buffer", cap.event_buffer),
    ] {
        args.push(flag.into());
        args.push(value.to_string());
    }
    args
}

/// Starts the agent and returns it with the time until it logged that its
/// policy is in force.
fn start(topo: &Topology, args: &[String]) -> (Agent, Duration) {
    let t = Instant::now();
    let agent = Agent::start_with_streams(&topo.host, args, Streams::Read, |a| {
        a.log_position("policy in force", 0).is_some()
    });
    (agent, t.elapsed())
}

/// What the probes of one restart saw.
struct Probes {
    blocked_sent: u64,
    blocked_arrived: u64,
    allowed_sent: u64,
    allowed_arrived: u64,
}

/// Sends at `pps` in chunks of 100 ms until `stop`; returns the packets
/// sent.
fn probe(socket: &UdpSocket, dst: SocketAddr, pps: u64, stop: &AtomicBool) -> u64 {
    let mut sent = 0;
    while !stop.load(Ordering::Relaxed) {
        sent += send_udp(
            socket,
            dst,
            Pace {
                pps,
                packets: pps / 10,
                payload: 64,
            },
        )
        .packets;
    }
    sent
}

/// Kills `agent`, runs `between` (with no agent), starts a new one with
/// `args`, all under probes from before the kill until after the new
/// agent's policy is in force.
fn restart(
    topo: &Topology,
    agent: Agent,
    args: &[String],
    between: impl FnOnce(),
) -> (Agent, Duration, Probes) {
    let mut agent = agent;
    let sink = UdpSink::bind(&topo.host, SocketAddr::new(PROBE, PORT));
    let dst = sink.local_addr();
    let blocked_socket = topo.remote.udp_socket(SocketAddr::new(BLOCKED, 0));
    let allowed_socket = topo.remote.udp_socket(SocketAddr::new(ALLOWED, 0));
    let stop = AtomicBool::new(false);
    let (agent, took, blocked_sent, allowed_sent) = thread::scope(|s| {
        let blocked = s.spawn(|| probe(&blocked_socket, dst, BLOCKED_PPS, &stop));
        let allowed = s.spawn(|| probe(&allowed_socket, dst, ALLOWED_PPS, &stop));
        thread::sleep(Duration::from_millis(200));
        let _ = agent.kill();
        between();
        let (new, took) = start(topo, args);
        thread::sleep(Duration::from_millis(200));
        stop.store(true, Ordering::Relaxed);
        (
            new,
            took,
            blocked.join().expect("blocked prober"),
            allowed.join().expect("allowed prober"),
        )
    });
    let received = sink.finish(Duration::from_millis(300));
    (
        agent,
        took,
        Probes {
            blocked_sent,
            blocked_arrived: received.packets_from(BLOCKED),
            allowed_sent,
            allowed_arrived: received.packets_from(ALLOWED),
        },
    )
}

/// Rewrites the layout version the pins record for `map`, as an agent whose
/// layout of that map differs would find it.
fn rewrite_map_layout(pins: &PinDir, map: &str, version: u32) {
    use aya::maps::{HashMap, Map, MapData};
    let data = MapData::from_pin(pins.dir().join("mmesh_layouts")).expect("the layout record");
    let mut layouts: HashMap<MapData, [u8; 16], u32> =
        HashMap::try_from(Map::HashMap(data)).expect("a hash of map names");
    let mut key = [0u8; 16];
    key[..map.len()].copy_from_slice(map.as_bytes());
    layouts
        .insert(key, version, 0)
        .expect("writing the layout record");
}

fn one_round(
    topo: &Topology,
    file: &PolicyFile,
    accounts: u32,
    names: &[String],
    gaps: &[String],
    report: &mut Report,
) {
    let pins = PinDir::new("bench-restart");
    let args = agent_args(file, &pins, accounts);
    let (agent, cold) = start(topo, &args);
    let (agent, adopt, restarted) = restart(topo, agent, &args, || {});
    // Where an adoption's time goes, by the log's timestamps.
    for line in agent.logs().iter().filter(|l| {
        ["adopting the pinned", "generation=", "adopted ("]
            .iter()
            .any(|k| l.contains(k))
    }) {
        eprintln!(
            "bench: restart: adopt log: {}",
            line.get(..140).unwrap_or(line)
        );
    }
    let (mut agent, upgrade, upgraded) = restart(topo, agent, &args, || {
        rewrite_map_layout(&pins, "RATE_STATE", u32::MAX);
    });
    let logs = agent.logs().join("\n");
    assert!(
        logs.contains("map RATE_STATE recreated"),
        "the upgrade recreated RATE_STATE:\n{logs}"
    );
    let _ = agent.kill();
    let out = run_agent_to_exit(
        &topo.host,
        &["detach", "--bpffs", &pins.dir().display().to_string()],
        Duration::from_secs(30),
    );
    assert!(
        out.status.success(),
        "detach: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!(
        "bench: restart: cold {cold:.1?}, adopt {adopt:.1?} (blocked {}/{} arrived, allowed {}/{}), upgrade {upgrade:.1?} (blocked {}/{} arrived, allowed {}/{})",
        restarted.blocked_arrived,
        restarted.blocked_sent,
        restarted.allowed_arrived,
        restarted.allowed_sent,
        upgraded.blocked_arrived,
        upgraded.blocked_sent,
        upgraded.allowed_arrived,
        upgraded.allowed_sent,
    );
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    report.add(Figure {
        group: GROUP.into(),
        name: names[0].clone(),
        unit: "ms".into(),
        samples: vec![ms(cold)],
        baseline: None,
        reference: None,
        goal: None,
        note: "from spawning `mmesh-agent run --bpffs` on an empty pin directory to its `pins made, policy in force` line: maps created, programs verified, the policy read, compiled and written, links attached".into(),
    });
    for (i, (took, what)) in [
        (adopt, "the pins of the agent killed with kill -9 (same build, same policy)"),
        (upgrade, "the pins, with RATE_STATE recorded at another layout version: it is recreated (and CONFIG with it) and every other map reused"),
    ]
    .into_iter()
    .enumerate()
    {
        report.add(Figure {
            group: GROUP.into(),
            name: names[i + 1].clone(),
            unit: "ms".into(),
            samples: vec![ms(took)],
            baseline: Some((names[0].clone(), vec![ms(cold)])),
            reference: None,
            goal: None,
            note: format!(
                "from spawning the new agent on {what} to its `adopted, policy in force` line; the old programs enforce meanwhile. Baseline: the cold start of the same round"
            ),
        });
    }
    for (name, probes) in gaps.iter().zip([&restarted, &upgraded]) {
        report.add(Figure {
            group: GROUP.into(),
            name: name.clone(),
            unit: "packets".into(),
            samples: vec![probes.blocked_arrived as f64],
            baseline: None,
            reference: None,
            goal: Some(Goal::AtMost(0.0)),
            note: format!(
                "probes from a blocked source at {BLOCKED_PPS}/s from before the kill until after the new agent's policy was in force ({} sent this round); allowed probes at {ALLOWED_PPS}/s: {} of {} arrived",
                probes.blocked_sent, probes.allowed_arrived, probes.allowed_sent
            ),
        });
    }
}
