//! How many instructions the verifier processed for each program of the
//! datapath (`verified_insns`, Linux 5.16 and later): loads it, prints the
//! figure per program, and unloads it. How docs/design.md measured what
//! the programs cost the verifier on 6.18 and, in the guest, on 6.1:
//!
//! ```sh
//! cargo run -p mmesh-tests --example verified   # as root
//! ```
//!
//! On a verifier rejection it prints the agent's error, which ends with the
//! verifier's own summary ("processed N insns ...").

use std::{collections::HashSet, process::ExitCode, time::Instant};

use aya::programs::loaded_programs;
use mmesh_agent::{compile::Capacity, datapath::Datapath};

fn main() -> ExitCode {
    // The sizes of the kernel tests (tests/tests/datapath.rs): map sizes do
    // not change what the verifier walks.
    let capacity = Capacity {
        accounts: 64,
        account_prefixes: 256,
        list_prefixes: 4096,
        counters: 4096,
        event_buffer: 256 * 1024,
        stride_chunks: 64,
        flow_cache: 1024,
    };
    let started = Instant::now();
    let datapath = match Datapath::load(capacity) {
        Ok(datapath) => datapath,
        Err(e) => {
            eprintln!("loading failed after {:.1?}: {e}", started.elapsed());
            return ExitCode::FAILURE;
        }
    };
    println!("loaded in {:.1?}", started.elapsed());
    let ours = own_programs();
    for info in loaded_programs().flatten() {
        if !ours.contains(&info.id()) {
            continue;
        }
        let insns = info
            .verified_instruction_count()
            .map_or_else(|| "unknown".to_owned(), |n| n.to_string());
        println!(
            "{}: {insns} instructions processed",
            info.name_as_str().unwrap_or("?")
        );
    }
    drop(datapath);
    ExitCode::SUCCESS
}

/// The ids of the programs this process holds a file descriptor of (other
/// processes may load programs of the same names meanwhile, e.g. tests).
fn own_programs() -> HashSet<u32> {
    std::fs::read_dir("/proc/self/fdinfo")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| std::fs::read_to_string(entry.path()).ok())
        .filter_map(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("prog_id:"))
                .and_then(|id| id.trim().parse().ok())
        })
        .collect()
}
