//! Policies from a folder: `nodes/<node>.yaml` for one node,
//! `default.yaml` for every other node, and shared list files that the
//! policies name with `file:` (relative to the policy file). The folder is
//! watched and read again, whole, a moment after the last change.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{Arc, mpsc},
    time::{Duration, Instant},
};

use mmesh_agent::policy::{Policy, ReadLimits};
use notify::{RecursiveMode, Watcher as _};
use serde_json::json;
use tokio::sync::watch;

use crate::{
    catalog::{Catalog, Desired},
    events,
};

/// Policy file extensions, in the order of preference when a node has two.
const EXTENSIONS: [&str; 3] = ["yaml", "yml", "json"];
/// Quiet time after a change before the folder is read: editors and `cp`
/// write in several steps, `git checkout` changes many files.
pub const DEBOUNCE: Duration = Duration::from_millis(200);
/// A folder that never stops changing is still read this often.
const MAX_DEBOUNCE: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum FolderError {
    #[error("policy folder {path}: {source}; check the path and its permissions")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot watch policy folder {path}: {source}")]
    Watch {
        path: String,
        #[source]
        source: notify::Error,
    },
}

/// The policy files of `dir`: the default's and each node's, as paths
/// relative to `dir`.
fn policy_files(dir: &Path) -> Result<(Option<String>, BTreeMap<String, String>), FolderError> {
    let read_error = |path: &Path, source| FolderError::Read {
        path: path.display().to_string(),
        source,
    };
    std::fs::metadata(dir).map_err(|e| read_error(dir, e))?;
    let mut defaults = EXTENSIONS
        .iter()
        .map(|ext| format!("default.{ext}"))
        .filter(|name| dir.join(name).is_file());
    let default = defaults.next();
    if let Some(ignored) = defaults.next() {
        tracing::warn!(
            "{}: both {} and {ignored}: serving {0}",
            dir.display(),
            default.as_deref().unwrap_or_default()
        );
    }
    let mut nodes = BTreeMap::new();
    let nodes_dir = dir.join("nodes");
    let entries = match std::fs::read_dir(&nodes_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((default, nodes)),
        Err(e) => return Err(read_error(&nodes_dir, e)),
    };
    let mut found: Vec<(String, usize, String)> = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| read_error(&nodes_dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        // Hidden files: editors' swap files, Kubernetes' `..data` links.
        if name.starts_with('.') || !entry.path().is_file() {
            continue;
        }
        let Some((node, ext)) = name.rsplit_once('.') else {
            continue;
        };
        if let Some(rank) = EXTENSIONS.iter().position(|e| *e == ext)
            && !node.is_empty()
        {
            found.push((node.to_owned(), rank, name));
        }
    }
    found.sort();
    for (node, _, name) in found {
        match nodes.get(&node) {
            Some(kept) => tracing::warn!("nodes/{name} ignored: node {node} already has {kept}"),
            None => {
                nodes.insert(node, format!("nodes/{name}"));
            }
        }
    }
    Ok((default, nodes))
}

/// Reads every policy of `dir`. A policy that does not validate is logged
/// (and reported as a `policy_invalid` line) and its previous version, from
/// `previous`, is still served. `shown_as` names `dir` in those messages
/// (etcd's key prefix for its mirror folder), with a trailing `/`.
pub fn load(
    dir: &Path,
    shown_as: Option<&str>,
    limits: &ReadLimits,
    previous: &Catalog,
) -> Result<Catalog, FolderError> {
    let (default_file, node_files) = policy_files(dir)?;
    let read = |file: &str, before: Option<&Arc<Desired>>| -> Option<Arc<Desired>> {
        match Policy::from_file_with(&dir.join(file), limits) {
            Ok(policy) => {
                let desired = Desired::new(&policy, file.to_owned());
                if let Some(before) = before
                    && before.version == desired.version
                {
                    return Some(Arc::clone(before));
                }
                tracing::info!(
                    "{file}: version {} ({} accounts)",
                    desired.version,
                    desired.accounts()
                );
                events::emit(
                    "policy",
                    json!({
                        "file": file,
                        "version": desired.version,
                        "accounts": desired.accounts(),
                    }),
                );
                Some(Arc::new(desired))
            }
            Err(e) => {
                let serving = before.map(|d| d.version.as_str());
                let mut error = e.to_string();
                if let Some(name) = shown_as {
                    error = error.replace(&format!("{}/", dir.display()), name);
                }
                tracing::error!(
                    "{file} rejected, still serving {}: {error}",
                    serving.unwrap_or("nothing of its own")
                );
                events::emit(
                    "policy_invalid",
                    json!({ "file": file, "error": error, "serving": serving }),
                );
                before.cloned()
            }
        }
    };
    let default = default_file.and_then(|file| read(&file, previous.default.as_ref()));
    if default.is_none()
        && let Some(gone) = &previous.default
    {
        removed(gone);
    }
    let mut nodes = BTreeMap::new();
    for (node, file) in &node_files {
        if let Some(desired) = read(file, previous.nodes.get(node)) {
            nodes.insert(node.clone(), desired);
        }
    }
    for (node, gone) in &previous.nodes {
        if !node_files.contains_key(node) {
            removed(gone);
        }
    }
    Ok(Catalog { nodes, default })
}

fn removed(gone: &Desired) {
    tracing::info!("{} removed", gone.file);
    events::emit("policy_removed", json!({ "file": gone.file }));
}

/// Whether two catalogs serve the same versions to every node.
#[must_use]
pub fn same_versions(a: &Catalog, b: &Catalog) -> bool {
    let version = |d: Option<&Arc<Desired>>| d.map(|d| d.version.clone());
    version(a.default.as_ref()) == version(b.default.as_ref())
        && a.nodes.len() == b.nodes.len()
        && a.nodes
            .iter()
            .zip(&b.nodes)
            .all(|((na, da), (nb, db))| na == nb && da.version == db.version)
}

/// Publishes `next` unless it serves the same versions as what `tx` holds.
pub fn publish(tx: &watch::Sender<Arc<Catalog>>, next: Catalog) {
    tx.send_if_modified(|current| {
        if same_versions(current, &next) {
            false
        } else {
            *current = Arc::new(next);
            true
        }
    });
}

/// Watches `dir` (recursively: shared list files too) and publishes what it
/// holds a moment after each change. The watch lasts as long as the
/// returned watcher.
pub fn watch(
    dir: PathBuf,
    limits: ReadLimits,
    tx: watch::Sender<Arc<Catalog>>,
) -> Result<notify::RecommendedWatcher, FolderError> {
    let (changes_tx, changes) = mpsc::channel();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(event) = event
            && !event.kind.is_access()
        {
            // The receiver is gone only when the reader thread ended.
            let _ = changes_tx.send(());
        }
    })
    .map_err(|source| FolderError::Watch {
        path: dir.display().to_string(),
        source,
    })?;
    watcher
        .watch(&dir, RecursiveMode::Recursive)
        .map_err(|source| FolderError::Watch {
            path: dir.display().to_string(),
            source,
        })?;
    let shown = dir.display().to_string();
    std::thread::Builder::new()
        .name("policy-folder".into())
        .spawn(move || {
            // Ends when the watcher, and with it the sender, is dropped.
            while changes.recv().is_ok() {
                let first = Instant::now();
                while first.elapsed() < MAX_DEBOUNCE && changes.recv_timeout(DEBOUNCE).is_ok() {}
                let previous = Arc::clone(&tx.borrow());
                match load(&dir, None, &limits, &previous) {
                    Ok(next) => publish(&tx, next),
                    Err(e) => tracing::error!("{e}; still serving what was read before"),
                }
            }
        })
        .map_err(|source| FolderError::Read {
            path: shown,
            source,
        })?;
    Ok(watcher)
}
