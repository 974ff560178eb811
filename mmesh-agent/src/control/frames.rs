//! The agent's gRPC stream on the wire, framed by the agent itself.
//!
//! tonic's `Streaming` reserves each received message's length in one
//! buffer and never shrinks it: after a 100,000-account snapshot the agent
//! kept about 22 MB for the stream's life. Here a message is collected in a
//! buffer of exactly its length, dropped once decoded (a snapshot's once
//! its accounts, slices of it, are read: `wire.rs`; a message that lies
//! whole in one body frame is decoded where it lies, and small ones share a
//! small buffer), and each message sent up is a buffer of its own, freed
//! once written. The call goes through tonic's `Channel` (TLS, timeouts,
//! keepalive as the client sets them up) with the generated client's path
//! and headers, and the wire is the contract's (docs/control-plane.md): a
//! frame per message (a flag, 0 as nothing is compressed, the length as a
//! big-endian u32, the protobuf bytes), the end in `grpc-status` and
//! `grpc-message`, in trailers or in a trailers-only response.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use bytes::{Buf as _, Bytes};
use http::{HeaderMap, HeaderValue, StatusCode, header};
use http_body::Frame;
use http_body_util::BodyExt as _;
use prost::Message;
use tokio::sync::mpsc;
use tonic::{Code, Status, body::Body, client::GrpcService};

use super::proto::AgentMessage;

/// The one method of `mmesh.v1.PolicyStream`.
const SESSION: &str = "/mmesh.v1.PolicyStream/Session";

/// A frame's header: the compression flag and the length.
const HEADER: usize = 5;

/// Messages up to this size (heartbeats, deltas of a few accounts) are
/// collected in one buffer kept for the next; larger ones in a buffer of
/// their own.
const SMALL: usize = 64 << 10;

/// Opens the session on `channel`: what comes out of `outbound` goes up,
/// one frame a message, until the sender is dropped; what comes down is
/// read with [`Inbound::message`], at most `max` bytes a message. An
/// error is the control plane's refusal (or the connection's failure)
/// before the stream began.
pub async fn open<S>(
    channel: &mut S,
    outbound: mpsc::Receiver<AgentMessage>,
    max: usize,
) -> Result<Inbound<S::ResponseBody>, Status>
where
    S: GrpcService<Body>,
    S::ResponseBody: http_body::Body<Data = Bytes> + Unpin,
    <S::ResponseBody as http_body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    std::future::poll_fn(|cx| channel.poll_ready(cx))
        .await
        .map_err(|e| Status::from_error(e.into()))?;
    // The Channel adds the scheme and the authority.
    let mut request = http::Request::new(Body::new(Outbound(outbound)));
    *request.method_mut() = http::Method::POST;
    *request.uri_mut() = http::Uri::from_static(SESSION);
    *request.version_mut() = http::Version::HTTP_2;
    let headers = request.headers_mut();
    headers.insert(header::TE, HeaderValue::from_static("trailers"));
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    let response = channel
        .call(request)
        .await
        .map_err(|e| Status::from_error(e.into()))?;
    Inbound::new(response, max)
}

/// The request body: each message a frame of its own.
struct Outbound(mpsc::Receiver<AgentMessage>);

impl http_body::Body for Outbound {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        self.0
            .poll_recv(cx)
            .map(|message| message.map(|m| frame(&m).map(Frame::data)))
    }
}

/// `message` as one frame: not compressed, its length, its bytes.
fn frame(message: &impl Message) -> Result<Bytes, Status> {
    let len = message.encoded_len();
    let prefix = u32::try_from(len)
        .map_err(|_| Status::resource_exhausted(format!("a message of {len} bytes")))?;
    let mut buf = Vec::with_capacity(HEADER + len);
    buf.push(0);
    buf.extend_from_slice(&prefix.to_be_bytes());
    message.encode_raw(&mut buf);
    Ok(Bytes::from(buf))
}

/// What is wrong with the frames the control plane sent.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error(
        "a message of {len} bytes, over the {max} bytes this agent reads (twice its --max-policy-bytes)"
    )]
    TooLarge { len: usize, max: usize },
    #[error("a compressed message: the contract sends messages uncompressed")]
    Compressed,
    #[error("a message whose compression flag is {0} (0 or 1 only)")]
    Flag(u8),
    #[error("the stream ended inside a message")]
    Truncated,
    #[error("cannot decode a control-plane message: {0}")]
    Decode(#[from] prost::DecodeError),
}

/// As gRPC libraries report them (tonic among them): a message over the
/// limit is `OUT_OF_RANGE`, a protocol error `INTERNAL`.
impl From<FrameError> for Status {
    fn from(err: FrameError) -> Self {
        let code = match err {
            FrameError::TooLarge { .. } => Code::OutOfRange,
            _ => Code::Internal,
        };
        Status::new(code, err.to_string())
    }
}

/// Cuts a body's data into messages. Everything read and not yet returned
/// is kept here, so that a caller may stop waiting for the next frame at
/// any time (`tokio::select!`) and lose nothing.
#[derive(Debug)]
struct Deframer {
    max: usize,
    /// The unread rest of the last data frame.
    chunk: Bytes,
    /// The header being read, and how much of it has arrived.
    header: [u8; HEADER],
    have: usize,
    /// The message being collected: its length and its bytes so far.
    collecting: Option<(usize, Vec<u8>)>,
    /// The buffer of small messages, empty between them.
    small: Vec<u8>,
}

impl Deframer {
    fn new(max: usize) -> Self {
        Self {
            max,
            chunk: Bytes::new(),
            header: [0; HEADER],
            have: 0,
            collecting: None,
            small: Vec::new(),
        }
    }

    /// Takes the next data frame; [`Deframer::next`] has read the last one
    /// through (it returned `None`).
    fn push(&mut self, data: Bytes) {
        debug_assert!(self.chunk.is_empty(), "the last frame was read through");
        self.chunk = data;
    }

    /// Part of a frame has arrived and not the rest.
    fn partial(&self) -> bool {
        self.have > 0 || self.collecting.is_some() || !self.chunk.is_empty()
    }

    /// The length of the next message, once its header has arrived.
    fn read_header(&mut self) -> Result<Option<usize>, FrameError> {
        let take = (HEADER - self.have).min(self.chunk.len());
        self.header[self.have..self.have + take].copy_from_slice(&self.chunk[..take]);
        self.chunk.advance(take);
        self.have += take;
        if self.have < HEADER {
            return Ok(None);
        }
        self.have = 0;
        match self.header[0] {
            0 => {}
            1 => return Err(FrameError::Compressed),
            flag => return Err(FrameError::Flag(flag)),
        }
        let [_, length @ ..] = self.header;
        let len = u32::from_be_bytes(length) as usize;
        if len > self.max {
            return Err(FrameError::TooLarge { len, max: self.max });
        }
        Ok(Some(len))
    }

    /// The next whole message, or `None` when the data so far ends before
    /// one does.
    fn next<M: Message + Default>(&mut self) -> Result<Option<M>, FrameError> {
        let (len, mut bytes) = if let Some(collecting) = self.collecting.take() {
            collecting
        } else {
            let Some(len) = self.read_header()? else {
                return Ok(None);
            };
            // Whole in the frame at hand: decoded where it lies.
            if self.chunk.len() >= len {
                return Ok(Some(M::decode(self.chunk.split_to(len))?));
            }
            let bytes = if len <= SMALL {
                let mut small = std::mem::take(&mut self.small);
                small.reserve_exact(len);
                small
            } else {
                Vec::with_capacity(len)
            };
            (len, bytes)
        };
        let take = (len - bytes.len()).min(self.chunk.len());
        bytes.extend_from_slice(&self.chunk[..take]);
        self.chunk.advance(take);
        if bytes.len() < len {
            self.collecting = Some((len, bytes));
            return Ok(None);
        }
        if bytes.capacity() > SMALL {
            // As `Bytes`, so that a message's `bytes` fields are slices of
            // it, not copies (a snapshot's accounts: `wire.rs`).
            return Ok(Some(M::decode(Bytes::from(bytes))?));
        }
        let message = M::decode(bytes.as_slice());
        bytes.clear();
        self.small = bytes;
        Ok(Some(message?))
    }
}

/// The messages the control plane sends, read from the response body.
#[derive(Debug)]
pub struct Inbound<B> {
    body: B,
    frames: Deframer,
    /// The response carried its `grpc-status` (OK) in its headers: the
    /// body ends with no trailers.
    trailers_only: bool,
    ended: bool,
}

impl<B> Inbound<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    /// Reads the response's head: an error status in it (a trailers-only
    /// response), or an HTTP status other than 200 without one, refuses
    /// the stream.
    fn new(response: http::Response<B>, max: usize) -> Result<Self, Status> {
        let (head, body) = response.into_parts();
        let trailers_only = match grpc_status(&head.headers) {
            Some(status) if status.code() != Code::Ok => return Err(status),
            Some(_) => true,
            None if head.status != StatusCode::OK => return Err(http_status(head.status)),
            None => false,
        };
        Ok(Self {
            body,
            frames: Deframer::new(max),
            trailers_only,
            ended: false,
        })
    }

    /// The next message; `None` once the control plane ended the stream
    /// with an OK status. Cancel-safe: what arrived before the future was
    /// dropped is kept for the next call.
    pub async fn message<M: Message + Default>(&mut self) -> Result<Option<M>, Status> {
        if self.ended {
            return Ok(None);
        }
        let next = self.read().await;
        if !matches!(next, Ok(Some(_))) {
            self.ended = true;
        }
        next
    }

    async fn read<M: Message + Default>(&mut self) -> Result<Option<M>, Status> {
        loop {
            if let Some(message) = self.frames.next()? {
                return Ok(Some(message));
            }
            let frame = match self.body.frame().await {
                Some(Ok(frame)) => frame,
                Some(Err(err)) => return Err(Status::from_error(err.into())),
                None => return self.end(None),
            };
            match frame.into_data() {
                Ok(data) => self.frames.push(data),
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        return self.end(Some(&trailers));
                    }
                }
            }
        }
    }

    /// The body ended, with `trailers` or without.
    fn end<M>(&self, trailers: Option<&HeaderMap>) -> Result<Option<M>, Status> {
        match trailers.and_then(grpc_status) {
            Some(status) if status.code() != Code::Ok => Err(status),
            _ if self.frames.partial() => Err(FrameError::Truncated.into()),
            Some(_) => Ok(None),
            None if self.trailers_only => Ok(None),
            None => Err(Status::unknown(
                "the stream ended without a grpc-status (cut by a proxy?)",
            )),
        }
    }
}

/// The status `headers` carry, from `grpc-status` and `grpc-message`
/// alone: tonic's parser panics on a `grpc-status-details-bin` that is not
/// base64, and the agent has no use for details.
fn grpc_status(headers: &HeaderMap) -> Option<Status> {
    let mut status = HeaderMap::new();
    for name in ["grpc-status", "grpc-message"] {
        if let Some(value) = headers.get(name) {
            status.insert(name, value.clone());
        }
    }
    Status::from_header_map(&status)
}

/// A response without `grpc-status`, by its HTTP status (gRPC's mapping,
/// doc/http-grpc-status-mapping.md).
fn http_status(status: StatusCode) -> Status {
    let code = match status {
        StatusCode::BAD_REQUEST => Code::Internal,
        StatusCode::UNAUTHORIZED => Code::Unauthenticated,
        StatusCode::FORBIDDEN => Code::PermissionDenied,
        StatusCode::NOT_FOUND => Code::Unimplemented,
        StatusCode::TOO_MANY_REQUESTS
        | StatusCode::BAD_GATEWAY
        | StatusCode::SERVICE_UNAVAILABLE
        | StatusCode::GATEWAY_TIMEOUT => Code::Unavailable,
        _ => Code::Unknown,
    };
    Status::new(code, format!("HTTP status {status} without a grpc-status"))
}

#[cfg(test)]
mod tests {
    use http_body_util::StreamBody;

    use super::*;
    use crate::control::proto::{
        ControlMessage, Heartbeat, Policy, Snapshot, control_message::Body as Down,
    };

    type TestBody =
        StreamBody<tokio_stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Status>>>>;

    fn beat(unix_ms: u64) -> ControlMessage {
        ControlMessage {
            body: Some(Down::Heartbeat(Heartbeat { unix_ms })),
        }
    }

    fn snapshot(version: &str) -> ControlMessage {
        ControlMessage {
            body: Some(Down::Snapshot(Snapshot {
                version: version.into(),
                nonce: "n".into(),
                policy: Some(Policy::default()),
            })),
        }
    }

    fn bytes(messages: &[ControlMessage]) -> Vec<u8> {
        messages
            .iter()
            .flat_map(|m| frame(m).expect("a small message"))
            .collect()
    }

    fn trailers(code: Code, message: &str) -> Frame<Bytes> {
        let mut map = HeaderMap::new();
        Status::new(code, message)
            .add_header(&mut map)
            .expect("a valid header");
        Frame::trailers(map)
    }

    fn ok() -> Frame<Bytes> {
        trailers(Code::Ok, "")
    }

    /// A response of status 200 with `frames` as its body.
    fn inbound(frames: Vec<Frame<Bytes>>, max: usize) -> Inbound<TestBody> {
        Inbound::new(http::Response::new(body(frames)), max).expect("accepted")
    }

    fn body(frames: Vec<Frame<Bytes>>) -> TestBody {
        StreamBody::new(tokio_stream::iter(
            frames.into_iter().map(Ok).collect::<Vec<_>>(),
        ))
    }

    fn data(bytes: &[u8]) -> Frame<Bytes> {
        Frame::data(Bytes::copy_from_slice(bytes))
    }

    async fn all(inbound: &mut Inbound<TestBody>) -> (Vec<ControlMessage>, Result<(), Status>) {
        let mut messages = Vec::new();
        loop {
            match inbound.message::<ControlMessage>().await {
                Ok(Some(m)) => messages.push(m),
                Ok(None) => return (messages, Ok(())),
                Err(status) => return (messages, Err(status)),
            }
        }
    }

    #[tokio::test]
    async fn messages_split_across_frames_and_several_in_one_frame_arrive_whole_in_order() {
        let sent = [beat(1), snapshot("v1"), beat(2), beat(3)];
        let wire = bytes(&sent);
        // Cut at every position of the first frames (inside the header,
        // inside the message), then the rest in one frame holding the
        // remaining messages.
        for cut in 1..12 {
            let frames = vec![
                data(&wire[..1]),
                data(&wire[1..cut.max(2)]),
                data(&wire[cut.max(2)..]),
                ok(),
            ];
            let (received, end) = all(&mut inbound(frames, 1 << 20)).await;
            assert_eq!(received, sent, "cut at {cut}");
            assert!(end.is_ok(), "cut at {cut}: {end:?}");
        }
        // One byte a frame: every message collected piece by piece.
        let frames: Vec<_> = wire.chunks(1).map(data).chain([ok()]).collect();
        let (received, end) = all(&mut inbound(frames, 1 << 20)).await;
        assert_eq!(received, sent);
        assert!(end.is_ok(), "{end:?}");
    }

    #[tokio::test]
    async fn a_large_message_is_collected_in_a_buffer_of_its_own_that_is_not_kept() {
        let mut big = snapshot("v1");
        if let Some(Down::Snapshot(s)) = &mut big.body {
            s.nonce = "x".repeat(3 * SMALL);
        }
        let sent = [beat(1), big, beat(2)];
        let wire = bytes(&sent);
        let frames: Vec<_> = wire.chunks(16 << 10).map(data).chain([ok()]).collect();
        let mut inbound = inbound(frames, 1 << 20);
        let (received, end) = all(&mut inbound).await;
        assert_eq!(received, sent);
        assert!(end.is_ok(), "{end:?}");
        assert!(
            inbound.frames.small.capacity() <= SMALL && inbound.frames.collecting.is_none(),
            "kept {} bytes",
            inbound.frames.small.capacity()
        );
    }

    #[tokio::test]
    async fn a_message_over_the_limit_ends_the_stream_as_out_of_range() {
        let sent = [beat(1), snapshot("a-long-version-name")];
        let max = frame(&sent[0]).expect("small").len();
        let mut inbound = inbound(vec![data(&bytes(&sent)), ok()], max);
        let (received, end) = all(&mut inbound).await;
        assert_eq!(received, [beat(1)]);
        let status = end.expect_err("refused");
        assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
        assert!(
            status.message().contains("--max-policy-bytes"),
            "{status:?}"
        );
        assert!(
            matches!(inbound.message::<ControlMessage>().await, Ok(None)),
            "nothing after the error"
        );
    }

    #[tokio::test]
    async fn a_compressed_message_is_refused() {
        let mut wire = bytes(&[beat(1)]);
        wire[0] = 1;
        let (received, end) = all(&mut inbound(vec![data(&wire), ok()], 1 << 20)).await;
        assert!(received.is_empty());
        let status = end.expect_err("refused");
        assert_eq!(status.code(), Code::Internal);
        assert!(status.message().contains("compressed"), "{status:?}");
    }

    #[tokio::test]
    async fn a_stream_that_ends_inside_a_message_is_an_error() {
        let wire = bytes(&[beat(1), beat(2)]);
        for (trailers, what) in [(true, "OK trailers"), (false, "no trailers")] {
            for cut in [wire.len() - 1, wire.len() - 3, wire.len() / 2 + 2] {
                let frames = [Some(data(&wire[..cut])), trailers.then(ok)]
                    .into_iter()
                    .flatten()
                    .collect();
                let (received, end) = all(&mut inbound(frames, 1 << 20)).await;
                assert_eq!(received, [beat(1)], "{what}, cut at {cut}");
                let status = end.expect_err("truncated");
                assert!(
                    status.code() == Code::Internal && status.message().contains("inside"),
                    "{what}, cut at {cut}: {status:?}"
                );
            }
        }
    }

    #[tokio::test]
    async fn the_end_of_the_stream_is_its_status() {
        let wire = bytes(&[beat(1)]);
        let cases = [
            (Some(ok()), None),
            (
                Some(trailers(Code::InvalidArgument, "no hello first")),
                Some(Code::InvalidArgument),
            ),
            (None, Some(Code::Unknown)),
        ];
        for (end, expected) in cases {
            let frames = std::iter::once(data(&wire)).chain(end).collect();
            let (received, end) = all(&mut inbound(frames, 1 << 20)).await;
            assert_eq!(received, [beat(1)]);
            assert_eq!(end.err().map(|s| s.code()), expected);
        }
        let mut garbled = HeaderMap::new();
        Status::unavailable("going away")
            .add_header(&mut garbled)
            .expect("a valid header");
        garbled.insert(
            "grpc-status-details-bin",
            HeaderValue::from_static("not base64!"),
        );
        let frames = vec![data(&wire), Frame::trailers(garbled)];
        let status = all(&mut inbound(frames, 1 << 20))
            .await
            .1
            .expect_err("an error status");
        assert_eq!(
            (status.code(), status.message()),
            (Code::Unavailable, "going away"),
            "details that are not base64 are ignored"
        );
        let frames = vec![trailers(Code::PermissionDenied, "not your node")];
        let status = all(&mut inbound(frames, 1 << 20))
            .await
            .1
            .expect_err("an error status");
        assert_eq!(
            (status.code(), status.message()),
            (Code::PermissionDenied, "not your node")
        );
    }

    #[test]
    fn a_trailers_only_response_or_an_http_error_refuses_the_stream() {
        let mut refused = http::Response::new(body(vec![]));
        Status::permission_denied("node b is not node a")
            .add_header(refused.headers_mut())
            .expect("a valid header");
        let status = Inbound::new(refused, 1 << 20).expect_err("refused");
        assert_eq!(
            (status.code(), status.message()),
            (Code::PermissionDenied, "node b is not node a")
        );

        let mut unavailable = http::Response::new(body(vec![data(b"<html>")]));
        *unavailable.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        let status = Inbound::new(unavailable, 1 << 20).expect_err("refused");
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    }

    #[tokio::test]
    async fn a_trailers_only_ok_is_a_clean_end() {
        let mut done = http::Response::new(body(vec![]));
        Status::ok("")
            .add_header(done.headers_mut())
            .expect("a valid header");
        let mut inbound = Inbound::new(done, 1 << 20).expect("accepted");
        assert!(matches!(
            inbound.message::<ControlMessage>().await,
            Ok(None)
        ));
    }

    #[tokio::test]
    async fn a_message_survives_a_read_dropped_half_way() {
        let wire = bytes(&[beat(7)]);
        let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, Status>>(4);
        let mut inbound = Inbound::new(
            http::Response::new(StreamBody::new(
                tokio_stream::wrappers::ReceiverStream::new(rx),
            )),
            1 << 20,
        )
        .expect("accepted");
        tx.send(Ok(data(&wire[..3]))).await.expect("open");
        // Polled once: the first part is read, then the future is dropped
        // waiting for more, as `select!` drops it when another branch wins.
        tokio::select! {
            biased;
            early = inbound.message::<ControlMessage>() => panic!("nothing whole yet: {early:?}"),
            () = std::future::ready(()) => {}
        }
        tx.send(Ok(data(&wire[3..]))).await.expect("open");
        assert_eq!(
            inbound.message::<ControlMessage>().await.expect("whole"),
            Some(beat(7))
        );
    }

    #[test]
    fn a_frame_sent_up_is_the_flag_the_length_and_the_message() {
        let message = AgentMessage::default();
        let bytes = frame(&message).expect("a small message");
        assert_eq!(&bytes[..], [0, 0, 0, 0, 0]);
    }
}
