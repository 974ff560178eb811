//! The last-known-good policy on local disk: the last policy the agent
//! Acked, applied at start before the control plane answers, so that a
//! rebooted host that cannot reach it enforces at once.
//!
//! One file, replaced whole: written beside its place, synced, renamed over
//! it, and the directory synced, so that a crash at any moment leaves the
//! old file or the new one. The file is a magic line, the XXH3-64 of the
//! payload, and the payload (a [`proto::LastKnownGood`]): a torn or
//! corrupted file is refused by the checksum, reported and ignored.

use std::{
    fs::{self, File, OpenOptions},
    io::{self, Read as _, Write as _},
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    sync::{Arc, Condvar, Mutex, PoisonError},
};

use prost::Message as _;

use super::{held::Held, proto};

/// The file's name in the state directory.
pub const FILE_NAME: &str = "last-known-good.pb";
/// The first bytes of the file: its format and version.
const MAGIC: &[u8; 16] = b"mmesh-lkg-v1\n\0\0\0";

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

/// The last-known-good file of a state directory.
#[derive(Clone, Debug)]
pub struct Store {
    path: PathBuf,
}

impl Store {
    #[must_use]
    pub fn new(dir: &Path) -> Self {
        Self {
            path: dir.join(FILE_NAME),
        }
    }

    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The stored policy, if there is one (`Ok(None)`: no file). Reads at
    /// most `max_bytes` of payload, from a regular file only.
    pub fn load(&self, max_bytes: u64) -> Result<Option<proto::LastKnownGood>, StoreError> {
        let read = |source| StoreError::Read {
            path: self.path.clone(),
            source,
        };
        let corrupt = |what| StoreError::Corrupt {
            path: self.path.clone(),
            what,
        };
        let file = match OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW)
            .open(&self.path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(read(e)),
        };
        let meta = file.metadata().map_err(read)?;
        if !meta.is_file() {
            return Err(corrupt("not a regular file"));
        }
        let limit = max_bytes.saturating_add(24);
        if meta.len() > limit {
            return Err(StoreError::TooLarge {
                path: self.path.clone(),
                max: max_bytes,
            });
        }
        let mut bytes = Vec::with_capacity(meta.len() as usize);
        file.take(limit + 1).read_to_end(&mut bytes).map_err(read)?;
        if bytes.len() as u64 > limit {
            return Err(StoreError::TooLarge {
                path: self.path.clone(),
                max: max_bytes,
            });
        }
        let (magic, rest) = bytes
            .split_at_checked(MAGIC.len())
            .ok_or(corrupt("too short"))?;
        if magic != MAGIC {
            return Err(corrupt("not a last-known-good file of this format"));
        }
        let (sum, payload) = rest.split_at_checked(8).ok_or(corrupt("too short"))?;
        let sum = u64::from_le_bytes(sum.try_into().map_err(|_| corrupt("too short"))?);
        if sum != xxhash_rust::xxh3::xxh3_64(payload) {
            return Err(corrupt("checksum mismatch"));
        }
        proto::LastKnownGood::decode(payload)
            .map(Some)
            .map_err(|_| corrupt("undecodable payload"))
    }

    /// Replaces the stored policy: write beside, fsync, rename, fsync the
    /// directory.
    pub fn save(&self, lkg: &proto::LastKnownGood) -> Result<(), StoreError> {
        self.save_payload(&lkg.encode_to_vec())
    }

    /// [`Store::save`] of an encoded [`proto::LastKnownGood`].
    fn save_payload(&self, payload: &[u8]) -> Result<(), StoreError> {
        let write = |source| StoreError::Write {
            path: self.path.clone(),
            source,
        };
        let dir = self.path.parent().unwrap_or(Path::new("."));
        fs::create_dir_all(dir).map_err(write)?;
        let tmp = self.path.with_extension("pb.tmp");
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(write)?;
        file.write_all(MAGIC).map_err(write)?;
        file.write_all(&xxhash_rust::xxh3::xxh3_64(payload).to_le_bytes())
            .map_err(write)?;
        file.write_all(payload).map_err(write)?;
        file.sync_all().map_err(write)?;
        drop(file);
        fs::rename(&tmp, &self.path).map_err(write)?;
        File::open(dir).and_then(|d| d.sync_all()).map_err(write)?;
        Ok(())
    }
}

/// Writes the last-known-good file from a thread of its own, the latest
/// policy only: Acks never wait for the disk, and a burst of deltas costs
/// one write of the last of them.
#[derive(Clone)]
pub struct Saver {
    latest: Arc<(Mutex<Option<Held>>, Condvar)>,
}

impl Saver {
    /// Starts the writer thread for `store`.
    pub fn spawn(store: Store) -> io::Result<Self> {
        let latest: Arc<(Mutex<Option<Held>>, Condvar)> = Arc::default();
        let shared = latest.clone();
        std::thread::Builder::new()
            .name("mmesh-lkg".into())
            .spawn(move || {
                let (slot, ready) = &*shared;
                loop {
                    let held = {
                        let mut guard = slot.lock().unwrap_or_else(PoisonError::into_inner);
                        loop {
                            if let Some(held) = guard.take() {
                                break held;
                            }
                            guard = ready.wait(guard).unwrap_or_else(PoisonError::into_inner);
                        }
                    };
                    let payload = held.last_known_good();
                    let version = held.version.clone();
                    drop(held);
                    match store.save_payload(&payload) {
                        Ok(()) => {
                            tracing::debug!(%version, "last-known-good policy kept");
                        }
                        Err(err) => tracing::warn!(
                            "control plane: could not keep the last-known-good policy: {err}"
                        ),
                    }
                    drop(payload);
                    crate::alloc::release_free_memory();
                }
            })?;
        Ok(Self { latest })
    }

    /// Queues `held` to be written, replacing what was queued.
    pub fn save(&self, held: Held) {
        let (slot, ready) = &*self.latest;
        *slot.lock().unwrap_or_else(PoisonError::into_inner) = Some(held);
        ready.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lkg(version: &str) -> proto::LastKnownGood {
        proto::LastKnownGood {
            version: version.into(),
            policy: Some(proto::Policy {
                accounts: vec![proto::Account {
                    id: "acme".into(),
                    prefixes: vec!["10.0.0.1".into()],
                    ..proto::Account::default()
                }],
                ..proto::Policy::default()
            }),
        }
    }

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("mmesh-store-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn saved_policy_loads_back_and_a_missing_file_is_none() {
        let d = dir("roundtrip");
        let store = Store::new(&d);
        assert!(store.load(1 << 20).expect("no file is fine").is_none());
        store.save(&lkg("v1")).expect("saves");
        store.save(&lkg("v2")).expect("replaces");
        assert_eq!(store.load(1 << 20).expect("loads"), Some(lkg("v2")));
        assert!(!store.path().with_extension("pb.tmp").exists());
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
}
