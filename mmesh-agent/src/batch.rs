//! `BPF_MAP_UPDATE_BATCH` and `BPF_MAP_LOOKUP_BATCH`: many entries of a map in one system call (hash
//! and array maps since kernel 5.6, LPM tries since 5.13; the agent needs
//! 5.15), where one call per entry would cost the first load of a
//! hundred-thousand-account policy a good part of a second. aya 0.14 has no
//! batch operations ([`crate::sys`]).

use std::{io, os::fd::AsFd as _, time::Duration};

use aya::{Pod, maps::MapData};

use crate::sys;

/// Entries per call: bounded so that one call never holds the kernel long.
const CHUNK: usize = 16_384;

/// Times a call that failed with `ENOMEM` is made again (after 2, 4, … ms).
/// A long batch into an LPM trie on a busy machine failed with `ENOMEM`
/// with gigabytes free (the 100,000 IPv4 account prefixes of a standby
/// half, load average 8 on 2 vCPUs): the tries take their nodes from the
/// BPF memory allocator's per-CPU caches (6.18 here), which the kernel
/// refills asynchronously, and the pause gives it the time. Writes are
/// idempotent (`BPF_ANY`): entries the failed call wrote are written
/// again.
const ENOMEM_RETRIES: u32 = 5;

/// Writes `keys[i] -> values[i]` for every `i` (flags `BPF_ANY`).
pub fn update<K: Pod, V: Pod>(map: &MapData, keys: &[K], values: &[V]) -> io::Result<()> {
    assert_eq!(keys.len(), values.len(), "one value per key");
    for (keys, values) in keys.chunks(CHUNK).zip(values.chunks(CHUNK)) {
        let mut retries = 0;
        loop {
            // SAFETY: the key and value arrays hold `count` elements of the
            // map's sizes (aya checked the sizes when the typed map was made).
            let written = unsafe {
                sys::map_update_batch(
                    map.fd().as_fd(),
                    keys.as_ptr().cast(),
                    values.as_ptr().cast(),
                    keys.len() as u32,
                )
            };
            match written {
                Err(e) if e.raw_os_error() == Some(libc::ENOMEM) && retries < ENOMEM_RETRIES => {
                    retries += 1;
                    std::thread::sleep(Duration::from_millis(1 << retries));
                }
                other => break other?,
            }
        }
    }
    Ok(())
}

/// Every entry of a hash map or an array (maps whose batch position is a
/// 4-byte bucket index or key), in calls of [`CHUNK`] entries.
pub fn lookup_all<K: Pod, V: Pod>(map: &MapData) -> io::Result<Vec<(K, V)>> {
    let mut out = Vec::new();
    batches(map, CHUNK, 1, |keys: &[K], values: &[V]| {
        out.extend(keys.iter().copied().zip(values.iter().copied()));
    })?;
    Ok(out)
}

/// Reads every entry of a hash map or an array (whose batch position is a
/// 4-byte bucket index or key) in calls of `chunk` entries, `per_key`
/// values each (the CPUs of a per-CPU map, else 1), and hands each call's
/// keys and values to `f`.
fn batches<K: Pod, V: Pod>(
    map: &MapData,
    chunk: usize,
    per_key: usize,
    mut f: impl FnMut(&[K], &[V]),
) -> io::Result<()> {
    let fd = map.fd().as_fd();
    let mut keys: Vec<K> = Vec::with_capacity(chunk);
    let mut values: Vec<V> = Vec::with_capacity(chunk * per_key);
    let (mut at, mut next) = (0u32, 0u32);
    let mut first = true;
    loop {
        // SAFETY: room for `chunk` keys and `chunk * per_key` values of the
        // map's sizes (aya checked them when the typed map was made; a
        // per-CPU caller checks the 8-byte stride); the position is a u32
        // (hash bucket or array index).
        let (n, done) = unsafe {
            sys::map_lookup_batch(
                fd,
                (!first).then_some(std::ptr::from_ref(&at).cast()),
                std::ptr::from_mut(&mut next).cast(),
                keys.as_mut_ptr().cast(),
                values.as_mut_ptr().cast(),
                chunk as u32,
            )?
        };
        // SAFETY: the kernel wrote `n` (at most `chunk`) entries.
        unsafe {
            keys.set_len(n as usize);
            values.set_len(n as usize * per_key);
        }
        f(&keys, &values);
        if done {
            return Ok(());
        }
        at = next;
        first = false;
    }
}

/// Bytes of values one call of [`for_each_per_cpu`] asks for at most.
const PER_CPU_CALL_BYTES: usize = 1 << 20;
/// Entries of one call of [`for_each_per_cpu`] at least: a hash map's
/// batch must hold a whole bucket (else `ENOSPC`).
const PER_CPU_MIN_CHUNK: usize = 256;

/// Calls `f` with every entry of a per-CPU hash map or array, its value once
/// per possible CPU (`cpus` of them), read in calls of about 1 MiB of
/// values: one system call for thousands of entries, where one lookup each
/// took a second for a quarter of a million flow-cache entries.
pub fn for_each_per_cpu<K: Pod, V: Pod>(
    map: &MapData,
    cpus: usize,
    mut f: impl FnMut(&K, &[V]),
) -> io::Result<()> {
    // The kernel lays per-CPU values out at 8-byte strides.
    assert_eq!(
        size_of::<V>() % 8,
        0,
        "per-CPU values of a multiple of 8 bytes"
    );
    let cpus = cpus.max(1);
    let chunk = (PER_CPU_CALL_BYTES / (size_of::<V>() * cpus)).clamp(PER_CPU_MIN_CHUNK, CHUNK);
    batches(map, chunk, cpus, |keys: &[K], values: &[V]| {
        for (key, values) in keys.iter().zip(values.chunks(cpus)) {
            f(key, values);
        }
    })
}
