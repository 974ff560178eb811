//! The control-plane path: a policy pushed over the agent's gRPC stream,
//! from the control plane's send to the agent's Ack, with the agent
//! running as a process (release build) and a scripted control plane on
//! loopback in the agent's namespace.
//!
//! Baseline, measured in the same round: validating and compiling the same
//! policy from its JSON text in this process, without a kernel.

use std::time::{Duration, Instant};

use mmesh_agent::{
    compile::compile,
    control::{
        convert,
        proto::{self, agent_message::Body as Up},
    },
    policy::Policy,
};

use super::{
    Options,
    accuracy::veth_namespace,
    policy::{
        Format, Restore, agent_args, agent_binary, capacity, changed_account, no_agent_binary,
        policy_text, rss,
    },
    report::{Figure, Goal, Report},
};
use crate::{
    control::ScriptedControlPlane,
    controlplane::TempDir,
    netns::{Agent, PolicyFile},
};

const GROUP: &str = "control plane";

/// Goal: a snapshot of the whole policy, send to Ack, at most this many
/// times validating and compiling the same policy file in process. The
/// issue's goal is 1 s at 100,000 accounts; when this was set the baseline
/// took 0.40–0.57 s on the 2-vCPU EPYC machines here, so 1 s was about
/// twice it. The validator has become faster since (0.23–0.37 s), the
/// snapshot's transfer and map writes have not: the ratio now asks more
/// than the issue does (docs/benchmarks.md). Kept as set.
const SNAPSHOT_RATIO: f64 = 2.0;
/// Goal: a one-account delta, send to Ack, at most this share of the same
/// baseline (the 10 ms, against about 0.45 s when it was set).
const DELTA_RATIO: f64 = 0.022;
/// One-account deltas per round and kind (the median is reported).
const DELTAS: usize = 11;
/// Between two isolated deltas: longer than the enforcer's bringing the
/// standby half up to date after a flip (an RCU grace period, ~8 ms here,
/// then the change written again).
const DELTA_PAUSE: Duration = Duration::from_millis(100);

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn figure(
    name: &str,
    value: Duration,
    baseline: Option<(String, Duration)>,
    goal: Option<Goal>,
    note: &str,
) -> Figure {
    Figure {
        group: GROUP.into(),
        name: name.into(),
        unit: "ms".into(),
        samples: vec![ms(value)],
        baseline: baseline.map(|(n, d)| (n, vec![ms(d)])),
        reference: None,
        goal,
        note: note.into(),
    }
}

/// Runs the group into `report`.
#[expect(
    clippy::too_many_lines,
    reason = "set-up, then each round's figures in the order of the report"
)]
pub fn run(opts: &Options, report: &mut Report) {
    let accounts: u32 = if opts.quick { 2_000 } else { 100_000 };
    let text = policy_text(accounts, 0, Format::Json);
    let policy = Policy::parse(&text, "bench", std::path::Path::new("."))
        .expect("the benchmark policy validates");
    let message = convert::to_message(&policy);
    let names = [
        format!("snapshot of {accounts} accounts: send to Ack"),
        format!("one-account delta on {accounts} accounts: send to Ack"),
        format!("one-account deltas back to back on {accounts} accounts: send to Ack"),
    ];
    let memory = [
        format!("agent RSS, {accounts}-account snapshot in force"),
        format!("agent peak RSS, {accounts}-account snapshot (VmHWM)"),
    ];
    let Some(bin) = agent_binary(opts.quick) else {
        for name in names {
            report.add(no_agent_binary(GROUP, name, "ms"));
        }
        for name in memory {
            report.add(no_agent_binary(GROUP, name, "MB"));
        }
        return;
    };
    let restore = Restore::agent_bin(&bin);
    let ns = veth_namespace("bench-cp");
    let file = PolicyFile::new("bench-cp", "{}");
    let cap = capacity(accounts);
    let touched = format!("acct-{}", changed_account(accounts));
    for round in 0..opts.rounds {
        let state = TempDir::new(&format!("bench-state-{round}"));
        let (_, baseline) = timed(|| {
            let p = Policy::parse(&text, "bench", std::path::Path::new(".")).expect("validates");
            compile(&p, None, &cap).expect("compiles")
        });
        let cp = ScriptedControlPlane::serve(
            ns.tcp_listener("127.0.0.1:0".parse().expect("address")),
            None,
        );
        let mut args = agent_args(&file, &cap);
        for a in [
            "--control-plane",
            &cp.url(),
            "--control-plane-plaintext",
            "--node-name",
            "bench",
            "--state-dir",
            &state.path().display().to_string(),
        ] {
            args.push(a.to_owned());
        }
        let agent = Agent::start_with_args(&ns, &args);
        cp.wait_for("hello", 0, Duration::from_mins(1), |b| {
            matches!(b, Up::Hello(_))
        });
        let copy = message.clone();
        let from = agent.logs().len();
        let (answer, snapshot) = timed(|| cp.push_snapshot("v0", copy));
        // The enforcer's share (compile, write one half, flip), from its log.
        if let Some(i) = agent.log_position("control plane: policy in force", from) {
            eprintln!("bench: control plane: agent: {}", agent.logs()[i]);
        }
        let Up::Ack(ack) = answer else {
            panic!(
                "the agent refused the benchmark snapshot: {answer:?}; {:?}",
                agent.logs()
            );
        };
        // Isolated deltas first (a change now and then, as an operator
        // makes them), then back to back (each sent as the previous Ack
        // arrives: it waits for the standby half of the previous one).
        let mut deltas: Vec<(Duration, u64)> = (1..=2 * DELTAS)
            .map(|i| {
                if i <= DELTAS {
                    std::thread::sleep(DELTA_PAUSE);
                }
                let mut account = message
                    .accounts
                    .iter()
                    .find(|a| a.id == touched)
                    .expect("the touched account")
                    .clone();
                let limits = account.limits.get_or_insert_default();
                limits.inbound.get_or_insert_default().pps = Some(format!("{}k", 50 + i));
                let (answer, took) = timed(|| {
                    cp.push_delta(proto::Delta {
                        version: format!("v{i}"),
                        base_version: format!("v{}", i - 1),
                        upsert_accounts: vec![account],
                        ..proto::Delta::default()
                    })
                });
                let Up::Ack(ack) = answer else {
                    panic!("the agent refused a one-account delta: {answer:?}");
                };
                (took, ack.apply_micros)
            })
            .collect();
        // After the deltas: the last-known-good file has been written
        // (from a copy of the message) by then.
        let (resident, peak) = rss(agent.pid());
        drop(agent);
        let mut burst = deltas.split_off(DELTAS);
        deltas.sort();
        burst.sort();
        let (delta, delta_micros) = deltas[deltas.len() / 2];
        let (burst, burst_micros) = burst[burst.len() / 2];
        eprintln!(
            "bench: control plane: snapshot of {accounts} accounts {snapshot:.1?} send to Ack (agent: {:.1} ms from receipt; in process: {baseline:.1?}); one-account delta {delta:.1?} (agent: {:.2} ms), back to back {burst:.1?} (agent: {:.2} ms); agent RSS {:.1} MB, peak {:.1} MB",
            ack.apply_micros as f64 / 1e3,
            delta_micros as f64 / 1e3,
            burst_micros as f64 / 1e3,
            resident / 1e6,
            peak / 1e6,
        );
        report.add(figure(
            &names[0],
            snapshot,
            Some((format!("{accounts} accounts: read + validate + compile JSON in process"), baseline)),
            Some(Goal::RatioAtMost(SNAPSHOT_RATIO)),
            "the agent's first policy from the control plane: encode, send over loopback gRPC, decode, validate (as a file would be), compile, write the maps, flip, Ack",
        ));
        report.add(figure(
            &names[1],
            delta,
            Some((
                format!("{accounts} accounts: read + validate + compile JSON in process"),
                baseline,
            )),
            Some(Goal::RatioAtMost(DELTA_RATIO)),
            "one account's limits changed, the median of 11 deltas, each sent 100 ms after the previous Ack",
        ));
        report.add(figure(
            &names[2],
            burst,
            Some((
                format!("{accounts} accounts: read + validate + compile JSON in process"),
                baseline,
            )),
            None,
            "as above, each sent as soon as the previous Ack arrived: it waits while the enforcer brings the standby half of the previous one up to date (after an RCU grace period); no goal, shown for what a burst of changes costs",
        ));
        for (name, bytes, note) in [
            (
                &memory[0],
                resident,
                "VmRSS of the agent once the snapshot and the deltas after it are in force (MB = 10⁶ bytes)",
            ),
            (
                &memory[1],
                peak,
                "VmHWM of the agent, started on an empty policy, after the snapshot and the deltas: the most it held at any moment",
            ),
        ] {
            report.add(Figure {
                group: GROUP.into(),
                name: name.clone(),
                unit: "MB".into(),
                samples: vec![bytes / 1e6],
                baseline: None,
                reference: None,
                goal: None,
                note: note.into(),
            });
        }
        eprintln!(
            "bench: control plane round {}/{} done",
            round + 1,
            opts.rounds
        );
    }
    drop(ns);
    drop(restore);
}

fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let t = Instant::now();
    let out = f();
    (out, t.elapsed())
}
