//! `mmesh-agent run`: load, apply, attach, report, reload, detach.
//!
//! Threads and tasks, so that nothing slow can freeze the rest:
//! - the async loop answers signals and prints the summary; it never reads
//!   a file, compiles a policy or writes to a pipe itself;
//! - the *enforcer* thread alone changes the datapath: policy reloads (read,
//!   validate, compile off the lock, then apply) and interface re-attachment,
//!   in the order they were asked for, coalesced;
//! - the link watcher thread wakes the enforcer when an interface appears
//!   or disappears (rtnetlink), and every summary tick checks again;
//! - the event reader decodes each event once and publishes it to a
//!   [`Fanout`]: every consumer (JSON lines on stdout today) has its own
//!   bounded queue and its own thread, and alone loses what it cannot keep
//!   up with; log lines leave through a [`Sink`](crate::sink::Sink), a bounded queue in front
//!   of a writer thread that alone may block on a stalled pipe.

use std::{
    fmt::Write as _,
    path::PathBuf,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use mmesh_common::{Direction, Reason, Verdict, maps::Counter};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::oneshot,
    time::MissedTickBehavior,
};

use crate::{
    compile::{Capacity, Compiled, compile, compile_adopting},
    counters::CounterReader,
    datapath::{
        Datapath, Totals,
        error::is_errno,
        pin::{Pins, build_identity},
    },
    events::{self, Names},
    fanout::Fanout,
    hook::ReceiveHook,
    interface::{self, InterfaceError, InterfaceSpec, Role},
    memory,
    netlink::LinkWatch,
    policy::{Policy, ReadLimits, Removal},
    sink::{SinkStats, escape_controls},
};

/// Options of `mmesh-agent run`.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub policy: Option<PathBuf>,
    pub interfaces: Vec<InterfaceSpec>,
    pub receive_hook: ReceiveHook,
    pub capacity: Capacity,
    /// How policy files are read (size, counts, settling).
    pub limits: ReadLimits,
    pub summary_interval: Duration,
    /// The bpffs directory the datapath is pinned in, made ready by
    /// `datapath::pin::prepare`; `None`: ephemeral, everything detached at
    /// exit.
    pub pins: Option<PathBuf>,
}

/// Where the agent's output goes.
#[derive(Clone)]
pub struct Outputs {
    /// Decoded events, for every consumer that subscribes (JSON lines on
    /// stdout first).
    pub events: Fanout,
    /// What happened to log lines (stderr), for the summary.
    pub logs: Arc<SinkStats>,
}

/// Reads and validates the policy file, or the embedded default.
pub fn load_policy(
    path: Option<&PathBuf>,
    limits: &ReadLimits,
) -> Result<Policy, crate::policy::PolicyError> {
    match path {
        Some(p) => Policy::from_file_with(p, limits),
        None => Policy::embedded_default(),
    }
}

/// Compiles `policy` against the policy in force (reusing what did not
/// change).
fn compile_for(
    active: Option<&Compiled>,
    capacity: &Capacity,
    policy: &Policy,
) -> anyhow::Result<Arc<Compiled>> {
    Ok(Arc::new(compile(policy, active, capacity)?))
}

fn describe(policy: &Policy, compiled: &Compiled) -> String {
    let c = compiled.counts();
    format!(
        "{} (version {}): {} accounts, {} account prefixes, {} list prefixes",
        policy.source,
        escape_controls(policy.version.as_deref().unwrap_or("none")),
        policy.accounts.len(),
        c.account_prefixes_v4 + c.account_prefixes_v6,
        c.list_prefixes_v4 + c.list_prefixes_v6,
    )
}

/// What was loaded and attached at start.
struct Started {
    dp: Datapath,
    names: Names,
    interfaces: Vec<InterfaceSpec>,
    policy: Policy,
}

/// Everything before the loop: blocking work (files, the verifier, map
/// writes), run off the async threads so that signals are watched meanwhile.
fn start(opts: &RunOptions) -> anyhow::Result<Started> {
    let policy = load_policy(opts.policy.as_ref(), &opts.limits)?;
    let interfaces = if opts.interfaces.is_empty() {
        let name = interface::default_route()?;
        tracing::info!(interface = %name, "no --interface given: attaching to the default-route interface as uplink");
        vec![InterfaceSpec {
            name,
            role: Role::Uplink,
        }]
    } else {
        opts.interfaces.clone()
    };
    // Refuse unusable interfaces before loading anything.
    for spec in &interfaces {
        interface::check(&spec.name)?;
    }
    // Capacities beyond the machine are refused with the option to lower,
    // not with a bare ENOMEM from deep inside map creation.
    let cpus = aya::util::nr_cpus().map_or(1, |n| n as u64);
    if let Some(available) = memory::available() {
        let upfront = memory::check(&opts.capacity, cpus, available)?;
        tracing::debug!(
            mib = upfront >> 20,
            "kernel memory the maps take when created"
        );
    }
    let loaded = match &opts.pins {
        Some(dir) => Pins::open(dir, opts.capacity.accounts + 1)
            .and_then(|pins| Datapath::load_pinned(opts.capacity, pins)),
        None => Datapath::load(opts.capacity),
    };
    let mut dp = loaded.map_err(|err| {
        if is_errno(&err, libc::ENOMEM) {
            anyhow::anyhow!(
                "{err}: the kernel refused memory for the maps; lower the largest --max-* option (`mmesh-agent policy show` prints what the maps hold)"
            )
        } else {
            err.into()
        }
    })?;
    let compiled = match dp.pins() {
        Some(pins) if pins.adopted().is_some() => {
            let held = pins.held_slots()?;
            let (was, now) = (pins.adopted().unwrap_or_default(), build_identity());
            if was != now {
                tracing::info!(
                    "upgrade: the pinned programs (build {was:016x}) are replaced in place by this agent's (build {now:016x}); the maps are kept unless logged as recreated"
                );
            }
            tracing::info!(
                dir = %pins.dir().display(),
                generation = dp.generation(),
                accounts = held.len(),
                "adopting the pinned datapath: it keeps enforcing its policy until this one is applied"
            );
            Arc::new(compile_adopting(&policy, &held, dp.capacity())?)
        }
        _ => compile_for(dp.active().map(AsRef::as_ref), dp.capacity(), &policy)?,
    };
    let summary = describe(&policy, &compiled);
    let names = Names::default();
    // Named before the flip, so that the first events already find them.
    names.insert(dp.generation() + 1, compiled.clone());
    let generation = dp.apply(compiled).context("applying the policy")?;
    tracing::info!(generation, "policy {summary}");
    for spec in &interfaces {
        let a = dp.attach(spec, opts.receive_hook)?;
        let what = if a.adopted {
            "adopted (programs replaced in place)"
        } else {
            "attached"
        };
        tracing::info!(interface = %a.name, ifindex = a.ifindex, role = %a.role, receive = %a.receive, driver = %a.driver, tc = a.tc_mode, "{what}");
    }
    // After the links have the new programs: on an upgrade that recreated
    // maps, the programs replaced there still read the old half of the maps
    // they share with the new ones until then.
    dp.sync_standby()
        .context("writing the standby copy of the policy")?;
    for pin in dp.prune_links() {
        tracing::info!(
            pin,
            "detached a pinned link of an interface this agent is not told to use"
        );
    }
    if let Some(pins) = dp.pins() {
        tracing::info!(
            dir = %pins.dir().display(),
            generation = dp.generation(),
            "{}, policy in force; pinned: enforcement continues if the agent stops",
            if pins.adopted().is_some() {
                "adopted"
            } else {
                "pins made"
            }
        );
    }
    Ok(Started {
        dp,
        names,
        interfaces,
        policy,
    })
}

/// The datapath, shared between the enforcer (which changes it) and the
/// summary (which reads the attachment list when the enforcer is not
/// writing; counters it reads through handles of its own).
type Shared = Arc<Mutex<Datapath>>;

fn lock(dp: &Shared) -> MutexGuard<'_, Datapath> {
    // A panic while holding the lock would already have ended the agent
    // (panic = abort is not set, but no code under the lock panics by
    // design); the datapath itself stays consistent through its own
    // generation flip, so a poisoned lock is still usable.
    dp.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What the enforcer is asked to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Command {
    /// Re-read the policy file and apply it (SIGHUP).
    Reload,
    /// Bring the attachments in line with the configured interfaces.
    Reconcile,
    Stop,
}

/// Counters of the interfaces, for the summary.
#[derive(Debug, Default)]
struct LinkStats {
    /// Attached interfaces that disappeared.
    lost: AtomicU64,
    /// Re-attachments to an interface that came back.
    reattached: AtomicU64,
}

struct Enforcer {
    dp: Shared,
    names: Names,
    policy: Option<PathBuf>,
    limits: ReadLimits,
    /// The policy in force, to tell what a new one takes away.
    running: Policy,
    interfaces: Vec<InterfaceSpec>,
    receive_hook: ReceiveHook,
    links: Arc<LinkStats>,
    /// Per interface, the last attach error logged (logged again only when
    /// it changes, not at every tick).
    last_error: std::collections::HashMap<String, String>,
}

impl Enforcer {
    /// Starts the enforcer thread; returns where to send it commands and
    /// what resolves when it has stopped.
    fn spawn(self) -> anyhow::Result<(mpsc::Sender<Command>, oneshot::Receiver<()>)> {
        let (commands, rx) = mpsc::channel::<Command>();
        let (done_tx, done) = oneshot::channel::<()>();
        thread::Builder::new()
            .name("mmesh-enforcer".into())
            .spawn(move || {
                self.run(&rx);
                let _ = done_tx.send(());
            })
            .context("starting the enforcer thread")?;
        Ok((commands, done))
    }

    /// Runs commands until `Stop` or until every sender is gone. Commands
    /// that queued up while one ran are coalesced: one reload and one
    /// reconciliation stand for any number of requests.
    fn run(mut self, rx: &mpsc::Receiver<Command>) {
        while let Ok(first) = rx.recv() {
            let mut pending = vec![first];
            pending.extend(rx.try_iter());
            if pending.contains(&Command::Stop) {
                return;
            }
            if pending.contains(&Command::Reload) {
                self.reload();
            }
            if pending.contains(&Command::Reconcile) {
                self.reconcile();
            }
        }
    }

    fn reload(&mut self) {
        let Some(path) = &self.policy else {
            tracing::info!("SIGHUP: running the embedded default policy, nothing to reload");
            return;
        };
        let (active, capacity) = {
            let dp = lock(&self.dp);
            (dp.active().cloned(), *dp.capacity())
        };
        // Read, validate and compile without the lock: the summary goes on.
        let prepared = Policy::from_file_with(path, &self.limits)
            .map_err(anyhow::Error::from)
            .and_then(|policy| {
                let compiled = compile_for(active.as_deref(), &capacity, &policy)?;
                Ok((policy, compiled))
            });
        let result = prepared.and_then(|(policy, compiled)| {
            let summary = describe(&policy, &compiled);
            let removal = Removal::between(&self.running, &policy);
            if removal.removes_most() {
                tracing::warn!(
                    "SIGHUP: the new policy {removal}; applying it, but if that is not intended, restore the file (replace policy files by rename, never write them in place)"
                );
            }
            let mut dp = lock(&self.dp);
            self.names.insert(dp.generation() + 1, compiled.clone());
            let generation = dp.apply(compiled)?;
            if let Err(err) = dp.sync_standby() {
                // In force already; the standby half is repaired next time.
                tracing::warn!(%err, "could not bring the standby copy of the policy up to date");
            }
            self.running = policy;
            Ok((generation, summary))
        });
        match result {
            Ok((generation, summary)) => {
                tracing::info!(generation, "SIGHUP: policy reloaded: {summary}");
            }
            Err(err) => tracing::error!(
                generation = lock(&self.dp).generation(),
                "SIGHUP: policy rejected, the running policy stays in force: {}",
                escape_controls(&format!("{err:#}"))
            ),
        }
    }

    /// Attaches every configured interface that exists and is not attached
    /// (it came back, or was created again under the same name), and lets go
    /// of attachments whose interface is gone.
    fn reconcile(&mut self) {
        let mut dp = lock(&self.dp);
        for spec in &self.interfaces {
            let attached = dp
                .attachments()
                .iter()
                .find(|a| a.name == spec.name)
                .map(|a| a.ifindex);
            let now = interface::describe(&spec.name);
            match (&now, attached) {
                (Ok(link), Some(ifindex)) if link.index == ifindex => {
                    self.last_error.remove(&spec.name);
                    continue;
                }
                (Err(InterfaceError::Unknown(_)), None) => continue,
                (Err(err @ InterfaceError::Unreadable { .. }), Some(_)) => {
                    // Fail closed: a failed query says nothing about the
                    // interface, so what is attached stays attached.
                    let text = err.to_string();
                    if self.last_error.get(&spec.name) != Some(&text) {
                        tracing::warn!(interface = %spec.name, "{text}; keeping the attachment");
                        self.last_error.insert(spec.name.clone(), text);
                    }
                    continue;
                }
                (_, Some(ifindex)) => {
                    dp.detach(&spec.name);
                    self.links.lost.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        interface = %spec.name,
                        ifindex,
                        "interface disappeared: nothing is enforced on it until it comes back"
                    );
                }
                (_, None) => {}
            }
            let failure = match now {
                Err(InterfaceError::Unknown(_)) => continue,
                Err(err) => err.to_string(),
                Ok(_) => match dp.attach(spec, self.receive_hook) {
                    Ok(a) => {
                        self.last_error.remove(&spec.name);
                        self.links.reattached.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(interface = %a.name, ifindex = a.ifindex, role = %a.role, receive = %a.receive, driver = %a.driver, tc = a.tc_mode, "interface is back: re-attached");
                        continue;
                    }
                    Err(err) => err.to_string(),
                },
            };
            if self.last_error.get(&spec.name) != Some(&failure) {
                tracing::error!(interface = %spec.name, "cannot attach: {failure}; trying again when the interface changes");
                self.last_error.insert(spec.name.clone(), failure);
            }
        }
    }
}

/// Runs until SIGINT or SIGTERM. Errors before the datapath is attached are
/// returned (and nothing stays attached); afterwards the agent keeps going.
pub async fn run(opts: RunOptions, out: Outputs) -> anyhow::Result<()> {
    // Signals first: a SIGHUP during a long start-up is a reload after it,
    // not the end of the agent.
    let mut hangup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut terminate =
        signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;

    let start_opts = opts.clone();
    let startup = tokio::task::spawn_blocking(move || start(&start_opts));
    let Started {
        mut dp,
        names,
        interfaces,
        policy,
    } = tokio::select! {
        started = startup => started.context("the start-up task")??,
        _ = interrupt.recv() => {
            tracing::info!("SIGINT during start-up: stopping");
            return Ok(());
        }
        _ = terminate.recv() => {
            tracing::info!("SIGTERM during start-up: stopping");
            return Ok(());
        }
    };

    let ring = dp
        .take_events()
        .context("the event ring buffer was already taken")?;
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let reader_names = names.clone();
    let fanout = out.events.clone();
    let reader = tokio::spawn(async move {
        events::read(ring, reader_names, &fanout, async {
            let _ = stop_rx.await;
        })
        .await
    });

    let mut summary = Summary::start(&dp, &interfaces)?;
    let dp: Shared = Arc::new(Mutex::new(dp));
    let links = Arc::new(LinkStats::default());
    let (commands, enforcer_done) = Enforcer {
        dp: dp.clone(),
        names,
        policy: opts.policy.clone(),
        limits: opts.limits.clone(),
        running: policy,
        interfaces: interfaces.clone(),
        receive_hook: opts.receive_hook,
        links: links.clone(),
        last_error: std::collections::HashMap::new(),
    }
    .spawn()?;
    watch_links(commands.clone());

    let mut ticker = tokio::time::interval(opts.summary_interval);
    // After a pause (SIGSTOP, a starved machine) one summary at once and the
    // next a whole interval later, not a burst of the missed ones.
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    ticker.tick().await;
    tracing::info!("running; SIGHUP reloads the policy, SIGINT or SIGTERM stops");
    loop {
        tokio::select! {
            _ = hangup.recv() => { let _ = commands.send(Command::Reload); }
            _ = interrupt.recv() => { tracing::info!("SIGINT: stopping"); break; }
            _ = terminate.recv() => { tracing::info!("SIGTERM: stopping"); break; }
            _ = ticker.tick() => {
                let _ = commands.send(Command::Reconcile);
                summary.tick(&dp, &out, &links, &interfaces);
            }
        }
    }
    let _ = stop_tx.send(());
    let decoded = reader.await.context("event reader task")??;
    let _ = commands.send(Command::Stop);
    // A reload in progress finishes first (it is all-or-nothing); a very
    // long one is not waited for: the process ends (a pinned datapath keeps
    // enforcing the policy in force; the links of an ephemeral one end with
    // the process).
    if tokio::time::timeout(Duration::from_secs(10), enforcer_done)
        .await
        .is_err()
    {
        tracing::warn!(
            "a policy reload is still running after 10 s; exiting without waiting for it"
        );
        return Ok(());
    }
    let dp = lock(&dp);
    let totals = dp.totals()?;
    let attached: Vec<String> = dp
        .attachments()
        .iter()
        .map(|a| format!("{} ({}, receive {})", a.name, a.role, a.receive))
        .collect();
    let pinned = dp.pins().map(|p| p.dir().to_owned());
    let generation = dp.generation();
    drop(dp);
    let totals = summarize(&Totals::default(), &totals, Duration::ZERO);
    tracing::info!(
        events = decoded,
        "{}; totals: {totals}",
        stopped(&attached, pinned.as_deref(), generation)
    );
    Ok(())
}

/// What stays when the agent stops: nothing (ephemeral), or the pinned
/// datapath, and how to remove it.
fn stopped(attached: &[String], pinned: Option<&std::path::Path>, generation: u64) -> String {
    if let Some(dir) = pinned {
        format!(
            "stopped; enforcement stays: {} keep the policy of generation {generation}, pinned in {dir}; `mmesh-agent detach --bpffs {dir}` removes it",
            if attached.is_empty() {
                "no interface".to_owned()
            } else {
                attached.join(", ")
            },
            dir = dir.display()
        )
    } else {
        format!("detached from {}", attached.join(", "))
    }
}

/// Starts the thread that wakes the enforcer on every link change. Without
/// it (no rtnetlink socket), the summary tick still reconciles.
fn watch_links(commands: mpsc::Sender<Command>) {
    let watch = match LinkWatch::open() {
        Ok(w) => w,
        Err(err) => {
            tracing::warn!(%err, "cannot watch interfaces over rtnetlink; interfaces that come back are re-attached at the next summary tick");
            return;
        }
    };
    let spawned = thread::Builder::new()
        .name("mmesh-links".into())
        .spawn(move || {
            let mut watch = watch;
            loop {
                match watch.wait() {
                    Ok(_) => {
                        if commands.send(Command::Reconcile).is_err() {
                            return;
                        }
                    }
                    Err(err) => {
                        tracing::warn!(%err, "reading interface changes failed; the summary tick still checks them");
                        return;
                    }
                }
            }
        });
    if let Err(err) = spawned {
        tracing::warn!(%err, "cannot start the interface watcher");
    }
}

/// The last reading the summary line compares with.
struct Summary {
    /// Its own handles to the counter maps: reading them never waits for
    /// the datapath's lock, which the enforcer holds while it applies a
    /// policy.
    counters: CounterReader,
    totals: Totals,
    at: Instant,
    losses: Losses,
    /// The attachments as last seen.
    attached: String,
}

impl Summary {
    /// The first reading, with handles of its own to the counter maps.
    fn start(dp: &Datapath, interfaces: &[InterfaceSpec]) -> anyhow::Result<Self> {
        let (totals, stats) = dp
            .counter_fds()
            .context("duplicating the counter maps' fds")?;
        let counters = CounterReader::from_fds(totals, stats)?;
        Ok(Self {
            totals: counters.totals()?,
            counters,
            at: Instant::now(),
            losses: Losses::default(),
            attached: attached_list(dp, interfaces),
        })
    }

    /// Logs one summary line. What is attached belongs to the datapath:
    /// while the enforcer is applying a policy, the line repeats the list as
    /// last seen rather than wait.
    fn tick(
        &mut self,
        dp: &Shared,
        out: &Outputs,
        links: &LinkStats,
        interfaces: &[InterfaceSpec],
    ) {
        let now = match self.counters.totals() {
            Ok(now) => now,
            Err(err) => {
                tracing::warn!(%err, "reading counters");
                return;
            }
        };
        let at = Instant::now();
        let losses = Losses::read(out, links);
        if let Ok(dp) = dp.try_lock() {
            self.attached = attached_list(&dp, interfaces);
        }
        // Rates over the time that really passed (a stopped or starved
        // agent sees longer intervals than it asked for).
        tracing::info!(
            "{}{}{}",
            summarize(&self.totals, &now, at - self.at),
            losses.since(&self.losses),
            self.attached,
        );
        self.totals = now;
        self.at = at;
        self.losses = losses;
    }
}

/// Output lost so far, and interface changes, for the summary.
#[derive(Clone, Debug, Default)]
struct Losses {
    /// Events lost by each consumer, by name.
    events: Vec<(String, u64)>,
    logs: u64,
    links_lost: u64,
    reattached: u64,
}

impl Losses {
    fn read(out: &Outputs, links: &LinkStats) -> Self {
        Self {
            events: out
                .events
                .consumers()
                .iter()
                .map(|c| (c.name().to_owned(), c.lost()))
                .collect(),
            logs: out.logs.lost(),
            links_lost: links.lost.load(Ordering::Relaxed),
            reattached: links.reattached.load(Ordering::Relaxed),
        }
    }

    fn since(&self, before: &Self) -> String {
        let mut s = String::new();
        // Per consumer: a consumer subscribed since the last line counts
        // from zero.
        let events: Vec<String> = self
            .events
            .iter()
            .filter_map(|(name, lost)| {
                let was = before
                    .events
                    .iter()
                    .find(|(n, _)| n == name)
                    .map_or(0, |&(_, l)| l);
                (*lost > was).then(|| format!("{name} {}", lost - was))
            })
            .collect();
        if !events.is_empty() {
            let _ = write!(
                s,
                "; events lost to a slow or closed consumer: {}",
                events.join(", ")
            );
        }
        let logs = self.logs - before.logs;
        if logs > 0 {
            let _ = write!(s, "; log lines lost to a slow or closed stderr: {logs}");
        }
        let lost = self.links_lost - before.links_lost;
        if lost > 0 {
            let _ = write!(s, "; interfaces lost: {lost}");
        }
        let back = self.reattached - before.reattached;
        if back > 0 {
            let _ = write!(s, "; interfaces re-attached: {back}");
        }
        s
    }
}

/// `; attached: a0 (uplink, receive xdp), b0 (workload, receive tc);
/// missing: c0`.
fn attached_list(dp: &Datapath, interfaces: &[InterfaceSpec]) -> String {
    let attached: Vec<String> = dp
        .attachments()
        .iter()
        .map(|a| format!("{} ({}, receive {})", a.name, a.role, a.receive))
        .collect();
    let missing: Vec<&str> = interfaces
        .iter()
        .filter(|s| !dp.attachments().iter().any(|a| a.name == s.name))
        .map(|s| s.name.as_str())
        .collect();
    let mut line = format!(
        "; attached: {}",
        if attached.is_empty() {
            "none".to_owned()
        } else {
            attached.join(", ")
        }
    );
    if !missing.is_empty() {
        let _ = write!(line, "; missing: {}", missing.join(", "));
    }
    line
}

/// One line: what happened between two readings of the totals.
#[must_use]
pub fn summarize(before: &Totals, after: &Totals, interval: Duration) -> String {
    let delta = |key: &(Reason, Verdict, Direction)| -> Counter {
        let a = after.counters.get(key).copied().unwrap_or_default();
        let b = before.counters.get(key).copied().unwrap_or_default();
        Counter {
            packets: a.packets.saturating_sub(b.packets),
            bytes: a.bytes.saturating_sub(b.bytes),
        }
    };
    let mut seen = Counter::default();
    let mut dropped = Vec::new();
    let mut monitored = Vec::new();
    for reason in Reason::ALL {
        let mut by_verdict = [0u64; Verdict::COUNT];
        for verdict in Verdict::ALL {
            for direction in Direction::ALL {
                let c = delta(&(reason, verdict, direction));
                seen.packets += c.packets;
                seen.bytes += c.bytes;
                by_verdict[verdict as usize] += c.packets;
            }
        }
        if by_verdict[Verdict::Drop as usize] > 0 {
            dropped.push(format!(
                "{} {}",
                reason.name(),
                by_verdict[Verdict::Drop as usize]
            ));
        }
        if by_verdict[Verdict::Monitor as usize] > 0 {
            monitored.push(format!(
                "{} {}",
                reason.name(),
                by_verdict[Verdict::Monitor as usize]
            ));
        }
    }
    let joined = |v: &[String]| {
        if v.is_empty() {
            "none".to_owned()
        } else {
            v.join(", ")
        }
    };
    let rate = if interval.is_zero() {
        String::new()
    } else {
        format!(" ({:.0} pps)", seen.packets as f64 / interval.as_secs_f64())
    };
    let mut line = format!(
        "seen {} packets{rate}, {} bytes; dropped: {}; monitored: {}",
        seen.packets,
        seen.bytes,
        joined(&dropped),
        joined(&monitored)
    );
    let lost = after.events_lost.saturating_sub(before.events_lost);
    if lost > 0 {
        let _ = write!(line, "; events lost to a full ring buffer: {lost}");
    }
    let full = after.counters_full.saturating_sub(before.counters_full);
    if full > 0 {
        let _ = write!(
            line,
            "; packets not counted per account (--max-counters full): {full}"
        );
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_counts_deltas_by_reason() {
        let mut before = Totals::default();
        before.counters.insert(
            (Reason::Pass, Verdict::Pass, Direction::Inbound),
            Counter {
                packets: 10,
                bytes: 1000,
            },
        );
        let mut after = before.clone();
        after.counters.insert(
            (Reason::Pass, Verdict::Pass, Direction::Inbound),
            Counter {
                packets: 15,
                bytes: 1500,
            },
        );
        after.counters.insert(
            (Reason::GlobalBlock, Verdict::Drop, Direction::Outbound),
            Counter {
                packets: 3,
                bytes: 300,
            },
        );
        after.counters.insert(
            (Reason::RatePps, Verdict::Monitor, Direction::Inbound),
            Counter {
                packets: 2,
                bytes: 200,
            },
        );
        after.events_lost = 4;
        let line = summarize(&before, &after, Duration::from_secs(1));
        assert_eq!(
            line,
            "seen 10 packets (10 pps), 1000 bytes; dropped: global_block 3; monitored: rate_pps 2; events lost to a full ring buffer: 4"
        );
    }
}
