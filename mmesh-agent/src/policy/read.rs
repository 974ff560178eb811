//! Reading a policy's files: regular files only, within a byte budget,
//! until two looks a moment apart agree.

use std::{
    fs::{File, Metadata, OpenOptions},
    io::Read as _,
    os::unix::fs::{FileTypeExt as _, MetadataExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
    time::Duration,
};

use super::{DEFAULT_MAX_POLICY_BYTES, DEFAULT_READ_ATTEMPTS, DEFAULT_SETTLE};
use crate::compile::Capacity;

/// Bounds on reading a policy and its list files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadLimits {
    /// Bytes read for one policy: the policy file and the list files it
    /// names, together (`--max-policy-bytes`).
    pub max_bytes: u64,
    /// Accounts kept while reading (`--max-accounts`); the accounts past it
    /// are only counted, so that an oversized policy is refused without
    /// being built. `None`: no bound (the compiler still checks capacity).
    pub max_accounts: Option<u32>,
    /// Account prefixes per address family (`--max-account-prefixes`).
    pub max_account_prefixes: Option<u32>,
    /// The moment between the two looks at the files that must agree (size,
    /// modification time, identity): a file still being written shows a
    /// difference and is read again. Zero still compares a look taken
    /// before reading each file with one taken after the whole policy was
    /// read.
    pub settle: Duration,
    /// Reads before giving up with "still changing".
    pub attempts: u32,
    /// Whether lists may name local files (`file:`). A policy from a control
    /// plane must not: it could make the agent read any file it can.
    pub list_files: bool,
}

impl Default for ReadLimits {
    /// No bounds on counts and no settling pause: what
    /// [`Policy::from_file`](super::Policy::from_file) uses (tests, benchmarks, tools).
    fn default() -> Self {
        Self {
            max_bytes: DEFAULT_MAX_POLICY_BYTES,
            max_accounts: None,
            max_account_prefixes: None,
            settle: Duration::ZERO,
            attempts: DEFAULT_READ_ATTEMPTS,
            list_files: true,
        }
    }
}

impl ReadLimits {
    /// The bounds of an agent whose maps have `capacity`: counts checked
    /// while reading, [`DEFAULT_SETTLE`] between looks.
    #[must_use]
    pub fn new(max_bytes: u64, capacity: &Capacity) -> Self {
        Self {
            max_bytes,
            max_accounts: Some(capacity.accounts),
            max_account_prefixes: Some(capacity.account_prefixes),
            settle: DEFAULT_SETTLE,
            ..Self::default()
        }
    }
}

/// Why a policy or list file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{0}; check the path and its permissions")]
    Io(#[from] std::io::Error),
    #[error(
        "it is {0}, not a regular file: policies and list files are read from regular files only"
    )]
    NotRegular(&'static str),
    #[error(
        "it is larger than the {left} bytes left of --max-policy-bytes {limit} (the policy file \
         and its list files together); raise --max-policy-bytes if it is meant to be this big"
    )]
    TooLarge { left: u64, limit: u64 },
    #[error(
        "its size does not say what it holds (a file of /proc or /sys?): policies and list files \
         are read from regular files only"
    )]
    Pseudo,
    #[error(
        "it changed while it was read; write the new file beside it and rename it into place, so \
         that readers see it whole"
    )]
    Changed,
    #[error("it is not UTF-8 text")]
    NotText,
}

/// A file's identity and state: equal stamps a moment apart mean that
/// nobody wrote to it, truncated it or renamed another file over it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Stamp {
    pub(super) dev: u64,
    pub(super) ino: u64,
    pub(super) size: u64,
    pub(super) mtime: (i64, i64),
    pub(super) ctime: (i64, i64),
}

impl Stamp {
    pub(super) fn of(meta: &Metadata) -> Self {
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }

    /// The stamp of what `path` names now (symbolic links followed, as when
    /// it was opened: a `ConfigMap` mount swaps a link).
    pub(super) fn of_path(path: &Path) -> Option<Self> {
        std::fs::metadata(path).ok().map(|m| Self::of(&m))
    }
}

/// The files read for one policy, and the bytes they took.
#[derive(Debug, Default)]
pub(super) struct Reads {
    pub(super) bytes: u64,
    pub(super) files: Vec<(PathBuf, Stamp)>,
    /// A file changed while it was read.
    pub(super) changed: bool,
}

impl Reads {
    /// Whether every file read still looks as it did.
    pub(super) fn unchanged(&self) -> bool {
        !self.changed
            && self
                .files
                .iter()
                .all(|(path, stamp)| Stamp::of_path(path) == Some(*stamp))
    }
}

pub(super) fn refuse_irregular(meta: &Metadata) -> Result<(), FileError> {
    let t = meta.file_type();
    let kind = if t.is_file() {
        return Ok(());
    } else if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO (named pipe)"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a file"
    };
    Err(FileError::NotRegular(kind))
}

/// Reads the regular file `path`, at most `max` bytes, as text.
///
/// Looked at before it is opened (a device is refused unopened: opening one
/// can have effects), opened without blocking (a FIFO swapped in between
/// cannot hang the reader) and looked at again through the open file. Its
/// size and modification time before and after the read must agree, and the
/// bytes read must be as many as its size says.
pub(super) fn read_regular(path: &Path, max: u64) -> Result<(Text, Stamp), FileError> {
    refuse_irregular(&std::fs::metadata(path)?)?;
    let file: File = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)?;
    let meta = file.metadata()?;
    refuse_irregular(&meta)?;
    let before = Stamp::of(&meta);
    let too_large = || FileError::TooLarge {
        left: max,
        limit: max,
    };
    if before.size > max {
        return Err(too_large());
    }
    let size = usize::try_from(before.size).map_err(|_| too_large())?;
    let (text, len) = if size >= MAPPED_TEXT {
        // Room for one byte more than the size: a file that grew is seen.
        let mut map = memmap2::MmapMut::map_anon(size + 1)?;
        let len = read_into(&file, &mut map)?;
        (Bytes::Mapped(map), len)
    } else {
        let mut bytes = Vec::with_capacity(size + 1);
        (&file)
            .take(max.saturating_add(1))
            .read_to_end(&mut bytes)?;
        let len = bytes.len();
        (Bytes::Heap(bytes), len)
    };
    if len as u64 > max {
        return Err(too_large());
    }
    if Stamp::of(&file.metadata()?) != before {
        return Err(FileError::Changed);
    }
    if len as u64 != before.size {
        // Unchanged, yet not what its size says: a file whose size means
        // nothing (procfs reports 0, sysfs 4096).
        return Err(FileError::Pseudo);
    }
    Ok((Text::new(text, len)?, before))
}

/// Files from this size on are read into memory mapped for them alone
/// ([`Text`]).
const MAPPED_TEXT: usize = 1 << 20;

/// Reads `file` into `buf` until its end or until `buf` is full; returns
/// the bytes read.
fn read_into(mut file: &File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut len = 0;
    while len < buf.len() {
        match file.read(&mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(len)
}

/// A file's text, checked to be UTF-8. A large one is in memory mapped for
/// it alone and unmapped when dropped. From the allocator, the 20 MB text of
/// a 100,000-account policy, dropped once parsed, stayed resident (mimalloc
/// keeps freed pages for reuse) beside the raw schema and the new policy: a
/// tenth of the agent's peak at a reload.
pub(super) struct Text {
    bytes: Bytes,
    len: usize,
}

enum Bytes {
    Heap(Vec<u8>),
    Mapped(memmap2::MmapMut),
}

impl Text {
    /// The first `len` bytes of `bytes`, if they are UTF-8.
    fn new(bytes: Bytes, len: usize) -> Result<Self, FileError> {
        let text = Self { bytes, len };
        std::str::from_utf8(text.as_bytes()).map_err(|_| FileError::NotText)?;
        Ok(text)
    }

    fn as_bytes(&self) -> &[u8] {
        match &self.bytes {
            Bytes::Heap(v) => &v[..self.len],
            Bytes::Mapped(m) => &m[..self.len],
        }
    }
}

impl std::ops::Deref for Text {
    type Target = str;

    fn deref(&self) -> &str {
        // SAFETY: `Text::new` checked these bytes to be UTF-8, and nothing
        // writes to them after (the buffer is private to `Text`, and a
        // mapping made by `map_anon` is shared with no file or process).
        unsafe { std::str::from_utf8_unchecked(self.as_bytes()) }
    }
}
