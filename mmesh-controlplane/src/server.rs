//! `PolicyStream.Session`: one task per agent stream, following the
//! protocol of docs/control-plane.md.
//!
//! Hello → Snapshot (or nothing, when the agent holds the desired version)
//! → Ack or Nack → on each change of the node's desired policy, a Delta
//! against what the agent acknowledged (or a Snapshot when the agent takes no
//! deltas or holds a version whose content this stream never sent). One
//! Snapshot or Delta is in flight at a time: the next waits for the reply,
//! so the agent always gets a Delta against the version it holds.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use mmesh_agent::control::proto::{
    self, AgentMessage, ControlMessage, agent_message::Body as Up, control_message::Body as Down,
};
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use tonic::{Request, Status, Streaming};

use crate::{
    catalog::{Catalog, DeltaCache, Desired},
    events,
    status::Registry,
};

/// Messages queued for one agent: a Snapshot or Delta at a time, and
/// heartbeats.
const QUEUE: usize = 8;
/// A stream is dead after this many heartbeat intervals without a message.
const MISSED_HEARTBEATS: u32 = 3;

/// The `PolicyStream` service.
#[derive(Clone)]
pub struct Service {
    catalog: watch::Receiver<Arc<Catalog>>,
    heartbeat: Duration,
    /// Changes (to `true`, or by the sender going away) when the control
    /// plane stops: every session ends, so the server can.
    shutdown: watch::Receiver<bool>,
    registry: Arc<Registry>,
    deltas: Arc<DeltaCache>,
    /// The Hello's node must be a name of the client's certificate.
    verify_node_name: bool,
}

impl Service {
    #[must_use]
    pub fn new(
        catalog: watch::Receiver<Arc<Catalog>>,
        heartbeat: Duration,
        shutdown: watch::Receiver<bool>,
        registry: Arc<Registry>,
    ) -> Self {
        Self {
            catalog,
            heartbeat,
            shutdown,
            registry,
            deltas: Arc::default(),
            verify_node_name: false,
        }
    }

    /// Requires every Hello's node to be a DNS name of the client's
    /// certificate (mutual TLS): an agent gets only its own node's policy
    /// and reports only as itself.
    #[must_use]
    pub fn verify_node_name(mut self, verify: bool) -> Self {
        self.verify_node_name = verify;
        self
    }
}

/// What a session sends down its stream.
#[derive(Debug)]
#[expect(
    clippy::large_enum_variant,
    reason = "a stream's queue holds a few (QUEUE), as it held the same messages before; boxing would allocate for every heartbeat"
)]
pub enum Outbound {
    Message(ControlMessage),
    /// A Snapshot of `policy`, whose encoded message is shared by every
    /// stream it is sent on (`Desired::encoded`), not copied and encoded
    /// per stream.
    Snapshot {
        version: String,
        nonce: String,
        policy: Arc<Desired>,
    },
}

impl Service {
    /// `PolicyStream.Session`: starts the session of the stream `request`
    /// opened; what it sends, then how the stream ends (an error, or the
    /// queue closing for a clean end), comes out of the returned queue.
    #[must_use]
    pub fn session(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> mpsc::Receiver<Result<Outbound, Status>> {
        let peer = request.remote_addr();
        let identity = if self.verify_node_name {
            Identity::Certificate(request.peer_certs())
        } else {
            Identity::Unchecked
        };
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(QUEUE);
        let session = Session {
            node: String::new(),
            accepts_delta: false,
            tx,
            catalog: self.catalog.clone(),
            heartbeat: self.heartbeat,
            agent_heartbeat: None,
            held_version: String::new(),
            held: None,
            in_flight: None,
            refused: None,
            force_snapshot: false,
            nonces: 0,
            registry: Arc::clone(&self.registry),
            deltas: Arc::clone(&self.deltas),
        };
        tokio::spawn(session.run(inbound, peer, identity, self.shutdown.clone()));
        rx
    }
}

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
enum End {
    #[error("the agent closed the stream")]
    Closed,
    #[error("stream error: {0}")]
    Stream(String),
    #[error("no message for {0:?} ({MISSED_HEARTBEATS} heartbeat intervals)")]
    Silent(Duration),
    #[error("the control plane is shutting down")]
    Shutdown,
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("{0}")]
    Identity(String),
}

/// Who the client proved to be.
enum Identity {
    /// Not checked (no --verify-node-name).
    Unchecked,
    /// The client's certificate chain, if it presented one.
    Certificate(Option<Arc<Vec<CertificateDer<'static>>>>),
}

impl Identity {
    /// Whether `node` may be served to this client.
    fn allows(&self, node: &str) -> Result<(), End> {
        let Self::Certificate(chain) = self else {
            return Ok(());
        };
        let leaf = chain.as_ref().and_then(|c| c.first()).ok_or_else(|| {
            End::Identity(format!(
                "node {node:?}: the client presented no certificate (--verify-node-name needs --client-ca)"
            ))
        })?;
        let named = webpki::EndEntityCert::try_from(leaf).is_ok_and(|cert| {
            ServerName::try_from(node)
                .is_ok_and(|name| cert.verify_is_valid_for_subject_name(&name).is_ok())
        });
        if named {
            Ok(())
        } else {
            Err(End::Identity(format!(
                "node {node:?} is not a name of the client's certificate: each agent needs a certificate with its node name as a DNS name"
            )))
        }
    }
}

/// A Snapshot or Delta waiting for its Ack or Nack.
struct InFlight {
    nonce: String,
    desired: Arc<Desired>,
    snapshot: bool,
}

struct Session {
    node: String,
    accepts_delta: bool,
    tx: mpsc::Sender<Result<Outbound, Status>>,
    catalog: watch::Receiver<Arc<Catalog>>,
    heartbeat: Duration,
    /// The agent's heartbeat interval, from its Hello (when it said).
    agent_heartbeat: Option<Duration>,
    /// The version the agent enforces, as it last said ("" for none from a
    /// control plane).
    held_version: String,
    /// Its content, when this stream knows it: what the agent acknowledged, or the
    /// desired policy it resumed with. Deltas are computed against it.
    held: Option<Arc<Desired>>,
    in_flight: Option<InFlight>,
    /// A version the agent refused: not sent again until the desired
    /// version changes.
    refused: Option<String>,
    /// The agent asked for a Snapshot (its base did not match a Delta).
    force_snapshot: bool,
    nonces: u64,
    registry: Arc<Registry>,
    deltas: Arc<DeltaCache>,
}

impl Session {
    async fn run(
        mut self,
        mut inbound: Streaming<AgentMessage>,
        peer: Option<SocketAddr>,
        identity: Identity,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let end = match self.hello(&mut inbound, peer, &identity).await {
            Ok(()) => self.serve(&mut inbound, &mut shutdown).await,
            Err(end) => {
                // The agent sees why.
                let status = match &end {
                    End::Identity(why) => Status::permission_denied(why),
                    other => Status::invalid_argument(other.to_string()),
                };
                let _ = self.tx.send(Err(status)).await;
                end
            }
        };
        tracing::info!("{}: disconnected: {end}", self.node);
        if !self.node.is_empty() {
            self.registry.update(&self.node, |n| {
                let open = n.get("streams").and_then(Value::as_u64).unwrap_or(1);
                n.insert("streams".into(), json!(open.saturating_sub(1)));
                n.insert(
                    "disconnected".into(),
                    json!({ "unix_ms": unix_ms(), "reason": end.to_string() }),
                );
            });
        }
        events::emit(
            "disconnected",
            json!({ "node": self.node, "reason": end.to_string() }),
        );
    }

    /// Waits for the Hello and answers it.
    async fn hello(
        &mut self,
        inbound: &mut Streaming<AgentMessage>,
        peer: Option<SocketAddr>,
        identity: &Identity,
    ) -> Result<(), End> {
        let wait = self.heartbeat * MISSED_HEARTBEATS;
        let first = tokio::time::timeout(wait, inbound.message())
            .await
            .map_err(|_| End::Silent(wait))?;
        let hello = match first {
            Ok(Some(AgentMessage {
                body: Some(Up::Hello(hello)),
            })) => hello,
            Ok(Some(_)) => return Err(End::Protocol("the first message must be a Hello".into())),
            Ok(None) => return Err(End::Closed),
            Err(status) => return Err(End::Stream(status.message().to_owned())),
        };
        if hello.node.is_empty() {
            return Err(End::Protocol("the Hello names no node".into()));
        }
        if let Err(end) = identity.allows(&hello.node) {
            tracing::warn!(
                "{} refused: {end}",
                peer.map_or_else(|| "?".into(), |p| p.to_string())
            );
            return Err(end);
        }
        self.node = hello.node;
        self.accepts_delta = hello.accepts.iter().any(|a| a == "delta");
        self.agent_heartbeat = (hello.heartbeat_millis > 0)
            .then(|| Duration::from_millis(u64::from(hello.heartbeat_millis)));
        self.held_version = hello.policy_version;
        tracing::info!(
            "{}: connected from {}, agent {}, enforcing {:?}",
            self.node,
            peer.map_or_else(|| "?".into(), |p| p.to_string()),
            hello.agent_version,
            self.held_version
        );
        self.registry.update(&self.node, |n| {
            let open = n.get("streams").and_then(Value::as_u64).unwrap_or(0);
            n.insert("streams".into(), json!(open + 1));
            n.insert(
                "connected".into(),
                json!({
                    "unix_ms": unix_ms(),
                    "peer": peer.map(|p| p.to_string()),
                    "agent_version": hello.agent_version,
                    "policy_version": self.held_version,
                }),
            );
            n.insert("enforced".into(), json!(self.held_version));
        });
        events::emit(
            "connected",
            json!({
                "node": self.node,
                "peer": peer.map(|p| p.to_string()),
                "agent_version": hello.agent_version,
                "kernel": hello.kernel,
                "policy_version": self.held_version,
                "generation": hello.generation,
                "accepts": hello.accepts,
            }),
        );
        self.sync().await
    }

    async fn serve(
        &mut self,
        inbound: &mut Streaming<AgentMessage>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> End {
        // Beats at least as often as the agent's, which gives up after
        // three of its own; silence judged on the larger of the two.
        let (every, silence) = match self.agent_heartbeat {
            Some(agent) => (
                self.heartbeat.min(agent),
                MISSED_HEARTBEATS * self.heartbeat.max(agent),
            ),
            None => (self.heartbeat, MISSED_HEARTBEATS * self.heartbeat),
        };
        let start = tokio::time::Instant::now() + every;
        let mut ticks = tokio::time::interval_at(start, every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_heard = Instant::now();
        loop {
            let step = tokio::select! {
                message = inbound.message() => match message {
                    Ok(Some(message)) => {
                        last_heard = Instant::now();
                        self.handle(message).await
                    }
                    Ok(None) => Err(End::Closed),
                    Err(status) => Err(End::Stream(status.message().to_owned())),
                },
                changed = self.catalog.changed() => match changed {
                    Ok(()) => self.sync().await,
                    Err(_) => Err(End::Shutdown),
                },
                _ = shutdown.changed() => Err(End::Shutdown),
                _ = ticks.tick() => {
                    if last_heard.elapsed() > silence {
                        Err(End::Silent(silence))
                    } else {
                        self.send(Down::Heartbeat(proto::Heartbeat { unix_ms: unix_ms() })).await
                    }
                }
            };
            if let Err(end) = step {
                return end;
            }
        }
    }

    async fn handle(&mut self, message: AgentMessage) -> Result<(), End> {
        match message.body {
            Some(Up::Ack(ack)) => self.ack(ack).await,
            Some(Up::Nack(nack)) => self.nack(nack).await,
            Some(Up::Reports(reports)) => {
                events::emit("report", reports_fields(&self.node, &reports));
                Ok(())
            }
            Some(Up::Status(status)) => {
                events::emit("status", status_fields(&self.node, &status));
                Ok(())
            }
            Some(Up::Heartbeat(_)) => Ok(()),
            Some(Up::Hello(_)) => Err(End::Protocol(
                "a second Hello on the stream (a Hello opens a stream)".into(),
            )),
            // A message of a newer contract with a field this one lacks.
            None => {
                tracing::debug!("{}: a message with no body known here", self.node);
                Ok(())
            }
        }
    }

    async fn ack(&mut self, ack: proto::Ack) -> Result<(), End> {
        tracing::info!(
            "{}: ACK {} (generation {}, {} µs)",
            self.node,
            ack.version,
            ack.generation,
            ack.apply_micros
        );
        events::emit(
            "ack",
            json!({
                "node": self.node,
                "version": ack.version,
                "nonce": ack.nonce,
                "generation": ack.generation,
                "apply_micros": ack.apply_micros,
            }),
        );
        self.registry.update(&self.node, |n| {
            n.insert("enforced".into(), json!(ack.version));
            n.insert(
                "acked".into(),
                json!({
                    "version": ack.version,
                    "generation": ack.generation,
                    "apply_micros": ack.apply_micros,
                    "unix_ms": unix_ms(),
                }),
            );
            n.insert("last_reply".into(), json!("ack"));
        });
        let Some(sent) = self.in_flight.take_if(|f| f.nonce == ack.nonce) else {
            tracing::warn!(
                "{}: an Ack with nonce {:?}, which is not the one in flight: ignored",
                self.node,
                ack.nonce
            );
            return Ok(());
        };
        self.held_version = ack.version;
        self.held = (self.held_version == sent.desired.version).then_some(sent.desired);
        self.sync().await
    }

    async fn nack(&mut self, nack: proto::Nack) -> Result<(), End> {
        tracing::warn!(
            "{}: NACK {} (still enforcing {:?}{}): {}",
            self.node,
            nack.version,
            nack.enforced_version,
            if nack.snapshot_required {
                ", snapshot required"
            } else {
                ""
            },
            mmesh_agent::control::in_force::describe(&nack.problems)
        );
        let problems: Vec<Value> = nack
            .problems
            .iter()
            .map(|p| json!({ "path": p.path, "message": p.message }))
            .collect();
        self.registry.update(&self.node, |n| {
            n.insert("enforced".into(), json!(nack.enforced_version));
            n.insert(
                "nacked".into(),
                json!({
                    "version": nack.version,
                    "enforced_version": nack.enforced_version,
                    "snapshot_required": nack.snapshot_required,
                    "problems": problems,
                    "unix_ms": unix_ms(),
                }),
            );
            n.insert("last_reply".into(), json!("nack"));
        });
        events::emit(
            "nack",
            json!({
                "node": self.node,
                "version": nack.version,
                "nonce": nack.nonce,
                "enforced_version": nack.enforced_version,
                "generation": nack.generation,
                "snapshot_required": nack.snapshot_required,
                "problems": problems,
            }),
        );
        let Some(sent) = self.in_flight.take_if(|f| f.nonce == nack.nonce) else {
            tracing::warn!(
                "{}: a Nack with nonce {:?}, which is not the one in flight: ignored",
                self.node,
                nack.nonce
            );
            return Ok(());
        };
        if self.held_version != nack.enforced_version {
            self.held_version = nack.enforced_version;
            self.held = None;
        }
        // A Snapshot has no base: an agent that asks for a Snapshot in
        // reply to one would loop; it counts as a refusal.
        if nack.snapshot_required && !sent.snapshot {
            self.force_snapshot = true;
        } else {
            self.refused = Some(sent.desired.version.clone());
        }
        self.sync().await
    }

    /// Sends what the agent lacks, if anything and if nothing is in flight.
    async fn sync(&mut self) -> Result<(), End> {
        let Some(desired) = self
            .catalog
            .borrow_and_update()
            .for_node(&self.node)
            .cloned()
        else {
            return Ok(());
        };
        if self.in_flight.is_some() {
            return Ok(());
        }
        if desired.version == self.held_version {
            // A resume, or a change back to what the agent holds.
            if self.held.is_none() {
                self.held = Some(desired);
            }
            return Ok(());
        }
        if self.refused.as_deref() == Some(desired.version.as_str()) {
            return Ok(());
        }
        self.refused = None;
        self.nonces += 1;
        let nonce = self.nonces.to_string();
        let base = self
            .held
            .as_ref()
            .filter(|_| self.accepts_delta && !self.force_snapshot);
        let (body, line) = if let Some(base) = base {
            let mut delta = proto::Delta::clone(&self.deltas.get(base, &desired));
            delta.nonce.clone_from(&nonce);
            let line = json!({
                "node": self.node,
                "version": desired.version,
                "nonce": nonce,
                "kind": "delta",
                "base_version": delta.base_version,
                "accounts": delta.upsert_accounts.len(),
                "removed": delta.remove_accounts.len(),
                "global": delta.global.is_some(),
            });
            (
                Outbound::Message(ControlMessage {
                    body: Some(Down::Delta(delta)),
                }),
                line,
            )
        } else {
            let line = json!({
                "node": self.node,
                "version": desired.version,
                "nonce": nonce,
                "kind": "snapshot",
                "accounts": desired.accounts(),
            });
            (
                Outbound::Snapshot {
                    version: desired.version.clone(),
                    nonce: nonce.clone(),
                    policy: Arc::clone(&desired),
                },
                line,
            )
        };
        let snapshot = matches!(body, Outbound::Snapshot { .. });
        self.force_snapshot = false;
        self.tx.send(Ok(body)).await.map_err(|_| End::Closed)?;
        tracing::info!(
            "{}: sent {} {} (nonce {nonce})",
            self.node,
            if snapshot { "snapshot" } else { "delta" },
            desired.version
        );
        self.registry.update(&self.node, |n| {
            n.insert("sent".into(), line.clone());
        });
        events::emit("sent", line);
        self.in_flight = Some(InFlight {
            nonce,
            desired,
            snapshot,
        });
        Ok(())
    }

    async fn send(&self, body: Down) -> Result<(), End> {
        self.tx
            .send(Ok(Outbound::Message(ControlMessage { body: Some(body) })))
            .await
            .map_err(|_| End::Closed)
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn reports_fields(node: &str, reports: &proto::Reports) -> Value {
    json!({
        "node": node,
        "coarsened": reports.coarsened,
        "dropped": reports.dropped,
        "violations": reports.violations.iter().map(|v| json!({
            "account": v.account,
            "reason": v.reason,
            "verdict": v.verdict,
            "direction": v.direction,
            "remote_prefix": v.remote_prefix,
            "events": v.events,
            "first_unix_ms": v.first_unix_ms,
            "last_unix_ms": v.last_unix_ms,
        })).collect::<Vec<_>>(),
    })
}

fn status_fields(node: &str, s: &proto::Status) -> Value {
    json!({
        "node": node,
        "policy_version": s.policy_version,
        "generation": s.generation,
        "packets": s.packets,
        "dropped": s.dropped,
        "monitored": s.monitored,
        "accounts": s.accounts,
        "account_prefixes": s.account_prefixes,
        "list_prefixes": s.list_prefixes,
        "events_lost_ring": s.events_lost_ring,
        "events_lost_queues": s.events_lost_queues,
        "attached": s.attached,
    })
}
