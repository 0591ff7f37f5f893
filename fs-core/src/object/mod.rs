//! Object storage: the narrow trait every backend implements, and the wrappers that add
//! retries, metrics and fault injection around any backend.
//!
//! Objects are immutable: the file system only ever puts a key once, reads ranges of it and
//! deletes it when no longer referenced (see docs/FORMAT.md).

use std::sync::Arc;

use bytes::Bytes;

use crate::metrics::Metrics;

mod config;
mod fault;
mod instrumented;
mod local;
mod mem;
pub mod mirror;
mod retry;
mod s3;

pub use config::{StorageConfig, open_store};
pub use fault::{FaultSettings, FaultStore};
pub use instrumented::InstrumentedStore;
pub use local::LocalStore;
pub use mem::MemStore;
pub use mirror::{MirrorStore, PreferStore};
pub use retry::{RetrySettings, RetryStore};
pub use s3::{ListedObject, MULTIPART_THRESHOLD, S3Settings, S3Store};

/// One object as listed or returned by `head`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// The full key (without any store-level prefix).
    pub key: String,
    /// Size in bytes.
    pub size: u64,
    /// Last modification, unix seconds, where the store tells (`strata gc` leaves objects
    /// younger than its `--min-age` alone).
    pub modified: Option<i64>,
}

/// Errors of an object store. `Transient` errors are retried by [`RetryStore`]; the others are
/// final.
#[derive(Debug, thiserror::Error)]
pub enum ObjectError {
    /// The object does not exist.
    #[error("object {0} not found")]
    NotFound(String),
    /// Credentials or policy refused the request.
    #[error(
        "access denied by the object store: {0} (check the access key, secret key and bucket policy)"
    )]
    Denied(String),
    /// The bucket (or root directory) does not exist.
    #[error("bucket {0} does not exist (create it, or let `strata format` create it)")]
    NoBucket(String),
    /// A failure that may go away on retry (timeout, 5xx, connection error, throttling).
    #[error("object store request failed (will retry): {0}")]
    Transient(String),
    /// The object was replaced since its ETag was recorded (a conditional read failed).
    #[error("object changed: {0}")]
    Changed(String),
    /// Any other, final, failure.
    #[error("object store error: {0}")]
    Other(String),
}

impl ObjectError {
    /// Whether the error is worth retrying.
    pub fn is_transient(&self) -> bool {
        matches!(self, ObjectError::Transient(_))
    }
}

/// Result of an object store operation.
pub type Result<T> = std::result::Result<T, ObjectError>;

/// The narrow interface to an object store. Implementations are blocking (callers run on FUSE
/// worker threads or on the file system's own upload/download pools) and must be safe to call
/// from many threads at once.
pub trait ObjectStore: Send + Sync + 'static {
    /// A human-readable description without secrets, e.g. `file:///data/vol` or
    /// `s3://bucket (endpoint http://127.0.0.1:8333)`.
    fn describe(&self) -> String;
    /// Make sure the store is usable: create the bucket/directory if missing, check
    /// credentials. Called by `strata format` and at mount.
    fn init(&self) -> Result<()>;
    /// Read `len` bytes at `off` (`None`: to the end). Reading past the end returns what exists.
    fn get(&self, key: &str, off: u64, len: Option<u64>) -> Result<Bytes>;
    /// Read from `off` to the end, handing the data to `sink` piece by piece as it arrives
    /// (so a reader can use the first bytes before the rest is there). Returns the number of
    /// bytes delivered. A store that cannot stream delivers one piece.
    fn get_stream(&self, key: &str, off: u64, sink: &mut dyn FnMut(&[u8])) -> Result<u64> {
        let b = self.get(key, off, None)?;
        sink(&b);
        Ok(b.len() as u64)
    }
    /// Bytes `[off, off + len)` of an object (fewer at its end) mapped from a file on this
    /// machine, without copying them: the kernel's page cache holds them. `None`: this store
    /// has no local files (callers then use [`ObjectStore::get_stream`]).
    fn map(&self, _key: &str, _off: u64, _len: u64) -> Option<Result<Bytes>> {
        None
    }
    /// Whether readers should map this store's objects ([`ObjectStore::map`]) rather than
    /// stream and cache them: files on this machine, which the kernel's page cache holds.
    /// Not a promise that every `map` succeeds (a transient failure answers `None`).
    fn prefers_map(&self) -> bool {
        false
    }
    /// A hint that the object will be read soon (a store of local files starts reading it
    /// into the kernel's cache). Never fails; does nothing by default.
    fn will_need(&self, _key: &str) {}
    /// A hint that the object was read and the caller keeps its own copy (a store of local
    /// files drops it from the kernel's cache). Never fails; does nothing by default.
    fn done_with(&self, _key: &str) {}
    /// Make objects already stored durable against a crash of the machine (a store of local
    /// files flushes them to disk); remote stores are durable once a put returns.
    fn sync(&self, _keys: &[String]) -> Result<()> {
        Ok(())
    }
    /// Store an object; replaces any object with that key atomically (readers see old or new).
    fn put(&self, key: &str, data: Bytes) -> Result<()>;
    /// Delete an object. Deleting a missing object is not an error.
    fn delete(&self, key: &str) -> Result<()>;
    /// Size of an object, `NotFound` if missing.
    fn head(&self, key: &str) -> Result<ObjectInfo>;
    /// Objects whose key starts with `prefix`, in key order, after `start_after`, at most
    /// `limit` of them.
    fn list(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<ObjectInfo>>;
}

/// A shared store is a store too, so wrappers accept `Arc<dyn ObjectStore>`.
impl<T: ObjectStore + ?Sized> ObjectStore for Arc<T> {
    fn describe(&self) -> String {
        (**self).describe()
    }
    fn init(&self) -> Result<()> {
        (**self).init()
    }
    fn get(&self, key: &str, off: u64, len: Option<u64>) -> Result<Bytes> {
        (**self).get(key, off, len)
    }
    fn get_stream(&self, key: &str, off: u64, sink: &mut dyn FnMut(&[u8])) -> Result<u64> {
        (**self).get_stream(key, off, sink)
    }
    fn map(&self, key: &str, off: u64, len: u64) -> Option<Result<Bytes>> {
        (**self).map(key, off, len)
    }
    fn prefers_map(&self) -> bool {
        (**self).prefers_map()
    }
    fn will_need(&self, key: &str) {
        (**self).will_need(key)
    }
    fn done_with(&self, key: &str) {
        (**self).done_with(key)
    }
    fn sync(&self, keys: &[String]) -> Result<()> {
        (**self).sync(keys)
    }
    fn put(&self, key: &str, data: Bytes) -> Result<()> {
        (**self).put(key, data)
    }
    fn delete(&self, key: &str) -> Result<()> {
        (**self).delete(key)
    }
    fn head(&self, key: &str) -> Result<ObjectInfo> {
        (**self).head(key)
    }
    fn list(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<ObjectInfo>> {
        (**self).list(prefix, start_after, limit)
    }
}

/// Run `f` on every item with `threads` scoped threads taking the next item in turn (the
/// parallel deletes and copies of `strata gc`, `strata destroy` and the mirror copier).
pub fn for_each_parallel<T: Sync>(items: &[T], threads: usize, f: impl Fn(&T) + Sync) {
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..threads.max(1).min(items.len().max(1)) {
            s.spawn(|| {
                while let Some(item) =
                    items.get(next.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
                {
                    f(item);
                }
            });
        }
    });
}

/// The store the file system uses: `raw` wrapped so that every attempt is measured and logged
/// ([`InstrumentedStore`], inside) and transient failures are retried ([`RetryStore`],
/// outside). Retry outside means the metrics count every request actually sent, so a flaky
/// backend shows up as a high request/error rate rather than as unexplained latency.
pub fn layered(
    raw: Arc<dyn ObjectStore>,
    metrics: Arc<Metrics>,
    retry: RetrySettings,
) -> Arc<dyn ObjectStore> {
    Arc::new(RetryStore::new(InstrumentedStore::new(raw, metrics), retry))
}
