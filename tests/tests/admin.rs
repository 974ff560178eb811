//! End to end: the admin socket and its commands (`status`, `events`,
//! `top`, `maps`, `policy show --running`) against a running agent in a
//! test namespace, in text and in JSON, while real UDP traffic crosses the
//! host end of a veth pair; the per-account top-offender metric; the
//! socket refuses a user that is not root (by its mode, and by the peer's
//! credentials when the mode lets one through); a clear error when no agent
//! answers; one agent per socket; and an `events --follow` client that
//! stops reading loses events, counted and told, without slowing
//! enforcement or the other consumers.
//!
//! Needs root. One test at a time; each is bounded in packets and time, and
//! polls with deadlines.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    os::unix::{fs::PermissionsExt as _, net::UnixStream, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use mmesh_tests::netns::{
    Agent, HOST_IF, NetNs, Pace, PolicyFile, Topology, UdpSink, agent_binary, run_agent_to_exit,
    send_udp, serial, unique_name, wait_until,
};
use serde_json::Value;

const ALPHA: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 77, 0, 10));
const BETA: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 77, 0, 11));
const ORDINARY: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 77, 0, 100));
/// In the global block list.
const BLOCKED: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 77, 1, 1));
const PORT: u16 = 5000;
/// Blocked packets to alpha, and to beta: alpha is the top offender.
const TO_ALPHA: u64 = 40;
const TO_BETA: u64 = 10;
/// `nobody`.
const NOBODY: u32 = 65_534;
const DEADLINE: Duration = Duration::from_secs(15);
const METRICS: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9464);

const POLICY: &str = "version: admin-test
global:
  events_per_second: 1000000
  block:
    - name: blk
      cidrs: [10.77.1.0/24]
accounts:
  - id: alpha
    prefixes: [10.77.0.10/32]
  - id: beta
    prefixes: [10.77.0.11/32]
";

/// A directory of the test's own for the admin socket (mode 0700, as the
/// agent would make it), removed when dropped.
struct SocketDir(PathBuf);

impl SocketDir {
    fn new(tag: &str) -> Self {
        let dir = PathBuf::from("/run/mmesh-tests").join(unique_name(&format!("adm-{tag}")));
        let _ = std::fs::remove_dir_all(&dir);
        // The agent makes it: missing directories are its to create.
        Self(dir)
    }

    fn socket(&self) -> PathBuf {
        self.0.join("admin.sock")
    }
}

impl Drop for SocketDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn topology(tag: &str) -> Topology {
    let topo = Topology::new(tag);
    topo.add_host_addrs(&[ALPHA, BETA]);
    topo.add_remote_addrs(&[ORDINARY, BLOCKED]);
    topo
}

fn start(topo: &Topology, policy: &PolicyFile, socket: &Path, extra: &[&str]) -> Agent {
    let socket = socket.display().to_string();
    let mut args = policy.uplink_run_args(&["--admin-socket", &socket]);
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    Agent::start_with_args(&topo.host, &args)
}

/// `mmesh-agent ARGS --admin-socket SOCKET`, run to its end (bounded).
fn cli(socket: &Path, args: &[&str]) -> Output {
    cli_as(socket, args, None)
}

/// As [`cli`], as user `uid` when given.
fn cli_as(socket: &Path, args: &[&str], uid: Option<u32>) -> Output {
    let mut cmd = Command::new(agent_binary());
    cmd.args(args)
        .arg("--admin-socket")
        .arg(socket)
        .env("MMESH_LOG_FORMAT", "text")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(uid) = uid {
        // SAFETY: setgid/setuid are async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(uid) != 0
                    || libc::setuid(uid) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let child = cmd.spawn().expect("starting mmesh-agent");
    let pid = child.id();
    // A watchdog: a command that hangs is a failure, not a stuck test.
    let done = Arc::new(AtomicU64::new(0));
    let watchdog = {
        let done = done.clone();
        std::thread::spawn(move || {
            let deadline = Instant::now() + DEADLINE;
            while done.load(Ordering::Relaxed) == 0 {
                if Instant::now() >= deadline {
                    // SAFETY: a signal to the child we started.
                    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let out = child.wait_with_output().expect("waiting for mmesh-agent");
    done.store(1, Ordering::Relaxed);
    let _ = watchdog.join();
    out
}

#[track_caller]
fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "failed ({}): stdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).expect("UTF-8 output")
}

#[track_caller]
fn json(out: &Output) -> Value {
    let text = ok(out);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}):\n{text}"))
}

#[track_caller]
fn failed(out: &Output) -> String {
    assert!(
        !out.status.success(),
        "succeeded but should not have: stdout:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Sends `packets` datagrams from `src` to `dst`; returns what arrived.
fn send(topo: &Topology, src: IpAddr, dst: IpAddr, packets: u64, pps: u64) -> u64 {
    let sink = UdpSink::bind(&topo.host, SocketAddr::new(dst, PORT));
    let socket = topo.remote.udp_socket(SocketAddr::new(src, 0));
    let _sent = send_udp(
        &socket,
        sink.local_addr(),
        Pace {
            pps,
            packets,
            payload: 64,
        },
    );
    sink.finish(Duration::from_millis(250)).packets_from(src)
}

/// `GET /metrics` in `ns`.
fn scrape(ns: &NetNs) -> String {
    let mut stream = ns
        .tcp_connect(IpAddr::V4(Ipv4Addr::LOCALHOST), METRICS, DEADLINE)
        .expect("connecting to the metrics endpoint");
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).unwrap();
    raw
}

fn top_rows(top: &Value) -> Vec<(String, u64)> {
    top["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| {
            (
                r["key"].as_str().unwrap().to_owned(),
                r["packets"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// Runs `mmesh-agent top --interval 0.2` on a pseudo-terminal until it has
/// drawn two screens and returns what each refresh drew (the screen is
/// cleared before each).
fn top_on_a_terminal(socket: &Path) -> Vec<String> {
    use std::os::fd::{FromRawFd as _, OwnedFd};
    let (mut controller, mut terminal) = (-1, -1);
    // SAFETY: out-pointers for two fds; no name, settings or size.
    let opened = unsafe {
        libc::openpty(
            &raw mut controller,
            &raw mut terminal,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(opened, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: fresh fds that nothing else owns.
    let (controller, terminal) = unsafe {
        (
            OwnedFd::from_raw_fd(controller),
            OwnedFd::from_raw_fd(terminal),
        )
    };
    let mut child = Command::new(agent_binary())
        .args(["top", "--interval", "0.2", "--admin-socket"])
        .arg(socket)
        .stdin(Stdio::null())
        .stdout(terminal.try_clone().unwrap())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(terminal);
    let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
    let reader = std::thread::spawn(move || {
        let mut controller = std::fs::File::from(controller);
        let mut buf = [0u8; 4096];
        // Ends when the child has exited and the terminal side is closed
        // (EIO on a pseudo-terminal).
        while let Ok(n @ 1..) = controller.read(&mut buf) {
            if tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    // Two whole screens, each ending with its footer.
    let mut text = String::new();
    let deadline = Instant::now() + DEADLINE;
    while text.matches("Ctrl-C to stop").count() < 2 {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(chunk) => text.push_str(&String::from_utf8_lossy(&chunk)),
            Err(_) => break,
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let _ = reader.join();
    text.split("\x1b[H\x1b[2J")
        .filter(|screen| !screen.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Every command, in text and in JSON, against one agent that dropped
/// traffic of two accounts; the top-offender metric holds the one account
/// that `--metrics-top-accounts 1` allows.
#[test]
#[expect(
    clippy::too_many_lines,
    reason = "one agent and one round of traffic for every command; each block checks one command"
)]
fn every_command_answers_in_text_and_json() {
    let _serial = serial();
    let topo = topology("adma");
    let policy = PolicyFile::new("adma", POLICY);
    let dir = SocketDir::new("a");
    let socket = dir.socket();
    let agent = start(&topo, &policy, &socket, &["--metrics-top-accounts", "1"]);

    // Root-only: the directory 0700 (made by the agent), the socket 0600.
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir.0), 0o700);
    assert_eq!(mode(&socket), 0o600);

    assert_eq!(send(&topo, BLOCKED, ALPHA, TO_ALPHA, 2000), 0, "blocked");
    assert_eq!(send(&topo, BLOCKED, BETA, TO_BETA, 2000), 0, "blocked");
    assert_eq!(
        send(&topo, ORDINARY, ALPHA, 10, 2000),
        10,
        "ordinary traffic arrives"
    );
    agent.wait_for_event(
        &serde_json::json!({"account": "beta", "reason": "global_block"}),
        DEADLINE,
    );

    // status
    let status = json(&cli(&socket, &["status", "-o", "json"]));
    assert_eq!(status["ready"], true, "{status:#}");
    assert_eq!(status["policy"]["version"], "admin-test");
    assert_eq!(status["policy"]["generation"], 1);
    assert_eq!(status["policy"]["applied"], 1);
    assert!(
        status["policy"]["source"]
            .as_str()
            .unwrap()
            .contains(&*policy.path().display().to_string()),
        "{status:#}"
    );
    assert_eq!(status["attachments"][0]["name"], HOST_IF);
    assert_eq!(status["attachments"][0]["role"], "uplink");
    assert_eq!(status["pinned"], Value::Null, "ephemeral");
    assert!(status["counters"]["dropped"].as_u64().unwrap() >= TO_ALPHA + TO_BETA);
    assert!(status["uptime_seconds"].as_f64().unwrap() > 0.0);
    let consumers: Vec<&str> = status["lost"]["consumers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert!(
        consumers.contains(&"stdout") && consumers.contains(&"recent"),
        "{consumers:?}"
    );
    let text = ok(&cli(&socket, &["status"]));
    for needle in [
        "ready",
        "policy: generation 1, version admin-test",
        HOST_IF,
        "global_block",
        "accounts",
        "EVENT CONSUMER",
    ] {
        assert!(text.contains(needle), "no {needle:?} in:\n{text}");
    }

    // maps
    let maps = json(&cli(&socket, &["maps", "-o", "json"]));
    let entries = |name: &str| {
        maps.as_array()
            .unwrap()
            .iter()
            .find(|m| m["map"] == name)
            .unwrap_or_else(|| panic!("no map {name} in {maps:#}"))
            .clone()
    };
    assert_eq!(entries("accounts")["entries"], 2);
    assert_eq!(entries("accounts")["capacity"], 16_384);
    assert_eq!(entries("list_prefixes_v4")["entries"], 1);
    assert!(entries("account_counters")["entries"].as_u64().is_some());
    let text = ok(&cli(&socket, &["maps"]));
    assert!(
        text.contains("MAP") && text.contains("--max-accounts"),
        "{text}"
    );

    // policy show --running: the effective policy, as `policy show` renders it.
    let running = json(&cli(
        &socket,
        &["policy", "show", "--running", "-o", "json"],
    ));
    assert_eq!(running["version"], "admin-test");
    let ids: Vec<&str> = running["accounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["alpha", "beta"]);
    let text = ok(&cli(&socket, &["policy", "show", "--running"]));
    assert!(
        text.contains("version: admin-test") && text.contains("10.77.1.0/24"),
        "{text}"
    );

    // events: the recent ones, filtered.
    let lines = ok(&cli(
        &socket,
        &["events", "-o", "json", "--account", "alpha"],
    ));
    let events: Vec<Value> = lines
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        events.len() as u64,
        TO_ALPHA,
        "one event per blocked packet:\n{lines}"
    );
    assert!(
        events
            .iter()
            .all(|e| e["account"] == "alpha" && e["reason"] == "global_block")
    );
    // As the agent writes them on stdout, in the same order of fields.
    assert!(
        lines.lines().all(|l| l.starts_with("{\"time\":")),
        "{lines}"
    );
    let lines = ok(&cli(
        &socket,
        &[
            "events",
            "-o",
            "json",
            "--reason",
            "global_block",
            "--since",
            "1h",
        ],
    ));
    assert_eq!(lines.lines().count() as u64, TO_ALPHA + TO_BETA, "{lines}");
    let lines = ok(&cli(&socket, &["events", "--reason", "rate_pps"]));
    assert_eq!(lines, "", "no event of that reason");
    let text = ok(&cli(&socket, &["events", "--account", "beta"]));
    assert_eq!(text.lines().count() as u64, TO_BETA, "{text}");
    assert!(
        text.lines()
            .all(|l| l.contains("beta inbound drop global_block 10.77.1.1:")),
        "{text}"
    );
    let err = failed(&cli(&socket, &["events", "--reason", "nonsense"]));
    assert!(err.contains("unknown reason"), "{err}");

    // top: by account from the counters, by remote from the events.
    let top = json(&cli(&socket, &["top", "--once", "-o", "json"]));
    assert_eq!(
        top_rows(&top),
        [("alpha".to_owned(), TO_ALPHA), ("beta".to_owned(), TO_BETA)]
    );
    let text = ok(&cli(&socket, &["top", "--once"]));
    assert!(text.contains("ACCOUNT") && text.contains("alpha"), "{text}");
    let top = json(&cli(
        &socket,
        &["top", "--by", "remote", "--once", "-o", "json"],
    ));
    assert_eq!(top_rows(&top), [(BLOCKED.to_string(), TO_ALPHA + TO_BETA)]);
    // Not a terminal: one table, also without --once.
    let text = ok(&cli(&socket, &["top", "--by", "remote"]));
    assert!(
        text.contains("REMOTE") && text.contains("10.77.1.1"),
        "{text}"
    );
    // On a terminal: refreshed in place, with a rate column.
    let screens = top_on_a_terminal(&socket);
    assert!(screens.len() >= 2, "{screens:?}");
    assert!(
        screens[1].contains("RATE") && screens[1].contains("alpha") && screens[1].contains("0.0/s"),
        "{screens:?}"
    );

    // The top-offender metric: alpha alone (the bound is 1), with the same
    // count as `top`.
    let metrics = scrape(&topo.host);
    let series: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("mmesh_account_dropped_packets_total{"))
        .collect();
    assert_eq!(
        series,
        [format!(
            "mmesh_account_dropped_packets_total{{account=\"alpha\"}} {TO_ALPHA}"
        )],
        "{metrics}"
    );
}

/// A user that is not root cannot use the socket: refused by its mode, and
/// refused by the agent (the peer's credentials) when the mode is opened
/// up.
#[test]
fn a_user_that_is_not_root_is_refused() {
    let _serial = serial();
    let topo = topology("admr");
    let policy = PolicyFile::new("admr", POLICY);
    let dir = SocketDir::new("r");
    let socket = dir.socket();
    let agent = start(&topo, &policy, &socket, &["--no-metrics"]);

    let err = failed(&cli_as(&socket, &["status"], Some(NOBODY)));
    assert!(
        err.contains("permission denied")
            && err.contains(&*socket.display().to_string())
            && err.contains("root"),
        "{err}"
    );

    // A mistake opens the socket to everyone: the agent still refuses.
    std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let err = failed(&cli_as(&socket, &["status"], Some(NOBODY)));
    assert!(err.contains("permission denied"), "{err}");
    wait_until("the agent logs the refusal", DEADLINE, || {
        agent
            .log_position("refused a client that is not root", 0)
            .is_some()
    });
    // Root still gets its answer.
    let status = json(&cli(&socket, &["status", "-o", "json"]));
    assert_eq!(status["policy"]["version"], "admin-test");
}

/// No agent: a clear error naming the socket and what to do; a stale
/// socket is taken over by the next agent; a second agent on a live socket
/// stops with a clear error before it touches anything.
#[test]
fn no_agent_stale_socket_and_a_second_agent() {
    let _serial = serial();
    let dir = SocketDir::new("n");
    let socket = dir.socket();
    let err = failed(&cli(&socket, &["status"]));
    assert!(
        err.contains(&format!("no mmesh-agent answers on {}", socket.display()))
            && err.contains("mmesh-agent run")
            && err.contains("--admin-socket"),
        "{err}"
    );
    // A socket nobody listens on: what an agent killed with -9 leaves.
    std::fs::create_dir_all(&dir.0).unwrap();
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    let err = failed(&cli(&socket, &["top", "--once"]));
    assert!(err.contains("nothing listens"), "{err}");

    let topo = topology("admn");
    let policy = PolicyFile::new("admn", POLICY);
    let agent = start(&topo, &policy, &socket, &["--no-metrics"]);
    let status = json(&cli(&socket, &["status", "-o", "json"]));
    assert_eq!(status["ready"], true);

    let second = run_agent_to_exit(
        &topo.host,
        &[
            "run",
            "--policy",
            &policy.path().display().to_string(),
            "--interface",
            HOST_IF,
            "--no-metrics",
            "--admin-socket",
            &socket.display().to_string(),
        ],
        DEADLINE,
    );
    let err = failed(&second);
    assert!(
        err.contains(&format!(
            "another mmesh-agent answers on the admin socket {}",
            socket.display()
        )),
        "{err}"
    );
    // The first one is untouched.
    let status = json(&cli(&socket, &["status", "-o", "json"]));
    assert_eq!(status["pid"], agent.pid());
    // An agent that stops removes its socket; one that failed to start
    // never removed the live one.
    let mut agent = agent;
    assert!(agent.stop().success());
    assert!(!socket.exists(), "the socket outlived the agent");
}

/// The admin-events consumers, as `status` reports them: (delivered, lost).
fn admin_consumers(socket: &Path) -> Vec<(u64, u64)> {
    let status = json(&cli(socket, &["status", "-o", "json"]));
    status["lost"]["consumers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["name"] == "admin-events")
        .map(|c| {
            (
                c["delivered"].as_u64().unwrap(),
                c["lost"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// Reads a follower's lines until the `{"lost": N}` notice: the thread
/// serving it was blocked writing; once it can write again, the count of
/// what was dropped meanwhile comes before the next events.
fn lost_notice(stream: &UnixStream) -> u64 {
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    for line in BufReader::new(stream.try_clone().unwrap()).lines() {
        let line = line.expect("a line within the deadline");
        let v: Value = serde_json::from_str(&line).unwrap();
        if let Some(n) = v.get("lost") {
            return n.as_u64().expect("a count");
        }
        assert!(!v["event"].is_null(), "unexpected line {line}");
    }
    panic!("the stalled follower was never told what it lost");
}

/// A follower that stops reading loses events, counted in the agent and
/// told when it reads again; enforcement, the agent's own event log and
/// another follower go on.
#[test]
fn a_follower_that_stops_reading_loses_only_its_own_events() {
    const ROUNDS: u64 = 4;
    const PER_ROUND: u64 = 2000;
    // Slow enough for a debug build's consumers to keep up on a busy
    // machine (at 20,000/s the agent's own stdout already loses some).
    const PPS: u64 = 2000;
    let _serial = serial();
    let topo = topology("adms");
    let policy = PolicyFile::new("adms", POLICY);
    let dir = SocketDir::new("s");
    let socket = dir.socket();
    let agent = start(&topo, &policy, &socket, &[]);

    // The stalled client: asks to follow, then reads nothing.
    let mut stalled = UnixStream::connect(&socket).unwrap();
    stalled
        .write_all(b"{\"cmd\":\"events\",\"follow\":true}\n")
        .unwrap();
    // A good follower: the command, read line by line.
    let mut good = Command::new(agent_binary())
        .args(["events", "--follow", "-o", "json", "--admin-socket"])
        .arg(&socket)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let got = Arc::new(AtomicU64::new(0));
    let reader = {
        let got = got.clone();
        let out = good.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if serde_json::from_str::<Value>(&line).is_ok_and(|v| v["reason"] == "global_block")
                {
                    got.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    wait_until("both followers are subscribed", DEADLINE, || {
        admin_consumers(&socket).len() == 2
    });

    let logged_before = agent
        .events_matching(&serde_json::json!({"reason": "global_block"}))
        .len();
    for round in 0..ROUNDS {
        // Enforcement is unaffected: every blocked packet dropped, every
        // ordinary one through.
        assert_eq!(
            send(&topo, BLOCKED, ALPHA, PER_ROUND, PPS),
            0,
            "round {round}"
        );
        assert_eq!(send(&topo, ORDINARY, ALPHA, 20, 2000), 20, "round {round}");
    }
    let sent = ROUNDS * PER_ROUND;
    // The good follower and the agent's own log get every event.
    let deadline = Instant::now() + DEADLINE;
    while got.load(Ordering::Relaxed) < sent && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        got.load(Ordering::Relaxed) >= sent,
        "the good follower got {} of {sent} events; {}",
        got.load(Ordering::Relaxed),
        ok(&cli(&socket, &["status", "-o", "json"]))
    );
    wait_until("the agent's log gets every event", DEADLINE, || {
        agent
            .events_matching(&serde_json::json!({"reason": "global_block"}))
            .len()
            - logged_before
            >= sent as usize
    });
    let consumers = admin_consumers(&socket);
    let lost: Vec<u64> = consumers.iter().map(|c| c.1).collect();
    assert!(
        lost.iter().filter(|l| **l > 0).count() == 1 && lost.contains(&0),
        "the stalled follower alone loses: {consumers:?}"
    );
    let status = json(&cli(&socket, &["status", "-o", "json"]));
    let stdout_lost = status["lost"]["consumers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "stdout")
        .unwrap()["lost"]
        .clone();
    assert_eq!(stdout_lost, 0, "{status:#}");
    // One series for the followers, which share a name: what they lost.
    let metrics = scrape(&topo.host);
    let series: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("mmesh_events_lost_total{consumer=\"admin-events\"}"))
        .collect();
    assert_eq!(series.len(), 1, "{metrics}");
    assert!(!series[0].ends_with(" 0"), "{metrics}");

    // It reads again: what it lost is told before the next events.
    // No traffic since the count above: the notice says exactly that.
    let told = lost_notice(&stalled);
    assert_eq!(told, lost.iter().copied().max().unwrap_or(0));
    let _ = good.kill();
    let _ = good.wait();
    let _ = reader.join();
}
