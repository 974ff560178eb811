//! Why a packet got its verdict. One enum for the kernel, the counters, the
//! event decoder and the summary alike.

/// The reason recorded for a packet: the first decisive check, or the check
/// that matched in monitor mode, or [`Reason::Pass`] when nothing matched.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reason {
    /// An IP packet that no rule matched.
    Pass = 0,
    /// Not IPv4 or IPv6 (ARP, LLDP, ...): always passed.
    NonIp = 1,
    /// A header the parser needed ends beyond the frame.
    Truncated = 2,
    /// A header with impossible contents (IPv4 IHL < 5, TCP data offset < 5,
    /// more than two VLAN tags, more IPv6 extension headers than the walk allows).
    Malformed = 3,
    /// The remote address is in a global block list.
    GlobalBlock = 4,
    /// The remote address is in the account's block list.
    AccountBlock = 5,
    /// Over the account's packets-per-second limit for this direction.
    RatePps = 6,
    /// Over the account's bits-per-second limit for this direction.
    RateBps = 7,
}

impl Reason {
    /// Number of reasons; sizes the counter and sampler maps.
    pub const COUNT: usize = 8;

    pub const ALL: [Self; Self::COUNT] = [
        Self::Pass,
        Self::NonIp,
        Self::Truncated,
        Self::Malformed,
        Self::GlobalBlock,
        Self::AccountBlock,
        Self::RatePps,
        Self::RateBps,
    ];

    #[must_use]
    pub const fn from_u8(value: u8) -> Option<Self> {
        if (value as usize) < Self::COUNT {
            Some(Self::ALL[value as usize])
        } else {
            None
        }
    }

    /// The name used in events, logs and metrics.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Pass => "pass",
            Self::NonIp => "non_ip",
            Self::Truncated => "truncated",
            Self::Malformed => "malformed",
            Self::GlobalBlock => "global_block",
            Self::AccountBlock => "account_block",
            Self::RatePps => "rate_pps",
            Self::RateBps => "rate_bps",
        }
    }
}

/// What happened to the packet.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Verdict {
    /// Passed, no rule matched (reason is `Pass` or `NonIp`).
    Pass = 0,
    /// Dropped.
    Drop = 1,
    /// A rule in monitor mode matched: counted and reported, passed.
    Monitor = 2,
}

impl Verdict {
    pub const COUNT: usize = 3;
    pub const ALL: [Self; Self::COUNT] = [Self::Pass, Self::Drop, Self::Monitor];

    #[must_use]
    pub const fn from_u8(value: u8) -> Option<Self> {
        if (value as usize) < Self::COUNT {
            Some(Self::ALL[value as usize])
        } else {
            None
        }
    }

    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Pass => "pass",
            Self::Drop => "drop",
            Self::Monitor => "monitor",
        }
    }
}

/// Direction relative to the account that owns the local address.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    /// Towards an account's address: the local address is the destination.
    Inbound = 0,
    /// Sent by an account: the local address is the source.
    Outbound = 1,
}

impl Direction {
    pub const COUNT: usize = 2;
    pub const ALL: [Self; Self::COUNT] = [Self::Inbound, Self::Outbound];

    #[must_use]
    pub const fn from_u8(value: u8) -> Option<Self> {
        match value {
            0 => Some(Self::Inbound),
            1 => Some(Self::Outbound),
            _ => None,
        }
    }

    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Inbound => "inbound",
            Self::Outbound => "outbound",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip() {
        for (i, reason) in Reason::ALL.iter().enumerate() {
            assert_eq!(*reason as usize, i);
            assert_eq!(Reason::from_u8(i as u8), Some(*reason));
        }
        assert_eq!(Reason::from_u8(Reason::COUNT as u8), None);
        for (i, verdict) in Verdict::ALL.iter().enumerate() {
            assert_eq!(Verdict::from_u8(i as u8), Some(*verdict));
        }
        assert_eq!(Verdict::from_u8(3), None);
        assert_eq!(Direction::from_u8(1), Some(Direction::Outbound));
        assert_eq!(Direction::from_u8(2), None);
    }
}
