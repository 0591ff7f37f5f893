//! `strata stats PATH`: what a mount is doing, interval by interval (like `juicefs stats`).
//! The mount answers the virtual attribute `user.strata.metrics` (on any path inside it)
//! with its counters as Prometheus text, histogram buckets left out
//! ([`crate::metrics::Metrics::encode_compact`]); this module turns two such readings into
//! one line of rates ([`line`]) and, with `--by-op`, one of rates and latencies per FUSE
//! operation ([`by_op`]).

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

    /// Values of metric `name` summed per value of label `label` (e.g. per `op`).
    pub fn by_label(&self, name: &str, label: &str) -> HashMap<String, f64> {
        let key = format!("{label}=\"");
        let mut out = HashMap::new();
        for (k, v) in &self.values {
            let Some((n, labels)) = k.split_once('{') else {
                continue;
            };
            if n != name {
                continue;
            }
            // The label at the start of the set or after a comma (not `xop="…"`).
            let at = labels
                .match_indices(&key)
                .find(|(i, _)| *i == 0 || labels.as_bytes()[i - 1] == b',')
                .map(|(i, _)| i + key.len());
            if let Some(at) = at
                && let Some(end) = labels[at..].find('"')
            {
                *out.entry(labels[at..at + end].to_string()).or_insert(0.0) += v;
            }
        }
        out
    }
}

/// The header of [`line`]'s columns.
pub fn header() -> String {
    format!(
        "{:>8} | {:>8} {:>7} | {:>8} {:>8} | {:>6} {:>6} {:>7} {:>7} {:>8} {:>8} | {:>5} {:>5} {:>6} | {:>7} {:>8} | {:>7} {:>6} {:>5}",
        "time",
        "fuse/s",
        "lat ms",
        "read/s",
        "write/s",
        "GET/s",
        "PUT/s",
        "GET ms",
        "PUT ms",
        "down/s",
        "up/s",
        "mem%",
        "disk%",
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
    // Mean latency in ms of the observations of a histogram in the interval.
    let per_in = |hist: &str, label: &str| {
        let c = d(&format!("{hist}_count"), label);
        if c > 0.0 {
            format!("{:.2}", d(&format!("{hist}_sum"), label) / c * 1000.0)
        } else {
            "-".to_string()
        }
    };
    let per = |hist: &str| per_in(hist, "");
    // Share of block reads served by a cache tier (the rest went to peers or the store).
    let lookups = d("strata_cache_hits_total", "") + d("strata_cache_misses_total", "");
    let hit = |tier: &str| {
        if lookups > 0.0 {
            let h = d("strata_cache_hits_total", &format!("tier=\"{tier}\""));
            format!("{:.0}", h * 100.0 / lookups)
        } else {
            "-".to_string()
        }
    };
    format!(
        "{:>8} | {:>8.0} {:>7} | {:>8} {:>8} | {:>6.0} {:>6.0} {:>7} {:>7} {:>8} {:>8} | {:>5} {:>5} {:>6.0} | {:>7} {:>8} | {:>7.0} {:>6} {:>5.0}",
        clock,
        rate("strata_fuse_ops_total", ""),
        per("strata_fuse_op_seconds"),
        mib(rate("strata_fuse_bytes_total", "direction=\"read\"")),
        mib(rate("strata_fuse_bytes_total", "direction=\"write\"")),
        rate("strata_object_requests_total", "op=\"get\""),
        rate("strata_object_requests_total", "op=\"put\""),
        per_in("strata_object_request_seconds", "op=\"get\""),
        per_in("strata_object_request_seconds", "op=\"put\""),
        mib(rate("strata_object_bytes_total", "direction=\"download\"")),
        mib(rate("strata_object_bytes_total", "direction=\"upload\"")),
        hit("memory"),
        hit("disk"),
        rate("strata_cache_peer_hits_total", ""),
        mib(cur.sum("strata_buffer_bytes", "")),
        mib(cur.sum("strata_cache_bytes", "")),
        rate("strata_meta_txn_seconds_count", ""),
        per("strata_meta_txn_seconds"),
        rate("strata_meta_txn_retries_total", ""),
    )
}

/// FUSE operations by kind between two readings, busiest first (at most `top`):
/// `  ops: read 1520/s 0.21ms, write 300/s 0.05ms, …` (`-` when none).
pub fn by_op(prev: &Sample, cur: &Sample, top: usize) -> String {
    let dt = cur.at.duration_since(prev.at).as_secs_f64().max(1e-3);
    let delta = |name: &str| {
        let (a, b) = (prev.by_label(name, "op"), cur.by_label(name, "op"));
        b.into_iter()
            .map(|(op, v)| {
                let d = (v - a.get(&op).copied().unwrap_or(0.0)).max(0.0);
                (op, d)
            })
            .collect::<HashMap<_, _>>()
    };
    let ops = delta("strata_fuse_ops_total");
    let secs = delta("strata_fuse_op_seconds_sum");
    let mut rows: Vec<(String, f64)> = ops.into_iter().filter(|(_, n)| *n > 0.0).collect();
    rows.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let parts: Vec<String> = rows
        .iter()
        .take(top.max(1))
        .map(|(op, n)| {
            let ms = secs.get(op).copied().unwrap_or(0.0) / n * 1000.0;
            format!("{op} {:.0}/s {ms:.2}ms", n / dt)
        })
        .collect();
    if parts.is_empty() {
        "  ops: -".to_string()
    } else {
        format!("  ops: {}", parts.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn rates_come_from_two_readings() {
        let t0 = Instant::now();
        let a = Sample::parse(
            "# HELP x\nstrata_fuse_ops_total{volume=\"v\",op=\"read\"} 10\nstrata_fuse_ops_total{op=\"write\"} 5\n\
             strata_fuse_op_seconds_sum{op=\"read\"} 1\nstrata_fuse_op_seconds_sum{op=\"write\"} 1\n\
             strata_fuse_bytes_total{direction=\"write\"} 0\nstrata_object_requests_total{op=\"get\"} 1\n\
             strata_object_request_seconds_sum{op=\"get\"} 0.5\nstrata_object_request_seconds_count{op=\"get\"} 1\n\
             strata_cache_hits_total{tier=\"memory\"} 1\nstrata_cache_misses_total 1\n",
            t0,
        );
        let b = Sample::parse(
            "strata_fuse_ops_total{volume=\"v\",op=\"read\"} 30\nstrata_fuse_ops_total{op=\"write\"} 9\n\
             strata_fuse_op_seconds_sum{op=\"read\"} 1.02\nstrata_fuse_op_seconds_sum{op=\"write\"} 1.4\n\
             strata_fuse_bytes_total{direction=\"write\"} 4194304\nstrata_object_requests_total{op=\"get\"} 3\n\
             strata_object_request_seconds_sum{op=\"get\"} 0.52\nstrata_object_request_seconds_count{op=\"get\"} 3\n\
             strata_cache_hits_total{tier=\"memory\"} 4\nstrata_cache_hits_total{tier=\"disk\"} 2\n\
             strata_cache_misses_total 2\n",
            t0 + Duration::from_secs(2),
        );
        assert_eq!(b.sum("strata_fuse_ops_total", ""), 39.0);
        assert_eq!(b.sum("strata_object_requests_total", "op=\"get\""), 3.0);
        let l = line(&a, &b, "now");
        let vals: Vec<&str> = l.split_whitespace().filter(|c| *c != "|").collect();
        let col = |n: &str| {
            // Column names of two words ("lat ms", "GET ms") are joined in the header.
            let h = header().replace("lat ms", "lat-ms").replace(" ms", "-ms");
            let names: Vec<&str> = h.split_whitespace().filter(|c| *c != "|").collect();
            vals[names.iter().position(|c| *c == n).unwrap()].to_string()
        };
        // fuse/s = 24 ops / 2 s; write 4 MiB / 2 s; GET/s 1 of 10 ms each; of 6 block
        // reads, 3 from memory (50%), 2 from disk (33%).
        assert_eq!(col("fuse/s"), "12", "{l}");
        assert_eq!(col("write/s"), "2.0M", "{l}");
        assert_eq!(col("GET/s"), "1", "{l}");
        assert_eq!(col("GET-ms"), "10.00", "{l}");
        assert_eq!(col("PUT-ms"), "-", "{l}");
        assert_eq!(col("mem%"), "50", "{l}");
        assert_eq!(col("disk%"), "33", "{l}");
        assert_eq!(header().split('|').count(), l.split('|').count());
        // By operation: read 20 in 2 s at 1 ms each, write 4 at 100 ms.
        assert_eq!(
            by_op(&a, &b, 5),
            "  ops: read 10/s 1.00ms, write 2/s 100.00ms"
        );
        assert_eq!(by_op(&a, &b, 1), "  ops: read 10/s 1.00ms");
        assert_eq!(by_op(&b, &b, 5), "  ops: -");
        assert_eq!(
            b.by_label("strata_fuse_ops_total", "op").get("read"),
            Some(&30.0)
        );
    }
}
