//! The recent events, for `events --since` and `top --by remote`.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex, PoisonError},
    thread,
    time::{Duration, Instant},
};

use crate::fanout::{Batch, Fanout};

/// Events kept at most (whole batches: a little less when the oldest batch
/// is evicted). At a few hundred bytes each, about 2 MiB.
pub const RECENT_EVENTS: usize = 8192;
/// Batches queued for the keeper thread at most.
const QUEUE: usize = 64;

#[derive(Default)]
struct Kept {
    batches: VecDeque<(Instant, Batch)>,
    events: usize,
}

/// The last [`RECENT_EVENTS`] events the agent decoded, with when each
/// batch arrived, kept by a consumer of the fan-out of its own (`recent`).
#[derive(Clone, Default)]
pub struct Recent(Arc<Mutex<Kept>>);

impl Recent {
    /// Subscribes to `fanout` and keeps what it publishes, from a thread.
    pub fn spawn(fanout: &Fanout) -> std::io::Result<Self> {
        let recent = Self::default();
        let kept = recent.clone();
        let subscription = fanout.subscribe("recent", QUEUE);
        thread::Builder::new()
            .name("mmesh-recent".into())
            .spawn(move || {
                while let Some(batch) = subscription.recv() {
                    let n = batch.len() as u64;
                    kept.push(batch);
                    subscription.done(n, true);
                }
            })?;
        Ok(recent)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Kept> {
        // Every change is whole under the lock.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn push(&self, batch: Batch) {
        let mut kept = self.lock();
        kept.events += batch.len();
        kept.batches.push_back((Instant::now(), batch));
        while kept.events > RECENT_EVENTS {
            match kept.batches.pop_front() {
                Some((_, old)) => kept.events -= old.len(),
                None => break,
            }
        }
    }

    /// The batches that arrived within `window` (all with `None`), oldest
    /// first.
    #[must_use]
    pub fn since(&self, window: Option<Duration>) -> Vec<Batch> {
        let now = Instant::now();
        self.lock()
            .batches
            .iter()
            .filter(|(at, _)| window.is_none_or(|w| now.duration_since(*at) <= w))
            .map(|(_, b)| b.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use super::*;
    use crate::events::EventRecord;

    #[test]
    fn keeps_the_newest_events_up_to_the_bound() {
        let recent = Recent::default();
        for i in 0..(RECENT_EVENTS as u64 / 100 + 5) {
            let batch: Batch = (0..100)
                .map(|j| EventRecord::test_drop(i * 100 + j, IpAddr::V4(Ipv4Addr::LOCALHOST)))
                .collect();
            recent.push(batch);
        }
        let kept = recent.since(None);
        let events: usize = kept.iter().map(|b| b.len()).sum();
        assert!(events <= RECENT_EVENTS, "{events}");
        assert!(events > RECENT_EVENTS - 100, "{events}");
        // The newest is kept.
        let last = kept.last().unwrap();
        assert_eq!(
            last[99].generation,
            (RECENT_EVENTS as u64 / 100 + 5) * 100 - 1
        );
        assert!(recent.since(Some(Duration::ZERO)).len() <= kept.len());
    }
}
