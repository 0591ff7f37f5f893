//! Metadata: the types of the file-system tree, the [`MetaEngine`] trait every metadata
//! backend implements (transactions over a fixed set of tables), and [`Meta`], the
//! file-system logic written once over any engine.
//!
//! Engines are selected by URL: `sqlite:///path/meta.db` (embedded default) or `mem://`
//! (in-process, tests only). The table layout is documented in docs/FORMAT.md.

mod external;
mod fs;
mod fsck;
mod journal;
mod memory;
mod postgres;
mod postgres_tls;
mod quota;
mod rmr;
mod sqlite;
#[cfg(test)]
mod tests;
mod trash;

pub mod conformance;
pub mod dump;

pub use external::{DirState, ExtFile, ImportStats, RESERVED_XATTR_PREFIX};
pub(crate) use fs::check_not_source;
pub use fs::{Ctx, FORMAT_VERSION, Format, Meta, MetaSettings, SetAttr, StatFs, TimeSet, space_of};
pub use fsck::FsckReport;
pub use journal::ChangeBatch;
pub use memory::MemEngine;
pub use postgres::PostgresEngine;
pub use rmr::RmrStats;
pub use sqlite::SqliteEngine;
pub use trash::{RestoreReport, TRASH_INO, TrashEntry};

use serde::{Deserialize, Serialize};

/// Inode number. The root directory is [`ROOT_INO`].
pub type Ino = u64;
pub const ROOT_INO: Ino = 1;
/// Size of a chunk: files are split into chunks of this many bytes (fixed by the format).
pub const CHUNK_SIZE: u64 = 64 << 20;
/// Longest file name accepted.
pub const MAX_NAME: usize = 255;
/// Longest symlink target / xattr value accepted.
pub const MAX_SYMLINK: usize = 4096;
pub const MAX_XATTR_VALUE: usize = 65536;

/// Kind of an inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    Fifo,
    BlockDev,
    CharDev,
    Socket,
}

impl FileKind {
    pub fn code(self) -> u8 {
        match self {
            FileKind::File => 1,
            FileKind::Dir => 2,
            FileKind::Symlink => 3,
            FileKind::Fifo => 4,
            FileKind::BlockDev => 5,
            FileKind::CharDev => 6,
            FileKind::Socket => 7,
        }
    }
    pub fn from_code(c: u8) -> Option<FileKind> {
        Some(match c {
            1 => FileKind::File,
            2 => FileKind::Dir,
            3 => FileKind::Symlink,
            4 => FileKind::Fifo,
            5 => FileKind::BlockDev,
            6 => FileKind::CharDev,
            7 => FileKind::Socket,
            _ => return None,
        })
    }
    /// The S_IFMT bits of this kind.
    pub fn mode_bits(self) -> u32 {
        match self {
            FileKind::File => libc::S_IFREG,
            FileKind::Dir => libc::S_IFDIR,
            FileKind::Symlink => libc::S_IFLNK,
            FileKind::Fifo => libc::S_IFIFO,
            FileKind::BlockDev => libc::S_IFBLK,
            FileKind::CharDev => libc::S_IFCHR,
            FileKind::Socket => libc::S_IFSOCK,
        }
    }
    pub fn from_mode(mode: u32) -> Option<FileKind> {
        Some(match mode & libc::S_IFMT {
            libc::S_IFREG | 0 => FileKind::File,
            libc::S_IFDIR => FileKind::Dir,
            libc::S_IFLNK => FileKind::Symlink,
            libc::S_IFIFO => FileKind::Fifo,
            libc::S_IFBLK => FileKind::BlockDev,
            libc::S_IFCHR => FileKind::CharDev,
            libc::S_IFSOCK => FileKind::Socket,
            _ => return None,
        })
    }
}

/// A hidden range of a file: every slice committed before `seq` is invisible in
/// `[start, end)`. Truncation and hole punching add masks instead of touching chunks, so
/// their cost does not depend on the file size or the number of slices (docs/FORMAT.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mask {
    pub seq: u64,
    pub start: u64,
    pub end: u64,
}

/// An inode as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub ino: Ino,
    pub kind: FileKind,
    /// Permission bits including setuid/setgid/sticky (0o7777).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Nanoseconds since the Unix epoch.
    pub atime: i64,
    pub mtime: i64,
    pub ctime: i64,
    pub nlink: u32,
    pub length: u64,
    pub rdev: u32,
    /// Parent directory (directories and singly-linked files; 0 when unknown).
    pub parent: Ino,
    /// Last sequence number handed out for this inode's slices and masks.
    pub seq: u64,
    /// Active masks, see [`Mask`].
    pub masks: Vec<Mask>,
}

impl Node {
    /// A new empty directory owned by root (the volume root, the trash).
    pub fn empty_dir(ino: Ino, parent: Ino, mode: u32, now: i64) -> Node {
        Node {
            ino,
            kind: FileKind::Dir,
            mode,
            uid: 0,
            gid: 0,
            atime: now,
            mtime: now,
            ctime: now,
            nlink: 2,
            length: 4096,
            rdev: 0,
            parent,
            seq: 0,
            masks: vec![],
        }
    }

    /// Serialized masks: 24 bytes each, little endian (seq, start, end).
    pub fn encode_masks(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.masks.len() * 24);
        for m in &self.masks {
            out.extend_from_slice(&m.seq.to_le_bytes());
            out.extend_from_slice(&m.start.to_le_bytes());
            out.extend_from_slice(&m.end.to_le_bytes());
        }
        out
    }
    pub fn decode_masks(b: &[u8]) -> Vec<Mask> {
        b.chunks_exact(24)
            .map(|c| Mask {
                seq: u64::from_le_bytes(c[0..8].try_into().unwrap_or_default()),
                start: u64::from_le_bytes(c[8..16].try_into().unwrap_or_default()),
                end: u64::from_le_bytes(c[16..24].try_into().unwrap_or_default()),
            })
            .collect()
    }
}

/// A slice committed to a chunk: `len` bytes of slice object `id` (starting at `off` inside
/// the slice's data) placed at `pos` inside the chunk. `id == 0` is a hole (zeros).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slice {
    /// Commit order within the inode; later slices win where they overlap.
    pub seq: u64,
    pub id: u64,
    /// Total bytes stored for slice `id` (fixes the block objects' names and lengths).
    pub size: u32,
    pub off: u32,
    pub len: u32,
    pub pos: u32,
}

/// A byte-range lock held by one lock owner: `typ` is `F_RDLCK` or `F_WRLCK`, `end` is
/// inclusive (`u64::MAX` = to the end of the file).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockRange {
    pub typ: u32,
    pub start: u64,
    pub end: u64,
    pub pid: u32,
}

/// The locks one owner (session `sid`, kernel lock owner `owner`) holds on an inode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockSet {
    pub sid: u64,
    pub owner: u64,
    pub ranges: Vec<LockRange>,
}

impl LockSet {
    /// 24 bytes per range, little endian: typ (u32), pid (u32), start, end.
    pub fn encode(ranges: &[LockRange]) -> Vec<u8> {
        let mut out = Vec::with_capacity(ranges.len() * 24);
        for r in ranges {
            out.extend_from_slice(&r.typ.to_le_bytes());
            out.extend_from_slice(&r.pid.to_le_bytes());
            out.extend_from_slice(&r.start.to_le_bytes());
            out.extend_from_slice(&r.end.to_le_bytes());
        }
        out
    }
    pub fn decode(b: &[u8]) -> Vec<LockRange> {
        b.chunks_exact(24)
            .map(|c| LockRange {
                typ: u32::from_le_bytes(c[0..4].try_into().unwrap_or_default()),
                pid: u32::from_le_bytes(c[4..8].try_into().unwrap_or_default()),
                start: u64::from_le_bytes(c[8..16].try_into().unwrap_or_default()),
                end: u64::from_le_bytes(c[16..24].try_into().unwrap_or_default()),
            })
            .collect()
    }
}

/// A directory quota: limits (0 = none) and the usage of the tree below `ino`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    pub ino: Ino,
    pub max_space: u64,
    pub max_inodes: u64,
    pub used_space: i64,
    pub used_inodes: i64,
}

/// A directory entry and the node it points to (`None` if that is gone).
pub type EntryNode = (Entry, Option<Node>);

/// A directory, one of its entries (if present) and that entry's node, as
/// [`Txn::get_dir_entry`] reads them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    pub dir: Node,
    pub entry: Option<EntryNode>,
}

/// A directory entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: Vec<u8>,
    pub ino: Ino,
    pub kind: FileKind,
}

/// Errors of the metadata layer. File-system errors carry the POSIX meaning of their name;
/// the FUSE layer maps them to errno in one place.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("no such file or directory")]
    NotFound,
    #[error("file exists")]
    Exists,
    #[error("not a directory")]
    NotDir,
    #[error("is a directory")]
    IsDir,
    #[error("directory not empty")]
    NotEmpty,
    #[error("operation not permitted")]
    Perm,
    #[error("permission denied")]
    Access,
    #[error("invalid argument: {0}")]
    Invalid(&'static str),
    #[error("file name too long")]
    NameTooLong,
    #[error("no space left on the volume (capacity or inode limit reached)")]
    NoSpace,
    #[error("no such attribute")]
    NoAttr,
    #[error("attribute value too large for the buffer")]
    Range,
    #[error("too many links")]
    TooManyLinks,
    #[error("operation not supported: {0}")]
    NotSupported(&'static str),
    #[error("file too large")]
    TooBig,
    #[error("disk quota exceeded")]
    Quota,
    #[error("cross-device link (the source and target are under different quotas)")]
    CrossQuota,
    #[error("transaction conflict")]
    Conflict,
    #[error(
        "read-only: this path belongs to an attached source (files there are the source's objects; change them in the source and run `strata attach --sync`)"
    )]
    ReadOnlySource,
    #[error(
        "the metadata at {0} is not formatted: run `strata format {0} NAME` first (see `strata format --help`)"
    )]
    NotFormatted(String),
    #[error("{0}")]
    Format(String),
    #[error("metadata engine error: {0}")]
    Engine(String),
    /// A change token the journal cannot answer (trimmed, another database, malformed).
    #[error("change journal: {0}")]
    JournalTrimmed(String),
}

pub type Result<T> = std::result::Result<T, MetaError>;

/// A metadata backend: transactions over the tables of docs/FORMAT.md. Engines know nothing
/// of POSIX; [`Meta`] holds the file-system logic. Every engine passes
/// [`conformance::run_all`].
pub trait MetaEngine: Send + Sync + 'static {
    /// `sqlite`, `postgres`, `mem`.
    fn kind(&self) -> &'static str;
    /// The URL without any password.
    fn describe(&self) -> String;
    /// Create the tables if they do not exist.
    fn init_schema(&self) -> Result<()>;
    /// Start a transaction. Write transactions are serializable with each other; a
    /// transaction that cannot be serialized fails with [`MetaError::Conflict`] at any call
    /// or at commit, and [`Meta`] retries it.
    fn begin(&self, write: bool) -> Result<Box<dyn Txn + '_>>;
    /// A read made of one request (a node, an entry with its node). An engine may run it
    /// without a transaction, the statement being its own snapshot (PostgreSQL: one round
    /// trip instead of `BEGIN` … `COMMIT`). Callers make exactly one request in it.
    fn begin_single_read(&self) -> Result<Box<dyn Txn + '_>> {
        self.begin(false)
    }
    /// Drop every table of the volume (`strata destroy`). Not a transaction of [`Meta`]: the
    /// caller makes sure no client uses the volume.
    fn drop_schema(&self) -> Result<()>;
}

/// The tables of docs/FORMAT.md, for [`MetaEngine::drop_schema`].
pub const TABLES: &[&str] = &[
    "setting",
    "counter",
    "node",
    "edge",
    "symlink",
    "xattr",
    "slice",
    "reclaim",
    "trim",
    "garbage",
    "session",
    "sustained",
    "plock",
    "dirquota",
    "journal",
    "backlog",
];

/// Operations inside one transaction. Dropping a transaction without `commit` rolls it back.
pub trait Txn {
    fn commit(self: Box<Self>) -> Result<()>;

    fn get_setting(&mut self, name: &str) -> Result<Option<String>>;
    fn set_setting(&mut self, name: &str, value: &str) -> Result<()>;
    /// Add `delta` to a named counter (created at 0) and return the new value. For id
    /// counters; an engine that shards usage counters (PostgreSQL, FORMAT.md §2 "Counter
    /// shards") returns the value of the counter's own row only.
    fn incr_counter(&mut self, name: &str, delta: i64) -> Result<i64>;
    /// Add `delta` to a named counter without reading it back (an engine may send it
    /// later in the transaction, batched with other writes).
    fn add_counter(&mut self, name: &str, delta: i64) -> Result<()> {
        self.incr_counter(name, delta).map(|_| ())
    }
    /// Value of a named counter (0 if never set); works in read transactions.
    fn get_counter(&mut self, name: &str) -> Result<i64>;

    fn get_node(&mut self, ino: Ino) -> Result<Option<Node>>;
    /// Insert or replace.
    fn put_node(&mut self, node: &Node) -> Result<()>;
    fn delete_node(&mut self, ino: Ino) -> Result<()>;

    fn get_edge(&mut self, parent: Ino, name: &[u8]) -> Result<Option<Entry>>;
    /// Node `parent`, its entry `name` and the node that entry points to (`None` if that is
    /// gone), in one request where the engine can (a join on PostgreSQL); `None` when
    /// `parent` does not exist.
    fn get_dir_entry(&mut self, parent: Ino, name: &[u8]) -> Result<Option<DirEntry>> {
        let Some(dir) = self.get_node(parent)? else {
            return Ok(None);
        };
        let entry = match self.get_edge(parent, name)? {
            Some(e) => {
                let node = self.get_node(e.ino)?;
                Some((e, node))
            }
            None => None,
        };
        Ok(Some(DirEntry { dir, entry }))
    }
    fn put_edge(&mut self, parent: Ino, entry: &Entry) -> Result<()>;
    fn delete_edge(&mut self, parent: Ino, name: &[u8]) -> Result<()>;
    /// Entries of `parent` in name order, strictly after `after`, at most `limit`.
    fn list_edges(&mut self, parent: Ino, after: Option<&[u8]>, limit: usize)
    -> Result<Vec<Entry>>;

    fn get_symlink(&mut self, ino: Ino) -> Result<Option<Vec<u8>>>;
    fn put_symlink(&mut self, ino: Ino, target: &[u8]) -> Result<()>;
    fn delete_symlink(&mut self, ino: Ino) -> Result<()>;

    fn get_xattr(&mut self, ino: Ino, name: &[u8]) -> Result<Option<Vec<u8>>>;
    fn put_xattr(&mut self, ino: Ino, name: &[u8], value: &[u8]) -> Result<()>;
    /// Returns whether it existed.
    fn delete_xattr(&mut self, ino: Ino, name: &[u8]) -> Result<bool>;
    fn list_xattrs(&mut self, ino: Ino) -> Result<Vec<Vec<u8>>>;
    fn delete_xattrs(&mut self, ino: Ino) -> Result<()>;

    /// Slices of one chunk in `seq` order.
    fn chunk_slices(&mut self, ino: Ino, indx: u32) -> Result<Vec<Slice>>;
    fn add_slice(&mut self, ino: Ino, indx: u32, slice: &Slice) -> Result<()>;
    fn delete_slice(&mut self, ino: Ino, indx: u32, seq: u64) -> Result<()>;
    /// Chunk indexes of `ino` that hold slices, ascending, `>= from`, at most `limit`.
    fn chunk_indexes(&mut self, ino: Ino, from: u32, limit: usize) -> Result<Vec<u32>>;

    /// `ino` is deleted by this transaction. Returns whether the transaction reports it to
    /// [`Meta`] when it ends (a write transaction of `Meta` does; see `Meta::open`).
    fn note_deleted(&mut self, _ino: Ino) -> bool {
        false
    }
    /// Queue: inodes whose data must be reclaimed (`length` for information).
    fn add_reclaim(&mut self, ino: Ino, length: u64) -> Result<()>;
    fn list_reclaim(&mut self, limit: usize) -> Result<Vec<(Ino, u64)>>;
    fn delete_reclaim(&mut self, ino: Ino) -> Result<()>;
    /// Queue: inodes with masks whose hidden slices can be dropped.
    fn add_trim(&mut self, ino: Ino) -> Result<()>;
    fn list_trim(&mut self, limit: usize) -> Result<Vec<Ino>>;
    fn delete_trim(&mut self, ino: Ino) -> Result<()>;
    /// Queue: slice objects no longer referenced, deletable at `due` (unix seconds).
    fn add_garbage(&mut self, id: u64, size: u32, due: i64) -> Result<()>;
    fn list_due_garbage(&mut self, now: i64, limit: usize) -> Result<Vec<(u64, u32)>>;
    fn delete_garbage(&mut self, id: u64) -> Result<()>;
    /// Whether slice `id` is queued as garbage (due or not).
    fn has_garbage(&mut self, id: u64) -> Result<bool>;

    /// Sessions: a mounted client and the time its liveness expires unless it heartbeats
    /// again (unix seconds; stored in the `heartbeat` column).
    fn put_session(&mut self, sid: u64, heartbeat: i64, info: &str) -> Result<()>;
    fn delete_session(&mut self, sid: u64) -> Result<()>;
    fn list_sessions(&mut self) -> Result<Vec<(u64, i64, String)>>;
    /// Inodes unlinked while a session still had them open.
    fn add_sustained(&mut self, sid: u64, ino: Ino) -> Result<()>;
    fn delete_sustained(&mut self, sid: u64, ino: Ino) -> Result<()>;
    fn list_sustained(&mut self, sid: u64) -> Result<Vec<Ino>>;

    /// Byte-range locks of an inode, all owners.
    fn get_locks(&mut self, ino: Ino) -> Result<Vec<LockSet>>;
    /// Replace the ranges one owner holds on an inode (empty: remove the owner's row).
    fn put_locks(&mut self, ino: Ino, sid: u64, owner: u64, ranges: &[LockRange]) -> Result<()>;
    /// Drop every lock of a session.
    fn delete_session_locks(&mut self, sid: u64) -> Result<()>;

    /// Full scans for `strata fsck`, in key order, after the given key, at most `limit`.
    fn scan_nodes(&mut self, after: Ino, limit: usize) -> Result<Vec<Node>>;
    fn scan_edges(
        &mut self,
        after: Option<(Ino, &[u8])>,
        limit: usize,
    ) -> Result<Vec<(Ino, Entry)>>;
    /// Inodes that have slices.
    fn scan_slice_inodes(&mut self, after: Ino, limit: usize) -> Result<Vec<Ino>>;
    fn set_counter(&mut self, name: &str, value: i64) -> Result<()>;

    fn get_quota(&mut self, ino: Ino) -> Result<Option<Quota>>;
    fn put_quota(&mut self, q: &Quota) -> Result<()>;
    fn delete_quota(&mut self, ino: Ino) -> Result<()>;
    fn list_quotas(&mut self) -> Result<Vec<Quota>>;

    /// Change journal (docs/FORMAT.md §15): append rows `(ino, kind)` committed at `at` (ns).
    fn journal_append(&mut self, rows: &[(Ino, u8)], at: i64) -> Result<()>;
    /// The position the next committed row will have or exceed, as seen by this transaction.
    fn journal_position(&mut self) -> Result<u64>;
    /// Distinct `(ino, kind)` of rows at positions `>= pos`, at most `limit`.
    fn journal_since(&mut self, pos: u64, limit: usize) -> Result<Vec<(Ino, u8)>>;
    /// Delete rows committed before `before` (ns); returns the highest position deleted + 1
    /// (0: none deleted).
    fn journal_trim(&mut self, before: i64) -> Result<u64>;

    /// Mirror backlog (docs/FORMAT.md §16): object keys that may be missing from one of the
    /// two stores of a mirrored volume.
    fn backlog_add(&mut self, key: &str, at: i64) -> Result<()>;
    /// Keys in key order after `after`, at most `limit`.
    fn backlog_list(&mut self, after: &str, limit: usize) -> Result<Vec<String>>;
    fn backlog_delete(&mut self, key: &str) -> Result<()>;
    fn backlog_count(&mut self) -> Result<u64>;
}

/// Open the engine named by a metadata URL.
pub fn open_engine(url: &str) -> Result<Box<dyn MetaEngine>> {
    if let Some(path) = url.strip_prefix("sqlite://") {
        if path.is_empty() {
            return Err(MetaError::Format(format!(
                "metadata URL {url} has no path: use sqlite:///absolute/path/meta.db"
            )));
        }
        return Ok(Box::new(SqliteEngine::open(path)?));
    }
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        return Ok(Box::new(PostgresEngine::open(url)?));
    }
    if url == "mem://" || url.starts_with("mem://") {
        return Ok(Box::new(MemEngine::new()));
    }
    Err(MetaError::Format(format!(
        "unsupported metadata URL {}: use sqlite:///path/meta.db or postgres://user:password@host:5432/db",
        redact_url(url)
    )))
}

/// A URL with any password replaced by `****`, for logs and errors.
pub fn redact_url(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://")
        && let Some((auth, host)) = rest.split_once('@')
        && let Some((user, _)) = auth.split_once(':')
    {
        return format!("{scheme}://{user}:****@{host}");
    }
    url.to_string()
}

pub(crate) fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}
