//! Output that can neither block nor crash the agent.
//!
//! A [`Sink`] hands finished chunks (log lines) to a
//! dedicated writer thread through a bounded queue. The thread alone may
//! block on a full pipe; the agent only ever does a `try_send`, and what does
//! not fit is dropped and counted. Write errors (a closed stderr, a reader
//! that went away) are counted and swallowed: losing output must never stop
//! enforcement, and a panic while printing would detach every program.

use std::{
    io::Write,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
        mpsc::{self, SyncSender, TrySendError},
    },
    thread,
    time::{Duration, Instant},
};

/// What a sink did with what it was given, in items (log lines, events).
#[derive(Debug, Default)]
pub struct SinkStats {
    written: AtomicU64,
    /// Dropped because the queue was full (the writer is stalled or slow).
    dropped: AtomicU64,
    /// Lost to write errors (the other end is closed).
    failed: AtomicU64,
}

impl SinkStats {
    #[must_use]
    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    #[must_use]
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    #[must_use]
    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }

    /// Items that never reached the other end, for whatever reason.
    #[must_use]
    pub fn lost(&self) -> u64 {
        self.dropped() + self.failed()
    }
}

struct Chunk {
    bytes: Vec<u8>,
    items: u64,
    /// Answered once everything queued before this chunk has been handled.
    ack: Option<SyncSender<()>>,
}

/// The sending side: cheap to clone, never blocks.
#[derive(Clone)]
pub struct Sink {
    tx: SyncSender<Chunk>,
    stats: Arc<SinkStats>,
}

impl Sink {
    /// Starts a writer thread named `name` that writes to `out`, behind a
    /// queue of at most `chunks` chunks.
    pub fn spawn(
        name: &str,
        out: impl Write + Send + 'static,
        chunks: usize,
    ) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::sync_channel::<Chunk>(chunks.max(1));
        let stats = Arc::new(SinkStats::default());
        let thread_stats = stats.clone();
        thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                let mut out = out;
                for chunk in rx {
                    if let Some(ack) = chunk.ack {
                        let _ = ack.try_send(());
                        continue;
                    }
                    // Flushed per chunk: a chunk is a whole line or batch, and
                    // whoever reads the other end should see it now.
                    match out.write_all(&chunk.bytes).and_then(|()| out.flush()) {
                        Ok(()) => thread_stats
                            .written
                            .fetch_add(chunk.items, Ordering::Relaxed),
                        Err(_) => thread_stats
                            .failed
                            .fetch_add(chunk.items, Ordering::Relaxed),
                    };
                }
            })?;
        Ok(Self { tx, stats })
    }

    /// Queues `bytes`, which hold `items` items; false if they were dropped
    /// (and counted).
    #[expect(
        clippy::must_use_candidate,
        reason = "a drop is counted by the sink; most callers have nothing more to do"
    )]
    pub fn send(&self, bytes: Vec<u8>, items: u64) -> bool {
        match self.tx.try_send(Chunk {
            bytes,
            items,
            ack: None,
        }) {
            Ok(()) => true,
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.stats.dropped.fetch_add(items, Ordering::Relaxed);
                false
            }
        }
    }

    #[must_use]
    pub fn stats(&self) -> Arc<SinkStats> {
        self.stats.clone()
    }

    /// Waits up to `timeout` until everything queued so far has been
    /// written (or failed); false if the writer did not get there in time (a
    /// stalled reader: what is queued stays behind and ends with the process).
    #[must_use]
    pub fn flush(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let (ack_tx, ack) = mpsc::sync_channel(1);
        let mut marker = Chunk {
            bytes: Vec::new(),
            items: 0,
            ack: Some(ack_tx),
        };
        loop {
            match self.tx.try_send(marker) {
                Ok(()) => break,
                Err(TrySendError::Disconnected(_)) => return false,
                Err(TrySendError::Full(back)) => {
                    if Instant::now() >= deadline {
                        return false;
                    }
                    marker = back;
                    thread::sleep(Duration::from_millis(5));
                }
            }
        }
        ack.recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .is_ok()
    }
}

/// A [`Sink`] as a `tracing` writer: every formatted log line becomes one
/// chunk. Never fails and never blocks.
#[derive(Clone)]
pub struct LogWriter(pub Sink);

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.send(buf.to_vec(), 1);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = Self;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// Control characters in `s` escaped (`\n`, `\u{1b}`, …), so that a value
/// taken from a file or the network cannot forge log lines or drive a
/// terminal. Everything else is left as it is.
#[must_use]
pub fn escape_controls(s: &str) -> std::borrow::Cow<'_, str> {
    if s.chars().any(char::is_control) {
        let mut out = String::with_capacity(s.len() + 8);
        for c in s.chars() {
            if c.is_control() {
                out.extend(c.escape_debug());
            } else {
                out.push(c);
            }
        }
        std::borrow::Cow::Owned(out)
    } else {
        std::borrow::Cow::Borrowed(s)
    }
}

/// Writers that misbehave like the other end of a pipe, for the tests of
/// the output paths (here and in `fanout`).
#[cfg(test)]
pub(crate) mod test_writers {
    use std::{
        io::{self, Write},
        sync::{Arc, Condvar, Mutex},
    };

    /// A writer that blocks until released, like a pipe nobody reads.
    #[derive(Clone, Default)]
    pub(crate) struct Stalled(Arc<(Mutex<bool>, Condvar)>);

    impl Stalled {
        pub(crate) fn release(&self) {
            *self.0.0.lock().unwrap() = true;
            self.0.1.notify_all();
        }
    }

    impl Write for Stalled {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let mut open = self.0.0.lock().unwrap();
            while !*open {
                open = self.0.1.wait(open).unwrap();
            }
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io;

    use super::{test_writers::Stalled, *};

    struct Closed;

    impl Write for Closed {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::Error::from(io::ErrorKind::BrokenPipe))
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stalled_writer_never_blocks_the_sender_and_losses_are_counted() {
        let stalled = Stalled::default();
        let sink = Sink::spawn("test-stalled", stalled.clone(), 4).unwrap();
        let mut accepted = 0;
        for _ in 0..1000 {
            if sink.send(b"event\n".to_vec(), 3) {
                accepted += 1;
            }
        }
        // One chunk may sit in the writer's hands, four in the queue.
        assert!((4..=5).contains(&accepted), "accepted {accepted}");
        assert_eq!(sink.stats().dropped(), (1000 - accepted) * 3);
        assert!(
            !sink.flush(Duration::from_millis(1)),
            "a stalled writer cannot have flushed"
        );
        stalled.release();
        assert!(sink.flush(Duration::from_secs(30)));
        assert_eq!(sink.stats().written(), accepted * 3);
    }

    #[test]
    fn write_errors_are_counted_not_raised() {
        let sink = Sink::spawn("test-closed", Closed, 16).unwrap();
        let stats = sink.stats();
        for _ in 0..10 {
            sink.send(b"line\n".to_vec(), 1);
        }
        assert!(sink.flush(Duration::from_secs(30)));
        assert_eq!(stats.failed() + stats.dropped(), 10);
        assert_eq!(stats.written(), 0);
    }

    #[test]
    fn controls_are_escaped() {
        assert_eq!(escape_controls("r1"), "r1");
        assert_eq!(
            escape_controls("r1\nINFO \"forged\"\u{1b}[2J"),
            "r1\\nINFO \"forged\"\\u{1b}[2J"
        );
    }
}
