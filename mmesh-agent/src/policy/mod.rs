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
//!
//! The modules follow those steps: `read` (files within limits), `raw` (the
//! schema as written), `validate` (with `values`: names, CIDRs, quantities
//! and quoting), `model` (the validated policy), and `removal` (what a new
//! policy takes away from a running one).

use std::{collections::HashMap, fmt, path::Path, time::Duration};

mod dir;
mod index;
mod message;
mod model;
mod raw;
mod read;
mod removal;
mod share;
#[cfg(test)]
mod tests;
mod validate;
mod values;

pub use dir::{Source, is_policy_file};
pub use index::{Ids, Owners};
pub use model::{
    Account, Action, DirLimits, Fingerprint, Global, List, ListKind, Mode, Policy, Rate,
};
use raw::{RawPolicy, Reading, ReadingGuard};
pub use read::{FileError, ReadLimits};
use read::{Reads, read_regular};
pub use removal::Removal;
pub use share::reading_beside;
use validate::Validator;
pub use validate::{Index, default_burst};
pub use values::{parse_cidr, parse_quantity, quote};

use crate::sink::escape_controls;

/// The validator's sets grow to hundreds of thousands of entries: hashed
/// with foldhash, not `SipHash` (the policy is the operator's own).
pub type FastHash = foldhash::fast::RandomState;
pub type FastMap<K, V> = HashMap<K, V, FastHash>;

/// The policy the agent runs when no file is given.
pub const DEFAULT_POLICY: &str = include_str!("../default-policy.yaml");
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
    /// The map without room for what the policy needs, as
    /// `mmesh_map_capacity` names it, when that is the problem.
    pub full: Option<&'static str>,
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
    #[error("cannot list policy directory {path}: {source}; check the path and its permissions")]
    Dir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "policy directory {path} holds no policy file (*.yaml, *.yml, *.json): the running policy \
         stays; put the policy files in it (an empty policy is a file that says so)"
    )]
    NoFiles { path: String },
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

impl PolicyError {
    /// The map the policy did not fit, if that is why it was rejected (for
    /// `mmesh_map_inserts_refused_total`).
    #[must_use]
    pub fn full_map(&self) -> Option<&'static str> {
        match self {
            Self::Invalid { issues, .. } => issues.iter().find_map(|i| i.full),
            _ => None,
        }
    }
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
        Self::read_settled(path, limits, 0, wait).map(|read| read.policy)
    }

    /// Reads, validates and settles one policy file, `used` bytes of
    /// `limits.max_bytes` being taken already (by the other files of a
    /// `--policy-dir`).
    fn read_settled(
        path: &Path,
        limits: &ReadLimits,
        used: u64,
        wait: &mut dyn FnMut(Duration),
    ) -> Result<FileRead, PolicyError> {
        let name = path.display().to_string();
        let base = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let attempts = limits.attempts.max(1);
        let left = limits.max_bytes.saturating_sub(used);
        for _ in 0..attempts {
            let mut reads = Reads {
                bytes: used,
                ..Reads::default()
            };
            let result = match read_regular(path, left) {
                Ok((text, stamp)) => {
                    reads.bytes += text.len() as u64;
                    reads.files.push((path.to_owned(), stamp));
                    // The text is dropped once read into the raw schema,
                    // before validation builds the policy beside it.
                    Some(Self::deserialize(&text, &name, limits).and_then(|raw| {
                        drop(text);
                        Self::validate_raw(raw, &name, base, limits, &mut reads)
                    }))
                }
                Err(FileError::Changed) => None,
                Err(source) => {
                    let source = match source {
                        FileError::TooLarge { .. } => FileError::TooLarge {
                            left,
                            limit: limits.max_bytes,
                        },
                        other => other,
                    };
                    return Err(PolicyError::Read {
                        path: escape_controls(&name).into_owned(),
                        source,
                    });
                }
            };
            wait(limits.settle);
            if let Some(result) = result
                && reads.unchanged()
            {
                return result.map(|(policy, settings)| FileRead {
                    policy,
                    settings,
                    bytes: reads.bytes - used,
                });
            }
        }
        Err(PolicyError::StillChanging {
            path: escape_controls(&name).into_owned(),
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
        Self::parse_reading(text, source_name, base_dir, limits, &mut reads).map(|(p, _)| p)
    }

    fn parse_reading(
        text: &str,
        source_name: &str,
        base_dir: &Path,
        limits: &ReadLimits,
        reads: &mut Reads,
    ) -> Result<(Self, Settings), PolicyError> {
        let raw = Self::deserialize(text, source_name, limits)?;
        Self::validate_raw(raw, source_name, base_dir, limits, reads)
    }

    /// Reads policy text into the raw schema (JSON if it starts with `{`).
    fn deserialize(
        text: &str,
        source_name: &str,
        limits: &ReadLimits,
    ) -> Result<RawPolicy, PolicyError> {
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
        Ok(raw)
    }

    /// Validates what [`Policy::deserialize`] read.
    fn validate_raw(
        raw: RawPolicy,
        source_name: &str,
        base_dir: &Path,
        limits: &ReadLimits,
        reads: &mut Reads,
    ) -> Result<(Self, Settings), PolicyError> {
        let settings = Settings::of(&raw);
        let mut v = Validator {
            source: source_name,
            base_dir,
            limits,
            reads,
            issues: Vec::new(),
        };
        let policy = v.policy(raw);
        if v.issues.is_empty() {
            Ok((policy, settings))
        } else {
            Err(PolicyError::Invalid {
                source_name: source_name.to_owned(),
                issues: v.issues,
            })
        }
    }
}

/// One policy file as read: the policy, what it set, and the bytes it took
/// (with its list files).
struct FileRead {
    policy: Policy,
    settings: Settings,
    bytes: u64,
}

/// Which of the settings a `--policy-dir` merges a file gave itself (the
/// validated policy cannot tell a default from a value written out).
#[derive(Clone, Copy, Debug, Default)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "one independent yes/no per field of the schema, not a state"
)]
struct Settings {
    mode: bool,
    malformed: bool,
    events_per_second: bool,
    defaults: bool,
}

impl Settings {
    fn of(raw: &RawPolicy) -> Self {
        let global = raw.global.as_ref();
        Self {
            mode: global.is_some_and(|g| g.mode.is_some()),
            malformed: global.is_some_and(|g| g.malformed.is_some()),
            events_per_second: global.is_some_and(|g| g.events_per_second.is_some()),
            defaults: raw.defaults.is_some(),
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
                out.push_str(&escape_controls(&line[..cut]));
                out.push('…');
            }
            None => out.push_str(&escape_controls(line)),
        }
    }
    out
}
