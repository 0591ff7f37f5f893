//! Block reads: a bounded in-memory LRU of block objects, single-flight fetches (concurrent
//! readers of one block wait for the one request in flight) and background prefetch.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::{Condvar, Mutex};

use super::pool::Pool;
use crate::object::{ObjectError, ObjectStore};

struct Lru {
    map: HashMap<String, (Bytes, u64)>,
    order: BTreeMap<u64, String>,
    tick: u64,
    bytes: u64,
    cap: u64,
}

impl Lru {
    fn get(&mut self, key: &str) -> Option<Bytes> {
        let (data, t) = self.map.get_mut(key)?;
        self.order.remove(t);
        self.tick += 1;
        *t = self.tick;
        self.order.insert(self.tick, key.to_string());
        Some(data.clone())
    }
    fn put(&mut self, key: &str, data: Bytes) {
        if data.len() as u64 > self.cap {
            return;
        }
        self.remove(key);
        self.tick += 1;
        self.bytes += data.len() as u64;
        self.map.insert(key.to_string(), (data, self.tick));
        self.order.insert(self.tick, key.to_string());
        while self.bytes > self.cap {
            let Some((_, k)) = self.order.pop_first() else {
                break;
            };
            if let Some((d, _)) = self.map.remove(&k) {
                self.bytes -= d.len() as u64;
            }
        }
    }
    fn remove(&mut self, key: &str) {
        if let Some((d, t)) = self.map.remove(key) {
            self.order.remove(&t);
            self.bytes -= d.len() as u64;
        }
    }
}

type FlightResult = Option<Result<Bytes, FetchError>>;

#[derive(Default)]
struct Flight {
    result: Mutex<FlightResult>,
    cv: Condvar,
}

/// Error of a block fetch, already retried by the store.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FetchError {
    #[error("block {0} is missing from the object store")]
    Missing(String),
    #[error("block {key} has {got} bytes, expected {want}")]
    Corrupt {
        key: String,
        got: usize,
        want: usize,
    },
    #[error("{0}")]
    Store(String),
}

pub struct BlockReader {
    store: Arc<dyn ObjectStore>,
    cache: Mutex<Lru>,
    inflight: Mutex<HashMap<String, Arc<Flight>>>,
    pool: Pool,
}

impl BlockReader {
    pub fn new(store: Arc<dyn ObjectStore>, cache_bytes: u64, threads: usize) -> Self {
        BlockReader {
            store,
            cache: Mutex::new(Lru {
                map: HashMap::new(),
                order: BTreeMap::new(),
                tick: 0,
                bytes: 0,
                cap: cache_bytes,
            }),
            inflight: Mutex::new(HashMap::new()),
            pool: Pool::new("prefetch", threads),
        }
    }

    /// Put a block just written (read-after-write without a GET).
    pub fn insert(&self, key: &str, data: Bytes) {
        self.cache.lock().put(key, data);
    }

    pub fn forget(&self, key: &str) {
        self.cache.lock().remove(key);
    }

    pub fn cached(&self, key: &str) -> bool {
        self.cache.lock().map.contains_key(key)
    }

    /// The whole block `key` of `len` bytes, from cache or from the store (one request per
    /// block however many readers ask at once).
    pub fn get(&self, key: &str, len: usize) -> Result<Bytes, FetchError> {
        if let Some(b) = self.cache.lock().get(key) {
            return Ok(b);
        }
        let (flight, leader) = {
            let mut inflight = self.inflight.lock();
            match inflight.get(key) {
                Some(f) => (f.clone(), false),
                None => {
                    let f = Arc::new(Flight::default());
                    inflight.insert(key.to_string(), f.clone());
                    (f, true)
                }
            }
        };
        if leader {
            // Another reader may have filled the cache between our check and the flight.
            let res = match self.cache.lock().get(key) {
                Some(b) => Ok(b),
                None => self.fetch(key, len),
            };
            if let Ok(b) = &res {
                self.cache.lock().put(key, b.clone());
            }
            *flight.result.lock() = Some(res.clone());
            flight.cv.notify_all();
            self.inflight.lock().remove(key);
            return res;
        }
        let mut r = flight.result.lock();
        while r.is_none() {
            flight.cv.wait(&mut r);
        }
        r.clone()
            .unwrap_or_else(|| Err(FetchError::Store("fetch abandoned".into())))
    }

    fn fetch(&self, key: &str, len: usize) -> Result<Bytes, FetchError> {
        match self.store.get(key, 0, None) {
            Ok(b) if b.len() == len => Ok(b),
            Ok(b) => Err(FetchError::Corrupt {
                key: key.to_string(),
                got: b.len(),
                want: len,
            }),
            Err(ObjectError::NotFound(_)) => Err(FetchError::Missing(key.to_string())),
            Err(e) => Err(FetchError::Store(e.to_string())),
        }
    }

    /// Fetch blocks in the background (readahead); errors are left for the real read.
    pub fn prefetch(self: &Arc<Self>, blocks: Vec<(String, usize)>) {
        for (key, len) in blocks {
            if self.cached(&key) || self.inflight.lock().contains_key(&key) {
                continue;
            }
            let me = self.clone();
            self.pool.spawn(move || {
                let _ = me.get(&key, len);
            });
        }
    }

    pub fn shutdown(&self) {
        self.pool.shutdown();
    }
}
