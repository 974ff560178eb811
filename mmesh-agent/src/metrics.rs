//! The Prometheus endpoint and the health checks (`--metrics-addr`).
//!
//! Everything is read when a scraper asks, through read-only handles: the
//! counter maps through file descriptors of their own ([`CounterReader`]),
//! the compiled policies by generation ([`Names`]), the fan-out's and the
//! log sink's counters, and what the enforcer records about each policy it
//! applies ([`Health`]). The datapath's lock is only ever tried (for the
//! attachment list of `/readyz`), never waited for: a scrape during a long
//! policy apply answers with what it saw last, and enforcement never waits
//! for a scrape.

use std::{
    collections::BTreeMap,
    fmt::{self, Write as _},
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError},
    time::{Duration, Instant, SystemTime},
};

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use mmesh_common::{Direction, Reason, Verdict};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric, text},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge, info::Info},
    registry::Registry,
};
use tokio::{net::TcpListener, task::JoinHandle};

use crate::{
    agent::{LinkStats, Outputs},
    compile::Capacity,
    counters::{AccountCounts, AccountReader, CounterReader, top_accounts},
    datapath::{Attachment, Datapath, Totals},
    events::Names,
    interface::InterfaceSpec,
};

/// The content type of the `OpenMetrics` text format, which
/// [`prometheus_client::encoding::text`] writes.
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Why the endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error(
        "cannot listen for metrics on {addr}: {source} (does another program, or another mmesh-agent, use it in this network namespace?); choose another address with --metrics-addr, or turn the endpoint off with --no-metrics"
    )]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Accounts in the top-offender metric by default (`--metrics-top-accounts`).
pub const DEFAULT_TOP_ACCOUNTS: usize = 20;

/// What the enforcer last did with a policy.
#[derive(Debug, Clone, Default)]
pub(crate) struct Policy {
    /// The generation in force (0: none yet).
    pub(crate) generation: u64,
    /// The policy in force, as validated (its version, its source).
    pub(crate) running: Option<Arc<crate::policy::Policy>>,
    pub(crate) applied: u64,
    pub(crate) rejected: u64,
    /// Policies refused because a map was too small, by map.
    pub(crate) refused: BTreeMap<&'static str, u64>,
    /// The last attempt: whether it was applied, when, and how long it took
    /// (from the enforcer taking it up; unknown for the first policy).
    pub(crate) last: Option<(bool, SystemTime, Option<Duration>)>,
}

impl Policy {
    /// The version the policy in force names, if any.
    pub(crate) fn version(&self) -> Option<&str> {
        self.running.as_ref().and_then(|p| p.version.as_deref())
    }
}

/// The read-only handles the collector, `/readyz` and the admin socket
/// read, handed over once the datapath is attached.
pub(crate) struct Sources {
    /// Handles of its own to the counter maps.
    pub(crate) counters: CounterReader,
    /// Handles of its own to the per-account counters.
    pub(crate) accounts: AccountReader,
    pub(crate) names: Names,
    pub(crate) capacity: Capacity,
    pub(crate) outputs: Outputs,
    datapath: Arc<Mutex<Datapath>>,
    pub(crate) links: Arc<LinkStats>,
    /// The configured interfaces.
    pub(crate) interfaces: Vec<String>,
    /// The attachments as last seen (the datapath's lock is only tried).
    attached: Mutex<Vec<Attachment>>,
    /// The pin directory, unless ephemeral.
    pub(crate) pins: Option<std::path::PathBuf>,
}

/// What the collector takes from the datapath before it goes behind its
/// lock.
pub struct Handles {
    counters: CounterReader,
    accounts: AccountReader,
    capacity: Capacity,
    attached: Vec<Attachment>,
    pins: Option<std::path::PathBuf>,
}

impl Handles {
    /// Handles of the readers' own to `dp`'s counter maps.
    pub fn new(dp: &Datapath) -> Result<Self, crate::counters::CounterError> {
        let dup = |e: std::io::Error| crate::counters::CounterError::Open {
            map: "counters",
            source: aya::maps::MapError::SyscallError(aya::sys::SyscallError {
                call: "fcntl(F_DUPFD_CLOEXEC)",
                io_error: e,
            }),
        };
        let (totals, stats) = dp.counter_fds().map_err(dup)?;
        Ok(Self {
            counters: CounterReader::from_fds(totals, stats)?,
            accounts: AccountReader::from_fds(dp.account_fds().map_err(dup)?)?,
            capacity: *dp.capacity(),
            attached: dp.attachments().to_vec(),
            pins: dp.pins().map(|p| p.dir().to_owned()),
        })
    }
}

/// What the agent's loops record for the endpoint: when the summary tick
/// last ran, what became of each policy, and (once attached) the read-only
/// handles.
pub struct Health {
    summary_interval: Duration,
    /// When the agent started, for `status`.
    pub(crate) started: (Instant, SystemTime),
    /// Accounts in the top-offender metric (0: none).
    top_accounts: usize,
    /// The last summary tick (`None`: not running yet).
    ticked: Mutex<Option<Instant>>,
    policy: Mutex<Policy>,
    sources: OnceLock<Sources>,
}

fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing under these locks panics; a poisoned one still holds a
    // consistent value (each is written whole).
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Health {
    #[must_use]
    pub fn new(summary_interval: Duration) -> Self {
        Self {
            summary_interval,
            started: (Instant::now(), SystemTime::now()),
            top_accounts: DEFAULT_TOP_ACCOUNTS,
            ticked: Mutex::new(None),
            policy: Mutex::new(Policy::default()),
            sources: OnceLock::new(),
        }
    }

    /// Puts the `n` accounts with the most drops in the metrics (0: none).
    #[must_use]
    pub const fn with_top_accounts(mut self, n: usize) -> Self {
        self.top_accounts = n;
        self
    }

    /// What the enforcer last did with a policy.
    pub(crate) fn policy(&self) -> Policy {
        locked(&self.policy).clone()
    }

    /// The read-only handles, once attached.
    pub(crate) fn sources(&self) -> Option<&Sources> {
        self.sources.get()
    }

    /// The summary tick ran: the async loop is alive.
    pub fn tick(&self) {
        *locked(&self.ticked) = Some(Instant::now());
    }

    /// A policy is in force as `generation`; `took` from the enforcer
    /// taking it up to the flip, when known.
    pub fn applied(
        &self,
        generation: u64,
        policy: &Arc<crate::policy::Policy>,
        took: Option<Duration>,
    ) {
        let mut p = locked(&self.policy);
        p.generation = generation;
        p.running = Some(policy.clone());
        p.applied += 1;
        p.last = Some((true, SystemTime::now(), took));
    }

    /// A policy was refused; the one in force stays. `full`: the map
    /// that had no room for it, if that was why.
    pub fn rejected(&self, took: Option<Duration>, full: Option<&'static str>) {
        let mut p = locked(&self.policy);
        p.rejected += 1;
        if let Some(map) = full {
            *p.refused.entry(map).or_default() += 1;
        }
        p.last = Some((false, SystemTime::now(), took));
    }

    /// A policy that never reached the enforcer (a control plane's,
    /// Nacked in validation) did not fit `map`.
    pub fn refused(&self, map: &'static str) {
        *locked(&self.policy).refused.entry(map).or_default() += 1;
    }

    /// Hands over the read-only handles once the datapath is shared (its
    /// lock is not taken: the enforcer may already be applying a policy).
    pub fn attach_sources(
        &self,
        handles: Handles,
        names: &Names,
        outputs: &Outputs,
        (datapath, links): (&Arc<Mutex<Datapath>>, &Arc<LinkStats>),
        interfaces: &[InterfaceSpec],
    ) {
        let _ = self.sources.set(Sources {
            counters: handles.counters,
            accounts: handles.accounts,
            names: names.clone(),
            capacity: handles.capacity,
            outputs: outputs.clone(),
            datapath: datapath.clone(),
            links: links.clone(),
            interfaces: interfaces.iter().map(|i| i.name.clone()).collect(),
            attached: Mutex::new(handles.attached),
            pins: handles.pins,
        });
    }

    /// How long the summary tick may be late before `/healthz` fails: three
    /// intervals, and 5 s more for a busy machine.
    fn stale_after(&self) -> Duration {
        self.summary_interval * 3 + Duration::from_secs(5)
    }

    /// `/healthz`: the async loop ticks (during start-up, loading counts as
    /// alive).
    fn healthz(&self) -> (bool, String) {
        match *locked(&self.ticked) {
            None => (true, "ok: starting\n".into()),
            Some(at) => {
                let ago = at.elapsed();
                if ago > self.stale_after() {
                    (
                        false,
                        format!(
                            "unhealthy: the summary loop last ran {:.1} s ago (every {} s expected)\n",
                            ago.as_secs_f64(),
                            self.summary_interval.as_secs()
                        ),
                    )
                } else {
                    (true, "ok\n".into())
                }
            }
        }
    }

    /// `/readyz`: programs attached to every configured interface, and a
    /// policy in force.
    pub(crate) fn readyz(&self) -> (bool, String) {
        let Some(s) = self.sources.get() else {
            return (
                false,
                "not ready: starting (loading the programs and the policy)\n".into(),
            );
        };
        let attached: Vec<String> = s.attached_now().into_iter().map(|a| a.name).collect();
        let missing: Vec<&str> = s
            .interfaces
            .iter()
            .filter(|i| !attached.contains(i))
            .map(String::as_str)
            .collect();
        let generation = locked(&self.policy).generation;
        if !missing.is_empty() {
            return (
                false,
                format!("not ready: not attached to {}\n", missing.join(", ")),
            );
        }
        if generation == 0 {
            return (false, "not ready: no policy in force\n".into());
        }
        (
            true,
            format!(
                "ready: attached to {}; policy generation {generation}\n",
                attached.join(", ")
            ),
        )
    }
}

impl Sources {
    /// The attachments, or as last seen while the enforcer holds the
    /// datapath.
    pub(crate) fn attached_now(&self) -> Vec<Attachment> {
        let mut seen = locked(&self.attached);
        if let Ok(dp) = self.datapath.try_lock() {
            *seen = dp.attachments().to_vec();
        }
        seen.clone()
    }
}

/// Reads everything at scrape time.
struct Scrape(Arc<Health>);

impl fmt::Debug for Scrape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Scrape")
    }
}

/// One counter or gauge family: its samples, each with its labels.
fn family<M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: &[(&[(&str, &str)], M)],
) -> fmt::Result {
    let Some((_, first)) = samples.first() else {
        return Ok(());
    };
    let mut family = encoder.encode_descriptor(name, help, None, first.metric_type())?;
    for (labels, metric) in samples {
        if labels.is_empty() {
            metric.encode(family.encode_family(&Vec::<(&str, &str)>::new())?)?;
        } else {
            metric.encode(family.encode_family(labels)?)?;
        }
    }
    Ok(())
}

fn counter(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: u64) -> fmt::Result {
    family(encoder, name, help, &[(&[], ConstCounter::new(value))])
}

fn gauge(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: i64) -> fmt::Result {
    family(encoder, name, help, &[(&[], ConstGauge::new(value))])
}

impl Collector for Scrape {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let health = &self.0;
        let policy = locked(&health.policy).clone();
        gauge(
            &mut encoder,
            "mmesh_policy_generation",
            "Generation of the policy in force (0: none yet).",
            policy.generation as i64,
        )?;
        if let Some(version) = policy.version() {
            let info = Info::new(vec![("version", version)]);
            let e = encoder.encode_descriptor(
                "mmesh_policy",
                "The version the policy in force names.",
                None,
                MetricType::Info,
            )?;
            info.encode(e)?;
        }
        let applies = [
            (
                &[("result", "applied")][..],
                ConstCounter::new(policy.applied),
            ),
            (
                &[("result", "rejected")][..],
                ConstCounter::new(policy.rejected),
            ),
        ];
        family(
            &mut encoder,
            "mmesh_policy_applies",
            "Policies the enforcer applied or rejected, the first included.",
            &applies,
        )?;
        if let Some((ok, at, took)) = policy.last {
            gauge(
                &mut encoder,
                "mmesh_policy_last_apply_success",
                "1 if the last policy was applied, 0 if it was rejected.",
                i64::from(ok),
            )?;
            let at = at
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs_f64();
            family(
                &mut encoder,
                "mmesh_policy_last_apply_timestamp_seconds",
                "When the last policy was applied or rejected (Unix time).",
                &[(&[], ConstGauge::new(at))],
            )?;
            if let Some(took) = took {
                family(
                    &mut encoder,
                    "mmesh_policy_last_apply_duration_seconds",
                    "From the enforcer taking up the last policy to its flip or refusal.",
                    &[(&[], ConstGauge::new(took.as_secs_f64()))],
                )?;
            }
        }
        if let Some(s) = health.sources.get() {
            // Read once for the top offenders and the two maps' pressure.
            let accounts = s
                .accounts
                .read()
                .inspect_err(|err| tracing::debug!(%err, "metrics: reading the account counters"))
                .ok();
            s.encode(&policy, accounts.as_ref(), &mut encoder)?;
            s.encode_top_accounts(
                &policy,
                health.top_accounts,
                accounts.as_ref(),
                &mut encoder,
            )?;
        }
        Ok(())
    }
}

impl Sources {
    /// `accounts`: the per-account counters and flow cache, as read for
    /// this scrape (`None`: not readable now).
    fn encode(
        &self,
        policy: &Policy,
        accounts: Option<&AccountCounts>,
        encoder: &mut DescriptorEncoder,
    ) -> fmt::Result {
        // A failed read leaves the datapath's series out of this scrape
        // (Prometheus then marks them stale) rather than report zeros.
        match self.counters.totals() {
            Ok(t) => {
                encode_totals(&t, encoder)?;
                encode_refused(policy, &t, encoder)?;
            }
            Err(err) => tracing::debug!(%err, "metrics: reading the counters"),
        }
        // By name: the `events --follow` clients share one; departed
        // consumers stay counted, so the counters never go down.
        let consumers = self.outputs.events.totals_by_name();
        let delivered: Vec<_> = consumers
            .iter()
            .map(|c| ([("consumer", c.name.as_str())], c.delivered))
            .collect();
        let delivered: Vec<_> = delivered
            .iter()
            .map(|(l, n)| (&l[..], ConstCounter::new(*n)))
            .collect();
        family(
            encoder,
            "mmesh_events_delivered",
            "Events delivered to each consumer of the event fan-out.",
            &delivered,
        )?;
        let lost: Vec<_> = consumers
            .iter()
            .map(|c| ([("consumer", c.name.as_str())], c.lost))
            .collect();
        let lost: Vec<_> = lost
            .iter()
            .map(|(l, n)| (&l[..], ConstCounter::new(*n)))
            .collect();
        family(
            encoder,
            "mmesh_events_lost",
            "Events a consumer lost: its queue was full (a slow reader) or its write failed.",
            &lost,
        )?;
        counter(
            encoder,
            "mmesh_log_lines_lost",
            "Log lines lost to a slow, stalled or closed stderr.",
            self.outputs.logs.lost(),
        )?;
        counter(
            encoder,
            "mmesh_interfaces_lost",
            "Attached interfaces that disappeared (nothing is enforced on one until it comes back).",
            self.links.lost(),
        )?;
        counter(
            encoder,
            "mmesh_interfaces_reattached",
            "Re-attachments to an interface that came back.",
            self.links.reattached(),
        )?;
        self.encode_maps(policy, accounts, encoder)
    }

    /// Dropped packets of the `n` accounts with the most (bounded label
    /// cardinality: `--metrics-top-accounts`), ranked as `top --by account`
    /// ranks them.
    fn encode_top_accounts(
        &self,
        policy: &Policy,
        n: usize,
        counts: Option<&AccountCounts>,
        encoder: &mut DescriptorEncoder,
    ) -> fmt::Result {
        if n == 0 {
            return Ok(());
        }
        let (Some(compiled), Some(counts)) = (self.names.get(policy.generation), counts) else {
            return Ok(());
        };
        let top = top_accounts(&counts.drops, &compiled, n);
        let labels: Vec<[(&str, &str); 1]> = top
            .iter()
            .map(|a| [("account", a.account.as_str())])
            .collect();
        let packets: Vec<_> = labels
            .iter()
            .zip(&top)
            .map(|(l, a)| (&l[..], ConstCounter::new(a.packets)))
            .collect();
        family(
            encoder,
            "mmesh_account_dropped_packets",
            "Packets dropped per account, for the accounts with the most drops only (--metrics-top-accounts).",
            &packets,
        )?;
        let bytes: Vec<_> = labels
            .iter()
            .zip(&top)
            .map(|(l, a)| (&l[..], ConstCounter::new(a.bytes)))
            .collect();
        family(
            encoder,
            "mmesh_account_dropped_bytes",
            "Bytes dropped per account, for the same accounts as mmesh_account_dropped_packets_total.",
            &bytes,
        )
    }

    /// Entries and capacity of the policy maps, from the compiled policy in
    /// force, and of the per-account counters and the flow cache, as read
    /// for this scrape.
    fn encode_maps(
        &self,
        policy: &Policy,
        accounts: Option<&AccountCounts>,
        encoder: &mut DescriptorEncoder,
    ) -> fmt::Result {
        let c = &self.capacity;
        let cpus = aya::util::nr_cpus().map_or(1, |n| n as u64);
        let capacities = [
            ("accounts", u64::from(c.accounts)),
            ("account_prefixes_v4", u64::from(c.account_prefixes)),
            ("account_prefixes_v6", u64::from(c.account_prefixes)),
            ("list_prefixes_v4", u64::from(c.list_prefixes)),
            ("list_prefixes_v6", u64::from(c.list_prefixes)),
            ("account_counters", u64::from(c.counters)),
            ("flow_cache", u64::from(c.flow_cache) * cpus),
        ];
        let labels: Vec<[(&str, &str); 1]> =
            capacities.iter().map(|(m, _)| [("map", *m)]).collect();
        let capacity: Vec<_> = labels
            .iter()
            .zip(capacities)
            .map(|(l, (_, n))| (&l[..], ConstGauge::new(n as i64)))
            .collect();
        family(
            encoder,
            "mmesh_map_capacity",
            "Entries each map can hold (--max-accounts, --max-account-prefixes, --max-list-prefixes, --max-counters, --flow-cache times the CPUs).",
            &capacity,
        )?;
        let policy_entries = self.names.get(policy.generation).map(|compiled| {
            let n = compiled.counts();
            [
                n.accounts,
                n.account_prefixes_v4,
                n.account_prefixes_v6,
                n.list_prefixes_v4,
                n.list_prefixes_v6,
            ]
            .map(|n| n as u64)
        });
        // Each map whose entries could be read now, with its count.
        let counted = policy_entries.into_iter().flatten().zip(&labels).chain(
            accounts
                .into_iter()
                .flat_map(|a| [a.counter_entries, a.flow_entries])
                .zip(&labels[5..]),
        );
        let entries: Vec<_> = counted
            .map(|(n, l)| (&l[..], ConstGauge::new(n as i64)))
            .collect();
        family(
            encoder,
            "mmesh_map_entries",
            "Entries of each map: the policy maps in the policy in force, the per-account counters' keys, the flow cache's entries of the policy in force.",
            &entries,
        )
    }
}

/// The datapath's counters: packets and bytes by reason, verdict and
/// direction (every combination, zeros included, so that rates start from
/// the first scrape), and its health counters.
fn encode_totals(t: &Totals, encoder: &mut DescriptorEncoder) -> fmt::Result {
    let mut labels = Vec::new();
    for reason in Reason::ALL {
        for verdict in Verdict::ALL {
            for direction in Direction::ALL {
                labels.push((
                    (reason, verdict, direction),
                    [
                        ("reason", reason.name()),
                        ("verdict", verdict.name()),
                        ("direction", direction.name()),
                    ],
                ));
            }
        }
    }
    let value = |key, bytes: bool| {
        let c = t.counters.get(key).copied().unwrap_or_default();
        ConstCounter::new(if bytes { c.bytes } else { c.packets })
    };
    let packets: Vec<_> = labels
        .iter()
        .map(|(key, l)| (&l[..], value(key, false)))
        .collect();
    family(
        encoder,
        "mmesh_packets",
        "Packets the programs judged, by reason, verdict and direction.",
        &packets,
    )?;
    let bytes: Vec<_> = labels
        .iter()
        .map(|(key, l)| (&l[..], value(key, true)))
        .collect();
    family(
        encoder,
        "mmesh_bytes",
        "Bytes of the packets the programs judged, by reason, verdict and direction.",
        &bytes,
    )?;
    counter(
        encoder,
        "mmesh_ring_buffer_events_lost",
        "Events the programs could not emit because the ring buffer was full (--event-buffer).",
        t.events_lost,
    )?;
    counter(
        encoder,
        "mmesh_events_sampled_away",
        "Drops and monitored packets not reported as an event: their (account, reason) had used its events for the second (--event-rate in the policy).",
        t.events_sampled,
    )?;
    counter(
        encoder,
        "mmesh_rate_limit_contended",
        "Rate-limit updates that lost every compare-and-swap retry and were charged with a plain atomic add.",
        t.rate_contended,
    )?;
    counter(
        encoder,
        "mmesh_pull_failed",
        "TC packets whose headers could not be pulled into the linear part of the skb (counted as truncated).",
        t.pull_failed,
    )?;
    Ok(())
}

/// The maps `mmesh_map_inserts_refused_total` covers, each with a sample
/// (zeros included).
const REFUSING_MAPS: [&str; 6] = [
    "accounts",
    "account_prefixes_v4",
    "account_prefixes_v6",
    "list_prefixes_v4",
    "list_prefixes_v6",
    "account_counters",
];

/// Inserts a full map refused: in the kernel, a packet's first counter
/// of its (account, reason, verdict, direction) with `ACCT_COUNTERS`
/// full; in the agent, a whole policy that did not fit a policy map.
fn encode_refused(policy: &Policy, t: &Totals, encoder: &mut DescriptorEncoder) -> fmt::Result {
    let refused: Vec<_> = REFUSING_MAPS
        .iter()
        .map(|&map| {
            let n = if map == "account_counters" {
                t.counters_full
            } else {
                policy.refused.get(map).copied().unwrap_or(0)
            };
            ([("map", map)], n)
        })
        .collect();
    let refused: Vec<_> = refused
        .iter()
        .map(|(l, n)| (&l[..], ConstCounter::new(*n)))
        .collect();
    family(
        encoder,
        "mmesh_map_inserts_refused",
        "Inserts refused because a map was full: policies that did not fit a policy map (nothing of them applied), and packets not counted per account because account_counters was full (they are in mmesh_packets_total). Raise the map's option (--max-accounts, --max-account-prefixes, --max-list-prefixes, --max-counters).",
        &refused,
    )
}

/// The registry a scrape encodes: the build, and the collector.
fn registry(health: Arc<Health>) -> Registry {
    let mut registry = Registry::default();
    registry.register(
        "mmesh_build",
        "The agent's version",
        Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
    );
    registry.register_collector(Box::new(Scrape(health)));
    registry
}

/// Renders the metrics in the `OpenMetrics` text format.
#[must_use]
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail but for a collector's own error,
    // which the encoding above never returns.
    if let Err(err) = text::encode(&mut out, registry) {
        let _ = writeln!(out, "# encoding failed: {err}");
    }
    out
}

type Shared = (Arc<Health>, Arc<Registry>);

async fn metrics(State((_, registry)): State<Shared>) -> impl IntoResponse {
    // The map reads are system calls (the flow cache is thousands of
    // lookups): off the async threads, which answer signals and the summary.
    let body = tokio::task::spawn_blocking(move || render(&registry))
        .await
        .unwrap_or_else(|err| format!("# rendering failed: {err}\n"));
    ([(axum::http::header::CONTENT_TYPE, CONTENT_TYPE)], body)
}

fn status((ok, body): (bool, String)) -> (StatusCode, String) {
    (
        if ok {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        },
        body,
    )
}

async fn healthz(State((health, _)): State<Shared>) -> impl IntoResponse {
    status(health.healthz())
}

async fn readyz(State((health, _)): State<Shared>) -> impl IntoResponse {
    status(health.readyz())
}

/// The endpoint's task: stops serving when dropped.
pub struct Server(JoinHandle<()>);

impl Drop for Server {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Listens on `addr` and serves `/metrics`, `/healthz` and `/readyz` until
/// the [`Server`] is dropped.
pub async fn serve(addr: SocketAddr, health: Arc<Health>) -> Result<Server, MetricsError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError::Listen { addr, source })?;
    let addr = listener.local_addr().unwrap_or(addr);
    let registry = Arc::new(registry(health.clone()));
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state((health, registry));
    tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
    Ok(Server(tokio::spawn(async move {
        if let Err(err) = axum::serve(listener, app).await {
            tracing::warn!(%err, "the metrics endpoint stopped");
        }
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_metrics_and_build_info_before_attach() {
        let health = Arc::new(Health::new(Duration::from_secs(5)));
        let mut p = crate::policy::Policy::embedded_default().unwrap();
        p.version = Some("v1".into());
        health.applied(1, &Arc::new(p), None);
        health.rejected(Some(Duration::from_millis(250)), None);
        let out = render(&registry(health.clone()));
        for line in [
            "mmesh_policy_generation 1",
            "mmesh_policy_info{version=\"v1\"} 1",
            "mmesh_policy_applies_total{result=\"applied\"} 1",
            "mmesh_policy_applies_total{result=\"rejected\"} 1",
            "mmesh_policy_last_apply_success 0",
            "mmesh_policy_last_apply_duration_seconds 0.25",
            &format!(
                "mmesh_build_info{{version=\"{}\"}} 1",
                env!("CARGO_PKG_VERSION")
            ),
        ] {
            assert!(out.lines().any(|l| l == line), "no `{line}` in:\n{out}");
        }
        assert!(out.ends_with("# EOF\n"), "{out}");
        // Not attached yet: not ready, but alive.
        assert!(!health.readyz().0);
        assert!(health.healthz().0);
    }

    #[test]
    fn healthz_fails_when_the_loop_stops_ticking() {
        let health = Health::new(Duration::from_secs(1));
        health.tick();
        assert!(health.healthz().0);
        *locked(&health.ticked) = Instant::now().checked_sub(Duration::from_secs(9));
        let (ok, body) = health.healthz();
        assert!(!ok, "{body}");
        assert!(body.contains("last ran"), "{body}");
    }
}
