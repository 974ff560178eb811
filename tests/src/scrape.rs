//! The agent's HTTP endpoint as a test reads it: `GET` over plain
//! HTTP/1.1 from inside a test namespace, and the samples of a Prometheus
//! scrape.

use std::{
    io::{self, Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::Duration,
};

use crate::netns::NetNs;

/// The agent's default `--metrics-addr`, in its own namespace.
pub const METRICS: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9464);

/// An HTTP answer: status code, headers and body.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub head: String,
    pub body: String,
}

/// `GET path` from `ns` to `addr` (also in `ns`), with `timeout` for the
/// connection and the answer.
///
/// # Panics
/// If the answer is not HTTP.
pub fn get(ns: &NetNs, addr: SocketAddr, path: &str, timeout: Duration) -> io::Result<Answer> {
    let mut stream = ns.tcp_connect(IpAddr::V4(Ipv4Addr::LOCALHOST), addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = String::new();
    stream.read_to_string(&mut raw)?;
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("GET {path}: no end of headers in {raw:?}"));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("GET {path}: no status in {head:?}"));
    Ok(Answer {
        status,
        head: head.to_owned(),
        body: body.to_owned(),
    })
}

/// The value of the sample `series` (name and labels, exactly as written)
/// in a scrape.
#[must_use]
pub fn sample(scrape: &str, series: &str) -> Option<f64> {
    scrape.lines().find_map(|line| {
        let value = line.strip_prefix(series)?.strip_prefix(' ')?;
        value.parse().ok()
    })
}

/// [`sample`], which must be there.
///
/// # Panics
/// If it is not.
#[track_caller]
#[must_use]
pub fn must_sample(scrape: &str, series: &str) -> f64 {
    sample(scrape, series).unwrap_or_else(|| panic!("no {series} in the scrape:\n{scrape}"))
}
