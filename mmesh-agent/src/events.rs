//! Decoding the events of the ring buffer, for the consumers of a
//! [`Fanout`].

use std::{
    collections::BTreeMap,
    io::Write,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::{Arc, RwLock},
};

use aya::maps::{MapData, RingBuf};
use mmesh_common::{
    Direction, Reason, Verdict,
    event::{EVENT_FRAGMENT, Event},
    maps::NO_ACCOUNT,
};
use serde::Serialize;
use tokio::io::unix::AsyncFd;

use crate::{
    compile::Compiled,
    fanout::{Batch, Fanout},
};

/// The compiled policies of the last few generations, where events find
/// their account ids and list names: an event decoded just after a policy
/// change may come from the one before.
#[derive(Debug, Default, Clone)]
pub struct Names(Arc<RwLock<BTreeMap<u64, Arc<Compiled>>>>);

impl Names {
    const KEEP: usize = 8;

    pub fn insert(&self, generation: u64, policy: Arc<Compiled>) {
        let mut map = self
            .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        map.insert(generation, policy);
        while map.len() > Self::KEEP {
            map.pop_first();
        }
    }

    #[must_use]
    pub fn get(&self, generation: u64) -> Option<Arc<Compiled>> {
        let map = self
            .0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        map.get(&generation).cloned()
    }
}

/// An event as written to the log, one JSON object per line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EventRecord {
    /// Wall-clock time, RFC 3339 with nanoseconds, UTC.
    pub time: String,
    pub generation: u64,
    /// Account id; absent for traffic attributed to no account.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
    pub direction: &'static str,
    pub reason: &'static str,
    pub verdict: &'static str,
    /// The list that matched (`scope/name`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub list: Option<String>,
    pub ifindex: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub src: Option<IpAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dst: Option<IpAddr>,
    pub protocol: u8,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sport: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dport: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub icmp_type: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub icmp_code: Option<u8>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub fragment: bool,
    pub bytes: u32,
}

#[cfg(test)]
impl EventRecord {
    /// An inbound UDP packet of account `acme` from `src`, dropped by the
    /// global block list, of generation `generation`: for tests.
    pub(crate) fn test_drop(generation: u64, src: IpAddr) -> Self {
        Self {
            time: "2026-11-30T00:00:00.000000000Z".into(),
            generation,
            account: Some("acme".into()),
            direction: "inbound",
            reason: "global_block",
            verdict: "drop",
            list: None,
            ifindex: 1,
            src: Some(src),
            dst: None,
            protocol: 17,
            sport: None,
            dport: None,
            icmp_type: None,
            icmp_code: None,
            fragment: false,
            bytes: 60,
        }
    }
}

/// Converts kernel monotonic timestamps to wall-clock time.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    /// Realtime minus monotonic, in nanoseconds.
    offset: i128,
}

impl Clock {
    #[must_use]
    pub fn now() -> Self {
        let mono = clock_ns(libc::CLOCK_MONOTONIC);
        let real = clock_ns(libc::CLOCK_REALTIME);
        Self {
            offset: real - mono,
        }
    }

    #[must_use]
    pub fn wall(&self, monotonic_ns: u64) -> i128 {
        i128::from(monotonic_ns) + self.offset
    }
}

fn clock_ns(clock: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec out-pointer.
    unsafe { libc::clock_gettime(clock, &raw mut ts) };
    i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
}

/// Formats Unix nanoseconds as RFC 3339 UTC (proleptic Gregorian calendar;
/// the civil-from-days algorithm of H. Hinnant).
#[must_use]
pub fn rfc3339(unix_ns: i128) -> String {
    let secs = unix_ns.div_euclid(1_000_000_000);
    let nanos = unix_ns.rem_euclid(1_000_000_000);
    let days = secs.div_euclid(86_400);
    let tod = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i128::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{nanos:09}Z",
        tod / 3600,
        tod % 3600 / 60,
        tod % 60
    )
}

/// Decodes one ring buffer record; `None` if it is too short to be an event.
#[must_use]
pub fn decode(bytes: &[u8], names: &Names, clock: &Clock) -> Option<EventRecord> {
    if bytes.len() < size_of::<Event>() {
        return None;
    }
    // SAFETY: at least size_of::<Event>() bytes; Event is plain old data.
    let ev: Event = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
    let table = names.get(ev.generation);
    let account = (ev.slot != NO_ACCOUNT).then(|| {
        table
            .as_ref()
            .and_then(|t| t.account_id(ev.slot).map(str::to_owned))
            .unwrap_or_else(|| format!("slot:{}", ev.slot))
    });
    let list = (ev.list != 0).then(|| {
        table.as_ref().and_then(|t| t.list(ev.list)).map_or_else(
            || format!("list:{}", ev.list),
            |l| format!("{}/{}", l.scope, l.name),
        )
    });
    let (src, dst) = match ev.family {
        4 => {
            let s: [u8; 4] = ev.src[..4].try_into().ok()?;
            let d: [u8; 4] = ev.dst[..4].try_into().ok()?;
            (
                Some(IpAddr::V4(Ipv4Addr::from(s))),
                Some(IpAddr::V4(Ipv4Addr::from(d))),
            )
        }
        6 => (
            Some(IpAddr::V6(Ipv6Addr::from(ev.src))),
            Some(IpAddr::V6(Ipv6Addr::from(ev.dst))),
        ),
        _ => (None, None),
    };
    let fragment = ev.flags & EVENT_FRAGMENT != 0;
    let icmp = matches!(ev.protocol, 1 | 58) && !fragment;
    let ports = matches!(ev.protocol, 6 | 17) && !fragment;
    Some(EventRecord {
        time: rfc3339(clock.wall(ev.ts_ns)),
        generation: ev.generation,
        account,
        direction: Direction::from_u8(ev.direction).map_or("unknown", Direction::name),
        reason: Reason::from_u8(ev.reason).map_or("unknown", Reason::name),
        verdict: Verdict::from_u8(ev.verdict).map_or("unknown", Verdict::name),
        list,
        ifindex: ev.ifindex,
        src,
        dst,
        protocol: ev.protocol,
        sport: ports.then_some(ev.sport),
        dport: ports.then_some(ev.dport),
        icmp_type: icmp.then_some(ev.sport as u8),
        icmp_code: icmp.then_some(ev.dport as u8),
        fragment,
        bytes: ev.len,
    })
}

/// Events published at once, at most: a batch is the unit a stalled
/// consumer loses, and bounds what one slot of a consumer's queue holds.
const BATCH_EVENTS: usize = 256;

/// Reads the ring buffer until `stop` resolves, decoding every event once
/// and publishing it to `out`'s consumers in batches; then closes `out`.
/// Returns how many events were decoded. Publishing never blocks: a stalled
/// consumer loses events (counted against it), and the reader, the other
/// consumers, enforcement and the summary go on.
pub async fn read(
    ring: RingBuf<MapData>,
    names: Names,
    out: &Fanout,
    stop: impl Future<Output = ()>,
) -> std::io::Result<u64> {
    let clock = Clock::now();
    // SAFETY: the ring buffer owns its map fd, which stays open and the same
    // for as long as the AsyncFd owns the ring buffer.
    let fd = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) };
    let mut fd = match fd {
        Ok(fd) => fd,
        Err(err) => {
            out.close();
            return Err(std::io::Error::from(err));
        }
    };
    let mut count = 0u64;
    tokio::pin!(stop);
    let result = loop {
        tokio::select! {
            () = &mut stop => break Ok(()),
            guard = fd.readable_mut() => {
                let mut guard = match guard {
                    Ok(guard) => guard,
                    Err(err) => break Err(err),
                };
                count += drain_to(guard.get_inner_mut(), &names, &clock, out);
                guard.clear_ready();
            }
        }
    };
    count += drain_to(fd.get_mut(), &names, &clock, out);
    out.close();
    result.map(|()| count)
}

/// Decodes every event waiting in `ring` and publishes them to `out` in
/// batches; returns how many events it decoded.
fn drain_to(ring: &mut RingBuf<MapData>, names: &Names, clock: &Clock, out: &Fanout) -> u64 {
    let mut count = 0;
    let mut batch = Vec::with_capacity(BATCH_EVENTS);
    while let Some(item) = ring.next() {
        if let Some(record) = decode(&item, names, clock) {
            count += 1;
            batch.push(record);
            if batch.len() == BATCH_EVENTS {
                out.publish(&Batch::from(std::mem::replace(
                    &mut batch,
                    Vec::with_capacity(BATCH_EVENTS),
                )));
            }
        }
    }
    out.publish(&Batch::from(batch));
    count
}

/// Decodes every event waiting in `ring` to a JSON line on `out`, then
/// flushes it; returns how many events it wrote. (Public for the benchmark
/// harness, which measures this loop.)
pub fn drain(
    ring: &mut RingBuf<MapData>,
    names: &Names,
    clock: &Clock,
    out: &mut impl Write,
) -> u64 {
    let mut count = 0;
    while let Some(item) = ring.next() {
        if let Some(record) = decode(&item, names, clock) {
            count += 1;
            if serde_json::to_writer(&mut *out, &record).is_ok() {
                let _ = out.write_all(b"\n");
            }
        }
    }
    let _ = out.flush();
    count
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formats() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(
            rfc3339(1_796_000_000_123_456_789),
            "2026-11-30T00:53:20.123456789Z"
        );
        assert_eq!(
            rfc3339(951_782_400_000_000_000),
            "2000-02-29T00:00:00.000000000Z"
        );
        assert_eq!(rfc3339(-1), "1969-12-31T23:59:59.999999999Z");
    }

    #[test]
    fn decodes_an_event_with_names() {
        let names = Names::default();
        let policy = crate::policy::Policy::parse(
            "global:\n  block: [{ name: bad, cidrs: [192.0.2.0/24] }]\naccounts:\n  - { id: zero, prefixes: [10.0.0.1] }\n  - { id: acme, prefixes: [10.0.0.2] }\n",
            "t",
            std::path::Path::new("."),
        )
        .unwrap();
        let compiled =
            crate::compile::compile(&policy, None, &crate::compile::Capacity::default()).unwrap();
        assert_eq!(compiled.account_id(2), Some("acme"));
        names.insert(3, std::sync::Arc::new(compiled));
        let mut ev = Event {
            ts_ns: 5,
            generation: 3,
            slot: 2,
            list: 1,
            len: 60,
            ifindex: 7,
            direction: Direction::Outbound as u8,
            reason: Reason::GlobalBlock as u8,
            verdict: Verdict::Drop as u8,
            family: 4,
            protocol: 17,
            sport: 1234,
            dport: 53,
            ..Event::default()
        };
        ev.src[..4].copy_from_slice(&[10, 0, 0, 1]);
        ev.dst[..4].copy_from_slice(&[192, 0, 2, 9]);
        // SAFETY: Event is plain old data.
        let bytes = unsafe {
            std::slice::from_raw_parts(std::ptr::from_ref(&ev).cast::<u8>(), size_of::<Event>())
        };
        let rec = decode(bytes, &names, &Clock { offset: 0 }).unwrap();
        assert_eq!(rec.account.as_deref(), Some("acme"));
        assert_eq!(rec.list.as_deref(), Some("global/bad"));
        assert_eq!(
            (rec.direction, rec.reason, rec.verdict),
            ("outbound", "global_block", "drop")
        );
        assert_eq!(rec.src, Some("10.0.0.1".parse().unwrap()));
        assert_eq!(
            (rec.sport, rec.dport, rec.icmp_type),
            (Some(1234), Some(53), None)
        );
        assert!(decode(&bytes[..10], &names, &Clock { offset: 0 }).is_none());
        // Unknown generation: slot number instead of a name.
        ev.generation = 99;
        // SAFETY: as above.
        let bytes = unsafe {
            std::slice::from_raw_parts(std::ptr::from_ref(&ev).cast::<u8>(), size_of::<Event>())
        };
        assert_eq!(
            decode(bytes, &names, &Clock { offset: 0 })
                .unwrap()
                .account
                .as_deref(),
            Some("slot:2")
        );
    }
}
