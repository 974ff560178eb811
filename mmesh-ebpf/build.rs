//! Building this crate depends on the `bpf-linker` binary, which cargo does not
//! know about: rebuild whenever the one on `PATH` changes (aya-template).

fn main() {
    match which::which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(err) => println!("cargo:warning=bpf-linker not found ({err}): run `cargo xtask setup`"),
    }
}
