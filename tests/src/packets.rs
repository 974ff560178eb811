//! Crafted frames for `BPF_PROG_TEST_RUN`.
//!
//! Ordinary frames come from etherparse's builder (checksums and lengths
//! right). The unusual ones the parser must survive (IPv4 options, fragments,
//! IPv6 extension-header chains, broken headers) are laid out byte by byte
//! here, and the tests check the well-formed ones against etherparse's own
//! parser so that a builder mistake cannot pass as a datapath result.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use etherparse::PacketBuilder;

pub const MAC_SRC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const MAC_DST: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_ICMPV6: u8 = 58;

/// IPv6 extension headers the parser walks.
pub const EXT_HOP_BY_HOP: u8 = 0;
pub const EXT_ROUTING: u8 = 43;
pub const EXT_FRAGMENT: u8 = 44;
pub const EXT_DEST_OPTS: u8 = 60;

/// Parses an address literal (test helper).
#[must_use]
pub fn ip(s: &str) -> IpAddr {
    s.parse()
        .unwrap_or_else(|_| panic!("{s:?} is not an IP address"))
}

fn builder(src: IpAddr, dst: IpAddr) -> etherparse::PacketBuilderStep<etherparse::IpHeaders> {
    let eth = PacketBuilder::ethernet2(MAC_SRC, MAC_DST);
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => eth.ipv4(s.octets(), d.octets(), 64),
        (IpAddr::V6(s), IpAddr::V6(d)) => eth.ipv6(s.octets(), d.octets(), 64),
        _ => panic!("{src} and {dst} are of different families"),
    }
}

/// A UDP datagram with `payload` zero bytes.
#[must_use]
pub fn udp(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, payload: usize) -> Vec<u8> {
    let b = builder(src, dst).udp(sport, dport);
    let mut out = Vec::with_capacity(b.size(payload));
    b.write(&mut out, &vec![0; payload])
        .expect("writing to a Vec");
    out
}

/// A TCP segment (SYN) with `payload` zero bytes.
#[must_use]
pub fn tcp(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, payload: usize) -> Vec<u8> {
    let b = builder(src, dst).tcp(sport, dport, 1, 65535).syn();
    let mut out = Vec::with_capacity(b.size(payload));
    b.write(&mut out, &vec![0; payload])
        .expect("writing to a Vec");
    out
}

/// An ICMP or ICMPv6 echo request.
#[must_use]
pub fn echo(src: IpAddr, dst: IpAddr) -> Vec<u8> {
    let mut out = Vec::new();
    match src {
        IpAddr::V4(_) => builder(src, dst)
            .icmpv4_echo_request(7, 1)
            .write(&mut out, &[0; 8]),
        IpAddr::V6(_) => builder(src, dst)
            .icmpv6_echo_request(7, 1)
            .write(&mut out, &[0; 8]),
    }
    .expect("writing to a Vec");
    out
}

/// An ARP request: not IP.
#[must_use]
pub fn arp() -> Vec<u8> {
    let mut f = eth_header(ETH_P_ARP);
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&MAC_SRC);
    f.extend_from_slice(&[10, 0, 0, 1]);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&[10, 0, 0, 2]);
    f
}

fn eth_header(ethertype: u16) -> Vec<u8> {
    let mut f = Vec::with_capacity(128);
    f.extend_from_slice(&MAC_DST);
    f.extend_from_slice(&MAC_SRC);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f
}

/// `frame` with VLAN tags inserted after the MAC addresses, outermost first:
/// `(tpid, vid)`, e.g. `[(ETH_P_8021AD, 100), (ETH_P_8021Q, 200)]`.
#[must_use]
pub fn with_vlans(frame: &[u8], tags: &[(u16, u16)]) -> Vec<u8> {
    let mut out = frame[..12].to_vec();
    for (tpid, vid) in tags {
        out.extend_from_slice(&tpid.to_be_bytes());
        out.extend_from_slice(&vid.to_be_bytes());
    }
    out.extend_from_slice(&frame[12..]);
    out
}

/// A UDP or TCP header (and `payload` zero bytes) laid out by hand.
#[must_use]
pub fn l4_bytes(protocol: u8, sport: u16, dport: u16, payload: usize) -> Vec<u8> {
    let mut l4 = Vec::new();
    l4.extend_from_slice(&sport.to_be_bytes());
    l4.extend_from_slice(&dport.to_be_bytes());
    match protocol {
        PROTO_UDP => {
            l4.extend_from_slice(&((8 + payload) as u16).to_be_bytes());
            l4.extend_from_slice(&[0, 0]);
        }
        PROTO_TCP => {
            l4.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 5 << 4, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
        }
        _ => panic!("l4_bytes builds UDP or TCP, not protocol {protocol}"),
    }
    l4.resize(l4.len() + payload, 0);
    l4
}

/// An IPv4 packet laid out by hand.
#[derive(Clone, Debug)]
pub struct Ipv4 {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub protocol: u8,
    /// Option bytes (padded with end-of-list to a multiple of four).
    pub options: Vec<u8>,
    /// Fragment offset in 8-byte units.
    pub frag_offset: u16,
    pub more_fragments: bool,
    /// Overrides the version/IHL byte (for malformed headers).
    pub version_ihl: Option<u8>,
    pub payload: Vec<u8>,
}

impl Ipv4 {
    #[must_use]
    pub fn new(src: &str, dst: &str, protocol: u8, payload: Vec<u8>) -> Self {
        Self {
            src: src.parse().expect("IPv4 address"),
            dst: dst.parse().expect("IPv4 address"),
            protocol,
            options: Vec::new(),
            frag_offset: 0,
            more_fragments: false,
            version_ihl: None,
            payload,
        }
    }

    /// The Ethernet frame.
    #[must_use]
    pub fn frame(&self) -> Vec<u8> {
        let mut options = self.options.clone();
        while !options.len().is_multiple_of(4) {
            options.push(0);
        }
        let ihl = 5 + options.len() / 4;
        assert!(ihl <= 15, "at most 40 option bytes");
        let total = 4 * ihl + self.payload.len();
        let frag = (u16::from(self.more_fragments) << 13) | (self.frag_offset & 0x1fff);
        let mut f = eth_header(ETH_P_IP);
        f.push(self.version_ihl.unwrap_or(0x40 | ihl as u8));
        f.push(0);
        f.extend_from_slice(&(total as u16).to_be_bytes());
        f.extend_from_slice(&[0x12, 0x34]);
        f.extend_from_slice(&frag.to_be_bytes());
        f.extend_from_slice(&[64, self.protocol, 0, 0]);
        f.extend_from_slice(&self.src.octets());
        f.extend_from_slice(&self.dst.octets());
        let start = 14;
        f.extend_from_slice(&options);
        let csum = checksum(&f[start..start + 4 * ihl]);
        f[start + 10..start + 12].copy_from_slice(&csum.to_be_bytes());
        f.extend_from_slice(&self.payload);
        f
    }
}

/// An IPv6 packet with an extension-header chain, laid out by hand.
#[derive(Clone, Debug)]
pub struct Ipv6 {
    pub src: Ipv6Addr,
    pub dst: Ipv6Addr,
    /// Extension headers in order; each becomes an 8-byte header (a fragment
    /// header uses `frag_offset` and `more_fragments`).
    pub extensions: Vec<u8>,
    pub frag_offset: u16,
    pub more_fragments: bool,
    /// The protocol after the extension headers.
    pub protocol: u8,
    pub payload: Vec<u8>,
}

impl Ipv6 {
    #[must_use]
    pub fn new(src: &str, dst: &str, protocol: u8, payload: Vec<u8>) -> Self {
        Self {
            src: src.parse().expect("IPv6 address"),
            dst: dst.parse().expect("IPv6 address"),
            extensions: Vec::new(),
            frag_offset: 0,
            more_fragments: false,
            protocol,
            payload,
        }
    }

    /// The Ethernet frame.
    #[must_use]
    pub fn frame(&self) -> Vec<u8> {
        let mut chain = Vec::new();
        for (i, ext) in self.extensions.iter().enumerate() {
            let next = self.extensions.get(i + 1).copied().unwrap_or(self.protocol);
            if *ext == EXT_FRAGMENT {
                let off = (self.frag_offset << 3) | u16::from(self.more_fragments);
                chain.extend_from_slice(&[next, 0]);
                chain.extend_from_slice(&off.to_be_bytes());
                chain.extend_from_slice(&[0, 0, 0, 9]);
            } else {
                // Hdr Ext Len 0: 8 bytes; a PadN option fills it.
                chain.extend_from_slice(&[next, 0, 1, 4, 0, 0, 0, 0]);
            }
        }
        let first = self.extensions.first().copied().unwrap_or(self.protocol);
        let mut f = eth_header(ETH_P_IPV6);
        f.extend_from_slice(&[0x60, 0, 0, 0]);
        f.extend_from_slice(&((chain.len() + self.payload.len()) as u16).to_be_bytes());
        f.extend_from_slice(&[first, 64]);
        f.extend_from_slice(&self.src.octets());
        f.extend_from_slice(&self.dst.octets());
        f.extend_from_slice(&chain);
        f.extend_from_slice(&self.payload);
        f
    }
}

fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Source, destination, and the transport ports if there are any.
pub type Parsed = (IpAddr, IpAddr, Option<(u16, u16)>);

/// What etherparse's parser sees in a frame. Used to check the hand-made
/// frames.
#[must_use]
pub fn reference_parse(frame: &[u8]) -> Option<Parsed> {
    let sliced = etherparse::SlicedPacket::from_ethernet(frame).ok()?;
    let (src, dst) = match sliced.net? {
        etherparse::NetSlice::Ipv4(ip) => (
            IpAddr::V4(ip.header().source_addr()),
            IpAddr::V4(ip.header().destination_addr()),
        ),
        etherparse::NetSlice::Ipv6(ip) => (
            IpAddr::V6(ip.header().source_addr()),
            IpAddr::V6(ip.header().destination_addr()),
        ),
        etherparse::NetSlice::Arp(_) => return None,
    };
    let ports = match sliced.transport {
        Some(etherparse::TransportSlice::Udp(u)) => Some((u.source_port(), u.destination_port())),
        Some(etherparse::TransportSlice::Tcp(t)) => Some((t.source_port(), t.destination_port())),
        _ => None,
    };
    Some((src, dst, ports))
}
