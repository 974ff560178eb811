//! Network namespaces, veth pairs, the `mmesh-agent` process and test
//! traffic, for end-to-end tests and benchmarks.
//!
//! Everything that changes the system is owned by a guard whose `Drop`
//! undoes it, so a failing (panicking) test cleans up too:
//!
//! - [`NetNs`]: a named network namespace (`ip netns add`), deleted on drop.
//!   Deleting a namespace removes its devices, and with them their XDP and
//!   TC attachments.
//! - [`Topology`]: two namespaces, `host` and `remote`, joined by one veth
//!   pair ([`HOST_IF`] ↔ [`REMOTE_IF`]), with static neighbour entries so no
//!   ARP or neighbour discovery crosses the wire.
//! - [`Agent`]: the real `mmesh-agent run` inside a namespace; on drop it gets
//!   SIGTERM, then SIGKILL after a deadline.
//! - [`PolicyFile`]: a policy file in a private temporary directory.
//! - [`UdpSink`]: a receiving socket counting datagrams per source address.
//!
//! Traffic is sent from Rust: [`NetNs::enter`] runs a closure on a thread
//! that joined the namespace, and sockets made there stay in it whatever
//! thread uses them later. All addresses must lie in [`TEST_NET_V4`] or
//! [`TEST_NET_V6`], and traffic only flows between the two namespaces of a
//! [`Topology`].
//!
//! Names are `mmt-<pid>-<tag>…`. A run that is killed (SIGKILL) cannot
//! drop its guards: its agent still gets SIGTERM (see [`Agent`]), and the
//! next run deletes the namespaces and temporary directories of processes
//! that no longer exist.
//!
//! Everything here needs root. Helpers panic with what went wrong (the
//! command, its output) instead of returning errors: they are for tests.

use std::{
    collections::BTreeMap,
    fs::File,
    io::{self, BufRead as _, BufReader, Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex, Once, PoisonError},
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use serde_json::Value;

/// Every test address is in this IPv4 range (private, RFC 1918).
pub const TEST_NET_V4: (Ipv4Addr, u8) = (Ipv4Addr::new(10, 77, 0, 0), 16);
/// Every test address is in this IPv6 range (unique local, RFC 4193).
pub const TEST_NET_V6: (Ipv6Addr, u8) = (Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 0), 16);

/// The veth end in the host namespace (where the agent attaches).
pub const HOST_IF: &str = "mmt-h";
/// The veth end in the remote namespace.
pub const REMOTE_IF: &str = "mmt-r";
/// MAC address of [`HOST_IF`] (locally administered).
pub const HOST_MAC: &str = "02:77:00:00:00:01";
/// MAC address of [`REMOTE_IF`].
pub const REMOTE_MAC: &str = "02:77:00:00:00:02";

/// Prefix of every namespace and temporary directory made here:
/// `mmt-<pid>-<tag>-…`, so that leftovers of a killed run can be told apart.
const NAME_PREFIX: &str = "mmt";

/// How long the agent may take to load, attach and say it is running.
pub const AGENT_READY_TIMEOUT: Duration = Duration::from_secs(20);
/// [`AGENT_READY_TIMEOUT`], unless `$MMESH_AGENT_READY_TIMEOUT` gives
/// seconds: the Linux 6.1 guest of `cargo xtask test --kernel 6.1` emulates
/// its CPU, and the verifier alone takes minutes there.
fn agent_ready_timeout() -> Duration {
    std::env::var("MMESH_AGENT_READY_TIMEOUT")
        .ok()
        .and_then(|s| s.parse().ok())
        .map_or(AGENT_READY_TIMEOUT, Duration::from_secs)
}

/// How long the agent may take to exit after SIGTERM.
pub const AGENT_STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Log line (stderr) the agent writes once attached and enforcing.
pub const AGENT_READY_LINE: &str = "running; SIGHUP reloads the policy";

/// Whether this process runs as root.
#[must_use]
pub fn is_root() -> bool {
    // SAFETY: no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Panics with a clear message unless this process runs as root.
pub fn require_root() {
    assert!(
        is_root(),
        "end-to-end tests create network namespaces and load eBPF programs: run them as root (sudo -E cargo xtask test)"
    );
}

/// Runs `cmd` and returns its stdout; panics with the command, its status and
/// its stderr if it fails.
#[must_use = "use `ip` or `NetNs::ip` to run a command for its effect"]
pub fn run(cmd: &mut Command) -> String {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `ip ARGS`, panicking on failure.
pub fn ip(args: &[&str]) {
    let _ = ip_output(args);
}

/// `ip ARGS`, panicking on failure; returns stdout.
#[must_use]
pub fn ip_output(args: &[&str]) -> String {
    run(Command::new("ip").args(args))
}

/// Runs the tests of one test binary one at a time (hold the guard for
/// the whole test): they share the machine's CPUs, which rate
/// measurements are sensitive to, and names of namespaces and devices.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Polls `cond` every 10 ms until it holds; panics naming `what` after
/// `timeout`.
#[track_caller]
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        thread::sleep(Duration::from_millis(10));
    }
}

/// Names of the network namespaces that exist (`ip netns list`).
#[must_use]
pub fn namespaces() -> Vec<String> {
    ip_output(&["netns", "list"])
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

/// The pid in a name made by [`unique_name`] whose process no longer runs.
fn dead_owner(name: &str) -> Option<u32> {
    let pid = name
        .strip_prefix(NAME_PREFIX)?
        .strip_prefix('-')?
        .split('-')
        .next()?
        .parse::<u32>()
        .ok()?;
    (!Path::new(&format!("/proc/{pid}")).exists()).then_some(pid)
}

/// Deletes namespaces and temporary directories left by test processes that
/// no longer run (a run killed before its guards could drop). Those of live
/// processes, and anything not named by [`unique_name`], are left alone.
fn remove_leftovers() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        for name in namespaces() {
            if let Some(pid) = dead_owner(&name) {
                eprintln!("netns: deleting namespace {name} left by dead test process {pid}");
                let _ = Command::new("ip")
                    .args(["netns", "del", &name])
                    .stdin(Stdio::null())
                    .status();
            }
        }
        let tmp = std::env::temp_dir();
        for entry in std::fs::read_dir(&tmp).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(pid) = dead_owner(&name)
                && entry.file_type().is_ok_and(|t| t.is_dir())
            {
                eprintln!(
                    "netns: removing {} left by dead test process {pid}",
                    entry.path().display()
                );
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    });
}

/// A unique name for something of this process: `mmt-<pid>-<tag>`.
#[must_use]
pub fn unique_name(tag: &str) -> String {
    format!("{NAME_PREFIX}-{}-{tag}", std::process::id())
}

fn in_test_net(addr: IpAddr) -> bool {
    match addr {
        IpAddr::V4(a) => {
            let mask = u32::MAX << (32 - TEST_NET_V4.1);
            u32::from(a) & mask == u32::from(TEST_NET_V4.0)
        }
        IpAddr::V6(a) => {
            let mask = u128::MAX << (128 - TEST_NET_V6.1);
            u128::from(a) & mask == u128::from(TEST_NET_V6.0)
        }
    }
}

// ---------------------------------------------------------------------------
// Pinned datapaths

/// Where [`PinDir`]s are mounted.
const PIN_ROOT: &str = "/run/mmesh-tests";

/// A bpffs of a test's own, for an agent with a pinned datapath:
/// `/run/mmesh-tests/mmt-<pid>-<tag>`, mounted when created. When dropped
/// (also when the test panics) every pin in it is removed, which detaches
/// the links an agent left behind, and it is unmounted and deleted.
///
/// Not under `/sys/fs/bpf`: `ip netns exec` gives the agent a `/sys` of its
/// own, in which a bpffs mounted there by the test would not be seen.
#[derive(Debug)]
pub struct PinDir {
    root: PathBuf,
}

impl PinDir {
    #[must_use = "dropping it removes the pins and unmounts"]
    pub fn new(tag: &str) -> Self {
        require_root();
        remove_pin_leftovers();
        let root = Path::new(PIN_ROOT).join(unique_name(tag));
        std::fs::create_dir_all(&root)
            .unwrap_or_else(|e| panic!("creating {}: {e}", root.display()));
        let _ = run(Command::new("mount").args(["-t", "bpf", "bpf"]).arg(&root));
        Self { root }
    }

    /// The pin directory for the agent's `--bpffs`: below the mount, as
    /// `/sys/fs/bpf/mmesh` is below `/sys/fs/bpf`.
    #[must_use]
    pub fn dir(&self) -> PathBuf {
        self.root.join("mmesh")
    }

    /// Every pinned object under [`PinDir::dir`], by relative path.
    #[must_use]
    pub fn pins(&self) -> Vec<String> {
        fn walk(dir: &Path, base: &Path, out: &mut Vec<String>) {
            for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let path = entry.path();
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    walk(&path, base, out);
                } else if let Ok(rel) = path.strip_prefix(base) {
                    out.push(rel.display().to_string());
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.dir(), &self.dir(), &mut out);
        out.sort();
        out
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        remove_pin_dir(&self.root);
    }
}

fn remove_pin_dir(root: &Path) {
    // Unlinking a pin detaches what only the pin held.
    let _ = std::fs::remove_dir_all(root.join("mmesh"));
    let _ = Command::new("umount")
        .arg("-l")
        .arg(root)
        .stdin(Stdio::null())
        .status();
    let _ = std::fs::remove_dir(root);
}

/// Removes the pin directories of test processes that no longer run.
fn remove_pin_leftovers() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        for entry in std::fs::read_dir(PIN_ROOT).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(pid) = dead_owner(&name) {
                eprintln!(
                    "netns: removing pin directory {} left by dead test process {pid}",
                    entry.path().display()
                );
                remove_pin_dir(&entry.path());
            }
        }
    });
}

// ---------------------------------------------------------------------------
// Namespaces

/// A named network namespace, deleted when dropped.
#[derive(Debug)]
#[must_use = "dropping the guard deletes the namespace"]
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates namespace `name` with its loopback up.
    pub fn create(name: &str) -> Self {
        ip(&["netns", "add", name]);
        let ns = Self {
            name: name.to_owned(),
        };
        ns.ip(&["link", "set", "dev", "lo", "up"]);
        ns
    }

    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The bind mount that names the namespace.
    #[must_use]
    pub fn path(&self) -> PathBuf {
        Path::new("/var/run/netns").join(&self.name)
    }

    /// `ip -n NAME ARGS`, panicking on failure.
    pub fn ip(&self, args: &[&str]) {
        let _ = self.ip_output(args);
    }

    /// `ip -n NAME ARGS`, panicking on failure; returns stdout.
    #[must_use]
    pub fn ip_output(&self, args: &[&str]) -> String {
        run(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// A command that runs `program` inside the namespace
    /// (`ip netns exec NAME program`).
    #[must_use]
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Runs `f` on a thread that joined the namespace and returns its result
    /// (a panic in `f` is passed on). Sockets made by `f` belong to the
    /// namespace for good, whichever thread uses them afterwards.
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = self.path();
        thread::scope(|s| {
            let worker = s.spawn(move || {
                let ns = File::open(&path)
                    .unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
                // SAFETY: a valid namespace fd; setns changes only this thread.
                let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
                assert!(
                    rc == 0,
                    "setns into {}: {}",
                    path.display(),
                    io::Error::last_os_error()
                );
                f()
            });
            worker
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// The interface index of `name` in this namespace.
    #[must_use]
    pub fn ifindex(&self, name: &str) -> u32 {
        let c_name = std::ffi::CString::new(name).expect("interface names have no NUL");
        // SAFETY: a valid NUL-terminated string.
        let index = self.enter(|| unsafe { libc::if_nametoindex(c_name.as_ptr()) });
        assert!(index != 0, "no interface {name} in namespace {}", self.name);
        index
    }

    /// A UDP socket of this namespace bound to `addr` (port 0: any port).
    #[must_use]
    pub fn udp_socket(&self, addr: SocketAddr) -> UdpSocket {
        self.enter(|| UdpSocket::bind(addr))
            .unwrap_or_else(|e| panic!("binding UDP {addr} in {}: {e}", self.name))
    }

    /// A TCP listener of this namespace bound to `addr`.
    #[must_use]
    pub fn tcp_listener(&self, addr: SocketAddr) -> TcpListener {
        self.enter(|| TcpListener::bind(addr))
            .unwrap_or_else(|e| panic!("listening on TCP {addr} in {}: {e}", self.name))
    }

    /// Connects from `src` (any port) to `dst` from this namespace, giving up
    /// after `timeout`.
    pub fn tcp_connect(
        &self,
        src: IpAddr,
        dst: SocketAddr,
        timeout: Duration,
    ) -> io::Result<TcpStream> {
        use socket2::{Domain, Protocol, Socket, Type};
        self.enter(|| {
            let socket = Socket::new(Domain::for_address(dst), Type::STREAM, Some(Protocol::TCP))?;
            socket.bind(&SocketAddr::new(src, 0).into())?;
            socket.connect_timeout(&dst.into(), timeout)?;
            Ok(socket.into())
        })
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        match Command::new("ip")
            .args(["netns", "del", &self.name])
            .stdin(Stdio::null())
            .output()
        {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "netns: deleting namespace {} failed: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            Err(e) => eprintln!("netns: cannot run ip to delete {}: {e}", self.name),
        }
    }
}

/// Two namespaces joined by a veth pair: `host` (the agent's side, with the
/// accounts' addresses on [`HOST_IF`]) and `remote` (the rest of the world,
/// on [`REMOTE_IF`]). Both have on-link routes for the whole of
/// [`TEST_NET_V4`] and [`TEST_NET_V6`]; addresses are added one at a time as
/// /32 and /128 with a permanent neighbour entry on the other side.
///
/// Neighbour entries are static because the agent judges every IP packet:
/// IPv6 neighbour discovery from a blocked source address would be dropped
/// like any other packet from it, and the test would measure that instead of
/// the traffic it sends.
#[derive(Debug)]
#[must_use = "dropping the guard deletes the namespaces"]
pub struct Topology {
    /// Dropped first: deleting either namespace removes the veth pair.
    pub host: NetNs,
    pub remote: NetNs,
}

impl Topology {
    /// Namespaces `mmt-<pid>-<tag>-h` and `-r`, the veth pair up between
    /// them, routes, no addresses yet. `tag` must be unique among the
    /// topologies alive in this process.
    pub fn new(tag: &str) -> Self {
        require_root();
        remove_leftovers();
        let base = unique_name(tag);
        let host = NetNs::create(&format!("{base}-h"));
        let remote = NetNs::create(&format!("{base}-r"));
        let topo = Self { host, remote };
        topo.create_link();
        topo
    }

    /// Creates the veth pair, brings it up and adds the routes.
    fn create_link(&self) {
        self.host.ip(&[
            "link",
            "add",
            HOST_IF,
            "address",
            HOST_MAC,
            "type",
            "veth",
            "peer",
            "name",
            REMOTE_IF,
            "address",
            REMOTE_MAC,
            "netns",
            self.remote.name(),
        ]);
        let v4_net = format!("{}/{}", TEST_NET_V4.0, TEST_NET_V4.1);
        let v6_net = format!("{}/{}", TEST_NET_V6.0, TEST_NET_V6.1);
        for (ns, dev) in [(&self.host, HOST_IF), (&self.remote, REMOTE_IF)] {
            // No link-local address: nothing but the test's own traffic
            // (no DAD, router or multicast listener chatter) on the wire.
            ns.ip(&["link", "set", "dev", dev, "addrgenmode", "none"]);
            ns.ip(&["link", "set", "dev", dev, "up"]);
            ns.ip(&["route", "add", &v4_net, "dev", dev]);
            ns.ip(&["-6", "route", "add", &v6_net, "dev", dev]);
        }
        wait_until("both veth ends to be up", Duration::from_secs(5), || {
            self.host
                .ip_output(&["-br", "link", "show", "dev", HOST_IF])
                .contains(" UP ")
                && self
                    .remote
                    .ip_output(&["-br", "link", "show", "dev", REMOTE_IF])
                    .contains(" UP ")
        });
    }

    /// Deletes the veth pair (what a container runtime does when a
    /// container goes), leaving both namespaces.
    pub fn delete_link(&self) {
        self.host.ip(&["link", "del", "dev", HOST_IF]);
    }

    /// Creates the veth pair again under the same names, with `host_addrs`
    /// and `remote_addrs` (a container restarted on the same interface name).
    pub fn recreate_link(&self, host_addrs: &[IpAddr], remote_addrs: &[IpAddr]) {
        self.create_link();
        self.add_host_addrs(host_addrs);
        self.add_remote_addrs(remote_addrs);
    }

    /// Adds `addrs` to the host side of the veth pair.
    pub fn add_host_addrs(&self, addrs: &[IpAddr]) {
        for &addr in addrs {
            add_addr(&self.host, HOST_IF, &self.remote, REMOTE_IF, HOST_MAC, addr);
        }
        self.wait_addrs_usable(&self.host, HOST_IF);
    }

    /// Makes the remote side send to `addrs` on the host side without the
    /// host holding them (permanent neighbour entries, one `ip -batch`):
    /// for addresses that only the programs at the host's ingress need to
    /// see.
    pub fn add_host_neighbours(&self, addrs: &[IpAddr]) {
        use std::fmt::Write as _;
        let mut batch = String::new();
        for addr in addrs {
            assert!(in_test_net(*addr), "{addr} is outside the test ranges");
            let _ = writeln!(
                batch,
                "neigh replace {addr} lladdr {HOST_MAC} dev {REMOTE_IF} nud permanent"
            );
        }
        let mut child = self
            .remote
            .command("ip")
            .args(["-batch", "-"])
            .stdin(Stdio::piped())
            .spawn()
            .expect("spawning ip -batch");
        child
            .stdin
            .take()
            .expect("piped")
            .write_all(batch.as_bytes())
            .expect("writing to ip -batch");
        let status = child.wait().expect("waiting for ip -batch");
        assert!(status.success(), "ip -batch (neighbours): {status}");
    }

    /// Sends `packets` UDP packets (2,000/s, 64 bytes of payload) from
    /// `src` in the remote namespace to `dst` in the host namespace and
    /// returns how many arrived (counted until 300 ms pass without one).
    #[must_use]
    pub fn udp_arrivals(&self, src: IpAddr, dst: SocketAddr, packets: u64) -> u64 {
        let sink = UdpSink::bind(&self.host, dst);
        let socket = self.remote.udp_socket(SocketAddr::new(src, 0));
        let _ = send_udp(
            &socket,
            sink.local_addr(),
            Pace {
                pps: 2000,
                packets,
                payload: 64,
            },
        );
        sink.finish(Duration::from_millis(300)).packets_from(src)
    }

    /// Adds `addrs` to the remote side of the veth pair.
    pub fn add_remote_addrs(&self, addrs: &[IpAddr]) {
        for &addr in addrs {
            add_addr(
                &self.remote,
                REMOTE_IF,
                &self.host,
                HOST_IF,
                REMOTE_MAC,
                addr,
            );
        }
        self.wait_addrs_usable(&self.remote, REMOTE_IF);
    }

    /// Waits until no IPv6 address of `dev` is tentative (they are added
    /// with `nodad`, so this is at most a formality).
    #[expect(clippy::unused_self, reason = "reads as a step of the topology")]
    fn wait_addrs_usable(&self, ns: &NetNs, dev: &str) {
        wait_until(
            &format!("the IPv6 addresses of {dev} in {} to be usable", ns.name()),
            Duration::from_secs(5),
            || {
                ns.ip_output(&["-6", "addr", "show", "dev", dev, "tentative"])
                    .trim()
                    .is_empty()
            },
        );
    }

    /// The interface index of [`HOST_IF`] in the host namespace (what the
    /// agent's events report as `ifindex`).
    #[must_use]
    pub fn host_ifindex(&self) -> u32 {
        self.host.ifindex(HOST_IF)
    }

    /// `ip -d link show` of [`HOST_IF`]: shows `prog/xdp` while an XDP
    /// program is attached.
    #[must_use]
    pub fn host_link_details(&self) -> String {
        self.host.ip_output(&["-d", "link", "show", "dev", HOST_IF])
    }

    /// The BPF programs attached to [`HOST_IF`], as (hook, program name):
    /// `xdp` from `ip -d link`, `tcx_ingress` and `tcx_egress` from the
    /// kernel's TCX lists.
    #[must_use]
    pub fn host_programs(&self) -> Vec<(&'static str, String)> {
        use aya::programs::{SchedClassifier, TcAttachType};
        let details = self.host_link_details();
        let mut out: Vec<(&'static str, String)> = details
            .split("prog/xdp")
            .skip(1)
            .filter_map(|rest| {
                let mut words = rest.split_whitespace();
                words.find(|w| *w == "name")?;
                Some(("xdp", words.next()?.to_owned()))
            })
            .collect();
        for (hook, side) in [
            ("tcx_ingress", TcAttachType::Ingress),
            ("tcx_egress", TcAttachType::Egress),
        ] {
            let (_, infos) = self
                .host
                .enter(|| SchedClassifier::query_tcx(HOST_IF, side))
                .unwrap_or_else(|e| panic!("querying the {hook} programs of {HOST_IF}: {e}"));
            out.extend(
                infos
                    .iter()
                    .map(|i| (hook, i.name_as_str().unwrap_or("?").to_owned())),
            );
        }
        out
    }
}

fn add_addr(ns: &NetNs, dev: &str, peer: &NetNs, peer_dev: &str, mac: &str, addr: IpAddr) {
    assert!(
        in_test_net(addr),
        "{addr} is outside the test ranges {}/{} and {}/{}",
        TEST_NET_V4.0,
        TEST_NET_V4.1,
        TEST_NET_V6.0,
        TEST_NET_V6.1
    );
    let text = addr.to_string();
    match addr {
        IpAddr::V4(_) => ns.ip(&["addr", "add", &format!("{text}/32"), "dev", dev]),
        IpAddr::V6(_) => ns.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{text}/128"),
            "dev",
            dev,
            "nodad",
        ]),
    }
    peer.ip(&[
        "neigh",
        "replace",
        &text,
        "lladdr",
        mac,
        "dev",
        peer_dev,
        "nud",
        "permanent",
    ]);
}

// ---------------------------------------------------------------------------
// Policy file

/// `run` with the test veth's host end as the uplink and a summary every
/// second, then `extra` (the policy among them).
#[must_use]
pub fn uplink_run_args(extra: &[&str]) -> Vec<String> {
    let uplink = format!("{HOST_IF}:uplink");
    [
        "run",
        "--interface",
        uplink.as_str(),
        "--summary-interval",
        "1",
    ]
    .iter()
    .chain(extra)
    .map(|s| (*s).to_owned())
    .collect()
}
/// A policy file in its own temporary directory, removed on drop.
#[derive(Debug)]
#[must_use = "dropping the guard deletes the file"]
pub struct PolicyFile {
    dir: PathBuf,
    path: PathBuf,
}

impl PolicyFile {
    /// Writes `text` to `<tmp>/mmt-<pid>-<tag>/policy.yaml`.
    pub fn new(tag: &str, text: &str) -> Self {
        remove_leftovers();
        let dir = std::env::temp_dir().join(unique_name(tag));
        if dir.exists() {
            std::fs::remove_dir_all(&dir)
                .unwrap_or_else(|e| panic!("removing stale {}: {e}", dir.display()));
        }
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        let file = Self {
            path: dir.join("policy.yaml"),
            dir,
        };
        file.write(text);
        file
    }

    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// [`uplink_run_args`] on this policy, then `extra`.
    #[must_use]
    pub fn uplink_run_args(&self, extra: &[&str]) -> Vec<String> {
        let policy = self.path.display().to_string();
        let mut args = vec!["--policy", policy.as_str()];
        args.extend_from_slice(extra);
        uplink_run_args(&args)
    }

    /// Replaces the contents atomically (write aside, then rename), so a
    /// reload never reads half a file.
    pub fn write(&self, text: &str) {
        let aside = self.dir.join("policy.yaml.new");
        std::fs::write(&aside, text).unwrap_or_else(|e| panic!("writing {}: {e}", aside.display()));
        std::fs::rename(&aside, &self.path)
            .unwrap_or_else(|e| panic!("renaming to {}: {e}", self.path.display()));
    }
}

impl Drop for PolicyFile {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            eprintln!("netns: removing {}: {e}", self.dir.display());
        }
    }
}

// ---------------------------------------------------------------------------
// The agent

/// The `mmesh-agent` binary: `$MMESH_AGENT_BIN` (set by `cargo xtask test`),
/// else `target/debug/mmesh-agent` of this workspace.
#[must_use]
pub fn agent_binary() -> PathBuf {
    if let Some(bin) = std::env::var_os("MMESH_AGENT_BIN") {
        let bin = PathBuf::from(bin);
        assert!(
            bin.is_file(),
            "MMESH_AGENT_BIN={} does not exist; run `cargo xtask test` or `cargo build -p mmesh-agent`",
            bin.display()
        );
        return bin;
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate is inside the workspace");
    let bin = workspace.join("target/debug/mmesh-agent");
    assert!(
        bin.is_file(),
        "no mmesh-agent binary: MMESH_AGENT_BIN is not set and {} does not exist; run `cargo xtask test`, or `cargo build -p mmesh-agent` first",
        bin.display()
    );
    bin
}

/// `mmesh-agent ARGS` in `ns`, text logs at level info, its output piped;
/// it gets SIGTERM if the thread that spawns it exits.
fn agent_command(ns: &NetNs, args: &[impl AsRef<std::ffi::OsStr>]) -> Command {
    agent_command_through(ns, &[] as &[&str], args)
}

/// [`agent_command`], the agent started through `wrapper` (a program and
/// its arguments that end by executing the command after them, such as
/// `setpriv … --`), inside the namespace.
fn agent_command_through(
    ns: &NetNs,
    wrapper: &[impl AsRef<std::ffi::OsStr>],
    args: &[impl AsRef<std::ffi::OsStr>],
) -> Command {
    let mut cmd = match wrapper.split_first() {
        None => ns.command(agent_binary()),
        Some((program, rest)) => {
            let mut cmd = ns.command(program);
            cmd.args(rest).arg(agent_binary());
            cmd
        }
    };
    let args: Vec<&std::ffi::OsStr> = args.iter().map(AsRef::as_ref).collect();
    cmd.args(&args);
    // `run` without `--bpffs` is ephemeral, as it was before pinning: tests
    // of a pinned datapath say where it goes (a [`PinDir`] of their own).
    if args.first().is_some_and(|a| *a == "run") && !args.iter().any(|a| *a == "--bpffs") {
        cmd.arg("--ephemeral");
    }
    // No admin socket unless the test asks for one (at a path of its own):
    // agents of concurrent test runs would otherwise meet on the default
    // path, and the second would refuse to start.
    if args.first().is_some_and(|a| *a == "run")
        && !args
            .iter()
            .any(|a| *a == "--admin-socket" || *a == "--no-admin-socket")
    {
        cmd.arg("--no-admin-socket");
    }
    cmd.env("MMESH_LOG", "info")
        .env("MMESH_LOG_FORMAT", "text")
        .env_remove("MMESH_POLICY")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: prctl is async-signal-safe and touches no memory of ours.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) == 0 {
                Ok(())
            } else {
                Err(io::Error::last_os_error())
            }
        });
    }
    cmd
}

/// Runs `mmesh-agent ARGS` in `ns` to its end (for commands that should
/// fail or finish by themselves) and returns its status and output; kills
/// it and panics if it runs longer than `timeout`.
#[must_use = "the status and output are what the caller checks"]
pub fn run_agent_to_exit(ns: &NetNs, args: &[&str], timeout: Duration) -> std::process::Output {
    run_agent_to_exit_through(ns, &[], args, timeout)
}

/// [`run_agent_to_exit`], the agent started through `wrapper` (see
/// [`Agent::start_through`]).
#[must_use = "the status and output are what the caller checks"]
pub fn run_agent_to_exit_through(
    ns: &NetNs,
    wrapper: &[&str],
    args: &[&str],
    timeout: Duration,
) -> std::process::Output {
    let mut child = agent_command_through(ns, wrapper, args)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", agent_binary().display()));
    let deadline = Instant::now() + timeout;
    while child.try_wait().ok().flatten().is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            let out = child
                .wait_with_output()
                .expect("waiting for a killed child");
            panic!(
                "mmesh-agent {} still ran after {timeout:?}; stderr:\n{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        thread::sleep(Duration::from_millis(10));
    }
    // The output is small (an error message): the pipes did not fill.
    child
        .wait_with_output()
        .expect("collecting the output of an exited child")
}

/// What the agent wrote, collected by reader threads.
#[derive(Debug, Default)]
struct Output {
    /// stderr lines (logs).
    logs: Mutex<Vec<String>>,
    /// stdout lines that parsed as JSON objects (events).
    events: Mutex<Vec<Value>>,
    /// stdout lines that did not.
    garbage: Mutex<Vec<String>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A running `mmesh-agent run` inside a namespace; stopped when dropped.
///
/// The agent also gets SIGTERM if the thread that started it exits
/// (`PR_SET_PDEATHSIG`), so a killed test process does not leave it behind:
/// start it on the thread that owns the guard.
#[derive(Debug)]
#[must_use = "dropping the guard stops the agent"]
pub struct Agent {
    child: Option<Child>,
    pid: u32,
    output: Arc<Output>,
    readers: Vec<JoinHandle<()>>,
    /// Pipe ends held open and never read ([`Streams`]).
    stalled: Vec<File>,
}

/// What a test does with the agent's stdout and stderr.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Streams {
    /// Both read line by line (events and logs are there to check).
    Read,
    /// stderr's read end closed at once: every log write fails (EPIPE).
    StderrClosed,
    /// stderr never read, its pipe shrunk to one page: full within a few
    /// log lines.
    StderrStalled,
    /// stdout never read, its pipe shrunk to one page: full within a few
    /// events.
    StdoutStalled,
}

/// Shrinks the pipe behind `fd` to one page (`F_SETPIPE_SZ`); best effort
/// (a pipe already holding more cannot shrink, and then fills a little
/// later).
fn shrink_pipe(fd: &impl std::os::fd::AsRawFd) {
    // SAFETY: fcntl on a pipe fd we own.
    unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETPIPE_SZ, 4096) };
}

impl Agent {
    /// Starts `mmesh-agent run --policy POLICY --interface I...
    /// --summary-interval 1` in `ns` and waits until it reports that it is
    /// running; panics with its stderr if it does not within
    /// [`AGENT_READY_TIMEOUT`].
    pub fn start(ns: &NetNs, policy: &Path, interfaces: &[&str]) -> Self {
        let mut args: Vec<String> = vec![
            "run".into(),
            "--policy".into(),
            policy.display().to_string(),
            "--summary-interval".into(),
            "1".into(),
        ];
        for interface in interfaces {
            args.push("--interface".into());
            args.push((*interface).to_owned());
        }
        Self::start_with_args(ns, &args)
    }

    /// Starts the agent binary with `args` in `ns` and waits until it is
    /// running.
    pub fn start_with_args(ns: &NetNs, args: &[String]) -> Self {
        Self::start_with_streams(ns, args, Streams::Read, |agent| {
            agent.log_position(AGENT_READY_LINE, 0).is_some()
        })
    }

    /// Starts the agent binary with `args` in `ns` through `wrapper`, a
    /// program and its arguments that end by executing the agent (`setpriv
    /// --bounding-set … --`, to run it with fewer capabilities), and waits
    /// until it is running.
    pub fn start_through(ns: &NetNs, wrapper: &[&str], args: &[String]) -> Self {
        Self::start_command(
            agent_command_through(ns, wrapper, args),
            args,
            Streams::Read,
            |agent| agent.log_position(AGENT_READY_LINE, 0).is_some(),
        )
    }

    /// Starts the agent binary with `args` in `ns`, its output handled as
    /// `streams` says, and waits until `ready` holds (with stderr unread,
    /// the ready line cannot be awaited: look at the system instead).
    pub fn start_with_streams(
        ns: &NetNs,
        args: &[String],
        streams: Streams,
        ready: impl Fn(&Self) -> bool,
    ) -> Self {
        Self::start_command(agent_command(ns, args), args, streams, ready)
    }

    /// Starts the agent binary with `args` in `ns`, its log filtered by
    /// `filter` (`MMESH_LOG`, e.g. `info,mmesh_agent::agent=debug`), and
    /// waits until it is running.
    pub fn start_with_log(ns: &NetNs, args: &[String], filter: &str) -> Self {
        let mut cmd = agent_command(ns, args);
        cmd.env("MMESH_LOG", filter);
        Self::start_command(cmd, args, Streams::Read, |agent| {
            agent.log_position(AGENT_READY_LINE, 0).is_some()
        })
    }

    fn start_command(
        mut cmd: Command,
        args: &[String],
        streams: Streams,
        ready: impl Fn(&Self) -> bool,
    ) -> Self {
        let bin = agent_binary();
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let pid = child.id();
        let output = Arc::new(Output::default());
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        let mut readers = Vec::new();
        let mut stalled = Vec::new();
        if streams == Streams::StdoutStalled {
            shrink_pipe(&stdout);
            stalled.push(File::from(std::os::fd::OwnedFd::from(stdout)));
        } else {
            let events_out = output.clone();
            readers.push(thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    match serde_json::from_str::<Value>(&line) {
                        Ok(v) if v.is_object() => lock(&events_out.events).push(v),
                        _ => lock(&events_out.garbage).push(line),
                    }
                }
            }));
        }
        match streams {
            Streams::StderrClosed => drop(stderr),
            Streams::StderrStalled => {
                shrink_pipe(&stderr);
                stalled.push(File::from(std::os::fd::OwnedFd::from(stderr)));
            }
            Streams::Read | Streams::StdoutStalled => {
                let logs_out = output.clone();
                readers.push(thread::spawn(move || {
                    for line in BufReader::new(stderr).lines() {
                        let Ok(line) = line else { break };
                        lock(&logs_out.logs).push(line);
                    }
                }));
            }
        }
        let mut agent = Self {
            child: Some(child),
            pid,
            output,
            readers,
            stalled,
        };
        let timeout = agent_ready_timeout();
        let deadline = Instant::now() + timeout;
        loop {
            if ready(&agent) {
                return agent;
            }
            let exited = agent
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                agent.join_readers();
                panic!(
                    "mmesh-agent {} exited ({status}) before it was running; stderr:\n{}",
                    args.join(" "),
                    agent.logs().join("\n")
                );
            }
            if Instant::now() >= deadline {
                let logs = agent.logs().join("\n");
                drop(agent);
                panic!(
                    "mmesh-agent {} did not report {AGENT_READY_LINE:?} within {timeout:?}; stderr:\n{logs}",
                    args.join(" ")
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// The process id of the agent.
    #[must_use]
    pub const fn pid(&self) -> u32 {
        self.pid
    }

    /// Sends `signal` to the agent.
    pub fn signal(&self, signal: libc::c_int) {
        if self.child.is_some() {
            // SAFETY: the pid of our own child, not yet reaped.
            let rc = unsafe { libc::kill(self.pid as libc::pid_t, signal) };
            assert!(
                rc == 0,
                "kill({}, {signal}): {}",
                self.pid,
                io::Error::last_os_error()
            );
        }
    }

    /// kill -9: the agent gets no chance to clean up. Returns once it is
    /// gone and its output is read.
    pub fn kill(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("the agent is running");
        let _ = child.kill();
        let status = child.wait().expect("waiting for a killed agent");
        self.join_readers();
        status
    }

    /// Sends SIGHUP and returns the agent's answer: the next log line that
    /// says "policy in force" or "policy rejected" (panics after 10 s).
    #[must_use = "the answer says whether the policy was reloaded or rejected"]
    pub fn reload(&self) -> String {
        let from = self.logs().len();
        self.signal(libc::SIGHUP);
        let mut answer = None;
        wait_until(
            "the agent to answer SIGHUP",
            Duration::from_secs(10),
            || {
                answer = self.logs()[from..]
                    .iter()
                    .find(|l| l.contains("policy in force") || l.contains("policy rejected"))
                    .cloned();
                answer.is_some()
            },
        );
        answer.expect("waited for it")
    }

    /// The log lines (stderr) so far.
    #[must_use]
    pub fn logs(&self) -> Vec<String> {
        lock(&self.output.logs).clone()
    }

    /// Index of the first log line at or after `from` that contains `needle`.
    #[must_use]
    pub fn log_position(&self, needle: &str, from: usize) -> Option<usize> {
        lock(&self.output.logs)
            .iter()
            .enumerate()
            .skip(from)
            .find(|(_, l)| l.contains(needle))
            .map(|(i, _)| i)
    }

    /// The events (stdout JSON lines) so far.
    #[must_use]
    pub fn events(&self) -> Vec<Value> {
        lock(&self.output.events).clone()
    }

    /// Lines on stdout that were not JSON objects (there should be none).
    #[must_use]
    pub fn stdout_garbage(&self) -> Vec<String> {
        lock(&self.output.garbage).clone()
    }

    /// The events so far that match `pattern` (see [`event_matches`]).
    #[must_use]
    pub fn events_matching(&self, pattern: &Value) -> Vec<Value> {
        lock(&self.output.events)
            .iter()
            .filter(|e| event_matches(e, pattern))
            .cloned()
            .collect()
    }

    /// Waits until an event matches `pattern` (see [`event_matches`]) and
    /// returns it; panics after `timeout`, listing the events seen.
    #[track_caller]
    #[expect(
        clippy::must_use_candidate,
        reason = "waiting is the point; the event is there to inspect"
    )]
    pub fn wait_for_event(&self, pattern: &Value, timeout: Duration) -> Value {
        self.wait_for_event_from(0, pattern, timeout)
    }

    /// As [`Agent::wait_for_event`], among the events from index `from` on
    /// (`events().len()` taken before the traffic of interest).
    #[track_caller]
    pub fn wait_for_event_from(&self, from: usize, pattern: &Value, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let found = lock(&self.output.events)
                .iter()
                .skip(from)
                .find(|e| event_matches(e, pattern))
                .cloned();
            if let Some(e) = found {
                return e;
            }
            if Instant::now() >= deadline {
                let events = self.events();
                let shown: Vec<String> = events
                    .iter()
                    .rev()
                    .take(40)
                    .rev()
                    .map(Value::to_string)
                    .collect();
                panic!(
                    "no event matching {pattern} from event {from} on within {timeout:?}; {} events, the last ones:\n{}\nagent log:\n{}",
                    events.len(),
                    shown.join("\n"),
                    self.logs().join("\n")
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops the agent with SIGTERM, waits for it and for the rest of its
    /// output (still readable afterwards), and returns its exit status.
    /// Panics if it does not exit within [`AGENT_STOP_TIMEOUT`] (it is then
    /// killed) or was stopped before.
    #[must_use = "the exit status is what a stop test checks"]
    pub fn stop(&mut self) -> ExitStatus {
        match self.terminate() {
            Some(Ok(status)) => status,
            Some(Err(status)) => panic!(
                "mmesh-agent did not exit within {AGENT_STOP_TIMEOUT:?} of SIGTERM and was killed ({status}); stderr:\n{}",
                self.logs().join("\n")
            ),
            None => panic!("mmesh-agent {} was already stopped", self.pid),
        }
    }

    /// SIGTERM, wait, SIGKILL. `Some(Ok)` if it exited by itself, `Some(Err)`
    /// if it had to be killed, `None` if it was already stopped.
    fn terminate(&mut self) -> Option<Result<ExitStatus, ExitStatus>> {
        let mut child = self.child.take()?;
        let result = if let Ok(Some(status)) = child.try_wait() {
            Ok(status)
        } else {
            // SAFETY: the pid of our own child, not yet reaped.
            unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGTERM) };
            let deadline = Instant::now() + AGENT_STOP_TIMEOUT;
            loop {
                match child.try_wait() {
                    Ok(Some(status)) => break Ok(status),
                    Ok(None) if Instant::now() < deadline => {
                        thread::sleep(Duration::from_millis(10));
                    }
                    _ => {
                        let _ = child.kill();
                        break Err(child.wait().expect("waiting for a killed child"));
                    }
                }
            }
        };
        self.join_readers();
        Some(result)
    }

    /// Whether the agent process is still there (not exited, not reaped).
    #[must_use]
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    fn join_readers(&mut self) {
        self.stalled.clear();
        // The pipes close when the agent exits, so the readers end.
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(Err(status)) = self.terminate() {
            eprintln!(
                "netns: mmesh-agent {} ignored SIGTERM and was killed ({status})",
                self.pid
            );
        }
    }
}

/// Whether `event` has every field of `pattern` (a JSON object) with the same
/// value; a `null` in the pattern requires the field to be absent.
/// Addresses compare as text: build them with `IpAddr::to_string`, the form
/// the agent writes.
#[must_use]
pub fn event_matches(event: &Value, pattern: &Value) -> bool {
    let Some(fields) = pattern.as_object() else {
        return false;
    };
    fields
        .iter()
        .all(|(key, want)| event.get(key).unwrap_or(&Value::Null) == want)
}

// ---------------------------------------------------------------------------
// Traffic

/// Datagrams and bytes (payload) received from one source.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flow {
    pub packets: u64,
    pub bytes: u64,
}

/// What a [`UdpSink`] received, by source address.
#[derive(Clone, Debug, Default)]
pub struct Received {
    pub by_source: BTreeMap<IpAddr, Flow>,
    /// The first receive error other than a timeout, if any.
    pub error: Option<String>,
}

impl Received {
    /// Datagrams received from `src`.
    #[must_use]
    pub fn packets_from(&self, src: IpAddr) -> u64 {
        self.by_source.get(&src).map_or(0, |f| f.packets)
    }

    /// Datagrams received from anyone.
    #[must_use]
    pub fn total_packets(&self) -> u64 {
        self.by_source.values().map(|f| f.packets).sum()
    }
}

/// The longest a [`UdpSink`] keeps receiving, whatever happens.
const SINK_LIFETIME: Duration = Duration::from_mins(2);

#[derive(Debug, Default)]
struct SinkControl {
    /// Set by `finish`: stop once idle for this long.
    drain: Option<(Instant, Duration)>,
    stop: bool,
}

/// A UDP socket in a namespace whose thread counts what arrives, by source
/// address, until [`UdpSink::finish`].
#[derive(Debug)]
#[must_use = "dropping the sink stops receiving"]
pub struct UdpSink {
    local: SocketAddr,
    control: Arc<Mutex<SinkControl>>,
    thread: Option<JoinHandle<Received>>,
}

impl UdpSink {
    /// Binds `addr` in `ns` (with a large receive buffer, so that the socket
    /// is not what drops) and starts counting.
    pub fn bind(ns: &NetNs, addr: SocketAddr) -> Self {
        let socket = ns.udp_socket(addr);
        let size: libc::c_int = 16 << 20;
        // SAFETY: a valid socket and a c_int option value of the right size.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                (&raw const size).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert!(
            rc == 0,
            "SO_RCVBUFFORCE on {addr}: {}",
            io::Error::last_os_error()
        );
        socket
            .set_read_timeout(Some(Duration::from_millis(20)))
            .expect("setting a read timeout");
        let local = socket.local_addr().expect("a bound socket has an address");
        let control = Arc::new(Mutex::new(SinkControl::default()));
        let shared = control.clone();
        let thread = thread::spawn(move || sink_loop(&socket, &shared));
        Self {
            local,
            control,
            thread: Some(thread),
        }
    }

    /// The address it listens on.
    #[must_use]
    pub const fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Keeps receiving until nothing has arrived for `idle`, then returns
    /// the counts.
    #[must_use]
    pub fn finish(mut self, idle: Duration) -> Received {
        self.drain(idle);
        self.thread
            .take()
            .expect("finish consumes the sink")
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
    }

    /// [`UdpSink::finish`] for several sinks, idle at the same time.
    #[must_use]
    pub fn finish_all(sinks: Vec<Self>, idle: Duration) -> Vec<Received> {
        for sink in &sinks {
            sink.drain(idle);
        }
        sinks.into_iter().map(|s| s.finish(idle)).collect()
    }

    /// From now on, stop once nothing has arrived for `idle`.
    fn drain(&self, idle: Duration) {
        lock(&self.control)
            .drain
            .get_or_insert_with(|| (Instant::now(), idle));
    }
}

impl Drop for UdpSink {
    fn drop(&mut self) {
        lock(&self.control).stop = true;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn sink_loop(socket: &UdpSocket, control: &Mutex<SinkControl>) -> Received {
    let started = Instant::now();
    let mut received = Received::default();
    let mut buf = vec![0u8; 65_536];
    let mut last = started;
    loop {
        match socket.recv_from(&mut buf) {
            Ok((n, from)) => {
                let flow = received.by_source.entry(from.ip()).or_default();
                flow.packets += 1;
                flow.bytes += n as u64;
                last = Instant::now();
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) => {
                received.error.get_or_insert_with(|| e.to_string());
            }
        }
        let control = lock(control);
        if control.stop || started.elapsed() >= SINK_LIFETIME {
            break;
        }
        if let Some((since, idle)) = control.drain
            && since.elapsed() >= idle
            && last.elapsed() >= idle
        {
            break;
        }
    }
    received
}

/// How to send a paced UDP stream.
#[derive(Clone, Copy, Debug)]
pub struct Pace {
    /// Packets per second offered.
    pub pps: u64,
    /// Packets in all.
    pub packets: u64,
    /// UDP payload bytes per packet (the first 8 carry a sequence number).
    pub payload: usize,
}

impl Pace {
    /// `pps` for `duration`.
    #[must_use]
    pub fn for_duration(pps: u64, duration: Duration, payload: usize) -> Self {
        Self {
            pps,
            packets: (u128::from(pps) * duration.as_nanos() / 1_000_000_000) as u64,
            payload,
        }
    }
}

/// What [`send_udp`] did.
#[derive(Clone, Copy, Debug)]
pub struct Sent {
    /// Datagrams handed to the kernel (including failed sends).
    pub packets: u64,
    /// Sends that returned an error.
    pub errors: u64,
    /// Time from the first send to the last.
    pub span: Duration,
}

/// Sends `pace.packets` datagrams to `dst`, spread evenly at `pace.pps`
/// (in small bursts when the timer is coarse). Send errors are counted, not
/// fatal: a datagram the agent drops on transmit may fail to send.
#[must_use = "the span is what a rate measurement divides by"]
pub fn send_udp(socket: &UdpSocket, dst: SocketAddr, pace: Pace) -> Sent {
    assert!(pace.pps > 0, "a rate of 0 packets per second sends nothing");
    let mut payload = vec![0x5a_u8; pace.payload];
    let start = Instant::now();
    let mut last = start;
    let mut sent = 0u64;
    let mut errors = 0u64;
    let at = |n: u64| start + Duration::from_nanos(n.saturating_mul(1_000_000_000) / pace.pps);
    while sent < pace.packets {
        let now = Instant::now();
        while sent < pace.packets && at(sent) <= now {
            let seq = sent.to_be_bytes();
            let n = seq.len().min(payload.len());
            payload[..n].copy_from_slice(&seq[..n]);
            if socket.send_to(&payload, dst).is_err() {
                errors += 1;
            }
            sent += 1;
            last = Instant::now();
        }
        if sent < pace.packets {
            let next = at(sent);
            let now = Instant::now();
            if next > now {
                thread::sleep(next - now);
            }
        }
    }
    Sent {
        packets: sent,
        errors,
        span: last - start,
    }
}

/// Accepts one connection on `listener`, waiting at most `timeout`.
pub fn tcp_accept(listener: &TcpListener, timeout: Duration) -> io::Result<TcpStream> {
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + timeout;
    let result = loop {
        match listener.accept() {
            Ok((conn, _)) => break Ok(conn),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(5));
            }
            Err(e) => break Err(e),
        }
    };
    listener.set_nonblocking(false)?;
    let conn = result?;
    conn.set_nonblocking(false)?;
    Ok(conn)
}

/// Sends `data` over `client` (connected to `listener`) and returns what
/// came back: the server side reads to the end, writes it all back and
/// closes. Each side gives up after `timeout` without progress.
pub fn tcp_echo(
    listener: &TcpListener,
    mut client: TcpStream,
    data: &[u8],
    timeout: Duration,
) -> io::Result<Vec<u8>> {
    thread::scope(|s| {
        let server = s.spawn(|| -> io::Result<()> {
            let mut conn = tcp_accept(listener, timeout)?;
            conn.set_read_timeout(Some(timeout))?;
            conn.set_write_timeout(Some(timeout))?;
            let mut got = Vec::with_capacity(data.len());
            conn.read_to_end(&mut got)?;
            conn.write_all(&got)?;
            conn.shutdown(std::net::Shutdown::Write)
        });
        client.set_read_timeout(Some(timeout))?;
        client.set_write_timeout(Some(timeout))?;
        client.write_all(data)?;
        client.shutdown(std::net::Shutdown::Write)?;
        let mut echoed = Vec::with_capacity(data.len());
        client.read_to_end(&mut echoed)?;
        server
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))?;
        Ok(echoed)
    })
}
