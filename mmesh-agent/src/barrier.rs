//! Waiting for programs that may still read the previous policy half.
//!
//! After the agent flips `CONFIG.active`, a packet whose program read the old
//! value may still be looking up entries of the old half. Before the agent
//! rewrites that half it must wait for those programs to finish. XDP and TC
//! programs run inside RCU read-side critical sections, so an RCU grace
//! period is exactly that wait, and the kernel offers one to user space
//! through a side effect: every update of a map-in-map
//! (`BPF_MAP_TYPE_ARRAY_OF_MAPS`) ends with `synchronize_rcu()` so that the
//! caller knows no program still uses the old inner map
//! (`maybe_wait_bpf_programs()` in kernel/bpf/syscall.c, since 5.0).
//!
//! The barrier is a one-slot array-of-maps that no program uses; updating
//! its slot is the wait. aya 0.14 cannot create a standalone map-in-map, so
//! this uses the `bpf(2)` syscall directly.

use std::{
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_MAP_TYPE_ARRAY_OF_MAPS: u32 = 12;

/// A grace-period barrier for running BPF programs.
#[derive(Debug)]
pub struct ProgramBarrier {
    outer: OwnedFd,
    inner: OwnedFd,
}

impl ProgramBarrier {
    pub fn new() -> io::Result<Self> {
        let inner = create_map(BPF_MAP_TYPE_ARRAY, 4, 4, 1, None, b"mmesh_barrier_i")?;
        let outer = create_map(
            BPF_MAP_TYPE_ARRAY_OF_MAPS,
            4,
            4,
            1,
            Some(&inner),
            b"mmesh_barrier",
        )?;
        Ok(Self { outer, inner })
    }

    /// Returns once every BPF program that was running when it was called
    /// has finished.
    pub fn wait(&self) -> io::Result<()> {
        let key: u32 = 0;
        let value: u32 = self.inner.as_raw_fd() as u32;
        // union bpf_attr, BPF_MAP_*_ELEM: map_fd u32, pad, key u64, value u64, flags u64.
        let mut attr = [0u64; 4];
        attr[0] = u64::from(self.outer.as_raw_fd() as u32);
        attr[1] = std::ptr::from_ref(&key) as u64;
        attr[2] = std::ptr::from_ref(&value) as u64;
        bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map(drop)
    }
}

fn create_map(
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    inner: Option<&OwnedFd>,
    name: &[u8],
) -> io::Result<OwnedFd> {
    // union bpf_attr, BPF_MAP_CREATE: map_type, key_size, value_size,
    // max_entries, map_flags, inner_map_fd, numa_node (u32 each), then
    // map_name[16]. The rest stays zero.
    let mut attr = [0u64; 8];
    let words: [u32; 7] = [
        map_type,
        key_size,
        value_size,
        max_entries,
        0,
        inner.map_or(0, |fd| fd.as_raw_fd() as u32),
        0,
    ];
    let bytes = attr.as_mut_ptr().cast::<u8>();
    let name = &name[..name.len().min(15)];
    // SAFETY: 7 u32 words (28 bytes) then at most 15 name bytes fit in the
    // 64-byte buffer; the name keeps its terminating zero from the zeroes.
    unsafe {
        std::ptr::copy_nonoverlapping(words.as_ptr().cast::<u8>(), bytes, 28);
        std::ptr::copy_nonoverlapping(name.as_ptr(), bytes.add(28), name.len());
    }
    let fd = bpf(BPF_MAP_CREATE, &mut attr)?;
    // SAFETY: the kernel returned a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn bpf<const N: usize>(cmd: libc::c_long, attr: &mut [u64; N]) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a zero-padded bpf_attr of the size we pass.
    let ret =
        unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), size_of::<[u64; N]>()) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}
