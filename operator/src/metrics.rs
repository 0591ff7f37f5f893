//! Prometheus metrics of the operator and the small HTTP server that exposes them
//! (`/metrics`, `/healthz`, `/readyz`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::fsops::DirQuota;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VolumeLabel {
    pub volume: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QuotaLabels {
    pub namespace: String,
    pub quota: String,
    pub volume: String,
    /// `bytes` or `inodes`.
    pub resource: String,
}

pub struct Metrics {
    registry: Registry,
    volume_used_bytes: Family<VolumeLabel, Gauge>,
    volume_used_inodes: Family<VolumeLabel, Gauge>,
    volume_capacity_bytes: Family<VolumeLabel, Gauge>,
    volume_clients: Family<VolumeLabel, Gauge>,
    quota_used_ratio: Family<QuotaLabels, Gauge<f64, AtomicU64>>,
    reconciles: Family<KindLabel, Counter>,
    failures: Family<KindLabel, Counter>,
    duration: Family<KindLabel, Histogram>,
    pub leader: Gauge,
    ready: AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("strata_operator");
        let reconciles = Family::<KindLabel, Counter>::default();
        registry.register("reconciles", "Reconciles run", reconciles.clone());
        let failures = Family::<KindLabel, Counter>::default();
        registry.register(
            "reconcile_failures",
            "Reconciles that failed and were requeued with backoff",
            failures.clone(),
        );
        let duration = Family::<KindLabel, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.005, 2.0, 14))
        });
        registry.register(
            "reconcile_duration_seconds",
            "Time of one reconcile",
            duration.clone(),
        );
        let leader = Gauge::default();
        registry.register(
            "leader",
            "1 while this replica holds the leader Lease",
            leader.clone(),
        );
        let volume_used_bytes = Family::<VolumeLabel, Gauge>::default();
        registry.register(
            "volume_used_bytes",
            "Bytes used by a Volume's files, at its last reconcile",
            volume_used_bytes.clone(),
        );
        let volume_used_inodes = Family::<VolumeLabel, Gauge>::default();
        registry.register(
            "volume_used_inodes",
            "Inodes used in a Volume, at its last reconcile",
            volume_used_inodes.clone(),
        );
        let volume_capacity_bytes = Family::<VolumeLabel, Gauge>::default();
        registry.register(
            "volume_capacity_bytes",
            "Capacity of a Volume in bytes (0: unlimited)",
            volume_capacity_bytes.clone(),
        );
        let volume_clients = Family::<VolumeLabel, Gauge>::default();
        registry.register(
            "volume_clients",
            "Clients (mounts, gateways, cache members) with a live session on a Volume",
            volume_clients.clone(),
        );
        let quota_used_ratio = Family::<QuotaLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "quota_used_ratio",
            "Share of a Quota's limit in use, by resource (bytes/inodes; only limited ones)",
            quota_used_ratio.clone(),
        );
        // Failure series exist from the start at 0: a failure rate is 0, not absent.
        for kind in ["Volume", "Quota", "CacheGroup"] {
            drop(failures.get_or_create(&KindLabel { kind: kind.into() }));
        }
        Metrics {
            registry,
            volume_used_bytes,
            volume_used_inodes,
            volume_capacity_bytes,
            volume_clients,
            quota_used_ratio,
            reconciles,
            failures,
            duration,
            leader,
            ready: AtomicBool::new(false),
        }
    }

    /// Count a reconcile of `kind` and time it until the guard drops.
    pub fn reconcile(&self, kind: &str) -> ReconcileTimer<'_> {
        let l = KindLabel { kind: kind.into() };
        self.reconciles.get_or_create(&l).inc();
        ReconcileTimer {
            metrics: self,
            label: l,
            start: Instant::now(),
        }
    }

    pub fn reconcile_failed(&self, kind: &str) {
        self.failures
            .get_or_create(&KindLabel { kind: kind.into() })
            .inc();
    }

    /// The usage of Volume `volume` as its reconcile read it.
    pub fn set_volume_usage(&self, volume: &str, usage: &crate::fsops::Usage) {
        let l = VolumeLabel {
            volume: volume.into(),
        };
        let g = |v: u64| v.min(i64::MAX as u64) as i64;
        self.volume_used_bytes
            .get_or_create(&l)
            .set(g(usage.used_bytes));
        self.volume_used_inodes
            .get_or_create(&l)
            .set(g(usage.used_inodes));
        self.volume_capacity_bytes
            .get_or_create(&l)
            .set(g(usage.capacity_bytes));
        self.volume_clients.get_or_create(&l).set(g(usage.clients));
    }

    /// Drop the series of a deleted Volume.
    pub fn forget_volume(&self, volume: &str) {
        let l = VolumeLabel {
            volume: volume.into(),
        };
        self.volume_used_bytes.remove(&l);
        self.volume_used_inodes.remove(&l);
        self.volume_capacity_bytes.remove(&l);
        self.volume_clients.remove(&l);
    }

    /// The usage of Quota `namespace/quota` on `volume`: used/limit per limited resource
    /// (a limit of 0 is none: its series is removed).
    pub fn set_quota_usage(&self, namespace: &str, quota: &str, volume: &str, usage: &DirQuota) {
        for (resource, used, limit) in [
            ("bytes", usage.used_bytes, usage.limit_bytes),
            ("inodes", usage.used_inodes, usage.limit_inodes),
        ] {
            let l = QuotaLabels {
                namespace: namespace.into(),
                quota: quota.into(),
                volume: volume.into(),
                resource: resource.into(),
            };
            if limit > 0 {
                self.quota_used_ratio
                    .get_or_create(&l)
                    .set(used as f64 / limit as f64);
            } else {
                self.quota_used_ratio.remove(&l);
            }
        }
    }

    /// Drop the series of a deleted Quota.
    pub fn forget_quota(&self, namespace: &str, quota: &str, volume: &str) {
        for resource in ["bytes", "inodes"] {
            self.quota_used_ratio.remove(&QuotaLabels {
                namespace: namespace.into(),
                quota: quota.into(),
                volume: volume.into(),
                resource: resource.into(),
            });
        }
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Serve `/metrics`, `/healthz` (always ok) and `/readyz` (ok once controllers run).
    pub async fn serve(self: Arc<Self>, listener: TcpListener) -> std::io::Result<()> {
        loop {
            let (mut sock, _) = listener.accept().await?;
            let m = self.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let n = match tokio::time::timeout(
                    std::time::Duration::from_secs(5),
                    sock.read(&mut buf),
                )
                .await
                {
                    Ok(Ok(n)) => n,
                    _ => return,
                };
                let req = String::from_utf8_lossy(&buf[..n]);
                let path = req.split_whitespace().nth(1).unwrap_or("/");
                let (status, ctype, body) = match path {
                    "/metrics" => (
                        "200 OK",
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        m.encode(),
                    ),
                    "/healthz" => ("200 OK", "text/plain", "ok\n".to_string()),
                    "/readyz" if m.ready.load(Ordering::Relaxed) => {
                        ("200 OK", "text/plain", "ok\n".to_string())
                    }
                    "/readyz" => (
                        "503 Service Unavailable",
                        "text/plain",
                        "not ready\n".to_string(),
                    ),
                    _ => ("404 Not Found", "text/plain", "not found\n".to_string()),
                };
                let resp = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = sock.write_all(resp.as_bytes()).await;
            });
        }
    }
}

/// Observes the reconcile duration on drop.
pub struct ReconcileTimer<'a> {
    metrics: &'a Metrics,
    label: KindLabel,
    start: Instant,
}

impl Drop for ReconcileTimer<'_> {
    fn drop(&mut self) {
        self.metrics
            .duration
            .get_or_create(&self.label)
            .observe(self.start.elapsed().as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn metrics_endpoint_serves_counters_and_health() {
        let m = Arc::new(Metrics::new());
        drop(m.reconcile("Volume"));
        m.reconcile_failed("Volume");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(m.clone().serve(listener));
        let get = |path: &'static str| async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        };
        let body = get("/metrics").await;
        assert!(
            body.contains("strata_operator_reconciles_total{kind=\"Volume\"} 1"),
            "{body}"
        );
        assert!(body.contains("strata_operator_reconcile_failures_total{kind=\"Volume\"} 1"));
        assert!(
            body.contains("strata_operator_reconcile_duration_seconds_count{kind=\"Volume\"} 1")
        );
        assert!(get("/healthz").await.starts_with("HTTP/1.1 200"));
        m.set_volume_usage(
            "data",
            &crate::fsops::Usage {
                used_bytes: 5 << 30,
                used_inodes: 12,
                capacity_bytes: 10 << 30,
                inodes: 0,
                clients: 3,
            },
        );
        let dq = DirQuota {
            path: "tenants/a".into(),
            used_bytes: 3 << 20,
            used_inodes: 9,
            limit_bytes: 4 << 20,
            limit_inodes: 0,
        };
        m.set_quota_usage("team-a", "q", "data", &dq);
        let body = get("/metrics").await;
        for want in [
            "strata_operator_volume_used_bytes{volume=\"data\"} 5368709120",
            "strata_operator_volume_used_inodes{volume=\"data\"} 12",
            "strata_operator_volume_capacity_bytes{volume=\"data\"} 10737418240",
            "strata_operator_volume_clients{volume=\"data\"} 3",
            "strata_operator_quota_used_ratio{namespace=\"team-a\",quota=\"q\",volume=\"data\",resource=\"bytes\"} 0.75",
        ] {
            assert!(body.contains(want), "{want}: {body}");
        }
        // No inode limit, no inode ratio; a deleted Volume and Quota leave no series.
        assert!(!body.contains("resource=\"inodes\""), "{body}");
        m.forget_volume("data");
        m.forget_quota("team-a", "q", "data");
        let body = get("/metrics").await;
        assert!(!body.contains("volume=\"data\""), "{body}");
        assert!(get("/readyz").await.starts_with("HTTP/1.1 503"));
        m.set_ready(true);
        assert!(get("/readyz").await.starts_with("HTTP/1.1 200"));
    }
}
