//! Capabilities: the agent keeps only what it uses.
//!
//! `run` needs `CAP_BPF` (maps, programs, BTF), `CAP_NET_ADMIN` (XDP and TC
//! links, netlink) and `CAP_PERFMON` (the programs read kernel memory through
//! pointers and use the ring buffer as a tracing-capable program). Every
//! other capability is dropped from the effective, permitted, inheritable,
//! ambient and bounding sets before the agent starts any thread (capability
//! sets are per thread; threads inherit them at creation), so that a flaw
//! in the agent cannot be turned into the rest of root's powers. Kernels
//! before 5.11 charged BPF memory to `RLIMIT_MEMLOCK` and would need
//! `CAP_SYS_RESOURCE` too; the agent requires 5.15, which charges it to the
//! memory cgroup instead.

use std::io;

pub const CAP_NET_ADMIN: u32 = 12;
pub const CAP_PERFMON: u32 = 38;
pub const CAP_BPF: u32 = 39;

/// What `run` keeps.
pub const KEEP: [(u32, &str); 3] = [
    (CAP_NET_ADMIN, "CAP_NET_ADMIN"),
    (CAP_PERFMON, "CAP_PERFMON"),
    (CAP_BPF, "CAP_BPF"),
];

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct Header {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Data {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

fn mask(caps: &[(u32, &str)]) -> u64 {
    caps.iter().fold(0, |m, (c, _)| m | (1 << c))
}

fn split(m: u64) -> [u32; 2] {
    [m as u32, (m >> 32) as u32]
}

fn join(lo: u32, hi: u32) -> u64 {
    u64::from(lo) | (u64::from(hi) << 32)
}

/// The effective and permitted sets of this thread.
fn get() -> io::Result<(u64, u64)> {
    let mut header = Header {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [Data::default(); 2];
    // SAFETY: a version-3 header and two data structs, as capget(2) wants.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &raw mut header, data.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((
        join(data[0].effective, data[1].effective),
        join(data[0].permitted, data[1].permitted),
    ))
}

fn last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(63)
        .min(63)
}

/// What [`drop_unneeded`] did.
#[derive(Debug)]
pub struct Dropped {
    /// Capabilities left in the effective set (a subset of [`KEEP`]).
    pub effective: u64,
    /// Whether the bounding set could be cut down too (needs `CAP_SETPCAP`,
    /// which root has and an unprivileged user with ambient capabilities
    /// does not).
    pub bounding: bool,
}

impl Dropped {
    /// The names of the kept capabilities that are missing.
    #[must_use]
    pub fn missing(&self) -> Vec<&'static str> {
        KEEP.iter()
            .filter(|(c, _)| self.effective & (1 << c) == 0)
            .map(|(_, n)| *n)
            .collect()
    }
}

/// Drops every capability but [`KEEP`] from every set of the calling
/// thread. Call it before any other thread starts.
pub fn drop_unneeded() -> io::Result<Dropped> {
    let keep = mask(&KEEP);
    // The bounding set first: dropping from it needs CAP_SETPCAP, which the
    // capset below removes.
    let mut bounding = true;
    for cap in 0..=last_cap() {
        if keep & (1 << cap) != 0 {
            continue;
        }
        // SAFETY: prctl with integer arguments only.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(cap), 0, 0, 0) } != 0 {
            bounding = false;
        }
    }
    // SAFETY: as above; clears the ambient set (fails only on kernels
    // without ambient capabilities, which are all older than 4.3).
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    let (_, permitted) = get()?;
    let kept = permitted & keep;
    let [lo, hi] = split(kept);
    let mut header = Header {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [
        Data {
            effective: lo,
            permitted: lo,
            inheritable: 0,
        },
        Data {
            effective: hi,
            permitted: hi,
            inheritable: 0,
        },
    ];
    // SAFETY: a version-3 header and two data structs, as capset(2) wants.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &raw mut header, data.as_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Dropped {
        effective: get()?.0,
        bounding,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_split_and_join() {
        let m = mask(&KEEP);
        assert_eq!(m, (1 << 12) | (1 << 38) | (1 << 39));
        let [lo, hi] = split(m);
        assert_eq!(join(lo, hi), m);
        assert_eq!(lo, 1 << 12);
        assert_eq!(hi, (1 << 6) | (1 << 7));
    }

    #[test]
    fn a_thread_that_drops_keeps_exactly_the_three() {
        // In a thread of its own: capability sets are per thread, and the
        // test harness's other threads keep theirs.
        let (effective, missing) = std::thread::spawn(|| {
            let before = get().unwrap().0;
            let dropped = drop_unneeded().unwrap();
            (
                (before, dropped.effective, get().unwrap().1),
                dropped.missing(),
            )
        })
        .join()
        .unwrap();
        let (before, after, permitted) = effective;
        assert_eq!(after, before & mask(&KEEP));
        assert_eq!(permitted, after);
        if before & mask(&KEEP) == mask(&KEEP) {
            assert!(missing.is_empty());
        }
    }
}
