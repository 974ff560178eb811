//! Every policy under tests/policies: the good ones validate and compile,
//! each bad one fails with the messages its `# expect:` lines name and
//! without the text its `# never:` lines name. The
//! complete example of the README (examples/policy.yaml) is one of the good
//! ones, and the README must show it as it is.

use std::path::{Path, PathBuf};

use mmesh_agent::{
    compile::{Capacity, compile},
    policy::{DEFAULT_MAX_POLICY_BYTES, Policy, ReadLimits},
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

/// A directory of its own under the system's temporary directory, removed
/// when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("mmesh-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path; mkfifo touches nothing else.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
}

/// Runs `f` on a thread of its own and fails if it does not return within
/// seconds: a reader blocked on a FIFO would otherwise hang the test run.
fn within_seconds<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(std::time::Duration::from_secs(20))
        .expect("the policy reader blocked")
}

#[test]
fn fifos_are_refused_without_blocking() {
    let dir = Scratch::new("fifo");
    let fifo = dir.0.join("feed");
    mkfifo(&fifo);
    let policy = dir.write(
        "p.yaml",
        "global:\n  block:\n    - { name: feed, file: feed }\n",
    );
    let err = within_seconds(move || Policy::from_file(&policy).unwrap_err().to_string());
    assert!(
        err.contains("global.block[0].file: cannot read list file")
            && err.contains("it is a FIFO (named pipe), not a regular file"),
        "{err}"
    );
    // The policy file itself.
    let err = within_seconds(move || Policy::from_file(&fifo).unwrap_err().to_string());
    assert!(
        err.contains("cannot read policy file") && err.contains("it is a FIFO (named pipe)"),
        "{err}"
    );
    let err = Policy::from_file(&dir.0).unwrap_err().to_string();
    assert!(err.contains("it is a directory"), "{err}");
}

#[test]
fn bytes_read_are_bounded_and_the_option_named() {
    let dir = Scratch::new("bytes");
    let list: String = (0..1000u32)
        .map(|i| std::net::Ipv4Addr::from(0x0a00_0000 + i).to_string() + "\n")
        .collect();
    dir.write("list.txt", &list);
    let policy = dir.write(
        "p.yaml",
        "global:\n  block:\n    - { name: feed, file: list.txt }\n",
    );
    let fits = ReadLimits {
        max_bytes: 20_000,
        ..ReadLimits::default()
    };
    let p = Policy::from_file_with(&policy, &fits).expect("20,000 bytes are enough");
    assert_eq!(p.global.lists[0].v4.len(), 1000);

    // The policy file and its list file together are over the limit.
    let tight = ReadLimits {
        max_bytes: 5000,
        ..ReadLimits::default()
    };
    let err = Policy::from_file_with(&policy, &tight)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("global.block[0].file: cannot read list file")
            && err.contains("it is larger than the 4946 bytes left of --max-policy-bytes 5000")
            && err.contains("raise --max-policy-bytes"),
        "{err}"
    );
    // The policy file alone.
    let small = ReadLimits {
        max_bytes: 10,
        ..ReadLimits::default()
    };
    let err = Policy::from_file_with(&policy, &small)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("cannot read policy file")
            && err.contains("larger than the 10 bytes left of --max-policy-bytes 10"),
        "{err}"
    );
}

/// Files of a MiB and more are read into memory of their own (returned
/// when the text is dropped): they are read whole, checked to be text, and
/// bounded like the others.
#[test]
fn large_files_are_read_whole_and_checked_as_text() {
    let dir = Scratch::new("large");
    let count = 100_000u32;
    let list: String = (0..count)
        .map(|i| std::net::Ipv4Addr::from(0x0a00_0000 + i).to_string() + "\n")
        .collect();
    assert!(list.len() > 1 << 20, "{} bytes", list.len());
    dir.write("list.txt", &list);
    let policy = dir.write(
        "p.yaml",
        "global:\n  block:\n    - { name: feed, file: list.txt }\n",
    );
    let p = Policy::from_file(&policy).expect("a large list file");
    assert_eq!(p.global.lists[0].v4.len(), count as usize);
    assert_eq!(
        p.global.lists[0].v4.last().map(ToString::to_string),
        Some("10.1.134.159/32".to_owned()),
        "read to its last line"
    );

    // A large policy file, JSON, its last account past the first MiB.
    let accounts: Vec<String> = (0..30_000u32)
        .map(|i| {
            format!(
                r#"{{"id": "a{i}", "prefixes": ["{}"]}}"#,
                std::net::Ipv4Addr::from(0x0a00_0000 + i)
            )
        })
        .collect();
    let json = format!(r#"{{"accounts": [{}]}}"#, accounts.join(",\n"));
    assert!(json.len() > 1 << 20, "{} bytes", json.len());
    let big = dir.write("big.json", &json);
    let p = Policy::from_file(&big).expect("a large policy file");
    assert_eq!(p.accounts.last().map(|a| a.id.as_str()), Some("a29999"));

    // Not text, one byte from its end.
    let mut bytes = list.into_bytes();
    let at = bytes.len() - 2;
    bytes[at] = 0xff;
    std::fs::write(dir.0.join("list.txt"), bytes).unwrap();
    let err = Policy::from_file(&policy).unwrap_err().to_string();
    assert!(
        err.contains("global.block[0].file: cannot read list file") && err.contains("not UTF-8"),
        "{err}"
    );
    // Over the budget.
    let tight = ReadLimits {
        max_bytes: 1 << 20,
        ..ReadLimits::default()
    };
    let err = Policy::from_file_with(&big, &tight)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("larger than the 1048576 bytes left of --max-policy-bytes 1048576"),
        "{err}"
    );
}

#[test]
fn counts_are_checked_against_capacity_while_reading() {
    // JSON, as a generator would write it: 1,000 accounts against room for 10.
    let accounts: Vec<String> = (0..1000)
        .map(|i| {
            format!(
                r#"{{"id": "a{i}", "prefixes": ["10.{}.{}.1", "fd00::{i:x}"]}}"#,
                i / 256,
                i % 256
            )
        })
        .collect();
    let text = format!(r#"{{"accounts": [{}]}}"#, accounts.join(","));
    let few_accounts = Capacity {
        accounts: 10,
        ..Capacity::default()
    };
    let limits = ReadLimits::new(DEFAULT_MAX_POLICY_BYTES, &few_accounts);
    let err = Policy::parse_with(&text, "big.json", Path::new("."), &limits)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("(1 problem)")
            && err.contains(
                "big.json: accounts: 1000 accounts, more than map accounts holds (--max-accounts 10): raise --max-accounts to 1000 or more (only the first 10 were checked)"
            ),
        "{err}"
    );
    // Room for the accounts, not for their prefixes: reading stops keeping
    // accounts once their prefixes are over twice the room of one family.
    let few_prefixes = Capacity {
        account_prefixes: 8,
        ..Capacity::default()
    };
    let limits = ReadLimits::new(DEFAULT_MAX_POLICY_BYTES, &few_prefixes);
    let err = Policy::parse_with(&text, "big.json", Path::new("."), &limits)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("(2 problems)")
            && err.contains(
                "big.json: accounts[].prefixes: more IPv4 account prefixes than map account_prefixes_v4 holds (--max-account-prefixes 8; 9 in the first 9 accounts, the others were not checked)"
            )
            && err.contains("more IPv6 account prefixes than"),
        "{err}"
    );
    // Within the accounts that were read, the count is exact.
    let text = format!(r#"{{"accounts": [{}]}}"#, accounts[..9].join(","));
    let err = Policy::parse_with(&text, "nine.json", Path::new("."), &limits).unwrap_err();
    assert_eq!(err.full_map(), Some("account_prefixes_v4"));
    let err = err.to_string();
    assert!(
        err.contains("9 IPv4 account prefixes, more than map account_prefixes_v4 holds (--max-account-prefixes 8): raise --max-account-prefixes to 9 or more"),
        "{err}"
    );
    // Within capacity, nothing is said.
    let text = format!(r#"{{"accounts": [{}]}}"#, accounts.join(","));
    let roomy = ReadLimits::new(DEFAULT_MAX_POLICY_BYTES, &Capacity::default());
    let p = Policy::parse_with(&text, "big.json", Path::new("."), &roomy).unwrap();
    assert_eq!(p.accounts.len(), 1000);
}

#[test]
fn policies_from_a_control_plane_cannot_name_files() {
    let limits = ReadLimits {
        list_files: false,
        ..ReadLimits::default()
    };
    let err = Policy::parse_with(
        "global:\n  block:\n    - { name: x, file: /etc/passwd }\n",
        "remote",
        Path::new("."),
        &limits,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("global.block[0].file: this policy cannot name local files"),
        "{err}"
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
