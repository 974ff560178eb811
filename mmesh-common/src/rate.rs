//! Rate-limit arithmetic: a token bucket in its GCRA form.
//!
//! A token bucket of `burst` units refilled at `rate` units per second is
//! equivalent to the generic cell rate algorithm (virtual scheduling): keep one
//! number, the *theoretical arrival time* `tat`, the instant at which the
//! bucket would be full again. A packet costing `cost` nanoseconds of bucket
//! time conforms if, after paying, the bucket is not overdrawn by more than the
//! burst: `max(tat, now) + cost - now <= tolerance` with
//! `tolerance = burst * interval`. The new `tat` is `max(tat, now) + cost`.
//!
//! One `u64` per bucket is what makes the kernel side simple and exact: the
//! state can be shared by all CPUs and updated with a single compare-and-swap,
//! and a non-conforming packet only reads it (a flood being dropped does not
//! bounce the cache line between CPUs).
//!
//! Bucket time is kept in sixteenths of a nanosecond ([`TIME_SHIFT`]), not
//! in nanoseconds: at 2 Mpps a packet costs 500 ns, and rounding its cost to
//! whole nanoseconds would shift the rate by up to 0.2%; in sixteenths the
//! error stays under 0.0125%. Costs are rounded up, so the error only ever
//! makes the limit stricter. A `u64` of sixteenths lasts 36 years of uptime.
//!
//! One deliberate deviation: a packet arriving at a full bucket always
//! conforms, even if it costs more than the whole burst (a 64 KiB GSO packet
//! under a small bit-rate burst). It overdraws the bucket, and the packets
//! after it pay the debt, so the long-run rate is unchanged, but a too-small
//! burst can never starve a flow completely.

/// Fixed-point shift of [`crate::maps::RateLimit::interval_fp`] (nanoseconds
/// per unit, 32.32).
pub const FP_SHIFT: u32 = 32;

/// Bucket time (`tat`, costs, tolerances) is in units of `2^-TIME_SHIFT` ns.
pub const TIME_SHIFT: u32 = 4;

/// Units of one packet considered at most (bytes for bit rates): bounds the
/// multiplication in [`cost`] so it cannot overflow.
pub const MAX_UNITS: u64 = 1 << 20;

/// Bucket time from a monotonic clock reading in nanoseconds.
#[inline(always)]
#[must_use]
pub const fn bucket_time(now_ns: u64) -> u64 {
    now_ns << TIME_SHIFT
}

/// Bucket time that `units` cost at `interval_fp` (32.32 nanoseconds per
/// unit). Never overflows for `interval_fp < 2^38 << 32`, i.e. any rate of at
/// least 8 bits/s.
#[inline(always)]
#[must_use]
pub const fn cost(units: u64, interval_fp: u64) -> u64 {
    let units = if units > MAX_UNITS { MAX_UNITS } else { units };
    let whole = interval_fp >> FP_SHIFT;
    let frac = interval_fp & ((1 << FP_SHIFT) - 1);
    // Rounded up: a bucket may admit a hair less than its rate, never more.
    let shift = FP_SHIFT - TIME_SHIFT;
    ((units * whole) << TIME_SHIFT) + ((units * frac + (1 << shift) - 1) >> shift)
}

/// Decides one packet: `Some(new_tat)` if it conforms, `None` if it is over
/// the rate (the state must then be left as it is). All arguments are bucket
/// time.
#[inline(always)]
#[must_use]
pub const fn admit(tat: u64, now: u64, cost: u64, tolerance: u64) -> Option<u64> {
    if tat <= now {
        // Full bucket: always conforms (see the module docs).
        return Some(now.saturating_add(cost));
    }
    let next = tat.saturating_add(cost);
    if next - now <= tolerance {
        Some(next)
    } else {
        None
    }
}

#[cfg(not(target_arch = "bpf"))]
mod build {
    use crate::maps::RateLimit;

    const NS_PER_SEC: u128 = 1_000_000_000;
    /// Largest tolerance stored, in bucket time: about two years, far beyond
    /// any burst that validation accepts (an hour of the rate).
    const MAX_TOLERANCE: u128 = 1 << 60;

    impl RateLimit {
        /// A packets-per-second limit. `pps` must be at least 1.
        #[must_use]
        pub fn packets(pps: u64, burst_packets: u64, action: u32) -> Self {
            Self::from_ns_per_unit(NS_PER_SEC, pps, burst_packets, action)
        }

        /// A bits-per-second limit, charged per byte. `bps` must be at least 8.
        #[must_use]
        pub fn bits(bps: u64, burst_bits: u64, action: u32) -> Self {
            // A byte costs 8 bits of a rate measured in bits: 8e9 / bps ns.
            // The burst in bytes is burst_bits / 8, so the tolerance is
            // burst_bits / 8 * 8e9 / bps = burst_bits * 1e9 / bps ns.
            let mut limit = Self::from_ns_per_unit(8 * NS_PER_SEC, bps, 0, action);
            limit.tolerance = tolerance(u128::from(burst_bits), u128::from(bps));
            limit
        }

        fn from_ns_per_unit(numerator: u128, rate: u64, burst: u64, action: u32) -> Self {
            let rate = u128::from(rate.max(1));
            let interval_fp = (numerator << super::FP_SHIFT) / rate;
            Self {
                interval_fp: u64::try_from(interval_fp).unwrap_or(u64::MAX >> 2),
                tolerance: tolerance(u128::from(burst), rate),
                action,
                _pad: 0,
            }
        }
    }

    /// `burst` units of a `rate` per second, in bucket time.
    fn tolerance(burst: u128, rate: u128) -> u64 {
        let t = ((burst * NS_PER_SEC) << super::TIME_SHIFT) / rate.max(1);
        t.min(MAX_TOLERANCE) as u64
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::maps::RateLimit;

    /// Offers `count` packets of `units` each, evenly spaced by `gap_ns`,
    /// and returns how many conform.
    fn run(limit: &RateLimit, units: u64, gap_ns: u64, count: u64) -> u64 {
        let mut tat = 0;
        let mut admitted = 0;
        let start = 1_000_000_000;
        for i in 0..count {
            let now = bucket_time(start + i * gap_ns);
            if let Some(next) = admit(tat, now, cost(units, limit.interval_fp), limit.tolerance) {
                tat = next;
                admitted += 1;
            }
        }
        admitted
    }

    #[test]
    fn full_bucket_admits_the_burst_back_to_back() {
        let limit = RateLimit::packets(1000, 50, 1);
        // All packets at the same instant: exactly the burst conforms.
        assert_eq!(run(&limit, 1, 0, 500), 50);
    }

    #[test]
    fn oversized_packet_on_a_full_bucket_passes_then_pays() {
        let limit = RateLimit::bits(8_000, 8_000, 1); // 1000 B/s, 1000 B burst
        let big = cost(10_000, limit.interval_fp);
        let tat = admit(0, bucket_time(1_000), big, limit.tolerance).expect("full bucket admits");
        // Ten seconds of debt: a 100-byte packet one second later is refused,
        // eleven seconds later it passes.
        let small = cost(100, limit.interval_fp);
        assert_eq!(
            admit(tat, bucket_time(1_000_001_000), small, limit.tolerance),
            None
        );
        assert!(admit(tat, bucket_time(11_000_001_000), small, limit.tolerance).is_some());
    }

    #[test]
    fn costs_are_exact_to_a_sixteenth_of_a_nanosecond() {
        let limit = RateLimit::packets(1_000_000, 1, 1);
        assert_eq!(cost(1, limit.interval_fp), bucket_time(1000));
        let bits = RateLimit::bits(8_000_000, 8, 1); // 1 MB/s: 1000 ns per byte
        assert_eq!(cost(1500, bits.interval_fp), bucket_time(1_500_000));
        // 3 Mpps: 333.33 ns per packet; three packets cost 1000 ns, rounded
        // up to the next sixteenth.
        let fast = RateLimit::packets(3_000_000, 1, 1);
        assert_eq!(cost(3, fast.interval_fp), bucket_time(1000));
        assert_eq!(
            cost(1, fast.interval_fp),
            5334,
            "333.375 ns: 333.33 rounded up"
        );
    }

    proptest! {
        /// Offered load at any multiple of the rate: admitted = rate * T + burst,
        /// within one packet and the rounding of bucket time.
        #[test]
        fn admitted_rate_matches_configured(
            pps in 1u64..2_000_000,
            burst in 1u64..10_000,
            overload in 1u64..20,
            seconds in 1u64..4,
        ) {
            let limit = RateLimit::packets(pps, burst, 1);
            let offered_pps = pps * overload + 1;
            let gap = 1_000_000_000 / offered_pps;
            prop_assume!(gap > 0);
            let count = (seconds * 1_000_000_000 / gap).min(2_000_000);
            let got = run(&limit, 1, gap, count);
            let duration_s = (count - 1) as f64 * gap as f64 / 1e9;
            let expected = (pps as f64 * duration_s + burst as f64).min(count as f64);
            // Never more than configured (costs round up); less by at most
            // the rounding, a sixteenth of a nanosecond per packet.
            let rounding = got as f64 / 16.0 / (1e9 / pps as f64);
            prop_assert!(
                got as f64 <= expected + 1.0 && got as f64 >= expected - 1.0 - rounding,
                "pps {pps} burst {burst} offered {offered_pps}: got {got}, expected {expected}"
            );
        }

        /// Traffic under the rate is never refused.
        #[test]
        fn under_the_rate_everything_passes(pps in 1u64..1_000_000, burst in 1u64..100, n in 1u64..5000) {
            let limit = RateLimit::packets(pps, burst, 1);
            let gap = 1_000_000_000 / pps + 1;
            prop_assert_eq!(run(&limit, 1, gap, n), n);
        }

        /// Bit rates: bytes admitted per second match bps / 8.
        #[test]
        fn bit_rate_matches_configured(
            bps in 8_000u64..10_000_000_000,
            size in 64u64..1500,
            seconds in 1u64..3,
        ) {
            // A burst of ten full-size frames. (A burst barely above the
            // packet size wastes tokens between arrivals, as any token
            // bucket does: the bucket is full before the next packet comes.)
            let burst_bytes = 10 * 1500;
            let limit = RateLimit::bits(bps, burst_bytes * 8, 1);
            // Offer three times the rate.
            let offered_pps = (3 * bps / 8 / size).max(1);
            let gap = (1_000_000_000 / offered_pps).max(1);
            let count = (seconds * 1_000_000_000 / gap).min(2_000_000);
            let got_bytes = run(&limit, size, gap, count) * size;
            let duration_s = (count - 1) as f64 * gap as f64 / 1e9;
            let expected = bps as f64 / 8.0 * duration_s + burst_bytes as f64;
            let ns_per_byte = 8e9 / bps as f64;
            let rounding = (got_bytes / size) as f64 / 16.0 / ns_per_byte;
            prop_assert!(
                got_bytes as f64 <= expected + size as f64
                    && got_bytes as f64 >= expected - 2.0 * size as f64 - rounding,
                "bps {bps} size {size}: got {got_bytes} bytes, expected {expected}"
            );
        }

        /// The cost never overflows and grows with the units.
        #[test]
        fn cost_is_monotonic_and_bounded(units in 0u64..(1 << 24), interval in 0u64..(1 << 62)) {
            let c = cost(units, interval);
            prop_assert!(c <= cost(units.saturating_add(1), interval));
            prop_assert!(c <= cost(MAX_UNITS, interval));
        }

        /// A refused packet leaves the bucket untouched, an admitted one moves
        /// the tat forward by exactly its cost from max(tat, now).
        #[test]
        fn admit_is_pure(tat in 0u64..(1 << 62), now in 0u64..(1 << 62), cost in 0u64..(1 << 40), tol in 0u64..(1 << 40)) {
            match admit(tat, now, cost, tol) {
                Some(next) => prop_assert_eq!(next, tat.max(now) + cost),
                None => prop_assert!(tat > now && tat + cost - now > tol),
            }
        }
    }
}
