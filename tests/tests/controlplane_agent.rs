//! The real agent and the reference control plane together, over mutual
//! TLS: both processes in a test namespace, policy from a watched folder,
//! real UDP traffic through the veth pair to check what is enforced.
//!
//! Needs root. Bounded in packets and time.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::Path,
    time::Duration,
};

use mmesh_tests::{
    certs::TestCa,
    controlplane::{ControlPlane, TempDir},
    netns::{Agent, HOST_IF, Topology},
};

const ALPHA: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 77, 0, 10));
const FIRST: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 77, 1, 1));
const SECOND: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 77, 2, 1));
const PORT: u16 = 5000;
const WAIT: Duration = Duration::from_mins(1);

/// Node `node-a`'s policy: account alpha, and a global block list of
/// `blocked`, from a shared list file.
fn node_policy(version: &str) -> String {
    format!(
        "version: {version}
global:
  block:
    - name: shared
      file: ../shared/blocked.txt
accounts:
  - id: alpha
    prefixes: [10.77.0.10]
"
    )
}

/// Packets from `src` to ALPHA that arrive, of `packets` sent.
fn arrivals(topo: &Topology, src: IpAddr, packets: u64) -> u64 {
    topo.udp_arrivals(src, SocketAddr::new(ALPHA, PORT), packets)
}

/// `mmesh-agent run` on the veth's host end, with the control plane on
/// `port` of the namespace's loopback, trusting `ca` and presenting `cert`
/// and `key`; heartbeats, reports and status every second.
fn agent_args(port: u16, [ca, cert, key]: [&Path; 3], state: &Path) -> Vec<String> {
    [
        "run",
        "--interface",
        &format!("{HOST_IF}:uplink"),
        "--control-plane",
        &format!("https://127.0.0.1:{port}"),
        "--control-plane-ca",
        &ca.display().to_string(),
        "--control-plane-cert",
        &cert.display().to_string(),
        "--control-plane-key",
        &key.display().to_string(),
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
    .to_vec()
}

/// The agent takes a snapshot from the reference control plane and ACKs it,
/// a change of a shared list file reaches it as a delta that it applies and
/// ACKs, and its violation reports and status come back — each step checked
/// with packets and with the control plane's output lines.
#[test]
fn the_agent_enforces_what_the_reference_control_plane_serves() {
    let topo = Topology::new("cp-ref");
    topo.add_host_addrs(&[ALPHA]);
    topo.add_remote_addrs(&[FIRST, SECOND]);

    let policies = TempDir::new("cp-ref-policies");
    policies.write("shared/blocked.txt", "10.77.1.0/24\n");
    policies.write("nodes/node-a.yaml", &node_policy("v1"));
    let certs = TempDir::new("cp-ref-certs");
    let ca = TestCa::new("mmesh test CA");
    let ca_file = ca.write(certs.path(), "ca");
    let (server_cert, server_key) = ca
        .server(&["localhost", "127.0.0.1"])
        .write(certs.path(), "server");
    let (client_cert, client_key) = ca.client("node-a").write(certs.path(), "node-a");
    let path = |p: &Path| p.display().to_string();

    let mut cp = ControlPlane::start_in(
        &topo.host,
        &[
            "--policies".into(),
            path(policies.path()),
            "--tls-cert".into(),
            path(&server_cert),
            "--tls-key".into(),
            path(&server_key),
            "--client-ca".into(),
            path(&ca_file),
            // The agent's interval below: each side times the other out
            // after three of its own.
            "--heartbeat".into(),
            "1".into(),
        ],
    );
    let v1 = cp.wait_for("v1 read", WAIT, |l| {
        l["event"] == "policy" && l["file"] == "nodes/node-a.yaml"
    })["version"]
        .as_str()
        .expect("a version")
        .to_owned();

    let state = TempDir::new("cp-ref-state");
    let args = agent_args(
        cp.addr.port(),
        [&ca_file, &client_cert, &client_key],
        state.path(),
    );
    let _agent = Agent::start_with_args(&topo.host, &args);

    let connected = cp.wait_for("the agent's hello", WAIT, |l| l["event"] == "connected");
    assert_eq!(
        (&connected["node"], &connected["policy_version"]),
        (&"node-a".into(), &"".into())
    );
    cp.wait_for("the snapshot's ack", WAIT, |l| {
        l["event"] == "ack" && l["node"] == "node-a" && l["version"] == v1.as_str()
    });
    assert_eq!(arrivals(&topo, FIRST, 50), 0, "v1 blocks 10.77.1.0/24");
    assert!(
        arrivals(&topo, SECOND, 50) > 40,
        "v1 lets 10.77.2.1 through"
    );

    // The shared list changes: a delta of the global section.
    let mark = cp.mark();
    policies.write("shared/blocked.txt", "10.77.2.0/24\n");
    let sent = cp.wait_after(mark, "the delta", WAIT, |l| {
        l["event"] == "sent" && l["node"] == "node-a"
    });
    assert_eq!(
        (&sent["kind"], &sent["global"], &sent["accounts"]),
        (&"delta".into(), &true.into(), &0.into())
    );
    let v2 = sent["version"].as_str().expect("a version").to_owned();
    let ack = cp.wait_after(mark, "the delta's ack", WAIT, |l| {
        l["event"] == "ack" && l["version"] == v2.as_str()
    });
    assert!(ack["generation"].as_u64() > Some(0), "{ack}");
    assert_eq!(arrivals(&topo, SECOND, 50), 0, "v2 blocks 10.77.2.0/24");
    assert!(arrivals(&topo, FIRST, 50) > 40, "v2 lets 10.77.1.1 through");

    // Events are sampled per (account, reason) and second: the blocked
    // packets of v1 and v2 may share one second's budget, so the report
    // names either source (both were dropped by a global block).
    let report = cp.wait_for("a report of the blocked packets", WAIT, |l| {
        l["event"] == "report"
            && l["violations"].as_array().is_some_and(|v| {
                v.iter().any(|v| {
                    v["reason"] == "global_block"
                        && (v["remote_prefix"] == "10.77.2.1/32"
                            || v["remote_prefix"] == "10.77.1.1/32")
                })
            })
    });
    assert_eq!(report["node"], "node-a");
    cp.wait_after(mark, "a status of v2", WAIT, |l| {
        l["event"] == "status" && l["policy_version"] == v2.as_str()
    });
}
