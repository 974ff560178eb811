//! `cargo xtask setup`: the nightly rust-src component and a bpf-linker whose
//! LLVM is the nightly's own.
//!
//! rustc hands bpf-linker LLVM bitcode, and bitcode from LLVM N can only be
//! read by LLVM N or newer. The nightly toolchain ships its LLVM as a shared
//! library (`<sysroot>/lib/libLLVM.so.<major>...`), so bpf-linker is built
//! against exactly that library: `LLVM_PREFIX` points at a folder whose
//! `lib/` links to it, and bpf-linker's build script sets an rpath there. No
//! system LLVM, no download outside crates.io.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::status;

/// The bpf-linker release installed (it supports LLVM 21, 22 and 23).
const BPF_LINKER_VERSION: &str = "0.13.0";
const SUPPORTED_LLVM: [u32; 3] = [21, 22, 23];

fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let shown = format!("{cmd:?}");
    let out = cmd.output().with_context(|| format!("starting {shown}"))?;
    if !out.status.success() {
        bail!(
            "{shown} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// What `rustc +nightly -vV` says.
struct Nightly {
    commit: String,
    llvm_major: u32,
    sysroot: PathBuf,
}

fn nightly() -> anyhow::Result<Nightly> {
    let vv = output(Command::new("rustc").args(["+nightly", "-vV"]))?;
    let field = |name: &str| {
        vv.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_owned())
            .with_context(|| format!("`rustc +nightly -vV` printed no {name}"))
    };
    let commit = field("commit-hash:")?;
    let llvm = field("LLVM version:")?;
    let llvm_major = llvm
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .with_context(|| format!("cannot read the LLVM major of {llvm:?}"))?;
    let sysroot = PathBuf::from(
        output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?.trim(),
    );
    Ok(Nightly {
        commit,
        llvm_major,
        sysroot,
    })
}

fn cargo_home() -> PathBuf {
    std::env::var_os("CARGO_HOME").map_or_else(
        || PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cargo"),
        PathBuf::from,
    )
}

/// Installs what is missing; with `force`, rebuilds bpf-linker anyway.
pub fn ensure(force: bool) -> anyhow::Result<()> {
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"]))?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        eprintln!("xtask setup: installing the nightly toolchain (minimal profile, rust-src)");
        status(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]))
        .context("the eBPF programs build with nightly Rust")?;
    }
    let components = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))?;
    // rust-src for -Z build-std=core; rustfmt and clippy for the lints of
    // `cargo xtask test` (rustfmt.toml uses nightly options).
    for component in ["rust-src", "rustfmt", "clippy"] {
        if !components.lines().any(|l| l.starts_with(component)) {
            eprintln!("xtask setup: adding {component} to the nightly toolchain");
            status(Command::new("rustup").args([
                "component",
                "add",
                component,
                "--toolchain",
                "nightly",
            ]))?;
        }
    }

    let nightly = nightly()?;
    let home = cargo_home();
    let stamp_path = home.join("mmesh-llvm").join("bpf-linker.stamp");
    let stamp = format!(
        "bpf-linker {BPF_LINKER_VERSION} llvm {} nightly {}\n",
        nightly.llvm_major, nightly.commit
    );
    let linker_runs = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !force && linker_runs && std::fs::read_to_string(&stamp_path).is_ok_and(|s| s == stamp) {
        return Ok(());
    }
    if !SUPPORTED_LLVM.contains(&nightly.llvm_major) {
        bail!(
            "nightly rustc uses LLVM {}, which bpf-linker {BPF_LINKER_VERSION} does not support ({SUPPORTED_LLVM:?})",
            nightly.llvm_major
        );
    }
    let library = find_libllvm(&nightly.sysroot.join("lib"), nightly.llvm_major)?;
    let prefix = home
        .join("mmesh-llvm")
        .join(&nightly.commit[..12.min(nightly.commit.len())]);
    let lib = prefix.join("lib");
    std::fs::create_dir_all(&lib).with_context(|| format!("creating {}", lib.display()))?;
    // bpf-linker links against lib/libLLVM.so; at run time the loader looks
    // for the library's soname (its file name) in the rpath, lib/.
    for name in [
        "libLLVM.so".into(),
        library
            .file_name()
            .context("library has a file name")?
            .to_os_string(),
    ] {
        let link = lib.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&library, &link)
            .with_context(|| format!("linking {}", link.display()))?;
    }
    eprintln!(
        "xtask setup: building bpf-linker {BPF_LINKER_VERSION} against the nightly's LLVM {} ({}); about a minute",
        nightly.llvm_major,
        library.display()
    );
    status(
        Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--locked",
                "--force",
                "--no-default-features",
                "--features",
            ])
            .arg(format!("llvm-{}", nightly.llvm_major))
            .env("LLVM_PREFIX", &prefix),
    )?;
    status(Command::new("bpf-linker").arg("--version"))
        .context("the new bpf-linker does not run; is ~/.cargo/bin on PATH?")?;
    std::fs::write(&stamp_path, stamp)
        .with_context(|| format!("writing {}", stamp_path.display()))?;
    eprintln!("xtask setup: done");
    Ok(())
}

/// The real file of the nightly's libLLVM of `major`.
fn find_libllvm(dir: &Path, major: u32) -> anyhow::Result<PathBuf> {
    let entries = std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let meta = entry.metadata()?;
        // The soname file, e.g. libLLVM.so.22.1-rust-1.97.0-nightly; the
        // libLLVM-22-...so next to it is a tiny linker script.
        if name.starts_with(&format!("libLLVM.so.{major}")) && meta.len() > 1 << 20 {
            return Ok(entry.path());
        }
    }
    bail!(
        "no libLLVM.so.{major}* in {}: is the nightly toolchain complete? (`rustup component add rustc --toolchain nightly`)",
        dir.display()
    )
}
