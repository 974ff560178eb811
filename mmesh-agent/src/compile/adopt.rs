//! Compiling a policy for a datapath adopted from pins: the accounts an
//! earlier agent left in the kernel keep their slots.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

use mmesh_common::maps::GenConfig;

use super::{
    COMPILATIONS, Capacity, CompileError, Compiled, Counts, SlotTable, check_capacity,
    compile_account, compile_global, generation_flags, incremental::Accounts, verdict_code,
};
use crate::policy::Policy;

/// The key under which a pinned datapath remembers which slot account `id`
/// holds (`mmesh_agent::datapath::pin`): a 128-bit hash of the id, never 0.
#[must_use]
pub fn account_key(id: &str) -> u128 {
    xxhash_rust::xxh3::xxh3_128(id.as_bytes()).max(1)
}

/// Compiles `policy` for a datapath adopted from pins, where an earlier agent
/// left its accounts in the slots `held` (by [`account_key`]): those accounts
/// keep their slots, and with them their counters and rate-limit state; the
/// others arrive in new slots (reset), and slots held by accounts no longer
/// in the policy are released. Applied like any other change.
pub fn compile_adopting<S: std::hash::BuildHasher>(
    policy: &Policy,
    held: &HashMap<u128, u32, S>,
    capacity: &Capacity,
) -> Result<Compiled, CompileError> {
    super::accounts_fit(policy, capacity)?;
    let global = Arc::new(compile_global(&policy.global.lists, capacity)?);
    let usable = |slot: u32| (1..=capacity.accounts).contains(&slot);
    let mut out = Accounts {
        entries: imbl::Vector::new(),
        counts: Counts::default(),
        touched: Vec::new(),
    };
    let mut kept = HashSet::new();
    let mut order = Vec::with_capacity(policy.accounts.len());
    let mut arriving = Vec::new();
    for (k, account) in policy.accounts.iter().enumerate() {
        match held.get(&account_key(&account.id)) {
            Some(&slot) if usable(slot) && kept.insert(slot) => {
                out.put(slot, Some(Arc::new(compile_account(account, slot)?)));
                order.push((slot, account.fingerprint));
            }
            _ => {
                arriving.push(k);
                order.push((0, account.fingerprint));
            }
        }
    }
    let top = held
        .values()
        .copied()
        .filter(|s| usable(*s))
        .max()
        .unwrap_or(0);
    let mut slots = SlotTable {
        free: (1..=top).filter(|s| !kept.contains(s)).collect(),
        next: top + 1,
    };
    let mut new_slots = Vec::with_capacity(arriving.len());
    for k in arriving {
        let account = &policy.accounts[k];
        let slot = slots.take(capacity.accounts)?;
        new_slots.push(slot);
        out.put(slot, Some(Arc::new(compile_account(account, slot)?)));
        order[k] = (slot, account.fingerprint);
    }
    let released: Vec<u32> = held
        .values()
        .copied()
        .filter(|s| usable(*s) && !kept.contains(s) && !new_slots.contains(s))
        .collect();
    let Accounts {
        entries: accounts,
        counts,
        touched,
    } = out;
    let out = Compiled {
        config: GenConfig {
            generation: 0,
            flags: generation_flags(&global, &counts),
            malformed: verdict_code(policy.global.malformed),
            event_rate: policy.global.events_per_second,
            _pad: 0,
        },
        slots,
        new_slots,
        global,
        accounts,
        order: order.into_iter().collect(),
        counts,
        id: COMPILATIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        base: 0,
        changed: touched
            .into_iter()
            .chain(released.iter().copied())
            .collect(),
        released,
    };
    check_capacity(&out.counts(), capacity)?;
    Ok(out)
}
