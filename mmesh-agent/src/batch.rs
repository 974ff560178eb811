//! `BPF_MAP_UPDATE_BATCH`: many entries of a map in one system call (hash
//! and array maps since kernel 5.6, LPM tries since 5.13; the agent needs
//! 5.15), where one call per entry would cost the first load of a
//! hundred-thousand-account policy a good part of a second. aya 0.14 has no
//! batch operations, so this uses the `bpf(2)` syscall directly.

use std::{
    io,
    os::fd::{AsFd as _, AsRawFd as _},
};

use aya::{Pod, maps::MapData};

const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;

/// Entries per call: bounded so that one call never holds the kernel long.
const CHUNK: usize = 16_384;

/// Writes `keys[i] -> values[i]` for every `i` (flags `BPF_ANY`).
pub fn update<K: Pod, V: Pod>(map: &MapData, keys: &[K], values: &[V]) -> io::Result<()> {
    assert_eq!(keys.len(), values.len(), "one value per key");
    for (keys, values) in keys.chunks(CHUNK).zip(values.chunks(CHUNK)) {
        // union bpf_attr, BPF_MAP_*_BATCH: in_batch, out_batch, keys, values
        // (u64 each), count u32, map_fd u32, elem_flags u64, flags u64.
        let mut attr = [0u64; 7];
        attr[2] = keys.as_ptr() as u64;
        attr[3] = values.as_ptr() as u64;
        attr[4] = (keys.len() as u64) | (u64::from(map.fd().as_fd().as_raw_fd() as u32) << 32);
        // SAFETY: `attr` is a zero-padded bpf_attr of the size passed; the
        // key and value arrays hold `count` elements of the map's sizes (aya
        // checked the sizes when the typed map was made).
        let ret = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_UPDATE_BATCH,
                attr.as_mut_ptr(),
                size_of_val(&attr),
            )
        };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}
