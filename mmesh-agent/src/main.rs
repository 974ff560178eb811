//! The `mmesh-agent` command line.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use clap::{Args, Parser, Subcommand, ValueEnum};
use mmesh_agent::{
    admin::{self, Reply, Request, TopBy, client as admin_client},
    agent::{self, Outputs, RunOptions},
    caps,
    compile::{Capacity, compile},
    control::{client, store::Store},
    datapath::pin,
    fanout::{Fanout, JsonLines},
    hook::ReceiveHook,
    interface::InterfaceSpec,
    policy::{DEFAULT_MAX_POLICY_BYTES, ReadLimits, Source},
    show,
    sink::{LogWriter, Sink, escape_controls},
};

/// mimalloc, not glibc malloc: reloading a 100,000-account policy frees and
/// allocates hundreds of thousands of small objects, and glibc stops for
/// milliseconds at a time to consolidate them (docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "mmesh-agent",
    version,
    about = "Enforces the mmesh Acceptable Use Policy in the kernel with XDP and TC"
)]
struct Cli {
    /// Log format on stderr: `auto` is text on a terminal and JSON lines
    /// otherwise (a journal, a container runtime's log file).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Auto, env = "MMESH_LOG_FORMAT")]
    log_format: LogFormat,
    /// The admin socket: where `run` listens (root only: mode 0600, in a
    /// directory of mode 0700 made if missing) and where `status`,
    /// `events`, `top`, `maps` and `policy show --running` ask.
    #[arg(long, global = true, value_name = "PATH", default_value = admin::DEFAULT_SOCKET, env = "MMESH_ADMIN_SOCKET")]
    admin_socket: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Auto,
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Load and attach the datapath, enforce the policy, report events (JSON
    /// lines on stdout) and a summary (stderr) until SIGINT or SIGTERM.
    /// The policy file or directory is watched: a change is applied when
    /// it is valid, and SIGHUP reloads it too.
    Run(Box<RunArgs>),
    /// Remove the pinned datapath: links (enforcement stops), programs, maps
    /// and pins. The only way a pinned datapath stops enforcing; refused
    /// while an agent runs on it.
    Detach(DetachArgs),
    /// Check or display a policy file without touching the kernel, or the
    /// policy in force of the running agent (`show --running`).
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// The running agent: attachments, policy, uptime, counters, map
    /// pressure, lost events (through the admin socket).
    Status(OutputArgs),
    /// The running agent's events: the recent ones, or with --follow those
    /// to come. A reader too slow loses events (told on stderr), and never
    /// slows the agent.
    Events(EventsArgs),
    /// The running agent's drops, by account or by remote address: a table
    /// refreshed in place (--once, or stdout not a terminal: one table).
    Top(TopArgs),
    /// The running agent's maps: entries against capacity.
    Maps(OutputArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Text,
    Json,
}

#[derive(Debug, Args)]
struct OutputArgs {
    /// Text for people, JSON for scripts.
    #[arg(long, short, value_enum, default_value_t = Output::Text)]
    output: Output,
}

#[derive(Debug, Args)]
struct EventsArgs {
    /// Go on with the events to come, until interrupted.
    #[arg(long, short)]
    follow: bool,
    /// Only the events of this account.
    #[arg(long)]
    account: Option<String>,
    /// Only the events of this reason (e.g. `global_block`, `rate_pps`).
    #[arg(long)]
    reason: Option<String>,
    /// Recent events of this long ago first (e.g. 30s, 5m, 1h; the agent
    /// keeps the last 8192 events). Without --follow, every recent event.
    #[arg(long, value_name = "D", value_parser = parse_duration)]
    since: Option<Duration>,
    /// JSON lines (as the agent writes them on stdout) or text.
    #[arg(long, short, value_enum, default_value_t = Output::Text)]
    output: Output,
}

#[derive(Debug, Args)]
struct TopArgs {
    /// `account`: dropped packets per account (its counters); `remote`:
    /// drop events per remote address (from the events, which are sampled).
    #[arg(long, value_enum, default_value_t = TopBy::Account)]
    by: TopBy,
    /// Seconds between refreshes.
    #[arg(long, short = 'n', default_value_t = 2.0)]
    interval: f64,
    /// One table and exit (also when stdout is not a terminal).
    #[arg(long)]
    once: bool,
    /// Rows at most.
    #[arg(long, default_value_t = 20)]
    limit: usize,
    #[arg(long, short, value_enum, default_value_t = Output::Text)]
    output: Output,
}

/// `30s`, `5m`, `2h`, `1d`, or seconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let (number, unit) = s.split_at(
        s.find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(s.len()),
    );
    let n: f64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a duration such as 30s, 5m or 1h"))?;
    let seconds = match unit {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        "d" => n * 86_400.0,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (ms, s, m, h or d)")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("{s:?}: {e}"))
}

#[derive(Debug, Args)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "command-line switches, each its own flag"
)]
struct RunArgs {
    /// Policy file (YAML or JSON), watched for changes. Without it (or
    /// --policy-dir) the embedded default policy runs.
    #[arg(long, short, env = "MMESH_POLICY")]
    policy: Option<PathBuf>,
    /// Directory of policy files (*.yaml, *.yml, *.json), merged into one
    /// policy and watched for changes (a mounted Kubernetes config map, for
    /// example).
    #[arg(
        long,
        value_name = "DIR",
        env = "MMESH_POLICY_DIR",
        conflicts_with = "policy"
    )]
    policy_dir: Option<PathBuf>,
    /// Do not watch the policy file or directory: apply changes on SIGHUP
    /// only.
    #[arg(long, env = "MMESH_NO_WATCH")]
    no_watch: bool,
    /// Interface to attach, with its role: NAME, NAME:uplink or
    /// NAME:workload. Repeat for several. Default: the interface of the
    /// default route, as uplink.
    #[arg(long = "interface", short, value_name = "NAME[:ROLE]")]
    interfaces: Vec<InterfaceSpec>,
    /// Where receive programs go: `auto` puts XDP on physical devices and
    /// TC ingress on virtual ones (veth, tap), where native XDP would turn
    /// off the peer's TSO/GSO; `xdp` or `tc` for every interface.
    #[arg(long, value_enum, default_value_t = ReceiveHook::Auto, env = "MMESH_RECEIVE_HOOK")]
    receive_hook: ReceiveHook,
    /// Seconds between summary lines.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=3600))]
    summary_interval: u64,
    /// bpffs directory where maps and links are pinned, so that enforcement
    /// goes on when the agent stops (SIGTERM, kill -9, a crash, an upgrade)
    /// and the next agent adopts it. Mounted when it is not on bpffs.
    #[arg(long, value_name = "DIR", default_value = mmesh_common::maps::pins::DEFAULT_DIR, env = "MMESH_BPFFS")]
    bpffs: PathBuf,
    /// Pin nothing and detach everything at exit: for trying the agent out.
    #[arg(long, env = "MMESH_EPHEMERAL")]
    ephemeral: bool,
    /// Address of the Prometheus endpoint (/metrics) and the health checks
    /// (/healthz, /readyz). Loopback by default: the counters say what the
    /// host's accounts do.
    #[arg(
        long,
        value_name = "ADDR",
        default_value = "127.0.0.1:9464",
        env = "MMESH_METRICS_ADDR"
    )]
    metrics_addr: std::net::SocketAddr,
    /// Serve no metrics and no health checks.
    #[arg(long, env = "MMESH_NO_METRICS")]
    no_metrics: bool,
    /// Accounts in the per-account drop metric
    /// (`mmesh_account_dropped_packets_total`): the ones with the most
    /// drops, to bound its label cardinality; 0 leaves it out.
    #[arg(long, value_name = "N", default_value_t = mmesh_agent::metrics::DEFAULT_TOP_ACCOUNTS, value_parser = clap::value_parser!(usize))]
    metrics_top_accounts: usize,
    /// Do not listen on the admin socket (`status`, `events`, `top`,
    /// `maps`, `policy show --running` then cannot ask this agent).
    #[arg(long, env = "MMESH_NO_ADMIN_SOCKET")]
    no_admin_socket: bool,
    #[command(flatten)]
    capacity: CapacityArgs,
    #[command(flatten)]
    control: ControlArgs,
}

/// Where policy comes from when a control plane serves it.
#[derive(Debug, Args)]
struct ControlArgs {
    /// Take policy from this control plane (`https://HOST:PORT`; `http://`
    /// only with --control-plane-plaintext). The agent dials out and keeps
    /// one stream; --policy is then only the first policy, when no
    /// last-known-good one is stored.
    #[arg(long, value_name = "URL", env = "MMESH_CONTROL_PLANE")]
    control_plane: Option<String>,
    /// The CA certificate (PEM) that signed the control plane's: the only
    /// one trusted.
    #[arg(long, value_name = "FILE", env = "MMESH_CONTROL_PLANE_CA")]
    control_plane_ca: Option<PathBuf>,
    /// This agent's certificate (PEM), for mutual TLS; with --control-plane-key.
    #[arg(
        long,
        value_name = "FILE",
        env = "MMESH_CONTROL_PLANE_CERT",
        requires = "control_plane_key"
    )]
    control_plane_cert: Option<PathBuf>,
    /// This agent's private key (PEM), for mutual TLS.
    #[arg(
        long,
        value_name = "FILE",
        env = "MMESH_CONTROL_PLANE_KEY",
        requires = "control_plane_cert"
    )]
    control_plane_key: Option<PathBuf>,
    /// The name the control plane's certificate must carry, when it is not
    /// the URL's host.
    #[arg(long, value_name = "NAME")]
    control_plane_server_name: Option<String>,
    /// Talk to the control plane without TLS (an `http://` URL): policy and
    /// reports travel in clear and unauthenticated.
    #[arg(long)]
    control_plane_plaintext: bool,
    /// This host's name towards the control plane.
    #[arg(long, value_name = "NAME", env = "NODE_NAME")]
    node_name: Option<String>,
    /// Where the last policy the control plane sent and the agent applied is
    /// kept, and applied at start before the control plane answers.
    #[arg(
        long,
        value_name = "DIR",
        default_value = "/var/lib/mmesh",
        env = "MMESH_STATE_DIR"
    )]
    state_dir: PathBuf,
    /// Seconds between heartbeats on the stream; three without a message
    /// from the control plane end the stream (it is dialled again).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=600))]
    heartbeat: u64,
    /// Seconds between violation reports to the control plane.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=3600))]
    report_interval: u64,
    /// Seconds between status messages to the control plane.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    status_interval: u64,
}

impl ControlArgs {
    /// The client's options, or why these arguments do not make some.
    fn options(&self, limits: &ReadLimits) -> anyhow::Result<Option<client::Options>> {
        let Some(url) = &self.control_plane else {
            return Ok(None);
        };
        let tls = match (
            url.split_once("://").map(|(scheme, _)| scheme),
            self.control_plane_plaintext,
        ) {
            (Some("http"), true) => None,
            (Some("http"), false) => anyhow::bail!(
                "--control-plane {url} has no TLS: use an https:// URL with --control-plane-ca, or add --control-plane-plaintext to send policy and reports in clear"
            ),
            (Some("https"), true) => {
                anyhow::bail!("--control-plane-plaintext with an https:// URL: drop one of them")
            }
            (Some("https"), false) => {
                let tls = client::Tls {
                    ca: self.control_plane_ca.clone().ok_or_else(|| anyhow::anyhow!(
                        "--control-plane {url} needs --control-plane-ca FILE: the CA that signed the control plane's certificate (the only one trusted)"
                    ))?,
                    identity: self.control_plane_cert.clone().zip(self.control_plane_key.clone()),
                    domain: self.control_plane_server_name.clone(),
                };
                // Read now: a missing file is an error at start, not a
                // warning at every reconnect.
                let (cert, key) = tls.identity.clone().unzip();
                for (option, path) in [
                    ("--control-plane-ca", Some(&tls.ca)),
                    ("--control-plane-cert", cert.as_ref()),
                    ("--control-plane-key", key.as_ref()),
                ] {
                    if let Some(path) = path {
                        std::fs::File::open(path)
                            .map_err(|e| anyhow::anyhow!("{option} {}: {e}", path.display()))?;
                    }
                }
                Some(tls)
            }
            _ => anyhow::bail!(
                "--control-plane {url}: expected https://HOST:PORT (or http://HOST:PORT with --control-plane-plaintext)"
            ),
        };
        let node = match &self.node_name {
            Some(n) if !n.is_empty() => n.clone(),
            _ => std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .ok()
                .filter(|h| !h.is_empty())
                .ok_or_else(|| anyhow::anyhow!("cannot tell this host's name: give --node-name"))?,
        };
        Ok(Some(client::Options {
            url: url.clone(),
            tls,
            node,
            heartbeat: Duration::from_secs(self.heartbeat),
            report_interval: Duration::from_secs(self.report_interval),
            status_interval: Duration::from_secs(self.status_interval),
            backoff: (Duration::from_millis(500), Duration::from_secs(30)),
            limits: limits.clone(),
            store: Some(Store::new(&self.state_dir)),
        }))
    }
}

#[derive(Debug, Args)]
struct DetachArgs {
    /// The pin directory the agent ran with.
    #[arg(long, value_name = "DIR", default_value = mmesh_common::maps::pins::DEFAULT_DIR, env = "MMESH_BPFFS")]
    bpffs: PathBuf,
    /// Detach only these interfaces (maps and other links stay). Repeat for
    /// several. Default: everything.
    #[arg(long = "interface", short, value_name = "NAME")]
    interfaces: Vec<String>,
}

/// Map capacities, fixed when the datapath loads.
#[derive(Debug, Args)]
struct CapacityArgs {
    /// Accounts the maps hold.
    #[arg(long, default_value_t = Capacity::default().accounts, value_parser = clap::value_parser!(u32).range(1..=(1 << 24)))]
    max_accounts: u32,
    /// Account prefixes per address family.
    #[arg(long, default_value_t = Capacity::default().account_prefixes, value_parser = clap::value_parser!(u32).range(1..=(1 << 26)))]
    max_account_prefixes: u32,
    /// Block/allow list prefixes per address family, all scopes together.
    #[arg(long, default_value_t = Capacity::default().list_prefixes, value_parser = clap::value_parser!(u32).range(1..=(1 << 27)))]
    max_list_prefixes: u32,
    /// (account, reason, verdict, direction) counters.
    #[arg(long, default_value_t = Capacity::default().counters, value_parser = clap::value_parser!(u32).range(64..=(1 << 26)))]
    max_counters: u32,
    /// Level-2 nodes of the global IPv4 stride, per policy (1 KiB each, twice).
    #[arg(long, default_value_t = Capacity::default().stride_chunks, value_parser = clap::value_parser!(u32).range(0..=65_536))]
    stride_chunks: u32,
    /// Entries of the per-CPU flow cache: a power of two (64 bytes per entry and CPU).
    #[arg(long, default_value_t = Capacity::default().flow_cache, value_parser = parse_flow_cache)]
    flow_cache: u32,
    /// Bytes read for one policy at most: the policy file and the list files
    /// it names, together.
    #[arg(long, default_value_t = DEFAULT_MAX_POLICY_BYTES, value_parser = clap::value_parser!(u64).range(1..=(1 << 34)))]
    max_policy_bytes: u64,
    /// Bytes of the event ring buffer: a power of two, at least 4096.
    #[arg(long, default_value_t = Capacity::default().event_buffer, value_parser = parse_ring_size)]
    event_buffer: u32,
}

impl CapacityArgs {
    /// How policy files are read for maps of these capacities.
    fn read_limits(&self) -> ReadLimits {
        ReadLimits::new(self.max_policy_bytes, &self.into())
    }
}

impl From<&CapacityArgs> for Capacity {
    fn from(a: &CapacityArgs) -> Self {
        Self {
            accounts: a.max_accounts,
            account_prefixes: a.max_account_prefixes,
            list_prefixes: a.max_list_prefixes,
            counters: a.max_counters,
            event_buffer: a.event_buffer,
            stride_chunks: a.stride_chunks,
            flow_cache: a.flow_cache,
        }
    }
}

fn parse_flow_cache(s: &str) -> Result<u32, String> {
    let n: u32 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of entries"))?;
    if !n.is_power_of_two() || !(64..=(1 << 22)).contains(&n) {
        return Err(format!(
            "{n} is not a power of two between 64 and {}",
            1u32 << 22
        ));
    }
    Ok(n)
}

fn parse_ring_size(s: &str) -> Result<u32, String> {
    let n: u32 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of bytes"))?;
    if n < 4096 || !n.is_power_of_two() || n > (1 << 30) {
        return Err(format!(
            "{n} is not a power of two between 4096 and {}",
            1u32 << 30
        ));
    }
    Ok(n)
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// Validate a policy file, or a directory read as --policy-dir: prints
    /// every problem and exits non-zero if there is any.
    Validate {
        file: PathBuf,
        #[command(flatten)]
        capacity: CapacityArgs,
    },
    /// Print the compiled, effective policy of a file or directory
    /// (default: the embedded default policy), or with --running the one
    /// in force in the running agent.
    Show {
        #[arg(conflicts_with = "running")]
        file: Option<PathBuf>,
        /// The policy in force in the running agent (admin socket).
        #[arg(long)]
        running: bool,
        #[arg(long, short = 'o', visible_alias = "output", value_enum, default_value_t = ShowFormat::Yaml)]
        format: ShowFormat,
        #[command(flatten)]
        capacity: CapacityArgs,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ShowFormat {
    Yaml,
    Json,
    /// The same as yaml.
    Text,
}

/// Log lines queued for stderr at most; beyond that they are dropped and
/// counted (a stalled stderr must not stop the agent).
const LOG_QUEUE: usize = 4096;
/// Batches of events queued for stdout at most (256 events each).
const EVENT_QUEUE: usize = 64;

/// Logs go through a [`Sink`] to stderr: a full pipe or a closed stderr loses
/// lines (counted) instead of blocking or crashing the agent.
fn init_logging(format: LogFormat) -> Sink {
    let sink =
        Sink::spawn("mmesh-log", std::io::stderr(), LOG_QUEUE).unwrap_or_else(|_| fallback_sink());
    let filter = tracing_subscriber::EnvFilter::try_from_env("MMESH_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(LogWriter(sink.clone()))
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Auto if std::io::IsTerminal::is_terminal(&std::io::stderr()) => builder.init(),
        LogFormat::Text => builder.init(),
        LogFormat::Auto | LogFormat::Json => builder.json().init(),
    }
    sink
}

/// A sink that writes nowhere, for when no thread can be started.
fn fallback_sink() -> Sink {
    Sink::spawn("mmesh-null", std::io::sink(), 1).expect("a thread for the null sink")
}

fn main() -> ExitCode {
    let huge_pages = mmesh_agent::alloc::no_huge_pages();
    let cli = Cli::parse();
    // Mounting bpffs needs CAP_SYS_ADMIN, which is dropped next.
    let prepared = match &cli.command {
        Command::Run(args) if !args.ephemeral => pin::prepare(&args.bpffs),
        _ => Ok(None),
    };
    // Before any thread exists: capability sets are per thread.
    let dropped = matches!(cli.command, Command::Run(_)).then(caps::drop_unneeded);
    let logs = init_logging(cli.log_format);
    match dropped {
        Some(Ok(d)) if !d.missing().is_empty() => tracing::warn!(
            "missing capabilities {}: loading the datapath will probably fail; run as root or grant CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON",
            d.missing().join(", ")
        ),
        Some(Ok(d)) => tracing::debug!(
            bounding = d.bounding,
            "capabilities dropped to CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON"
        ),
        Some(Err(err)) => tracing::warn!(%err, "could not drop unneeded capabilities"),
        None => {}
    }
    if let Err(err) = huge_pages {
        tracing::debug!(%err, "could not turn transparent huge pages off: the agent's memory may be higher by up to a third");
    }
    let result = match cli.command {
        Command::Run(args) => prepared.map_err(anyhow::Error::from).and_then(|mounted| {
            if let Some(at) = mounted {
                tracing::info!(at = %at.display(), "mounted bpffs");
            }
            run(*args, cli.admin_socket.clone(), &logs)
        }),
        Command::Detach(args) => detach(&args),
        Command::Policy(PolicyCommand::Validate { file, capacity }) => validate(&file, &capacity),
        Command::Policy(PolicyCommand::Show {
            running: true,
            format,
            ..
        }) => show_running(&cli.admin_socket, format),
        Command::Policy(PolicyCommand::Show {
            file,
            format,
            capacity,
            ..
        }) => show(file.as_ref(), format, &capacity),
        Command::Status(args) => status(&cli.admin_socket, args.output),
        Command::Maps(args) => maps(&cli.admin_socket, args.output),
        Command::Events(args) => events(&cli.admin_socket, &args),
        Command::Top(args) => top(&cli.admin_socket, &args),
    };
    let code = match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // Line by line: a multi-line error (every problem of a policy)
            // keeps its lines, and nothing else can move the terminal.
            let text: Vec<String> = format!("mmesh-agent: error: {err:#}")
                .lines()
                .map(|l| escape_controls(l).into_owned())
                .collect();
            logs.send(format!("{}\n", text.join("\n")).into_bytes(), 1);
            ExitCode::FAILURE
        }
    };
    // What is queued still goes out, unless stderr is stalled.
    let _ = logs.flush(Duration::from_secs(2));
    code
}

fn run(args: RunArgs, admin_socket: PathBuf, logs: &Sink) -> anyhow::Result<()> {
    let events = Fanout::default();
    let stdout = JsonLines::spawn(
        "mmesh-events",
        events.subscribe("stdout", EVENT_QUEUE),
        std::io::stdout(),
    )?;
    let stdout_stats = stdout.stats();
    let limits = args.capacity.read_limits();
    let control = args.control.options(&limits)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let result = runtime.block_on(agent::run(
        RunOptions {
            policy: args
                .policy
                .map(Source::File)
                .or(args.policy_dir.map(Source::Dir)),
            watch: !args.no_watch,
            interfaces: args.interfaces,
            receive_hook: args.receive_hook,
            capacity: (&args.capacity).into(),
            limits,
            summary_interval: Duration::from_secs(args.summary_interval),
            pins: (!args.ephemeral).then_some(args.bpffs),
            control,
            metrics: (!args.no_metrics).then_some(args.metrics_addr),
            top_accounts: args.metrics_top_accounts,
            admin: (!args.no_admin_socket).then_some(admin_socket),
        },
        Outputs {
            events: events.clone(),
            logs: logs.stats(),
        },
    ));
    // A start-up interrupted by a signal leaves its blocking task behind:
    // do not wait for it; the links it made end with the process.
    runtime.shutdown_timeout(Duration::from_secs(1));
    // The reader closed the fanout when it stopped (and if it never
    // started, nothing was queued): the writer ends once the queue is out.
    events.close();
    if !stdout.finish(Duration::from_secs(2)) {
        tracing::warn!(
            "stdout is not being read: events still queued at exit are lost ({} lost in all)",
            stdout_stats.lost()
        );
    }
    result
}

fn detach(args: &DetachArgs) -> anyhow::Result<()> {
    let removed = pin::remove(&args.bpffs, &args.interfaces)?;
    let dir = args.bpffs.display();
    if removed.links.is_empty() && !removed.everything {
        println!("nothing pinned in {dir} to detach");
    } else {
        println!(
            "detached: {}{}",
            if removed.links.is_empty() {
                "no links".to_owned()
            } else {
                removed.links.join(", ")
            },
            if removed.everything {
                format!("; maps and pins in {dir} removed")
            } else {
                String::new()
            }
        );
    }
    Ok(())
}

fn validate(file: &Path, args: &CapacityArgs) -> anyhow::Result<()> {
    let capacity = Capacity::from(args);
    let policy = Source::of_path(file).read(&args.read_limits())?;
    let compiled = compile(&policy, None, &capacity)?;
    println!(
        "{}: valid: {} accounts, {} list prefixes",
        file.display(),
        policy.accounts.len(),
        compiled.counts().list_prefixes_v4 + compiled.counts().list_prefixes_v6
    );
    Ok(())
}

fn show(file: Option<&PathBuf>, format: ShowFormat, args: &CapacityArgs) -> anyhow::Result<()> {
    let capacity = &Capacity::from(args);
    let source = file.map(|f| Source::of_path(f));
    let policy = agent::load_policy(source.as_ref(), &args.read_limits())?;
    let compiled = compile(&policy, None, capacity)?;
    let view = show::effective(&policy, &compiled, capacity);
    print_policy(&view, format)
}

fn print_policy(view: &impl serde::Serialize, format: ShowFormat) -> anyhow::Result<()> {
    match format {
        ShowFormat::Yaml | ShowFormat::Text => print!("{}", serde_saphyr::to_string(view)?),
        ShowFormat::Json => println!("{}", serde_json::to_string_pretty(view)?),
    }
    Ok(())
}

fn unexpected(reply: &Reply) -> anyhow::Error {
    anyhow::anyhow!("unexpected answer from the agent: {reply:?}")
}

fn show_running(socket: &Path, format: ShowFormat) -> anyhow::Result<()> {
    let json = matches!(format, ShowFormat::Json);
    match admin_client::ask(socket, &Request::Policy { json })? {
        Reply::Policy(text) => print!("{text}"),
        other => return Err(unexpected(&other)),
    }
    Ok(())
}

fn status(socket: &Path, output: Output) -> anyhow::Result<()> {
    match admin_client::ask(socket, &Request::Status)? {
        Reply::Status(s) => match output {
            Output::Text => print!("{}", admin_client::status_text(&s)),
            Output::Json => println!("{}", serde_json::to_string_pretty(&s)?),
        },
        other => return Err(unexpected(&other)),
    }
    Ok(())
}

fn maps(socket: &Path, output: Output) -> anyhow::Result<()> {
    match admin_client::ask(socket, &Request::Maps)? {
        Reply::Maps(m) => match output {
            Output::Text => print!("{}", admin_client::maps_text(&m)),
            Output::Json => println!("{}", serde_json::to_string_pretty(&m)?),
        },
        other => return Err(unexpected(&other)),
    }
    Ok(())
}

fn events(socket: &Path, args: &EventsArgs) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut answer = admin_client::send(
        socket,
        &Request::Events {
            follow: args.follow,
            account: args.account.clone(),
            reason: args.reason.clone(),
            since_ms: args.since.map(|d| d.as_millis() as u64),
        },
    )?;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut lost = 0;
    while let Some(reply) = answer.next_reply()? {
        match reply {
            Reply::Event(e) => {
                match args.output {
                    // As the agent wrote it: the order of its stdout.
                    Output::Json => match answer.raw_event() {
                        Some(raw) => writeln!(out, "{raw}")?,
                        None => writeln!(out, "{e}")?,
                    },
                    Output::Text => writeln!(out, "{}", admin_client::event_text(&e))?,
                }
                if args.follow {
                    out.flush()?;
                }
            }
            Reply::Lost(n) => {
                out.flush()?;
                eprintln!(
                    "mmesh-agent: {} events lost ({n} in all): this reader was too slow, the agent's queue for it was full",
                    n - lost
                );
                lost = n;
            }
            Reply::End { .. } => break,
            other => return Err(unexpected(&other)),
        }
    }
    out.flush()?;
    Ok(())
}

fn top(socket: &Path, args: &TopArgs) -> anyhow::Result<()> {
    use std::io::{IsTerminal as _, Write as _};
    let interval = Duration::try_from_secs_f64(args.interval)
        .ok()
        .filter(|d| *d >= Duration::from_millis(100))
        .ok_or_else(|| {
            anyhow::anyhow!("--interval {}: give at least 0.1 seconds", args.interval)
        })?;
    let live = !args.once && std::io::stdout().is_terminal();
    let request = |window: Option<Duration>| Request::Top {
        by: args.by,
        window_ms: window.map(|w| w.as_millis() as u64),
        limit: args.limit,
    };
    let ask = |window| match admin_client::ask(socket, &request(window))? {
        Reply::Top(t) => Ok(t),
        other => Err(unexpected(&other)),
    };
    if !live {
        let t = ask(None)?;
        match args.output {
            Output::Text => print!("{}", admin_client::top_text(&t, None)),
            Output::Json => println!("{}", serde_json::to_string_pretty(&t)?),
        }
        return Ok(());
    }
    // By account the counters are cumulative: the rate is the difference
    // between two refreshes. By remote each refresh asks for the events of
    // the last interval.
    let mut before: std::collections::HashMap<String, u64> = std::collections::HashMap::new();
    let mut at = std::time::Instant::now();
    loop {
        let window = (args.by == TopBy::Remote).then_some(interval);
        let t = ask(window)?;
        let now = std::time::Instant::now();
        let elapsed = now.duration_since(at).as_secs_f64();
        let text = match args.output {
            Output::Json => format!(
                "{}
",
                serde_json::to_string(&t)?
            ),
            Output::Text => {
                let rate = |key: &str| -> Option<f64> {
                    let row = t.rows.iter().find(|r| r.key == key)?;
                    match args.by {
                        TopBy::Account => before
                            .get(key)
                            .map(|b| row.packets.saturating_sub(*b) as f64 / elapsed),
                        TopBy::Remote => Some(row.packets as f64 / interval.as_secs_f64()),
                    }
                };
                // Home and clear, like top(1).
                format!(
                    "\x1b[H\x1b[2J{}\n(every {:.1} s; Ctrl-C to stop)\n",
                    admin_client::top_text(&t, Some(&rate)),
                    interval.as_secs_f64()
                )
            }
        };
        let mut out = std::io::stdout().lock();
        out.write_all(text.as_bytes())?;
        out.flush()?;
        before = t.rows.iter().map(|r| (r.key.clone(), r.packets)).collect();
        at = now;
        std::thread::sleep(interval);
    }
}
