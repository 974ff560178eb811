//! `mmesh-agent run`: load, apply, attach, report, reload, detach.

use std::{fmt::Write as _, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context as _;
use mmesh_common::{Direction, Reason, Verdict, maps::Counter};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::oneshot,
};

use crate::{
    compile::{Capacity, Compiled, compile},
    datapath::{Datapath, Totals},
    events::{self, Names},
    hook::ReceiveHook,
    interface::{self, InterfaceSpec, Role},
    policy::Policy,
};

/// Options of `mmesh-agent run`.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub policy: Option<PathBuf>,
    pub interfaces: Vec<InterfaceSpec>,
    pub receive_hook: ReceiveHook,
    pub capacity: Capacity,
    pub summary_interval: Duration,
}

/// Reads and validates the policy file, or the embedded default.
pub fn load_policy(path: Option<&PathBuf>) -> Result<Policy, crate::policy::PolicyError> {
    match path {
        Some(p) => Policy::from_file(p),
        None => Policy::embedded_default(),
    }
}

/// Compiles `policy` against the policy in force (reusing what did not
/// change).
fn compile_for(dp: &Datapath, policy: &Policy) -> anyhow::Result<Arc<Compiled>> {
    Ok(Arc::new(compile(
        policy,
        dp.active().map(AsRef::as_ref),
        dp.capacity(),
    )?))
}

fn describe(policy: &Policy, compiled: &Compiled) -> String {
    let c = compiled.counts();
    format!(
        "{} (version {}): {} accounts, {} account prefixes, {} list prefixes",
        policy.source,
        policy.version.as_deref().unwrap_or("none"),
        policy.accounts.len(),
        c.account_prefixes_v4 + c.account_prefixes_v6,
        c.list_prefixes_v4 + c.list_prefixes_v6,
    )
}

/// Runs until SIGINT or SIGTERM. Errors before the datapath is attached are
/// returned (and nothing stays attached); afterwards the agent keeps going.
pub async fn run(opts: RunOptions) -> anyhow::Result<()> {
    let policy = load_policy(opts.policy.as_ref())?;
    let interfaces = if opts.interfaces.is_empty() {
        let name = interface::default_route()?;
        tracing::info!(interface = %name, "no --interface given: attaching to the default-route interface as uplink");
        vec![InterfaceSpec {
            name,
            role: Role::Uplink,
        }]
    } else {
        opts.interfaces.clone()
    };
    // Refuse unusable interfaces before loading anything.
    for spec in &interfaces {
        interface::check(&spec.name)?;
    }
    let mut dp = Datapath::load(opts.capacity)?;
    let compiled = compile_for(&dp, &policy)?;
    let summary = describe(&policy, &compiled);
    let names = Names::default();
    // Named before the flip, so that the first events already find them.
    names.insert(dp.generation() + 1, compiled.clone());
    let generation = dp.apply(compiled).context("applying the policy")?;
    dp.sync_standby()
        .context("writing the standby copy of the policy")?;
    tracing::info!(generation, "policy {summary}");

    for spec in &interfaces {
        let a = dp.attach(spec, opts.receive_hook)?;
        tracing::info!(interface = %a.name, ifindex = a.ifindex, role = %a.role, receive = %a.receive, driver = %a.driver, tc = a.tc_mode, "attached");
    }

    let ring = dp
        .take_events()
        .context("the event ring buffer was already taken")?;
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let reader_names = names.clone();
    let reader = tokio::spawn(async move {
        events::read(ring, reader_names, std::io::stdout(), async {
            let _ = stop_rx.await;
        })
        .await
    });

    let mut hangup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut terminate =
        signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut ticker = tokio::time::interval(opts.summary_interval);
    ticker.tick().await;
    let mut last = dp.totals()?;
    tracing::info!("running; SIGHUP reloads the policy, SIGINT or SIGTERM stops");
    loop {
        tokio::select! {
            _ = hangup.recv() => reload(&mut dp, opts.policy.as_ref(), &names),
            _ = interrupt.recv() => { tracing::info!("SIGINT: stopping"); break; }
            _ = terminate.recv() => { tracing::info!("SIGTERM: stopping"); break; }
            _ = ticker.tick() => match dp.totals() {
                Ok(now) => {
                    tracing::info!("{}", summarize(&last, &now, opts.summary_interval));
                    last = now;
                }
                Err(err) => tracing::warn!(%err, "reading counters"),
            },
        }
    }
    let _ = stop_tx.send(());
    let decoded = reader.await.context("event reader task")??;
    let totals = dp.totals()?;
    let attached: Vec<String> = dp
        .attachments()
        .iter()
        .map(|a| format!("{} ({}, receive {})", a.name, a.role, a.receive))
        .collect();
    drop(dp);
    tracing::info!(
        events = decoded,
        "detached from {}; totals: {}",
        attached.join(", "),
        summarize(&Totals::default(), &totals, Duration::ZERO)
    );
    Ok(())
}

fn reload(dp: &mut Datapath, path: Option<&PathBuf>, names: &Names) {
    let Some(path) = path else {
        tracing::info!("SIGHUP: running the embedded default policy, nothing to reload");
        return;
    };
    let result = Policy::from_file(path)
        .map_err(anyhow::Error::from)
        .and_then(|policy| {
            let compiled = compile_for(dp, &policy)?;
            let summary = describe(&policy, &compiled);
            names.insert(dp.generation() + 1, compiled.clone());
            let generation = dp.apply(compiled)?;
            if let Err(err) = dp.sync_standby() {
                // In force already; the standby half is repaired next time.
                tracing::warn!(%err, "could not bring the standby copy of the policy up to date");
            }
            Ok((generation, summary))
        });
    match result {
        Ok((generation, summary)) => {
            tracing::info!(generation, "SIGHUP: policy reloaded: {summary}");
        }
        Err(err) => tracing::error!(
            generation = dp.generation(),
            "SIGHUP: policy rejected, the running policy stays in force: {err:#}"
        ),
    }
}

/// One line: what happened between two readings of the totals.
#[must_use]
pub fn summarize(before: &Totals, after: &Totals, interval: Duration) -> String {
    let delta = |key: &(Reason, Verdict, Direction)| -> Counter {
        let a = after.counters.get(key).copied().unwrap_or_default();
        let b = before.counters.get(key).copied().unwrap_or_default();
        Counter {
            packets: a.packets.saturating_sub(b.packets),
            bytes: a.bytes.saturating_sub(b.bytes),
        }
    };
    let mut seen = Counter::default();
    let mut dropped = Vec::new();
    let mut monitored = Vec::new();
    for reason in Reason::ALL {
        let mut by_verdict = [0u64; Verdict::COUNT];
        for verdict in Verdict::ALL {
            for direction in Direction::ALL {
                let c = delta(&(reason, verdict, direction));
                seen.packets += c.packets;
                seen.bytes += c.bytes;
                by_verdict[verdict as usize] += c.packets;
            }
        }
        if by_verdict[Verdict::Drop as usize] > 0 {
            dropped.push(format!(
                "{} {}",
                reason.name(),
                by_verdict[Verdict::Drop as usize]
            ));
        }
        if by_verdict[Verdict::Monitor as usize] > 0 {
            monitored.push(format!(
                "{} {}",
                reason.name(),
                by_verdict[Verdict::Monitor as usize]
            ));
        }
    }
    let joined = |v: &[String]| {
        if v.is_empty() {
            "none".to_owned()
        } else {
            v.join(", ")
        }
    };
    let rate = if interval.is_zero() {
        String::new()
    } else {
        format!(" ({:.0} pps)", seen.packets as f64 / interval.as_secs_f64())
    };
    let mut line = format!(
        "seen {} packets{rate}, {} bytes; dropped: {}; monitored: {}",
        seen.packets,
        seen.bytes,
        joined(&dropped),
        joined(&monitored)
    );
    let lost = after.events_lost.saturating_sub(before.events_lost);
    if lost > 0 {
        let _ = write!(line, "; events lost to a full ring buffer: {lost}");
    }
    let full = after.counters_full.saturating_sub(before.counters_full);
    if full > 0 {
        let _ = write!(
            line,
            "; packets not counted per account (--max-counters full): {full}"
        );
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_counts_deltas_by_reason() {
        let mut before = Totals::default();
        before.counters.insert(
            (Reason::Pass, Verdict::Pass, Direction::Inbound),
            Counter {
                packets: 10,
                bytes: 1000,
            },
        );
        let mut after = before.clone();
        after.counters.insert(
            (Reason::Pass, Verdict::Pass, Direction::Inbound),
            Counter {
                packets: 15,
                bytes: 1500,
            },
        );
        after.counters.insert(
            (Reason::GlobalBlock, Verdict::Drop, Direction::Outbound),
            Counter {
                packets: 3,
                bytes: 300,
            },
        );
        after.counters.insert(
            (Reason::RatePps, Verdict::Monitor, Direction::Inbound),
            Counter {
                packets: 2,
                bytes: 200,
            },
        );
        after.events_lost = 4;
        let line = summarize(&before, &after, Duration::from_secs(1));
        assert_eq!(
            line,
            "seen 10 packets (10 pps), 1000 bytes; dropped: global_block 3; monitored: rate_pps 2; events lost to a full ring buffer: 4"
        );
    }
}
