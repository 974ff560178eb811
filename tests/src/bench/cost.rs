//! Benchmark group `cost`: what attaching the agent costs ordinary traffic.
//!
//! One TCP stream through a veth pair (a [`Topology`]: `host` ↔ `remote`),
//! as fast as the stack goes, with no agent (the baseline) and with the
//! agent attached to the host end, as `uplink` and as `workload`, under a
//! policy without rules: one account owning both ends (so every packet is
//! attributed and counted), no lists, no limits. Each (role, direction) is
//! its own figure against the baseline of the same direction measured beside
//! it; the goal is 0.95× of it.
//!
//! The receive hook is the agent's default (`--receive-hook auto`: TC
//! ingress on a veth). For contrast, two more figures force native XDP on
//! receive, which on a veth turns off TSO/GSO on the peer: the sender on the
//! far side then pushes every segment through its stack on its own.
//!
//! Each configuration has its own topology (and its own loaded datapath),
//! set up once. In every round each figure's stream runs right beside one of
//! the baseline's, in alternating order. Sender and receiver are threads of
//! this process; a stream runs for a second, 0.2 s in quick mode.

use std::{
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use mmesh_agent::{
    compile::{Capacity, compile},
    datapath::Datapath,
    hook::ReceiveHook,
    interface::{InterfaceSpec, Role},
    policy::Policy,
};

use super::{
    Options,
    report::{Figure, Goal, Report},
};
use crate::{
    netns::{HOST_IF, Topology},
    wire::{Stream, tcp_stream},
};

const GROUP: &str = "cost to ordinary traffic (one TCP stream through a veth)";

const HOST: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 77, 0, 10));
const REMOTE: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 77, 0, 100));
const PORT: u16 = 7200;

/// Rules: none. One account owns both ends, so that either role attributes
/// every packet to it.
const POLICY: &str = "
accounts:
  - id: tenant
    prefixes: [10.77.0.10/32, 10.77.0.100/32]
";

/// Which way a stream crosses the veth.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Way {
    /// Remote → host: the host end's receive hook sees it.
    Receive,
    /// Host → remote: the host end's transmit hook (TC egress) sees it.
    Transmit,
}

/// One topology and what is attached to its host end.
struct Setup {
    name: &'static str,
    /// `None`: the baseline, nothing attached.
    agent: Option<(Role, ReceiveHook)>,
    ways: &'static [Way],
    /// Dropped (detached) before the topology.
    dp: Option<Datapath>,
    topo: Topology,
    /// Per stream: its way, Gbit/s with the agent and beside it without.
    samples: Vec<(Way, [f64; 2])>,
}

impl Setup {
    fn new(
        tag: &str,
        name: &'static str,
        agent: Option<(Role, ReceiveHook)>,
        ways: &'static [Way],
    ) -> Self {
        let topo = Topology::new(tag);
        topo.add_host_addrs(&[HOST]);
        topo.add_remote_addrs(&[REMOTE]);
        let dp = agent.map(|(role, receive)| attach(&topo, role, receive));
        Self {
            name,
            agent,
            ways,
            dp,
            topo,
            samples: Vec::new(),
        }
    }

    fn stream(&self, way: Way, duration: Duration, port: u16) -> Stream {
        let (sender, src, receiver, dst) = match way {
            Way::Receive => (&self.topo.remote, REMOTE, &self.topo.host, HOST),
            Way::Transmit => (&self.topo.host, HOST, &self.topo.remote, REMOTE),
        };
        tcp_stream(
            sender,
            src,
            receiver,
            SocketAddr::new(dst, port),
            duration,
            u64::MAX,
        )
        .unwrap_or_else(|e| panic!("bench: cost: {} {way:?}: TCP stream: {e}", self.name))
    }
}

/// Loads a datapath with [`POLICY`] and attaches it to the host end.
fn attach(topo: &Topology, role: Role, receive: ReceiveHook) -> Datapath {
    let capacity = Capacity {
        accounts: 16,
        account_prefixes: 64,
        list_prefixes: 64,
        counters: 256,
        event_buffer: 64 * 1024,
        stride_chunks: 4,
        flow_cache: 256,
    };
    let mut dp = Datapath::load(capacity).expect("loading mmesh (run as root)");
    drop(dp.take_events());
    let policy = Policy::parse(POLICY, "cost policy", Path::new(".")).expect("valid policy");
    let compiled = compile(&policy, None, dp.capacity()).expect("the cost policy compiles");
    dp.apply(Arc::new(compiled)).expect("applying the policy");
    topo.host
        .enter(|| {
            dp.attach(
                &InterfaceSpec {
                    name: HOST_IF.into(),
                    role,
                },
                receive,
            )
            .map(drop)
        })
        .expect("attaching mmesh to the host end");
    dp
}

fn label(way: Way, role: Option<Role>) -> &'static str {
    match (role, way) {
        (Some(Role::Workload), Way::Receive) => "container → host",
        (Some(Role::Workload), Way::Transmit) => "host → container",
        (_, Way::Receive) => "remote → host",
        (_, Way::Transmit) => "host → remote",
    }
}

pub fn run(opts: &Options, report: &mut Report) {
    let duration = if opts.quick {
        Duration::from_millis(200)
    } else {
        Duration::from_secs(1)
    };
    let setup = Instant::now();
    let both: &[Way] = &[Way::Receive, Way::Transmit];
    let receive: &[Way] = &[Way::Receive];
    let mut setups = vec![
        Setup::new("cost-none", "no agent", None, both),
        Setup::new(
            "cost-up",
            "uplink",
            Some((Role::Uplink, ReceiveHook::Auto)),
            both,
        ),
        Setup::new(
            "cost-wl",
            "workload",
            Some((Role::Workload, ReceiveHook::Auto)),
            both,
        ),
        Setup::new(
            "cost-upx",
            "uplink, receive forced onto XDP",
            Some((Role::Uplink, ReceiveHook::Xdp)),
            receive,
        ),
        Setup::new(
            "cost-wlx",
            "workload, receive forced onto XDP",
            Some((Role::Workload, ReceiveHook::Xdp)),
            receive,
        ),
    ];
    eprintln!("bench: cost: set up in {:.1?}", setup.elapsed());
    // Each figure's stream runs right beside a stream of the baseline in the
    // same direction, in alternating order, so that a neighbour's load on
    // this shared machine falls on both or neither.
    let (base, rest) = setups.split_first_mut().expect("the baseline is first");
    let mut port = PORT;
    let mut next_port = || {
        port += 1;
        port
    };
    for round in 0..opts.rounds {
        let mut line = String::new();
        for s in rest.iter_mut() {
            for &way in s.ways {
                let mut pair = [0.0; 2];
                for i in 0..2 {
                    let agent = (i + round) % 2 == 0;
                    let who: &Setup = if agent { s } else { base };
                    pair[usize::from(!agent)] = who.stream(way, duration, next_port()).gbps();
                }
                let _ = write!(
                    line,
                    " {} {way:?} {:.1} (none {:.1});",
                    s.name, pair[0], pair[1]
                );
                s.samples.push((way, pair));
            }
        }
        eprintln!(
            "bench: cost round {}/{} (Gbit/s):{line}",
            round + 1,
            opts.rounds
        );
    }
    for s in rest.iter() {
        let (role, receive) = s.agent.expect("an agent");
        for &way in s.ways {
            let forced = receive == ReceiveHook::Xdp;
            let pick = |i: usize| -> Vec<f64> {
                s.samples
                    .iter()
                    .filter(|(w, _)| *w == way)
                    .map(|(_, pair)| pair[i])
                    .collect()
            };
            report.add(Figure {
                group: GROUP.into(),
                name: format!("{}: {}", s.name, label(way, Some(role))),
                unit: "Gbit/s".into(),
                samples: pick(0),
                baseline: Some((format!("no agent: {}", label(way, None)), pick(1))),
                reference: None,
                // The forced-XDP figures show why the default is TC on a
                // veth; they have no goal.
                goal: (!forced).then_some(Goal::RatioAtLeast(0.95)),
                note: if forced {
                    "native XDP on the host end turns off TSO/GSO on the veth's peer (why --receive-hook auto uses TC ingress on veth and tap)".into()
                } else {
                    String::new()
                },
            });
        }
    }
    let teardown = Instant::now();
    for s in &mut setups {
        drop(s.dp.take());
    }
    drop(setups);
    eprintln!("bench: cost: torn down in {:.1?}", teardown.elapsed());
}
