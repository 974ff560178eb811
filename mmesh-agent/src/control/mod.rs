//! The control plane's side of the agent: the gRPC contract (`proto/`),
//! policy messages and their validation.

/// Messages and the client and server of `proto/mmesh/v1/control.proto`.
#[expect(clippy::pedantic, missing_docs, reason = "generated code")]
pub mod proto {
    tonic::include_proto!("mmesh.v1");
}

pub mod convert;
