//! End to end: the agent's Prometheus endpoint and health checks, scraped
//! over HTTP inside the agent's namespace while real UDP traffic crosses
//! the host end of a veth pair: drops by a block list show in
//! `mmesh_packets_total`, `/readyz` follows the interface, `/healthz` the
//! agent's loop, and `--no-metrics` serves nothing. And the logs: JSON
//! lines when stderr is not a terminal, as a log collector
//! wants them.
//!
//! Needs root. One test at a time; each is bounded in packets and time, and
//! polls with deadlines.

use std::{
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::Duration,
};

use mmesh_tests::{
    netns::{
        Agent, HOST_IF, NetNs, Pace, PolicyFile, Topology, UdpSink, send_udp, serial, wait_until,
    },
    scrape::{self, Answer, METRICS, must_sample, sample},
};

const ALPHA: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 77, 0, 10));
const ORDINARY: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 77, 0, 100));
/// In the global block list.
const BLOCKED: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 77, 1, 1));
const PORT: u16 = 5000;
const PACKETS: u64 = 50;
const PAYLOAD: usize = 100;
/// Ethernet, IPv4 and UDP headers: counted in the bytes on top of the
/// payload.
const UDP_OVERHEAD: u64 = 14 + 20 + 8;
/// How long an answer or a change may take on a loaded machine.
const DEADLINE: Duration = Duration::from_secs(15);

const POLICY: &str = "version: metrics-test
global:
  block:
    - name: blk
      cidrs: [10.77.1.0/24]
accounts:
  - id: alpha
    prefixes: [10.77.0.10/32]
";

fn topology(tag: &str) -> Topology {
    let topo = Topology::new(tag);
    topo.add_host_addrs(&[ALPHA]);
    topo.add_remote_addrs(&[ORDINARY, BLOCKED]);
    topo
}

fn start(topo: &Topology, policy: &PolicyFile, extra: &[&str]) -> Agent {
    Agent::start_with_args(&topo.host, &policy.uplink_run_args(extra))
}

/// `GET path` from the agent's namespace to its endpoint.
fn get(ns: &NetNs, path: &str) -> std::io::Result<Answer> {
    scrape::get(ns, METRICS, path, DEADLINE)
}

#[track_caller]
fn must_get(ns: &NetNs, path: &str) -> Answer {
    get(ns, path).unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

/// Sends [`PACKETS`] datagrams from `src` and from [`ORDINARY`] to alpha;
/// returns what arrived from `src` (the ordinary traffic must arrive).
fn arrivals(topo: &Topology, src: IpAddr) -> u64 {
    let sink = UdpSink::bind(&topo.host, SocketAddr::new(ALPHA, PORT));
    for from in [src, ORDINARY] {
        let socket = topo.remote.udp_socket(SocketAddr::new(from, 0));
        let _sent = send_udp(
            &socket,
            sink.local_addr(),
            Pace {
                pps: 2000,
                packets: PACKETS,
                payload: PAYLOAD,
            },
        );
    }
    let got = sink.finish(Duration::from_millis(250));
    assert_eq!(
        got.packets_from(ORDINARY),
        PACKETS,
        "ordinary traffic always arrives"
    );
    got.packets_from(src)
}

const DROPPED: &str =
    "mmesh_packets_total{reason=\"global_block\",verdict=\"drop\",direction=\"inbound\"}";
const DROPPED_BYTES: &str =
    "mmesh_bytes_total{reason=\"global_block\",verdict=\"drop\",direction=\"inbound\"}";

/// Drops by the global block list are counted in `mmesh_packets_total` and
/// `mmesh_bytes_total`, next to the policy, the maps and the build.
#[test]
fn scrape_counts_what_the_block_list_dropped() {
    let _serial = serial();
    let topo = topology("mscr");
    let policy = PolicyFile::new("mscr", POLICY);
    let agent = start(&topo, &policy, &[]);

    let ready = must_get(&topo.host, "/readyz");
    assert_eq!(ready.status, 200, "/readyz after attach: {}", ready.body);
    assert!(ready.body.contains(HOST_IF), "{}", ready.body);
    let health = must_get(&topo.host, "/healthz");
    assert_eq!(health.status, 200, "/healthz: {}", health.body);

    let first = must_get(&topo.host, "/metrics");
    assert_eq!(first.status, 200);
    assert!(
        first
            .head
            .to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text"),
        "{}",
        first.head
    );
    let before = sample(&first.body, DROPPED).unwrap_or(0.0);
    let bytes_before = sample(&first.body, DROPPED_BYTES).unwrap_or(0.0);
    for (series, value) in [
        ("mmesh_policy_generation", 1),
        ("mmesh_policy_applies_total{result=\"applied\"}", 1),
        ("mmesh_policy_last_apply_success", 1),
        ("mmesh_policy_info{version=\"metrics-test\"}", 1),
        ("mmesh_map_entries{map=\"accounts\"}", 1),
        ("mmesh_map_entries{map=\"account_prefixes_v4\"}", 1),
        ("mmesh_map_entries{map=\"list_prefixes_v4\"}", 1),
        ("mmesh_map_capacity{map=\"accounts\"}", 16_384),
        (
            &format!(
                "mmesh_build_info{{version=\"{}\"}}",
                env!("CARGO_PKG_VERSION")
            ),
            1,
        ),
    ] {
        assert_eq!(must_sample(&first.body, series) as u64, value, "{series}");
    }
    for series in [
        "mmesh_ring_buffer_events_lost_total",
        "mmesh_events_lost_total{consumer=\"stdout\"}",
        "mmesh_log_lines_lost_total",
        "mmesh_rate_limit_contended_total",
        "mmesh_map_inserts_refused_total{map=\"account_counters\"}",
        "mmesh_events_sampled_away_total",
        "mmesh_pull_failed_total",
    ] {
        assert!(
            sample(&first.body, series).is_some(),
            "no {series} in the scrape:\n{}",
            first.body
        );
    }

    assert_eq!(arrivals(&topo, BLOCKED), 0, "the block list drops");
    let mut scrape = String::new();
    wait_until(
        "mmesh_packets_total to count the dropped packets",
        DEADLINE,
        || {
            scrape = must_get(&topo.host, "/metrics").body;
            sample(&scrape, DROPPED).is_some_and(|now| now - before >= PACKETS as f64)
        },
    );
    let bytes = must_sample(&scrape, DROPPED_BYTES) - bytes_before;
    assert!(
        bytes >= (PACKETS * (PAYLOAD as u64 + UDP_OVERHEAD)) as f64,
        "{bytes} bytes dropped for {PACKETS} packets of {PAYLOAD} bytes of payload"
    );
    // The ordinary traffic passed, and is counted as such.
    assert!(
        must_sample(
            &scrape,
            "mmesh_packets_total{reason=\"pass\",verdict=\"pass\",direction=\"inbound\"}"
        ) >= PACKETS as f64,
        "{scrape}"
    );
    drop(agent);
}

/// `/readyz` says 503 and names the interface while it is gone, and 200
/// again once the agent has re-attached; `/healthz` stays 200.
#[test]
fn readyz_follows_the_interface() {
    let _serial = serial();
    let topo = topology("mrdy");
    let policy = PolicyFile::new("mrdy", POLICY);
    let agent = start(&topo, &policy, &[]);
    assert_eq!(must_get(&topo.host, "/readyz").status, 200);

    topo.delete_link();
    let mut answer = None;
    wait_until("/readyz to say 503", DEADLINE, || {
        let a = must_get(&topo.host, "/readyz");
        let unready = a.status == 503;
        answer = Some(a);
        unready
    });
    let answer = answer.expect("polled at least once");
    assert!(
        answer.body.contains(&format!("not attached to {HOST_IF}")),
        "{}",
        answer.body
    );
    assert_eq!(must_get(&topo.host, "/healthz").status, 200);

    topo.recreate_link(&[ALPHA], &[ORDINARY, BLOCKED]);
    wait_until("/readyz to say 200 again", DEADLINE, || {
        must_get(&topo.host, "/readyz").status == 200
    });
    let scrape = must_get(&topo.host, "/metrics").body;
    assert_eq!(
        must_sample(&scrape, "mmesh_interfaces_lost_total") as u64,
        1,
        "{scrape}"
    );
    assert_eq!(
        must_sample(&scrape, "mmesh_interfaces_reattached_total") as u64,
        1,
        "{scrape}"
    );
    drop(agent);
}

/// `--no-metrics`: nothing listens.
#[test]
fn no_metrics_serves_nothing() {
    let _serial = serial();
    let topo = topology("mnone");
    let policy = PolicyFile::new("mnone", POLICY);
    let agent = start(&topo, &policy, &["--no-metrics"]);
    let err = get(&topo.host, "/healthz").err();
    assert_eq!(
        err.map(|e| e.kind()),
        Some(std::io::ErrorKind::ConnectionRefused),
        "nothing listens on {METRICS}"
    );
    drop(agent);
}

/// `--log-format auto` (the default) writes JSON lines to a stderr that is
/// not a terminal (here a pipe), each with a level and a message.
#[test]
fn logs_are_json_lines_when_stderr_is_not_a_terminal() {
    let _serial = serial();
    let topo = topology("mjson");
    let policy = PolicyFile::new("mjson", POLICY);
    // The harness asks for text; the command line wins over the environment.
    let agent = start(&topo, &policy, &["--log-format", "auto", "--no-metrics"]);
    let logs = agent.logs();
    assert!(!logs.is_empty());
    for line in &logs {
        let value: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
        assert!(value["level"].is_string(), "{line}");
        assert!(value["fields"]["message"].is_string(), "{line}");
    }
    assert!(
        logs.iter().any(|l| l.contains("\"message\":\"attached\"")),
        "{logs:#?}"
    );
    drop(agent);
}

/// Accounts of the full-map test: more than `--max-counters` (at its
/// minimum, 64) can count, and than the 64-entry flow cache of each CPU
/// holds, so that most of their flows are flushed into the counters.
const MANY: u16 = 300;

fn many_accounts() -> Vec<IpAddr> {
    (0..MANY)
        .map(|i| {
            IpAddr::V4(Ipv4Addr::new(
                10,
                77,
                3 + (i / 250) as u8,
                1 + (i % 250) as u8,
            ))
        })
        .collect()
}

fn many_policy(accounts: &[IpAddr], block: bool) -> String {
    let mut text = String::from("version: full-maps\n");
    if block {
        text.push_str("global:\n  block:\n    - name: blk\n      cidrs: [10.77.1.0/24]\n");
    }
    text.push_str("accounts:\n  - id: alpha\n    prefixes: [10.77.0.10/32]\n");
    for (i, addr) in accounts.iter().enumerate() {
        let _ = writeln!(text, "  - id: a{i}\n    prefixes: [{addr}/32]");
    }
    text
}

/// A full map refuses its inserts, by name, with the option that raises
/// it, and counts them: the kernel's per-account counters
/// (`account_counters`, `--max-counters`) under traffic of more accounts
/// than it holds, and a policy map (`account_prefixes_v4`,
/// `--max-account-prefixes`) for a policy one prefix too large, which is
/// refused whole: the block list of the policy in force still drops.
#[test]
fn full_maps_refuse_inserts_by_name_and_count_them() {
    let _serial = serial();
    let topo = topology("mfull");
    let accounts = many_accounts();
    topo.add_host_neighbours(&accounts);
    let policy = PolicyFile::new("mfull", &many_policy(&accounts, true));
    let room = (accounts.len() + 1).to_string();
    let agent = start(
        &topo,
        &policy,
        &[
            "--max-counters",
            "64",
            "--flow-cache",
            "64",
            "--max-account-prefixes",
            &room,
        ],
    );

    let socket = topo.remote.udp_socket(SocketAddr::new(ORDINARY, 0));
    for _round in 0..3 {
        for addr in &accounts {
            socket
                .send_to(&[0u8; 16], SocketAddr::new(*addr, PORT))
                .expect("sending to an account");
        }
    }
    let refused_counters = "mmesh_map_inserts_refused_total{map=\"account_counters\"}";
    wait_until("the counters to refuse inserts", DEADLINE, || {
        sample(&must_get(&topo.host, "/metrics").body, refused_counters).unwrap_or(0.0) > 0.0
    });
    let scrape = must_get(&topo.host, "/metrics").body;
    for (series, value) in [
        ("mmesh_map_entries{map=\"account_counters\"}", 64),
        ("mmesh_map_capacity{map=\"account_counters\"}", 64),
    ] {
        assert_eq!(
            must_sample(&scrape, series) as u64,
            value,
            "{series}:\n{scrape}"
        );
    }
    wait_until("the summary to name the full map", DEADLINE, || {
        agent
            .log_position("map account_counters full (raise --max-counters)", 0)
            .is_some()
    });

    // One account more than --max-account-prefixes holds, and no block list:
    // applied, it would let the blocked source through.
    let mut bigger = accounts.clone();
    bigger.push(IpAddr::V4(Ipv4Addr::new(10, 77, 5, 1)));
    let from = agent.logs().len();
    policy.write(&many_policy(&bigger, false));
    wait_until("the agent to refuse the policy", DEADLINE, || {
        agent.log_position("policy rejected", from).is_some()
    });
    let line = &agent.logs()[agent.log_position("policy rejected", from).expect("waited")];
    for needed in [
        "map account_prefixes_v4",
        &format!("--max-account-prefixes {room}"),
        "raise --max-account-prefixes",
    ] {
        assert!(line.contains(needed), "no {needed:?} in: {line}");
    }
    let scrape = must_get(&topo.host, "/metrics").body;
    assert_eq!(
        must_sample(
            &scrape,
            "mmesh_map_inserts_refused_total{map=\"account_prefixes_v4\"}"
        ) as u64,
        1,
        "{scrape}"
    );
    assert_eq!(
        must_sample(&scrape, "mmesh_policy_applies_total{result=\"rejected\"}") as u64,
        1
    );
    assert_eq!(
        arrivals(&topo, BLOCKED),
        0,
        "the policy in force still drops"
    );
    drop(agent);
}

/// Every dropped packet is accounted for once: an event read from the ring
/// buffer, an event lost to a full ring buffer, or an event sampled away
/// (over `events_per_second` of its account and reason).
#[test]
fn every_drop_is_an_event_lost_or_sampled_away() {
    let _serial = serial();
    let topo = topology("msmp");
    let policy = PolicyFile::new(
        "msmp",
        &POLICY.replace("global:\n", "global:\n  events_per_second: 1\n"),
    );
    let agent = start(&topo, &policy, &[]);
    assert_eq!(arrivals(&topo, BLOCKED), 0, "the block list drops");
    let counted = |scrape: &str, series: &str| sample(scrape, series).unwrap_or(0.0) as u64;
    let mut last = String::new();
    let mut balance = (0, 0);
    wait_until("every drop to be accounted for", DEADLINE, || {
        last = must_get(&topo.host, "/metrics").body;
        let dropped = counted(&last, DROPPED);
        let accounted = counted(&last, "mmesh_events_sampled_away_total")
            + counted(&last, "mmesh_ring_buffer_events_lost_total")
            + counted(&last, "mmesh_events_delivered_total{consumer=\"stdout\"}")
            + counted(&last, "mmesh_events_lost_total{consumer=\"stdout\"}");
        balance = (dropped, accounted);
        dropped >= PACKETS && dropped == accounted
    });
    assert!(
        counted(&last, "mmesh_events_sampled_away_total") > 0,
        "{PACKETS} drops within a second or so, at one event per second: {balance:?}\n{last}"
    );
    drop(agent);
}
