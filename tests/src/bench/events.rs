//! Events: how many events per second the agent's decoder turns into JSON
//! lines before the ring buffer loses any, and the CPU it takes.
//!
//! The kernel side is the real `xdp_inbound` program (attached to a veth of
//! a namespace of its own, see [`attach_in`]) run through
//! `BPF_PROG_TEST_RUN` by one thread pinned to the first CPU, paced to an
//! offered rate in calls of at most a millisecond's worth of packets: every
//! packet comes from a globally blocked address to one of 16 accounts (round
//! robin per call), so every packet is a drop with an event, and the policy's
//! `events_per_second` (1,000,000 per account and reason) lets every one of
//! them through the sampler up to 16 M events/s.
//!
//! The reader is a thread pinned to the second CPU doing what the agent's
//! `events::read` and its stdout consumer do together: wait for the ring
//! buffer to be readable, then drain it with `mmesh_agent::events::drain`
//! (decode, `serde_json`) into a 64 KiB `BufWriter` flushed once per drained
//! batch, here to `/dev/null`. (The agent decodes on the reader and formats
//! JSON on the stdout consumer's thread; the CPU here is both.) The
//! agent waits through tokio's `AsyncFd`
//! (epoll); this thread waits in `poll(2)` on the same fd, because the
//! benchmark crate does not depend on tokio. Its CPU time is read from the
//! thread's CPU clock (`pthread_getcpuclockid`). Both threads run at nice
//! −20 ([`raise_priority`]).
//!
//! Every round climbs a ladder of offered rates, each held for a while; a
//! step counts as lossless if the datapath's `events_lost` did not move and
//! every packet's event was decoded (a step that loses is tried once more).
//! After the first step that loses, one step half-way back. The figure is the
//! decoded rate of the highest lossless step.

use std::{
    fmt::Write as _,
    fs::File,
    io::{BufWriter, Write},
    os::{fd::AsRawFd as _, unix::thread::JoinHandleExt as _},
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use aya::{
    maps::{MapData, RingBuf},
    programs::{TestRun as _, TestRunOptions},
};
use mmesh_agent::{
    compile::{Capacity, compile},
    datapath::Datapath,
    events::{Clock, Names, drain},
    policy::Policy,
};

use super::{
    Options,
    accuracy::{attach_in, cpus, pin_to_cpu, raise_priority, veth_namespace},
    report::{Figure, Goal, Report},
};
use crate::{
    netns::NetNs,
    packets::{ip, udp},
};

const GROUP: &str = "events";

const ACCOUNTS: u32 = 16;

/// The ring buffer: the agent's default (`--event-buffer`).
const RING_BYTES: u32 = 1 << 20;

/// The rate the goal names.
const GOAL_RATE: f64 = 500_000.0;

fn policy_yaml() -> String {
    let mut y = String::from(
        "global:\n  events_per_second: 1000000\n  block:\n    - name: bench-blocked\n      cidrs: [198.51.100.0/24]\naccounts:\n",
    );
    for i in 0..ACCOUNTS {
        let _ = write!(
            y,
            "  - id: tenant-{i}\n    prefixes: [100.64.0.{}]\n",
            i + 1
        );
    }
    y
}

/// The reader thread's loop: `events::read` with `poll(2)` for `AsyncFd`;
/// adds the events written to `decoded` after every drained batch.
fn read(
    mut ring: RingBuf<MapData>,
    names: &Names,
    out: impl Write,
    decoded: &AtomicU64,
    stop: &AtomicBool,
) {
    let clock = Clock::now();
    let mut out = BufWriter::with_capacity(64 * 1024, out);
    let fd = ring.as_raw_fd();
    loop {
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd. A timeout lets the loop see `stop`.
        unsafe { libc::poll(&raw mut pfd, 1, 20) };
        let stopping = stop.load(Ordering::Relaxed);
        let n = drain(&mut ring, names, &clock, &mut out);
        decoded.fetch_add(n, Ordering::Relaxed);
        if stopping {
            return;
        }
    }
}

/// CPU time consumed by a thread so far.
fn thread_cpu(clock: libc::clockid_t) -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec out-pointer; the clock id is a live thread's.
    let rc = unsafe { libc::clock_gettime(clock, &raw mut ts) };
    assert_eq!(rc, 0, "clock_gettime: {}", std::io::Error::last_os_error());
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// What one step of the ladder measured.
#[derive(Clone, Copy, Debug)]
struct Step {
    offered: f64,
    /// Events generated (decoded + lost) per second of generation.
    generated: f64,
    /// Events decoded per second of generation (the reader caught up
    /// within the step's tail, at most a ring buffer's worth).
    decoded: f64,
    /// `events_lost` of the datapath: events the full ring refused.
    lost: u64,
    /// Packets whose event was neither decoded nor lost: held back by the
    /// sampler, or still unread when the wait for the reader gave up.
    missing: u64,
    /// Reader CPU time over the same span, in CPUs.
    cpu: f64,
}

impl Step {
    fn lossless(&self) -> bool {
        self.lost == 0 && self.missing == 0
    }
}

struct Bench {
    /// Dropped (detached) before its namespace is deleted.
    dp: Datapath,
    _ns: NetNs,
    frames: Vec<Vec<u8>>,
    decoded: Arc<AtomicU64>,
    reader_clock: libc::clockid_t,
    generator_cpu: usize,
}

impl Bench {
    /// Offers `rate` events per second for `run_for`, then waits for the
    /// reader to catch up.
    fn step(&mut self, rate: f64, run_for: Duration) -> Step {
        let lost0 = self.dp.totals().expect("totals").events_lost;
        let decoded0 = self.decoded.load(Ordering::Relaxed);
        let cpu0 = thread_cpu(self.reader_clock);
        let prog = super::xdp_inbound(&mut self.dp);
        let frames = &self.frames;
        let cpu = self.generator_cpu;
        let start = Instant::now();
        let (sent, generating) = std::thread::scope(|scope| {
            scope
                .spawn(move || {
                    pin_to_cpu(cpu);
                    raise_priority();
                    let mut sent = 0u64;
                    let mut call = 0usize;
                    // Events owed at `rate` since the last call, at most a
                    // millisecond's worth: after a stall (this machine is
                    // shared) the generator does not catch up in one burst
                    // that no reader could follow; the offered rate then
                    // shows the shortfall.
                    let most = (rate / 1000.0).max(64.0);
                    let mut owed = 0.0f64;
                    let mut last = start;
                    loop {
                        let now = Instant::now();
                        let elapsed = now.duration_since(start);
                        if elapsed >= run_for {
                            break (sent, elapsed);
                        }
                        owed = (owed + rate * now.duration_since(last).as_secs_f64()).min(most);
                        last = now;
                        let batch = owed as u32;
                        if batch == 0 {
                            std::thread::sleep(Duration::from_micros(50));
                            continue;
                        }
                        owed -= f64::from(batch);
                        let opts = TestRunOptions {
                            data_in: Some(&frames[call % frames.len()]),
                            repeat: batch,
                            ..TestRunOptions::default()
                        };
                        prog.test_run(opts).expect("BPF_PROG_TEST_RUN");
                        sent += u64::from(batch);
                        call += 1;
                    }
                })
                .join()
                .expect("event generator")
        });
        let lost = self.dp.totals().expect("totals").events_lost - lost0;
        // Every packet is a drop offered to the sampler; what it let
        // through was either decoded or lost. Wait for the reader to decode
        // what is left in the ring (it cannot be more than the ring holds).
        let deadline = Instant::now() + Duration::from_secs(5);
        let target = decoded0 + sent - lost;
        while self.decoded.load(Ordering::Relaxed) < target && Instant::now() < deadline {
            std::thread::sleep(Duration::from_micros(200));
        }
        let span = start.elapsed();
        let cpu = thread_cpu(self.reader_clock).saturating_sub(cpu0);
        let decoded = self.decoded.load(Ordering::Relaxed) - decoded0;
        let missing = sent.saturating_sub(decoded + lost);
        if missing > 0 {
            eprintln!(
                "bench: events: {sent} packets offered, {decoded} events decoded, {lost} lost, {missing} neither: the sampler held some back or the reader fell behind"
            );
        }
        Step {
            offered: rate,
            generated: (decoded + lost) as f64 / generating.as_secs_f64(),
            decoded: decoded as f64 / generating.as_secs_f64(),
            lost,
            missing,
            cpu: cpu.as_secs_f64() / span.as_secs_f64(),
        }
    }
}

/// The offered rates of a round, and how long each is held.
fn ladder(quick: bool) -> (Vec<f64>, Duration) {
    if quick {
        (vec![GOAL_RATE, 600_000.0], Duration::from_millis(300))
    } else {
        (
            vec![
                250_000.0,
                GOAL_RATE,
                600_000.0,
                750_000.0,
                1_000_000.0,
                1_250_000.0,
                1_500_000.0,
                2_000_000.0,
                2_500_000.0,
                3_000_000.0,
                4_000_000.0,
                5_000_000.0,
                6_000_000.0,
            ],
            Duration::from_millis(1500),
        )
    }
}

/// Loads the datapath with the events policy, attaches it (see
/// [`attach_in`]) and starts the reader thread.
fn start() -> (Bench, std::thread::JoinHandle<()>, StopReader) {
    let capacity = Capacity {
        accounts: 64,
        account_prefixes: 256,
        list_prefixes: 4096,
        counters: 4096,
        event_buffer: RING_BYTES,
        ..Capacity::default()
    };
    let mut dp = Datapath::load(capacity).expect("loading mmesh (run as root)");
    let policy = Policy::parse(&policy_yaml(), "events policy", Path::new("."))
        .expect("the events policy is valid");
    let compiled = std::sync::Arc::new(
        compile(&policy, None, dp.capacity()).expect("the events policy compiles"),
    );
    let names = Names::default();
    names.insert(dp.generation() + 1, compiled.clone());
    dp.apply(compiled).expect("applying the events policy");
    let ring = dp.take_events().expect("the ring buffer");
    let ns = veth_namespace("bench-events");
    attach_in(&ns, &mut dp);
    let frames: Vec<Vec<u8>> = (0..ACCOUNTS)
        .map(|i| {
            udp(
                ip("198.51.100.7"),
                ip(&format!("100.64.0.{}", i + 1)),
                40_000,
                53,
                18,
            )
        })
        .collect();

    let cpus = cpus();
    let reader_cpu = cpus.get(1).copied();
    let decoded = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let sink = File::options()
        .write(true)
        .open("/dev/null")
        .expect("opening /dev/null");
    let thread = {
        let stop = stop.clone();
        let decoded = decoded.clone();
        std::thread::Builder::new()
            .name("bench-events".into())
            .spawn(move || {
                if let Some(cpu) = reader_cpu {
                    pin_to_cpu(cpu);
                }
                raise_priority();
                read(ring, &names, sink, &decoded, &stop);
            })
            .expect("spawning the event reader")
    };
    // Stops the reader also when a step panics.
    let guard = StopReader(stop);
    let mut reader_clock: libc::clockid_t = 0;
    // SAFETY: the pthread of a thread that runs until `stop` is set.
    let rc = unsafe { libc::pthread_getcpuclockid(thread.as_pthread_t(), &raw mut reader_clock) };
    assert_eq!(rc, 0, "pthread_getcpuclockid: {rc}");
    let bench = Bench {
        dp,
        _ns: ns,
        frames,
        decoded,
        reader_clock,
        generator_cpu: cpus[0],
    };
    (bench, thread, guard)
}

/// Runs the group into `report`.
pub fn run(opts: &Options, report: &mut Report) {
    let (ladder, run_for) = ladder(opts.quick);
    let (mut bench, thread, guard) = start();
    for round in 0..opts.rounds {
        climb(&mut bench, &ladder, run_for, report);
        eprintln!("bench: events round {}/{} done", round + 1, opts.rounds);
    }
    drop(guard);
    thread.join().expect("the event reader");
}

/// A step at `rate`, and once more if it lost events: a neighbour's burst
/// on this shared machine can take the reader's CPU away for longer than the
/// ring lasts.
fn attempt(bench: &mut Bench, rate: f64, run_for: Duration) -> Step {
    let mut step = bench.step(rate, run_for);
    if !step.lossless() {
        eprintln!(
            "bench: events: {rate:.0} events/s offered: {} lost, {} missing, trying once more",
            step.lost, step.missing
        );
        step = bench.step(rate, run_for);
    }
    eprintln!(
        "bench: events: offered {:.0}/s, generated {:.0}/s, decoded {:.0}/s, lost {}, missing {}, reader {:.2} CPU, {:.2} µs of reader CPU per event",
        step.offered,
        step.generated,
        step.decoded,
        step.lost,
        step.missing,
        step.cpu,
        step.cpu / step.decoded * 1e6
    );
    step
}

/// One round: the ladder up to the first step that loses events, then one
/// step half-way back.
fn climb(bench: &mut Bench, ladder: &[f64], run_for: Duration, report: &mut Report) {
    let mut best: Option<Step> = None;
    let mut at_goal: Option<Step> = None;
    for &rate in ladder {
        let step = attempt(bench, rate, run_for);
        if (rate - GOAL_RATE).abs() < 1.0 {
            at_goal = Some(step);
        }
        if !step.lossless() {
            if let Some(below) = best {
                let between = attempt(bench, f64::midpoint(below.offered, rate), run_for);
                if between.lossless() {
                    best = Some(between);
                }
            }
            break;
        }
        best = Some(step);
    }
    if best.is_some_and(|b| (b.offered - ladder[ladder.len() - 1]).abs() < 1.0) {
        eprintln!(
            "bench: events: no loss up to the top of the ladder: the figure is a lower bound"
        );
    } else if let Some(b) = best.filter(|b| b.generated < 0.9 * b.offered) {
        eprintln!(
            "bench: events: the best step generated only {:.0} of {:.0} events/s (the generator's CPU was busy)",
            b.generated, b.offered
        );
    }
    let figure = |name: &str, unit: &str, sample: Option<f64>, goal, note: String| Figure {
        group: GROUP.into(),
        name: name.into(),
        unit: unit.into(),
        samples: sample.into_iter().collect(),
        baseline: None,
        reference: None,
        goal,
        note,
    };
    report.add(figure(
        "events decoded per second without loss",
        "events/s",
        best.map(|b| b.decoded),
        Some(Goal::AtLeast(GOAL_RATE)),
        format!(
            "the highest step of the ladder ({:.0}…{:.0} events/s offered, {run_for:?} each) with events_lost unchanged and every event decoded to a JSON line by the agent's decoder on a thread of its own; ring buffer {} KiB (the agent's default), {ACCOUNTS} accounts",
            ladder[0],
            ladder[ladder.len() - 1],
            RING_BYTES / 1024
        ),
    ));
    report.add(figure(
        "reader CPU at that rate",
        "CPUs",
        best.map(|b| b.cpu),
        Some(Goal::AtMost(1.0)),
        "CPU time of the reader thread (user + system) over the step, divided by its wall time"
            .into(),
    ));
    let goal_step = at_goal.filter(Step::lossless);
    report.add(figure(
        "reader CPU at 500,000 events/s",
        "CPUs",
        goal_step.map(|s| s.cpu),
        Some(Goal::AtMost(1.0)),
        "the same, at the step that offers the goal's rate".into(),
    ));
    report.add(figure(
        "reader CPU per event",
        "µs",
        goal_step.map(|s| s.cpu / s.decoded * 1e6),
        None,
        "reader CPU time over events decoded at the 500,000 events/s step: wake-up, decode, JSON, write; 1 / this is the rate one CPU could decode if nothing else limited it".into(),
    ));
}

/// Sets the reader's stop flag when dropped.
struct StopReader(Arc<AtomicBool>);

impl Drop for StopReader {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}
