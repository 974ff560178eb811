//! A map built whole once (a snapshot's), with the changes of the deltas
//! since kept beside it in a persistent map.
//!
//! The indexes of a control-plane policy (account id to position, prefix to
//! owner) have hundreds of thousands of entries and are built by the
//! validator anyway, in a plain hash map; a persistent map of the same size
//! took longer to build than the validation (about 200 ms for 400,000
//! prefixes). A delta must leave the map it was validated against as it
//! was (the enforcer may still refuse the result), and copies only the few
//! changes it makes: the persistent layer shares all but those. When the
//! changes grow to a share of the base, they are folded into a new base.

use std::{hash::Hash, sync::Arc};

use crate::policy::{FastHash, FastMap};

/// Changes kept beside the base before they are folded into a new one: a
/// quarter of the base, and at least this many.
const MIN_FOLD: usize = 4096;

/// A map: `base`, overridden by `changes` (`None`: removed).
#[derive(Clone, Debug)]
pub struct Layered<K: Hash + Eq + Clone, V: Clone> {
    base: Arc<FastMap<K, V>>,
    changes: imbl::GenericHashMap<K, Option<V>, FastHash, imbl::shared_ptr::DefaultSharedPtr>,
}

impl<K: Hash + Eq + Clone, V: Clone> Default for Layered<K, V> {
    fn default() -> Self {
        Self::new(FastMap::default())
    }
}

impl<K: Hash + Eq + Clone, V: Clone> Layered<K, V> {
    #[must_use]
    pub fn new(base: FastMap<K, V>) -> Self {
        Self {
            base: Arc::new(base),
            changes: imbl::GenericHashMap::with_hasher(FastHash::default()),
        }
    }

    #[must_use]
    pub fn get<Q>(&self, key: &Q) -> Option<&V>
    where
        K: std::borrow::Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        match self.changes.get(key) {
            Some(change) => change.as_ref(),
            None => self.base.get(key),
        }
    }

    pub fn insert(&mut self, key: K, value: V) {
        self.changes.insert(key, Some(value));
    }

    pub fn remove<Q>(&mut self, key: &Q)
    where
        K: std::borrow::Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        if self.base.contains_key(key) {
            self.changes.insert(key.to_owned(), None);
        } else {
            self.changes.remove(key);
        }
    }

    /// Folds the changes into a new base once they are many: a copy of the
    /// base, now and then, instead of lookups through a growing layer.
    pub fn settle(&mut self) {
        if self.changes.len() < MIN_FOLD.max(self.base.len() / 4) {
            return;
        }
        let mut base = FastMap::clone(&self.base);
        for (k, v) in std::mem::take(&mut self.changes) {
            match v {
                Some(v) => base.insert(k, v),
                None => base.remove(&k),
            };
        }
        self.base = Arc::new(base);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_override_the_base_and_survive_a_fold() {
        let base: FastMap<String, u32> = [("a".to_owned(), 1), ("b".to_owned(), 2)]
            .into_iter()
            .collect();
        let mut m = Layered::new(base);
        let before = m.clone();
        m.insert("b".into(), 20);
        m.insert("c".into(), 3);
        m.remove("a");
        m.remove("zz");
        assert_eq!(
            (m.get("a"), m.get("b"), m.get("c")),
            (None, Some(&20), Some(&3))
        );
        // The copy taken before is as it was.
        assert_eq!((before.get("a"), before.get("b")), (Some(&1), Some(&2)));
        // Removing what only the changes held leaves nothing behind.
        m.remove("c");
        assert_eq!(m.get("c"), None);
        for i in 0..MIN_FOLD as u32 {
            m.insert(format!("k{i}"), i);
        }
        m.settle();
        assert!(m.changes.is_empty(), "folded");
        assert_eq!(
            (m.get("a"), m.get("b"), m.get("k7")),
            (None, Some(&20), Some(&7))
        );
    }
}
