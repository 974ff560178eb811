//! Which hook an interface's receive program sits on: XDP or TC ingress.
//!
//! Native XDP is the cheapest place to drop a flood, and on a physical
//! device the driver keeps its offloads with an XDP program attached. On the
//! virtual devices a host gives its workloads it is the opposite: native XDP
//! on the host end of a veth makes the kernel turn off TSO and GSO on the
//! peer (the container's end), because a frame that XDP may rewrite has to be
//! one wire packet; a container's TCP then sends every segment through the
//! stack on its own, measured at 15% of its throughput without XDP. A tap
//! behaves alike, and a device without native XDP (a bridge, a VLAN device)
//! would get generic XDP, which copies every GSO or GRO packet into one linear
//! buffer. TC ingress (tcx from Linux 6.6, clsact before) sees the same
//! packets after GRO, as skbs, and changes nothing about offloads.
//!
//! So `auto` takes native XDP for a device on a bus (what a NIC's driver
//! reports: a PCI, virtio or vmbus address) and TC for everything else.

use std::{fmt, io};

use serde::Serialize;

/// `--receive-hook`: how to choose the receive hook of each interface.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ReceiveHook {
    /// XDP on physical devices, TC ingress on virtual ones (veth, tap, ...).
    #[default]
    Auto,
    /// XDP on every interface.
    Xdp,
    /// TC ingress on every interface.
    Tc,
}

impl ReceiveHook {
    /// The hook for a device of `kind`.
    #[must_use]
    pub const fn resolve(self, kind: &DeviceKind) -> Hook {
        match self {
            Self::Xdp => Hook::Xdp,
            Self::Auto if kind.physical => Hook::Xdp,
            Self::Tc | Self::Auto => Hook::Tc,
        }
    }
}

/// Where a receive program is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Hook {
    Xdp,
    /// TC ingress (tcx or clsact, as the transmit side).
    Tc,
}

impl fmt::Display for Hook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Xdp => "xdp",
            Self::Tc => "tc",
        })
    }
}

/// What the kernel says about a device's driver (`ETHTOOL_GDRVINFO`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DeviceKind {
    /// The driver's name (`veth`, `tun`, `bridge`, `ixgbe`, `virtio_net`),
    /// empty when the device has no driver information.
    pub driver: String,
    /// Whether the device sits on a bus: a NIC (or a VM's virtual NIC)
    /// rather than a software device.
    pub physical: bool,
}

impl DeviceKind {
    /// Classifies what `ETHTOOL_GDRVINFO` reported. A NIC driver reports
    /// its bus address (`0000:00:03.0`, `vmbus`); veth reports none, a
    /// bridge `N/A`, tun `tun` or `tap` (a software device in spite of it).
    #[must_use]
    pub fn from_drvinfo(driver: &str, bus_info: &str) -> Self {
        let physical = !bus_info.is_empty() && bus_info != "N/A" && driver != "tun";
        Self {
            driver: driver.to_owned(),
            physical,
        }
    }

    /// A device without driver information (`EOPNOTSUPP`): only software
    /// devices lack it (loopback, dummy); a NIC's driver always has it.
    #[must_use]
    pub const fn software() -> Self {
        Self {
            driver: String::new(),
            physical: false,
        }
    }
}

/// `struct ethtool_drvinfo` (include/uapi/linux/ethtool.h).
#[repr(C)]
struct DrvInfo {
    cmd: u32,
    driver: [u8; 32],
    version: [u8; 32],
    fw_version: [u8; 32],
    bus_info: [u8; 32],
    erom_version: [u8; 32],
    reserved2: [u8; 12],
    n_priv_flags: u32,
    n_stats: u32,
    testinfo_len: u32,
    eedump_len: u32,
    regdump_len: u32,
}

const ETHTOOL_GDRVINFO: u32 = 0x0000_0003;

/// `struct ifreq` with the `ifr_data` member.
#[repr(C)]
struct IfReqData {
    name: [u8; libc::IFNAMSIZ],
    data: *mut libc::c_void,
    /// `struct ifreq` is 40 bytes on 64-bit Linux (its union is 24).
    _pad: [u8; 16],
}

fn c_string(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// Asks the kernel what kind of device `name` is, through the ethtool ioctl
/// on a socket of this process's network namespace. (Not `/sys/class/net`:
/// under `nsenter --net` sysfs still shows the namespace it was mounted in.)
pub fn device_kind(name: &str) -> io::Result<DeviceKind> {
    if name.len() >= libc::IFNAMSIZ {
        return Err(io::Error::from_raw_os_error(libc::ENODEV));
    }
    // SAFETY: plain socket(2); the result is checked.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor we own from here on.
    let socket = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: DrvInfo is integers and byte arrays: all zeroes is valid.
    let mut info: DrvInfo = unsafe { std::mem::zeroed() };
    info.cmd = ETHTOOL_GDRVINFO;
    let mut req = IfReqData {
        name: [0; libc::IFNAMSIZ],
        data: (&raw mut info).cast(),
        _pad: [0; 16],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: `req` names the device and points at a DrvInfo that outlives
    // the call; the kernel writes at most size_of::<DrvInfo>() bytes to it.
    let rc = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&socket),
            libc::SIOCETHTOOL,
            &raw mut req,
        )
    };
    if rc < 0 {
        let err = io::Error::last_os_error();
        return match err.raw_os_error() {
            Some(libc::EOPNOTSUPP) => Ok(DeviceKind::software()),
            _ => Err(err),
        };
    }
    Ok(DeviceKind::from_drvinfo(
        &c_string(&info.driver),
        &c_string(&info.bus_info),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_match_the_kernel() {
        assert_eq!(size_of::<DrvInfo>(), 196);
        assert_eq!(size_of::<IfReqData>(), 40);
    }

    #[test]
    fn drivers_are_classified() {
        // What this machine's kernel reports for each kind of device.
        let nic = DeviceKind::from_drvinfo("virtio_net", "0000:00:03.0");
        let veth = DeviceKind::from_drvinfo("veth", "");
        let tap = DeviceKind::from_drvinfo("tun", "tap");
        let bridge = DeviceKind::from_drvinfo("bridge", "N/A");
        assert!(nic.physical);
        for kind in [&veth, &tap, &bridge, &DeviceKind::software()] {
            assert!(!kind.physical, "{kind:?}");
        }
        assert_eq!(ReceiveHook::Auto.resolve(&nic), Hook::Xdp);
        assert_eq!(ReceiveHook::Auto.resolve(&veth), Hook::Tc);
        assert_eq!(ReceiveHook::Auto.resolve(&tap), Hook::Tc);
        assert_eq!(ReceiveHook::Xdp.resolve(&veth), Hook::Xdp);
        assert_eq!(ReceiveHook::Tc.resolve(&nic), Hook::Tc);
    }

    #[test]
    fn loopback_is_software_and_a_missing_device_an_error() {
        assert_eq!(device_kind("lo").unwrap(), DeviceKind::software());
        let err = device_kind("mmesh-no-such0").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENODEV));
    }
}
