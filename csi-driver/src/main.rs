//! `strata-csi`: parses the command line and wires the services (logic in the library).

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, ValueEnum};
use strata_csi::controller::{ControllerService, Metas};
use strata_csi::node::{NodeService, NodeSettings};
use strata_csi::params::Secrets;

#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum MountMode {
    Process,
    Pod,
}

#[derive(Parser)]
#[command(
    name = "strata-csi",
    version,
    about = "Strata CSI driver (csi.strata.io)"
)]
struct Cli {
    /// CSI endpoint, e.g. unix:///var/lib/kubelet/plugins/csi.strata.io/csi.sock
    #[arg(long)]
    endpoint: String,
    #[arg(long, default_value = "")]
    node_id: String,
    /// Serve the Controller service.
    #[arg(long)]
    controller: bool,
    /// Serve the Node service.
    #[arg(long)]
    node: bool,
    #[arg(long, value_enum, default_value = "process")]
    mount_mode: MountMode,
    #[arg(long, default_value = "/var/lib/strata-csi")]
    state_dir: PathBuf,
    /// `strata` binary used by process mode (default: next to this one, else PATH).
    #[arg(long)]
    strata_bin: Option<PathBuf>,
    /// Topology segment KEY=VALUE reported by NodeGetInfo (repeatable).
    #[arg(long = "topology", value_name = "KEY=VALUE")]
    topology: Vec<String>,
    /// File holding a META_URL used when a controller request carries no secrets.
    #[arg(long)]
    default_metaurl_file: Option<PathBuf>,
    #[arg(long, default_value = "info", env = "STRATA_LOG")]
    log_level: String,
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&cli.log_level)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    if cli.mount_mode == MountMode::Pod {
        anyhow::bail!("--mount-mode pod is not available in this build; use --mount-mode process");
    }
    let default_secrets = match &cli.default_metaurl_file {
        Some(p) => Some(Secrets {
            metaurl: std::fs::read_to_string(p)
                .with_context(|| format!("reading {}", p.display()))?
                .trim()
                .to_string(),
            ..Secrets::default()
        }),
        None => None,
    };
    let controller = cli
        .controller
        .then(|| ControllerService::new(Metas::default(), default_secrets));
    let node = if cli.node {
        anyhow::ensure!(!cli.node_id.is_empty(), "--node requires --node-id");
        let mut topology = BTreeMap::new();
        for t in &cli.topology {
            let (k, v) = t.split_once('=').context("--topology takes KEY=VALUE")?;
            topology.insert(k.to_string(), v.to_string());
        }
        let mut s = NodeSettings {
            node_id: cli.node_id.clone(),
            state_dir: cli.state_dir.clone(),
            topology,
            ..NodeSettings::default()
        };
        if let Some(b) = &cli.strata_bin {
            s.strata_bin = b.clone();
        }
        Some(NodeService::new(s)?)
    } else {
        None
    };
    anyhow::ensure!(
        controller.is_some() || node.is_some(),
        "give --controller and/or --node"
    );
    let sock = PathBuf::from(strata_csi::server::socket_path(&cli.endpoint));
    tracing::info!(endpoint = %cli.endpoint, node_id = %cli.node_id, "serving csi.strata.io");
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("signal handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    strata_csi::server::serve(&sock, controller, node, shutdown).await?;
    Ok(())
}
