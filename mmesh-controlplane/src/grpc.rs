//! `PolicyStream` on the wire: the same gRPC service as the generated
//! `PolicyStreamServer`, with a response body of its own.
//!
//! tonic's response body encodes every message into one buffer per stream
//! that keeps the capacity of the largest message it ever held: after a
//! Snapshot, each stream holds a buffer the size of the policy for as long
//! as it lives (about 100 kB per stream for 1,000 accounts, 10 MB for
//! 100,000), which is most of the control plane's memory with thousands of
//! agents (docs/benchmarks.md, fan-out). Here each message is encoded into
//! a buffer of its exact size that is freed once written, and a Snapshot's
//! policy is not encoded at all: its bytes, encoded once per version
//! (`Desired::encoded`), follow a prefix of the stream's own (the frame's
//! length, the version, the nonce). Requests are decoded by tonic as before
//! ([`Streaming`]), the session is [`Service::session`], and the stream ends
//! with the same trailers (`grpc-status`, `grpc-message`).

use std::{
    convert::Infallible,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
};

use bytes::Bytes;
use http_body::Frame;
use mmesh_agent::control::proto::{AgentMessage, ControlMessage};
use prost::{
    Message as _,
    encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len, string},
};
use tokio::sync::mpsc;
use tonic::{
    Status,
    body::Body,
    codec::{DecodeBuf, Decoder, Streaming},
    server::NamedService,
};

use crate::{
    catalog::Desired,
    server::{Outbound, Service},
};

/// The one method of the service.
const SESSION: &str = "/mmesh.v1.PolicyStream/Session";

/// `PolicyStream`, for [`tonic::transport::Server::add_service`].
#[derive(Clone)]
pub struct PolicyStreamService {
    inner: Arc<Service>,
}

impl PolicyStreamService {
    #[must_use]
    pub fn new(service: Service) -> Self {
        Self {
            inner: Arc::new(service),
        }
    }
}

impl NamedService for PolicyStreamService {
    const NAME: &'static str = "mmesh.v1.PolicyStream";
}

type Reply = Pin<Box<dyn Future<Output = Result<http::Response<Body>, Infallible>> + Send>>;

impl tower_service::Service<http::Request<Body>> for PolicyStreamService {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Reply;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Reply {
        let inner = Arc::clone(&self.inner);
        Box::pin(async move {
            if request.uri().path() != SESSION {
                return Ok(Status::unimplemented(format!(
                    "{} is not a method of {}",
                    request.uri().path(),
                    PolicyStreamService::NAME
                ))
                .into_http());
            }
            // No compression: the generated server accepted none either.
            let request =
                request.map(|body| Streaming::new_request(AgentDecoder, body, None, None));
            let messages = Frames {
                queue: inner.session(tonic::Request::from_http(request)),
                policy: None,
                done: false,
            };
            let mut reply = http::Response::new(Body::new(messages));
            reply.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/grpc"),
            );
            Ok(reply)
        })
    }
}

/// Decodes an agent's messages (as tonic's prost decoder does).
struct AgentDecoder;

impl Decoder for AgentDecoder {
    type Item = AgentMessage;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<AgentMessage>, Status> {
        AgentMessage::decode(src)
            .map(Some)
            .map_err(|e| Status::internal(format!("cannot decode an agent's message: {e}")))
    }
}

/// The response body: a session's messages, each a gRPC frame of its own,
/// then the trailers.
struct Frames {
    queue: mpsc::Receiver<Result<Outbound, Status>>,
    /// The policy bytes of a Snapshot whose prefix went out.
    policy: Option<Bytes>,
    done: bool,
}

impl http_body::Body for Frames {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if self.done {
            return Poll::Ready(None);
        }
        if let Some(policy) = self.policy.take() {
            return Poll::Ready(Some(Ok(Frame::data(policy))));
        }
        let end = match ready!(self.queue.poll_recv(cx)) {
            Some(Ok(Outbound::Message(message))) => match frame(&message) {
                Ok(bytes) => return Poll::Ready(Some(Ok(Frame::data(bytes)))),
                Err(status) => status,
            },
            Some(Ok(Outbound::Snapshot {
                version,
                nonce,
                policy,
            })) => match snapshot_prefix(&version, &nonce, &policy) {
                Ok(prefix) => {
                    self.policy = Some(policy.encoded.clone());
                    return Poll::Ready(Some(Ok(Frame::data(prefix))));
                }
                Err(status) => status,
            },
            Some(Err(status)) => status,
            None => Status::ok(""),
        };
        self.done = true;
        let mut trailers = http::HeaderMap::new();
        if let Err(status) = end.add_header(&mut trailers) {
            // A message that cannot be a header value: the code alone.
            trailers.clear();
            let _ = Status::new(status.code(), "").add_header(&mut trailers);
        }
        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

/// The start of a gRPC frame holding `ControlMessage { snapshot: Snapshot {
/// version, nonce, policy } }`, up to the policy's bytes
/// (`policy.encoded`), which follow: the same bytes as prost writes for
/// the whole message.
fn snapshot_prefix(version: &str, nonce: &str, policy: &Desired) -> Result<Bytes, Status> {
    let text_len = |tag, value: &String| {
        if value.is_empty() {
            0
        } else {
            string::encoded_len(tag, value)
        }
    };
    let (version, nonce) = (version.to_owned(), nonce.to_owned());
    let policy_len = policy.encoded.len();
    let snapshot_len = text_len(1, &version)
        + text_len(2, &nonce)
        + key_len(3)
        + encoded_len_varint(policy_len as u64)
        + policy_len;
    let len = key_len(1) + encoded_len_varint(snapshot_len as u64) + snapshot_len;
    let prefix = u32::try_from(len)
        .map_err(|_| Status::resource_exhausted(format!("a snapshot of {len} bytes")))?;
    let mut buf = Vec::with_capacity(5 + len - policy_len);
    buf.push(0);
    buf.extend_from_slice(&prefix.to_be_bytes());
    encode_key(1, WireType::LengthDelimited, &mut buf);
    encode_varint(snapshot_len as u64, &mut buf);
    if !version.is_empty() {
        string::encode(1, &version, &mut buf);
    }
    if !nonce.is_empty() {
        string::encode(2, &nonce, &mut buf);
    }
    encode_key(3, WireType::LengthDelimited, &mut buf);
    encode_varint(policy_len as u64, &mut buf);
    Ok(Bytes::from(buf))
}

/// `message` as one gRPC frame: not compressed, its length, its bytes.
fn frame(message: &ControlMessage) -> Result<Bytes, Status> {
    let len = message.encoded_len();
    let prefix = u32::try_from(len)
        .map_err(|_| Status::resource_exhausted(format!("a message of {len} bytes")))?;
    let mut buf = Vec::with_capacity(5 + len);
    buf.push(0);
    buf.extend_from_slice(&prefix.to_be_bytes());
    message.encode_raw(&mut buf);
    Ok(Bytes::from(buf))
}

#[cfg(test)]
mod tests {
    use mmesh_agent::{
        control::proto::{Heartbeat, Snapshot, control_message::Body as Down},
        policy::Policy,
    };

    use super::*;

    #[test]
    fn a_snapshot_from_shared_bytes_is_what_prost_writes_for_the_message() {
        let policy = Policy::parse(
            "version: v1\naccounts:\n  - id: a\n    prefixes: [10.0.0.1/32]\n",
            "test.yaml",
            std::path::Path::new("."),
        )
        .expect("a valid policy");
        let desired = Desired::new(&policy, "test.yaml".into());
        for (version, nonce) in [("v1-abc", "7"), ("v1-abc", "")] {
            let mut shared = snapshot_prefix(version, nonce, &desired)
                .expect("a small snapshot")
                .to_vec();
            shared.extend_from_slice(&desired.encoded);
            let whole = frame(&ControlMessage {
                body: Some(Down::Snapshot(Snapshot {
                    version: version.into(),
                    nonce: nonce.into(),
                    policy: Some(desired.message.clone()),
                })),
            })
            .expect("a small message");
            assert_eq!(
                shared,
                whole.to_vec(),
                "version {version:?}, nonce {nonce:?}"
            );
        }
    }

    #[test]
    fn a_frame_is_the_flag_the_length_and_the_message() {
        let message = ControlMessage {
            body: Some(Down::Heartbeat(Heartbeat { unix_ms: 42 })),
        };
        let bytes = frame(&message).expect("a small message");
        assert_eq!(bytes[0], 0, "not compressed");
        let len = u32::from_be_bytes(bytes[1..5].try_into().expect("4 bytes")) as usize;
        assert_eq!(len, bytes.len() - 5);
        assert_eq!(
            ControlMessage::decode(&bytes[5..]).expect("decodes"),
            message
        );
    }
}
