//! Attaching the programs to interfaces, and detaching them.

use std::{
    mem::ManuallyDrop,
    os::{linux::net::SocketAddrExt as _, unix::net::UnixListener},
    path::{Path, PathBuf},
};

use aya::{
    programs::{
        ProgramError, SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, Link as _, PinnedLink},
        tc,
        tc::{NlOptions, SchedClassifierLink, SchedClassifierLinkId, TcAttachOptions, TcHandle},
        xdp::{XdpLink, XdpLinkId},
    },
    util::KernelVersion,
};
use mmesh_common::{
    Direction,
    maps::{pins, programs},
};
use serde::Serialize;

use super::{
    Datapath, DatapathError,
    error::{is_errno, is_permission},
    load::program,
    pin::pin_interface,
};
use crate::{
    hook::{self, Hook, ReceiveHook},
    interface::{self, InterfaceError, InterfaceSpec, Role},
};

/// An interface with the programs attached to it.
#[derive(Clone, Debug, Serialize)]
pub struct Attachment {
    pub name: String,
    pub ifindex: u32,
    pub role: Role,
    /// Where the receive program is: XDP, or TC ingress.
    pub receive: Hook,
    /// The device's driver (`veth`, `tun`, `ixgbe`; empty if it has none),
    /// which decided `receive` under `--receive-hook auto`.
    pub driver: String,
    /// How TC programs are attached: `tcx` or `clsact`.
    pub tc_mode: &'static str,
    /// Whether the links were found pinned by an earlier agent and kept,
    /// their programs replaced in place.
    pub adopted: bool,
    #[serde(skip)]
    added_clsact: bool,
    /// Pinned, before TCX: the pin that says an agent added the device's
    /// clsact qdisc (`detach` removes the qdisc with it).
    #[serde(skip)]
    qdisc_pin: Option<PathBuf>,
    #[serde(skip)]
    links: AttachmentLinks,
}

/// Priority and handle of mmesh's clsact filters in pinned mode (kernels
/// before TCX): fixed, so that a later agent finds its filters again. A
/// clsact filter has no `bpf_link` and does not end with the process (the
/// qdisc holds it), and its program is replaced in place by a netlink
/// request for the same priority and handle. "mm" twice: a priority and a
/// handle other tools are unlikely to use, and lower than the 49152 the
/// kernel gives a filter attached without one, so mmesh runs first.
const CLSACT_PRIORITY: u16 = 0x6d6d;
const CLSACT_HANDLE: TcHandle = TcHandle::new(0, 0x6d6d);

/// The links of one attachment, to detach it alone, and its claim on the
/// device ([`claim`]).
#[derive(Debug)]
struct AttachmentLinks {
    receive: Option<Link>,
    transmit: Option<Link>,
    claim: Option<UnixListener>,
}

impl Clone for AttachmentLinks {
    /// A copy describes the attachment; only the original can detach it.
    fn clone(&self) -> Self {
        Self {
            receive: None,
            transmit: None,
            claim: None,
        }
    }
}

/// One link, and the program it attaches.
#[derive(Debug)]
enum Link {
    Xdp(&'static str, XdpLinkId),
    Tc(&'static str, SchedClassifierLinkId),
    /// A link pinned at `path`: it stays attached after the agent ends,
    /// until the pin is removed.
    Pinned {
        link: FdLink,
        path: PathBuf,
    },
    /// A clsact filter at [`CLSACT_PRIORITY`] and [`CLSACT_HANDLE`] (pinned
    /// mode before TCX), its program pinned at `path`. Dropping aya's
    /// handle would delete the filter: it is dropped only by
    /// [`Datapath::unlink`], so that the filter stays when the agent ends.
    Filter {
        link: ManuallyDrop<SchedClassifierLink>,
        path: PathBuf,
    },
}

impl Datapath {
    /// Attaches the receive and transmit programs of `spec.role`: receive on
    /// the hook `receive` chooses for the device (XDP, or TC ingress),
    /// transmit on TC egress. On failure nothing of this interface stays
    /// attached.
    pub fn attach(
        &mut self,
        spec: &InterfaceSpec,
        receive: ReceiveHook,
    ) -> Result<&Attachment, DatapathError> {
        if self.attachments.iter().any(|a| a.name == spec.name) {
            return Err(DatapathError::DuplicateInterface(spec.name.clone()));
        }
        let ifindex = interface::check(&spec.name)?;
        let device = hook::device_kind(&spec.name).map_err(|source| {
            if source.raw_os_error() == Some(libc::ENODEV) {
                DatapathError::Interface(InterfaceError::Unknown(spec.name.clone()))
            } else {
                DatapathError::DeviceKind {
                    name: spec.name.clone(),
                    source,
                }
            }
        })?;
        let hook = receive.resolve(&device);
        // Receive sees what comes from the other side of the interface.
        let (rx, tx) = match spec.role {
            Role::Uplink => (Direction::Inbound, Direction::Outbound),
            Role::Workload => (Direction::Outbound, Direction::Inbound),
        };
        let claim = claim(ifindex).map_err(|source| {
            if source.kind() == std::io::ErrorKind::AddrInUse {
                DatapathError::Claimed {
                    name: spec.name.clone(),
                }
            } else {
                DatapathError::Claim {
                    name: spec.name.clone(),
                    source,
                }
            }
        })?;
        let tcx = KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0));
        if self.pins.is_some() {
            let device = (ifindex, hook, device.driver);
            return self.attach_pinned(spec, device, tcx, claim, (rx, tx));
        }
        // Before TCX (6.6) a TC program needs the clsact qdisc, which
        // holds both the ingress and the egress hook.
        let added_clsact = !tcx && add_clsact(&spec.name, tc_program(tx))?;
        let undo_clsact = |e: DatapathError| {
            if added_clsact {
                remove_clsact(&spec.name);
            }
            e
        };
        let rx_link = match hook {
            Hook::Xdp => self.attach_xdp(xdp_program(rx), &spec.name, ifindex),
            Hook::Tc => self.attach_tc(tc_program(rx), &spec.name, TcAttachType::Ingress),
        }
        .map_err(undo_clsact)?;
        let tx_link = match self.attach_tc(tc_program(tx), &spec.name, TcAttachType::Egress) {
            Ok(link) => link,
            Err(e) => {
                self.unlink(rx_link);
                return Err(undo_clsact(e));
            }
        };
        self.attachments.push(Attachment {
            name: spec.name.clone(),
            ifindex,
            role: spec.role,
            receive: hook,
            driver: device.driver,
            tc_mode: if tcx { "tcx" } else { "clsact" },
            adopted: false,
            added_clsact,
            qdisc_pin: None,
            links: AttachmentLinks {
                receive: Some(rx_link),
                transmit: Some(tx_link),
                claim: Some(claim),
            },
        });
        Ok(self.attachments.last().expect("just pushed"))
    }

    /// [`Datapath::attach`] with pins: each link is adopted from its pin,
    /// its program replaced atomically, or made and pinned. Before TCX, the
    /// TC programs sit in clsact filters that mmesh finds by priority and
    /// handle ([`Datapath::pinned_filter`]); XDP has links there too.
    fn attach_pinned(
        &mut self,
        spec: &InterfaceSpec,
        (ifindex, hook, driver): (u32, Hook, String),
        tcx: bool,
        claim: UnixListener,
        (rx, tx): (Direction, Direction),
    ) -> Result<&Attachment, DatapathError> {
        let pins = self.pins.as_ref().expect("pinned");
        let path = |side: &str| {
            if tcx {
                pins.link_path(&spec.name, ifindex, side)
            } else {
                pins.filter_path(&spec.name, ifindex, side)
            }
        };
        let rx_path = match hook {
            Hook::Xdp => pins.link_path(&spec.name, ifindex, pins::RECEIVE),
            Hook::Tc => path(pins::RECEIVE),
        };
        let tx_path = path(pins::TRANSMIT);
        let qdisc_pin = (!tcx).then(|| pins.qdisc_path(&spec.name, ifindex));
        if let Some(qdisc_pin) = &qdisc_pin {
            // Marked right after it is added, before any filter: a crash
            // while attaching leaves it marked as the agent's, for
            // `detach` to remove.
            if add_clsact(&spec.name, tc_program(tx))? && !qdisc_pin.exists() {
                let tc: &mut SchedClassifier = program(&mut self.ebpf, tc_program(tx))?;
                tc.pin(qdisc_pin).map_err(|e| pin_error(qdisc_pin, e))?;
            }
        }
        let rx_program = match hook {
            Hook::Xdp => xdp_program(rx),
            Hook::Tc => tc_program(rx),
        };
        let (rx_link, rx_adopted) = if tcx || hook == Hook::Xdp {
            self.pinned_link(
                rx_path,
                rx_program,
                hook,
                TcAttachType::Ingress,
                &spec.name,
                ifindex,
            )?
        } else {
            self.pinned_filter(rx_path, rx_program, TcAttachType::Ingress, &spec.name)?
        };
        let tx_link = if tcx {
            self.pinned_link(
                tx_path,
                tc_program(tx),
                Hook::Tc,
                TcAttachType::Egress,
                &spec.name,
                ifindex,
            )
        } else {
            self.pinned_filter(tx_path, tc_program(tx), TcAttachType::Egress, &spec.name)
        };
        let (tx_link, tx_adopted) = match tx_link {
            Ok(link) => link,
            Err(e) => {
                if !rx_adopted {
                    self.unlink(rx_link);
                }
                return Err(e);
            }
        };
        self.attachments.push(Attachment {
            name: spec.name.clone(),
            ifindex,
            role: spec.role,
            receive: hook,
            driver,
            tc_mode: if tcx { "tcx" } else { "clsact" },
            adopted: rx_adopted && tx_adopted,
            added_clsact: false,
            qdisc_pin: qdisc_pin.filter(|p| p.exists()),
            links: AttachmentLinks {
                receive: Some(rx_link),
                transmit: Some(tx_link),
                claim: Some(claim),
            },
        });
        Ok(self.attachments.last().expect("just pushed"))
    }

    /// Before TCX: mmesh's clsact filter on `side` of `interface`, with
    /// `name` in it, and that program pinned at `path` (for `detach` and
    /// the next agent to know the filter is there); true if the filter was
    /// there already. A filter found there has its program replaced in
    /// place: one netlink request without `NLM_F_CREATE` for the same
    /// priority and handle, which `cls_bpf` serves by swapping the program
    /// under RCU, so packets see either program, never none. The kernel
    /// answers `ENOENT` when there is no such filter; then it is added.
    fn pinned_filter(
        &mut self,
        path: PathBuf,
        name: &'static str,
        side: TcAttachType,
        interface: &str,
    ) -> Result<(Link, bool), DatapathError> {
        let attach_error = |source: ProgramError| {
            if is_permission(&source) {
                DatapathError::Permission {
                    doing: format!("attaching TC to {interface}"),
                }
            } else {
                DatapathError::Attach {
                    program: name,
                    name: interface.to_owned(),
                    source,
                }
            }
        };
        let classifier: &mut SchedClassifier = program(&mut self.ebpf, name)?;
        let found =
            SchedClassifierLink::attached(interface, side, CLSACT_PRIORITY, CLSACT_HANDLE, None)
                .map_err(|e| pin_error(&path, e))?;
        let (id, adopted) = match classifier.attach_to_link(found) {
            Ok(id) => (id, true),
            Err(e) if is_errno(&e, libc::ENOENT) => {
                let options = TcAttachOptions::Netlink(NlOptions {
                    priority: CLSACT_PRIORITY,
                    handle: CLSACT_HANDLE,
                    ..NlOptions::default()
                });
                let id = classifier
                    .attach_with_options(interface, side, options)
                    .map_err(attach_error)?;
                (id, false)
            }
            Err(e) => return Err(attach_error(e)),
        };
        let link = classifier.take_link(id).map_err(|e| pin_error(&path, e))?;
        let link = ManuallyDrop::new(link);
        let pinned = (|| {
            if path.exists() {
                std::fs::remove_file(&path).map_err(|e| pin_error(&path, e))?;
            }
            classifier.pin(&path).map_err(|e| pin_error(&path, e))
        })();
        if let Err(e) = pinned {
            if !adopted {
                let _ = ManuallyDrop::into_inner(link).detach();
            }
            return Err(e);
        }
        Ok((Link::Filter { link, path }, adopted))
    }

    /// The link pinned at `path`, adopted (its program replaced by
    /// `program` with one `BPF_LINK_UPDATE`: packets see either program,
    /// never none) or else made and pinned; true if adopted. A pinned link
    /// that cannot take `program` (the hook changed) is replaced after the
    /// new link is attached.
    fn pinned_link(
        &mut self,
        path: PathBuf,
        name: &'static str,
        hook: Hook,
        side: TcAttachType,
        interface: &str,
        ifindex: u32,
    ) -> Result<(Link, bool), DatapathError> {
        let mut old = None;
        if path.exists() {
            match self.adopt_link(&path, name, hook) {
                Ok(link) => return Ok((Link::Pinned { link, path }, true)),
                Err(err) => {
                    tracing::warn!(path = %path.display(), %err, "cannot adopt the pinned link; replacing it");
                    let mut aside = path.clone().into_os_string();
                    aside.push(":old");
                    std::fs::rename(&path, &aside).map_err(|e| pin_error(&path, e))?;
                    old = Some(aside);
                }
            }
        }
        let link = match hook {
            Hook::Xdp => self.attach_xdp(name, interface, ifindex)?,
            Hook::Tc => self.attach_tc(name, interface, side)?,
        };
        let fd = self.take_fd_link(link, &path)?;
        let pinned = fd.pin(&path).map_err(|e| pin_error(&path, e))?;
        if let Some(old) = old {
            let _ = std::fs::remove_file(old);
        }
        Ok((
            Link::Pinned {
                link: pinned.into(),
                path,
            },
            false,
        ))
    }

    /// Opens the link pinned at `path` and puts `name` in it.
    fn adopt_link(
        &mut self,
        path: &Path,
        name: &'static str,
        hook: Hook,
    ) -> Result<FdLink, DatapathError> {
        let fd: FdLink = PinnedLink::from_pin(path)
            .map_err(|e| pin_error(path, e))?
            .into();
        match hook {
            Hook::Xdp => {
                let xdp: &mut Xdp = program(&mut self.ebpf, name)?;
                let link = XdpLink::try_from(fd).map_err(|e| pin_error(path, e))?;
                let id = xdp.attach_to_link(link).map_err(|e| pin_error(path, e))?;
                let link = xdp.take_link(id).map_err(|e| pin_error(path, e))?;
                FdLink::try_from(link).map_err(|e| pin_error(path, e))
            }
            Hook::Tc => {
                let tc: &mut SchedClassifier = program(&mut self.ebpf, name)?;
                let link = SchedClassifierLink::try_from(fd).map_err(|e| pin_error(path, e))?;
                let id = tc.attach_to_link(link).map_err(|e| pin_error(path, e))?;
                let link = tc.take_link(id).map_err(|e| pin_error(path, e))?;
                FdLink::try_from(link).map_err(|e| pin_error(path, e))
            }
        }
    }

    /// Takes a new link out of its program, as a file descriptor link to pin.
    fn take_fd_link(&mut self, link: Link, path: &Path) -> Result<FdLink, DatapathError> {
        match link {
            Link::Xdp(name, id) => {
                let xdp: &mut Xdp = program(&mut self.ebpf, name)?;
                let link = xdp.take_link(id).map_err(|e| pin_error(path, e))?;
                FdLink::try_from(link).map_err(|e| pin_error(path, e))
            }
            Link::Tc(name, id) => {
                let tc: &mut SchedClassifier = program(&mut self.ebpf, name)?;
                let link = tc.take_link(id).map_err(|e| pin_error(path, e))?;
                FdLink::try_from(link).map_err(|e| pin_error(path, e))
            }
            Link::Pinned { link, .. } => Ok(link),
            Link::Filter { .. } => unreachable!("clsact filters are never made into FdLinks"),
        }
    }

    /// Removes the pinned links that no attachment of this agent holds:
    /// interfaces no longer configured, or gone (or back under another
    /// index). Returns the pins removed; each one detached its program.
    pub fn prune_links(&mut self) -> Vec<String> {
        let Some(pins) = &self.pins else {
            return Vec::new();
        };
        let held: Vec<&PathBuf> = self
            .attachments
            .iter()
            .flat_map(|a| [&a.links.receive, &a.links.transmit])
            .filter_map(|l| match l {
                Some(Link::Pinned { path, .. } | Link::Filter { path, .. }) => Some(path),
                _ => None,
            })
            .chain(self.attachments.iter().filter_map(|a| a.qdisc_pin.as_ref()))
            .collect();
        let mut removed = Vec::new();
        for path in pins.link_pins() {
            if !held.contains(&&path) && release_pin(&path).is_ok() {
                removed.push(
                    path.file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                );
            }
        }
        removed
    }

    fn attach_xdp(
        &mut self,
        name: &'static str,
        interface: &str,
        ifindex: u32,
    ) -> Result<Link, DatapathError> {
        let xdp: &mut Xdp = program(&mut self.ebpf, name)?;
        let link = xdp
            .attach_to_if_index(ifindex, XdpMode::Default)
            .map_err(|e| {
                if is_errno(&e, libc::EBUSY) || is_errno(&e, libc::EEXIST) {
                    DatapathError::XdpBusy {
                        name: interface.to_owned(),
                    }
                } else if is_permission(&e) {
                    DatapathError::Permission {
                        doing: format!("attaching XDP to {interface}"),
                    }
                } else {
                    DatapathError::Attach {
                        program: name,
                        name: interface.to_owned(),
                        source: e,
                    }
                }
            })?;
        Ok(Link::Xdp(name, link))
    }

    fn attach_tc(
        &mut self,
        name: &'static str,
        interface: &str,
        side: TcAttachType,
    ) -> Result<Link, DatapathError> {
        let classifier: &mut SchedClassifier = program(&mut self.ebpf, name)?;
        let link = classifier.attach(interface, side).map_err(|e| {
            if is_permission(&e) {
                DatapathError::Permission {
                    doing: format!("attaching TC to {interface}"),
                }
            } else {
                DatapathError::Attach {
                    program: name,
                    name: interface.to_owned(),
                    source: e,
                }
            }
        })?;
        Ok(Link::Tc(name, link))
    }

    /// Detaches one link. Best effort: a link whose device is gone fails to
    /// detach, and is released all the same when its file descriptor closes
    /// (at the latest with the program, at exit).
    fn unlink(&mut self, link: Link) {
        match link {
            Link::Xdp(name, link) => {
                if let Ok(xdp) = program::<Xdp>(&mut self.ebpf, name) {
                    xdp.detach(link).ok();
                }
            }
            Link::Tc(name, link) => {
                if let Ok(classifier) = program::<SchedClassifier>(&mut self.ebpf, name) {
                    classifier.detach(link).ok();
                }
            }
            Link::Pinned { link, path } => {
                // Without its pin, the link ends when its last descriptor
                // (this one) closes.
                let _ = std::fs::remove_file(path);
                drop(link);
            }
            Link::Filter { link, path } => {
                let _ = std::fs::remove_file(path);
                let _ = ManuallyDrop::into_inner(link).detach();
            }
        }
    }

    /// Detaches the programs from the interface attached as `name`, and
    /// forgets it; `None` if no interface of that name is attached. For an
    /// interface that is gone already, this releases the links the kernel
    /// has made defunct.
    pub fn detach(&mut self, name: &str) -> Option<Attachment> {
        let at = self.attachments.iter().position(|a| a.name == name)?;
        let mut a = self.attachments.remove(at);
        for link in [a.links.receive.take(), a.links.transmit.take()]
            .into_iter()
            .flatten()
        {
            self.unlink(link);
        }
        if a.added_clsact {
            remove_clsact(&a.name);
            a.added_clsact = false;
        }
        if let Some(qdisc_pin) = a.qdisc_pin.take() {
            let _ = release_pin(&qdisc_pin);
        }
        // Last: another agent may take the device once nothing of ours is on it.
        drop(a.links.claim.take());
        Some(a)
    }
}

impl Drop for Datapath {
    fn drop(&mut self) {
        // Links are detached when `ebpf` drops; the clsact qdiscs this agent
        // added (kernels before TCX) are removed here.
        for a in &self.attachments {
            if a.added_clsact {
                remove_clsact(&a.name);
            }
        }
    }
}

/// Removes a pin of the `links` directory and what it keeps attached: a
/// link detaches when its pin goes (unless an agent holds it); a clsact
/// filter's pin (`IFNAME:IFINDEX:SIDE:filter`, before TCX) takes mmesh's
/// filter off that side of the device, and a qdisc pin
/// (`IFNAME:IFINDEX:clsact`) the device's clsact qdisc, which an agent
/// added. Both only while the device is still the one pinned (same name,
/// same index): a device that went took its filters and qdisc with it.
/// Remove the filter pins of a device before its qdisc pin.
pub(super) fn release_pin(path: &Path) -> std::io::Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let parts: Vec<&str> = name.split(':').collect();
    let interface = pin_interface(&name);
    let same_device = |index: &str| {
        index
            .parse::<u32>()
            .is_ok_and(|index| interface::check(&interface).is_ok_and(|current| current == index))
    };
    match parts.as_slice() {
        [_, index, side, pins::FILTER] if same_device(index) => {
            let side = if *side == pins::RECEIVE {
                TcAttachType::Ingress
            } else {
                TcAttachType::Egress
            };
            let filter = SchedClassifierLink::attached(
                &interface,
                side,
                CLSACT_PRIORITY,
                CLSACT_HANDLE,
                None,
            )?;
            match filter.detach() {
                // Someone deleted it already: what the pin promised is done.
                Err(e) if !is_errno(&e, libc::ENOENT) => return Err(std::io::Error::other(e)),
                _ => {}
            }
        }
        [_, index, pins::QDISC] if same_device(index) => remove_clsact(&interface),
        _ => {}
    }
    std::fs::remove_file(path)
}

/// Adds the clsact qdisc to `name` (kernels before TCX); true if this call
/// added it, false if it was there.
fn add_clsact(name: &str, program: &'static str) -> Result<bool, DatapathError> {
    match tc::qdisc_add_clsact(name) {
        Ok(()) => Ok(true),
        Err(tc::TcError::AlreadyAttached) => Ok(false),
        Err(e) if matches!(&e, tc::TcError::NetlinkError(_)) && is_errno(&e, libc::EEXIST) => {
            Ok(false)
        }
        Err(e) => Err(DatapathError::Attach {
            program,
            name: name.to_owned(),
            source: ProgramError::from(e),
        }),
    }
}

/// Claims the device `ifindex` of this network namespace for this agent:
/// an abstract Unix socket named after it, which the kernel keeps per
/// network namespace and releases when the process ends, however it ends.
/// Fails with `AddrInUse` if another agent holds it.
///
/// XDP takes one program per device, so a second agent used to find the
/// first one's program there; TC takes many, and which of them are mmesh's
/// cannot be told without `CAP_SYS_ADMIN` (a program's name needs a file
/// descriptor from its id), which the agent drops.
fn claim(ifindex: u32) -> std::io::Result<UnixListener> {
    let name = format!("mmesh-agent/ifindex/{ifindex}");
    UnixListener::bind_addr(&std::os::unix::net::SocketAddr::from_abstract_name(
        name.as_bytes(),
    )?)
}

/// The XDP program of `direction`.
const fn xdp_program(direction: Direction) -> &'static str {
    match direction {
        Direction::Inbound => programs::XDP_INBOUND,
        Direction::Outbound => programs::XDP_OUTBOUND,
    }
}

/// The TC program of `direction`, for ingress and egress alike.
const fn tc_program(direction: Direction) -> &'static str {
    match direction {
        Direction::Inbound => programs::TC_INBOUND,
        Direction::Outbound => programs::TC_OUTBOUND,
    }
}

fn remove_clsact(name: &str) {
    // Best effort at teardown: a failure leaves an empty qdisc behind, which
    // does nothing to traffic.
    let _ = std::process::Command::new("tc")
        .args(["qdisc", "del", "dev", name, "clsact"])
        .status();
}

fn pin_error(path: &Path, err: impl std::error::Error + Send + Sync + 'static) -> DatapathError {
    DatapathError::Pin {
        path: path.to_owned(),
        source: std::io::Error::other(err),
    }
}
