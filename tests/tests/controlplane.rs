//! The reference control plane (`mmesh-controlplane`) against agents played
//! by the test over the real protocol: a real server, real streams, on
//! loopback; no kernel needed.

use std::{path::Path, time::Duration};

use mmesh_agent::control::proto::{self, agent_message::Body as Up, control_message::Body as Down};
use mmesh_tests::{
    certs::TestCa,
    controlplane::{
        ClientTls, ControlPlane, EtcdServer, FakeAgent, TempDir, channel, hello, version_nonce,
    },
};
use serde_json::Value;

/// Long enough for a loaded machine; a test that passes never waits this.
const WAIT: Duration = Duration::from_secs(20);

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// A node's policy: three accounts, `b` limited to `pps`, and a global
/// block list from a shared file.
fn node_policy(pps: &str) -> String {
    format!(
        "version: v1
global:
  block:
    - name: shared-blocked
      file: ../shared/blocked.txt
accounts:
  - id: a
    prefixes: [10.0.0.1]
  - id: b
    prefixes: [10.0.0.2]
    limits: {{outbound: {{pps: {pps}}}}}
  - id: c
    prefixes: [10.0.0.3]
"
    )
}

const DEFAULT_POLICY: &str = "version: default-1
accounts:
  - id: z
    prefixes: [10.9.0.1]
";

/// A policy folder: nodes/web-1.yaml, default.yaml, shared/blocked.txt.
fn folder() -> TempDir {
    let dir = TempDir::new("cp");
    dir.write("shared/blocked.txt", "192.0.2.0/24\n");
    dir.write("nodes/web-1.yaml", &node_policy("1k"));
    dir.write("default.yaml", DEFAULT_POLICY);
    dir
}

fn start(dir: &Path, extra: &[&str]) -> ControlPlane {
    let mut args = vec!["--policies".to_owned(), dir.display().to_string()];
    args.extend(extra.iter().map(|a| (*a).to_owned()));
    ControlPlane::start(&args)
}

fn plain() -> ClientTls {
    ClientTls::default()
}

/// The version the control plane announced for `file` after line `mark`.
fn announced(cp: &mut ControlPlane, mark: usize, file: &str) -> String {
    let line = cp.wait_after(mark, &format!("a policy line for {file}"), WAIT, |l| {
        l["event"] == "policy" && l["file"] == file
    });
    line["version"].as_str().expect("a version").to_owned()
}

fn ids(accounts: &[proto::Account]) -> Vec<&str> {
    accounts.iter().map(|a| a.id.as_str()).collect()
}

fn snapshot(message: Down) -> proto::Snapshot {
    match message {
        Down::Snapshot(s) => s,
        other => panic!("expected a snapshot, got {other:?}"),
    }
}

fn delta(message: Down) -> proto::Delta {
    match message {
        Down::Delta(d) => d,
        other => panic!("expected a delta, got {other:?}"),
    }
}

#[test]
fn hello_gets_a_snapshot_and_a_resume_with_the_current_version_gets_nothing() {
    let dir = folder();
    let mut cp = start(dir.path(), &["--plaintext"]);
    let version = announced(&mut cp, 0, "nodes/web-1.yaml");
    assert!(version.starts_with("v1-"), "{version}");
    let default_version = announced(&mut cp, 0, "default.yaml");
    let rt = runtime();

    // A new agent gets the whole policy of its node, shared list included.
    let mut web = rt.block_on(async {
        let ch = channel(cp.addr, &plain()).await.expect("connecting");
        FakeAgent::connect(ch, hello("web-1", ""))
            .await
            .expect("a session")
    });
    let first = rt.block_on(web.next_policy(WAIT));
    rt.block_on(web.ack(&first, 1));
    let snap = snapshot(first);
    assert_eq!(snap.version, version);
    let policy = snap.policy.expect("a snapshot carries a policy");
    assert_eq!(ids(&policy.accounts), ["a", "b", "c"]);
    let global = policy.global.expect("global section");
    assert_eq!(global.block[0].cidrs, ["192.0.2.0/24"]);
    cp.wait_for("the ack", WAIT, |l| {
        l["event"] == "ack" && l["node"] == "web-1" && l["version"] == version.as_str()
    });

    // A node without a file of its own gets the default.
    let mut db = rt.block_on(async {
        let ch = channel(cp.addr, &plain()).await.expect("connecting");
        FakeAgent::connect(ch, hello("db-7", ""))
            .await
            .expect("a session")
    });
    let snap = snapshot(rt.block_on(db.next_policy(WAIT)));
    assert_eq!(snap.version, default_version);
    assert_eq!(ids(&snap.policy.expect("policy").accounts), ["z"]);

    // An agent that comes back holding the current version is sent
    // nothing: the first message it gets after a change is a Delta against
    // the version it resumed with (a Snapshot sent on its Hello would have
    // come first).
    let mark = cp.mark();
    let mut resumed = rt.block_on(async {
        let ch = channel(cp.addr, &plain()).await.expect("connecting");
        FakeAgent::connect(ch, hello("web-1", &version))
            .await
            .expect("a session")
    });
    cp.wait_after(mark, "the resumed agent's hello", WAIT, |l| {
        l["event"] == "connected" && l["policy_version"] == version.as_str()
    });
    let mark = cp.mark();
    dir.write("nodes/web-1.yaml", &node_policy("2k"));
    let changed = announced(&mut cp, mark, "nodes/web-1.yaml");
    let d = delta(rt.block_on(resumed.next_policy(WAIT)));
    assert_eq!(d.base_version, version);
    assert_eq!(d.version, changed);
    let d = delta(rt.block_on(web.next_policy(WAIT)));
    assert_eq!(d.base_version, version);
    let sent = cp.wait_after(mark, "the sent lines", WAIT, |l| {
        l["event"] == "sent" && l["kind"] == "delta" && l["version"] == changed.as_str()
    });
    assert_eq!(sent["node"], "web-1");
    assert_eq!(sent["accounts"], 1);
}

#[test]
fn a_file_change_sends_a_delta_with_only_what_changed() {
    let dir = folder();
    let cp = start(dir.path(), &["--plaintext"]);
    let rt = runtime();
    let mut agent = rt.block_on(async {
        let ch = channel(cp.addr, &plain()).await.expect("connecting");
        FakeAgent::connect(ch, hello("web-1", ""))
            .await
            .expect("a session")
    });
    let first = rt.block_on(agent.next_policy(WAIT));
    rt.block_on(agent.ack(&first, 1));
    let mut held = version_nonce(&first).0;

    // One account's limit: that account alone.
    dir.write("nodes/web-1.yaml", &node_policy("5k"));
    let d = delta(rt.block_on(agent.next_policy(WAIT)));
    assert_eq!(d.base_version, held);
    assert_eq!(ids(&d.upsert_accounts), ["b"]);
    let limits = d.upsert_accounts[0].limits.as_ref().expect("limits");
    let pps = limits.outbound.as_ref().and_then(|o| o.pps.as_deref());
    assert_eq!(pps, Some("5000"));
    assert!(d.remove_accounts.is_empty() && d.global.is_none(), "{d:?}");
    rt.block_on(agent.ack(&Down::Delta(d.clone()), 2));
    held = d.version;

    // An account removed: its id alone.
    dir.write(
        "nodes/web-1.yaml",
        &node_policy("5k").replace("  - id: c\n    prefixes: [10.0.0.3]\n", ""),
    );
    let d = delta(rt.block_on(agent.next_policy(WAIT)));
    assert_eq!(d.base_version, held);
    assert!(d.upsert_accounts.is_empty(), "{d:?}");
    assert_eq!(d.remove_accounts, ["c"]);
    rt.block_on(agent.ack(&Down::Delta(d.clone()), 3));
    held = d.version;

    // A shared list file (not a policy file) changed: the global section.
    dir.write("shared/blocked.txt", "192.0.2.0/24\n198.51.100.0/24\n");
    let d = delta(rt.block_on(agent.next_policy(WAIT)));
    assert_eq!(d.base_version, held);
    assert!(
        d.upsert_accounts.is_empty() && d.remove_accounts.is_empty(),
        "{d:?}"
    );
    let global = d.global.expect("the global section changed");
    assert_eq!(global.block[0].cidrs, ["192.0.2.0/24", "198.51.100.0/24"]);
}

#[test]
fn an_invalid_file_is_logged_and_the_previous_version_still_served() {
    let dir = folder();
    let mut cp = start(dir.path(), &["--plaintext"]);
    let version = announced(&mut cp, 0, "nodes/web-1.yaml");
    let rt = runtime();
    let mut agent = rt.block_on(async {
        let ch = channel(cp.addr, &plain()).await.expect("connecting");
        FakeAgent::connect(ch, hello("web-1", ""))
            .await
            .expect("a session")
    });
    let first = rt.block_on(agent.next_policy(WAIT));
    rt.block_on(agent.ack(&first, 1));

    let mark = cp.mark();
    dir.write("nodes/web-1.yaml", &node_policy("lots"));
    let invalid = cp.wait_after(mark, "the invalid file's line", WAIT, |l| {
        l["event"] == "policy_invalid" && l["file"] == "nodes/web-1.yaml"
    });
    assert_eq!(invalid["serving"], version.as_str());
    let error = invalid["error"].as_str().expect("an error");
    assert!(error.contains("accounts[1].limits.outbound.pps"), "{error}");
    assert!(
        cp.log().contains("nodes/web-1.yaml rejected"),
        "{}",
        cp.log()
    );

    // A new agent still gets the previous version.
    let mut late = rt.block_on(async {
        let ch = channel(cp.addr, &plain()).await.expect("connecting");
        FakeAgent::connect(ch, hello("web-1", ""))
            .await
            .expect("a session")
    });
    assert_eq!(
        snapshot(rt.block_on(late.next_policy(WAIT))).version,
        version
    );

    // Fixed: the next message the first agent gets is the fix.
    dir.write("nodes/web-1.yaml", &node_policy("3k"));
    let d = delta(rt.block_on(agent.next_policy(WAIT)));
    assert_eq!(d.base_version, version);
    assert_eq!(ids(&d.upsert_accounts), ["b"]);
}

#[test]
fn nacks_are_recorded_and_a_nack_asking_for_a_snapshot_gets_one() {
    let dir = folder();
    let out = TempDir::new("cp-status");
    let status_file = out.path().join("status.json");
    let mut cp = start(
        dir.path(),
        &[
            "--plaintext",
            "--status-file",
            status_file.to_str().expect("UTF-8 path"),
        ],
    );
    let rt = runtime();
    let mut agent = rt.block_on(async {
        let ch = channel(cp.addr, &plain()).await.expect("connecting");
        FakeAgent::connect(ch, hello("web-1", ""))
            .await
            .expect("a session")
    });
    let refused = rt.block_on(agent.next_policy(WAIT));
    let (refused_version, nonce) = version_nonce(&refused);
    rt.block_on(agent.send(Up::Nack(proto::Nack {
        nonce,
        version: refused_version.clone(),
        enforced_version: String::new(),
        generation: 0,
        problems: vec![
            proto::Problem {
                path: "accounts[1].limits.outbound.pps".into(),
                message: "too fast".into(),
            },
            proto::Problem {
                path: String::new(),
                message: "3 accounts, capacity 2".into(),
            },
        ],
        snapshot_required: false,
    })));
    let nack = cp.wait_for("the nack line", WAIT, |l| l["event"] == "nack");
    assert_eq!(nack["node"], "web-1");
    assert_eq!(nack["version"], refused_version.as_str());
    assert_eq!(nack["enforced_version"], "");
    let problems: Vec<(&str, &str)> = nack["problems"]
        .as_array()
        .expect("problems")
        .iter()
        .map(|p| {
            (
                p["path"].as_str().unwrap_or("?"),
                p["message"].as_str().unwrap_or("?"),
            )
        })
        .collect();
    assert_eq!(
        problems,
        [
            ("accounts[1].limits.outbound.pps", "too fast"),
            ("", "3 accounts, capacity 2")
        ]
    );

    let status = wait_status(&status_file, "the nack in the status file", |s| {
        s["web-1"]["last_reply"] == "nack"
    });
    let recorded = &status["web-1"]["nacked"];
    assert_eq!(recorded["version"], refused_version.as_str());
    assert_eq!(
        recorded["problems"][0]["path"],
        "accounts[1].limits.outbound.pps"
    );
    assert_eq!(recorded["problems"][1]["message"], "3 accounts, capacity 2");
    assert_eq!(status["web-1"]["streams"], 1);

    // The refused version is not sent again: the next message is the
    // changed policy, whole (the agent holds no version this stream sent).
    dir.write("nodes/web-1.yaml", &node_policy("7k"));
    let next = rt.block_on(agent.next_policy(WAIT));
    let snap = snapshot(next.clone());
    assert_ne!(snap.version, refused_version);
    rt.block_on(agent.ack(&next, 1));
    let status = wait_status(&status_file, "the ack in the status file", |s| {
        s["web-1"]["last_reply"] == "ack"
    });
    assert_eq!(status["web-1"]["acked"]["version"], snap.version.as_str());
    assert_eq!(status["web-1"]["enforced"], snap.version.as_str());

    // A delta the agent cannot apply to what it holds: it asks for a
    // snapshot and gets one, of the same version.
    dir.write("nodes/web-1.yaml", &node_policy("8k"));
    let d = delta(rt.block_on(agent.next_policy(WAIT)));
    rt.block_on(agent.send(Up::Nack(proto::Nack {
        nonce: d.nonce.clone(),
        version: d.version.clone(),
        enforced_version: snap.version.clone(),
        generation: 1,
        problems: vec![proto::Problem {
            path: String::new(),
            message: "base version is not the one enforced".into(),
        }],
        snapshot_required: true,
    })));
    let again = snapshot(rt.block_on(agent.next_policy(WAIT)));
    assert_eq!(again.version, d.version);
    assert_ne!(again.nonce, d.nonce);
}

/// The status file's content once `pred` holds for it.
fn wait_status(path: &Path, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let status = std::fs::read_to_string(path)
            .ok()
            .and_then(|text| serde_json::from_str::<Value>(&text).ok());
        match status {
            Some(status) if pred(&status) => return status,
            other => assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting for {what}: {other:?}"
            ),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn an_agent_without_deltas_gets_snapshots_and_a_removed_node_file_falls_back_to_the_default() {
    let dir = folder();
    let mut cp = start(dir.path(), &["--plaintext"]);
    let default_version = announced(&mut cp, 0, "default.yaml");
    let rt = runtime();
    let mut agent = rt.block_on(async {
        let ch = channel(cp.addr, &plain()).await.expect("connecting");
        let mut old = hello("web-1", "");
        old.accepts.clear();
        FakeAgent::connect(ch, old).await.expect("a session")
    });
    let first = rt.block_on(agent.next_policy(WAIT));
    rt.block_on(agent.ack(&first, 1));

    let mark = cp.mark();
    dir.write("nodes/web-1.yaml", &node_policy("6k"));
    let changed = announced(&mut cp, mark, "nodes/web-1.yaml");
    let next = rt.block_on(agent.next_policy(WAIT));
    rt.block_on(agent.ack(&next, 2));
    assert_eq!(
        snapshot(next).version,
        changed,
        "a whole snapshot, not a delta"
    );

    let mark = cp.mark();
    std::fs::remove_file(dir.path().join("nodes/web-1.yaml")).expect("removing the node's file");
    cp.wait_after(mark, "the removal", WAIT, |l| {
        l["event"] == "policy_removed" && l["file"] == "nodes/web-1.yaml"
    });
    let fallback = snapshot(rt.block_on(agent.next_policy(WAIT)));
    assert_eq!(fallback.version, default_version);
    assert_eq!(ids(&fallback.policy.expect("policy").accounts), ["z"]);
}

#[test]
fn reports_and_status_from_agents_are_printed() {
    let dir = folder();
    let mut cp = start(dir.path(), &["--plaintext"]);
    let rt = runtime();
    let mut agent = rt.block_on(async {
        let ch = channel(cp.addr, &plain()).await.expect("connecting");
        FakeAgent::connect(ch, hello("web-1", ""))
            .await
            .expect("a session")
    });
    let first = rt.block_on(agent.next_policy(WAIT));
    let (version, _) = version_nonce(&first);
    rt.block_on(agent.ack(&first, 4));
    rt.block_on(agent.send(Up::Reports(proto::Reports {
        violations: vec![proto::Violation {
            account: "b".into(),
            reason: "rate_pps".into(),
            verdict: "drop".into(),
            direction: "outbound".into(),
            remote_prefix: "198.51.100.7/32".into(),
            events: 12,
            first_unix_ms: 1_000,
            last_unix_ms: 2_000,
        }],
        coarsened: 3,
        dropped: 1,
    })));
    rt.block_on(agent.send(Up::Status(proto::Status {
        policy_version: version.clone(),
        generation: 4,
        packets: 1_000,
        dropped: 12,
        attached: vec!["eth0:uplink:xdp".into()],
        ..proto::Status::default()
    })));
    let report = cp.wait_for("the report line", WAIT, |l| l["event"] == "report");
    assert_eq!(report["node"], "web-1");
    assert_eq!(report["coarsened"], 3);
    assert_eq!(report["dropped"], 1);
    let v = &report["violations"][0];
    assert_eq!(
        (&v["account"], &v["reason"], &v["verdict"], &v["direction"]),
        (
            &"b".into(),
            &"rate_pps".into(),
            &"drop".into(),
            &"outbound".into()
        )
    );
    assert_eq!(
        (&v["remote_prefix"], &v["events"]),
        (&"198.51.100.7/32".into(), &12.into())
    );
    let status = cp.wait_for("the status line", WAIT, |l| l["event"] == "status");
    assert_eq!(status["node"], "web-1");
    assert_eq!(status["policy_version"], version.as_str());
    assert_eq!(
        (&status["packets"], &status["dropped"]),
        (&1_000.into(), &12.into())
    );
    assert_eq!(status["attached"][0], "eth0:uplink:xdp");
}

#[test]
fn a_snapshot_past_the_customary_4_mib_grpc_limit_is_sent_whole() {
    const ACCOUNTS: u32 = 100_000;
    let dir = TempDir::new("cp-big");
    let accounts: Vec<String> = (0..ACCOUNTS)
        .map(|i| {
            format!(
                r#"{{"id":"acct-{i}","prefixes":["10.{}.{}.{}"],"limits":{{"outbound":{{"pps":"1k"}}}}}}"#,
                i >> 16,
                (i >> 8) & 0xff,
                i & 0xff
            )
        })
        .collect();
    dir.write(
        "default.json",
        &format!(r#"{{"version":"big","accounts":[{}]}}"#, accounts.join(",")),
    );
    let mut cp = start(dir.path(), &["--plaintext"]);
    let version = announced(&mut cp, 0, "default.json");
    let rt = runtime();
    let mut agent = rt.block_on(async {
        let ch = channel(cp.addr, &plain()).await.expect("connecting");
        FakeAgent::connect(ch, hello("any", ""))
            .await
            .expect("a session")
    });
    let snap = snapshot(rt.block_on(agent.next_policy(WAIT)));
    assert_eq!(snap.version, version);
    let policy = snap.policy.expect("policy");
    let size = prost::Message::encoded_len(&policy);
    assert!(size > 4 << 20, "{size} bytes");
    assert_eq!(policy.accounts.len(), ACCOUNTS as usize);
    assert_eq!(
        policy.accounts[ACCOUNTS as usize - 1].prefixes,
        ["10.1.134.159/32"]
    );
}

#[test]
fn a_silent_agent_is_disconnected_after_three_heartbeats() {
    let dir = folder();
    let mut cp = start(dir.path(), &["--plaintext", "--heartbeat", "0.2"]);
    let rt = runtime();
    let mut agent = rt.block_on(async {
        let ch = channel(cp.addr, &plain()).await.expect("connecting");
        FakeAgent::connect(ch, hello("web-1", ""))
            .await
            .expect("a session")
    });
    let _ = rt.block_on(agent.next_policy(WAIT));
    // The control plane's heartbeats arrive; the agent sends none.
    let beat = rt.block_on(agent.next(WAIT)).expect("a heartbeat");
    assert!(matches!(beat, Down::Heartbeat(_)), "{beat:?}");
    let gone = cp.wait_for("the silent agent's disconnection", WAIT, |l| {
        l["event"] == "disconnected" && l["node"] == "web-1"
    });
    let reason = gone["reason"].as_str().expect("a reason");
    assert!(reason.contains("no message"), "{reason}");
    // Its stream ends.
    rt.block_on(async {
        loop {
            match agent.next(WAIT).await {
                Ok(Down::Heartbeat(_)) => {}
                Ok(other) => panic!("unexpected {other:?}"),
                Err(_) => break,
            }
        }
    });
}

#[test]
fn sigterm_ends_every_stream_and_exits() {
    let dir = folder();
    let mut cp = start(dir.path(), &["--plaintext"]);
    let rt = runtime();
    let mut agent = rt.block_on(async {
        let ch = channel(cp.addr, &plain()).await.expect("connecting");
        FakeAgent::connect(ch, hello("web-1", ""))
            .await
            .expect("a session")
    });
    let _ = rt.block_on(agent.next_policy(WAIT));
    let status = cp.terminate(WAIT).expect("the control plane exits");
    assert!(status.success(), "{status}");
    let gone = cp.wait_for("the disconnection", WAIT, |l| l["event"] == "disconnected");
    assert_eq!(gone["reason"], "the control plane is shutting down");
    let end = rt.block_on(async {
        loop {
            match agent.next(WAIT).await {
                Ok(Down::Heartbeat(_)) => {}
                other => break other,
            }
        }
    });
    assert!(end.is_err(), "{end:?}");
}

#[test]
fn without_tls_or_plaintext_it_refuses_to_start() {
    let dir = folder();
    let out = std::process::Command::new(mmesh_tests::controlplane::controlplane_binary())
        .args(["--policies".as_ref(), dir.path().as_os_str()])
        .args(["--listen", "127.0.0.1:0"])
        .output()
        .expect("running mmesh-controlplane");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--plaintext"), "{stderr}");
}

#[test]
fn mutual_tls_refuses_clients_without_a_certificate_of_the_pinned_ca() {
    let dir = folder();
    let certs = TempDir::new("cp-certs");
    let ca = TestCa::new("mmesh test CA");
    let other = TestCa::new("another CA");
    let ca_file = ca.write(certs.path(), "ca");
    let (cert, key) = ca
        .server(&["localhost", "127.0.0.1"])
        .write(certs.path(), "server");
    let mut cp = start(
        dir.path(),
        &[
            "--tls-cert",
            cert.to_str().expect("UTF-8 path"),
            "--tls-key",
            key.to_str().expect("UTF-8 path"),
            "--client-ca",
            ca_file.to_str().expect("UTF-8 path"),
        ],
    );
    assert_eq!(
        cp.wait_for("listening", WAIT, |l| l["event"] == "listening")["mutual_tls"],
        true
    );
    let rt = runtime();
    let attempt = |tls: ClientTls, node: &'static str| {
        rt.block_on(async {
            let ch = channel(cp.addr, &tls)
                .await
                .map_err(|e| format!("connect: {e}"))?;
            let mut agent = FakeAgent::connect(ch, hello(node, ""))
                .await
                .map_err(|e| format!("session: {e}"))?;
            agent.next(WAIT).await
        })
    };
    let trusted = ClientTls {
        ca_pem: Some(ca.cert_pem()),
        identity: None,
    };
    let refused = [
        (trusted.clone(), "no-cert"),
        (
            ClientTls {
                identity: Some(other.client("other-ca")),
                ..trusted.clone()
            },
            "other-ca",
        ),
        (plain(), "plaintext"),
    ];
    for (tls, node) in refused {
        let result = attempt(tls, node);
        assert!(result.is_err(), "{node} was served: {result:?}");
    }
    let good = attempt(
        ClientTls {
            identity: Some(ca.client("web-1")),
            ..trusted
        },
        "web-1",
    );
    assert!(matches!(good, Ok(Down::Snapshot(_))), "{good:?}");
    // Event lines are written by a thread of their own, a moment after the
    // fact; in order, so the refused clients' lines would be before it.
    cp.wait_for("web-1's connected line", Duration::from_secs(10), |l| {
        l["event"] == "connected" && l["node"] == "web-1"
    });
    let connected: Vec<Value> = cp
        .lines()
        .into_iter()
        .filter(|l| l["event"] == "connected")
        .collect();
    assert_eq!(connected.len(), 1, "{connected:?}");
    assert_eq!(connected[0]["node"], "web-1");
}

#[test]
fn two_replicas_on_one_etcd_serve_the_same_version() {
    let etcd = EtcdServer::start();
    let client = etcd.client();
    let rt = runtime();
    let put = |key: &str, value: &str| {
        rt.block_on(client.put(&format!("/mmesh/policies/{key}"), value.as_bytes()))
            .expect("etcd put");
    };
    put("shared/blocked.txt", "192.0.2.0/24\n");
    put("nodes/web-1.yaml", &node_policy("1k"));
    put("default.yaml", DEFAULT_POLICY);
    let args = ["--etcd", etcd.url.as_str(), "--plaintext"];
    let mut replicas = [ControlPlane::start(&args), ControlPlane::start(&args)];
    let versions: Vec<String> = replicas
        .iter_mut()
        .map(|cp| announced(cp, 0, "nodes/web-1.yaml"))
        .collect();
    assert_eq!(versions[0], versions[1]);

    // An agent on each replica gets the same version, shared list included.
    let mut agents: Vec<FakeAgent> = replicas
        .iter()
        .map(|cp| {
            rt.block_on(async {
                let ch = channel(cp.addr, &plain()).await.expect("connecting");
                FakeAgent::connect(ch, hello("web-1", ""))
                    .await
                    .expect("a session")
            })
        })
        .collect();
    for agent in &mut agents {
        let first = rt.block_on(agent.next_policy(WAIT));
        rt.block_on(agent.ack(&first, 1));
        let snap = snapshot(first);
        assert_eq!(snap.version, versions[0]);
        let global = snap.policy.and_then(|p| p.global).expect("global section");
        assert_eq!(global.block[0].cidrs, ["192.0.2.0/24"]);
    }

    // A changed key: the same delta from both.
    put("nodes/web-1.yaml", &node_policy("4k"));
    let deltas: Vec<proto::Delta> = agents
        .iter_mut()
        .map(|agent| delta(rt.block_on(agent.next_policy(WAIT))))
        .collect();
    assert_eq!(deltas[0].version, deltas[1].version);
    assert_ne!(deltas[0].version, versions[0]);
    for d in &deltas {
        assert_eq!(d.base_version, versions[0]);
        assert_eq!(ids(&d.upsert_accounts), ["b"]);
    }

    // An invalid value is refused by both, which keep serving the last
    // good version.
    let marks: Vec<usize> = replicas.iter().map(ControlPlane::mark).collect();
    put("nodes/web-1.yaml", &node_policy("lots"));
    for (cp, mark) in replicas.iter_mut().zip(marks) {
        let line = cp.wait_after(mark, "the invalid key's line", WAIT, |l| {
            l["event"] == "policy_invalid" && l["file"] == "nodes/web-1.yaml"
        });
        assert_eq!(line["serving"], deltas[0].version.as_str());
        let error = line["error"].as_str().expect("an error");
        assert!(
            error.contains("/mmesh/policies/nodes/web-1.yaml:"),
            "the key is named: {error}"
        );
    }
}

#[test]
fn with_verify_node_name_an_agent_gets_only_the_node_its_certificate_names() {
    let dir = folder();
    let certs = TempDir::new("cp-names");
    let ca = TestCa::new("mmesh test CA");
    let ca_file = ca.write(certs.path(), "ca");
    let (cert, key) = ca.server(&["localhost"]).write(certs.path(), "server");
    let mut cp = start(
        dir.path(),
        &[
            "--tls-cert",
            cert.to_str().expect("UTF-8 path"),
            "--tls-key",
            key.to_str().expect("UTF-8 path"),
            "--client-ca",
            ca_file.to_str().expect("UTF-8 path"),
            "--verify-node-name",
        ],
    );
    let rt = runtime();
    let tls = ClientTls {
        ca_pem: Some(ca.cert_pem()),
        identity: Some(ca.client("web-1")),
    };
    let attempt = |node: &str| {
        rt.block_on(async {
            let ch = channel(cp.addr, &tls)
                .await
                .map_err(|e| format!("connect: {e}"))?;
            let mut agent = FakeAgent::connect(ch, hello(node, ""))
                .await
                .map_err(|e| format!("session: {e}"))?;
            agent.next(WAIT).await
        })
    };
    let own = attempt("web-1");
    assert!(matches!(own, Ok(Down::Snapshot(_))), "{own:?}");
    let other = attempt("db-7").expect_err("another node's policy is refused");
    assert!(
        other.contains("PermissionDenied") || other.contains("permission"),
        "{other}"
    );
    assert!(
        other.contains("not a name of the client's certificate"),
        "{other}"
    );
    let refused = cp.wait_for("the refusal", WAIT, |l| {
        l["event"] == "disconnected" && l["node"] == ""
    });
    assert!(
        refused["reason"]
            .as_str()
            .is_some_and(|r| r.contains("db-7")),
        "{refused}"
    );
}
