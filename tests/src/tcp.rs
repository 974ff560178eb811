//! Bulk TCP between the namespaces of a test: goodput, the sender's TCP
//! counters, and a delay line that gives the path a round-trip time.
//!
//! - [`bulk`]: `streams` TCP connections that send as fast as TCP lets them
//!   for a while; the receiver counts what the application reads, and the
//!   goodput is taken over a window after a warm-up (slow start, the first
//!   loss) so that it shows the steady state.
//! - [`TcpCounters`]: `RetransSegs` and `TCPTimeouts` of a namespace, from
//!   `/proc/net/snmp` and `/proc/net/netstat` as a thread inside it sees them.
//! - [`DelayLine`]: this kernel has no netem, so the round-trip time comes
//!   from a TUN device: the receiver's packets towards the sender are routed
//!   into it, held for the delay by a thread, and sent out of the receiver's
//!   veth with an `AF_PACKET` socket. Only the return path (ACKs) is
//!   delayed: the data, and what the agent sees of it, are untouched.

use std::{
    collections::VecDeque,
    io::{self, Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpStream},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use crate::netns::{NetNs, tcp_accept};

/// How a bulk transfer runs.
#[derive(Clone, Copy, Debug)]
pub struct Bulk {
    /// Parallel connections.
    pub streams: usize,
    /// Sent but not measured: slow start and the first losses.
    pub warmup: Duration,
    /// The measured window.
    pub measure: Duration,
    /// The sender's congestion control (`TCP_CONGESTION`), or the
    /// namespace's default.
    pub congestion: Option<&'static str>,
}

/// What a [`bulk`] transfer delivered.
#[derive(Clone, Copy, Debug)]
pub struct Goodput {
    /// Bytes the receiving application read during the measured window.
    pub bytes: u64,
    /// The measured window as it really was.
    pub window: Duration,
    /// Bytes read from the first connection to the end of the window.
    pub total_bytes: u64,
    /// From the first connection to the end of the window.
    pub total: Duration,
}

impl Goodput {
    /// Goodput in the measured window, bits per second of TCP payload.
    #[must_use]
    pub fn bits_per_second(&self) -> f64 {
        self.bytes as f64 * 8.0 / self.window.as_secs_f64()
    }
}

/// Longest a connection may take to be made.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How often blocked reads and writes look at the clock and the stop flag.
const POLL: Duration = Duration::from_millis(50);
/// Bytes per `write` call.
const CHUNK: usize = 128 * 1024;

/// Sends from `src` in `sender` to `dst` in `receiver` over `how.streams`
/// connections for `how.warmup + how.measure`, and returns what the
/// receiving application read. Panics if a connection cannot be made.
///
/// # Panics
/// If a connection cannot be made or a socket fails.
#[must_use]
pub fn bulk(sender: &NetNs, src: IpAddr, receiver: &NetNs, dst: SocketAddr, how: Bulk) -> Goodput {
    let listener = receiver.tcp_listener(dst);
    let read_bytes = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    thread::scope(|s| {
        let mut readers = Vec::new();
        let mut writers = Vec::new();
        let mut start = None;
        for n in 0..how.streams {
            let conn = sender
                .tcp_connect(src, dst, CONNECT_TIMEOUT)
                .unwrap_or_else(|e| panic!("TCP {src} → {dst} (stream {n}): {e}"));
            if let Some(cc) = how.congestion {
                set_congestion(&conn, cc);
            }
            let conn_in = tcp_accept(&listener, CONNECT_TIMEOUT)
                .unwrap_or_else(|e| panic!("accepting TCP {src} → {dst} (stream {n}): {e}"));
            start.get_or_insert_with(Instant::now);
            let (count, stop) = (&read_bytes, &stop);
            readers.push(s.spawn(move || read_until_stopped(conn_in, count, stop)));
            writers.push(s.spawn(move || write_until_stopped(conn, stop)));
        }
        let start = start.expect("at least one stream");
        thread::sleep(how.warmup.saturating_sub(start.elapsed()));
        let (t1, b1) = (Instant::now(), read_bytes.load(Ordering::Relaxed));
        thread::sleep(how.measure);
        let (t2, b2) = (Instant::now(), read_bytes.load(Ordering::Relaxed));
        stop.store(true, Ordering::Relaxed);
        for h in writers.into_iter().chain(readers) {
            h.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
        }
        Goodput {
            bytes: b2 - b1,
            window: t2 - t1,
            total_bytes: b2,
            total: t2 - start,
        }
    })
}

fn set_congestion(conn: &TcpStream, name: &str) {
    // SAFETY: a valid socket; the option value is the name's bytes.
    let rc = unsafe {
        libc::setsockopt(
            conn.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_CONGESTION,
            name.as_ptr().cast(),
            name.len() as libc::socklen_t,
        )
    };
    assert!(
        rc == 0,
        "TCP_CONGESTION {name}: {} (see net.ipv4.tcp_available_congestion_control)",
        io::Error::last_os_error()
    );
}

fn timed_out(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

fn write_until_stopped(mut conn: TcpStream, stop: &AtomicBool) {
    conn.set_write_timeout(Some(POLL))
        .expect("setting a write timeout");
    let data = vec![0x5a_u8; CHUNK];
    while !stop.load(Ordering::Relaxed) {
        match conn.write(&data) {
            Ok(_) => {}
            Err(e) if timed_out(&e) => {}
            // The receiver closes when told to stop, maybe before we look.
            Err(_) if stop.load(Ordering::Relaxed) => break,
            Err(e) => panic!("TCP send: {e}"),
        }
    }
    // Closing with data unsent is fine: the measurement is over.
    let _ = conn.shutdown(std::net::Shutdown::Both);
}

fn read_until_stopped(mut conn: TcpStream, received: &AtomicU64, stop: &AtomicBool) {
    conn.set_read_timeout(Some(POLL))
        .expect("setting a read timeout");
    let mut buf = vec![0_u8; CHUNK];
    while !stop.load(Ordering::Relaxed) {
        match conn.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                received.fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(e) if timed_out(&e) => {}
            Err(_) if stop.load(Ordering::Relaxed) => break,
            Err(e) => panic!("TCP receive: {e}"),
        }
    }
}

/// Sets the TCP socket buffer limits of `ns` (`net.ipv4.tcp_rmem` and
/// `tcp_wmem`, which are per namespace) to at most `max` bytes, so that a
/// path's bandwidth-delay product, not the buffers, bounds the window.
pub fn set_tcp_buffers(ns: &NetNs, max: usize) {
    ns.enter(|| {
        for name in ["tcp_rmem", "tcp_wmem"] {
            let path = format!("/proc/sys/net/ipv4/{name}");
            std::fs::write(&path, format!("4096 131072 {max}"))
                .unwrap_or_else(|e| panic!("writing {path}: {e}"));
        }
    });
}

/// The TCP counters of a namespace that say how a transfer went.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpCounters {
    /// Segments retransmitted (`Tcp: RetransSegs`).
    pub retrans_segs: u64,
    /// Retransmission timeouts (`TcpExt: TCPTimeouts`).
    pub timeouts: u64,
    /// Segments sent (`Tcp: OutSegs`).
    pub out_segs: u64,
}

impl TcpCounters {
    /// The counters of `ns` now.
    ///
    /// # Panics
    /// If the kernel's tables cannot be read or lack the counters.
    #[must_use]
    pub fn read(ns: &NetNs) -> Self {
        // /proc/net is the namespace of the process's main thread; the
        // thread-self view is the namespace of the thread that reads.
        let (snmp, netstat) = ns.enter(|| {
            let read =
                |p: &str| std::fs::read_to_string(p).unwrap_or_else(|e| panic!("reading {p}: {e}"));
            (
                read("/proc/thread-self/net/snmp"),
                read("/proc/thread-self/net/netstat"),
            )
        });
        let field = |table: &str, prefix: &str, name: &str| {
            proc_field(table, prefix, name)
                .unwrap_or_else(|| panic!("no {prefix} {name} in the kernel's TCP counters"))
        };
        Self {
            retrans_segs: field(&snmp, "Tcp:", "RetransSegs"),
            timeouts: field(&netstat, "TcpExt:", "TCPTimeouts"),
            out_segs: field(&snmp, "Tcp:", "OutSegs"),
        }
    }

    /// The counts since `earlier`.
    #[must_use]
    pub fn since(self, earlier: Self) -> Self {
        Self {
            retrans_segs: self.retrans_segs - earlier.retrans_segs,
            timeouts: self.timeouts - earlier.timeouts,
            out_segs: self.out_segs - earlier.out_segs,
        }
    }
}

/// A field of a `/proc/net/snmp`-style table: a line of names after
/// `prefix`, then a line of values after the same prefix.
fn proc_field(table: &str, prefix: &str, name: &str) -> Option<u64> {
    let mut lines = table.lines().filter(|l| l.starts_with(prefix));
    while let (Some(names), Some(values)) = (lines.next(), lines.next()) {
        let at = names.split_whitespace().position(|n| n == name);
        if let Some(at) = at {
            return values.split_whitespace().nth(at)?.parse().ok();
        }
    }
    None
}

// ---------------------------------------------------------------------------
// Delay line

/// The TUN device a [`DelayLine`] makes.
pub const DELAY_IF: &str = "mmt-dly";

/// Packets a [`DelayLine`] holds at most (beyond: dropped, as a full netem
/// queue would): a second of ACKs at 100,000 per second.
const DELAY_QUEUE: usize = 100_000;

/// Delays what one namespace sends to some addresses: packets routed into a
/// TUN device, held by a thread, then sent out of a veth towards a MAC
/// address. Stopped, and the device removed, when dropped.
#[derive(Debug)]
#[must_use = "dropping the guard removes the delay"]
pub struct DelayLine {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<io::Result<()>>>,
}

impl DelayLine {
    /// In `ns`: routes `to` (host addresses) into a TUN device and relays
    /// what arrives there, `delay` later, out of `dev` to `peer_mac`.
    ///
    /// # Panics
    /// If the device, the routes or the socket cannot be made.
    pub fn start(ns: &NetNs, dev: &str, peer_mac: [u8; 6], to: &[IpAddr], delay: Duration) -> Self {
        let (tun, packet) = ns
            .enter(|| -> io::Result<(OwnedFd, OwnedFd)> {
                Ok((open_tun(DELAY_IF)?, packet_socket()?))
            })
            .unwrap_or_else(|e| panic!("making the delay line in {}: {e}", ns.name()));
        let ifindex = ns.ifindex(dev);
        ns.ip(&["link", "set", "dev", DELAY_IF, "up"]);
        for addr in to {
            let (family, len) = match addr {
                IpAddr::V4(_) => ("-4", 32),
                IpAddr::V6(_) => ("-6", 128),
            };
            ns.ip(&[
                family,
                "route",
                "replace",
                &format!("{addr}/{len}"),
                "dev",
                DELAY_IF,
            ]);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = thread::spawn(move || relay(&tun, &packet, ifindex, peer_mac, delay, &flag));
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for DelayLine {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            match thread.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => eprintln!("delay line: {e}"),
                Err(_) => eprintln!("delay line: the relay thread panicked"),
            }
        }
    }
}

/// `/dev/net/tun` as a TUN device `name` (IP packets, no packet info),
/// non-blocking. The device lives while the descriptor is open.
fn open_tun(name: &str) -> io::Result<OwnedFd> {
    #[repr(C)]
    struct IfReq {
        name: [u8; libc::IFNAMSIZ],
        flags: libc::c_short,
        _pad: [u8; 22],
    }
    // SAFETY: a NUL-terminated path.
    let fd = unsafe {
        libc::open(
            c"/dev/net/tun".as_ptr(),
            libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor we just opened and own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short,
        _pad: [0; 22],
    };
    assert!(
        name.len() < libc::IFNAMSIZ,
        "interface name {name} too long"
    );
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes a struct ifreq, which IfReq is.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &raw mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// An `AF_PACKET` datagram socket that only sends (protocol 0: it receives
/// nothing).
fn packet_socket() -> io::Result<OwnedFd> {
    // SAFETY: no preconditions.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor we just made and own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn relay(
    tun: &OwnedFd,
    packet: &OwnedFd,
    ifindex: u32,
    peer_mac: [u8; 6],
    delay: Duration,
    stop: &AtomicBool,
) -> io::Result<()> {
    let mut queue: VecDeque<(Instant, Vec<u8>)> = VecDeque::new();
    let mut buf = vec![0_u8; 65_536];
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        while queue.front().is_some_and(|(due, _)| *due <= now) {
            let (_, p) = queue.pop_front().expect("looked at it");
            send(packet, ifindex, peer_mac, &p)?;
        }
        let wait = queue.front().map_or(POLL, |(due, _)| {
            due.saturating_duration_since(now).min(POLL)
        });
        let mut pfd = libc::pollfd {
            fd: tun.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // Round up: waking early only loops; waking late delays a packet.
        let ms = wait.as_micros().div_ceil(1000) as libc::c_int;
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&raw mut pfd, 1, ms) } < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
        loop {
            // SAFETY: reading into a buffer of its length.
            let n = unsafe { libc::read(tun.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                break;
            }
            if queue.len() < DELAY_QUEUE {
                queue.push_back((Instant::now() + delay, buf[..n as usize].to_vec()));
            }
        }
    }
    Ok(())
}

fn send(packet: &OwnedFd, ifindex: u32, peer_mac: [u8; 6], ip_packet: &[u8]) -> io::Result<()> {
    let protocol = match ip_packet.first().map(|b| b >> 4) {
        Some(4) => libc::ETH_P_IP,
        Some(6) => libc::ETH_P_IPV6,
        _ => return Ok(()),
    };
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = (protocol as u16).to_be();
    addr.sll_ifindex = ifindex as i32;
    addr.sll_halen = 6;
    addr.sll_addr[..6].copy_from_slice(&peer_mac);
    // SAFETY: a valid socket, buffer and address of the right length.
    let n = unsafe {
        libc::sendto(
            packet.as_raw_fd(),
            ip_packet.as_ptr().cast(),
            ip_packet.len(),
            0,
            (&raw const addr).cast(),
            size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if n < 0 {
        let e = io::Error::last_os_error();
        // A full device queue loses the packet, as a real link would.
        if e.kind() != io::ErrorKind::WouldBlock && e.raw_os_error() != Some(libc::ENOBUFS) {
            return Err(e);
        }
    }
    Ok(())
}
