//! The command side of the admin socket: `mmesh-agent status`, `events`,
//! `top`, `maps` and `policy show --running`, and their text rendering.

use std::{
    fmt::Write as _,
    io::{BufRead as _, BufReader, ErrorKind, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
};

use super::{AdminError, MapView, Reply, Request, StatusView, TopView};
use crate::sink::escape_controls;

/// A connection that sent its request; its answer is read line by line.
pub struct Answer {
    path: PathBuf,
    lines: std::io::Lines<BufReader<UnixStream>>,
    /// A reply read already.
    pending: Option<Reply>,
    /// The line of the last reply.
    line: String,
}

/// Connects to the agent at `path` and sends `request`.
pub fn send(path: &Path, request: &Request) -> Result<Answer, AdminError> {
    let mut stream = UnixStream::connect(path).map_err(|e| match e.kind() {
        ErrorKind::NotFound => AdminError::NoAgent {
            path: path.into(),
            reason: "there is no socket there".into(),
        },
        ErrorKind::ConnectionRefused => AdminError::NoAgent {
            path: path.into(),
            reason: "the socket is there but nothing listens on it (left by an agent that is gone)"
                .into(),
        },
        ErrorKind::PermissionDenied => AdminError::Denied { path: path.into() },
        _ => AdminError::Io {
            path: path.into(),
            what: "connecting",
            source: e,
        },
    })?;
    let mut text = serde_json::to_string(request).map_err(|e| AdminError::Protocol {
        path: path.into(),
        detail: e.to_string(),
    })?;
    text.push('\n');
    // An agent that refuses this client answers and closes without reading
    // the request: its answer is still there to read.
    let sent = stream.write_all(text.as_bytes());
    let mut answer = Answer {
        path: path.into(),
        lines: BufReader::new(stream).lines(),
        pending: None,
        line: String::new(),
    };
    if let Err(source) = sent {
        match answer.next_reply() {
            Ok(Some(reply)) => answer.pending = Some(reply),
            Err(err) => return Err(err),
            Ok(None) => {
                return Err(AdminError::Io {
                    path: path.into(),
                    what: "sending the request",
                    source,
                });
            }
        }
    }
    Ok(answer)
}

impl Answer {
    /// The next reply; `None` at the end. An error reply is an error.
    pub fn next_reply(&mut self) -> Result<Option<Reply>, AdminError> {
        if let Some(reply) = self.pending.take() {
            return Ok(Some(reply));
        }
        let Some(line) = self.lines.next() else {
            return Ok(None);
        };
        let line = line.map_err(|source| AdminError::Io {
            path: self.path.clone(),
            what: "reading the answer",
            source,
        })?;
        self.line.clone_from(&line);
        match serde_json::from_str::<Reply>(&line) {
            Ok(Reply::Error(message)) if message.starts_with("permission denied") => {
                Err(AdminError::Denied {
                    path: self.path.clone(),
                })
            }
            Ok(Reply::Error(message)) => Err(AdminError::Refused {
                path: self.path.clone(),
                message,
            }),
            Ok(reply) => Ok(Some(reply)),
            Err(e) => Err(self.protocol(format!("{e}: {line}"))),
        }
    }

    /// The event of the last [`Reply::Event`] as the agent wrote it (its
    /// fields in the order of the agent's stdout).
    #[must_use]
    pub fn raw_event(&self) -> Option<&str> {
        self.line.strip_prefix("{\"event\":")?.strip_suffix('}')
    }

    /// The one reply a snapshot request gets.
    pub fn reply(mut self) -> Result<Reply, AdminError> {
        self.next_reply()?
            .ok_or_else(|| self.protocol("the connection closed without an answer".into()))
    }

    #[must_use]
    pub fn protocol(&self, detail: String) -> AdminError {
        AdminError::Protocol {
            path: self.path.clone(),
            detail,
        }
    }
}

/// Sends `request` and returns its one reply.
pub fn ask(path: &Path, request: &Request) -> Result<Reply, AdminError> {
    send(path, request)?.reply()
}

fn duration(seconds: f64) -> String {
    let s = seconds as u64;
    match s {
        0..60 => format!("{seconds:.0}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86_400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86_400, s % 86_400 / 3600),
    }
}

fn percent(entries: Option<u64>, capacity: u64) -> String {
    match entries {
        Some(n) if capacity > 0 => format!("{:.1}%", n as f64 * 100.0 / capacity as f64),
        _ => "-".into(),
    }
}

/// Rows of cells as a left-aligned table, numbers right-aligned.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    // Numbers (counts, percentages, rates) right-aligned; an address is not
    // a number.
    let number = |c: &str| {
        c == "-"
            || c.trim_end_matches("/s")
                .trim_end_matches('%')
                .parse::<f64>()
                .is_ok()
    };
    let numeric =
        |i: usize| !rows.is_empty() && rows.iter().all(|r| r.get(i).is_some_and(|c| number(c)));
    let mut out = String::new();
    let mut write_row = |cells: Vec<String>| {
        let line: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| {
                if numeric(i) {
                    format!("{c:>w$}", w = widths[i])
                } else {
                    format!("{c:<w$}", w = widths[i])
                }
            })
            .collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    };
    write_row(header.iter().map(|h| (*h).to_owned()).collect());
    for row in rows {
        write_row(row.clone());
    }
    out
}

/// `mmesh-agent maps` as text.
#[must_use]
pub fn maps_text(maps: &[MapView]) -> String {
    let rows: Vec<Vec<String>> = maps
        .iter()
        .map(|m| {
            vec![
                m.map.clone(),
                m.entries.map_or_else(|| "-".into(), |n| n.to_string()),
                m.capacity.to_string(),
                percent(m.entries, m.capacity),
                m.refused.to_string(),
                m.option.clone(),
            ]
        })
        .collect();
    table(
        &[
            "MAP",
            "ENTRIES",
            "CAPACITY",
            "USED",
            "REFUSED",
            "RAISED WITH",
        ],
        &rows,
    )
}

fn attachments_text(s: &StatusView) -> String {
    let rows: Vec<Vec<String>> = s
        .attachments
        .iter()
        .map(|a| {
            vec![
                a.name.clone(),
                a.ifindex.to_string(),
                a.role.clone(),
                a.receive.clone(),
                a.tc_mode.clone(),
                if a.driver.is_empty() {
                    "-".into()
                } else {
                    a.driver.clone()
                },
                if a.adopted { "adopted" } else { "attached" }.into(),
            ]
        })
        .chain(s.missing.iter().map(|m| {
            vec![
                m.clone(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "MISSING".into(),
            ]
        }))
        .collect();
    table(
        &[
            "INTERFACE",
            "IFINDEX",
            "ROLE",
            "RECEIVE",
            "TC",
            "DRIVER",
            "STATE",
        ],
        &rows,
    )
}

/// `mmesh-agent status` as text.
#[must_use]
pub fn status_text(s: &StatusView) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "mmesh-agent {} (pid {}), up {}: {}",
        s.version,
        s.pid,
        duration(s.uptime_seconds),
        if s.ready { "ready" } else { "NOT READY" }
    );
    if !s.ready {
        let _ = writeln!(out, "  {}", escape_controls(&s.readiness));
    }
    let p = &s.policy;
    let _ = writeln!(
        out,
        "policy: generation {}, version {}, from {}; {} applied, {} rejected{}",
        p.generation,
        escape_controls(p.version.as_deref().unwrap_or("none")),
        escape_controls(p.source.as_deref().unwrap_or("-")),
        p.applied,
        p.rejected,
        match p.last_ok {
            Some(false) => "; the LAST ONE WAS REJECTED (the one in force stays)",
            _ => "",
        }
    );
    let _ = writeln!(
        out,
        "datapath: {}",
        s.pinned.as_deref().map_or_else(
            || "ephemeral (detached when the agent stops)".to_owned(),
            |d| format!("pinned in {d} (enforcement continues if the agent stops)")
        )
    );
    let _ = writeln!(out);
    out.push_str(&attachments_text(s));
    let c = &s.counters;
    let _ = writeln!(
        out,
        "\npackets: {} seen ({} bytes), {} passed, {} dropped, {} monitored",
        c.packets, c.bytes, c.passed, c.dropped, c.monitored
    );
    let rows: Vec<Vec<String>> = c
        .by_reason
        .iter()
        .filter(|r| r.verdict != "pass")
        .map(|r| {
            vec![
                r.reason.clone(),
                r.verdict.clone(),
                r.direction.clone(),
                r.packets.to_string(),
                r.bytes.to_string(),
            ]
        })
        .collect();
    if !rows.is_empty() {
        out.push_str(&table(
            &["REASON", "VERDICT", "DIRECTION", "PACKETS", "BYTES"],
            &rows,
        ));
    }
    let _ = writeln!(out);
    out.push_str(&maps_text(&s.maps));
    let l = &s.lost;
    let _ = writeln!(
        out,
        "\nlost: {} events to a full ring buffer, {} sampled away (over events_per_second), {} packets not counted per account (counters full), {} log lines",
        l.ring_buffer, l.events_sampled_away, l.account_counters_full, l.log_lines
    );
    let rows: Vec<Vec<String>> = l
        .consumers
        .iter()
        .map(|c| vec![c.name.clone(), c.delivered.to_string(), c.lost.to_string()])
        .collect();
    out.push_str(&table(&["EVENT CONSUMER", "DELIVERED", "LOST"], &rows));
    let _ = writeln!(
        out,
        "health: {} rate-limit CAS fallbacks, {} TC pull failures, {} interfaces lost, {} re-attached",
        c.rate_limit_contended, c.pull_failed, l.interfaces_lost, l.interfaces_reattached
    );
    out
}

/// Per row key, packets per second since the last refresh.
pub type Rates<'a> = &'a dyn Fn(&str) -> Option<f64>;

/// `mmesh-agent top` as text, with a rate column when `rates` are known.
#[must_use]
pub fn top_text(top: &TopView, rates: Option<Rates<'_>>) -> String {
    let key = match top.by {
        super::TopBy::Account => "ACCOUNT",
        super::TopBy::Remote => "REMOTE",
    };
    let rows: Vec<Vec<String>> = top
        .rows
        .iter()
        .map(|r| {
            let mut row = vec![
                escape_controls(&r.key).into_owned(),
                r.packets.to_string(),
                r.bytes.to_string(),
            ];
            if let Some(rate) = rates {
                row.push(rate(&r.key).map_or_else(|| "-".into(), |x| format!("{x:.1}/s")));
            }
            row
        })
        .collect();
    let mut header = vec![key, "DROPPED", "BYTES"];
    if rates.is_some() {
        header.push("RATE");
    }
    let mut out = format!("top {} by {}:\n", top.counts, key.to_lowercase());
    if rows.is_empty() {
        out.push_str("no drops\n");
    } else {
        out.push_str(&table(&header, &rows));
    }
    out
}

/// One event as a line of text.
#[must_use]
pub fn event_text(event: &serde_json::Value) -> String {
    let s = |key: &str| event.get(key).and_then(|v| v.as_str()).unwrap_or("-");
    let n = |key: &str| event.get(key).and_then(serde_json::Value::as_u64);
    let end = |addr: &str, port: &str| match (event.get(addr).and_then(|v| v.as_str()), n(port)) {
        (Some(ip), Some(port)) if ip.contains(':') => format!("[{ip}]:{port}"),
        (Some(ip), Some(port)) => format!("{ip}:{port}"),
        (Some(ip), None) => ip.to_owned(),
        _ => "-".into(),
    };
    let mut line = format!(
        "{} {} {} {} {} {} -> {} proto {} {} bytes",
        s("time"),
        s("account"),
        s("direction"),
        s("verdict"),
        s("reason"),
        end("src", "sport"),
        end("dst", "dport"),
        n("protocol").unwrap_or(0),
        n("bytes").unwrap_or(0),
    );
    if let Some(list) = event.get("list").and_then(|v| v.as_str()) {
        let _ = write!(line, " list {list}");
    }
    escape_controls(&line).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_right_addresses_left() {
        let text = table(
            &["REMOTE", "DROPPED", "USED"],
            &[
                vec!["10.77.1.1".into(), "7".into(), "0.5%".into()],
                vec!["2001:db8::1".into(), "1200".into(), "-".into()],
            ],
        );
        assert_eq!(
            text,
            "REMOTE       DROPPED  USED\n10.77.1.1          7  0.5%\n2001:db8::1     1200     -\n"
        );
    }
}
