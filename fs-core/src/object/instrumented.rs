//! Metrics and logs for every object store request.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

use super::{ObjectError, ObjectInfo, ObjectStore, Result};
use crate::metrics::Metrics;

/// Records each request in [`Metrics`] (count, latency, failure; bytes moved) and logs failures
/// with the key and the store's description (which never holds secrets).
///
/// `NotFound` is a normal answer (existence checks), so it is neither counted as an error nor
/// logged above debug level.
#[derive(Debug)]
pub struct InstrumentedStore<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S: ObjectStore> InstrumentedStore<S> {
    /// Wrap `inner`, recording into `metrics`.
    pub fn new(inner: S, metrics: Arc<Metrics>) -> Self {
        InstrumentedStore { inner, metrics }
    }

    fn record<T>(&self, op: &'static str, key: &str, f: impl FnOnce(&S) -> Result<T>) -> Result<T> {
        let start = Instant::now();
        let res = f(&self.inner);
        let elapsed = start.elapsed();
        let failed = matches!(&res, Err(e) if !matches!(e, ObjectError::NotFound(_)));
        self.metrics.object_request(op, elapsed, !failed);
        tracing::trace!(op, key, ?elapsed, ok = !failed, "object request");
        if let Err(e) = &res {
            match e {
                ObjectError::NotFound(_) => tracing::debug!(op, key, "object not found"),
                ObjectError::Transient(_) => tracing::info!(
                    op, key, store = %self.inner.describe(), ?elapsed, "object store request failed: {e}"
                ),
                _ => tracing::warn!(
                    op, key, store = %self.inner.describe(), ?elapsed, "object store request failed: {e}"
                ),
            }
        }
        res
    }
}

impl<S: ObjectStore> ObjectStore for InstrumentedStore<S> {
    fn describe(&self) -> String {
        self.inner.describe()
    }

    fn init(&self) -> Result<()> {
        // Not a data request: log failures, no metric.
        self.inner.init().inspect_err(
            |e| tracing::warn!(store = %self.inner.describe(), "object store init failed: {e}"),
        )
    }

    fn get(&self, key: &str, off: u64, len: Option<u64>) -> Result<Bytes> {
        let data = self.record("get", key, |s| s.get(key, off, len))?;
        self.metrics.object_bytes(false, data.len() as u64);
        Ok(data)
    }

    fn get_stream(&self, key: &str, off: u64, sink: &mut dyn FnMut(&[u8])) -> Result<u64> {
        let mut n = 0u64;
        let res = self.record("get", key, |s| {
            s.get_stream(key, off, &mut |c: &[u8]| {
                n += c.len() as u64;
                sink(c)
            })
        });
        self.metrics.object_bytes(false, n);
        res
    }

    fn map(&self, key: &str, off: u64, len: u64) -> Option<Result<Bytes>> {
        let mut supported = true;
        // Counted apart from GETs: a mapped read is a page-cache lookup per read call, not
        // a request (a reader of one block maps it once per call).
        let res = self.record("map", key, |s| match s.map(key, off, len) {
            Some(r) => r,
            None => {
                supported = false;
                Ok(Bytes::new())
            }
        });
        if !supported {
            return None;
        }
        if let Ok(b) = &res {
            self.metrics.object_bytes(false, b.len() as u64);
        }
        Some(res)
    }

    fn prefers_map(&self) -> bool {
        self.inner.prefers_map()
    }

    fn will_need(&self, key: &str) {
        self.inner.will_need(key)
    }

    fn done_with(&self, key: &str) {
        self.inner.done_with(key)
    }

    fn sync(&self, keys: &[String]) -> Result<()> {
        let first = keys.first().map(String::as_str).unwrap_or("");
        self.record("sync", first, |s| s.sync(keys))
    }

    fn put(&self, key: &str, data: Bytes) -> Result<()> {
        let n = data.len() as u64;
        self.record("put", key, |s| s.put(key, data))?;
        self.metrics.object_bytes(true, n);
        Ok(())
    }

    fn delete(&self, key: &str) -> Result<()> {
        self.record("delete", key, |s| s.delete(key))
    }

    fn head(&self, key: &str) -> Result<ObjectInfo> {
        self.record("head", key, |s| s.head(key))
    }

    fn list(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<ObjectInfo>> {
        self.record("list", prefix, |s| s.list(prefix, start_after, limit))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::object::{FaultSettings, FaultStore, MemStore, RetrySettings, layered};

    #[test]
    fn counts_requests_bytes_and_errors() {
        let metrics = Arc::new(Metrics::new());
        let s = InstrumentedStore::new(MemStore::new(), metrics.clone());
        s.put("k", Bytes::from_static(b"12345")).unwrap();
        assert_eq!(s.get("k", 1, Some(2)).unwrap().len(), 2);
        assert!(s.head("missing").is_err());
        s.list("", None, 10).unwrap();
        s.delete("k").unwrap();
        for op in ["get", "put", "delete", "head", "list"] {
            assert_eq!(metrics.object_request_count(op), 1, "{op}");
        }
        let text = metrics.encode();
        assert!(
            text.contains("strata_object_bytes_total{direction=\"upload\"} 5"),
            "{text}"
        );
        assert!(
            text.contains("strata_object_bytes_total{direction=\"download\"} 2"),
            "{text}"
        );
        assert!(
            !text.contains("strata_object_errors_total{op=\"head\"} 1"),
            "{text}"
        );
    }

    #[test]
    fn layered_counts_every_attempt() {
        let metrics = Arc::new(Metrics::new());
        let fault = Arc::new(FaultStore::new(MemStore::new(), FaultSettings::default()));
        let retry = RetrySettings {
            max_attempts: 3,
            ..RetrySettings::default()
        };
        let store = layered(fault.clone(), metrics.clone(), retry);
        fault.set_outage(true);
        assert!(
            store
                .put("k", Bytes::from_static(b"x"))
                .unwrap_err()
                .is_transient()
        );
        assert_eq!(metrics.object_request_count("put"), 3);
        assert!(
            metrics
                .encode()
                .contains("strata_object_errors_total{op=\"put\"} 3")
        );
        fault.set_outage(false);
        store.put("k", Bytes::from_static(b"x")).unwrap();
        assert_eq!(metrics.object_request_count("put"), 4);
    }
}
