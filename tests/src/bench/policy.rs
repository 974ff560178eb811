//! The policy path: a 100,000-account policy file validated, compiled and
//! applied, then one account changed; and the agent's memory for both.
//!
//! In process, with the agent's library, every round:
//!
//! 1. `Policy::from_file` of the generated policy, once spelled in YAML and
//!    once in JSON (the same policy: their accounts' fingerprints must
//!    match), each timed;
//! 2. `compile` from an empty slot table;
//! 3. `Datapath::load` (maps created, programs verified: a start-up cost,
//!    reported apart);
//! 4. `Datapath::apply` into the fresh maps, which returns once the policy
//!    is in force (inactive half written, flip), then
//!    `Datapath::sync_standby` (grace period, other half), timed apart, as
//!    the agent runs them;
//! 5. three one-account changes in a row, each as the agent's SIGHUP path
//!    does it: re-read the whole file (both spellings timed, the JSON one
//!    used), compile against the running policy, apply the difference, sync
//!    the standby half. The changes: the limits of one account, one prefix
//!    more in one account's block list, one new account.
//!
//! Then the real `mmesh-agent` binary runs the JSON file in a namespace of
//! its own (one veth pair), and its resident memory is read from
//! `/proc/<pid>/status` once it runs and again after a SIGHUP with a
//! one-account change; the kernel memory of its maps is the `memlock` of
//! the map fds it holds (`/proc/<pid>/fdinfo`).
//!
//! The policy (see [`policy_text`]): every account has an IPv4 and an IPv6
//! host address, an IPv4 /28 and an IPv6 /80, packet and bit limits in both
//! directions; every hundredth account has a block list of ten prefixes; a
//! global block list of 1,000 IPv4 and 200 IPv6 prefixes. Large global feeds
//! are a separate concern (the `kernel` group loads a million prefixes).

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use mmesh_agent::{
    barrier::ProgramBarrier,
    compile::{Capacity, compile},
    datapath::Datapath,
    policy::Policy,
};

use super::{
    Options,
    accuracy::veth_namespace,
    report::{Figure, Goal, Report},
    scale,
};
use crate::netns::{Agent, NetNs, PolicyFile};

const GROUP: &str = "policy path";

/// Goal: reading, validating, compiling and applying a large JSON policy
/// takes at most this many times as long as parsing the same JSON into a
/// generic value without looking at it. (7.9× on an EPYC where the whole
/// took 984 ms, just under the absolute goal of 1 s it replaces.)
const JSON_APPLY_RATIO: f64 = 10.0;

/// Goal: a one-account change (compile + apply) takes at most this share of
/// compiling and applying the whole policy into fresh maps.
const CHANGE_RATIO: f64 = 0.02;

/// The one-account changes, applied one after the other.
const CHANGES: [&str; 3] = [
    "limits of one account",
    "one prefix more in one account's block list",
    "one new account",
];

/// The two spellings of the benchmark policy: the same policy, so that the
/// parsers can be compared (the agent tells them apart by the first byte).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Format {
    Yaml,
    Json,
}

impl Format {
    fn name(self) -> &'static str {
        match self {
            Self::Yaml => "YAML",
            Self::Json => "JSON",
        }
    }
}

/// The policy file with `accounts` accounts and the first `changes` of
/// [`CHANGES`] made, in `format`.
pub(super) fn policy_text(accounts: u32, changes: usize, format: Format) -> String {
    let touched = changed_account(accounts);
    let mut global: Vec<String> = scale::global_v4(1_000)
        .iter()
        .map(ToString::to_string)
        .collect();
    global.extend(scale::global_v6(200).iter().map(ToString::to_string));
    let mut w = Writer {
        y: String::with_capacity(accounts as usize * 300 + 64 * 1024),
        json: format == Format::Json,
    };
    w.start(&global);
    for i in 0..accounts {
        let v4_28 = std::net::Ipv4Addr::from((10 << 24) + i * 16);
        let v6_80 = std::net::Ipv6Addr::new(0xfd00, 0x0acc, 1, (i >> 16) as u16, i as u16, 0, 0, 0);
        let prefixes = [
            scale::host_v4(i).to_string(),
            format!("{v4_28}/28"),
            scale::host_v6(i).to_string(),
            format!("{v6_80}/80"),
        ];
        let block = (i % 100 == 0).then(|| {
            let mut block: Vec<String> = (0..10u32)
                .map(|k| format!("192.0.2.{}/28", k * 16))
                .collect();
            if i == touched && changes >= 2 {
                block.push("198.51.100.0/24".into());
            }
            block
        });
        let pps = if i == touched && changes >= 1 {
            "50k"
        } else {
            "100k"
        };
        w.account(
            &format!("acct-{i}"),
            &prefixes,
            block.as_deref(),
            (pps, "1G"),
            Some(("20k", "200M")),
        );
    }
    if changes >= 3 {
        let prefixes = [
            "100.127.255.1",
            "10.255.255.0/28",
            "fd00:acc:2::1",
            "fd00:acc:3::/80",
        ]
        .map(String::from);
        w.account("acct-new", &prefixes, None, ("100k", "1G"), None);
    }
    w.finish()
}

/// Writes the benchmark policy in YAML or JSON.
struct Writer {
    y: String,
    json: bool,
}

impl Writer {
    /// A list of strings: `[a, b]`; JSON quotes every item, YAML the IPv6
    /// ones.
    fn list(&mut self, items: &[String]) {
        self.y.push('[');
        for (k, item) in items.iter().enumerate() {
            if k > 0 {
                self.y.push_str(", ");
            }
            if self.json {
                let _ = write!(self.y, "\"{item}\"");
            } else if item.contains(':') {
                let _ = write!(self.y, "'{item}'");
            } else {
                self.y.push_str(item);
            }
        }
        self.y.push(']');
    }

    /// The version, the global block list, the start of the accounts.
    fn start(&mut self, global: &[String]) {
        if self.json {
            self.y.push_str("{\"version\": \"bench-1\",\n \"global\": {\"events_per_second\": 10, \"block\": [{\"name\": \"abuse-feed\", \"cidrs\": ");
            self.list(global);
            self.y.push_str("}]},\n \"accounts\": [\n");
        } else {
            self.y.push_str("version: bench-1\nglobal:\n  events_per_second: 10\n  block:\n    - name: abuse-feed\n      cidrs: ");
            self.list(global);
            self.y.push_str("\naccounts:\n");
        }
    }

    /// One account; limits are (pps, bps).
    fn account(
        &mut self,
        id: &str,
        prefixes: &[String],
        block: Option<&[String]>,
        inbound: (&str, &str),
        outbound: Option<(&str, &str)>,
    ) {
        if self.json {
            let _ = write!(self.y, "  {{\"id\": \"{id}\", \"prefixes\": ");
            self.list(prefixes);
            if let Some(block) = block {
                self.y
                    .push_str(", \"block\": [{\"name\": \"deny\", \"cidrs\": ");
                self.list(block);
                self.y.push_str("}]");
            }
            let _ = write!(
                self.y,
                ", \"limits\": {{\"inbound\": {{\"pps\": \"{}\", \"bps\": \"{}\"}}",
                inbound.0, inbound.1
            );
            if let Some((pps, bps)) = outbound {
                let _ = write!(
                    self.y,
                    ", \"outbound\": {{\"pps\": \"{pps}\", \"bps\": \"{bps}\"}}"
                );
            }
            self.y.push_str("}},\n");
        } else {
            let _ = write!(self.y, "  - id: {id}\n    prefixes: ");
            self.list(prefixes);
            self.y.push('\n');
            if let Some(block) = block {
                self.y
                    .push_str("    block:\n      - name: deny\n        cidrs: ");
                self.list(block);
                self.y.push('\n');
            }
            let _ = writeln!(
                self.y,
                "    limits:\n      inbound: {{ pps: {}, bps: {} }}",
                inbound.0, inbound.1
            );
            if let Some((pps, bps)) = outbound {
                let _ = writeln!(self.y, "      outbound: {{ pps: {pps}, bps: {bps} }}");
            }
        }
    }

    fn finish(mut self) -> String {
        if self.json {
            // The last account's ",\n" closes the list instead.
            self.y.truncate(self.y.len() - 2);
            self.y.push_str("\n]}\n");
        }
        self.y
    }
}

/// The account the changes touch: one with a block list, mid-policy.
pub(super) fn changed_account(accounts: u32) -> u32 {
    accounts / 2 / 100 * 100
}

pub(super) fn capacity(accounts: u32) -> Capacity {
    Capacity {
        accounts: accounts + 16,
        // Per family: a host address and a prefix per account.
        account_prefixes: 2 * accounts + 16,
        list_prefixes: (accounts / 100 + 1) * 11 + 4096,
        ..Capacity::default()
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Times `f`.
fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let t = Instant::now();
    let out = f();
    (out, t.elapsed())
}

/// A figure in milliseconds.
fn ms_figure(name: &str, value: Duration, goal: Option<Goal>, note: String) -> Figure {
    Figure {
        group: GROUP.into(),
        name: name.into(),
        unit: "ms".into(),
        samples: vec![ms(value)],
        baseline: None,
        reference: None,
        goal,
        note,
    }
}

/// The policy texts: `[format][changes]`.
struct Texts {
    yaml: Vec<String>,
    json: Vec<String>,
}

impl Texts {
    fn get(&self, format: Format, changes: usize) -> &str {
        match format {
            Format::Yaml => &self.yaml[changes],
            Format::Json => &self.json[changes],
        }
    }
}

/// Writes `text` to `file` and reads it back as the agent does
/// (`Policy::from_file`: read, parse, validate), timed.
/// Reads `text` from `file` into a `serde_json::Value`: the baseline of the
/// policy path, parsing the same JSON without validating it.
/// The better of two runs: the first one also pays for the allocator's
/// first growth, which the policy read measured before it already paid.
fn json_without_validation(file: &PolicyFile, text: &str) -> Duration {
    file.write(text);
    (0..2)
        .map(|_| {
            let (value, took) = timed(|| {
                let bytes = std::fs::read(file.path()).expect("reading the policy file");
                serde_json::from_slice::<serde_json::Value>(&bytes)
            });
            drop(value.expect("the benchmark policy is JSON"));
            took
        })
        .min()
        .expect("two runs")
}

fn read_policy(file: &PolicyFile, text: &str) -> (Policy, Duration) {
    file.write(text);
    let (policy, took) = timed(|| Policy::from_file(file.path()));
    (
        policy.unwrap_or_else(|e| panic!("the agent rejects the benchmark policy: {e}")),
        took,
    )
}

/// Runs the group into `report`.
pub fn run(opts: &Options, report: &mut Report) {
    let accounts: u32 = if opts.quick { 2_000 } else { 100_000 };
    let (texts, generated) = timed(|| Texts {
        yaml: (0..=CHANGES.len())
            .map(|c| policy_text(accounts, c, Format::Yaml))
            .collect(),
        json: (0..=CHANGES.len())
            .map(|c| policy_text(accounts, c, Format::Json))
            .collect(),
    });
    eprintln!(
        "bench: policy: {accounts} accounts, {:.1} MB of YAML, {:.1} MB of JSON (generated in {generated:.1?})",
        texts.yaml[0].len() as f64 / 1e6,
        texts.json[0].len() as f64 / 1e6,
    );
    let file = PolicyFile::new("bench-policy", &texts.yaml[0]);
    for round in 0..opts.rounds {
        in_process(accounts, &file, &texts, report);
        eprintln!(
            "bench: policy round {}/{} (in process) done",
            round + 1,
            opts.rounds
        );
    }
    agent_memory(opts, accounts, &file, &texts.json, report);
}

/// One round in process.
#[expect(
    clippy::too_many_lines,
    reason = "one figure after the other, in the order of the report"
)]
fn in_process(accounts: u32, file: &PolicyFile, texts: &Texts, report: &mut Report) {
    let n = accounts;
    let cap = capacity(accounts);
    let (policy, parse_yaml) = read_policy(file, texts.get(Format::Yaml, 0));
    let (json_policy, parse_json) = read_policy(file, texts.get(Format::Json, 0));
    let fingerprints = |p: &Policy| p.accounts.iter().map(|a| a.fingerprint).collect::<Vec<_>>();
    assert!(
        fingerprints(&policy) == fingerprints(&json_policy)
            && policy.global.lists == json_policy.global.lists,
        "the YAML and the JSON benchmark policies differ"
    );
    drop(json_policy);
    let (compiled, compile_t) = timed(|| compile(&policy, None, &cap));
    let compiled = std::sync::Arc::new(compiled.expect("the benchmark policy compiles"));
    let counts = compiled.counts();
    let entries = counts.account_prefixes_v4
        + counts.account_prefixes_v6
        + counts.list_prefixes_v4
        + counts.list_prefixes_v6
        + counts.accounts;
    let (dp, load) = timed(|| Datapath::load(cap));
    let mut dp = dp.expect("loading mmesh (run as root)");
    let (generation, apply) = timed(|| dp.apply(compiled));
    generation.expect("applying the benchmark policy");
    let (synced, standby) = timed(|| dp.sync_standby());
    synced.expect("writing the standby half");
    // Only this datapath's maps are open in this process now.
    let memlock = maps_memlock(std::process::id());
    eprintln!(
        "bench: policy: parse+validate YAML {parse_yaml:.1?}, JSON {parse_json:.1?}, compile {compile_t:.1?}, load {load:.1?}, first apply {apply:.1?}, standby half {standby:.1?} ({entries} map entries per half, maps {:.1} MB)",
        memlock / 1e6
    );
    let bare_json = json_without_validation(file, &texts.json[0]);
    report.add(ms_figure(
        &format!("baseline: {n} accounts, JSON read and parsed, not validated"),
        bare_json,
        None,
        "the same JSON file read and parsed by serde_json into a generic value (`serde_json::Value`): what reading the file costs before any checking".into(),
    ));
    report.add(Figure {
        baseline: Some((
            format!("baseline: {n} accounts, JSON read and parsed, not validated"),
            vec![ms(bare_json)],
        )),
        goal: Some(Goal::RatioAtMost(JSON_APPLY_RATIO)),
        ..ms_figure(
            &format!("{n} accounts, JSON: parse + validate + compile + first apply"),
            parse_json + compile_t + apply,
            None,
            "the sum of the phases below, from the JSON file on disk to the policy enforcing in freshly loaded maps (the load itself, a start-up cost, is apart)".into(),
        )
    });
    report.add(ms_figure(
        &format!("{n} accounts, YAML: parse + validate + compile + first apply"),
        parse_yaml + compile_t + apply,
        None,
        "the same from the YAML spelling of the policy: serde-saphyr reads about 11 MB/s here, so at this size generate JSON (docs/benchmarks.md)".into(),
    ));
    for (format, took, text) in [
        (Format::Json, parse_json, &texts.json[0]),
        (Format::Yaml, parse_yaml, &texts.yaml[0]),
    ] {
        report.add(ms_figure(
            &format!("{n} accounts: parse + validate, {}", format.name()),
            took,
            None,
            format!(
                "Policy::from_file of {:.1} MB of {}: {n} accounts with an IPv4 and an IPv6 host address, an IPv4 /28 and an IPv6 /80, pps and bps limits both ways, a 10-prefix block list on every 100th; a global block list of 1,200 prefixes",
                text.len() as f64 / 1e6,
                format.name()
            ),
        ));
    }
    report.add(ms_figure(
        &format!("{n} accounts: compile"),
        compile_t,
        None,
        format!("compile() from an empty slot table into {entries} map entries per half"),
    ));
    report.add(ms_figure(
        &format!("{n} accounts: first apply into fresh maps"),
        apply,
        None,
        "Datapath::apply right after Datapath::load, until the policy is in force: the inactive half written (hash, array and LPM entries in batches), then the flip".into(),
    ));
    report.add(ms_figure(
        &format!("{n} accounts: then the standby half (not in the total)"),
        standby,
        None,
        "Datapath::sync_standby right after: the grace period, then the other half written (the agent does it after the policy is in force, before it answers anything else)".into(),
    ));
    report.add(Figure {
        group: GROUP.into(),
        name: format!("kernel memory of the maps, {n} accounts (memlock, in process)"),
        unit: "MB".into(),
        samples: vec![memlock / 1e6],
        baseline: None,
        reference: None,
        goal: None,
        note: "the sum of `memlock` over the BPF maps of the datapath loaded here with the policy in both halves (the same maps the agent creates for it)".into(),
    });
    report.add(ms_figure(
        "datapath load (start-up, not in the total)",
        load,
        None,
        "Datapath::load with maps sized for the policy: map creation and the verifier for the four programs".into(),
    ));

    one_account_changes(&mut dp, accounts, file, texts, compile_t + apply, report);
    grace_period(report);
    drop(dp);
}

/// The three changes of [`CHANGES`], one after the other, on the running
/// datapath.
fn one_account_changes(
    dp: &mut Datapath,
    accounts: u32,
    file: &PolicyFile,
    texts: &Texts,
    full: Duration,
    report: &mut Report,
) {
    let n = accounts;
    let cap = capacity(accounts);
    let mut reparse = (Vec::new(), Vec::new());
    for (c, change) in CHANGES.iter().enumerate() {
        let (_, yaml) = read_policy(file, texts.get(Format::Yaml, c + 1));
        reparse.0.push(yaml);
        let (policy, json) = read_policy(file, texts.get(Format::Json, c + 1));
        reparse.1.push(json);
        let (compiled, compile_t) =
            timed(|| compile(&policy, dp.active().map(AsRef::as_ref), &cap));
        let compiled = std::sync::Arc::new(compiled.expect("the changed policy compiles"));
        let (generation, apply) = timed(|| dp.apply(compiled));
        generation.expect("applying the changed policy");
        let (synced, standby) = timed(|| dp.sync_standby());
        synced.expect("writing the standby half");
        eprintln!(
            "bench: policy: one-account change ({change}): re-read YAML {yaml:.1?}, JSON {json:.1?}, compile {compile_t:.1?}, apply {apply:.1?}, standby half {standby:.1?}"
        );
        report.add(Figure {
            baseline: Some((
                format!("{n} accounts: compile + first apply"),
                vec![ms(full)],
            )),
            goal: Some(Goal::RatioAtMost(CHANGE_RATIO)),
            ..ms_figure(
                &format!("one-account change ({change}): compile + apply"),
                compile_t + apply,
                None,
                format!(
                    "on the running {n}-account datapath, as the agent's reload does it after parsing: compile against the running policy, apply until in force (the touched slots written into the inactive half, the flip); the re-read of the file and the standby half after are apart. Baseline: compiling and applying all {n} accounts into fresh maps"
                ),
            )
        });
        if c == 0 {
            report.add(ms_figure(
                "one-account change: compile",
                compile_t,
                None,
                "the compile part of the first change: every account's fingerprint compared, the changed one recompiled".into(),
            ));
            report.add(ms_figure(
                "one-account change: apply",
                apply,
                None,
                "the apply part of the first change: the changed slot's difference written into the inactive half, then the flip".into(),
            ));
            report.add(ms_figure(
                "one-account change: then the standby half",
                standby,
                None,
                "Datapath::sync_standby after the first change: the grace period, the same difference in the other half".into(),
            ));
        }
    }
    for (format, mut times) in [(Format::Json, reparse.1), (Format::Yaml, reparse.0)] {
        times.sort();
        report.add(ms_figure(
            &format!("one-account change: re-read + validate the whole file, {}", format.name()),
            times[times.len() / 2],
            None,
            "Policy::from_file of the changed file (the median of the three changes): a file-based change re-reads everything".into(),
        ));
    }
}

/// The grace period alone, for the apply figures to be read against.
fn grace_period(report: &mut Report) {
    let barrier = ProgramBarrier::new().expect("creating the program barrier");
    let mut waits: Vec<Duration> = (0..5)
        .map(|_| timed(|| barrier.wait().expect("barrier wait")).1)
        .collect();
    waits.sort();
    report.add(ms_figure(
        "RCU grace period (ProgramBarrier::wait)",
        waits[waits.len() / 2],
        None,
        "one map-in-map update, i.e. synchronize_rcu(): what sync_standby waits once after a flip (median of 5)".into(),
    ));
}

/// The agent binary to measure: `$MMESH_AGENT_BIN`, else the release build,
/// else (quick mode only) the debug build. `None` if there is none.
pub(super) fn agent_binary(quick: bool) -> Option<PathBuf> {
    workspace_binary("mmesh-agent", "MMESH_AGENT_BIN", quick)
}

/// The workspace's binary `name` to measure: `$env`, else its release
/// build, else (quick mode only) its debug build. `None` if there is none.
pub(super) fn workspace_binary(name: &str, env: &str, quick: bool) -> Option<PathBuf> {
    if let Some(bin) = std::env::var_os(env) {
        return Some(PathBuf::from(bin)).filter(|b| b.is_file());
    }
    let target = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate is inside the workspace")
        .join("target");
    let release = target.join("release").join(name);
    let debug = target.join("debug").join(name);
    if release.is_file() {
        Some(release)
    } else if quick && debug.is_file() {
        Some(debug)
    } else {
        None
    }
}

/// The figure `name` of `group`, in `unit`, not measured for want of an
/// agent binary ([`agent_binary`] found none).
pub(super) fn no_agent_binary(group: &str, name: String, unit: &str) -> Figure {
    no_binary(group, name, unit, ("mmesh-agent", "MMESH_AGENT_BIN"))
}

/// The figure `name` of `group`, in `unit`, not measured for want of the
/// workspace's binary `bin` ([`workspace_binary`] with `env` found none).
pub(super) fn no_binary(group: &str, name: String, unit: &str, (bin, env): (&str, &str)) -> Figure {
    Figure {
        group: group.into(),
        name,
        unit: unit.into(),
        samples: Vec::new(),
        baseline: None,
        reference: None,
        goal: None,
        note: format!(
            "not measured: no {bin} binary (set {env}, or `cargo build --release -p {bin}`)"
        ),
    }
}

/// `VmRSS` and `VmHWM` of `pid`, in bytes.
pub(super) fn rss(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("reading /proc/{pid}/status: {e}"));
    let field = |name: &str| -> f64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
            * 1024.0
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// The kernel memory charged for the BPF maps `pid` holds (`memlock` of
/// each map fd, each map once), in bytes.
fn maps_memlock(pid: u32) -> f64 {
    let mut seen = std::collections::BTreeMap::new();
    let dir = format!("/proc/{pid}/fdinfo");
    for entry in std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {dir}: {e}"))
        .flatten()
    {
        let Ok(info) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        if let (Some(id), Some(memlock)) = (field("map_id:"), field("memlock:")) {
            seen.insert(id, memlock);
        }
    }
    seen.values().sum::<u64>() as f64
}

/// Sends SIGHUP and waits for the agent's answer; returns how long it took.
fn reload(agent: &Agent) -> Duration {
    let from = agent.logs().len();
    let t = Instant::now();
    agent.signal(libc::SIGHUP);
    loop {
        if agent.log_position("policy in force", from).is_some() {
            return t.elapsed();
        }
        if let Some(i) = agent.log_position("policy rejected", from) {
            panic!("the agent rejected the changed policy: {}", agent.logs()[i]);
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the agent did not answer SIGHUP within 30 s"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn agent_memory(
    opts: &Options,
    accounts: u32,
    file: &PolicyFile,
    texts: &[String],
    report: &mut Report,
) {
    let names = [
        format!("agent RSS, {accounts}-account policy running"),
        format!("agent RSS, {accounts} accounts, after a one-account change (SIGHUP)"),
        format!("agent peak RSS, {accounts} accounts (VmHWM)"),
        format!("kernel memory of the maps, {accounts} accounts (memlock)"),
        format!("agent, {accounts} accounts: SIGHUP with a one-account change, until reloaded"),
    ];
    let Some(bin) = agent_binary(opts.quick) else {
        for name in names {
            let unit = if name.contains("SIGHUP") { "ms" } else { "MB" };
            report.add(no_agent_binary(GROUP, name, unit));
        }
        return;
    };
    eprintln!("bench: policy: agent memory with {}", bin.display());
    let restore = Restore::agent_bin(&bin);

    let ns = veth_namespace("bench-policy");
    let args = agent_args(file, &capacity(accounts));
    for round in 0..opts.rounds {
        agent_round(&ns, &args, file, texts, &names, report);
        eprintln!(
            "bench: policy round {}/{} (agent) done",
            round + 1,
            opts.rounds
        );
    }
    drop(ns);
    drop(restore);
}

/// `mmesh-agent run` arguments for `file` with maps sized by `cap`.
pub(super) fn agent_args(file: &PolicyFile, cap: &Capacity) -> Vec<String> {
    let mut args: Vec<String> = [
        "run",
        "--policy",
        &file.path().display().to_string(),
        "--interface",
        "mmb0:uplink",
        "--summary-interval",
        "3600",
        // What is measured is the SIGHUP path alone; a watcher would read
        // the changed file a second time.
        "--no-watch",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    for (flag, value) in [
        ("--max-accounts", cap.accounts),
        ("--max-account-prefixes", cap.account_prefixes),
        ("--max-list-prefixes", cap.list_prefixes),
        ("--max-counters", cap.counters),
        ("--event-buffer", cap.event_buffer),
    ] {
        args.push(flag.into());
        args.push(value.to_string());
    }
    args
}

/// Starts the agent on the policy, reads its memory, changes one account,
/// reads it again, stops it.
fn agent_round(
    ns: &NetNs,
    args: &[String],
    file: &PolicyFile,
    texts: &[String],
    names: &[String; 5],
    report: &mut Report,
) {
    let mb = |bytes: f64| bytes / 1e6;
    let figure = |name: &str, value: f64, note: String| Figure {
        group: GROUP.into(),
        name: name.into(),
        unit: "MB".into(),
        samples: vec![value],
        baseline: None,
        reference: None,
        goal: None,
        note,
    };
    file.write(&texts[0]);
    let (agent, started) = timed(|| Agent::start_with_args(ns, args));
    let (running, _) = rss(agent.pid());
    let memlock = maps_memlock(agent.pid());
    file.write(&texts[1]);
    let reloaded = reload(&agent);
    let (changed, peak) = rss(agent.pid());
    drop(agent);
    eprintln!(
        "bench: policy: agent started in {started:.1?}: RSS {:.1} MB, maps {:.1} MB; SIGHUP (one-account change) answered in {reloaded:.1?}: RSS {:.1} MB, peak {:.1} MB",
        mb(running),
        mb(memlock),
        mb(changed),
        mb(peak)
    );
    report.add(figure(
        &names[0],
        mb(running),
        "VmRSS of mmesh-agent run with the policy, once it reports running (MB = 10⁶ bytes)".into(),
    ));
    report.add(figure(
        &names[1],
        mb(changed),
        "VmRSS right after the agent logged the reload of the policy with one account's limits changed".into(),
    ));
    report.add(figure(
        &names[2],
        mb(peak),
        "VmHWM after start and the one-account change: the most the agent held at any moment"
            .into(),
    ));
    report.add(figure(
        &names[3],
        mb(memlock),
        "the sum of `memlock` over the BPF maps the agent holds (/proc/<pid>/fdinfo): preallocated hashes and arrays in full, LPM tries per entry, the ring buffer".into(),
    ));
    report.add(ms_figure(
        &names[4],
        reloaded,
        None,
        "from SIGHUP to the agent's `policy in force` log line (polled every ms): re-read, compile, name table, apply, standby half".into(),
    ));
}

/// Puts `MMESH_AGENT_BIN` back as it was, also on panic.
pub(super) struct Restore(Option<std::ffi::OsString>);

impl Restore {
    /// Points `$MMESH_AGENT_BIN`, which `Agent` runs, at `bin` for the time
    /// of a group, until the guard is dropped.
    pub(super) fn agent_bin(bin: &Path) -> Self {
        let previous = std::env::var_os("MMESH_AGENT_BIN");
        // SAFETY: the harness runs one group at a time and no other thread
        // of this process is running or reading the environment here.
        unsafe { std::env::set_var("MMESH_AGENT_BIN", bin) };
        Self(previous)
    }
}

impl Drop for Restore {
    fn drop(&mut self) {
        // SAFETY: as where it was set: no other thread of this process runs.
        unsafe {
            match self.0.take() {
                Some(v) => std::env::set_var("MMESH_AGENT_BIN", v),
                None => std::env::remove_var("MMESH_AGENT_BIN"),
            }
        }
    }
}
