//! The policy: its YAML schema, and validation into a [`Policy`].
//!
//! Reading happens in three steps. The files are read as regular files only,
//! within a byte budget, until two looks a moment apart agree (see
//! [`ReadLimits`]). The deserializer (serde-saphyr, or `serde_json` for
//! JSON) turns the text into the raw schema (`Raw*`): every scalar as the
//! text it was written as, with its line and column, and every unknown or
//! repeated field kept aside with its own, so that a misspelt field does not
//! hide the other problems. Validation then checks every value and collects
//! *all* problems, each with its location, field path and value, so one run
//! of `mmesh-agent policy validate` shows everything that is wrong. Only a
//! file that is not YAML or JSON at all, or a value of the wrong shape (a
//! list where a mapping belongs), stops the reading at the first problem.
//!
//! Messages never quote more than [`QUOTE_CHARS`] characters of a value, and
//! never a line of a list file that is not address-shaped: a list `file:`
//! naming `/etc/shadow` does not print it.

use std::{
    borrow::Cow,
    cell::Cell,
    collections::{HashMap, HashSet},
    fmt,
    fs::{File, Metadata, OpenOptions},
    io::Read as _,
    marker::PhantomData,
    net::IpAddr,
    os::unix::fs::{FileTypeExt as _, MetadataExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
    time::Duration,
};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::{
    Deserialize, Deserializer, Serialize,
    de::{IgnoredAny, MapAccess, SeqAccess},
};

use crate::compile::Capacity;

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
/// Longest `version`: it is logged at every reload.
pub const MAX_VERSION_LEN: usize = 128;
/// Longest list `file` path (Linux's `PATH_MAX`).
pub const MAX_PATH_LEN: usize = 4096;
/// Messages quote at most this many characters of a value.
pub const QUOTE_CHARS: usize = 40;
/// Bytes read for one policy, the policy file and its list files together,
/// unless told otherwise (`--max-policy-bytes`): four times the largest
/// policy the default capacities can hold (16,384 accounts and a million
/// list prefixes of each family are about 16 MB of YAML).
pub const DEFAULT_MAX_POLICY_BYTES: u64 = 64 << 20;
/// The moment between the two looks at a policy's files that must agree,
/// as `mmesh-agent run` reads them ([`ReadLimits::new`]).
pub const DEFAULT_SETTLE: Duration = Duration::from_millis(100);
/// Reads of a policy before giving up on files that keep changing.
pub const DEFAULT_READ_ATTEMPTS: u32 = 5;

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
    const WORDS: &[(&str, Self)] = &[("drop", Self::Drop), ("monitor", Self::Monitor)];
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
    const WORDS: &[(&str, Self)] = &[("enforce", Self::Enforce), ("monitor", Self::Monitor)];

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
// Reading files

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
    /// [`Policy::from_file`] uses (tests, benchmarks, tools).
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
struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    fn of(meta: &Metadata) -> Self {
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
    fn of_path(path: &Path) -> Option<Self> {
        std::fs::metadata(path).ok().map(|m| Self::of(&m))
    }
}

/// The files read for one policy, and the bytes they took.
#[derive(Debug, Default)]
struct Reads {
    bytes: u64,
    files: Vec<(PathBuf, Stamp)>,
    /// A file changed while it was read.
    changed: bool,
}

impl Reads {
    /// Whether every file read still looks as it did.
    fn unchanged(&self) -> bool {
        !self.changed
            && self
                .files
                .iter()
                .all(|(path, stamp)| Stamp::of_path(path) == Some(*stamp))
    }
}

fn refuse_irregular(meta: &Metadata) -> Result<(), FileError> {
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
fn read_regular(path: &Path, max: u64) -> Result<(String, Stamp), FileError> {
    refuse_irregular(&std::fs::metadata(path)?)?;
    let file: File = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)?;
    let meta = file.metadata()?;
    refuse_irregular(&meta)?;
    let before = Stamp::of(&meta);
    let too_large = FileError::TooLarge {
        left: max,
        limit: max,
    };
    if before.size > max {
        return Err(too_large);
    }
    let mut bytes = Vec::with_capacity(usize::try_from(before.size).unwrap_or(0) + 1);
    (&file)
        .take(max.saturating_add(1))
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(too_large);
    }
    if Stamp::of(&file.metadata()?) != before {
        return Err(FileError::Changed);
    }
    if bytes.len() as u64 != before.size {
        // Unchanged, yet not what its size says: a file whose size means
        // nothing (procfs reports 0, sysfs 4096).
        return Err(FileError::Pseudo);
    }
    let text = String::from_utf8(bytes).map_err(|_| FileError::NotText)?;
    Ok((text, before))
}

// ---------------------------------------------------------------------------
// Raw schema

/// What the deserializers need to know that serde cannot pass down: the
/// format (JSON has no locations) and the bounds on what is kept.
#[derive(Clone, Copy, Debug)]
struct Reading {
    json: bool,
    max_accounts: usize,
    /// Account prefixes (both families) kept before the rest of the
    /// accounts are only counted: past twice the capacity of one family,
    /// one family is over it for sure.
    max_raw_prefixes: usize,
}

impl Reading {
    const YAML: Self = Self {
        json: false,
        max_accounts: usize::MAX,
        max_raw_prefixes: usize::MAX,
    };
}

std::thread_local! {
    static READING: Cell<Reading> = const { Cell::new(Reading::YAML) };
}

/// Sets [`READING`] for one deserialization, and restores it after (also
/// when the deserializer panics).
struct ReadingGuard(Reading);

impl ReadingGuard {
    fn set(reading: Reading) -> Self {
        Self(READING.replace(reading))
    }
}

impl Drop for ReadingGuard {
    fn drop(&mut self) {
        READING.set(self.0);
    }
}

/// A scalar as written, whatever its YAML or JSON type, so that `pps: 1000`
/// and `pps: "10k"` both reach validation (which names the field when it is
/// bad), `version: 1.10` stays `1.10`, and a number too large for 64 bits is
/// quoted as written instead of rounded through f64. serde-saphyr hands a
/// plain scalar over as its source text when asked for a string; JSON values
/// are taken as their raw text.
#[derive(Clone, Debug, Default)]
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
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Scalar, E> {
                Ok(Scalar(v))
            }
        }
        if !READING.get().json {
            return deserializer.deserialize_str(Visitor);
        }
        let raw = <&serde_json::value::RawValue>::deserialize(deserializer)?.get();
        match raw.as_bytes().first() {
            Some(b'"') => match raw.strip_prefix('"').and_then(|r| r.strip_suffix('"')) {
                // Most strings have no escapes: no second parse.
                Some(plain) if !plain.contains('\\') => Ok(Scalar(plain.to_owned())),
                _ => serde_json::from_str(raw)
                    .map(Scalar)
                    .map_err(serde::de::Error::custom),
            },
            Some(b'[') => Err(serde::de::Error::invalid_type(
                serde::de::Unexpected::Seq,
                &Visitor,
            )),
            Some(b'{') => Err(serde::de::Error::invalid_type(
                serde::de::Unexpected::Map,
                &Visitor,
            )),
            _ => Ok(Scalar(raw.to_owned())),
        }
    }
}

/// A value with the line and column it came from (0 when the format gives
/// none: JSON, whose problems are then named by their field path alone).
#[derive(Clone, Debug)]
struct At<T> {
    value: T,
    line: u32,
    column: u32,
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for At<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        if READING.get().json {
            return Ok(Self {
                value: T::deserialize(deserializer)?,
                line: 0,
                column: 0,
            });
        }
        let spanned = serde_saphyr::Spanned::<T>::deserialize(deserializer)?;
        Ok(Self {
            line: u32::try_from(spanned.referenced.line()).unwrap_or(u32::MAX),
            column: u32::try_from(spanned.referenced.column()).unwrap_or(u32::MAX),
            value: spanned.value,
        })
    }
}

impl At<Scalar> {
    fn text(&self) -> &str {
        &self.value.0
    }
}

/// The field names of a raw struct.
trait Fields {
    const NAMES: &'static [&'static str];
}

/// A mapping key: one of `F`'s field names, or another key as written (cut
/// short: it is only quoted).
struct Key<F> {
    field: Result<&'static str, String>,
    fields: PhantomData<F>,
}

impl<'de, F: Fields> Deserialize<'de> for Key<F> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor<F>(PhantomData<F>);
        impl<F: Fields> serde::de::Visitor<'_> for Visitor<F> {
            type Value = Key<F>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a field name")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Key<F>, E> {
                let field = F::NAMES.iter().find(|n| **n == v).copied().ok_or_else(|| {
                    let cut = v
                        .char_indices()
                        .nth(4 * QUOTE_CHARS)
                        .map_or(v.len(), |(i, _)| i);
                    v[..cut].to_owned()
                });
                Ok(Key {
                    field,
                    fields: PhantomData,
                })
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Key<F>, E> {
                self.visit_str(&v.to_string())
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Key<F>, E> {
                self.visit_str(&v.to_string())
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Key<F>, E> {
                self.visit_str(&v.to_string())
            }
        }
        deserializer.deserialize_identifier(Visitor(PhantomData))
    }
}

/// A key of a raw struct that is not one of its fields, or one given twice.
#[derive(Clone, Debug)]
struct Extra {
    key: At<String>,
    repeated: bool,
}

/// The keys of a raw struct that are not its fields: almost always none, so
/// one word in the struct (a policy holds hundreds of thousands of them).
#[derive(Clone, Debug, Default)]
struct Extras(Option<Box<[Extra]>>);

impl Extras {
    fn push(&mut self, extra: Extra) {
        let mut all = self.0.take().map(Vec::from).unwrap_or_default();
        all.push(extra);
        self.0 = Some(all.into_boxed_slice());
    }

    fn as_slice(&self) -> &[Extra] {
        self.0.as_deref().unwrap_or_default()
    }
}

/// Declares a raw struct: every field optional (absent and YAML null read
/// alike), and keys that are not fields kept in `extra` with their location
/// instead of ending the parse, so that validation reports them with every
/// other problem.
macro_rules! raw_struct {
    ($(#[$meta:meta])* struct $name:ident { $($field:ident: $ty:ty,)* }) => {
        $(#[$meta])*
        #[derive(Debug, Default)]
        struct $name {
            $($field: Option<$ty>,)*
            extra: Extras,
        }

        impl Fields for $name {
            const NAMES: &'static [&'static str] = &[$(stringify!($field)),*];
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                struct Visitor;
                impl<'de> serde::de::Visitor<'de> for Visitor {
                    type Value = $name;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        write!(f, "a mapping of {}", <$name as Fields>::NAMES.join(", "))
                    }
                    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<$name, A::Error> {
                        let mut out = $name::default();
                        while let Some(key) = map.next_key::<At<Key<$name>>>()? {
                            let extra = |name: &str, repeated| Extra {
                                key: At { value: name.to_owned(), line: key.line, column: key.column },
                                repeated,
                            };
                            match key.value.field {
                                $(Ok(stringify!($field)) => {
                                    if out.$field.is_some() {
                                        out.extra.push(extra(stringify!($field), true));
                                        map.next_value::<IgnoredAny>()?;
                                    } else {
                                        out.$field = map.next_value::<Option<$ty>>()?;
                                    }
                                })*
                                Ok(name) => {
                                    out.extra.push(extra(name, false));
                                    map.next_value::<IgnoredAny>()?;
                                }
                                Err(ref name) => {
                                    out.extra.push(extra(name, false));
                                    map.next_value::<IgnoredAny>()?;
                                }
                            }
                        }
                        Ok(out)
                    }
                }
                deserializer.deserialize_map(Visitor)
            }
        }
    };
}

raw_struct! {
    struct RawPolicy {
        version: At<Scalar>,
        global: RawGlobal,
        defaults: RawDefaults,
        accounts: RawAccounts,
    }
}

raw_struct! {
    struct RawGlobal {
        mode: At<Scalar>,
        malformed: At<Scalar>,
        events_per_second: At<Scalar>,
        block: Vec<RawList>,
        allow: Vec<RawList>,
    }
}

raw_struct! {
    struct RawDefaults {
        mode: At<Scalar>,
        limits: Box<RawLimits>,
    }
}

raw_struct! {
    struct RawList {
        name: At<Scalar>,
        action: At<Scalar>,
        cidrs: Vec<At<Scalar>>,
        file: At<Scalar>,
    }
}

raw_struct! {
    struct RawAccount {
        id: At<Scalar>,
        prefixes: Vec<At<Scalar>>,
        mode: At<Scalar>,
        block: Vec<RawList>,
        allow: Vec<RawList>,
        // Boxed: accounts are moved while they are read and validated, and
        // limits are most of an account's size.
        limits: Box<RawLimits>,
    }
}

raw_struct! {
    struct RawLimits {
        inbound: Box<RawDirLimits>,
        outbound: Box<RawDirLimits>,
    }
}

raw_struct! {
    struct RawDirLimits {
        pps: At<Scalar>,
        pps_burst: At<Scalar>,
        bps: At<Scalar>,
        bps_burst: At<Scalar>,
        action: At<Scalar>,
    }
}

/// The accounts, kept up to the bounds of [`Reading`] and counted past
/// them: a policy far over capacity is refused without being built (a
/// 632,000-account file once took 866 MB to be told it was too big).
#[derive(Debug, Default)]
struct RawAccounts {
    kept: Vec<RawAccount>,
    /// Accounts in the file, kept or not.
    total: usize,
    /// Account prefixes of the kept accounts, both families.
    raw_prefixes: usize,
}

impl<'de> Deserialize<'de> for RawAccounts {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = RawAccounts;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a list of accounts")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<RawAccounts, A::Error> {
                let bounds = READING.get();
                let mut out = RawAccounts {
                    kept: Vec::with_capacity(
                        seq.size_hint()
                            .unwrap_or(0)
                            .min(bounds.max_accounts)
                            .min(1 << 20),
                    ),
                    ..RawAccounts::default()
                };
                loop {
                    if out.kept.len() < bounds.max_accounts
                        && out.raw_prefixes <= bounds.max_raw_prefixes
                    {
                        let Some(account) = seq.next_element::<RawAccount>()? else {
                            break;
                        };
                        out.raw_prefixes += account.prefixes.as_ref().map_or(0, Vec::len);
                        out.kept.push(account);
                    } else if seq.next_element::<IgnoredAny>()?.is_none() {
                        break;
                    }
                    out.total += 1;
                }
                Ok(out)
            }
        }
        deserializer.deserialize_seq(Visitor)
    }
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
// What a new policy takes away

/// How much of a running policy a new one removes: accounts (by id) and list
/// entries (prefixes of a list of the same scope and name). A half-written
/// or mistaken file usually shows as a policy that removes most of what runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Removal {
    pub accounts_before: usize,
    pub accounts_removed: usize,
    pub list_entries_before: usize,
    pub list_entries_removed: usize,
}

impl Removal {
    /// What `new` removes from `running`.
    #[must_use]
    pub fn between(running: &Policy, new: &Policy) -> Self {
        let mut out = Self {
            accounts_before: running.accounts.len(),
            ..Self::default()
        };
        let (before, removed) = list_entries_removed(&running.global.lists, &new.global.lists);
        out.list_entries_before += before;
        out.list_entries_removed += removed;
        let by_id: FastMap<&str, &Account> =
            new.accounts.iter().map(|a| (a.id.as_str(), a)).collect();
        for old in &running.accounts {
            match by_id.get(old.id.as_str()) {
                Some(kept) if kept.fingerprint == old.fingerprint => {
                    out.list_entries_before += old.lists.iter().map(List::len).sum::<usize>();
                }
                Some(kept) => {
                    let (before, removed) = list_entries_removed(&old.lists, &kept.lists);
                    out.list_entries_before += before;
                    out.list_entries_removed += removed;
                }
                None => {
                    let entries: usize = old.lists.iter().map(List::len).sum();
                    out.accounts_removed += 1;
                    out.list_entries_before += entries;
                    out.list_entries_removed += entries;
                }
            }
        }
        out
    }

    /// Whether more than half of the running accounts, or more than half of
    /// the running list entries, go.
    #[must_use]
    pub fn removes_most(&self) -> bool {
        2 * self.accounts_removed > self.accounts_before
            || 2 * self.list_entries_removed > self.list_entries_before
    }
}

impl fmt::Display for Removal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "removes {} of {} accounts and {} of {} list entries",
            self.accounts_removed,
            self.accounts_before,
            self.list_entries_removed,
            self.list_entries_before
        )
    }
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

/// Entries of the lists `old`, and how many of them are not in the list of
/// the same name of `new`.
fn list_entries_removed(old: &[List], new: &[List]) -> (usize, usize) {
    let mut before = 0;
    let mut removed = 0;
    for list in old {
        before += list.len();
        removed += match new.iter().find(|n| n.name == list.name) {
            Some(n) => missing(&list.v4, &n.v4) + missing(&list.v6, &n.v6),
            None => list.len(),
        };
    }
    (before, removed)
}

/// How many items of `old` are not in `new`, both sorted (a merge, linear).
fn missing<T: Ord>(old: &[T], new: &[T]) -> usize {
    let mut new = new.iter().peekable();
    let mut n = 0;
    for item in old {
        while new.next_if(|x| *x < item).is_some() {}
        if new.next_if(|x| *x == item).is_none() {
            n += 1;
        }
    }
    n
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
    #[error("cannot read policy file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: FileError,
    },
    #[error(
        "policy file {path}, or a list file it names, was still changing after {attempts} reads \
         {settle:?} apart; write the new file beside it and rename it into place, so that readers \
         see it whole"
    )]
    StillChanging {
        path: String,
        attempts: u32,
        settle: Duration,
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

    /// Reads and validates a policy file with the default [`ReadLimits`]
    /// (no count bounds, no settling pause). List `file:` paths are relative
    /// to the policy file's directory.
    pub fn from_file(path: &Path) -> Result<Self, PolicyError> {
        Self::from_file_with(path, &ReadLimits::default())
    }

    /// Reads and validates a policy file within `limits`: regular files
    /// only, at most `limits.max_bytes` for the policy and its list files,
    /// read again (up to `limits.attempts` times) until a look at every file
    /// read, `limits.settle` after the read, finds it as it was. Blocks for
    /// the reading and the pauses: call it off the async loop.
    pub fn from_file_with(path: &Path, limits: &ReadLimits) -> Result<Self, PolicyError> {
        Self::from_file_waiting(path, limits, &mut std::thread::sleep)
    }

    /// [`Policy::from_file_with`] with the pause between looks done by
    /// `wait` (tests change the file there instead of waiting).
    fn from_file_waiting(
        path: &Path,
        limits: &ReadLimits,
        wait: &mut dyn FnMut(Duration),
    ) -> Result<Self, PolicyError> {
        let name = path.display().to_string();
        let base = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let attempts = limits.attempts.max(1);
        for _ in 0..attempts {
            let mut reads = Reads::default();
            let result = match read_regular(path, limits.max_bytes) {
                Ok((text, stamp)) => {
                    reads.bytes = text.len() as u64;
                    reads.files.push((path.to_owned(), stamp));
                    Some(Self::parse_reading(&text, &name, base, limits, &mut reads))
                }
                Err(FileError::Changed) => None,
                Err(source) => {
                    return Err(PolicyError::Read {
                        path: escape_control(&name).into_owned(),
                        source,
                    });
                }
            };
            wait(limits.settle);
            if let Some(result) = result
                && reads.unchanged()
            {
                return result;
            }
        }
        Err(PolicyError::StillChanging {
            path: escape_control(&name).into_owned(),
            attempts,
            settle: limits.settle,
        })
    }

    /// Validates policy text; `source_name` names it in messages and
    /// `base_dir` resolves relative list files. Text that starts with `{` is
    /// read as JSON (valid YAML too, but `serde_json` reads it about four
    /// times faster: for large generated policies); anything else as YAML.
    pub fn parse(text: &str, source_name: &str, base_dir: &Path) -> Result<Self, PolicyError> {
        Self::parse_with(text, source_name, base_dir, &ReadLimits::default())
    }

    /// [`Policy::parse`] within `limits` (its list files are read once:
    /// use [`Policy::from_file_with`] for files that may be changing).
    pub fn parse_with(
        text: &str,
        source_name: &str,
        base_dir: &Path,
        limits: &ReadLimits,
    ) -> Result<Self, PolicyError> {
        let mut reads = Reads {
            bytes: text.len() as u64,
            ..Reads::default()
        };
        Self::parse_reading(text, source_name, base_dir, limits, &mut reads)
    }

    fn parse_reading(
        text: &str,
        source_name: &str,
        base_dir: &Path,
        limits: &ReadLimits,
        reads: &mut Reads,
    ) -> Result<Self, PolicyError> {
        let json = text.trim_start().starts_with('{');
        let raw = {
            let _reading = ReadingGuard::set(Reading {
                json,
                max_accounts: limits.max_accounts.map_or(usize::MAX, |n| n as usize),
                max_raw_prefixes: limits
                    .max_account_prefixes
                    .map_or(usize::MAX, |n| 2 * n as usize),
            });
            if text.trim().is_empty() {
                RawPolicy::default()
            } else if json {
                serde_json::from_str::<RawPolicy>(text).map_err(|err| PolicyError::Syntax {
                    source_name: source_name.to_owned(),
                    format: "JSON",
                    message: tidy(&format!("error: {err}")),
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
                serde_saphyr::from_str_with_options::<Option<RawPolicy>>(text, options)
                    .map_err(|err| PolicyError::Syntax {
                        source_name: source_name.to_owned(),
                        format: "YAML",
                        // The rendered snippet calls the text <input>: name the file.
                        message: tidy(&err.to_string().replace("<input>", source_name)),
                    })?
                    .unwrap_or_default()
            }
        };
        let mut v = Validator {
            source: source_name,
            base_dir,
            limits,
            reads,
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

/// A deserializer's message, fit for a log: every line cut short (a line of
/// the file, or a value, can be megabytes long), control characters
/// escaped, at most a screenful.
fn tidy(message: &str) -> String {
    const LINE_CHARS: usize = 200;
    const LINES: usize = 24;
    let mut out = String::new();
    for line in message.lines().take(LINES) {
        if !out.is_empty() {
            out.push('\n');
        }
        match line.char_indices().nth(LINE_CHARS) {
            Some((cut, _)) => {
                out.push_str(&escape_control(&line[..cut]));
                out.push('…');
            }
            None => out.push_str(&escape_control(line)),
        }
    }
    out
}

// ---------------------------------------------------------------------------
// Validation

struct Validator<'a> {
    source: &'a str,
    base_dir: &'a Path,
    limits: &'a ReadLimits,
    reads: &'a mut Reads,
    issues: Vec<Issue>,
}

/// `defaults.limits`, validated once for all the accounts that use them
/// (with the actions as written: each account applies its mode).
type DefaultLimits = (Option<DirLimits>, Option<DirLimits>);

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

    /// Reports the keys of a raw struct at `path` that are not its fields.
    fn extra<F: Fields>(&mut self, extra: &[Extra], path: &str) {
        for e in extra {
            let name = &e.key.value;
            let field = if path.is_empty() {
                short(name)
            } else {
                format!("{path}.{}", short(name))
            };
            let message = if e.repeated {
                format!("field {} is given twice: give it once", quote(name))
            } else {
                let fields = F::NAMES.join(", ");
                match suggest(name, F::NAMES) {
                    Some(near) => format!(
                        "unknown field {}: did you mean `{near}`? (the fields here: {fields})",
                        quote(name)
                    ),
                    None => format!(
                        "unknown field {}: remove it (the fields here: {fields})",
                        quote(name)
                    ),
                }
            };
            let at = self.at(&e.key);
            self.issue(at, field, message);
        }
    }

    /// One of `words`, or a problem at `path()` naming them (the path is
    /// made only then: the field is in every account).
    fn word<T: Copy>(
        &mut self,
        raw: Option<&At<Scalar>>,
        path: impl FnOnce() -> String,
        words: &[(&str, T)],
    ) -> Option<T> {
        let raw = raw?;
        if let Some((_, value)) = words.iter().find(|(w, _)| *w == raw.text()) {
            return Some(*value);
        }
        let expected: Vec<&str> = words.iter().map(|(w, _)| *w).collect();
        let at = self.at(raw);
        self.issue(
            at,
            path(),
            format!(
                "{} is not one of: {}",
                quote(raw.text()),
                expected.join(", ")
            ),
        );
        None
    }

    fn mode(&mut self, raw: Option<&At<Scalar>>, path: impl FnOnce() -> String) -> Option<Mode> {
        self.word(raw, path, Mode::WORDS)
    }

    fn action(
        &mut self,
        raw: Option<&At<Scalar>>,
        path: impl FnOnce() -> String,
    ) -> Option<Action> {
        self.word(raw, path, Action::WORDS)
    }

    fn policy(&mut self, raw: RawPolicy) -> Policy {
        self.extra::<RawPolicy>(raw.extra.as_slice(), "");
        let version = raw.version.and_then(|v| self.version(&v));
        let global = self.global(raw.global.unwrap_or_default());
        let defaults = raw.defaults.unwrap_or_default();
        self.extra::<RawDefaults>(defaults.extra.as_slice(), "defaults");
        let default_mode = self
            .mode(defaults.mode.as_ref(), || "defaults.mode".to_owned())
            .unwrap_or_default();
        let default_limits = defaults
            .limits
            .as_ref()
            .map(|l| self.limits(l, "defaults.limits", Mode::Enforce));
        let raw_accounts = raw.accounts.unwrap_or_default();
        self.account_count(&raw_accounts);
        let n = raw_accounts.kept.len();
        let mut seen_ids: FastMap<String, usize> =
            FastMap::with_capacity_and_hasher(n, FastHash::default());
        // The index in `accounts` of the account owning each prefix.
        let mut owners: FastMap<IpNet, usize> =
            FastMap::with_capacity_and_hasher(2 * n, FastHash::default());
        let mut accounts: Vec<Account> = Vec::with_capacity(n);
        for (i, acc) in raw_accounts.kept.into_iter().enumerate() {
            let path = format!("accounts[{i}]");
            let id_at = acc
                .id
                .as_ref()
                .map_or_else(|| self.source.to_owned(), |id| self.at(id));
            if let Some(id) = &acc.id
                && let Some(first) = seen_ids.insert(id.text().to_owned(), i)
            {
                self.issue(
                    id_at.clone(),
                    format!("{path}.id"),
                    format!(
                        "account id {} is already used by accounts[{first}]; ids must be unique",
                        quote(id.text())
                    ),
                );
            }
            let account = self.account(acc, &path, default_mode, default_limits);
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
                            format!("prefix {net} is also owned by account {}; an address belongs to one account (nested prefixes are allowed, the most specific wins)", quote(other)),
                        );
                    }
                } else {
                    owners.insert(net, accounts.len());
                }
            }
            accounts.push(account);
        }
        self.prefix_count(&accounts, raw_accounts.total > n);
        Policy {
            source: self.source.to_owned(),
            version,
            global,
            accounts,
        }
    }

    fn version(&mut self, raw: &At<Scalar>) -> Option<String> {
        let text = raw.text();
        let problem = if text.chars().count() > MAX_VERSION_LEN {
            format!(
                "{} is longer than {MAX_VERSION_LEN} characters: a version is logged at every reload, keep it short",
                quote(text)
            )
        } else if text.chars().any(char::is_control) {
            format!(
                "{} contains control characters: a version is logged, use printable text",
                quote(text)
            )
        } else {
            return Some(text.to_owned());
        };
        let at = self.at(raw);
        self.issue(at, "version", problem);
        None
    }

    /// Refuses more accounts than `--max-accounts` (those past it were
    /// only counted).
    fn account_count(&mut self, raw: &RawAccounts) {
        if let Some(max) = self.limits.max_accounts
            && raw.total > max as usize
        {
            let kept = raw.kept.len();
            let total = raw.total;
            self.issue(
                self.source.to_owned(),
                "accounts",
                format!(
                    "{total} accounts, more than --max-accounts {max} holds: raise --max-accounts to {total} or more (only the first {kept} were checked)"
                ),
            );
        }
    }

    /// Refuses more account prefixes of a family than
    /// `--max-account-prefixes`; `cut`: accounts were left unread.
    fn prefix_count(&mut self, accounts: &[Account], cut: bool) {
        let Some(max) = self.limits.max_account_prefixes else {
            return;
        };
        let v4: usize = accounts.iter().map(|a| a.prefixes_v4.len()).sum();
        let v6: usize = accounts.iter().map(|a| a.prefixes_v6.len()).sum();
        for (n, family) in [(v4, "IPv4"), (v6, "IPv6")] {
            if n <= max as usize {
                continue;
            }
            let message = if cut {
                format!(
                    "more {family} account prefixes than --max-account-prefixes {max} holds ({n} in the first {} accounts; the others were not checked): raise --max-account-prefixes",
                    accounts.len()
                )
            } else {
                format!(
                    "{n} {family} account prefixes, more than --max-account-prefixes {max} holds: raise --max-account-prefixes to {n} or more"
                )
            };
            self.issue(self.source.to_owned(), "accounts[].prefixes", message);
        }
    }

    fn global(&mut self, raw: RawGlobal) -> Global {
        self.extra::<RawGlobal>(raw.extra.as_slice(), "global");
        let mode = self
            .mode(raw.mode.as_ref(), || "global.mode".to_owned())
            .unwrap_or_default();
        let malformed = self
            .action(raw.malformed.as_ref(), || "global.malformed".to_owned())
            .unwrap_or(Action::Drop);
        let events_per_second = match raw.events_per_second {
            Some(eps) => {
                let at = self.at(&eps);
                self.integer(
                    eps.text(),
                    at,
                    "global.events_per_second",
                    0,
                    MAX_EVENTS_PER_SECOND,
                )
                .map_or(DEFAULT_EVENTS_PER_SECOND, |n| n as u32)
            }
            None => DEFAULT_EVENTS_PER_SECOND,
        };
        let lists = self.lists(
            raw.block.unwrap_or_default(),
            raw.allow.unwrap_or_default(),
            "global",
            mode,
        );
        Global {
            mode,
            malformed,
            events_per_second,
            lists,
        }
    }

    fn account(
        &mut self,
        raw: RawAccount,
        path: &str,
        default_mode: Mode,
        default_limits: Option<DefaultLimits>,
    ) -> Account {
        self.extra::<RawAccount>(raw.extra.as_slice(), path);
        let (id, id_at) = if let Some(id) = &raw.id {
            let at = self.at(id);
            if let Err(msg) = check_name(id.text()) {
                self.issue(
                    at.clone(),
                    format!("{path}.id"),
                    format!("account id {} {msg}", quote(id.text())),
                );
            }
            (id.text().to_owned(), at)
        } else {
            self.issue(
                self.source.to_owned(),
                format!("{path}.id"),
                "the account has no id: give it one (letters, digits and - _ . : / @)",
            );
            (String::new(), self.source.to_owned())
        };
        let raw_prefixes = raw.prefixes.unwrap_or_default();
        if raw_prefixes.is_empty() {
            self.issue(id_at.clone(), format!("{path}.prefixes"), format!("account {} has no prefixes: list the addresses it owns on this host (e.g. 10.1.2.3/32)", quote(&id)));
        }
        let mut prefixes_v4 = Vec::new();
        let mut prefixes_v6 = Vec::new();
        let mut seen = HashSet::new();
        for (j, p) in raw_prefixes.iter().enumerate() {
            let at = self.at(p);
            match parse_cidr(p.text()) {
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
        let mode = self
            .mode(raw.mode.as_ref(), || format!("{path}.mode"))
            .unwrap_or(default_mode);
        let lists = self.lists(
            raw.block.unwrap_or_default(),
            raw.allow.unwrap_or_default(),
            path,
            mode,
        );
        let (inbound, outbound) = if let Some(l) = &raw.limits {
            self.limits(l, &format!("{path}.limits"), mode)
        } else {
            let in_mode = |d: DirLimits| DirLimits {
                action: mode.apply(d.action),
                ..d
            };
            default_limits.map_or((None, None), |(i, o)| (i.map(in_mode), o.map(in_mode)))
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

    fn limits(&mut self, raw: &RawLimits, path: &str, mode: Mode) -> DefaultLimits {
        self.extra::<RawLimits>(raw.extra.as_slice(), path);
        (
            raw.inbound
                .as_ref()
                .and_then(|d| self.dir_limits(d, &format!("{path}.inbound"), mode)),
            raw.outbound
                .as_ref()
                .and_then(|d| self.dir_limits(d, &format!("{path}.outbound"), mode)),
        )
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
                self.extra::<RawList>(raw.extra.as_slice(), &path);
                let name = match &raw.name {
                    Some(n) => {
                        if let Err(msg) = check_name(n.text()) {
                            let at = self.at(n);
                            self.issue(
                                at,
                                format!("{path}.name"),
                                format!("list name {} {msg}", quote(n.text())),
                            );
                        }
                        n.text().to_owned()
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
                        format!("list name {} is used twice in {scope}", quote(&name)),
                    );
                }
                let kind = if field == "block" {
                    let action = self
                        .action(raw.action.as_ref(), || format!("{path}.action"))
                        .unwrap_or(Action::Drop);
                    ListKind::Block(mode.apply(action))
                } else {
                    if let Some(a) = &raw.action {
                        let at = self.at(a);
                        self.issue(at, format!("{path}.action"), "allow lists take no action: they exempt addresses from the block lists of the same scope");
                    }
                    ListKind::Allow
                };
                let cidrs = raw.cidrs.unwrap_or_default();
                if cidrs.is_empty() && raw.file.is_none() {
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
                for (j, c) in cidrs.iter().enumerate() {
                    match parse_cidr(c.text()) {
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
        file: &At<Scalar>,
        path: &str,
        v4: &mut Vec<Ipv4Net>,
        v6: &mut Vec<Ipv6Net>,
    ) {
        let at = self.at(file);
        if !self.limits.list_files {
            self.issue(
                at,
                path,
                "this policy cannot name local files (a policy from a control plane must not make the agent read them): give the prefixes in `cidrs`",
            );
            return;
        }
        if file.text().len() > MAX_PATH_LEN {
            self.issue(
                at,
                path,
                format!(
                    "the path {} is longer than {MAX_PATH_LEN} bytes",
                    quote(file.text())
                ),
            );
            return;
        }
        let full: PathBuf = self.base_dir.join(file.text());
        let shown = escape_control(&full.display().to_string()).into_owned();
        let left = self.limits.max_bytes.saturating_sub(self.reads.bytes);
        let text = match read_regular(&full, left) {
            Ok((text, stamp)) => {
                self.reads.bytes += text.len() as u64;
                self.reads.files.push((full.clone(), stamp));
                text
            }
            Err(err) => {
                let err = match err {
                    FileError::TooLarge { .. } => FileError::TooLarge {
                        left,
                        limit: self.limits.max_bytes,
                    },
                    FileError::Changed => {
                        self.reads.changed = true;
                        FileError::Changed
                    }
                    other => other,
                };
                self.issue(at, path, format!("cannot read list file {shown}: {err}"));
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
                        // A line is quoted only if it could be a mistyped
                        // address: a `file:` naming a secret must not print it.
                        let msg = if address_shaped(entry) {
                            msg
                        } else {
                            "not an IP address or CIDR prefix (expected e.g. 10.0.0.0/8 or 2001:db8::/32; the line is not quoted: it does not look like an address)".to_owned()
                        };
                        self.issue(format!("{shown}:{}", n + 1), path, msg);
                    }
                }
            }
        }
        if bad > 10 {
            self.issue(
                shown,
                path,
                format!("{} more bad lines not shown", bad - 10),
            );
        }
    }

    fn dir_limits(&mut self, raw: &RawDirLimits, path: &str, mode: Mode) -> Option<DirLimits> {
        self.extra::<RawDirLimits>(raw.extra.as_slice(), path);
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
        let action = self
            .action(raw.action.as_ref(), || format!("{path}.action"))
            .unwrap_or(Action::Drop);
        if pps.is_none() && bps.is_none() {
            return None;
        }
        Some(DirLimits {
            pps,
            bps,
            action: mode.apply(action),
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
        match parse_quantity(raw.text()) {
            Ok(n) if (min..=max).contains(&n) => Some(n),
            Ok(n) => {
                self.issue(
                    at,
                    path,
                    format!(
                        "{} = {n} is out of range: it must be between {min} and {max}",
                        quote(raw.text())
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
                    format!(
                        "{} is not a whole number between {min} and {max}",
                        quote(text)
                    ),
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
/// probably meant. An IPv4-mapped IPv6 prefix (`::ffff:10.0.0.0/104`) is
/// refused with the IPv4 prefix it probably meant: the datapath sees IPv4
/// packets with IPv4 addresses, so it would match nothing.
pub fn parse_cidr(text: &str) -> Result<IpNet, String> {
    let text = text.trim();
    let net = if text.contains('/') {
        text.parse::<IpNet>().map_err(|_| {
            format!(
                "{} is not a CIDR prefix (expected e.g. 10.0.0.0/8 or 2001:db8::/32)",
                quote(text)
            )
        })?
    } else {
        let addr: IpAddr = text.parse().map_err(|_| {
            format!(
                "{} is not an IP address or CIDR prefix (expected e.g. 10.0.0.0/8 or 2001:db8::/32)",
                quote(text)
            )
        })?;
        IpNet::from(addr)
    };
    if let IpNet::V6(v6) = net
        && v6.prefix_len() >= 96
        && let Some(v4) = v6.addr().to_ipv4_mapped()
        && let Ok(meant) = Ipv4Net::new(v4, v6.prefix_len() - 96)
    {
        return Err(format!(
            "{} is an IPv4-mapped IPv6 prefix, which matches no packet (IPv4 packets carry IPv4 addresses); did you mean {}?",
            quote(text),
            meant.trunc()
        ));
    }
    if net.trunc() != net {
        return Err(format!(
            "{} has host bits set; did you mean {}?",
            quote(text),
            net.trunc()
        ));
    }
    Ok(net)
}

/// Whether a list file's line could be a mistyped address (only the
/// characters of addresses, short, with a `.` or `:`), and may be quoted.
fn address_shaped(entry: &str) -> bool {
    entry.len() <= 49
        && entry.contains(['.', ':'])
        && entry
            .chars()
            .all(|c| c.is_ascii_hexdigit() || matches!(c, '.' | ':' | '/'))
}

/// Parses a rate or size: a whole or decimal number with an optional SI
/// suffix k, M, G or T (powers of 1000), e.g. `100000`, `10k`, `1.5G`.
pub fn parse_quantity(text: &str) -> Result<u64, String> {
    let bad = || {
        format!(
            "{} is not a quantity: expected a number with an optional k, M, G or T suffix (e.g. 10k, 1.5G)",
            quote(text)
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
    let too_large = || {
        format!(
            "{} is too large: the largest quantity is {}",
            quote(text),
            u64::MAX
        )
    };
    let (whole, frac) = digits.split_once('.').unwrap_or((digits, ""));
    let whole: u64 = if whole.is_empty() {
        0
    } else {
        whole.parse().map_err(|_| too_large())?
    };
    let mut value = whole.checked_mul(scale).ok_or_else(too_large)?;
    // Decimal fractions exactly, digit by digit: 1.5G is 1_500_000_000.
    let mut unit = scale;
    for c in frac.chars() {
        unit /= 10;
        if unit == 0 {
            return Err(format!(
                "{} has more decimals than its unit allows",
                quote(text)
            ));
        }
        value = value
            .checked_add(u64::from(c.to_digit(10).ok_or_else(bad)?) * unit)
            .ok_or_else(too_large)?;
    }
    Ok(value)
}

/// `text` quoted for a message: escaped like a Rust string literal (control
/// characters included), and cut after [`QUOTE_CHARS`] characters with its
/// length noted, so that a megabyte-long value costs a message one line.
#[must_use]
pub fn quote(text: &str) -> String {
    match text.char_indices().nth(QUOTE_CHARS) {
        None => format!("{text:?}"),
        Some((cut, _)) => format!("{:?}… ({} characters)", &text[..cut], text.chars().count()),
    }
}

/// `text` cut short and escaped like [`quote`], without the quotes: for a
/// key in a field path.
fn short(text: &str) -> String {
    let q = quote(text);
    match q.strip_prefix('"').and_then(|r| r.strip_suffix('"')) {
        Some(inner) => inner.to_owned(),
        None => q,
    }
}

/// `text` with its control characters escaped (`\n`, `\u{1b}`), for text
/// logs: a value cannot start a forged log line or drive a terminal.
#[must_use]
pub fn escape_control(text: &str) -> Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// The field of `names` that `name` is probably a misspelling of: at most
/// two edits away (one for short names).
fn suggest(name: &str, names: &[&'static str]) -> Option<&'static str> {
    if name.len() > 64 {
        return None;
    }
    names
        .iter()
        .map(|n| (edit_distance(name, n), *n))
        .filter(|(d, n)| *d <= if n.len() <= 4 { 1 } else { 2 })
        .min_by_key(|(d, _)| *d)
        .map(|(_, n)| n)
}

/// Levenshtein distance of two short strings, by bytes.
fn edit_distance(a: &str, b: &str) -> usize {
    let b = b.as_bytes();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.bytes().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (diagonal + usize::from(ca != *cb))
                .min(above + 1)
                .min(row[j] + 1);
            diagonal = above;
        }
    }
    row[b.len()]
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
        // Unknown fields are problems beside the others, named by path.
        let err = Policy::parse(
            r#"{"accounts": [{"id": "a", "colour": 1, "prefixes": ["10.0.0.1"],
                              "limits": {"inbound": {"pps": "50kk"}}}]}"#,
            "p.json",
            Path::new("."),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("(2 problems)")
                && err.contains("p.json: accounts[0].colour: unknown field \"colour\"")
                && err
                    .contains("p.json: accounts[0].limits.inbound.pps: \"50kk\" is not a quantity"),
            "{err}"
        );
        // A field given twice (JSON passes both to the reader).
        let err = Policy::parse(
            r#"{"version": "a", "version": "b"}"#,
            "p.json",
            Path::new("."),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("p.json: version: field \"version\" is given twice"),
            "{err}"
        );
    }

    #[test]
    fn scalars_are_read_as_written() {
        // `1.10` is not the number 1.1, and an overflowing number is quoted
        // as written, not rounded through f64: in YAML and in JSON alike.
        let p = Policy::parse("version: 1.10\n", "t", Path::new(".")).unwrap();
        assert_eq!(p.version.as_deref(), Some("1.10"));
        let p = Policy::parse(r#"{"version": 1.10}"#, "t", Path::new(".")).unwrap();
        assert_eq!(p.version.as_deref(), Some("1.10"));
        let p = Policy::parse(r#"{"version": "a\"b"}"#, "t", Path::new(".")).unwrap();
        assert_eq!(p.version.as_deref(), Some("a\"b"));
        for text in [
            "accounts: [{id: a, prefixes: [10.0.0.1], limits: {inbound: {pps: 99999999999999999999999}}}]",
            r#"{"accounts": [{"id": "a", "prefixes": ["10.0.0.1"], "limits": {"inbound": {"pps": 99999999999999999999999}}}]}"#,
        ] {
            let err = Policy::parse(text, "t", Path::new("."))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("\"99999999999999999999999\" is too large"),
                "{err}"
            );
        }
    }

    /// A file of its own under the system's temporary directory.
    fn scratch(name: &str, text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("mmesh-unit-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("p.yaml");
        std::fs::write(&path, text).unwrap();
        path
    }

    const WHOLE: &str = "version: r1\nglobal:\n  events_per_second: 5\n  block: [{name: blk9, cidrs: [10.251.9.0/24]}]\n";

    #[test]
    fn a_half_written_file_is_read_again_until_it_is_whole() {
        // A writer has put down the first 40 bytes (valid YAML of an empty
        // policy) when the reader comes; it finishes during the pause
        // between the reader's two looks.
        let path = scratch("half", &WHOLE[..40]);
        assert!(Policy::parse(&WHOLE[..40], "t", Path::new(".")).is_ok());
        let limits = ReadLimits {
            settle: Duration::from_millis(100),
            ..ReadLimits::default()
        };
        let mut pauses = Vec::new();
        let policy = Policy::from_file_waiting(&path, &limits, &mut |d| {
            pauses.push(d);
            if pauses.len() == 1 {
                std::fs::write(&path, WHOLE).unwrap();
            }
        })
        .expect("the whole file is read");
        assert_eq!(
            policy.global.lists.len(),
            1,
            "the whole policy, not the half"
        );
        assert_eq!(pauses, [Duration::from_millis(100); 2]);
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[test]
    fn a_file_that_keeps_changing_is_refused() {
        let path = scratch("changing", WHOLE);
        let limits = ReadLimits {
            attempts: 3,
            ..ReadLimits::default()
        };
        let mut n = 0;
        let err = Policy::from_file_waiting(&path, &limits, &mut |_| {
            n += 1;
            std::fs::write(&path, format!("{WHOLE}# {}\n", "x".repeat(n))).unwrap();
        })
        .unwrap_err()
        .to_string();
        assert_eq!(n, 3);
        assert!(
            err.contains("was still changing after 3 reads")
                && err.contains("rename it into place"),
            "{err}"
        );
        // A list file that changes counts as much as the policy file.
        let dir = path.parent().unwrap();
        std::fs::write(dir.join("list.txt"), "10.0.0.0/8\n").unwrap();
        std::fs::write(&path, "global:\n  block: [{name: l, file: list.txt}]\n").unwrap();
        let mut n = 0;
        let err = Policy::from_file_waiting(&path, &limits, &mut |_| {
            n += 1;
            std::fs::write(dir.join("list.txt"), "10.0.0.0/8\n".repeat(n + 1)).unwrap();
        })
        .unwrap_err();
        assert!(
            matches!(err, PolicyError::StillChanging { attempts: 3, .. }),
            "{err}"
        );
        // Once it stops, it is read.
        let p = Policy::from_file_waiting(&path, &limits, &mut |_| {}).unwrap();
        assert_eq!(p.global.lists[0].v4.len(), 1);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn removal_counts_what_a_new_policy_takes_away() {
        let old = Policy::parse(
            "global:\n  block: [{name: g, cidrs: [10.0.0.0/8, 192.0.2.0/24, '2001:db8::/32']}]\n\
             accounts:\n\
             - {id: a, prefixes: [10.1.0.1], block: [{name: x, cidrs: [198.51.100.0/24]}]}\n\
             - {id: b, prefixes: [10.1.0.2]}\n\
             - {id: c, prefixes: [10.1.0.3], block: [{name: y, cidrs: [203.0.113.0/24, 203.0.114.0/24]}]}\n",
            "old",
            Path::new("."),
        )
        .unwrap();
        let same = Removal::between(&old, &old);
        assert_eq!(
            same,
            Removal {
                accounts_before: 3,
                accounts_removed: 0,
                list_entries_before: 6,
                list_entries_removed: 0
            }
        );
        assert!(!same.removes_most());
        // c leaves with its two entries; g loses one; a keeps its list.
        let new = Policy::parse(
            "global:\n  block: [{name: g, cidrs: [10.0.0.0/8, '2001:db8::/32', 172.16.0.0/12]}]\n\
             accounts:\n\
             - {id: a, prefixes: [10.1.0.9], block: [{name: x, cidrs: [198.51.100.0/24]}]}\n\
             - {id: b, prefixes: [10.1.0.2]}\n",
            "new",
            Path::new("."),
        )
        .unwrap();
        let r = Removal::between(&old, &new);
        assert_eq!((r.accounts_removed, r.list_entries_removed), (1, 3));
        assert!(!r.removes_most());
        assert_eq!(
            r.to_string(),
            "removes 1 of 3 accounts and 3 of 6 list entries"
        );
        // The half-written file of the issue: an empty policy removes all.
        let empty = Policy::parse(
            "version: r1\nglobal:\n  events_per_second:",
            "e",
            Path::new("."),
        )
        .unwrap();
        let r = Removal::between(&old, &empty);
        assert!(r.removes_most(), "{r}");
        assert_eq!(
            r.to_string(),
            "removes 3 of 3 accounts and 6 of 6 list entries"
        );
    }

    #[test]
    fn quotes_are_short_and_escaped() {
        assert_eq!(quote("10k"), "\"10k\"");
        let long = "x".repeat(10_000);
        let q = quote(&long);
        assert!(q.len() < 70 && q.ends_with("… (10000 characters)"), "{q}");
        assert_eq!(quote("a\nb\u{1b}[2J"), "\"a\\nb\\u{1b}[2J\"");
        assert_eq!(escape_control("plain"), "plain");
        assert_eq!(escape_control("r1\nINFO forged"), "r1\\nINFO forged");
        // A deserializer's message about a megabyte-long line stays short.
        let text = format!("{{\"accounts\": \"{}\"}}", "y".repeat(1 << 20));
        let err = Policy::parse(&text, "t.json", Path::new("."))
            .unwrap_err()
            .to_string();
        assert!(err.len() < 400, "{} bytes: {}", err.len(), &err[..400]);
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
