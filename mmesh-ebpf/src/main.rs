//! The mmesh datapath: an XDP and a TC program per direction. The direction
//! is the entry point's, not the hook's: `tc_inbound` serves an uplink's TC
//! receive and a workload's transmit alike (docs/design.md, attach points).
//! Each entry point is a thin wrapper around [`try_process`].
//!
//! Per packet: parse, attribute to an account by the local address, then the
//! checks cheapest first, the first decisive verdict winning:
//!
//! 1. the global block/allow lists (remote address),
//! 2. the account's block/allow lists,
//! 3. the account's rate limits for the direction.
//!
//! A rule in monitor mode records its reason but lets the packet go on.
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![expect(internal_features, reason = "atomic intrinsics, see atomic.rs")]

mod atomic;
mod attribute;
mod flow;
mod lists;
mod maps;
mod ratelimit;
mod report;

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC, xdp_action},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use mmesh_common::{
    Direction, Reason, Verdict,
    maps::{
        ACCOUNT_ACTIVE, ACCOUNT_RULES_V4, ACCOUNT_RULES_V6, FlowEntry, GEN_RULES_V4, GEN_RULES_V6,
        GenConfig, NO_ACCOUNT, RuleValue, STAT_PULL_FAILED, account_index,
    },
};
use mmesh_ebpf::parse::{Addrs, Cursor, L3, Packet, ParseError, parse};

use crate::{
    flow::{Ends, Lookup},
    maps::{ACCOUNTS, CONFIG},
};

/// On TC, make sure this many bytes of headers are in the linear part of the
/// skb before parsing (covers Ethernet, two VLAN tags, IPv4 with the
/// longest options or IPv6 with common extension headers, and TCP).
const TC_PULL_LEN: u32 = 256;

#[xdp]
#[expect(
    clippy::needless_pass_by_value,
    reason = "aya's macro fixes the entry point's signature"
)]
pub fn xdp_inbound(ctx: XdpContext) -> u32 {
    xdp_verdict(&ctx, Direction::Inbound)
}

#[xdp]
#[expect(
    clippy::needless_pass_by_value,
    reason = "aya's macro fixes the entry point's signature"
)]
pub fn xdp_outbound(ctx: XdpContext) -> u32 {
    xdp_verdict(&ctx, Direction::Outbound)
}

#[classifier]
#[expect(
    clippy::needless_pass_by_value,
    reason = "aya's macro fixes the entry point's signature"
)]
pub fn tc_inbound(ctx: TcContext) -> i32 {
    tc_verdict(&ctx, Direction::Inbound)
}

#[classifier]
#[expect(
    clippy::needless_pass_by_value,
    reason = "aya's macro fixes the entry point's signature"
)]
pub fn tc_outbound(ctx: TcContext) -> i32 {
    tc_verdict(&ctx, Direction::Outbound)
}

/// What the programs know of the frame beyond its bytes.
pub struct Frame {
    data: usize,
    data_end: usize,
    /// Bytes of the frame (of the whole skb on TC, headers counted once).
    len: u32,
    /// Wire packets this frame stands for: the GSO segments of a TC skb
    /// (a large send on transmit, a GRO aggregate on receive), else 1.
    segs: u32,
    ifindex: u32,
}

impl Frame {
    /// Bytes on the wire: a GSO skb leaves (or arrived) as `segs` packets,
    /// each carrying the `headers` of `pkt` (Ethernet through TCP options or
    /// the UDP header) in front of its share of the payload. Rate limits,
    /// counters and events all charge this, so that they agree with what
    /// an interface counter or a tap on the wire sees.
    #[inline(always)]
    fn wire_bytes(&self, pkt: &Packet) -> u32 {
        // No overflow: segs <= 65535 (gso_segs is a u16), headers < 4200
        // (the parser's offset bound plus a TCP header) and len < 4 GiB by
        // far (512 KiB with BIG TCP).
        self.len + (self.segs - 1) * u32::from(pkt.headers)
    }
}

#[inline(always)]
fn xdp_verdict(ctx: &XdpContext, direction: Direction) -> u32 {
    let frame = Frame {
        data: ctx.data(),
        data_end: ctx.data_end(),
        len: (ctx.data_end() - ctx.data()) as u32,
        segs: 1,
        ifindex: ctx.ingress_ifindex() as u32,
    };
    // Fail open: the only error is a missing CONFIG entry, which means no
    // policy was ever written; an enforcement point without a policy passes.
    match try_process(&frame, direction).unwrap_or(Verdict::Pass) {
        Verdict::Drop => xdp_action::XDP_DROP,
        Verdict::Pass | Verdict::Monitor => xdp_action::XDP_PASS,
    }
}

#[inline(always)]
fn tc_verdict(ctx: &TcContext, direction: Direction) -> i32 {
    let len = ctx.len();
    let linear = (ctx.data_end() - ctx.data()) as u32;
    if linear < len && linear < TC_PULL_LEN {
        // Headers outside the linear area are rare (the stack builds them in
        // it). If the pull fails, the parser finds the headers missing and
        // counts the packet as truncated; the failure itself is counted too.
        if ctx.pull_data(len.min(TC_PULL_LEN)).is_err() {
            report::bump_stat(STAT_PULL_FAILED);
        }
    }
    // SAFETY: `skb` is the context pointer the kernel passed in.
    let (segs, ifindex) = unsafe { ((*ctx.skb.skb).gso_segs, (*ctx.skb.skb).ifindex) };
    let frame = Frame {
        data: ctx.data(),
        data_end: ctx.data_end(),
        len,
        // The kernel keeps gso_segs in a u16, but `__sk_buff` hands it over
        // as a u32 the verifier knows nothing about: the mask tells it the
        // bound, and cuts the instructions it walks on 6.18 from ~145k to
        // ~43k (the arithmetic of `wire_bytes` no longer forks its states).
        segs: (segs & 0xffff).max(1),
        ifindex,
    };
    // Fail open, as in `xdp_verdict`. Passing is TC_ACT_UNSPEC so that
    // programs after this one (TCX chain, other clsact filters) still run.
    match try_process(&frame, direction).unwrap_or(Verdict::Pass) {
        Verdict::Drop => TC_ACT_SHOT,
        Verdict::Pass | Verdict::Monitor => TC_ACT_UNSPEC,
    }
}

/// The map that should always have an entry had none.
pub struct MissingConfig;

/// The decision for one packet. Reason and verdict are the codes of
/// [`Reason`] and [`Verdict`], as stored in the flow cache and the counters.
#[derive(Clone, Copy)]
pub struct Decision {
    reason: u8,
    verdict: u8,
    slot: u32,
    list: u32,
}

impl Decision {
    #[inline(always)]
    const fn new(reason: Reason, verdict: Verdict, slot: u32) -> Self {
        Self {
            reason: reason as u8,
            verdict: verdict as u8,
            slot,
            list: 0,
        }
    }

    #[inline(always)]
    fn is(&self, verdict: Verdict) -> bool {
        self.verdict == verdict as u8
    }

    /// Applies a matched rule; true if the decision is final (a drop).
    #[inline(always)]
    fn apply(&mut self, reason: Reason, action: u32, list: u32) -> bool {
        if action == Verdict::Drop as u32 {
            self.reason = reason as u8;
            self.verdict = Verdict::Drop as u8;
            self.list = list;
            return true;
        }
        // The first monitored match is the one reported.
        if action == Verdict::Monitor as u32 && self.is(Verdict::Pass) {
            self.reason = reason as u8;
            self.verdict = Verdict::Monitor as u8;
            self.list = list;
        }
        false
    }

    #[inline(always)]
    fn apply_list(&mut self, reason: Reason, hit: Option<RuleValue>) -> bool {
        match hit {
            Some(rule) => self.apply(reason, rule.action, rule.list),
            None => false,
        }
    }
}

#[inline(always)]
fn try_process(frame: &Frame, direction: Direction) -> Result<Verdict, MissingConfig> {
    let config = CONFIG.get(0).ok_or(MissingConfig)?;
    let half = config.active & 1;
    let gen_config = &config.halves[half as usize];
    let mut pkt = Packet::new();
    let (decision, flow) = decide(
        frame,
        direction,
        half,
        config.flow_mask,
        gen_config,
        &mut pkt,
    );
    report::record(frame, direction as u8, gen_config, &pkt, &decision, flow);
    Ok(if decision.is(Verdict::Drop) {
        Verdict::Drop
    } else {
        Verdict::Pass
    })
}

#[inline(always)]
fn decide(
    frame: &Frame,
    direction: Direction,
    half: u32,
    flow_mask: u32,
    config: &GenConfig,
    pkt: &mut Packet,
) -> (Decision, Option<*mut FlowEntry>) {
    let cursor = Cursor::new(frame.data, frame.data_end);
    match parse(&cursor, pkt) {
        Ok(L3::NonIp) => (
            Decision::new(Reason::NonIp, Verdict::Pass, NO_ACCOUNT),
            None,
        ),
        Ok(L3::Ip) => match pkt.addrs {
            Some(addrs) => check(
                frame,
                frame.wire_bytes(pkt),
                direction,
                half,
                flow_mask,
                config,
                ends(addrs, direction),
            ),
            None => (Decision::new(Reason::Pass, Verdict::Pass, NO_ACCOUNT), None),
        },
        Err(err) => {
            let reason = match err {
                ParseError::Truncated => Reason::Truncated,
                ParseError::Malformed => Reason::Malformed,
            };
            // Before any policy is written `malformed` is 0: monitor, not drop.
            let verdict = if config.malformed == Verdict::Drop as u32 {
                Verdict::Drop
            } else {
                Verdict::Monitor
            };
            let Some(addrs) = pkt.addrs else {
                return (Decision::new(reason, verdict, NO_ACCOUNT), None);
            };
            // Fail closed: a packet whose addresses were read meets the lists
            // and the rate limits like any other. Otherwise a sender on a
            // block list could pass by breaking its own headers (nine IPv6
            // extension headers, an IHL below 5) wherever `malformed` is
            // `monitor`. Only when nothing drops it does the parse error
            // decide, attributed to the account (garbage from an account is
            // that account's garbage).
            let (checked, flow) = check(
                frame,
                frame.wire_bytes(pkt),
                direction,
                half,
                flow_mask,
                config,
                ends(addrs, direction),
            );
            if checked.is(Verdict::Drop) {
                return (checked, flow);
            }
            (Decision::new(reason, verdict, checked.slot), flow)
        }
    }
}

/// The local and remote end of a packet: the destination is local inbound,
/// the source outbound.
#[inline(always)]
fn ends(addrs: Addrs, direction: Direction) -> Ends {
    match (addrs, direction) {
        (Addrs::V4 { src, dst }, Direction::Inbound) => Ends::V4 {
            local: dst,
            remote: src,
        },
        (Addrs::V4 { src, dst }, Direction::Outbound) => Ends::V4 {
            local: src,
            remote: dst,
        },
        (Addrs::V6 { src, dst }, Direction::Inbound) => Ends::V6 {
            local: dst,
            remote: src,
        },
        (Addrs::V6 { src, dst }, Direction::Outbound) => Ends::V6 {
            local: src,
            remote: dst,
        },
    }
}

#[inline(always)]
fn local_account(half: u32, flags: u32, ends: Ends) -> u32 {
    match ends {
        Ends::V4 { local, .. } => attribute::account_v4(half, flags, local),
        Ends::V6 { local, .. } => attribute::account_v6(half, flags, local),
    }
}

/// Attribution and lists: everything that depends only on the addresses.
#[inline(always)]
fn address_checks(half: u32, config: &GenConfig, ends: Ends) -> Decision {
    let slot = local_account(half, config.flags, ends);
    let mut decision = Decision::new(Reason::Pass, Verdict::Pass, slot);

    // 1. Global lists.
    let global = match ends {
        Ends::V4 { remote, .. } if config.flags & GEN_RULES_V4 != 0 => {
            lists::global_v4(half, remote)
        }
        Ends::V6 { remote, .. } if config.flags & GEN_RULES_V6 != 0 => {
            lists::global_v6(half, remote)
        }
        _ => None,
    };
    if decision.apply_list(Reason::GlobalBlock, global) || slot == NO_ACCOUNT {
        return decision;
    }

    // 2. The account's lists.
    let Some(account) = ACCOUNTS.get(account_index(slot, half)) else {
        return decision;
    };
    let own = match ends {
        Ends::V4 { remote, .. } if account.flags & ACCOUNT_RULES_V4 != 0 => {
            lists::account_v4(half, slot, remote)
        }
        Ends::V6 { remote, .. } if account.flags & ACCOUNT_RULES_V6 != 0 => {
            lists::account_v6(half, slot, remote)
        }
        _ => None,
    };
    decision.apply_list(Reason::AccountBlock, own);
    decision
}

/// `bytes`: the frame's [`Frame::wire_bytes`].
#[inline(always)]
fn check(
    frame: &Frame,
    bytes: u32,
    direction: Direction,
    half: u32,
    flow_mask: u32,
    config: &GenConfig,
    ends: Ends,
) -> (Decision, Option<*mut FlowEntry>) {
    let (mut decision, flow) =
        match flow::lookup(flow_mask, config.generation, half, direction as u8, ends) {
            Lookup::Hit(cached, entry) => (cached, Some(entry)),
            Lookup::Miss(entry) => {
                let decided = address_checks(half, config, ends);
                if let Some(entry) = entry {
                    flow::remember(entry, config.generation, direction as u8, ends, &decided);
                }
                (decided, entry)
            }
        };
    if decision.is(Verdict::Drop) || decision.slot == NO_ACCOUNT {
        return (decision, flow);
    }
    // 3. Rate limits: per packet, never cached.
    let Some(account) = ACCOUNTS.get(account_index(decision.slot, half)) else {
        return (decision, flow);
    };
    if account.flags & ACCOUNT_ACTIVE == 0 {
        return (decision, flow);
    }
    let limits = &account.limits[direction as usize];
    if let Some(over) = ratelimit::check(decision.slot, direction as u8, limits, frame.segs, bytes)
    {
        decision.apply(over.reason, over.action, 0);
    }
    (decision, flow)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Unreachable in a verified program: the verifier rejects any path that
    // could get here ("last insn is not an exit or jmp").
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
