//! Why the datapath could not be loaded, attached or updated.

use aya::{maps::MapError, programs::ProgramError};

use super::MIN_KERNEL;
use crate::interface::InterfaceError;

/// Why the datapath could not be loaded, attached or updated.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error(
        "this mmesh-agent was built without its eBPF object (AYA_BUILD_SKIP was set); rebuild it with `cargo xtask build`"
    )]
    NoObject,
    #[error("kernel {found} is too old: mmesh-agent needs Linux {}.{} or later", MIN_KERNEL.0, MIN_KERNEL.1)]
    KernelTooOld { found: String },
    #[error(
        "permission denied while {doing}: run mmesh-agent as root, or with CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON"
    )]
    Permission { doing: String },
    #[error("cannot load the eBPF object: {0}")]
    Load(#[source] aya::EbpfError),
    #[error("the kernel verifier rejected program {program}: {reason}\n{log}")]
    Verifier {
        program: String,
        reason: String,
        log: String,
    },
    #[error("cannot load program {program}: {source}")]
    Program {
        program: String,
        #[source]
        source: ProgramError,
    },
    #[error(
        "the eBPF object has no {what} named {name}: the agent and its object are out of step; rebuild both"
    )]
    Missing { what: &'static str, name: String },
    #[error("map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error(transparent)]
    Interface(#[from] InterfaceError),
    #[error(
        "interface {name} already has an XDP program attached by another tool; remove it first (`ip link set dev {name} xdp off`)"
    )]
    XdpBusy { name: String },
    #[error("cannot attach {program} to {name}: {source}")]
    Attach {
        program: &'static str,
        name: String,
        #[source]
        source: ProgramError,
    },
    #[error(
        "cannot tell what kind of device interface {name} is (ETHTOOL_GDRVINFO): {source}; choose its receive hook with --receive-hook xdp or tc"
    )]
    DeviceKind {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "interface {name} is already attached by another mmesh-agent; stop that one first (two agents would count and rate-limit every packet twice)"
    )]
    Claimed { name: String },
    #[error("cannot claim interface {name} for this agent: {source}")]
    Claim {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("interface {0} is attached twice; give each interface once")]
    DuplicateInterface(String),
    #[error(
        "cannot use {} as the bpffs pin directory: {source}; mount bpffs (`mount -t bpf bpf /sys/fs/bpf`), choose another --bpffs directory, or run with --ephemeral", dir.display()
    )]
    Bpffs {
        dir: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "another mmesh-agent holds the pinned datapath in {}; stop it first (the datapath it pinned keeps enforcing), or give this one another --bpffs directory", dir.display()
    )]
    Locked { dir: std::path::PathBuf },
    #[error(
        "the datapath pinned in {} cannot be adopted: {what}; start an agent that matches it, or remove it with `mmesh-agent detach --bpffs {}` (enforcement stops until an agent starts again)", dir.display(), dir.display()
    )]
    PinnedMismatch {
        dir: std::path::PathBuf,
        what: String,
    },
    #[error("pinned object {}: {source}", path.display())]
    Pin {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create the program barrier map-in-map: {0}")]
    Barrier(#[source] std::io::Error),
}

impl DatapathError {
    pub(super) fn map(map: &'static str, source: MapError) -> Self {
        if is_permission(&source) {
            return Self::Permission {
                doing: format!("writing map {map}"),
            };
        }
        Self::Map { map, source }
    }
}

/// The error of a failed [`batch::update`] of map `map`.
pub(super) fn batch_error(map: &'static str) -> impl Fn(std::io::Error) -> DatapathError {
    move |io_error| {
        let call = "bpf_map_update_batch";
        DatapathError::map(
            map,
            MapError::SyscallError(aya::sys::SyscallError { call, io_error }),
        )
    }
}

/// Whether an error chain bottoms out in EPERM or EACCES.
pub(super) fn is_permission(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && matches!(io.raw_os_error(), Some(libc::EPERM | libc::EACCES))
        {
            return true;
        }
        cur = e.source();
    }
    false
}

pub(crate) fn is_errno(err: &(dyn std::error::Error + 'static), errno: i32) -> bool {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && io.raw_os_error() == Some(errno)
        {
            return true;
        }
        cur = e.source();
    }
    false
}
