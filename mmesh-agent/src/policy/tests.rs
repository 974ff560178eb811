use std::path::PathBuf;

use super::*;

#[test]
fn quantities() {
    assert_eq!(parse_quantity("100000"), Ok(100_000));
    assert_eq!(parse_quantity("10k"), Ok(10_000));
    assert_eq!(parse_quantity("1.5G"), Ok(1_500_000_000));
    assert_eq!(parse_quantity("2T"), Ok(2_000_000_000_000));
    assert_eq!(parse_quantity(" 7M "), Ok(7_000_000));
    assert!(parse_quantity("1.5").unwrap_err().contains("more decimals"));
    for bad in ["", "k", "-5", "10x", "1..2k", "1e6", "ten"] {
        assert!(
            parse_quantity(bad)
                .unwrap_err()
                .contains("is not a quantity"),
            "{bad}"
        );
    }
}

#[test]
fn cidrs() {
    assert_eq!(parse_cidr("10.0.0.0/8").unwrap().to_string(), "10.0.0.0/8");
    assert_eq!(parse_cidr("192.0.2.7").unwrap().to_string(), "192.0.2.7/32");
    assert_eq!(
        parse_cidr("2001:db8::1").unwrap().to_string(),
        "2001:db8::1/128"
    );
    assert!(
        parse_cidr("10.0.0.1/24")
            .unwrap_err()
            .contains("did you mean 10.0.0.0/24")
    );
    assert!(
        parse_cidr("10.0.0.0/33")
            .unwrap_err()
            .contains("is not a CIDR")
    );
    assert!(
        parse_cidr("banana")
            .unwrap_err()
            .contains("is not an IP address")
    );
}

#[test]
fn json_policies_are_read_and_checked_by_field_path() {
    let json = r#"{"global": {"block": [{"name": "x", "cidrs": ["10.0.0.0/8"]}]},
                       "accounts": [{"id": "a", "prefixes": ["10.1.0.1"], "limits": {"inbound": {"pps": 1000}}}]}"#;
    let p = Policy::parse(json, "p.json", Path::new(".")).expect("valid JSON policy");
    assert_eq!(p.accounts[0].inbound.unwrap().pps.unwrap().rate, 1000);
    // What a refused document says.
    let refused = |text: &str| {
        Policy::parse(text, "p.json", Path::new("."))
            .unwrap_err()
            .to_string()
    };
    let err = refused(r#"{"accounts": [{"id": "a", "prefixes": ["10.1.0.1/24"]}]}"#);
    assert!(
        err.contains("p.json: accounts[0].prefixes[0]: \"10.1.0.1/24\" has host bits set"),
        "{err}"
    );
    // Unknown fields are problems beside the others, named by path.
    let err = refused(
        r#"{"accounts": [{"id": "a", "colour": 1, "prefixes": ["10.0.0.1"],
                              "limits": {"inbound": {"pps": "50kk"}}}]}"#,
    );
    assert!(
        err.contains("(2 problems)")
            && err.contains("p.json: accounts[0].colour: unknown field \"colour\"")
            && err.contains("p.json: accounts[0].limits.inbound.pps: \"50kk\" is not a quantity"),
        "{err}"
    );
    // A field given twice (JSON passes both to the reader).
    let err = refused(r#"{"version": "a", "version": "b"}"#);
    assert!(
        err.contains("p.json: version: field \"version\" is given twice"),
        "{err}"
    );
    // The same in a direction's limits (read field by field into the
    // fields given), where a `null` is a field not given.
    let err = refused(
        r#"{"accounts": [{"id": "a", "prefixes": ["10.0.0.1"],
            "limits": {"inbound": {"pps": "1k", "bps": null, "pps": "2k", "colour": 1}}}]}"#,
    );
    assert!(
        err.contains("(2 problems)")
            && err.contains("accounts[0].limits.inbound.pps: field \"pps\" is given twice")
            && err.contains("accounts[0].limits.inbound.colour: unknown field \"colour\""),
        "{err}"
    );
    let p = Policy::parse(
        r#"{"accounts": [{"id": "a", "prefixes": ["10.0.0.1"],
            "limits": {"outbound": {"bps_burst": "1M", "bps": "8M", "action": "monitor", "pps": null}}}]}"#,
        "p.json",
        Path::new("."),
    )
    .expect("valid JSON policy");
    let outbound = p.accounts[0].outbound.expect("outbound limits");
    assert_eq!(
        (outbound.pps, outbound.bps, outbound.action),
        (
            None,
            Some(Rate {
                rate: 8_000_000,
                burst: 1_000_000
            }),
            Action::Monitor
        )
    );
}

#[test]
fn scalars_are_read_as_written() {
    // `1.10` is not the number 1.1, and an overflowing number is quoted
    // as written, not rounded through f64: in YAML and in JSON alike.
    let p = Policy::parse("version: 1.10\n", "t", Path::new(".")).unwrap();
    assert_eq!(p.version.as_deref(), Some("1.10"));
    let p = Policy::parse(r#"{"version": 1.10}"#, "t", Path::new(".")).unwrap();
    assert_eq!(p.version.as_deref(), Some("1.10"));
    let p = Policy::parse(r#"{"version": "a\"b"}"#, "t", Path::new(".")).unwrap();
    assert_eq!(p.version.as_deref(), Some("a\"b"));
    for text in [
        "accounts: [{id: a, prefixes: [10.0.0.1], limits: {inbound: {pps: 99999999999999999999999}}}]",
        r#"{"accounts": [{"id": "a", "prefixes": ["10.0.0.1"], "limits": {"inbound": {"pps": 99999999999999999999999}}}]}"#,
    ] {
        let err = Policy::parse(text, "t", Path::new("."))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("\"99999999999999999999999\" is too large"),
            "{err}"
        );
    }
}

/// A file of its own under the system's temporary directory.
fn scratch(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mmesh-unit-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("p.yaml");
    std::fs::write(&path, text).unwrap();
    path
}

const WHOLE: &str = "version: r1\nglobal:\n  events_per_second: 5\n  block: [{name: blk9, cidrs: [10.251.9.0/24]}]\n";

#[test]
fn a_half_written_file_is_read_again_until_it_is_whole() {
    // A writer has put down the first 40 bytes (valid YAML of an empty
    // policy) when the reader comes; it finishes during the pause
    // between the reader's two looks.
    let path = scratch("half", &WHOLE[..40]);
    assert!(Policy::parse(&WHOLE[..40], "t", Path::new(".")).is_ok());
    let limits = ReadLimits {
        settle: Duration::from_millis(100),
        ..ReadLimits::default()
    };
    let mut pauses = Vec::new();
    let policy = Policy::from_file_waiting(&path, &limits, &mut |d| {
        pauses.push(d);
        if pauses.len() == 1 {
            std::fs::write(&path, WHOLE).unwrap();
        }
    })
    .expect("the whole file is read");
    assert_eq!(
        policy.global.lists.len(),
        1,
        "the whole policy, not the half"
    );
    assert_eq!(pauses, [Duration::from_millis(100); 2]);
    std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
}

#[test]
fn a_file_that_keeps_changing_is_refused() {
    let path = scratch("changing", WHOLE);
    let limits = ReadLimits {
        attempts: 3,
        ..ReadLimits::default()
    };
    let mut n = 0;
    let err = Policy::from_file_waiting(&path, &limits, &mut |_| {
        n += 1;
        std::fs::write(&path, format!("{WHOLE}# {}\n", "x".repeat(n))).unwrap();
    })
    .unwrap_err()
    .to_string();
    assert_eq!(n, 3);
    assert!(
        err.contains("was still changing after 3 reads") && err.contains("rename it into place"),
        "{err}"
    );
    // A list file that changes counts as much as the policy file.
    let dir = path.parent().unwrap();
    std::fs::write(dir.join("list.txt"), "10.0.0.0/8\n").unwrap();
    std::fs::write(&path, "global:\n  block: [{name: l, file: list.txt}]\n").unwrap();
    let mut n = 0;
    let err = Policy::from_file_waiting(&path, &limits, &mut |_| {
        n += 1;
        std::fs::write(dir.join("list.txt"), "10.0.0.0/8\n".repeat(n + 1)).unwrap();
    })
    .unwrap_err();
    assert!(
        matches!(err, PolicyError::StillChanging { attempts: 3, .. }),
        "{err}"
    );
    // Once it stops, it is read.
    let p = Policy::from_file_waiting(&path, &limits, &mut |_| {}).unwrap();
    assert_eq!(p.global.lists[0].v4.len(), 1);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn removal_counts_what_a_new_policy_takes_away() {
    let old = Policy::parse(
        "global:\n  block: [{name: g, cidrs: [10.0.0.0/8, 192.0.2.0/24, '2001:db8::/32']}]\n\
             accounts:\n\
             - {id: a, prefixes: [10.1.0.1], block: [{name: x, cidrs: [198.51.100.0/24]}]}\n\
             - {id: b, prefixes: [10.1.0.2]}\n\
             - {id: c, prefixes: [10.1.0.3], block: [{name: y, cidrs: [203.0.113.0/24, 203.0.114.0/24]}]}\n",
        "old",
        Path::new("."),
    )
    .unwrap();
    let same = Removal::between(&old, &old);
    assert_eq!(
        same,
        Removal {
            accounts_before: 3,
            accounts_removed: 0,
            list_entries_before: 6,
            list_entries_removed: 0
        }
    );
    assert!(!same.removes_most());
    // c leaves with its two entries; g loses one; a keeps its list.
    let new = Policy::parse(
        "global:\n  block: [{name: g, cidrs: [10.0.0.0/8, '2001:db8::/32', 172.16.0.0/12]}]\n\
             accounts:\n\
             - {id: a, prefixes: [10.1.0.9], block: [{name: x, cidrs: [198.51.100.0/24]}]}\n\
             - {id: b, prefixes: [10.1.0.2]}\n",
        "new",
        Path::new("."),
    )
    .unwrap();
    let r = Removal::between(&old, &new);
    assert_eq!((r.accounts_removed, r.list_entries_removed), (1, 3));
    assert!(!r.removes_most());
    assert_eq!(
        r.to_string(),
        "removes 1 of 3 accounts and 3 of 6 list entries"
    );
    // The half-written file of the issue: an empty policy removes all.
    let empty = Policy::parse(
        "version: r1\nglobal:\n  events_per_second:",
        "e",
        Path::new("."),
    )
    .unwrap();
    let r = Removal::between(&old, &empty);
    assert!(r.removes_most(), "{r}");
    assert_eq!(
        r.to_string(),
        "removes 3 of 3 accounts and 6 of 6 list entries"
    );
}

#[test]
fn quotes_are_short_and_escaped() {
    assert_eq!(quote("10k"), "\"10k\"");
    let long = "x".repeat(10_000);
    let q = quote(&long);
    assert!(q.len() < 70 && q.ends_with("… (10000 characters)"), "{q}");
    assert_eq!(quote("a\nb\u{1b}[2J"), "\"a\\nb\\u{1b}[2J\"");
    assert_eq!(escape_controls("plain"), "plain");
    assert_eq!(escape_controls("r1\nINFO forged"), "r1\\nINFO forged");
    // A deserializer's message about a megabyte-long line stays short.
    let text = format!("{{\"accounts\": \"{}\"}}", "y".repeat(1 << 20));
    let err = Policy::parse(&text, "t.json", Path::new("."))
        .unwrap_err()
        .to_string();
    assert!(err.len() < 400, "{} bytes: {}", err.len(), &err[..400]);
}

#[test]
fn large_yaml_policies_are_not_refused() {
    // serde-saphyr's default budget stops near 10,000 accounts of this shape.
    use std::fmt::Write as _;
    let mut y = String::from("accounts:\n");
    for i in 0..12_000u32 {
        let _ = write!(
            y,
            "  - id: a{i}\n    prefixes: [10.{}.{}.1, 'fd00::{i:x}']\n    limits:\n      inbound: {{ pps: 1k, bps: 1M }}\n",
            i >> 8,
            i & 255
        );
    }
    let p = Policy::parse(&y, "big.yaml", Path::new(".")).expect("a 12,000-account policy is read");
    assert_eq!(p.accounts.len(), 12_000);
}

#[test]
fn empty_fields_read_as_empty() {
    let p = Policy::parse("global:\n  block:\naccounts:\n", "t", Path::new(".")).expect("valid");
    assert!(p.accounts.is_empty() && p.global.lists.is_empty());
}

#[test]
fn embedded_default_is_valid() {
    let policy = Policy::embedded_default().expect("the embedded default policy validates");
    assert!(
        policy.accounts.is_empty(),
        "the default attributes nothing: it cannot disturb customer traffic"
    );
    assert!(
        policy
            .global
            .lists
            .iter()
            .all(|l| l.kind != ListKind::Block(Action::Drop)),
        "the default never drops by list"
    );
}

/// Past [`validate::PARALLEL_ACCOUNTS`] the accounts are validated on
/// several threads: the problems come out as one thread finds them, in the
/// accounts' order, also those between accounts of different threads.
#[test]
fn problems_of_many_accounts_come_in_their_order() {
    let n: usize = 5000;
    let accounts: Vec<String> = (0..n)
        .map(|i| {
            let (id, prefixes, mode) = match i {
                2600 => ("acct-2600".to_owned(), "[]".to_owned(), ""),
                4000 => (
                    "acct-10".to_owned(),
                    "[\"10.15.160.1\"]".to_owned(),
                    ", \"mode\": \"loud\"",
                ),
                4999 => ("acct-4999".to_owned(), "[\"10.0.3.1\"]".to_owned(), ""),
                _ => (
                    format!("acct-{i}"),
                    format!("[\"10.{}.{}.1\"]", i / 256, i % 256),
                    "",
                ),
            };
            format!("{{\"id\": \"{id}\", \"prefixes\": {prefixes}{mode}}}")
        })
        .collect();
    let text = format!("{{\"accounts\": [{}]}}", accounts.join(",\n"));
    assert!(n >= validate::PARALLEL_ACCOUNTS);
    let Err(PolicyError::Invalid { issues, .. }) = Policy::parse(&text, "p.json", Path::new("."))
    else {
        panic!("the policy has problems");
    };
    let paths: Vec<&str> = issues.iter().map(|i| i.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "accounts[2600].prefixes",
            "accounts[4000].id",
            "accounts[4000].mode",
            "accounts[4999].prefixes",
        ],
        "{issues:#?}"
    );
    assert!(
        issues[1].message.contains("already used by accounts[10]"),
        "{issues:#?}"
    );
    assert!(issues[3].message.contains("\"acct-3\""), "{issues:#?}");
}

/// A prefix listed twice is named at its second place, in a short list
/// (scanned) as in a long one (a set); a bad rate or burst at its field.
#[test]
fn repeated_prefixes_and_bad_rates_are_named_where_they_are() {
    let long: Vec<String> = (0..20).map(|k| format!("\"10.1.0.{k}\"")).collect();
    let text = format!(
        r#"{{"accounts": [
            {{"id": "a", "prefixes": ["10.0.0.1", "fd00::1", "10.0.0.1/32"],
              "limits": {{"inbound": {{"pps": "0"}}, "outbound": {{"pps": "1k", "pps_burst": "ten"}}}}}},
            {{"id": "b", "prefixes": [{}, "10.1.0.7"]}}
        ]}}"#,
        long.join(", ")
    );
    let Err(PolicyError::Invalid { issues, .. }) = Policy::parse(&text, "p.json", Path::new("."))
    else {
        panic!("the policy has problems");
    };
    let found: Vec<(&str, &str)> = issues
        .iter()
        .map(|i| (i.path.as_str(), i.message.as_str()))
        .collect();
    assert_eq!(found.len(), 4, "{found:#?}");
    assert_eq!(found[0].0, "accounts[0].prefixes[2]");
    assert!(found[0].1.contains("listed twice"), "{found:#?}");
    assert_eq!(found[1].0, "accounts[0].limits.inbound.pps");
    assert!(found[1].1.contains("out of range"), "{found:#?}");
    assert_eq!(found[2].0, "accounts[0].limits.outbound.pps_burst");
    assert_eq!(found[3].0, "accounts[1].prefixes[20]");
    assert!(found[3].1.contains("listed twice"), "{found:#?}");
}
