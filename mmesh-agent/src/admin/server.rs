//! The agent's side of the admin socket.

use std::{
    collections::HashSet,
    io::{BufWriter, ErrorKind, Write as _},
    os::{
        fd::AsRawFd as _,
        unix::{
            fs::{DirBuilderExt as _, FileTypeExt as _, MetadataExt as _, PermissionsExt as _},
            net::{UnixListener as StdListener, UnixStream as StdStream},
        },
    },
    path::{Path, PathBuf},
    sync::Arc,
    thread,
    time::Duration,
};

use serde::Serialize;
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    sync::{OwnedSemaphorePermit, Semaphore},
    task::JoinHandle,
};

use super::{AdminError, MAX_CLIENTS, Reply, Request, TopBy, recent::Recent, view};
use crate::{
    events::EventRecord,
    fanout::{Batch, Fanout},
    metrics::Health,
};

/// Bytes of a request line at most.
const MAX_REQUEST: u64 = 64 * 1024;
/// How long a client may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Batches queued for one `events --follow` client at most (up to 256
/// events each); beyond, that client alone loses them, counted and told.
pub const FOLLOW_QUEUE: usize = 64;

/// The bound socket; removed when dropped, if it is still this one (an
/// agent that fails to start leaves no stale socket behind).
pub struct Socket {
    listener: Option<StdListener>,
    path: PathBuf,
    ino: u64,
}

impl Drop for Socket {
    fn drop(&mut self) {
        if std::fs::metadata(&self.path).is_ok_and(|m| m.ino() == self.ino) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn io(path: &Path, what: &'static str) -> impl FnOnce(std::io::Error) -> AdminError {
    let path = path.to_owned();
    move |source| AdminError::Io { path, what, source }
}

/// Binds the admin socket at `path`: its directory made (mode 0700) if
/// missing, a stale socket (no agent answers on it) removed, the socket
/// itself mode 0600. Fails when another agent answers on it.
pub fn bind(path: &Path) -> Result<Socket, AdminError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io(dir, "creating its directory"))?;
        } else if let Ok(meta) = dir.metadata()
            && meta.mode() & 0o022 != 0
        {
            // Not changed: it may be a shared directory of someone else's.
            tracing::warn!(
                dir = %dir.display(),
                "the admin socket's directory is writable by others; prefer a directory of its own (mode 0700), such as /run/mmesh"
            );
        }
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => match StdStream::connect(path) {
            Ok(_) => return Err(AdminError::InUse { path: path.into() }),
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                tracing::info!(path = %path.display(), "removing a stale admin socket (no agent answers on it)");
                std::fs::remove_file(path).map_err(io(path, "removing the stale socket"))?;
            }
            Err(e) => return Err(io(path, "checking whether an agent answers on it")(e)),
        },
        Ok(_) => return Err(AdminError::NotASocket { path: path.into() }),
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(io(path, "looking at it")(e)),
    }
    let listener = StdListener::bind(path).map_err(|e| {
        if e.kind() == ErrorKind::AddrInUse {
            // Another agent bound it between the check and here.
            AdminError::InUse { path: path.into() }
        } else {
            io(path, "binding")(e)
        }
    })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(io(path, "making it root-only (mode 0600)"))?;
    listener
        .set_nonblocking(true)
        .map_err(io(path, "making it non-blocking"))?;
    let ino = std::fs::metadata(path)
        .map_err(io(path, "looking at it"))?
        .ino();
    Ok(Socket {
        listener: Some(listener),
        path: path.into(),
        ino,
    })
}

/// The admin socket's task: stops serving when dropped, and removes the
/// socket if it is still this agent's.
pub struct Server {
    task: JoinHandle<()>,
    _socket: Socket,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What every connection reads.
struct Context {
    health: Arc<Health>,
    events: Fanout,
    recent: Recent,
}

/// Serves `socket` until the [`Server`] is dropped: snapshots from the
/// read-only handles of `health`, events from `events`.
pub fn serve(
    mut socket: Socket,
    health: Arc<Health>,
    events: &Fanout,
) -> Result<Server, AdminError> {
    let path = socket.path.clone();
    let listener = socket
        .listener
        .take()
        .ok_or_else(|| AdminError::Io {
            path: path.clone(),
            what: "serving it",
            source: std::io::Error::other("served already"),
        })
        .and_then(|l| UnixListener::from_std(l).map_err(io(&path, "serving it")))?;
    let recent = Recent::spawn(events).map_err(io(&path, "starting the recent-events thread"))?;
    let context = Arc::new(Context {
        health,
        events: events.clone(),
        recent,
    });
    let clients = Arc::new(Semaphore::new(MAX_CLIENTS));
    tracing::info!(path = %path.display(), "admin socket ready (root only)");
    let task = tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(err) => {
                    tracing::warn!(%err, "admin socket: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let context = context.clone();
            match clients.clone().try_acquire_owned() {
                Ok(permit) => {
                    tokio::spawn(connection(stream, context, permit));
                }
                Err(_) => {
                    tokio::spawn(refuse(
                        stream,
                        format!(
                            "busy: {MAX_CLIENTS} clients are connected already; try again later"
                        ),
                    ));
                }
            }
        }
    });
    Ok(Server {
        task,
        _socket: socket,
    })
}

fn line(reply: &Reply) -> Vec<u8> {
    let mut out =
        serde_json::to_vec(reply).unwrap_or_else(|_| b"{\"error\":\"encoding failed\"}".to_vec());
    out.push(b'\n');
    out
}

async fn refuse(mut stream: UnixStream, message: String) {
    let _ = stream.write_all(&line(&Reply::Error(message))).await;
    let _ = stream.shutdown().await;
}

async fn connection(stream: UnixStream, context: Arc<Context>, permit: OwnedSemaphorePermit) {
    // The socket's mode already keeps others out; the peer's credentials
    // say who connected whatever the file's mode became.
    match stream.peer_cred() {
        Ok(cred) if cred.uid() == 0 => {}
        Ok(cred) => {
            tracing::warn!(uid = cred.uid(), pid = ?cred.pid(), "admin socket: refused a client that is not root");
            return refuse(
                stream,
                "permission denied: the admin socket answers root only".into(),
            )
            .await;
        }
        Err(err) => {
            tracing::warn!(%err, "admin socket: cannot tell who connected; refused");
            return refuse(stream, "permission denied: cannot tell who you are".into()).await;
        }
    }
    let mut reader = BufReader::new(stream);
    let mut text = String::new();
    let read = tokio::time::timeout(
        REQUEST_TIMEOUT,
        (&mut reader).take(MAX_REQUEST).read_line(&mut text),
    )
    .await;
    let stream = reader.into_inner();
    let request = match read {
        Ok(Ok(_)) => serde_json::from_str::<Request>(text.trim_end()),
        Ok(Err(err)) => return tracing::debug!(%err, "admin socket: reading a request"),
        Err(_) => return refuse(stream, "no request within 10 s".into()).await,
    };
    let request = match request {
        Ok(r) => r,
        Err(err) => return refuse(stream, format!("not a request: {err}")).await,
    };
    if let Request::Events {
        follow,
        account,
        reason,
        since_ms,
    } = request
    {
        if let Some(r) = reason.as_deref().filter(|r| !view::known_reason(r)) {
            return refuse(stream, format!("unknown reason {r:?}")).await;
        }
        let std = match stream
            .into_std()
            .and_then(|s| s.set_nonblocking(false).map(|()| s))
        {
            Ok(s) => s,
            Err(err) => return tracing::debug!(%err, "admin socket: events connection"),
        };
        let filter = Filter { account, reason };
        let spawned = thread::Builder::new()
            .name("mmesh-admin-events".into())
            .spawn(move || {
                stream_events(
                    &std,
                    &context,
                    &filter,
                    follow,
                    since_ms.map(Duration::from_millis),
                );
                drop(permit);
            });
        if let Err(err) = spawned {
            tracing::warn!(%err, "admin socket: cannot start a thread for an events client");
        }
        return;
    }
    // Map reads are system calls: off the async threads.
    let reply = tokio::task::spawn_blocking(move || answer(&context, &request))
        .await
        .unwrap_or_else(|err| Reply::Error(format!("internal error: {err}")));
    let mut stream = stream;
    let _ = stream.write_all(&line(&reply)).await;
    let _ = stream.shutdown().await;
    drop(permit);
}

fn answer(context: &Context, request: &Request) -> Reply {
    let health = &context.health;
    let result = match request {
        Request::Status => view::status(health).map(|s| Reply::Status(Box::new(s))),
        Request::Maps => view::maps(health).map(Reply::Maps),
        Request::Policy { json } => view::policy(health, *json).map(Reply::Policy),
        Request::Top {
            by: TopBy::Account,
            limit,
            ..
        } => view::top_by_account(health, *limit).map(Reply::Top),
        Request::Top {
            by: TopBy::Remote,
            window_ms,
            limit,
        } => Ok(Reply::Top(view::top_by_remote(
            &context.recent,
            window_ms.map(Duration::from_millis),
            *limit,
        ))),
        Request::Events { .. } => Err("events are streamed".into()),
    };
    result.unwrap_or_else(Reply::Error)
}

struct Filter {
    account: Option<String>,
    reason: Option<String>,
}

impl Filter {
    fn matches(&self, e: &EventRecord) -> bool {
        self.account
            .as_deref()
            .is_none_or(|a| e.account.as_deref() == Some(a))
            && self.reason.as_deref().is_none_or(|r| e.reason == r)
    }
}

/// `{"event": {...}}`, as [`Reply::Event`] reads it.
#[derive(Serialize)]
struct EventLine<'a> {
    event: &'a EventRecord,
}

fn write_batch(
    out: &mut impl std::io::Write,
    batch: &Batch,
    filter: &Filter,
) -> std::io::Result<()> {
    for e in batch.iter().filter(|e| filter.matches(e)) {
        serde_json::to_writer(&mut *out, &EventLine { event: e })?;
        out.write_all(b"\n")?;
    }
    Ok(())
}

/// Whether the client closed its end (a read would return end of file).
fn peer_closed(stream: &StdStream) -> bool {
    let mut byte = 0u8;
    // SAFETY: a one-byte buffer of ours; MSG_PEEK leaves the data queued.
    let n = unsafe {
        libc::recv(
            stream.as_raw_fd(),
            (&raw mut byte).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    n == 0
}

/// Streams events to one client from a thread of its own, the only one
/// that may block on it: the recent ones asked for, then, with `follow`,
/// what its own consumer of the fan-out receives. A client that reads too
/// slowly loses events (its queue is full), counted and told in a
/// `{"lost": N}` line before the next events it gets.
fn stream_events(
    stream: &StdStream,
    context: &Context,
    filter: &Filter,
    follow: bool,
    since: Option<Duration>,
) {
    // Subscribed before the recent events are taken: nothing falls in
    // between; what is in both is skipped below.
    let subscription = follow.then(|| context.events.subscribe("admin-events", FOLLOW_QUEUE));
    let recent = match (follow, since) {
        (_, Some(since)) => context.recent.since(Some(since)),
        (false, None) => context.recent.since(None),
        (true, None) => Vec::new(),
    };
    let mut out = BufWriter::with_capacity(64 * 1024, stream);
    for batch in &recent {
        if write_batch(&mut out, batch, filter).is_err() {
            return;
        }
    }
    let Some(subscription) = subscription else {
        let _ = out.write_all(&line(&Reply::End { lost: 0 }));
        let _ = out.flush();
        return;
    };
    if out.flush().is_err() {
        return;
    }
    let stats = subscription.stats();
    let mut seen: HashSet<*const EventRecord> = recent.iter().map(|b| b.as_ptr()).collect();
    let mut reported = 0;
    loop {
        let batch = match subscription.recv_timeout(Duration::from_secs(1)) {
            Ok(Some(batch)) => Some(batch),
            Ok(None) => break,
            Err(_) if peer_closed(stream) => break,
            Err(_) => None,
        };
        let lost = stats.dropped();
        let mut written = Ok(());
        if lost > reported {
            written = out.write_all(&line(&Reply::Lost(lost)));
            reported = lost;
        }
        if let Some(batch) = batch {
            if !seen.is_empty() {
                if seen.remove(&batch.as_ptr()) {
                    continue;
                }
                // Past the overlap with the recent events.
                seen.clear();
            }
            written = written.and_then(|()| write_batch(&mut out, &batch, filter));
            written = written.and_then(|()| out.flush());
            subscription.done(batch.len() as u64, written.is_ok());
        } else {
            written = written.and_then(|()| out.flush());
        }
        if written.is_err() {
            break;
        }
    }
}
