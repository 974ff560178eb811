//! mmesh-controlplane: the reference control plane. Serves each connected
//! agent its node's policy from a folder of policy files or from etcd,
//! pushes a delta when a file or key changes, and prints what the agents
//! report (docs/control-plane.md).

pub mod catalog;
pub mod etcd;
pub mod events;
pub mod folder;
pub mod grpc;
pub mod output;
pub mod server;
pub mod status;
