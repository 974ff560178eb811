//! Programs for the benchmarks (`cargo xtask bench`), not for production:
//! the baselines mmesh is measured against, and the traffic generator.
//!
//! The baselines parse with the datapath's own parser, so that "parse plus
//! one lookup" costs what those steps cost inside mmesh.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    macros::{map, xdp},
    maps::{HashMap, LpmTrie, PerCpuArray, ProgramArray, lpm_trie::Key},
    programs::XdpContext,
};
use mmesh_ebpf::parse::{Addrs, Cursor, L3, Packet, parse};

/// Exact-match baseline: IPv4 source address -> anything.
#[map]
static BENCH_HASH: HashMap<[u8; 4], u32> = HashMap::with_max_entries(1 << 17, 0);

/// LPM baseline: the same prefixes the mmesh global list holds.
#[map]
static BENCH_LPM: LpmTrie<[u8; 4], u32> = LpmTrie::with_max_entries(1 << 21, 0);

/// Where `bench_randomize` continues: slot 0 holds the program under test.
#[map]
static BENCH_TARGET: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// Per-CPU state: [0] the xorshift state of `bench_randomize`, [1] packets
/// seen by `bench_count`.
#[map]
static BENCH_STATE: PerCpuArray<u64> = PerCpuArray::with_max_entries(2, 0);

const IPV4_SRC_OFFSET: usize = 14 + 12;

#[inline(always)]
fn parsed_v4_source(ctx: &XdpContext) -> Option<[u8; 4]> {
    let mut pkt = Packet::new();
    match parse(&Cursor::new(ctx.data(), ctx.data_end()), &mut pkt) {
        Ok(L3::Ip) => match pkt.addrs {
            Some(Addrs::V4 { src, .. }) => Some(src),
            _ => None,
        },
        _ => None,
    }
}

/// The floor: a program that only drops.
#[xdp]
pub fn bench_drop(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_DROP
}

/// Parse, then one hash lookup of the source address.
#[xdp]
#[expect(
    clippy::needless_pass_by_value,
    reason = "aya's macro fixes the entry point's signature"
)]
pub fn bench_hash(ctx: XdpContext) -> u32 {
    if let Some(src) = parsed_v4_source(&ctx) {
        // SAFETY: the value is a plain u32.
        if unsafe { BENCH_HASH.get(src) }.is_some() {
            return xdp_action::XDP_DROP;
        }
    }
    xdp_action::XDP_DROP
}

/// Parse, then one LPM lookup of the source address.
#[xdp]
#[expect(
    clippy::needless_pass_by_value,
    reason = "aya's macro fixes the entry point's signature"
)]
pub fn bench_lpm(ctx: XdpContext) -> u32 {
    if let Some(src) = parsed_v4_source(&ctx)
        && BENCH_LPM.get(Key::new(32, src)).is_some()
    {
        return xdp_action::XDP_DROP;
    }
    xdp_action::XDP_DROP
}

/// Gives every packet a new IPv4 source address (xorshift64, per CPU), then
/// tail-calls the program under test. Measured against itself tail-calling
/// `bench_drop`, this is the cost of a flood from random sources.
#[xdp]
#[expect(
    clippy::needless_pass_by_value,
    reason = "aya's macro fixes the entry point's signature"
)]
pub fn bench_randomize(ctx: XdpContext) -> u32 {
    let (data, end) = (ctx.data(), ctx.data_end());
    if data + IPV4_SRC_OFFSET + 4 > end {
        return xdp_action::XDP_ABORTED;
    }
    let Some(state) = BENCH_STATE.get_ptr_mut(0) else {
        return xdp_action::XDP_ABORTED;
    };
    // SAFETY: this CPU's slot of a per-CPU array; the write stays inside the
    // packet (checked above).
    unsafe {
        let mut x = *state | 1;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *state = x;
        core::ptr::write_unaligned((data + IPV4_SRC_OFFSET) as *mut u32, x as u32);
        BENCH_TARGET.tail_call(&ctx, 0);
    }
    // Only reached when the tail call fails.
    xdp_action::XDP_ABORTED
}

/// Sends every frame back out of its interface: the traffic generator for
/// `BPF_PROG_TEST_RUN` with live frames.
#[xdp]
pub fn bench_tx(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_TX
}

/// Counts and drops: the bare receiver of the end-to-end benchmark.
#[xdp]
pub fn bench_count(_ctx: XdpContext) -> u32 {
    if let Some(count) = BENCH_STATE.get_ptr_mut(1) {
        // SAFETY: this CPU's slot of a per-CPU array.
        unsafe { *count += 1 };
    }
    xdp_action::XDP_DROP
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Unreachable in a verified program.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
