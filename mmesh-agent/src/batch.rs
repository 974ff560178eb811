//! `BPF_MAP_UPDATE_BATCH`: many entries of a map in one system call (hash
//! and array maps since kernel 5.6, LPM tries since 5.13; the agent needs
//! 5.15), where one call per entry would cost the first load of a
//! hundred-thousand-account policy a good part of a second. aya 0.14 has no
//! batch operations ([`crate::sys`]).

use std::{io, os::fd::AsFd as _};

use aya::{Pod, maps::MapData};

use crate::sys;

/// Entries per call: bounded so that one call never holds the kernel long.
const CHUNK: usize = 16_384;

/// Writes `keys[i] -> values[i]` for every `i` (flags `BPF_ANY`).
pub fn update<K: Pod, V: Pod>(map: &MapData, keys: &[K], values: &[V]) -> io::Result<()> {
    assert_eq!(keys.len(), values.len(), "one value per key");
    for (keys, values) in keys.chunks(CHUNK).zip(values.chunks(CHUNK)) {
        // SAFETY: the key and value arrays hold `count` elements of the
        // map's sizes (aya checked the sizes when the typed map was made).
        unsafe {
            sys::map_update_batch(
                map.fd().as_fd(),
                keys.as_ptr().cast(),
                values.as_ptr().cast(),
                keys.len() as u32,
            )?;
        }
    }
    Ok(())
}
