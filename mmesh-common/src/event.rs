//! The record the kernel writes into the `EVENTS` ring buffer.

/// [`Event::flags`]: the packet is an IP fragment other than the first (no ports).
pub const EVENT_FRAGMENT: u8 = 1 << 0;

/// One sampled decision. Addresses are in network order; an IPv4 address
/// takes the first four bytes. For ICMP and ICMPv6, `sport` holds the type and
/// `dport` the code.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    /// `bpf_ktime_get_ns()`: monotonic nanoseconds since boot.
    pub ts_ns: u64,
    /// The policy generation in force ([`crate::maps::GenConfig::generation`]).
    pub generation: u64,
    /// Account slot, [`crate::maps::NO_ACCOUNT`] when unattributed.
    pub slot: u32,
    /// The list that matched, for list reasons.
    pub list: u32,
    /// Bytes on the wire: for a GSO skb, all its segments with their headers.
    pub len: u32,
    /// Interface the packet was seen on.
    pub ifindex: u32,
    pub direction: u8,
    pub reason: u8,
    pub verdict: u8,
    /// 4, 6, or 0 when the IP header could not be read.
    pub family: u8,
    /// IP protocol (next header after extension headers for IPv6).
    pub protocol: u8,
    /// `EVENT_*` bits.
    pub flags: u8,
    pub sport: u16,
    pub dport: u16,
    /// Padding, as two integers: a zeroed byte array here becomes a call
    /// to a byte-by-byte `memset` in the BPF object, which the verifier
    /// walks again in every state it explores.
    pub _pad16: u16,
    pub _pad32: u32,
    pub src: [u8; 16],
    pub dst: [u8; 16],
}

#[cfg(feature = "user")]
// SAFETY: `#[repr(C)]`, `Copy`, integers and byte arrays with explicit padding.
unsafe impl aya::Pod for Event {}

#[cfg(test)]
mod tests {
    #[test]
    fn event_layout_is_packed_by_hand() {
        assert_eq!(core::mem::size_of::<super::Event>(), 8 + 8 + 16 + 16 + 32);
    }
}
