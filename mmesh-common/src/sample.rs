//! Event sampling: at most `limit` events per (account, reason) per second.
//!
//! The state of one (account, reason) is a single `u64`: the second it counts
//! in the high half, the events emitted in that second in the low half. The
//! kernel updates it with compare-and-swap, so the limit holds across CPUs.

/// Decides whether one more event may be emitted at `now_ns`: `Some(new
/// state)` if yes.
#[inline(always)]
#[must_use]
pub const fn take(state: u64, now_ns: u64, limit: u32) -> Option<u64> {
    if limit == 0 {
        return None;
    }
    let second = (now_ns / 1_000_000_000) as u32;
    let (window, count) = ((state >> 32) as u32, state as u32);
    if window != second {
        Some(((second as u64) << 32) | 1)
    } else if count < limit {
        Some(state + 1)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// Over any sequence of arrival times, no second gets more than
        /// `limit` events, and a second with at least `limit` candidates gets
        /// exactly `limit`.
        #[test]
        fn at_most_limit_per_second(limit in 0u32..50, mut times in proptest::collection::vec(0u64..5_000_000_000, 0..500)) {
            times.sort_unstable();
            let mut state = 0u64;
            let mut per_second = [0u32; 5];
            let mut offered = [0u32; 5];
            for t in &times {
                let s = (*t / 1_000_000_000) as usize;
                offered[s] += 1;
                if let Some(next) = take(state, *t, limit) {
                    state = next;
                    per_second[s] += 1;
                }
            }
            for s in 0..5 {
                prop_assert_eq!(per_second[s], offered[s].min(limit));
            }
        }
    }
}
