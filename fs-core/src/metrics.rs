//! The one metrics facade of Strata. Every metric name lives in [`names`]; components receive
//! an `Arc<Metrics>` (no globals) and record through the typed helpers below. The registry is
//! encoded as Prometheus text by [`Metrics::encode`] and served by [`serve`].

use std::borrow::Cow;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::RwLock;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// All metric names (without the `_total` suffix the encoder adds to counters).
pub mod names {
    pub const FUSE_OPS: &str = "strata_fuse_ops";
    pub const FUSE_OP_SECONDS: &str = "strata_fuse_op_seconds";
    pub const FUSE_ERRORS: &str = "strata_fuse_errors";
    pub const FUSE_BYTES: &str = "strata_fuse_bytes";
    pub const OBJECT_REQUESTS: &str = "strata_object_requests";
    pub const OBJECT_ERRORS: &str = "strata_object_errors";
    pub const OBJECT_BYTES: &str = "strata_object_bytes";
    pub const OBJECT_REQUEST_SECONDS: &str = "strata_object_request_seconds";
    pub const META_TXN_SECONDS: &str = "strata_meta_txn_seconds";
    pub const META_TXN_RETRIES: &str = "strata_meta_txn_retries";
    pub const BUFFER_BYTES: &str = "strata_buffer_bytes";
    pub const MIRROR_BACKLOG: &str = "strata_mirror_backlog_objects";
    pub const MIRROR_COPIED: &str = "strata_mirror_copied_objects";
    pub const MIRROR_COPIED_BYTES: &str = "strata_mirror_copied_bytes";
    pub const MIRROR_DEFERRED: &str = "strata_mirror_deferred_writes";
    pub const COMPACTIONS: &str = "strata_compactions";
    pub const OBJECTS_RECLAIMED: &str = "strata_objects_reclaimed";
    pub const CACHE_HITS: &str = "strata_cache_hits";
    pub const CACHE_MISSES: &str = "strata_cache_misses";
    pub const CACHE_PEER_HITS: &str = "strata_cache_peer_hits";
    pub const CACHE_PEER_ERRORS: &str = "strata_cache_peer_errors";
    pub const CACHE_BYTES: &str = "strata_cache_bytes";
    pub const CACHE_EVICTIONS: &str = "strata_cache_evictions";
    pub const CACHE_CORRUPT: &str = "strata_cache_corrupt_blocks";
    pub const CACHE_PEER_SERVED: &str = "strata_cache_peer_served";
    pub const CACHE_SKIPPED: &str = "strata_cache_skipped_blocks";
    pub const GATEWAY_REQUESTS: &str = "strata_gateway_requests";
    pub const GATEWAY_REQUEST_SECONDS: &str = "strata_gateway_request_seconds";
    pub const GATEWAY_BYTES: &str = "strata_gateway_bytes";
    pub const SOURCE_REQUESTS: &str = "strata_source_requests";
    pub const SOURCE_ERRORS: &str = "strata_source_errors";
    pub const SOURCE_BYTES: &str = "strata_source_bytes";
    pub const CACHE_CAPACITY: &str = "strata_cache_capacity_bytes";
    pub const WRITEBACK_STAGED_BYTES: &str = "strata_writeback_staged_bytes";
    pub const WRITEBACK_STAGED_BLOCKS: &str = "strata_writeback_staged_blocks";
    pub const WRITEBACK_UPLOADED: &str = "strata_writeback_uploaded_blocks";
    pub const WRITEBACK_FAILURES: &str = "strata_writeback_upload_failures";
    pub const WRITEBACK_DROPPED: &str = "strata_writeback_dropped_blocks";
}

type Labels = Vec<(&'static str, String)>;

/// Label names the families use themselves (and Prometheus' own): not usable as constant
/// labels.
const RESERVED_LABELS: &[&str] = &[
    "op",
    "errno",
    "direction",
    "tier",
    "reason",
    "status",
    "le",
    "quantile",
    "job",
    "instance",
];

/// A constant label refused by [`Metrics::set_labels`] or [`parse_labels`].
#[derive(Debug, thiserror::Error)]
pub enum LabelError {
    #[error(
        "metric label name {0:?} is not valid: use letters, digits and '_', not starting with a digit or '__'"
    )]
    Name(String),
    #[error(
        "metric label {0:?} is used by Strata's own metrics (or by Prometheus): choose another name"
    )]
    Reserved(String),
    #[error("metric label {0:?} is given twice")]
    Duplicate(String),
    #[error(
        "value of metric label {name:?} must not contain '\"', '\\' or a line break: {value:?}"
    )]
    Value { name: String, value: String },
    #[error(
        "metric labels must be NAME=VALUE pairs separated by commas (e.g. pod=p,namespace=n), not {0:?}"
    )]
    Syntax(String),
}

fn check_label(name: &str, value: &str) -> Result<(), LabelError> {
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    if !first_ok
        || name.starts_with("__")
        || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    {
        return Err(LabelError::Name(name.to_string()));
    }
    if RESERVED_LABELS.contains(&name) {
        return Err(LabelError::Reserved(name.to_string()));
    }
    if value.contains(['"', '\\', '\n', '\r']) {
        return Err(LabelError::Value {
            name: name.to_string(),
            value: value.to_string(),
        });
    }
    Ok(())
}

/// Parse `NAME=VALUE,NAME=VALUE` (`--metrics-labels`); empty values are kept, an empty
/// string is no labels.
pub fn parse_labels(text: &str) -> Result<Vec<(String, String)>, LabelError> {
    let mut out = Vec::new();
    for pair in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| LabelError::Syntax(pair.to_string()))?;
        let (k, v) = (k.trim(), v.trim());
        check_label(k, v)?;
        out.push((k.to_string(), v.to_string()));
    }
    Ok(out)
}

fn seconds_histogram() -> Histogram {
    // 10 µs .. ~80 s
    Histogram::new(exponential_buckets(0.00001, 2.5, 18))
}

/// Counters, gauges and histograms of one process.
pub struct Metrics {
    /// The families below registered with the constant labels of the process (the volume,
    /// and pod/namespace/PV in Kubernetes); rebuilt by [`Metrics::set_labels`].
    registry: RwLock<Registry>,
    fuse_ops: Family<Labels, Counter>,
    fuse_errors: Family<Labels, Counter>,
    fuse_op_seconds: Family<Labels, Histogram, fn() -> Histogram>,
    object_requests: Family<Labels, Counter>,
    object_errors: Family<Labels, Counter>,
    object_bytes: Family<Labels, Counter>,
    object_request_seconds: Family<Labels, Histogram, fn() -> Histogram>,
    meta_txn_seconds: Histogram,
    meta_txn_retries: Counter,
    buffer_bytes: Gauge,
    mirror_backlog: Gauge,
    writeback_staged_bytes: Gauge,
    writeback_staged_blocks: Gauge,
    writeback_uploaded: Counter,
    writeback_failures: Counter,
    writeback_dropped: Counter,
    mirror_copied: Counter,
    mirror_copied_bytes: Counter,
    mirror_deferred: Counter,
    compactions: Counter,
    objects_reclaimed: Counter,
    cache_hits: Family<Labels, Counter>,
    cache_misses: Counter,
    cache_peer_hits: Counter,
    cache_peer_errors: Counter,
    cache_bytes: Family<Labels, Gauge>,
    cache_evictions: Family<Labels, Counter>,
    cache_corrupt: Counter,
    cache_peer_served: Counter,
    cache_skipped: Family<Labels, Counter>,
    gateway_requests: Family<Labels, Counter>,
    gateway_request_seconds: Family<Labels, Histogram, fn() -> Histogram>,
    gateway_bytes: Family<Labels, Counter>,
    source_requests: Family<Labels, Counter>,
    source_errors: Family<Labels, Counter>,
    source_bytes: Counter,
    fuse_bytes: Family<Labels, Counter>,
    cache_capacity: Family<Labels, Gauge>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Metrics without constant labels; a process that serves them calls
    /// [`Metrics::set_labels`] once it knows its volume.
    pub fn new() -> Self {
        let m = Metrics {
            registry: RwLock::new(Registry::default()),
            fuse_ops: Default::default(),
            fuse_errors: Default::default(),
            fuse_op_seconds: Family::new_with_constructor(seconds_histogram),
            object_requests: Default::default(),
            object_errors: Default::default(),
            object_bytes: Default::default(),
            object_request_seconds: Family::new_with_constructor(seconds_histogram),
            meta_txn_seconds: seconds_histogram(),
            meta_txn_retries: Default::default(),
            buffer_bytes: Default::default(),
            mirror_backlog: Default::default(),
            writeback_staged_bytes: Default::default(),
            writeback_staged_blocks: Default::default(),
            writeback_uploaded: Default::default(),
            writeback_dropped: Default::default(),
            writeback_failures: Default::default(),
            mirror_copied: Default::default(),
            mirror_copied_bytes: Default::default(),
            mirror_deferred: Default::default(),
            compactions: Default::default(),
            objects_reclaimed: Default::default(),
            cache_hits: Default::default(),
            cache_misses: Default::default(),
            cache_peer_hits: Default::default(),
            cache_peer_errors: Default::default(),
            cache_bytes: Default::default(),
            cache_evictions: Default::default(),
            cache_corrupt: Default::default(),
            cache_peer_served: Default::default(),
            cache_skipped: Default::default(),
            gateway_requests: Default::default(),
            gateway_request_seconds: Family::new_with_constructor(seconds_histogram),
            gateway_bytes: Default::default(),
            source_requests: Default::default(),
            source_errors: Default::default(),
            source_bytes: Default::default(),
            fuse_bytes: Default::default(),
            cache_capacity: Default::default(),
        };
        // Error series exist from the start at 0, so that error rates and ratios are 0
        // rather than missing while nothing fails.
        for op in ["get", "put", "delete", "head", "list"] {
            drop(m.object_errors.get_or_create(&vec![("op", op.to_string())]));
        }
        drop(
            m.cache_skipped
                .get_or_create(&vec![("reason", "low_space".to_string())]),
        );
        *m.registry.write() = m.registry_with(Vec::new());
        m
    }

    /// Metrics whose every sample carries `labels` (e.g. `volume="data"`).
    pub fn with_labels(labels: &[(String, String)]) -> Result<Self, LabelError> {
        let m = Self::new();
        m.set_labels(labels)?;
        Ok(m)
    }

    /// Give every sample of this process the constant `labels` (the volume name, and the
    /// pod/namespace/PV of a mount Pod), from now on. Values recorded before are kept.
    pub fn set_labels(&self, labels: &[(String, String)]) -> Result<(), LabelError> {
        let mut seen = std::collections::HashSet::new();
        for (k, v) in labels {
            check_label(k, v)?;
            if !seen.insert(k.as_str()) {
                return Err(LabelError::Duplicate(k.clone()));
            }
        }
        let owned = labels
            .iter()
            .map(|(k, v)| (Cow::Owned(k.clone()), Cow::Owned(v.clone())))
            .collect();
        *self.registry.write() = self.registry_with(owned);
        Ok(())
    }

    /// A registry with every family of this process, under the constant `labels`.
    fn registry_with(&self, labels: Vec<(Cow<'static, str>, Cow<'static, str>)>) -> Registry {
        let mut registry = Registry::with_labels(labels.into_iter());
        registry.register(
            names::FUSE_OPS,
            "FUSE operations served, by op",
            self.fuse_ops.clone(),
        );
        registry.register(
            names::FUSE_ERRORS,
            "FUSE operations answered with an error, by op and errno",
            self.fuse_errors.clone(),
        );
        registry.register(
            names::FUSE_OP_SECONDS,
            "Latency of FUSE operations, by op",
            self.fuse_op_seconds.clone(),
        );
        registry.register(
            names::OBJECT_REQUESTS,
            "Object store requests, by op (get/put/delete/head/list; map: a read of a local store's file through its mapping; sync)",
            self.object_requests.clone(),
        );
        registry.register(
            names::OBJECT_ERRORS,
            "Object store requests that failed, by op",
            self.object_errors.clone(),
        );
        registry.register(
            names::OBJECT_BYTES,
            "Bytes moved to/from the object store, by direction (upload/download)",
            self.object_bytes.clone(),
        );
        registry.register(
            names::OBJECT_REQUEST_SECONDS,
            "Latency of object store requests, by op",
            self.object_request_seconds.clone(),
        );
        registry.register(
            names::META_TXN_SECONDS,
            "Latency of metadata transactions",
            self.meta_txn_seconds.clone(),
        );
        registry.register(
            names::META_TXN_RETRIES,
            "Metadata transactions retried after a conflict",
            self.meta_txn_retries.clone(),
        );
        registry.register(
            names::BUFFER_BYTES,
            "Bytes of written data buffered in memory, not yet uploaded",
            self.buffer_bytes.clone(),
        );
        registry.register(
            names::WRITEBACK_STAGED_BYTES,
            "Bytes of written blocks staged on the local disk (write-back), not yet uploaded",
            self.writeback_staged_bytes.clone(),
        );
        registry.register(
            names::WRITEBACK_STAGED_BLOCKS,
            "Written blocks staged on the local disk (write-back), not yet uploaded",
            self.writeback_staged_blocks.clone(),
        );
        registry.register(
            names::WRITEBACK_UPLOADED,
            "Staged blocks uploaded to the object store (write-back)",
            self.writeback_uploaded.clone(),
        );
        registry.register(
            names::WRITEBACK_FAILURES,
            "Failed uploads of staged blocks (each is retried)",
            self.writeback_failures.clone(),
        );
        registry.register(
            names::WRITEBACK_DROPPED,
            "Staged blocks dropped instead of uploaded: their file was deleted, truncated or overwritten first (write-back)",
            self.writeback_dropped.clone(),
        );
        registry.register(
            names::MIRROR_BACKLOG,
            "Objects one of the two stores of a mirrored volume may lack (the volume's backlog, as last read by this client)",
            self.mirror_backlog.clone(),
        );
        registry.register(
            names::MIRROR_COPIED,
            "Objects this client's mirror copier copied between the stores",
            self.mirror_copied.clone(),
        );
        registry.register(
            names::MIRROR_COPIED_BYTES,
            "Bytes this client's mirror copier copied between the stores",
            self.mirror_copied_bytes.clone(),
        );
        registry.register(
            names::MIRROR_DEFERRED,
            "Writes the mirror did not take at once, recorded in the backlog",
            self.mirror_deferred.clone(),
        );
        registry.register(
            names::COMPACTIONS,
            "Chunks compacted",
            self.compactions.clone(),
        );
        registry.register(
            names::OBJECTS_RECLAIMED,
            "Objects deleted by background reclamation",
            self.objects_reclaimed.clone(),
        );
        registry.register(
            names::CACHE_HITS,
            "Block reads served from this client's cache, by tier (memory/disk)",
            self.cache_hits.clone(),
        );
        registry.register(
            names::CACHE_MISSES,
            "Block reads not in this client's cache (fetched from a peer or the object store)",
            self.cache_misses.clone(),
        );
        registry.register(
            names::CACHE_PEER_HITS,
            "Block misses served by a peer of the cache group",
            self.cache_peer_hits.clone(),
        );
        registry.register(
            names::CACHE_PEER_ERRORS,
            "Peer requests that failed or timed out (the read fell back to the object store)",
            self.cache_peer_errors.clone(),
        );
        registry.register(
            names::CACHE_BYTES,
            "Bytes held in the block cache, by tier (memory/disk)",
            self.cache_bytes.clone(),
        );
        registry.register(
            names::CACHE_EVICTIONS,
            "Blocks evicted from the cache, by tier (memory/disk)",
            self.cache_evictions.clone(),
        );
        registry.register(
            names::CACHE_CORRUPT,
            "Cached blocks dropped because their checksum or size did not match",
            self.cache_corrupt.clone(),
        );
        registry.register(
            names::CACHE_PEER_SERVED,
            "Blocks this member served to peers of its cache group",
            self.cache_peer_served.clone(),
        );
        registry.register(
            names::CACHE_SKIPPED,
            "Blocks not written to the disk cache, by reason (low_space: the cache file system is below --free-space-ratio free)",
            self.cache_skipped.clone(),
        );
        registry.register(
            names::GATEWAY_REQUESTS,
            "S3 gateway requests answered, by S3 operation and HTTP status",
            self.gateway_requests.clone(),
        );
        registry.register(
            names::GATEWAY_REQUEST_SECONDS,
            "Latency of S3 gateway requests (until the last byte of the answer), by S3 operation",
            self.gateway_request_seconds.clone(),
        );
        registry.register(
            names::GATEWAY_BYTES,
            "Object bytes received (in) and sent (out) by the S3 gateway",
            self.gateway_bytes.clone(),
        );
        registry.register(
            names::SOURCE_REQUESTS,
            "Requests to attached sources (buckets written by others), by op (list/get)",
            self.source_requests.clone(),
        );
        registry.register(
            names::SOURCE_ERRORS,
            "Requests to attached sources that failed (after retries), by op",
            self.source_errors.clone(),
        );
        registry.register(
            names::SOURCE_BYTES,
            "Bytes read from attached sources",
            self.source_bytes.clone(),
        );
        registry.register(
            names::FUSE_BYTES,
            "Bytes read and written by applications through FUSE, by direction (read/write)",
            self.fuse_bytes.clone(),
        );
        registry.register(
            names::CACHE_CAPACITY,
            "Capacity of the block cache in bytes, by tier (disk: the --cache-size of the disk tier)",
            self.cache_capacity.clone(),
        );
        registry
    }

    pub fn fuse_op(&self, op: &'static str, elapsed: Duration, errno: Option<i32>) {
        let labels = vec![("op", op.to_string())];
        self.fuse_ops.get_or_create(&labels).inc();
        self.fuse_op_seconds
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64());
        if let Some(e) = errno {
            self.fuse_errors
                .get_or_create(&vec![("op", op.to_string()), ("errno", e.to_string())])
                .inc();
        }
    }

    pub fn object_request(&self, op: &'static str, elapsed: Duration, ok: bool) {
        let labels = vec![("op", op.to_string())];
        self.object_requests.get_or_create(&labels).inc();
        self.object_request_seconds
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64());
        if !ok {
            self.object_errors.get_or_create(&labels).inc();
        }
    }

    /// Bytes an application read or wrote through FUSE.
    pub fn fuse_bytes(&self, write: bool, n: u64) {
        let dir = if write { "write" } else { "read" };
        self.fuse_bytes
            .get_or_create(&vec![("direction", dir.to_string())])
            .inc_by(n);
    }

    /// The registry as Prometheus text without histogram buckets (sums and counts stay):
    /// small enough for an extended attribute (`strata stats`).
    pub fn encode_compact(&self) -> String {
        self.encode()
            .lines()
            .filter(|l| !l.starts_with('#') && !l.contains("_bucket{"))
            .flat_map(|l| [l, "\n"])
            .collect()
    }

    /// A request to an attached source (`list` or `get`), and the bytes it delivered.
    pub fn source_request(&self, op: &'static str, ok: bool, bytes: u64) {
        let labels = vec![("op", op.to_string())];
        self.source_requests.get_or_create(&labels).inc();
        if !ok {
            self.source_errors.get_or_create(&labels).inc();
        }
        self.source_bytes.inc_by(bytes);
    }

    pub fn object_bytes(&self, upload: bool, n: u64) {
        let dir = if upload { "upload" } else { "download" };
        self.object_bytes
            .get_or_create(&vec![("direction", dir.to_string())])
            .inc_by(n);
    }

    /// How many object requests of `op` were made so far (tests and benchmarks).
    pub fn object_request_count(&self, op: &'static str) -> u64 {
        self.object_requests
            .get_or_create(&vec![("op", op.to_string())])
            .get()
    }

    pub fn meta_txn(&self, elapsed: Duration, retries: u32) {
        self.meta_txn_seconds.observe(elapsed.as_secs_f64());
        if retries > 0 {
            self.meta_txn_retries.inc_by(retries as u64);
        }
    }

    pub fn buffer_bytes(&self, delta: i64) {
        self.buffer_bytes.inc_by(delta);
    }

    /// Blocks and bytes staged for upload (write-back).
    pub fn writeback_staged(&self, blocks: u64, bytes: u64) {
        self.writeback_staged_blocks.set(blocks as i64);
        self.writeback_staged_bytes.set(bytes as i64);
    }

    pub fn writeback_uploaded(&self) {
        self.writeback_uploaded.inc();
    }

    pub fn writeback_failure(&self) {
        self.writeback_failures.inc();
    }

    pub fn writeback_dropped(&self) {
        self.writeback_dropped.inc();
    }

    pub fn mirror_backlog(&self, objects: u64) {
        self.mirror_backlog.set(objects as i64);
    }

    pub fn mirror_copied(&self, objects: u64, bytes: u64) {
        self.mirror_copied.inc_by(objects);
        self.mirror_copied_bytes.inc_by(bytes);
    }

    pub fn mirror_deferred(&self) {
        self.mirror_deferred.inc();
    }

    pub fn compaction(&self) {
        self.compactions.inc();
    }

    pub fn objects_reclaimed(&self, n: u64) {
        self.objects_reclaimed.inc_by(n);
    }

    pub fn cache_hit(&self, tier: &'static str) {
        self.cache_hits
            .get_or_create(&vec![("tier", tier.to_string())])
            .inc();
    }

    pub fn cache_skipped(&self, reason: &'static str) {
        self.cache_skipped
            .get_or_create(&vec![("reason", reason.to_string())])
            .inc();
    }

    pub fn cache_miss(&self) {
        self.cache_misses.inc();
    }

    pub fn cache_peer_hit(&self) {
        self.cache_peer_hits.inc();
    }

    pub fn cache_peer_error(&self) {
        self.cache_peer_errors.inc();
    }

    pub fn cache_peer_served(&self) {
        self.cache_peer_served.inc();
    }

    pub fn cache_bytes(&self, tier: &'static str, bytes: u64) {
        self.cache_bytes
            .get_or_create(&vec![("tier", tier.to_string())])
            .set(bytes as i64);
    }

    /// The capacity of a cache tier in bytes (for "cache full" alerts).
    pub fn cache_capacity(&self, tier: &'static str, bytes: u64) {
        self.cache_capacity
            .get_or_create(&vec![("tier", tier.to_string())])
            .set(bytes.min(i64::MAX as u64) as i64);
    }

    pub fn cache_evictions(&self, tier: &'static str, n: u64) {
        if n > 0 {
            self.cache_evictions
                .get_or_create(&vec![("tier", tier.to_string())])
                .inc_by(n);
        }
    }

    pub fn cache_corrupt(&self) {
        self.cache_corrupt.inc();
    }

    /// One answered S3 gateway request.
    pub fn gateway_request(
        &self,
        op: &'static str,
        status: u16,
        elapsed: Duration,
        bytes_in: u64,
        bytes_out: u64,
    ) {
        self.gateway_requests
            .get_or_create(&vec![
                ("op", op.to_string()),
                ("status", status.to_string()),
            ])
            .inc();
        self.gateway_request_seconds
            .get_or_create(&vec![("op", op.to_string())])
            .observe(elapsed.as_secs_f64());
        for (dir, n) in [("in", bytes_in), ("out", bytes_out)] {
            if n > 0 {
                self.gateway_bytes
                    .get_or_create(&vec![("direction", dir.to_string())])
                    .inc_by(n);
            }
        }
    }

    /// How many S3 gateway requests of `op` were answered with `status` (tests).
    pub fn gateway_request_count(&self, op: &'static str, status: u16) -> u64 {
        self.gateway_requests
            .get_or_create(&vec![
                ("op", op.to_string()),
                ("status", status.to_string()),
            ])
            .get()
    }

    /// Counts for tests and `strata warmup`: (memory hits, disk hits, misses, peer hits).
    pub fn cache_counts(&self) -> (u64, u64, u64, u64) {
        let hit = |t: &str| {
            self.cache_hits
                .get_or_create(&vec![("tier", t.to_string())])
                .get()
        };
        (
            hit("memory"),
            hit("disk"),
            self.cache_misses.get(),
            self.cache_peer_hits.get(),
        )
    }

    /// The registry as Prometheus text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Encoding into a String cannot fail.
        let _ = encode(&mut out, &self.registry.read());
        out
    }
}

/// Serve `GET /metrics` on `addr` from a background thread. Returns the bound address (useful
/// with port 0).
pub fn serve(metrics: Arc<Metrics>, addr: &str) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)?;
    let local = listener.local_addr()?;
    std::thread::Builder::new()
        .name("metrics-http".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                let mut buf = [0u8; 4096];
                let n = stream.read(&mut buf).unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]);
                let path = req.split_whitespace().nth(1).unwrap_or("");
                let (status, ctype, body) = if path == "/metrics" || path.starts_with("/metrics?") {
                    (
                        "200 OK",
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        metrics.encode(),
                    )
                } else {
                    ("404 Not Found", "text/plain", "try /metrics\n".to_string())
                };
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        })?;
    Ok(local)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_encoded_with_labels() {
        let m = Metrics::new();
        m.fuse_op("lookup", Duration::from_millis(1), None);
        m.object_request("get", Duration::from_millis(2), true);
        m.object_bytes(false, 10);
        m.meta_txn(Duration::from_micros(50), 2);
        let text = m.encode();
        assert!(
            text.contains("strata_fuse_ops_total{op=\"lookup\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("strata_object_requests_total{op=\"get\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("strata_object_bytes_total{direction=\"download\"} 10"),
            "{text}"
        );
        assert!(text.contains("strata_meta_txn_retries_total 2"), "{text}");
        assert!(text.contains("strata_fuse_op_seconds_bucket"), "{text}");
        assert_eq!(m.object_request_count("get"), 1);
        m.gateway_request("GetObject", 206, Duration::from_millis(3), 0, 100);
        m.gateway_request("PutObject", 200, Duration::from_millis(3), 42, 0);
        let text = m.encode();
        assert!(
            text.contains("strata_gateway_requests_total{op=\"GetObject\",status=\"206\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("strata_gateway_bytes_total{direction=\"out\"} 100"),
            "{text}"
        );
        assert!(
            text.contains("strata_gateway_request_seconds_bucket{le="),
            "{text}"
        );
        assert_eq!(m.gateway_request_count("PutObject", 200), 1);
    }

    #[test]
    fn constant_labels_reach_every_sample_once_set() {
        let m = Metrics::new();
        m.fuse_op("read", Duration::from_millis(1), None);
        m.meta_txn(Duration::from_micros(50), 1);
        let labels = parse_labels("volume=data, pod=strata-mount-1,namespace=team-a,pv=").unwrap();
        m.set_labels(&labels).unwrap();
        m.cache_capacity("disk", 1 << 30);
        let text = m.encode();
        let samples: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        assert!(samples.len() > 10, "{text}");
        for l in &samples {
            assert!(
                l.contains("{volume=\"data\",pod=\"strata-mount-1\",namespace=\"team-a\",pv=\"\""),
                "{l}"
            );
        }
        // Values recorded before the labels were set are kept.
        assert!(text.contains(",op=\"read\"} 1"), "{text}");
        assert!(
            text.contains("strata_meta_txn_retries_total{volume=\"data\","),
            "{text}"
        );
        assert!(
            text.contains("strata_cache_capacity_bytes{volume=\"data\",pod=\"strata-mount-1\",namespace=\"team-a\",pv=\"\",tier=\"disk\"} 1073741824"),
            "{text}"
        );
    }

    #[test]
    fn bad_constant_labels_are_refused_with_the_fix() {
        let m = Metrics::new();
        for (text, want) in [
            ("pod", "NAME=VALUE"),
            ("op=x", "used by Strata"),
            ("1pod=x", "not valid"),
            ("__x=y", "not valid"),
            ("pod-name=x", "not valid"),
            ("pod=a\"b", "must not contain"),
        ] {
            let err = parse_labels(text).unwrap_err().to_string();
            assert!(err.contains(want), "{text}: {err}");
        }
        let dup = vec![
            ("volume".to_string(), "a".to_string()),
            ("volume".to_string(), "b".to_string()),
        ];
        assert!(
            m.set_labels(&dup)
                .unwrap_err()
                .to_string()
                .contains("twice")
        );
        assert!(parse_labels("").unwrap().is_empty());
    }

    #[test]
    fn http_endpoint_serves_metrics() {
        let m = Arc::new(Metrics::new());
        m.fuse_op("read", Duration::from_millis(1), Some(5));
        let addr = serve(m, "127.0.0.1:0").unwrap();
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        assert!(
            out.contains("strata_fuse_errors_total{op=\"read\",errno=\"5\"} 1"),
            "{out}"
        );
    }
}
