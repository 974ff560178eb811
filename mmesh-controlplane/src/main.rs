//! `mmesh-controlplane`: serves policy to mmesh agents (docs/control-plane.md).

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Context as _, bail};
use clap::Parser;
use mmesh_agent::policy::{DEFAULT_MAX_POLICY_BYTES, ReadLimits};
use mmesh_controlplane::{
    catalog::Catalog,
    etcd::{self, Etcd, Mirror},
    events, folder,
    grpc::PolicyStreamService,
    output,
    server::Service,
    status::Registry,
};
use serde_json::json;
use tokio::sync::watch;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

/// The reference control plane of mmesh: serves each connected agent the
/// policy of its node, from a folder of policy files or from etcd, and
/// pushes changes.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Policy folder: nodes/<node>.yaml (or .yml, .json) for a node,
    /// default.yaml for every other node, shared list files named by
    /// `file:` relative to the policy file. Watched.
    #[arg(
        long,
        value_name = "DIR",
        required_unless_present = "etcd",
        conflicts_with = "etcd"
    )]
    policies: Option<PathBuf>,
    /// etcd to read the same files from, as keys under --etcd-prefix (e.g.
    /// `http://127.0.0.1:2379`; its v3 JSON gateway). Watched; replicas on
    /// one etcd serve the same versions.
    #[arg(long, value_name = "URL")]
    etcd: Option<String>,
    /// The key prefix of the policy files in etcd.
    #[arg(
        long,
        value_name = "PREFIX",
        default_value = "/mmesh/policies/",
        requires = "etcd"
    )]
    etcd_prefix: String,
    /// Address to serve agents on.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
    /// Seconds between heartbeats to each agent; a stream that sends
    /// nothing for three intervals is closed.
    #[arg(long, value_name = "SECONDS", default_value_t = 10.0)]
    heartbeat: f64,
    /// The server's certificate chain (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The server's private key (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA (PEM): mutual TLS.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    client_ca: Option<PathBuf>,
    /// Serve an agent only the policy of a node its client certificate
    /// names (as a DNS name); needs --client-ca.
    #[arg(long, requires = "client_ca")]
    verify_node_name: bool,
    /// Serve without TLS (loopback tests, a mesh that encrypts already).
    #[arg(long, conflicts_with_all = ["tls_cert", "tls_key", "client_ca"])]
    plaintext: bool,
    /// Keep the status of every node (what was sent, applied, refused and
    /// why) in this JSON file, replaced atomically after changes.
    #[arg(long, value_name = "FILE")]
    status_file: Option<PathBuf>,
    /// Bytes read for one policy: the policy file and its list files.
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_MAX_POLICY_BYTES)]
    max_policy_bytes: u64,
}

/// mimalloc, not glibc malloc: with thousands of streams the sessions, the
/// connections and their TLS allocate and free small buffers from both
/// runtime threads for every message (docs/benchmarks.md, fan-out).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let served = runtime.block_on(serve());
    // The last event and log lines, and only then an error of main's.
    output::flush();
    served
}

async fn serve() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(|| output::LogWriter)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    if !args.heartbeat.is_finite() || args.heartbeat <= 0.0 {
        bail!("--heartbeat must be a positive number of seconds");
    }
    let heartbeat = Duration::from_secs_f64(args.heartbeat);
    let tls = tls_config(&args)?;
    let limits = ReadLimits {
        max_bytes: args.max_policy_bytes,
        // The folder is read a moment after its last change (debounced),
        // and read again on the next: no settling pause per file.
        settle: Duration::ZERO,
        ..ReadLimits::default()
    };

    let (catalog_tx, catalog_rx) = watch::channel(Arc::new(Catalog::default()));
    // Kept for the life of the server: the folder's watch ends with it.
    let _watcher = if let Some(dir) = &args.policies {
        let initial = folder::load(dir, None, &limits, &Catalog::default())?;
        folder::publish(&catalog_tx, initial);
        Some(folder::watch(dir.clone(), limits, catalog_tx)?)
    } else if let Some(url) = &args.etcd {
        let client = Etcd::new(url)?;
        let mut prefix = args.etcd_prefix.clone();
        if !prefix.ends_with('/') {
            prefix.push('/');
        }
        tracing::info!("policies from etcd at {url}, keys {prefix}*");
        tokio::spawn(etcd::serve(
            client,
            prefix,
            Mirror::new()?,
            limits,
            catalog_tx,
        ));
        None
    } else {
        bail!("give --policies DIR or --etcd URL");
    };

    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener.local_addr()?;
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let registry = Arc::new(Registry::new(args.status_file.is_some()));
    if let Some(path) = &args.status_file {
        tokio::spawn(Arc::clone(&registry).write_to(path.clone()));
    }
    let service = Service::new(catalog_rx, heartbeat, shutdown_rx, registry)
        .verify_node_name(args.verify_node_name);
    let mut server = Server::builder();
    if let Some(tls) = tls {
        server = server.tls_config(tls).context("TLS configuration")?;
    }
    tracing::info!(
        "serving agents on {addr} ({})",
        if args.plaintext { "plaintext" } else { "TLS" }
    );
    events::emit(
        "listening",
        json!({ "addr": addr.to_string(), "tls": !args.plaintext, "mutual_tls": args.client_ca.is_some() }),
    );
    server
        .add_service(PolicyStreamService::new(service))
        .serve_with_incoming_shutdown(
            // No Nagle: a one-account Delta is one small write.
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            async move {
                shutdown_signal().await;
                tracing::info!("shutting down");
                let _ = shutdown_tx.send(true);
            },
        )
        .await
        .context("serving agents")?;
    Ok(())
}

/// The server's TLS: none only with `--plaintext`.
fn tls_config(args: &Args) -> anyhow::Result<Option<ServerTlsConfig>> {
    let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) else {
        if args.plaintext {
            return Ok(None);
        }
        bail!(
            "no TLS: give --tls-cert and --tls-key (and --client-ca to require client \
             certificates), or --plaintext to serve without TLS"
        );
    };
    let read = |path: &PathBuf| {
        std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
    };
    let mut config = ServerTlsConfig::new().identity(Identity::from_pem(read(cert)?, read(key)?));
    if let Some(ca) = &args.client_ca {
        config = config.client_ca_root(Certificate::from_pem(read(ca)?));
    }
    Ok(Some(config))
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(e) => {
            tracing::warn!("cannot watch SIGTERM ({e}); stopping on Ctrl-C only");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Args::command().debug_assert();
    }
}
