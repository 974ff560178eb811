//! Every policy under tests/policies: the good ones validate and compile,
//! each bad one fails with the messages its `# expect:` lines name and
//! without the text its `# never:` lines name. The
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
        let never: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# never: "))
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
        for n in never.iter().filter(|n| err.contains(**n)) {
            failures.push(format!("{}: {n:?} must not be in:\n{err}", file.display()));
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
