//! The reference control plane as a process ([`ControlPlane`]: its stdout
//! lines collected, killed when dropped) and an agent played by the test
//! ([`FakeAgent`]: the real protocol over a real stream, no kernel).

use std::{
    ffi::OsStr,
    io::{BufRead as _, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use mmesh_agent::control::proto::{
    self, AgentMessage, ControlMessage, agent_message::Body as Up, control_message::Body as Down,
    policy_stream_client::PolicyStreamClient,
};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{
    Status, Streaming,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};

use crate::certs::CertKey;

/// The `mmesh-controlplane` binary: `$MMESH_CONTROLPLANE_BIN` (set by
/// `cargo xtask test`), else `target/debug/mmesh-controlplane` of this
/// workspace.
#[must_use]
pub fn controlplane_binary() -> PathBuf {
    let bin = std::env::var_os("MMESH_CONTROLPLANE_BIN").map_or_else(
        || {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .parent()
                .expect("the tests crate is inside the workspace")
                .join("target/debug/mmesh-controlplane")
        },
        PathBuf::from,
    );
    assert!(
        bin.is_file(),
        "no mmesh-controlplane binary at {}: run `cargo xtask test`, or `cargo build -p \
         mmesh-controlplane` first (or set MMESH_CONTROLPLANE_BIN)",
        bin.display()
    );
    bin
}

/// A running `mmesh-controlplane`; killed when dropped.
pub struct ControlPlane {
    child: Child,
    lines: Arc<Mutex<Vec<Value>>>,
    log: Arc<Mutex<Vec<String>>>,
    /// Where it serves agents.
    pub addr: SocketAddr,
}

impl ControlPlane {
    /// Starts `mmesh-controlplane ARGS --listen 127.0.0.1:0` and waits for
    /// it to listen.
    #[must_use]
    pub fn start(args: &[impl AsRef<OsStr>]) -> Self {
        Self::start_command(Command::new(controlplane_binary()), args)
    }

    /// [`Self::start`] inside the network namespace `ns` (where an agent
    /// under test can reach its loopback).
    #[must_use]
    pub fn start_in(ns: &crate::netns::NetNs, args: &[impl AsRef<OsStr>]) -> Self {
        Self::start_command(ns.command(controlplane_binary()), args)
    }

    fn start_command(mut command: Command, args: &[impl AsRef<OsStr>]) -> Self {
        let mut child = command
            .args(args)
            .args(["--listen", "127.0.0.1:0"])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting mmesh-controlplane");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::new(Mutex::new(Vec::new()));
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        {
            let lines = Arc::clone(&lines);
            thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    let value = serde_json::from_str(&line).unwrap_or_else(|e| {
                        panic!("mmesh-controlplane printed a line that is not JSON ({e}): {line}")
                    });
                    lines.lock().expect("lines").push(value);
                }
            });
        }
        {
            let log = Arc::clone(&log);
            thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    log.lock().expect("log").push(line);
                }
            });
        }
        let mut cp = Self {
            child,
            lines,
            log,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        };
        let listening = cp.wait_for(
            "the control plane to listen",
            Duration::from_secs(30),
            |l| l["event"] == "listening",
        );
        cp.addr = listening["addr"]
            .as_str()
            .and_then(|a| a.parse().ok())
            .expect("the listening line has an address");
        cp
    }

    /// Every line printed so far.
    #[must_use]
    pub fn lines(&self) -> Vec<Value> {
        self.lines.lock().expect("lines").clone()
    }

    /// How many lines were printed so far: a mark for [`Self::wait_after`].
    #[must_use]
    pub fn mark(&self) -> usize {
        self.lines.lock().expect("lines").len()
    }

    /// The first line matching `pred`, waiting up to `timeout` for it.
    pub fn wait_for(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        self.wait_after(0, what, timeout, pred)
    }

    /// The first line from number `mark` on matching `pred`, waiting up to
    /// `timeout` for it; panics with the control plane's log if none comes.
    pub fn wait_after(
        &mut self,
        mark: usize,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        let find = || {
            self.lines
                .lock()
                .expect("lines")
                .get(mark..)
                .unwrap_or_default()
                .iter()
                .find(|l| pred(l))
                .cloned()
        };
        loop {
            if let Some(line) = find() {
                return line;
            }
            let exited = self.child.try_wait().expect("polling the control plane");
            if Instant::now() > deadline || exited.is_some() {
                // The last lines of an exited process may still be in the
                // pipe: one more look.
                thread::sleep(Duration::from_millis(200));
                if let Some(line) = find() {
                    return line;
                }
                panic!(
                    "{} waiting for {what}{}\nstdout:\n{}\nstderr:\n{}",
                    if exited.is_some() {
                        "the control plane exited"
                    } else {
                        "timed out"
                    },
                    exited.map(|s| format!(" ({s})")).unwrap_or_default(),
                    self.lines()
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join("\n"),
                    self.log.lock().expect("log").join("\n")
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends SIGTERM and waits up to `timeout` for the process to exit;
    /// its exit status, or `None` if it did not exit in time.
    pub fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let pid = libc::pid_t::try_from(self.child.id()).expect("a pid");
        // SAFETY: kill(2) on our own child, which has not been waited for.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("polling the control plane") {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// The control plane's log (stderr) so far.
    #[must_use]
    pub fn log(&self) -> String {
        self.log.lock().expect("log").join("\n")
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How a [`FakeAgent`] connects.
#[derive(Clone, Default)]
pub struct ClientTls {
    /// The CA the server's certificate must chain to; `None`: plaintext.
    pub ca_pem: Option<String>,
    /// The client certificate to present.
    pub identity: Option<CertKey>,
}

/// A channel to the control plane at `addr`; TLS verifies the server as
/// "localhost".
pub async fn channel(
    addr: SocketAddr,
    tls: &ClientTls,
) -> Result<Channel, tonic::transport::Error> {
    let endpoint = match &tls.ca_pem {
        None => Endpoint::from_shared(format!("http://{addr}"))?,
        Some(ca) => {
            let mut config = ClientTlsConfig::new()
                .domain_name("localhost")
                .ca_certificate(Certificate::from_pem(ca));
            if let Some(id) = &tls.identity {
                config = config.identity(Identity::from_pem(&id.cert_pem, &id.key_pem));
            }
            Endpoint::from_shared(format!("https://{addr}"))?.tls_config(config)?
        }
    };
    endpoint
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await
}

/// A Hello from `node` that enforces `policy_version` and takes deltas.
#[must_use]
pub fn hello(node: &str, policy_version: &str) -> proto::Hello {
    proto::Hello {
        node: node.into(),
        agent_version: "test".into(),
        kernel: "test".into(),
        features: Vec::new(),
        capacity: None,
        policy_version: policy_version.into(),
        generation: 0,
        accepts: vec!["delta".into()],
        heartbeat_millis: 0,
    }
}

/// The largest message a [`FakeAgent`] takes.
pub const MAX_MESSAGE: usize = 256 << 20;

/// An agent played by a test: opens the stream with a Hello and then sends
/// and receives what the test says.
pub struct FakeAgent {
    tx: mpsc::Sender<AgentMessage>,
    rx: Streaming<ControlMessage>,
}

impl FakeAgent {
    /// Opens `PolicyStream.Session` on `channel` and sends `hello`.
    pub async fn connect(channel: Channel, hello: proto::Hello) -> Result<Self, Status> {
        let (tx, rx) = mpsc::channel(16);
        tx.send(AgentMessage {
            body: Some(Up::Hello(hello)),
        })
        .await
        .expect("the request stream is open");
        // A Snapshot of 100,000 accounts is about 10 MB: past tonic's
        // default 4 MiB limit on received messages.
        let response = PolicyStreamClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE)
            .session(ReceiverStream::new(rx))
            .await?;
        Ok(Self {
            tx,
            rx: response.into_inner(),
        })
    }

    /// Sends one message up.
    pub async fn send(&self, body: Up) {
        self.tx
            .send(AgentMessage { body: Some(body) })
            .await
            .expect("the request stream is open");
    }

    /// The next message down, heartbeats included; an error if the stream
    /// failed or ended, or nothing came within `timeout`.
    pub async fn next(&mut self, timeout: Duration) -> Result<Down, String> {
        match tokio::time::timeout(timeout, self.rx.message()).await {
            Err(_) => Err(format!("nothing received within {timeout:?}")),
            Ok(Err(status)) => Err(format!("stream failed: {status}")),
            Ok(Ok(None)) => Err("the control plane ended the stream".into()),
            Ok(Ok(Some(ControlMessage { body: None }))) => Err("a message with no body".into()),
            Ok(Ok(Some(ControlMessage { body: Some(body) }))) => Ok(body),
        }
    }

    /// The next Snapshot or Delta, skipping heartbeats; panics if none
    /// comes within `timeout`.
    pub async fn next_policy(&mut self, timeout: Duration) -> Down {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next(left).await {
                Ok(Down::Heartbeat(_)) => {}
                Ok(policy) => return policy,
                Err(e) => panic!("waiting for a snapshot or delta: {e}"),
            }
        }
    }

    /// Acks `message` (a Snapshot or Delta) as generation `generation`.
    pub async fn ack(&self, message: &Down, generation: u64) {
        let (version, nonce) = version_nonce(message);
        self.send(Up::Ack(proto::Ack {
            nonce,
            version,
            generation,
            apply_micros: 1,
        }))
        .await;
    }

    /// Closes the agent's side of the stream.
    pub fn close(self) {
        drop(self);
    }
}

/// The version and nonce of a Snapshot or Delta.
#[must_use]
pub fn version_nonce(message: &Down) -> (String, String) {
    match message {
        Down::Snapshot(s) => (s.version.clone(), s.nonce.clone()),
        Down::Delta(d) => (d.version.clone(), d.nonce.clone()),
        Down::Heartbeat(_) => panic!("a heartbeat has no version"),
    }
}

/// A directory of a test's own under the system's temporary directory,
/// removed when dropped.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    #[must_use]
    pub fn new(tag: &str) -> Self {
        static COUNT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("mmesh-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
        Self(path)
    }

    #[must_use]
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Writes `text` to `relative` (parents created) the way a careful
    /// writer does: beside it, then renamed into place.
    pub fn write(&self, relative: &str, text: &str) {
        let path = self.0.join(relative);
        let dir = path.parent().expect("a file has a parent");
        std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        let tmp = dir.join(format!(
            ".{}.tmp",
            path.file_name().expect("a file name").display()
        ));
        std::fs::write(&tmp, text).unwrap_or_else(|e| panic!("writing {}: {e}", tmp.display()));
        std::fs::rename(&tmp, &path)
            .unwrap_or_else(|e| panic!("renaming to {}: {e}", path.display()));
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A real etcd (Debian's `etcd-server`) on loopback ports of its own, with
/// a data directory of its own; killed and removed when dropped.
pub struct EtcdServer {
    child: Child,
    _data: TempDir,
    /// Its client URL, `http://127.0.0.1:PORT`.
    pub url: String,
}

impl EtcdServer {
    /// Starts etcd and waits until it answers.
    #[must_use]
    pub fn start() -> Self {
        let binary = which_etcd();
        let data = TempDir::new("etcd");
        let client = free_port();
        let peer = free_port();
        let url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let child = Command::new(binary)
            .arg("--name=test")
            .arg(format!("--data-dir={}", data.path().join("data").display()))
            .arg(format!("--listen-client-urls={url}"))
            .arg(format!("--advertise-client-urls={url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=test={peer_url}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting etcd");
        let server = Self {
            child,
            _data: data,
            url,
        };
        let client = server.client();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let deadline = Instant::now() + Duration::from_secs(30);
        while let Err(e) = rt.block_on(client.range("/")) {
            assert!(
                Instant::now() < deadline,
                "etcd did not answer within 30 s: {e}"
            );
            thread::sleep(Duration::from_millis(50));
        }
        server
    }

    /// A client of it.
    #[must_use]
    pub fn client(&self) -> mmesh_controlplane::etcd::Etcd {
        mmesh_controlplane::etcd::Etcd::new(&self.url).expect("a valid URL")
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The etcd binary; panics with what to install when there is none.
fn which_etcd() -> PathBuf {
    ["/usr/bin/etcd", "/usr/local/bin/etcd"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .expect(
            "no etcd binary: install Debian's etcd-server package (apt-get install etcd-server)",
        )
}

/// A loopback port nobody listens on now (the kernel's pick; another
/// process could take it before it is used, which a test would show).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}
