//! `cargo xtask bench` runs this: see `mmesh_tests::bench`.

fn main() -> std::process::ExitCode {
    mmesh_tests::bench::main()
}
