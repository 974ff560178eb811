//! The control plane's stdout (event lines) and stderr (the log), each
//! written by a thread of its own.
//!
//! With thousands of streams one policy change makes tens of thousands of
//! lines (an event line and a log line for each Delta sent and for each
//! Ack). Written one `write(2)` per line, under the stream's lock that every
//! session waits for, they cost the control plane more than the Deltas do
//! (docs/benchmarks.md, fan-out). Here a line is appended to a buffer and
//! the writer thread, woken only when it sleeps, lets lines gather for a
//! moment ([`LINGER`]) and writes them in one `write(2)`: a line shows a
//! millisecond later, and a burst of thousands costs a few writes and a few
//! wake-ups instead of one of each per line. Lines keep their order, and a
//! line is never split. The buffer is bounded: when the reader of the stream is slower
//! than the control plane, a session waits, as it did on a blocking write.

use std::{
    io::Write,
    sync::{Condvar, LazyLock, Mutex, MutexGuard, PoisonError},
};

/// Bytes buffered at most before a writer waits.
const MAX_PENDING: usize = 16 << 20;
/// How long the writer lets lines gather after the first one.
const LINGER: std::time::Duration = std::time::Duration::from_millis(1);

/// One output stream and its writer thread.
pub struct Sink {
    state: Mutex<State>,
    /// Signalled when there is something to write.
    filled: Condvar,
    /// Signalled when a batch was written.
    drained: Condvar,
    write: fn(&[u8]) -> std::io::Result<()>,
    name: &'static str,
}

#[derive(Default)]
struct State {
    pending: Vec<u8>,
    /// The writer thread was started.
    started: bool,
    /// The writer is writing a batch taken from `pending`.
    writing: bool,
    /// The writer waits for lines: a new one must wake it.
    asleep: bool,
}

/// Standard output: the event lines.
pub static STDOUT: LazyLock<Sink> = LazyLock::new(|| {
    Sink::new("stdout-writer", |batch| {
        let mut out = std::io::stdout().lock();
        out.write_all(batch)?;
        out.flush()
    })
});

/// Standard error: the log.
pub static STDERR: LazyLock<Sink> = LazyLock::new(|| {
    Sink::new("stderr-writer", |batch| {
        std::io::stderr().lock().write_all(batch)
    })
});

impl Sink {
    fn new(name: &'static str, write: fn(&[u8]) -> std::io::Result<()>) -> Self {
        Self {
            state: Mutex::new(State::default()),
            filled: Condvar::new(),
            drained: Condvar::new(),
            write,
            name,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `bytes` (whole lines) to be written.
    pub fn push(&'static self, bytes: &[u8]) {
        let mut state = self.lock();
        if !state.started {
            let spawned = std::thread::Builder::new()
                .name(self.name.into())
                .spawn(move || self.writer());
            if spawned.is_err() {
                // No thread to write for us: write in place, as before.
                drop(state);
                let _ = (self.write)(bytes);
                return;
            }
            state.started = true;
        }
        while state.pending.len() >= MAX_PENDING {
            state = self
                .drained
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
        state.pending.extend_from_slice(bytes);
        let wake = std::mem::take(&mut state.asleep);
        drop(state);
        if wake {
            self.filled.notify_one();
        }
    }

    /// Waits until everything queued so far is written, or `timeout` passed
    /// (a reader that stopped reading must not keep the process from
    /// exiting).
    pub fn flush(&self, timeout: std::time::Duration) {
        let deadline = std::time::Instant::now() + timeout;
        let mut state = self.lock();
        while state.started && (state.writing || !state.pending.is_empty()) {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return;
            }
            state = self
                .drained
                .wait_timeout(state, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    fn writer(&self) {
        let mut batch = Vec::new();
        loop {
            {
                let mut state = self.lock();
                state.writing = false;
                self.drained.notify_all();
                if state.pending.is_empty() {
                    while state.pending.is_empty() {
                        state.asleep = true;
                        state = self
                            .filled
                            .wait(state)
                            .unwrap_or_else(PoisonError::into_inner);
                    }
                    drop(state);
                    std::thread::sleep(LINGER);
                    state = self.lock();
                }
                batch.clear();
                std::mem::swap(&mut batch, &mut state.pending);
                state.writing = true;
                self.drained.notify_all();
            }
            // A closed stream (its reader went away) must not stop serving
            // policy: what cannot be written is dropped.
            let _ = (self.write)(&batch);
            // Do not keep a burst's capacity for ever.
            batch.shrink_to(64 << 10);
        }
    }
}

/// Writes everything queued on stdout and stderr (before the process
/// exits), waiting at most a few seconds for each.
pub fn flush() {
    const AT_MOST: std::time::Duration = std::time::Duration::from_secs(5);
    STDOUT.flush(AT_MOST);
    STDERR.flush(AT_MOST);
}

/// A `tracing_subscriber` writer onto [`STDERR`]: the formatter writes
/// each event whole, in one call.
#[derive(Clone, Copy, Debug, Default)]
pub struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        STDERR.push(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    static WRITTEN: Mutex<Vec<u8>> = Mutex::new(Vec::new());
    static SINK: LazyLock<Sink> = LazyLock::new(|| {
        Sink::new("test-writer", |batch| {
            WRITTEN.lock().expect("written").extend_from_slice(batch);
            Ok(())
        })
    });

    #[test]
    fn lines_from_many_threads_are_written_whole_and_in_each_threads_order() {
        let threads: Vec<_> = (0..4)
            .map(|t| {
                std::thread::spawn(move || {
                    for i in 0..1_000 {
                        SINK.push(format!("{t} {i}\n").as_bytes());
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("a pushing thread");
        }
        SINK.flush(std::time::Duration::from_mins(1));
        let written = String::from_utf8(WRITTEN.lock().expect("written").clone()).expect("text");
        let mut next = [0; 4];
        for line in written.lines() {
            let (t, i) = line.split_once(' ').expect("a whole line");
            let t: usize = t.parse().expect("a thread");
            assert_eq!(i.parse::<i32>().expect("a number"), next[t], "{line}");
            next[t] += 1;
        }
        assert_eq!(next, [1_000; 4], "every line written once");
    }
}
