//! `mmesh-agent run`: load, apply, attach, report, reload, detach.
//!
//! Threads and tasks, so that nothing slow can freeze the rest:
//! - the async loop answers signals and prints the summary; it never reads
//!   a file, compiles a policy or writes to a pipe itself;
//! - the *enforcer* thread alone changes the datapath: policy reloads (read,
//!   validate, compile off the lock, then apply) and interface re-attachment,
//!   in the order they were asked for, coalesced;
//! - the policy watcher thread ([`crate::watch`]) asks the enforcer for a
//!   reload when the policy's files change, as SIGHUP does;
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
    admin,
    compile::{Capacity, CompileError, Compiled, compile, compile_adopting},
    control::{
        client::{self, Client, HostFacts, StatusFn},
        in_force::InForce,
        proto, reports,
    },
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
    metrics::{self, Health},
    netlink::LinkWatch,
    policy::{Policy, ReadLimits, Removal, Source},
    sink::{SinkStats, escape_controls},
    watch,
};

/// Options of `mmesh-agent run`.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// `--policy FILE` or `--policy-dir DIR`; `None`: the embedded default.
    pub policy: Option<Source>,
    /// Whether changes of the policy's files are applied (else SIGHUP only).
    pub watch: bool,
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
    /// The control plane to take policy from, if any.
    pub control: Option<client::Options>,
    /// Where `/metrics`, `/healthz` and `/readyz` are served (`None`:
    /// `--no-metrics`).
    pub metrics: Option<std::net::SocketAddr>,
    /// Accounts in the top-offender metric (`--metrics-top-accounts`).
    pub top_accounts: usize,
    /// The admin socket (`None`: `--no-admin-socket`).
    pub admin: Option<PathBuf>,
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

/// Reads and validates the policy file or directory, or the embedded
/// default.
pub fn load_policy(
    source: Option<&Source>,
    limits: &ReadLimits,
) -> Result<Policy, crate::policy::PolicyError> {
    match source {
        Some(source) => source.read(limits),
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
    /// The control-plane policy in force: the last-known-good one.
    held: Option<InForce>,
}

/// The policy to start with: with a control plane, its last-known-good
/// policy when one is stored and valid; else the file, or the embedded
/// default.
fn first_policy(opts: &RunOptions) -> anyhow::Result<(Policy, Option<InForce>)> {
    if let Some(store) = opts.control.as_ref().and_then(|c| c.store.as_ref()) {
        match store.load(opts.limits.max_bytes) {
            Ok(Some(stored)) => match last_known_good(stored, &opts.limits) {
                Ok(in_force) => {
                    tracing::info!(
                        version = %escape_controls(&in_force.held.version),
                        path = %store.path().display(),
                        "starting with the last-known-good policy from the control plane, until it answers"
                    );
                    return Ok(((*in_force.policy).clone(), Some(in_force)));
                }
                Err(err) => tracing::warn!(
                    path = %store.path().display(),
                    "the last-known-good policy is invalid; starting without it: {}",
                    escape_controls(&err.to_string())
                ),
            },
            Ok(None) => tracing::info!(
                path = %store.path().display(),
                "no last-known-good policy stored yet"
            ),
            Err(err) => tracing::warn!("{err}; starting without it"),
        }
    }
    Ok((load_policy(opts.policy.as_ref(), &opts.limits)?, None))
}

/// The stored whole policy with its logged deltas replayed on it, as they
/// were applied when Acked. A delta that no longer applies (which only a
/// changed validator could cause) ends the replay, reported: the policy
/// before it is the one in force.
fn last_known_good(
    stored: crate::control::store::Stored,
    limits: &crate::policy::ReadLimits,
) -> Result<InForce, crate::policy::PolicyError> {
    if let Some(problem) = &stored.log_problem {
        tracing::warn!("last-known-good policy: {}", escape_controls(problem));
    }
    let base = stored.base;
    let mut in_force = InForce::received(base.version, base.policy.unwrap_or_default(), limits)?;
    for delta in &stored.deltas {
        match in_force.delta(delta, limits) {
            Ok(next) => in_force = next,
            Err(refusal) => {
                tracing::warn!(
                    version = %escape_controls(&delta.version),
                    "last-known-good policy: a logged delta does not apply ({}); the version before it is used",
                    escape_controls(&refusal.to_string())
                );
                break;
            }
        }
    }
    Ok(in_force)
}

/// Everything before the loop: blocking work (files, the verifier, map
/// writes), run off the async threads so that signals are watched meanwhile.
fn start(opts: &RunOptions) -> anyhow::Result<Started> {
    let _prompt = crate::alloc::PromptReturn::new();
    let (policy, held) = first_policy(opts)?;
    // What reading took beside the policy (a file's raw schema, 75 MB at
    // 100,000 accounts) is free now: returned before the maps are loaded
    // and written (at 100,000 accounts: 132 MiB resident after the read,
    // 103 once the maps were loaded and the policy compiled).
    crate::alloc::release_free_memory();
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
    crate::alloc::release_free_memory();
    Ok(Started {
        dp,
        names,
        interfaces,
        policy,
        held,
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
#[derive(Debug)]
pub enum Command {
    /// Re-read the policy file or directory and apply it if it changed.
    Reload(Trigger),
    /// Apply a validated policy from another source, and answer.
    Apply(Box<Change>),
    /// Bring the attachments in line with the configured interfaces.
    Reconcile,
    Stop,
}

/// What asked for a reload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Trigger {
    /// The policy's files changed ([`crate::watch`]).
    Watch,
    /// SIGHUP: answered in the log also when nothing changed.
    Signal,
}

impl Trigger {
    const fn label(self) -> &'static str {
        match self {
            Self::Watch => "policy files changed",
            Self::Signal => "SIGHUP",
        }
    }
}

/// A validated policy for the enforcer, and where its answer goes.
#[derive(Debug)]
pub struct Change {
    pub policy: Arc<Policy>,
    /// Names the source in log lines, e.g. "control plane".
    pub source: &'static str,
    pub reply: oneshot::Sender<Outcome>,
}

/// The enforcer's answer to a policy.
#[derive(Debug)]
pub enum Outcome {
    /// In force: its generation, and the time from the enforcer taking it
    /// up to the flip.
    Applied { generation: u64, took: Duration },
    /// Refused; `generation` stays in force.
    Rejected { generation: u64, reason: String },
}

/// Where policies from other sources than the file go: the enforcer, which
/// answers each with an [`Outcome`].
#[derive(Clone, Debug)]
pub struct Enforcement(mpsc::Sender<Command>);

impl Enforcement {
    /// Hands `policy` to the enforcer and waits for its answer (`None`: the
    /// agent is stopping).
    pub async fn apply(&self, policy: Arc<Policy>, source: &'static str) -> Option<Outcome> {
        let (reply, answer) = oneshot::channel();
        self.0
            .send(Command::Apply(Box::new(Change {
                policy,
                source,
                reply,
            })))
            .ok()?;
        answer.await.ok()
    }
}

/// Counters of the interfaces, for the summary and the metrics.
#[derive(Debug, Default)]
pub struct LinkStats {
    /// Attached interfaces that disappeared.
    lost: AtomicU64,
    /// Re-attachments to an interface that came back.
    reattached: AtomicU64,
}

impl LinkStats {
    /// Attached interfaces that disappeared.
    #[must_use]
    pub fn lost(&self) -> u64 {
        self.lost.load(Ordering::Relaxed)
    }

    /// Re-attachments to an interface that came back.
    #[must_use]
    pub fn reattached(&self) -> u64 {
        self.reattached.load(Ordering::Relaxed)
    }
}

struct Enforcer {
    dp: Shared,
    names: Names,
    policy: Option<Source>,
    limits: ReadLimits,
    /// The policy in force, to tell what a new one takes away, and whether
    /// a reload changes anything at all.
    running: Arc<Policy>,
    /// Why the last read of the policy files failed: the same refusal is
    /// not logged again at every event the watcher sees.
    last_refusal: Option<String>,
    interfaces: Vec<InterfaceSpec>,
    receive_hook: ReceiveHook,
    links: Arc<LinkStats>,
    /// Per interface, the last attach error logged (logged again only when
    /// it changes, not at every tick).
    last_error: std::collections::HashMap<String, String>,
    /// A control plane's policy is in force: the file is no longer read.
    remote: bool,
    /// Where each outcome is recorded for the metrics.
    health: Arc<Health>,
}

/// Accounts changed by a policy from which the enforcer returns its free
/// memory after applying it ([`crate::alloc`]).
const LARGE_CHANGE: usize = 1000;

/// The source name of policies from the control plane.
pub const CONTROL_PLANE: &str = "control plane";

impl Enforcer {
    /// Starts the enforcer thread on the commands of `rx`; returns what
    /// resolves when it has stopped.
    fn spawn(self, rx: mpsc::Receiver<Command>) -> anyhow::Result<oneshot::Receiver<()>> {
        let (done_tx, done) = oneshot::channel::<()>();
        thread::Builder::new()
            .name("mmesh-enforcer".into())
            .spawn(move || {
                self.run(&rx);
                let _ = done_tx.send(());
            })
            .context("starting the enforcer thread")?;
        Ok(done)
    }

    /// Runs commands until `Stop` or until every sender is gone. Commands
    /// that queued up while one ran are coalesced: one reload and one
    /// reconciliation stand for any number of requests.
    fn run(mut self, rx: &mpsc::Receiver<Command>) {
        while let Ok(first) = rx.recv() {
            let (mut reload, mut reconcile) = (None, false);
            for command in std::iter::once(first).chain(rx.try_iter()) {
                match command {
                    Command::Stop => return,
                    // SIGHUP wins: it is answered in the log whatever happens.
                    Command::Reload(trigger) => reload = reload.max(Some(trigger)),
                    Command::Reconcile => reconcile = true,
                    // Each answered, in the order they came.
                    Command::Apply(change) => {
                        let Change {
                            policy,
                            source,
                            reply,
                        } = *change;
                        let _ = reply.send(self.apply(policy, source));
                        self.sync_standby();
                        // Only after a large change: with a large heap it
                        // takes milliseconds, which the next delta, often
                        // right behind, would wait for (one-account deltas
                        // back to back: 15.7 ms send to Ack with it after
                        // every apply, 12.9 ms without; medians of 5 rounds
                        // on a loaded machine).
                        let touched = lock(&self.dp).active().map_or(0, |c| c.changed.len());
                        if touched >= LARGE_CHANGE {
                            crate::alloc::release_free_memory();
                        }
                    }
                }
            }
            if let Some(trigger) = reload {
                let _prompt = crate::alloc::PromptReturn::new();
                self.reload(trigger);
                // Also when nothing changed: the file was read whole.
                crate::alloc::release_free_memory();
            }
            if reconcile {
                self.reconcile();
            }
        }
    }

    /// Re-reads the policy file or directory and applies it if it changed
    /// (SIGHUP, or the watcher).
    fn reload(&mut self, trigger: Trigger) {
        let label = trigger.label();
        let Some(source) = &self.policy else {
            tracing::info!("{label}: running the embedded default policy, nothing to reload");
            return;
        };
        if self.remote {
            if trigger == Trigger::Signal {
                tracing::info!(
                    "SIGHUP: the control plane's policy is in force; the policy file is only read before it has sent one"
                );
            } else {
                tracing::debug!("{label}: the control plane's policy is in force; not read");
            }
            return;
        }
        // Read and validated without the lock: the summary goes on.
        // Accounts equal to the running ones are taken from them, not kept twice.
        let read = crate::policy::reading_beside(&self.running, || source.read(&self.limits));
        // What reading took beside the policy (the file's raw schema, 75 MB
        // at 100,000 accounts) is returned after the answer (`run`), not
        // here: with such a heap `mi_collect` took 200 ms, which the answer
        // to SIGHUP waited for (787 ms instead of 580, medians of 2–3
        // rounds).
        match read {
            // Nothing to apply (the datapath would flip to a copy of itself):
            // an event that changed nothing, or a file saved as it was.
            Ok(policy) if policy == *self.running => {
                self.last_refusal = None;
                let generation = lock(&self.dp).generation();
                if trigger == Trigger::Signal {
                    tracing::info!(
                        generation,
                        "SIGHUP: policy in force, unchanged: nothing to apply"
                    );
                } else {
                    tracing::debug!(generation, "{label}: the policy is unchanged");
                }
            }
            Ok(policy) => {
                self.last_refusal = None;
                self.apply(Arc::new(policy), label);
                self.sync_standby();
            }
            Err(err) => {
                let text = escape_controls(&err.to_string()).into_owned();
                let generation = lock(&self.dp).generation();
                if trigger == Trigger::Watch && self.last_refusal.as_ref() == Some(&text) {
                    tracing::debug!(generation, "{label}: policy still rejected, as before");
                    return;
                }
                tracing::error!(
                    generation,
                    "{label}: policy rejected, the running policy stays in force: {text}"
                );
                self.health.rejected(None, err.full_map());
                self.last_refusal = Some(text);
            }
        }
    }

    /// Brings the standby half of the maps up to date after a flip (one
    /// RCU grace period): after the answer, which does not wait for it.
    fn sync_standby(&self) {
        if let Err(err) = lock(&self.dp).sync_standby() {
            // In force already; the standby half is repaired next time.
            tracing::warn!(%err, "could not bring the standby copy of the policy up to date");
        }
    }

    /// Compiles `policy` against the one in force and applies it (the
    /// standby half is left to [`Self::sync_standby`]); logs and answers
    /// the outcome. `source` names where it came from.
    fn apply(&mut self, policy: Arc<Policy>, source: &'static str) -> Outcome {
        let started = Instant::now();
        let (active, capacity) = {
            let dp = lock(&self.dp);
            (dp.active().cloned(), *dp.capacity())
        };
        // Compile without the lock: the summary goes on.
        let result = compile_for(active.as_deref(), &capacity, &policy).and_then(|compiled| {
            let summary = describe(&policy, &compiled);
            // A file edited by mistake, not a control plane that means it
            // (and would pay a pass over every account for each delta).
            if source != CONTROL_PLANE {
                let removal = Removal::between(&self.running, &policy);
                if removal.removes_most() {
                    tracing::warn!(
                        "{source}: the new policy {removal}; applying it, but if that is not intended, restore the previous one (replace policy files by rename, never write them in place)"
                    );
                }
            }
            let mut dp = lock(&self.dp);
            self.names.insert(dp.generation() + 1, compiled.clone());
            let generation = dp.apply(compiled)?;
            Ok((generation, summary))
        });
        match result {
            Ok((generation, summary)) => {
                let took = started.elapsed();
                tracing::info!(
                    generation,
                    took_ms = took.as_secs_f64() * 1e3,
                    "{source}: policy in force: {summary}"
                );
                self.remote |= source == CONTROL_PLANE;
                self.health.applied(generation, &policy, Some(took));
                self.running = policy;
                Outcome::Applied { generation, took }
            }
            Err(err) => {
                let generation = lock(&self.dp).generation();
                let reason = format!("{err:#}");
                tracing::error!(
                    generation,
                    "{source}: policy rejected, the running policy stays in force: {}",
                    escape_controls(&reason)
                );
                let full = err
                    .downcast_ref::<CompileError>()
                    .and_then(CompileError::refused_map);
                self.health.rejected(Some(started.elapsed()), full);
                Outcome::Rejected { generation, reason }
            }
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

/// The metrics endpoint unless `--no-metrics`, and the read-only handles of
/// the collector and the admin socket (handed over with
/// [`Health::attach_sources`] once the datapath is shared).
///
/// Served once attached, not before: a second agent started by mistake is
/// refused for what it would clash over (the interfaces, the pins, the
/// admin socket), not for the metrics address; until then, a refused
/// connection says "not ready".
async fn serve_metrics(
    opts: &RunOptions,
    health: &Arc<Health>,
    dp: &Datapath,
) -> anyhow::Result<(Option<metrics::Server>, metrics::Handles)> {
    let handles = metrics::Handles::new(dp)?;
    let Some(addr) = opts.metrics else {
        return Ok((None, handles));
    };
    Ok((Some(metrics::serve(addr, health.clone()).await?), handles))
}

/// Runs until SIGINT or SIGTERM. Errors before the datapath is attached are
/// returned (and nothing stays attached); afterwards the agent keeps going.
#[expect(
    clippy::too_many_lines,
    reason = "the agent's life in order (start, serve, loop, stop); each part is a function already"
)]
pub async fn run(opts: RunOptions, out: Outputs) -> anyhow::Result<()> {
    // Signals first: a SIGHUP during a long start-up is a reload after it,
    // not the end of the agent.
    let mut hangup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut terminate =
        signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;

    // Bound before anything is loaded: a second agent on the same socket
    // stops here, before it touches the datapath.
    let admin = match &opts.admin {
        Some(path) => Some(admin::server::bind(path)?),
        None => None,
    };
    // The enforcer's commands queue up from here: the policy is watched
    // before start-up reads it, so that no change made meanwhile is lost.
    let (commands, queued) = mpsc::channel::<Command>();
    watch_policy(&opts, commands.clone());
    let start_opts = opts.clone();
    let startup = tokio::task::spawn_blocking(move || start(&start_opts));
    let Started {
        mut dp,
        names,
        interfaces,
        policy,
        held,
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

    let health = Arc::new(Health::new(opts.summary_interval).with_top_accounts(opts.top_accounts));
    let policy = Arc::new(policy);
    health.applied(dp.generation(), &policy, None);
    let (metrics, handles) = serve_metrics(&opts, &health, &dp).await?;
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

    let mut summary = Summary::start(&dp, &interfaces, health.clone())?;
    let control = match &opts.control {
        Some(c) => Some((c.clone(), ControlParts::new(&dp, &out)?)),
        None => None,
    };
    let dp: Shared = Arc::new(Mutex::new(dp));
    let links = Arc::new(LinkStats::default());
    let enforcer_done = Enforcer {
        dp: dp.clone(),
        names: names.clone(),
        policy: opts.policy.clone(),
        limits: opts.limits.clone(),
        running: policy,
        last_refusal: None,
        interfaces: interfaces.clone(),
        receive_hook: opts.receive_hook,
        links: links.clone(),
        last_error: std::collections::HashMap::new(),
        remote: held.is_some(),
        health: health.clone(),
    }
    .spawn(queued)?;
    health.attach_sources(handles, &names, &out, (&dp, &links), &interfaces);
    // Both stop serving when dropped, at the end.
    let _metrics = metrics;
    let _admin = match admin {
        Some(socket) => Some(admin::server::serve(socket, health.clone(), &out.events)?),
        None => None,
    };
    watch_links(commands.clone());
    let client = control.map(|(options, parts)| {
        let enforcement = Enforcement(commands.clone());
        tokio::spawn(
            parts
                .client(
                    options,
                    enforcement,
                    held,
                    names,
                    (&dp, &out),
                    health.clone(),
                )
                .run(),
        )
    });

    let mut ticker = tokio::time::interval(opts.summary_interval);
    // After a pause (SIGSTOP, a starved machine) one summary at once and the
    // next a whole interval later, not a burst of the missed ones.
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    ticker.tick().await;
    tracing::info!("running; SIGHUP reloads the policy, SIGINT or SIGTERM stops");
    loop {
        tokio::select! {
            _ = hangup.recv() => { let _ = commands.send(Command::Reload(Trigger::Signal)); }
            _ = interrupt.recv() => { tracing::info!("SIGINT: stopping"); break; }
            _ = terminate.recv() => { tracing::info!("SIGTERM: stopping"); break; }
            _ = ticker.tick() => {
                let _ = commands.send(Command::Reconcile);
                summary.tick(&dp, &out, &links, &interfaces);
            }
        }
    }
    if let Some(client) = client {
        client.abort();
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
    log_stopped(&dp, decoded)
}

/// The last line: what stays enforcing, and the totals.
fn log_stopped(dp: &Shared, decoded: u64) -> anyhow::Result<()> {
    let dp = lock(dp);
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

/// Unless told not to, starts the thread that asks the enforcer for a
/// reload when the policy's files change. Without it, SIGHUP still reloads.
fn watch_policy(opts: &RunOptions, commands: mpsc::Sender<Command>) {
    let Some(source) = opts.policy.as_ref().filter(|_| opts.watch) else {
        return;
    };
    let shown = escape_controls(&source.path().display().to_string()).into_owned();
    match watch::spawn(source.clone(), move || {
        commands.send(Command::Reload(Trigger::Watch)).is_ok()
    }) {
        Ok(()) => tracing::info!(policy = %shown, "watching the policy for changes"),
        Err(err) => tracing::warn!(policy = %shown, "{err}; the policy is reloaded on SIGHUP only"),
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
    /// Told at every tick: the loop is alive (`/healthz`).
    health: Arc<Health>,
}

impl Summary {
    /// The first reading, with handles of its own to the counter maps.
    fn start(
        dp: &Datapath,
        interfaces: &[InterfaceSpec],
        health: Arc<Health>,
    ) -> anyhow::Result<Self> {
        let (totals, stats) = dp
            .counter_fds()
            .context("duplicating the counter maps' fds")?;
        let counters = CounterReader::from_fds(totals, stats)?;
        health.tick();
        Ok(Self {
            totals: counters.totals()?,
            counters,
            at: Instant::now(),
            losses: Losses::default(),
            attached: attached_list(dp, interfaces),
            health,
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
        self.health.tick();
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
                .totals_by_name()
                .into_iter()
                .map(|c| (c.name, c.lost))
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
            "; packets not counted per account, map account_counters full (raise --max-counters): {full}"
        );
    }
    line
}

/// What the control-plane client needs from the running agent, made before
/// the datapath goes behind its lock.
struct ControlParts {
    /// Handles of its own to the counter maps, for Status.
    counters: CounterReader,
    reports: reports::Shared,
    facts: HostFacts,
}

/// Event batches queued for the violation reports at most.
const REPORT_QUEUE: usize = 64;

impl ControlParts {
    fn new(dp: &Datapath, out: &Outputs) -> anyhow::Result<Self> {
        let (totals, stats) = dp
            .counter_fds()
            .context("duplicating the counter maps' fds")?;
        let counters = CounterReader::from_fds(totals, stats)?;
        let (reports, _) = reports::spawn(out.events.subscribe("control-plane", REPORT_QUEUE))
            .context("starting the violation-report thread")?;
        let capacity = dp.capacity();
        let mut features: Vec<String> = dp
            .attachments()
            .iter()
            .map(|a| a.tc_mode.to_string())
            .collect();
        features.sort();
        features.dedup();
        features.push(
            if dp.pins().is_some() {
                "pinned"
            } else {
                "ephemeral"
            }
            .into(),
        );
        Ok(Self {
            counters,
            reports,
            facts: HostFacts {
                kernel: kernel_release(),
                features,
                capacity: proto::Capacity {
                    accounts: capacity.accounts,
                    account_prefixes: capacity.account_prefixes,
                    list_prefixes: capacity.list_prefixes,
                },
            },
        })
    }

    /// The client, with a Status made from read-only handles: the counter
    /// maps, the compiled policies by generation, the fan-out's losses, and
    /// the attachments when the enforcer is not applying a policy.
    fn client(
        self,
        options: client::Options,
        enforcement: Enforcement,
        held: Option<InForce>,
        names: Names,
        (dp, out): (&Shared, &Outputs),
        health: Arc<Health>,
    ) -> Client {
        let generation = lock(dp).generation();
        let (dp, out) = (dp.clone(), out.clone());
        let counters = self.counters;
        let status: StatusFn = Arc::new(move |version: &str, generation: u64| {
            let mut s = proto::Status {
                policy_version: version.to_owned(),
                generation,
                ..proto::Status::default()
            };
            if let Ok(t) = counters.totals() {
                for ((_, verdict, _), c) in &t.counters {
                    s.packets += c.packets;
                    match verdict {
                        Verdict::Drop => s.dropped += c.packets,
                        Verdict::Monitor => s.monitored += c.packets,
                        Verdict::Pass => {}
                    }
                }
                s.events_lost_ring = t.events_lost;
            }
            if let Some(compiled) = names.get(generation) {
                let c = compiled.counts();
                s.accounts = c.accounts as u32;
                s.account_prefixes = (c.account_prefixes_v4 + c.account_prefixes_v6) as u32;
                s.list_prefixes = (c.list_prefixes_v4 + c.list_prefixes_v6) as u32;
            }
            s.events_lost_queues = out.events.consumers().iter().map(|c| c.lost()).sum();
            if let Ok(dp) = dp.try_lock() {
                s.attached = dp
                    .attachments()
                    .iter()
                    .map(|a| format!("{}:{}:{}", a.name, a.role, a.receive))
                    .collect();
            }
            s
        });
        Client::new(
            options,
            enforcement,
            self.facts,
            (held, generation),
            self.reports,
            (status, health),
        )
    }
}

/// `uname -r`.
fn kernel_release() -> String {
    // SAFETY: a zeroed utsname, filled in by the kernel.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `u` is a valid, writable utsname.
    if unsafe { libc::uname(&raw mut u) } != 0 {
        return String::new();
    }
    // SAFETY: the kernel NUL-terminates `release`.
    unsafe { std::ffi::CStr::from_ptr(u.release.as_ptr()) }
        .to_string_lossy()
        .into_owned()
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
