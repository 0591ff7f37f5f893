//! `strata gateway`: an S3-compatible endpoint over a volume (or one of its directories).
//!
//! The volume is opened like a mount (same cache tiers and cache group, a session of its
//! own) and its files are served as the objects of one bucket named after the volume: keys
//! are paths ([`objects`]), listings walk directories in S3 key order ([`list`]), requests
//! are authenticated with AWS Signature V4 ([`sigv4`]; V2 too, [`sigv2`]), bodies may be `aws-chunked` with
//! checksums ([`body`]). HTTP/1.1 is served by hyper on a tokio runtime; file-system work
//! runs on tokio's blocking pool; object bodies are streamed in block-sized pieces.
//! docs/GATEWAY.md is the user's guide.

pub mod body;
pub mod dates;
pub mod error;
pub mod list;
pub mod objects;
pub mod server;
pub mod sigv2;
pub mod sigv4;
mod wire;
pub mod xml;

use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::meta::{Ctx, ROOT_INO, redact_url};
use crate::metrics::{self, Metrics};
use crate::mount::{self, MountError, MountOptions};
use crate::vfs::Vfs;
use crate::volume;

pub use error::S3Error;
pub use server::Gateway;
pub use sigv4::Credentials;

/// Tuning of the S3 server (the volume side is [`MountOptions`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct GatewaySettings {
    /// Most keys in one listing page; a larger `max-keys` is lowered to it (as S3: 1000).
    pub max_keys: usize,
    /// Seconds between the keep-alive spaces sent during a long copy or multipart completion.
    pub keepalive_secs: u64,
    /// Seconds a client may take to send a request's headers.
    pub header_timeout_secs: u64,
    /// Seconds the requests in progress get to finish at shutdown.
    pub shutdown_grace_secs: u64,
    /// Threads of the HTTP server (0: one per core). File-system work runs on tokio's
    /// blocking pool, not on these.
    pub io_threads: usize,
}

impl Default for GatewaySettings {
    fn default() -> Self {
        GatewaySettings {
            max_keys: 1000,
            keepalive_secs: 10,
            header_timeout_secs: 60,
            shutdown_grace_secs: 30,
            io_threads: 0,
        }
    }
}

/// Everything `strata gateway` needs besides META_URL.
#[derive(Debug, Clone)]
pub struct GatewayOptions {
    /// Where to listen, `HOST:PORT` (port 0: any free port; the one chosen is printed).
    pub address: String,
    pub settings: GatewaySettings,
    /// The volume side, as for a mount: `--subdir`, `--read-only` (`vfs.read_only`),
    /// `--metrics`, caches and cache group, buffers, sessions.
    pub mount: MountOptions,
    /// The one key pair clients sign with.
    pub credentials: Credentials,
}

/// Errors that stop the gateway from starting or serving.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error(transparent)]
    Mount(#[from] MountError),
    #[error(transparent)]
    Volume(#[from] volume::VolumeError),
    #[error("{0}")]
    Setup(String),
}

/// The line printed to stderr once requests are served (scripts wait for it).
pub fn ready_line(bucket: &str, addr: &std::net::SocketAddr) -> String {
    format!("serving s3://{bucket} at http://{addr}")
}

/// Wait for SIGINT, SIGTERM or SIGHUP (blocked in every thread by
/// [`mount::block_signals`]) in a thread of its own and report it on the channel.
fn spawn_signal_waiter(tx: watch::Sender<bool>) {
    let _ = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let sig = mount::wait_for_stop_signal();
            tracing::info!(signal = sig, "signal received, stopping the gateway");
            let _ = tx.send(true);
        });
}

/// Open the volume, serve S3 until SIGINT/SIGTERM/SIGHUP, then finish the requests in
/// progress, flush and end the session. Call [`mount::block_signals`] first.
pub fn run(meta_url: &str, opts: &GatewayOptions) -> Result<(), GatewayError> {
    if opts.credentials.access_key.is_empty() || opts.credentials.secret_key.is_empty() {
        return Err(GatewayError::Setup(
            "the gateway needs a key pair: --access-key and --secret-key, or STRATA_GATEWAY_ACCESS_KEY and STRATA_GATEWAY_SECRET_KEY"
                .into(),
        ));
    }
    let from_env;
    let meta_url = if meta_url == "-" {
        from_env = std::env::var("STRATA_META_URL").map_err(|_| {
            GatewayError::Setup("META_URL is `-` but STRATA_META_URL is not set".into())
        })?;
        from_env.as_str()
    } else {
        meta_url
    };
    let metrics = Arc::new(Metrics::new());
    let vol = mount::open_volume(meta_url, metrics.clone(), &opts.mount)?;
    mount::label_metrics(&metrics, &vol.format.name, &opts.mount)?;
    let root = match &opts.mount.subdir {
        Some(s) => volume::resolve_dir(&vol.meta, s)?,
        None => ROOT_INO,
    };
    if let Some(addr) = &opts.mount.metrics {
        let bound = metrics::serve(metrics.clone(), addr).map_err(|e| {
            GatewayError::Setup(format!(
                "--metrics {addr}: cannot listen: {e} (choose a free address like 127.0.0.1:9567)"
            ))
        })?;
        tracing::info!(address = %bound, "metrics at http://{bound}/metrics");
    }
    let vfs = Vfs::try_new(
        vol.meta.clone(),
        vol.store.clone(),
        vol.format.clone(),
        metrics.clone(),
        opts.mount.vfs.clone(),
    )
    .map_err(|e| GatewayError::Setup(e.to_string()))?;
    vol.meta
        .new_session(&vfs.session_info())
        .map_err(|e| GatewayError::Volume(e.into()))?;
    vfs.start_background();
    mount::start_mirror_copier(&vol, &opts.mount);
    // SAFETY: geteuid and getegid have no preconditions.
    let ctx = unsafe {
        Ctx {
            uid: libc::geteuid(),
            gid: libc::getegid(),
        }
    };
    let objects = Arc::new(objects::Objects::new(vfs.clone(), root, ctx));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0);
    match objects.clean_stale_temp(now) {
        Ok(0) => {}
        Ok(n) => tracing::info!(files = n, "removed temporary files of interrupted uploads"),
        Err(e) => tracing::warn!(error = %e, "removing stale temporary files failed"),
    }
    let bucket = vol.format.name.clone();
    let gw = Arc::new(Gateway::new(
        objects,
        bucket.clone(),
        opts.credentials.clone(),
        metrics,
        opts.settings.clone(),
    ));
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if opts.settings.io_threads > 0 {
        rt.worker_threads(opts.settings.io_threads);
    }
    let rt = rt
        .thread_name("gateway")
        .enable_all()
        .build()
        .map_err(|e| GatewayError::Setup(format!("starting the server runtime: {e}")))?;
    let (stop_tx, stop_rx) = watch::channel(false);
    spawn_signal_waiter(stop_tx);
    let res = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(&opts.address)
            .await
            .map_err(|e| {
                GatewayError::Setup(format!(
                    "cannot listen on {}: {e} (give HOST:PORT, e.g. 127.0.0.1:9000)",
                    opts.address
                ))
            })?;
        let addr = listener
            .local_addr()
            .map_err(|e| GatewayError::Setup(e.to_string()))?;
        tracing::info!(volume = %bucket, meta = %redact_url(meta_url), store = %vol.store.describe(),
            subdir = ?opts.mount.subdir, read_only = opts.mount.vfs.read_only, address = %addr,
            "S3 gateway started");
        eprintln!("{}", ready_line(&bucket, &addr));
        serve(gw, listener, stop_rx, &opts.settings).await;
        Ok(())
    });
    // Requests still running past the grace period are dropped with the runtime.
    rt.shutdown_timeout(Duration::from_secs(1));
    tracing::info!(volume = %bucket, "gateway stopped, flushing");
    vfs.shutdown();
    res
}

/// Accept connections until `stop` turns true, then wait up to the grace period for the
/// requests in progress.
pub async fn serve(
    gw: Arc<Gateway>,
    listener: tokio::net::TcpListener,
    mut stop: watch::Receiver<bool>,
    settings: &GatewaySettings,
) {
    let graceful = GracefulShutdown::new();
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(settings.header_timeout_secs.max(1)))
        .keep_alive(true);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, remote) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: wait instead of spinning.
                        tracing::warn!(error = %e, "accepting a connection failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let gw = gw.clone();
                let svc = service_fn(move |req| gw.clone().handle(req, remote));
                let conn = graceful.watch(builder.serve_connection(TokioIo::new(stream), svc));
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(remote = %remote, error = %e, "connection ended with an error");
                    }
                });
            }
            _ = stop.changed() => break,
        }
    }
    drop(listener);
    let grace = Duration::from_secs(settings.shutdown_grace_secs);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(grace) => {
            tracing::warn!("requests still running after {grace:?}: stopping anyway");
        }
    }
}
