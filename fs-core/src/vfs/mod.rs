//! The virtual file system: POSIX operations over [`Meta`] (metadata) and an object store
//! (data), independent of FUSE. Owns open handles, write buffers ([`writer`]), block reads
//! with readahead ([`reader`]) and the background work: timed flushes, compaction, trimming
//! and deletion of unreferenced objects.

mod background;
pub mod buffers;
mod cache_ops;
pub mod external;
pub mod pool;
pub mod reader;
mod resume;
pub mod writeback;
pub mod writer;

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::{Condvar, Mutex};
use serde::{Deserialize, Serialize};

use crate::cache::CacheSettings;
use crate::cache::disk::DiskCache;
use crate::cache::group::Group;
use crate::chunk::{Segment, block_key};
use crate::meta::{
    CHUNK_SIZE, Ctx, Entry, FileKind, Format, Ino, Meta, MetaError, Node, ROOT_INO, SetAttr, StatFs,
};
use crate::metrics::Metrics;
use crate::object::ObjectStore;
use pool::Pool;
use reader::{BlockReader, FetchError};
use writer::{Backlog, Budget, FileWriter, FlushError, Unsynced, WriteCtx};

/// Settings of the VFS (mount options).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct VfsSettings {
    /// Seconds the kernel may cache attributes and entries.
    pub attr_timeout: f64,
    pub entry_timeout: f64,
    /// Seconds the kernel may cache names that lead to directories.
    pub dir_entry_timeout: f64,
    /// Seconds a file's chunk maps (which slices hold its data) are trusted without asking
    /// the metadata engine again; `None`: the attribute timeout.
    pub open_cache_timeout: Option<f64>,
    /// Bytes of written data buffered before writers wait for uploads.
    pub buffer_size: u64,
    /// Bytes of blocks kept in memory for reads.
    pub mem_cache_size: u64,
    pub upload_threads: usize,
    pub prefetch_threads: usize,
    /// Most bytes read ahead of a sequential reader.
    pub max_readahead: u64,
    /// Seconds buffered data may wait before it is flushed.
    pub flush_interval: f64,
    /// Slices in a chunk that trigger a compaction.
    pub compact_threshold: usize,
    pub read_only: bool,
    /// Run background cleaning (trim, reclaim, object deletion) in this client.
    pub background_gc: bool,
    /// Disk cache and cache group.
    pub cache: CacheSettings,
    /// Reads are answered to the kernel's page cache (a FUSE mount, not the S3 gateway):
    /// a local store's pages are dropped once read ([`BlockReader::with_drop_behind`]).
    /// Set by the mount, not a user setting.
    #[serde(skip)]
    pub page_cache_above: bool,
}

impl Default for VfsSettings {
    fn default() -> Self {
        VfsSettings {
            attr_timeout: 1.0,
            dir_entry_timeout: 1.0,
            open_cache_timeout: None,
            entry_timeout: 1.0,
            buffer_size: 300 << 20,
            mem_cache_size: 64 << 20,
            upload_threads: 16,
            prefetch_threads: 8,
            max_readahead: 64 << 20,
            flush_interval: 5.0,
            compact_threshold: 100,
            read_only: false,
            background_gc: true,
            cache: CacheSettings::default(),
            page_cache_above: false,
        }
    }
}

/// Errors of VFS operations; the FUSE layer maps them to errno.
#[derive(Debug, thiserror::Error)]
pub enum VfsError {
    #[error(transparent)]
    Meta(#[from] MetaError),
    #[error("reading data failed: {0}")]
    Fetch(#[from] FetchError),
    #[error("storing data failed: {0}")]
    Flush(#[from] FlushError),
    #[error("the file system is mounted read-only")]
    ReadOnly,
    #[error("unknown file handle")]
    BadHandle,
    /// The inode was deleted after its name was looked up (a replacing rename, an unlink):
    /// look the name up again.
    #[error("the file was deleted since it was looked up")]
    Stale,
    #[error("cache: {0}")]
    Cache(String),
    #[error("attached source: {0}")]
    Source(String),
}

pub type Result<T> = std::result::Result<T, VfsError>;

/// Files whose attributes at their last open are remembered (to let the kernel keep their
/// page cache when they did not change).
const OPENED_ATTRS_MAX: usize = 1 << 20;

/// How far below the request threads the upload threads are scheduled. A local-directory
/// put is a memory copy: on few cores, uploads running at equal priority took the CPU from
/// the thread answering the writer's next request (the writer waits for each). Uploads that
/// fall behind still block writers through the backlog bound, so they get the CPU back.
pub(crate) const UPLOAD_NICE: i32 = 5;

/// Most bytes asked of the kernel's page cache ahead of one reader of a store's files.
const DIRECT_READAHEAD: u64 = 16 << 20;

struct Readahead {
    next: u64,
    window: u64,
    /// File offset up to which readahead has been asked for (so each block is asked once).
    prefetched: u64,
}

struct FileHandle {
    ino: Ino,
    ra: Mutex<Readahead>,
    /// Lock owners that took locks through this open file (released at its last close:
    /// open-file-description and flock owners).
    lock_owners: Mutex<std::collections::HashSet<u64>>,
    /// For a file of an attached source: its object as when opened (reads through this
    /// handle never mix two versions of the object).
    ext: Option<Arc<crate::meta::ExtFile>>,
}

enum Piece {
    Zero(usize),
    Block {
        key: String,
        len: usize,
        from: usize,
        to: usize,
    },
}

type SegCache = HashMap<Ino, HashMap<u32, (Arc<Vec<Segment>>, u64, Instant)>>;

pub struct Vfs {
    pub meta: Arc<Meta>,
    pub settings: VfsSettings,
    pub metrics: Arc<Metrics>,
    format: Format,
    wctx: Arc<WriteCtx>,
    reader: Arc<BlockReader>,
    writers: Mutex<HashMap<Ino, Arc<FileWriter>>>,
    files: Mutex<HashMap<u64, Arc<FileHandle>>>,
    dirs: Mutex<HashMap<u64, Arc<Vec<Entry>>>>,
    open_counts: Mutex<HashMap<Ino, u32>>,
    opened_attrs: Mutex<HashMap<Ino, (i64, u64)>>,
    next_fh: AtomicU64,
    /// Open files being read sequentially (with a readahead window): they share the
    /// memory cache, so each one's window is a share of it.
    streams: std::sync::atomic::AtomicUsize,
    segs: Mutex<SegCache>,
    names: Mutex<HashMap<Ino, (Ino, Vec<u8>)>>,
    compact_queue: Mutex<BTreeSet<(Ino, u32)>>,
    /// Whether a file is below a quota (cached two seconds).
    quota_files: Mutex<HashMap<Ino, (bool, Instant)>>,
    /// Inodes this client ever locked: only their closes need to release locks.
    locked: Mutex<std::collections::HashSet<Ino>>,
    chunk_commits: Mutex<HashMap<(Ino, u32), usize>>,
    stop: AtomicBool,
    wake: (Mutex<bool>, Condvar),
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
    /// Attached sources as this client knows them.
    attached: Mutex<external::Attached>,
    /// One listing import at a time in this client.
    import_lock: Mutex<()>,
}

impl std::fmt::Debug for Vfs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Vfs({})", self.format.name)
    }
}

impl Vfs {
    /// A VFS; a disk cache or cache group that cannot be set up is logged and left out
    /// (use [`Vfs::try_new`] to fail instead).
    pub fn new(
        meta: Arc<Meta>,
        store: Arc<dyn ObjectStore>,
        format: Format,
        metrics: Arc<Metrics>,
        settings: VfsSettings,
    ) -> Arc<Self> {
        match Self::try_new(
            meta.clone(),
            store.clone(),
            format.clone(),
            metrics.clone(),
            settings.clone(),
        ) {
            Ok(v) => v,
            Err(e) => {
                tracing::error!(volume = %format.name, error = %e, "running without the disk cache and cache group");
                let mut s = settings;
                s.cache.dirs.clear();
                s.cache.group = None;
                Self::try_new(meta, store, format, metrics, s)
                    .expect("a VFS without disk cache and group has nothing to set up")
            }
        }
    }

    /// A VFS with its disk cache and cache group, or the error that prevents them.
    pub fn try_new(
        meta: Arc<Meta>,
        store: Arc<dyn ObjectStore>,
        format: Format,
        metrics: Arc<Metrics>,
        settings: VfsSettings,
    ) -> Result<Arc<Self>> {
        let disk = if settings.cache.disk_enabled() {
            Some(
                DiskCache::open(
                    &settings.cache.dirs,
                    &format.uuid,
                    settings.cache.disk_size,
                    settings.cache.free_space_ratio,
                    metrics.clone(),
                )
                .map_err(|e| VfsError::Cache(e.to_string()))?,
            )
        } else {
            None
        };
        let reader = Arc::new(
            BlockReader::new(
                store.clone(),
                settings.mem_cache_size,
                settings.prefetch_threads,
                disk,
                &settings.cache,
                metrics.clone(),
            )
            .with_drop_behind(settings.page_cache_above),
        );
        if settings.cache.group.is_some() {
            let g = Group::start(
                &settings.cache,
                &format.name,
                &format.uuid,
                &reader,
                metrics.clone(),
            )
            .map_err(|e| VfsError::Cache(e.to_string()))?;
            reader.set_group(g);
        }
        let writeback = reader.disk().map(|d| {
            writeback::Writeback::start(
                d.clone(),
                store.clone(),
                reader.buffers().clone(),
                metrics.clone(),
                &format.name,
                settings.cache.writeback,
                settings.cache.cache_written,
                std::time::Duration::from_millis(settings.cache.upload_delay_ms),
                {
                    let meta = meta.clone();
                    Arc::new(move |id| meta.is_garbage(id).unwrap_or(false))
                },
                settings.upload_threads,
            )
        });
        if settings.cache.writeback && writeback.is_none() {
            tracing::warn!(volume = %format.name, "--writeback needs the disk cache (--cache-dir, --cache-size): writes are uploaded before close returns");
        }
        let wctx = Arc::new(WriteCtx {
            meta: meta.clone(),
            store,
            writeback,
            reader: reader.clone(),
            uploads: Pool::with_nice("upload", settings.upload_threads, UPLOAD_NICE),
            budget: Arc::new(Budget::new(settings.buffer_size.max(8 << 20))),
            backlog: Arc::new(Backlog::new(settings.upload_threads.max(1) + 2)),
            unsynced: Arc::new(Unsynced::default()),
            metrics: metrics.clone(),
            volume: format.name.clone(),
            block_size: format.block_size,
        });
        let vfs = Arc::new(Vfs {
            meta,
            settings,
            metrics,
            format,
            wctx,
            reader,
            writers: Mutex::new(HashMap::new()),
            files: Mutex::new(HashMap::new()),
            dirs: Mutex::new(HashMap::new()),
            open_counts: Mutex::new(HashMap::new()),
            opened_attrs: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            streams: std::sync::atomic::AtomicUsize::new(0),
            segs: Mutex::new(HashMap::new()),
            names: Mutex::new(HashMap::new()),
            compact_queue: Mutex::new(BTreeSet::new()),
            locked: Mutex::new(Default::default()),
            quota_files: Mutex::new(HashMap::new()),
            chunk_commits: Mutex::new(HashMap::new()),
            stop: AtomicBool::new(false),
            wake: (Mutex::new(false), Condvar::new()),
            threads: Mutex::new(Vec::new()),
            attached: Mutex::new(Default::default()),
            import_lock: Mutex::new(()),
        });
        let weak = Arc::downgrade(&vfs);
        vfs.reader.set_resolver(Arc::new(move |id| {
            let v = weak.upgrade()?;
            match v.source(id) {
                Ok((src, _)) => Some(src),
                Err(e) => {
                    tracing::warn!(volume = %v.format.name, attachment = id, error = %e, "cannot open an attached source");
                    None
                }
            }
        }));
        Ok(vfs)
    }

    pub fn volume(&self) -> &str {
        &self.format.name
    }

    pub fn format(&self) -> &Format {
        &self.format
    }

    pub fn block_size(&self) -> u32 {
        self.format.block_size
    }

    fn check_writable(&self) -> Result<()> {
        if self.settings.read_only {
            return Err(VfsError::ReadOnly);
        }
        Ok(())
    }

    // ------------------------------------------------------------ paths for logs

    fn remember(&self, parent: Ino, name: &[u8], ino: Ino) {
        let mut names = self.names.lock();
        if names.len() > 1_000_000 {
            names.clear();
        }
        names.insert(ino, (parent, name.to_vec()));
    }

    /// Best-known path of an inode, for logs ("/a/b/c", or "<ino N>/c" when unknown).
    pub fn path(&self, ino: Ino) -> String {
        let names = self.names.lock();
        let mut parts = Vec::new();
        let mut cur = ino;
        for _ in 0..256 {
            if cur == ROOT_INO {
                parts.reverse();
                return format!("/{}", parts.join("/"));
            }
            match names.get(&cur) {
                Some((p, n)) => {
                    parts.push(String::from_utf8_lossy(n).into_owned());
                    cur = *p;
                }
                None => break,
            }
        }
        parts.reverse();
        if parts.is_empty() {
            format!("<inode {cur}>")
        } else {
            format!("<inode {cur}>/{}", parts.join("/"))
        }
    }

    pub fn path_of(&self, parent: Ino, name: &[u8]) -> String {
        let p = self.path(parent);
        let sep = if p.ends_with('/') { "" } else { "/" };
        format!("{p}{sep}{}", String::from_utf8_lossy(name))
    }

    // ------------------------------------------------------------ attributes

    fn overlay(&self, mut n: Node) -> Node {
        if n.kind == FileKind::File
            && let Some(w) = self.writers.lock().get(&n.ino).cloned()
            && let Some(len) = w.pending_length()
        {
            n.length = n.length.max(len);
        }
        n
    }

    pub fn getattr(&self, ino: Ino) -> Result<Node> {
        let n = self.meta.getattr(ino)?;
        self.note_node(&n);
        Ok(self.overlay(n))
    }

    pub fn lookup(&self, parent: Ino, name: &[u8]) -> Result<Node> {
        self.ensure_listed(parent)?;
        let n = self.meta.lookup(parent, name)?;
        self.note_node(&n);
        if name != b"." && name != b".." {
            self.remember(parent, name, n.ino);
        }
        Ok(self.overlay(n))
    }

    /// setattr(2) family; a size change flushes this inode's pending writes first (they
    /// happened before the truncate), then truncates in constant time.
    pub fn setattr(&self, ino: Ino, set: &SetAttr, size: Option<u64>) -> Result<Node> {
        self.check_writable()?;
        let mut node = None;
        if let Some(size) = size {
            self.flush_inode(ino)?;
            node = Some(self.meta.truncate(ino, size)?);
            self.invalidate(ino);
            if let Some(w) = self.writers.lock().get(&ino) {
                w.reset_length();
                w.clear_refusal();
            }
        }
        if set.mode.is_some()
            || set.uid.is_some()
            || set.gid.is_some()
            || set.atime.is_some()
            || set.mtime.is_some()
        {
            node = Some(self.meta.setattr(ino, set)?);
        }
        match node {
            Some(n) => Ok(self.overlay(n)),
            None => self.getattr(ino),
        }
    }

    pub fn fallocate(&self, ino: Ino, mode: i32, off: u64, len: u64) -> Result<Node> {
        self.check_writable()?;
        self.flush_inode(ino)?;
        let n = self.meta.fallocate(ino, mode, off, len)?;
        self.invalidate(ino);
        Ok(self.overlay(n))
    }

    /// statfs(2) at `ino`: the nearest directory quota, else the volume.
    pub fn statfs(&self, ino: Ino) -> Result<StatFs> {
        Ok(self.meta.statfs_at(ino)?)
    }

    // ------------------------------------------------------------ namespace

    pub fn mknod(
        &self,
        ctx: Ctx,
        parent: Ino,
        name: &[u8],
        kind: FileKind,
        mode: u32,
        rdev: u32,
    ) -> Result<Node> {
        self.check_writable()?;
        let n = self.meta.mknod(ctx, parent, name, kind, mode, rdev, None)?;
        self.remember(parent, name, n.ino);
        Ok(n)
    }

    pub fn symlink(&self, ctx: Ctx, parent: Ino, name: &[u8], target: &[u8]) -> Result<Node> {
        self.check_writable()?;
        let n = self
            .meta
            .mknod(ctx, parent, name, FileKind::Symlink, 0o777, 0, Some(target))?;
        self.remember(parent, name, n.ino);
        Ok(n)
    }

    pub fn readlink(&self, ino: Ino) -> Result<Vec<u8>> {
        Ok(self.meta.readlink(ino)?)
    }

    pub fn link(&self, ino: Ino, parent: Ino, name: &[u8]) -> Result<Node> {
        self.check_writable()?;
        let n = self.meta.link(ino, parent, name)?;
        Ok(self.overlay(n))
    }

    pub fn unlink(&self, parent: Ino, name: &[u8]) -> Result<()> {
        self.check_writable()?;
        Ok(self.meta.unlink(parent, name)?)
    }

    pub fn rmdir(&self, parent: Ino, name: &[u8]) -> Result<()> {
        self.check_writable()?;
        Ok(self.meta.rmdir(parent, name)?)
    }

    pub fn rename(
        &self,
        parent: Ino,
        name: &[u8],
        newparent: Ino,
        newname: &[u8],
        flags: u32,
    ) -> Result<()> {
        self.check_writable()?;
        self.meta.rename(parent, name, newparent, newname, flags)?;
        if let Ok(n) = self.meta.lookup(newparent, newname) {
            self.remember(newparent, newname, n.ino);
        }
        Ok(())
    }

    // ------------------------------------------------------------ files

    /// Open a file; returns the handle and whether the kernel may keep its page cache
    /// (the file did not change since this client last opened it).
    pub fn open(&self, ino: Ino, write: bool) -> Result<(u64, bool)> {
        if write {
            self.check_writable()?;
        }
        // Registered before the node is read (see `Meta::open`): a replacing rename racing
        // this open has then deleted the node (Stale: the caller looks the name up again)
        // or keeps it until this handle is closed.
        self.meta.open(ino);
        let checked = (|| {
            let n = self.getattr(ino).map_err(|e| match e {
                VfsError::Meta(MetaError::NotFound) => VfsError::Stale,
                e => e,
            })?;
            if n.kind == FileKind::Dir {
                return Err(MetaError::IsDir.into());
            }
            if write {
                crate::meta::check_not_source(&n)?;
            }
            Ok((n, self.ext_file_of(ino)?))
        })();
        let (n, ext) = match checked {
            Ok(v) => v,
            Err(e) => {
                if let Err(c) = self.meta.close(ino) {
                    tracing::warn!(volume = %self.volume(), path = %self.path(ino), error = %c, "undoing a failed open failed");
                }
                return Err(e);
            }
        };
        self.invalidate(ino);
        if let Some(w) = self.writers.lock().get(&ino) {
            w.clear_refusal();
        }
        let keep = {
            let mut opened = self.opened_attrs.lock();
            if opened.len() >= OPENED_ATTRS_MAX && !opened.contains_key(&ino) {
                // Bounded (a gateway or a crawler opens millions of files): forgetting
                // only costs the kernel's page cache of files opened long ago.
                opened.clear();
            }
            let keep = opened.get(&ino) == Some(&(n.mtime, n.length));
            opened.insert(ino, (n.mtime, n.length));
            keep
        };
        Ok((self.new_file_handle(ino, ext), keep))
    }

    /// A handle of `ino`, whose open the caller registered with [`Meta::open`].
    fn new_file_handle(&self, ino: Ino, ext: Option<Arc<crate::meta::ExtFile>>) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.files.lock().insert(
            fh,
            Arc::new(FileHandle {
                ino,
                ra: Mutex::new(Readahead {
                    next: 0,
                    window: 0,
                    prefetched: 0,
                }),
                lock_owners: Mutex::new(Default::default()),
                ext,
            }),
        );
        *self.open_counts.lock().entry(ino).or_insert(0) += 1;
        fh
    }

    pub fn create(&self, ctx: Ctx, parent: Ino, name: &[u8], mode: u32) -> Result<(Node, u64)> {
        self.check_writable()?;
        let n = self
            .meta
            .mknod(ctx, parent, name, FileKind::File, mode, 0, None)?;
        self.remember(parent, name, n.ino);
        self.opened_attrs.lock().insert(n.ino, (n.mtime, n.length));
        self.meta.open(n.ino);
        let fh = self.new_file_handle(n.ino, None);
        Ok((n, fh))
    }

    fn writer(&self, ino: Ino) -> Arc<FileWriter> {
        self.writers
            .lock()
            .entry(ino)
            .or_insert_with(|| Arc::new(FileWriter::new(ino)))
            .clone()
    }

    pub fn write(&self, ino: Ino, off: u64, data: &[u8]) -> Result<usize> {
        self.check_writable()?;
        if off
            .checked_add(data.len() as u64)
            .is_none_or(|e| e > 1 << 52)
        {
            return Err(MetaError::TooBig.into());
        }
        let w = self.writer(ino);
        // A background flush of this file failed (EDQUOT, ENOSPC, EIO): report it now.
        if let Some(e) = w.take_failure() {
            w.note_refusal(&e);
            return Err(e.into());
        }
        // An earlier commit of this file was refused for lack of room: so is this write.
        if let Some(e) = w.refusal() {
            return Err(e.into());
        }
        let pressure = || self.wake_background();
        w.write(&self.wctx, off, data, &pressure)?;
        // Below a quota, commit every block so a client overshoots a limit by at most one
        // block per file being written, and the writer sees EDQUOT from write().
        if w.buffered() >= self.format.block_size as u64
            && self.under_quota(ino)?
            && let Err(e) = self.flush_inode(ino)
        {
            if let VfsError::Flush(f) = &e {
                w.note_refusal(f);
            }
            return Err(e);
        }
        Ok(data.len())
    }

    fn under_quota(&self, ino: Ino) -> Result<bool> {
        let mut cache = self.quota_files.lock();
        if let Some((v, at)) = cache.get(&ino)
            && at.elapsed() < Duration::from_secs(2)
        {
            return Ok(*v);
        }
        drop(cache);
        let v = self.meta.under_quota(ino)?;
        cache = self.quota_files.lock();
        if cache.len() > 100_000 {
            cache.clear();
        }
        cache.insert(ino, (v, Instant::now()));
        Ok(v)
    }

    fn flush_writer(&self, w: &FileWriter) -> Result<()> {
        let res = w.flush(&self.wctx);
        self.invalidate(w.ino);
        let touched = res?;
        // Queue a compaction check for chunks that keep receiving slices.
        let half = (self.settings.compact_threshold / 2).max(1);
        let mut commits = self.chunk_commits.lock();
        for (indx, n) in touched {
            let c = commits.entry((w.ino, indx)).or_insert(0);
            let before = *c / half;
            *c += n;
            if *c / half != before {
                self.compact_queue.lock().insert((w.ino, indx));
            }
        }
        if commits.len() > 100_000 {
            commits.clear();
        }
        Ok(())
    }

    /// Upload and commit the pending writes of `ino`, if any.
    pub fn flush_inode(&self, ino: Ino) -> Result<()> {
        let w = self.writers.lock().get(&ino).cloned();
        match w {
            Some(w) => {
                let res = self.flush_writer(&w);
                // Report a failure of an earlier background flush too (once).
                let earlier = w.take_failure();
                res?;
                match earlier {
                    Some(e) => Err(e.into()),
                    None => Ok(()),
                }
            }
            None => Ok(()),
        }
    }

    /// fsync(2): store and commit pending writes, and make the file's objects durable
    /// against a crash of the machine (a store of local files flushes them to disk).
    pub fn fsync(&self, ino: Ino) -> Result<()> {
        self.flush_inode(ino)?;
        let keys = self.wctx.unsynced.take(ino);
        self.sync_objects(&keys)
            .map_err(|e| FlushError::Upload(e).into())
    }

    /// Make stored objects durable: staged blocks (write-back) on the local disk, the
    /// others in the object store.
    fn sync_objects(&self, keys: &[String]) -> std::result::Result<(), String> {
        if keys.is_empty() {
            return Ok(());
        }
        let rest = match &self.wctx.writeback {
            Some(wb) => wb
                .sync(keys)
                .map_err(|e| format!("syncing staged blocks: {e}"))?,
            None => keys.to_vec(),
        };
        if rest.is_empty() {
            return Ok(());
        }
        self.wctx.store.sync(&rest).map_err(|e| e.to_string())
    }

    /// Sync objects stored more than `age` ago (all of them with `Duration::ZERO`).
    pub(crate) fn sync_old_objects(&self, age: Duration) {
        let keys = self.wctx.unsynced.take_older(age);
        if let Err(e) = self.sync_objects(&keys) {
            tracing::warn!(volume = %self.volume(), error = %e, "flushing stored objects to disk failed");
        }
    }

    /// Close of one file descriptor: pending data is stored so the next open anywhere
    /// sees it (close-to-open).
    pub fn flush(&self, ino: Ino) -> Result<()> {
        self.flush_inode(ino)
    }

    /// Last close of open file `fh`. Locks taken through it (open-file-description locks,
    /// and the flock owner the kernel names in `flock_owner`) are released, unless another
    /// open file still holds the same owner id: the kernel reuses the ids of freed files and
    /// sends RELEASE asynchronously, so a late RELEASE must not drop a newer file's lock.
    pub fn release(&self, ino: Ino, fh: u64, flock_owner: Option<u64>) -> Result<()> {
        let handle = self.files.lock().remove(&fh);
        if let Some(h) = &handle
            && h.ra.lock().window > 0
        {
            self.streams.fetch_sub(1, Ordering::Relaxed);
        }
        let mut owners: Vec<u64> = handle
            .map(|h| h.lock_owners.lock().drain().collect())
            .unwrap_or_default();
        owners.extend(flock_owner);
        owners.sort_unstable();
        owners.dedup();
        for owner in owners {
            let in_use = self
                .files
                .lock()
                .values()
                .any(|h| h.ino == ino && h.lock_owners.lock().contains(&owner));
            if !in_use && let Err(e) = self.unlock_owner(ino, owner) {
                // The lock stays until this client's session ends; the close goes on.
                tracing::warn!(volume = %self.volume(), path = %self.path(ino), error = %e, "releasing locks at close failed");
            }
        }
        let last = {
            let mut oc = self.open_counts.lock();
            match oc.get_mut(&ino) {
                Some(c) if *c > 1 => {
                    *c -= 1;
                    false
                }
                _ => {
                    oc.remove(&ino);
                    true
                }
            }
        };
        let mut res = Ok(());
        if last {
            res = self.flush_inode(ino);
            let mut writers = self.writers.lock();
            if let Some(w) = writers.get(&ino)
                && w.idle()
            {
                writers.remove(&ino);
            }
        }
        self.meta.close(ino)?;
        res
    }

    fn invalidate(&self, ino: Ino) {
        self.segs.lock().remove(&ino);
    }

    fn segments(&self, ino: Ino, indx: u32) -> Result<(Arc<Vec<Segment>>, u64)> {
        let ttl = Duration::from_secs_f64(
            self.settings
                .open_cache_timeout
                .unwrap_or(self.settings.attr_timeout)
                .max(0.0),
        );
        if let Some((s, len, at)) = self.segs.lock().get(&ino).and_then(|m| m.get(&indx))
            && at.elapsed() < ttl
        {
            return Ok((s.clone(), *len));
        }
        let (segs, len) = self.meta.read_chunk(ino, indx)?;
        let segs = Arc::new(segs);
        self.segs
            .lock()
            .entry(ino)
            .or_default()
            .insert(indx, (segs.clone(), len, Instant::now()));
        Ok((segs, len))
    }

    /// How to produce file bytes `[off, end)` (clipped to the file length).
    fn plan(&self, ino: Ino, off: u64, end: u64) -> Result<Vec<Piece>> {
        if let Some(f) = self.ext_file_of(ino)? {
            return Ok(self.plan_ext(&f, off, end));
        }
        let bs = self.format.block_size as u64;
        let mut out = Vec::new();
        let mut pos = off;
        let mut end = end;
        while pos < end {
            let indx = (pos / CHUNK_SIZE) as u32;
            let (segs, length) = self.segments(ino, indx)?;
            end = end.min(length);
            if pos >= end {
                break;
            }
            let cstart = indx as u64 * CHUNK_SIZE;
            let cend = (cstart + CHUNK_SIZE).min(end);
            let mut p = (pos - cstart) as u32;
            let stop = (cend - cstart) as u32;
            for s in segs.iter() {
                if s.pos + s.len <= p {
                    continue;
                }
                if s.pos >= stop {
                    break;
                }
                if s.pos > p {
                    out.push(Piece::Zero((s.pos - p) as usize));
                    p = s.pos;
                }
                let upto = (s.pos + s.len).min(stop);
                let mut soff = (s.off + (p - s.pos)) as u64;
                let send = soff + (upto - p) as u64;
                while soff < send {
                    let k = soff / bs;
                    let bstart = k * bs;
                    let blen = (s.size as u64 - bstart).min(bs);
                    let to = (send - bstart).min(blen);
                    out.push(Piece::Block {
                        key: block_key(&self.format.name, s.id, k as u32, blen as u32),
                        len: blen as usize,
                        from: (soff - bstart) as usize,
                        to: to as usize,
                    });
                    soff = bstart + to;
                }
                p = upto;
            }
            if p < stop {
                out.push(Piece::Zero((stop - p) as usize));
            }
            pos = cend;
        }
        Ok(out)
    }

    pub fn read(&self, ino: Ino, fh: u64, off: u64, size: u32) -> Result<Bytes> {
        if let Some(w) = self.writers.lock().get(&ino).cloned()
            && w.pending_length().is_some()
        {
            self.flush_writer(&w)?;
        }
        let end = off.saturating_add(size as u64);
        let ranged = !self.settings.cache.random_whole_blocks && self.is_random(fh, off);
        let mut attempt = 0;
        let out = loop {
            let pinned = self.files.lock().get(&fh).and_then(|h| h.ext.clone());
            match self.read_range(ino, pinned.as_deref(), off, end, ranged) {
                Err(VfsError::Fetch(FetchError::Missing(k))) if attempt == 0 => {
                    // A compaction or truncation may have replaced the slice: re-read the
                    // chunk map once. Still missing afterwards is an error, never zeros.
                    tracing::debug!(key = %k, "block missing, reloading chunk map");
                    self.invalidate(ino);
                    attempt += 1;
                }
                other => break other?,
            }
        };
        self.readahead(ino, fh, off, out.len() as u64);
        Ok(out)
    }

    /// Whether a read at `off` through `fh` is far from where the previous read ended.
    fn is_random(&self, fh: u64, off: u64) -> bool {
        let Some(h) = self.files.lock().get(&fh).cloned() else {
            return false;
        };
        let ra = h.ra.lock();
        let slack = 4 * self.format.block_size as u64;
        off != 0 && (off + slack < ra.next || off > ra.next + slack)
    }

    /// The bytes `[off, end)`; `ranged`: blocks not cached are read as byte ranges, uncached.
    fn read_range(
        &self,
        ino: Ino,
        ext: Option<&crate::meta::ExtFile>,
        off: u64,
        end: u64,
        ranged: bool,
    ) -> Result<Bytes> {
        let plan = match ext {
            Some(f) => self.plan_ext(f, off, end),
            None => self.plan(ino, off, end)?,
        };
        // The common case (a request inside one block): a slice of the cached block, no copy.
        if let [Piece::Block { key, len, from, to }] = plan.as_slice()
            && !ranged
        {
            return Ok(self.reader.read_bytes(key, *len, *from, *to)?);
        }
        let total: usize = plan
            .iter()
            .map(|p| match p {
                Piece::Zero(n) => *n,
                Piece::Block { from, to, .. } => to - from,
            })
            .sum();
        let mut out = Vec::with_capacity(total);
        for p in plan {
            match p {
                Piece::Zero(n) => out.resize(out.len() + n, 0),
                Piece::Block { key, len, from, to } if ranged => {
                    self.reader.read_range_into(&key, len, from, to, &mut out)?;
                }
                Piece::Block { key, len, from, to } => {
                    self.reader.read_into(&key, len, from, to, &mut out)?;
                }
            }
        }
        Ok(Bytes::from(out))
    }

    fn readahead(&self, ino: Ino, fh: u64, off: u64, n: u64) {
        let Some(h) = self.files.lock().get(&fh).cloned() else {
            return;
        };
        if h.ino != ino || n == 0 {
            return;
        }
        let bs = self.format.block_size as u64;
        // Prefetched blocks wait in the memory cache until read: all sequential readers
        // together may fill half of it, so none pushes another's blocks out before use.
        // Reading a store's files directly, the kernel's page cache holds them instead.
        let cap = if self.reader.direct() {
            // Measured on a local disk: deeper kernel readahead than this made several
            // readers slower (their requests interleave on the device) and one no faster.
            self.settings.max_readahead.min(DIRECT_READAHEAD)
        } else {
            // Each reader also holds the block it is in and the one its window ends in.
            let streams = self.streams.load(Ordering::Relaxed).max(1) as u64;
            let share = self.settings.mem_cache_size / 2 / streams;
            (share.saturating_sub(2 * bs) / bs * bs).min(self.settings.max_readahead)
        }
        .max(bs);
        let (start, window) = {
            let mut ra = h.ra.lock();
            let was_stream = ra.window > 0;
            // The kernel issues readahead requests in parallel on several FUSE threads, so a
            // sequential reader's requests arrive slightly out of order: anything within a
            // few blocks of the furthest position read so far counts as sequential.
            let slack = ra.window.max(4 * bs);
            let near = off + n + slack >= ra.next && off <= ra.next + slack;
            if ra.next > 0 && near {
                ra.window = (ra.window * 2).clamp(bs, cap);
            } else if off == 0 {
                ra.window = bs;
            } else {
                ra.window = 0;
            }
            ra.next = ra.next.max(off + n);
            if !near {
                ra.next = off + n;
            }
            let (start, end) = (ra.next, ra.next + ra.window);
            // Blocks asked for by an earlier read are not asked for again; the plan below
            // starts at the block holding the first byte not yet asked for.
            let from = if ra.window > 0 && (start..end).contains(&ra.prefetched) {
                ra.prefetched
            } else {
                start
            };
            ra.prefetched = if ra.window > 0 { end } else { 0 };
            match (was_stream, ra.window > 0) {
                (false, true) => {
                    self.streams.fetch_add(1, Ordering::Relaxed);
                }
                (true, false) => {
                    self.streams.fetch_sub(1, Ordering::Relaxed);
                }
                _ => {}
            }
            (from, end - from)
        };
        if window == 0 {
            return;
        }
        let plan = match &h.ext {
            Some(f) => Ok(self.plan_ext(f, start, start + window)),
            None => self.plan(ino, start, start + window),
        };
        if let Ok(plan) = plan {
            let mut blocks: Vec<(String, usize)> = Vec::new();
            for p in plan {
                if let Piece::Block { key, len, .. } = p
                    && blocks.last().map(|b| &b.0) != Some(&key)
                {
                    blocks.push((key, len));
                }
            }
            self.reader.prefetch(blocks);
        }
    }

    // ------------------------------------------------------------ locks

    /// fcntl(F_GETLK) (flock arrives as a whole-file lock of the open file's owner).
    pub fn getlk(
        &self,
        ino: Ino,
        owner: u64,
        typ: u32,
        start: u64,
        end: u64,
    ) -> Result<Option<crate::meta::LockRange>> {
        Ok(self.meta.getlk(ino, owner, typ, start, end)?)
    }

    /// Try to take or release a lock through open file `fh`; `Ok(false)` when another owner
    /// (on any client) holds a conflicting one.
    #[allow(clippy::too_many_arguments)]
    pub fn setlk(
        &self,
        ino: Ino,
        fh: u64,
        owner: u64,
        typ: u32,
        start: u64,
        end: u64,
        pid: u32,
    ) -> Result<bool> {
        if typ != libc::F_UNLCK as u32 {
            self.locked.lock().insert(ino);
            if let Some(h) = self.files.lock().get(&fh) {
                h.lock_owners.lock().insert(owner);
            }
        }
        Ok(self.meta.setlk(ino, owner, typ, start, end, pid)?)
    }

    /// Release every lock `owner` holds on `ino` (close of a file by a process that holds
    /// POSIX locks on it). Free when this client never locked the inode.
    pub fn unlock_owner(&self, ino: Ino, owner: u64) -> Result<()> {
        if self.locked.lock().contains(&ino) {
            self.meta
                .setlk(ino, owner, libc::F_UNLCK as u32, 0, u64::MAX, 0)?;
        }
        Ok(())
    }

    // ------------------------------------------------------------ directories

    pub fn opendir(&self, ino: Ino) -> Result<u64> {
        self.ensure_listed(ino)?;
        let mut entries = Vec::new();
        let mut after: Option<Vec<u8>> = None;
        loop {
            let page = self.meta.readdir(ino, after.as_deref(), 10_000)?;
            let n = page.len();
            if let Some(last) = page.last() {
                after = Some(last.name.clone());
            }
            entries.extend(page);
            if n < 10_000 {
                break;
            }
        }
        for e in &entries {
            self.remember(ino, &e.name, e.ino);
        }
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.dirs.lock().insert(fh, Arc::new(entries));
        Ok(fh)
    }

    /// Entries of an open directory from position `offset`: (next offset, entry),
    /// starting with "." and "..".
    pub fn readdir(&self, ino: Ino, fh: u64, offset: u64) -> Result<Vec<(u64, Entry)>> {
        let entries = self.dir_entries(ino, fh)?;
        let mut out = Vec::new();
        let mut i = offset;
        if i == 0 {
            out.push((
                1,
                Entry {
                    name: b".".to_vec(),
                    ino,
                    kind: FileKind::Dir,
                },
            ));
            i = 1;
        }
        if i == 1 {
            let parent = self.meta.getattr(ino).map(|n| n.parent).unwrap_or(ROOT_INO);
            out.push((
                2,
                Entry {
                    name: b"..".to_vec(),
                    ino: parent.max(ROOT_INO),
                    kind: FileKind::Dir,
                },
            ));
            i = 2;
        }
        for (k, e) in entries.iter().enumerate().skip((i - 2) as usize) {
            out.push((k as u64 + 3, e.clone()));
        }
        Ok(out)
    }

    pub fn releasedir(&self, fh: u64) {
        self.dirs.lock().remove(&fh);
    }

    // ------------------------------------------------------------ xattrs

    /// Virtual attribute answering `strata info` through the mount.
    pub const INFO_XATTR: &'static [u8] = b"user.strata.info";

    pub fn getxattr(&self, ino: Ino, name: &[u8]) -> Result<Vec<u8>> {
        if name == Self::INFO_XATTR {
            return self.info(ino);
        }
        if name == crate::stats::METRICS_XATTR {
            return Ok(self.metrics.encode_compact().into_bytes());
        }
        if let Some(v) = self.cache_xattr(ino, name) {
            return v;
        }
        Ok(self.meta.getxattr(ino, name)?)
    }

    pub fn setxattr(&self, ino: Ino, name: &[u8], value: &[u8], flags: i32) -> Result<()> {
        self.check_writable()?;
        if name.starts_with(b"system.posix_acl") {
            return Err(MetaError::NotSupported("POSIX ACLs").into());
        }
        Ok(self.meta.setxattr(ino, name, value, flags)?)
    }

    pub fn listxattr(&self, ino: Ino) -> Result<Vec<Vec<u8>>> {
        Ok(self.meta.listxattr(ino)?)
    }

    pub fn removexattr(&self, ino: Ino, name: &[u8]) -> Result<()> {
        self.check_writable()?;
        Ok(self.meta.removexattr(ino, name)?)
    }

    fn info(&self, ino: Ino) -> Result<Vec<u8>> {
        self.flush_inode(ino)?;
        let n = self.meta.getattr(ino)?;
        let mut chunks = Vec::new();
        let mut objects = 0usize;
        let mut slices_total = 0usize;
        if n.kind == FileKind::File {
            for indx in self.meta.chunk_indexes(ino)? {
                let (slices, masks) = self.meta.chunk_slices(ino, indx)?;
                let segs = crate::chunk::visible_segments(&slices, &masks, indx);
                let bytes: u64 = segs.iter().map(|s| s.len as u64).sum();
                objects += slices
                    .iter()
                    .filter(|s| s.id != 0)
                    .map(|s| s.size.div_ceil(self.format.block_size) as usize)
                    .sum::<usize>();
                slices_total += slices.len();
                chunks.push(serde_json::json!({
                    "index": indx, "slices": slices.len(), "visible_bytes": bytes,
                }));
            }
        }
        let mut v = serde_json::json!({
            "volume": self.format.name,
            "path": self.path(ino),
            "inode": ino,
            "kind": format!("{:?}", n.kind),
            "length": n.length,
            "nlink": n.nlink,
            "masks": n.masks.len(),
            "slices": slices_total,
            "objects": objects,
            "chunks": chunks,
        });
        if let Some(src) = self.ext_info(&n) {
            v["source"] = src;
            if let Some(size) = v["source"]["size"].as_u64() {
                v["objects"] = serde_json::json!(size.div_ceil(self.format.block_size as u64));
            }
        }
        Ok(serde_json::to_vec_pretty(&v).unwrap_or_default())
    }

    // ------------------------------------------------------------ lifecycle

    fn wake_background(&self) {
        let (m, cv) = &self.wake;
        *m.lock() = true;
        cv.notify_all();
    }

    /// Flush everything, stop background threads and end the session.
    pub fn shutdown(&self) {
        let writers: Vec<_> = self.writers.lock().values().cloned().collect();
        for w in writers {
            if let Err(e) = self.flush_writer(&w) {
                tracing::error!(volume = %self.format.name, path = %self.path(w.ino), error = %e, "flush at unmount failed");
            }
        }
        self.stop.store(true, Ordering::SeqCst);
        self.wake_background();
        for t in self.threads.lock().drain(..) {
            let _ = t.join();
        }
        self.wctx.uploads.shutdown();
        self.sync_old_objects(Duration::ZERO);
        if let Some(wb) = &self.wctx.writeback {
            wb.shutdown();
        }
        self.reader.shutdown();
        if let Err(e) = self.meta.close_session() {
            tracing::warn!(volume = %self.format.name, error = %e, "closing the session failed");
        }
    }
}
