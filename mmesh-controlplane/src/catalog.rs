//! The desired state: which policy each node should enforce, with the
//! version it is known by, and the delta between two policies.

use std::{
    collections::{BTreeMap, VecDeque},
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use mmesh_agent::{
    control::{convert, proto},
    policy::{MAX_VERSION_LEN, Policy},
};
use prost::Message as _;

/// A validated policy as the control plane serves it.
#[derive(Debug, PartialEq)]
pub struct Desired {
    /// What the agent reports once it enforces this policy. Computed from
    /// the content alone (the file's `version`, if any, and a hash of the
    /// message), so that replicas reading the same source agree on it.
    pub version: String,
    /// The source it was read from, for the log: a file name relative to
    /// the folder (or the etcd prefix), e.g. `nodes/web-1.yaml`.
    pub file: String,
    pub message: proto::Policy,
    /// `message` encoded: a Snapshot's policy, the same bytes for every
    /// stream it goes to.
    pub encoded: Bytes,
}

impl Desired {
    #[must_use]
    pub fn new(policy: &Policy, file: String) -> Self {
        let message = convert::to_message(policy);
        // prost encodes fields in number order and repeated fields in
        // their order: the same policy gives the same bytes everywhere.
        let encoded = Bytes::from(message.encode_to_vec());
        let hash = xxhash_rust::xxh3::xxh3_64(&encoded);
        let short = format!("{:012x}", hash >> 16);
        let version = match policy.version.as_deref() {
            Some(v) if !v.is_empty() => {
                // The agent validates the version as a file's (at most
                // MAX_VERSION_LEN characters): the hash must fit beside it.
                let head: String = v.chars().take(MAX_VERSION_LEN - short.len() - 1).collect();
                format!("{head}-{short}")
            }
            _ => short,
        };
        Self {
            version,
            file,
            message,
            encoded,
        }
    }

    #[must_use]
    pub fn accounts(&self) -> usize {
        self.message.accounts.len()
    }
}

/// Every node's desired policy.
#[derive(Debug, Default, PartialEq)]
pub struct Catalog {
    /// Policies of single nodes (`nodes/<node>.yaml`), by node name.
    pub nodes: BTreeMap<String, Arc<Desired>>,
    /// The policy of every node without its own (`default.yaml`).
    pub default: Option<Arc<Desired>>,
}

impl Catalog {
    /// The policy `node` should enforce; `None` when there is neither a
    /// policy of its own nor a default.
    #[must_use]
    pub fn for_node(&self, node: &str) -> Option<&Arc<Desired>> {
        self.nodes.get(node).or(self.default.as_ref())
    }
}

/// The Delta that turns `base` into `target`: accounts added or whose
/// message changed (by id), ids gone, and the global section when it
/// changed. `version` and `nonce` are left for the sender.
#[must_use]
pub fn delta(base: &Desired, target: &Desired) -> proto::Delta {
    let before: BTreeMap<&str, &proto::Account> = base
        .message
        .accounts
        .iter()
        .map(|a| (a.id.as_str(), a))
        .collect();
    let after: BTreeMap<&str, &proto::Account> = target
        .message
        .accounts
        .iter()
        .map(|a| (a.id.as_str(), a))
        .collect();
    // Upserts in the target's order: the order of accounts in the file.
    let upsert_accounts = target
        .message
        .accounts
        .iter()
        .filter(|a| before.get(a.id.as_str()) != Some(a))
        .cloned()
        .collect();
    let remove_accounts = base
        .message
        .accounts
        .iter()
        .filter(|a| !after.contains_key(a.id.as_str()))
        .map(|a| a.id.clone())
        .collect();
    let global = (target.message.global != base.message.global)
        .then(|| target.message.global.clone().unwrap_or_default());
    let defaults = (target.message.defaults != base.message.defaults)
        .then(|| target.message.defaults.clone().unwrap_or_default());
    proto::Delta {
        version: target.version.clone(),
        nonce: String::new(),
        base_version: base.version.clone(),
        upsert_accounts,
        remove_accounts,
        global,
        defaults,
    }
}

/// Deltas recently computed: when a policy changes, every stream of the
/// nodes it serves needs the same Delta (against the same base), which is
/// computed once.
#[derive(Debug, Default)]
pub struct DeltaCache {
    recent: Mutex<VecDeque<(String, String, Arc<proto::Delta>)>>,
}

/// Base-target pairs kept: a change, and a few nodes that lag behind.
const CACHED_DELTAS: usize = 16;

impl DeltaCache {
    /// The Delta from `base` to `target` (versions name contents).
    pub fn get(&self, base: &Desired, target: &Desired) -> Arc<proto::Delta> {
        // Computed under the lock: the streams that wait for it would
        // otherwise all compute it too.
        let mut recent = self
            .recent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((_, _, d)) = recent
            .iter()
            .find(|(b, t, _)| *b == base.version && *t == target.version)
        {
            return Arc::clone(d);
        }
        let d = Arc::new(delta(base, target));
        if recent.len() == CACHED_DELTAS {
            recent.pop_front();
        }
        recent.push_back((base.version.clone(), target.version.clone(), Arc::clone(&d)));
        d
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn desired(text: &str) -> Desired {
        let policy = Policy::parse(text, "test.yaml", Path::new(".")).expect("valid policy");
        Desired::new(&policy, "test.yaml".into())
    }

    const BASE: &str = r"
version: v1
accounts:
  - id: a
    prefixes: [10.0.0.1/32]
  - id: b
    prefixes: [10.0.0.2/32]
    limits: {outbound: {pps: 1k}}
  - id: c
    prefixes: [10.0.0.3/32]
";

    #[test]
    fn the_version_is_the_files_version_and_a_content_hash() {
        let one = desired(BASE);
        assert!(one.version.starts_with("v1-"), "{}", one.version);
        assert_eq!(
            one.version,
            desired(BASE).version,
            "same content, same version"
        );
        let other = desired(&BASE.replace("1k", "2k"));
        assert_ne!(one.version, other.version, "other content, other version");
        assert!(other.version.starts_with("v1-"));
        let unversioned = desired(&BASE.replace("version: v1", ""));
        assert_eq!(unversioned.version.len(), 12, "{}", unversioned.version);
        let long = desired(&BASE.replace("v1", &"é".repeat(MAX_VERSION_LEN)));
        assert_eq!(
            long.version.chars().count(),
            MAX_VERSION_LEN,
            "{}",
            long.version
        );
    }

    #[test]
    fn a_delta_holds_only_what_changed() {
        let base = desired(BASE);
        let target = desired(
            &(BASE
                .replace("1k", "2k")
                .replace("  - id: c\n    prefixes: [10.0.0.3/32]\n", "")
                + "  - id: d\n    prefixes: [10.0.0.4/32]\n"),
        );
        let d = delta(&base, &target);
        let upserts: Vec<_> = d.upsert_accounts.iter().map(|a| a.id.as_str()).collect();
        assert_eq!(upserts, ["b", "d"]);
        assert_eq!(d.remove_accounts, ["c"]);
        assert_eq!(d.global, None, "the global section did not change");
        assert_eq!(d.defaults, None);
        assert_eq!(d.base_version, base.version);
        assert_eq!(d.version, target.version);
    }

    #[test]
    fn a_delta_is_computed_once_for_every_stream() {
        let cache = DeltaCache::default();
        let base = desired(BASE);
        let target = desired(&BASE.replace("1k", "2k"));
        let first = cache.get(&base, &target);
        assert!(Arc::ptr_eq(
            &first,
            &cache.get(&base, &desired(&BASE.replace("1k", "2k")))
        ));
        let back = cache.get(&target, &base);
        assert!(!Arc::ptr_eq(&first, &back));
        assert_eq!(back.base_version, target.version);
    }

    #[test]
    fn a_changed_global_section_is_sent_whole() {
        let base = desired(BASE);
        let target = desired(&BASE.replace(
            "accounts:",
            "global:\n  block: [{name: bad, cidrs: [192.0.2.0/24]}]\naccounts:",
        ));
        let d = delta(&base, &target);
        assert!(d.upsert_accounts.is_empty() && d.remove_accounts.is_empty());
        let global = d.global.expect("the global section changed");
        assert_eq!(global.block[0].cidrs, ["192.0.2.0/24"]);
    }
}
