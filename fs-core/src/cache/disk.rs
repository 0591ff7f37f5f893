//! The block cache on local disk. One directory per `--cache-dir` entry, each holding
//! `<dir>/<volume uuid>/raw/<block key>` files and a `tmp/` staging area. A cached file is the
//! block followed by an 8-byte trailer: CRC-32C of the block (little endian) and the magic
//! `STB1` (see docs/FORMAT.md, "Disk cache"). A file whose size, magic or checksum is wrong is
//! deleted and reported as a miss, so corrupt data is refetched, never returned.
//!
//! The index (keys and sizes, segmented LRU) lives in memory and is rebuilt from the files at
//! startup by a background scan, oldest first, so a remount keeps its warm cache. Reads do not
//! wait for the scan: a key not yet indexed is looked up on disk directly.
//!
//! Write-back (`--writeback`) stages written blocks under `<dir>/<volume uuid>/staging/<key>`,
//! same file format, outside the index: they are the only copy until the uploader
//! ([`crate::vfs::writeback`]) has stored them, so they are never evicted. Reads find them
//! like cached blocks. Once uploaded a staged file becomes a cached block (renamed into
//! `raw/`) or is deleted. Staged bytes count towards the directory's capacity.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use parking_lot::Mutex;

use super::slru::Slru;
use crate::directio::DirectWrites;
use crate::metrics::Metrics;
use crate::vfs::buffers::Buffers;
use crate::vfs::pool::Pool;

const MAGIC: &[u8; 4] = b"STB1";
/// A file in `tmp/` older than this is the leftover of a writer that crashed; a younger one
/// may be another live client's (clients of one volume may share a cache directory).
const STALE_TMP: std::time::Duration = std::time::Duration::from_secs(600);

/// Remove the entries of `tmp` last modified more than `age` ago.
fn remove_stale_tmp(tmp: &Path, age: std::time::Duration) {
    let Ok(entries) = fs::read_dir(tmp) else {
        return;
    };
    for e in entries.flatten() {
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|a| a > age);
        if old {
            let p = e.path();
            let _ = fs::remove_file(&p).or_else(|_| fs::remove_dir_all(&p));
        }
    }
}
const TRAILER: usize = 8;

/// Errors setting up the disk cache (each names the directory and the fix).
#[derive(Debug, thiserror::Error)]
pub enum DiskCacheError {
    #[error(
        "cache directory {dir}: {err} (choose a writable directory with --cache-dir, or --cache-size 0 to disable the disk cache)"
    )]
    Dir { dir: String, err: std::io::Error },
}

struct Dir {
    root: PathBuf,
    index: Mutex<Slru>,
    /// Fraction of the file system that must stay free.
    free_ratio: f64,
    last_space_check: Mutex<Option<Instant>>,
    /// The last check found the file system below `free_ratio` free even after evicting:
    /// new blocks are not written until a later check finds room.
    low_space: AtomicBool,
    last_low_space_warning: Mutex<Option<Instant>>,
    /// (free, total) bytes of the file system at a path: `fs_space`, replaced in tests.
    space: fn(&Path) -> Option<(u64, u64)>,
    /// Until the startup scan is done: the keys this process stored, evicted or removed.
    /// The scan leaves them alone (file times are too coarse to tell a block written right
    /// after the mount from an older one; restoring one this process evicted would index a
    /// block that is gone).
    own: Mutex<Option<std::collections::HashSet<String>>>,
    /// Staged blocks (write-back) and their bytes, trailer included.
    staged: Mutex<(u64, u64)>,
    /// Staged blocks this process removed (their objects are being deleted) and whose
    /// uploader has not seen it yet (see [`DiskCache::unstage`]).
    removed_staged: Mutex<std::collections::HashSet<String>>,
    /// Block files (cached and staged) are written past the page cache where the file
    /// system allows.
    direct: DirectWrites,
}

impl Dir {
    /// Note keys this process changed while the startup scan may still run.
    fn note_own<'a>(&self, keys: impl IntoIterator<Item = &'a str>) {
        if let Some(own) = self.own.lock().as_mut() {
            own.extend(keys.into_iter().map(str::to_string));
        }
    }
}

/// The disk tier: a set of cache directories, a block maps to one by hash.
pub struct DiskCache {
    dirs: Vec<Arc<Dir>>,
    writers: Pool,
    pending: AtomicU64,
    max_pending: u64,
    metrics: Arc<Metrics>,
    tmp_seq: AtomicU64,
}

fn valid_key(key: &str) -> bool {
    !key.is_empty()
        && !key.starts_with('/')
        && key
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..")
}

/// Encode a block as a cache file body.
pub fn encode(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + TRAILER);
    out.extend_from_slice(data);
    out.extend_from_slice(&trailer(data));
    out
}

/// The trailer of a cache file holding `data`: CRC-32C (little endian) and the magic.
fn trailer(data: &[u8]) -> [u8; TRAILER] {
    let mut t = [0u8; TRAILER];
    t[..4].copy_from_slice(&crc32c::crc32c(data).to_le_bytes());
    t[4..].copy_from_slice(MAGIC);
    t
}

/// Whether `data`, followed in its file by the trailer `t`, verifies.
fn verify(data: &[u8], t: &[u8; TRAILER]) -> bool {
    &t[4..] == MAGIC && t[..4] == crc32c::crc32c(data).to_le_bytes()
}

impl DiskCache {
    /// Open (creating) the cache directories for volume `uuid`, `total` bytes split evenly
    /// between them. Starts the background index rebuild.
    pub fn open(
        dirs: &[PathBuf],
        uuid: &str,
        total: u64,
        free_ratio: f64,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>, DiskCacheError> {
        Self::open_with(dirs, uuid, total, free_ratio, metrics, fs_space)
    }

    /// `open`, measuring free space with `space` (tests fake a full disk).
    fn open_with(
        dirs: &[PathBuf],
        uuid: &str,
        total: u64,
        free_ratio: f64,
        metrics: Arc<Metrics>,
        space: fn(&Path) -> Option<(u64, u64)>,
    ) -> Result<Arc<Self>, DiskCacheError> {
        let per_dir = total / dirs.len().max(1) as u64;
        metrics.cache_capacity("disk", total);
        let mut out = Vec::new();
        for d in dirs {
            let root = d.join(uuid);
            let mk = |p: &Path| {
                fs::create_dir_all(p).map_err(|err| DiskCacheError::Dir {
                    dir: d.display().to_string(),
                    err,
                })
            };
            mk(&root.join("raw"))?;
            mk(&root.join("tmp"))?;
            // Leftovers of writes interrupted by a crash. Only old ones: another client of
            // the volume may share the directory and be writing there now.
            remove_stale_tmp(&root.join("tmp"), STALE_TMP);
            // Check we can write there now rather than failing every block later.
            let probe = root.join("tmp").join(format!(
                "probe-{}-{}",
                std::process::id(),
                SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(0, |d| d.subsec_nanos())
            ));
            File::create(&probe)
                .and_then(|mut f| f.write_all(b"x"))
                .map_err(|err| DiskCacheError::Dir {
                    dir: d.display().to_string(),
                    err,
                })?;
            let _ = fs::remove_file(&probe);
            out.push(Arc::new(Dir {
                index: Mutex::new(Slru::new(per_dir)),
                free_ratio: free_ratio.clamp(0.0, 0.99),
                last_space_check: Mutex::new(None),
                low_space: AtomicBool::new(false),
                last_low_space_warning: Mutex::new(None),
                space,
                own: Mutex::new(Some(Default::default())),
                staged: Mutex::new((0, 0)),
                removed_staged: Mutex::new(Default::default()),
                direct: DirectWrites::new(root.clone(), 4),
                root,
            }));
        }
        let cache = Arc::new(DiskCache {
            dirs: out,
            writers: Pool::new("cache-write", 2),
            pending: AtomicU64::new(0),
            max_pending: 256 << 20,
            metrics,
            tmp_seq: AtomicU64::new(0),
        });
        // Blocks written from now on are indexed by `put`; the scan indexes only older files.
        let opened = SystemTime::now();
        for d in &cache.dirs {
            let d = d.clone();
            let me = Arc::downgrade(&cache);
            let _ = std::thread::Builder::new()
                .name("cache-scan".into())
                .spawn(move || {
                    let started = Instant::now();
                    let n = d.rebuild_index(opened);
                    if let Some(c) = me.upgrade() {
                        c.report_bytes();
                    }
                    tracing::info!(dir = %d.root.display(), blocks = n, seconds = started.elapsed().as_secs_f64(), "disk cache index rebuilt");
                });
        }
        Ok(cache)
    }

    fn dir(&self, key: &str) -> &Arc<Dir> {
        let i = crc32c::crc32c(key.as_bytes()) as usize % self.dirs.len();
        &self.dirs[i]
    }

    /// Bytes indexed in all directories.
    pub fn bytes(&self) -> u64 {
        self.dirs.iter().map(|d| d.index.lock().bytes()).sum()
    }

    fn report_bytes(&self) {
        self.metrics.cache_bytes("disk", self.bytes());
    }

    /// Whether the block is cached (indexed, or present on disk before the scan reached it).
    pub fn contains(&self, key: &str) -> bool {
        if !valid_key(key) {
            return false;
        }
        let d = self.dir(key);
        d.index.lock().contains(key) || d.path(key).exists() || d.staged_path(key).exists()
    }

    /// The block, verified; `None` on a miss or a corrupt file (which is then removed).
    pub fn get(&self, key: &str, len: usize, pool: &Arc<Buffers>) -> Option<Bytes> {
        if !valid_key(key) {
            return None;
        }
        let d = self.dir(key);
        let path = d.path(key);
        let Ok(mut f) = File::open(&path) else {
            return match self.read_staged(key, len, pool) {
                Ok(b) => b,
                Err(e) => {
                    tracing::error!(key, error = %e, "reading a staged block failed");
                    None
                }
            };
        };
        let size = f.metadata().ok()?.len();
        // The block straight into a reused block buffer (no zeroing, no fresh pages), then
        // its trailer.
        let mut buf = pool.take(len);
        let verified = if size == (len + TRAILER) as u64 {
            let mut t = [0u8; TRAILER];
            let read = (&mut f).take(len as u64).read_to_end(&mut buf).is_ok()
                && buf.len() == len
                && f.read_exact(&mut t).is_ok();
            if !read {
                return None; // an I/O error, not a bad file: a miss, the file stays
            }
            verify(&buf, &t)
        } else {
            false
        };
        if verified {
            let mut idx = d.index.lock();
            if !idx.touch(key) {
                // Found before the startup scan indexed it.
                idx.restore(key, (len + TRAILER) as u64);
            }
            return Some(pool.freeze(buf));
        }
        tracing::warn!(key, path = %path.display(), "cached block failed verification, dropping it");
        self.metrics.cache_corrupt();
        {
            let mut idx = d.index.lock();
            d.note_own([key]);
            idx.remove(key);
        }
        let _ = fs::remove_file(&path);
        self.report_bytes();
        None
    }

    /// Store a block in the background (dropped when too much is already queued).
    pub fn put_async(self: &Arc<Self>, key: &str, data: Bytes) {
        if !valid_key(key) || self.contains(key) {
            return;
        }
        let n = data.len() as u64;
        if self.pending.fetch_add(n, Ordering::AcqRel) + n > self.max_pending {
            self.pending.fetch_sub(n, Ordering::AcqRel);
            return;
        }
        let me = self.clone();
        let key = key.to_string();
        self.writers.spawn(move || {
            if let Err(e) = me.put(&key, &data) {
                tracing::warn!(key = %key, error = %e, "writing a block to the disk cache failed");
            }
            me.pending.fetch_sub(n, Ordering::AcqRel);
        });
    }

    /// Store a block now.
    pub fn put(&self, key: &str, data: &[u8]) -> std::io::Result<()> {
        if !valid_key(key) {
            return Ok(());
        }
        let d = self.dir(key);
        if d.index.lock().cap() == 0 {
            return Ok(());
        }
        let size = (data.len() + TRAILER) as u64;
        if !d.make_space(size, &self.metrics) {
            self.metrics.cache_skipped("low_space");
            self.report_bytes();
            return Ok(());
        }
        self.write_file(d, &d.path(key), data)?;
        self.index_new(d, key, size);
        Ok(())
    }

    /// Write `data` and its trailer as the file `path` of directory `d`: into `tmp/`, then
    /// renamed into place, so a reader sees the whole file or none. The block goes past the
    /// page cache where the file system allows, for cached blocks too: a block just cached
    /// is served from the memory tier and the mount's own page cache, so a second copy in
    /// the page cache of its file only costs the copy into fresh pages (on a VM with free
    /// page reporting, a host fault each: a 1 GiB cold read filling the cache ran at 345-496
    /// MiB/s with both cores busy buffered, 585-715 with O_DIRECT; reads of the warm cache
    /// after a remount the same, docs/ARCHITECTURE.md).
    fn write_file(&self, d: &Dir, path: &Path, data: &[u8]) -> std::io::Result<()> {
        let tmp = self.tmp_path(d);
        let res = (|| {
            let mut f = File::create(&tmp)?;
            // The block, then its trailer (`encode` without copying the block).
            d.direct.write_all(&f, data)?;
            f.write_all(&trailer(data))?;
            if let Some(parent) = path.parent() {
                fs::create_dir_all(parent)?;
            }
            fs::rename(&tmp, path)
        })();
        if res.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        res
    }

    /// Index a block just placed at `raw/key`, evicting down to the capacity left by the
    /// staged blocks.
    fn index_new(&self, d: &Dir, key: &str, size: u64) {
        let staged = d.staged.lock().1;
        let evicted = {
            // Noted under the index lock, which the startup scan holds while it restores.
            let mut idx = d.index.lock();
            let mut ev = idx.insert(key, size);
            let room = idx.cap().saturating_sub(staged);
            ev.extend(idx.evict_to(room));
            d.note_own(std::iter::once(key).chain(ev.iter().map(String::as_str)));
            ev
        };
        for k in &evicted {
            let _ = fs::remove_file(d.path(k));
        }
        self.metrics.cache_evictions("disk", evicted.len() as u64);
        self.report_bytes();
    }

    fn tmp_path(&self, d: &Dir) -> PathBuf {
        d.root.join("tmp").join(format!(
            "{}.{}",
            std::process::id(),
            self.tmp_seq.fetch_add(1, Ordering::Relaxed)
        ))
    }

    /// Write-back: keep block `key` as a staged file, the block's only copy until
    /// [`DiskCache::unstage`] after its upload. `Ok(false)`: no room (staged blocks fill the
    /// directory's share of `--cache-size`, or its file system is below the free-space
    /// ratio); the caller uploads the block directly.
    pub fn stage(&self, key: &str, data: &[u8]) -> std::io::Result<bool> {
        if !valid_key(key) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("block key {key:?} cannot be staged"),
            ));
        }
        let d = self.dir(key);
        let size = (data.len() + TRAILER) as u64;
        let cap = d.index.lock().cap();
        if d.staged.lock().1 + size > cap || !d.make_space(size, &self.metrics) {
            self.metrics.cache_skipped("staging_full");
            return Ok(false);
        }
        self.write_file(d, &d.staged_path(key), data)?;
        {
            let mut st = d.staged.lock();
            st.0 += 1;
            st.1 += size;
        }
        self.report_staged();
        Ok(true)
    }

    /// Staged blocks and bytes in all directories.
    pub fn staged(&self) -> (u64, u64) {
        self.dirs.iter().fold((0, 0), |(n, b), d| {
            let s = d.staged.lock();
            (n + s.0, b + s.1)
        })
    }

    fn report_staged(&self) {
        let (n, b) = self.staged();
        self.metrics.writeback_staged(n, b);
    }

    /// Note that a staged file of `size` bytes left `staging/`.
    fn unstaged(&self, d: &Dir, size: u64) {
        {
            let mut st = d.staged.lock();
            st.0 = st.0.saturating_sub(1);
            st.1 = st.1.saturating_sub(size);
        }
        self.report_staged();
    }

    /// The staged block `key`, verified; `Ok(None)` when it is not staged (never was, or
    /// already uploaded or deleted). A staged file that does not verify is an error and
    /// stays (it is the block's only copy).
    pub fn read_staged(
        &self,
        key: &str,
        len: usize,
        pool: &Arc<Buffers>,
    ) -> std::io::Result<Option<Bytes>> {
        if !valid_key(key) {
            return Ok(None);
        }
        let path = self.dir(key).staged_path(key);
        let mut f = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let size = f.metadata()?.len();
        let bad = |what: &str| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("staged block {}: {what}", path.display()),
            )
        };
        if size != (len + TRAILER) as u64 {
            return Err(bad(&format!("{size} bytes, expected {}", len + TRAILER)));
        }
        let mut buf = pool.take(len);
        let mut t = [0u8; TRAILER];
        (&mut f).take(len as u64).read_to_end(&mut buf)?;
        f.read_exact(&mut t)?;
        if buf.len() != len || !verify(&buf, &t) {
            self.metrics.cache_corrupt();
            return Err(bad("checksum mismatch"));
        }
        Ok(Some(pool.freeze(buf)))
    }

    /// The staged block `key` was uploaded: it becomes a cached block (`keep`) or is
    /// deleted. Returns false when [`DiskCache::remove`] of this process deleted it meanwhile
    /// (its object is being deleted, so the upload must be undone). A staged file gone for
    /// another reason (another process sharing the directory uploaded it) returns true.
    pub fn unstage(&self, key: &str, keep: bool) -> bool {
        if !valid_key(key) {
            return true;
        }
        let d = self.dir(key);
        let removed = || !d.removed_staged.lock().remove(key);
        let sp = d.staged_path(key);
        let Ok(size) = fs::metadata(&sp).map(|m| m.len()) else {
            return removed();
        };
        if keep && d.index.lock().cap() > 0 {
            let path = d.path(key);
            if let Some(parent) = path.parent() {
                let _ = fs::create_dir_all(parent);
            }
            match fs::rename(&sp, &path) {
                Ok(()) => {
                    self.unstaged(d, size);
                    self.index_new(d, key, size);
                    return true;
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return removed(),
                Err(_) => {} // delete it instead
            }
        }
        match fs::remove_file(&sp) {
            Ok(()) => {
                self.unstaged(d, size);
                true
            }
            Err(_) => removed(),
        }
    }

    /// Make staged blocks durable (fsync(2) of a file whose blocks are staged). Returns the
    /// keys that are not staged (already uploaded, or never staged): the caller syncs them
    /// in the object store.
    pub fn sync_staged(&self, keys: &[String]) -> std::io::Result<Vec<String>> {
        let mut rest = Vec::new();
        let mut parents = std::collections::BTreeSet::new();
        for k in keys {
            if !valid_key(k) {
                rest.push(k.clone());
                continue;
            }
            let p = self.dir(k).staged_path(k);
            match File::open(&p) {
                Ok(f) => {
                    f.sync_data()?;
                    if let Some(parent) = p.parent() {
                        parents.insert(parent.to_path_buf());
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => rest.push(k.clone()),
                Err(e) => return Err(e),
            }
        }
        for p in parents {
            File::open(&p)?.sync_all()?;
        }
        Ok(rest)
    }

    /// The keys of all staged blocks (at mount: what earlier clients left to upload), and
    /// counts them.
    pub fn staged_keys(&self) -> Vec<String> {
        let mut out = Vec::new();
        for d in &self.dirs {
            let mut keys = Vec::new();
            let mut bytes = 0;
            for_each_block_file(&d.root.join("staging"), |key, md| {
                keys.push(key.to_string());
                bytes += md.len();
            });
            *d.staged.lock() = (keys.len() as u64, bytes);
            out.extend(keys);
        }
        self.report_staged();
        out
    }

    /// Drop a block (e.g. its object was deleted).
    pub fn remove(&self, key: &str) {
        if !valid_key(key) {
            return;
        }
        let d = self.dir(key);
        let sp = d.staged_path(key);
        if let Ok(m) = fs::metadata(&sp)
            && fs::remove_file(&sp).is_ok()
        {
            self.unstaged(d, m.len());
            let mut r = d.removed_staged.lock();
            if r.len() >= 100_000 {
                r.clear(); // bounded; a missed undo leaves an orphan for `strata gc`
            }
            r.insert(key.to_string());
        }
        {
            let mut idx = d.index.lock();
            d.note_own([key]);
            idx.remove(key);
        }
        let _ = fs::remove_file(d.path(key));
    }

    /// Wait for queued writes.
    pub fn shutdown(&self) {
        self.writers.shutdown();
    }
}

impl Dir {
    fn path(&self, key: &str) -> PathBuf {
        self.root.join("raw").join(key)
    }

    fn staged_path(&self, key: &str) -> PathBuf {
        self.root.join("staging").join(key)
    }

    /// Evict for `incoming` bytes, and further while the file system's free share is below
    /// the configured ratio (checked at most once a second). Returns whether the block may
    /// be written: not while the file system stays below the ratio after evicting (the disk
    /// is shared with something else that filled it), so the cache does not fill it further.
    fn make_space(&self, incoming: u64, metrics: &Metrics) -> bool {
        let staged = self.staged.lock().1;
        let evicted = {
            let mut idx = self.index.lock();
            let target = idx.cap().saturating_sub(staged).saturating_sub(incoming);
            let ev = idx.evict_to(target);
            self.note_own(ev.iter().map(String::as_str));
            ev
        };
        self.delete(&evicted, metrics);
        let due = {
            let mut last = self.last_space_check.lock();
            let due = last.is_none_or(|t| t.elapsed().as_secs() >= 1);
            if due {
                *last = Some(Instant::now());
            }
            due
        };
        if !due || self.free_ratio <= 0.0 {
            return !self.low_space.load(Ordering::Acquire);
        }
        let Some((free, total)) = (self.space)(&self.root) else {
            return true;
        };
        let want = (total as f64 * self.free_ratio) as u64 + incoming;
        let mut free_now = free;
        if free < want {
            let evicted = {
                let mut idx = self.index.lock();
                let target = idx.bytes().saturating_sub(want - free);
                let ev = idx.evict_to(target);
                self.note_own(ev.iter().map(String::as_str));
                ev
            };
            if !evicted.is_empty() {
                self.delete(&evicted, metrics);
                free_now = (self.space)(&self.root).map_or(free, |(f, _)| f);
            }
        }
        let low = free_now < want;
        self.low_space.store(low, Ordering::Release);
        if low {
            let mut last = self.last_low_space_warning.lock();
            if last.is_none_or(|t| t.elapsed().as_secs() >= 60) {
                *last = Some(Instant::now());
                tracing::warn!(
                    dir = %self.root.display(),
                    free_percent = free_now as f64 * 100.0 / total.max(1) as f64,
                    free_space_ratio = self.free_ratio,
                    "the disk cache's file system is below its free-space ratio: new blocks are not cached on disk \
                     (free space there, give --cache-dir another disk, or mount with a lower --free-space-ratio)"
                );
            }
        }
        !low
    }

    fn delete(&self, keys: &[String], metrics: &Metrics) {
        for k in keys {
            let _ = fs::remove_file(self.path(k));
        }
        if !keys.is_empty() {
            metrics.cache_evictions("disk", keys.len() as u64);
        }
    }

    /// Index the files on disk written before `opened`, oldest first. Returns the number of
    /// blocks. Newer files are this process's own `put`s, already indexed: restoring one that
    /// a `put` evicted (and deleted) while the scan ran would index a block that is gone.
    fn rebuild_index(&self, opened: SystemTime) -> usize {
        let mut found: Vec<(SystemTime, String, u64)> = Vec::new();
        for_each_block_file(&self.root.join("raw"), |key, md| {
            let t = md.modified().unwrap_or(SystemTime::UNIX_EPOCH);
            if t < opened {
                found.push((t, key.to_string(), md.len()));
            }
        });
        found.sort();
        let n = found.len();
        let evicted = {
            let mut idx = self.index.lock();
            // Taken under the index lock: a `put` or eviction notes its keys before it
            // changes the index, so none is missed.
            let own = self.own.lock().take().unwrap_or_default();
            for (_, k, size) in &found {
                if !idx.contains(k) && !own.contains(k) {
                    idx.restore(k, *size);
                }
            }
            // The cache may have been made smaller since the last mount; staged blocks
            // (write-back) take their share of it.
            let room = idx.cap().saturating_sub(self.staged.lock().1);
            idx.evict_to(room)
        };
        for k in evicted {
            let _ = fs::remove_file(self.path(&k));
        }
        n
    }
}

/// Call `f` with the key (path relative to `root`) and metadata of every file under `root`
/// (`raw/` or `staging/` of a cache directory); unreadable entries are skipped.
fn for_each_block_file(root: &Path, mut f: impl FnMut(&str, &fs::Metadata)) {
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(rd) = fs::read_dir(&dir) else { continue };
        for e in rd.flatten() {
            let Ok(md) = e.metadata() else { continue };
            let p = e.path();
            if md.is_dir() {
                stack.push(p);
            } else if let Ok(rel) = p.strip_prefix(root)
                && let Some(key) = rel.to_str()
            {
                f(key, &md);
            }
        }
    }
}

/// (free, total) bytes of the file system holding `p`.
fn fs_space(p: &Path) -> Option<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs writes into the zeroed struct; c is NUL-terminated.
    unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c.as_ptr(), &mut st) != 0 {
            return None;
        }
        let frsize = st.f_frsize as u64;
        Some((st.f_bavail as u64 * frsize, st.f_blocks as u64 * frsize))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &Path, cap: u64) -> Arc<DiskCache> {
        DiskCache::open(
            &[dir.to_path_buf()],
            "uuid",
            cap,
            0.0,
            Arc::new(Metrics::new()),
        )
        .unwrap()
    }

    fn wait_scan(c: &DiskCache, blocks: usize) {
        for _ in 0..200 {
            if c.dirs[0].index.lock().len() >= blocks {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    #[test]
    fn blocks_round_trip_and_survive_reopen() {
        let t = tempfile::tempdir().unwrap();
        let c = open(t.path(), 1 << 20);
        c.put("vol/chunks/0/0/1_0_5", b"hello").unwrap();
        assert_eq!(
            &c.get("vol/chunks/0/0/1_0_5", 5, &Buffers::new(0)).unwrap()[..],
            b"hello"
        );
        assert!(c.get("vol/chunks/0/0/2_0_5", 5, &Buffers::new(0)).is_none());
        drop(c);
        let c = open(t.path(), 1 << 20);
        wait_scan(&c, 1);
        assert_eq!(c.bytes(), 5 + TRAILER as u64);
        assert!(c.contains("vol/chunks/0/0/1_0_5"));
        assert_eq!(
            &c.get("vol/chunks/0/0/1_0_5", 5, &Buffers::new(0)).unwrap()[..],
            b"hello"
        );
    }

    #[test]
    fn staged_and_cached_blocks_skip_the_page_cache() {
        let t = tempfile::tempdir().unwrap();
        let c = open(t.path(), 64 << 20);
        let block: Vec<u8> = (0..4u32 << 20).map(|i| (i % 249) as u8).collect();
        c.put("vol/chunks/0/0/7_0_4194304", &block).unwrap();
        assert!(c.stage("vol/chunks/0/0/8_0_4194304", &block).unwrap());
        let raw = c.dirs[0].path("vol/chunks/0/0/7_0_4194304");
        let staged = c.dirs[0].staged_path("vol/chunks/0/0/8_0_4194304");
        if c.dirs[0].direct.enabled() {
            for (path, what) in [(&raw, "a cached block"), (&staged, "a staged block")] {
                let pages = crate::directio::resident_pages(path);
                assert!(
                    pages[..1024].iter().all(|r| !r),
                    "{what} went to the device"
                );
                assert!(pages[1024], "the trailer of {what} is a buffered write");
            }
        } else {
            eprintln!(
                "page-cache check skipped: {} refuses O_DIRECT",
                t.path().display()
            );
        }
        let pool = Buffers::new(1);
        let got = c
            .get("vol/chunks/0/0/7_0_4194304", block.len(), &pool)
            .unwrap();
        assert_eq!(&got[..], &block[..], "the trailer's checksum matches");
        drop(c);
        let c = open(t.path(), 64 << 20);
        wait_scan(&c, 1);
        let got = c
            .get("vol/chunks/0/0/7_0_4194304", block.len(), &pool)
            .unwrap();
        assert_eq!(&got[..], &block[..]);
    }

    #[test]
    fn a_second_client_leaves_the_first_ones_writes_in_progress_alone() {
        let t = tempfile::tempdir().unwrap();
        let _first = open(t.path(), 1 << 20);
        let tmp = t.path().join("uuid/tmp");
        // The first client is writing a block; a crashed one left a file an hour ago.
        fs::write(tmp.join("live"), b"x").unwrap();
        let stale = File::create(tmp.join("crashed")).unwrap();
        stale
            .set_modified(SystemTime::now() - std::time::Duration::from_secs(3600))
            .unwrap();
        drop(stale);
        let _second = open(t.path(), 1 << 20);
        assert!(tmp.join("live").exists());
        assert!(!tmp.join("crashed").exists());
        // The probes of both opens are gone.
        assert_eq!(fs::read_dir(&tmp).unwrap().count(), 1);
    }

    #[test]
    fn corrupt_or_truncated_blocks_are_dropped_not_returned() {
        let t = tempfile::tempdir().unwrap();
        let c = open(t.path(), 1 << 20);
        let key = "vol/chunks/0/0/7_0_4";
        c.put(key, b"abcd").unwrap();
        let path = t.path().join("uuid/raw").join(key);
        let mut raw = fs::read(&path).unwrap();
        raw[1] ^= 0xff;
        fs::write(&path, &raw).unwrap();
        assert!(
            c.get(key, 4, &Buffers::new(0)).is_none(),
            "a flipped bit must not be served"
        );
        assert!(!path.exists(), "the corrupt file is removed");
        assert!(!c.contains(key));
        c.put(key, b"abcd").unwrap();
        let raw = fs::read(&path).unwrap();
        fs::write(&path, &raw[..raw.len() - 3]).unwrap();
        assert!(
            c.get(key, 4, &Buffers::new(0)).is_none(),
            "a truncated file must not be served"
        );
        // A wrong expected length (a different block under the same key) is a miss too.
        c.put(key, b"abcd").unwrap();
        assert!(c.get(key, 5, &Buffers::new(0)).is_none());
    }

    #[test]
    fn eviction_keeps_within_capacity_and_deletes_files() {
        let t = tempfile::tempdir().unwrap();
        let block = vec![7u8; 1000];
        let per = (block.len() + TRAILER) as u64;
        let c = open(t.path(), per * 3);
        for i in 0..10 {
            c.put(&format!("v/chunks/0/0/{i}_0_1000"), &block).unwrap();
        }
        assert!(c.bytes() <= per * 3);
        let files = fs::read_dir(t.path().join("uuid/raw/v/chunks/0/0"))
            .unwrap()
            .count();
        assert_eq!(files, 3);
        assert!(c.contains("v/chunks/0/0/9_0_1000"));
        assert!(!c.contains("v/chunks/0/0/0_0_1000"));
    }

    #[test]
    fn reopening_smaller_evicts_down_to_the_new_size() {
        let t = tempfile::tempdir().unwrap();
        let block = vec![1u8; 100];
        let per = (block.len() + TRAILER) as u64;
        let c = open(t.path(), per * 10);
        for i in 0..10 {
            c.put(&format!("v/chunks/0/0/{i}_0_100"), &block).unwrap();
        }
        drop(c);
        let c = open(t.path(), per * 4);
        wait_scan(&c, 4);
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(c.bytes() <= per * 4, "{}", c.bytes());
    }

    static FREE: AtomicU64 = AtomicU64::new(0);

    fn fake_space(_: &Path) -> Option<(u64, u64)> {
        Some((FREE.load(Ordering::SeqCst), 1000 << 20))
    }

    #[test]
    fn a_disk_below_its_free_ratio_is_not_filled_further() {
        let t = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new());
        // 50% free: blocks are cached.
        FREE.store(500 << 20, Ordering::SeqCst);
        let c = DiskCache::open_with(
            &[t.path().to_path_buf()],
            "uuid",
            1 << 20,
            0.1,
            metrics,
            fake_space,
        )
        .unwrap();
        c.put("v/chunks/0/0/1_0_5", b"hello").unwrap();
        assert!(c.contains("v/chunks/0/0/1_0_5"));
        // 5% free (the ratio is 10%): the cache gives back what it holds and stores nothing.
        FREE.store(50 << 20, Ordering::SeqCst);
        *c.dirs[0].last_space_check.lock() = None;
        c.put("v/chunks/0/0/2_0_5", b"world").unwrap();
        assert!(
            !c.contains("v/chunks/0/0/2_0_5"),
            "no write below the ratio"
        );
        assert!(!c.contains("v/chunks/0/0/1_0_5"), "evicted to free space");
        // Still low between checks: nothing written either.
        c.put("v/chunks/0/0/3_0_5", b"again").unwrap();
        assert!(!c.contains("v/chunks/0/0/3_0_5"));
        assert!(
            c.metrics
                .encode()
                .contains("strata_cache_skipped_blocks_total{reason=\"low_space\"} 2"),
            "{}",
            c.metrics.encode()
        );
        // Space comes back: caching resumes at the next check.
        FREE.store(500 << 20, Ordering::SeqCst);
        *c.dirs[0].last_space_check.lock() = None;
        c.put("v/chunks/0/0/4_0_5", b"later").unwrap();
        assert!(c.contains("v/chunks/0/0/4_0_5"));
    }

    #[test]
    fn zero_capacity_stores_nothing_and_bad_keys_are_refused() {
        let t = tempfile::tempdir().unwrap();
        let c = open(t.path(), 0);
        c.put("v/chunks/0/0/1_0_1", b"x").unwrap();
        assert!(!c.contains("v/chunks/0/0/1_0_1"));
        let c = open(t.path(), 1 << 20);
        c.put("../escape", b"x").unwrap();
        c.put("/abs", b"x").unwrap();
        assert!(!t.path().join("escape").exists());
        assert!(c.get("../escape", 1, &Buffers::new(0)).is_none());
    }
}
