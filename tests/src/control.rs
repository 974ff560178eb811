//! A scripted control plane for the agent's end-to-end tests: a real gRPC
//! server (the generated `PolicyStream` service) on a listener the test
//! makes (in the agent's network namespace), which records everything the
//! agent sends and sends what the test tells it to, on the current stream.

use std::{
    net::{SocketAddr, TcpListener},
    sync::{
        Arc, Condvar, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use mmesh_agent::control::proto::{
    self, AgentMessage, ControlMessage,
    agent_message::Body as Up,
    control_message::Body,
    policy_stream_server::{PolicyStream, PolicyStreamServer},
};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming, transport::ServerTlsConfig};

/// Where the current stream's messages go down.
type Down = mpsc::Sender<Result<ControlMessage, Status>>;

#[derive(Default)]
struct State {
    /// Every message from every stream, in arrival order, with the number
    /// of the stream it came on (from 1).
    received: Mutex<Vec<(usize, AgentMessage)>>,
    /// Signalled at every message received.
    arrived: Condvar,
    /// The current stream's way down, and its number.
    current: Mutex<Option<(usize, Down)>>,
    streams: Mutex<usize>,
    /// No heartbeats on the current stream (else one every 300 ms).
    silent: AtomicBool,
}

struct Service(Arc<State>);

#[tonic::async_trait]
impl PolicyStream for Service {
    type SessionStream = ReceiverStream<Result<ControlMessage, Status>>;

    async fn session(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let (tx, rx) = mpsc::channel(64);
        let number = {
            let mut n = self
                .0
                .streams
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            *n += 1;
            *n
        };
        *self
            .0
            .current
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some((number, tx));
        let state = self.0.clone();
        let mut inbound = request.into_inner();
        tokio::spawn(async move {
            while let Ok(Some(message)) = inbound.message().await {
                state
                    .received
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push((number, message));
                state.arrived.notify_all();
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// The scripted control plane; stops serving when dropped.
pub struct ScriptedControlPlane {
    pub addr: SocketAddr,
    state: Arc<State>,
    runtime: tokio::runtime::Runtime,
    shutdown: Option<oneshot::Sender<()>>,
}

impl ScriptedControlPlane {
    /// Serves on `listener` (made by the test, e.g. with
    /// `NetNs::tcp_listener`), with TLS when `tls` is given.
    #[must_use]
    pub fn serve(listener: TcpListener, tls: Option<ServerTlsConfig>) -> Self {
        let addr = listener.local_addr().expect("listener address");
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a runtime for the control plane");
        let state = Arc::new(State::default());
        let (shutdown, stop) = oneshot::channel::<()>();
        let beating = state.clone();
        runtime.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(300));
            loop {
                tick.tick().await;
                let tx = beating
                    .current
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .as_ref()
                    .map(|(_, tx)| tx.clone());
                if let Some(tx) = tx
                    && !beating.silent.load(Ordering::Relaxed)
                {
                    let beat = Body::Heartbeat(proto::Heartbeat { unix_ms: 0 });
                    let _ = tx.try_send(Ok(ControlMessage { body: Some(beat) }));
                }
            }
        });
        let service =
            PolicyStreamServer::new(Service(state.clone())).max_decoding_message_size(64 << 20);
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
            // No Nagle: send-to-Ack times of small deltas are measured.
            let incoming =
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
            let mut server = tonic::transport::Server::builder();
            if let Some(tls) = tls {
                server = server.tls_config(tls).expect("server TLS config");
            }
            let _ = server
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stop.await;
                })
                .await;
        });
        Self {
            addr,
            state,
            runtime,
            shutdown: Some(shutdown),
        }
    }

    /// `http://ADDR`.
    #[must_use]
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Streams opened so far.
    #[must_use]
    pub fn streams(&self) -> usize {
        *self
            .state
            .streams
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Sends `body` on the current stream.
    pub fn send(&self, body: Body) {
        let tx = self
            .state
            .current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .map(|(_, tx)| tx.clone())
            .expect("an agent has opened a stream");
        self.runtime
            .block_on(tx.send(Ok(ControlMessage { body: Some(body) })))
            .expect("the stream is open");
    }

    /// Stops (or resumes) heartbeats: a control plane that hangs without
    /// closing its stream.
    pub fn set_silent(&self, silent: bool) {
        self.state.silent.store(silent, Ordering::Relaxed);
    }

    /// Ends the current stream from the control plane's side.
    pub fn disconnect(&self) {
        self.state
            .current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
    }

    /// Messages received so far.
    #[must_use]
    pub fn received(&self) -> Vec<(usize, AgentMessage)> {
        self.state
            .received
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Waits up to `timeout` for a message at or after index `from` that
    /// `matches`; returns its index and body. Panics with `what` and the
    /// messages seen when none comes.
    pub fn wait_for(
        &self,
        what: &str,
        from: usize,
        timeout: Duration,
        matches: impl Fn(&Up) -> bool,
    ) -> (usize, Up) {
        let deadline = Instant::now() + timeout;
        let mut received = self
            .state
            .received
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some((i, body)) =
                received
                    .iter()
                    .enumerate()
                    .skip(from)
                    .find_map(|(i, (_, m))| {
                        m.body
                            .as_ref()
                            .filter(|b| matches(b))
                            .map(|b| (i, b.clone()))
                    })
            {
                return (i, body);
            }
            let now = Instant::now();
            assert!(
                now < deadline,
                "no {what} from the agent within {timeout:?}; received: {:?}",
                received
                    .iter()
                    .map(|(n, m)| format!("stream {n}: {}", describe(m)))
                    .collect::<Vec<_>>()
            );
            // Woken by every message: send-to-answer times are measured
            // with this.
            received = self
                .state
                .arrived
                .wait_timeout(received, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Sends a snapshot and waits for its Ack or Nack.
    pub fn push_snapshot(&self, version: &str, policy: proto::Policy) -> Up {
        let nonce = format!("n-{version}");
        let from = self.received().len();
        self.send(Body::Snapshot(proto::Snapshot {
            version: version.into(),
            nonce: nonce.clone(),
            policy: Some(policy),
        }));
        self.answer(&nonce, from)
    }

    /// Sends a delta and waits for its Ack or Nack.
    pub fn push_delta(&self, delta: proto::Delta) -> Up {
        let nonce = format!("n-{}", delta.version);
        let from = self.received().len();
        self.send(Body::Delta(proto::Delta {
            nonce: nonce.clone(),
            ..delta
        }));
        self.answer(&nonce, from)
    }

    fn answer(&self, nonce: &str, from: usize) -> Up {
        self.wait_for(
            &format!("answer to {nonce}"),
            from,
            Duration::from_mins(1),
            |b| {
                matches!(b, Up::Ack(a) if a.nonce == nonce)
                    || matches!(b, Up::Nack(n) if n.nonce == nonce)
            },
        )
        .1
    }
}

/// One line about a message, for failure messages.
fn describe(m: &AgentMessage) -> String {
    match &m.body {
        Some(Up::Hello(h)) => format!("hello node={} version={:?}", h.node, h.policy_version),
        Some(Up::Ack(a)) => format!("ack {} gen {}", a.version, a.generation),
        Some(Up::Nack(n)) => format!("nack {} {:?}", n.version, n.problems),
        Some(Up::Reports(r)) => format!("reports {}", r.violations.len()),
        Some(Up::Status(s)) => format!("status {}", s.policy_version),
        Some(Up::Heartbeat(_)) => "heartbeat".into(),
        None => "empty".into(),
    }
}

impl Drop for ScriptedControlPlane {
    fn drop(&mut self) {
        self.disconnect();
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}
