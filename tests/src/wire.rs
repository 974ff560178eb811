//! What the stack and the devices of a test namespace see, for the tests
//! of offloads and wire accounting: a bulk TCP stream, a device's TSO
//! setting, and the IP packets a namespace received.

use std::{
    io::{self, Read as _, Write as _},
    net::{IpAddr, Shutdown, SocketAddr},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    thread,
    time::{Duration, Instant},
};

use crate::netns::{NetNs, tcp_accept};

/// How long a connect, an accept, or a stalled read or write may take.
const STALL: Duration = Duration::from_secs(5);

/// What one bulk stream carried.
#[derive(Clone, Copy, Debug)]
pub struct Stream {
    /// Bytes the receiver read.
    pub bytes: u64,
    /// From the receiver's first byte to its last.
    pub elapsed: Duration,
}

impl Stream {
    /// Goodput in Gbit/s.
    #[must_use]
    pub fn gbps(&self) -> f64 {
        self.bytes as f64 * 8.0 / self.elapsed.as_secs_f64().max(1e-9) / 1e9
    }
}

/// One TCP connection from `src` (an address of `sender`) to `dst` (of
/// `receiver`), written to as fast as the sender can for `duration` or up to
/// `max_bytes`, whichever comes first, and read to the end by the receiver.
/// Either side gives up after [`STALL`] without progress.
pub fn tcp_stream(
    sender: &NetNs,
    src: IpAddr,
    receiver: &NetNs,
    dst: SocketAddr,
    duration: Duration,
    max_bytes: u64,
) -> io::Result<Stream> {
    let listener = receiver.tcp_listener(dst);
    let mut client = sender.tcp_connect(src, dst, STALL)?;
    let mut server = tcp_accept(&listener, STALL)?;
    client.set_write_timeout(Some(STALL))?;
    server.set_read_timeout(Some(STALL))?;
    thread::scope(|s| {
        let reader = s.spawn(move || -> io::Result<Stream> {
            let mut buf = vec![0u8; 1 << 18];
            let mut bytes = 0u64;
            let mut first = None;
            loop {
                let n = server.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                first.get_or_insert_with(Instant::now);
                bytes += n as u64;
            }
            Ok(Stream {
                bytes,
                elapsed: first.map_or(Duration::ZERO, |t| t.elapsed()),
            })
        });
        let chunk = vec![0x5a_u8; 1 << 17];
        let start = Instant::now();
        let mut sent = 0u64;
        while sent < max_bytes && start.elapsed() < duration {
            let n = chunk.len().min((max_bytes - sent) as usize);
            client.write_all(&chunk[..n])?;
            sent += n as u64;
        }
        client.shutdown(Shutdown::Write)?;
        reader
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

/// `struct ethtool_value` (include/uapi/linux/ethtool.h).
#[repr(C)]
struct EthtoolValue {
    cmd: u32,
    data: u32,
}

/// `struct ifreq` with its `ifr_data` member (40 bytes on 64-bit Linux).
#[repr(C)]
struct IfReqData {
    name: [u8; libc::IFNAMSIZ],
    data: *mut libc::c_void,
    _pad: [u8; 16],
}

const ETHTOOL_GTSO: u32 = 0x0000_001e;

/// Whether TCP segmentation offload is on for `dev` of `ns`
/// (`ethtool -k DEV`, `tcp-segmentation-offload`), read with the
/// `ETHTOOL_GTSO` ioctl: ethtool itself is not installed everywhere.
#[must_use]
pub fn tso_enabled(ns: &NetNs, dev: &str) -> bool {
    assert!(dev.len() < libc::IFNAMSIZ, "{dev:?} is not a device name");
    let result = ns.enter(|| -> io::Result<bool> {
        // SAFETY: plain socket(2); the result is checked.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a descriptor we own from here on.
        let socket = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut value = EthtoolValue {
            cmd: ETHTOOL_GTSO,
            data: 0,
        };
        let mut req = IfReqData {
            name: [0; libc::IFNAMSIZ],
            data: (&raw mut value).cast(),
            _pad: [0; 16],
        };
        req.name[..dev.len()].copy_from_slice(dev.as_bytes());
        // SAFETY: `req` names the device and points at an ethtool_value that
        // outlives the call.
        let rc = unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCETHTOOL, &raw mut req) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(value.data != 0)
    });
    result.unwrap_or_else(|e| panic!("ETHTOOL_GTSO of {dev} in {}: {e}", ns.name()))
}

/// IPv4 packets `ns` received, counted by the IP layer as wire packets (a GRO
/// or GSO skb as its segments): the sum of the `IpExt` ECN counters of
/// `/proc/net/netstat` (`InNoECTPkts`, `InECT1Pkts`, `InECT0Pkts`,
/// `InCEPkts`), which every IPv4 packet passing `ip_rcv` adds to.
#[must_use]
pub fn ipv4_packets_received(ns: &NetNs) -> u64 {
    let out = ns
        .command("cat")
        .arg("/proc/net/netstat")
        .output()
        .unwrap_or_else(|e| panic!("reading /proc/net/netstat in {}: {e}", ns.name()));
    assert!(
        out.status.success(),
        "cat /proc/net/netstat in {}",
        ns.name()
    );
    ecn_packets(&String::from_utf8_lossy(&out.stdout)).unwrap_or_else(|| {
        panic!(
            "no IpExt ECN counters in /proc/net/netstat of {}",
            ns.name()
        )
    })
}

/// The sum of the `IpExt` ECN packet counters of a `/proc/net/netstat` text.
fn ecn_packets(netstat: &str) -> Option<u64> {
    let mut lines = netstat.lines().filter(|l| l.starts_with("IpExt:"));
    let names = lines.next()?.split_whitespace();
    let values = lines.next()?.split_whitespace();
    let mut sum = None;
    for (name, value) in names.zip(values) {
        if matches!(
            name,
            "InNoECTPkts" | "InECT1Pkts" | "InECT0Pkts" | "InCEPkts"
        ) {
            *sum.get_or_insert(0) += value.parse::<u64>().ok()?;
        }
    }
    sum
}

#[cfg(test)]
mod tests {
    #[test]
    fn ecn_counters_are_summed() {
        let text = "TcpExt: SyncookiesSent\nTcpExt: 0\n\
                    IpExt: InNoRoutes InOctets InNoECTPkts InECT1Pkts InECT0Pkts InCEPkts\n\
                    IpExt: 3 999 100 1 20 4\n";
        assert_eq!(super::ecn_packets(text), Some(125));
        assert_eq!(super::ecn_packets("TcpExt: A\nTcpExt: 1\n"), None);
    }
}
