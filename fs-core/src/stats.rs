//! `strata stats PATH`: what a mount is doing, interval by interval (like `juicefs stats`).
//! The mount answers the virtual attribute `user.strata.metrics` (on any path inside it)
//! with its counters as Prometheus text, histogram buckets left out
//! ([`crate::metrics::Metrics::encode_compact`]); this module turns two such readings into
//! one line of rates.

use std::collections::HashMap;
use std::time::Instant;

/// The virtual attribute the mount answers with its counters.
pub const METRICS_XATTR: &[u8] = b"user.strata.metrics";

/// One reading of a mount's counters.
#[derive(Debug, Clone)]
pub struct Sample {
    pub at: Instant,
    /// `name{labels}` → value.
    pub values: HashMap<String, f64>,
}

impl Sample {
    /// Parse Prometheus text (comment lines ignored).
    pub fn parse(text: &str, at: Instant) -> Sample {
        let values = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (k, v) = l.rsplit_once(' ')?;
                Some((k.to_string(), v.parse().ok()?))
            })
            .collect();
        Sample { at, values }
    }

    /// Sum of the series of metric `name` (any labels) whose labels contain `label` (e.g.
    /// `op="get"`; empty: all).
    pub fn sum(&self, name: &str, label: &str) -> f64 {
        self.values
            .iter()
            .filter(|(k, _)| {
                let (n, labels) = k.split_once('{').unwrap_or((k.as_str(), ""));
                n == name && labels.contains(label)
            })
            .map(|(_, v)| v)
            .sum()
    }
}

/// The header of [`line`]'s columns.
pub fn header() -> String {
    format!(
        "{:>8} | {:>8} {:>7} | {:>8} {:>8} | {:>6} {:>6} {:>8} {:>8} | {:>5} {:>6} | {:>7} {:>8} | {:>7} {:>6} {:>5}",
        "time",
        "fuse/s",
        "lat ms",
        "read/s",
        "write/s",
        "GET/s",
        "PUT/s",
        "down/s",
        "up/s",
        "hit%",
        "peer/s",
        "buf",
        "cache",
        "meta/s",
        "lat ms",
        "retry"
    )
}

fn mib(v: f64) -> String {
    let v = v.max(0.0);
    if v >= 1024.0 * 1024.0 * 1024.0 {
        format!("{:.1}G", v / (1024.0 * 1024.0 * 1024.0))
    } else {
        format!("{:.1}M", v / (1024.0 * 1024.0))
    }
}

/// One line of rates between two readings.
pub fn line(prev: &Sample, cur: &Sample, clock: &str) -> String {
    let dt = cur.at.duration_since(prev.at).as_secs_f64().max(1e-3);
    let d = |name: &str, label: &str| (cur.sum(name, label) - prev.sum(name, label)).max(0.0);
    let rate = |name: &str, label: &str| d(name, label) / dt;
    let per = |sum: &str, count: &str| {
        let c = d(count, "");
        if c > 0.0 {
            format!("{:.2}", d(sum, "") / c * 1000.0)
        } else {
            "-".to_string()
        }
    };
    let hits = d("strata_cache_hits_total", "");
    let misses = d("strata_cache_misses_total", "");
    let hit = if hits + misses > 0.0 {
        format!("{:.0}", hits * 100.0 / (hits + misses))
    } else {
        "-".to_string()
    };
    format!(
        "{:>8} | {:>8.0} {:>7} | {:>8} {:>8} | {:>6.0} {:>6.0} {:>8} {:>8} | {:>5} {:>6.0} | {:>7} {:>8} | {:>7.0} {:>6} {:>5.0}",
        clock,
        rate("strata_fuse_ops_total", ""),
        per("strata_fuse_op_seconds_sum", "strata_fuse_op_seconds_count"),
        mib(rate("strata_fuse_bytes_total", "direction=\"read\"")),
        mib(rate("strata_fuse_bytes_total", "direction=\"write\"")),
        rate("strata_object_requests_total", "op=\"get\""),
        rate("strata_object_requests_total", "op=\"put\""),
        mib(rate("strata_object_bytes_total", "direction=\"download\"")),
        mib(rate("strata_object_bytes_total", "direction=\"upload\"")),
        hit,
        rate("strata_cache_peer_hits_total", ""),
        mib(cur.sum("strata_buffer_bytes", "")),
        mib(cur.sum("strata_cache_bytes", "")),
        rate("strata_meta_txn_seconds_count", ""),
        per(
            "strata_meta_txn_seconds_sum",
            "strata_meta_txn_seconds_count"
        ),
        rate("strata_meta_txn_retries_total", ""),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn rates_come_from_two_readings() {
        let t0 = Instant::now();
        let a = Sample::parse(
            "# HELP x\nstrata_fuse_ops_total{op=\"read\"} 10\nstrata_fuse_ops_total{op=\"write\"} 5\n\
             strata_fuse_bytes_total{direction=\"write\"} 0\nstrata_object_requests_total{op=\"get\"} 1\n\
             strata_cache_hits_total{tier=\"memory\"} 1\nstrata_cache_misses_total 1\n",
            t0,
        );
        let b = Sample::parse(
            "strata_fuse_ops_total{op=\"read\"} 30\nstrata_fuse_ops_total{op=\"write\"} 5\n\
             strata_fuse_bytes_total{direction=\"write\"} 4194304\nstrata_object_requests_total{op=\"get\"} 3\n\
             strata_cache_hits_total{tier=\"memory\"} 4\nstrata_cache_misses_total 2\n",
            t0 + Duration::from_secs(2),
        );
        assert_eq!(b.sum("strata_fuse_ops_total", ""), 35.0);
        assert_eq!(b.sum("strata_object_requests_total", "op=\"get\""), 3.0);
        let l = line(&a, &b, "now");
        let cols: Vec<&str> = l.split_whitespace().collect();
        // fuse/s = 20 ops / 2 s; write 4 MiB / 2 s; GET/s 1; hit% 3/(3+1).
        assert_eq!(cols[2], "10", "{l}");
        assert!(l.contains("2.0M"), "{l}");
        assert!(l.contains(" 75 "), "{l}");
        assert_eq!(header().split('|').count(), l.split('|').count());
    }
}
