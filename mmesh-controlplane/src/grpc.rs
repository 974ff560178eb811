//! `PolicyStream` on the wire: the same gRPC service as the generated
//! `PolicyStreamServer`, with a response body of its own.
//!
//! tonic's response body encodes every message into one buffer per stream
//! that keeps the capacity of the largest message it ever held: after a
//! Snapshot, each stream holds a buffer the size of the policy for as long
//! as it lives (about 100 kB per stream for 1,000 accounts, 10 MB for
//! 100,000), which is most of the control plane's memory with thousands of
//! agents (docs/benchmarks.md, fan-out). Here each message is encoded into
//! a buffer of its exact size that is freed once written. Requests are
//! decoded by tonic as before ([`Streaming`]), the session is
//! [`Service::session`], and the stream ends with the same trailers
//! (`grpc-status`, `grpc-message`).

use std::{
    convert::Infallible,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
};

use bytes::Bytes;
use http_body::Frame;
use mmesh_agent::control::proto::{
    AgentMessage, ControlMessage, policy_stream_server::PolicyStream,
};
use prost::Message as _;
use tokio::sync::mpsc;
use tonic::{
    Status,
    body::Body,
    codec::{DecodeBuf, Decoder, Streaming},
    server::NamedService,
};

use crate::server::Service;

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
            match inner.session(tonic::Request::from_http(request)).await {
                Ok(response) => {
                    let messages = Frames {
                        queue: response.into_inner().into_inner(),
                        done: false,
                    };
                    let mut reply = http::Response::new(Body::new(messages));
                    reply.headers_mut().insert(
                        http::header::CONTENT_TYPE,
                        http::HeaderValue::from_static("application/grpc"),
                    );
                    Ok(reply)
                }
                Err(status) => Ok(status.into_http()),
            }
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
    queue: mpsc::Receiver<Result<ControlMessage, Status>>,
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
        let end = match ready!(self.queue.poll_recv(cx)) {
            Some(Ok(message)) => match frame(&message) {
                Ok(bytes) => return Poll::Ready(Some(Ok(Frame::data(bytes)))),
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
    use mmesh_agent::control::proto::{Heartbeat, control_message::Body as Down};

    use super::*;

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
