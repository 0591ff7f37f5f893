//! `strata-csi`: parses the command line and wires the services (logic in the library).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, ValueEnum};
use strata_csi::controller::{ControllerService, Metas};
use strata_csi::mounter::{Mounter, POD_GRACE, ProcessMounter};
use strata_csi::node::{NodeService, NodeSettings};
use strata_csi::params::Secrets;
use strata_csi::pod::{PodMounter, PodSettings};

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
    /// Where mount clients run: child processes of this plugin, or one mount Pod per
    /// shared mount (docs/CSI.md).
    #[arg(long, value_enum, default_value = "process")]
    mount_mode: MountMode,
    /// Pod mode: image of the mount Pods (required with --mount-mode pod).
    #[arg(long)]
    mount_image: Option<String>,
    /// Pod mode: namespace of the mount Pods and their Secrets.
    #[arg(long, env = "POD_NAMESPACE", default_value = "strata-system")]
    mount_namespace: String,
    /// Pod mode: CPU request and limit of a mount Pod, e.g. 500m.
    #[arg(long)]
    mount_cpu: Option<String>,
    /// Pod mode: memory request and limit of a mount Pod, e.g. 2Gi.
    #[arg(long)]
    mount_memory: Option<String>,
    /// Pod mode: host directory for the mount Pods' disk cache (default: an emptyDir).
    #[arg(long)]
    mount_cache_dir: Option<String>,
    /// Pod mode: seconds a shared mount may go without a client before its mount Pod is
    /// created again (kubelet restarts a crashed container by itself).
    #[arg(long, default_value_t = POD_GRACE.as_secs_f64())]
    mount_pod_grace: f64,
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

async fn pod_mounter(cli: &Cli) -> Result<Mounter> {
    let image =
        cli.mount_image.clone().filter(|i| !i.is_empty()).context(
            "--mount-mode pod requires --mount-image IMAGE (the image of the mount Pods)",
        )?;
    let grace = Duration::try_from_secs_f64(cli.mount_pod_grace)
        .context("--mount-pod-grace takes seconds (a number >= 0)")?;
    let client = kube::Client::try_default().await.context(
        "--mount-mode pod needs the Kubernetes API: no in-cluster service account \
         (KUBERNETES_SERVICE_HOST/KUBERNETES_SERVICE_PORT and its token) and no usable \
         kubeconfig (KUBECONFIG or ~/.kube/config)",
    )?;
    tracing::info!(namespace = %cli.mount_namespace, image = %image, "pod mount mode");
    Ok(Mounter::Pod {
        pods: Box::new(PodMounter {
            client,
            settings: PodSettings {
                namespace: cli.mount_namespace.clone(),
                node_name: cli.node_id.clone(),
                image,
                cpu: cli.mount_cpu.clone(),
                memory: cli.mount_memory.clone(),
                cache_dir: cli.mount_cache_dir.clone(),
            },
        }),
        rt: tokio::runtime::Handle::current(),
        grace,
    })
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    strata::tls::install_crypto_provider();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&cli.log_level)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colour only for a terminal: container logs (a pipe, a file) get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
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
        let mounter = match cli.mount_mode {
            MountMode::Process => Mounter::Process(ProcessMounter {
                strata_bin: s.strata_bin.clone(),
            }),
            MountMode::Pod => pod_mounter(&cli).await?,
        };
        // Recovery of earlier mounts blocks (mounts, API calls in pod mode).
        Some(
            tokio::task::spawn_blocking(move || NodeService::with_mounter(s, mounter))
                .await
                .context("node service setup")??,
        )
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
