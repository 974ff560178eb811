//! The `bpf(2)` calls aya 0.14 lacks, in one place: creating a standalone
//! map-in-map (for the program barrier), batched map updates, and the
//! agent's own pinned maps (created, pinned, opened and read without an
//! object file).

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;

pub const BPF_MAP_TYPE_HASH: u32 = 1;
pub const BPF_MAP_TYPE_ARRAY: u32 = 2;
pub const BPF_MAP_TYPE_ARRAY_OF_MAPS: u32 = 12;

/// `BPF_MAP_CREATE` of a map without BTF.
pub fn map_create(
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    inner: Option<BorrowedFd<'_>>,
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

/// `BPF_MAP_UPDATE_ELEM` of `key -> value` (flags `BPF_ANY`).
///
/// # Safety
/// `key` and `value` must point to the map's key and value sizes.
pub unsafe fn map_update_elem(
    map: BorrowedFd<'_>,
    key: *const u8,
    value: *const u8,
) -> io::Result<()> {
    // union bpf_attr, BPF_MAP_*_ELEM: map_fd u32, pad, key u64, value u64, flags u64.
    let mut attr = [0u64; 4];
    attr[0] = u64::from(map.as_raw_fd() as u32);
    attr[1] = key as u64;
    attr[2] = value as u64;
    bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map(drop)
}

/// `BPF_MAP_UPDATE_BATCH` of `count` entries (flags `BPF_ANY`).
///
/// # Safety
/// `keys` and `values` must point to `count` keys and values of the map's
/// sizes.
pub unsafe fn map_update_batch(
    map: BorrowedFd<'_>,
    keys: *const u8,
    values: *const u8,
    count: u32,
) -> io::Result<()> {
    // union bpf_attr, BPF_MAP_*_BATCH: in_batch, out_batch, keys, values
    // (u64 each), count u32, map_fd u32, elem_flags u64, flags u64.
    let mut attr = [0u64; 7];
    attr[2] = keys as u64;
    attr[3] = values as u64;
    attr[4] = u64::from(count) | (u64::from(map.as_raw_fd() as u32) << 32);
    bpf(BPF_MAP_UPDATE_BATCH, &mut attr).map(drop)
}

/// `BPF_MAP_LOOKUP_BATCH`: up to `count` entries into `keys` and `values`,
/// resuming after the position `in_batch` (`None`: from the start) and
/// leaving the next position in `out_batch`. Returns the entries read, and
/// whether the map has no more.
///
/// # Safety
/// `keys` and `values` must have room for `count` keys and values of the
/// map's sizes, and `in_batch`/`out_batch` for the map's position token (a
/// key, or a 4-byte bucket index for hash maps).
pub unsafe fn map_lookup_batch(
    map: BorrowedFd<'_>,
    in_batch: Option<*const u8>,
    out_batch: *mut u8,
    keys: *mut u8,
    values: *mut u8,
    count: u32,
) -> io::Result<(u32, bool)> {
    // union bpf_attr, BPF_MAP_*_BATCH: in_batch, out_batch, keys, values
    // (u64 each), count u32, map_fd u32, elem_flags u64, flags u64.
    let mut attr = [0u64; 7];
    attr[0] = in_batch.map_or(0, |p| p as u64);
    attr[1] = out_batch as u64;
    attr[2] = keys as u64;
    attr[3] = values as u64;
    attr[4] = u64::from(count) | (u64::from(map.as_raw_fd() as u32) << 32);
    match bpf(BPF_MAP_LOOKUP_BATCH, &mut attr) {
        // The kernel writes back how many it read, also with ENOENT (the
        // last batch).
        Ok(_) => Ok((attr[4] as u32, false)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok((attr[4] as u32, true)),
        Err(e) => Err(e),
    }
}

/// `BPF_MAP_LOOKUP_ELEM` of `key` into `value`.
///
/// # Safety
/// `key` and `value` must point to the map's key and value sizes.
pub unsafe fn map_lookup_elem(
    map: BorrowedFd<'_>,
    key: *const u8,
    value: *mut u8,
) -> io::Result<()> {
    let mut attr = [0u64; 4];
    attr[0] = u64::from(map.as_raw_fd() as u32);
    attr[1] = key as u64;
    attr[2] = value as u64;
    bpf(BPF_MAP_LOOKUP_ELEM, &mut attr).map(drop)
}

/// `BPF_OBJ_PIN`: pins the object `fd` at `path` on bpffs.
pub fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let path = c_path(path)?;
    // union bpf_attr, BPF_OBJ_*: pathname u64, bpf_fd u32, file_flags u32.
    let mut attr = [0u64; 3];
    attr[0] = path.as_ptr() as u64;
    attr[1] = u64::from(fd.as_raw_fd() as u32);
    bpf(BPF_OBJ_PIN, &mut attr).map(drop)
}

/// `BPF_OBJ_GET`: opens the object pinned at `path`.
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let path = c_path(path)?;
    let mut attr = [0u64; 3];
    attr[0] = path.as_ptr() as u64;
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: the kernel returned a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a path with a NUL byte"))
}

fn bpf<const N: usize>(cmd: libc::c_long, attr: &mut [u64; N]) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a zero-padded bpf_attr of the size we pass; the
    // pointers in it are the callers' to vouch for.
    let ret =
        unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), size_of::<[u64; N]>()) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}
