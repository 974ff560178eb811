//! The validated policy: what validation produces and compilation reads.

use std::{
    hash::{Hash, Hasher},
    sync::Arc,
};

use ipnet::{Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};

/// What a matching block rule, or a rate limit, does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Drop the packet.
    Drop,
    /// Count and report it, never drop.
    Monitor,
}

impl Action {
    pub(super) const WORDS: &[(&str, Self)] = &[("drop", Self::Drop), ("monitor", Self::Monitor)];
}

/// Whether a scope's rules drop or only monitor.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Rules act as written.
    #[default]
    Enforce,
    /// Every rule of the scope acts as `monitor`.
    Monitor,
}

impl Mode {
    pub(super) const WORDS: &[(&str, Self)] =
        &[("enforce", Self::Enforce), ("monitor", Self::Monitor)];

    /// The action a rule written as `action` has in this mode.
    #[must_use]
    pub fn apply(self, action: Action) -> Action {
        match self {
            Self::Enforce => action,
            Self::Monitor => Action::Monitor,
        }
    }
}

// ---------------------------------------------------------------------------
// Validated policy

/// A validated policy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Policy {
    /// Where it came from: a file path or [`DEFAULT_POLICY_NAME`](super::DEFAULT_POLICY_NAME).
    pub source: String,
    /// The `version` the file declares, if any.
    pub version: Option<String>,
    pub global: Global,
    /// Shared: a policy made from another by a delta shares every account it
    /// did not change (100,000 accounts are copied in microseconds).
    pub accounts: Vec<Arc<Account>>,
}

/// Rules for all traffic, attributed or not.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Global {
    pub mode: Mode,
    /// Verdict for truncated and malformed IP packets.
    pub malformed: Action,
    pub events_per_second: u32,
    pub lists: Vec<List>,
}

/// A named CIDR list of the remote address.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Hash)]
pub struct List {
    pub name: String,
    pub kind: ListKind,
    pub v4: Vec<Ipv4Net>,
    pub v6: Vec<Ipv6Net>,
}

/// Block (with its action, after the scope's mode) or allow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Hash)]
#[serde(rename_all = "lowercase")]
pub enum ListKind {
    Block(Action),
    Allow,
}

/// One customer account on this host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Hash)]
pub struct Account {
    pub id: String,
    pub mode: Mode,
    pub prefixes_v4: Vec<Ipv4Net>,
    pub prefixes_v6: Vec<Ipv6Net>,
    pub lists: Vec<List>,
    pub inbound: Option<DirLimits>,
    pub outbound: Option<DirLimits>,
    /// A 128-bit hash of everything above, taken while the account is
    /// validated (its data is in the cache then). Compiling against the
    /// previous policy compares fingerprints instead of whole accounts. Two
    /// different accounts share one by accident with probability about
    /// 2^-128 (XXH3 is not built against deliberate collisions; the policy
    /// is the operator's own).
    #[serde(skip)]
    pub fingerprint: Fingerprint,
}

/// An account's fingerprint: XXH3-128 of the account's derived `Hash`, so
/// that a field added to [`Account`] (or to anything it holds) is in the
/// fingerprint without anyone listing it. A fingerprint that missed a field
/// would let a changed account keep its old entries in the kernel, with no
/// error anywhere.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Fingerprint(pub u128);

/// Hashes nothing: the fingerprint is the one field of an account that is
/// not part of its own fingerprint. (Equal fingerprints hash alike, as `Eq`
/// requires.)
impl Hash for Fingerprint {
    fn hash<H: Hasher>(&self, _: &mut H) {}
}

impl Account {
    /// Computes [`Account::fingerprint`]: XXH3-128 of every field but the
    /// fingerprint itself.
    #[must_use]
    pub fn fingerprint_of(&self) -> Fingerprint {
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        self.hash(&mut h);
        Fingerprint(h.digest128())
    }
}

/// Rate limits of one direction; the action is after the account's mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Hash)]
pub struct DirLimits {
    pub pps: Option<Rate>,
    pub bps: Option<Rate>,
    pub action: Action,
}

/// A rate and its burst, in packets or bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Hash)]
pub struct Rate {
    pub rate: u64,
    pub burst: u64,
}

impl List {
    /// Prefixes in the list, both families.
    #[must_use]
    pub fn len(&self) -> usize {
        self.v4.len() + self.v6.len()
    }

    /// Whether the list has no prefixes.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
