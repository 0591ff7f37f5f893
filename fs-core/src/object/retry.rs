//! Retrying transient failures with exponential backoff and jitter.

use std::time::Duration;

use bytes::Bytes;
use rand::Rng;

use super::{ObjectError, ObjectInfo, ObjectStore, Result};

/// How [`RetryStore`] retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetrySettings {
    /// Attempts in total, the first included (1 = no retry).
    pub max_attempts: u32,
    /// Backoff before the first retry; doubles on each further retry.
    pub base_delay: Duration,
    /// Upper bound of one backoff.
    pub max_delay: Duration,
}

impl Default for RetrySettings {
    /// 8 attempts, 50 ms doubling up to 5 s: about 6 s of backoff in the worst case.
    fn default() -> Self {
        RetrySettings {
            max_attempts: 8,
            base_delay: Duration::from_millis(50),
            max_delay: Duration::from_secs(5),
        }
    }
}

impl RetrySettings {
    /// The backoff before retry number `retry` (1-based): half the exponential delay plus a
    /// random part up to the other half, so clients that failed together spread out.
    pub fn backoff(&self, retry: u32) -> Duration {
        let exp = self
            .base_delay
            .saturating_mul(1u32 << retry.saturating_sub(1).min(20));
        let full = exp.min(self.max_delay);
        let half = full / 2;
        let jitter_ns = rand::rng().random_range(0..=half.as_nanos().min(u64::MAX as u128) as u64);
        half + Duration::from_nanos(jitter_ns)
    }
}

/// Wraps a store and retries its [`ObjectError::Transient`] failures; other errors and the
/// last transient error are returned as they are. Safe for every operation because objects
/// are immutable: repeating a put or delete has the same effect as doing it once.
#[derive(Debug)]
pub struct RetryStore<S> {
    inner: S,
    settings: RetrySettings,
}

impl<S: ObjectStore> RetryStore<S> {
    /// Wrap `inner`.
    pub fn new(inner: S, settings: RetrySettings) -> Self {
        RetryStore { inner, settings }
    }

    /// The wrapped store.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    fn run<T>(&self, op: &str, key: &str, mut f: impl FnMut(&S) -> Result<T>) -> Result<T> {
        let mut attempt = 1;
        loop {
            match f(&self.inner) {
                Err(ObjectError::Transient(msg)) => {
                    if attempt >= self.settings.max_attempts {
                        tracing::warn!(
                            op,
                            key,
                            attempts = attempt,
                            store = %self.inner.describe(),
                            "object store request failed, giving up: {msg}"
                        );
                        return Err(ObjectError::Transient(format!(
                            "{msg} (gave up after {attempt} attempts)"
                        )));
                    }
                    let delay = self.settings.backoff(attempt);
                    tracing::debug!(
                        op,
                        key,
                        attempt,
                        ?delay,
                        "retrying object store request: {msg}"
                    );
                    std::thread::sleep(delay);
                    attempt += 1;
                }
                other => return other,
            }
        }
    }
}

impl<S: ObjectStore> ObjectStore for RetryStore<S> {
    fn describe(&self) -> String {
        self.inner.describe()
    }

    fn init(&self) -> Result<()> {
        self.run("init", "", |s| s.init())
    }

    fn get(&self, key: &str, off: u64, len: Option<u64>) -> Result<Bytes> {
        self.run("get", key, |s| s.get(key, off, len))
    }

    /// A stream cut by a transient failure resumes where it stopped (objects are immutable,
    /// so the rest is the same bytes).
    fn get_stream(&self, key: &str, off: u64, sink: &mut dyn FnMut(&[u8])) -> Result<u64> {
        let mut got = 0u64;
        self.run("get", key, |s| {
            s.get_stream(key, off + got, &mut |c: &[u8]| {
                got += c.len() as u64;
                sink(c)
            })
        })?;
        Ok(got)
    }

    /// One attempt: a transient failure answers `None`, so the caller takes the streaming
    /// path, which retries.
    fn map(&self, key: &str, off: u64, len: u64) -> Option<Result<Bytes>> {
        match self.inner.map(key, off, len)? {
            Err(e) if e.is_transient() => None,
            other => Some(other),
        }
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
        self.run("sync", first, |s| s.sync(keys))
    }

    fn put(&self, key: &str, data: Bytes) -> Result<()> {
        self.run("put", key, |s| s.put(key, data.clone()))
    }

    fn delete(&self, key: &str) -> Result<()> {
        self.run("delete", key, |s| s.delete(key))
    }

    fn head(&self, key: &str) -> Result<ObjectInfo> {
        self.run("head", key, |s| s.head(key))
    }

    fn list(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<ObjectInfo>> {
        self.run("list", prefix, |s| s.list(prefix, start_after, limit))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;
    use crate::object::MemStore;

    /// Fails the first `fail` calls of every operation with `err`.
    struct Flaky {
        inner: MemStore,
        calls: AtomicU32,
        fail: u32,
        denied: bool,
    }

    impl Flaky {
        fn check(&self) -> Result<()> {
            if self.calls.fetch_add(1, Ordering::SeqCst) < self.fail {
                if self.denied {
                    return Err(ObjectError::Denied("nope".into()));
                }
                return Err(ObjectError::Transient("flaky".into()));
            }
            Ok(())
        }
    }

    impl ObjectStore for Flaky {
        fn describe(&self) -> String {
            "flaky".into()
        }
        fn init(&self) -> Result<()> {
            self.check()
        }
        fn get(&self, key: &str, off: u64, len: Option<u64>) -> Result<Bytes> {
            self.check()?;
            self.inner.get(key, off, len)
        }
        fn put(&self, key: &str, data: Bytes) -> Result<()> {
            self.check()?;
            self.inner.put(key, data)
        }
        fn delete(&self, key: &str) -> Result<()> {
            self.check()?;
            self.inner.delete(key)
        }
        fn head(&self, key: &str) -> Result<ObjectInfo> {
            self.check()?;
            self.inner.head(key)
        }
        fn list(&self, p: &str, s: Option<&str>, l: usize) -> Result<Vec<ObjectInfo>> {
            self.check()?;
            self.inner.list(p, s, l)
        }
    }

    fn fast(max_attempts: u32) -> RetrySettings {
        RetrySettings {
            max_attempts,
            base_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(4),
        }
    }

    fn flaky(fail: u32, denied: bool) -> Flaky {
        Flaky {
            inner: MemStore::new(),
            calls: AtomicU32::new(0),
            fail,
            denied,
        }
    }

    #[test]
    fn retries_transient_until_success() {
        let s = RetryStore::new(flaky(3, false), fast(4));
        s.put("k", Bytes::from_static(b"v")).unwrap();
        assert_eq!(s.inner().calls.load(Ordering::SeqCst), 4);
        assert_eq!(&s.get("k", 0, None).unwrap()[..], b"v");
    }

    #[test]
    fn gives_up_after_max_attempts() {
        let s = RetryStore::new(flaky(100, false), fast(5));
        let err = s.head("k").unwrap_err();
        assert!(err.is_transient(), "{err}");
        assert!(
            err.to_string().contains("gave up after 5 attempts"),
            "{err}"
        );
        assert_eq!(s.inner().calls.load(Ordering::SeqCst), 5);
    }

    #[test]
    fn final_errors_are_not_retried() {
        let s = RetryStore::new(flaky(100, true), fast(5));
        assert!(matches!(s.get("k", 0, None), Err(ObjectError::Denied(_))));
        assert_eq!(s.inner().calls.load(Ordering::SeqCst), 1);
        let s = RetryStore::new(flaky(0, false), fast(5));
        assert!(matches!(s.head("missing"), Err(ObjectError::NotFound(_))));
        assert_eq!(s.inner().calls.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let s = RetrySettings::default();
        for retry in 1..40 {
            let d = s.backoff(retry);
            let full = s
                .base_delay
                .saturating_mul(1 << (retry - 1).min(20))
                .min(s.max_delay);
            assert!(
                d >= full / 2 && d <= full,
                "retry {retry}: {d:?} vs {full:?}"
            );
        }
    }
}
