//! The packet parser: Ethernet with up to two VLAN tags, IPv4 (options,
//! fragments), IPv6 (a bounded walk over extension headers), TCP, UDP, ICMP
//! and ICMPv6.
//!
//! Every read goes through [`Cursor::get`], the one bounds-checked accessor:
//! nothing here trusts a length field without checking it against the end of
//! the frame (xdp-tools `parsing_helpers.h` does the same job in C).

use core::mem::size_of;

use mmesh_common::event::EVENT_FRAGMENT;

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;

const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_AH: u8 = 51;
const IPPROTO_ICMPV6: u8 = 58;
const IPPROTO_DSTOPTS: u8 = 60;

/// VLAN tags accepted in front of the IP header (802.1ad outer + 802.1Q inner).
const MAX_VLAN_TAGS: usize = 2;
/// IPv6 extension headers walked before giving up (Cilium walks 8 too).
const MAX_EXT_HEADERS: usize = 8;
/// Largest header offset the walk may reach. Keeps every offset the verifier
/// sees bounded, well below the 64 KiB it accepts for packet pointers.
const MAX_HEADER_OFFSET: usize = 4096;

/// Why a frame could not be parsed. Both are counted under their own reason
/// and get the policy's `malformed` verdict.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum ParseError {
    /// A header ends beyond the frame.
    Truncated,
    /// A header is impossible (see [`mmesh_common::Reason::Malformed`]).
    Malformed,
}

/// The only way to read the frame.
pub struct Cursor {
    data: usize,
    end: usize,
}

impl Cursor {
    #[inline(always)]
    #[must_use]
    pub const fn new(data: usize, end: usize) -> Self {
        Self { data, end }
    }

    /// The header of type `T` at byte `offset`, if it lies wholly in the frame.
    /// `T` holds only bytes (alignment 1), so the reference is always aligned.
    #[inline(always)]
    pub fn get<T>(&self, offset: usize) -> Result<&T, ParseError> {
        if offset > MAX_HEADER_OFFSET {
            return Err(ParseError::Malformed);
        }
        let start = self.data + offset;
        if start + size_of::<T>() > self.end {
            return Err(ParseError::Truncated);
        }
        // SAFETY: [start, start + size_of::<T>()) is inside the frame (checked
        // above, and by the verifier), and T is a byte-only repr(C) struct.
        Ok(unsafe { &*(start as *const T) })
    }
}

#[repr(C)]
struct EthHdr {
    _dst: [u8; 6],
    _src: [u8; 6],
    proto: [u8; 2],
}

#[repr(C)]
struct VlanHdr {
    _tci: [u8; 2],
    proto: [u8; 2],
}

#[repr(C)]
struct Ipv4Hdr {
    version_ihl: u8,
    _tos: u8,
    _total_len: [u8; 2],
    _id: [u8; 2],
    frag: [u8; 2],
    _ttl: u8,
    protocol: u8,
    _check: [u8; 2],
    src: [u8; 4],
    dst: [u8; 4],
}

#[repr(C)]
struct Ipv6Hdr {
    version_class_flow: [u8; 4],
    _payload_len: [u8; 2],
    next_header: u8,
    _hop_limit: u8,
    src: [u8; 16],
    dst: [u8; 16],
}

/// Hop-by-hop, routing, destination options and AH all start like this.
#[repr(C)]
struct ExtHdr {
    next_header: u8,
    len: u8,
}

#[repr(C)]
struct FragHdr {
    next_header: u8,
    _reserved: u8,
    offset_flags: [u8; 2],
    _id: [u8; 4],
}

#[repr(C)]
struct TcpHdr {
    sport: [u8; 2],
    dport: [u8; 2],
    _seq: [u8; 4],
    _ack: [u8; 4],
    data_offset: u8,
    _flags: u8,
    _window: [u8; 2],
    _check: [u8; 2],
    _urgent: [u8; 2],
}

#[repr(C)]
struct UdpHdr {
    sport: [u8; 2],
    dport: [u8; 2],
    _len: [u8; 2],
    _check: [u8; 2],
}

#[repr(C)]
struct IcmpHdr {
    kind: u8,
    code: u8,
    _check: [u8; 2],
}

/// Source and destination addresses, in network order.
#[derive(Clone, Copy)]
pub enum Addrs {
    V4 { src: [u8; 4], dst: [u8; 4] },
    V6 { src: [u8; 16], dst: [u8; 16] },
}

/// What the parser learned. On an error it holds what was read before it.
pub struct Packet {
    /// `None` until an IP header has been read.
    pub addrs: Option<Addrs>,
    /// IP protocol (after IPv6 extension headers).
    pub protocol: u8,
    /// `EVENT_*` bits.
    pub flags: u8,
    /// Ports; ICMP type and code for ICMP/ICMPv6; 0 without an L4 header.
    pub sport: u16,
    pub dport: u16,
    /// Bytes of headers in front of the payload, from the Ethernet header
    /// on: through the TCP header with its options, the UDP header, or, for
    /// other protocols and later fragments, the IP header with its options
    /// or extension headers. 0 until an IP header has been read. Every
    /// segment of a GSO packet carries this much on the wire.
    pub headers: u16,
}

impl Default for Packet {
    fn default() -> Self {
        Self::new()
    }
}

impl Packet {
    #[inline(always)]
    #[must_use]
    pub const fn new() -> Self {
        Self {
            addrs: None,
            protocol: 0,
            flags: 0,
            sport: 0,
            dport: 0,
            headers: 0,
        }
    }
}

/// The outcome of a successful parse.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum L3 {
    /// Not IP: passed and counted.
    NonIp,
    /// IPv4 or IPv6, with `Packet::addrs` set.
    Ip,
}

#[inline(always)]
const fn be16(bytes: [u8; 2]) -> u16 {
    u16::from_be_bytes(bytes)
}

/// Parses the frame into `pkt`.
#[inline(always)]
pub fn parse(cur: &Cursor, pkt: &mut Packet) -> Result<L3, ParseError> {
    let eth: &EthHdr = cur.get(0)?;
    let mut proto = be16(eth.proto);
    let mut offset = size_of::<EthHdr>();
    for _ in 0..MAX_VLAN_TAGS {
        if proto != ETH_P_8021Q && proto != ETH_P_8021AD {
            break;
        }
        let vlan: &VlanHdr = cur.get(offset)?;
        proto = be16(vlan.proto);
        offset += size_of::<VlanHdr>();
    }
    match proto {
        ETH_P_IP => parse_ipv4(cur, offset, pkt).map(|()| L3::Ip),
        ETH_P_IPV6 => parse_ipv6(cur, offset, pkt).map(|()| L3::Ip),
        ETH_P_8021Q | ETH_P_8021AD => Err(ParseError::Malformed),
        _ => Ok(L3::NonIp),
    }
}

#[inline(always)]
fn parse_ipv4(cur: &Cursor, offset: usize, pkt: &mut Packet) -> Result<(), ParseError> {
    let ip: &Ipv4Hdr = cur.get(offset)?;
    pkt.addrs = Some(Addrs::V4 {
        src: ip.src,
        dst: ip.dst,
    });
    pkt.protocol = ip.protocol;
    let ihl = usize::from(ip.version_ihl & 0x0f);
    if ip.version_ihl >> 4 != 4 || ihl < 5 {
        return Err(ParseError::Malformed);
    }
    let payload = offset + ihl * 4;
    // Fragment offset (low 13 bits) non-zero: a later fragment, no L4 header.
    if be16(ip.frag) & 0x1fff != 0 {
        pkt.flags |= EVENT_FRAGMENT;
        pkt.headers = payload as u16;
        return Ok(());
    }
    parse_l4(cur, payload, pkt)
}

#[inline(always)]
fn parse_ipv6(cur: &Cursor, offset: usize, pkt: &mut Packet) -> Result<(), ParseError> {
    let ip: &Ipv6Hdr = cur.get(offset)?;
    pkt.addrs = Some(Addrs::V6 {
        src: ip.src,
        dst: ip.dst,
    });
    if ip.version_class_flow[0] >> 4 != 6 {
        return Err(ParseError::Malformed);
    }
    let mut next = ip.next_header;
    let mut offset = offset + size_of::<Ipv6Hdr>();
    for _ in 0..MAX_EXT_HEADERS {
        match next {
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => {
                let ext: &ExtHdr = cur.get(offset)?;
                next = ext.next_header;
                offset += (usize::from(ext.len) + 1) * 8;
            }
            IPPROTO_AH => {
                let ext: &ExtHdr = cur.get(offset)?;
                next = ext.next_header;
                offset += (usize::from(ext.len) + 2) * 4;
            }
            IPPROTO_FRAGMENT => {
                let frag: &FragHdr = cur.get(offset)?;
                next = frag.next_header;
                offset += size_of::<FragHdr>();
                if be16(frag.offset_flags) & 0xfff8 != 0 {
                    pkt.protocol = next;
                    pkt.flags |= EVENT_FRAGMENT;
                    pkt.headers = offset as u16;
                    return Ok(());
                }
            }
            _ => {
                pkt.protocol = next;
                return parse_l4(cur, offset, pkt);
            }
        }
    }
    pkt.protocol = next;
    match next {
        // Still inside the extension-header chain after the bound.
        IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS | IPPROTO_AH | IPPROTO_FRAGMENT => {
            Err(ParseError::Malformed)
        }
        _ => parse_l4(cur, offset, pkt),
    }
}

/// Reads the transport header at `offset` (the end of the IP headers).
#[inline(always)]
fn parse_l4(cur: &Cursor, offset: usize, pkt: &mut Packet) -> Result<(), ParseError> {
    // Until the transport header is read, the headers end with the IP ones
    // (also what a truncated or malformed transport header leaves).
    pkt.headers = offset as u16;
    match pkt.protocol {
        IPPROTO_TCP => {
            let tcp: &TcpHdr = cur.get(offset)?;
            pkt.sport = be16(tcp.sport);
            pkt.dport = be16(tcp.dport);
            let words = usize::from(tcp.data_offset >> 4);
            if words < 5 {
                return Err(ParseError::Malformed);
            }
            pkt.headers = (offset + words * 4) as u16;
        }
        IPPROTO_UDP => {
            let udp: &UdpHdr = cur.get(offset)?;
            pkt.sport = be16(udp.sport);
            pkt.dport = be16(udp.dport);
            pkt.headers = (offset + size_of::<UdpHdr>()) as u16;
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 => {
            let icmp: &IcmpHdr = cur.get(offset)?;
            pkt.sport = u16::from(icmp.kind);
            pkt.dport = u16::from(icmp.code);
        }
        _ => {}
    }
    Ok(())
}
