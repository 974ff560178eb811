//! Benchmark group `fanout`: one `mmesh-controlplane` process (release, TLS)
//! serving a policy folder to thousands of agent streams, and a one-account
//! change of the policy every node inherits (`default.json`) acknowledged by
//! all of them.
//!
//! The agents are simulated, all in this process on a tokio runtime of two
//! threads: each has its own TCP connection, its own rustls TLS session
//! (verifying the server against the test CA) and its own HTTP/2 connection
//! and `PolicyStream.Session` stream, as the real agent's; it says Hello
//! (taking deltas, heartbeat 10 s), Acks the Snapshot and every Delta with
//! their version and nonce, sends a Heartbeat every 10 s and a Status every
//! 30 s as the real agent does, and compiles nothing. They share the
//! machine's two CPUs with the control plane.
//!
//! Each round starts a fresh control plane, connects the agents in steps
//! (1, then 1,000, 5,000 and 10,000 streams; 1 and 100 with `--quick`) and at
//! each step changes one account's limit in `default.json`. The time of one
//! agent is from the moment the new file is in place (renamed into the
//! folder) to the moment the control plane prints that agent's `ack` line
//! for the new version, as read from its stdout here: it includes the
//! folder's debounce (200 ms), reading and validating the folder, the Delta
//! to every stream, and each Ack received and recorded. The figures are the
//! 99th percentile over the streams of a step, against the same change with
//! one stream in the same round, and the control plane's resident memory.

use std::{
    collections::HashMap,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use mmesh_agent::{
    control::proto::{
        self, AgentMessage, agent_message::Body as Up, control_message::Body as Down,
        policy_stream_client::PolicyStreamClient,
    },
    policy::Policy,
};
use mmesh_controlplane::catalog::Desired;
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

use super::{
    Options,
    report::{Figure, Goal, Report, Table, num},
};
use crate::{certs::TestCa, controlplane::TempDir, netns::wait_until};

const GROUP: &str = "fan-out";

/// Accounts in the policy every node inherits.
const ACCOUNTS: u32 = 1_000;
/// The issue's goal: every stream's Ack within 1 s of the change (p99).
const GOAL_MS: f64 = 1_000.0;
/// Agents connecting (TLS handshake to Snapshot Ack) at a time.
const CONNECTING: usize = 256;
/// The real agent's default intervals.
const HEARTBEAT: Duration = Duration::from_secs(10);
const STATUS: Duration = Duration::from_secs(30);

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The policy folder's `default.json`: `ACCOUNTS` accounts, the one in the
/// middle with an inbound limit of `pps` thousand packets/s.
fn policy(pps: usize) -> String {
    let accounts: Vec<String> = (0..ACCOUNTS)
        .map(|i| {
            let inbound = if i == ACCOUNTS / 2 {
                format!("{pps}k")
            } else {
                "100k".into()
            };
            let addr = std::net::Ipv4Addr::from((10 << 24) + i * 16);
            format!(
                r#"{{"id":"acct-{i}","prefixes":["{addr}/28"],"limits":{{"inbound":{{"pps":"{inbound}"}},"outbound":{{"pps":"20k","bps":"200M"}}}}}}"#
            )
        })
        .collect();
    format!(
        r#"{{"version":"fanout","accounts":[{}]}}"#,
        accounts.join(",")
    )
}

/// The version the control plane serves `text` as.
fn version_of(text: &str) -> String {
    let policy = Policy::parse(text, "default.json", Path::new("."))
        .expect("the benchmark policy validates");
    Desired::new(&policy, "default.json".into()).version
}

/// The `mmesh-controlplane` binary to measure: `$MMESH_CONTROLPLANE_BIN`
/// (set by `cargo xtask bench`), else this workspace's release build, else
/// (quick runs only) its debug build.
fn controlplane_binary(quick: bool) -> Option<PathBuf> {
    super::policy::workspace_binary("mmesh-controlplane", "MMESH_CONTROLPLANE_BIN", quick)
}

/// Raises this process's open-file limit (inherited by the control plane)
/// to hold `streams` connections on each side.
fn raise_nofile(streams: usize) {
    let want = (streams as libc::rlim_t + 1_024).max(4_096);
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct given.
    assert_eq!(
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut limit) },
        0,
        "getrlimit: {}",
        std::io::Error::last_os_error()
    );
    if limit.rlim_cur >= want {
        return;
    }
    limit.rlim_cur = want;
    limit.rlim_max = limit.rlim_max.max(want);
    // SAFETY: setrlimit reads the struct given.
    assert_eq!(
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const limit) },
        0,
        "raising RLIMIT_NOFILE to {want}: {}",
        std::io::Error::last_os_error()
    );
}

/// What the control plane printed, as this process read it.
#[derive(Default)]
struct Lines {
    listening: Option<String>,
    /// When each version's `policy` line was read.
    loaded: HashMap<String, Instant>,
    /// When each `ack` line was read, by version.
    acks: HashMap<String, Vec<Instant>>,
}

/// The control plane under test; killed when dropped.
struct Server {
    child: Child,
    lines: Arc<Mutex<Lines>>,
}

impl Server {
    fn start(bin: &Path, dir: &Path, certs: &Path) -> Self {
        let mut child = Command::new(bin)
            .arg("--policies")
            .arg(dir)
            .arg("--tls-cert")
            .arg(certs.join("server.crt"))
            .arg("--tls-key")
            .arg(certs.join("server.key"))
            .args(["--listen", "127.0.0.1:0"])
            // Its log as it would be deployed (info), to a file.
            .stderr(
                std::fs::File::create(certs.join("controlplane.log"))
                    .expect("creating the control plane's log"),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting mmesh-controlplane");
        let lines = Arc::new(Mutex::new(Lines::default()));
        let stdout = child.stdout.take().expect("piped stdout");
        {
            let lines = Arc::clone(&lines);
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    let now = Instant::now();
                    let kind = |k: &str| line.contains(&format!("\"event\":\"{k}\""));
                    if !(kind("ack") || kind("policy") || kind("listening")) {
                        continue;
                    }
                    let value: serde_json::Value =
                        serde_json::from_str(&line).expect("the control plane prints JSON lines");
                    let field = |k: &str| value[k].as_str().unwrap_or_default().to_owned();
                    let mut lines = lines.lock().expect("lines");
                    match value["event"].as_str() {
                        Some("ack") => lines.acks.entry(field("version")).or_default().push(now),
                        Some("policy") => {
                            lines.loaded.insert(field("version"), now);
                        }
                        Some("listening") => lines.listening = Some(field("addr")),
                        _ => {}
                    }
                }
            });
        }
        Self { child, lines }
    }

    fn addr(&self) -> String {
        let mut addr = None;
        wait_until(
            "the control plane to listen",
            Duration::from_secs(30),
            || {
                addr.clone_from(&self.lines.lock().expect("lines").listening);
                addr.is_some()
            },
        );
        addr.expect("listening")
    }

    /// How many Acks of `version` were read.
    fn acks_of(&self, version: &str) -> usize {
        self.lines
            .lock()
            .expect("lines")
            .acks
            .get(version)
            .map_or(0, Vec::len)
    }

    /// The Acks of `version` read at or after `since`.
    fn acks_since(&self, version: &str, since: Instant) -> Vec<Instant> {
        self.lines
            .lock()
            .expect("lines")
            .acks
            .get(version)
            .map(|a| a.iter().copied().filter(|t| *t >= since).collect())
            .unwrap_or_default()
    }

    fn loaded(&self, version: &str) -> Option<Instant> {
        self.lines
            .lock()
            .expect("lines")
            .loaded
            .get(version)
            .copied()
    }

    /// `VmRSS` and `VmHWM`, MB (MiB).
    fn memory(&self) -> (f64, f64) {
        let (resident, peak) = super::policy::rss(self.child.id());
        (resident / MIB, peak / MIB)
    }
}

/// Bytes in a MiB, as the figures count them.
const MIB: f64 = (1 << 20) as f64;

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The agents' side: counts of what they did, shared by their tasks.
#[derive(Default)]
struct Agents {
    /// Agents whose Snapshot Ack was sent.
    ready: AtomicUsize,
    /// Agents whose stream failed (with the first reason).
    failed: AtomicUsize,
    why: Mutex<Option<String>>,
}

/// One simulated agent: connects, says Hello, Acks what it is sent, beats.
async fn agent(node: String, endpoint: Endpoint, connecting: Arc<Semaphore>, agents: Arc<Agents>) {
    let fail = |why: String| {
        agents.failed.fetch_add(1, Ordering::Relaxed);
        agents.why.lock().expect("why").get_or_insert(why);
    };
    let permit = connecting.acquire_owned().await.expect("open semaphore");
    let channel = match endpoint.connect().await {
        Ok(c) => c,
        Err(e) => return fail(format!("{node}: connect: {e:?}")),
    };
    let (tx, rx) = mpsc::channel::<AgentMessage>(8);
    let send = |body| AgentMessage { body: Some(body) };
    let hello = proto::Hello {
        node: node.clone(),
        agent_version: "fanout-sim".into(),
        kernel: "sim".into(),
        features: Vec::new(),
        capacity: None,
        policy_version: String::new(),
        generation: 0,
        accepts: vec!["delta".into()],
        heartbeat_millis: HEARTBEAT.as_millis() as u32,
    };
    let _ = tx.send(send(Up::Hello(hello))).await;
    let mut inbound = match PolicyStreamClient::new(channel)
        .session(ReceiverStream::new(rx))
        .await
    {
        Ok(r) => r.into_inner(),
        Err(e) => return fail(format!("{node}: session: {e}")),
    };
    let mut permit = Some(permit);
    let mut generation = 0;
    let mut version = String::new();
    // Spread over the interval, as agents started at different times are.
    let phase = Duration::from_millis(
        node.bytes()
            .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)))
            % 10_000,
    );
    let mut beat = tokio::time::interval_at(tokio::time::Instant::now() + phase, HEARTBEAT);
    let mut status = tokio::time::interval_at(tokio::time::Instant::now() + phase * 3, STATUS);
    loop {
        tokio::select! {
            message = inbound.message() => {
                let (v, nonce) = match message {
                    Ok(Some(proto::ControlMessage { body: Some(Down::Snapshot(s)) })) => (s.version, s.nonce),
                    Ok(Some(proto::ControlMessage { body: Some(Down::Delta(d)) })) => {
                        if d.base_version != version {
                            return fail(format!("{node}: a delta against {} while holding {version}", d.base_version));
                        }
                        (d.version, d.nonce)
                    }
                    Ok(Some(_)) => continue,
                    Ok(None) => return fail(format!("{node}: the control plane ended the stream")),
                    Err(e) => return fail(format!("{node}: stream: {e}")),
                };
                generation += 1;
                version.clone_from(&v);
                let ack = proto::Ack { nonce, version: v, generation, apply_micros: 1 };
                if tx.send(send(Up::Ack(ack))).await.is_err() {
                    return fail(format!("{node}: the request stream closed"));
                }
                if permit.take().is_some() {
                    agents.ready.fetch_add(1, Ordering::Relaxed);
                }
            }
            _ = beat.tick() => {
                let _ = tx.try_send(send(Up::Heartbeat(proto::Heartbeat { unix_ms: 0 })));
            }
            _ = status.tick() => {
                let _ = tx.try_send(send(Up::Status(proto::Status {
                    policy_version: version.clone(),
                    generation,
                    accounts: ACCOUNTS,
                    ..proto::Status::default()
                })));
            }
        }
    }
}

/// What one step of a round measured.
struct Step {
    /// Connecting the streams added since the step before (TLS handshake to
    /// the Snapshot's Ack), seconds.
    connect: f64,
    /// Change to Ack of each stream, ms, sorted.
    times: Vec<f64>,
    /// Change to the control plane's `policy` line (the folder read).
    loaded: f64,
    rss: f64,
    hwm: f64,
}

impl Step {
    fn quantile(&self, q: f64) -> f64 {
        let i = ((self.times.len() as f64 * q).ceil() as usize).clamp(1, self.times.len());
        self.times[i - 1]
    }
}

/// Runs the group into `report`.
#[expect(
    clippy::too_many_lines,
    reason = "set-up, the rounds, then the figures and the curve in the order of the report"
)]
pub fn run(opts: &Options, report: &mut Report) {
    let steps: &[usize] = if opts.quick {
        &[1, 100]
    } else {
        &[1, 1_000, 5_000, 10_000]
    };
    let top = *steps.last().expect("steps");
    let p99_name = |n: usize| format!("one-account change to every Ack, p99 over {n} TLS streams");
    let rss_name = |n: usize| format!("control plane memory (VmRSS) at {n} TLS streams");
    let Some(bin) = controlplane_binary(opts.quick) else {
        for &n in &steps[1..] {
            for (name, unit) in [(p99_name(n), "ms"), (rss_name(n), "MB")] {
                report.add(super::policy::no_binary(
                    GROUP,
                    name,
                    unit,
                    ("mmesh-controlplane", "MMESH_CONTROLPLANE_BIN"),
                ));
            }
        }
        return;
    };
    raise_nofile(top);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("the agents' runtime");
    let certs = TempDir::new("bench-fanout-certs");
    let ca = TestCa::new("mmesh bench CA");
    let _ = ca.server(&["localhost"]).write(certs.path(), "server");
    let tls = ClientTlsConfig::new()
        .domain_name("localhost")
        .ca_certificate(Certificate::from_pem(ca.cert_pem()));
    let mut rounds: Vec<Vec<Step>> = Vec::new();
    let mut change = 0;
    for round in 0..opts.rounds {
        let dir = TempDir::new("bench-fanout-policies");
        change += 1;
        dir.write("default.json", &policy(change));
        let server = Server::start(&bin, dir.path(), certs.path());
        let endpoint = Endpoint::from_shared(format!("https://{}", server.addr()))
            .expect("the control plane's URL")
            .tls_config(tls.clone())
            .expect("the agents' TLS")
            .connect_timeout(Duration::from_secs(30))
            .tcp_nodelay(true);
        let agents = Arc::new(Agents::default());
        let connecting = Arc::new(Semaphore::new(CONNECTING));
        let mut tasks = Vec::new();
        let mut steps_done = Vec::new();
        for &n in steps {
            let started = Instant::now();
            for i in tasks.len()..n {
                tasks.push(runtime.spawn(agent(
                    format!("node-{i}"),
                    endpoint.clone(),
                    Arc::clone(&connecting),
                    Arc::clone(&agents),
                )));
            }
            wait_until(
                &format!("{n} agents to hold the policy"),
                Duration::from_mins(10),
                || {
                    let failed = agents.failed.load(Ordering::Relaxed);
                    assert!(
                        failed == 0,
                        "{failed} simulated agents failed, first: {:?}",
                        agents.why.lock().expect("why")
                    );
                    agents.ready.load(Ordering::Relaxed) >= n
                },
            );
            let connected = started.elapsed();
            // Every Snapshot Ack recorded by the control plane before the
            // change, so that only the change is measured.
            let current = version_of(&policy(change));
            wait_until(
                "the control plane to record every Snapshot Ack",
                Duration::from_mins(2),
                || server.acks_of(&current) >= n,
            );
            eprintln!(
                "bench: fan-out: {n} streams connected in {connected:.1?}; changing one account"
            );
            change += 1;
            let text = policy(change);
            let t0 = Instant::now();
            dir.write("default.json", &text);
            let version = version_of(&text);
            wait_until(
                &format!("the change Acked by {n} streams"),
                Duration::from_mins(5),
                || server.acks_since(&version, t0).len() >= n,
            );
            let mut times: Vec<f64> = server
                .acks_since(&version, t0)
                .iter()
                .map(|t| ms(t.duration_since(t0)))
                .collect();
            times.sort_by(f64::total_cmp);
            let (rss, hwm) = server.memory();
            let step = Step {
                connect: connected.as_secs_f64(),
                loaded: ms(server
                    .loaded(&version)
                    .expect("the policy line")
                    .saturating_duration_since(t0)),
                times,
                rss,
                hwm,
            };
            eprintln!(
                "bench: fan-out: {n} streams: change to Ack p50 {} ms, p99 {} ms, max {} ms (folder read at {} ms); control plane VmRSS {} MB, VmHWM {} MB",
                num(step.quantile(0.5)),
                num(step.quantile(0.99)),
                num(step.quantile(1.0)),
                num(step.loaded),
                num(step.rss),
                num(step.hwm),
            );
            steps_done.push(step);
        }
        // The agents end with their runtime's tasks; the server with its
        // process.
        for task in tasks {
            task.abort();
        }
        drop(server);
        rounds.push(steps_done);
        eprintln!("bench: fan-out round {}/{} done", round + 1, opts.rounds);
    }
    drop(runtime);

    let baseline_name = "the same change with 1 TLS stream".to_owned();
    let column = |i: usize, f: &dyn Fn(&Step) -> f64| -> Vec<f64> {
        rounds.iter().map(|r| f(&r[i])).collect()
    };
    let base = column(0, &|s| s.quantile(0.99));
    let base_rss = column(0, &|s| s.rss);
    for (i, &n) in steps.iter().enumerate().skip(1) {
        report.add(Figure {
            group: GROUP.into(),
            name: p99_name(n),
            unit: "ms".into(),
            samples: column(i, &|s| s.quantile(0.99)),
            baseline: Some((baseline_name.clone(), base.clone())),
            reference: None,
            goal: (n == 10_000).then_some(Goal::AtMost(GOAL_MS)),
            note: format!(
                "from default.json replaced (every node inherits it; {ACCOUNTS} accounts, one account's limit changed) to the control plane's ack line of each stream; includes the folder's 200 ms debounce"
            ),
        });
        report.add(Figure {
            group: GROUP.into(),
            name: rss_name(n),
            unit: "MB".into(),
            samples: column(i, &|s| s.rss),
            baseline: Some(("1 TLS stream".into(), base_rss.clone())),
            reference: None,
            goal: None,
            note: "after the change was Acked everywhere".into(),
        });
    }
    let median =
        |values: Vec<f64>| super::report::Stats::of(&values).map_or(f64::NAN, |s| s.median);
    report.tables.push(Table {
        group: GROUP.into(),
        title: format!(
            "Fan-out curve: medians over {} round(s) of the change to every stream's Ack, and the control plane's memory",
            rounds.len()
        ),
        columns: [
            "streams",
            "connecting the added ones",
            "folder read",
            "p50",
            "p99",
            "max",
            "VmRSS",
            "VmHWM",
        ]
        .map(String::from)
        .to_vec(),
        rows: steps
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                vec![
                    n.to_string(),
                    format!("{} s", num(median(column(i, &|s| s.connect)))),
                    format!("{} ms", num(median(column(i, &|s| s.loaded)))),
                    format!("{} ms", num(median(column(i, &|s| s.quantile(0.5))))),
                    format!("{} ms", num(median(column(i, &|s| s.quantile(0.99))))),
                    format!("{} ms", num(median(column(i, &|s| s.quantile(1.0))))),
                    format!("{} MB", num(median(column(i, &|s| s.rss)))),
                    format!("{} MB", num(median(column(i, &|s| s.hwm)))),
                ]
            })
            .collect(),
    });
}
