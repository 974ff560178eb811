//! `cargo xtask bench` runs this: see `mmesh_tests::bench`.

/// The agent's allocator (mmesh-agent/src/main.rs), so that the policy path
/// is measured as the agent runs it.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    mmesh_tests::bench::main()
}
