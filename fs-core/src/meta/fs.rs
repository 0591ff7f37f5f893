//! File-system logic over any [`MetaEngine`]: POSIX operations on inodes, each one
//! transaction, retried on conflict. Truncation and hole punching add a [`Mask`] to the
//! inode (O(1)); hidden slices are dropped later by [`Meta::trim_once`], and data of deleted
//! files by [`Meta::reclaim_once`]. Unreferenced slice objects are queued as garbage and
//! handed to the object-deletion worker after a grace period.

use std::collections::HashMap;
use std::panic::{self, AssertUnwindSafe};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use serde::{Deserialize, Serialize};

use super::journal::JournalTxn;
use super::{
    CHUNK_SIZE, Entry, EntryNode, FileKind, Ino, LockRange, LockSet, MAX_NAME, MAX_SYMLINK,
    MAX_XATTR_VALUE, Mask, MetaEngine, MetaError, Node, RESERVED_XATTR_PREFIX, ROOT_INO, Result,
    Slice, Txn, now_ns,
};
use crate::chunk::{Segment, hidden_slices, visible_segments};
use crate::metrics::Metrics;
use crate::object::StorageConfig;

/// Version of the metadata and object layout written by this build (docs/FORMAT.md).
pub const FORMAT_VERSION: u32 = 1;
const MAX_FILE_SIZE: u64 = 1 << 52;
const COUNTER_INODE: &str = "next_inode";
const COUNTER_SLICE: &str = "next_slice";
const COUNTER_SESSION: &str = "next_session";
const USED_SPACE: &str = "used_space";
const USED_INODES: &str = "used_inodes";

/// A volume's identity and settings, stored once by `strata format`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Format {
    pub name: String,
    pub uuid: String,
    pub version: u32,
    /// Block size in bytes.
    pub block_size: u32,
    /// Capacity limit in bytes, 0 = unlimited.
    pub capacity: u64,
    /// Inode limit, 0 = unlimited.
    pub inodes: u64,
    pub storage: StorageConfig,
    /// A second object store every new object also goes to (docs/FORMAT.md §16).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<StorageConfig>,
    /// Days deleted files stay in the trash (0: no trash), docs/FORMAT.md §17.
    #[serde(default)]
    pub trash_days: u32,
}

/// Settings of the metadata client.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct MetaSettings {
    /// Seconds an unreferenced object is kept before deletion (readers that listed a chunk
    /// before a compaction or truncation may still fetch it).
    pub gc_grace_secs: i64,
    /// Retries of a conflicting transaction before giving up.
    pub max_retries: u32,
    /// Seconds without heartbeat after which this client's session may be considered dead
    /// and cleaned by the others (its locks released, its unlinked-but-open files deleted).
    /// Heartbeats are sent every fifth of it.
    pub session_timeout_secs: i64,
    /// Days the change journal keeps its rows (0: forever), docs/FORMAT.md §15.
    pub journal_days: f64,
}

impl Default for MetaSettings {
    fn default() -> Self {
        MetaSettings {
            gc_grace_secs: 60,
            max_retries: 50,
            session_timeout_secs: 60,
            journal_days: 7.0,
        }
    }
}

/// What a caller is: owner of new inodes.
#[derive(Debug, Clone, Copy)]
pub struct Ctx {
    pub uid: u32,
    pub gid: u32,
}

impl Ctx {
    pub const ROOT: Ctx = Ctx { uid: 0, gid: 0 };
}

/// A time to set: now, or nanoseconds since the epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeSet {
    Now,
    At(i64),
}

/// Attribute changes of `setattr` (size changes go through [`Meta::truncate`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub atime: Option<TimeSet>,
    pub mtime: Option<TimeSet>,
}

/// Space and inode figures for `statfs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatFs {
    pub total_space: u64,
    pub avail_space: u64,
    pub used_inodes: u64,
    pub avail_inodes: u64,
}

/// Bytes an inode accounts for in the volume's usage.
pub fn space_of(kind: FileKind, length: u64) -> i64 {
    match kind {
        FileKind::File => length.div_ceil(4096) as i64 * 4096,
        _ => 4096,
    }
}

struct IdRange {
    next: u64,
    end: u64,
}

/// File-system metadata over an engine.
pub struct Meta {
    engine: Box<dyn MetaEngine>,
    metrics: Arc<Metrics>,
    pub(crate) settings: MetaSettings,
    sid: AtomicU64,
    inodes: Mutex<IdRange>,
    slices: Mutex<IdRange>,
    /// Inodes this process has open, and those a running transaction deletes.
    open: Mutex<OpenFiles>,
    /// Signalled when a transaction that deleted inodes ends (see [`Meta::open`]).
    deletes_ended: Condvar,
    format: Mutex<Option<Format>>,
    /// Directories with a quota, and when the set was read (see meta/quota.rs).
    pub(crate) quota_cache: Mutex<Option<(Instant, Arc<std::collections::HashSet<Ino>>)>>,
    /// Called with the format each time it is read or changed (a store that follows the
    /// volume's object-store settings registers here).
    format_listeners: Mutex<Vec<FormatListener>>,
    /// The object-store set this client writes to, as told by its store (sent with the
    /// session so that a mirror copier knows every client writes to the mirror).
    stores_applied: Mutex<String>,
}

type FormatListener = Box<dyn Fn(&Format) + Send + Sync>;

impl std::fmt::Debug for Meta {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Meta({})", self.engine.describe())
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Opened {
    count: u32,
    sustained: bool,
}

#[derive(Debug, Default)]
struct OpenFiles {
    /// How many times, and whether this process sustained the inode (unlinked it while
    /// open), so that only then the last close goes to the engine.
    files: HashMap<Ino, Opened>,
    /// Inodes deleted by write transactions still running, with how many of them.
    deleting: HashMap<Ino, u32>,
}

impl OpenFiles {
    /// A transaction deletes `ino`: opens of it wait until [`OpenFiles::delete_ended`].
    fn delete_started(&mut self, ino: Ino) {
        *self.deleting.entry(ino).or_default() += 1;
    }

    fn delete_ended(&mut self, ino: Ino) {
        if let Some(c) = self.deleting.get_mut(&ino) {
            *c -= 1;
            if *c == 0 {
                self.deleting.remove(&ino);
            }
        }
    }
}

/// Ends the deletes of one transaction when dropped ([`Meta::deletes_done`]).
struct DeletesEnded<'m> {
    meta: &'m Meta,
    inos: Vec<Ino>,
}

impl Drop for DeletesEnded<'_> {
    fn drop(&mut self) {
        self.meta.deletes_done(&self.inos);
    }
}

pub(super) fn check_name(name: &[u8]) -> Result<()> {
    if name.is_empty() || name.contains(&b'/') || name.contains(&0) {
        return Err(MetaError::Invalid("bad file name"));
    }
    if name.len() > MAX_NAME {
        return Err(MetaError::NameTooLong);
    }
    Ok(())
}

/// Inodes imported from an attached source, and the directory a source is attached to
/// (marked by a non-zero `rdev`, see docs/FORMAT.md), cannot be changed: EROFS.
/// Whole seconds of a nanosecond timestamp.
pub(crate) fn now_secs_of(ns: i64) -> i64 {
    ns.div_euclid(1_000_000_000)
}

pub(crate) fn check_not_source(n: &Node) -> Result<()> {
    if n.rdev != 0 && matches!(n.kind, FileKind::File | FileKind::Dir) {
        return Err(MetaError::ReadOnlySource);
    }
    Ok(())
}

pub(super) fn get_dir(tx: &mut dyn Txn, ino: Ino) -> Result<Node> {
    check_dir(tx.get_node(ino)?)
}

/// `n` if it is a live directory: ENOENT when missing or removed, ENOTDIR when not a
/// directory.
fn check_dir(n: Option<Node>) -> Result<Node> {
    let n = n.ok_or(MetaError::NotFound)?;
    if n.kind != FileKind::Dir {
        return Err(MetaError::NotDir);
    }
    if n.nlink == 0 {
        return Err(MetaError::NotFound);
    }
    Ok(n)
}

/// Directory `parent` (checked as by `get_dir`) and its entry `name` with the entry's node,
/// read in one request where the engine can.
fn dir_entry(tx: &mut dyn Txn, parent: Ino, name: &[u8]) -> Result<(Node, Option<EntryNode>)> {
    let de = tx.get_dir_entry(parent, name)?;
    let dir = check_dir(de.as_ref().map(|d| d.dir.clone()))?;
    Ok((dir, de.and_then(|d| d.entry)))
}

fn time_of(t: TimeSet, now: i64) -> i64 {
    match t {
        TimeSet::Now => now,
        TimeSet::At(v) => v,
    }
}

/// Drop masks made redundant by a later mask covering them.
fn simplify_masks(masks: &mut Vec<Mask>) {
    let all = masks.clone();
    masks.retain(|m| {
        !all.iter()
            .any(|o| o.seq > m.seq && o.start <= m.start && o.end >= m.end)
    });
}

impl Meta {
    pub fn new(engine: Box<dyn MetaEngine>, metrics: Arc<Metrics>, settings: MetaSettings) -> Self {
        Meta {
            engine,
            metrics,
            settings,
            sid: AtomicU64::new(0),
            inodes: Mutex::new(IdRange { next: 0, end: 0 }),
            slices: Mutex::new(IdRange { next: 0, end: 0 }),
            open: Mutex::new(OpenFiles::default()),
            deletes_ended: Condvar::new(),
            format: Mutex::new(None),
            quota_cache: Mutex::new(None),
            format_listeners: Mutex::new(Vec::new()),
            stores_applied: Mutex::new(String::new()),
        }
    }

    pub fn engine(&self) -> &dyn MetaEngine {
        &*self.engine
    }

    /// Run `f` in a transaction, retrying on conflicts with backoff.
    pub fn txn<R>(&self, write: bool, f: impl FnMut(&mut dyn Txn) -> Result<R>) -> Result<R> {
        self.run(Some(write), f)
    }

    /// Run `f`, which makes a single read request (one node, one entry), as
    /// [`MetaEngine::begin_single_read`] allows: on PostgreSQL one round trip, no
    /// `BEGIN`/`COMMIT`.
    pub(crate) fn read_one<R>(&self, f: impl FnMut(&mut dyn Txn) -> Result<R>) -> Result<R> {
        self.run(None, f)
    }

    /// `write`: `Some(true)` a write transaction, `Some(false)` a read transaction, `None` a
    /// single read.
    fn run<R>(
        &self,
        write: Option<bool>,
        mut f: impl FnMut(&mut dyn Txn) -> Result<R>,
    ) -> Result<R> {
        let start = Instant::now();
        let mut retries = 0u32;
        loop {
            let res = (|| {
                if write == Some(true) {
                    let mut tx = Box::new(JournalTxn::new(self.engine.begin(true)?));
                    // The deletes `f` marked end with the transaction, also when `f` or the
                    // commit panics (an open of those inodes would wait forever).
                    let out = panic::catch_unwind(AssertUnwindSafe(|| f(&mut *tx)));
                    let _ended = DeletesEnded {
                        meta: self,
                        inos: tx.take_deleted(),
                    };
                    return match out.unwrap_or_else(|p| panic::resume_unwind(p)) {
                        Ok(v) => tx.commit().map(|()| v),
                        Err(e) => {
                            drop(tx);
                            Err(e)
                        }
                    };
                }
                let mut tx = match write {
                    Some(_) => self.engine.begin(false)?,
                    None => self.engine.begin_single_read()?,
                };
                let v = f(&mut *tx)?;
                tx.commit()?;
                Ok(v)
            })();
            match res {
                Err(MetaError::Conflict) if retries < self.settings.max_retries => {
                    retries += 1;
                    let backoff = Duration::from_micros(500 * (1u64 << retries.min(8)));
                    let jitter = rand::random::<u64>() % (backoff.as_micros() as u64 + 1);
                    std::thread::sleep(Duration::from_micros(jitter) + backoff / 2);
                }
                other => {
                    self.metrics.meta_txn(start.elapsed(), retries);
                    return other;
                }
            }
        }
    }

    // ---------------------------------------------------------------- volume lifecycle

    /// Write the volume's format and root directory. Formatting an already formatted volume
    /// with the same name is accepted (nothing changes); another name is refused.
    pub fn format(&self, fmt: &Format) -> Result<Format> {
        self.engine.init_schema()?;
        let json = serde_json::to_string(fmt).map_err(|e| MetaError::Engine(e.to_string()))?;
        self.txn(true, |tx| {
            if let Some(old) = tx.get_setting("format")? {
                let old: Format = serde_json::from_str(&old)
                    .map_err(|e| MetaError::Format(format!("stored format is unreadable: {e}")))?;
                if old.name != fmt.name {
                    return Err(MetaError::Format(format!(
                        "{} is already formatted as volume '{}'; use that name, or another metadata URL for a new volume",
                        self.engine.describe(),
                        old.name
                    )));
                }
                return Ok(old);
            }
            tx.set_setting("format", &json)?;
            let now = now_ns();
            tx.put_node(&Node::empty_dir(ROOT_INO, ROOT_INO, 0o777, now))?;
            tx.incr_counter(COUNTER_INODE, ROOT_INO as i64 + 1)?;
            tx.incr_counter(COUNTER_SLICE, 1)?;
            tx.incr_counter(USED_SPACE, 0)?;
            tx.incr_counter(USED_INODES, 0)?;
            Ok(fmt.clone())
        })
    }

    /// Read the volume's format; fails with a message naming `strata format` if missing.
    pub fn load(&self) -> Result<Format> {
        let desc = self.engine.describe();
        let raw = self
            .txn(false, |tx| tx.get_setting("format"))
            .map_err(|e| match e {
                MetaError::Engine(m)
                    if m.contains("no such table") || m.contains("does not exist") =>
                {
                    MetaError::NotFormatted(desc.clone())
                }
                e => e,
            })?
            .ok_or_else(|| MetaError::NotFormatted(desc.clone()))?;
        let fmt: Format = serde_json::from_str(&raw)
            .map_err(|e| MetaError::Format(format!("stored format is unreadable: {e}")))?;
        if fmt.version > FORMAT_VERSION {
            return Err(MetaError::Format(format!(
                "volume '{}' has format version {} but this strata understands up to {}: upgrade strata",
                fmt.name, fmt.version, FORMAT_VERSION
            )));
        }
        *self.format.lock() = Some(fmt.clone());
        self.notify_format(&fmt);
        Ok(fmt)
    }

    /// Call `f` with the format each time this client reads or changes it (every few
    /// seconds while mounted).
    pub fn on_format(&self, f: impl Fn(&Format) + Send + Sync + 'static) {
        self.format_listeners.lock().push(Box::new(f));
    }

    fn notify_format(&self, fmt: &Format) {
        for l in self.format_listeners.lock().iter() {
            l(fmt);
        }
    }

    /// What the object store of this client writes to (see [`crate::object::MirrorStore`]).
    pub fn set_stores_applied(&self, s: String) {
        *self.stores_applied.lock() = s;
    }

    /// This client's session id (0 before [`Meta::new_session`]).
    pub fn session_id(&self) -> u64 {
        self.sid.load(Ordering::SeqCst)
    }

    pub fn stores_applied(&self) -> String {
        self.stores_applied.lock().clone()
    }

    /// Change the stored format (capacity, inode limit, credentials).
    pub fn update_format(&self, f: impl Fn(&mut Format)) -> Result<Format> {
        let fmt = self.txn(true, |tx| {
            let raw = tx
                .get_setting("format")?
                .ok_or_else(|| MetaError::NotFormatted(self.engine.describe()))?;
            let mut fmt: Format =
                serde_json::from_str(&raw).map_err(|e| MetaError::Format(e.to_string()))?;
            f(&mut fmt);
            let json = serde_json::to_string(&fmt).map_err(|e| MetaError::Engine(e.to_string()))?;
            tx.set_setting("format", &json)?;
            Ok(fmt)
        })?;
        *self.format.lock() = Some(fmt.clone());
        self.notify_format(&fmt);
        Ok(fmt)
    }

    /// Register this client as a session; returns its id.
    pub fn new_session(&self, info: &str) -> Result<u64> {
        let sid = self.txn(true, |tx| {
            let sid = tx.incr_counter(COUNTER_SESSION, 1)? as u64;
            tx.put_session(sid, self.session_expiry(), info)?;
            Ok(sid)
        })?;
        self.sid.store(sid, Ordering::SeqCst);
        Ok(sid)
    }

    pub fn heartbeat(&self, info: &str) -> Result<()> {
        let sid = self.sid.load(Ordering::SeqCst);
        if sid == 0 {
            return Ok(());
        }
        self.txn(true, |tx| tx.put_session(sid, self.session_expiry(), info))
    }

    /// End this client's session: files it kept alive after unlink are deleted.
    pub fn close_session(&self) -> Result<()> {
        let sid = self.sid.swap(0, Ordering::SeqCst);
        if sid == 0 {
            return Ok(());
        }
        self.cleanup_session(sid)
    }

    /// Remove a session (this one at umount, or a dead one) and what it kept alive.
    pub fn cleanup_session(&self, sid: u64) -> Result<()> {
        self.txn(true, |tx| {
            for ino in tx.list_sustained(sid)? {
                tx.delete_sustained(sid, ino)?;
                if let Some(n) = tx.get_node(ino)?
                    && n.nlink == 0
                {
                    Self::destroy_node(tx, &n)?;
                }
            }
            tx.delete_session_locks(sid)?;
            tx.delete_session(sid)
        })
    }

    /// Unix time until which this client's session counts as alive (stored at each
    /// heartbeat, so each client brings its own timeout).
    fn session_expiry(&self) -> i64 {
        now_ns() / 1_000_000_000 + self.settings.session_timeout_secs.max(2)
    }

    /// How often the session heartbeat must run.
    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_millis((self.settings.session_timeout_secs.max(2) as u64 * 1000) / 5)
    }

    /// Clean the sessions of clients whose heartbeat expired. Returns how many.
    pub fn cleanup_stale_sessions(&self) -> Result<usize> {
        let own = self.sid.load(Ordering::SeqCst);
        let deadline = now_ns() / 1_000_000_000;
        let mut n = 0;
        for (sid, hb, info) in self.sessions()? {
            if sid != own && hb < deadline {
                tracing::info!(sid, info = %info, "cleaning the session of a client that stopped");
                self.cleanup_session(sid)?;
                n += 1;
            }
        }
        Ok(n)
    }

    pub fn sessions(&self) -> Result<Vec<(u64, i64, String)>> {
        self.txn(false, |tx| tx.list_sessions())
    }

    pub fn counter(&self, name: &str) -> Result<i64> {
        self.txn(false, |tx| tx.get_counter(name))
    }

    pub(crate) fn format_cached(&self) -> Result<Format> {
        if let Some(f) = self.format.lock().clone() {
            return Ok(f);
        }
        self.load()
    }

    fn alloc(&self, range: &Mutex<IdRange>, counter: &'static str, batch: u64) -> Result<u64> {
        let mut r = range.lock();
        if r.next >= r.end {
            let end = self.txn(true, |tx| tx.incr_counter(counter, batch as i64))? as u64;
            r.next = end - batch;
            r.end = end;
        }
        let v = r.next;
        r.next += 1;
        Ok(v)
    }

    /// A fresh slice id (ids are handed out in batches).
    pub fn new_slice_id(&self) -> Result<u64> {
        self.alloc(&self.slices, COUNTER_SLICE, 1000)
    }

    pub(super) fn new_inode(&self) -> Result<Ino> {
        self.alloc(&self.inodes, COUNTER_INODE, 100)
    }

    fn check_space(tx: &mut dyn Txn, fmt: &Format, space: i64, inodes: i64) -> Result<()> {
        if space > 0 && fmt.capacity > 0 {
            let used = tx.get_counter(USED_SPACE)?;
            if used + space > fmt.capacity as i64 {
                return Err(MetaError::NoSpace);
            }
        }
        if inodes > 0 && fmt.inodes > 0 {
            let used = tx.get_counter(USED_INODES)?;
            if used + inodes > fmt.inodes as i64 {
                return Err(MetaError::NoSpace);
            }
        }
        Ok(())
    }

    pub(super) fn account(tx: &mut dyn Txn, space: i64, inodes: i64) -> Result<()> {
        if space != 0 {
            tx.add_counter(USED_SPACE, space)?;
        }
        if inodes != 0 {
            tx.add_counter(USED_INODES, inodes)?;
        }
        Ok(())
    }

    // ---------------------------------------------------------------- lookups

    pub fn getattr(&self, ino: Ino) -> Result<Node> {
        self.read_one(|tx| tx.get_node(ino)?.ok_or(MetaError::NotFound))
    }

    pub fn lookup(&self, parent: Ino, name: &[u8]) -> Result<Node> {
        if name != b"." && name != b".." {
            // One request: the directory, the entry and its node.
            return self.read_one(|tx| {
                let (_, entry) = dir_entry(tx, parent, name)?;
                check_name(name)?;
                entry.and_then(|(_, n)| n).ok_or(MetaError::NotFound)
            });
        }
        self.txn(false, |tx| {
            if name == b"." {
                return get_dir(tx, parent);
            }
            let up = get_dir(tx, parent)?.parent.max(ROOT_INO);
            tx.get_node(up)?.ok_or(MetaError::NotFound)
        })
    }

    pub fn readlink(&self, ino: Ino) -> Result<Vec<u8>> {
        self.txn(false, |tx| {
            tx.get_symlink(ino)?
                .ok_or(MetaError::Invalid("not a symlink"))
        })
    }

    /// Entries of a directory in name order after `after`, at most `limit`.
    pub fn readdir(&self, ino: Ino, after: Option<&[u8]>, limit: usize) -> Result<Vec<Entry>> {
        self.txn(false, |tx| {
            get_dir(tx, ino)?;
            tx.list_edges(ino, after, limit)
        })
    }

    pub fn statfs(&self) -> Result<StatFs> {
        let fmt = self.format_cached()?;
        let (space, inodes) = self.txn(false, |tx| {
            Ok((tx.get_counter(USED_SPACE)?, tx.get_counter(USED_INODES)?))
        })?;
        let space = space.max(0) as u64;
        let inodes = inodes.max(0) as u64;
        let total = if fmt.capacity > 0 {
            fmt.capacity
        } else {
            1 << 50
        };
        let itotal = if fmt.inodes > 0 { fmt.inodes } else { 1 << 40 };
        Ok(StatFs {
            total_space: total.max(space),
            avail_space: total.saturating_sub(space),
            used_inodes: inodes,
            avail_inodes: itotal.saturating_sub(inodes),
        })
    }

    // ---------------------------------------------------------------- namespace changes

    /// Create a file, directory, device, fifo, socket or symlink (`target`).
    #[allow(clippy::too_many_arguments)]
    pub fn mknod(
        &self,
        ctx: Ctx,
        parent: Ino,
        name: &[u8],
        kind: FileKind,
        mode: u32,
        rdev: u32,
        target: Option<&[u8]>,
    ) -> Result<Node> {
        check_name(name)?;
        if let Some(t) = target
            && (t.is_empty() || t.len() > MAX_SYMLINK)
        {
            return Err(if t.is_empty() {
                MetaError::Invalid("empty symlink target")
            } else {
                MetaError::NameTooLong
            });
        }
        let fmt = self.format_cached()?;
        let ino = self.new_inode()?;
        let qset = self.quota_dirs()?;
        self.txn(true, |tx| {
            let (mut p, entry) = dir_entry(tx, parent, name)?;
            check_not_source(&p)?;
            if entry.is_some() {
                return Err(MetaError::Exists);
            }
            let space = space_of(kind, 0);
            Self::check_space(tx, &fmt, space, 1)?;
            let chain = self.quota_chain(tx, parent, &qset)?;
            Self::quota_charge(tx, &chain, space, 1)?;
            let now = now_ns();
            let mut gid = ctx.gid;
            let mut mode = mode & 0o7777;
            if p.mode & libc::S_ISGID != 0 {
                gid = p.gid;
                if kind == FileKind::Dir {
                    mode |= libc::S_ISGID;
                }
            }
            let node = Node {
                ino,
                kind,
                mode,
                uid: ctx.uid,
                gid,
                atime: now,
                mtime: now,
                ctime: now,
                nlink: if kind == FileKind::Dir { 2 } else { 1 },
                length: match (kind, target) {
                    (FileKind::Dir, _) => 4096,
                    (_, Some(t)) => t.len() as u64,
                    _ => 0,
                },
                rdev,
                parent,
                seq: 0,
                masks: vec![],
            };
            tx.put_node(&node)?;
            tx.put_edge(
                parent,
                &Entry {
                    name: name.to_vec(),
                    ino,
                    kind,
                },
            )?;
            if let Some(t) = target {
                tx.put_symlink(ino, t)?;
            }
            if kind == FileKind::Dir {
                p.nlink += 1;
            }
            p.mtime = now;
            p.ctime = now;
            tx.put_node(&p)?;
            Self::account(tx, space, 1)?;
            Ok(node)
        })
    }

    pub fn link(&self, ino: Ino, parent: Ino, name: &[u8]) -> Result<Node> {
        check_name(name)?;
        let qset = self.quota_dirs()?;
        self.txn(true, |tx| {
            let mut p = get_dir(tx, parent)?;
            let mut n = tx.get_node(ino)?.ok_or(MetaError::NotFound)?;
            if n.kind == FileKind::Dir {
                return Err(MetaError::Perm);
            }
            check_not_source(&n)?;
            check_not_source(&p)?;
            if n.nlink == 0 {
                return Err(MetaError::NotFound);
            }
            if !qset.is_empty() {
                let to = self.quota_chain(tx, parent, &qset)?;
                let from = self.quota_chain(tx, n.parent, &qset)?;
                if to != from || (n.parent == 0 && !to.is_empty()) {
                    return Err(MetaError::CrossQuota);
                }
            }
            if n.nlink >= 65000 {
                return Err(MetaError::TooManyLinks);
            }
            if tx.get_edge(parent, name)?.is_some() {
                return Err(MetaError::Exists);
            }
            let now = now_ns();
            n.nlink += 1;
            n.ctime = now;
            n.parent = 0;
            tx.put_node(&n)?;
            tx.put_edge(
                parent,
                &Entry {
                    name: name.to_vec(),
                    ino,
                    kind: n.kind,
                },
            )?;
            p.mtime = now;
            p.ctime = now;
            tx.put_node(&p)?;
            Ok(n)
        })
    }

    /// Drop one link of `n` (already removed from its directory) and delete it when it was
    /// the last one and nobody here has it open.
    pub(crate) fn drop_link(&self, tx: &mut dyn Txn, mut n: Node, now: i64) -> Result<()> {
        n.nlink = n.nlink.saturating_sub(1);
        n.ctime = now;
        if n.kind == FileKind::Dir {
            n.nlink = 0;
        }
        if n.nlink > 0 {
            return tx.put_node(&n);
        }
        let sid = self.sid.load(Ordering::SeqCst);
        let sustain = {
            let mut open = self.open.lock();
            if sid != 0
                && let Some(o) = open.files.get_mut(&n.ino)
            {
                // Set even if this transaction is retried or fails: the close then only
                // checks.
                o.sustained = true;
                true
            } else {
                // Decided under the same lock as the check: an open of this inode waits
                // until the transaction ends (see `open`).
                if tx.note_deleted(n.ino) {
                    open.delete_started(n.ino);
                }
                false
            }
        };
        // The engine's I/O outside the lock (a row lock waited for must not stall opens).
        if sustain {
            tx.add_sustained(sid, n.ino)?;
            return tx.put_node(&n);
        }
        Self::destroy_node(tx, &n)
    }

    pub(crate) fn destroy_node_pub(tx: &mut dyn Txn, n: &Node) -> Result<()> {
        Self::destroy_node(tx, n)
    }

    /// Remove an inode whose last link is gone; its data is reclaimed in the background.
    fn destroy_node(tx: &mut dyn Txn, n: &Node) -> Result<()> {
        tx.delete_node(n.ino)?;
        tx.delete_xattrs(n.ino)?;
        match n.kind {
            FileKind::Symlink => tx.delete_symlink(n.ino)?,
            FileKind::File => tx.add_reclaim(n.ino, n.length)?,
            _ => {}
        }
        Self::account(tx, -space_of(n.kind, n.length), -1)
    }

    pub fn unlink(&self, parent: Ino, name: &[u8]) -> Result<()> {
        check_name(name)?;
        let qset = self.quota_dirs()?;
        self.txn(true, |tx| {
            let (mut p, entry) = dir_entry(tx, parent, name)?;
            let (e, node) = entry.ok_or(MetaError::NotFound)?;
            if e.kind == FileKind::Dir {
                return Err(MetaError::IsDir);
            }
            check_not_source(&p)?;
            let now = now_ns();
            tx.delete_edge(parent, name)?;
            p.mtime = now;
            p.ctime = now;
            tx.put_node(&p)?;
            if let Some(n) = node {
                let last = n.nlink <= 1;
                let space = space_of(n.kind, n.length);
                self.trash_or_drop(tx, n, parent, name, now)?;
                if last {
                    let chain = self.quota_chain(tx, parent, &qset)?;
                    Self::quota_charge(tx, &chain, -space, -1)?;
                }
            }
            Ok(())
        })
    }

    pub fn rmdir(&self, parent: Ino, name: &[u8]) -> Result<()> {
        match name {
            b"." => return Err(MetaError::Invalid("rmdir of '.'")),
            b".." => return Err(MetaError::NotEmpty),
            _ => check_name(name)?,
        }
        let qset = self.quota_dirs()?;
        self.txn(true, |tx| {
            let (mut p, entry) = dir_entry(tx, parent, name)?;
            let (e, node) = entry.ok_or(MetaError::NotFound)?;
            if e.kind != FileKind::Dir {
                return Err(MetaError::NotDir);
            }
            check_not_source(&p)?;
            if let Some(n) = &node {
                check_not_source(n)?;
            }
            if !tx.list_edges(e.ino, None, 1)?.is_empty() {
                return Err(MetaError::NotEmpty);
            }
            let now = now_ns();
            tx.delete_edge(parent, name)?;
            p.nlink = p.nlink.saturating_sub(1);
            p.mtime = now;
            p.ctime = now;
            tx.put_node(&p)?;
            if let Some(n) = node {
                self.drop_link(tx, n, now)?;
                let chain = self.quota_chain(tx, parent, &qset)?;
                Self::quota_charge(tx, &chain, -space_of(FileKind::Dir, 0), -1)?;
                tx.delete_quota(e.ino)?;
            }
            Ok(())
        })
    }

    /// Is `dir` equal to `ancestor` or below it?
    fn is_below(tx: &mut dyn Txn, mut dir: Ino, ancestor: Ino) -> Result<bool> {
        for _ in 0..100_000 {
            if dir == ancestor {
                return Ok(true);
            }
            if dir == ROOT_INO || dir == 0 {
                return Ok(false);
            }
            dir = match tx.get_node(dir)? {
                Some(n) => n.parent,
                None => return Ok(false),
            };
        }
        Ok(false)
    }

    /// rename(2) with the Linux flags RENAME_NOREPLACE (1) and RENAME_EXCHANGE (2).
    pub fn rename(
        &self,
        parent: Ino,
        name: &[u8],
        newparent: Ino,
        newname: &[u8],
        flags: u32,
    ) -> Result<()> {
        const NOREPLACE: u32 = 1;
        const EXCHANGE: u32 = 2;
        check_name(name)?;
        check_name(newname)?;
        if flags & !(NOREPLACE | EXCHANGE) != 0 {
            return Err(MetaError::NotSupported(
                "rename flag (only NOREPLACE and EXCHANGE)",
            ));
        }
        if flags == NOREPLACE | EXCHANGE {
            return Err(MetaError::Invalid("RENAME_NOREPLACE with RENAME_EXCHANGE"));
        }
        let qset = self.quota_dirs()?;
        self.txn(true, |tx| {
            let now = now_ns();
            let mut parents: HashMap<Ino, Node> = HashMap::new();
            parents.insert(parent, get_dir(tx, parent)?);
            if newparent != parent {
                parents.insert(newparent, get_dir(tx, newparent)?);
            }
            let se = tx.get_edge(parent, name)?.ok_or(MetaError::NotFound)?;
            let de = tx.get_edge(newparent, newname)?;
            if parent == newparent && name == newname {
                return if flags & EXCHANGE != 0 || de.is_some() {
                    Ok(())
                } else {
                    Err(MetaError::NotFound)
                };
            }
            if se.kind == FileKind::Dir
                && newparent != parent
                && Self::is_below(tx, newparent, se.ino)?
            {
                return Err(MetaError::Invalid("cannot move a directory below itself"));
            }
            let mut snode = tx.get_node(se.ino)?.ok_or(MetaError::NotFound)?;
            check_not_source(&snode)?;
            for p in parents.values() {
                check_not_source(p)?;
            }
            if let Some(de) = &de
                && let Some(dn) = tx.get_node(de.ino)?
            {
                check_not_source(&dn)?;
            }
            let src_chain = self.quota_chain(tx, parent, &qset)?;
            let dst_chain = if newparent == parent {
                src_chain.clone()
            } else {
                self.quota_chain(tx, newparent, &qset)?
            };
            let cross = src_chain != dst_chain;
            if cross && (se.kind == FileKind::Dir || flags & EXCHANGE != 0) {
                // Moving a tree between quotas would need its usage: refused (EXDEV,
                // callers like mv fall back to copy + delete).
                return Err(MetaError::CrossQuota);
            }
            if flags & EXCHANGE != 0 {
                let de = de.ok_or(MetaError::NotFound)?;
                if de.kind == FileKind::Dir
                    && newparent != parent
                    && Self::is_below(tx, parent, de.ino)?
                {
                    return Err(MetaError::Invalid("cannot move a directory below itself"));
                }
                let mut dnode = tx.get_node(de.ino)?.ok_or(MetaError::NotFound)?;
                tx.put_edge(
                    parent,
                    &Entry {
                        name: name.to_vec(),
                        ino: de.ino,
                        kind: de.kind,
                    },
                )?;
                tx.put_edge(
                    newparent,
                    &Entry {
                        name: newname.to_vec(),
                        ino: se.ino,
                        kind: se.kind,
                    },
                )?;
                if parent != newparent {
                    if se.kind == FileKind::Dir {
                        parents.entry(parent).and_modify(|p| p.nlink -= 1);
                        parents.entry(newparent).and_modify(|p| p.nlink += 1);
                    }
                    if de.kind == FileKind::Dir {
                        parents.entry(newparent).and_modify(|p| p.nlink -= 1);
                        parents.entry(parent).and_modify(|p| p.nlink += 1);
                    }
                }
                if snode.parent != 0 {
                    snode.parent = newparent;
                }
                if dnode.parent != 0 {
                    dnode.parent = parent;
                }
                snode.ctime = now;
                dnode.ctime = now;
                tx.put_node(&snode)?;
                tx.put_node(&dnode)?;
            } else {
                if let Some(de) = &de {
                    if flags & NOREPLACE != 0 {
                        return Err(MetaError::Exists);
                    }
                    if de.ino == se.ino {
                        return Ok(());
                    }
                    let dnode = tx.get_node(de.ino)?.ok_or(MetaError::NotFound)?;
                    if se.kind == FileKind::Dir {
                        if de.kind != FileKind::Dir {
                            return Err(MetaError::NotDir);
                        }
                        if !tx.list_edges(de.ino, None, 1)?.is_empty() {
                            return Err(MetaError::NotEmpty);
                        }
                        parents.entry(newparent).and_modify(|p| p.nlink -= 1);
                    } else if de.kind == FileKind::Dir {
                        return Err(MetaError::IsDir);
                    }
                    let last = dnode.nlink <= 1 || dnode.kind == FileKind::Dir;
                    let dspace = space_of(dnode.kind, dnode.length);
                    let dino = dnode.ino;
                    self.trash_or_drop(tx, dnode, newparent, newname, now)?;
                    tx.delete_quota(dino)?;
                    if last {
                        Self::quota_charge(tx, &dst_chain, -dspace, -1)?;
                    }
                }
                tx.delete_edge(parent, name)?;
                tx.put_edge(
                    newparent,
                    &Entry {
                        name: newname.to_vec(),
                        ino: se.ino,
                        kind: se.kind,
                    },
                )?;
                if se.kind == FileKind::Dir && parent != newparent {
                    parents.entry(parent).and_modify(|p| p.nlink -= 1);
                    parents.entry(newparent).and_modify(|p| p.nlink += 1);
                }
                if snode.parent != 0 || snode.kind == FileKind::Dir {
                    snode.parent = newparent;
                }
                if cross {
                    let sspace = space_of(snode.kind, snode.length);
                    Self::quota_charge(tx, &src_chain, -sspace, -1)?;
                    Self::quota_charge(tx, &dst_chain, sspace, 1)?;
                }
                snode.ctime = now;
                tx.put_node(&snode)?;
            }
            for (_, mut p) in parents {
                p.mtime = now;
                p.ctime = now;
                tx.put_node(&p)?;
            }
            Ok(())
        })
    }

    // ---------------------------------------------------------------- attributes

    pub fn setattr(&self, ino: Ino, set: &SetAttr) -> Result<Node> {
        self.txn(true, |tx| {
            let mut n = tx.get_node(ino)?.ok_or(MetaError::NotFound)?;
            check_not_source(&n)?;
            let now = now_ns();
            if let Some(m) = set.mode {
                n.mode = m & 0o7777;
            }
            if let Some(u) = set.uid {
                n.uid = u;
            }
            if let Some(g) = set.gid {
                n.gid = g;
            }
            if let Some(t) = set.atime {
                n.atime = time_of(t, now);
            }
            if let Some(t) = set.mtime {
                n.mtime = time_of(t, now);
            }
            n.ctime = now;
            tx.put_node(&n)?;
            Ok(n)
        })
    }

    /// Set the length of a file. Constant cost: shrinking adds a mask that hides old data
    /// beyond `size`; the hidden slices are dropped later by [`Meta::trim_once`].
    pub fn truncate(&self, ino: Ino, size: u64) -> Result<Node> {
        if size > MAX_FILE_SIZE {
            return Err(MetaError::TooBig);
        }
        let fmt = self.format_cached()?;
        let qset = self.quota_dirs()?;
        self.txn(true, |tx| {
            let mut n = tx.get_node(ino)?.ok_or(MetaError::NotFound)?;
            match n.kind {
                FileKind::File => {}
                FileKind::Dir => return Err(MetaError::IsDir),
                _ => return Err(MetaError::Invalid("truncate of a special file")),
            }
            check_not_source(&n)?;
            let delta = space_of(n.kind, size) - space_of(n.kind, n.length);
            Self::check_space(tx, &fmt, delta, 0)?;
            let chain = self.quota_chain(tx, n.parent, &qset)?;
            Self::quota_charge(tx, &chain, delta, 0)?;
            if size < n.length {
                n.seq += 1;
                n.masks.push(Mask {
                    seq: n.seq,
                    start: size,
                    end: u64::MAX,
                });
                simplify_masks(&mut n.masks);
                tx.add_trim(ino)?;
            }
            let now = now_ns();
            n.length = size;
            n.mtime = now;
            n.ctime = now;
            tx.put_node(&n)?;
            Self::account(tx, delta, 0)?;
            Ok(n)
        })
    }

    /// fallocate(2): mode 0 (allocate, may grow), KEEP_SIZE (1), PUNCH_HOLE (2, with
    /// KEEP_SIZE) and ZERO_RANGE (0x10). Constant cost, like truncate.
    pub fn fallocate(&self, ino: Ino, mode: i32, off: u64, len: u64) -> Result<Node> {
        const KEEP_SIZE: i32 = libc::FALLOC_FL_KEEP_SIZE;
        const PUNCH_HOLE: i32 = libc::FALLOC_FL_PUNCH_HOLE;
        const ZERO_RANGE: i32 = libc::FALLOC_FL_ZERO_RANGE;
        if len == 0 {
            return Err(MetaError::Invalid("fallocate length 0"));
        }
        if mode & !(KEEP_SIZE | PUNCH_HOLE | ZERO_RANGE) != 0 {
            return Err(MetaError::NotSupported(
                "fallocate mode (collapse/insert range)",
            ));
        }
        if mode & PUNCH_HOLE != 0 && mode & KEEP_SIZE == 0 {
            return Err(MetaError::Invalid("PUNCH_HOLE requires KEEP_SIZE"));
        }
        let end = off.checked_add(len).ok_or(MetaError::TooBig)?;
        if end > MAX_FILE_SIZE {
            return Err(MetaError::TooBig);
        }
        let fmt = self.format_cached()?;
        let qset = self.quota_dirs()?;
        self.txn(true, |tx| {
            let mut n = tx.get_node(ino)?.ok_or(MetaError::NotFound)?;
            match n.kind {
                FileKind::File => {}
                FileKind::Dir => return Err(MetaError::IsDir),
                _ => return Err(MetaError::Invalid("fallocate of a special file")),
            }
            check_not_source(&n)?;
            if mode & (PUNCH_HOLE | ZERO_RANGE) != 0 && off < n.length {
                n.seq += 1;
                n.masks.push(Mask {
                    seq: n.seq,
                    start: off,
                    end: end.min(n.length),
                });
                simplify_masks(&mut n.masks);
                tx.add_trim(ino)?;
            }
            let mut delta = 0;
            if mode & KEEP_SIZE == 0 && end > n.length {
                delta = space_of(n.kind, end) - space_of(n.kind, n.length);
                Self::check_space(tx, &fmt, delta, 0)?;
                let chain = self.quota_chain(tx, n.parent, &qset)?;
                Self::quota_charge(tx, &chain, delta, 0)?;
                n.length = end;
            }
            let now = now_ns();
            n.mtime = now;
            n.ctime = now;
            tx.put_node(&n)?;
            Self::account(tx, delta, 0)?;
            Ok(n)
        })
    }

    // ---------------------------------------------------------------- xattrs

    pub fn getxattr(&self, ino: Ino, name: &[u8]) -> Result<Vec<u8>> {
        if name.starts_with(RESERVED_XATTR_PREFIX) {
            return Err(MetaError::NoAttr);
        }
        self.txn(false, |tx| {
            tx.get_node(ino)?.ok_or(MetaError::NotFound)?;
            tx.get_xattr(ino, name)?.ok_or(MetaError::NoAttr)
        })
    }

    /// flags: XATTR_CREATE (1), XATTR_REPLACE (2).
    pub fn setxattr(&self, ino: Ino, name: &[u8], value: &[u8], flags: i32) -> Result<()> {
        if name.is_empty() || name.len() > 255 {
            return Err(MetaError::Range);
        }
        if value.len() > MAX_XATTR_VALUE {
            return Err(MetaError::TooBig);
        }
        if name.starts_with(RESERVED_XATTR_PREFIX) {
            return Err(MetaError::Perm);
        }
        self.txn(true, |tx| {
            let mut n = tx.get_node(ino)?.ok_or(MetaError::NotFound)?;
            check_not_source(&n)?;
            let exists = tx.get_xattr(ino, name)?.is_some();
            if flags & libc::XATTR_CREATE != 0 && exists {
                return Err(MetaError::Exists);
            }
            if flags & libc::XATTR_REPLACE != 0 && !exists {
                return Err(MetaError::NoAttr);
            }
            tx.put_xattr(ino, name, value)?;
            n.ctime = now_ns();
            tx.put_node(&n)
        })
    }

    pub fn listxattr(&self, ino: Ino) -> Result<Vec<Vec<u8>>> {
        self.txn(false, |tx| {
            tx.get_node(ino)?.ok_or(MetaError::NotFound)?;
            let mut names = tx.list_xattrs(ino)?;
            names.retain(|n| !n.starts_with(RESERVED_XATTR_PREFIX));
            Ok(names)
        })
    }

    pub fn removexattr(&self, ino: Ino, name: &[u8]) -> Result<()> {
        if name.starts_with(RESERVED_XATTR_PREFIX) {
            return Err(MetaError::NoAttr);
        }
        self.txn(true, |tx| {
            let mut n = tx.get_node(ino)?.ok_or(MetaError::NotFound)?;
            check_not_source(&n)?;
            if !tx.delete_xattr(ino, name)? {
                return Err(MetaError::NoAttr);
            }
            n.ctime = now_ns();
            tx.put_node(&n)
        })
    }

    // ---------------------------------------------------------------- open files

    /// Note that this process opened `ino` (keeps an unlinked file alive until closed).
    /// Call it before reading the node: an unlink or replacing rename of this process then
    /// either sustains the node or has deleted it already (a transaction deleting it is
    /// waited for), so the read that follows never sees a node about to vanish.
    pub fn open(&self, ino: Ino) {
        let mut open = self.open.lock();
        while open.deleting.contains_key(&ino) {
            self.deletes_ended.wait(&mut open);
        }
        open.files.entry(ino).or_default().count += 1;
    }

    /// Transactions that deleted `inos` ended (committed or not).
    fn deletes_done(&self, inos: &[Ino]) {
        if inos.is_empty() {
            return;
        }
        let mut open = self.open.lock();
        for &ino in inos {
            open.delete_ended(ino);
        }
        self.deletes_ended.notify_all();
    }

    /// Close one open of `ino`. The last close of a file this process unlinked while it
    /// was open (see `drop_link`) deletes it; other closes need no transaction (a file
    /// another client unlinked was deleted by that client, see docs/SEMANTICS.md).
    pub fn close(&self, ino: Ino) -> Result<()> {
        let sid = self.sid.load(Ordering::SeqCst);
        let sustained = {
            let mut open = self.open.lock();
            match open.files.get_mut(&ino) {
                Some(o) if o.count > 1 => {
                    o.count -= 1;
                    false
                }
                Some(o) => {
                    let s = o.sustained && sid != 0;
                    open.files.remove(&ino);
                    if s {
                        // An open by inode (a handle adopted, /proc/PID/fd) waits for the
                        // delete below, as it does for an unlink's (see `open`).
                        open.delete_started(ino);
                    }
                    s
                }
                None => false,
            }
        };
        if !sustained {
            return Ok(());
        }
        let _ended = DeletesEnded {
            meta: self,
            inos: vec![ino],
        };
        self.txn(true, |tx| {
            if let Some(n) = tx.get_node(ino)?
                && n.nlink == 0
            {
                tx.delete_sustained(sid, ino)?;
                Self::destroy_node(tx, &n)?;
            }
            Ok(())
        })
    }

    // ---------------------------------------------------------------- locks

    fn conflicts(
        locks: &[LockSet],
        sid: u64,
        owner: u64,
        typ: u32,
        start: u64,
        end: u64,
    ) -> Option<LockRange> {
        let write = typ == libc::F_WRLCK as u32;
        locks
            .iter()
            .filter(|l| !(l.sid == sid && l.owner == owner))
            .flat_map(|l| l.ranges.iter())
            .find(|r| r.start <= end && start <= r.end && (write || r.typ == libc::F_WRLCK as u32))
            .copied()
    }

    /// The first lock held by another owner (here or on another client) that conflicts with
    /// `typ` on `start..=end`, as fcntl(F_GETLK) reports it.
    pub fn getlk(
        &self,
        ino: Ino,
        owner: u64,
        typ: u32,
        start: u64,
        end: u64,
    ) -> Result<Option<LockRange>> {
        let sid = self.sid.load(Ordering::SeqCst);
        self.txn(false, |tx| {
            let locks = tx.get_locks(ino)?;
            Ok(Self::conflicts(&locks, sid, owner, typ, start, end))
        })
    }

    /// Take (`F_RDLCK`/`F_WRLCK`) or release (`F_UNLCK`) `start..=end` for `owner` of this
    /// client. Returns `false` when another owner holds a conflicting lock. Locks of a client
    /// that dies are released when its session is cleaned.
    pub fn setlk(
        &self,
        ino: Ino,
        owner: u64,
        typ: u32,
        start: u64,
        end: u64,
        pid: u32,
    ) -> Result<bool> {
        if start > end {
            return Err(MetaError::Invalid("lock range"));
        }
        let sid = self.sid.load(Ordering::SeqCst);
        self.txn(true, |tx| {
            let locks = tx.get_locks(ino)?;
            if typ != libc::F_UNLCK as u32
                && Self::conflicts(&locks, sid, owner, typ, start, end).is_some()
            {
                return Ok(false);
            }
            let mine = locks
                .iter()
                .find(|l| l.sid == sid && l.owner == owner)
                .map(|l| l.ranges.clone())
                .unwrap_or_default();
            // Cut the range out of what this owner holds, then add the new lock.
            let mut out = Vec::with_capacity(mine.len() + 2);
            for r in mine {
                if r.end < start || r.start > end {
                    out.push(r);
                    continue;
                }
                if r.start < start {
                    out.push(LockRange {
                        end: start - 1,
                        ..r
                    });
                }
                if r.end > end {
                    out.push(LockRange {
                        start: end + 1,
                        ..r
                    });
                }
            }
            if typ != libc::F_UNLCK as u32 {
                out.push(LockRange {
                    typ,
                    start,
                    end,
                    pid,
                });
            }
            out.sort_by_key(|r| r.start);
            tx.put_locks(ino, sid, owner, &out)?;
            Ok(true)
        })
    }

    // ---------------------------------------------------------------- data

    /// Visible segments of chunk `indx` of `ino`, and the file length.
    pub fn read_chunk(&self, ino: Ino, indx: u32) -> Result<(Vec<Segment>, u64)> {
        self.txn(false, |tx| {
            let n = tx.get_node(ino)?.ok_or(MetaError::NotFound)?;
            let slices = tx.chunk_slices(ino, indx)?;
            Ok((visible_segments(&slices, &n.masks, indx), n.length))
        })
    }

    /// Raw slices of a chunk (for `strata info` and compaction).
    pub fn chunk_slices(&self, ino: Ino, indx: u32) -> Result<(Vec<Slice>, Vec<Mask>)> {
        self.txn(false, |tx| {
            let n = tx.get_node(ino)?.ok_or(MetaError::NotFound)?;
            Ok((tx.chunk_slices(ino, indx)?, n.masks))
        })
    }

    pub fn chunk_indexes(&self, ino: Ino) -> Result<Vec<u32>> {
        self.txn(false, |tx| tx.chunk_indexes(ino, 0, usize::MAX >> 1))
    }

    /// Commit written slices (each within one chunk) in order, growing the file to
    /// `length` if it is shorter. Returns `None` if the file is gone: the slices were queued
    /// as garbage instead.
    pub fn write_slices(
        &self,
        ino: Ino,
        slices: &[(u32, Slice)],
        length: u64,
    ) -> Result<Option<Node>> {
        let fmt = self.format_cached()?;
        let qset = self.quota_dirs()?;
        let grace = self.settings.gc_grace_secs;
        let mut attempt = 0;
        self.txn(true, |tx| {
            attempt += 1;
            let Some(mut n) = tx.get_node(ino)? else {
                let due = now_ns() / 1_000_000_000 + grace;
                for (_, s) in slices {
                    tx.add_garbage(s.id, s.size, due)?;
                }
                return Ok(None);
            };
            check_not_source(&n)?;
            // A retry after a lost connection may follow a commit that did land: slice ids
            // are unique, so finding the first one means this commit is already done.
            if attempt > 1
                && let Some((indx, first)) = slices.first()
                && tx
                    .chunk_slices(ino, *indx)?
                    .iter()
                    .any(|s| s.id == first.id)
            {
                return Ok(Some(n));
            }
            let delta = if length > n.length {
                space_of(n.kind, length) - space_of(n.kind, n.length)
            } else {
                0
            };
            Self::check_space(tx, &fmt, delta, 0)?;
            let chain = self.quota_chain(tx, n.parent, &qset)?;
            Self::quota_charge(tx, &chain, delta, 0)?;
            for (indx, s) in slices {
                n.seq += 1;
                tx.add_slice(ino, *indx, &Slice { seq: n.seq, ..*s })?;
            }
            let now = now_ns();
            if length > n.length {
                n.length = length;
            }
            n.mtime = now;
            n.ctime = now;
            tx.put_node(&n)?;
            Self::account(tx, delta, 0)?;
            Ok(Some(n))
        })
    }

    /// Mark slice objects as garbage (e.g. uploaded but never committed).
    pub fn discard_slices(&self, ids: &[(u64, u32)]) -> Result<()> {
        let due = now_ns() / 1_000_000_000 + self.settings.gc_grace_secs;
        self.txn(true, |tx| {
            for (id, size) in ids {
                tx.add_garbage(*id, *size, due)?;
            }
            Ok(())
        })
    }

    /// Replace the slices `old` of a chunk by `new` (their compacted content). Fails with
    /// `Conflict`-free `Ok(false)` when the chunk changed in a way that loses `old`.
    pub fn replace_slices(
        &self,
        ino: Ino,
        indx: u32,
        old: &[Slice],
        new: Option<Slice>,
    ) -> Result<bool> {
        let due = now_ns() / 1_000_000_000 + self.settings.gc_grace_secs;
        let mut attempt = 0;
        self.txn(true, |tx| {
            attempt += 1;
            if tx.get_node(ino)?.is_none() {
                return Ok(false);
            }
            let cur = tx.chunk_slices(ino, indx)?;
            // After a lost connection the previous attempt may have committed: the new
            // slice id is unique, finding it means the replacement is done.
            if attempt > 1 && new.is_some_and(|n| cur.iter().any(|s| s.id == n.id)) {
                return Ok(true);
            }
            if !old.iter().all(|o| cur.contains(o)) {
                return Ok(false);
            }
            for o in old {
                tx.delete_slice(ino, indx, o.seq)?;
                if o.id != 0 {
                    tx.add_garbage(o.id, o.size, due)?;
                }
            }
            if let Some(s) = new {
                tx.add_slice(ino, indx, &s)?;
            }
            Ok(true)
        })
    }

    /// One step of background trimming: for one inode with masks, drop slices that no
    /// longer show any byte and masks that no longer hide any slice. Returns how many
    /// inodes were processed.
    pub fn trim_once(&self) -> Result<usize> {
        let inos = self.txn(false, |tx| tx.list_trim(16))?;
        let due_in = self.settings.gc_grace_secs;
        for &ino in &inos {
            let mut from = 0u32;
            loop {
                // A batch of chunks per transaction keeps each transaction short.
                let (done, next) = self.txn(true, |tx| {
                    let Some(n) = tx.get_node(ino)? else {
                        return Ok((true, 0));
                    };
                    let start_chunk = n
                        .masks
                        .iter()
                        .map(|m| (m.start / CHUNK_SIZE) as u32)
                        .min()
                        .unwrap_or(u32::MAX)
                        .max(from);
                    let idxs = tx.chunk_indexes(ino, start_chunk, 64)?;
                    let due = now_ns() / 1_000_000_000 + due_in;
                    for &i in &idxs {
                        let slices = tx.chunk_slices(ino, i)?;
                        let segs = visible_segments(&slices, &n.masks, i);
                        for s in hidden_slices(&slices, &segs) {
                            tx.delete_slice(ino, i, s.seq)?;
                            if s.id != 0 {
                                tx.add_garbage(s.id, s.size, due)?;
                            }
                        }
                    }
                    match idxs.last() {
                        Some(&l) if idxs.len() == 64 => Ok((false, l + 1)),
                        _ => Ok((true, 0)),
                    }
                })?;
                if done {
                    break;
                }
                from = next;
            }
            // Masks still needed: those hiding part of a remaining older slice.
            self.txn(true, |tx| {
                if let Some(mut n) = tx.get_node(ino)? {
                    let mut keep = Vec::new();
                    for m in &n.masks {
                        let first = (m.start / CHUNK_SIZE) as u32;
                        let mut needed = false;
                        'scan: for i in tx.chunk_indexes(ino, first, usize::MAX >> 1)? {
                            let cstart = i as u64 * CHUNK_SIZE;
                            if cstart >= m.end {
                                break;
                            }
                            for s in tx.chunk_slices(ino, i)? {
                                let (a, b) =
                                    (cstart + s.pos as u64, cstart + (s.pos + s.len) as u64);
                                if s.seq < m.seq && a < m.end && b > m.start {
                                    needed = true;
                                    break 'scan;
                                }
                            }
                        }
                        if needed {
                            keep.push(*m);
                        }
                    }
                    if keep != n.masks {
                        n.masks = keep;
                        tx.put_node(&n)?;
                    }
                }
                tx.delete_trim(ino)
            })?;
        }
        Ok(inos.len())
    }

    /// One step of reclaiming deleted files: drops their slices into the garbage queue.
    pub fn reclaim_once(&self) -> Result<usize> {
        let files = self.txn(false, |tx| tx.list_reclaim(16))?;
        let grace = self.settings.gc_grace_secs;
        // One transaction takes up to 64 chunks, from as many of the files as they come
        // from: deleting a thousand small files costs about 60 commits here, not a thousand
        // (each commit is an fsync on PostgreSQL, taken from the foreground's).
        let mut next = 0;
        while next < files.len() {
            next = self.txn(true, |tx| {
                let due = now_ns() / 1_000_000_000 + grace;
                let mut budget = 64usize;
                let mut at = next;
                while at < files.len() && budget > 0 {
                    let ino = files[at].0;
                    let idxs = tx.chunk_indexes(ino, 0, budget)?;
                    for &i in &idxs {
                        for s in tx.chunk_slices(ino, i)? {
                            tx.delete_slice(ino, i, s.seq)?;
                            if s.id != 0 {
                                tx.add_garbage(s.id, s.size, due)?;
                            }
                        }
                    }
                    if idxs.len() == budget {
                        break; // this file may have more chunks: the next transaction
                    }
                    budget -= idxs.len().max(1);
                    tx.delete_reclaim(ino)?;
                    at += 1;
                }
                Ok(at)
            })?;
        }
        Ok(files.len())
    }

    /// Garbage slices whose grace period is over: (id, size). The caller deletes their
    /// objects, then calls [`Meta::forget_garbage`].
    pub fn due_garbage(&self, limit: usize) -> Result<Vec<(u64, u32)>> {
        let now = now_ns() / 1_000_000_000;
        self.txn(false, |tx| tx.list_due_garbage(now, limit))
    }

    /// Whether slice `id` is no longer referenced (queued as garbage: its file was deleted,
    /// truncated or overwritten). Write-back skips the upload of such a slice's blocks.
    pub fn is_garbage(&self, id: u64) -> Result<bool> {
        self.read_one(|tx| tx.has_garbage(id))
    }

    /// Drop the garbage rows of `ids` (their objects are deleted) in one transaction: one
    /// commit per batch, not per slice, so a cleaner deleting thousands of small files does
    /// not compete with the foreground for commits (one fsync each on PostgreSQL).
    pub fn forget_garbage(&self, ids: &[u64]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        self.txn(true, |tx| {
            ids.iter().try_for_each(|id| tx.delete_garbage(*id))
        })
    }
}
