//! Builds the eBPF object (mmesh-ebpf) with the nightly toolchain and
//! bpf-linker, through aya-build. `AYA_BUILD_SKIP=1` skips it, so that
//! `cargo check` and `cargo clippy` work on a machine without bpf-linker.
//!
//! Also compiles the control-plane contract (`proto/`) with protox, so that
//! no `protoc` is needed.

use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    proto()?;
    let cargo_metadata::Metadata { packages, .. } = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = packages
        .into_iter()
        .find(|package| package.name.as_str() == "mmesh-ebpf")
        .ok_or_else(|| anyhow!("the mmesh-ebpf package is not in the workspace"))?;
    let root = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("{} has no parent directory", ebpf.manifest_path))?;
    aya_build::build_ebpf(
        [Package {
            name: ebpf.name.as_str(),
            root_dir: root.as_str(),
            ..Default::default()
        }],
        Toolchain::default(),
    )?;
    // With AYA_BUILD_SKIP nothing was built: leave an empty object so the
    // agent compiles; loading it then fails with a clear message.
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    for name in ["mmesh", "mmesh-bench"] {
        let object = out.join(name);
        if !object.exists() {
            std::fs::write(&object, [])?;
        }
    }
    Ok(())
}

/// Generates the messages and the client and server of `proto/mmesh/v1`.
fn proto() -> anyhow::Result<()> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../proto");
    let file = dir.join("mmesh/v1/control.proto");
    println!("cargo:rerun-if-changed={}", file.display());
    let descriptors = protox::compile([&file], [&dir]).context("compiling proto/")?;
    tonic_prost_build::configure()
        .compile_fds(descriptors)
        .context("generating code for proto/")?;
    Ok(())
}
