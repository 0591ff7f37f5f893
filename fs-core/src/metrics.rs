//! The one metrics facade of Strata. Every metric name lives in [`names`]; components receive
//! an `Arc<Metrics>` (no globals) and record through the typed helpers below. The registry is
//! encoded as Prometheus text by [`Metrics::encode`] and served by [`serve`].

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Duration;

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
}

type Labels = Vec<(&'static str, String)>;

fn seconds_histogram() -> Histogram {
    // 10 µs .. ~80 s
    Histogram::new(exponential_buckets(0.00001, 2.5, 18))
}

/// Counters, gauges and histograms of one process.
pub struct Metrics {
    registry: Registry,
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
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let fuse_ops = Family::<Labels, Counter>::default();
        registry.register(
            names::FUSE_OPS,
            "FUSE operations served, by op",
            fuse_ops.clone(),
        );
        let fuse_errors = Family::<Labels, Counter>::default();
        registry.register(
            names::FUSE_ERRORS,
            "FUSE operations answered with an error, by op and errno",
            fuse_errors.clone(),
        );
        let fuse_op_seconds: Family<Labels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(seconds_histogram);
        registry.register(
            names::FUSE_OP_SECONDS,
            "Latency of FUSE operations, by op",
            fuse_op_seconds.clone(),
        );
        let object_requests = Family::<Labels, Counter>::default();
        registry.register(
            names::OBJECT_REQUESTS,
            "Object store requests, by op (get/put/delete/head/list; map: a read of a local store's file through its mapping; sync)",
            object_requests.clone(),
        );
        let object_errors = Family::<Labels, Counter>::default();
        registry.register(
            names::OBJECT_ERRORS,
            "Object store requests that failed, by op",
            object_errors.clone(),
        );
        let object_bytes = Family::<Labels, Counter>::default();
        registry.register(
            names::OBJECT_BYTES,
            "Bytes moved to/from the object store, by direction (upload/download)",
            object_bytes.clone(),
        );
        let object_request_seconds: Family<Labels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(seconds_histogram);
        registry.register(
            names::OBJECT_REQUEST_SECONDS,
            "Latency of object store requests, by op",
            object_request_seconds.clone(),
        );
        let meta_txn_seconds = seconds_histogram();
        registry.register(
            names::META_TXN_SECONDS,
            "Latency of metadata transactions",
            meta_txn_seconds.clone(),
        );
        let meta_txn_retries = Counter::default();
        registry.register(
            names::META_TXN_RETRIES,
            "Metadata transactions retried after a conflict",
            meta_txn_retries.clone(),
        );
        let buffer_bytes = Gauge::default();
        registry.register(
            names::BUFFER_BYTES,
            "Bytes of written data buffered in memory, not yet uploaded",
            buffer_bytes.clone(),
        );
        let compactions = Counter::default();
        registry.register(names::COMPACTIONS, "Chunks compacted", compactions.clone());
        let objects_reclaimed = Counter::default();
        registry.register(
            names::OBJECTS_RECLAIMED,
            "Objects deleted by background reclamation",
            objects_reclaimed.clone(),
        );
        let cache_hits = Family::<Labels, Counter>::default();
        registry.register(
            names::CACHE_HITS,
            "Block reads served from this client's cache, by tier (memory/disk)",
            cache_hits.clone(),
        );
        let cache_misses = Counter::default();
        registry.register(
            names::CACHE_MISSES,
            "Block reads not in this client's cache (fetched from a peer or the object store)",
            cache_misses.clone(),
        );
        let cache_peer_hits = Counter::default();
        registry.register(
            names::CACHE_PEER_HITS,
            "Block misses served by a peer of the cache group",
            cache_peer_hits.clone(),
        );
        let cache_peer_errors = Counter::default();
        registry.register(
            names::CACHE_PEER_ERRORS,
            "Peer requests that failed or timed out (the read fell back to the object store)",
            cache_peer_errors.clone(),
        );
        let cache_bytes = Family::<Labels, Gauge>::default();
        registry.register(
            names::CACHE_BYTES,
            "Bytes held in the block cache, by tier (memory/disk)",
            cache_bytes.clone(),
        );
        let cache_evictions = Family::<Labels, Counter>::default();
        registry.register(
            names::CACHE_EVICTIONS,
            "Blocks evicted from the cache, by tier (memory/disk)",
            cache_evictions.clone(),
        );
        let cache_corrupt = Counter::default();
        registry.register(
            names::CACHE_CORRUPT,
            "Cached blocks dropped because their checksum or size did not match",
            cache_corrupt.clone(),
        );
        let cache_peer_served = Counter::default();
        registry.register(
            names::CACHE_PEER_SERVED,
            "Blocks this member served to peers of its cache group",
            cache_peer_served.clone(),
        );
        let cache_skipped = Family::<Labels, Counter>::default();
        registry.register(
            names::CACHE_SKIPPED,
            "Blocks not written to the disk cache, by reason (low_space: the cache file system is below --free-space-ratio free)",
            cache_skipped.clone(),
        );
        let gateway_requests = Family::<Labels, Counter>::default();
        registry.register(
            names::GATEWAY_REQUESTS,
            "S3 gateway requests answered, by S3 operation and HTTP status",
            gateway_requests.clone(),
        );
        let gateway_request_seconds: Family<Labels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(seconds_histogram);
        registry.register(
            names::GATEWAY_REQUEST_SECONDS,
            "Latency of S3 gateway requests (until the last byte of the answer), by S3 operation",
            gateway_request_seconds.clone(),
        );
        let gateway_bytes = Family::<Labels, Counter>::default();
        registry.register(
            names::GATEWAY_BYTES,
            "Object bytes received (in) and sent (out) by the S3 gateway",
            gateway_bytes.clone(),
        );
        let source_requests = Family::<Labels, Counter>::default();
        registry.register(
            names::SOURCE_REQUESTS,
            "Requests to attached sources (buckets written by others), by op (list/get)",
            source_requests.clone(),
        );
        let source_errors = Family::<Labels, Counter>::default();
        registry.register(
            names::SOURCE_ERRORS,
            "Requests to attached sources that failed (after retries), by op",
            source_errors.clone(),
        );
        let source_bytes = Counter::default();
        registry.register(
            names::SOURCE_BYTES,
            "Bytes read from attached sources",
            source_bytes.clone(),
        );
        let fuse_bytes = Family::<Labels, Counter>::default();
        registry.register(
            names::FUSE_BYTES,
            "Bytes read and written by applications through FUSE, by direction (read/write)",
            fuse_bytes.clone(),
        );
        Metrics {
            fuse_bytes,
            source_requests,
            source_errors,
            source_bytes,
            registry,
            gateway_requests,
            gateway_request_seconds,
            gateway_bytes,
            cache_hits,
            cache_misses,
            cache_peer_hits,
            cache_peer_errors,
            cache_bytes,
            cache_evictions,
            cache_corrupt,
            cache_peer_served,
            cache_skipped,
            fuse_ops,
            fuse_errors,
            fuse_op_seconds,
            object_requests,
            object_errors,
            object_bytes,
            object_request_seconds,
            meta_txn_seconds,
            meta_txn_retries,
            buffer_bytes,
            compactions,
            objects_reclaimed,
        }
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
        let _ = encode(&mut out, &self.registry);
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
