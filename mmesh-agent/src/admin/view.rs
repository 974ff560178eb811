//! What the admin socket answers, built from the read-only handles.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    time::{Duration, SystemTime},
};

use mmesh_common::{Direction, Reason, Verdict};
use serde::{Deserialize, Serialize};

use super::recent::Recent;
use crate::{
    counters::top_accounts,
    metrics::{Health, Policy, Sources},
    show,
};

/// `mmesh-agent status`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StatusView {
    /// The agent's version.
    pub version: String,
    pub pid: u32,
    /// Unix time the agent started at.
    pub started: f64,
    pub uptime_seconds: f64,
    /// `/readyz`: attached everywhere and a policy in force.
    pub ready: bool,
    pub readiness: String,
    pub policy: PolicyStatus,
    pub attachments: Vec<AttachmentView>,
    /// Configured interfaces not attached now.
    pub missing: Vec<String>,
    /// The pin directory; `None`: ephemeral (everything ends with the agent).
    pub pinned: Option<String>,
    pub counters: CountersView,
    pub maps: Vec<MapView>,
    pub lost: LostView,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PolicyStatus {
    pub generation: u64,
    pub version: Option<String>,
    /// Where it came from (a file, a directory, the control plane, the
    /// embedded default).
    pub source: Option<String>,
    pub applied: u64,
    pub rejected: u64,
    /// The last attempt: applied (true) or rejected.
    pub last_ok: Option<bool>,
    /// Unix time of the last attempt.
    pub last_at: Option<f64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AttachmentView {
    pub name: String,
    pub ifindex: u32,
    pub role: String,
    /// `xdp` or `tc`.
    pub receive: String,
    pub driver: String,
    /// `tcx` or `clsact`.
    pub tc_mode: String,
    pub adopted: bool,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct CountersView {
    pub packets: u64,
    pub bytes: u64,
    pub passed: u64,
    pub dropped: u64,
    pub monitored: u64,
    /// Every non-zero (reason, verdict, direction).
    pub by_reason: Vec<ReasonCount>,
    pub rate_limit_contended: u64,
    pub pull_failed: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReasonCount {
    pub reason: String,
    pub verdict: String,
    pub direction: String,
    pub packets: u64,
    pub bytes: u64,
}

/// What was lost on the way out.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct LostView {
    /// Events the programs could not emit: the ring buffer was full.
    pub ring_buffer: u64,
    /// Packets not counted per account: the account counters were full.
    pub account_counters_full: u64,
    /// Drops and monitored packets over their (account, reason)'s events
    /// for the second: not reported as events.
    pub events_sampled_away: u64,
    pub log_lines: u64,
    /// Per consumer of the event fan-out: delivered and lost.
    pub consumers: Vec<ConsumerView>,
    pub interfaces_lost: u64,
    pub interfaces_reattached: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ConsumerView {
    pub name: String,
    pub delivered: u64,
    pub lost: u64,
}

/// One map: what it holds against what it can hold.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MapView {
    pub map: String,
    /// `None` when it could not be read now.
    pub entries: Option<u64>,
    pub capacity: u64,
    /// The option that sets the capacity.
    pub option: String,
    /// Inserts refused because it was full (`mmesh_map_inserts_refused_total`):
    /// policies that did not fit, or packets not counted per account.
    pub refused: u64,
}

/// `mmesh-agent top`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TopView {
    pub by: super::TopBy,
    /// What `packets` counts: dropped packets (by account), or drop events
    /// (by remote: events are sampled in the kernel).
    pub counts: String,
    pub rows: Vec<TopRow>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopRow {
    pub key: String,
    pub packets: u64,
    pub bytes: u64,
}

const STARTING: &str = "the agent is starting: the programs and the policy are not in place yet";

fn unix(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

/// Entries and capacity of every map the policy and the counters fill.
pub(crate) fn maps(health: &Health) -> Result<Vec<MapView>, String> {
    let s = health.sources().ok_or(STARTING)?;
    let totals = s.counters.totals().map_err(|e| e.to_string())?;
    Ok(maps_of(s, &health.policy(), totals.counters_full))
}

/// `counters_full`: the kernel's refused inserts into the account counters.
fn maps_of(s: &Sources, policy: &Policy, counters_full: u64) -> Vec<MapView> {
    let c = &s.capacity;
    let counts = s.names.get(policy.generation).map(|p| p.counts());
    let accounts = s.accounts.read().ok();
    let cpus = aya::util::nr_cpus().map_or(1, |n| n as u64);
    let map = |map: &str, entries: Option<usize>, capacity: u32, option: &str| MapView {
        map: map.to_owned(),
        entries: entries.map(|n| n as u64),
        capacity: u64::from(capacity),
        option: option.to_owned(),
        refused: policy.refused.get(map).copied().unwrap_or(0),
    };
    let mut out = vec![
        map(
            "accounts",
            counts.map(|c| c.accounts),
            c.accounts,
            "--max-accounts",
        ),
        map(
            "account_prefixes_v4",
            counts.map(|c| c.account_prefixes_v4),
            c.account_prefixes,
            "--max-account-prefixes",
        ),
        map(
            "account_prefixes_v6",
            counts.map(|c| c.account_prefixes_v6),
            c.account_prefixes,
            "--max-account-prefixes",
        ),
        map(
            "list_prefixes_v4",
            counts.map(|c| c.list_prefixes_v4),
            c.list_prefixes,
            "--max-list-prefixes",
        ),
        map(
            "list_prefixes_v6",
            counts.map(|c| c.list_prefixes_v6),
            c.list_prefixes,
            "--max-list-prefixes",
        ),
    ];
    out.push(MapView {
        map: "account_counters".into(),
        entries: accounts.as_ref().map(|a| a.counter_entries),
        capacity: u64::from(c.counters),
        option: "--max-counters".into(),
        refused: counters_full,
    });
    out.push(MapView {
        map: "flow_cache".into(),
        entries: accounts.as_ref().map(|a| a.flow_entries),
        capacity: u64::from(c.flow_cache) * cpus,
        option: "--flow-cache (entries per CPU)".into(),
        // Direct-mapped: a new flow replaces the entry, nothing is refused.
        refused: 0,
    });
    out
}

pub(crate) fn status(health: &Health) -> Result<StatusView, String> {
    let policy = health.policy();
    let (ready, readiness) = health.readyz();
    let (since, started) = health.started;
    let mut view = StatusView {
        version: env!("CARGO_PKG_VERSION").into(),
        pid: std::process::id(),
        started: unix(started),
        uptime_seconds: since.elapsed().as_secs_f64(),
        ready,
        readiness: readiness.trim_end().to_owned(),
        policy: PolicyStatus {
            generation: policy.generation,
            version: policy.version().map(str::to_owned),
            source: policy.running.as_ref().map(|p| p.source.clone()),
            applied: policy.applied,
            rejected: policy.rejected,
            last_ok: policy.last.map(|(ok, _, _)| ok),
            last_at: policy.last.map(|(_, at, _)| unix(at)),
        },
        attachments: Vec::new(),
        missing: Vec::new(),
        pinned: None,
        counters: CountersView::default(),
        maps: Vec::new(),
        lost: LostView::default(),
    };
    let Some(s) = health.sources() else {
        return Ok(view);
    };
    let attached = s.attached_now();
    view.missing = s
        .interfaces
        .iter()
        .filter(|i| !attached.iter().any(|a| &a.name == *i))
        .cloned()
        .collect();
    view.attachments = attached
        .into_iter()
        .map(|a| AttachmentView {
            name: a.name,
            ifindex: a.ifindex,
            role: a.role.to_string(),
            receive: a.receive.to_string(),
            driver: a.driver,
            tc_mode: a.tc_mode.to_owned(),
            adopted: a.adopted,
        })
        .collect();
    view.pinned = s.pins.as_ref().map(|p| p.display().to_string());
    let totals = s.counters.totals().map_err(|e| e.to_string())?;
    let c = &mut view.counters;
    for ((reason, verdict, direction), n) in &totals.counters {
        c.packets += n.packets;
        c.bytes += n.bytes;
        match verdict {
            Verdict::Pass => c.passed += n.packets,
            Verdict::Drop => c.dropped += n.packets,
            Verdict::Monitor => c.monitored += n.packets,
        }
        c.by_reason.push(ReasonCount {
            reason: reason.name().into(),
            verdict: verdict.name().into(),
            direction: direction.name().into(),
            packets: n.packets,
            bytes: n.bytes,
        });
    }
    c.rate_limit_contended = totals.rate_contended;
    c.pull_failed = totals.pull_failed;
    view.maps = maps_of(s, &policy, totals.counters_full);
    view.lost = LostView {
        ring_buffer: totals.events_lost,
        account_counters_full: totals.counters_full,
        events_sampled_away: totals.events_sampled,
        log_lines: s.outputs.logs.lost(),
        consumers: s
            .outputs
            .events
            .consumers()
            .iter()
            .map(|c| ConsumerView {
                name: c.name().to_owned(),
                delivered: c.delivered(),
                lost: c.lost(),
            })
            .collect(),
        interfaces_lost: s.links.lost(),
        interfaces_reattached: s.links.reattached(),
    };
    Ok(view)
}

/// The effective policy in force, rendered as `policy show` renders a
/// file's (the same view, the same order of fields).
pub(crate) fn policy(health: &Health, json: bool) -> Result<String, String> {
    let s = health.sources().ok_or(STARTING)?;
    let p = health.policy();
    let (Some(running), Some(compiled)) = (p.running.as_ref(), s.names.get(p.generation)) else {
        return Err("no policy in force yet".into());
    };
    let view = show::effective(running, &compiled, &s.capacity);
    if json {
        serde_json::to_string_pretty(&view)
            .map(|mut text| {
                text.push('\n');
                text
            })
            .map_err(|e| e.to_string())
    } else {
        serde_saphyr::to_string(&view).map_err(|e| e.to_string())
    }
}

/// `top --by account`: the accounts with the most dropped packets.
pub(crate) fn top_by_account(health: &Health, limit: usize) -> Result<TopView, String> {
    let s = health.sources().ok_or(STARTING)?;
    let generation = health.policy().generation;
    let compiled = s.names.get(generation).ok_or("no policy in force yet")?;
    let counts = s.accounts.read().map_err(|e| e.to_string())?;
    Ok(TopView {
        by: super::TopBy::Account,
        counts: "dropped packets".into(),
        rows: top_accounts(&counts.drops, &compiled, limit)
            .into_iter()
            .map(|a| TopRow {
                key: a.account,
                packets: a.packets,
                bytes: a.bytes,
            })
            .collect(),
    })
}

/// `top --by remote`: drop events per remote address (the source of an
/// inbound packet, the destination of an outbound one) among the recent
/// events of the last `window`.
pub(crate) fn top_by_remote(recent: &Recent, window: Option<Duration>, limit: usize) -> TopView {
    let mut by: BTreeMap<IpAddr, (u64, u64)> = BTreeMap::new();
    for batch in recent.since(window) {
        for e in batch.iter().filter(|e| e.verdict == Verdict::Drop.name()) {
            let remote = if e.direction == Direction::Inbound.name() {
                e.src
            } else {
                e.dst
            };
            if let Some(remote) = remote {
                let n = by.entry(remote).or_default();
                n.0 += 1;
                n.1 += u64::from(e.bytes);
            }
        }
    }
    let mut rows: Vec<TopRow> = by
        .into_iter()
        .map(|(ip, (packets, bytes))| TopRow {
            key: ip.to_string(),
            packets,
            bytes,
        })
        .collect();
    rows.sort_by(|a, b| b.packets.cmp(&a.packets).then_with(|| a.key.cmp(&b.key)));
    rows.truncate(limit);
    TopView {
        by: super::TopBy::Remote,
        counts: "drop events (sampled in the kernel)".into(),
        rows,
    }
}

/// Whether `reason` names a reason, for a clear refusal of a typo.
pub(crate) fn known_reason(reason: &str) -> bool {
    Reason::ALL.iter().any(|r| r.name() == reason)
}
