//! Every policy under tests/policies: the good ones validate and compile,
//! each bad one fails with the messages its `# expect:` lines name. The
//! complete example of the README (examples/policy.yaml) is one of the good
//! ones, and the README must show it as it is.

use std::path::{Path, PathBuf};

use mmesh_agent::{
    compile::{Capacity, compile},
    policy::Policy,
};

fn files(dir: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/policies")
        .join(dir);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no policies in {}", dir.display());
    files
}

fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/policy.yaml")
}

#[test]
fn good_policies_validate_and_compile() {
    for file in files("good").into_iter().chain([example()]) {
        let policy = Policy::from_file(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        compile(&policy, None, &Capacity::default())
            .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    }
}

#[test]
fn bad_policies_fail_with_their_expected_messages() {
    let mut failures = Vec::new();
    for file in files("bad") {
        let text = std::fs::read_to_string(&file).unwrap();
        let expected: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# expect: "))
            .collect();
        assert!(
            !expected.is_empty(),
            "{} has no `# expect:` line",
            file.display()
        );
        let err = match Policy::from_file(&file) {
            Ok(_) => {
                failures.push(format!("{} was accepted", file.display()));
                continue;
            }
            Err(e) => e.to_string(),
        };
        if !err.contains(&file.display().to_string()) {
            failures.push(format!(
                "{}: the message does not name the file:\n{err}",
                file.display()
            ));
        }
        for e in expected.iter().filter(|e| !err.contains(**e)) {
            failures.push(format!("{}: expected {e:?} in:\n{err}", file.display()));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn the_example_is_rich_and_the_readme_shows_it_verbatim() {
    let policy = Policy::from_file(&example()).unwrap();
    assert_eq!(policy.accounts.len(), 2);
    // The list file was read relative to the policy file.
    let forbidden = &policy.global.lists[0];
    assert!(
        forbidden
            .v4
            .iter()
            .any(|n| n.to_string() == "192.0.2.128/25")
    );
    assert!(
        forbidden
            .v6
            .iter()
            .any(|n| n.to_string() == "2001:db8:dead::/48")
    );
    // globex has no limits of its own: the defaults apply, in monitor mode.
    let globex = &policy.accounts[1];
    assert_eq!(globex.outbound.unwrap().pps.unwrap().rate, 50_000);
    assert_eq!(
        globex.outbound.unwrap().action,
        mmesh_agent::policy::Action::Monitor
    );

    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
            .unwrap();
    let example = std::fs::read_to_string(example()).unwrap();
    assert!(
        readme.contains(&example),
        "README.md must contain examples/policy.yaml verbatim"
    );
}

/// A rate given without a burst gets half a second of itself, at least
/// twenty full-size frames (or packets): what TCP needs to recover from a
/// loss burst without losing the time of a retransmission timeout.
#[test]
fn default_bursts_hold_half_a_second_with_a_floor() {
    let policy = Policy::parse(
        "accounts:
  - id: fast
    prefixes: [10.0.0.1/32]
    limits:
      inbound: { pps: 10k, bps: 100M }
      outbound: { pps: 10, bps: 100k, bps_burst: 8k }
",
        "test",
        Path::new("."),
    )
    .expect("a valid policy");
    let account = &policy.accounts[0];
    let inbound = account.inbound.as_ref().expect("inbound limits");
    let outbound = account.outbound.as_ref().expect("outbound limits");
    let burst = |r: Option<&mmesh_agent::policy::Rate>| r.expect("a rate").burst;
    assert_eq!(burst(inbound.pps.as_ref()), 5_000);
    assert_eq!(burst(inbound.bps.as_ref()), 50_000_000);
    // Below the floor: 20 packets, 20 frames of 1514 bytes.
    assert_eq!(burst(outbound.pps.as_ref()), 20);
    // Given explicitly: kept.
    assert_eq!(burst(outbound.bps.as_ref()), 8_000);
    assert_eq!(
        mmesh_agent::policy::default_burst(1_000_000, 0),
        500_000,
        "1 Mbit/s: half a second is above the floor"
    );
    assert_eq!(
        mmesh_agent::policy::default_burst(100_000, 20 * 1514 * 8),
        20 * 1514 * 8
    );
}
