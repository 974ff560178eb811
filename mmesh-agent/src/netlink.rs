//! Network interfaces over rtnetlink, in the agent's own network namespace.
//!
//! Not through `/sys/class/net`: run through `nsenter --net=…` without a
//! remount, `/sys` still shows the namespace the agent came from, and a link
//! type read there belongs to some other device of the same name.

use std::io;

use netlink_packet_core::{
    NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload, NetlinkSerializable,
};
use netlink_packet_route::{
    RouteNetlinkMessage,
    link::{LinkAttribute, LinkFlags, LinkInfo, LinkMessage},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

/// `RTMGRP_LINK`: the multicast group of link changes.
const RTMGRP_LINK: u32 = 1;
/// Largest datagram read at once (the kernel sends at most a page or 32 KiB).
const RECV_BUFFER: usize = 64 * 1024;

/// A network interface as the kernel describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// `ARPHRD_*` (1 is Ethernet).
    pub link_type: u16,
    /// The driver kind of a virtual device (`veth`, `tun`, `bridge`, …);
    /// `None` for a physical device.
    pub kind: Option<String>,
    pub up: bool,
}

impl Link {
    fn from_message(msg: &LinkMessage) -> Option<Self> {
        let mut name = None;
        let mut kind = None;
        for attr in &msg.attributes {
            match attr {
                LinkAttribute::IfName(n) => name = Some(n.clone()),
                LinkAttribute::LinkInfo(infos) => {
                    for info in infos {
                        if let LinkInfo::Kind(k) = info {
                            kind = Some(k.to_string());
                        }
                    }
                }
                _ => {}
            }
        }
        Some(Self {
            index: msg.header.index,
            name: name?,
            link_type: u16::from(msg.header.link_layer_type),
            kind,
            up: msg.header.flags.contains(LinkFlags::Up),
        })
    }
}

fn socket() -> io::Result<Socket> {
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    Ok(socket)
}

fn send<I: NetlinkSerializable>(socket: &Socket, payload: I, flags: u16) -> io::Result<()>
where
    NetlinkPayload<I>: From<I>,
{
    let mut msg = NetlinkMessage::new(NetlinkHeader::default(), NetlinkPayload::from(payload));
    msg.header.flags = flags;
    msg.header.sequence_number = 1;
    msg.finalize();
    let mut buf = vec![0; msg.buffer_len()];
    msg.serialize(&mut buf);
    socket.send(&buf, 0)?;
    Ok(())
}

/// The messages of one datagram.
fn messages(buf: &[u8]) -> io::Result<Vec<NetlinkMessage<RouteNetlinkMessage>>> {
    let mut out = Vec::new();
    let mut offset = 0;
    while offset < buf.len() {
        let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf[offset..])
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
        let len = msg.header.length as usize;
        out.push(msg);
        if len == 0 {
            break;
        }
        // Messages are aligned to 4 bytes.
        offset += (len + 3) & !3;
    }
    Ok(out)
}

/// The interface called `name`, or `None` if there is none.
pub fn link(name: &str) -> io::Result<Option<Link>> {
    let socket = socket()?;
    let mut request = LinkMessage::default();
    request
        .attributes
        .push(LinkAttribute::IfName(name.to_owned()));
    send(
        &socket,
        RouteNetlinkMessage::GetLink(request),
        NLM_F_REQUEST,
    )?;
    let mut buf = vec![0u8; RECV_BUFFER];
    let n = socket.recv(&mut &mut buf[..], 0)?;
    for msg in messages(&buf[..n.min(buf.len())])? {
        match msg.payload {
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link)) => {
                return Ok(Link::from_message(&link));
            }
            NetlinkPayload::Error(err) => {
                let code = -err.raw_code();
                if code == libc::ENODEV {
                    return Ok(None);
                }
                return Err(io::Error::from_raw_os_error(code));
            }
            _ => {}
        }
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidData,
        format!("no answer from the kernel about interface {name}"),
    ))
}

/// A subscription to link changes (interfaces added, removed, changed).
pub struct LinkWatch {
    socket: Socket,
    buf: Vec<u8>,
}

impl LinkWatch {
    pub fn open() -> io::Result<Self> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind(&SocketAddr::new(0, RTMGRP_LINK))?;
        Ok(Self {
            socket,
            buf: vec![0u8; RECV_BUFFER],
        })
    }

    /// Blocks until something changed; returns the names of the links the
    /// change was about. An overrun of the socket (`ENOBUFS`: changes were
    /// lost) returns an empty list: the caller must look at every link.
    pub fn wait(&mut self) -> io::Result<Vec<String>> {
        let n = match self.socket.recv(&mut &mut self.buf[..], 0) {
            Ok(n) => n,
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut names = Vec::new();
        for msg in messages(&self.buf[..n.min(self.buf.len())])? {
            if let NetlinkPayload::InnerMessage(
                RouteNetlinkMessage::NewLink(link) | RouteNetlinkMessage::DelLink(link),
            ) = msg.payload
                && let Some(link) = Link::from_message(&link)
            {
                names.push(link.name);
            }
        }
        Ok(names)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_found_and_an_unknown_name_is_none() {
        let lo = link("lo").unwrap().expect("every namespace has lo");
        assert_eq!(lo.name, "lo");
        assert_eq!(lo.link_type, 772, "ARPHRD_LOOPBACK");
        assert!(link("mmesh-nonesuch").unwrap().is_none());
    }
}
