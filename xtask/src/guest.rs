//! The last stage of `cargo xtask test` (alone: `cargo xtask test --kernel
//! 6.1`): the kernel and end-to-end tests inside a Linux 6.1 guest (Debian
//! 12's kernel), booted with virtme-ng under QEMU.
//!
//! The host kernel has TCX (6.6+); 6.1 has only the clsact qdisc, an older
//! verifier and older helpers, and the only way to see what the agent does
//! there is to run it there. virtme-ng boots the packaged kernel with the
//! host's filesystem as its root (9p, read-only, writable overlays on /tmp
//! and /etc) and runs one command in it as the same user, so the test
//! binaries are built on the host and run unchanged in the guest, with the
//! host's `ip` and `tc`.
//!
//! Nested KVM fails on the machines this runs on (`failed to set MSR
//! 0x10a`), so QEMU emulates the CPU (TCG): slow (loading the datapath,
//! most of it the verifier, takes seconds per test), and with a clock that
//! says nothing about the speed of a real machine: tests that compare
//! rates with wall-clock time are left out ([`SELECTED`]).
//!
//! Everything is installed when missing and only checked when present:
//! the Debian packages (`apt-get`), and virtme-ng from `PyPI` in a virtualenv
//! under `~/.cache/mmesh/`.

use std::{
    fmt::Write as _,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{cargo, status};

/// The virtme-ng release installed (and checked) in the virtualenv.
const VIRTME_NG_VERSION: &str = "1.42";

/// Debian packages for the guest: the emulator, a static busybox for
/// virtme-ng's init, and the kernel itself (found by [`kernel_package`]).
const PACKAGES: [&str; 2] = ["qemu-system-x86", "busybox-static"];

/// Debian's 6.1 kernels are `linux-image-6.1.0-<N>-amd64-unsigned`; the
/// `-cloud` flavour lacks 9p, which virtme-ng mounts the root with.
const KERNEL_PREFIX: &str = "linux-image-6.1.0-";
const KERNEL_SUFFIX: &str = "-amd64-unsigned";

/// The guest stops after this long, whatever it is doing: a hung test must
/// fail the run, not stall it. (The whole guest stage takes a few minutes.)
const GUEST_TIMEOUT: Duration = Duration::from_mins(20);

/// Which tests of a test binary run in the guest.
pub enum Selection {
    /// Every test.
    All,
    /// Every test but those whose names contain one of these (`--skip`).
    AllBut(&'static [&'static str]),
}

/// The tests that run in the guest, by test binary (`cargo test --test
/// NAME`).
///
/// The kernel tests, all of them but these, left out on purpose: tests
/// that measure rates against wall-clock time (packet refills after a
/// sleep, the shared bucket with every CPU flooding), whose clock under TCG
/// says nothing, and the million-prefix load, a capacity test. And the
/// smoke tests, which mean the same on every kernel: the agent attaching
/// through clsact, a block list, a bit-rate limit, detach; pinned, a
/// restart that adopts the filters and keeps the rate-limit state, and
/// `detach`.
pub const SELECTED: [(&str, Selection); 2] = [
    (
        "datapath",
        Selection::AllBut(&[
            "packet_rate_limit_drops_after_the_burst_and_refills",
            "rate_limit_holds_with_traffic_on_every_cpu",
            "a_million_global_prefixes_load",
        ]),
    ),
    ("smoke", Selection::All),
];

/// How long an agent in the guest may take to be running (the
/// end-to-end tests' `MMESH_AGENT_READY_TIMEOUT`): generous, as the
/// emulated CPU is slow and shared (an agent took about 40 s to start).
const GUEST_AGENT_READY_SECS: u32 = 600;

/// CPUs of the guest (QEMU runs one thread per CPU under TCG).
const GUEST_CPUS: u32 = 2;

/// The kernel versions `--kernel` accepts.
pub const KERNELS: [&str; 1] = ["6.1"];

/// Runs the guest stage: installs what is missing, builds the agent and the
/// test binaries on the host, and runs them in a 6.1 guest.
pub fn test(agent: &Path) -> anyhow::Result<()> {
    let started = Instant::now();
    ensure_packages()?;
    let kernel = installed_kernel()?.context("no 6.1 kernel under /boot after installing one")?;
    let vng = ensure_virtme_ng()?;
    eprintln!(
        "xtask: guest: {} ready after {:.0?}",
        kernel.display(),
        started.elapsed()
    );
    let binaries = test_binaries()?;
    let script = write_script(agent, &binaries)?;
    let booted = Instant::now();
    run_guest(&vng, &kernel, &script)?;
    eprintln!(
        "xtask: guest: passed ({:.0?} in the guest, {:.0?} in all)",
        booted.elapsed(),
        started.elapsed()
    );
    Ok(())
}

pub fn is_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f", "${Status}", package])
        .output()
        .is_ok_and(|o| o.status.success() && o.stdout.ends_with(b"install ok installed"))
}

/// The newest `/boot/vmlinuz-6.1.0-<N>-amd64`, if any.
fn installed_kernel() -> anyhow::Result<Option<PathBuf>> {
    let mut found: Vec<(u32, PathBuf)> = Vec::new();
    for entry in std::fs::read_dir("/boot")
        .context("reading /boot")?
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(n) = name
            .strip_prefix("vmlinuz-6.1.0-")
            .and_then(|rest| rest.strip_suffix("-amd64"))
            .and_then(|n| n.parse().ok())
        {
            found.push((n, entry.path()));
        }
    }
    Ok(found.into_iter().max().map(|(_, path)| path))
}

/// The newest `linux-image-6.1.0-<N>-amd64-unsigned` the package lists
/// offer.
fn kernel_package() -> anyhow::Result<String> {
    let out = Command::new("apt-cache")
        .args(["search", "--names-only"])
        .arg(format!("^{KERNEL_PREFIX}[0-9]+{KERNEL_SUFFIX}$"))
        .output()
        .context("running apt-cache")?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter_map(|name| {
            let n: u32 = name
                .strip_prefix(KERNEL_PREFIX)?
                .strip_suffix(KERNEL_SUFFIX)?
                .parse()
                .ok()?;
            Some((n, name.to_owned()))
        })
        .max()
        .map(|(_, name)| name)
        .context("apt-cache offers no linux-image-6.1.0-<N>-amd64-unsigned (is this Debian 12?)")
}

/// Installs the Debian packages that are missing (one `apt-get update`
/// first, only if something is missing).
fn ensure_packages() -> anyhow::Result<()> {
    let mut missing: Vec<String> = PACKAGES
        .iter()
        .filter(|p| !is_installed(p))
        .map(|p| (*p).to_owned())
        .collect();
    let need_kernel = installed_kernel()?.is_none();
    if missing.is_empty() && !need_kernel {
        return Ok(());
    }
    eprintln!("xtask: guest: apt-get update");
    status(Command::new("apt-get").args(["update", "-q"]))?;
    if need_kernel {
        missing.push(kernel_package()?);
    }
    eprintln!("xtask: guest: installing {}", missing.join(" "));
    status(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

fn cache_dir() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map_or_else(
            || {
                PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
                    .join(".cache")
            },
            PathBuf::from,
        )
        .join("mmesh")
}

/// virtme-ng [`VIRTME_NG_VERSION`] in a virtualenv; returns its `bin/`.
fn ensure_virtme_ng() -> anyhow::Result<PathBuf> {
    let venv = cache_dir().join("virtme-ng");
    let bin = venv.join("bin");
    let current = Command::new(bin.join("vng"))
        .arg("--version")
        .output()
        .is_ok_and(|o| {
            String::from_utf8_lossy(&o.stdout).trim() == format!("virtme-ng {VIRTME_NG_VERSION}")
        });
    if current {
        return Ok(bin);
    }
    eprintln!(
        "xtask: guest: installing virtme-ng {VIRTME_NG_VERSION} into {}",
        venv.display()
    );
    status(Command::new("python3").arg("-m").arg("venv").arg(&venv))
        .context("virtme-ng needs Python 3 with the venv module (apt-get install python3-venv)")?;
    status(
        Command::new(bin.join("pip"))
            .args(["install", "--quiet"])
            .arg(format!("virtme-ng=={VIRTME_NG_VERSION}")),
    )?;
    Ok(bin)
}

/// The test binaries [`SELECTED`] names, each once.
fn targets() -> Vec<&'static str> {
    let mut targets: Vec<&str> = SELECTED.iter().map(|(target, _)| *target).collect();
    targets.dedup();
    targets
}

/// Builds the test binaries of [`SELECTED`]; returns them by target name,
/// their paths read from cargo's JSON messages.
fn test_binaries() -> anyhow::Result<Vec<(String, PathBuf)>> {
    let mut cmd = cargo();
    cmd.args([
        "test",
        "--no-run",
        "--package",
        "mmesh-tests",
        "--message-format",
        "json-render-diagnostics",
    ]);
    let targets = targets();
    for target in &targets {
        cmd.args(["--test", target]);
    }
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo test --no-run")?;
    if !out.status.success() {
        bail!("building the test binaries failed ({})", out.status);
    }
    let mut binaries = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(message) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let is_test = message["reason"] == "compiler-artifact"
            && message["profile"]["test"] == true
            && message["target"]["kind"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == "test"));
        if let (true, Some(exe), Some(name)) = (
            is_test,
            message["executable"].as_str(),
            message["target"]["name"].as_str(),
        ) {
            binaries.push((name.to_owned(), PathBuf::from(exe)));
        }
    }
    if binaries.len() != targets.len() {
        bail!("expected the test binaries {targets:?} from cargo, found {binaries:?}");
    }
    Ok(binaries)
}

/// Writes the script the guest runs: each binary with its [`SELECTED`]
/// tests, then an exit status that says whether all passed.
fn write_script(agent: &Path, binaries: &[(String, PathBuf)]) -> anyhow::Result<PathBuf> {
    let dir = Path::new("target").join("guest");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let script = std::fs::canonicalize(&dir)?.join("run.sh");
    let mut text = String::from(
        "#!/bin/sh\n# Written by `cargo xtask test --kernel 6.1`; runs inside the guest.\n\
         echo \"mmesh-guest: kernel $(uname -r), $(nproc) CPUs\"\n\
         failed=0\n",
    );
    let _ = writeln!(
        text,
        "export MMESH_AGENT_BIN='{}' MMESH_AGENT_READY_TIMEOUT={GUEST_AGENT_READY_SECS} RUST_BACKTRACE=1",
        agent.display()
    );
    for (target, binary) in binaries {
        // As many threads as the guest has CPUs.
        let _ = write!(text, "'{}' --test-threads={GUEST_CPUS}", binary.display());
        for (_, selection) in SELECTED.iter().filter(|(t, _)| t == target) {
            match selection {
                Selection::All => {}
                Selection::AllBut(skipped) => {
                    for test in *skipped {
                        let _ = write!(text, " --skip {test}");
                    }
                }
            }
        }
        text.push_str(" || failed=1\n");
    }
    text.push_str("exit $failed\n");
    std::fs::write(&script, text).with_context(|| format!("writing {}", script.display()))?;
    Ok(script)
}

/// Boots `kernel` with virtme-ng and runs `script` in it; fails if the
/// script fails or the guest outlives [`GUEST_TIMEOUT`].
fn run_guest(vng_bin: &Path, kernel: &Path, script: &Path) -> anyhow::Result<()> {
    eprintln!(
        "xtask: guest: the tests of {:?} (xtask/src/guest.rs, SELECTED says which are left out and why)",
        targets()
    );
    eprintln!(
        "xtask: guest: booting {} under QEMU without KVM (nested KVM fails here)",
        kernel.display()
    );
    // vng starts virtme-run and QEMU from PATH.
    let path = std::env::join_paths(std::iter::once(vng_bin.to_path_buf()).chain(
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()),
    ))?;
    let mut child = Command::new(vng_bin.join("vng"))
        .arg("--run")
        .arg(kernel)
        .args(["--disable-kvm", "--memory", "2G", "--cpus"])
        .arg(GUEST_CPUS.to_string())
        .arg("--")
        .arg(format!("sh {}", script.display()))
        .env("PATH", path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        // Piped too, not inherited: with our stderr a file, what vng and
        // QEMU write to it left it truncated and full of blanks.
        .stderr(Stdio::piped())
        .spawn()
        .context("starting vng")?;
    let stdout = child.stdout.take().context("vng's stdout")?;
    let stderr = child.stderr.take().context("vng's stderr")?;
    let errors = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("{line}");
        }
    });
    // The guest's output goes on to ours as it comes; a watchdog thread
    // kills vng (its pid, which is ours to end) at the deadline, or at once
    // if this function returns early with an error.
    let pid = child.id();
    let (done, watchdog) = std::sync::mpsc::channel::<()>();
    let guard = std::thread::spawn(move || {
        if watchdog.recv_timeout(GUEST_TIMEOUT).is_err() {
            eprintln!("xtask: guest: still running after {GUEST_TIMEOUT:?}; stopping it");
            // SAFETY: kill on a child pid we have not reaped yet.
            unsafe { libc::kill(pid.cast_signed(), libc::SIGKILL) };
        }
    });
    for line in BufReader::new(stdout).lines() {
        println!("{}", line.context("reading the guest's output")?);
    }
    let exit = child.wait().context("waiting for vng")?;
    let _ = done.send(());
    let _ = guard.join();
    let _ = errors.join();
    if !exit.success() {
        bail!("the tests in the 6.1 guest failed ({exit})");
    }
    Ok(())
}
