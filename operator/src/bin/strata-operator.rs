//! `strata-operator`: CLI, metrics server, leader election, then the controllers.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};
use futures::FutureExt;
use tokio::sync::watch;

use strata_operator::context::{Context, HttpScraper};
use strata_operator::controller;
use strata_operator::fsops::StrataFs;
use strata_operator::leader::{LeaderElector, LeaseSettings, delete_leases, wait_for_no_pods};
use strata_operator::metrics::Metrics;
use strata_operator::settings::Settings;

#[derive(Parser)]
#[command(
    name = "strata-operator",
    version,
    about = "Strata operator: Volume, Quota and CacheGroup resources"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Settings file (YAML; see docs/OPERATOR.md).
    #[arg(long, env = "STRATA_OPERATOR_CONFIG")]
    config: Option<std::path::PathBuf>,
    /// Image of cache members (overrides the settings file).
    #[arg(long, env = "STRATA_IMAGE")]
    image: Option<String>,
    /// Serve /metrics, /healthz and /readyz here.
    #[arg(long, default_value = "0.0.0.0:8080")]
    metrics_addr: String,
    /// Elect a leader through a Lease so several replicas are safe.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    leader_elect: bool,
    #[arg(long, default_value = "strata-operator-leader")]
    lease_name: String,
    /// Namespace of the Lease (default: this pod's namespace, else `default`).
    #[arg(long, env = "POD_NAMESPACE")]
    lease_namespace: Option<String>,
    /// Identity in the Lease (default: the pod name / host name).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    #[arg(long, default_value_t = 15)]
    lease_duration_secs: u64,
    /// Log filter (error, warn, info, debug or a tracing filter).
    #[arg(long, env = "STRATA_LOG", default_value = "info")]
    log_level: String,
    /// Logs as JSON lines.
    #[arg(long)]
    log_json: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Delete Leases and exit (the chart's post-delete hook: the leader-election Leases of
    /// csi-provisioner, csi-resizer and the operator outlive `helm uninstall` otherwise).
    /// Missing Leases are not an error.
    CleanupLeases {
        /// Namespace of the Leases.
        #[arg(long, env = "POD_NAMESPACE")]
        namespace: String,
        /// Lease names, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        names: Vec<String>,
        /// First wait until no pod matches this label selector (the Lease holders: a
        /// sidecar still running would re-create its Lease).
        #[arg(long)]
        wait_for_pods: Option<String>,
        /// Longest wait for those pods (then the Leases are deleted anyway).
        #[arg(long, default_value_t = 120)]
        wait_timeout_secs: u64,
    },
}

/// Logs go to stderr, with ANSI colours only when it is a terminal (container logs and
/// files get plain text).
fn init_logging(level: &str, json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_new(level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    if json {
        fmt.json().init();
    } else {
        fmt.init();
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    strata::tls::install_crypto_provider();
    init_logging(&cli.log_level, cli.log_json);

    if let Some(Command::CleanupLeases {
        namespace,
        names,
        wait_for_pods,
        wait_timeout_secs,
    }) = &cli.command
    {
        let client = kube::Client::try_default()
            .await
            .context("connecting to Kubernetes (in-cluster config or KUBECONFIG)")?;
        if let Some(selector) = wait_for_pods {
            wait_for_no_pods(
                client.clone(),
                namespace,
                selector,
                Duration::from_secs(*wait_timeout_secs),
            )
            .await
            .with_context(|| format!("listing pods {selector} in {namespace}"))?;
        }
        let deleted = delete_leases(client, namespace, names)
            .await
            .with_context(|| format!("deleting Leases in {namespace}"))?;
        tracing::info!(
            "cleanup-leases: {} of {} deleted, the rest did not exist",
            deleted.len(),
            names.len()
        );
        return Ok(());
    }

    let mut settings = match &cli.config {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("reading settings {}", p.display()))?;
            Settings::from_yaml(&text)
                .with_context(|| format!("parsing settings {}", p.display()))?
        }
        None => Settings::default(),
    };
    if let Some(image) = cli.image {
        settings.image = image;
    }

    let metrics = Arc::new(Metrics::new());
    let listener = tokio::net::TcpListener::bind(&cli.metrics_addr)
        .await
        .with_context(|| format!("binding the metrics address {}", cli.metrics_addr))?;
    tokio::spawn(metrics.clone().serve(listener));

    let client = kube::Client::try_default()
        .await
        .context("connecting to Kubernetes (in-cluster config or KUBECONFIG)")?;
    let identity = cli.identity.clone().unwrap_or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| format!("strata-operator-{}", std::process::id()))
    });

    // Shutdown on SIGTERM / Ctrl-C, shared by every controller.
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing the SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down");
        let _ = tx.send(true);
    });
    let stopped = {
        let rx = rx.clone();
        async move {
            let mut rx = rx;
            let _ = rx.wait_for(|v| *v).await;
        }
        .shared()
    };

    let elector = cli.leader_elect.then(|| {
        LeaderElector::new(
            client.clone(),
            LeaseSettings {
                name: cli.lease_name.clone(),
                namespace: cli
                    .lease_namespace
                    .clone()
                    .unwrap_or_else(|| "default".into()),
                identity: identity.clone(),
                lease_duration: Duration::from_secs(cli.lease_duration_secs),
                renew: Duration::from_secs((cli.lease_duration_secs / 3).max(1)),
            },
        )
    });
    if let Some(e) = &elector {
        tracing::info!(identity = %identity, "waiting for the leader Lease");
        tokio::select! {
            r = e.acquire() => r?,
            _ = stopped.clone() => return Ok(()),
        }
        metrics.leader.set(1);
    }

    let ctx = Context::new(
        client,
        Arc::new(StrataFs::new()),
        settings,
        metrics.clone(),
        Arc::new(HttpScraper),
        Some(identity),
    );
    let lost = match &elector {
        Some(e) => {
            tokio::select! {
                _ = controller::run(ctx, stopped.clone()) => false,
                _ = e.keep() => true,
            }
        }
        None => {
            controller::run(ctx, stopped.clone()).await;
            false
        }
    };
    if let Some(e) = &elector {
        metrics.leader.set(0);
        if !lost {
            e.release().await.context("releasing the leader Lease")?;
        }
    }
    if lost {
        anyhow::bail!("lost the leader Lease; exiting so a restart rejoins the election");
    }
    Ok(())
}
