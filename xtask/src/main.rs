//! `cargo xtask`: setup, build, run and test mmesh.

mod guest;
mod setup;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "cargo xtask", about = "Build, run and test mmesh")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Install what building the eBPF programs needs: the nightly rust-src
    /// component and a bpf-linker built against the nightly's own LLVM.
    /// Idempotent: a second run only checks.
    Setup {
        /// Rebuild bpf-linker even if it looks right.
        #[arg(long)]
        force: bool,
    },
    /// Build the agent (with its eBPF object).
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Build and run `mmesh-agent run` (as root) with the embedded default
    /// policy on the default-route interface, `--ephemeral` (detached at
    /// exit); arguments after `--` go to `mmesh-agent run`.
    Run {
        #[arg(long)]
        release: bool,
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Run the benchmarks (as root) and write target/bench/report.{md,json,svg};
    /// arguments after `--` go to the harness (`--quick`, `--rounds N`,
    /// `--only GROUP`).
    Bench {
        /// Each scenario briefly, only to check that it runs.
        #[arg(long)]
        quick: bool,
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Run the whole test suite: lints, host tests, kernel tests
    /// (`BPF_PROG_TEST_RUN`), end-to-end tests in network namespaces (root),
    /// `bench --quick` into target/bench-quick, then the kernel tests and a
    /// short end-to-end test inside a Linux 6.1 guest (QEMU, virtme-ng),
    /// installing what that needs (Debian packages, virtme-ng in a
    /// virtualenv) when it is missing. Arguments after `--` go to `cargo
    /// test` (and skip the quick benchmarks and the guest).
    Test {
        /// Skip clippy and the format check.
        #[arg(long)]
        no_lint: bool,
        /// Skip the 6.1 guest (for local runs; CI runs it). The environment
        /// variable `MMESH_NO_GUEST=1` does the same.
        #[arg(long, env = "MMESH_NO_GUEST", value_parser = clap::builder::FalseyValueParser::new())]
        no_guest: bool,
        /// Run only the guest stage, with this kernel.
        #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(guest::KERNELS))]
        kernel: Option<String>,
        #[arg(last = true)]
        args: Vec<String>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    std::env::set_current_dir(&root).with_context(|| format!("entering {}", root.display()))?;
    match cli.command {
        Cmd::Setup { force } => setup::ensure(force),
        Cmd::Build { release } => {
            setup::ensure(false)?;
            build(release).map(drop)
        }
        Cmd::Run { release, args } => {
            setup::ensure(false)?;
            let agent = build(release)?;
            run_agent(&agent, &args)
        }
        Cmd::Bench { quick, mut args } => {
            setup::ensure(false)?;
            if quick {
                args.insert(0, "--quick".into());
            }
            bench(true, &args)
        }
        Cmd::Test {
            no_lint,
            no_guest,
            kernel,
            args,
        } => {
            setup::ensure(false)?;
            match kernel {
                Some(_) => {
                    if !args.is_empty() {
                        bail!("--kernel runs a fixed selection of tests: no arguments after `--`");
                    }
                    if !is_root() {
                        bail!(
                            "the guest stage installs Debian packages and its tests load eBPF programs: run it as root"
                        );
                    }
                    let agent = build(false)?;
                    guest::test(&std::fs::canonicalize(&agent)?)
                }
                None => test(no_lint, no_guest, &args),
            }
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// Runs a command, failing with its command line if it fails.
pub fn status(cmd: &mut Command) -> anyhow::Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd.status().with_context(|| format!("starting {shown}"))?;
    if !status.success() {
        bail!("{shown} failed ({status})");
    }
    Ok(())
}

#[must_use]
pub fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

/// Builds the agent binary; returns its path.
fn build(release: bool) -> anyhow::Result<PathBuf> {
    let mut cmd = cargo();
    cmd.args(["build", "--package", "mmesh-agent", "--bin", "mmesh-agent"]);
    if release {
        cmd.arg("--release");
    }
    status(&mut cmd)?;
    Ok(Path::new("target")
        .join(if release { "release" } else { "debug" })
        .join("mmesh-agent"))
}

/// The control-plane tests run a real etcd: Debian's `etcd-server`,
/// installed when missing (the test suite runs as root).
fn ensure_etcd() -> anyhow::Result<()> {
    if guest::is_installed("etcd-server") {
        return Ok(());
    }
    eprintln!("xtask: installing etcd-server (the control-plane tests run a real etcd)");
    status(Command::new("apt-get").args(["update", "-q"]))?;
    status(
        Command::new("apt-get")
            .args([
                "install",
                "-y",
                "-q",
                "--no-install-recommends",
                "etcd-server",
            ])
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

/// The deployment tests (tests/tests/deploy.rs) render the Kustomize
/// layouts with `kubectl kustomize` and check the systemd unit with
/// `systemd-analyze verify`; they install `kubernetes-validate` themselves
/// (a virtualenv under `~/.cache/mmesh/`). Said here, before the build,
/// rather than as a failed test at the end.
fn check_deploy_tools() -> anyhow::Result<()> {
    for (tool, args, why) in [
        (
            "kubectl",
            ["version", "--client"],
            "kubectl 1.27 or newer (kustomize v5), which renders deploy/",
        ),
        (
            "systemd-analyze",
            ["--version", "--no-pager"],
            "systemd-analyze (Debian's systemd package), which checks deploy/systemd/",
        ),
    ] {
        let found = Command::new(tool)
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            bail!("the deployment tests need {why}: install it and run again");
        }
    }
    Ok(())
}

fn is_root() -> bool {
    // SAFETY: no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn run_agent(agent: &Path, args: &[String]) -> anyhow::Result<()> {
    let mut cmd = if is_root() {
        Command::new(agent)
    } else {
        eprintln!("xtask: mmesh-agent needs root; running it through sudo");
        let mut c = Command::new("sudo");
        c.arg(agent);
        c
    };
    // Trying it out: everything detached when it stops (no pins).
    cmd.args(["run", "--ephemeral"]).args(args);
    status(&mut cmd)
}

/// Builds the agent and the benchmark harness (`release`: optimized, for
/// figures; else the test profile, to check that every scenario runs) and
/// runs the harness on that agent with `args`.
fn bench(release: bool, args: &[String]) -> anyhow::Result<()> {
    let agent = build(release)?;
    let agent =
        std::fs::canonicalize(&agent).with_context(|| format!("finding {}", agent.display()))?;
    let mut cmd = cargo();
    // The fan-out group runs the control plane of the same profile.
    cmd.args(["build", "--package", "mmesh-tests", "--bin", "mmesh-bench"])
        .args([
            "--package",
            "mmesh-controlplane",
            "--bin",
            "mmesh-controlplane",
        ]);
    if release {
        cmd.arg("--release");
    }
    status(&mut cmd)?;
    let controlplane = Path::new("target")
        .join(if release { "release" } else { "debug" })
        .join("mmesh-controlplane");
    let controlplane = std::fs::canonicalize(&controlplane)
        .with_context(|| format!("finding {}", controlplane.display()))?;
    let harness = Path::new("target")
        .join(if release { "release" } else { "debug" })
        .join("mmesh-bench");
    let mut cmd = if is_root() {
        Command::new(harness)
    } else {
        eprintln!("xtask: the benchmarks need root; running them through sudo");
        let mut c = Command::new("sudo");
        c.arg(harness);
        c
    };
    status(
        cmd.args(args)
            .env("MMESH_AGENT_BIN", agent)
            .env("MMESH_CONTROLPLANE_BIN", controlplane),
    )
}

fn test(no_lint: bool, no_guest: bool, args: &[String]) -> anyhow::Result<()> {
    if !is_root() {
        bail!(
            "the test suite loads eBPF programs and creates network namespaces: run it as root (sudo -E cargo xtask test)"
        );
    }
    if !no_lint {
        eprintln!("xtask: format check");
        status(Command::new("cargo").args(["+nightly", "fmt", "--all", "--check"]))
            .context("formatting differs: run `cargo +nightly fmt --all`")?;
        eprintln!("xtask: clippy (user space)");
        status(
            cargo()
                .args([
                    "clippy",
                    "--workspace",
                    "--exclude",
                    "mmesh-ebpf",
                    "--all-targets",
                ])
                .args(["--", "-D", "warnings"]),
        )?;
        eprintln!("xtask: clippy (eBPF programs, nightly)");
        status(
            Command::new("cargo")
                .args([
                    "+nightly",
                    "clippy",
                    "--package",
                    "mmesh-ebpf",
                    "--target",
                    "bpfel-unknown-none",
                ])
                .args([
                    "-Z",
                    "build-std=core",
                    "--target-dir",
                    "target/ebpf-clippy",
                    "--",
                    "-D",
                    "warnings",
                ])
                .env(
                    "RUSTFLAGS",
                    format!("--cfg bpf_target_arch=\"{}\"", std::env::consts::ARCH),
                ),
        )?;
    }
    ensure_etcd()?;
    check_deploy_tools()?;
    let agent = build(false)?;
    // The control-plane tests (tests/tests/controlplane.rs) run the binary.
    status(cargo().args([
        "build",
        "--package",
        "mmesh-controlplane",
        "--bin",
        "mmesh-controlplane",
    ]))?;
    let controlplane = Path::new("target/debug/mmesh-controlplane");
    eprintln!("xtask: tests (host, BPF_PROG_TEST_RUN, network namespaces, control plane)");
    let agent =
        std::fs::canonicalize(&agent).with_context(|| format!("finding {}", agent.display()))?;
    let controlplane = std::fs::canonicalize(controlplane)
        .with_context(|| format!("finding {}", controlplane.display()))?;
    status(
        cargo()
            .args(["test", "--workspace", "--exclude", "mmesh-ebpf"])
            .args(args)
            .env("MMESH_AGENT_BIN", &agent)
            .env("MMESH_CONTROLPLANE_BIN", controlplane),
    )?;
    if args.is_empty() {
        // So that the harness cannot rot: every scenario once, briefly; the
        // published report in target/bench is left alone.
        eprintln!("xtask: benchmarks, quick (each scenario once; no speed is checked)");
        let quick = ["--quick", "--out", "target/bench-quick"].map(String::from);
        bench(false, &quick)?;
        if no_guest {
            eprintln!("xtask: the 6.1 guest skipped (--no-guest or MMESH_NO_GUEST)");
        } else {
            eprintln!("xtask: the kernel and end-to-end tests in a Linux 6.1 guest");
            // The quick benchmarks built the same debug agent.
            guest::test(&agent)?;
        }
    }
    Ok(())
}
