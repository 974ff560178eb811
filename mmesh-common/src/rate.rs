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
//! One deliberate deviation: a packet arriving at a full bucket always
//! conforms, even if it costs more than the whole burst (a 64 KiB GSO packet
//! under a small bit-rate burst). It overdraws the bucket, and the packets
//! after it pay the debt, so the long-run rate is unchanged, but a too-small
//! burst can never starve a flow completely.

/// Fixed-point shift of [`crate::maps::RateLimit::interval_fp`].
pub const FP_SHIFT: u32 = 32;

/// Units of one packet considered at most (bytes for bit rates): bounds the
/// multiplication in [`cost_ns`] so it cannot overflow.
pub const MAX_UNITS: u64 = 1 << 20;

/// Nanoseconds of bucket time that `units` cost at `interval_fp` (32.32
/// nanoseconds per unit). Never overflows for `interval_fp < 2^62`.
#[inline(always)]
#[must_use]
pub const fn cost_ns(units: u64, interval_fp: u64) -> u64 {
    let units = if units > MAX_UNITS { MAX_UNITS } else { units };
    let whole = interval_fp >> FP_SHIFT;
    let frac = interval_fp & ((1 << FP_SHIFT) - 1);
    units * whole + ((units * frac) >> FP_SHIFT)
}

/// Decides one packet: `Some(new_tat)` if it conforms, `None` if it is over
/// the rate (the state must then be left as it is).
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
    /// Largest tolerance stored: about 146 years, far beyond any burst that
    /// validation accepts, and small enough that `tat + tolerance` never wraps.
    const MAX_TOLERANCE_NS: u128 = 1 << 62;

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
            // The burst in bytes is burst_bits / 8, so tolerance =
            // burst_bits / 8 * 8e9 / bps = burst_bits * 1e9 / bps.
            let mut limit = Self::from_ns_per_unit(8 * NS_PER_SEC, bps, 0, action);
            limit.tolerance_ns = tolerance(u128::from(burst_bits), u128::from(bps));
            limit
        }

        fn from_ns_per_unit(numerator: u128, rate: u64, burst: u64, action: u32) -> Self {
            let rate = u128::from(rate.max(1));
            let interval_fp = (numerator << super::FP_SHIFT) / rate;
            Self {
                interval_fp: u64::try_from(interval_fp).unwrap_or(u64::MAX >> 2),
                tolerance_ns: tolerance(u128::from(burst), rate),
                action,
                _pad: 0,
            }
        }
    }

    fn tolerance(burst: u128, rate: u128) -> u64 {
        let ns = burst * NS_PER_SEC / rate.max(1);
        ns.min(MAX_TOLERANCE_NS) as u64
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
            let now = start + i * gap_ns;
            if let Some(next) = admit(
                tat,
                now,
                cost_ns(units, limit.interval_fp),
                limit.tolerance_ns,
            ) {
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
        let cost = cost_ns(10_000, limit.interval_fp);
        let tat = admit(0, 1_000, cost, limit.tolerance_ns).expect("full bucket admits");
        // Ten seconds of debt: a 100-byte packet one second later is refused.
        assert_eq!(
            admit(
                tat,
                1_000_000_001_000,
                cost_ns(100, limit.interval_fp),
                limit.tolerance_ns
            ),
            None
        );
    }

    #[test]
    fn cost_is_exact_for_whole_intervals() {
        let limit = RateLimit::packets(1_000_000, 1, 1);
        assert_eq!(cost_ns(1, limit.interval_fp), 1000);
        let bits = RateLimit::bits(8_000_000, 8, 1); // 1 MB/s: 1000 ns per byte
        assert_eq!(cost_ns(1500, bits.interval_fp), 1_500_000);
    }

    proptest! {
        /// Offered load at any multiple of the rate: admitted = rate * T + burst,
        /// within one packet and the rounding of the fixed-point interval.
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
            let count = seconds * 1_000_000_000 / gap;
            prop_assume!(count < 3_000_000);
            let got = run(&limit, 1, gap, count);
            let duration_s = (count - 1) as f64 * gap as f64 / 1e9;
            let expected = (pps as f64 * duration_s + burst as f64).min(count as f64);
            prop_assert!(
                (got as f64 - expected).abs() <= 2.0 + expected * 1e-6,
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
            let burst_bits = 1500 * 8;
            let limit = RateLimit::bits(bps, burst_bits, 1);
            // Offer three times the rate.
            let offered_pps = (3 * bps / 8 / size).max(1);
            let gap = (1_000_000_000 / offered_pps).max(1);
            let count = seconds * 1_000_000_000 / gap;
            prop_assume!(count < 3_000_000);
            let got_bytes = run(&limit, size, gap, count) * size;
            let duration_s = (count - 1) as f64 * gap as f64 / 1e9;
            let expected = bps as f64 / 8.0 * duration_s + 1500.0;
            prop_assert!(
                (got_bytes as f64 - expected).abs() <= 2.0 * size as f64 + expected * 1e-6,
                "bps {bps} size {size}: got {got_bytes} bytes, expected {expected}"
            );
        }

        /// The cost never overflows and grows with the units.
        #[test]
        fn cost_is_monotonic_and_bounded(units in 0u64..(1 << 24), interval in 0u64..(1 << 62)) {
            let c = cost_ns(units, interval);
            prop_assert!(c <= cost_ns(units.saturating_add(1), interval));
            prop_assert!(c <= cost_ns(MAX_UNITS, interval));
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
