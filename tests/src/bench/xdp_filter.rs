//! xdp-filter (xdp-tools, as Debian ships it) as the peer mmesh is measured
//! against.
//!
//! xdp-filter matches exact values in hash maps: IPv4 and IPv6 addresses,
//! TCP/UDP ports and MAC addresses, each entry flagged as source and/or
//! destination (xdp-tools `xdp-filter/xdpfilt_prog.h`). It has no prefixes,
//! and as built its address maps hold 10,000 entries per family. Debian's
//! package ships one BPF object per (policy, feature set); this module loads
//! `xdpfilt_alw_all.o`: default policy *allow* (a matching packet is
//! dropped, which is what a block list does) with every rule kind compiled
//! in, so that every packet pays for every kind of lookup, as it would under
//! `xdp-filter load --policy allow` with address, port and MAC rules.
//!
//! The object is loaded with aya rather than with the `xdp-filter` command
//! and libxdp: no dispatcher program in front of it, the same attach path as
//! the other receivers of the end-to-end benchmark, and a loaded program that
//! `BPF_PROG_TEST_RUN` can time.
//!
//! Its maps are declared `LIBBPF_PIN_BY_NAME`, and aya pins such maps where
//! it creates them (`/sys/fs/bpf/<name>`), reusing whatever is pinned there
//! already. To share nothing with a real xdp-filter on the host and leave
//! nothing behind, even when killed, the object is loaded on a thread that
//! has a mount namespace of its own with a fresh bpffs on `/sys/fs/bpf`: the
//! pins vanish with that namespace when the thread ends, and the maps live on
//! through their file descriptors.

use std::{
    ffi::CStr,
    io,
    net::{Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use aya::{
    Ebpf, EbpfLoader, Pod,
    maps::{MapData, PerCpuArray, PerCpuHashMap, PerCpuValues},
    programs::Xdp,
    util::nr_cpus,
};
use ipnet::{Ipv4Net, Ipv6Net};

/// The Debian package to install for the object (Debian 12 puts the object
/// in `libxdp1`, which `xdp-tools` depends on).
pub const PACKAGE: &str = "xdp-tools";
/// The object: default allow, every rule kind.
pub const OBJECT: &str = "xdpfilt_alw_all.o";
/// The program in it.
pub const PROGRAM: &str = "xdpfilt_alw_all";
/// Entries of each address map as xdp-filter is built (`max_entries`).
pub const CAPACITY: usize = 10_000;

const MAP_IPV4: &str = "filter_ipv4";
const MAP_IPV6: &str = "filter_ipv6";
const MAP_PORTS: &str = "filter_ports";
const MAP_STATS: &str = "xdp_stats_map";

/// Map value flags (xdp-tools `xdp-filter/common_kern_user.h`); the bits
/// from `COUNTER_SHIFT` (6) up count hits.
const MAP_FLAG_SRC: u64 = 1 << 0;
const MAP_FLAG_DST: u64 = 1 << 1;
const MAP_FLAG_TCP: u64 = 1 << 2;

/// `XDP_DROP`, the index of its record in `xdp_stats_map`.
const XDP_DROP: u32 = 1;

/// `struct xdp_stats_record` (xdp-tools `headers/xdp/xdp_stats_kern_user.h`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct StatsRecord {
    packets: u64,
    bytes: u64,
}

// SAFETY: two u64, no padding.
unsafe impl Pod for StatsRecord {}

/// What xdp-filter is told to drop.
#[derive(Clone, Debug, Default)]
pub struct Rules {
    /// IPv4 source addresses.
    pub src_v4: Vec<Ipv4Addr>,
    /// IPv6 source addresses.
    pub src_v6: Vec<Ipv6Addr>,
    /// TCP destination ports.
    pub dst_tcp_ports: Vec<u16>,
}

impl Rules {
    /// The nearest xdp-filter gets to a policy of global block prefixes:
    /// exact source addresses, `flood_source` first, then the first address
    /// of each prefix, up to `per_family` per family (xdp-filter has no
    /// prefixes; [`CAPACITY`] is what its maps hold as built); and TCP
    /// destination port 25, a port rule like an outbound-SMTP policy, so
    /// that the port map is not empty.
    #[must_use]
    pub fn equivalent(
        global_v4: &[Ipv4Net],
        global_v6: &[Ipv6Net],
        flood_source: Ipv4Addr,
        per_family: usize,
    ) -> Self {
        let mut src_v4 = vec![flood_source];
        src_v4.extend(
            global_v4
                .iter()
                .map(Ipv4Net::network)
                .filter(|a| *a != flood_source)
                .take(per_family.saturating_sub(1)),
        );
        let src_v6 = global_v6
            .iter()
            .map(Ipv6Net::network)
            .take(per_family)
            .collect();
        Self {
            src_v4,
            src_v6,
            dst_tcp_ports: vec![25],
        }
    }
}

/// Where Debian installs the xdp-tools BPF objects, if it is installed.
#[must_use]
pub fn object_path() -> Option<PathBuf> {
    let multiarch = format!("/usr/lib/{}-linux-gnu/bpf", std::env::consts::ARCH);
    [multiarch.as_str(), "/usr/lib/bpf", "/usr/local/lib/bpf"]
        .iter()
        .map(|dir| PathBuf::from(dir).join(OBJECT))
        .find(|p| p.is_file())
}

/// The Debian package and version the object comes from (`libxdp1` in
/// Debian 12, a dependency of `xdp-tools`), for reports.
#[must_use]
pub fn object_origin() -> String {
    let query = |args: &[&str]| {
        Command::new("dpkg-query")
            .args(args)
            .stdin(Stdio::null())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let Some(path) = object_path() else {
        return PACKAGE.to_owned();
    };
    let Some(owner) = query(&["-S", &path.to_string_lossy()])
        .and_then(|line| line.split(':').next().map(str::to_owned))
    else {
        return path.display().to_string();
    };
    let version = query(&["-W", "-f=${Version}", &owner]).unwrap_or_default();
    format!("{owner} {version}")
}

/// xdp-filter's object, loaded and verified, its maps filled, attached
/// nowhere. Dropping it detaches whatever [`XdpFilter::program`] was
/// attached to and frees the maps.
pub struct XdpFilter {
    ebpf: Ebpf,
    rules: Rules,
}

impl XdpFilter {
    /// Loads [`OBJECT`] and writes `rules` into its maps. The address maps
    /// are enlarged when a family has more than [`CAPACITY`] entries (the
    /// `xdp-filter` command could not hold them).
    pub fn load(rules: &Rules) -> Result<Self, String> {
        let path = object_path()
            .ok_or_else(|| format!("{OBJECT} not found: the {PACKAGE} package is not installed"))?;
        let bytes = std::fs::read(&path).map_err(|e| format!("reading {}: {e}", path.display()))?;
        // The ELF parser wants the object 8-byte aligned.
        let mut aligned = vec![0u64; bytes.len().div_ceil(8)];
        // SAFETY: a u64 buffer viewed as at least `bytes.len()` bytes.
        let view = unsafe {
            std::slice::from_raw_parts_mut(aligned.as_mut_ptr().cast::<u8>(), aligned.len() * 8)
        };
        view[..bytes.len()].copy_from_slice(&bytes);
        let object = &view[..bytes.len()];
        let cap_v4 = u32::try_from(rules.src_v4.len().max(CAPACITY)).map_err(|e| e.to_string())?;
        let cap_v6 = u32::try_from(rules.src_v6.len().max(CAPACITY)).map_err(|e| e.to_string())?;
        let mut ebpf = with_private_bpffs(|| {
            EbpfLoader::new()
                .map_max_entries(MAP_IPV4, cap_v4)
                .map_max_entries(MAP_IPV6, cap_v6)
                .load(object)
                .map_err(|e| format!("loading {}: {e}", path.display()))
        })??;
        let prog: &mut Xdp = ebpf
            .program_mut(PROGRAM)
            .ok_or_else(|| format!("{} has no program {PROGRAM}", path.display()))?
            .try_into()
            .map_err(|e| format!("{PROGRAM}: {e}"))?;
        prog.load()
            .map_err(|e| format!("the verifier rejected {PROGRAM}: {e}"))?;
        let cpus = nr_cpus().map_err(|(what, e)| format!("{what}: {e}"))?;
        let flags = |value: u64| {
            PerCpuValues::try_from(vec![value; cpus]).map_err(|e| format!("per-CPU value: {e}"))
        };
        {
            let mut v4: PerCpuHashMap<&mut MapData, [u8; 4], u64> =
                PerCpuHashMap::try_from(map(&mut ebpf, MAP_IPV4)?).map_err(|e| e.to_string())?;
            for addr in &rules.src_v4 {
                v4.insert(addr.octets(), flags(MAP_FLAG_SRC)?, 0)
                    .map_err(|e| format!("{MAP_IPV4}: {e}"))?;
            }
        }
        {
            let mut v6: PerCpuHashMap<&mut MapData, [u8; 16], u64> =
                PerCpuHashMap::try_from(map(&mut ebpf, MAP_IPV6)?).map_err(|e| e.to_string())?;
            for addr in &rules.src_v6 {
                v6.insert(addr.octets(), flags(MAP_FLAG_SRC)?, 0)
                    .map_err(|e| format!("{MAP_IPV6}: {e}"))?;
            }
        }
        {
            let mut ports: PerCpuArray<&mut MapData, u64> =
                PerCpuArray::try_from(map(&mut ebpf, MAP_PORTS)?).map_err(|e| e.to_string())?;
            for port in &rules.dst_tcp_ports {
                // The program looks the port up as it is on the wire.
                let key = u32::from(u16::from_ne_bytes(port.to_be_bytes()));
                ports
                    .set(key, flags(MAP_FLAG_DST | MAP_FLAG_TCP)?, 0)
                    .map_err(|e| format!("{MAP_PORTS}: {e}"))?;
            }
        }
        Ok(Self {
            ebpf,
            rules: rules.clone(),
        })
    }

    /// The loaded program, to attach (from inside the namespace of the
    /// interface) or to run with `BPF_PROG_TEST_RUN`.
    ///
    /// # Panics
    ///
    /// Never: [`XdpFilter::load`] checked the program is there.
    pub fn program(&mut self) -> &mut Xdp {
        self.ebpf
            .program_mut(PROGRAM)
            .expect("checked by load")
            .try_into()
            .expect("checked by load")
    }

    /// The rules in its maps.
    #[must_use]
    pub fn rules(&self) -> &Rules {
        &self.rules
    }

    /// Packets it dropped so far, all CPUs (its own `xdp_stats_map`).
    pub fn dropped(&self) -> Result<u64, String> {
        let stats: PerCpuArray<&MapData, StatsRecord> = PerCpuArray::try_from(
            self.ebpf
                .map(MAP_STATS)
                .ok_or_else(|| format!("{OBJECT} has no map {MAP_STATS}"))?,
        )
        .map_err(|e| e.to_string())?;
        let values = stats
            .get(&XDP_DROP, 0)
            .map_err(|e| format!("{MAP_STATS}: {e}"))?;
        Ok(values.iter().map(|r| r.packets).sum())
    }
}

fn map<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut aya::maps::Map, String> {
    ebpf.map_mut(name)
        .ok_or_else(|| format!("{OBJECT} has no map {name}"))
}

/// Runs `f` on a thread with a private mount namespace and a fresh bpffs on
/// `/sys/fs/bpf` (see the module comment).
fn with_private_bpffs<T: Send>(f: impl FnOnce() -> T + Send) -> Result<T, String> {
    fn check(rc: libc::c_int, what: &str) -> Result<(), String> {
        if rc == 0 {
            Ok(())
        } else {
            Err(format!("{what}: {}", io::Error::last_os_error()))
        }
    }
    thread::scope(|s| {
        s.spawn(|| {
            const ROOT: &CStr = c"/";
            const BPFFS: &CStr = c"/sys/fs/bpf";
            const BPF: &CStr = c"bpf";
            // SAFETY: plain syscalls on constant strings. Unsharing the mount
            // namespace affects this thread only (it unshares its filesystem
            // context too), and the thread ends with `f`.
            unsafe {
                check(
                    libc::unshare(libc::CLONE_NEWNS),
                    "unshare(CLONE_NEWNS) for a private bpffs",
                )?;
                check(
                    libc::mount(
                        std::ptr::null(),
                        ROOT.as_ptr(),
                        std::ptr::null(),
                        libc::MS_REC | libc::MS_PRIVATE,
                        std::ptr::null(),
                    ),
                    "making the private mount namespace private",
                )?;
                check(
                    libc::mount(
                        BPF.as_ptr(),
                        BPFFS.as_ptr(),
                        BPF.as_ptr(),
                        0,
                        std::ptr::null(),
                    ),
                    "mounting a private bpffs on /sys/fs/bpf",
                )?;
            }
            Ok(f())
        })
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// Installs Debian `packages` with apt (running `apt-get update` first if
/// the install alone fails); returns how long it took. The benchmark
/// harness installs the peers it measures against (nftables, ethtool,
/// xdp-tools) this way, so that a fresh machine runs it as it is.
pub fn apt_install(packages: &[&str]) -> Result<Duration, String> {
    let start = Instant::now();
    let install = || {
        Command::new("apt-get")
            .args([
                "-o",
                "DPkg::Lock::Timeout=120",
                "install",
                "-y",
                "-q",
                "--no-install-recommends",
            ])
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .output()
    };
    let fail = |what: &str, out: &std::process::Output| {
        format!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )
    };
    let out = install().map_err(|e| format!("cannot run apt-get: {e}"))?;
    if out.status.success() {
        return Ok(start.elapsed());
    }
    let update = Command::new("apt-get")
        .args(["-o", "DPkg::Lock::Timeout=120", "update", "-q"])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run apt-get: {e}"))?;
    if !update.status.success() {
        return Err(fail("apt-get update", &update));
    }
    let out = install().map_err(|e| format!("cannot run apt-get: {e}"))?;
    if out.status.success() {
        Ok(start.elapsed())
    } else {
        Err(fail(
            &format!("apt-get install {}", packages.join(" ")),
            &out,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equivalent_rules_put_the_flood_source_first() {
        let v4: Vec<Ipv4Net> = ["9.9.9.0/24", "1.2.3.4/32", "5.0.0.0/8"]
            .iter()
            .map(|n| n.parse().expect("literal"))
            .collect();
        let v6: Vec<Ipv6Net> = vec!["2a00::/48".parse().expect("literal")];
        let flood = Ipv4Addr::new(1, 2, 3, 4);
        let rules = Rules::equivalent(&v4, &v6, flood, 2);
        assert_eq!(rules.src_v4, vec![flood, Ipv4Addr::new(9, 9, 9, 0)]);
        assert_eq!(
            rules.src_v6,
            vec!["2a00::".parse::<Ipv6Addr>().expect("literal")]
        );
        assert_eq!(rules.dst_tcp_ports, vec![25]);
    }
}
