//! Decoded events, shared with any number of consumers.
//!
//! The ring-buffer reader decodes each event once and publishes batches of
//! them to a [`Fanout`]; every consumer (JSON lines on stdout today; the
//! metrics, the control plane and `events --follow` next) subscribes with a
//! bounded queue of its own. Publishing never blocks: a batch that does not
//! fit in a consumer's queue is dropped for that consumer alone and counted
//! against it, so a slow or stuck consumer neither slows the reader nor
//! takes events from another consumer. A batch is an `Arc`: the consumers
//! share the decoded records, each formats them as it needs.

use std::{
    io::Write,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
        mpsc::{self, Receiver, SyncSender, TrySendError},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use crate::events::EventRecord;

/// Events published at once, shared by every consumer.
pub type Batch = Arc<[EventRecord]>;

/// What one consumer did with the events published to it.
#[derive(Debug)]
pub struct ConsumerStats {
    name: String,
    delivered: AtomicU64,
    /// Dropped because the consumer's queue was full.
    dropped: AtomicU64,
    /// Taken by the consumer but not delivered (a write error).
    failed: AtomicU64,
}

impl ConsumerStats {
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    #[must_use]
    pub fn delivered(&self) -> u64 {
        self.delivered.load(Ordering::Relaxed)
    }

    #[must_use]
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    #[must_use]
    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }

    /// Events that never reached the consumer's other end.
    #[must_use]
    pub fn lost(&self) -> u64 {
        self.dropped() + self.failed()
    }
}

struct Consumer {
    tx: SyncSender<Batch>,
    stats: Arc<ConsumerStats>,
}

#[derive(Default)]
struct Inner {
    consumers: Vec<Consumer>,
    closed: bool,
    /// What consumers that went away delivered and lost, by name: the
    /// totals by name never go down (counters in the metrics).
    departed: std::collections::BTreeMap<String, (u64, u64)>,
}

/// What the consumers of one name delivered and lost, those gone included.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NameTotals {
    pub name: String,
    pub delivered: u64,
    pub lost: u64,
}

/// The publishing side. Cheap to clone; every clone publishes to the same
/// consumers.
#[derive(Clone, Default)]
pub struct Fanout(Arc<Mutex<Inner>>);

impl Fanout {
    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Nothing that holds the lock can panic half-way through a change.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A new consumer named `name` (it names the consumer's losses in the
    /// summary) behind a queue of at most `batches` batches. It gets the
    /// events published from now on, until it is dropped or the fanout is
    /// closed.
    #[must_use]
    pub fn subscribe(&self, name: &str, batches: usize) -> Subscription {
        let (tx, rx) = mpsc::sync_channel(batches.max(1));
        let stats = Arc::new(ConsumerStats {
            name: name.to_owned(),
            delivered: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        });
        let mut inner = self.inner();
        // A subscription to a closed fanout ends at once: dropping its
        // sender disconnects it.
        if !inner.closed {
            inner.consumers.push(Consumer {
                tx,
                stats: stats.clone(),
            });
        }
        Subscription { rx, stats }
    }

    /// Hands `batch` to every consumer whose queue has room; for the others
    /// it is dropped and counted. Never blocks. Consumers that went away
    /// are forgotten.
    pub fn publish(&self, batch: &Batch) {
        if batch.is_empty() {
            return;
        }
        let events = batch.len() as u64;
        let inner = &mut *self.inner();
        let departed = &mut inner.departed;
        inner
            .consumers
            .retain(|c| match c.tx.try_send(batch.clone()) {
                Ok(()) => true,
                Err(TrySendError::Full(_)) => {
                    c.stats.dropped.fetch_add(events, Ordering::Relaxed);
                    true
                }
                Err(TrySendError::Disconnected(_)) => {
                    let d = departed.entry(c.stats.name.clone()).or_default();
                    d.0 += c.stats.delivered();
                    d.1 += c.stats.lost();
                    false
                }
            });
    }

    /// Ends every subscription once its queue is drained; later ones end at
    /// once. The reader closes the fanout when it stops.
    pub fn close(&self) {
        let mut inner = self.inner();
        inner.closed = true;
        inner.consumers.clear();
    }

    /// Delivered and lost by consumer name, summed over the consumers of
    /// that name, those that went away included (several `events --follow`
    /// clients share one name): one series per name in the metrics, and
    /// never decreasing.
    #[must_use]
    pub fn totals_by_name(&self) -> Vec<NameTotals> {
        let inner = self.inner();
        let mut by: std::collections::BTreeMap<&str, (u64, u64)> = inner
            .departed
            .iter()
            .map(|(name, d)| (name.as_str(), *d))
            .collect();
        let mut order: Vec<&str> = Vec::new();
        for c in &inner.consumers {
            let t = by.entry(c.stats.name()).or_default();
            t.0 += c.stats.delivered();
            t.1 += c.stats.lost();
            if !order.contains(&c.stats.name()) {
                order.push(c.stats.name());
            }
        }
        // Subscription order first (stdout before the others), then the
        // names with no consumer left.
        for name in inner.departed.keys() {
            if !order.contains(&name.as_str()) {
                order.push(name);
            }
        }
        order
            .into_iter()
            .map(|name| {
                let (delivered, lost) = by[name];
                NameTotals {
                    name: name.to_owned(),
                    delivered,
                    lost,
                }
            })
            .collect()
    }

    /// The statistics of the consumers subscribed now.
    #[must_use]
    pub fn consumers(&self) -> Vec<Arc<ConsumerStats>> {
        self.inner()
            .consumers
            .iter()
            .map(|c| c.stats.clone())
            .collect()
    }
}

/// The receiving side of one consumer.
pub struct Subscription {
    rx: Receiver<Batch>,
    stats: Arc<ConsumerStats>,
}

impl Subscription {
    /// The next batch; `None` once the fanout is closed and the queue
    /// drained. Blocks.
    #[must_use]
    pub fn recv(&self) -> Option<Batch> {
        self.rx.recv().ok()
    }

    /// The next batch, waiting `timeout` at most: `Ok(None)` once the
    /// fanout is closed and the queue drained, `Err` on the timeout.
    pub fn recv_timeout(&self, timeout: Duration) -> Result<Option<Batch>, mpsc::RecvTimeoutError> {
        match self.rx.recv_timeout(timeout) {
            Ok(batch) => Ok(Some(batch)),
            Err(mpsc::RecvTimeoutError::Disconnected) => Ok(None),
            Err(timeout) => Err(timeout),
        }
    }

    /// Counts `events` as delivered (true) or lost to an error (false).
    pub fn done(&self, events: u64, delivered: bool) {
        let counter = if delivered {
            &self.stats.delivered
        } else {
            &self.stats.failed
        };
        counter.fetch_add(events, Ordering::Relaxed);
    }

    #[must_use]
    pub fn stats(&self) -> Arc<ConsumerStats> {
        self.stats.clone()
    }
}

/// A consumer that writes every event as a JSON line to `out`, from a
/// thread of its own named `name` (the only one that may block on `out`).
pub struct JsonLines {
    thread: JoinHandle<()>,
    stats: Arc<ConsumerStats>,
}

impl JsonLines {
    pub fn spawn(
        name: &str,
        subscription: Subscription,
        out: impl Write + Send + 'static,
    ) -> std::io::Result<Self> {
        let stats = subscription.stats();
        let thread = thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                let mut out = out;
                let mut lines = Vec::with_capacity(64 * 1024);
                while let Some(batch) = subscription.recv() {
                    lines.clear();
                    for record in batch.iter() {
                        if serde_json::to_writer(&mut lines, record).is_ok() {
                            lines.push(b'\n');
                        }
                    }
                    // Flushed per batch: whoever reads the other end should see
                    // the events now.
                    let written = out.write_all(&lines).and_then(|()| out.flush());
                    subscription.done(batch.len() as u64, written.is_ok());
                }
            })?;
        Ok(Self { thread, stats })
    }

    #[must_use]
    pub fn stats(&self) -> Arc<ConsumerStats> {
        self.stats.clone()
    }

    /// Waits up to `timeout` for the thread to write what is queued and end
    /// (after the fanout is closed); false if it did not (a stalled reader
    /// of `out`: what is queued ends with the process).
    #[must_use]
    pub fn finish(self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while !self.thread.is_finished() {
            if Instant::now() >= deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(5));
        }
        let _ = self.thread.join();
        true
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io,
        net::{IpAddr, Ipv4Addr},
    };

    use super::*;
    use crate::sink::test_writers::Stalled;

    fn batch(first: u64, n: u64) -> Batch {
        (first..first + n)
            .map(|generation| EventRecord::test_drop(generation, IpAddr::V4(Ipv4Addr::LOCALHOST)))
            .collect()
    }

    /// A writer into shared memory.
    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_consumer_that_never_reads_costs_only_its_own_events() {
        const BATCHES: u64 = 100;
        const EVENTS: u64 = 10;
        let fanout = Fanout::default();
        // Subscribed and never read.
        let stuck = fanout.subscribe("stuck", 2);
        // Reads, but its writer never returns.
        let stalled_out = Stalled::default();
        let stalled = JsonLines::spawn(
            "test-stalled",
            fanout.subscribe("stalled", 4),
            stalled_out.clone(),
        )
        .unwrap();
        // Reads and writes: its queue holds everything, so it loses nothing
        // however the threads are scheduled.
        let buffer = Buffer::default();
        let good = JsonLines::spawn(
            "test-good",
            fanout.subscribe("good", BATCHES as usize),
            buffer.clone(),
        )
        .unwrap();

        for i in 0..BATCHES {
            fanout.publish(&batch(i * EVENTS, EVENTS));
        }
        // The summary reads every consumer's losses while two are stuck.
        let lost: Vec<(String, u64)> = fanout
            .consumers()
            .iter()
            .map(|c| (c.name().to_owned(), c.lost()))
            .collect();
        assert_eq!(lost[0], ("stuck".to_owned(), (BATCHES - 2) * EVENTS));
        // Four batches queued, one at most in the writer's hands.
        assert!(
            ((BATCHES - 5) * EVENTS..=(BATCHES - 4) * EVENTS).contains(&lost[1].1),
            "{lost:?}"
        );
        assert_eq!(lost[2], ("good".to_owned(), 0));

        fanout.close();
        let good_stats = good.stats();
        assert!(good.finish(Duration::from_secs(30)));
        assert_eq!(good_stats.delivered(), BATCHES * EVENTS);
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        let generations: Vec<u64> = text
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["generation"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        assert_eq!(generations, (0..BATCHES * EVENTS).collect::<Vec<_>>());

        // The stuck consumer still has its two batches, then the end.
        assert_eq!(stuck.recv().map(|b| b[0].generation), Some(0));
        assert_eq!(stuck.recv().map(|b| b[0].generation), Some(EVENTS));
        assert!(stuck.recv().is_none());

        let stalled_stats = stalled.stats();
        stalled_out.release();
        assert!(stalled.finish(Duration::from_secs(30)));
        assert_eq!(
            stalled_stats.delivered() + stalled_stats.lost(),
            BATCHES * EVENTS
        );
    }

    #[test]
    fn consumers_that_go_away_are_forgotten_and_late_ones_end_at_once() {
        let fanout = Fanout::default();
        let gone = fanout.subscribe("gone", 1);
        let kept = fanout.subscribe("kept", 8);
        drop(gone);
        fanout.publish(&batch(0, 3));
        let names: Vec<String> = fanout
            .consumers()
            .iter()
            .map(|c| c.name().to_owned())
            .collect();
        assert_eq!(names, ["kept"]);
        // What the one that went away got stays in the totals of its name.
        assert_eq!(
            fanout.totals_by_name(),
            [
                NameTotals {
                    name: "kept".into(),
                    delivered: 0,
                    lost: 0
                },
                NameTotals {
                    name: "gone".into(),
                    delivered: 0,
                    lost: 0
                }
            ]
        );
        assert_eq!(kept.recv().map(|b| b.len()), Some(3));
        fanout.close();
        assert!(kept.recv().is_none());
        assert!(fanout.subscribe("late", 1).recv().is_none());
    }
}
