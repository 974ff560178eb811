//! The control plane's side of the agent: the gRPC contract (`proto/`),
//! policy messages and their validation, the policy held from the control
//! plane, its last-known-good copy on disk, violation reports, and the
//! client that keeps the stream.

/// Messages and the client and server of `proto/mmesh/v1/control.proto`.
#[expect(clippy::pedantic, missing_docs, reason = "generated code")]
pub mod proto {
    tonic::include_proto!("mmesh.v1");
}

pub mod client;
pub mod convert;
mod frames;
pub mod held;
pub mod in_force;
mod layered;
mod packed;
pub mod reports;
pub mod store;
pub mod wire;
