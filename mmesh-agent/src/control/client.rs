//! The agent's stream to the control plane (docs/control-plane.md).
//!
//! One task keeps one stream: it dials out, says Hello (with the version it
//! enforces, so that an unchanged policy is not sent again), then answers
//! every Snapshot and Delta with an Ack or a Nack, in order, and sends
//! heartbeats, violation reports and status. A stream that fails, or from
//! which nothing arrives for three heartbeat intervals, is dropped and
//! dialled again after a jittered exponential backoff. Enforcement never
//! waits on the stream: policies go to the enforcer, reports come from a
//! bounded aggregate, and a full send queue costs reports and status, never
//! an Ack.

use std::{
    hash::{BuildHasher as _, Hasher as _},
    path::PathBuf,
    sync::{Arc, PoisonError},
    time::{Duration, Instant},
};

use prost::Message as _;
use tokio::sync::mpsc;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

use super::{
    frames,
    in_force::{self, InForce, Refusal},
    proto::{self, agent_message::Body as Up},
    reports,
    store::{Saver, Store},
    wire::{self, Body as Down},
};
use crate::{
    agent::{CONTROL_PLANE, Enforcement, Outcome},
    metrics::Health,
    policy::ReadLimits,
    sink::escape_controls,
};

/// Messages queued towards the control plane at most. Acks and Nacks wait
/// for room; when there is none, a heartbeat or a status is skipped (the
/// next one follows an interval later) and a report is dropped and counted
/// in the next one.
const OUTBOUND_QUEUE: usize = 64;

/// How the agent reaches its control plane.
#[derive(Clone, Debug)]
pub struct Options {
    /// `https://host:port`, or `http://host:port` with `plaintext`.
    pub url: String,
    /// TLS: the CA that signed the control plane's certificate (the only
    /// one trusted), and the agent's own certificate and key for mutual
    /// TLS. `None`: plaintext, only when asked for explicitly.
    pub tls: Option<Tls>,
    /// The node name said in Hello.
    pub node: String,
    pub heartbeat: Duration,
    pub report_interval: Duration,
    pub status_interval: Duration,
    /// First and largest pause between connection attempts.
    pub backoff: (Duration, Duration),
    /// Bounds for policy messages, as for files.
    pub limits: ReadLimits,
    /// Where the last Acked policy is kept.
    pub store: Option<Store>,
}

#[derive(Clone, Debug)]
pub struct Tls {
    pub ca: PathBuf,
    /// Client certificate and key (PEM), for mutual TLS.
    pub identity: Option<(PathBuf, PathBuf)>,
    /// The name the server's certificate must carry, when not the URL's host.
    pub domain: Option<String>,
}

/// Why a connection attempt or stream ended.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot read {path}: {source}")]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid control-plane address or TLS settings: {0}")]
    Endpoint(#[source] tonic::transport::Error),
    #[error("cannot connect: {0}")]
    Connect(#[source] tonic::transport::Error),
    #[error("the control plane refused the stream: {0}")]
    Refused(#[source] tonic::Status),
    #[error("the stream failed: {0}")]
    Stream(#[source] tonic::Status),
    #[error("the control plane closed the stream")]
    Closed,
    #[error("nothing received for {0:?} (three heartbeat intervals)")]
    Silent(Duration),
    #[error("the agent is stopping")]
    Stopping,
}

/// Facts about this host for Hello.
#[derive(Clone, Debug, Default)]
pub struct HostFacts {
    pub kernel: String,
    pub features: Vec<String>,
    pub capacity: proto::Capacity,
}

/// Builds a Status message from the agent's read-only handles.
pub type StatusFn = Arc<dyn Fn(&str, u64) -> proto::Status + Send + Sync>;

/// The client: what it holds and where it sends.
pub struct Client {
    opts: Options,
    enforcement: Enforcement,
    facts: HostFacts,
    /// The control-plane policy in force (from the last Ack, or the
    /// last-known-good file at start).
    /// Shared with the validation task of the next delta.
    in_force: Option<Arc<InForce>>,
    /// Writes the last-known-good file.
    saver: Option<Saver>,
    /// The agent's generation in force.
    generation: u64,
    reports: reports::Shared,
    status: StatusFn,
    /// Counts the snapshots refused for a full map
    /// (`mmesh_map_inserts_refused_total`).
    health: Arc<Health>,
}

impl Client {
    #[must_use]
    pub fn new(
        opts: Options,
        enforcement: Enforcement,
        facts: HostFacts,
        (in_force, generation): (Option<InForce>, u64),
        reports: reports::Shared,
        (status, health): (StatusFn, Arc<Health>),
    ) -> Self {
        let saver = opts.store.clone().and_then(|store| {
            Saver::spawn(store)
                .inspect_err(|err| {
                    tracing::warn!(
                        "control plane: no thread to keep the last-known-good policy: {err}"
                    );
                })
                .ok()
        });
        Self {
            opts,
            enforcement,
            facts,
            in_force: in_force.map(Arc::new),
            saver,
            generation,
            reports,
            status,
            health,
        }
    }

    /// The version in force from the control plane ("" when none is).
    fn version(&self) -> &str {
        self.in_force
            .as_ref()
            .map_or("", |f| f.held.version.as_str())
    }

    /// Keeps a stream to the control plane until the task is dropped.
    pub async fn run(mut self) {
        let mut failures: u32 = 0;
        loop {
            let started = Instant::now();
            let mut heard = false;
            let err = self.stream(&mut heard).await;
            if matches!(err, ClientError::Stopping) {
                return;
            }
            // A stream that got as far as a message from the control plane
            // starts the backoff over.
            if heard {
                failures = 0;
            }
            let pause = backoff(self.opts.backoff, failures);
            failures = failures.saturating_add(1);
            tracing::warn!(
                url = %self.opts.url,
                after_s = started.elapsed().as_secs(),
                "control plane: {}; the policy in force stays; connecting again in {:.1} s",
                escape_controls(&format!("{err:#}")),
                pause.as_secs_f64()
            );
            tokio::time::sleep(pause).await;
        }
    }

    fn endpoint(&self) -> Result<Endpoint, ClientError> {
        let mut endpoint = Endpoint::from_shared(self.opts.url.clone())
            .map_err(ClientError::Endpoint)?
            .connect_timeout(Duration::from_secs(10))
            .tcp_keepalive(Some(Duration::from_secs(30)));
        if let Some(tls) = &self.opts.tls {
            let read = |path: &PathBuf| {
                std::fs::read(path).map_err(|source| ClientError::File {
                    path: path.clone(),
                    source,
                })
            };
            let mut config =
                ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(&tls.ca)?));
            if let Some((cert, key)) = &tls.identity {
                config = config.identity(Identity::from_pem(read(cert)?, read(key)?));
            }
            if let Some(domain) = &tls.domain {
                config = config.domain_name(domain.clone());
            }
            endpoint = endpoint.tls_config(config).map_err(ClientError::Endpoint)?;
        }
        Ok(endpoint)
    }

    /// One stream, from dialling to its end. `heard` turns true once the
    /// control plane has said anything.
    async fn stream(&mut self, heard: &mut bool) -> ClientError {
        match self.stream_inner(heard).await {
            Ok(never) => match never {},
            Err(err) => err,
        }
    }

    async fn stream_inner(
        &mut self,
        heard: &mut bool,
    ) -> Result<std::convert::Infallible, ClientError> {
        let mut channel = self
            .endpoint()?
            .connect()
            .await
            .map_err(ClientError::Connect)?;
        // Twice the policy budget: a message a little over it is still read,
        // and Nacked with the option to raise (a larger one ends the stream).
        let max =
            usize::try_from(self.opts.limits.max_bytes.saturating_mul(2)).unwrap_or(usize::MAX);
        let (tx, rx) = mpsc::channel::<proto::AgentMessage>(OUTBOUND_QUEUE);
        let hello = self.hello();
        tracing::info!(
            url = %self.opts.url,
            node = %hello.node,
            version = %hello.policy_version,
            "control plane: connected; saying hello"
        );
        send(&tx, Up::Hello(hello)).await?;
        // Not tonic's generated client: its `Streaming` would keep a buffer
        // the size of the largest message for the stream's life (frames.rs).
        let mut inbound = frames::open(&mut channel, rx, max)
            .await
            .map_err(ClientError::Refused)?;

        let mut heartbeat = tokio::time::interval(self.opts.heartbeat);
        let mut report = tokio::time::interval(self.opts.report_interval);
        let mut status = tokio::time::interval(self.opts.status_interval);
        for t in [&mut heartbeat, &mut report, &mut status] {
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        }
        let mut last_heard = Instant::now();
        loop {
            tokio::select! {
                message = inbound.message::<wire::ControlMessage>() => {
                    let message = message.map_err(ClientError::Stream)?.ok_or(ClientError::Closed)?;
                    *heard = true;
                    last_heard = Instant::now();
                    match message.body {
                        Some(Down::Snapshot(s)) => self.snapshot(s, &tx).await?,
                        Some(Down::Delta(d)) => self.delta(d, &tx).await?,
                        Some(Down::Heartbeat(_)) | None => {}
                    }
                }
                _ = heartbeat.tick() => {
                    let silent = last_heard.elapsed();
                    if silent > 3 * self.opts.heartbeat {
                        return Err(ClientError::Silent(silent));
                    }
                    let _ = tx.try_send(up(Up::Heartbeat(proto::Heartbeat { unix_ms: reports::unix_ms() })));
                }
                _ = report.tick() => self.report(&tx),
                _ = status.tick() => {
                    let version = self.version();
                    let _ = tx.try_send(up(Up::Status((self.status)(version, self.generation))));
                }
            }
        }
    }

    fn hello(&self) -> proto::Hello {
        proto::Hello {
            node: self.opts.node.clone(),
            agent_version: env!("CARGO_PKG_VERSION").into(),
            kernel: self.facts.kernel.clone(),
            features: self.facts.features.clone(),
            capacity: Some(self.facts.capacity),
            policy_version: self.version().to_owned(),
            generation: self.generation,
            accepts: vec!["delta".into()],
            heartbeat_millis: u32::try_from(self.opts.heartbeat.as_millis()).unwrap_or(u32::MAX),
        }
    }

    /// Sends what the aggregate holds, if anything; a full queue loses it
    /// (counted in the next report).
    fn report(&self, tx: &mpsc::Sender<proto::AgentMessage>) {
        let mut agg = self.reports.lock().unwrap_or_else(PoisonError::into_inner);
        if agg.is_empty() {
            return;
        }
        let events = agg.events();
        let batch = agg.take();
        if tx.try_send(up(Up::Reports(batch))).is_err() {
            agg.lose(events);
        }
    }

    async fn snapshot(
        &mut self,
        s: wire::Snapshot,
        tx: &mpsc::Sender<proto::AgentMessage>,
    ) -> Result<(), ClientError> {
        let received = Instant::now();
        // Until the answer: the enforcer compiles and applies it meanwhile.
        let _prompt = crate::alloc::PromptReturn::new();
        if s.version.is_empty() {
            return self
                .nack(
                    tx,
                    &s.nonce,
                    &s.version,
                    problems("version", "a snapshot needs a version"),
                    false,
                )
                .await;
        }
        let bytes = s.encoded_len() as u64;
        if bytes > self.opts.limits.max_bytes {
            let message = format!(
                "the snapshot is {bytes} bytes, over this agent's --max-policy-bytes {}",
                self.opts.limits.max_bytes
            );
            return self
                .nack(tx, &s.nonce, &s.version, problems("", &message), false)
                .await;
        }
        tracing::info!(version = %s.version, accounts = s.policy.as_ref().map_or(0, |p| p.accounts.len()), "control plane: snapshot received");
        let (version, message) = (s.version.clone(), s.policy.unwrap_or_default());
        let limits = self.opts.limits.clone();
        let validated = tokio::task::spawn_blocking(move || {
            let validated =
                InForce::received(version, message, &limits).map_err(|e| Refusal::from(&e));
            crate::alloc::release_free_memory();
            validated
        })
        .await
        .map_err(|_| ClientError::Stopping)?;
        let answered = self
            .enforce(validated, &s.version, &s.nonce, (received, None), tx)
            .await;
        // After the answer: the message was decoded on this thread, and
        // what it freed (the receive buffer, the message's account vector)
        // stays in this thread's heap until asked for.
        crate::alloc::release_free_memory();
        answered
    }

    async fn delta(
        &mut self,
        d: proto::Delta,
        tx: &mpsc::Sender<proto::AgentMessage>,
    ) -> Result<(), ClientError> {
        let received = Instant::now();
        let Some(base) = self.in_force.clone() else {
            let message = format!(
                "the delta is against version {:?}, but this agent holds no control-plane policy: send a snapshot",
                d.base_version
            );
            return self
                .nack(
                    tx,
                    &d.nonce,
                    &d.version,
                    problems("base_version", &message),
                    true,
                )
                .await;
        };
        tracing::info!(version = %d.version, base = %d.base_version, upserts = d.upsert_accounts.len(), removals = d.remove_accounts.len(), "control plane: delta received");
        let limits = self.opts.limits.clone();
        let version = d.version.clone();
        let nonce = d.nonce.clone();
        let (validated, d) = tokio::task::spawn_blocking(move || (base.delta(&d, &limits), d))
            .await
            .map_err(|_| ClientError::Stopping)?;
        self.enforce(validated, &version, &nonce, (received, Some(d)), tx)
            .await
    }

    /// Has the enforcer apply a validated policy, answers, and on success
    /// keeps it (and has it written as last-known-good: whole after a
    /// snapshot, appended after a delta, which `delta` is).
    async fn enforce(
        &mut self,
        validated: Result<InForce, Refusal>,
        version: &str,
        nonce: &str,
        (received, delta): (Instant, Option<proto::Delta>),
        tx: &mpsc::Sender<proto::AgentMessage>,
    ) -> Result<(), ClientError> {
        tracing::debug!(
            version,
            ms = received.elapsed().as_secs_f64() * 1e3,
            "control plane: validated"
        );
        let next = match validated {
            Ok(next) => next,
            Err(Refusal::Base { held, base }) => {
                let message = format!(
                    "the delta is against version {base:?}, but this agent holds {held:?}: send a snapshot"
                );
                return self
                    .nack(tx, nonce, version, problems("base_version", &message), true)
                    .await;
            }
            Err(Refusal::Problems { problems, full }) => {
                tracing::error!(
                    version,
                    "control plane: policy rejected, the running policy stays in force: {}",
                    escape_controls(&in_force::describe(&problems))
                );
                if let Some(map) = full {
                    self.health.refused(map);
                }
                return self.nack(tx, nonce, version, problems, false).await;
            }
        };
        match self
            .enforcement
            .apply(next.policy.clone(), CONTROL_PLANE)
            .await
        {
            None => Err(ClientError::Stopping),
            Some(Outcome::Rejected { generation, reason }) => {
                self.generation = generation;
                self.nack(tx, nonce, version, problems("", &reason), false)
                    .await
            }
            Some(Outcome::Applied { generation, .. }) => {
                self.generation = generation;
                let apply_micros = received.elapsed().as_micros() as u64;
                send(
                    tx,
                    Up::Ack(proto::Ack {
                        nonce: nonce.into(),
                        version: version.into(),
                        generation,
                        apply_micros,
                    }),
                )
                .await?;
                tracing::info!(
                    version,
                    generation,
                    apply_ms = apply_micros as f64 / 1e3,
                    "control plane: policy in force, Acked"
                );
                let next = Arc::new(next);
                if let Some(saver) = &self.saver {
                    match delta {
                        Some(delta) => saver.delta(next.clone(), delta),
                        None => saver.snapshot(next.clone()),
                    }
                }
                self.in_force = Some(next);
                Ok(())
            }
        }
    }

    async fn nack(
        &self,
        tx: &mpsc::Sender<proto::AgentMessage>,
        nonce: &str,
        version: &str,
        problems: Vec<proto::Problem>,
        snapshot_required: bool,
    ) -> Result<(), ClientError> {
        tracing::warn!(
            version,
            problems = problems.len(),
            snapshot_required,
            "control plane: Nacked"
        );
        send(
            tx,
            Up::Nack(proto::Nack {
                nonce: nonce.into(),
                version: version.into(),
                enforced_version: self.version().to_owned(),
                generation: self.generation,
                problems,
                snapshot_required,
            }),
        )
        .await
    }
}

fn up(body: Up) -> proto::AgentMessage {
    proto::AgentMessage { body: Some(body) }
}

async fn send(tx: &mpsc::Sender<proto::AgentMessage>, body: Up) -> Result<(), ClientError> {
    tx.send(up(body)).await.map_err(|_| ClientError::Closed)
}

fn problems(path: &str, message: &str) -> Vec<proto::Problem> {
    vec![proto::Problem {
        path: path.into(),
        message: message.into(),
    }]
}

/// The pause before attempt `failures + 1`: "full jitter" (a random time
/// up to the exponential bound), so that a fleet that lost its control
/// plane at once does not dial back at once.
fn backoff((first, max): (Duration, Duration), failures: u32) -> Duration {
    let bound = first.saturating_mul(1 << failures.min(20)).min(max);
    let random = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    let fraction = (random >> 11) as f64 / (1u64 << 53) as f64;
    bound.mul_f64(fraction).max(first / 4)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_cap_and_is_jittered() {
        let bounds = (Duration::from_millis(500), Duration::from_secs(30));
        for failures in 0..40 {
            let limit = Duration::from_millis(500)
                .saturating_mul(1 << failures.min(20))
                .min(Duration::from_secs(30));
            let pause = backoff(bounds, failures);
            assert!(
                pause <= limit && pause >= Duration::from_millis(125),
                "{failures}: {pause:?}"
            );
        }
        let pauses: std::collections::HashSet<_> = (0..20).map(|_| backoff(bounds, 10)).collect();
        assert!(pauses.len() > 1, "the pause is random");
    }
}
