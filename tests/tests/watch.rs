//! End to end: the policy file and the policy directory are watched. An
//! edit is applied without a SIGHUP, a Kubernetes `ConfigMap`'s symlink swap
//! too, a bad edit is logged and ignored, and an edit that changes nothing
//! applies nothing; checked with real UDP traffic through the real agent
//! on the host end of a veth pair.
//!
//! Needs root. One test at a time; each is bounded in packets and time,
//! and waits for the agent's answer with a deadline.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    time::Duration,
};

use mmesh_tests::netns::{
    Agent, Pace, PolicyFile, Topology, UdpSink, send_udp, serial, unique_name, uplink_run_args,
    wait_until,
};

const ALPHA4: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 77, 0, 10));
const ORDINARY4: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 77, 0, 100));
/// In the global block list of the blocking policies.
const BLOCKED4: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 77, 1, 1));
/// In alpha's own block list (in the directory's accounts file).
const ACCT4: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 77, 2, 1));
const ALPHA6: IpAddr = IpAddr::V6(Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 0x10));
const ORDINARY6: IpAddr = IpAddr::V6(Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 0x100));
const BLOCKED6: IpAddr = IpAddr::V6(Ipv6Addr::new(0xfd77, 1, 0, 0, 0, 0, 0, 1));
const ACCT6: IpAddr = IpAddr::V6(Ipv6Addr::new(0xfd77, 2, 0, 0, 0, 0, 0, 1));

const PORT: u16 = 5000;
const PACKETS: u64 = 50;
/// How long the agent may take to notice a change and apply it: the
/// debounce (0.2 s, at most 2 s), the read settling (0.1 s per file) and
/// the compile, with room for a loaded machine.
const ANSWER: Duration = Duration::from_secs(15);

/// The log line of an applied change, and of a refused one.
const APPLIED: &str = "policy files changed: policy in force";
const REFUSED: &str = "policy files changed: policy rejected";

const BLOCKING: &str = "version: blocking
global:
  block:
    - name: blk
      cidrs: [10.77.1.0/24, 'fd77:1::/64']
accounts:
  - id: alpha
    prefixes: [10.77.0.10/32, 'fd77::10/128']
";

const OPEN: &str = "version: open
accounts:
  - id: alpha
    prefixes: [10.77.0.10/32, 'fd77::10/128']
";

fn topology(tag: &str) -> Topology {
    let topo = Topology::new(tag);
    topo.add_host_addrs(&[ALPHA4, ALPHA6]);
    topo.add_remote_addrs(&[ORDINARY4, BLOCKED4, ACCT4, ORDINARY6, BLOCKED6, ACCT6]);
    topo
}

/// The agent with the enforcer's debug lines (a change that changes
/// nothing is logged only there).
fn start(topo: &Topology, extra: &[&str]) -> Agent {
    Agent::start_with_log(
        &topo.host,
        &uplink_run_args(extra),
        "info,mmesh_agent::agent=debug",
    )
}

/// Sends [`PACKETS`] datagrams from `src` and from the ordinary address of
/// its family to alpha; returns what arrived from `src` (the ordinary
/// traffic must always arrive).
fn arrivals(topo: &Topology, src: IpAddr) -> u64 {
    let (alpha, ordinary) = if src.is_ipv4() {
        (ALPHA4, ORDINARY4)
    } else {
        (ALPHA6, ORDINARY6)
    };
    let sink = UdpSink::bind(&topo.host, SocketAddr::new(alpha, PORT));
    for from in [src, ordinary] {
        let socket = topo.remote.udp_socket(SocketAddr::new(from, 0));
        let _sent = send_udp(
            &socket,
            sink.local_addr(),
            Pace {
                pps: 2000,
                packets: PACKETS,
                payload: 100,
            },
        );
    }
    let got = sink.finish(Duration::from_millis(250));
    assert_eq!(
        got.packets_from(ordinary),
        PACKETS,
        "ordinary traffic from {ordinary} always arrives"
    );
    got.packets_from(src)
}

/// What arrived from each family's address of a pair.
fn arrivals_pair(topo: &Topology, [v4, v6]: [IpAddr; 2]) -> [u64; 2] {
    [arrivals(topo, v4), arrivals(topo, v6)]
}

/// Waits for a log line containing `needle` from line `from` on, and
/// returns it.
#[track_caller]
fn wait_for_line(agent: &Agent, needle: &str, from: usize) -> String {
    let mut line = None;
    wait_until(&format!("the agent to log {needle:?}"), ANSWER, || {
        line = agent
            .log_position(needle, from)
            .map(|i| agent.logs()[i].clone());
        line.is_some()
    });
    line.expect("waited for it")
}

/// Log lines from `from` on that contain `needle`.
fn count_lines(agent: &Agent, needle: &str, from: usize) -> usize {
    agent.logs()[from..]
        .iter()
        .filter(|l| l.contains(needle))
        .count()
}

/// The `generation=N` of a log line.
fn generation(line: &str) -> u64 {
    line.split("generation=")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no generation in {line:?}"))
}

#[test]
fn a_watched_file_is_applied_on_change_and_a_bad_edit_is_ignored() {
    let _serial = serial();
    let topo = topology("watch-file");
    let policy = PolicyFile::new("watch-file", OPEN);
    let mut agent = start(&topo, &["--policy", &policy.path().display().to_string()]);
    assert_eq!(
        arrivals_pair(&topo, [BLOCKED4, BLOCKED6]),
        [PACKETS, PACKETS]
    );

    // Edited by rename (as editors and deployment tools do): applied.
    let from = agent.logs().len();
    policy.write(BLOCKING);
    let line = wait_for_line(&agent, APPLIED, from);
    assert!(line.contains("(version blocking)"), "{line}");
    assert_eq!(generation(&line), 2, "{line}");
    assert_eq!(
        arrivals_pair(&topo, [BLOCKED4, BLOCKED6]),
        [0, 0],
        "blocked at once"
    );

    // A bad edit, written in place: refused with the validation message,
    // the running policy stays.
    let from = agent.logs().len();
    std::fs::write(
        policy.path(),
        BLOCKING.replace("10.77.1.0/24", "10.77.1.0/33"),
    )
    .expect("writing the policy in place");
    let line = wait_for_line(&agent, REFUSED, from);
    assert!(
        line.contains("the running policy stays in force")
            && line.contains("10.77.1.0/33")
            && line.contains("is not a CIDR"),
        "{line}"
    );
    assert_eq!(
        arrivals_pair(&topo, [BLOCKED4, BLOCKED6]),
        [0, 0],
        "the previous policy is still enforced"
    );
    assert_eq!(count_lines(&agent, APPLIED, from), 0, "nothing applied");

    // Repaired with what is in force: nothing to apply, and said only at
    // debug level.
    let from = agent.logs().len();
    policy.write(BLOCKING);
    wait_for_line(
        &agent,
        "policy files changed: the policy is unchanged",
        from,
    );
    assert_eq!(count_lines(&agent, APPLIED, from), 0, "nothing applied");
    // SIGHUP still answers, and applies nothing either.
    let answer = agent.reload();
    assert!(
        answer.contains("unchanged: nothing to apply") && generation(&answer) == 2,
        "{answer}"
    );

    // Lifted again: generation 3, so nothing between was applied.
    let from = agent.logs().len();
    policy.write(OPEN);
    let line = wait_for_line(&agent, APPLIED, from);
    assert_eq!(generation(&line), 3, "{line}");
    assert_eq!(
        arrivals_pair(&topo, [BLOCKED4, BLOCKED6]),
        [PACKETS, PACKETS]
    );
    let status = agent.stop();
    assert!(status.success(), "the agent exited with {status}");
}

/// A directory laid out as the kubelet mounts a `ConfigMap`: each key a
/// link `name -> ..data/name`, `..data` a link to a timestamped directory
/// that an update replaces, the link swapped by rename.
struct ConfigMap {
    dir: PathBuf,
    version: u32,
}

impl ConfigMap {
    fn new(tag: &str, files: &[(&str, &str)]) -> Self {
        let dir = std::env::temp_dir().join(unique_name(tag));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("creating the mount directory");
        let mut map = Self { dir, version: 0 };
        map.update(files);
        for (name, _) in files {
            symlink(Path::new("..data").join(name), map.dir.join(name)).expect("linking a key");
        }
        map
    }

    /// What the kubelet's atomic writer does: a new timestamped directory,
    /// `..data_tmp` pointing at it renamed over `..data`, the old directory
    /// removed.
    fn update(&mut self, files: &[(&str, &str)]) {
        let old = self.stamped();
        self.version += 1;
        let new = self.stamped();
        std::fs::create_dir(self.dir.join(&new)).expect("creating the data directory");
        for (name, text) in files {
            std::fs::write(self.dir.join(&new).join(name), text).expect("writing a key");
        }
        let tmp = self.dir.join("..data_tmp");
        symlink(&new, &tmp).expect("linking ..data_tmp");
        std::fs::rename(&tmp, self.dir.join("..data")).expect("swapping ..data");
        if self.version > 1 {
            std::fs::remove_dir_all(self.dir.join(old)).expect("removing the old data");
        }
    }

    fn stamped(&self) -> String {
        format!("..2026_11_30_08_00_00.{}", self.version)
    }
}

impl Drop for ConfigMap {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Alpha, with its own block list.
const ACCOUNTS: &str = "accounts:
  - id: alpha
    prefixes: [10.77.0.10/32, 'fd77::10/128']
    block:
      - name: own
        cidrs: [10.77.2.0/24, 'fd77:2::/64']
";

/// A global block list of addresses no test sends from.
const BLOCKS_ELSEWHERE: &str = "version: one
global:
  block:
    - name: blk
      cidrs: [10.77.3.0/24, 'fd77:3::/64']
";

#[test]
fn a_policy_dir_merges_its_files_and_follows_configmap_updates() {
    let _serial = serial();
    let topo = topology("watch-dir");
    let mut map = ConfigMap::new(
        "watch-dir",
        &[
            ("accounts.yaml", ACCOUNTS),
            ("blocks.yaml", BLOCKS_ELSEWHERE),
        ],
    );
    let mut agent = start(&topo, &["--policy-dir", &map.dir.display().to_string()]);
    // Both files in force: alpha's own list (accounts.yaml) blocks, the
    // global list (blocks.yaml) does not concern this traffic.
    assert_eq!(arrivals_pair(&topo, [ACCT4, ACCT6]), [0, 0]);
    assert_eq!(
        arrivals_pair(&topo, [BLOCKED4, BLOCKED6]),
        [PACKETS, PACKETS]
    );

    // An update of one key: applied.
    let from = agent.logs().len();
    map.update(&[
        ("accounts.yaml", ACCOUNTS),
        (
            "blocks.yaml",
            &BLOCKS_ELSEWHERE
                .replace("version: one", "version: two")
                .replace("10.77.3.0/24, 'fd77:3::/64'", "10.77.1.0/24, 'fd77:1::/64'"),
        ),
    ]);
    let line = wait_for_line(&agent, APPLIED, from);
    assert!(line.contains("(version two)"), "{line}");
    assert_eq!(arrivals_pair(&topo, [BLOCKED4, BLOCKED6]), [0, 0]);
    assert_eq!(arrivals_pair(&topo, [ACCT4, ACCT6]), [0, 0]);

    // An update that gives alpha to both files: refused, naming both, and
    // the previous policy goes on.
    let from = agent.logs().len();
    map.update(&[
        ("accounts.yaml", ACCOUNTS),
        (
            "blocks.yaml",
            "version: three\naccounts:\n  - { id: alpha, prefixes: [10.77.0.99/32] }\n",
        ),
    ]);
    let line = wait_for_line(&agent, REFUSED, from);
    let accounts = map.dir.join("accounts.yaml").display().to_string();
    let blocks = map.dir.join("blocks.yaml").display().to_string();
    assert!(
        line.contains(&format!(
            "{blocks}: accounts[0].id: account id \"alpha\" is also used in {accounts}"
        )),
        "{line}"
    );
    // The same refusal is not logged again for every later event.
    std::fs::create_dir(map.dir.join("..unrelated")).expect("an event in the directory");
    assert_eq!(arrivals_pair(&topo, [BLOCKED4, BLOCKED6]), [0, 0]);
    assert_eq!(arrivals_pair(&topo, [ACCT4, ACCT6]), [0, 0]);
    wait_for_line(&agent, "policy still rejected, as before", from);
    assert_eq!(count_lines(&agent, REFUSED, from), 1);
    assert_eq!(count_lines(&agent, APPLIED, from), 0);

    let status = agent.stop();
    assert!(status.success(), "the agent exited with {status}");
}

#[test]
fn a_policy_file_in_a_configmap_or_linked_from_elsewhere_is_followed() {
    let _serial = serial();
    let topo = topology("watch-link");

    // `--policy` naming one key of a mounted ConfigMap.
    let mut map = ConfigMap::new("watch-key", &[("policy.yaml", OPEN)]);
    let key = map.dir.join("policy.yaml").display().to_string();
    let mut agent = start(&topo, &["--policy", &key]);
    assert_eq!(
        arrivals_pair(&topo, [BLOCKED4, BLOCKED6]),
        [PACKETS, PACKETS]
    );
    let from = agent.logs().len();
    map.update(&[("policy.yaml", BLOCKING)]);
    let line = wait_for_line(&agent, APPLIED, from);
    assert!(line.contains("(version blocking)"), "{line}");
    assert_eq!(arrivals_pair(&topo, [BLOCKED4, BLOCKED6]), [0, 0]);
    let status = agent.stop();
    assert!(status.success(), "the agent exited with {status}");

    // `--policy` naming a link to a file in another directory: that
    // directory is watched too, and after the link is pointed at a third
    // one, the third.
    let real = PolicyFile::new("watch-real", OPEN);
    let other = PolicyFile::new(
        "watch-other",
        &BLOCKING.replace("version: blocking", "version: other"),
    );
    let links = PolicyFile::new("watch-links", OPEN);
    let current = links.path().with_file_name("current.yaml");
    symlink(real.path(), &current).expect("linking the policy");
    let mut agent = start(&topo, &["--policy", &current.display().to_string()]);
    assert_eq!(
        arrivals_pair(&topo, [BLOCKED4, BLOCKED6]),
        [PACKETS, PACKETS]
    );

    let from = agent.logs().len();
    real.write(BLOCKING);
    let line = wait_for_line(&agent, APPLIED, from);
    assert!(line.contains("(version blocking)"), "{line}");
    assert_eq!(arrivals_pair(&topo, [BLOCKED4, BLOCKED6]), [0, 0]);

    let from = agent.logs().len();
    let aside = current.with_file_name("current.yaml.new");
    symlink(other.path(), &aside).expect("linking the other policy");
    std::fs::rename(&aside, &current).expect("swapping the link");
    let line = wait_for_line(&agent, APPLIED, from);
    assert!(line.contains("(version other)"), "{line}");

    let from = agent.logs().len();
    other.write(OPEN);
    let line = wait_for_line(&agent, APPLIED, from);
    assert!(line.contains("(version open)"), "{line}");
    assert_eq!(
        arrivals_pair(&topo, [BLOCKED4, BLOCKED6]),
        [PACKETS, PACKETS]
    );
    let status = agent.stop();
    assert!(status.success(), "the agent exited with {status}");
}
