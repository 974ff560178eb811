//! The admin socket: a local API of the running agent on a unix socket,
//! root only, for `mmesh-agent status`, `events`, `top`, `maps` and
//! `policy show --running`.
//!
//! The protocol is JSON lines: the client sends one [`Request`] line; the
//! agent answers with [`Reply`] lines (one for a snapshot; a stream of
//! events and loss notices for `events`) and closes the connection.
//! Everything is read through the read-only handles the metrics collector
//! reads ([`crate::metrics::Health`]): the datapath's lock is only tried,
//! never waited for, and nothing a client does reaches the enforcer.

pub mod client;
pub mod recent;
pub mod server;
pub mod view;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use self::view::{MapView, StatusView, TopRow, TopView};

/// Where the agent listens by default: in a runtime directory of its own
/// (mode 0700), the socket itself mode 0600.
pub const DEFAULT_SOCKET: &str = "/run/mmesh/admin.sock";

/// Connections served at once; more are refused with an error line.
pub const MAX_CLIENTS: usize = 32;

/// What to rank `top` by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum TopBy {
    /// Dropped packets per account, from the per-account counters.
    Account,
    /// Drop events per remote address, from the recent events.
    Remote,
}

/// One request, the first and only line a client sends.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Status,
    Maps,
    /// The effective policy in force, rendered as `policy show` renders a
    /// file's: YAML, or JSON with `json`.
    Policy {
        #[serde(default)]
        json: bool,
    },
    Top {
        by: TopBy,
        /// `remote`: events of the last `window_ms` only (`None`: every
        /// recent event).
        #[serde(default)]
        window_ms: Option<u64>,
        /// Rows at most.
        limit: usize,
    },
    Events {
        /// Keep streaming new events after the recent ones.
        #[serde(default)]
        follow: bool,
        #[serde(default)]
        account: Option<String>,
        #[serde(default)]
        reason: Option<String>,
        /// Recent events of the last `since_ms` first (`None`: with
        /// `follow`, none; without, every recent event).
        #[serde(default)]
        since_ms: Option<u64>,
    },
}

/// One line of an answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    Status(Box<StatusView>),
    Maps(Vec<MapView>),
    /// The rendered policy.
    Policy(String),
    Top(TopView),
    /// One event, as the agent writes it on stdout.
    Event(serde_json::Value),
    /// Events this client lost so far because it read too slowly (its
    /// queue in the agent was full).
    Lost(u64),
    /// The end of a stream that does not follow; what this client lost.
    End {
        lost: u64,
    },
    Error(String),
}

/// Why the admin socket could not be set up, or a client could not talk
/// to the agent.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(
        "another mmesh-agent answers on the admin socket {}: stop it first, or give this one another path with --admin-socket (or --no-admin-socket)", path.display()
    )]
    InUse { path: PathBuf },
    #[error(
        "{} exists and is not a socket: remove it, or give --admin-socket another path", path.display()
    )]
    NotASocket { path: PathBuf },
    #[error("admin socket {}: {what}: {source}", path.display())]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "no mmesh-agent answers on {}: {reason}; start one with `mmesh-agent run`, or point at its socket with --admin-socket PATH", path.display()
    )]
    NoAgent { path: PathBuf, reason: String },
    #[error(
        "permission denied on the admin socket {}: it answers root only; run this command as root (e.g. with sudo)", path.display()
    )]
    Denied { path: PathBuf },
    #[error("the agent on {} answered: {message}", path.display())]
    Refused { path: PathBuf, message: String },
    #[error("the agent on {} sent something this command does not understand: {detail}", path.display())]
    Protocol { path: PathBuf, detail: String },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_lines_parse_and_print() {
        for (line, request) in [
            (r#"{"cmd":"status"}"#, Request::Status),
            (r#"{"cmd":"policy"}"#, Request::Policy { json: false }),
            (
                r#"{"cmd":"top","by":"remote","window_ms":2000,"limit":5}"#,
                Request::Top {
                    by: TopBy::Remote,
                    window_ms: Some(2000),
                    limit: 5,
                },
            ),
            (
                r#"{"cmd":"events","follow":true,"reason":"global_block"}"#,
                Request::Events {
                    follow: true,
                    account: None,
                    reason: Some("global_block".into()),
                    since_ms: None,
                },
            ),
        ] {
            assert_eq!(serde_json::from_str::<Request>(line).unwrap(), request);
        }
        assert_eq!(
            serde_json::to_string(&Reply::Lost(7)).unwrap(),
            r#"{"lost":7}"#
        );
        assert_eq!(
            serde_json::to_string(&Reply::End { lost: 0 }).unwrap(),
            r#"{"end":{"lost":0}}"#
        );
        assert_eq!(
            serde_json::to_string(&Reply::Error("busy".into())).unwrap(),
            r#"{"error":"busy"}"#
        );
    }
}
