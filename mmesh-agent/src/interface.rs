//! Interfaces and their roles.

use std::{fmt, str::FromStr};

use crate::netlink;
pub use crate::netlink::Link;

/// `ARPHRD_ETHER`: the link type of Ethernet devices (veth and tap too).
const ARPHRD_ETHER: u16 = 1;

/// How an interface sits relative to the accounts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The host's edge: receive is inbound to accounts, transmit is outbound
    /// from them.
    Uplink,
    /// The host side of a VM or container device: receive is what the
    /// account behind it sends (outbound), transmit is what it receives
    /// (inbound).
    Workload,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Uplink => "uplink",
            Self::Workload => "workload",
        })
    }
}

/// `NAME` or `NAME:ROLE` from the command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InterfaceSpec {
    pub name: String,
    pub role: Role,
}

impl FromStr for InterfaceSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, role) = match s.rsplit_once(':') {
            Some((name, "uplink")) => (name, Role::Uplink),
            Some((name, "workload")) => (name, Role::Workload),
            Some((_, other)) => {
                return Err(format!(
                    "unknown role {other:?} in {s:?}: use NAME, NAME:uplink or NAME:workload"
                ));
            }
            None => (s, Role::Uplink),
        };
        if name.is_empty()
            || name.len() >= libc::IFNAMSIZ
            || name.contains('/')
            || name.chars().any(char::is_whitespace)
        {
            return Err(format!("{name:?} is not an interface name"));
        }
        Ok(Self {
            name: name.to_owned(),
            role,
        })
    }
}

/// Why an interface cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum InterfaceError {
    #[error(
        "interface {0} does not exist in this network namespace; `ip link` lists the interfaces"
    )]
    Unknown(String),
    #[error(
        "interface {name} is not an Ethernet device (link type {link_type}); mmesh parses Ethernet frames only"
    )]
    NotEthernet { name: String, link_type: u32 },
    #[error(
        "cannot read interface {name} over rtnetlink ({source}); the agent refuses interfaces it cannot check"
    )]
    Unreadable {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "no default route: cannot tell which interface is the uplink; name it with --interface NAME[:uplink|workload]"
    )]
    NoDefaultRoute,
}

/// The interface index of `name`.
pub fn index(name: &str) -> Result<u32, InterfaceError> {
    let c = std::ffi::CString::new(name).map_err(|_| InterfaceError::Unknown(name.to_owned()))?;
    // SAFETY: a valid NUL-terminated string.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => Err(InterfaceError::Unknown(name.to_owned())),
        i => Ok(i),
    }
}

/// Checks that `name` exists and carries Ethernet frames (`ARPHRD_ETHER`);
/// returns its index.
pub fn check(name: &str) -> Result<u32, InterfaceError> {
    describe(name).map(|link| link.index)
}

/// The interface `name` of the agent's own network namespace, read over
/// rtnetlink, if it carries Ethernet frames. Anything that cannot be read
/// refuses the interface: attaching a parser of Ethernet frames to a device
/// of another kind (a tun device hands over bare IP packets) would misread
/// every packet.
pub fn describe(name: &str) -> Result<Link, InterfaceError> {
    let link = netlink::link(name)
        .map_err(|source| InterfaceError::Unreadable {
            name: name.to_owned(),
            source,
        })?
        .ok_or_else(|| InterfaceError::Unknown(name.to_owned()))?;
    if link.link_type != ARPHRD_ETHER {
        return Err(InterfaceError::NotEthernet {
            name: name.to_owned(),
            link_type: u32::from(link.link_type),
        });
    }
    Ok(link)
}

/// The interface of the default route: IPv4 first (lowest metric), then IPv6.
pub fn default_route() -> Result<String, InterfaceError> {
    if let Ok(table) = std::fs::read_to_string("/proc/net/route")
        && let Some(name) = default_v4(&table)
    {
        return Ok(name);
    }
    if let Ok(table) = std::fs::read_to_string("/proc/net/ipv6_route")
        && let Some(name) = default_v6(&table)
    {
        return Ok(name);
    }
    Err(InterfaceError::NoDefaultRoute)
}

/// `/proc/net/route`: `Iface Destination Gateway Flags RefCnt Use Metric Mask ...`
fn default_v4(table: &str) -> Option<String> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (iface, dest, flags, metric, mask) =
                (f.first()?, f.get(1)?, f.get(3)?, f.get(6)?, f.get(7)?);
            let up = u32::from_str_radix(flags, 16).ok()? & 1 != 0;
            (up && *dest == "00000000" && *mask == "00000000").then(|| {
                (
                    metric.parse::<u32>().unwrap_or(u32::MAX),
                    (*iface).to_owned(),
                )
            })
        })
        .min()
        .map(|(_, iface)| iface)
}

/// `/proc/net/ipv6_route`: `dest dest_len src src_len next_hop metric refcnt use flags iface`
fn default_v6(table: &str) -> Option<String> {
    table
        .lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (dest, len, metric, iface) = (f.first()?, f.get(1)?, f.get(5)?, f.get(9)?);
            (dest.bytes().all(|b| b == b'0') && *len == "00" && *iface != "lo").then(|| {
                (
                    u32::from_str_radix(metric, 16).unwrap_or(u32::MAX),
                    (*iface).to_owned(),
                )
            })
        })
        .min()
        .map(|(_, iface)| iface)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs() {
        assert_eq!(
            "eth0".parse(),
            Ok(InterfaceSpec {
                name: "eth0".into(),
                role: Role::Uplink
            })
        );
        assert_eq!(
            "veth1:workload".parse(),
            Ok(InterfaceSpec {
                name: "veth1".into(),
                role: Role::Workload
            })
        );
        assert!(
            "eth0:sideways"
                .parse::<InterfaceSpec>()
                .unwrap_err()
                .contains("unknown role \"sideways\"")
        );
        assert!(":uplink".parse::<InterfaceSpec>().is_err());
        assert!(
            "a-name-longer-than-fifteen"
                .parse::<InterfaceSpec>()
                .is_err()
        );
    }

    #[test]
    fn default_routes() {
        let v4 = "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\tMTU\tWindow\tIRTT\n\
                  eth1\t00000000\t0101A8C0\t0003\t0\t0\t200\t00000000\t0\t0\t0\n\
                  eth0\t00000000\t0101A8C0\t0003\t0\t0\t100\t00000000\t0\t0\t0\n\
                  eth0\t0001A8C0\t00000000\t0001\t0\t0\t100\t00FFFFFF\t0\t0\t0\n";
        assert_eq!(default_v4(v4).as_deref(), Some("eth0"));
        assert_eq!(default_v4("Iface\tDestination\n"), None);
        let v6 = "00000000000000000000000000000000 00 00000000000000000000000000000000 00 fe800000000000000000000000000001 00000400 00000001 00000000 00000003 ens5\n\
                  00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 ffffffff 00000001 00000000 00200200 lo\n";
        assert_eq!(default_v6(v6).as_deref(), Some("ens5"));
    }
}
