//! End to end, a pinned datapath: enforcement that outlives the agent.
//!
//! Each test runs the real agent with `--bpffs` on a bpffs of its own
//! ([`PinDir`], removed even when the test fails) on the host end of a veth
//! pair, with a policy that blocks one remote prefix, and checks with real
//! UDP traffic that blocked packets never arrive while agents come and go,
//! and that only `mmesh-agent detach` stops enforcement.
//!
//! Needs root. One test at a time; each is bounded in packets and time.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    thread,
    time::Duration,
};

use mmesh_tests::netns::{
    Agent, HOST_IF, NetNs, Pace, PinDir, PolicyFile, Topology, UdpSink, run_agent_to_exit,
    send_udp, serial,
};

const ALPHA: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 77, 0, 10));
const ORDINARY: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 77, 0, 100));
const BLOCKED: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 77, 1, 1));
const BLOCKED_LATER: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 77, 2, 1));
const PORT: u16 = 5000;
const SINK_IDLE: Duration = Duration::from_millis(300);

/// Blocks `10.77.1.0/24`; one account.
const BLOCKING: &str = "version: blocking
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
    topo.add_remote_addrs(&[ORDINARY, BLOCKED, BLOCKED_LATER]);
    topo
}

fn pinned_agent(ns: &NetNs, policy: &PolicyFile, pins: &PinDir) -> Agent {
    pinned_agent_with(ns, policy, pins, &[])
}

fn pinned_agent_with(ns: &NetNs, policy: &PolicyFile, pins: &PinDir, extra: &[&str]) -> Agent {
    let bpffs = pins.dir().display().to_string();
    let mut args = policy.uplink_run_args(&["--bpffs", &bpffs]);
    args.extend(extra.iter().map(|a| (*a).to_owned()));
    Agent::start_with_args(ns, &args)
}

/// Packets from `src` in the remote namespace to ALPHA that arrive.
fn arrivals(topo: &Topology, src: IpAddr, packets: u64) -> u64 {
    topo.udp_arrivals(src, SocketAddr::new(ALPHA, PORT), packets)
}

/// The count after `dropped: global_block ` in the agent's last line that
/// has it.
fn blocked_total(agent: &Agent) -> Option<u64> {
    agent.logs().iter().rev().find_map(|l| {
        let rest = l.split("dropped: global_block ").nth(1)?;
        rest.split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse()
            .ok()
    })
}

/// Allowed traffic at a steady pace and a blocked source flooding, while
/// the agent is killed with SIGKILL and started again three times: no
/// blocked packet arrives at any moment, no allowed packet is lost, and the
/// counters go on from where they were (the last agent's totals count every
/// blocked packet since the first start).
#[test]
fn kill_9_and_restart_three_times_keeps_enforcing_and_counting() {
    let _serial = serial();
    let pins = PinDir::new("cont");
    let topo = topology("cont");
    let policy = PolicyFile::new("cont", BLOCKING);
    let mut agent = pinned_agent(&topo.host, &policy, &pins);

    let sink = UdpSink::bind(&topo.host, SocketAddr::new(ALPHA, PORT));
    let dst = sink.local_addr();
    let allowed_socket = topo.remote.udp_socket(SocketAddr::new(ORDINARY, 0));
    let blocked_socket = topo.remote.udp_socket(SocketAddr::new(BLOCKED, 0));
    let duration = Duration::from_secs(8);
    let (allowed, blocked) = thread::scope(|s| {
        let allowed =
            s.spawn(|| send_udp(&allowed_socket, dst, Pace::for_duration(500, duration, 64)));
        let blocked =
            s.spawn(|| send_udp(&blocked_socket, dst, Pace::for_duration(5000, duration, 64)));
        for _ in 0..3 {
            thread::sleep(Duration::from_millis(300));
            let status = agent.kill();
            assert!(!status.success(), "killed: {status}");
            agent = pinned_agent(&topo.host, &policy, &pins);
            let logs = agent.logs().join("\n");
            assert!(
                logs.contains("adopted (programs replaced in place)"),
                "the restarted agent adopted the pinned links:\n{logs}"
            );
        }
        (
            allowed.join().expect("allowed sender"),
            blocked.join().expect("blocked sender"),
        )
    });
    let received = sink.finish(SINK_IDLE);
    assert_eq!(
        received.packets_from(BLOCKED),
        0,
        "no blocked packet arrived across three kill -9 and restarts ({} sent)",
        blocked.packets
    );
    let lost = allowed.packets - received.packets_from(ORDINARY);
    eprintln!(
        "continuity: blocked sent {} (arrived {}), allowed sent {} (lost {lost})",
        blocked.packets,
        received.packets_from(BLOCKED),
        allowed.packets
    );
    // Loose: the veth loses nothing on its own, and nothing here should
    // either; a few packets of slack for a loaded machine.
    assert!(
        lost * 100 <= allowed.packets,
        "allowed packets lost across the restarts: {lost} of {}",
        allowed.packets
    );
    assert!(agent.stop().success(), "the last agent exits 0");
    let counted = blocked_total(&agent).expect("the agent's totals at stop");
    assert_eq!(
        counted, blocked.packets,
        "the last agent's totals count every blocked packet since the first start"
    );
    let logs = agent.logs().join("\n");
    assert!(
        logs.contains("enforcement stays") && logs.contains("mmesh-agent detach --bpffs"),
        "the agent says at stop what stays and how to remove it:\n{logs}"
    );
}

/// SIGTERM leaves the programs attached and enforcing; `mmesh-agent detach`
/// removes links, programs and pins, and traffic flows unfiltered.
#[test]
fn sigterm_keeps_enforcing_and_detach_removes_everything() {
    let _serial = serial();
    let pins = PinDir::new("detach");
    let topo = topology("detach");
    let policy = PolicyFile::new("detach", BLOCKING);
    let mut agent = pinned_agent(&topo.host, &policy, &pins);
    let attached = [
        ("tcx_ingress", "tc_inbound".to_owned()),
        ("tcx_egress", "tc_outbound".to_owned()),
    ];
    assert_eq!(topo.host_programs(), attached);
    assert!(agent.stop().success(), "exits 0 on SIGTERM");

    assert_eq!(
        topo.host_programs(),
        attached,
        "still attached after the agent stopped"
    );
    assert_eq!(arrivals(&topo, BLOCKED, 100), 0, "still blocking");
    assert_eq!(arrivals(&topo, ORDINARY, 100), 100, "still passing");
    let before = pins.pins();
    assert!(
        before.iter().any(|p| p.starts_with("links/")) && before.iter().any(|p| p == "maps/CONFIG"),
        "links and maps are pinned: {before:?}"
    );

    let dir = pins.dir().display().to_string();
    // One interface: its links go, the maps stay.
    let out = run_agent_to_exit(
        &topo.host,
        &["detach", "--bpffs", &dir, "--interface", HOST_IF],
        Duration::from_secs(20),
    );
    assert!(
        out.status.success(),
        "detach -i: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        topo.host_programs(),
        [],
        "no program attached after detach -i"
    );
    let left = pins.pins();
    assert!(
        !left.iter().any(|p| p.starts_with("links/")) && left.iter().any(|p| p == "maps/CONFIG"),
        "the maps stay after detach -i: {left:?}"
    );
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
    assert!(pins.pins().is_empty(), "no pin left: {:?}", pins.pins());
    assert!(!pins.dir().exists(), "the pin directory is gone");
    assert_eq!(
        arrivals(&topo, BLOCKED, 100),
        100,
        "nothing filters after detach"
    );
}

/// A second agent on the same pins is refused with a clear message, and so
/// is `detach` while an agent runs; after kill -9, `detach` removes it all.
#[test]
fn second_agent_refused_and_detach_after_kill_9() {
    let _serial = serial();
    let pins = PinDir::new("lock");
    let topo = topology("lock");
    let policy = PolicyFile::new("lock", BLOCKING);
    let mut agent = pinned_agent(&topo.host, &policy, &pins);
    let dir = pins.dir().display().to_string();
    let path = policy.path().display().to_string();
    let out = run_agent_to_exit(
        &topo.host,
        &[
            "run",
            "--policy",
            &path,
            "--interface",
            HOST_IF,
            "--bpffs",
            &dir,
        ],
        Duration::from_secs(20),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && stderr.contains(&format!(
                "another mmesh-agent holds the pinned datapath in {dir}"
            )),
        "second agent: {}: {stderr}",
        out.status
    );
    let out = run_agent_to_exit(
        &topo.host,
        &["detach", "--bpffs", &dir],
        Duration::from_secs(20),
    );
    assert!(
        !out.status.success(),
        "detach is refused while an agent runs"
    );
    assert!(agent.is_running(), "the first agent runs on");
    assert_eq!(arrivals(&topo, BLOCKED, 50), 0, "and enforces");

    let _ = agent.kill();
    assert_eq!(arrivals(&topo, BLOCKED, 50), 0, "enforcing after kill -9");
    let out = run_agent_to_exit(
        &topo.host,
        &["detach", "--bpffs", &dir],
        Duration::from_secs(20),
    );
    assert!(
        out.status.success(),
        "detach after kill -9: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(topo.host_programs(), [], "no program attached after detach");
    assert!(pins.pins().is_empty(), "no pin left: {:?}", pins.pins());
    assert_eq!(arrivals(&topo, BLOCKED, 50), 50, "nothing filters");
}

/// Rewrites the record the agent keeps in its pin directory (pin format,
/// build identity), as an agent of another build or format would have left
/// it.
fn rewrite_agent_record(pins: &PinDir, format: Option<u32>, build: Option<u64>) {
    use aya::maps::{Array, Map, MapData};
    let data = MapData::from_pin(pins.dir().join("mmesh_agent")).expect("the agent's record");
    let mut record: Array<MapData, [u8; 24]> =
        Array::try_from(Map::Array(data)).expect("an array of 24-byte values");
    let mut value = record.get(&0, 0).expect("reading the record");
    if let Some(format) = format {
        value[..4].copy_from_slice(&format.to_ne_bytes());
    }
    if let Some(build) = build {
        value[8..16].copy_from_slice(&build.to_ne_bytes());
    }
    record.set(0, value, 0).expect("writing the record");
}

/// Rewrites the layout version recorded for one pinned map, as an agent
/// whose version of that map differs would have left it.
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

/// An agent of another build adopts the pinned datapath and replaces the
/// programs in the links in place (traffic keeps being filtered); another
/// capacity of one map recreates that map. What it
/// cannot adopt is refused with a message that names the difference and
/// `detach`, and left as it is: other capacities of the account slots
/// (`--max-accounts`), another pin format, a pinned map it does not know,
/// a map that claims its layout but is of another shape.
#[test]
fn upgrade_replaces_programs_in_place_and_what_cannot_be_adopted_is_refused() {
    use aya::maps::MapData;
    let _serial = serial();
    let pins = PinDir::new("upgrade");
    let topo = topology("upgrade");
    let policy = PolicyFile::new("upgrade", BLOCKING);
    let mut agent = pinned_agent(&topo.host, &policy, &pins);
    assert!(agent.stop().success());

    rewrite_agent_record(&pins, None, Some(0x1234));
    let mut agent = pinned_agent(&topo.host, &policy, &pins);
    let logs = agent.logs().join("\n");
    assert!(
        logs.contains(
            "upgrade: the pinned programs (build 0000000000001234) are replaced in place"
        ) && logs.contains("adopted (programs replaced in place)")
            && !logs.contains(" recreated ("),
        "the new build adopts the links and every map:\n{logs}"
    );
    assert_eq!(arrivals(&topo, BLOCKED, 50), 0, "still blocking");
    assert!(agent.stop().success());

    // Another capacity of a map other than the account slots: that map
    // (and CONFIG) recreated, the rest adopted.
    let mut agent = pinned_agent_with(&topo.host, &policy, &pins, &["--max-counters", "70000"]);
    let logs = agent.logs().join("\n");
    assert!(
        logs.contains("map ACCT_COUNTERS recreated (65536 entries, this agent's capacity options ask for 70000): the per-account counters restart from zero")
            && logs.contains("adopted, policy in force"),
        "another --max-counters recreates ACCT_COUNTERS:\n{logs}"
    );
    assert_eq!(arrivals(&topo, BLOCKED, 50), 0, "still blocking");
    assert!(agent.stop().success());

    let dir = pins.dir().display().to_string();
    let path = policy.path().display().to_string();
    let detach = format!("mmesh-agent detach --bpffs {dir}");
    let run = |extra: &[&str]| {
        let mut args = vec![
            "run",
            "--policy",
            &path,
            "--interface",
            HOST_IF,
            "--bpffs",
            &dir,
        ];
        args.extend_from_slice(extra);
        let out = run_agent_to_exit(&topo.host, &args, Duration::from_secs(20));
        assert!(!out.status.success(), "refused: {}", out.status);
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let stderr = run(&["--max-accounts", "5"]);
    assert!(
        stderr.contains("was created with --max-accounts") && stderr.contains(&detach),
        "other account capacity: {stderr}"
    );

    rewrite_agent_record(&pins, Some(99), None);
    let stderr = run(&[]);
    assert!(
        stderr.contains("pin format 99") && stderr.contains(&detach),
        "another pin format: {stderr}"
    );
    rewrite_agent_record(&pins, Some(2), None);

    let maps = pins.dir().join("maps");
    let stats = MapData::from_pin(maps.join("STATS")).expect("the pinned STATS");
    stats
        .pin(maps.join("OLD_MAP"))
        .expect("pinning under a name of no map");
    let stderr = run(&[]);
    assert!(
        stderr.contains("it holds map OLD_MAP, which this agent does not know")
            && stderr.contains(&detach),
        "a map of no known name: {stderr}"
    );
    std::fs::remove_file(maps.join("OLD_MAP")).expect("unpinning OLD_MAP");

    // STATS (per-CPU u64) where TOTALS (per-CPU counters) belongs, with
    // TOTALS's layout version recorded.
    std::fs::remove_file(maps.join("TOTALS")).expect("unpinning TOTALS");
    stats
        .pin(maps.join("TOTALS"))
        .expect("pinning STATS as TOTALS");
    let stderr = run(&[]);
    assert!(
        stderr.contains("map TOTALS claims layout version 1 (this agent's) but is a")
            && stderr.contains(&detach),
        "a map of another shape claiming the layout: {stderr}"
    );
    assert_eq!(
        arrivals(&topo, BLOCKED, 50),
        0,
        "the refused agents left the pinned datapath enforcing"
    );
}

/// A second account, rate-limited to 1 packet/s with a burst of 50, for
/// [`upgrade_recreating_one_map_keeps_enforcing_and_resets_only_its_state`].
const BETA: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 77, 0, 20));

const BLOCKING_AND_LIMITED: &str = "version: limited
global:
  block:
    - name: blk
      cidrs: [10.77.1.0/24]
accounts:
  - id: alpha
    prefixes: [10.77.0.10/32]
  - id: beta
    prefixes: [10.77.0.20/32]
    limits:
      inbound: { pps: 1, pps_burst: 50 }
";

/// Packets from ORDINARY to BETA that arrive, out of 100 sent at once.
fn beta_burst(topo: &Topology) -> u64 {
    let sink = UdpSink::bind(&topo.host, SocketAddr::new(BETA, PORT));
    let socket = topo.remote.udp_socket(SocketAddr::new(ORDINARY, 0));
    let _ = send_udp(
        &socket,
        sink.local_addr(),
        Pace {
            pps: 2000,
            packets: 100,
            payload: 64,
        },
    );
    sink.finish(SINK_IDLE).packets_from(ORDINARY)
}

/// Kills `agent`, records another layout version for `map`, and starts a
/// new agent in its place, which must recreate `map` and exactly `recreated_too` (in the
/// order of the maps) and log `reset` for `map`.
fn upgrade_with_layout(
    topo: &Topology,
    policy: &PolicyFile,
    pins: &PinDir,
    agent: &mut Agent,
    map: &str,
    recreated_too: &[&str],
    reset: &str,
) {
    let _ = agent.kill();
    rewrite_map_layout(pins, map, 99);
    *agent = pinned_agent(&topo.host, policy, pins);
    let logs = agent.logs().join("\n");
    let recreated: Vec<&str> = logs
        .lines()
        .filter_map(|l| l.split("map ").nth(1)?.split_once(" recreated ("))
        .map(|(name, _)| name)
        .collect();
    assert_eq!(
        recreated, recreated_too,
        "{map} recreated, and only what goes with it:\n{logs}"
    );
    assert!(
        logs.contains(&format!(
            "map {map} recreated (layout version 99, this agent's is 1): {reset}"
        )) && logs.contains("adopted (programs replaced in place)"),
        "the log names the map, why and what is reset:\n{logs}"
    );
}

/// Upgrades by agents whose layout of one map differs (the version
/// recorded for it is not theirs), while allowed traffic flows and a
/// blocked source floods: a policy map (`RULES_V4`, the global lists),
/// `CONFIG` itself, then a state map (`RATE_STATE`, the rate-limit
/// buckets). Each agent recreates that map and what goes with it (see the
/// README: `CONFIG` with any map, every halved map with `CONFIG`) and
/// nothing else: no blocked packet arrives at any moment, no allowed packet
/// is lost, the totals count every blocked packet since the first start,
/// and the only state reset is the one the README names: after the last
/// upgrade, an account whose burst was used up has a full burst again.
#[test]
fn upgrade_recreating_one_map_keeps_enforcing_and_resets_only_its_state() {
    let _serial = serial();
    let pins = PinDir::new("layout");
    let topo = topology("layout");
    topo.add_host_addrs(&[BETA]);
    let policy = PolicyFile::new("layout", BLOCKING_AND_LIMITED);
    let mut agent = pinned_agent(&topo.host, &policy, &pins);
    let first = beta_burst(&topo);
    assert!(
        (50..=55).contains(&first),
        "beta's burst of 50 (1 packet/s after it): {first} of 100 arrived"
    );

    let sink = UdpSink::bind(&topo.host, SocketAddr::new(ALPHA, PORT));
    let dst = sink.local_addr();
    let allowed_socket = topo.remote.udp_socket(SocketAddr::new(ORDINARY, 0));
    let blocked_socket = topo.remote.udp_socket(SocketAddr::new(BLOCKED, 0));
    let duration = Duration::from_secs(7);
    let (allowed, blocked) = thread::scope(|s| {
        let allowed =
            s.spawn(|| send_udp(&allowed_socket, dst, Pace::for_duration(500, duration, 64)));
        let blocked =
            s.spawn(|| send_udp(&blocked_socket, dst, Pace::for_duration(5000, duration, 64)));
        let halved = [
            "HOSTS_V4",
            "HOSTS_V6",
            "PREFIXES_V4",
            "PREFIXES_V6",
            "ACCOUNTS",
            "RULES_V4",
            "RULES_V6",
            "ACCT_RULES_V4",
            "ACCT_RULES_V6",
            "STRIDE",
        ];
        let with_config: Vec<&str> = std::iter::once("CONFIG").chain(halved).collect();
        for (map, recreated_too, reset) in [
            (
                "RULES_V4",
                vec!["CONFIG", "RULES_V4"],
                "refilled from the policy",
            ),
            ("CONFIG", with_config, "nothing is lost"),
            (
                "RATE_STATE",
                vec!["CONFIG", "RATE_STATE"],
                "rate-limit buckets reset",
            ),
        ] {
            thread::sleep(Duration::from_millis(300));
            upgrade_with_layout(
                &topo,
                &policy,
                &pins,
                &mut agent,
                map,
                &recreated_too,
                reset,
            );
        }
        (
            allowed.join().expect("allowed sender"),
            blocked.join().expect("blocked sender"),
        )
    });
    let received = sink.finish(SINK_IDLE);
    assert_eq!(
        received.packets_from(BLOCKED),
        0,
        "no blocked packet arrived across two upgrades that recreated a map ({} sent)",
        blocked.packets
    );
    let lost = allowed.packets - received.packets_from(ORDINARY);
    eprintln!(
        "layout upgrades: blocked sent {} (arrived {}), allowed sent {} (lost {lost})",
        blocked.packets,
        received.packets_from(BLOCKED),
        allowed.packets
    );
    assert!(
        lost * 100 <= allowed.packets,
        "allowed packets lost across the upgrades: {lost} of {}",
        allowed.packets
    );
    // The buckets were reset: a full burst again, where the old bucket
    // would have refilled by one packet a second since the first burst.
    let second = beta_burst(&topo);
    eprintln!(
        "layout upgrades: beta's burst {first} before, {second} after RATE_STATE was recreated"
    );
    assert!(
        second >= 50,
        "a full burst after RATE_STATE was recreated: {second} of 100 arrived (before: {first})"
    );
    assert!(agent.stop().success(), "the last agent exits 0");
    let counted = blocked_total(&agent).expect("the agent's totals at stop");
    assert_eq!(
        counted, blocked.packets,
        "TOTALS was kept: the last agent's totals count every blocked packet since the first start"
    );
}

/// kill -9 while the agent applies a policy (SIGHUP), at several moments
/// of the reload (the file settling, compiling, writing the maps, done):
/// each time one policy or the other is in force, whole, and the next agent
/// adopts what the kernel was left holding and brings it to its own policy.
#[test]
fn kill_9_during_a_policy_apply_leaves_a_state_the_next_agent_adopts() {
    use std::fmt::Write as _;
    let _serial = serial();
    let pins = PinDir::new("midapply");
    let topo = topology("midapply");
    let policy = PolicyFile::new("midapply", BLOCKING);
    let mut agent = pinned_agent(&topo.host, &policy, &pins);
    // 10,000 accounts and another blocked prefix, as JSON.
    let mut big = String::from(
        r#"{"version": "big", "global": {"block": [{"name": "later", "cidrs": ["10.77.2.0/24"]}]}, "accounts": [{"id": "alpha", "prefixes": ["10.77.0.10/32"]}"#,
    );
    for i in 0..10_000u32 {
        let _ = write!(
            big,
            r#", {{"id": "a{i}", "prefixes": ["10.100.{}.{}/32"], "limits": {{"outbound": {{"pps": "100k"}}}}}}"#,
            i >> 8,
            i & 255
        );
    }
    big.push_str("]}");
    let mut finished = 0;
    for (round, delay) in [300u64, 800, 1500].into_iter().enumerate() {
        // Alternately to the large policy and back.
        let (text, blocked, lifted) = if round % 2 == 0 {
            (big.as_str(), BLOCKED_LATER, BLOCKED)
        } else {
            (BLOCKING, BLOCKED, BLOCKED_LATER)
        };
        policy.write(text);
        agent.signal(libc::SIGHUP);
        thread::sleep(Duration::from_millis(delay));
        let _ = agent.kill();
        finished += usize::from(agent.log_position("policy in force", 0).is_some());
        assert_eq!(
            arrivals(&topo, blocked, 50) + arrivals(&topo, lifted, 50),
            50,
            "after kill -9 {delay} ms into a reload, one policy or the other is in force, whole"
        );
        agent = pinned_agent(&topo.host, &policy, &pins);
        assert_eq!(arrivals(&topo, blocked, 50), 0, "the file's block holds");
        assert_eq!(arrivals(&topo, lifted, 50), 50, "the other one is lifted");
        assert_eq!(arrivals(&topo, ORDINARY, 50), 50, "ordinary traffic passes");
    }
    eprintln!("mid-apply: {finished} of 3 reloads had finished when the agent was killed");
    assert!(agent.stop().success());
}

/// A rate limit holds across kill -9 and restarts: the buckets live in the
/// pinned maps, and the account keeps its slot, so neither a restart nor
/// the adoption refills or empties them. 1000 packets/s with a burst of
/// 100, offered three times that, with two restarts in the middle: what
/// arrives is within ±5% of 1000/s over the time it was offered.
#[test]
fn a_rate_limit_holds_across_restarts() {
    let _serial = serial();
    let pins = PinDir::new("rate");
    let topo = topology("rate");
    let policy = PolicyFile::new(
        "rate",
        "accounts:
  - id: alpha
    prefixes: [10.77.0.10/32]
    limits:
      inbound: { pps: 1000, pps_burst: 100 }
",
    );
    let mut agent = pinned_agent(&topo.host, &policy, &pins);
    let sink = UdpSink::bind(&topo.host, SocketAddr::new(ALPHA, PORT));
    let dst = sink.local_addr();
    let socket = topo.remote.udp_socket(SocketAddr::new(ORDINARY, 0));
    let sent = thread::scope(|s| {
        let sender = s.spawn(|| {
            send_udp(
                &socket,
                dst,
                Pace::for_duration(3000, Duration::from_secs(5), 64),
            )
        });
        for _ in 0..2 {
            thread::sleep(Duration::from_millis(800));
            let _ = agent.kill();
            agent = pinned_agent(&topo.host, &policy, &pins);
        }
        sender.join().expect("sender")
    });
    let got = sink.finish(SINK_IDLE).packets_from(ORDINARY);
    let expected = 1000.0 * sent.span.as_secs_f64() + 100.0;
    let ratio = got as f64 / expected;
    eprintln!(
        "rate across restarts: offered {} in {:?}, received {got}, expected {expected:.0} (ratio {ratio:.3})",
        sent.packets, sent.span
    );
    assert!(
        (0.95..=1.05).contains(&ratio),
        "received {got} of {} offered in {:?}: expected {expected:.0} ±5%",
        sent.packets,
        sent.span
    );
    assert!(agent.stop().success());
}

/// `BLOCKING` with the other prefix blocked instead.
const BLOCKING_LATER: &str = "version: blocking-later
global:
  block:
    - name: blk
      cidrs: [10.77.2.0/24]
accounts:
  - id: alpha
    prefixes: [10.77.0.10/32]
";

/// An agent that adopts pins holding another policy puts its own in force,
/// whole, in both halves: an agent that finished syncing its standby half
/// records so, and the next one reads back only the active half and takes
/// it for both; if that were wrong, entries of the old policy would linger
/// in the standby half and come back with the next reload.
#[test]
fn a_restart_with_another_policy_puts_it_in_force_in_both_halves() {
    let _serial = serial();
    let pins = PinDir::new("other");
    let topo = topology("other");
    let policy = PolicyFile::new("other", BLOCKING);
    let mut agent = pinned_agent(&topo.host, &policy, &pins);
    assert_eq!(arrivals(&topo, BLOCKED, 50), 0, "the first policy blocks");
    let _ = agent.kill();

    policy.write(BLOCKING_LATER);
    let agent = pinned_agent(&topo.host, &policy, &pins);
    for round in 0..2 {
        assert_eq!(
            arrivals(&topo, BLOCKED_LATER, 50),
            0,
            "round {round}: the new policy's block holds"
        );
        assert_eq!(
            arrivals(&topo, BLOCKED, 50),
            50,
            "round {round}: the old policy's block is gone"
        );
        assert_eq!(arrivals(&topo, ORDINARY, 50), 50, "ordinary traffic passes");
        // Twice through both halves: to the first policy and back.
        policy.write(BLOCKING);
        let answer = agent.reload();
        assert!(answer.contains("policy in force"), "{answer}");
        assert_eq!(
            arrivals(&topo, BLOCKED, 50),
            0,
            "round {round}: back to the first"
        );
        assert_eq!(
            arrivals(&topo, BLOCKED_LATER, 50),
            50,
            "round {round}: lifted"
        );
        policy.write(BLOCKING_LATER);
        let answer = agent.reload();
        assert!(answer.contains("policy in force"), "{answer}");
    }
    let mut agent = agent;
    assert!(agent.stop().success());
}
