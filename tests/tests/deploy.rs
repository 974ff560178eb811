//! The deployment files under `deploy/`, checked offline.
//!
//! - The Kustomize layouts (the base and the example overlay) are rendered
//!   with `kubectl kustomize` and every object is validated against the
//!   Kubernetes schemas of the oldest and newest versions that
//!   `kubernetes-validate` (`PyPI`, installed on first use into a virtualenv
//!   under `~/.cache/mmesh/`) carries.
//! - The rendered `DaemonSet` is checked against what the agent needs: the
//!   capabilities the agent keeps ([`caps::KEEP`]), probes that reach the
//!   address and paths the agent serves, the host's bpffs, state and
//!   runtime directories behind the paths the agent uses, and the policy
//!   `ConfigMap` mounted as the directory it watches (and valid).
//! - The systemd unit passes `systemd-analyze verify`, grants the same
//!   capabilities, and runs the agent, sandboxing and all, under the
//!   machine's systemd booted as PID 1 of namespaces of its own.
//! - The agent runs, as uid 0, with only the capabilities the `DaemonSet`
//!   adds (the bounding set cut down with `setpriv`, no new privileges, as a
//!   container runtime does) and the `DaemonSet`'s own arguments: it attaches,
//!   answers its probes and drops a blocked source; without any one of the
//!   three it stops at once and names the capability missing.
//!
//! Those that run the agent need root (network namespaces, eBPF); the
//! manifest tests need `kubectl` (with its built-in kustomize) on the PATH.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
    time::Duration,
};

use mmesh_agent::caps;
use mmesh_tests::{
    controlplane::TempDir,
    netns::{
        AGENT_READY_LINE, AGENT_STOP_TIMEOUT, Agent, HOST_IF, NetNs, PinDir, Topology,
        agent_binary, run, run_agent_to_exit_through, serial,
    },
    scrape,
};
use serde_json::Value;

/// The kubernetes-validate release installed: the schemas of Kubernetes
/// 1.25 to 1.37.
const KUBERNETES_VALIDATE: &str = "1.37.0";
/// The Kubernetes versions whose schemas every object must pass.
const SCHEMA_VERSIONS: [&str; 2] = ["1.25.0", "1.37.0"];
/// The Kustomize layouts: the base and each overlay.
const LAYOUTS: [&str; 2] = ["deploy/base", "deploy/overlays/example"];
/// The systemd unit.
const UNIT: &str = "deploy/systemd/mmesh-agent.service";

/// The agent's defaults (mmesh-agent/src/main.rs), for options the
/// manifests leave out.
const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9464";
const DEFAULT_STATE_DIR: &str = "/var/lib/mmesh";
/// The host path of the pins: what `mmesh-agent detach` on the node uses.
const HOST_PIN_DIR: &str = mmesh_common::maps::pins::DEFAULT_DIR;
/// The runtime directory of the admin socket, on the host.
const HOST_RUNTIME_DIR: &str = "/run/mmesh";

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate is inside the workspace")
        .to_owned()
}

// ---------------------------------------------------------------------------
// Tools

/// `kubectl kustomize LAYOUT`: the rendered manifests (YAML).
fn render(layout: &str) -> String {
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(workspace().join(layout))
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run kubectl ({e}): the deployment tests render the manifests with `kubectl kustomize` (kubectl 1.27 or newer, kustomize v5)"
            )
        });
    assert!(
        out.status.success(),
        "kubectl kustomize {layout} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("kubectl prints UTF-8")
}

/// The objects of rendered manifests.
fn objects(yaml: &str) -> Vec<Value> {
    serde_saphyr::from_multiple(yaml).unwrap_or_else(|e| panic!("reading the rendered YAML: {e}"))
}

/// The `kubernetes-validate` command, installed into a virtualenv under
/// `~/.cache/mmesh/` when it is not there in [`KUBERNETES_VALIDATE`]'s
/// version (once per test binary).
fn kubernetes_validate() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let cache = std::env::var_os("XDG_CACHE_HOME").map_or_else(
            || {
                PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
                    .join(".cache")
            },
            PathBuf::from,
        );
        let venv = cache.join("mmesh").join("kubernetes-validate");
        let bin = venv.join("bin").join("kubernetes-validate");
        let current = Command::new(&bin)
            .arg("--version")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == KUBERNETES_VALIDATE);
        if !current {
            eprintln!(
                "deploy: installing kubernetes-validate {KUBERNETES_VALIDATE} into {}",
                venv.display()
            );
            let _ = run(Command::new("python3").arg("-m").arg("venv").arg(&venv));
            let _ = run(Command::new(venv.join("bin").join("pip"))
                .args(["install", "--quiet"])
                .arg(format!("kubernetes-validate=={KUBERNETES_VALIDATE}")));
        }
        bin
    })
}

// ---------------------------------------------------------------------------
// Reading a DaemonSet

/// The one object of `kind` in `objects`.
#[track_caller]
fn only<'a>(objects: &'a [Value], kind: &str) -> &'a Value {
    let found: Vec<&Value> = objects.iter().filter(|o| o["kind"] == kind).collect();
    assert_eq!(found.len(), 1, "one {kind} in the manifests");
    found[0]
}

/// The object of `kind` named `name`.
#[track_caller]
fn named<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in the manifests"))
}

/// The agent's container and the pod spec around it.
struct Pod<'a> {
    spec: &'a Value,
    container: &'a Value,
}

impl<'a> Pod<'a> {
    fn of(daemonset: &'a Value) -> Self {
        let spec = &daemonset["spec"]["template"]["spec"];
        let container = spec["containers"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["name"] == "mmesh-agent"))
            .expect("a container named mmesh-agent");
        Self { spec, container }
    }

    fn args(&self) -> Vec<&'a str> {
        self.container["args"]
            .as_array()
            .expect("the container has args")
            .iter()
            .map(|a| a.as_str().expect("args are strings"))
            .collect()
    }

    /// The value of `--name` (`--name=V` or `--name V`), else of the
    /// environment variable the agent reads for it.
    fn option(&self, name: &str, env: Option<&str>) -> Option<String> {
        let args = self.args();
        let flag = format!("--{name}");
        let from_args = args.iter().enumerate().find_map(|(i, a)| {
            if let Some(v) = a.strip_prefix(&format!("{flag}=")) {
                Some(v.to_owned())
            } else if *a == flag {
                args.get(i + 1).map(|v| (*v).to_owned())
            } else {
                None
            }
        });
        from_args.or_else(|| env.and_then(|e| self.env(e)))
    }

    fn env(&self, name: &str) -> Option<String> {
        self.container["env"]
            .as_array()?
            .iter()
            .find(|e| e["name"] == name)
            .and_then(|e| e["value"].as_str().map(str::to_owned))
    }

    fn volume(&self, name: &str) -> &'a Value {
        self.spec["volumes"]
            .as_array()
            .and_then(|v| v.iter().find(|v| v["name"] == name))
            .unwrap_or_else(|| panic!("no volume {name}"))
    }

    /// The mount whose path holds `path` (the deepest one) and the rest of
    /// `path` below it.
    fn mount_of(&self, path: &str) -> Option<(&'a Value, PathBuf)> {
        self.container["volumeMounts"]
            .as_array()?
            .iter()
            .filter_map(|m| {
                let at = Path::new(m["mountPath"].as_str()?);
                let rest = Path::new(path).strip_prefix(at).ok()?;
                Some((m, at.components().count(), rest.to_owned()))
            })
            .max_by_key(|(_, depth, _)| *depth)
            .map(|(m, _, rest)| (m, rest))
    }

    /// The host path behind `path` in the container, and whether the
    /// container may write there; panics unless a hostPath volume holds it.
    #[track_caller]
    fn host_path(&self, path: &str) -> (PathBuf, bool) {
        let (mount, rest) = self
            .mount_of(path)
            .unwrap_or_else(|| panic!("nothing is mounted at {path}"));
        assert!(
            mount["subPath"].is_null(),
            "{path}: no subPath mount (the kubelet never updates one)"
        );
        let volume = self.volume(mount["name"].as_str().expect("a mount names its volume"));
        let host = volume["hostPath"]["path"]
            .as_str()
            .unwrap_or_else(|| panic!("{path} is not on a hostPath volume: {volume}"));
        (Path::new(host).join(rest), mount["readOnly"] != true)
    }
}

/// What a probe asks: host (absent: the pod's IP), port and path.
fn probe(container: &Value, which: &str) -> (Option<String>, Value, String) {
    let get = &container[which]["httpGet"];
    assert!(get.is_object(), "{which} is an HTTP GET");
    (
        get["host"].as_str().map(str::to_owned),
        get["port"].clone(),
        get["path"].as_str().unwrap_or_default().to_owned(),
    )
}

/// The capability names the agent keeps, as Kubernetes and systemd write
/// them.
fn kept() -> (BTreeSet<String>, BTreeSet<String>) {
    let systemd: BTreeSet<String> = caps::KEEP.iter().map(|(_, n)| (*n).to_owned()).collect();
    let kubernetes = systemd
        .iter()
        .map(|n| n.trim_start_matches("CAP_").to_owned())
        .collect();
    (kubernetes, systemd)
}

fn strings(v: &Value) -> BTreeSet<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------
// The manifests

/// Every layout renders, and every object it renders passes the schemas
/// of the oldest and the newest Kubernetes versions checked, strictly (no
/// field the API does not know).
#[test]
fn every_layout_renders_to_objects_the_kubernetes_schemas_accept() {
    let validate = kubernetes_validate();
    let dir = TempDir::new("deploy-render");
    for layout in LAYOUTS {
        let yaml = render(layout);
        let kinds: BTreeSet<String> = objects(&yaml)
            .iter()
            .map(|o| o["kind"].as_str().unwrap_or_default().to_owned())
            .collect();
        assert_eq!(
            kinds,
            ["ConfigMap", "DaemonSet", "Namespace", "ServiceAccount"]
                .map(String::from)
                .into(),
            "{layout}"
        );
        let file = dir
            .path()
            .join(format!("{}.yaml", layout.replace('/', "_")));
        std::fs::write(&file, &yaml).expect("writing the rendered manifests");
        for version in SCHEMA_VERSIONS {
            let out = Command::new(validate)
                .args(["--strict", "--kubernetes-version", version])
                .arg(&file)
                .output()
                .expect("running kubernetes-validate");
            let report = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success(),
                "{layout} against Kubernetes {version}:\n{report}{}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert_eq!(
                report.matches(" passed for resource ").count(),
                kinds.len(),
                "{layout} against Kubernetes {version}: every object passed:\n{report}"
            );
        }
    }
}

/// The schemas are no formality: a field of the wrong type and a field the
/// API does not know are refused.
#[test]
fn kubernetes_validate_refuses_what_the_api_would() {
    let validate = kubernetes_validate();
    let dir = TempDir::new("deploy-bad");
    let good = render("deploy/base");
    for (what, bad) in [
        (
            "a string for an integer",
            good.replacen("failureThreshold: 150", "failureThreshold: \"150\"", 1),
        ),
        (
            "an unknown field",
            good.replacen(
                "hostNetwork: true",
                "hostNetwork: true\n      hostNetworks: true",
                1,
            ),
        ),
    ] {
        assert_ne!(bad, good, "{what}: the replacement applies");
        let file = dir.path().join("bad.yaml");
        std::fs::write(&file, &bad).expect("writing the manifests");
        let out = Command::new(validate)
            .args(["--strict", "--kubernetes-version", SCHEMA_VERSIONS[1]])
            .arg(&file)
            .output()
            .expect("running kubernetes-validate");
        assert!(!out.status.success(), "{what} is refused");
    }
}

/// What the agent needs, in every layout: the host's network, critical
/// priority, every taint tolerated, one node at a time; exactly the
/// capabilities the agent keeps and nothing privileged; probes on the
/// address and paths it serves; the pins, the state and the admin socket
/// on the host; the policy as a watched directory of valid files.
#[test]
fn the_daemonset_gives_the_agent_what_it_needs() {
    for layout in LAYOUTS {
        let objects = objects(&render(layout));
        let daemonset = only(&objects, "DaemonSet");
        let pod = Pod::of(daemonset);
        check_arguments(layout, &pod);
        check_scheduling(layout, &objects, daemonset, &pod);
        check_capabilities(layout, &pod);
        check_probes(layout, &pod);
        check_host_paths(layout, &pod);
        check_policy(layout, &objects, &pod);
        check_credentials(layout, &pod);
    }
}

/// The agent understands the container's arguments: every option exists
/// and every value parses (clap reads them in order and stops at the final
/// `--help` only when all before it were good).
fn check_arguments(layout: &str, pod: &Pod) {
    let out = Command::new(agent_binary())
        .args(pod.args())
        .arg("--help")
        .output()
        .expect("running mmesh-agent");
    assert!(
        out.status.success(),
        "{layout}: mmesh-agent does not accept {:?}:\n{}",
        pod.args(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Scheduling: the host network, critical priority, every taint, one node
/// at a time, time to stop.
fn check_scheduling(layout: &str, objects: &[Value], daemonset: &Value, pod: &Pod) {
    let spec = pod.spec;
    let at = |what: &str| format!("{layout}: {what}");
    assert_eq!(spec["hostNetwork"], true, "{}", at("hostNetwork"));
    assert_eq!(
        spec["priorityClassName"],
        "system-node-critical",
        "{}",
        at("priority")
    );
    assert!(
        spec["tolerations"].as_array().is_some_and(|t| t
            .iter()
            .any(|t| t["operator"] == "Exists" && t["key"].is_null() && t["effect"].is_null())),
        "{}",
        at("a toleration of every taint")
    );
    let update = &daemonset["spec"]["updateStrategy"];
    assert_eq!(update["type"], "RollingUpdate", "{}", at("rolling update"));
    assert_eq!(
        update["rollingUpdate"]["maxUnavailable"],
        1,
        "{}",
        at("one node at a time")
    );
    assert!(
        update["rollingUpdate"]["maxSurge"].as_u64().unwrap_or(0) == 0,
        "{}",
        at("no surge: two agents cannot share a node's pins")
    );
    let account = spec["serviceAccountName"]
        .as_str()
        .expect("a service account");
    let _ = named(objects, "ServiceAccount", account);
    let grace = spec["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("terminationGracePeriodSeconds");
    assert!(
        grace >= AGENT_STOP_TIMEOUT.as_secs(),
        "{}",
        at("time to stop after SIGTERM")
    );
}

/// Exactly the capabilities the agent keeps, nothing privileged.
fn check_capabilities(layout: &str, pod: &Pod) {
    let (kubernetes_caps, _) = kept();
    let c = pod.container;
    let at = |what: &str| format!("{layout}: {what}");
    let security = &c["securityContext"];
    assert_ne!(security["privileged"], true, "{}", at("not privileged"));
    assert_eq!(
        strings(&security["capabilities"]["drop"]),
        BTreeSet::from(["ALL".to_owned()]),
        "{}",
        at("every capability dropped")
    );
    assert_eq!(
        strings(&security["capabilities"]["add"]),
        kubernetes_caps,
        "{}",
        at("the capabilities the agent keeps (caps::KEEP) added back")
    );
    assert_eq!(
        security["allowPrivilegeEscalation"],
        false,
        "{}",
        at("no escalation")
    );
    assert_eq!(
        security["readOnlyRootFilesystem"],
        true,
        "{}",
        at("read-only root")
    );
}

/// Probes on the address and paths the agent serves.
fn check_probes(layout: &str, pod: &Pod) {
    let c = pod.container;
    let at = |what: &str| format!("{layout}: {what}");
    assert_eq!(pod.args().first(), Some(&"run"), "{}", at("runs the agent"));
    assert!(
        !pod.args().contains(&"--no-metrics") && pod.env("MMESH_NO_METRICS").is_none(),
        "{}",
        at("the health endpoints are served")
    );
    let metrics: SocketAddr = pod
        .option("metrics-addr", Some("MMESH_METRICS_ADDR"))
        .unwrap_or_else(|| DEFAULT_METRICS_ADDR.to_owned())
        .parse()
        .expect("--metrics-addr is an address");
    for (which, path) in [
        ("startupProbe", "/healthz"),
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
    ] {
        let (host, port, asked) = probe(c, which);
        assert_eq!(asked, path, "{}", at(which));
        let port = port.as_u64().or_else(|| {
            c["ports"].as_array()?.iter().find_map(|p| {
                (p["name"] == port)
                    .then(|| p["containerPort"].as_u64())
                    .flatten()
            })
        });
        assert_eq!(
            port,
            Some(u64::from(metrics.port())),
            "{}",
            at(&format!("{which} port"))
        );
        if !metrics.ip().is_unspecified() {
            // The kubelet dials from the node's network namespace,
            // the pod's with hostNetwork: the same address reaches it.
            assert_eq!(
                host,
                Some(metrics.ip().to_string()),
                "{}",
                at(&format!(
                    "{which} host: the agent listens on {metrics} only"
                ))
            );
        }
    }
}

/// The pins, the state and the admin socket on the host.
fn check_host_paths(layout: &str, pod: &Pod) {
    let c = pod.container;
    let at = |what: &str| format!("{layout}: {what}");
    let bpffs = pod
        .option("bpffs", Some("MMESH_BPFFS"))
        .unwrap_or_else(|| HOST_PIN_DIR.to_owned());
    assert_eq!(
        pod.host_path(&bpffs),
        (PathBuf::from(HOST_PIN_DIR), true),
        "{}",
        at("the pins on the host's bpffs, where `mmesh-agent detach` finds them")
    );
    assert!(
        !Path::new(&bpffs).starts_with("/sys"),
        "{}",
        at(
            "the pins not below /sys in the container (the runtime's AppArmor profile denies writes there)"
        )
    );
    let state = pod
        .option("state-dir", Some("MMESH_STATE_DIR"))
        .unwrap_or_else(|| DEFAULT_STATE_DIR.to_owned());
    assert_eq!(
        pod.host_path(&state),
        (PathBuf::from(DEFAULT_STATE_DIR), true),
        "{}",
        at("the last-known-good policy on the host")
    );
    assert_eq!(
        pod.host_path(HOST_RUNTIME_DIR),
        (PathBuf::from(HOST_RUNTIME_DIR), true),
        "{}",
        at("the runtime directory (admin socket) on the host")
    );
    let node = c["env"]
        .as_array()
        .and_then(|e| e.iter().find(|e| e["name"] == "NODE_NAME"));
    assert_eq!(
        node.map(|n| &n["valueFrom"]["fieldRef"]["fieldPath"]),
        Some(&Value::from("spec.nodeName")),
        "{}",
        at("NODE_NAME from the node")
    );
}

/// The policy: a `ConfigMap` mounted whole where `--policy-dir` points,
/// unhashed, and valid.
fn check_policy(layout: &str, objects: &[Value], pod: &Pod) {
    let at = |what: &str| format!("{layout}: {what}");
    let policy_dir = pod
        .option("policy-dir", Some("MMESH_POLICY_DIR"))
        .expect("--policy-dir");
    let (mount, rest) = pod.mount_of(&policy_dir).expect("a mount for the policy");
    assert_eq!(
        rest,
        PathBuf::new(),
        "{}",
        at("the policy directory is the mount itself")
    );
    assert!(mount["subPath"].is_null(), "{}", at("no subPath"));
    let volume = pod.volume(mount["name"].as_str().expect("a volume name"));
    let map = named(
        objects,
        "ConfigMap",
        volume["configMap"]["name"]
            .as_str()
            .expect("the policy volume is a ConfigMap"),
    );
    assert_eq!(
        map["metadata"]["name"],
        "mmesh-policy",
        "{}",
        at("no hash suffix: a policy change must not roll the DaemonSet")
    );
    check_policy_validates(map, layout);
}

/// Control-plane credentials, where given, come from a mounted Secret.
fn check_credentials(layout: &str, pod: &Pod) {
    let at = |what: &str| format!("{layout}: {what}");
    for option in [
        "control-plane-ca",
        "control-plane-cert",
        "control-plane-key",
    ] {
        if let Some(file) = pod.option(option, None) {
            let (mount, _) = pod
                .mount_of(&file)
                .unwrap_or_else(|| panic!("{}", at(&format!("--{option} {file} is mounted"))));
            let volume = pod.volume(mount["name"].as_str().expect("a volume name"));
            assert!(
                volume["secret"].is_object(),
                "{}",
                at(&format!("--{option} comes from a Secret"))
            );
        }
    }
}

/// Writes the `ConfigMap`'s files into a directory and has the agent
/// validate it, as `--policy-dir` reads it.
fn check_policy_validates(map: &Value, layout: &str) {
    let dir = TempDir::new("deploy-policy");
    let data = map["data"].as_object().expect("the ConfigMap has data");
    assert!(!data.is_empty(), "{layout}: the ConfigMap holds a policy");
    for (name, text) in data {
        std::fs::write(dir.path().join(name), text.as_str().expect("text data"))
            .expect("writing a policy file");
    }
    let out = Command::new(agent_binary())
        .args(["policy", "validate"])
        .arg(dir.path())
        .output()
        .expect("running mmesh-agent policy validate");
    assert!(
        out.status.success(),
        "{layout}: the policy ConfigMap validates:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The systemd unit is valid for systemd (no unknown key, the programs it
/// runs exist), grants exactly the capabilities the agent keeps, reloads
/// with SIGHUP, restarts always, and gives the agent its state and runtime
/// directories.
#[test]
fn the_systemd_unit_verifies_and_grants_the_same_capabilities() {
    let unit = std::fs::read_to_string(workspace().join(UNIT)).expect("reading the unit");
    let (_, systemd_caps) = kept();
    let values = |key: &str| -> Vec<String> {
        unit.lines()
            .filter_map(|l| l.strip_prefix(&format!("{key}=")))
            .map(str::to_owned)
            .collect()
    };
    let words = |key: &str| -> BTreeSet<String> {
        values(key)
            .iter()
            .flat_map(|v| v.split_whitespace().map(str::to_owned))
            .collect()
    };
    assert_eq!(words("CapabilityBoundingSet"), systemd_caps);
    assert_eq!(words("AmbientCapabilities"), systemd_caps);
    assert_eq!(values("ExecReload"), ["/bin/kill -HUP $MAINPID"]);
    assert_eq!(values("Restart"), ["always"]);
    assert_eq!(values("StateDirectory"), ["mmesh"]);
    assert_eq!(values("RuntimeDirectory"), ["mmesh"]);
    assert_eq!(values("NoNewPrivileges"), ["yes"]);
    let exec = values("ExecStart");
    assert_eq!(exec.len(), 1, "one ExecStart");
    assert!(
        exec[0].starts_with("/usr/local/bin/mmesh-agent run ")
            && exec[0].contains(" --state-dir /var/lib/mmesh"),
        "ExecStart runs the agent with the StateDirectory: {}",
        exec[0]
    );

    let words: Vec<&str> = exec[0].split_whitespace().skip(1).collect();
    let out = Command::new(agent_binary())
        .args(&words)
        .arg("--help")
        .output()
        .expect("running mmesh-agent");
    assert!(
        out.status.success(),
        "mmesh-agent does not accept ExecStart's {words:?}:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // systemd-analyze checks that the programs exist: the built agent
    // stands in for /usr/local/bin/mmesh-agent.
    let dir = TempDir::new("deploy-unit");
    let copy = dir.path().join("mmesh-agent.service");
    std::fs::write(
        &copy,
        unit.replace(
            "/usr/local/bin/mmesh-agent",
            &agent_binary().display().to_string(),
        ),
    )
    .expect("writing the unit");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .expect("running systemd-analyze (Debian's systemd package)");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "systemd-analyze verify {UNIT}:\n{said}"
    );
}

// ---------------------------------------------------------------------------
// The agent with the DaemonSet's capabilities only

const ALPHA: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 77, 0, 10));
const ORDINARY: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 77, 0, 100));
const BLOCKED: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 77, 1, 1));
const PORT: u16 = 5000;
const PACKETS: u64 = 100;

/// A policy file added to the `ConfigMap`'s: blocks `10.77.1.0/24`.
const BLOCKING: &str = "global:
  block:
    - name: blk
      cidrs: [10.77.1.0/24]
accounts:
  - id: alpha
    prefixes: [10.77.0.10/32]
";

/// The base `DaemonSet`'s container, run here: its capabilities (as `setpriv`
/// arguments) and its arguments with the host paths of this test.
struct Deployed {
    caps: Vec<String>,
    args: Vec<String>,
    _policy: TempDir,
    _state: TempDir,
}

impl Deployed {
    /// The base `DaemonSet`'s agent, with `caps` (Kubernetes names) instead
    /// of the ones it adds when given: its arguments, with a policy
    /// directory holding the `ConfigMap`'s files and [`BLOCKING`], a state
    /// directory and `pins` of the test's own, attached to [`HOST_IF`].
    fn new(pins: &PinDir, caps: Option<&BTreeSet<String>>) -> Self {
        let objects = objects(&render("deploy/base"));
        let pod = Pod::of(only(&objects, "DaemonSet"));
        let policy = TempDir::new("deploy-policy-dir");
        let map = named(&objects, "ConfigMap", "mmesh-policy");
        for (name, text) in map["data"].as_object().expect("the ConfigMap has data") {
            policy.write(name, text.as_str().expect("text data"));
        }
        policy.write("zz-test-blocking.yaml", BLOCKING);
        let state = TempDir::new("deploy-state");
        let mut args: Vec<String> = Vec::new();
        for arg in pod.args() {
            let replaced = if arg.starts_with("--policy-dir") {
                format!("--policy-dir={}", policy.path().display())
            } else if arg.starts_with("--state-dir") {
                format!("--state-dir={}", state.path().display())
            } else {
                arg.to_owned()
            };
            args.push(replaced);
        }
        // The base leaves the interface to the default route, which the
        // test namespace has not; the pins are given by their path.
        args.extend([
            format!("--interface={HOST_IF}:uplink"),
            format!("--bpffs={}", pins.dir().display()),
        ]);
        let added = strings(&pod.container["securityContext"]["capabilities"]["add"]);
        let caps = caps
            .unwrap_or(&added)
            .iter()
            .map(|c| c.to_lowercase())
            .collect();
        Self {
            caps,
            args,
            _policy: policy,
            _state: state,
        }
    }

    /// `setpriv` as a container runtime sets a process up for the
    /// `DaemonSet`: uid 0, the bounding set cut down to the capabilities
    /// (which become root's only ones at exec), nothing inheritable or
    /// ambient, no new privileges.
    fn setpriv(&self) -> Vec<String> {
        let bounding = std::iter::once("-all".to_owned())
            .chain(self.caps.iter().map(|c| format!("+{c}")))
            .collect::<Vec<_>>()
            .join(",");
        [
            "setpriv",
            "--no-new-privs",
            "--inh-caps=-all",
            "--ambient-caps=-all",
            &format!("--bounding-set={bounding}"),
            "--",
        ]
        .map(String::from)
        .to_vec()
    }
}

fn topology(tag: &str) -> Topology {
    let topo = Topology::new(tag);
    topo.add_host_addrs(&[ALPHA]);
    topo.add_remote_addrs(&[ORDINARY, BLOCKED]);
    topo
}

/// `GET path` on the agent's metrics address inside `ns`: the status code.
fn http_status(ns: &NetNs, addr: SocketAddr, path: &str) -> u16 {
    scrape::get(ns, addr, path, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("GET {path} from {addr}: {e}"))
        .status
}

/// Allowed traffic passes to alpha and the blocked source is dropped.
#[track_caller]
fn assert_enforces(topo: &Topology) {
    let to = SocketAddr::new(ALPHA, PORT);
    assert_eq!(
        topo.udp_arrivals(ORDINARY, to, PACKETS),
        PACKETS,
        "allowed traffic passes"
    );
    assert_eq!(
        topo.udp_arrivals(BLOCKED, to, PACKETS),
        0,
        "the blocked source is dropped"
    );
}

/// The effective, permitted and bounding sets of a process (`CapEff`,
/// `CapPrm`, `CapBnd` of /proc/PID/status).
fn capability_sets(pid: u32) -> [u64; 3] {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("reading status");
    ["CapEff:", "CapPrm:", "CapBnd:"].map(|key| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
    })
}

/// The agent, as uid 0 with only the `DaemonSet`'s capabilities and its own
/// arguments: it attaches, holds exactly those capabilities, answers the
/// probes where the `DaemonSet` asks, and drops what the policy blocks.
#[test]
fn the_agent_enforces_with_only_the_daemonsets_capabilities() {
    let _serial = serial();
    let pins = PinDir::new("deploy-caps");
    let topo = topology("deploy-caps");
    let deployed = Deployed::new(&pins, None);
    let setpriv = deployed.setpriv();
    let wrapper: Vec<&str> = setpriv.iter().map(String::as_str).collect();
    let agent = Agent::start_through(&topo.host, &wrapper, &deployed.args);

    let keep = caps::KEEP.iter().fold(0u64, |m, (c, _)| m | (1 << c));
    assert_eq!(
        capability_sets(agent.pid()),
        [keep, keep, keep],
        "effective, permitted and bounding sets: CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON only"
    );
    let metrics: SocketAddr = DEFAULT_METRICS_ADDR.parse().expect("an address");
    assert_eq!(http_status(&topo.host, metrics, "/healthz"), 200, "live");
    assert_eq!(http_status(&topo.host, metrics, "/readyz"), 200, "ready");

    assert_enforces(&topo);
    drop(agent);
}

/// Without any one of the three capabilities the agent does not start:
/// it exits non-zero, having warned which capability is missing, with an
/// error that says what the kernel refused and which capabilities to
/// grant, and attaches nothing.
#[test]
fn without_any_one_capability_the_agent_stops_and_names_it() {
    let _serial = serial();
    let (all, _) = kept();
    for (_, missing) in caps::KEEP {
        let pins = PinDir::new("deploy-nocap");
        let topo = topology("deploy-nocap");
        let short = missing.trim_start_matches("CAP_");
        let fewer: BTreeSet<String> = all.iter().filter(|c| *c != short).cloned().collect();
        let deployed = Deployed::new(&pins, Some(&fewer));
        let setpriv = deployed.setpriv();
        let wrapper: Vec<&str> = setpriv.iter().map(String::as_str).collect();
        let args: Vec<&str> = deployed.args.iter().map(String::as_str).collect();
        let out = run_agent_to_exit_through(&topo.host, &wrapper, &args, Duration::from_secs(30));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "without {missing} the agent fails; stderr:\n{stderr}"
        );
        assert!(
            stderr.contains(&format!("missing capabilities {missing}")),
            "without {missing}: it names the capability; stderr:\n{stderr}"
        );
        let error = stderr
            .lines()
            .find(|l| l.starts_with("mmesh-agent: error: "))
            .unwrap_or_else(|| panic!("without {missing}: an error line; stderr:\n{stderr}"));
        assert!(
            error.contains("permission denied while ") && error.contains(missing),
            "without {missing}: the error says what was refused and names the capability: {error}"
        );
        assert_eq!(
            topo.host_programs(),
            [],
            "without {missing}: nothing attached"
        );
    }
}

// ---------------------------------------------------------------------------
// The systemd unit under a real systemd

/// The machine's own systemd (Debian's) as PID 1 of new PID, mount, UTS and
/// cgroup namespaces inside a test network namespace: it boots only the
/// agent's unit (and a target that wants it), with the unit's sandboxing
/// applied for real. Everything it changes is private to its mount
/// namespace (`/run`, `/var/lib`, `/usr/local/bin` and `/sys/fs/bpf` fresh,
/// `/etc` an overlay); it is killed with its namespace when dropped.
struct Systemd {
    unshare: std::process::Child,
    dir: TempDir,
}

/// The target booted: the agent's unit and nothing of the host's.
const TEST_TARGET: &str = "[Unit]
Description=mmesh-agent alone
DefaultDependencies=no
Wants=mmesh-agent.service
";

impl Systemd {
    /// Boots with [`UNIT`] as it is, the policy files `policy` in
    /// `/etc/mmesh/policy`, and a drop-in as the README suggests: the
    /// unit's `ExecStart` with `extra` arguments (the interface), and
    /// stderr appended to a file here, since there is no journal.
    fn boot(ns: &NetNs, extra: &str, policy: &[(&str, &str)]) -> Self {
        let dir = TempDir::new("deploy-systemd");
        let unit = std::fs::read_to_string(workspace().join(UNIT)).expect("reading the unit");
        let exec = unit
            .lines()
            .find_map(|l| l.strip_prefix("ExecStart="))
            .expect("an ExecStart");
        dir.write("mmesh-agent.service", &unit);
        dir.write(
            "test.conf",
            &format!(
                "[Unit]
DefaultDependencies=no
[Service]
ExecStart=
ExecStart={exec} {extra}
StandardError=append:{}
",
                // Opened by systemd, outside the sandbox's private /tmp.
                dir.path().join("agent.log").display()
            ),
        );
        dir.write("mmesh-test.target", TEST_TARGET);
        for (name, text) in policy {
            dir.write(&format!("policy/{name}"), text);
        }
        let d = dir.path().display();
        let agent = agent_binary();
        let script = format!(
            "set -e
mount --make-rprivate /
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /var/lib
mkdir -p {d}/etc
mount -t tmpfs tmpfs {d}/etc
mkdir {d}/etc/upper {d}/etc/work
mount -t overlay overlay -o lowerdir=/etc,upperdir={d}/etc/upper,workdir={d}/etc/work /etc
mkdir -p /etc/systemd/system/mmesh-agent.service.d /etc/mmesh/policy
cp {d}/mmesh-agent.service {d}/mmesh-test.target /etc/systemd/system/
cp {d}/test.conf /etc/systemd/system/mmesh-agent.service.d/
cp {d}/policy/* /etc/mmesh/policy/
mount -t tmpfs tmpfs /usr/local/bin
cp {agent} /usr/local/bin/mmesh-agent
mount -t bpf bpf /sys/fs/bpf
export container=other
exec /lib/systemd/systemd --system --unit=mmesh-test.target --log-target=console --log-level=notice
",
            agent = agent.display()
        );
        let log = std::fs::File::create(dir.path().join("systemd.log")).expect("a log file");
        let unshare = ns
            .command("unshare")
            .args(["--mount", "--pid", "--uts", "--cgroup", "--mount-proc"])
            .arg("--kill-child=SIGKILL")
            .args(["/bin/sh", "-c", &script])
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().expect("the log file"))
            .stderr(log)
            .spawn()
            .expect("starting unshare");
        Self { unshare, dir }
    }

    /// What the agent wrote to stderr (the drop-in appends it to
    /// `agent.log` here).
    fn agent_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    fn systemd_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("systemd.log")).unwrap_or_default()
    }

    /// Waits until the agent's log has `needle` `count` times.
    #[track_caller]
    fn wait_for_log(&self, needle: &str, count: usize) {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while self.agent_log().matches(needle).count() < count {
            assert!(
                std::time::Instant::now() < deadline,
                "the agent did not log {needle:?} ({count}) within 30 s; its log:\n{}\nsystemd:\n{}",
                self.agent_log(),
                self.systemd_log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The host's pid of systemd: the one child of unshare.
    fn pid1(&self) -> u32 {
        let children =
            std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", self.unshare.id()))
                .expect("reading unshare's children");
        children
            .split_whitespace()
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("unshare has no child; systemd:\n{}", self.systemd_log()))
    }

    /// `CMD ARGS` in systemd's namespaces; its stdout.
    fn run(&self, cmd: &[&str]) -> String {
        run(Command::new("nsenter")
            .args(["-t", &self.pid1().to_string(), "--mount", "--pid", "--uts"])
            .args(cmd))
    }

    fn systemctl(&self, args: &[&str]) -> String {
        let mut cmd = vec!["systemctl"];
        cmd.extend(args);
        self.run(&cmd)
    }
}

impl Drop for Systemd {
    fn drop(&mut self) {
        // unshare passes SIGKILL on to systemd, PID 1 of its namespace,
        // and every process of the namespace goes with it.
        let _ = self.unshare.kill();
        let _ = self.unshare.wait();
    }
}

/// The systemd unit, as it is, under the machine's systemd as PID 1 of a
/// namespace of its own, sandboxing and all: the agent starts, holds only
/// the three capabilities, answers its probes, drops a blocked source,
/// follows a policy edit, reloads with `systemctl reload`, adopts its own
/// pins after `systemctl restart`, and leaves them enforcing after
/// `systemctl stop`.
#[test]
fn the_systemd_unit_runs_the_agent_sandboxed() {
    let _serial = serial();
    let topo = topology("deploy-systemd");
    let systemd = Systemd::boot(
        &topo.host,
        &format!("--interface {HOST_IF}:uplink"),
        &[("global.yaml", BLOCKING)],
    );
    systemd.wait_for_log(AGENT_READY_LINE, 1);

    let main_pid = systemd.systemctl(&["show", "--property=MainPID", "--value", "mmesh-agent"]);
    let status = systemd.run(&["cat", &format!("/proc/{}/status", main_pid.trim())]);
    let keep = caps::KEEP.iter().fold(0u64, |m, (c, _)| m | (1 << c));
    for key in ["CapEff:", "CapPrm:", "CapBnd:"] {
        let set = status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok());
        assert_eq!(set, Some(keep), "{key} of the agent under systemd");
    }
    let metrics: SocketAddr = DEFAULT_METRICS_ADDR.parse().expect("an address");
    assert_eq!(http_status(&topo.host, metrics, "/readyz"), 200, "ready");
    assert_enforces(&topo);

    // The policy directory is watched through the sandbox's read-only /etc.
    systemd.run(&[
        "sh",
        "-c",
        "sed 's/^accounts:/version: edited\\naccounts:/' /etc/mmesh/policy/global.yaml > /etc/mmesh/policy/.new && mv /etc/mmesh/policy/.new /etc/mmesh/policy/global.yaml",
    ]);
    systemd.wait_for_log("(version edited)", 1);
    systemd.systemctl(&["reload", "mmesh-agent"]);
    systemd.wait_for_log("SIGHUP: policy in force, unchanged", 1);

    // A restart adopts the pins; a stop leaves them enforcing.
    systemd.systemctl(&["restart", "mmesh-agent"]);
    systemd.wait_for_log("adopted (programs replaced in place)", 1);
    systemd.wait_for_log(AGENT_READY_LINE, 2);
    systemd.systemctl(&["stop", "mmesh-agent"]);
    systemd.wait_for_log("stopped; enforcement stays", 2);
    assert_eq!(
        topo.udp_arrivals(BLOCKED, SocketAddr::new(ALPHA, PORT), PACKETS),
        0,
        "still dropped with the agent stopped"
    );
    assert_eq!(
        systemd
            .systemctl(&["show", "--property=NRestarts", "--value", "mmesh-agent"])
            .trim(),
        "0",
        "never restarted by failure"
    );
}
