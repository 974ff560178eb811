//! Violation reports for the control plane: events from the fan-out,
//! aggregated per (account, reason, verdict, direction, remote prefix).
//!
//! Bounded at every step. The aggregate holds at most [`MAX_EXACT`] keys
//! with exact remote addresses; past that, an event is folded into its
//! remote's /24 (IPv4) or /48 (IPv6) among at most [`MAX_COARSE`] more keys
//! (counted as coarsened); past that it is dropped and counted. The
//! consumer thread that aggregates has its own bounded fan-out queue, so a
//! control plane that reads slowly costs reports, never enforcement.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex, PoisonError},
    thread,
    time::{SystemTime, UNIX_EPOCH},
};

use ipnet::IpNet;

use super::proto;
use crate::{
    events::EventRecord,
    fanout::{ConsumerStats, Subscription},
};

/// Keys with an exact remote address per report.
pub const MAX_EXACT: usize = 4096;
/// Further keys with a coarse remote prefix per report.
pub const MAX_COARSE: usize = 1024;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key {
    account: String,
    reason: &'static str,
    verdict: &'static str,
    direction: &'static str,
    remote: IpNet,
}

#[derive(Clone, Copy, Debug)]
struct Seen {
    events: u64,
    first_ms: u64,
    last_ms: u64,
}

/// Violations since the last [`Aggregate::take`].
#[derive(Debug, Default)]
pub struct Aggregate {
    exact: HashMap<Key, Seen>,
    coarse: HashMap<Key, Seen>,
    coarsened: u64,
    dropped: u64,
}

impl Aggregate {
    /// Adds one event seen at `unix_ms`. Events without a remote address
    /// (a malformed packet cut before its addresses) are counted under `::/0`.
    pub fn add(&mut self, event: &EventRecord, unix_ms: u64) {
        let remote = if event.direction == "outbound" {
            event.dst
        } else {
            event.src
        };
        let mut key = Key {
            account: event.account.clone().unwrap_or_default(),
            reason: event.reason,
            verdict: event.verdict,
            direction: event.direction,
            remote: remote.map_or(IpNet::V6(ipnet::Ipv6Net::default()), IpNet::from),
        };
        if let Some(seen) = self.exact.get_mut(&key) {
            seen.bump(unix_ms);
            return;
        }
        if self.exact.len() < MAX_EXACT {
            self.exact.insert(key, Seen::new(unix_ms));
            return;
        }
        key.remote = coarse(remote);
        if let Some(seen) = self.coarse.get_mut(&key) {
            seen.bump(unix_ms);
            self.coarsened += 1;
        } else if self.coarse.len() < MAX_COARSE {
            self.coarse.insert(key, Seen::new(unix_ms));
            self.coarsened += 1;
        } else {
            self.dropped += 1;
        }
    }

    /// Counts events lost before they were aggregated (a full queue, a
    /// report the stream could not take).
    pub fn lose(&mut self, events: u64) {
        self.dropped += events;
    }

    /// Whether there is nothing to report.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.coarse.is_empty() && self.dropped == 0
    }

    /// Events in the aggregate.
    #[must_use]
    pub fn events(&self) -> u64 {
        self.exact
            .values()
            .chain(self.coarse.values())
            .map(|s| s.events)
            .sum()
    }

    /// The report of everything since the last one; starts a new one.
    pub fn take(&mut self) -> proto::Reports {
        let taken = std::mem::take(self);
        let violations = taken
            .exact
            .into_iter()
            .chain(taken.coarse)
            .map(|(k, s)| proto::Violation {
                account: k.account,
                reason: k.reason.into(),
                verdict: k.verdict.into(),
                direction: k.direction.into(),
                remote_prefix: k.remote.to_string(),
                events: s.events,
                first_unix_ms: s.first_ms,
                last_unix_ms: s.last_ms,
            })
            .collect();
        proto::Reports {
            violations,
            coarsened: taken.coarsened,
            dropped: taken.dropped,
        }
    }
}

impl Seen {
    fn new(ms: u64) -> Self {
        Self {
            events: 1,
            first_ms: ms,
            last_ms: ms,
        }
    }

    fn bump(&mut self, ms: u64) {
        self.events += 1;
        self.last_ms = self.last_ms.max(ms);
    }
}

/// The remote's /24 or /48.
fn coarse(remote: Option<IpAddr>) -> IpNet {
    let net = match remote {
        Some(IpAddr::V4(a)) => IpNet::new(IpAddr::V4(a), 24),
        Some(IpAddr::V6(a)) => IpNet::new(IpAddr::V6(a), 48),
        None => IpNet::new(IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED), 0),
    };
    net.map_or(IpNet::V6(ipnet::Ipv6Net::default()), |n| n.trunc())
}

/// Milliseconds since the Unix epoch.
#[must_use]
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The shared aggregate, filled by a consumer thread of the event fan-out.
pub type Shared = Arc<Mutex<Aggregate>>;

/// Starts the consumer thread that aggregates `subscription`'s events into
/// the returned aggregate, and its fan-out statistics.
pub fn spawn(subscription: Subscription) -> std::io::Result<(Shared, Arc<ConsumerStats>)> {
    let shared = Shared::default();
    let stats = subscription.stats();
    let into = shared.clone();
    thread::Builder::new()
        .name("mmesh-reports".into())
        .spawn(move || {
            while let Some(batch) = subscription.recv() {
                let now = unix_ms();
                let mut agg = into.lock().unwrap_or_else(PoisonError::into_inner);
                for event in batch.iter() {
                    agg.add(event, now);
                }
                drop(agg);
                subscription.done(batch.len() as u64, true);
            }
        })?;
    Ok((shared, stats))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(src: IpAddr) -> EventRecord {
        EventRecord::test_drop(1, src)
    }

    #[test]
    fn events_are_summed_per_key_then_coarsened_then_dropped() {
        let mut agg = Aggregate::default();
        for _ in 0..3 {
            agg.add(&event("192.0.2.1".parse().unwrap()), 10);
        }
        // Fill the exact keys, then one /24 worth of new remotes folds
        // into one coarse key.
        for i in 0..(MAX_EXACT as u32 - 1) {
            agg.add(&event(IpAddr::V4((0x0a00_0000 + i).into())), 20);
        }
        for i in 0..100u32 {
            agg.add(&event(IpAddr::V4((0xc633_6400 + i).into())), 30); // 198.51.100.i
        }
        // Every coarse key used, then the rest is dropped.
        for i in 0..(MAX_COARSE as u32 + 5) {
            agg.add(&event(IpAddr::V4((0x6400_0000 + (i << 8)).into())), 40);
        }
        let total = 3 + (MAX_EXACT as u64 - 1) + 100 + MAX_COARSE as u64 + 5;
        let dropped = 6; // the 198.51.100.0/24 key took one of the coarse slots
        assert_eq!(agg.events() + dropped, total);
        let report = agg.take();
        assert_eq!(report.dropped, dropped);
        assert_eq!(report.coarsened, 100 + MAX_COARSE as u64 - 1);
        let one = report
            .violations
            .iter()
            .find(|v| v.remote_prefix == "192.0.2.1/32")
            .expect("exact key");
        assert_eq!(
            (one.events, one.first_unix_ms, one.last_unix_ms),
            (3, 10, 10)
        );
        let folded = report
            .violations
            .iter()
            .find(|v| v.remote_prefix == "198.51.100.0/24")
            .expect("coarse key");
        assert_eq!(folded.events, 100);
        assert!(agg.is_empty(), "take starts a new aggregate");
    }
}
