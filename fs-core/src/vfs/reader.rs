//! Block reads through the cache tiers: memory, local disk, the cache group's owner of the
//! block, then the object store. One fetch per block however many readers ask at once (single
//! flight), and readers of a block being fetched are served as soon as the bytes they asked
//! for have arrived (read while filling), not when the whole block is there.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use parking_lot::{Condvar, Mutex};

use super::buffers::Buffers;
use super::pool::Pool;
use crate::cache::disk::DiskCache;
use crate::cache::group::Group;
use crate::cache::{CacheSettings, MemCache};
use crate::metrics::Metrics;
use crate::object::{ObjectError, ObjectStore};
use crate::source::Source as ObjectSource;

/// Waiters are woken every time this many more bytes of a block have arrived.
const WAKE_STEP: usize = 128 << 10;

/// Blocks mapped to their end before the store drops the oldest from the kernel's cache
/// ([`BlockReader::with_drop_behind`]): a reader's requests arrive a little out of order (the
/// kernel sends them on several FUSE threads), and a block dropped while a request still
/// wanted it would be read from the device again, one request at a time.
const DROP_LAG: usize = 16;

#[derive(Default)]
struct Fill {
    buf: Vec<u8>,
    done: Option<Result<Bytes, FetchError>>,
}

#[derive(Default)]
struct Flight {
    fill: Mutex<Fill>,
    cv: Condvar,
    /// Set by whoever runs the fetch: a prefetch still queued when a reader needs the
    /// block is run by the reader's side instead (it never waits behind the queue).
    started: std::sync::atomic::AtomicBool,
}

impl Flight {
    fn claim(&self) -> bool {
        !self.started.swap(true, std::sync::atomic::Ordering::AcqRel)
    }
}

/// Where a block of an attached source's file comes from: bytes `[off, off + len)` of the
/// source's object `key`, as long as its ETag is `etag` (docs/DATASETS.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub attach: u32,
    pub key: String,
    pub etag: String,
    pub off: u64,
}

impl Origin {
    /// As query parameters of a cache-group request (the owner may not have seen the file).
    pub fn query(&self) -> String {
        format!(
            "&src={}&off={}&etag={}&obj={}",
            self.attach,
            self.off,
            pct_encode(&self.etag),
            pct_encode(&self.key)
        )
    }

    /// From the query parameters [`Origin::query`] wrote.
    pub fn from_query(query: &str) -> Option<Origin> {
        let (mut attach, mut off, mut etag, mut key) = (None, None, None, None);
        for kv in query.split('&') {
            match kv.split_once('=') {
                Some(("src", v)) => attach = v.parse().ok(),
                Some(("off", v)) => off = v.parse().ok(),
                Some(("etag", v)) => etag = pct_decode(v),
                Some(("obj", v)) => key = pct_decode(v),
                _ => {}
            }
        }
        Some(Origin {
            attach: attach?,
            key: key?,
            etag: etag?,
            off: off?,
        })
    }
}

fn pct_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn pct_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let h = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(h, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Whether `key` is a block of an attached source (`{volume}/ext/…`) rather than one of the
/// volume's own objects.
pub fn is_ext_key(key: &str) -> bool {
    key.split_once('/')
        .is_some_and(|(_, rest)| rest.starts_with("ext/"))
}

/// The source of an attachment id, for blocks of attached files.
pub type SourceResolver = Arc<dyn Fn(u32) -> Option<Arc<dyn ObjectSource>> + Send + Sync>;

/// Error of a block fetch, already retried by the store.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FetchError {
    #[error("block {0} is missing from the object store")]
    Missing(String),
    #[error(
        "the source object changed while it was read: {0} (run `strata attach --sync` or wait for the refresh, then open the file again)"
    )]
    Changed(String),
    #[error("block {key} has {got} bytes, expected {want}")]
    Corrupt {
        key: String,
        got: usize,
        want: usize,
    },
    #[error("{0}")]
    Store(String),
}

/// Where a fetch may get a block it does not have.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Source {
    /// Peers of the cache group, then the object store (readers of this mount).
    Any,
    /// The object store only (serving a peer that already chose this member).
    Store,
}

/// How a flight's fetch runs.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Run {
    /// On the fetch pool: the caller waits only for the bytes it needs.
    Foreground,
    /// On the prefetch pool, nobody waits.
    Prefetch,
    /// In the calling thread (peer server threads: never queue behind local work).
    Inline,
}

pub struct BlockReader {
    store: Arc<dyn ObjectStore>,
    mem: Mutex<MemCache>,
    disk: Option<Arc<DiskCache>>,
    group: OnceLock<Arc<Group>>,
    inflight: Mutex<HashMap<String, Arc<Flight>>>,
    fetchers: Pool,
    prefetchers: Pool,
    metrics: Arc<Metrics>,
    cache_written: bool,
    /// Mapped blocks are read once: the store's cached pages are dropped behind the readers
    /// ([`BlockReader::with_drop_behind`]) by this thread, `DROP_LAG` blocks late.
    drop_behind: Option<Pool>,
    /// Blocks mapped to their end and not yet dropped, oldest first.
    behind: Mutex<std::collections::VecDeque<String>>,
    buffers: Arc<Buffers>,
    /// Blocks of attached sources' files: where each comes from (registered by the plans
    /// of reads and by peers' requests; bounded).
    origins: Mutex<HashMap<String, Origin>>,
    resolver: OnceLock<SourceResolver>,
}

impl BlockReader {
    pub fn new(
        store: Arc<dyn ObjectStore>,
        mem_bytes: u64,
        prefetch_threads: usize,
        disk: Option<Arc<DiskCache>>,
        settings: &CacheSettings,
        metrics: Arc<Metrics>,
    ) -> Self {
        BlockReader {
            drop_behind: None,
            behind: Mutex::new(std::collections::VecDeque::new()),
            store,
            mem: Mutex::new(MemCache::new(mem_bytes)),
            disk,
            group: OnceLock::new(),
            inflight: Mutex::new(HashMap::new()),
            fetchers: Pool::new("fetch", settings.fetch_threads.max(1)),
            prefetchers: Pool::new("prefetch", prefetch_threads.max(1)),
            metrics,
            cache_written: settings.cache_written,
            buffers: Buffers::new(8),
            origins: Mutex::new(HashMap::new()),
            resolver: OnceLock::new(),
        }
    }

    /// Reads are served to the kernel's page cache (a FUSE mount), which keeps what it is
    /// given: the pages a store of local files took in the kernel's cache for a block are
    /// dropped once it was read (mapped reads: to its end, `DROP_LAG` blocks later; fetched
    /// blocks: when the whole block has arrived), so each byte is cached once, not twice (a
    /// reader along a file bigger than half the memory otherwise pushes the machine into
    /// reclaim).
    pub fn with_drop_behind(mut self, on: bool) -> Self {
        self.drop_behind = on.then(|| Pool::new("drop-behind", 1));
        self
    }

    /// With drop-behind on, tell the store on the drop-behind thread that block `key` is
    /// read ([`ObjectStore::done_with`]).
    fn drop_from_store_cache(&self, key: String) {
        if let Some(pool) = &self.drop_behind {
            let store = self.store.clone();
            pool.spawn(move || store.done_with(&key));
        }
    }

    /// The pool of block buffers (writers fill theirs from it too).
    pub fn buffers(&self) -> &Arc<Buffers> {
        &self.buffers
    }

    /// How attachment ids map to sources (once, at mount).
    pub fn set_resolver(&self, r: SourceResolver) {
        let _ = self.resolver.set(r);
    }

    /// Say where block `key` of an attached file comes from.
    pub fn register_origin(&self, key: &str, o: Origin) {
        let mut m = self.origins.lock();
        if m.len() >= 200_000 {
            m.clear();
        }
        m.insert(key.to_string(), o);
    }

    /// Where block `key` of an attached file comes from, if known here.
    pub fn origin(&self, key: &str) -> Option<Origin> {
        if !is_ext_key(key) {
            return None;
        }
        self.origins.lock().get(key).cloned()
    }

    /// Read `[off, off + len)` of the origin's object (from its offset) into `sink`.
    fn read_origin(
        &self,
        key: &str,
        o: &Origin,
        off: u64,
        len: u64,
        sink: &mut dyn FnMut(&[u8]),
    ) -> Result<u64, FetchError> {
        let src = self
            .resolver
            .get()
            .and_then(|r| r(o.attach))
            .ok_or_else(|| {
                FetchError::Store(format!(
                    "block {key}: attachment {} is not available in this client",
                    o.attach
                ))
            })?;
        src.read(&o.key, &o.etag, o.off + off, len, sink)
            .map_err(|e| match e {
                ObjectError::NotFound(_) => {
                    FetchError::Missing(format!("{} (object {} of {})", key, o.key, src.describe()))
                }
                ObjectError::Changed(m) => FetchError::Changed(m),
                e => FetchError::Store(format!("{} of {}: {e}", o.key, src.describe())),
            })
    }

    /// Join a cache group (once, at mount).
    pub fn set_group(&self, group: Arc<Group>) {
        let _ = self.group.set(group);
    }

    pub fn group(&self) -> Option<&Arc<Group>> {
        self.group.get()
    }

    pub fn disk(&self) -> Option<&Arc<DiskCache>> {
        self.disk.as_ref()
    }

    fn mem_put(&self, key: &str, data: Bytes, fresh: bool) {
        let (evicted, bytes) = {
            let mut m = self.mem.lock();
            let n = if fresh {
                m.put_fresh(key, data)
            } else {
                m.put(key, data)
            };
            (n, m.bytes())
        };
        self.metrics.cache_evictions("memory", evicted as u64);
        self.metrics.cache_bytes("memory", bytes);
    }

    /// A block just written by this client (read-after-write and peers without a GET): to
    /// the disk tier when there is one. Not to memory: a writer of a big file would push
    /// every block read by others out of it, and hold its own bytes twice while they upload.
    pub fn insert(&self, key: &str, data: Bytes) {
        if let Some(d) = &self.disk
            && self.cache_written
        {
            d.put_async(key, data);
        }
    }

    /// Forget a block (its object is being deleted).
    pub fn forget(&self, key: &str) {
        self.mem.lock().remove(key);
        if let Some(d) = &self.disk {
            d.remove(key);
        }
    }

    /// Whether reads map the store's files instead of caching blocks: a store on this
    /// machine that prefers it ([`ObjectStore::prefers_map`]), and no disk tier or group to
    /// fill. The kernel's page cache is the cache then; a second copy in memory would only
    /// double the memory and the copying.
    pub(crate) fn direct(&self) -> bool {
        // Asked each time: a volume moving between stores (a mirror) changes its answer.
        self.disk.is_none() && self.group.get().is_none() && self.store.prefers_map()
    }

    /// Bytes `[from, to)` of block `key` (`len` bytes) mapped from the store's file, if
    /// [`Self::direct`].
    fn mapped(
        &self,
        key: &str,
        len: usize,
        from: usize,
        to: usize,
    ) -> Option<Result<Bytes, FetchError>> {
        if !self.direct() || is_ext_key(key) {
            return None;
        }
        // None: not this time (a transient failure; the streamed read retries).
        let res = self.store.map(key, from as u64, (to - from) as u64)?;
        if self.drop_behind.is_some() && to >= len {
            let old = {
                let mut q = self.behind.lock();
                q.push_back(key.to_string());
                (q.len() > DROP_LAG).then(|| q.pop_front()).flatten()
            };
            if let Some(old) = old {
                self.drop_from_store_cache(old);
            }
        }
        Some(exact_range(key, from, to, res))
    }

    /// The block if this client's memory or disk tier holds it (for a peer's handoff
    /// probe: no fetch, and no promotion in the memory tier).
    pub fn cached_block(&self, key: &str, len: usize) -> Option<Bytes> {
        self.local(key, len, false)
    }

    /// Whether a block just fetched stays cached: with a disk tier it must be on disk
    /// (memory alone does not keep a warm-up), else in memory.
    pub fn kept(&self, key: &str) -> bool {
        match &self.disk {
            Some(d) => d.contains(key),
            None => self.cached(key),
        }
    }

    /// Whether the block is in this client's memory or disk tier.
    pub fn cached(&self, key: &str) -> bool {
        self.mem.lock().contains(key) || self.disk.as_ref().is_some_and(|d| d.contains(key))
    }

    /// The block from memory or disk (a disk hit is promoted to memory). `hit`: whether
    /// this access counts as a use of the block (see [`MemCache::get`]).
    fn local(&self, key: &str, len: usize, hit: bool) -> Option<Bytes> {
        if let Some(b) = self.mem.lock().get(key, hit) {
            self.metrics.cache_hit("memory");
            return Some(b);
        }
        let b = self.disk.as_ref()?.get(key, len, &self.buffers)?;
        self.metrics.cache_hit("disk");
        self.mem_put(key, b.clone(), false);
        Some(b)
    }

    /// Append bytes `[from, to)` of block `key` (`len` bytes) to `out`, waiting only until
    /// those bytes have arrived.
    pub fn read_into(
        self: &Arc<Self>,
        key: &str,
        len: usize,
        from: usize,
        to: usize,
        out: &mut Vec<u8>,
    ) -> Result<(), FetchError> {
        if let Some(res) = self.mapped(key, len, from, to) {
            out.extend_from_slice(&res?);
            return Ok(());
        }
        if let Some(b) = self.local(key, len, from == 0) {
            return copy_range(&b, key, from, to, out);
        }
        let flight = self.flight(key, len, Source::Any, Run::Foreground);
        wait_range(&flight, key, from, to, out)
    }

    /// Bytes `[from, to)` of block `key` (`len` bytes) without copying them when the block
    /// is cached or complete: a slice of the block itself. While the block is still
    /// arriving, the range is copied out as soon as it is there.
    pub fn read_bytes(
        self: &Arc<Self>,
        key: &str,
        len: usize,
        from: usize,
        to: usize,
    ) -> Result<Bytes, FetchError> {
        if let Some(res) = self.mapped(key, len, from, to) {
            return res;
        }
        if let Some(b) = self.local(key, len, from == 0) {
            return slice_range(&b, key, from, to);
        }
        let flight = self.flight(key, len, Source::Any, Run::Foreground);
        let mut f = flight.fill.lock();
        loop {
            if let Some(done) = &f.done {
                let b = done.clone()?;
                return slice_range(&b, key, from, to);
            }
            if f.buf.len() >= to {
                return Ok(Bytes::copy_from_slice(&f.buf[from..to]));
            }
            flight.cv.wait(&mut f);
        }
    }

    /// Like [`BlockReader::read_into`] for random reads that should not pull in whole
    /// blocks: a cached or in-flight block is used, otherwise only `[from, to)` is read from
    /// the object store and nothing is cached.
    pub fn read_range_into(
        self: &Arc<Self>,
        key: &str,
        len: usize,
        from: usize,
        to: usize,
        out: &mut Vec<u8>,
    ) -> Result<(), FetchError> {
        if self.inflight.lock().contains_key(key) || self.cached(key) {
            return self.read_into(key, len, from, to, out);
        }
        self.metrics.cache_miss();
        if let Some(o) = self.origin(key) {
            let got = self.read_origin(key, &o, from as u64, (to - from) as u64, &mut |c| {
                out.extend_from_slice(c)
            })?;
            if got != (to - from) as u64 {
                return Err(FetchError::Corrupt {
                    key: key.to_string(),
                    got: got as usize,
                    want: to - from,
                });
            }
            return Ok(());
        }
        let res = self.store.get(key, from as u64, Some((to - from) as u64));
        out.extend_from_slice(&exact_range(key, from, to, res)?);
        Ok(())
    }

    /// The whole block.
    pub fn get(self: &Arc<Self>, key: &str, len: usize) -> Result<Bytes, FetchError> {
        self.get_from(key, len, Source::Any)
    }

    /// The whole block for a peer of the group: fetched in this thread, from `source`.
    pub fn get_from(
        self: &Arc<Self>,
        key: &str,
        len: usize,
        source: Source,
    ) -> Result<Bytes, FetchError> {
        if let Some(b) = self.local(key, len, true) {
            return Ok(b);
        }
        let flight = self.flight(key, len, source, Run::Inline);
        let mut f = flight.fill.lock();
        while f.done.is_none() {
            flight.cv.wait(&mut f);
        }
        f.done.clone().expect("checked above")
    }

    /// Fetch blocks in the background (readahead) into memory: from the disk tier when
    /// there, else from a peer or the store. Errors are left for the real read.
    pub fn prefetch(self: &Arc<Self>, blocks: Vec<(String, usize)>) {
        if blocks.is_empty() {
            return;
        }
        if self.direct() && !blocks.first().is_some_and(|(k, _)| is_ext_key(k)) {
            // The kernel reads the files ahead into its page cache; asking it to takes a
            // while (it allocates and queues the pages), so not in the reader's thread.
            let store = self.store.clone();
            self.prefetchers.spawn(move || {
                for (key, _) in blocks {
                    store.will_need(&key);
                }
            });
            return;
        }
        for (key, len) in blocks {
            if self.inflight.lock().contains_key(&key) || self.mem.lock().contains(&key) {
                continue;
            }
            self.flight(&key, len, Source::Any, Run::Prefetch);
        }
    }

    /// The flight of `key`, joining the one in progress or starting one.
    fn flight(self: &Arc<Self>, key: &str, len: usize, source: Source, run: Run) -> Arc<Flight> {
        let (flight, joined) = {
            let mut inflight = self.inflight.lock();
            match inflight.get(key) {
                Some(f) => (f.clone(), true),
                None => {
                    // Finished between the caller's cache lookup and now (a fetch puts the
                    // block in memory before it leaves `inflight`): no second fetch.
                    if let Some(b) = self.mem.lock().get(key, false) {
                        let f = Flight::default();
                        f.fill.lock().done = Some(Ok(b));
                        f.started.store(true, std::sync::atomic::Ordering::Release);
                        return Arc::new(f);
                    }
                    let f = Arc::new(Flight::default());
                    inflight.insert(key.to_string(), f.clone());
                    (f, false)
                }
            }
        };
        if joined
            && (run == Run::Prefetch || flight.started.load(std::sync::atomic::Ordering::Acquire))
        {
            return flight;
        }
        let me = self.clone();
        let (k, f) = (key.to_string(), flight.clone());
        let ahead = run == Run::Prefetch;
        let job = move || {
            if f.claim() {
                me.fetch(&k, len, &f, source, ahead)
            }
        };
        match run {
            Run::Foreground => self.fetchers.spawn(job),
            Run::Prefetch => self.prefetchers.spawn(job),
            Run::Inline => job(),
        }
        flight
    }

    /// Fill `flight` with block `key`: local tiers (another reader may have just finished
    /// it), the group's owner, the object store; then cache it and wake everyone.
    /// `ahead`: a readahead, whose first use by a reader is not a repeat hit.
    fn fetch(
        self: &Arc<Self>,
        key: &str,
        len: usize,
        flight: &Flight,
        source: Source,
        ahead: bool,
    ) {
        let res = match self.local(key, len, false) {
            Some(b) => Ok(b),
            None => {
                self.metrics.cache_miss();
                self.fetch_remote(key, len, flight, source)
            }
        };
        if let Ok(b) = &res {
            self.mem_put(key, b.clone(), ahead);
        }
        let fetched = res.as_ref().ok().cloned();
        if fetched.is_none() {
            // A failed flight is never joined: a reader coming after it fetches again (the
            // store may be back), even before this thread would have got to the removal.
            self.inflight.lock().remove(key);
        }
        {
            let mut f = flight.fill.lock();
            f.buf = Vec::new();
            f.done = Some(res);
        }
        flight.cv.notify_all();
        // Waiters have their bytes; the flight stays joinable (serving the block to late
        // readers) until the disk tier holds it too. Otherwise a block evicted from memory
        // while a queued disk write was still pending (or dropped) would be fetched again.
        let ok = fetched.is_some();
        if let (Some(b), Some(d)) = (fetched, &self.disk)
            && !d.contains(key)
            && let Err(e) = d.put(key, &b)
        {
            tracing::warn!(key, error = %e, "writing a block to the disk cache failed");
        }
        if ok {
            self.inflight.lock().remove(key);
        }
    }

    fn fetch_remote(
        &self,
        key: &str,
        len: usize,
        flight: &Flight,
        source: Source,
    ) -> Result<Bytes, FetchError> {
        {
            let mut f = flight.fill.lock();
            if f.buf.capacity() < len {
                f.buf = self.buffers.take(len);
            }
        }
        let mut woken = 0usize;
        let mut sink = |c: &[u8]| {
            let filled = {
                let mut f = flight.fill.lock();
                let room = len.saturating_sub(f.buf.len());
                f.buf.extend_from_slice(&c[..c.len().min(room)]);
                f.buf.len()
            };
            if filled >= woken + WAKE_STEP || filled >= len {
                woken = filled;
                flight.cv.notify_all();
            }
        };
        if let Some(g) = self.group.get() {
            let asked = if source == Source::Any {
                g.target(key)
            } else {
                None
            };
            let origin = self.origin(key).map(|o| o.query()).unwrap_or_default();
            if let Some(peer) = &asked {
                match g.fetch(peer, key, len, &origin, &mut sink) {
                    Ok(true) => self.metrics.cache_peer_hit(),
                    Ok(false) => {}
                    Err(e) => {
                        self.metrics.cache_peer_error();
                        g.mark_down(peer);
                        tracing::info!(peer = %peer, key, error = %e, "cache group peer failed, reading from the object store");
                    }
                }
            }
            // Not from the owner: this member is the one to fetch it (the owner, or the
            // peer the owner chose). Members that may hold it from before the last change
            // of membership (its previous owners, hot replicas) are asked for a cached
            // copy before the object store.
            if flight.fill.lock().buf.is_empty() {
                for holder in g.holders(key, asked.as_deref()) {
                    match g.fetch_cached(&holder, key, len, &mut sink) {
                        Ok(true) => {
                            self.metrics.cache_peer_hit();
                            break;
                        }
                        Ok(false) => {}
                        Err(e) => {
                            self.metrics.cache_peer_error();
                            g.mark_down(&holder);
                            tracing::info!(peer = %holder, key, error = %e, "cache group peer failed while asked for a cached block");
                        }
                    }
                    if !flight.fill.lock().buf.is_empty() {
                        // Cut short mid-block: the store sends the rest.
                        break;
                    }
                }
            }
        }
        // Whatever the peer did not deliver comes from the store; a stream cut short is
        // continued once more before it counts as corrupt.
        let mut from_store = false;
        for _ in 0..2 {
            let have = flight.fill.lock().buf.len();
            if have >= len {
                break;
            }
            if let Some(o) = self.origin(key) {
                self.read_origin(key, &o, have as u64, (len - have) as u64, &mut sink)?;
                continue;
            }
            match self.store.get_stream(key, have as u64, &mut sink) {
                Ok(_) => from_store = true,
                Err(ObjectError::NotFound(_)) => return Err(FetchError::Missing(key.to_string())),
                Err(e) => return Err(FetchError::Store(e.to_string())),
            }
        }
        let mut f = flight.fill.lock();
        if f.buf.len() != len {
            return Err(FetchError::Corrupt {
                key: key.to_string(),
                got: f.buf.len(),
                want: len,
            });
        }
        // The whole block is in memory now, on its way to the disk tier and the mount's page
        // cache: a copy in the kernel's cache of the store's file is a third one.
        if from_store {
            self.drop_from_store_cache(key.to_string());
        }
        Ok(self.buffers.freeze(std::mem::take(&mut f.buf)))
    }

    pub fn shutdown(&self) {
        self.prefetchers.shutdown();
        if let Some(p) = &self.drop_behind {
            p.shutdown();
        }
        self.fetchers.shutdown();
        if let Some(d) = &self.disk {
            d.shutdown();
        }
        if let Some(g) = self.group.get() {
            g.shutdown();
        }
    }
}

/// Bytes `[from, to)` of block `key` as a store answered them: exactly that many, or an error
/// (missing, short, store failure), never fewer bytes as if they were all.
fn exact_range(
    key: &str,
    from: usize,
    to: usize,
    res: crate::object::Result<Bytes>,
) -> Result<Bytes, FetchError> {
    match res {
        Ok(b) if b.len() == to - from => Ok(b),
        Ok(b) => Err(FetchError::Corrupt {
            key: key.to_string(),
            got: from + b.len(),
            want: to,
        }),
        Err(ObjectError::NotFound(_)) => Err(FetchError::Missing(key.to_string())),
        Err(e) => Err(FetchError::Store(e.to_string())),
    }
}

fn slice_range(b: &Bytes, key: &str, from: usize, to: usize) -> Result<Bytes, FetchError> {
    if from <= to && to <= b.len() {
        Ok(b.slice(from..to))
    } else {
        Err(FetchError::Corrupt {
            key: key.to_string(),
            got: b.len(),
            want: to,
        })
    }
}

fn copy_range(
    b: &[u8],
    key: &str,
    from: usize,
    to: usize,
    out: &mut Vec<u8>,
) -> Result<(), FetchError> {
    match b.get(from..to) {
        Some(s) => {
            out.extend_from_slice(s);
            Ok(())
        }
        None => Err(FetchError::Corrupt {
            key: key.to_string(),
            got: b.len(),
            want: to,
        }),
    }
}

fn wait_range(
    flight: &Flight,
    key: &str,
    from: usize,
    to: usize,
    out: &mut Vec<u8>,
) -> Result<(), FetchError> {
    let mut f = flight.fill.lock();
    loop {
        if let Some(done) = &f.done {
            let b = done.clone()?;
            return copy_range(&b, key, from, to, out);
        }
        if f.buf.len() >= to {
            out.extend_from_slice(&f.buf[from..to]);
            return Ok(());
        }
        flight.cv.wait(&mut f);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;
    use crate::object::{MemStore, ObjectInfo};

    /// A store that counts GETs and streams slowly in small pieces.
    /// A store whose streamed reads come in 64 KiB pieces `delay` apart; as a store of
    /// "local files" (`maps`) it maps objects and records the keys it was told it is done
    /// with.
    struct SlowStore {
        inner: MemStore,
        gets: AtomicUsize,
        delay: Duration,
        maps: bool,
        done: Mutex<Vec<String>>,
    }

    impl SlowStore {
        fn new(delay: Duration, maps: bool) -> Self {
            SlowStore {
                inner: MemStore::new(),
                gets: AtomicUsize::new(0),
                delay,
                maps,
                done: Mutex::new(Vec::new()),
            }
        }
    }

    impl ObjectStore for SlowStore {
        fn describe(&self) -> String {
            "slow".into()
        }
        fn init(&self) -> crate::object::Result<()> {
            Ok(())
        }
        fn get(&self, key: &str, off: u64, len: Option<u64>) -> crate::object::Result<Bytes> {
            self.gets.fetch_add(1, Ordering::SeqCst);
            self.inner.get(key, off, len)
        }
        fn get_stream(
            &self,
            key: &str,
            off: u64,
            sink: &mut dyn FnMut(&[u8]),
        ) -> crate::object::Result<u64> {
            self.gets.fetch_add(1, Ordering::SeqCst);
            let b = self.inner.get(key, off, None)?;
            for c in b.chunks(64 << 10) {
                std::thread::sleep(self.delay);
                sink(c);
            }
            Ok(b.len() as u64)
        }
        fn prefers_map(&self) -> bool {
            self.maps
        }
        fn map(&self, key: &str, off: u64, len: u64) -> Option<crate::object::Result<Bytes>> {
            Some(self.inner.get(key, off, Some(len)))
        }
        fn done_with(&self, key: &str) {
            self.done.lock().push(key.to_string());
        }
        fn put(&self, key: &str, data: Bytes) -> crate::object::Result<()> {
            self.inner.put(key, data)
        }
        fn delete(&self, key: &str) -> crate::object::Result<()> {
            self.inner.delete(key)
        }
        fn head(&self, key: &str) -> crate::object::Result<ObjectInfo> {
            self.inner.head(key)
        }
        fn list(
            &self,
            p: &str,
            s: Option<&str>,
            l: usize,
        ) -> crate::object::Result<Vec<ObjectInfo>> {
            self.inner.list(p, s, l)
        }
    }

    fn setup(delay_ms: u64, disk: Option<Arc<DiskCache>>) -> (Arc<SlowStore>, Arc<BlockReader>) {
        let store = Arc::new(SlowStore::new(Duration::from_millis(delay_ms), false));
        let data: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 251) as u8).collect();
        store
            .put("v/chunks/0/0/1_0_1048576", Bytes::from(data))
            .unwrap();
        let reader = Arc::new(BlockReader::new(
            store.clone(),
            64 << 20,
            2,
            disk,
            &CacheSettings::default(),
            Arc::new(Metrics::new()),
        ));
        (store, reader)
    }

    #[test]
    fn mapped_blocks_read_to_their_end_are_dropped_behind_the_reader_late() {
        let blocks = DROP_LAG + 3;
        let key = |i: usize| format!("v/chunks/0/0/{}_0_8192", i + 1);
        let run = |drop_behind: bool| {
            let store = Arc::new(SlowStore::new(Duration::ZERO, true));
            for i in 0..blocks {
                store
                    .put(&key(i), Bytes::from(vec![i as u8; 8192]))
                    .unwrap();
            }
            let reader = BlockReader::new(
                store.clone(),
                64 << 20,
                1,
                None,
                &CacheSettings::default(),
                Arc::new(Metrics::new()),
            )
            .with_drop_behind(drop_behind);
            let reader = Arc::new(reader);
            assert!(reader.direct());
            for i in 0..blocks {
                // The second half first (requests arrive out of order), then the first.
                let b = reader.read_bytes(&key(i), 8192, 4096, 8192).unwrap();
                assert_eq!(&b[..], &[i as u8; 4096][..]);
                let mut out = Vec::new();
                reader.read_into(&key(i), 8192, 0, 4096, &mut out).unwrap();
                assert_eq!(out, vec![i as u8; 4096]);
            }
            // Read again, not to the end: not counted.
            reader.read_bytes(&key(0), 8192, 0, 100).unwrap();
            reader.shutdown(); // runs the queued drops
            store.done.lock().clone()
        };
        assert_eq!(
            run(true),
            (0..3).map(key).collect::<Vec<_>>(),
            "the oldest blocks, in order, once DROP_LAG newer ones were read"
        );
        assert!(
            run(false).is_empty(),
            "off unless asked for (the S3 gateway)"
        );
    }

    #[test]
    fn blocks_fetched_whole_from_the_store_are_dropped_from_its_files_at_once() {
        let store = Arc::new(SlowStore::new(Duration::ZERO, false));
        let keys: Vec<String> = (1..=3)
            .map(|i| format!("v/chunks/0/0/{i}_0_8192"))
            .collect();
        for k in &keys {
            store.put(k, Bytes::from(vec![7u8; 8192])).unwrap();
        }
        let reader = Arc::new(
            BlockReader::new(
                store.clone(),
                64 << 20,
                1,
                None,
                &CacheSettings::default(),
                Arc::new(Metrics::new()),
            )
            .with_drop_behind(true),
        );
        assert!(!reader.direct());
        for k in &keys {
            assert_eq!(reader.get(k, 8192).unwrap().len(), 8192);
        }
        reader.get(&keys[0], 8192).unwrap(); // from the memory tier: not the store's
        reader.shutdown();
        assert_eq!(*store.done.lock(), keys);
    }

    #[test]
    fn concurrent_readers_share_one_fetch() {
        let (store, reader) = setup(2, None);
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let r = reader.clone();
                std::thread::spawn(move || {
                    let mut out = Vec::new();
                    let from = i * 100_000;
                    r.read_into(
                        "v/chunks/0/0/1_0_1048576",
                        1 << 20,
                        from,
                        from + 4096,
                        &mut out,
                    )
                    .unwrap();
                    assert_eq!(out[0], (from % 251) as u8);
                    out.len()
                })
            })
            .collect();
        for t in threads {
            assert_eq!(t.join().unwrap(), 4096);
        }
        assert_eq!(store.gets.load(Ordering::SeqCst), 1);
        // Now cached: no more requests.
        let b = reader.get("v/chunks/0/0/1_0_1048576", 1 << 20).unwrap();
        assert_eq!(b.len(), 1 << 20);
        assert_eq!(store.gets.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn first_bytes_arrive_before_the_whole_block() {
        // 16 pieces of 64 KiB, 30 ms each: the whole block takes ~480 ms.
        let (_store, reader) = setup(30, None);
        let start = std::time::Instant::now();
        let mut out = Vec::new();
        reader
            .read_into("v/chunks/0/0/1_0_1048576", 1 << 20, 0, 4096, &mut out)
            .unwrap();
        let first = start.elapsed();
        let whole = reader.get("v/chunks/0/0/1_0_1048576", 1 << 20).unwrap();
        let all = start.elapsed();
        assert_eq!(&whole[..4096], &out[..]);
        assert!(
            first * 3 < all,
            "first bytes after {first:?}, whole block after {all:?}"
        );
    }

    #[test]
    fn missing_and_short_blocks_are_errors_never_zeros() {
        let (store, reader) = setup(0, None);
        let mut out = Vec::new();
        let e = reader
            .read_into("v/chunks/0/0/9_0_10", 10, 0, 10, &mut out)
            .unwrap_err();
        assert!(matches!(e, FetchError::Missing(_)), "{e}");
        store
            .put("v/chunks/0/0/2_0_100", Bytes::from(vec![1u8; 50]))
            .unwrap();
        let e = reader.get("v/chunks/0/0/2_0_100", 100).unwrap_err();
        assert!(matches!(e, FetchError::Corrupt { got: 50, .. }), "{e}");
        assert!(out.is_empty());
    }

    #[test]
    fn range_reads_fetch_only_the_range_and_cache_nothing() {
        let (store, reader) = setup(0, None);
        let mut out = Vec::new();
        reader
            .read_range_into("v/chunks/0/0/1_0_1048576", 1 << 20, 1000, 1100, &mut out)
            .unwrap();
        assert_eq!(out.len(), 100);
        assert_eq!(out[0], (1000 % 251) as u8);
        assert!(!reader.cached("v/chunks/0/0/1_0_1048576"));
        // A cached block is used as it is.
        reader.get("v/chunks/0/0/1_0_1048576", 1 << 20).unwrap();
        let before = store.gets.load(Ordering::SeqCst);
        out.clear();
        reader
            .read_range_into("v/chunks/0/0/1_0_1048576", 1 << 20, 0, 10, &mut out)
            .unwrap();
        assert_eq!(store.gets.load(Ordering::SeqCst), before);
        let e = reader
            .read_range_into("v/chunks/0/0/8_0_10", 10, 0, 10, &mut out)
            .unwrap_err();
        assert!(matches!(e, FetchError::Missing(_)), "{e}");
    }

    #[test]
    fn disk_tier_serves_after_memory_is_gone() {
        let t = tempfile::tempdir().unwrap();
        let disk = DiskCache::open(
            &[t.path().to_path_buf()],
            "u",
            64 << 20,
            0.0,
            Arc::new(Metrics::new()),
        )
        .unwrap();
        let (store, reader) = setup(0, Some(disk.clone()));
        reader.get("v/chunks/0/0/1_0_1048576", 1 << 20).unwrap();
        reader.shutdown(); // waits for the disk write
        let reader2 = Arc::new(BlockReader::new(
            store.clone(),
            64 << 20,
            1,
            Some(disk),
            &CacheSettings::default(),
            Arc::new(Metrics::new()),
        ));
        let b = reader2.get("v/chunks/0/0/1_0_1048576", 1 << 20).unwrap();
        assert_eq!(b[1000], (1000 % 251) as u8);
        assert_eq!(store.gets.load(Ordering::SeqCst), 1);
    }
}
