//! The policy: its YAML schema, and validation into a [`Policy`].
//!
//! Parsing happens in two steps. serde-saphyr turns the text into the raw
//! schema (`Raw*`), rejecting unknown fields and wrong types with the line and
//! column. Validation then checks every value and collects *all* problems,
//! each with its location, field path and value, so one run of
//! `mmesh-agent policy validate` shows everything that is wrong.

use std::{
    collections::{HashMap, HashSet},
    fmt,
    net::IpAddr,
    path::{Path, PathBuf},
};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::{Deserialize, Deserializer, Serialize};

/// The validator's sets grow to hundreds of thousands of entries: hashed
/// with foldhash, not `SipHash` (the policy is the operator's own).
type FastHash = foldhash::fast::RandomState;
type FastMap<K, V> = HashMap<K, V, FastHash>;

/// The policy the agent runs when no file is given.
pub const DEFAULT_POLICY: &str = include_str!("default-policy.yaml");
/// How the embedded default policy is named in messages.
pub const DEFAULT_POLICY_NAME: &str = "<embedded default policy>";

/// Largest packet rate accepted (packets per second).
pub const MAX_PPS: u64 = 10_000_000_000;
/// Smallest bit rate accepted: one byte per second.
pub const MIN_BPS: u64 = 8;
/// Largest bit rate accepted: 100 Tbit/s.
pub const MAX_BPS: u64 = 100_000_000_000_000;
/// A burst may hold at most this many seconds of the rate.
pub const MAX_BURST_SECONDS: u64 = 3600;
/// Default burst, in milliseconds of the rate (both pps and bps). A burst
/// of losses ends TCP's fast recovery in a retransmission timeout, at least
/// 200 ms (Linux's `TCP_RTO_MIN`) plus the round-trip time; a bucket that
/// holds less than that overflows while the sender waits, and the time is
/// lost for good: with a tenth of a second one stream got 48% of its limit.
/// Half a second gave 0.89–0.98 of the limit (0.956 is TCP's ceiling) from
/// 1 Mbit/s to 1 Gbit/s, RTTs of 0–100 ms, one and eight streams
/// (docs/benchmarks.md, "TCP under a bit-rate limit").
pub const DEFAULT_BURST_MILLIS: u64 = 500;
/// The least default `bps_burst`: twenty full-size Ethernet frames, twice
/// TCP's initial window, so that a connection's first flight fits below
/// 480 kbit/s, where half a second of the rate would not hold it.
pub const MIN_DEFAULT_BPS_BURST: u64 = 20 * 1514 * 8;
/// The least default `pps_burst`: the same twenty packets.
pub const MIN_DEFAULT_PPS_BURST: u64 = 20;
/// Largest `events_per_second`.
pub const MAX_EVENTS_PER_SECOND: u64 = 1_000_000;
/// Events per (account, reason) per second when the policy does not say.
pub const DEFAULT_EVENTS_PER_SECOND: u32 = 10;
/// Longest account id and list name.
pub const MAX_NAME_LEN: usize = 128;

/// What a matching block rule, or a rate limit, does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Drop the packet.
    Drop,
    /// Count and report it, never drop.
    Monitor,
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
// Raw schema

/// A scalar read as text whatever its YAML type, so that `pps: 1000` and
/// `pps: "10k"` both reach validation (which names the field when it is bad).
#[derive(Clone, Debug)]
struct Scalar(String);

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Scalar;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a number or a string")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Scalar, E> {
                Ok(Scalar(v.to_owned()))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// `field:` with nothing after it (YAML null) reads as empty, like an
/// absent field.
fn null_as_empty<'de, D: Deserializer<'de>, T: Deserialize<'de> + Default>(
    d: D,
) -> Result<T, D::Error> {
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

std::thread_local! {
    /// Set while a JSON policy is deserialized: [`At`] then has no location
    /// to take from the deserializer.
    static READING_JSON: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// A value with the line and column it came from (0 when the format gives
/// none: JSON, whose problems are then named by their field path alone).
#[derive(Clone, Debug)]
struct At<T> {
    value: T,
    line: u64,
    column: u64,
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for At<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        if READING_JSON.get() {
            return Ok(Self {
                value: T::deserialize(deserializer)?,
                line: 0,
                column: 0,
            });
        }
        let spanned = serde_saphyr::Spanned::<T>::deserialize(deserializer)?;
        Ok(Self {
            line: spanned.referenced.line(),
            column: spanned.referenced.column(),
            value: spanned.value,
        })
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    #[serde(default)]
    version: Option<Scalar>,
    #[serde(default)]
    global: RawGlobal,
    #[serde(default)]
    defaults: RawDefaults,
    #[serde(default, deserialize_with = "null_as_empty")]
    accounts: Vec<RawAccount>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGlobal {
    #[serde(default)]
    mode: Option<Mode>,
    #[serde(default)]
    malformed: Option<Action>,
    #[serde(default)]
    events_per_second: Option<At<Scalar>>,
    #[serde(default, deserialize_with = "null_as_empty")]
    block: Vec<RawList>,
    #[serde(default, deserialize_with = "null_as_empty")]
    allow: Vec<RawList>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDefaults {
    #[serde(default)]
    mode: Option<Mode>,
    #[serde(default)]
    limits: Option<RawLimits>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawList {
    #[serde(default)]
    name: Option<At<String>>,
    #[serde(default)]
    action: Option<At<Action>>,
    #[serde(default, deserialize_with = "null_as_empty")]
    cidrs: Vec<At<String>>,
    #[serde(default)]
    file: Option<At<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAccount {
    id: At<String>,
    #[serde(default, deserialize_with = "null_as_empty")]
    prefixes: Vec<At<String>>,
    #[serde(default)]
    mode: Option<Mode>,
    #[serde(default, deserialize_with = "null_as_empty")]
    block: Vec<RawList>,
    #[serde(default, deserialize_with = "null_as_empty")]
    allow: Vec<RawList>,
    #[serde(default)]
    limits: Option<RawLimits>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    #[serde(default)]
    inbound: Option<RawDirLimits>,
    #[serde(default)]
    outbound: Option<RawDirLimits>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDirLimits {
    #[serde(default)]
    pps: Option<At<Scalar>>,
    #[serde(default)]
    pps_burst: Option<At<Scalar>>,
    #[serde(default)]
    bps: Option<At<Scalar>>,
    #[serde(default)]
    bps_burst: Option<At<Scalar>>,
    #[serde(default)]
    action: Option<Action>,
}

// ---------------------------------------------------------------------------
// Validated policy

/// A validated policy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Policy {
    /// Where it came from: a file path or [`DEFAULT_POLICY_NAME`].
    pub source: String,
    /// The `version` the file declares, if any.
    pub version: Option<String>,
    pub global: Global,
    pub accounts: Vec<Account>,
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
    pub fingerprint: u128,
}

impl Account {
    /// Computes [`Account::fingerprint`] (XXH3-128 of every field).
    #[must_use]
    pub fn fingerprint_of(&self) -> u128 {
        use std::hash::Hash as _;
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        (
            &self.id,
            self.mode,
            &self.prefixes_v4,
            &self.prefixes_v6,
            &self.lists,
            self.inbound,
            self.outbound,
        )
            .hash(&mut h);
        h.digest128()
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

// ---------------------------------------------------------------------------
// Errors

/// One problem found in a policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Issue {
    /// `file:line:column`, or `file:line` for list files, or the source name.
    pub location: String,
    /// Field path, e.g. `accounts[2].limits.outbound.pps`.
    pub path: String,
    pub message: String,
}

impl fmt::Display for Issue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: {}", self.location, self.path, self.message)
    }
}

/// Why a policy was rejected.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read policy file {path}: {source}; check the path and its permissions")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("policy {source_name} is not valid {format} for a policy:\n{message}")]
    Syntax {
        source_name: String,
        format: &'static str,
        message: String,
    },
    #[error("policy {source_name} is invalid ({} problem{}):\n{}", issues.len(), if issues.len() == 1 { "" } else { "s" }, issues.iter().map(|i| format!("  {i}")).collect::<Vec<_>>().join("\n"))]
    Invalid {
        source_name: String,
        issues: Vec<Issue>,
    },
}

// ---------------------------------------------------------------------------
// Entry points

impl Policy {
    /// The embedded default policy.
    pub fn embedded_default() -> Result<Self, PolicyError> {
        Self::parse(DEFAULT_POLICY, DEFAULT_POLICY_NAME, Path::new("."))
    }

    /// Reads and validates a policy file. List `file:` paths are relative to
    /// the policy file's directory.
    pub fn from_file(path: &Path) -> Result<Self, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let base = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        Self::parse(&text, &path.display().to_string(), base)
    }

    /// Validates policy text; `source_name` names it in messages and
    /// `base_dir` resolves relative list files. Text that starts with `{` is
    /// read as JSON (valid YAML too, but `serde_json` reads it about four
    /// times faster: for large generated policies); anything else as YAML.
    pub fn parse(text: &str, source_name: &str, base_dir: &Path) -> Result<Self, PolicyError> {
        let raw: RawPolicy = if text.trim().is_empty() {
            RawPolicy::default()
        } else if text.trim_start().starts_with('{') {
            READING_JSON.set(true);
            let raw = serde_json::from_str(text);
            READING_JSON.set(false);
            raw.map_err(|err| PolicyError::Syntax {
                source_name: source_name.to_owned(),
                format: "JSON",
                message: format!("error: {err}"),
            })?
        } else {
            // The default node budget (250,000) stops near 10,000 accounts; the
            // file is the operator's own, so let it grow with the file while
            // keeping the other limits (aliases, nesting) at their defaults.
            let options = serde_saphyr::options! {
                budget: serde_saphyr::budget! {
                    max_nodes: (text.len() / 2).max(250_000),
                    max_events: text.len().max(1_000_000),
                },
            };
            serde_saphyr::from_str_with_options(text, options).map_err(|err| {
                PolicyError::Syntax {
                    source_name: source_name.to_owned(),
                    format: "YAML",
                    // The rendered snippet calls the text <input>: name the file.
                    message: err.to_string().replace("<input>", source_name),
                }
            })?
        };
        let mut v = Validator {
            source: source_name,
            base_dir,
            issues: Vec::new(),
        };
        let policy = v.policy(raw);
        if v.issues.is_empty() {
            Ok(policy)
        } else {
            Err(PolicyError::Invalid {
                source_name: source_name.to_owned(),
                issues: v.issues,
            })
        }
    }
}

// ---------------------------------------------------------------------------
// Validation

struct Validator<'a> {
    source: &'a str,
    base_dir: &'a Path,
    issues: Vec<Issue>,
}

impl Validator<'_> {
    fn at<T>(&self, at: &At<T>) -> String {
        if at.line == 0 {
            self.source.to_owned()
        } else {
            format!("{}:{}:{}", self.source, at.line, at.column)
        }
    }

    fn issue(&mut self, location: String, path: impl Into<String>, message: impl Into<String>) {
        self.issues.push(Issue {
            location,
            path: path.into(),
            message: message.into(),
        });
    }

    fn policy(&mut self, raw: RawPolicy) -> Policy {
        let global = self.global(raw.global);
        let default_mode = raw.defaults.mode.unwrap_or_default();
        let n = raw.accounts.len();
        let mut seen_ids: FastMap<String, usize> =
            FastMap::with_capacity_and_hasher(n, FastHash::default());
        // The index in `accounts` of the account owning each prefix.
        let mut owners: FastMap<IpNet, usize> =
            FastMap::with_capacity_and_hasher(2 * n, FastHash::default());
        let mut accounts: Vec<Account> = Vec::with_capacity(n);
        for (i, acc) in raw.accounts.into_iter().enumerate() {
            let path = format!("accounts[{i}]");
            let id_at = self.at(&acc.id);
            if let Some(first) = seen_ids.insert(acc.id.value.clone(), i) {
                self.issue(
                    id_at.clone(),
                    format!("{path}.id"),
                    format!(
                        "account id {:?} is already used by accounts[{first}]; ids must be unique",
                        acc.id.value
                    ),
                );
            }
            let account = self.account(acc, &path, default_mode, raw.defaults.limits.as_ref());
            for net in account
                .prefixes_v4
                .iter()
                .map(|n| IpNet::V4(*n))
                .chain(account.prefixes_v6.iter().map(|n| IpNet::V6(*n)))
            {
                if let Some(&other) = owners.get(&net) {
                    let other = &accounts[other].id;
                    if *other != account.id {
                        self.issue(
                            id_at.clone(),
                            format!("{path}.prefixes"),
                            format!("prefix {net} is also owned by account {other:?}; an address belongs to one account (nested prefixes are allowed, the most specific wins)"),
                        );
                    }
                } else {
                    owners.insert(net, accounts.len());
                }
            }
            accounts.push(account);
        }
        Policy {
            source: self.source.to_owned(),
            version: raw.version.map(|v| v.0),
            global,
            accounts,
        }
    }

    fn global(&mut self, raw: RawGlobal) -> Global {
        let mode = raw.mode.unwrap_or_default();
        let events_per_second = match raw.events_per_second {
            Some(eps) => {
                let at = self.at(&eps);
                self.integer(
                    &eps.value.0,
                    at,
                    "global.events_per_second",
                    0,
                    MAX_EVENTS_PER_SECOND,
                )
                .map_or(DEFAULT_EVENTS_PER_SECOND, |n| n as u32)
            }
            None => DEFAULT_EVENTS_PER_SECOND,
        };
        let lists = self.lists(raw.block, raw.allow, "global", mode);
        Global {
            mode,
            malformed: raw.malformed.unwrap_or(Action::Drop),
            events_per_second,
            lists,
        }
    }

    fn account(
        &mut self,
        raw: RawAccount,
        path: &str,
        default_mode: Mode,
        default_limits: Option<&RawLimits>,
    ) -> Account {
        let id_at = self.at(&raw.id);
        let id = raw.id.value;
        if let Err(msg) = check_name(&id) {
            self.issue(
                id_at.clone(),
                format!("{path}.id"),
                format!("account id {id:?} {msg}"),
            );
        }
        if raw.prefixes.is_empty() {
            self.issue(id_at.clone(), format!("{path}.prefixes"), format!("account {id:?} has no prefixes: list the addresses it owns on this host (e.g. 10.1.2.3/32)"));
        }
        let mut prefixes_v4 = Vec::new();
        let mut prefixes_v6 = Vec::new();
        let mut seen = HashSet::new();
        for (j, p) in raw.prefixes.iter().enumerate() {
            let at = self.at(p);
            match parse_cidr(&p.value) {
                Ok(net) => {
                    if !seen.insert(net) {
                        self.issue(
                            at,
                            format!("{path}.prefixes[{j}]"),
                            format!("prefix {net} is listed twice"),
                        );
                        continue;
                    }
                    match net {
                        IpNet::V4(n) => prefixes_v4.push(n),
                        IpNet::V6(n) => prefixes_v6.push(n),
                    }
                }
                Err(msg) => self.issue(at, format!("{path}.prefixes[{j}]"), msg),
            }
        }
        let mode = raw.mode.unwrap_or(default_mode);
        let lists = self.lists(raw.block, raw.allow, path, mode);
        let limits = raw.limits.as_ref().or(default_limits);
        let limits_path = if raw.limits.is_some() {
            format!("{path}.limits")
        } else {
            "defaults.limits".to_owned()
        };
        let (inbound, outbound) = match limits {
            Some(l) => (
                l.inbound
                    .as_ref()
                    .and_then(|d| self.dir_limits(d, &format!("{limits_path}.inbound"), mode)),
                l.outbound
                    .as_ref()
                    .and_then(|d| self.dir_limits(d, &format!("{limits_path}.outbound"), mode)),
            ),
            None => (None, None),
        };
        let mut account = Account {
            id,
            mode,
            prefixes_v4,
            prefixes_v6,
            lists,
            inbound,
            outbound,
            fingerprint: 0,
        };
        account.fingerprint = account.fingerprint_of();
        account
    }

    fn lists(
        &mut self,
        block: Vec<RawList>,
        allow: Vec<RawList>,
        scope: &str,
        mode: Mode,
    ) -> Vec<List> {
        let mut names = HashSet::new();
        let mut out = Vec::new();
        for (field, raws) in [("block", block), ("allow", allow)] {
            for (i, raw) in raws.into_iter().enumerate() {
                let path = format!("{scope}.{field}[{i}]");
                let name = match &raw.name {
                    Some(n) => {
                        if let Err(msg) = check_name(&n.value) {
                            let at = self.at(n);
                            self.issue(
                                at,
                                format!("{path}.name"),
                                format!("list name {:?} {msg}", n.value),
                            );
                        }
                        n.value.clone()
                    }
                    None => format!("{scope}.{field}[{i}]"),
                };
                if !names.insert(name.clone()) {
                    let at = raw
                        .name
                        .as_ref()
                        .map_or_else(|| self.source.to_owned(), |n| self.at(n));
                    self.issue(
                        at,
                        format!("{path}.name"),
                        format!("list name {name:?} is used twice in {scope}"),
                    );
                }
                let kind = if field == "block" {
                    ListKind::Block(
                        mode.apply(raw.action.as_ref().map_or(Action::Drop, |a| a.value)),
                    )
                } else {
                    if let Some(a) = &raw.action {
                        let at = self.at(a);
                        self.issue(at, format!("{path}.action"), "allow lists take no action: they exempt addresses from the block lists of the same scope");
                    }
                    ListKind::Allow
                };
                if raw.cidrs.is_empty() && raw.file.is_none() {
                    let at = raw
                        .name
                        .as_ref()
                        .map_or_else(|| self.source.to_owned(), |n| self.at(n));
                    self.issue(
                        at,
                        path.clone(),
                        "the list is empty: give `cidrs`, a `file`, or both",
                    );
                }
                let mut v4 = Vec::new();
                let mut v6 = Vec::new();
                for (j, c) in raw.cidrs.iter().enumerate() {
                    match parse_cidr(&c.value) {
                        Ok(IpNet::V4(n)) => v4.push(n),
                        Ok(IpNet::V6(n)) => v6.push(n),
                        Err(msg) => {
                            let at = self.at(c);
                            self.issue(at, format!("{path}.cidrs[{j}]"), msg);
                        }
                    }
                }
                if let Some(file) = &raw.file {
                    self.list_file(file, &format!("{path}.file"), &mut v4, &mut v6);
                }
                v4.sort_unstable();
                v4.dedup();
                v6.sort_unstable();
                v6.dedup();
                out.push(List { name, kind, v4, v6 });
            }
        }
        out
    }

    fn list_file(
        &mut self,
        file: &At<String>,
        path: &str,
        v4: &mut Vec<Ipv4Net>,
        v6: &mut Vec<Ipv6Net>,
    ) {
        let full: PathBuf = self.base_dir.join(&file.value);
        let text = match std::fs::read_to_string(&full) {
            Ok(t) => t,
            Err(err) => {
                let at = self.at(file);
                self.issue(
                    at,
                    path,
                    format!("cannot read list file {}: {err}", full.display()),
                );
                return;
            }
        };
        let mut bad = 0usize;
        for (n, line) in text.lines().enumerate() {
            let entry = line.split('#').next().unwrap_or("").trim();
            if entry.is_empty() {
                continue;
            }
            match parse_cidr(entry) {
                Ok(IpNet::V4(net)) => v4.push(net),
                Ok(IpNet::V6(net)) => v6.push(net),
                Err(msg) => {
                    bad += 1;
                    // Report the first few of a broken feed, not a million lines.
                    if bad <= 10 {
                        self.issue(format!("{}:{}", full.display(), n + 1), path, msg);
                    }
                }
            }
        }
        if bad > 10 {
            self.issue(
                full.display().to_string(),
                path,
                format!("{} more bad lines not shown", bad - 10),
            );
        }
    }

    fn dir_limits(&mut self, raw: &RawDirLimits, path: &str, mode: Mode) -> Option<DirLimits> {
        let pps = raw.pps.as_ref().and_then(|r| {
            self.rate(
                r,
                raw.pps_burst.as_ref(),
                &format!("{path}.pps"),
                (1, MAX_PPS),
                (1, MIN_DEFAULT_PPS_BURST),
            )
        });
        let bps = raw.bps.as_ref().and_then(|r| {
            self.rate(
                r,
                raw.bps_burst.as_ref(),
                &format!("{path}.bps"),
                (MIN_BPS, MAX_BPS),
                (8, MIN_DEFAULT_BPS_BURST),
            )
        });
        for (burst, rate, name) in [
            (&raw.pps_burst, &raw.pps, "pps"),
            (&raw.bps_burst, &raw.bps, "bps"),
        ] {
            if let (Some(b), None) = (burst, rate) {
                let at = self.at(b);
                self.issue(
                    at,
                    format!("{path}.{name}_burst"),
                    format!("{name}_burst without {name}: a burst needs a rate"),
                );
            }
        }
        if pps.is_none() && bps.is_none() {
            return None;
        }
        Some(DirLimits {
            pps,
            bps,
            action: mode.apply(raw.action.unwrap_or(Action::Drop)),
        })
    }

    /// A rate within `range` at `path` and its burst (at `path`_burst), at
    /// least `min_burst` and at most an hour of the rate; by default
    /// [`DEFAULT_BURST_MILLIS`] of the rate, at least `default_floor`.
    fn rate(
        &mut self,
        rate: &At<Scalar>,
        burst: Option<&At<Scalar>>,
        path: &str,
        (min, max): (u64, u64),
        (min_burst, default_floor): (u64, u64),
    ) -> Option<Rate> {
        let rate = self.quantity(rate, path, min, max)?;
        let burst = match burst {
            Some(b) => self.quantity(
                b,
                &format!("{path}_burst"),
                min_burst,
                rate.saturating_mul(MAX_BURST_SECONDS),
            )?,
            None => default_burst(rate, default_floor),
        };
        Some(Rate { rate, burst })
    }

    fn quantity(&mut self, raw: &At<Scalar>, path: &str, min: u64, max: u64) -> Option<u64> {
        let at = self.at(raw);
        match parse_quantity(&raw.value.0) {
            Ok(n) if (min..=max).contains(&n) => Some(n),
            Ok(n) => {
                self.issue(
                    at,
                    path,
                    format!(
                        "{:?} = {n} is out of range: it must be between {min} and {max}",
                        raw.value.0
                    ),
                );
                None
            }
            Err(msg) => {
                self.issue(at, path, msg);
                None
            }
        }
    }

    fn integer(&mut self, text: &str, at: String, path: &str, min: u64, max: u64) -> Option<u64> {
        match text.trim().parse::<u64>() {
            Ok(n) if (min..=max).contains(&n) => Some(n),
            _ => {
                self.issue(
                    at,
                    path,
                    format!("{text:?} is not a whole number between {min} and {max}"),
                );
                None
            }
        }
    }
}

/// The burst of a rate that was given none: [`DEFAULT_BURST_MILLIS`] of
/// it, at least `floor`.
#[must_use]
pub fn default_burst(rate: u64, floor: u64) -> u64 {
    let burst = u128::from(rate) * u128::from(DEFAULT_BURST_MILLIS) / 1000;
    u64::try_from(burst).unwrap_or(u64::MAX).max(floor)
}

fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("is empty".to_owned());
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!("is longer than {MAX_NAME_LEN} characters"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '/' | '@')))
    {
        return Err(format!(
            "contains {c:?}: use letters, digits and - _ . : / @"
        ));
    }
    Ok(())
}

/// Parses `a.b.c.d/len`, `x::y/len`, or a bare address (a host prefix).
/// Host bits must be zero: `10.0.0.1/24` is refused with the network it
/// probably meant.
pub fn parse_cidr(text: &str) -> Result<IpNet, String> {
    let text = text.trim();
    let net = if text.contains('/') {
        text.parse::<IpNet>().map_err(|_| {
            format!("{text:?} is not a CIDR prefix (expected e.g. 10.0.0.0/8 or 2001:db8::/32)")
        })?
    } else {
        let addr: IpAddr = text.parse().map_err(|_| format!("{text:?} is not an IP address or CIDR prefix (expected e.g. 10.0.0.0/8 or 2001:db8::/32)"))?;
        IpNet::from(addr)
    };
    if net.trunc() != net {
        return Err(format!(
            "{text:?} has host bits set; did you mean {}?",
            net.trunc()
        ));
    }
    Ok(net)
}

/// Parses a rate or size: a whole or decimal number with an optional SI
/// suffix k, M, G or T (powers of 1000), e.g. `100000`, `10k`, `1.5G`.
pub fn parse_quantity(text: &str) -> Result<u64, String> {
    let bad = || {
        format!(
            "{text:?} is not a quantity: expected a number with an optional k, M, G or T suffix (e.g. 10k, 1.5G)"
        )
    };
    let t = text.trim();
    let (digits, scale) = match t.char_indices().last() {
        Some((i, 'k' | 'K')) => (&t[..i], 1_000u64),
        Some((i, 'M')) => (&t[..i], 1_000_000),
        Some((i, 'G')) => (&t[..i], 1_000_000_000),
        Some((i, 'T')) => (&t[..i], 1_000_000_000_000),
        _ => (t, 1),
    };
    if digits.is_empty()
        || !digits.chars().all(|c| c.is_ascii_digit() || c == '.')
        || digits.matches('.').count() > 1
    {
        return Err(bad());
    }
    let (whole, frac) = digits.split_once('.').unwrap_or((digits, ""));
    let whole: u64 = if whole.is_empty() {
        0
    } else {
        whole.parse().map_err(|_| bad())?
    };
    let mut value = whole.checked_mul(scale).ok_or_else(bad)?;
    // Decimal fractions exactly, digit by digit: 1.5G is 1_500_000_000.
    let mut unit = scale;
    for c in frac.chars() {
        unit /= 10;
        if unit == 0 {
            return Err(format!("{text:?} has more decimals than its unit allows"));
        }
        value = value
            .checked_add(u64::from(c.to_digit(10).ok_or_else(bad)?) * unit)
            .ok_or_else(bad)?;
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities() {
        assert_eq!(parse_quantity("100000"), Ok(100_000));
        assert_eq!(parse_quantity("10k"), Ok(10_000));
        assert_eq!(parse_quantity("1.5G"), Ok(1_500_000_000));
        assert_eq!(parse_quantity("2T"), Ok(2_000_000_000_000));
        assert_eq!(parse_quantity(" 7M "), Ok(7_000_000));
        assert!(parse_quantity("1.5").unwrap_err().contains("more decimals"));
        for bad in ["", "k", "-5", "10x", "1..2k", "1e6", "ten"] {
            assert!(
                parse_quantity(bad)
                    .unwrap_err()
                    .contains("is not a quantity"),
                "{bad}"
            );
        }
    }

    #[test]
    fn cidrs() {
        assert_eq!(parse_cidr("10.0.0.0/8").unwrap().to_string(), "10.0.0.0/8");
        assert_eq!(parse_cidr("192.0.2.7").unwrap().to_string(), "192.0.2.7/32");
        assert_eq!(
            parse_cidr("2001:db8::1").unwrap().to_string(),
            "2001:db8::1/128"
        );
        assert!(
            parse_cidr("10.0.0.1/24")
                .unwrap_err()
                .contains("did you mean 10.0.0.0/24")
        );
        assert!(
            parse_cidr("10.0.0.0/33")
                .unwrap_err()
                .contains("is not a CIDR")
        );
        assert!(
            parse_cidr("banana")
                .unwrap_err()
                .contains("is not an IP address")
        );
    }

    #[test]
    fn json_policies_are_read_and_checked_by_field_path() {
        let json = r#"{"global": {"block": [{"name": "x", "cidrs": ["10.0.0.0/8"]}]},
                       "accounts": [{"id": "a", "prefixes": ["10.1.0.1"], "limits": {"inbound": {"pps": 1000}}}]}"#;
        let p = Policy::parse(json, "p.json", Path::new(".")).expect("valid JSON policy");
        assert_eq!(p.accounts[0].inbound.unwrap().pps.unwrap().rate, 1000);
        let bad = r#"{"accounts": [{"id": "a", "prefixes": ["10.1.0.1/24"]}]}"#;
        let err = Policy::parse(bad, "p.json", Path::new("."))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("p.json: accounts[0].prefixes[0]: \"10.1.0.1/24\" has host bits set"),
            "{err}"
        );
        let err = Policy::parse(
            r#"{"accounts": [{"id": "a", "colour": 1}]}"#,
            "p.json",
            Path::new("."),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("p.json is not valid JSON for a policy")
                && err.contains("unknown field `colour`"),
            "{err}"
        );
    }

    #[test]
    fn large_yaml_policies_are_not_refused() {
        // serde-saphyr's default budget stops near 10,000 accounts of this shape.
        use std::fmt::Write as _;
        let mut y = String::from("accounts:\n");
        for i in 0..12_000u32 {
            let _ = write!(
                y,
                "  - id: a{i}\n    prefixes: [10.{}.{}.1, 'fd00::{i:x}']\n    limits:\n      inbound: {{ pps: 1k, bps: 1M }}\n",
                i >> 8,
                i & 255
            );
        }
        let p =
            Policy::parse(&y, "big.yaml", Path::new(".")).expect("a 12,000-account policy is read");
        assert_eq!(p.accounts.len(), 12_000);
    }

    #[test]
    fn empty_fields_read_as_empty() {
        let p =
            Policy::parse("global:\n  block:\naccounts:\n", "t", Path::new(".")).expect("valid");
        assert!(p.accounts.is_empty() && p.global.lists.is_empty());
    }

    #[test]
    fn embedded_default_is_valid() {
        let policy = Policy::embedded_default().expect("the embedded default policy validates");
        assert!(
            policy.accounts.is_empty(),
            "the default attributes nothing: it cannot disturb customer traffic"
        );
        assert!(
            policy
                .global
                .lists
                .iter()
                .all(|l| l.kind != ListKind::Block(Action::Drop)),
            "the default never drops by list"
        );
    }
}
