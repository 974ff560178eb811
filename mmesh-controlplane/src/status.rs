//! The status view: per node, what was sent, what the agent acknowledged or
//! refused and why, and how many streams it has open. Written to
//! `--status-file` (JSON, replaced atomically) a moment after it changes.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use serde_json::{Map, Value, json};
use tokio::sync::Notify;

/// At most one write of the status file per this interval: with thousands
/// of agents acknowledging a change, the file is written a few times, not
/// thousands.
const WRITE_INTERVAL: Duration = Duration::from_millis(250);

#[derive(Debug, Default)]
pub struct Registry {
    /// Whether anything reads the view: without a status file, keeping it
    /// would cost every session a lock and a few JSON objects per message
    /// for nothing.
    kept: bool,
    nodes: Mutex<BTreeMap<String, Map<String, Value>>>,
    changed: Notify,
}

impl Registry {
    /// A registry that keeps the view (for a status file), or one that
    /// ignores every update.
    #[must_use]
    pub fn new(kept: bool) -> Self {
        Self {
            kept,
            ..Self::default()
        }
    }

    /// Changes `node`'s entry (created empty) with `f`.
    pub fn update(&self, node: &str, f: impl FnOnce(&mut Map<String, Value>)) {
        if !self.kept {
            return;
        }
        {
            let mut nodes = self
                .nodes
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(entry) = nodes.get_mut(node) {
                f(entry);
            } else {
                f(nodes.entry(node.to_owned()).or_default());
            }
        }
        self.changed.notify_one();
    }

    /// Every node's entry, as a JSON object by node name.
    #[must_use]
    pub fn view(&self) -> Value {
        let nodes = self
            .nodes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        json!(*nodes)
    }

    /// Writes the view to `path` after each change (batched), for ever.
    pub async fn write_to(self: Arc<Self>, path: PathBuf) {
        let tmp = path.with_extension("tmp");
        loop {
            let text = format!("{:#}\n", self.view());
            let written = std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, &path));
            if let Err(e) = written {
                tracing::warn!("cannot write the status file {}: {e}", path.display());
            }
            tokio::time::sleep(WRITE_INTERVAL).await;
            self.changed.notified().await;
        }
    }
}
