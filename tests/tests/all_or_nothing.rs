//! A policy change is all-or-nothing as packets see it (DESIGN.md,
//! invariant 1): while two policies are applied in turn through the agent's
//! apply path, packets run through the programs from other threads, and no
//! packet is judged by a mix of the two.
//!
//! What is observable: `BPF_PROG_TEST_RUN` runs one packet per call and
//! returns only its verdict, so a verdict alone cannot tell a packet judged
//! by a half-written policy from one judged just before or after a switch.
//! Every packet of this test makes an event, though, and the event carries
//! the generation the packet was judged under (`GenConfig::generation` of
//! the half it read). The two policies give every probe a different verdict
//! (A drops it, B only monitors it), and the generations alternate A, B, A,
//! …: each event's verdict must be the one its generation's policy gives.
//! A datapath that wrote the new entries over the ones in use and switched
//! the generation after (or before) them fails this at once: packets judged
//! while the entries change carry one generation and the other policy's
//! verdict. Probes cover the global lists and an account's own lists, IPv4
//! (through the stride) and IPv6, XDP and TC, and their source addresses
//! vary so that the flow cache answers few of them.
//!
//! Needs root. Bounded in applies and packets; nothing is timed.

use std::{
    collections::BTreeMap,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsFd as _, AsRawFd as _, OwnedFd},
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
};

use mmesh_agent::{
    compile::{Capacity, compile},
    datapath::Datapath,
    policy::Policy,
};
use mmesh_common::{Reason, Verdict, event::Event, maps::programs};
use mmesh_tests::packets::udp;

/// Prefixes per scope (global, the account's own) and family.
const PROBES: u8 = 8;
/// Host addresses used in each probe prefix: a new source address misses
/// the flow cache, which would answer a repeated flow from its copy.
const HOSTS: u8 = 64;
/// Policies applied in turn, after the first.
const APPLIES: u64 = 150;
/// Packets run after each apply before the next one (counted over both
/// runner threads): every generation is seen by packets, and the next
/// apply's writes happen while packets keep running.
const PACKETS_PER_GENERATION: u64 = 400;
/// A bound on the packets of each runner, should the writer stop early.
const MAX_PACKETS_PER_RUNNER: u64 = 2_000_000;

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_UNSPEC: u32 = u32::MAX;

const ALPHA4: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 10);
const ALPHA6: Ipv6Addr = Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 0x10);

/// The source address of probe `i` of a scope and family, host `h`:
/// `198.18.i.h` (global) or `198.19.i.h` (alpha's own list), and
/// `2001:db8:i::h` or `2001:db8:100+i::h`.
fn source(own: bool, v6: bool, i: u8, h: u8) -> IpAddr {
    let (i, h) = (u16::from(i), u16::from(h));
    match (own, v6) {
        (false, false) => IpAddr::V4(Ipv4Addr::new(198, 18, i as u8, h as u8)),
        (true, false) => IpAddr::V4(Ipv4Addr::new(198, 19, i as u8, h as u8)),
        (false, true) => IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, i, 0, 0, 0, 0, h)),
        (true, true) => IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0x100 + i, 0, 0, 0, 0, h)),
    }
}

/// Whether `src` is in alpha's own list (else in the global one).
fn is_own(src: IpAddr) -> bool {
    match src {
        IpAddr::V4(a) => a.octets()[1] == 19,
        IpAddr::V6(a) => a.segments()[2] >= 0x100,
    }
}

/// Every probe prefix of a scope, as a YAML flow list.
fn prefixes(own: bool) -> String {
    let mut out = Vec::new();
    for i in 0..PROBES {
        let IpAddr::V4(a) = source(own, false, i, 0) else {
            unreachable!()
        };
        out.push(format!("{a}/24"));
        out.push(format!("'{}/48'", source(own, true, i, 0)));
    }
    out.join(", ")
}

/// Every probe blocked with `action` (`drop`: policy A; `monitor`: B), by
/// the global list and by alpha's own. Every packet makes an event.
fn policy(action: &str) -> Policy {
    let text = format!(
        "
global:
  events_per_second: 1000000
  block:
    - {{ name: probes, action: {action}, cidrs: [{global}] }}
accounts:
  - id: alpha
    prefixes: [{ALPHA4}, '{ALPHA6}']
    block:
      - {{ name: own, action: {action}, cidrs: [{own}] }}
",
        global = prefixes(false),
        own = prefixes(true),
    );
    Policy::parse(&text, action, Path::new(".")).expect("the test policies are valid")
}

/// Applies `policy` as the agent does: compiled against the policy in
/// force, applied (the generation switch), the standby half brought up to
/// date.
fn apply(dp: &mut Datapath, policy: &Policy) -> u64 {
    let compiled = compile(policy, dp.active().map(AsRef::as_ref), dp.capacity())
        .expect("the test policies compile");
    let generation = dp.apply(Arc::new(compiled)).expect("applying a policy");
    dp.sync_standby().expect("writing the standby half");
    generation
}

/// `BPF_PROG_TEST_RUN` of the program `fd` on `frame`, once; returns the
/// program's return value. Through a descriptor of its own: aya's test runs
/// borrow the program from the datapath, which the writer holds meanwhile.
fn test_run(fd: &OwnedFd, frame: &[u8]) -> u32 {
    /// The `test` member of `union bpf_attr` (include/uapi/linux/bpf.h).
    #[repr(C)]
    #[derive(Default)]
    struct TestAttr {
        prog_fd: u32,
        retval: u32,
        data_size_in: u32,
        data_size_out: u32,
        data_in: u64,
        data_out: u64,
        repeat: u32,
        duration: u32,
        ctx_size_in: u32,
        ctx_size_out: u32,
        ctx_in: u64,
        ctx_out: u64,
        flags: u32,
        cpu: u32,
        batch_size: u32,
        pad: u32,
    }
    const BPF_PROG_TEST_RUN: libc::c_long = 10;
    let mut attr = TestAttr {
        prog_fd: fd.as_raw_fd() as u32,
        data_size_in: frame.len() as u32,
        data_in: frame.as_ptr() as u64,
        repeat: 1,
        ..TestAttr::default()
    };
    // SAFETY: `attr` is a valid `bpf_attr` prefix for this command, zeroed
    // past its fields; `data_in` points at `frame`, alive for the call; no
    // output buffer is given.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_TEST_RUN,
            &raw mut attr,
            size_of::<TestAttr>(),
        )
    };
    assert_eq!(rc, 0, "BPF_PROG_TEST_RUN: {}", io::Error::last_os_error());
    attr.retval
}

/// A program's descriptor, duplicated.
fn program_fd(dp: &mut Datapath, name: &str) -> OwnedFd {
    dp.program_mut(name)
        .expect("the program exists")
        .fd()
        .expect("the program is loaded")
        .as_fd()
        .try_clone_to_owned()
        .expect("duplicating the program's descriptor")
}

/// What the runner threads saw.
#[derive(Default)]
struct Seen {
    drops: u64,
    passes: u64,
}

/// Runs the probe frames in turn (backwards if `reverse`) through the
/// program `fd` until `done`, counting the packets run in `run`.
fn run_probes(
    fd: &OwnedFd,
    xdp: bool,
    frames: &[Vec<u8>],
    reverse: bool,
    run: &AtomicU64,
    done: &AtomicBool,
) -> Seen {
    let mut seen = Seen::default();
    let order: Vec<usize> = if reverse {
        (0..frames.len()).rev().collect()
    } else {
        (0..frames.len()).collect()
    };
    let mut count = 0;
    while count < MAX_PACKETS_PER_RUNNER {
        for &f in &order {
            if done.load(Ordering::Relaxed) {
                return seen;
            }
            match (xdp, test_run(fd, &frames[f])) {
                (true, XDP_DROP) | (false, TC_ACT_SHOT) => seen.drops += 1,
                (true, XDP_PASS) | (false, TC_ACT_UNSPEC) => seen.passes += 1,
                (_, ret) => panic!("unexpected return value {ret}"),
            }
            run.fetch_add(1, Ordering::Relaxed);
            count += 1;
        }
    }
    seen
}

/// Checks each event against the policy of its generation (`is_a`):
/// returns the events counted per generation, and the packets judged by a
/// mix.
fn check(events: &[Event], is_a: &BTreeMap<u64, bool>) -> (BTreeMap<u64, u64>, Vec<String>) {
    // Every event: the verdict its generation's policy gives, from the list
    // of the probe's scope.
    let mut per_generation: BTreeMap<u64, u64> = BTreeMap::new();
    let mut mixed = Vec::new();
    for e in events {
        let src = if e.family == 4 {
            IpAddr::V4(Ipv4Addr::new(e.src[0], e.src[1], e.src[2], e.src[3]))
        } else {
            IpAddr::V6(Ipv6Addr::from(e.src))
        };
        let reason = Reason::from_u8(e.reason);
        let verdict = Verdict::from_u8(e.verdict);
        let expected_reason = if is_own(src) {
            Reason::AccountBlock
        } else {
            Reason::GlobalBlock
        };
        assert_eq!(reason, Some(expected_reason), "event from {src}");
        let policy_a = *is_a
            .get(&e.generation)
            .unwrap_or_else(|| panic!("event of generation {} never applied", e.generation));
        let expected = if policy_a {
            Verdict::Drop
        } else {
            Verdict::Monitor
        };
        *per_generation.entry(e.generation).or_default() += 1;
        if verdict != Some(expected) {
            mixed.push(format!(
                "{src}: generation {} ({}) but verdict {verdict:?}",
                e.generation,
                if policy_a { "A" } else { "B" }
            ));
        }
    }
    (per_generation, mixed)
}

fn capacity() -> Capacity {
    Capacity {
        accounts: 16,
        account_prefixes: 64,
        list_prefixes: 1024,
        counters: 1024,
        // Room for the events of a few thousand packets between two reads.
        event_buffer: 1 << 20,
        stride_chunks: 64,
        flow_cache: 1024,
    }
}

/// Every probe frame, towards alpha, each probe prefix with every host.
fn frames() -> Vec<Vec<u8>> {
    let mut frames = Vec::new();
    for h in 1..=HOSTS {
        for i in 0..PROBES {
            for own in [false, true] {
                frames.push(udp(
                    source(own, false, i, h),
                    IpAddr::V4(ALPHA4),
                    1000,
                    2000,
                    8,
                ));
                frames.push(udp(
                    source(own, true, i, h),
                    IpAddr::V6(ALPHA6),
                    1000,
                    2000,
                    8,
                ));
            }
        }
    }
    frames
}

#[test]
fn packets_never_see_a_mix_of_two_policies_while_they_alternate() {
    let a = policy("drop");
    let b = policy("monitor");
    let mut dp = Datapath::load(capacity()).expect("loading the datapath (run as root)");
    let mut ring = dp.take_events().expect("the event ring buffer");
    // Generation → whether it is policy A.
    let mut is_a: BTreeMap<u64, bool> = BTreeMap::new();
    is_a.insert(apply(&mut dp, &a), true);

    let runners = [
        (program_fd(&mut dp, programs::XDP_INBOUND), true),
        (program_fd(&mut dp, programs::TC_INBOUND), false),
    ];
    let frames = frames();
    let run = AtomicU64::new(0);
    let done = AtomicBool::new(false);
    let mut events: Vec<Event> = Vec::new();
    let seen: Vec<Seen> = thread::scope(|scope| {
        let runs: Vec<_> = runners
            .iter()
            .enumerate()
            .map(|(n, (fd, xdp))| {
                let (frames, run, done) = (&frames, &run, &done);
                scope.spawn(move || run_probes(fd, *xdp, frames, n == 1, run, done))
            })
            .collect();
        // The event reader, on this thread between applies, and the writer.
        let mut drain = |events: &mut Vec<Event>| {
            while let Some(item) = ring.next() {
                assert!(item.len() >= size_of::<Event>(), "short event record");
                // SAFETY: Event is plain old data and the record is long enough.
                events.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<Event>()) });
            }
        };
        // Until the runners have run this many more packets (or stopped).
        let mut wait_for_packets =
            |events: &mut Vec<Event>, runs: &[thread::ScopedJoinHandle<'_, Seen>]| {
                let target = run.load(Ordering::Relaxed) + PACKETS_PER_GENERATION;
                while run.load(Ordering::Relaxed) < target
                    && !runs.iter().all(thread::ScopedJoinHandle::is_finished)
                {
                    drain(events);
                    thread::yield_now();
                }
            };
        for n in 0..APPLIES {
            wait_for_packets(&mut events, &runs);
            let next_is_a = n % 2 == 1;
            let generation = apply(&mut dp, if next_is_a { &a } else { &b });
            is_a.insert(generation, next_is_a);
        }
        wait_for_packets(&mut events, &runs);
        done.store(true, Ordering::Relaxed);
        let seen = runs
            .into_iter()
            .map(|r| r.join().expect("a runner"))
            .collect();
        drain(&mut events);
        seen
    });

    let (per_generation, mixed) = check(&events, &is_a);
    let ran: u64 = seen.iter().map(|s| s.drops + s.passes).sum();
    eprintln!(
        "{} applies, {ran} packets run ({} dropped, {} passed), {} events over {} generations; {} judged by a mix",
        APPLIES + 1,
        seen.iter().map(|s| s.drops).sum::<u64>(),
        seen.iter().map(|s| s.passes).sum::<u64>(),
        events.len(),
        per_generation.len(),
        mixed.len()
    );
    assert!(
        mixed.is_empty(),
        "{} of {} packets were judged by a mix of two policies, e.g.:\n{}",
        mixed.len(),
        events.len(),
        mixed
            .iter()
            .take(10)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    // The run meant something: both runners ran, under both policies, and
    // the events tie packets to most generations (a few of them may be
    // lost to a full ring, or fall between two applies).
    for (n, s) in seen.iter().enumerate() {
        assert!(
            s.drops > 0 && s.passes > 0,
            "runner {n}: {} drops, {} passes",
            s.drops,
            s.passes
        );
    }
    assert!(
        per_generation.len() as u64 > APPLIES / 2,
        "events from {} of {} generations",
        per_generation.len(),
        APPLIES + 1
    );
}
