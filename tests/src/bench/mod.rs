//! The benchmark harness behind `cargo xtask bench`.
//!
//! Every group measures its figures in rounds, each round running the
//! group's baselines and scenarios one after the other, so that every
//! figure has a baseline measured moments apart on the same machine. The
//! report goes to `target/bench/` (Markdown, JSON, SVG) and to the terminal.
//! `--quick` runs every group briefly at a small scale: it only shows that
//! the harness works (the test suite runs it), its numbers mean nothing.

pub mod accuracy;
pub mod control;
pub mod cost;
pub mod e2e;
pub mod events;
pub mod fanout;
pub mod kernel;
pub mod policy;
pub mod report;
pub mod restart;
pub mod scale;
pub mod tcp;
pub mod xdp_filter;

use std::path::PathBuf;

/// mmesh's inbound XDP program of `dp`, to run with `BPF_PROG_TEST_RUN`.
fn xdp_inbound(dp: &mut mmesh_agent::datapath::Datapath) -> &aya::programs::Xdp {
    let prog: &mut aya::programs::Xdp = dp
        .program_mut(mmesh_common::maps::programs::XDP_INBOUND)
        .expect("xdp_inbound")
        .try_into()
        .expect("an XDP program");
    prog
}

/// Loads (verifies) the XDP programs `names` of the benchmark object.
fn load_xdp(bench: &mut aya::Ebpf, names: &[&str]) {
    for name in names {
        let p: &mut aya::programs::Xdp = bench
            .program_mut(name)
            .expect("program")
            .try_into()
            .expect("XDP");
        p.load().expect("verifier");
    }
}

/// A benchmark group's entry point.
type Group = fn(&Options, &mut report::Report);

/// Command-line options of `mmesh-bench`.
#[derive(Clone, Debug)]
pub struct Options {
    pub quick: bool,
    pub rounds: usize,
    pub out: PathBuf,
    /// Groups to run (all but `tcp-burst` when empty): `kernel`, `e2e`,
    /// `cost`, `accuracy`, `tcp`, `policy`, `control`, `fanout`, `events`, `restart`,
    /// `tcp-burst`.
    pub only: Vec<String>,
}

impl Options {
    fn wants(&self, group: &str, by_default: bool) -> bool {
        (by_default && self.only.is_empty()) || self.only.iter().any(|g| g == group)
    }
}

/// Parses the arguments, runs the groups, writes the report.
pub fn main() -> std::process::ExitCode {
    let mut opts = Options {
        quick: false,
        rounds: 5,
        out: PathBuf::from("target/bench"),
        only: Vec::new(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--quick" => opts.quick = true,
            "--rounds" => {
                opts.rounds = args
                    .next()
                    .and_then(|r| r.parse().ok())
                    .filter(|r| *r >= 1)
                    .unwrap_or_else(|| usage("--rounds takes a number ≥ 1"));
            }
            "--out" => {
                opts.out = args
                    .next()
                    .map_or_else(|| usage("--out takes a directory"), PathBuf::from);
            }
            "--only" => opts.only.push(
                args.next()
                    .unwrap_or_else(|| usage("--only takes a group name")),
            ),
            "-h" | "--help" => usage(""),
            other => usage(&format!("unknown argument {other:?}")),
        }
    }
    if opts.quick {
        opts.rounds = 1;
    }
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!(
            "mmesh-bench: the benchmarks load eBPF programs and create network namespaces: run as root"
        );
        return std::process::ExitCode::FAILURE;
    }
    let mut report = report::Report {
        machine: report::machine(),
        quick: opts.quick,
        rounds: opts.rounds,
        figures: Vec::new(),
        tables: Vec::new(),
    };
    // One group at a time: each needs the machine to itself. The last one
    // runs only when named: it is how a default was chosen, not a figure.
    let groups: [(&str, Group, bool); 11] = [
        ("kernel", kernel::run, true),
        ("e2e", e2e::run, true),
        ("cost", cost::run, true),
        ("accuracy", accuracy::run, true),
        ("tcp", tcp::run, true),
        ("policy", policy::run, true),
        ("control", control::run, true),
        ("fanout", fanout::run, true),
        ("events", events::run, true),
        ("restart", restart::run, true),
        ("tcp-burst", tcp::sweep, false),
    ];
    for (name, run, by_default) in groups {
        if opts.wants(name, by_default) {
            eprintln!("bench: group {name}");
            run(&opts, &mut report);
        }
    }
    if let Err(e) = report.write(&opts.out) {
        eprintln!(
            "mmesh-bench: cannot write the report to {}: {e}",
            opts.out.display()
        );
        return std::process::ExitCode::FAILURE;
    }
    println!("{}", report.table());
    println!(
        "\nreport: {}/report.md, report.json, report.svg",
        opts.out.display()
    );
    if opts.quick {
        let missing: Vec<&str> = report
            .figures
            .iter()
            .filter(|f| f.samples.is_empty() && f.note.is_empty())
            .map(|f| f.name.as_str())
            .collect();
        if !missing.is_empty() {
            eprintln!("mmesh-bench: scenarios without a measurement: {missing:?}");
            return std::process::ExitCode::FAILURE;
        }
    }
    std::process::ExitCode::SUCCESS
}

fn usage(problem: &str) -> ! {
    if !problem.is_empty() {
        eprintln!("mmesh-bench: {problem}");
    }
    eprintln!(
        "usage: mmesh-bench [--quick] [--rounds N] [--out DIR] [--only GROUP]...\ngroups: kernel e2e cost accuracy tcp policy control fanout events restart (and tcp-burst, only when named)"
    );
    std::process::exit(if problem.is_empty() { 0 } else { 2 });
}
