//! End to end, policy from a control plane: the real agent in a test
//! namespace dials a scripted control plane (a real gRPC server on the
//! namespace's loopback), which pushes snapshots and deltas; real UDP
//! traffic through the veth pair checks what is enforced after each Ack
//! and Nack.
//!
//! Needs root. One test at a time; each is bounded in packets and time.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::Path,
    time::Duration,
};

use mmesh_agent::control::{
    proto::{self, agent_message::Body as Up},
    store::Store,
};
use mmesh_tests::{
    control::ScriptedControlPlane,
    controlplane::TempDir,
    netns::{Agent, HOST_IF, NetNs, Topology, run_agent_to_exit, serial},
    scrape,
};

const ALPHA: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 77, 0, 10));
const ORDINARY: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 77, 0, 100));
const FIRST: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 77, 1, 1));
const SECOND: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 77, 2, 1));
const PORT: u16 = 5000;
const ANSWER: Duration = Duration::from_mins(1);

fn topology(tag: &str) -> Topology {
    let topo = Topology::new(tag);
    topo.add_host_addrs(&[ALPHA]);
    topo.add_remote_addrs(&[ORDINARY, FIRST, SECOND]);
    topo
}

/// The agent, ephemeral, on the host end of the veth, with the control
/// plane at `url` and fast heartbeats, reports and status.
fn agent(ns: &NetNs, url: &str, state: &Path, extra: &[&str]) -> Agent {
    let mut args: Vec<String> = [
        "run",
        "--interface",
        &format!("{HOST_IF}:uplink"),
        "--summary-interval",
        "1",
        "--control-plane",
        url,
        "--control-plane-plaintext",
        "--node-name",
        "node-a",
        "--state-dir",
        &state.display().to_string(),
        "--heartbeat",
        "1",
        "--report-interval",
        "1",
        "--status-interval",
        "1",
    ]
    .map(String::from)
    .to_vec();
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    Agent::start_with_args(ns, &args)
}

/// A policy message that blocks `cidr` globally; one account.
fn blocking(cidr: &str) -> proto::Policy {
    proto::Policy {
        global: Some(global_blocking(cidr)),
        defaults: None,
        accounts: vec![proto::Account {
            id: "alpha".into(),
            prefixes: vec!["10.77.0.10/32".into()],
            ..proto::Account::default()
        }],
    }
}

fn global_blocking(cidr: &str) -> proto::Global {
    proto::Global {
        block: vec![proto::List {
            name: Some("blk".into()),
            action: None,
            cidrs: vec![cidr.into()],
        }],
        ..proto::Global::default()
    }
}

/// Packets from `src` to ALPHA that arrive, of `packets` sent.
fn arrivals(topo: &Topology, src: IpAddr, packets: u64) -> u64 {
    topo.udp_arrivals(src, SocketAddr::new(ALPHA, PORT), packets)
}

fn hello_version(cp: &ScriptedControlPlane, from: usize) -> String {
    match cp
        .wait_for("hello", from, ANSWER, |b| matches!(b, Up::Hello(_)))
        .1
    {
        Up::Hello(h) => h.policy_version,
        _ => unreachable!(),
    }
}

fn acked(answer: &Up, version: &str) -> u64 {
    match answer {
        Up::Ack(a) if a.version == version => a.generation,
        other => panic!("expected an Ack of {version}, got {other:?}"),
    }
}

/// A remote the test's policies block.
fn blocked(remote: &str) -> bool {
    remote == "10.77.1.1/32" || remote == "10.77.2.1/32"
}

/// Blocked packets come back in a report (of 10.77.1.1 under v1 or of
/// 10.77.2.1 under v2: events are sampled per account, reason and second,
/// and both may fall in one second), and a status says v2 is in force at
/// `generation` and has dropped packets.
fn reports_and_status_arrive(cp: &ScriptedControlPlane, generation: u64) {
    let (_, report) = cp.wait_for(
        "a report of the blocked packets",
        0,
        ANSWER,
        |b| matches!(b, Up::Reports(r) if r.violations.iter().any(|v| blocked(&v.remote_prefix))),
    );
    let Up::Reports(r) = report else {
        unreachable!()
    };
    let v = r
        .violations
        .iter()
        .find(|v| blocked(&v.remote_prefix))
        .expect("found above");
    assert_eq!(
        (
            v.account.as_str(),
            v.reason.as_str(),
            v.verdict.as_str(),
            v.direction.as_str()
        ),
        ("alpha", "global_block", "drop", "inbound")
    );
    let (_, status) = cp.wait_for(
        "a status of v2",
        0,
        ANSWER,
        |b| matches!(b, Up::Status(s) if s.policy_version == "v2" && s.dropped > 0),
    );
    let Up::Status(s) = status else {
        unreachable!()
    };
    assert_eq!((s.generation, s.accounts), (generation, 1), "{s:?}");
}

/// A snapshot is applied and Acked, a delta that replaces the global
/// lists is applied and Acked, a delta on another base asks for a
/// snapshot, and an invalid or oversized snapshot is Nacked with its
/// problems while the last Acked policy stays in force — each checked with
/// packets. Violations come back as reports, and the state as status.
#[test]
fn snapshots_and_deltas_are_acked_enforced_or_nacked_with_reasons() {
    let _serial = serial();
    let topo = topology("cp-ack");
    let state = TempDir::new("state-ack");
    let cp = ScriptedControlPlane::serve(
        topo.host
            .tcp_listener("127.0.0.1:0".parse().expect("address")),
        None,
    );
    let agent = agent(
        &topo.host,
        &cp.url(),
        state.path(),
        &["--max-policy-bytes", "4000", "--max-accounts", "2"],
    );
    assert_eq!(
        hello_version(&cp, 0),
        "",
        "a new agent holds no control-plane version"
    );

    let g1 = acked(&cp.push_snapshot("v1", blocking("10.77.1.0/24")), "v1");
    assert_eq!(arrivals(&topo, FIRST, 50), 0, "v1 blocks 10.77.1.0/24");
    assert!(
        arrivals(&topo, SECOND, 50) > 40,
        "v1 lets 10.77.2.1 through"
    );

    let answer = cp.push_delta(proto::Delta {
        version: "v2".into(),
        base_version: "v1".into(),
        global: Some(global_blocking("10.77.2.0/24")),
        ..proto::Delta::default()
    });
    let g2 = acked(&answer, "v2");
    assert!(g2 > g1, "a new generation: {g1} then {g2}");
    assert_eq!(arrivals(&topo, SECOND, 50), 0, "v2 blocks 10.77.2.0/24");
    assert!(
        arrivals(&topo, FIRST, 50) > 40,
        "v2 no longer blocks 10.77.1.1"
    );

    match cp.push_delta(proto::Delta {
        version: "v3".into(),
        base_version: "v9".into(),
        ..proto::Delta::default()
    }) {
        Up::Nack(n) => {
            assert!(n.snapshot_required, "{n:?}");
            assert_eq!((n.enforced_version.as_str(), n.generation), ("v2", g2));
        }
        other => panic!("expected a Nack, got {other:?}"),
    }

    let mut bad = blocking("10.77.3.1/24");
    bad.accounts[0].limits = Some(proto::Limits {
        inbound: Some(proto::DirLimits {
            pps: Some("lots".into()),
            ..proto::DirLimits::default()
        }),
        outbound: None,
    });
    match cp.push_snapshot("v4", bad) {
        Up::Nack(n) => {
            let paths: Vec<&str> = n.problems.iter().map(|p| p.path.as_str()).collect();
            assert_eq!(
                paths,
                ["global.block[0].cidrs[0]", "accounts[0].limits.inbound.pps"],
                "{n:?}"
            );
            assert_eq!(n.enforced_version, "v2");
        }
        other => panic!("expected a Nack, got {other:?}"),
    }
    let mut big = blocking("10.77.2.0/24");
    big.global.as_mut().expect("global").block[0].cidrs = (0..400)
        .map(|i| format!("10.99.{}.{}/32", i / 200, i % 200))
        .collect();
    match cp.push_snapshot("v5", big) {
        Up::Nack(n) => assert!(
            n.problems
                .iter()
                .any(|p| p.message.contains("--max-policy-bytes 4000")),
            "{n:?}"
        ),
        other => panic!("expected a Nack, got {other:?}"),
    }
    over_twice_the_budget_ends_the_stream(&cp, &agent);
    more_accounts_than_the_map_holds_are_nacked_and_counted(&cp, &topo);
    assert_eq!(arrivals(&topo, SECOND, 50), 0, "v2 is still in force");

    reports_and_status_arrive(&cp, g2);
}

/// A message over twice `--max-policy-bytes 4000` is not read: the agent
/// ends the stream, says why, and dials again, saying the version still in
/// force.
fn over_twice_the_budget_ends_the_stream(cp: &ScriptedControlPlane, agent: &Agent) {
    let streams = cp.streams();
    let from = cp.received().len();
    let mut huge = blocking("10.77.2.0/24");
    huge.global.as_mut().expect("global").block[0].cidrs = (0..800)
        .map(|i| format!("10.99.{}.{}/32", i / 200, i % 200))
        .collect();
    cp.send(proto::control_message::Body::Snapshot(proto::Snapshot {
        version: "v6".into(),
        nonce: "n-v6".into(),
        policy: Some(huge),
    }));
    assert_eq!(hello_version(cp, from), "v2", "v2 is still in force");
    assert_eq!(cp.streams(), streams + 1, "a new stream");
    assert!(
        !cp.received()[from..].iter().any(|(_, m)| matches!(
            &m.body,
            Some(Up::Ack(proto::Ack { nonce, .. }) | Up::Nack(proto::Nack { nonce, .. })) if nonce == "n-v6"
        )),
        "an unread message gets no answer"
    );
    mmesh_tests::netns::wait_until("the reason in the log", ANSWER, || {
        agent
            .log_position("over the 8000 bytes this agent reads", 0)
            .is_some()
    });
}

/// More accounts than `--max-accounts 2` holds, in a snapshot and in a
/// delta that also replaces `global` (validated whole): each Nacked naming
/// the map and the option, and counted as an insert the map refused.
fn more_accounts_than_the_map_holds_are_nacked_and_counted(
    cp: &ScriptedControlPlane,
    topo: &Topology,
) {
    let extra: Vec<proto::Account> = (0..2)
        .map(|i| proto::Account {
            id: format!("extra-{i}"),
            prefixes: vec![format!("10.77.0.{}/32", 20 + i)],
            ..proto::Account::default()
        })
        .collect();
    let mut crowded = blocking("10.77.2.0/24");
    crowded.accounts.extend(extra.iter().cloned());
    let crowded_delta = proto::Delta {
        version: "v7".into(),
        base_version: "v2".into(),
        global: Some(global_blocking("10.77.2.0/24")),
        upsert_accounts: extra,
        ..proto::Delta::default()
    };
    let pushes: [Box<dyn FnOnce() -> Up>; 2] = [
        Box::new(|| cp.push_snapshot("v6", crowded)),
        Box::new(|| cp.push_delta(crowded_delta)),
    ];
    for (refused, push) in pushes.into_iter().enumerate() {
        let answer = push();
        match answer {
            Up::Nack(n) => {
                assert!(
                    n.problems.iter().any(|p| p.message.contains("map accounts")
                        && p.message.contains("--max-accounts 2")),
                    "{n:?}"
                );
            }
            other => panic!("expected a Nack, got {other:?}"),
        }
        let scrape = scrape::get(&topo.host, scrape::METRICS, "/metrics", ANSWER)
            .expect("scraping the agent")
            .body;
        assert_eq!(
            scrape::must_sample(&scrape, "mmesh_map_inserts_refused_total{map=\"accounts\"}")
                as u64,
            refused as u64 + 1,
            "{scrape}"
        );
    }
}

/// The last Acked policy is kept on disk (a snapshot whole, a delta
/// appended to a log after it): an agent started while the control plane
/// is down enforces it at once, says hello with its version
/// when the control plane comes back (which then has nothing to send), and
/// dials again, with the same version, when the stream is dropped or when
/// the control plane stops sending heartbeats.
#[test]
fn last_known_good_is_enforced_while_the_control_plane_is_down_and_resumed() {
    let _serial = serial();
    let topo = topology("cp-lkg");
    let state = TempDir::new("state-lkg");
    let listener = topo
        .host
        .tcp_listener("127.0.0.1:0".parse().expect("address"));
    let addr = listener.local_addr().expect("address");
    {
        let cp = ScriptedControlPlane::serve(listener, None);
        let mut first = agent(&topo.host, &cp.url(), state.path(), &[]);
        hello_version(&cp, 0);
        acked(&cp.push_snapshot("v1", blocking("10.77.1.0/24")), "v1");
        let store = Store::new(state.path());
        let kept = |versions: &[&str]| {
            store.load(1 << 20).ok().flatten().is_some_and(|s| {
                let kept: Vec<&str> = std::iter::once(s.base.version.as_str())
                    .chain(s.deltas.iter().map(|d| d.version.as_str()))
                    .collect();
                kept == versions
            })
        };
        mmesh_tests::netns::wait_until("v1 kept whole", ANSWER, || kept(&["v1"]));
        // A delta: appended to the log after the whole file v1.
        acked(
            &cp.push_delta(proto::Delta {
                version: "v2".into(),
                base_version: "v1".into(),
                global: Some(global_blocking("10.77.2.0/24")),
                ..proto::Delta::default()
            }),
            "v2",
        );
        mmesh_tests::netns::wait_until("v2 appended to the log", ANSWER, || kept(&["v1", "v2"]));
        let _ = first.stop();
    }
    // The control plane is gone: nothing listens on its port.
    let url = format!("http://{addr}");
    let agent = agent(&topo.host, &url, state.path(), &[]);
    assert!(
        agent
            .log_position("starting with the last-known-good policy", 0)
            .is_some(),
        "{:?}",
        agent.logs()
    );
    assert_eq!(
        arrivals(&topo, SECOND, 50),
        0,
        "v1 and its delta v2 enforced without the control plane"
    );
    assert!(arrivals(&topo, FIRST, 50) > 40, "v2 unblocked v1's block");
    assert!(arrivals(&topo, ORDINARY, 50) > 40);

    let cp = ScriptedControlPlane::serve(topo.host.tcp_listener(addr), None);
    assert_eq!(hello_version(&cp, 0), "v2", "the hello resumes with v2");
    let seen = cp.received().len();
    cp.disconnect();
    assert_eq!(
        hello_version(&cp, seen),
        "v2",
        "the agent dials again after a drop"
    );
    let streams = cp.streams();
    assert!(streams >= 2);
    let seen = cp.received().len();
    cp.set_silent(true);
    assert_eq!(
        hello_version(&cp, seen),
        "v2",
        "the agent dials again after silence"
    );
    assert!(cp.streams() > streams);
    mmesh_tests::netns::wait_until("the silence to be logged", ANSWER, || {
        agent.log_position("nothing received for", 0).is_some()
    });
    assert!(
        !cp.received()
            .iter()
            .any(|(_, m)| matches!(m.body, Some(Up::Ack(_) | Up::Nack(_)))),
        "nothing was sent, nothing answered"
    );
    assert_eq!(arrivals(&topo, SECOND, 50), 0, "v2 still enforced");
}

/// Control-plane options that cannot work are refused at start, naming the
/// option: an `http://` URL without `--control-plane-plaintext`, an
/// `https://` one without a CA, a CA file that cannot be read.
#[test]
fn unusable_control_plane_options_are_refused_at_start() {
    let _serial = serial();
    let ns = NetNs::create(&mmesh_tests::netns::unique_name("cp-args"));
    let cases: [(&[&str], &str); 3] = [
        (
            &["--control-plane", "http://127.0.0.1:1"],
            "--control-plane-plaintext",
        ),
        (
            &["--control-plane", "https://127.0.0.1:1"],
            "needs --control-plane-ca",
        ),
        (
            &[
                "--control-plane",
                "https://127.0.0.1:1",
                "--control-plane-ca",
                "/nonexistent/ca.pem",
            ],
            "--control-plane-ca /nonexistent/ca.pem",
        ),
    ];
    for (extra, expected) in cases {
        let mut args = vec!["run", "--interface", "lo", "--node-name", "n"];
        args.extend_from_slice(extra);
        let out = run_agent_to_exit(&ns, &args, ANSWER);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{extra:?}: {stderr}");
        assert!(stderr.contains(expected), "{extra:?}: {stderr}");
    }
}
