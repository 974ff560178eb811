//! The last-known-good policy on local disk: the last policy the agent
//! Acked, applied at start before the control plane answers, so that a
//! rebooted host that cannot reach it enforces at once.
//!
//! Two files. `last-known-good.pb` holds a whole policy, replaced whole:
//! written beside its place, synced, renamed over it, and the directory
//! synced, so that a crash at any moment leaves the old file or the new one.
//! It is a magic line, the XXH3-64 of the payload, and the payload (a
//! [`proto::LastKnownGood`]). `last-known-good.log` holds the deltas Acked
//! since, appended one record at a time (length, XXH3-64, the encoded
//! [`proto::Delta`]) and synced: a one-account delta on 100,000 accounts
//! writes a few hundred bytes, not the 20 MB policy again. The log starts
//! with the checksum of the whole file it extends, so that a log left from
//! an older whole file (a crash between the two) is ignored. When the log
//! outgrows a quarter of the whole file, the whole file is written again
//! and the log starts over.
//!
//! A torn or corrupted whole file is refused by its checksum, reported and
//! ignored; a torn or corrupted record ends the log: the records before it
//! are used, and the policy in force is the one Acked before it.

use std::{
    fs::{self, File, OpenOptions},
    io::{self, Read as _, Write as _},
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    sync::{Arc, Condvar, Mutex, PoisonError},
};

use prost::Message as _;
use xxhash_rust::xxh3::{Xxh3, xxh3_64};

use super::{held::Held, in_force::InForce, proto, wire};

/// The whole file's name in the state directory.
pub const FILE_NAME: &str = "last-known-good.pb";
/// The log's name in the state directory.
pub const LOG_NAME: &str = "last-known-good.log";
/// The first bytes of the whole file: its format and version.
const MAGIC: &[u8; 16] = b"mmesh-lkg-v1\n\0\0\0";
/// The first bytes of the log, before the checksum of the whole file it
/// extends.
const LOG_MAGIC: &[u8; 16] = b"mmesh-lkg-log-v1";
/// A record's length and checksum.
const RECORD_HEADER: usize = 4 + 8;
/// Deltas queued for the writer beyond which it writes the whole policy
/// instead (a disk that stalls must not grow the queue without bound).
const MAX_QUEUED: usize = 1024;
/// The log is compacted into the whole file past this share of the whole
/// file's size (and at least [`MIN_LOG_BYTES`]): replaying it at start then
/// costs at most about a quarter of reading the policy.
const LOG_SHARE: u64 = 4;
const MIN_LOG_BYTES: u64 = 1 << 20;

/// Why a stored policy cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is larger than {max} bytes (--max-policy-bytes)")]
    TooLarge { path: PathBuf, max: u64 },
    #[error("{path} is corrupt ({what}); it is ignored and replaced at the next Ack")]
    Corrupt { path: PathBuf, what: &'static str },
}

/// What a state directory holds.
#[derive(Debug, PartialEq)]
pub struct Stored {
    /// The whole policy last written, its accounts still encoded.
    pub base: wire::LastKnownGood,
    /// The deltas Acked since, in order.
    pub deltas: Vec<proto::Delta>,
    /// Why the log was not read to its end, if it was not: the deltas
    /// before that point are in `deltas`.
    pub log_problem: Option<String>,
}

/// The last-known-good files of a state directory.
#[derive(Clone, Debug)]
pub struct Store {
    path: PathBuf,
    log: PathBuf,
}

impl Store {
    #[must_use]
    pub fn new(dir: &Path) -> Self {
        Self {
            path: dir.join(FILE_NAME),
            log: dir.join(LOG_NAME),
        }
    }

    /// The whole file.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The log of deltas.
    #[must_use]
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The stored policy and the deltas since, if there is one (`Ok(None)`:
    /// no whole file). Reads at most `max_bytes` of payload from each file,
    /// from regular files only.
    pub fn load(&self, max_bytes: u64) -> Result<Option<Stored>, StoreError> {
        let corrupt = |what| StoreError::Corrupt {
            path: self.path.clone(),
            what,
        };
        let Some(bytes) = read_regular(&self.path, max_bytes.saturating_add(24))? else {
            return Ok(None);
        };
        let (magic, rest) = bytes
            .split_at_checked(MAGIC.len())
            .ok_or(corrupt("too short"))?;
        if magic != MAGIC {
            return Err(corrupt("not a last-known-good file of this format"));
        }
        let (sum, payload) = rest.split_at_checked(8).ok_or(corrupt("too short"))?;
        let sum = u64::from_le_bytes(sum.try_into().map_err(|_| corrupt("too short"))?);
        if sum != xxh3_64(payload) {
            return Err(corrupt("checksum mismatch"));
        }
        // Its accounts are slices of the file's bytes, decoded one by one
        // when validated (`wire.rs`).
        let payload = bytes::Bytes::from(bytes).slice(MAGIC.len() + 8..);
        let base =
            wire::LastKnownGood::decode(payload).map_err(|_| corrupt("undecodable payload"))?;
        let (deltas, log_problem) = match read_regular(&self.log, max_bytes) {
            Ok(Some(log)) => read_log(&log, sum),
            Ok(None) => (Vec::new(), None),
            Err(err) => (Vec::new(), Some(err.to_string())),
        };
        Ok(Some(Stored {
            base,
            deltas,
            log_problem,
        }))
    }

    /// Replaces the stored policy with `lkg` and no deltas.
    pub fn save(&self, lkg: &proto::LastKnownGood) -> Result<(), StoreError> {
        Writer::new(self.clone()).whole_payload(&lkg.encode_to_vec())
    }

    /// Writes `parts` to `path` whole, as [`Store::replace_with`].
    fn replace(path: &Path, parts: &[&[u8]]) -> Result<(), StoreError> {
        Self::replace_with(path, &mut |w| parts.iter().try_for_each(|p| w.write_all(p)))
    }

    /// Writes what `write` writes to `path` whole: beside it, synced,
    /// renamed over it, the directory synced.
    fn replace_with(
        path: &Path,
        write: &mut dyn FnMut(&mut dyn io::Write) -> io::Result<()>,
    ) -> Result<(), StoreError> {
        let write_failed = write_error(path);
        let dir = path.parent().unwrap_or(Path::new("."));
        fs::create_dir_all(dir).map_err(&write_failed)?;
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(&write_failed)?;
        let mut out = io::BufWriter::with_capacity(1 << 16, file);
        write(&mut out).map_err(&write_failed)?;
        let file = out.into_inner().map_err(|e| write_failed(e.into_error()))?;
        file.sync_all().map_err(&write_failed)?;
        drop(file);
        fs::rename(&tmp, path).map_err(&write_failed)?;
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(&write_failed)?;
        Ok(())
    }
}

fn write_error(path: &Path) -> impl Fn(io::Error) -> StoreError {
    let path = path.to_owned();
    move |source| StoreError::Write {
        path: path.clone(),
        source,
    }
}

/// The contents of the regular file at `path` (`Ok(None)`: no file), if
/// they are at most `limit` bytes.
fn read_regular(path: &Path, limit: u64) -> Result<Option<Vec<u8>>, StoreError> {
    let read = |source| StoreError::Read {
        path: path.to_owned(),
        source,
    };
    let file = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(read(e)),
    };
    let meta = file.metadata().map_err(read)?;
    if !meta.is_file() {
        return Err(StoreError::Corrupt {
            path: path.to_owned(),
            what: "not a regular file",
        });
    }
    let too_large = || StoreError::TooLarge {
        path: path.to_owned(),
        max: limit,
    };
    if meta.len() > limit {
        return Err(too_large());
    }
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    file.take(limit + 1).read_to_end(&mut bytes).map_err(read)?;
    if bytes.len() as u64 > limit {
        return Err(too_large());
    }
    Ok(Some(bytes))
}

/// The deltas of a log that extends the whole file of checksum `base`, up
/// to the first record that cannot be read, and why the log ended early.
fn read_log(log: &[u8], base: u64) -> (Vec<proto::Delta>, Option<String>) {
    let mut deltas = Vec::new();
    let Some(mut rest) = log
        .strip_prefix(LOG_MAGIC)
        .and_then(|r| r.strip_prefix(&base.to_le_bytes()[..]))
    else {
        return (
            deltas,
            Some("the log of deltas extends another last-known-good file; it is ignored".into()),
        );
    };
    while !rest.is_empty() {
        let record = deltas.len() + 1;
        let ended = |what: &str| {
            Some(format!(
                "record {record} of the log of deltas is {what}; the {} before it are used",
                record - 1
            ))
        };
        let Some((header, body)) = rest.split_at_checked(RECORD_HEADER) else {
            return (deltas, ended("torn"));
        };
        let (len, sum) = header.split_at(4);
        let len = u32::from_le_bytes(len.try_into().unwrap_or_default()) as usize;
        let sum = u64::from_le_bytes(sum.try_into().unwrap_or_default());
        let Some((payload, after)) = body.split_at_checked(len) else {
            return (deltas, ended("torn"));
        };
        if xxh3_64(payload) != sum {
            return (deltas, ended("corrupt (checksum mismatch)"));
        }
        let Ok(delta) = proto::Delta::decode(payload) else {
            return (deltas, ended("undecodable"));
        };
        deltas.push(delta);
        rest = after;
    }
    (deltas, None)
}

/// The log being appended to.
struct Log {
    file: File,
    /// Bytes of records in it.
    bytes: u64,
    /// Past this many, the whole file is written again.
    limit: u64,
}

/// Writes the files of a [`Store`]: whole policies, and deltas appended
/// to the log of the last whole one written.
struct Writer {
    store: Store,
    /// The log extending the whole file this writer wrote; `None` before
    /// its first whole file (a log found at start is never appended to) and
    /// after a failed write.
    log: Option<Log>,
}

impl Writer {
    fn new(store: Store) -> Self {
        Self { store, log: None }
    }

    /// Writes `held` as the whole file, and an empty log after it. The
    /// file is written from the held accounts as they are (its checksum,
    /// which comes first, in a pass of its own), not from a copy of the
    /// whole: 20 MB at 100,000 accounts, the agent's peak when it came
    /// right after a snapshot.
    fn whole(&mut self, held: &Held) -> Result<(), StoreError> {
        let mut hasher = Xxh3::new();
        let mut len = 0;
        let summed = held.write_last_known_good(&mut |piece| {
            hasher.update(piece);
            len += piece.len() as u64;
            Ok(())
        });
        debug_assert!(summed.is_ok(), "hashing takes every piece");
        self.whole_with(hasher.digest(), len, &mut |w| {
            held.write_last_known_good(&mut |piece| w.write_all(piece))
        })
    }

    fn whole_payload(&mut self, payload: &[u8]) -> Result<(), StoreError> {
        self.whole_with(xxh3_64(payload), payload.len() as u64, &mut |w| {
            w.write_all(payload)
        })
    }

    /// Writes the whole file (its magic line, `sum`, then the `len` bytes
    /// of payload `write` writes, whose checksum is `sum`) and an empty log
    /// after it.
    fn whole_with(
        &mut self,
        sum: u64,
        len: u64,
        write: &mut dyn FnMut(&mut dyn io::Write) -> io::Result<()>,
    ) -> Result<(), StoreError> {
        self.log = None;
        Store::replace_with(&self.store.path, &mut |w| {
            w.write_all(MAGIC)?;
            w.write_all(&sum.to_le_bytes())?;
            write(w)
        })?;
        Store::replace(&self.store.log, &[LOG_MAGIC, &sum.to_le_bytes()])?;
        let file = OpenOptions::new()
            .append(true)
            .open(&self.store.log)
            .map_err(write_error(&self.store.log))?;
        self.log = Some(Log {
            file,
            bytes: 0,
            limit: (len / LOG_SHARE).max(MIN_LOG_BYTES),
        });
        Ok(())
    }

    /// Appends `deltas` to the log, synced. `Ok(false)`: there is no log to
    /// append to, or it is full: the whole policy must be written instead.
    fn append(&mut self, deltas: &[proto::Delta]) -> Result<bool, StoreError> {
        let Some(log) = &mut self.log else {
            return Ok(false);
        };
        let mut records = Vec::new();
        for delta in deltas {
            let payload = delta.encode_to_vec();
            let Ok(len) = u32::try_from(payload.len()) else {
                return Ok(false);
            };
            records.extend_from_slice(&len.to_le_bytes());
            records.extend_from_slice(&xxh3_64(&payload).to_le_bytes());
            records.extend_from_slice(&payload);
        }
        if log.bytes + records.len() as u64 > log.limit {
            return Ok(false);
        }
        let written = log
            .file
            .write_all(&records)
            .and_then(|()| log.file.sync_data());
        if let Err(source) = written {
            // A partial record ends the log when it is read; nothing more
            // is appended after it.
            self.log = None;
            return Err(StoreError::Write {
                path: self.store.log.clone(),
                source,
            });
        }
        log.bytes += records.len() as u64;
        Ok(true)
    }
}

/// What the writer thread has to do next.
#[derive(Default)]
struct Queue {
    /// The policy in force after everything queued.
    latest: Option<Arc<InForce>>,
    /// Write it whole (a snapshot, or too many deltas queued).
    whole: bool,
    /// Else append these deltas.
    deltas: Vec<proto::Delta>,
}

/// Keeps the last-known-good files from a thread of its own: Acks never
/// wait for the disk. A snapshot is written whole; a delta is appended to
/// the log; a burst of snapshots costs one write of the last of them.
#[derive(Clone)]
pub struct Saver {
    queue: Arc<(Mutex<Queue>, Condvar)>,
}

impl Saver {
    /// Starts the writer thread for `store`.
    pub fn spawn(store: Store) -> io::Result<Self> {
        let queue: Arc<(Mutex<Queue>, Condvar)> = Arc::default();
        let shared = queue.clone();
        std::thread::Builder::new()
            .name("mmesh-lkg".into())
            .spawn(move || {
                let mut writer = Writer::new(store);
                loop {
                    let (latest, whole, deltas) = {
                        let (slot, ready) = &*shared;
                        let mut q = slot.lock().unwrap_or_else(PoisonError::into_inner);
                        let latest = loop {
                            if let Some(latest) = q.latest.take() {
                                break latest;
                            }
                            q = ready.wait(q).unwrap_or_else(PoisonError::into_inner);
                        };
                        (
                            latest,
                            std::mem::take(&mut q.whole),
                            std::mem::take(&mut q.deltas),
                        )
                    };
                    let version = &latest.held.version;
                    let appended = if whole {
                        Ok(false)
                    } else {
                        writer.append(&deltas)
                    };
                    let wrote_whole = !matches!(appended, Ok(true));
                    let kept = match appended {
                        Ok(true) => Ok("appended to the log"),
                        Ok(false) => writer.whole(&latest.held).map(|()| "written whole"),
                        Err(err) => {
                            tracing::warn!(
                                "control plane: could not append to the last-known-good log ({err}); writing the policy whole"
                            );
                            writer.whole(&latest.held).map(|()| "written whole")
                        }
                    };
                    match kept {
                        Ok(how) => tracing::debug!(%version, "last-known-good policy kept: {how}"),
                        Err(err) => tracing::warn!(
                            "control plane: could not keep the last-known-good policy: {err}"
                        ),
                    }
                    drop(latest);
                    if wrote_whole {
                        crate::alloc::release_free_memory();
                    }
                }
            })?;
        Ok(Self { queue })
    }

    /// Queues `state` (a snapshot in force) to be written whole, replacing
    /// what was queued.
    pub fn snapshot(&self, state: Arc<InForce>) {
        self.queue(state, None);
    }

    /// Queues `delta`, which made `state`, to be appended to the log.
    pub fn delta(&self, state: Arc<InForce>, delta: proto::Delta) {
        self.queue(state, Some(delta));
    }

    fn queue(&self, state: Arc<InForce>, delta: Option<proto::Delta>) {
        let (slot, ready) = &*self.queue;
        let mut q = slot.lock().unwrap_or_else(PoisonError::into_inner);
        q.latest = Some(state);
        match delta {
            Some(delta) if !q.whole && q.deltas.len() < MAX_QUEUED => q.deltas.push(delta),
            _ => {
                q.whole = true;
                q.deltas = Vec::new();
            }
        }
        drop(q);
        ready.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::ReadLimits;

    fn account(id: &str, prefix: &str) -> proto::Account {
        proto::Account {
            id: id.into(),
            prefixes: vec![prefix.into()],
            ..proto::Account::default()
        }
    }

    fn lkg(version: &str) -> proto::LastKnownGood {
        proto::LastKnownGood {
            version: version.into(),
            policy: Some(proto::Policy {
                accounts: vec![account("acme", "10.0.0.1")],
                ..proto::Policy::default()
            }),
        }
    }

    fn delta(version: &str, base: &str, id: &str, prefix: &str) -> proto::Delta {
        proto::Delta {
            version: version.into(),
            base_version: base.into(),
            upsert_accounts: vec![account(id, prefix)],
            ..proto::Delta::default()
        }
    }

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("mmesh-store-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    fn versions(stored: &Stored) -> Vec<&str> {
        std::iter::once(stored.base.version.as_str())
            .chain(stored.deltas.iter().map(|d| d.version.as_str()))
            .collect()
    }

    #[test]
    fn saved_policy_loads_back_and_a_missing_file_is_none() {
        let d = dir("roundtrip");
        let store = Store::new(&d);
        assert!(store.load(1 << 20).expect("no file is fine").is_none());
        store.save(&lkg("v1")).expect("saves");
        store.save(&lkg("v2")).expect("replaces");
        let stored = store.load(1 << 20).expect("loads").expect("stored");
        // Read with its accounts as bytes, it is the message saved.
        assert_eq!(stored.base.encode_to_vec(), lkg("v2").encode_to_vec());
        assert_eq!(stored.base.version, "v2");
        assert!(stored.deltas.is_empty());
        assert_eq!(stored.log_problem, None);
        for path in [store.path(), store.log_path()] {
            let mut tmp = path.as_os_str().to_owned();
            tmp.push(".tmp");
            assert!(!Path::new(&tmp).exists(), "{tmp:?} left behind");
        }
        fs::remove_dir_all(&d).expect("cleanup");
    }

    #[test]
    fn a_corrupt_or_oversized_file_is_refused() {
        let d = dir("corrupt");
        let store = Store::new(&d);
        store.save(&lkg("v1")).expect("saves");
        let mut bytes = fs::read(store.path()).expect("read");
        let last = bytes.len() - 1;
        bytes[last] ^= 0x55;
        fs::write(store.path(), &bytes).expect("write");
        assert!(matches!(
            store.load(1 << 20),
            Err(StoreError::Corrupt {
                what: "checksum mismatch",
                ..
            })
        ));
        fs::write(store.path(), b"hello").expect("write");
        assert!(matches!(
            store.load(1 << 20),
            Err(StoreError::Corrupt { .. })
        ));
        store.save(&lkg("v1")).expect("saves");
        assert!(matches!(store.load(4), Err(StoreError::TooLarge { .. })));
        fs::remove_dir_all(&d).expect("cleanup");
    }

    /// Deltas are appended after the whole file and read back in order; a
    /// torn or corrupted record ends the log (the deltas before it stay),
    /// and a log left from another whole file is ignored.
    #[test]
    fn appended_deltas_load_back_up_to_the_first_bad_record() {
        let d = dir("log");
        let store = Store::new(&d);
        let mut writer = Writer::new(store.clone());
        assert!(
            !writer
                .append(&[delta("v2", "v1", "a", "10.0.0.2")])
                .expect("no log yet"),
            "no log to append to before a whole write"
        );
        writer
            .whole_payload(&lkg("v1").encode_to_vec())
            .expect("whole");
        assert!(
            writer
                .append(&[delta("v2", "v1", "a", "10.0.0.2")])
                .expect("appends")
        );
        assert!(
            writer
                .append(&[
                    delta("v3", "v2", "b", "10.0.0.3"),
                    delta("v4", "v3", "c", "10.0.0.4")
                ])
                .expect("appends")
        );
        let stored = store.load(1 << 20).expect("loads").expect("stored");
        assert_eq!(versions(&stored), ["v1", "v2", "v3", "v4"]);
        assert_eq!(stored.deltas[2], delta("v4", "v3", "c", "10.0.0.4"));
        assert_eq!(stored.log_problem, None);

        let log = fs::read(store.log_path()).expect("read");
        // Torn: the last record cut short.
        fs::write(store.log_path(), &log[..log.len() - 3]).expect("write");
        let stored = store.load(1 << 20).expect("loads").expect("stored");
        assert_eq!(versions(&stored), ["v1", "v2", "v3"]);
        let problem = stored.log_problem.expect("reported");
        assert!(
            problem.contains("record 3") && problem.contains("torn"),
            "{problem}"
        );
        // Corrupt: a byte of the second record changed.
        let mut bad = log.clone();
        let second =
            LOG_MAGIC.len() + 8 + RECORD_HEADER + delta("v2", "v1", "a", "10.0.0.2").encoded_len();
        bad[second + RECORD_HEADER + 1] ^= 0x55;
        fs::write(store.log_path(), &bad).expect("write");
        let stored = store.load(1 << 20).expect("loads").expect("stored");
        assert_eq!(versions(&stored), ["v1", "v2"]);
        assert!(stored.log_problem.expect("reported").contains("checksum"));
        // Another whole file: the log is not its own.
        fs::write(store.log_path(), &log).expect("write");
        store.save(&lkg("v9")).expect("saves");
        fs::write(store.log_path(), &log).expect("write");
        let stored = store.load(1 << 20).expect("loads").expect("stored");
        assert_eq!(versions(&stored), ["v9"]);
        assert!(stored.log_problem.expect("reported").contains("another"));
        fs::remove_dir_all(&d).expect("cleanup");
    }

    /// A log past its share of the whole file is refused, so that the
    /// whole policy is written again.
    #[test]
    fn a_full_log_asks_for_a_whole_write() {
        let d = dir("full");
        let store = Store::new(&d);
        let mut writer = Writer::new(store.clone());
        writer
            .whole_payload(&lkg("v1").encode_to_vec())
            .expect("whole");
        let big = proto::Delta {
            version: "v2".into(),
            base_version: "v1".into(),
            remove_accounts: vec!["x".repeat(1000); (MIN_LOG_BYTES / 1000) as usize],
            ..proto::Delta::default()
        };
        assert!(!writer.append(&[big]).expect("refused, not failed"));
        let stored = store.load(8 << 20).expect("loads").expect("stored");
        assert_eq!(versions(&stored), ["v1"], "nothing was appended");
        fs::remove_dir_all(&d).expect("cleanup");
    }

    /// The writer thread writes a snapshot whole and appends the deltas
    /// Acked after it; what it wrote replays to the policy in force.
    #[test]
    fn the_saver_writes_snapshots_whole_and_appends_deltas() {
        let d = dir("saver");
        let store = Store::new(&d);
        let saver = Saver::spawn(store.clone()).expect("thread");
        let limits = ReadLimits::default();
        let policy = proto::Policy {
            accounts: vec![account("a", "10.0.0.1")],
            ..proto::Policy::default()
        };
        let v1 = Arc::new(InForce::snapshot("v1".into(), policy, &limits).expect("valid"));
        saver.snapshot(v1.clone());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let kept = |version: &str| loop {
            let stored = store.load(1 << 20).ok().flatten();
            if let Some(s) = stored.filter(|s| versions(s).last() == Some(&version)) {
                break s;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{version} was not kept"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        // Written whole (then the deltas are appended to its log).
        assert!(kept("v1").deltas.is_empty());
        let mut state = v1;
        for (i, version) in ["v2", "v3"].into_iter().enumerate() {
            let d = delta(version, &state.held.version, "b", &format!("10.0.1.{i}"));
            let Ok(next) = state.delta(&d, &limits) else {
                panic!("the delta applies");
            };
            state = Arc::new(next);
            saver.delta(state.clone(), d);
        }
        let stored = kept("v3");
        assert_eq!(stored.base.version, "v1");
        assert_eq!(stored.deltas.len(), 2);
        assert_eq!(stored.deltas[1].upsert_accounts[0].prefixes, ["10.0.1.1"]);
        fs::remove_dir_all(&d).expect("cleanup");
    }
}
