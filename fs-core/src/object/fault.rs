//! Fault injection for tests: latency, transient errors, lost replies and outages.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{ObjectError, ObjectInfo, ObjectStore, Result};

/// What [`FaultStore`] injects. Rates are probabilities per request, in `0.0..=1.0`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FaultSettings {
    /// Seed of the random generator: the same seed and the same sequence of requests give the
    /// same faults.
    pub seed: u64,
    /// Each request first sleeps a uniformly random time up to this.
    pub max_latency: Duration,
    /// Probability that a request fails with `Transient` without being performed.
    pub error_rate: f64,
    /// Probability that a request is performed but reports `Transient` anyway (the reply was
    /// lost: e.g. a put that actually landed, a delete that actually deleted).
    pub reset_rate: f64,
}

impl Default for FaultSettings {
    /// No faults at all (only [`FaultStore::set_outage`] then injects any).
    fn default() -> Self {
        FaultSettings {
            seed: 0,
            max_latency: Duration::ZERO,
            error_rate: 0.0,
            reset_rate: 0.0,
        }
    }
}

/// Wraps a store and injects faults drawn from a seeded generator.
#[derive(Debug)]
pub struct FaultStore<S> {
    inner: S,
    settings: FaultSettings,
    rng: Mutex<StdRng>,
    outage: AtomicBool,
    injected: AtomicU64,
}

enum Fate {
    Fail,
    Reset,
    Ok,
}

impl<S: ObjectStore> FaultStore<S> {
    /// Wrap `inner`.
    pub fn new(inner: S, settings: FaultSettings) -> Self {
        FaultStore {
            inner,
            settings,
            rng: Mutex::new(StdRng::seed_from_u64(settings.seed)),
            outage: AtomicBool::new(false),
            injected: AtomicU64::new(0),
        }
    }

    /// While on, every request fails with `Transient` without reaching the inner store.
    pub fn set_outage(&self, on: bool) {
        self.outage.store(on, Ordering::SeqCst);
    }

    /// How many faults (errors, resets, outage failures) were injected so far.
    pub fn injected(&self) -> u64 {
        self.injected.load(Ordering::SeqCst)
    }

    /// The wrapped store.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    fn fate(&self) -> Fate {
        let (sleep, roll) = {
            let mut rng = self.rng.lock();
            let max = self.settings.max_latency.as_nanos().min(u64::MAX as u128) as u64;
            let sleep = if max > 0 {
                rng.random_range(0..=max)
            } else {
                0
            };
            (sleep, rng.random::<f64>())
        };
        if sleep > 0 {
            std::thread::sleep(Duration::from_nanos(sleep));
        }
        if self.outage.load(Ordering::SeqCst) {
            return Fate::Fail;
        }
        if roll < self.settings.error_rate {
            Fate::Fail
        } else if roll < self.settings.error_rate + self.settings.reset_rate {
            Fate::Reset
        } else {
            Fate::Ok
        }
    }

    fn run<T>(&self, op: &str, key: &str, f: impl FnOnce(&S) -> Result<T>) -> Result<T> {
        match self.fate() {
            Fate::Ok => f(&self.inner),
            Fate::Fail => {
                self.injected.fetch_add(1, Ordering::SeqCst);
                Err(ObjectError::Transient(format!(
                    "injected fault: {op} {key} failed"
                )))
            }
            Fate::Reset => {
                let res = f(&self.inner);
                self.injected.fetch_add(1, Ordering::SeqCst);
                match res {
                    Ok(_) => Err(ObjectError::Transient(format!(
                        "injected fault: connection reset after {op} {key} was performed"
                    ))),
                    Err(e) => Err(e),
                }
            }
        }
    }
}

impl<S: ObjectStore> ObjectStore for FaultStore<S> {
    fn describe(&self) -> String {
        format!("fault({})", self.inner.describe())
    }

    fn init(&self) -> Result<()> {
        self.run("init", "", |s| s.init())
    }

    fn get(&self, key: &str, off: u64, len: Option<u64>) -> Result<Bytes> {
        self.run("get", key, |s| s.get(key, off, len))
    }

    fn put(&self, key: &str, data: Bytes) -> Result<()> {
        self.run("put", key, |s| s.put(key, data))
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
    use super::*;
    use crate::object::MemStore;

    fn outcomes(seed: u64) -> Vec<bool> {
        let s = FaultStore::new(
            MemStore::new(),
            FaultSettings {
                seed,
                error_rate: 0.3,
                reset_rate: 0.2,
                ..Default::default()
            },
        );
        (0..200)
            .map(|i| s.put(&format!("k{i}"), Bytes::new()).is_ok())
            .collect()
    }

    #[test]
    fn same_seed_same_faults() {
        let a = outcomes(7);
        assert_eq!(a, outcomes(7));
        assert_ne!(a, outcomes(8));
        let failures = a.iter().filter(|ok| !**ok).count();
        assert!((60..140).contains(&failures), "{failures} of 200 failed");
    }

    #[test]
    fn reset_performs_the_request() {
        let s = FaultStore::new(
            MemStore::new(),
            FaultSettings {
                reset_rate: 1.0,
                ..Default::default()
            },
        );
        assert!(
            s.put("k", Bytes::from_static(b"v"))
                .unwrap_err()
                .is_transient()
        );
        assert_eq!(&s.inner().get("k", 0, None).unwrap()[..], b"v");
        assert_eq!(s.injected(), 1);
    }

    #[test]
    fn error_does_not_perform_the_request() {
        let s = FaultStore::new(
            MemStore::new(),
            FaultSettings {
                error_rate: 1.0,
                ..Default::default()
            },
        );
        assert!(
            s.put("k", Bytes::from_static(b"v"))
                .unwrap_err()
                .is_transient()
        );
        assert!(s.inner().is_empty());
    }

    #[test]
    fn outage_switch() {
        let s = FaultStore::new(MemStore::new(), FaultSettings::default());
        s.put("k", Bytes::from_static(b"v")).unwrap();
        s.set_outage(true);
        assert!(s.get("k", 0, None).unwrap_err().is_transient());
        assert!(s.list("", None, 10).unwrap_err().is_transient());
        s.set_outage(false);
        assert_eq!(s.list("", None, 10).unwrap().len(), 1);
    }

    #[test]
    fn latency_is_injected() {
        let s = FaultStore::new(
            MemStore::new(),
            FaultSettings {
                seed: 1,
                max_latency: Duration::from_millis(4),
                ..Default::default()
            },
        );
        let start = std::time::Instant::now();
        for _ in 0..20 {
            let _ = s.head("k");
        }
        assert!(
            start.elapsed() >= Duration::from_millis(10),
            "{:?}",
            start.elapsed()
        );
    }
}
