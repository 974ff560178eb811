//! Helpers for the tests of mmesh against the real kernel.
//!
//! - [`bench`]: the benchmark harness (`cargo xtask bench`).
//! - [`certs`]: a test CA and the certificates it signs (TLS, mutual TLS).
//! - [`control`]: a scripted control plane (a real gRPC server) for the
//!   agent's control-plane tests.
//! - [`controlplane`]: the reference control plane as a process, and an
//!   agent played by the test over the real protocol.
//! - [`packets`]: crafted frames for `BPF_PROG_TEST_RUN`.
//! - [`netns`]: network namespaces, veth pairs and the agent process for
//!   end-to-end tests, each removed by a guard when the test ends, also when
//!   it fails.
//! - [`scrape`]: `GET` on the agent's HTTP endpoint, and the samples of a
//!   Prometheus scrape.
//! - [`tcp`]: bulk TCP between namespaces, the kernel's TCP counters, and a
//!   delay line for round-trip times.
//! - [`wire`]: bulk TCP streams, a device's TSO setting, the IP packets a
//!   namespace received (offloads and wire accounting).

pub mod bench;
pub mod certs;
pub mod control;
pub mod controlplane;
pub mod netns;
pub mod packets;
pub mod scrape;
pub mod tcp;
pub mod wire;
