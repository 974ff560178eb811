//! Watching the local policy sources (`--policy FILE`, `--policy-dir DIR`)
//! for changes, so that an edit is applied without a SIGHUP.
//!
//! Directories are watched, never the file read last: editors and
//! deployment tools replace a file by renaming another over it, and a
//! mounted Kubernetes `ConfigMap` swaps its `..data` symbolic link to a new
//! timestamped directory (`policy.yaml -> ..data/policy.yaml`,
//! `..data -> ..2026_11_30_08_00_00.1`), so the inode read last is never
//! written again. For `--policy FILE` the watched directory is the one the
//! path names the file in, and also the directory of the file a symbolic
//! link resolves to when that is elsewhere (resolved again after every
//! change); for `--policy-dir` the directory itself, not its
//! subdirectories. A watched directory that is removed, or that cannot be
//! watched, is tried again every [`RETRY`].
//!
//! Events are debounced: the first one that concerns the policy starts a
//! batch, which ends once [`QUIET`] passes without another (at most
//! [`MAX_BATCH`] after it began: a file rewritten without pause is still
//! picked up); then the owner is told once. What to do with that is the
//! enforcer's: it reads the policy as on SIGHUP and applies it only if it
//! differs from the one in force.

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    sync::mpsc::{self, RecvTimeoutError},
    thread,
    time::{Duration, Instant},
};

use notify::{
    Event, EventKind, RecursiveMode, Watcher as _,
    event::{AccessKind, AccessMode},
};

use crate::{
    policy::{Source, is_policy_file},
    sink::escape_controls,
};

/// A batch of events ends after this long without another.
pub const QUIET: Duration = Duration::from_millis(200);
/// A batch ends this long after it began, even if events keep coming.
pub const MAX_BATCH: Duration = Duration::from_secs(2);
/// How often a directory that could not be watched is tried again.
pub const RETRY: Duration = Duration::from_secs(2);
/// Events queued between the watcher and the debouncing thread. When it is
/// full, events are dropped: a full queue is a batch to come, and the read
/// that ends it happens after the dropped events.
const QUEUE: usize = 256;

/// Why the policy cannot be watched.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("cannot watch files (inotify): {0}")]
    Start(#[source] notify::Error),
    #[error("cannot start the policy watcher thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// Watches `source` (the watches are in place when this returns) and calls
/// `changed`, from a thread of its own, once per batch of changes until it
/// returns false.
pub fn spawn(
    source: Source,
    mut changed: impl FnMut() -> bool + Send + 'static,
) -> Result<(), WatchError> {
    let (tx, rx) = mpsc::sync_channel::<notify::Result<Event>>(QUEUE);
    let inotify = notify::recommended_watcher(move |event: notify::Result<Event>| {
        // Reading the policy opens its files: those events (and other
        // reads) change nothing and would only feed reloads of their own.
        if event.as_ref().is_ok_and(is_read) {
            return;
        }
        let _ = tx.try_send(event);
    })
    .map_err(WatchError::Start)?;
    let mut watches = Watches {
        watcher: inotify,
        source,
        watched: Vec::new(),
        failed: Vec::new(),
        names: Vec::new(),
    };
    watches.sync();
    thread::Builder::new()
        .name("mmesh-watch".into())
        .spawn(move || {
            while watches.next_batch(&rx) {
                watches.sync();
                if !changed() {
                    return;
                }
            }
        })
        .map_err(WatchError::Thread)?;
    Ok(())
}

/// Events of reading, not of writing.
fn is_read(event: &Event) -> bool {
    matches!(event.kind, EventKind::Access(kind) if kind != AccessKind::Close(AccessMode::Write))
}

/// The directories watched for one source, and the names that concern it.
struct Watches {
    watcher: notify::RecommendedWatcher,
    source: Source,
    watched: Vec<PathBuf>,
    /// Directories that could not be watched, with the error last logged.
    failed: Vec<(PathBuf, String)>,
    /// For `--policy FILE`: the names of the file and of the file its
    /// link resolves to.
    names: Vec<OsString>,
}

impl Watches {
    /// What should be watched now.
    fn plan(&self) -> (Vec<PathBuf>, Vec<OsString>) {
        match &self.source {
            Source::Dir(dir) => (vec![dir.clone()], Vec::new()),
            Source::File(path) => {
                let parent = path
                    .parent()
                    .filter(|p| !p.as_os_str().is_empty())
                    .unwrap_or(Path::new("."))
                    .to_owned();
                let mut dirs = vec![parent.clone()];
                let mut names: Vec<OsString> =
                    path.file_name().into_iter().map(Into::into).collect();
                if let Ok(target) = std::fs::canonicalize(path) {
                    names.extend(target.file_name().map(Into::into));
                    let real_parent = std::fs::canonicalize(&parent).unwrap_or(parent);
                    // A ConfigMap's target (`..2026_…/policy.yaml`) is in
                    // the watched directory's subdirectory, whose swap
                    // shows in the watched directory.
                    if let Some(dir) = target.parent()
                        && !dir.starts_with(&real_parent)
                    {
                        dirs.push(dir.to_owned());
                    }
                }
                (dirs, names)
            }
        }
    }

    /// Brings the watches in line with the plan; reports whether a
    /// directory that could not be watched before now is.
    fn sync(&mut self) -> bool {
        let (dirs, names) = self.plan();
        self.names = names;
        self.watched.retain(|dir| {
            dirs.contains(dir) || {
                let _ = self.watcher.unwatch(dir);
                false
            }
        });
        let mut recovered = false;
        for dir in dirs {
            if self.watched.contains(&dir) {
                continue;
            }
            let shown = escape_controls(&dir.display().to_string()).into_owned();
            match self.watcher.watch(&dir, RecursiveMode::NonRecursive) {
                Ok(()) => {
                    if let Some(i) = self.failed.iter().position(|(d, _)| *d == dir) {
                        self.failed.swap_remove(i);
                        recovered = true;
                        tracing::info!(dir = %shown, "watching the policy's directory again");
                    } else {
                        tracing::debug!(dir = %shown, "watching the policy's directory");
                    }
                    self.watched.push(dir);
                }
                Err(err) => {
                    let text = err.to_string();
                    match self.failed.iter_mut().find(|(d, _)| *d == dir) {
                        Some((_, last)) if *last == text => {}
                        Some((_, last)) => *last = text,
                        None => {
                            tracing::warn!(dir = %shown, "cannot watch the policy's directory: {text}; changes there are applied on SIGHUP until it can be watched (tried again every {RETRY:?})");
                            self.failed.push((dir, text));
                        }
                    }
                }
            }
        }
        recovered
    }

    /// Whether `event` may change the policy.
    fn concerns(&mut self, event: &notify::Result<Event>) -> bool {
        let event = match event {
            Ok(event) => event,
            Err(err) => {
                // Lost events (a full inotify queue) or a broken watch:
                // anything may have changed.
                tracing::debug!(%err, "watching the policy");
                return true;
            }
        };
        if event.need_rescan() {
            return true;
        }
        let mut concerns = false;
        for path in &event.paths {
            if self.watched.contains(path) {
                // The directory itself was removed or moved: its watch is
                // gone; `sync` makes a new one (now or at the next retry).
                if matches!(event.kind, EventKind::Remove(_) | EventKind::Modify(_)) {
                    self.watched.retain(|d| d != path);
                    let _ = self.watcher.unwatch(path);
                }
                concerns = true;
                continue;
            }
            let Some(name) = path.file_name() else {
                continue;
            };
            // `..data` and the `..2026_…` directories of a ConfigMap.
            concerns |= name.as_encoded_bytes().starts_with(b"..")
                || match &self.source {
                    Source::Dir(_) => is_policy_file(name),
                    Source::File(_) => self.names.iter().any(|n| n == name),
                };
        }
        concerns
    }

    /// Waits for a batch of changes; false once the watcher is gone.
    fn next_batch(&mut self, rx: &mpsc::Receiver<notify::Result<Event>>) -> bool {
        loop {
            let event = if self.failed.is_empty() && !self.watched.is_empty() {
                rx.recv().map_err(|_| RecvTimeoutError::Disconnected)
            } else {
                rx.recv_timeout(RETRY)
            };
            match event {
                Ok(event) if self.concerns(&event) => break,
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => {
                    // A directory that came back may hold another policy.
                    if self.sync() {
                        return true;
                    }
                }
                Err(RecvTimeoutError::Disconnected) => return false,
            }
        }
        let end = Instant::now() + MAX_BATCH;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return true;
            }
            match rx.recv_timeout(QUIET.min(left)) {
                Ok(event) => {
                    // Only for its side effect on a removed directory.
                    self.concerns(&event);
                }
                Err(RecvTimeoutError::Timeout) => return true,
                Err(RecvTimeoutError::Disconnected) => return false,
            }
        }
    }
}
